//! Errors from talking to clamd.

use std::io;
use std::time::Duration;

/// A failed clamd scan or ping. Each variant names the clamd address.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("cannot connect to clamd at {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: io::Error,
    },

    #[error(
        "clamd at {address} timed out after {} while {stage}",
        humantime::format_duration(*timeout)
    )]
    Timeout {
        address: String,
        timeout: Duration,
        /// Step in progress: "connecting", "sending the message" or
        /// "reading the reply".
        stage: &'static str,
    },

    #[error("i/o error with clamd at {address} while {stage}: {source}")]
    Io {
        address: String,
        stage: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("unexpected reply from clamd at {address}: {reply:?}")]
    Protocol { address: String, reply: String },

    /// Error reported by clamd itself, such as "Can't allocate memory".
    #[error("clamd at {address} reported an error: {message:?}")]
    Clamd { address: String, message: String },

    /// clamd stopped scanning at one of its own limits, such as MaxScanTime.
    /// Retrying later may succeed, unlike a size limit.
    #[error(
        "clamd at {address} stopped at its scan limit {signature}; raise the limit in clamd.conf"
    )]
    ScannerLimit { address: String, signature: String },
}

impl ScanError {
    /// Returns the clamd address the error is about.
    pub fn address(&self) -> &str {
        match self {
            ScanError::Connect { address, .. }
            | ScanError::Timeout { address, .. }
            | ScanError::Io { address, .. }
            | ScanError::Protocol { address, .. }
            | ScanError::Clamd { address, .. }
            | ScanError::ScannerLimit { address, .. } => address,
        }
    }
}
