//! The Guard's side of the shared Redis store: cache invalidation by the
//! other hosts' changes, and the merge of strikes counted while Redis was
//! unreachable.

use super::{Guard, Runtime, deliveries_json};
use crate::actions::LockoutFacts;
use crate::events::Event;
use crate::identity::MailboxKey;
use crate::policy::{Lockout, MailboxState, Strike, StrikeOutcome, Timestamp};
use crate::store::{MailboxWrite, StoreError};
use std::sync::Arc;

impl Guard {
    /// Reads the exemptions after another host changed them, logging a
    /// failure; the exemptions loaded before stay in force then.
    async fn reload_exemptions_logged(&self) {
        match self.reload_exemptions().await {
            Ok(()) => tracing::info!(count = self.exemptions().len(), "exemptions reloaded"),
            Err(error) => tracing::error!(%error,
                "cannot reload the exemptions another host changed; the previous ones stay in force"),
        }
    }

    /// Reads the device settings and exclusions after another host changed
    /// them, logging a failure; the ones loaded before stay in force then.
    async fn reload_device_settings_logged(&self) {
        match self.devices.load_settings().await {
            Ok(()) => tracing::info!("device settings and exclusions reloaded"),
            Err(error) => tracing::error!(%error,
                "cannot reload the device settings another host changed; the previous ones stay in force"),
        }
    }

    /// Reads the device statuses after another host changed them. A failure
    /// is logged, and the statuses read before stay in force until the next
    /// change or write conflict makes this host read them again.
    async fn reload_device_statuses_logged(&self) {
        match self.devices.reload_statuses().await {
            Ok(()) => tracing::debug!("device statuses reloaded"),
            Err(error) => tracing::error!(%error,
                "cannot reload the device statuses another host changed; the previous ones stay in force"),
        }
    }

    /// Merges the strikes this host counted in its own SQLite store while
    /// Redis failed into Redis, by running each through the policy again
    /// on the shared state. A lockout they complete is dated from the
    /// strike that completed it but refuses only from the merge on, so it
    /// starts late. Its events and deliveries are queued with it.
    pub(super) async fn merge_fallback_strikes(&self) -> Result<(), StoreError> {
        let waiting = self
            .store
            .call(|connection| crate::store::fallback::waiting(connection))
            .await?;
        for (key, strikes) in waiting {
            let mut cache = self.shard(&key).lock().await;
            let runtime = self.runtime();
            let settings = runtime.settings();
            let synchronized = self.synchronized_security_override();
            let (started, state) = self
                .store
                .update_mailbox(&key, |state, now| {
                    merge_strikes(
                        state,
                        &strikes,
                        &settings,
                        now,
                        &key,
                        &runtime,
                        synchronized,
                    )
                })
                .await?;
            cache.put(key.clone(), state.block);
            drop(cache);
            let merge_key = key.clone();
            self.store
                .call(move |connection| crate::store::fallback::finish(connection, &merge_key))
                .await?;
            tracing::warn!(mailbox = %key, strikes = strikes.len(), lockout_started = started.is_some(),
                "merged strikes counted without Redis into the Redis store");
            if let Some(lockout) = started {
                self.metrics
                    .lockout_started(lockout.is_permanent(), lockout.enforced);
                self.lockout_started.notify_one();
                self.outbox_added.notify_one();
            }
        }
        Ok(())
    }

    /// Drops cached lockouts when other hosts change them, until
    /// `shutdown` fires; does nothing with SQLite.
    pub async fn run_cache_invalidation(
        self: Arc<Self>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let Some(shared) = self.store.shared().cloned() else {
            return;
        };
        let (sender, mut changes) = tokio::sync::mpsc::unbounded_channel();
        let subscription = tokio::spawn(async move { shared.run_subscription(sender).await });
        loop {
            tokio::select! {
                change = changes.recv() => match change {
                    Some(crate::store::redis::Invalidation::Mailbox(key)) => {
                        tracing::debug!(mailbox = %key, "mailbox changed on another host; cache dropped");
                        self.forget(&key).await;
                    }
                    Some(crate::store::redis::Invalidation::Exemptions) => {
                        self.reload_exemptions_logged().await;
                    }
                    Some(crate::store::redis::Invalidation::DeviceSettings) => {
                        self.reload_device_settings_logged().await;
                    }
                    Some(crate::store::redis::Invalidation::DeviceStatuses) => {
                        self.reload_device_statuses_logged().await;
                    }
                    Some(crate::store::redis::Invalidation::Notices(notices)) => {
                        let count = notices.len();
                        match self.devices.import_notices(notices).await {
                            Ok(stored) => tracing::debug!(notices = stored, "subnet notices from another host stored"),
                            Err(error) => tracing::error!(%error, notices = count,
                                "cannot store subnet notices from another host; this host's agents miss them"),
                        }
                    }
                    Some(crate::store::redis::Invalidation::All) => {
                        for shard in &self.shards {
                            shard.lock().await.clear();
                        }
                        self.reload_exemptions_logged().await;
                        self.reload_device_statuses_logged().await;
                        self.reload_device_settings_logged().await;
                    }
                    None => break,
                },
                _ = shutdown.changed() => break,
            }
        }
        subscription.abort();
    }
}

/// Runs strikes counted without Redis through the policy on the shared
/// `state`, each at the later of its own time and the newest strike
/// already there, so the window stays in order. A strike already in the
/// window (the same transaction) is skipped. Returns the lockout the
/// strikes started, if any.
fn merge_strikes(
    state: &mut MailboxState,
    strikes: &[Strike],
    settings: &crate::policy::PolicySettings,
    now: Timestamp,
    key: &MailboxKey,
    runtime: &Runtime,
    synchronized_security: Option<bool>,
) -> (Option<Lockout>, Option<MailboxWrite>) {
    let mut events = Vec::new();
    let mut deliveries = Vec::new();
    let mut started = None;
    for strike in strikes {
        if state
            .strikes
            .iter()
            .any(|known| known.message_id == strike.message_id)
        {
            continue;
        }
        let newest = state.strikes.last().map_or(strike.at, |last| last.at);
        let strike = Strike {
            at: strike.at.max(newest).min(now),
            ..strike.clone()
        };
        if let StrikeOutcome::LockoutStarted { lockout, strikes } =
            state.record_strike(settings, strike.clone())
        {
            // The message that completed the lockout is known only by its
            // transaction id here.
            let message = crate::events::MessageFacts {
                sender: format!("<{}>", key.mailbox),
                login: None,
                client: key
                    .client
                    .map(|client| client.to_string())
                    .unwrap_or_default(),
                transaction: strike.message_id.clone(),
                recipients: 0,
            };
            let facts = LockoutFacts {
                key,
                lockout: &lockout,
                strikes: &strikes,
                message: &message,
                synchronized_security,
            };
            let planned =
                crate::actions::plan_lockout_started(&runtime.config, &runtime.directory, &facts);
            let mut event = Event::lockout_started(key, &message, &lockout, &strikes);
            event
                .details
                .insert("deliveries".into(), deliveries_json(&planned));
            event.details.insert(
                "note".into(),
                "started when strikes counted while Redis was unreachable were merged".into(),
            );
            events.push(event);
            deliveries.extend(planned);
            started = Some(lockout);
        }
    }
    let write = MailboxWrite {
        keep: !state.is_empty(settings, now),
        events,
        deliveries,
    };
    (started, Some(write))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn merge_runtime() -> Runtime {
        let text = "[upstream]\naddress = \"127.0.0.1:25\"\n[store]\npath = \"/tmp/unused.db\"\n\
                    [alerts]\nadmin_addresses = [\"admin@example.org\"]\n\
                    [policy]\nthreshold = 3\nwindow = \"10m\"\n";
        Runtime::new(Config::parse(text).expect("valid config")).expect("runtime")
    }

    fn merged_strike(id: &str, at: i64) -> Strike {
        Strike {
            at: Timestamp(at),
            verdict: "spam GTUBE".to_string(),
            message_id: id.to_string(),
            header_message_id: None,
        }
    }

    #[test]
    fn merge_completes_lockout() {
        let runtime = merge_runtime();
        let settings = runtime.settings();
        let key = MailboxKey::mailbox("pia@example.org");
        let mut state = MailboxState::default();
        let _ = state.record_strike(&settings, merged_strike("shared-1", 1_000_000));
        let local = [
            merged_strike("local-1", 1_001_000),
            merged_strike("local-2", 1_002_000),
        ];

        let (started, write) = merge_strikes(
            &mut state,
            &local,
            &settings,
            Timestamp(1_005_000),
            &key,
            &runtime,
            None,
        );

        let lockout = started.expect("the third strike starts a lockout");
        assert_eq!(lockout.level, 1);
        assert_eq!(lockout.started, Timestamp(1_002_000));
        assert_eq!(state.lockouts, 1);
        let write = write.expect("a write");
        assert_eq!(write.events.len(), 1);
        assert_eq!(
            write.events[0].kind,
            crate::events::EventKind::LockoutStarted
        );
        assert_eq!(write.deliveries.len(), 1, "the alert e-mail");
    }

    #[test]
    fn merge_skips_known_strikes() {
        let runtime = merge_runtime();
        let settings = runtime.settings();
        let key = MailboxKey::mailbox("pia@example.org");
        let mut state = MailboxState::default();
        let _ = state.record_strike(&settings, merged_strike("both", 1_000_000));
        // The write landed in Redis before its reply was lost, so the
        // strike is in both stores; it counts once.
        let local = [
            merged_strike("both", 1_000_000),
            merged_strike("local-1", 1_001_000),
        ];

        let (started, _) = merge_strikes(
            &mut state,
            &local,
            &settings,
            Timestamp(1_005_000),
            &key,
            &runtime,
            None,
        );

        assert!(started.is_none());
        assert_eq!(state.strikes.len(), 2);
    }

    #[test]
    fn merge_keeps_window_order() {
        let runtime = merge_runtime();
        let settings = runtime.settings();
        let key = MailboxKey::mailbox("pia@example.org");
        let now = Timestamp(1_300_000);
        // A strike counted locally before the newest shared one, and one
        // dated ahead of Redis's clock by a fast host clock.
        let cases = [(1_000_000, 1_200_000), (9_000_000, 1_300_000)];
        for (local_at, merged_at) in cases {
            let mut state = MailboxState::default();
            let _ = state.record_strike(&settings, merged_strike("shared-1", 1_200_000));
            let local = [merged_strike("local-1", local_at)];

            let _ = merge_strikes(&mut state, &local, &settings, now, &key, &runtime, None);

            let times: Vec<i64> = state
                .strikes
                .iter()
                .map(|strike| strike.at.millis())
                .collect();
            assert_eq!(times, [1_200_000, merged_at], "local strike at {local_at}");
        }
    }
}
