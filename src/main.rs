use clap::{Parser, Subcommand};
use sendguard::config::Config;
use sendguard::config::Unauthenticated;
use sendguard::events::{Format, write_events};
use sendguard::guard::Runtime;
use sendguard::identity::canonical_address;
use sendguard::policy::{Mode, Timestamp};
use sendguard::scan::{Envelope, OnError, ScanInput, ScanReport};
use sendguard::store::{EventFilter, sqlite};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Outbound mail filter: scans relayed mail and locks out mailboxes that
/// keep sending viruses or spam.
#[derive(Parser)]
#[command(name = "sendguard", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the SMTP relay.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Scan one message file, print each engine's result and the verdict
    /// (exit 0 clean, suspect or unscannable, 1 virus or spam, 2 error).
    Check {
        /// The message, as an RFC 5322 file.
        file: PathBuf,
        #[arg(long, short)]
        config: PathBuf,
        /// Envelope recipient count the rules see.
        #[arg(long, default_value_t = 1)]
        recipients: usize,
        #[command(flatten)]
        envelope: CheckEnvelope,
    },
    /// Show a mailbox's strikes in the window, lockout count and block.
    Status {
        mailbox: String,
        #[arg(long, short)]
        config: PathBuf,
        /// Client address, for the pair key under unauthenticated = "client-and-sender".
        #[arg(long)]
        client: Option<IpAddr>,
    },
    /// List mailboxes that are locked out now.
    Blocks {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the events report.
    Events {
        #[arg(long, short)]
        config: PathBuf,
        /// Only events since this: a duration back from now such as 1h or 30d,
        /// or an RFC 3339 time such as 2026-12-04T21:00:00Z.
        #[arg(long, value_parser = parse_since)]
        since: Option<Timestamp>,
        /// Only events of this mailbox (any spelling; it is canonicalised).
        #[arg(long)]
        mailbox: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

/// The SMTP facts `check` passes to rspamd, as the relay would.
#[derive(clap::Args)]
struct CheckEnvelope {
    /// Envelope sender, such as alice@example.org.
    #[arg(long)]
    sender: Option<String>,
    /// Client IP address. Without it rspamd scores the message as from an
    /// unknown host.
    #[arg(long)]
    client: Option<IpAddr>,
    /// Client host name; rspamd gets "unknown" when --client is given
    /// without it.
    #[arg(long)]
    client_name: Option<String>,
    /// The client's HELO name.
    #[arg(long)]
    helo: Option<String>,
    /// SASL login of the sender.
    #[arg(long)]
    login: Option<String>,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file and report every problem found.
    Check { file: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let result = match cli.command {
        Command::Serve { config } => serve(&config),
        Command::Check {
            file,
            config,
            recipients,
            envelope,
        } => return check(&file, &config, recipients, &envelope),
        Command::Status {
            mailbox,
            config,
            client,
        } => status(&mailbox, &config, client),
        Command::Blocks { config } => blocks(&config),
        Command::Events {
            config,
            since,
            mailbox,
            format,
        } => events(&config, since, mailbox, format),
        Command::Config {
            command: ConfigCommand::Check { file },
        } => config_check(&file),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("sendguard: {message}");
            ExitCode::from(2)
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SENDGUARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn tokio_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start the async runtime: {error}"))
}

fn serve(config: &Path) -> Result<(), String> {
    tokio_runtime()?
        .block_on(sendguard::server::serve(config))
        .map_err(|error| error.to_string())
}

fn load(config: &Path) -> Result<Config, String> {
    Config::load(config).map_err(|error| error.to_string())
}

fn check(file: &Path, config: &Path, recipients: usize, facts: &CheckEnvelope) -> ExitCode {
    let result = (|| -> Result<ScanReport, String> {
        let config = load(config)?;
        let message = std::fs::read(file)
            .map_err(|error| format!("cannot read {}: {error}", file.display()))?;
        let runtime = Runtime::new(config)?;
        let sender = facts.sender.as_deref().map(|sender| {
            let bare = sender.trim().trim_start_matches('<').trim_end_matches('>');
            format!("<{bare}>")
        });
        let envelope = Envelope {
            transaction: "check",
            sender: sender.as_deref().unwrap_or(""),
            recipients: &[],
            client: facts.client,
            client_name: facts.client_name.as_deref(),
            helo: facts.helo.as_deref(),
            login: facts.login.as_deref(),
        };
        let input = ScanInput {
            message: &message,
            recipients,
            envelope: Some(envelope),
        };
        Ok(tokio_runtime()?.block_on(runtime.scanner.report(input)))
    })();
    let report = match result {
        Ok(report) => report,
        Err(message) => {
            eprintln!("sendguard: {message}");
            return ExitCode::from(2);
        }
    };

    let mut out = String::new();
    for engine in &report.results {
        let text = match &engine.result {
            Ok(verdict) => verdict.summary(),
            Err(error) => format!("error ({}): {error}", on_error_name(engine.on_error)),
        };
        out.push_str(&format!(
            "{:<16} {text} [{:.1} ms]\n",
            engine.engine,
            engine.elapsed.as_secs_f64() * 1000.0
        ));
    }
    let code = match report.into_verdict() {
        Ok(verdict) => {
            out.push_str(&format!("{:<16} {}\n", "verdict", verdict.summary()));
            if verdict.is_bad() { 1 } else { 0 }
        }
        Err(error) => {
            out.push_str(&format!(
                "{:<16} temporary failure: {} failed\n",
                "verdict",
                error.engine()
            ));
            2
        }
    };
    if let Err(message) = print(&out) {
        eprintln!("sendguard: {message}");
        return ExitCode::from(2);
    }
    ExitCode::from(code)
}

fn on_error_name(on_error: OnError) -> &'static str {
    match on_error {
        OnError::Tempfail => "on_error tempfail",
        OnError::Accept => "on_error accept, set aside",
    }
}

/// Turns a mailbox as an operator may type it (`<Alice@Example.org>`,
/// `"alice"@example.org`, `alice+tag@example.org`) into its mailbox key.
fn mailbox_argument(text: &str, runtime: &Runtime) -> Result<String, String> {
    let trimmed = text.trim();
    let bare = trimmed
        .strip_prefix('<')
        .and_then(|inner| inner.strip_suffix('>'))
        .unwrap_or(trimmed);
    let unquoted = match bare.rsplit_once('@') {
        Some((local, domain))
            if local.len() >= 2 && local.starts_with('"') && local.ends_with('"') =>
        {
            let mut unescaped = String::new();
            let mut characters = local[1..local.len() - 1].chars();
            while let Some(character) = characters.next() {
                // A quoted-pair stands for the character after the backslash.
                let literal = if character == '\\' {
                    characters.next()
                } else {
                    Some(character)
                };
                unescaped.extend(literal);
            }
            format!("{unescaped}@{domain}")
        }
        _ => bare.to_string(),
    };
    if unquoted.is_empty() || unquoted.starts_with('@') {
        return Err(format!(
            "invalid mailbox {text:?}: give an address such as alice@example.org"
        ));
    }
    let canonical = canonical_address(&unquoted, &runtime.config.identity);
    Ok(runtime.directory.mailbox_of_address(&canonical))
}

/// Writes command output to stdout; a reader that went away (`| head`) is
/// not an error.
fn print(text: &str) -> Result<(), String> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(error) => Err(format!("cannot write to standard output: {error}")),
    }
}

fn status(mailbox: &str, config: &Path, client: Option<IpAddr>) -> Result<(), String> {
    use std::fmt::Write;
    let config = load(config)?;
    let runtime = Runtime::new(config)?;
    let canonical = mailbox_argument(mailbox, &runtime)?;
    if client.is_some()
        && runtime.config.identity.unauthenticated != Unauthenticated::ClientAndSender
    {
        return Err(
            "--client applies only with [identity] unauthenticated = \"client-and-sender\"; leave it out"
                .to_string(),
        );
    }
    let connection =
        sqlite::open_existing(&runtime.config.store.path).map_err(|error| error.to_string())?;
    let states =
        sqlite::mailbox_states(&connection, &canonical).map_err(|error| error.to_string())?;
    let states: Vec<_> = states
        .into_iter()
        .filter(|(key, _)| client.is_none() || key.client == client)
        .collect();
    let settings = runtime.settings();
    let now = Timestamp::now();
    if states.is_empty() {
        return print(&format!(
            "{canonical}: no strikes and no lockouts recorded\n"
        ));
    }
    let mut out = String::new();
    for (key, state) in states {
        let _ = writeln!(out, "mailbox:           {key}");
        let _ = writeln!(
            out,
            "strikes in window: {} of {} (window {})",
            state.strikes_in_window(&settings, now),
            settings.threshold,
            humantime::format_duration(settings.window)
        );
        let _ = writeln!(out, "lockouts so far:   {}", state.lockouts);
        let blocked = match state.active_block(now) {
            None => "no".to_string(),
            Some(block) => {
                let monitor_only = !block.enforced && settings.mode == Mode::Monitor;
                let note = if monitor_only { ", monitor only" } else { "" };
                match block.until {
                    None => format!("permanently (lockout {}{note})", block.level),
                    Some(until) => format!("until {until} (lockout {}{note})", block.level),
                }
            }
        };
        let _ = writeln!(out, "blocked:           {blocked}");
        let next = match state.next_lockout_length(&settings) {
            None => "permanent block".to_string(),
            Some(length) => humantime::format_duration(length).to_string(),
        };
        let _ = writeln!(out, "next lockout:      {next}");
        for strike in state
            .strikes
            .iter()
            .filter(|strike| now.since(strike.at) < settings.window)
        {
            let _ = writeln!(
                out,
                "  strike {}  {}  {}",
                strike.at, strike.verdict, strike.message_id
            );
        }
    }
    print(&out)
}

fn blocks(config: &Path) -> Result<(), String> {
    use std::fmt::Write;
    let config = load(config)?;
    let connection =
        sqlite::open_existing(&config.store.path).map_err(|error| error.to_string())?;
    let blocks =
        sqlite::active_blocks(&connection, Timestamp::now()).map_err(|error| error.to_string())?;
    if blocks.is_empty() {
        return print("no mailbox is locked out\n");
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<40}  {:>7}  {:<22}  MODE",
        "MAILBOX", "LOCKOUT", "UNTIL"
    );
    for (key, state) in blocks {
        let Some(block) = state.block else { continue };
        let until = block
            .until
            .map_or("permanent".to_string(), |until| until.to_rfc3339());
        let mode = if block.enforced || config.policy.mode == Mode::Enforce {
            "enforced"
        } else {
            "monitor"
        };
        let _ = writeln!(
            out,
            "{:<40}  {:>7}  {until:<22}  {mode}",
            key.to_string(),
            block.level
        );
    }
    print(&out)
}

fn events(
    config: &Path,
    since: Option<Timestamp>,
    mailbox: Option<String>,
    format: Format,
) -> Result<(), String> {
    let config = load(config)?;
    let runtime = Runtime::new(config)?;
    let mailbox = mailbox
        .map(|mailbox| mailbox_argument(&mailbox, &runtime))
        .transpose()?;
    let connection =
        sqlite::open_existing(&runtime.config.store.path).map_err(|error| error.to_string())?;
    let filter = EventFilter {
        since,
        mailbox,
        ..EventFilter::default()
    };
    let events = sqlite::query_events(&connection, &filter).map_err(|error| error.to_string())?;
    let mut out = Vec::new();
    write_events(&mut out, &events, format)
        .map_err(|error| format!("cannot write the report: {error}"))?;
    print(&String::from_utf8_lossy(&out))
}

/// Parses `--since`: a duration back from now, or an RFC 3339 time.
fn parse_since(text: &str) -> Result<Timestamp, String> {
    if let Ok(duration) = humantime::parse_duration(text) {
        return Ok(Timestamp::now().saturating_sub(duration));
    }
    Timestamp::parse_rfc3339(text).ok_or_else(|| {
        format!(
            "invalid value {text:?}: give a duration such as 1h or 30d, or a time such as 2026-12-04T21:00:00Z"
        )
    })
}

fn config_check(file: &Path) -> Result<(), String> {
    let config = load(file)?;
    // Compiling the rules and reading the directory finds what the schema
    // cannot.
    let warnings = config.warnings();
    Runtime::new(config)?;
    let mut out = String::new();
    for warning in warnings {
        out.push_str(&format!("warning: {warning}\n"));
    }
    out.push_str(&format!("{}: valid\n", file.display()));
    print(&out)
}
