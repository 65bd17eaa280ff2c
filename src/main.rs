use clap::{Parser, Subcommand};
use sendguard::config::Config;
use sendguard::events::{Format, write_events};
use sendguard::guard::Runtime;
use sendguard::identity::canonical_address;
use sendguard::policy::Timestamp;
use sendguard::scan::{ScanInput, Verdict};
use sendguard::store::{EventFilter, sqlite};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

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
    /// Print the events report.
    Events {
        #[arg(long, short)]
        config: PathBuf,
        /// Only events newer than this, such as 1h or 30d.
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<Duration>,
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

fn status(mailbox: &str, config: &Path, client: Option<IpAddr>) -> Result<(), String> {
    let config = load(config)?;
    let runtime = Runtime::new(config)?;
    let canonical = runtime
        .directory
        .mailbox_of_address(&canonical_address(mailbox, &runtime.config.identity));
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
        println!("{canonical}: no strikes and no lockouts recorded");
        return Ok(());
    }
    for (key, state) in states {
        println!("mailbox:          {key}");
        println!(
            "strikes in window: {} of {} (window {})",
            state.strikes_in_window(&settings, now),
            settings.threshold,
            humantime::format_duration(settings.window)
        );
        println!("lockouts so far:  {}", state.lockouts);
        let blocked = match state.active_block(now) {
            None => "no".to_string(),
            Some(block) => match block.until {
                None => format!("permanently (lockout {})", block.level),
                Some(until) => format!(
                    "until {until} (lockout {}{})",
                    block.level,
                    if block.enforced { "" } else { ", monitor only" }
                ),
            },
        };
        println!("blocked:          {blocked}");
        let next = match state.next_lockout_length(&settings) {
            None => "permanent block".to_string(),
            Some(length) => humantime::format_duration(length).to_string(),
        };
        println!("next lockout:     {next}");
        for strike in state
            .strikes
            .iter()
            .filter(|strike| now.since(strike.at) < settings.window)
        {
            println!(
                "  strike {}  {}  {}",
                strike.at, strike.verdict, strike.message_id
            );
        }
    }
    Ok(())
}

fn blocks(config: &Path) -> Result<(), String> {
    let config = load(config)?;
    let connection =
        sqlite::open_existing(&config.store.path).map_err(|error| error.to_string())?;
    let blocks =
        sqlite::active_blocks(&connection, Timestamp::now()).map_err(|error| error.to_string())?;
    if blocks.is_empty() {
        println!("no mailbox is locked out");
        return Ok(());
    }
    println!("{:<40}  {:>7}  {:<22}  MODE", "MAILBOX", "LOCKOUT", "UNTIL");
    for (key, state) in blocks {
        let Some(block) = state.block else { continue };
        let until = block
            .until
            .map_or("permanent".to_string(), |until| until.to_rfc3339());
        let mode = if block.enforced {
            "enforced"
        } else {
            "monitor"
        };
        println!(
            "{:<40}  {:>7}  {until:<22}  {mode}",
            key.to_string(),
            block.level
        );
    }
    Ok(())
}

fn events(
    config: &Path,
    since: Option<Duration>,
    mailbox: Option<String>,
    format: Format,
) -> Result<(), String> {
    let config = load(config)?;
    let runtime = Runtime::new(config)?;
    let mailbox = mailbox.map(|mailbox| {
        runtime
            .directory
            .mailbox_of_address(&canonical_address(&mailbox, &runtime.config.identity))
    });
    let connection =
        sqlite::open_existing(&runtime.config.store.path).map_err(|error| error.to_string())?;
    let filter = EventFilter {
        since: since.map(|since| Timestamp::now().saturating_sub(since)),
        mailbox,
        ..EventFilter::default()
    };
    let events = sqlite::query_events(&connection, &filter).map_err(|error| error.to_string())?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    write_events(&mut out, &events, format)
        .map_err(|error| format!("cannot write the report: {error}"))
}

fn config_check(file: &Path) -> Result<(), String> {
    let config = load(file)?;
    // Compiling the rules and reading the directory finds what the schema
    // cannot.
    Runtime::new(config)?;
    println!("{}: valid", file.display());
    Ok(())
}
