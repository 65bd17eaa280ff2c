//! The device endpoints: heartbeats, access decisions, the device list,
//! subnet notices as server-sent events, and device exclusions.
//!
//! A device calls with its own token (the SHA-256 in the devices file) and
//! may report only for itself and read only its own views. Heartbeats come
//! only from the device's own token, because a report is what makes an
//! unsafe device safe again and no one may override that. The admin and
//! support tokens may call the other device endpoints; only the admin token
//! may change exclusions. An exclusion that the configuration file gives a
//! device (by listing or by role) can be lifted here. The lift is stored and
//! stays in force over reloads until it is removed.

use super::{ApiError, Role, forbidden, ok_json};
use crate::guard::Guard;
use crate::heartbeat::{Access, Health, Lift, LookupError, Report};
use crate::policy::Timestamp;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

type Shared = State<Arc<Guard>>;

/// Interval of the comment lines that keep an idle event stream open
/// through proxies.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Builds the device routes, which the API merges into its router.
pub fn routes() -> Router<Arc<Guard>> {
    Router::new()
        .route("/api/v1/heartbeats", post(heartbeat))
        .route("/api/v1/access", post(access))
        .route("/api/v1/devices", get(list))
        .route("/api/v1/devices/{id}", get(show))
        .route("/api/v1/devices/{id}/subnet", get(subnet))
        .route("/api/v1/devices/{id}/events", get(events))
        .route("/api/v1/devices/{id}/scans", post(scan_result))
        .route(
            "/api/v1/device-exclusions",
            get(list_exclusions).post(add_exclusion),
        )
        .route("/api/v1/device-exclusions/{id}", delete(remove_exclusion))
        .route(
            "/api/v1/device-settings",
            get(settings).put(change_settings),
        )
}

/// The caller of a device endpoint.
enum Caller {
    Operator(Role),
    Device(String),
}

impl Caller {
    /// Checks that the caller may act for device `id`.
    fn require(&self, id: &str) -> Result<(), ApiError> {
        match self {
            Caller::Operator(_) => Ok(()),
            Caller::Device(own) if own == id => Ok(()),
            Caller::Device(own) => Err(forbidden(&format!(
                "the token of device {own:?} may act only for {own:?}, not for {id:?}"
            ))),
        }
    }

    fn require_operator(&self) -> Result<Role, ApiError> {
        match self {
            Caller::Operator(role) => Ok(*role),
            Caller::Device(_) => Err(forbidden(
                "this endpoint needs the admin or support token; a device token cannot use it",
            )),
        }
    }
}

/// Checks the bearer token: the admin or support token, or a device's; or
/// else the cookie of a dashboard session.
fn caller(guard: &Guard, headers: &HeaderMap) -> Result<Caller, ApiError> {
    if !headers.contains_key(header::AUTHORIZATION)
        && let Some(session) = super::dashboard::session_of(guard, headers)
    {
        return Ok(Caller::Operator(session.role));
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or invalid bearer token: send \"Authorization: Bearer TOKEN\" with the \
                 device's token or the admin token",
            )
        })?;
    if let Some(role) = guard.runtime().credentials.role_of(token) {
        return Ok(Caller::Operator(role));
    }
    guard
        .devices()
        .token_owner(&super::sha256(token))
        .map(Caller::Device)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid token: it matches neither the admin token, the support token nor a \
                 device's token_sha256 in the devices file",
            )
        })
}

fn lookup_error(error: LookupError) -> ApiError {
    match error {
        LookupError::NotFound(message) => ApiError::new(StatusCode::NOT_FOUND, message),
        LookupError::Store(error) => ApiError::internal(error),
    }
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>, example: &str) -> Result<T, ApiError> {
    body.map(|Json(value)| value).map_err(|rejection| {
        ApiError::bad_request(format!(
            "{}; send a JSON object such as {example}",
            rejection.body_text()
        ))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeartbeatRequest {
    device: String,
    health: String,
    #[serde(default)]
    addresses: Vec<String>,
    /// The agent's reason for a yellow or red health.
    reason: Option<String>,
}

/// Maximum length of a heartbeat's reason, in bytes.
const MAX_REASON: usize = 1000;

const HEARTBEAT_EXAMPLE: &str =
    r#"{"device": "dev-17", "health": "green", "addresses": ["10.1.2.3"]}"#;

/// Maximum number of addresses in one heartbeat; the subnet of each address
/// receives a notice of the device's state changes.
pub const MAX_ADDRESSES: usize = 64;

/// Parses a reported address, dropping an IPv6 zone (`fe80::1%eth0`).
/// Returns `None` for text that is no address, and for addresses no device
/// can connect from (unspecified, broadcast, multicast).
fn device_address(text: &str) -> Option<IpAddr> {
    let without_zone = text.split_once('%').map_or(text, |(address, _)| address);
    let address: IpAddr = without_zone.trim().parse().ok()?;
    let usable = match address {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
    };
    usable.then_some(address)
}

async fn heartbeat(
    headers: HeaderMap,
    State(guard): Shared,
    body: Result<Json<HeartbeatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let caller = caller(&guard, &headers)?;
    let request = json_body(body, HEARTBEAT_EXAMPLE)?;
    match &caller {
        Caller::Operator(_) => {
            tracing::warn!(device = %request.device,
                "heartbeat refused: it came with the admin or support token, not the device's own");
            return Err(forbidden(
                "heartbeats come only with the device's own token: no one may report health \
                 for a device, because that would override its refusals",
            ));
        }
        Caller::Device(own) if *own != request.device => {
            tracing::warn!(device = %own, claimed = %request.device,
                "heartbeat refused: a device reported for another device");
        }
        Caller::Device(_) => {}
    }
    caller.require(&request.device)?;
    let mut ignored = Vec::new();
    let report = if request.health == "offline" {
        Report::Offline
    } else {
        let health = Health::parse(&request.health).ok_or_else(|| {
            ApiError::bad_request(format!(
                "invalid health {:?}: give green, yellow, red, or offline when the agent sleeps or stops",
                request.health
            ))
        })?;
        if request.addresses.len() > MAX_ADDRESSES {
            return Err(ApiError::bad_request(format!(
                "{} addresses in one heartbeat; report at most {MAX_ADDRESSES}, the device's own \
                 interface addresses",
                request.addresses.len()
            )));
        }
        let mut addresses = Vec::with_capacity(request.addresses.len());
        for text in &request.addresses {
            match device_address(text) {
                Some(address) => addresses.push(address),
                None => ignored.push(text.clone()),
            }
        }
        if !ignored.is_empty() {
            tracing::warn!(device = %request.device, ignored = ?ignored,
                "heartbeat addresses ignored: not a unicast IP address");
        }
        let reason = request
            .reason
            .as_deref()
            .map(str::trim)
            .filter(|reason| !reason.is_empty())
            .map(str::to_string);
        if reason
            .as_ref()
            .is_some_and(|reason| reason.len() > MAX_REASON)
        {
            return Err(ApiError::bad_request(format!(
                "reason is longer than {MAX_REASON} bytes; send a short summary of the failed checks"
            )));
        }
        Report::Heartbeat {
            health,
            addresses,
            reason,
        }
    };
    let runtime = guard.runtime();
    let view = guard
        .devices()
        .report(
            &runtime.config.devices,
            &request.device,
            report,
            guard.store().now(),
        )
        .await
        .map_err(lookup_error)?;
    let mut view = view;
    if !ignored.is_empty()
        && let serde_json::Value::Object(map) = &mut view
    {
        map.insert("ignored_addresses".into(), ignored.into());
    }
    Ok(ok_json(view))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessRequest {
    source: String,
    destination: String,
    /// Refused connections an agent reports at once, folded into one
    /// event.
    attempts: Option<u64>,
}

async fn access(
    headers: HeaderMap,
    State(guard): Shared,
    body: Result<Json<AccessRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let caller = caller(&guard, &headers)?;
    let request = json_body(
        body,
        r#"{"source": "10.1.2.3", "destination": "dev-17"} (device ids, computer names or addresses)"#,
    )?;
    let runtime = guard.runtime();
    if let Caller::Device(own) = &caller {
        // A device may name itself by id, computer name or its address.
        let source = guard.devices().device_named(&request.source).await;
        let destination = guard.devices().device_named(&request.destination).await;
        let own = own.as_str();
        if source.as_deref() != Some(own) && destination.as_deref() != Some(own) {
            return Err(forbidden(&format!(
                "device {own:?} may ask only about connections from or to itself: give its id, \
                 name or address as source or destination"
            )));
        }
    }
    if request.source == request.destination {
        return Err(ApiError::bad_request(
            "source and destination are the same; ask about a connection between two devices",
        ));
    }
    let outcome = guard
        .devices()
        .access(
            &runtime.config.devices,
            &request.source,
            &request.destination,
            request.attempts,
            guard.store().now(),
        )
        .await
        .map_err(lookup_error)?;
    let party = |party: &crate::heartbeat::Party| {
        json!({
            "id": party.id,
            "name": party.name,
            "unsafe": party.is_unsafe,
            "excluded": party.excluded.is_some(),
        })
    };
    let mut body = json!({
        "source": party(&outcome.source),
        "destination": party(&outcome.destination),
    });
    match &outcome.decision {
        Access::Allowed { reason } => {
            body["allowed"] = true.into();
            body["reason"] = reason.clone().into();
        }
        Access::Refused { refusals } => {
            body["allowed"] = false.into();
            let texts: Vec<&str> = refusals.iter().map(|r| r.text.as_str()).collect();
            body["reason"] = texts.join("; ").into();
            body["refusals"] = refusals
                .iter()
                .map(|refusal| {
                    json!({
                        "device": refusal.device,
                        "side": refusal.side.as_str(),
                        "text": refusal.text,
                    })
                })
                .collect();
        }
    }
    Ok(ok_json(body))
}

async fn list(headers: HeaderMap, State(guard): Shared) -> Result<Response, ApiError> {
    caller(&guard, &headers)?.require_operator()?;
    let runtime = guard.runtime();
    let devices = guard
        .devices()
        .list(&runtime.config.devices, Timestamp::now())
        .await;
    Ok(ok_json(json!({
        "reject_unsafe": guard.devices().reject_unsafe(&runtime.config.devices),
        "relay_gate": runtime.config.devices.relay_gate,
        "heartbeat_timeout": humantime::format_duration(runtime.config.devices.heartbeat_timeout).to_string(),
        "devices": devices,
    })))
}

async fn show(
    headers: HeaderMap,
    State(guard): Shared,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller(&guard, &headers)?.require(&id)?;
    let runtime = guard.runtime();
    let view = guard
        .devices()
        .view(&runtime.config.devices, &id, Timestamp::now())
        .await
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "device {id:?} is not in the devices file; list them with GET /api/v1/devices"
                ),
            )
        })?;
    Ok(ok_json(view))
}

async fn subnet(
    headers: HeaderMap,
    State(guard): Shared,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller(&guard, &headers)?.require(&id)?;
    let runtime = guard.runtime();
    let view = guard
        .devices()
        .subnet_view(&runtime.config.devices, &id, Timestamp::now())
        .await
        .map_err(lookup_error)?;
    Ok(ok_json(view))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    /// Resume after this notice id, like the `Last-Event-ID` header.
    after: Option<i64>,
}

/// State of one event stream between notices.
struct Stream {
    guard: Arc<Guard>,
    device: String,
    cursor: i64,
    pending: VecDeque<crate::store::devices::Notice>,
    newest: tokio::sync::watch::Receiver<i64>,
}

async fn events(
    headers: HeaderMap,
    State(guard): Shared,
    Path(id): Path<String>,
    Query(query): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    caller(&guard, &headers)?.require(&id)?;
    if guard.devices().book().get(&id).is_none() {
        return Err(lookup_error(LookupError::NotFound(format!(
            "device {id:?} is not in the devices file"
        ))));
    }
    let last_event_id = match headers.get("last-event-id") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|text| text.trim().parse::<i64>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "invalid Last-Event-ID {value:?}: send the id of the last event received"
                    ))
                })?,
        ),
    };
    // Without a resume point the stream starts with the next notice; the
    // current unsafe devices are at /api/v1/devices/{id}/subnet. A resume
    // point past the newest notice (the client's position comes from a
    // replaced database) would hide every notice up to it, so the stream
    // starts with the next notice then too. A resume point older than the
    // kept notices resumes with the oldest kept one.
    let newest = guard.devices().newest_notice();
    let cursor = match last_event_id.or(query.after) {
        Some(after) if after > newest => {
            tracing::warn!(device = %id, after, newest,
                "device event stream: resume point is past the newest notice; starting after the newest");
            newest
        }
        Some(after) => after,
        None => newest,
    };
    tracing::info!(device = %id, after = cursor, "device event stream opened");
    let newest = guard.devices().subscribe();
    let state = Stream {
        guard,
        device: id,
        cursor,
        pending: VecDeque::new(),
        newest,
    };
    let stream = futures_util::stream::unfold(state, next_event);
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    // The stream's starting point, so a client that receives no notice
    // before a reconnect can still resume without a gap.
    if let Ok(value) = axum::http::HeaderValue::from_str(&cursor.to_string()) {
        response
            .headers_mut()
            .insert("sendguard-stream-start", value);
    }
    Ok(response)
}

/// Returns the next notice of a stream, waiting for one; `None` ends the
/// stream (the device left the devices file, or the store failed).
async fn next_event(mut state: Stream) -> Option<(Result<SseEvent, Infallible>, Stream)> {
    loop {
        if let Some(notice) = state.pending.pop_front() {
            let kind = notice.body["type"].as_str().unwrap_or("notice").to_string();
            let event = SseEvent::default()
                .id(notice.id.to_string())
                .event(kind)
                .data(notice.body.to_string());
            return Some((Ok(event), state));
        }
        // Mark the newest id as seen before reading, so a notice stored
        // during the read wakes the wait below.
        state.newest.borrow_and_update();
        let runtime = state.guard.runtime();
        let read = state
            .guard
            .devices()
            .notices_for(&runtime.config.devices, &state.device, state.cursor)
            .await;
        match read {
            Ok((notices, cursor)) => {
                let advanced = cursor != state.cursor;
                state.cursor = cursor;
                state.pending.extend(notices);
                if advanced {
                    continue;
                }
            }
            Err(error) => {
                tracing::warn!(%error, device = %state.device, "device event stream ended");
                return None;
            }
        }
        state.newest.changed().await.ok()?;
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScanResultRequest {
    /// `clean`, `infected` or `failed`.
    result: String,
    /// Id of the `scan_requested` notice that requested the scan; none for
    /// a scan the agent started on its own.
    request: Option<i64>,
    #[serde(default)]
    paths: Vec<String>,
    /// Each finding as `{"path": ..., "signature": ...}`.
    #[serde(default)]
    findings: Vec<Value>,
    /// The cause of a failed scan.
    error: Option<String>,
}

/// Maximum number of findings recorded from one scan report.
const MAX_FINDINGS: usize = 100;

async fn scan_result(
    headers: HeaderMap,
    State(guard): Shared,
    Path(id): Path<String>,
    body: Result<Json<ScanResultRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let caller = caller(&guard, &headers)?;
    if !matches!(caller, Caller::Device(_)) {
        return Err(forbidden(
            "scan results come only with the device's own token, from the agent that scanned",
        ));
    }
    caller.require(&id)?;
    let request = json_body(
        body,
        r#"{"result": "infected", "request": 42, "paths": ["/home"], "findings": [{"path": "/home/a/x", "signature": "Eicar-Test-Signature"}]}"#,
    )?;
    if !["clean", "infected", "failed"].contains(&request.result.as_str()) {
        return Err(ApiError::bad_request(format!(
            "invalid result {:?}: give clean, infected or failed",
            request.result
        )));
    }
    if request.findings.len() > MAX_FINDINGS {
        return Err(ApiError::bad_request(format!(
            "{} findings in one report; send at most {MAX_FINDINGS}",
            request.findings.len()
        )));
    }
    let mut details = serde_json::Map::new();
    details.insert("result".into(), request.result.clone().into());
    details.insert("request".into(), request.request.into());
    details.insert("paths".into(), request.paths.clone().into());
    details.insert("found".into(), request.findings.len().into());
    details.insert("findings".into(), request.findings.clone().into());
    if let Some(error) = &request.error {
        details.insert("error".into(), error.clone().into());
    }
    let now = guard.store().now();
    let event = crate::events::Event::for_device(
        now,
        crate::events::EventKind::EndpointScanResult,
        Some(&id),
        details,
    );
    guard
        .store()
        .append(vec![event])
        .await
        .map_err(ApiError::internal)?;
    if request.result == "clean" {
        tracing::info!(device = %id, request = ?request.request, "endpoint scan reported clean");
    } else {
        tracing::warn!(device = %id, request = ?request.request, result = %request.result,
            found = request.findings.len(), "endpoint scan reported");
    }
    Ok((
        StatusCode::CREATED,
        Json(json!({ "device": id, "result": request.result, "recorded": now.to_rfc3339() })),
    )
        .into_response())
}

async fn list_exclusions(headers: HeaderMap, State(guard): Shared) -> Result<Response, ApiError> {
    caller(&guard, &headers)?.require_operator()?;
    let runtime = guard.runtime();
    let config = &runtime.config.devices;
    let overrides = guard
        .devices()
        .exclusion_overrides()
        .await
        .map_err(ApiError::internal)?;
    let views = guard.devices().list(config, Timestamp::now()).await;
    let view_of = |id: &str| views.iter().find(|device| device["id"] == id);
    let added: Vec<Value> = overrides
        .iter()
        .filter(|row| row.excluded)
        .map(|row| {
            json!({
                "device": row.device,
                "reason": row.reason,
                "author": row.author,
                "created": row.created.to_rfc3339(),
            })
        })
        .collect();
    // A lift names the file's exclusion that it lifts. The name is null
    // when the reloaded file no longer excludes the device, or when the
    // device left the devices file.
    let lifted: Vec<Value> = overrides
        .iter()
        .filter(|row| !row.excluded)
        .map(|row| {
            let view = view_of(&row.device);
            let lift = view.map(|device| &device["exclusion_lifted"]);
            json!({
                "device": row.device,
                "name": view.map(|device| device["name"].clone()),
                "reason": row.reason,
                "author": row.author,
                "created": row.created.to_rfc3339(),
                "file_source": lift.map(|lift| lift["file_source"].clone()),
                "file_reason": lift.map(|lift| lift["file_reason"].clone()),
            })
        })
        .collect();
    let in_force: Vec<Value> = views
        .iter()
        .filter(|device| device["excluded"] == true)
        .map(|device| {
            json!({
                "id": device["id"],
                "name": device["name"],
                "reason": device["exclusion_reason"],
                "source": device["exclusion_source"],
            })
        })
        .collect();
    Ok(ok_json(json!({
        "configured": config.exclusions,
        "exclude_update_caches": config.exclude_update_caches,
        "exclude_message_relays": config.exclude_message_relays,
        "added": added,
        "lifted": lifted,
        "excluded": in_force,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExclusionRequest {
    device: String,
    /// `true` or absent adds an exclusion; `false` lifts the one that the
    /// configuration file gives the device.
    excluded: Option<bool>,
    reason: Option<String>,
    author: Option<String>,
}

const EXCLUSION_EXAMPLE: &str = r#"{"device": "dev-40", "reason": "file server", "author": "jdoe"} (add "excluded": false to lift an exclusion from the configuration file)"#;

async fn add_exclusion(
    headers: HeaderMap,
    State(guard): Shared,
    body: Result<Json<ExclusionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    if caller(&guard, &headers)?.require_operator()? != Role::Admin {
        return Err(forbidden(
            "device exclusions are managed with the admin token; the support token can only read them",
        ));
    }
    let request = json_body(body, EXCLUSION_EXAMPLE)?;
    let reason = request.reason.unwrap_or_default().trim().to_string();
    let author = request.author.unwrap_or_default().trim().to_string();
    if reason.is_empty() || author.is_empty() {
        return Err(ApiError::bad_request(
            "missing reason or author: say why the device's exclusion changes and who changes it; both are recorded",
        ));
    }
    // Both go into events and logs, so they are capped and kept to one line.
    let why = "say why the device's exclusion changes and who changes it";
    let reason =
        super::api::clean_text("reason", Some(reason), why).map_err(ApiError::bad_request)?;
    let author =
        super::api::clean_text("author", Some(author), why).map_err(ApiError::bad_request)?;
    let device = request.device;
    if request.excluded == Some(false) {
        return lift_exclusion(&guard, &device, &reason, &author).await;
    }
    let added = guard
        .devices()
        .add_exclusion(&device, &reason, &author, Timestamp::now())
        .await
        .map_err(lookup_error)?;
    if !added {
        let lifted = guard
            .devices()
            .exclusion_override(&device)
            .is_some_and(|row| !row.excluded);
        let message = if lifted {
            format!(
                "device {device:?} has its exclusion lifted through the API; remove that lift with \
                 DELETE /api/v1/device-exclusions/{device} to exclude it again"
            )
        } else {
            format!(
                "device {device:?} is already excluded through the API; remove that exclusion first to change it"
            )
        };
        return Err(ApiError::new(StatusCode::CONFLICT, message));
    }
    Ok((
        StatusCode::CREATED,
        Json(json!({ "device": device, "reason": reason, "author": author })),
    )
        .into_response())
}

/// Lifts the exclusion that the configuration file gives `device`.
async fn lift_exclusion(
    guard: &Guard,
    device: &str,
    reason: &str,
    author: &str,
) -> Result<Response, ApiError> {
    let runtime = guard.runtime();
    let outcome = guard
        .devices()
        .lift_exclusion(
            &runtime.config.devices,
            device,
            reason,
            author,
            Timestamp::now(),
        )
        .await
        .map_err(lookup_error)?;
    match outcome {
        Lift::Lifted => {
            // The request may name the device; the response gives its id.
            let id = guard
                .devices()
                .book()
                .find(device)
                .map_or_else(|| device.to_string(), |found| found.id.clone());
            let view = guard
                .devices()
                .view(&runtime.config.devices, &id, Timestamp::now())
                .await;
            let lift = view.map(|view| view["exclusion_lifted"].clone());
            Ok((
                StatusCode::CREATED,
                Json(json!({
                    "device": id,
                    "excluded": false,
                    "reason": reason,
                    "author": author,
                    "lifted": lift,
                })),
            )
                .into_response())
        }
        Lift::AlreadyOverridden => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "device {device:?} already has an exclusion added or lifted through the API; \
                 remove it with DELETE /api/v1/device-exclusions/{device} first to change it"
            ),
        )),
        Lift::NotExcludedByFile => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "device {device:?} is not excluded by devices.exclusions or by its role, so there \
                 is no exclusion to lift"
            ),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveQuery {
    by: Option<String>,
}

/// Returns who removes an exclusion: `by`, checked like every other author
/// (at most 500 characters, control characters made spaces), or "admin"
/// when the request leaves it out.
fn removal_author(by: Option<String>) -> Result<String, String> {
    match by {
        None => Ok("admin".to_string()),
        by => super::api::clean_text("by", by, "say who removes the exclusion, or leave by out"),
    }
}

async fn remove_exclusion(
    headers: HeaderMap,
    State(guard): Shared,
    Path(id): Path<String>,
    Query(query): Query<RemoveQuery>,
) -> Result<Response, ApiError> {
    if caller(&guard, &headers)?.require_operator()? != Role::Admin {
        return Err(forbidden(
            "device exclusions are managed with the admin token; the support token can only read them",
        ));
    }
    let by = removal_author(query.by).map_err(ApiError::bad_request)?;
    let removed = guard
        .devices()
        .remove_exclusion(&id, &by, Timestamp::now())
        .await
        .map_err(ApiError::internal)?;
    match removed {
        Some(row) => Ok(ok_json(json!({
            "device": row.device,
            "excluded": row.excluded,
            "reason": row.reason,
            "author": row.author,
            "removed_by": by,
        }))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "device {id:?} has no exclusion added or lifted through the API, so there is \
                 nothing to reset; to lift an exclusion from devices.exclusions or by role, \
                 POST /api/v1/device-exclusions with \"excluded\": false"
            ),
        )),
    }
}

/// Returns the device settings in force, each with its source.
fn settings_json(guard: &Guard) -> Value {
    let runtime = guard.runtime();
    let config = &runtime.config.devices;
    let reject_unsafe = super::dashboard::setting_json(
        guard.devices().reject_unsafe_override(),
        config.reject_unsafe,
    );
    json!({
        "reject_unsafe": reject_unsafe,
        "relay_gate": { "value": config.relay_gate, "source": "file" },
    })
}

async fn settings(headers: HeaderMap, State(guard): Shared) -> Result<Response, ApiError> {
    caller(&guard, &headers)?.require_operator()?;
    Ok(ok_json(settings_json(&guard)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsRequest {
    /// `true` or `false` overrides the file; `null` goes back to it.
    reject_unsafe: Option<bool>,
    reason: Option<String>,
    author: Option<String>,
}

async fn change_settings(
    headers: HeaderMap,
    State(guard): Shared,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    if caller(&guard, &headers)?.require_operator()? != Role::Admin {
        return Err(forbidden(
            "device settings are changed with the admin token; the support token can only read them",
        ));
    }
    const EXAMPLE: &str = r#"{"reject_unsafe": true, "reason": "...", "author": "..."} (null resets to the file's value)"#;
    let value = json_body(body, EXAMPLE)?;
    if value.get("reject_unsafe").is_none() {
        return Err(ApiError::bad_request(format!(
            "missing reject_unsafe; send {EXAMPLE}"
        )));
    }
    let request: SettingsRequest = serde_json::from_value(value).map_err(|error| {
        ApiError::bad_request(format!("invalid settings: {error}; send {EXAMPLE}"))
    })?;
    let reason = request.reason.unwrap_or_default().trim().to_string();
    let author = request.author.unwrap_or_default().trim().to_string();
    if reason.is_empty() || author.is_empty() {
        return Err(ApiError::bad_request(
            "missing reason or author: say why the setting changes and who changes it; both are recorded",
        ));
    }
    guard
        .devices()
        .set_reject_unsafe(request.reject_unsafe, &author, &reason, Timestamp::now())
        .await
        .map_err(ApiError::internal)?;
    Ok(ok_json(settings_json(&guard)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removal_author_checked() {
        assert_eq!(removal_author(None).as_deref(), Ok("admin"));
        assert_eq!(removal_author(Some(" jdoe ".into())).as_deref(), Ok("jdoe"));
        assert_eq!(
            removal_author(Some("jdoe\nforged line".into())).as_deref(),
            Ok("jdoe forged line")
        );
        assert!(removal_author(Some(String::new())).is_err());
        assert!(removal_author(Some("x".repeat(501))).is_err());
    }
}
