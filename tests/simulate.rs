//! Policy simulation end to end: real traffic through the relay (GTUBE spam,
//! which the built-in rules always catch, from several mailboxes and client
//! addresses) on a compressed time scale, then `sendguard simulate` and
//! `POST /api/v1/simulate` on what the server recorded.

mod common;

use common::http::request;
use common::redis::RedisServer;
use common::sendguard::Sendguard;
use common::smtp_client::{SmtpClient, data_payload};
use common::upstream::{Upstream, UpstreamOptions};
use serde_json::{Value, json};
use std::process::Output;
use std::time::Duration;

const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";
const ADMIN: &str = "admin-token-for-simulate-tests-0123";

/// Three bad messages inside six seconds start a lockout of three seconds,
/// doubling with each lockout.
const POLICY: &str = "[policy]\nthreshold = 3\nwindow = \"6s\"\nfirst_lockout = \"3s\"\n";

fn spam(index: usize) -> Vec<u8> {
    format!("Subject: offer {index}\r\nMessage-ID: <s{index}@example.org>\r\n\r\n{GTUBE}\r\n")
        .into_bytes()
}

fn clean() -> Vec<u8> {
    b"Subject: lunch\r\n\r\nSee you at noon.\r\n".to_vec()
}

/// Sends one message from `from` out of the loopback address `client`;
/// returns the MAIL FROM reply code when it is refused, else the final
/// one.
fn send(server: &Sendguard, from: &str, client: &str, content: &[u8]) -> u16 {
    let mut smtp = SmtpClient::connect_from(&server.address, client);
    smtp.cmd("EHLO client.test", 250);
    let reply = smtp.command(&format!("MAIL FROM:<{from}>"));
    if reply.code != 250 {
        smtp.quit();
        return reply.code;
    }
    smtp.cmd("RCPT TO:<bob@example.net>", 250);
    smtp.cmd("DATA", 354);
    smtp.send_raw(&data_payload(content));
    let code = smtp.read_reply().code;
    smtp.quit();
    code
}

fn send_spam(server: &Sendguard, from: &str, client: &str, index: usize) {
    assert_eq!(
        send(server, from, client, &spam(index)),
        550,
        "spam {index} from {from}"
    );
}

/// A running relay with its admin API and the admin token's file.
struct Relay {
    server: Sendguard,
    api: String,
    _files: tempfile::TempDir,
}

/// Starts a server with the compressed policy, an admin API and `store`
/// lines added to [store].
fn start(upstream: &Upstream, store: &str) -> Relay {
    let files = tempfile::tempdir().expect("temporary directory");
    let token_file = files.path().join("admin.token");
    std::fs::write(&token_file, format!("{ADMIN}\n")).expect("write admin token");
    let api = format!("127.0.0.1:{}", common::free_port());
    let config = format!(
        "{store}\n[admin]\nlisten = \"{api}\"\ntoken_file = \"{}\"\n{POLICY}",
        token_file.display()
    );
    let server = Sendguard::start(&upstream.address(), &config);
    // The harness moves a listener whose port was taken meanwhile.
    let api = server.listen_address("admin");
    Relay {
        server,
        api,
        _files: files,
    }
}

/// Runs `sendguard simulate` with `candidate` as the policy file.
fn simulate_cli(server: &Sendguard, candidate: &str, extra: &[&str]) -> Output {
    let path = server.dir.path().join("candidate.toml");
    std::fs::write(&path, candidate).expect("write candidate");
    let path = path.display().to_string();
    let mut args = vec!["simulate", "--policy", &path];
    args.extend_from_slice(extra);
    server.cli(&args)
}

/// Runs `sendguard simulate --format json` and returns the report.
fn simulate(server: &Sendguard, candidate: &str) -> Value {
    let output = simulate_cli(server, candidate, &["--since", "10m", "--format", "json"]);
    assert!(
        output.status.success(),
        "simulate failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("one JSON report")
}

/// Sends `POST /api/v1/simulate` with the admin token.
fn post_simulate(api: &str, body: Value) -> common::http::Response {
    request(api, "POST", "/api/v1/simulate", Some(ADMIN), Some(&body))
}

/// Returns the report's entry for `mailbox` (and the pair key's `client`).
fn entry<'r>(report: &'r Value, mailbox: &str, client: Option<&str>) -> Option<&'r Value> {
    report["mailboxes"]
        .as_array()?
        .iter()
        .find(|entry| entry["mailbox"] == mailbox && entry["client"].as_str() == client)
}

/// Returns (level, started) of each lockout on one side of an entry.
fn starts(entry: Option<&Value>, side: &str) -> Vec<(u64, String)> {
    entry
        .and_then(|entry| entry[side].as_array())
        .map(|rows| {
            rows.iter()
                .map(|row| {
                    (
                        row["level"].as_u64().expect("level"),
                        row["started"].as_str().expect("started").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Returns the times of the bad messages recorded for `mailbox`.
fn bad_message_times(server: &Sendguard, mailbox: &str) -> Vec<String> {
    server
        .events_of("bad_message")
        .into_iter()
        .filter(|event| event["mailbox"] == mailbox)
        .map(|event| event["time"].as_str().expect("time").to_string())
        .collect()
}

/// Records the traffic every SQLite case below replays:
/// - ann: three spam (lockout 1), a refused clean message, three more spam
///   after the lockout (lockout 2);
/// - bob: two spam, below the threshold;
/// - cal: three spam 1.5 s apart, inside the 6 s window (a lockout);
/// - ceo@example.org: one spam from its owner at 127.0.0.2, then two from a
///   forger at 127.0.0.3 (a lockout of the mailbox);
/// - dee: three spam under an exemption added through the API (no lockout).
fn record_traffic(server: &Sendguard, api: &str) {
    let exemption = request(
        api,
        "POST",
        "/api/v1/exemptions",
        Some(ADMIN),
        Some(
            &json!({"sender": "dee@example.org", "reason": "newsletter test", "author": "ops", "for": "1h"}),
        ),
    );
    assert_eq!(exemption.status, 201, "{}", exemption.body);

    for index in 0..3 {
        send_spam(server, "ann@example.org", "127.0.0.1", index);
    }
    assert_eq!(send(server, "ann@example.org", "127.0.0.1", &clean()), 550);
    send_spam(server, "bob@example.org", "127.0.0.1", 10);
    send_spam(server, "ceo@example.org", "127.0.0.2", 20);
    send_spam(server, "ceo@example.org", "127.0.0.3", 21);
    send_spam(server, "ceo@example.org", "127.0.0.3", 22);
    for index in 0..3 {
        send_spam(server, "dee@example.org", "127.0.0.1", 30 + index);
    }
    send_spam(server, "cal@example.org", "127.0.0.1", 40);
    std::thread::sleep(Duration::from_millis(1500));
    send_spam(server, "bob@example.org", "127.0.0.1", 11);
    send_spam(server, "cal@example.org", "127.0.0.1", 41);
    std::thread::sleep(Duration::from_millis(1500));
    send_spam(server, "cal@example.org", "127.0.0.1", 42);
    // Ann's first lockout (3 s) has ended by now.
    std::thread::sleep(Duration::from_millis(1000));
    for index in 3..6 {
        send_spam(server, "ann@example.org", "127.0.0.1", index);
    }
}

#[test]
fn simulation_on_recorded_traffic() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let relay = start(&upstream, "");
    let (server, api) = (&relay.server, relay.api.as_str());
    record_traffic(server, api);

    // The recorded history: ann twice, cal and ceo once, no other mailbox.
    let started = server.events_of("lockout_started");
    let locked: Vec<(&str, u64)> = started
        .iter()
        .map(|event| {
            (
                event["mailbox"].as_str().expect("mailbox"),
                event["level"].as_u64().expect("level"),
            )
        })
        .collect();
    assert_eq!(locked.len(), 4, "{started:#?}");

    // The policy in force reproduces every recorded lockout exactly.
    let same = simulate(server, "");
    for mailbox in ["ann@example.org", "cal@example.org", "ceo@example.org"] {
        let found = entry(&same, mailbox, None);
        assert!(
            !starts(found, "real").is_empty(),
            "{mailbox} was locked out: {same:#}"
        );
        assert_eq!(
            found.map(|e| &e["real"]),
            found.map(|e| &e["simulated"]),
            "{mailbox}: {same:#}"
        );
    }
    assert_eq!(
        starts(entry(&same, "ann@example.org", None), "real").len(),
        2
    );
    assert!(
        entry(&same, "dee@example.org", None).is_none(),
        "the exemption holds: {same:#}"
    );
    assert_eq!(same["real"]["lockouts"], 4);
    assert_eq!(same["simulated"]["lockouts"], 4);
    assert_eq!(same["simulated"]["exempt_strikes"], 3);
    assert_eq!(
        same["real"]["seconds_blocked"],
        same["simulated"]["seconds_blocked"]
    );
    assert_eq!(
        same["real"]["hours_blocked"],
        same["simulated"]["hours_blocked"]
    );
    assert_eq!(same["limits"]["unknown_verdicts"], 0, "{same:#}");
    assert_eq!(same["limits"]["refused_messages"], 1);

    // A lower threshold locks bob out at his second bad message.
    let lower = simulate(server, "[policy]\nthreshold = 2\n");
    let bob = entry(&lower, "bob@example.org", None);
    let bob_times = bad_message_times(server, "bob@example.org");
    assert_eq!(starts(bob, "real"), []);
    assert_eq!(
        starts(bob, "simulated"),
        [(1, bob_times[1].clone())],
        "{lower:#}"
    );
    let bob_until = bob.expect("bob")["simulated"][0]["until"]
        .as_str()
        .expect("until");
    assert!(bob_until > bob_times[1].as_str(), "{bob_until}");
    // Under threshold 2 ann is locked at her second message, and her third
    // was scanned only because the real lockout came later.
    let ann_times = bad_message_times(server, "ann@example.org");
    let ann = starts(entry(&lower, "ann@example.org", None), "simulated");
    assert_eq!(ann[0], (1, ann_times[1].clone()), "{lower:#}");
    let real_total = lower["real"]["lockouts"].as_u64().expect("count");
    let simulated_total = lower["simulated"]["lockouts"].as_u64().expect("count");
    assert!(simulated_total > real_total, "{lower:#}");

    // A shorter window: cal's messages 1.5 s apart never reach three in 2 s.
    let shorter = simulate(server, "[policy]\nwindow = \"2s\"\n");
    let cal = entry(&shorter, "cal@example.org", None);
    assert_eq!(starts(cal, "real").len(), 1);
    assert_eq!(starts(cal, "simulated"), []);
    assert!(
        shorter["simulated"]["lockouts"].as_u64() < shorter["real"]["lockouts"].as_u64(),
        "{shorter:#}"
    );

    // client-and-sender splits ceo's strikes by client: the owner's one
    // strike no longer adds to the forger's two.
    let split = simulate(
        server,
        "[policy]\nthreshold = 2\n[identity]\nunauthenticated = \"client-and-sender\"\n",
    );
    let ceo_times = bad_message_times(server, "ceo@example.org");
    assert_eq!(
        starts(entry(&split, "ceo@example.org", None), "real").len(),
        1
    );
    assert_eq!(
        starts(entry(&split, "ceo@example.org", None), "simulated"),
        []
    );
    assert_eq!(
        starts(
            entry(&split, "ceo@example.org", Some("127.0.0.3")),
            "simulated"
        ),
        [(1, ceo_times[2].clone())],
        "{split:#}"
    );
    assert!(
        entry(&split, "ceo@example.org", Some("127.0.0.2")).is_none(),
        "{split:#}"
    );

    // An exemption in the candidate removes all of ann's lockouts.
    let exempt = simulate(server, "[exemptions]\nsenders = [\"Ann@Example.org\"]\n");
    let ann = entry(&exempt, "ann@example.org", None);
    assert_eq!(starts(ann, "real").len(), 2);
    assert_eq!(starts(ann, "simulated"), []);
    assert_eq!(
        exempt["simulated"]["exempt_strikes"], 9,
        "ann's six and dee's three"
    );

    // The API returns the same report.
    let response = post_simulate(
        api,
        json!({"policy": "[policy]\nthreshold = 2\n", "since": "10m"}),
    );
    assert_eq!(response.status, 200, "{}", response.body);
    let from_api = response.json();
    assert_eq!(from_api["mailboxes"], lower["mailboxes"]);
    assert_eq!(
        from_api["simulated"]["lockouts"],
        lower["simulated"]["lockouts"]
    );
    let as_json = post_simulate(
        api,
        json!({"policy": {"policy": {"window": "2s"}}, "since": "10m"}),
    );
    assert_eq!(as_json.status, 200, "{}", as_json.body);
    assert_eq!(as_json.json()["mailboxes"], shorter["mailboxes"]);

    // The table and CSV formats carry the same lockouts.
    let table = simulate_cli(server, "[policy]\nthreshold = 2\n", &["--since", "10m"]);
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(table.contains("bob@example.org"), "{table}");
    assert!(table.contains("Limits:"), "{table}");
    println!("{table}");
    let csv = simulate_cli(
        server,
        "[policy]\nthreshold = 2\n",
        &["--since", "10m", "--format", "csv"],
    );
    let csv = String::from_utf8_lossy(&csv.stdout).to_string();
    let rows = csv
        .lines()
        .filter(|line| line.contains(",simulated,"))
        .count() as u64;
    assert_eq!(rows, simulated_total, "{csv}");

    // After a reload to threshold 2, fay's two messages lock her out. The
    // policies recorded in force reproduce the whole history, while the
    // policy now in force alone does not.
    server.rewrite_config(|text| text.replace("threshold = 3", "threshold = 2"));
    server.reload();
    send_spam(server, "fay@example.org", "127.0.0.1", 50);
    send_spam(server, "fay@example.org", "127.0.0.1", 51);
    let output = server.cli(&[
        "simulate",
        "--recorded",
        "--since",
        "10m",
        "--format",
        "json",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let recorded: Value = serde_json::from_slice(&output.stdout).expect("one JSON report");
    let mailboxes = recorded["mailboxes"].as_array().expect("mailboxes");
    assert_eq!(mailboxes.len(), 4, "ann, cal, ceo, fay: {recorded:#}");
    for mailbox in mailboxes {
        assert_eq!(mailbox["real"], mailbox["simulated"], "{recorded:#}");
    }
    assert_eq!(
        recorded["recorded_policies"].as_array().map(Vec::len),
        Some(2)
    );
    let from_api = post_simulate(api, json!({"recorded": true, "since": "10m"}));
    assert_eq!(from_api.status, 200, "{}", from_api.body);
    assert_eq!(from_api.json()["mailboxes"], recorded["mailboxes"]);
    let now_in_force = simulate(server, "");
    assert!(
        entry(&now_in_force, "bob@example.org", None).is_some(),
        "{now_in_force:#}"
    );
}

#[test]
fn simulate_rejects_bad_input() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let relay = start(&upstream, "");
    let (server, api) = (&relay.server, relay.api.as_str());
    send_spam(server, "ann@example.org", "127.0.0.1", 1);

    let cases: [(&str, &[&str], &str); 6] = [
        ("[policy]\nthresold = 2\n", &[], "policy.thresold"),
        (
            "[exemptions]\nsenders = [\"not an address\"]\n",
            &[],
            "exemptions.senders",
        ),
        ("[policy]\nwindow = \"ten minutes\"\n", &[], "policy.window"),
        ("[policy]\nthreshold = 0\n", &[], "policy.threshold"),
        (
            "",
            &["--since", "yesterday"],
            "invalid --since \"yesterday\"",
        ),
        ("", &["--since", "2999-01-01T00:00:00Z"], "not in the past"),
    ];
    for (candidate, extra, expected) in cases {
        let output = simulate_cli(server, candidate, extra);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{candidate:?} {extra:?}: {stderr}"
        );
        assert!(
            stderr.contains(expected),
            "{candidate:?} {extra:?}: {stderr}"
        );
    }

    let response = post_simulate(api, json!({"policy": "[policy]\nthresold = 2\n"}));
    assert_eq!(response.status, 400);
    assert!(
        response.body.contains("policy.thresold"),
        "{}",
        response.body
    );
    let future = post_simulate(api, json!({"since": "2999-01-01T00:00:00Z"}));
    assert_eq!(future.status, 400);
    assert!(future.body.contains("not in the past"), "{}", future.body);
    let null = post_simulate(api, json!({"policy": {"policy": {"threshold": null}}}));
    assert_eq!(null.status, 400, "{}", null.body);
    assert!(
        null.body.contains("policy.threshold is null"),
        "{}",
        null.body
    );
    let both = post_simulate(
        api,
        json!({"recorded": true, "policy": "[policy]\nthreshold = 1\n"}),
    );
    assert_eq!(both.status, 400, "{}", both.body);
    assert!(both.body.contains("exclude each other"), "{}", both.body);
    let array = post_simulate(api, json!(["[policy]\nthreshold = 1\n", "10m"]));
    assert_eq!(array.status, 422, "{}", array.body);
    assert!(array.body.contains("not a JSON object"), "{}", array.body);
    let unknown = post_simulate(api, json!({"polcy": "[policy]\n"}));
    assert_eq!(unknown.status, 422, "{}", unknown.body);
    assert!(unknown.body.contains("polcy"), "{}", unknown.body);
    let anonymous = request(api, "POST", "/api/v1/simulate", None, Some(&json!({})));
    assert_eq!(anonymous.status, 401);
}

#[test]
fn simulation_on_redis_history() {
    let redis = RedisServer::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let store = format!(
        "backend = \"redis\"\nurl = \"{}\"\nkey_prefix = \"sim:\"\n",
        redis.url()
    );
    let relay = start(&upstream, &store);
    let server = &relay.server;
    common::redis::wait_until_subscribed(server);

    for index in 0..3 {
        send_spam(server, "ann@example.org", "127.0.0.1", index);
    }
    assert_eq!(send(server, "ann@example.org", "127.0.0.1", &clean()), 550);
    send_spam(server, "bob@example.org", "127.0.0.1", 10);
    send_spam(server, "bob@example.org", "127.0.0.1", 11);
    // Redis moves a mailbox's events to the stream after its write.
    server.wait_for_events(Duration::from_secs(10), |events| {
        let bob = events
            .iter()
            .filter(|event| event["type"] == "bad_message" && event["mailbox"] == "bob@example.org")
            .count();
        bob == 2
            && events
                .iter()
                .any(|event| event["type"] == "lockout_started")
    });

    let same = simulate(server, "");
    let ann = entry(&same, "ann@example.org", None);
    assert_eq!(starts(ann, "real").len(), 1, "{same:#}");
    assert_eq!(
        ann.map(|e| &e["real"]),
        ann.map(|e| &e["simulated"]),
        "{same:#}"
    );

    let notes = same["limits"]["notes"].to_string();
    assert!(notes.contains("lower bounds"), "{notes}");

    let lower = simulate(server, "[policy]\nthreshold = 2\n");
    let bob_times = bad_message_times(server, "bob@example.org");
    assert_eq!(
        starts(entry(&lower, "bob@example.org", None), "simulated"),
        [(1, bob_times[1].clone())],
        "{lower:#}"
    );
}
