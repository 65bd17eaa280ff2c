//! Device health, settings and exclusions, shared by every host through
//! Redis.
//!
//! The statuses of all devices form one table with one version: a host
//! reads the table, runs the device rules of `heartbeat::health` and writes
//! the statuses it changed with `write_devices.lua`, which only compares
//! the version and writes. The same script puts the change's events,
//! subnet webhooks and subnet notices into the pending hash. They are
//! moved on from there once each (a marker per piece of work), so a crash
//! between the write and the move loses none and repeats none.

use super::{PendingWork, RedisStore, StoredDelivery, StoredEvent, duration_millis};
use crate::actions::OutboxEntry;
use crate::events::Event;
use crate::heartbeat::DeviceStatus;
use crate::policy::Timestamp;
use crate::store::StoreError;
use crate::store::devices::{ExclusionRow, Notice, SettingRow};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Work written with device statuses and not yet moved on.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DeviceWork {
    created: Timestamp,
    work: PendingWork,
    /// Subnet notices without their id, which each host assigns.
    notices: Vec<Notice>,
}

/// The device table as read: its version and every device's status.
#[derive(Debug, Clone, Default)]
pub struct DeviceTable {
    pub version: i64,
    pub statuses: Vec<(String, DeviceStatus)>,
}

impl RedisStore {
    fn devices_key(&self, name: &str) -> String {
        format!("{}devices:{{devices}}:{name}", self.prefix)
    }

    /// Reads every device's status with the table's version.
    ///
    /// # Errors
    /// When Redis cannot be reached or a status does not decode.
    pub async fn device_table(&self) -> Result<DeviceTable, StoreError> {
        let reply: Vec<String> = self
            .read_devices
            .key(self.devices_key("version"))
            .key(self.devices_key("statuses"))
            .invoke_async(&mut self.connection())
            .await?;
        let mut values = reply.into_iter();
        let version = values
            .next()
            .unwrap_or_default()
            .parse::<i64>()
            .map_err(|_| StoreError::Corrupt("invalid device table version".to_string()))?;
        let mut statuses = Vec::new();
        while let (Some(id), Some(status)) = (values.next(), values.next()) {
            statuses.push((id, serde_json::from_str(&status)?));
        }
        Ok(DeviceTable { version, statuses })
    }

    /// Writes `statuses` with their events, deliveries and notices if the
    /// device table still has `version`, and returns the new version. On a
    /// conflict it writes nothing and returns `None`. A write is announced
    /// to the other hosts, and the caller moves its work on with
    /// [`RedisStore::move_device_work`].
    ///
    /// # Errors
    /// When Redis cannot be reached; the write may or may not have landed
    /// then, as with any lost reply.
    pub async fn write_devices(
        &self,
        version: i64,
        statuses: &[(String, DeviceStatus)],
        events: &[Event],
        deliveries: &[OutboxEntry],
        notices: &[Notice],
    ) -> Result<Option<i64>, StoreError> {
        let mut invocation = self.write_devices.prepare_invoke();
        invocation
            .key(self.devices_key("version"))
            .key(self.devices_key("statuses"))
            .key(self.devices_key("pending"))
            .arg(version);
        if events.is_empty() && deliveries.is_empty() && notices.is_empty() {
            invocation.arg("").arg("");
        } else {
            let id = format!("{:032x}", rand::random::<u128>());
            let work = DeviceWork {
                created: self.now(),
                work: PendingWork {
                    id: id.clone(),
                    events: events.iter().map(StoredEvent::from_event).collect(),
                    deliveries: deliveries.iter().map(StoredDelivery::from_entry).collect(),
                },
                notices: notices.to_vec(),
            };
            invocation.arg(id).arg(serde_json::to_string(&work)?);
        }
        for (id, status) in statuses {
            invocation.arg(id).arg(serde_json::to_string(status)?);
        }
        let written: i64 = invocation.invoke_async(&mut self.connection()).await?;
        if written < 0 {
            return Ok(None);
        }
        let message = serde_json::json!({ "host": self.host, "device_statuses": true });
        if let Err(error) = self.announce(message).await {
            // The other hosts keep their copy until their next write
            // conflicts or their subscription is made again.
            tracing::warn!(%error, version = written,
                "cannot announce a device status change to the other hosts");
        }
        Ok(Some(written))
    }

    /// Moves every piece of pending device work on: events to the stream
    /// and deliveries to the shared outbox, each once. Returns how many
    /// deliveries were queued and the notices that no host has taken yet,
    /// which the caller stores and sends to the other hosts.
    ///
    /// # Errors
    /// When Redis cannot be reached or the work does not decode; what was
    /// not moved stays pending for the next call.
    pub async fn move_device_work(&self) -> Result<(usize, Vec<Notice>), StoreError> {
        let pending: Vec<(String, String)> = self
            .connection()
            .hgetall(self.devices_key("pending"))
            .await?;
        let mut queued = 0;
        let mut notices = Vec::new();
        for (id, text) in pending {
            let work: DeviceWork = serde_json::from_str(&text)?;
            queued += self.move_work(&work.work).await?;
            if !work.notices.is_empty() {
                // NOTE: the marker is set before the caller stores and
                // sends the notices, so a crash in between loses them.
                let marker = self.key(&format!("moved:{id}:notices"));
                let first: Option<String> = redis::cmd("SET")
                    .arg(&marker)
                    .arg(&self.host)
                    .arg("NX")
                    .arg("PX")
                    .arg(duration_millis(super::MOVED_TTL))
                    .query_async(&mut self.connection())
                    .await?;
                if first.is_some() {
                    notices.extend(work.notices);
                }
            }
            let _: i64 = self
                .connection()
                .hdel(self.devices_key("pending"), &id)
                .await?;
        }
        Ok((queued, notices))
    }

    /// Renews and returns the time since which some host has been running
    /// on this store with no gap longer than `lifetime`. When every host
    /// had stopped (or lost Redis) for longer, it sets that time to `now`.
    ///
    /// # Errors
    /// When Redis cannot be reached.
    pub async fn device_up_since(
        &self,
        now: Timestamp,
        lifetime: Duration,
    ) -> Result<Timestamp, StoreError> {
        let since: i64 = self
            .up_since
            .key(self.devices_key("up_since"))
            .arg(now.millis())
            .arg(duration_millis(lifetime))
            .invoke_async(&mut self.connection())
            .await?;
        Ok(Timestamp(since))
    }

    async fn announce_devices(&self) {
        let message = serde_json::json!({ "host": self.host, "devices": true });
        if let Err(error) = self.announce(message).await {
            tracing::warn!(%error, "cannot announce a device setting change to the other hosts");
        }
    }

    async fn record(&self, event: &Event) -> Result<(), StoreError> {
        self.add_to_stream(&mut self.connection(), &StoredEvent::from_event(event))
            .await
    }

    /// Sends subnet notices to the other hosts, so agents connected to any
    /// host receive them. A notice sent while a host's subscription is down
    /// does not reach that host.
    pub async fn announce_notices(&self, notices: &[Notice]) {
        let message = serde_json::json!({ "host": self.host, "notices": notices });
        if let Err(error) = self.announce(message).await {
            tracing::warn!(%error, notices = notices.len(),
                "cannot send subnet notices to the other hosts; their agents miss them");
        }
    }

    /// Returns the settings changed through the API.
    ///
    /// # Errors
    /// When Redis cannot be reached or a setting does not decode.
    pub async fn device_settings(&self) -> Result<Vec<SettingRow>, StoreError> {
        let mut rows: Vec<SettingRow> = self.hash_values(self.devices_key("settings")).await?;
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(rows)
    }

    /// Stores a setting, or removes it when `row.value` is null, and
    /// records `event`.
    ///
    /// # Errors
    /// When Redis cannot be reached.
    pub async fn save_device_setting(
        &self,
        row: &SettingRow,
        event: &Event,
    ) -> Result<(), StoreError> {
        let mut connection = self.connection();
        if row.value.is_null() {
            let _: () = connection
                .hdel(self.devices_key("settings"), &row.name)
                .await?;
        } else {
            let _: () = connection
                .hset(
                    self.devices_key("settings"),
                    &row.name,
                    serde_json::to_string(row)?,
                )
                .await?;
        }
        self.record(event).await?;
        self.announce_devices().await;
        Ok(())
    }

    /// Returns the exclusions added and lifted through the API.
    ///
    /// # Errors
    /// When Redis cannot be reached or an exclusion does not decode.
    pub async fn device_exclusions(&self) -> Result<Vec<ExclusionRow>, StoreError> {
        let mut rows: Vec<ExclusionRow> = self.hash_values(self.devices_key("exclusions")).await?;
        rows.sort_by(|a, b| a.device.cmp(&b.device));
        Ok(rows)
    }

    /// Stores an added or lifted exclusion and records `event`; returns
    /// false, writing nothing, when the device already has one.
    ///
    /// # Errors
    /// When Redis cannot be reached.
    pub async fn add_device_exclusion(
        &self,
        row: &ExclusionRow,
        event: &Event,
    ) -> Result<bool, StoreError> {
        let added: bool = self
            .connection()
            .hset_nx(
                self.devices_key("exclusions"),
                &row.device,
                serde_json::to_string(row)?,
            )
            .await?;
        if added {
            self.record(event).await?;
            self.announce_devices().await;
        }
        Ok(added)
    }

    /// Removes an added or lifted exclusion and records the event that
    /// `event_for` builds from the removed row. Returns that row, or `None`
    /// when the device had neither.
    ///
    /// # Errors
    /// When Redis cannot be reached or the exclusion does not decode.
    pub async fn remove_device_exclusion(
        &self,
        device: &str,
        event_for: impl FnOnce(&ExclusionRow) -> Event,
    ) -> Result<Option<ExclusionRow>, StoreError> {
        let mut connection = self.connection();
        let value: Option<String> = connection
            .hget(self.devices_key("exclusions"), device)
            .await?;
        let Some(value) = value else {
            return Ok(None);
        };
        let removed: i64 = connection
            .hdel(self.devices_key("exclusions"), device)
            .await?;
        if removed == 0 {
            // Another host removed it between the two commands.
            return Ok(None);
        }
        let row: ExclusionRow = serde_json::from_str(&value)?;
        self.record(&event_for(&row)).await?;
        self.announce_devices().await;
        Ok(Some(row))
    }
}
