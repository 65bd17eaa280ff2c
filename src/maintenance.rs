//! Background upkeep of a running server: picking up writes the command
//! line made straight to the store, recording exemption expiries, and
//! deleting events older than `events.keep`.

use crate::guard::Guard;
use crate::policy::Timestamp;
use crate::store::StoreError;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often the change log and exemption expiries are checked.
const POLL: Duration = Duration::from_secs(2);
/// How often lockout counts due for forgiveness are set back.
const FORGIVE_EVERY: Duration = Duration::from_secs(60);
/// How often old events are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Events deleted per transaction, so the store thread is never held long.
const PRUNE_BATCH: usize = 10_000;

/// Runs the upkeep until `shutdown` fires.
pub async fn run_maintenance(guard: Arc<Guard>, mut shutdown: watch::Receiver<bool>) {
    // The cache starts empty, so changes logged before this start are moot.
    let mut last_change = match guard
        .store()
        .call(|connection| crate::store::exemptions::take_changes(connection, 0))
        .await
    {
        Ok((last, _)) => last,
        Err(error) => {
            tracing::error!(%error, "cannot read the store's change log");
            0
        }
    };
    let mut next_prune = Instant::now();
    let mut next_forgive = Instant::now();
    loop {
        match apply_changes(&guard, last_change).await {
            Ok(last) => last_change = last,
            Err(error) => tracing::error!(%error, "cannot read the store's change log; retrying"),
        }
        if let Err(error) = record_expiries(&guard).await {
            tracing::error!(%error, "cannot record exemption expiries; retrying");
        }
        if Instant::now() >= next_forgive {
            next_forgive = Instant::now() + FORGIVE_EVERY;
            if let Err(error) = guard.forgive_due().await {
                tracing::error!(%error, "cannot apply forgive_after; retrying in a minute");
            }
        }
        if Instant::now() >= next_prune {
            next_prune = Instant::now() + PRUNE_EVERY;
            if let Err(error) = prune_events(&guard).await {
                tracing::error!(%error, "cannot delete old events; retrying in an hour");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Drops cached states and reloads exemptions that the command line
/// changed in the store; returns the last change applied.
async fn apply_changes(guard: &Guard, after: i64) -> Result<i64, StoreError> {
    let (last, changes) = guard
        .store()
        .call(move |connection| crate::store::exemptions::take_changes(connection, after))
        .await?;
    let mut exemptions_changed = false;
    for change in changes {
        match change {
            Some(key) => {
                tracing::info!(mailbox = %key, "mailbox state changed in the store; cache dropped");
                guard.forget(&key).await;
            }
            None => exemptions_changed = true,
        }
    }
    if exemptions_changed {
        guard.reload_exemptions().await?;
        tracing::info!(count = guard.exemptions().len(), "exemptions reloaded");
    }
    Ok(last)
}

async fn record_expiries(guard: &Guard) -> Result<(), StoreError> {
    let now = guard.store().now();
    let expired = guard.store().record_exemption_expiries(now).await?;
    if expired > 0 {
        tracing::info!(expired, "exemptions reached their end");
        guard.reload_exemptions().await?;
    }
    Ok(())
}

async fn prune_events(guard: &Guard) -> Result<(), StoreError> {
    let keep = guard.runtime().config.events.keep;
    let before = Timestamp::now().saturating_sub(keep);
    let mut total = 0;
    loop {
        let deleted = guard
            .store()
            .delete_events_before(before, PRUNE_BATCH)
            .await?;
        total += deleted;
        // Redis trims the stream in one command.
        if deleted < PRUNE_BATCH || guard.store().shared().is_some() {
            break;
        }
    }
    if total > 0 {
        tracing::info!(deleted = total, before = %before.to_rfc3339(), "old events deleted");
    }
    Ok(())
}
