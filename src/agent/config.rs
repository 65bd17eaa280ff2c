//! The agent's configuration file, `agent.toml`, and its validation.

use crate::admin::devices::MAX_ADDRESSES;
use crate::config::Problems;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Base URL of sendguard's admin API, such as `http://10.0.0.5:8025`.
    pub server: String,
    /// This device's id in the server's devices file.
    pub device: String,
    /// File whose first line is this device's token. The devices file
    /// contains its SHA-256.
    pub token_file: PathBuf,
    /// Time between two heartbeats. Default 15 s.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Time allowed for one API request, connect included. Default 10 s.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// PEM file of the CA that signed the server's certificate for an
    /// `https` server URL; default: the system's trust store.
    pub ca_file: Option<PathBuf>,
    /// Addresses reported in heartbeats. Empty (the default): the
    /// addresses of the device's interfaces, read with `ip -j address`,
    /// loopback and link-local ones left out.
    #[serde(default)]
    pub addresses: Vec<std::net::IpAddr>,
    /// File that keeps the event stream position, unfinished scan requests
    /// and the last scan's result across restarts. Default:
    /// `state.json` in systemd's state directory (`$STATE_DIRECTORY`) when
    /// there is one, else none.
    pub state_file: Option<PathBuf>,
    #[serde(default)]
    pub checks: ChecksConfig,
    #[serde(default)]
    pub scan: ScanConfig,
    #[serde(default)]
    pub enforcement: EnforcementConfig,
}

/// `[checks]`: the local checks that decide the reported health.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChecksConfig {
    /// Check that clamd (`scan.clamd`) replies to PING; red when it does
    /// not. Off by default.
    pub clamd: bool,
    /// Maximum age of clamd's signature database, from its VERSION reply;
    /// yellow when older or when clamd does not state the date. Needs
    /// `clamd = true`; no limit by default.
    #[serde(with = "humantime_serde")]
    pub max_signature_age: Option<Duration>,
    /// Operator commands; each exit status maps to a health.
    pub command: Vec<CommandCheck>,
}

/// One `[[checks.command]]`: exit 0 is green, 1 yellow, anything else
/// (a timeout and a failure to start included) red.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandCheck {
    /// Name in logs.
    pub name: String,
    /// Program and arguments, run without a shell.
    pub command: Vec<String>,
    /// Time the command may run before it is killed and counts as red.
    /// Default 10 s.
    #[serde(default = "default_command_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

/// `[scan]`: the on-demand scan the server requests on a lockout of the
/// owner's mailbox.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScanConfig {
    /// clamd's socket: a path (unix socket, such as
    /// `/run/clamav/clamd.ctl`, the default) or `host:port`.
    pub clamd: String,
    /// Files and directories scanned, each with clamd's MULTISCAN.
    pub paths: Vec<PathBuf>,
    /// Time allowed for the whole scan. Default 1 h.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for ScanConfig {
    fn default() -> Self {
        ScanConfig {
            clamd: "/run/clamav/clamd.ctl".to_string(),
            paths: Vec::new(),
            timeout: Duration::from_secs(3600),
        }
    }
}

/// `[enforcement]`: the nftables table that refuses connections.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnforcementConfig {
    /// Keep the table; `false` only reports health and runs scans.
    /// Default true.
    pub enabled: bool,
    /// The `nft` program. Default `nft`, found on `PATH`.
    pub nft: PathBuf,
    /// Time between two reads of the table, which detect refusals and
    /// changes made outside the agent. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
    /// Time the last known unsafe list stays in force while the server is
    /// unreachable; after it the agent removes its table (fails open).
    /// Default 10 min.
    #[serde(with = "humantime_serde")]
    pub keep_unsafe_list: Duration,
    /// Minimum time between two reports to the server of refusals of one
    /// peer in one direction; refusals in between are counted into the next
    /// report. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub report_interval: Duration,
}

impl Default for EnforcementConfig {
    fn default() -> Self {
        EnforcementConfig {
            enabled: true,
            nft: PathBuf::from("nft"),
            check_interval: Duration::from_secs(1),
            keep_unsafe_list: Duration::from_secs(600),
            report_interval: Duration::from_secs(60),
        }
    }
}

fn default_interval() -> Duration {
    Duration::from_secs(15)
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_command_timeout() -> Duration {
    Duration::from_secs(10)
}

impl AgentConfig {
    /// Reads and validates `path`.
    ///
    /// # Errors
    /// Every problem found, one a line, each with its key.
    pub fn load(path: &Path) -> Result<AgentConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read agent config {}: {error}", path.display()))?;
        AgentConfig::parse(&text).map_err(|error| format!("{}: {error}", path.display()))
    }

    /// Parses and validates agent configuration text.
    ///
    /// # Errors
    /// Every problem found, one a line, each with its key.
    pub fn parse(text: &str) -> Result<AgentConfig, String> {
        let config: AgentConfig =
            toml::from_str(text).map_err(|error| format!("invalid agent config: {error}"))?;
        let mut problems = Problems::default();
        config.validate(&mut problems);
        if problems.0.is_empty() {
            return Ok(config);
        }
        let lines: Vec<String> = problems
            .0
            .iter()
            .map(|problem| format!("{}: {}", problem.key, problem.message))
            .collect();
        Err(format!("invalid agent config:\n{}", lines.join("\n")))
    }

    fn validate(&self, problems: &mut Problems) {
        match reqwest::Url::parse(&self.server) {
            // The agent appends the API's paths to the URL, so a query or
            // fragment would end up in front of them.
            Ok(url) if url.query().is_some() || url.fragment().is_some() => problems.push(
                "server",
                format!(
                    "{:?} has a query or fragment; give the admin API's base URL, such as http://10.0.0.5:8025",
                    self.server
                ),
            ),
            Ok(url) if matches!(url.scheme(), "http" | "https") => {}
            Ok(url) => problems.push(
                "server",
                format!("scheme {:?} is not supported; give an http:// or https:// URL", url.scheme()),
            ),
            Err(error) => problems.push(
                "server",
                format!(
                    "invalid URL {:?} ({error}); give the admin API's base URL, such as http://10.0.0.5:8025",
                    self.server
                ),
            ),
        }
        if self.addresses.len() > MAX_ADDRESSES {
            problems.push(
                "addresses",
                format!(
                    "lists {} addresses; the server accepts at most {MAX_ADDRESSES} in a heartbeat",
                    self.addresses.len()
                ),
            );
        }
        if self.device.trim().is_empty() {
            problems.push(
                "device",
                "is empty; give this device's id from the server's devices file",
            );
        }
        let positive = [
            ("interval", self.interval),
            ("request_timeout", self.request_timeout),
            ("scan.timeout", self.scan.timeout),
            (
                "enforcement.check_interval",
                self.enforcement.check_interval,
            ),
            (
                "enforcement.keep_unsafe_list",
                self.enforcement.keep_unsafe_list,
            ),
        ];
        for (key, value) in positive {
            if value.is_zero() {
                problems.push(key, "is 0; give a duration such as \"15s\"");
            }
        }
        // Each heartbeat runs every check and two requests, and each table
        // check runs nft, so a value in milliseconds, most likely a typo
        // for seconds, would load the server or the device.
        let minimums = [
            ("interval", self.interval, Duration::from_secs(1)),
            (
                "enforcement.check_interval",
                self.enforcement.check_interval,
                Duration::from_millis(100),
            ),
        ];
        for (key, value, minimum) in minimums {
            if !value.is_zero() && value < minimum {
                problems.push(
                    key,
                    format!(
                        "is {}, less than the minimum of {}; give a duration such as \"15s\"",
                        humantime::format_duration(value),
                        humantime::format_duration(minimum)
                    ),
                );
            }
        }
        // An interval too long to double is longer than any keep_unsafe_list.
        let too_short = self
            .interval
            .checked_mul(2)
            .is_none_or(|twice| self.enforcement.keep_unsafe_list < twice);
        if self.enforcement.enabled && too_short {
            problems.push(
                "enforcement.keep_unsafe_list",
                format!(
                    "is {}, less than two heartbeat intervals ({}), so one lost heartbeat would \
                     remove the rules; give at least twice interval",
                    humantime::format_duration(self.enforcement.keep_unsafe_list),
                    humantime::format_duration(self.interval)
                ),
            );
        }
        if self.checks.max_signature_age.is_some() && !self.checks.clamd {
            problems.push(
                "checks.max_signature_age",
                "is set, but checks.clamd is false; turn the clamd check on to read the signature date",
            );
        }
        for (index, check) in self.checks.command.iter().enumerate() {
            if check.command.is_empty() || check.command[0].trim().is_empty() {
                problems.push(
                    format!("checks.command[{index}].command"),
                    "is empty; give the program and its arguments, such as [\"/usr/lib/check-disk\", \"-w\", \"90\"]",
                );
            }
            if check.timeout.is_zero() {
                problems.push(
                    format!("checks.command[{index}].timeout"),
                    "is 0; give a duration such as \"10s\"",
                );
            }
        }
        if self.scan.clamd.trim().is_empty() {
            problems.push(
                "scan.clamd",
                "is empty; give a unix socket path or host:port",
            );
        }
        if let Some(path) = &self.state_file
            && (path.file_name().is_none() || path.as_os_str().as_encoded_bytes().ends_with(b"/"))
        {
            problems.push(
                "state_file",
                format!(
                    "{:?} names no file; give a file path such as \"/var/lib/sendguard-agent/state.json\"",
                    path.display().to_string()
                ),
            );
        }
        for (index, path) in self.scan.paths.iter().enumerate() {
            if !path.is_absolute() {
                problems.push(
                    format!("scan.paths[{index}]"),
                    format!("{} is relative; clamd needs absolute paths", path.display()),
                );
            }
        }
    }

    /// Returns the state file: `state_file`, else `state.json` in the
    /// first directory of `state_directory` (systemd's `$STATE_DIRECTORY`,
    /// set by the unit's `StateDirectory=`), else `None`.
    pub fn state_path(&self, state_directory: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
        if let Some(path) = &self.state_file {
            return Some(path.clone());
        }
        // systemd separates several state directories with colons.
        let directories = state_directory?.to_str()?;
        let first = directories
            .split(':')
            .next()
            .filter(|first| !first.is_empty())?;
        Some(Path::new(first).join(super::state::STATE_FILE_NAME))
    }

    /// Returns the permission bits of `token_file` when other users may
    /// read or write it. Returns `None` when only the owner may, or when
    /// the file cannot be read.
    pub fn token_file_exposed(&self) -> Option<u32> {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&self.token_file)
            .ok()?
            .permissions()
            .mode()
            & 0o777;
        (mode & 0o077 != 0).then_some(mode)
    }

    /// Reads the device token from `token_file`.
    ///
    /// # Errors
    /// When the file cannot be read or its first line is empty.
    pub fn token(&self) -> Result<String, String> {
        let text = std::fs::read_to_string(&self.token_file).map_err(|error| {
            format!(
                "token_file: cannot read {}: {error}",
                self.token_file.display()
            )
        })?;
        let token = text.lines().next().unwrap_or("").trim().to_string();
        if token.is_empty() {
            return Err(format!(
                "token_file: the first line of {} is empty; write the device's token there",
                self.token_file.display()
            ));
        }
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "server = \"http://10.0.0.5:8025\"\ndevice = \"ws-1\"\ntoken_file = \"/etc/sendguard/agent.token\"\n";

    #[test]
    fn minimal_config_defaults() {
        let config = AgentConfig::parse(MINIMAL).expect("valid");
        assert_eq!(config.interval, Duration::from_secs(15));
        assert!(config.enforcement.enabled);
        assert_eq!(
            config.enforcement.keep_unsafe_list,
            Duration::from_secs(600)
        );
        assert_eq!(config.scan.clamd, "/run/clamav/clamd.ctl");
    }

    #[test]
    fn invalid_values_all_reported() {
        let text = "server = \"ftp://x\"\ndevice = \"\"\ntoken_file = \"t\"\ninterval = \"10s\"\n\
                    [enforcement]\nkeep_unsafe_list = \"5s\"\n[scan]\npaths = [\"relative\"]\n\
                    [checks]\nmax_signature_age = \"1d\"\n[[checks.command]]\nname = \"x\"\ncommand = []\n";
        let error = AgentConfig::parse(text).expect_err("invalid");
        for key in [
            "server:",
            "device:",
            "enforcement.keep_unsafe_list:",
            "scan.paths[0]:",
            "checks.max_signature_age:",
            "checks.command[0].command:",
        ] {
            assert!(error.contains(key), "{key} missing in {error}");
        }
    }

    #[test]
    fn server_url_with_query_rejected() {
        for server in ["http://10.0.0.5:8025/?x=1", "http://10.0.0.5:8025/#top"] {
            let text = MINIMAL.replace("http://10.0.0.5:8025", server);
            let error = AgentConfig::parse(&text).expect_err("query or fragment");
            assert!(error.contains("server:"), "{error}");
        }
    }

    #[test]
    fn too_many_addresses_reported() {
        let addresses: Vec<String> = (0..=MAX_ADDRESSES)
            .map(|host| format!("\"10.0.{}.{}\"", host / 250, host % 250 + 1))
            .collect();
        let text = format!("{MINIMAL}addresses = [{}]\n", addresses.join(", "));
        let error = AgentConfig::parse(&text).expect_err("too many addresses");
        assert!(error.contains("addresses: lists 65 addresses"), "{error}");
    }

    #[test]
    fn millisecond_intervals_rejected() {
        let text =
            format!("{MINIMAL}interval = \"15ms\"\n[enforcement]\ncheck_interval = \"1ms\"\n");
        let error = AgentConfig::parse(&text).expect_err("too short");
        assert!(
            error.contains("interval: is 15ms, less than the minimum of 1s"),
            "{error}"
        );
        assert!(
            error.contains("enforcement.check_interval: is 1ms, less than the minimum of 100ms"),
            "{error}"
        );
    }

    #[test]
    fn huge_interval_reported() {
        let error = AgentConfig::parse(&format!("{MINIMAL}interval = \"500000000000years\"\n"))
            .expect_err("keep_unsafe_list is shorter than two intervals");
        assert!(error.contains("enforcement.keep_unsafe_list:"), "{error}");
    }

    #[test]
    fn token_file_readable_by_others_detected() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temporary directory");
        let token = dir.path().join("agent.token");
        std::fs::write(&token, "token\n").expect("write token");
        let text = MINIMAL.replace("/etc/sendguard/agent.token", &token.display().to_string());
        let config = AgentConfig::parse(&text).expect("valid");
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(config.token_file_exposed(), Some(0o644));
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(config.token_file_exposed(), None);
    }

    #[test]
    fn example_file_valid() {
        let config = AgentConfig::parse(include_str!("../../agent.toml.example"))
            .expect("agent.toml.example is valid");
        assert_eq!(config.device, "ws-17");
        assert_eq!(config.enforcement.report_interval, Duration::from_secs(60));
        // The packaged agent.toml is this file, and it keeps state, so a
        // restart keeps an infected result.
        assert_eq!(
            config.state_file,
            Some(PathBuf::from("/var/lib/sendguard-agent/state.json"))
        );
    }

    #[test]
    fn state_file_from_systemd_directory() {
        let config = AgentConfig::parse(MINIMAL).expect("valid");
        assert_eq!(config.state_path(None), None);
        assert_eq!(
            config.state_path(Some("/var/lib/sendguard-agent:/var/lib/other".as_ref())),
            Some(PathBuf::from("/var/lib/sendguard-agent/state.json"))
        );
        let config = AgentConfig::parse(&format!("{MINIMAL}state_file = \"/srv/agent.json\"\n"))
            .expect("valid");
        assert_eq!(
            config.state_path(Some("/var/lib/sendguard-agent".as_ref())),
            Some(PathBuf::from("/srv/agent.json"))
        );
    }

    #[test]
    fn state_file_without_name_rejected() {
        for value in ["", "/var/lib/sendguard-agent/", "/"] {
            let error = AgentConfig::parse(&format!("{MINIMAL}state_file = \"{value}\"\n"))
                .expect_err("no file name");
            assert!(error.contains("state_file:"), "{value}: {error}");
        }
    }

    #[test]
    fn unknown_key_rejected() {
        let error = AgentConfig::parse(&format!("{MINIMAL}allow = [\"10.0.0.9\"]\n"))
            .expect_err("unknown key");
        assert!(error.contains("allow"), "{error}");
    }
}
