//! sendguard's milter at the protocol level, driven packet by packet by the
//! test client in `common/milter_client.rs` the way Postfix drives it.

mod common;

use common::clamd::Clamd;
use common::milter_client::{
    MilterClient, Response, SMFIC_BODYEOB, SMFIC_MAIL, SMFIF_ADDHDRS, SMFIM_EOM, SMFIM_MAIL,
    SMFIP_HDR_LEADSPC, SMFIP_NODATA, SMFIP_NOHREPL, SMFIP_NOUNKNOWN, SMFIP_NR_BODY, SMFIP_NR_CONN,
    SMFIP_NR_EOH, SMFIP_NR_HELO, SMFIP_NR_MAIL, SMFIP_NR_RCPT,
};
use common::sendguard::{Sendguard, free_port};
use common::upstream::closed_address;
use std::time::Duration;

const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";
const EICAR: &str = r"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

/// How long a test waits to be sure that no reply follows a command.
const SILENCE: Duration = Duration::from_millis(300);

/// Starts sendguard with a milter listener and returns it with the milter's
/// address. Its SMTP upstream is unused in milter mode, so it points at a
/// closed port.
fn start_milter(extra: &str) -> (Sendguard, String) {
    let address = format!("127.0.0.1:{}", free_port());
    let server = Sendguard::start(
        &closed_address(),
        &format!("[milter]\nlisten = \"{address}\"\ntimeout = \"10s\"\n{extra}"),
    );
    let address = server.listen_address("milter");
    (server, address)
}

/// Opens a milter connection as Postfix does: negotiation, connect, HELO.
fn open_session(address: &str) -> MilterClient {
    let mut client = MilterClient::connect(address);
    client.negotiate_all();
    let reply = client.connect_info("client.test", "192.0.2.10", 40000);
    assert_eq!(reply, Some(Response::Continue), "reply to connect");
    let reply = client.helo("client.test");
    assert_eq!(reply, Some(Response::Continue), "reply to HELO");
    client
}

/// Sends MAIL with `arguments` and the login macro set to `login` (empty
/// for none), and returns the reply.
fn mail(client: &mut MilterClient, arguments: &[&str], login: &str) -> Response {
    client.macros(SMFIC_MAIL, &[("{auth_authen}", login), ("{auth_type}", "")]);
    client.mail(arguments);
    client.read_response()
}

/// Sends a recipient, the headers and the body (sendguard waived the
/// replies to the headers and the end of headers), then the end of the message, and
/// returns the end-of-message responses.
fn send_content(
    client: &mut MilterClient,
    headers: &[(&str, &str)],
    chunks: &[&[u8]],
) -> Vec<Response> {
    // Over a unix socket sendguard waives the reply to RCPT and leaves
    // DATA out; the negotiation tests check which transport does what.
    let reply = client.rcpt(&["<bob@example.net>"]);
    assert_eq!(
        reply.unwrap_or(Response::Continue),
        Response::Continue,
        "reply to RCPT"
    );
    assert_eq!(
        client.data().unwrap_or(Response::Continue),
        Response::Continue,
        "reply to DATA"
    );
    for (name, value) in headers {
        client.header(name, value);
    }
    client.end_of_headers();
    for chunk in chunks {
        client.body(chunk);
        assert_eq!(
            client.read_response(),
            Response::Continue,
            "reply to a body chunk"
        );
    }
    client.macros(SMFIC_BODYEOB, &[("i", "4ABC123DEF")]);
    client.end_of_message()
}

#[test]
fn negotiation_requests_only_what_is_used() {
    let (_server, address) = start_milter("");
    let mut client = MilterClient::connect(&address);
    let negotiated = client.negotiate_all();

    assert_eq!(negotiated.version, 6);
    assert_eq!(negotiated.actions, SMFIF_ADDHDRS, "only header insertion");
    let expected = SMFIP_HDR_LEADSPC | SMFIP_NOHREPL | SMFIP_NR_EOH;
    assert_eq!(
        negotiated.options, expected,
        "options {:#x}, expected {expected:#x}",
        negotiated.options
    );
    assert_eq!(negotiated.options & SMFIP_NR_MAIL, 0, "MAIL needs a reply");
    // Postfix waits for its client after these stages. A skipped reply
    // there makes its next packet wait about 40 ms for the delayed ACK.
    assert_eq!(negotiated.options & SMFIP_NODATA, 0, "DATA is sent");
    assert_eq!(
        negotiated.options & SMFIP_NOUNKNOWN,
        0,
        "unknown commands are sent"
    );
    for (option, stage) in [
        (SMFIP_NR_CONN, "connect"),
        (SMFIP_NR_HELO, "HELO"),
        (SMFIP_NR_RCPT, "RCPT"),
    ] {
        assert_eq!(negotiated.options & option, 0, "{stage} gets a reply");
    }
    assert_eq!(
        negotiated.options & SMFIP_NR_BODY,
        0,
        "body chunks get replies"
    );
    assert!(
        negotiated
            .macros
            .contains(&(SMFIM_MAIL, "{auth_authen}".to_string())),
        "{:?}",
        negotiated.macros
    );
    assert!(
        negotiated.macros.contains(&(SMFIM_EOM, "i".to_string())),
        "{:?}",
        negotiated.macros
    );
    assert_eq!(negotiated.macros.len(), 2, "{:?}", negotiated.macros);
}

#[test]
fn negotiation_without_leading_space_closes() {
    let (server, address) = start_milter("");
    let mut client = MilterClient::connect(&address);
    client.send(
        SMFIC_OPTNEG_BYTE,
        &negotiation_payload(6, 0x1ff, 0x1f_ffff & !SMFIP_HDR_LEADSPC),
    );
    let received = client.read_until_closed();
    assert!(received.is_empty(), "no negotiation reply: {received:?}");
    assert!(
        server.log().contains("SMFIP_HDR_LEADSPC"),
        "{}",
        server.log()
    );
}

const SMFIC_OPTNEG_BYTE: u8 = b'O';

fn negotiation_payload(version: u32, actions: u32, options: u32) -> Vec<u8> {
    [version, actions, options]
        .iter()
        .flat_map(|word| word.to_be_bytes())
        .collect()
}

#[test]
fn clean_message_with_esmtp_arguments() {
    let (server, address) = start_milter("");
    let mut client = open_session(&address);
    let reply = mail(
        &mut client,
        &[
            "<alice@example.org>",
            "SIZE=120",
            "BODY=8BITMIME",
            "ENVID=abc123",
            "RET=HDRS",
        ],
        "",
    );
    assert_eq!(reply, Response::Continue);
    let responses = send_content(
        &mut client,
        &[("Subject", " lunch"), ("To", " bob@example.net")],
        &[b"Lunch at noon?\r\n"],
    );
    assert_eq!(responses, vec![Response::Continue]);
    client.expect_silence(SILENCE);
    client.quit();

    let log = server.log();
    for argument in ["SIZE=120", "BODY=8BITMIME", "ENVID=abc123", "RET=HDRS"] {
        assert!(log.contains(argument), "{argument} not logged:\n{log}");
    }
    assert!(server.events_of("bad_message").is_empty());
}

#[test]
fn empty_login_macro_means_no_login() {
    let (server, address) = start_milter("");
    let mut client = open_session(&address);
    assert_eq!(
        mail(&mut client, &["<carol@example.org>"], ""),
        Response::Continue
    );
    let body = format!("{GTUBE}\r\n");
    let responses = send_content(&mut client, &[("Subject", " offer")], &[body.as_bytes()]);
    let [Response::ReplyCode(text)] = responses.as_slice() else {
        panic!("expected one reply code: {responses:?}");
    };
    assert!(
        text.starts_with("550 5.7.1 Message rejected as spam"),
        "{text}"
    );

    let bad = server.events_of("bad_message");
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0]["mailbox"], "carol@example.org");
    assert!(bad[0]["login"].is_null(), "{}", bad[0]);
    assert_eq!(bad[0]["client"], "192.0.2.10");
    assert_eq!(bad[0]["sender"], "<carol@example.org>");
}

#[test]
fn login_macro_keys_the_mailbox() {
    let (server, address) = start_milter("");
    let mut client = open_session(&address);
    assert_eq!(
        mail(
            &mut client,
            &["<someone@elsewhere.example>"],
            "dave@example.org"
        ),
        Response::Continue
    );
    let body = format!("{GTUBE}\r\n");
    let responses = send_content(&mut client, &[("Subject", " offer")], &[body.as_bytes()]);
    assert!(
        matches!(responses.as_slice(), [Response::ReplyCode(_)]),
        "{responses:?}"
    );

    let bad = server.events_of("bad_message");
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0]["mailbox"], "dave@example.org");
    assert_eq!(bad[0]["login"], "dave@example.org");
}

#[test]
fn nul_bytes_scanned_whole() {
    let clamd = Clamd::start();
    let (server, address) =
        start_milter(&format!("[scan.clamd]\naddress = \"{}\"\n", clamd.address));
    let mut client = open_session(&address);
    assert_eq!(
        mail(&mut client, &["<erin@example.org>"], ""),
        Response::Continue
    );
    // The signature sits after NUL bytes and is split across two chunks.
    let (first_half, second_half) = EICAR.split_at(30);
    let mut first_chunk = b"binary\0\0\0data\r\n\0".to_vec();
    first_chunk.extend_from_slice(first_half.as_bytes());
    let mut second_chunk = second_half.as_bytes().to_vec();
    second_chunk.extend_from_slice(b"\r\n\0tail\r\n");
    let responses = send_content(
        &mut client,
        &[("Subject", " binary")],
        &[&first_chunk, &second_chunk],
    );
    let [Response::ReplyCode(text)] = responses.as_slice() else {
        panic!("expected one reply code: {responses:?}");
    };
    assert!(
        text.starts_with("550 5.7.1 Message rejected: virus"),
        "{text}"
    );
    assert!(text.contains("Eicar"), "{text}");

    let bad = server.events_of("bad_message");
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(
        bad[0]["verdict"].as_str().unwrap_or("").contains("Eicar"),
        "{}",
        bad[0]
    );
}

#[test]
fn end_of_message_data_gets_one_reply() {
    let (_server, address) = start_milter("");
    let mut client = open_session(&address);
    assert_eq!(
        mail(&mut client, &["<frank@example.org>"], ""),
        Response::Continue
    );
    let reply = client.rcpt(&["<bob@example.net>"]);
    assert_eq!(reply, Some(Response::Continue), "reply to RCPT");
    client.header("Subject", " last chunk");
    client.end_of_headers();
    // Body data inside the end-of-message packet, as libmilter allows.
    client.send(SMFIC_BODYEOB, format!("{GTUBE}\r\n").as_bytes());
    let response = client.read_response();
    assert!(
        matches!(&response, Response::ReplyCode(text) if text.starts_with("550 ")),
        "{response:?}"
    );
    client.expect_silence(SILENCE);
}

#[test]
fn tag_mode_inserts_header_at_top() {
    let (server, address) = start_milter("[scan.spam]\naction = \"tag\"\n");
    let mut client = open_session(&address);
    assert_eq!(
        mail(&mut client, &["<gina@example.org>"], ""),
        Response::Continue
    );
    let body = format!("{GTUBE}\r\n");
    let responses = send_content(&mut client, &[("Subject", " offer")], &[body.as_bytes()]);
    assert_eq!(responses.len(), 2, "{responses:?}");
    let Response::InsertHeader { index, name, value } = &responses[0] else {
        panic!("expected a header insertion: {responses:?}");
    };
    assert_eq!(*index, 0);
    assert_eq!(name, "X-Sendguard-Spam");
    assert!(value.starts_with(" Yes, spam"), "{value:?}");
    assert_eq!(responses[1], Response::Accept);

    let bad = server.wait_for_events(Duration::from_secs(5), |events| {
        events.iter().any(|event| event["type"] == "bad_message")
    });
    let bad: Vec<_> = bad
        .iter()
        .filter(|event| event["type"] == "bad_message")
        .collect();
    assert_eq!(bad[0]["queue_id"], "4ABC123DEF");
}

#[test]
fn blocked_mail_then_abort_then_new_transaction() {
    let (_server, address) = start_milter("[policy]\nthreshold = 2\nfirst_lockout = \"1h\"\n");
    let mut client = open_session(&address);
    let body = format!("{GTUBE}\r\n");
    for _ in 0..2 {
        assert_eq!(
            mail(&mut client, &["<mallory@example.org>"], ""),
            Response::Continue
        );
        let responses = send_content(&mut client, &[("Subject", " offer")], &[body.as_bytes()]);
        assert!(
            matches!(responses.as_slice(), [Response::ReplyCode(_)]),
            "{responses:?}"
        );
    }

    // The lockout refuses MAIL with sendguard's text, and nothing else.
    let reply = mail(&mut client, &["<mallory@example.org>", "SIZE=100"], "");
    let Response::ReplyCode(text) = &reply else {
        panic!("expected a reply code: {reply:?}");
    };
    assert!(
        text.starts_with("550 5.7.1 Sender mallory@example.org is locked out until "),
        "{text}"
    );
    client.expect_silence(SILENCE);

    // ABORT needs no reply; the next MAIL starts a new transaction.
    client.abort();
    client.expect_silence(SILENCE);
    assert_eq!(
        mail(&mut client, &["<alice@example.org>"], ""),
        Response::Continue
    );
    client.expect_silence(SILENCE);
    let responses = send_content(&mut client, &[("Subject", " hello")], &[b"Hi Bob\r\n"]);
    assert_eq!(responses, vec![Response::Continue]);
    client.expect_silence(SILENCE);

    // An ABORT in the middle of a message drops it; the next one is judged
    // on its own.
    assert_eq!(
        mail(&mut client, &["<alice@example.org>"], ""),
        Response::Continue
    );
    let reply = client.rcpt(&["<bob@example.net>"]);
    assert_eq!(reply, Some(Response::Continue), "reply to RCPT");
    client.header("Subject", " dropped");
    client.end_of_headers();
    client.body(body.as_bytes());
    assert_eq!(client.read_response(), Response::Continue);
    client.abort();
    client.expect_silence(SILENCE);
    assert_eq!(
        mail(&mut client, &["<alice@example.org>"], ""),
        Response::Continue
    );
    let responses = send_content(&mut client, &[("Subject", " clean")], &[b"Fine\r\n"]);
    assert_eq!(responses, vec![Response::Continue]);
    client.quit();
}

#[test]
fn oversized_message_rejected() {
    let (_server, address) = start_milter("");
    let mut client = open_session(&address);
    // The default smtp.max_message_size is 25 MiB.
    let reply = mail(&mut client, &["<hugo@example.org>", "SIZE=30000000"], "");
    let Response::ReplyCode(text) = &reply else {
        panic!("expected a reply code: {reply:?}");
    };
    assert!(text.starts_with("552 5.3.4 "), "{text}");
    client.expect_silence(SILENCE);
}

#[test]
fn dropped_connection_mid_message() {
    let (server, address) = start_milter("");
    let mut client = open_session(&address);
    assert_eq!(
        mail(&mut client, &["<ivan@example.org>"], ""),
        Response::Continue
    );
    let reply = client.rcpt(&["<bob@example.net>"]);
    assert_eq!(reply, Some(Response::Continue), "reply to RCPT");
    client.header("Subject", " cut off");
    client.end_of_headers();
    client.body(format!("{GTUBE}\r\n").as_bytes());
    assert_eq!(client.read_response(), Response::Continue);
    client.drop_connection();

    // sendguard serves the next connection as usual.
    let mut client = open_session(&address);
    assert_eq!(
        mail(&mut client, &["<ivan@example.org>"], ""),
        Response::Continue
    );
    let responses = send_content(&mut client, &[("Subject", " again")], &[b"Complete\r\n"]);
    assert_eq!(responses, vec![Response::Continue]);
    client.quit();

    assert!(
        server.events_of("bad_message").is_empty(),
        "the cut-off message was never judged"
    );
    assert!(server.log().contains("aborted"), "{}", server.log());
}

#[test]
fn malformed_packet_closes_connection() {
    let (server, address) = start_milter("");
    let mut client = open_session(&address);
    assert_eq!(
        mail(&mut client, &["<judy@example.org>"], ""),
        Response::Continue
    );
    let reply = client.rcpt(&["<bob@example.net>"]);
    assert_eq!(reply, Some(Response::Continue), "reply to RCPT");
    client.header("Subject", " malformed");
    client.end_of_headers();
    // A body packet that claims 4 GiB.
    client.send_raw(&[0xff, 0xff, 0xff, 0xff, b'B', b'x']);
    let received = client.read_until_closed();
    assert!(received.is_empty(), "no reply expected: {received:?}");

    // An unknown command byte ends the connection too.
    let mut client = open_session(&address);
    assert_eq!(
        mail(&mut client, &["<judy@example.org>"], ""),
        Response::Continue
    );
    client.send(b'Z', b"");
    let received = client.read_until_closed();
    assert!(received.is_empty(), "no reply expected: {received:?}");

    // And the milter still serves.
    let mut client = open_session(&address);
    assert_eq!(
        mail(&mut client, &["<judy@example.org>"], ""),
        Response::Continue
    );
    let responses = send_content(&mut client, &[("Subject", " fine")], &[b"ok\r\n"]);
    assert_eq!(responses, vec![Response::Continue]);
    assert!(server.events_of("bad_message").is_empty());
}

#[test]
fn unix_socket_replaces_stale_file_and_is_removed() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let socket = dir.path().join("milter.sock");
    // A socket file that no process listens on any more, as a killed process
    // leaves it.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind the stale socket"));
    assert!(socket.exists());

    let mut server = Sendguard::start(
        &closed_address(),
        &format!("[milter]\nlisten = \"{}\"\n", socket.display()),
    );
    let mut client = MilterClient::connect_unix(&socket);
    let negotiated = client.negotiate_all();
    // No Nagle's algorithm on a unix socket, so the replies that always
    // continue are waived, and DATA and unknown commands are left out.
    let expected = SMFIP_HDR_LEADSPC
        | SMFIP_NOHREPL
        | SMFIP_NR_EOH
        | SMFIP_NR_CONN
        | SMFIP_NR_HELO
        | SMFIP_NR_RCPT
        | SMFIP_NODATA
        | SMFIP_NOUNKNOWN;
    assert_eq!(
        negotiated.options, expected,
        "options {:#x}, expected {expected:#x}",
        negotiated.options
    );
    assert_eq!(
        client.connect_info("client.test", "192.0.2.10", 40000),
        None
    );
    assert_eq!(
        mail(&mut client, &["<kim@example.org>"], ""),
        Response::Continue
    );
    let responses = send_content(
        &mut client,
        &[("Subject", " unix")],
        &[b"Over a socket\r\n"],
    );
    assert_eq!(responses, vec![Response::Continue]);
    client.quit();

    server.terminate();
    assert!(
        server.wait_exit(Duration::from_secs(40)),
        "sendguard stopped"
    );
    assert!(!socket.exists(), "socket removed at shutdown");
}

#[test]
fn unix_socket_in_use_fails_start() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let socket = dir.path().join("milter.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind the socket");
    let config = dir.path().join("sendguard.toml");
    std::fs::write(
        &config,
        format!(
            "[smtp]\nlisten = \"127.0.0.1:{}\"\n[upstream]\naddress = \"{}\"\n\
             [store]\npath = \"{}\"\n[milter]\nlisten = \"{}\"\n",
            free_port(),
            closed_address(),
            dir.path().join("sendguard.db").display(),
            socket.display()
        ),
    )
    .expect("write config");

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sendguard"))
        .args(["serve", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start sendguard");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll sendguard") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("sendguard kept running with its milter socket in use");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert!(!status.success());
    assert!(
        stderr.contains("cannot listen for milter connections on"),
        "{stderr}"
    );
    assert!(socket.exists(), "the other process's socket is kept");
}
