//! Policy simulation: replays the recorded bad messages of a period through
//! the policy core under a candidate `[policy]` and `[identity]`, and
//! reports which mailboxes it would have locked out, side by side with
//! what really happened.
//!
//! [`replay`] is pure and takes events one by one. This module reads them
//! from the store in bounded pages and hands them over in time order.

pub mod replay;
pub mod report;

pub use replay::Replay;
pub use report::Report;

use crate::config::{Candidate, Config};
use crate::directory::Directory;
use crate::events::Event;
use crate::policy::Timestamp;
use crate::store::{EventPage, EventPosition, Store, StoreError};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

/// Events read from the store per page.
const PAGE_SIZE: usize = 2000;

/// How long an event read from the Redis stream is held back so that
/// events other hosts stored a little later still come in time order.
/// Events later than this are replayed late and counted in the report.
const REORDER_DELAY: Duration = Duration::from_secs(60);

/// The failure of a simulation.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error("invalid --since: {0}")]
    Since(String),
    #[error("cannot read the directory file with the candidate's identity settings: {0}")]
    Directory(String),
    #[error("invalid candidate exemptions.senders: {0}")]
    ExemptSender(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Returns the directory to map logins and aliases with under the
/// candidate: the one in force when the candidate keeps the identity
/// settings, else the same file read with the candidate's settings.
///
/// # Errors
/// When the directory file cannot be read again.
pub fn candidate_directory(
    config: &Config,
    current: &Directory,
    candidate: &Candidate,
) -> Result<Directory, SimulateError> {
    match &config.directory {
        Some(section) if candidate.identity != config.identity => {
            Directory::load(&section.path, &candidate.identity)
                .map_err(|error| SimulateError::Directory(error.to_string()))
        }
        _ => Ok(current.clone()),
    }
}

/// Checks that each sender in the candidate's `[exemptions]` is an address
/// or a login of `directory`, as `sendguard exemptions add` requires.
///
/// # Errors
/// On the first sender that is neither.
pub fn check_exempt_senders(
    candidate: &Candidate,
    directory: &Directory,
) -> Result<(), SimulateError> {
    for sender in &candidate.exemptions.senders {
        crate::identity::mailbox_from_input(sender, &candidate.identity, directory)
            .map_err(SimulateError::ExemptSender)?;
    }
    Ok(())
}

/// Checks the start of a simulated period against the store's clock.
///
/// # Errors
/// When `since` is not before `now`.
pub fn check_since(since: Timestamp, now: Timestamp) -> Result<(), SimulateError> {
    if since >= now {
        return Err(SimulateError::Since(format!(
            "{} is not in the past (now is {}); give a time before now, such as 30d",
            since.to_rfc3339(),
            now.to_rfc3339()
        )));
    }
    Ok(())
}

/// Replays the period from `since` to the store's present under
/// `candidate`, or with `follow_recorded` under the policies recorded in
/// force (see [`Replay::follow_recorded_policies`]), and returns the
/// report.
///
/// # Errors
/// When `since` is not in the past, when an exempt sender is invalid, or
/// on a store failure.
pub async fn run(
    store: &Store,
    candidate: &Candidate,
    directory: &Directory,
    since: Timestamp,
    follow_recorded: bool,
) -> Result<Report, SimulateError> {
    check_exempt_senders(candidate, directory)?;
    // With Redis, its clock is the one every recorded time comes from.
    let until = match store.shared() {
        Some(shared) => shared.time().await?,
        None => store.now(),
    };
    check_since(since, until)?;
    let mut replay = Replay::new(candidate, directory, since);
    if follow_recorded {
        replay = replay.follow_recorded_policies();
    }

    // The state at `since` comes from the lockouts, lifts and exemptions
    // recorded before it.
    let before = EventPage {
        since: None,
        until: Some(since),
        kinds: replay::BASELINE_KINDS.to_vec(),
        ..EventPage::default()
    };
    stream(store, before, &mut replay).await?;
    let period = EventPage {
        since: Some(since),
        until: Some(until),
        kinds: replay::REPLAY_KINDS.to_vec(),
        ..EventPage::default()
    };
    stream(store, period, &mut replay).await?;

    let mut report = replay.finish(until);
    report.limits.refusals_once_per_minute = store.shared().is_some();
    tracing::debug!(since = %since, events = report.events_read,
        real_lockouts = report.real.lockouts, simulated_lockouts = report.simulated.lockouts,
        peak_states = report.limits.peak_states, "policy simulation finished");
    Ok(report)
}

/// Feeds the events `page` selects to `replay` in time order, one bounded
/// page at a time.
async fn stream(store: &Store, page: EventPage, replay: &mut Replay<'_>) -> Result<(), StoreError> {
    let mut buffer = Reorder::new(!store.events_in_time_order());
    let mut after: Option<EventPosition> = None;
    loop {
        let request = EventPage {
            after,
            limit: PAGE_SIZE,
            ..page.clone()
        };
        let (events, next) = store.events_page(request).await?;
        for event in events {
            buffer.push(event, |event| replay.feed(&event));
        }
        match next {
            Some(position) => after = Some(position),
            None => break,
        }
    }
    buffer.drain(|event| replay.feed(&event));
    Ok(())
}

/// Puts events read in storage order back into time order, holding each
/// for [`REORDER_DELAY`] of stream time. With a store that returns time
/// order it passes events straight through.
struct Reorder {
    enabled: bool,
    held: BinaryHeap<Reverse<Held>>,
    /// Stream time of the newest entry read: for Redis, the time its entry
    /// reached the stream.
    newest: Option<Timestamp>,
}

/// An event ordered by time, then by its position in the store.
struct Held(Event);

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Held {}

impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

impl Held {
    fn key(&self) -> (Timestamp, i64) {
        (self.0.time, self.0.id.unwrap_or_default())
    }
}

impl Reorder {
    fn new(enabled: bool) -> Reorder {
        Reorder {
            enabled,
            held: BinaryHeap::new(),
            newest: None,
        }
    }

    fn push(&mut self, event: Event, mut emit: impl FnMut(Event)) {
        if !self.enabled {
            emit(event);
            return;
        }
        let arrived = event
            .id
            .map_or(event.time, crate::store::redis::stream_time);
        self.newest = Some(self.newest.map_or(arrived, |newest| newest.max(arrived)));
        self.held.push(Reverse(Held(event)));
        let release_before = self.newest.unwrap_or(arrived).saturating_sub(REORDER_DELAY);
        while self
            .held
            .peek()
            .is_some_and(|Reverse(held)| held.0.time < release_before)
        {
            if let Some(Reverse(Held(event))) = self.held.pop() {
                emit(event);
            }
        }
    }

    fn drain(&mut self, mut emit: impl FnMut(Event)) {
        while let Some(Reverse(Held(event))) = self.held.pop() {
            emit(event);
        }
    }
}

#[cfg(test)]
mod tests;
