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
/// only where the operator said), the given per-request timeout, and a
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

/// Posts one outbox entry to `url`; returns the HTTP status of a 2xx answer.
///
/// # Errors
/// A description of the failure: the request failed, timed out, or the
/// receiver answered with another status.
pub async fn post(
    client: &reqwest::Client,
    url: &str,
    secret: &[u8],
    entry: &OutboxEntry,
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
    let response = request.send().await.map_err(describe)?;
    let status = response.status();
    if status.is_success() {
        return Ok(status.as_u16());
    }
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    let text = response.text().await.unwrap_or_default();
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
    }
}

/// Describes a request failure with its cause chain, which reqwest keeps
/// out of its own message.
fn describe(error: reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "request timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut text = format!("{kind}: {error}");
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
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
    fn signature_covers_timestamp() {
        let body = br#"{"a":1}"#;
        assert_ne!(signature(b"secret", 1, body), signature(b"secret", 2, body));
    }
}
