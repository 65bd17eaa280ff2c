//! The relay end to end: the real binary between a real SMTP client and a
//! recording upstream, scanning with a real clamd.

mod common;

use common::clamd::Clamd;
use common::recording_clamd::RecordingClamd;
use common::sendguard::Sendguard;
use common::smtp_client::{SmtpClient, data_payload};
use common::upstream::{ClosePoint, Upstream, UpstreamOptions};
use std::time::Duration;

const EICAR: &str = r"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";
const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

fn clamd_section(clamd: &Clamd, extra: &str) -> String {
    format!(
        "[scan.clamd]\naddress = \"{}\"\ntimeout = \"10s\"\n{extra}\n",
        clamd.address
    )
}

/// Opens a session and sends EHLO.
fn session(address: &str) -> SmtpClient {
    let mut client = SmtpClient::connect(address);
    client.cmd("EHLO client.test", 250);
    client
}

/// Encodes `data` as base64 in lines of 76 characters, as MIME bodies are.
fn base64(data: &[u8]) -> String {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(data);
    let lines: Vec<&str> = encoded
        .as_bytes()
        .chunks(76)
        .map(|line| std::str::from_utf8(line).expect("base64 is ASCII"))
        .collect();
    lines.join("\r\n")
}

fn with_attachment(name: &str, data: &[u8]) -> Vec<u8> {
    format!(
        "From: alice@example.org\r\nTo: bob@example.net\r\nSubject: report\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\n\
         The file you asked for.\r\n--b1\r\nContent-Type: application/octet-stream; name=\"{name}\"\r\n\
         Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"{name}\"\r\n\r\n\
         {}\r\n--b1--\r\n",
        base64(data)
    )
    .into_bytes()
}

/// Builds a zip archive containing one stored (uncompressed) file.
fn zip_stored(name: &str, data: &[u8]) -> Vec<u8> {
    let crc = crc32(data);
    let size = u32::try_from(data.len()).expect("small file");
    let name_len = u16::try_from(name.len()).expect("short name");
    let mut zip = Vec::new();
    zip.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
    zip.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    zip.extend_from_slice(&crc.to_le_bytes());
    zip.extend_from_slice(&size.to_le_bytes());
    zip.extend_from_slice(&size.to_le_bytes());
    zip.extend_from_slice(&name_len.to_le_bytes());
    zip.extend_from_slice(&0u16.to_le_bytes());
    zip.extend_from_slice(name.as_bytes());
    zip.extend_from_slice(data);
    let central = zip.len() as u32;
    zip.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
    zip.extend_from_slice(&[20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    zip.extend_from_slice(&crc.to_le_bytes());
    zip.extend_from_slice(&size.to_le_bytes());
    zip.extend_from_slice(&size.to_le_bytes());
    zip.extend_from_slice(&name_len.to_le_bytes());
    zip.extend_from_slice(&[0; 12]);
    zip.extend_from_slice(&0u32.to_le_bytes());
    zip.extend_from_slice(name.as_bytes());
    let central_size = zip.len() as u32 - central;
    zip.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    zip.extend_from_slice(&[0, 0, 0, 0, 1, 0, 1, 0]);
    zip.extend_from_slice(&central_size.to_le_bytes());
    zip.extend_from_slice(&central.to_le_bytes());
    zip.extend_from_slice(&0u16.to_le_bytes());
    zip
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn clean_mail_delivered_byte_exact() {
    let clamd = Clamd::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), &clamd_section(&clamd, ""));

    let contents: Vec<Vec<u8>> = vec![
        b".\r\nfirst line was a single dot\r\n".to_vec(),
        b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\n...\r\nend\r\n".to_vec(),
        "Subject: 8-bit\r\n\r\nGr\u{fc}\u{df}e aus K\u{f6}ln, \u{20ac} und \u{1f600}\r\nraw bytes follow\r\n"
            .as_bytes()
            .iter()
            .copied()
            .chain([0xff, 0xfe, b'\r', b'\n'])
            .collect(),
        b"no final line ending".to_vec(),
        Vec::new(),
    ];
    let mut client = session(&server.address);
    for content in &contents {
        let reply = client.send_message("alice@example.org", &["bob@example.net"], content);
        assert_eq!(reply.code, 250, "{}", reply.text());
    }
    client.quit();

    let received = upstream.wait_for_messages(contents.len(), Duration::from_secs(10));
    for (content, message) in contents.iter().zip(&received) {
        let mut expected = content.clone();
        if !expected.is_empty() && !expected.ends_with(b"\r\n") {
            expected.extend_from_slice(b"\r\n");
        }
        assert_eq!(
            message.content,
            expected,
            "content differs for {:?}",
            String::from_utf8_lossy(content)
        );
        assert_eq!(message.mail_line, "MAIL FROM:<alice@example.org>");
        assert_eq!(
            message.rcpt_lines,
            vec!["RCPT TO:<bob@example.net>".to_string()]
        );
    }
    assert!(!upstream.saw_bare_line_ending());
}

#[test]
fn ten_mebibyte_message_delivered() {
    let clamd = Clamd::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start_with(
        &upstream.address(),
        "max_message_size = 20971520",
        &clamd_section(&clamd, "max_scan_size = 20971520"),
    );
    let mut content = b"Subject: big\r\n\r\n".to_vec();
    let line = b"0123456789abcdefghijklmnopqrstuvwxyz.ABCDEFGHIJKLMNOPQRSTUVWXYZ-0123456789\r\n";
    while content.len() < 10 * 1024 * 1024 {
        content.extend_from_slice(line);
        content.extend_from_slice(b".dot at line start\r\n");
    }
    let mut client = session(&server.address);
    let reply = client.send_message("alice@example.org", &["bob@example.net"], &content);
    assert_eq!(reply.code, 250, "{}", reply.text());
    client.quit();
    let received = upstream.wait_for_messages(1, Duration::from_secs(30));
    assert_eq!(received[0].content.len(), content.len());
    assert!(received[0].content == content, "10 MiB content differs");
}

#[test]
fn raw_paths_relayed_as_written() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "");
    let mut client = session(&server.address);
    client.cmd("MAIL FROM:<\"john doe\"@Example.org> SIZE=100", 250);
    client.cmd("RCPT TO:<Bob+Tag@Example.NET>", 250);
    client.data(&data_payload(b"Subject: x\r\n\r\nhi\r\n"), 250);
    client.quit();
    let received = upstream.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(
        received[0].mail_line,
        "MAIL FROM:<\"john doe\"@Example.org> SIZE=100"
    );
    assert_eq!(
        received[0].rcpt_lines,
        vec!["RCPT TO:<Bob+Tag@Example.NET>".to_string()]
    );
}

#[test]
fn eicar_base64_attachment_rejected() {
    let clamd = Clamd::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), &clamd_section(&clamd, ""));
    let mut client = session(&server.address);
    let reply = client.send_message(
        "alice@example.org",
        &["bob@example.net"],
        &with_attachment("eicar.com", EICAR.as_bytes()),
    );
    assert_eq!(reply.code, 550, "{}", reply.text());
    assert!(reply.text().contains("Eicar"), "{}", reply.text());
    assert_eq!(reply.enhanced_code(), Some("5.7.1"));

    // The session stays usable and the next clean message goes through.
    let reply = client.send_message(
        "alice@example.org",
        &["bob@example.net"],
        b"Subject: ok\r\n\r\nfine\r\n",
    );
    assert_eq!(reply.code, 250, "{}", reply.text());
    client.quit();
    let received = upstream.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(received.len(), 1);
    assert!(!String::from_utf8_lossy(&upstream.transcript()).contains("EICAR"));
}

#[test]
fn eicar_in_zip_rejected() {
    let clamd = Clamd::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), &clamd_section(&clamd, ""));
    let mut client = session(&server.address);
    let zip = zip_stored("eicar.txt", EICAR.as_bytes());
    let reply = client.send_message(
        "alice@example.org",
        &["bob@example.net"],
        &with_attachment("files.zip", &zip),
    );
    assert_eq!(reply.code, 550, "{}", reply.text());
    client.quit();
    assert_eq!(upstream.messages().len(), 0);
}

#[test]
fn gtube_rejected() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "");
    let mut client = session(&server.address);
    let reply = client.send_message(
        "alice@example.org",
        &["bob@example.net"],
        format!("Subject: test\r\n\r\n{GTUBE}\r\n").as_bytes(),
    );
    assert_eq!(reply.code, 550, "{}", reply.text());
    assert!(reply.text().contains("GTUBE"), "{}", reply.text());
    client.quit();
    assert_eq!(upstream.messages().len(), 0);
}

#[test]
fn spam_tag_mode_delivers_with_header() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "[scan.spam]\naction = \"tag\"\n");
    let mut client = session(&server.address);
    let content = format!("Subject: test\r\n\r\n{GTUBE}\r\n");
    let reply = client.send_message(
        "alice@example.org",
        &["bob@example.net"],
        content.as_bytes(),
    );
    assert_eq!(reply.code, 250, "{}", reply.text());
    client.quit();
    let received = upstream.wait_for_messages(1, Duration::from_secs(10));
    let delivered = String::from_utf8_lossy(&received[0].content).into_owned();
    let (first, rest) = delivered.split_once("\r\n").expect("header line");
    assert!(first.starts_with("X-Sendguard-Spam: Yes"), "{first}");
    assert_eq!(rest, content, "nothing else changes");
    let bad = server.events_of("bad_message");
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0]["queue_id"], received[0].queue_id.as_str());
}

#[test]
fn recipient_rejections_passed_back() {
    let upstream = Upstream::start(UpstreamOptions::default().reject_rcpt(
        "nobody@example.net",
        "550 5.1.1 <nobody@example.net>: user unknown",
    ));
    let server = Sendguard::start(&upstream.address(), "");
    let mut client = session(&server.address);
    client.cmd("MAIL FROM:<alice@example.org>", 250);
    let rejected = client.cmd("RCPT TO:<nobody@example.net>", 550);
    assert!(
        rejected.text().contains("user unknown"),
        "{}",
        rejected.text()
    );
    assert_eq!(rejected.enhanced_code(), Some("5.1.1"));
    client.cmd("RCPT TO:<bob@example.net>", 250);
    client.data(&data_payload(b"Subject: x\r\n\r\nhi\r\n"), 250);
    client.quit();
    let received = upstream.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(
        received[0].accepted_rcpts,
        vec!["bob@example.net".to_string()]
    );
}

#[test]
fn only_rejected_recipients_gets_no_data() {
    let upstream = Upstream::start(
        UpstreamOptions::default().reject_rcpt("nobody@example.net", "550 5.1.1 user unknown"),
    );
    let server = Sendguard::start(&upstream.address(), "");
    let mut client = session(&server.address);
    client.cmd("MAIL FROM:<alice@example.org>", 250);
    client.cmd("RCPT TO:<nobody@example.net>", 550);
    client.cmd("DATA", 554);
    client.quit();
}

#[test]
fn upstream_final_rejection_passed_back() {
    let upstream = Upstream::start(
        UpstreamOptions::default().data_reply("554 5.7.0 content refused upstream"),
    );
    let server = Sendguard::start(&upstream.address(), "");
    let mut client = session(&server.address);
    let reply = client.send_message(
        "alice@example.org",
        &["bob@example.net"],
        b"Subject: x\r\n\r\nhi\r\n",
    );
    assert_eq!(reply.code, 554);
    assert!(
        reply.text().contains("refused upstream"),
        "{}",
        reply.text()
    );
    client.quit();
}

#[test]
fn upstream_down_gives_tempfail() {
    let server = Sendguard::start(&common::upstream::closed_address(), "");
    let mut client = session(&server.address);
    let reply = client.command("MAIL FROM:<alice@example.org>");
    assert_eq!(reply.code, 451, "{}", reply.text());
    client.quit();
}

#[test]
fn upstream_closing_mid_message_gives_tempfail() {
    let upstream = Upstream::start(UpstreamOptions::default().close_at(ClosePoint::AfterData));
    let server = Sendguard::start(&upstream.address(), "");
    let mut client = session(&server.address);
    let reply = client.send_message(
        "alice@example.org",
        &["bob@example.net"],
        b"Subject: x\r\n\r\nhi\r\n",
    );
    assert_eq!(reply.code / 100, 4, "{}", reply.text());
    client.quit();
}

#[test]
fn clamd_down_gives_451() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let extra = format!(
        "[scan.clamd]\naddress = \"{}\"\ntimeout = \"5s\"\n",
        common::clamd::closed_port_address()
    );
    let server = Sendguard::start(&upstream.address(), &extra);
    let mut client = session(&server.address);
    let reply = client.send_message(
        "alice@example.org",
        &["bob@example.net"],
        b"Subject: x\r\n\r\nhi\r\n",
    );
    assert_eq!(reply.code, 451, "{}", reply.text());
    assert_eq!(reply.enhanced_code(), Some("4.7.1"));
    client.quit();
    assert_eq!(upstream.messages().len(), 0);
    assert!(
        server.events_of("bad_message").is_empty(),
        "a scanner failure is no strike"
    );
}

#[test]
fn over_max_scan_size_unscannable_no_strike() {
    let clamd = Clamd::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let extra = format!(
        "{}\n[policy]\nthreshold = 1\n",
        clamd_section(&clamd, "max_scan_size = 1000")
    );
    let server = Sendguard::start(&upstream.address(), &extra);
    let mut client = session(&server.address);
    let content = format!("Subject: big\r\n\r\n{}\r\n", "x".repeat(2000));
    let reply = client.send_message(
        "alice@example.org",
        &["bob@example.net"],
        content.as_bytes(),
    );
    assert_eq!(reply.code, 554, "{}", reply.text());
    assert!(reply.text().contains("scan"), "{}", reply.text());
    // Threshold 1: had it been a strike, this MAIL FROM would be refused.
    client.cmd("MAIL FROM:<alice@example.org>", 250);
    client.quit();
    assert!(server.events_of("lockout_started").is_empty());
}

#[test]
fn message_over_size_limit_rejected() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start_with(&upstream.address(), "max_message_size = 1000", "");
    let mut client = session(&server.address);
    client.cmd("MAIL FROM:<alice@example.org> SIZE=5000", 552);
    let content = format!("Subject: big\r\n\r\n{}\r\n", "y".repeat(3000));
    let reply = client.send_message(
        "alice@example.org",
        &["bob@example.net"],
        content.as_bytes(),
    );
    assert_eq!(reply.code, 552, "{}", reply.text());
    assert_eq!(reply.enhanced_code(), Some("5.3.4"));
    client.quit();
    assert_eq!(upstream.messages().len(), 0);
}

#[test]
fn bare_line_endings_normalized() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "");
    let mut client = session(&server.address);
    client.cmd("MAIL FROM:<alice@example.org>", 250);
    client.cmd("RCPT TO:<bob@example.net>", 250);
    client.cmd("DATA", 354);
    client.send_raw(b"Subject: x\r\n\r\nfirst\n.\nMAIL FROM:<x@example.com>\r\nlone\rcr\r\n.\r\n");
    let reply = client.read_reply();
    assert_eq!(reply.code, 250, "{}", reply.text());
    client.quit();
    let received = upstream.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0].content,
        b"Subject: x\r\n\r\nfirst\r\n.\r\nMAIL FROM:<x@example.com>\r\nlone\r\ncr\r\n".to_vec()
    );
    assert!(!upstream.saw_bare_line_ending());
    assert_eq!(
        upstream.transactions().len(),
        1,
        "no second transaction upstream"
    );
}

#[test]
fn bare_line_endings_rejected_when_configured() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start_with(&upstream.address(), "bare_line_endings = \"reject\"", "");
    let mut client = session(&server.address);
    client.cmd("MAIL FROM:<alice@example.org>", 250);
    client.cmd("RCPT TO:<bob@example.net>", 250);
    client.cmd("DATA", 354);
    client.send_raw(b"Subject: x\r\n\r\nbare\nline\r\n.\r\n");
    let reply = client.read_reply();
    assert_eq!(reply.code, 550, "{}", reply.text());
    assert!(reply.text().contains("bare"), "{}", reply.text());
    client.cmd("NOOP", 250);
    client.quit();
    assert_eq!(upstream.messages().len(), 0);
}

#[test]
fn client_outside_relay_networks_refused() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "");
    server.rewrite_config(|text| {
        text.replace("[\"127.0.0.0/8\", \"::1/128\"]", "[\"127.0.0.1/32\"]")
    });
    server.reload();
    let client = SmtpClient::connect_from(&server.address, "127.0.0.3");
    assert_eq!(client.greeting().code, 554);
    let allowed = SmtpClient::connect(&server.address);
    assert_eq!(allowed.greeting().code, 220);
}

#[test]
fn ehlo_advertises_upstream_extensions_only() {
    let upstream =
        Upstream::start(UpstreamOptions::default().capabilities(&["PIPELINING", "SIZE 1000000"]));
    let server = Sendguard::start(&upstream.address(), "");
    // The first session opens the upstream connection, so the second sees
    // what the upstream offers even if the start-up probe lost the race.
    let mut client = session(&server.address);
    client.send_message(
        "alice@example.org",
        &["bob@example.net"],
        b"Subject: x\r\n\r\nhi\r\n",
    );
    client.quit();
    let mut client = SmtpClient::connect(&server.address);
    let ehlo = client.cmd("EHLO client.test", 250);
    let text = ehlo.text();
    assert!(text.contains("SIZE 1000000"), "{text}");
    assert!(!text.contains("8BITMIME"), "{text}");
    assert!(!text.contains("SMTPUTF8"), "{text}");
    client.quit();
}

#[test]
fn scanner_sees_relayed_bytes() {
    let scanner = RecordingClamd::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let extra = format!(
        "[scan.clamd]\naddress = \"{}\"\ntimeout = \"5s\"\n",
        scanner.address
    );
    let server = Sendguard::start(&upstream.address(), &extra);
    let content =
        b".\r\n..two\r\nSubject: bytes\r\n\r\n\xc3\xa9t\xc3\xa9 8-bit\r\n.x\r\n\x00nul\r\n"
            .to_vec();
    let mut client = session(&server.address);
    let reply = client.send_message("alice@example.org", &["bob@example.net"], &content);
    assert_eq!(reply.code, 250, "{}", reply.text());
    client.quit();
    let received = upstream.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(received[0].content, content);
    let payloads = scanner.payloads();
    assert_eq!(payloads.len(), 1, "one scan per message");
    assert_eq!(
        payloads[0], content,
        "clamd scanned exactly what was relayed"
    );
}

#[test]
fn upstream_idle_timeout_replayed() {
    // The upstream drops a session that is silent for one second, as a
    // stressed Postfix does after its smtpd_timeout.
    let upstream = Upstream::start(UpstreamOptions::default().read_timeout(Duration::from_secs(1)));
    let server = Sendguard::start(&upstream.address(), "");
    let mut client = session(&server.address);
    client.cmd("MAIL FROM:<alice@example.org>", 250);
    client.cmd("RCPT TO:<bob@example.net>", 250);
    client.cmd("RCPT TO:<carol@example.net>", 250);
    client.cmd("DATA", 354);
    client.send_raw(b"Subject: slow\r\n\r\n");
    std::thread::sleep(Duration::from_millis(2500));
    client.send_raw(b"body after a pause\r\n.\r\n");
    let reply = client.read_reply();
    assert_eq!(reply.code, 250, "{}", reply.text());

    // The next transaction in the same client session also finds its way.
    std::thread::sleep(Duration::from_millis(1500));
    let reply = client.send_message(
        "alice@example.org",
        &["bob@example.net"],
        b"Subject: again\r\n\r\nhi\r\n",
    );
    assert_eq!(reply.code, 250, "{}", reply.text());
    client.quit();

    let messages = upstream.wait_for_messages(2, Duration::from_secs(10));
    assert_eq!(
        messages[0].content,
        b"Subject: slow\r\n\r\nbody after a pause\r\n".to_vec()
    );
    assert_eq!(
        messages[0].accepted_rcpts,
        vec![
            "bob@example.net".to_string(),
            "carol@example.net".to_string()
        ]
    );
    assert_eq!(upstream.messages().len(), 2, "each message delivered once");
}

#[test]
fn replayed_recipient_refused_tempfails() {
    let upstream = Upstream::start(UpstreamOptions::default().read_timeout(Duration::from_secs(1)));
    let server = Sendguard::start(&upstream.address(), "");
    let mut client = session(&server.address);
    client.cmd("MAIL FROM:<alice@example.org>", 250);
    client.cmd("RCPT TO:<bob@example.net>", 250);
    client.cmd("RCPT TO:<carol@example.net>", 250);
    client.cmd("DATA", 354);
    // While the upstream session times out, carol's mailbox goes away.
    upstream.set_options(
        UpstreamOptions::default()
            .read_timeout(Duration::from_secs(1))
            .reject_rcpt("carol@example.net", "550 5.1.1 <carol@example.net>: gone"),
    );
    std::thread::sleep(Duration::from_millis(2000));
    client.send_raw(&data_payload(b"Subject: x\r\n\r\nhi\r\n"));
    let reply = client.read_reply();
    assert_eq!(reply.code, 451, "{}", reply.text());
    client.quit();
    assert!(
        upstream.messages().is_empty(),
        "never delivered to only some recipients"
    );
}

#[test]
fn stressed_postfix_upstream_still_delivers() {
    // Postfix as the upstream, with the timeouts it uses under stress: a
    // 2-second smtpd_timeout and one junk command (NOOP, RSET) allowed.
    let sink = Upstream::start(UpstreamOptions::default());
    let postfix = common::postfix::Postfix::start(
        &sink.address(),
        "smtpd_timeout = 2s\nsmtpd_junk_command_limit = 1\n",
    );
    let server = Sendguard::start(&postfix.address, "");
    let mut client = session(&server.address);
    client.cmd("MAIL FROM:<alice@example.org>", 250);
    client.cmd("RCPT TO:<bob@example.net>", 250);
    client.cmd("DATA", 354);
    client.send_raw(b"Subject: slow client\r\n\r\n");
    // The client takes longer over DATA than Postfix waits.
    std::thread::sleep(Duration::from_secs(5));
    client.send_raw(b"finally done\r\n.\r\n");
    let reply = client.read_reply();
    assert_eq!(reply.code, 250, "{}\n{}", reply.text(), postfix.log());
    client.quit();

    let messages = sink.wait_for_messages(1, Duration::from_secs(30));
    let delivered = String::from_utf8_lossy(&messages[0].content).into_owned();
    assert!(delivered.contains("finally done"), "{delivered}");
    assert_eq!(sink.messages().len(), 1, "delivered once");
    assert!(
        postfix.log().contains("timeout after"),
        "Postfix dropped the idle session:\n{}",
        postfix.log()
    );
}

#[test]
fn upstream_refusing_session_tempfails() {
    let upstream = Upstream::start(
        UpstreamOptions::default().greeting("554 5.3.2 upstream.test not accepting mail"),
    );
    let server = Sendguard::start(&upstream.address(), "");
    let mut client = session(&server.address);
    let reply = client.command("MAIL FROM:<alice@example.org>");
    assert_eq!(reply.code, 451, "{}", reply.text());
    client.quit();
    assert!(upstream.messages().is_empty());
}

#[test]
fn upstream_spam_headers_trusted_only_when_enabled() {
    let marked =
        b"X-Spam-Flag: YES\r\nX-Spam-Status: Yes, score=12.0\r\nSubject: deal\r\n\r\nBuy now\r\n";
    let upstream = Upstream::start(UpstreamOptions::default());
    let ignoring = Sendguard::start(&upstream.address(), "");
    let mut client = session(&ignoring.address);
    assert_eq!(
        client
            .send_message("a@example.org", &["b@example.net"], marked)
            .code,
        250
    );
    client.quit();

    let trusting = Sendguard::start(&upstream.address(), "[scan.spam]\ntrust_headers = true\n");
    let mut client = session(&trusting.address);
    let reply = client.send_message("a@example.org", &["b@example.net"], marked);
    assert_eq!(reply.code, 550, "{}", reply.text());
    client.quit();
    let bad = trusting.events_of("bad_message");
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0]["counted"], true);
}
