//! Message content: DATA and BDAT reading, then scanning and relaying.

use super::{Envelope, Session, State, Stop, sequence_error};
use crate::config::LongLines;
use crate::guard::MessageDecision;
use crate::reply::Reply;
use crate::smtp::command::{Body, Command};
use crate::smtp::reader::{BareLineEndings, DataReader, normalize_line_endings};
use crate::smtp::upstream::{SendFailure, UpstreamConnection, queue_id};
use std::time::Instant;

/// Maximum message line length allowed by RFC 5322, in octets without CRLF.
const MAX_MESSAGE_LINE: usize = 998;

/// Content received by BDAT chunks in one transaction.
pub(super) struct Chunks {
    message: Vec<u8>,
    received: u64,
    too_large: bool,
    started: Instant,
}

/// A complete message ready for the checks that follow its last octet.
struct Content {
    message: Vec<u8>,
    received: u64,
    too_large: bool,
    bare_line_endings: bool,
    started: Instant,
}

impl Session {
    pub(super) async fn data(&mut self) -> Result<(), Stop> {
        let runtime = self.shared.guard.runtime();
        let smtp = &runtime.config.smtp;
        if let Some(envelope) = &self.envelope {
            if envelope.chunks.is_some() {
                self.queue(&Reply::bad_sequence(
                    "DATA cannot follow BDAT in the same transaction; send RSET first",
                ));
                return Ok(());
            }
            if envelope.body == Some(Body::BinaryMime) {
                self.queue(&Reply::bad_sequence(
                    "BODY=BINARYMIME content must be sent with BDAT",
                ));
                return Ok(());
            }
        }
        let max_size = usize::try_from(smtp.max_message_size).unwrap_or(usize::MAX);
        self.queue(&Reply::start_data());
        self.flush().await.map_err(Stop::Io)?;

        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + smtp.data_timeout;
        let mut reader = DataReader::new(smtp.bare_line_endings, max_size);
        loop {
            let fed = reader.feed(&self.input);
            self.input.drain(..fed.consumed);
            if fed.done {
                break;
            }
            self.read_content(deadline).await?;
        }
        let outcome = reader.finish();
        let content = Content {
            message: outcome.message,
            received: outcome.received,
            too_large: outcome.too_large,
            bare_line_endings: outcome.bare_line_endings,
            started,
        };
        self.finish_message(content).await;
        Ok(())
    }

    /// Reads one BDAT chunk and replies to it: `250` for a chunk taken, the
    /// final upstream reply after the last one. The chunk's octets are
    /// always read, also when the command is refused, so they can never be
    /// taken for commands.
    pub(super) async fn bdat(&mut self, size: u64, last: bool) -> Result<(), Stop> {
        let runtime = self.shared.guard.runtime();
        let smtp = &runtime.config.smtp;
        let command = Command::Bdat { size, last };
        let refusal = sequence_error(self.state, &command);
        let limit = smtp.max_message_size;

        // Keep the chunk only for a transaction that can take it whole.
        let keep = refusal.is_none()
            && self.envelope.as_ref().is_some_and(|envelope| {
                envelope.chunks.as_ref().is_none_or(|chunks| {
                    !chunks.too_large && (chunks.message.len() as u64).saturating_add(size) <= limit
                }) && size <= limit
            });
        // data_timeout covers the whole message, from its first chunk.
        let first_chunk = self
            .envelope
            .as_ref()
            .and_then(|envelope| envelope.chunks.as_ref())
            .map(|chunks| chunks.started);
        let deadline = match first_chunk {
            Some(started) => tokio::time::Instant::from_std(started + smtp.data_timeout),
            None => tokio::time::Instant::now() + smtp.data_timeout,
        };
        if tokio::time::Instant::now() >= deadline {
            tracing::info!("message not complete within data_timeout");
            return Err(Stop::Timeout);
        }
        let chunk = self.read_chunk(size, keep, deadline).await?;

        if let Some(reply) = refusal {
            tracing::debug!(size, "BDAT chunk read and discarded");
            self.queue(&reply);
            if self.count_error() {
                return Err(Stop::Closed);
            }
            return Ok(());
        }
        let Some(envelope) = self.envelope.as_mut() else {
            return Ok(());
        };
        let chunks = envelope.chunks.get_or_insert_with(|| Chunks {
            message: Vec::new(),
            received: 0,
            too_large: false,
            started: Instant::now(),
        });
        chunks.received = chunks.received.saturating_add(size);
        match chunk {
            Some(chunk) if !chunks.too_large => chunks.message.extend_from_slice(&chunk),
            _ => {
                chunks.too_large = true;
                chunks.message = Vec::new();
            }
        }
        if !last {
            self.queue(&Reply::new(250, "2.0.0", format!("{size} octets received")));
            return Ok(());
        }

        let Some(chunks) = envelope.chunks.take() else {
            return Ok(());
        };
        let binary = envelope.body == Some(Body::BinaryMime);
        let mut content = Content {
            message: chunks.message,
            received: chunks.received,
            too_large: chunks.too_large,
            bare_line_endings: false,
            started: chunks.started,
        };
        // Binary content may hold any octets; everything else gets the same
        // line-ending treatment as DATA.
        if !binary && let Some(normalized) = normalize_line_endings(&content.message) {
            content.message = normalized;
            content.bare_line_endings = true;
        }
        self.finish_message(content).await;
        Ok(())
    }

    /// Reads `size` octets of a BDAT chunk from the client, returning them
    /// when `keep` is set and discarding them otherwise.
    async fn read_chunk(
        &mut self,
        size: u64,
        keep: bool,
        deadline: tokio::time::Instant,
    ) -> Result<Option<Vec<u8>>, Stop> {
        let mut remaining = size;
        let mut chunk = Vec::new();
        if keep {
            chunk.reserve(usize::try_from(size).unwrap_or(usize::MAX).min(1 << 20));
        }
        loop {
            let available = usize::try_from(remaining)
                .unwrap_or(usize::MAX)
                .min(self.input.len());
            if keep {
                chunk.extend_from_slice(&self.input[..available]);
            }
            self.input.drain(..available);
            remaining -= available as u64;
            if remaining == 0 {
                return Ok(keep.then_some(chunk));
            }
            self.read_content(deadline).await?;
        }
    }

    /// Applies the size and line policies, gets the Guard's decision, and relays or
    /// rejects the message; the transaction ends either way.
    async fn finish_message(&mut self, content: Content) {
        let runtime = self.shared.guard.runtime();
        let smtp = &runtime.config.smtp;
        let Some(envelope) = self.envelope.take() else {
            return;
        };
        self.state = State::Ready;
        let transaction = self.transaction(&envelope);

        let refusal = if content.too_large {
            tracing::info!(transaction = %transaction.id, received = content.received,
                limit = smtp.max_message_size, "message too large");
            Some(Reply::message_too_large(smtp.max_message_size))
        } else if content.bare_line_endings && smtp.bare_line_endings == BareLineEndings::Reject {
            tracing::info!(transaction = %transaction.id, "message with bare CR or LF rejected");
            Some(Reply::bare_line_ending())
        } else if smtp.long_lines == LongLines::Reject
            && envelope.body != Some(Body::BinaryMime)
            && longest_line(&content.message) > MAX_MESSAGE_LINE
        {
            tracing::info!(transaction = %transaction.id, "message with a line over 998 octets rejected");
            Some(Reply::message_line_too_long(MAX_MESSAGE_LINE))
        } else {
            None
        };
        if let Some(reply) = refusal {
            self.reset_upstream().await;
            self.queue(&reply);
            return;
        }

        let decision = self
            .shared
            .guard
            .check_message(&transaction, &content.message)
            .await;
        let (header, pending) = match decision {
            MessageDecision::Reject(reply) => {
                tracing::info!(transaction = %transaction.id, reply = %reply.one_line(), "message rejected");
                self.reset_upstream().await;
                self.queue(&reply);
                return;
            }
            MessageDecision::Deliver { header, pending } => (header, pending),
        };

        // The upstream may have dropped the idle transaction while the
        // client sent the message and the scanner ran (Postfix allows 300 s,
        // 10 s under stress); a new session with the same envelope takes its
        // place.
        if self
            .upstream
            .as_mut()
            .is_none_or(|upstream| upstream.is_closed())
        {
            tracing::info!(transaction = %transaction.id, "upstream session gone; replaying the envelope");
            if let Err(reply) = self.replay_envelope(&envelope).await {
                self.queue(&reply);
                return;
            }
        }
        let mut replayed = false;
        let reply = loop {
            let Some(upstream) = self.upstream.as_mut() else {
                self.queue(&Reply::upstream_failed());
                return;
            };
            match upstream
                .send_message(header.as_deref(), &content.message)
                .await
            {
                Ok(reply) => break reply,
                Err(SendFailure::NotStarted(error)) if !replayed => {
                    tracing::info!(%error, transaction = %transaction.id,
                        "upstream session failed before the message; replaying the envelope");
                    replayed = true;
                    if let Err(reply) = self.replay_envelope(&envelope).await {
                        self.queue(&reply);
                        return;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, transaction = %transaction.id, "upstream failed during the message");
                    self.upstream = None;
                    self.queue(&Reply::upstream_failed());
                    return;
                }
            }
        };
        let accepted = (200..300).contains(&reply.code);
        let queue_id = accepted.then(|| queue_id(&reply)).flatten();
        tracing::info!(transaction = %transaction.id, sender = %transaction.sender_path,
            recipients = transaction.recipients, size = content.message.len(),
            upstream_reply = %reply.one_line(), queue_id = queue_id.as_deref().unwrap_or(""),
            elapsed_ms = content.started.elapsed().as_secs_f64() * 1000.0, "message relayed");
        if let Some(pending) = pending {
            self.shared.guard.record_delivered(pending, queue_id).await;
        }
        if reply.code == 421 {
            // The upstream closed its session; the client's stays open.
            self.upstream = None;
            self.queue(&Reply::upstream_failed());
            return;
        }
        if !accepted {
            self.reset_upstream().await;
        }
        self.queue(&reply);
    }
}

impl Session {
    /// Opens a new upstream session and sends the transaction's MAIL and
    /// accepted RCPT lines again. A recipient the client was already told
    /// `250` for and that is refused now fails the whole message with a
    /// temporary error, so the client retries it whole.
    pub(super) async fn replay_envelope(&mut self, envelope: &Envelope) -> Result<(), Reply> {
        self.upstream = None;
        let runtime = self.shared.guard.runtime();
        let mut connection = match UpstreamConnection::connect(&runtime.upstream).await {
            Ok(connection) => connection,
            Err(error) => {
                tracing::warn!(%error, transaction = %envelope.id, "upstream unavailable for the replay");
                return Err(Reply::upstream_unavailable());
            }
        };
        for line in &envelope.upstream_lines {
            match connection.command(line).await {
                Ok(reply) if reply.is_positive() => {}
                Ok(reply) => {
                    tracing::warn!(transaction = %envelope.id, command = %line, upstream_reply = %reply.one_line(),
                        "upstream refused the replayed envelope");
                    return Err(Reply::replay_refused());
                }
                Err(error) => {
                    tracing::warn!(%error, transaction = %envelope.id, "upstream failed during the replay");
                    return Err(Reply::upstream_failed());
                }
            }
        }
        self.upstream = Some(connection);
        Ok(())
    }
}

/// Returns the length of the longest line, without its line ending.
fn longest_line(message: &[u8]) -> usize {
    message
        .split(|&byte| byte == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line).len())
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_line_ignores_line_endings() {
        assert_eq!(longest_line(b""), 0);
        assert_eq!(longest_line(b"abc\r\nde\r\n"), 3);
        assert_eq!(longest_line(&[b'x'; 999]), 999);
    }
}
