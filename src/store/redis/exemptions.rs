//! Exemptions shared by every host through Redis: one hash of exemptions
//! by id, with an id counter, under one hash tag. Each change is announced
//! on the changes channel, so every host reloads the exemptions in force.

use super::{RedisStore, StoredEvent};
use crate::events::{Event, EventKind};
use crate::policy::{Exemption, Timestamp};
use crate::store::StoreError;
use crate::store::exemptions::{ListedExemption, NewExemption};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

/// How long the marker that records an exemption's expiry once stays.
const EXPIRY_MARKER_TTL: std::time::Duration = std::time::Duration::from_secs(400 * 86_400);

/// An exemption as stored in Redis.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredExemption {
    exemption: Exemption,
    removed: Option<(Timestamp, String)>,
}

impl RedisStore {
    fn exemption_key(&self, name: &str) -> String {
        format!("{}exemptions:{{exemptions}}:{name}", self.prefix)
    }

    async fn stored_exemptions(&self) -> Result<Vec<StoredExemption>, StoreError> {
        let mut stored: Vec<StoredExemption> =
            self.hash_values(self.exemption_key("items")).await?;
        stored.sort_by_key(|item| item.exemption.id);
        Ok(stored)
    }

    async fn save_exemption(&self, stored: &StoredExemption) -> Result<(), StoreError> {
        let _: () = self
            .connection()
            .hset(
                self.exemption_key("items"),
                stored.exemption.id,
                serde_json::to_string(stored)?,
            )
            .await?;
        Ok(())
    }

    async fn announce_exemptions(&self) {
        let message = serde_json::json!({ "host": self.host, "exemptions": true });
        if let Err(error) = self.announce(message).await {
            tracing::warn!(%error, "cannot announce an exemption change to the other hosts");
        }
    }

    /// Adds an exemption with the next id and records `exemption_added`.
    ///
    /// # Errors
    /// When Redis cannot be reached.
    pub async fn add_exemption(&self, new: NewExemption) -> Result<Exemption, StoreError> {
        let id: i64 = self
            .connection()
            .incr(self.exemption_key("next_id"), 1)
            .await?;
        let exemption = Exemption {
            id,
            kind: new.kind,
            reason: new.reason,
            author: new.author.clone(),
            created: new.created,
            expires: new.expires,
        };
        self.save_exemption(&StoredExemption {
            exemption: exemption.clone(),
            removed: None,
        })
        .await?;
        let event = Event::exemption(
            new.created,
            EventKind::ExemptionAdded,
            &exemption,
            Some(&new.author),
        );
        self.add_to_stream(&mut self.connection(), &StoredEvent::from_event(&event))
            .await?;
        self.announce_exemptions().await;
        Ok(exemption)
    }

    /// Removes an exemption in force at `now`, recording
    /// `exemption_removed`; returns `None` when no such exemption is in
    /// force.
    ///
    /// # Errors
    /// When Redis cannot be reached or an exemption does not decode.
    pub async fn remove_exemption(
        &self,
        id: i64,
        by: &str,
        now: Timestamp,
    ) -> Result<Option<Exemption>, StoreError> {
        let value: Option<String> = self
            .connection()
            .hget(self.exemption_key("items"), id)
            .await?;
        let Some(value) = value else {
            return Ok(None);
        };
        let mut stored: StoredExemption = serde_json::from_str(&value)?;
        if stored.removed.is_some() || stored.exemption.expires <= now {
            return Ok(None);
        }
        stored.removed = Some((now, by.to_string()));
        self.save_exemption(&stored).await?;
        let event = Event::exemption(
            now,
            EventKind::ExemptionRemoved,
            &stored.exemption,
            Some(by),
        );
        self.add_to_stream(&mut self.connection(), &StoredEvent::from_event(&event))
            .await?;
        self.announce_exemptions().await;
        Ok(Some(stored.exemption))
    }

    /// Returns the exemptions in force at `now`.
    ///
    /// # Errors
    /// When Redis cannot be reached or an exemption does not decode.
    pub async fn active_exemptions(&self, now: Timestamp) -> Result<Vec<Exemption>, StoreError> {
        Ok(self
            .stored_exemptions()
            .await?
            .into_iter()
            .filter(|stored| stored.removed.is_none() && stored.exemption.expires > now)
            .map(|stored| stored.exemption)
            .collect())
    }

    /// Returns every exemption ever added, the newest first.
    ///
    /// # Errors
    /// When Redis cannot be reached or an exemption does not decode.
    pub async fn all_exemptions(&self) -> Result<Vec<ListedExemption>, StoreError> {
        let mut listed: Vec<ListedExemption> = self
            .stored_exemptions()
            .await?
            .into_iter()
            .map(|stored| ListedExemption {
                exemption: stored.exemption,
                removed: stored.removed,
            })
            .collect();
        listed.reverse();
        Ok(listed)
    }

    /// Records `exemption_expired` once, across all hosts, for every
    /// exemption that ended by `now` without being removed; returns how
    /// many this host recorded.
    ///
    /// # Errors
    /// When Redis cannot be reached or an exemption does not decode.
    pub async fn record_exemption_expiries(&self, now: Timestamp) -> Result<usize, StoreError> {
        let mut recorded = 0;
        for stored in self.stored_exemptions().await? {
            if stored.removed.is_some() || stored.exemption.expires > now {
                continue;
            }
            let marker = self.exemption_key(&format!("expired:{}", stored.exemption.id));
            let first: Option<String> = redis::cmd("SET")
                .arg(&marker)
                .arg(&self.host)
                .arg("NX")
                .arg("PX")
                .arg(super::duration_millis(EXPIRY_MARKER_TTL))
                .query_async(&mut self.connection())
                .await?;
            if first.is_none() {
                continue;
            }
            let exemption = &stored.exemption;
            let event = Event::exemption(
                exemption.expires,
                EventKind::ExemptionExpired,
                exemption,
                None,
            );
            self.add_to_stream(&mut self.connection(), &StoredEvent::from_event(&event))
                .await?;
            recorded += 1;
        }
        if recorded > 0 {
            self.announce_exemptions().await;
        }
        Ok(recorded)
    }
}
