//! The API's routes and handlers.

use super::views::{block_json, exemption_json, exemption_list_json, ledger_json};
use super::{ApiError, Role, authenticate, forbidden, ok_json, percent_encode};
use crate::config::Unauthenticated;
use crate::events::{EventKind, Format, write_events};
use crate::guard::{Guard, LiftFailure, Runtime};
use crate::identity::MailboxKey;
use crate::policy::{ExemptionKind, LiftError, Timestamp};
use crate::store::EventFilter;
use crate::store::exemptions::NewExemption;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use std::net::IpAddr;
use std::sync::Arc;

type Shared = State<Arc<Guard>>;

/// Narrowest network prefixes an exemption may cover; wider ones would
/// switch counting off for most senders.
const MIN_PREFIX_V4: u8 = 8;
const MIN_PREFIX_V6: u8 = 16;
/// Maximum duration of an exemption.
const MAX_EXEMPTION: std::time::Duration = std::time::Duration::from_secs(366 * 24 * 3600);

/// Events returned per page when the request sets no limit.
const DEFAULT_PAGE: usize = 1000;
/// Largest page of events one request may ask for.
const MAX_PAGE: usize = 10_000;

pub fn router(guard: Arc<Guard>) -> Router {
    Router::new()
        .route("/api/v1/blocks", get(blocks))
        .route("/api/v1/mailboxes/{mailbox}", get(ledger))
        .route("/api/v1/mailboxes/{mailbox}/unblock", post(unblock))
        .route("/api/v1/events", get(events))
        .route(
            "/api/v1/exemptions",
            get(list_exemptions).post(add_exemption),
        )
        .route("/api/v1/exemptions/{id}", delete(remove_exemption))
        .route("/metrics", get(metrics))
        .route("/healthz", get(health))
        .merge(super::devices::routes())
        .merge(super::dashboard::routes())
        .merge(super::simulate::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            guard.clone(),
            super::dashboard::protect,
        ))
        .with_state(guard)
}

async fn method_not_allowed(
    headers: HeaderMap,
    State(guard): Shared,
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    authenticate(&guard, &headers)?;
    Err(ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{method} is not allowed on {}; see the README for the methods of each endpoint",
            uri.path()
        ),
    ))
}

/// Maximum length of a reason, author or name, in characters.
const MAX_TEXT: usize = 500;

/// Checks a free-text field: trimmed, not empty, at most [`MAX_TEXT`]
/// characters, control characters replaced with spaces so it cannot forge
/// lines in logs or reports.
///
/// # Errors
/// When the text is missing, empty or too long.
pub fn clean_text(field: &str, text: Option<String>, why: &str) -> Result<String, String> {
    let text = text.unwrap_or_default();
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("missing {field}: {why}"));
    }
    let length = text.chars().count();
    if length > MAX_TEXT {
        return Err(format!(
            "{field} is {length} characters long; keep it to {MAX_TEXT}"
        ));
    }
    Ok(text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect())
}

/// Unwraps a JSON body, turning axum's rejection into a JSON error that
/// shows an example of what to send.
fn json_body<T>(
    body: Result<Json<T>, axum::extract::rejection::JsonRejection>,
    example: &str,
) -> Result<T, ApiError> {
    match body {
        Ok(Json(value)) => Ok(value),
        Err(rejection) => Err(ApiError::new(
            rejection.status(),
            format!(
                "{}; send a JSON object such as {example}",
                rejection.body_text()
            ),
        )),
    }
}

async fn not_found(headers: HeaderMap, State(guard): Shared) -> Result<Response, ApiError> {
    authenticate(&guard, &headers)?;
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "no such endpoint; the API lives under /api/v1 (see the README)",
    ))
}

fn store_error(error: crate::store::StoreError) -> ApiError {
    ApiError::internal(error)
}

async fn blocks(headers: HeaderMap, State(guard): Shared) -> Result<Response, ApiError> {
    authenticate(&guard, &headers)?;
    let now = guard.store().now();
    let blocks = guard
        .store()
        .active_blocks(now)
        .await
        .map_err(store_error)?;
    let list: Vec<Value> = blocks
        .iter()
        .filter_map(|(key, state)| state.active_block(now).map(|block| block_json(key, block)))
        .collect();
    Ok(ok_json(json!({ "blocks": list })))
}

#[derive(Deserialize)]
struct ClientQuery {
    client: Option<String>,
}

/// Resolves a mailbox path segment and an optional client into a key.
async fn mailbox_key(
    guard: &Guard,
    mailbox: &str,
    client: Option<&str>,
) -> Result<MailboxKey, ApiError> {
    let runtime = guard.runtime();
    let canonical =
        crate::identity::mailbox_from_input(mailbox, &runtime.config.identity, &runtime.directory)
            .map_err(ApiError::bad_request)?;
    let client: Option<IpAddr> = match client {
        None | Some("") => None,
        Some(text) => Some(text.parse().map_err(|_| {
            ApiError::bad_request(format!(
                "invalid client {text:?}: give an IP address such as 192.0.2.7"
            ))
        })?),
    };
    let pairs = runtime.config.identity.unauthenticated == Unauthenticated::ClientAndSender;
    match (pairs, client) {
        (false, Some(_)) => Err(ApiError::bad_request(
            "client applies only with [identity] unauthenticated = \"client-and-sender\"; leave it out",
        )),
        (true, None) => {
            let known = guard
                .store()
                .mailbox_states(canonical.clone())
                .await
                .map_err(store_error)?;
            let clients: Vec<String> = known
                .iter()
                .filter_map(|(key, _)| key.client.map(|client| client.to_string()))
                .collect();
            let mut error = ApiError::bad_request(format!(
                "{canonical} is counted per client address under unauthenticated = \
                 \"client-and-sender\"; add ?client=ADDRESS (\"client\" in a request body)"
            ));
            error.details.insert("known_clients".into(), json!(clients));
            Err(error)
        }
        (_, client) => Ok(MailboxKey {
            mailbox: canonical,
            client,
        }),
    }
}

async fn ledger(
    headers: HeaderMap,
    State(guard): Shared,
    Path(mailbox): Path<String>,
    Query(query): Query<ClientQuery>,
) -> Result<Response, ApiError> {
    authenticate(&guard, &headers)?;
    let key = mailbox_key(&guard, &mailbox, query.client.as_deref()).await?;
    let state = guard.mailbox_state(&key).await.map_err(store_error)?;
    let runtime = guard.runtime();
    let view = ledger_json(
        &key,
        &state,
        &runtime.settings(),
        &guard.exemptions(),
        &runtime.directory,
        Timestamp::now(),
    );
    Ok(ok_json(view))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnblockRequest {
    reason: Option<String>,
    #[serde(default)]
    reset_count: bool,
    client: Option<String>,
}

async fn unblock(
    headers: HeaderMap,
    State(guard): Shared,
    Path(mailbox): Path<String>,
    body: Result<Json<UnblockRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let role = authenticate(&guard, &headers)?;
    if role != Role::Support {
        return Err(forbidden(
            "lifting a permanent block or resetting a lockout count needs the support token; \
             the admin token cannot do it",
        ));
    }
    let request = json_body(body, "{\"reason\": \"...\", \"reset_count\": false}")?;
    let reason = clean_text(
        "reason",
        request.reason,
        "say why the block is lifted; it is recorded in the events report",
    )
    .map_err(ApiError::bad_request)?;
    let key = mailbox_key(&guard, &mailbox, request.client.as_deref()).await?;
    match guard.lift(&key, request.reset_count, &reason, "api").await {
        Ok(lifted) => Ok(ok_json(json!({
            "mailbox": key.mailbox,
            "key_client": key.client.map(|client| client.to_string()),
            "permanent_block_lifted": lifted.block.is_some(),
            "lockouts_before": lifted.lockouts_before,
            "lockouts_after": lifted.lockouts_after,
        }))),
        Err(LiftFailure::Refused(refusal)) => {
            let mut error = ApiError::new(StatusCode::CONFLICT, refusal.to_string());
            if let LiftError::TimedLockout(lockout) = &refusal {
                error.details.insert(
                    "until".into(),
                    lockout.until.map(Timestamp::to_rfc3339).into(),
                );
                error.details.insert("level".into(), lockout.level.into());
            }
            Err(error)
        }
        Err(LiftFailure::Store(error)) => Err(store_error(error)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    since: Option<String>,
    until: Option<String>,
    mailbox: Option<String>,
    device: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    format: Option<String>,
    limit: Option<usize>,
    after: Option<i64>,
}

/// Parses a time bound: a duration back from now or an RFC 3339 time. A
/// duration that reaches back before 1970 gives 1970-01-01T00:00:00Z, so
/// the bound stays printable and still covers every event.
pub fn parse_time(name: &str, text: &str) -> Result<Timestamp, String> {
    if let Ok(duration) = humantime::parse_duration(text) {
        return Ok(Timestamp::now().saturating_sub(duration).max(Timestamp(0)));
    }
    Timestamp::parse_rfc3339(text).ok_or_else(|| {
        format!(
            "invalid {name} {text:?}: give a duration back from now such as 1h or 30d, or a time such as 2026-12-04T21:00:00Z"
        )
    })
}

async fn events(
    headers: HeaderMap,
    State(guard): Shared,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    authenticate(&guard, &headers)?;
    let Query(query) = query.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    let runtime = guard.runtime();
    let mut filter = EventFilter::default();
    if let Some(since) = &query.since {
        filter.since = Some(parse_time("since", since).map_err(ApiError::bad_request)?);
    }
    if let Some(until) = &query.until {
        filter.until = Some(parse_time("until", until).map_err(ApiError::bad_request)?);
    }
    if let (Some(since), Some(until)) = (filter.since, filter.until)
        && since >= until
    {
        return Err(ApiError::bad_request(format!(
            "since ({}) is not before until ({}), so no event could match",
            since.to_rfc3339(),
            until.to_rfc3339()
        )));
    }
    if let Some(mailbox) = &query.mailbox {
        filter.mailbox = Some(
            crate::identity::mailbox_from_input(
                mailbox,
                &runtime.config.identity,
                &runtime.directory,
            )
            .map_err(ApiError::bad_request)?,
        );
    }
    if let Some(device) = &query.device {
        filter.device_mailboxes = runtime.directory.mailboxes_of_device(device);
        filter.device = Some(device.clone());
    }
    if let Some(kind) = &query.kind {
        filter.kind = Some(EventKind::parse(kind).ok_or_else(|| {
            let known: Vec<&str> = EventKind::ALL.iter().map(|kind| kind.as_str()).collect();
            ApiError::bad_request(format!(
                "unknown event type {kind:?}; known types: {}",
                known.join(", ")
            ))
        })?);
    }
    let format = match query.format.as_deref() {
        None | Some("json") => Format::Json,
        Some("csv") => Format::Csv,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown format {other:?}: use json (one object per line) or csv"
            )));
        }
    };
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad_request(format!(
            "limit {limit} is out of range: give 1 to {MAX_PAGE}, and follow the Link header for more"
        )));
    }
    filter.limit = Some(limit);
    filter.after = query.after;

    let events = guard
        .store()
        .query_events(filter.clone())
        .await
        .map_err(store_error)?;
    let mut body = Vec::new();
    write_events(&mut body, &events, format).map_err(ApiError::internal)?;
    let content_type = match format {
        Format::Csv => "text/csv; charset=utf-8",
        _ => "application/x-ndjson",
    };
    let mut response = Response::new(Body::from(body));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if events.len() == limit
        && let Some(last) = events.last().and_then(|event| event.id)
    {
        let next = next_page_link(&query, last);
        if let Ok(value) = HeaderValue::from_str(&format!("<{next}>; rel=\"next\"")) {
            response.headers_mut().insert(header::LINK, value);
        }
    }
    Ok(response)
}

/// Builds the URL of the page after the event with id `last`.
fn next_page_link(query: &EventsQuery, last: i64) -> String {
    let mut pairs = url_pairs(query);
    pairs.push(("after".to_string(), last.to_string()));
    let encoded: Vec<String> = pairs
        .iter()
        .map(|(name, value)| format!("{name}={}", percent_encode(value)))
        .collect();
    format!("/api/v1/events?{}", encoded.join("&"))
}

fn url_pairs(query: &EventsQuery) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let fields = [
        ("since", &query.since),
        ("until", &query.until),
        ("mailbox", &query.mailbox),
        ("device", &query.device),
        ("type", &query.kind),
        ("format", &query.format),
    ];
    for (name, value) in fields {
        if let Some(value) = value {
            pairs.push((name.to_string(), value.clone()));
        }
    }
    if let Some(limit) = query.limit {
        pairs.push(("limit".to_string(), limit.to_string()));
    }
    pairs
}

#[derive(Deserialize)]
struct ExemptionsQuery {
    #[serde(default)]
    all: bool,
}

async fn list_exemptions(
    headers: HeaderMap,
    State(guard): Shared,
    query: Result<Query<ExemptionsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    authenticate(&guard, &headers)?;
    let Query(query) = query.map_err(|rejection| {
        ApiError::bad_request(format!(
            "{}; use all=true or all=false",
            rejection.body_text()
        ))
    })?;
    let now = Timestamp::now();
    let listed = guard.store().all_exemptions().await.map_err(store_error)?;
    Ok(ok_json(exemption_list_json(&listed, query.all, now)))
}

/// A request to add an exemption, as the API and the command line take it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExemptionRequest {
    pub sender: Option<String>,
    pub login: Option<String>,
    pub network: Option<String>,
    pub reason: Option<String>,
    pub author: Option<String>,
    /// End as an RFC 3339 time.
    pub expires: Option<String>,
    /// End as a duration from now, such as "7d".
    #[serde(rename = "for")]
    pub duration: Option<String>,
}

/// Checks an exemption request and turns it into a new exemption.
///
/// # Errors
/// A message saying which field is missing or invalid and how to fix it.
pub fn new_exemption(runtime: &Runtime, request: ExemptionRequest) -> Result<NewExemption, String> {
    let ExemptionRequest {
        sender,
        login,
        network,
        reason,
        author,
        expires,
        duration,
    } = request;
    let kind = match (sender, login, network) {
        (Some(sender), None, None) => ExemptionKind::Sender(crate::identity::mailbox_from_input(
            &sender,
            &runtime.config.identity,
            &runtime.directory,
        )?),
        (None, Some(login), None) if !login.trim().is_empty() => {
            ExemptionKind::Login(login.trim().to_lowercase())
        }
        (None, Some(_), None) => return Err("login is empty: give the SASL login".to_string()),
        (None, None, Some(network)) => {
            let parsed = network
                .parse::<ipnet::IpNet>()
                .or_else(|_| network.parse::<IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    format!("invalid network {network:?}: give one such as 192.0.2.0/24 or 2001:db8::/32")
                })?;
            let shortest = match parsed {
                ipnet::IpNet::V4(_) => MIN_PREFIX_V4,
                ipnet::IpNet::V6(_) => MIN_PREFIX_V6,
            };
            if parsed.prefix_len() < shortest {
                return Err(format!(
                    "network {parsed} is wider than /{shortest}, so it would stop counting for most \
                     senders; exempt the networks that need it one by one"
                ));
            }
            ExemptionKind::Network(parsed.trunc())
        }
        _ => {
            return Err(
                "give exactly one of sender, login or network (--sender, --login or --network on \
                 the command line), such as \"sender\": \"news@example.org\""
                    .to_string(),
            );
        }
    };
    let reason = clean_text(
        "reason",
        reason,
        "say why the sender is exempt; it is recorded",
    )?;
    let author = clean_text(
        "author",
        author,
        "say who adds the exemption; it is recorded",
    )?;
    let now = Timestamp::now();
    let expires = match (expires, duration) {
        (Some(expires), None) => Timestamp::parse_rfc3339(&expires).ok_or_else(|| {
            format!(
                "invalid expires {expires:?}: give an RFC 3339 time such as 2026-12-31T00:00:00Z"
            )
        })?,
        (None, Some(duration)) => {
            let length = humantime::parse_duration(&duration).map_err(|error| {
                format!("invalid duration {duration:?}: {error}; give one such as 7d or 12h")
            })?;
            now.saturating_add(length)
        }
        _ => {
            return Err(
                "give exactly one of expires (an RFC 3339 time; --expires) or for (a duration \
                 such as 7d; --for); every exemption ends"
                    .to_string(),
            );
        }
    };
    if expires <= now {
        return Err(format!(
            "the exemption would end at {}, which is not in the future",
            expires.to_rfc3339()
        ));
    }
    if expires > now.saturating_add(MAX_EXEMPTION) {
        return Err(format!(
            "the exemption would end at {}, more than {} from now; exemptions last at most that \
             long, so renew it when it ends",
            expires.to_rfc3339(),
            humantime::format_duration(MAX_EXEMPTION)
        ));
    }
    Ok(NewExemption {
        kind,
        reason,
        author,
        created: now,
        expires,
    })
}

async fn add_exemption(
    headers: HeaderMap,
    State(guard): Shared,
    body: Result<Json<ExemptionRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let role = authenticate(&guard, &headers)?;
    if role != Role::Admin {
        return Err(forbidden(
            "exemptions are managed with the admin token; the support token can only read them",
        ));
    }
    let request = json_body(
        body,
        "{\"sender\": \"news@example.org\", \"reason\": \"...\", \"author\": \"...\", \"for\": \"7d\"}",
    )?;
    let new = new_exemption(&guard.runtime(), request).map_err(ApiError::bad_request)?;
    let exemption = guard
        .store()
        .add_exemption(new)
        .await
        .map_err(store_error)?;
    guard.reload_exemptions().await.map_err(store_error)?;
    tracing::info!(exemption = exemption.id, author = %exemption.author, reason = %exemption.reason,
        expires = %exemption.expires.to_rfc3339(), "exemption added");
    let body = exemption_json(&exemption, Timestamp::now());
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[derive(Deserialize)]
struct RemoveQuery {
    by: Option<String>,
}

async fn remove_exemption(
    headers: HeaderMap,
    State(guard): Shared,
    Path(id): Path<String>,
    Query(query): Query<RemoveQuery>,
) -> Result<Response, ApiError> {
    let role = authenticate(&guard, &headers)?;
    if role != Role::Admin {
        return Err(forbidden(
            "exemptions are managed with the admin token; the support token can only read them",
        ));
    }
    let id: i64 = id.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "invalid exemption id {id:?}: ids are whole numbers"
        ))
    })?;
    let by = match query.by {
        None => "admin".to_string(),
        by => clean_text("by", by, "say who removes the exemption, or leave by out")
            .map_err(ApiError::bad_request)?,
    };
    let now = Timestamp::now();
    let removed = guard
        .store()
        .remove_exemption(id, by.clone(), now)
        .await
        .map_err(store_error)?;
    let Some(exemption) = removed else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no exemption {id} is in force; list them with GET /api/v1/exemptions?all=true"
            ),
        ));
    };
    guard.reload_exemptions().await.map_err(store_error)?;
    tracing::info!(exemption = id, by, "exemption removed");
    let mut body = exemption_json(&exemption, now);
    if let Value::Object(map) = &mut body {
        map.insert("in_force".into(), false.into());
        map.insert("removed".into(), now.to_rfc3339().into());
        map.insert("removed_by".into(), by.into());
    }
    Ok(ok_json(body))
}

async fn metrics(headers: HeaderMap, State(guard): Shared) -> Result<Response, ApiError> {
    authenticate(&guard, &headers)?;
    let now = guard.store().now();
    let blocks = guard
        .store()
        .active_blocks(now)
        .await
        .map_err(store_error)?;
    let waiting = guard.store().outbox_count().await.map_err(store_error)?;
    let permanent = blocks
        .iter()
        .filter(|(_, state)| {
            state
                .active_block(now)
                .is_some_and(|block| block.is_permanent())
        })
        .count();
    let timed = blocks.len() - permanent;
    let metrics = &guard.metrics;
    metrics
        .active_blocks
        .get_or_create(&vec![("kind", "timed")])
        .set(i64::try_from(timed).unwrap_or(i64::MAX));
    metrics
        .active_blocks
        .get_or_create(&vec![("kind", "permanent")])
        .set(i64::try_from(permanent).unwrap_or(i64::MAX));
    metrics
        .outbox_waiting
        .set(i64::try_from(waiting).unwrap_or(i64::MAX));
    let mut response = Response::new(Body::from(metrics.encode()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    Ok(response)
}

async fn health(headers: HeaderMap, State(guard): Shared) -> Result<Response, ApiError> {
    authenticate(&guard, &headers)?;
    let mut store = match guard
        .store()
        .call(|connection| {
            connection.query_row("SELECT 1", [], |_| Ok(()))?;
            Ok(())
        })
        .await
    {
        Ok(()) => "ok".to_string(),
        Err(error) => format!("failed: {error}"),
    };
    if let Some(shared) = guard.store().shared()
        && store == "ok"
        && let Err(error) = shared.time().await
    {
        store = format!("failed: Redis: {error}");
    }
    let clamd = match guard.runtime().scanner.ping().await {
        Ok(Some(version)) => format!("ok: {version}"),
        Ok(None) => "not configured".to_string(),
        Err(error) => format!("failed: {error}"),
    };
    let healthy = store == "ok" && !clamd.starts_with("failed");
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok((
        status,
        Json(json!({ "healthy": healthy, "store": store, "clamd": clamd })),
    )
        .into_response())
}
