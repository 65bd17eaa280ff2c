//! Upstream sessions kept between client sessions: reuse after RSET,
//! closing on idle time, shutdown and reload, and replacing a kept session
//! that the upstream ended.

mod common;

use common::sendguard::Sendguard;
use common::smtp_client::SmtpClient;
use common::upstream::{Upstream, UpstreamOptions};
use std::time::{Duration, Instant};

const MESSAGE: &[u8] = b"Subject: pool\r\n\r\nHello again.\r\n";

/// Sends one message in a session of its own and checks the reply.
fn send_in_new_session(address: &str, sender: &str) {
    let mut client = SmtpClient::connect(address);
    client.cmd("EHLO client.test", 250);
    let reply = client.send_message(sender, &["bob@example.net"], MESSAGE);
    assert_eq!(reply.code, 250, "{}", reply.text());
    client.quit();
}

/// Counts `needle` in everything the upstream received on connection
/// `index`.
fn count_in_connection(upstream: &Upstream, index: usize, needle: &str) -> usize {
    upstream
        .connection_transcripts()
        .get(index)
        .map_or(0, |connection| {
            String::from_utf8_lossy(&connection.received)
                .matches(needle)
                .count()
        })
}

/// Waits until connection `index` of the upstream has received `needle`
/// `count` times.
fn wait_for_in_connection(upstream: &Upstream, index: usize, needle: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while count_in_connection(upstream, index, needle) < count {
        assert!(
            Instant::now() < deadline,
            "connection {index} did not receive {needle:?} {count} times: {:?}",
            upstream
                .connection_transcripts()
                .get(index)
                .map(|connection| String::from_utf8_lossy(&connection.received).into_owned())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start(upstream: &Upstream, upstream_extra: &str) -> Sendguard {
    Sendguard::start_full(&upstream.address(), "", upstream_extra, "")
}

#[test]
fn sessions_share_upstream_connection() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = start(&upstream, "");

    send_in_new_session(&server.address, "alice@example.org");
    // The first client's upstream session is reset when it leaves.
    wait_for_in_connection(&upstream, 0, "RSET\r\n", 1);
    send_in_new_session(&server.address, "carol@example.org");
    wait_for_in_connection(&upstream, 0, "RSET\r\n", 2);

    assert_eq!(upstream.connections(), 1);
    let received = upstream.wait_for_messages(2, Duration::from_secs(5));
    assert_eq!(received[0].mail_line, "MAIL FROM:<alice@example.org>");
    assert_eq!(received[1].mail_line, "MAIL FROM:<carol@example.org>");
    assert_eq!(count_in_connection(&upstream, 0, "EHLO "), 1);
    assert_eq!(count_in_connection(&upstream, 0, "QUIT\r\n"), 0);
}

#[test]
fn idle_upstream_session_quits() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = start(&upstream, "pool_idle_time = \"1s\"");

    send_in_new_session(&server.address, "alice@example.org");
    wait_for_in_connection(&upstream, 0, "RSET\r\n", 1);
    // Closed within a few seconds of its idle time, by the periodic sweep.
    wait_for_in_connection(&upstream, 0, "QUIT\r\n", 1);
    assert_eq!(upstream.connections(), 1);
    drop(server);
}

#[test]
fn pool_off_opens_connection_per_session() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = start(&upstream, "pool_size = 0");

    send_in_new_session(&server.address, "alice@example.org");
    send_in_new_session(&server.address, "carol@example.org");
    upstream.wait_for_messages(2, Duration::from_secs(5));

    // The probe at start has a connection of its own, closed at once too.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let transcripts: Vec<String> = upstream
            .connection_transcripts()
            .iter()
            .map(|connection| String::from_utf8_lossy(&connection.received).into_owned())
            .collect();
        let with_mail: Vec<&String> = transcripts
            .iter()
            .filter(|text| text.contains("MAIL FROM:"))
            .collect();
        if with_mail.len() == 2 && with_mail.iter().all(|text| text.ends_with("QUIT\r\n")) {
            assert!(transcripts.iter().all(|text| !text.contains("RSET")));
            break;
        }
        assert!(Instant::now() < deadline, "{transcripts:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn closed_idle_session_replaced() {
    // The upstream drops a connection that stays idle for 300 ms.
    let upstream =
        Upstream::start(UpstreamOptions::default().read_timeout(Duration::from_millis(300)));
    let server = start(&upstream, "");

    send_in_new_session(&server.address, "alice@example.org");
    let first = upstream.connections() - 1;
    wait_for_in_connection(&upstream, first, "RSET\r\n", 1);
    std::thread::sleep(Duration::from_secs(1));
    send_in_new_session(&server.address, "carol@example.org");

    let received = upstream.wait_for_messages(2, Duration::from_secs(5));
    assert_eq!(received.len(), 2);
    assert_eq!(count_in_connection(&upstream, first, "MAIL FROM:"), 1);
    assert_eq!(upstream.connections(), first + 2);
}

#[test]
fn kept_session_refusing_mail_replaced() {
    // The second MAIL, the first on the kept session, gets 421, as when the
    // upstream times the session out just as it is reused.
    let upstream = Upstream::start(
        UpstreamOptions::default().mail_replies(&["250 2.1.0 Ok", "421 4.4.2 idle too long"]),
    );
    let server = start(&upstream, "");

    send_in_new_session(&server.address, "alice@example.org");
    wait_for_in_connection(&upstream, 0, "RSET\r\n", 1);
    send_in_new_session(&server.address, "carol@example.org");

    let received = upstream.wait_for_messages(2, Duration::from_secs(5));
    assert_eq!(received[1].mail_line, "MAIL FROM:<carol@example.org>");
    assert_eq!(upstream.connections(), 2);
    assert_eq!(count_in_connection(&upstream, 1, "MAIL FROM:"), 1);
}

#[test]
fn shutdown_quits_kept_sessions() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let mut server = start(&upstream, "pool_idle_time = \"5m\"");

    send_in_new_session(&server.address, "alice@example.org");
    wait_for_in_connection(&upstream, 0, "RSET\r\n", 1);
    server.terminate();
    assert!(server.wait_exit(Duration::from_secs(10)), "sendguard exits");
    assert_eq!(count_in_connection(&upstream, 0, "QUIT\r\n"), 1);
}

#[test]
fn reload_drops_sessions_of_old_upstream() {
    let first = Upstream::start(UpstreamOptions::default());
    let second = Upstream::start(UpstreamOptions::default());
    let server = start(&first, "pool_idle_time = \"5m\"");

    send_in_new_session(&server.address, "alice@example.org");
    wait_for_in_connection(&first, 0, "RSET\r\n", 1);
    let first_address = first.address();
    let second_address = second.address();
    server.rewrite_config(|config| config.replace(&first_address, &second_address));
    server.reload();
    wait_for_in_connection(&first, 0, "QUIT\r\n", 1);
    send_in_new_session(&server.address, "carol@example.org");

    let received = second.wait_for_messages(1, Duration::from_secs(5));
    assert_eq!(received[0].mail_line, "MAIL FROM:<carol@example.org>");
    assert_eq!(first.messages().len(), 1);
}

#[test]
fn slow_rset_frees_client_at_once() {
    // One connection per client address: the second client is admitted
    // only once the first one's place is free again.
    let upstream = Upstream::start(UpstreamOptions::default().rset_delay(Duration::from_secs(10)));
    let server = Sendguard::start_full(
        &upstream.address(),
        "max_connections_per_client = 1",
        "",
        "",
    );

    send_in_new_session(&server.address, "alice@example.org");
    let started = Instant::now();
    let second = SmtpClient::connect(&server.address);
    assert_eq!(second.greeting().code, 220, "{}", second.greeting().text());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "second client waited for the first one's RSET"
    );
}

#[test]
fn shutdown_bounded_when_quit_unanswered() {
    let upstream = Upstream::start(UpstreamOptions::default().ignore_quit());
    let mut server = start(&upstream, "pool_idle_time = \"5m\"");

    // Four clients at once leave four kept sessions.
    let address = server.address.clone();
    let clients: Vec<_> = (0..4)
        .map(|index| {
            let address = address.clone();
            std::thread::spawn(move || {
                let mut client = SmtpClient::connect(&address);
                client.cmd("EHLO client.test", 250);
                client.cmd(&format!("MAIL FROM:<user{index}@example.org>"), 250);
                std::thread::sleep(Duration::from_millis(500));
                client.quit();
            })
        })
        .collect();
    for client in clients {
        client.join().expect("client thread");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while (0..upstream.connections())
        .filter(|index| count_in_connection(&upstream, *index, "RSET\r\n") > 0)
        .count()
        < 4
    {
        assert!(Instant::now() < deadline, "four sessions kept");
        std::thread::sleep(Duration::from_millis(20));
    }

    let started = Instant::now();
    server.terminate();
    assert!(server.wait_exit(Duration::from_secs(30)), "sendguard exits");
    // The QUITs go out together and are waited for 5 s in all, not 5 s
    // each.
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "shutdown took {:?}",
        started.elapsed()
    );
}
