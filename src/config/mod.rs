//! The TOML configuration: one struct per section, defaults, and validation
//! that reports every problem at once with its key path.
//!
//! `config.toml.example` documents every key with its unit and default.

mod actions;
mod admin;
mod candidate;
pub mod devices;
mod problems;
pub mod store;

pub use candidate::{Candidate, CandidateExemptions};

pub use actions::{ActionsConfig, AlertsConfig, SynchronizedSecurityConfig};
pub use admin::{AdminConfig, EventsConfig};
pub use devices::DevicesConfig;
pub use problems::{Problem, Problems};
pub use store::{Backend, OnStoreError, StoreConfig};

use crate::policy::{Mode, PolicySettings};
use crate::scan::{ClamdConfig, RspamdConfig, SpamConfig, SpamdConfig};
use crate::smtp::reader::BareLineEndings;
use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole configuration file.
#[derive(Debug, Clone)]
pub struct Config {
    pub smtp: SmtpConfig,
    pub upstream: UpstreamConfig,
    pub scan: ScanConfig,
    pub policy: PolicyConfig,
    pub identity: IdentityConfig,
    pub directory: Option<DirectoryConfig>,
    pub store: StoreConfig,
    /// `[milter]`; without it no milter listener runs.
    pub milter: Option<MilterConfig>,
    pub synchronized_security: SynchronizedSecurityConfig,
    pub alerts: AlertsConfig,
    pub actions: ActionsConfig,
    pub admin: AdminConfig,
    pub events: EventsConfig,
    /// `[devices]`: device health heartbeats and access decisions.
    pub devices: DevicesConfig,
}

/// `[milter]`: the Postfix milter front-end.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MilterConfig {
    /// `host:port` to listen on, or an absolute path for a unix socket.
    pub listen: String,
    /// Time allowed for each milter command from Postfix.
    #[serde(default = "default_milter_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_milter_timeout() -> Duration {
    Duration::from_secs(300)
}

/// `[smtp]`: the listener that internal senders relay through.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// Name used in the greeting and the EHLO reply.
    pub hostname: String,
    /// Client networks allowed to relay; others get `554 5.7.1` at connect.
    #[serde(deserialize_with = "networks")]
    pub relay_networks: Vec<IpNet>,
    /// Largest message accepted, in bytes.
    pub max_message_size: u64,
    /// Treatment of a message containing a bare CR or LF.
    pub bare_line_endings: BareLineEndings,
    /// Treatment of a message line longer than 998 octets.
    pub long_lines: LongLines,
    /// Maximum command line length accepted, in octets without CRLF.
    pub max_command_line: usize,
    /// Invalid or out-of-sequence commands after which the session is
    /// closed with `421 4.7.0`.
    pub max_errors: u32,
    /// Certificate chain (PEM) offered with STARTTLS; STARTTLS is offered
    /// only when this and `tls_key_file` are set.
    pub tls_cert_file: Option<PathBuf>,
    /// Private key (PEM) of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// Refuse MAIL FROM until the client has started TLS.
    pub require_tls: bool,
    /// Peers allowed to pass on the real client's address, HELO and login
    /// with XFORWARD and XCLIENT, such as Postfix in front of sendguard.
    #[serde(deserialize_with = "networks")]
    pub xclient_peers: Vec<IpNet>,
    /// Pause before the greeting; a client that sends anything during it
    /// is disconnected. Zero sends the greeting at once.
    #[serde(with = "humantime_serde")]
    pub greeting_delay: Duration,
    /// Time allowed for the client's first command after the greeting.
    #[serde(with = "humantime_serde")]
    pub greeting_timeout: Duration,
    /// Time allowed for each command inside a transaction (MAIL to DATA).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Time a client may stay silent between transactions.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Time allowed for each read of message content.
    #[serde(with = "humantime_serde")]
    pub data_block_timeout: Duration,
    /// Connections served at once; more get `421 4.7.0` at connect.
    pub max_connections: usize,
    /// Connections served at once from one client address.
    pub max_connections_per_client: usize,
    /// Recipients accepted per message; more get `452 4.5.3`.
    pub max_recipients: usize,
    /// Time allowed for the client to send the whole message after `354`.
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    /// Threads serving SMTP, milter and API connections; 0 starts one per
    /// CPU core.
    pub worker_threads: usize,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 2525)),
            hostname: default_hostname(),
            relay_networks: vec![
                "127.0.0.0/8".parse().expect("valid network"),
                "::1/128".parse().expect("valid network"),
            ],
            max_message_size: 26_214_400,
            bare_line_endings: BareLineEndings::Normalize,
            long_lines: LongLines::Forward,
            max_command_line: 2048,
            max_errors: 20,
            greeting_delay: Duration::ZERO,
            tls_cert_file: None,
            tls_key_file: None,
            require_tls: false,
            xclient_peers: Vec::new(),
            greeting_timeout: Duration::from_secs(300),
            command_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(300),
            data_block_timeout: Duration::from_secs(180),
            max_connections: 500,
            max_connections_per_client: 50,
            max_recipients: 1000,
            data_timeout: Duration::from_secs(600),
            worker_threads: 0,
        }
    }
}

/// Treatment of a message line longer than the 998 octets RFC 5322
/// allows. Lines are never folded, because the scanner has seen them whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LongLines {
    /// Relay the message unchanged.
    #[default]
    Forward,
    /// Reject the message with `550 5.6.0`.
    Reject,
}

/// The smallest command-line limit accepted: RFC 5321's minimum of 512
/// octets, less the CRLF.
pub const MIN_COMMAND_LINE: usize = 510;

/// Reads a list of networks, where a bare address stands for itself alone
/// (`127.0.0.1` is `127.0.0.1/32`).
fn networks<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<IpNet>, D::Error> {
    let texts = Vec::<String>::deserialize(deserializer)?;
    texts
        .iter()
        .map(|text| {
            text.parse::<IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "{text:?} is neither an IP address nor a network such as 192.0.2.0/24"
                    ))
                })
        })
        .collect()
}

fn default_hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// TLS use towards the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    /// Never start TLS.
    None,
    /// Start TLS when the upstream offers it, without checking its
    /// certificate (Postfix's `smtp_tls_security_level = may`).
    #[default]
    Starttls,
    /// Start TLS or fail, and verify the certificate against the system's
    /// trust store or `ca_file`, for the name `tls_name`.
    Required,
}

/// `[upstream]`: the smarthost that accepted mail is relayed to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `host:port` of the smarthost.
    pub address: String,
    #[serde(default)]
    pub tls: UpstreamTls,
    /// PEM file of the CA that signed the upstream's certificate; replaces
    /// the system's trust store.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Name the upstream's certificate must carry; default: the host part
    /// of `address`.
    #[serde(default)]
    pub tls_name: Option<String>,
    /// User name for SMTP AUTH (PLAIN or LOGIN) to the upstream.
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the AUTH password (its first line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Allow AUTH over a connection without TLS.
    #[serde(default)]
    pub allow_plaintext_auth: bool,
    /// Time allowed for each upstream reply (MAIL, RCPT, DATA, RSET).
    #[serde(default = "default_upstream_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Time allowed to connect and receive the upstream greeting.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed for the upstream's reply after the end of the message.
    #[serde(default = "default_upstream_data_timeout", with = "humantime_serde")]
    pub data_timeout: Duration,
    /// Idle upstream sessions kept for later client sessions; 0 closes each
    /// session with its client's.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// How long an idle upstream session is kept.
    #[serde(default = "default_pool_idle_time", with = "humantime_serde")]
    pub pool_idle_time: Duration,
    /// Age after which an upstream session is closed instead of kept.
    #[serde(default = "default_pool_max_age", with = "humantime_serde")]
    pub pool_max_age: Duration,
}

fn default_pool_size() -> usize {
    32
}

fn default_pool_idle_time() -> Duration {
    Duration::from_secs(10)
}

fn default_pool_max_age() -> Duration {
    Duration::from_secs(300)
}

fn default_upstream_timeout() -> Duration {
    Duration::from_secs(300)
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_upstream_data_timeout() -> Duration {
    Duration::from_secs(600)
}

/// `[scan]`: the scanners every message goes through.
#[derive(Debug, Clone, Default)]
pub struct ScanConfig {
    /// `[scan.clamd]`; without it no virus scan is made.
    pub clamd: Option<ClamdConfig>,
    /// `[scan.spam]`: the built-in rules.
    pub spam: SpamConfig,
    /// `[scan.rspamd]`; without it rspamd is not asked.
    pub rspamd: Option<RspamdConfig>,
    /// `[scan.spamd]`; without it spamd is not asked.
    pub spamd: Option<SpamdConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScanSection {
    #[serde(default)]
    clamd: Option<toml::Value>,
    #[serde(default)]
    spam: Option<toml::Value>,
    #[serde(default)]
    rspamd: Option<toml::Value>,
    #[serde(default)]
    spamd: Option<toml::Value>,
}

/// `[policy]`: strikes, windows and lockouts.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    pub mode: Mode,
    pub threshold: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    #[serde(with = "humantime_serde")]
    pub first_lockout: Duration,
    pub timed_lockouts: u32,
    /// Time without a lockout after which a mailbox starts again from
    /// lockout 1; off when absent.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub forgive_after: Option<Duration>,
    /// Mailboxes whose state is kept in memory; the rest stays in the store.
    pub max_tracked_mailboxes: usize,
}

/// The largest `timed_lockouts` accepted: 2^63 hours is already beyond any
/// calendar.
pub const MAX_TIMED_LOCKOUTS: u32 = 64;

impl Default for PolicyConfig {
    fn default() -> Self {
        let settings = PolicySettings::default();
        PolicyConfig {
            mode: settings.mode,
            threshold: settings.threshold,
            window: settings.window,
            first_lockout: settings.first_lockout,
            timed_lockouts: settings.timed_lockouts,
            forgive_after: settings.forgive_after,
            max_tracked_mailboxes: 100_000,
        }
    }
}

impl PolicyConfig {
    /// Returns the settings the pure policy core works with.
    pub fn settings(&self) -> PolicySettings {
        PolicySettings {
            mode: self.mode,
            threshold: self.threshold,
            window: self.window,
            first_lockout: self.first_lockout,
            timed_lockouts: self.timed_lockouts,
            forgive_after: self.forgive_after,
        }
    }

    fn validate(&self, problems: &mut Problems) {
        if self.threshold == 0 {
            problems.push("policy.threshold", "must be at least 1 bad message");
        }
        if self.window.is_zero() {
            problems.push("policy.window", "must be longer than zero, such as \"10m\"");
        }
        if self.first_lockout.is_zero() {
            problems.push(
                "policy.first_lockout",
                "must be longer than zero, such as \"1h\"",
            );
        }
        if self.timed_lockouts > MAX_TIMED_LOCKOUTS {
            problems.push(
                "policy.timed_lockouts",
                format!(
                    "is {}, above the maximum of {MAX_TIMED_LOCKOUTS}",
                    self.timed_lockouts
                ),
            );
        }
        if self
            .forgive_after
            .is_some_and(|forgive_after| forgive_after.is_zero())
        {
            problems.push(
                "policy.forgive_after",
                "must be longer than zero, such as \"90d\"; leave it out to keep lockout counts",
            );
        }
        if self.max_tracked_mailboxes == 0 {
            problems.push("policy.max_tracked_mailboxes", "must be at least 1");
        }
    }
}

/// Attribution of a message without a SASL login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Unauthenticated {
    /// Count and block the envelope sender's mailbox. Anyone allowed to
    /// relay can write any sender, so a forger can get another mailbox
    /// locked out.
    #[default]
    Sender,
    /// Count and block the pair (mailbox, client address): a forger only
    /// locks itself out.
    ClientAndSender,
    /// Count only senders that logged in.
    Ignore,
}

/// `[identity]`: how envelope senders and logins become mailbox keys.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// Drop `+tag` from local parts.
    pub strip_subaddress: bool,
    /// Compare local parts case-sensitively.
    pub case_sensitive_local_part: bool,
    pub unauthenticated: Unauthenticated,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            strip_subaddress: true,
            case_sensitive_local_part: false,
            unauthenticated: Unauthenticated::Sender,
        }
    }
}

/// `[directory]`: the file of mailboxes, aliases, logins, owners, devices.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryConfig {
    pub path: PathBuf,
}

/// Failure to load a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}:\n{problems}")]
    Invalid { path: PathBuf, problems: Problems },
}

impl Config {
    /// Reads and validates a configuration file.
    ///
    /// # Errors
    /// [`ConfigError::Read`] when the file cannot be read, and
    /// [`ConfigError::Invalid`] listing every problem found.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text).map_err(|problems| ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
        })
    }

    /// Parses and validates configuration text.
    ///
    /// # Errors
    /// Every problem found, each with its key path.
    pub fn parse(text: &str) -> Result<Config, Problems> {
        let mut problems = Problems::default();
        let mut root: toml::Table = match text.parse() {
            Ok(root) => root,
            Err(error) => {
                problems.push("(file)", format!("invalid TOML: {error}"));
                return Err(problems);
            }
        };

        let smtp = section::<SmtpConfig>(&mut root, "smtp", &mut problems);
        let upstream = required_section::<UpstreamConfig>(&mut root, "upstream", &mut problems);
        let scan = scan_section(&mut root, &mut problems);
        let policy = section::<PolicyConfig>(&mut root, "policy", &mut problems);
        let identity = section::<IdentityConfig>(&mut root, "identity", &mut problems);
        let directory = optional_section::<DirectoryConfig>(&mut root, "directory", &mut problems);
        let store = required_section::<StoreConfig>(&mut root, "store", &mut problems);
        let milter = optional_section::<MilterConfig>(&mut root, "milter", &mut problems);
        let synchronized_security = section::<SynchronizedSecurityConfig>(
            &mut root,
            "synchronized_security",
            &mut problems,
        );
        let alerts = section::<AlertsConfig>(&mut root, "alerts", &mut problems);
        let actions = section::<ActionsConfig>(&mut root, "actions", &mut problems);
        let admin = section::<AdminConfig>(&mut root, "admin", &mut problems);
        let events = section::<EventsConfig>(&mut root, "events", &mut problems);
        let devices = section::<DevicesConfig>(&mut root, "devices", &mut problems);
        for unknown in root.keys() {
            problems.push(
                unknown.as_str(),
                "unknown section or key; check its spelling against config.toml.example",
            );
        }

        if let Some(smtp) = &smtp {
            validate_smtp(smtp, &mut problems);
        }
        if let Some(upstream) = &upstream {
            validate_upstream(upstream, &mut problems);
        }
        if let Some(policy) = &policy {
            policy.validate(&mut problems);
        }
        if let Some(scan) = &scan {
            if let Some(clamd) = &scan.clamd {
                clamd.validate(&mut problems);
            }
            scan.spam.validate(&mut problems);
            if let Some(rspamd) = &scan.rspamd {
                rspamd.validate(&mut problems);
            }
            if let Some(spamd) = &scan.spamd {
                spamd.validate(&mut problems);
            }
        }
        if let Some(store) = &store {
            store.validate(&mut problems);
        }

        if let Some(Some(milter)) = &milter {
            let is_path = milter.listen.starts_with('/');
            if !is_path && milter.listen.parse::<SocketAddr>().is_err() {
                problems.push(
                    "milter.listen",
                    format!(
                        "{:?} is neither host:port nor an absolute unix socket path",
                        milter.listen
                    ),
                );
            }
            if milter.timeout.is_zero() {
                problems.push("milter.timeout", "must be longer than zero");
            }
        }

        if let (Some(synchronized), Some(alerts), Some(actions)) =
            (&synchronized_security, &alerts, &actions)
        {
            actions::validate(synchronized, alerts, actions, &mut problems);
        }
        if let (Some(admin), Some(events)) = (&admin, &events) {
            admin::validate(admin, events, &mut problems);
        }
        if let (Some(devices), Some(actions)) = (&devices, &actions) {
            devices::validate(devices, actions.secret_file.is_some(), &mut problems);
        }
        if let (Some(admin), Some(smtp)) = (&admin, &smtp)
            && admin.listen == Some(smtp.listen)
        {
            problems.push(
                "admin.listen",
                format!(
                    "is {}, the same address as smtp.listen; give the API its own port",
                    smtp.listen
                ),
            );
        }

        match (
            (smtp, upstream, scan, policy, identity, directory, store),
            (
                milter,
                synchronized_security,
                alerts,
                actions,
                admin,
                events,
                devices,
            ),
        ) {
            (
                (
                    Some(smtp),
                    Some(upstream),
                    Some(scan),
                    Some(policy),
                    Some(identity),
                    Some(directory),
                    Some(store),
                ),
                (
                    Some(milter),
                    Some(synchronized_security),
                    Some(alerts),
                    Some(actions),
                    Some(admin),
                    Some(events),
                    Some(devices),
                ),
            ) if problems.is_empty() => Ok(Config {
                smtp,
                upstream,
                scan,
                policy,
                identity,
                directory,
                store,
                milter,
                synchronized_security,
                alerts,
                actions,
                admin,
                events,
                devices,
            }),
            _ => Err(problems),
        }
    }

    /// Settings that are valid but probably not what the operator wants.
    pub fn warnings(&self) -> Vec<Problem> {
        let mut warnings = Problems::default();
        if let Some(clamd) = &self.scan.clamd
            && clamd.max_scan_size < self.smtp.max_message_size
        {
            warnings.push(
                "scan.clamd.max_scan_size",
                format!(
                    "is {} bytes, below smtp.max_message_size ({} bytes): messages between the two are \
                     accepted by size but rejected as unscannable",
                    clamd.max_scan_size, self.smtp.max_message_size
                ),
            );
        }
        if self.synchronized_security.enabled
            && self.synchronized_security.endpoint_scan_url.is_none()
        {
            warnings.push(
                "synchronized_security.endpoint_scan_url",
                "is not set, so scan requests reach only devices that run `sendguard agent` \
                 (through their event stream); devices protected by another endpoint product \
                 need this webhook",
            );
        }
        if self.devices.relay_gate && !self.devices.reject_unsafe {
            warnings.push(
                "devices.relay_gate",
                "is on, but devices.reject_unsafe is off, so the relay refuses no device until \
                 reject_unsafe is turned on (in the file or through the API)",
            );
        }
        if let Some(listen) = self.admin.listen
            && !listen.ip().is_loopback()
        {
            warnings.push(
                "admin.listen",
                format!(
                    "is {listen}, reachable from the network, and the API speaks plain HTTP: bearer \
                     tokens cross the network in clear text unless a TLS reverse proxy is in front"
                ),
            );
        }
        warnings.0
    }

    /// Returns a stable digest of the settings that decide strikes and
    /// lockouts, so the events report shows which policy was in force.
    pub fn policy_digest(&self) -> String {
        use sha2::Digest;
        let text = serde_json::json!({
            "policy": self.policy,
            "identity": self.identity,
        })
        .to_string();
        hex::encode(&sha2::Sha256::digest(text.as_bytes())[..8])
    }
}

fn validate_smtp(smtp: &SmtpConfig, problems: &mut Problems) {
    match (&smtp.tls_cert_file, &smtp.tls_key_file) {
        (Some(_), None) => problems.push(
            "smtp.tls_key_file",
            "missing; smtp.tls_cert_file needs its private key",
        ),
        (None, Some(_)) => problems.push(
            "smtp.tls_cert_file",
            "missing; smtp.tls_key_file needs its certificate",
        ),
        _ => {}
    }
    if smtp.require_tls && smtp.tls_cert_file.is_none() {
        problems.push(
            "smtp.require_tls",
            "is true, but no certificate is set (smtp.tls_cert_file and smtp.tls_key_file), so no client could ever send",
        );
    }
    if smtp.hostname.is_empty()
        || smtp
            .hostname
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        problems.push(
            "smtp.hostname",
            format!("{:?} is not a valid host name", smtp.hostname),
        );
    }
    if smtp.max_command_line < MIN_COMMAND_LINE {
        problems.push(
            "smtp.max_command_line",
            format!(
                "is {}, below the {MIN_COMMAND_LINE} octets every SMTP server must accept",
                smtp.max_command_line
            ),
        );
    }
    if smtp.max_errors == 0 {
        problems.push("smtp.max_errors", "must be at least 1");
    }
    if smtp.max_message_size == 0 {
        problems.push("smtp.max_message_size", "must be at least 1 byte");
    }
    for (key, value) in [
        ("smtp.greeting_timeout", smtp.greeting_timeout),
        ("smtp.command_timeout", smtp.command_timeout),
        ("smtp.idle_timeout", smtp.idle_timeout),
        ("smtp.data_block_timeout", smtp.data_block_timeout),
        ("smtp.data_timeout", smtp.data_timeout),
    ] {
        if value.is_zero() {
            problems.push(key, "must be longer than zero");
        }
    }
    for (key, value) in [
        ("smtp.max_connections", smtp.max_connections),
        (
            "smtp.max_connections_per_client",
            smtp.max_connections_per_client,
        ),
        ("smtp.max_recipients", smtp.max_recipients),
    ] {
        if value == 0 {
            problems.push(key, "must be at least 1");
        }
    }
    if smtp.worker_threads > MAX_WORKER_THREADS {
        problems.push(
            "smtp.worker_threads",
            format!(
                "is {}, above the limit of {MAX_WORKER_THREADS}; use 0 for one thread per CPU core",
                smtp.worker_threads
            ),
        );
    }
}

/// Highest `upstream.pool_size` accepted.
const MAX_POOL_SIZE: usize = 10_000;

/// Longest `upstream.pool_idle_time` and `pool_max_age` accepted.
const MAX_POOL_TIME: Duration = Duration::from_secs(3600);

/// Highest `smtp.worker_threads` accepted.
const MAX_WORKER_THREADS: usize = 256;

/// Checks the form `host:port` with a port from 1 to 65535.
fn is_host_port(address: &str) -> bool {
    address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
}

fn validate_upstream(upstream: &UpstreamConfig, problems: &mut Problems) {
    if !is_host_port(&upstream.address) {
        problems.push(
            "upstream.address",
            format!(
                "{:?} is not host:port, such as \"127.0.0.1:25\" or \"[::1]:25\"",
                upstream.address
            ),
        );
    }
    match (&upstream.username, &upstream.password_file) {
        (Some(_), None) => problems.push(
            "upstream.password_file",
            "missing; upstream.username needs a password file",
        ),
        (None, Some(_)) => problems.push(
            "upstream.username",
            "missing; upstream.password_file needs a user name",
        ),
        _ => {}
    }
    if upstream.username.is_some()
        && upstream.tls == UpstreamTls::None
        && !upstream.allow_plaintext_auth
    {
        problems.push(
            "upstream.tls",
            "is \"none\", so the AUTH password would cross the network in clear text; use \"starttls\" or \"required\", or set upstream.allow_plaintext_auth = true",
        );
    }
    for (key, value) in [
        ("upstream.timeout", upstream.timeout),
        ("upstream.connect_timeout", upstream.connect_timeout),
        ("upstream.data_timeout", upstream.data_timeout),
    ] {
        if value.is_zero() {
            problems.push(key, "must be longer than zero");
        }
    }
    for (key, value, example) in [
        ("upstream.pool_idle_time", upstream.pool_idle_time, "10s"),
        ("upstream.pool_max_age", upstream.pool_max_age, "5m"),
    ] {
        if value.is_zero() {
            problems.push(
                key,
                format!("must be longer than zero, such as \"{example}\"; to keep no upstream sessions, set upstream.pool_size = 0"),
            );
        } else if value > MAX_POOL_TIME {
            problems.push(
                key,
                format!(
                    "is {}, above the limit of 1h; keep it below the upstream's own idle timeout (Postfix: smtpd_timeout, 300 s)",
                    humantime::format_duration(value)
                ),
            );
        }
    }
    if upstream.pool_size > MAX_POOL_SIZE {
        problems.push(
            "upstream.pool_size",
            format!(
                "is {}, above the limit of {MAX_POOL_SIZE}; each kept session is an open connection to the upstream",
                upstream.pool_size
            ),
        );
    }
}

fn scan_section(root: &mut toml::Table, problems: &mut Problems) -> Option<ScanConfig> {
    let Some(value) = root.remove("scan") else {
        return Some(ScanConfig::default());
    };
    let section: ScanSection = match value.try_into() {
        Ok(section) => section,
        Err(error) => {
            problems.push("scan", error.message().to_string());
            return None;
        }
    };
    let clamd = match section.clamd {
        None => Some(None),
        Some(value) => decode::<ClamdConfig>(value, "scan.clamd", problems).map(Some),
    };
    let spam = match section.spam {
        None => Some(SpamConfig::default()),
        Some(value) => decode::<SpamConfig>(value, "scan.spam", problems),
    };
    let rspamd = match section.rspamd {
        None => Some(None),
        Some(value) => decode::<RspamdConfig>(value, "scan.rspamd", problems).map(Some),
    };
    let spamd = match section.spamd {
        None => Some(None),
        Some(value) => decode::<SpamdConfig>(value, "scan.spamd", problems).map(Some),
    };
    Some(ScanConfig {
        clamd: clamd?,
        spam: spam?,
        rspamd: rspamd?,
        spamd: spamd?,
    })
}

/// Decodes `[key]`, using the defaults when it is absent.
fn section<T: DeserializeOwned + Default>(
    root: &mut toml::Table,
    key: &str,
    problems: &mut Problems,
) -> Option<T> {
    match root.remove(key) {
        None => Some(T::default()),
        Some(value) => decode(value, key, problems),
    }
}

/// Decodes `[key]`, which must be present.
fn required_section<T: DeserializeOwned>(
    root: &mut toml::Table,
    key: &str,
    problems: &mut Problems,
) -> Option<T> {
    match root.remove(key) {
        None => {
            problems.push(key, format!("missing section [{key}]"));
            None
        }
        Some(value) => decode(value, key, problems),
    }
}

/// Decodes `[key]` if present; the outer `Option` is `None` on error.
fn optional_section<T: DeserializeOwned>(
    root: &mut toml::Table,
    key: &str,
    problems: &mut Problems,
) -> Option<Option<T>> {
    match root.remove(key) {
        None => Some(None),
        Some(value) => decode(value, key, problems).map(Some),
    }
}

fn decode<T: DeserializeOwned>(
    value: toml::Value,
    key: &str,
    problems: &mut Problems,
) -> Option<T> {
    if !value.is_table() {
        problems.push(key, "must be a table, such as [section] with keys below it");
        return None;
    }
    match T::deserialize(value.clone()) {
        Ok(decoded) => Some(decoded),
        Err(error) => {
            let bad_keys = report_per_key::<T>(&value, key, problems, error.message());
            // Decode the rest without the bad keys, so the values that did
            // decode are still validated and their problems reported too.
            let mut rest = value.as_table().cloned().unwrap_or_default();
            rest.retain(|name, _| !bad_keys.iter().any(|bad| bad == name));
            T::deserialize(toml::Value::Table(rest)).ok()
        }
    }
}

/// Reports a section's decoding problems key by key, so that one bad value
/// does not hide the others: each key is decoded alone, and errors about the
/// keys left out ("missing field") are skipped.
fn report_per_key<T: DeserializeOwned>(
    value: &toml::Value,
    key: &str,
    problems: &mut Problems,
    whole_error: &str,
) -> Vec<String> {
    let before = problems.0.len();
    let mut bad_keys = Vec::new();
    if let Some(table) = value.as_table() {
        for (name, item) in table {
            let mut alone = toml::Table::new();
            alone.insert(name.clone(), item.clone());
            if let Err(error) = T::deserialize(toml::Value::Table(alone)) {
                let message = error.message().trim();
                if !message.starts_with("missing field") {
                    let mut value = item.to_string();
                    if value.len() > 120 {
                        let cut = (0..=120)
                            .rev()
                            .find(|&index| value.is_char_boundary(index))
                            .unwrap_or(0);
                        value.truncate(cut);
                        value.push_str("...");
                    }
                    problems.push(
                        format!("{key}.{name}"),
                        format!("{message} (value: {value})"),
                    );
                    bad_keys.push(name.clone());
                }
            }
        }
    }
    if problems.0.len() == before {
        problems.push(key, whole_error.trim().to_string());
    }
    bad_keys
}

#[cfg(test)]
mod tests;
