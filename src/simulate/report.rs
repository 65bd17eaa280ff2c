//! The simulation report: real and simulated lockouts side by side, their
//! totals and the limits of what the replay can know, as a table, JSON or
//! CSV.

use crate::config::Candidate;
use crate::events::{Event, Format};
use crate::identity::MailboxKey;
use crate::policy::{Lockout, Mode, Timestamp};
use serde::Serialize;
use serde_json::{Value, json};
use std::io::Write;

/// One lockout, real or simulated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LockoutRow {
    pub level: u32,
    pub started: Timestamp,
    /// End of a timed lockout; `None` for a permanent block.
    pub until: Option<Timestamp>,
    /// Whether it started in monitor mode. It refuses only after a switch
    /// back to enforce.
    pub monitor: bool,
    /// Time a support lift ended a permanent block.
    pub lifted: Option<Timestamp>,
}

impl LockoutRow {
    pub fn from_lockout(lockout: &Lockout) -> LockoutRow {
        LockoutRow {
            level: lockout.level,
            started: lockout.started,
            until: lockout.until,
            monitor: !lockout.enforced,
            lifted: None,
        }
    }

    pub fn is_permanent(&self) -> bool {
        self.until.is_none()
    }

    /// Returns how long it refused mail up to `end`. A permanent block
    /// counts up to its lift or else up to `end`. A lockout started in
    /// monitor mode refuses only while `modes` (mode changes, oldest first)
    /// has the relay enforcing, as it does after a switch back to enforce.
    fn blocked_until(&self, end: Timestamp, modes: &[(Timestamp, Mode)]) -> std::time::Duration {
        let stop = self.until.or(self.lifted).map_or(end, |stop| stop.min(end));
        if !self.monitor {
            return stop.since(self.started);
        }
        let mut blocked = std::time::Duration::ZERO;
        for (index, (from, mode)) in modes.iter().enumerate() {
            if *mode != Mode::Enforce {
                continue;
            }
            let to = modes
                .get(index + 1)
                .map_or(stop, |(next, _)| (*next).min(stop));
            let from = (*from).max(self.started);
            if from < to {
                blocked += to.since(from);
            }
        }
        blocked
    }

    /// Returns the UNTIL column of the table: the end, or `permanent` and
    /// the time of its lift.
    fn until_text(&self) -> String {
        match (self.until, self.lifted) {
            (Some(until), _) => until.to_rfc3339(),
            (None, Some(lifted)) => format!("permanent, lifted {}", lifted.to_rfc3339()),
            (None, None) => "permanent".to_string(),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "level": self.level,
            "started": self.started.to_rfc3339(),
            "until": self.until.map(Timestamp::to_rfc3339),
            "permanent": self.is_permanent(),
            "monitor": self.monitor,
            "lifted": self.lifted.map(Timestamp::to_rfc3339),
        })
    }
}

/// The real and simulated lockouts of one mailbox key.
#[derive(Debug, Clone, Default)]
pub struct MailboxReport {
    pub mailbox: String,
    /// The client address of a key under `client-and-sender`.
    pub client: Option<String>,
    pub real: Vec<LockoutRow>,
    pub simulated: Vec<LockoutRow>,
    /// Messages refused at MAIL FROM by a real lockout at times when the
    /// candidate would not have refused them; never scanned.
    pub unknown_verdicts: u64,
}

impl MailboxReport {
    pub(super) fn set_key(&mut self, key: &MailboxKey) {
        self.mailbox = key.mailbox.clone();
        self.client = key.client.map(|client| client.to_string());
    }

    pub(super) fn is_worth_listing(&self) -> bool {
        !self.real.is_empty() || !self.simulated.is_empty() || self.unknown_verdicts > 0
    }

    fn label(&self) -> String {
        match &self.client {
            Some(client) => format!("{} from {client}", self.mailbox),
            None => self.mailbox.clone(),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "mailbox": self.mailbox,
            "client": self.client,
            "real": self.real.iter().map(LockoutRow::to_json).collect::<Vec<_>>(),
            "simulated": self.simulated.iter().map(LockoutRow::to_json).collect::<Vec<_>>(),
            "unknown_verdicts": self.unknown_verdicts,
        })
    }
}

/// Totals of one side of the report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    /// Bad messages counted towards a lockout.
    pub strikes: u64,
    /// Bad messages not counted because an exemption covered them.
    pub exempt_strikes: u64,
    /// Lockouts started, the permanent blocks included.
    pub lockouts: u64,
    pub permanent: u64,
    /// Time during which lockouts refused mail, up to the end of the
    /// period, summed over mailboxes.
    pub blocked: std::time::Duration,
    /// Mailbox keys with at least one lockout.
    pub mailboxes: u64,
    /// Lockout counts set back to zero by `forgive_after`. The simulation
    /// forgives at the mailbox's next bad message, so a mailbox that never
    /// sends one again is forgiven in the real history only.
    pub forgiven: u64,
}

impl Totals {
    /// Adds one mailbox's lockouts, with `modes` the relay's mode changes
    /// (see [`LockoutRow::blocked_until`]).
    pub(super) fn add(
        &mut self,
        lockouts: &[LockoutRow],
        end: Timestamp,
        modes: &[(Timestamp, Mode)],
    ) {
        if lockouts.is_empty() {
            return;
        }
        self.mailboxes += 1;
        for lockout in lockouts {
            self.lockouts += 1;
            self.permanent += u64::from(lockout.is_permanent());
            self.blocked += lockout.blocked_until(end, modes);
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "lockouts": self.lockouts,
            "permanent": self.permanent,
            "hours_blocked": (self.blocked.as_secs_f64() / 36.0).round() / 100.0,
            "seconds_blocked": self.blocked.as_secs(),
            "mailboxes": self.mailboxes,
            "strikes": self.strikes,
            "exempt_strikes": self.exempt_strikes,
            "forgiven": self.forgiven,
        })
    }
}

/// Counts of the facts the replay could not know and the events it had to
/// skip.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Messages refused at MAIL FROM by a real lockout, all of them.
    pub refused_messages: u64,
    /// Refused messages at times when the candidate would not have refused
    /// them: they were never scanned, so their verdicts are unknown.
    pub unknown_verdicts: u64,
    /// Bad messages that the candidate's identity rule attributes to no
    /// mailbox (a null sender without login, or `ignore`).
    pub not_attributed: u64,
    /// Events that lack a fact the replay needs (an old event, or one
    /// written by hand).
    pub events_without_facts: u64,
    /// Events that reached the store after newer ones and were replayed
    /// late.
    pub late_events: u64,
    /// Recorded support lifts that found nothing to lift in the
    /// simulation.
    pub lifts_without_effect: u64,
    /// Largest number of mailbox states the replay held at once.
    pub peak_states: usize,
    /// Whether the store records one refusal per mailbox, lockout and
    /// minute (Redis), so the refusal counts are lower bounds.
    pub refusals_once_per_minute: bool,
}

/// A policy load recorded in the events.
#[derive(Debug, Clone)]
struct RecordedPolicy {
    time: Timestamp,
    digest: String,
    policy: Value,
}

/// The outcome of a simulation.
#[derive(Debug, Clone)]
pub struct Report {
    pub since: Timestamp,
    pub until: Timestamp,
    candidate: Value,
    /// The policy in force at `since`, when a load before it is recorded.
    policy_at_since: Option<RecordedPolicy>,
    /// Policy loads inside the period, oldest first.
    policies: Vec<RecordedPolicy>,
    policies_unlisted: u64,
    pub real: Totals,
    pub simulated: Totals,
    /// Mailbox keys with a real or simulated lockout, or unknown verdicts.
    pub mailboxes: Vec<MailboxReport>,
    pub limits: Limits,
    pub events_read: u64,
}

impl Report {
    pub(super) fn new(since: Timestamp, candidate: &Candidate) -> Report {
        Report {
            since,
            until: since,
            candidate: json!({
                "policy": candidate.policy,
                "identity": candidate.identity,
                "exemptions": candidate.exemptions,
                "mode": if candidate.sets_mode { "from the candidate" } else { "as recorded with each message" },
            }),
            policy_at_since: None,
            policies: Vec::new(),
            policies_unlisted: 0,
            real: Totals::default(),
            simulated: Totals::default(),
            mailboxes: Vec::new(),
            limits: Limits::default(),
            events_read: 0,
        }
    }

    pub(super) fn set_follows_recorded(&mut self) {
        self.candidate["recorded_policies"] = Value::Bool(true);
        self.candidate["mode"] = "as recorded with each message".into();
    }

    pub(super) fn set_policy_at_since(&mut self, event: &Event) {
        self.policy_at_since = Some(recorded_policy(event));
    }

    pub(super) fn record_policy(&mut self, event: &Event, max: usize) {
        if self.policies.len() < max {
            self.policies.push(recorded_policy(event));
        } else {
            self.policies_unlisted += 1;
        }
    }

    /// Returns the mailbox report of `mailbox` (and `client`), if listed.
    pub fn mailbox(&self, mailbox: &str, client: Option<&str>) -> Option<&MailboxReport> {
        self.mailboxes
            .iter()
            .find(|entry| entry.mailbox == mailbox && entry.client.as_deref() == client)
    }

    /// Returns the sentences that state what the replay cannot know.
    pub fn limit_notes(&self) -> Vec<String> {
        let limits = &self.limits;
        let mut notes = vec![
            format!(
                "{} message(s) were refused at MAIL FROM during real lockouts and never scanned; \
                 {} of them fall at times when the candidate would not have refused them, so \
                 their verdicts are unknown and they count as no strike.",
                limits.refused_messages, limits.unknown_verdicts
            ),
            "The replay starts each mailbox from the lockout count and last lockout recorded in \
             the events kept before the period ([events] keep), with an empty window. A key the \
             recorded history does not have (under another identity rule) starts from zero."
                .to_string(),
            "Logins and aliases are mapped with the directory file in force now.".to_string(),
        ];
        if limits.refusals_once_per_minute {
            notes.push(
                "The Redis store records one refusal per mailbox, lockout and minute, so the \
                 refused and unknown counts are lower bounds."
                    .to_string(),
            );
        }
        if limits.not_attributed > 0 {
            notes.push(format!(
                "{} bad message(s) belong to no mailbox under the candidate's identity rule and \
                 were not counted.",
                limits.not_attributed
            ));
        }
        if limits.events_without_facts > 0 {
            notes.push(format!(
                "{} event(s) lack facts a replay needs (the sender, client or verdict of a \
                 message, or the policy of a config_loaded event), as events recorded by older \
                 releases may, and were skipped.",
                limits.events_without_facts
            ));
        }
        if limits.late_events > 0 {
            notes.push(format!(
                "{} event(s) reached the store after newer ones and were replayed late.",
                limits.late_events
            ));
        }
        if limits.lifts_without_effect > 0 {
            notes.push(format!(
                "{} recorded support lift(s) or count reset(s) found nothing to lift in the \
                 simulation.",
                limits.lifts_without_effect
            ));
        }
        notes
    }

    /// Returns the whole report as one JSON object.
    pub fn to_json(&self) -> Value {
        let policies: Vec<Value> = self
            .policy_at_since
            .iter()
            .chain(&self.policies)
            .map(|policy| {
                json!({
                    "time": policy.time.to_rfc3339(),
                    "digest": policy.digest,
                    "policy": policy.policy,
                })
            })
            .collect();
        json!({
            "since": self.since.to_rfc3339(),
            "until": self.until.to_rfc3339(),
            "candidate": self.candidate,
            "recorded_policies": policies,
            "recorded_policies_unlisted": self.policies_unlisted,
            "real": self.real.to_json(),
            "simulated": self.simulated.to_json(),
            "mailboxes": self.mailboxes.iter().map(MailboxReport::to_json).collect::<Vec<_>>(),
            "limits": {
                "refused_messages": self.limits.refused_messages,
                "unknown_verdicts": self.limits.unknown_verdicts,
                "not_attributed": self.limits.not_attributed,
                "events_without_facts": self.limits.events_without_facts,
                "late_events": self.limits.late_events,
                "lifts_without_effect": self.limits.lifts_without_effect,
                "peak_states": self.limits.peak_states,
                "notes": self.limit_notes(),
            },
            "events_read": self.events_read,
        })
    }

    /// Writes the report in `format`.
    ///
    /// # Errors
    /// When writing to `out` fails.
    pub fn write(&self, out: &mut impl Write, format: Format) -> std::io::Result<()> {
        match format {
            Format::Json => writeln!(out, "{}", self.to_json()),
            Format::Csv => self.write_csv(out),
            Format::Table => self.write_table(out),
        }
    }

    fn write_csv(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(
            out,
            "mailbox,client,side,level,started,until,permanent,monitor,lifted"
        )?;
        for mailbox in &self.mailboxes {
            let sides = [("real", &mailbox.real), ("simulated", &mailbox.simulated)];
            for (side, lockouts) in sides {
                for lockout in lockouts {
                    writeln!(
                        out,
                        "{},{},{side},{},{},{},{},{},{}",
                        crate::events::csv_field(&mailbox.mailbox),
                        mailbox.client.as_deref().unwrap_or(""),
                        lockout.level,
                        lockout.started.to_rfc3339(),
                        lockout.until.map(Timestamp::to_rfc3339).unwrap_or_default(),
                        lockout.is_permanent(),
                        lockout.monitor,
                        lockout
                            .lifted
                            .map(Timestamp::to_rfc3339)
                            .unwrap_or_default()
                    )?;
                }
            }
        }
        Ok(())
    }

    fn write_table(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(
            out,
            "Simulated period: {} to {} ({} events read)",
            self.since.to_rfc3339(),
            self.until.to_rfc3339(),
            self.events_read
        )?;
        writeln!(out)?;
        self.write_totals(out)?;
        writeln!(out)?;
        self.write_lockouts(out)?;
        writeln!(out)?;
        writeln!(out, "Limits:")?;
        for note in self.limit_notes() {
            writeln!(out, "- {note}")?;
        }
        Ok(())
    }

    /// Writes the totals of both sides as a two-column table.
    fn write_totals(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(out, "{:<28}  {:>14}  {:>14}", "", "REAL", "SIMULATED")?;
        let rows: [(&str, String, String); 6] = [
            (
                "lockouts",
                self.real.lockouts.to_string(),
                self.simulated.lockouts.to_string(),
            ),
            (
                "permanent blocks",
                self.real.permanent.to_string(),
                self.simulated.permanent.to_string(),
            ),
            (
                "time blocked in the period",
                rounded_duration(self.real.blocked),
                rounded_duration(self.simulated.blocked),
            ),
            (
                "mailboxes locked out",
                self.real.mailboxes.to_string(),
                self.simulated.mailboxes.to_string(),
            ),
            (
                "strikes counted",
                self.real.strikes.to_string(),
                self.simulated.strikes.to_string(),
            ),
            (
                "strikes exempt",
                self.real.exempt_strikes.to_string(),
                self.simulated.exempt_strikes.to_string(),
            ),
        ];
        for (name, real, simulated) in rows {
            writeln!(out, "{name:<28}  {real:>14}  {simulated:>14}")?;
        }
        Ok(())
    }

    /// Writes one line per lockout, real and simulated, by mailbox.
    fn write_lockouts(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(
            out,
            "{:<36}  {:<9}  {:>5}  {:<20}  UNTIL",
            "MAILBOX", "SIDE", "LEVEL", "STARTED"
        )?;
        for mailbox in &self.mailboxes {
            let label: String = mailbox
                .label()
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            let sides = [("real", &mailbox.real), ("simulated", &mailbox.simulated)];
            for (side, lockouts) in sides {
                for lockout in lockouts {
                    let until = lockout.until_text();
                    let monitor = if lockout.monitor { " (monitor)" } else { "" };
                    writeln!(
                        out,
                        "{label:<36}  {side:<9}  {:>5}  {:<20}  {until}{monitor}",
                        lockout.level,
                        lockout.started.to_rfc3339()
                    )?;
                }
            }
        }
        Ok(())
    }
}

fn recorded_policy(event: &Event) -> RecordedPolicy {
    RecordedPolicy {
        time: event.time,
        digest: event
            .details
            .get("digest")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        policy: event.details.get("policy").cloned().unwrap_or(Value::Null),
    }
}

/// Formats a duration to the second, such as `2h 30m 5s`.
fn rounded_duration(duration: std::time::Duration) -> String {
    humantime::format_duration(std::time::Duration::from_secs(duration.as_secs())).to_string()
}
