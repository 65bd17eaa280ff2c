mod commands;
mod device_commands;

use clap::{CommandFactory, Parser, Subcommand};
use commands::{Output, Remote, print};
use sendguard::admin::ExemptionRequest;
use sendguard::config::Config;
use sendguard::events::Format;
use sendguard::guard::Runtime;
use sendguard::scan::{Envelope, OnError, ScanInput, ScanReport};
use sendguard::store::sqlite;
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
    /// Run the SMTP relay, and the milter and admin API when configured.
    ///
    /// SIGHUP reloads the configuration file (an invalid file keeps the
    /// running configuration); SIGTERM or SIGINT stops accepting
    /// connections and lets open SMTP sessions finish for up to 30 s. Logs
    /// go to standard error; SENDGUARD_LOG sets their filter (default
    /// "info", such as "debug" or "sendguard=debug").
    Serve {
        /// The configuration file, such as /etc/sendguard/config.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Scan one message file, print each engine's result and the verdict
    /// (exit 0 clean, suspect or unscannable, 1 virus or spam, 2 error).
    Check {
        /// The message, as an RFC 5322 file.
        file: PathBuf,
        /// The configuration file, such as /etc/sendguard/config.toml.
        #[arg(long, short)]
        config: PathBuf,
        /// Envelope recipient count the rules see.
        #[arg(long, default_value_t = 1)]
        recipients: usize,
        #[command(flatten)]
        envelope: CheckEnvelope,
    },
    /// Show a mailbox's strikes in the window, lockout count, block,
    /// next lockout length and exemptions.
    Status {
        /// The mailbox, in any spelling (it is canonicalised), or a login from the directory file.
        mailbox: String,
        /// The configuration file, such as /etc/sendguard/config.toml.
        #[arg(long, short)]
        config: PathBuf,
        /// Client address, for the pair key under unauthenticated = "client-and-sender".
        #[arg(long)]
        client: Option<IpAddr>,
        #[command(flatten)]
        remote: Remote,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        format: Output,
    },
    /// List mailboxes that are locked out now.
    Blocks {
        /// The configuration file, such as /etc/sendguard/config.toml.
        #[arg(long, short)]
        config: PathBuf,
        #[command(flatten)]
        remote: Remote,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        format: Output,
    },
    /// Lift a permanent block, or reset a mailbox's lockout count, with the
    /// support token. Timed lockouts cannot be lifted.
    Unblock {
        /// The mailbox, in any spelling (it is canonicalised), or a login from the directory file.
        mailbox: String,
        /// The configuration file, such as /etc/sendguard/config.toml.
        #[arg(long, short)]
        config: PathBuf,
        /// Why; recorded in the events report.
        #[arg(long)]
        reason: String,
        /// Also set the lockout count back to zero, so the schedule starts
        /// again from lockout 1.
        #[arg(long)]
        reset_count: bool,
        /// File with the support token (its SHA-256 must match
        /// admin.support_token_sha256).
        #[arg(long)]
        support_token_file: PathBuf,
        /// Client address, for the pair key under unauthenticated = "client-and-sender".
        #[arg(long)]
        client: Option<IpAddr>,
        /// URL of a running server's admin API; without it the store is
        /// written directly.
        #[arg(long)]
        server: Option<String>,
    },
    /// Manage exemptions: senders, logins or client networks whose bad
    /// mail is still rejected but never starts a lockout.
    Exemptions {
        #[command(subcommand)]
        command: ExemptionCommand,
    },
    /// Show the runtime settings (synchronized security, reject unsafe
    /// devices) with their source, or override one until it is reset.
    ///
    /// A change is stored by the running server, recorded in the events
    /// report with --reason and --author, and kept across reloads and
    /// restarts. The value `file` goes back to the configuration file's value.
    /// Changes need the admin token.
    Settings {
        #[command(flatten)]
        change: device_commands::SettingsChange,
    },
    /// Device health: report as an agent, watch subnet notices, list
    /// devices, decide access, manage exclusions.
    Device {
        #[command(subcommand)]
        command: device_commands::DeviceCommand,
    },
    /// Run the endpoint agent: health heartbeats, the nftables table that
    /// refuses connections from and to unsafe peers, and on-demand scans.
    ///
    /// Needs CAP_NET_ADMIN for nftables. SIGTERM or SIGINT signs the
    /// device off as offline and removes the table.
    Agent {
        /// The agent's configuration file, such as /etc/sendguard/agent.toml.
        #[arg(long, short, required_unless_present = "uninstall_rules")]
        config: Option<PathBuf>,
        /// Remove the agent's nftables table (inet sendguard_agent) and exit.
        #[arg(long)]
        uninstall_rules: bool,
    },
    /// Make and hash bearer tokens for the admin API.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// List webhooks and alert e-mails waiting for delivery, with their
    /// attempts and last error.
    Outbox {
        /// The configuration file, such as /etc/sendguard/config.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the events report.
    Events {
        /// The configuration file, such as /etc/sendguard/config.toml.
        #[arg(long, short)]
        config: PathBuf,
        /// Only events since this: a duration back from now such as 1h or 30d,
        /// or an RFC 3339 time such as 2026-12-04T21:00:00Z.
        #[arg(long)]
        since: Option<String>,
        /// Only events before this, in the same forms as --since.
        #[arg(long)]
        until: Option<String>,
        /// Only events of this mailbox (any spelling; it is canonicalised).
        #[arg(long)]
        mailbox: Option<String>,
        /// Only events of mailboxes whose owner uses this device (by id).
        #[arg(long)]
        device: Option<String>,
        /// Only events of this type, such as lockout_started.
        #[arg(long = "type")]
        kind: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        #[command(flatten)]
        remote: Remote,
    },
    /// Replay the recorded bad messages of a period under a candidate
    /// policy and compare the lockouts it would have started with the real
    /// ones.
    Simulate {
        /// The configuration file in force, such as /etc/sendguard/config.toml.
        #[arg(long, short)]
        config: PathBuf,
        /// TOML file with the candidate [policy], and optionally [identity]
        /// and [exemptions] (senders, logins, networks, ignore_recorded);
        /// keys it leaves out keep the values of --config.
        #[arg(
            long,
            required_unless_present = "recorded",
            conflicts_with = "recorded"
        )]
        policy: Option<PathBuf>,
        /// Replay under the [policy] and [identity] recorded in force at
        /// each message (config_loaded events) instead of a candidate, to
        /// check the replay against the recorded history.
        #[arg(long)]
        recorded: bool,
        /// Start of the period: a duration back from now such as 30d, or an
        /// RFC 3339 time such as 2026-12-04T21:00:00Z.
        #[arg(long, default_value = "30d")]
        since: String,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Store tools.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Copy the SQLite file at store.path (mailbox states, events, waiting
    /// lockout deliveries) into the Redis store the config names.
    Migrate {
        /// The configuration file, with [store] backend = "redis".
        #[arg(long, short)]
        config: PathBuf,
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
enum ExemptionCommand {
    /// List exemptions in force (with --all, also removed and expired ones).
    List {
        /// The configuration file, such as /etc/sendguard/config.toml.
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        remote: Remote,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        format: Output,
    },
    /// Add an exemption for one sender, login or client network.
    Add {
        /// The configuration file, such as /etc/sendguard/config.toml.
        #[arg(long, short)]
        config: PathBuf,
        /// A sender's mailbox, such as news@example.org.
        #[arg(long, group = "subject")]
        sender: Option<String>,
        /// A SASL login.
        #[arg(long, group = "subject")]
        login: Option<String>,
        /// A client network, such as 192.0.2.0/24.
        #[arg(long, group = "subject")]
        network: Option<String>,
        /// Why; recorded in the events report.
        #[arg(long)]
        reason: String,
        /// Name of the person adding it; recorded in the events report.
        #[arg(long)]
        author: String,
        /// How long it lasts, such as 7d.
        #[arg(long = "for", group = "end")]
        duration: Option<String>,
        /// When it ends, as an RFC 3339 time.
        #[arg(long, group = "end")]
        expires: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Remove an exemption before its end.
    Remove {
        /// The exemption id, as `exemptions list` shows it.
        id: i64,
        /// The configuration file, such as /etc/sendguard/config.toml.
        #[arg(long, short)]
        config: PathBuf,
        /// Name of the person removing it; recorded in the events report.
        #[arg(long, default_value = "admin")]
        by: String,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new random token (32 bytes, base64url).
    Generate,
    /// Print the SHA-256 of the token in FILE, for admin.support_token_sha256.
    Hash { file: PathBuf },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file and report every problem found.
    Check { file: PathBuf },
}

// `sendguard generate` has a parser of its own, apart from `Cli`, so that
// the man pages and completion scripts it writes do not list it.
/// Write the man pages and shell completions that the Debian package
/// installs.
#[derive(Parser)]
#[command(name = "sendguard-generate", bin_name = "sendguard generate")]
struct GenerateCli {
    #[command(subcommand)]
    command: GenerateCommand,
}

#[derive(Subcommand)]
enum GenerateCommand {
    /// Write one man page per command, in section 8, into DIR.
    Man { dir: PathBuf },
    /// Print the completion script for SHELL.
    Completions { shell: clap_complete::Shell },
}

fn main() -> ExitCode {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|first| first == "generate")
    {
        let generate = GenerateCli::parse_from(std::env::args_os().skip(1));
        return exit_code(match generate.command {
            GenerateCommand::Man { dir } => write_man_pages(&dir),
            GenerateCommand::Completions { shell } => {
                let mut out = Vec::new();
                clap_complete::generate(shell, &mut Cli::command(), "sendguard", &mut out);
                print(&String::from_utf8_lossy(&out))
            }
        });
    }

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
            remote,
            format,
        } => commands::status(&mailbox, &config, client, &remote, format),
        Command::Blocks {
            config,
            remote,
            format,
        } => commands::blocks(&config, &remote, format),
        Command::Unblock {
            mailbox,
            config,
            reason,
            reset_count,
            support_token_file,
            client,
            server,
        } => commands::unblock(commands::Unblock {
            mailbox: &mailbox,
            config: &config,
            client,
            reason: &reason,
            reset_count,
            support_token_file: &support_token_file,
            server,
        }),
        Command::Exemptions { command } => exemptions(command),
        Command::Settings { change } => device_commands::settings(change),
        Command::Device { command } => device_commands::run(command),
        Command::Agent {
            config,
            uninstall_rules,
        } => agent(config.as_deref(), uninstall_rules),
        Command::Token {
            command: TokenCommand::Generate,
        } => commands::generate_token(),
        Command::Token {
            command: TokenCommand::Hash { file },
        } => commands::hash_token(&file),
        Command::Outbox { config } => outbox(&config),
        Command::Events {
            config,
            since,
            until,
            mailbox,
            device,
            kind,
            format,
            remote,
        } => commands::events(
            &config,
            commands::EventsQuery {
                since,
                until,
                mailbox,
                device,
                kind,
            },
            format,
            &remote,
        ),
        Command::Simulate {
            config,
            policy,
            // Clap requires --recorded exactly when --policy is absent.
            recorded: _,
            since,
            format,
        } => commands::simulate(&config, policy.as_deref(), &since, format),
        Command::Config {
            command: ConfigCommand::Check { file },
        } => config_check(&file),
        Command::Store {
            command: StoreCommand::Migrate { config },
        } => commands::migrate_store(&config),
    };
    exit_code(result)
}

fn exit_code(result: Result<(), String>) -> ExitCode {
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

/// Builds the multi-threaded runtime with `threads` workers, or one per
/// CPU core when `threads` is 0.
fn tokio_runtime(threads: usize) -> Result<tokio::runtime::Runtime, String> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        builder.worker_threads(threads);
    }
    builder
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start the async runtime: {error}"))
}

fn agent(config: Option<&Path>, uninstall_rules: bool) -> Result<(), String> {
    use sendguard::agent::config::AgentConfig;
    let runtime = tokio_runtime(2)?;
    if uninstall_rules {
        // The table must go even when the configuration no longer loads,
        // as after an edit followed by a crash (the unit's ExecStopPost).
        let nft = match config.map(AgentConfig::load) {
            Some(Ok(config)) => config.enforcement.nft,
            Some(Err(error)) => {
                eprintln!("sendguard: {error}\nsendguard: removing the table with nft from PATH");
                PathBuf::from("nft")
            }
            None => PathBuf::from("nft"),
        };
        return runtime.block_on(sendguard::agent::uninstall_rules(&nft));
    }
    let config = config
        .map(AgentConfig::load)
        .transpose()?
        .ok_or("missing --config: give the agent's configuration file")?;
    runtime.block_on(sendguard::agent::run(config))
}

fn serve(config: &Path) -> Result<(), String> {
    // A file that does not load is reported by the server itself.
    let threads = Config::load(config).map_or(0, |config| config.smtp.worker_threads);
    tokio_runtime(threads)?
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
        Ok(tokio_runtime(0)?.block_on(runtime.scanner.report(input)))
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

fn exemptions(command: ExemptionCommand) -> Result<(), String> {
    match command {
        ExemptionCommand::List {
            config,
            all,
            remote,
            format,
        } => commands::list_exemptions(&config, &remote, all, format),
        ExemptionCommand::Add {
            config,
            sender,
            login,
            network,
            reason,
            author,
            duration,
            expires,
            remote,
        } => commands::add_exemption(
            &config,
            &remote,
            ExemptionRequest {
                sender,
                login,
                network,
                reason: Some(reason),
                author: Some(author),
                expires,
                duration,
            },
        ),
        ExemptionCommand::Remove {
            id,
            config,
            by,
            remote,
        } => commands::remove_exemption(&config, &remote, id, &by),
    }
}

fn outbox(config: &Path) -> Result<(), String> {
    use std::fmt::Write;
    let config = load(config)?;
    let connection =
        sqlite::open_existing(&config.store.path).map_err(|error| error.to_string())?;
    let mut waiting =
        sendguard::store::outbox::waiting(&connection).map_err(|error| error.to_string())?;
    if config.store.backend == sendguard::config::Backend::Redis {
        waiting.extend(commands::shared_outbox(&config)?);
        waiting.sort_by_key(|item| item.next_attempt);
    }
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

fn config_check(file: &Path) -> Result<(), String> {
    let config = load(file)?;
    // Compiling the rules and reading the directory finds what the schema
    // cannot.
    let warnings = config.warnings();
    let problems = Runtime::check_files(&config);
    if !problems.is_empty() {
        return Err(format!(
            "invalid config file {}:\n{}",
            file.display(),
            problems.join("\n")
        ));
    }
    let mut out = String::new();
    for warning in warnings {
        out.push_str(&format!("warning: {warning}\n"));
    }
    out.push_str(&format!("{}: valid\n", file.display()));
    print(&out)
}

/// Writes `sendguard.8` and one `sendguard-COMMAND.8` page per visible
/// subcommand, at every level, into `dir`, and prints each path.
fn write_man_pages(dir: &Path) -> Result<(), String> {
    let mut command = Cli::command().disable_help_subcommand(true);
    // Building names each subcommand "sendguard-COMMAND", which becomes its
    // page name and the references in its parent's SUBCOMMANDS section.
    command.build();
    let mut written = Vec::new();
    write_man_page(&command, dir, &mut written)
        .map_err(|error| format!("cannot write man pages into {}: {error}", dir.display()))?;
    print(&written.join("\n"))?;
    print("\n")
}

fn write_man_page(
    command: &clap::Command,
    dir: &Path,
    written: &mut Vec<String>,
) -> std::io::Result<()> {
    for subcommand in command.get_subcommands() {
        if !subcommand.is_hide_set() && subcommand.get_name() != "help" {
            write_man_page(subcommand, dir, written)?;
        }
    }
    let man = clap_mangen::Man::new(command.clone())
        .section("8")
        .manual("System Administration");
    let path = dir.join(man.get_filename());
    let mut page = Vec::new();
    man.render(&mut page)?;

    // The top page also lists the packaged files, signals and environment,
    // which the command line cannot express.
    if command.get_name() == "sendguard" {
        service_sections().to_writer(&mut page)?;
    }
    std::fs::write(&path, page)?;
    written.push(path.display().to_string());
    Ok(())
}

/// Builds the FILES, SIGNALS, ENVIRONMENT and SEE ALSO sections of the
/// `sendguard(8)` page.
fn service_sections() -> clap_mangen::roff::Roff {
    use clap_mangen::roff::{Roff, bold, roman};

    let sections: [(&str, &[(&str, &str)]); 3] = [
        (
            "FILES",
            &[
                (
                    "/etc/sendguard/config.toml",
                    "The configuration that the packaged service reads.",
                ),
                (
                    "/var/lib/sendguard/",
                    "The store (store.path): strikes, lockouts, exemptions and the events report.",
                ),
                (
                    "/usr/share/doc/sendguard/config.toml.example",
                    "Every setting with its unit and default.",
                ),
            ],
        ),
        (
            "SIGNALS",
            &[
                (
                    "SIGHUP",
                    "Reload the configuration (systemctl reload sendguard). An invalid file keeps \
                     the running configuration; smtp.listen and store.path change only on restart.",
                ),
                (
                    "SIGTERM",
                    "Stop accepting, answer 421 4.3.0 to clients between transactions and let \
                     transactions in progress finish, for up to 30 seconds.",
                ),
            ],
        ),
        (
            "ENVIRONMENT",
            &[(
                "SENDGUARD_LOG",
                "Log filter, such as debug or sendguard=debug,info (default info). Logs go to \
                 standard error.",
            )],
        ),
    ];

    let mut roff = Roff::default();
    for (heading, entries) in sections {
        roff.control("SH", [heading]);
        for (term, text) in entries {
            roff.control("TP", [])
                .text([bold(*term)])
                .text([roman(*text)]);
        }
    }
    roff.control("SH", ["SEE ALSO"]);
    roff.text([roman("systemctl(1), journalctl(1), clamd(8), postconf(5)")]);
    roff
}
