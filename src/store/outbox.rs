//! The outbox table: webhooks and alert e-mails waiting for delivery.

use super::StoreError;
use super::sqlite::insert_event;
use crate::actions::{ActionKind, OutboxEntry, PendingDelivery};
use crate::events::Event;
use crate::policy::Timestamp;
use rusqlite::{Connection, params};

/// Queues one delivery, due at once.
///
/// # Errors
/// On a database failure, such as a delivery id already waiting.
pub fn insert(connection: &Connection, entry: &OutboxEntry) -> Result<(), StoreError> {
    add(connection, entry, "INSERT")?;
    Ok(())
}

/// Queues one delivery, due at once, unless a delivery with its id is
/// already waiting; returns how many were added (0 or 1).
///
/// # Errors
/// On a database failure.
pub fn insert_if_new(connection: &Connection, entry: &OutboxEntry) -> Result<usize, StoreError> {
    add(connection, entry, "INSERT OR IGNORE")
}

fn add(connection: &Connection, entry: &OutboxEntry, verb: &str) -> Result<usize, StoreError> {
    let added = connection.execute(
        &format!(
            "{verb} INTO outbox (delivery_id, kind, mailbox, key_client, body, created, next_attempt)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)"
        ),
        params![
            entry.delivery_id,
            entry.kind.as_str(),
            entry.mailbox,
            entry.key_client,
            entry.body,
            entry.created.millis()
        ],
    )?;
    Ok(added)
}

/// Returns up to `limit` deliveries due at `now`, the longest waiting first.
///
/// # Errors
/// On a database failure or a row that does not decode.
pub fn due(
    connection: &Connection,
    now: Timestamp,
    limit: usize,
) -> Result<Vec<PendingDelivery>, StoreError> {
    let rows = select(connection, now, limit)?;
    Ok(rows.into_iter().map(|waiting| waiting.delivery).collect())
}

/// A delivery still waiting, as `sendguard outbox` lists it.
#[derive(Debug, Clone)]
pub struct Waiting {
    pub delivery: PendingDelivery,
    pub next_attempt: Timestamp,
    /// Error of the last failed attempt.
    pub last_error: Option<String>,
}

/// Returns every waiting delivery, the next due first.
///
/// # Errors
/// On a database failure or a row that does not decode.
pub fn waiting(connection: &Connection) -> Result<Vec<Waiting>, StoreError> {
    select(connection, Timestamp(i64::MAX), usize::MAX)
}

fn select(
    connection: &Connection,
    due_by: Timestamp,
    limit: usize,
) -> Result<Vec<Waiting>, StoreError> {
    let mut statement = connection.prepare(
        "SELECT id, delivery_id, kind, mailbox, key_client, body, created, attempts,
                next_attempt, last_error
         FROM outbox WHERE next_attempt <= ?1 ORDER BY next_attempt, id LIMIT ?2",
    )?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = statement.query_map(params![due_by.millis(), limit], |row| {
        let kind: String = row.get(2)?;
        let delivery = PendingDelivery {
            row: row.get(0)?,
            entry: OutboxEntry {
                delivery_id: row.get(1)?,
                // Checked below, outside the row mapper, to report it as
                // corrupt data.
                kind: ActionKind::parse(&kind).unwrap_or(ActionKind::AdminAlert),
                mailbox: row.get(3)?,
                key_client: row.get(4)?,
                body: row.get(5)?,
                created: Timestamp(row.get(6)?),
            },
            attempts: row.get(7)?,
        };
        Ok((
            kind,
            Waiting {
                delivery,
                next_attempt: Timestamp(row.get(8)?),
                last_error: row.get(9)?,
            },
        ))
    })?;
    let mut selected = Vec::new();
    for row in rows {
        let (kind, waiting) = row?;
        if ActionKind::parse(&kind).is_none() {
            return Err(StoreError::Corrupt(format!("unknown outbox kind {kind:?}")));
        }
        selected.push(waiting);
    }
    Ok(selected)
}

/// Returns when the next delivery is due, if any is waiting.
///
/// # Errors
/// On a database failure.
pub fn next_due(connection: &Connection) -> Result<Option<Timestamp>, StoreError> {
    let next: Option<i64> =
        connection.query_row("SELECT MIN(next_attempt) FROM outbox", [], |row| row.get(0))?;
    Ok(next.map(Timestamp))
}

/// Removes a delivery that succeeded or was given up, and records `event`
/// when given, in one transaction.
///
/// # Errors
/// On a database failure; nothing is written then.
pub fn finish(
    connection: &mut Connection,
    row: i64,
    event: Option<&Event>,
) -> Result<(), StoreError> {
    let transaction = connection.transaction()?;
    transaction.execute("DELETE FROM outbox WHERE id = ?1", params![row])?;
    if let Some(event) = event {
        insert_event(&transaction, event)?;
    }
    transaction.commit()?;
    Ok(())
}

/// Schedules the next attempt of a failed delivery and records `event`
/// when given, in one transaction.
///
/// # Errors
/// On a database failure; nothing is written then.
pub fn reschedule(
    connection: &mut Connection,
    row: i64,
    attempts: u32,
    next: Timestamp,
    error: &str,
    event: Option<&Event>,
) -> Result<(), StoreError> {
    let transaction = connection.transaction()?;
    transaction.execute(
        "UPDATE outbox SET attempts = ?2, next_attempt = ?3, last_error = ?4 WHERE id = ?1",
        params![row, attempts, next.millis(), error],
    )?;
    if let Some(event) = event {
        insert_event(&transaction, event)?;
    }
    transaction.commit()?;
    Ok(())
}

/// Returns the number of deliveries waiting.
///
/// # Errors
/// On a database failure.
pub fn count(connection: &Connection) -> Result<u64, StoreError> {
    let waiting = connection.query_row("SELECT COUNT(*) FROM outbox", [], |row| row.get(0))?;
    Ok(waiting)
}
