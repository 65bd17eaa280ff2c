//! Tests of the test harness itself: the recording upstream, the SMTP
//! client helper and the test PKI. Postfix's smtp-source and swaks (for
//! STARTTLS and AUTH) also run against the recorder, so that it is checked
//! against real SMTP clients too.

mod common;

use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{CertificateError, ServerConfig};

use common::smtp_client::{SmtpClient, StartTlsError, data_payload, stuff};
use common::tls::TestPki;
use common::upstream::{
    ClosePoint, DEFAULT_CAPABILITIES, Upstream, UpstreamOptions, closed_address,
};

const WAIT: Duration = Duration::from_secs(10);

fn start_session(upstream: &Upstream) -> SmtpClient {
    let mut client = SmtpClient::connect(&upstream.address());
    client.expect_greeting(220);
    client.cmd("EHLO client.example", 250);
    client
}

/// Sends MAIL, one RCPT and DATA, then `payload` unchanged.
fn send_raw_payload(client: &mut SmtpClient, payload: &[u8]) {
    client.cmd("MAIL FROM:<alice@example.org>", 250);
    client.cmd("RCPT TO:<bob@example.net>", 250);
    client.cmd("DATA", 354);
    client.send_raw(payload);
}

#[test]
fn upstream_records_content_byte_exact() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let mut client = start_session(&upstream);
    let mut content = Vec::new();
    content.extend_from_slice(b".\r\n");
    content.extend_from_slice(b"..two dots\r\n");
    content.extend_from_slice(b".\r\n.\r\n");
    content.extend_from_slice(b"Subject: =?utf-8?q?caf=C3=A9?=\r\n");
    content.extend_from_slice(b"\r\n");
    content.extend_from_slice("UTF-8: café ü 日本\r\n".as_bytes());
    content.extend_from_slice(b"Latin-1: \xe9\xff\x80\x00 NUL included\r\n");
    content.extend_from_slice(b"  trailing spaces and a tab\t \r\n");
    content.extend_from_slice(&[b'x'; 2000]);
    content.extend_from_slice(b"\r\n\r\n");

    let reply = client.send_message(
        "alice@example.org",
        &["bob@example.net", "carol@example.net"],
        &content,
    );
    assert_eq!(reply.code, 250, "reply: {reply}");
    client.quit();

    let messages = upstream.wait_for_messages(1, WAIT);
    let message = &messages[0];
    assert_eq!(message.content, content);
    assert_eq!(message.helo_line, "EHLO client.example");
    assert_eq!(message.mail_line, "MAIL FROM:<alice@example.org>");
    assert_eq!(
        message.rcpt_lines,
        ["RCPT TO:<bob@example.net>", "RCPT TO:<carol@example.net>"]
    );
    assert_eq!(
        message.accepted_rcpts,
        ["bob@example.net", "carol@example.net"]
    );
    assert_eq!(message.connection, 1);
    assert_eq!(
        reply.text(),
        format!("2.0.0 Ok: queued as {}", message.queue_id)
    );
    assert_eq!(reply.enhanced_code(), Some("2.0.0"));
    assert!(!message.bare_line_ending);
    assert!(!upstream.saw_bare_line_ending());
}

#[test]
fn upstream_unstuffs_dots_from_raw_payload() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let mut client = start_session(&upstream);
    send_raw_payload(&mut client, b"..\r\n...three\r\n.x\r\nmid.dle\r\n.\r\n");
    client.expect_reply(250);

    let message = &upstream.wait_for_messages(1, WAIT)[0];
    assert_eq!(message.content, b".\r\n..three\r\nx\r\nmid.dle\r\n");
    let transcript = upstream.transcript();
    let raw_payload: &[u8] = b"DATA\r\n..\r\n...three\r\n";
    assert!(
        transcript
            .windows(raw_payload.len())
            .any(|window| window == raw_payload)
    );
}

#[test]
fn upstream_records_empty_content() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let mut client = start_session(&upstream);
    send_raw_payload(&mut client, b".\r\n");
    client.expect_reply(250);

    let message = &upstream.wait_for_messages(1, WAIT)[0];
    assert!(message.content.is_empty());
}

#[test]
fn upstream_flags_bare_lf_in_content() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let mut client = start_session(&upstream);
    // Neither LF.LF nor CRLF.LF nor LF.CRLF ends the content.
    send_raw_payload(&mut client, b"one\n.\ntwo\r\n.\nthree\n.\r\nfour\r\n.\r\n");
    client.expect_reply(250);

    let message = &upstream.wait_for_messages(1, WAIT)[0];
    // The dot in ".\nthree" follows CRLF, so it is a stuffed dot and removed.
    assert_eq!(message.content, b"one\n.\ntwo\r\n\nthree\n.\r\nfour\r\n");
    assert!(message.bare_line_ending);
    assert!(upstream.saw_bare_line_ending());
}

#[test]
fn upstream_flags_bare_cr_in_content() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let mut client = start_session(&upstream);
    send_raw_payload(&mut client, b"one\rtwo\r\n\r.\r\n.\r\n");
    client.expect_reply(250);

    let message = &upstream.wait_for_messages(1, WAIT)[0];
    assert_eq!(message.content, b"one\rtwo\r\n\r.\r\n");
    assert!(message.bare_line_ending);
    assert!(upstream.saw_bare_line_ending());
}

#[test]
fn upstream_flags_bare_lf_in_command() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let mut client = start_session(&upstream);
    client.send_raw(b"MAIL FROM:<alice@example.org>\n");
    client.expect_reply(250);
    client.cmd("RCPT TO:<bob@example.net>", 250);
    client.data(b"clean\r\n.\r\n", 250);
    client.send_message("alice@example.org", &["bob@example.net"], b"second\r\n");

    let messages = upstream.wait_for_messages(2, WAIT);
    assert_eq!(messages[0].mail_line, "MAIL FROM:<alice@example.org>");
    assert!(messages[0].bare_line_ending);
    assert!(
        !messages[1].bare_line_ending,
        "the flag belongs to one transaction"
    );
    assert!(upstream.saw_bare_line_ending());
}

#[test]
fn upstream_flags_bare_lf_before_transaction() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let mut client = SmtpClient::connect(&upstream.address());
    client.send_raw(b"EHLO client.example\n");
    client.expect_reply(250);
    client.send_message("alice@example.org", &["bob@example.net"], b"body\r\n");

    let message = &upstream.wait_for_messages(1, WAIT)[0];
    assert!(!message.bare_line_ending);
    assert!(upstream.saw_bare_line_ending());
}

#[test]
fn upstream_rejects_configured_recipient() {
    let upstream = Upstream::start(UpstreamOptions::default().reject_rcpt(
        "bob@example.net",
        "550 5.1.1 <bob@example.net> user unknown",
    ));
    let mut client = start_session(&upstream);
    client.cmd("MAIL FROM:<alice@example.org>", 250);
    let rejected = client.cmd("RCPT TO:<BOB@example.net>", 550);
    assert_eq!(rejected.lines, ["5.1.1 <bob@example.net> user unknown"]);
    assert_eq!(rejected.enhanced_code(), Some("5.1.1"));
    client.cmd("RCPT TO:<carol@example.net> NOTIFY=NEVER", 250);
    client.data(&data_payload(b"hello\r\n"), 250);

    let message = &upstream.wait_for_messages(1, WAIT)[0];
    assert_eq!(
        message.rcpt_lines,
        [
            "RCPT TO:<BOB@example.net>",
            "RCPT TO:<carol@example.net> NOTIFY=NEVER"
        ]
    );
    assert_eq!(message.accepted_rcpts, ["carol@example.net"]);
}

#[test]
fn upstream_requires_accepted_recipient() {
    let upstream = Upstream::start(UpstreamOptions::default().reject_rcpt(
        "bob@example.net",
        "450 4.2.1 <bob@example.net> mailbox busy",
    ));
    let mut client = start_session(&upstream);
    client.cmd("MAIL FROM:<alice@example.org>", 250);
    client.cmd("RCPT TO:<bob@example.net>", 450);
    client.cmd("DATA", 554);
    client.cmd("DATA", 554);
    client.quit();
    assert!(upstream.transactions().is_empty());
}

#[test]
fn upstream_rejects_mail() {
    let upstream =
        Upstream::start(UpstreamOptions::default().mail_reply("550 5.7.1 sender blocked"));
    let mut client = start_session(&upstream);
    let reply = client.cmd("MAIL FROM:<alice@example.org>", 550);
    assert_eq!(reply.text(), "5.7.1 sender blocked");
    client.cmd("RCPT TO:<bob@example.net>", 503);
    client.cmd("DATA", 503);
    client.quit();
    assert!(upstream.transactions().is_empty());
}

#[test]
fn upstream_enforces_session_order() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let mut client = SmtpClient::connect(&upstream.address());
    client.cmd("MAIL FROM:<alice@example.org>", 503);
    client.cmd("HELO client.example", 250);
    client.cmd("MAIL FROM:<alice@example.org>", 250);
    client.cmd("MAIL FROM:<alice@example.org>", 503);
    client.cmd("RSET", 250);
    client.cmd("RCPT TO:<bob@example.net>", 503);
    client.cmd("NOOP", 250);
    client.cmd("STARTTLS", 454);
    // BDAT octets follow the command even when it is refused.
    client.send_raw(b"BDAT 10 LAST\r\n0123456789");
    assert_eq!(client.read_reply().code, 503);
    client.cmd("MAIL TO:<alice@example.org>", 501);
    client.quit();
    client.expect_closed();
}

#[test]
fn upstream_rejects_declared_size_over_limit() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let mut client = start_session(&upstream);
    client.cmd("MAIL FROM:<alice@example.org> SIZE=52428801", 552);
    client.cmd(
        "MAIL FROM:<alice@example.org> BODY=8BITMIME SIZE=52428800",
        250,
    );
}

#[test]
fn upstream_data_replies_in_order() {
    let upstream = Upstream::start(
        UpstreamOptions::default()
            .data_replies(&["451 4.3.0 try again later", "554 5.7.1 rejected {queue_id}"]),
    );
    let mut client = start_session(&upstream);
    let first = client.send_message("alice@example.org", &["bob@example.net"], b"first\r\n");
    let second = client.send_message("alice@example.org", &["bob@example.net"], b"second\r\n");
    let third = client.send_message("alice@example.org", &["bob@example.net"], b"third\r\n");
    let fourth = client.send_message("alice@example.org", &["bob@example.net"], b"fourth\r\n");
    assert_eq!(first.code, 451);
    assert_eq!(second.code, 554);
    assert_eq!(third.code, 250);
    assert_eq!(fourth.code, 250);

    let transactions = upstream.transactions();
    assert_eq!(transactions.len(), 4);
    assert_eq!(
        second.text(),
        format!("5.7.1 rejected {}", transactions[1].queue_id)
    );
    assert!(!transactions[0].accepted());
    assert_eq!(
        transactions[0].data_reply.as_deref(),
        Some("451 4.3.0 try again later")
    );

    let messages = upstream.messages();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0].content, b"third\r\n");
    assert_eq!(messages[1].content, b"fourth\r\n");
    let mut queue_ids: Vec<&str> = transactions.iter().map(|t| t.queue_id.as_str()).collect();
    queue_ids.sort_unstable();
    queue_ids.dedup();
    assert_eq!(queue_ids.len(), 4, "queue ids must be unique");
}

#[test]
fn upstream_custom_data_reply() {
    let upstream = Upstream::start(
        UpstreamOptions::default().data_reply("250 2.6.0 accepted as <{queue_id}>"),
    );
    let mut client = start_session(&upstream);
    let reply = client.send_message("alice@example.org", &["bob@example.net"], b"body\r\n");
    let message = &upstream.wait_for_messages(1, WAIT)[0];
    assert_eq!(
        reply.text(),
        format!("2.6.0 accepted as <{}>", message.queue_id)
    );
}

#[test]
fn upstream_advertises_default_capabilities() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let mut client = SmtpClient::connect(&upstream.address());
    assert_eq!(client.greeting().text(), "upstream.test ESMTP recorder");
    let reply = client.cmd("EHLO client.example", 250);
    let mut expected = vec!["upstream.test".to_string()];
    expected.extend(DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()));
    assert_eq!(reply.lines, expected);

    let sent = &upstream.connection_transcripts()[0].sent;
    let ehlo_reply: &[u8] = b"250-upstream.test\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES\r\n";
    assert!(sent.ends_with(ehlo_reply), "sent: {}", sent.escape_ascii());
}

#[test]
fn upstream_advertises_custom_capabilities() {
    let upstream = Upstream::start(
        UpstreamOptions::default()
            .hostname("smarthost.test")
            .capabilities(&["SIZE 1000"]),
    );
    let mut client = SmtpClient::connect(&upstream.address());
    let reply = client.cmd("EHLO client.example", 250);
    assert_eq!(reply.lines, ["smarthost.test", "SIZE 1000"]);
    client.cmd("MAIL FROM:<alice@example.org> SIZE=1001", 552);

    let bare = Upstream::start(UpstreamOptions::default().capabilities(&[]));
    let mut client = SmtpClient::connect(&bare.address());
    let reply = client.cmd("EHLO client.example", 250);
    assert_eq!(reply.lines, ["upstream.test"]);
    let helo = client.cmd("HELO client.example", 250);
    assert_eq!(helo.lines, ["upstream.test"]);
}

#[test]
fn upstream_replies_to_pipelined_commands() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let mut client = SmtpClient::connect(&upstream.address());
    client.send_raw(
        b"EHLO client.example\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.net>\r\nRCPT TO:<carol@example.net>\r\nDATA\r\n",
    );
    for code in [250, 250, 250, 250, 354] {
        client.expect_reply(code);
    }
    client.send_raw(b"pipelined\r\n.\r\nQUIT\r\n");
    client.expect_reply(250);
    client.expect_reply(221);

    let message = &upstream.wait_for_messages(1, WAIT)[0];
    assert_eq!(message.content, b"pipelined\r\n");
    assert_eq!(
        message.accepted_rcpts,
        ["bob@example.net", "carol@example.net"]
    );
}

#[test]
fn upstream_closes_at_each_point() {
    // (close point, commands that get a reply before the close)
    let cases: [(ClosePoint, &[&str]); 5] = [
        (ClosePoint::Ehlo, &[]),
        (ClosePoint::Mail, &["EHLO client.example"]),
        (
            ClosePoint::Rcpt,
            &["EHLO client.example", "MAIL FROM:<alice@example.org>"],
        ),
        (
            ClosePoint::Data,
            &[
                "EHLO client.example",
                "MAIL FROM:<alice@example.org>",
                "RCPT TO:<bob@example.net>",
            ],
        ),
        (
            ClosePoint::AfterData,
            &[
                "EHLO client.example",
                "MAIL FROM:<alice@example.org>",
                "RCPT TO:<bob@example.net>",
            ],
        ),
    ];
    for (point, answered) in cases {
        let upstream = Upstream::start(UpstreamOptions::default().close_at(point));
        let mut client = SmtpClient::connect(&upstream.address());
        for command in answered {
            client.cmd(command, 250);
        }
        match point {
            ClosePoint::Ehlo => client.send_line("EHLO client.example"),
            ClosePoint::Mail => client.send_line("MAIL FROM:<alice@example.org>"),
            ClosePoint::Rcpt => client.send_line("RCPT TO:<bob@example.net>"),
            ClosePoint::Data => client.send_line("DATA"),
            ClosePoint::AfterData => {
                client.cmd("DATA", 354);
                client.send_raw(b"content\r\n.\r\n");
            }
            ClosePoint::Connect => unreachable!(),
        }
        assert_eq!(client.expect_closed(), None, "close point {point:?}");
        assert!(upstream.messages().is_empty(), "close point {point:?}");
    }
}

#[test]
fn upstream_records_content_before_close() {
    let upstream = Upstream::start(UpstreamOptions::default().close_at(ClosePoint::AfterData));
    let mut client = start_session(&upstream);
    send_raw_payload(&mut client, b"content\r\n.\r\n");
    client.expect_closed();

    let transactions = upstream.wait_for_transactions(1, WAIT);
    assert_eq!(transactions[0].content, b"content\r\n");
    assert_eq!(transactions[0].data_reply, None);
    assert!(upstream.messages().is_empty());
}

#[test]
fn upstream_closes_before_greeting() {
    let upstream = Upstream::start(UpstreamOptions::default().close_at(ClosePoint::Connect));
    let mut client = SmtpClient::connect_without_greeting(&upstream.address());
    assert_eq!(client.expect_closed(), None);
    assert_eq!(upstream.connections(), 1);
}

#[test]
fn upstream_closes_first_connections_only() {
    let upstream = Upstream::start(UpstreamOptions::default().close_at_first(ClosePoint::Mail, 1));
    let mut first = start_session(&upstream);
    first.send_line("MAIL FROM:<alice@example.org>");
    first.expect_closed();

    let mut second = start_session(&upstream);
    let reply = second.send_message("alice@example.org", &["bob@example.net"], b"retry\r\n");
    assert_eq!(reply.code, 250);
    assert_eq!(upstream.connections(), 2);
    assert_eq!(upstream.wait_for_messages(1, WAIT)[0].connection, 2);
}

#[test]
fn upstream_service_unavailable_greeting() {
    let upstream =
        Upstream::start(UpstreamOptions::default().greeting("421 4.3.2 service shutting down"));
    let mut client = SmtpClient::connect(&upstream.address());
    client.expect_greeting(421);
    client.expect_closed();

    let no_service =
        Upstream::start(UpstreamOptions::default().greeting("554 5.3.2 no service here"));
    let mut client = SmtpClient::connect(&no_service.address());
    client.expect_greeting(554);
    client.cmd("EHLO client.example", 503);
    client.quit();
}

#[test]
fn upstream_delays_replies() {
    let delay = Duration::from_millis(300);
    let upstream = Upstream::start(UpstreamOptions::default().data_reply_delay(delay));
    let mut client = start_session(&upstream);
    client.cmd("MAIL FROM:<alice@example.org>", 250);
    client.cmd("RCPT TO:<bob@example.net>", 250);
    client.cmd("DATA", 354);
    let started = Instant::now();
    client.send_raw(&data_payload(b"slow\r\n"));
    client.expect_reply(250);
    assert!(
        started.elapsed() >= delay,
        "elapsed {:?}",
        started.elapsed()
    );

    let slow = Upstream::start(UpstreamOptions::default().reply_delay(delay));
    let started = Instant::now();
    SmtpClient::connect(&slow.address()).expect_greeting(220);
    assert!(
        started.elapsed() >= delay,
        "elapsed {:?}",
        started.elapsed()
    );
}

#[test]
fn upstream_records_concurrent_connections() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let address = upstream.address();
    let senders: Vec<_> = (0..4)
        .map(|index| {
            let address = address.clone();
            thread::spawn(move || {
                let mut client = SmtpClient::connect(&address);
                client.cmd("EHLO client.example", 250);
                let content = format!("message {index}\r\n");
                let reply = client.send_message(
                    &format!("sender{index}@example.org"),
                    &["bob@example.net"],
                    content.as_bytes(),
                );
                assert_eq!(reply.code, 250);
                client.quit();
            })
        })
        .collect();
    for sender in senders {
        sender.join().unwrap();
    }

    let messages = upstream.wait_for_messages(4, WAIT);
    assert_eq!(upstream.connections(), 4);
    let mut contents: Vec<Vec<u8>> = messages.iter().map(|m| m.content.clone()).collect();
    contents.sort();
    let expected: Vec<Vec<u8>> = (0..4)
        .map(|i| format!("message {i}\r\n").into_bytes())
        .collect();
    assert_eq!(contents, expected);
}

#[test]
fn upstream_stop_refuses_connections() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let mut open = start_session(&upstream);
    upstream.stop();
    open.expect_closed();
    assert!(std::net::TcpStream::connect(upstream.address()).is_err());
    upstream.stop();

    let silent = Upstream::start(UpstreamOptions::default().no_listen());
    assert!(std::net::TcpStream::connect(silent.address()).is_err());
    assert!(std::net::TcpStream::connect(closed_address()).is_err());
}

#[test]
#[should_panic(expected = "timed out")]
fn upstream_wait_panics_on_timeout() {
    let upstream = Upstream::start(UpstreamOptions::default());
    upstream.wait_for_messages(1, Duration::from_millis(100));
}

#[test]
fn stuff_adds_dot_at_line_starts() {
    assert_eq!(stuff(b".\r\n"), b"..\r\n");
    assert_eq!(stuff(b"a\r\n.b\r\n..c\r\n"), b"a\r\n..b\r\n...c\r\n");
    assert_eq!(stuff(b"a.b\r\n"), b"a.b\r\n");
    assert_eq!(
        stuff(b"a\n.b\r\n"),
        b"a\n.b\r\n",
        "a dot after a bare LF is not at a line start"
    );
    assert_eq!(stuff(b""), b"");
}

#[test]
fn data_payload_terminates_content() {
    assert_eq!(data_payload(b"a\r\n"), b"a\r\n.\r\n");
    assert_eq!(data_payload(b"a"), b"a\r\n.\r\n");
    assert_eq!(data_payload(b".\r\n"), b"..\r\n.\r\n");
    assert_eq!(data_payload(b""), b".\r\n");
}

#[test]
fn smtp_client_connects_from_local_address() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let mut client = SmtpClient::connect_from(&upstream.address(), "127.0.0.2");
    client.expect_greeting(220);
    client.quit();

    let connections = upstream.connection_transcripts();
    assert!(
        connections[0].peer_address.starts_with("127.0.0.2:"),
        "peer address {}",
        connections[0].peer_address
    );
}

#[test]
fn smtp_client_rejects_malformed_replies() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let server = thread::spawn(move || {
        use std::io::Write;
        let (mut stream, _) = listener.accept().unwrap();
        stream.write_all(b"220 bare line feed\n").unwrap();
    });
    let mut client = SmtpClient::connect_without_greeting(&address);
    let error = client.try_read_reply().unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
    assert!(error.to_string().contains("bare LF"), "{error}");
    server.join().unwrap();
}

/// Postfix's smtp-source sends HELO, one transaction per message and the
/// file given with -F, with LF turned into CRLF, leading dots stuffed and,
/// in Postfix 3.7, one empty line added before the terminator.
#[test]
fn upstream_records_postfix_smtp_source() {
    let smtp_source = Path::new("/usr/sbin/smtp-source");
    assert!(
        smtp_source.exists(),
        "{} is missing: install the postfix package (scripts/install-deps.sh does)",
        smtp_source.display()
    );

    let upstream = Upstream::start(UpstreamOptions::default());
    let directory = tempfile::tempdir().unwrap();
    let message_file = directory.path().join("message.txt");
    std::fs::write(
        &message_file,
        b".\n..two\nSubject: test\n\nLatin-1 \xe9\xff\n.x\nlast\n",
    )
    .unwrap();

    let output = Command::new(smtp_source)
        .args(["-d", "-m", "3", "-r", "2", "-M", "client.example"])
        .args(["-f", "sender@example.org", "-t", "rcpt@example.net"])
        .arg("-F")
        .arg(&message_file)
        .arg(upstream.address())
        .output()
        .expect("failed to run smtp-source");
    assert!(
        output.status.success(),
        "smtp-source failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );

    let messages = upstream.wait_for_messages(3, WAIT);
    assert_eq!(messages.len(), 3);
    for message in &messages {
        assert_eq!(
            message.content,
            b".\r\n..two\r\nSubject: test\r\n\r\nLatin-1 \xe9\xff\r\n.x\r\nlast\r\n\r\n"
        );
        assert_eq!(message.helo_line, "HELO client.example");
        assert_eq!(message.mail_line, "MAIL FROM:<sender@example.org>");
        assert_eq!(message.rcpt_lines.len(), 2);
        assert_eq!(message.accepted_rcpts.len(), 2);
        assert!(
            message
                .rcpt_lines
                .iter()
                .all(|line| line.starts_with("RCPT TO:<") && line.ends_with("rcpt@example.net>"))
        );
        assert_eq!(
            message.connection, 1,
            "-d sends every message on one connection"
        );
        assert!(!message.bare_line_ending);
    }
    assert_eq!(upstream.connections(), 1);
    assert!(!upstream.saw_bare_line_ending());
}

const USERNAME: &str = "relay@example.org";
const PASSWORD: &str = "s3cret pass";

/// Starts an upstream that offers STARTTLS with a certificate from `pki` for
/// `upstream.test` and 127.0.0.1.
fn start_tls_upstream(pki: &TestPki, options: UpstreamOptions) -> Upstream {
    Upstream::start(options.starttls(pki.rustls_server_config("upstream.test")))
}

/// Connects, sends EHLO, STARTTLS and EHLO again inside TLS.
fn start_tls_session(upstream: &Upstream, pki: &TestPki) -> SmtpClient {
    let mut client = start_session(upstream);
    client.starttls(pki.rustls_client_config(), "upstream.test");
    client.cmd("EHLO client.example", 250);
    client
}

fn plain_response(authzid: &str, username: &str, password: &str) -> String {
    BASE64.encode(format!("{authzid}\0{username}\0{password}"))
}

#[test]
fn test_pki_writes_loadable_files() {
    let pki = TestPki::new();
    assert_eq!(
        std::fs::read_to_string(&pki.ca_file).unwrap(),
        pki.ca_cert_pem
    );
    assert!(pki.ca_file.starts_with(pki.dir.path()));

    let (cert_file, key_file) = pki.server_cert("upstream.test");
    let (second_cert_file, _) = pki.server_cert("upstream.test");
    assert_ne!(cert_file, second_cert_file, "each call writes new files");
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_file)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        chain.len(),
        2,
        "the chain file contains the leaf and the CA"
    );
    let ca = CertificateDer::from_pem_slice(pki.ca_cert_pem.as_bytes()).unwrap();
    assert_eq!(chain[1], ca);
    let key = PrivateKeyDer::from_pem_file(&key_file).unwrap();

    // Serve the files the way a server that reads them would, and verify
    // the leaf both by DNS name and by IP address.
    let config = ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let upstream =
        Upstream::start(UpstreamOptions::default().starttls(std::sync::Arc::new(config)));
    for server_name in ["upstream.test", "127.0.0.1"] {
        let mut client = start_session(&upstream);
        client.starttls(pki.rustls_client_config(), server_name);
        assert!(client.is_tls(), "server name {server_name}");
        client.cmd("EHLO client.example", 250);
        client.quit();
    }
}

#[test]
fn test_pki_rejects_other_ca() {
    let trusted = TestPki::new();
    let other = TestPki::new();
    assert_ne!(trusted.ca_cert_pem, other.ca_cert_pem);
    let upstream = start_tls_upstream(&other, UpstreamOptions::default());

    let mut client = start_session(&upstream);
    let error = client
        .try_starttls(trusted.rustls_client_config(), "upstream.test")
        .unwrap_err();
    assert!(
        matches!(
            error.rustls_error(),
            Some(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        ),
        "error: {error}"
    );
    assert!(!client.is_tls());

    // The recorder records its side of the failed handshake.
    let errors = upstream.wait_for_tls_handshake_errors(1, WAIT);
    assert_eq!(errors.len(), 1, "errors: {errors:?}");
    assert!(
        errors[0].starts_with("connection 1: "),
        "errors: {errors:?}"
    );
    assert!(upstream.transactions().is_empty());
}

#[test]
fn test_pki_rejects_wrong_name() {
    let pki = TestPki::new();
    let upstream = Upstream::start(
        UpstreamOptions::default().starttls(pki.rustls_server_config_for(&["other.test"])),
    );
    for server_name in ["upstream.test", "127.0.0.1"] {
        let mut client = start_session(&upstream);
        let error = client
            .try_starttls(pki.rustls_client_config(), server_name)
            .unwrap_err();
        assert!(
            matches!(
                error.rustls_error(),
                Some(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForNameContext { .. }
                ))
            ),
            "server name {server_name}: {error}"
        );
    }
}

#[test]
fn smtp_client_starttls_to_upstream() {
    let pki = TestPki::new();
    let upstream = start_tls_upstream(&pki, UpstreamOptions::default());
    let mut client = start_session(&upstream);

    let plain = client.send_message("alice@example.org", &["bob@example.net"], b"plain\r\n");
    assert_eq!(plain.code, 250);
    let ehlo = client.cmd("EHLO client.example", 250);
    assert_eq!(ehlo.lines.last().map(String::as_str), Some("STARTTLS"));

    client.starttls(pki.rustls_client_config(), "upstream.test");
    assert!(client.is_tls());
    let version = client.tls_connection().unwrap().protocol_version();
    assert_eq!(version, Some(rustls::ProtocolVersion::TLSv1_3));
    assert!(
        client
            .transcript()
            .contains("-- TLS established with upstream.test")
    );

    let ehlo = client.cmd("EHLO tls.client.example", 250);
    assert!(!ehlo.contains("STARTTLS"), "EHLO reply inside TLS: {ehlo}");
    let secure = client.send_message("alice@example.org", &["bob@example.net"], b"secure\r\n");
    assert_eq!(secure.code, 250);
    client.quit();
    assert_eq!(client.expect_closed(), None);

    let messages = upstream.wait_for_messages(2, WAIT);
    assert_eq!(messages[0].content, b"plain\r\n");
    assert!(!messages[0].tls);
    assert_eq!(messages[1].content, b"secure\r\n");
    assert!(messages[1].tls);
    assert_eq!(messages[1].helo_line, "EHLO tls.client.example");
    assert_eq!(messages[1].auth_user, None);

    let transcript = &upstream.connection_transcripts()[0];
    assert!(transcript.plaintext_received().ends_with(b"STARTTLS\r\n"));
    assert!(
        transcript
            .plaintext_sent()
            .ends_with(b"220 2.0.0 Ready to start TLS\r\n")
    );
    let after_tls = &transcript.received[transcript.received_before_tls.unwrap()..];
    assert!(after_tls.starts_with(b"EHLO tls.client.example\r\n"));
    assert!(!upstream.saw_plaintext_after_starttls());
    assert!(client.discarded_before_tls().is_empty());
}

#[test]
fn upstream_resets_session_after_starttls() {
    let pki = TestPki::new();
    let upstream = start_tls_upstream(&pki, UpstreamOptions::default());
    let mut client = start_session(&upstream);
    client.cmd("MAIL FROM:<alice@example.org>", 250);
    client.starttls_expect(503);
    client.cmd("RSET", 250);
    client.cmd("STARTTLS now", 501);

    client.starttls(pki.rustls_client_config(), "upstream.test");
    client.cmd("MAIL FROM:<alice@example.org>", 503);
    client.cmd("EHLO client.example", 250);
    client.starttls_expect(554);
    client.cmd("MAIL FROM:<alice@example.org>", 250);
    client.quit();
}

#[test]
fn upstream_starttls_not_offered_by_default() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let mut client = SmtpClient::connect(&upstream.address());
    let ehlo = client.cmd("EHLO client.example", 250);
    assert!(!ehlo.contains("STARTTLS"), "EHLO reply: {ehlo}");
    let reply = client.starttls_expect(454);
    assert_eq!(reply.enhanced_code(), Some("4.7.0"));

    let pki = TestPki::new();
    let error = client
        .try_starttls(pki.rustls_client_config(), "upstream.test")
        .unwrap_err();
    assert!(
        matches!(&error, StartTlsError::Rejected(reply) if reply.code == 454),
        "error: {error}"
    );
    // A rejected STARTTLS leaves the plaintext session usable.
    assert!(!client.is_tls());
    client.quit();
}

#[test]
fn upstream_flags_plaintext_after_starttls() {
    let pki = TestPki::new();
    let upstream = start_tls_upstream(&pki, UpstreamOptions::default());
    let mut client = start_session(&upstream);
    client.send_raw_then_starttls(
        b"MAIL FROM:<injected@example.org>\r\n",
        pki.rustls_client_config(),
        "upstream.test",
    );
    // The recorder sends no reply to the pipelined MAIL, in plaintext or
    // inside TLS, so the next reply belongs to EHLO.
    assert!(client.discarded_before_tls().is_empty());
    let ehlo = client.cmd("EHLO client.example", 250);
    assert_eq!(ehlo.lines[0], "upstream.test");
    // A MAIL executed inside TLS would make this a nested MAIL (503).
    let reply = client.send_message("alice@example.org", &["bob@example.net"], b"after\r\n");
    assert_eq!(reply.code, 250);
    client.quit();

    assert!(upstream.saw_plaintext_after_starttls());
    let messages = upstream.wait_for_messages(1, WAIT);
    assert_eq!(messages[0].mail_line, "MAIL FROM:<alice@example.org>");
    let transcript = &upstream.connection_transcripts()[0];
    assert!(
        transcript
            .plaintext_received()
            .ends_with(b"STARTTLS\r\nMAIL FROM:<injected@example.org>\r\n"),
        "plaintext received: {}",
        transcript.plaintext_received().escape_ascii()
    );
}

#[test]
fn smtp_client_discards_bytes_after_220() {
    let pki = TestPki::new();
    let upstream = start_tls_upstream(
        &pki,
        UpstreamOptions::default().inject_after_starttls(b"250 fake reply\r\n"),
    );
    let mut client = start_session(&upstream);
    client.starttls(pki.rustls_client_config(), "upstream.test");
    assert_eq!(client.discarded_before_tls(), b"250 fake reply\r\n");
    assert!(
        client
            .transcript()
            .contains("S (discarded before TLS): 250 fake reply"),
        "transcript:\n{}",
        client.transcript()
    );

    let ehlo = client.cmd("EHLO client.example", 250);
    assert_eq!(ehlo.lines[0], "upstream.test");
    client.quit();

    let transcript = &upstream.connection_transcripts()[0];
    assert!(
        transcript
            .plaintext_sent()
            .ends_with(b"220 2.0.0 Ready to start TLS\r\n250 fake reply\r\n")
    );
}

#[test]
fn upstream_auth_plain_accepts_credentials() {
    let upstream = Upstream::start(UpstreamOptions::default().auth(USERNAME, PASSWORD));
    let mut client = SmtpClient::connect(&upstream.address());
    let ehlo = client.cmd("EHLO client.example", 250);
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "EHLO reply: {ehlo}");
    let rejected = client.cmd("MAIL FROM:<alice@example.org>", 530);
    assert_eq!(rejected.enhanced_code(), Some("5.7.0"));

    let response = plain_response("", USERNAME, PASSWORD);
    let reply = client.cmd(&format!("AUTH PLAIN {response}"), 235);
    assert_eq!(reply.text(), "2.7.0 Authentication successful");
    client.cmd("AUTH PLAIN", 503);
    let sent = client.send_message("alice@example.org", &["bob@example.net"], b"hi\r\n");
    assert_eq!(sent.code, 250);
    client.quit();

    // Without an initial response, and with the user name as authzid.
    let mut client = start_session(&upstream);
    let challenge = client.cmd("AUTH PLAIN", 334);
    assert_eq!(challenge.lines, [""]);
    client.cmd(&plain_response(USERNAME, USERNAME, PASSWORD), 235);
    let sent = client.send_message("alice@example.org", &["bob@example.net"], b"hi\r\n");
    assert_eq!(sent.code, 250);
    client.quit();

    let messages = upstream.wait_for_messages(2, WAIT);
    for message in &messages {
        assert_eq!(message.auth_user.as_deref(), Some(USERNAME));
        assert!(!message.tls);
    }
    assert_eq!(upstream.auth_failures(), 0);
}

#[test]
fn upstream_auth_plain_rejects_wrong_credentials() {
    let upstream = Upstream::start(UpstreamOptions::default().auth(USERNAME, PASSWORD));
    let wrong = [
        plain_response("", USERNAME, "wrong"),
        plain_response("", "mallory@example.org", PASSWORD),
        plain_response("someone-else", USERNAME, PASSWORD),
        BASE64.encode(format!("{USERNAME}\0{PASSWORD}")),
    ];
    let mut client = start_session(&upstream);
    for (index, response) in wrong.iter().enumerate() {
        let reply = client.cmd(&format!("AUTH PLAIN {response}"), 535);
        assert_eq!(reply.text(), "5.7.8 Error: authentication failed");
        assert_eq!(upstream.auth_failures(), index + 1);
    }
    client.cmd("MAIL FROM:<alice@example.org>", 530);

    client.cmd("AUTH PLAIN", 334);
    let reply = client.cmd(&plain_response("", USERNAME, "wrong"), 535);
    assert_eq!(reply.enhanced_code(), Some("5.7.8"));
    assert_eq!(upstream.auth_failures(), wrong.len() + 1);
    client.quit();
    assert!(upstream.transactions().is_empty());
}

#[test]
fn upstream_auth_login_dialogue() {
    let upstream = Upstream::start(UpstreamOptions::default().auth(USERNAME, PASSWORD));
    let mut client = start_session(&upstream);
    let username_prompt = client.cmd("AUTH LOGIN", 334);
    assert_eq!(username_prompt.lines, ["VXNlcm5hbWU6"]);
    let password_prompt = client.cmd(&BASE64.encode(USERNAME), 334);
    assert_eq!(password_prompt.lines, ["UGFzc3dvcmQ6"]);
    client.cmd(&BASE64.encode("wrong"), 535);
    assert_eq!(upstream.auth_failures(), 1);

    client.cmd("AUTH LOGIN", 334);
    client.cmd(&BASE64.encode(USERNAME), 334);
    client.cmd(&BASE64.encode(PASSWORD), 235);
    let sent = client.send_message("alice@example.org", &["bob@example.net"], b"hi\r\n");
    assert_eq!(sent.code, 250);
    client.quit();

    // The user name as initial response skips the first prompt.
    let mut client = start_session(&upstream);
    let prompt = client.cmd(&format!("AUTH LOGIN {}", BASE64.encode(USERNAME)), 334);
    assert_eq!(prompt.lines, ["UGFzc3dvcmQ6"]);
    client.cmd(&BASE64.encode(PASSWORD), 235);
    client.quit();

    let messages = upstream.wait_for_messages(1, WAIT);
    assert_eq!(messages[0].auth_user.as_deref(), Some(USERNAME));
    assert_eq!(upstream.auth_failures(), 1);
}

#[test]
fn upstream_auth_rejects_malformed_requests() {
    let upstream = Upstream::start(UpstreamOptions::default().auth(USERNAME, PASSWORD));
    let mut client = SmtpClient::connect(&upstream.address());
    client.cmd("AUTH PLAIN", 503);
    client.cmd("EHLO client.example", 250);
    client.cmd("AUTH CRAM-MD5", 504);
    client.cmd("AUTH", 501);
    client.cmd("AUTH PLAIN one two", 501);
    client.cmd("AUTH PLAIN not*base64", 501);
    client.cmd("AUTH LOGIN", 334);
    let aborted = client.cmd("*", 501);
    assert_eq!(aborted.text(), "5.7.0 Authentication aborted");
    client.cmd("AUTH PLAIN =", 535);
    assert_eq!(upstream.auth_failures(), 1);
    client.quit();

    // Without `auth`, AUTH is an unknown command as before.
    let plain = Upstream::start(UpstreamOptions::default());
    let mut client = start_session(&plain);
    client.cmd(
        &format!("AUTH PLAIN {}", plain_response("", USERNAME, PASSWORD)),
        502,
    );
    client.cmd("MAIL FROM:<alice@example.org>", 250);
    client.quit();
}

#[test]
fn upstream_auth_requires_tls() {
    let pki = TestPki::new();
    let upstream = start_tls_upstream(
        &pki,
        UpstreamOptions::default()
            .auth(USERNAME, PASSWORD)
            .auth_requires_tls(),
    );
    let mut client = start_session(&upstream);
    let ehlo = client.cmd("EHLO client.example", 250);
    assert!(!ehlo.contains("AUTH"), "EHLO reply before TLS: {ehlo}");
    let reply = client.cmd(
        &format!("AUTH PLAIN {}", plain_response("", USERNAME, PASSWORD)),
        538,
    );
    assert_eq!(reply.enhanced_code(), Some("5.7.11"));
    client.cmd("MAIL FROM:<alice@example.org>", 530);

    client.starttls(pki.rustls_client_config(), "upstream.test");
    let ehlo = client.cmd("EHLO client.example", 250);
    assert!(
        ehlo.contains("AUTH PLAIN LOGIN"),
        "EHLO reply inside TLS: {ehlo}"
    );
    client.cmd(
        &format!("AUTH PLAIN {}", plain_response("", USERNAME, PASSWORD)),
        235,
    );
    let sent = client.send_message("alice@example.org", &["bob@example.net"], b"hi\r\n");
    assert_eq!(sent.code, 250);
    client.quit();

    let messages = upstream.wait_for_messages(1, WAIT);
    assert!(messages[0].tls);
    assert_eq!(messages[0].auth_user.as_deref(), Some(USERNAME));
    assert_eq!(upstream.auth_failures(), 0);
}

#[test]
fn upstream_forgets_auth_after_starttls() {
    let pki = TestPki::new();
    let upstream = start_tls_upstream(&pki, UpstreamOptions::default().auth(USERNAME, PASSWORD));
    let mut client = start_session(&upstream);
    client.cmd(
        &format!("AUTH PLAIN {}", plain_response("", USERNAME, PASSWORD)),
        235,
    );
    client.starttls(pki.rustls_client_config(), "upstream.test");
    client.cmd("EHLO client.example", 250);
    client.cmd("MAIL FROM:<alice@example.org>", 530);
    client.quit();
}

#[test]
fn upstream_require_tls_rejects_plain_mail() {
    let pki = TestPki::new();
    let upstream = start_tls_upstream(&pki, UpstreamOptions::default().require_tls());
    let mut client = start_session(&upstream);
    let reply = client.cmd("MAIL FROM:<alice@example.org>", 530);
    assert_eq!(reply.text(), "5.7.0 Must issue a STARTTLS command first");
    client.quit();

    let mut client = start_tls_session(&upstream, &pki);
    let sent = client.send_message("alice@example.org", &["bob@example.net"], b"hi\r\n");
    assert_eq!(sent.code, 250);
    client.quit();
    assert!(upstream.wait_for_messages(1, WAIT)[0].tls);
}

/// swaks, an SMTP client built on OpenSSL, checks the recorder's STARTTLS
/// and AUTH against an implementation other than rustls and this harness.
#[test]
fn upstream_records_swaks_tls_auth() {
    let swaks = Path::new("/usr/bin/swaks");
    assert!(
        swaks.exists(),
        "{} is missing: install the swaks package (scripts/install-deps.sh does)",
        swaks.display()
    );
    let pki = TestPki::new();
    let upstream = start_tls_upstream(
        &pki,
        UpstreamOptions::default()
            .auth(USERNAME, PASSWORD)
            .auth_requires_tls(),
    );
    let port = upstream.address().rsplit(':').next().unwrap().to_string();

    for mechanism in ["PLAIN", "LOGIN"] {
        let output = Command::new(swaks)
            .args(["--server", "127.0.0.1", "--port", &port])
            .args(["--helo", "swaks.example", "--timeout", "10"])
            .args(["--from", "alice@example.org", "--to", "bob@example.net"])
            .args(["--tls", "--tls-verify", "--tls-ca-path"])
            .arg(&pki.ca_file)
            .args(["--auth", mechanism, "--auth-user", USERNAME])
            .args(["--auth-password", PASSWORD])
            .args(["--body", "swaks body"])
            .output()
            .expect("failed to run swaks");
        assert!(
            output.status.success(),
            "swaks with AUTH {mechanism} failed with {}:\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let messages = upstream.wait_for_messages(2, WAIT);
    for message in &messages {
        assert!(message.tls);
        assert_eq!(message.auth_user.as_deref(), Some(USERNAME));
        assert_eq!(message.helo_line, "EHLO swaks.example");
        assert_eq!(message.mail_line, "MAIL FROM:<alice@example.org>");
        assert!(
            message
                .content
                .windows(b"\r\n\r\nswaks body\r\n".len())
                .any(|window| window == b"\r\n\r\nswaks body\r\n"),
            "content: {}",
            message.content.escape_ascii()
        );
    }
    assert_eq!(upstream.auth_failures(), 0);
    assert!(!upstream.saw_plaintext_after_starttls());
    assert!(upstream.tls_handshake_errors().is_empty());
}

#[test]
fn busy_listener_port_replaced() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let busy = holder.local_addr().expect("address").to_string();
    let files = tempfile::tempdir().expect("temporary directory");
    let token = files.path().join("admin.token");
    std::fs::write(&token, "token-for-the-harness-test-0123456789\n").expect("write token");
    let server = common::sendguard::Sendguard::start(
        &common::closed_address(),
        &format!(
            "[admin]\nlisten = \"{busy}\"\ntoken_file = \"{}\"\n",
            token.display()
        ),
    );
    let moved = server.listen_address("admin");
    assert_ne!(moved, busy);
    assert!(server.log().contains("Address already in use"));
    assert!(std::net::TcpStream::connect(&moved).is_ok());
}
