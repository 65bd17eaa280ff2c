//! Device health, settings and exclusions reported or made through one
//! host's admin API apply on every host sharing the Redis store.

mod common;

use common::http::request;
use common::redis::{RedisServer, wait_until_subscribed};
use common::sendguard::Sendguard;
use common::smtp_client::SmtpClient;
use common::sse::SseStream;
use sendguard::policy::Timestamp;
use serde_json::{Value, json};
use sha2::Digest;
use std::time::{Duration, Instant};

const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";

/// A host with an admin API and a devices file of two office computers.
struct Host {
    server: Sendguard,
    api: String,
    _files: tempfile::TempDir,
}

impl Host {
    fn start(redis: &RedisServer) -> Host {
        Host::start_with(redis, "")
    }

    /// Starts a host with `devices_extra` lines added to `[devices]`.
    fn start_with(redis: &RedisServer, devices_extra: &str) -> Host {
        let files = tempfile::tempdir().expect("temporary directory");
        let token = files.path().join("admin.token");
        std::fs::write(&token, format!("{ADMIN_TOKEN}\n")).expect("write admin token");

        let book = files.path().join("devices.toml");
        let mut devices = String::new();
        for (id, name) in [("dev-a", "PC-A"), ("dev-b", "PC-B")] {
            let hash = hex::encode(sha2::Sha256::digest(device_token(id).as_bytes()));
            devices.push_str(&format!(
                "[[device]]\nid = \"{id}\"\nname = \"{name}\"\nrole = \"workstation\"\n\
                 owner = \"u-{id}\"\ntoken_sha256 = \"{hash}\"\n"
            ));
        }
        std::fs::write(&book, devices).expect("write devices file");

        let config = format!(
            "backend = \"redis\"\nurl = \"{}\"\n\
             [admin]\nlisten = \"127.0.0.1:{}\"\ntoken_file = \"{}\"\n\
             [devices]\nfile = \"{}\"\nreject_unsafe = true\n{devices_extra}\n",
            redis.url(),
            common::free_port(),
            token.display(),
            book.display()
        );

        let server = Sendguard::start(&common::closed_address(), &config);
        wait_until_subscribed(&server);
        let api = server.listen_address("admin");
        Host {
            server,
            api,
            _files: files,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let response = request(&self.api, method, path, Some(ADMIN_TOKEN), body);
        assert!(response.status < 300, "{method} {path}: {}", response.body);
        response.json()
    }

    /// Waits until this host has reloaded the device settings `before` + 1
    /// times, as it logs.
    fn wait_for_reload(&self, before: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while reloads(&self.server) <= before {
            assert!(
                Instant::now() < deadline,
                "no reload:\n{}",
                self.server.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Reports device `id`'s health with its own token.
    fn report(&self, id: &str, health: &str, address: &str) {
        let body = json!({ "device": id, "health": health, "addresses": [address] });
        let token = device_token(id);
        let response = request(
            &self.api,
            "POST",
            "/api/v1/heartbeats",
            Some(&token),
            Some(&body),
        );
        assert_eq!(response.status, 200, "{}", response.body);
    }

    /// Returns this host's access decision from `source` to `destination`.
    fn access(&self, source: &str, destination: &str) -> Value {
        let body = json!({ "source": source, "destination": destination });
        self.call("POST", "/api/v1/access", Some(&body))
    }

    /// Waits until this host's access decision from `source` to
    /// `destination` is `allowed`, and returns it.
    fn wait_for_access(&self, source: &str, destination: &str, allowed: bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let decision = self.access(source, destination);
            if decision["allowed"] == allowed {
                return decision;
            }
            assert!(
                Instant::now() < deadline,
                "decision stayed {decision}:\n{}",
                self.server.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Returns the SMTP greeting this host sends a client connecting from
    /// `client_address`.
    fn greeting_from(&self, client_address: &str) -> u16 {
        let mut client =
            SmtpClient::connect_without_greeting_from(&self.server.address, client_address);
        client.read_reply().code
    }

    /// Returns whether this host's log shows that it holds the device timer
    /// lease now.
    fn holds_device_lease(&self) -> bool {
        let log = self.server.log();
        let last = log
            .lines()
            .rfind(|line| line.contains("device timer lease changed hands"));
        last.is_some_and(|line| line.contains("held=true"))
    }
}

/// Returns the `device_state_changed` events of `device` in the shared
/// stream, as `from` → `to` pairs.
fn state_changes(host: &Host, device: &str) -> Vec<(String, String)> {
    host.server
        .events_of("device_state_changed")
        .iter()
        .filter(|event| event["device"] == device)
        .map(|event| {
            (
                event["from"].as_str().unwrap_or_default().to_string(),
                event["to"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Waits until the shared stream records `device` as missing.
fn wait_for_missing(host: &Host, device: &str, timeout: Duration) {
    host.server.wait_for_events(timeout, |events| {
        events.iter().any(|event| {
            event["type"] == "device_state_changed"
                && event["device"] == device
                && event["to"] == "missing"
        })
    });
}

/// Counts the changes to missing among `changes`.
fn missing_count(changes: &[(String, String)]) -> usize {
    changes.iter().filter(|(_, to)| to == "missing").count()
}

/// Starts three hosts whose agents time out after `timeout`, and returns
/// them with the index of the one holding the device timer lease.
fn three_hosts(redis: &RedisServer, timeout: &str) -> (Vec<Host>, usize) {
    let extra = format!("heartbeat_timeout = \"{timeout}\"");
    let hosts: Vec<Host> = (0..3).map(|_| Host::start_with(redis, &extra)).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let holders: Vec<usize> = (0..hosts.len())
            .filter(|&index| hosts[index].holds_device_lease())
            .collect();
        if holders.len() == 1 {
            return (hosts, holders[0]);
        }
        assert!(
            Instant::now() < deadline,
            "expected one lease holder, found {holders:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn device_token(id: &str) -> String {
    format!("device-token-of-{id}-0123456789")
}

fn reloads(server: &Sendguard) -> usize {
    server
        .log()
        .matches("device settings and exclusions reloaded")
        .count()
}

#[test]
fn device_settings_shared_across_hosts() {
    let redis = RedisServer::start();
    let first = Host::start(&redis);
    let second = Host::start(&redis);

    // A setting changed on the first host is in force on the second.
    let before = reloads(&second.server);
    first.call(
        "PUT",
        "/api/v1/device-settings",
        Some(&json!({ "reject_unsafe": false, "reason": "incident drill", "author": "jdoe" })),
    );
    second.wait_for_reload(before);
    let shown = second.call("GET", "/api/v1/device-settings", None);
    assert_eq!(shown["reject_unsafe"]["value"], false, "{shown}");
    assert_eq!(shown["reject_unsafe"]["source"], "api", "{shown}");

    // So is an exclusion, and its removal.
    let before = reloads(&second.server);
    first.call(
        "POST",
        "/api/v1/device-exclusions",
        Some(&json!({ "device": "dev-a", "reason": "file server", "author": "jdoe" })),
    );
    second.wait_for_reload(before);
    let listed = second.call("GET", "/api/v1/device-exclusions", None);
    assert_eq!(listed["added"][0]["device"], "dev-a", "{listed}");

    let before = reloads(&first.server);
    second.call("DELETE", "/api/v1/device-exclusions/dev-a", None);
    first.wait_for_reload(before);
    let listed = first.call("GET", "/api/v1/device-exclusions", None);
    assert_eq!(listed["added"], json!([]), "{listed}");

    // Every change is one event in the shared stream.
    let events = first.server.events();
    let kinds: Vec<&str> = events
        .iter()
        .filter_map(|event| event["type"].as_str())
        .filter(|kind| kind.starts_with("device_"))
        .collect();
    assert_eq!(
        kinds,
        [
            "device_setting_changed",
            "device_exclusion_added",
            "device_exclusion_removed"
        ]
    );
}

#[test]
fn synchronized_security_shared_across_hosts() {
    let redis = RedisServer::start();
    let first = Host::start(&redis);
    let mut second = Host::start(&redis);

    // Turned off on the first host, synchronized security is off on the
    // second, with the author and reason.
    let before = reloads(&second.server);
    first.call(
        "PUT",
        "/api/v1/settings",
        Some(&json!({ "synchronized_security": false, "reason": "console upgrade", "author": "jdoe" })),
    );
    second.wait_for_reload(before);
    let shown = second.call("GET", "/api/v1/settings", None);
    assert_eq!(shown["synchronized_security"]["value"], false, "{shown}");
    assert_eq!(shown["synchronized_security"]["source"], "api", "{shown}");
    assert_eq!(shown["synchronized_security"]["author"], "jdoe", "{shown}");

    // Redis keeps it across a restart of the second host.
    second.server.restart();
    wait_until_subscribed(&second.server);
    let shown = second.call("GET", "/api/v1/settings", None);
    assert_eq!(shown["synchronized_security"]["value"], false, "{shown}");
    assert_eq!(shown["synchronized_security"]["source"], "api", "{shown}");

    // A reset on the second host brings back the file's value on both.
    let before = reloads(&first.server);
    second.call(
        "PUT",
        "/api/v1/settings",
        Some(&json!({ "synchronized_security": null, "reason": "upgrade done", "author": "jdoe" })),
    );
    first.wait_for_reload(before);
    let shown = first.call("GET", "/api/v1/settings", None);
    assert_eq!(shown["synchronized_security"]["source"], "file", "{shown}");
    let changes = first.server.events_of("setting_changed");
    assert_eq!(changes.len(), 2, "{changes:#?}");
}

#[test]
fn subnet_notice_reaches_agents_on_other_host() {
    let redis = RedisServer::start();
    let first = Host::start(&redis);
    let second = Host::start(&redis);

    // Each agent reports to a different host; dev-b watches its subnet on
    // the second.
    first.report("dev-a", "green", "10.1.0.1");
    second.report("dev-b", "green", "10.1.0.2");
    let token = device_token("dev-b");
    let mut stream = SseStream::open(&second.api, "/api/v1/devices/dev-b/events", &token, None);
    assert_eq!(stream.status, 200);

    // dev-a turns red on the first host; dev-b hears of it on the second.
    // The stream's keep-alives restart its read timeout, so the wait is
    // bounded here.
    let (sender, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(stream.next_event(Duration::from_secs(20)));
    });
    first.report("dev-a", "red", "10.1.0.1");
    let notice = received
        .recv_timeout(Duration::from_secs(30))
        .ok()
        .flatten()
        .expect("dev-b is told through the other host");
    assert_eq!(notice.event.as_deref(), Some("device_unsafe"));
    assert_eq!(notice.json()["device"], "dev-a");
    assert_eq!(notice.json()["subnet"], "10.1.0.0/24");
}

#[test]
fn red_on_one_host_refused_on_another() {
    let redis = RedisServer::start();
    let first = Host::start_with(&redis, "relay_gate = true");
    let second = Host::start_with(&redis, "relay_gate = true");
    first.report("dev-b", "green", "127.0.0.3");
    assert_eq!(
        second.greeting_from("127.0.0.2"),
        220,
        "no device owns it yet"
    );

    // dev-a reports red to the first host; the second refuses it.
    first.report("dev-a", "red", "127.0.0.2");
    let decision = second.wait_for_access("127.0.0.2", "dev-b", false);
    assert_eq!(decision["source"]["id"], "dev-a", "{decision}");
    assert_eq!(decision["source"]["unsafe"], true, "{decision}");
    assert_eq!(second.greeting_from("127.0.0.2"), 554);
    let shown = second.call("GET", "/api/v1/devices/dev-a", None);
    assert_eq!(shown["state"], "red", "{shown}");
    assert_eq!(shown["addresses"], json!(["127.0.0.2"]), "{shown}");

    // Green again on the second host; the first accepts it again.
    second.report("dev-a", "green", "127.0.0.2");
    let decision = first.wait_for_access("127.0.0.2", "dev-b", true);
    assert_eq!(decision["source"]["unsafe"], false, "{decision}");
    assert_eq!(first.greeting_from("127.0.0.2"), 220);

    // Each transition is one event in the shared stream.
    assert_eq!(
        state_changes(&first, "dev-a"),
        [
            ("unknown".to_string(), "red".to_string()),
            ("red".to_string(), "green".to_string())
        ]
    );
}

#[test]
fn address_moves_across_hosts() {
    let redis = RedisServer::start();
    let first = Host::start(&redis);
    let second = Host::start(&redis);

    // dev-a reports an address red on the first host; dev-b reports the
    // same address green on the second, so it belongs to dev-b.
    first.report("dev-a", "red", "10.9.0.5");
    second.report("dev-b", "green", "10.9.0.5");

    let decision = first.wait_for_access("10.9.0.5", "dev-a", false);
    assert_eq!(decision["source"]["id"], "dev-b", "{decision}");
    let shown = first.call("GET", "/api/v1/devices/dev-a", None);
    assert_eq!(shown["addresses"], json!([]), "{shown}");
    assert_eq!(shown["state"], "red", "{shown}");
}

#[test]
fn missing_recorded_once_across_hosts() {
    let redis = RedisServer::start();
    let (hosts, holder) = three_hosts(&redis, "4s");
    let other = (holder + 1) % hosts.len();

    // dev-a reports to a host that does not hold the lease, then stops.
    hosts[other].report("dev-a", "green", "10.2.0.1");
    hosts[other].report("dev-b", "green", "10.2.0.2");
    wait_for_missing(&hosts[holder], "dev-a", Duration::from_secs(30));

    // Every host's timer has run several times since; still one event.
    std::thread::sleep(Duration::from_secs(6));
    let changes = state_changes(&hosts[other], "dev-a");
    assert_eq!(missing_count(&changes), 1, "{changes:?}");
    for host in &hosts {
        let decision = host.access("10.2.0.1", "dev-b");
        assert_eq!(decision["allowed"], false, "{decision}");
    }

    // dev-b's agent receives one notice that dev-a is unsafe, on any host.
    let token = device_token("dev-b");
    for (index, host) in hosts.iter().enumerate() {
        let mut stream =
            SseStream::open(&host.api, "/api/v1/devices/dev-b/events", &token, Some(0));
        assert_eq!(stream.status, 200);
        let mut notices = Vec::new();
        while let Some(notice) = stream.next_event(Duration::from_secs(2)) {
            notices.push(notice.json());
        }
        let about_a: Vec<&Value> = notices
            .iter()
            .filter(|notice| notice["device"] == "dev-a")
            .collect();
        assert_eq!(about_a.len(), 1, "host {index}: {notices:?}");
        assert_eq!(about_a[0]["type"], "device_unsafe", "host {index}");
        assert_eq!(about_a[0]["state"], "missing", "host {index}");
    }
}

#[test]
fn missing_detected_after_holder_killed() {
    let redis = RedisServer::start();
    let (mut hosts, holder) = three_hosts(&redis, "4s");
    let other = (holder + 1) % hosts.len();

    // dev-a reports once, and the lease holder dies before it times out.
    hosts[other].report("dev-a", "green", "10.3.0.1");
    hosts[holder].server.kill9();

    wait_for_missing(&hosts[other], "dev-a", Duration::from_secs(40));
    let survivors: Vec<usize> = (0..hosts.len()).filter(|&index| index != holder).collect();
    assert!(
        survivors
            .iter()
            .any(|&index| hosts[index].holds_device_lease()),
        "a surviving host took the lease over"
    );

    std::thread::sleep(Duration::from_secs(6));
    let changes = state_changes(&hosts[other], "dev-a");
    assert_eq!(missing_count(&changes), 1, "{changes:?}");
}

#[test]
fn grace_counts_from_shared_start() {
    let redis = RedisServer::start();
    let extra = "heartbeat_timeout = \"20s\"";
    let first = Host::start_with(&redis, extra);
    first.report("dev-a", "green", "10.4.0.1");

    // A second host starts well after the heartbeat and takes the lease
    // over from the first, which stops responding but keeps its process.
    std::thread::sleep(Duration::from_secs(10));
    let second = Host::start_with(&redis, extra);
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", &first.server.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(stopped.success());

    // The first host received the heartbeats meanwhile, so the second
    // counts the timeout from the hosts' shared start: dev-a is missing
    // 20 s after its heartbeat, not 20 s after the second host started.
    wait_for_missing(&second, "dev-a", Duration::from_secs(40));
    let times: Vec<(String, i64)> = second
        .server
        .events_of("device_state_changed")
        .iter()
        .filter(|event| event["device"] == "dev-a")
        .map(|event| {
            let time = event["time"].as_str().unwrap_or_default();
            let at = Timestamp::parse_rfc3339(time).expect("RFC 3339 time");
            (
                event["to"].as_str().unwrap_or_default().to_string(),
                at.millis(),
            )
        })
        .collect();
    assert_eq!(times.len(), 2, "{times:?}");
    assert_eq!(times[0].0, "green");
    assert_eq!(times[1].0, "missing");
    let silent = Duration::from_millis(u64::try_from(times[1].1 - times[0].1).expect("in order"));
    assert!(
        silent >= Duration::from_secs(20),
        "missing after {silent:?}"
    );
    assert!(silent < Duration::from_secs(27), "missing after {silent:?}");
}

#[test]
fn pending_device_work_moved_once() {
    let redis = RedisServer::start();
    let first = Host::start(&redis);
    let second = Host::start(&redis);

    // A host wrote a state change and died before moving its event on.
    let event = json!({
        "time": 1_764_900_000_000_i64,
        "kind": "device_state_changed",
        "mailbox": null,
        "key_client": null,
        "details": { "device": "dev-a", "from": "green", "to": "red", "name": "PC-A" }
    });
    let work = json!({
        "created": 1_764_900_000_000_i64,
        "work": { "id": "left-behind", "events": [event], "deliveries": [] },
        "notices": []
    });
    redis.cli(&[
        "HSET",
        "sendguard:devices:{devices}:pending",
        "left-behind",
        &work.to_string(),
    ]);

    // The device lease holder moves it to the stream, once.
    let deadline = Instant::now() + Duration::from_secs(20);
    while redis
        .cli(&["HLEN", "sendguard:devices:{devices}:pending"])
        .trim()
        != "0"
    {
        assert!(Instant::now() < deadline, "the pending work stayed");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(3));
    let changes = state_changes(&second, "dev-a");
    assert_eq!(
        changes,
        [("green".to_string(), "red".to_string())],
        "{}",
        first.server.log()
    );
}

#[test]
fn exclusion_lift_shared_across_hosts() {
    let redis = RedisServer::start();
    let excluded = "exclusions = [\"dev-b\"]";
    let first = Host::start_with(&redis, excluded);
    let mut second = Host::start_with(&redis, excluded);
    first.report("dev-a", "green", "10.1.0.1");
    first.report("dev-b", "red", "10.1.0.2");
    second.wait_for_access("dev-a", "dev-b", true);

    // A lift made on the first host is in force on the second.
    let before = reloads(&second.server);
    let lifted = first.call(
        "POST",
        "/api/v1/device-exclusions",
        Some(&json!({ "device": "dev-b", "excluded": false, "reason": "infected", "author": "jdoe" })),
    );
    assert_eq!(lifted["lifted"]["file_source"], "file", "{lifted}");
    second.wait_for_reload(before);
    let decision = second.access("dev-a", "dev-b");
    assert_eq!(decision["allowed"], false, "{decision}");
    let device = second.call("GET", "/api/v1/devices/dev-b", None);
    assert_eq!(device["exclusion_lifted"]["by"], "jdoe", "{device}");
    let listed = second.call("GET", "/api/v1/device-exclusions", None);
    assert_eq!(listed["lifted"][0]["device"], "dev-b", "{listed}");
    assert_eq!(listed["lifted"][0]["file_source"], "file", "{listed}");

    // Redis keeps the lift across a restart of the second host.
    second.server.restart();
    wait_until_subscribed(&second.server);
    second.wait_for_access("dev-a", "dev-b", false);

    // A reset on the second host brings back the file's exclusion on both.
    let before = reloads(&first.server);
    let removed = second.call("DELETE", "/api/v1/device-exclusions/dev-b?by=jdoe", None);
    assert_eq!(removed["excluded"], false, "{removed}");
    first.wait_for_reload(before);
    let decision = first.access("dev-a", "dev-b");
    assert_eq!(decision["allowed"], true, "{decision}");
    let device = first.call("GET", "/api/v1/devices/dev-b", None);
    assert_eq!(device["exclusion_source"], "file", "{device}");

    // The lift and the reset are one event each in the shared stream.
    let kinds: Vec<String> = first
        .server
        .events()
        .iter()
        .filter_map(|event| event["type"].as_str())
        .filter(|kind| kind.starts_with("device_exclusion"))
        .map(str::to_string)
        .collect();
    assert_eq!(
        kinds,
        ["device_exclusion_lifted", "device_exclusion_restored"]
    );
}
