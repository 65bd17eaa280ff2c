//! Each engine's answer to one scan, and how the answers combine into one
//! verdict.

use std::time::Duration;

use super::config::OnError;
use super::error::ScanError;
use super::verdict::Verdict;

/// One engine's answer to one scan.
#[derive(Debug)]
pub struct EngineAnswer {
    /// "clamd", "upstream header", "builtin", "rspamd" or "spamd".
    pub engine: &'static str,
    pub result: Result<Verdict, ScanError>,
    /// What a failure of this engine means: `tempfail` holds the message
    /// back, `accept` leaves it to the other engines.
    pub on_error: OnError,
    pub elapsed: Duration,
}

/// Every engine's answer to one scan, in the order the engines are listed
/// in the configuration: clamd, the upstream header, the built-in rules,
/// rspamd, spamd.
#[derive(Debug, Default)]
pub struct ScanReport {
    pub answers: Vec<EngineAnswer>,
}

impl ScanReport {
    /// Returns the index of the answer that decides the message. The first
    /// answer of the highest rank decides, ranked: virus, spam, a failure
    /// under `on_error = "tempfail"`, unscannable, suspect, clean. A failure
    /// under `on_error = "accept"` never decides. So a virus from any engine
    /// wins, and a scan that partly failed is never clean where the failing
    /// engine's policy is tempfail. `None` when no answer can decide.
    pub fn deciding(&self) -> Option<usize> {
        self.answers
            .iter()
            .enumerate()
            .filter_map(|(index, answer)| rank(answer).map(|rank| (rank, index)))
            .min()
            .map(|(_, index)| index)
    }

    /// Returns the combined verdict, or the deciding failure. Without any
    /// answer that can decide (no engine at all, or only failures under
    /// `on_error = "accept"`), the message is clean.
    pub fn into_verdict(mut self) -> Result<Verdict, ScanError> {
        match self.deciding() {
            Some(index) => self.answers.swap_remove(index).result,
            None => Ok(Verdict::Clean),
        }
    }
}

/// Returns the rank of an answer (lower decides first), or `None` for a
/// failure that the engine's `on_error = "accept"` sets aside.
fn rank(answer: &EngineAnswer) -> Option<u8> {
    match &answer.result {
        Ok(Verdict::Virus { .. }) => Some(0),
        Ok(Verdict::Spam { .. }) => Some(1),
        Err(_) if answer.on_error == OnError::Tempfail => Some(2),
        Err(_) => None,
        Ok(Verdict::Unscannable { .. }) => Some(3),
        Ok(Verdict::Suspect { .. }) => Some(4),
        Ok(Verdict::Clean) => Some(5),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(engine: &'static str, result: Result<Verdict, ScanError>) -> EngineAnswer {
        EngineAnswer {
            engine,
            result,
            on_error: OnError::Tempfail,
            elapsed: Duration::ZERO,
        }
    }

    fn failure(engine: &'static str, on_error: OnError) -> EngineAnswer {
        EngineAnswer {
            on_error,
            ..answer(
                engine,
                Err(ScanError::Connect {
                    engine,
                    address: "127.0.0.1:1".to_string(),
                    source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
                }),
            )
        }
    }

    fn spam(engine: &str) -> Verdict {
        Verdict::Spam {
            engine: engine.to_string(),
            score: Some(15.0),
            action: None,
            rules: Vec::new(),
        }
    }

    fn suspect() -> Verdict {
        Verdict::Suspect {
            engine: "rspamd".to_string(),
            score: Some(7.0),
            action: Some("add header".to_string()),
            rules: Vec::new(),
        }
    }

    fn virus() -> Verdict {
        Verdict::Virus {
            name: "Eicar".to_string(),
        }
    }

    fn unscannable() -> Verdict {
        Verdict::Unscannable {
            reason: "too large".to_string(),
        }
    }

    /// Combines the answers and describes the outcome as "verdict kind by
    /// engine" or "error by engine".
    fn outcome(answers: Vec<EngineAnswer>) -> String {
        let report = ScanReport { answers };
        let engine = report
            .deciding()
            .map_or("nobody", |index| report.answers[index].engine);
        match report.into_verdict() {
            Ok(verdict) => format!("{} by {engine}", verdict.kind()),
            Err(error) => format!("error by {}", error.engine()),
        }
    }

    #[test]
    fn combination_table() {
        let cases: Vec<(Vec<EngineAnswer>, &str)> = vec![
            (Vec::new(), "clean by nobody"),
            (
                vec![
                    answer("clamd", Ok(Verdict::Clean)),
                    answer("rspamd", Ok(Verdict::Clean)),
                ],
                "clean by clamd",
            ),
            (
                vec![
                    answer("clamd", Ok(Verdict::Clean)),
                    answer("rspamd", Ok(spam("rspamd"))),
                ],
                "spam by rspamd",
            ),
            (
                vec![
                    answer("rspamd", Ok(spam("rspamd"))),
                    answer("spamd", Ok(spam("spamd"))),
                ],
                "spam by rspamd",
            ),
            // A virus from any engine wins over spam and failures.
            (
                vec![
                    failure("rspamd", OnError::Tempfail),
                    answer("builtin", Ok(spam("builtin"))),
                    answer("clamd", Ok(virus())),
                ],
                "virus by clamd",
            ),
            // Spam wins over another engine's failure.
            (
                vec![
                    failure("clamd", OnError::Tempfail),
                    answer("spamd", Ok(spam("spamd"))),
                ],
                "spam by spamd",
            ),
            // A failure under tempfail is never clean, suspect or unscannable.
            (
                vec![
                    answer("clamd", Ok(Verdict::Clean)),
                    failure("rspamd", OnError::Tempfail),
                ],
                "error by rspamd",
            ),
            (
                vec![
                    answer("rspamd", Ok(suspect())),
                    failure("spamd", OnError::Tempfail),
                ],
                "error by spamd",
            ),
            (
                vec![
                    answer("clamd", Ok(unscannable())),
                    failure("spamd", OnError::Tempfail),
                ],
                "error by spamd",
            ),
            // The first failure decides when two fail.
            (
                vec![
                    failure("rspamd", OnError::Tempfail),
                    failure("spamd", OnError::Tempfail),
                ],
                "error by rspamd",
            ),
            // A failure under accept leaves the others to decide.
            (
                vec![
                    answer("clamd", Ok(Verdict::Clean)),
                    failure("rspamd", OnError::Accept),
                ],
                "clean by clamd",
            ),
            (
                vec![
                    failure("rspamd", OnError::Accept),
                    failure("spamd", OnError::Accept),
                ],
                "clean by nobody",
            ),
            (
                vec![
                    failure("rspamd", OnError::Accept),
                    failure("spamd", OnError::Tempfail),
                ],
                "error by spamd",
            ),
            // Unscannable outranks suspect, suspect outranks clean.
            (
                vec![
                    answer("rspamd", Ok(suspect())),
                    answer("clamd", Ok(unscannable())),
                ],
                "unscannable by clamd",
            ),
            (
                vec![
                    answer("clamd", Ok(Verdict::Clean)),
                    answer("rspamd", Ok(suspect())),
                ],
                "suspect by rspamd",
            ),
            (
                vec![
                    answer("rspamd", Ok(suspect())),
                    answer("spamd", Ok(spam("spamd"))),
                ],
                "spam by spamd",
            ),
        ];
        for (index, (answers, expected)) in cases.into_iter().enumerate() {
            assert_eq!(outcome(answers), expected, "case {index}");
        }
    }
}
