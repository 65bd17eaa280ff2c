//! sendguard behind a real Postfix as `smtpd_proxy_filter` (before the
//! queue) and as `content_filter` (after the queue), and XCLIENT from a
//! submission proxy.

mod common;

use common::postfix::Postfix;
use common::sendguard::Sendguard;
use common::smtp_client::SmtpClient;
use common::upstream::{Upstream, UpstreamOptions};
use std::time::Duration;

const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

fn spam() -> Vec<u8> {
    format!("Subject: offer\r\n\r\n{GTUBE}\r\n").into_bytes()
}

/// Starts sendguard on a port chosen first, so Postfix can be configured
/// with it, trusting loopback peers for XFORWARD.
fn sendguard_for_postfix(upstream: &str, policy: &str) -> Sendguard {
    Sendguard::start_with(upstream, "xclient_peers = [\"127.0.0.1/32\"]", policy)
}

#[test]
fn proxy_filter_lockout_reaches_client_at_rcpt() {
    let sink = Upstream::start(UpstreamOptions::default());
    let server = sendguard_for_postfix(
        &sink.address(),
        "[policy]\nthreshold = 2\nfirst_lockout = \"1h\"\n",
    );
    let postfix = Postfix::start(
        &sink.address(),
        &format!(
            "smtpd_proxy_filter = {}\nsmtpd_proxy_timeout = 30s\n",
            server.address
        ),
    );

    // The real client connects from 127.0.0.2; Postfix passes that on by
    // XFORWARD, so it is the client in sendguard's events.
    for _ in 0..2 {
        let mut client = SmtpClient::connect_from(&postfix.address, "127.0.0.2");
        client.cmd("EHLO client.test", 250);
        let reply = client.send_message("mallory@example.org", &["bob@example.net"], &spam());
        assert_eq!(reply.code, 550, "{}\n{}", reply.text(), postfix.log());
        assert!(reply.text().contains("spam"), "{}", reply.text());
        client.quit();
    }

    // Postfix opens the filter connection only at the first RCPT, so the
    // lockout's 550 arrives as the reply to RCPT, with sendguard's text.
    let mut client = SmtpClient::connect_from(&postfix.address, "127.0.0.2");
    client.cmd("EHLO client.test", 250);
    client.cmd("MAIL FROM:<mallory@example.org>", 250);
    let reply = client.command("RCPT TO:<bob@example.net>");
    assert_eq!(reply.code / 100, 5, "{}", reply.text());
    assert!(reply.text().contains("locked out"), "{}", reply.text());
    client.quit();

    let bad = server.events_of("bad_message");
    assert_eq!(bad.len(), 2);
    assert_eq!(
        bad[0]["client"], "127.0.0.2",
        "the client address came by XFORWARD"
    );
    assert_eq!(server.events_of("lockout_started").len(), 1);
    assert!(sink.messages().is_empty());
}

#[test]
fn proxy_filter_relays_clean_mail() {
    let sink = Upstream::start(UpstreamOptions::default());
    let server = sendguard_for_postfix(&sink.address(), "");
    let postfix = Postfix::start(
        &sink.address(),
        &format!("smtpd_proxy_filter = {}\n", server.address),
    );
    let mut client = SmtpClient::connect(&postfix.address);
    client.cmd("EHLO client.test", 250);
    let reply = client.send_message(
        "alice@example.org",
        &["bob@example.net"],
        b"Subject: hi\r\n\r\nLunch?\r\n",
    );
    assert_eq!(reply.code, 250, "{}", reply.text());
    client.quit();
    let messages = sink.wait_for_messages(1, Duration::from_secs(30));
    assert!(String::from_utf8_lossy(&messages[0].content).contains("Lunch?"));
}

#[test]
fn content_filter_bounces_and_still_locks_out() {
    let sink = Upstream::start(UpstreamOptions::default());
    let server = sendguard_for_postfix(
        &sink.address(),
        "[policy]\nthreshold = 2\nfirst_lockout = \"1h\"\n",
    );
    let (host, port) = server.address.rsplit_once(':').expect("host:port");
    let postfix = Postfix::start(
        &sink.address(),
        &format!("content_filter = smtp:[{host}]:{port}\nsmtp_send_xforward_command = yes\n"),
    );
    // After the queue Postfix has already said 250, so sendguard's
    // rejections turn into bounces to the sender.
    for _ in 0..2 {
        let mut client = SmtpClient::connect_from(&postfix.address, "127.0.0.2");
        client.cmd("EHLO client.test", 250);
        let reply = client.send_message("mallory@example.org", &["bob@example.net"], &spam());
        assert_eq!(reply.code, 250, "{}", reply.text());
        client.quit();
    }
    let events = server.wait_for_events(Duration::from_secs(60), |events| {
        events
            .iter()
            .any(|event| event["type"] == "lockout_started")
    });
    let bad: Vec<_> = events
        .iter()
        .filter(|event| event["type"] == "bad_message")
        .collect();
    assert_eq!(
        bad[0]["client"], "127.0.0.2",
        "the client address came by XFORWARD"
    );

    // The bounces reach the sender's side through the sink, from <>.
    let bounces = sink.wait_for_messages(2, Duration::from_secs(60));
    for bounce in &bounces {
        assert!(
            bounce.mail_line.starts_with("MAIL FROM:<> "),
            "{}",
            bounce.mail_line
        );
        assert!(String::from_utf8_lossy(&bounce.content).contains("mallory@example.org"));
    }

    // The lockout holds: the next message bounces too, refused at MAIL.
    let mut client = SmtpClient::connect_from(&postfix.address, "127.0.0.2");
    client.cmd("EHLO client.test", 250);
    client.send_message(
        "mallory@example.org",
        &["bob@example.net"],
        b"Subject: hi\r\n\r\nclean now\r\n",
    );
    client.quit();
    server.wait_for_events(Duration::from_secs(60), |events| {
        events.iter().any(|event| event["type"] == "sender_refused")
    });
}

#[test]
fn xclient_login_keys_the_mailbox() {
    let sink = Upstream::start(UpstreamOptions::default());
    let directory = tempfile::NamedTempFile::new().expect("temporary file");
    std::fs::write(
        directory.path(),
        "[[mailbox]]\naddress = \"alice@example.org\"\nlogins = [\"alice\"]\n",
    )
    .expect("write directory");
    let policy = format!(
        "[policy]\nthreshold = 1\nfirst_lockout = \"1h\"\n[directory]\npath = \"{}\"\n",
        directory.path().display()
    );
    let server = sendguard_for_postfix(&sink.address(), &policy);

    // A submission proxy on 127.0.0.1 says who logged in.
    let mut proxy = SmtpClient::connect(&server.address);
    let ehlo = proxy.cmd("EHLO proxy.test", 250);
    assert!(ehlo.contains("XCLIENT"), "{}", ehlo.text());
    proxy.cmd("XCLIENT ADDR=192.0.2.9 LOGIN=alice", 220);
    proxy.cmd("EHLO client.test", 250);
    let reply = proxy.send_message("anything@else.example", &["bob@example.net"], &spam());
    assert_eq!(reply.code, 550);
    // Whatever sender the user writes, the login's mailbox is locked out.
    let reply = proxy.command("MAIL FROM:<other@else.example>");
    assert_eq!(reply.code, 550, "{}", reply.text());
    assert!(
        reply.text().contains("alice@example.org"),
        "{}",
        reply.text()
    );
    proxy.quit();

    let started = server.events_of("lockout_started");
    assert_eq!(started[0]["mailbox"], "alice@example.org");
    assert_eq!(started[0]["login"], "alice");
    assert_eq!(started[0]["client"], "192.0.2.9");

    // A peer outside xclient_peers cannot claim a login.
    let mut stranger = SmtpClient::connect_from(&server.address, "127.0.0.2");
    let ehlo = stranger.cmd("EHLO stranger.test", 250);
    assert!(!ehlo.contains("XCLIENT"));
    stranger.cmd("XCLIENT LOGIN=bob", 550);
    stranger.quit();
}
