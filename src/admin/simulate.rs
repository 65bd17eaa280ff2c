//! `POST /api/v1/simulate`: replays recorded history under a candidate
//! policy and returns the report as JSON.

use super::{ApiError, authenticate, ok_json};
use crate::guard::Guard;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

/// The period simulated when the request gives no `since`.
const DEFAULT_SINCE: &str = "30d";

/// Builds the simulation route, which the API merges into its router.
pub fn routes() -> Router<Arc<Guard>> {
    Router::new().route("/api/v1/simulate", post(simulate))
}

/// The body of a simulation request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SimulateRequest {
    /// The candidate: TOML text with `[policy]`, `[identity]` and
    /// `[exemptions]` tables, or the same tables as a JSON object. Absent,
    /// the policy in force is replayed.
    #[serde(default)]
    policy: Option<Value>,
    /// Start of the period: a duration back from now such as `30d`, or an
    /// RFC 3339 time.
    #[serde(default)]
    since: Option<String>,
    /// Replay under the policies recorded in force instead, to check the
    /// replay against the recorded history.
    #[serde(default)]
    recorded: bool,
}

const EXAMPLE: &str = r#"{"policy": "[policy]\nthreshold = 3\n", "since": "30d"}"#;

async fn simulate(
    headers: HeaderMap,
    State(guard): State<Arc<Guard>>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    authenticate(&guard, &headers)?;
    let Json(body) = body.map_err(|rejection| {
        ApiError::new(
            rejection.status(),
            format!(
                "{}; send a JSON object such as {EXAMPLE}",
                rejection.body_text()
            ),
        )
    })?;
    let request = parse_request(body)?;
    let text = candidate_text(request.policy)?;
    let runtime = guard.runtime();
    let candidate = runtime.config.candidate(&text).map_err(|problems| {
        ApiError::bad_request(format!(
            "invalid candidate policy: {}",
            problems
                .0
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        ))
    })?;
    let since_text = request.since.as_deref().unwrap_or(DEFAULT_SINCE);
    let since = super::parse_time("since", since_text).map_err(ApiError::bad_request)?;
    let directory =
        crate::simulate::candidate_directory(&runtime.config, &runtime.directory, &candidate)
            .map_err(|error| ApiError::bad_request(error.to_string()))?;
    match crate::simulate::run(
        guard.store(),
        &candidate,
        &directory,
        since,
        request.recorded,
    )
    .await
    {
        Ok(report) => Ok(ok_json(report.to_json())),
        Err(crate::simulate::SimulateError::Store(error)) => Err(ApiError::internal(error)),
        Err(error) => Err(ApiError::bad_request(error.to_string())),
    }
}

/// Parses the request body. Serde would also read a struct from a JSON
/// array, so anything but an object is rejected first.
fn parse_request(body: Value) -> Result<SimulateRequest, ApiError> {
    if !body.is_object() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the body is {body}, not a JSON object; send one such as {EXAMPLE}"),
        ));
    }
    let request: SimulateRequest = serde_json::from_value(body).map_err(|error| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("invalid request body: {error}; send a JSON object such as {EXAMPLE}"),
        )
    })?;
    if request.recorded && request.policy.is_some() {
        return Err(ApiError::bad_request(
            "policy and \"recorded\": true exclude each other, because a recorded replay \
             uses the policies recorded in force; send one of them",
        ));
    }
    Ok(request)
}

/// Returns the candidate as TOML text, from TOML text or a JSON object.
fn candidate_text(policy: Option<Value>) -> Result<String, ApiError> {
    match policy {
        None => Ok(String::new()),
        Some(Value::String(text)) => Ok(text),
        Some(object @ Value::Object(_)) => {
            if let Some(key) = null_key(&object, "") {
                return Err(ApiError::bad_request(format!(
                    "policy key {key} is null, which TOML cannot express; leave the key out to \
                     keep the value of the configuration in force"
                )));
            }
            let table = toml::Value::try_from(object).map_err(|error| {
                ApiError::bad_request(format!(
                    "policy cannot be written as TOML: {error}; send tables of keys and values \
                     such as {{\"policy\": {{\"threshold\": 3}}}}"
                ))
            })?;
            toml::to_string(&table).map_err(|error| {
                ApiError::bad_request(format!("policy cannot be written as TOML: {error}"))
            })
        }
        Some(other) => Err(ApiError::bad_request(format!(
            "policy is {other}, neither TOML text nor a JSON object; send one such as {EXAMPLE}"
        ))),
    }
}

/// Returns the dotted path of the first null in `value`, such as
/// `policy.threshold`.
fn null_key(value: &Value, path: &str) -> Option<String> {
    let child_path = |name: &str| {
        if path.is_empty() {
            name.to_string()
        } else {
            format!("{path}.{name}")
        }
    };
    match value {
        Value::Null => Some(path.to_string()),
        Value::Object(map) => map
            .iter()
            .find_map(|(name, child)| null_key(child, &child_path(name))),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(index, item)| null_key(item, &child_path(&index.to_string()))),
        _ => None,
    }
}
