//! Errors from talking to a scanning engine: clamd, rspamd or spamd.

use std::io;
use std::time::Duration;

/// A failed scan or ping. Each variant names the engine and its address.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("cannot connect to {engine} at {address}: {source}")]
    Connect {
        engine: &'static str,
        address: String,
        #[source]
        source: io::Error,
    },

    #[error(
        "{engine} at {address} timed out after {} while {stage}",
        humantime::format_duration(*timeout)
    )]
    Timeout {
        engine: &'static str,
        address: String,
        timeout: Duration,
        /// Step in progress, such as "connecting", "sending the message" or
        /// "reading the reply".
        stage: &'static str,
    },

    #[error("i/o error with {engine} at {address} while {stage}: {source}")]
    Io {
        engine: &'static str,
        address: String,
        stage: &'static str,
        #[source]
        source: io::Error,
    },

    /// A reply that does not follow the engine's protocol.
    #[error("unexpected reply from {engine} at {address}: {reply:?}")]
    Protocol {
        engine: &'static str,
        address: String,
        reply: String,
    },

    /// Error reported by the engine itself, such as clamd's "Can't allocate
    /// memory" or spamd's `EX_TEMPFAIL`.
    #[error("{engine} at {address} reported an error: {message:?}")]
    Reported {
        engine: &'static str,
        address: String,
        message: String,
    },

    /// clamd stopped scanning at one of its own limits, such as MaxScanTime.
    /// Retrying later may succeed, unlike a size limit.
    #[error(
        "clamd at {address} stopped at its scan limit {signature}; raise the limit in clamd.conf"
    )]
    ScannerLimit { address: String, signature: String },
}

/// The reason an engine's reply cannot be used, before it is tied to the
/// engine's address as a [`ScanError`].
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyError {
    /// The reply does not follow the protocol; the text describes how.
    Malformed(String),
    /// The engine replied with an error of its own, such as spamd's
    /// `76 Bad header line` or an HTTP 500 from rspamd.
    Reported(String),
}

impl ScanError {
    /// Returns the address of the engine the error is about.
    pub fn address(&self) -> &str {
        match self {
            ScanError::Connect { address, .. }
            | ScanError::Timeout { address, .. }
            | ScanError::Io { address, .. }
            | ScanError::Protocol { address, .. }
            | ScanError::Reported { address, .. }
            | ScanError::ScannerLimit { address, .. } => address,
        }
    }

    /// Returns the engine's name: "clamd", "rspamd" or "spamd".
    pub fn engine(&self) -> &'static str {
        match self {
            ScanError::Connect { engine, .. }
            | ScanError::Timeout { engine, .. }
            | ScanError::Io { engine, .. }
            | ScanError::Protocol { engine, .. }
            | ScanError::Reported { engine, .. } => engine,
            ScanError::ScannerLimit { .. } => "clamd",
        }
    }
}
