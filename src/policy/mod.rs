//! The lockout policy: sliding strike windows, the doubling lockout schedule
//! and block decisions.
//!
//! Everything here is pure: no I/O, no clock of its own. Callers pass `now`
//! in, load a [`MailboxState`] from the store, apply one of the functions
//! below and write the state back. The same code serves the SMTP proxy, the
//! milter and any later replay of recorded history.

mod exemption;
mod time;

pub use exemption::{Exemption, ExemptionFacts, ExemptionKind, find as find_exemption};
pub use time::Timestamp;

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Whether lockouts refuse mail or are only computed and recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Lockouts refuse MAIL FROM.
    #[default]
    Enforce,
    /// Lockouts are computed and recorded exactly as when enforcing, but no
    /// sender is refused.
    Monitor,
}

/// The `[policy]` settings the core needs for one decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySettings {
    pub mode: Mode,
    /// Bad messages inside `window` that start a lockout.
    pub threshold: u32,
    /// Length of the sliding window, half-open: a strike exactly `window`
    /// older than the newest one is outside it.
    pub window: Duration,
    /// Length of lockout 1; lockout n lasts `first_lockout` × 2^(n−1).
    pub first_lockout: Duration,
    /// Number of timed lockouts; the trigger after them blocks permanently.
    pub timed_lockouts: u32,
    /// Time without a lockout after which a mailbox's lockout count starts
    /// again from zero; `None` keeps the count for ever.
    pub forgive_after: Option<Duration>,
}

impl Default for PolicySettings {
    fn default() -> Self {
        PolicySettings {
            mode: Mode::Enforce,
            threshold: 5,
            window: Duration::from_secs(600),
            first_lockout: Duration::from_secs(3600),
            timed_lockouts: 6,
            forgive_after: None,
        }
    }
}

impl PolicySettings {
    /// Returns the length of lockout number `level` (1-based), saturating
    /// at the largest representable duration instead of overflowing.
    pub fn lockout_length(&self, level: u32) -> Duration {
        let doublings = level.saturating_sub(1);
        if doublings >= 64 {
            return Duration::MAX;
        }
        let nanos = self
            .first_lockout
            .as_nanos()
            .checked_mul(1u128 << doublings);
        nanos
            .and_then(|nanos| {
                let secs = u64::try_from(nanos / 1_000_000_000).ok()?;
                Some(Duration::new(secs, (nanos % 1_000_000_000) as u32))
            })
            .unwrap_or(Duration::MAX)
    }
}

/// One bad message counted against a mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Strike {
    pub at: Timestamp,
    /// The verdict summary, such as `virus Eicar-Test-Signature`.
    pub verdict: String,
    /// sendguard's transaction id of the message.
    pub message_id: String,
    /// The message's `Message-ID` header field, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_message_id: Option<String>,
}

/// A lockout of a mailbox: timed (with an end) or permanent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lockout {
    /// Lockout number, counting from 1 over the mailbox's whole history.
    pub level: u32,
    pub started: Timestamp,
    /// End of a timed lockout (exclusive); `None` for a permanent block.
    pub until: Option<Timestamp>,
    /// False when the lockout started in monitor mode: it is recorded but
    /// refuses nothing.
    pub enforced: bool,
    /// True once the end of this timed lockout has been recorded as an event.
    pub end_recorded: bool,
}

impl Lockout {
    pub fn is_permanent(&self) -> bool {
        self.until.is_none()
    }

    /// Returns whether the lockout is in force at `now`.
    pub fn is_active(&self, now: Timestamp) -> bool {
        match self.until {
            None => true,
            Some(until) => now < until,
        }
    }
}

/// Everything the policy tracks for one mailbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxState {
    /// Strikes inside the current window, oldest first.
    pub strikes: Vec<Strike>,
    /// Lockouts started so far, the permanent block included.
    pub lockouts: u32,
    /// The most recent lockout, active or ended.
    pub block: Option<Lockout>,
}

/// A lockout count set back to zero by `forgive_after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forgiven {
    /// The count before it was forgiven.
    pub lockouts: u32,
    /// End of the last lockout, from which the forgiveness period ran.
    pub last_end: Timestamp,
}

/// The result of lifting a block with the support credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lifted {
    /// The permanent block that was lifted, if there was one.
    pub block: Option<Lockout>,
    /// Lockout count before the lift.
    pub lockouts_before: u32,
    /// Lockout count after it: zero when reset, unchanged otherwise.
    pub lockouts_after: u32,
}

/// Why a lift was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiftError {
    /// A timed lockout is in force; it cannot be lifted early and ends on
    /// its own.
    TimedLockout(Lockout),
    /// There is no permanent block to lift, and no count reset was requested.
    NotBlocked,
    /// A count reset was requested, but the count is already zero and no
    /// block is in force.
    NothingToReset,
}

impl std::fmt::Display for LiftError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LiftError::TimedLockout(lockout) => write!(
                f,
                "lockout {} is a timed lockout: timed lockouts cannot be lifted early, and this one \
                 ends at {}",
                lockout.level,
                lockout
                    .until
                    .map_or_else(String::new, Timestamp::to_rfc3339)
            ),
            LiftError::NotBlocked => f.write_str(
                "the mailbox has no permanent block to lift; to set its lockout count back to \
                 zero, ask for a count reset",
            ),
            LiftError::NothingToReset => f.write_str(
                "the mailbox has no block and its lockout count is already zero, so there is \
                 nothing to lift or reset; check the spelling of the mailbox",
            ),
        }
    }
}

impl std::error::Error for LiftError {}

/// The decision on a sender at MAIL FROM (or again at end of data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderDecision {
    Allow,
    /// An enforced lockout is in force: refuse the sender.
    Refuse(Lockout),
    /// A lockout computed in monitor mode is in force: the sender is allowed,
    /// and the would-be refusal is worth logging.
    MonitorOnly(Lockout),
}

/// The effect of recording one bad message on a mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrikeOutcome {
    /// Counted; `in_window` strikes are now inside the window.
    Counted { in_window: u32 },
    /// Not counted because a lockout is in force.
    DuringBlock(Lockout),
    /// This strike reached the threshold and started a lockout; `strikes`
    /// are the bad messages that triggered it, oldest first.
    LockoutStarted {
        lockout: Lockout,
        strikes: Vec<Strike>,
    },
}

/// Decides whether a mailbox whose most recent lockout is `block` may send
/// at `now` under `mode`, as [`MailboxState::check_sender`] does. Only the
/// most recent lockout matters, so a cache for sender checks can keep that
/// alone and leave the strikes in the store.
pub fn check_block(block: Option<&Lockout>, now: Timestamp, mode: Mode) -> SenderDecision {
    match block.filter(|block| block.is_active(now)) {
        None => SenderDecision::Allow,
        Some(block) if block.enforced || mode == Mode::Enforce => {
            SenderDecision::Refuse(block.clone())
        }
        Some(block) => SenderDecision::MonitorOnly(block.clone()),
    }
}

impl MailboxState {
    /// Returns the lockout in force at `now`, if any.
    pub fn active_block(&self, now: Timestamp) -> Option<&Lockout> {
        self.block.as_ref().filter(|block| block.is_active(now))
    }

    /// Decides whether the mailbox may send at `now` under `mode`.
    ///
    /// A lockout that started while enforcing refuses in both modes, so
    /// switching to monitor never lifts it. A lockout computed in monitor
    /// mode refuses once the policy enforces again, for the rest of its
    /// time: the dry run said the mailbox is locked out, and nothing is
    /// counted during a lockout, so leaving it unenforced would exempt the
    /// worst senders of the trial.
    pub fn check_sender(&self, now: Timestamp, mode: Mode) -> SenderDecision {
        check_block(self.block.as_ref(), now, mode)
    }

    /// Counts one bad message received at `strike.at` and starts a lockout
    /// when it brings the window to the threshold.
    ///
    /// Nothing is counted while a lockout (enforced or monitor-only) is in
    /// force, so a new lockout can only start after the previous one ended.
    /// Starting a lockout empties the window.
    pub fn record_strike(&mut self, settings: &PolicySettings, strike: Strike) -> StrikeOutcome {
        let now = strike.at;
        if let Some(block) = self.active_block(now) {
            return StrikeOutcome::DuringBlock(block.clone());
        }

        self.expire_strikes(settings, now);
        self.strikes.push(strike);
        let in_window = u32::try_from(self.strikes.len()).unwrap_or(u32::MAX);
        if in_window < settings.threshold.max(1) {
            return StrikeOutcome::Counted { in_window };
        }

        self.lockouts = self.lockouts.saturating_add(1);
        let level = self.lockouts;
        let until = if level > settings.timed_lockouts {
            None
        } else {
            Some(now.saturating_add(settings.lockout_length(level)))
        };
        let lockout = Lockout {
            level,
            started: now,
            until,
            enforced: settings.mode == Mode::Enforce,
            end_recorded: false,
        };
        self.block = Some(lockout.clone());
        let strikes = std::mem::take(&mut self.strikes);
        StrikeOutcome::LockoutStarted { lockout, strikes }
    }

    /// Applies one bad message as the guard does: first forgives the
    /// lockout count when `forgive_after` allows it at the strike's time,
    /// then counts the strike. The guard and the replay of recorded history
    /// both call this, so they cannot differ.
    pub fn apply_strike(
        &mut self,
        settings: &PolicySettings,
        strike: Strike,
    ) -> (Option<Forgiven>, StrikeOutcome) {
        let forgiven = self.forgive(settings, strike.at);
        let outcome = self.record_strike(settings, strike);
        (forgiven, outcome)
    }

    /// Sets the lockout count back to zero when `settings.forgive_after` has
    /// passed since the end of the last lockout. A permanent block is never
    /// forgiven, and neither is a lockout still in force.
    pub fn forgive(&mut self, settings: &PolicySettings, now: Timestamp) -> Option<Forgiven> {
        let forgive_after = settings.forgive_after?;
        if self.lockouts == 0 {
            return None;
        }
        let last_end = self.block.as_ref()?.until?;
        if now < last_end || now.since(last_end) < forgive_after {
            return None;
        }
        let forgiven = Forgiven {
            lockouts: self.lockouts,
            last_end,
        };
        self.lockouts = 0;
        self.block = None;
        Some(forgiven)
    }

    /// Lifts a permanent block and, when `reset_count` is set, sets the
    /// lockout count back to zero; with no block in force, only resets the
    /// count. Without a reset, the count stays, so the next trigger blocks
    /// the mailbox permanently again. Timed lockouts cannot be lifted.
    ///
    /// # Errors
    /// [`LiftError::TimedLockout`] while a timed lockout is in force, and
    /// [`LiftError::NotBlocked`] when there is nothing to lift or reset.
    pub fn lift(&mut self, now: Timestamp, reset_count: bool) -> Result<Lifted, LiftError> {
        let lockouts_before = self.lockouts;
        let block = match self.active_block(now) {
            Some(block) if !block.is_permanent() => {
                return Err(LiftError::TimedLockout(block.clone()));
            }
            Some(block) => Some(block.clone()),
            None if reset_count && self.lockouts == 0 => return Err(LiftError::NothingToReset),
            None if reset_count => None,
            None => return Err(LiftError::NotBlocked),
        };
        if block.is_some() {
            self.block = None;
            self.strikes.clear();
        }
        if reset_count {
            self.lockouts = 0;
            self.block = None;
        }
        Ok(Lifted {
            block,
            lockouts_before,
            lockouts_after: self.lockouts,
        })
    }

    /// Drops strikes that are `window` or more older than `now`.
    pub fn expire_strikes(&mut self, settings: &PolicySettings, now: Timestamp) {
        self.strikes
            .retain(|strike| now.since(strike.at) < settings.window);
    }

    /// Returns the timed lockout that ended at or before `now` and whose end
    /// is not yet recorded.
    pub fn unrecorded_end(&self, now: Timestamp) -> Option<&Lockout> {
        self.block
            .as_ref()
            .filter(|block| !block.end_recorded && block.until.is_some_and(|until| until <= now))
    }

    /// Marks the end of the current timed lockout as recorded.
    pub fn mark_end_recorded(&mut self) {
        if let Some(block) = self.block.as_mut() {
            block.end_recorded = true;
        }
    }

    /// Returns whether the state carries nothing worth storing at `now`: no strike
    /// in the window, no lockout history.
    pub fn is_empty(&self, settings: &PolicySettings, now: Timestamp) -> bool {
        self.lockouts == 0
            && self.block.is_none()
            && self
                .strikes
                .iter()
                .all(|strike| now.since(strike.at) >= settings.window)
    }

    /// Strikes still inside the window at `now`.
    pub fn strikes_in_window(&self, settings: &PolicySettings, now: Timestamp) -> usize {
        self.strikes
            .iter()
            .filter(|strike| now.since(strike.at) < settings.window)
            .count()
    }

    /// Returns the lockout count the next trigger builds on at `now`: zero
    /// when `forgive_after` would forgive the count, the count otherwise.
    pub fn effective_lockouts(&self, settings: &PolicySettings, now: Timestamp) -> u32 {
        let mut copy = self.clone();
        match copy.forgive(settings, now) {
            Some(_) => 0,
            None => self.lockouts,
        }
    }

    /// Length the next lockout would have under `settings` at `now`, or
    /// `None` when the next trigger blocks permanently. A count that
    /// `forgive_after` would set back to zero counts as zero.
    pub fn next_lockout_length(
        &self,
        settings: &PolicySettings,
        now: Timestamp,
    ) -> Option<Duration> {
        let level = self.effective_lockouts(settings, now).saturating_add(1);
        (level <= settings.timed_lockouts).then(|| settings.lockout_length(level))
    }
}

#[cfg(test)]
mod tests;
