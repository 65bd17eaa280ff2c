//! Lockout actions end to end: the real binary, recording HTTP receivers for
//! the endpoint-scan and alert webhooks, and a recording SMTP server that
//! gets both the relayed mail and the alert e-mails. Bad messages are GTUBE
//! spam, which the built-in rules always catch, so no clamd is needed.

mod common;

use common::sendguard::Sendguard;
use common::smtp_client::send_from;
use common::upstream::{Received, Upstream, UpstreamOptions};
use common::webhook::{Receiver, Request};
use hmac::{Hmac, Mac};
use sendguard::policy::Timestamp;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";
const SECRET: &str = "test-webhook-secret";
const WAIT: Duration = Duration::from_secs(20);

const DIRECTORY: &str = r#"
[[mailbox]]
address = "alice@example.org"
logins = ["alice"]
owner = { id = "u-1001", name = "Alice Smith" }
devices = [{ id = "dev-17", name = "ALICE-LAPTOP" }, { id = "dev-18", name = "ALICE-PHONE" }]
"#;

/// Files the config points at, kept apart from the server's own directory
/// so a test can rewrite them.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        let dir = tempfile::tempdir().expect("temporary directory");
        std::fs::write(dir.path().join("secret"), format!("{SECRET}\n")).expect("write secret");
        std::fs::write(dir.path().join("directory.toml"), DIRECTORY).expect("write directory");
        Files { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

/// What to configure beyond the defaults of these tests.
struct Setup<'a> {
    scan_url: Option<String>,
    synchronized: bool,
    alert_url: Option<String>,
    admin_addresses: &'a [&'a str],
    give_up_after: &'a str,
    /// TOML appended inside [alerts]; a [policy] section here replaces the
    /// default one.
    extra: &'a str,
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Setup {
            scan_url: None,
            synchronized: true,
            alert_url: None,
            admin_addresses: &[],
            give_up_after: "1h",
            extra: "",
        }
    }
}

fn start(upstream: &Upstream, files: &Files, setup: &Setup<'_>) -> Sendguard {
    let mut config = format!(
        "[directory]\npath = \"{}\"\n[actions]\nsecret_file = \"{}\"\n\
         retry_initial = \"1s\"\nretry_max = \"2s\"\ntimeout = \"5s\"\ngive_up_after = \"{}\"\n",
        files.path("directory.toml"),
        files.path("secret"),
        setup.give_up_after,
    );
    config.push_str(&format!(
        "[synchronized_security]\nenabled = {}\n",
        setup.synchronized && setup.scan_url.is_some()
    ));
    if let Some(url) = &setup.scan_url {
        config.push_str(&format!("endpoint_scan_url = \"{url}\"\n"));
    }
    config.push_str("[alerts]\n");
    if let Some(url) = &setup.alert_url {
        config.push_str(&format!("webhook_url = \"{url}\"\n"));
    }
    let addresses: Vec<String> = setup
        .admin_addresses
        .iter()
        .map(|address| format!("\"{address}\""))
        .collect();
    config.push_str(&format!("admin_addresses = [{}]\n", addresses.join(", ")));
    config.push_str(setup.extra);
    if !setup.extra.contains("[policy]") {
        config.push_str("\n[policy]\nthreshold = 3\nwindow = \"10m\"\nfirst_lockout = \"1h\"\n");
    }
    Sendguard::start(&upstream.address(), &config)
}

fn spam_message(index: usize) -> Vec<u8> {
    format!(
        "From: alice@example.org\r\nTo: bob@example.net\r\nSubject: offer\r\n\
         Message-ID: <spam-{index}@example.org>\r\n\r\n{GTUBE}\r\n"
    )
    .into_bytes()
}

/// Sends three GTUBE messages from alice, the threshold of these tests.
/// Sends one message from `from` and returns the reply code of MAIL FROM
/// when it is refused, else the final reply code.
fn send(address: &str, from: &str, content: &[u8]) -> u16 {
    send_from(address, from, content).0
}

fn trigger_lockout(server: &Sendguard) {
    for index in 0..3 {
        assert_eq!(
            send(&server.address, "alice@example.org", &spam_message(index)),
            550
        );
    }
}

/// Checks the signature headers of a webhook request with an HMAC computed
/// here, independently of sendguard's code.
fn assert_signed(request: &Request) {
    let timestamp: i64 = request
        .header("Sendguard-Timestamp")
        .expect("timestamp header")
        .parse()
        .expect("timestamp is a number");
    let now = Timestamp::now().millis() / 1000;
    assert!(
        (now - timestamp).abs() < 300,
        "timestamp {timestamp} is far from now {now}"
    );
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(&request.body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(
        request.header("Sendguard-Signature"),
        Some(expected.as_str())
    );
}

fn rfc3339(value: &Value) -> Timestamp {
    Timestamp::parse_rfc3339(value.as_str().expect("a time string")).expect("an RFC 3339 time")
}

fn delivered_count(server: &Sendguard) -> usize {
    server.events_of("action_delivered").len()
}

fn alert_mails(upstream: &Upstream) -> Vec<Received> {
    upstream
        .messages()
        .into_iter()
        .filter(|message| String::from_utf8_lossy(&message.content).contains("Auto-Submitted"))
        .collect()
}

fn write_file(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write file");
}

#[test]
fn lockout_sends_signed_scan_and_alert() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let scan = Receiver::start();
    let alert = Receiver::start();
    let files = Files::new();
    let server = start(
        &upstream,
        &files,
        &Setup {
            scan_url: Some(scan.url("/scan")),
            alert_url: Some(alert.url("/alert")),
            admin_addresses: &["secops@example.org"],
            ..Setup::default()
        },
    );
    trigger_lockout(&server);
    assert_eq!(
        send(
            &server.address,
            "alice@example.org",
            b"Subject: hi\r\n\r\nhello\r\n"
        ),
        550
    );

    let requests = scan.wait_for(1, WAIT);
    let request = &requests[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/scan");
    assert_eq!(request.header("Content-Type"), Some("application/json"));
    assert_eq!(request.header("Sendguard-Event"), Some("endpoint_scan"));
    assert_signed(request);
    let body = request.json();
    assert_eq!(
        request.header("Sendguard-Delivery"),
        body["delivery_id"].as_str()
    );
    assert_eq!(body["mailbox"], "alice@example.org");
    assert_eq!(body["owner"]["id"], "u-1001");
    assert_eq!(body["owner"]["name"], "Alice Smith");
    let devices: Vec<&str> = body["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|device| device["id"].as_str().expect("device id"))
        .collect();
    assert_eq!(devices, ["dev-17", "dev-18"]);
    assert_eq!(body["lockout"]["number"], 1);
    assert_eq!(body["lockout"]["permanent"], false);
    let started = rfc3339(&body["lockout"]["started"]);
    let until = rfc3339(&body["lockout"]["until"]);
    assert_eq!(until.since(started), Duration::from_secs(3600));

    let strikes = body["strikes"].as_array().expect("strikes");
    assert_eq!(strikes.len(), 3);
    let bad_messages = server.events_of("bad_message");
    for (index, strike) in strikes.iter().enumerate() {
        assert!(
            strike["verdict"]
                .as_str()
                .is_some_and(|v| v.contains("GTUBE"))
        );
        assert_eq!(strike["message_id"], format!("<spam-{index}@example.org>"));
        assert_eq!(strike["transaction"], bad_messages[index]["transaction"]);
        assert!(rfc3339(&strike["time"]) <= started);
    }

    let requests = alert.wait_for(1, WAIT);
    let request = &requests[0];
    assert_eq!(request.header("Sendguard-Event"), Some("admin_alert"));
    assert_signed(request);
    let body = request.json();
    assert_eq!(body["event"], "lockout_started");
    assert_eq!(body["monitor"], false);
    assert_eq!(body["endpoint_scan_requested"], true);
    assert_eq!(body["owner"]["name"], "Alice Smith");
    assert_eq!(body["lockout"]["until"], until.to_rfc3339());

    let mails = upstream.wait_for_messages(1, WAIT);
    assert_eq!(mails.len(), 1, "only the alert reaches the upstream");
    let mail = &mails[0];
    assert_eq!(mail.mail_line, "MAIL FROM:<sendguard@sendguard.test>");
    assert_eq!(mail.accepted_rcpts, ["secops@example.org"]);
    let text = String::from_utf8_lossy(&mail.content);
    assert!(
        text.contains(&format!(
            "Subject: sendguard: alice@example.org is locked out until {} (lockout 1)",
            until.to_rfc3339()
        )),
        "{text}"
    );
    assert!(text.contains("Alice Smith (u-1001)"), "{text}");
    assert!(
        text.contains("ALICE-LAPTOP (dev-17), ALICE-PHONE (dev-18)"),
        "{text}"
    );

    let events = server.wait_for_events(WAIT, |events| {
        events
            .iter()
            .filter(|event| event["type"] == "action_delivered")
            .count()
            == 3
    });
    let started_event = events
        .iter()
        .find(|event| event["type"] == "lockout_started")
        .expect("lockout_started event");
    let queued: Vec<&str> = started_event["deliveries"]
        .as_array()
        .expect("deliveries")
        .iter()
        .map(|delivery| delivery["delivery_id"].as_str().expect("id"))
        .collect();
    assert_eq!(queued.len(), 3);
    assert!(queued.contains(&scan.requests()[0].header("Sendguard-Delivery").expect("id")));
    assert!(
        queued.contains(
            &alert.requests()[0]
                .header("Sendguard-Delivery")
                .expect("id")
        )
    );
}

#[test]
fn synchronized_security_off_skips_scan() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let relay = Upstream::start(UpstreamOptions::default());
    let scan = Receiver::start();
    let alert = Receiver::start();
    let files = Files::new();
    let extra = format!("relay = \"{}\"\n", relay.address());
    let server = start(
        &upstream,
        &files,
        &Setup {
            scan_url: Some(scan.url("/scan")),
            synchronized: false,
            alert_url: Some(alert.url("/alert")),
            admin_addresses: &["secops@example.org", "oncall@example.org"],
            extra: &extra,
            ..Setup::default()
        },
    );
    trigger_lockout(&server);
    assert_eq!(
        send(
            &server.address,
            "alice@example.org",
            b"Subject: hi\r\n\r\nhello\r\n"
        ),
        550
    );

    let body = alert.wait_for(1, WAIT)[0].json();
    assert_eq!(body["endpoint_scan_requested"], false);
    let mails = relay.wait_for_messages(1, WAIT);
    assert_eq!(
        mails[0].accepted_rcpts,
        ["secops@example.org", "oncall@example.org"]
    );
    assert!(String::from_utf8_lossy(&mails[0].content).contains("synchronized_security is off"));
    assert!(
        alert_mails(&upstream).is_empty(),
        "alert went to alerts.relay only"
    );

    server.wait_for_events(WAIT, |events| {
        events
            .iter()
            .filter(|event| event["type"] == "action_delivered")
            .count()
            == 2
    });
    let started = server.events_of("lockout_started");
    let actions: Vec<&str> = started[0]["deliveries"]
        .as_array()
        .expect("deliveries")
        .iter()
        .map(|delivery| delivery["action"].as_str().expect("action"))
        .collect();
    assert_eq!(actions, ["admin_alert", "alert_mail"]);
    assert!(scan.requests().is_empty());
}

#[test]
fn receiver_back_after_restart_gets_same_delivery() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let port = common::free_port();
    let files = Files::new();
    let mut server = start(
        &upstream,
        &files,
        &Setup {
            scan_url: Some(format!("http://127.0.0.1:{port}/scan")),
            ..Setup::default()
        },
    );
    trigger_lockout(&server);
    let events = server.wait_for_events(WAIT, |events| {
        events.iter().any(|event| event["type"] == "action_failed")
    });
    let queued = events
        .iter()
        .find(|event| event["type"] == "lockout_started")
        .expect("lockout_started")["deliveries"][0]["delivery_id"]
        .as_str()
        .expect("delivery id")
        .to_string();
    let failed = &server.events_of("action_failed")[0];
    assert_eq!(failed["delivery_id"], queued.as_str());
    assert_eq!(failed["attempt"], 1);
    assert!(
        failed["detail"]
            .as_str()
            .is_some_and(|detail| detail.contains("cannot connect"))
    );

    server.kill9();
    let failures_before = server.events_of("action_failed").len();
    server.restart();
    server.wait_for_events(WAIT, |events| {
        events
            .iter()
            .filter(|event| event["type"] == "action_failed")
            .count()
            > failures_before
    });

    let receiver = Receiver::start_on(port);
    let requests = receiver.wait_for(1, WAIT);
    assert_eq!(
        requests[0].header("Sendguard-Delivery"),
        Some(queued.as_str())
    );
    assert_eq!(requests[0].json()["delivery_id"], queued.as_str());
    assert_signed(&requests[0]);
    let events = server.wait_for_events(WAIT, |events| {
        events
            .iter()
            .any(|event| event["type"] == "action_delivered")
    });
    let delivered = events
        .iter()
        .find(|event| event["type"] == "action_delivered")
        .expect("action_delivered");
    assert_eq!(delivered["delivery_id"], queued.as_str());
    assert!(
        delivered["attempt"]
            .as_u64()
            .is_some_and(|attempt| attempt >= 3)
    );
    let outbox = server.cli(&["outbox"]);
    assert!(
        String::from_utf8_lossy(&outbox.stdout).contains("no webhook or alert e-mail is waiting")
    );
}

#[test]
fn undeliverable_webhook_given_up() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let alert = Receiver::start();
    alert.set_status(500);
    let files = Files::new();
    let server = start(
        &upstream,
        &files,
        &Setup {
            alert_url: Some(alert.url("/alert")),
            give_up_after: "3s",
            ..Setup::default()
        },
    );
    trigger_lockout(&server);
    let pending = server.cli(&["outbox"]);
    let listing = String::from_utf8_lossy(&pending.stdout).to_string();
    assert!(listing.contains("admin_alert"), "{listing}");

    let events = server.wait_for_events(WAIT, |events| {
        events
            .iter()
            .any(|event| event["type"] == "action_abandoned")
    });
    let abandoned = events
        .iter()
        .find(|event| event["type"] == "action_abandoned")
        .expect("action_abandoned");
    assert_eq!(abandoned["action"], "admin_alert");
    assert_eq!(abandoned["mailbox"], "alice@example.org");
    let detail = abandoned["detail"].as_str().expect("detail");
    assert!(detail.contains("given up"), "{detail}");
    assert!(detail.contains("500"), "{detail}");

    let requests = alert.requests();
    assert!(
        requests.len() >= 2,
        "retried before giving up: {}",
        requests.len()
    );
    let id = abandoned["delivery_id"].as_str().expect("id");
    for request in &requests {
        assert_eq!(request.header("Sendguard-Delivery"), Some(id));
    }
    let failed = server.events_of("action_failed");
    assert_eq!(failed.len() + 1, requests.len());
    let outbox = server.cli(&["outbox"]);
    assert!(
        String::from_utf8_lossy(&outbox.stdout).contains("no webhook or alert e-mail is waiting")
    );
    assert_eq!(delivered_count(&server), 0);
}

#[test]
fn monitor_mode_alerts_marked_without_scan() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let scan = Receiver::start();
    let alert = Receiver::start();
    let files = Files::new();
    let server = start(
        &upstream,
        &files,
        &Setup {
            scan_url: Some(scan.url("/scan")),
            alert_url: Some(alert.url("/alert")),
            admin_addresses: &["secops@example.org"],
            extra: "[policy]\nmode = \"monitor\"\nthreshold = 3\nfirst_lockout = \"1h\"\n",
            ..Setup::default()
        },
    );
    trigger_lockout(&server);
    // Monitor mode refuses no sender.
    assert_eq!(
        send(
            &server.address,
            "alice@example.org",
            b"Subject: hi\r\n\r\nhello\r\n"
        ),
        250
    );

    let body = alert.wait_for(1, WAIT)[0].json();
    assert_eq!(body["monitor"], true);
    assert_eq!(body["endpoint_scan_requested"], false);
    server.wait_for_events(WAIT, |events| {
        events
            .iter()
            .filter(|event| event["type"] == "action_delivered")
            .count()
            == 2
    });
    let mails = alert_mails(&upstream);
    assert_eq!(mails.len(), 1);
    let text = String::from_utf8_lossy(&mails[0].content);
    assert!(
        text.contains("Subject: [monitor only] sendguard: alice@example.org"),
        "{text}"
    );
    assert!(scan.requests().is_empty());
}

#[test]
fn lockout_end_alerted_by_webhook() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let alert = Receiver::start();
    let files = Files::new();
    let server = start(
        &upstream,
        &files,
        &Setup {
            alert_url: Some(alert.url("/alert")),
            admin_addresses: &["secops@example.org"],
            extra: "[policy]\nthreshold = 3\nfirst_lockout = \"2s\"\n",
            ..Setup::default()
        },
    );
    trigger_lockout(&server);
    let requests = alert.wait_for(2, WAIT);
    let started = requests[0].json();
    let ended = requests[1].json();
    assert_eq!(started["event"], "lockout_started");
    assert_eq!(ended["event"], "lockout_ended");
    assert_eq!(ended["time"], started["lockout"]["until"]);
    assert_eq!(ended["owner"]["name"], "Alice Smith");
    assert_ne!(started["delivery_id"], ended["delivery_id"]);
    assert!(
        ended["summary"]
            .as_str()
            .is_some_and(|summary| summary.contains("the next lockout would last 4s"))
    );
    server.wait_for_events(WAIT, |events| {
        events
            .iter()
            .filter(|event| event["type"] == "action_delivered")
            .count()
            == 3
    });
    // Ends go by webhook only: the one e-mail is the start's.
    assert_eq!(alert_mails(&upstream).len(), 1);
}

#[test]
fn refused_alert_mail_not_retried() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let relay = Upstream::start(
        UpstreamOptions::default().reject_rcpt("secops@example.org", "550 5.1.1 no such user"),
    );
    let files = Files::new();
    let extra = format!("relay = \"{}\"\n", relay.address());
    let server = start(
        &upstream,
        &files,
        &Setup {
            admin_addresses: &["secops@example.org"],
            extra: &extra,
            ..Setup::default()
        },
    );
    trigger_lockout(&server);
    let events = server.wait_for_events(WAIT, |events| {
        events
            .iter()
            .any(|event| event["type"] == "action_abandoned")
    });
    let abandoned = events
        .iter()
        .find(|event| event["type"] == "action_abandoned")
        .expect("action_abandoned");
    assert_eq!(abandoned["action"], "alert_mail");
    assert_eq!(abandoned["attempt"], 1);
    let detail = abandoned["detail"].as_str().expect("detail");
    assert!(detail.contains("refused for good"), "{detail}");
    assert!(detail.contains("alert relay"), "{detail}");
    assert!(server.events_of("action_failed").is_empty());
}

#[test]
fn webhook_credentials_redacted() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let alert = Receiver::start();
    alert.set_status(500);
    let files = Files::new();
    let url = format!(
        "http://hookuser:Pa55word@127.0.0.1:{}/alert?api_key=TOPSECRET",
        alert.port()
    );
    let server = start(
        &upstream,
        &files,
        &Setup {
            alert_url: Some(url),
            ..Setup::default()
        },
    );
    trigger_lockout(&server);
    let requests = alert.wait_for(1, WAIT);
    assert_eq!(requests[0].path, "/alert?api_key=TOPSECRET");
    assert!(
        requests[0]
            .header("Authorization")
            .is_some_and(|value| value.starts_with("Basic "))
    );
    let events = server.wait_for_events(WAIT, |events| {
        events.iter().any(|event| event["type"] == "action_failed")
    });
    let report = serde_json::to_string(&events).expect("JSON");
    assert!(!report.contains("Pa55word"), "{report}");
    assert!(!report.contains("TOPSECRET"), "{report}");
    assert!(report.contains("api_key=REDACTED"), "{report}");
    let log = server.log();
    assert!(!log.contains("Pa55word"));
    assert!(!log.contains("TOPSECRET"));
    let outbox = server.cli(&["outbox"]);
    assert!(!String::from_utf8_lossy(&outbox.stdout).contains("TOPSECRET"));
}

#[test]
fn permanent_block_requests_scan() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let scan = Receiver::start();
    let files = Files::new();
    let server = start(
        &upstream,
        &files,
        &Setup {
            scan_url: Some(scan.url("/scan")),
            admin_addresses: &["secops@example.org"],
            extra: "[policy]\nthreshold = 3\ntimed_lockouts = 0\n",
            ..Setup::default()
        },
    );
    trigger_lockout(&server);
    let body = scan.wait_for(1, WAIT)[0].json();
    assert_eq!(body["lockout"]["permanent"], true);
    assert_eq!(body["lockout"]["until"], Value::Null);
    assert_eq!(body["devices"][0]["name"], "ALICE-LAPTOP");
    let mails = upstream.wait_for_messages(1, WAIT);
    let text = String::from_utf8_lossy(&mails[0].content);
    assert!(
        text.contains("Subject: sendguard: alice@example.org is blocked permanently"),
        "{text}"
    );
    assert!(text.contains("until support lifts the block"), "{text}");
}

#[test]
fn broken_directory_keeps_previous() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let alert = Receiver::start();
    let files = Files::new();
    let server = start(
        &upstream,
        &files,
        &Setup {
            alert_url: Some(alert.url("/alert")),
            ..Setup::default()
        },
    );
    write_file(
        &files.dir.path().join("directory.toml"),
        "[[mailbox]]\naddress = \"alice@example.org\"\nowner = { id = ",
    );
    server.reload();
    assert!(
        server
            .log()
            .contains("the previous directory stays in force")
    );
    trigger_lockout(&server);
    let body = alert.wait_for(1, WAIT)[0].json();
    assert_eq!(body["owner"]["name"], "Alice Smith");
}

#[test]
fn unknown_owner_still_blocked() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let alert = Receiver::start();
    let files = Files::new();
    let server = start(
        &upstream,
        &files,
        &Setup {
            alert_url: Some(alert.url("/alert")),
            admin_addresses: &["secops@example.org"],
            ..Setup::default()
        },
    );
    for index in 0..3 {
        assert_eq!(
            send(&server.address, "mallory@example.net", &spam_message(index)),
            550
        );
    }
    assert_eq!(
        send(
            &server.address,
            "mallory@example.net",
            b"Subject: hi\r\n\r\nhello\r\n"
        ),
        550
    );
    let body = alert.wait_for(1, WAIT)[0].json();
    assert_eq!(body["mailbox"], "mallory@example.net");
    assert_eq!(body["owner"], Value::Null);
    assert_eq!(body["devices"], serde_json::json!([]));
    let mails = upstream.wait_for_messages(1, WAIT);
    let text = String::from_utf8_lossy(&mails[0].content);
    assert!(
        text.contains("unknown: the mailbox is not in the directory file"),
        "{text}"
    );
}
