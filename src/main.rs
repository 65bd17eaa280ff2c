use clap::{Parser, Subcommand};
use sendguard::config::Config;
use sendguard::config::Unauthenticated;
use sendguard::events::{Format, write_events};
use sendguard::guard::Runtime;
use sendguard::policy::{Mode, Timestamp};
use sendguard::scan::{ScanInput, Verdict};
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
    /// Scan one message file and print its verdict (exit 0 clean, 1 bad, 2 error).
    Check {
        /// The message, as an RFC 5322 file.
        file: PathBuf,
        #[arg(long, short)]
        config: PathBuf,
        /// Envelope recipient count the rules see.
        #[arg(long, default_value_t = 1)]
        recipients: usize,
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
    /// List webhooks and alert e-mails waiting for delivery, with their
    /// attempts and last error.
    Outbox {
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
        } => return check(&file, &config, recipients),
        Command::Status {
            mailbox,
            config,
            client,
        } => status(&mailbox, &config, client),
        Command::Blocks { config } => blocks(&config),
        Command::Outbox { config } => outbox(&config),
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

fn check(file: &Path, config: &Path, recipients: usize) -> ExitCode {
    let result = (|| -> Result<Verdict, String> {
        let config = load(config)?;
        let message = std::fs::read(file)
            .map_err(|error| format!("cannot read {}: {error}", file.display()))?;
        let runtime = Runtime::new(config)?;
        tokio_runtime()?.block_on(async {
            runtime
                .scanner
                .scan(ScanInput {
                    message: &message,
                    recipients,
                })
                .await
                .map_err(|error| format!("scan failed: {error}"))
        })
    })();
    match result {
        Ok(verdict) => {
            println!("{}", verdict.summary());
            if verdict.is_bad() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(message) => {
            eprintln!("sendguard: {message}");
            ExitCode::from(2)
        }
    }
}

/// Turns a mailbox as an operator may type it into its mailbox key.
fn mailbox_argument(text: &str, runtime: &Runtime) -> Result<String, String> {
    sendguard::identity::mailbox_from_input(text, &runtime.config.identity, &runtime.directory)
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
        let next = match state.next_lockout_length(&settings, now) {
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

fn outbox(config: &Path) -> Result<(), String> {
    use std::fmt::Write;
    let config = load(config)?;
    let connection =
        sqlite::open_existing(&config.store.path).map_err(|error| error.to_string())?;
    let waiting =
        sendguard::store::outbox::waiting(&connection).map_err(|error| error.to_string())?;
    if waiting.is_empty() {
        return print("no webhook or alert e-mail is waiting\n");
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<32}  {:<13}  {:<32}  {:<20}  {:>8}  {:<20}  LAST ERROR",
        "DELIVERY ID", "ACTION", "MAILBOX", "CREATED", "ATTEMPTS", "NEXT ATTEMPT"
    );
    for item in waiting {
        let entry = &item.delivery.entry;
        let _ = writeln!(
            out,
            "{:<32}  {:<13}  {:<32}  {:<20}  {:>8}  {:<20}  {}",
            entry.delivery_id,
            entry.kind.as_str(),
            entry.mailbox.as_deref().unwrap_or("-"),
            entry.created.to_rfc3339(),
            item.delivery.attempts,
            item.next_attempt.to_rfc3339(),
            item.last_error.as_deref().unwrap_or("-")
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
