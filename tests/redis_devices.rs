//! Device settings and exclusions made through one host's admin API apply
//! on every host sharing the Redis store.

mod common;

use common::http::request;
use common::redis::{RedisServer, wait_until_subscribed};
use common::sendguard::Sendguard;
use serde_json::{Value, json};
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
        std::fs::write(
            &book,
            "[[device]]\nid = \"dev-a\"\nname = \"PC-A\"\nrole = \"workstation\"\n\
             [[device]]\nid = \"dev-b\"\nname = \"PC-B\"\nrole = \"workstation\"\n",
        )
        .expect("write devices file");
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
