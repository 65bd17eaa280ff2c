//! A minimal server-sent-events client over HTTP/1.1 with chunked transfer
//! encoding, for the device event stream tests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One event as received.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: Option<i64>,
    pub event: Option<String>,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|error| panic!("event data is not JSON ({error}): {}", self.data))
    }
}

/// An open event stream.
pub struct SseStream {
    reader: BufReader<TcpStream>,
    pending: String,
    pub status: u16,
}

impl SseStream {
    /// Opens `path` on `address` with a bearer token and, when given, a
    /// `Last-Event-ID`.
    pub fn open(address: &str, path: &str, token: &str, last_event_id: Option<i64>) -> SseStream {
        let mut stream = TcpStream::connect(address).expect("connect to the admin API");
        let mut head = format!(
            "GET {path} HTTP/1.1\r\nHost: {address}\r\nAccept: text/event-stream\r\n\
             Authorization: Bearer {token}\r\n"
        );
        if let Some(id) = last_event_id {
            head.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).expect("send request");
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        reader.read_line(&mut status_line).expect("status line");
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("invalid status line {status_line:?}"));
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("header line");
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        SseStream {
            reader,
            pending: String::new(),
            status,
        }
    }

    /// Returns the next event, or `None` when none arrives within
    /// `timeout` or the stream ends. Comment lines (keep-alives) are
    /// skipped.
    pub fn next_event(&mut self, timeout: Duration) -> Option<SseEvent> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .expect("read timeout");
        loop {
            if let Some(end) = self.pending.find("\n\n") {
                let block: String = self.pending.drain(..end + 2).collect();
                if let Some(event) = parse_block(&block) {
                    return Some(event);
                }
                continue;
            }
            // One chunk: its size in hexadecimal, the data, then CRLF.
            let mut size_line = String::new();
            match self.reader.read_line(&mut size_line) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            let size = usize::from_str_radix(size_line.trim(), 16).ok()?;
            if size == 0 {
                return None;
            }
            let mut data = vec![0; size + 2];
            self.reader.read_exact(&mut data).ok()?;
            data.truncate(size);
            self.pending.push_str(&String::from_utf8_lossy(&data));
        }
    }
}

fn parse_block(block: &str) -> Option<SseEvent> {
    let mut event = SseEvent {
        id: None,
        event: None,
        data: String::new(),
    };
    for line in block.lines() {
        if let Some(value) = line.strip_prefix("data:") {
            event.data.push_str(value.trim_start());
        } else if let Some(value) = line.strip_prefix("id:") {
            event.id = value.trim().parse().ok();
        } else if let Some(value) = line.strip_prefix("event:") {
            event.event = Some(value.trim().to_string());
        }
    }
    (!event.data.is_empty()).then_some(event)
}
