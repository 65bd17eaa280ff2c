//! Device state, subnet notices and device exclusions in SQLite.

use super::{StoreError, outbox, sqlite};
use crate::actions::OutboxEntry;
use crate::events::Event;
use crate::heartbeat::DeviceStatus;
use crate::policy::Timestamp;
use rusqlite::{Connection, OptionalExtension, params};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS devices (
    id      TEXT PRIMARY KEY,
    status  TEXT NOT NULL,
    updated INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS device_notices (
    id     INTEGER PRIMARY KEY,
    time   INTEGER NOT NULL,
    subnet TEXT NOT NULL,
    device TEXT NOT NULL,
    body   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS device_notices_time ON device_notices (time);
CREATE TABLE IF NOT EXISTS device_settings (
    name    TEXT PRIMARY KEY,
    value   TEXT NOT NULL,
    author  TEXT NOT NULL,
    reason  TEXT NOT NULL,
    changed INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS device_exclusions (
    device   TEXT PRIMARY KEY,
    reason   TEXT NOT NULL,
    author   TEXT NOT NULL,
    created  INTEGER NOT NULL,
    excluded INTEGER NOT NULL DEFAULT 1
);
";

/// Adds the columns that databases created by earlier versions lack.
///
/// # Errors
/// On a database failure.
pub(super) fn migrate(connection: &Connection) -> Result<(), StoreError> {
    // Before lifts existed, every row of device_exclusions was an added
    // exclusion, which the column's default keeps.
    let has_excluded: bool = connection.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('device_exclusions') WHERE name = 'excluded'",
        [],
        |row| row.get(0),
    )?;
    if !has_excluded {
        connection.execute_batch(
            "ALTER TABLE device_exclusions ADD COLUMN excluded INTEGER NOT NULL DEFAULT 1",
        )?;
    }
    Ok(())
}

/// A notice to the devices of one subnet that a device became unsafe or
/// safe again.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Notice {
    /// Row id; the SSE event id, increasing.
    pub id: i64,
    pub time: Timestamp,
    pub subnet: String,
    /// The device the notice is about.
    pub device: String,
    /// The JSON object sent to the devices.
    pub body: serde_json::Value,
}

/// A device's exclusion as overridden through the API: an added exclusion,
/// or a lift of the exclusion the configuration file gives it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExclusionRow {
    pub device: String,
    pub reason: String,
    pub author: String,
    pub created: Timestamp,
    /// True for an added exclusion, false for a lift. Rows stored before
    /// lifts existed have no such field and are added exclusions.
    #[serde(default = "added_by_default")]
    pub excluded: bool,
}

fn added_by_default() -> bool {
    true
}

fn exclusion_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ExclusionRow> {
    Ok(ExclusionRow {
        device: row.get(0)?,
        reason: row.get(1)?,
        author: row.get(2)?,
        created: Timestamp(row.get(3)?),
        excluded: row.get(4)?,
    })
}

/// Reads the stored status of every device.
///
/// # Errors
/// On a database failure or a row that does not decode.
pub fn load_all(connection: &Connection) -> Result<Vec<(String, DeviceStatus)>, StoreError> {
    let mut statement = connection.prepare("SELECT id, status FROM devices ORDER BY id")?;
    let rows = statement.query_map([], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
    })?;
    let mut statuses = Vec::new();
    for row in rows {
        let (id, status) = row?;
        statuses.push((id, serde_json::from_str(&status)?));
    }
    Ok(statuses)
}

/// A change of device state to write in one transaction.
#[derive(Debug, Default)]
pub struct Change {
    pub statuses: Vec<(String, DeviceStatus)>,
    pub events: Vec<Event>,
    /// Notices without their id, which the store assigns.
    pub notices: Vec<Notice>,
    pub deliveries: Vec<OutboxEntry>,
}

/// Writes statuses, events, notices and deliveries in one transaction and
/// returns the notices with their ids.
///
/// # Errors
/// On a database failure; nothing is written then.
pub fn commit(
    connection: &mut Connection,
    change: Change,
    now: Timestamp,
) -> Result<Vec<Notice>, StoreError> {
    let transaction = connection.transaction()?;
    for (id, status) in &change.statuses {
        transaction.execute(
            "INSERT INTO devices (id, status, updated) VALUES (?1, ?2, ?3)
             ON CONFLICT (id) DO UPDATE SET status = excluded.status, updated = excluded.updated",
            params![id, serde_json::to_string(status)?, now.millis()],
        )?;
    }
    for event in &change.events {
        sqlite::insert_event(&transaction, event)?;
    }
    let notices = add_notices(&transaction, change.notices)?;
    for entry in &change.deliveries {
        outbox::insert(&transaction, entry)?;
    }
    transaction.commit()?;
    Ok(notices)
}

/// Stores notices, each with a new id that its body carries too, and
/// returns them.
///
/// # Errors
/// On a database failure.
pub fn add_notices(
    connection: &Connection,
    notices: Vec<Notice>,
) -> Result<Vec<Notice>, StoreError> {
    let mut stored = Vec::with_capacity(notices.len());
    for mut notice in notices {
        connection.execute(
            "INSERT INTO device_notices (time, subnet, device, body) VALUES (?1, ?2, ?3, ?4)",
            params![
                notice.time.millis(),
                notice.subnet,
                notice.device,
                notice.body.to_string()
            ],
        )?;
        notice.id = connection.last_insert_rowid();
        if let serde_json::Value::Object(body) = &mut notice.body {
            body.insert("id".into(), notice.id.into());
        }
        stored.push(notice);
    }
    Ok(stored)
}

/// Returns up to `limit` notices stored after the notice `after`, oldest
/// first.
///
/// # Errors
/// On a database failure or a row that does not decode.
pub fn notices_after(
    connection: &Connection,
    after: i64,
    limit: usize,
) -> Result<Vec<Notice>, StoreError> {
    let mut statement = connection.prepare(
        "SELECT id, time, subnet, device, body FROM device_notices WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = statement.query_map(params![after, limit], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, i64>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, String>(3)?,
            row.get::<_, String>(4)?,
        ))
    })?;
    let mut notices = Vec::new();
    for row in rows {
        let (id, time, subnet, device, body) = row?;
        let mut body: serde_json::Value = serde_json::from_str(&body)?;
        if let serde_json::Value::Object(map) = &mut body {
            map.insert("id".into(), id.into());
        }
        notices.push(Notice {
            id,
            time: Timestamp(time),
            subnet,
            device,
            body,
        });
    }
    Ok(notices)
}

/// Returns the id of the newest notice, 0 when there is none.
///
/// # Errors
/// On a database failure.
pub fn last_notice_id(connection: &Connection) -> Result<i64, StoreError> {
    Ok(connection.query_row(
        "SELECT COALESCE(MAX(id), 0) FROM device_notices",
        [],
        |row| row.get(0),
    )?)
}

/// Deletes notices older than `before` and returns how many.
///
/// # Errors
/// On a database failure.
pub fn delete_notices_before(
    connection: &Connection,
    before: Timestamp,
) -> Result<usize, StoreError> {
    Ok(connection.execute(
        "DELETE FROM device_notices WHERE time < ?1",
        params![before.millis()],
    )?)
}

/// A setting changed through the API, which overrides the configuration
/// file until it is reset.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SettingRow {
    pub name: String,
    pub value: serde_json::Value,
    pub author: String,
    pub reason: String,
    pub changed: Timestamp,
}

/// Returns the settings changed through the API.
///
/// # Errors
/// On a database failure or a value that does not decode.
pub fn settings(connection: &Connection) -> Result<Vec<SettingRow>, StoreError> {
    let mut statement = connection.prepare(
        "SELECT name, value, author, reason, changed FROM device_settings ORDER BY name",
    )?;
    let rows = statement.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, String>(3)?,
            row.get::<_, i64>(4)?,
        ))
    })?;
    let mut settings = Vec::new();
    for row in rows {
        let (name, value, author, reason, changed) = row?;
        settings.push(SettingRow {
            name,
            value: serde_json::from_str(&value)?,
            author,
            reason,
            changed: Timestamp(changed),
        });
    }
    Ok(settings)
}

/// Stores a setting, or removes it when `row.value` is null, with its
/// event.
///
/// # Errors
/// On a database failure; nothing is written then.
pub fn save_setting(
    connection: &mut Connection,
    row: &SettingRow,
    event: &Event,
) -> Result<(), StoreError> {
    let transaction = connection.transaction()?;
    if row.value.is_null() {
        transaction.execute(
            "DELETE FROM device_settings WHERE name = ?1",
            params![row.name],
        )?;
    } else {
        transaction.execute(
            "INSERT INTO device_settings (name, value, author, reason, changed)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (name) DO UPDATE SET value = excluded.value, author = excluded.author,
                 reason = excluded.reason, changed = excluded.changed",
            params![
                row.name,
                row.value.to_string(),
                row.author,
                row.reason,
                row.changed.millis()
            ],
        )?;
    }
    sqlite::insert_event(&transaction, event)?;
    transaction.commit()?;
    Ok(())
}

/// Returns the exclusions added and lifted through the API.
///
/// # Errors
/// On a database failure.
pub fn exclusions(connection: &Connection) -> Result<Vec<ExclusionRow>, StoreError> {
    let mut statement = connection.prepare(
        "SELECT device, reason, author, created, excluded FROM device_exclusions ORDER BY device",
    )?;
    let rows = statement.query_map([], exclusion_from_row)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// Stores an added or lifted exclusion with its event; returns false when
/// the device already has one (nothing is written then).
///
/// # Errors
/// On a database failure.
pub fn add_exclusion(
    connection: &mut Connection,
    row: &ExclusionRow,
    event: &Event,
) -> Result<bool, StoreError> {
    let transaction = connection.transaction()?;
    let added = transaction.execute(
        "INSERT INTO device_exclusions (device, reason, author, created, excluded)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (device) DO NOTHING",
        params![
            row.device,
            row.reason,
            row.author,
            row.created.millis(),
            row.excluded
        ],
    )? == 1;
    if added {
        sqlite::insert_event(&transaction, event)?;
    }
    transaction.commit()?;
    Ok(added)
}

/// Removes an added or lifted exclusion with the event `event_for`
/// builds from the removed row; returns that row, or `None` when the
/// device had neither.
///
/// # Errors
/// On a database failure.
pub fn remove_exclusion(
    connection: &mut Connection,
    device: &str,
    event_for: impl FnOnce(&ExclusionRow) -> Event,
) -> Result<Option<ExclusionRow>, StoreError> {
    let transaction = connection.transaction()?;
    let row = transaction
        .query_row(
            "SELECT device, reason, author, created, excluded FROM device_exclusions
             WHERE device = ?1",
            params![device],
            exclusion_from_row,
        )
        .optional()?;
    if let Some(row) = &row {
        transaction.execute(
            "DELETE FROM device_exclusions WHERE device = ?1",
            params![device],
        )?;
        sqlite::insert_event(&transaction, &event_for(row))?;
    }
    transaction.commit()?;
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventKind;

    fn notice(subnet: &str, device: &str) -> Notice {
        Notice {
            id: 0,
            time: Timestamp::from_secs(100),
            subnet: subnet.to_string(),
            device: device.to_string(),
            body: serde_json::json!({ "device": device }),
        }
    }

    #[test]
    fn notices_numbered_and_resumed() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut connection = sqlite::open(&dir.path().join("s.db")).expect("open");
        let change = Change {
            notices: vec![notice("10.0.0.0/24", "a"), notice("10.0.1.0/24", "b")],
            ..Change::default()
        };
        let stored = commit(&mut connection, change, Timestamp::from_secs(100)).expect("commit");
        assert_eq!(stored[0].body["id"], stored[0].id);
        assert_eq!(last_notice_id(&connection).expect("id"), stored[1].id);
        let after = notices_after(&connection, stored[0].id, 10).expect("read");
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].device, "b");
        assert_eq!(after[0].body["id"], stored[1].id);
    }

    #[test]
    fn status_round_trip() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut connection = sqlite::open(&dir.path().join("s.db")).expect("open");
        let mut status = DeviceStatus::default();
        status.heartbeat(
            crate::heartbeat::Health::Red,
            vec!["10.0.0.1".parse().expect("address")],
            Timestamp::from_secs(5),
        );
        let change = Change {
            statuses: vec![("dev-1".to_string(), status.clone())],
            ..Change::default()
        };
        commit(&mut connection, change, Timestamp::from_secs(5)).expect("commit");
        let loaded = load_all(&connection).expect("load");
        assert_eq!(loaded, vec![("dev-1".to_string(), status)]);
    }

    #[test]
    fn exclusion_added_once_removed_once() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut connection = sqlite::open(&dir.path().join("s.db")).expect("open");
        let row = ExclusionRow {
            device: "dev-1".to_string(),
            reason: "file server".to_string(),
            author: "jdoe".to_string(),
            created: Timestamp::from_secs(1),
            excluded: true,
        };
        let event = Event::for_device(
            Timestamp::from_secs(1),
            EventKind::DeviceExclusionAdded,
            Some("dev-1"),
            serde_json::Map::new(),
        );
        assert!(add_exclusion(&mut connection, &row, &event).expect("add"));
        assert!(!add_exclusion(&mut connection, &row, &event).expect("add again"));
        assert_eq!(exclusions(&connection).expect("list"), vec![row.clone()]);
        let removed =
            remove_exclusion(&mut connection, "dev-1", |_| event.clone()).expect("remove");
        assert_eq!(removed, Some(row));
        assert_eq!(
            remove_exclusion(&mut connection, "dev-1", |_| event.clone()).expect("remove again"),
            None
        );
    }

    #[test]
    fn lift_stored_and_removed_with_its_event() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut connection = sqlite::open(&dir.path().join("s.db")).expect("open");
        let lift = ExclusionRow {
            device: "cache".to_string(),
            reason: "cache compromised".to_string(),
            author: "jdoe".to_string(),
            created: Timestamp::from_secs(2),
            excluded: false,
        };
        let event = |kind| {
            Event::for_device(
                Timestamp::from_secs(2),
                kind,
                Some("cache"),
                serde_json::Map::new(),
            )
        };
        assert!(
            add_exclusion(
                &mut connection,
                &lift,
                &event(EventKind::DeviceExclusionLifted)
            )
            .expect("lift")
        );
        let added = ExclusionRow {
            excluded: true,
            ..lift.clone()
        };
        assert!(
            !add_exclusion(
                &mut connection,
                &added,
                &event(EventKind::DeviceExclusionAdded)
            )
            .expect("add over a lift"),
            "a device has one override at a time"
        );
        assert_eq!(exclusions(&connection).expect("list"), vec![lift.clone()]);

        let removed = remove_exclusion(&mut connection, "cache", |row| {
            assert!(!row.excluded, "the removed row is the lift");
            event(EventKind::DeviceExclusionRestored)
        })
        .expect("reset");
        assert_eq!(removed, Some(lift));
        let kinds: Vec<String> = connection
            .prepare("SELECT type FROM events ORDER BY id")
            .expect("prepare")
            .query_map([], |row| row.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(
            kinds,
            ["device_exclusion_lifted", "device_exclusion_restored"]
        );
    }

    #[test]
    fn old_exclusions_table_migrated() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("s.db");
        {
            let old = Connection::open(&path).expect("create");
            old.execute_batch(
                "CREATE TABLE device_exclusions (
                     device TEXT PRIMARY KEY, reason TEXT NOT NULL,
                     author TEXT NOT NULL, created INTEGER NOT NULL);
                 INSERT INTO device_exclusions VALUES ('files', 'backups', 'jdoe', 1000);",
            )
            .expect("old schema");
        }
        let connection = sqlite::open(&path).expect("open and migrate");
        let rows = exclusions(&connection).expect("list");
        assert_eq!(rows.len(), 1);
        assert!(rows[0].excluded, "an old row is an added exclusion");
        assert_eq!(rows[0].reason, "backups");
        drop(connection);
        sqlite::open(&path).expect("open again without migrating twice");
    }
}
