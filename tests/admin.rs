//! The admin API and its command line end to end: the real binary with
//! its API on a free loopback port, a recording upstream, and GTUBE spam,
//! which the built-in rules always catch.

mod common;

use common::http::{Response, request};
use common::sendguard::Sendguard;
use common::smtp_client::send_from;
use common::upstream::{Upstream, UpstreamOptions};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";
const ADMIN: &str = "admin-token-for-tests-0123456789";
const SUPPORT: &str = "support-token-for-tests-0123456789";
const WAIT: Duration = Duration::from_secs(20);

const DIRECTORY: &str = r#"
[[mailbox]]
address = "alice@example.org"
owner = { id = "u-1", name = "Alice Smith" }
devices = [{ id = "dev-17", name = "ALICE-LAPTOP" }]
"#;

/// A server with its admin API, and the files its config points at.
struct Admin {
    server: Sendguard,
    api: String,
    files: tempfile::TempDir,
    _upstream: Upstream,
}

impl Admin {
    fn start(policy: &str) -> Admin {
        Admin::start_with(policy, "")
    }

    fn start_with(policy: &str, extra: &str) -> Admin {
        let upstream = Upstream::start(UpstreamOptions::default());
        let files = tempfile::tempdir().expect("temporary directory");
        let token_file = files.path().join("admin.token");
        std::fs::write(&token_file, format!("{ADMIN}\n")).expect("write admin token");
        std::fs::write(files.path().join("support.token"), format!("{SUPPORT}\n"))
            .expect("write support token");
        std::fs::write(files.path().join("directory.toml"), DIRECTORY).expect("write directory");
        let support_hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(SUPPORT.as_bytes()));
        let api = format!("127.0.0.1:{}", common::free_port());
        let config = format!(
            "[admin]\nlisten = \"{api}\"\ntoken_file = \"{}\"\nsupport_token_sha256 = \"{support_hash}\"\n\
             [directory]\npath = \"{}\"\n[policy]\nwindow = \"10m\"\n{policy}\n{extra}",
            token_file.display(),
            files.path().join("directory.toml").display(),
        );
        let server = Sendguard::start(&upstream.address(), &config);
        // The harness moves a listener whose port was taken meanwhile.
        let api = server.listen_address("admin");
        Admin {
            server,
            api,
            files,
            _upstream: upstream,
        }
    }

    fn get(&self, path: &str, token: &str) -> Response {
        request(&self.api, "GET", path, Some(token), None)
    }

    fn post(&self, path: &str, token: &str, body: Value) -> Response {
        request(&self.api, "POST", path, Some(token), Some(&body))
    }

    fn file(&self, name: &str) -> String {
        self.files.path().join(name).display().to_string()
    }
}

/// Sends one message from `from` and returns the reply code of MAIL FROM
/// when it is refused, else the final reply code.
fn send(address: &str, from: &str, content: &str) -> u16 {
    send_from(address, from, content.as_bytes()).0
}

fn spam(index: usize) -> String {
    format!("Subject: offer {index}\r\nMessage-ID: <s{index}@example.org>\r\n\r\n{GTUBE}\r\n")
}

fn clean() -> String {
    "Subject: lunch\r\n\r\nSee you at noon.\r\n".to_string()
}

fn send_spam(admin: &Admin, from: &str, count: usize) {
    for index in 0..count {
        assert_eq!(send(&admin.server.address, from, &spam(index)), 550);
    }
}

#[test]
fn every_endpoint_needs_token() {
    let admin = Admin::start("threshold = 5");
    let endpoints = [
        ("GET", "/api/v1/blocks"),
        ("GET", "/api/v1/mailboxes/alice@example.org"),
        ("POST", "/api/v1/mailboxes/alice@example.org/unblock"),
        ("GET", "/api/v1/events"),
        ("GET", "/api/v1/exemptions"),
        ("POST", "/api/v1/exemptions"),
        ("DELETE", "/api/v1/exemptions/1"),
        ("GET", "/metrics"),
        ("GET", "/healthz"),
        ("GET", "/no/such/path"),
    ];
    for (method, path) in endpoints {
        let missing = request(&admin.api, method, path, None, None);
        assert_eq!(missing.status, 401, "{method} {path} without a token");
        assert_eq!(missing.header("www-authenticate"), Some("Bearer"));
        assert!(
            missing.json()["error"]
                .as_str()
                .is_some_and(|text| text.contains("Bearer"))
        );
        let wrong = request(
            &admin.api,
            method,
            path,
            Some("not-a-valid-token-at-all"),
            None,
        );
        assert_eq!(wrong.status, 401, "{method} {path} with a wrong token");
    }
    let health = admin.get("/healthz", ADMIN);
    assert_eq!(health.status, 200, "{}", health.body);
    assert_eq!(health.json()["store"], "ok");
}

#[test]
fn roles_limit_what_tokens_do() {
    let admin = Admin::start("threshold = 5");
    let unblock = admin.post(
        "/api/v1/mailboxes/alice@example.org/unblock",
        ADMIN,
        json!({"reason": "user asked"}),
    );
    assert_eq!(unblock.status, 403, "{}", unblock.body);
    assert!(
        unblock.json()["error"]
            .as_str()
            .is_some_and(|text| text.contains("support token"))
    );

    let exemption = admin.post(
        "/api/v1/exemptions",
        SUPPORT,
        json!({"sender": "alice@example.org", "reason": "x", "author": "y", "for": "1h"}),
    );
    assert_eq!(exemption.status, 403, "{}", exemption.body);
    // Support may read.
    assert_eq!(admin.get("/api/v1/blocks", SUPPORT).status, 200);
    assert_eq!(admin.get("/api/v1/events", SUPPORT).status, 200);
}

#[test]
fn support_lifts_permanent_block() {
    let admin = Admin::start("threshold = 2\ntimed_lockouts = 0");
    send_spam(&admin, "alice@example.org", 2);
    assert_eq!(
        send(&admin.server.address, "alice@example.org", &clean()),
        550
    );
    let blocks = admin.get("/api/v1/blocks", ADMIN).json();
    assert_eq!(blocks["blocks"][0]["mailbox"], "alice@example.org");
    assert_eq!(blocks["blocks"][0]["permanent"], true);

    let missing_reason = admin.post(
        "/api/v1/mailboxes/alice@example.org/unblock",
        SUPPORT,
        json!({}),
    );
    assert_eq!(missing_reason.status, 400, "{}", missing_reason.body);

    let lifted = admin.post(
        "/api/v1/mailboxes/Alice@Example.org/unblock",
        SUPPORT,
        json!({"reason": "laptop reinstalled, ticket 4711"}),
    );
    assert_eq!(lifted.status, 200, "{}", lifted.body);
    let body = lifted.json();
    assert_eq!(body["permanent_block_lifted"], true);
    assert_eq!(body["lockouts_after"], 1);
    assert_eq!(
        send(&admin.server.address, "alice@example.org", &clean()),
        250
    );
    let events = admin.server.events_of("block_lifted");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["reason"], "laptop reinstalled, ticket 4711");
    assert_eq!(events[0]["by"], "support");

    // The count stayed, so the next trigger blocks permanently again.
    send_spam(&admin, "alice@example.org", 2);
    assert_eq!(
        send(&admin.server.address, "alice@example.org", &clean()),
        550
    );
    let reset = admin.post(
        "/api/v1/mailboxes/alice@example.org/unblock",
        SUPPORT,
        json!({"reason": "second chance", "reset_count": true}),
    );
    assert_eq!(reset.status, 200, "{}", reset.body);
    assert_eq!(reset.json()["lockouts_before"], 2);
    assert_eq!(reset.json()["lockouts_after"], 0);
    let ledger = admin
        .get("/api/v1/mailboxes/alice@example.org", ADMIN)
        .json();
    assert_eq!(ledger["lockouts"], 0);
    assert_eq!(ledger["block"], Value::Null);
}

#[test]
fn timed_lockout_answers_conflict() {
    let admin = Admin::start("threshold = 2\nfirst_lockout = \"1h\"");
    send_spam(&admin, "bob@example.org", 2);
    let ledger = admin.get("/api/v1/mailboxes/bob@example.org", ADMIN).json();
    let until = ledger["block"]["until"]
        .as_str()
        .expect("timed lockout")
        .to_string();
    let conflict = admin.post(
        "/api/v1/mailboxes/bob@example.org/unblock",
        SUPPORT,
        json!({"reason": "please", "reset_count": true}),
    );
    assert_eq!(conflict.status, 409, "{}", conflict.body);
    let body = conflict.json();
    assert_eq!(body["until"], until.as_str());
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|text| text.contains(&until))
    );
    assert_eq!(
        send(&admin.server.address, "bob@example.org", &clean()),
        550
    );

    let nothing = admin.post(
        "/api/v1/mailboxes/nobody@example.org/unblock",
        SUPPORT,
        json!({"reason": "check"}),
    );
    assert_eq!(nothing.status, 409, "{}", nothing.body);
    let no_reset = admin.post(
        "/api/v1/mailboxes/nobody@example.org/unblock",
        SUPPORT,
        json!({"reason": "check", "reset_count": true}),
    );
    assert_eq!(no_reset.status, 409, "{}", no_reset.body);
    assert!(admin.server.events_of("lockout_count_reset").is_empty());
}

#[test]
fn ledger_matches_strikes() {
    let admin = Admin::start("threshold = 5");
    send_spam(&admin, "alice@example.org", 3);
    let ledger = admin.get("/api/v1/mailboxes/alice@example.org", ADMIN);
    assert_eq!(ledger.status, 200, "{}", ledger.body);
    let ledger = ledger.json();
    let strikes = ledger["strikes"].as_array().expect("strikes");
    assert_eq!(strikes.len(), 3);
    let bad = admin.server.events_of("bad_message");
    for (index, strike) in strikes.iter().enumerate() {
        assert_eq!(strike["transaction"], bad[index]["transaction"]);
        assert_eq!(strike["message_id"], format!("<s{index}@example.org>"));
        assert!(
            strike["verdict"]
                .as_str()
                .is_some_and(|text| text.contains("GTUBE"))
        );
    }
    assert_eq!(ledger["threshold"], 5);
    assert_eq!(ledger["lockouts"], 0);
    assert_eq!(ledger["block"], Value::Null);
    assert_eq!(ledger["next_lockout"]["level"], 1);
    assert_eq!(ledger["next_lockout"]["length"], "1h");
    assert_eq!(ledger["owner"]["name"], "Alice Smith");
    assert_eq!(ledger["devices"][0]["id"], "dev-17");

    let invalid = admin.get("/api/v1/mailboxes/%40", ADMIN);
    assert_eq!(invalid.status, 400, "{}", invalid.body);
}

#[test]
fn exemption_stops_lockouts_until_expiry() {
    let admin = Admin::start("threshold = 2\nfirst_lockout = \"1h\"");
    // A mailbox locked out before its exemption stays locked out.
    send_spam(&admin, "carol@example.org", 2);
    let added = admin.post(
        "/api/v1/exemptions",
        ADMIN,
        json!({"sender": "carol@example.org", "reason": "test", "author": "ops", "for": "1h"}),
    );
    assert_eq!(added.status, 201, "{}", added.body);
    assert_eq!(
        send(&admin.server.address, "carol@example.org", &clean()),
        550
    );

    let invalid = admin.post(
        "/api/v1/exemptions",
        ADMIN,
        json!({"sender": "dan@example.org", "reason": "no end", "author": "ops"}),
    );
    assert_eq!(invalid.status, 400, "{}", invalid.body);
    assert!(
        invalid.json()["error"]
            .as_str()
            .is_some_and(|text| text.contains("for"))
    );

    let added = admin.post(
        "/api/v1/exemptions",
        ADMIN,
        json!({"sender": "Dan@Example.org", "reason": "newsletter import", "author": "jdoe", "for": "4s"}),
    );
    assert_eq!(added.status, 201, "{}", added.body);
    let exemption = added.json();
    assert_eq!(exemption["value"], "dan@example.org");
    let id = exemption["id"].as_i64().expect("id");

    // Bad mail is still rejected, but starts no lockout.
    send_spam(&admin, "dan@example.org", 3);
    assert_eq!(
        send(&admin.server.address, "dan@example.org", &clean()),
        250
    );
    let bad: Vec<Value> = admin
        .server
        .events_of("bad_message")
        .into_iter()
        .filter(|event| event["mailbox"] == "dan@example.org")
        .collect();
    assert_eq!(bad.len(), 3);
    for event in &bad {
        assert_eq!(event["counted"], false);
        assert_eq!(event["exemption_id"], id);
    }
    let ledger = admin.get("/api/v1/mailboxes/dan@example.org", ADMIN).json();
    assert_eq!(ledger["exemptions"][0]["id"], id);

    admin.server.wait_for_events(WAIT, |events| {
        events
            .iter()
            .any(|event| event["type"] == "exemption_expired")
    });
    send_spam(&admin, "dan@example.org", 2);
    assert_eq!(
        send(&admin.server.address, "dan@example.org", &clean()),
        550
    );
    let listed = admin.get("/api/v1/exemptions?all=true", ADMIN).json();
    let dan = listed["exemptions"]
        .as_array()
        .expect("list")
        .iter()
        .find(|item| item["id"] == id)
        .expect("listed")
        .clone();
    assert_eq!(dan["in_force"], false);
    assert_eq!(admin.server.events_of("exemption_added").len(), 2);
}

#[test]
fn exemption_removal_recorded() {
    let admin = Admin::start("threshold = 2");
    let added = admin.post(
        "/api/v1/exemptions",
        ADMIN,
        json!({"network": "127.0.0.0/8", "reason": "lab", "author": "ops", "for": "1d"}),
    );
    assert_eq!(added.status, 201, "{}", added.body);
    let id = added.json()["id"].as_i64().expect("id");
    let removed = request(
        &admin.api,
        "DELETE",
        &format!("/api/v1/exemptions/{id}?by=jdoe"),
        Some(ADMIN),
        None,
    );
    assert_eq!(removed.status, 200, "{}", removed.body);
    let again = request(
        &admin.api,
        "DELETE",
        &format!("/api/v1/exemptions/{id}"),
        Some(ADMIN),
        None,
    );
    assert_eq!(again.status, 404, "{}", again.body);
    let events = admin.server.events_of("exemption_removed");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["by"], "jdoe");
    assert_eq!(
        admin.get("/api/v1/exemptions", ADMIN).json()["exemptions"],
        json!([])
    );
}

#[test]
fn event_filters_and_pages() {
    let admin = Admin::start("threshold = 3");
    send_spam(&admin, "alice@example.org", 3);
    send_spam(&admin, "erin@example.org", 2);

    let all = admin.get("/api/v1/events", ADMIN);
    assert_eq!(all.status, 200);
    assert_eq!(all.header("content-type"), Some("application/x-ndjson"));
    let lines: Vec<Value> = all
        .body
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON line"))
        .collect();
    let bad = lines
        .iter()
        .filter(|event| event["type"] == "bad_message")
        .count();
    assert_eq!(bad, 5);

    let typed = admin.get("/api/v1/events?type=lockout_started", ADMIN);
    assert_eq!(typed.body.lines().count(), 1, "{}", typed.body);
    assert!(typed.body.contains("alice@example.org"));

    let erin = admin.get(
        "/api/v1/events?mailbox=ERIN%40example.org&type=bad_message",
        ADMIN,
    );
    assert_eq!(erin.body.lines().count(), 2, "{}", erin.body);

    let device = admin.get("/api/v1/events?device=dev-17", ADMIN);
    let device_events: Vec<Value> = device
        .body
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON line"))
        .collect();
    assert_eq!(device_events.len(), 4, "{}", device.body);
    assert!(
        device_events
            .iter()
            .all(|event| event["mailbox"] == "alice@example.org")
    );

    let future = admin.get("/api/v1/events?since=2999-01-01T00:00:00Z", ADMIN);
    assert_eq!(future.body, "");
    let past = admin.get("/api/v1/events?until=2000-01-01T00:00:00Z", ADMIN);
    assert_eq!(past.body, "");

    let csv = admin.get("/api/v1/events?format=csv&type=bad_message", ADMIN);
    assert_eq!(csv.header("content-type"), Some("text/csv; charset=utf-8"));
    let rows: Vec<&str> = csv.body.lines().collect();
    assert!(
        rows[0].starts_with("time,type,mailbox,key_client,client,sender"),
        "{}",
        rows[0]
    );
    assert_eq!(rows.len(), 6);
    assert!(
        rows[1].contains(",bad_message,alice@example.org,"),
        "{}",
        rows[1]
    );

    // Pages of two, followed through the Link header, give every event once.
    let mut seen = Vec::new();
    let mut path = "/api/v1/events?limit=2".to_string();
    for _ in 0..20 {
        let page = admin.get(&path, ADMIN);
        assert_eq!(page.status, 200, "{}", page.body);
        for line in page.body.lines() {
            let event: Value = serde_json::from_str(line).expect("JSON line");
            seen.push(event["id"].as_i64().expect("id"));
        }
        match page.header("link") {
            Some(link) => {
                path = link
                    .trim_start_matches('<')
                    .split_once('>')
                    .expect("link target")
                    .0
                    .to_string();
            }
            None => break,
        }
    }
    let expected: Vec<i64> = lines
        .iter()
        .map(|event| event["id"].as_i64().expect("id"))
        .collect();
    assert_eq!(seen, expected);

    for bad_query in [
        "type=nonsense",
        "since=yesterday",
        "format=xml",
        "limit=0",
        "colour=red",
    ] {
        let response = admin.get(&format!("/api/v1/events?{bad_query}"), ADMIN);
        assert_eq!(response.status, 400, "{bad_query}: {}", response.body);
    }
}

/// Checks every line of a Prometheus text exposition and returns the
/// samples by name with labels.
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let sample = regex::Regex::new(
        r#"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*\})?) ([-+]?(?:[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|NaN|Inf))$"#,
    )
    .expect("regex");
    let type_line = regex::Regex::new(
        r"^# TYPE [a-zA-Z_:][a-zA-Z0-9_:]* (counter|gauge|histogram|summary|untyped)$",
    )
    .expect("regex");
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.starts_with("# HELP ") {
            continue;
        }
        if line.starts_with("# TYPE ") {
            assert!(type_line.is_match(line), "invalid TYPE line {line:?}");
            continue;
        }
        let captures = sample
            .captures(line)
            .unwrap_or_else(|| panic!("invalid sample line {line:?}"));
        let value = captures[2].parse().expect("number");
        samples.push((captures[1].to_string(), value));
    }
    samples
}

fn sample(samples: &[(String, f64)], name: &str) -> f64 {
    samples
        .iter()
        .find(|(sample, _)| sample == name)
        .map(|(_, value)| *value)
        .unwrap_or_else(|| panic!("no sample {name} in {samples:#?}"))
}

#[test]
fn metrics_count_traffic() {
    let admin = Admin::start("threshold = 3");
    for _ in 0..2 {
        assert_eq!(
            send(&admin.server.address, "frank@example.org", &clean()),
            250
        );
    }
    send_spam(&admin, "frank@example.org", 3);
    assert_eq!(
        send(&admin.server.address, "frank@example.org", &clean()),
        550
    );

    let response = admin.get("/metrics", ADMIN);
    assert_eq!(response.status, 200);
    assert!(
        response
            .header("content-type")
            .is_some_and(|value| value.starts_with("text/plain; version=0.0.4"))
    );
    let samples = parse_prometheus(&response.body);
    assert_eq!(
        sample(&samples, "sendguard_messages_total{verdict=\"clean\"}"),
        2.0
    );
    assert_eq!(
        sample(&samples, "sendguard_messages_total{verdict=\"spam\"}"),
        3.0
    );
    assert_eq!(sample(&samples, "sendguard_strikes_total"), 3.0);
    assert_eq!(
        sample(
            &samples,
            "sendguard_lockouts_total{kind=\"timed\",mode=\"enforce\"}"
        ),
        1.0
    );
    assert_eq!(sample(&samples, "sendguard_sender_refusals_total"), 1.0);
    assert_eq!(
        sample(&samples, "sendguard_active_blocks{kind=\"timed\"}"),
        1.0
    );
    assert_eq!(
        sample(&samples, "sendguard_active_blocks{kind=\"permanent\"}"),
        0.0
    );
    assert_eq!(
        sample(&samples, "sendguard_scan_duration_seconds_count"),
        5.0
    );
    assert_eq!(
        sample(
            &samples,
            "sendguard_scan_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        5.0
    );
}

#[test]
fn forgive_after_restarts_schedule() {
    let mut admin = Admin::start("threshold = 2\nfirst_lockout = \"1s\"\nforgive_after = \"2s\"");
    send_spam(&admin, "gina@example.org", 2);
    admin.server.wait_for_events(WAIT, |events| {
        events.iter().any(|event| event["type"] == "lockout_ended")
    });
    // Wait out the quiet period: the lockout ended about now, and two
    // seconds without a lockout forgive the count.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    // The sweep at start forgives the quiet mailbox before it sends again.
    admin.server.restart();
    let ledger = admin
        .get("/api/v1/mailboxes/gina@example.org", ADMIN)
        .json();
    assert_eq!(ledger["lockouts"], 0, "{ledger}");
    assert_eq!(admin.server.events_of("lockouts_forgiven").len(), 1);
    send_spam(&admin, "gina@example.org", 2);
    let started = admin.server.events_of("lockout_started");
    let levels: Vec<&Value> = started.iter().map(|event| &event["level"]).collect();
    assert_eq!(levels, [&json!(1), &json!(1)]);
    let forgiven = admin.server.events_of("lockouts_forgiven");
    assert_eq!(forgiven.len(), 1);
    assert_eq!(forgiven[0]["lockouts_before"], 1);
    assert_eq!(forgiven[0]["forgive_after"], "2s");
}

#[test]
fn cli_unblock_needs_support_token() {
    let admin = Admin::start("threshold = 2\ntimed_lockouts = 0");
    send_spam(&admin, "hugo@example.org", 2);
    let admin_token = admin.file("admin.token");
    let refused = admin.server.cli(&[
        "unblock",
        "hugo@example.org",
        "--reason",
        "try with the wrong token",
        "--support-token-file",
        &admin_token,
    ]);
    assert_eq!(refused.status.code(), Some(2));
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("not the support token"), "{message}");
    assert_eq!(
        send(&admin.server.address, "hugo@example.org", &clean()),
        550
    );

    let support_token = admin.file("support.token");
    let lifted = admin.server.cli(&[
        "unblock",
        "hugo@example.org",
        "--reason",
        "verified by phone",
        "--support-token-file",
        &support_token,
    ]);
    assert!(
        lifted.status.success(),
        "{}",
        String::from_utf8_lossy(&lifted.stderr)
    );
    assert!(String::from_utf8_lossy(&lifted.stdout).contains("permanent block lifted"));
    // The running server drops its cached state within a few seconds.
    let deadline = Instant::now() + WAIT;
    while send(&admin.server.address, "hugo@example.org", &clean()) != 250 {
        assert!(
            Instant::now() < deadline,
            "the lift never reached the server"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let events = admin.server.events_of("block_lifted");
    assert_eq!(events[0]["via"], "command line");
}

#[test]
fn cli_uses_running_server() {
    let admin = Admin::start("threshold = 2\nfirst_lockout = \"1h\"");
    send_spam(&admin, "ivan@example.org", 2);
    let url = format!("http://{}", admin.api);
    let blocks = admin.server.cli(&["blocks", "--server", &url]);
    assert!(
        blocks.status.success(),
        "{}",
        String::from_utf8_lossy(&blocks.stderr)
    );
    assert!(String::from_utf8_lossy(&blocks.stdout).contains("ivan@example.org"));

    let added = admin.server.cli(&[
        "exemptions",
        "add",
        "--sender",
        "jane@example.org",
        "--reason",
        "bulk mailing",
        "--author",
        "ops",
        "--for",
        "1d",
        "--server",
        &url,
    ]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let listed = admin.get("/api/v1/exemptions", ADMIN).json();
    assert_eq!(listed["exemptions"][0]["value"], "jane@example.org");

    let status = admin.server.cli(&[
        "status",
        "ivan@example.org",
        "--server",
        &url,
        "--format",
        "json",
    ]);
    let ledger: Value = serde_json::from_slice(&status.stdout).expect("ledger JSON");
    assert_eq!(ledger["lockouts"], 1);

    let conflict = admin.server.cli(&[
        "unblock",
        "ivan@example.org",
        "--reason",
        "please",
        "--support-token-file",
        &admin.file("support.token"),
        "--server",
        &url,
    ]);
    assert_eq!(conflict.status.code(), Some(2));
    let message = String::from_utf8_lossy(&conflict.stderr);
    assert!(
        message.contains("409") && message.contains("cannot be lifted"),
        "{message}"
    );

    let events = admin.server.cli(&[
        "events",
        "--server",
        &url,
        "--type",
        "lockout_started",
        "--format",
        "json",
    ]);
    assert_eq!(String::from_utf8_lossy(&events.stdout).lines().count(), 1);
}

#[test]
fn old_events_pruned() {
    let mut admin = Admin::start("threshold = 5");
    send_spam(&admin, "kim@example.org", 2);
    assert_eq!(admin.server.events_of("bad_message").len(), 2);
    std::thread::sleep(Duration::from_millis(1500));
    admin
        .server
        .rewrite_config(|text| format!("{text}\n[events]\nkeep = \"1s\"\n"));
    admin.server.restart();
    admin.server.wait_for_events(WAIT, |events| {
        events.iter().all(|event| event["type"] != "bad_message")
    });
    let ledger = admin.get("/api/v1/mailboxes/kim@example.org", ADMIN).json();
    assert_eq!(
        ledger["strikes"].as_array().map(Vec::len),
        Some(2),
        "pruning events keeps the strikes"
    );
}

#[test]
fn malformed_requests_get_json_errors() {
    let admin = Admin::start("threshold = 5");
    let cases: [(&str, &str, Option<Value>, u16); 6] = [
        (
            "POST",
            "/api/v1/mailboxes/alice@example.org/unblock",
            None,
            415,
        ),
        (
            "POST",
            "/api/v1/mailboxes/alice@example.org/unblock",
            Some(json!({"reason": "x", "resetCount": true})),
            422,
        ),
        ("GET", "/api/v1/exemptions?all=yes", None, 400),
        ("GET", "/api/v1/mailboxes/alice@@example.org", None, 400),
        ("DELETE", "/api/v1/exemptions", None, 405),
        ("GET", "/api/v1/events?since=1h&until=2h", None, 400),
    ];
    for (method, path, body, status) in cases {
        let token = if method == "POST" { SUPPORT } else { ADMIN };
        let response = request(&admin.api, method, path, Some(token), body.as_ref());
        assert_eq!(
            response.status, status,
            "{method} {path}: {}",
            response.body
        );
        assert!(
            response.json()["error"]
                .as_str()
                .is_some_and(|text| !text.is_empty()),
            "{method} {path}: {}",
            response.body
        );
    }
    let unauthenticated = request(&admin.api, "DELETE", "/api/v1/exemptions", None, None);
    assert_eq!(unauthenticated.status, 401);
    // The support token is hashed in the config; a login maps to its mailbox.
    let login = admin.get("/api/v1/mailboxes/alice", ADMIN);
    assert_eq!(login.status, 400, "alice is not a login in this directory");
}

#[test]
fn exemptions_bounded() {
    let admin = Admin::start("threshold = 5");
    for (body, fragment) in [
        (
            json!({"sender": "a@example.org", "reason": "r", "author": "a", "for": "99999999999999d"}),
            "at most",
        ),
        (
            json!({"sender": "a@example.org", "reason": "r", "author": "a", "expires": "9999-12-31T23:59:59Z"}),
            "at most",
        ),
        (
            json!({"network": "0.0.0.0/0", "reason": "r", "author": "a", "for": "1d"}),
            "wider than /8",
        ),
        (
            json!({"sender": "a@example.org", "reason": "x".repeat(501), "author": "a", "for": "1d"}),
            "keep it to 500",
        ),
    ] {
        let response = admin.post("/api/v1/exemptions", ADMIN, body);
        assert_eq!(response.status, 400, "{}", response.body);
        let message = response.json()["error"].as_str().unwrap_or("").to_string();
        assert!(message.contains(fragment), "{message}");
    }
}

#[test]
fn cli_changes_reach_server_each_time() {
    let admin = Admin::start("threshold = 2\nfirst_lockout = \"1h\"");
    for sender in ["one@example.org", "two@example.org", "three@example.org"] {
        let added = admin.server.cli(&[
            "exemptions",
            "add",
            "--sender",
            sender,
            "--reason",
            "import",
            "--author",
            "ops",
            "--for",
            "1h",
        ]);
        assert!(
            added.status.success(),
            "{}",
            String::from_utf8_lossy(&added.stderr)
        );
        let deadline = Instant::now() + WAIT;
        loop {
            let ledger = admin
                .get(&format!("/api/v1/mailboxes/{sender}"), ADMIN)
                .json();
            if ledger["exemptions"]
                .as_array()
                .is_some_and(|list| !list.is_empty())
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{sender}'s exemption never reached the server"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // Exempt senders are rejected but never locked out.
    send_spam(&admin, "three@example.org", 3);
    assert_eq!(
        send(&admin.server.address, "three@example.org", &clean()),
        250
    );
}

#[test]
fn support_token_must_differ() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let files = tempfile::tempdir().expect("temporary directory");
    let token_file = files.path().join("admin.token");
    std::fs::write(&token_file, format!("{ADMIN}\n")).expect("write token");
    let same = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(ADMIN.as_bytes()));
    let config = files.path().join("sendguard.toml");
    std::fs::write(
        &config,
        format!(
            "[upstream]\naddress = \"{}\"\n[store]\npath = \"{}\"\n\
             [admin]\nlisten = \"127.0.0.1:{}\"\ntoken_file = \"{}\"\nsupport_token_sha256 = \"{same}\"\n",
            upstream.address(),
            files.path().join("store.db").display(),
            common::free_port(),
            token_file.display()
        ),
    )
    .expect("write config");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sendguard"))
        .args(["config", "check"])
        .arg(&config)
        .output()
        .expect("run config check");
    assert_eq!(output.status.code(), Some(2));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("hash of the admin token"), "{message}");
}
