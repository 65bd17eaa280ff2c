//! The `Guard`: the one place where identity, scanning, the policy core,
//! the store and the events report meet. Both front-ends ask it the same
//! two questions (may this sender send? what happens to this message?) and
//! hold no policy logic of their own.

mod shared;

use crate::actions::{ActionClients, LockoutFacts, OutboxEntry};
use crate::config::Config;
use crate::directory::Directory;
use crate::events::{Event, MessageFacts};
use crate::identity::{self, Attribution, MailboxKey, SenderFacts};
use crate::metrics::Metrics;
use crate::policy::{
    Exemption, ExemptionFacts, LiftError, Lifted, Lockout, MailboxState, Mode, PolicySettings,
    SenderDecision, Strike, StrikeOutcome, Timestamp, check_block,
};
use crate::reply::Reply;
use crate::scan::{Envelope, OnUnscannable, ScanInput, Scanner, SpamAction, Verdict};
use crate::smtp::upstream::UpstreamTarget;
use crate::store::{MailboxWrite, Store, StoreError};
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

/// The sender cache: each mailbox's most recent lockout, or `None` for a
/// mailbox seen without one. A sender check needs nothing else, so the
/// strikes and their details stay in the store, and a tracked mailbox
/// costs the cache only its key and one lockout.
pub type SenderCache = LruCache<MailboxKey, Option<Lockout>>;

/// The configuration in force with what is derived from it.
pub struct Runtime {
    pub config: Config,
    pub directory: Directory,
    pub scanner: Scanner,
    /// How to reach the upstream, with its TLS connector and credentials.
    pub upstream: UpstreamTarget,
    /// The listener's STARTTLS acceptor, when a certificate is set.
    pub tls_acceptor: Option<tokio_rustls::TlsAcceptor>,
    /// The webhook client, its secret and the alert e-mail relay.
    pub actions: ActionClients,
    /// The admin API's tokens.
    pub credentials: crate::admin::Credentials,
    /// The error that kept the directory file from loading on the last
    /// reload, when the previous directory was kept.
    pub directory_problem: Option<String>,
}

impl Runtime {
    /// Builds the scanner and reads the directory for `config`.
    ///
    /// # Errors
    /// When the spam rules do not compile or the directory cannot be read.
    pub fn new(config: Config) -> Result<Runtime, String> {
        let directory = match &config.directory {
            None => Directory::default(),
            Some(section) => Directory::load(&section.path, &config.identity)
                .map_err(|error| format!("directory.path: {error}"))?,
        };
        Runtime::with_directory(config, directory)
    }

    /// Builds the runtime for a reloaded `config`. A directory file that
    /// cannot be read or parsed keeps `previous`'s directory, with a
    /// warning, so a half-written file never loses the owners and devices.
    ///
    /// # Errors
    /// When anything but the directory is invalid.
    pub fn reload(config: Config, previous: &Runtime) -> Result<Runtime, String> {
        let mut problem = None;
        let directory = match &config.directory {
            None => Directory::default(),
            Some(section) => match Directory::load(&section.path, &config.identity) {
                Ok(directory) => directory,
                Err(error) => {
                    // One line, so log collectors keep the error together
                    // (TOML errors quote the file over several lines).
                    let error = error
                        .to_string()
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ");
                    tracing::warn!(directory = %section.path.display(), %error,
                        mailboxes = previous.directory.len(),
                        "directory file not loaded; the previous directory stays in force");
                    problem = Some(error);
                    previous.directory.clone()
                }
            },
        };
        let mut runtime = Runtime::with_directory(config, directory)?;
        runtime.directory_problem = problem;
        Ok(runtime)
    }

    /// Checks every file the configuration names (directory, TLS, secrets,
    /// tokens, spam rules) and returns each problem found, for `config
    /// check`.
    pub fn check_files(config: &Config) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(section) = &config.directory
            && let Err(error) = Directory::load(&section.path, &config.identity)
        {
            problems.push(format!("directory.path: {error}"));
        }
        if let Err(error) = Scanner::from_config(&config.scan) {
            problems.push(error);
        }
        if let Err(error) = ActionClients::new(config) {
            problems.push(error);
        }
        if let Some(path) = &config.devices.file {
            match crate::config::devices::DeviceBook::load(path) {
                Err(error) => problems.push(format!("devices.file: {error}")),
                Ok(book) => {
                    for name in &config.devices.exclusions {
                        if book.find(name).is_none() {
                            problems.push(format!(
                                "devices.exclusions: {name:?} is neither an id nor a name in \
                                 {}; check its spelling",
                                path.display()
                            ));
                        }
                    }
                }
            }
        }
        if let Err(error) = crate::admin::Credentials::new(config) {
            problems.push(error);
        }
        if let Err(error) = UpstreamTarget::new(&config.upstream, &config.smtp.hostname) {
            problems.push(error);
        }
        if let (Some(cert), Some(key)) = (&config.smtp.tls_cert_file, &config.smtp.tls_key_file)
            && let Err(error) = crate::tls::acceptor(cert, key)
        {
            problems.push(format!("smtp.tls_cert_file: {error}"));
        }
        problems
    }

    fn with_directory(config: Config, directory: Directory) -> Result<Runtime, String> {
        let scanner = Scanner::from_config(&config.scan)?;
        let actions = ActionClients::new(&config)?;
        let credentials = crate::admin::Credentials::new(&config)?;
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
            actions,
            credentials,
            directory_problem: None,
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
    header_message_id: Option<String>,
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
    shards: Vec<Mutex<SenderCache>>,
    lockout_started: Notify,
    outbox_added: Notify,
    /// Exemptions in force, reloaded from the store after every change.
    exemptions: ArcSwap<Vec<Exemption>>,
    pub metrics: Metrics,
    /// Device health, access decisions and the relay gate.
    devices: crate::heartbeat::Registry,
    /// The dashboard's browser sessions.
    sessions: crate::admin::session::Sessions,
}

/// The failure of a support lift.
#[derive(Debug, thiserror::Error)]
pub enum LiftFailure {
    #[error("{0}")]
    Refused(LiftError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Guard {
    pub fn new(runtime: Runtime, store: Store) -> Guard {
        let capacity = runtime.config.policy.max_tracked_mailboxes;
        let mut metrics = Metrics::new();
        metrics.register_store_local_decisions(store.local_decisions());
        Guard {
            shards: (0..CACHE_SHARDS)
                .map(|_| Mutex::new(LruCache::new(shard_capacity(capacity))))
                .collect(),
            runtime: ArcSwap::from_pointee(runtime),
            devices: crate::heartbeat::Registry::new(store.clone(), Timestamp::now()),
            store,
            lockout_started: Notify::new(),
            outbox_added: Notify::new(),
            exemptions: ArcSwap::from_pointee(Vec::new()),
            metrics,
            sessions: crate::admin::session::Sessions::default(),
        }
    }

    /// Returns the dashboard's browser sessions.
    pub fn sessions(&self) -> &crate::admin::session::Sessions {
        &self.sessions
    }

    /// Reads the exemptions in force from the store.
    ///
    /// # Errors
    /// On a store failure; the exemptions loaded before stay in force.
    pub async fn reload_exemptions(&self) -> Result<(), StoreError> {
        let now = Timestamp::now();
        let active = self.store.active_exemptions(now).await?;
        self.exemptions.store(Arc::new(active));
        Ok(())
    }

    /// Returns the exemptions in force as last loaded.
    pub fn exemptions(&self) -> Arc<Vec<Exemption>> {
        self.exemptions.load_full()
    }

    /// Drops a mailbox's cached state, so the next read comes from the
    /// store; for writes made outside this process.
    pub async fn forget(&self, key: &MailboxKey) {
        self.shard(key).lock().await.pop(key);
    }

    /// Returns a mailbox's current state from the store.
    ///
    /// # Errors
    /// On a store failure.
    pub async fn mailbox_state(&self, key: &MailboxKey) -> Result<MailboxState, StoreError> {
        self.load_stored(key).await
    }

    /// Lifts a permanent block or resets a lockout count, as the support
    /// credential allows, and records the event with `reason`. The caller
    /// has checked the credential.
    ///
    /// # Errors
    /// [`LiftFailure::Refused`] when the policy does not allow it (a timed
    /// lockout, or nothing to lift), or a store failure.
    pub async fn lift(
        &self,
        key: &MailboxKey,
        reset_count: bool,
        reason: &str,
        via: &str,
    ) -> Result<Lifted, LiftFailure> {
        let mut cache = self.shard(key).lock().await;
        let settings = self.runtime().settings();
        let result = self
            .store
            .update_mailbox(key, |state, now| match state.lift(now, reset_count) {
                Ok(lifted) => {
                    let write = MailboxWrite {
                        keep: !state.is_empty(&settings, now),
                        events: vec![Event::lifted(now, key, &lifted, reason, via)],
                        deliveries: Vec::new(),
                    };
                    (Ok(lifted), Some(write))
                }
                Err(refusal) => (Err(refusal), None),
            })
            .await;
        match result {
            Ok((Ok(lifted), state)) => {
                cache.put(key.clone(), state.block);
                tracing::warn!(mailbox = %key, lockouts_before = lifted.lockouts_before,
                    lockouts_after = lifted.lockouts_after, permanent_block_lifted = lifted.block.is_some(),
                    reason, via, "support lifted a block or reset a lockout count");
                Ok(lifted)
            }
            Ok((Err(refusal), _)) => Err(LiftFailure::Refused(refusal)),
            Err(error) => {
                cache.pop(key);
                Err(error.into())
            }
        }
    }

    /// Waits until a delivery is added to the outbox.
    pub async fn outbox_added(&self) {
        tokio::select! {
            _ = self.outbox_added.notified() => {}
            _ = self.devices.outbox_queued() => {}
        }
    }

    /// Returns the device registry.
    /// Returns `synchronized_security.enabled` as stored through the API or
    /// the dashboard, which overrides the file's value; `None` when unset.
    pub fn synchronized_security_override(&self) -> Option<bool> {
        self.devices
            .synchronized_security_override()
            .and_then(|row| row.value.as_bool())
    }

    pub fn devices(&self) -> &crate::heartbeat::Registry {
        &self.devices
    }

    /// Returns the refusal of an SMTP client whose address belongs to an
    /// unsafe device, when the relay gate is on; `stage` names the point
    /// of the refusal in its event.
    pub async fn check_client_device(&self, client: IpAddr, stage: &str) -> Option<Reply> {
        let runtime = self.runtime();
        let refusal = self
            .devices
            .relay_gate(&runtime.config.devices, client, stage, self.store.now())
            .await?;
        Some(Reply::unsafe_device(&refusal.text))
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
        self.devices.reload_book(&runtime.config.devices);
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
        let mut event =
            Event::config_loaded(Timestamp::now(), &config.policy_digest(), policy, reason);
        if let Some(problem) = &runtime.directory_problem {
            event.details.insert(
                "directory_kept".into(),
                format!("directory file not loaded, previous directory kept: {problem}").into(),
            );
        }
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

    fn shard(&self, key: &MailboxKey) -> &Mutex<SenderCache> {
        use std::hash::{BuildHasher, RandomState};
        // The shard only needs to be stable within this process.
        static SEED: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
        let hash = SEED.get_or_init(RandomState::new).hash_one(key);
        &self.shards[(hash as usize) % self.shards.len()]
    }

    /// Returns a mailbox's most recent lockout from the cache, reading the
    /// store on a miss.
    async fn cached_block(
        &self,
        cache: &mut SenderCache,
        key: &MailboxKey,
    ) -> Result<Option<Lockout>, StoreError> {
        if let Some(block) = cache.get(key) {
            return Ok(block.clone());
        }
        let block = self.load_stored(key).await?.block;
        cache.put(key.clone(), block.clone());
        Ok(block)
    }

    /// Reads a mailbox's whole state, strikes included, from the store.
    async fn load_stored(&self, key: &MailboxKey) -> Result<MailboxState, StoreError> {
        Ok(self
            .store
            .load_mailbox(key.clone())
            .await?
            .unwrap_or_default())
    }

    /// Decides whether a sender may send, at MAIL FROM and again at end of
    /// data (for a transaction that passed MAIL FROM before its lockout).
    pub async fn check_sender(&self, transaction: &Transaction) -> SenderCheck {
        // The first command whose reply reaches a client behind Postfix.
        if let Some(reply) = self.check_client_device(transaction.client, "mail").await {
            return SenderCheck::Refuse(reply);
        }
        let runtime = self.runtime();
        let Some(key) = self.attribute(&runtime, transaction).block_key else {
            return SenderCheck::Allow;
        };
        let now = self.store.now();
        let block = {
            let mut cache = self.shard(&key).lock().await;
            match self.cached_block(&mut cache, &key).await {
                Ok(block) => block,
                Err(error) => {
                    tracing::error!(%error, mailbox = %key, transaction = %transaction.id,
                        "cannot read lockout state; answering with a temporary failure");
                    return SenderCheck::Refuse(Reply::local_error());
                }
            }
        };

        match check_block(block.as_ref(), now, runtime.config.policy.mode) {
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
                self.metrics.sender_refused();
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
                self.metrics
                    .message_scanned("scan_failed", started.elapsed().as_secs_f64());
                tracing::warn!(%error, engine = error.engine(), transaction = %transaction.id,
                    client = %transaction.client, mailbox, sender = %transaction.sender_path,
                    "scan failed; answering with a temporary failure");
                return MessageDecision::Reject(Reply::scanner_failed(error.engine()));
            }
        };
        let elapsed = started.elapsed().as_secs_f64();
        self.metrics.message_scanned(verdict.kind(), elapsed);
        let elapsed_ms = elapsed * 1000.0;
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
                        header_message_id: header_message_id(message),
                    }),
                }
            }
            Verdict::Spam { .. } | Verdict::Virus { .. } => {
                let reply = if matches!(verdict, Verdict::Virus { .. }) {
                    Reply::virus(&verdict)
                } else {
                    Reply::spam(&verdict)
                };
                let message_id = header_message_id(message);
                match self
                    .record_bad(transaction, &verdict, message_id, None)
                    .await
                {
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
            .record_bad(
                &pending.transaction,
                &pending.verdict,
                pending.header_message_id,
                queue_id,
            )
            .await;
    }

    /// Records a bad message: the strike (unless the message belongs to no
    /// counted mailbox), any lockout it starts, and the events.
    async fn record_bad(
        &self,
        transaction: &Transaction,
        verdict: &Verdict,
        header_message_id: Option<String>,
        queue_id: Option<String>,
    ) -> Result<(), ()> {
        let runtime = self.runtime();
        let settings = runtime.settings();
        let monitor = settings.mode == Mode::Monitor;
        let attribution = self.attribute(&runtime, transaction);
        let now = self.store.now();
        let facts_event =
            |now: Timestamp, counted: bool, note: Option<&str>, key: Option<&MailboxKey>| {
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
            let event = facts_event(now, false, attribution.uncounted_reason, key);
            tracing::info!(transaction = %transaction.id, sender = %transaction.sender_path,
                verdict = %verdict.summary(), reason = attribution.uncounted_reason, "bad message not counted");
            return self.store.append(vec![event]).await.map_err(|error| {
                tracing::error!(%error, transaction = %transaction.id, "cannot record the bad_message event");
            });
        };

        let exemptions = self.exemptions();
        let exemption_facts = ExemptionFacts {
            mailbox: &key.mailbox,
            login: transaction.login.as_deref(),
            client: transaction.client,
        };
        if let Some(exemption) = crate::policy::find_exemption(&exemptions, &exemption_facts, now) {
            let note = format!(
                "exempt by exemption {} ({}): still rejected, never counted",
                exemption.id, exemption.reason
            );
            tracing::info!(mailbox = %key, transaction = %transaction.id, exemption = exemption.id,
                verdict = %verdict.summary(), "bad message from an exempt sender, not counted");
            let mut event = facts_event(now, false, Some(&note), Some(&key));
            event
                .details
                .insert("exemption_id".into(), exemption.id.into());
            return self.store.append(vec![event]).await.map_err(|error| {
                tracing::error!(%error, mailbox = %key, transaction = %transaction.id,
                    "cannot record the bad_message event");
            });
        }

        let mut cache = self.shard(&key).lock().await;
        let strike = Strike {
            at: now,
            verdict: verdict.summary(),
            message_id: transaction.id.clone(),
            header_message_id,
        };
        let message = transaction.facts();
        // Runs once per attempt; with Redis a conflict runs it again on the
        // newer state, so it only computes, and logs come after the write.
        let apply = |state: &mut MailboxState, now: Timestamp| {
            let mut events = Vec::with_capacity(3);
            let strike = Strike {
                at: now,
                ..strike.clone()
            };
            let (forgiven, outcome) = state.apply_strike(&settings, strike);
            if let (Some(forgiven), Some(forgive_after)) = (&forgiven, settings.forgive_after) {
                events.push(Event::forgiven(&key, forgiven, forgive_after));
            }
            let mut deliveries = Vec::new();
            match &outcome {
                StrikeOutcome::Counted { .. } => {
                    events.push(facts_event(now, true, None, Some(&key)));
                }
                StrikeOutcome::DuringBlock(_) => {
                    events.push(facts_event(
                        now,
                        false,
                        Some("mailbox is locked out; nothing is counted during a lockout"),
                        Some(&key),
                    ));
                }
                StrikeOutcome::LockoutStarted { lockout, strikes } => {
                    events.push(facts_event(now, true, None, Some(&key)));
                    let facts = LockoutFacts {
                        key: &key,
                        lockout,
                        strikes,
                        message: &message,
                        synchronized_security: self.synchronized_security_override(),
                    };
                    deliveries = crate::actions::plan_lockout_started(
                        &runtime.config,
                        &runtime.directory,
                        &facts,
                    );
                    let mut event = Event::lockout_started(&key, &message, lockout, strikes);
                    event
                        .details
                        .insert("deliveries".into(), deliveries_json(&deliveries));
                    events.push(event);
                }
            }
            let write = MailboxWrite {
                keep: !state.is_empty(&settings, now),
                events,
                deliveries: deliveries.clone(),
            };
            ((forgiven, outcome, !deliveries.is_empty()), Some(write))
        };
        let ((forgiven, outcome, queued), state, _) = match self
            .store
            .update_mailbox_for_strike(&key, &strike, apply)
            .await
        {
            Ok(result) => result,
            Err(error) => {
                // Drop the cached copy so the next read gets what the
                // store contains.
                cache.pop(&key);
                tracing::error!(%error, mailbox = %key, transaction = %transaction.id,
                        "cannot record the strike");
                return Err(());
            }
        };
        cache.put(key.clone(), state.block.clone());
        drop(cache);

        if let Some(forgiven) = forgiven {
            tracing::info!(mailbox = %key, lockouts_before = forgiven.lockouts,
                "lockout count forgiven after a quiet period");
        }
        match &outcome {
            StrikeOutcome::Counted { in_window } => {
                self.metrics.strike_counted();
                tracing::info!(mailbox = %key, transaction = %transaction.id, verdict = %verdict.summary(),
                    in_window, threshold = settings.threshold, "strike counted");
            }
            StrikeOutcome::DuringBlock(lockout) => {
                tracing::info!(mailbox = %key, transaction = %transaction.id, level = lockout.level,
                    "bad message during a lockout, not counted");
            }
            StrikeOutcome::LockoutStarted { lockout, .. } => {
                self.metrics.strike_counted();
                self.metrics
                    .lockout_started(lockout.is_permanent(), lockout.enforced);
                tracing::warn!(mailbox = %key, level = lockout.level,
                    until = %lockout.until.map_or("permanent".to_string(), |until| until.to_rfc3339()),
                    monitor = !lockout.enforced, "lockout started");
                self.lockout_started.notify_one();
                if crate::actions::scan_requested(
                    &runtime.config,
                    self.synchronized_security_override(),
                    lockout,
                ) {
                    self.request_agent_scans(&runtime, &key, lockout).await;
                }
            }
        }
        if queued {
            self.outbox_added.notify_one();
        }
        Ok(())
    }

    /// Sends a `scan_requested` notice to the agents of the owner's devices
    /// that the directory lists for `key`'s mailbox. A failure is logged;
    /// the lockout and its webhooks stand regardless.
    // NOTE: the notices are stored after the lockout's own write, so a
    // crash between the two loses the agents' scan request (the webhook,
    // written with the lockout, is kept).
    async fn request_agent_scans(&self, runtime: &Runtime, key: &MailboxKey, lockout: &Lockout) {
        let Some(entry) = runtime.directory.entry(&key.mailbox) else {
            return;
        };
        let devices: Vec<String> = entry
            .devices
            .iter()
            .map(|device| device.id.clone())
            .collect();
        if devices.is_empty() {
            return;
        }
        let details = serde_json::json!({
            "mailbox": key.mailbox,
            "owner": entry.owner.as_ref().map(|owner| owner.id.clone()),
            "lockout": lockout.level,
            "reason": "the owner's mailbox was locked out for sending viruses or spam",
        });
        if let Err(error) = self
            .devices
            .request_scans(&devices, &details, lockout.started)
            .await
        {
            tracing::error!(%error, mailbox = %key, devices = ?devices,
                "cannot send the scan request to the devices' agents");
        }
    }

    /// Sets back the lockout count of every mailbox whose quiet period of
    /// `forgive_after` has passed, so its ledger and the events show it
    /// without waiting for its next bad message; returns how many.
    ///
    /// # Errors
    /// On a store failure.
    pub async fn forgive_due(&self) -> Result<usize, StoreError> {
        let settings = self.runtime().settings();
        let Some(forgive_after) = settings.forgive_after else {
            return Ok(0);
        };
        let now = self.store.now();
        let ended_before = now.saturating_sub(forgive_after);
        let keys = self.store.quiet_since(ended_before).await?;
        let mut forgiven_count = 0;
        for key in keys {
            let mut cache = self.shard(&key).lock().await;
            let (forgiven, state) = self
                .store
                .update_mailbox(&key, |state, now| {
                    let Some(forgiven) = state.forgive(&settings, now) else {
                        return (None, None);
                    };
                    let write = MailboxWrite {
                        keep: !state.is_empty(&settings, now),
                        events: vec![Event::forgiven(&key, &forgiven, forgive_after)],
                        deliveries: Vec::new(),
                    };
                    (Some(forgiven), Some(write))
                })
                .await?;
            let Some(forgiven) = forgiven else {
                continue;
            };
            tracing::info!(mailbox = %key, lockouts_before = forgiven.lockouts,
                "lockout count forgiven after a quiet period");
            cache.put(key, state.block);
            forgiven_count += 1;
        }
        Ok(forgiven_count)
    }

    /// Records the end of every timed lockout that has ended, at its end
    /// time, and returns when the next one is due.
    async fn record_due_ends(&self) -> Result<Option<Timestamp>, StoreError> {
        let now = self.store.now();
        for key in self.store.due_ends(now).await? {
            let mut cache = self.shard(&key).lock().await;
            let runtime = self.runtime();
            // The store, not the cache, lists the end as pending, and the
            // update reads the store.
            let (ended, state) = self
                .store
                .update_mailbox(&key, |state, now| {
                    let Some(lockout) = state.unrecorded_end(now).cloned() else {
                        return (None, None);
                    };
                    state.mark_end_recorded();
                    let deliveries = crate::actions::plan_lockout_ended(
                        &runtime.config,
                        &runtime.directory,
                        &key,
                        &lockout,
                    );
                    let mut event = Event::lockout_ended(&key, &lockout);
                    event
                        .details
                        .insert("deliveries".into(), deliveries_json(&deliveries));
                    let queued = !deliveries.is_empty();
                    let write = MailboxWrite {
                        keep: true,
                        events: vec![event],
                        deliveries,
                    };
                    (Some((lockout, queued)), Some(write))
                })
                .await?;
            let Some((lockout, queued)) = ended else {
                continue;
            };
            tracing::info!(mailbox = %key, level = lockout.level, "lockout ended");
            cache.put(key, state.block);
            if queued {
                self.outbox_added.notify_one();
            }
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
            let wait = match self.timer_turn().await {
                Ok(Some(next)) => next.since(self.store.now()),
                Ok(None) => std::time::Duration::from_secs(3600),
                Err(error) => {
                    tracing::error!(%error, "cannot record lockout ends; retrying");
                    RETRY
                }
            };
            // With Redis, another host may hold the lease or start a
            // lockout, so this host looks again within one lease period.
            let wait = match self.store.shared() {
                Some(_) => wait.min(TIMER_LEASE / 3),
                None => wait,
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.lockout_started.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Records due lockout ends: always with SQLite, and with Redis only
    /// on the host holding the timer lease, which also finishes work that
    /// other hosts left pending.
    async fn timer_turn(&self) -> Result<Option<Timestamp>, StoreError> {
        let Some(shared) = self.store.shared() else {
            return self.record_due_ends().await;
        };
        self.merge_fallback_strikes().await?;
        if !shared.hold_lease("timers", TIMER_LEASE).await? {
            return self.store.next_pending_end().await;
        }
        let queued = shared.sweep(false).await?;
        if queued > 0 {
            self.outbox_added.notify_one();
        }
        self.record_due_ends().await
    }
}

/// Length of the lease that lets one host with Redis record lockout ends
/// and finish work other hosts left pending.
const TIMER_LEASE: std::time::Duration = std::time::Duration::from_secs(6);

/// Lists the deliveries queued for a lockout, for its event.
fn deliveries_json(deliveries: &[OutboxEntry]) -> serde_json::Value {
    deliveries
        .iter()
        .map(|entry| {
            serde_json::json!({
                "action": entry.kind.as_str(),
                "delivery_id": entry.delivery_id,
            })
        })
        .collect()
}

/// Returns the `Message-ID` header field of a message, unfolded and cut to
/// 256 characters, so alerts can name the message as its sender's mail client shows it.
fn header_message_id(message: &[u8]) -> Option<String> {
    const MAX_LENGTH: usize = 256;
    let end = find_header_end(message);
    let header = &message[..end];
    let mut lines = header.split(|&byte| byte == b'\n').peekable();
    while let Some(line) = lines.next() {
        let Some(colon) = line.iter().position(|&byte| byte == b':') else {
            continue;
        };
        if !line[..colon]
            .trim_ascii()
            .eq_ignore_ascii_case(b"message-id")
        {
            continue;
        }
        let mut value = line[colon + 1..].to_vec();
        // Continuation lines start with a space or a tab.
        while let Some(next) =
            lines.next_if(|next| next.first().is_some_and(|b| *b == b' ' || *b == b'\t'))
        {
            value.push(b' ');
            value.extend_from_slice(next);
        }
        let text: String = String::from_utf8_lossy(&value)
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if text.is_empty() {
            return None;
        }
        return Some(text.chars().take(MAX_LENGTH).collect());
    }
    None
}

/// Returns the length of the header section: up to the first empty line, or
/// the whole message when there is none.
fn find_header_end(message: &[u8]) -> usize {
    let mut start = 0;
    for (index, &byte) in message.iter().enumerate() {
        if byte == b'\n' {
            let line = &message[start..index];
            if line.is_empty() || line == b"\r" {
                return start;
            }
            start = index + 1;
        }
    }
    message.len()
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

    #[test]
    fn message_id_header_found() {
        let message = b"Subject: x\r\nmessage-ID:\r\n <a.b@example.org>\r\n\r\nbody\r\n";
        assert_eq!(
            header_message_id(message).as_deref(),
            Some("<a.b@example.org>")
        );
    }

    #[test]
    fn message_id_in_body_ignored() {
        let message = b"Subject: x\r\n\r\nMessage-ID: <not@header>\r\n";
        assert_eq!(header_message_id(message), None);
    }

    #[test]
    fn message_id_controls_removed() {
        let message = b"Message-ID: <a\x1b[31m@b>\r\n\r\n";
        assert_eq!(header_message_id(message).as_deref(), Some("<a [31m@b>"));
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
