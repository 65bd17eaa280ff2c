//! rspamd client: `POST /checkv2` over plain HTTP to rspamd's normal
//! worker, with the envelope and the client passed as request headers.
//!
//! The HTTP client keeps connections alive and reuses them when the server
//! allows it. rspamd 3.4 (Debian 12) replies to every request with
//! `Connection: close`, so against it each scan opens a new connection.

mod config;
mod reply;

pub use config::{ActionClass, DEFAULT_RSPAMD_TIMEOUT, RspamdConfig, default_actions};
pub use reply::{CheckReply, parse_reply, verdict};

use std::io;
use std::sync::Arc;

use super::Envelope;
use super::error::{ReplyError, ScanError};
use super::net::clip;

/// Longest reply read from rspamd. A reply lists every symbol with its
/// options, a few kilobytes in practice.
const MAX_REPLY_LEN: usize = 1024 * 1024;

/// A client for one rspamd worker. Cheap to share: the connection pool is
/// inside.
#[derive(Debug)]
pub struct Client {
    config: RspamdConfig,
    http: reqwest::Client,
    check_url: String,
    ping_url: String,
}

impl Client {
    /// Builds the HTTP client for a validated configuration.
    ///
    /// # Errors
    /// When the HTTP client cannot be set up.
    pub fn new(config: &RspamdConfig) -> Result<Client, String> {
        // reqwest builds a TLS configuration even for plain-HTTP use, and
        // without a process-wide rustls provider it would panic, so it gets
        // one with the provider the rest of sendguard uses.
        let tls = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("scan.rspamd: cannot set up the HTTP client: {error}"))?
        .with_root_certificates(tokio_rustls::rustls::RootCertStore::empty())
        .with_no_client_auth();
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .http1_only()
            // rspamd is on the local network; an HTTP proxy from the
            // environment must not see the mail.
            .no_proxy()
            .tcp_nodelay(true)
            .connect_timeout(config.timeout)
            .timeout(config.timeout)
            .user_agent(concat!("sendguard/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| format!("scan.rspamd: cannot set up the HTTP client: {error}"))?;
        Ok(Client {
            config: config.clone(),
            http,
            check_url: format!("http://{}/checkv2", config.address),
            ping_url: format!("http://{}/ping", config.address),
        })
    }

    pub fn config(&self) -> &RspamdConfig {
        &self.config
    }

    /// Sends `message` to `/checkv2` with the envelope's headers and returns
    /// rspamd's parsed reply.
    ///
    /// # Errors
    /// When rspamd cannot be reached, times out, replies with an HTTP error
    /// or with JSON that lacks the action or score.
    pub async fn check(
        &self,
        message: &[u8],
        envelope: Option<&Envelope<'_>>,
    ) -> Result<CheckReply, ScanError> {
        let mut request = self.http.post(&self.check_url).body(message.to_vec());
        for (name, value) in request_headers(envelope) {
            match reqwest::header::HeaderValue::from_str(&value) {
                Ok(value) => request = request.header(name, value),
                Err(_) => {
                    tracing::debug!(engine = "rspamd", header = name, value = %value.escape_debug(),
                        "value not allowed in an HTTP header; left out of the request");
                }
            }
        }

        let response = request.send().await.map_err(|error| {
            self.http_error(error, "sending the message or waiting for the reply")
        })?;
        let status = response.status().as_u16();
        let body = self.read_body(response).await?;
        parse_reply(status, &body).map_err(|error| self.reply_error(error))
    }

    /// Sends `GET /ping` and returns rspamd's reply, "pong".
    pub async fn ping(&self) -> Result<String, ScanError> {
        let response = self
            .http
            .get(&self.ping_url)
            .send()
            .await
            .map_err(|error| self.http_error(error, "waiting for pong"))?;
        let status = response.status().as_u16();
        let body = self.read_body(response).await?;
        let text = String::from_utf8_lossy(&body).trim().to_string();
        if status == 200 && text == "pong" {
            Ok(text)
        } else {
            Err(self.protocol_error(&format!("HTTP {status}: {text}")))
        }
    }

    /// Reads the response body, up to [`MAX_REPLY_LEN`] bytes.
    async fn read_body(&self, mut response: reqwest::Response) -> Result<Vec<u8>, ScanError> {
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|error| self.http_error(error, "reading the reply"))?
        {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_REPLY_LEN {
                return Err(self.protocol_error(&format!(
                    "reply longer than {MAX_REPLY_LEN} bytes: {}",
                    String::from_utf8_lossy(&body)
                )));
            }
        }
        Ok(body)
    }

    /// Maps an HTTP client error to a scan error: a time-out, a failed
    /// connection (with the socket error's kind, such as "connection
    /// refused"), or an I/O error during the exchange.
    fn http_error(&self, error: reqwest::Error, stage: &'static str) -> ScanError {
        let address = self.config.address.clone();
        if error.is_timeout() {
            return ScanError::Timeout {
                engine: "rspamd",
                address,
                timeout: self.config.timeout,
                stage,
            };
        }
        let kind = io_error_kind(&error).unwrap_or(io::ErrorKind::Other);
        let source = io::Error::new(kind, error_chain(&error));
        if error.is_connect() {
            ScanError::Connect {
                engine: "rspamd",
                address,
                source,
            }
        } else {
            ScanError::Io {
                engine: "rspamd",
                address,
                stage,
                source,
            }
        }
    }

    fn reply_error(&self, error: ReplyError) -> ScanError {
        match error {
            ReplyError::Malformed(reason) => self.protocol_error(&reason),
            ReplyError::Reported(message) => ScanError::Reported {
                engine: "rspamd",
                address: self.config.address.clone(),
                message: clip(&message, 200),
            },
        }
    }

    fn protocol_error(&self, reply: &str) -> ScanError {
        ScanError::Protocol {
            engine: "rspamd",
            address: self.config.address.clone(),
            reply: clip(reply, 200),
        }
    }
}

/// Returns the request headers for the envelope, in rspamd's names.
/// Without a known client host name the `Hostname` header is `unknown`,
/// Postfix's word for a client without reverse DNS. With no `Hostname` at
/// all, rspamd 3.4 adds HFILTER_HOSTNAME_UNKNOWN (2.5 points) to every
/// message from a client outside its `local_addrs` that did not log in.
pub fn request_headers(envelope: Option<&Envelope<'_>>) -> Vec<(&'static str, String)> {
    let Some(envelope) = envelope else {
        return Vec::new();
    };
    let mut headers = vec![("Queue-Id", envelope.transaction.to_string())];
    if let Some(client) = envelope.client {
        headers.push(("IP", client.to_string()));
        let hostname = envelope
            .client_name
            .filter(|name| !name.is_empty() && !name.starts_with('['))
            .unwrap_or("unknown");
        headers.push(("Hostname", hostname.to_string()));
    }
    if let Some(helo) = envelope.helo.filter(|helo| !helo.is_empty()) {
        headers.push(("Helo", helo.to_string()));
    }
    // rspamd reads SMTP paths with or without angle brackets.
    if !envelope.sender.is_empty() {
        headers.push(("From", envelope.sender.to_string()));
    }
    for recipient in envelope.recipients {
        headers.push(("Rcpt", recipient.clone()));
    }
    if let Some(login) = envelope.login.filter(|login| !login.is_empty()) {
        headers.push(("User", login.to_string()));
    }
    headers
}

/// Returns the kind of the first I/O error in `error`'s chain of causes.
fn io_error_kind(error: &(dyn std::error::Error + 'static)) -> Option<io::ErrorKind> {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if let Some(io_error) = current.downcast_ref::<io::Error>() {
            return Some(io_error.kind());
        }
        cause = current.source();
    }
    None
}

/// Formats an error with its causes, such as "error sending request:
/// client error (Connect): tcp connect error: Connection refused".
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(current) = cause {
        let message = current.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        cause = current.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_carry_the_envelope() {
        let recipients = [
            "<bob@example.net>".to_string(),
            "<carol@example.net>".to_string(),
        ];
        let envelope = Envelope {
            transaction: "s1-1",
            sender: "<alice@example.org>",
            recipients: &recipients,
            client: Some("192.0.2.10".parse().expect("address")),
            client_name: Some("pc17.example.org"),
            helo: Some("pc17.example.org"),
            login: Some("alice"),
        };
        assert_eq!(
            request_headers(Some(&envelope)),
            [
                ("Queue-Id", "s1-1".to_string()),
                ("IP", "192.0.2.10".to_string()),
                ("Hostname", "pc17.example.org".to_string()),
                ("Helo", "pc17.example.org".to_string()),
                ("From", "<alice@example.org>".to_string()),
                ("Rcpt", "<bob@example.net>".to_string()),
                ("Rcpt", "<carol@example.net>".to_string()),
                ("User", "alice".to_string()),
            ]
        );
    }

    #[test]
    fn headers_fill_in_unknowns() {
        let envelope = Envelope {
            transaction: "s2-1",
            client: Some("2001:db8::5".parse().expect("address")),
            client_name: Some("[2001:db8::5]"),
            helo: Some(""),
            login: Some(""),
            ..Envelope::default()
        };
        assert_eq!(
            request_headers(Some(&envelope)),
            [
                ("Queue-Id", "s2-1".to_string()),
                ("IP", "2001:db8::5".to_string()),
                ("Hostname", "unknown".to_string()),
            ]
        );
        assert!(request_headers(None).is_empty());
    }

    #[test]
    fn client_builds_without_a_global_tls_provider() {
        let config = RspamdConfig {
            address: "127.0.0.1:11333".to_string(),
            ..RspamdConfig::default()
        };
        let client = match Client::new(&config) {
            Ok(client) => client,
            Err(error) => panic!("{error}"),
        };
        assert_eq!(client.check_url, "http://127.0.0.1:11333/checkv2");
        let ipv6 = RspamdConfig {
            address: "[::1]:11333".to_string(),
            ..RspamdConfig::default()
        };
        match Client::new(&ipv6) {
            Ok(client) => assert_eq!(client.ping_url, "http://[::1]:11333/ping"),
            Err(error) => panic!("{error}"),
        }
    }
}
