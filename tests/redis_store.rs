//! Several relay hosts sharing one policy through a real redis-server
//! (append-only file fsynced on every write): three sendguard processes,
//! one Redis, GTUBE spam as the bad message.

mod common;

use common::redis::{RedisServer, wait_until_subscribed};
use common::sendguard::Sendguard;
use common::smtp_client::send_from;
use common::upstream::{Upstream, UpstreamOptions};
use sendguard::policy::Timestamp;
use serde_json::Value;
use std::time::{Duration, Instant};

const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

fn clean_message() -> Vec<u8> {
    b"From: sender@example.org\r\nTo: bob@example.net\r\nSubject: hello\r\n\r\nSee you at lunch.\r\n".to_vec()
}

fn spam_message() -> Vec<u8> {
    format!("From: sender@example.org\r\nTo: bob@example.net\r\nSubject: offer\r\n\r\n{GTUBE}\r\n")
        .into_bytes()
}

/// Returns the `[store]` lines after `path` that point a host at `redis`,
/// then `extra` (more sections).
fn redis_config(redis: &RedisServer, extra: &str) -> String {
    format!(
        "backend = \"redis\"\nurl = \"{}\"\nkey_prefix = \"test:\"\n{extra}\n",
        redis.url()
    )
}

/// Starts `count` hosts sharing `redis`, each relaying to `upstream`, and
/// waits until each has subscribed to the other hosts' changes.
fn start_hosts(
    count: usize,
    upstream: &Upstream,
    redis: &RedisServer,
    extra: &str,
) -> Vec<Sendguard> {
    let hosts: Vec<Sendguard> = (0..count)
        .map(|_| Sendguard::start(&upstream.address(), &redis_config(redis, extra)))
        .collect();
    for host in &hosts {
        wait_until_subscribed(host);
    }
    hosts
}

/// Returns the MAIL FROM reply code (or the final one when MAIL passes)
/// of a clean message from `from`.
fn clean_code(host: &Sendguard, from: &str) -> u16 {
    send_from(&host.address, from, &clean_message()).0
}

fn rfc3339_millis(value: &Value) -> i64 {
    let text = value.as_str().expect("time string");
    Timestamp::parse_rfc3339(text)
        .expect("RFC 3339 time")
        .millis()
}

/// Length of a timed lockout from its event, in whole seconds.
fn lockout_seconds(event: &Value) -> i64 {
    (rfc3339_millis(&event["until"]) - rfc3339_millis(&event["time"])) / 1000
}

fn of_kind<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|event| event["type"] == kind)
        .collect()
}

/// Waits until `from` may send through `host` again.
fn wait_until_allowed(host: &Sendguard, from: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while clean_code(host, from) != 250 {
        assert!(
            Instant::now() < deadline,
            "{from} is still refused:\n{}",
            host.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn round_robin_strikes_lock_every_host() {
    let redis = RedisServer::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let hosts = start_hosts(
        3,
        &upstream,
        &redis,
        "[policy]\nthreshold = 5\nwindow = \"10m\"\nfirst_lockout = \"30s\"",
    );

    // Each host checks the mailbox before its lockout, so each caches it.
    for host in &hosts {
        assert_eq!(clean_code(host, "alice@example.org"), 250);
    }
    for strike in 0..5 {
        let host = &hosts[strike % hosts.len()];
        let (code, text) = send_from(&host.address, "alice@example.org", &spam_message());
        assert_eq!(code, 550, "spam {strike} is rejected: {text}");
        assert!(
            text.contains("spam"),
            "spam {strike} is rejected as spam: {text}"
        );
    }

    // The fifth strike landed on the second host; every host refuses now.
    for (index, host) in hosts.iter().enumerate() {
        let (code, text) = send_from(&host.address, "alice@example.org", &clean_message());
        assert_eq!(code, 550, "host {index} refuses: {text}");
        assert!(text.contains("lockout 1"), "host {index}: {text}");
    }
    for host in &hosts {
        assert_eq!(
            clean_code(host, "carol@example.org"),
            250,
            "other mailboxes still send"
        );
    }

    // Any host's events command reads the one shared stream.
    let events = hosts[2].events();
    let started = of_kind(&events, "lockout_started");
    assert_eq!(started.len(), 1, "{started:#?}");
    assert_eq!(started[0]["mailbox"], "alice@example.org");
    assert_eq!(started[0]["level"], 1);
    assert_eq!(started[0]["strikes"].as_array().map(Vec::len), Some(5));
    assert_eq!(lockout_seconds(started[0]), 30);
    let counted = of_kind(&events, "bad_message")
        .into_iter()
        .filter(|event| event["counted"] == true)
        .count();
    assert_eq!(counted, 5);
    assert_eq!(
        events,
        hosts[0].events(),
        "every host reads the same events"
    );

    // A time filter reads the same stream.
    let recent = events_since(&hosts[1], "1h");
    assert_eq!(recent, events);
    let later = Timestamp(Timestamp::now().millis() + 3_600_000).to_rfc3339();
    assert!(events_since(&hosts[1], &later).is_empty());
}

/// Returns the events since `since` (a duration back or a time), from the
/// command line.
fn events_since(host: &Sendguard, since: &str) -> Vec<Value> {
    let output = host.cli(&["events", "--format", "json", "--since", since]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect()
}

#[test]
fn doubling_schedule_and_permanent_block_across_hosts() {
    let redis = RedisServer::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let hosts = start_hosts(
        3,
        &upstream,
        &redis,
        "[policy]\nthreshold = 2\nwindow = \"10m\"\nfirst_lockout = \"2s\"\ntimed_lockouts = 2",
    );
    let mut next = 0;
    let mut strike = |hosts: &[Sendguard]| {
        let host = &hosts[next % hosts.len()];
        next += 1;
        let (code, text) = send_from(&host.address, "dave@example.org", &spam_message());
        assert_eq!(code, 550, "{text}");
    };

    for level in 1..=2 {
        strike(&hosts);
        strike(&hosts);
        for (index, host) in hosts.iter().enumerate() {
            let (code, text) = send_from(&host.address, "dave@example.org", &clean_message());
            assert_eq!(
                code, 550,
                "host {index} refuses during lockout {level}: {text}"
            );
            assert!(text.contains(&format!("lockout {level}")), "{text}");
        }
        for host in &hosts {
            wait_until_allowed(host, "dave@example.org", Duration::from_secs(30));
        }
    }
    strike(&hosts);
    strike(&hosts);
    for (index, host) in hosts.iter().enumerate() {
        let (code, text) = send_from(&host.address, "dave@example.org", &clean_message());
        assert_eq!(
            code, 550,
            "host {index} refuses the permanent block: {text}"
        );
        assert!(text.contains("permanent"), "{text}");
    }

    // Each end is recorded once, by the host holding the timer lease.
    let events = hosts[0].wait_for_events(Duration::from_secs(20), |events| {
        of_kind(events, "lockout_ended").len() >= 2
    });
    let started = of_kind(&events, "lockout_started");
    assert_eq!(started.len(), 2, "{started:#?}");
    assert_eq!(lockout_seconds(started[0]), 2);
    assert_eq!(lockout_seconds(started[1]), 4);
    let permanent = of_kind(&events, "blocked_permanently");
    assert_eq!(permanent.len(), 1, "{permanent:#?}");
    assert_eq!(permanent[0]["level"], 3);
    assert_eq!(permanent[0]["until"], Value::Null);
    assert_eq!(of_kind(&events, "lockout_ended").len(), 2, "{events:#?}");
}

#[test]
fn killed_host_loses_nothing() {
    let redis = RedisServer::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let mut hosts = start_hosts(
        3,
        &upstream,
        &redis,
        "[alerts]\nadmin_addresses = [\"admin@example.org\"]\n\
         [actions]\nretry_initial = \"1s\"\nretry_max = \"2s\"\ntimeout = \"2s\"\n\
         [policy]\nthreshold = 5\nwindow = \"10m\"\nfirst_lockout = \"1h\"",
    );

    // Four strikes on the first host, which then dies without warning.
    for _ in 0..4 {
        assert_eq!(
            send_from(&hosts[0].address, "erin@example.org", &spam_message()).0,
            550
        );
    }
    hosts[0].kill9();

    // The fifth strike, on another host, starts the lockout; that host
    // dies right after its reply, perhaps before or during the alert.
    assert_eq!(
        send_from(&hosts[1].address, "erin@example.org", &spam_message()).0,
        550
    );
    hosts[1].kill9();
    assert_eq!(clean_code(&hosts[2], "erin@example.org"), 550);

    // The last host sends the alert queued with the lockout, at the latest
    // once the dead host's lease on it ends (4 × 2 s + 5 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let alerts = upstream
            .messages()
            .into_iter()
            .filter(|message| {
                String::from_utf8_lossy(&message.content).contains("erin@example.org")
            })
            .count();
        if alerts >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no alert e-mail:\n{}",
            hosts[2].log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The dead hosts come back and still refuse; the lockout and its
    // strikes are all there, and the alert's delivery is recorded.
    hosts[0].restart();
    hosts[1].restart();
    for host in &hosts {
        assert_eq!(clean_code(host, "erin@example.org"), 550);
    }
    let events = hosts[2].wait_for_events(Duration::from_secs(20), |events| {
        !of_kind(events, "action_delivered").is_empty()
    });
    let started = of_kind(&events, "lockout_started");
    assert_eq!(started.len(), 1, "{started:#?}");
    assert_eq!(started[0]["strikes"].as_array().map(Vec::len), Some(5));
    let counted = of_kind(&events, "bad_message")
        .into_iter()
        .filter(|event| event["counted"] == true)
        .count();
    assert_eq!(counted, 5);
}

#[test]
fn concurrent_strikes_lock_each_mailbox_once() {
    const MAILBOXES: usize = 8;
    const MESSAGES: usize = 8;
    const THRESHOLD: usize = 5;
    let redis = RedisServer::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let hosts = start_hosts(
        3,
        &upstream,
        &redis,
        &format!("[policy]\nthreshold = {THRESHOLD}\nwindow = \"10m\"\nfirst_lockout = \"1h\""),
    );
    let addresses: Vec<String> = hosts.iter().map(|host| host.address.clone()).collect();

    // Every message of every mailbox at once, spread over the hosts.
    let codes: Vec<u16> = std::thread::scope(|scope| {
        let mut threads = Vec::new();
        for mailbox in 0..MAILBOXES {
            for message in 0..MESSAGES {
                let address = &addresses[(mailbox + message) % addresses.len()];
                threads.push(scope.spawn(move || {
                    let from = format!("user{mailbox}@example.org");
                    send_from(address, &from, &spam_message()).0
                }));
            }
        }
        threads
            .into_iter()
            .map(|thread| thread.join().expect("sender thread"))
            .collect()
    });
    assert!(codes.iter().all(|code| *code == 550), "{codes:?}");

    let events = hosts[0].events();
    for mailbox in 0..MAILBOXES {
        let name = format!("user{mailbox}@example.org");
        let started: Vec<&Value> = of_kind(&events, "lockout_started")
            .into_iter()
            .filter(|event| event["mailbox"] == name.as_str())
            .collect();
        assert_eq!(started.len(), 1, "{name}: {started:#?}");
        assert_eq!(
            started[0]["strikes"].as_array().map(Vec::len),
            Some(THRESHOLD)
        );
        let counted = of_kind(&events, "bad_message")
            .into_iter()
            .filter(|event| event["mailbox"] == name.as_str() && event["counted"] == true)
            .count();
        assert_eq!(counted, THRESHOLD, "{name}");
        let output = hosts[1].cli(&["status", &name]);
        let status = String::from_utf8_lossy(&output.stdout);
        assert!(status.contains("lockouts so far:   1"), "{name}: {status}");
        for host in &hosts {
            assert_eq!(clean_code(host, &name), 550, "{name}");
        }
    }
}

#[test]
fn redis_restart_keeps_lockouts_and_tempfails() {
    let mut redis = RedisServer::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let mut hosts = start_hosts(
        2,
        &upstream,
        &redis,
        "timeout = \"1s\"\n[policy]\nthreshold = 2\nwindow = \"10m\"\nfirst_lockout = \"1h\"",
    );
    for host in &hosts {
        assert_eq!(
            send_from(&host.address, "fred@example.org", &spam_message()).0,
            550
        );
    }
    assert_eq!(clean_code(&hosts[0], "fred@example.org"), 550);

    // Redis dies without warning. With on_store_error = "tempfail" (the
    // default) a sender whose state is not cached gets a temporary
    // failure at MAIL FROM, and nothing gets 250 unscanned.
    redis.kill9();
    let (code, text) = send_from(&hosts[0].address, "gail@example.org", &spam_message());
    assert!(
        (400..500).contains(&code),
        "bad message during the outage: {code} {text}"
    );
    let code = clean_code(&hosts[1], "hugo@example.org");
    assert!(
        (400..500).contains(&code),
        "unknown sender during the outage: {code}"
    );
    assert!(
        hosts[0].log().contains("cannot read lockout state"),
        "{}",
        hosts[0].log()
    );

    // Back from its append-only file, Redis still holds the lockout, and a
    // host started afresh (with an empty cache) refuses.
    redis.start_again();
    hosts[1].restart();
    for (index, host) in hosts.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let code = clean_code(host, "fred@example.org");
            if code == 550 {
                break;
            }
            assert!((400..500).contains(&code), "host {index} answered {code}");
            assert!(
                Instant::now() < deadline,
                "host {index} did not recover:\n{}",
                host.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let events = hosts[0].events();
    assert_eq!(of_kind(&events, "lockout_started").len(), 1);
    // The rejected message of the outage was never counted.
    assert!(
        of_kind(&events, "bad_message")
            .iter()
            .all(|event| event["mailbox"] != "gail@example.org"),
        "{events:#?}"
    );
}

#[test]
fn local_fallback_merges_strikes() {
    let mut redis = RedisServer::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let hosts = start_hosts(
        2,
        &upstream,
        &redis,
        "timeout = \"1s\"\non_store_error = \"local\"\n\
         [policy]\nthreshold = 3\nwindow = \"10m\"\nfirst_lockout = \"1h\"",
    );
    assert_eq!(
        send_from(&hosts[0].address, "iris@example.org", &spam_message()).0,
        550
    );

    // Without Redis, the first host still scans and rejects the bad
    // messages and counts them in its own store, saying so in its log.
    redis.kill9();
    for _ in 0..2 {
        let (code, text) = send_from(&hosts[0].address, "iris@example.org", &spam_message());
        assert_eq!(code, 550, "{text}");
        assert!(text.contains("spam"), "{text}");
    }
    assert!(
        hosts[0]
            .log()
            .contains("counting this strike in the host's own SQLite store"),
        "{}",
        hosts[0].log()
    );
    // Its own store contains two of the three strikes, so the mailbox is
    // not locked out yet.
    assert_eq!(clean_code(&hosts[0], "iris@example.org"), 250);

    // Back from its append-only file, Redis gets the two strikes merged
    // in; with the one it kept they start the lockout, late, on both hosts.
    redis.start_again();
    for (index, host) in hosts.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(30);
        while clean_code(host, "iris@example.org") != 550 {
            assert!(
                Instant::now() < deadline,
                "host {index} does not refuse:\n{}",
                host.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let events = hosts[1].events();
    let started = of_kind(&events, "lockout_started");
    assert_eq!(started.len(), 1, "{started:#?}");
    assert_eq!(started[0]["strikes"].as_array().map(Vec::len), Some(3));
    assert!(
        started[0]["note"]
            .as_str()
            .is_some_and(|note| note.contains("merged"))
    );
    assert!(
        hosts[0]
            .log()
            .contains("merged strikes counted without Redis")
    );
}

#[test]
fn migrate_copies_sqlite_store() {
    let redis = RedisServer::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let policy = "[policy]\nthreshold = 2\nwindow = \"10m\"\nfirst_lockout = \"1h\"";
    let mut single = Sendguard::start(&upstream.address(), policy);
    for _ in 0..2 {
        assert_eq!(
            send_from(&single.address, "jane@example.org", &spam_message()).0,
            550
        );
    }
    assert_eq!(
        send_from(&single.address, "kim@example.org", &spam_message()).0,
        550
    );
    assert_eq!(clean_code(&single, "jane@example.org"), 550);
    single.kill9();

    // The same config, switched to Redis with the SQLite file kept.
    single.rewrite_config(|text| {
        text.replace(
            "sendguard.db\"\n",
            &format!("sendguard.db\"\n{}", redis_config(&redis, "")),
        )
    });
    let output = single.cli(&["store", "migrate"]);
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(report.contains("copied 2 mailbox states"), "{report}");

    // A second run copies nothing twice.
    let output = single.cli(&["store", "migrate"]);
    let again = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        again.contains("copied 0 mailbox states, 0 events"),
        "{again}"
    );
    assert!(
        again.contains("kept Redis's state of jane@example.org"),
        "{again}"
    );
    assert!(again.contains("events not copied"), "{again}");

    // Hosts on Redis refuse the migrated lockout and continue kim's count.
    let hosts = start_hosts(2, &upstream, &redis, policy);
    for host in &hosts {
        assert_eq!(clean_code(host, "jane@example.org"), 550);
    }
    assert_eq!(
        send_from(&hosts[1].address, "kim@example.org", &spam_message()).0,
        550
    );
    for host in &hosts {
        assert_eq!(clean_code(host, "kim@example.org"), 550);
    }
    let events = hosts[0].events();
    let started: Vec<&Value> = of_kind(&events, "lockout_started");
    assert_eq!(started.len(), 2, "{started:#?}");
    assert_eq!(started[0]["mailbox"], "jane@example.org");
    assert_eq!(started[1]["mailbox"], "kim@example.org");
}

#[test]
fn exemption_applies_on_every_host() {
    let redis = RedisServer::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let hosts = start_hosts(
        3,
        &upstream,
        &redis,
        "[policy]\nthreshold = 2\nwindow = \"10m\"\nfirst_lockout = \"1h\"",
    );

    // Each host reloaded the exemptions once when it subscribed at start.
    let reloads = |host: &Sendguard| host.log().matches("exemptions reloaded").count();
    let before: Vec<usize> = hosts.iter().map(reloads).collect();

    // Added through the first host's config, straight into Redis.
    let added = hosts[0].cli(&[
        "exemptions",
        "add",
        "--sender",
        "mona@example.org",
        "--reason",
        "bulk mailing",
        "--author",
        "ops",
        "--for",
        "1d",
    ]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );

    // The other hosts hear of it and count none of mona's bad messages.
    let deadline = Instant::now() + Duration::from_secs(20);
    while (1..3).any(|index| reloads(&hosts[index]) == before[index]) {
        assert!(
            Instant::now() < deadline,
            "a host did not reload the exemptions:\n{}",
            hosts[2].log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for host in &hosts[1..] {
        for _ in 0..2 {
            assert_eq!(
                send_from(&host.address, "mona@example.org", &spam_message()).0,
                550
            );
        }
        assert_eq!(clean_code(host, "mona@example.org"), 250);
    }
    let events = hosts[1].events();
    assert_eq!(of_kind(&events, "exemption_added").len(), 1);
    let bad = of_kind(&events, "bad_message");
    assert_eq!(bad.len(), 4, "{bad:#?}");
    assert!(
        bad.iter().all(|event| event["counted"] == false),
        "{bad:#?}"
    );
    assert!(of_kind(&events, "lockout_started").is_empty());

    let listed = hosts[2].cli(&["exemptions", "list"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains("mona@example.org"), "{listed}");
}

#[test]
fn startup_sweep_finishes_interrupted_lockout() {
    let redis = RedisServer::start();
    let upstream = Upstream::start(UpstreamOptions::default());

    // What a host leaves when it dies between writing a lockout and moving
    // its event and alert on: the state with its pending work, and the
    // mailbox registered as dirty.
    let now = Timestamp::now().millis();
    let state = serde_json::json!({
        "strikes": [],
        "lockouts": 1,
        "block": {"level": 1, "started": now, "until": now + 3_600_000,
                  "enforced": true, "end_recorded": false},
    });
    let body = serde_json::json!({
        "event": "lockout_started", "mailbox": "nina@example.org",
        "delivery_id": "interrupted-1", "lockout": {"number": 1, "until": "later"},
    });
    let pending = serde_json::json!([{
        "id": "interrupted-work",
        "events": [{"time": now, "kind": "lockout_started", "mailbox": "nina@example.org",
                    "key_client": null, "details": {"level": 1}}],
        "deliveries": [{"delivery_id": "interrupted-1", "kind": "alert_mail",
                        "mailbox": "nina@example.org", "key_client": null,
                        "body": body.to_string(), "created": now}],
    }]);
    let key = "test:mailbox:{nina@example.org}";
    redis.cli(&[
        "HSET",
        key,
        "version",
        "1",
        "state",
        &state.to_string(),
        "pending",
        &pending.to_string(),
    ]);
    redis.cli(&["SADD", "test:mailboxes", "nina@example.org"]);
    redis.cli(&["ZADD", "test:dirty", &now.to_string(), "nina@example.org"]);

    // A host starting up finishes the work: the event, the alert and the
    // lockout-end index, and nothing stays pending.
    let hosts = start_hosts(
        1,
        &upstream,
        &redis,
        "[alerts]\nadmin_addresses = [\"admin@example.org\"]\n",
    );
    assert_eq!(clean_code(&hosts[0], "nina@example.org"), 550);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !upstream
        .messages()
        .iter()
        .any(|message| String::from_utf8_lossy(&message.content).contains("interrupted-1"))
    {
        assert!(
            Instant::now() < deadline,
            "no alert e-mail:\n{}",
            hosts[0].log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let events = hosts[0].events();
    let started = of_kind(&events, "lockout_started");
    assert_eq!(started.len(), 1, "{started:#?}");
    assert_eq!(redis.cli(&["HEXISTS", key, "pending"]).trim(), "0");
    assert_eq!(
        redis
            .cli(&["ZSCORE", "test:ends", "nina@example.org"])
            .trim(),
        (now + 3_600_000).to_string()
    );
    assert!(
        hosts[0].log().contains("start-up sweep queued deliveries"),
        "{}",
        hosts[0].log()
    );
}

#[test]
fn outbox_command_lists_shared_deliveries() {
    let redis = RedisServer::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let files = tempfile::tempdir().expect("temporary directory");
    let secret = files.path().join("secret");
    std::fs::write(&secret, "test-webhook-secret").expect("write secret");
    // The alert webhook points at a port where nothing listens, so its
    // delivery fails and waits for a retry.
    let hosts = start_hosts(
        2,
        &upstream,
        &redis,
        &format!(
            "[actions]\nsecret_file = \"{}\"\nretry_initial = \"1h\"\n\
             [alerts]\nwebhook_url = \"http://{}/hook\"\n\
             [policy]\nthreshold = 1\nwindow = \"10m\"\nfirst_lockout = \"1h\"",
            secret.display(),
            common::closed_address()
        ),
    );
    assert_eq!(
        send_from(&hosts[0].address, "omar@example.org", &spam_message()).0,
        550
    );
    hosts[1].wait_for_events(Duration::from_secs(20), |events| {
        !of_kind(events, "action_failed").is_empty()
    });

    // The other host's command line lists the shared delivery with its
    // failed attempt.
    let output = hosts[1].cli(&["outbox"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listing = String::from_utf8_lossy(&output.stdout);
    let line = listing
        .lines()
        .find(|line| line.contains("admin_alert"))
        .unwrap_or_else(|| panic!("no admin_alert waiting:\n{listing}"));
    assert!(line.contains("omar@example.org"), "{line}");
    let columns: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(columns[4], "1", "one attempt so far: {line}");
    assert!(line.contains("Connection refused"), "{line}");
}

/// Opens the Redis store on `redis` directly, as a host does.
fn open_store(redis: &RedisServer, dir: &std::path::Path) -> sendguard::store::redis::RedisStore {
    let mut config = sendguard::config::StoreConfig::sqlite(dir.join("host.db"));
    config.backend = sendguard::config::Backend::Redis;
    config.url = Some(redis.url());
    sendguard::store::redis::RedisStore::open(&config, Duration::from_secs(86_400))
        .expect("open the Redis store")
}

fn alert_entry() -> sendguard::actions::OutboxEntry {
    sendguard::actions::OutboxEntry {
        delivery_id: sendguard::actions::new_delivery_id(),
        kind: sendguard::actions::ActionKind::AdminAlert,
        mailbox: Some("ivy@example.org".to_string()),
        key_client: None,
        body: "{}".to_string(),
        created: Timestamp::now(),
    }
}

#[tokio::test]
async fn finished_delivery_never_queued_again() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = open_store(&redis, dir.path());
    let entry = alert_entry();

    assert_eq!(store.import_delivery(&entry).await.expect("queue"), 1);
    let due = store
        .due_deliveries(Timestamp::now(), 10, Duration::from_secs(30))
        .await
        .expect("due");
    assert_eq!(due.len(), 1);
    store
        .finish_delivery(&entry.delivery_id)
        .await
        .expect("finish");
    // The same pending work moved again, as after a lost clear of the
    // mailbox's pending field, must not send the alert a second time.
    assert_eq!(store.import_delivery(&entry).await.expect("queue"), 0);
    let due = store
        .due_deliveries(Timestamp::now(), 10, Duration::from_secs(30))
        .await
        .expect("due");
    assert!(due.is_empty(), "{due:?}");
}

#[tokio::test]
async fn own_leftover_lease_taken_again() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("temporary directory");
    let store = open_store(&redis, dir.path());
    let entry = alert_entry();
    store.import_delivery(&entry).await.expect("queue");

    // A batch that a Redis failure cut short leaves its lease behind.
    let first = store
        .due_deliveries(Timestamp::now(), 10, Duration::from_secs(300))
        .await
        .expect("due");
    assert_eq!(first.len(), 1);
    let again = store
        .due_deliveries(Timestamp::now(), 10, Duration::from_secs(300))
        .await
        .expect("due");
    assert_eq!(
        again.len(),
        1,
        "the host's own lease did not hold the delivery back"
    );

    // Another host still waits for the lease.
    let other = open_store(&redis, dir.path());
    let elsewhere = other
        .due_deliveries(Timestamp::now(), 10, Duration::from_secs(300))
        .await
        .expect("due");
    assert!(elsewhere.is_empty(), "{elsewhere:?}");
}
