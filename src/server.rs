//! `sendguard serve`: start-up, the accept loop, reloads and shutdown.

use crate::config::{Config, SmtpConfig};
use crate::guard::{Guard, Runtime};
use crate::milter::MilterListener;
use crate::smtp::session::{Session, SessionShared};
use crate::smtp::upstream::UpstreamConnection;
use crate::smtp::upstream::pool::{close_all, close_in_background};
use crate::store::Store;
use arc_swap::ArcSwapOption;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

/// How long open sessions may take to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// A failure that prevents the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Runtime(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen for milter connections on {listen}: {source}")]
    MilterBind {
        listen: String,
        source: std::io::Error,
    },
    #[error("cannot listen for the admin API on {address} (admin.listen): {source}")]
    AdminBind {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// Loads the configuration, opens the store, binds the listener and serves
/// until SIGTERM or SIGINT. SIGHUP reloads the configuration.
///
/// # Errors
/// When the configuration is invalid, the store cannot be opened or the
/// listener cannot be bound.
pub async fn serve(config_path: &Path) -> Result<(), ServeError> {
    let config = Config::load(config_path)?;
    for warning in config.warnings() {
        tracing::warn!(key = %warning.key, "{}", warning.message);
    }
    let store = Store::from_config(&config.store, config.events.keep)?;
    let listen = config.smtp.listen;
    let milter_listen = config.milter.as_ref().map(|milter| milter.listen.clone());
    let admin_listen = config.admin.listen;
    let runtime = Runtime::new(config).map_err(ServeError::Runtime)?;
    let guard = Arc::new(Guard::new(runtime, store));
    guard
        .devices()
        .load_book(&guard.runtime().config.devices)
        .map_err(ServeError::Runtime)?;
    // Device states are read before any listener opens, so no report can
    // be overwritten by the stored state.
    guard.devices().load().await?;
    let (shutdown_sender, shutdown) = watch::channel(false);
    prepare_shared_store(&guard, &shutdown).await;
    // Counts whose quiet period passed while sendguard was stopped are
    // forgiven before the first client can send.
    if let Err(error) = guard.forgive_due().await {
        tracing::error!(%error, "cannot apply forgive_after at start; retrying in the background");
    }

    // Signal handlers go in before the listener opens: a SIGHUP that
    // arrives before them would end the process with the default action.
    let hangups = signal(SignalKind::hangup())
        .map_err(|error| ServeError::Runtime(format!("cannot watch SIGHUP: {error}")))?;
    let terminate = signal(SignalKind::terminate())
        .map_err(|error| ServeError::Runtime(format!("cannot watch SIGTERM: {error}")))?;
    let interrupt = signal(SignalKind::interrupt())
        .map_err(|error| ServeError::Runtime(format!("cannot watch SIGINT: {error}")))?;
    // The milter listener is bound first, so a reachable SMTP listener
    // means both are ready.
    let milter_listener = match milter_listen {
        Some(milter_listen) => Some(MilterListener::bind(&milter_listen).await.map_err(
            |source| ServeError::MilterBind {
                listen: milter_listen,
                source,
            },
        )?),
        None => None,
    };
    let admin_listener = match admin_listen {
        Some(address) => Some(
            TcpListener::bind(address)
                .await
                .map_err(|source| ServeError::AdminBind { address, source })?,
        ),
        None => None,
    };
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            address: listen,
            source,
        })?;
    tracing::info!(listen = %listen, config = %config_path.display(), "sendguard started");
    guard.record_config_loaded("start").await;

    tokio::spawn(reload_on_hangup(
        guard.clone(),
        config_path.to_path_buf(),
        hangups,
    ));
    tokio::spawn(async move {
        wait_for_termination(terminate, interrupt).await;
        tracing::info!("shutdown requested; finishing open sessions");
        let _ = shutdown_sender.send(true);
    });
    if let Some(admin_listener) = admin_listener {
        tokio::spawn(crate::admin::serve(
            admin_listener,
            guard.clone(),
            shutdown.clone(),
        ));
    }
    let milter = milter_listener.map(|milter_listener| {
        tokio::spawn(crate::milter::run(
            milter_listener,
            guard.clone(),
            shutdown.clone(),
        ))
    });
    run(listener, guard, shutdown).await;
    if let Some(milter) = milter {
        let _ = milter.await;
    }
    tracing::info!("sendguard stopped");
    Ok(())
}

/// With the Redis backend: measures Redis's clock, subscribes to other
/// hosts' changes before any sender is checked, and finishes work that a
/// stopped host left pending between a lockout and its deliveries. Redis
/// being down is logged, never fatal: the relay then replies as
/// `store.on_store_error` sets.
async fn prepare_shared_store(guard: &Arc<Guard>, shutdown: &watch::Receiver<bool>) {
    let Some(shared) = guard.store().shared().cloned() else {
        return;
    };
    tokio::spawn(guard.clone().run_cache_invalidation(shutdown.clone()));
    let now = match shared.time().await {
        Ok(now) => {
            tracing::info!(host = shared.host(), redis_time = %now.to_rfc3339(),
                offset_ms = now.millis() - crate::policy::Timestamp::now().millis(),
                "Redis store reachable");
            now
        }
        Err(error) => {
            tracing::error!(%error, host = shared.host(),
                "Redis store not reachable at start; the relay replies as store.on_store_error sets until it is");
            return;
        }
    };
    if let Err(error) = guard.devices().renew_shared_start(now).await {
        tracing::error!(%error, host = shared.host(),
            "cannot read the hosts' shared start; missing devices count from this host's start until the device timer renews it");
    }
    match shared.sweep(true).await {
        Ok(0) => {}
        Ok(queued) => {
            tracing::warn!(
                deliveries = queued,
                "start-up sweep queued deliveries another host left pending"
            );
        }
        Err(error) => {
            tracing::error!(%error, "start-up sweep of pending Redis work failed; the timer lease holder retries it")
        }
    }
}

/// Serves SMTP on `listener` until `shutdown` becomes true, then waits up
/// to the grace period for open sessions.
pub async fn run(listener: TcpListener, guard: Arc<Guard>, mut shutdown: watch::Receiver<bool>) {
    let (probed_sender, upstream_probed) = watch::channel(false);
    let shared = Arc::new(SessionShared {
        guard: guard.clone(),
        upstream_capabilities: ArcSwapOption::empty(),
        upstream_probed,
    });
    tokio::spawn(guard.clone().run_lockout_timer(shutdown.clone()));
    tokio::spawn(crate::actions::run_outbox(guard.clone(), shutdown.clone()));
    tokio::spawn(crate::heartbeat::run_device_timer(
        guard.clone(),
        shutdown.clone(),
    ));
    if let Err(error) = guard.reload_exemptions().await {
        tracing::error!(%error, "cannot read the exemptions; none is in force until the next change");
    }
    tokio::spawn(crate::maintenance::run_maintenance(
        guard.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(probe_dependencies(shared.clone(), probed_sender));
    tokio::spawn(sweep_kept_sessions(guard.clone(), shutdown.clone()));

    let prefix = session_prefix();
    let connections = ConnectionCounts::default();
    let counter = AtomicU64::new(0);
    let mut sessions = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => break,
        };
        // Reap finished sessions so the set does not grow without bound.
        while sessions.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Running out of file descriptors is the usual cause; pause
                // briefly instead of spinning.
                tracing::error!(%error, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let id = format!("{prefix}{:x}", counter.fetch_add(1, Ordering::Relaxed));
        let span = tracing::info_span!("session", id = %id, peer = %peer);
        let slot = match connections.admit(peer.ip().to_canonical(), &guard.runtime().config.smtp) {
            Ok(slot) => slot,
            Err(scope) => {
                span.in_scope(|| {
                    tracing::info!(scope, "connection limit reached; connection refused")
                });
                tokio::spawn(refuse_connection(stream, scope).instrument(span));
                continue;
            }
        };
        let session = Session::new(shared.clone(), stream, peer, id, shutdown.clone());
        sessions.spawn(
            async move {
                session.run().await;
                drop(slot);
            }
            .instrument(span),
        );
    }

    drop(listener);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = sessions.len(),
            "grace period over; closing the remaining sessions"
        );
        sessions.abort_all();
    }
    close_all(
        guard.runtime().upstream.pool.drain(),
        Duration::from_secs(5),
    )
    .await;
}

/// Closes idle upstream and clamd sessions once they are past their idle
/// time or age, or the peer ended them, and the upstream sessions of a
/// configuration that a reload replaced.
async fn sweep_kept_sessions(guard: Arc<Guard>, mut shutdown: watch::Receiver<bool>) {
    let mut runtime = guard.runtime();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
        let current = guard.runtime();
        if !Arc::ptr_eq(&runtime, &current) {
            close_in_background(runtime.upstream.pool.drain());
            runtime = current;
        }
        close_in_background(runtime.upstream.pool.remove_stale(Instant::now()));
        runtime.scanner.remove_stale_sessions();
    }
}

/// Connections open now, in total and per client address.
#[derive(Clone, Default)]
struct ConnectionCounts(Arc<Mutex<ConnectionTally>>);

#[derive(Default)]
struct ConnectionTally {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

/// One admitted connection; dropping it frees its place.
struct ConnectionSlot {
    counts: ConnectionCounts,
    client: IpAddr,
}

impl ConnectionCounts {
    /// Admits a connection from `client` under the configured limits, or
    /// returns which limit it would exceed.
    fn admit(&self, client: IpAddr, smtp: &SmtpConfig) -> Result<ConnectionSlot, &'static str> {
        let mut tally = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if tally.total >= smtp.max_connections {
            return Err("in total");
        }
        let from_client = tally.per_client.get(&client).copied().unwrap_or(0);
        if from_client >= smtp.max_connections_per_client {
            return Err("from your address");
        }
        tally.total += 1;
        tally.per_client.insert(client, from_client + 1);
        Ok(ConnectionSlot {
            counts: self.clone(),
            client,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut tally = self
            .counts
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        tally.total = tally.total.saturating_sub(1);
        if let Some(count) = tally.per_client.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                tally.per_client.remove(&self.client);
            }
        }
    }
}

/// Answers a connection over the limits with `421` and closes it.
async fn refuse_connection(mut stream: tokio::net::TcpStream, scope: &str) {
    use tokio::io::AsyncWriteExt;
    let reply = crate::reply::Reply::too_many_connections(scope).to_wire();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.write_all(&reply)).await;
}

/// Returns a random prefix that makes session ids unique across restarts.
fn session_prefix() -> String {
    format!("{:06x}", rand::random::<u32>() & 0xff_ffff)
}

/// Learns the upstream's extensions and checks clamd, rspamd and spamd at
/// start, and logs a warning for each one that cannot be reached. Sessions
/// retry all of them per transaction.
async fn probe_dependencies(shared: Arc<SessionShared>, probed: watch::Sender<bool>) {
    let runtime = shared.guard.runtime();
    match UpstreamConnection::connect(&runtime.upstream).await {
        Ok(connection) => {
            tracing::info!(upstream = %runtime.config.upstream.address,
                capabilities = ?connection.capabilities(), "upstream reachable");
            shared
                .upstream_capabilities
                .store(Some(Arc::new(connection.capabilities().clone())));
            // Kept for the first client, like any session that ends.
            if let Some(connection) = runtime.upstream.pool.put(connection, Instant::now()) {
                connection.quit().await;
            }
        }
        Err(error) => {
            tracing::warn!(%error, "upstream not reachable at start; will retry per transaction")
        }
    }
    let _ = probed.send(true);
    match runtime.scanner.ping().await {
        Ok(Some(version)) => tracing::info!(clamd = %version, "clamd reachable"),
        Ok(None) => tracing::info!("no clamd configured; messages are not scanned for viruses"),
        Err(error) => tracing::warn!(%error, "clamd not reachable at start"),
    }
    for (engine, address, answer) in runtime.scanner.ping_spam_engines().await {
        match answer {
            Ok(reply) => tracing::info!(engine, address, reply, "spam engine reachable"),
            Err(error) => tracing::warn!(engine, address, %error,
                "spam engine not reachable at start; will retry per message"),
        }
    }
}

async fn reload_on_hangup(guard: Arc<Guard>, path: PathBuf, mut hangups: Signal) {
    while hangups.recv().await.is_some() {
        reload(&guard, &path).await;
    }
}

/// Reloads the configuration file; an invalid file keeps the running
/// configuration.
pub async fn reload(guard: &Guard, path: &Path) {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(crate::config::ConfigError::Invalid { path, problems }) => {
            // One line, so log collectors keep the problems together.
            let problems: Vec<String> = problems.0.iter().map(ToString::to_string).collect();
            tracing::warn!(config = %path.display(), problems = %problems.join("; "),
                "reload failed; the running configuration stays in force");
            return;
        }
        Err(error) => {
            tracing::warn!(%error, "reload failed; the running configuration stays in force");
            return;
        }
    };
    let current = guard.runtime();
    let milter_changed = match (&config.milter, &current.config.milter) {
        (Some(new), Some(old)) => new.listen != old.listen || new.timeout != old.timeout,
        (None, None) => false,
        _ => true,
    };
    if config.smtp.listen != current.config.smtp.listen
        || config.store != current.config.store
        || config.admin.listen != current.config.admin.listen
        || milter_changed
    {
        tracing::warn!(
            "smtp.listen, [store], admin.listen and [milter] take effect only after a restart"
        );
    }
    match Runtime::reload(config, &current) {
        Ok(runtime) => {
            guard.replace_runtime(runtime, "reload").await;
            tracing::info!(config = %path.display(), "configuration reloaded");
        }
        Err(error) => {
            tracing::warn!(%error, "reload failed; the running configuration stays in force")
        }
    }
}

async fn wait_for_termination(mut terminate: Signal, mut interrupt: Signal) {
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
}
