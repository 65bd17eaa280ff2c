//! sendguard as a milter of a real Postfix: `smtpd_milters` with
//! `milter_protocol = 6` and `milter_default_action = tempfail`, SASL
//! logins from a Cyrus sasldb, and the recording SMTP server as Postfix's
//! relayhost.

mod common;

use base64::Engine;
use common::clamd::Clamd;
use common::postfix::{Postfix, PostfixOptions};
use common::recording_clamd::RecordingClamd;
use common::sendguard::{Sendguard, free_port};
use common::smtp_client::SmtpClient;
use common::upstream::{Upstream, UpstreamOptions, closed_address};
use std::io::Write;
use std::thread;
use std::time::{Duration, Instant};

const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";
const EICAR: &str = r"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

const ALICE: (&str, &str) = ("alice@example.org", "alice-secret");
const BOB: (&str, &str) = ("bob@example.org", "bob-secret");

/// Postfix in front, sendguard as its milter, the recording server behind.
struct Chain {
    sink: Upstream,
    server: Sendguard,
    postfix: Postfix,
}

/// Starts the chain with the milter on TCP; `sendguard_extra` is TOML for
/// sendguard's config.
fn start_chain(sendguard_extra: &str, sasl_users: &[(&str, &str)]) -> Chain {
    start_chain_on(None, sendguard_extra, sasl_users)
}

/// Starts the chain with the milter on the unix socket `socket`, or on a
/// loopback TCP port when it is `None`.
fn start_chain_on(
    socket: Option<&std::path::Path>,
    sendguard_extra: &str,
    sasl_users: &[(&str, &str)],
) -> Chain {
    let sink = Upstream::start(UpstreamOptions::default());
    let listen = match socket {
        Some(path) => path.display().to_string(),
        None => format!("127.0.0.1:{}", free_port()),
    };
    // The SMTP relay's upstream is unused in milter mode.
    let server = Sendguard::start(
        &sink.address(),
        &format!("[milter]\nlisten = \"{listen}\"\n{sendguard_extra}"),
    );
    let milter = match socket {
        Some(path) => {
            // Postfix's smtpd connects as the user postfix, as in a real
            // deployment where the directory and umask allow it.
            use std::os::unix::fs::PermissionsExt;
            let directory = path.parent().expect("socket directory");
            std::fs::set_permissions(directory, std::fs::Permissions::from_mode(0o755))
                .expect("open the socket directory");
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
                .expect("open the socket");
            format!("unix:{}", path.display())
        }
        None => format!("inet:{}", server.listen_address("milter")),
    };
    let main_cf = format!(
        "smtpd_milters = {milter}\n\
         non_smtpd_milters = {milter}\n\
         milter_protocol = 6\n\
         milter_default_action = tempfail\n"
    );
    let postfix = Postfix::start_with(
        &sink.address(),
        PostfixOptions {
            main_cf: &main_cf,
            sasl_users,
        },
    );
    Chain {
        sink,
        server,
        postfix,
    }
}

impl Chain {
    /// Opens an SMTP session with Postfix, logged in as `user` when given.
    fn session(&self, user: Option<(&str, &str)>) -> SmtpClient {
        let mut client = SmtpClient::connect(&self.postfix.address);
        client.cmd("EHLO client.test", 250);
        if let Some((name, password)) = user {
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("\0{name}\0{password}"));
            let reply = client.command(&format!("AUTH PLAIN {token}"));
            assert_eq!(
                reply.code,
                235,
                "AUTH failed: {}\n{}",
                reply.text(),
                self.postfix.log()
            );
        }
        client
    }

    /// Panics with `description` and both logs when `condition` is false.
    fn check(&self, condition: bool, description: &str) {
        assert!(
            condition,
            "{description}\n--- sendguard log ---\n{}\n--- Postfix log ---\n{}",
            self.server.log(),
            self.postfix.log()
        );
    }
}

fn spam(subject: &str) -> Vec<u8> {
    format!(
        "From: sender@example.org\r\nTo: bob@example.net\r\nSubject: {subject}\r\n\
         Date: Fri, 04 Dec 2026 21:00:00 +0000\r\nMessage-ID: <{subject}@example.org>\r\n\r\n{GTUBE}\r\n"
    )
    .into_bytes()
}

/// A clean message whose headers Postfix has no reason to complete, with
/// the header forms the milter protocol could lose: a folded header,
/// several spaces or a tab after the colon, an empty value.
const CLEAN: &[u8] = b"From: Alice <alice@example.org>\r\n\
To: bob@example.net\r\n\
Subject: lunch plans\r\n\
Date: Fri, 04 Dec 2026 21:00:00 +0000\r\n\
Message-ID: <lunch-1@example.org>\r\n\
X-Folded: first part\r\n\tsecond part\r\n  third part\r\n\
X-Spaces:   three spaces\r\n\
X-Tab:\ttab\r\n\
X-Empty:\r\n\
\r\n\
Lunch at noon?\r\n\
.leading dot, trailing spaces   \r\n\
\r\n\
last line\r\n";

/// Removes the first header (Postfix's own Received header, with its
/// continuation lines) from a delivered message.
fn without_first_header(message: &[u8]) -> &[u8] {
    let mut rest = message;
    let mut first = true;
    loop {
        let end = rest
            .windows(2)
            .position(|pair| pair == b"\r\n")
            .map_or(rest.len(), |index| index + 2);
        let continuation = rest
            .first()
            .is_some_and(|byte| *byte == b' ' || *byte == b'\t');
        if !first && !continuation {
            return rest;
        }
        first = false;
        rest = &rest[end..];
    }
}

#[test]
fn clean_message_delivered_and_scanned_exactly() {
    let clamd = RecordingClamd::start();
    let chain = start_chain(
        &format!("[scan.clamd]\naddress = \"{}\"\n", clamd.address),
        &[],
    );
    let mut client = chain.session(None);
    let reply = client.send_message("alice@example.org", &["bob@example.net"], CLEAN);
    chain.check(
        reply.code == 250,
        &format!("clean message: {}", reply.text()),
    );
    client.quit();

    let delivered = chain.sink.wait_for_messages(1, Duration::from_secs(20));
    let content = &delivered[0].content;
    let text = String::from_utf8_lossy(content);
    assert!(text.starts_with("Received: from client.test"), "{text}");
    assert_eq!(without_first_header(content), CLEAN, "delivered:\n{text}");

    // sendguard scanned the message as the client sent it: Postfix hides
    // its own Received header from milters, and every header kept its
    // spaces and folding.
    let scanned = clamd.payloads();
    let scanned: Vec<&Vec<u8>> = scanned
        .iter()
        .filter(|message| !message.is_empty())
        .collect();
    assert_eq!(scanned.len(), 1, "one message scanned");
    assert_eq!(
        String::from_utf8_lossy(scanned[0]),
        String::from_utf8_lossy(CLEAN),
        "scanned bytes"
    );
    assert_eq!(scanned[0].as_slice(), CLEAN);
}

#[test]
fn unix_socket_milter_scans_and_locks_out() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let socket = dir.path().join("milter.sock");
    let clamd = RecordingClamd::start();
    let chain = start_chain_on(
        Some(&socket),
        &format!("[scan.clamd]\naddress = \"{}\"\n", clamd.address),
        &[ALICE],
    );

    // Over a unix socket the milter waives the replies to connect, HELO and
    // RCPT and leaves DATA out; the message still arrives whole.
    let mut client = chain.session(None);
    let reply = client.send_message(
        "carol@example.org",
        &["bob@example.net", "dan@example.net"],
        CLEAN,
    );
    chain.check(
        reply.code == 250,
        &format!("clean message: {}", reply.text()),
    );
    client.quit();
    let delivered = chain.sink.wait_for_messages(1, Duration::from_secs(20));
    assert_eq!(without_first_header(&delivered[0].content), CLEAN);
    let scanned = clamd.payloads();
    assert_eq!(scanned.len(), 1, "one message scanned");
    assert_eq!(scanned[0].as_slice(), CLEAN);

    let mut client = chain.session(Some(ALICE));
    for index in 0..5 {
        let reply = client.send_message(
            "alice@example.org",
            &["bob@example.net", "dan@example.net"],
            &spam(&format!("unix{index}")),
        );
        chain.check(
            reply.code == 550,
            &format!("spam {index}: {}", reply.text()),
        );
    }
    let reply = client.command("MAIL FROM:<alice@example.org>");
    chain.check(reply.code == 550, &format!("locked out: {}", reply.text()));
    client.quit();

    let bad = chain.server.events_of("bad_message");
    assert_eq!(bad.len(), 5, "{bad:?}");
    assert_eq!(bad[0]["recipients"], 2, "{:?}", bad[0]);
    assert_eq!(chain.server.events_of("lockout_started").len(), 1);
}

#[test]
fn eicar_rejected_at_end_of_data() {
    let clamd = Clamd::start();
    let chain = start_chain(
        &format!("[scan.clamd]\naddress = \"{}\"\n", clamd.address),
        &[],
    );
    let mut client = chain.session(None);
    let content = format!("Subject: invoice\r\n\r\n{EICAR}\r\n");
    let reply = client.send_message("erin@example.org", &["bob@example.net"], content.as_bytes());
    chain.check(reply.code == 550, &format!("EICAR: {}", reply.text()));
    assert_eq!(reply.enhanced_code(), Some("5.7.1"));
    assert!(
        reply.text().contains("Message rejected: virus Eicar"),
        "{}",
        reply.text()
    );
    client.quit();

    let bad = chain.server.events_of("bad_message");
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0]["mailbox"], "erin@example.org");
    assert_eq!(bad[0]["client"], "127.0.0.1");
    assert!(chain.sink.messages().is_empty(), "nothing delivered");
}

#[test]
fn gtube_rejected_with_sendguard_text() {
    let chain = start_chain("", &[]);
    let mut client = chain.session(None);
    let reply = client.send_message("frank@example.org", &["bob@example.net"], &spam("offer"));
    chain.check(reply.code == 550, &format!("GTUBE: {}", reply.text()));
    assert_eq!(
        reply.text(),
        "5.7.1 Message rejected as spam score 1000.0 (GTUBE); if it is legitimate, contact \
         your mail administrator"
    );
    client.quit();
    assert!(chain.sink.messages().is_empty(), "nothing delivered");
}

#[test]
fn authenticated_user_locked_out_whatever_sender() {
    let chain = start_chain("", &[ALICE, BOB]);
    let mut client = chain.session(Some(ALICE));
    for index in 0..5 {
        let sender = format!("alias{index}@elsewhere.example");
        let reply = client.send_message(
            &sender,
            &["bob@example.net"],
            &spam(&format!("offer{index}")),
        );
        chain.check(
            reply.code == 550,
            &format!("spam {index}: {}", reply.text()),
        );
    }

    // The login is locked out, whatever envelope sender it writes.
    for sender in ["alice@example.org", "someone@other.example", ""] {
        let reply = client.command(&format!("MAIL FROM:<{sender}>"));
        chain.check(
            reply.code == 550,
            &format!("MAIL FROM:<{sender}>: {}", reply.text()),
        );
        assert!(
            reply
                .text()
                .starts_with("5.7.1 Sender alice@example.org is locked out until "),
            "{}",
            reply.text()
        );
    }
    client.quit();

    let started = chain.server.events_of("lockout_started");
    assert_eq!(started.len(), 1, "{started:?}");
    assert_eq!(started[0]["mailbox"], "alice@example.org");
    let bad = chain.server.events_of("bad_message");
    assert_eq!(bad.len(), 5);
    assert!(
        bad.iter()
            .all(|event| event["login"] == "alice@example.org"),
        "{bad:?}"
    );

    // Another user is unaffected.
    let mut client = chain.session(Some(BOB));
    let reply = client.send_message("bob@example.org", &["carol@example.net"], CLEAN);
    chain.check(reply.code == 250, &format!("bob: {}", reply.text()));
    client.quit();
    chain.sink.wait_for_messages(1, Duration::from_secs(20));
}

#[test]
fn unauthenticated_sender_keyed_by_envelope() {
    let chain = start_chain("", &[ALICE]);
    let mut client = chain.session(None);
    for index in 0..5 {
        let reply = client.send_message(
            "carol@example.org",
            &["bob@example.net"],
            &spam(&format!("c{index}")),
        );
        chain.check(
            reply.code == 550,
            &format!("spam {index}: {}", reply.text()),
        );
    }
    let reply = client.command("MAIL FROM:<Carol+news@EXAMPLE.org>");
    chain.check(
        reply.code == 550,
        &format!("locked-out sender: {}", reply.text()),
    );
    assert!(
        reply
            .text()
            .contains("Sender carol@example.org is locked out"),
        "{}",
        reply.text()
    );
    client.command("RSET");

    // Another envelope sender from the same client goes through.
    let reply = client.send_message("dave@example.org", &["bob@example.net"], CLEAN);
    chain.check(reply.code == 250, &format!("dave: {}", reply.text()));
    client.quit();

    let bad = chain.server.events_of("bad_message");
    assert_eq!(bad.len(), 5);
    assert!(
        bad.iter()
            .all(|event| event["mailbox"] == "carol@example.org"),
        "{bad:?}"
    );
    assert!(bad.iter().all(|event| event["login"].is_null()), "{bad:?}");
}

#[test]
fn percent_sign_in_reply_kept() {
    // Postfix turns "%%" in a milter's reply into "%" and drops a single
    // "%", so the address must come back whole only because sendguard
    // doubles it.
    let chain = start_chain("[policy]\nthreshold = 1\n", &[]);
    let mut client = chain.session(None);
    let reply = client.send_message(
        "per%cent@example.org",
        &["bob@example.net"],
        &spam("percent"),
    );
    chain.check(reply.code == 550, &format!("spam: {}", reply.text()));
    let reply = client.command("MAIL FROM:<per%cent@example.org>");
    chain.check(
        reply.code == 550,
        &format!("locked-out sender: {}", reply.text()),
    );
    assert!(
        reply
            .text()
            .contains("Sender per%cent@example.org is locked out"),
        "{}",
        reply.text()
    );
    client.quit();
}

#[test]
fn clamd_down_tempfails() {
    let chain = start_chain(
        &format!("[scan.clamd]\naddress = \"{}\"\n", closed_address()),
        &[],
    );
    let mut client = chain.session(None);
    let reply = client.send_message("gina@example.org", &["bob@example.net"], CLEAN);
    chain.check(reply.code == 451, &format!("clamd down: {}", reply.text()));
    assert_eq!(reply.enhanced_code(), Some("4.7.1"));
    assert!(
        reply.text().contains("virus scanner is unavailable"),
        "{}",
        reply.text()
    );
    client.quit();
    assert!(chain.sink.messages().is_empty(), "nothing delivered");
    assert!(chain.server.events_of("bad_message").is_empty());
}

#[test]
fn tag_mode_header_on_top_with_queue_id() {
    let chain = start_chain("[scan.spam]\naction = \"tag\"\n", &[]);
    let mut client = chain.session(None);
    let content = spam("tagged");
    let reply = client.send_message("hugo@example.org", &["bob@example.net"], &content);
    chain.check(reply.code == 250, &format!("tagged spam: {}", reply.text()));
    let queue_id = reply
        .text()
        .rsplit(' ')
        .next()
        .expect("queue id in the reply")
        .to_string();
    client.quit();

    let delivered = chain.sink.wait_for_messages(1, Duration::from_secs(20));
    let text = String::from_utf8_lossy(&delivered[0].content).into_owned();
    let (first, rest) = text.split_once("\r\n").expect("a first line");
    assert!(
        first.starts_with("X-Sendguard-Spam: Yes, spam score 1000.0 (GTUBE)"),
        "{text}"
    );
    assert!(rest.starts_with("Received: from client.test"), "{text}");
    assert_eq!(without_first_header(rest.as_bytes()), content.as_slice());

    let bad = chain
        .server
        .wait_for_events(Duration::from_secs(5), |events| {
            events.iter().any(|event| event["type"] == "bad_message")
        });
    let bad: Vec<_> = bad
        .iter()
        .filter(|event| event["type"] == "bad_message")
        .collect();
    assert_eq!(bad[0]["queue_id"], queue_id.as_str(), "{:?}", bad[0]);
    assert_eq!(bad[0]["mailbox"], "hugo@example.org");
}

#[test]
fn local_submission_scanned() {
    let chain = start_chain("", &[]);
    let config = chain.postfix.path().join("etc");
    for (subject, recipient) in [
        ("local-spam", "bob@example.net"),
        ("local-clean", "carol@example.net"),
    ] {
        let content = if subject == "local-spam" {
            spam(subject)
        } else {
            CLEAN.to_vec()
        };
        let mut child = std::process::Command::new("/usr/sbin/sendmail")
            .arg("-C")
            .arg(&config)
            .args(["-f", "ivan@example.org", recipient])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("run Postfix's sendmail");
        child
            .stdin
            .take()
            .expect("sendmail stdin")
            .write_all(&content)
            .expect("write the message");
        let status = child.wait().expect("wait for sendmail");
        chain.check(
            status.success(),
            "sendmail accepted the message for the queue",
        );
    }

    // pickup hands both to cleanup, which runs the non_smtpd_milters.
    let deadline = Instant::now() + Duration::from_secs(30);
    while chain.server.events_of("bad_message").is_empty() {
        chain.check(
            Instant::now() < deadline,
            "no bad_message event for the local spam",
        );
        thread::sleep(Duration::from_millis(100));
    }
    // Postfix 3.7 reports a local submission as a connection from
    // localhost, 127.0.0.1.
    let bad = chain.server.events_of("bad_message");
    assert_eq!(bad[0]["mailbox"], "ivan@example.org");
    assert_eq!(bad[0]["client"], "127.0.0.1");

    // The clean message reaches the relayhost; the spam does not (Postfix
    // bounces it to the sender instead).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let messages = chain.sink.messages();
        if messages.iter().any(|message| {
            message
                .accepted_rcpts
                .iter()
                .any(|rcpt| rcpt.contains("carol@example.net"))
        }) {
            assert!(
                !messages.iter().any(|message| message
                    .accepted_rcpts
                    .iter()
                    .any(|rcpt| rcpt.contains("bob@example.net"))),
                "the spam was relayed"
            );
            break;
        }
        chain.check(
            Instant::now() < deadline,
            "the clean local message was not relayed",
        );
        thread::sleep(Duration::from_millis(100));
    }
}
