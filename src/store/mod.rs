//! Durable state: mailbox strikes and lockouts, and the events report.
//!
//! The embedded store is SQLite in WAL mode. All writes run on one
//! dedicated thread, off the async workers, and each call returns only
//! after its transaction committed, so a reply that depends on a strike is
//! sent only once the strike is on disk.

pub mod devices;
pub mod exemptions;
pub mod outbox;
pub mod sqlite;

pub use sqlite::EventFilter;

use crate::actions::{OutboxEntry, PendingDelivery};
use crate::events::Event;
use crate::identity::MailboxKey;
use crate::policy::{MailboxState, Timestamp};
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use tokio::sync::oneshot;

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
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// Handle to the store thread; cheap to clone.
#[derive(Clone)]
pub struct Store {
    jobs: mpsc::Sender<Job>,
    path: PathBuf,
}

impl Store {
    /// Opens the database and starts the store thread.
    ///
    /// # Errors
    /// When the database cannot be opened or its schema created.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
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
        Ok(Store {
            jobs,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
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

    /// Reads one mailbox's state.
    ///
    /// # Errors
    /// On a database failure.
    pub async fn load_mailbox(&self, key: MailboxKey) -> Result<Option<MailboxState>, StoreError> {
        self.call(move |connection| sqlite::load_mailbox(connection, &key))
            .await
    }

    /// Writes a mailbox's state (or deletes it when `keep` is false),
    /// appends `events` and queues `deliveries`, in one transaction, so a
    /// lockout is never stored without its webhooks and alerts.
    ///
    /// # Errors
    /// On a database failure; nothing is written then.
    pub async fn commit(
        &self,
        key: MailboxKey,
        state: MailboxState,
        keep: bool,
        events: Vec<Event>,
        deliveries: Vec<OutboxEntry>,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.call(move |connection| {
            let transaction = connection.transaction()?;
            sqlite::save_mailbox(&transaction, &key, &state, keep, now)?;
            for event in &events {
                sqlite::insert_event(&transaction, event)?;
            }
            for entry in &deliveries {
                outbox::insert(&transaction, entry)?;
            }
            transaction.commit()?;
            Ok(())
        })
        .await
    }

    /// Returns up to `limit` outbox deliveries due at `now`.
    ///
    /// # Errors
    /// On a database failure.
    pub async fn due_deliveries(
        &self,
        now: Timestamp,
        limit: usize,
    ) -> Result<Vec<PendingDelivery>, StoreError> {
        self.call(move |connection| outbox::due(connection, now, limit))
            .await
    }

    /// Returns when the next outbox delivery is due.
    ///
    /// # Errors
    /// On a database failure.
    pub async fn next_delivery_due(&self) -> Result<Option<Timestamp>, StoreError> {
        self.call(|connection| outbox::next_due(connection)).await
    }

    /// Removes a delivered or abandoned delivery and records its event.
    ///
    /// # Errors
    /// On a database failure.
    pub async fn finish_delivery(&self, row: i64, event: Event) -> Result<(), StoreError> {
        self.call(move |connection| outbox::finish(connection, row, &event))
            .await
    }

    /// Schedules a failed delivery's next attempt and records its event.
    ///
    /// # Errors
    /// On a database failure.
    pub async fn retry_delivery(
        &self,
        row: i64,
        attempts: u32,
        next: Timestamp,
        error: String,
        event: Event,
    ) -> Result<(), StoreError> {
        self.call(move |connection| {
            outbox::reschedule(connection, row, attempts, next, &error, &event)
        })
        .await
    }

    /// Appends events that change no mailbox state.
    ///
    /// # Errors
    /// On a database failure.
    pub async fn append(&self, events: Vec<Event>) -> Result<(), StoreError> {
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
        self.call(move |connection| sqlite::insert_refusal(connection, &event))
            .await
    }

    /// Returns the earliest unrecorded end of a timed lockout.
    ///
    /// # Errors
    /// On a database failure.
    pub async fn next_pending_end(&self) -> Result<Option<Timestamp>, StoreError> {
        self.call(|connection| sqlite::next_pending_end(connection))
            .await
    }

    /// Returns the mailboxes whose lockout ended by `now` without its end
    /// recorded.
    ///
    /// # Errors
    /// On a database failure.
    pub async fn due_ends(&self, now: Timestamp) -> Result<Vec<MailboxKey>, StoreError> {
        self.call(move |connection| sqlite::due_ends(connection, now))
            .await
    }
}
