//! The candidate policy of a simulation: `[policy]` and `[identity]`
//! tables laid over the configuration in force, plus exemptions to try.

use super::{Config, IdentityConfig, PolicyConfig, Problems, decode};
use serde::Deserialize;

/// Sections of the configuration file other than `[policy]` and
/// `[identity]`. A candidate cannot change them, because the replay reuses
/// the recorded verdicts and envelopes.
const CONFIG_ONLY_SECTIONS: [&str; 12] = [
    "smtp",
    "upstream",
    "scan",
    "directory",
    "store",
    "milter",
    "synchronized_security",
    "alerts",
    "actions",
    "admin",
    "events",
    "devices",
];

/// A policy to try on recorded history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The current `[policy]` with the candidate's keys laid over it.
    pub policy: PolicyConfig,
    /// The current `[identity]` with the candidate's keys laid over it.
    pub identity: IdentityConfig,
    /// Whether the candidate sets `policy.mode`. Without it, each strike is
    /// replayed in the mode that was recorded with it.
    pub sets_mode: bool,
    /// Exemptions that apply over the whole simulated period, on top of
    /// the recorded ones.
    pub exemptions: CandidateExemptions,
}

/// `[exemptions]` of a candidate file: senders, logins and client networks
/// whose bad messages never count.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CandidateExemptions {
    /// Mailboxes, in any spelling; they are canonicalised.
    pub senders: Vec<String>,
    /// SASL logins, compared without case.
    pub logins: Vec<String>,
    /// Client networks, such as `192.0.2.0/24`.
    pub networks: Vec<ipnet::IpNet>,
    /// Leave out the exemptions recorded in the events, to see what they
    /// prevented. Off by default: recorded exemptions apply at their times.
    pub ignore_recorded: bool,
}

impl Config {
    /// Parses a candidate file: `[policy]`, and optionally `[identity]` and
    /// `[exemptions]`. Keys the candidate leaves out keep this
    /// configuration's values, so a file with only `threshold = 3` tries
    /// the current policy with a lower threshold.
    ///
    /// # Errors
    /// Every problem found, each with its key path, as `config check`
    /// reports them.
    pub fn candidate(&self, text: &str) -> Result<Candidate, Problems> {
        let mut problems = Problems::default();
        let mut root: toml::Table = match text.parse() {
            Ok(root) => root,
            Err(error) => {
                problems.push("(file)", format!("invalid TOML: {error}"));
                return Err(problems);
            }
        };

        let mut given_policy = root.remove("policy");
        let sets_mode = given_policy
            .as_ref()
            .and_then(toml::Value::as_table)
            .is_some_and(|table| table.contains_key("mode"));
        // A key left out keeps the current value, so `forgive_after = "off"`
        // is how a candidate turns forgiveness off.
        let forgiveness_off = given_policy
            .as_mut()
            .and_then(toml::Value::as_table_mut)
            .is_some_and(|table| {
                let off = table.get("forgive_after").and_then(toml::Value::as_str) == Some("off");
                if off {
                    table.remove("forgive_after");
                }
                off
            });
        let mut policy = overlay(&self.policy, given_policy, "policy", &mut problems);
        if forgiveness_off && let Some(policy) = &mut policy {
            policy.forgive_after = None;
        }
        let identity = overlay(
            &self.identity,
            root.remove("identity"),
            "identity",
            &mut problems,
        );
        let exemptions = match root.remove("exemptions") {
            None => Some(CandidateExemptions::default()),
            Some(value) => decode::<CandidateExemptions>(value, "exemptions", &mut problems),
        };
        for unknown in root.keys() {
            let message = if CONFIG_ONLY_SECTIONS.contains(&unknown.as_str()) {
                "is a configuration section that a simulation cannot change, because the \
                 replay reuses the recorded verdicts. Remove it and keep only [policy], \
                 [identity] and [exemptions], or just the keys to change"
            } else {
                "unknown section or key; a candidate file holds [policy], [identity] and \
                 [exemptions]"
            };
            problems.push(unknown.as_str(), message);
        }
        if let Some(policy) = &policy {
            policy.validate(&mut problems);
        }
        // In a candidate, leaving forgive_after out keeps the current value.
        for problem in &mut problems.0 {
            if problem.key == "policy.forgive_after" && problem.message.contains("leave it out") {
                problem.message =
                    "must be longer than zero, such as \"90d\"; write \"off\" to try the \
                     policy without forgiveness"
                        .to_string();
            }
        }

        match (policy, identity, exemptions) {
            (Some(policy), Some(identity), Some(exemptions)) if problems.is_empty() => {
                Ok(Candidate {
                    policy,
                    identity,
                    sets_mode,
                    exemptions,
                })
            }
            _ => Err(problems),
        }
    }
}

/// Lays the candidate's `given` table over `current` and decodes the result
/// with the configuration's own decoder, so unknown keys and bad values are
/// reported as `config check` reports them.
fn overlay<T>(
    current: &T,
    given: Option<toml::Value>,
    key: &str,
    problems: &mut Problems,
) -> Option<T>
where
    T: serde::Serialize + serde::de::DeserializeOwned + Clone,
{
    let Some(given) = given else {
        return Some(current.clone());
    };
    let Some(given) = given.as_table() else {
        problems.push(key, "must be a table, such as [section] with keys below it");
        return None;
    };
    let mut merged = match toml::Value::try_from(current) {
        Ok(toml::Value::Table(table)) => table,
        _ => toml::Table::new(),
    };
    for (name, value) in given {
        merged.insert(name.clone(), value.clone());
    }
    decode::<T>(toml::Value::Table(merged), key, problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Unauthenticated;
    use std::time::Duration;

    fn current() -> Config {
        Config::parse(
            "[upstream]\naddress = \"127.0.0.1:25\"\n[store]\npath = \"/tmp/x.db\"\n\
             [policy]\nthreshold = 4\nwindow = \"5m\"\nfirst_lockout = \"2h\"\n",
        )
        .expect("valid config")
    }

    #[test]
    fn candidate_keeps_unset_keys() {
        let candidate = current()
            .candidate("[policy]\nthreshold = 2\n")
            .expect("valid candidate");
        assert_eq!(candidate.policy.threshold, 2);
        assert_eq!(candidate.policy.window, Duration::from_secs(300));
        assert_eq!(candidate.policy.first_lockout, Duration::from_secs(7200));
        assert!(!candidate.sets_mode);
        assert_eq!(candidate.identity, IdentityConfig::default());
    }

    #[test]
    fn candidate_sets_identity_and_exemptions() {
        let candidate = current()
            .candidate(
                "[identity]\nunauthenticated = \"client-and-sender\"\n\
                 [exemptions]\nsenders = [\"News@Example.org\"]\nnetworks = [\"192.0.2.0/24\"]\n",
            )
            .expect("valid candidate");
        assert_eq!(
            candidate.identity.unauthenticated,
            Unauthenticated::ClientAndSender
        );
        assert_eq!(candidate.exemptions.senders, ["News@Example.org"]);
        assert_eq!(candidate.exemptions.networks.len(), 1);
    }

    #[test]
    fn candidate_problems_name_keys() {
        let problems = current()
            .candidate(
                "[policy]\nthresold = 2\nwindow = \"ten minutes\"\nthreshold = 0\n[upstream]\n",
            )
            .expect_err("invalid candidate");
        let keys: Vec<&str> = problems
            .0
            .iter()
            .map(|problem| problem.key.as_str())
            .collect();
        assert!(keys.contains(&"policy.thresold"), "{problems}");
        assert!(keys.contains(&"policy.window"), "{problems}");
        assert!(keys.contains(&"upstream"), "{problems}");
    }

    #[test]
    fn candidate_config_sections_explained() {
        let problems = current()
            .candidate(
                "[smtp]\nlisten = \"127.0.0.1:2525\"\n[scan.spam]\nthreshold = 3.0\n\
                 [polcy]\nthreshold = 2\n",
            )
            .expect_err("invalid candidate");
        let message = |key: &str| {
            problems
                .0
                .iter()
                .find(|problem| problem.key == key)
                .map(ToString::to_string)
                .unwrap_or_default()
        };
        assert!(message("smtp").contains("cannot change"), "{problems}");
        assert!(message("scan").contains("cannot change"), "{problems}");
        assert!(message("polcy").contains("unknown section"), "{problems}");
    }

    #[test]
    fn candidate_turns_forgiveness_off() {
        let config = Config::parse(
            "[upstream]\naddress = \"127.0.0.1:25\"\n[store]\npath = \"/tmp/x.db\"\n\
             [policy]\nforgive_after = \"90d\"\n",
        )
        .expect("valid config");

        let kept = config
            .candidate("[policy]\nthreshold = 2\n")
            .expect("valid");
        assert_eq!(
            kept.policy.forgive_after,
            Some(Duration::from_secs(90 * 86400))
        );
        let off = config
            .candidate("[policy]\nforgive_after = \"off\"\n")
            .expect("valid candidate");
        assert_eq!(off.policy.forgive_after, None);
        let zero = config
            .candidate("[policy]\nforgive_after = \"0s\"\n")
            .expect_err("invalid candidate");
        assert!(zero.to_string().contains("write \"off\""), "{zero}");
    }

    #[test]
    fn candidate_zero_threshold_rejected() {
        let problems = current()
            .candidate("[policy]\nthreshold = 0\n")
            .expect_err("invalid candidate");
        assert_eq!(problems.0[0].key, "policy.threshold", "{problems}");
    }
}
