//! The events report: every bad message, refusal, lockout and policy load,
//! each with the raw facts behind it so the history can be replayed.

use crate::actions::OutboxEntry;
use crate::identity::MailboxKey;
use crate::policy::{Lockout, Strike, Timestamp};
use crate::scan::Verdict;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::fmt;
use std::io::Write;

/// The kinds of event in the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A message classified as virus or spam, counted or not.
    BadMessage,
    /// MAIL FROM refused because of a lockout, aggregated per mailbox and
    /// minute.
    SenderRefused,
    /// A timed lockout started.
    LockoutStarted,
    /// A timed lockout reached its end.
    LockoutEnded,
    /// A mailbox was blocked permanently.
    BlockedPermanently,
    /// The configuration was loaded, at start or on reload.
    ConfigLoaded,
    /// A webhook or alert e-mail was accepted by its receiver.
    ActionDelivered,
    /// An attempt to deliver a webhook or alert e-mail failed; another
    /// follows.
    ActionFailed,
    /// A webhook or alert e-mail was given up: too old, or its receiver is
    /// no longer configured.
    ActionAbandoned,
    /// A permanent block was lifted with the support credential.
    BlockLifted,
    /// A mailbox's lockout count was set back to zero with the support
    /// credential.
    LockoutCountReset,
    /// `forgive_after` set a mailbox's lockout count back to zero.
    LockoutsForgiven,
    /// An exemption was added.
    ExemptionAdded,
    /// An exemption was removed before its end.
    ExemptionRemoved,
    /// An exemption reached its end.
    ExemptionExpired,
    /// A device's health state changed (green, yellow, red, offline,
    /// missing).
    DeviceStateChanged,
    /// A device refused an access request, or was kept from an unsafe
    /// destination; logged on that device.
    AccessRefused,
    /// The relay refused an SMTP client whose address belongs to an unsafe
    /// device.
    RelayRefused,
    /// A device was excluded from access decisions through the API.
    DeviceExclusionAdded,
    /// A device exclusion made through the API was removed.
    DeviceExclusionRemoved,
    /// The exclusion that the configuration file gives a device, by listing
    /// or by role, was lifted through the API.
    DeviceExclusionLifted,
    /// A lift was removed through the API, so the configuration file's
    /// exclusion is in force again.
    DeviceExclusionRestored,
    /// A device setting was overridden or reset through the API.
    DeviceSettingChanged,
    /// A setting other than a device's (`synchronized_security.enabled`)
    /// was overridden or reset through the API or the dashboard.
    SettingChanged,
    /// A device's agent reported the result of an on-demand scan.
    EndpointScanResult,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::BadMessage => "bad_message",
            EventKind::SenderRefused => "sender_refused",
            EventKind::LockoutStarted => "lockout_started",
            EventKind::LockoutEnded => "lockout_ended",
            EventKind::BlockedPermanently => "blocked_permanently",
            EventKind::ConfigLoaded => "config_loaded",
            EventKind::ActionDelivered => "action_delivered",
            EventKind::ActionFailed => "action_failed",
            EventKind::ActionAbandoned => "action_abandoned",
            EventKind::BlockLifted => "block_lifted",
            EventKind::LockoutCountReset => "lockout_count_reset",
            EventKind::LockoutsForgiven => "lockouts_forgiven",
            EventKind::ExemptionAdded => "exemption_added",
            EventKind::ExemptionRemoved => "exemption_removed",
            EventKind::ExemptionExpired => "exemption_expired",
            EventKind::DeviceStateChanged => "device_state_changed",
            EventKind::AccessRefused => "access_refused",
            EventKind::RelayRefused => "relay_refused",
            EventKind::DeviceExclusionAdded => "device_exclusion_added",
            EventKind::DeviceExclusionRemoved => "device_exclusion_removed",
            EventKind::DeviceExclusionLifted => "device_exclusion_lifted",
            EventKind::DeviceExclusionRestored => "device_exclusion_restored",
            EventKind::DeviceSettingChanged => "device_setting_changed",
            EventKind::SettingChanged => "setting_changed",
            EventKind::EndpointScanResult => "endpoint_scan_result",
        }
    }

    /// Every kind, in the order of this list.
    pub const ALL: [EventKind; 25] = [
        EventKind::BadMessage,
        EventKind::SenderRefused,
        EventKind::LockoutStarted,
        EventKind::LockoutEnded,
        EventKind::BlockedPermanently,
        EventKind::ConfigLoaded,
        EventKind::ActionDelivered,
        EventKind::ActionFailed,
        EventKind::ActionAbandoned,
        EventKind::BlockLifted,
        EventKind::LockoutCountReset,
        EventKind::LockoutsForgiven,
        EventKind::ExemptionAdded,
        EventKind::ExemptionRemoved,
        EventKind::ExemptionExpired,
        EventKind::DeviceStateChanged,
        EventKind::AccessRefused,
        EventKind::RelayRefused,
        EventKind::DeviceExclusionAdded,
        EventKind::DeviceExclusionRemoved,
        EventKind::DeviceExclusionLifted,
        EventKind::DeviceExclusionRestored,
        EventKind::DeviceSettingChanged,
        EventKind::SettingChanged,
        EventKind::EndpointScanResult,
    ];

    pub fn parse(text: &str) -> Option<EventKind> {
        EventKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of the events report.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Row id in the store, once stored; increases with every event.
    pub id: Option<i64>,
    pub time: Timestamp,
    pub kind: EventKind,
    /// Canonical mailbox, when the event concerns one.
    pub mailbox: Option<String>,
    /// Client address of the mailbox key under `client-and-sender`.
    pub key_client: Option<String>,
    /// The facts specific to the kind, as a JSON object.
    pub details: Map<String, Value>,
}

/// The facts of one SMTP transaction that events record.
#[derive(Debug, Clone, Serialize)]
pub struct MessageFacts {
    /// Envelope sender path as the client wrote it, such as `<a@b.example>`.
    pub sender: String,
    pub login: Option<String>,
    pub client: String,
    /// sendguard's own transaction id.
    pub transaction: String,
    pub recipients: usize,
}

impl Event {
    fn new(time: Timestamp, kind: EventKind, key: Option<&MailboxKey>) -> Event {
        Event {
            id: None,
            time,
            kind,
            mailbox: key.map(|key| key.mailbox.clone()),
            key_client: key
                .and_then(|key| key.client)
                .map(|client| client.to_string()),
            details: Map::new(),
        }
    }

    fn with(mut self, name: &str, value: impl Serialize) -> Event {
        let value = serde_json::to_value(value).unwrap_or(Value::Null);
        if !value.is_null() {
            self.details.insert(name.to_string(), value);
        }
        self
    }

    fn with_facts(mut self, facts: &MessageFacts) -> Event {
        if let Ok(Value::Object(map)) = serde_json::to_value(facts) {
            for (name, value) in map {
                if !value.is_null() {
                    self.details.insert(name, value);
                }
            }
        }
        self
    }

    /// Builds a `bad_message` event; `counted` tells whether it added a
    /// strike, and `note` gives the reason when it did not.
    pub fn bad_message(
        time: Timestamp,
        key: Option<&MailboxKey>,
        facts: &MessageFacts,
        verdict: &Verdict,
        counted: bool,
        note: Option<&str>,
        monitor: bool,
    ) -> Event {
        Event::new(time, EventKind::BadMessage, key)
            .with_facts(facts)
            .with("verdict", verdict.summary())
            .with("verdict_kind", verdict.kind())
            .with("counted", counted)
            .with("note", note)
            .with("monitor", monitor.then_some(true))
    }

    /// Builds a `sender_refused` event; the store aggregates these per mailbox
    /// and minute.
    pub fn sender_refused(
        time: Timestamp,
        key: &MailboxKey,
        facts: &MessageFacts,
        lockout: &Lockout,
    ) -> Event {
        Event::new(time, EventKind::SenderRefused, Some(key))
            .with("sender", &facts.sender)
            .with("login", &facts.login)
            .with("client", &facts.client)
            .with("level", lockout.level)
            .with("until", lockout.until.map(Timestamp::to_rfc3339))
            .with("count", 1)
    }

    /// Builds the event that starts a lockout, timed or permanent.
    pub fn lockout_started(
        key: &MailboxKey,
        facts: &MessageFacts,
        lockout: &Lockout,
        strikes: &[Strike],
    ) -> Event {
        let kind = if lockout.is_permanent() {
            EventKind::BlockedPermanently
        } else {
            EventKind::LockoutStarted
        };
        let strikes: Vec<Value> = strikes
            .iter()
            .map(|strike| {
                json!({
                    "time": strike.at.to_rfc3339(),
                    "verdict": strike.verdict,
                    "transaction": strike.message_id,
                    "message_id": strike.header_message_id,
                })
            })
            .collect();
        // `until` has second precision; `until_ms` keeps the exact end so
        // a replay of the history can add up lockout time exactly.
        Event::new(lockout.started, kind, Some(key))
            .with_facts(facts)
            .with("level", lockout.level)
            .with("until", lockout.until.map(Timestamp::to_rfc3339))
            .with("until_ms", lockout.until.map(Timestamp::millis))
            .with("monitor", (!lockout.enforced).then_some(true))
            .with("strikes", strikes)
    }

    /// Builds the `lockout_ended` event, timed at the lockout's end.
    pub fn lockout_ended(key: &MailboxKey, lockout: &Lockout) -> Event {
        let until = lockout.until.unwrap_or(lockout.started);
        Event::new(until, EventKind::LockoutEnded, Some(key))
            .with("level", lockout.level)
            .with("started", lockout.started.to_rfc3339())
            .with("monitor", (!lockout.enforced).then_some(true))
    }

    /// Builds a `config_loaded` event with the policy in force and its digest.
    pub fn config_loaded(time: Timestamp, digest: &str, policy: Value, reason: &str) -> Event {
        Event::new(time, EventKind::ConfigLoaded, None)
            .with("digest", digest)
            .with("policy", policy)
            .with("reason", reason)
    }

    /// Builds the event of one delivery attempt of a webhook or alert
    /// e-mail; `detail` is the receiver's answer or the error.
    pub fn action(
        kind: EventKind,
        time: Timestamp,
        entry: &OutboxEntry,
        attempt: u32,
        detail: &str,
        next_attempt: Option<Timestamp>,
    ) -> Event {
        let mut event = Event::new(time, kind, None)
            .with("action", entry.kind.as_str())
            .with("delivery_id", &entry.delivery_id)
            .with("attempt", attempt)
            .with("detail", detail)
            .with("next_attempt", next_attempt.map(Timestamp::to_rfc3339))
            .with("created", entry.created.to_rfc3339());
        event.mailbox = entry.mailbox.clone();
        event.key_client = entry.key_client.clone();
        event
    }

    /// Builds the event of a support lift of a permanent block or reset of
    /// a lockout count.
    pub fn lifted(
        time: Timestamp,
        key: &MailboxKey,
        lifted: &crate::policy::Lifted,
        reason: &str,
        via: &str,
    ) -> Event {
        let kind = if lifted.block.is_some() {
            EventKind::BlockLifted
        } else {
            EventKind::LockoutCountReset
        };
        Event::new(time, kind, Some(key))
            .with("level", lifted.block.as_ref().map(|block| block.level))
            .with(
                "blocked_since",
                lifted
                    .block
                    .as_ref()
                    .map(|block| block.started.to_rfc3339()),
            )
            .with("lockouts_before", lifted.lockouts_before)
            .with("lockouts_after", lifted.lockouts_after)
            .with(
                "count_reset",
                lifted.lockouts_after != lifted.lockouts_before,
            )
            .with("reason", reason)
            .with("by", "support")
            .with("via", via)
    }

    /// Builds the event of a lockout count forgiven by `forgive_after`,
    /// timed when the quiet period ended.
    pub fn forgiven(
        key: &MailboxKey,
        forgiven: &crate::policy::Forgiven,
        forgive_after: std::time::Duration,
    ) -> Event {
        let time = forgiven.last_end.saturating_add(forgive_after);
        Event::new(time, EventKind::LockoutsForgiven, Some(key))
            .with("lockouts_before", forgiven.lockouts)
            .with("last_lockout_end", forgiven.last_end.to_rfc3339())
            .with(
                "forgive_after",
                humantime::format_duration(forgive_after).to_string(),
            )
    }

    /// Builds the event of an exemption added, removed or expired.
    pub fn exemption(
        time: Timestamp,
        kind: EventKind,
        exemption: &crate::policy::Exemption,
        by: Option<&str>,
    ) -> Event {
        let (match_kind, value) = match &exemption.kind {
            crate::policy::ExemptionKind::Sender(mailbox) => ("sender", mailbox.clone()),
            crate::policy::ExemptionKind::Login(login) => ("login", login.clone()),
            crate::policy::ExemptionKind::Network(network) => ("network", network.to_string()),
        };
        let mut event = Event::new(time, kind, None)
            .with("exemption_id", exemption.id)
            .with("match", match_kind)
            .with("value", &value)
            .with("reason", &exemption.reason)
            .with("author", &exemption.author)
            .with("expires", exemption.expires.to_rfc3339())
            // `expires` has second precision; a replay needs the exact end.
            .with("expires_ms", exemption.expires.millis())
            .with("by", by);
        if match_kind == "sender" {
            event.mailbox = Some(value);
        }
        event
    }

    /// Builds an event about the device `device`, which the events API's
    /// `device=` filter finds, with `details` after the device id.
    pub fn for_device(
        time: Timestamp,
        kind: EventKind,
        device: Option<&str>,
        details: Map<String, Value>,
    ) -> Event {
        let mut event = Event::new(time, kind, None).with("device", device);
        event.details.extend(details);
        event
    }

    /// Returns the event as one JSON object with `time` (RFC 3339 UTC),
    /// `type` and `mailbox` first.
    pub fn to_json(&self) -> Value {
        let mut object = Map::new();
        object.insert("time".into(), Value::String(self.time.to_rfc3339()));
        object.insert("type".into(), Value::String(self.kind.as_str().into()));
        object.insert(
            "mailbox".into(),
            self.mailbox
                .clone()
                .map(Value::String)
                .unwrap_or(Value::Null),
        );
        if let Some(client) = &self.key_client {
            object.insert("key_client".into(), Value::String(client.clone()));
        }
        if let Some(id) = self.id {
            object.insert("id".into(), Value::from(id));
        }
        for (name, value) in &self.details {
            object.insert(name.clone(), value.clone());
        }
        Value::Object(object)
    }

    fn detail_text(&self, name: &str) -> String {
        match self.details.get(name) {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(text)) => text.clone(),
            Some(other) => other.to_string(),
        }
    }

    /// Returns a one-line summary of the details for the table format.
    fn summary(&self) -> String {
        match self.kind {
            EventKind::BadMessage => format!(
                "{} from {} ({}{})",
                self.detail_text("verdict"),
                self.detail_text("client"),
                if self.details.get("counted") == Some(&Value::Bool(true)) {
                    "counted"
                } else {
                    "not counted"
                },
                match self.detail_text("note") {
                    note if note.is_empty() => String::new(),
                    note => format!(": {note}"),
                }
            ),
            EventKind::SenderRefused => format!(
                "{} refusal(s), lockout {}",
                self.detail_text("count"),
                self.detail_text("level")
            ),
            EventKind::LockoutStarted => format!(
                "lockout {} until {}",
                self.detail_text("level"),
                self.detail_text("until")
            ),
            EventKind::LockoutEnded => format!("lockout {} ended", self.detail_text("level")),
            EventKind::BlockedPermanently => {
                format!(
                    "blocked permanently at lockout {}",
                    self.detail_text("level")
                )
            }
            EventKind::ConfigLoaded => format!(
                "{} (policy digest {})",
                self.detail_text("reason"),
                self.detail_text("digest")
            ),
            EventKind::ActionDelivered | EventKind::ActionFailed | EventKind::ActionAbandoned => {
                let next = match self.detail_text("next_attempt") {
                    next if next.is_empty() => String::new(),
                    next => format!("; next attempt {next}"),
                };
                format!(
                    "{} {} attempt {}: {}{next}",
                    self.detail_text("action"),
                    self.detail_text("delivery_id"),
                    self.detail_text("attempt"),
                    self.detail_text("detail")
                )
            }
            EventKind::BlockLifted => format!(
                "permanent block lifted by support, lockout count {} -> {}: {}",
                self.detail_text("lockouts_before"),
                self.detail_text("lockouts_after"),
                self.detail_text("reason")
            ),
            EventKind::LockoutCountReset => format!(
                "lockout count {} -> {} by support: {}",
                self.detail_text("lockouts_before"),
                self.detail_text("lockouts_after"),
                self.detail_text("reason")
            ),
            EventKind::LockoutsForgiven => format!(
                "lockout count {} forgiven, no lockout for {}",
                self.detail_text("lockouts_before"),
                self.detail_text("forgive_after")
            ),
            EventKind::ExemptionAdded
            | EventKind::ExemptionRemoved
            | EventKind::ExemptionExpired => {
                format!(
                    "exemption {} ({} {}) until {}: {}",
                    self.detail_text("exemption_id"),
                    self.detail_text("match"),
                    self.detail_text("value"),
                    self.detail_text("expires"),
                    self.detail_text("reason")
                )
            }
            EventKind::DeviceStateChanged => format!(
                "{} {}: {} -> {}",
                self.detail_text("device"),
                self.detail_text("name"),
                self.detail_text("from"),
                self.detail_text("to")
            ),
            EventKind::AccessRefused | EventKind::RelayRefused => format!(
                "{}: {}",
                self.detail_text("device"),
                self.detail_text("text")
            ),
            EventKind::DeviceSettingChanged | EventKind::SettingChanged => {
                // A null value is a reset to the configuration file's value.
                let value = match self.details.get("value") {
                    None | Some(Value::Null) => "the configuration file's value".to_string(),
                    Some(_) => self.detail_text("value"),
                };
                format!(
                    "{} = {value} by {}: {}",
                    self.detail_text("setting"),
                    self.detail_text("by"),
                    self.detail_text("reason")
                )
            }
            EventKind::EndpointScanResult => format!(
                "{}: {} ({} found)",
                self.detail_text("device"),
                self.detail_text("result"),
                self.detail_text("found")
            ),
            EventKind::DeviceExclusionAdded
            | EventKind::DeviceExclusionRemoved
            | EventKind::DeviceExclusionLifted
            | EventKind::DeviceExclusionRestored => format!(
                "{} by {}: {}",
                self.detail_text("device"),
                self.detail_text("by"),
                self.detail_text("reason")
            ),
        }
    }
}

/// Output formats of `sendguard events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

const CSV_COLUMNS: [&str; 11] = [
    "time",
    "type",
    "mailbox",
    "key_client",
    "client",
    "sender",
    "login",
    "verdict",
    "level",
    "until",
    "transaction",
];

/// Writes events in the chosen format.
///
/// # Errors
/// When writing to `out` fails.
pub fn write_events(out: &mut impl Write, events: &[Event], format: Format) -> std::io::Result<()> {
    match format {
        Format::Json => {
            for event in events {
                writeln!(out, "{}", event.to_json())?;
            }
        }
        Format::Csv => {
            writeln!(out, "{},queue_id,id,details", CSV_COLUMNS.join(","))?;
            for event in events {
                let mut fields: Vec<String> = vec![
                    event.time.to_rfc3339(),
                    event.kind.as_str().to_string(),
                    event.mailbox.clone().unwrap_or_default(),
                    event.key_client.clone().unwrap_or_default(),
                ];
                for name in &CSV_COLUMNS[4..] {
                    fields.push(event.detail_text(name));
                }
                fields.push(event.detail_text("queue_id"));
                fields.push(event.id.map(|id| id.to_string()).unwrap_or_default());
                fields.push(Value::Object(event.details.clone()).to_string());
                let line: Vec<String> = fields.iter().map(|field| csv_field(field)).collect();
                writeln!(out, "{}", line.join(","))?;
            }
        }
        Format::Table => {
            // The TYPE column is as wide as the longest event type.
            let type_width = EventKind::ALL
                .iter()
                .map(|kind| kind.as_str().len())
                .max()
                .unwrap_or(0);
            writeln!(
                out,
                "{:<20}  {:<type_width$}  {:<32}  DETAILS",
                "TIME", "TYPE", "MAILBOX"
            )?;
            for event in events {
                let mailbox = match (&event.mailbox, &event.key_client) {
                    (Some(mailbox), Some(client)) => format!("{mailbox} from {client}"),
                    (Some(mailbox), None) => mailbox.clone(),
                    (None, _) => "-".to_string(),
                };
                // Free text (reasons, senders) must not start a line of its
                // own in the table.
                let summary: String = event
                    .summary()
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                writeln!(
                    out,
                    "{:<20}  {:<type_width$}  {:<32}  {summary}",
                    event.time.to_rfc3339(),
                    event.kind.as_str(),
                    mailbox,
                )?;
            }
        }
    }
    Ok(())
}

/// Quotes a CSV field when it contains a separator, quote or line break,
/// and defuses leading characters that spreadsheets run as formulas.
pub(crate) fn csv_field(field: &str) -> String {
    let defused = if field.starts_with(['=', '+', '-', '@']) {
        format!("'{field}")
    } else {
        field.to_string()
    };
    if defused.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", defused.replace('"', "\"\""))
    } else {
        defused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_and_defuses() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
    }

    #[test]
    fn json_has_time_type_mailbox() {
        let key = MailboxKey::mailbox("alice@example.org");
        let lockout = Lockout {
            level: 1,
            started: Timestamp::from_secs(1_796_418_420),
            until: Some(Timestamp::from_secs(1_796_422_020)),
            enforced: true,
            end_recorded: false,
        };
        let value = Event::lockout_ended(&key, &lockout).to_json();
        assert_eq!(value["time"], "2026-12-04T22:07:00Z");
        assert_eq!(value["type"], "lockout_ended");
        assert_eq!(value["mailbox"], "alice@example.org");
        assert_eq!(value["level"], 1);
    }
}
