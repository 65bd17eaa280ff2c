//! `[scan.rspamd]`: the rspamd worker every message is sent to, and what
//! each rspamd action means for the message.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::config::Problems;

use super::super::config::{OnError, check_host_port};

/// Class of an rspamd action: the treatment of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionClass {
    /// Spam, exactly like the built-in rules' spam: rejected (or tagged
    /// under `scan.spam.action = "tag"`) and counted as a strike.
    Spam,
    /// Suspect: delivered with an `X-Sendguard-Spam: Suspect` header and
    /// recorded as a `bad_message` event, never counted.
    Tag,
    /// Treated as clean.
    Ignore,
}

/// Actions that never count, whatever the operator maps them to: rspamd
/// uses `soft reject` for rate limits and greylisting, and `no action` for
/// mail it finds clean.
const NEVER_SPAM: [&str; 3] = ["no action", "greylist", "soft reject"];

/// `[scan.rspamd]`: how to reach rspamd and how to read its reply.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RspamdConfig {
    /// `host:port` of rspamd's normal worker (its `bind_socket`, port
    /// 11333 in rspamd's stock configuration), reached over plain HTTP.
    pub address: String,
    /// Limit for one scan: connecting, sending the message and reading the
    /// reply together.
    #[serde(with = "humantime_serde", default = "default_timeout")]
    pub timeout: Duration,
    #[serde(default)]
    pub on_error: OnError,
    /// Class of each rspamd action, by the name rspamd reports (`reject`,
    /// `add header`, `rewrite subject`, ...). The operator's table is
    /// merged over [`default_actions`]; names are compared in lower case,
    /// with `_` read as a space so `add_header` also works.
    #[serde(
        default = "default_actions",
        deserialize_with = "actions_over_defaults"
    )]
    pub actions: BTreeMap<String, ActionClass>,
}

/// Default `timeout` of `[scan.rspamd]`. rspamd 3.4 ends a task after its
/// `task_timeout` (8 s in the stock configuration) and replies with what
/// it has, so this leaves time to transfer a large message.
pub const DEFAULT_RSPAMD_TIMEOUT: Duration = Duration::from_secs(15);

fn default_timeout() -> Duration {
    DEFAULT_RSPAMD_TIMEOUT
}

/// Default action classes: only `reject` counts, because a lockout is
/// costly and stock rspamd puts many legitimate messages into `add header`.
/// An action missing from the table (a custom one, or `discard` and
/// `quarantine`) is tagged.
pub fn default_actions() -> BTreeMap<String, ActionClass> {
    BTreeMap::from([
        ("reject".to_string(), ActionClass::Spam),
        ("add header".to_string(), ActionClass::Tag),
        ("rewrite subject".to_string(), ActionClass::Tag),
        ("soft reject".to_string(), ActionClass::Ignore),
        ("greylist".to_string(), ActionClass::Ignore),
        ("no action".to_string(), ActionClass::Ignore),
    ])
}

/// Returns an action name in the form rspamd reports it: lower case, with
/// spaces between words (written with spaces, `_` or `-` in the config).
pub fn normalize_action(name: &str) -> String {
    name.trim().to_ascii_lowercase().replace(['_', '-'], " ")
}

fn actions_over_defaults<'de, D>(deserializer: D) -> Result<BTreeMap<String, ActionClass>, D::Error>
where
    D: Deserializer<'de>,
{
    let operator = BTreeMap::<String, ActionClass>::deserialize(deserializer)?;
    let mut actions = default_actions();
    actions.extend(
        operator
            .into_iter()
            .map(|(name, class)| (normalize_action(&name), class)),
    );
    Ok(actions)
}

impl Default for RspamdConfig {
    /// Defaults for every key except `address`, which is left empty and has
    /// to be set.
    fn default() -> Self {
        RspamdConfig {
            address: String::new(),
            timeout: DEFAULT_RSPAMD_TIMEOUT,
            on_error: OnError::default(),
            actions: default_actions(),
        }
    }
}

impl RspamdConfig {
    /// Checks the values that deserializing cannot, under `scan.rspamd.<key>`.
    pub fn validate(&self, problems: &mut Problems) {
        if self.address.trim().is_empty() {
            problems.push(
                "scan.rspamd.address",
                "is empty; give the bind_socket of rspamd's normal worker as \"host:port\", such as \"127.0.0.1:11333\"",
            );
        } else if self.address.starts_with('/') {
            problems.push(
                "scan.rspamd.address",
                format!(
                    "{:?} is a unix socket path, but sendguard reaches rspamd over TCP; give \"host:port\"",
                    self.address
                ),
            );
        } else if let Err(message) = check_host_port(&self.address) {
            problems.push("scan.rspamd.address", message);
        }
        if self.timeout.is_zero() {
            problems.push(
                "scan.rspamd.timeout",
                "must be longer than zero, such as \"15s\"",
            );
        }
        for (name, class) in &self.actions {
            if name.is_empty() {
                problems.push(
                    "scan.rspamd.actions",
                    "contains an empty action name; remove it",
                );
            } else if *class == ActionClass::Spam && NEVER_SPAM.contains(&name.as_str()) {
                problems.push(
                    format!("scan.rspamd.actions.\"{name}\""),
                    format!(
                        "is \"spam\", but \"{name}\" never counts as a strike; use \"tag\" or \"ignore\""
                    ),
                );
            }
        }
    }

    /// Returns the class of `action`; an action missing from the table is
    /// tagged.
    pub fn classify(&self, action: &str) -> ActionClass {
        self.actions
            .get(&normalize_action(action))
            .copied()
            .unwrap_or(ActionClass::Tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> RspamdConfig {
        match toml::from_str(text) {
            Ok(config) => config,
            Err(error) => panic!("cannot parse {text:?}: {error}"),
        }
    }

    #[test]
    fn rspamd_defaults_apply() {
        let config = parse("address = \"127.0.0.1:11333\"");
        assert_eq!(config.timeout, Duration::from_secs(15));
        assert_eq!(config.on_error, OnError::Tempfail);
        assert_eq!(config.actions, default_actions());
    }

    #[test]
    fn default_action_classes() {
        let config = RspamdConfig::default();
        let cases = [
            ("reject", ActionClass::Spam),
            ("add header", ActionClass::Tag),
            ("rewrite subject", ActionClass::Tag),
            ("soft reject", ActionClass::Ignore),
            ("greylist", ActionClass::Ignore),
            ("no action", ActionClass::Ignore),
            ("discard", ActionClass::Tag),
            ("Add Header", ActionClass::Tag),
        ];
        for (action, class) in cases {
            assert_eq!(config.classify(action), class, "{action}");
        }
    }

    #[test]
    fn operator_actions_merge_over_defaults() {
        let config = parse(
            "address = \"[::1]:11333\"\n[actions]\nadd_header = \"spam\"\n\"Rewrite Subject\" = \"ignore\"\ndiscard = \"spam\"\n",
        );
        assert_eq!(config.classify("add header"), ActionClass::Spam);
        assert_eq!(config.classify("rewrite subject"), ActionClass::Ignore);
        assert_eq!(config.classify("discard"), ActionClass::Spam);
        assert_eq!(config.classify("reject"), ActionClass::Spam);
        let mut problems = Problems::default();
        config.validate(&mut problems);
        assert!(problems.is_empty(), "{problems}");
    }

    #[test]
    fn rspamd_rejects_unknown_key_and_class() {
        let unknown_key: Result<RspamdConfig, _> =
            toml::from_str("address = \"127.0.0.1:11333\"\nurl = \"http://x\"\n");
        assert!(unknown_key.is_err());
        let unknown_class: Result<RspamdConfig, _> =
            toml::from_str("address = \"127.0.0.1:11333\"\n[actions]\nreject = \"virus\"\n");
        assert!(unknown_class.is_err());
    }

    #[test]
    fn rspamd_validate_reports_each_key() {
        let mut config = parse(
            "address = \"/run/rspamd/normal.sock\"\ntimeout = \"0s\"\n[actions]\ngreylist = \"spam\"\nsoft_reject = \"spam\"\n\"no action\" = \"spam\"\n\"\" = \"tag\"\n",
        );
        let mut problems = Problems::default();
        config.validate(&mut problems);
        let keys: Vec<&str> = problems.0.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "scan.rspamd.address",
                "scan.rspamd.timeout",
                "scan.rspamd.actions",
                "scan.rspamd.actions.\"greylist\"",
                "scan.rspamd.actions.\"no action\"",
                "scan.rspamd.actions.\"soft reject\"",
            ]
        );
        assert!(
            problems.0[0].message.contains("reaches rspamd over TCP"),
            "{}",
            problems.0[0].message
        );

        for (address, expected) in [
            ("", "is empty"),
            ("rspamd", "is not \"host:port\""),
            ("rspamd:0", "invalid port"),
        ] {
            config.address = address.to_string();
            let mut problems = Problems::default();
            config.validate(&mut problems);
            assert!(
                problems.0[0].message.contains(expected),
                "{address:?}: {}",
                problems.0[0].message
            );
        }
    }
}
