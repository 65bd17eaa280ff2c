//! SMTP protocol hardening through the real binary: smuggling, early
//! talkers, pipelining, CHUNKING, address syntax and line limits. Every
//! test also checks that no bare CR or LF and no unexpected transaction
//! reached the recording upstream.

mod common;

use common::sendguard::Sendguard;
use common::smtp_client::{SmtpClient, data_payload};
use common::upstream::{DEFAULT_CAPABILITIES, Upstream, UpstreamOptions};
use std::time::Duration;

const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

fn session(address: &str) -> SmtpClient {
    let mut client = SmtpClient::connect(address);
    client.cmd("EHLO client.test", 250);
    client
}

/// Asserts the upstream saw exactly `count` transactions and never a bare
/// CR or LF.
fn assert_upstream_clean(upstream: &Upstream, count: usize) {
    assert!(
        !upstream.saw_bare_line_ending(),
        "a bare CR or LF reached the upstream"
    );
    assert_eq!(
        upstream.transactions().len(),
        count,
        "unexpected upstream transactions"
    );
}

#[test]
fn smuggled_end_of_data_variants() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "");
    let variants: [&[u8]; 8] = [
        b"\n.\n",
        b"\n.\r\n",
        b"\r\n.\n",
        b"\r.\r\n",
        b"\r\n.\r",
        b"\r\n.\r\r\n",
        b"\r\n.\r\r\r\n",
        b"\r\n. \r\n",
    ];
    for (index, variant) in variants.iter().enumerate() {
        let mut client = session(&server.address);
        client.cmd("MAIL FROM:<alice@example.org>", 250);
        client.cmd("RCPT TO:<bob@example.net>", 250);
        client.cmd("DATA", 354);
        let mut content = b"Subject: smuggle\r\n\r\nfirst".to_vec();
        content.extend_from_slice(variant);
        content.extend_from_slice(
            b"MAIL FROM:<x@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nsmuggled\r\n",
        );
        content.extend_from_slice(b".\r\n");
        client.send_raw(&content);
        let reply = client.read_reply();
        assert_eq!(reply.code, 250, "variant {index}: {}", reply.text());
        client.cmd("NOOP", 250);
        client.quit();

        let messages = upstream.wait_for_messages(index + 1, Duration::from_secs(10));
        let delivered = &messages[index].content;
        assert!(
            String::from_utf8_lossy(delivered).contains("MAIL FROM:<x@example.com>"),
            "variant {index}: the smuggled command stays content"
        );
        assert_eq!(
            messages[index].accepted_rcpts,
            vec!["bob@example.net".to_string()]
        );
    }
    assert_upstream_clean(&upstream, variants.len());
}

#[test]
fn dot_lines_relayed_stuffed() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "");
    let content = b".\r\n..\r\n.x\r\nmiddle\r\n.\r\n...\r\n".to_vec();
    let mut client = session(&server.address);
    assert_eq!(
        client
            .send_message("a@example.org", &["b@example.net"], &content)
            .code,
        250
    );
    client.quit();
    let messages = upstream.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(messages[0].content, content);
    let transcript = upstream.transcript();
    assert!(
        transcript.windows(5).any(|window| window == b"\r\n..\r"),
        "a lone dot line goes upstream stuffed"
    );
    assert_upstream_clean(&upstream, 1);
}

#[test]
fn talker_before_greeting_disconnected() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start_with(&upstream.address(), "greeting_delay = \"1s\"", "");
    let mut client = SmtpClient::connect_without_greeting(&server.address);
    client.send_raw(b"EHLO early.test\r\nMAIL FROM:<a@example.org>\r\n");
    let reply = client.expect_closed().expect("a reply before closing");
    assert_eq!(reply.code, 554, "{}", reply.text());
    assert_upstream_clean(&upstream, 0);
    assert!(!String::from_utf8_lossy(&upstream.transcript()).contains("MAIL FROM"));
}

#[test]
fn patient_client_greeted_after_delay() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start_with(&upstream.address(), "greeting_delay = \"300ms\"", "");
    let client = SmtpClient::connect(&server.address);
    assert_eq!(client.greeting().code, 220);
}

#[test]
fn pipelining_past_ehlo_disconnected() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "");
    let mut client = SmtpClient::connect(&server.address);
    client
        .send_raw(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n");
    let reply = client.expect_closed().expect("a reply before closing");
    assert_eq!(reply.code, 503, "{}", reply.text());
    assert_eq!(reply.enhanced_code(), Some("5.5.0"));
    assert_upstream_clean(&upstream, 0);
}

#[test]
fn content_before_354_never_relayed() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "");
    let mut client = session(&server.address);
    client.send_raw(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nSubject: early\r\n\r\nhi\r\n.\r\n",
    );
    assert_eq!(client.read_reply().code, 250);
    assert_eq!(client.read_reply().code, 250);
    let reply = client.expect_closed().expect("a reply before closing");
    assert_eq!(reply.code, 503, "{}", reply.text());
    assert!(upstream.messages().is_empty());
    assert!(!upstream.saw_bare_line_ending());
}

#[test]
fn refused_mail_then_pipelined_commands() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "");
    let mut client = session(&server.address);
    client.send_raw(b"MAIL FROM:<>>>>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n");
    let replies: Vec<u16> = (0..3).map(|_| client.read_reply().code).collect();
    assert_eq!(
        replies,
        vec![501, 503, 503],
        "replies in command order, never 354"
    );
    client.cmd("NOOP", 250);
    client.quit();
    assert_upstream_clean(&upstream, 0);
    assert!(
        !String::from_utf8_lossy(&upstream.transcript()).contains("MAIL FROM"),
        "no upstream transaction opened"
    );
}

#[test]
fn pipelined_transaction_replies_in_order() {
    let upstream = Upstream::start(
        UpstreamOptions::default().reject_rcpt("no@example.net", "550 5.1.1 unknown"),
    );
    let server = Sendguard::start(&upstream.address(), "");
    let mut client = session(&server.address);
    client.send_raw(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<no@example.net>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n");
    let replies: Vec<u16> = (0..4).map(|_| client.read_reply().code).collect();
    assert_eq!(replies, vec![250, 550, 250, 354]);
    client.send_raw(&data_payload(b"Subject: x\r\n\r\nhi\r\n"));
    assert_eq!(client.read_reply().code, 250);
    client.quit();
    assert_upstream_clean(&upstream, 1);
}

#[test]
fn invalid_addresses_never_reach_upstream() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "");
    let mut client = session(&server.address);
    for line in [
        "MAIL FROM:<>>>>",
        "MAIL FROM:<alice@>",
        "MAIL FROM:<al ice@example.org>",
        "MAIL FROM:<alice@exa_mple.org>",
        "MAIL FROM:alice@example.org",
        "MAIL FROM:<alice@example.org> SIZE=abc",
    ] {
        let reply = client.command(line);
        assert_eq!(reply.code, 501, "{line}: {}", reply.text());
    }
    client.cmd("MAIL FROM:<alice@example.org>", 250);
    for line in ["RCPT TO:<bob@>", "RCPT TO:<b b@example.net>", "RCPT TO:<>"] {
        let reply = client.command(line);
        assert_eq!(reply.code / 100, 5, "{line}: {}", reply.text());
    }
    client.quit();
    let transcript = String::from_utf8_lossy(&upstream.transcript()).into_owned();
    assert_eq!(transcript.matches("MAIL FROM").count(), 1, "{transcript}");
    assert!(!transcript.contains("RCPT"), "{transcript}");
    assert!(
        server
            .events()
            .iter()
            .all(|event| event["type"] == "config_loaded")
    );
}

#[test]
fn control_characters_in_parameters_rejected() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "");
    let mut client = session(&server.address);
    client.send_raw(b"MAIL FROM:<a@example.org> X-P=a\x00b\r\n");
    assert_eq!(client.read_reply().code / 100, 5);
    client.send_raw(b"MAIL FROM:<a@example.org> X-P=a\rb\r\n");
    assert_eq!(client.read_reply().code / 100, 5);
    client.cmd("NOOP", 250);
    client.quit();
    assert!(!String::from_utf8_lossy(&upstream.transcript()).contains("X-P"));
}

#[test]
fn utf8_address_needs_smtputf8() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "");
    // Let the start-up probe learn the upstream's SMTPUTF8 first.
    let mut warmup = session(&server.address);
    warmup.send_message(
        "a@example.org",
        &["b@example.net"],
        b"Subject: x\r\n\r\nhi\r\n",
    );
    warmup.quit();

    let mut client = session(&server.address);
    let reply = client.command("MAIL FROM:<j\u{f6}rg@example.org>");
    assert_eq!(reply.code, 553, "{}", reply.text());
    assert_eq!(reply.enhanced_code(), Some("5.6.7"));
    client.cmd("MAIL FROM:<j\u{f6}rg@b\u{fc}cher.example> SMTPUTF8", 250);
    client.cmd("RCPT TO:<m\u{fc}ller@example.net>", 250);
    client.data(
        &data_payload("Subject: gr\u{fc}\u{df}e\r\n\r\nhi\r\n".as_bytes()),
        250,
    );
    client.quit();
    let messages = upstream.wait_for_messages(2, Duration::from_secs(10));
    assert_eq!(
        messages[1].mail_line,
        "MAIL FROM:<j\u{f6}rg@b\u{fc}cher.example> SMTPUTF8"
    );
}

#[test]
fn smtputf8_refused_without_upstream_support() {
    let upstream =
        Upstream::start(UpstreamOptions::default().capabilities(&["PIPELINING", "8BITMIME"]));
    let server = Sendguard::start(&upstream.address(), "");
    let mut warmup = session(&server.address);
    warmup.send_message(
        "a@example.org",
        &["b@example.net"],
        b"Subject: x\r\n\r\nhi\r\n",
    );
    warmup.quit();
    let mut client = session(&server.address);
    let reply = client.command("MAIL FROM:<j\u{f6}rg@example.org> SMTPUTF8");
    assert_eq!(reply.code, 555, "{}", reply.text());
    client.cmd("MAIL FROM:<a@example.org> BODY=8BITMIME", 250);
    client.quit();
}

#[test]
fn long_command_line_then_resync() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "");
    let mut client = session(&server.address);
    let mut line = b"MAIL FROM:<a@example.org> X-PAD=".to_vec();
    line.extend(std::iter::repeat_n(b'x', 5000));
    line.extend_from_slice(b" QUIT\r\n");
    client.send_raw(&line);
    let reply = client.read_reply();
    assert_eq!(reply.code, 500, "{}", reply.text());
    assert_eq!(reply.enhanced_code(), Some("5.5.2"));
    client.cmd("NOOP", 250);
    client.cmd("MAIL FROM:<a@example.org>", 250);
    client.quit();
}

#[test]
fn long_message_lines_forwarded_unchanged() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "");
    let content = format!("Subject: wide\r\n\r\n{}\r\nend\r\n", "w".repeat(5000)).into_bytes();
    let mut client = session(&server.address);
    assert_eq!(
        client
            .send_message("a@example.org", &["b@example.net"], &content)
            .code,
        250
    );
    client.quit();
    let messages = upstream.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(messages[0].content, content, "never folded");
}

#[test]
fn long_message_lines_rejected_by_policy() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start_with(&upstream.address(), "long_lines = \"reject\"", "");
    let mut client = session(&server.address);
    let ok = format!("Subject: x\r\n\r\n{}\r\n", "w".repeat(998));
    assert_eq!(
        client
            .send_message("a@example.org", &["b@example.net"], ok.as_bytes())
            .code,
        250
    );
    let wide = format!("Subject: x\r\n\r\n{}\r\n", "w".repeat(999));
    let reply = client.send_message("a@example.org", &["b@example.net"], wide.as_bytes());
    assert_eq!(reply.code, 550, "{}", reply.text());
    assert_eq!(reply.enhanced_code(), Some("5.6.0"));
    client.quit();
    assert_upstream_clean(&upstream, 1);
}

#[test]
fn bdat_chunks_relayed_as_data() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "");
    let mut client = session(&server.address);
    let ehlo = client.cmd("EHLO client.test", 250);
    assert!(ehlo.contains("CHUNKING"), "{}", ehlo.text());
    assert!(!ehlo.contains("BINARYMIME"), "{}", ehlo.text());
    client.cmd("MAIL FROM:<a@example.org>", 250);
    client.cmd("RCPT TO:<b@example.net>", 250);
    let first = b"Subject: chunks\r\n\r\n.dot first\r\n";
    let second = b".\r\nlast line\r\n";
    client.send_raw(format!("BDAT {}\r\n", first.len()).as_bytes());
    client.send_raw(first);
    assert_eq!(client.read_reply().code, 250);
    client.send_raw(format!("BDAT {} LAST\r\n", second.len()).as_bytes());
    client.send_raw(second);
    let reply = client.read_reply();
    assert_eq!(reply.code, 250, "{}", reply.text());
    client.quit();
    let messages = upstream.wait_for_messages(1, Duration::from_secs(10));
    let mut expected = first.to_vec();
    expected.extend_from_slice(second);
    assert_eq!(messages[0].content, expected);
    assert_upstream_clean(&upstream, 1);
}

#[test]
fn bdat_relayed_as_bdat_when_offered() {
    let mut capabilities: Vec<&str> = DEFAULT_CAPABILITIES.to_vec();
    capabilities.extend(["CHUNKING", "BINARYMIME"]);
    let upstream = Upstream::start(UpstreamOptions::default().capabilities(&capabilities));
    let server = Sendguard::start(&upstream.address(), "");
    let mut warmup = session(&server.address);
    warmup.send_message(
        "a@example.org",
        &["b@example.net"],
        b"Subject: x\r\n\r\nhi\r\n",
    );
    warmup.quit();

    let mut client = SmtpClient::connect(&server.address);
    let ehlo = client.cmd("EHLO client.test", 250);
    assert!(ehlo.contains("BINARYMIME"), "{}", ehlo.text());
    client.cmd("MAIL FROM:<a@example.org> BODY=BINARYMIME", 250);
    client.cmd("RCPT TO:<b@example.net>", 250);
    // Binary content: bare LF, bare CR and NUL stay exactly as sent.
    let binary = b"Subject: bin\r\n\r\n\x00\x01\nbare\rcr\r\n.\r\n";
    client.send_raw(format!("BDAT {} LAST\r\n", binary.len()).as_bytes());
    client.send_raw(binary);
    assert_eq!(client.read_reply().code, 250);
    client.cmd("MAIL FROM:<a@example.org> BODY=BINARYMIME", 250);
    client.cmd("RCPT TO:<b@example.net>", 250);
    client.cmd("DATA", 503);
    client.quit();
    let messages = upstream.wait_for_messages(2, Duration::from_secs(10));
    assert_eq!(messages[1].content, binary.to_vec());
    let transcript = String::from_utf8_lossy(&upstream.transcript()).into_owned();
    assert!(
        transcript.contains(&format!("BDAT {} LAST", binary.len())),
        "{transcript}"
    );
}

#[test]
fn refused_bdat_consumes_chunk() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "");
    let mut client = session(&server.address);
    // No MAIL yet: the BDAT is refused, and its octets, which look like
    // commands, must be skipped.
    let chunk = b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.net>\r\nQUIT\r\n";
    client.send_raw(format!("BDAT {} LAST\r\n", chunk.len()).as_bytes());
    client.send_raw(chunk);
    assert_eq!(client.read_reply().code, 503);
    client.cmd("NOOP", 250);
    client.quit();
    assert!(!String::from_utf8_lossy(&upstream.transcript()).contains("evil"));
}

#[test]
fn bdat_reset_and_mixing() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "");
    let mut client = session(&server.address);
    client.cmd("MAIL FROM:<a@example.org>", 250);
    client.cmd("RCPT TO:<b@example.net>", 250);
    client.send_raw(b"BDAT 5\r\nhello");
    assert_eq!(client.read_reply().code, 250);
    // DATA cannot follow BDAT in one transaction.
    client.cmd("DATA", 503);
    // RSET in the middle returns the session to normal command parsing.
    client.cmd("RSET", 250);
    client.send_raw(b"BDAT 4 LAST\r\nQUIT");
    assert_eq!(client.read_reply().code, 503);
    let reply = client.send_message(
        "a@example.org",
        &["b@example.net"],
        b"Subject: after\r\n\r\nok\r\n",
    );
    assert_eq!(reply.code, 250);
    client.quit();
    let messages = upstream.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(
        messages[0].content,
        b"Subject: after\r\n\r\nok\r\n".to_vec()
    );
    assert_upstream_clean(&upstream, 1);
}

#[test]
fn bdat_bare_line_endings_normalized() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "");
    let mut client = session(&server.address);
    client.cmd("MAIL FROM:<a@example.org>", 250);
    client.cmd("RCPT TO:<b@example.net>", 250);
    let chunk = b"Subject: x\n\nline\rnext\n.\n";
    client.send_raw(format!("BDAT {} LAST\r\n", chunk.len()).as_bytes());
    client.send_raw(chunk);
    assert_eq!(client.read_reply().code, 250);
    client.quit();
    let messages = upstream.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(
        messages[0].content,
        b"Subject: x\r\n\r\nline\r\nnext\r\n.\r\n".to_vec()
    );
    assert_upstream_clean(&upstream, 1);
}

#[test]
fn bdat_over_size_limit_rejected() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start_with(&upstream.address(), "max_message_size = 100", "");
    let mut client = session(&server.address);
    client.cmd("MAIL FROM:<a@example.org>", 250);
    client.cmd("RCPT TO:<b@example.net>", 250);
    client.send_raw(b"BDAT 80\r\n");
    client.send_raw(&[b'a'; 80]);
    assert_eq!(client.read_reply().code, 250);
    client.send_raw(b"BDAT 80 LAST\r\n");
    client.send_raw(&[b'b'; 80]);
    let reply = client.read_reply();
    assert_eq!(reply.code, 552, "{}", reply.text());
    client.cmd("NOOP", 250);
    client.quit();
    assert_upstream_clean(&upstream, 0);
}

#[test]
fn bdat_spam_rejected_and_counted() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "[policy]\nthreshold = 1\n");
    let mut client = session(&server.address);
    client.cmd("MAIL FROM:<a@example.org>", 250);
    client.cmd("RCPT TO:<b@example.net>", 250);
    let chunk = format!("Subject: x\r\n\r\n{GTUBE}\r\n");
    client.send_raw(format!("BDAT {} LAST\r\n", chunk.len()).as_bytes());
    client.send_raw(chunk.as_bytes());
    assert_eq!(client.read_reply().code, 550);
    client.cmd("MAIL FROM:<a@example.org>", 550);
    client.quit();
    assert_upstream_clean(&upstream, 0);
}

#[test]
fn invalid_bdat_size_closes_session() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "");
    let mut client = session(&server.address);
    client.send_raw(b"BDAT 99999999999999999999999\r\nMAIL FROM:<evil@example.com>\r\n");
    let reply = client.expect_closed().expect("a closing reply");
    assert_eq!(reply.code, 421, "{}", reply.text());
    assert!(reply.text().contains("BDAT"), "{}", reply.text());
    assert!(!String::from_utf8_lossy(&upstream.transcript()).contains("evil"));
}

#[test]
fn quoted_local_part_one_mailbox() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "[policy]\nthreshold = 2\n");
    let spam = format!("Subject: x\r\n\r\n{GTUBE}\r\n");
    let mut client = session(&server.address);
    client.send_message("\"alice\"@example.org", &["b@example.net"], spam.as_bytes());
    client.send_message("Alice@example.org", &["b@example.net"], spam.as_bytes());
    let reply = client.command("MAIL FROM:<\"ALICE\"@example.org>");
    assert_eq!(reply.code, 550, "{}", reply.text());
    client.quit();
    let started = server.events_of("lockout_started");
    assert_eq!(started.len(), 1);
    assert_eq!(started[0]["mailbox"], "alice@example.org");
}

#[test]
fn upstream_lost_at_rcpt_keeps_transaction() {
    // The upstream drops a session that is silent for one second.
    let upstream = Upstream::start(UpstreamOptions::default().read_timeout(Duration::from_secs(1)));
    let server = Sendguard::start(&upstream.address(), "");
    let mut client = session(&server.address);
    client.cmd("MAIL FROM:<a@example.org>", 250);
    std::thread::sleep(Duration::from_millis(1500));
    let reply = client.command("RCPT TO:<bob@example.net>");
    assert_eq!(reply.code, 451, "{}", reply.text());
    // The transaction goes on: the next RCPT runs on a new upstream session
    // with the envelope replayed, and DATA is accepted, not refused as
    // "send MAIL first".
    client.cmd("RCPT TO:<carol@example.net>", 250);
    client.data(&data_payload(b"Subject: x\r\n\r\nhi\r\n"), 250);
    client.quit();
    let messages = upstream.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(
        messages[0].accepted_rcpts,
        vec!["carol@example.net".to_string()]
    );
    assert_upstream_clean(&upstream, 1);
}

#[test]
fn overlong_bdat_line_closes_session() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "");
    let mut client = session(&server.address);
    client.cmd("MAIL FROM:<a@example.org>", 250);
    client.cmd("RCPT TO:<b@example.net>", 250);
    let mut line = b"BDAT ".to_vec();
    line.extend(std::iter::repeat_n(b'0', 3000));
    line.extend_from_slice(b"30 LAST\r\nMAIL FROM:<evil@example.org>\r\n");
    client.send_raw(&line);
    let reply = client.expect_closed().expect("a closing reply");
    assert_eq!(reply.code, 421, "{}", reply.text());
    assert!(!String::from_utf8_lossy(&upstream.transcript()).contains("evil"));
}

#[test]
fn unoffered_parameters_refused() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "");
    let mut client = session(&server.address);
    let reply = client.command("MAIL FROM:<alice@example.org> AUTH=ceo@example.org");
    assert_eq!(reply.code, 555, "{}", reply.text());
    client.cmd("MAIL FROM:<alice@example.org> SIZE=100 BODY=8BITMIME", 250);
    let reply = client.command("RCPT TO:<bob@example.net> NOTIFY=NEVER");
    assert_eq!(reply.code, 555, "{}", reply.text());
    client.quit();
    assert!(!String::from_utf8_lossy(&upstream.transcript()).contains("AUTH="));
}

#[test]
fn bdat_data_timeout_covers_all_chunks() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start_with(&upstream.address(), "data_timeout = \"2s\"", "");
    let mut client = session(&server.address);
    client.cmd("MAIL FROM:<a@example.org>", 250);
    client.cmd("RCPT TO:<b@example.net>", 250);
    let mut closed = false;
    // Bounded: at most 8 chunks, one every 500 ms.
    for _ in 0..8 {
        client.send_raw(b"BDAT 1\r\nx");
        match client.try_read_reply() {
            Ok(reply) if reply.code == 250 => {}
            _ => {
                closed = true;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(closed, "chunks kept coming past data_timeout");
    assert!(upstream.messages().is_empty());
}
