//! STARTTLS on both sides and AUTH to the upstream, through the real
//! binary, with a test CA made by the test.

mod common;

use common::sendguard::Sendguard;
use common::smtp_client::SmtpClient;
use common::tls::TestPki;
use common::upstream::{Upstream, UpstreamOptions};
use std::time::Duration;

const MESSAGE: &[u8] = b"Subject: over TLS\r\n\r\nhello\r\n";

/// `[smtp]` lines that give sendguard a certificate from `pki`.
fn listener_tls(pki: &TestPki, extra: &str) -> String {
    let (cert, key) = pki.server_cert("relay.test");
    format!(
        "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n{extra}",
        cert.display(),
        key.display()
    )
}

/// `[upstream]` settings appended to the config: sendguard's test config
/// already has an [upstream] table, so these go in by rewriting it.
fn with_upstream_settings(server: &Sendguard, settings: &str) {
    server
        .rewrite_config(|text| text.replace("[upstream]\n", &format!("[upstream]\n{settings}\n")));
    server.reload();
}

#[test]
fn client_starttls_then_relay() {
    let pki = TestPki::new();
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start_with(&upstream.address(), &listener_tls(&pki, ""), "");
    let mut client = SmtpClient::connect(&server.address);
    let ehlo = client.cmd("EHLO client.test", 250);
    assert!(ehlo.contains("STARTTLS"), "{}", ehlo.text());
    client.starttls(pki.rustls_client_config(), "relay.test");
    assert!(client.is_tls());
    let ehlo = client.cmd("EHLO client.test", 250);
    assert!(!ehlo.contains("STARTTLS"), "not offered again inside TLS");
    let reply = client.send_message("a@example.org", &["b@example.net"], MESSAGE);
    assert_eq!(reply.code, 250, "{}", reply.text());
    client.quit();
    let messages = upstream.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(messages[0].content, MESSAGE.to_vec());
}

#[test]
fn require_tls_refuses_plain_mail() {
    let pki = TestPki::new();
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start_with(
        &upstream.address(),
        &listener_tls(&pki, "require_tls = true"),
        "",
    );
    let mut client = SmtpClient::connect(&server.address);
    client.cmd("EHLO client.test", 250);
    let reply = client.cmd("MAIL FROM:<a@example.org>", 530);
    assert_eq!(reply.enhanced_code(), Some("5.7.0"));
    client.starttls(pki.rustls_client_config(), "relay.test");
    client.cmd("EHLO client.test", 250);
    client.cmd("MAIL FROM:<a@example.org>", 250);
    client.quit();
}

#[test]
fn plaintext_after_client_starttls_discarded() {
    let pki = TestPki::new();
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start_with(&upstream.address(), &listener_tls(&pki, ""), "");
    let mut client = SmtpClient::connect(&server.address);
    client.cmd("EHLO client.test", 250);
    client.send_raw_then_starttls(
        b"MAIL FROM:<injected@example.com>\r\nRCPT TO:<victim@example.net>\r\n",
        pki.rustls_client_config(),
        "relay.test",
    );
    // Nothing of the injected transaction exists inside TLS: the client
    // must say EHLO again, and RCPT has no MAIL to belong to.
    client.cmd("MAIL FROM:<a@example.org>", 503);
    client.cmd("EHLO client.test", 250);
    client.cmd("RCPT TO:<b@example.net>", 503);
    client.quit();
    assert!(!String::from_utf8_lossy(&upstream.transcript()).contains("injected"));
    assert!(server.log().contains("discarded"), "{}", server.log());
}

#[test]
fn upstream_tls_required_verified() {
    let pki = TestPki::new();
    let upstream = Upstream::start(
        UpstreamOptions::default().starttls(pki.rustls_server_config("smarthost.test")),
    );
    let server = Sendguard::start(&upstream.address(), "");
    with_upstream_settings(
        &server,
        &format!(
            "tls = \"required\"\nca_file = \"{}\"\ntls_name = \"smarthost.test\"",
            pki.ca_file.display()
        ),
    );
    let mut client = SmtpClient::connect(&server.address);
    client.cmd("EHLO client.test", 250);
    let reply = client.send_message("a@example.org", &["b@example.net"], MESSAGE);
    assert_eq!(reply.code, 250, "{}", reply.text());
    client.quit();
    let messages = upstream.wait_for_messages(1, Duration::from_secs(10));
    assert!(
        messages[0].tls,
        "the message crossed to the upstream inside TLS"
    );
    assert_eq!(messages[0].content, MESSAGE.to_vec());
}

#[test]
fn upstream_wrong_ca_tempfails() {
    let pki = TestPki::new();
    let other = TestPki::new();
    let upstream = Upstream::start(
        UpstreamOptions::default().starttls(pki.rustls_server_config("smarthost.test")),
    );
    let server = Sendguard::start(&upstream.address(), "");
    with_upstream_settings(
        &server,
        &format!(
            "tls = \"required\"\nca_file = \"{}\"\ntls_name = \"smarthost.test\"",
            other.ca_file.display()
        ),
    );
    let mut client = SmtpClient::connect(&server.address);
    client.cmd("EHLO client.test", 250);
    let reply = client.command("MAIL FROM:<a@example.org>");
    assert_eq!(reply.code, 451, "{}", reply.text());
    client.quit();
    assert!(upstream.messages().is_empty());
    assert!(
        server.log().contains("TLS with upstream"),
        "{}",
        server.log()
    );
}

#[test]
fn upstream_required_without_starttls_tempfails() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "");
    with_upstream_settings(&server, "tls = \"required\"");
    let mut client = SmtpClient::connect(&server.address);
    client.cmd("EHLO client.test", 250);
    assert_eq!(client.command("MAIL FROM:<a@example.org>").code, 451);
    client.quit();
    assert!(
        server.log().contains("does not offer STARTTLS"),
        "{}",
        server.log()
    );
}

#[test]
fn upstream_bytes_after_220_discarded() {
    let pki = TestPki::new();
    let upstream = Upstream::start(
        UpstreamOptions::default()
            .starttls(pki.rustls_server_config("smarthost.test"))
            .inject_after_starttls(b"250 2.0.0 forged reply\r\n"),
    );
    let server = Sendguard::start(&upstream.address(), "");
    with_upstream_settings(
        &server,
        &format!(
            "tls = \"required\"\nca_file = \"{}\"\ntls_name = \"smarthost.test\"",
            pki.ca_file.display()
        ),
    );
    let mut client = SmtpClient::connect(&server.address);
    client.cmd("EHLO client.test", 250);
    let reply = client.send_message("a@example.org", &["b@example.net"], MESSAGE);
    assert_eq!(reply.code, 250, "{}", reply.text());
    client.quit();
    let messages = upstream.wait_for_messages(1, Duration::from_secs(10));
    assert!(messages[0].tls);
    assert!(
        server
            .log()
            .contains("sent data after its STARTTLS reply; discarded"),
        "{}",
        server.log()
    );
}

#[test]
fn upstream_auth_over_starttls() {
    let pki = TestPki::new();
    let upstream = Upstream::start(
        UpstreamOptions::default()
            .starttls(pki.rustls_server_config("smarthost.test"))
            .auth("relay@example.org", "s3cret pass")
            .auth_requires_tls(),
    );
    let server = Sendguard::start(&upstream.address(), "");
    let password = server.dir.path().join("password");
    std::fs::write(&password, "s3cret pass\n").expect("write password file");
    with_upstream_settings(
        &server,
        &format!(
            "username = \"relay@example.org\"\npassword_file = \"{}\"",
            password.display()
        ),
    );
    let mut client = SmtpClient::connect(&server.address);
    client.cmd("EHLO client.test", 250);
    let reply = client.send_message("a@example.org", &["b@example.net"], MESSAGE);
    assert_eq!(reply.code, 250, "{}", reply.text());
    client.quit();
    let messages = upstream.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(messages[0].auth_user.as_deref(), Some("relay@example.org"));
    assert!(messages[0].tls, "opportunistic STARTTLS came first");
    assert!(
        !server.log().contains("s3cret"),
        "the password never reaches the log"
    );
}

#[test]
fn upstream_wrong_password_tempfails() {
    let pki = TestPki::new();
    let upstream = Upstream::start(
        UpstreamOptions::default()
            .starttls(pki.rustls_server_config("smarthost.test"))
            .auth("relay@example.org", "right"),
    );
    let server = Sendguard::start(&upstream.address(), "");
    let password = server.dir.path().join("password");
    std::fs::write(&password, "wrong\n").expect("write password file");
    with_upstream_settings(
        &server,
        &format!(
            "username = \"relay@example.org\"\npassword_file = \"{}\"",
            password.display()
        ),
    );
    let mut client = SmtpClient::connect(&server.address);
    client.cmd("EHLO client.test", 250);
    let reply = client.command("MAIL FROM:<a@example.org>");
    assert_eq!(reply.code, 451, "{}", reply.text());
    client.quit();
    assert!(upstream.messages().is_empty());
    assert!(upstream.auth_failures() >= 1);
    let log = server.log();
    assert!(
        log.contains("rejected the AUTH credentials of user \"relay@example.org\""),
        "{log}"
    );
    assert!(!log.contains("wrong"), "the password never reaches the log");
}

#[test]
fn plaintext_auth_refused_without_tls() {
    let upstream = Upstream::start(UpstreamOptions::default().auth("relay@example.org", "pw"));
    let server = Sendguard::start(&upstream.address(), "");
    let password = server.dir.path().join("password");
    std::fs::write(&password, "pw\n").expect("write password file");
    with_upstream_settings(
        &server,
        &format!(
            "username = \"relay@example.org\"\npassword_file = \"{}\"",
            password.display()
        ),
    );
    let mut client = SmtpClient::connect(&server.address);
    client.cmd("EHLO client.test", 250);
    assert_eq!(client.command("MAIL FROM:<a@example.org>").code, 451);
    client.quit();
    assert_eq!(
        upstream.auth_failures(),
        0,
        "no credentials were sent in clear text"
    );
    assert!(
        server.log().contains("allow_plaintext_auth"),
        "{}",
        server.log()
    );
}

#[test]
fn certificate_reloaded_on_sighup() {
    let first = TestPki::new();
    let second = TestPki::new();
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start_with(&upstream.address(), &listener_tls(&first, ""), "");
    let mut client = SmtpClient::connect(&server.address);
    client.cmd("EHLO client.test", 250);
    client.starttls(first.rustls_client_config(), "relay.test");
    client.quit();

    let (cert, key) = second.server_cert("relay.test");
    server.rewrite_config(|text| {
        text.lines()
            .map(|line| {
                if line.starts_with("tls_cert_file") {
                    format!("tls_cert_file = \"{}\"", cert.display())
                } else if line.starts_with("tls_key_file") {
                    format!("tls_key_file = \"{}\"", key.display())
                } else {
                    line.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    server.reload();
    let mut client = SmtpClient::connect(&server.address);
    client.cmd("EHLO client.test", 250);
    client.starttls(second.rustls_client_config(), "relay.test");
    client.cmd("EHLO client.test", 250);
    client.quit();
}
