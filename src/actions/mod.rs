//! What happens beyond the block when a lockout starts or ends: the
//! endpoint-scan request for the owner's devices, the administrator's alert
//! (webhook and e-mail), and the durable outbox that delivers them.
//!
//! Deliveries are planned here as JSON payloads and written to the store's
//! outbox in the same transaction as the lockout, so a restart or a crash
//! can delay them but never lose them. The outbox worker sends each one
//! until the receiver accepts it or it is older than
//! `actions.give_up_after`; every attempt is an event. Delivery is at least
//! once, so receivers drop repeats by their delivery id.

mod mail;
mod outbox;
mod payload;
mod webhook;

pub use outbox::{ActionClients, retry_delay, run_outbox};
pub use payload::{LockoutFacts, plan_lockout_ended, plan_lockout_started, scan_requested};
pub use webhook::{redact_url, signature};

use crate::config::Config;
use crate::policy::Timestamp;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Returns whether synchronized security is on, which decides whether a
/// lockout requests an endpoint scan: the value stored through the API or
/// the dashboard when there is one (`stored`), else the file's
/// `synchronized_security.enabled`. Every decision to request or send an
/// endpoint scan goes through this function.
pub fn synchronized_security_enabled(config: &Config, stored: Option<bool>) -> bool {
    stored.unwrap_or(config.synchronized_security.enabled)
}

/// The kinds of delivery the outbox makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// The `endpoint_scan` webhook to the endpoint-protection system.
    EndpointScan,
    /// The `admin_alert` webhook.
    AdminAlert,
    /// The alert e-mail to `alerts.admin_addresses`.
    AlertMail,
    /// The `subnet_notice` webhook: a device on a subnet became unsafe or
    /// safe again.
    SubnetNotice,
}

impl ActionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::EndpointScan => "endpoint_scan",
            ActionKind::AdminAlert => "admin_alert",
            ActionKind::AlertMail => "alert_mail",
            ActionKind::SubnetNotice => "subnet_notice",
        }
    }

    pub fn parse(text: &str) -> Option<ActionKind> {
        [
            ActionKind::EndpointScan,
            ActionKind::AdminAlert,
            ActionKind::AlertMail,
            ActionKind::SubnetNotice,
        ]
        .into_iter()
        .find(|kind| kind.as_str() == text)
    }
}

impl fmt::Display for ActionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One webhook or e-mail waiting in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEntry {
    /// Identifier that stays the same across retries, so the receiver can
    /// drop repeats.
    pub delivery_id: String,
    pub kind: ActionKind,
    /// Canonical mailbox the delivery is about.
    pub mailbox: Option<String>,
    /// Client address of the mailbox key under `client-and-sender`.
    pub key_client: Option<String>,
    /// The JSON payload, sent byte for byte on every attempt (webhooks) or
    /// rendered into the alert e-mail.
    pub body: String,
    pub created: Timestamp,
}

/// An outbox entry as read back for an attempt.
#[derive(Debug, Clone)]
pub struct PendingDelivery {
    /// Row id in the store.
    pub row: i64,
    pub entry: OutboxEntry,
    /// Attempts made so far.
    pub attempts: u32,
}

/// Returns a new random delivery id of 32 hexadecimal digits.
pub fn new_delivery_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}
