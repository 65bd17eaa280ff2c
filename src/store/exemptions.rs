//! Exemptions, and the change log through which a running server learns
//! of writes that the command line made straight to the store.

use super::StoreError;
use super::sqlite::insert_event;
use crate::events::{Event, EventKind};
use crate::identity::MailboxKey;
use crate::policy::{Exemption, ExemptionKind, Timestamp};
use rusqlite::{Connection, params};

/// An exemption to add: everything but the id.
#[derive(Debug, Clone)]
pub struct NewExemption {
    pub kind: ExemptionKind,
    pub reason: String,
    pub author: String,
    pub created: Timestamp,
    pub expires: Timestamp,
}

/// An exemption as listed, with how it ended.
#[derive(Debug, Clone)]
pub struct ListedExemption {
    pub exemption: Exemption,
    /// Removal time and the name of the person who removed it.
    pub removed: Option<(Timestamp, String)>,
}

fn kind_columns(kind: &ExemptionKind) -> (&'static str, String) {
    match kind {
        ExemptionKind::Sender(mailbox) => ("sender", mailbox.clone()),
        ExemptionKind::Login(login) => ("login", login.clone()),
        ExemptionKind::Network(network) => ("network", network.to_string()),
    }
}

fn kind_from_columns(kind: &str, value: String) -> Result<ExemptionKind, StoreError> {
    match kind {
        "sender" => Ok(ExemptionKind::Sender(value)),
        "login" => Ok(ExemptionKind::Login(value)),
        "network" => value
            .parse()
            .map(ExemptionKind::Network)
            .map_err(|_| StoreError::Corrupt(format!("invalid exempt network {value:?}"))),
        other => Err(StoreError::Corrupt(format!(
            "unknown exemption kind {other:?}"
        ))),
    }
}

/// Adds an exemption and its `exemption_added` event in one transaction,
/// and returns it with its id.
///
/// # Errors
/// On a database failure; nothing is written then.
pub fn add(connection: &mut Connection, new: NewExemption) -> Result<Exemption, StoreError> {
    let transaction = connection.transaction()?;
    let (kind, value) = kind_columns(&new.kind);
    transaction.execute(
        "INSERT INTO exemptions (kind, value, reason, author, created, expires)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            kind,
            value,
            new.reason,
            new.author,
            new.created.millis(),
            new.expires.millis()
        ],
    )?;
    let exemption = Exemption {
        id: transaction.last_insert_rowid(),
        kind: new.kind,
        reason: new.reason,
        author: new.author.clone(),
        created: new.created,
        expires: new.expires,
    };
    let event = Event::exemption(
        new.created,
        EventKind::ExemptionAdded,
        &exemption,
        Some(&new.author),
    );
    insert_event(&transaction, &event)?;
    record_exemption_change(&transaction)?;
    transaction.commit()?;
    Ok(exemption)
}

/// Removes an exemption still in force, recording `exemption_removed`;
/// returns it, or `None` when no exemption with this id is in force.
///
/// # Errors
/// On a database failure; nothing is written then.
pub fn remove(
    connection: &mut Connection,
    id: i64,
    by: &str,
    now: Timestamp,
) -> Result<Option<Exemption>, StoreError> {
    let transaction = connection.transaction()?;
    let found = select(
        &transaction,
        "WHERE id = ?1 AND removed IS NULL AND expires > ?2",
        params![id, now.millis()],
    )?;
    let Some(listed) = found.into_iter().next() else {
        return Ok(None);
    };
    transaction.execute(
        "UPDATE exemptions SET removed = ?2, removed_by = ?3 WHERE id = ?1",
        params![id, now.millis(), by],
    )?;
    let event = Event::exemption(
        now,
        EventKind::ExemptionRemoved,
        &listed.exemption,
        Some(by),
    );
    insert_event(&transaction, &event)?;
    record_exemption_change(&transaction)?;
    transaction.commit()?;
    Ok(Some(listed.exemption))
}

/// Returns the exemptions in force at `now`.
///
/// # Errors
/// On a database failure or a row that does not decode.
pub fn active(connection: &Connection, now: Timestamp) -> Result<Vec<Exemption>, StoreError> {
    let listed = select(
        connection,
        "WHERE removed IS NULL AND expires > ?1 ORDER BY id",
        params![now.millis()],
    )?;
    Ok(listed.into_iter().map(|listed| listed.exemption).collect())
}

/// Returns every exemption ever added, the newest first.
///
/// # Errors
/// On a database failure or a row that does not decode.
pub fn all(connection: &Connection) -> Result<Vec<ListedExemption>, StoreError> {
    select(connection, "ORDER BY id DESC", params![])
}

fn select(
    connection: &Connection,
    clause: &str,
    parameters: &[&dyn rusqlite::ToSql],
) -> Result<Vec<ListedExemption>, StoreError> {
    let mut statement = connection.prepare(&format!(
        "SELECT id, kind, value, reason, author, created, expires, removed, removed_by
         FROM exemptions {clause}"
    ))?;
    let rows = statement.query_map(parameters, |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, String>(3)?,
            row.get::<_, String>(4)?,
            row.get::<_, i64>(5)?,
            row.get::<_, i64>(6)?,
            row.get::<_, Option<i64>>(7)?,
            row.get::<_, Option<String>>(8)?,
        ))
    })?;
    let mut listed = Vec::new();
    for row in rows {
        let (id, kind, value, reason, author, created, expires, removed, removed_by) = row?;
        listed.push(ListedExemption {
            exemption: Exemption {
                id,
                kind: kind_from_columns(&kind, value)?,
                reason,
                author,
                created: Timestamp(created),
                expires: Timestamp(expires),
            },
            removed: removed.map(|time| (Timestamp(time), removed_by.unwrap_or_default())),
        });
    }
    Ok(listed)
}

/// Records `exemption_expired` for every exemption that ended by `now`
/// without being removed, once each; returns how many.
///
/// # Errors
/// On a database failure.
pub fn record_expiries(connection: &mut Connection, now: Timestamp) -> Result<usize, StoreError> {
    let transaction = connection.transaction()?;
    let expired = select(
        &transaction,
        "WHERE removed IS NULL AND expiry_recorded = 0 AND expires <= ?1",
        params![now.millis()],
    )?;
    for listed in &expired {
        transaction.execute(
            "UPDATE exemptions SET expiry_recorded = 1 WHERE id = ?1",
            params![listed.exemption.id],
        )?;
        let exemption = &listed.exemption;
        let event = Event::exemption(
            exemption.expires,
            EventKind::ExemptionExpired,
            exemption,
            None,
        );
        insert_event(&transaction, &event)?;
    }
    if !expired.is_empty() {
        record_exemption_change(&transaction)?;
    }
    transaction.commit()?;
    Ok(expired.len())
}

/// Returns the earliest end of an exemption whose expiry is not recorded.
///
/// # Errors
/// On a database failure.
pub fn next_expiry(connection: &Connection) -> Result<Option<Timestamp>, StoreError> {
    let next: Option<i64> = connection.query_row(
        "SELECT MIN(expires) FROM exemptions WHERE removed IS NULL AND expiry_recorded = 0",
        [],
        |row| row.get(0),
    )?;
    Ok(next.map(Timestamp))
}

/// Notes that a mailbox's state was written outside the server, so a
/// running server drops its cached copy.
///
/// # Errors
/// On a database failure.
pub fn record_mailbox_change(connection: &Connection, key: &MailboxKey) -> Result<(), StoreError> {
    let client = key
        .client
        .map(|client| client.to_string())
        .unwrap_or_default();
    connection.execute(
        "INSERT INTO changes (mailbox, client) VALUES (?1, ?2)",
        params![key.mailbox, client],
    )?;
    Ok(())
}

fn record_exemption_change(connection: &Connection) -> Result<(), StoreError> {
    connection.execute("INSERT INTO changes (mailbox) VALUES (NULL)", [])?;
    Ok(())
}

/// A write made outside the server: one mailbox's state, or the exemptions
/// (`None`).
pub type Change = Option<MailboxKey>;

/// Returns the changes logged after `after` with the last id read, and
/// deletes those before it, since only one server reads them. The last row
/// stays, so SQLite never hands out its id again.
///
/// # Errors
/// On a database failure.
pub fn take_changes(connection: &Connection, after: i64) -> Result<(i64, Vec<Change>), StoreError> {
    let mut statement =
        connection.prepare("SELECT id, mailbox, client FROM changes WHERE id > ?1 ORDER BY id")?;
    let rows = statement.query_map(params![after], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, Option<String>>(1)?,
            row.get::<_, String>(2)?,
        ))
    })?;
    let mut last = after;
    let mut changes = Vec::new();
    for row in rows {
        let (id, mailbox, client) = row?;
        last = id;
        changes.push(mailbox.map(|mailbox| MailboxKey {
            mailbox,
            client: client.parse().ok(),
        }));
    }
    connection.execute("DELETE FROM changes WHERE id < ?1", params![last])?;
    Ok((last, changes))
}
