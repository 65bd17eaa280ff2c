//! `sendguard store migrate`: copies a SQLite store's mailbox states,
//! events and waiting lockout deliveries into the Redis store, for a
//! deployment that grows from one relay host to several.

use super::redis::RedisStore;
use super::{EventFilter, StoreError, outbox, sqlite};
use rusqlite::Connection;

/// Events read from SQLite per batch.
const EVENT_BATCH: usize = 10_000;

/// The counts of a migration: what it copied and what it left alone.
#[derive(Debug, Default)]
pub struct Migration {
    /// Mailbox states written to Redis.
    pub mailboxes: usize,
    /// Mailboxes Redis already had a state for, kept as they were.
    pub kept: Vec<String>,
    /// Events appended to the shared stream.
    pub events: usize,
    /// True when the stream already held events, so none were copied.
    pub events_skipped: bool,
    /// Deliveries added to the shared outbox.
    pub deliveries: usize,
}

/// Copies `connection`'s store into `redis`. A mailbox that already has a
/// state in Redis keeps that state, and events are copied only into an empty
/// stream, so running the migration again adds nothing twice.
///
/// # Errors
/// On a SQLite or Redis failure; what was copied before it stays.
pub async fn sqlite_to_redis(
    connection: &Connection,
    redis: &RedisStore,
) -> Result<Migration, StoreError> {
    let mut migration = Migration::default();

    let mut statement =
        connection.prepare("SELECT mailbox, client FROM mailboxes ORDER BY mailbox, client")?;
    let keys = statement
        .query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    for (mailbox, client) in keys {
        let key = crate::identity::MailboxKey {
            mailbox,
            client: client.parse().ok(),
        };
        let Some(state) = sqlite::load_mailbox(connection, &key)? else {
            continue;
        };
        if redis.import_state(&key, &state).await? {
            migration.mailboxes += 1;
        } else {
            migration.kept.push(key.to_string());
        }
    }

    if redis.has_events().await? {
        migration.events_skipped = true;
    } else {
        let mut filter = EventFilter {
            limit: Some(EVENT_BATCH),
            ..EventFilter::default()
        };
        loop {
            let events = sqlite::query_events(connection, &filter)?;
            redis.append(&events).await?;
            migration.events += events.len();
            if events.len() < EVENT_BATCH {
                break;
            }
            filter.after = events.last().and_then(|event| event.id);
        }
    }

    for waiting in outbox::waiting(connection)? {
        migration.deliveries += redis.import_delivery(&waiting.delivery.entry).await?;
    }
    Ok(migration)
}
