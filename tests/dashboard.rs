//! The admin dashboard end to end in a real browser. The real binary runs
//! with clamd, a recording upstream and a recording webhook receiver, and
//! its data comes from EICAR messages sent through SMTP. The pages are
//! driven in headless Chromium (Debian's `chromium`) by
//! `tests/dashboard/run.mjs` through playwright-core. Screenshots of every
//! page go to `target/dashboard-screenshots/`.
//!
//! Needs `node`, `/usr/bin/chromium` and clamd (`SENDGUARD_TEST_CLAMD` or a
//! clamd on PATH); `scripts/install-deps.sh` installs them and the npm
//! package.

mod common;

use common::clamd::Clamd;
use common::http::request;
use common::sendguard::Sendguard;
use common::smtp_client::send_from;
use common::upstream::{Upstream, UpstreamOptions};
use common::webhook::Receiver;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const EICAR: &str = r"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";
const ADMIN: &str = "admin-token-for-dashboard-0123456789";
const SUPPORT: &str = "support-token-for-dashboard-0123456789";
const SECRET: &str = "dashboard-webhook-secret";
const WAIT: Duration = Duration::from_secs(20);

/// Mailboxes: carol is blocked permanently, alice gets a timed lockout,
/// dave and erin are locked out after synchronized security is turned off.
const DIRECTORY: &str = r#"
[[mailbox]]
address = "alice@example.org"
owner = { id = "u-1", name = "Alice Smith" }
devices = [{ id = "dev-17", name = "ALICE-LAPTOP" }]

[[mailbox]]
address = "carol@example.org"
owner = { id = "u-3", name = "Carol Jones" }
devices = [{ id = "dev-30", name = "CAROL-DESKTOP" }]

[[mailbox]]
address = "dave@example.org"
owner = { id = "u-4", name = "Dave Brown" }
devices = [{ id = "dev-40", name = "DAVE-LAPTOP" }]

[[mailbox]]
address = "erin@example.org"
owner = { id = "u-5", name = "Erin White" }
devices = [{ id = "dev-50", name = "ERIN-LAPTOP" }]
"#;

/// Devices for the devices page: three report, and one never does.
const DEVICES: &[(&str, &str, &str)] = &[
    ("dev-17", "ALICE-LAPTOP", "workstation"),
    ("dev-30", "CAROL-DESKTOP", "workstation"),
    ("dev-40", "DAVE-LAPTOP", "workstation"),
    ("srv-1", "FILESERVER", "server"),
];

fn device_token(id: &str) -> String {
    format!("device-token-of-{id}-0123456789")
}

fn sha256_hex(text: &str) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(text.as_bytes()))
}

fn eicar_message(index: usize) -> Vec<u8> {
    format!(
        "From: someone@example.org\r\nTo: bob@example.net\r\nSubject: invoice {index}\r\n\
         Message-ID: <eicar-{index}@example.org>\r\n\r\n{EICAR}\r\n"
    )
    .into_bytes()
}

/// Sends five EICAR messages from `from`, the threshold of this test; each
/// is rejected as a virus.
fn send_five_eicar(server: &Sendguard, from: &str) {
    for index in 0..5 {
        let (code, text) = send_from(&server.address, from, &eicar_message(index));
        assert_eq!(code, 550, "EICAR message {index} from {from}: {text}");
    }
}

/// Returns the endpoint-scan requests that name `mailbox`.
fn scan_requests_for(receiver: &Receiver, mailbox: &str) -> usize {
    receiver
        .requests()
        .iter()
        .filter(|request| request.path == "/scan" && request.json()["mailbox"] == mailbox)
        .count()
}

/// Waits for the admin alert of `mailbox`'s lockout, which the outbox
/// sends together with the endpoint scan when one is planned.
fn wait_for_alert(receiver: &Receiver, mailbox: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let alerted = receiver
            .requests()
            .iter()
            .any(|request| request.path == "/alert" && request.json()["mailbox"] == mailbox);
        if alerted {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no admin alert for {mailbox} within {WAIT:?}: {:#?}",
            receiver.requests()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Checks that node, Chromium and the npm package are there, installing
/// the package with `npm ci` when `node_modules` is missing. Only the
/// first test of this file checks and installs, because the tests run in
/// parallel and two `npm ci` runs in one directory remove each other's files.
fn browser_tools() -> PathBuf {
    static DRIVER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DRIVER.get_or_init(install_browser_tools).clone()
}

fn install_browser_tools() -> PathBuf {
    let driver = repository().join("tests/dashboard");
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|output| output.status.success()),
        "node is missing: the dashboard tests drive Chromium from Node.js; install it with \
         scripts/install-deps.sh (Debian package nodejs)"
    );
    assert!(
        Path::new("/usr/bin/chromium").is_file(),
        "/usr/bin/chromium is missing: install Debian's chromium package with \
         scripts/install-deps.sh"
    );
    if !driver.join("node_modules/playwright-core").is_dir() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&driver)
            .status()
            .expect("run npm ci in tests/dashboard");
        assert!(
            status.success(),
            "npm ci in tests/dashboard failed with {status}; it installs playwright-core from \
             the committed package-lock.json"
        );
    }
    driver
}

/// The server and everything the browser phases need.
struct Site {
    server: Sendguard,
    base: String,
    api: String,
    webhooks: Receiver,
    screenshots: PathBuf,
    driver: PathBuf,
    /// Directory of the tokens, the directory file and the devices file.
    files: tempfile::TempDir,
    _upstream: Upstream,
    _clamd: Clamd,
}

impl Site {
    fn start() -> Site {
        let driver = browser_tools();
        let clamd = Clamd::start();
        let upstream = Upstream::start(UpstreamOptions::default());
        let webhooks = Receiver::start();
        let files = tempfile::tempdir().expect("temporary directory");
        let path = |name: &str| files.path().join(name).display().to_string();
        std::fs::write(path("admin.token"), format!("{ADMIN}\n")).expect("write admin token");
        std::fs::write(path("secret"), format!("{SECRET}\n")).expect("write secret");
        std::fs::write(path("directory.toml"), DIRECTORY).expect("write directory");
        let mut book = String::new();
        for (id, name, role) in DEVICES {
            book.push_str(&format!(
                "[[device]]\nid = \"{id}\"\nname = \"{name}\"\nrole = \"{role}\"\n\
                 token_sha256 = \"{}\"\n",
                sha256_hex(&device_token(id))
            ));
        }
        std::fs::write(path("devices.toml"), book).expect("write devices file");
        let api = format!("127.0.0.1:{}", common::free_port());
        // Every lockout is permanent until the reload below makes them
        // timed, so carol's first lockout blocks her for good.
        let config = format!(
            "[scan.clamd]\naddress = \"{clamd}\"\ntimeout = \"10s\"\n\
             [admin]\nlisten = \"{api}\"\ntoken_file = \"{admin_token}\"\n\
             support_token_sha256 = \"{support}\"\n\
             [directory]\npath = \"{directory}\"\n\
             [devices]\nfile = \"{devices}\"\nheartbeat_timeout = \"8s\"\n\
             [actions]\nsecret_file = \"{secret}\"\nretry_initial = \"1s\"\nretry_max = \"2s\"\n\
             timeout = \"5s\"\n\
             [synchronized_security]\nenabled = true\nendpoint_scan_url = \"{scan}\"\n\
             [alerts]\nwebhook_url = \"{alert}\"\n\
             [policy]\nthreshold = 5\nwindow = \"10m\"\nfirst_lockout = \"1h\"\ntimed_lockouts = 0\n",
            clamd = clamd.address,
            admin_token = path("admin.token"),
            support = sha256_hex(SUPPORT),
            directory = path("directory.toml"),
            devices = path("devices.toml"),
            secret = path("secret"),
            scan = webhooks.url("/scan"),
            alert = webhooks.url("/alert"),
        );
        let server = Sendguard::start(&upstream.address(), &config);
        let api = server.listen_address("admin");
        let screenshots = repository().join("target/dashboard-screenshots");
        std::fs::create_dir_all(&screenshots).expect("create target/dashboard-screenshots");
        Site {
            base: format!("http://{api}"),
            api,
            server,
            webhooks,
            screenshots,
            driver,
            files,
            _upstream: upstream,
            _clamd: clamd,
        }
    }

    /// Sends a heartbeat of device `id`.
    fn heartbeat(&self, id: &str, health: &str, address: &str) {
        let body = serde_json::json!({ "device": id, "health": health, "addresses": [address] });
        let response = request(
            &self.api,
            "POST",
            "/api/v1/heartbeats",
            Some(&device_token(id)),
            Some(&body),
        );
        assert_eq!(response.status, 200, "heartbeat of {id}: {}", response.body);
    }

    /// Waits until device `id` is in `expected` state.
    fn wait_for_device_state(&self, id: &str, expected: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let list = request(&self.api, "GET", "/api/v1/devices", Some(ADMIN), None).json();
            let state = list["devices"]
                .as_array()
                .and_then(|devices| devices.iter().find(|device| device["id"] == id))
                .map(|device| device["state"].clone());
            if state.as_ref().is_some_and(|state| state == expected) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "device {id} is {state:?}, not {expected}, after {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs one phase of the browser script and returns its result object.
    fn browser(&self, phase: &str, extra: &[(&str, &str)]) -> Value {
        let started = Instant::now();
        let output = Command::new("node")
            .arg("run.mjs")
            .arg(phase)
            .current_dir(&self.driver)
            .env("SENDGUARD_URL", &self.base)
            .env("ADMIN_TOKEN", ADMIN)
            .env("SUPPORT_TOKEN", SUPPORT)
            .env("SCREENSHOT_DIR", &self.screenshots)
            .envs(extra.iter().copied())
            .output()
            .expect("run node tests/dashboard/run.mjs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "browser phase {phase} failed ({}):\n{stdout}\n{stderr}\nserver log:\n{}",
            output.status,
            self.server.log()
        );
        eprintln!(
            "browser phase {phase} took {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let line = stdout
            .lines()
            .rev()
            .find_map(|line| line.strip_prefix("RESULT "))
            .unwrap_or_else(|| panic!("phase {phase} printed no RESULT line:\n{stdout}"));
        serde_json::from_str(line).expect("RESULT is JSON")
    }
}

#[test]
fn dashboard_in_browser() {
    let site = Site::start();

    // Carol is blocked permanently; her lockout requests an endpoint scan.
    send_five_eicar(&site.server, "carol@example.org");
    wait_for_alert(&site.webhooks, "carol@example.org");
    site.webhooks.wait_for(2, WAIT);
    assert_eq!(scan_requests_for(&site.webhooks, "carol@example.org"), 1);

    // From now on lockouts are timed; alice's lasts one hour.
    site.server
        .rewrite_config(|text| text.replace("timed_lockouts = 0", "timed_lockouts = 6"));
    site.server.reload();
    send_five_eicar(&site.server, "alice@example.org");
    wait_for_alert(&site.webhooks, "alice@example.org");

    // Devices: two green on one subnet, one red on another, one that
    // never reports.
    site.heartbeat("dev-17", "green", "10.1.2.17");
    site.heartbeat("dev-30", "red", "10.1.3.30");
    site.heartbeat("srv-1", "green", "10.1.2.5");

    // Frank has two strikes, below the threshold of five.
    for index in 0..2 {
        let (code, text) = send_from(
            &site.server.address,
            "frank@example.org",
            &eicar_message(index),
        );
        assert_eq!(code, 550, "{text}");
    }

    let overview = site.browser(
        "overview",
        &[
            ("LOCKED", "alice@example.org"),
            ("BLOCKED", "carol@example.org"),
            ("NEAR", "frank@example.org"),
        ],
    );
    eprintln!("overview phase: {overview}");
    assert_eq!(overview["role_badge"], "Admin session");
    assert_eq!(overview["filtered_rows"], 1);
    assert_eq!(overview["csrf_missing_status"], 403);
    assert_eq!(overview["after_logout_status"], 401);
    assert_eq!(overview["admin_unblock_status"], 403);
    // The chart of alice's events counts her five strikes and one lockout.
    let chart = overview["chart_title"].as_str().expect("chart title");
    assert!(
        chart.starts_with("5 strikes and 1 lockout between"),
        "{chart}"
    );
    let near = overview["near_threshold_row"].as_str().expect("near row");
    assert!(near.contains("2 of 5"), "frank's row: {near}");
    assert_eq!(overview["first_tab_stop"], "Skip to content");
    assert_eq!(overview["second_tab_stop"], "Overview");
    assert_eq!(overview["keyboard_reached_events"], true);
    let countdown = overview["countdown_first_s"]
        .as_u64()
        .expect("countdown read");
    assert!(
        (3000..=3600).contains(&countdown),
        "alice's one-hour lockout shows {countdown} s left"
    );

    // The support token lifts carol's permanent block in the browser.
    let unblock = site.browser(
        "unblock",
        &[
            ("BLOCKED", "carol@example.org"),
            ("LOCKED", "alice@example.org"),
        ],
    );
    eprintln!("unblock phase: {unblock}");
    assert_eq!(unblock["support_settings_status"], 403);
    let lifted = site.server.events_of("block_lifted");
    assert_eq!(lifted.len(), 1, "{lifted:#?}");
    assert_eq!(lifted[0]["mailbox"], "carol@example.org");
    assert_eq!(lifted[0]["reason"], "laptop reimaged, ticket 4711");
    let (code, _) = send_from(
        &site.server.address,
        "carol@example.org",
        &common::realistic_message("Carol is back."),
    );
    assert_eq!(code, 250, "carol can send again after the lift");

    // Alice's lockout requested a scan while synchronized security was on.
    assert_eq!(scan_requests_for(&site.webhooks, "alice@example.org"), 1);

    // Turned off in the browser, the next lockout requests no scan.
    let sync_off = site.browser("sync-off", &[("EXCLUDE", "dev-40")]);
    assert_eq!(sync_off["in_force"], "off");
    let excluded = site.server.events_of("device_exclusion_added");
    assert_eq!(excluded.len(), 1, "{excluded:#?}");
    assert_eq!(excluded[0]["device"], "dev-40");
    let changed = site.server.events_of("setting_changed");
    assert_eq!(changed.len(), 1, "{changed:#?}");
    assert_eq!(changed[0]["setting"], "synchronized_security");
    assert_eq!(changed[0]["value"], false);
    assert_eq!(changed[0]["by"], "jdoe");
    send_five_eicar(&site.server, "dave@example.org");
    wait_for_alert(&site.webhooks, "dave@example.org");
    assert_eq!(
        scan_requests_for(&site.webhooks, "dave@example.org"),
        0,
        "a lockout with synchronized security off requested an endpoint scan"
    );
    let dave = site
        .server
        .events_of("lockout_started")
        .into_iter()
        .find(|event| event["mailbox"] == "dave@example.org")
        .expect("dave's lockout_started event");
    assert!(
        !dave["deliveries"].to_string().contains("endpoint_scan"),
        "dave's lockout planned an endpoint scan: {dave}"
    );

    // A reload of the file, which sets enabled = true, keeps the override.
    site.server.reload();
    let settings = request(&site.api, "GET", "/api/v1/settings", Some(ADMIN), None).json();
    assert_eq!(settings["synchronized_security"]["value"], false);
    assert_eq!(settings["synchronized_security"]["source"], "api");
    assert_eq!(settings["synchronized_security"]["file_value"], true);
    // srv-1 stopped reporting at the start and goes missing after the 8 s
    // heartbeat timeout; dev-17 reports again just before the browser looks.
    site.wait_for_device_state("srv-1", "missing");
    site.heartbeat("dev-17", "green", "10.1.2.17");
    let after_reload = site.browser(
        "after-reload",
        &[
            ("MISSING_DEVICE", "FILESERVER"),
            ("REPORTING_DEVICE", "ALICE-LAPTOP"),
            ("EXCLUDE", "dev-40"),
        ],
    );
    assert_eq!(after_reload["in_force"], "off");
    let removed = site.server.events_of("device_exclusion_removed");
    assert_eq!(removed.len(), 1, "{removed:#?}");
    assert_eq!(removed[0]["device"], "dev-40");
    assert_eq!(
        removed[0]["by"], "jdoe",
        "the removal records who removed it"
    );
    send_five_eicar(&site.server, "erin@example.org");
    wait_for_alert(&site.webhooks, "erin@example.org");
    assert_eq!(
        scan_requests_for(&site.webhooks, "erin@example.org"),
        0,
        "the reload brought back the file's synchronized security"
    );

    // An exclusion stays stored when its device leaves the devices file;
    // the dashboard still lists it, so it can be removed.
    let added = request(
        &site.api,
        "POST",
        "/api/v1/device-exclusions",
        Some(ADMIN),
        Some(&serde_json::json!({ "device": "dev-30", "reason": "lab", "author": "jdoe" })),
    );
    assert_eq!(added.status, 201, "{}", added.body);
    let devices_file = site.files.path().join("devices.toml");
    let book = std::fs::read_to_string(&devices_file).expect("read devices file");
    let without_dev_30: String = book
        .split("[[device]]")
        .filter(|entry| !entry.trim().is_empty() && !entry.contains("\"dev-30\""))
        .map(|entry| format!("[[device]]{entry}"))
        .collect();
    std::fs::write(&devices_file, without_dev_30).expect("write devices file");
    site.server.reload();
    let unknown = site.browser("unknown-exclusion", &[("EXCLUDE", "dev-30")]);
    assert_eq!(unknown["unknown_exclusion_removed"], true);
    let removed = site.server.events_of("device_exclusion_removed");
    assert!(
        removed.iter().any(|event| event["device"] == "dev-30"),
        "{removed:#?}"
    );

    for page in [
        "login",
        "overview",
        "events",
        "mailbox",
        "devices",
        "settings",
        "mailbox-support",
        "overview-after-unblock",
        "settings-changed",
        "settings-after-reload",
    ] {
        let file = site.screenshots.join(format!("{page}.png"));
        assert!(file.is_file(), "no screenshot {}", file.display());
    }
    let phone = site.screenshots.join("overview-phone.png");
    assert!(phone.is_file(), "no screenshot {}", phone.display());
}

#[test]
fn file_exclusion_lifted_in_browser() {
    let site = Site::start();
    site.server.rewrite_config(|text| {
        text.replace(
            "heartbeat_timeout = \"8s\"\n",
            "heartbeat_timeout = \"8s\"\nexclusions = [\"srv-1\"]\n",
        )
    });
    site.server.reload();
    let listed = request(
        &site.api,
        "GET",
        "/api/v1/device-exclusions",
        Some(ADMIN),
        None,
    )
    .json();
    assert_eq!(listed["excluded"][0]["source"], "file", "{listed}");

    let lifted = site.browser("lift-exclusion", &[("EXCLUDE", "srv-1")]);
    eprintln!("lift-exclusion phase: {lifted}");
    let events: Vec<Value> = site
        .server
        .events()
        .into_iter()
        .filter(|event| {
            event["type"]
                .as_str()
                .is_some_and(|kind| kind.starts_with("device_exclusion"))
        })
        .collect();
    assert_eq!(events.len(), 2, "{events:#?}");
    assert_eq!(events[0]["type"], "device_exclusion_lifted");
    assert_eq!(events[0]["device"], "srv-1");
    assert_eq!(events[0]["by"], "jdoe");
    assert_eq!(events[0]["reason"], "server compromised, ticket OPS-77");
    assert_eq!(events[0]["source"], "file");
    assert_eq!(events[1]["type"], "device_exclusion_restored");
    assert_eq!(events[1]["by"], "jdoe");
    let listed = request(
        &site.api,
        "GET",
        "/api/v1/device-exclusions",
        Some(ADMIN),
        None,
    )
    .json();
    assert_eq!(listed["lifted"], serde_json::json!([]), "{listed}");
    assert_eq!(listed["excluded"][0]["id"], "srv-1", "{listed}");
}

#[test]
fn settings_survive_restart() {
    let mut site = Site::start();
    let put = |body: Value| {
        request(
            &site.api,
            "PUT",
            "/api/v1/settings",
            Some(ADMIN),
            Some(&body),
        )
    };

    let by_support = request(
        &site.api,
        "PUT",
        "/api/v1/settings",
        Some(SUPPORT),
        Some(&serde_json::json!({ "synchronized_security": false, "reason": "r", "author": "a" })),
    );
    assert_eq!(by_support.status, 403, "{}", by_support.body);
    let without_reason =
        put(serde_json::json!({ "synchronized_security": false, "author": "jdoe" }));
    assert_eq!(without_reason.status, 400, "{}", without_reason.body);
    assert!(
        without_reason.body.contains("missing reason"),
        "{}",
        without_reason.body
    );
    let wrong_type =
        put(serde_json::json!({ "synchronized_security": "off", "reason": "r", "author": "a" }));
    assert_eq!(wrong_type.status, 400, "{}", wrong_type.body);

    let changed = put(serde_json::json!({
        "synchronized_security": false,
        "reject_unsafe": true,
        "reason": "maintenance window",
        "author": "jdoe",
    }));
    assert_eq!(changed.status, 200, "{}", changed.body);

    // SQLite keeps both overrides across a restart.
    site.server.restart();
    let shown = request(&site.api, "GET", "/api/v1/settings", Some(SUPPORT), None).json();
    assert_eq!(shown["synchronized_security"]["value"], false, "{shown}");
    assert_eq!(shown["synchronized_security"]["source"], "api", "{shown}");
    assert_eq!(shown["reject_unsafe"]["value"], true, "{shown}");
    assert_eq!(shown["reject_unsafe"]["source"], "api", "{shown}");

    // null goes back to the file's value.
    let put = |body: Value| {
        request(
            &site.api,
            "PUT",
            "/api/v1/settings",
            Some(ADMIN),
            Some(&body),
        )
    };
    let reset = put(
        serde_json::json!({ "synchronized_security": null, "reason": "done", "author": "jdoe" }),
    );
    assert_eq!(reset.status, 200, "{}", reset.body);
    let shown = reset.json();
    assert_eq!(shown["synchronized_security"]["value"], true, "{shown}");
    assert_eq!(shown["synchronized_security"]["source"], "file", "{shown}");
    assert_eq!(shown["reject_unsafe"]["source"], "api", "{shown}");
    let events = site.server.events_of("setting_changed");
    assert_eq!(events.len(), 2, "{events:#?}");
    assert_eq!(events[1]["value"], Value::Null);

    // The command line changes the same settings through the API.
    let cli = |args: &[&str]| {
        let output = site.server.cli(args);
        let stdout = String::from_utf8_lossy(&output.stdout).to_string();
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        (output.status.success(), stdout, stderr)
    };
    let (ok, stdout, stderr) = cli(&[
        "settings",
        "--synchronized-security",
        "false",
        "--reason",
        "scanner vendor outage",
        "--author",
        "jdoe",
    ]);
    assert!(ok, "{stderr}");
    let shown: Value = serde_json::from_str(&stdout).expect("settings as JSON");
    assert_eq!(shown["synchronized_security"]["value"], false, "{shown}");
    assert_eq!(shown["synchronized_security"]["source"], "api", "{shown}");
    let (ok, _, stderr) = cli(&["settings", "--synchronized-security", "off"]);
    assert!(!ok);
    assert!(
        stderr.contains("invalid --synchronized-security \"off\""),
        "{stderr}"
    );
    let (ok, _, stderr) = cli(&["settings", "--synchronized-security", "true"]);
    assert!(!ok);
    assert!(stderr.contains("missing reason"), "{stderr}");
    let (ok, stdout, stderr) = cli(&[
        "settings",
        "--synchronized-security",
        "file",
        "--reason",
        "outage over",
        "--author",
        "jdoe",
    ]);
    assert!(ok, "{stderr}");
    let (ok, listed, stderr) = cli(&["settings"]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout, listed);
    let shown: Value = serde_json::from_str(&listed).expect("settings as JSON");
    assert_eq!(shown["synchronized_security"]["source"], "file", "{shown}");
    assert_eq!(site.server.events_of("setting_changed").len(), 4);
    let (ok, _, stderr) = cli(&["settings", "--reason", "r", "--author", "a"]);
    assert!(!ok);
    assert!(stderr.contains("nothing to change"), "{stderr}");

    // The events table names a reset instead of showing an empty value.
    let (ok, table, stderr) = cli(&["events", "--type", "setting_changed"]);
    assert!(ok, "{stderr}");
    assert!(
        table.contains(
            "synchronized_security = the configuration file's value by jdoe: outage over"
        ),
        "{table}"
    );
    assert!(
        table.contains("synchronized_security = false by jdoe: scanner vendor outage"),
        "{table}"
    );
}

#[test]
fn session_endpoints_need_valid_login() {
    let site = Site::start();
    let login = |token: &str| {
        request(
            &site.api,
            "POST",
            "/api/v1/session",
            None,
            Some(&serde_json::json!({ "token": token })),
        )
    };

    let admin = login(ADMIN);
    assert_eq!(admin.status, 200, "{}", admin.body);
    assert_eq!(admin.json()["role"], "admin");
    let cookie = admin.header("set-cookie").expect("Set-Cookie").to_string();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    assert!(cookie.contains("Path=/"), "{cookie}");
    assert!(
        admin
            .header("content-security-policy")
            .is_some_and(|csp| csp.contains("script-src 'self'")),
        "{:?}",
        admin.headers
    );
    assert_eq!(admin.header("x-frame-options"), Some("DENY"));
    assert_eq!(admin.header("cache-control"), Some("no-store"));

    let index = request(&site.api, "GET", "/", None, None);
    assert_eq!(index.status, 200);
    assert!(index.body.contains("/assets/app.js"));
    let script = request(&site.api, "GET", "/assets/app.js", None, None);
    assert_eq!(script.status, 200);
    assert!(
        script
            .header("content-type")
            .is_some_and(|kind| kind.starts_with("text/javascript"))
    );

    // A body too large to be a login gets 413 and counts as no failed login.
    let huge = request(
        &site.api,
        "POST",
        "/api/v1/session",
        None,
        Some(&serde_json::json!({ "token": "a".repeat(3 * 1024 * 1024) })),
    );
    assert_eq!(huge.status, 413, "{}", huge.body);
    assert!(huge.body.contains("too large"), "{}", huge.body);

    // Failed logins from one address are limited; the limit does not
    // touch bearer tokens.
    for attempt in 0..10 {
        let failed = login("wrong-token-0123456789");
        assert_eq!(failed.status, 401, "attempt {attempt}: {}", failed.body);
    }
    let limited = login(ADMIN);
    assert_eq!(limited.status, 429, "{}", limited.body);
    assert!(
        limited.body.contains("too many failed logins"),
        "{}",
        limited.body
    );
    let bearer = request(&site.api, "GET", "/api/v1/blocks", Some(ADMIN), None);
    assert_eq!(bearer.status, 200, "{}", bearer.body);
}

#[test]
fn overview_near_list_skips_blocked() {
    let site = Site::start();
    // More blocked mailboxes than the overview lists as close to the
    // threshold, all named before the one that is.
    for index in 0..201 {
        send_five_eicar(&site.server, &format!("b{index:03}@example.org"));
    }
    let (code, text) = send_from(&site.server.address, "zz@example.org", &eicar_message(0));
    assert_eq!(code, 550, "{text}");

    let overview = request(&site.api, "GET", "/api/v1/overview", Some(ADMIN), None).json();
    let blocked = overview["permanent_blocks"].as_array().map_or(0, Vec::len);
    assert_eq!(blocked, 201, "permanent blocks listed");
    let near: Vec<&str> = overview["near_threshold"]
        .as_array()
        .expect("near_threshold list")
        .iter()
        .filter_map(|entry| entry["mailbox"].as_str())
        .collect();
    assert_eq!(near, ["zz@example.org"], "mailboxes close to the threshold");
}
