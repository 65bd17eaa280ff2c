//! Message scanning: clamd for viruses and the built-in rules for spam.
//!
//! [`Scanner::scan`] sends the message to clamd (when configured and the
//! message fits `max_scan_size`), then scores it with the built-in rules,
//! and returns one [`Verdict`].

mod clamd;
mod config;
mod default_rules;
mod error;
mod net;
mod rules;
mod verdict;

pub use config::{
    ClamdConfig, DEFAULT_CLAMD_TIMEOUT, DEFAULT_MAX_SCAN_SIZE, DEFAULT_SPAM_THRESHOLD, NameClass,
    OnError, OnUnscannable, RuleConfig, SpamAction, SpamConfig, default_names,
};
pub use default_rules::DEFAULT_RULES_TOML;
pub use error::ScanError;
pub use rules::{GTUBE, GTUBE_RULE, GTUBE_SCORE};
pub use verdict::Verdict;

use clamd::ClamdFinding;
use rules::RuleSet;

/// A message to scan.
#[derive(Debug, Clone, Copy)]
pub struct ScanInput<'a> {
    /// The whole message as received in DATA, headers and body.
    pub message: &'a [u8],
    /// Number of envelope recipients (RCPT TO commands accepted).
    pub recipients: usize,
}

/// Scans messages with clamd and the built-in rules. Cheap to share in an
/// `Arc`: it holds only the configuration and the compiled rules, and opens
/// a new clamd connection per scan.
#[derive(Debug)]
pub struct Scanner {
    clamd: Option<ClamdConfig>,
    spam: SpamConfig,
    rules: RuleSet,
}

impl Scanner {
    /// Validates the configuration and compiles the rules. The error lists
    /// every problem, each with its key, such as
    /// `scan.spam.rules[2].body: rule "X": invalid regex: ...`.
    pub fn new(clamd: Option<&ClamdConfig>, spam: &SpamConfig) -> Result<Scanner, String> {
        let mut problems = crate::config::Problems::default();
        if let Some(clamd) = clamd {
            clamd.validate(&mut problems);
        }
        spam.validate_threshold(&mut problems);
        let rules = match RuleSet::build(spam) {
            Ok(rules) => Some(rules),
            Err(rule_problems) => {
                problems.0.extend(rule_problems.0);
                None
            }
        };
        match rules {
            Some(rules) if problems.is_empty() => Ok(Scanner {
                clamd: clamd.cloned(),
                spam: spam.clone(),
                rules,
            }),
            _ => Err(problems.to_string()),
        }
    }

    pub fn clamd(&self) -> Option<&ClamdConfig> {
        self.clamd.as_ref()
    }

    pub fn spam(&self) -> &SpamConfig {
        &self.spam
    }

    /// Number of built-in rules in use (default and operator rules, GTUBE
    /// not counted), for the startup log.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Scans one message. Returns `Err` only when clamd failed and
    /// `on_error` is `tempfail`. Under `on_error = "accept"` the failure is
    /// logged and the message is judged by the built-in rules alone.
    pub async fn scan(&self, input: ScanInput<'_>) -> Result<Verdict, ScanError> {
        let clamd_finding = self.scan_with_clamd(input.message).await?;
        if let Some(ClamdFinding::Virus(name)) = clamd_finding {
            return Ok(Verdict::Virus { name });
        }

        if self.spam.enabled
            && self.spam.trust_headers
            && let Some(header) = upstream_spam_header(input.message)
        {
            return Ok(Verdict::Spam {
                engine: "upstream header".to_string(),
                score: None,
                rules: vec![header],
            });
        }

        let hits = self.rules.evaluate(input.message, input.recipients);
        if self.spam.enabled && hits.score >= self.spam.threshold {
            return Ok(Verdict::Spam {
                engine: "builtin".to_string(),
                score: Some(hits.score),
                rules: hits.rules,
            });
        }
        if !hits.rules.is_empty() {
            tracing::debug!(
                score = hits.score,
                threshold = self.spam.threshold,
                rules = ?hits.rules,
                "built-in rules matched below the spam threshold"
            );
        }

        Ok(match clamd_finding {
            Some(ClamdFinding::Spam(name)) => Verdict::Spam {
                engine: "clamd".to_string(),
                score: None,
                rules: vec![name],
            },
            Some(ClamdFinding::Unscannable(reason)) => Verdict::Unscannable { reason },
            Some(ClamdFinding::Virus(name)) => Verdict::Virus { name },
            Some(ClamdFinding::Clean) | None => Verdict::Clean,
        })
    }

    /// Returns clamd's VERSION reply, or `None` when no clamd is configured.
    pub async fn ping(&self) -> Result<Option<String>, ScanError> {
        match &self.clamd {
            None => Ok(None),
            Some(config) => clamd::version(config).await.map(Some),
        }
    }

    /// Runs the clamd part of a scan. Returns `None` when clamd is not
    /// configured or failed under `on_error = "accept"`.
    async fn scan_with_clamd(&self, message: &[u8]) -> Result<Option<ClamdFinding>, ScanError> {
        let Some(config) = &self.clamd else {
            return Ok(None);
        };
        let size = message.len() as u64;
        if size > config.max_scan_size {
            return Ok(Some(ClamdFinding::Unscannable(format!(
                "message is {size} bytes, above max_scan_size {}",
                config.max_scan_size
            ))));
        }

        match clamd::scan(config, message).await {
            Ok(finding) => Ok(Some(finding)),
            Err(error) => match config.on_error {
                OnError::Tempfail => Err(error),
                OnError::Accept => {
                    tracing::warn!(
                        clamd = %config.address,
                        %error,
                        "clamd scan failed; relaying on the built-in rules alone as on_error is accept"
                    );
                    Ok(None)
                }
            },
        }
    }
}

#[cfg(test)]
mod tests;

/// Returns the name of the header by which an earlier filter marked the
/// message as spam: `X-Spam-Flag: YES`, `X-Spam-Status: Yes, ...` or
/// `X-Spam: Yes`. Only the top-level header block is read, so a forwarded
/// message attached below does not count.
fn upstream_spam_header(message: &[u8]) -> Option<String> {
    let end = message
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .unwrap_or(message.len());
    let headers = String::from_utf8_lossy(&message[..end]);
    for line in headers.split("\r\n") {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        let value = value.trim_start();
        let says_yes = |text: &str| {
            text.get(..3)
                .is_some_and(|word| word.eq_ignore_ascii_case("yes"))
        };
        let marked = match name.to_ascii_lowercase().as_str() {
            "x-spam-flag" | "x-spam" => says_yes(value),
            "x-spam-status" => {
                says_yes(value)
                    && value
                        .get(3..4)
                        .is_none_or(|next| next == "," || next == " ")
            }
            _ => false,
        };
        if marked {
            return Some(name.to_string());
        }
    }
    None
}

#[cfg(test)]
mod header_tests {
    use super::upstream_spam_header;

    #[test]
    fn spam_headers_recognised() {
        let cases: [(&[u8], Option<&str>); 7] = [
            (
                b"X-Spam-Flag: YES\r\nSubject: x\r\n\r\nbody",
                Some("X-Spam-Flag"),
            ),
            (
                b"X-Spam-Status: Yes, score=9.1\r\n\r\nbody",
                Some("X-Spam-Status"),
            ),
            (b"x-spam: yes\r\n\r\n", Some("x-spam")),
            (b"X-Spam-Status: No, score=0.1\r\n\r\n", None),
            (b"X-Spam-Flag: NO\r\n\r\n", None),
            (b"Subject: x\r\n\r\nX-Spam-Flag: YES\r\n", None),
            (b"X-Spam-Statusy: Yes\r\n\r\n", None),
        ];
        for (message, expected) in cases {
            assert_eq!(
                upstream_spam_header(message).as_deref(),
                expected,
                "{:?}",
                String::from_utf8_lossy(message)
            );
        }
    }
}
