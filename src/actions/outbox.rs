//! The outbox worker: sends due webhooks and alert e-mails, records each
//! attempt as an event, retries with capped exponential backoff and gives
//! up after `actions.give_up_after`.

use super::{ActionKind, OutboxEntry, PendingDelivery, mail, webhook};
use crate::config::Config;
use crate::events::{Event, EventKind};
use crate::guard::{Guard, Runtime};
use crate::policy::Timestamp;
use crate::smtp::upstream::UpstreamTarget;
use crate::store::StoreError;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Deliveries attempted at once.
const BATCH: usize = 16;
/// How often a host looks at the shared Redis outbox for items other
/// hosts added or left behind.
const SHARED_POLL: Duration = Duration::from_secs(2);

/// The clients and secret the outbox uses to reach receivers, built with
/// each configuration.
pub struct ActionClients {
    /// Key of the webhook signatures, from `actions.secret_file`.
    secret: Option<Vec<u8>>,
    /// Built only when a webhook URL is configured, so a host without
    /// webhooks needs no CA certificates.
    http: Option<reqwest::Client>,
    /// `alerts.relay` when set; otherwise alert e-mail goes to the upstream.
    alert_relay: Option<UpstreamTarget>,
}

impl ActionClients {
    /// Reads the webhook secret and builds the HTTP client and the alert
    /// relay for `config`.
    ///
    /// # Errors
    /// When the secret or CA file cannot be read, or the secret is empty.
    pub fn new(config: &Config) -> Result<ActionClients, String> {
        let secret = match &config.actions.secret_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| {
                    format!(
                        "actions.secret_file: cannot read {}: {error}; create it with \
                         `head -c 32 /dev/urandom | base64 > {}` and share it with the receivers",
                        path.display(),
                        path.display()
                    )
                })?;
                let secret = text.lines().next().unwrap_or("").trim().to_string();
                if secret.is_empty() {
                    return Err(format!(
                        "actions.secret_file: the first line of {} is empty; write the secret there",
                        path.display()
                    ));
                }
                Some(secret.into_bytes())
            }
        };
        let webhooks = config.synchronized_security.endpoint_scan_url.is_some()
            || config.alerts.webhook_url.is_some()
            || config.devices.subnet_webhook_url.is_some();
        let http = if webhooks {
            Some(webhook::client(
                config.actions.ca_file.as_deref(),
                config.actions.timeout,
            )?)
        } else {
            None
        };
        let alert_relay = match &config.alerts.relay {
            None => None,
            Some(address) => {
                let mut relay = config.upstream.clone();
                relay.address = address.clone();
                relay.tls = crate::config::UpstreamTls::None;
                relay.ca_file = None;
                relay.tls_name = None;
                relay.username = None;
                relay.password_file = None;
                relay.connect_timeout = config.actions.timeout;
                relay.timeout = config.actions.timeout;
                relay.data_timeout = config.actions.timeout;
                Some(UpstreamTarget::new(&relay, &config.smtp.hostname)?)
            }
        };
        Ok(ActionClients {
            secret,
            http,
            alert_relay,
        })
    }
}

/// Returns the wait after the `failures`-th failed attempt (counting from
/// 1): `initial` doubled for each earlier failure, at most `max`.
pub fn retry_delay(failures: u32, initial: Duration, max: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    initial
        .checked_mul(1u32 << doublings)
        .map_or(max, |delay| delay.min(max))
}

/// The result of one attempt.
enum Attempt {
    Delivered(String),
    Failed(String),
    /// The receiver refused for good (an SMTP 5xx), so no retry can succeed.
    Refused(String),
    /// The receiver is no longer configured, so nothing was sent and no
    /// retry can succeed.
    Unconfigured(String),
}

/// Delivers due outbox entries until `shutdown` fires. Entries left by an
/// earlier run are sent at once. An attempt cut short by shutdown is
/// repeated after the restart, with the same delivery id.
pub async fn run_outbox(guard: Arc<Guard>, mut shutdown: watch::Receiver<bool>) {
    const STORE_RETRY: Duration = Duration::from_secs(5);
    const IDLE: Duration = Duration::from_secs(3600);
    loop {
        let wait = match deliver_due(&guard).await {
            Ok(Some(next)) => next.since(Timestamp::now()),
            Ok(None) => IDLE,
            Err(error) => {
                tracing::error!(%error, "cannot read the outbox; retrying");
                STORE_RETRY
            }
        };
        // Other hosts add to the shared outbox without telling this one.
        let wait = match guard.store().shared() {
            Some(_) => wait.min(SHARED_POLL),
            None => wait,
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = guard.outbox_added() => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Attempts every due entry, records the outcomes, and returns when the
/// next entry is due.
async fn deliver_due(guard: &Arc<Guard>) -> Result<Option<Timestamp>, StoreError> {
    loop {
        let now = Timestamp::now();
        let due = guard
            .store()
            .due_deliveries(now, BATCH, attempt_lease(&guard.runtime()))
            .await?;
        let full_batch = due.len() == BATCH;
        let runtime = guard.runtime();
        let synchronized_security = guard
            .devices()
            .synchronized_security_override()
            .and_then(|row| row.value.as_bool());
        let mut attempts = JoinSet::new();
        for pending in due {
            let runtime = runtime.clone();
            attempts.spawn(async move {
                let outcome = attempt(&runtime, &pending.entry, synchronized_security).await;
                (pending, outcome)
            });
        }
        while let Some(joined) = attempts.join_next().await {
            match joined {
                Ok((pending, outcome)) => record(guard, &runtime, pending, outcome).await?,
                Err(error) => tracing::error!(%error, "an outbox attempt failed to run"),
            }
        }
        if !full_batch {
            return guard.store().next_delivery_due().await;
        }
    }
}

/// Returns how long a host leases a shared outbox item for one attempt:
/// an alert e-mail may take four `actions.timeout` periods, plus a margin
/// for recording the outcome.
fn attempt_lease(runtime: &Runtime) -> Duration {
    runtime
        .config
        .actions
        .timeout
        .saturating_mul(4)
        .saturating_add(Duration::from_secs(5))
}

/// Attempts one delivery; `synchronized_security` is the value of
/// `synchronized_security.enabled` stored through the API, if any.
async fn attempt(
    runtime: &Runtime,
    entry: &OutboxEntry,
    synchronized_security: Option<bool>,
) -> Attempt {
    let config = &runtime.config;
    let clients = &runtime.actions;
    let url = match entry.kind {
        ActionKind::EndpointScan => {
            if !super::synchronized_security_enabled(config, synchronized_security) {
                return Attempt::Unconfigured(
                    "synchronized security is now off, so no endpoint scan is requested"
                        .to_string(),
                );
            }
            config.synchronized_security.endpoint_scan_url.as_deref()
        }
        ActionKind::AdminAlert => config.alerts.webhook_url.as_deref(),
        ActionKind::AlertMail => return send_mail(runtime, entry).await,
        ActionKind::SubnetNotice => config.devices.subnet_webhook_url.as_deref(),
    };
    let Some(url) = url else {
        return Attempt::Unconfigured(format!("no URL for {} is configured any more", entry.kind));
    };
    let Some(secret) = &clients.secret else {
        return Attempt::Unconfigured("actions.secret_file is not set".to_string());
    };
    let Some(http) = &clients.http else {
        return Attempt::Unconfigured(
            "no webhook URL was configured at start or reload".to_string(),
        );
    };
    let shown = webhook::redact_url(url);
    match webhook::post(http, url, secret, entry, config.actions.timeout).await {
        Ok(status) => Attempt::Delivered(format!("{shown} answered {status}")),
        Err(error) => Attempt::Failed(format!("{shown}: {error}")),
    }
}

async fn send_mail(runtime: &Runtime, entry: &OutboxEntry) -> Attempt {
    let config = &runtime.config;
    let to = &config.alerts.admin_addresses;
    if to.is_empty() {
        return Attempt::Unconfigured("alerts.admin_addresses is now empty".to_string());
    }
    let payload: serde_json::Value = match serde_json::from_str(&entry.body) {
        Ok(payload) => payload,
        Err(error) => {
            return Attempt::Unconfigured(format!("the stored alert does not decode: {error}"));
        }
    };
    let from = config
        .alerts
        .from
        .clone()
        .unwrap_or_else(|| format!("sendguard@{}", config.smtp.hostname));
    let addresses = mail::MailAddresses {
        from: &from,
        to,
        hostname: &config.smtp.hostname,
    };
    let message = mail::render(&payload, &addresses, time::OffsetDateTime::now_utc());
    let (target, relay_name) = match &runtime.actions.alert_relay {
        Some(relay) => (relay, "alert relay"),
        None => (&runtime.upstream, "upstream"),
    };
    let send = mail::send(target, relay_name, &from, to, &message);
    // The relay's own timeouts apply per step; this bounds the whole.
    let limit = config.actions.timeout.saturating_mul(4);
    match tokio::time::timeout(limit, send).await {
        Ok(Ok(reply)) => Attempt::Delivered(reply),
        Ok(Err(error)) if error.permanent => Attempt::Refused(error.message),
        Ok(Err(error)) => Attempt::Failed(error.message),
        Err(_) => Attempt::Failed(format!(
            "sending the alert e-mail timed out after {}",
            humantime::format_duration(limit)
        )),
    }
}

async fn record(
    guard: &Guard,
    runtime: &Runtime,
    pending: PendingDelivery,
    outcome: Attempt,
) -> Result<(), StoreError> {
    let now = Timestamp::now();
    let entry = &pending.entry;
    // An unconfigured receiver got no request, so it is no attempt.
    let attempt = match outcome {
        Attempt::Unconfigured(_) => pending.attempts,
        _ => pending.attempts + 1,
    };
    let actions = &runtime.config.actions;
    let deadline = entry.created.saturating_add(actions.give_up_after);
    let (kind, detail, next) = match outcome {
        Attempt::Delivered(detail) => (EventKind::ActionDelivered, detail, None),
        Attempt::Unconfigured(reason) => (EventKind::ActionAbandoned, reason, None),
        Attempt::Refused(error) => (
            EventKind::ActionAbandoned,
            format!("refused for good, so not retried: {error}"),
            None,
        ),
        Attempt::Failed(error) if now >= deadline => {
            let age = Duration::from_secs(now.since(entry.created).as_secs());
            let reason = format!(
                "given up after {attempt} attempts over {}; last error: {error}",
                humantime::format_duration(age)
            );
            (EventKind::ActionAbandoned, reason, None)
        }
        Attempt::Failed(error) => {
            // The last retry happens at the deadline, never after it.
            let delay = retry_delay(attempt, actions.retry_initial, actions.retry_max);
            let next = now.saturating_add(delay).min(deadline);
            (EventKind::ActionFailed, error, Some(next))
        }
    };

    let outcome = match (kind, next) {
        (EventKind::ActionDelivered, _) => "delivered",
        (_, Some(_)) => "failed",
        (_, None) => "abandoned",
    };
    guard.metrics.delivery_attempt(entry.kind.as_str(), outcome);
    let mailbox = entry.mailbox.as_deref().unwrap_or("-");
    match (kind, next) {
        (EventKind::ActionDelivered, _) => tracing::info!(delivery_id = %entry.delivery_id,
            action = %entry.kind, mailbox, attempt, detail, "action delivered"),
        (_, Some(next)) => tracing::warn!(delivery_id = %entry.delivery_id, action = %entry.kind,
            mailbox, attempt, error = detail, next_attempt = %next.to_rfc3339(),
            "action delivery failed; will retry"),
        (_, None) => tracing::error!(delivery_id = %entry.delivery_id, action = %entry.kind,
            mailbox, attempt, reason = detail, "action given up"),
    }

    let event = Event::action(kind, now, entry, attempt, &detail, next);
    let store = guard.store();
    match next {
        None => store.finish_delivery(&pending, event).await,
        Some(next) => {
            store
                .retry_delivery(&pending, attempt, next, detail, event)
                .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_to_cap() {
        let initial = Duration::from_secs(30);
        let max = Duration::from_secs(3600);
        let delays: Vec<u64> = (1..=9)
            .map(|failures| retry_delay(failures, initial, max).as_secs())
            .collect();
        assert_eq!(delays, [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]);
    }

    #[test]
    fn retry_delay_survives_huge_counts() {
        let delay = retry_delay(u32::MAX, Duration::from_secs(30), Duration::from_secs(60));
        assert_eq!(delay, Duration::from_secs(60));
    }
}
