//! Signed webhook requests.
//!
//! Each request carries `Sendguard-Timestamp` (Unix seconds of this
//! attempt) and `Sendguard-Signature: sha256=HEX`, the HMAC-SHA256 under
//! the shared secret of the timestamp, a full stop and the body. The body
//! and `Sendguard-Delivery` stay the same across retries; the timestamp and
//! signature are made anew for each attempt.

use super::{ActionKind, OutboxEntry};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::time::Duration;

/// Returns the `Sendguard-Signature` value for a body sent at `timestamp`.
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Builds the HTTP client for webhooks: no redirects (a signed payload goes
/// only to the configured URL), the given per-request timeout, and a
/// verifying TLS configuration.
///
/// # Errors
/// When the CA file cannot be read.
pub fn client(
    ca_file: Option<&std::path::Path>,
    timeout: Duration,
) -> Result<reqwest::Client, String> {
    let tls = crate::tls::verifying_client_config(ca_file, "actions.ca_file")
        .map_err(|error| format!("actions.ca_file: {error}"))?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("sendguard/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|error| format!("cannot build the webhook HTTP client: {error}"))
}

/// Posts one outbox entry to `url` and returns the HTTP status of a 2xx
/// response.
///
/// # Errors
/// A description of the failure: the request failed, timed out, or the
/// receiver answered with another status.
pub async fn post(
    client: &reqwest::Client,
    url: &str,
    secret: &[u8],
    entry: &OutboxEntry,
    timeout: Duration,
) -> Result<u16, String> {
    let timestamp = crate::policy::Timestamp::now().millis().div_euclid(1000);
    let body = entry.body.as_bytes();
    let request = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("Sendguard-Event", event_name(entry.kind))
        .header("Sendguard-Delivery", &entry.delivery_id)
        .header("Sendguard-Timestamp", timestamp.to_string())
        .header("Sendguard-Signature", signature(secret, timestamp, body))
        .body(entry.body.clone());
    let response = request
        .send()
        .await
        .map_err(|error| describe(error, timeout))?;
    let status = response.status();
    if status.is_success() {
        return Ok(status.as_u16());
    }
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|value| value.to_str().ok())
        .map(redact_url);
    let text = read_excerpt(response).await;
    let excerpt: String = text
        .chars()
        .take(200)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    Err(match location {
        Some(location) if status.is_redirection() => format!(
            "receiver answered {status} with a redirect to {location}; webhooks do not follow \
             redirects, so set the final URL in the configuration"
        ),
        _ if excerpt.trim().is_empty() => format!("receiver answered {status}"),
        _ => format!("receiver answered {status}: {}", excerpt.trim()),
    })
}

fn event_name(kind: ActionKind) -> &'static str {
    match kind {
        ActionKind::EndpointScan => "endpoint_scan",
        ActionKind::AdminAlert | ActionKind::AlertMail => "admin_alert",
        ActionKind::SubnetNotice => "subnet_notice",
    }
}

/// Maximum number of bytes read from an error response, so a huge error
/// page cannot fill the memory.
const MAX_ERROR_BODY: usize = 4096;

/// Reads the start of an error answer's body.
async fn read_excerpt(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < MAX_ERROR_BODY {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(MAX_ERROR_BODY);
    String::from_utf8_lossy(&body).into_owned()
}

/// Describes a request failure with its cause chain, which reqwest keeps
/// out of its own message, without the URL (the caller names the receiver).
fn describe(error: reqwest::Error, timeout: Duration) -> String {
    if error.is_timeout() {
        return format!(
            "no answer within {} (actions.timeout)",
            humantime::format_duration(timeout)
        );
    }
    let kind = if error.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut text = kind.to_string();
    crate::append_causes(&mut text, &error);
    if text.contains("InvalidContentType") || text.contains("corrupt message") {
        text.push_str(
            " (the receiver does not speak TLS here; is the URL http:// rather than https://?)",
        );
    }
    text
}

/// Returns `url` without its password and query values, for logs and
/// events: webhook URLs may carry credentials.
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        return "(invalid URL)".to_string();
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("REDACTED"));
    }
    if parsed.query().is_some() {
        let names: Vec<String> = parsed
            .query_pairs()
            .map(|(name, _)| format!("{name}=REDACTED"))
            .collect();
        parsed.set_query(Some(&names.join("&")));
    }
    parsed.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_reference() {
        // Reference value from `printf '1700000000.{"a":1}' |
        // openssl dgst -sha256 -hmac secret`.
        let value = signature(b"secret", 1_700_000_000, br#"{"a":1}"#);
        assert_eq!(
            value,
            "sha256=49f24e537407743fa4a0242bb63b94b9a47ee99cbbe071ccd8a22550ae411686"
        );
    }

    #[test]
    fn redaction_hides_credentials() {
        let url = "https://user:Pa55@alerts.example.org/hook?api_key=SECRET&x=1";
        let redacted = redact_url(url);
        assert_eq!(
            redacted,
            "https://user:REDACTED@alerts.example.org/hook?api_key=REDACTED&x=REDACTED"
        );
        assert_eq!(
            redact_url("http://127.0.0.1:8080/scan"),
            "http://127.0.0.1:8080/scan"
        );
    }

    #[test]
    fn signature_covers_timestamp() {
        let body = br#"{"a":1}"#;
        assert_ne!(signature(b"secret", 1, body), signature(b"secret", 2, body));
    }
}
