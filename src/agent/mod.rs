//! `sendguard agent`: the endpoint agent for Linux devices and servers.
//!
//! It reports the device's health to the server in a heartbeat every
//! `interval` and signs off as offline when it stops or the system
//! suspends. It follows the device's event stream and keeps the nftables
//! table `inet sendguard_agent`, which refuses connections from and to
//! unsafe peers. When the server requests a scan, it runs clamd.
//! When the server stays unreachable for `enforcement.keep_unsafe_list`,
//! the agent removes its table (fails open), so a server outage cannot cut
//! a network apart.

pub mod api;
pub mod config;
pub mod enforce;
pub mod health;
pub mod nft;
pub mod scan;
pub mod state;
pub mod stream;

use crate::admin::devices::MAX_ADDRESSES;
use api::Api;
use config::AgentConfig;
use enforce::Desired;
use serde_json::{Value, json};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};

/// Time allowed for the offline heartbeat when the agent stops.
const SIGN_OFF_TIMEOUT: Duration = Duration::from_secs(5);

/// Minimum time between two log lines about failing heartbeats; the
/// failures in between are counted into the next line.
const HEARTBEAT_FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The state the agent's tasks share.
pub struct Agent {
    pub config: AgentConfig,
    pub api: Api,
    started: Instant,
    /// When the server last replied to a request or sent stream data.
    last_contact: Mutex<Option<Instant>>,
    refresh: Notify,
    heartbeat_now: Notify,
    /// Wakes the event stream's reconnect wait when the server replies to
    /// another request.
    reachable: Notify,
    /// The finding of the last on-demand scan, when it was not clean.
    scan_finding: Mutex<Option<health::Finding>>,
    /// The stream position, pending scan requests and last scan result,
    /// kept in the state file.
    pub state: state::StateFile,
    /// Wakes the scanner when a scan request is added to `state`.
    scan_requested: Notify,
}

impl Agent {
    /// Records that the server replied.
    pub fn contact(&self) {
        *self
            .last_contact
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = Some(Instant::now());
        self.reachable.notify_waiters();
    }

    /// Returns the time since the server last replied, or since the agent
    /// started when it never did.
    pub fn since_contact(&self) -> Duration {
        let last = *self
            .last_contact
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        last.unwrap_or(self.started).elapsed()
    }

    /// Asks for a full refresh of the unsafe list.
    pub fn request_refresh(&self) {
        self.refresh.notify_one();
    }

    fn scan_finding(&self) -> Option<health::Finding> {
        self.scan_finding
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    fn set_scan_finding(&self, finding: Option<health::Finding>) {
        *self
            .scan_finding
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = finding;
    }
}

/// Removes the agent's nftables table, for `sendguard agent
/// --uninstall-rules`.
///
/// # Errors
/// When nft fails.
pub async fn uninstall_rules(nft_program: &std::path::Path) -> Result<(), String> {
    nft::apply(nft_program, &nft::removal_script()).await?;
    tracing::info!(table = nft::TABLE, "nftables table removed");
    Ok(())
}

/// Runs the agent until SIGTERM or SIGINT, then signs off as offline and
/// removes the table.
///
/// # Errors
/// When the token cannot be read, the HTTP client cannot be built, nft
/// fails while enforcement is enabled, or the signal handlers cannot be
/// installed.
pub async fn run(config: AgentConfig) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = config.token()?;
    if let Some(mode) = config.token_file_exposed() {
        tracing::warn!(path = %config.token_file.display(), mode = %format!("{mode:o}"),
            "the token file is readable or writable by other users; make it readable by root only (chmod 600)");
    }
    let api = Api::new(&config, token)?;
    if config.enforcement.enabled {
        // Peers count on a device that sends heartbeats to refuse unsafe
        // devices itself, so an agent that cannot run nft must not start.
        // A table left by an earlier run enforces a list that may be
        // stale; it comes back with the first refresh.
        nft::apply(&config.enforcement.nft, &nft::removal_script())
            .await
            .map_err(|error| {
                format!(
                    "enforcement: cannot remove a table left by an earlier run: {error}; the agent \
                     needs nft and CAP_NET_ADMIN, or set enforcement.enabled = false"
                )
            })?;
    }
    let state_path = config.state_path(std::env::var_os("STATE_DIRECTORY").as_deref());
    match &state_path {
        Some(path) => tracing::info!(path = %path.display(), "agent state file"),
        None => tracing::warn!(
            "no state_file set and no systemd state directory; a restarted agent misses scan \
             requests stored while it was down and forgets an infected scan result"
        ),
    }
    let state = state::StateFile::load(state_path);
    let restored = state.get();
    let agent = Arc::new(Agent {
        config,
        api,
        started: Instant::now(),
        last_contact: Mutex::new(None),
        refresh: Notify::new(),
        heartbeat_now: Notify::new(),
        reachable: Notify::new(),
        scan_finding: Mutex::new(restored.last_scan.as_ref().and_then(scan_finding)),
        state,
        scan_requested: Notify::new(),
    });
    if restored.stream_position.is_some() || !restored.pending_scans.is_empty() {
        tracing::info!(stream_position = ?restored.stream_position,
            pending_scans = restored.pending_scans.len(),
            last_scan = restored.last_scan.as_ref().map(scan::ScanOutcome::result),
            "agent state restored");
    }
    let mut terminate = signal(SignalKind::terminate())
        .map_err(|error| format!("cannot handle SIGTERM: {error}"))?;
    let mut interrupt = signal(SignalKind::interrupt())
        .map_err(|error| format!("cannot handle SIGINT: {error}"))?;
    let (shutdown_sender, shutdown) = watch::channel(false);
    let (desired_sender, desired) = watch::channel::<Option<Desired>>(None);

    tracing::info!(device = %agent.config.device, server = %agent.config.server,
        interval = ?agent.config.interval, enforcement = agent.config.enforcement.enabled,
        "sendguard agent started");
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(heartbeats(agent.clone(), shutdown.clone()));
    tasks.spawn(refresher(agent.clone(), desired_sender, shutdown.clone()));
    tasks.spawn(stream::run(agent.clone(), shutdown.clone()));
    tasks.spawn(scanner(agent.clone(), shutdown.clone()));
    tasks.spawn(watch_sleep(agent.clone(), shutdown.clone()));
    if agent.config.enforcement.enabled {
        tasks.spawn(enforce::run(agent.clone(), desired, shutdown.clone()));
    }

    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received; agent stopping"),
        _ = interrupt.recv() => tracing::info!("SIGINT received; agent stopping"),
    }
    let _ = shutdown_sender.send(true);
    sign_off(&agent, "the agent stops").await;
    while tasks.join_next().await.is_some() {}
    tracing::info!("sendguard agent stopped");
    Ok(())
}

async fn sign_off(agent: &Agent, why: &str) {
    match tokio::time::timeout(SIGN_OFF_TIMEOUT, agent.api.heartbeat("offline", &[], &[])).await {
        Ok(Ok(_)) => tracing::info!(reason = why, "signed off as offline"),
        Ok(Err(error)) => tracing::warn!(%error, reason = why, "cannot sign off as offline"),
        Err(_) => tracing::warn!(
            reason = why,
            "cannot sign off as offline: the server did not answer in time"
        ),
    }
}

/// Keeps the first addresses the server accepts in one heartbeat, which
/// rejects a heartbeat with more. Returns the kept addresses and the
/// number left out.
fn cap_addresses(mut addresses: Vec<IpAddr>) -> (Vec<IpAddr>, usize) {
    let left_out = addresses.len().saturating_sub(MAX_ADDRESSES);
    addresses.truncate(MAX_ADDRESSES);
    (addresses, left_out)
}

async fn addresses(config: &AgentConfig) -> Vec<IpAddr> {
    if !config.addresses.is_empty() {
        return config.addresses.clone();
    }
    match api::interface_addresses().await {
        Ok(addresses) => addresses,
        Err(error) => {
            tracing::warn!(%error, "cannot read the interface addresses; the heartbeat carries none");
            Vec::new()
        }
    }
}

/// Sends a heartbeat every interval, and at once after a scan.
async fn heartbeats(agent: Arc<Agent>, mut shutdown: watch::Receiver<bool>) {
    let mut last: Option<(crate::heartbeat::Health, Vec<String>)> = None;
    let mut last_left_out = 0;
    let mut failures = FailureLog::default();
    loop {
        let findings = health::evaluate(&agent.config, agent.scan_finding()).await;
        let (health, reasons) = health::combine(&findings);
        if last.as_ref() != Some(&(health, reasons.clone())) {
            if reasons.is_empty() {
                tracing::info!(health = health.as_str(), "device health");
            } else {
                tracing::warn!(health = health.as_str(), reasons = ?reasons, "device health");
            }
            last = Some((health, reasons.clone()));
        }
        let (addresses, left_out) = cap_addresses(addresses(&agent.config).await);
        if left_out != last_left_out && left_out > 0 {
            // NOTE: peers know the device only by the reported addresses, so
            // they do not refuse connections from the addresses left out.
            tracing::warn!(
                reported = addresses.len(),
                left_out,
                "the device has more global addresses than a heartbeat may carry; reporting the first ones"
            );
        }
        last_left_out = left_out;
        let sent = agent
            .api
            .heartbeat(health.as_str(), &addresses, &reasons)
            .await
            .and_then(|view| check_heartbeat_reply(&view).map(|()| view));
        match sent {
            Ok(view) => {
                agent.contact();
                agent.request_refresh();
                if let Some((failed, failing_for)) = failures.succeeded(Instant::now()) {
                    tracing::info!(failed, failing_for = ?Duration::from_secs(failing_for.as_secs()),
                        "heartbeats succeed again");
                }
                tracing::debug!(health = health.as_str(), state = %view["state"], "heartbeat sent");
            }
            Err(error) => {
                if let Some(failed_since_last_line) = failures.failed(Instant::now()) {
                    tracing::warn!(%error, health = health.as_str(), failed_since_last_line,
                        "heartbeat failed");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(agent.config.interval) => {}
            _ = agent.heartbeat_now.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Rate limit of a repeating failure's log line, such as "heartbeat
/// failed": the first failure is logged, then at most one line per
/// [`HEARTBEAT_FAILURE_LOG_INTERVAL`].
#[derive(Debug, Default)]
pub(crate) struct FailureLog {
    /// When the current run of failures began.
    failing_since: Option<Instant>,
    /// Failures in the current run.
    failed: u64,
    /// Failures not yet counted in a log line.
    unlogged: u64,
    last_line: Option<Instant>,
}

impl FailureLog {
    /// Counts a failure at `now`. Returns the number of failures to put in
    /// a log line (this one included), or `None` when no line is due.
    pub(crate) fn failed(&mut self, now: Instant) -> Option<u64> {
        self.failing_since.get_or_insert(now);
        self.failed += 1;
        self.unlogged += 1;
        let due = self
            .last_line
            .is_none_or(|last| now.duration_since(last) >= HEARTBEAT_FAILURE_LOG_INTERVAL);
        if !due {
            return None;
        }
        self.last_line = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }

    /// Ends a run of failures at `now`. Returns its number of failures and
    /// its length, or `None` when the previous heartbeat succeeded too.
    pub(crate) fn succeeded(&mut self, now: Instant) -> Option<(u64, Duration)> {
        let since = self.failing_since.take()?;
        let failed = self.failed;
        *self = FailureLog::default();
        Some((failed, now.duration_since(since)))
    }
}

/// Checks that a heartbeat's reply is the device's view, so that a reply
/// of another service does not count as contact with the server.
fn check_heartbeat_reply(view: &Value) -> Result<(), String> {
    if view["state"].is_string() {
        Ok(())
    } else {
        Err(
            "heartbeat: the reply has no \"state\" field; check that server is sendguard's \
             admin API"
                .to_string(),
        )
    }
}

/// Reads the subnet view on every request and publishes what the table
/// should enforce.
async fn refresher(
    agent: Arc<Agent>,
    desired: watch::Sender<Option<Desired>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut server_addresses = Vec::new();
    loop {
        tokio::select! {
            _ = agent.refresh.notified() => {}
            _ = shutdown.changed() => return,
        }
        if server_addresses.is_empty() {
            server_addresses = resolve_server(&agent.config.server).await;
        }
        let view = agent
            .api
            .subnet()
            .await
            .and_then(|view| enforce::check_view(&view).map(|()| view));
        match view {
            Ok(view) => {
                agent.contact();
                let mut next = enforce::desired_from_view(&view);
                // The server stays reachable whatever the health, or an
                // unsafe device could never report that it is safe again.
                next.ruleset.excluded.extend(&server_addresses);
                next.ruleset.excluded.sort();
                next.ruleset.excluded.dedup();
                desired.send_if_modified(|current| {
                    if current.as_ref() == Some(&next) {
                        return false;
                    }
                    tracing::info!(unsafe_peers = ?next.ruleset.unsafe_peers,
                        own_unsafe = !next.ruleset.own_subnets.is_empty(), "unsafe list refreshed");
                    *current = Some(next);
                    true
                });
            }
            Err(error) => {
                tracing::warn!(%error, "cannot refresh the unsafe list; the last one stays in force")
            }
        }
    }
}

/// Resolves the server URL's host to its addresses; empty (with a
/// warning) when it cannot be resolved yet.
async fn resolve_server(server: &str) -> Vec<IpAddr> {
    let Ok(url) = reqwest::Url::parse(server) else {
        return Vec::new();
    };
    let port = url.port_or_known_default().unwrap_or(80);
    let Some(host) = url.host_str() else {
        return Vec::new();
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(address) = host.parse::<IpAddr>() {
        return vec![address];
    }
    match tokio::net::lookup_host((host, port)).await {
        Ok(addresses) => addresses.map(|address| address.ip()).collect(),
        Err(error) => {
            tracing::warn!(%error, server, "cannot resolve the server's name; it is not yet exempt from refusals");
            Vec::new()
        }
    }
}

/// Maximum number of scan errors named in logs, the health reason and the
/// scan report; the rest are counted.
const NAMED_SCAN_ERRORS: usize = 5;

/// Joins the first scan errors and counts the rest, so that a scan of many
/// unreadable files gives a short reason, log line and report.
fn summarize_errors(errors: &[String]) -> String {
    let mut text = errors
        .iter()
        .take(NAMED_SCAN_ERRORS)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if errors.len() > NAMED_SCAN_ERRORS {
        text.push_str(&format!("; and {} more", errors.len() - NAMED_SCAN_ERRORS));
    }
    text
}

/// Returns the health finding of a scan outcome; `None` when clean.
fn scan_finding(outcome: &scan::ScanOutcome) -> Option<health::Finding> {
    match outcome.result() {
        "infected" => {
            let list: Vec<String> = outcome
                .findings
                .iter()
                .take(5)
                .map(|finding| format!("{} ({})", finding.path, finding.signature))
                .collect();
            Some(health::Finding {
                health: crate::heartbeat::Health::Red,
                reason: format!(
                    "the on-demand scan found {} infected files: {}",
                    outcome.findings.len(),
                    list.join(", ")
                ),
            })
        }
        "failed" => Some(health::Finding {
            health: crate::heartbeat::Health::Yellow,
            reason: format!(
                "the on-demand scan could not scan everything: {}",
                summarize_errors(&outcome.errors)
            ),
        }),
        _ => None,
    }
}

/// Runs the pending scan requests, reports each result and updates the
/// health. Requests that arrive while a scan runs are served together by
/// the next scan.
async fn scanner(agent: Arc<Agent>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let pending = agent.state.get().pending_scans;
        if pending.is_empty() {
            tokio::select! {
                _ = agent.scan_requested.notified() => continue,
                _ = shutdown.changed() => return,
            }
        }
        let notices: Vec<i64> = pending.iter().map(|request| request.notice).collect();
        let config = &agent.config.scan;
        let mailboxes: Vec<&Value> = pending
            .iter()
            .map(|request| &request.body["mailbox"])
            .collect();
        tracing::warn!(notices = ?notices, mailboxes = ?mailboxes, paths = ?config.paths,
            "on-demand scan requested by the server; scanning");
        let outcome = tokio::select! {
            outcome = scan::scan_paths(&config.clamd, &config.paths, config.timeout) => outcome,
            // The requests stay pending in the state file, so the next
            // start scans again.
            _ = shutdown.changed() => return,
        };
        let paths: Vec<String> = config
            .paths
            .iter()
            .map(|path| path.display().to_string())
            .collect();
        let body = match &outcome {
            Ok(outcome) => {
                let result = outcome.result();
                if result == "infected" {
                    tracing::error!(notices = ?notices, findings = ?outcome.findings,
                        "on-demand scan found malware; the device reports red health");
                } else {
                    tracing::info!(notices = ?notices, result, errors = outcome.errors.len(),
                        first_errors = %summarize_errors(&outcome.errors), "on-demand scan finished");
                }
                agent.set_scan_finding(scan_finding(outcome));
                json!({
                    "result": result,
                    "paths": paths,
                    "findings": outcome.findings.iter().take(100).collect::<Vec<_>>(),
                    "error": (!outcome.errors.is_empty()).then(|| summarize_errors(&outcome.errors)),
                })
            }
            Err(error) => {
                tracing::error!(%error, notices = ?notices, "on-demand scan failed");
                json!({ "result": "failed", "paths": paths, "error": error })
            }
        };
        agent.state.finish_scan(&notices, outcome.as_ref().ok());
        agent.heartbeat_now.notify_one();
        for notice in notices {
            let mut body = body.clone();
            body["request"] = notice.into();
            // NOTE: a report that fails is not retried; the health the
            // heartbeats carry still shows an infected result.
            match agent.api.report_scan(&body).await {
                Ok(_) => tracing::info!(notice, result = %body["result"], "scan result reported"),
                Err(error) => tracing::warn!(%error, notice, "cannot report the scan result"),
            }
        }
    }
}

/// Signs off before the system suspends and reports again on resume, from
/// logind's `PrepareForSleep` signal as `busctl monitor` prints it. Without
/// busctl or a system bus it logs that and does nothing.
// NOTE: the agent takes no delay inhibitor lock, so on a fast suspend the
// offline heartbeat may not leave before the network goes down. The server
// then marks the device missing after its heartbeat timeout.
async fn watch_sleep(agent: Arc<Agent>, mut shutdown: watch::Receiver<bool>) {
    use tokio::io::AsyncBufReadExt;
    let child = tokio::process::Command::new("busctl")
        .args([
            "monitor",
            "--system",
            "--json=short",
            "--match=type='signal',interface='org.freedesktop.login1.Manager',member='PrepareForSleep'",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) => {
            tracing::info!(%error, "busctl not available; no offline sign-off before suspend");
            return;
        }
    };
    let Some(stdout) = child.stdout.take() else {
        return;
    };
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    loop {
        let line = tokio::select! {
            line = lines.next_line() => line,
            _ = shutdown.changed() => return,
        };
        let Ok(Some(line)) = line else {
            tracing::info!(
                "busctl monitor ended (no system bus?); no offline sign-off before suspend"
            );
            return;
        };
        let Ok(message) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if message["member"] != "PrepareForSleep" {
            continue;
        }
        if message["payload"]["data"][0] == true {
            sign_off(&agent, "the system suspends").await;
        } else {
            tracing::info!("system resumed; reporting health");
            agent.heartbeat_now.notify_one();
            agent.request_refresh();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_reply_checked() {
        assert_eq!(
            check_heartbeat_reply(&json!({"id": "ws-1", "state": "green"})),
            Ok(())
        );
        let error = check_heartbeat_reply(&json!({"ok": true})).expect_err("no state");
        assert!(error.contains("\"state\""), "{error}");
    }

    #[test]
    fn scan_errors_summarized() {
        let outcome = scan::ScanOutcome {
            findings: Vec::new(),
            errors: (0..3000)
                .map(|file| format!("/home/a/locked-{file}: Access denied. ERROR"))
                .collect(),
        };
        let finding = scan_finding(&outcome).expect("a failed scan is yellow");
        assert_eq!(finding.health, crate::heartbeat::Health::Yellow);
        assert!(
            finding
                .reason
                .contains("/home/a/locked-4: Access denied. ERROR"),
            "{}",
            finding.reason
        );
        assert!(!finding.reason.contains("locked-5:"), "{}", finding.reason);
        assert!(
            finding.reason.ends_with("; and 2995 more"),
            "{}",
            finding.reason
        );
    }

    #[test]
    fn heartbeat_failures_logged_once_a_minute() {
        let start = Instant::now();
        let second = |seconds: u64| start + Duration::from_secs(seconds);
        let mut log = FailureLog::default();
        assert_eq!(log.succeeded(start), None, "no failures to end");
        assert_eq!(
            log.failed(second(0)),
            Some(1),
            "the first failure is logged"
        );
        for seconds in 1..60 {
            assert_eq!(
                log.failed(second(seconds)),
                None,
                "failure at {seconds} s logged"
            );
        }
        assert_eq!(
            log.failed(second(60)),
            Some(60),
            "one line a minute with the count"
        );
        assert_eq!(log.failed(second(61)), None);
        assert_eq!(
            log.succeeded(second(62)),
            Some((62, Duration::from_secs(62)))
        );
        assert_eq!(log.succeeded(second(63)), None, "recovery is logged once");
        assert_eq!(
            log.failed(second(64)),
            Some(1),
            "a new run logs its first failure"
        );
    }

    #[test]
    fn addresses_capped_at_server_maximum() {
        let many: Vec<IpAddr> = (0..MAX_ADDRESSES + 9)
            .map(|host| IpAddr::from([10, 0, (host / 250) as u8, (host % 250 + 1) as u8]))
            .collect();
        let (kept, left_out) = cap_addresses(many.clone());
        assert_eq!(kept, many[..MAX_ADDRESSES]);
        assert_eq!(left_out, 9);
        let (kept, left_out) = cap_addresses(many[..3].to_vec());
        assert_eq!(kept.len(), 3);
        assert_eq!(left_out, 0);
    }
}
