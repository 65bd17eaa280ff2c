//! Lockouts end to end: the real binary, a real SMTP client and a recording
//! upstream. Bad messages here are GTUBE spam, which the built-in rules
//! always catch, so these tests need no clamd.

mod common;

use common::sendguard::Sendguard;
use common::smtp_client::{SmtpClient, send_from};
use common::upstream::{Upstream, UpstreamOptions};
use sendguard::policy::Timestamp;
use std::time::{Duration, Instant};

const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

fn clean_message() -> Vec<u8> {
    b"From: sender@example.org\r\nTo: bob@example.net\r\nSubject: hello\r\n\r\nSee you at lunch.\r\n".to_vec()
}

fn spam_message() -> Vec<u8> {
    format!("From: sender@example.org\r\nTo: bob@example.net\r\nSubject: offer\r\n\r\n{GTUBE}\r\n")
        .into_bytes()
}

fn send_spam(address: &str, from: &str) -> (u16, String) {
    send_from(address, from, &spam_message())
}

/// Returns a [policy] section with a ten-minute window, a two-second first lockout
/// unless `extra` sets one, and `extra`.
fn policy(extra: &str) -> String {
    let first_lockout = if extra.contains("first_lockout") {
        ""
    } else {
        "first_lockout = \"2s\"\n"
    };
    format!("[policy]\nwindow = \"10m\"\n{first_lockout}{extra}\n")
}

#[test]
fn fifth_bad_message_starts_lockout() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), &policy(""));

    for attempt in 1..=4 {
        let (code, _) = send_spam(&server.address, "alice@example.org");
        assert_eq!(code, 550, "spam {attempt} is rejected");
        let (code, _) = send_from(&server.address, "alice@example.org", &clean_message());
        assert_eq!(code, 250, "clean mail still flows after strike {attempt}");
    }
    let (code, text) = send_spam(&server.address, "alice@example.org");
    assert_eq!(code, 550);
    assert!(text.contains("spam"), "{text}");

    // The next MAIL FROM is refused with the lockout number and end time.
    let (code, text) = send_from(&server.address, "alice@example.org", &clean_message());
    assert_eq!(code, 550, "{text}");
    assert!(text.contains("5.7.1"), "{text}");
    assert!(text.contains("lockout 1"), "{text}");
    assert!(text.contains("until 20"), "{text}");

    // Another mailbox is unaffected.
    let (code, _) = send_from(&server.address, "carol@example.org", &clean_message());
    assert_eq!(code, 250);

    let started = server.events_of("lockout_started");
    assert_eq!(started.len(), 1, "{started:#?}");
    assert_eq!(started[0]["mailbox"], "alice@example.org");
    assert_eq!(started[0]["level"], 1);
    assert_eq!(started[0]["strikes"].as_array().map(Vec::len), Some(5));
    // Refusals are aggregated per mailbox and minute; four more within a
    // second land in one or (across a minute boundary) two events.
    for _ in 0..4 {
        assert_eq!(
            send_from(&server.address, "alice@example.org", &clean_message()).0,
            550
        );
    }
    let refused = server.events_of("sender_refused");
    assert!((1..=2).contains(&refused.len()), "{refused:#?}");
    let total: i64 = refused
        .iter()
        .map(|event| event["count"].as_i64().expect("count"))
        .sum();
    assert_eq!(total, 5);
    assert_eq!(refused[0]["client"], "127.0.0.1");
}

#[test]
fn nothing_counted_during_block() {
    // In monitor mode the sender keeps sending during its lockout, so the
    // bad messages it sends then reach the policy and must not count.
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(
        &upstream.address(),
        &policy("threshold = 2\nfirst_lockout = \"30s\"\nmode = \"monitor\""),
    );
    send_spam(&server.address, "dave@example.org");
    send_spam(&server.address, "dave@example.org");
    for _ in 0..4 {
        assert_eq!(send_spam(&server.address, "dave@example.org").0, 550);
    }

    let output = server.cli(&["status", "dave@example.org"]);
    let status = String::from_utf8_lossy(&output.stdout);
    assert!(status.contains("lockouts so far:   1"), "{status}");
    assert!(status.contains("strikes in window: 0"), "{status}");
    let bad = server.events_of("bad_message");
    assert_eq!(bad.len(), 6);
    let uncounted = bad.iter().filter(|event| event["counted"] == false).count();
    assert_eq!(uncounted, 4, "{bad:#?}");
    assert_eq!(server.events_of("lockout_started").len(), 1);
}

#[test]
fn lockout_refuses_open_transaction_at_end_of_data() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(
        &upstream.address(),
        &policy("threshold = 2\nfirst_lockout = \"30s\""),
    );
    send_spam(&server.address, "erin@example.org");

    // This session passes MAIL FROM while erin is not yet locked out.
    let mut open = SmtpClient::connect(&server.address);
    open.cmd("EHLO client.test", 250);
    open.cmd("MAIL FROM:<erin@example.org>", 250);
    open.cmd("RCPT TO:<bob@example.net>", 250);

    let (code, _) = send_spam(&server.address, "erin@example.org");
    assert_eq!(code, 550);

    let reply = open.data(&common::smtp_client::data_payload(&spam_message()), 550);
    assert!(reply.text().contains("locked out"), "{}", reply.text());
    open.quit();

    let bad: Vec<_> = server
        .events_of("bad_message")
        .into_iter()
        .filter(|event| event["mailbox"] == "erin@example.org")
        .collect();
    assert_eq!(
        bad.len(),
        2,
        "the refused message is not scanned or counted: {bad:#?}"
    );
    assert_eq!(upstream.messages().len(), 0);
}

#[test]
fn expiry_then_doubled_second_lockout() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(
        &upstream.address(),
        &policy("threshold = 2\nfirst_lockout = \"2s\""),
    );
    send_spam(&server.address, "frank@example.org");
    send_spam(&server.address, "frank@example.org");
    let start = Instant::now();
    assert_eq!(
        send_from(&server.address, "frank@example.org", &clean_message()).0,
        550
    );

    // The end is recorded by a timer at the end time, without any traffic.
    let events = server.wait_for_events(Duration::from_secs(10), |events| {
        events.iter().any(|event| event["type"] == "lockout_ended")
    });
    assert!(start.elapsed() >= Duration::from_millis(1500));
    let ended: Vec<_> = events
        .iter()
        .filter(|event| event["type"] == "lockout_ended")
        .collect();
    let started: Vec<_> = events
        .iter()
        .filter(|event| event["type"] == "lockout_started")
        .collect();
    assert_eq!(
        ended[0]["time"], started[0]["until"],
        "recorded with the real end time"
    );
    assert_eq!(
        send_from(&server.address, "frank@example.org", &clean_message()).0,
        250
    );

    send_spam(&server.address, "frank@example.org");
    send_spam(&server.address, "frank@example.org");
    let (code, text) = send_from(&server.address, "frank@example.org", &clean_message());
    assert_eq!(code, 550);
    assert!(text.contains("lockout 2"), "{text}");
    let started = server.events_of("lockout_started");
    assert_eq!(started.len(), 2);
    let first = lockout_seconds(&started[0]);
    let second = lockout_seconds(&started[1]);
    assert_eq!(first, 2);
    assert_eq!(second, 4);
}

/// Length of a lockout from its event, in whole seconds.
fn lockout_seconds(event: &serde_json::Value) -> i64 {
    let parse = |text: &serde_json::Value| {
        let text = text.as_str().expect("time string");
        Timestamp::parse_rfc3339(text)
            .expect("RFC 3339 time")
            .millis()
            / 1000
    };
    let strikes = event["strikes"].as_array().expect("strikes");
    let started = parse(&strikes.last().expect("strike")["time"]);
    parse(&event["until"]) - started
}

#[test]
fn permanent_block_after_timed_lockouts() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(
        &upstream.address(),
        &policy("threshold = 1\nfirst_lockout = \"1s\"\ntimed_lockouts = 1"),
    );
    send_spam(&server.address, "gina@example.org");
    assert_eq!(
        send_from(&server.address, "gina@example.org", &clean_message()).0,
        550
    );
    server.wait_for_events(Duration::from_secs(10), |events| {
        events.iter().any(|event| event["type"] == "lockout_ended")
    });

    send_spam(&server.address, "gina@example.org");
    let (code, text) = send_from(&server.address, "gina@example.org", &clean_message());
    assert_eq!(code, 550);
    assert!(text.contains("permanently"), "{text}");
    let permanent = server.events_of("blocked_permanently");
    assert_eq!(permanent.len(), 1);
    assert_eq!(permanent[0]["level"], 2);

    // Still blocked well after what a timed lockout would have lasted.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        send_from(&server.address, "gina@example.org", &clean_message()).0,
        550
    );
    let blocks = server.cli(&["blocks"]);
    assert!(String::from_utf8_lossy(&blocks.stdout).contains("permanent"));
}

#[test]
fn monitor_mode_records_but_refuses_nothing() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(
        &upstream.address(),
        &policy("threshold = 2\nmode = \"monitor\""),
    );
    let (code, _) = send_spam(&server.address, "hank@example.org");
    assert_eq!(code, 550, "spam is still rejected in monitor mode");
    send_spam(&server.address, "hank@example.org");

    assert_eq!(
        send_from(&server.address, "hank@example.org", &clean_message()).0,
        250
    );
    let started = server.events_of("lockout_started");
    assert_eq!(started.len(), 1);
    assert_eq!(started[0]["monitor"], true);
    assert!(server.events_of("sender_refused").is_empty());
}

#[test]
fn switch_to_monitor_keeps_block() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(
        &upstream.address(),
        &policy("threshold = 2\nfirst_lockout = \"1h\""),
    );
    send_spam(&server.address, "ivan@example.org");
    send_spam(&server.address, "ivan@example.org");
    assert_eq!(
        send_from(&server.address, "ivan@example.org", &clean_message()).0,
        550
    );

    server.rewrite_config(|text| text.replace("[policy]\n", "[policy]\nmode = \"monitor\"\n"));
    server.reload();
    assert!(
        server.log().contains("configuration reloaded"),
        "{}",
        server.log()
    );
    assert_eq!(
        send_from(&server.address, "ivan@example.org", &clean_message()).0,
        550
    );
    let loaded = server.events_of("config_loaded");
    assert_eq!(loaded.len(), 2);
    assert_ne!(loaded[0]["digest"], loaded[1]["digest"]);
}

#[test]
fn invalid_reload_keeps_running_config() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), &policy("threshold = 2"));
    server.rewrite_config(|text| text.replace("threshold = 2", "threshold = 0"));
    server.reload();
    assert!(server.log().contains("reload failed"), "{}", server.log());
    send_spam(&server.address, "jane@example.org");
    send_spam(&server.address, "jane@example.org");
    assert_eq!(
        send_from(&server.address, "jane@example.org", &clean_message()).0,
        550
    );
}

#[test]
fn kill_and_restart_keeps_state() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let mut server = Sendguard::start(
        &upstream.address(),
        &policy("threshold = 3\nfirst_lockout = \"1h\""),
    );
    send_spam(&server.address, "kate@example.org");
    send_spam(&server.address, "kate@example.org");
    send_spam(&server.address, "kate@example.org");
    send_spam(&server.address, "liam@example.org");
    send_spam(&server.address, "liam@example.org");
    let before_kate = server.cli(&["status", "kate@example.org"]);
    let before_liam = server.cli(&["status", "liam@example.org"]);
    let events_before = server.events().len();

    server.kill9();
    server.restart();

    assert_eq!(
        server.cli(&["status", "kate@example.org"]).stdout,
        before_kate.stdout
    );
    assert_eq!(
        server.cli(&["status", "liam@example.org"]).stdout,
        before_liam.stdout
    );
    assert_eq!(
        send_from(&server.address, "kate@example.org", &clean_message()).0,
        550
    );
    // Liam had two strikes before the kill; the third starts his lockout.
    send_spam(&server.address, "liam@example.org");
    assert_eq!(
        send_from(&server.address, "liam@example.org", &clean_message()).0,
        550
    );
    assert!(server.events().len() > events_before);
}

#[test]
fn null_sender_never_blocked() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), &policy("threshold = 2"));
    for _ in 0..3 {
        assert_eq!(send_spam(&server.address, "").0, 550);
    }
    assert_eq!(send_from(&server.address, "", &clean_message()).0, 250);
    assert!(server.events_of("lockout_started").is_empty());
    let bad = server.events_of("bad_message");
    assert_eq!(bad.len(), 3, "every bad message is recorded");
    assert_eq!(bad[0]["counted"], false);
    assert_eq!(bad[0]["sender"], "<>");
}

#[test]
fn spelling_variants_hit_one_mailbox() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let directory = tempfile::NamedTempFile::new().expect("temporary file");
    std::fs::write(
        directory.path(),
        "[[mailbox]]\naddress = \"mike@example.org\"\naliases = [\"m.smith@example.org\"]\n",
    )
    .expect("write directory");
    let extra = format!(
        "{}\n[directory]\npath = \"{}\"\n",
        policy("threshold = 4\nfirst_lockout = \"1h\""),
        directory.path().display()
    );
    let server = Sendguard::start(&upstream.address(), &extra);
    send_spam(&server.address, "mike@example.org");
    send_spam(&server.address, "Mike@EXAMPLE.ORG");
    send_spam(&server.address, "mike+promo@example.org");
    send_spam(&server.address, "m.smith@example.org");

    let (code, text) = send_from(&server.address, "MIKE+x@Example.Org", &clean_message());
    assert_eq!(code, 550, "{text}");
    assert!(text.contains("mike@example.org"), "{text}");
    let started = server.events_of("lockout_started");
    assert_eq!(started.len(), 1);
    assert_eq!(started[0]["mailbox"], "mike@example.org");
}

#[test]
fn forged_sender_confined_to_client() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let extra = format!(
        "{}\n[identity]\nunauthenticated = \"client-and-sender\"\n",
        policy("threshold = 2\nfirst_lockout = \"1h\"")
    );
    let server = Sendguard::start(&upstream.address(), &extra);

    // A forger on 127.0.0.2 sends spam as nina.
    for _ in 0..2 {
        let mut forger = SmtpClient::connect_from(&server.address, "127.0.0.2");
        forger.cmd("EHLO forger.test", 250);
        forger.cmd("MAIL FROM:<nina@example.org>", 250);
        forger.cmd("RCPT TO:<bob@example.net>", 250);
        forger.data(&common::smtp_client::data_payload(&spam_message()), 550);
        forger.quit();
    }
    let mut forger = SmtpClient::connect_from(&server.address, "127.0.0.2");
    forger.cmd("EHLO forger.test", 250);
    forger.cmd("MAIL FROM:<nina@example.org>", 550);
    forger.quit();

    // The real nina on 127.0.0.1 still sends.
    assert_eq!(
        send_from(&server.address, "nina@example.org", &clean_message()).0,
        250
    );
    let started = server.events_of("lockout_started");
    assert_eq!(started[0]["key_client"], "127.0.0.2");
}

#[test]
fn events_cli_filters_and_formats() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), &policy("threshold = 5"));
    send_spam(&server.address, "olga@example.org");
    send_spam(&server.address, "paul@example.org");

    let output = server.cli(&[
        "events",
        "--mailbox",
        "OLGA@example.org",
        "--format",
        "json",
    ]);
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(lines[0].starts_with("{\"time\":"), "{}", lines[0]);
    assert!(lines[0].contains("\"type\":\"bad_message\""));

    let csv = server.cli(&["events", "--since", "1h", "--format", "csv"]);
    let csv = String::from_utf8_lossy(&csv.stdout);
    assert!(csv.starts_with("time,type,mailbox"), "{csv}");
    assert_eq!(
        csv.lines().count(),
        4,
        "header, config_loaded and two bad messages: {csv}"
    );

    let table = server.cli(&["events"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("paul@example.org"));
}

#[test]
fn monitor_lockout_enforced_after_switch() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(
        &upstream.address(),
        &policy("threshold = 2\nfirst_lockout = \"1h\"\nmode = \"monitor\""),
    );
    send_spam(&server.address, "quinn@example.org");
    send_spam(&server.address, "quinn@example.org");
    assert_eq!(
        send_from(&server.address, "quinn@example.org", &clean_message()).0,
        250
    );

    // Enforcing makes the lockout the dry run computed refuse for its rest,
    // so the trial's worst senders are not left exempt.
    server.rewrite_config(|text| text.replace("mode = \"monitor\"", "mode = \"enforce\""));
    server.reload();
    let (code, text) = send_from(&server.address, "quinn@example.org", &clean_message());
    assert_eq!(code, 550, "{text}");
    assert!(text.contains("lockout 1"), "{text}");
}

#[test]
fn too_many_errors_closes_session() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start_with(&upstream.address(), "max_errors = 3", "");
    let mut client = SmtpClient::connect(&server.address);
    client.cmd("EHLO client.test", 250);
    client.cmd("garbage", 500);
    client.cmd("RCPT TO:<b@example.net>", 503);
    client.send_line("more garbage");
    let first = client.read_reply();
    assert_eq!(first.code, 500);
    let closing = client.expect_closed().expect("a closing reply");
    assert_eq!(closing.code, 421, "{}", closing.text());
}

#[test]
fn cli_accepts_written_spellings() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(
        &upstream.address(),
        &policy("threshold = 1\nfirst_lockout = \"1h\""),
    );
    send_spam(&server.address, "rosa@example.org");
    for spelling in [
        "<Rosa@Example.org>",
        "\"rosa\"@example.org",
        " rosa+x@EXAMPLE.org ",
    ] {
        let output = server.cli(&["status", spelling]);
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.contains("lockouts so far:   1"), "{spelling}: {text}");
    }
    let output = server.cli(&[
        "events",
        "--mailbox",
        "<rosa@example.org>",
        "--format",
        "json",
    ]);
    assert_eq!(String::from_utf8_lossy(&output.stdout).lines().count(), 2);

    let empty = server.cli(&["status", "<>"]);
    assert_eq!(empty.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&empty.stderr).contains("invalid mailbox"));
    let client = server.cli(&["status", "rosa@example.org", "--client", "127.0.0.1"]);
    assert_eq!(client.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&client.stderr).contains("client-and-sender"));

    let absolute = server.cli(&[
        "events",
        "--since",
        "2000-01-01T00:00:00Z",
        "--format",
        "json",
    ]);
    assert!(absolute.status.success());
    assert_eq!(String::from_utf8_lossy(&absolute.stdout).lines().count(), 3);
    let garbage = server.cli(&["events", "--since", "garbage"]);
    assert!(!garbage.status.success());
    assert!(String::from_utf8_lossy(&garbage.stderr).contains("such as 1h"));
}

#[test]
fn cli_survives_closed_stdout() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(
        &upstream.address(),
        &policy("threshold = 1\nfirst_lockout = \"1h\""),
    );
    send_spam(&server.address, "sam@example.org");
    for command in ["status sam@example.org", "blocks", "events"] {
        let script = format!(
            "{} {command} --config {} | true; exit ${{PIPESTATUS[0]}}",
            env!("CARGO_BIN_EXE_sendguard"),
            server.config_path.display()
        );
        let output = std::process::Command::new("bash")
            .args(["-c", &script])
            .output()
            .expect("run bash");
        assert!(
            output.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
