//! STARTTLS and SMTP AUTH towards the upstream.

use super::{UpstreamConnection, UpstreamError};
use crate::config::{UpstreamConfig, UpstreamTls};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use std::io;
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;

/// The upstream connection, before or after STARTTLS.
pub(super) type UpstreamStream = crate::tls::MaybeTls<TlsStream<TcpStream>>;

/// SMTP AUTH credentials; the password never reaches a log.
struct Credentials {
    username: String,
    password: String,
}

/// Everything needed to open an upstream session: the settings, the TLS
/// connector and the AUTH credentials read from their file.
pub struct UpstreamTarget {
    pub config: UpstreamConfig,
    /// Name sent in EHLO.
    pub helo_name: String,
    tls: Option<TlsConnector>,
    server_name: ServerName<'static>,
    credentials: Option<Credentials>,
    /// Idle sessions kept for the next client sessions.
    pub pool: super::pool::UpstreamPool,
}

impl UpstreamTarget {
    /// Builds the target, reading the password file and the CA file.
    ///
    /// # Errors
    /// When a file cannot be read or the TLS name is invalid.
    pub fn new(config: &UpstreamConfig, helo_name: &str) -> Result<UpstreamTarget, String> {
        let tls = match config.tls {
            UpstreamTls::None => None,
            UpstreamTls::Starttls => Some(crate::tls::opportunistic_connector()?),
            UpstreamTls::Required => {
                Some(crate::tls::verifying_connector(config.ca_file.as_deref())?)
            }
        };
        let name = match &config.tls_name {
            Some(name) => name.clone(),
            None => host_of(&config.address).to_string(),
        };
        let server_name = ServerName::try_from(name.clone()).map_err(|error| {
            format!("upstream.tls_name: {name:?} is not a valid host name: {error}")
        })?;
        let credentials = match (&config.username, &config.password_file) {
            (Some(username), Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|error| {
                    format!(
                        "upstream.password_file: cannot read {}: {error}",
                        path.display()
                    )
                })?;
                let password = text.lines().next().unwrap_or("").to_string();
                if password.is_empty() {
                    return Err(format!(
                        "upstream.password_file: {} is empty",
                        path.display()
                    ));
                }
                Some(Credentials {
                    username: username.clone(),
                    password,
                })
            }
            _ => None,
        };
        Ok(UpstreamTarget {
            pool: super::pool::UpstreamPool::new(config),
            config: config.clone(),
            helo_name: helo_name.to_string(),
            tls,
            server_name,
            credentials,
        })
    }
}

/// Returns the host part of `host:port` or `[v6]:port`.
fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

impl UpstreamConnection {
    /// Starts TLS when `target` asks for it and the upstream offers it, then
    /// says EHLO again, as RFC 3207 requires.
    pub(super) async fn start_tls(&mut self, target: &UpstreamTarget) -> Result<(), UpstreamError> {
        let Some(connector) = &target.tls else {
            return Ok(());
        };
        if !self.capabilities.starttls {
            if target.config.tls == UpstreamTls::Required {
                return Err(UpstreamError::TlsUnavailable {
                    address: self.address.clone(),
                });
            }
            tracing::debug!(upstream = %self.address, "upstream offers no STARTTLS; continuing without TLS");
            return Ok(());
        }
        let reply = self.command("STARTTLS").await?;
        if reply.code != 220 {
            if target.config.tls == UpstreamTls::Required {
                return Err(UpstreamError::Refused {
                    address: self.address.clone(),
                    reply,
                });
            }
            tracing::warn!(upstream = %self.address, upstream_reply = %reply.one_line(),
                "upstream refused STARTTLS; continuing without TLS");
            return Ok(());
        }

        // Bytes the upstream sent after its 220 were not protected by TLS,
        // so they are dropped with the buffer, never read as replies.
        if !self.stream.buffer().is_empty() {
            tracing::warn!(upstream = %self.address, bytes = self.stream.buffer().len(),
                "upstream sent data after its STARTTLS reply; discarded");
        }
        let old = std::mem::replace(&mut self.stream, BufReader::new(UpstreamStream::Upgrading));
        let mut inner = old.into_inner();
        let Some(tcp) = inner.take_plain() else {
            return Err(UpstreamError::Tls {
                address: self.address.clone(),
                source: io::Error::other("TLS is already active"),
            });
        };
        let handshake = connector.connect(target.server_name.clone(), tcp);
        let tls = match timeout(target.config.connect_timeout, handshake).await {
            Err(_) => {
                return Err(UpstreamError::Timeout {
                    address: self.address.clone(),
                    after: target.config.connect_timeout,
                    waiting_for: "TLS handshake",
                });
            }
            Ok(Err(source)) => {
                return Err(UpstreamError::Tls {
                    address: self.address.clone(),
                    source,
                });
            }
            Ok(Ok(tls)) => tls,
        };
        self.stream = BufReader::new(UpstreamStream::Tls(Box::new(tls)));
        self.hello(&target.helo_name).await
    }

    /// Logs in with SMTP AUTH when `target` has credentials, preferring
    /// PLAIN over LOGIN.
    pub(super) async fn authenticate(
        &mut self,
        target: &UpstreamTarget,
    ) -> Result<(), UpstreamError> {
        let Some(credentials) = &target.credentials else {
            return Ok(());
        };
        if !self.is_tls() && !target.config.allow_plaintext_auth {
            return Err(UpstreamError::AuthNeedsTls {
                address: self.address.clone(),
            });
        }
        let offers = |mechanism: &str| {
            self.capabilities
                .auth
                .iter()
                .any(|offered| offered == mechanism)
        };
        let reply = if offers("PLAIN") {
            let token = BASE64.encode(format!(
                "\0{}\0{}",
                credentials.username, credentials.password
            ));
            self.command(&format!("AUTH PLAIN {token}")).await?
        } else if offers("LOGIN") {
            let reply = self.command("AUTH LOGIN").await?;
            if reply.code != 334 {
                reply
            } else {
                let reply = self.command(&BASE64.encode(&credentials.username)).await?;
                if reply.code != 334 {
                    reply
                } else {
                    self.command(&BASE64.encode(&credentials.password)).await?
                }
            }
        } else {
            return Err(UpstreamError::AuthUnavailable {
                address: self.address.clone(),
            });
        };
        if reply.code != 235 {
            return Err(UpstreamError::AuthFailed {
                address: self.address.clone(),
                username: credentials.username.clone(),
                reply,
            });
        }
        tracing::debug!(upstream = %self.address, username = %credentials.username, "logged in to the upstream");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_forms() {
        assert_eq!(host_of("mail.example.org:25"), "mail.example.org");
        assert_eq!(host_of("127.0.0.1:2526"), "127.0.0.1");
        assert_eq!(host_of("[::1]:25"), "::1");
    }
}
