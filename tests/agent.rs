//! `sendguard agent` end to end, as root: a bridge with four network
//! namespaces (three workstations and an update cache), the real server on
//! the bridge's address, a real agent with its real nftables table in each
//! namespace, a TCP service in each, and a real clamd on a unix socket that
//! the agents reach across namespaces through the file system.

mod common;

use common::clamd::Clamd;
use common::http::request;
use common::netns::{Network, Probe, Service, probe};
use common::sendguard::{Sendguard, free_port};
use common::smtp_client::send_from;
use common::upstream::{Upstream, UpstreamOptions};
use serde_json::Value;
use sha2::Digest;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ADMIN_TOKEN: &str = "agent-test-admin-token-0123456789";
const SERVICE_PORT: u16 = 7007;
const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";
/// Matches the `Sendguard.Test.Virus` signature in fixtures/clamd.
const VIRUS_MARKER: &str = "SENDGUARD-TEST-VIRUS-MARKER-7f3a";

/// Time the agents keep the unsafe list while the server is unreachable.
const KEEP_UNSAFE_LIST: Duration = Duration::from_secs(4);

/// Generous limit for every change to show up across the network.
const SETTLE: Duration = Duration::from_secs(20);

/// The devices: id, computer name, role, namespace index.
const DEVICES: [(&str, &str, &str); 4] = [
    ("ws1", "WS-ONE", "workstation"),
    ("ws2", "WS-TWO", "workstation"),
    ("ws3", "WS-THREE", "workstation"),
    ("cache", "UPDATE-CACHE", "update_cache"),
];

fn require_root() {
    assert!(
        common::running_as_root(),
        "the agent tests need root: they create network namespaces, a bridge and nftables \
         tables; run them as root (CI does)"
    );
}

fn token_of(id: &str) -> String {
    format!("agent-device-token-{id}-0123456789")
}

/// One agent in its namespace, killed on drop.
struct Agent {
    child: Option<Child>,
    log: PathBuf,
    health_file: PathBuf,
    state_file: PathBuf,
}

impl Agent {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sets the exit status of the agent's health check command: 0 green,
    /// 2 red.
    fn set_exit_status(&self, status: u8) {
        std::fs::write(&self.health_file, status.to_string()).expect("write health status");
    }

    /// Kills the agent with SIGKILL, as a crash would end it: no sign-off
    /// and no table removal.
    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Returns the agent's state file, or `Null` while it does not exist.
    fn state(&self) -> Value {
        match std::fs::read_to_string(&self.state_file) {
            Ok(text) => serde_json::from_str(&text)
                .unwrap_or_else(|error| panic!("invalid state file: {error}: {text}")),
            Err(_) => Value::Null,
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The whole site: network, server, clamd, services and agents.
struct Site {
    // Dropped in field order: agents first (they remove their tables), the
    // network last.
    agents: Vec<Agent>,
    _services: Vec<Service>,
    server: Sendguard,
    api: String,
    _clamd: Clamd,
    _upstream: Upstream,
    scan_dir: PathBuf,
    files: tempfile::TempDir,
    network: Network,
}

impl Site {
    fn start(index: u32) -> Site {
        require_root();
        let network = Network::build(index, DEVICES.len());
        let files = tempfile::tempdir().expect("temporary directory");
        let clamd = match Clamd::start() {
            reused if !reused.socket.as_os_str().is_empty() => reused,
            // The agents scan through a unix socket; a reused clamd without
            // one is replaced by a clamd of this test.
            _ => Clamd::start_with(None),
        };

        // The server's devices file, directory and configuration.
        let mut book = String::new();
        for (id, name, role) in DEVICES {
            let hash = hex::encode(sha2::Sha256::digest(token_of(id).as_bytes()));
            book.push_str(&format!(
                "[[device]]\nid = \"{id}\"\nname = \"{name}\"\nrole = \"{role}\"\nowner = \"u-{id}\"\ntoken_sha256 = \"{hash}\"\n"
            ));
        }
        let book_path = files.path().join("devices.toml");
        std::fs::write(&book_path, book).expect("write devices file");
        let directory = files.path().join("directory.toml");
        std::fs::write(
            &directory,
            "[[mailbox]]\naddress = \"carol@example.org\"\nowner = { id = \"u-ws3\", name = \"Carol\" }\n\
             devices = [{ id = \"ws3\", name = \"WS-THREE\" }]\n",
        )
        .expect("write directory");
        let admin_token = files.path().join("admin.token");
        std::fs::write(&admin_token, format!("{ADMIN_TOKEN}\n")).expect("write admin token");
        let api = format!("{}:{}", network.gateway, free_port());
        let config = format!(
            "[admin]\nlisten = \"{api}\"\ntoken_file = \"{}\"\n\
             [devices]\nfile = \"{}\"\nreject_unsafe = true\nheartbeat_timeout = \"6s\"\n\
             [synchronized_security]\nenabled = true\n\
             [directory]\npath = \"{}\"\n\
             [policy]\nthreshold = 1\nfirst_lockout = \"1h\"\n",
            admin_token.display(),
            book_path.display(),
            directory.display()
        );
        let upstream = Upstream::start(UpstreamOptions::default());
        let server = Sendguard::start_with(&upstream.address(), "", &config);

        // The scanned directory of the owner's device.
        let scan_dir = files.path().join("scan");
        std::fs::create_dir_all(&scan_dir).expect("create scan directory");
        std::fs::write(scan_dir.join("notes.txt"), "nothing to see\n").expect("write clean file");

        let mut services = Vec::new();
        for (index, (id, _, _)) in DEVICES.iter().enumerate() {
            services.push(Service::start(
                &network.hosts[index].namespace,
                SERVICE_PORT,
                id,
            ));
        }
        let mut site = Site {
            agents: Vec::new(),
            _services: services,
            server,
            api,
            _clamd: clamd,
            _upstream: upstream,
            scan_dir,
            files,
            network,
        };
        for index in 0..DEVICES.len() {
            let agent = site.start_agent(index);
            site.agents.push(agent);
        }
        site
    }

    fn start_agent(&self, index: usize) -> Agent {
        let (id, _, _) = DEVICES[index];
        let dir = self.files.path().join(format!("agent-{id}"));
        std::fs::create_dir_all(&dir).expect("agent directory");
        let token = dir.join("token");
        std::fs::write(&token, format!("{}\n", token_of(id))).expect("write token");
        let health_file = dir.join("health-exit-status");
        std::fs::write(&health_file, "0").expect("write health status");
        let state_file = dir.join("state.json");
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "server = \"http://{}\"\ndevice = \"{id}\"\ntoken_file = \"{}\"\ninterval = \"1s\"\n\
                 request_timeout = \"2s\"\nstate_file = \"{}\"\n\
                 [checks]\nclamd = true\n\
                 [[checks.command]]\nname = \"test-health\"\ncommand = [\"/bin/sh\", \"-c\", \"exit $(cat {})\"]\n\
                 [scan]\nclamd = \"{}\"\npaths = [\"{}\"]\ntimeout = \"30s\"\n\
                 [enforcement]\nkeep_unsafe_list = \"{}s\"\ncheck_interval = \"500ms\"\n",
                self.api,
                token.display(),
                state_file.display(),
                health_file.display(),
                self._clamd.socket.display(),
                self.scan_dir.display(),
                KEEP_UNSAFE_LIST.as_secs()
            ),
        )
        .expect("write agent config");
        let log = dir.join("agent.log");
        let stderr = std::fs::File::create(&log).expect("agent log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.network.hosts[index].namespace])
            .arg(env!("CARGO_BIN_EXE_sendguard"))
            .args(["agent", "--config"])
            .arg(&config)
            .env("SENDGUARD_LOG", "info")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start the agent");
        Agent {
            child: Some(child),
            log,
            health_file,
            state_file,
        }
    }

    fn service(&self, index: usize) -> SocketAddr {
        SocketAddr::from((self.network.hosts[index].address, SERVICE_PORT))
    }

    /// Connects from host `from` to host `to`'s service.
    fn connect(&self, from: usize, to: usize) -> Probe {
        probe(&self.network.hosts[from].namespace, self.service(to))
    }

    /// Waits until a connection from `from` to `to` is refused (when
    /// `refused`) or connects, and returns the time that took.
    fn wait_connect(&self, from: usize, to: usize, refused: bool, within: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let outcome = self.connect(from, to);
            let matches = match &outcome {
                Probe::Refused => refused,
                Probe::Connected(greeting) => !refused && greeting == DEVICES[to].0,
                Probe::Failed(_) => false,
            };
            if matches {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "{} -> {}: expected {}, got {outcome:?}\n{}",
                DEVICES[from].0,
                DEVICES[to].0,
                if refused { "refused" } else { "connected" },
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn assert_connects(&self, from: usize, to: usize) {
        assert_eq!(
            self.connect(from, to),
            Probe::Connected(DEVICES[to].0.to_string()),
            "{} -> {} should connect\n{}",
            DEVICES[from].0,
            DEVICES[to].0,
            self.logs()
        );
    }

    fn assert_refused(&self, from: usize, to: usize) {
        assert_eq!(
            self.connect(from, to),
            Probe::Refused,
            "{} -> {} should be refused\n{}",
            DEVICES[from].0,
            DEVICES[to].0,
            self.logs()
        );
    }

    fn logs(&self) -> String {
        let mut text = String::new();
        for (index, agent) in self.agents.iter().enumerate() {
            text.push_str(&format!(
                "---- agent {} ----\n{}\n",
                DEVICES[index].0,
                agent.log()
            ));
        }
        text
    }

    fn device(&self, id: &str) -> Value {
        let response = request(
            &self.api,
            "GET",
            &format!("/api/v1/devices/{id}"),
            Some(ADMIN_TOKEN),
            None,
        );
        assert_eq!(response.status, 200, "{}", response.body);
        response.json()
    }

    /// Returns the reason of device `id`'s reported health; empty when green.
    fn health_reason(&self, id: &str) -> String {
        self.device(id)["health_reason"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    fn wait_state(&self, id: &str, state: &str) {
        let deadline = Instant::now() + SETTLE;
        loop {
            let device = self.device(id);
            if device["state"] == state {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{id} did not become {state}: {device:#}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_log(&self, index: usize, text: &str) {
        let deadline = Instant::now() + SETTLE;
        while !self.agents[index].log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "agent {} did not log {text:?}\n{}",
                DEVICES[index].0,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `condition` holds on the events report.
    fn wait_events(&self, condition: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + SETTLE;
        loop {
            let events = self.server.events();
            if condition(&events) {
                return events;
            }
            assert!(
                Instant::now() < deadline,
                "condition not met; events: {events:#?}
{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Puts the test virus in the scanned directory and sends spam from the
    /// owner of ws3, whose lockout requests a scan of ws3.
    fn lock_out_infected_owner(&self) {
        std::fs::write(
            self.scan_dir.join("invoice.pdf.exe"),
            format!("MZ junk {VIRUS_MARKER} junk\n"),
        )
        .expect("write test virus");
        let message = format!(
            "From: carol@example.org\r\nTo: bob@example.net\r\nSubject: offer\r\n\r\n{GTUBE}\r\n"
        );
        let (code, reply) = send_from(
            &self.server.address,
            "carol@example.org",
            message.as_bytes(),
        );
        assert_eq!(code, 550, "{reply}");
        self.wait_events(|events| {
            events
                .iter()
                .any(|event| event["type"] == "lockout_started")
        });
    }

    /// Waits for the first `endpoint_scan_result` event of `device` and
    /// returns it.
    fn wait_scan_result(&self, device: &str) -> Value {
        let is_result =
            |event: &Value| event["type"] == "endpoint_scan_result" && event["device"] == device;
        let events = self.wait_events(|events| events.iter().any(is_result));
        events
            .into_iter()
            .find(is_result)
            .expect("scan result event")
    }

    /// Returns whether the agent's table exists in host `index`'s namespace.
    fn table_exists(&self, index: usize) -> bool {
        self.network
            .exec(index, "nft", &["list", "table", "inet", "sendguard_agent"])
            .status
            .success()
    }
}

fn has_refusal(events: &[Value], device: &str, text: &str) -> bool {
    events.iter().any(|event| {
        event["type"] == "access_refused" && event["device"] == device && event["text"] == text
    })
}

#[test]
fn unsafe_device_refused_both_ways() {
    let mut site = Site::start(0);
    let (ws1, ws2, ws3, cache) = (0, 1, 2, 3);
    for (id, _, _) in DEVICES {
        site.wait_state(id, "green");
    }
    for (from, (id, _, _)) in DEVICES.iter().enumerate() {
        for to in (0..DEVICES.len()).filter(|to| *to != from) {
            site.wait_connect(from, to, false, SETTLE);
        }
        assert!(site.table_exists(from), "agent {id} keeps its table");
    }

    // ws1 turns red: its peers refuse it in both directions.
    site.agents[ws1].set_exit_status(2);
    let took = site.wait_connect(ws2, ws1, true, SETTLE);
    eprintln!("ws2 refused ws1 {took:?} after ws1's health check turned red");
    site.wait_state("ws1", "red");
    let reason = site.health_reason("ws1");
    assert!(
        reason.contains("check test-health exited with exit status: 2"),
        "{reason}"
    );
    site.wait_connect(ws3, ws1, true, SETTLE);
    site.assert_refused(ws1, ws2);
    site.assert_refused(ws1, ws3);
    // A table that exempts the service's packets from connection tracking
    // (an operator's `notrack` rule) does not let them past the refusals.
    let notrack = site.files.path().join("notrack.nft");
    let raw_chain = |chain: &str, hook: &str| {
        format!(
            "  chain {chain} {{\n    type filter hook {hook} priority raw; policy accept;\n    \
             tcp dport {SERVICE_PORT} notrack\n    tcp sport {SERVICE_PORT} notrack\n  }}\n"
        )
    };
    std::fs::write(
        &notrack,
        format!(
            "table inet sendguard_test_notrack {{\n{}{}}}\n",
            raw_chain("prerouting", "prerouting"),
            raw_chain("output", "output")
        ),
    )
    .expect("write notrack table");
    let added = site
        .network
        .exec(ws2, "nft", &["-f", &notrack.display().to_string()]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    site.assert_refused(ws2, ws1);
    let incoming = site.connect(ws1, ws2);
    assert!(
        !matches!(incoming, Probe::Connected(_)),
        "ws1 -> ws2 passed ws2's refusal untracked: {incoming:?}"
    );
    let removed = site.network.exec(
        ws2,
        "nft",
        &["delete", "table", "inet", "sendguard_test_notrack"],
    );
    assert!(removed.status.success());

    // The others still talk to each other, and everyone to the update cache.
    site.assert_connects(ws2, ws3);
    site.assert_connects(ws3, ws2);
    for host in [ws1, ws2, ws3] {
        site.assert_connects(host, cache);
        site.assert_connects(cache, host);
    }

    // Each refusal is logged on the refusing device with the product's text.
    let outgoing = "Access to computer WS-ONE denied because it may be unsafe";
    let incoming = "Access request from computer WS-ONE denied because it may be unsafe";
    for host in [ws2, ws3] {
        site.wait_log(host, outgoing);
        site.wait_log(host, incoming);
    }
    assert!(
        !site.agents[ws1]
            .log()
            .contains("denied because it may be unsafe"),
        "{}",
        site.logs()
    );
    assert!(
        !site.agents[cache]
            .log()
            .contains("denied because it may be unsafe"),
        "{}",
        site.logs()
    );

    // ... and reported to the server's events report on that device.
    let events = site.wait_events(|events| {
        [
            ("ws2", outgoing),
            ("ws2", incoming),
            ("ws3", outgoing),
            ("ws3", incoming),
        ]
        .iter()
        .all(|(device, text)| has_refusal(events, device, text))
    });
    assert!(
        !events
            .iter()
            .any(|event| event["type"] == "access_refused" && event["device"] == "cache")
    );
    let counted = events
        .iter()
        .find(|event| event["type"] == "access_refused" && event["device"] == "ws2")
        .expect("a refusal on ws2");
    assert!(
        counted["attempts"].as_u64().unwrap_or(0) >= 1,
        "{counted:#}"
    );

    // A change to the table outside the agent is undone.
    let deleted = site
        .network
        .exec(ws2, "nft", &["delete", "table", "inet", "sendguard_agent"]);
    assert!(
        deleted.status.success(),
        "{}",
        String::from_utf8_lossy(&deleted.stderr)
    );
    site.wait_log(ws2, "changed outside the agent; restoring it");
    site.wait_connect(ws2, ws1, true, SETTLE);
    let flushed = site.network.exec(
        ws3,
        "nft",
        &["flush", "set", "inet", "sendguard_agent", "unsafe_out4"],
    );
    assert!(
        flushed.status.success(),
        "{}",
        String::from_utf8_lossy(&flushed.stderr)
    );
    site.wait_log(ws3, "changed outside the agent; restoring it");
    site.wait_connect(ws3, ws1, true, SETTLE);

    // A peer without a running agent (ws3 signs off) cannot refuse ws1, so
    // ws1's own table refuses it in both directions. The server records
    // each refusal on ws3, the device the product's texts place it on.
    let count = |events: &[Value], text: &str| {
        events
            .iter()
            .filter(|event| {
                event["type"] == "access_refused"
                    && event["device"] == "ws3"
                    && event["text"] == text
            })
            .count()
    };
    let before = site.server.events();
    site.agents[ws3].stop();
    site.wait_state("ws3", "offline");
    assert!(
        !site.table_exists(ws3),
        "a stopping agent removes its table"
    );
    site.wait_connect(ws1, ws3, true, SETTLE);
    site.assert_refused(ws3, ws1);
    site.assert_connects(ws1, cache);
    site.assert_refused(ws1, ws2);
    site.wait_log(
        ws1,
        "Access to computer WS-THREE denied because this computer may be unsafe",
    );
    site.wait_log(
        ws1,
        "Access request from computer WS-THREE denied because this computer may be unsafe",
    );
    site.wait_events(|events| {
        count(events, incoming) > count(&before, incoming)
            && count(events, outgoing) > count(&before, outgoing)
    });
    // The server stays reachable from the unsafe device.
    let ws1_log = site.agents[ws1].log();
    assert!(!ws1_log.contains("cannot report a refusal"), "{ws1_log}");
    assert!(!ws1_log.contains("heartbeat failed"), "{ws1_log}");
    assert!(
        !ws1_log.contains(&format!("computer {} denied", site.network.gateway)),
        "{ws1_log}"
    );

    // ws1 turns green again: everything connects.
    site.agents[ws1].set_exit_status(0);
    site.wait_state("ws1", "green");
    site.wait_connect(ws2, ws1, false, SETTLE);
    site.wait_connect(ws1, ws2, false, SETTLE);
    site.wait_connect(ws3, ws1, false, SETTLE);
    site.wait_connect(ws1, ws3, false, SETTLE);
}

#[test]
fn lockout_scan_and_fail_open() {
    let mut site = Site::start(1);
    let (ws2, ws3) = (1, 2);
    for (id, _, _) in DEVICES {
        site.wait_state(id, "green");
    }
    site.wait_connect(ws2, ws3, false, SETTLE);

    // ws3 loses the server for a while: a table of the test's own (the
    // agent leaves other tables alone) resets its new connections to the
    // API, and a restart of the server ends the stream it has open.
    let port = site.api.rsplit(':').next().expect("port").to_string();
    let block = site.files.path().join("block.nft");
    std::fs::write(
        &block,
        format!(
            "table inet sendguard_test_block {{\n  chain output {{\n    \
             type filter hook output priority filter; policy accept;\n    \
             ip daddr {} tcp dport {port} reject with tcp reset\n  }}\n}}\n",
            site.network.gateway
        ),
    )
    .expect("write block table");
    let stream_failures = |site: &Site| {
        let log = site.agents[ws3].log();
        log.matches("event stream ended").count() + log.matches("event stream failed").count()
    };
    let before = stream_failures(&site);
    let blocked = site
        .network
        .exec(ws3, "nft", &["-f", &block.display().to_string()]);
    assert!(
        blocked.status.success(),
        "{}",
        String::from_utf8_lossy(&blocked.stderr)
    );
    site.server.restart();
    let deadline = Instant::now() + SETTLE;
    while stream_failures(&site) == before {
        assert!(
            Instant::now() < deadline,
            "ws3's stream did not break\n{}",
            site.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Meanwhile a virus appears on the owner's device, and the owner's
    // mailbox sends spam: the lockout requests a scan of ws3.
    site.lock_out_infected_owner();
    assert!(
        !site.agents[ws3].log().contains("on-demand scan requested"),
        "the scan request cannot reach ws3 while its stream is broken\n{}",
        site.logs()
    );

    // Back online, ws3's agent resumes its stream after the last event it
    // received, gets the stored request, scans and turns red.
    let unblocked = site.network.exec(
        ws3,
        "nft",
        &["delete", "table", "inet", "sendguard_test_block"],
    );
    assert!(
        unblocked.status.success(),
        "{}",
        String::from_utf8_lossy(&unblocked.stderr)
    );
    site.wait_log(ws3, "on-demand scan requested by the server");
    let result = site.wait_scan_result("ws3");
    assert_eq!(result["result"], "infected", "{result:#}");
    assert!(
        result["findings"][0]["signature"]
            .as_str()
            .is_some_and(|signature| signature.starts_with("Sendguard.Test.Virus")),
        "{result:#}"
    );
    assert!(
        result["request"].as_i64().is_some_and(|id| id > 0),
        "{result:#}"
    );
    site.wait_state("ws3", "red");
    let reason = site.health_reason("ws3");
    assert!(
        reason.contains("the on-demand scan found 1 infected files"),
        "{reason}"
    );
    assert!(reason.contains("invoice.pdf.exe"), "{reason}");
    site.wait_connect(ws2, ws3, true, SETTLE);
    // Only the owner's device scanned.
    for host in [0, 1, 3] {
        assert!(
            !site.agents[host].log().contains("on-demand scan requested"),
            "{}",
            site.logs()
        );
    }

    // The server goes away: after keep_unsafe_list the agents fail open.
    let heartbeat_failures = |site: &Site| {
        site.agents[ws2]
            .log()
            .matches("agent: heartbeat failed")
            .count()
    };
    let stream_failures = |site: &Site| {
        site.agents[ws2]
            .log()
            .matches("event stream failed")
            .count()
    };
    let failures_before = heartbeat_failures(&site);
    let stream_failures_before = stream_failures(&site);
    site.server.kill9();
    let gone = Instant::now();
    site.wait_log(ws2, "FAILING OPEN");
    let took = site.wait_connect(ws2, ws3, false, SETTLE);
    let failed_open_after = gone.elapsed();
    eprintln!(
        "ws2 connected to ws3 again {failed_open_after:?} after the server stopped ({took:?} of polling)"
    );
    assert!(
        failed_open_after >= KEEP_UNSAFE_LIST - Duration::from_secs(1),
        "failed open after {failed_open_after:?}, before keep_unsafe_list ({KEEP_UNSAFE_LIST:?})"
    );
    assert!(!site.table_exists(ws2), "the table is removed on fail-open");
    // A heartbeat failed every second, but only the first failure is
    // logged within a minute.
    assert_eq!(
        heartbeat_failures(&site),
        failures_before + 1,
        "{}",
        site.agents[ws2].log()
    );
    // The event stream's reconnects failed after 1, 2 and 4 s; only the
    // first failure is logged within a minute.
    assert_eq!(
        stream_failures(&site),
        stream_failures_before + 1,
        "{}",
        site.agents[ws2].log()
    );
    site.wait_connect(ws3, ws2, false, SETTLE);

    // An agent that stops removes its table; --uninstall-rules removes a
    // table left behind.
    site.agents[0].stop();
    assert!(!site.table_exists(0), "{}", site.logs());
    let leftover = site
        .network
        .exec(0, "nft", &["add", "table", "inet", "sendguard_agent"]);
    assert!(leftover.status.success());
    let uninstall = site.network.exec(
        0,
        env!("CARGO_BIN_EXE_sendguard"),
        &["agent", "--uninstall-rules"],
    );
    assert!(
        uninstall.status.success(),
        "{}",
        String::from_utf8_lossy(&uninstall.stderr)
    );
    assert!(!site.table_exists(0));
}

#[test]
fn restarted_agent_runs_missed_scan() {
    let mut site = Site::start(3);
    let (ws1, ws3) = (0, 2);
    for (id, _, _) in DEVICES {
        site.wait_state(id, "green");
    }

    // ws1 restarts with a stream position past the server's newest notice,
    // as after the server's database was replaced. The server starts its
    // stream at the newest notice, so ws1 still gets the notices below.
    site.agents[ws1].stop();
    std::fs::write(
        &site.agents[ws1].state_file,
        "{\"stream_position\": 1000000000}",
    )
    .expect("write ws1's state");
    site.agents[ws1] = site.start_agent(ws1);
    site.wait_log(ws1, "resuming from its newest notice");

    // An invalid state file is logged with its path, and the agent runs
    // without it and replaces it.
    let cache = 3;
    site.agents[cache].stop();
    let cache_state = site.agents[cache].state_file.clone();
    std::fs::write(&cache_state, "{\"stream_position\": 12, \"last_sc")
        .expect("write invalid state");
    site.agents[cache] = site.start_agent(cache);
    site.wait_log(cache, "cannot load the agent state");
    site.wait_log(cache, &format!("path={}", cache_state.display()));
    site.wait_log(cache, "event stream connected");
    assert!(
        site.agents[cache].state()["stream_position"].is_i64(),
        "the invalid state file was not replaced\n{}",
        site.logs()
    );

    // The agent saves where its stream starts as soon as it connects.
    let deadline = Instant::now() + SETTLE;
    while !site.agents[ws3].state()["stream_position"].is_i64() {
        assert!(
            Instant::now() < deadline,
            "ws3 saved no stream position: {}\n{}",
            site.agents[ws3].state(),
            site.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // ws3's agent crashes; while it is down a virus appears and the
    // owner's mailbox sends spam, so the lockout requests a scan of ws3.
    site.agents[ws3].kill9();
    site.lock_out_infected_owner();

    // Started again with the same state file, the agent resumes its stream
    // after the saved position, gets the stored request, scans and turns
    // red.
    site.agents[ws3] = site.start_agent(ws3);
    site.wait_log(ws3, "on-demand scan requested by the server");
    let result = site.wait_scan_result("ws3");
    assert_eq!(result["result"], "infected", "{result:#}");
    site.wait_state("ws3", "red");
    site.wait_log(ws1, "kind=\"device_unsafe\" device=\"ws3\"");
    let state = site.agents[ws3].state();
    assert_eq!(
        state["last_scan"]["findings"][0]["signature"]
            .as_str()
            .map(|signature| signature.starts_with("Sendguard.Test.Virus")),
        Some(true),
        "{state:#}"
    );
    assert_eq!(state["pending_scans"], serde_json::json!([]), "{state:#}");

    // After an orderly restart the device is still red from the kept
    // result, and the request already handled is not scanned again.
    // The server keeps a red device red when it signs off, so the new
    // agent's own log shows which health it reports.
    site.agents[ws3].stop();
    site.agents[ws3] = site.start_agent(ws3);
    site.wait_log(ws3, "agent state restored");
    site.wait_log(ws3, "device health health=\"red\"");
    assert!(
        !site.agents[ws3].log().contains("health=\"green\""),
        "the restarted agent reported green\n{}",
        site.logs()
    );
    site.wait_state("ws3", "red");
    let reason = site.health_reason("ws3");
    assert!(
        reason.contains("the on-demand scan found 1 infected files"),
        "{reason}"
    );
    site.wait_connect(1, ws3, true, SETTLE);
    assert!(
        !site.agents[ws3].log().contains("on-demand scan requested"),
        "the handled request ran again\n{}",
        site.logs()
    );
    let scans = site
        .server
        .events()
        .iter()
        .filter(|event| event["type"] == "endpoint_scan_result")
        .count();
    assert_eq!(scans, 1, "scan results reported");

    // An agent that stopped during a scan finds the request still pending
    // in its state file, and scans when it starts again.
    site.agents[ws1].stop();
    let position = site.agents[ws1].state()["stream_position"]
        .as_i64()
        .expect("ws1's stream position");
    std::fs::write(
        &site.agents[ws1].state_file,
        serde_json::json!({
            "stream_position": position,
            "pending_scans": [{"notice": position, "body": {"mailbox": "carol@example.org"}}],
        })
        .to_string(),
    )
    .expect("write ws1's state");
    site.agents[ws1] = site.start_agent(ws1);
    let result = site.wait_scan_result("ws1");
    assert_eq!(result["result"], "infected", "{result:#}");
    assert_eq!(result["request"], position, "{result:#}");
    let state = site.agents[ws1].state();
    assert_eq!(state["pending_scans"], serde_json::json!([]), "{state:#}");
}

#[test]
fn uninstall_rules_with_broken_config() {
    require_root();
    let network = Network::build(2, 1);
    let added = network.exec(0, "nft", &["add", "table", "inet", "sendguard_agent"]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "server = \"http://10.0.0.5:8025\"\ntypo = 1\n").expect("write config");

    let config = config.display().to_string();
    let uninstall = network.exec(
        0,
        env!("CARGO_BIN_EXE_sendguard"),
        &["agent", "--uninstall-rules", "--config", &config],
    );
    let stderr = String::from_utf8_lossy(&uninstall.stderr);
    assert!(uninstall.status.success(), "{stderr}");
    assert!(
        stderr.contains("removing the table with nft from PATH"),
        "{stderr}"
    );
    let listed = network.exec(0, "nft", &["list", "table", "inet", "sendguard_agent"]);
    assert!(!listed.status.success(), "the table is left");
}

#[test]
fn agent_without_nft_does_not_start() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{}\n", token_of("ws1"))).expect("write token");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "server = \"http://127.0.0.1:9\"\ndevice = \"ws1\"\ntoken_file = \"{}\"\n\
             [enforcement]\nnft = \"{}\"\n",
            token.display(),
            dir.path().join("missing-nft").display()
        ),
    )
    .expect("write config");

    let mut child = Command::new(env!("CARGO_BIN_EXE_sendguard"))
        .args(["agent", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the agent");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the agent") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent kept running without nft");
        }
        std::thread::sleep(Duration::from_millis(50));
    };

    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("enforcement: cannot remove a table"),
        "{stderr}"
    );
    assert!(stderr.contains("missing-nft"), "{stderr}");
}

#[test]
fn invalid_config_lists_problems() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "server = \"10.0.0.5:8025\"\ndevice = \"ws1\"\ntoken_file = \"/nonexistent\"\n\
         interval = \"15s\"\n[enforcement]\nkeep_unsafe_list = \"20s\"\n",
    )
    .expect("write config");
    let output = Command::new(env!("CARGO_BIN_EXE_sendguard"))
        .args(["agent", "--config"])
        .arg(&config)
        .output()
        .expect("run sendguard agent");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("server: invalid URL \"10.0.0.5:8025\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("enforcement.keep_unsafe_list: is 20s"),
        "{stderr}"
    );
}
