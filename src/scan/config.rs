//! `[scan.clamd]` and `[scan.spam]`: what the scanners connect to and how
//! their findings are classified.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::config::Problems;

use super::rules;

/// Guard action when clamd cannot be reached or a scan fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Reply 451 4.7.1 so that the client retries later.
    #[default]
    Tempfail,
    /// Log a warning, skip clamd and still run the built-in rules.
    Accept,
}

/// Guard action for a message that clamd could not scan fully.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnscannable {
    /// Reply 554 5.7.1.
    #[default]
    Reject,
    Accept,
}

/// Guard action for a message judged spam.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SpamAction {
    #[default]
    Reject,
    /// Relay the message with a spam header added.
    Tag,
}

/// Verdict class of a clamd signature name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NameClass {
    Virus,
    Spam,
    /// Treated as clean; the finding is logged at info level.
    Ignore,
}

/// `[scan.clamd]`: the clamd server that scans every message.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClamdConfig {
    /// `host:port` for TCP, or an absolute path for a unix socket.
    pub address: String,
    /// Limit for connecting, sending the message and reading the reply together.
    #[serde(with = "humantime_serde", default = "default_timeout")]
    pub timeout: Duration,
    #[serde(default)]
    pub on_error: OnError,
    #[serde(default)]
    pub on_unscannable: OnUnscannable,
    /// Largest message in bytes sent to clamd. Larger messages are unscannable.
    #[serde(default = "default_max_scan_size")]
    pub max_scan_size: u64,
    /// Signature-name prefix to class. The longest matching prefix wins and a
    /// name without a match is a virus. The operator's table is merged over
    /// [`default_names`].
    #[serde(default = "default_names", deserialize_with = "names_over_defaults")]
    pub names: BTreeMap<String, NameClass>,
    /// Idle clamd connections kept open between scans, each in an
    /// IDSESSION session; 0 opens a connection per scan.
    #[serde(default = "default_sessions")]
    pub sessions: usize,
    /// How long a kept session may stay idle before it is closed.
    #[serde(with = "humantime_serde", default = "default_session_idle_time")]
    pub session_idle_time: Duration,
}

fn default_session_idle_time() -> Duration {
    Duration::from_secs(10)
}

/// Default `sessions` of `[scan.clamd]`.
pub const DEFAULT_CLAMD_SESSIONS: usize = 16;

fn default_sessions() -> usize {
    DEFAULT_CLAMD_SESSIONS
}

/// Default `timeout` of `[scan.clamd]`.
pub const DEFAULT_CLAMD_TIMEOUT: Duration = Duration::from_secs(30);

/// Default `max_scan_size` of `[scan.clamd]`: 25 MiB, the default
/// `StreamMaxLength` of ClamAV 1.4's clamd.
pub const DEFAULT_MAX_SCAN_SIZE: u64 = 25 * 1024 * 1024;

fn default_timeout() -> Duration {
    DEFAULT_CLAMD_TIMEOUT
}

fn default_max_scan_size() -> u64 {
    DEFAULT_MAX_SCAN_SIZE
}

/// Default signature classes: potentially unwanted applications and
/// encrypted archives are common in legitimate mail, so they are ignored,
/// and phishing heuristics count as spam rather than as a virus.
pub fn default_names() -> BTreeMap<String, NameClass> {
    BTreeMap::from([
        ("PUA.".to_string(), NameClass::Ignore),
        ("Heuristics.Encrypted.".to_string(), NameClass::Ignore),
        ("Heuristics.Phishing.".to_string(), NameClass::Spam),
    ])
}

fn names_over_defaults<'de, D>(deserializer: D) -> Result<BTreeMap<String, NameClass>, D::Error>
where
    D: Deserializer<'de>,
{
    let operator = BTreeMap::<String, NameClass>::deserialize(deserializer)?;
    let mut names = default_names();
    names.extend(operator);
    Ok(names)
}

impl Default for ClamdConfig {
    /// Defaults for every key except `address`, which is left empty and has
    /// to be set.
    fn default() -> Self {
        ClamdConfig {
            address: String::new(),
            timeout: DEFAULT_CLAMD_TIMEOUT,
            on_error: OnError::default(),
            on_unscannable: OnUnscannable::default(),
            max_scan_size: DEFAULT_MAX_SCAN_SIZE,
            names: default_names(),
            sessions: DEFAULT_CLAMD_SESSIONS,
            session_idle_time: default_session_idle_time(),
        }
    }
}

impl ClamdConfig {
    /// Checks the values that deserializing cannot, under `scan.clamd.<key>`.
    pub fn validate(&self, problems: &mut Problems) {
        let hint = "give clamd's TCPSocket as \"host:port\" or its LocalSocket as an absolute path";
        if let Err(message) = check_address(&self.address, hint) {
            problems.push("scan.clamd.address", message);
        }
        if self.timeout.is_zero() {
            problems.push(
                "scan.clamd.timeout",
                "must be longer than zero, such as \"30s\"",
            );
        }
        if self.session_idle_time.is_zero() {
            problems.push(
                "scan.clamd.session_idle_time",
                "must be longer than zero, such as \"10s\"; to keep no sessions, set sessions = 0",
            );
        } else if self.session_idle_time > Duration::from_secs(600) {
            problems.push(
                "scan.clamd.session_idle_time",
                format!(
                    "is {}, above the limit of 10m; keep it below clamd's CommandReadTimeout and ReadTimeout (30 s and 120 s by default)",
                    humantime::format_duration(self.session_idle_time)
                ),
            );
        }
        if self.sessions > 1024 {
            problems.push(
                "scan.clamd.sessions",
                format!(
                    "is {}, above the limit of 1024; each kept session is an open connection to clamd",
                    self.sessions
                ),
            );
        }
        if self.max_scan_size == 0 {
            problems.push(
                "scan.clamd.max_scan_size",
                "must be at least 1 byte; keep it at or below clamd's StreamMaxLength",
            );
        }
        for prefix in self.names.keys() {
            if prefix.is_empty() {
                problems.push(
                    "scan.clamd.names",
                    "contains an empty prefix, which would match every signature; remove it",
                );
            }
        }
    }

    /// Classifies a signature name by the longest matching prefix in `names`.
    pub fn classify(&self, signature: &str) -> NameClass {
        self.names
            .iter()
            .filter(|(prefix, _)| signature.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map_or(NameClass::Virus, |(_, class)| *class)
    }
}

/// Checks that `address` is an absolute unix socket path or `host:port`;
/// `hint` tells an operator what to give when it is empty.
pub(super) fn check_address(address: &str, hint: &str) -> Result<(), String> {
    if address.trim().is_empty() {
        return Err(format!("is empty; {hint}"));
    }
    if address.starts_with('/') {
        return Ok(());
    }
    if !address.contains(':') {
        return Err(format!(
            "{address:?} is neither \"host:port\" nor an absolute unix socket path"
        ));
    }
    check_host_port(address)
}

/// Checks that `address` is `host:port` with a port from 1 to 65535.
pub(super) fn check_host_port(address: &str) -> Result<(), String> {
    if address.contains("://") {
        return Err(format!(
            "{address:?} is a URL; give only \"host:port\", such as \"127.0.0.1:11333\""
        ));
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!(
            "{address:?} is not \"host:port\", such as \"127.0.0.1:11333\""
        ));
    };
    if host.is_empty() || host == "[]" {
        return Err(format!("{address:?} has no host before the port"));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(format!(
            "{address:?} has an IPv6 address without brackets; write it as \"[::1]:11333\""
        ));
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!(
            "{address:?} has an invalid port {port:?}; use 1 to 65535"
        )),
        Ok(_) => Ok(()),
    }
}

/// `[scan.spam]`: the built-in rule scanner.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SpamConfig {
    pub enabled: bool,
    /// A message whose rule scores add up to at least this is spam.
    pub threshold: f64,
    pub action: SpamAction,
    /// Whether the shipped default rules are used.
    pub default_rules: bool,
    /// Operator rules, `[[scan.spam.rules]]`. A rule with the name of a
    /// default rule replaces it.
    pub rules: Vec<RuleConfig>,
    /// Count a message an earlier filter marked as spam (`X-Spam-Flag:
    /// YES`, `X-Spam-Status: Yes`, `X-Spam: Yes`) as spam. Off by default,
    /// because a sender can write those headers itself.
    pub trust_headers: bool,
}

/// Default `threshold` of `[scan.spam]`.
pub const DEFAULT_SPAM_THRESHOLD: f64 = 5.0;

impl Default for SpamConfig {
    fn default() -> Self {
        SpamConfig {
            enabled: true,
            threshold: DEFAULT_SPAM_THRESHOLD,
            action: SpamAction::default(),
            default_rules: true,
            rules: Vec::new(),
            trust_headers: false,
        }
    }
}

impl SpamConfig {
    /// Checks the threshold and every operator rule, under `scan.spam.<key>`.
    /// Every bad rule is reported, not only the first.
    pub fn validate(&self, problems: &mut Problems) {
        self.validate_threshold(problems);
        rules::check_rules(&self.rules, "scan.spam.rules", problems);
    }

    pub(super) fn validate_threshold(&self, problems: &mut Problems) {
        if !self.threshold.is_finite() || self.threshold <= 0.0 {
            problems.push(
                "scan.spam.threshold",
                format!(
                    "must be a number above 0, such as 5.0, but is {}",
                    self.threshold
                ),
            );
        }
    }
}

/// One `[[scan.spam.rules]]` entry: a name, a score and exactly one matcher.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    /// Added to the message's total when the rule matches; may be negative.
    pub score: f64,
    /// Header name for a header rule; needs `pattern`.
    #[serde(default)]
    pub header: Option<String>,
    /// Regex matched against each decoded value of `header`.
    #[serde(default)]
    pub pattern: Option<String>,
    /// Regex matched against the decoded text/plain and text/html body parts.
    #[serde(default)]
    pub body: Option<String>,
    /// Host names. A URL in a body part matches when its host is one of
    /// them or a subdomain of one.
    #[serde(default)]
    pub url_host: Option<Vec<String>>,
    /// File-name extensions of attachments, without the dot, case-insensitive.
    #[serde(default)]
    pub attachment_type: Option<Vec<String>>,
    /// Matches when the envelope has at least this many recipients.
    #[serde(default)]
    pub min_recipients: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_rejects_urls_and_bare_ipv6() {
        for address in ["http://127.0.0.1:11333", "::1:11333", "127.0.0.1", "host:0"] {
            assert!(check_host_port(address).is_err(), "{address} was accepted");
        }
        for address in ["127.0.0.1:11333", "[::1]:11333", "rspamd.internal:11333"] {
            assert!(check_host_port(address).is_ok(), "{address} was rejected");
        }
    }

    fn clamd_from_toml(text: &str) -> ClamdConfig {
        match toml::from_str(text) {
            Ok(config) => config,
            Err(error) => panic!("cannot parse {text:?}: {error}"),
        }
    }

    #[test]
    fn clamd_defaults_apply() {
        let config = clamd_from_toml("address = \"127.0.0.1:3310\"");
        assert_eq!(config.timeout, Duration::from_secs(30));
        assert_eq!(config.on_error, OnError::Tempfail);
        assert_eq!(config.on_unscannable, OnUnscannable::Reject);
        assert_eq!(config.max_scan_size, 26_214_400);
        assert_eq!(config.names, default_names());
    }

    #[test]
    fn clamd_names_merge_over_defaults() {
        let config = clamd_from_toml(
            "address = \"/run/clamd.ctl\"\n[names]\n\"PUA.\" = \"virus\"\n\"Win.Test.\" = \"ignore\"\n",
        );
        assert_eq!(config.names.get("PUA."), Some(&NameClass::Virus));
        assert_eq!(config.names.get("Win.Test."), Some(&NameClass::Ignore));
        assert_eq!(
            config.names.get("Heuristics.Phishing."),
            Some(&NameClass::Spam)
        );
    }

    #[test]
    fn clamd_keys_parse() {
        let config = clamd_from_toml(
            "address = \"clamd.example:3310\"\ntimeout = \"2m 5s\"\non_error = \"accept\"\non_unscannable = \"accept\"\nmax_scan_size = 1000\n",
        );
        assert_eq!(config.timeout, Duration::from_secs(125));
        assert_eq!(config.on_error, OnError::Accept);
        assert_eq!(config.on_unscannable, OnUnscannable::Accept);
        assert_eq!(config.max_scan_size, 1000);
    }

    #[test]
    fn clamd_rejects_unknown_key() {
        let result: Result<ClamdConfig, _> =
            toml::from_str("address = \"127.0.0.1:3310\"\ntimeot = \"1s\"\n");
        assert!(result.is_err());
    }

    #[test]
    fn clamd_requires_address() {
        let result: Result<ClamdConfig, _> = toml::from_str("timeout = \"1s\"\n");
        assert!(result.is_err());
    }

    #[test]
    fn classify_longest_prefix_wins() {
        let mut config = ClamdConfig::default();
        config
            .names
            .insert("Heuristics.Phishing.Email.".to_string(), NameClass::Virus);
        assert_eq!(
            config.classify("Heuristics.Phishing.Email.SpoofedDomain"),
            NameClass::Virus
        );
        assert_eq!(
            config.classify("Heuristics.Phishing.URL.Blocked"),
            NameClass::Spam
        );
        assert_eq!(config.classify("PUA.Win.Tool.Foo"), NameClass::Ignore);
        assert_eq!(config.classify("Win.Trojan.Agent-1"), NameClass::Virus);
        assert_eq!(config.classify(""), NameClass::Virus);
    }

    #[test]
    fn clamd_validate_reports_each_key() {
        let mut config = ClamdConfig {
            timeout: Duration::ZERO,
            max_scan_size: 0,
            ..ClamdConfig::default()
        };
        config.names.insert(String::new(), NameClass::Ignore);
        let mut problems = Problems::default();
        config.validate(&mut problems);
        let keys: Vec<&str> = problems.0.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "scan.clamd.address",
                "scan.clamd.timeout",
                "scan.clamd.max_scan_size",
                "scan.clamd.names"
            ]
        );
    }

    #[test]
    fn clamd_address_forms() {
        for good in [
            "127.0.0.1:3310",
            "[::1]:3310",
            "clamd:3310",
            "/run/clamav/clamd.ctl",
        ] {
            assert_eq!(check_address(good, "hint"), Ok(()), "{good}");
        }
        for bad in [
            "",
            "  ",
            "clamd",
            "clamd.sock",
            ":3310",
            "host:0",
            "host:99999",
            "host:x",
        ] {
            assert!(check_address(bad, "hint").is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn spam_defaults_apply() {
        let config: SpamConfig = match toml::from_str("") {
            Ok(config) => config,
            Err(error) => panic!("{error}"),
        };
        assert_eq!(config, SpamConfig::default());
        assert!(config.enabled);
        assert_eq!(config.threshold, 5.0);
        assert_eq!(config.action, SpamAction::Reject);
        assert!(config.default_rules);
    }

    #[test]
    fn spam_threshold_must_be_positive() {
        for threshold in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let config = SpamConfig {
                threshold,
                ..SpamConfig::default()
            };
            let mut problems = Problems::default();
            config.validate(&mut problems);
            assert_eq!(problems.0.len(), 1, "threshold {threshold}");
            assert_eq!(problems.0[0].key, "scan.spam.threshold");
        }
    }
}
