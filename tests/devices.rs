//! Device health heartbeats against the real server: simulated agents
//! report over the admin API, peers ask for access decisions, subnets are
//! told over server-sent events and the webhook, and the relay gate
//! refuses unsafe SMTP clients directly, behind Postfix's
//! `smtpd_proxy_filter` and in the milter.

mod common;

use common::http::{Response, request};
use common::postfix::Postfix;
use common::sendguard::{Sendguard, free_port};
use common::smtp_client::SmtpClient;
use common::sse::SseStream;
use common::upstream::{Upstream, UpstreamOptions};
use common::webhook::Receiver;
use serde_json::{Value, json};
use sha2::Digest;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
const SUPPORT_TOKEN: &str = "support-token-0123456789abcdef";

/// One device of a test site: id, computer name, role and subnet (empty:
/// from its addresses).
struct Spec {
    id: &'static str,
    name: &'static str,
    role: &'static str,
}

fn spec(id: &'static str, name: &'static str, role: &'static str) -> Spec {
    Spec { id, name, role }
}

/// A sendguard with an admin API, a devices file and a token per device.
struct Site {
    server: Sendguard,
    api: String,
    files: tempfile::TempDir,
    tokens: HashMap<String, String>,
}

fn token_of(id: &str) -> String {
    format!("device-token-of-{id}-0123456789")
}

impl Site {
    /// Starts sendguard relaying to `upstream`, with `devices` in its
    /// devices file, `devices_section` lines in [devices], `smtp_extra` in
    /// [smtp] and `extra` TOML at the end.
    fn start(
        upstream: &str,
        devices: &[Spec],
        devices_section: &str,
        smtp_extra: &str,
        extra: &str,
    ) -> Site {
        let files = tempfile::tempdir().expect("temporary directory");
        let admin_token = files.path().join("admin.token");
        std::fs::write(&admin_token, format!("{ADMIN_TOKEN}\n")).expect("write admin token");
        let mut book = String::new();
        let mut tokens = HashMap::new();
        for device in devices {
            let token = token_of(device.id);
            let hash = hex::encode(sha2::Sha256::digest(token.as_bytes()));
            book.push_str(&format!(
                "[[device]]\nid = \"{}\"\nname = \"{}\"\nrole = \"{}\"\nowner = \"u-{}\"\ntoken_sha256 = \"{hash}\"\n",
                device.id, device.name, device.role, device.id
            ));
            tokens.insert(device.id.to_string(), token);
        }
        let book_path = files.path().join("devices.toml");
        std::fs::write(&book_path, book).expect("write devices file");
        let api = format!("127.0.0.1:{}", free_port());
        let support_hash = hex::encode(sha2::Sha256::digest(SUPPORT_TOKEN.as_bytes()));
        let config = format!(
            "[admin]\nlisten = \"{api}\"\ntoken_file = \"{}\"\n\
             support_token_sha256 = \"{support_hash}\"\n\
             [devices]\nfile = \"{}\"\n{devices_section}\n{extra}",
            admin_token.display(),
            book_path.display()
        );
        let server = Sendguard::start_with(upstream, smtp_extra, &config);
        // The harness moves a listener whose port was taken meanwhile.
        let api = server.listen_address("admin");
        wait_for_api(&api);
        Site {
            server,
            api,
            files,
            tokens,
        }
    }

    /// Starts a site whose upstream does not listen, for tests that send
    /// no mail.
    fn without_relay(devices: &[Spec], devices_section: &str) -> Site {
        Site::start(&common::closed_address(), devices, devices_section, "", "")
    }

    fn token(&self, id: &str) -> &str {
        &self.tokens[id]
    }

    /// Reports a device's health with its own token; `health` may be
    /// "offline".
    fn report(&self, id: &str, health: &str, addresses: &[&str]) -> Value {
        let body = json!({ "device": id, "health": health, "addresses": addresses });
        let response = request(
            &self.api,
            "POST",
            "/api/v1/heartbeats",
            Some(self.token(id)),
            Some(&body),
        );
        assert_eq!(response.status, 200, "{}", response.body);
        response.json()
    }

    /// Asks for an access decision with the admin token.
    fn access(&self, source: &str, destination: &str) -> Value {
        let body = json!({ "source": source, "destination": destination });
        let response = request(
            &self.api,
            "POST",
            "/api/v1/access",
            Some(ADMIN_TOKEN),
            Some(&body),
        );
        assert_eq!(response.status, 200, "{}", response.body);
        response.json()
    }

    fn device(&self, id: &str) -> Value {
        let response = self.get(&format!("/api/v1/devices/{id}"));
        assert_eq!(response.status, 200, "{}", response.body);
        response.json()
    }

    /// Sends a request with the admin token.
    fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> Response {
        request(&self.api, method, path, Some(ADMIN_TOKEN), body)
    }

    fn get(&self, path: &str) -> Response {
        request(&self.api, "GET", path, Some(ADMIN_TOKEN), None)
    }

    /// Returns the events of device `id` through the events API.
    fn device_events(&self, id: &str) -> Vec<Value> {
        let response = self.get(&format!("/api/v1/events?device={id}"));
        assert_eq!(response.status, 200, "{}", response.body);
        response
            .body
            .lines()
            .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
            .collect()
    }

    fn texts_on(&self, id: &str) -> Vec<String> {
        self.device_events(id)
            .iter()
            .filter(|event| event["type"] == "access_refused" || event["type"] == "relay_refused")
            .map(|event| event["text"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Waits until device `id` is in `state`.
    fn wait_for_state(&self, id: &str, state: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let device = self.device(id);
            if device["state"] == state {
                return device;
            }
            assert!(
                Instant::now() < deadline,
                "{id} is not {state}: {device}\n{}",
                self.server.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stream(&self, id: &str, last_event_id: Option<i64>) -> SseStream {
        let stream = SseStream::open(
            &self.api,
            &format!("/api/v1/devices/{id}/events"),
            self.token(id),
            last_event_id,
        );
        assert_eq!(stream.status, 200);
        stream
    }

    fn devices_file(&self) -> PathBuf {
        self.files.path().join("devices.toml")
    }
}

fn wait_for_api(address: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(address).is_err() {
        assert!(Instant::now() < deadline, "admin API did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
}

const INCOMING_A: &str = "Access request from computer PC-A denied because it may be unsafe";
const OUTGOING_A: &str = "Access to computer PC-A denied because it may be unsafe";

fn office() -> Vec<Spec> {
    vec![
        spec("dev-a", "PC-A", "workstation"),
        spec("dev-b", "PC-B", "workstation"),
        spec("dev-c", "PC-C", "workstation"),
        spec("dev-d", "PC-D", "workstation"),
    ]
}

#[test]
fn red_device_refused_both_ways() {
    let site = Site::without_relay(&office(), "reject_unsafe = true");
    site.report("dev-a", "red", &["10.1.0.1"]);
    site.report("dev-b", "green", &["10.1.0.2"]);
    site.report("dev-c", "yellow", &["10.1.0.3"]);

    // The unsafe source is refused by the destination, which logs it.
    let decision = site.access("dev-a", "dev-b");
    assert_eq!(decision["allowed"], false, "{decision}");
    assert_eq!(decision["reason"], INCOMING_A);
    assert_eq!(site.texts_on("dev-b"), [INCOMING_A]);

    // A source is kept from the unsafe destination, and logs it; the
    // destination may be named by its address.
    let decision = site.access("dev-c", "10.1.0.1");
    assert_eq!(decision["allowed"], false, "{decision}");
    assert_eq!(site.texts_on("dev-c"), [OUTGOING_A]);
    assert!(
        site.texts_on("dev-a").is_empty(),
        "the unsafe device logs nothing: {:?}",
        site.texts_on("dev-a")
    );

    // Yellow is a warning only.
    let decision = site.access("dev-c", "dev-b");
    assert_eq!(decision["allowed"], true, "{decision}");

    // Both ends unsafe: refused, logged on both.
    site.report("dev-d", "red", &["10.1.0.4"]);
    let decision = site.access("dev-a", "dev-d");
    assert_eq!(decision["allowed"], false);
    assert_eq!(decision["refusals"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        site.texts_on("dev-d"),
        ["Access request from computer PC-A denied because it may be unsafe"]
    );
    assert_eq!(
        site.texts_on("dev-a"),
        ["Access to computer PC-D denied because it may be unsafe"]
    );

    // Back to green: accepted again.
    site.report("dev-a", "green", &["10.1.0.1"]);
    let decision = site.access("dev-a", "dev-b");
    assert_eq!(decision["allowed"], true, "{decision}");
    assert_eq!(site.texts_on("dev-b").len(), 1, "no new refusal");

    // A device's token reports for that device only.
    let response = request(
        &site.api,
        "POST",
        "/api/v1/heartbeats",
        Some(site.token("dev-b")),
        Some(&json!({ "device": "dev-a", "health": "green" })),
    );
    assert_eq!(response.status, 403, "{}", response.body);
    let response = request(
        &site.api,
        "POST",
        "/api/v1/heartbeats",
        Some(site.token("dev-b")),
        Some(&json!({ "device": "dev-b", "health": "purple" })),
    );
    assert_eq!(response.status, 400);
    assert!(response.body.contains("purple"), "{}", response.body);
    let response = request(
        &site.api,
        "POST",
        "/api/v1/heartbeats",
        Some("not-a-known-token-0123456789"),
        Some(&json!({ "device": "dev-b", "health": "green" })),
    );
    assert_eq!(response.status, 401);
}

#[test]
fn missing_after_timeout_not_offline() {
    let site = Site::start(
        &common::closed_address(),
        &office(),
        "reject_unsafe = true\nheartbeat_timeout = \"4s\"",
        "",
        "",
    );
    let reported = Instant::now();
    site.report("dev-a", "green", &["10.1.0.1"]);
    site.report("dev-b", "green", &["10.1.0.2"]);
    site.report("dev-b", "offline", &[]);

    // Well inside the timeout, nothing is missing.
    std::thread::sleep(Duration::from_secs(1));
    let device = site.device("dev-a");
    assert!(
        reported.elapsed() < Duration::from_secs(4),
        "the check ran too late to mean anything"
    );
    assert_eq!(device["state"], "green", "{device}");
    assert_eq!(device["unsafe"], false);

    let device = site.wait_for_state("dev-a", "missing", Duration::from_secs(30));
    assert!(reported.elapsed() >= Duration::from_secs(4));
    assert_eq!(device["unsafe"], true);
    assert!(
        device["unsafe_reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("no heartbeat since")),
        "{device}"
    );
    let decision = site.access("dev-a", "dev-c");
    assert_eq!(decision["allowed"], false, "missing is unsafe: {decision}");

    // The device that signed off is offline, never missing.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(site.device("dev-b")["state"], "offline");
    let to_states: Vec<Value> = site
        .device_events("dev-b")
        .iter()
        .filter(|event| event["type"] == "device_state_changed")
        .map(|event| event["to"].clone())
        .collect();
    assert_eq!(to_states, [json!("green"), json!("offline")]);
    let missing = site
        .device_events("dev-a")
        .into_iter()
        .filter(|event| event["type"] == "device_state_changed" && event["to"] == "missing")
        .count();
    assert_eq!(missing, 1);
}

#[test]
fn restart_keeps_state_and_grace() {
    let mut site = Site::start(
        &common::closed_address(),
        &office(),
        "reject_unsafe = true\nheartbeat_timeout = \"3s\"",
        "",
        "",
    );
    site.report("dev-a", "green", &["10.1.0.1"]);
    site.report("dev-b", "red", &["10.1.0.2"]);
    site.report("dev-c", "green", &["10.1.0.3"]);
    site.report("dev-d", "green", &["10.1.0.4"]);
    site.report("dev-d", "offline", &[]);
    site.wait_for_state("dev-c", "missing", Duration::from_secs(30));
    site.report("dev-a", "green", &["10.1.0.1"]);
    site.report("dev-b", "red", &["10.1.0.2"]);

    // Down for longer than the timeout: the reports sent meanwhile were
    // lost, so no device may be missing at once after the start.
    site.server.kill9();
    std::thread::sleep(Duration::from_secs(4));
    let restarted = Instant::now();
    site.server.restart();
    wait_for_api(&site.api);
    let device = site.device("dev-a");
    assert!(restarted.elapsed() < Duration::from_secs(3));
    assert_eq!(device["state"], "green", "grace after start: {device}");
    assert_eq!(site.device("dev-b")["state"], "red", "red survives");
    assert_eq!(site.device("dev-c")["state"], "missing", "missing survives");
    assert_eq!(site.device("dev-d")["state"], "offline", "offline survives");
    let decision = site.access("dev-b", "dev-a");
    assert_eq!(decision["allowed"], false);

    // Silent after the start, dev-a goes missing one timeout later.
    site.wait_for_state("dev-a", "missing", Duration::from_secs(30));
    assert!(restarted.elapsed() >= Duration::from_secs(3));
    // dev-c reports again and is green.
    site.report("dev-c", "green", &["10.1.0.3"]);
    assert_eq!(site.device("dev-c")["state"], "green");
}

#[test]
fn subnet_told_over_events_and_webhook() {
    let receiver = Receiver::start();
    let secret = tempfile::NamedTempFile::new().expect("temporary file");
    std::fs::write(secret.path(), "webhook-secret\n").expect("write secret");
    let mut devices = office();
    devices.push(spec("dev-e", "PC-E", "workstation"));
    let site = Site::start(
        &common::closed_address(),
        &devices,
        &format!(
            "reject_unsafe = true\nsubnet_webhook_url = \"{}\"",
            receiver.url("/subnet")
        ),
        "",
        &format!("[actions]\nsecret_file = \"{}\"\n", secret.path().display()),
    );
    site.report("dev-a", "green", &["10.1.0.1"]);
    site.report("dev-b", "green", &["10.1.0.2"]);
    site.report("dev-c", "green", &["10.1.0.3"]);
    site.report("dev-d", "green", &["10.2.0.4"]);
    site.report("dev-e", "green", &["10.2.0.5"]);

    let mut stream_b = site.stream("dev-b", None);
    let mut stream_c = site.stream("dev-c", None);
    let mut stream_d = site.stream("dev-d", None);

    site.report("dev-a", "red", &["10.1.0.1"]);
    let wait = Duration::from_secs(20);
    let unsafe_b = stream_b.next_event(wait).expect("dev-b is told");
    assert_eq!(unsafe_b.event.as_deref(), Some("device_unsafe"));
    assert_eq!(unsafe_b.json()["device"], "dev-a");
    assert_eq!(unsafe_b.json()["subnet"], "10.1.0.0/24");
    let unsafe_c = stream_c.next_event(wait).expect("dev-c is told");
    assert_eq!(unsafe_c.json()["device"], "dev-a");

    // dev-b fetches its subnet's unsafe list.
    let response = request(
        &site.api,
        "GET",
        "/api/v1/devices/dev-b/subnet",
        Some(site.token("dev-b")),
        None,
    );
    assert_eq!(response.status, 200, "{}", response.body);
    let listed: Vec<Value> = response.json()["unsafe"]
        .as_array()
        .expect("list")
        .iter()
        .map(|device| device["id"].clone())
        .collect();
    assert_eq!(listed, [json!("dev-a")]);

    // dev-b is away while dev-a recovers, and resumes after its last event.
    drop(stream_b);
    site.report("dev-a", "green", &["10.1.0.1"]);
    let mut stream_b = site.stream("dev-b", unsafe_b.id);
    let safe = stream_b.next_event(wait).expect("dev-b resumes");
    assert_eq!(safe.event.as_deref(), Some("device_safe"));
    assert_eq!(safe.json()["device"], "dev-a");
    assert!(safe.id > unsafe_b.id);
    let safe_c = stream_c.next_event(wait).expect("dev-c told of recovery");
    assert_eq!(safe_c.event.as_deref(), Some("device_safe"));

    // The other subnet heard nothing about dev-a: the first event dev-d
    // gets is about its own subnet's dev-e.
    site.report("dev-e", "red", &["10.2.0.5"]);
    let first_d = stream_d
        .next_event(wait)
        .expect("dev-d is told about dev-e");
    assert_eq!(first_d.json()["device"], "dev-e", "{}", first_d.data);

    // One signed webhook per change and subnet, naming the peers to tell.
    let requests = receiver.wait_for(3, Duration::from_secs(30));
    let bodies: Vec<Value> = requests.iter().map(|request| request.json()).collect();
    for request in &requests {
        assert_eq!(request.header("Sendguard-Event"), Some("subnet_notice"));
        assert!(request.header("Sendguard-Signature").is_some());
    }
    let about_a: Vec<&Value> = bodies.iter().filter(|b| b["device"] == "dev-a").collect();
    assert_eq!(about_a.len(), 2);
    assert_eq!(about_a[0]["notice"], "device_unsafe");
    let told: Vec<Value> = about_a[0]["notify"]
        .as_array()
        .expect("notify list")
        .iter()
        .map(|peer| peer["id"].clone())
        .collect();
    assert_eq!(told, [json!("dev-b"), json!("dev-c")]);
    let about_e = bodies
        .iter()
        .find(|b| b["device"] == "dev-e")
        .expect("dev-e");
    assert_eq!(about_e["subnet"], "10.2.0.0/24");
}

#[test]
fn watch_command_prints_notices() {
    let site = Site::without_relay(&office(), "reject_unsafe = true");
    site.report("dev-a", "green", &["10.1.0.1"]);
    site.report("dev-b", "green", &["10.1.0.2"]);
    let token_file = site.files.path().join("dev-b.token");
    std::fs::write(&token_file, site.token("dev-b")).expect("write token");
    let mut watch = std::process::Command::new(env!("CARGO_BIN_EXE_sendguard"))
        .args(["device", "watch", "--id", "dev-b", "--server"])
        .arg(format!("http://{}", site.api))
        .arg("--token-file")
        .arg(&token_file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start watch");
    let stdout = watch.stdout.take().expect("stdout");
    let (lines_sender, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_sender.send(line);
        }
    });
    // The watcher writes to standard error once it is connected; before that
    // a notice could come before the stream starts.
    let stderr = watch.stderr.take().expect("stderr");
    let mut stderr = std::io::BufReader::new(stderr);
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut first).expect("watch connects");
    assert!(first.contains("watching"), "{first}");

    // The agent CLI reports dev-a red.
    let token_a = site.files.path().join("dev-a.token");
    std::fs::write(&token_a, site.token("dev-a")).expect("write token");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sendguard"))
        .args(["device", "heartbeat", "--id", "dev-a", "--health", "red"])
        .args(["--address", "10.1.0.1", "--server"])
        .arg(format!("http://{}", site.api))
        .arg("--token-file")
        .arg(&token_a)
        .output()
        .expect("run heartbeat");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "dev-a is red"
    );

    let line = lines
        .recv_timeout(Duration::from_secs(20))
        .expect("watch prints the notice");
    let notice: Value = serde_json::from_str(&line).expect("JSON line");
    assert_eq!(notice["type"], "device_unsafe");
    assert_eq!(notice["device"], "dev-a");
    let _ = watch.kill();
    let _ = watch.wait();

    // The operator's list shows health, last heartbeat and the reason.
    let output = site.server.cli(&["device", "list"]);
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let row = table
        .lines()
        .find(|line| line.starts_with("dev-a"))
        .expect("dev-a listed");
    assert!(row.contains("red"), "{row}");
    assert!(row.contains("reported red health"), "{row}");
}

fn servers() -> Vec<Spec> {
    vec![
        spec("dev-a", "PC-A", "workstation"),
        spec("dev-b", "PC-B", "workstation"),
        spec("cache", "UPDATE-CACHE", "update_cache"),
        spec("relay", "MAIL-RELAY", "message_relay"),
        spec("files", "FILE-SERVER", "server"),
    ]
}

#[test]
fn excluded_servers_by_default() {
    let site = Site::without_relay(&servers(), "reject_unsafe = true");
    site.report("dev-a", "red", &["10.1.0.1"]);
    site.report("dev-b", "green", &["10.1.0.2"]);
    site.report("cache", "red", &["10.1.0.3"]);
    site.report("relay", "green", &["10.1.0.4"]);
    site.report("files", "green", &["10.1.0.5"]);

    // Reachable from the unsafe device, and accepted even when red.
    assert_eq!(site.access("dev-a", "cache")["allowed"], true);
    assert_eq!(site.access("dev-a", "relay")["allowed"], true);
    assert_eq!(site.access("cache", "dev-b")["allowed"], true);
    assert_eq!(site.access("dev-a", "files")["allowed"], false);

    // An operator excludes the file server through the API, audited.
    let response = site.admin(
        "POST",
        "/api/v1/device-exclusions",
        Some(&json!({ "device": "files", "reason": "backups", "author": "jdoe" })),
    );
    assert_eq!(response.status, 201, "{}", response.body);
    assert_eq!(site.access("dev-a", "files")["allowed"], true);
    let response = site.admin("DELETE", "/api/v1/device-exclusions/files?by=jdoe", None);
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(site.access("dev-a", "files")["allowed"], false);
    let audit: Vec<Value> = site
        .device_events("files")
        .into_iter()
        .filter(|event| {
            event["type"]
                .as_str()
                .unwrap_or("")
                .starts_with("device_exclusion")
        })
        .collect();
    assert_eq!(audit.len(), 2, "{audit:?}");
    assert_eq!(audit[0]["by"], "jdoe");
    assert_eq!(audit[0]["reason"], "backups");

    // Without the default exclusions, both are refused.
    let strict = Site::without_relay(
        &servers(),
        "reject_unsafe = true\nexclude_update_caches = false\nexclude_message_relays = false",
    );
    strict.report("dev-a", "red", &["10.1.0.1"]);
    strict.report("cache", "green", &["10.1.0.3"]);
    strict.report("relay", "green", &["10.1.0.4"]);
    assert_eq!(strict.access("dev-a", "cache")["allowed"], false);
    assert_eq!(strict.access("dev-a", "relay")["allowed"], false);
    assert_eq!(
        strict.texts_on("cache"),
        ["Access request from computer PC-A denied because it may be unsafe"]
    );

    // A configured exclusion by name.
    let named = Site::start(
        &common::closed_address(),
        &servers(),
        "reject_unsafe = true\nexclusions = [\"file-server\"]",
        "",
        "",
    );
    named.report("dev-a", "red", &["10.1.0.1"]);
    assert_eq!(named.access("dev-a", "files")["allowed"], true);
    assert_eq!(named.device("files")["excluded"], true);
}

/// Returns the request body that lifts `device`'s exclusion.
fn lift_body(device: &str, reason: &str) -> Value {
    json!({ "device": device, "excluded": false, "reason": reason, "author": "jdoe" })
}

/// Returns the exclusion events of device `id`, oldest first.
fn exclusion_events(site: &Site, id: &str) -> Vec<Value> {
    site.device_events(id)
        .into_iter()
        .filter(|event| {
            event["type"]
                .as_str()
                .unwrap_or("")
                .starts_with("device_exclusion")
        })
        .collect()
}

#[test]
fn file_exclusions_lifted_at_runtime() {
    let mut site =
        Site::without_relay(&servers(), "reject_unsafe = true\nexclusions = [\"files\"]");
    site.report("dev-a", "green", &["10.1.0.1"]);
    site.report("cache", "red", &["10.1.0.3"]);
    site.report("relay", "red", &["10.1.0.4"]);
    site.report("files", "red", &["10.1.0.5"]);

    // Excluded by role and by the file: red, yet accepted and reachable.
    assert_eq!(site.access("cache", "dev-a")["allowed"], true);
    assert_eq!(site.access("dev-a", "files")["allowed"], true);
    assert_eq!(site.device("cache")["exclusion_source"], "role");
    assert_eq!(site.device("files")["exclusion_source"], "file");

    // The support token reads the exclusions but cannot lift one.
    let response = request(
        &site.api,
        "POST",
        "/api/v1/device-exclusions",
        Some(SUPPORT_TOKEN),
        Some(&lift_body("cache", "cache compromised")),
    );
    assert_eq!(response.status, 403, "{}", response.body);
    let response = request(
        &site.api,
        "GET",
        "/api/v1/device-exclusions",
        Some(SUPPORT_TOKEN),
        None,
    );
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(site.access("cache", "dev-a")["allowed"], true);

    // The admin lifts the role exclusion by id and the file's by name.
    let response = site.admin(
        "POST",
        "/api/v1/device-exclusions",
        Some(&lift_body("cache", "cache compromised")),
    );
    assert_eq!(response.status, 201, "{}", response.body);
    let lifted = response.json();
    assert_eq!(lifted["excluded"], false);
    assert_eq!(lifted["lifted"]["file_source"], "role");
    let response = site.admin(
        "POST",
        "/api/v1/device-exclusions",
        Some(&lift_body("FILE-SERVER", "audit of backups")),
    );
    assert_eq!(response.status, 201, "{}", response.body);
    assert_eq!(response.json()["device"], "files");

    // Both red servers are refused now, in both directions.
    assert_eq!(site.access("cache", "dev-a")["allowed"], false);
    assert_eq!(site.access("dev-a", "files")["allowed"], false);
    assert_eq!(site.access("relay", "dev-a")["allowed"], true);
    let cache = site.device("cache");
    assert_eq!(cache["excluded"], false, "{cache}");
    assert_eq!(cache["exclusion_source"], Value::Null, "{cache}");
    assert_eq!(cache["exclusion_lifted"]["by"], "jdoe", "{cache}");
    assert_eq!(cache["exclusion_lifted"]["reason"], "cache compromised");
    assert_eq!(cache["exclusion_lifted"]["file_source"], "role");
    assert_eq!(
        site.device("files")["exclusion_lifted"]["file_source"],
        "file"
    );

    // The list shows the lifts with their source, and what stays excluded.
    let listed = site.get("/api/v1/device-exclusions").json();
    let lifts = listed["lifted"].as_array().expect("lifted list");
    assert_eq!(lifts.len(), 2, "{listed}");
    assert_eq!(lifts[0]["device"], "cache");
    assert_eq!(lifts[0]["file_source"], "role");
    assert_eq!(lifts[1]["device"], "files");
    assert_eq!(lifts[1]["file_source"], "file");
    assert_eq!(listed["added"], json!([]), "{listed}");
    assert_eq!(
        listed["excluded"],
        json!([{ "id": "relay", "name": "MAIL-RELAY", "reason": "role message_relay (devices.exclude_message_relays)", "source": "role" }])
    );

    // Lifting twice, adding over a lift, and lifting what nothing excludes
    // are conflicts; an unknown device is not found.
    let response = site.admin(
        "POST",
        "/api/v1/device-exclusions",
        Some(&lift_body("cache", "again")),
    );
    assert_eq!(response.status, 409, "{}", response.body);
    let response = site.admin(
        "POST",
        "/api/v1/device-exclusions",
        Some(&json!({ "device": "cache", "reason": "back", "author": "jdoe" })),
    );
    assert_eq!(response.status, 409, "{}", response.body);
    assert!(response.body.contains("lifted"), "{}", response.body);
    let response = site.admin(
        "POST",
        "/api/v1/device-exclusions",
        Some(&lift_body("dev-a", "not excluded")),
    );
    assert_eq!(response.status, 409, "{}", response.body);
    assert!(
        response.body.contains("no exclusion to lift"),
        "{}",
        response.body
    );
    let response = site.admin(
        "POST",
        "/api/v1/device-exclusions",
        Some(&lift_body("nobody", "unknown")),
    );
    assert_eq!(response.status, 404, "{}", response.body);
    let response = site.admin(
        "POST",
        "/api/v1/device-exclusions",
        Some(&lift_body("relay", &"x".repeat(501))),
    );
    assert_eq!(response.status, 400, "{}", response.body);
    assert!(
        response.body.contains("501 characters"),
        "{}",
        response.body
    );

    // Neither a reload of the file nor a restart undoes the lifts.
    site.server.reload();
    assert_eq!(site.access("cache", "dev-a")["allowed"], false);
    assert_eq!(site.access("dev-a", "files")["allowed"], false);
    site.server.restart();
    wait_for_api(&site.api);
    assert_eq!(site.access("cache", "dev-a")["allowed"], false);
    assert_eq!(site.access("dev-a", "files")["allowed"], false);

    // The support token cannot reset a lift either.
    let response = request(
        &site.api,
        "DELETE",
        "/api/v1/device-exclusions/cache?by=helpdesk",
        Some(SUPPORT_TOKEN),
        None,
    );
    assert_eq!(response.status, 403, "{}", response.body);

    // Resetting removes the lift: the file's exclusions are in force again.
    let response = site.admin("DELETE", "/api/v1/device-exclusions/cache?by=jdoe", None);
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.json()["excluded"], false);
    let response = site.admin("DELETE", "/api/v1/device-exclusions/files?by=jdoe", None);
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(site.access("cache", "dev-a")["allowed"], true);
    assert_eq!(site.access("dev-a", "files")["allowed"], true);
    assert_eq!(site.device("cache")["exclusion_source"], "role");
    assert_eq!(site.device("files")["exclusion_lifted"], Value::Null);
    let response = site.admin("DELETE", "/api/v1/device-exclusions/cache?by=jdoe", None);
    assert_eq!(response.status, 404, "{}", response.body);

    // Each lift and reset is an event with who and why.
    let cache_events = exclusion_events(&site, "cache");
    let types: Vec<&str> = cache_events
        .iter()
        .map(|event| event["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        types,
        ["device_exclusion_lifted", "device_exclusion_restored"]
    );
    assert_eq!(cache_events[0]["by"], "jdoe");
    assert_eq!(cache_events[0]["reason"], "cache compromised");
    assert_eq!(cache_events[0]["source"], "role");
    assert_eq!(cache_events[1]["by"], "jdoe");
    let files_events = exclusion_events(&site, "files");
    assert_eq!(files_events.len(), 2, "{files_events:?}");
    assert_eq!(files_events[0]["source"], "file");
    assert_eq!(files_events[0]["reason"], "audit of backups");

    // The command line lifts and resets through the same API.
    let exclusions = |args: &[&str]| {
        let output = site.server.cli(&[&["device", "exclusions"], args].concat());
        assert!(output.status.success(), "{args:?}: {output:?}");
    };
    exclusions(&[
        "lift",
        "relay",
        "--reason",
        "relay moved",
        "--author",
        "jdoe",
    ]);
    assert_eq!(site.access("relay", "dev-a")["allowed"], false);
    exclusions(&["remove", "relay", "--by", "jdoe"]);
    assert_eq!(site.access("relay", "dev-a")["allowed"], true);
}

#[test]
fn reject_unsafe_off_refuses_nothing() {
    let sink = Upstream::start(UpstreamOptions::default());
    let site = Site::start(
        &sink.address(),
        &office(),
        "reject_unsafe = false\nrelay_gate = true",
        "",
        "",
    );
    site.report("dev-a", "red", &["127.0.0.2"]);
    site.report("dev-b", "red", &["10.1.0.2"]);
    let decision = site.access("dev-a", "dev-b");
    assert_eq!(decision["allowed"], true, "{decision}");
    // States are still tracked and reported.
    let device = site.device("dev-a");
    assert_eq!(device["state"], "red");
    assert_eq!(device["unsafe"], true);
    assert!(
        site.device_events("dev-a")
            .iter()
            .any(|event| event["type"] == "device_state_changed" && event["to"] == "red")
    );
    let reply = send_clean(&site.server.address, "127.0.0.2");
    assert_eq!(reply.code, 250, "{}", reply.text());
    assert!(site.texts_on("dev-a").is_empty());
    assert!(site.texts_on("dev-b").is_empty());
}

const CLEAN: &[u8] = b"Subject: hi\r\n\r\nLunch?\r\n";

/// Sends one clean message from `client_address` through `server` and
/// returns the final reply.
fn send_clean(server: &str, client_address: &str) -> common::smtp_client::Reply {
    let mut client = SmtpClient::connect_from(server, client_address);
    client.cmd("EHLO client.test", 250);
    let reply = client.send_message("alice@example.org", &["bob@example.net"], CLEAN);
    client.quit();
    reply
}
const GATE_TEXT: &str = "Access request from computer PC-A denied because it may be unsafe";

fn gate_devices() -> Vec<Spec> {
    vec![
        spec("dev-a", "PC-A", "workstation"),
        spec("dev-b", "PC-B", "workstation"),
        spec("cache", "UPDATE-CACHE", "update_cache"),
        spec("dev-n", "PC-N", "workstation"),
    ]
}

/// Reports dev-a red on 127.0.0.2, dev-b green on 127.0.0.3 and the
/// update cache red on 127.0.0.4.
fn report_gate_devices(site: &Site) {
    site.report("dev-a", "red", &["127.0.0.2"]);
    site.report("dev-b", "green", &["127.0.0.3"]);
    site.report("cache", "red", &["127.0.0.4"]);
}

#[test]
fn relay_gate_refuses_at_connect() {
    let sink = Upstream::start(UpstreamOptions::default());
    let site = Site::start(
        &sink.address(),
        &gate_devices(),
        "reject_unsafe = true\nrelay_gate = true",
        "",
        "",
    );
    report_gate_devices(&site);

    let mut client = SmtpClient::connect_without_greeting_from(&site.server.address, "127.0.0.2");
    let greeting = client.read_reply();
    assert_eq!(greeting.code, 554, "{}", greeting.text());
    assert_eq!(greeting.enhanced_code(), Some("5.7.1"));
    assert!(greeting.text().contains(GATE_TEXT), "{}", greeting.text());
    let refused: Vec<Value> = site
        .device_events("dev-a")
        .into_iter()
        .filter(|event| event["type"] == "relay_refused")
        .collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["stage"], "connect");
    assert_eq!(refused[0]["client"], "127.0.0.2");

    // A healthy device and an excluded server are served.
    for address in ["127.0.0.3", "127.0.0.4", "127.0.0.5"] {
        let reply = send_clean(&site.server.address, address);
        assert_eq!(reply.code, 250, "{address}: {}", reply.text());
    }

    // The address is reused by a healthy device: it follows that device.
    site.report("dev-n", "green", &["127.0.0.2"]);
    assert_eq!(site.device("dev-a")["addresses"], json!([]));
    let reply = send_clean(&site.server.address, "127.0.0.2");
    assert_eq!(reply.code, 250, "{}", reply.text());

    // With the gate off, an unsafe client is served too.
    let open = Site::start(
        &sink.address(),
        &gate_devices(),
        "reject_unsafe = true\nrelay_gate = false",
        "",
        "",
    );
    report_gate_devices(&open);
    let reply = send_clean(&open.server.address, "127.0.0.2");
    assert_eq!(reply.code, 250, "{}", reply.text());
    assert!(open.texts_on("dev-a").is_empty());
}

/// Rewrites relay_gate in the config and reloads it.
fn turn_gate_off(site: &Site) {
    site.server
        .rewrite_config(|text| text.replace("relay_gate = true", "relay_gate = false"));
    site.server.reload();
}

#[test]
fn relay_gate_behind_proxy_filter() {
    let sink = Upstream::start(UpstreamOptions::default());
    let site = Site::start(
        &sink.address(),
        &gate_devices(),
        "reject_unsafe = true\nrelay_gate = true",
        "xclient_peers = [\"127.0.0.1/32\"]",
        "",
    );
    report_gate_devices(&site);
    let postfix = Postfix::start(
        &sink.address(),
        &format!(
            "smtpd_proxy_filter = {}\nsmtpd_proxy_timeout = 30s\n",
            site.server.address
        ),
    );

    // Postfix connects to the filter at the first RCPT and names the
    // client by XFORWARD, so the refusal is the reply to RCPT.
    let mut client = SmtpClient::connect_from(&postfix.address, "127.0.0.2");
    client.cmd("EHLO client.test", 250);
    client.cmd("MAIL FROM:<alice@example.org>", 250);
    let reply = client.command("RCPT TO:<bob@example.net>");
    assert_eq!(reply.code, 554, "{}\n{}", reply.text(), postfix.log());
    assert!(reply.text().contains(GATE_TEXT), "{}", reply.text());
    client.quit();
    let refused: Vec<Value> = site
        .device_events("dev-a")
        .into_iter()
        .filter(|event| event["type"] == "relay_refused")
        .collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["stage"], "mail");

    for address in ["127.0.0.3", "127.0.0.4"] {
        let reply = send_clean(&postfix.address, address);
        assert_eq!(reply.code, 250, "{address}: {}", reply.text());
    }

    turn_gate_off(&site);
    let reply = send_clean(&postfix.address, "127.0.0.2");
    assert_eq!(reply.code, 250, "{}", reply.text());
    sink.wait_for_messages(3, Duration::from_secs(30));
}

#[test]
fn relay_gate_in_milter() {
    let sink = Upstream::start(UpstreamOptions::default());
    let milter = format!("127.0.0.1:{}", free_port());
    let site = Site::start(
        &sink.address(),
        &gate_devices(),
        "reject_unsafe = true\nrelay_gate = true",
        "",
        &format!("[milter]\nlisten = \"{milter}\"\n"),
    );
    // The harness moves a listener whose port was taken meanwhile.
    let milter = site.server.listen_address("milter");
    report_gate_devices(&site);
    let postfix = Postfix::start(
        &sink.address(),
        &format!(
            "smtpd_milters = inet:{milter}\nmilter_protocol = 6\nmilter_default_action = tempfail\n"
        ),
    );

    // A milter refusal at connect would get Postfix's own text, so the
    // refusal comes at MAIL.
    let mut client = SmtpClient::connect_from(&postfix.address, "127.0.0.2");
    client.cmd("EHLO client.test", 250);
    let reply = client.command("MAIL FROM:<alice@example.org>");
    assert_eq!(reply.code, 554, "{}\n{}", reply.text(), postfix.log());
    assert!(reply.text().contains(GATE_TEXT), "{}", reply.text());
    client.quit();

    for address in ["127.0.0.3", "127.0.0.4"] {
        let reply = send_clean(&postfix.address, address);
        assert_eq!(reply.code, 250, "{address}: {}", reply.text());
    }

    turn_gate_off(&site);
    let reply = send_clean(&postfix.address, "127.0.0.2");
    assert_eq!(reply.code, 250, "{}", reply.text());
    sink.wait_for_messages(3, Duration::from_secs(60));
    assert_eq!(site.texts_on("dev-a"), [GATE_TEXT]);
}

#[test]
fn devices_file_reload_keeps_previous() {
    let site = Site::without_relay(&office(), "reject_unsafe = true");
    std::fs::write(site.devices_file(), "[[device]]\nid = \"x\"\n").expect("break file");
    site.server.reload();
    let response = site.get("/api/v1/devices");
    let ids: Vec<Value> = response.json()["devices"]
        .as_array()
        .expect("list")
        .iter()
        .map(|device| device["id"].clone())
        .collect();
    assert_eq!(ids.len(), 4, "previous definitions kept: {ids:?}");
    assert!(site.server.log().contains("devices file not loaded"));

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sendguard"))
        .args(["config", "check"])
        .arg(&site.server.config_path)
        .output()
        .expect("run config check");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr).to_string()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(stderr.contains("devices.file"), "{stderr}");
}

#[test]
fn reject_unsafe_set_through_api() {
    let mut site = Site::without_relay(&office(), "reject_unsafe = true");
    site.report("dev-a", "red", &["10.1.0.1"]);
    site.report("dev-b", "green", &["10.1.0.2"]);
    assert_eq!(site.access("dev-a", "dev-b")["allowed"], false);

    // The command line overrides the file's value, recorded with who and why.
    let output = site.server.cli(&[
        "device",
        "settings",
        "--reject-unsafe",
        "false",
        "--reason",
        "incident drill",
        "--author",
        "jdoe",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let shown: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(shown["reject_unsafe"]["value"], false);
    assert_eq!(shown["reject_unsafe"]["source"], "api");
    assert_eq!(site.access("dev-a", "dev-b")["allowed"], true);

    // Neither a reload of the file nor a restart undoes it.
    site.server.reload();
    assert_eq!(site.access("dev-a", "dev-b")["allowed"], true);
    site.server.restart();
    wait_for_api(&site.api);
    assert_eq!(site.access("dev-a", "dev-b")["allowed"], true);

    // Reset: the file's value is in force again.
    let response = site.admin(
        "PUT",
        "/api/v1/device-settings",
        Some(&json!({ "reject_unsafe": null, "reason": "drill over", "author": "jdoe" })),
    );
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.json()["reject_unsafe"]["source"], "file");
    assert_eq!(site.access("dev-a", "dev-b")["allowed"], false);

    let response = site.get("/api/v1/events?type=device_setting_changed");
    let changes: Vec<Value> = response
        .body
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON line"))
        .collect();
    assert_eq!(changes.len(), 2);
    assert_eq!(changes[0]["value"], false);
    assert_eq!(changes[0]["by"], "jdoe");
    assert_eq!(changes[1]["value"], Value::Null);

    let response = site.admin(
        "PUT",
        "/api/v1/device-settings",
        Some(&json!({ "reject_unsafe": false })),
    );
    assert_eq!(response.status, 400, "reason and author are required");
}

#[test]
fn unsafe_device_cannot_sign_off_its_state() {
    let site = Site::without_relay(&office(), "reject_unsafe = true");
    site.report("dev-a", "red", &["10.1.0.1"]);
    site.report("dev-b", "green", &["10.1.0.2"]);
    site.report("dev-a", "offline", &[]);
    assert_eq!(site.device("dev-a")["state"], "red");
    let decision = site.access("dev-a", "dev-b");
    assert_eq!(decision["allowed"], false, "{decision}");
    site.report("dev-a", "green", &["10.1.0.1"]);
    assert_eq!(site.access("dev-a", "dev-b")["allowed"], true);
}

#[test]
fn heartbeats_need_the_device_token() {
    let site = Site::without_relay(&office(), "reject_unsafe = true");
    site.report("dev-a", "red", &["10.1.0.1"]);
    let body = json!({ "device": "dev-a", "health": "green", "addresses": ["10.1.0.1"] });
    let by_admin = site.admin("POST", "/api/v1/heartbeats", Some(&body));
    assert_eq!(by_admin.status, 403, "{}", by_admin.body);
    let by_other = request(
        &site.api,
        "POST",
        "/api/v1/heartbeats",
        Some(site.token("dev-b")),
        Some(&body),
    );
    assert_eq!(by_other.status, 403, "{}", by_other.body);
    assert_eq!(site.device("dev-a")["state"], "red");
}

#[test]
fn heartbeat_addresses_checked() {
    let site = Site::without_relay(&office(), "reject_unsafe = true");
    let view = site.report(
        "dev-a",
        "green",
        &["fe80::1%eth0", "10.1.0.1", "0.0.0.0", "junk"],
    );
    assert_eq!(view["ignored_addresses"], json!(["0.0.0.0", "junk"]));
    let device = site.device("dev-a");
    let addresses = device["addresses"].as_array().expect("addresses").clone();
    assert!(addresses.contains(&json!("fe80::1")), "{device}");
    assert!(addresses.contains(&json!("10.1.0.1")), "{device}");
    let many: Vec<String> = (0..65).map(|index| format!("10.9.{index}.1")).collect();
    let body = json!({ "device": "dev-a", "health": "green", "addresses": many });
    let response = request(
        &site.api,
        "POST",
        "/api/v1/heartbeats",
        Some(site.token("dev-a")),
        Some(&body),
    );
    assert_eq!(response.status, 400, "{}", response.body);
}

#[test]
fn unsafe_device_moving_subnet_told() {
    let site = Site::without_relay(&office(), "reject_unsafe = true");
    site.report("dev-a", "red", &["10.1.0.1"]);
    site.report("dev-b", "green", &["10.1.0.2"]);
    site.report("dev-d", "green", &["10.2.0.4"]);
    let mut old_subnet = site.stream("dev-b", None);
    let mut new_subnet = site.stream("dev-d", None);
    site.report("dev-a", "red", &["10.2.0.1"]);
    let wait = Duration::from_secs(20);
    let joined = new_subnet.next_event(wait).expect("the new subnet is told");
    assert_eq!(joined.event.as_deref(), Some("device_unsafe"));
    assert_eq!(joined.json()["device"], "dev-a");
    let left = old_subnet.next_event(wait).expect("the old subnet is told");
    assert_eq!(left.event.as_deref(), Some("device_safe"));
    assert_eq!(left.json()["subnet"], "10.1.0.0/24");
}
