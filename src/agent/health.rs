//! The local checks that decide the health the agent reports.

use super::config::{AgentConfig, CommandCheck};
use super::scan;
use crate::heartbeat::Health;
use std::process::Stdio;
use std::time::Duration;

/// Time allowed for clamd's PING and VERSION.
const CLAMD_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// One check's result: its health and, unless green, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub health: Health,
    pub reason: String,
}

fn rank(health: Health) -> u8 {
    match health {
        Health::Green => 0,
        Health::Yellow => 1,
        Health::Red => 2,
    }
}

/// Combines check results: the worst health, with the reasons of every
/// check that is not green.
pub fn combine(findings: &[Finding]) -> (Health, Vec<String>) {
    let health = findings
        .iter()
        .map(|finding| finding.health)
        .max_by_key(|health| rank(*health))
        .unwrap_or(Health::Green);
    let reasons = findings
        .iter()
        .filter(|finding| finding.health != Health::Green)
        .map(|finding| finding.reason.clone())
        .collect();
    (health, reasons)
}

/// Maps a check command's exit code: 0 green, 1 yellow, anything else red.
pub fn exit_health(code: Option<i32>) -> Health {
    match code {
        Some(0) => Health::Green,
        Some(1) => Health::Yellow,
        _ => Health::Red,
    }
}

/// Judges clamd's signature date against `max_age` at `now` (Unix
/// seconds).
pub fn signature_health(version: &str, max_age: Duration, now: i64) -> Finding {
    match scan::signature_date(version) {
        None => Finding {
            health: Health::Yellow,
            reason: format!(
                "clamd states no signature date ({version:?}), so their age is unknown"
            ),
        },
        Some(date) => {
            let age = Duration::from_secs(u64::try_from(now - date).unwrap_or(0));
            if age > max_age {
                Finding {
                    health: Health::Yellow,
                    reason: format!(
                        "clamd's signatures are {} old, more than checks.max_signature_age ({})",
                        humantime::format_duration(Duration::from_secs(age.as_secs())),
                        humantime::format_duration(max_age)
                    ),
                }
            } else {
                Finding {
                    health: Health::Green,
                    reason: String::new(),
                }
            }
        }
    }
}

async fn clamd_findings(config: &AgentConfig) -> Vec<Finding> {
    let socket = &config.scan.clamd;
    if let Err(error) = scan::ping(socket, CLAMD_CHECK_TIMEOUT).await {
        return vec![Finding {
            health: Health::Red,
            reason: format!("clamd is not reachable: {error}"),
        }];
    }
    let Some(max_age) = config.checks.max_signature_age else {
        return Vec::new();
    };
    match scan::version(socket, CLAMD_CHECK_TIMEOUT).await {
        Ok(version) => vec![signature_health(
            &version,
            max_age,
            time::OffsetDateTime::now_utc().unix_timestamp(),
        )],
        Err(error) => vec![Finding {
            health: Health::Red,
            reason: format!("clamd did not reply to VERSION: {error}"),
        }],
    }
}

async fn command_finding(check: &CommandCheck) -> Finding {
    let run = tokio::process::Command::new(&check.command[0])
        .args(&check.command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status();
    let status = match tokio::time::timeout(check.timeout, run).await {
        Err(_) => {
            return Finding {
                health: Health::Red,
                reason: format!(
                    "check {} did not finish within {:?}",
                    check.name, check.timeout
                ),
            };
        }
        Ok(Err(error)) => {
            return Finding {
                health: Health::Red,
                reason: format!(
                    "check {} could not be started ({}): {error}",
                    check.name, check.command[0]
                ),
            };
        }
        Ok(Ok(status)) => status,
    };
    let health = exit_health(status.code());
    Finding {
        health,
        reason: format!("check {} exited with {status}", check.name),
    }
}

/// Runs every configured check and adds `scan`, the finding of the last
/// on-demand scan, when there is one.
pub async fn evaluate(config: &AgentConfig, scan: Option<Finding>) -> Vec<Finding> {
    let mut findings = Vec::new();
    // The checks run at once, so that several slow ones delay the
    // heartbeat by the longest timeout instead of their sum, which could
    // exceed the server's heartbeat timeout.
    let clamd = async {
        if config.checks.clamd {
            clamd_findings(config).await
        } else {
            Vec::new()
        }
    };
    let commands =
        futures_util::future::join_all(config.checks.command.iter().map(command_finding));
    let (clamd, commands) = tokio::join!(clamd, commands);
    findings.extend(clamd);
    findings.extend(commands);
    findings.extend(scan);
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(health: Health, reason: &str) -> Finding {
        Finding {
            health,
            reason: reason.to_string(),
        }
    }

    #[tokio::test]
    async fn slow_checks_run_at_once() {
        let check = |name: &str| {
            format!(
                "[[checks.command]]\nname = \"{name}\"\ncommand = [\"/bin/sleep\", \"5\"]\ntimeout = \"1s\"\n"
            )
        };
        let text = format!(
            "server = \"http://10.0.0.5:8025\"\ndevice = \"ws-1\"\ntoken_file = \"/t\"\n{}{}{}",
            check("one"),
            check("two"),
            check("three")
        );
        let config = AgentConfig::parse(&text).expect("valid");
        let start = std::time::Instant::now();
        let findings = evaluate(&config, None).await;
        let took = start.elapsed();
        assert_eq!(findings.len(), 3);
        assert!(findings.iter().all(|finding| finding.health == Health::Red));
        assert!(took < Duration::from_millis(2500), "took {took:?}");
    }

    #[test]
    fn worst_health_wins() {
        let (health, reasons) = combine(&[
            finding(Health::Green, ""),
            finding(Health::Red, "malware found"),
            finding(Health::Yellow, "old signatures"),
        ]);
        assert_eq!(health, Health::Red);
        assert_eq!(reasons, ["malware found", "old signatures"]);
        assert_eq!(combine(&[]).0, Health::Green);
    }

    #[test]
    fn exit_codes_map_to_health() {
        assert_eq!(exit_health(Some(0)), Health::Green);
        assert_eq!(exit_health(Some(1)), Health::Yellow);
        assert_eq!(exit_health(Some(2)), Health::Red);
        assert_eq!(exit_health(None), Health::Red);
    }

    #[test]
    fn signature_age_boundary() {
        let version = "ClamAV 1.4.2/27100/Thu Dec  4 08:00:00 2026";
        let date = 1_796_371_200;
        let day = Duration::from_secs(86_400);
        assert_eq!(
            signature_health(version, day, date + 86_400).health,
            Health::Green
        );
        assert_eq!(
            signature_health(version, day, date + 86_401).health,
            Health::Yellow
        );
        assert_eq!(
            signature_health("ClamAV 1.4.2", day, date).health,
            Health::Yellow
        );
    }
}
