//! Strikes a host recorded in its own SQLite store while Redis could not
//! be reached (`on_store_error = "local"`), kept until they are merged
//! into Redis.

use super::StoreError;
use crate::identity::MailboxKey;
use crate::policy::Strike;
use rusqlite::{Connection, params};
use std::net::IpAddr;

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS fallback_strikes (
    id      INTEGER PRIMARY KEY,
    mailbox TEXT NOT NULL,
    client  TEXT NOT NULL DEFAULT '',
    strike  TEXT NOT NULL
);
";

fn client_column(key: &MailboxKey) -> String {
    key.client
        .map(|client| client.to_string())
        .unwrap_or_default()
}

/// Keeps a strike recorded without Redis, for the merge.
///
/// # Errors
/// On a database failure.
pub fn insert(
    connection: &Connection,
    key: &MailboxKey,
    strike: &Strike,
) -> Result<(), StoreError> {
    connection.execute(
        "INSERT INTO fallback_strikes (mailbox, client, strike) VALUES (?1, ?2, ?3)",
        params![
            key.mailbox,
            client_column(key),
            serde_json::to_string(strike)?
        ],
    )?;
    Ok(())
}

/// Returns each mailbox with strikes waiting for the merge, with its
/// strikes in the order they were recorded.
///
/// # Errors
/// On a database failure or a strike that does not decode.
pub fn waiting(connection: &Connection) -> Result<Vec<(MailboxKey, Vec<Strike>)>, StoreError> {
    let mut statement = connection.prepare(
        "SELECT mailbox, client, strike FROM fallback_strikes ORDER BY mailbox, client, id",
    )?;
    let rows = statement.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
        ))
    })?;
    let mut waiting: Vec<(MailboxKey, Vec<Strike>)> = Vec::new();
    for row in rows {
        let (mailbox, client, strike) = row?;
        let key = MailboxKey {
            mailbox,
            client: client.parse::<IpAddr>().ok(),
        };
        let strike: Strike = serde_json::from_str(&strike)?;
        match waiting.last_mut() {
            Some((last, strikes)) if *last == key => strikes.push(strike),
            _ => waiting.push((key, vec![strike])),
        }
    }
    Ok(waiting)
}

/// Forgets a mailbox's merged strikes and its local state, so the next
/// outage starts from what Redis held.
///
/// # Errors
/// On a database failure.
pub fn finish(connection: &mut Connection, key: &MailboxKey) -> Result<(), StoreError> {
    let transaction = connection.transaction()?;
    transaction.execute(
        "DELETE FROM fallback_strikes WHERE mailbox = ?1 AND client = ?2",
        params![key.mailbox, client_column(key)],
    )?;
    transaction.execute(
        "DELETE FROM mailboxes WHERE mailbox = ?1 AND client = ?2",
        params![key.mailbox, client_column(key)],
    )?;
    transaction.commit()?;
    Ok(())
}
