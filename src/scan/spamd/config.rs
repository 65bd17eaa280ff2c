//! `[scan.spamd]`: the SpamAssassin daemon every message is sent to.

use std::time::Duration;

use serde::Deserialize;

use crate::config::Problems;

use super::super::config::{OnError, check_address};

/// The spamd command sent for each message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SpamdCommand {
    /// Score and the names of the rules that matched.
    #[default]
    Symbols,
    /// Score only, which makes a shorter reply.
    Check,
}

impl SpamdCommand {
    /// Returns the command's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            SpamdCommand::Symbols => "SYMBOLS",
            SpamdCommand::Check => "CHECK",
        }
    }
}

/// `[scan.spamd]`: how to reach spamd and how to read its reply.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SpamdConfig {
    /// `host:port` for TCP, or an absolute path for a unix socket.
    pub address: String,
    /// Limit for connecting, sending the message and reading the reply
    /// together.
    #[serde(with = "humantime_serde", default = "default_timeout")]
    pub timeout: Duration,
    #[serde(default)]
    pub on_error: OnError,
    #[serde(default)]
    pub command: SpamdCommand,
    /// User name sent in the `User` header, whose preferences spamd
    /// applies; without it spamd uses the user it runs as.
    #[serde(default)]
    pub user: Option<String>,
    /// Score from which a message is spam. Without it spamd's own verdict
    /// (its `required_score`, 5.0 by default) decides.
    #[serde(default)]
    pub threshold: Option<f64>,
}

/// Default `timeout` of `[scan.spamd]`.
pub const DEFAULT_SPAMD_TIMEOUT: Duration = Duration::from_secs(30);

fn default_timeout() -> Duration {
    DEFAULT_SPAMD_TIMEOUT
}

impl Default for SpamdConfig {
    /// Defaults for every key except `address`, which is left empty and has
    /// to be set.
    fn default() -> Self {
        SpamdConfig {
            address: String::new(),
            timeout: DEFAULT_SPAMD_TIMEOUT,
            on_error: OnError::default(),
            command: SpamdCommand::default(),
            user: None,
            threshold: None,
        }
    }
}

impl SpamdConfig {
    /// Checks the values that deserializing cannot, under `scan.spamd.<key>`.
    pub fn validate(&self, problems: &mut Problems) {
        let hint = "give spamd's --listen address as \"host:port\" or its --socketpath as an absolute path";
        if let Err(message) = check_address(&self.address, hint) {
            problems.push("scan.spamd.address", message);
        }
        if self.timeout.is_zero() {
            problems.push(
                "scan.spamd.timeout",
                "must be longer than zero, such as \"30s\"",
            );
        }
        if let Some(user) = &self.user
            && (user.is_empty() || !user.bytes().all(|byte| byte.is_ascii_graphic()))
        {
            problems.push(
                "scan.spamd.user",
                format!(
                    "{user:?} is not a user name; use printable ASCII without spaces, or leave the key out"
                ),
            );
        }
        if let Some(threshold) = self.threshold
            && threshold.is_finite()
            && threshold <= 0.0
        {
            problems.push(
                "scan.spamd.threshold",
                format!(
                    "is {threshold}, so nearly every clean message (score 0 or more) would be \
                     spam and a strike; use spamd's scale, such as 5.0"
                ),
            );
        }
        if let Some(threshold) = self.threshold
            && !threshold.is_finite()
        {
            problems.push(
                "scan.spamd.threshold",
                format!("must be a number such as 5.0, but is {threshold}"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> SpamdConfig {
        match toml::from_str(text) {
            Ok(config) => config,
            Err(error) => panic!("cannot parse {text:?}: {error}"),
        }
    }

    #[test]
    fn spamd_defaults_apply() {
        let config = parse("address = \"127.0.0.1:783\"");
        assert_eq!(config.timeout, Duration::from_secs(30));
        assert_eq!(config.on_error, OnError::Tempfail);
        assert_eq!(config.command, SpamdCommand::Symbols);
        assert_eq!(config.user, None);
        assert_eq!(config.threshold, None);
    }

    #[test]
    fn spamd_keys_parse() {
        let config = parse(
            "address = \"/run/spamd.sock\"\ntimeout = \"5s\"\non_error = \"accept\"\ncommand = \"check\"\nuser = \"sendguard\"\nthreshold = 8.5\n",
        );
        assert_eq!(config.timeout, Duration::from_secs(5));
        assert_eq!(config.on_error, OnError::Accept);
        assert_eq!(config.command, SpamdCommand::Check);
        assert_eq!(config.user.as_deref(), Some("sendguard"));
        assert_eq!(config.threshold, Some(8.5));
    }

    #[test]
    fn spamd_rejects_unknown_command() {
        let result: Result<SpamdConfig, _> =
            toml::from_str("address = \"127.0.0.1:783\"\ncommand = \"report\"\n");
        assert!(result.is_err());
    }

    #[test]
    fn spamd_validate_reports_each_key() {
        let config = SpamdConfig {
            address: "spamd".to_string(),
            timeout: Duration::ZERO,
            user: Some("bad user\r\nX: y".to_string()),
            threshold: Some(f64::NAN),
            ..SpamdConfig::default()
        };
        let mut problems = Problems::default();
        config.validate(&mut problems);
        let keys: Vec<&str> = problems.0.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "scan.spamd.address",
                "scan.spamd.timeout",
                "scan.spamd.user",
                "scan.spamd.threshold"
            ]
        );
    }
}
