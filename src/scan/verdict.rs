//! The outcome of scanning one message.

/// Maximum length of [`Verdict::summary`] in characters.
const MAX_SUMMARY_LEN: usize = 200;

/// Outcome of scanning one message.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Verdict {
    Clean,
    /// `engine` is "builtin" (rules, with a summed score), "clamd" (a
    /// signature classed as spam, without a score), "upstream header",
    /// "rspamd" or "spamd". `action` is the action rspamd chose, and
    /// `rules` are the rules or symbols that matched, the highest scores
    /// first where the engine reports them.
    Spam {
        engine: String,
        score: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        action: Option<String>,
        rules: Vec<String>,
    },
    /// Suspicious but below the spam level, such as rspamd's `add header`:
    /// the message is delivered with a header and recorded, but never
    /// counts as a strike.
    Suspect {
        engine: String,
        score: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        action: Option<String>,
        rules: Vec<String>,
    },
    /// `name` is the clamd signature name.
    Virus {
        name: String,
    },
    /// The message could not be scanned fully, for example because it is
    /// larger than `max_scan_size`.
    Unscannable {
        reason: String,
    },
}

impl Verdict {
    /// Returns whether the message is a virus or spam.
    pub fn is_bad(&self) -> bool {
        matches!(self, Verdict::Virus { .. } | Verdict::Spam { .. })
    }

    /// "clean", "spam", "suspect", "virus" or "unscannable".
    pub fn kind(&self) -> &'static str {
        match self {
            Verdict::Clean => "clean",
            Verdict::Spam { .. } => "spam",
            Verdict::Suspect { .. } => "suspect",
            Verdict::Virus { .. } => "virus",
            Verdict::Unscannable { .. } => "unscannable",
        }
    }

    /// Returns the engine that found the virus, spam or suspicion.
    pub fn engine(&self) -> Option<&str> {
        match self {
            Verdict::Spam { engine, .. } | Verdict::Suspect { engine, .. } => Some(engine),
            Verdict::Virus { .. } => Some("clamd"),
            Verdict::Clean | Verdict::Unscannable { .. } => None,
        }
    }

    /// Formats a short description for logs and SMTP replies, such as
    /// "virus Eicar-Test-Signature.UNOFFICIAL", "spam score 1000.0 (GTUBE)"
    /// for the built-in rules or "spam rspamd score 15.0 action reject
    /// (GTUBE)" for an external engine. The text is printable ASCII only
    /// (anything else becomes '?') and at most 200 characters long.
    pub fn summary(&self) -> String {
        let text = match self {
            Verdict::Clean => "clean".to_string(),
            Verdict::Spam {
                engine,
                score: Some(score),
                action,
                rules,
            } => format!("spam {}", scored(engine, *score, action.as_deref(), rules)),
            Verdict::Spam {
                score: None, rules, ..
            } => format!("spam {}", rules.join(", ")),
            Verdict::Suspect {
                engine,
                score: Some(score),
                action,
                rules,
            } => format!(
                "suspect {}",
                scored(engine, *score, action.as_deref(), rules)
            ),
            Verdict::Suspect { engine, rules, .. } if rules.is_empty() => {
                format!("suspect {engine}")
            }
            Verdict::Suspect { engine, rules, .. } => {
                format!("suspect {engine} ({})", rules.join(", "))
            }
            Verdict::Virus { name } => format!("virus {name}"),
            Verdict::Unscannable { reason } => format!("unscannable: {reason}"),
        };
        smtp_safe(&text)
    }
}

/// Formats the scored part of a summary. The built-in rules are the
/// default engine and go unnamed.
fn scored(engine: &str, score: f64, action: Option<&str>, rules: &[String]) -> String {
    let engine = if engine == "builtin" {
        String::new()
    } else {
        format!("{engine} ")
    };
    let action = action.map_or_else(String::new, |action| format!(" action {action}"));
    // A score beyond any engine's scale is shown in exponent form, so it
    // cannot push the action and rules out of the summary's length limit.
    let score = if score.abs() >= 1e6 {
        format!("{score:.1e}")
    } else {
        format!("{score:.1}")
    };
    if rules.is_empty() {
        return format!("{engine}score {score}{action}");
    }
    format!("{engine}score {score}{action} ({})", rules.join(", "))
}

/// Replaces everything but printable ASCII with '?' and cuts the text to
/// [`MAX_SUMMARY_LEN`] characters, ending a cut text with "...".
fn smtp_safe(text: &str) -> String {
    let mut safe: String = text
        .chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect();
    if safe.len() > MAX_SUMMARY_LEN {
        safe.truncate(MAX_SUMMARY_LEN - 3);
        safe.push_str("...");
    }
    safe
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_forms() {
        let cases = [
            (Verdict::Clean, "clean"),
            (
                Verdict::Virus {
                    name: "Eicar-Test-Signature.UNOFFICIAL".to_string(),
                },
                "virus Eicar-Test-Signature.UNOFFICIAL",
            ),
            (
                Verdict::Spam {
                    engine: "builtin".to_string(),
                    score: Some(1000.0),
                    action: None,
                    rules: vec!["GTUBE".to_string()],
                },
                "spam score 1000.0 (GTUBE)",
            ),
            (
                Verdict::Spam {
                    engine: "builtin".to_string(),
                    score: Some(5.5),
                    action: None,
                    rules: vec!["A".to_string(), "B".to_string()],
                },
                "spam score 5.5 (A, B)",
            ),
            (
                Verdict::Spam {
                    engine: "clamd".to_string(),
                    score: None,
                    action: None,
                    rules: vec!["Heuristics.Phishing.X".to_string()],
                },
                "spam Heuristics.Phishing.X",
            ),
            (
                Verdict::Spam {
                    engine: "rspamd".to_string(),
                    score: Some(15.0),
                    action: Some("reject".to_string()),
                    rules: vec!["GTUBE".to_string()],
                },
                "spam rspamd score 15.0 action reject (GTUBE)",
            ),
            (
                Verdict::Spam {
                    engine: "spamd".to_string(),
                    score: Some(7.2),
                    action: None,
                    rules: vec!["MARKER".to_string(), "NO_RELAYS".to_string()],
                },
                "spam spamd score 7.2 (MARKER, NO_RELAYS)",
            ),
            (
                Verdict::Suspect {
                    engine: "rspamd".to_string(),
                    score: Some(7.15),
                    action: Some("add header".to_string()),
                    rules: vec!["MARKER(7.25)".to_string()],
                },
                "suspect rspamd score 7.2 action add header (MARKER(7.25))",
            ),
            (
                Verdict::Unscannable {
                    reason: "message is 9 bytes, above max_scan_size 8".to_string(),
                },
                "unscannable: message is 9 bytes, above max_scan_size 8",
            ),
        ];
        for (verdict, expected) in cases {
            assert_eq!(verdict.summary(), expected);
        }
    }

    #[test]
    fn summary_is_smtp_safe() {
        let verdict = Verdict::Virus {
            name: format!("Bad\r\nName\u{e9}\t{}", "x".repeat(500)),
        };
        let summary = verdict.summary();
        assert!(summary.len() <= 200, "{} characters", summary.len());
        assert!(summary.ends_with("..."));
        assert!(
            summary.bytes().all(|byte| (0x20..0x7f).contains(&byte)),
            "{summary:?}"
        );
        assert!(summary.starts_with("virus Bad??Name??"), "{summary:?}");
    }

    #[test]
    fn kind_and_is_bad() {
        let spam = Verdict::Spam {
            engine: "clamd".to_string(),
            score: None,
            action: None,
            rules: Vec::new(),
        };
        let suspect = Verdict::Suspect {
            engine: "rspamd".to_string(),
            score: Some(7.0),
            action: Some("add header".to_string()),
            rules: Vec::new(),
        };
        let virus = Verdict::Virus {
            name: "X".to_string(),
        };
        let unscannable = Verdict::Unscannable {
            reason: "r".to_string(),
        };
        assert_eq!(Verdict::Clean.kind(), "clean");
        assert_eq!(spam.kind(), "spam");
        assert_eq!(suspect.kind(), "suspect");
        assert_eq!(virus.kind(), "virus");
        assert_eq!(unscannable.kind(), "unscannable");
        assert!(!Verdict::Clean.is_bad());
        assert!(spam.is_bad());
        assert!(!suspect.is_bad());
        assert!(virus.is_bad());
        assert!(!unscannable.is_bad());
    }

    #[test]
    fn verdict_serializes_with_kind_tag() {
        let json = serde_json::to_value(Verdict::Virus {
            name: "X".to_string(),
        });
        let json = match json {
            Ok(json) => json,
            Err(error) => panic!("{error}"),
        };
        assert_eq!(json, serde_json::json!({"kind": "virus", "name": "X"}));
    }
}
