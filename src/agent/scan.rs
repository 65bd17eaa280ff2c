//! The on-demand scan: clamd's MULTISCAN over the configured paths, and
//! the PING and VERSION commands for the health check. clamd opens the
//! files itself, so it needs read access to the scanned paths.

use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Maximum size of clamd's reply to one command; a scan of many infected
/// files stays far below it.
const MAX_REPLY: usize = 4 << 20;

/// One infected file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Finding {
    pub path: String,
    pub signature: String,
}

/// The outcome of a scan of all configured paths.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScanOutcome {
    pub findings: Vec<Finding>,
    /// Files clamd could not scan, with its message.
    pub errors: Vec<String>,
}

impl ScanOutcome {
    /// Returns `clean`, `infected` or `failed` (errors and no findings).
    pub fn result(&self) -> &'static str {
        if !self.findings.is_empty() {
            "infected"
        } else if !self.errors.is_empty() {
            "failed"
        } else {
            "clean"
        }
    }
}

trait Connection: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Connection for T {}

/// Connects to `socket`: a path is a unix socket, anything else
/// `host:port`.
async fn connect(socket: &str) -> Result<Box<dyn Connection>, String> {
    if socket.starts_with('/') {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|error| format!("cannot connect to clamd at {socket}: {error}"))?;
        Ok(Box::new(stream))
    } else {
        let stream = tokio::net::TcpStream::connect(socket)
            .await
            .map_err(|error| format!("cannot connect to clamd at {socket}: {error}"))?;
        let _ = stream.set_nodelay(true);
        Ok(Box::new(stream))
    }
}

/// Sends one `z`-command (NUL-terminated) and returns the NUL-separated
/// reply lines, reading until clamd closes the connection.
async fn command(socket: &str, line: &str, timeout: Duration) -> Result<Vec<String>, String> {
    let exchange = async {
        let mut stream = connect(socket).await?;
        stream
            .write_all(format!("z{line}\0").as_bytes())
            .await
            .map_err(|error| format!("cannot send {line:?} to clamd at {socket}: {error}"))?;
        let mut reply = Vec::new();
        let mut buffer = [0u8; 8192];
        loop {
            let read = stream
                .read(&mut buffer)
                .await
                .map_err(|error| format!("cannot read clamd's reply from {socket}: {error}"))?;
            if read == 0 {
                break;
            }
            reply.extend_from_slice(&buffer[..read]);
            if reply.len() > MAX_REPLY {
                return Err(format!(
                    "clamd's reply from {socket} exceeds {MAX_REPLY} bytes"
                ));
            }
        }
        Ok(String::from_utf8_lossy(&reply)
            .split('\0')
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .map(str::to_string)
            .collect())
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("clamd at {socket} did not finish {line:?} within {timeout:?}"))?
}

/// Returns whether clamd replies PONG to PING.
///
/// # Errors
/// When clamd cannot be reached or replies otherwise.
pub async fn ping(socket: &str, timeout: Duration) -> Result<(), String> {
    let reply = command(socket, "PING", timeout).await?;
    if reply.first().map(String::as_str) == Some("PONG") {
        Ok(())
    } else {
        Err(format!(
            "clamd at {socket} replied {reply:?} to PING instead of PONG"
        ))
    }
}

/// Returns clamd's VERSION reply, such as
/// `ClamAV 1.4.2/27100/Thu Dec  4 08:00:00 2026`.
///
/// # Errors
/// When clamd cannot be reached.
pub async fn version(socket: &str, timeout: Duration) -> Result<String, String> {
    let reply = command(socket, "VERSION", timeout).await?;
    reply
        .into_iter()
        .next()
        .ok_or_else(|| format!("clamd at {socket} sent an empty VERSION reply"))
}

/// Returns the signature database's date from a VERSION reply, as a Unix
/// time. Returns `None` when the reply carries no date, as with local
/// signature files only.
pub fn signature_date(version: &str) -> Option<i64> {
    let date = version.split('/').nth(2)?.trim();
    // clamd writes the date like ctime(3): "Thu Dec  4 08:00:00 2026".
    let words: Vec<&str> = date.split_whitespace().collect();
    let [_, month, day, clock, year] = words.as_slice() else {
        return None;
    };
    let text = format!("{day} {month} {year} {clock}");
    let format = time::macros::format_description!(
        "[day padding:none] [month repr:short] [year] [hour]:[minute]:[second]"
    );
    let parsed = time::PrimitiveDateTime::parse(&text, format).ok()?;
    Some(parsed.assume_utc().unix_timestamp())
}

/// Parses MULTISCAN reply lines into findings and errors.
pub fn parse_scan_reply(lines: &[String]) -> ScanOutcome {
    let mut outcome = ScanOutcome {
        findings: Vec::new(),
        errors: Vec::new(),
    };
    for line in lines {
        if let Some(rest) = line.strip_suffix(" FOUND")
            && let Some((path, signature)) = rest.rsplit_once(": ")
        {
            outcome.findings.push(Finding {
                path: path.to_string(),
                signature: signature.to_string(),
            });
            continue;
        }
        if line.ends_with(" ERROR") {
            outcome.errors.push(line.clone());
        }
    }
    outcome
}

/// Scans every path in `paths` with clamd's MULTISCAN.
///
/// # Errors
/// When clamd cannot be reached or does not finish within `timeout`.
pub async fn scan_paths(
    socket: &str,
    paths: &[impl AsRef<Path>],
    timeout: Duration,
) -> Result<ScanOutcome, String> {
    let now = tokio::time::Instant::now();
    // A timeout past the clock's range counts as 100 years.
    let deadline = now
        .checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400));
    let mut total = ScanOutcome {
        findings: Vec::new(),
        errors: Vec::new(),
    };
    for path in paths {
        let path = path.as_ref();
        let text = path.to_str().ok_or_else(|| {
            format!(
                "scan path {} is not UTF-8; clamd's protocol needs text",
                path.display()
            )
        })?;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let reply = command(socket, &format!("MULTISCAN {text}"), left).await?;
        let outcome = parse_scan_reply(&reply);
        total.findings.extend(outcome.findings);
        total.errors.extend(outcome.errors);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_lines_parsed() {
        let lines: Vec<String> = [
            "/home/a/eicar.com: Eicar-Test-Signature.UNOFFICIAL FOUND",
            "/home/a/locked: Access denied. ERROR",
            "/home/b: OK",
        ]
        .iter()
        .map(|line| line.to_string())
        .collect();
        let outcome = parse_scan_reply(&lines);
        assert_eq!(
            outcome.findings,
            [Finding {
                path: "/home/a/eicar.com".into(),
                signature: "Eicar-Test-Signature.UNOFFICIAL".into()
            }]
        );
        assert_eq!(outcome.errors.len(), 1);
        assert_eq!(outcome.result(), "infected");
    }

    #[test]
    fn clean_and_failed_results() {
        let clean = parse_scan_reply(&["/srv: OK".to_string()]);
        assert_eq!(clean.result(), "clean");
        let failed = parse_scan_reply(&[
            "/srv: lstat() failed: No such file or directory. ERROR".to_string()
        ]);
        assert_eq!(failed.result(), "failed");
    }

    #[tokio::test]
    async fn huge_timeout_accepted() {
        let paths: [&str; 0] = [];
        let outcome = scan_paths("/nonexistent/clamd.sock", &paths, Duration::MAX)
            .await
            .expect("nothing to scan");
        assert_eq!(outcome.result(), "clean");
    }

    #[test]
    fn signature_date_from_version() {
        assert_eq!(
            signature_date("ClamAV 1.4.2/27100/Thu Dec  4 08:00:00 2026"),
            Some(1_796_371_200)
        );
        assert_eq!(signature_date("ClamAV 1.4.2"), None);
    }
}
