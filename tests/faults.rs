//! Fault tolerance through the real binary: a scanner that stops, a store
//! that fills up, a crash in a burst, shutdown and reload.

mod common;

use common::clamd::Clamd;
use common::sendguard::Sendguard;
use common::smtp_client::SmtpClient;
use common::upstream::{Upstream, UpstreamOptions};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

fn session(address: &str) -> SmtpClient {
    let mut client = SmtpClient::connect(address);
    client.cmd("EHLO client.test", 250);
    client
}

fn send(address: &str, from: &str, content: &[u8]) -> u16 {
    let mut client = session(address);
    let reply = client.send_message(from, &["bob@example.net"], content);
    client.quit();
    reply.code
}

fn spam() -> Vec<u8> {
    format!("Subject: x\r\n\r\n{GTUBE}\r\n").into_bytes()
}

const CLEAN: &[u8] = b"Subject: hello\r\n\r\nLunch at noon?\r\n";

#[test]
fn clamd_stop_then_recovery() {
    let mut clamd = Clamd::start_with(None);
    let upstream = Upstream::start(UpstreamOptions::default());
    let extra = format!(
        "[scan.clamd]\naddress = \"{}\"\ntimeout = \"5s\"\n",
        clamd.address
    );
    let server = Sendguard::start(&upstream.address(), &extra);
    assert_eq!(send(&server.address, "a@example.org", CLEAN), 250);

    clamd.stop();
    let mut client = session(&server.address);
    let reply = client.send_message("a@example.org", &["bob@example.net"], CLEAN);
    assert_eq!(reply.code, 451, "{}", reply.text());
    assert_eq!(reply.enhanced_code(), Some("4.7.1"));
    client.quit();

    clamd.restart();
    assert_eq!(send(&server.address, "a@example.org", CLEAN), 250);
    assert_eq!(upstream.messages().len(), 2, "nothing relayed unscanned");
    assert!(server.events_of("bad_message").is_empty());
}

/// A small tmpfs mounted for the test and unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().expect("temporary directory");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mounting a tmpfs needs root, as CI runs");
        SmallDisk { dir }
    }

    fn fill(&self) {
        // dd stops with "No space left on device", which is the point.
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", self.dir.path().join("filler").display()))
            .output();
    }

    fn remount_read_only(&self) {
        let status = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(self.dir.path())
            .status()
            .expect("run mount");
        assert!(status.success());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn full_store_disk_tempfails() {
    let disk = SmallDisk::mount("2m");
    let upstream = Upstream::start(UpstreamOptions::default());
    let store = disk.dir.path().join("sendguard.db");
    let mut server = Sendguard::start(&upstream.address(), "[policy]\nthreshold = 100\n");
    // Point the store at the small disk.
    server.rewrite_config(|text| {
        let start = text.find("[store]").expect("store section");
        let end = text[start..]
            .find("\n[")
            .map_or(text.len(), |offset| start + offset + 1);
        format!(
            "{}[store]\npath = \"{}\"\n{}",
            &text[..start],
            store.display(),
            &text[end..]
        )
    });
    server.restart();
    assert_eq!(
        send(&server.address, "a@example.org", &spam()),
        550,
        "the store works at first"
    );

    disk.fill();
    // SQLite may still write a few transactions into space its WAL file
    // already holds, so send bad messages until the disk is really full.
    let mut client = session(&server.address);
    let mut codes = Vec::new();
    for index in 0..300 {
        let sender = format!("full{index}@example.org");
        let reply = client.send_message(&sender, &["bob@example.net"], &spam());
        codes.push(reply.code);
        if reply.code != 550 {
            break;
        }
    }
    assert_eq!(
        codes.last(),
        Some(&451),
        "a strike that cannot be stored tempfails: {codes:?}"
    );
    // The server keeps serving; clean mail writes nothing and goes through.
    let reply = client.send_message("a@example.org", &["bob@example.net"], CLEAN);
    assert_eq!(reply.code, 250, "{}", reply.text());
    client.quit();

    assert!(
        server.log().contains("cannot record the strike"),
        "{}",
        server.log()
    );
    server.kill9();

    // A store on a read-only disk: SQLite opens it read-only, so sendguard
    // serves, and every strike it cannot store tempfails. (A disk that turns
    // read-only under a running server fails writes just as the full one
    // above; Linux refuses such a remount while files are open, so the test
    // remounts while sendguard is stopped.)
    let _ = std::fs::remove_file(disk.dir.path().join("filler"));
    disk.remount_read_only();
    server.restart();
    let mut client = session(&server.address);
    let reply = client.send_message("d@example.org", &["bob@example.net"], &spam());
    assert_eq!(reply.code, 451, "{}", reply.text());
    let reply = client.send_message("d@example.org", &["bob@example.net"], CLEAN);
    assert_eq!(reply.code, 250, "{}", reply.text());
    client.quit();
    server.kill9();
}

#[test]
fn kill_during_burst_keeps_acknowledged_strikes() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let mut server = Sendguard::start(&upstream.address(), "[policy]\nthreshold = 1000\n");
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for worker in 0..6 {
        let address = server.address.clone();
        let stop = stop.clone();
        workers.push(std::thread::spawn(move || {
            let mailbox = format!("burst{worker}@example.org");
            let mut acknowledged = 0u32;
            // Bounded: at most 2000 messages, and it stops at the kill.
            for _ in 0..2000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = std::net::TcpStream::connect(&address) else {
                    break;
                };
                drop(stream);
                let result = std::panic::catch_unwind(|| {
                    let mut client = SmtpClient::connect(&address);
                    client.set_timeout(Duration::from_secs(5));
                    client.cmd("EHLO burst.test", 250);
                    client
                        .send_message(&mailbox, &["bob@example.net"], &spam())
                        .code
                });
                match result {
                    Ok(550) => acknowledged += 1,
                    _ => break,
                }
            }
            (mailbox, acknowledged)
        }));
    }
    std::thread::sleep(Duration::from_millis(1500));
    server.kill9();
    stop.store(true, Ordering::SeqCst);
    let results: Vec<(String, u32)> = workers
        .into_iter()
        .map(|worker| worker.join().expect("worker"))
        .collect();
    server.restart();

    let mut total = 0;
    for (mailbox, acknowledged) in results {
        total += acknowledged;
        let output = server.cli(&["status", &mailbox]);
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let stored: u32 = text
            .lines()
            .find_map(|line| line.strip_prefix("strikes in window: "))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|count| count.parse().ok())
            .unwrap_or(0);
        assert!(
            stored >= acknowledged,
            "{mailbox}: {acknowledged} rejections acknowledged, {stored} strikes stored"
        );
        assert!(
            stored <= acknowledged + 1,
            "{mailbox}: at most the one in flight is extra"
        );
    }
    assert!(total > 10, "the burst ran ({total} acknowledged)");
}

#[test]
fn sigterm_drains_transactions() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let mut server = Sendguard::start(&upstream.address(), "");
    let mut busy = session(&server.address);
    busy.cmd("MAIL FROM:<a@example.org>", 250);
    busy.cmd("RCPT TO:<bob@example.net>", 250);
    busy.cmd("DATA", 354);
    busy.send_raw(b"Subject: in flight\r\n\r\nfirst half\r\n");
    let mut idle = session(&server.address);

    server.terminate();
    let reply = idle.expect_closed().expect("a reply to the idle client");
    assert_eq!(reply.code, 421, "{}", reply.text());
    assert_eq!(reply.enhanced_code(), Some("4.3.0"));

    // The transaction in flight finishes, then the session is closed.
    busy.send_raw(b"second half\r\n.\r\n");
    assert_eq!(busy.read_reply().code, 250);
    let closing = busy.expect_closed().expect("a closing reply");
    assert_eq!(closing.code, 421);
    assert!(
        server.wait_exit(Duration::from_secs(10)),
        "sendguard exits after draining"
    );
    let messages = upstream.wait_for_messages(1, Duration::from_secs(5));
    assert_eq!(
        messages[0].content,
        b"Subject: in flight\r\n\r\nfirst half\r\nsecond half\r\n".to_vec()
    );
}

#[test]
fn reload_applies_new_limits() {
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start_with(&upstream.address(), "max_recipients = 1", "");
    let mut before = session(&server.address);
    before.cmd("MAIL FROM:<a@example.org>", 250);
    before.cmd("RCPT TO:<b1@example.net>", 250);
    before.cmd("RCPT TO:<b2@example.net>", 452);
    before.quit();

    server.rewrite_config(|text| text.replace("max_recipients = 1", "max_recipients = 2"));
    server.reload();
    let mut after = session(&server.address);
    after.cmd("MAIL FROM:<a@example.org>", 250);
    after.cmd("RCPT TO:<b1@example.net>", 250);
    after.cmd("RCPT TO:<b2@example.net>", 250);
    after.quit();
}

#[test]
fn upstream_reply_timeout_tempfails() {
    let upstream =
        Upstream::start(UpstreamOptions::default().data_reply_delay(Duration::from_secs(3)));
    let server = Sendguard::start(&upstream.address(), "");
    server.rewrite_config(|text| {
        text.replace(
            "timeout = \"10s\"",
            "timeout = \"10s\"\ndata_timeout = \"1s\"",
        )
    });
    server.reload();
    let mut client = session(&server.address);
    let started = Instant::now();
    let reply = client.send_message("a@example.org", &["bob@example.net"], CLEAN);
    assert_eq!(
        reply.code,
        451,
        "never 250 without the upstream's own: {}",
        reply.text()
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the upstream timeout applied"
    );
    client.quit();
}
