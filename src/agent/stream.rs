//! Follows the device's event stream (server-sent events): subnet notices
//! make the agent refresh its unsafe list, and `scan_requested` notices
//! start a scan. After a broken connection or a restart it resumes with
//! the id of the last event handled, kept in the state file, so no notice
//! is lost while the server keeps it. The server deletes notices older
//! than its `events.keep`. The full refresh of the subnet view at every
//! connect covers subnet notices deleted before the agent resumed, but a
//! deleted scan request is not run.

use super::Agent;
use super::state::PendingScan;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Maximum size of one event's text; longer input is dropped.
const MAX_EVENT: usize = 64 * 1024;

/// Maximum wait between two reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// One event as received.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEvent {
    pub id: Option<i64>,
    pub kind: Option<String>,
    pub data: String,
}

/// An incremental server-sent-events parser. It buffers bytes, not text,
/// because a chunk of the stream can end inside a UTF-8 character or
/// between the `\r` and `\n` of a line end.
#[derive(Debug, Default)]
pub struct Parser {
    buffer: Vec<u8>,
}

/// Returns where the first event in `buffer` ends and the length of the
/// blank line after it (`\n\n` or `\r\n\r\n`).
fn event_end(buffer: &[u8]) -> Option<(usize, usize)> {
    (0..buffer.len()).find_map(|index| {
        let rest = &buffer[index..];
        if rest.starts_with(b"\n\n") {
            Some((index, 2))
        } else if rest.starts_with(b"\r\n\r\n") {
            Some((index, 4))
        } else {
            None
        }
    })
}

impl Parser {
    /// Adds received bytes and returns the events they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<StreamEvent> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some((end, blank_line)) = event_end(&self.buffer) {
            let block: Vec<u8> = self.buffer.drain(..end + blank_line).collect();
            let text = String::from_utf8_lossy(&block[..end]).replace("\r\n", "\n");
            if let Some(event) = parse_block(&text) {
                events.push(event);
            }
        }
        if self.buffer.len() > MAX_EVENT {
            tracing::warn!(
                bytes = self.buffer.len(),
                "event stream sent an event over 64 KiB; dropped"
            );
            self.buffer.clear();
        }
        events
    }
}

fn parse_block(block: &str) -> Option<StreamEvent> {
    let mut event = StreamEvent {
        id: None,
        kind: None,
        data: String::new(),
    };
    for line in block.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "data" => {
                if !event.data.is_empty() {
                    event.data.push('\n');
                }
                event.data.push_str(value);
            }
            "id" => event.id = value.trim().parse().ok(),
            "event" => event.kind = Some(value.to_string()),
            // Comment lines (keep-alives) and unknown fields.
            _ => {}
        }
    }
    (!event.data.is_empty()).then_some(event)
}

/// Follows the stream until `shutdown` fires, reconnecting with growing
/// waits.
pub async fn run(agent: Arc<Agent>, mut shutdown: watch::Receiver<bool>) {
    let mut cursor: Option<i64> = agent.state.get().stream_position;
    let mut backoff = Duration::from_secs(1);
    // While the server is away, reconnects fail every few seconds, so their
    // log line is limited like the heartbeat's.
    let mut failures = super::FailureLog::default();
    loop {
        let followed = tokio::select! {
            result = follow(&agent, &mut cursor, &mut failures) => result,
            _ = shutdown.changed() => return,
        };
        match followed {
            Ok(()) => {
                tracing::info!(after = ?cursor, "event stream ended; reconnecting");
                backoff = Duration::from_secs(1);
            }
            Err(error) => {
                if let Some(failed_since_last_line) = failures.failed(Instant::now()) {
                    tracing::warn!(%error, after = ?cursor, retry_in = ?backoff,
                        failed_since_last_line, "event stream failed; reconnecting");
                }
            }
        }
        // A heartbeat that reaches the server ends the wait early.
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = agent.reachable.notified() => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Follows one connection of the stream; returns when it ends.
async fn follow(
    agent: &Agent,
    cursor: &mut Option<i64>,
    failures: &mut super::FailureLog,
) -> Result<(), String> {
    let mut response = agent.api.open_stream(*cursor).await?;
    let start: Option<i64> = response
        .headers()
        .get("sendguard-stream-start")
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.parse().ok());
    if let Some(start) = start
        && *cursor != Some(start)
    {
        if let Some(sent) = *cursor {
            // The server starts at its newest notice when the agent's
            // position is past it, as after its database was replaced.
            tracing::warn!(
                sent,
                start,
                "the server has no notices up to the agent's stream position; resuming from its newest notice"
            );
        }
        // Without a position the stream starts at the newest notice;
        // resuming from there after a reconnect or restart loses nothing
        // even when no event came.
        *cursor = Some(start);
        agent.state.set_stream_position(start);
    }
    match failures.succeeded(Instant::now()) {
        Some((failed, failing_for)) => tracing::info!(after = ?cursor, failed,
            failing_for = ?Duration::from_secs(failing_for.as_secs()), "event stream connected again"),
        None => tracing::info!(after = ?cursor, "event stream connected"),
    }
    agent.contact();
    // Notices sent while the agent was not connected are covered by a
    // full refresh.
    agent.request_refresh();
    let mut parser = Parser::default();
    loop {
        let chunk = response
            .chunk()
            .await
            .map_err(|error| format!("cannot read the event stream: {error}"))?;
        let Some(chunk) = chunk else {
            return Ok(());
        };
        agent.contact();
        for event in parser.feed(&chunk) {
            let id = event.id;
            handle(agent, event);
            // The position is saved only after the event is handled, so a
            // crash in between delivers the event again after a restart.
            if let Some(id) = id {
                *cursor = Some(id);
                agent.state.set_stream_position(id);
            }
        }
    }
}

fn handle(agent: &Agent, event: StreamEvent) {
    let body: Value = match serde_json::from_str(&event.data) {
        Ok(body) => body,
        Err(error) => {
            tracing::warn!(%error, id = ?event.id, "event stream sent an event that is not JSON; ignored");
            return;
        }
    };
    let kind = body["type"]
        .as_str()
        .or(event.kind.as_deref())
        .unwrap_or("");
    tracing::info!(id = ?event.id, kind, device = %body["device"], "notice received");
    if kind == "scan_requested" {
        let Some(notice) = event.id else {
            tracing::warn!(device = %body["device"],
                "event stream sent a scan request without an event id; ignored");
            return;
        };
        // The request is saved as pending before the position moves past
        // it, so a restart during the scan runs it again.
        let request = PendingScan { notice, body };
        if agent.state.add_pending_scan(request) {
            agent.scan_requested.notify_one();
        } else {
            tracing::info!(notice, "scan request already handled; ignored");
        }
    } else {
        agent.request_refresh();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks() {
        let mut parser = Parser::default();
        assert!(
            parser
                .feed(b": keep-alive\n\nid: 7\nevent: device_unsafe\nda")
                .is_empty()
        );
        let events = parser.feed(b"ta: {\"type\":\"device_unsafe\"}\n\n");
        assert_eq!(
            events,
            [StreamEvent {
                id: Some(7),
                kind: Some("device_unsafe".into()),
                data: "{\"type\":\"device_unsafe\"}".into()
            }]
        );
    }

    #[test]
    fn comments_and_crlf_handled() {
        let mut parser = Parser::default();
        let events = parser.feed(b":\r\n\r\nid:9\r\ndata:{}\r\n\r\n");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].id, Some(9));
        assert_eq!(events[0].data, "{}");
    }

    #[test]
    fn character_split_across_chunks() {
        let event = "id: 3\ndata: {\"mailbox\":\"zoé@example.org\"}\n\n".as_bytes();
        let split = event.iter().position(|byte| *byte >= 0x80).expect("é") + 1;
        let mut parser = Parser::default();
        assert!(parser.feed(&event[..split]).is_empty());
        let events = parser.feed(&event[split..]);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data, "{\"mailbox\":\"zoé@example.org\"}");
    }

    #[test]
    fn crlf_split_across_chunks() {
        let mut parser = Parser::default();
        assert!(parser.feed(b"id: 4\r\ndata: {\"n\":1}\r\n\r").is_empty());
        let events = parser.feed(b"\nid: 5\r\ndata: {\"n\":2}\r\n\r\n");
        let data: Vec<&str> = events.iter().map(|event| event.data.as_str()).collect();
        assert_eq!(data, ["{\"n\":1}", "{\"n\":2}"]);
    }
}
