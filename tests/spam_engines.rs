//! rspamd and spamd verdicts end to end: the real binary with real engines
//! (see `tests/common/rspamd.rs` and `tests/common/spamd.rs`), a real SMTP
//! client and a recording upstream. The built-in rules are turned off
//! unless a test turns them on, so every verdict comes from the engines.

mod common;

use common::milter_client::{MilterClient, Response, SMFIC_BODYEOB, SMFIC_MAIL};
use common::realistic_message;
use common::rspamd::Rspamd;
use common::sendguard::Sendguard;
use common::smtp_client::{SmtpClient, data_payload, send_from};
use common::spamd::Spamd;
use common::upstream::{Upstream, UpstreamOptions};
use std::time::Duration;

const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

/// Returns the `[scan]` and `[policy]` sections: the built-in rules off,
/// `engines` as given (TOML sections), a ten-minute window and `policy`
/// lines.
fn config(engines: &str, policy: &str) -> String {
    format!("[scan.spam]\nenabled = false\n{engines}\n[policy]\nwindow = \"10m\"\n{policy}\n")
}

fn rspamd_section(address: &str, extra: &str) -> String {
    format!("[scan.rspamd]\naddress = \"{address}\"\ntimeout = \"30s\"\n{extra}\n")
}

fn spamd_section(address: &str, extra: &str) -> String {
    format!("[scan.spamd]\naddress = \"{address}\"\ntimeout = \"30s\"\n{extra}\n")
}

/// Returns the sections for both engines with their defaults.
fn both_engines(rspamd: &Rspamd, spamd: &Spamd) -> String {
    format!(
        "{}{}",
        rspamd_section(&rspamd.address, ""),
        spamd_section(&spamd.address, "")
    )
}

fn bad_messages(server: &Sendguard) -> Vec<serde_json::Value> {
    server.events_of("bad_message")
}

/// Checks that `mailbox` has no strike and no lockout on record.
fn assert_no_strikes(server: &Sendguard, mailbox: &str) {
    let status = server.cli(&["status", mailbox]);
    assert_eq!(
        String::from_utf8_lossy(&status.stdout).trim(),
        format!("{mailbox}: no strikes and no lockouts recorded")
    );
}

#[test]
fn gtube_rejected_by_each_engine() {
    let rspamd = Rspamd::start();
    let spamd = Spamd::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let cases = [
        (
            rspamd_section(&rspamd.address, ""),
            "spam rspamd score 15.0 action reject (GTUBE)",
        ),
        // GTUBE is 1000 points in SpamAssassin; other rules add a few.
        (spamd_section(&spamd.address, ""), "spam spamd score 100"),
    ];
    for (engines, expected) in cases {
        let server = Sendguard::start(&upstream.address(), &config(&engines, ""));
        let (code, text) = send_from(
            &server.address,
            "alice@example.org",
            &realistic_message(GTUBE),
        );
        assert_eq!(code, 550, "{text}");
        assert!(text.contains("5.7.1"), "{text}");
        assert!(text.contains(expected), "{text}");

        let events = bad_messages(&server);
        assert_eq!(events.len(), 1, "{events:#?}");
        assert_eq!(events[0]["counted"], true);
        assert_eq!(events[0]["verdict_kind"], "spam");
        assert!(
            events[0]["verdict"]
                .as_str()
                .is_some_and(|verdict| verdict.starts_with(expected)),
            "{events:#?}"
        );
    }
    assert!(upstream.messages().is_empty());
}

#[test]
fn realistic_message_not_counted() {
    let rspamd = Rspamd::start();
    let spamd = Spamd::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let engines = both_engines(&rspamd, &spamd);
    let server = Sendguard::start(&upstream.address(), &config(&engines, ""));
    let message = realistic_message("");
    let (code, text) = send_from(&server.address, "alice@example.org", &message);
    assert_eq!(code, 250, "{text}");

    let received = upstream.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(received[0].content, message, "relayed unchanged");
    assert!(bad_messages(&server).is_empty(), "{:#?}", server.events());
    assert_no_strikes(&server, "alice@example.org");
}

#[test]
fn add_header_tags_without_strike() {
    let rspamd = Rspamd::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(
        &upstream.address(),
        &config(&rspamd_section(&rspamd.address, ""), "threshold = 3"),
    );
    let message = realistic_message("Reference: sendguard-test-marker");
    // Twice the threshold: none of them counts, so no lockout starts.
    for attempt in 1..=6 {
        let (code, text) = send_from(&server.address, "alice@example.org", &message);
        assert_eq!(code, 250, "attempt {attempt}: {text}");
    }

    let received = upstream.wait_for_messages(6, Duration::from_secs(10));
    for message in &received {
        let content = String::from_utf8_lossy(&message.content);
        assert!(
            content.starts_with(
                "X-Sendguard-Spam: Suspect, suspect rspamd score 7.2 action add header \
                 (SENDGUARD_TEST_MARKER(7.25)"
            ),
            "{content}"
        );
    }
    let events = bad_messages(&server);
    assert_eq!(events.len(), 6, "{events:#?}");
    for event in &events {
        assert_eq!(event["counted"], false);
        assert_eq!(event["verdict_kind"], "suspect");
        assert_eq!(event["mailbox"], "alice@example.org");
        assert!(
            event["note"]
                .as_str()
                .is_some_and(|note| note.contains("never counted")),
            "{event:#?}"
        );
    }
    assert!(server.events_of("lockout_started").is_empty());
    assert_no_strikes(&server, "alice@example.org");
}

#[test]
fn add_header_mapped_to_spam_counts() {
    let rspamd = Rspamd::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let engines = rspamd_section(
        &rspamd.address,
        "[scan.rspamd.actions]\nadd_header = \"spam\"",
    );
    let server = Sendguard::start(&upstream.address(), &config(&engines, "threshold = 2"));
    let message = realistic_message("Reference: sendguard-test-marker");
    for attempt in 1..=2 {
        let (code, text) = send_from(&server.address, "alice@example.org", &message);
        assert_eq!(code, 550, "attempt {attempt}: {text}");
        assert!(
            text.contains("spam rspamd score 7.2 action add header"),
            "{text}"
        );
    }
    let (code, text) = send_from(&server.address, "alice@example.org", &message);
    assert_eq!(code, 550, "{text}");
    assert!(text.contains("lockout 1"), "MAIL FROM refused: {text}");

    let events = bad_messages(&server);
    assert_eq!(events.len(), 2, "{events:#?}");
    assert!(events.iter().all(|event| event["counted"] == true));
    assert_eq!(server.events_of("lockout_started").len(), 1);
    assert!(upstream.messages().is_empty());
}

#[test]
fn engine_down_gives_configured_result() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let closed = common::closed_address();
    for section in [rspamd_section(&closed, ""), spamd_section(&closed, "")] {
        // Under the default on_error = "tempfail" the client retries later.
        let server = Sendguard::start(&upstream.address(), &config(&section, ""));
        let (code, text) = send_from(&server.address, "alice@example.org", &realistic_message(""));
        assert_eq!(code, 451, "{section}: {text}");
        assert!(text.contains("4.7.1"), "{text}");
        assert!(text.contains("spam scanner is unavailable"), "{text}");
        assert!(bad_messages(&server).is_empty());
        drop(server);

        // Under on_error = "accept" the message goes through unscanned by
        // the engine that is down.
        let accepting = format!("{section}on_error = \"accept\"\n");
        let server = Sendguard::start(&upstream.address(), &config(&accepting, ""));
        let (code, text) = send_from(&server.address, "alice@example.org", &realistic_message(""));
        assert_eq!(code, 250, "{accepting}: {text}");
        let log = server.log();
        assert!(
            log.contains("scan engine failed; the other engines decide"),
            "{log}"
        );
    }
    assert_eq!(upstream.messages().len(), 2);
}

#[test]
fn rspamd_alone_starts_lockout() {
    let rspamd = Rspamd::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    // No clamd and no built-in rules: rspamd is the only engine.
    let server = Sendguard::start(
        &upstream.address(),
        &config(&rspamd_section(&rspamd.address, ""), "threshold = 5"),
    );
    for attempt in 1..=5 {
        let (code, text) = send_from(
            &server.address,
            "alice@example.org",
            &realistic_message(GTUBE),
        );
        assert_eq!(code, 550, "attempt {attempt}: {text}");
    }
    let (code, text) = send_from(&server.address, "alice@example.org", &realistic_message(""));
    assert_eq!(code, 550, "{text}");
    assert!(text.contains("lockout 1"), "{text}");

    let started = server.events_of("lockout_started");
    assert_eq!(started.len(), 1, "{started:#?}");
    let strikes = started[0]["strikes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(strikes.len(), 5, "{started:#?}");
    for strike in strikes {
        assert_eq!(
            strike["verdict"],
            "spam rspamd score 15.0 action reject (GTUBE)"
        );
    }
    // Another mailbox still sends.
    let (code, _) = send_from(&server.address, "carol@example.org", &realistic_message(""));
    assert_eq!(code, 250);
}

#[test]
fn envelope_reaches_rspamd_through_xclient() {
    let rspamd = Rspamd::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start_with(
        &upstream.address(),
        "xclient_peers = [\"127.0.0.1\"]",
        &config(&rspamd_section(&rspamd.address, ""), ""),
    );
    let message = realistic_message("Check: sendguard-envelope-check");
    let send_as = |attributes: &str| {
        let mut client = SmtpClient::connect(&server.address);
        client.cmd("EHLO proxy.test", 250);
        client.cmd(&format!("XCLIENT {attributes}"), 220);
        client.cmd("EHLO pc44-helo.example.org", 250);
        client.cmd("MAIL FROM:<alice@example.org>", 250);
        client.cmd("RCPT TO:<bob@example.net>", 250);
        client.cmd("DATA", 354);
        client.send_raw(&data_payload(&message));
        let reply = client.read_reply();
        client.quit();
        reply
    };

    // rspamd's test rule fires only when the address, host name, HELO,
    // login, sender and recipient all arrived.
    let reply =
        send_as("ADDR=192.0.2.44 NAME=pc44.example.org HELO=pc44-helo.example.org LOGIN=alice");
    assert_eq!(reply.code, 550, "{reply}");
    assert!(reply.contains("SENDGUARD_TEST_ENVELOPE(20)"), "{reply}");

    // Without the login the rule stays silent.
    let reply = send_as("ADDR=192.0.2.44 NAME=pc44.example.org HELO=pc44-helo.example.org");
    assert!(!reply.contains("SENDGUARD_TEST_ENVELOPE"), "{reply}");
}

#[test]
fn milter_passes_envelope_and_tags() {
    let rspamd = Rspamd::start();
    let milter = format!("127.0.0.1:{}", common::free_port());
    let server = Sendguard::start(
        &common::closed_address(),
        &format!(
            "[milter]\nlisten = \"{milter}\"\ntimeout = \"30s\"\n{}",
            config(&rspamd_section(&rspamd.address, ""), "")
        ),
    );
    // The harness moves a listener whose port was taken meanwhile.
    let milter = server.listen_address("milter");
    let transaction = |body: &str| {
        let mut client = MilterClient::connect(&milter);
        client.negotiate_all();
        client.connect_info("pc44.example.org", "192.0.2.44", 40000);
        client.helo("pc44-helo.example.org");
        client.macros(SMFIC_MAIL, &[("{auth_authen}", "alice")]);
        client.mail(&["<alice@example.org>"]);
        assert_eq!(client.read_response(), Response::Continue);
        client.rcpt(&["<bob@example.net>"]);
        let message = realistic_message(body);
        let text = String::from_utf8_lossy(&message);
        let (headers, content) = text.split_once("\r\n\r\n").expect("header block");
        for line in headers.split("\r\n") {
            let (name, value) = line.split_once(':').expect("header line");
            client.header(name, value);
        }
        client.end_of_headers();
        client.body(content.as_bytes());
        assert_eq!(client.read_response(), Response::Continue);
        client.macros(SMFIC_BODYEOB, &[("i", "4ABC123DEF")]);
        client.end_of_message()
    };

    // The connect packet's host name, the HELO, the login macro and the
    // recipient reach rspamd.
    let responses = transaction("Check: sendguard-envelope-check");
    match responses.as_slice() {
        [Response::ReplyCode(reply)] => {
            assert!(reply.starts_with("550 5.7.1"), "{reply}");
            assert!(reply.contains("SENDGUARD_TEST_ENVELOPE(20)"), "{reply}");
        }
        other => panic!("expected a rejection: {other:?}"),
    }

    // A suspect message gets the header at the top and is accepted.
    let responses = transaction("Reference: sendguard-test-marker");
    match responses.as_slice() {
        [
            Response::InsertHeader { index, name, value },
            Response::Accept,
        ] => {
            assert_eq!(*index, 0);
            assert_eq!(name, "X-Sendguard-Spam");
            assert!(
                value.starts_with(" Suspect, suspect rspamd score"),
                "{value:?}"
            );
        }
        other => panic!("expected a header and accept: {other:?}"),
    }
    let events = server.wait_for_events(Duration::from_secs(10), |events| {
        events
            .iter()
            .any(|event| event["verdict_kind"] == "suspect")
    });
    assert!(
        events
            .iter()
            .any(|event| event["verdict_kind"] == "suspect" && event["counted"] == false),
        "{events:#?}"
    );
}

#[test]
fn check_shows_every_engine() {
    let rspamd = Rspamd::start();
    let spamd = Spamd::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let engines = both_engines(&rspamd, &spamd);
    // The built-in rules on as well, so three engines report.
    let server = Sendguard::start(&upstream.address(), &engines);

    let file = server.dir.path().join("gtube.eml");
    std::fs::write(&file, realistic_message(GTUBE)).expect("write message");
    let output = server.cli(&[
        "check",
        file.to_str().expect("utf-8 path"),
        "--client",
        "127.0.0.1",
        "--sender",
        "alice@example.org",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");

    let line = |engine: &str| {
        stdout
            .lines()
            .find(|line| line.split_whitespace().next() == Some(engine))
            .unwrap_or_else(|| panic!("no line for {engine}: {stdout}"))
            .to_string()
    };
    assert!(
        line("builtin").contains("spam score 1000.0 (GTUBE)"),
        "{stdout}"
    );
    assert!(
        line("rspamd").contains("spam rspamd score 15.0 action reject (GTUBE)"),
        "{stdout}"
    );
    assert!(line("spamd").contains("spam spamd score 100"), "{stdout}");
    assert!(line("spamd").contains("GTUBE"), "{stdout}");
    assert!(
        line("verdict").contains("spam score 1000.0 (GTUBE)"),
        "{stdout}"
    );
}

#[test]
fn spamd_answers_message_without_final_newline() {
    let spamd = Spamd::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    // spamd's own wait for the rest of a request is 30 s, far above this
    // timeout, so the check only passes when the request is closed.
    let engines = format!(
        "[scan.spamd]\naddress = \"{}\"\ntimeout = \"10s\"\n",
        spamd.address
    );
    let server = Sendguard::start(&upstream.address(), &engines);
    let file = server.dir.path().join("no-newline.eml");
    let mut message = realistic_message("See you at noon.");
    while message
        .last()
        .is_some_and(|byte| *byte == b'\n' || *byte == b'\r')
    {
        message.pop();
    }
    std::fs::write(&file, message).expect("write message");
    let output = server.cli(&["check", file.to_str().expect("utf-8 path")]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(!stdout.contains("timed out"), "{stdout}");
}
