//! Unit tests of the pure replay, on events built the way the guard
//! records them.

use super::*;
use crate::events::{EventKind, MessageFacts};
use crate::identity::MailboxKey;
use crate::policy::{Lockout, MailboxState, Mode, Strike, StrikeOutcome};
use crate::scan::Verdict;

const MINUTE: i64 = 60_000;
const START: i64 = 1_800_000_000_000;

fn config() -> Config {
    Config::parse(
        "[upstream]\naddress = \"127.0.0.1:25\"\n[store]\npath = \"/tmp/unused.db\"\n\
         [policy]\nthreshold = 5\nwindow = \"10m\"\nfirst_lockout = \"1h\"\n",
    )
    .expect("valid config")
}

fn candidate(text: &str) -> Candidate {
    config().candidate(text).expect("valid candidate")
}

fn at(minutes: i64) -> Timestamp {
    Timestamp(START + minutes * MINUTE)
}

fn spam() -> Verdict {
    Verdict::Spam {
        engine: "builtin".to_string(),
        score: Some(1000.0),
        action: None,
        rules: vec!["GTUBE".to_string()],
    }
}

fn facts(sender: &str, client: &str, index: usize) -> MessageFacts {
    MessageFacts {
        sender: format!("<{sender}>"),
        login: None,
        client: client.to_string(),
        transaction: format!("t{index}"),
        recipients: 1,
    }
}

/// Records bad messages the way the guard does under the current policy:
/// each goes through the policy core, and its events are what the guard
/// appends. `messages` are (minute, sender, client).
fn record(messages: &[(i64, &str, &str)]) -> Vec<Event> {
    let settings = config().policy.settings();
    let mut states: std::collections::HashMap<String, MailboxState> = Default::default();
    let mut events = Vec::new();
    for (index, (minute, sender, client)) in messages.iter().enumerate() {
        let key = MailboxKey::mailbox(*sender);
        let facts = facts(sender, client, index);
        let state = states.entry(sender.to_string()).or_default();
        let strike = Strike {
            at: at(*minute),
            verdict: "spam".to_string(),
            message_id: facts.transaction.clone(),
            header_message_id: None,
        };
        let (_, outcome) = state.apply_strike(&settings, strike);
        let counted = !matches!(outcome, StrikeOutcome::DuringBlock(_));
        let mut event = Event::bad_message(
            at(*minute),
            Some(&key),
            &facts,
            &spam(),
            counted,
            None,
            false,
        );
        event.id = Some(index as i64);
        events.push(event);
        if let StrikeOutcome::LockoutStarted { lockout, strikes } = outcome {
            events.push(Event::lockout_started(&key, &facts, &lockout, &strikes));
        }
    }
    events
}

/// Builds the `bad_message` event of a counted spam message.
fn counted_bad(time: Timestamp, key: &MailboxKey, facts: &MessageFacts) -> Event {
    Event::bad_message(time, Some(key), facts, &spam(), true, None, false)
}

fn simulate(candidate: &Candidate, events: &[Event], since: Timestamp) -> Report {
    let directory = Directory::default();
    let mut replay = Replay::new(candidate, &directory, since);
    for event in events {
        replay.feed(event);
    }
    replay.finish(at(24 * 60))
}

fn starts(rows: &[report::LockoutRow]) -> Vec<(u32, Timestamp)> {
    rows.iter().map(|row| (row.level, row.started)).collect()
}

#[test]
fn current_policy_reproduces_history() {
    let mut messages = Vec::new();
    for minute in 0..5 {
        messages.push((minute, "ann@example.org", "192.0.2.1"));
    }
    // During lockout 1 (one hour), then again after it.
    messages.push((30, "ann@example.org", "192.0.2.1"));
    for minute in 70..75 {
        messages.push((minute, "ann@example.org", "192.0.2.1"));
    }
    for minute in [0, 20, 40] {
        messages.push((minute, "bob@example.org", "192.0.2.2"));
    }
    messages.sort_by_key(|message| message.0);
    let events = record(&messages);

    let report = simulate(&candidate(""), &events, at(-1));

    let ann = report.mailbox("ann@example.org", None).expect("ann listed");
    assert_eq!(starts(&ann.real), [(1, at(4)), (2, at(74))]);
    assert_eq!(ann.simulated, ann.real);
    assert!(report.mailbox("bob@example.org", None).is_none());
    assert_eq!(report.real.lockouts, 2);
    assert_eq!(report.simulated, report.real);
}

#[test]
fn lower_threshold_adds_lockouts() {
    let messages = [
        (0, "cat@example.org", "192.0.2.3"),
        (1, "cat@example.org", "192.0.2.3"),
        (2, "cat@example.org", "192.0.2.3"),
    ];
    let events = record(&messages);

    let report = simulate(&candidate("[policy]\nthreshold = 3\n"), &events, at(-1));

    let cat = report.mailbox("cat@example.org", None).expect("cat listed");
    assert!(cat.real.is_empty());
    assert_eq!(starts(&cat.simulated), [(1, at(2))]);
    assert_eq!(cat.simulated[0].until, Some(at(62)));
    assert_eq!(
        report.simulated.blocked,
        std::time::Duration::from_secs(3600)
    );
}

#[test]
fn shorter_window_drops_lockouts() {
    let messages: Vec<(i64, &str, &str)> = (0..5)
        .map(|index| (index * 2, "dan@example.org", "192.0.2.4"))
        .collect();
    let events = record(&messages);

    let report = simulate(&candidate("[policy]\nwindow = \"5m\"\n"), &events, at(-1));

    let dan = report.mailbox("dan@example.org", None).expect("dan listed");
    assert_eq!(starts(&dan.real), [(1, at(8))]);
    assert!(dan.simulated.is_empty());
}

#[test]
fn window_boundary_is_half_open() {
    // Five strikes over exactly ten minutes: the first is outside the
    // window of the fifth under "10m", inside under "11m".
    let messages: Vec<(i64, &str, &str)> = [0, 3, 6, 9, 10]
        .into_iter()
        .map(|minute| (minute, "eve@example.org", "192.0.2.5"))
        .collect();
    let events = record(&messages);

    let same = simulate(&candidate(""), &events, at(-1));
    assert_eq!(same.simulated.lockouts, 0);
    let longer = simulate(&candidate("[policy]\nwindow = \"11m\"\n"), &events, at(-1));
    assert_eq!(longer.simulated.lockouts, 1);
}

#[test]
fn client_and_sender_splits_forger() {
    let mut messages = Vec::new();
    for minute in 0..3 {
        messages.push((minute * 2, "ceo@example.org", "192.0.2.10"));
        messages.push((minute * 2 + 1, "ceo@example.org", "198.51.100.7"));
    }
    let events = record(&messages);

    let split =
        candidate("[policy]\nthreshold = 3\n[identity]\nunauthenticated = \"client-and-sender\"\n");
    let report = simulate(&split, &events, at(-1));

    let real = report
        .mailbox("ceo@example.org", None)
        .expect("real lockout listed");
    assert_eq!(starts(&real.real), [(1, at(4))], "five strikes of one key");
    let forger = report
        .mailbox("ceo@example.org", Some("198.51.100.7"))
        .expect("forger's pair key");
    assert_eq!(starts(&forger.simulated), [(1, at(5))]);
    let owner = report
        .mailbox("ceo@example.org", Some("192.0.2.10"))
        .expect("owner's pair key");
    assert_eq!(starts(&owner.simulated), [(1, at(4))]);
    assert!(real.simulated.is_empty());
}

#[test]
fn candidate_exemption_removes_lockouts() {
    let messages: Vec<(i64, &str, &str)> = (0..5)
        .map(|minute| (minute, "news@example.org", "192.0.2.6"))
        .collect();
    let events = record(&messages);

    let exempt = candidate("[exemptions]\nsenders = [\"News@Example.org\"]\n");
    let report = simulate(&exempt, &events, at(-1));

    let news = report.mailbox("news@example.org", None).expect("listed");
    assert_eq!(news.real.len(), 1);
    assert!(news.simulated.is_empty());
    assert_eq!(report.simulated.exempt_strikes, 5);
}

#[test]
fn recorded_exemption_applies_from_creation() {
    let messages: Vec<(i64, &str, &str)> = (0..8)
        .map(|minute| (minute, "fay@example.org", "192.0.2.7"))
        .collect();
    let mut events = record(&messages);
    let exemption = crate::policy::Exemption {
        id: 7,
        kind: crate::policy::ExemptionKind::Sender("fay@example.org".to_string()),
        reason: "migration".to_string(),
        author: "ops".to_string(),
        created: at(2),
        expires: at(600),
    };
    let added = Event::exemption(at(2), EventKind::ExemptionAdded, &exemption, None);
    let position = events
        .iter()
        .position(|event| event.time > at(2))
        .expect("a later event");
    events.insert(position, added);

    let report = simulate(&candidate("[policy]\nthreshold = 3\n"), &events, at(-1));

    // Minutes 0, 1 and 2 count (the exemption starts after the third
    // message is recorded); a threshold of three locks at minute 2 only.
    let fay = report.mailbox("fay@example.org", None).expect("listed");
    assert_eq!(starts(&fay.simulated), [(1, at(2))]);
    assert_eq!(report.simulated.exempt_strikes, 5);
}

#[test]
fn refusals_without_simulated_block_unknown() {
    let messages: Vec<(i64, &str, &str)> = (0..5)
        .map(|minute| (minute, "gus@example.org", "192.0.2.8"))
        .collect();
    let mut events = record(&messages);
    let key = MailboxKey::mailbox("gus@example.org");
    let lockout = Lockout {
        level: 1,
        started: at(4),
        until: Some(at(64)),
        enforced: true,
        end_recorded: false,
    };
    let mut refused = Event::sender_refused(
        at(5),
        &key,
        &facts("gus@example.org", "192.0.2.8", 99),
        &lockout,
    );
    refused.details.insert("count".into(), 3.into());
    events.push(refused);

    let same = simulate(&candidate(""), &events, at(-1));
    assert_eq!(same.limits.refused_messages, 3);
    assert_eq!(same.limits.unknown_verdicts, 0, "the simulation blocks too");

    let lenient = simulate(&candidate("[policy]\nthreshold = 6\n"), &events, at(-1));
    assert_eq!(lenient.limits.unknown_verdicts, 3);
    let gus = lenient.mailbox("gus@example.org", None).expect("listed");
    assert_eq!(gus.unknown_verdicts, 3);
}

#[test]
fn replay_starts_from_recorded_count() {
    let mut messages = Vec::new();
    for minute in 0..5 {
        messages.push((minute, "hal@example.org", "192.0.2.9"));
    }
    for minute in 100..105 {
        messages.push((minute, "hal@example.org", "192.0.2.9"));
    }
    let events = record(&messages);

    // The period starts after lockout 1 (minute 4) and before lockout 2.
    let report = simulate(
        &candidate("[policy]\nfirst_lockout = \"30m\"\n"),
        &events,
        at(50),
    );

    let hal = report.mailbox("hal@example.org", None).expect("listed");
    assert_eq!(starts(&hal.real), [(2, at(104))]);
    assert_eq!(starts(&hal.simulated), [(2, at(104))]);
    assert_eq!(
        hal.simulated[0].until,
        Some(at(164)),
        "30m doubled for lockout 2"
    );
}

#[test]
fn support_reset_restarts_schedule() {
    let mut messages = Vec::new();
    for minute in 0..5 {
        messages.push((minute, "ivy@example.org", "192.0.2.11"));
    }
    for minute in 100..105 {
        messages.push((minute, "ivy@example.org", "192.0.2.11"));
    }
    let mut events = record(&messages);
    let key = MailboxKey::mailbox("ivy@example.org");
    let lifted = crate::policy::Lifted {
        block: None,
        lockouts_before: 1,
        lockouts_after: 0,
    };
    let reset = Event::lifted(at(80), &key, &lifted, "cleaned laptop", "cli");
    let position = events
        .iter()
        .position(|event| event.time > at(80))
        .expect("a later event");
    events.insert(position, reset);

    let report = simulate(&candidate(""), &events, at(-1));

    let ivy = report.mailbox("ivy@example.org", None).expect("listed");
    assert_eq!(starts(&ivy.simulated), [(1, at(4)), (1, at(104))]);
    assert_eq!(report.limits.lifts_without_effect, 0);
}

#[test]
fn recorded_monitor_mode_replayed() {
    let messages: Vec<(i64, &str, &str)> = (0..5)
        .map(|minute| (minute, "jon@example.org", "192.0.2.12"))
        .collect();
    let mut events = record(&messages);
    for event in &mut events {
        event.details.insert("monitor".into(), true.into());
    }

    let recorded = simulate(&candidate(""), &events, at(-1));
    let jon = recorded.mailbox("jon@example.org", None).expect("listed");
    assert!(jon.simulated[0].monitor);
    assert_eq!(recorded.simulated.blocked, std::time::Duration::ZERO);

    let enforcing = simulate(
        &candidate("[policy]\nmode = \"enforce\"\n"),
        &events,
        at(-1),
    );
    let jon = enforcing.mailbox("jon@example.org", None).expect("listed");
    assert!(!jon.simulated[0].monitor);
    assert_eq!(Mode::Enforce, enforcing_mode(&enforcing));
}

fn enforcing_mode(report: &Report) -> Mode {
    let mode = &report.to_json()["candidate"]["policy"]["mode"];
    serde_json::from_value(mode.clone()).expect("a mode")
}

#[test]
fn suspect_and_incomplete_events_skipped() {
    let key = MailboxKey::mailbox("kim@example.org");
    let suspect = Verdict::Suspect {
        engine: "rspamd".to_string(),
        score: Some(6.0),
        action: None,
        rules: Vec::new(),
    };
    let mut events = Vec::new();
    for minute in 0..5 {
        let facts = facts("kim@example.org", "192.0.2.13", minute as usize);
        events.push(Event::bad_message(
            at(minute),
            Some(&key),
            &facts,
            &suspect,
            false,
            None,
            false,
        ));
    }
    let mut old = Event::bad_message(
        at(6),
        Some(&key),
        &facts("kim@example.org", "192.0.2.13", 6),
        &spam(),
        true,
        None,
        false,
    );
    old.details.remove("client");
    events.push(old);

    let report = simulate(&candidate("[policy]\nthreshold = 1\n"), &events, at(-1));

    assert_eq!(report.simulated.lockouts, 0);
    assert_eq!(report.limits.events_without_facts, 1);
}

#[test]
fn state_bounded_by_active_mailboxes() {
    // 200 000 bad messages from 20 000 mailboxes, ten each, one message a
    // second round-robin. A mailbox's messages are 20 000 s apart, far
    // beyond the 10-minute window. So at most the mailboxes of the last
    // window are held, 600 plus those of one sweep interval.
    let candidate = candidate("");
    let directory = Directory::default();
    let mut replay = Replay::new(&candidate, &directory, Timestamp(START - 1));
    let mailboxes = 20_000;
    for index in 0..200_000usize {
        let sender = format!("user{}@example.org", index % mailboxes);
        let key = MailboxKey::mailbox(sender.clone());
        let time = Timestamp(START + index as i64 * 1000);
        let event = Event::bad_message(
            time,
            Some(&key),
            &facts(&sender, "192.0.2.20", index),
            &spam(),
            true,
            None,
            false,
        );
        replay.feed(&event);
        assert!(
            replay.states_held() <= 600 + SWEEP_BOUND,
            "{} states held after {index} events",
            replay.states_held()
        );
    }
    let report = replay.finish(Timestamp(START + 200_000 * 1000));
    assert!(
        report.limits.peak_states <= 600 + SWEEP_BOUND,
        "{}",
        report.limits.peak_states
    );
    assert_eq!(report.simulated.strikes, 200_000);
    assert_eq!(report.simulated.lockouts, 0);
}

/// States a sweep interval can add between two sweeps.
const SWEEP_BOUND: usize = 4096;

#[test]
fn reorder_restores_time_order() {
    let mut reorder = Reorder::new(true);
    let mut out = Vec::new();
    let stream_id = |millis: i64| millis * 1_000_000;
    // A lockout end dated back, stored after newer events.
    let times = [
        (1_000, 1_000),
        (2_000, 2_000),
        (500, 2_500),
        (200_000, 200_000),
    ];
    for (time, arrived) in times {
        let mut event =
            Event::config_loaded(Timestamp(time), "d", serde_json::Value::Null, "start");
        event.id = Some(stream_id(arrived));
        reorder.push(event, |event| out.push(event.time.millis()));
    }
    reorder.drain(|event| out.push(event.time.millis()));
    assert_eq!(out, [500, 1_000, 2_000, 200_000]);
}

/// Builds the `config_loaded` event the guard records for `policy`.
fn policy_loaded(time: Timestamp, policy: &str) -> Event {
    let loaded = candidate(policy);
    let recorded = serde_json::json!({"policy": loaded.policy, "identity": loaded.identity});
    Event::config_loaded(time, "digest", recorded, "reload")
}

#[test]
fn recorded_policies_followed() {
    // Threshold 5 in force until minute 10, then 2; lea's three messages
    // before the change start no lockout, max's two after it do.
    let mut events = vec![policy_loaded(at(-5), "")];
    events.extend(record(&[
        (0, "lea@example.org", "192.0.2.14"),
        (1, "lea@example.org", "192.0.2.14"),
        (2, "lea@example.org", "192.0.2.14"),
    ]));
    events.push(policy_loaded(at(10), "[policy]\nthreshold = 2\n"));
    for minute in [11, 12] {
        let key = MailboxKey::mailbox("max@example.org");
        let facts = facts("max@example.org", "192.0.2.15", minute as usize);
        events.push(counted_bad(at(minute), &key, &facts));
    }

    let directory = Directory::default();
    let fixed = candidate("[policy]\nthreshold = 3\n");
    let mut replay = Replay::new(&fixed, &directory, at(-1)).follow_recorded_policies();
    for event in &events {
        replay.feed(event);
    }
    let report = replay.finish(at(24 * 60));

    assert!(
        report.mailbox("lea@example.org", None).is_none(),
        "threshold 5 at minute 2"
    );
    let max = report.mailbox("max@example.org", None).expect("max listed");
    assert_eq!(starts(&max.simulated), [(1, at(12))]);
    assert_eq!(
        simulate(&fixed, &events, at(-1)).simulated.lockouts,
        1,
        "lea under 3"
    );
}

#[test]
fn login_keeps_key_across_clients() {
    // gil logs in from three clients with three envelope senders: the login
    // is the key under every identity rule, so client-and-sender does not
    // split it, and ignore still counts it. An unauthenticated forger is
    // not counted under ignore.
    let mut events = Vec::new();
    for (index, client) in ["192.0.2.21", "192.0.2.22", "192.0.2.23"]
        .iter()
        .enumerate()
    {
        let mut facts = facts(&format!("alias{index}@example.org"), client, index);
        facts.login = Some("gil@example.org".to_string());
        let key = MailboxKey::mailbox("gil@example.org");
        let time = at(index as i64);
        events.push(counted_bad(time, &key, &facts));
    }
    let forged = facts("gil@example.org", "198.51.100.9", 9);
    let key = MailboxKey::mailbox("gil@example.org");
    events.push(counted_bad(at(3), &key, &forged));

    for rule in ["sender", "client-and-sender", "ignore"] {
        let text = format!("[policy]\nthreshold = 3\n[identity]\nunauthenticated = \"{rule}\"\n");
        let report = simulate(&candidate(&text), &events, at(-1));
        let gil = report.mailbox("gil@example.org", None).expect("gil listed");
        assert_eq!(starts(&gil.simulated), [(1, at(2))], "{rule}");
    }
    let ignore = candidate("[policy]\nthreshold = 3\n[identity]\nunauthenticated = \"ignore\"\n");
    let report = simulate(&ignore, &events, at(-1));
    assert_eq!(report.limits.not_attributed, 1);
}

#[test]
fn recorded_exemptions_can_be_ignored() {
    let exemption = crate::policy::Exemption {
        id: 8,
        kind: crate::policy::ExemptionKind::Network("192.0.2.0/24".parse().expect("network")),
        reason: "lab".to_string(),
        author: "ops".to_string(),
        created: at(-2),
        expires: at(600),
    };
    let mut events = vec![Event::exemption(
        at(-2),
        EventKind::ExemptionAdded,
        &exemption,
        None,
    )];
    events.extend(record(&[
        (0, "ned@example.org", "192.0.2.30"),
        (1, "ned@example.org", "192.0.2.30"),
        (2, "ned@example.org", "192.0.2.30"),
    ]));

    let honoured = simulate(&candidate("[policy]\nthreshold = 3\n"), &events, at(-1));
    assert!(honoured.mailbox("ned@example.org", None).is_none());
    assert_eq!(honoured.simulated.exempt_strikes, 3);

    let without = candidate("[policy]\nthreshold = 3\n[exemptions]\nignore_recorded = true\n");
    let ignored = simulate(&without, &events, at(-1));
    let ned = ignored.mailbox("ned@example.org", None).expect("listed");
    assert_eq!(starts(&ned.simulated), [(1, at(2))]);
    assert_eq!(ignored.simulated.exempt_strikes, 0);
}

#[test]
fn fewer_timed_lockouts_block_permanently() {
    let mut messages = Vec::new();
    for minute in (0..5).chain(70..75) {
        messages.push((minute, "oda@example.org", "192.0.2.31"));
    }
    let events = record(&messages);

    let report = simulate(
        &candidate("[policy]\ntimed_lockouts = 1\n"),
        &events,
        at(-1),
    );

    let oda = report.mailbox("oda@example.org", None).expect("listed");
    assert_eq!(starts(&oda.simulated), [(1, at(4)), (2, at(74))]);
    assert!(oda.simulated[1].is_permanent());
    assert_eq!(report.real.permanent, 0);
    assert_eq!(report.simulated.permanent, 1);
    // The permanent block counts up to the end of the period.
    let blocked = std::time::Duration::from_secs(3600 + (24 * 60 - 74) * 60);
    assert_eq!(report.simulated.blocked, blocked);
}

/// Builds an enforced lockout at `level` from `started`, permanent when
/// `until` is `None`.
fn lockout(level: u32, started: Timestamp, until: Option<Timestamp>) -> Lockout {
    Lockout {
        level,
        started,
        until,
        enforced: true,
        end_recorded: false,
    }
}

/// Builds the `block_lifted` event of a support lift of `block` at `time`
/// that keeps the count.
fn support_lift(time: Timestamp, key: &MailboxKey, block: Lockout) -> Event {
    let count = block.level;
    let lifted = crate::policy::Lifted {
        block: Some(block),
        lockouts_before: count,
        lockouts_after: count,
    };
    Event::lifted(time, key, &lifted, "cleaned laptop", "cli")
}

#[test]
fn quoted_local_part_keeps_key() {
    // The relay records the path as the client wrote it and attributes the
    // unquoted address.
    let key = MailboxKey::mailbox("a,b\"c@example.org");
    let mut events = Vec::new();
    for minute in 0..5 {
        let facts = MessageFacts {
            sender: "<\"a,b\\\"c\"@example.org>".to_string(),
            ..facts("unused@example.org", "192.0.2.6", minute as usize)
        };
        events.push(counted_bad(at(minute), &key, &facts));
    }
    let last = facts("unused@example.org", "192.0.2.6", 4);
    let first = lockout(1, at(4), Some(at(64)));
    events.push(Event::lockout_started(&key, &last, &first, &[]));

    let report = simulate(&candidate(""), &events, at(-1));

    let mailbox = report
        .mailbox("a,b\"c@example.org", None)
        .expect("mailbox listed under its unquoted key");
    assert_eq!(starts(&mailbox.real), [(1, at(4))]);
    assert_eq!(mailbox.simulated, mailbox.real);
    assert_eq!(
        report.mailboxes.len(),
        1,
        "no second key for the quoted spelling"
    );
}

#[test]
fn lifted_block_stops_blocked_time() {
    let key = MailboxKey::mailbox("pia@example.org");
    let mut events = Vec::new();
    for minute in 0..5 {
        let facts = facts("pia@example.org", "192.0.2.32", minute as usize);
        events.push(counted_bad(at(minute), &key, &facts));
    }
    let block = lockout(1, at(4), None);
    let last = facts("pia@example.org", "192.0.2.32", 4);
    events.push(Event::lockout_started(&key, &last, &block, &[]));
    events.push(support_lift(at(30), &key, block));

    let report = simulate(
        &candidate("[policy]\ntimed_lockouts = 0\n"),
        &events,
        at(-1),
    );

    let pia = report.mailbox("pia@example.org", None).expect("listed");
    assert_eq!(pia.real[0].lifted, Some(at(30)));
    assert_eq!(pia.simulated, pia.real);
    let blocked = std::time::Duration::from_secs(26 * 60);
    assert_eq!(report.real.blocked, blocked);
    assert_eq!(report.simulated.blocked, blocked);
    assert_eq!(report.limits.lifts_without_effect, 0);
}

#[test]
fn invalid_exempt_sender_rejected() {
    let directory = Directory::default();
    let invalid = candidate("[exemptions]\nsenders = [\"not an address\"]\n");
    let error = check_exempt_senders(&invalid, &directory).expect_err("invalid sender");
    assert!(error.to_string().contains("exemptions.senders"), "{error}");
    assert!(error.to_string().contains("not an address"), "{error}");

    let valid = candidate("[exemptions]\nsenders = [\"<News@Example.org>\"]\n");
    assert!(check_exempt_senders(&valid, &directory).is_ok());
}

#[test]
fn huge_since_starts_at_epoch() {
    let since = crate::admin::parse_time("--since", "1000000000d").expect("a duration");
    assert_eq!(since, Timestamp(0));
    assert_eq!(since.to_rfc3339(), "1970-01-01T00:00:00Z");
}

#[test]
fn baseline_count_from_lift_alone() {
    // The permanent block at lockout 6 is older than the events kept, and
    // only its support lift remains before the period.
    let key = MailboxKey::mailbox("quin@example.org");
    let block = lockout(6, at(-500), None);
    let mut events = vec![support_lift(at(-100), &key, block)];
    events.extend(record(&[
        (0, "quin@example.org", "192.0.2.33"),
        (1, "quin@example.org", "192.0.2.33"),
        (2, "quin@example.org", "192.0.2.33"),
    ]));

    let report = simulate(&candidate("[policy]\nthreshold = 3\n"), &events, at(-1));

    let quin = report.mailbox("quin@example.org", None).expect("listed");
    assert_eq!(starts(&quin.simulated), [(7, at(2))]);
    assert!(quin.simulated[0].is_permanent());
}

#[test]
fn pair_key_lift_reaches_mailbox_key() {
    // Recorded under client-and-sender: a permanent block of the pair key
    // and its support lift, replayed under the sender rule.
    let client = "192.0.2.34";
    let key = MailboxKey {
        mailbox: "rex@example.org".to_string(),
        client: Some(client.parse().expect("an address")),
    };
    let mut events = Vec::new();
    for minute in (0..5).chain(40..45) {
        let facts = facts("rex@example.org", client, minute as usize);
        events.push(counted_bad(at(minute), &key, &facts));
    }
    let block = lockout(1, at(4), None);
    let last = facts("rex@example.org", client, 4);
    events.push(Event::lockout_started(&key, &last, &block, &[]));
    events.push(support_lift(at(30), &key, block));
    events.sort_by_key(|event| event.time);

    let report = simulate(
        &candidate("[policy]\ntimed_lockouts = 0\n"),
        &events,
        at(-1),
    );

    let rex = report.mailbox("rex@example.org", None).expect("listed");
    assert_eq!(starts(&rex.simulated), [(1, at(4)), (2, at(44))]);
    assert_eq!(rex.simulated[0].lifted, Some(at(30)));
    assert_eq!(report.limits.lifts_without_effect, 0);
}

#[test]
fn exemption_end_kept_to_millisecond() {
    // The exemption ends half a second into minute 3, and the message at
    // minute 3 plus 200 ms was exempt when it arrived.
    let key = MailboxKey::mailbox("sam@example.org");
    let exemption = crate::policy::Exemption {
        id: 8,
        kind: crate::policy::ExemptionKind::Sender("sam@example.org".to_string()),
        reason: "migration".to_string(),
        author: "ops".to_string(),
        created: at(0),
        expires: Timestamp(at(3).0 + 500),
    };
    let mut events = vec![Event::exemption(
        at(0),
        EventKind::ExemptionAdded,
        &exemption,
        None,
    )];
    let arrived = Timestamp(at(3).0 + 200);
    let facts = facts("sam@example.org", "192.0.2.35", 0);
    events.push(Event::bad_message(
        arrived,
        Some(&key),
        &facts,
        &spam(),
        false,
        None,
        false,
    ));

    let report = simulate(&candidate(""), &events, at(-1));

    assert_eq!(report.simulated.exempt_strikes, 1);
    assert_eq!(report.simulated.strikes, 0);
}

#[test]
fn refusal_minute_past_simulated_end_unknown() {
    // Five refusals from minute 5 to 5:50, folded into one event. The
    // candidate's 90 s lockout from minute 4 ends at 5:30, within them.
    let messages: Vec<(i64, &str, &str)> = (0..5)
        .map(|minute| (minute, "tia@example.org", "192.0.2.36"))
        .collect();
    let mut events = record(&messages);
    let key = MailboxKey::mailbox("tia@example.org");
    let real = lockout(1, at(4), Some(at(64)));
    let mut refused = Event::sender_refused(
        at(5),
        &key,
        &facts("tia@example.org", "192.0.2.36", 99),
        &real,
    );
    refused.details.insert("count".into(), 5.into());
    let last = Timestamp(at(5).0 + 50_000).to_rfc3339();
    refused.details.insert("last".into(), last.into());
    events.push(refused);

    let same = simulate(&candidate(""), &events, at(-1));
    assert_eq!(
        same.limits.unknown_verdicts, 0,
        "the hour covers the minute"
    );

    let shorter = simulate(
        &candidate("[policy]\nfirst_lockout = \"90s\"\n"),
        &events,
        at(-1),
    );
    assert_eq!(shorter.limits.refused_messages, 5);
    assert_eq!(shorter.limits.unknown_verdicts, 5);
}

#[test]
fn monitor_lockout_blocks_after_enforce() {
    // jan's lockout starts in monitor mode at minute 4 and runs an hour.
    // The relay switches to enforce at minute 30, so it refuses 34 minutes.
    let messages: Vec<(i64, &str, &str)> = (0..5)
        .map(|minute| (minute, "jan@example.org", "192.0.2.37"))
        .collect();
    let mut events = vec![policy_loaded(at(-10), "[policy]\nmode = \"monitor\"\n")];
    for mut event in record(&messages) {
        event.details.insert("monitor".into(), true.into());
        events.push(event);
    }
    events.push(policy_loaded(at(30), "[policy]\nmode = \"enforce\"\n"));

    let report = simulate(&candidate(""), &events, at(-1));

    let jan = report.mailbox("jan@example.org", None).expect("listed");
    assert!(jan.real[0].monitor);
    assert_eq!(jan.simulated, jan.real);
    let blocked = std::time::Duration::from_secs(34 * 60);
    assert_eq!(report.real.blocked, blocked);
    assert_eq!(report.simulated.blocked, blocked);

    let monitor = simulate(
        &candidate("[policy]\nmode = \"monitor\"\n"),
        &events,
        at(-1),
    );
    assert_eq!(monitor.simulated.blocked, std::time::Duration::ZERO);
    assert_eq!(monitor.real.blocked, blocked);
}
