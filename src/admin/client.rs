//! The command line's side of the admin functions: each one either sends
//! its request to a running server's API (`--server`) or works on the store
//! directly, and returns the same JSON as the API.

use super::views::{block_json, exemption_json, exemption_list_json, ledger_json};
use super::{ExemptionRequest, new_exemption, percent_encode as encode};
use crate::config::Unauthenticated;
use crate::events::Event;
use crate::guard::Runtime;
use crate::identity::MailboxKey;
use crate::policy::Timestamp;
use crate::store::{EventFilter, sqlite};
use serde_json::{Value, json};
use std::net::IpAddr;

/// The destination of the command line's requests.
pub enum Target {
    /// The store named in the configuration, opened directly.
    Store,
    /// A running server's admin API at `url`, with a bearer token.
    Server { url: String, token: String },
}

/// The command line's view of one admin function call.
pub struct Client {
    pub runtime: Runtime,
    pub target: Target,
}

impl Client {
    fn connection(&self) -> Result<rusqlite::Connection, String> {
        sqlite::open_existing(&self.runtime.config.store.path).map_err(|error| error.to_string())
    }

    /// Opens the store for mailbox states and events when it is Redis;
    /// `None` with SQLite, which the functions below read directly.
    pub fn shared_store(&self) -> Result<Option<crate::store::Store>, String> {
        let config = &self.runtime.config;
        if config.store.backend != crate::config::Backend::Redis {
            return Ok(None);
        }
        crate::store::Store::from_config(&config.store, config.events.keep)
            .map(Some)
            .map_err(|error| error.to_string())
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Result<reqwest::Response, String> {
        let Target::Server { url, token: admin } = &self.target else {
            return Err("no server given".to_string());
        };
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(
                crate::tls::verifying_client_config(None, "the system trust store")
                    .map_err(|error| format!("cannot set up TLS: {error}"))?,
            )
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .map_err(|error| format!("cannot build the HTTP client: {error}"))?;
        let address = format!("{}{path}", url.trim_end_matches('/'));
        let mut request = client
            .request(method, &address)
            .bearer_auth(token.unwrap_or(admin));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|error| {
            let mut text = format!("request to {address} failed");
            crate::append_causes(&mut text, &error);
            text
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|value| value["error"].as_str().map(str::to_string))
            .unwrap_or(text);
        Err(format!("server answered {status}: {message}"))
    }

    async fn get_json(&self, path: &str) -> Result<Value, String> {
        let response = self.request(reqwest::Method::GET, path, None, None).await?;
        read_json(response).await
    }

    fn mailbox_key(&self, mailbox: &str, client: Option<IpAddr>) -> Result<MailboxKey, String> {
        let config = &self.runtime.config;
        let canonical = crate::identity::mailbox_from_input(
            mailbox,
            &config.identity,
            &self.runtime.directory,
        )?;
        let pairs = config.identity.unauthenticated == Unauthenticated::ClientAndSender;
        match (pairs, client) {
            (false, Some(_)) => Err(
                "--client applies only with [identity] unauthenticated = \"client-and-sender\"; leave it out"
                    .to_string(),
            ),
            (true, None) => Err(format!(
                "{canonical} is counted per client address under unauthenticated = \
                 \"client-and-sender\"; add --client ADDRESS"
            )),
            (_, client) => Ok(MailboxKey {
                mailbox: canonical,
                client,
            }),
        }
    }

    /// Returns the blocks in force, as `GET /api/v1/blocks`.
    ///
    /// # Errors
    /// When the store or server cannot be read.
    pub async fn blocks(&self) -> Result<Value, String> {
        if let Target::Server { .. } = self.target {
            return self.get_json("/api/v1/blocks").await;
        }
        let (now, blocks) = match self.shared_store()? {
            Some(store) => {
                let now = store
                    .shared()
                    .map(|shared| shared.time())
                    .ok_or("the Redis store is not open")?
                    .await
                    .map_err(|error| error.to_string())?;
                let blocks = store
                    .active_blocks(now)
                    .await
                    .map_err(|error| error.to_string())?;
                (now, blocks)
            }
            None => {
                let now = Timestamp::now();
                let blocks = sqlite::active_blocks(&self.connection()?, now)
                    .map_err(|error| error.to_string())?;
                (now, blocks)
            }
        };
        let list: Vec<Value> = blocks
            .iter()
            .filter_map(|(key, state)| state.active_block(now).map(|block| block_json(key, block)))
            .collect();
        Ok(json!({ "blocks": list }))
    }

    /// Returns a mailbox's strike ledger, as `GET /api/v1/mailboxes/M`.
    ///
    /// # Errors
    /// When the mailbox is invalid or the store or server cannot be read.
    pub async fn ledger(&self, mailbox: &str, client: Option<IpAddr>) -> Result<Value, String> {
        if let Target::Server { .. } = self.target {
            let mut path = format!("/api/v1/mailboxes/{}", encode(mailbox));
            if let Some(client) = client {
                path.push_str(&format!("?client={client}"));
            }
            return self.get_json(&path).await;
        }
        let key = self.mailbox_key(mailbox, client)?;
        let now = Timestamp::now();
        let (state, exemptions) = match self.shared_store()? {
            Some(store) => (
                store.load_mailbox(key.clone()).await,
                store.active_exemptions(now).await,
            ),
            None => {
                let connection = self.connection()?;
                (
                    sqlite::load_mailbox(&connection, &key),
                    crate::store::exemptions::active(&connection, now),
                )
            }
        };
        let state = state
            .map_err(|error| error.to_string())?
            .unwrap_or_default();
        let exemptions = exemptions.map_err(|error| error.to_string())?;
        Ok(ledger_json(
            &key,
            &state,
            &self.runtime.settings(),
            &exemptions,
            &self.runtime.directory,
            now,
        ))
    }

    /// Lifts a permanent block or resets a lockout count with the support
    /// token, as `POST /api/v1/mailboxes/M/unblock`.
    ///
    /// # Errors
    /// When the token is not the support token, the policy refuses (a
    /// timed lockout, nothing to lift), or the store or server fails.
    pub async fn unblock(
        &self,
        mailbox: &str,
        client: Option<IpAddr>,
        reason: &str,
        reset_count: bool,
        support_token: &str,
    ) -> Result<Value, String> {
        let credentials = &self.runtime.credentials;
        if !credentials.has_support() {
            return Err(
                "no support credential is configured: set admin.support_token_sha256".to_string(),
            );
        }
        if !credentials.is_support(support_token) {
            return Err(
                "the token given is not the support token (its SHA-256 does not match \
                 admin.support_token_sha256); only support may lift a permanent block or reset a \
                 lockout count"
                    .to_string(),
            );
        }
        if reason.trim().is_empty() {
            return Err("--reason is empty: say why; it is recorded".to_string());
        }
        if let Target::Server { .. } = self.target {
            let path = format!("/api/v1/mailboxes/{}/unblock", encode(mailbox));
            let body = json!({
                "reason": reason,
                "reset_count": reset_count,
                "client": client.map(|client| client.to_string()),
            });
            let response = self
                .request(
                    reqwest::Method::POST,
                    &path,
                    Some(support_token),
                    Some(body),
                )
                .await?;
            return read_json(response).await;
        }
        let key = self.mailbox_key(mailbox, client)?;
        let settings = self.runtime.settings();
        if let Some(store) = self.shared_store()? {
            // The write announces the change, so running servers drop
            // their cached copy at once.
            let (lifted, _) = store
                .update_mailbox(&key, |state, now| match state.lift(now, reset_count) {
                    Ok(lifted) => {
                        let write = crate::store::MailboxWrite {
                            keep: !state.is_empty(&settings, now),
                            events: vec![Event::lifted(
                                now,
                                &key,
                                &lifted,
                                reason.trim(),
                                "command line",
                            )],
                            deliveries: Vec::new(),
                        };
                        (Ok(lifted), Some(write))
                    }
                    Err(refusal) => (Err(refusal), None),
                })
                .await
                .map_err(|error| error.to_string())?;
            let lifted = lifted.map_err(|error| error.to_string())?;
            return Ok(json!({
                "mailbox": key.mailbox,
                "key_client": key.client.map(|client| client.to_string()),
                "permanent_block_lifted": lifted.block.is_some(),
                "lockouts_before": lifted.lockouts_before,
                "lockouts_after": lifted.lockouts_after,
            }));
        }
        let mut connection = self.connection()?;
        let transaction = connection
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|error| error.to_string())?;
        let now = Timestamp::now();
        let mut state = sqlite::load_mailbox(&transaction, &key)
            .map_err(|error| error.to_string())?
            .unwrap_or_default();
        let lifted = state
            .lift(now, reset_count)
            .map_err(|error| error.to_string())?;
        let event = Event::lifted(now, &key, &lifted, reason.trim(), "command line");
        let keep = !state.is_empty(&settings, now);
        sqlite::save_mailbox(&transaction, &key, &state, keep, now)
            .and_then(|()| sqlite::insert_event(&transaction, &event))
            .and_then(|()| crate::store::exemptions::record_mailbox_change(&transaction, &key))
            .map_err(|error| error.to_string())?;
        // NOTE: a running server drops its cached lockout of this mailbox
        // within two seconds, and refuses the sender until then. A strike
        // it records for this mailbox at this very moment, read before this
        // commit, would write the old state back. Use --server while it
        // runs.
        transaction.commit().map_err(|error| error.to_string())?;
        Ok(json!({
            "mailbox": key.mailbox,
            "key_client": key.client.map(|client| client.to_string()),
            "permanent_block_lifted": lifted.block.is_some(),
            "lockouts_before": lifted.lockouts_before,
            "lockouts_after": lifted.lockouts_after,
        }))
    }

    /// Returns every event matching `filter`, following the server's pages.
    ///
    /// # Errors
    /// When the store or server cannot be read.
    pub async fn events(
        &self,
        filter: &EventFilter,
        query: &[(&str, String)],
    ) -> Result<Vec<Value>, String> {
        if let Target::Server { .. } = self.target {
            let mut events = Vec::new();
            let mut after: Option<i64> = None;
            loop {
                let mut pairs: Vec<String> = query
                    .iter()
                    .map(|(name, value)| format!("{name}={}", encode(value)))
                    .collect();
                pairs.push("limit=10000".to_string());
                if let Some(after) = after {
                    pairs.push(format!("after={after}"));
                }
                let path = format!("/api/v1/events?{}", pairs.join("&"));
                let response = self
                    .request(reqwest::Method::GET, &path, None, None)
                    .await?;
                let more = response.headers().contains_key(reqwest::header::LINK);
                let text = response
                    .text()
                    .await
                    .map_err(|error| format!("cannot read the server's answer: {error}"))?;
                for line in text.lines().filter(|line| !line.is_empty()) {
                    let event: Value = serde_json::from_str(line)
                        .map_err(|error| format!("invalid event from the server: {error}"))?;
                    after = event["id"].as_i64().or(after);
                    events.push(event);
                }
                if !more {
                    return Ok(events);
                }
            }
        }
        let events = match self.shared_store()? {
            Some(store) => store.query_events(filter.clone()).await,
            None => sqlite::query_events(&self.connection()?, filter),
        }
        .map_err(|error| error.to_string())?;
        Ok(events.iter().map(Event::to_json).collect())
    }

    /// Lists exemptions, as `GET /api/v1/exemptions`.
    ///
    /// # Errors
    /// When the store or server cannot be read.
    pub async fn exemptions(&self, all: bool) -> Result<Value, String> {
        if let Target::Server { .. } = self.target {
            let path = if all {
                "/api/v1/exemptions?all=true"
            } else {
                "/api/v1/exemptions"
            };
            return self.get_json(path).await;
        }
        let now = Timestamp::now();
        let listed = match self.shared_store()? {
            Some(store) => store.all_exemptions().await,
            None => crate::store::exemptions::all(&self.connection()?),
        }
        .map_err(|error| error.to_string())?;
        Ok(exemption_list_json(&listed, all, now))
    }

    /// Adds an exemption, as `POST /api/v1/exemptions`.
    ///
    /// # Errors
    /// When the request is invalid or the store or server fails.
    pub async fn add_exemption(&self, request: ExemptionRequest) -> Result<Value, String> {
        if let Target::Server { .. } = self.target {
            let body = json!({
                "sender": request.sender,
                "login": request.login,
                "network": request.network,
                "reason": request.reason,
                "author": request.author,
                "expires": request.expires,
                "for": request.duration,
            });
            let response = self
                .request(
                    reqwest::Method::POST,
                    "/api/v1/exemptions",
                    None,
                    Some(body),
                )
                .await?;
            return read_json(response).await;
        }
        let new = new_exemption(&self.runtime, request)?;
        let exemption = match self.shared_store()? {
            Some(store) => store.add_exemption(new).await,
            None => crate::store::exemptions::add(&mut self.connection()?, new),
        }
        .map_err(|error| error.to_string())?;
        Ok(exemption_json(&exemption, Timestamp::now()))
    }

    /// Removes an exemption, as `DELETE /api/v1/exemptions/ID`.
    ///
    /// # Errors
    /// When no such exemption is in force or the store or server fails.
    pub async fn remove_exemption(&self, id: i64, by: &str) -> Result<Value, String> {
        if let Target::Server { .. } = self.target {
            let path = format!("/api/v1/exemptions/{id}?by={}", encode(by));
            let response = self
                .request(reqwest::Method::DELETE, &path, None, None)
                .await?;
            return read_json(response).await;
        }
        let now = Timestamp::now();
        let removed = match self.shared_store()? {
            Some(store) => store.remove_exemption(id, by.to_string(), now).await,
            None => crate::store::exemptions::remove(&mut self.connection()?, id, by, now),
        }
        .map_err(|error| error.to_string())?;
        match removed {
            Some(exemption) => Ok(exemption_json(&exemption, now)),
            None => Err(format!(
                "no exemption {id} is in force; list them with `sendguard exemptions list --all`"
            )),
        }
    }
}

async fn read_json(response: reqwest::Response) -> Result<Value, String> {
    response
        .json()
        .await
        .map_err(|error| format!("invalid JSON from the server: {error}"))
}
