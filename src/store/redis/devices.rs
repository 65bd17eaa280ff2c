//! Device settings and exclusions made through the API, shared by every
//! host through Redis. Device health itself stays with each host.

use super::{RedisStore, StoredEvent};
use crate::events::Event;
use crate::store::StoreError;
use crate::store::devices::{ExclusionRow, Notice, SettingRow};
use redis::AsyncCommands;

impl RedisStore {
    fn devices_key(&self, name: &str) -> String {
        format!("{}devices:{{devices}}:{name}", self.prefix)
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

    /// Returns the exclusions made through the API.
    ///
    /// # Errors
    /// When Redis cannot be reached or an exclusion does not decode.
    pub async fn device_exclusions(&self) -> Result<Vec<ExclusionRow>, StoreError> {
        let mut rows: Vec<ExclusionRow> = self.hash_values(self.devices_key("exclusions")).await?;
        rows.sort_by(|a, b| a.device.cmp(&b.device));
        Ok(rows)
    }

    /// Adds an exclusion and records `event`; returns false, writing
    /// nothing, when the device was already excluded.
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

    /// Removes an exclusion and records `event`; returns the removed row,
    /// or `None` when the device had no exclusion.
    ///
    /// # Errors
    /// When Redis cannot be reached or the exclusion does not decode.
    pub async fn remove_device_exclusion(
        &self,
        device: &str,
        event: &Event,
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
        self.record(event).await?;
        self.announce_devices().await;
        Ok(Some(serde_json::from_str(&value)?))
    }
}
