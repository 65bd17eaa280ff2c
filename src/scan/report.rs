//! Each engine's result for one scan, and how the results combine into one
//! verdict.

use std::time::Duration;

use super::config::OnError;
use super::error::ScanError;
use super::verdict::Verdict;

/// One engine's result for one scan.
#[derive(Debug)]
pub struct EngineResult {
    /// "clamd", "upstream header", "builtin", "rspamd" or "spamd".
    pub engine: &'static str,
    pub result: Result<Verdict, ScanError>,
    /// Treatment of a failure of this engine: `tempfail` keeps the message
    /// back, `accept` leaves it to the other engines.
    pub on_error: OnError,
    pub elapsed: Duration,
}

/// Every engine's result for one scan, in the order the engines are listed
/// in the configuration: clamd, the upstream header, the built-in rules,
/// rspamd, spamd.
#[derive(Debug, Default)]
pub struct ScanReport {
    pub results: Vec<EngineResult>,
}

impl ScanReport {
    /// Returns the index of the result that decides the message. The first
    /// result of the highest rank decides, ranked: virus, spam, a failure
    /// under `on_error = "tempfail"`, unscannable, suspect, clean. A failure
    /// under `on_error = "accept"` never decides. So a virus from any engine
    /// wins, and a scan that partly failed is never clean where the failing
    /// engine's policy is tempfail. `None` when no result can decide.
    pub fn deciding(&self) -> Option<usize> {
        self.results
            .iter()
            .enumerate()
            .filter_map(|(index, result)| rank(result).map(|rank| (rank, index)))
            .min()
            .map(|(_, index)| index)
    }

    /// Returns the combined verdict, or the deciding failure. Without any
    /// result that can decide (no engine at all, or only failures under
    /// `on_error = "accept"`), the message is clean.
    pub fn into_verdict(mut self) -> Result<Verdict, ScanError> {
        match self.deciding() {
            Some(index) => self.results.swap_remove(index).result,
            None => Ok(Verdict::Clean),
        }
    }
}

/// Returns the rank of a result (lower decides first), or `None` for a
/// failure that the engine's `on_error = "accept"` sets aside.
// NOTE: only the deciding result reaches the guard, so a suspect result is
// not recorded when clamd's unscannable result decides, even when
// `on_unscannable = "accept"` then relays the message.
fn rank(engine: &EngineResult) -> Option<u8> {
    match &engine.result {
        Ok(Verdict::Virus { .. }) => Some(0),
        Ok(Verdict::Spam { .. }) => Some(1),
        Err(_) if engine.on_error == OnError::Tempfail => Some(2),
        Err(_) => None,
        Ok(Verdict::Unscannable { .. }) => Some(3),
        Ok(Verdict::Suspect { .. }) => Some(4),
        Ok(Verdict::Clean) => Some(5),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(engine: &'static str, result: Result<Verdict, ScanError>) -> EngineResult {
        EngineResult {
            engine,
            result,
            on_error: OnError::Tempfail,
            elapsed: Duration::ZERO,
        }
    }

    fn failure(engine: &'static str, on_error: OnError) -> EngineResult {
        EngineResult {
            on_error,
            ..finding(
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

    /// Combines the results and describes the outcome as "verdict kind by
    /// engine" or "error by engine".
    fn outcome(results: Vec<EngineResult>) -> String {
        let report = ScanReport { results };
        let engine = report
            .deciding()
            .map_or("nobody", |index| report.results[index].engine);
        match report.into_verdict() {
            Ok(verdict) => format!("{} by {engine}", verdict.kind()),
            Err(error) => format!("error by {}", error.engine()),
        }
    }

    #[test]
    fn combination_table() {
        let cases: Vec<(Vec<EngineResult>, &str)> = vec![
            (Vec::new(), "clean by nobody"),
            (
                vec![
                    finding("clamd", Ok(Verdict::Clean)),
                    finding("rspamd", Ok(Verdict::Clean)),
                ],
                "clean by clamd",
            ),
            (
                vec![
                    finding("clamd", Ok(Verdict::Clean)),
                    finding("rspamd", Ok(spam("rspamd"))),
                ],
                "spam by rspamd",
            ),
            (
                vec![
                    finding("rspamd", Ok(spam("rspamd"))),
                    finding("spamd", Ok(spam("spamd"))),
                ],
                "spam by rspamd",
            ),
            // A virus from any engine wins over spam and failures.
            (
                vec![
                    failure("rspamd", OnError::Tempfail),
                    finding("builtin", Ok(spam("builtin"))),
                    finding("clamd", Ok(virus())),
                ],
                "virus by clamd",
            ),
            // Spam wins over another engine's failure.
            (
                vec![
                    failure("clamd", OnError::Tempfail),
                    finding("spamd", Ok(spam("spamd"))),
                ],
                "spam by spamd",
            ),
            // A failure under tempfail is never clean, suspect or unscannable.
            (
                vec![
                    finding("clamd", Ok(Verdict::Clean)),
                    failure("rspamd", OnError::Tempfail),
                ],
                "error by rspamd",
            ),
            (
                vec![
                    finding("rspamd", Ok(suspect())),
                    failure("spamd", OnError::Tempfail),
                ],
                "error by spamd",
            ),
            (
                vec![
                    finding("clamd", Ok(unscannable())),
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
                    finding("clamd", Ok(Verdict::Clean)),
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
                    finding("rspamd", Ok(suspect())),
                    finding("clamd", Ok(unscannable())),
                ],
                "unscannable by clamd",
            ),
            (
                vec![
                    finding("clamd", Ok(Verdict::Clean)),
                    finding("rspamd", Ok(suspect())),
                ],
                "suspect by rspamd",
            ),
            (
                vec![
                    finding("rspamd", Ok(suspect())),
                    finding("spamd", Ok(spam("spamd"))),
                ],
                "spam by spamd",
            ),
        ];
        for (index, (results, expected)) in cases.into_iter().enumerate() {
            assert_eq!(outcome(results), expected, "case {index}");
        }
    }
}
