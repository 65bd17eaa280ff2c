//! `[admin]` (the HTTP API and its credentials) and `[events]` (retention
//! of the events report).

use super::Problems;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `[admin]`: the admin HTTP API and the support credential.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address and port of the HTTP API; without it no API runs.
    pub listen: Option<SocketAddr>,
    /// File whose first line is the admin bearer token.
    pub token_file: Option<PathBuf>,
    /// SHA-256 (hexadecimal) of the support token, which alone may lift a
    /// permanent block or reset a lockout count. The token itself is kept
    /// by the support staff, not on this host.
    pub support_token_sha256: Option<String>,
}

/// `[events]`: the events report.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Age after which events are deleted.
    #[serde(with = "humantime_serde")]
    pub keep: Duration,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            keep: Duration::from_secs(400 * 24 * 3600),
        }
    }
}

pub(super) fn validate(admin: &AdminConfig, events: &EventsConfig, problems: &mut Problems) {
    if admin.listen.is_some() && admin.token_file.is_none() {
        problems.push(
            "admin.token_file",
            "missing; admin.listen needs the file with the admin bearer token (create one with \
             `sendguard token generate > FILE`)",
        );
    }
    /// SHA-256 of the empty string: what `printf '' | sha256sum` prints.
    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    if let Some(hash) = &admin.support_token_sha256
        && hash.eq_ignore_ascii_case(EMPTY_SHA256)
    {
        problems.push(
            "admin.support_token_sha256",
            "is the SHA-256 of an empty text; hash the support token's file with \
             `sendguard token hash FILE`",
        );
    }
    if let Some(hash) = &admin.support_token_sha256
        && !(hash.len() == 64 && hash.chars().all(|c| c.is_ascii_hexdigit()))
    {
        problems.push(
            "admin.support_token_sha256",
            format!(
                "{hash:?} is not a SHA-256 in hexadecimal (64 digits); print it with \
                 `sendguard token hash FILE` on the support token's file"
            ),
        );
    }
    if events.keep.is_zero() {
        problems.push("events.keep", "must be longer than zero, such as \"400d\"");
    }
}
