//! Device health heartbeats: the registry of devices, their health state,
//! missing detection, access decisions between devices, exclusions and
//! the notices sent to each subnet.
//!
//! The rules are pure and take the clock as an argument: [`health`]
//! derives a device's state from its last report, and [`access`] decides
//! access requests, exclusions and subnets. [`Registry`] keeps the state in
//! memory over the store, records every change as an event, and wakes the
//! server-sent-event streams; [`run_device_timer`] finds missing devices.
//!
//! Unsafe means red health or a missing heartbeat. A device that has never
//! reported is not unsafe, and an agent that signs off in order (sleep or
//! shutdown) is offline, which is not unsafe either.

pub mod access;
pub mod health;
mod registry;

pub use access::{Access, Party, Refusal, Side, decide};
pub use health::{DeviceState, DeviceStatus, Health, Timing};
pub use registry::{
    AccessOutcome, Lift, LookupError, Registry, RelayRefusal, Report, run_device_timer,
};
