//! The outcome of scanning one message.

/// Maximum length of [`Verdict::summary`] in characters.
const MAX_SUMMARY_LEN: usize = 200;

/// Outcome of scanning one message.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Verdict {
    Clean,
    /// `engine` is "builtin" (rules, with a summed score) or "clamd" (a
    /// signature classed as spam, without a score).
    Spam {
        engine: String,
        score: Option<f64>,
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

    /// "clean", "spam", "virus" or "unscannable".
    pub fn kind(&self) -> &'static str {
        match self {
            Verdict::Clean => "clean",
            Verdict::Spam { .. } => "spam",
            Verdict::Virus { .. } => "virus",
            Verdict::Unscannable { .. } => "unscannable",
        }
    }

    /// Formats a short description for logs and SMTP replies, such as
    /// "virus Eicar-Test-Signature.UNOFFICIAL" or "spam score 1000.0 (GTUBE)".
    /// The text is printable ASCII only (anything else becomes '?') and at
    /// most 200 characters long.
    pub fn summary(&self) -> String {
        let text = match self {
            Verdict::Clean => "clean".to_string(),
            Verdict::Spam {
                score: Some(score),
                rules,
                ..
            } => format!("spam score {score:.1} ({})", rules.join(", ")),
            Verdict::Spam {
                score: None, rules, ..
            } => format!("spam {}", rules.join(", ")),
            Verdict::Virus { name } => format!("virus {name}"),
            Verdict::Unscannable { reason } => format!("unscannable: {reason}"),
        };
        smtp_safe(&text)
    }
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
                    rules: vec!["GTUBE".to_string()],
                },
                "spam score 1000.0 (GTUBE)",
            ),
            (
                Verdict::Spam {
                    engine: "builtin".to_string(),
                    score: Some(5.5),
                    rules: vec!["A".to_string(), "B".to_string()],
                },
                "spam score 5.5 (A, B)",
            ),
            (
                Verdict::Spam {
                    engine: "clamd".to_string(),
                    score: None,
                    rules: vec!["Heuristics.Phishing.X".to_string()],
                },
                "spam Heuristics.Phishing.X",
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
        assert_eq!(virus.kind(), "virus");
        assert_eq!(unscannable.kind(), "unscannable");
        assert!(!Verdict::Clean.is_bad());
        assert!(spam.is_bad());
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
