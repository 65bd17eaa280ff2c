//! The client side towards the upstream smarthost.
//!
//! Written here rather than taken from a mail-sending crate because the
//! relay needs each upstream reply passed back verbatim, its own socket
//! with `TCP_NODELAY`, one write per message, exact dot-stuffing (the first
//! line included) and a timeout on every wait.

pub mod pool;
mod secure;

pub use secure::UpstreamTarget;

use crate::reply::{Reply, sanitize};
use crate::smtp::reader::encode_data;
use secure::UpstreamStream;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Maximum upstream reply line length accepted, in octets (RFC 5321 sets
/// 512 as the line length every server must handle).
const MAX_REPLY_LINE: usize = 4096;
/// Most lines accepted in one multi-line upstream reply.
const MAX_REPLY_LINES: usize = 100;

/// A failure talking to the upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to upstream {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("upstream {address} did not answer within {after:?} ({waiting_for})")]
    Timeout {
        address: String,
        after: Duration,
        waiting_for: &'static str,
    },
    #[error("upstream {address} connection failed: {source}")]
    Io {
        address: String,
        source: std::io::Error,
    },
    #[error("upstream {address} closed the connection")]
    Closed { address: String },
    #[error("upstream {address} sent an invalid reply: {line:?}")]
    Protocol { address: String, line: String },
    #[error("upstream {address} refused the session: {reply}")]
    Refused { address: String, reply: Reply },
    #[error("upstream {address} does not offer STARTTLS, and upstream.tls = \"required\"")]
    TlsUnavailable { address: String },
    #[error("TLS with upstream {address} failed: {source}")]
    Tls {
        address: String,
        source: std::io::Error,
    },
    #[error("upstream {address} offers no AUTH mechanism sendguard supports (PLAIN, LOGIN)")]
    AuthUnavailable { address: String },
    #[error(
        "upstream {address} has no TLS on this connection; AUTH in clear text needs upstream.allow_plaintext_auth = true"
    )]
    AuthNeedsTls { address: String },
    #[error("upstream {address} rejected the AUTH credentials of user {username:?}: {reply}")]
    AuthFailed {
        address: String,
        username: String,
        reply: Reply,
    },
}

/// A failure sending a message upstream.
#[derive(Debug, thiserror::Error)]
pub enum SendFailure {
    /// The upstream failed before any of the message was sent, so sending
    /// it again on a new connection cannot deliver it twice.
    #[error("{0} (before the message was sent)")]
    NotStarted(UpstreamError),
    /// The upstream failed after the message was sent in part or whole;
    /// whether it was accepted is unknown.
    #[error("{0} (while sending the message)")]
    Interrupted(UpstreamError),
}

/// The ESMTP extensions the upstream offers that matter to the relay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub pipelining: bool,
    /// The upstream's SIZE limit in bytes; `Some(0)` means SIZE without a
    /// limit.
    pub size: Option<u64>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub enhanced_status_codes: bool,
    pub chunking: bool,
    pub binarymime: bool,
    pub starttls: bool,
    /// AUTH mechanisms offered, upper-cased.
    pub auth: Vec<String>,
}

impl Capabilities {
    /// Reads the capabilities from the text lines of an EHLO reply (the
    /// first line, the greeting, is skipped).
    pub fn from_ehlo(reply: &Reply) -> Capabilities {
        let mut capabilities = Capabilities::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => capabilities.pipelining = true,
                "SIZE" => {
                    capabilities.size =
                        Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0));
                }
                "8BITMIME" => capabilities.eight_bit_mime = true,
                "SMTPUTF8" => capabilities.smtputf8 = true,
                "ENHANCEDSTATUSCODES" => capabilities.enhanced_status_codes = true,
                "CHUNKING" => capabilities.chunking = true,
                "BINARYMIME" => capabilities.binarymime = true,
                "STARTTLS" => capabilities.starttls = true,
                "AUTH" => {
                    capabilities.auth = words.map(str::to_ascii_uppercase).collect();
                }
                _ => {}
            }
        }
        capabilities
    }
}

/// An open SMTP session with the upstream.
pub struct UpstreamConnection {
    stream: BufReader<UpstreamStream>,
    address: String,
    /// When the session was opened.
    opened: Instant,
    /// The pool of the configuration the session was opened under.
    pool_id: u64,
    reply_timeout: Duration,
    data_timeout: Duration,
    capabilities: Capabilities,
    /// Whether a MAIL transaction is open upstream.
    in_transaction: bool,
}

impl UpstreamConnection {
    /// Connects, reads the greeting, sends EHLO (HELO if EHLO is refused),
    /// starts TLS and logs in as `target` specifies.
    ///
    /// # Errors
    /// When the connection, the greeting, EHLO, TLS or AUTH fails.
    pub async fn connect(target: &UpstreamTarget) -> Result<UpstreamConnection, UpstreamError> {
        let config = &target.config;
        let address = config.address.clone();
        let stream = match timeout(config.connect_timeout, TcpStream::connect(&address)).await {
            Err(_) => {
                return Err(UpstreamError::Timeout {
                    address,
                    after: config.connect_timeout,
                    waiting_for: "connect",
                });
            }
            Ok(Err(source)) => return Err(UpstreamError::Connect { address, source }),
            Ok(Ok(stream)) => stream,
        };
        // Every command is one write that waits for its reply; Nagle's
        // algorithm would hold each write for the peer's delayed ACK.
        stream
            .set_nodelay(true)
            .map_err(|source| UpstreamError::Io {
                address: address.clone(),
                source,
            })?;
        let mut connection = UpstreamConnection {
            stream: BufReader::new(UpstreamStream::Plain(stream)),
            address,
            opened: Instant::now(),
            pool_id: target.pool.id(),
            reply_timeout: config.timeout,
            data_timeout: config.data_timeout,
            capabilities: Capabilities::default(),
            in_transaction: false,
        };

        let greeting = connection
            .read_reply(config.connect_timeout, "greeting")
            .await?;
        if greeting.code != 220 {
            return Err(UpstreamError::Refused {
                address: connection.address,
                reply: greeting,
            });
        }
        connection.hello(&target.helo_name).await?;
        connection.start_tls(target).await?;
        connection.authenticate(target).await?;
        Ok(connection)
    }

    /// Says EHLO, or HELO when EHLO is refused, and learns the extensions.
    async fn hello(&mut self, helo_name: &str) -> Result<(), UpstreamError> {
        let ehlo = self.command(&format!("EHLO {helo_name}")).await?;
        if ehlo.code == 250 {
            self.capabilities = Capabilities::from_ehlo(&ehlo);
            return Ok(());
        }
        self.capabilities = Capabilities::default();
        let helo = self.command(&format!("HELO {helo_name}")).await?;
        if helo.code != 250 {
            return Err(UpstreamError::Refused {
                address: self.address.clone(),
                reply: helo,
            });
        }
        Ok(())
    }

    /// Returns whether the session runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.stream.get_ref().is_tls()
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    pub fn opened(&self) -> Instant {
        self.opened
    }

    pub fn pool_id(&self) -> u64 {
        self.pool_id
    }

    /// Sends one command line and returns the upstream's reply.
    ///
    /// # Errors
    /// On a network failure, a timeout or an invalid reply; the connection
    /// is unusable then.
    pub async fn command(&mut self, line: &str) -> Result<Reply, UpstreamError> {
        // Unrequested bytes would be read as the reply to this command, so
        // the session is out of step and cannot be trusted.
        if !self.stream.buffer().is_empty() {
            return Err(UpstreamError::Protocol {
                address: self.address.clone(),
                line: format!(
                    "{} unexpected bytes before {}",
                    self.stream.buffer().len(),
                    line.split(' ').next().unwrap_or("")
                ),
            });
        }
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.write(&bytes).await?;
        let reply = self.read_reply(self.reply_timeout, "command reply").await?;
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        if verb == "MAIL" && reply.is_positive() {
            self.in_transaction = true;
        } else if verb == "RSET" {
            self.in_transaction = false;
        }
        Ok(reply)
    }

    /// Sends a message and returns the final reply (or the upstream's
    /// refusal of DATA itself). `header`, when given, is prepended as one
    /// header field. The message goes as one `BDAT LAST` chunk when the
    /// upstream offers CHUNKING (needed for BINARYMIME content), otherwise
    /// with DATA and dot-stuffing.
    ///
    /// # Errors
    /// On a network failure, a timeout or an invalid reply.
    pub async fn send_message(
        &mut self,
        header: Option<&str>,
        message: &[u8],
    ) -> Result<Reply, SendFailure> {
        let header_length = header.map_or(0, |header| header.len() + 2);
        let mut encoded =
            Vec::with_capacity(header_length + message.len() + message.len() / 64 + 128);
        if self.capabilities.chunking {
            if !self.stream.buffer().is_empty() {
                return Err(SendFailure::NotStarted(UpstreamError::Protocol {
                    address: self.address.clone(),
                    line: "unexpected bytes before BDAT".to_string(),
                }));
            }
            let size = header_length + message.len();
            encoded.extend_from_slice(format!("BDAT {size} LAST\r\n").as_bytes());
            if let Some(header) = header {
                encoded.extend_from_slice(header.as_bytes());
                encoded.extend_from_slice(b"\r\n");
            }
            encoded.extend_from_slice(message);
        } else {
            let reply = self
                .command("DATA")
                .await
                .map_err(SendFailure::NotStarted)?;
            if reply.code == 421 {
                return Err(SendFailure::NotStarted(UpstreamError::Closed {
                    address: self.address.clone(),
                }));
            }
            if reply.code != 354 {
                if reply.is_positive() {
                    // Only 354 invites the message; a 2xx or another 3xx
                    // here means the upstream is out of step.
                    return Err(SendFailure::NotStarted(UpstreamError::Protocol {
                        address: self.address.clone(),
                        line: format!("reply to DATA: {}", reply.one_line()),
                    }));
                }
                return Ok(reply);
            }
            match header {
                None => encode_data(message, &mut encoded),
                Some(header) => {
                    let mut with_header = Vec::with_capacity(header_length + message.len());
                    with_header.extend_from_slice(header.as_bytes());
                    with_header.extend_from_slice(b"\r\n");
                    with_header.extend_from_slice(message);
                    encode_data(&with_header, &mut encoded);
                }
            }
        }
        self.write(&encoded)
            .await
            .map_err(SendFailure::Interrupted)?;
        let reply = self
            .read_reply(self.data_timeout, "reply to the message")
            .await
            .map_err(SendFailure::Interrupted)?;
        if (300..400).contains(&reply.code) {
            return Err(SendFailure::Interrupted(UpstreamError::Protocol {
                address: self.address.clone(),
                line: format!("reply to the message: {}", reply.one_line()),
            }));
        }
        // After a refused message an RSET makes sure the upstream transaction
        // is closed, because a refused BDAT may leave it open.
        self.in_transaction = !reply.is_positive();
        Ok(reply)
    }

    /// Returns true when the upstream has closed the connection or sent
    /// something unasked (such as `421 timeout`), so the session is gone.
    /// Never waits.
    pub fn is_closed(&mut self) -> bool {
        !self.stream.buffer().is_empty() || crate::peer_closed(self.stream.get_mut())
    }

    /// Resets the upstream transaction, if one is open.
    ///
    /// # Errors
    /// When RSET fails; the connection is unusable then.
    pub async fn reset(&mut self) -> Result<(), UpstreamError> {
        if !self.in_transaction {
            return Ok(());
        }
        self.rset().await
    }

    /// Sends RSET whether or not a transaction is open, so a session kept
    /// for another client starts clean and is known to be alive. Waits at
    /// most 5 s (or the reply timeout, when shorter) for the reply.
    ///
    /// # Errors
    /// When RSET fails or times out; the connection is unusable then.
    pub async fn reset_for_reuse(&mut self) -> Result<(), UpstreamError> {
        let limit = Duration::from_secs(5).min(self.reply_timeout);
        match timeout(limit, self.rset()).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::Timeout {
                address: self.address.clone(),
                after: limit,
                waiting_for: "RSET reply",
            }),
        }
    }

    async fn rset(&mut self) -> Result<(), UpstreamError> {
        let reply = self.command("RSET").await?;
        if reply.code != 250 {
            return Err(UpstreamError::Protocol {
                address: self.address.clone(),
                line: reply.one_line(),
            });
        }
        Ok(())
    }

    /// Says QUIT and closes, without waiting long for the reply.
    pub async fn quit(mut self) {
        if self.write(b"QUIT\r\n").await.is_ok() {
            let _ = self
                .read_reply(Duration::from_secs(5).min(self.reply_timeout), "QUIT reply")
                .await;
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), UpstreamError> {
        let stream = self.stream.get_mut();
        // TLS buffers what it encrypts, so the flush is what sends it.
        let write = async {
            stream.write_all(bytes).await?;
            stream.flush().await
        };
        match timeout(self.data_timeout, write).await {
            Err(_) => Err(UpstreamError::Timeout {
                address: self.address.clone(),
                after: self.data_timeout,
                waiting_for: "write",
            }),
            Ok(Err(source)) => Err(UpstreamError::Io {
                address: self.address.clone(),
                source,
            }),
            Ok(Ok(())) => Ok(()),
        }
    }

    async fn read_reply(
        &mut self,
        limit: Duration,
        waiting_for: &'static str,
    ) -> Result<Reply, UpstreamError> {
        match timeout(limit, self.read_reply_lines()).await {
            Err(_) => Err(UpstreamError::Timeout {
                address: self.address.clone(),
                after: limit,
                waiting_for,
            }),
            Ok(result) => result,
        }
    }

    async fn read_reply_lines(&mut self) -> Result<Reply, UpstreamError> {
        let mut code = None;
        let mut lines = Vec::new();
        let mut enhanced = None;
        loop {
            let line = self.read_line().await?;
            let parsed = parse_reply_line(&line).ok_or_else(|| UpstreamError::Protocol {
                address: self.address.clone(),
                line: String::from_utf8_lossy(&line).into_owned(),
            })?;
            if *code.get_or_insert(parsed.code) != parsed.code || lines.len() >= MAX_REPLY_LINES {
                return Err(UpstreamError::Protocol {
                    address: self.address.clone(),
                    line: String::from_utf8_lossy(&line).into_owned(),
                });
            }
            let (line_enhanced, text) = split_enhanced(&parsed.text, parsed.code);
            if lines.is_empty() {
                enhanced = line_enhanced;
            }
            lines.push(sanitize(text));
            if parsed.last {
                return Ok(Reply {
                    code: parsed.code,
                    enhanced,
                    lines,
                });
            }
        }
    }

    async fn read_line(&mut self) -> Result<Vec<u8>, UpstreamError> {
        let mut line = Vec::with_capacity(128);
        loop {
            let buffer = self
                .stream
                .fill_buf()
                .await
                .map_err(|source| UpstreamError::Io {
                    address: self.address.clone(),
                    source,
                })?;
            if buffer.is_empty() {
                return Err(UpstreamError::Closed {
                    address: self.address.clone(),
                });
            }
            let (taken, done) = match buffer.iter().position(|&byte| byte == b'\n') {
                Some(end) => (end + 1, true),
                None => (buffer.len(), false),
            };
            line.extend_from_slice(&buffer[..taken]);
            self.stream.consume(taken);
            if line.len() > MAX_REPLY_LINE {
                return Err(UpstreamError::Protocol {
                    address: self.address.clone(),
                    line: format!("reply line longer than {MAX_REPLY_LINE} octets"),
                });
            }
            if done {
                while matches!(line.last(), Some(b'\n' | b'\r')) {
                    line.pop();
                }
                return Ok(line);
            }
        }
    }
}

struct ReplyLine {
    code: u16,
    last: bool,
    text: String,
}

fn parse_reply_line(line: &[u8]) -> Option<ReplyLine> {
    let digits = line.get(..3)?;
    if !digits.iter().all(u8::is_ascii_digit) || !(b'2'..=b'5').contains(&digits[0]) {
        return None;
    }
    let code = std::str::from_utf8(digits).ok()?.parse().ok()?;
    let (last, text) = match line.get(3) {
        None => (true, &[][..]),
        Some(b' ') => (true, &line[4..]),
        Some(b'-') => (false, &line[4..]),
        Some(_) => return None,
    };
    Some(ReplyLine {
        code,
        last,
        text: String::from_utf8_lossy(text).into_owned(),
    })
}

/// Splits a leading enhanced status code (`5.1.1 user unknown`) whose class
/// matches the reply code.
fn split_enhanced(text: &str, code: u16) -> (Option<String>, &str) {
    let (first, rest) = text.split_once(' ').unwrap_or((text, ""));
    let parts: Vec<&str> = first.split('.').collect();
    let valid = parts.len() == 3
        && parts.iter().all(|part| {
            !part.is_empty() && part.len() <= 3 && part.bytes().all(|b| b.is_ascii_digit())
        })
        && parts[0].parse::<u16>().ok() == Some(code / 100);
    if valid {
        (Some(first.to_string()), rest)
    } else {
        (None, text)
    }
}

/// Extracts the queue id from a final reply such as `250 2.0.0 Ok: queued
/// as 4XyZ12` (Postfix) or `250 OK id=1abc-00` (Exim).
pub fn queue_id(reply: &Reply) -> Option<String> {
    let text = reply.lines.join(" ");
    let id = if let Some(position) = text.find("queued as ") {
        text[position + "queued as ".len()..]
            .split_whitespace()
            .next()
    } else if let Some(position) = text.find("id=") {
        text[position + 3..].split_whitespace().next()
    } else {
        None
    }?;
    let id = id.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    (!id.is_empty()).then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_line_parsing() {
        let line = parse_reply_line(b"250-PIPELINING").expect("valid");
        assert_eq!(line.code, 250);
        assert!(!line.last);
        assert!(parse_reply_line(b"250").expect("bare code").last);
        assert!(parse_reply_line(b"25O ok").is_none());
        assert!(parse_reply_line(b"650 ok").is_none());
        assert!(parse_reply_line(b"250x").is_none());
    }

    #[test]
    fn enhanced_code_split() {
        assert_eq!(
            split_enhanced("5.1.1 user unknown", 550),
            (Some("5.1.1".to_string()), "user unknown")
        );
        assert_eq!(
            split_enhanced("4.1.1 mismatch", 550),
            (None, "4.1.1 mismatch")
        );
        assert_eq!(split_enhanced("Ok", 250), (None, "Ok"));
    }

    #[test]
    fn capabilities_from_ehlo() {
        let reply = Reply {
            code: 250,
            enhanced: None,
            lines: vec![
                "mx.example".into(),
                "PIPELINING".into(),
                "SIZE 10240000".into(),
                "8BITMIME".into(),
                "smtputf8".into(),
            ],
        };
        let capabilities = Capabilities::from_ehlo(&reply);
        assert!(capabilities.pipelining);
        assert_eq!(capabilities.size, Some(10_240_000));
        assert!(capabilities.eight_bit_mime);
        assert!(capabilities.smtputf8);
        assert!(!capabilities.enhanced_status_codes);
    }

    #[test]
    fn queue_id_forms() {
        let postfix = Reply::new(250, "2.0.0", "Ok: queued as 4XyZ12");
        assert_eq!(queue_id(&postfix).as_deref(), Some("4XyZ12"));
        let exim = Reply::new(250, "", "OK id=1abc-00");
        assert_eq!(queue_id(&exim).as_deref(), Some("1abc-00"));
        assert_eq!(queue_id(&Reply::ok("Ok")), None);
    }
}
