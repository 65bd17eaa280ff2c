//! Socket plumbing shared by the clamd and spamd clients: connecting over
//! TCP or a unix socket, and one deadline for a whole exchange.

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::error::ScanError;

/// A connection to an engine, over TCP or a unix socket.
pub(super) trait Connection: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Connection for T {}

/// An engine's name, address and time limit for one exchange. The address
/// is `host:port`, or an absolute path for a unix socket.
#[derive(Debug, Clone, Copy)]
pub(super) struct Endpoint<'a> {
    pub engine: &'static str,
    pub address: &'a str,
    pub timeout: Duration,
}

impl Endpoint<'_> {
    /// Returns the instant `timeout` from now. A timeout too large to add
    /// (such as "1000years") is cut to one year.
    pub fn deadline(&self) -> Instant {
        let now = Instant::now();
        now.checked_add(self.timeout)
            .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 60 * 60))
    }

    /// Runs `future` until `deadline`, mapping the time-out to
    /// [`ScanError::Timeout`] at `stage`.
    pub async fn within<F: Future>(
        &self,
        deadline: Instant,
        stage: &'static str,
        future: F,
    ) -> Result<F::Output, ScanError> {
        tokio::time::timeout_at(deadline, future)
            .await
            .map_err(|_| ScanError::Timeout {
                engine: self.engine,
                address: self.address.to_string(),
                timeout: self.timeout,
                stage,
            })
    }

    /// Connects with `TCP_NODELAY` set, because requests are written in a
    /// few large writes and Nagle's algorithm would only delay the last one.
    pub async fn connect(&self, deadline: Instant) -> Result<Box<dyn Connection>, ScanError> {
        let connect_error = |source| ScanError::Connect {
            engine: self.engine,
            address: self.address.to_string(),
            source,
        };

        if self.address.starts_with('/') {
            #[cfg(unix)]
            {
                let stream = self
                    .within(
                        deadline,
                        "connecting",
                        tokio::net::UnixStream::connect(self.address),
                    )
                    .await?
                    .map_err(connect_error)?;
                return Ok(Box::new(stream));
            }
            #[cfg(not(unix))]
            {
                return Err(connect_error(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "unix sockets are not supported on this platform",
                )));
            }
        }

        let stream = self
            .within(deadline, "connecting", TcpStream::connect(self.address))
            .await?
            .map_err(connect_error)?;
        stream
            .set_nodelay(true)
            .map_err(|source| self.io_error("connecting", source))?;
        Ok(Box::new(stream))
    }

    pub fn io_error(&self, stage: &'static str, source: io::Error) -> ScanError {
        ScanError::Io {
            engine: self.engine,
            address: self.address.to_string(),
            stage,
            source,
        }
    }

    /// Builds a [`ScanError::Protocol`] quoting at most 200 characters of
    /// `reply`.
    pub fn protocol_error(&self, reply: &str) -> ScanError {
        ScanError::Protocol {
            engine: self.engine,
            address: self.address.to_string(),
            reply: clip(reply, 200),
        }
    }

    /// Builds a [`ScanError::Reported`] quoting at most 200 characters of
    /// the engine's message.
    pub fn reported(&self, message: &str) -> ScanError {
        ScanError::Reported {
            engine: self.engine,
            address: self.address.to_string(),
            message: clip(message, 200),
        }
    }
}

/// Cuts `text` to at most `max` characters.
pub(super) fn clip(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}
