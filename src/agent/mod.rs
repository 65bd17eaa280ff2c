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
pub mod stream;

use crate::admin::devices::MAX_ADDRESSES;
use api::Api;
use config::AgentConfig;
use enforce::Desired;
use serde_json::{Value, json};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc, watch};

/// Time allowed for the offline heartbeat when the agent stops.
const SIGN_OFF_TIMEOUT: Duration = Duration::from_secs(5);

/// Pending scan requests; more arriving while one runs wait here.
const SCAN_QUEUE: usize = 16;

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
    let agent = Arc::new(Agent {
        config,
        api,
        started: Instant::now(),
        last_contact: Mutex::new(None),
        refresh: Notify::new(),
        heartbeat_now: Notify::new(),
        reachable: Notify::new(),
        scan_finding: Mutex::new(None),
    });
    agent.set_scan_finding(load_scan_state(&agent.config));
    let mut terminate = signal(SignalKind::terminate())
        .map_err(|error| format!("cannot handle SIGTERM: {error}"))?;
    let mut interrupt = signal(SignalKind::interrupt())
        .map_err(|error| format!("cannot handle SIGINT: {error}"))?;
    let (shutdown_sender, shutdown) = watch::channel(false);
    let (desired_sender, desired) = watch::channel::<Option<Desired>>(None);
    let (scan_sender, scan_receiver) = mpsc::channel(SCAN_QUEUE);

    tracing::info!(device = %agent.config.device, server = %agent.config.server,
        interval = ?agent.config.interval, enforcement = agent.config.enforcement.enabled,
        "sendguard agent started");
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(heartbeats(agent.clone(), shutdown.clone()));
    tasks.spawn(refresher(agent.clone(), desired_sender, shutdown.clone()));
    tasks.spawn(stream::run(agent.clone(), scan_sender, shutdown.clone()));
    tasks.spawn(scanner(agent.clone(), scan_receiver, shutdown.clone()));
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
                tracing::debug!(health = health.as_str(), state = %view["state"], "heartbeat sent");
            }
            Err(error) => tracing::warn!(%error, health = health.as_str(), "heartbeat failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(agent.config.interval) => {}
            _ = agent.heartbeat_now.notified() => {}
            _ = shutdown.changed() => return,
        }
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

fn load_scan_state(config: &AgentConfig) -> Option<health::Finding> {
    let path = config.scan.state_file.as_ref()?;
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return None,
        Err(error) => {
            tracing::warn!(%error, path = %path.display(), "cannot read the last scan's result");
            return None;
        }
    };
    match serde_json::from_str::<scan::ScanOutcome>(&text) {
        Ok(outcome) => scan_finding(&outcome),
        Err(error) => {
            tracing::warn!(%error, path = %path.display(), "the last scan's result is not valid; ignored");
            None
        }
    }
}

fn save_scan_state(config: &AgentConfig, outcome: &scan::ScanOutcome) {
    let Some(path) = &config.scan.state_file else {
        return;
    };
    let text = serde_json::to_string(outcome).unwrap_or_default();
    if let Err(error) = std::fs::write(path, text) {
        tracing::error!(%error, path = %path.display(), "cannot save the scan's result; a restart forgets it");
    }
}

/// Runs each requested scan, reports its result and updates the health.
async fn scanner(
    agent: Arc<Agent>,
    mut requests: mpsc::Receiver<stream::ScanRequest>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut done = std::collections::HashSet::new();
    loop {
        let request = tokio::select! {
            request = requests.recv() => match request {
                Some(request) => request,
                None => return,
            },
            _ = shutdown.changed() => return,
        };
        // A resumed stream can deliver a notice twice.
        if !done.insert(request.notice) {
            continue;
        }
        let config = &agent.config.scan;
        tracing::warn!(notice = request.notice, mailbox = %request.body["mailbox"], paths = ?config.paths,
            "on-demand scan requested by the server; scanning");
        let outcome = tokio::select! {
            outcome = scan::scan_paths(&config.clamd, &config.paths, config.timeout) => outcome,
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
                    tracing::error!(notice = request.notice, findings = ?outcome.findings,
                        "on-demand scan found malware; the device reports red health");
                } else {
                    tracing::info!(notice = request.notice, result, errors = outcome.errors.len(),
                        first_errors = %summarize_errors(&outcome.errors), "on-demand scan finished");
                }
                agent.set_scan_finding(scan_finding(outcome));
                save_scan_state(&agent.config, outcome);
                json!({
                    "result": result,
                    "request": request.notice,
                    "paths": paths,
                    "findings": outcome.findings.iter().take(100).collect::<Vec<_>>(),
                    "error": (!outcome.errors.is_empty()).then(|| summarize_errors(&outcome.errors)),
                })
            }
            Err(error) => {
                tracing::error!(%error, notice = request.notice, "on-demand scan failed");
                json!({ "result": "failed", "request": request.notice, "paths": paths, "error": error })
            }
        };
        agent.heartbeat_now.notify_one();
        match agent.api.report_scan(&body).await {
            Ok(_) => {
                tracing::info!(notice = request.notice, result = %body["result"], "scan result reported")
            }
            Err(error) => {
                tracing::warn!(%error, notice = request.notice, "cannot report the scan result")
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
