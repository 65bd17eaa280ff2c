//! Resource limits through the real binary: connections, recipients,
//! timeouts and slow clients.

mod common;

use common::sendguard::Sendguard;
use common::smtp_client::SmtpClient;
use common::upstream::{Upstream, UpstreamOptions};
use std::time::{Duration, Instant};

/// Connects until the server greets with 220: the harness's own readiness
/// probe may still hold a place for a moment after start.
fn connect_admitted(address: &str) -> SmtpClient {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let client = SmtpClient::connect(address);
        if client.greeting().code == 220 {
            return client;
        }
        assert!(
            Instant::now() < deadline,
            "never admitted: {}",
            client.greeting().text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn connections_per_client_limited() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start_with(
        &upstream.address(),
        "max_connections_per_client = 2\nmax_connections = 3",
        "",
    );
    let first = connect_admitted(&server.address);
    let second = connect_admitted(&server.address);
    let mut third = SmtpClient::connect_without_greeting(&server.address);
    let refused = third.read_reply();
    assert_eq!(refused.code, 421, "{}", refused.text());
    assert!(
        refused.text().contains("from your address"),
        "{}",
        refused.text()
    );

    // Another client address still gets in, up to the total.
    let other = SmtpClient::connect_from(&server.address, "127.0.0.2");
    assert_eq!(other.greeting().code, 220);
    let mut over_total = SmtpClient::connect_without_greeting_from(&server.address, "127.0.0.3");
    assert_eq!(over_total.read_reply().code, 421);

    // Closing a connection frees its place.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut again = SmtpClient::connect_without_greeting(&server.address);
        if again.read_reply().code == 220 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the freed place was never reused"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(second);
}

#[test]
fn recipients_per_message_limited() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start_with(&upstream.address(), "max_recipients = 2", "");
    let mut client = SmtpClient::connect(&server.address);
    client.cmd("EHLO client.test", 250);
    client.cmd("MAIL FROM:<a@example.org>", 250);
    client.cmd("RCPT TO:<b1@example.net>", 250);
    client.cmd("RCPT TO:<b2@example.net>", 250);
    let reply = client.cmd("RCPT TO:<b3@example.net>", 452);
    assert_eq!(reply.enhanced_code(), Some("4.5.3"));
    client.data(
        &common::smtp_client::data_payload(b"Subject: x\r\n\r\nhi\r\n"),
        250,
    );
    client.quit();
    let messages = upstream.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(messages[0].accepted_rcpts.len(), 2);
}

#[test]
fn idle_client_timed_out() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start_with(&upstream.address(), "greeting_timeout = \"1s\"", "");
    let mut client = SmtpClient::connect(&server.address);
    let started = Instant::now();
    let reply = client.expect_closed().expect("a timeout reply");
    assert_eq!(reply.code, 421, "{}", reply.text());
    assert!(started.elapsed() >= Duration::from_millis(800));
}

#[test]
fn slow_client_does_not_starve_others() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), "");
    // One client dribbles a message at one byte every 200 ms (about 7 s).
    let address = server.address.clone();
    let slow = std::thread::spawn(move || {
        let mut client = SmtpClient::connect(&address);
        client.cmd("EHLO slow.test", 250);
        client.cmd("MAIL FROM:<slow@example.org>", 250);
        client.cmd("RCPT TO:<b@example.net>", 250);
        client.cmd("DATA", 354);
        for byte in b"Subject: slow\r\n\r\nbyte by byte\r\n.\r\n" {
            client.send_raw(&[*byte]);
            std::thread::sleep(Duration::from_millis(200));
        }
        client.read_reply().code
    });

    // Meanwhile others are served at once.
    std::thread::sleep(Duration::from_millis(300));
    for index in 0..20 {
        let mut client = SmtpClient::connect(&server.address);
        client.cmd("EHLO fast.test", 250);
        let reply = client.send_message(
            &format!("fast{index}@example.org"),
            &["b@example.net"],
            b"Subject: x\r\n\r\nhi\r\n",
        );
        assert_eq!(reply.code, 250);
        client.quit();
    }
    // All twenty went through while the slow message was still arriving.
    assert!(
        !slow.is_finished(),
        "the other clients waited for the slow one"
    );
    assert_eq!(slow.join().expect("slow client"), 250);
}

#[test]
fn many_idle_connections_do_not_block_service() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start_with(
        &upstream.address(),
        "max_connections = 2100\nmax_connections_per_client = 2100",
        "",
    );
    // 2 000 clients connect and say nothing (bounded: they close at the end).
    let mut idle = Vec::with_capacity(2000);
    for _ in 0..2000 {
        idle.push(std::net::TcpStream::connect(&server.address).expect("connect"));
    }
    let mut client = SmtpClient::connect(&server.address);
    client.cmd("EHLO busy.test", 250);
    let reply = client.send_message(
        "a@example.org",
        &["b@example.net"],
        b"Subject: x\r\n\r\nhi\r\n",
    );
    assert_eq!(reply.code, 250);
    client.quit();

    let pid_status =
        std::fs::read_to_string(format!("/proc/{}/status", server.pid())).expect("proc status");
    let rss_kib: u64 = pid_status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .expect("VmRSS");
    // 2 000 idle sessions each hold a 64 KiB read buffer at most.
    assert!(
        rss_kib < 400 * 1024,
        "RSS {rss_kib} KiB with 2000 idle connections"
    );
    drop(idle);
}

/// Counts the threads of process `pid` named `name`.
fn threads_named(pid: u32, name: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("list the threads")
        .filter_map(Result::ok)
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == name)
        })
        .count()
}

#[test]
fn worker_threads_setting_applied() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start_with(&upstream.address(), "worker_threads = 3", "");
    let mut client = SmtpClient::connect(&server.address);
    client.cmd("EHLO client.test", 250);
    let reply = client.send_message(
        "alice@example.org",
        &["bob@example.net"],
        b"Subject: x\r\n\r\nhi\r\n",
    );
    assert_eq!(reply.code, 250, "{}", reply.text());
    client.quit();
    assert_eq!(threads_named(server.pid(), "tokio-rt-worker"), 3);
}
