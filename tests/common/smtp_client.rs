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
//!
//! `starttls` upgrades the connection (RFC 3207) with rustls's blocking
//! `StreamOwned`, and every later read and write goes through TLS.

use std::fmt;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use super::tls::{Transport, complete_handshake};

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
    /// Reads and writes the dialogue. Writes go to the inner transport
    /// through `get_mut`, which leaves the read buffer alone.
    stream: BufReader<Transport<ClientConnection>>,
    /// Clone of the TCP socket, for socket options once TLS owns the stream.
    socket: TcpStream,
    peer: String,
    greeting: Option<Reply>,
    transcript: String,
    /// Bytes the server sent after its reply to STARTTLS and before the TLS
    /// handshake, which the client discarded.
    discarded_before_tls: Vec<u8>,
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
        let socket = stream
            .try_clone()
            .expect("failed to clone the client stream");
        SmtpClient {
            stream: BufReader::new(Transport::Plain(stream)),
            socket,
            peer: address.to_string(),
            greeting: None,
            transcript: String::new(),
            discarded_before_tls: Vec::new(),
        }
    }

    /// Sets the read timeout for later replies and TLS handshakes.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.socket
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
        let transport = self.stream.get_mut();
        if let Err(error) = transport.write_all(bytes).and_then(|()| transport.flush()) {
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
            let result = self.stream.read_until(b'\n', &mut raw);
            if !raw.is_empty() {
                self.record("S: ", &raw);
            }
            result?;
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

    /// Sends STARTTLS, expects 220 and performs the TLS handshake on the same
    /// TCP connection, verifying the server's certificate with `config` for
    /// `server_name` (a DNS name or an IP address). Every later read and
    /// write goes through TLS. The server's EHLO reply from before TLS no
    /// longer applies, so the caller sends EHLO again (RFC 3207, 4.2).
    /// Panics when the reply is not 220 or the handshake fails.
    pub fn starttls(&mut self, config: Arc<ClientConfig>, server_name: &str) {
        self.send_raw_then_starttls(b"", config, server_name);
    }

    /// Sends STARTTLS and asserts a reply with `code`, for servers that
    /// reject it. Use `starttls` when the server is expected to accept.
    pub fn starttls_expect(&mut self, code: u16) -> Reply {
        self.cmd("STARTTLS", code)
    }

    /// Writes `STARTTLS\r\n` followed by `pipelined_after` in one write, so
    /// that both arrive in the same packet, then expects 220 and performs
    /// the handshake as `starttls` does. A server must not execute the
    /// plaintext `pipelined_after` inside the TLS session, which this makes
    /// testable. Panics when the reply is not 220 or the handshake fails.
    pub fn send_raw_then_starttls(
        &mut self,
        pipelined_after: &[u8],
        config: Arc<ClientConfig>,
        server_name: &str,
    ) {
        if let Err(error) = self.try_send_raw_then_starttls(pipelined_after, config, server_name) {
            self.fail(&error.to_string());
        }
    }

    /// Like `starttls`, but returns a rejected STARTTLS or a failed
    /// handshake as an error instead of panicking.
    pub fn try_starttls(
        &mut self,
        config: Arc<ClientConfig>,
        server_name: &str,
    ) -> Result<(), StartTlsError> {
        self.try_send_raw_then_starttls(b"", config, server_name)
    }

    /// Like `send_raw_then_starttls`, but returns a rejected STARTTLS or a
    /// failed handshake as an error instead of panicking. After a failed
    /// handshake the client has shut down the socket, and any later read or
    /// write fails.
    pub fn try_send_raw_then_starttls(
        &mut self,
        pipelined_after: &[u8],
        config: Arc<ClientConfig>,
        server_name: &str,
    ) -> Result<(), StartTlsError> {
        if self.is_tls() {
            self.fail("STARTTLS requested on a connection that already uses TLS");
        }
        let name = match ServerName::try_from(server_name.to_string()) {
            Ok(name) => name,
            Err(error) => self.fail(&format!("invalid TLS server name {server_name:?}: {error}")),
        };
        let mut bytes = b"STARTTLS\r\n".to_vec();
        bytes.extend_from_slice(pipelined_after);
        self.send_raw(&bytes);

        let reply = self.try_read_reply().map_err(StartTlsError::ReadFailed)?;
        if reply.code != 220 {
            return Err(StartTlsError::Rejected(reply));
        }
        self.handshake(config, name, server_name)
            .map_err(StartTlsError::HandshakeFailed)
    }

    /// Returns true after a successful TLS handshake.
    pub fn is_tls(&self) -> bool {
        self.stream.get_ref().is_tls()
    }

    /// The rustls connection after a successful handshake, for checks of
    /// the negotiated protocol version or the server's certificates.
    pub fn tls_connection(&self) -> Option<&ClientConnection> {
        match self.stream.get_ref() {
            Transport::Tls(stream) => Some(&stream.conn),
            _ => None,
        }
    }

    /// Bytes that the server sent after its 220 reply to STARTTLS and that
    /// had arrived by the time the client read that reply. The client
    /// discards them, as RFC 3207 requires, and keeps them here. Bytes that
    /// arrive later are fed to the TLS handshake and usually make it fail.
    pub fn discarded_before_tls(&self) -> &[u8] {
        &self.discarded_before_tls
    }

    /// Performs the client side of the TLS handshake on the TCP socket and
    /// switches the transport to TLS.
    fn handshake(
        &mut self,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
        server_name: &str,
    ) -> io::Result<()> {
        let buffered = self.stream.buffer().to_vec();
        if !buffered.is_empty() {
            self.record("S (discarded before TLS): ", &buffered);
            self.discarded_before_tls.extend_from_slice(&buffered);
        }
        let plain = std::mem::replace(&mut self.stream, BufReader::new(Transport::Detached));
        let mut socket = plain.into_inner().into_plain();

        let result = ClientConnection::new(config, name)
            .map_err(|error| io::Error::new(ErrorKind::InvalidInput, error))
            .and_then(|mut connection| {
                complete_handshake(&mut connection, &mut socket)?;
                Ok(connection)
            });
        match result {
            Ok(connection) => {
                let note = format!(
                    "-- TLS established with {server_name}: {:?}, {:?}\n",
                    connection.protocol_version(),
                    connection
                        .negotiated_cipher_suite()
                        .map(|suite| suite.suite()),
                );
                self.transcript.push_str(&note);
                self.stream = BufReader::new(Transport::Tls(Box::new(StreamOwned::new(
                    connection, socket,
                ))));
                Ok(())
            }
            Err(error) => {
                self.transcript.push_str(&format!(
                    "-- TLS handshake with {server_name} failed: {error}\n"
                ));
                let _ = socket.shutdown(Shutdown::Both);
                Err(error)
            }
        }
    }

    /// Asserts that the server closes the connection, with or without a
    /// final reply, before the read timeout. Returns the reply read before
    /// the close, if any.
    pub fn expect_closed(&mut self) -> Option<Reply> {
        let mut last_reply = None;
        loop {
            let available = self.stream.fill_buf().map(|buffer| buffer.len());
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
                // rustls reports a TCP close without a TLS close_notify alert
                // this way.
                Err(error) if error.kind() == ErrorKind::UnexpectedEof => return last_reply,
                Err(error) => self.fail(&format!("expected the connection to close: {error}")),
            }
        }
    }

    /// Reads whatever the server sends until it closes the connection, for
    /// tests that look at raw bytes.
    pub fn read_to_end(&mut self) -> Vec<u8> {
        let mut bytes = Vec::new();
        let result = self.stream.read_to_end(&mut bytes);
        self.record("S: ", &bytes);
        match result {
            Ok(_) => {}
            // A TCP close without a TLS close_notify alert.
            Err(error) if error.kind() == ErrorKind::UnexpectedEof && self.is_tls() => {}
            Err(error) => self.fail(&format!(
                "failed to read until the connection closed: {error}"
            )),
        }
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

/// Failure of `try_starttls` or `try_send_raw_then_starttls`.
#[derive(Debug)]
pub enum StartTlsError {
    /// The server replied to STARTTLS with a code other than 220.
    Rejected(Reply),
    /// Reading the reply to STARTTLS failed, for example because the server
    /// closed the connection.
    ReadFailed(io::Error),
    /// The TLS handshake failed. `rustls_error` returns rustls's own error,
    /// such as an untrusted certificate.
    HandshakeFailed(io::Error),
}

impl StartTlsError {
    /// Returns the rustls error behind a failed handshake, if there is one.
    pub fn rustls_error(&self) -> Option<&rustls::Error> {
        match self {
            StartTlsError::HandshakeFailed(error) => {
                error.get_ref()?.downcast_ref::<rustls::Error>()
            }
            _ => None,
        }
    }
}

impl fmt::Display for StartTlsError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartTlsError::Rejected(reply) => {
                write!(
                    formatter,
                    "expected 220 in reply to STARTTLS, got:\n{reply}"
                )
            }
            StartTlsError::ReadFailed(error) => {
                write!(formatter, "failed to read the reply to STARTTLS: {error}")
            }
            StartTlsError::HandshakeFailed(error) => {
                write!(formatter, "TLS handshake failed: {error}")
            }
        }
    }
}

impl std::error::Error for StartTlsError {}

fn invalid_reply(problem: &str, raw: &[u8]) -> io::Error {
    io::Error::new(
        ErrorKind::InvalidData,
        format!("{problem}: {}", raw.escape_ascii()),
    )
}

/// Opens a session, sends EHLO and one message; returns the code of
/// MAIL FROM when it is refused, else the final reply code.
pub fn send_from(address: &str, from: &str, content: &[u8]) -> (u16, String) {
    let mut client = SmtpClient::connect(address);
    client.cmd("EHLO client.test", 250);
    let reply = client.command(&format!("MAIL FROM:<{from}>"));
    if reply.code != 250 {
        client.quit();
        return (reply.code, reply.text());
    }
    client.cmd("RCPT TO:<bob@example.net>", 250);
    client.cmd("DATA", 354);
    client.send_raw(&data_payload(content));
    let reply = client.read_reply();
    client.quit();
    (reply.code, reply.text())
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
