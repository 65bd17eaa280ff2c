//! Plans the deliveries for a lockout: which webhooks and e-mails go out,
//! with the payload each one carries. Pure: the caller passes the
//! configuration, the directory and the time in.

use super::{ActionKind, OutboxEntry, new_delivery_id};
use crate::config::Config;
use crate::directory::{Directory, MailboxEntry};
use crate::events::MessageFacts;
use crate::identity::MailboxKey;
use crate::policy::{Lockout, Strike, Timestamp};
use serde_json::{Map, Value, json};

/// The facts of a lockout at its start.
pub struct LockoutFacts<'a> {
    pub key: &'a MailboxKey,
    pub lockout: &'a Lockout,
    /// The strikes that triggered it, oldest first.
    pub strikes: &'a [Strike],
    /// The message whose strike started the lockout.
    pub message: &'a MessageFacts,
    /// `synchronized_security.enabled` as stored through the API or the
    /// dashboard, which overrides the file's value; `None` when not set.
    pub synchronized_security: Option<bool>,
}

/// Returns whether a lockout requests an on-demand scan of the owner's
/// devices. It does when synchronized security is on and the lockout is
/// enforced, never in monitor mode. `stored` is the value set through the
/// API, which overrides the file's. The scan goes to the `endpoint_scan` webhook when one is
/// configured and to the agents of the owner's devices in every case.
pub fn scan_requested(config: &Config, stored: Option<bool>, lockout: &Lockout) -> bool {
    super::synchronized_security_enabled(config, stored) && lockout.enforced
}

/// Plans the deliveries for a lockout that just started, timed or
/// permanent: the endpoint scan (when synchronized security is on and the
/// lockout is enforced), the alert webhook and the alert e-mail.
pub fn plan_lockout_started(
    config: &Config,
    directory: &Directory,
    facts: &LockoutFacts<'_>,
) -> Vec<OutboxEntry> {
    let lockout = facts.lockout;
    let entry = directory.entry(&facts.key.mailbox);
    let scan_requested = scan_requested(config, facts.synchronized_security, lockout);
    let event = if lockout.is_permanent() {
        "blocked_permanently"
    } else {
        "lockout_started"
    };
    let strikes: Vec<Value> = facts.strikes.iter().map(strike_json).collect();
    let reason = format!(
        "{} bad messages within {}",
        facts.strikes.len(),
        humantime::format_duration(config.policy.window)
    );
    let mut planned = Vec::new();

    if scan_requested && config.synchronized_security.endpoint_scan_url.is_some() {
        let delivery_id = new_delivery_id();
        let mut body = common_fields(
            ActionKind::EndpointScan,
            &delivery_id,
            config,
            facts.key,
            entry,
            lockout,
        );
        body.insert("time".into(), lockout.started.to_rfc3339().into());
        body.insert("reason".into(), reason.clone().into());
        body.insert("strikes".into(), strikes.clone().into());
        planned.push(entry_for(
            ActionKind::EndpointScan,
            delivery_id,
            facts.key,
            body,
            lockout.started,
        ));
    }

    let alert = |delivery_id: &str| {
        let mut body = common_fields(
            ActionKind::AdminAlert,
            delivery_id,
            config,
            facts.key,
            entry,
            lockout,
        );
        let extra = json!({
            "event": event,
            "monitor": !lockout.enforced,
            "time": lockout.started.to_rfc3339(),
            "reason": reason,
            "strikes": strikes,
            "last_message": {
                "sender": facts.message.sender,
                "login": facts.message.login,
                "client": facts.message.client,
                "transaction": facts.message.transaction,
            },
            "endpoint_scan_requested": scan_requested,
            "summary": summary(facts.key, lockout, config, &reason, entry.is_some()),
        });
        if let Value::Object(extra) = extra {
            body.extend(extra);
        }
        body
    };
    if config.alerts.webhook_url.is_some() {
        let delivery_id = new_delivery_id();
        let body = alert(&delivery_id);
        planned.push(entry_for(
            ActionKind::AdminAlert,
            delivery_id,
            facts.key,
            body,
            lockout.started,
        ));
    }
    if !config.alerts.admin_addresses.is_empty() {
        let delivery_id = new_delivery_id();
        let body = alert(&delivery_id);
        planned.push(entry_for(
            ActionKind::AlertMail,
            delivery_id,
            facts.key,
            body,
            lockout.started,
        ));
    }
    planned
}

/// Plans the alert webhook for a timed lockout that reached its end. Ends
/// are not sent by e-mail.
pub fn plan_lockout_ended(
    config: &Config,
    directory: &Directory,
    key: &MailboxKey,
    lockout: &Lockout,
) -> Vec<OutboxEntry> {
    if config.alerts.webhook_url.is_none() {
        return Vec::new();
    }
    let entry = directory.entry(&key.mailbox);
    let ended = lockout.until.unwrap_or(lockout.started);
    let next = config.policy.settings().lockout_length(lockout.level + 1);
    let next_text = if lockout.level >= config.policy.timed_lockouts {
        "the next trigger blocks the mailbox permanently".to_string()
    } else {
        format!(
            "the next lockout would last {}",
            humantime::format_duration(next)
        )
    };
    let delivery_id = new_delivery_id();
    let mut body = common_fields(
        ActionKind::AdminAlert,
        &delivery_id,
        config,
        key,
        entry,
        lockout,
    );
    body.insert("event".into(), "lockout_ended".into());
    body.insert("monitor".into(), (!lockout.enforced).into());
    body.insert("time".into(), ended.to_rfc3339().into());
    let summary = format!(
        "{key} may send again: lockout {} ended at {}; {next_text}",
        lockout.level,
        ended.to_rfc3339()
    );
    body.insert("summary".into(), summary.into());
    vec![entry_for(
        ActionKind::AdminAlert,
        delivery_id,
        key,
        body,
        ended,
    )]
}

/// Returns the fields every payload starts with: its type and delivery id,
/// the mailbox with its owner and devices, and the lockout.
fn common_fields(
    kind: ActionKind,
    delivery_id: &str,
    config: &Config,
    key: &MailboxKey,
    entry: Option<&MailboxEntry>,
    lockout: &Lockout,
) -> Map<String, Value> {
    let mut fields = Map::new();
    fields.insert("type".into(), kind.as_str().into());
    fields.insert("delivery_id".into(), delivery_id.into());
    fields.insert("mailbox".into(), key.mailbox.clone().into());
    let client = key.client.map(|client| client.to_string());
    fields.insert("key_client".into(), client.into());
    fields.insert("owner".into(), owner_json(entry));
    fields.insert("devices".into(), devices_json(entry));
    fields.insert("lockout".into(), lockout_json(config, lockout));
    fields
}

fn entry_for(
    kind: ActionKind,
    delivery_id: String,
    key: &MailboxKey,
    body: Map<String, Value>,
    created: Timestamp,
) -> OutboxEntry {
    OutboxEntry {
        delivery_id,
        kind,
        mailbox: Some(key.mailbox.clone()),
        key_client: key.client.map(|client| client.to_string()),
        body: Value::Object(body).to_string(),
        created,
    }
}

fn owner_json(entry: Option<&MailboxEntry>) -> Value {
    match entry.and_then(|entry| entry.owner.as_ref()) {
        Some(owner) => json!({ "id": owner.id, "name": owner.name }),
        None => Value::Null,
    }
}

fn devices_json(entry: Option<&MailboxEntry>) -> Value {
    let devices = entry.map(|entry| entry.devices.as_slice()).unwrap_or(&[]);
    devices
        .iter()
        .map(|device| json!({ "id": device.id, "name": device.name }))
        .collect()
}

fn lockout_json(config: &Config, lockout: &Lockout) -> Value {
    let length = lockout
        .until
        .map(|until| humantime::format_duration(until.since(lockout.started)).to_string());
    json!({
        "number": lockout.level,
        "started": lockout.started.to_rfc3339(),
        "until": lockout.until.map(Timestamp::to_rfc3339),
        "permanent": lockout.is_permanent(),
        "length": length,
        "timed_lockouts": config.policy.timed_lockouts,
    })
}

fn strike_json(strike: &Strike) -> Value {
    json!({
        "time": strike.at.to_rfc3339(),
        "verdict": strike.verdict,
        "transaction": strike.message_id,
        "message_id": strike.header_message_id,
    })
}

fn summary(
    key: &MailboxKey,
    lockout: &Lockout,
    config: &Config,
    reason: &str,
    owner_known: bool,
) -> String {
    let monitor = if lockout.enforced {
        ""
    } else {
        " (monitor mode: nothing is refused)"
    };
    let owner = if owner_known {
        ""
    } else {
        "; owner unknown, because the mailbox is not in the directory file"
    };
    match lockout.until {
        None if config.policy.timed_lockouts == 0 => format!(
            "{key} is blocked permanently after {reason}, at its first trigger (timed_lockouts = 0){monitor}{owner}"
        ),
        None => format!(
            "{key} is blocked permanently after {reason}, at the trigger after {} timed lockouts{monitor}{owner}",
            config.policy.timed_lockouts
        ),
        Some(until) => format!(
            "{key} is locked out until {} (lockout {} of {}) after {reason}{monitor}{owner}",
            until.to_rfc3339(),
            lockout.level,
            config.policy.timed_lockouts
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIRECTORY: &str = r#"
        [[mailbox]]
        address = "alice@example.org"
        owner = { id = "u-1001", name = "Alice Smith" }
        devices = [{ id = "dev-17", name = "ALICE-LAPTOP" }, { id = "dev-18", name = "ALICE-PHONE" }]
    "#;

    fn config(extra: &str) -> Config {
        let text = format!(
            "[upstream]\naddress = \"127.0.0.1:25\"\n[store]\npath = \"/tmp/unused.db\"\n{extra}"
        );
        Config::parse(&text).expect("valid config")
    }

    const ALL_ACTIONS: &str = r#"
        [synchronized_security]
        enabled = true
        endpoint_scan_url = "http://127.0.0.1:9/scan"
        [alerts]
        webhook_url = "http://127.0.0.1:9/alert"
        admin_addresses = ["secops@example.org"]
        [actions]
        secret_file = "/tmp/unused-secret"
    "#;

    fn strikes() -> Vec<Strike> {
        (0..5)
            .map(|index| Strike {
                at: Timestamp(1_000_000 + index * 1000),
                verdict: "virus Eicar-Test-Signature".to_string(),
                message_id: format!("sg-{index}"),
                header_message_id: Some(format!("<m{index}@example.org>")),
            })
            .collect()
    }

    fn message() -> MessageFacts {
        MessageFacts {
            sender: "<alice@example.org>".to_string(),
            login: Some("alice".to_string()),
            client: "192.0.2.7".to_string(),
            transaction: "sg-4".to_string(),
            recipients: 1,
        }
    }

    fn lockout(level: u32, until: Option<i64>, enforced: bool) -> Lockout {
        Lockout {
            level,
            started: Timestamp(1_004_000),
            until: until.map(Timestamp),
            enforced,
            end_recorded: false,
        }
    }

    fn plan(config: &Config, directory: &Directory, lockout: &Lockout) -> Vec<OutboxEntry> {
        plan_with_stored(config, directory, lockout, None)
    }

    fn plan_with_stored(
        config: &Config,
        directory: &Directory,
        lockout: &Lockout,
        synchronized_security: Option<bool>,
    ) -> Vec<OutboxEntry> {
        let key = MailboxKey::mailbox("alice@example.org");
        let strikes = strikes();
        let message = message();
        let facts = LockoutFacts {
            key: &key,
            lockout,
            strikes: &strikes,
            message: &message,
            synchronized_security,
        };
        plan_lockout_started(config, directory, &facts)
    }

    fn body(entry: &OutboxEntry) -> Value {
        serde_json::from_str(&entry.body).expect("payload is JSON")
    }

    #[test]
    fn scan_request_lists_owner_devices_strikes() {
        let config = config(ALL_ACTIONS);
        let directory = Directory::parse(DIRECTORY).expect("directory");
        let planned = plan(&config, &directory, &lockout(1, Some(4_604_000), true));
        let kinds: Vec<ActionKind> = planned.iter().map(|entry| entry.kind).collect();
        assert_eq!(
            kinds,
            [
                ActionKind::EndpointScan,
                ActionKind::AdminAlert,
                ActionKind::AlertMail
            ]
        );
        let scan = body(&planned[0]);
        assert_eq!(scan["delivery_id"], planned[0].delivery_id.as_str());
        assert_eq!(scan["owner"]["name"], "Alice Smith");
        assert_eq!(scan["devices"][1]["id"], "dev-18");
        assert_eq!(scan["lockout"]["number"], 1);
        assert_eq!(scan["lockout"]["length"], "1h");
        assert_eq!(scan["lockout"]["until"], "1970-01-01T01:16:44Z");
        assert_eq!(scan["strikes"].as_array().map(Vec::len), Some(5));
        assert_eq!(scan["strikes"][0]["transaction"], "sg-0");
        assert_eq!(scan["strikes"][0]["message_id"], "<m0@example.org>");
        assert_eq!(scan["reason"], "5 bad messages within 10m");
    }

    #[test]
    fn delivery_ids_differ() {
        let config = config(ALL_ACTIONS);
        let planned = plan(
            &config,
            &Directory::default(),
            &lockout(1, Some(4_604_000), true),
        );
        assert_ne!(planned[0].delivery_id, planned[1].delivery_id);
        assert_ne!(planned[1].delivery_id, planned[2].delivery_id);
    }

    #[test]
    fn stored_setting_overrides_file() {
        let on_in_file = config(ALL_ACTIONS);
        let off_in_file = config(&ALL_ACTIONS.replace("enabled = true", "enabled = false"));
        let directory = Directory::default();
        let lockout = lockout(1, Some(4_604_000), true);
        let scans = |planned: Vec<OutboxEntry>| {
            planned
                .iter()
                .filter(|entry| entry.kind == ActionKind::EndpointScan)
                .count()
        };
        assert_eq!(
            scans(plan_with_stored(
                &on_in_file,
                &directory,
                &lockout,
                Some(false)
            )),
            0
        );
        assert_eq!(
            scans(plan_with_stored(
                &off_in_file,
                &directory,
                &lockout,
                Some(true)
            )),
            1
        );
        assert_eq!(
            scans(plan_with_stored(&on_in_file, &directory, &lockout, None)),
            1
        );
        assert_eq!(
            scans(plan_with_stored(&off_in_file, &directory, &lockout, None)),
            0
        );
    }

    #[test]
    fn synchronized_security_off_skips_scan() {
        let text = ALL_ACTIONS.replace("enabled = true", "enabled = false");
        let config = config(&text);
        let planned = plan(
            &config,
            &Directory::default(),
            &lockout(1, Some(4_604_000), true),
        );
        let kinds: Vec<ActionKind> = planned.iter().map(|entry| entry.kind).collect();
        assert_eq!(kinds, [ActionKind::AdminAlert, ActionKind::AlertMail]);
        assert_eq!(body(&planned[0])["endpoint_scan_requested"], false);
    }

    #[test]
    fn scan_without_webhook_for_agents() {
        let text = ALL_ACTIONS.replace("endpoint_scan_url = \"http://127.0.0.1:9/scan\"", "");
        let config = config(&text);
        let enforced = lockout(1, Some(4_604_000), true);
        assert!(scan_requested(&config, None, &enforced));
        assert!(!scan_requested(&config, Some(false), &enforced));
        assert!(!scan_requested(
            &config,
            None,
            &lockout(1, Some(4_604_000), false)
        ));
        let planned = plan(&config, &Directory::default(), &enforced);
        let kinds: Vec<ActionKind> = planned.iter().map(|entry| entry.kind).collect();
        assert_eq!(kinds, [ActionKind::AdminAlert, ActionKind::AlertMail]);
        assert_eq!(body(&planned[0])["endpoint_scan_requested"], true);
    }

    #[test]
    fn monitor_lockout_alerts_without_scan() {
        let config = config(ALL_ACTIONS);
        let planned = plan(
            &config,
            &Directory::default(),
            &lockout(1, Some(4_604_000), false),
        );
        let kinds: Vec<ActionKind> = planned.iter().map(|entry| entry.kind).collect();
        assert_eq!(kinds, [ActionKind::AdminAlert, ActionKind::AlertMail]);
        let alert = body(&planned[0]);
        assert_eq!(alert["monitor"], true);
        assert!(
            alert["summary"]
                .as_str()
                .is_some_and(|text| text.contains("monitor mode"))
        );
    }

    #[test]
    fn unknown_owner_is_null() {
        let config = config(ALL_ACTIONS);
        let planned = plan(
            &config,
            &Directory::default(),
            &lockout(1, Some(4_604_000), true),
        );
        let scan = body(&planned[0]);
        assert_eq!(scan["owner"], Value::Null);
        assert_eq!(scan["devices"], json!([]));
    }

    #[test]
    fn permanent_block_is_its_own_event() {
        let config = config(ALL_ACTIONS);
        let planned = plan(&config, &Directory::default(), &lockout(7, None, true));
        assert_eq!(planned[0].kind, ActionKind::EndpointScan);
        let alert = body(&planned[1]);
        assert_eq!(alert["event"], "blocked_permanently");
        assert_eq!(alert["lockout"]["permanent"], true);
        assert_eq!(alert["lockout"]["until"], Value::Null);
    }

    #[test]
    fn nothing_planned_without_receivers() {
        let config = config("");
        let planned = plan(
            &config,
            &Directory::default(),
            &lockout(1, Some(4_604_000), true),
        );
        assert!(planned.is_empty());
    }

    #[test]
    fn end_goes_to_webhook_only() {
        let config = config(ALL_ACTIONS);
        let key = MailboxKey::mailbox("alice@example.org");
        let ended = plan_lockout_ended(
            &config,
            &Directory::default(),
            &key,
            &lockout(6, Some(4_604_000), true),
        );
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].kind, ActionKind::AdminAlert);
        assert_eq!(ended[0].created, Timestamp(4_604_000));
        let alert = body(&ended[0]);
        assert_eq!(alert["event"], "lockout_ended");
        assert!(
            alert["summary"]
                .as_str()
                .is_some_and(|text| text.contains("permanently"))
        );
    }
}
