//! The `Guard`: the one place where identity, scanning, the policy core,
//! the store and the events report meet. Both front-ends ask it the same
//! two questions (may this sender send? what happens to this message?) and
//! hold no policy logic of their own.

use crate::config::Config;
use crate::directory::Directory;
use crate::events::{Event, MessageFacts};
use crate::identity::{self, Attribution, MailboxKey, SenderFacts};
use crate::policy::{
    MailboxState, Mode, PolicySettings, SenderDecision, Strike, StrikeOutcome, Timestamp,
};
use crate::reply::Reply;
use crate::scan::{Envelope, OnUnscannable, ScanInput, Scanner, SpamAction, Verdict};
use crate::smtp::upstream::UpstreamTarget;
use crate::store::{Store, StoreError};
use arc_swap::ArcSwap;
use lru::LruCache;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{Mutex, Notify};

/// Number of independently locked parts of the mailbox cache; strikes of
/// different mailboxes rarely wait for each other.
const CACHE_SHARDS: usize = 16;

/// The configuration in force with what is derived from it.
pub struct Runtime {
    pub config: Config,
    pub directory: Directory,
    pub scanner: Scanner,
    /// How to reach the upstream, with its TLS connector and credentials.
    pub upstream: UpstreamTarget,
    /// The listener's STARTTLS acceptor, when a certificate is set.
    pub tls_acceptor: Option<tokio_rustls::TlsAcceptor>,
}

impl Runtime {
    /// Builds the scanner and reads the directory for `config`.
    ///
    /// # Errors
    /// When the spam rules do not compile or the directory cannot be read.
    pub fn new(config: Config) -> Result<Runtime, String> {
        let scanner = Scanner::from_config(&config.scan)?;
        let directory = match &config.directory {
            None => Directory::default(),
            Some(section) => Directory::load(&section.path, &config.identity)
                .map_err(|error| format!("directory.path: {error}"))?,
        };
        let upstream = UpstreamTarget::new(&config.upstream, &config.smtp.hostname)?;
        let tls_acceptor = match (&config.smtp.tls_cert_file, &config.smtp.tls_key_file) {
            (Some(cert), Some(key)) => Some(
                crate::tls::acceptor(cert, key)
                    .map_err(|error| format!("smtp.tls_cert_file: {error}"))?,
            ),
            _ => None,
        };
        Ok(Runtime {
            config,
            directory,
            scanner,
            upstream,
            tls_acceptor,
        })
    }

    pub fn settings(&self) -> PolicySettings {
        self.config.policy.settings()
    }
}

/// The facts of one SMTP transaction that the Guard decides on.
#[derive(Debug, Clone)]
pub struct Transaction {
    /// sendguard's own transaction id, unique per message.
    pub id: String,
    /// Envelope sender path as the client wrote it, with angle brackets.
    pub sender_path: String,
    /// Envelope sender address without brackets or quotes; empty for `<>`.
    pub sender: String,
    pub login: Option<String>,
    pub client: IpAddr,
    pub recipients: usize,
    /// The client's HELO or EHLO name, or the one a trusted peer forwarded.
    pub helo: Option<String>,
    /// The client's host name when known: from a trusted peer's XFORWARD or
    /// XCLIENT `NAME`, or from the MTA's milter connect.
    pub client_name: Option<String>,
    /// Accepted recipient paths with angle brackets, as the client wrote
    /// them.
    pub recipient_paths: Vec<String>,
}

impl Transaction {
    /// Returns the facts the scan engines take, rspamd's request headers.
    fn envelope(&self) -> Envelope<'_> {
        Envelope {
            transaction: &self.id,
            sender: &self.sender_path,
            recipients: &self.recipient_paths,
            client: Some(self.client),
            client_name: self.client_name.as_deref(),
            helo: self.helo.as_deref(),
            login: self.login.as_deref(),
        }
    }

    fn facts(&self) -> MessageFacts {
        MessageFacts {
            sender: self.sender_path.clone(),
            login: self.login.clone(),
            client: self.client.to_string(),
            transaction: self.id.clone(),
            recipients: self.recipients,
        }
    }
}

/// The decision at MAIL FROM.
#[derive(Debug, Clone, PartialEq)]
pub enum SenderCheck {
    Allow,
    Refuse(Reply),
}

/// A bad message to be counted after its delivery, so its event carries
/// the upstream's queue id.
#[derive(Debug, Clone)]
pub struct PendingStrike {
    // Boxed to keep `MessageDecision` small: a transaction carries its
    // recipient list.
    transaction: Box<Transaction>,
    verdict: Verdict,
}

/// The fate of a message at end of data.
#[derive(Debug, Clone)]
pub enum MessageDecision {
    /// Relay it; prepend `header` when set. A tagged spam message carries a
    /// strike to record with [`Guard::record_delivered`].
    Deliver {
        header: Option<String>,
        pending: Option<PendingStrike>,
    },
    /// Refuse it with this reply.
    Reject(Reply),
}

/// The shared decision maker for both front-ends.
pub struct Guard {
    runtime: ArcSwap<Runtime>,
    store: Store,
    shards: Vec<Mutex<LruCache<MailboxKey, MailboxState>>>,
    lockout_started: Notify,
}

impl Guard {
    pub fn new(runtime: Runtime, store: Store) -> Guard {
        let capacity = runtime.config.policy.max_tracked_mailboxes;
        Guard {
            shards: (0..CACHE_SHARDS)
                .map(|_| Mutex::new(LruCache::new(shard_capacity(capacity))))
                .collect(),
            runtime: ArcSwap::from_pointee(runtime),
            store,
            lockout_started: Notify::new(),
        }
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Puts a new configuration in force and records a `config_loaded`
    /// event. Active lockouts keep their end times.
    pub async fn replace_runtime(&self, runtime: Runtime, reason: &str) {
        let new_capacity = shard_capacity(runtime.config.policy.max_tracked_mailboxes);
        self.runtime.store(Arc::new(runtime));
        for shard in &self.shards {
            shard.lock().await.resize(new_capacity);
        }
        self.record_config_loaded(reason).await;
    }

    /// Appends a `config_loaded` event describing the policy in force.
    pub async fn record_config_loaded(&self, reason: &str) {
        let runtime = self.runtime();
        let config = &runtime.config;
        let policy = serde_json::json!({
            "policy": config.policy,
            "identity": config.identity,
        });
        let event = Event::config_loaded(Timestamp::now(), &config.policy_digest(), policy, reason);
        if let Err(error) = self.store.append(vec![event]).await {
            tracing::error!(%error, reason, "cannot record the config_loaded event");
        }
    }

    fn attribute(&self, runtime: &Runtime, transaction: &Transaction) -> Attribution {
        let facts = SenderFacts {
            envelope: &transaction.sender,
            login: transaction.login.as_deref(),
            client: transaction.client,
        };
        identity::attribute(facts, &runtime.config.identity, &runtime.directory)
    }

    fn shard(&self, key: &MailboxKey) -> &Mutex<LruCache<MailboxKey, MailboxState>> {
        use std::hash::{BuildHasher, RandomState};
        // The shard only needs to be stable within this process.
        static SEED: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
        let hash = SEED.get_or_init(RandomState::new).hash_one(key);
        &self.shards[(hash as usize) % self.shards.len()]
    }

    async fn load_state(
        &self,
        cache: &mut LruCache<MailboxKey, MailboxState>,
        key: &MailboxKey,
    ) -> Result<MailboxState, StoreError> {
        if let Some(state) = cache.get(key) {
            return Ok(state.clone());
        }
        let state = self
            .store
            .load_mailbox(key.clone())
            .await?
            .unwrap_or_default();
        cache.put(key.clone(), state.clone());
        Ok(state)
    }

    /// Decides whether a sender may send, at MAIL FROM and again at end of
    /// data (for a transaction that passed MAIL FROM before its lockout).
    pub async fn check_sender(&self, transaction: &Transaction) -> SenderCheck {
        let runtime = self.runtime();
        let Some(key) = self.attribute(&runtime, transaction).block_key else {
            return SenderCheck::Allow;
        };
        let now = Timestamp::now();
        let state = {
            let mut cache = self.shard(&key).lock().await;
            match self.load_state(&mut cache, &key).await {
                Ok(state) => state,
                Err(error) => {
                    tracing::error!(%error, mailbox = %key, transaction = %transaction.id,
                        "cannot read lockout state; answering with a temporary failure");
                    return SenderCheck::Refuse(Reply::local_error());
                }
            }
        };

        match state.check_sender(now, runtime.config.policy.mode) {
            SenderDecision::Allow => SenderCheck::Allow,
            SenderDecision::MonitorOnly(lockout) => {
                tracing::info!(mailbox = %key, client = %transaction.client, level = lockout.level,
                    "sender would be refused, but its lockout started in monitor mode");
                SenderCheck::Allow
            }
            SenderDecision::Refuse(lockout) => {
                let reply = Reply::sender_blocked(&key, &lockout);
                tracing::info!(mailbox = %key, client = %transaction.client, level = lockout.level,
                    transaction = %transaction.id, "sender refused: mailbox is locked out");
                let event = Event::sender_refused(now, &key, &transaction.facts(), &lockout);
                if let Err(error) = self.store.record_refusal(event).await {
                    tracing::error!(%error, mailbox = %key, "cannot record the sender_refused event");
                }
                SenderCheck::Refuse(reply)
            }
        }
    }

    /// Scans a message and decides its fate; a bad message is counted
    /// against its mailbox before this returns, unless it is tagged and
    /// delivered (then see [`Guard::record_delivered`]).
    pub async fn check_message(
        &self,
        transaction: &Transaction,
        message: &[u8],
    ) -> MessageDecision {
        let runtime = self.runtime();
        let started = Instant::now();

        // A lockout that began after this transaction's MAIL FROM refuses
        // the message too.
        if let SenderCheck::Refuse(reply) = self.check_sender(transaction).await {
            return MessageDecision::Reject(reply);
        }

        let key = self.attribute(&runtime, transaction).block_key;
        let mailbox = key
            .as_ref()
            .map_or_else(|| "-".to_string(), ToString::to_string);
        let input = ScanInput {
            message,
            recipients: transaction.recipients,
            envelope: Some(transaction.envelope()),
        };
        // NOTE: the built-in rules run on this async worker. A 10 MiB
        // message occupies it for up to about 2 s (debug build), so a few
        // such messages at once delay other sessions. Moving the rules to a
        // blocking pool needs a limit on how many scans keep memory at once.
        let verdict = match runtime.scanner.scan(input).await {
            Ok(verdict) => verdict,
            Err(error) => {
                tracing::warn!(%error, engine = error.engine(), transaction = %transaction.id,
                    client = %transaction.client, mailbox, sender = %transaction.sender_path,
                    "scan failed; answering with a temporary failure");
                return MessageDecision::Reject(Reply::scanner_failed(error.engine()));
            }
        };
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(transaction = %transaction.id, client = %transaction.client, mailbox,
            sender = %transaction.sender_path, verdict = %verdict.summary(),
            engine = verdict.engine().unwrap_or("-"), elapsed_ms, "message scanned");

        match &verdict {
            Verdict::Clean => MessageDecision::Deliver {
                header: None,
                pending: None,
            },
            Verdict::Unscannable { reason } => {
                match runtime.config.scan.clamd.as_ref().map(|c| c.on_unscannable) {
                    Some(OnUnscannable::Accept) => MessageDecision::Deliver {
                        header: Some(format!(
                            "X-Sendguard-Unscanned: {}",
                            crate::reply::sanitize(reason)
                        )),
                        pending: None,
                    },
                    _ => MessageDecision::Reject(Reply::unscannable()),
                }
            }
            Verdict::Suspect { .. } => {
                // Recorded for the report, never a strike: a lockout on a
                // suspicion would cost a legitimate sender too much.
                let event = Event::bad_message(
                    Timestamp::now(),
                    key.as_ref(),
                    &transaction.facts(),
                    &verdict,
                    false,
                    Some("suspect, not spam: delivered with a header and never counted"),
                    runtime.config.policy.mode == Mode::Monitor,
                );
                if let Err(error) = self.store.append(vec![event]).await {
                    tracing::error!(%error, transaction = %transaction.id, mailbox,
                        "cannot record the bad_message event of a suspect message");
                }
                MessageDecision::Deliver {
                    header: Some(format!("X-Sendguard-Spam: Suspect, {}", verdict.summary())),
                    pending: None,
                }
            }
            Verdict::Spam { .. } if runtime.config.scan.spam.action == SpamAction::Tag => {
                MessageDecision::Deliver {
                    header: Some(format!("X-Sendguard-Spam: Yes, {}", verdict.summary())),
                    pending: Some(PendingStrike {
                        transaction: Box::new(transaction.clone()),
                        verdict,
                    }),
                }
            }
            Verdict::Spam { .. } | Verdict::Virus { .. } => {
                let reply = if matches!(verdict, Verdict::Virus { .. }) {
                    Reply::virus(&verdict)
                } else {
                    Reply::spam(&verdict)
                };
                match self.record_bad(transaction, &verdict, None).await {
                    Ok(()) => MessageDecision::Reject(reply),
                    // Without the strike on disk, a temporary failure makes
                    // the client retry, and the retry is counted.
                    Err(()) => MessageDecision::Reject(Reply::local_error()),
                }
            }
        }
    }

    /// Counts a tagged spam message after the upstream replied to it.
    pub async fn record_delivered(&self, pending: PendingStrike, queue_id: Option<String>) {
        // The message is already relayed, so a failure here can only be
        // logged (record_bad does).
        let _ = self
            .record_bad(&pending.transaction, &pending.verdict, queue_id)
            .await;
    }

    /// Records a bad message: the strike (unless the message belongs to no
    /// counted mailbox), any lockout it starts, and the events.
    async fn record_bad(
        &self,
        transaction: &Transaction,
        verdict: &Verdict,
        queue_id: Option<String>,
    ) -> Result<(), ()> {
        let runtime = self.runtime();
        let settings = runtime.settings();
        let monitor = settings.mode == Mode::Monitor;
        let attribution = self.attribute(&runtime, transaction);
        let now = Timestamp::now();
        let facts_event = |counted: bool, note: Option<&str>, key: Option<&MailboxKey>| {
            let mut event = Event::bad_message(
                now,
                key,
                &transaction.facts(),
                verdict,
                counted,
                note,
                monitor,
            );
            if let Some(queue_id) = &queue_id {
                event
                    .details
                    .insert("queue_id".into(), queue_id.clone().into());
            }
            event
        };

        let Some(key) = attribution.strike_key else {
            let key = attribution.block_key.as_ref();
            let event = facts_event(false, attribution.uncounted_reason, key);
            tracing::info!(transaction = %transaction.id, sender = %transaction.sender_path,
                verdict = %verdict.summary(), reason = attribution.uncounted_reason, "bad message not counted");
            return self.store.append(vec![event]).await.map_err(|error| {
                tracing::error!(%error, transaction = %transaction.id, "cannot record the bad_message event");
            });
        };

        let mut cache = self.shard(&key).lock().await;
        let mut state = self.load_state(&mut cache, &key).await.map_err(|error| {
            tracing::error!(%error, mailbox = %key, transaction = %transaction.id, "cannot read lockout state");
        })?;
        let strike = Strike {
            at: now,
            verdict: verdict.summary(),
            message_id: transaction.id.clone(),
        };
        let outcome = state.record_strike(&settings, strike);
        let mut events = Vec::with_capacity(2);
        let mut lockout_started = false;
        match &outcome {
            StrikeOutcome::Counted { in_window } => {
                events.push(facts_event(true, None, Some(&key)));
                tracing::info!(mailbox = %key, transaction = %transaction.id, verdict = %verdict.summary(),
                    in_window, threshold = settings.threshold, "strike counted");
            }
            StrikeOutcome::DuringBlock(lockout) => {
                events.push(facts_event(
                    false,
                    Some("mailbox is locked out; nothing is counted during a lockout"),
                    Some(&key),
                ));
                tracing::info!(mailbox = %key, transaction = %transaction.id, level = lockout.level,
                    "bad message during a lockout, not counted");
            }
            StrikeOutcome::LockoutStarted { lockout, strikes } => {
                events.push(facts_event(true, None, Some(&key)));
                events.push(Event::lockout_started(
                    &key,
                    &transaction.facts(),
                    lockout,
                    strikes,
                ));
                lockout_started = true;
                tracing::warn!(mailbox = %key, level = lockout.level,
                    until = %lockout.until.map_or("permanent".to_string(), |until| until.to_rfc3339()),
                    monitor = !lockout.enforced, "lockout started");
            }
        }
        let keep = !state.is_empty(&settings, now);
        match self
            .store
            .commit(key.clone(), state.clone(), keep, events, now)
            .await
        {
            Ok(()) => {
                cache.put(key, state);
                if lockout_started {
                    self.lockout_started.notify_one();
                }
                Ok(())
            }
            Err(error) => {
                // Drop the cached copy so the next read sees what the store
                // really holds.
                cache.pop(&key);
                tracing::error!(%error, mailbox = %key, transaction = %transaction.id,
                    "cannot record the strike");
                Err(())
            }
        }
    }

    /// Records the end of every timed lockout that has ended, at its end
    /// time, and returns when the next one is due.
    async fn record_due_ends(&self) -> Result<Option<Timestamp>, StoreError> {
        let now = Timestamp::now();
        for key in self.store.due_ends(now).await? {
            let mut cache = self.shard(&key).lock().await;
            // Read the store, not the cache: the store row is what said the
            // end is pending.
            let Some(mut state) = self.store.load_mailbox(key.clone()).await? else {
                continue;
            };
            let Some(lockout) = state.unrecorded_end(now).cloned() else {
                continue;
            };
            state.mark_end_recorded();
            let event = Event::lockout_ended(&key, &lockout);
            self.store
                .commit(key.clone(), state.clone(), true, vec![event], now)
                .await?;
            tracing::info!(mailbox = %key, level = lockout.level, "lockout ended");
            cache.put(key, state);
        }
        self.store.next_pending_end().await
    }

    /// Records each lockout's end when it happens, until `shutdown` fires.
    /// Ends that passed while sendguard was stopped are recorded at once,
    /// with their real end time.
    pub async fn run_lockout_timer(
        self: Arc<Self>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        const RETRY: std::time::Duration = std::time::Duration::from_secs(5);
        loop {
            let wait = match self.record_due_ends().await {
                Ok(Some(next)) => next.since(Timestamp::now()),
                Ok(None) => std::time::Duration::from_secs(3600),
                Err(error) => {
                    tracing::error!(%error, "cannot record lockout ends; retrying");
                    RETRY
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.lockout_started.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

fn shard_capacity(total: usize) -> NonZeroUsize {
    NonZeroUsize::new(total.div_ceil(CACHE_SHARDS).max(1)).unwrap_or(NonZeroUsize::MIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

    fn guard(dir: &std::path::Path, policy: &str) -> Arc<Guard> {
        let text = format!(
            "[upstream]\naddress = \"127.0.0.1:25\"\n[store]\npath = \"{}\"\n[policy]\n{policy}\n",
            dir.join("store.db").display()
        );
        let config = Config::parse(&text).expect("valid config");
        let store = Store::open(&config.store.path).expect("store opens");
        Arc::new(Guard::new(Runtime::new(config).expect("runtime"), store))
    }

    fn transaction(sender: &str, index: usize) -> Transaction {
        Transaction {
            id: format!("test-{index}"),
            sender_path: format!("<{sender}>"),
            sender: sender.to_string(),
            login: None,
            client: "192.0.2.1".parse().expect("address"),
            recipients: 1,
            helo: None,
            client_name: None,
            recipient_paths: vec!["<rcpt@example.net>".to_string()],
        }
    }

    fn spam() -> Vec<u8> {
        format!("Subject: x\r\n\r\n{GTUBE}\r\n").into_bytes()
    }

    #[tokio::test]
    async fn eviction_keeps_strikes() {
        let dir = tempfile::tempdir().expect("temporary directory");
        // One mailbox per cache shard: forty mailboxes evict each other
        // between their first and second strike.
        let guard = guard(dir.path(), "threshold = 2\nmax_tracked_mailboxes = 1");
        let senders: Vec<String> = (0..40)
            .map(|index| format!("user{index}@example.org"))
            .collect();
        for round in 0..2 {
            for (index, sender) in senders.iter().enumerate() {
                let decision = guard
                    .check_message(&transaction(sender, round * 100 + index), &spam())
                    .await;
                assert!(matches!(decision, MessageDecision::Reject(_)));
            }
        }
        for (index, sender) in senders.iter().enumerate() {
            let check = guard.check_sender(&transaction(sender, 1000 + index)).await;
            assert!(
                matches!(check, SenderCheck::Refuse(_)),
                "{sender} is locked out"
            );
        }
    }

    #[tokio::test]
    async fn concurrent_strikes_start_one_lockout() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let guard = guard(dir.path(), "threshold = 5");
        let mut tasks = tokio::task::JoinSet::new();
        for index in 0..12 {
            let guard = guard.clone();
            tasks.spawn(async move {
                guard
                    .check_message(&transaction("zoe@example.org", index), &spam())
                    .await
            });
        }
        while tasks.join_next().await.is_some() {}
        let connection = crate::store::sqlite::open(&dir.path().join("store.db")).expect("open");
        let filter = crate::store::EventFilter {
            kind: Some(crate::events::EventKind::LockoutStarted),
            ..Default::default()
        };
        let started = crate::store::sqlite::query_events(&connection, &filter).expect("query");
        assert_eq!(started.len(), 1);
        let key = MailboxKey::mailbox("zoe@example.org");
        let state = crate::store::sqlite::load_mailbox(&connection, &key)
            .expect("load")
            .expect("state");
        assert_eq!(state.lockouts, 1);
    }

    #[tokio::test]
    async fn clean_mail_writes_nothing() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let guard = guard(dir.path(), "threshold = 5");
        let clean = b"Subject: hello\r\n\r\nLunch at noon?\r\n";
        let decision = guard
            .check_message(&transaction("amy@example.org", 1), clean)
            .await;
        assert!(matches!(
            decision,
            MessageDecision::Deliver {
                header: None,
                pending: None
            }
        ));
        let connection = crate::store::sqlite::open(&dir.path().join("store.db")).expect("open");
        let events =
            crate::store::sqlite::query_events(&connection, &Default::default()).expect("query");
        assert!(events.is_empty(), "{events:?}");
        let rows: i64 = connection
            .query_row("SELECT COUNT(*) FROM mailboxes", [], |row| row.get(0))
            .expect("count");
        assert_eq!(rows, 0);
    }
}
