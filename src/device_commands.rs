//! `sendguard device`: an agent's reports (heartbeat, offline, watch) and
//! the operator's views (list, show, access, exclusions), all through a
//! running server's admin API.

use clap::{Args, Subcommand};
use serde_json::{Value, json};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// The server and token the device commands use.
#[derive(Args, Clone)]
pub struct Connection {
    /// URL of the server's admin API, such as http://127.0.0.1:8025.
    /// Default: http:// and admin.listen from --config.
    #[arg(long)]
    server: Option<String>,
    /// File whose first line is the bearer token: the device's own token,
    /// or the admin token. Default: admin.token_file from --config.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// sendguard's configuration, for the defaults above.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum DeviceCommand {
    /// Report a device's health, as its agent does every 15 seconds.
    Heartbeat {
        #[command(flatten)]
        connection: Connection,
        /// Device id, as in the devices file.
        #[arg(long)]
        id: String,
        /// green, yellow or red.
        #[arg(long)]
        health: String,
        /// The device's current IP addresses; repeat for several.
        #[arg(long = "address")]
        addresses: Vec<String>,
    },
    /// Sign a device off in order (the agent sleeps or stops), so it is
    /// offline and never reported missing.
    Offline {
        #[command(flatten)]
        connection: Connection,
        #[arg(long)]
        id: String,
    },
    /// Print each notice about devices on this device's subnet becoming
    /// unsafe or safe again, one JSON object per line, until interrupted.
    /// A lost connection is opened again and resumes after the last notice.
    Watch {
        #[command(flatten)]
        connection: Connection,
        #[arg(long)]
        id: String,
        /// Start after this notice id instead of with the next notice.
        #[arg(long)]
        last_event_id: Option<i64>,
    },
    /// List devices with state, health, last heartbeat and unsafe reason.
    List {
        #[command(flatten)]
        connection: Connection,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one device as JSON.
    Show {
        #[command(flatten)]
        connection: Connection,
        id: String,
    },
    /// Ask whether SOURCE may connect to DESTINATION (device ids, names or
    /// addresses); a refusal is recorded on the device that refused.
    Access {
        #[command(flatten)]
        connection: Connection,
        source: String,
        destination: String,
    },
    /// Show the device settings in force with their source, or override
    /// reject_unsafe until it is reset (a reload does not undo it).
    Settings {
        #[command(flatten)]
        connection: Connection,
        /// true or false overrides devices.reject_unsafe; file goes back
        /// to the configuration file's value.
        #[arg(long)]
        reject_unsafe: Option<String>,
        #[command(flatten)]
        record: ChangeRecord,
    },
    /// List, add, lift or remove device exclusions made through the API.
    Exclusions {
        #[command(subcommand)]
        command: ExclusionCommand,
    },
}

#[derive(Subcommand)]
pub enum ExclusionCommand {
    /// Show every exclusion in force and why.
    List {
        #[command(flatten)]
        connection: Connection,
    },
    /// Exclude a device: it is always accepted and always reachable.
    Add {
        #[command(flatten)]
        connection: Connection,
        id: String,
        /// Why; recorded in the events report.
        #[arg(long)]
        reason: String,
        /// Who; recorded in the events report.
        #[arg(long)]
        author: String,
    },
    /// Lift the exclusion that the configuration file gives a device (in
    /// devices.exclusions or by its role) until `remove` resets it.
    Lift {
        #[command(flatten)]
        connection: Connection,
        id: String,
        /// Why; recorded in the events report.
        #[arg(long)]
        reason: String,
        /// Who; recorded in the events report.
        #[arg(long)]
        author: String,
    },
    /// Remove an exclusion made with `add`, or a lift made with `lift`.
    Remove {
        #[command(flatten)]
        connection: Connection,
        id: String,
        /// Who; recorded in the events report.
        #[arg(long, default_value = "admin")]
        by: String,
    },
}

/// Runs one `sendguard device` command.
///
/// # Errors
/// A message saying what failed: a missing option, an unreachable server
/// or the server's error.
pub fn run(command: DeviceCommand) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start the async runtime: {error}"))?;
    runtime.block_on(execute(command))
}

async fn execute(command: DeviceCommand) -> Result<(), String> {
    match command {
        DeviceCommand::Heartbeat {
            connection,
            id,
            health,
            addresses,
        } => {
            let body = json!({ "device": id, "health": health, "addresses": addresses });
            let answer = Api::new(&connection)?
                .send(reqwest::Method::POST, "/api/v1/heartbeats", Some(body))
                .await?;
            println!("{} is {}", id, text(&answer["state"]));
            Ok(())
        }
        DeviceCommand::Offline { connection, id } => {
            let body = json!({ "device": id, "health": "offline" });
            let answer = Api::new(&connection)?
                .send(reqwest::Method::POST, "/api/v1/heartbeats", Some(body))
                .await?;
            println!("{} is {}", id, text(&answer["state"]));
            Ok(())
        }
        DeviceCommand::Watch {
            connection,
            id,
            last_event_id,
        } => watch(&Api::new(&connection)?, &id, last_event_id).await,
        DeviceCommand::List { connection, json } => {
            let answer = Api::new(&connection)?
                .send(reqwest::Method::GET, "/api/v1/devices", None)
                .await?;
            if json {
                print_json(&answer)
            } else {
                print_table(&answer)
            }
        }
        DeviceCommand::Show { connection, id } => {
            let path = format!("/api/v1/devices/{}", sendguard::admin::percent_encode(&id));
            print_json(
                &Api::new(&connection)?
                    .send(reqwest::Method::GET, &path, None)
                    .await?,
            )
        }
        DeviceCommand::Access {
            connection,
            source,
            destination,
        } => {
            let body = json!({ "source": source, "destination": destination });
            let answer = Api::new(&connection)?
                .send(reqwest::Method::POST, "/api/v1/access", Some(body))
                .await?;
            let verdict = if answer["allowed"] == true {
                "allowed"
            } else {
                "refused"
            };
            println!("{verdict}: {}", text(&answer["reason"]));
            Ok(())
        }
        DeviceCommand::Settings {
            connection,
            reject_unsafe,
            record: ChangeRecord { reason, author },
        } => {
            let api = Api::new(&connection)?;
            let Some(value) = reject_unsafe else {
                return print_json(
                    &api.send(reqwest::Method::GET, "/api/v1/device-settings", None)
                        .await?,
                );
            };
            let value = setting_value("--reject-unsafe", &value)?;
            let body = json!({ "reject_unsafe": value, "reason": reason, "author": author });
            print_json(
                &api.send(reqwest::Method::PUT, "/api/v1/device-settings", Some(body))
                    .await?,
            )
        }
        DeviceCommand::Exclusions { command } => exclusions(command).await,
    }
}

async fn exclusions(command: ExclusionCommand) -> Result<(), String> {
    match command {
        ExclusionCommand::List { connection } => print_json(
            &Api::new(&connection)?
                .send(reqwest::Method::GET, "/api/v1/device-exclusions", None)
                .await?,
        ),
        ExclusionCommand::Add {
            connection,
            id,
            reason,
            author,
        } => {
            let body = json!({ "device": id, "reason": reason, "author": author });
            print_json(
                &Api::new(&connection)?
                    .send(
                        reqwest::Method::POST,
                        "/api/v1/device-exclusions",
                        Some(body),
                    )
                    .await?,
            )
        }
        ExclusionCommand::Lift {
            connection,
            id,
            reason,
            author,
        } => {
            let body =
                json!({ "device": id, "excluded": false, "reason": reason, "author": author });
            print_json(
                &Api::new(&connection)?
                    .send(
                        reqwest::Method::POST,
                        "/api/v1/device-exclusions",
                        Some(body),
                    )
                    .await?,
            )
        }
        ExclusionCommand::Remove { connection, id, by } => {
            let path = format!(
                "/api/v1/device-exclusions/{}?by={}",
                sendguard::admin::percent_encode(&id),
                sendguard::admin::percent_encode(&by)
            );
            print_json(
                &Api::new(&connection)?
                    .send(reqwest::Method::DELETE, &path, None)
                    .await?,
            )
        }
    }
}

/// A server's admin API with the token to present.
struct Api {
    url: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    fn new(connection: &Connection) -> Result<Api, String> {
        let config = match &connection.config {
            None => None,
            Some(path) => {
                Some(sendguard::config::Config::load(path).map_err(|error| error.to_string())?)
            }
        };
        let url = connection
            .server
            .clone()
            .or_else(|| {
                config
                    .as_ref()
                    .and_then(|config| config.admin.listen)
                    .map(|listen| format!("http://{listen}"))
            })
            .ok_or("give --server URL, or --config with admin.listen set")?;
        let token_file = connection
            .token_file
            .clone()
            .or_else(|| config.as_ref().and_then(|config| config.admin.token_file.clone()))
            .ok_or("give --token-file with the device's or the admin token, or --config with admin.token_file set")?;
        let token = sendguard::admin::read_token(&token_file)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(
                sendguard::tls::verifying_client_config(None, "the system trust store")
                    .map_err(|error| format!("cannot set up TLS: {error}"))?,
            )
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|error| format!("cannot build the HTTP client: {error}"))?;
        Ok(Api {
            url: url.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let address = format!("{}{path}", self.url);
        let mut request = self
            .http
            .request(method, &address)
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(60));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|error| {
            let mut text = format!("request to {address} failed: {error}");
            sendguard::append_causes(&mut text, &error);
            text
        })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|error| format!("cannot read the answer of {address}: {error}"))?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            Ok(value)
        } else {
            let message = value["error"]
                .as_str()
                .map_or(value.to_string(), str::to_string);
            Err(format!("server answered {status}: {message}"))
        }
    }
}

/// Follows a device's event stream, printing each notice's data line, and
/// opens it again after a lost connection with `Last-Event-ID`.
async fn watch(api: &Api, id: &str, mut last_event_id: Option<i64>) -> Result<(), String> {
    const MAX_WAIT: Duration = Duration::from_secs(30);
    let address = format!(
        "{}/api/v1/devices/{}/events",
        api.url,
        sendguard::admin::percent_encode(id)
    );
    let mut wait = Duration::from_secs(1);
    loop {
        let mut request = api
            .http
            .get(&address)
            .bearer_auth(&api.token)
            .header("Accept", "text/event-stream");
        if let Some(last) = last_event_id {
            request = request.header("Last-Event-ID", last.to_string());
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => {
                eprintln!("sendguard: watching {address}");
                if last_event_id.is_none() {
                    // Resume from where this stream started, even when no
                    // notice arrives before the connection is lost.
                    last_event_id = response
                        .headers()
                        .get("sendguard-stream-start")
                        .and_then(|value| value.to_str().ok())
                        .and_then(|text| text.parse().ok());
                }
                wait = Duration::from_secs(1);
                read_stream(response, &mut last_event_id).await;
            }
            Ok(response) if response.status().is_client_error() => {
                let status = response.status();
                let body = response.text().await.unwrap_or_default();
                return Err(format!("server answered {status}: {body}"));
            }
            Ok(response) => eprintln!("sendguard: server returned {}", response.status()),
            Err(error) => {
                let mut text = error.to_string();
                sendguard::append_causes(&mut text, &error);
                eprintln!("sendguard: request to {address} failed: {text}");
            }
        }
        eprintln!(
            "sendguard: event stream lost; connecting again in {}",
            humantime::format_duration(wait)
        );
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(MAX_WAIT);
    }
}

/// Reads server-sent events until the connection ends, printing each
/// event's data and remembering its id.
async fn read_stream(mut response: reqwest::Response, last_event_id: &mut Option<i64>) {
    let mut buffer = String::new();
    let mut id = None;
    let mut data = String::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find('\n') {
            let line = buffer[..end].trim_end_matches('\r').to_string();
            buffer.drain(..=end);
            if line.is_empty() {
                if !data.is_empty() {
                    let mut stdout = std::io::stdout().lock();
                    let _ = writeln!(stdout, "{data}");
                    let _ = stdout.flush();
                    if id.is_some() {
                        *last_event_id = id;
                    }
                }
                data.clear();
                id = None;
            } else if let Some(value) = line.strip_prefix("data:") {
                data.push_str(value.trim_start());
            } else if let Some(value) = line.strip_prefix("id:") {
                id = value.trim().parse().ok();
            }
        }
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

/// Parses a runtime setting given on the command line: `true` or `false`
/// overrides the configuration file, `file` (JSON null) resets to it.
fn setting_value(option: &str, value: &str) -> Result<Value, String> {
    match value {
        "true" => Ok(Value::Bool(true)),
        "false" => Ok(Value::Bool(false)),
        "file" => Ok(Value::Null),
        other => Err(format!(
            "invalid {option} {other:?}: give true, false, or file to use the configuration file's value"
        )),
    }
}

/// The runtime settings a `sendguard settings` command changes.
#[derive(Args)]
pub struct SettingsChange {
    #[command(flatten)]
    connection: Connection,
    /// true or false overrides synchronized_security.enabled, and file
    /// goes back to the configuration file's value.
    #[arg(long)]
    synchronized_security: Option<String>,
    /// true or false overrides devices.reject_unsafe, and file goes back
    /// to the configuration file's value.
    #[arg(long)]
    reject_unsafe: Option<String>,
    #[command(flatten)]
    record: ChangeRecord,
}

/// The reason and author that the events report records with a change.
#[derive(Args)]
pub struct ChangeRecord {
    /// Why; recorded in the events report.
    #[arg(long)]
    reason: Option<String>,
    /// Who; recorded in the events report.
    #[arg(long)]
    author: Option<String>,
}

/// Shows the runtime settings with their source, or changes them through
/// the admin API of the running server.
pub fn settings(change: SettingsChange) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start the async runtime: {error}"))?;
    runtime.block_on(async {
        let api = Api::new(&change.connection)?;
        let mut body = serde_json::Map::new();
        if let Some(value) = &change.synchronized_security {
            body.insert(
                "synchronized_security".to_string(),
                setting_value("--synchronized-security", value)?,
            );
        }
        if let Some(value) = &change.reject_unsafe {
            body.insert(
                "reject_unsafe".to_string(),
                setting_value("--reject-unsafe", value)?,
            );
        }
        if body.is_empty() {
            if change.record.reason.is_some() || change.record.author.is_some() {
                return Err("nothing to change: --reason and --author go with \
                    --synchronized-security or --reject-unsafe"
                    .to_string());
            }
            return print_json(
                &api.send(reqwest::Method::GET, "/api/v1/settings", None)
                    .await?,
            );
        }
        body.insert("reason".to_string(), json!(change.record.reason));
        body.insert("author".to_string(), json!(change.record.author));
        let answer = api
            .send(
                reqwest::Method::PUT,
                "/api/v1/settings",
                Some(Value::Object(body)),
            )
            .await?;
        print_json(&answer)
    })
}

fn print_json(value: &Value) -> Result<(), String> {
    crate::commands::print(&format!(
        "{}\n",
        serde_json::to_string_pretty(value).unwrap_or_default()
    ))
}

fn print_table(answer: &Value) -> Result<(), String> {
    let mut out = format!(
        "{:<16}  {:<16}  {:<13}  {:<8}  {:<20}  {:<8}  UNSAFE REASON\n",
        "ID", "NAME", "ROLE", "STATE", "LAST HEARTBEAT", "EXCLUDED"
    );
    for device in answer["devices"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<16}  {:<16}  {:<13}  {:<8}  {:<20}  {:<8}  {}\n",
            text(&device["id"]),
            text(&device["name"]),
            text(&device["role"]),
            text(&device["state"]),
            text(&device["last_heartbeat"]),
            if device["excluded"] == true {
                "yes"
            } else {
                "no"
            },
            text(&device["unsafe_reason"]),
        ));
    }
    crate::commands::print(&out)
}
