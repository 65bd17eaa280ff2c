//! The health state of one device, derived from its last report and the
//! clock. Pure: `now` and sendguard's start time are passed in.

use crate::policy::Timestamp;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// Health as a device's agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Green,
    /// A warning only; the device stays safe.
    Yellow,
    /// Unsafe: peers may refuse it.
    Red,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Green => "green",
            Health::Yellow => "yellow",
            Health::Red => "red",
        }
    }

    pub fn parse(text: &str) -> Option<Health> {
        match text {
            "green" => Some(Health::Green),
            "yellow" => Some(Health::Yellow),
            "red" => Some(Health::Red),
            _ => None,
        }
    }
}

/// The health state of a device as derived by sendguard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    /// The device has never reported. It is not unsafe, because sendguard has
    /// no report against it.
    #[default]
    Unknown,
    Green,
    Yellow,
    Red,
    /// The agent signed off in order (sleep or shutdown). Not unsafe.
    Offline,
    /// No report for `heartbeat_timeout`, without a sign-off. Unsafe.
    Missing,
}

impl DeviceState {
    /// Returns whether peers may refuse the device: red or missing.
    pub fn is_unsafe(self) -> bool {
        matches!(self, DeviceState::Red | DeviceState::Missing)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Unknown => "unknown",
            DeviceState::Green => "green",
            DeviceState::Yellow => "yellow",
            DeviceState::Red => "red",
            DeviceState::Offline => "offline",
            DeviceState::Missing => "missing",
        }
    }
}

impl From<Health> for DeviceState {
    fn from(health: Health) -> DeviceState {
        match health {
            Health::Green => DeviceState::Green,
            Health::Yellow => DeviceState::Yellow,
            Health::Red => DeviceState::Red,
        }
    }
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The stored state of a device between its reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// Health of the last heartbeat; `None` before the first one.
    pub health: Option<Health>,
    /// Whether the last report was an orderly sign-off.
    pub offline: bool,
    /// Time of the last report (heartbeat or sign-off).
    pub last_report: Option<Timestamp>,
    /// Addresses of the last heartbeat, minus those another device
    /// reported since.
    pub addresses: Vec<std::net::IpAddr>,
    /// When the device was found missing; cleared by its next report, so a
    /// missing device stays missing across a restart of sendguard.
    pub missing_since: Option<Timestamp>,
    /// The state last recorded, to tell a change from a repeat.
    pub state: DeviceState,
    /// When `state` last changed.
    pub changed: Option<Timestamp>,
    /// The reason the agent gave with its last heartbeat for a yellow or
    /// red health, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_reason: Option<String>,
}

/// The timing rules of missing detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Time without a report after which a device is missing.
    pub heartbeat_timeout: Duration,
    /// When this sendguard process started. No device becomes missing
    /// before one full timeout after it, because reports sent while
    /// sendguard was down were lost, not skipped.
    pub started: Timestamp,
}

impl DeviceStatus {
    /// Returns when the device becomes missing if it does not report, or
    /// `None` when it cannot (never reported, signed off, already missing).
    pub fn missing_at(&self, timing: Timing) -> Option<Timestamp> {
        if self.offline || self.missing_since.is_some() {
            return None;
        }
        let last = self.last_report?;
        Some(
            last.max(timing.started)
                .saturating_add(timing.heartbeat_timeout),
        )
    }

    /// Returns the device's state at `now`. Only a green or yellow report
    /// makes an unsafe device safe again: a red or missing device that
    /// signs off stays unsafe, so a compromised agent cannot lift the
    /// refusals by saying it goes to sleep.
    pub fn evaluate(&self, now: Timestamp, timing: Timing) -> DeviceState {
        if self.last_report.is_none() {
            return DeviceState::Unknown;
        }
        if self.health == Some(Health::Red) {
            return DeviceState::Red;
        }
        if self.missing_since.is_some() {
            return DeviceState::Missing;
        }
        if self.offline {
            return DeviceState::Offline;
        }
        if self.missing_at(timing).is_some_and(|at| now >= at) {
            return DeviceState::Missing;
        }
        self.health.map_or(DeviceState::Unknown, DeviceState::from)
    }

    /// Applies a heartbeat with `health` and `addresses` received at `now`.
    pub fn heartbeat(&mut self, health: Health, addresses: Vec<std::net::IpAddr>, now: Timestamp) {
        self.health = Some(health);
        self.offline = false;
        self.missing_since = None;
        self.last_report = Some(now);
        self.addresses = addresses;
    }

    /// Applies an orderly sign-off received at `now`. The addresses stay
    /// with the device until another device reports them. A device already
    /// missing stays missing.
    pub fn sign_off(&mut self, now: Timestamp) {
        self.offline = true;
        self.last_report = Some(now);
    }

    /// Moves the status to `state` when it differs from the recorded one,
    /// and returns the previous state.
    pub fn record(&mut self, state: DeviceState, now: Timestamp) -> Option<DeviceState> {
        if state == DeviceState::Missing && self.missing_since.is_none() {
            self.missing_since = Some(now);
        }
        if state == self.state {
            return None;
        }
        let previous = self.state;
        self.state = state;
        self.changed = Some(now);
        Some(previous)
    }

    /// Returns why the device is unsafe, or `None` when it is not.
    pub fn unsafe_reason(&self, timing: Timing) -> Option<String> {
        match self.state {
            DeviceState::Red => {
                let at = self
                    .last_report
                    .map_or("-".to_string(), Timestamp::to_rfc3339);
                Some(match &self.health_reason {
                    Some(reason) => format!("reported red health at {at}: {reason}"),
                    None => format!("reported red health at {at}"),
                })
            }
            DeviceState::Missing => Some(format!(
                "no heartbeat since {} (heartbeat_timeout {})",
                self.last_report
                    .map_or("-".to_string(), Timestamp::to_rfc3339),
                humantime::format_duration(timing.heartbeat_timeout)
            )),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(60);

    fn timing(started: i64) -> Timing {
        Timing {
            heartbeat_timeout: TIMEOUT,
            started: Timestamp::from_secs(started),
        }
    }

    fn reported(health: Health, at: i64) -> DeviceStatus {
        let mut status = DeviceStatus::default();
        status.heartbeat(health, Vec::new(), Timestamp::from_secs(at));
        status
    }

    #[test]
    fn unsafe_device_stays_unsafe_when_signing_off() {
        let mut red = reported(Health::Red, 0);
        red.sign_off(Timestamp::from_secs(10));
        assert_eq!(
            red.evaluate(Timestamp::from_secs(20), timing(0)),
            DeviceState::Red
        );

        let mut missing = reported(Health::Green, 0);
        let late = Timestamp::from_secs(100);
        let state = missing.evaluate(late, timing(0));
        assert_eq!(state, DeviceState::Missing);
        missing.record(state, late);
        missing.sign_off(Timestamp::from_secs(110));
        assert_eq!(
            missing.evaluate(Timestamp::from_secs(120), timing(0)),
            DeviceState::Missing
        );

        let mut green = reported(Health::Green, 0);
        green.sign_off(Timestamp::from_secs(10));
        assert_eq!(
            green.evaluate(Timestamp::from_secs(1000), timing(0)),
            DeviceState::Offline
        );
    }

    #[test]
    fn never_reported_is_unknown_and_safe() {
        let status = DeviceStatus::default();
        let state = status.evaluate(Timestamp::from_secs(10_000), timing(0));
        assert_eq!(state, DeviceState::Unknown);
        assert!(!state.is_unsafe());
        assert_eq!(status.missing_at(timing(0)), None);
    }

    #[test]
    fn health_maps_to_state() {
        let cases = [
            (Health::Green, DeviceState::Green, false),
            (Health::Yellow, DeviceState::Yellow, false),
            (Health::Red, DeviceState::Red, true),
        ];
        for (health, expected, unsafe_) in cases {
            let state = reported(health, 1000).evaluate(Timestamp::from_secs(1001), timing(0));
            assert_eq!(state, expected, "{health:?}");
            assert_eq!(state.is_unsafe(), unsafe_, "{health:?}");
        }
    }

    #[test]
    fn missing_exactly_at_timeout() {
        let status = reported(Health::Green, 1000);
        let before = Timestamp::from_secs(1060).saturating_sub(Duration::from_millis(1));
        assert_eq!(status.evaluate(before, timing(0)), DeviceState::Green);
        assert_eq!(
            status.evaluate(Timestamp::from_secs(1060), timing(0)),
            DeviceState::Missing
        );
        assert!(DeviceState::Missing.is_unsafe());
    }

    #[test]
    fn no_missing_within_timeout_of_start() {
        // Last report long before sendguard started at 5000.
        let status = reported(Health::Green, 1000);
        assert_eq!(
            status.missing_at(timing(5000)),
            Some(Timestamp::from_secs(5060))
        );
        assert_eq!(
            status.evaluate(Timestamp::from_secs(5059), timing(5000)),
            DeviceState::Green
        );
        assert_eq!(
            status.evaluate(Timestamp::from_secs(5060), timing(5000)),
            DeviceState::Missing
        );
    }

    #[test]
    fn missing_survives_restart() {
        let mut status = reported(Health::Green, 1000);
        status.record(DeviceState::Missing, Timestamp::from_secs(1060));
        // sendguard restarts at 2000: the device stays missing, without a
        // grace period, until it reports.
        assert_eq!(
            status.evaluate(Timestamp::from_secs(2000), timing(2000)),
            DeviceState::Missing
        );
        status.heartbeat(Health::Green, Vec::new(), Timestamp::from_secs(2001));
        assert_eq!(
            status.evaluate(Timestamp::from_secs(2001), timing(2000)),
            DeviceState::Green
        );
    }

    #[test]
    fn offline_never_missing() {
        let mut status = reported(Health::Green, 1000);
        status.sign_off(Timestamp::from_secs(1010));
        let state = status.evaluate(Timestamp::from_secs(100_000), timing(0));
        assert_eq!(state, DeviceState::Offline);
        assert!(!state.is_unsafe());
        assert_eq!(status.missing_at(timing(0)), None);
    }

    #[test]
    fn heartbeat_after_offline_is_health() {
        let mut status = reported(Health::Green, 1000);
        status.sign_off(Timestamp::from_secs(1010));
        status.heartbeat(Health::Red, Vec::new(), Timestamp::from_secs(1020));
        assert_eq!(
            status.evaluate(Timestamp::from_secs(1021), timing(0)),
            DeviceState::Red
        );
    }

    #[test]
    fn record_reports_changes_only() {
        let mut status = DeviceStatus::default();
        let now = Timestamp::from_secs(10);
        assert_eq!(
            status.record(DeviceState::Green, now),
            Some(DeviceState::Unknown)
        );
        assert_eq!(status.record(DeviceState::Green, now), None);
        assert_eq!(
            status.record(DeviceState::Missing, now),
            Some(DeviceState::Green)
        );
        assert_eq!(status.missing_since, Some(now));
    }

    #[test]
    fn unsafe_reason_names_cause() {
        let mut status = reported(Health::Red, 1000);
        status.record(DeviceState::Red, Timestamp::from_secs(1000));
        let reason = status.unsafe_reason(timing(0)).expect("red is unsafe");
        assert!(reason.contains("red health"), "{reason}");
        status.record(DeviceState::Green, Timestamp::from_secs(1001));
        assert_eq!(status.unsafe_reason(timing(0)), None);
    }
}
