//! Message scanning: clamd for viruses, and the built-in rules, rspamd and
//! spamd for spam.
//!
//! [`Scanner::scan`] sends the message to every configured engine (clamd,
//! rspamd and spamd at the same time, the built-in rules meanwhile) and
//! combines their results into one [`Verdict`], as
//! [`ScanReport::deciding`] describes.

mod clamd;
mod config;
mod default_rules;
mod error;
mod net;
mod report;
mod rspamd;
mod rules;
mod spamd;
mod verdict;

pub use config::{
    ClamdConfig, DEFAULT_CLAMD_TIMEOUT, DEFAULT_MAX_SCAN_SIZE, DEFAULT_SPAM_THRESHOLD, NameClass,
    OnError, OnUnscannable, RuleConfig, SpamAction, SpamConfig, default_names,
};
pub use default_rules::DEFAULT_RULES_TOML;
pub use error::{ReplyError, ScanError};
pub use report::{EngineResult, ScanReport};
pub use rspamd::{
    ActionClass, CheckReply, DEFAULT_RSPAMD_TIMEOUT, RspamdConfig, default_actions,
    parse_reply as parse_rspamd_reply,
};
pub use rules::{GTUBE, GTUBE_RULE, GTUBE_SCORE};
pub use spamd::{
    DEFAULT_SPAMD_TIMEOUT, SpamdCommand, SpamdConfig, SpamdReply, parse_reply as parse_spamd_reply,
};
pub use verdict::Verdict;

use std::net::IpAddr;
use std::time::Instant;

use crate::config::ScanConfig;
use clamd::ClamdFinding;
use rules::RuleSet;

/// A message to scan.
#[derive(Debug, Clone, Copy)]
pub struct ScanInput<'a> {
    /// The whole message as received in DATA, headers and body.
    pub message: &'a [u8],
    /// Number of envelope recipients (RCPT TO commands accepted).
    pub recipients: usize,
    /// The SMTP transaction the message came in, for engines that take it
    /// (rspamd); `None` for a message scanned outside one, as by
    /// `sendguard check`.
    pub envelope: Option<Envelope<'a>>,
}

/// The SMTP facts of a message that rspamd takes as request headers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Envelope<'a> {
    /// sendguard's transaction id, sent as the queue id.
    pub transaction: &'a str,
    /// Envelope sender path with angle brackets, `<>` for the null sender;
    /// empty when not known.
    pub sender: &'a str,
    /// Accepted recipient paths with angle brackets.
    pub recipients: &'a [String],
    pub client: Option<IpAddr>,
    /// The client's host name when known: from a trusted peer's XFORWARD or
    /// XCLIENT `NAME`, or from the MTA's milter connect.
    pub client_name: Option<&'a str>,
    pub helo: Option<&'a str>,
    /// The SASL login.
    pub login: Option<&'a str>,
}

/// Scans messages with every configured engine. Cheap to share in an
/// `Arc`: it contains the configuration, the compiled rules, the kept clamd
/// sessions and rspamd's connection pool, and opens a new spamd connection
/// per scan.
#[derive(Debug)]
pub struct Scanner {
    clamd: Option<ClamdConfig>,
    clamd_sessions: clamd::ClamdSessions,
    spam: SpamConfig,
    rules: RuleSet,
    rspamd: Option<rspamd::Client>,
    spamd: Option<SpamdConfig>,
}

impl Scanner {
    /// Builds a scanner with clamd and the built-in rules only; see
    /// [`Scanner::from_config`].
    pub fn new(clamd: Option<&ClamdConfig>, spam: &SpamConfig) -> Result<Scanner, String> {
        Scanner::from_config(&ScanConfig {
            clamd: clamd.cloned(),
            spam: spam.clone(),
            ..ScanConfig::default()
        })
    }

    /// Validates the configuration, compiles the rules and sets up the
    /// rspamd client. The error lists every problem, each with its key,
    /// such as `scan.spam.rules[2].body: rule "X": invalid regex: ...`.
    pub fn from_config(config: &ScanConfig) -> Result<Scanner, String> {
        let mut problems = crate::config::Problems::default();
        if let Some(clamd) = &config.clamd {
            clamd.validate(&mut problems);
        }
        config.spam.validate_threshold(&mut problems);
        if let Some(rspamd) = &config.rspamd {
            rspamd.validate(&mut problems);
        }
        if let Some(spamd) = &config.spamd {
            spamd.validate(&mut problems);
        }
        let rules = match RuleSet::build(&config.spam) {
            Ok(rules) => Some(rules),
            Err(rule_problems) => {
                problems.0.extend(rule_problems.0);
                None
            }
        };
        let (Some(rules), true) = (rules, problems.is_empty()) else {
            return Err(problems.to_string());
        };
        let rspamd = config
            .rspamd
            .as_ref()
            .map(rspamd::Client::new)
            .transpose()?;
        Ok(Scanner {
            clamd_sessions: match &config.clamd {
                Some(clamd) => clamd::ClamdSessions::new(clamd.sessions, clamd.session_idle_time),
                None => clamd::ClamdSessions::new(0, std::time::Duration::ZERO),
            },
            clamd: config.clamd.clone(),
            spam: config.spam.clone(),
            rules,
            rspamd,
            spamd: config.spamd.clone(),
        })
    }

    pub fn clamd(&self) -> Option<&ClamdConfig> {
        self.clamd.as_ref()
    }

    pub fn spam(&self) -> &SpamConfig {
        &self.spam
    }

    pub fn rspamd(&self) -> Option<&RspamdConfig> {
        self.rspamd.as_ref().map(rspamd::Client::config)
    }

    pub fn spamd(&self) -> Option<&SpamdConfig> {
        self.spamd.as_ref()
    }

    /// Number of built-in rules in use (default and operator rules, GTUBE
    /// not counted), for the startup log.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Scans one message and combines the engines' results. Returns `Err`
    /// when an engine failed under `on_error = "tempfail"` and no engine
    /// found a virus or spam. Failures that do not decide the message are
    /// logged here, once each; the deciding one is the caller's to log.
    pub async fn scan(&self, input: ScanInput<'_>) -> Result<Verdict, ScanError> {
        let report = self.report(input).await;
        log_undecisive_failures(&report, &input);
        report.into_verdict()
    }

    /// Scans one message with every configured engine and returns each
    /// engine's result, without logging failures.
    pub async fn report(&self, input: ScanInput<'_>) -> ScanReport {
        let (clamd, rspamd, spamd, local) = tokio::join!(
            self.ask_clamd(input.message),
            self.ask_rspamd(&input),
            self.ask_spamd(input.message),
            // Listed last so the network engines have their requests on the
            // way while the rules run on this task.
            async { self.ask_local(&input) },
        );
        let mut results = Vec::with_capacity(5);
        results.extend(clamd);
        results.extend(local);
        results.extend(rspamd);
        results.extend(spamd);
        ScanReport { results }
    }

    /// Closes kept clamd sessions that are past their idle time or that
    /// clamd ended.
    pub fn remove_stale_sessions(&self) {
        self.clamd_sessions.remove_stale();
    }

    /// Returns clamd's VERSION reply, or `None` when no clamd is configured.
    pub async fn ping(&self) -> Result<Option<String>, ScanError> {
        match &self.clamd {
            None => Ok(None),
            Some(config) => clamd::version(config).await.map(Some),
        }
    }

    /// Pings rspamd and spamd, for the log at start. Returns each
    /// configured engine's name, address and reply.
    pub async fn ping_spam_engines(
        &self,
    ) -> Vec<(&'static str, String, Result<String, ScanError>)> {
        let mut replies = Vec::new();
        if let Some(client) = &self.rspamd {
            replies.push((
                "rspamd",
                client.config().address.clone(),
                client.ping().await,
            ));
        }
        if let Some(config) = &self.spamd {
            replies.push(("spamd", config.address.clone(), spamd::ping(config).await));
        }
        replies
    }

    /// Runs clamd, or returns `None` when it is not configured.
    async fn ask_clamd(&self, message: &[u8]) -> Option<EngineResult> {
        let config = self.clamd.as_ref()?;
        let started = Instant::now();
        let size = message.len() as u64;
        let result = if size > config.max_scan_size {
            Ok(Verdict::Unscannable {
                reason: format!(
                    "message is {size} bytes, above max_scan_size {}",
                    config.max_scan_size
                ),
            })
        } else {
            clamd::scan(config, &self.clamd_sessions, message)
                .await
                .map(|finding| match finding {
                    ClamdFinding::Clean => Verdict::Clean,
                    ClamdFinding::Virus(name) => Verdict::Virus { name },
                    ClamdFinding::Spam(name) => Verdict::Spam {
                        engine: "clamd".to_string(),
                        score: None,
                        action: None,
                        rules: vec![name],
                    },
                    ClamdFinding::Unscannable(reason) => Verdict::Unscannable { reason },
                })
        };
        Some(EngineResult {
            engine: "clamd",
            result,
            on_error: config.on_error,
            elapsed: started.elapsed(),
        })
    }

    /// Runs rspamd, or returns `None` when it is not configured.
    async fn ask_rspamd(&self, input: &ScanInput<'_>) -> Option<EngineResult> {
        let client = self.rspamd.as_ref()?;
        let started = Instant::now();
        let result = client
            .check(input.message, input.envelope.as_ref())
            .await
            .map(|reply| rspamd::verdict(client.config(), &reply));
        Some(EngineResult {
            engine: "rspamd",
            result,
            on_error: client.config().on_error,
            elapsed: started.elapsed(),
        })
    }

    /// Runs spamd, or returns `None` when it is not configured.
    async fn ask_spamd(&self, message: &[u8]) -> Option<EngineResult> {
        let config = self.spamd.as_ref()?;
        let started = Instant::now();
        let result = spamd::check(config, message)
            .await
            .map(|reply| spamd::verdict(config, &reply));
        Some(EngineResult {
            engine: "spamd",
            result,
            on_error: config.on_error,
            elapsed: started.elapsed(),
        })
    }

    /// Runs the checks inside sendguard: the spam marks of an earlier
    /// filter (when `trust_headers` is on) and the built-in rules, when
    /// `scan.spam` is enabled.
    fn ask_local(&self, input: &ScanInput<'_>) -> Vec<EngineResult> {
        let mut results = Vec::new();
        if !self.spam.enabled {
            return results;
        }
        let local_result = |engine, verdict, started: Instant| EngineResult {
            engine,
            result: Ok(verdict),
            on_error: OnError::Tempfail,
            elapsed: started.elapsed(),
        };

        if self.spam.trust_headers {
            let started = Instant::now();
            let verdict = match upstream_spam_header(input.message) {
                Some(header) => Verdict::Spam {
                    engine: "upstream header".to_string(),
                    score: None,
                    action: None,
                    rules: vec![header],
                },
                None => Verdict::Clean,
            };
            results.push(local_result("upstream header", verdict, started));
        }

        let started = Instant::now();
        let hits = self.rules.evaluate(input.message, input.recipients);
        let verdict = if hits.score >= self.spam.threshold {
            Verdict::Spam {
                engine: "builtin".to_string(),
                score: Some(hits.score),
                action: None,
                rules: hits.rules,
            }
        } else {
            if !hits.rules.is_empty() {
                tracing::debug!(
                    score = hits.score,
                    threshold = self.spam.threshold,
                    rules = ?hits.rules,
                    "built-in rules matched below the spam threshold"
                );
            }
            Verdict::Clean
        };
        results.push(local_result("builtin", verdict, started));
        results
    }
}

/// Logs each failed engine whose failure does not decide the message:
/// under `on_error = "accept"`, or outranked by another engine's virus or
/// spam.
fn log_undecisive_failures(report: &ScanReport, input: &ScanInput<'_>) {
    let deciding = report.deciding();
    let transaction = input.envelope.map_or("-", |envelope| envelope.transaction);
    let client = input
        .envelope
        .and_then(|envelope| envelope.client)
        .map_or_else(|| "-".to_string(), |client| client.to_string());
    for (index, engine) in report.results.iter().enumerate() {
        let Err(error) = &engine.result else {
            continue;
        };
        if Some(index) == deciding {
            continue;
        }
        if engine.on_error == OnError::Accept {
            tracing::warn!(engine = engine.engine, transaction, client, %error,
                "scan engine failed; the other engines decide, as its on_error is accept");
        } else {
            tracing::warn!(engine = engine.engine, transaction, client, %error,
                                "scan engine failed; another engine's result or failure decides the message");
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
