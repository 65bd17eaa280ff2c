//! Idle upstream sessions kept for the next client sessions.
//!
//! Opening an upstream session costs a TCP connect, the greeting, EHLO and,
//! where configured, STARTTLS and AUTH. When a client session ends, its
//! upstream session is reset with RSET and kept here, so the next client
//! session starts its first transaction right away. A session is taken
//! only while it is younger than `pool_max_age`, has been idle for less
//! than `pool_idle_time` and shows no sign of having been closed.

use super::UpstreamConnection;
use crate::config::UpstreamConfig;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Source of pool identities: each configuration loaded gets its own pool,
/// and a session opened under an older one never enters a newer pool.
static NEXT_POOL: AtomicU64 = AtomicU64::new(1);

/// The idle upstream sessions of one upstream configuration.
pub struct UpstreamPool {
    id: u64,
    size: usize,
    idle_time: Duration,
    max_age: Duration,
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    connection: UpstreamConnection,
    since: Instant,
}

impl UpstreamPool {
    pub fn new(config: &UpstreamConfig) -> UpstreamPool {
        UpstreamPool {
            id: NEXT_POOL.fetch_add(1, Ordering::Relaxed),
            size: config.pool_size,
            idle_time: config.pool_idle_time,
            max_age: config.pool_max_age,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Returns the identity that connections opened for this pool carry.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Returns whether sessions are kept at all (`pool_size` above zero).
    pub fn keeps_sessions(&self) -> bool {
        self.size > 0
    }

    /// Returns how many idle sessions the pool holds.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the most recently returned session that is still usable at
    /// `now`. Sessions found stale on the way come back as the second value,
    /// for the caller to close.
    pub fn take(&self, now: Instant) -> (Option<UpstreamConnection>, Vec<UpstreamConnection>) {
        let mut stale = Vec::new();
        loop {
            let Some(mut idle) = self.lock().pop() else {
                return (None, stale);
            };
            if self.is_usable(&mut idle, now) {
                return (Some(idle.connection), stale);
            }
            stale.push(idle.connection);
        }
    }

    /// Keeps `connection`, which must have been reset, for a later client.
    /// Returns it instead when it belongs to another pool, is too old or the
    /// pool is full, and the caller then closes it.
    pub fn put(&self, connection: UpstreamConnection, now: Instant) -> Option<UpstreamConnection> {
        if connection.pool_id() != self.id
            || connection.in_transaction()
            || now.saturating_duration_since(connection.opened()) >= self.max_age
        {
            return Some(connection);
        }
        let mut idle = self.lock();
        if idle.len() >= self.size {
            return Some(connection);
        }
        idle.push(Idle {
            connection,
            since: now,
        });
        None
    }

    /// Removes and returns the sessions that are no longer usable at `now`.
    pub fn remove_stale(&self, now: Instant) -> Vec<UpstreamConnection> {
        let mut idle = self.lock();
        let mut stale = Vec::new();
        let mut kept = Vec::with_capacity(idle.len());
        for mut entry in idle.drain(..) {
            if self.is_usable(&mut entry, now) {
                kept.push(entry);
            } else {
                stale.push(entry.connection);
            }
        }
        *idle = kept;
        stale
    }

    /// Removes and returns every idle session, as at shutdown or when a new
    /// configuration replaces this pool.
    pub fn drain(&self) -> Vec<UpstreamConnection> {
        self.lock()
            .drain(..)
            .map(|entry| entry.connection)
            .collect()
    }

    /// Returns whether a kept session is within its idle time and age at
    /// `now` and not closed by the upstream.
    fn is_usable(&self, entry: &mut Idle, now: Instant) -> bool {
        now.saturating_duration_since(entry.since) < self.idle_time
            && now.saturating_duration_since(entry.connection.opened()) < self.max_age
            && !entry.connection.is_closed()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Closes upstream sessions with QUIT in the background, all at once.
pub fn close_in_background(connections: Vec<UpstreamConnection>) {
    for connection in connections {
        tokio::spawn(connection.quit());
    }
}

/// Closes upstream sessions with QUIT, all at once, and waits for them at
/// most `limit`; those still waiting for their reply are then dropped.
pub async fn close_all(connections: Vec<UpstreamConnection>, limit: Duration) {
    let mut quits = tokio::task::JoinSet::new();
    for connection in connections {
        quits.spawn(connection.quit());
    }
    let _ = tokio::time::timeout(limit, quits.join_all()).await;
}
