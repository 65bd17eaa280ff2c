//! `[synchronized_security]`, `[alerts]` and `[actions]`: what happens
//! beyond the block itself when a lockout starts or ends.

use super::Problems;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// `[synchronized_security]`: endpoint scans of the devices of a locked-out
/// mailbox's owner.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SynchronizedSecurityConfig {
    /// Request an on-demand scan of the owner's devices on every lockout:
    /// a `scan_requested` notice on each device's event stream, which
    /// `sendguard agent` acts on, and the `endpoint_scan` webhook when its
    /// URL is set. Turning it off never turns off the blocking or the
    /// alerts.
    pub enabled: bool,
    /// URL that receives the `endpoint_scan` webhook; without it, scans
    /// reach only the devices that run `sendguard agent`.
    pub endpoint_scan_url: Option<String>,
}

/// `[alerts]`: telling the administrator about lockouts.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// URL that receives the `admin_alert` webhook for lockout starts,
    /// permanent blocks and lockout ends.
    pub webhook_url: Option<String>,
    /// Addresses that get an alert e-mail for each lockout start and
    /// permanent block.
    pub admin_addresses: Vec<String>,
    /// Envelope sender and `From:` of alert e-mails; default
    /// `sendguard@` followed by `smtp.hostname`.
    pub from: Option<String>,
    /// `host:port` of the SMTP server alert e-mails go through, without TLS
    /// or AUTH; default: the upstream, with its TLS and AUTH settings.
    pub relay: Option<String>,
}

/// `[actions]`: signing and delivery of webhooks and alert e-mails.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActionsConfig {
    /// File whose first line is the HMAC-SHA256 key that signs every
    /// webhook; required when a webhook URL is set.
    pub secret_file: Option<PathBuf>,
    /// PEM file of the CA that signed the webhook receivers' certificates;
    /// replaces the system's trust store.
    pub ca_file: Option<PathBuf>,
    /// Time allowed for one webhook request or alert e-mail, connect
    /// included.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Wait before the first retry; each later retry waits twice as long.
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Maximum wait between two attempts.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Age after which an undelivered webhook or e-mail is given up, with
    /// an `action_abandoned` event.
    #[serde(with = "humantime_serde")]
    pub give_up_after: Duration,
}

impl Default for ActionsConfig {
    fn default() -> Self {
        ActionsConfig {
            secret_file: None,
            ca_file: None,
            timeout: Duration::from_secs(10),
            retry_initial: Duration::from_secs(30),
            retry_max: Duration::from_secs(3600),
            give_up_after: Duration::from_secs(2 * 24 * 3600),
        }
    }
}

/// Validates the three sections together, since each depends on the others.
pub(super) fn validate(
    synchronized: &SynchronizedSecurityConfig,
    alerts: &AlertsConfig,
    actions: &ActionsConfig,
    problems: &mut Problems,
) {
    let urls = [
        (
            "synchronized_security.endpoint_scan_url",
            &synchronized.endpoint_scan_url,
        ),
        ("alerts.webhook_url", &alerts.webhook_url),
    ];
    for (key, url) in urls {
        if let Some(url) = url {
            validate_url(key, url, problems);
        }
    }
    let any_webhook = urls.iter().any(|(_, url)| url.is_some());
    if any_webhook && actions.secret_file.is_none() {
        problems.push(
            "actions.secret_file",
            "missing; every webhook is signed with the key read from this file (create one with \
             `head -c 32 /dev/urandom | base64 > FILE`)",
        );
    }

    for (index, address) in alerts.admin_addresses.iter().enumerate() {
        if !is_plain_address(address) {
            problems.push(
                format!("alerts.admin_addresses[{index}]"),
                format!(
                    "{address:?} is not an ASCII e-mail address such as \"secops@example.org\" \
                     (write an internationalised domain in its xn-- form)"
                ),
            );
        }
    }
    if let Some(from) = &alerts.from
        && !is_plain_address(from)
    {
        problems.push(
            "alerts.from",
            format!("{from:?} is not an e-mail address such as \"sendguard@example.org\""),
        );
    }
    if let Some(relay) = &alerts.relay
        && !super::is_host_port(relay)
    {
        problems.push(
            "alerts.relay",
            format!("{relay:?} is not host:port, such as \"127.0.0.1:25\""),
        );
    }

    for (key, value) in [
        ("actions.timeout", actions.timeout),
        ("actions.retry_initial", actions.retry_initial),
        ("actions.retry_max", actions.retry_max),
        ("actions.give_up_after", actions.give_up_after),
    ] {
        if value.is_zero() {
            problems.push(key, "must be longer than zero");
        }
    }
    if actions.retry_max < actions.retry_initial {
        problems.push(
            "actions.retry_max",
            format!(
                "is {}, shorter than actions.retry_initial ({})",
                humantime::format_duration(actions.retry_max),
                humantime::format_duration(actions.retry_initial)
            ),
        );
    }
}

fn validate_url(key: &str, url: &str, problems: &mut Problems) {
    let shown = crate::actions::redact_url(url);
    // The URL parser forgives a missing host ("http:///x" becomes host
    // "x") and surrounding spaces; a typo like that should be reported.
    let host_written = url
        .split_once("://")
        .is_some_and(|(_, rest)| !rest.starts_with('/'));
    match reqwest::Url::parse(url) {
        Ok(parsed)
            if matches!(parsed.scheme(), "http" | "https")
                && parsed.has_host()
                && host_written
                && url.trim() == url
                && parsed.port() != Some(0) => {}
        Ok(_) => problems.push(
            key,
            format!(
                "{shown:?} is not an http:// or https:// URL with a host and a port other than 0"
            ),
        ),
        Err(error) => problems.push(key, format!("{shown:?} is not a valid URL: {error}")),
    }
}

/// Checks the form `local@domain` in ASCII, which is what the alert e-mail
/// writes into `MAIL FROM`, `RCPT TO` and its headers without needing
/// SMTPUTF8: one `@`, no brackets, spaces or controls, a local part that
/// does not start with `-` or `.`, and a domain of letters, digits and
/// hyphens between dots.
fn is_plain_address(address: &str) -> bool {
    let Some((local, domain)) = address.split_once('@') else {
        return false;
    };
    let local_valid = !local.is_empty()
        && !local.starts_with(['-', '.'])
        && local.chars().all(|c| {
            c.is_ascii_graphic()
                && !matches!(
                    c,
                    '<' | '>' | ',' | '"' | '@' | '(' | ')' | '[' | ']' | ';' | ':' | '\\'
                )
        });
    let domain_valid = domain.split('.').all(|label| {
        !label.is_empty()
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    });
    local_valid && domain_valid
}
