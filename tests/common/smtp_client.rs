//! Blocking SMTP client for tests, so a dialogue reads one line per step:
//!
//! ```ignore
//! let mut client = SmtpClient::connect(&address);
//! client.expect_greeting(220);
//! client.cmd("EHLO client.example", 250);
//! let reply = client.send_message("alice@example.org", &["bob@example.net"], b"Subject: hi\r\n\r\nhello\r\n");
//! assert_eq!(reply.code, 250);
//! client.quit();
//! ```
//!
//! Every failed expectation panics with the whole dialogue so far. The client
//! is strict about replies: a reply line that does not end in CRLF, or does
//! not start with a three-digit code and a space or hyphen, is an error.

use std::fmt;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::thread;
use std::time::Duration;

/// Read timeout used unless `SmtpClient::set_timeout` changes it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Sent bytes longer than this are shortened in the transcript.
const TRANSCRIPT_CHUNK_LIMIT: usize = 2048;

/// One SMTP reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Text of each line after the code and its separator, so the EHLO reply
    /// lists capabilities such as `PIPELINING` or `SIZE 52428800`.
    pub lines: Vec<String>,
}

impl Reply {
    /// Returns all lines joined with `\n`.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// Returns true when any line contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        self.lines.iter().any(|line| line.contains(needle))
    }

    /// Enhanced status code (RFC 3463) at the start of the first line, such
    /// as `5.7.1`.
    pub fn enhanced_code(&self) -> Option<&str> {
        let first = self.lines.first()?.split(' ').next()?;
        let parts: Vec<&str> = first.split('.').collect();
        let valid = parts.len() == 3
            && parts
                .iter()
                .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()));
        valid.then_some(first)
    }
}

impl fmt::Display for Reply {
    /// Formats the reply as sent on the wire, without the final CRLF.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, line) in self.lines.iter().enumerate() {
            let separator = if index + 1 == self.lines.len() {
                ' '
            } else {
                '-'
            };
            if index > 0 {
                writeln!(formatter)?;
            }
            write!(formatter, "{}{separator}{line}", self.code)?;
        }
        Ok(())
    }
}

/// A connection to an SMTP server with a readable transcript of the dialogue.
pub struct SmtpClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    peer: String,
    greeting: Option<Reply>,
    transcript: String,
}

impl SmtpClient {
    /// Connects to `address` and reads the greeting. Panics when the
    /// connection or the greeting fails.
    pub fn connect(address: &str) -> SmtpClient {
        let mut client = SmtpClient::connect_without_greeting(address);
        let greeting = client.read_reply();
        client.greeting = Some(greeting);
        client
    }

    /// Connects to `address` without reading anything, for tests of what the
    /// server does before or instead of its greeting.
    pub fn connect_without_greeting(address: &str) -> SmtpClient {
        let stream = TcpStream::connect(address)
            .unwrap_or_else(|error| panic!("failed to connect to SMTP server {address}: {error}"));
        SmtpClient::from_stream(address, stream)
    }

    /// Connects to `address` from the local IP address `local_ip` (such as
    /// `127.0.0.2`, since all of 127.0.0.0/8 is loopback on Linux) and reads
    /// the greeting. Panics when the connection or the greeting fails.
    pub fn connect_from(address: &str, local_ip: &str) -> SmtpClient {
        let stream = connect_bound(address, local_ip).unwrap_or_else(|error| {
            panic!("failed to connect to SMTP server {address} from {local_ip}: {error}")
        });
        let mut client = SmtpClient::from_stream(address, stream);
        let greeting = client.read_reply();
        client.greeting = Some(greeting);
        client
    }

    /// Connects from `local_ip` without reading anything.
    pub fn connect_without_greeting_from(address: &str, local_ip: &str) -> SmtpClient {
        let stream = connect_bound(address, local_ip).unwrap_or_else(|error| {
            panic!("failed to connect to SMTP server {address} from {local_ip}: {error}")
        });
        SmtpClient::from_stream(address, stream)
    }

    fn from_stream(address: &str, stream: TcpStream) -> SmtpClient {
        stream
            .set_read_timeout(Some(DEFAULT_TIMEOUT))
            .expect("failed to set the read timeout");
        stream.set_nodelay(true).expect("failed to set TCP_NODELAY");
        let writer = stream
            .try_clone()
            .expect("failed to clone the client stream");
        SmtpClient {
            reader: BufReader::new(stream),
            writer,
            peer: address.to_string(),
            greeting: None,
            transcript: String::new(),
        }
    }

    /// Sets the read timeout for later replies.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.writer
            .set_read_timeout(Some(timeout))
            .expect("failed to set the read timeout");
    }

    /// Greeting read by `connect`.
    pub fn greeting(&self) -> &Reply {
        self.greeting
            .as_ref()
            .expect("no greeting was read: the client was made by connect_without_greeting")
    }

    /// Asserts the greeting's code and returns the greeting.
    pub fn expect_greeting(&self, code: u16) -> &Reply {
        let greeting = self.greeting();
        if greeting.code != code {
            self.fail(&format!(
                "expected greeting code {code}, got {}",
                greeting.code
            ));
        }
        greeting
    }

    /// Sends `line` with CRLF appended and reads the reply, asserting its
    /// code.
    pub fn cmd(&mut self, line: &str, code: u16) -> Reply {
        self.send_line(line);
        self.expect_reply_to(code, line)
    }

    /// Sends `line` with CRLF appended and returns the reply whatever its
    /// code.
    pub fn command(&mut self, line: &str) -> Reply {
        self.send_line(line);
        self.read_reply()
    }

    /// Sends `line` with CRLF appended.
    pub fn send_line(&mut self, line: &str) {
        let mut bytes = line.as_bytes().to_vec();
        bytes.extend_from_slice(b"\r\n");
        self.send_raw(&bytes);
    }

    /// Sends `bytes` unchanged.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.record("C: ", bytes);
        if let Err(error) = self
            .writer
            .write_all(bytes)
            .and_then(|()| self.writer.flush())
        {
            self.fail(&format!("failed to send {} bytes: {error}", bytes.len()));
        }
    }

    /// Reads one reply, single- or multi-line. Panics on a malformed reply,
    /// a timeout or a closed connection.
    pub fn read_reply(&mut self) -> Reply {
        match self.try_read_reply() {
            Ok(reply) => reply,
            Err(error) => self.fail(&format!("failed to read a reply: {error}")),
        }
    }

    /// Reads one reply and asserts its code.
    pub fn expect_reply(&mut self, code: u16) -> Reply {
        self.expect_reply_to(code, "the previous command")
    }

    /// Reads one reply. Returns an `UnexpectedEof` error when the server
    /// closed the connection, `InvalidData` for a malformed reply, and the
    /// socket's error on a timeout.
    pub fn try_read_reply(&mut self) -> io::Result<Reply> {
        let mut code = None;
        let mut lines = Vec::new();
        loop {
            let mut raw = Vec::new();
            self.reader.read_until(b'\n', &mut raw)?;
            if !raw.is_empty() {
                self.record("S: ", &raw);
            }
            if !raw.ends_with(b"\n") {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed after {} bytes of a reply line",
                        raw.len()
                    ),
                ));
            }
            let Some(line) = raw.strip_suffix(b"\r\n") else {
                return Err(invalid_reply("reply line ends in a bare LF", &raw));
            };
            if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
                return Err(invalid_reply(
                    "reply line does not start with a three-digit code",
                    &raw,
                ));
            }
            let line_code: u16 = std::str::from_utf8(&line[..3]).unwrap().parse().unwrap();
            if code.is_some_and(|code| code != line_code) {
                return Err(invalid_reply("reply lines carry different codes", &raw));
            }
            code = Some(line_code);
            let last = match line.get(3) {
                None | Some(b' ') => true,
                Some(b'-') => false,
                Some(_) => {
                    return Err(invalid_reply(
                        "reply code is not followed by a space or hyphen",
                        &raw,
                    ));
                }
            };
            let text = line.get(4..).unwrap_or_default();
            lines.push(String::from_utf8_lossy(text).into_owned());
            if last {
                return Ok(Reply {
                    code: line_code,
                    lines,
                });
            }
        }
    }

    /// Sends DATA, expects 354, sends `payload` unchanged and asserts the
    /// final reply's code. `payload` must already be dot-stuffed and end with
    /// CRLF.CRLF (see `data_payload`).
    pub fn data(&mut self, payload: &[u8], code: u16) -> Reply {
        self.cmd("DATA", 354);
        self.send_raw(payload);
        self.expect_reply_to(code, "the message content")
    }

    /// Sends one message with MAIL, RCPT for each recipient and DATA,
    /// asserting 250 for MAIL and each RCPT and 354 for DATA. The content is
    /// dot-stuffed and, when it does not end in CRLF, gets a final CRLF.
    /// Returns the reply to the end of DATA whatever its code.
    pub fn send_message(&mut self, from: &str, recipients: &[&str], content: &[u8]) -> Reply {
        self.cmd(&format!("MAIL FROM:<{from}>"), 250);
        for recipient in recipients {
            self.cmd(&format!("RCPT TO:<{recipient}>"), 250);
        }
        self.cmd("DATA", 354);
        self.send_raw(&data_payload(content));
        self.read_reply()
    }

    /// Sends QUIT and expects 221.
    pub fn quit(&mut self) {
        self.cmd("QUIT", 221);
    }

    /// Asserts that the server closes the connection, with or without a
    /// final reply, before the read timeout. Returns the reply read before
    /// the close, if any.
    pub fn expect_closed(&mut self) -> Option<Reply> {
        let mut last_reply = None;
        loop {
            let available = self.reader.fill_buf().map(|buffer| buffer.len());
            match available {
                Ok(0) => return last_reply,
                Ok(_) => match self.try_read_reply() {
                    Ok(reply) if last_reply.is_none() => last_reply = Some(reply),
                    Ok(reply) => self.fail(&format!(
                        "expected the connection to close, got a second reply {}",
                        reply.code
                    )),
                    Err(error) if error.kind() == ErrorKind::UnexpectedEof => return last_reply,
                    Err(error) => self.fail(&format!("expected the connection to close: {error}")),
                },
                Err(error) if error.kind() == ErrorKind::ConnectionReset => return last_reply,
                Err(error) => self.fail(&format!("expected the connection to close: {error}")),
            }
        }
    }

    /// Reads whatever the server sends until it closes the connection, for
    /// tests that look at raw bytes.
    pub fn read_to_end(&mut self) -> Vec<u8> {
        let mut bytes = Vec::new();
        if let Err(error) = self.reader.read_to_end(&mut bytes) {
            self.fail(&format!(
                "failed to read until the connection closed: {error}"
            ));
        }
        self.record("S: ", &bytes);
        bytes
    }

    /// Dialogue so far, one line per line sent (`C: `) or received (`S: `),
    /// with control bytes and non-ASCII bytes escaped.
    pub fn transcript(&self) -> &str {
        &self.transcript
    }

    fn expect_reply_to(&mut self, code: u16, request: &str) -> Reply {
        let reply = self.read_reply();
        if reply.code != code {
            self.fail(&format!(
                "expected {code} in reply to {request}, got:\n{reply}"
            ));
        }
        reply
    }

    fn record(&mut self, prefix: &str, bytes: &[u8]) {
        let excerpt = &bytes[..bytes.len().min(TRANSCRIPT_CHUNK_LIMIT)];
        for line in excerpt.split_inclusive(|byte| *byte == b'\n') {
            let line = line.strip_suffix(b"\r\n").unwrap_or(line);
            self.transcript.push_str(prefix);
            self.transcript.push_str(&line.escape_ascii().to_string());
            self.transcript.push('\n');
        }
        if bytes.len() > excerpt.len() {
            self.transcript.push_str(&format!(
                "{prefix}[{} more bytes not shown]\n",
                bytes.len() - excerpt.len()
            ));
        }
    }

    fn fail(&self, message: &str) -> ! {
        panic!(
            "SMTP dialogue with {}: {message}\n--- transcript ---\n{}",
            self.peer, self.transcript
        );
    }
}

/// Opens a TCP connection to `address` from `local_ip`. std cannot bind
/// before connecting, so tokio's `TcpSocket` does it on a thread of its own,
/// which keeps this usable from inside a tokio test too.
fn connect_bound(address: &str, local_ip: &str) -> io::Result<TcpStream> {
    let remote = address.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(
            ErrorKind::InvalidInput,
            format!("address {address} resolves to nothing"),
        )
    })?;
    let local_ip: IpAddr = local_ip.parse().map_err(|error| {
        io::Error::new(
            ErrorKind::InvalidInput,
            format!("invalid local IP address {local_ip}: {error}"),
        )
    })?;

    thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        runtime.block_on(async {
            let socket = if remote.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.bind(SocketAddr::new(local_ip, 0))?;
            let stream = socket.connect(remote).await?.into_std()?;
            stream.set_nonblocking(false)?;
            Ok(stream)
        })
    })
    .join()
    .map_err(|_| io::Error::other("the connecting thread panicked"))?
}

fn invalid_reply(problem: &str, raw: &[u8]) -> io::Error {
    io::Error::new(
        ErrorKind::InvalidData,
        format!("{problem}: {}", raw.escape_ascii()),
    )
}

/// Dot-stuffs `content`: adds a `.` before every line that starts with `.`.
/// Lines start at the beginning of the content and after each CRLF, as in
/// RFC 5321, so a dot after a bare LF is left alone.
pub fn stuff(content: &[u8]) -> Vec<u8> {
    let mut stuffed = Vec::with_capacity(content.len() + 16);
    let mut at_line_start = true;
    for (index, byte) in content.iter().enumerate() {
        if at_line_start && *byte == b'.' {
            stuffed.push(b'.');
        }
        stuffed.push(*byte);
        at_line_start = *byte == b'\n' && index > 0 && content[index - 1] == b'\r';
    }
    stuffed
}

/// Builds what follows a 354 reply: `content` dot-stuffed, a CRLF added when
/// it does not end in one, and the terminating `.` line.
pub fn data_payload(content: &[u8]) -> Vec<u8> {
    let mut payload = stuff(content);
    if !content.is_empty() && !content.ends_with(b"\r\n") {
        payload.extend_from_slice(b"\r\n");
    }
    payload.extend_from_slice(b".\r\n");
    payload
}
