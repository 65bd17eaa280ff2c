//! The device registry: device definitions from the devices file, each
//! device's status in memory over the store, address ownership, state
//! changes with their events, subnet notices and webhooks.

use super::access::{self, Exclusion, ExclusionRules, Party};
use super::health::{DeviceState, DeviceStatus, Health, Timing};
use crate::actions::{ActionKind, OutboxEntry, new_delivery_id};
use crate::config::DevicesConfig;
use crate::config::devices::{DeviceBook, DeviceDefinition};
use crate::events::{Event, EventKind};
use crate::guard::Guard;
use crate::policy::Timestamp;
use crate::store::devices::{self as device_store, Change, ExclusionRow, Notice, SettingRow};
use crate::store::redis::DeviceTable;
use crate::store::{Store, StoreError};
use arc_swap::ArcSwap;
use ipnet::IpNet;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;
use tokio::sync::{Mutex, Notify, watch};

/// Name of the `reject_unsafe` setting in the store and in events.
const REJECT_UNSAFE: &str = "reject_unsafe";

/// Name of the `synchronized_security.enabled` setting in the store and in
/// events. It shares the store's table of settings with `reject_unsafe`.
const SYNCHRONIZED_SECURITY: &str = "synchronized_security";

/// Notices read from the store per query of a stream.
const NOTICE_BATCH: usize = 500;

/// Writes of the device table tried before a conflict is reported as a
/// failure (Redis only).
const MAX_WRITE_ATTEMPTS: usize = 64;

/// Length of the lease that lets one host with Redis record missing
/// devices. It is also the longest gap between the hosts' renewals of the
/// shared start time before a start counts as a fresh one.
const DEVICE_LEASE: Duration = Duration::from_secs(6);

/// A report from a device's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// A heartbeat with the device's health and current addresses.
    Heartbeat {
        health: Health,
        addresses: Vec<IpAddr>,
        /// The agent's reason for a yellow or red health.
        reason: Option<String>,
    },
    /// An orderly sign-off: the agent goes to sleep or stops.
    Offline,
}

/// The failure to use a device or address.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An access decision with the events it recorded.
#[derive(Debug, Clone)]
pub struct AccessOutcome {
    pub source: Party,
    pub destination: Party,
    pub decision: access::Access,
}

/// The relay gate's refusal of an SMTP client.
#[derive(Debug, Clone)]
pub struct RelayRefusal {
    pub device: String,
    pub name: String,
    /// The product's text, for the SMTP reply.
    pub text: String,
}

#[derive(Default)]
struct Table {
    /// The Redis device table's version these statuses are from; 0 with
    /// SQLite.
    version: i64,
    statuses: HashMap<String, DeviceStatus>,
    /// Each address and the device that reported it last.
    owners: HashMap<IpAddr, String>,
}

impl Table {
    fn status(&self, id: &str) -> DeviceStatus {
        self.statuses.get(id).cloned().unwrap_or_default()
    }

    fn rebuild_owners(&mut self) {
        let mut owners = HashMap::new();
        for (id, status) in &self.statuses {
            for address in &status.addresses {
                owners.insert(*address, id.clone());
            }
        }
        self.owners = owners;
    }
}

/// The exclusions added and lifted through the API, as loaded from the
/// store.
#[derive(Debug, Default)]
struct ExclusionOverrides {
    added: BTreeSet<String>,
    lifted: BTreeSet<String>,
    /// Every override by device id.
    rows: BTreeMap<String, ExclusionRow>,
}

impl ExclusionOverrides {
    fn from_rows(rows: Vec<ExclusionRow>) -> ExclusionOverrides {
        let mut overrides = ExclusionOverrides::default();
        for row in rows {
            if row.excluded {
                overrides.added.insert(row.device.clone());
            } else {
                overrides.lifted.insert(row.device.clone());
            }
            overrides.rows.insert(row.device.clone(), row);
        }
        overrides
    }
}

/// The outcome of lifting a device's exclusion through the API.
#[derive(Debug, Clone, PartialEq)]
pub enum Lift {
    /// The lift was stored; the device is no longer excluded.
    Lifted,
    /// The device already has an exclusion added or lifted through the
    /// API, which stays as it is.
    AlreadyOverridden,
    /// Neither `devices.exclusions` nor the device's role excludes it, so
    /// there is nothing to lift.
    NotExcludedByFile,
}

/// The device registry, shared by the API, the relay gate and the timer.
pub struct Registry {
    store: Store,
    book: ArcSwap<DeviceBook>,
    table: Mutex<Table>,
    /// Exclusions added and lifted through the API.
    exclusion_overrides: ArcSwap<ExclusionOverrides>,
    /// Milliseconds since the epoch from which missing detection counts:
    /// this process's start, or with Redis the start shared by the hosts.
    started: AtomicI64,
    /// Wakes the missing-detection timer after a report.
    reported: Notify,
    /// The id of the newest notice; streams wait for it to change.
    newest_notice: watch::Sender<i64>,
    /// Wakes the outbox after a subnet webhook was queued.
    outbox_queued: Notify,
    /// `reject_unsafe` as set through the API, which overrides the file.
    reject_override: ArcSwap<Option<SettingRow>>,
    /// `synchronized_security.enabled` as set through the API, which
    /// overrides the file.
    synchronized_override: ArcSwap<Option<SettingRow>>,
}

impl Registry {
    /// Creates an empty registry; `started` is when this process started.
    pub fn new(store: Store, started: Timestamp) -> Registry {
        Registry {
            store,
            book: ArcSwap::from_pointee(DeviceBook::default()),
            table: Mutex::new(Table::default()),
            exclusion_overrides: ArcSwap::from_pointee(ExclusionOverrides::default()),
            started: AtomicI64::new(started.millis()),
            reported: Notify::new(),
            newest_notice: watch::Sender::new(0),
            outbox_queued: Notify::new(),
            reject_override: ArcSwap::from_pointee(None),
            synchronized_override: ArcSwap::from_pointee(None),
        }
    }

    /// Reads the devices file named by `config`.
    ///
    /// # Errors
    /// When the file cannot be read or has invalid entries.
    pub fn load_book(&self, config: &DevicesConfig) -> Result<(), String> {
        let book = match &config.file {
            None => DeviceBook::default(),
            Some(path) => {
                DeviceBook::load(path).map_err(|error| format!("devices.file: {error}"))?
            }
        };
        tracing::info!(devices = book.devices.len(), "devices file loaded");
        self.book.store(Arc::new(book));
        Ok(())
    }

    /// Reads the devices file again; a file that cannot be read or parsed
    /// keeps the previous definitions, with a warning.
    pub fn reload_book(&self, config: &DevicesConfig) {
        if let Err(error) = self.load_book(config) {
            tracing::warn!(%error, devices = self.book.load().devices.len(),
                "devices file not loaded; the previous device definitions stay in force");
        }
    }

    /// Returns the device definitions in force.
    pub fn book(&self) -> Arc<DeviceBook> {
        self.book.load_full()
    }

    /// Reads device statuses, API exclusions and the newest notice id from
    /// the store. With Redis, the statuses are the shared ones; the host's
    /// SQLite file keeps only its notices then.
    ///
    /// # Errors
    /// On a store failure.
    pub async fn load(&self) -> Result<(), StoreError> {
        let newest = self
            .store
            .call(|connection| device_store::last_notice_id(connection))
            .await?;
        let loaded = match self.store.shared() {
            Some(shared) => shared.device_table().await?,
            None => DeviceTable {
                version: 0,
                statuses: self
                    .store
                    .call(|connection| device_store::load_all(connection))
                    .await?,
            },
        };
        self.load_settings().await?;
        let mut table = self.table.lock().await;
        Self::replace_table(&mut table, loaded);
        self.newest_notice.send_replace(newest);
        Ok(())
    }

    fn replace_table(table: &mut Table, loaded: DeviceTable) {
        table.version = loaded.version;
        table.statuses = loaded.statuses.into_iter().collect();
        table.rebuild_owners();
    }

    /// Reads the device statuses again after another host changed them;
    /// does nothing with SQLite.
    ///
    /// # Errors
    /// On a store failure; the statuses read before stay in force then.
    pub async fn reload_statuses(&self) -> Result<(), StoreError> {
        let Some(shared) = self.store.shared() else {
            return Ok(());
        };
        // NOTE: every status change on any host makes each other host read
        // the whole device table, which costs O(devices) per heartbeat
        // that changes a status.
        let loaded = shared.device_table().await?;
        let mut table = self.table.lock().await;
        // A report on this host may have written a newer version between
        // the read and the lock; that copy stays.
        if loaded.version < table.version {
            return Ok(());
        }
        Self::replace_table(&mut table, loaded);
        Ok(())
    }

    /// Renews the start time the hosts sharing Redis agree on and counts
    /// missing heartbeats from it; does nothing with SQLite.
    ///
    /// A host that starts while another host runs takes the earlier start,
    /// because the other host received the heartbeats meanwhile. Only when
    /// no host renewed it for [`DEVICE_LEASE`] does a start count as a
    /// fresh one, after which no device becomes missing for one timeout.
    ///
    /// # Errors
    /// On a store failure; the start time known before stays then.
    pub async fn renew_shared_start(&self, now: Timestamp) -> Result<(), StoreError> {
        let Some(shared) = self.store.shared() else {
            return Ok(());
        };
        let since = shared.device_up_since(now, DEVICE_LEASE).await?;
        self.started.store(since.millis(), Ordering::Relaxed);
        Ok(())
    }

    /// Reads the settings and exclusions made through the API, which
    /// another host may have changed when the store is Redis.
    ///
    /// # Errors
    /// On a store failure; the ones loaded before stay in force then.
    pub async fn load_settings(&self) -> Result<(), StoreError> {
        let settings = self.store.device_settings().await?;
        let stored = |name: &str| {
            settings
                .iter()
                .find(|row| row.name == name && row.value.is_boolean())
                .cloned()
        };
        self.reject_override.store(Arc::new(stored(REJECT_UNSAFE)));
        self.synchronized_override
            .store(Arc::new(stored(SYNCHRONIZED_SECURITY)));
        self.load_exclusions().await
    }

    /// Returns whether unsafe devices are refused: the API's setting when
    /// one is in force, else `devices.reject_unsafe`.
    pub fn reject_unsafe(&self, config: &DevicesConfig) -> bool {
        self.reject_override
            .load()
            .as_ref()
            .as_ref()
            .and_then(|row| row.value.as_bool())
            .unwrap_or(config.reject_unsafe)
    }

    /// Returns the `reject_unsafe` override set through the API, if any.
    pub fn reject_unsafe_override(&self) -> Option<SettingRow> {
        self.reject_override.load().as_ref().clone()
    }

    /// Overrides `reject_unsafe` (or with `None` goes back to the file's
    /// value) and records who did it and why.
    ///
    /// # Errors
    /// On a store failure; the setting in force stays then.
    pub async fn set_reject_unsafe(
        &self,
        value: Option<bool>,
        author: &str,
        reason: &str,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let slot = &self.reject_override;
        self.save_setting(REJECT_UNSAFE, slot, value, author, reason, now)
            .await
    }

    /// Returns the `synchronized_security.enabled` override set through the
    /// API, if any.
    pub fn synchronized_security_override(&self) -> Option<SettingRow> {
        self.synchronized_override.load().as_ref().clone()
    }

    /// Overrides `synchronized_security.enabled` (or with `None` goes back
    /// to the file's value) and records who did it and why.
    ///
    /// # Errors
    /// On a store failure; the setting in force stays then.
    pub async fn set_synchronized_security(
        &self,
        value: Option<bool>,
        author: &str,
        reason: &str,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let slot = &self.synchronized_override;
        self.save_setting(SYNCHRONIZED_SECURITY, slot, value, author, reason, now)
            .await
    }

    /// Stores a setting's override (removed when `value` is `None`) with
    /// its event, then puts the row now in force into `slot`.
    async fn save_setting(
        &self,
        name: &str,
        slot: &ArcSwap<Option<SettingRow>>,
        value: Option<bool>,
        author: &str,
        reason: &str,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let row = SettingRow {
            name: name.to_string(),
            value: value.map_or(Value::Null, Value::Bool),
            author: author.to_string(),
            reason: reason.to_string(),
            changed: now,
        };
        let mut details = Map::new();
        details.insert("setting".into(), name.into());
        details.insert("value".into(), row.value.clone());
        details.insert("by".into(), author.into());
        details.insert("reason".into(), reason.into());
        let kind = if name == REJECT_UNSAFE {
            EventKind::DeviceSettingChanged
        } else {
            EventKind::SettingChanged
        };
        let event = Event::for_device(now, kind, None, details);
        self.store.save_device_setting(row.clone(), event).await?;
        tracing::warn!(setting = name, value = ?value, author, reason,
            "setting changed through the API");
        slot.store(Arc::new(value.is_some().then_some(row)));
        Ok(())
    }

    fn timing(&self, config: &DevicesConfig) -> Timing {
        Timing {
            heartbeat_timeout: config.heartbeat_timeout,
            started: Timestamp(self.started.load(Ordering::Relaxed)),
        }
    }

    /// Returns the token hash of each device that has one, for the API.
    pub fn token_owner(&self, presented: &[u8; 32]) -> Option<String> {
        let book = self.book.load();
        book.devices
            .iter()
            .find(|device| {
                device
                    .token_hash()
                    .is_some_and(|hash| crate::admin::constant_time_eq(&hash, presented))
            })
            .map(|device| device.id.clone())
    }

    /// Returns why `device` is excluded, or `None` when it is not.
    fn exclusion(&self, config: &DevicesConfig, device: &DeviceDefinition) -> Option<String> {
        self.exclusion_in_force(config, device)
            .map(|found| found.reason)
    }

    /// Applies `decide` to the exclusion rules in force.
    fn with_exclusion_rules<T>(
        &self,
        config: &DevicesConfig,
        decide: impl FnOnce(&ExclusionRules<'_>) -> T,
    ) -> T {
        let overrides = self.exclusion_overrides.load();
        let rules = ExclusionRules {
            configured: &config.exclusions,
            added: &overrides.added,
            lifted: &overrides.lifted,
            update_caches: config.exclude_update_caches,
            message_relays: config.exclude_message_relays,
        };
        decide(&rules)
    }

    fn exclusion_in_force(
        &self,
        config: &DevicesConfig,
        device: &DeviceDefinition,
    ) -> Option<Exclusion> {
        self.with_exclusion_rules(config, |rules| access::exclusion(device, rules))
    }

    /// Returns the exclusion fields of a device's view: whether it is
    /// excluded, why, the source of that (`file`, `role` or `api`), and
    /// the lift through the API, if any, with what it lifts.
    fn exclusion_fields(
        &self,
        config: &DevicesConfig,
        device: &DeviceDefinition,
    ) -> Map<String, Value> {
        let in_force = self.exclusion_in_force(config, device);
        let from_file =
            self.with_exclusion_rules(config, |rules| access::file_exclusion(device, rules));
        let overrides = self.exclusion_overrides.load();
        let lifted = overrides
            .rows
            .get(&device.id)
            .filter(|row| !row.excluded)
            .map(|row| {
                json!({
                    "by": row.author,
                    "reason": row.reason,
                    "at": row.created.to_rfc3339(),
                    "file_source": from_file.as_ref().map(|found| found.source.as_str()),
                    "file_reason": from_file.as_ref().map(|found| found.reason.clone()),
                })
            });
        let mut fields = Map::new();
        fields.insert("excluded".into(), in_force.is_some().into());
        fields.insert(
            "exclusion_reason".into(),
            in_force.as_ref().map(|found| found.reason.clone()).into(),
        );
        fields.insert(
            "exclusion_source".into(),
            in_force.as_ref().map(|found| found.source.as_str()).into(),
        );
        fields.insert("exclusion_lifted".into(), lifted.unwrap_or(Value::Null));
        fields
    }

    fn subnets(
        config: &DevicesConfig,
        device: &DeviceDefinition,
        status: &DeviceStatus,
    ) -> Vec<IpNet> {
        access::device_subnets(
            device.subnet,
            &status.addresses,
            config.subnet_prefix_v4,
            config.subnet_prefix_v6,
        )
    }

    /// Applies a device's report and records any state change.
    ///
    /// # Errors
    /// [`LookupError::NotFound`] for a device not in the devices file, or a
    /// store failure (nothing changes then).
    pub async fn report(
        &self,
        config: &DevicesConfig,
        id: &str,
        report: Report,
        now: Timestamp,
    ) -> Result<Value, LookupError> {
        let book = self.book.load_full();
        let Some(device) = book.get(id) else {
            return Err(unknown_device(id));
        };
        let timing = self.timing(config);
        let mut table = self.table.lock().await;
        let mut attempts = 0;
        let (status, notices) = loop {
            let (status, touched, change) =
                self.apply_report(config, &book, &table, device, &report, now, timing);
            let Some((version, notices)) = self.commit(table.version, change, now).await? else {
                // Another host changed the device table since it was read:
                // read it again and apply the report to the new statuses.
                attempts += 1;
                if attempts >= MAX_WRITE_ATTEMPTS {
                    return Err(StoreError::Conflict { attempts }.into());
                }
                self.read_table(&mut table).await?;
                continue;
            };

            for (other, other_status) in touched {
                table.statuses.insert(other, other_status);
            }
            table.statuses.insert(id.to_string(), status.clone());
            table.version = version;
            table.rebuild_owners();
            break (status, notices);
        };
        drop(table);
        self.publish(&notices);
        self.reported.notify_one();
        tracing::debug!(device = %id, state = %status.state, "device reported");
        Ok(self.view_of(config, device, &status, now))
    }

    /// Applies `report` to `device`'s status in `table`. Returns the new
    /// status, the devices that lost an address to it with their new
    /// statuses, and the change to write. The change contains all those
    /// statuses with the events, notices and webhooks of a state change.
    #[allow(clippy::too_many_arguments)]
    fn apply_report(
        &self,
        config: &DevicesConfig,
        book: &DeviceBook,
        table: &Table,
        device: &DeviceDefinition,
        report: &Report,
        now: Timestamp,
        timing: Timing,
    ) -> (DeviceStatus, Vec<(String, DeviceStatus)>, Change) {
        let id = device.id.as_str();
        let mut status = table.status(id);
        let mut touched: Vec<(String, DeviceStatus)> = Vec::new();
        let old_subnets = Self::subnets(config, device, &status);
        match report {
            Report::Heartbeat {
                health,
                addresses,
                reason,
            } => {
                let mut addresses: Vec<IpAddr> = addresses
                    .iter()
                    .map(|address| address.to_canonical())
                    .collect();
                addresses.sort();
                addresses.dedup();
                // An address belongs to the device that reported it last.
                for address in &addresses {
                    let Some(previous) = table.owners.get(address) else {
                        continue;
                    };
                    if previous == id {
                        continue;
                    }
                    let mut other = touched
                        .iter()
                        .position(|(other, _)| other == previous)
                        .map(|index| touched.remove(index).1)
                        .unwrap_or_else(|| table.status(previous));
                    other.addresses.retain(|owned| owned != address);
                    tracing::info!(address = %address, from = %previous, to = %id,
                    "address moved to the device that reported it last");
                    touched.push((previous.clone(), other));
                }
                status.heartbeat(*health, addresses, now);
                status.health_reason = reason.clone().filter(|_| *health != Health::Green);
            }
            Report::Offline => status.sign_off(now),
        }
        let mut change = Change::default();
        let was_unsafe = status.state.is_unsafe();
        self.transition(
            config,
            book,
            table,
            device,
            &mut status,
            now,
            timing,
            &mut change,
        );
        if was_unsafe && status.state.is_unsafe() {
            // An unsafe device that moved subnet: the subnets it joined learn
            // it is unsafe, the ones it left that it is gone.
            let new_subnets = Self::subnets(config, device, &status);
            let joined: Vec<IpNet> = new_subnets
                .iter()
                .filter(|subnet| !old_subnets.contains(subnet))
                .copied()
                .collect();
            let left: Vec<IpNet> = old_subnets
                .iter()
                .filter(|subnet| !new_subnets.contains(subnet))
                .copied()
                .collect();
            let reason = status.unsafe_reason(timing);
            let state = status.state;
            self.notify(
                config,
                book,
                table,
                device,
                "device_unsafe",
                state,
                state,
                reason.clone(),
                &joined,
                now,
                &mut change,
            );
            let moved = Some("the device moved to another subnet".to_string());
            self.notify(
                config,
                book,
                table,
                device,
                "device_safe",
                state,
                state,
                moved,
                &left,
                now,
                &mut change,
            );
        } else if was_unsafe && !status.state.is_unsafe() {
            // Subnets the device left while unsafe still list it as unsafe.
            let new_subnets = Self::subnets(config, device, &status);
            let left: Vec<IpNet> = old_subnets
                .iter()
                .filter(|subnet| !new_subnets.contains(subnet))
                .copied()
                .collect();
            let state = status.state;
            self.notify(
                config,
                book,
                table,
                device,
                "device_safe",
                state,
                state,
                None,
                &left,
                now,
                &mut change,
            );
        }
        change.statuses.push((id.to_string(), status.clone()));
        change.statuses.extend(touched.iter().cloned());
        (status, touched, change)
    }

    /// Records `status`'s state at `now` into `change`: the event of a
    /// state change, and the notices and webhooks when the device became
    /// unsafe or safe again.
    #[allow(clippy::too_many_arguments)]
    fn transition(
        &self,
        config: &DevicesConfig,
        book: &DeviceBook,
        table: &Table,
        device: &DeviceDefinition,
        status: &mut DeviceStatus,
        now: Timestamp,
        timing: Timing,
        change: &mut Change,
    ) {
        let state = status.evaluate(now, timing);
        let Some(previous) = status.record(state, now) else {
            return;
        };
        let reason = status.unsafe_reason(timing);
        let mut details = Map::new();
        details.insert("name".into(), device.name.clone().into());
        details.insert("from".into(), previous.as_str().into());
        details.insert("to".into(), state.as_str().into());
        details.insert("unsafe".into(), state.is_unsafe().into());
        let at = status
            .last_report
            .map_or("-".to_string(), Timestamp::to_rfc3339);
        let why = match (&reason, state) {
            (Some(reason), _) => reason.clone(),
            (None, DeviceState::Offline) => format!("the agent signed off at {at}"),
            (None, DeviceState::Unknown) => "no report since the device was added".to_string(),
            (None, state) => format!("reported {state} health at {at}"),
        };
        details.insert("reason".into(), why.into());
        change.events.push(Event::for_device(
            now,
            EventKind::DeviceStateChanged,
            Some(&device.id),
            details,
        ));
        if state.is_unsafe() {
            tracing::warn!(device = %device.id, name = %device.name, from = %previous, to = %state,
                reason = reason.as_deref().unwrap_or(""), "device state changed");
        } else {
            tracing::info!(device = %device.id, name = %device.name, from = %previous, to = %state,
                "device state changed");
        }
        if previous.is_unsafe() == state.is_unsafe() {
            return;
        }

        // The device became unsafe or safe again: tell its subnets.
        let kind = if state.is_unsafe() {
            "device_unsafe"
        } else {
            "device_safe"
        };
        let subnets = Self::subnets(config, device, status);
        self.notify(
            config, book, table, device, kind, state, previous, reason, &subnets, now, change,
        );
    }

    /// Queues a notice of `kind` for every subnet in `subnets`: stored for
    /// the event streams and, when configured, a webhook per subnet.
    #[allow(clippy::too_many_arguments)]
    fn notify(
        &self,
        config: &DevicesConfig,
        book: &DeviceBook,
        table: &Table,
        device: &DeviceDefinition,
        kind: &str,
        state: DeviceState,
        previous: DeviceState,
        reason: Option<String>,
        subnets: &[IpNet],
        now: Timestamp,
        change: &mut Change,
    ) {
        for &subnet in subnets {
            let body = json!({
                "type": kind,
                "time": now.to_rfc3339(),
                "subnet": subnet.to_string(),
                "device": device.id,
                "name": device.name,
                "role": device.role.as_str(),
                "state": state.as_str(),
                "previous": previous.as_str(),
                "unsafe": state.is_unsafe(),
                "reason": reason,
            });
            tracing::info!(device = %device.id, subnet = %subnet, kind, "subnet notified");
            if config.subnet_webhook_url.is_some() {
                let peers = self.devices_on(config, book, table, subnet, &device.id);
                change
                    .deliveries
                    .push(subnet_webhook(&body, peers, device, now));
            }
            change.notices.push(Notice {
                id: 0,
                time: now,
                subnet: subnet.to_string(),
                device: device.id.clone(),
                body,
            });
        }
    }

    /// Returns the devices on `subnet` other than `except`, as id and name.
    fn devices_on(
        &self,
        config: &DevicesConfig,
        book: &DeviceBook,
        table: &Table,
        subnet: IpNet,
        except: &str,
    ) -> Vec<Value> {
        book.devices
            .iter()
            .filter(|other| other.id != except)
            .filter(|other| {
                let status = table.status(&other.id);
                Self::subnets(config, other, &status).contains(&subnet)
            })
            .map(|other| json!({ "id": other.id, "name": other.name }))
            .collect()
    }

    /// Writes `change` and returns the device table's new version (0 with
    /// SQLite) and the notices stored on this host, or `None` when Redis's
    /// device table is no longer at `version`, so nothing was written.
    async fn commit(
        &self,
        version: i64,
        change: Change,
        now: Timestamp,
    ) -> Result<Option<(i64, Vec<Notice>)>, StoreError> {
        if let Some(shared) = self.store.shared() {
            let written = shared
                .write_devices(
                    version,
                    &change.statuses,
                    &change.events,
                    &change.deliveries,
                    &change.notices,
                )
                .await?;
            let Some(version) = written else {
                return Ok(None);
            };
            return Ok(Some((version, self.move_shared_work().await)));
        }
        let queued = !change.deliveries.is_empty();
        let notices = self
            .store
            .call(move |connection| device_store::commit(connection, change, now))
            .await?;
        if queued {
            self.outbox_queued.notify_one();
        }
        Ok(Some((0, notices)))
    }

    /// Moves the device events and webhooks written to Redis to the stream
    /// and the outbox, and stores and publishes the notices no host has
    /// taken yet. Returns the stored notices. A failure is logged, and the
    /// work stays pending for the next write or the timer's lease holder.
    pub async fn move_shared_work(&self) -> Vec<Notice> {
        let Some(shared) = self.store.shared() else {
            return Vec::new();
        };
        let (queued, notices) = match shared.move_device_work().await {
            Ok(moved) => moved,
            Err(error) => {
                tracing::warn!(%error, host = shared.host(),
                    "cannot move device events and webhooks on; the device timer retries");
                return Vec::new();
            }
        };
        if queued > 0 {
            self.outbox_queued.notify_one();
        }
        if notices.is_empty() {
            return notices;
        }
        let count = notices.len();
        let sent = notices.clone();
        match self
            .store
            .call(move |connection| device_store::add_notices(connection, notices))
            .await
        {
            Ok(stored) => {
                shared.announce_notices(&stored).await;
                stored
            }
            Err(error) => {
                // The other hosts store them under their own ids anyway.
                tracing::error!(%error, notices = count,
                    "cannot store subnet notices; this host's agents miss them");
                shared.announce_notices(&sent).await;
                Vec::new()
            }
        }
    }

    /// Reads Redis's device table into `table` after a write conflict.
    async fn read_table(&self, table: &mut Table) -> Result<(), StoreError> {
        if let Some(shared) = self.store.shared() {
            Self::replace_table(table, shared.device_table().await?);
        }
        Ok(())
    }

    /// Stores subnet notices another host sent and wakes the streams of
    /// this host's agents.
    ///
    /// # Errors
    /// On a store failure; the notices do not reach this host's agents then.
    pub async fn import_notices(&self, notices: Vec<Notice>) -> Result<usize, StoreError> {
        let stored = self
            .store
            .call(move |connection| device_store::add_notices(connection, notices))
            .await?;
        self.publish(&stored);
        Ok(stored.len())
    }

    fn publish(&self, notices: &[Notice]) {
        if let Some(newest) = notices.iter().map(|notice| notice.id).max() {
            self.newest_notice.send_replace(newest);
        }
    }

    /// Finds devices that became missing by `now`, records them, and
    /// returns when the next one would.
    ///
    /// # Errors
    /// On a store failure; the devices are checked again on the next run.
    pub async fn detect_missing(
        &self,
        config: &DevicesConfig,
        now: Timestamp,
    ) -> Result<Option<Timestamp>, StoreError> {
        let book = self.book.load_full();
        let timing = self.timing(config);
        let mut table = self.table.lock().await;
        for attempt in 1..=MAX_WRITE_ATTEMPTS {
            let mut change = Change::default();
            for device in &book.devices {
                let mut status = table.status(&device.id);
                let before = status.clone();
                self.transition(
                    config,
                    &book,
                    &table,
                    device,
                    &mut status,
                    now,
                    timing,
                    &mut change,
                );
                if status != before {
                    change.statuses.push((device.id.clone(), status));
                }
            }
            if change.statuses.is_empty() {
                break;
            }
            let statuses = change.statuses.clone();
            // With Redis, a device that reported meanwhile on another host
            // makes the write conflict, so it is checked again on the new
            // statuses, and one that another detection recorded already
            // is not recorded twice.
            let Some((version, notices)) = self.commit(table.version, change, now).await? else {
                if attempt == MAX_WRITE_ATTEMPTS {
                    return Err(StoreError::Conflict { attempts: attempt });
                }
                self.read_table(&mut table).await?;
                continue;
            };
            for (id, status) in statuses {
                table.statuses.insert(id, status);
            }
            table.version = version;
            self.publish(&notices);
            break;
        }
        Ok(book
            .devices
            .iter()
            .filter_map(|device| table.status(&device.id).missing_at(timing))
            .min())
    }

    /// Waits until a subnet webhook is queued.
    pub async fn outbox_queued(&self) {
        self.outbox_queued.notified().await;
    }

    /// Waits until a device reports.
    pub async fn reported(&self) {
        self.reported.notified().await;
    }

    fn party(
        &self,
        config: &DevicesConfig,
        device: &DeviceDefinition,
        status: &DeviceStatus,
        now: Timestamp,
    ) -> Party {
        Party {
            id: Some(device.id.clone()),
            name: device.name.clone(),
            is_unsafe: status.evaluate(now, self.timing(config)).is_unsafe(),
            excluded: self.exclusion(config, device),
        }
    }

    /// Resolves a device id, a reported address or a computer name.
    fn resolve(
        &self,
        config: &DevicesConfig,
        book: &DeviceBook,
        table: &Table,
        text: &str,
        now: Timestamp,
    ) -> Result<Party, LookupError> {
        if let Some(device) = book.get(text) {
            return Ok(self.party(config, device, &table.status(&device.id), now));
        }
        if let Ok(address) = text.parse::<IpAddr>() {
            let address = address.to_canonical();
            let owner = table.owners.get(&address).and_then(|id| book.get(id));
            return Ok(match owner {
                Some(device) => self.party(config, device, &table.status(&device.id), now),
                // No device has reported the address, so nothing is known
                // against it.
                None => Party {
                    id: None,
                    name: address.to_string(),
                    is_unsafe: false,
                    excluded: None,
                },
            });
        }
        if let Some(device) = book.find(text) {
            return Ok(self.party(config, device, &table.status(&device.id), now));
        }
        Err(LookupError::NotFound(format!(
            "{text:?} is neither a device id, a computer name in the devices file nor an IP address"
        )))
    }

    /// Returns the id of the device `text` names: an id, a computer name, or
    /// an address the device reported last.
    pub async fn device_named(&self, text: &str) -> Option<String> {
        let book = self.book.load_full();
        if let Some(device) = book.find(text) {
            return Some(device.id.clone());
        }
        let address = text.parse::<IpAddr>().ok()?.to_canonical();
        self.table.lock().await.owners.get(&address).cloned()
    }

    /// Decides whether `source` may connect to `destination` (each a device
    /// id, name or address) and records each refusal on the device that
    /// refused. `attempts` is the number of refused connections an agent
    /// folds into one report, recorded with each refusal when given.
    ///
    /// # Errors
    /// [`LookupError::NotFound`] for an unknown id or name, or a store
    /// failure while recording the refusal.
    pub async fn access(
        &self,
        config: &DevicesConfig,
        source: &str,
        destination: &str,
        attempts: Option<u64>,
        now: Timestamp,
    ) -> Result<AccessOutcome, LookupError> {
        let book = self.book.load_full();
        let (source, destination) = {
            let table = self.table.lock().await;
            (
                self.resolve(config, &book, &table, source, now)?,
                self.resolve(config, &book, &table, destination, now)?,
            )
        };
        let decision = access::decide(&source, &destination, self.reject_unsafe(config));
        if let access::Access::Refused { refusals } = &decision {
            let mut events = Vec::new();
            for refusal in refusals {
                let mut details = Map::new();
                details.insert("text".into(), refusal.text.clone().into());
                details.insert("side".into(), refusal.side.as_str().into());
                details.insert("source".into(), party_json(&source));
                details.insert("destination".into(), party_json(&destination));
                if let Some(attempts) = attempts {
                    details.insert("attempts".into(), attempts.into());
                }
                tracing::info!(device = refusal.device.as_deref().unwrap_or("-"),
                    source = %source.name, destination = %destination.name, text = %refusal.text,
                    "access refused");
                events.push(Event::for_device(
                    now,
                    EventKind::AccessRefused,
                    refusal.device.as_deref(),
                    details,
                ));
            }
            self.store.append(events).await?;
        }
        Ok(AccessOutcome {
            source,
            destination,
            decision,
        })
    }

    /// Returns the refusal of an SMTP client whose address belongs to an
    /// unsafe device, and records it, when `relay_gate` and
    /// `reject_unsafe` are both on and the device is not excluded.
    pub async fn relay_gate(
        &self,
        config: &DevicesConfig,
        client: IpAddr,
        stage: &str,
        now: Timestamp,
    ) -> Option<RelayRefusal> {
        if !(config.relay_gate && self.reject_unsafe(config)) {
            return None;
        }
        let book = self.book.load_full();
        let party = {
            let table = self.table.lock().await;
            let id = table.owners.get(&client.to_canonical())?;
            let device = book.get(id)?;
            self.party(config, device, &table.status(id), now)
        };
        if !party.is_unsafe || party.excluded.is_some() {
            return None;
        }
        let device = party.id.clone().unwrap_or_default();
        let text = access::incoming_refusal_text(&party.name);
        // NOTE: every refusal is its own event, unlike sender_refused,
        // which is folded per minute; a client that reconnects in a loop
        // adds one event per connection.
        tracing::info!(device = %device, address = %client, stage, "relay refused an unsafe device");
        let mut details = Map::new();
        details.insert("name".into(), party.name.clone().into());
        details.insert("client".into(), client.to_string().into());
        details.insert("stage".into(), stage.into());
        details.insert("text".into(), text.clone().into());
        let event = Event::for_device(now, EventKind::RelayRefused, Some(&device), details);
        if let Err(error) = self.store.append(vec![event]).await {
            tracing::error!(%error, device = %device, "cannot record the relay_refused event");
        }
        Some(RelayRefusal {
            device,
            name: party.name,
            text,
        })
    }

    fn view_of(
        &self,
        config: &DevicesConfig,
        device: &DeviceDefinition,
        status: &DeviceStatus,
        now: Timestamp,
    ) -> Value {
        let timing = self.timing(config);
        let state = status.evaluate(now, timing);
        let mut shown = status.clone();
        shown.state = state;
        let mut view = json!({
            "id": device.id,
            "name": device.name,
            "role": device.role.as_str(),
            "owner": device.owner,
            "subnets": Self::subnets(config, device, status).iter().map(ToString::to_string).collect::<Vec<_>>(),
            "addresses": status.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "state": state.as_str(),
            "health": status.health,
            "health_reason": status.health_reason,
            "unsafe": state.is_unsafe(),
            "unsafe_reason": shown.unsafe_reason(timing),
            "last_heartbeat": status.last_report.map(Timestamp::to_rfc3339),
            "missing_at": status.missing_at(timing).map(Timestamp::to_rfc3339),
            "state_since": status.changed.map(Timestamp::to_rfc3339),
        });
        if let Value::Object(fields) = &mut view {
            fields.extend(self.exclusion_fields(config, device));
        }
        view
    }

    /// Returns one device's view, or `None` for an id not in the devices
    /// file.
    pub async fn view(&self, config: &DevicesConfig, id: &str, now: Timestamp) -> Option<Value> {
        let book = self.book.load_full();
        let device = book.get(id)?;
        let status = self.table.lock().await.status(id);
        Some(self.view_of(config, device, &status, now))
    }

    /// Returns every device's view, in devices-file order.
    pub async fn list(&self, config: &DevicesConfig, now: Timestamp) -> Vec<Value> {
        let book = self.book.load_full();
        let table = self.table.lock().await;
        book.devices
            .iter()
            .map(|device| self.view_of(config, device, &table.status(&device.id), now))
            .collect()
    }

    /// Returns the subnets of device `id` and the unsafe devices on them.
    ///
    /// # Errors
    /// [`LookupError::NotFound`] for an id not in the devices file.
    pub async fn subnet_view(
        &self,
        config: &DevicesConfig,
        id: &str,
        now: Timestamp,
    ) -> Result<Value, LookupError> {
        let book = self.book.load_full();
        let device = book.get(id).ok_or_else(|| unknown_device(id))?;
        let table = self.table.lock().await;
        let subnets = Self::subnets(config, device, &table.status(id));
        let timing = self.timing(config);
        let unsafe_devices: Vec<Value> = book
            .devices
            .iter()
            .filter(|other| other.id != id)
            .filter(|other| {
                let status = table.status(&other.id);
                status.evaluate(now, timing).is_unsafe()
                    && Self::subnets(config, other, &status)
                        .iter()
                        .any(|subnet| subnets.contains(subnet))
            })
            .map(|other| self.view_of(config, other, &table.status(&other.id), now))
            .collect();
        // Every other device on the subnets, so an agent can name the
        // peers it refuses and keep excluded servers reachable.
        let peers: Vec<Value> = book
            .devices
            .iter()
            .filter(|other| other.id != id)
            .filter(|other| {
                Self::subnets(config, other, &table.status(&other.id))
                    .iter()
                    .any(|subnet| subnets.contains(subnet))
            })
            .map(|other| {
                let status = table.status(&other.id);
                let state = status.evaluate(now, timing);
                json!({
                    "id": other.id,
                    "name": other.name,
                    "role": other.role.as_str(),
                    "addresses": status.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "state": state.as_str(),
                    "unsafe": state.is_unsafe(),
                    "excluded": self.exclusion(config, other).is_some(),
                })
            })
            .collect();
        let own = table.status(id).evaluate(now, timing);
        Ok(json!({
            "device": id,
            "subnets": subnets.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "unsafe": unsafe_devices,
            "peers": peers,
            "self": {
                "state": own.as_str(),
                "unsafe": own.is_unsafe(),
                "excluded": self.exclusion(config, device).is_some(),
            },
            "reject_unsafe": self.reject_unsafe(config),
        }))
    }

    /// Returns a receiver that changes whenever a notice is stored.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.newest_notice.subscribe()
    }

    /// Returns the id of the newest notice.
    pub fn newest_notice(&self) -> i64 {
        *self.newest_notice.borrow()
    }

    /// Returns the notices after `after` for device `id`: those about other
    /// devices on its current subnets. The second value is the id to
    /// continue after, past notices for other subnets.
    ///
    /// # Errors
    /// [`LookupError::NotFound`] for an id not in the devices file, or a
    /// store failure.
    pub async fn notices_for(
        &self,
        config: &DevicesConfig,
        id: &str,
        after: i64,
    ) -> Result<(Vec<Notice>, i64), LookupError> {
        let book = self.book.load_full();
        let device = book.get(id).ok_or_else(|| unknown_device(id))?;
        let subnets: Vec<String> = {
            let table = self.table.lock().await;
            Self::subnets(config, device, &table.status(id))
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        let read = self
            .store
            .call(move |connection| device_store::notices_after(connection, after, NOTICE_BATCH))
            .await?;
        let cursor = read.last().map_or(after, |notice| notice.id);
        let own = device_target(id);
        let notices = read
            .into_iter()
            .filter(|notice| {
                notice.subnet == own || (notice.device != id && subnets.contains(&notice.subnet))
            })
            .collect();
        Ok((notices, cursor))
    }

    /// Stores a `scan_requested` notice on the event stream of each device
    /// in `devices` that is in the devices file, so its agent scans, and
    /// returns the ids it was stored for. The notice stays in the stream's
    /// resume buffer like subnet notices, so an agent that reconnects with
    /// its last event id still receives it.
    ///
    /// # Errors
    /// On a store failure; no notice is stored then.
    pub async fn request_scans(
        &self,
        devices: &[String],
        details: &Value,
        now: Timestamp,
    ) -> Result<Vec<String>, StoreError> {
        let book = self.book.load_full();
        let mut notices = Vec::new();
        let mut requested = Vec::new();
        for id in devices {
            let Some(device) = book.get(id) else {
                tracing::info!(device = %id,
                    "scan not sent to an agent: the device is not in the devices file");
                continue;
            };
            let mut body = json!({
                "type": "scan_requested",
                "time": now.to_rfc3339(),
                "device": device.id,
                "name": device.name,
            });
            if let (Value::Object(map), Value::Object(extra)) = (&mut body, details) {
                for (key, value) in extra {
                    map.entry(key.clone()).or_insert_with(|| value.clone());
                }
            }
            notices.push(Notice {
                id: 0,
                time: now,
                subnet: device_target(&device.id),
                device: device.id.clone(),
                body,
            });
            requested.push(device.id.clone());
        }
        if notices.is_empty() {
            return Ok(requested);
        }
        let sent = notices.clone();
        let stored = self
            .store
            .call(move |connection| device_store::add_notices(connection, notices))
            .await?;
        if let Some(shared) = self.store.shared() {
            // The agent may follow its stream on another host.
            shared.announce_notices(&sent).await;
        }
        self.publish(&stored);
        tracing::info!(devices = ?requested, "scan requested from the devices' agents");
        Ok(requested)
    }

    /// Returns the exclusions added and lifted through the API.
    ///
    /// # Errors
    /// On a store failure.
    pub async fn exclusion_overrides(&self) -> Result<Vec<ExclusionRow>, StoreError> {
        self.store.device_exclusions().await
    }

    /// Returns the exclusion added or lifted through the API for device
    /// `id`, as last loaded.
    pub fn exclusion_override(&self, id: &str) -> Option<ExclusionRow> {
        self.exclusion_overrides.load().rows.get(id).cloned()
    }

    /// Excludes device `id` and records who did it and why; returns false
    /// when it was already excluded through the API.
    ///
    /// # Errors
    /// [`LookupError::NotFound`] for an id not in the devices file, or a
    /// store failure.
    pub async fn add_exclusion(
        &self,
        id: &str,
        reason: &str,
        author: &str,
        now: Timestamp,
    ) -> Result<bool, LookupError> {
        // The configured exclusions take an id or a name; so does this.
        let book = self.book.load_full();
        let Some(device) = book.find(id) else {
            return Err(unknown_device(id));
        };
        let id = device.id.as_str();
        let row = ExclusionRow {
            device: id.to_string(),
            reason: reason.to_string(),
            author: author.to_string(),
            created: now,
            excluded: true,
        };
        let mut details = Map::new();
        details.insert("reason".into(), reason.into());
        details.insert("by".into(), author.into());
        let event = Event::for_device(now, EventKind::DeviceExclusionAdded, Some(id), details);
        let added = self.store.add_device_exclusion(row, event).await?;
        self.load_exclusions().await?;
        tracing::info!(device = %id, author, reason, added, "device exclusion added");
        Ok(added)
    }

    /// Lifts the exclusion that `devices.exclusions` or the device's role
    /// gives device `id` (an id or a name), and records who did it and
    /// why. The lift stays in force over reloads and restarts until
    /// [`Registry::remove_exclusion`] removes it.
    ///
    /// # Errors
    /// [`LookupError::NotFound`] for a device not in the devices file, or a
    /// store failure.
    pub async fn lift_exclusion(
        &self,
        config: &DevicesConfig,
        id: &str,
        reason: &str,
        author: &str,
        now: Timestamp,
    ) -> Result<Lift, LookupError> {
        let book = self.book.load_full();
        let Some(device) = book.find(id) else {
            return Err(unknown_device(id));
        };
        let id = device.id.as_str();
        let Some(from_file) =
            self.with_exclusion_rules(config, |rules| access::file_exclusion(device, rules))
        else {
            tracing::info!(device = %id, author,
                "device exclusion not lifted because the configuration file does not exclude it");
            return Ok(Lift::NotExcludedByFile);
        };

        let row = ExclusionRow {
            device: id.to_string(),
            reason: reason.to_string(),
            author: author.to_string(),
            created: now,
            excluded: false,
        };
        let mut details = Map::new();
        details.insert("reason".into(), reason.into());
        details.insert("by".into(), author.into());
        details.insert("source".into(), from_file.source.as_str().into());
        details.insert("file_reason".into(), from_file.reason.clone().into());
        let event = Event::for_device(now, EventKind::DeviceExclusionLifted, Some(id), details);

        let stored = self.store.add_device_exclusion(row, event).await?;
        self.load_exclusions().await?;
        if !stored {
            tracing::info!(device = %id, author,
                "device exclusion not lifted because the device already has an override");
            return Ok(Lift::AlreadyOverridden);
        }
        tracing::warn!(device = %id, author, reason, source = from_file.source.as_str(),
            "device exclusion lifted through the API");
        Ok(Lift::Lifted)
    }

    /// Removes the exclusion added or lifted through the API for device
    /// `id`, so the configuration file decides again, and records who
    /// removed it. Returns the removed row, or `None` when there was none.
    ///
    /// # Errors
    /// On a store failure.
    pub async fn remove_exclusion(
        &self,
        id: &str,
        by: &str,
        now: Timestamp,
    ) -> Result<Option<ExclusionRow>, StoreError> {
        let device = id.to_string();
        let by_text = by.to_string();
        let event_for = move |row: &ExclusionRow| {
            let kind = if row.excluded {
                EventKind::DeviceExclusionRemoved
            } else {
                EventKind::DeviceExclusionRestored
            };
            let mut details = Map::new();
            details.insert("by".into(), by_text.into());
            Event::for_device(now, kind, Some(&device), details)
        };
        let removed = self
            .store
            .remove_device_exclusion(id.to_string(), event_for)
            .await?;
        self.load_exclusions().await?;
        let lift = removed.as_ref().is_some_and(|row| !row.excluded);
        tracing::info!(device = %id, by, removed = removed.is_some(), lift,
            "device exclusion override removed");
        Ok(removed)
    }

    async fn load_exclusions(&self) -> Result<(), StoreError> {
        let rows = self.exclusion_overrides().await?;
        self.exclusion_overrides
            .store(Arc::new(ExclusionOverrides::from_rows(rows)));
        Ok(())
    }

    /// Deletes notices older than `before`.
    ///
    /// # Errors
    /// On a store failure.
    pub async fn prune_notices(&self, before: Timestamp) -> Result<usize, StoreError> {
        self.store
            .call(move |connection| device_store::delete_notices_before(connection, before))
            .await
    }
}

/// Returns the `subnet` value of a notice meant for one device's stream
/// only.
fn device_target(id: &str) -> String {
    format!("device:{id}")
}

fn unknown_device(id: &str) -> LookupError {
    LookupError::NotFound(format!(
        "device {id:?} is not in the devices file (devices.file); add a [[device]] entry and reload"
    ))
}

fn party_json(party: &Party) -> Value {
    json!({ "id": party.id, "name": party.name })
}

fn subnet_webhook(
    notice: &Value,
    peers: Vec<Value>,
    device: &DeviceDefinition,
    now: Timestamp,
) -> OutboxEntry {
    let delivery_id = new_delivery_id();
    let mut body = notice.clone();
    if let Value::Object(map) = &mut body {
        map.insert("type".into(), "subnet_notice".into());
        map.insert("delivery_id".into(), delivery_id.clone().into());
        map.insert("notice".into(), notice["type"].clone());
        map.insert("owner".into(), device.owner.clone().into());
        map.insert("notify".into(), peers.into());
    }
    OutboxEntry {
        delivery_id,
        kind: ActionKind::SubnetNotice,
        mailbox: None,
        key_client: None,
        body: body.to_string(),
        created: now,
    }
}

/// Records devices that become missing when they do, and deletes notices
/// older than `events.keep` hourly, until `shutdown` fires. With Redis,
/// only the host holding the device lease records missing devices and
/// moves on device work that other hosts left pending, and every host
/// renews the shared start time.
pub async fn run_device_timer(guard: Arc<Guard>, mut shutdown: watch::Receiver<bool>) {
    const RETRY: Duration = Duration::from_secs(5);
    const IDLE: Duration = Duration::from_secs(3600);
    let mut next_prune = Timestamp::now();
    let mut holding = false;
    loop {
        let now = guard.store().now();
        let runtime = guard.runtime();
        if now >= next_prune {
            let before = now.saturating_sub(runtime.config.events.keep);
            match guard.devices().prune_notices(before).await {
                Ok(deleted) if deleted > 0 => tracing::info!(deleted, "old subnet notices deleted"),
                Ok(_) => {}
                Err(error) => tracing::error!(%error, "cannot delete old subnet notices"),
            }
            next_prune = now.saturating_add(IDLE);
        }
        let turn = match guard.store().shared() {
            None => {
                guard
                    .devices()
                    .detect_missing(&runtime.config.devices, now)
                    .await
            }
            Some(shared) => {
                shared_device_turn(&guard, shared, &runtime.config.devices, now, &mut holding).await
            }
        };
        let wait = match turn {
            Ok(Some(next)) => next.since(guard.store().now()).min(IDLE),
            Ok(None) => IDLE,
            Err(error) => {
                tracing::error!(%error, "cannot record missing devices; retrying");
                RETRY
            }
        };
        // With Redis, this host renews the shared start and may take the
        // lease over, so it looks again within a third of the lease.
        let wait = match guard.store().shared() {
            Some(_) => wait.min(DEVICE_LEASE / 3),
            None => wait,
        };
        drop(runtime);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = guard.devices().reported() => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Renews the shared start, and on the device lease holder moves pending
/// device work on and records missing devices. Returns when the next
/// device would become missing, as [`Registry::detect_missing`] does.
async fn shared_device_turn(
    guard: &Guard,
    shared: &crate::store::redis::RedisStore,
    config: &DevicesConfig,
    now: Timestamp,
    holding: &mut bool,
) -> Result<Option<Timestamp>, StoreError> {
    let devices = guard.devices();
    devices.renew_shared_start(now).await?;
    let held = shared.hold_lease("devices", DEVICE_LEASE).await?;
    if held != *holding {
        tracing::info!(
            host = shared.host(),
            held,
            "device timer lease changed hands"
        );
        *holding = held;
    }
    if !held {
        return Ok(None);
    }
    let notices = devices.move_shared_work().await;
    devices.publish(&notices);
    devices.detect_missing(config, now).await
}
