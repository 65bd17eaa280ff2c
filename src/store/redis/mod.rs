//! The shared store in Redis, for several relay hosts under one policy.
//!
//! Each mailbox is one hash `PREFIX mailbox:{ID}` with its `state` (JSON),
//! a `version` and the `pending` work (events and deliveries) written with
//! it. The braces make `ID` the Redis Cluster hash tag, so every key of one
//! mailbox sits in one slot. A host reads the hash and Redis's `TIME`, runs
//! the pure policy code and writes back with `compare_and_set.lua`, which
//! only compares the version and writes. On a conflict it reads again.
//!
//! The pending work travels in the same hash as the state, so a lockout is
//! never stored without its webhooks. After the write, the host moves the
//! work to the events stream (another slot) and to its outbox, and clears
//! it with a second compare-and-set. A crash between the two leaves the
//! work in the hash and the mailbox in the `dirty` set, which
//! [`RedisStore::sweep`] finishes at start-up and on the timer lease holder.

mod connection;
mod devices;
mod exemptions;

pub use connection::Connection;
pub use devices::DeviceTable;

use super::{EventFilter, MailboxWrite, StoreError};
use crate::actions::{ActionKind, OutboxEntry, PendingDelivery};
use crate::config::StoreConfig;
use crate::events::{Event, EventKind};
use crate::identity::MailboxKey;
use crate::policy::{MailboxState, Timestamp};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// Writes of one mailbox tried before a conflict is reported as a failure.
const MAX_ATTEMPTS: usize = 64;
/// Age after which the sweep takes over a mailbox's pending work and
/// removes it from the `dirty` set: a writer finishes its own move within
/// a few command timeouts.
const DIRTY_AGE: Duration = Duration::from_secs(60);
/// Time an emptied mailbox hash stays, so its version outlives any read
/// still in flight.
const EMPTY_TTL: Duration = Duration::from_secs(86_400);
/// Time a moved event's marker stays, so a retried move never appends it
/// twice.
const MOVED_TTL: Duration = Duration::from_secs(86_400);
/// Events read from the stream per request while filtering.
const READ_BATCH: usize = 500;

/// How long the outbox remembers a queued delivery, so moving the same
/// pending work again never sends it twice. Longer than the default
/// `actions.give_up_after` (48 h) and the marker of moved work.
const QUEUED_MARKER_LIFETIME: Duration = Duration::from_secs(7 * 86_400);
/// How far before a query's `since` the stream is read.
const SINCE_MARGIN: Duration = Duration::from_secs(86_400);
/// Shortest wait for the next outbox round while items are due but held
/// by other hosts.
const OUTBOX_RECHECK: Duration = Duration::from_secs(1);

/// A change another host made, as the sender caches hear of it.
#[derive(Debug, Clone, PartialEq)]
pub enum Invalidation {
    /// One mailbox's state changed.
    Mailbox(MailboxKey),
    /// The exemptions changed.
    Exemptions,
    /// Device settings or exclusions made through the API changed.
    DeviceSettings,
    /// Device statuses changed: a heartbeat or a state change.
    DeviceStatuses,
    /// Subnet notices another host sent to its agents.
    Notices(Vec<super::devices::Notice>),
    /// The subscription was (re)made; messages sent meanwhile are lost, so
    /// every cached state must go and the exemptions must be read again.
    All,
}

/// A mailbox as read, with the version its write compares.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub version: i64,
    pub state: MailboxState,
    pending: Vec<PendingWork>,
    /// Redis's `TIME` when the state was read.
    pub now: Timestamp,
}

/// Events and deliveries written together with a mailbox's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PendingWork {
    id: String,
    events: Vec<StoredEvent>,
    deliveries: Vec<StoredDelivery>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredEvent {
    time: Timestamp,
    kind: String,
    mailbox: Option<String>,
    key_client: Option<String>,
    details: Map<String, Value>,
}

/// An outbox item in Redis: the delivery and its attempts so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct OutboxItem {
    delivery: StoredDelivery,
    attempts: u32,
    last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredDelivery {
    delivery_id: String,
    kind: String,
    mailbox: Option<String>,
    key_client: Option<String>,
    body: String,
    created: Timestamp,
}

impl StoredEvent {
    fn from_event(event: &Event) -> StoredEvent {
        StoredEvent {
            time: event.time,
            kind: event.kind.as_str().to_string(),
            mailbox: event.mailbox.clone(),
            key_client: event.key_client.clone(),
            details: event.details.clone(),
        }
    }

    fn into_event(self, id: Option<i64>) -> Result<Event, StoreError> {
        let kind = EventKind::parse(&self.kind)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown event type {:?}", self.kind)))?;
        Ok(Event {
            id,
            time: self.time,
            kind,
            mailbox: self.mailbox,
            key_client: self.key_client,
            details: self.details,
        })
    }
}

impl StoredDelivery {
    fn from_entry(entry: &OutboxEntry) -> StoredDelivery {
        StoredDelivery {
            delivery_id: entry.delivery_id.clone(),
            kind: entry.kind.as_str().to_string(),
            mailbox: entry.mailbox.clone(),
            key_client: entry.key_client.clone(),
            body: entry.body.clone(),
            created: entry.created,
        }
    }

    fn into_entry(self) -> Result<OutboxEntry, StoreError> {
        let kind = ActionKind::parse(&self.kind)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown outbox kind {:?}", self.kind)))?;
        Ok(OutboxEntry {
            delivery_id: self.delivery_id,
            kind,
            mailbox: self.mailbox,
            key_client: self.key_client,
            body: self.body,
            created: self.created,
        })
    }
}

/// Handle to the shared Redis store.
pub struct RedisStore {
    connection: Connection,
    /// The servers the pub/sub subscription connects to, tried in turn:
    /// the one server, or every cluster node (Redis Cluster forwards
    /// `PUBLISH` to every node).
    pubsub_urls: Vec<String>,
    prefix: String,
    /// This process's name in leases and invalidation messages.
    host: String,
    /// Redis's clock minus this host's, in milliseconds, as last measured.
    clock_offset: AtomicI64,
    events_keep: Duration,
    compare_and_set: redis::Script,
    lease: redis::Script,
    queue: redis::Script,
    remove_if_score: redis::Script,
    read_devices: redis::Script,
    write_devices: redis::Script,
    up_since: redis::Script,
}

impl RedisStore {
    /// Creates the store without connecting; the first command connects,
    /// so sendguard starts while Redis is down.
    ///
    /// # Errors
    /// When a URL is invalid.
    pub fn open(config: &StoreConfig, events_keep: Duration) -> Result<RedisStore, StoreError> {
        let connection = Connection::new(config.url.as_deref(), &config.nodes, config.timeout)?;
        let pubsub_urls = match &config.url {
            Some(url) => vec![url.clone()],
            None => config.nodes.clone(),
        };
        let host = format!(
            "{}-{}-{:08x}",
            hostname(),
            std::process::id(),
            rand::random::<u32>()
        );
        Ok(RedisStore {
            connection,
            pubsub_urls,
            prefix: config.key_prefix.clone(),
            host,
            clock_offset: AtomicI64::new(0),
            events_keep,
            compare_and_set: redis::Script::new(include_str!("compare_and_set.lua")),
            lease: redis::Script::new(include_str!("lease.lua")),
            queue: redis::Script::new(include_str!("queue_delivery.lua")),
            remove_if_score: redis::Script::new(include_str!("remove_if_score.lua")),
            read_devices: redis::Script::new(include_str!("read_devices.lua")),
            write_devices: redis::Script::new(include_str!("write_devices.lua")),
            up_since: redis::Script::new(include_str!("up_since.lua")),
        })
    }

    /// Returns this process's name in leases and messages.
    pub fn host(&self) -> &str {
        &self.host
    }

    fn connection(&self) -> Connection {
        self.connection.clone()
    }

    fn mailbox_key(&self, id: &str) -> String {
        format!("{}mailbox:{{{id}}}", self.prefix)
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Reads Redis's clock and remembers its offset from this host's.
    ///
    /// # Errors
    /// When Redis cannot be reached.
    pub async fn time(&self) -> Result<Timestamp, StoreError> {
        let (secs, micros): (i64, i64) = redis::cmd("TIME")
            .query_async(&mut self.connection())
            .await?;
        let now = Timestamp(secs * 1000 + micros / 1000);
        self.clock_offset
            .store(now.millis() - Timestamp::now().millis(), Ordering::Relaxed);
        Ok(now)
    }

    /// Returns Redis's time, from this host's clock and the offset measured
    /// at the last `TIME`, so a host whose clock is off neither shortens
    /// nor lengthens a lockout.
    pub fn now(&self) -> Timestamp {
        Timestamp(
            Timestamp::now()
                .millis()
                .saturating_add(self.clock_offset.load(Ordering::Relaxed)),
        )
    }

    /// Reads one mailbox with its version, and Redis's time.
    ///
    /// # Errors
    /// When Redis cannot be reached or returns data that does not decode.
    pub async fn read(&self, key: &MailboxKey) -> Result<Snapshot, StoreError> {
        let (version, state, pending) = self.read_hash(&key_id(key)).await?;
        let now = self.time().await?;
        Ok(Snapshot {
            version,
            state,
            pending,
            now,
        })
    }

    async fn read_hash(
        &self,
        id: &str,
    ) -> Result<(i64, MailboxState, Vec<PendingWork>), StoreError> {
        let (version, state, pending): (Option<i64>, Option<String>, Option<String>) =
            redis::cmd("HMGET")
                .arg(self.mailbox_key(id))
                .arg("version")
                .arg("state")
                .arg("pending")
                .query_async(&mut self.connection())
                .await?;
        let state = match state.as_deref() {
            None | Some("") => MailboxState::default(),
            Some(text) => serde_json::from_str(text)?,
        };
        let pending = match pending.as_deref() {
            None | Some("") => Vec::new(),
            Some(text) => serde_json::from_str(text)?,
        };
        Ok((version.unwrap_or(0), state, pending))
    }

    /// Reads one mailbox's state.
    ///
    /// # Errors
    /// When Redis cannot be reached or returns data that does not decode.
    pub async fn load_mailbox(&self, key: &MailboxKey) -> Result<Option<MailboxState>, StoreError> {
        let (version, state, _) = self.read_hash(&key_id(key)).await?;
        Ok((version > 0).then_some(state))
    }

    /// Writes `state` with `write`'s events and deliveries if the mailbox
    /// still has `snapshot`'s version; returns false on a conflict. After
    /// a write, the other hosts hear of it and the work is moved on.
    ///
    /// # Errors
    /// When Redis cannot be reached; the write may or may not have landed
    /// then, as with any lost reply.
    pub async fn write(
        &self,
        key: &MailboxKey,
        snapshot: &Snapshot,
        state: &MailboxState,
        write: MailboxWrite,
    ) -> Result<bool, StoreError> {
        let id = key_id(key);
        let mut pending = snapshot.pending.clone();
        if !write.events.is_empty() || !write.deliveries.is_empty() {
            pending.push(PendingWork {
                id: format!("{:032x}", rand::random::<u128>()),
                events: write.events.iter().map(StoredEvent::from_event).collect(),
                deliveries: write
                    .deliveries
                    .iter()
                    .map(StoredDelivery::from_entry)
                    .collect(),
            });
        }
        let pending_json = if pending.is_empty() {
            String::new()
        } else {
            serde_json::to_string(&pending)?
        };

        let mut connection = self.connection();
        // Registered before the write, so a crash after it leaves the
        // mailbox where the sweep looks.
        let _: () = connection
            .zadd(self.key("dirty"), &id, snapshot.now.millis())
            .await?;
        let _: () = connection.sadd(self.key("mailboxes"), &id).await?;

        let version: i64 = self
            .compare_and_set
            .key(self.mailbox_key(&id))
            .arg(snapshot.version)
            .arg(serde_json::to_string(state)?)
            .arg(pending_json)
            .arg(if write.keep { "1" } else { "0" })
            .arg(duration_millis(EMPTY_TTL))
            .invoke_async(&mut connection)
            .await?;
        if version < 0 {
            return Ok(false);
        }

        self.publish(&id).await;
        if let Err(error) = self.move_pending(&id).await {
            tracing::warn!(%error, mailbox = %key,
                "cannot move a mailbox's events and deliveries on; the sweep retries");
        }
        Ok(true)
    }

    async fn publish(&self, id: &str) {
        let message = serde_json::json!({ "host": self.host, "id": id });
        if let Err(error) = self.announce(message).await {
            // The other hosts' caches miss this change until their next
            // subscription drops them whole.
            tracing::warn!(%error, mailbox = id, "cannot announce a mailbox change to the other hosts");
        }
    }

    /// Returns every value of the hash `key`, decoded from JSON.
    async fn hash_values<T: serde::de::DeserializeOwned>(
        &self,
        key: String,
    ) -> Result<Vec<T>, StoreError> {
        let values: Vec<String> = self.connection().hvals(key).await?;
        let mut decoded = Vec::with_capacity(values.len());
        for value in values {
            decoded.push(serde_json::from_str(&value)?);
        }
        Ok(decoded)
    }

    /// Publishes `message` on the changes channel.
    async fn announce(&self, message: Value) -> Result<(), StoreError> {
        let _: i64 = self
            .connection()
            .publish(self.key("changes"), message.to_string())
            .await?;
        Ok(())
    }

    /// Moves a mailbox's pending events to the stream and its deliveries
    /// to the shared outbox, clears them and updates the lockout-end index.
    /// Returns how many deliveries were queued.
    async fn move_pending(&self, id: &str) -> Result<usize, StoreError> {
        let mut queued = 0;
        for _ in 0..MAX_ATTEMPTS {
            let (version, state, pending) = self.read_hash(id).await?;
            if pending.is_empty() {
                self.index_end(id, &state).await?;
                return Ok(queued);
            }
            for work in &pending {
                queued += self.move_work(work).await?;
            }
            let cleared: i64 = self
                .compare_and_set
                .key(self.mailbox_key(id))
                .arg(version)
                .arg(serde_json::to_string(&state)?)
                .arg("")
                .arg(if state == MailboxState::default() {
                    "0"
                } else {
                    "1"
                })
                .arg(duration_millis(EMPTY_TTL))
                .invoke_async(&mut self.connection())
                .await?;
            if cleared >= 0 {
                self.index_end(id, &state).await?;
                return Ok(queued);
            }
        }
        Err(StoreError::Conflict {
            attempts: MAX_ATTEMPTS,
        })
    }

    /// Appends one piece of work's events (each once, by its marker) and
    /// queues its deliveries (each once, by its delivery id).
    async fn move_work(&self, work: &PendingWork) -> Result<usize, StoreError> {
        let mut connection = self.connection();
        for (index, event) in work.events.iter().enumerate() {
            let marker = self.key(&format!("moved:{}:{index}", work.id));
            let first: Option<String> = redis::cmd("SET")
                .arg(&marker)
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(duration_millis(MOVED_TTL))
                .query_async(&mut connection)
                .await?;
            if first.is_some() {
                self.add_to_stream(&mut connection, event).await?;
            }
        }
        let mut queued = 0;
        for delivery in &work.deliveries {
            queued += self.queue_delivery(&mut connection, delivery).await?;
        }
        Ok(queued)
    }

    /// Writes `state` for a mailbox that has no state in Redis yet. Returns
    /// false, writing nothing, when Redis has a state already.
    ///
    /// # Errors
    /// When Redis cannot be reached.
    pub async fn import_state(
        &self,
        key: &MailboxKey,
        state: &MailboxState,
    ) -> Result<bool, StoreError> {
        let snapshot = self.read(key).await?;
        if snapshot.version > 0 {
            return Ok(false);
        }
        let write = MailboxWrite {
            keep: true,
            ..MailboxWrite::default()
        };
        self.write(key, &snapshot, state, write).await
    }

    /// Returns whether the events stream contains any event.
    ///
    /// # Errors
    /// When Redis cannot be reached.
    pub async fn has_events(&self) -> Result<bool, StoreError> {
        let length: u64 = self.connection().xlen(self.key("events")).await?;
        Ok(length > 0)
    }

    /// Adds a delivery to the shared outbox unless it is there; returns
    /// how many were added (0 or 1).
    ///
    /// # Errors
    /// When Redis cannot be reached.
    pub async fn import_delivery(&self, entry: &OutboxEntry) -> Result<usize, StoreError> {
        self.queue_delivery(&mut self.connection(), &StoredDelivery::from_entry(entry))
            .await
    }

    fn outbox_key(&self, name: &str) -> String {
        // One hash tag keeps the items and their schedule in one slot.
        format!("{}outbox:{{outbox}}:{name}", self.prefix)
    }

    /// Adds a delivery to the shared outbox, due at once, unless it is
    /// there already; returns how many were added (0 or 1).
    async fn queue_delivery(
        &self,
        connection: &mut Connection,
        delivery: &StoredDelivery,
    ) -> Result<usize, StoreError> {
        let item = OutboxItem {
            delivery: delivery.clone(),
            attempts: 0,
            last_error: None,
        };
        // One script, so a delivery is queued once while its marker lasts
        // (7 days) and a retried move never resets an item's attempts.
        let added: i64 = self
            .queue
            .key(self.outbox_key(&format!("queued:{}", delivery.delivery_id)))
            .key(self.outbox_key("items"))
            .key(self.outbox_key("due"))
            .arg(&delivery.delivery_id)
            .arg(serde_json::to_string(&item)?)
            .arg(delivery.created.millis())
            .arg(duration_millis(QUEUED_MARKER_LIFETIME))
            .invoke_async(connection)
            .await?;
        Ok(usize::from(added == 1))
    }

    /// Returns up to `limit` outbox deliveries due at `now` that this host
    /// could lease for `lease`, the longest waiting first. Their `row` is
    /// -1: they are named by their delivery id. Another host takes an item
    /// over once its lease ends, so an attempt that outlasts it may be
    /// repeated, which the delivery id lets the receiver drop.
    ///
    /// # Errors
    /// When Redis cannot be reached or an item does not decode.
    pub async fn due_deliveries(
        &self,
        now: Timestamp,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<PendingDelivery>, StoreError> {
        let mut connection = self.connection();
        let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.outbox_key("due"))
            .arg("-inf")
            .arg(now.millis())
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut connection)
            .await?;
        let mut leased = Vec::with_capacity(due.len());
        for id in due {
            // A lease this host still holds is taken again: nothing of this
            // host's is in flight between batches, so such a lease is left
            // over from a batch that a Redis failure cut short.
            let held: i64 = self
                .lease
                .key(self.outbox_key(&format!("lease:{id}")))
                .arg(&self.host)
                .arg(duration_millis(lease))
                .invoke_async(&mut connection)
                .await?;
            if held == 0 {
                continue;
            }
            let text: Option<String> = connection.hget(self.outbox_key("items"), &id).await?;
            let Some(text) = text else {
                // Finished by another host after the range was read.
                let _: () = connection.zrem(self.outbox_key("due"), &id).await?;
                continue;
            };
            let item: OutboxItem = serde_json::from_str(&text)?;
            leased.push(PendingDelivery {
                row: -1,
                entry: item.delivery.into_entry()?,
                attempts: item.attempts,
            });
        }
        Ok(leased)
    }

    /// Returns when the next shared delivery is due, at least
    /// [`OUTBOX_RECHECK`] from now while due items are leased elsewhere.
    ///
    /// # Errors
    /// When Redis cannot be reached.
    pub async fn next_delivery_due(&self) -> Result<Option<Timestamp>, StoreError> {
        let first: Vec<(String, i64)> = self
            .connection()
            .zrange_withscores(self.outbox_key("due"), 0, 0)
            .await?;
        let soonest = self.now().saturating_add(OUTBOX_RECHECK);
        Ok(first.first().map(|(_, due)| Timestamp(*due).max(soonest)))
    }

    /// Removes a delivered or abandoned item and its lease.
    ///
    /// # Errors
    /// When Redis cannot be reached.
    pub async fn finish_delivery(&self, delivery_id: &str) -> Result<(), StoreError> {
        let mut connection = self.connection();
        let _: () = connection.zrem(self.outbox_key("due"), delivery_id).await?;
        let _: () = connection
            .hdel(self.outbox_key("items"), delivery_id)
            .await?;
        let _: () = connection
            .del(self.outbox_key(&format!("lease:{delivery_id}")))
            .await?;
        Ok(())
    }

    /// Schedules a failed item's next attempt and releases its lease.
    ///
    /// # Errors
    /// When Redis cannot be reached.
    pub async fn retry_delivery(
        &self,
        pending: &PendingDelivery,
        attempts: u32,
        next: Timestamp,
        error: &str,
    ) -> Result<(), StoreError> {
        let mut connection = self.connection();
        let id = &pending.entry.delivery_id;
        let item = OutboxItem {
            delivery: StoredDelivery::from_entry(&pending.entry),
            attempts,
            last_error: Some(error.to_string()),
        };
        let _: () = connection
            .hset(self.outbox_key("items"), id, serde_json::to_string(&item)?)
            .await?;
        let _: () = connection
            .zadd(self.outbox_key("due"), id, next.millis())
            .await?;
        let _: () = connection
            .del(self.outbox_key(&format!("lease:{id}")))
            .await?;
        Ok(())
    }

    /// Returns every shared delivery waiting, the next due first.
    ///
    /// # Errors
    /// When Redis cannot be reached or an item does not decode.
    pub async fn waiting_deliveries(&self) -> Result<Vec<super::outbox::Waiting>, StoreError> {
        let mut connection = self.connection();
        let due: Vec<(String, i64)> = connection
            .zrange_withscores(self.outbox_key("due"), 0, -1)
            .await?;
        let mut waiting = Vec::with_capacity(due.len());
        for (id, next) in due {
            let text: Option<String> = connection.hget(self.outbox_key("items"), &id).await?;
            let Some(text) = text else {
                continue;
            };
            let item: OutboxItem = serde_json::from_str(&text)?;
            waiting.push(super::outbox::Waiting {
                delivery: PendingDelivery {
                    row: -1,
                    entry: item.delivery.into_entry()?,
                    attempts: item.attempts,
                },
                next_attempt: Timestamp(next),
                last_error: item.last_error,
            });
        }
        Ok(waiting)
    }

    /// Returns the number of shared deliveries waiting.
    ///
    /// # Errors
    /// When Redis cannot be reached.
    pub async fn outbox_count(&self) -> Result<u64, StoreError> {
        let count: u64 = self.connection().zcard(self.outbox_key("due")).await?;
        Ok(count)
    }

    async fn index_end(&self, id: &str, state: &MailboxState) -> Result<(), StoreError> {
        let mut connection = self.connection();
        let ends = self.key("ends");
        match state.block.as_ref() {
            Some(block) if !block.end_recorded && block.until.is_some() => {
                let until = block.until.map_or(0, Timestamp::millis);
                let _: () = connection.zadd(ends, id, until).await?;
            }
            _ => {
                let _: () = connection.zrem(ends, id).await?;
            }
        }
        Ok(())
    }

    /// Finishes the pending work of mailboxes whose writer stopped between
    /// its write and the move; returns how many deliveries it queued.
    /// `all` takes every registered mailbox, as at start-up.
    ///
    /// # Errors
    /// When Redis cannot be reached.
    pub async fn sweep(&self, all: bool) -> Result<usize, StoreError> {
        let now = self.time().await?;
        let old = now.saturating_sub(DIRTY_AGE).millis();
        let members: Vec<(String, i64)> = self
            .connection()
            .zrange_withscores(self.key("dirty"), 0, -1)
            .await?;
        let mut queued = 0;
        for (id, score) in members {
            if !all && score > old {
                continue;
            }
            let moved = self.move_pending(&id).await?;
            if moved > 0 {
                tracing::warn!(mailbox = %id, deliveries = moved,
                    "queued deliveries that a host left pending when it stopped");
            }
            queued += moved;
            if score <= old {
                let _: i64 = self
                    .remove_if_score
                    .key(self.key("dirty"))
                    .arg(&id)
                    .arg(score)
                    .invoke_async(&mut self.connection())
                    .await?;
            }
        }
        Ok(queued)
    }

    async fn add_to_stream(
        &self,
        connection: &mut Connection,
        event: &StoredEvent,
    ) -> Result<(), StoreError> {
        let oldest = self.now().saturating_sub(self.events_keep).millis().max(0);
        let _: String = redis::cmd("XADD")
            .arg(self.key("events"))
            .arg("MINID")
            .arg("~")
            .arg(oldest)
            .arg("*")
            .arg("event")
            .arg(serde_json::to_string(event)?)
            .query_async(connection)
            .await?;
        Ok(())
    }

    /// Appends events to the shared stream.
    ///
    /// # Errors
    /// When Redis cannot be reached; events before the failing one stay.
    pub async fn append(&self, events: &[Event]) -> Result<(), StoreError> {
        let mut connection = self.connection();
        for event in events {
            self.add_to_stream(&mut connection, &StoredEvent::from_event(event))
                .await?;
        }
        Ok(())
    }

    /// Records a refused sender once per mailbox, lockout level and minute
    /// across all hosts.
    ///
    /// # Errors
    /// When Redis cannot be reached.
    pub async fn record_refusal(&self, event: &Event) -> Result<(), StoreError> {
        let (minute, level) = super::sqlite::refusal_minute_and_level(event);
        let marker = self.key(&format!(
            "refused:{{{}}}:{minute}:{level}",
            key_id(&MailboxKey {
                mailbox: event.mailbox.clone().unwrap_or_default(),
                client: event.key_client.as_deref().and_then(|c| c.parse().ok()),
            })
        ));
        let mut connection = self.connection();
        // The marker outlives its minute, so a refusal at the minute's end
        // on a host whose clock differs a little still finds it.
        let first: Option<String> = redis::cmd("SET")
            .arg(&marker)
            .arg(&self.host)
            .arg("NX")
            .arg("PX")
            .arg(120_000)
            .query_async(&mut connection)
            .await?;
        if first.is_some() {
            // NOTE: later refusals of the same minute are not added to the
            // event's `count` field, as they are with SQLite.
            self.add_to_stream(&mut connection, &StoredEvent::from_event(event))
                .await?;
        }
        Ok(())
    }

    /// Reads events in stream order that match `filter`.
    ///
    /// # Errors
    /// When Redis cannot be reached or an entry does not decode.
    pub async fn query_events(&self, filter: &EventFilter) -> Result<Vec<Event>, StoreError> {
        let mut connection = self.connection();
        let mut start = match (filter.after, filter.since) {
            (Some(after), _) => format!("({}", stream_id_from_cursor(after)),
            // An entry's id is Redis's time when it was appended, never
            // before its event's time except for events a host dated by a
            // clock running ahead, so a day of margin keeps them.
            (None, Some(since)) => {
                let from = since.saturating_sub(SINCE_MARGIN).millis().max(0);
                format!("{from}-0")
            }
            (None, None) => "-".to_string(),
        };
        let limit = filter.limit.unwrap_or(usize::MAX);
        let mut events = Vec::new();
        loop {
            let batch: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                .arg(self.key("events"))
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(READ_BATCH)
                .query_async(&mut connection)
                .await?;
            let full = batch.len() == READ_BATCH;
            for (id, fields) in batch {
                start = format!("({id}");
                let Some((_, text)) = fields.into_iter().find(|(name, _)| name == "event") else {
                    continue;
                };
                let stored: StoredEvent = serde_json::from_str(&text)?;
                let event = stored.into_event(Some(cursor_from_stream_id(&id)?))?;
                if matches_filter(&event, filter) {
                    events.push(event);
                    if events.len() >= limit {
                        return Ok(events);
                    }
                }
            }
            if !full {
                return Ok(events);
            }
        }
    }

    /// Deletes events older than `before` from the stream.
    ///
    /// # Errors
    /// When Redis cannot be reached.
    pub async fn delete_events_before(&self, before: Timestamp) -> Result<usize, StoreError> {
        let deleted: usize = redis::cmd("XTRIM")
            .arg(self.key("events"))
            .arg("MINID")
            .arg(before.millis().max(0))
            .query_async(&mut self.connection())
            .await?;
        Ok(deleted)
    }

    /// Returns the mailboxes whose last timed lockout ended at or before
    /// `ended_before`, with its end recorded: the candidates for
    /// forgiveness. Reads every mailbox.
    ///
    /// # Errors
    /// When Redis cannot be reached or a state does not decode.
    pub async fn quiet_since(
        &self,
        ended_before: Timestamp,
    ) -> Result<Vec<MailboxKey>, StoreError> {
        let states = self.all_states().await?;
        Ok(states
            .into_iter()
            .filter(|(_, state)| {
                state.block.as_ref().is_some_and(|block| {
                    block.end_recorded && block.until.is_some_and(|until| until <= ended_before)
                })
            })
            .map(|(key, _)| key)
            .collect())
    }

    async fn all_states(&self) -> Result<Vec<(MailboxKey, MailboxState)>, StoreError> {
        let ids: Vec<String> = self.connection().smembers(self.key("mailboxes")).await?;
        let mut states = Vec::with_capacity(ids.len());
        for id in ids {
            let (version, state, _) = self.read_hash(&id).await?;
            if version > 0 {
                states.push((parse_id(&id), state));
            }
        }
        states.sort_by(|a, b| {
            (a.0.mailbox.as_str(), a.0.client).cmp(&(b.0.mailbox.as_str(), b.0.client))
        });
        Ok(states)
    }

    /// Returns every mailbox with a lockout in force at `now`.
    ///
    /// # Errors
    /// When Redis cannot be reached or a state does not decode.
    pub async fn active_blocks(
        &self,
        now: Timestamp,
    ) -> Result<Vec<(MailboxKey, MailboxState)>, StoreError> {
        let mut states = self.all_states().await?;
        states.retain(|(_, state)| state.active_block(now).is_some());
        Ok(states)
    }

    /// Returns every stored state of a mailbox, under any client address.
    ///
    /// # Errors
    /// When Redis cannot be reached or a state does not decode.
    pub async fn mailbox_states(
        &self,
        mailbox: &str,
    ) -> Result<Vec<(MailboxKey, MailboxState)>, StoreError> {
        let mut states = self.all_states().await?;
        states.retain(|(key, _)| key.mailbox == mailbox);
        Ok(states)
    }

    /// Returns the mailboxes whose timed lockout ended by `now` with its
    /// end not yet recorded.
    ///
    /// # Errors
    /// When Redis cannot be reached.
    pub async fn due_ends(&self, now: Timestamp) -> Result<Vec<MailboxKey>, StoreError> {
        let ids: Vec<String> = self
            .connection()
            .zrangebyscore(self.key("ends"), "-inf", now.millis())
            .await?;
        Ok(ids.iter().map(|id| parse_id(id)).collect())
    }

    /// Returns the earliest unrecorded end of a timed lockout.
    ///
    /// # Errors
    /// When Redis cannot be reached.
    pub async fn next_pending_end(&self) -> Result<Option<Timestamp>, StoreError> {
        let first: Vec<(String, i64)> = self
            .connection()
            .zrange_withscores(self.key("ends"), 0, 0)
            .await?;
        Ok(first.first().map(|(_, until)| Timestamp(*until)))
    }

    /// Takes or renews the lease `name` for `length`; returns whether this
    /// host holds it.
    ///
    /// # Errors
    /// When Redis cannot be reached.
    pub async fn hold_lease(&self, name: &str, length: Duration) -> Result<bool, StoreError> {
        let held: i64 = self
            .lease
            .key(self.key(&format!("lease:{name}")))
            .arg(&self.host)
            .arg(duration_millis(length))
            .invoke_async(&mut self.connection())
            .await?;
        Ok(held == 1)
    }

    /// Sends every change other hosts announce to `changes` until the
    /// receiver is dropped, resubscribing after a lost connection. Each
    /// (re)subscription first sends [`Invalidation::All`].
    pub async fn run_subscription(&self, changes: mpsc::UnboundedSender<Invalidation>) {
        use futures_util::StreamExt;
        const RETRY: Duration = Duration::from_secs(1);
        let channel = self.key("changes");
        let mut failures = 0u64;
        let mut attempt = 0usize;
        loop {
            let url = self.pubsub_urls[attempt % self.pubsub_urls.len().max(1)].as_str();
            attempt += 1;
            let subscribed = async {
                let client = redis::Client::open(url)?;
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            }
            .await;
            let pubsub = match subscribed {
                Ok(pubsub) => pubsub,
                Err(error) => {
                    failures += 1;
                    // Logged on the first failure and then once a minute.
                    if failures == 1 || failures.is_multiple_of(60) {
                        tracing::warn!(%error, failures, url,
                            "cannot subscribe to mailbox changes; retrying every second");
                    }
                    tokio::time::sleep(RETRY).await;
                    if changes.is_closed() {
                        return;
                    }
                    continue;
                }
            };
            failures = 0;
            tracing::info!(
                channel,
                url,
                "subscribed to mailbox changes; dropping cached states"
            );
            if changes.send(Invalidation::All).is_err() {
                return;
            }
            let mut messages = pubsub.into_on_message();
            while let Some(message) = messages.next().await {
                let Ok(payload) = message.get_payload::<String>() else {
                    continue;
                };
                let Ok(value) = serde_json::from_str::<Value>(&payload) else {
                    tracing::warn!(payload, "ignoring an undecodable mailbox change message");
                    continue;
                };
                if value["host"].as_str() == Some(self.host.as_str()) {
                    continue;
                }
                if value["exemptions"] == Value::Bool(true) {
                    if changes.send(Invalidation::Exemptions).is_err() {
                        return;
                    }
                    continue;
                }
                if let Some(notices) = value.get("notices") {
                    match serde_json::from_value(notices.clone()) {
                        Ok(notices) => {
                            if changes.send(Invalidation::Notices(notices)).is_err() {
                                return;
                            }
                        }
                        Err(error) => {
                            tracing::warn!(%error, "ignoring undecodable subnet notices from another host");
                        }
                    }
                    continue;
                }
                if value["device_statuses"] == Value::Bool(true) {
                    if changes.send(Invalidation::DeviceStatuses).is_err() {
                        return;
                    }
                    continue;
                }
                if value["devices"] == Value::Bool(true) {
                    if changes.send(Invalidation::DeviceSettings).is_err() {
                        return;
                    }
                    continue;
                }
                let Some(id) = value["id"].as_str() else {
                    continue;
                };
                if changes.send(Invalidation::Mailbox(parse_id(id))).is_err() {
                    return;
                }
            }
            tracing::warn!(
                channel,
                "subscription to mailbox changes lost; resubscribing"
            );
            tokio::time::sleep(RETRY).await;
        }
    }
}

/// Returns the text that names a mailbox key inside Redis keys and
/// messages: the mailbox, then the client address after a unit separator
/// under `client-and-sender`.
pub fn key_id(key: &MailboxKey) -> String {
    match key.client {
        None => key.mailbox.clone(),
        Some(client) => format!("{}\u{1f}{client}", key.mailbox),
    }
}

/// Reverses [`key_id`].
pub fn parse_id(id: &str) -> MailboxKey {
    match id.split_once('\u{1f}') {
        Some((mailbox, client)) => MailboxKey {
            mailbox: mailbox.to_string(),
            client: client.parse::<IpAddr>().ok(),
        },
        None => MailboxKey {
            mailbox: id.to_string(),
            client: None,
        },
    }
}

/// Stream ids (`MILLIS-SEQUENCE`) become event ids as
/// `MILLIS × 1 000 000 + SEQUENCE`, which keeps their order in an `i64`.
const SEQUENCES_PER_MILLI: i64 = 1_000_000;

fn cursor_from_stream_id(id: &str) -> Result<i64, StoreError> {
    let corrupt = || StoreError::Corrupt(format!("invalid stream entry id {id:?}"));
    let (millis, sequence) = id.split_once('-').ok_or_else(corrupt)?;
    let millis: i64 = millis.parse().map_err(|_| corrupt())?;
    let sequence: i64 = sequence.parse().map_err(|_| corrupt())?;
    // NOTE: more than a million events within one millisecond would break
    // the order of the ids; Redis appends far fewer.
    Ok(millis * SEQUENCES_PER_MILLI + sequence.min(SEQUENCES_PER_MILLI - 1))
}

/// Returns the time an event with id `cursor` reached the stream: the
/// millisecond part of its stream entry id.
pub fn stream_time(cursor: i64) -> Timestamp {
    Timestamp(cursor.div_euclid(SEQUENCES_PER_MILLI))
}

fn stream_id_from_cursor(cursor: i64) -> String {
    format!(
        "{}-{}",
        cursor.div_euclid(SEQUENCES_PER_MILLI),
        cursor.rem_euclid(SEQUENCES_PER_MILLI)
    )
}

fn matches_filter(event: &Event, filter: &EventFilter) -> bool {
    if filter.since.is_some_and(|since| event.time < since) {
        return false;
    }
    if filter.until.is_some_and(|until| event.time >= until) {
        return false;
    }
    if let Some(mailbox) = &filter.mailbox
        && event.mailbox.as_ref() != Some(mailbox)
    {
        return false;
    }
    if filter.kind.is_some_and(|kind| event.kind != kind) {
        return false;
    }
    if let Some(device) = &filter.device {
        let names_device = event.details.get("device").and_then(Value::as_str) == Some(device);
        let owner_mailbox = event
            .mailbox
            .as_ref()
            .is_some_and(|mailbox| filter.device_mailboxes.contains(mailbox));
        if !names_device && !owner_mailbox {
            return false;
        }
    }
    true
}

fn duration_millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "host".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_round_trip() {
        let plain = MailboxKey::mailbox("ann@example.org");
        assert_eq!(parse_id(&key_id(&plain)), plain);
        let with_client = MailboxKey {
            mailbox: "ann@example.org".to_string(),
            client: Some("2001:db8::1".parse().expect("address")),
        };
        assert_eq!(parse_id(&key_id(&with_client)), with_client);
    }

    #[test]
    fn stream_cursor_round_trip() {
        let cursor = cursor_from_stream_id("1764900000123-7").expect("valid id");
        assert_eq!(cursor, 1_764_900_000_123_000_007);
        assert_eq!(stream_id_from_cursor(cursor), "1764900000123-7");
    }

    #[test]
    fn stream_cursor_keeps_order() {
        let earlier = cursor_from_stream_id("1764900000123-999").expect("valid id");
        let later = cursor_from_stream_id("1764900000124-0").expect("valid id");
        assert!(earlier < later);
    }
}
