//! Device settings and exclusions made through one host's admin API apply
//! on every host sharing the Redis store.

mod common;

use common::http::request;
use common::redis::{RedisServer, wait_until_subscribed};
use common::sendguard::Sendguard;
use common::sse::SseStream;
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
             [devices]\nfile = \"{}\"\nreject_unsafe = true\n",
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
