//! The command line's admin commands: status, blocks, unblock, events,
//! exemptions and tokens. Each works on the store directly, or on a
//! running server's admin API with `--server`.

use sendguard::admin::client::{Client, Target};
use sendguard::admin::{ExemptionRequest, views};
use sendguard::config::{Config, Unauthenticated};
use sendguard::events::{Event, EventKind, Format, write_events};
use sendguard::guard::Runtime;
use sendguard::policy::Timestamp;
use sendguard::store::{EventFilter, sqlite};
use serde_json::Value;
use std::fmt::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Options shared by the commands that can talk to a running server.
#[derive(clap::Args, Clone)]
pub struct Remote {
    /// URL of a running server's admin API, such as http://127.0.0.1:8025.
    /// Without it the store named in the config is read and written
    /// directly.
    #[arg(long)]
    pub server: Option<String>,
    /// File with the admin token for --server; default: admin.token_file.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// Output formats of the admin commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Writes command output to stdout; a reader that went away (`| head`) is
/// not an error.
pub fn print(text: &str) -> Result<(), String> {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(error) => Err(format!("cannot write to standard output: {error}")),
    }
}

fn tokio_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start the async runtime: {error}"))
}

/// Builds the runtime the admin commands need. Files of secrets these
/// commands never use (the admin token, the webhook key, the upstream
/// password, the TLS key) are left unread, so support staff can run them
/// without access to those files.
fn runtime(config: &Path) -> Result<Runtime, String> {
    let mut config = Config::load(config).map_err(|error| error.to_string())?;
    config.admin.token_file = None;
    config.actions.secret_file = None;
    config.upstream.username = None;
    config.upstream.password_file = None;
    config.smtp.tls_cert_file = None;
    config.smtp.tls_key_file = None;
    Runtime::new(config)
}

/// Builds the client for `remote`, reading the admin token when a server
/// is given.
fn client(config: &Path, remote: &Remote) -> Result<Client, String> {
    let token_file = Config::load(config)
        .map_err(|error| error.to_string())?
        .admin
        .token_file;
    let runtime = runtime(config)?;
    let target = match &remote.server {
        None => Target::Store,
        Some(url) => {
            check_server_url(url)?;
            let path = remote.token_file.clone().or(token_file).ok_or(
                "--server needs the admin token: give --token-file or set admin.token_file",
            )?;
            let token = sendguard::admin::read_token(&path)?;
            Target::Server {
                url: url.clone(),
                token,
            }
        }
    };
    Ok(Client { runtime, target })
}

fn pretty(value: &Value) -> String {
    format!(
        "{}\n",
        serde_json::to_string_pretty(value).unwrap_or_default()
    )
}

fn text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

/// Checks a `--server` URL: http or https, a host, and no path beyond `/`.
fn check_server_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|error| {
        format!("invalid --server {url:?}: {error}; give one such as http://127.0.0.1:8025")
    })?;
    if !matches!(parsed.scheme(), "http" | "https") || !parsed.has_host() {
        return Err(format!(
            "invalid --server {url:?}: give an http:// or https:// URL such as http://127.0.0.1:8025"
        ));
    }
    if parsed.path() != "/" {
        return Err(format!(
            "invalid --server {url:?}: give the server's address without a path, such as \
             http://127.0.0.1:8025; the command adds /api/v1/..."
        ));
    }
    Ok(())
}

/// `sendguard status`: a mailbox's strike ledger.
pub fn status(
    mailbox: &str,
    config: &Path,
    client_address: Option<IpAddr>,
    remote: &Remote,
    output: Output,
) -> Result<(), String> {
    let client = client(config, remote)?;
    let pairs = client.runtime.config.identity.unauthenticated == Unauthenticated::ClientAndSender;
    let ledgers = if matches!(client.target, Target::Store) && pairs && client_address.is_none() {
        every_client_ledger(&client, mailbox)?
    } else {
        vec![tokio_runtime()?.block_on(client.ledger(mailbox, client_address))?]
    };
    if output == Output::Json {
        let value = if ledgers.len() == 1 {
            ledgers[0].clone()
        } else {
            Value::Array(ledgers)
        };
        return print(&pretty(&value));
    }
    let recorded: Vec<&Value> = ledgers
        .iter()
        .filter(|ledger| {
            ledger["lockouts"].as_u64() != Some(0)
                || ledger["strikes"]
                    .as_array()
                    .is_some_and(|strikes| !strikes.is_empty())
                || !ledger["last_lockout"].is_null()
        })
        .collect();
    if recorded.is_empty() {
        let name = ledgers
            .first()
            .map_or_else(|| mailbox.to_string(), |ledger| text(&ledger["mailbox"]));
        return print(&format!("{name}: no strikes and no lockouts recorded\n"));
    }
    let mode = client.runtime.config.policy.mode;
    let mut out = String::new();
    for ledger in recorded {
        render_ledger(&mut out, ledger, mode);
    }
    print(&out)
}

/// Returns the ledgers of every client address a mailbox is counted
/// under, for `client-and-sender` without `--client`.
fn every_client_ledger(client: &Client, mailbox: &str) -> Result<Vec<Value>, String> {
    let runtime = &client.runtime;
    let canonical = sendguard::identity::mailbox_from_input(
        mailbox,
        &runtime.config.identity,
        &runtime.directory,
    )?;
    let connection =
        sqlite::open_existing(&runtime.config.store.path).map_err(|error| error.to_string())?;
    let now = Timestamp::now();
    let (states, exemptions) = if client.runtime.config.store.backend
        == sendguard::config::Backend::Redis
    {
        // The Redis connection needs the async runtime from its creation.
        tokio_runtime()?.block_on(async {
            let store = client
                .shared_store()?
                .ok_or("the Redis store is not open")?;
            let states = store.mailbox_states(canonical.clone()).await;
            let exemptions = store.active_exemptions(now).await;
            Ok::<_, String>((
                states.map_err(|error| error.to_string())?,
                exemptions.map_err(|error| error.to_string())?,
            ))
        })?
    } else {
        (
            sqlite::mailbox_states(&connection, &canonical).map_err(|error| error.to_string())?,
            sendguard::store::exemptions::active(&connection, now)
                .map_err(|error| error.to_string())?,
        )
    };
    let mut ledgers: Vec<Value> = states
        .iter()
        .map(|(key, state)| {
            views::ledger_json(
                key,
                state,
                &runtime.settings(),
                &exemptions,
                &runtime.directory,
                now,
            )
        })
        .collect();
    if ledgers.is_empty() {
        ledgers.push(serde_json::json!({ "mailbox": canonical, "lockouts": 0, "strikes": [] }));
    }
    Ok(ledgers)
}

fn render_ledger(out: &mut String, ledger: &Value, mode: sendguard::policy::Mode) {
    let key = match ledger["key_client"].as_str() {
        Some(client) => format!("{} from {client}", text(&ledger["mailbox"])),
        None => text(&ledger["mailbox"]),
    };
    let strikes = ledger["strikes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let _ = writeln!(out, "mailbox:           {key}");
    let _ = writeln!(
        out,
        "strikes in window: {} of {} (window {})",
        strikes.len(),
        text(&ledger["threshold"]),
        text(&ledger["window"])
    );
    let _ = writeln!(out, "lockouts so far:   {}", text(&ledger["lockouts"]));
    let block = &ledger["block"];
    let blocked = if block.is_null() {
        "no".to_string()
    } else {
        let monitor_only =
            block["enforced"] == Value::Bool(false) && mode == sendguard::policy::Mode::Monitor;
        let note = if monitor_only { ", monitor only" } else { "" };
        match block["until"].as_str() {
            None => format!("permanently (lockout {}{note})", text(&block["level"])),
            Some(until) => format!("until {until} (lockout {}{note})", text(&block["level"])),
        }
    };
    let _ = writeln!(out, "blocked:           {blocked}");
    let next = &ledger["next_lockout"];
    let next = if next["permanent"] == Value::Bool(true) {
        "permanent block".to_string()
    } else {
        text(&next["length"])
    };
    let _ = writeln!(out, "next lockout:      {next}");
    for exemption in ledger["exemptions"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let _ = writeln!(
            out,
            "exempt:            until {} by exemption {} ({})",
            text(&exemption["expires"]),
            text(&exemption["id"]),
            text(&exemption["reason"])
        );
    }
    for strike in strikes {
        let _ = writeln!(
            out,
            "  strike {}  {}  {}",
            text(&strike["time"]),
            text(&strike["verdict"]),
            text(&strike["transaction"])
        );
    }
}

/// `sendguard blocks`: the blocks in force.
pub fn blocks(config: &Path, remote: &Remote, output: Output) -> Result<(), String> {
    let client = client(config, remote)?;
    let value = tokio_runtime()?.block_on(client.blocks())?;
    if output == Output::Json {
        return print(&pretty(&value));
    }
    let blocks = value["blocks"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if blocks.is_empty() {
        return print("no mailbox is locked out\n");
    }
    let monitor = client.runtime.config.policy.mode == sendguard::policy::Mode::Monitor;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<40}  {:>7}  {:<22}  MODE",
        "MAILBOX", "LOCKOUT", "UNTIL"
    );
    for block in blocks {
        let key = match block["key_client"].as_str() {
            Some(client) => format!("{} from {client}", text(&block["mailbox"])),
            None => text(&block["mailbox"]),
        };
        let until = block["until"].as_str().unwrap_or("permanent");
        let mode = if block["enforced"] == Value::Bool(false) && monitor {
            "monitor"
        } else {
            "enforced"
        };
        let _ = writeln!(
            out,
            "{key:<40}  {:>7}  {until:<22}  {mode}",
            text(&block["level"])
        );
    }
    print(&out)
}

/// The arguments of `sendguard unblock`.
pub struct Unblock<'a> {
    pub mailbox: &'a str,
    pub config: &'a Path,
    pub client: Option<IpAddr>,
    pub reason: &'a str,
    pub reset_count: bool,
    pub support_token_file: &'a Path,
    pub server: Option<String>,
}

/// `sendguard unblock`: lifts a permanent block or resets a lockout count
/// with the support token.
pub fn unblock(arguments: Unblock<'_>) -> Result<(), String> {
    let support_token = sendguard::admin::read_token(arguments.support_token_file)?;
    if let Some(url) = &arguments.server {
        check_server_url(url)?;
    }
    let runtime = runtime(arguments.config)?;
    let target = match arguments.server {
        None => Target::Store,
        // The support token is the bearer token for this request.
        Some(url) => Target::Server {
            url,
            token: support_token.clone(),
        },
    };
    let client = Client { runtime, target };
    let value = tokio_runtime()?.block_on(client.unblock(
        arguments.mailbox,
        arguments.client,
        arguments.reason,
        arguments.reset_count,
        &support_token,
    ))?;
    let mut out = String::new();
    if value["permanent_block_lifted"] == Value::Bool(true) {
        let _ = write!(out, "{}: permanent block lifted", text(&value["mailbox"]));
    } else {
        let _ = write!(out, "{}: lockout count reset", text(&value["mailbox"]));
    }
    let _ = writeln!(
        out,
        "; lockout count {} -> {}",
        text(&value["lockouts_before"]),
        text(&value["lockouts_after"])
    );
    print(&out)
}

/// The filters of `sendguard events`.
pub struct EventsQuery {
    pub since: Option<String>,
    pub until: Option<String>,
    pub mailbox: Option<String>,
    pub device: Option<String>,
    pub kind: Option<String>,
}

/// `sendguard events`: the events report.
pub fn events(
    config: &Path,
    query: EventsQuery,
    format: Format,
    remote: &Remote,
) -> Result<(), String> {
    let client = client(config, remote)?;
    let runtime = &client.runtime;
    let mut filter = EventFilter::default();
    let mut pairs = Vec::new();
    if let Some(since) = &query.since {
        filter.since = Some(sendguard::admin::parse_time("--since", since)?);
        pairs.push(("since", since.clone()));
    }
    if let Some(until) = &query.until {
        filter.until = Some(sendguard::admin::parse_time("--until", until)?);
        pairs.push(("until", until.clone()));
    }
    if let Some(mailbox) = &query.mailbox {
        filter.mailbox = Some(sendguard::identity::mailbox_from_input(
            mailbox,
            &runtime.config.identity,
            &runtime.directory,
        )?);
        pairs.push(("mailbox", mailbox.clone()));
    }
    if let Some(device) = &query.device {
        filter.device_mailboxes = runtime.directory.mailboxes_of_device(device);
        filter.device = Some(device.clone());
        pairs.push(("device", device.clone()));
    }
    if let Some(kind) = &query.kind {
        filter.kind = Some(EventKind::parse(kind).ok_or_else(|| {
            let known: Vec<&str> = EventKind::ALL.iter().map(|kind| kind.as_str()).collect();
            format!(
                "unknown event type {kind:?}; known types: {}",
                known.join(", ")
            )
        })?);
        pairs.push(("type", kind.clone()));
    }
    let values = tokio_runtime()?.block_on(client.events(&filter, &pairs))?;
    let events: Vec<Event> = values.iter().filter_map(event_from_json).collect();
    let mut out = Vec::new();
    write_events(&mut out, &events, format)
        .map_err(|error| format!("cannot write the report: {error}"))?;
    print(&String::from_utf8_lossy(&out))
}

/// `sendguard simulate`: replays the recorded history under a candidate
/// policy, or under the policies recorded in force when `policy` is
/// `None`, reading the store named in the configuration.
pub fn simulate(
    config: &Path,
    policy: Option<&Path>,
    since: &str,
    format: Format,
) -> Result<(), String> {
    let runtime = runtime(config)?;
    let config = &runtime.config;

    let text = match policy {
        Some(policy) => std::fs::read_to_string(policy)
            .map_err(|error| format!("cannot read policy file {}: {error}", policy.display()))?,
        None => String::new(),
    };
    let candidate = config.candidate(&text).map_err(|problems| {
        let name = policy.map_or_else(String::new, |policy| policy.display().to_string());
        format!("invalid policy file {name}:\n{problems}")
    })?;
    let since = sendguard::admin::parse_time("--since", since)?;

    let directory =
        sendguard::simulate::candidate_directory(config, &runtime.directory, &candidate)
            .map_err(|error| error.to_string())?;
    if config.store.backend == sendguard::config::Backend::Sqlite && !config.store.path.exists() {
        return Err(format!(
            "store file {} not found; simulate reads the events a running sendguard recorded \
             there, so check store.path",
            config.store.path.display()
        ));
    }

    // Opening Redis needs the async runtime.
    let report = tokio_runtime()?.block_on(async {
        let store = sendguard::store::Store::from_config(&config.store, config.events.keep)
            .map_err(|error| error.to_string())?;
        sendguard::simulate::run(&store, &candidate, &directory, since, policy.is_none())
            .await
            .map_err(|error| error.to_string())
    })?;
    let mut out = Vec::new();
    report
        .write(&mut out, format)
        .map_err(|error| format!("cannot write the report: {error}"))?;
    print(&String::from_utf8_lossy(&out))
}

/// Rebuilds an event from its JSON form, as the API sends it.
fn event_from_json(value: &Value) -> Option<Event> {
    let Value::Object(map) = value else {
        return None;
    };
    let mut details = map.clone();
    let id = details.remove("id").and_then(|id| id.as_i64());
    let time = Timestamp::parse_rfc3339(details.remove("time")?.as_str()?)?;
    let kind = EventKind::parse(details.remove("type")?.as_str()?)?;
    let mailbox = details
        .remove("mailbox")
        .and_then(|mailbox| mailbox.as_str().map(str::to_string));
    let key_client = details
        .remove("key_client")
        .and_then(|client| client.as_str().map(str::to_string));
    Some(Event {
        id,
        time,
        kind,
        mailbox,
        key_client,
        details,
    })
}

/// `sendguard exemptions list`.
pub fn list_exemptions(
    config: &Path,
    remote: &Remote,
    all: bool,
    output: Output,
) -> Result<(), String> {
    let client = client(config, remote)?;
    let value = tokio_runtime()?.block_on(client.exemptions(all))?;
    if output == Output::Json {
        return print(&pretty(&value));
    }
    let list = value["exemptions"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if list.is_empty() {
        return print("no exemption is in force\n");
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>4}  {:<8}  {:<32}  {:<20}  {:<12}  {:<8}  REASON",
        "ID", "MATCH", "VALUE", "EXPIRES", "AUTHOR", "STATE"
    );
    for exemption in list {
        let state = if !exemption["removed"].is_null() {
            "removed"
        } else if exemption["in_force"] == Value::Bool(true) {
            "in force"
        } else {
            "expired"
        };
        let _ = writeln!(
            out,
            "{:>4}  {:<8}  {:<32}  {:<20}  {:<12}  {state:<8}  {}",
            text(&exemption["id"]),
            text(&exemption["match"]),
            text(&exemption["value"]),
            text(&exemption["expires"]),
            text(&exemption["author"]),
            text(&exemption["reason"])
        );
    }
    print(&out)
}

/// `sendguard exemptions add`.
pub fn add_exemption(
    config: &Path,
    remote: &Remote,
    request: ExemptionRequest,
) -> Result<(), String> {
    let client = client(config, remote)?;
    let value = tokio_runtime()?.block_on(client.add_exemption(request))?;
    print(&format!(
        "exemption {} added: {} {} until {}\n",
        text(&value["id"]),
        text(&value["match"]),
        text(&value["value"]),
        text(&value["expires"])
    ))
}

/// `sendguard exemptions remove`.
pub fn remove_exemption(config: &Path, remote: &Remote, id: i64, by: &str) -> Result<(), String> {
    let client = client(config, remote)?;
    let value = tokio_runtime()?.block_on(client.remove_exemption(id, by))?;
    print(&format!(
        "exemption {} removed: {} {}\n",
        text(&value["id"]),
        text(&value["match"]),
        text(&value["value"])
    ))
}

/// `sendguard token generate`: prints a new random token.
pub fn generate_token() -> Result<(), String> {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    print(&format!("{token}\n"))
}

/// `sendguard token hash`: prints the SHA-256 of the token in a file, for
/// `admin.support_token_sha256`.
pub fn hash_token(file: &Path) -> Result<(), String> {
    let token = sendguard::admin::read_token(file)?;
    print(&format!(
        "{}\n",
        hex::encode(sendguard::admin::sha256(&token))
    ))
}

/// `sendguard store migrate`: copies the SQLite store into Redis.
pub fn migrate_store(config: &Path) -> Result<(), String> {
    let config = sendguard::config::Config::load(config).map_err(|error| error.to_string())?;
    if config.store.backend != sendguard::config::Backend::Redis {
        return Err(
            "store.backend is not \"redis\": set backend = \"redis\" and url (or nodes) in \
             [store], keeping path at the SQLite file to copy"
                .to_string(),
        );
    }
    let connection =
        sqlite::open_existing(&config.store.path).map_err(|error| error.to_string())?;
    let migration = tokio_runtime()?.block_on(async {
        // The Redis connection needs the async runtime from its creation.
        let redis = sendguard::store::redis::RedisStore::open(&config.store, config.events.keep)
            .map_err(|error| error.to_string())?;
        sendguard::store::migrate::sqlite_to_redis(&connection, &redis)
            .await
            .map_err(|error| format!("migration stopped: {error}; run it again to finish"))
    })?;
    let mut report = format!(
        "copied {} mailbox states, {} events and {} waiting deliveries from {} to Redis\n",
        migration.mailboxes,
        migration.events,
        migration.deliveries,
        config.store.path.display()
    );
    if migration.events_skipped {
        report.push_str("events not copied: the Redis events stream already holds events\n");
    }
    for mailbox in &migration.kept {
        report.push_str(&format!("kept Redis's state of {mailbox}\n"));
    }
    print(&report)
}

/// Returns the deliveries waiting in the shared Redis outbox.
pub fn shared_outbox(config: &Config) -> Result<Vec<sendguard::store::outbox::Waiting>, String> {
    tokio_runtime()?.block_on(async {
        // The Redis connection needs the async runtime from its creation.
        let redis = sendguard::store::redis::RedisStore::open(&config.store, config.events.keep)
            .map_err(|error| error.to_string())?;
        redis
            .waiting_deliveries()
            .await
            .map_err(|error| error.to_string())
    })
}
