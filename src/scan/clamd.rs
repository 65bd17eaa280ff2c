//! clamd client: the INSTREAM and VERSION commands over TCP or a unix socket,
//! and the classification of clamd's replies.
//!
//! Commands use the `z` form (NUL-terminated command and reply). INSTREAM
//! sends the message as chunks, each a 4-byte big-endian length followed by
//! the data, and ends with a zero-length chunk.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::config::{ClamdConfig, NameClass};
use super::error::ScanError;
use super::net::{Connection, Endpoint, clip};

/// Bytes of message data per INSTREAM chunk.
const CHUNK_SIZE: usize = 64 * 1024;

/// Longest reply read from clamd. Real replies are one short line.
const MAX_REPLY_LEN: usize = 16 * 1024;

/// Prefix of the names clamd reports when a scan hits one of its limits
/// while `AlertExceedsMax` is on.
const LIMITS_PREFIX: &str = "Heuristics.Limits.Exceeded.";

/// The limit name for clamd's `MaxScanTime`: a busy or slow scanner rather
/// than a property of the message, so it is reported as a scanner failure.
const MAX_SCAN_TIME: &str = "Heuristics.Limits.Exceeded.MaxScanTime";

/// clamd's reply to INSTREAM once more than `StreamMaxLength` bytes arrived.
const SIZE_LIMIT_REPLY: &str = "INSTREAM size limit exceeded";

/// The result of one clamd scan, after classifying signature names.
#[derive(Debug, Clone, PartialEq)]
pub enum ClamdFinding {
    /// Nothing found, or only signatures classed as ignored.
    Clean,
    Virus(String),
    /// A signature classed as spam, such as a phishing heuristic.
    Spam(String),
    /// clamd could not scan the whole message.
    Unscannable(String),
}

/// Sends `message` to clamd with INSTREAM and classifies the reply.
pub async fn scan(config: &ClamdConfig, message: &[u8]) -> Result<ClamdFinding, ScanError> {
    let reply = instream(config, message).await?;
    interpret_reply(config, &reply)
}

/// Returns clamd's VERSION reply, such as "ClamAV 1.4.6/27500/Mon Dec 1 2025".
pub async fn version(config: &ClamdConfig) -> Result<String, ScanError> {
    let endpoint = endpoint(config);
    let deadline = endpoint.deadline();
    let mut connection = endpoint.connect(deadline).await?;

    let write = async {
        connection.write_all(b"zVERSION\0").await?;
        connection.flush().await
    };
    endpoint
        .within(deadline, "sending the command", write)
        .await?
        .map_err(|source| endpoint.io_error("sending the command", source))?;
    read_reply(&endpoint, &mut connection, deadline).await
}

fn endpoint(config: &ClamdConfig) -> Endpoint<'_> {
    Endpoint {
        engine: "clamd",
        address: &config.address,
        timeout: config.timeout,
    }
}

/// Runs the INSTREAM command and returns clamd's reply without the NUL.
async fn instream(config: &ClamdConfig, message: &[u8]) -> Result<String, ScanError> {
    let endpoint = endpoint(config);
    let deadline = endpoint.deadline();
    let mut connection = endpoint.connect(deadline).await?;

    let sent = endpoint
        .within(
            deadline,
            "sending the message",
            send_chunks(&mut connection, message),
        )
        .await?;
    match sent {
        Ok(()) => read_reply(&endpoint, &mut connection, deadline).await,
        // clamd replies and closes the connection as soon as the stream
        // exceeds its StreamMaxLength, so the rest of the message meets a
        // broken pipe or a reset. The reply is usually still readable.
        Err(source) => match read_reply(&endpoint, &mut connection, deadline).await {
            Ok(reply) => {
                tracing::debug!(
                    clamd = %config.address,
                    error = %source,
                    reply = %reply,
                    "clamd closed the connection early but replied"
                );
                Ok(reply)
            }
            Err(_) => Err(endpoint.io_error("sending the message", source)),
        },
    }
}

/// Writes the INSTREAM command, the chunks and the terminating empty chunk,
/// one chunk per write.
async fn send_chunks(connection: &mut Box<dyn Connection>, message: &[u8]) -> io::Result<()> {
    let mut buffer = Vec::with_capacity(CHUNK_SIZE + 32);
    buffer.extend_from_slice(b"zINSTREAM\0");

    let mut chunks = message.chunks(CHUNK_SIZE).peekable();
    loop {
        if let Some(chunk) = chunks.next() {
            // CHUNK_SIZE fits in u32, so the length cannot be truncated.
            buffer.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
            buffer.extend_from_slice(chunk);
        }
        if chunks.peek().is_none() {
            buffer.extend_from_slice(&0u32.to_be_bytes());
            connection.write_all(&buffer).await?;
            break;
        }
        connection.write_all(&buffer).await?;
        buffer.clear();
    }
    connection.flush().await
}

/// Reads the reply up to its NUL or the end of the connection.
async fn read_reply(
    endpoint: &Endpoint<'_>,
    connection: &mut Box<dyn Connection>,
    deadline: Instant,
) -> Result<String, ScanError> {
    let read = async {
        let mut reply = Vec::new();
        let mut buffer = [0u8; 1024];
        loop {
            let count = connection.read(&mut buffer).await?;
            if count == 0 {
                return Ok(reply);
            }
            reply.extend_from_slice(&buffer[..count]);
            if let Some(end) = reply.iter().position(|&byte| byte == 0) {
                reply.truncate(end);
                return Ok(reply);
            }
            if reply.len() > MAX_REPLY_LEN {
                return Ok(reply);
            }
        }
    };
    let reply = endpoint
        .within(deadline, "reading the reply", read)
        .await?
        .map_err(|source: io::Error| endpoint.io_error("reading the reply", source))?;

    let text = String::from_utf8_lossy(&reply).trim().to_string();
    if text.is_empty() {
        return Err(endpoint.protocol_error("connection closed without a reply"));
    }
    if reply.len() > MAX_REPLY_LEN {
        return Err(endpoint.protocol_error(&format!(
            "reply longer than {MAX_REPLY_LEN} bytes: {}",
            clip(&text, 200)
        )));
    }
    Ok(text)
}

/// Classifies an INSTREAM reply. With several findings (one per line), a
/// virus wins over a scan-time failure, which wins over spam, then
/// unscannable, then clean.
pub fn interpret_reply(config: &ClamdConfig, reply: &str) -> Result<ClamdFinding, ScanError> {
    let endpoint = endpoint(config);
    let address = config.address.as_str();
    let mut virus = None;
    let mut spam = None;
    let mut unscannable = None;
    let mut failure = None;
    let mut answered = false;

    for line in reply
        .split(['\0', '\n'])
        .map(str::trim)
        .filter(|line| !line.is_empty())
    {
        answered = true;
        if line == "stream: OK" {
            continue;
        }
        if let Some(name) = line
            .strip_prefix("stream: ")
            .and_then(|rest| rest.strip_suffix(" FOUND"))
        {
            let name = name.trim().to_string();
            if name.starts_with(MAX_SCAN_TIME) {
                failure.get_or_insert(ScanError::ScannerLimit {
                    address: address.to_string(),
                    signature: name,
                });
            } else if name.starts_with(LIMITS_PREFIX) {
                unscannable.get_or_insert(format!("clamd stopped at its limit {name}"));
            } else {
                match config.classify(&name) {
                    NameClass::Virus => {
                        virus.get_or_insert(name);
                    }
                    NameClass::Spam => {
                        spam.get_or_insert(name);
                    }
                    NameClass::Ignore => {
                        tracing::info!(
                            clamd = %address,
                            signature = %name,
                            "clamd finding ignored because scan.clamd.names classes it as ignore"
                        );
                    }
                }
            }
        } else if let Some(message) = line.strip_suffix("ERROR") {
            if line.contains(SIZE_LIMIT_REPLY) {
                unscannable.get_or_insert(
                    "clamd refused the message: INSTREAM size limit exceeded \
                     (clamd's StreamMaxLength is below scan.clamd.max_scan_size)"
                        .to_string(),
                );
            } else {
                let message = message.trim();
                let message = message.strip_prefix("stream:").unwrap_or(message).trim();
                failure.get_or_insert(endpoint.reported(message));
            }
        } else {
            return Err(endpoint.protocol_error(reply));
        }
    }

    if !answered {
        return Err(endpoint.protocol_error(reply));
    }
    if let Some(name) = virus {
        return Ok(ClamdFinding::Virus(name));
    }
    if let Some(error) = failure {
        return Err(error);
    }
    if let Some(name) = spam {
        return Ok(ClamdFinding::Spam(name));
    }
    if let Some(reason) = unscannable {
        return Ok(ClamdFinding::Unscannable(reason));
    }
    Ok(ClamdFinding::Clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ClamdConfig {
        ClamdConfig {
            address: "127.0.0.1:3310".to_string(),
            ..ClamdConfig::default()
        }
    }

    fn finding(reply: &str) -> ClamdFinding {
        match interpret_reply(&config(), reply) {
            Ok(finding) => finding,
            Err(error) => panic!("reply {reply:?} gave error {error}"),
        }
    }

    fn error(reply: &str) -> ScanError {
        match interpret_reply(&config(), reply) {
            Ok(finding) => panic!("reply {reply:?} gave {finding:?}, expected an error"),
            Err(error) => error,
        }
    }

    #[test]
    fn reply_ok_is_clean() {
        assert_eq!(finding("stream: OK"), ClamdFinding::Clean);
        assert_eq!(finding("stream: OK\n"), ClamdFinding::Clean);
    }

    #[test]
    fn reply_found_virus() {
        assert_eq!(
            finding("stream: Eicar-Test-Signature.UNOFFICIAL FOUND"),
            ClamdFinding::Virus("Eicar-Test-Signature.UNOFFICIAL".to_string())
        );
    }

    #[test]
    fn reply_found_phishing_is_spam() {
        assert_eq!(
            finding("stream: Heuristics.Phishing.Email.SpoofedDomain FOUND"),
            ClamdFinding::Spam("Heuristics.Phishing.Email.SpoofedDomain".to_string())
        );
    }

    #[test]
    fn reply_found_pua_is_clean() {
        assert_eq!(
            finding("stream: PUA.Win.Packer.Upx-1 FOUND"),
            ClamdFinding::Clean
        );
        assert_eq!(
            finding("stream: Heuristics.Encrypted.Zip FOUND"),
            ClamdFinding::Clean
        );
    }

    #[test]
    fn reply_limit_is_unscannable() {
        match finding("stream: Heuristics.Limits.Exceeded.MaxFileSize FOUND") {
            ClamdFinding::Unscannable(reason) => {
                assert!(
                    reason.contains("Heuristics.Limits.Exceeded.MaxFileSize"),
                    "{reason}"
                );
            }
            other => panic!("expected unscannable, got {other:?}"),
        }
    }

    #[test]
    fn reply_size_limit_is_unscannable() {
        match finding("INSTREAM size limit exceeded. ERROR") {
            ClamdFinding::Unscannable(reason) => {
                assert!(reason.contains("StreamMaxLength"), "{reason}")
            }
            other => panic!("expected unscannable, got {other:?}"),
        }
    }

    #[test]
    fn reply_max_scan_time_is_error() {
        match error("stream: Heuristics.Limits.Exceeded.MaxScanTime FOUND") {
            ScanError::ScannerLimit { signature, address } => {
                assert_eq!(signature, "Heuristics.Limits.Exceeded.MaxScanTime");
                assert_eq!(address, "127.0.0.1:3310");
            }
            other => panic!("expected a scanner limit, got {other:?}"),
        }
    }

    #[test]
    fn reply_other_error_is_error() {
        match error("stream: Can't allocate memory ERROR") {
            ScanError::Reported {
                engine, message, ..
            } => {
                assert_eq!(engine, "clamd");
                assert_eq!(message, "Can't allocate memory");
            }
            other => panic!("expected a clamd error, got {other:?}"),
        }
    }

    #[test]
    fn reply_garbage_is_protocol_error() {
        for reply in ["", "PONG", "stream: something odd", "UNKNOWN COMMAND"] {
            match interpret_reply(&config(), reply) {
                Err(ScanError::Protocol { .. }) => {}
                other => panic!("reply {reply:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn reply_virus_beats_other_findings() {
        let reply = "stream: Heuristics.Phishing.X FOUND\nstream: Heuristics.Limits.Exceeded.MaxScanTime FOUND\nstream: Win.Trojan.Y FOUND";
        assert_eq!(
            finding(reply),
            ClamdFinding::Virus("Win.Trojan.Y".to_string())
        );
    }

    #[test]
    fn error_display_is_lower_case_and_names_address() {
        let error = ScanError::Timeout {
            engine: "clamd",
            address: "127.0.0.1:3310".to_string(),
            timeout: std::time::Duration::from_secs(30),
            stage: "reading the reply",
        };
        assert_eq!(
            error.to_string(),
            "clamd at 127.0.0.1:3310 timed out after 30s while reading the reply"
        );
        assert_eq!(error.address(), "127.0.0.1:3310");
    }
}
