//! The admin dashboard in the browser. This module serves the embedded
//! pages and assets, the login that turns a token into a session cookie,
//! and the JSON views the dashboard needs (the overview and the runtime
//! settings). It also adds the security headers of every admin response.
//!
//! The pages are plain HTML, CSS and JavaScript compiled into the binary,
//! so the dashboard works without any network access beyond the admin
//! listener. The JavaScript calls the same JSON API as other clients, with
//! the session cookie in place of the bearer token.

use super::session::{self, SessionInfo};
use super::{ApiError, Role, authenticate, forbidden, ok_json};
use crate::events::EventKind;
use crate::guard::Guard;
use crate::identity::MailboxKey;
use crate::policy::Timestamp;
use crate::store::EventFilter;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

type Shared = State<Arc<Guard>>;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");
const ICON_SVG: &str = include_str!("dashboard/icon.svg");

/// Content-Security-Policy of every admin response: only this origin's
/// own scripts, styles and requests, no inline script, no framing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; \
     frame-ancestors 'none'";

/// Maximum number of mailboxes the overview lists as close to the
/// threshold.
const MAX_NEAR_THRESHOLD: usize = 200;

/// Maximum number of mailbox states the overview reads to find them, so
/// that a wave of blocked mailboxes cannot make one request read thousands.
const MAX_NEAR_LOOKUPS: usize = 2000;

/// Builds the dashboard's routes, which the API merges into its router.
pub fn routes() -> Router<Arc<Guard>> {
    Router::new()
        .route("/", get(index))
        .route("/assets/app.js", get(app_js))
        .route("/assets/app.css", get(app_css))
        .route("/assets/icon.svg", get(icon))
        .route(
            "/api/v1/session",
            get(current_session).post(login).delete(logout),
        )
        .route("/api/v1/overview", get(overview))
        .route("/api/v1/settings", get(settings).put(change_settings))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = Response::new(Body::from(body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

async fn icon() -> Response {
    asset("image/svg+xml", ICON_SVG)
}

/// Returns the live session of a request's cookie, if any.
pub fn session_of(guard: &Guard, headers: &HeaderMap) -> Option<SessionInfo> {
    let id = session::cookie_value(headers)?;
    guard
        .sessions()
        .lookup(id, &guard.runtime().credentials, Instant::now())
}

/// Adds the security headers to every admin response, and checks the CSRF
/// token of every request that changes state with the session cookie
/// instead of a bearer token.
pub async fn protect(State(guard): Shared, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let uses_cookie = !headers.contains_key(header::AUTHORIZATION);
    let is_login =
        request.uri().path() == "/api/v1/session" && request.method() == axum::http::Method::POST;
    if uses_cookie
        && !is_login
        && session::changes_state(request.method())
        && let Some(session) = session_of(&guard, headers)
        && let Err(error) = session::check_csrf(headers, &session)
    {
        tracing::warn!(path = %request.uri().path(), method = %request.method(),
            "dashboard request refused: CSRF token missing or wrong");
        return with_security_headers(error.into_response(), false);
    }
    let is_asset = request.uri().path().starts_with("/assets/");
    let response = next.run(request).await;
    with_security_headers(response, is_asset)
}

fn with_security_headers(mut response: Response, is_asset: bool) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // Assets are the same for the life of the binary but change with an
    // upgrade, so browsers revalidate them; nothing else is stored.
    let cache = if is_asset { "no-cache" } else { "no-store" };
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    response
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Admin => "admin",
        Role::Support => "support",
    }
}

fn session_json(info: &SessionInfo) -> Value {
    json!({
        "role": role_name(info.role),
        "csrf_token": info.csrf,
        "expires_in_seconds": info.remaining.as_secs(),
        "idle_timeout_seconds": session::IDLE_TIMEOUT.as_secs(),
    })
}

async fn current_session(headers: HeaderMap, State(guard): Shared) -> Result<Response, ApiError> {
    let info = session_of(&guard, &headers).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "no session: log in with POST /api/v1/session and the admin or support token",
        )
    })?;
    Ok(ok_json(session_json(&info)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    token: Option<String>,
}

/// Returns whether a request's `Origin`, when sent, names the host it was
/// sent to, so another site cannot log a browser in with its own token.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let origin = origin.to_str().unwrap_or("");
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .unwrap_or("");
    !host.is_empty() && origin_host.eq_ignore_ascii_case(host)
}

async fn login(
    headers: HeaderMap,
    State(guard): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Json<LoginRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    if !same_origin(&headers) {
        return Err(forbidden(
            "login refused: the request came from another site's page (its Origin header names \
             another host); log in from the dashboard itself",
        ));
    }
    let now = Instant::now();
    let client = peer.ip();
    if let Some(wait) = guard.sessions().login_wait(client, now) {
        let mut error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many failed logins from {client}: at most {} per {} s; try again in {} s",
                session::MAX_FAILURES,
                session::FAILURE_WINDOW.as_secs(),
                wait.as_secs().max(1)
            ),
        );
        error
            .details
            .insert("retry_after_seconds".into(), wait.as_secs().max(1).into());
        return Err(error);
    }
    let request = match body {
        Ok(Json(request)) => request,
        // A body over axum's default limit of 2 MB is no token.
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "login request too large: send a JSON object such as {\"token\": \"...\"}",
            ));
        }
        Err(_) => {
            return Err(ApiError::bad_request(
                "invalid login: send a JSON object such as {\"token\": \"...\"}",
            ));
        }
    };
    let token_hash = super::sha256(request.token.unwrap_or_default().trim());
    let Some(role) = guard.runtime().credentials.role_of_hash(&token_hash) else {
        guard.sessions().record_failure(client, now);
        super::log_refusal();
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "login failed: the token matches neither the admin token nor the support token",
        ));
    };
    let (id, info) = guard.sessions().create(role, token_hash, now);
    tracing::info!(role = role_name(role), client = %client, "dashboard session started");
    // The admin listener speaks plain HTTP. A TLS reverse proxy in front
    // sets X-Forwarded-Proto: https, and the cookie is then kept to HTTPS.
    let secure = headers
        .get("x-forwarded-proto")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|proto| proto.eq_ignore_ascii_case("https"));
    let mut response = ok_json(session_json(&info));
    if let Ok(value) = HeaderValue::from_str(&session::set_cookie(&id, secure)) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    Ok(response)
}

async fn logout(headers: HeaderMap, State(guard): Shared) -> Response {
    if let Some(id) = session::cookie_value(&headers) {
        guard.sessions().remove(id);
        tracing::info!("dashboard session ended by logout");
    }
    let mut response = ok_json(json!({ "logged_out": true }));
    if let Ok(value) = HeaderValue::from_str(&session::clear_cookie()) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// Returns the blocks in force, and the mailboxes with strikes in their
/// window that are not blocked, most strikes first.
async fn overview(headers: HeaderMap, State(guard): Shared) -> Result<Response, ApiError> {
    authenticate(&guard, &headers)?;
    let now = guard.store().now();
    let runtime = guard.runtime();
    let settings = runtime.settings();
    let blocks = guard
        .store()
        .active_blocks(now)
        .await
        .map_err(ApiError::internal)?;
    let mut timed = Vec::new();
    let mut permanent = Vec::new();
    for (key, state) in &blocks {
        if let Some(block) = state.active_block(now) {
            let view = super::views::block_json(key, block);
            if block.is_permanent() {
                permanent.push(view);
            } else {
                timed.push(view);
            }
        }
    }
    timed.sort_by(|a, b| a["until"].as_str().cmp(&b["until"].as_str()));

    // Only a mailbox with a counted bad message inside the window can have
    // strikes, so the candidates come from the events report.
    let filter = EventFilter {
        since: Some(now.saturating_sub(settings.window)),
        kind: Some(EventKind::BadMessage),
        // NOTE: the report is read oldest first, so with more than 10000 bad
        // messages in the window the newest senders are not candidates.
        limit: Some(10_000),
        ..EventFilter::default()
    };
    let events = guard
        .store()
        .query_events(filter)
        .await
        .map_err(ApiError::internal)?;
    let mut near = Vec::new();
    for (mailbox, client) in near_candidates(&events).into_iter().take(MAX_NEAR_LOOKUPS) {
        if near.len() == MAX_NEAR_THRESHOLD {
            break;
        }
        let key = MailboxKey {
            mailbox,
            client: client.and_then(|text| text.parse().ok()),
        };
        let state = guard
            .mailbox_state(&key)
            .await
            .map_err(ApiError::internal)?;
        // A blocked mailbox is listed with the blocks and takes no place
        // in this list.
        if state.active_block(now).is_some() {
            continue;
        }
        let in_window: Vec<&crate::policy::Strike> = state
            .strikes
            .iter()
            .filter(|strike| now.since(strike.at) < settings.window)
            .collect();
        let Some(newest) = in_window.iter().map(|strike| strike.at).max() else {
            continue;
        };
        near.push(json!({
            "mailbox": key.mailbox,
            "key_client": key.client.map(|client| client.to_string()),
            "strikes": in_window.len(),
            "threshold": settings.threshold,
            "newest_strike": newest.to_rfc3339(),
            "lockouts": state.lockouts,
        }));
    }
    near.sort_by(|a, b| b["strikes"].as_u64().cmp(&a["strikes"].as_u64()));
    Ok(ok_json(json!({
        "now": now.to_rfc3339(),
        "threshold": settings.threshold,
        "window": humantime::format_duration(settings.window).to_string(),
        "lockouts": timed,
        "permanent_blocks": permanent,
        "near_threshold": near,
    })))
}

/// Returns the mailbox keys with counted bad messages among `events`, the
/// most counted first, so the overview looks up the likeliest ones first.
fn near_candidates(events: &[crate::events::Event]) -> Vec<(String, Option<String>)> {
    let mut counts: BTreeMap<(String, Option<String>), usize> = BTreeMap::new();
    for event in events {
        if event.details.get("counted") != Some(&Value::Bool(true)) {
            continue;
        }
        if let Some(mailbox) = &event.mailbox {
            *counts
                .entry((mailbox.clone(), event.key_client.clone()))
                .or_default() += 1;
        }
    }
    let mut candidates: Vec<_> = counts.into_iter().collect();
    // A stable sort keeps mailboxes with equal counts in name order.
    candidates.sort_by_key(|(_, count)| std::cmp::Reverse(*count));
    candidates.into_iter().map(|(key, _)| key).collect()
}

/// Describes a boolean setting that an override stored through the API
/// may replace: its value in force, and where that value comes from.
pub fn setting_json(stored: Option<crate::store::devices::SettingRow>, file_value: bool) -> Value {
    match stored {
        Some(row) => json!({
            "value": row.value,
            "source": "api",
            "file_value": file_value,
            "author": row.author,
            "reason": row.reason,
            "changed": row.changed.to_rfc3339(),
        }),
        None => json!({ "value": file_value, "source": "file", "file_value": file_value }),
    }
}

/// Returns the runtime settings in force, each with its source.
fn settings_json(guard: &Guard) -> Value {
    let runtime = guard.runtime();
    let config = &runtime.config;
    let devices = guard.devices();
    json!({
        "synchronized_security": setting_json(
            devices.synchronized_security_override(),
            config.synchronized_security.enabled,
        ),
        "endpoint_scan_url_configured": config.synchronized_security.endpoint_scan_url.is_some(),
        "reject_unsafe": setting_json(
            devices.reject_unsafe_override(),
            config.devices.reject_unsafe,
        ),
        "exclusions": {
            "configured": config.devices.exclusions,
            "exclude_update_caches": config.devices.exclude_update_caches,
            "exclude_message_relays": config.devices.exclude_message_relays,
            "changed_at": "/api/v1/device-exclusions",
        },
    })
}

async fn settings(headers: HeaderMap, State(guard): Shared) -> Result<Response, ApiError> {
    authenticate(&guard, &headers)?;
    Ok(ok_json(settings_json(&guard)))
}

const SETTINGS_EXAMPLE: &str = r#"{"synchronized_security": false, "reason": "...", "author": "..."} (reject_unsafe too; null resets a setting to the file's value)"#;

/// Reads a setting from a request body: absent, `null` (reset) or a
/// boolean (override).
fn requested_setting(body: &Value, name: &str) -> Result<Option<Option<bool>>, ApiError> {
    match body.get(name) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(Value::Bool(value)) => Ok(Some(Some(*value))),
        Some(other) => Err(ApiError::bad_request(format!(
            "invalid {name} {other}: give true, false, or null to go back to the file's value"
        ))),
    }
}

/// Reads the reason or the author of a settings change from a request body.
fn change_text(body: &Value, name: &str) -> Result<String, ApiError> {
    let text = match body.get(name) {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(text.clone()),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "invalid {name} {other}: give a string"
            )));
        }
    };
    super::api::clean_text(
        name,
        text,
        "say who changes the setting and why; both are recorded in the events report",
    )
    .map_err(ApiError::bad_request)
}

async fn change_settings(
    headers: HeaderMap,
    State(guard): Shared,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    if authenticate(&guard, &headers)? != Role::Admin {
        return Err(forbidden(
            "settings are changed with the admin token or an admin session; the support token \
             can only read them",
        ));
    }
    let body = body.map(|Json(value)| value).map_err(|rejection| {
        ApiError::bad_request(format!(
            "{}; send a JSON object such as {SETTINGS_EXAMPLE}",
            rejection.body_text()
        ))
    })?;
    let Some(object) = body.as_object() else {
        return Err(ApiError::bad_request(format!(
            "invalid settings: send a JSON object such as {SETTINGS_EXAMPLE}"
        )));
    };
    const KNOWN: [&str; 4] = ["synchronized_security", "reject_unsafe", "reason", "author"];
    if let Some(unknown) = object.keys().find(|key| !KNOWN.contains(&key.as_str())) {
        return Err(ApiError::bad_request(format!(
            "unknown setting {unknown:?}: this endpoint changes synchronized_security and \
             reject_unsafe; device exclusions are changed at /api/v1/device-exclusions"
        )));
    }
    let synchronized = requested_setting(&body, "synchronized_security")?;
    let reject_unsafe = requested_setting(&body, "reject_unsafe")?;
    if synchronized.is_none() && reject_unsafe.is_none() {
        return Err(ApiError::bad_request(format!(
            "no setting to change: send {SETTINGS_EXAMPLE}"
        )));
    }
    let reason = change_text(&body, "reason")?;
    let author = change_text(&body, "author")?;
    let now = Timestamp::now();
    let devices = guard.devices();
    if let Some(value) = synchronized {
        devices
            .set_synchronized_security(value, &author, &reason, now)
            .await
            .map_err(ApiError::internal)?;
    }
    if let Some(value) = reject_unsafe {
        devices
            .set_reject_unsafe(value, &author, &reason, now)
            .await
            .map_err(ApiError::internal)?;
    }
    Ok(ok_json(settings_json(&guard)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_must_match_host() {
        let mut headers = HeaderMap::new();
        assert!(
            same_origin(&headers),
            "no Origin header: not a cross-site form"
        );
        headers.insert(header::HOST, "127.0.0.1:8025".parse().expect("header"));
        headers.insert(
            header::ORIGIN,
            "http://127.0.0.1:8025".parse().expect("header"),
        );
        assert!(same_origin(&headers));
        headers.insert(
            header::ORIGIN,
            "https://evil.example".parse().expect("header"),
        );
        assert!(!same_origin(&headers));
        headers.insert(header::ORIGIN, "null".parse().expect("header"));
        assert!(!same_origin(&headers));
    }

    #[test]
    fn setting_request_values() {
        let body = json!({"synchronized_security": false, "reject_unsafe": null});
        assert_eq!(
            requested_setting(&body, "synchronized_security").ok(),
            Some(Some(Some(false)))
        );
        assert_eq!(
            requested_setting(&body, "reject_unsafe").ok(),
            Some(Some(None))
        );
        assert_eq!(requested_setting(&body, "other").ok(), Some(None));
        assert!(requested_setting(&json!({"reject_unsafe": "yes"}), "reject_unsafe").is_err());
    }

    fn bad_message(mailbox: &str, counted: bool) -> crate::events::Event {
        let mut details = serde_json::Map::new();
        details.insert("counted".into(), Value::Bool(counted));
        crate::events::Event {
            id: None,
            time: Timestamp::now(),
            kind: EventKind::BadMessage,
            mailbox: Some(mailbox.to_string()),
            key_client: None,
            details,
        }
    }

    #[test]
    fn near_candidates_most_counted_first() {
        let events = vec![
            bad_message("a@example.org", true),
            bad_message("z@example.org", true),
            bad_message("z@example.org", true),
            bad_message("m@example.org", true),
            bad_message("n@example.org", false),
            bad_message("n@example.org", false),
            bad_message("n@example.org", false),
        ];
        let mailboxes: Vec<String> = near_candidates(&events)
            .into_iter()
            .map(|(mailbox, _)| mailbox)
            .collect();
        assert_eq!(
            mailboxes,
            ["z@example.org", "a@example.org", "m@example.org"],
            "uncounted messages are no candidates; equal counts keep name order"
        );
    }

    #[test]
    fn change_text_types() {
        let body = json!({"reason": "  maintenance ", "author": 5, "empty": ""});
        assert_eq!(
            change_text(&body, "reason").ok().as_deref(),
            Some("maintenance")
        );
        let wrong_type = change_text(&body, "author")
            .err()
            .map(|error| error.message);
        assert_eq!(
            wrong_type.as_deref(),
            Some("invalid author 5: give a string")
        );
        let missing = change_text(&body, "other").err().map(|error| error.message);
        assert!(
            missing
                .as_deref()
                .is_some_and(|text| text.starts_with("missing other")),
            "{missing:?}"
        );
        assert!(change_text(&body, "empty").is_err());
    }

    #[test]
    fn assets_embedded() {
        assert!(INDEX_HTML.contains("/assets/app.js"));
        assert!(
            !INDEX_HTML.contains("<script>"),
            "no inline script under the CSP"
        );
        assert!(!INDEX_HTML.contains("http://"), "no external resources");
        assert!(!INDEX_HTML.contains("https://"), "no external resources");
        assert!(!APP_JS.contains("https://"), "no external resources");
    }
}
