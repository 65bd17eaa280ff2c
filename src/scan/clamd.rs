//! clamd client: the INSTREAM and VERSION commands over TCP or a unix socket,
//! and the classification of clamd's replies.
//!
//! Commands use the `z` form (NUL-terminated command and reply). INSTREAM
//! sends the message as chunks, each a 4-byte big-endian length followed by
//! the data, and ends with a zero-length chunk.
//!
//! Scans run in IDSESSION sessions kept open between scans, which saves a
//! connect, an accept and a close on both sides for each message. Inside a
//! session clamd numbers its replies (`1: stream: OK`), counting the
//! session's commands from 1.

use std::io;
use std::sync::Mutex;
use std::time::Duration;

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

/// Commands after which a session is closed instead of kept.
const SESSION_MAX_COMMANDS: u64 = 10_000;

/// clamd connections kept open between scans, each in an IDSESSION session.
///
/// A kept session is closed once idle for `idle_time`. clamd itself ends a
/// session that waits too long for its next command (`CommandReadTimeout`
/// and `ReadTimeout`, 30 s and 120 s by default, per clamd.conf(5)). A
/// session that clamd ended sooner is noticed and replaced.
pub struct ClamdSessions {
    max_idle: usize,
    idle_time: Duration,
    idle: Mutex<Vec<Session>>,
}

struct Session {
    connection: Box<dyn Connection>,
    /// Number of the next command in the session, as clamd counts them.
    next_id: u64,
    idle_since: Instant,
}

impl std::fmt::Debug for ClamdSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClamdSessions")
            .field("max_idle", &self.max_idle)
            .field("idle", &self.lock().len())
            .finish()
    }
}

impl ClamdSessions {
    /// Keeps at most `max_idle` idle sessions (0 keeps none), each for at
    /// most `idle_time`.
    pub fn new(max_idle: usize, idle_time: Duration) -> ClamdSessions {
        ClamdSessions {
            max_idle,
            idle_time,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Takes the most recently used session that is still open, closing
    /// those past their idle time or ended by clamd.
    fn take(&self) -> Option<Session> {
        loop {
            let mut session = self.lock().pop()?;
            if self.is_usable(&mut session) {
                return Some(session);
            }
        }
    }

    fn put(&self, session: Session) {
        let mut idle = self.lock();
        idle.retain(|kept| kept.idle_since.elapsed() < self.idle_time);
        if idle.len() < self.max_idle {
            idle.push(session);
        }
    }

    /// Closes the sessions that are past their idle time or that clamd
    /// ended, so none waits half-closed for the next scan.
    pub fn remove_stale(&self) {
        let mut idle = self.lock();
        idle.retain_mut(|kept| self.is_usable(kept));
    }

    /// Returns whether a kept session is within its idle time and still
    /// open at clamd's end.
    fn is_usable(&self, session: &mut Session) -> bool {
        session.idle_since.elapsed() < self.idle_time
            && !crate::peer_closed(session.connection.as_mut())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Session>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

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

/// Sends `message` to clamd with INSTREAM, in a kept session when
/// `config.sessions` allows, and classifies the reply.
pub async fn scan(
    config: &ClamdConfig,
    sessions: &ClamdSessions,
    message: &[u8],
) -> Result<ClamdFinding, ScanError> {
    let reply = if config.sessions == 0 {
        instream(config, message).await?
    } else {
        instream_in_session(config, sessions, message).await?
    };
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
            send_chunks(&mut connection, b"", message),
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

/// Runs INSTREAM in a kept session, or in a new one when none is kept or
/// the kept one fails, and returns the reply without its number.
async fn instream_in_session(
    config: &ClamdConfig,
    sessions: &ClamdSessions,
    message: &[u8],
) -> Result<String, ScanError> {
    let endpoint = endpoint(config);
    let deadline = endpoint.deadline();
    if let Some(session) = sessions.take() {
        match session_instream(&endpoint, session, message, deadline).await {
            Ok((reply, session)) => {
                if let Some(session) = session {
                    sessions.put(session);
                }
                return Ok(reply);
            }
            // clamd may end a session at any time; scanning again is safe.
            Err(error) => {
                tracing::debug!(clamd = %config.address, %error,
                    "kept clamd session failed; scanning in a new one");
            }
        }
    }
    let session = Session {
        connection: endpoint.connect(deadline).await?,
        next_id: 0,
        idle_since: Instant::now(),
    };
    let (reply, session) = session_instream(&endpoint, session, message, deadline).await?;
    if let Some(session) = session {
        sessions.put(session);
    }
    Ok(reply)
}

/// Sends one INSTREAM in `session`, opening the session with IDSESSION in
/// the same write when it is new (`next_id` 0). Returns the reply without
/// its number, and the session when it can carry another scan.
///
/// On a kept session, a reply without the expected number is clamd ending
/// the session (such as `COMMAND READ TIMED OUT` after its read timeout),
/// not a verdict, so it is an error and the caller scans in a new session.
async fn session_instream(
    endpoint: &Endpoint<'_>,
    mut session: Session,
    message: &[u8],
    deadline: Instant,
) -> Result<(String, Option<Session>), ScanError> {
    let kept = session.next_id > 0;
    let opening: &[u8] = if session.next_id == 0 {
        session.next_id = 1;
        b"zIDSESSION\0"
    } else {
        b""
    };
    let sent = endpoint
        .within(
            deadline,
            "sending the message",
            send_chunks(&mut session.connection, opening, message),
        )
        .await?;
    let reply = match sent {
        Ok(()) => read_reply(endpoint, &mut session.connection, deadline).await?,
        // As without a session: past StreamMaxLength clamd replies and
        // closes while the message is still being written.
        Err(source) => match read_reply(endpoint, &mut session.connection, deadline).await {
            Ok(reply) => {
                let number = format!("{}: ", session.next_id);
                return match reply.strip_prefix(&number) {
                    Some(text) => Ok((text.to_string(), None)),
                    None if kept => Err(endpoint.io_error("sending the message", source)),
                    None => Ok((reply, None)),
                };
            }
            Err(_) => return Err(endpoint.io_error("sending the message", source)),
        },
    };
    let number = session.next_id.to_string();
    let text = match reply.split_once(": ") {
        Some((prefix, text)) if prefix == number => text.to_string(),
        Some((prefix, _)) if prefix.bytes().all(|byte| byte.is_ascii_digit()) => {
            return Err(endpoint.protocol_error(&format!(
                "reply numbered {prefix} where {number} was expected: {reply}"
            )));
        }
        _ if kept => {
            return Err(endpoint.protocol_error(&format!(
                "kept session ended with an unnumbered reply: {reply}"
            )));
        }
        // On a new session, an unnumbered reply (an error clamd sends
        // before ending the session) is judged as it is.
        _ => return Ok((reply, None)),
    };
    session.next_id += 1;
    session.idle_since = Instant::now();
    let reusable = (text.ends_with(" OK") || text.ends_with(" FOUND"))
        && session.next_id <= SESSION_MAX_COMMANDS;
    Ok((text, reusable.then_some(session)))
}

/// Writes `prefix`, the INSTREAM command, the chunks and the terminating
/// empty chunk, one chunk per write.
async fn send_chunks(
    connection: &mut Box<dyn Connection>,
    prefix: &[u8],
    message: &[u8],
) -> io::Result<()> {
    let mut buffer = Vec::with_capacity(CHUNK_SIZE + 32);
    buffer.extend_from_slice(prefix);
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
