//! sendguard: an outbound mail filter.
//!
//! It relays mail from internal senders to the upstream smarthost, scans
//! every message with clamd and built-in spam rules, counts bad messages per
//! mailbox and locks out a mailbox that keeps sending them, under a
//! doubling schedule that ends in a permanent block.
//!
//! # Logging policy
//! Logs go through `tracing`, one span per SMTP connection carrying the
//! session id and the peer address.
//! - `error`: sendguard cannot do its job (the store cannot be written, a
//!   listener cannot accept), so mail is being tempfailed.
//! - `warn`: a dependency failed and mail is tempfailed or rules were
//!   skipped (clamd or the upstream unreachable), a lockout started, a
//!   reload was refused.
//! - `info`: one line per decision with mailbox, client, transaction id,
//!   verdict and elapsed time; lockout ends; start, reload and stop.
//! - `debug`: each SMTP command and reply.
//!
//! Every error that is caught and not passed on is logged once, with the
//! ids it concerns. Message content and credentials are never logged.

pub mod actions;
pub mod admin;
pub mod agent;
pub mod config;
pub mod directory;
pub mod events;
pub mod guard;
pub mod heartbeat;
pub mod identity;
pub mod maintenance;
pub mod metrics;
pub mod milter;
pub mod policy;
pub mod reply;
pub mod scan;
pub mod server;
pub mod simulate;
pub mod smtp;
pub mod store;
pub mod tls;

/// Returns true when the peer of an idle connection has closed it, or has
/// sent bytes that no request asked for, so the connection cannot be
/// reused. Polls `reader` once and never waits; a consumed byte only
/// matters on a connection that is then dropped.
pub fn peer_closed<R: tokio::io::AsyncRead + Unpin + ?Sized>(reader: &mut R) -> bool {
    let mut probe = [0u8; 1];
    let mut buffer = tokio::io::ReadBuf::new(&mut probe);
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    std::pin::Pin::new(reader)
        .poll_read(&mut context, &mut buffer)
        .is_ready()
}

/// Appends the causes of `error` to `text`, each after ": ", skipping a
/// cause whose text `text` already ends with. HTTP clients keep the reason
/// (such as "Connection refused") in the causes, out of their own message.
pub fn append_causes(text: &mut String, error: &dyn std::error::Error) {
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
}
