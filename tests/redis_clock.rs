//! A relay host whose clock is two hours slow shares a Redis store with
//! one whose clock is right: lockout times come from Redis's clock, so the
//! slow host neither shortens nor lengthens a lockout. The slow clock comes
//! from libfaketime (Debian package libfaketime), preloaded into that one
//! sendguard process.
//!
//! Environment: `SENDGUARD_FAKETIME_LIB` sets the library; the default is
//! Debian's multithreaded build.

mod common;

use common::redis::{RedisServer, wait_until_subscribed};
use common::sendguard::Sendguard;
use common::smtp_client::send_from;
use common::upstream::{Upstream, UpstreamOptions};
use sendguard::policy::Timestamp;
use std::time::{Duration, Instant};

const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";
const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

fn spam_message() -> Vec<u8> {
    format!("From: sender@example.org\r\nTo: bob@example.net\r\nSubject: offer\r\n\r\n{GTUBE}\r\n")
        .into_bytes()
}

fn clean_message() -> Vec<u8> {
    b"From: sender@example.org\r\nTo: bob@example.net\r\nSubject: hello\r\n\r\nSee you at lunch.\r\n".to_vec()
}

fn rfc3339_millis(value: &serde_json::Value) -> i64 {
    let text = value.as_str().expect("time string");
    Timestamp::parse_rfc3339(text)
        .expect("RFC 3339 time")
        .millis()
}

#[test]
fn slow_host_clock_keeps_lockout_length() {
    let library =
        std::env::var("SENDGUARD_FAKETIME_LIB").unwrap_or_else(|_| FAKETIME_LIB.to_string());
    assert!(
        std::path::Path::new(&library).is_file(),
        "{library} is missing; install Debian's libfaketime (scripts/install-deps.sh does)"
    );
    let redis = RedisServer::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let extra = format!(
        "backend = \"redis\"\nurl = \"{}\"\n[policy]\nthreshold = 2\nwindow = \"10m\"\nfirst_lockout = \"4s\"\n",
        redis.url()
    );
    let right = Sendguard::start(&upstream.address(), &extra);
    // Only the second sendguard starts with the slow clock: this test is
    // alone in its binary, so no other test inherits the variables.
    // SAFETY: no other thread of this test binary reads the environment
    // while it changes.
    unsafe {
        std::env::set_var("LD_PRELOAD", &library);
        std::env::set_var("FAKETIME", "-2h");
        std::env::set_var("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    }
    let slow = Sendguard::start(&upstream.address(), &extra);
    unsafe {
        std::env::remove_var("LD_PRELOAD");
        std::env::remove_var("FAKETIME");
        std::env::remove_var("FAKETIME_DONT_FAKE_MONOTONIC");
    }

    wait_until_subscribed(&right);
    wait_until_subscribed(&slow);

    // The slow host counts the strike that starts the lockout.
    assert_eq!(
        send_from(&right.address, "lena@example.org", &spam_message()).0,
        550
    );
    let before = Timestamp::now().millis();
    assert_eq!(
        send_from(&slow.address, "lena@example.org", &spam_message()).0,
        550
    );
    for host in [&right, &slow] {
        let (code, text) = send_from(&host.address, "lena@example.org", &clean_message());
        assert_eq!(code, 550, "{text}");
    }

    // The lockout is dated by Redis's clock (this machine's, here), not the
    // slow host's, and lasts first_lockout.
    let started = right.events_of("lockout_started");
    assert_eq!(started.len(), 1, "{started:#?}");
    let start = rfc3339_millis(&started[0]["time"]);
    assert!(
        (start - before).abs() < 60_000,
        "lockout dated {start}, test clock {before}"
    );
    let until = rfc3339_millis(&started[0]["until"]);
    assert_eq!((until - start) / 1000, 4);

    // Both hosts let the mailbox send again once it ends; by its own clock
    // the slow host would wait two hours more.
    for (name, host) in [("right", &right), ("slow", &slow)] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while send_from(&host.address, "lena@example.org", &clean_message()).0 != 250 {
            assert!(
                Instant::now() < deadline,
                "{name} host still refuses:\n{}",
                host.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
