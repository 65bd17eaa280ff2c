//! The JSON shapes of the admin API, shared with the command line.

use crate::directory::Directory;
use crate::identity::MailboxKey;
use crate::policy::{Exemption, ExemptionKind, Lockout, MailboxState, PolicySettings, Timestamp};
use crate::store::exemptions::ListedExemption;
use serde_json::{Value, json};

/// Describes a lockout.
pub fn lockout_json(lockout: &Lockout) -> Value {
    json!({
        "level": lockout.level,
        "started": lockout.started.to_rfc3339(),
        "until": lockout.until.map(Timestamp::to_rfc3339),
        "permanent": lockout.is_permanent(),
        "enforced": lockout.enforced,
    })
}

/// Describes one block in force, for `GET /api/v1/blocks`.
pub fn block_json(key: &MailboxKey, lockout: &Lockout) -> Value {
    let mut value = lockout_json(lockout);
    if let Value::Object(map) = &mut value {
        map.insert("mailbox".into(), key.mailbox.clone().into());
        map.insert(
            "key_client".into(),
            key.client.map(|client| client.to_string()).into(),
        );
    }
    value
}

/// Describes an exemption.
pub fn exemption_json(exemption: &Exemption, now: Timestamp) -> Value {
    let (kind, value) = match &exemption.kind {
        ExemptionKind::Sender(mailbox) => ("sender", mailbox.clone()),
        ExemptionKind::Login(login) => ("login", login.clone()),
        ExemptionKind::Network(network) => ("network", network.to_string()),
    };
    json!({
        "id": exemption.id,
        "match": kind,
        "value": value,
        "reason": exemption.reason,
        "author": exemption.author,
        "created": exemption.created.to_rfc3339(),
        "expires": exemption.expires.to_rfc3339(),
        "in_force": now < exemption.expires,
    })
}

/// Lists exemptions: those in force, or with `all` every one ever added,
/// each removed one with its removal.
pub fn exemption_list_json(listed: &[ListedExemption], all: bool, now: Timestamp) -> Value {
    let list: Vec<Value> = listed
        .iter()
        .filter(|listed| all || (listed.removed.is_none() && now < listed.exemption.expires))
        .map(|listed| {
            let mut value = exemption_json(&listed.exemption, now);
            if let (Value::Object(map), Some((time, by))) = (&mut value, &listed.removed) {
                map.insert("in_force".into(), false.into());
                map.insert("removed".into(), time.to_rfc3339().into());
                map.insert("removed_by".into(), by.clone().into());
            }
            value
        })
        .collect();
    json!({ "exemptions": list })
}

/// Builds the strike ledger of one mailbox key: strikes in the window,
/// lockout count, the block in force, the next lockout's length, the
/// exemptions that cover it, and its owner and devices.
pub fn ledger_json(
    key: &MailboxKey,
    state: &MailboxState,
    settings: &PolicySettings,
    exemptions: &[Exemption],
    directory: &Directory,
    now: Timestamp,
) -> Value {
    let strikes: Vec<Value> = state
        .strikes
        .iter()
        .filter(|strike| now.since(strike.at) < settings.window)
        .map(|strike| {
            json!({
                "time": strike.at.to_rfc3339(),
                "verdict": strike.verdict,
                "transaction": strike.message_id,
                "message_id": strike.header_message_id,
            })
        })
        .collect();
    let next = state.next_lockout_length(settings, now);
    let entry = directory.entry(&key.mailbox);
    let logins: Vec<String> = entry
        .map(|entry| {
            entry
                .logins
                .iter()
                .map(|login| login.to_lowercase())
                .collect()
        })
        .unwrap_or_default();
    let covering: Vec<Value> = exemptions
        .iter()
        .filter(|exemption| now < exemption.expires)
        .filter(|exemption| match &exemption.kind {
            ExemptionKind::Sender(mailbox) => *mailbox == key.mailbox,
            ExemptionKind::Login(login) => logins.contains(&login.to_lowercase()),
            ExemptionKind::Network(network) => {
                key.client.is_some_and(|client| network.contains(&client))
            }
        })
        .map(|exemption| exemption_json(exemption, now))
        .collect();
    json!({
        "mailbox": key.mailbox,
        "key_client": key.client.map(|client| client.to_string()),
        "strikes": strikes,
        "threshold": settings.threshold,
        "window": humantime::format_duration(settings.window).to_string(),
        "lockouts": state.lockouts,
        "block": state.active_block(now).map(lockout_json),
        "last_lockout": state.block.as_ref().map(lockout_json),
        "next_lockout": match next {
            Some(length) => json!({
                "level": state.effective_lockouts(settings, now).saturating_add(1),
                "length": humantime::format_duration(length).to_string(),
                "permanent": false,
            }),
            None => json!({ "permanent": true }),
        },
        "exemptions": covering,
        "owner": entry.and_then(|entry| entry.owner.as_ref()).map(|owner| json!({
            "id": owner.id,
            "name": owner.name,
        })),
        "devices": entry.map(|entry| entry.devices.iter().map(|device| json!({
            "id": device.id,
            "name": device.name,
        })).collect::<Vec<_>>()).unwrap_or_default(),
    })
}
