//! Enforcement: keeps the nftables table in line with the server's unsafe
//! list, restores it when it is changed outside the agent, turns counter
//! increases into logged and reported refusals, and fails open when the
//! server stays unreachable.

use super::Agent;
use super::nft::{self, Refusal, Ruleset};
use crate::heartbeat::access::{incoming_refusal_text, outgoing_refusal_text};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The table's intended content, from the last subnet refresh.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub ruleset: Ruleset,
    /// Each peer address with the device's name, for log lines.
    pub names: HashMap<IpAddr, String>,
}

/// `fe80::/10`, the IPv6 link-local addresses.
const IPV6_LINK_LOCAL: ipnet::Ipv6Net =
    match ipnet::Ipv6Net::new(std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10) {
        Ok(net) => net,
        Err(_) => panic!("fe80::/10 is a valid network"),
    };

fn addresses(peer: &Value) -> Vec<IpAddr> {
    peer["addresses"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .filter_map(|text| text.as_str()?.parse().ok())
        .collect()
}

/// Checks that a subnet view has the fields the table is built from, so
/// that a reply of another service is not taken for an empty unsafe list.
///
/// # Errors
/// Names the first missing field.
pub fn check_view(view: &Value) -> Result<(), String> {
    let fields = [
        ("peers", view["peers"].is_array()),
        ("subnets", view["subnets"].is_array()),
        ("self", view["self"].is_object()),
        ("reject_unsafe", view["reject_unsafe"].is_boolean()),
    ];
    for (field, present) in fields {
        if !present {
            return Err(format!(
                "subnet refresh: the reply has no valid {field:?} field; check that server is \
                 sendguard's admin API"
            ));
        }
    }
    Ok(())
}

/// Builds what the table enforces from the server's subnet view.
pub fn desired_from_view(view: &Value) -> Desired {
    let mut desired = Desired::default();
    let peers = view["peers"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    for peer in peers {
        let name = peer["name"]
            .as_str()
            .or(peer["id"].as_str())
            .unwrap_or("-")
            .to_string();
        for address in addresses(peer) {
            desired.names.insert(address, name.clone());
        }
    }
    // An excluded server accepts and reaches every device, whatever the
    // health of either side.
    if view["reject_unsafe"] == false || view["self"]["excluded"] == true {
        return desired;
    }
    let own_unsafe = view["self"]["unsafe"] == true;
    for peer in peers {
        let peer_addresses = addresses(peer);
        if peer["excluded"] == true {
            desired.ruleset.excluded.extend(peer_addresses);
        } else if peer["unsafe"] == true {
            desired.ruleset.unsafe_peers.extend(peer_addresses);
        } else if own_unsafe && matches!(peer["state"].as_str(), Some("green" | "yellow")) {
            desired.ruleset.enforcing.extend(peer_addresses);
        }
    }
    if own_unsafe {
        desired.ruleset.own_subnets = view["subnets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
            .iter()
            .filter_map(|text| text.as_str()?.parse().ok())
            .collect();
        // Devices report no link-local addresses, so no peer can refuse
        // this device on them; its own table refuses them all.
        desired
            .ruleset
            .own_subnets
            .push(ipnet::IpNet::V6(IPV6_LINK_LOCAL));
    }
    for list in [
        &mut desired.ruleset.unsafe_peers,
        &mut desired.ruleset.excluded,
        &mut desired.ruleset.enforcing,
    ] {
        list.sort();
        list.dedup();
    }
    desired
}

/// Returns the local log text of a refusal of the peer named `name`.
pub fn refusal_text(refusal: Refusal, name: &str) -> String {
    match refusal {
        Refusal::FromUnsafe => incoming_refusal_text(name),
        Refusal::ToUnsafe => outgoing_refusal_text(name),
        Refusal::FromPeerWhileUnsafe => {
            format!(
                "Access request from computer {name} denied because this computer may be unsafe"
            )
        }
        Refusal::ToPeerWhileUnsafe => {
            format!("Access to computer {name} denied because this computer may be unsafe")
        }
    }
}

/// Refusals waiting to be reported, at most one report per peer and
/// direction per interval; the ones in between are counted into the next.
#[derive(Debug, Default)]
pub struct ReportLimiter {
    last: HashMap<(Refusal, IpAddr), Instant>,
    pending: BTreeMap<(Refusal, IpAddr), u64>,
}

impl ReportLimiter {
    /// Adds `count` refusals of `key`.
    pub fn add(&mut self, key: (Refusal, IpAddr), count: u64) {
        *self.pending.entry(key).or_insert(0) += count;
    }

    /// Takes the pending counts that may be reported at `now`.
    pub fn due(&mut self, now: Instant, interval: Duration) -> Vec<((Refusal, IpAddr), u64)> {
        let keys: Vec<(Refusal, IpAddr)> = self
            .pending
            .keys()
            .filter(|key| {
                self.last
                    .get(key)
                    .is_none_or(|last| now.duration_since(*last) >= interval)
            })
            .copied()
            .collect();
        keys.into_iter()
            .filter_map(|key| {
                let count = self.pending.remove(&key)?;
                self.last.insert(key, now);
                Some((key, count))
            })
            .collect()
    }
}

/// The enforcer's state between two ticks.
struct Enforcer {
    agent: Arc<Agent>,
    desired: watch::Receiver<Option<Desired>>,
    applied: Option<Desired>,
    digest: Option<String>,
    seen: BTreeMap<(Refusal, IpAddr), u64>,
    limiter: ReportLimiter,
    failed_open: bool,
    /// The last nft failure logged at `error`, so a failure that repeats
    /// every tick is logged once and then at `debug`.
    last_failure: Option<String>,
}

/// Keeps the table until `shutdown` fires, then removes it.
pub async fn run(
    agent: Arc<Agent>,
    desired: watch::Receiver<Option<Desired>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let nft_path = agent.config.enforcement.nft.clone();
    let mut enforcer = Enforcer {
        agent,
        desired,
        applied: None,
        digest: None,
        seen: BTreeMap::new(),
        limiter: ReportLimiter::default(),
        failed_open: false,
        last_failure: None,
    };
    let interval = enforcer.agent.config.enforcement.check_interval;
    loop {
        enforcer.tick().await;
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = enforcer.desired.changed() => {}
            _ = shutdown.changed() => break,
        }
    }
    match nft::apply(&nft_path, &nft::removal_script()).await {
        Ok(()) => tracing::info!(table = nft::TABLE, "agent stopping: nftables table removed"),
        Err(error) => {
            tracing::error!(%error, table = nft::TABLE, "agent stopping: cannot remove the nftables table")
        }
    }
}

impl Enforcer {
    /// Logs a failure of nft at `error` unless it repeats the last one.
    fn failed(&mut self, what: &str, error: &str) {
        let text = format!("{what}: {error}");
        if self.last_failure.as_deref() == Some(text.as_str()) {
            tracing::debug!(%error, table = nft::TABLE, "{what} (repeated)");
        } else {
            tracing::error!(%error, table = nft::TABLE, "{what}; retrying");
            self.last_failure = Some(text);
        }
    }

    async fn tick(&mut self) {
        let config = &self.agent.config.enforcement;
        let silence = self.agent.since_contact();
        if silence > config.keep_unsafe_list {
            if !self.failed_open {
                self.fail_open(silence).await;
            }
            return;
        }
        let desired = self.desired.borrow_and_update().clone();
        let Some(desired) = desired else {
            return;
        };
        if self.failed_open {
            tracing::warn!(
                table = nft::TABLE,
                "server reachable again: the agent's nftables rules are back"
            );
            self.failed_open = false;
        }
        if self.applied.as_ref() != Some(&desired) {
            // The new table starts its counters at zero, so refusals counted
            // since the last read are taken first.
            if self.applied.is_some()
                && let Ok(Some(listing)) = nft::list(&self.agent.config.enforcement.nft).await
            {
                self.record_refusals(&listing);
            }
            self.apply(desired).await;
            self.report_due();
            return;
        }
        self.check().await;
    }

    async fn fail_open(&mut self, silence: Duration) {
        let config = &self.agent.config.enforcement;
        match nft::apply(&config.nft, &nft::removal_script()).await {
            Ok(()) => {
                tracing::error!(table = nft::TABLE, unreachable_for = %humantime::format_duration(Duration::from_secs(silence.as_secs())),
                    keep_unsafe_list = %humantime::format_duration(config.keep_unsafe_list),
                    "FAILING OPEN: the server has been unreachable longer than enforcement.keep_unsafe_list, \
                     so the agent removed its nftables table and refuses no connections until the server is back");
                self.failed_open = true;
                self.applied = None;
                self.digest = None;
                self.seen.clear();
            }
            Err(error) => self.failed("cannot remove the nftables table to fail open", &error),
        }
    }

    async fn apply(&mut self, desired: Desired) {
        let nft_path = self.agent.config.enforcement.nft.clone();
        let script = nft::render(&desired.ruleset);
        if let Err(error) = nft::apply(&nft_path, &script).await {
            self.failed("cannot apply the nftables table", &error);
            return;
        }
        // A new table starts its counters at zero.
        self.seen.clear();
        let listing = match nft::list(&nft_path).await {
            Ok(Some(listing)) => listing,
            Ok(None) => {
                self.failed(
                    "cannot read the nftables table back",
                    "it is missing right after it was applied",
                );
                return;
            }
            Err(error) => {
                self.failed("cannot read the nftables table back", &error);
                return;
            }
        };
        self.last_failure = None;
        self.digest = Some(nft::digest(&listing));
        tracing::info!(table = nft::TABLE, unsafe_peers = ?desired.ruleset.unsafe_peers,
            excluded = ?desired.ruleset.excluded, own_subnets = ?desired.ruleset.own_subnets,
            "nftables table applied");
        self.applied = Some(desired);
    }

    async fn check(&mut self) {
        let nft_path = self.agent.config.enforcement.nft.clone();
        let listing = match nft::list(&nft_path).await {
            Ok(listing) => listing,
            Err(error) => {
                self.failed("cannot read the nftables table", &error);
                return;
            }
        };
        let intact = listing
            .as_ref()
            .is_some_and(|listing| Some(nft::digest(listing)) == self.digest);
        if let Some(listing) = &listing {
            // Refusals counted before a change are still real.
            self.record_refusals(listing);
        }
        if !intact {
            tracing::warn!(
                table = nft::TABLE,
                deleted = listing.is_none(),
                "the agent's nftables table was changed outside the agent; restoring it"
            );
            if let Some(desired) = self.applied.take() {
                self.apply(desired).await;
            }
        }
        self.report_due();
    }

    fn record_refusals(&mut self, listing: &Value) {
        let counts = nft::counters(listing);
        let applied = self.applied.as_ref();
        for (key, count) in &counts {
            let before = self.seen.get(key).copied().unwrap_or(0);
            if *count <= before {
                continue;
            }
            let (refusal, address) = *key;
            let name = applied
                .and_then(|desired| desired.names.get(&address))
                .cloned()
                .unwrap_or_else(|| address.to_string());
            let text = refusal_text(refusal, &name);
            tracing::warn!(peer = %address, name = %name, attempts = count - before, "{text}");
            self.limiter.add(*key, count - before);
        }
        self.seen = counts;
    }

    fn report_due(&mut self) {
        let interval = self.agent.config.enforcement.report_interval;
        for ((refusal, address), attempts) in self.limiter.due(Instant::now(), interval) {
            let agent = self.agent.clone();
            let own = agent.api.device.clone();
            let peer = address.to_string();
            let (source, destination) = match refusal {
                Refusal::FromUnsafe | Refusal::FromPeerWhileUnsafe => (peer, own),
                Refusal::ToUnsafe | Refusal::ToPeerWhileUnsafe => (own, peer),
            };
            tokio::spawn(async move {
                match agent
                    .api
                    .report_refusal(&source, &destination, attempts)
                    .await
                {
                    Ok(reply) => {
                        tracing::debug!(source = %source, destination = %destination, attempts,
                        allowed = %reply["allowed"], "refusal reported")
                    }
                    Err(error) => {
                        tracing::warn!(%error, source = %source, destination = %destination, attempts,
                        "cannot report a refusal to the server; it is logged here only")
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn address(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    fn view(own_unsafe: bool) -> Value {
        json!({
            "device": "ws-1",
            "subnets": ["10.0.0.0/24"],
            "reject_unsafe": true,
            "self": {"state": if own_unsafe { "red" } else { "green" }, "unsafe": own_unsafe, "excluded": false},
            "peers": [
                {"id": "ws-2", "name": "WS2", "addresses": ["10.0.0.2"], "state": "red", "unsafe": true, "excluded": false},
                {"id": "ws-3", "name": "WS3", "addresses": ["10.0.0.3"], "state": "green", "unsafe": false, "excluded": false},
                {"id": "ws-4", "name": "WS4", "addresses": ["10.0.0.4"], "state": "offline", "unsafe": false, "excluded": false},
                {"id": "cache", "name": "CACHE", "addresses": ["10.0.0.9"], "state": "red", "unsafe": true, "excluded": true}
            ]
        })
    }

    #[test]
    fn view_fields_checked() {
        assert_eq!(check_view(&view(false)), Ok(()));
        let error = check_view(&json!({"status": "ok"})).expect_err("not a subnet view");
        assert!(error.contains("\"peers\""), "{error}");
        let mut no_self = view(false);
        no_self["self"] = Value::Null;
        let error = check_view(&no_self).expect_err("no self");
        assert!(error.contains("\"self\""), "{error}");
    }

    #[test]
    fn unsafe_and_excluded_peers_from_view() {
        let desired = desired_from_view(&view(false));
        assert_eq!(desired.ruleset.unsafe_peers, [address("10.0.0.2")]);
        assert_eq!(desired.ruleset.excluded, [address("10.0.0.9")]);
        assert!(desired.ruleset.own_subnets.is_empty());
        assert!(desired.ruleset.enforcing.is_empty());
        assert_eq!(desired.names[&address("10.0.0.3")], "WS3");
    }

    #[test]
    fn own_unsafe_refuses_subnet_except_enforcing() {
        let desired = desired_from_view(&view(true));
        let expected: Vec<ipnet::IpNet> = ["10.0.0.0/24", "fe80::/10"]
            .iter()
            .map(|net| net.parse().expect("net"))
            .collect();
        assert_eq!(desired.ruleset.own_subnets, expected);
        assert_eq!(desired.ruleset.enforcing, [address("10.0.0.3")]);
    }

    #[test]
    fn excluded_device_refuses_nothing() {
        let mut excluded = view(true);
        excluded["self"]["excluded"] = true.into();
        let desired = desired_from_view(&excluded);
        assert_eq!(desired.ruleset, Ruleset::default());
        assert_eq!(desired.names[&address("10.0.0.2")], "WS2");
    }

    #[test]
    fn reject_unsafe_off_refuses_nothing() {
        let mut off = view(true);
        off["reject_unsafe"] = false.into();
        assert_eq!(desired_from_view(&off).ruleset, Ruleset::default());
    }

    #[test]
    fn refusal_texts_name_the_peer() {
        assert_eq!(
            refusal_text(Refusal::FromUnsafe, "WS2"),
            "Access request from computer WS2 denied because it may be unsafe"
        );
        assert_eq!(
            refusal_text(Refusal::ToUnsafe, "WS2"),
            "Access to computer WS2 denied because it may be unsafe"
        );
    }

    #[test]
    fn limiter_folds_counts_within_interval() {
        let mut limiter = ReportLimiter::default();
        let key = (Refusal::FromUnsafe, address("10.0.0.2"));
        let start = Instant::now();
        let minute = Duration::from_secs(60);
        limiter.add(key, 1);
        assert_eq!(limiter.due(start, minute), [(key, 1)]);
        limiter.add(key, 2);
        limiter.add(key, 3);
        assert!(
            limiter
                .due(start + Duration::from_secs(59), minute)
                .is_empty()
        );
        assert_eq!(limiter.due(start + minute, minute), [(key, 5)]);
        assert!(limiter.due(start + minute * 3, minute).is_empty());
    }
}
