//! The admin HTTP API: blocks, strike ledgers, support lifts, the events
//! report, exemptions, runtime settings, metrics, health, and the
//! dashboard in the browser.
//!
//! Every endpoint takes a bearer token, or the cookie of a dashboard
//! session started with one. The admin token (from `admin.token_file`)
//! reads everything and manages exemptions and settings; the support token
//! (only its SHA-256 is configured) reads everything and alone may lift a
//! permanent block or reset a lockout count.

mod api;
pub mod client;
mod dashboard;
pub mod devices;
pub mod session;
mod simulate;
pub mod views;

pub use api::{ExemptionRequest, new_exemption, parse_time};

use crate::config::Config;
use crate::guard::Guard;
use axum::Json;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Shortest token accepted, in characters; shorter ones are guessable.
const MIN_TOKEN_LENGTH: usize = 16;

/// The role a request's token grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Support,
}

/// The credentials the API checks, built with each configuration.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    admin: Option<[u8; 32]>,
    support: Option<[u8; 32]>,
}

impl Credentials {
    /// Reads the admin token file and decodes the support token hash.
    ///
    /// # Errors
    /// When the token file cannot be read or its token is too short.
    pub fn new(config: &Config) -> Result<Credentials, String> {
        let admin = match &config.admin.token_file {
            None => None,
            Some(path) => {
                let token =
                    read_token(path).map_err(|error| format!("admin.token_file: {error}"))?;
                Some(sha256(&token))
            }
        };
        let support = config
            .admin
            .support_token_sha256
            .as_deref()
            .and_then(|text| hex::decode(text).ok())
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok());
        if support.is_some() && support == admin {
            return Err(
                "admin.support_token_sha256 is the hash of the admin token; the support token \
                 must be a different token, or the admin could lift permanent blocks"
                    .to_string(),
            );
        }
        Ok(Credentials { admin, support })
    }

    /// Returns the role of a presented token, if it is one of the two.
    pub fn role_of(&self, token: &str) -> Option<Role> {
        self.role_of_hash(&sha256(token))
    }

    /// Returns the role of the token whose SHA-256 is `presented`, if it is
    /// one of the two.
    pub fn role_of_hash(&self, presented: &[u8; 32]) -> Option<Role> {
        // Comparing hashes in constant time leaks nothing about the tokens.
        if self
            .support
            .is_some_and(|support| constant_time_eq(&support, presented))
        {
            return Some(Role::Support);
        }
        if self
            .admin
            .is_some_and(|admin| constant_time_eq(&admin, presented))
        {
            return Some(Role::Admin);
        }
        None
    }

    /// Returns whether `token` is the support token.
    pub fn is_support(&self, token: &str) -> bool {
        self.role_of(token) == Some(Role::Support)
    }

    pub fn has_support(&self) -> bool {
        self.support.is_some()
    }
}

/// Reads a token: the first line of the file, trimmed.
///
/// # Errors
/// When the file cannot be read, or the token is empty or too short.
pub fn read_token(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    let length = token.chars().count();
    if length < MIN_TOKEN_LENGTH {
        return Err(format!(
            "the token in {} is {length} characters long, below the minimum of \
             {MIN_TOKEN_LENGTH}; use the token the server was given (`sendguard token generate` \
             makes a new one)",
            path.display()
        ));
    }
    Ok(token)
}

/// Returns the SHA-256 of a token.
pub fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Compares two hashes in time that does not depend on where they differ.
pub(crate) fn constant_time_eq(left: &[u8; 32], right: &[u8; 32]) -> bool {
    left.iter()
        .zip(right)
        .fold(0u8, |difference, (a, b)| difference | (a ^ b))
        == 0
}

/// An API error: a status and a message that states what was wrong and
/// what to do.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Extra fields for the JSON body, such as a lockout's end.
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            details: serde_json::Map::new(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn internal(error: impl std::fmt::Display) -> ApiError {
        tracing::error!(%error, "admin API request failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal error: {error}; see the server log"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = self.details;
        body.insert("error".into(), self.message.into());
        let mut response = (self.status, Json(serde_json::Value::Object(body))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                "Bearer".parse().expect("valid header"),
            );
        }
        response
    }
}

/// Checks the bearer token of a request, or else its session cookie, and
/// returns its role.
///
/// # Errors
/// 401 when the token is missing or matches neither credential and no
/// session is live.
pub fn authenticate(guard: &Guard, headers: &HeaderMap) -> Result<Role, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        // A dashboard session; its CSRF token was checked before the
        // handler ran when the request changes state.
        if let Some(session) = dashboard::session_of(guard, headers) {
            return Ok(session.role);
        }
        log_refusal();
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing bearer token: send the header \"Authorization: Bearer TOKEN\", or log in \
             to the dashboard at /",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|text| {
            let (scheme, token) = text.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid Authorization header: use \"Authorization: Bearer TOKEN\"",
            )
        })?;
    let role = guard.runtime().credentials.role_of(token);
    if role.is_none() {
        log_refusal();
    }
    role.ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid token: it matches neither the admin token nor the support token",
        )
    })
}

/// Logs refused tokens at most once per ten seconds, with the number of
/// refusals since the last line, so guessing cannot flood the log.
pub(crate) fn log_refusal() {
    use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
    static LAST_LOGGED: AtomicI64 = AtomicI64::new(i64::MIN);
    static SINCE_LAST: AtomicU64 = AtomicU64::new(0);
    let refused = SINCE_LAST.fetch_add(1, Ordering::Relaxed) + 1;
    let now = crate::policy::Timestamp::now().millis();
    let last = LAST_LOGGED.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= 10_000
        && LAST_LOGGED
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        SINCE_LAST.store(0, Ordering::Relaxed);
        tracing::warn!(
            refused,
            "admin API request refused: the bearer token matches no configured token"
        );
    }
}

/// Serves the API on `listener` until `shutdown` becomes true.
pub async fn serve(listener: TcpListener, guard: Arc<Guard>, mut shutdown: watch::Receiver<bool>) {
    let address = listener
        .local_addr()
        .map(|address| address.to_string())
        .unwrap_or_default();
    tracing::info!(listen = %address, "admin API started");
    // NOTE: axum's server sets no limit on connections or on the time a
    // client may take to send its request headers; keep the listener on
    // loopback or behind a reverse proxy that sets them.
    let router = api::router(guard);
    let stop = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    // The client address limits failed dashboard logins per client.
    let service = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
    if let Err(error) = axum::serve(listener, service)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!(%error, listen = %address, "admin API stopped with an error");
    }
}

/// Percent-encodes a URL path segment or query value, keeping only
/// unreserved characters and `@`.
pub fn percent_encode(text: &str) -> String {
    let mut encoded = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~' | b'@') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// Returns a `200 OK` response with `value` as its JSON body.
pub fn ok_json(value: serde_json::Value) -> Response {
    (StatusCode::OK, Json(value)).into_response()
}

/// Returns the JSON error for a role that may not use an endpoint.
pub fn forbidden(message: &str) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, message.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_from_token() {
        let credentials = Credentials {
            admin: Some(sha256("admin-token-0123456789")),
            support: Some(sha256("support-token-0123456789")),
        };
        assert_eq!(
            credentials.role_of("admin-token-0123456789"),
            Some(Role::Admin)
        );
        assert_eq!(
            credentials.role_of("support-token-0123456789"),
            Some(Role::Support)
        );
        assert_eq!(credentials.role_of("admin-token-012345678"), None);
        assert_eq!(credentials.role_of(""), None);
    }

    #[test]
    fn no_support_hash_means_no_support() {
        let credentials = Credentials {
            admin: Some(sha256("admin-token-0123456789")),
            support: None,
        };
        assert!(!credentials.has_support());
        assert!(!credentials.is_support("admin-token-0123456789"));
    }

    #[test]
    fn error_body_is_json() {
        let response = ApiError::bad_request("reason is missing").into_response();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    }
}
