//! The SQLite schema and its queries, as plain synchronous functions over a
//! connection. The server runs them on the store thread; the command line
//! runs them directly.

use super::StoreError;
use crate::events::{Event, EventKind};
use crate::identity::MailboxKey;
use crate::policy::{MailboxState, Timestamp};
use rusqlite::{Connection, OptionalExtension, params};
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS mailboxes (
    mailbox     TEXT NOT NULL,
    client      TEXT NOT NULL DEFAULT '',
    state       TEXT NOT NULL,
    block_until INTEGER,
    permanent   INTEGER NOT NULL DEFAULT 0,
    end_pending INTEGER NOT NULL DEFAULT 0,
    updated     INTEGER NOT NULL,
    PRIMARY KEY (mailbox, client)
);
CREATE INDEX IF NOT EXISTS mailboxes_pending_end ON mailboxes (end_pending, block_until);
CREATE TABLE IF NOT EXISTS events (
    id         INTEGER PRIMARY KEY,
    time       INTEGER NOT NULL,
    type       TEXT NOT NULL,
    mailbox    TEXT,
    key_client TEXT,
    details    TEXT NOT NULL,
    aggregate  TEXT UNIQUE
);
CREATE INDEX IF NOT EXISTS events_time ON events (time);
CREATE INDEX IF NOT EXISTS events_mailbox ON events (mailbox, time);
CREATE TABLE IF NOT EXISTS outbox (
    id           INTEGER PRIMARY KEY,
    delivery_id  TEXT NOT NULL UNIQUE,
    kind         TEXT NOT NULL,
    mailbox      TEXT,
    key_client   TEXT,
    body         TEXT NOT NULL,
    created      INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt INTEGER NOT NULL,
    last_error   TEXT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_attempt);
CREATE TABLE IF NOT EXISTS exemptions (
    id              INTEGER PRIMARY KEY,
    kind            TEXT NOT NULL,
    value           TEXT NOT NULL,
    reason          TEXT NOT NULL,
    author          TEXT NOT NULL,
    created         INTEGER NOT NULL,
    expires         INTEGER NOT NULL,
    removed         INTEGER,
    removed_by      TEXT,
    expiry_recorded INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS changes (
    id      INTEGER PRIMARY KEY,
    mailbox TEXT,
    client  TEXT NOT NULL DEFAULT ''
);
";

/// Opens (creating if needed) the database in WAL mode with the schema.
///
/// # Errors
/// When the file cannot be opened or the schema cannot be created.
pub fn open(path: &Path) -> Result<Connection, StoreError> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        std::fs::create_dir_all(parent).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            message: source.to_string(),
        })?;
    }
    let created = !path.exists();
    let connection = Connection::open(path).map_err(|source| StoreError::Open {
        path: path.display().to_string(),
        message: source.to_string(),
    })?;
    if created {
        // The store contains senders and client addresses, so it is
        // owner-only. SQLite gives its -wal and -shm files the same mode.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| StoreError::Open {
                path: path.display().to_string(),
                message: format!("cannot restrict permissions: {source}"),
            },
        )?;
    }
    connection.busy_timeout(Duration::from_secs(10))?;
    // WAL with synchronous=NORMAL keeps every committed transaction across
    // a crash of the process (kill -9); only a power loss can lose the last
    // transactions.
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "NORMAL")?;
    connection.execute_batch(SCHEMA)?;
    connection.execute_batch(super::devices::SCHEMA)?;
    super::devices::migrate(&connection)?;
    connection.execute_batch(super::fallback::SCHEMA)?;
    Ok(connection)
}

/// Opens an existing database for the command line, without creating it.
///
/// # Errors
/// When the file does not exist or cannot be opened.
pub fn open_existing(path: &Path) -> Result<Connection, StoreError> {
    if !path.exists() {
        return Err(StoreError::Open {
            path: path.display().to_string(),
            message: "no such file; has `sendguard serve` run with this config?".to_string(),
        });
    }
    open(path)
}

fn client_column(key: &MailboxKey) -> String {
    key.client
        .map(|client| client.to_string())
        .unwrap_or_default()
}

fn key_from_columns(mailbox: String, client: String) -> MailboxKey {
    MailboxKey {
        mailbox,
        client: client.parse::<IpAddr>().ok(),
    }
}

/// Reads one mailbox's state.
///
/// # Errors
/// On a database failure or a state that does not decode.
pub fn load_mailbox(
    connection: &Connection,
    key: &MailboxKey,
) -> Result<Option<MailboxState>, StoreError> {
    let text: Option<String> = connection
        .query_row(
            "SELECT state FROM mailboxes WHERE mailbox = ?1 AND client = ?2",
            params![key.mailbox, client_column(key)],
            |row| row.get(0),
        )
        .optional()?;
    text.map(|text| serde_json::from_str(&text).map_err(StoreError::from))
        .transpose()
}

/// Writes one mailbox's state, or deletes it when there is nothing left to
/// keep.
///
/// # Errors
/// On a database failure.
pub fn save_mailbox(
    connection: &Connection,
    key: &MailboxKey,
    state: &MailboxState,
    keep: bool,
    now: Timestamp,
) -> Result<(), StoreError> {
    if !keep {
        connection.execute(
            "DELETE FROM mailboxes WHERE mailbox = ?1 AND client = ?2",
            params![key.mailbox, client_column(key)],
        )?;
        return Ok(());
    }
    let block = state.block.as_ref();
    let block_until = block.and_then(|block| block.until).map(Timestamp::millis);
    let permanent = block.is_some_and(|block| block.is_permanent());
    let end_pending = block.is_some_and(|block| !block.end_recorded && block.until.is_some());
    connection.execute(
        "INSERT INTO mailboxes (mailbox, client, state, block_until, permanent, end_pending, updated)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (mailbox, client) DO UPDATE SET
             state = excluded.state, block_until = excluded.block_until,
             permanent = excluded.permanent, end_pending = excluded.end_pending,
             updated = excluded.updated",
        params![
            key.mailbox,
            client_column(key),
            serde_json::to_string(state)?,
            block_until,
            permanent,
            end_pending,
            now.millis()
        ],
    )?;
    Ok(())
}

/// Appends one event.
///
/// # Errors
/// On a database failure.
pub fn insert_event(connection: &Connection, event: &Event) -> Result<(), StoreError> {
    connection.execute(
        "INSERT INTO events (time, type, mailbox, key_client, details) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            event.time.millis(),
            event.kind.as_str(),
            event.mailbox,
            event.key_client,
            serde_json::Value::Object(event.details.clone()).to_string()
        ],
    )?;
    Ok(())
}

/// Returns the minute and lockout level that a `sender_refused` event is
/// aggregated under; refusals of different lockouts within one minute stay
/// apart.
pub fn refusal_minute_and_level(event: &Event) -> (i64, String) {
    let minute = event.time.millis().div_euclid(60_000);
    let level = event
        .details
        .get("level")
        .map(ToString::to_string)
        .unwrap_or_default();
    (minute, level)
}

/// Records a `sender_refused` event, folding it into the existing event of
/// the same mailbox and minute by raising its `count`.
///
/// # Errors
/// On a database failure.
pub fn insert_refusal(connection: &Connection, event: &Event) -> Result<(), StoreError> {
    let (minute, level) = refusal_minute_and_level(event);
    let aggregate = format!(
        "sender_refused\u{1f}{}\u{1f}{}\u{1f}{minute}\u{1f}{level}",
        event.mailbox.as_deref().unwrap_or(""),
        event.key_client.as_deref().unwrap_or("")
    );
    connection.execute(
        "INSERT INTO events (time, type, mailbox, key_client, details, aggregate)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (aggregate) DO UPDATE SET
             details = json_set(details, '$.count', json_extract(details, '$.count') + 1,
                                '$.last', ?7)",
        params![
            event.time.millis(),
            event.kind.as_str(),
            event.mailbox,
            event.key_client,
            serde_json::Value::Object(event.details.clone()).to_string(),
            aggregate,
            event.time.to_rfc3339()
        ],
    )?;
    Ok(())
}

/// A filter over the events report; `None` fields match everything.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub since: Option<Timestamp>,
    pub until: Option<Timestamp>,
    pub mailbox: Option<String>,
    pub kind: Option<EventKind>,
    /// A device id: events that name it in their `device` field, or that
    /// concern one of `device_mailboxes`.
    pub device: Option<String>,
    /// Mailboxes of the device's owner, from the directory.
    pub device_mailboxes: Vec<String>,
    /// Only events stored after the event with this id (a page cursor).
    pub after: Option<i64>,
    pub limit: Option<usize>,
}

/// Reads events in time order.
///
/// # Errors
/// On a database failure or a row that does not decode.
pub fn query_events(
    connection: &Connection,
    filter: &EventFilter,
) -> Result<Vec<Event>, StoreError> {
    // Events are read in id order, which is the order they were stored
    // and the order of the page cursor. Ids grow with time except for
    // the few events dated back (lockout ends recorded after a restart).
    let mut statement = connection.prepare(
        "SELECT id, time, type, mailbox, key_client, details FROM events
         WHERE (?1 IS NULL OR time >= ?1) AND (?2 IS NULL OR time < ?2)
           AND (?3 IS NULL OR mailbox = ?3) AND (?4 IS NULL OR type = ?4)
           AND (?5 IS NULL OR json_extract(details, '$.device') = ?5
                OR mailbox IN (SELECT value FROM json_each(?6)))
           AND (?7 IS NULL OR id > ?7)
         ORDER BY id LIMIT ?8",
    )?;
    let limit = filter
        .limit
        .map_or(-1, |limit| i64::try_from(limit).unwrap_or(i64::MAX));
    let device_mailboxes = serde_json::to_string(&filter.device_mailboxes)?;
    let rows = statement.query_map(
        params![
            filter.since.map(Timestamp::millis),
            filter.until.map(Timestamp::millis),
            filter.mailbox,
            filter.kind.map(EventKind::as_str),
            filter.device,
            device_mailboxes,
            filter.after,
            limit
        ],
        event_row,
    )?;
    let mut events = Vec::new();
    for row in rows {
        events.push(event_from_row(row?)?);
    }
    Ok(events)
}

/// A place in the events report ordered by time, then id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct EventPosition {
    pub time: Timestamp,
    pub id: i64,
}

/// One bounded page of a time-ordered read of the events report.
#[derive(Debug, Clone, Default)]
pub struct EventPage {
    /// Only events at or after this time.
    pub since: Option<Timestamp>,
    /// Only events before this time.
    pub until: Option<Timestamp>,
    /// Only events after this position: the last one of the page before.
    pub after: Option<EventPosition>,
    /// Only events of these kinds; all kinds when empty.
    pub kinds: Vec<EventKind>,
    pub limit: usize,
}

/// Reads one page of events in time order (ties in id order), so a long
/// history can be read page by page in bounded memory.
///
/// # Errors
/// On a database failure or a row that does not decode.
pub fn events_page(connection: &Connection, page: &EventPage) -> Result<Vec<Event>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT id, time, type, mailbox, key_client, details FROM events
         WHERE (?1 IS NULL OR time >= ?1) AND (?2 IS NULL OR time < ?2)
           AND (?3 IS NULL OR time > ?3 OR (time = ?3 AND id > ?4))
           AND (?5 = '[]' OR type IN (SELECT value FROM json_each(?5)))
         ORDER BY time, id LIMIT ?6",
    )?;
    let kinds: Vec<&str> = page.kinds.iter().map(|kind| kind.as_str()).collect();
    let rows = statement.query_map(
        params![
            page.since.map(Timestamp::millis),
            page.until.map(Timestamp::millis),
            page.after.map(|after| after.time.millis()),
            page.after.map_or(0, |after| after.id),
            serde_json::to_string(&kinds)?,
            i64::try_from(page.limit).unwrap_or(i64::MAX)
        ],
        event_row,
    )?;
    rows.map(|row| event_from_row(row?)).collect()
}

type EventRow = (i64, i64, String, Option<String>, Option<String>, String);

fn event_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<EventRow> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
    ))
}

fn event_from_row(row: EventRow) -> Result<Event, StoreError> {
    let (id, time, kind, mailbox, key_client, details) = row;
    let kind = EventKind::parse(&kind)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown event type {kind:?}")))?;
    let details = match serde_json::from_str(&details)? {
        serde_json::Value::Object(map) => map,
        _ => {
            return Err(StoreError::Corrupt(
                "event details are not an object".to_string(),
            ));
        }
    };
    Ok(Event {
        id: Some(id),
        time: Timestamp(time),
        kind,
        mailbox,
        key_client,
        details,
    })
}

/// Returns every mailbox with a lockout in force at `now`.
///
/// # Errors
/// On a database failure or a state that does not decode.
pub fn active_blocks(
    connection: &Connection,
    now: Timestamp,
) -> Result<Vec<(MailboxKey, MailboxState)>, StoreError> {
    let mut statement = connection.prepare(
        "SELECT mailbox, client, state FROM mailboxes
         WHERE permanent = 1 OR block_until > ?1 ORDER BY mailbox, client",
    )?;
    let rows = statement.query_map(params![now.millis()], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
        ))
    })?;
    let mut blocks = Vec::new();
    for row in rows {
        let (mailbox, client, state) = row?;
        let state: MailboxState = serde_json::from_str(&state)?;
        if state.active_block(now).is_some() {
            blocks.push((key_from_columns(mailbox, client), state));
        }
    }
    Ok(blocks)
}

/// Returns the earliest end of a timed lockout whose end is not yet recorded.
///
/// # Errors
/// On a database failure.
pub fn next_pending_end(connection: &Connection) -> Result<Option<Timestamp>, StoreError> {
    let next: Option<i64> = connection.query_row(
        "SELECT MIN(block_until) FROM mailboxes WHERE end_pending = 1",
        [],
        |row| row.get(0),
    )?;
    Ok(next.map(Timestamp))
}

/// Returns the mailboxes whose timed lockout ended at or before `now` and
/// whose end is not yet recorded.
///
/// # Errors
/// On a database failure.
pub fn due_ends(connection: &Connection, now: Timestamp) -> Result<Vec<MailboxKey>, StoreError> {
    let mut statement = connection.prepare(
        "SELECT mailbox, client FROM mailboxes WHERE end_pending = 1 AND block_until <= ?1",
    )?;
    let rows = statement.query_map(params![now.millis()], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
    })?;
    let mut keys = Vec::new();
    for row in rows {
        let (mailbox, client) = row?;
        keys.push(key_from_columns(mailbox, client));
    }
    Ok(keys)
}

/// Returns every stored state of a mailbox, under any client address.
///
/// # Errors
/// On a database failure or a state that does not decode.
pub fn mailbox_states(
    connection: &Connection,
    mailbox: &str,
) -> Result<Vec<(MailboxKey, MailboxState)>, StoreError> {
    let mut statement = connection.prepare(
        "SELECT mailbox, client, state FROM mailboxes WHERE mailbox = ?1 ORDER BY client",
    )?;
    let rows = statement.query_map(params![mailbox], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
        ))
    })?;
    let mut states = Vec::new();
    for row in rows {
        let (mailbox, client, state) = row?;
        states.push((
            key_from_columns(mailbox, client),
            serde_json::from_str(&state)?,
        ));
    }
    Ok(states)
}

/// Deletes up to `batch` events older than `before`; returns how many went.
///
/// # Errors
/// On a database failure.
pub fn delete_events_before(
    connection: &Connection,
    before: Timestamp,
    batch: usize,
) -> Result<usize, StoreError> {
    let batch = i64::try_from(batch).unwrap_or(i64::MAX);
    let deleted = connection.execute(
        "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE time < ?1 LIMIT ?2)",
        params![before.millis(), batch],
    )?;
    Ok(deleted)
}

/// Returns the mailboxes whose last timed lockout ended at or before
/// `ended_before`, with its end recorded: the candidates for forgiveness.
///
/// # Errors
/// On a database failure.
pub fn quiet_since(
    connection: &Connection,
    ended_before: Timestamp,
) -> Result<Vec<MailboxKey>, StoreError> {
    let mut statement = connection.prepare(
        "SELECT mailbox, client FROM mailboxes
         WHERE permanent = 0 AND end_pending = 0 AND block_until IS NOT NULL AND block_until <= ?1",
    )?;
    let rows = statement.query_map(params![ended_before.millis()], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
    })?;
    let mut keys = Vec::new();
    for row in rows {
        let (mailbox, client) = row?;
        keys.push(key_from_columns(mailbox, client));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Event;

    #[test]
    fn events_page_follows_time_order() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let connection = open(&dir.path().join("store.db")).expect("open");
        // Stored in id order 1..=5, the third dated back before the others,
        // as a lockout end recorded after a restart is.
        for (time, kind) in [
            (1_000, EventKind::ConfigLoaded),
            (3_000, EventKind::ConfigLoaded),
            (500, EventKind::LockoutEnded),
            (3_000, EventKind::ConfigLoaded),
            (4_000, EventKind::ConfigLoaded),
        ] {
            let mut event =
                Event::config_loaded(Timestamp(time), "digest", serde_json::Value::Null, "test");
            event.kind = kind;
            insert_event(&connection, &event).expect("insert");
        }

        let mut read = Vec::new();
        let mut page = EventPage {
            since: Some(Timestamp(600)),
            until: Some(Timestamp(4_000)),
            kinds: vec![EventKind::ConfigLoaded],
            limit: 2,
            ..EventPage::default()
        };
        loop {
            let events = events_page(&connection, &page).expect("page");
            assert!(events.len() <= 2, "{events:?}");
            let Some(last) = events.last() else {
                break;
            };
            page.after = Some(EventPosition {
                time: last.time,
                id: last.id.expect("stored id"),
            });
            read.extend(events.iter().map(|event| (event.time.millis(), event.id)));
        }

        assert_eq!(read, [(1_000, Some(1)), (3_000, Some(2)), (3_000, Some(4))]);
    }
}
