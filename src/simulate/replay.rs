//! The pure replay: recorded events in, simulated lockouts out. It has no
//! I/O and no clock of its own, because every time comes from the events.
//!
//! Each recorded bad message goes through the same code the guard runs on
//! a live message: [`identity::attribute`] for the mailbox key,
//! [`policy::find_exemption`] for exemptions and
//! [`MailboxState::apply_strike`] for forgiveness, the window and the
//! lockout schedule.

use super::report::{LockoutRow, MailboxReport, Report};
use crate::config::{Candidate, IdentityConfig, PolicyConfig, Unauthenticated};
use crate::directory::Directory;
use crate::events::{Event, EventKind};
use crate::identity::{self, MailboxKey, SenderFacts};
use crate::policy::{
    self, Exemption, ExemptionFacts, ExemptionKind, Lockout, MailboxState, Mode, PolicySettings,
    Strike, StrikeOutcome, Timestamp,
};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

/// Events between two sweeps that drop the states of mailboxes with nothing
/// left in their window.
const SWEEP_EVERY: u64 = 4096;

/// Largest number of policy loads listed in the report; the rest are
/// counted.
const MAX_LISTED_POLICIES: usize = 50;

/// The event kinds that set a mailbox's state before the simulated period.
pub const BASELINE_KINDS: [EventKind; 9] = [
    EventKind::LockoutStarted,
    EventKind::BlockedPermanently,
    EventKind::BlockLifted,
    EventKind::LockoutCountReset,
    EventKind::LockoutsForgiven,
    EventKind::ExemptionAdded,
    EventKind::ExemptionRemoved,
    EventKind::ExemptionExpired,
    EventKind::ConfigLoaded,
];

/// The event kinds the replay reads inside the simulated period.
pub const REPLAY_KINDS: [EventKind; 11] = [
    EventKind::BadMessage,
    EventKind::SenderRefused,
    EventKind::LockoutStarted,
    EventKind::BlockedPermanently,
    EventKind::BlockLifted,
    EventKind::LockoutCountReset,
    EventKind::LockoutsForgiven,
    EventKind::ExemptionAdded,
    EventKind::ExemptionRemoved,
    EventKind::ExemptionExpired,
    EventKind::ConfigLoaded,
];

/// A replay in progress. Feed it the events before `since` (for the
/// starting state) and then the events of the period, each group in time
/// order, and call [`Replay::finish`].
pub struct Replay<'a> {
    candidate: &'a Candidate,
    directory: &'a Directory,
    since: Timestamp,
    /// Exemptions from the candidate file, in force over the whole period.
    candidate_exemptions: Vec<Exemption>,
    /// Recorded exemptions in force, by id.
    recorded_exemptions: BTreeMap<i64, Exemption>,
    /// Recorded lockout count and last lockout of each mailbox key, as of
    /// `since`: the starting point of the simulated states.
    baseline: HashMap<MailboxKey, MailboxState>,
    /// Simulated states of the mailboxes with something in their window or
    /// a lockout history.
    states: HashMap<MailboxKey, MailboxState>,
    mailboxes: BTreeMap<MailboxKey, MailboxReport>,
    report: Report,
    /// Time of the newest event fed, to tell late events apart.
    newest: Option<Timestamp>,
    since_sweep: u64,
    /// Largest number of simulated states held at once.
    peak_states: usize,
    /// Whether each strike is replayed under the policy recorded in force
    /// at its time instead of the candidate's.
    follow_recorded: bool,
    /// The `[policy]` and `[identity]` of the newest `config_loaded` event.
    recorded: Option<(PolicyConfig, IdentityConfig)>,
    /// Changes of the recorded `policy.mode`, oldest first: one entry per
    /// switch, not per reload.
    recorded_modes: Vec<(Timestamp, Mode)>,
}

impl<'a> Replay<'a> {
    /// Starts a replay of the period from `since` under `candidate`, with
    /// `directory` mapping logins and aliases to mailboxes.
    pub fn new(candidate: &'a Candidate, directory: &'a Directory, since: Timestamp) -> Self {
        let candidate_exemptions = candidate_exemptions(candidate, directory);
        Replay {
            candidate,
            directory,
            since,
            candidate_exemptions,
            recorded_exemptions: BTreeMap::new(),
            baseline: HashMap::new(),
            states: HashMap::new(),
            mailboxes: BTreeMap::new(),
            report: Report::new(since, candidate),
            newest: None,
            since_sweep: 0,
            peak_states: 0,
            follow_recorded: false,
            recorded: None,
            recorded_modes: Vec::new(),
        }
    }

    /// Replays each strike under the `[policy]` and `[identity]` recorded
    /// in the newest `config_loaded` event before it, so the replay can be
    /// checked against the recorded history. The candidate's settings
    /// apply until the first such event, and its exemptions throughout.
    pub fn follow_recorded_policies(mut self) -> Self {
        self.follow_recorded = true;
        self.report.set_follows_recorded();
        self
    }

    /// Number of simulated mailbox states held now.
    pub fn states_held(&self) -> usize {
        self.states.len()
    }

    /// Largest number of simulated mailbox states held at once so far.
    pub fn peak_states(&self) -> usize {
        self.peak_states
    }

    /// Takes one recorded event. Events before `since` only set the
    /// starting state; later ones are replayed.
    pub fn feed(&mut self, event: &Event) {
        if let Some(newest) = self.newest
            && event.time < newest
        {
            self.report.limits.late_events += 1;
        }
        self.newest = Some(
            self.newest
                .map_or(event.time, |newest| newest.max(event.time)),
        );
        match event.kind {
            EventKind::ExemptionAdded => self.exemption_added(event),
            EventKind::ExemptionRemoved | EventKind::ExemptionExpired => {
                if let Some(id) = event.details.get("exemption_id").and_then(Value::as_i64) {
                    self.recorded_exemptions.remove(&id);
                }
            }
            _ if event.time < self.since => self.baseline_event(event),
            EventKind::BadMessage => self.bad_message(event),
            EventKind::SenderRefused => self.sender_refused(event),
            EventKind::LockoutStarted | EventKind::BlockedPermanently => self.real_lockout(event),
            EventKind::BlockLifted | EventKind::LockoutCountReset => self.support_lift(event),
            EventKind::LockoutsForgiven => self.report.real.forgiven += 1,
            EventKind::ConfigLoaded => {
                self.report.record_policy(event, MAX_LISTED_POLICIES);
                self.policy_loaded(event);
            }
            _ => {}
        }
        self.report.events_read += 1;
        self.since_sweep += 1;
        if self.since_sweep >= SWEEP_EVERY {
            self.sweep(event.time);
        }
    }

    /// Ends the replay at `until` and returns the report.
    pub fn finish(mut self, until: Timestamp) -> Report {
        self.sweep(until);
        self.report.until = until;
        self.report.limits.peak_states = self.peak_states;
        // A candidate's own mode applies over the whole period.
        let simulated_modes: &[(Timestamp, Mode)] =
            if self.candidate.sets_mode && !self.follow_recorded {
                &[]
            } else {
                &self.recorded_modes
            };
        for (key, mailbox) in &mut self.mailboxes {
            mailbox.set_key(key);
            self.report
                .real
                .add(&mailbox.real, until, &self.recorded_modes);
            self.report
                .simulated
                .add(&mailbox.simulated, until, simulated_modes);
        }
        self.report.mailboxes = self
            .mailboxes
            .into_values()
            .filter(MailboxReport::is_worth_listing)
            .collect();
        self.report
    }

    /// Updates the recorded state at `since` with an event before it.
    fn baseline_event(&mut self, event: &Event) {
        if event.kind == EventKind::ConfigLoaded {
            self.report.set_policy_at_since(event);
            self.policy_loaded(event);
            return;
        }
        let Some(key) = recorded_key(event) else {
            return;
        };
        match event.kind {
            EventKind::LockoutStarted | EventKind::BlockedPermanently => {
                if let Some(lockout) = recorded_lockout(event) {
                    let state = self.baseline.entry(key).or_default();
                    state.lockouts = lockout.level;
                    state.block = Some(lockout);
                }
            }
            EventKind::BlockLifted | EventKind::LockoutCountReset | EventKind::LockoutsForgiven => {
                let after = event
                    .details
                    .get("lockouts_after")
                    .and_then(Value::as_u64)
                    .map_or(0, |count| u32::try_from(count).unwrap_or(u32::MAX));
                if after == 0 {
                    self.baseline.remove(&key);
                } else {
                    // The lockout that set the count may be older than the
                    // events kept, so the lift's count is taken as it is.
                    let state = self.baseline.entry(key).or_default();
                    state.lockouts = after;
                    state.block = None;
                }
            }
            _ => {}
        }
    }

    /// Keeps the policy a `config_loaded` event records. An event without
    /// a readable `[policy]` or `[identity]` (from an older release) keeps
    /// the one before it.
    fn policy_loaded(&mut self, event: &Event) {
        let recorded = event.details.get("policy");
        let policy = recorded
            .and_then(|recorded| recorded.get("policy"))
            .and_then(|policy| serde_json::from_value::<PolicyConfig>(policy.clone()).ok());
        let identity = recorded
            .and_then(|recorded| recorded.get("identity"))
            .and_then(|identity| serde_json::from_value::<IdentityConfig>(identity.clone()).ok());
        match (policy, identity) {
            (Some(policy), Some(identity)) => {
                if self.recorded_modes.last().map(|(_, mode)| *mode) != Some(policy.mode) {
                    self.recorded_modes.push((event.time, policy.mode));
                }
                self.recorded = Some((policy, identity));
            }
            _ => self.report.limits.events_without_facts += 1,
        }
    }

    /// Returns the `[policy]` a strike is replayed under.
    fn policy(&self) -> &PolicyConfig {
        match &self.recorded {
            Some((policy, _)) if self.follow_recorded => policy,
            _ => &self.candidate.policy,
        }
    }

    /// Returns the `[identity]` a message is attributed under.
    fn identity(&self) -> &IdentityConfig {
        match &self.recorded {
            Some((_, identity)) if self.follow_recorded => identity,
            _ => &self.candidate.identity,
        }
    }

    fn exemption_added(&mut self, event: &Event) {
        let details = &event.details;
        let text = |name: &str| details.get(name).and_then(Value::as_str);
        // Events from older releases carry `expires` to the second only.
        let expires = match details.get("expires_ms").and_then(Value::as_i64) {
            Some(millis) => Some(Timestamp(millis)),
            None => text("expires").and_then(Timestamp::parse_rfc3339),
        };
        let (Some(id), Some(kind), Some(value), Some(expires)) = (
            details.get("exemption_id").and_then(Value::as_i64),
            text("match"),
            text("value"),
            expires,
        ) else {
            self.report.limits.events_without_facts += 1;
            return;
        };
        let kind = match kind {
            "sender" => ExemptionKind::Sender(value.to_string()),
            "login" => ExemptionKind::Login(value.to_string()),
            "network" => match value.parse() {
                Ok(network) => ExemptionKind::Network(network),
                Err(_) => {
                    self.report.limits.events_without_facts += 1;
                    return;
                }
            },
            _ => {
                self.report.limits.events_without_facts += 1;
                return;
            }
        };
        let exemption = Exemption {
            id,
            kind,
            reason: text("reason").unwrap_or_default().to_string(),
            author: text("author").unwrap_or_default().to_string(),
            created: event.time,
            expires,
        };
        self.recorded_exemptions.insert(id, exemption);
    }

    /// Replays one recorded bad message under the candidate.
    fn bad_message(&mut self, event: &Event) {
        if event.details.get("counted") == Some(&Value::Bool(true)) {
            self.report.real.strikes += 1;
        }
        if event.details.contains_key("exemption_id") {
            self.report.real.exempt_strikes += 1;
        }
        // Suspect messages are never strikes, and only virus and spam
        // verdicts carry one.
        match event.details.get("verdict_kind").and_then(Value::as_str) {
            Some("virus" | "spam") => {}
            Some(_) => return,
            None => {
                self.report.limits.events_without_facts += 1;
                return;
            }
        }
        let Some(facts) = RecordedSender::of(event) else {
            self.report.limits.events_without_facts += 1;
            return;
        };
        let attribution =
            identity::attribute(facts.sender_facts(), self.identity(), self.directory);
        let Some(key) = attribution.strike_key else {
            self.report.limits.not_attributed += 1;
            return;
        };

        let exemption_facts = ExemptionFacts {
            mailbox: &key.mailbox,
            login: facts.login.as_deref(),
            client: facts.client,
        };
        let recorded: Vec<Exemption> = self
            .recorded_exemptions
            .values()
            .filter(|exemption| exemption.created <= event.time)
            .filter(|_| !self.candidate.exemptions.ignore_recorded)
            .cloned()
            .collect();
        let exempt =
            policy::find_exemption(&self.candidate_exemptions, &exemption_facts, event.time)
                .or_else(|| policy::find_exemption(&recorded, &exemption_facts, event.time))
                .is_some();
        if exempt {
            self.report.simulated.exempt_strikes += 1;
            return;
        }

        let settings = self.settings_for(event);
        let strike = Strike {
            at: event.time,
            verdict: text_detail(event, "verdict"),
            message_id: text_detail(event, "transaction"),
            header_message_id: None,
        };
        let state = self.state_of(&key);
        let (forgiven, outcome) = state.apply_strike(&settings, strike);
        if forgiven.is_some() {
            self.report.simulated.forgiven += 1;
        }
        match outcome {
            StrikeOutcome::Counted { .. } => self.report.simulated.strikes += 1,
            StrikeOutcome::DuringBlock(_) => {}
            StrikeOutcome::LockoutStarted { lockout, .. } => {
                self.report.simulated.strikes += 1;
                self.mailboxes
                    .entry(key)
                    .or_default()
                    .simulated
                    .push(LockoutRow::from_lockout(&lockout));
            }
        }
        self.peak_states = self.peak_states.max(self.states.len());
    }

    /// Counts messages refused at MAIL FROM during a real lockout. They were
    /// never scanned, so where the candidate would not have refused them
    /// their verdicts are unknown.
    fn sender_refused(&mut self, event: &Event) {
        let count = event
            .details
            .get("count")
            .and_then(Value::as_u64)
            .unwrap_or(1);
        self.report.limits.refused_messages += count;
        // The store folds the refusals of one minute into one event, dated
        // at the first, with `last` to the second. Unless the candidate
        // refuses at both ends, the whole minute counts as unknown.
        let last = event
            .details
            .get("last")
            .and_then(Value::as_str)
            .and_then(Timestamp::parse_rfc3339)
            .map_or(event.time, |last| Timestamp(last.0 + 999).max(event.time));
        let blocked_in_simulation = RecordedSender::of(event).is_some_and(|facts| {
            let attribution =
                identity::attribute(facts.sender_facts(), self.identity(), self.directory);
            attribution.block_key.is_some_and(|key| {
                let mode = self.mode_for(event);
                let block = self
                    .states
                    .get(&key)
                    .or_else(|| self.baseline.get(&key))
                    .and_then(|state| state.block.as_ref());
                let refuses = |time| {
                    matches!(
                        policy::check_block(block, time, mode),
                        policy::SenderDecision::Refuse(_)
                    )
                };
                refuses(event.time) && refuses(last)
            })
        });
        if !blocked_in_simulation {
            self.report.limits.unknown_verdicts += count;
            if let Some(key) = recorded_key(event) {
                self.mailboxes.entry(key).or_default().unknown_verdicts += count;
            }
        }
    }

    /// Lists a lockout that really happened.
    fn real_lockout(&mut self, event: &Event) {
        let (Some(key), Some(lockout)) = (recorded_key(event), recorded_lockout(event)) else {
            self.report.limits.events_without_facts += 1;
            return;
        };
        self.mailboxes
            .entry(key)
            .or_default()
            .real
            .push(LockoutRow::from_lockout(&lockout));
    }

    /// Applies a recorded support lift or count reset to the simulated
    /// states of the mailbox, at its recorded time.
    fn support_lift(&mut self, event: &Event) {
        let Some(recorded) = recorded_key(event) else {
            self.report.limits.events_without_facts += 1;
            return;
        };
        let reset_count = event.kind == EventKind::LockoutCountReset
            || event.details.get("count_reset") == Some(&Value::Bool(true));
        if event.kind == EventKind::BlockLifted
            && let Some(mailbox) = self.mailboxes.get_mut(&recorded)
        {
            mark_lifted(&mut mailbox.real, event.time);
        }
        // Under another identity rule the recorded key may stand for
        // several simulated keys (one per client address), and the lift
        // applies to each of them. A recorded pair key stands for the
        // mailbox's key when the candidate does not pair senders with
        // clients.
        let pairs = self.identity().unauthenticated == Unauthenticated::ClientAndSender;
        let mut keys: Vec<MailboxKey> = self
            .states
            .keys()
            .filter(|key| {
                key.mailbox == recorded.mailbox
                    && (recorded.client.is_none() || !pairs || key.client == recorded.client)
            })
            .cloned()
            .collect();
        if keys.is_empty() {
            keys.push(recorded);
        }
        for key in keys {
            let state = self.state_of(&key);
            match state.lift(event.time, reset_count) {
                Ok(lifted) if lifted.block.is_some() => {
                    if let Some(mailbox) = self.mailboxes.get_mut(&key) {
                        mark_lifted(&mut mailbox.simulated, event.time);
                    }
                }
                Ok(_) => {}
                Err(_) => self.report.limits.lifts_without_effect += 1,
            }
        }
    }

    /// Returns the simulated state of `key`, starting from its recorded
    /// state at `since`.
    fn state_of(&mut self, key: &MailboxKey) -> &mut MailboxState {
        if !self.states.contains_key(key) {
            let start = self.baseline.get(key).cloned().unwrap_or_default();
            self.states.insert(key.clone(), start);
        }
        self.states.entry(key.clone()).or_default()
    }

    /// Returns the mode a strike is replayed in: the candidate's when it
    /// sets one, else the one recorded with the event.
    fn mode_for(&self, event: &Event) -> Mode {
        if self.candidate.sets_mode && !self.follow_recorded {
            return self.candidate.policy.mode;
        }
        if event.details.get("monitor") == Some(&Value::Bool(true)) {
            Mode::Monitor
        } else {
            Mode::Enforce
        }
    }

    fn settings_for(&self, event: &Event) -> PolicySettings {
        PolicySettings {
            mode: self.mode_for(event),
            ..self.policy().settings()
        }
    }

    /// Drops the simulated states that hold nothing at `now`: no strike in
    /// the window, no lockout history. A mailbox that strikes again starts
    /// from its recorded state at `since`, which is also zero then.
    fn sweep(&mut self, now: Timestamp) {
        let settings = self.policy().settings();
        self.states.retain(|key, state| {
            state.expire_strikes(&settings, now);
            !state.is_empty(&settings, now) || self.baseline.contains_key(key)
        });
        self.since_sweep = 0;
    }
}

/// The sender facts recorded with a bad message or a refusal.
struct RecordedSender {
    /// Envelope sender address without angle brackets, source route or
    /// quotes, as the relay attributes it; empty for `<>`.
    sender: String,
    login: Option<String>,
    client: IpAddr,
}

impl RecordedSender {
    fn of(event: &Event) -> Option<RecordedSender> {
        // Events record the path as the client wrote it, so a quoted local
        // part (`"a b"@x`) is unquoted as the relay did before attributing.
        let path = event.details.get("sender")?.as_str()?;
        let sender = crate::milter::parse_sender(path).address;
        let client = event.details.get("client")?.as_str()?.parse().ok()?;
        let login = event
            .details
            .get("login")
            .and_then(Value::as_str)
            .map(str::to_string);
        Some(RecordedSender {
            sender,
            login,
            client,
        })
    }

    fn sender_facts(&self) -> SenderFacts<'_> {
        SenderFacts {
            envelope: &self.sender,
            login: self.login.as_deref(),
            client: self.client,
        }
    }
}

fn text_detail(event: &Event, name: &str) -> String {
    event
        .details
        .get(name)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// Marks the newest permanent block in `rows` as lifted at `time`, unless
/// it was lifted already.
fn mark_lifted(rows: &mut [LockoutRow], time: Timestamp) {
    if let Some(row) = rows.last_mut()
        && row.is_permanent()
        && row.lifted.is_none()
        && row.started <= time
    {
        row.lifted = Some(time);
    }
}

/// Returns the mailbox key an event was recorded under.
fn recorded_key(event: &Event) -> Option<MailboxKey> {
    Some(MailboxKey {
        mailbox: event.mailbox.clone()?,
        client: event
            .key_client
            .as_deref()
            .and_then(|client| client.parse().ok()),
    })
}

/// Rebuilds the lockout a `lockout_started` or `blocked_permanently` event
/// records.
fn recorded_lockout(event: &Event) -> Option<Lockout> {
    let level = u32::try_from(event.details.get("level")?.as_u64()?).ok()?;
    // Events from older releases carry `until` to the second only.
    let until = match event.kind {
        EventKind::BlockedPermanently => None,
        _ => match event.details.get("until_ms").and_then(Value::as_i64) {
            Some(millis) => Some(Timestamp(millis)),
            None => Some(Timestamp::parse_rfc3339(
                event.details.get("until")?.as_str()?,
            )?),
        },
    };
    Some(Lockout {
        level,
        started: event.time,
        until,
        enforced: event.details.get("monitor") != Some(&Value::Bool(true)),
        end_recorded: false,
    })
}

/// Turns the candidate file's exemptions into exemptions in force over the
/// whole period.
fn candidate_exemptions(candidate: &Candidate, directory: &Directory) -> Vec<Exemption> {
    let given = &candidate.exemptions;
    let senders = given.senders.iter().map(|sender| {
        let mailbox = identity::mailbox_from_input(sender, &candidate.identity, directory)
            .unwrap_or_else(|_| sender.clone());
        ExemptionKind::Sender(mailbox)
    });
    let logins = given
        .logins
        .iter()
        .map(|login| ExemptionKind::Login(login.clone()));
    let networks = given
        .networks
        .iter()
        .map(|network| ExemptionKind::Network(*network));
    senders
        .chain(logins)
        .chain(networks)
        .enumerate()
        .map(|(index, kind)| Exemption {
            id: -1 - i64::try_from(index).unwrap_or(0),
            kind,
            reason: "candidate file".to_string(),
            author: "simulation".to_string(),
            created: Timestamp(i64::MIN),
            expires: Timestamp(i64::MAX),
        })
        .collect()
}
