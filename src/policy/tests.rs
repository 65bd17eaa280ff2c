use super::*;

const SECOND: i64 = 1000;
const MINUTE: i64 = 60 * SECOND;
const HOUR: i64 = 60 * MINUTE;

fn settings() -> PolicySettings {
    PolicySettings::default()
}

fn strike(at: i64) -> Strike {
    Strike {
        at: Timestamp(at),
        verdict: "virus Test".to_string(),
        message_id: format!("tx-{at}"),
        header_message_id: None,
    }
}

/// Records strikes at the given times and returns the last outcome.
fn record_all(state: &mut MailboxState, settings: &PolicySettings, times: &[i64]) -> StrikeOutcome {
    let mut last = None;
    for &at in times {
        last = Some(state.record_strike(settings, strike(at)));
    }
    last.expect("at least one strike")
}

/// Drives a mailbox through one full lockout starting at `start` and returns
/// the lockout.
fn trigger_lockout(state: &mut MailboxState, settings: &PolicySettings, start: i64) -> Lockout {
    let times: Vec<i64> = (0..i64::from(settings.threshold))
        .map(|index| start + index * SECOND)
        .collect();
    match record_all(state, settings, &times) {
        StrikeOutcome::LockoutStarted { lockout, .. } => lockout,
        other => panic!("expected a lockout, got {other:?}"),
    }
}

#[test]
fn fourth_strike_only_counts() {
    let mut state = MailboxState::default();
    let outcome = record_all(
        &mut state,
        &settings(),
        &[0, SECOND, 2 * SECOND, 3 * SECOND],
    );
    assert_eq!(outcome, StrikeOutcome::Counted { in_window: 4 });
    assert_eq!(
        state.check_sender(Timestamp(4 * SECOND), Mode::Enforce),
        SenderDecision::Allow
    );
    assert_eq!(state.lockouts, 0);
}

#[test]
fn fifth_strike_starts_first_lockout() {
    let mut state = MailboxState::default();
    let outcome = record_all(&mut state, &settings(), &[0, 1, 2, 3, 4 * SECOND]);
    let StrikeOutcome::LockoutStarted { lockout, strikes } = outcome else {
        panic!("expected a lockout, got {outcome:?}");
    };
    assert_eq!(lockout.level, 1);
    assert_eq!(lockout.started, Timestamp(4 * SECOND));
    assert_eq!(lockout.until, Some(Timestamp(4 * SECOND + HOUR)));
    assert!(lockout.enforced);
    assert_eq!(strikes.len(), 5);
    assert_eq!(strikes[0].at, Timestamp(0));
    assert!(
        state.strikes.is_empty(),
        "starting a lockout empties the window"
    );
    assert_eq!(state.lockouts, 1);
}

#[test]
fn strike_exactly_at_window_edge_is_outside() {
    let mut state = MailboxState::default();
    // Four strikes at 0..3 s, then the fifth exactly ten minutes after the
    // first: the first has left the half-open window.
    record_all(
        &mut state,
        &settings(),
        &[0, SECOND, 2 * SECOND, 3 * SECOND],
    );
    let outcome = state.record_strike(&settings(), strike(10 * MINUTE));
    assert_eq!(outcome, StrikeOutcome::Counted { in_window: 4 });
}

#[test]
fn strike_one_milli_inside_window_edge_counts() {
    let mut state = MailboxState::default();
    record_all(
        &mut state,
        &settings(),
        &[0, SECOND, 2 * SECOND, 3 * SECOND],
    );
    let outcome = state.record_strike(&settings(), strike(10 * MINUTE - 1));
    assert!(
        matches!(outcome, StrikeOutcome::LockoutStarted { .. }),
        "{outcome:?}"
    );
}

#[test]
fn sender_refused_until_end_exclusive() {
    let mut state = MailboxState::default();
    let lockout = trigger_lockout(&mut state, &settings(), 0);
    let until = lockout.until.expect("timed");
    assert!(matches!(
        state.check_sender(Timestamp(until.0 - 1), Mode::Enforce),
        SenderDecision::Refuse(_)
    ));
    assert_eq!(
        state.check_sender(until, Mode::Enforce),
        SenderDecision::Allow
    );
}

#[test]
fn nothing_counted_during_block() {
    let mut state = MailboxState::default();
    trigger_lockout(&mut state, &settings(), 0);
    for index in 0..10 {
        let outcome = state.record_strike(&settings(), strike(10 * SECOND + index));
        assert!(
            matches!(outcome, StrikeOutcome::DuringBlock(_)),
            "{outcome:?}"
        );
    }
    assert!(state.strikes.is_empty());
    assert_eq!(state.lockouts, 1);
}

#[test]
fn second_lockout_doubles() {
    let settings = settings();
    let mut state = MailboxState::default();
    let first = trigger_lockout(&mut state, &settings, 0);
    let after_first = first.until.expect("timed").0;
    let second = trigger_lockout(&mut state, &settings, after_first);
    assert_eq!(second.level, 2);
    let second_start = after_first + 4 * SECOND;
    assert_eq!(second.until, Some(Timestamp(second_start + 2 * HOUR)));
}

#[test]
fn schedule_doubles_to_32_hours_then_permanent() {
    let settings = settings();
    let mut state = MailboxState::default();
    let mut start = 0;
    let mut lengths = Vec::new();
    for _ in 0..6 {
        let lockout = trigger_lockout(&mut state, &settings, start);
        let until = lockout.until.expect("timed lockout");
        lengths.push((until.0 - lockout.started.0) / HOUR);
        start = until.0;
    }
    assert_eq!(lengths, vec![1, 2, 4, 8, 16, 32]);

    // The seventh trigger blocks permanently.
    let seventh = trigger_lockout(&mut state, &settings, start);
    assert_eq!(seventh.level, 7);
    assert!(seventh.is_permanent());
    assert!(matches!(
        state.check_sender(Timestamp(i64::MAX), Mode::Enforce),
        SenderDecision::Refuse(_)
    ));
    assert_eq!(
        state.next_lockout_length(&settings, Timestamp(i64::MAX)),
        None
    );
}

#[test]
fn sixth_lockout_is_timed() {
    let settings = settings();
    let mut state = MailboxState {
        lockouts: 5,
        ..MailboxState::default()
    };
    let sixth = trigger_lockout(&mut state, &settings, 0);
    assert_eq!(sixth.level, 6);
    assert_eq!(sixth.until, Some(Timestamp(4 * SECOND + 32 * HOUR)));
}

#[test]
fn zero_timed_lockouts_blocks_permanently_at_once() {
    let settings = PolicySettings {
        timed_lockouts: 0,
        ..settings()
    };
    let mut state = MailboxState::default();
    let lockout = trigger_lockout(&mut state, &settings, 0);
    assert!(lockout.is_permanent());
}

#[test]
fn schedule_overflow_saturates() {
    let settings = PolicySettings {
        first_lockout: Duration::from_secs(u64::MAX / 4),
        timed_lockouts: 100,
        ..settings()
    };
    assert_eq!(
        settings.lockout_length(1),
        Duration::from_secs(u64::MAX / 4)
    );
    assert_eq!(
        settings.lockout_length(3),
        Duration::from_secs(u64::MAX / 4 * 4)
    );
    assert_eq!(settings.lockout_length(4), Duration::MAX);
    assert_eq!(settings.lockout_length(65), Duration::MAX);
    assert_eq!(settings.lockout_length(u32::MAX), Duration::MAX);

    let mut state = MailboxState {
        lockouts: 40,
        ..MailboxState::default()
    };
    let lockout = trigger_lockout(&mut state, &settings, 0);
    assert_eq!(lockout.until, Some(Timestamp(i64::MAX)));
}

#[test]
fn lockout_length_small_values() {
    let settings = settings();
    assert_eq!(settings.lockout_length(0), Duration::from_secs(3600));
    assert_eq!(settings.lockout_length(1), Duration::from_secs(3600));
    assert_eq!(settings.lockout_length(33), Duration::from_secs(3600 << 32));
}

#[test]
fn policy_change_keeps_active_end() {
    let mut state = MailboxState::default();
    let lockout = trigger_lockout(&mut state, &settings(), 0);
    let changed = PolicySettings {
        first_lockout: Duration::from_secs(60),
        threshold: 2,
        timed_lockouts: 1,
        ..settings()
    };
    // The active lockout keeps its end time under the new policy.
    let during = state.record_strike(&changed, strike(HOUR - 1));
    assert!(matches!(during, StrikeOutcome::DuringBlock(_)));
    assert_eq!(state.block.as_ref().and_then(|b| b.until), lockout.until);

    // The next trigger follows the new policy: two strikes, and since one
    // timed lockout is all it allows, the block is permanent.
    let next = record_all(
        &mut state,
        &changed,
        &[HOUR + 4 * SECOND, HOUR + 5 * SECOND],
    );
    let StrikeOutcome::LockoutStarted { lockout, .. } = next else {
        panic!("expected a lockout, got {next:?}");
    };
    assert!(lockout.is_permanent());
}

#[test]
fn monitor_lockout_allows_sender() {
    let settings = PolicySettings {
        mode: Mode::Monitor,
        ..settings()
    };
    let mut state = MailboxState::default();
    let lockout = trigger_lockout(&mut state, &settings, 0);
    assert!(!lockout.enforced);
    assert!(matches!(
        state.check_sender(Timestamp(5 * SECOND), Mode::Monitor),
        SenderDecision::MonitorOnly(_)
    ));
    // Enforcing again makes the computed lockout refuse for its rest.
    assert!(matches!(
        state.check_sender(Timestamp(5 * SECOND), Mode::Enforce),
        SenderDecision::Refuse(_)
    ));
    // Strikes during a monitor-only lockout are not counted either.
    let outcome = state.record_strike(&settings, strike(6 * SECOND));
    assert!(matches!(outcome, StrikeOutcome::DuringBlock(_)));
}

#[test]
fn monitor_switch_keeps_enforced_block() {
    let mut state = MailboxState::default();
    trigger_lockout(&mut state, &settings(), 0);
    // The mode is a property of each lockout, so switching the policy to
    // monitor cannot lift the block that started while enforcing.
    assert!(matches!(
        state.check_sender(Timestamp(10 * SECOND), Mode::Monitor),
        SenderDecision::Refuse(_)
    ));
}

#[test]
fn unrecorded_end_appears_at_end_time() {
    let mut state = MailboxState::default();
    let lockout = trigger_lockout(&mut state, &settings(), 0);
    let until = lockout.until.expect("timed");
    assert!(state.unrecorded_end(Timestamp(until.0 - 1)).is_none());
    assert_eq!(state.unrecorded_end(until).map(|b| b.level), Some(1));
    state.mark_end_recorded();
    assert!(state.unrecorded_end(until).is_none());
}

#[test]
fn permanent_block_has_no_end() {
    let settings = PolicySettings {
        timed_lockouts: 0,
        ..settings()
    };
    let mut state = MailboxState::default();
    trigger_lockout(&mut state, &settings, 0);
    assert!(state.unrecorded_end(Timestamp(i64::MAX)).is_none());
}

#[test]
fn threshold_one_locks_on_first_strike() {
    let settings = PolicySettings {
        threshold: 1,
        ..settings()
    };
    let mut state = MailboxState::default();
    let outcome = state.record_strike(&settings, strike(0));
    assert!(matches!(outcome, StrikeOutcome::LockoutStarted { .. }));
}

#[test]
fn old_strikes_expire_before_counting() {
    let mut state = MailboxState::default();
    record_all(
        &mut state,
        &settings(),
        &[0, SECOND, 2 * SECOND, 3 * SECOND],
    );
    let outcome = state.record_strike(&settings(), strike(HOUR));
    assert_eq!(outcome, StrikeOutcome::Counted { in_window: 1 });
    assert_eq!(state.strikes.len(), 1);
}

#[test]
fn empty_state_detection() {
    let settings = settings();
    let mut state = MailboxState::default();
    assert!(state.is_empty(&settings, Timestamp(0)));
    state.record_strike(&settings, strike(0));
    assert!(!state.is_empty(&settings, Timestamp(MINUTE)));
    assert!(state.is_empty(&settings, Timestamp(10 * MINUTE)));
}

#[test]
fn timestamp_formats_rfc3339() {
    let moment = Timestamp::from_secs(1_796_418_420);
    assert_eq!(moment.to_rfc3339(), "2026-12-04T21:07:00Z");
    assert_eq!(
        Timestamp::parse_rfc3339("2026-12-04T21:07:00Z"),
        Some(moment)
    );
}

fn forgiving(after: i64) -> PolicySettings {
    PolicySettings {
        forgive_after: Some(Duration::from_millis(after as u64)),
        ..settings()
    }
}

#[test]
fn forgive_after_quiet_period() {
    let settings = forgiving(24 * HOUR);
    let mut state = MailboxState::default();
    let first = trigger_lockout(&mut state, &settings, 0);
    let end = first.until.expect("timed").0;
    assert_eq!(
        state.forgive(&settings, Timestamp(end + 24 * HOUR - 1)),
        None
    );
    assert_eq!(state.lockouts, 1);
    let forgiven = state.forgive(&settings, Timestamp(end + 24 * HOUR));
    assert_eq!(
        forgiven,
        Some(Forgiven {
            lockouts: 1,
            last_end: Timestamp(end)
        })
    );
    assert_eq!(state.lockouts, 0);
    let next = trigger_lockout(&mut state, &settings, end + 25 * HOUR);
    assert_eq!(next.level, 1);
}

#[test]
fn forgive_off_by_default() {
    let settings = settings();
    let mut state = MailboxState::default();
    trigger_lockout(&mut state, &settings, 0);
    assert_eq!(state.forgive(&settings, Timestamp(i64::MAX / 2)), None);
    assert_eq!(state.lockouts, 1);
}

#[test]
fn forgive_spares_permanent_block() {
    let settings = PolicySettings {
        timed_lockouts: 0,
        ..forgiving(HOUR)
    };
    let mut state = MailboxState::default();
    let block = trigger_lockout(&mut state, &settings, 0);
    assert!(block.is_permanent());
    assert_eq!(state.forgive(&settings, Timestamp(1000 * HOUR)), None);
    assert!(state.active_block(Timestamp(1000 * HOUR)).is_some());
}

#[test]
fn next_length_counts_forgiveness() {
    let settings = forgiving(HOUR);
    let mut state = MailboxState::default();
    let first = trigger_lockout(&mut state, &settings, 0);
    let end = first.until.expect("timed").0;
    let two_hours = Some(Duration::from_secs(7200));
    assert_eq!(
        state.next_lockout_length(&settings, Timestamp(end)),
        two_hours
    );
    let one_hour = Some(Duration::from_secs(3600));
    assert_eq!(
        state.next_lockout_length(&settings, Timestamp(end + HOUR)),
        one_hour
    );
    assert_eq!(state.lockouts, 1, "asking does not forgive");
}

#[test]
fn lift_permanent_keeps_count() {
    let settings = PolicySettings {
        timed_lockouts: 0,
        ..settings()
    };
    let mut state = MailboxState::default();
    trigger_lockout(&mut state, &settings, 0);
    let lifted = state.lift(Timestamp(HOUR), false).expect("lifted");
    assert!(lifted.block.is_some_and(|block| block.is_permanent()));
    assert_eq!(lifted.lockouts_before, 1);
    assert_eq!(lifted.lockouts_after, 1);
    assert_eq!(
        state.check_sender(Timestamp(HOUR), Mode::Enforce),
        SenderDecision::Allow
    );
    // The count stayed past timed_lockouts, so the next trigger blocks again.
    let again = trigger_lockout(&mut state, &settings, 2 * HOUR);
    assert!(again.is_permanent());
    assert_eq!(again.level, 2);
}

#[test]
fn lift_with_reset_restarts_schedule() {
    let settings = PolicySettings {
        timed_lockouts: 0,
        ..settings()
    };
    let mut state = MailboxState::default();
    trigger_lockout(&mut state, &settings, 0);
    let lifted = state.lift(Timestamp(HOUR), true).expect("lifted");
    assert_eq!(lifted.lockouts_after, 0);
    let timed = PolicySettings::default();
    let next = trigger_lockout(&mut state, &timed, 2 * HOUR);
    assert_eq!(next.level, 1);
    assert!(!next.is_permanent());
}

#[test]
fn lift_refuses_timed_lockout() {
    let settings = settings();
    let mut state = MailboxState::default();
    let lockout = trigger_lockout(&mut state, &settings, 0);
    let before = state.clone();
    assert_eq!(
        state.lift(Timestamp(10 * SECOND), true),
        Err(LiftError::TimedLockout(lockout))
    );
    assert_eq!(state, before, "a refused lift changes nothing");
}

#[test]
fn lift_without_block_needs_reset() {
    let settings = settings();
    let mut state = MailboxState::default();
    let lockout = trigger_lockout(&mut state, &settings, 0);
    let after = lockout.until.expect("timed");
    assert_eq!(state.lift(after, false), Err(LiftError::NotBlocked));
    let lifted = state.lift(after, true).expect("count reset");
    assert_eq!(lifted.block, None);
    assert_eq!(lifted.lockouts_before, 1);
    assert_eq!(state.lockouts, 0);
    assert_eq!(state.lift(after, true), Err(LiftError::NothingToReset));
}
