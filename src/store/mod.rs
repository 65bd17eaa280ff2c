//! Durable state: mailbox strikes and lockouts, and the events report.
//!
//! The embedded store is SQLite in WAL mode. All its writes run on one
//! dedicated thread, off the async workers, and each call returns only
//! after its transaction committed, so a reply that depends on a strike is
//! sent only once the strike is on disk.
//!
//! With `[store] backend = "redis"`, mailbox states, their events, the
//! lockout-end index, the lockouts' deliveries, exemptions and device
//! settings live in Redis, shared by every relay host (see [`redis`]). The
//! SQLite file keeps this host's device health and subnet notices, and the
//! strikes it counted while Redis was down. [`Store`] hides which backend
//! stores what.

pub mod devices;
pub mod exemptions;
pub mod fallback;
pub mod migrate;
pub mod outbox;
pub mod redis;
pub mod sqlite;

pub use sqlite::{EventFilter, EventPage, EventPosition};

use crate::actions::{OutboxEntry, PendingDelivery};
use crate::config::{Backend, OnStoreError, StoreConfig};
use crate::events::Event;
use crate::identity::MailboxKey;
use crate::policy::{MailboxState, Strike, Timestamp};
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;
use tokio::sync::oneshot;

/// Reads and writes of one mailbox tried before a conflict with other
/// hosts' writes is reported as a failure.
const MAX_UPDATE_ATTEMPTS: usize = 64;

/// A failure of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open store {path}: {message}")]
    Open { path: String, message: String },
    #[error("store query failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store holds data that does not decode: {0}")]
    Json(#[from] serde_json::Error),
    #[error("store holds invalid data: {0}")]
    Corrupt(String),
    #[error("store thread has stopped")]
    Stopped,
    #[error("Redis command failed: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("mailbox state kept changing; gave up after {attempts} attempts to write it")]
    Conflict { attempts: usize },
}

/// The events and deliveries written with a mailbox's new state.
#[derive(Debug, Clone, Default)]
pub struct MailboxWrite {
    /// False when the state contains nothing worth keeping.
    pub keep: bool,
    pub events: Vec<Event>,
    pub deliveries: Vec<OutboxEntry>,
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// Handle to the SQLite store thread; cheap to clone.
#[derive(Clone)]
pub struct Local {
    jobs: mpsc::Sender<Job>,
    path: PathBuf,
}

impl Local {
    /// Opens the database and starts the store thread.
    ///
    /// # Errors
    /// When the database cannot be opened or its schema created.
    pub fn open(path: &Path) -> Result<Local, StoreError> {
        let mut connection = sqlite::open(path)?;
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("sendguard-store".to_string())
            .spawn(move || {
                for job in queue {
                    job(&mut connection);
                }
            })
            .map_err(|error| StoreError::Open {
                path: path.display().to_string(),
                message: format!("cannot start the store thread: {error}"),
            })?;
        Ok(Local {
            jobs,
            path: path.to_path_buf(),
        })
    }

    /// Runs `work` on the store thread and waits for its result.
    ///
    /// # Errors
    /// [`StoreError::Stopped`] when the thread is gone, or what `work` returns.
    pub async fn call<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, result) = oneshot::channel();
        let job: Job = Box::new(move |connection| {
            let _ = reply.send(work(connection));
        });
        self.jobs.send(job).map_err(|_| StoreError::Stopped)?;
        result.await.map_err(|_| StoreError::Stopped)?
    }
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    local: Local,
    shared: Option<Arc<redis::RedisStore>>,
    on_error: OnStoreError,
    /// Decisions made with the local SQLite store because Redis failed.
    local_decisions: prometheus_client::metrics::counter::Counter,
}

impl Store {
    /// Opens a SQLite store.
    ///
    /// # Errors
    /// When the database cannot be opened or its schema created.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Ok(Store {
            local: Local::open(path)?,
            shared: None,
            on_error: OnStoreError::Tempfail,
            local_decisions: Default::default(),
        })
    }

    /// Opens the store `config` names: SQLite alone, or Redis with this
    /// host's SQLite file. Redis is connected on first use, so this
    /// succeeds while Redis is down. `events_keep` is the stream's
    /// retention.
    ///
    /// # Errors
    /// When the database cannot be opened or a Redis URL is invalid.
    pub fn from_config(config: &StoreConfig, events_keep: Duration) -> Result<Store, StoreError> {
        let local = Local::open(&config.path)?;
        let shared = match config.backend {
            Backend::Sqlite => None,
            Backend::Redis => Some(Arc::new(redis::RedisStore::open(config, events_keep)?)),
        };
        Ok(Store {
            local,
            shared,
            on_error: config.on_store_error,
            local_decisions: Default::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.local.path
    }

    /// Returns the shared Redis store, when that is the backend.
    pub fn shared(&self) -> Option<&Arc<redis::RedisStore>> {
        self.shared.as_ref()
    }

    /// Returns the counter of decisions made with this host's SQLite store
    /// because Redis failed, for the metrics.
    pub fn local_decisions(&self) -> prometheus_client::metrics::counter::Counter {
        self.local_decisions.clone()
    }

    /// Returns whether a failure of Redis lets this host decide with its
    /// own SQLite store.
    fn falls_back(&self, error: &StoreError) -> bool {
        self.on_error == OnStoreError::Local && matches!(error, StoreError::Redis(_))
    }

    /// Returns the store's clock: Redis's time with the Redis backend
    /// (measured at each read), else this host's.
    pub fn now(&self) -> Timestamp {
        match &self.shared {
            Some(shared) => shared.now(),
            None => Timestamp::now(),
        }
    }

    /// Runs `work` on the SQLite thread and waits for its result.
    ///
    /// # Errors
    /// [`StoreError::Stopped`] when the thread is gone, or what `work` returns.
    pub async fn call<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.local.call(work).await
    }

    /// Reads a mailbox, lets `apply` change it at the store's time, and
    /// writes the result with `apply`'s events and deliveries when `apply`
    /// returns a [`MailboxWrite`]. With Redis, a write that finds the
    /// mailbox changed since the read starts over with the new state, so
    /// `apply` may run several times and must decide from its arguments
    /// only. Returns `apply`'s value and the state as stored.
    ///
    /// Within one process, callers serialise updates of one mailbox (the
    /// Guard's cache shard lock); SQLite relies on that.
    ///
    /// # Errors
    /// On a store failure, or [`StoreError::Conflict`] when Redis kept
    /// changing under the update; nothing is written then.
    pub async fn update_mailbox<T, F>(
        &self,
        key: &MailboxKey,
        mut apply: F,
    ) -> Result<(T, MailboxState), StoreError>
    where
        F: FnMut(&mut MailboxState, Timestamp) -> (T, Option<MailboxWrite>),
    {
        let Some(shared) = &self.shared else {
            return self.update_local(key, apply, None).await;
        };
        let mut attempts = 0;
        loop {
            attempts += 1;
            let snapshot = shared.read(key).await?;
            let mut state = snapshot.state.clone();
            let (value, write) = apply(&mut state, snapshot.now);
            let Some(write) = write else {
                return Ok((value, state));
            };
            if shared.write(key, &snapshot, &state, write).await? {
                return Ok((value, state));
            }
            tracing::debug!(mailbox = %key, attempts, "mailbox changed by another host; reading it again");
            if attempts >= MAX_UPDATE_ATTEMPTS {
                return Err(StoreError::Conflict { attempts });
            }
        }
    }

    /// Updates a mailbox like [`Store::update_mailbox`] for a bad message's
    /// `strike`. When Redis fails and `on_store_error = "local"`, the update
    /// runs on this host's SQLite store instead, and the strike is kept for
    /// the merge into Redis. The third value is then true.
    ///
    /// # Errors
    /// As [`Store::update_mailbox`], and on a SQLite failure in fallback.
    pub async fn update_mailbox_for_strike<T, F>(
        &self,
        key: &MailboxKey,
        strike: &Strike,
        mut apply: F,
    ) -> Result<(T, MailboxState, bool), StoreError>
    where
        F: FnMut(&mut MailboxState, Timestamp) -> (T, Option<MailboxWrite>),
    {
        match self.update_mailbox(key, &mut apply).await {
            Ok((value, state)) => Ok((value, state, false)),
            Err(error) if self.falls_back(&error) => {
                self.local_decisions.inc();
                tracing::error!(%error, mailbox = %key, transaction = %strike.message_id,
                    "Redis store failed; counting this strike in the host's own SQLite store \
                     (on_store_error = local) until Redis is back");
                let (value, state) = self.update_local(key, apply, Some(strike.clone())).await?;
                Ok((value, state, true))
            }
            Err(error) => Err(error),
        }
    }

    /// Runs [`Store::update_mailbox`] on SQLite. `fallback` is a strike to
    /// keep for the merge into Redis, in the same transaction.
    async fn update_local<T, F>(
        &self,
        key: &MailboxKey,
        mut apply: F,
        fallback: Option<Strike>,
    ) -> Result<(T, MailboxState), StoreError>
    where
        F: FnMut(&mut MailboxState, Timestamp) -> (T, Option<MailboxWrite>),
    {
        let now = Timestamp::now();
        let mut state = self.load_local(key.clone()).await?.unwrap_or_default();
        let (value, write) = apply(&mut state, now);
        if let Some(write) = write {
            let key = key.clone();
            let stored = state.clone();
            self.call(move |connection| {
                let transaction = connection.transaction()?;
                sqlite::save_mailbox(&transaction, &key, &stored, write.keep, now)?;
                for event in &write.events {
                    sqlite::insert_event(&transaction, event)?;
                }
                for entry in &write.deliveries {
                    outbox::insert(&transaction, entry)?;
                }
                if let Some(strike) = &fallback {
                    fallback::insert(&transaction, &key, strike)?;
                }
                transaction.commit()?;
                Ok(())
            })
            .await?;
        }
        Ok((value, state))
    }

    async fn load_local(&self, key: MailboxKey) -> Result<Option<MailboxState>, StoreError> {
        self.call(move |connection| sqlite::load_mailbox(connection, &key))
            .await
    }

    /// Reads one mailbox's state.
    ///
    /// # Errors
    /// On a database failure.
    pub async fn load_mailbox(&self, key: MailboxKey) -> Result<Option<MailboxState>, StoreError> {
        let Some(shared) = &self.shared else {
            return self.load_local(key).await;
        };
        match shared.load_mailbox(&key).await {
            Err(error) if self.falls_back(&error) => {
                self.local_decisions.inc();
                tracing::error!(%error, mailbox = %key,
                    "Redis store failed; reading the host's own SQLite state (on_store_error = local)");
                self.load_local(key).await
            }
            result => result,
        }
    }

    /// Returns up to `limit` outbox deliveries due at `now`: this host's
    /// own, and with Redis the shared ones this host could lease for
    /// `lease`, the longest one attempt may take.
    ///
    /// # Errors
    /// On a store failure.
    pub async fn due_deliveries(
        &self,
        now: Timestamp,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<PendingDelivery>, StoreError> {
        let mut due = self
            .call(move |connection| outbox::due(connection, now, limit))
            .await?;
        if let Some(shared) = &self.shared {
            let room = limit.saturating_sub(due.len());
            due.extend(shared.due_deliveries(now, room, lease).await?);
        }
        Ok(due)
    }

    /// Returns when the next outbox delivery is due.
    ///
    /// # Errors
    /// On a store failure.
    pub async fn next_delivery_due(&self) -> Result<Option<Timestamp>, StoreError> {
        let local = self.call(|connection| outbox::next_due(connection)).await?;
        let Some(shared) = &self.shared else {
            return Ok(local);
        };
        let shared = shared.next_delivery_due().await?;
        Ok(match (local, shared) {
            (Some(local), Some(shared)) => Some(local.min(shared)),
            (local, shared) => local.or(shared),
        })
    }

    /// Removes a delivered or abandoned delivery and records its event.
    ///
    /// # Errors
    /// On a store failure.
    pub async fn finish_delivery(
        &self,
        pending: &PendingDelivery,
        event: Event,
    ) -> Result<(), StoreError> {
        let row = pending.row;
        let Some(shared) = &self.shared else {
            return self
                .call(move |connection| outbox::finish(connection, row, Some(&event)))
                .await;
        };
        if row < 0 {
            shared.finish_delivery(&pending.entry.delivery_id).await?;
        } else {
            self.call(move |connection| outbox::finish(connection, row, None))
                .await?;
        }
        self.append(vec![event]).await
    }

    /// Schedules a failed delivery's next attempt and records its event.
    ///
    /// # Errors
    /// On a store failure.
    pub async fn retry_delivery(
        &self,
        pending: &PendingDelivery,
        attempts: u32,
        next: Timestamp,
        error: String,
        event: Event,
    ) -> Result<(), StoreError> {
        let row = pending.row;
        let Some(shared) = &self.shared else {
            return self
                .call(move |connection| {
                    outbox::reschedule(connection, row, attempts, next, &error, Some(&event))
                })
                .await;
        };
        if row < 0 {
            shared
                .retry_delivery(pending, attempts, next, &error)
                .await?;
        } else {
            self.call(move |connection| {
                outbox::reschedule(connection, row, attempts, next, &error, None)
            })
            .await?;
        }
        self.append(vec![event]).await
    }

    /// Returns the number of deliveries waiting, this host's and shared.
    ///
    /// # Errors
    /// On a store failure.
    pub async fn outbox_count(&self) -> Result<u64, StoreError> {
        let local = self.call(|connection| outbox::count(connection)).await?;
        match &self.shared {
            Some(shared) => Ok(local + shared.outbox_count().await?),
            None => Ok(local),
        }
    }

    /// Appends events that change no mailbox state.
    ///
    /// # Errors
    /// On a database failure.
    pub async fn append(&self, events: Vec<Event>) -> Result<(), StoreError> {
        if let Some(shared) = &self.shared {
            match shared.append(&events).await {
                Err(error) if self.falls_back(&error) => {
                    tracing::error!(%error, events = events.len(),
                        "Redis store failed; keeping events in the host's own SQLite store");
                }
                result => return result,
            }
        }
        self.call(move |connection| {
            let transaction = connection.transaction()?;
            for event in &events {
                sqlite::insert_event(&transaction, event)?;
            }
            transaction.commit()?;
            Ok(())
        })
        .await
    }

    /// Records a refused sender, aggregated per mailbox and minute.
    ///
    /// # Errors
    /// On a database failure.
    pub async fn record_refusal(&self, event: Event) -> Result<(), StoreError> {
        if let Some(shared) = &self.shared {
            match shared.record_refusal(&event).await {
                Err(error) if self.falls_back(&error) => {
                    tracing::error!(%error, mailbox = event.mailbox.as_deref().unwrap_or("-"),
                        "Redis store failed; keeping the refusal in the host's own SQLite store");
                }
                result => return result,
            }
        }
        self.call(move |connection| sqlite::insert_refusal(connection, &event))
            .await
    }

    /// Returns the earliest unrecorded end of a timed lockout.
    ///
    /// # Errors
    /// On a database failure.
    pub async fn next_pending_end(&self) -> Result<Option<Timestamp>, StoreError> {
        if let Some(shared) = &self.shared {
            return shared.next_pending_end().await;
        }
        self.call(|connection| sqlite::next_pending_end(connection))
            .await
    }

    /// Returns the mailboxes whose lockout ended by `now` without its end
    /// recorded.
    ///
    /// # Errors
    /// On a database failure.
    pub async fn due_ends(&self, now: Timestamp) -> Result<Vec<MailboxKey>, StoreError> {
        if let Some(shared) = &self.shared {
            return shared.due_ends(now).await;
        }
        self.call(move |connection| sqlite::due_ends(connection, now))
            .await
    }

    /// Reads events in order that match `filter`.
    ///
    /// # Errors
    /// On a store failure or an event that does not decode.
    pub async fn query_events(&self, filter: EventFilter) -> Result<Vec<Event>, StoreError> {
        if let Some(shared) = &self.shared {
            return shared.query_events(&filter).await;
        }
        self.call(move |connection| sqlite::query_events(connection, &filter))
            .await
    }

    /// Reads one bounded page of events for a long sequential read, and
    /// returns it with the position to pass as `after` for the next page,
    /// or `None` after the last page.
    ///
    /// SQLite returns the events in time order. Redis returns them in the
    /// order they reached its stream, which is time order except for events
    /// a host stored late (see [`Store::events_in_time_order`]).
    ///
    /// NOTE: with Redis, `until` filters the events but does not end the
    /// read, so the last page of a read that ends before the newest event
    /// scans the rest of the stream (in batches, so memory stays bounded).
    ///
    /// # Errors
    /// On a store failure or an event that does not decode.
    pub async fn events_page(
        &self,
        page: EventPage,
    ) -> Result<(Vec<Event>, Option<EventPosition>), StoreError> {
        let limit = page.limit.max(1);
        let mut events = match &self.shared {
            Some(shared) => {
                let filter = EventFilter {
                    since: page.since,
                    until: page.until,
                    after: page.after.map(|after| after.id),
                    limit: Some(limit),
                    ..EventFilter::default()
                };
                shared.query_events(&filter).await?
            }
            None => {
                let page = EventPage {
                    limit,
                    ..page.clone()
                };
                self.call(move |connection| sqlite::events_page(connection, &page))
                    .await?
            }
        };
        let next = match events.last() {
            Some(last) if events.len() >= limit => Some(EventPosition {
                time: last.time,
                id: last.id.unwrap_or_default(),
            }),
            _ => None,
        };
        if !page.kinds.is_empty() {
            events.retain(|event| page.kinds.contains(&event.kind));
        }
        Ok((events, next))
    }

    /// Returns whether [`Store::events_page`] returns events in time order:
    /// true with SQLite, false with Redis.
    pub fn events_in_time_order(&self) -> bool {
        self.shared.is_none()
    }

    /// Returns every mailbox with a lockout in force at `now`.
    ///
    /// # Errors
    /// On a store failure or a state that does not decode.
    pub async fn active_blocks(
        &self,
        now: Timestamp,
    ) -> Result<Vec<(MailboxKey, MailboxState)>, StoreError> {
        if let Some(shared) = &self.shared {
            return shared.active_blocks(now).await;
        }
        self.call(move |connection| sqlite::active_blocks(connection, now))
            .await
    }

    /// Returns every stored state of a mailbox, under any client address.
    ///
    /// # Errors
    /// On a store failure or a state that does not decode.
    pub async fn mailbox_states(
        &self,
        mailbox: String,
    ) -> Result<Vec<(MailboxKey, MailboxState)>, StoreError> {
        if let Some(shared) = &self.shared {
            return shared.mailbox_states(&mailbox).await;
        }
        self.call(move |connection| sqlite::mailbox_states(connection, &mailbox))
            .await
    }

    /// Deletes events older than `before`, in batches of `batch` on
    /// SQLite; returns how many went.
    ///
    /// # Errors
    /// On a store failure.
    pub async fn delete_events_before(
        &self,
        before: Timestamp,
        batch: usize,
    ) -> Result<usize, StoreError> {
        if let Some(shared) = &self.shared {
            return shared.delete_events_before(before).await;
        }
        self.call(move |connection| sqlite::delete_events_before(connection, before, batch))
            .await
    }

    /// Returns the mailboxes whose last timed lockout ended at or before
    /// `ended_before`: the candidates for forgiveness.
    ///
    /// # Errors
    /// On a store failure.
    pub async fn quiet_since(
        &self,
        ended_before: Timestamp,
    ) -> Result<Vec<MailboxKey>, StoreError> {
        if let Some(shared) = &self.shared {
            return shared.quiet_since(ended_before).await;
        }
        self.call(move |connection| sqlite::quiet_since(connection, ended_before))
            .await
    }

    /// Adds an exemption and records `exemption_added`.
    ///
    /// # Errors
    /// On a store failure; nothing is written then with SQLite.
    pub async fn add_exemption(
        &self,
        new: exemptions::NewExemption,
    ) -> Result<crate::policy::Exemption, StoreError> {
        if let Some(shared) = &self.shared {
            return shared.add_exemption(new).await;
        }
        self.call(move |connection| exemptions::add(connection, new))
            .await
    }

    /// Removes an exemption in force, recording `exemption_removed`;
    /// returns `None` when no exemption with this id is in force.
    ///
    /// # Errors
    /// On a store failure.
    pub async fn remove_exemption(
        &self,
        id: i64,
        by: String,
        now: Timestamp,
    ) -> Result<Option<crate::policy::Exemption>, StoreError> {
        if let Some(shared) = &self.shared {
            return shared.remove_exemption(id, &by, now).await;
        }
        self.call(move |connection| exemptions::remove(connection, id, &by, now))
            .await
    }

    /// Returns the exemptions in force at `now`.
    ///
    /// # Errors
    /// On a store failure.
    pub async fn active_exemptions(
        &self,
        now: Timestamp,
    ) -> Result<Vec<crate::policy::Exemption>, StoreError> {
        if let Some(shared) = &self.shared {
            return shared.active_exemptions(now).await;
        }
        self.call(move |connection| exemptions::active(connection, now))
            .await
    }

    /// Returns every exemption ever added, the newest first.
    ///
    /// # Errors
    /// On a store failure.
    pub async fn all_exemptions(&self) -> Result<Vec<exemptions::ListedExemption>, StoreError> {
        if let Some(shared) = &self.shared {
            return shared.all_exemptions().await;
        }
        self.call(|connection| exemptions::all(connection)).await
    }

    /// Records `exemption_expired` for every exemption that ended by `now`,
    /// once each; returns how many.
    ///
    /// # Errors
    /// On a store failure.
    pub async fn record_exemption_expiries(&self, now: Timestamp) -> Result<usize, StoreError> {
        if let Some(shared) = &self.shared {
            return shared.record_exemption_expiries(now).await;
        }
        self.call(move |connection| exemptions::record_expiries(connection, now))
            .await
    }

    /// Returns the device settings changed through the API.
    ///
    /// # Errors
    /// On a store failure.
    pub async fn device_settings(&self) -> Result<Vec<devices::SettingRow>, StoreError> {
        if let Some(shared) = &self.shared {
            return shared.device_settings().await;
        }
        self.call(|connection| devices::settings(connection)).await
    }

    /// Stores a device setting (removed when its value is null) with its
    /// event.
    ///
    /// # Errors
    /// On a store failure.
    pub async fn save_device_setting(
        &self,
        row: devices::SettingRow,
        event: Event,
    ) -> Result<(), StoreError> {
        if let Some(shared) = &self.shared {
            return shared.save_device_setting(&row, &event).await;
        }
        self.call(move |connection| devices::save_setting(connection, &row, &event))
            .await
    }

    /// Returns the device exclusions added and lifted through the API.
    ///
    /// # Errors
    /// On a store failure.
    pub async fn device_exclusions(&self) -> Result<Vec<devices::ExclusionRow>, StoreError> {
        if let Some(shared) = &self.shared {
            return shared.device_exclusions().await;
        }
        self.call(|connection| devices::exclusions(connection))
            .await
    }

    /// Stores an added or lifted device exclusion with its event; returns
    /// false when the device already has one.
    ///
    /// # Errors
    /// On a store failure.
    pub async fn add_device_exclusion(
        &self,
        row: devices::ExclusionRow,
        event: Event,
    ) -> Result<bool, StoreError> {
        if let Some(shared) = &self.shared {
            return shared.add_device_exclusion(&row, &event).await;
        }
        self.call(move |connection| devices::add_exclusion(connection, &row, &event))
            .await
    }

    /// Removes an added or lifted device exclusion with the event
    /// `event_for` builds from the removed row; returns that row.
    ///
    /// # Errors
    /// On a store failure.
    pub async fn remove_device_exclusion(
        &self,
        device: String,
        event_for: impl FnOnce(&devices::ExclusionRow) -> Event + Send + 'static,
    ) -> Result<Option<devices::ExclusionRow>, StoreError> {
        if let Some(shared) = &self.shared {
            return shared.remove_device_exclusion(&device, event_for).await;
        }
        self.call(move |connection| devices::remove_exclusion(connection, &device, event_for))
            .await
    }
}
