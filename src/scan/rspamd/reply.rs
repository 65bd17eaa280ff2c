//! Parsing rspamd's JSON reply to `/checkv2` (rspamd 3.4) and turning it
//! into a verdict.
//!
//! Only `action`, `score`, `required_score`, `is_skipped` and each symbol's
//! `score` are read; other keys (`messages`, `milter`, `urls`, ...) are
//! ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, OnceLock};

use serde::Deserialize;

use super::super::error::ReplyError;
use super::super::verdict::Verdict;
use super::config::{ActionClass, RspamdConfig, normalize_action};

/// Most symbols a verdict names.
const MAX_SYMBOLS: usize = 5;

/// rspamd's reply for one message.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckReply {
    /// rspamd's action, such as `reject` or `add header`.
    pub action: String,
    pub score: f64,
    /// The score of rspamd's `reject` action, when it reports one.
    pub required_score: Option<f64>,
    /// Whether rspamd stopped early, as it does for GTUBE.
    pub is_skipped: bool,
    /// Every symbol with its score, the highest score first.
    pub symbols: Vec<(String, f64)>,
}

#[derive(Deserialize)]
struct RawReply {
    action: Option<String>,
    score: Option<f64>,
    required_score: Option<f64>,
    #[serde(default)]
    is_skipped: bool,
    #[serde(default)]
    symbols: BTreeMap<String, RawSymbol>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct RawSymbol {
    #[serde(default)]
    score: f64,
}

/// Parses a `/checkv2` reply with HTTP status `status`.
pub fn parse_reply(status: u16, body: &[u8]) -> Result<CheckReply, ReplyError> {
    let text = String::from_utf8_lossy(body);
    if !(200..300).contains(&status) {
        // rspamd sends its errors as {"error": "..."}.
        let message = serde_json::from_slice::<RawReply>(body)
            .ok()
            .and_then(|reply| reply.error)
            .unwrap_or_else(|| text.trim().to_string());
        return Err(ReplyError::Reported(format!("HTTP {status}: {message}")));
    }
    let raw: RawReply = serde_json::from_slice(body)
        .map_err(|error| ReplyError::Malformed(format!("invalid JSON ({error}): {text}")))?;
    if let Some(message) = raw.error {
        return Err(ReplyError::Reported(message));
    }
    let (Some(action), Some(score)) = (raw.action, raw.score) else {
        return Err(ReplyError::Malformed(format!(
            "no \"action\" or \"score\": {text}"
        )));
    };
    if action.trim().is_empty() {
        return Err(ReplyError::Malformed(format!("empty \"action\": {text}")));
    }

    let mut symbols: Vec<(String, f64)> = raw
        .symbols
        .into_iter()
        .map(|(name, symbol)| (name, symbol.score))
        .collect();
    // Highest score first; equal scores keep the name order.
    symbols.sort_by(|left, right| right.1.total_cmp(&left.1));
    Ok(CheckReply {
        action,
        score,
        required_score: raw.required_score,
        is_skipped: raw.is_skipped,
        symbols,
    })
}

/// Returns the verdict for a reply under the configured action classes.
pub fn verdict(config: &RspamdConfig, reply: &CheckReply) -> Verdict {
    let class = config.classify(&reply.action);
    if !config
        .actions
        .contains_key(&normalize_action(&reply.action))
    {
        warn_unknown_action(&reply.action);
    }
    let engine = "rspamd".to_string();
    let score = Some(reply.score);
    let action = Some(reply.action.clone());
    let rules = top_symbols(&reply.symbols);
    match class {
        ActionClass::Spam => Verdict::Spam {
            engine,
            score,
            action,
            rules,
        },
        ActionClass::Tag => Verdict::Suspect {
            engine,
            score,
            action,
            rules,
        },
        ActionClass::Ignore => Verdict::Clean,
    }
}

/// Names the symbols that pushed the score up, as `NAME(score)`, at most
/// [`MAX_SYMBOLS`]. When no symbol scored above zero (GTUBE is reported
/// with score 0 and the `reject` action), the symbols with score 0 are
/// named instead, without a score.
fn top_symbols(symbols: &[(String, f64)]) -> Vec<String> {
    let positive: Vec<String> = symbols
        .iter()
        .filter(|(_, score)| *score > 0.0)
        .take(MAX_SYMBOLS)
        .map(|(name, score)| format!("{name}({})", format_score(*score)))
        .collect();
    if !positive.is_empty() {
        return positive;
    }
    symbols
        .iter()
        .filter(|(_, score)| *score == 0.0)
        .take(MAX_SYMBOLS)
        .map(|(name, _)| name.clone())
        .collect()
}

/// Formats a symbol score with at most two decimals and no trailing zeros.
fn format_score(score: f64) -> String {
    let text = format!("{score:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Logs an action missing from `scan.rspamd.actions` once per name, so a
/// custom action does not log once per message.
fn warn_unknown_action(action: &str) {
    static WARNED: OnceLock<Mutex<BTreeSet<String>>> = OnceLock::new();
    let mut warned = match WARNED.get_or_init(Default::default).lock() {
        Ok(warned) => warned,
        Err(poisoned) => poisoned.into_inner(),
    };
    if warned.insert(action.to_string()) {
        tracing::warn!(
            engine = "rspamd",
            action,
            "rspamd action is not in scan.rspamd.actions; messages with it are tagged, not counted \
             (this is logged once per action)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// rspamd 3.4's reply to GTUBE, as captured from Debian 12's package.
    const GTUBE_REPLY: &str = r#"{"is_skipped":true,"score":15.0,"required_score":15.0,"action":"reject","symbols":{"GTUBE":{"name":"GTUBE","score":0.0,"metric_score":0.0}},"messages":{"smtp_message":"Gtube pattern"},"message-id":"gtube.1@example.org","time_real":0.000405}"#;

    /// A reply with several scored symbols, like rspamd 3.4's for a message
    /// without headers.
    const ADD_HEADER_REPLY: &str = r#"{"is_skipped":false,"score":10.4,"required_score":15.0,"action":"add header","symbols":{"ARC_NA":{"name":"ARC_NA","score":0.0},"MISSING_FROM":{"name":"MISSING_FROM","score":2.0},"MISSING_TO":{"name":"MISSING_TO","score":2.0},"MISSING_SUBJECT":{"name":"MISSING_SUBJECT","score":0.5},"MISSING_DATE":{"name":"MISSING_DATE","score":1.0},"MIME_GOOD":{"name":"MIME_GOOD","score":-0.1,"options":["text/plain"]},"HFILTER_HOSTNAME_UNKNOWN":{"name":"HFILTER_HOSTNAME_UNKNOWN","score":2.5},"MISSING_MID":{"name":"MISSING_MID","score":2.5}},"messages":{},"message-id":"undef","time_real":0.00178,"milter":{"remove_headers":{"X-Spam":0}}}"#;

    fn parse(body: &str) -> CheckReply {
        match parse_reply(200, body.as_bytes()) {
            Ok(reply) => reply,
            Err(error) => panic!("{body} gave {error:?}"),
        }
    }

    #[test]
    fn gtube_reply_parses() {
        let reply = parse(GTUBE_REPLY);
        assert_eq!(
            reply,
            CheckReply {
                action: "reject".to_string(),
                score: 15.0,
                required_score: Some(15.0),
                is_skipped: true,
                symbols: vec![("GTUBE".to_string(), 0.0)],
            }
        );
    }

    #[test]
    fn symbols_sorted_by_score() {
        let reply = parse(ADD_HEADER_REPLY);
        let names: Vec<&str> = reply
            .symbols
            .iter()
            .map(|(name, _)| name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "HFILTER_HOSTNAME_UNKNOWN",
                "MISSING_MID",
                "MISSING_FROM",
                "MISSING_TO",
                "MISSING_DATE",
                "MISSING_SUBJECT",
                "ARC_NA",
                "MIME_GOOD"
            ]
        );
    }

    #[test]
    fn default_actions_map_to_verdicts() {
        let config = RspamdConfig::default();
        assert_eq!(
            verdict(&config, &parse(GTUBE_REPLY)),
            Verdict::Spam {
                engine: "rspamd".to_string(),
                score: Some(15.0),
                action: Some("reject".to_string()),
                rules: vec!["GTUBE".to_string()],
            }
        );
        let suspect = verdict(&config, &parse(ADD_HEADER_REPLY));
        assert_eq!(
            suspect,
            Verdict::Suspect {
                engine: "rspamd".to_string(),
                score: Some(10.4),
                action: Some("add header".to_string()),
                rules: vec![
                    "HFILTER_HOSTNAME_UNKNOWN(2.5)".to_string(),
                    "MISSING_MID(2.5)".to_string(),
                    "MISSING_FROM(2)".to_string(),
                    "MISSING_TO(2)".to_string(),
                    "MISSING_DATE(1)".to_string(),
                ],
            }
        );
        assert_eq!(
            suspect.summary(),
            "suspect rspamd score 10.4 action add header (HFILTER_HOSTNAME_UNKNOWN(2.5), \
             MISSING_MID(2.5), MISSING_FROM(2), MISSING_TO(2), MISSING_DATE(1))"
        );
        for action in ["no action", "greylist", "soft reject"] {
            let reply = CheckReply {
                action: action.to_string(),
                ..parse(ADD_HEADER_REPLY)
            };
            assert_eq!(verdict(&config, &reply), Verdict::Clean, "{action}");
        }
        for action in ["rewrite subject", "discard", "some custom action"] {
            let reply = CheckReply {
                action: action.to_string(),
                ..parse(ADD_HEADER_REPLY)
            };
            assert_eq!(verdict(&config, &reply).kind(), "suspect", "{action}");
        }
    }

    #[test]
    fn operator_mapping_makes_add_header_spam() {
        let mut config = RspamdConfig::default();
        config
            .actions
            .insert("add header".to_string(), ActionClass::Spam);
        assert_eq!(verdict(&config, &parse(ADD_HEADER_REPLY)).kind(), "spam");
        config
            .actions
            .insert("reject".to_string(), ActionClass::Ignore);
        assert_eq!(verdict(&config, &parse(GTUBE_REPLY)), Verdict::Clean);
    }

    #[test]
    fn error_replies_are_reported() {
        assert_eq!(
            parse_reply(500, br#"{"error":"cannot parse message"}"#),
            Err(ReplyError::Reported(
                "HTTP 500: cannot parse message".to_string()
            ))
        );
        assert_eq!(
            parse_reply(404, b"not found\r\n"),
            Err(ReplyError::Reported("HTTP 404: not found".to_string()))
        );
        assert_eq!(
            parse_reply(200, br#"{"error":"task timeout"}"#),
            Err(ReplyError::Reported("task timeout".to_string()))
        );
    }

    #[test]
    fn malformed_replies_are_rejected() {
        let cases: [(&[u8], &str); 9] = [
            (b"", "invalid JSON"),
            (b"not json", "invalid JSON"),
            (br#"{"action":"reject""#, "invalid JSON"),
            (br#"{"score":1.0}"#, "no \"action\""),
            (br#"{"action":"reject"}"#, "no \"action\" or \"score\""),
            (br#"{"action":"reject","score":"high"}"#, "invalid JSON"),
            (br#"{"action":" ","score":1.0}"#, "empty \"action\""),
            (
                br#"{"action":"reject","score":1.0,"symbols":["GTUBE"]}"#,
                "invalid JSON",
            ),
            (br#"[1,2,3]"#, "invalid JSON"),
        ];
        for (body, expected) in cases {
            match parse_reply(200, body) {
                Err(ReplyError::Malformed(reason)) => assert!(
                    reason.contains(expected),
                    "{:?} gave {reason:?}",
                    String::from_utf8_lossy(body)
                ),
                other => panic!(
                    "{:?} gave {other:?}, expected malformed",
                    String::from_utf8_lossy(body)
                ),
            }
        }
    }

    #[test]
    fn score_format_trims_zeros() {
        for (score, expected) in [(7.25, "7.25"), (2.5, "2.5"), (1.0, "1"), (0.333, "0.33")] {
            assert_eq!(format_score(score), expected);
        }
    }
}
