//! The MTA side of the milter protocol (version 6, as Sendmail's libmilter
//! and Postfix speak it), for driving sendguard's milter packet by packet.
//!
//! Each packet is a 4-byte big-endian length (of the command byte and the
//! payload), a command byte and the payload. Strings are NUL-terminated.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const SMFIC_ABORT: u8 = b'A';
pub const SMFIC_BODY: u8 = b'B';
pub const SMFIC_CONNECT: u8 = b'C';
pub const SMFIC_DATA: u8 = b'T';
pub const SMFIC_MACRO: u8 = b'D';
pub const SMFIC_BODYEOB: u8 = b'E';
pub const SMFIC_HELO: u8 = b'H';
pub const SMFIC_HEADER: u8 = b'L';
pub const SMFIC_MAIL: u8 = b'M';
pub const SMFIC_EOH: u8 = b'N';
pub const SMFIC_OPTNEG: u8 = b'O';
pub const SMFIC_QUIT: u8 = b'Q';
pub const SMFIC_RCPT: u8 = b'R';

/// Every end-of-message action of protocol version 6 (SMFIF_ADDHDRS through
/// SMFIF_SETSYMLIST).
pub const ALL_ACTIONS: u32 = 0x1ff;
/// Every protocol option of version 6 (SMFIP_NOCONNECT through
/// SMFIP_HDR_LEADSPC).
pub const ALL_OPTIONS: u32 = 0x1f_ffff;

pub const SMFIF_ADDHDRS: u32 = 0x1;
pub const SMFIP_NOUNKNOWN: u32 = 0x100;
pub const SMFIP_NODATA: u32 = 0x200;
pub const SMFIP_NOHREPL: u32 = 0x80;
pub const SMFIP_NR_CONN: u32 = 0x1000;
pub const SMFIP_NR_HELO: u32 = 0x2000;
pub const SMFIP_NR_MAIL: u32 = 0x4000;
pub const SMFIP_NR_RCPT: u32 = 0x8000;
pub const SMFIP_NR_EOH: u32 = 0x40000;
pub const SMFIP_NR_BODY: u32 = 0x80000;
pub const SMFIP_HDR_LEADSPC: u32 = 0x10_0000;

/// Macro stage numbers in the option negotiation reply.
pub const SMFIM_MAIL: u32 = 2;
pub const SMFIM_EOM: u32 = 5;

/// The milter's reply to the option negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub version: u32,
    pub actions: u32,
    pub options: u32,
    /// Requested macro lists: stage number and space-separated names.
    pub macros: Vec<(u32, String)>,
}

/// One response packet from the milter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Continue,
    Accept,
    Reject,
    Tempfail,
    Discard,
    /// SMFIR_REPLYCODE: the whole reply line, such as `550 5.7.1 text`.
    ReplyCode(String),
    InsertHeader {
        index: u32,
        name: String,
        value: String,
    },
    Other(u8, Vec<u8>),
}

impl Response {
    /// Returns whether this response ends a command (as opposed to a
    /// modification request such as a header insertion).
    pub fn is_final(&self) -> bool {
        !matches!(
            self,
            Response::InsertHeader { .. } | Response::Other(b'p', _)
        )
    }
}

/// The connection to the milter: TCP or a unix socket.
enum Transport {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Transport {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Transport::Tcp(stream) => stream.set_read_timeout(timeout),
            Transport::Unix(stream) => stream.set_read_timeout(timeout),
        }
    }

    fn shutdown(&self) -> io::Result<()> {
        match self {
            Transport::Tcp(stream) => stream.shutdown(Shutdown::Both),
            Transport::Unix(stream) => stream.shutdown(Shutdown::Both),
        }
    }
}

impl Read for Transport {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Tcp(stream) => stream.read(buffer),
            Transport::Unix(stream) => stream.read(buffer),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Tcp(stream) => stream.write(buffer),
            Transport::Unix(stream) => stream.write(buffer),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Tcp(stream) => stream.flush(),
            Transport::Unix(stream) => stream.flush(),
        }
    }
}

pub struct MilterClient {
    stream: Transport,
    /// Protocol options the milter agreed to in the last negotiation. They
    /// tell which commands get a reply.
    options: u32,
}

impl MilterClient {
    /// Connects to a milter on `address` (`host:port`).
    pub fn connect(address: &str) -> MilterClient {
        let stream = TcpStream::connect(address).expect("connect to the milter");
        stream.set_nodelay(true).expect("set TCP_NODELAY");
        MilterClient::with_transport(Transport::Tcp(stream))
    }

    /// Connects to a milter on the unix socket at `path`.
    pub fn connect_unix(path: &Path) -> MilterClient {
        let stream = UnixStream::connect(path).expect("connect to the milter socket");
        MilterClient::with_transport(Transport::Unix(stream))
    }

    fn with_transport(stream: Transport) -> MilterClient {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("set read timeout");
        MilterClient { stream, options: 0 }
    }

    /// Sends one packet.
    pub fn send(&mut self, command: u8, payload: &[u8]) {
        self.try_send(command, payload)
            .expect("write a milter packet");
    }

    pub fn try_send(&mut self, command: u8, payload: &[u8]) -> io::Result<()> {
        let length = u32::try_from(payload.len() + 1).expect("packet under 4 GiB");
        let mut packet = Vec::with_capacity(payload.len() + 5);
        packet.extend_from_slice(&length.to_be_bytes());
        packet.push(command);
        packet.extend_from_slice(payload);
        self.stream.write_all(&packet)
    }

    /// Sends raw bytes, for malformed packets.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write raw bytes");
    }

    /// Reads one response packet; panics on a closed connection.
    pub fn read_response(&mut self) -> Response {
        self.try_read_response().expect("read a milter response")
    }

    pub fn try_read_response(&mut self) -> io::Result<Response> {
        let (command, payload) = self.read_packet()?;
        Ok(parse_response(command, payload))
    }

    fn read_packet(&mut self) -> io::Result<(u8, Vec<u8>)> {
        let mut length = [0u8; 4];
        self.stream.read_exact(&mut length)?;
        let length = u32::from_be_bytes(length) as usize;
        if length == 0 || length > 1 << 20 {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                format!("invalid response length {length}"),
            ));
        }
        let mut packet = vec![0u8; length];
        self.stream.read_exact(&mut packet)?;
        let payload = packet.split_off(1);
        Ok((packet[0], payload))
    }

    /// Offers protocol `version` with `actions` and `options` and returns
    /// the milter's reply.
    pub fn negotiate(&mut self, version: u32, actions: u32, options: u32) -> Negotiated {
        let mut payload = Vec::with_capacity(12);
        payload.extend_from_slice(&version.to_be_bytes());
        payload.extend_from_slice(&actions.to_be_bytes());
        payload.extend_from_slice(&options.to_be_bytes());
        self.send(SMFIC_OPTNEG, &payload);
        let (command, payload) = self.read_packet().expect("option negotiation reply");
        assert_eq!(command, SMFIC_OPTNEG, "reply to SMFIC_OPTNEG");
        let negotiated = parse_negotiated(&payload);
        self.options = negotiated.options;
        negotiated
    }

    /// Negotiates like Postfix 3.7 with `milter_protocol = 6`: every action
    /// and every option offered.
    pub fn negotiate_all(&mut self) -> Negotiated {
        self.negotiate(6, ALL_ACTIONS, ALL_OPTIONS)
    }

    /// Sends macro definitions for the command `stage` (a command byte such
    /// as [`SMFIC_MAIL`]). Values may be empty.
    pub fn macros(&mut self, stage: u8, pairs: &[(&str, &str)]) {
        let mut payload = vec![stage];
        for (name, value) in pairs {
            push_string(&mut payload, name.as_bytes());
            push_string(&mut payload, value.as_bytes());
        }
        self.send(SMFIC_MACRO, &payload);
    }

    /// Sends SMFIC_CONNECT for an IPv4 client and returns the reply, or
    /// `None` when the milter waived it (SMFIP_NR_CONN).
    pub fn connect_info(&mut self, hostname: &str, address: &str, port: u16) -> Option<Response> {
        let mut payload = Vec::new();
        push_string(&mut payload, hostname.as_bytes());
        payload.push(b'4');
        payload.extend_from_slice(&port.to_be_bytes());
        push_string(&mut payload, address.as_bytes());
        self.send(SMFIC_CONNECT, &payload);
        self.reply_unless(SMFIP_NR_CONN)
    }

    /// Sends SMFIC_HELO and returns the reply, or `None` when the milter
    /// waived it (SMFIP_NR_HELO).
    pub fn helo(&mut self, hostname: &str) -> Option<Response> {
        let mut payload = Vec::new();
        push_string(&mut payload, hostname.as_bytes());
        self.send(SMFIC_HELO, &payload);
        self.reply_unless(SMFIP_NR_HELO)
    }

    /// Reads the reply to the command just sent, unless the negotiated
    /// `no_reply` option waived it.
    fn reply_unless(&mut self, no_reply: u32) -> Option<Response> {
        (self.options & no_reply == 0).then(|| self.read_response())
    }

    /// Sends SMFIC_MAIL: the sender path, then ESMTP arguments.
    pub fn mail(&mut self, arguments: &[&str]) {
        self.send(SMFIC_MAIL, &strings(arguments));
    }

    /// Sends SMFIC_RCPT and returns the reply, or `None` when the milter
    /// waived it (SMFIP_NR_RCPT).
    pub fn rcpt(&mut self, arguments: &[&str]) -> Option<Response> {
        self.send(SMFIC_RCPT, &strings(arguments));
        self.reply_unless(SMFIP_NR_RCPT)
    }

    /// Sends SMFIC_DATA and returns the reply, or `None` when the milter
    /// left DATA out (SMFIP_NODATA) and the MTA sends only its macros.
    pub fn data(&mut self) -> Option<Response> {
        if self.options & SMFIP_NODATA != 0 {
            return None;
        }
        self.send(SMFIC_DATA, &[]);
        Some(self.read_response())
    }

    pub fn header(&mut self, name: &str, value: &str) {
        self.send(SMFIC_HEADER, &strings(&[name, value]));
    }

    pub fn end_of_headers(&mut self) {
        self.send(SMFIC_EOH, b"");
    }

    pub fn body(&mut self, chunk: &[u8]) {
        self.send(SMFIC_BODY, chunk);
    }

    /// Sends SMFIC_BODYEOB and returns every response up to and including
    /// the final one.
    pub fn end_of_message(&mut self) -> Vec<Response> {
        self.send(SMFIC_BODYEOB, b"");
        let mut responses = Vec::new();
        // A milter sends a few modification requests at most; 100 bounds
        // the loop against a misbehaving one.
        for _ in 0..100 {
            let response = self.read_response();
            let done = response.is_final();
            responses.push(response);
            if done {
                return responses;
            }
        }
        panic!("no final response after 100 packets: {responses:?}");
    }

    pub fn abort(&mut self) {
        self.send(SMFIC_ABORT, b"");
    }

    pub fn quit(&mut self) {
        let _ = self.try_send(SMFIC_QUIT, b"");
    }

    /// Asserts that the milter sends nothing within `wait`.
    pub fn expect_silence(&mut self, wait: Duration) {
        self.stream
            .set_read_timeout(Some(wait))
            .expect("set read timeout");
        let mut byte = [0u8; 1];
        let result = self.stream.read(&mut byte);
        self.stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("set read timeout");
        match result {
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Ok(0) => panic!("the milter closed the connection"),
            Ok(_) => panic!("unexpected data from the milter: {:#04x}", byte[0]),
            Err(error) => panic!("reading from the milter failed: {error}"),
        }
    }

    /// Reads until the milter closes the connection and returns what it
    /// sent before closing.
    pub fn read_until_closed(&mut self) -> Vec<u8> {
        let mut received = Vec::new();
        match self.stream.read_to_end(&mut received) {
            Ok(_) => received,
            Err(error) if error.kind() == ErrorKind::ConnectionReset => received,
            Err(error) => panic!("the milter did not close the connection: {error}"),
        }
    }

    /// Closes the connection without QUIT.
    pub fn drop_connection(self) {
        let _ = self.stream.shutdown();
    }
}

fn push_string(payload: &mut Vec<u8>, text: &[u8]) {
    payload.extend_from_slice(text);
    payload.push(0);
}

fn strings(texts: &[&str]) -> Vec<u8> {
    let mut payload = Vec::new();
    for text in texts {
        push_string(&mut payload, text.as_bytes());
    }
    payload
}

fn parse_negotiated(payload: &[u8]) -> Negotiated {
    assert!(payload.len() >= 12, "short negotiation reply: {payload:?}");
    let word =
        |index: usize| u32::from_be_bytes(payload[index..index + 4].try_into().expect("4 bytes"));
    let mut macros = Vec::new();
    let mut rest = &payload[12..];
    while rest.len() >= 4 {
        let stage = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes"));
        let names = &rest[4..];
        let end = names
            .iter()
            .position(|&byte| byte == 0)
            .expect("NUL-terminated macro list");
        macros.push((stage, String::from_utf8_lossy(&names[..end]).into_owned()));
        rest = &names[end + 1..];
    }
    Negotiated {
        version: word(0),
        actions: word(4),
        options: word(8),
        macros,
    }
}

fn parse_response(command: u8, payload: Vec<u8>) -> Response {
    let text = |bytes: &[u8]| {
        let end = bytes
            .iter()
            .position(|&byte| byte == 0)
            .unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[..end]).into_owned()
    };
    match command {
        b'c' => Response::Continue,
        b'a' => Response::Accept,
        b'r' => Response::Reject,
        b't' => Response::Tempfail,
        b'd' => Response::Discard,
        b'y' => Response::ReplyCode(text(&payload)),
        b'i' if payload.len() >= 4 => {
            let index = u32::from_be_bytes(payload[..4].try_into().expect("4 bytes"));
            let rest = &payload[4..];
            let name = text(rest);
            let value = text(&rest[name.len() + 1..]);
            Response::InsertHeader { index, name, value }
        }
        other => Response::Other(other, payload),
    }
}
