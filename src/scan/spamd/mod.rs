//! spamd client: the SPAMC/1.5 protocol of SpamAssassin's daemon over TCP
//! or a unix socket. One connection per message, which spamd closes after
//! its reply.

mod config;
mod reply;

pub use config::{DEFAULT_SPAMD_TIMEOUT, SpamdCommand, SpamdConfig};
pub use reply::{SpamdReply, parse_reply};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::error::{ReplyError, ScanError};
use super::net::{Connection, Endpoint};
use super::verdict::Verdict;

/// Longest reply read from spamd. A SYMBOLS reply lists rule names, a few
/// hundred bytes in practice.
const MAX_REPLY_LEN: usize = 64 * 1024;

/// Most rule names a verdict keeps, in spamd's order (alphabetical, because
/// spamd's reply carries no per-rule scores).
const MAX_SYMBOLS: usize = 10;

fn endpoint(config: &SpamdConfig) -> Endpoint<'_> {
    Endpoint {
        engine: "spamd",
        address: &config.address,
        timeout: config.timeout,
    }
}

/// Sends `message` to spamd with the configured command and returns its
/// parsed reply.
///
/// # Errors
/// When spamd cannot be reached, times out, closes early, replies with a
/// non-zero status or breaks the protocol.
pub async fn check(config: &SpamdConfig, message: &[u8]) -> Result<SpamdReply, ScanError> {
    let endpoint = endpoint(config);
    let deadline = endpoint.deadline();
    let mut connection = endpoint.connect(deadline).await?;

    let request = request_head(config, message.len());
    // Closing the write side, as spamc does, tells spamd the message is
    // complete: spamd 4.0 otherwise waits for its own 30 s timeout on a
    // message that does not end in a line break.
    let write = async {
        connection.write_all(request.as_bytes()).await?;
        connection.write_all(message).await?;
        connection.shutdown().await
    };
    match endpoint
        .within(deadline, "sending the message", write)
        .await?
    {
        Ok(()) => read_reply(&endpoint, &mut connection, deadline).await,
        // spamd replies to a bad request at once and closes, so a write can
        // fail while its reply is waiting to be read.
        Err(source) => match read_reply(&endpoint, &mut connection, deadline).await {
            Ok(reply) => Ok(reply),
            Err(error @ ScanError::Reported { .. }) => Err(error),
            Err(_) => Err(endpoint.io_error("sending the message", source)),
        },
    }
}

/// Sends PING and returns spamd's reply, such as "SPAMD/1.5 0 PONG".
pub async fn ping(config: &SpamdConfig) -> Result<String, ScanError> {
    let endpoint = endpoint(config);
    let deadline = endpoint.deadline();
    let mut connection = endpoint.connect(deadline).await?;
    let exchange = async {
        connection.write_all(b"PING SPAMC/1.5\r\n\r\n").await?;
        connection.flush().await?;
        let mut reply = Vec::new();
        (&mut connection)
            .take(MAX_REPLY_LEN as u64)
            .read_to_end(&mut reply)
            .await?;
        Ok::<_, std::io::Error>(reply)
    };
    let reply = endpoint
        .within(deadline, "waiting for PONG", exchange)
        .await?
        .map_err(|source| endpoint.io_error("waiting for PONG", source))?;
    let line = String::from_utf8_lossy(&reply).trim().to_string();
    if line.starts_with("SPAMD/") && line.ends_with("PONG") {
        Ok(line)
    } else {
        Err(endpoint.protocol_error(&line))
    }
}

/// Returns the verdict for a reply: spam when `threshold` is set and the
/// score reaches it, or else when spamd's own verdict is spam.
pub fn verdict(config: &SpamdConfig, reply: &SpamdReply) -> Verdict {
    let spam = match config.threshold {
        Some(threshold) => reply.score >= threshold,
        None => reply.spam,
    };
    if !spam {
        return Verdict::Clean;
    }
    Verdict::Spam {
        engine: "spamd".to_string(),
        score: Some(reply.score),
        action: None,
        rules: reply.symbols.iter().take(MAX_SYMBOLS).cloned().collect(),
    }
}

/// Builds the request line and headers. The user name was checked at
/// configuration time to hold no spaces or line breaks.
fn request_head(config: &SpamdConfig, length: usize) -> String {
    let mut head = format!(
        "{} SPAMC/1.5\r\nContent-length: {length}\r\n",
        config.command.as_str()
    );
    if let Some(user) = &config.user {
        head.push_str(&format!("User: {user}\r\n"));
    }
    head.push_str("\r\n");
    head
}

/// Reads until the reply is complete or spamd closes the connection.
async fn read_reply(
    endpoint: &Endpoint<'_>,
    connection: &mut Box<dyn Connection>,
    deadline: Instant,
) -> Result<SpamdReply, ScanError> {
    let mut reply = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let read = endpoint
            .within(deadline, "reading the reply", connection.read(&mut buffer))
            .await?
            .map_err(|source| endpoint.io_error("reading the reply", source))?;
        reply.extend_from_slice(&buffer[..read]);
        if reply.len() > MAX_REPLY_LEN {
            return Err(endpoint.protocol_error(&format!(
                "reply longer than {MAX_REPLY_LEN} bytes: {}",
                String::from_utf8_lossy(&reply)
            )));
        }
        match parse_reply(&reply) {
            Ok(Some(parsed)) => return Ok(parsed),
            Ok(None) if read == 0 => {
                let text = String::from_utf8_lossy(&reply);
                return Err(endpoint.protocol_error(&if text.is_empty() {
                    "connection closed without a reply".to_string()
                } else {
                    format!("connection closed in the middle of the reply: {text}")
                }));
            }
            Ok(None) => {}
            Err(ReplyError::Reported(message)) => return Err(endpoint.reported(&message)),
            Err(ReplyError::Malformed(reason)) => {
                return Err(endpoint
                    .protocol_error(&format!("{reason}: {}", String::from_utf8_lossy(&reply))));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_head_forms() {
        let mut config = SpamdConfig {
            address: "127.0.0.1:783".to_string(),
            ..SpamdConfig::default()
        };
        assert_eq!(
            request_head(&config, 120),
            "SYMBOLS SPAMC/1.5\r\nContent-length: 120\r\n\r\n"
        );
        config.command = SpamdCommand::Check;
        config.user = Some("sendguard".to_string());
        assert_eq!(
            request_head(&config, 0),
            "CHECK SPAMC/1.5\r\nContent-length: 0\r\nUser: sendguard\r\n\r\n"
        );
    }

    #[test]
    fn verdict_follows_spamd_or_threshold() {
        let reply = SpamdReply {
            spam: false,
            score: 4.2,
            threshold: 5.0,
            symbols: (0..12).map(|index| format!("RULE_{index:02}")).collect(),
        };
        let mut config = SpamdConfig::default();
        assert_eq!(verdict(&config, &reply), Verdict::Clean);

        config.threshold = Some(4.0);
        match verdict(&config, &reply) {
            Verdict::Spam {
                engine,
                score,
                action,
                rules,
            } => {
                assert_eq!(engine, "spamd");
                assert_eq!(score, Some(4.2));
                assert_eq!(action, None);
                assert_eq!(rules.len(), MAX_SYMBOLS);
                assert_eq!(rules[0], "RULE_00");
            }
            other => panic!("expected spam, got {other:?}"),
        }

        // A threshold above spamd's own overrides its spam verdict too.
        let spam = SpamdReply {
            spam: true,
            score: 6.0,
            ..reply
        };
        config.threshold = Some(8.0);
        assert_eq!(verdict(&config, &spam), Verdict::Clean);
        config.threshold = None;
        assert_eq!(verdict(&config, &spam).kind(), "spam");
    }
}
