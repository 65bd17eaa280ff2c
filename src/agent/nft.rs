//! The agent's own nftables table, `inet sendguard_agent`: rendering the
//! ruleset (pure), applying and removing it with `nft`, and reading it back
//! to detect refusals and changes made outside the agent.
//!
//! The agent touches no other table. Each apply replaces the whole table in
//! one `nft -f -` transaction, so the table is never seen half-written.

use serde_json::Value;
use sha2::Digest;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::process::Stdio;
use tokio::io::AsyncWriteExt;

/// Family and name of the agent's table.
pub const TABLE: &str = "inet sendguard_agent";

/// Maximum number of peers each dynamic refusal set remembers.
const DYNAMIC_SET_SIZE: u32 = 65_535;

/// The refusals the table enforces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// Unsafe peers: new connections from and to them are refused.
    pub unsafe_peers: Vec<IpAddr>,
    /// Excluded servers: never refused, in either direction, whatever the
    /// health of either side.
    pub excluded: Vec<IpAddr>,
    /// When this device itself is unsafe, its subnets: new connections
    /// from and to every address in them are refused, except excluded
    /// servers and `enforcing` peers.
    pub own_subnets: Vec<ipnet::IpNet>,
    /// Safe peers that run their own enforcement (they send heartbeats), so
    /// they refuse this unsafe device themselves and log it as the refusing
    /// device.
    pub enforcing: Vec<IpAddr>,
}

/// The cause of a refused connection, as read from the table's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// A new connection from an unsafe peer.
    FromUnsafe,
    /// A new connection to an unsafe peer.
    ToUnsafe,
    /// A new connection from a peer while this device is unsafe.
    FromPeerWhileUnsafe,
    /// A new connection to a peer while this device is unsafe.
    ToPeerWhileUnsafe,
}

/// The counter sets, each with the refusal its elements count.
const COUNTER_SETS: [(&str, Refusal); 8] = [
    ("unsafe_in4", Refusal::FromUnsafe),
    ("unsafe_in6", Refusal::FromUnsafe),
    ("unsafe_out4", Refusal::ToUnsafe),
    ("unsafe_out6", Refusal::ToUnsafe),
    ("self_in4", Refusal::FromPeerWhileUnsafe),
    ("self_in6", Refusal::FromPeerWhileUnsafe),
    ("self_out4", Refusal::ToPeerWhileUnsafe),
    ("self_out6", Refusal::ToPeerWhileUnsafe),
];

/// Sets whose elements the kernel adds; left out of the digest.
const DYNAMIC_SETS: [&str; 4] = ["self_in4", "self_in6", "self_out4", "self_out6"];

fn elements<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    let items: Vec<String> = items.into_iter().map(|item| item.to_string()).collect();
    if items.is_empty() {
        String::new()
    } else {
        format!(" elements = {{ {} }};", items.join(", "))
    }
}

fn split(addresses: &[IpAddr]) -> (Vec<IpAddr>, Vec<IpAddr>) {
    let mut sorted = addresses.to_vec();
    sorted.sort();
    sorted.dedup();
    sorted.into_iter().partition(IpAddr::is_ipv4)
}

/// Renders the `nft -f` script that replaces the agent's table with one
/// enforcing `ruleset`. Creating the table before deleting it makes the
/// script work whether or not the table exists.
pub fn render(ruleset: &Ruleset) -> String {
    let (unsafe4, unsafe6) = split(&ruleset.unsafe_peers);
    let (excluded4, excluded6) = split(&ruleset.excluded);
    let (enforcing4, enforcing6) = split(&ruleset.enforcing);
    let subnets4: Vec<_> = ruleset
        .own_subnets
        .iter()
        .filter(|net| matches!(net, ipnet::IpNet::V4(_)))
        .collect();
    let subnets6: Vec<_> = ruleset
        .own_subnets
        .iter()
        .filter(|net| matches!(net, ipnet::IpNet::V6(_)))
        .collect();
    let mut script = format!("table {TABLE}\ndelete table {TABLE}\ntable {TABLE} {{\n");
    for (family, kind, excluded, unsafe_peers, enforcing, subnets) in [
        (
            "4",
            "ipv4_addr",
            &excluded4,
            &unsafe4,
            &enforcing4,
            &subnets4,
        ),
        (
            "6",
            "ipv6_addr",
            &excluded6,
            &unsafe6,
            &enforcing6,
            &subnets6,
        ),
    ] {
        script.push_str(&format!(
            "  set excluded{family} {{ type {kind}; flags interval;{} }}\n",
            elements(excluded.iter())
        ));
        script.push_str(&format!(
            "  set enforcing{family} {{ type {kind};{} }}\n",
            elements(enforcing.iter())
        ));
        script.push_str(&format!(
            "  set subnet{family} {{ type {kind}; flags interval;{} }}\n",
            elements(subnets.iter())
        ));
        for direction in ["in", "out"] {
            script.push_str(&format!(
                "  set unsafe_{direction}{family} {{ type {kind}; counter;{} }}\n",
                elements(unsafe_peers.iter())
            ));
            script.push_str(&format!(
                "  set self_{direction}{family} {{ type {kind}; size {DYNAMIC_SET_SIZE}; flags dynamic; counter; }}\n"
            ));
        }
    }
    // TCP gets a reset and everything else an ICMP "administratively
    // prohibited", so applications fail at once instead of timing out.
    script.push_str(
        "  chain refuse {\n    meta l4proto tcp reject with tcp reset\n    reject with icmpx admin-prohibited\n  }\n",
    );
    // Packets that conntrack tracks, or marks invalid, pass unchecked, but
    // untracked ones do not, or a `notrack` rule in another table would
    // undo every refusal. Neighbor discovery is untracked by the kernel
    // and opens no connection, so it passes: refusing it would cut the
    // device off from its IPv6 neighbors, the router included.
    for (chain, hook, interface, field) in [
        ("input", "input", "iif", "saddr"),
        ("output", "output", "oif", "daddr"),
    ] {
        let direction = if chain == "input" { "in" } else { "out" };
        script.push_str(&format!(
            "  chain {chain} {{\n    type filter hook {hook} priority filter; policy accept;\n    \
             {interface} \"lo\" accept\n    ct state {{ established, related, invalid }} accept\n    \
             icmpv6 type {{ nd-router-solicit, nd-router-advert, nd-neighbor-solicit, \
             nd-neighbor-advert, nd-redirect }} accept\n"
        ));
        for (family, protocol) in [("4", "ip"), ("6", "ip6")] {
            script.push_str(&format!(
                "    {protocol} {field} @excluded{family} accept\n"
            ));
            script.push_str(&format!(
                "    {protocol} {field} @unsafe_{direction}{family} goto refuse\n"
            ));
            // Counting and refusing are two rules: once the dynamic set is
            // full, `update` fails and ends its rule, which would then let
            // the packet through. Peers past the set's size are refused
            // without a counter.
            let own_unsafe = format!(
                "{protocol} {field} @subnet{family} {protocol} {field} != @enforcing{family}"
            );
            script.push_str(&format!(
                "    {own_unsafe} update @self_{direction}{family} {{ {protocol} {field} }}\n"
            ));
            script.push_str(&format!("    {own_unsafe} goto refuse\n"));
        }
        script.push_str("  }\n");
    }
    script.push_str("}\n");
    script
}

/// Returns the script that removes the agent's table, whether or not it
/// exists.
pub fn removal_script() -> String {
    format!("table {TABLE}\ndelete table {TABLE}\n")
}

/// Returns a digest of the table as `nft -j list table` printed it,
/// without what changes by itself: handles, counters and the elements the
/// kernel adds to the dynamic sets. Equal digests mean the table has the
/// rules and sets the agent wrote.
pub fn digest(listing: &Value) -> String {
    let mut parts = Vec::new();
    for item in listing["nftables"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let Some((kind, body)) = item.as_object().and_then(|object| object.iter().next()) else {
            continue;
        };
        if kind == "metainfo" {
            continue;
        }
        let mut body = body.clone();
        if let Value::Object(map) = &mut body {
            map.remove("handle");
            let dynamic = kind == "set"
                && map["name"]
                    .as_str()
                    .is_some_and(|name| DYNAMIC_SETS.contains(&name));
            if dynamic {
                map.remove("elem");
            } else if let Some(Value::Array(elements)) = map.get_mut("elem") {
                for element in elements {
                    if let Some(value) = element.get("elem").and_then(|inner| inner.get("val")) {
                        *element = value.clone();
                    }
                }
            }
        }
        parts.push(format!("{kind}:{body}"));
    }
    hex::encode(sha2::Sha256::digest(parts.join("\n").as_bytes()))
}

/// Returns each counter set element's packet count, keyed by refusal and
/// address.
pub fn counters(listing: &Value) -> BTreeMap<(Refusal, IpAddr), u64> {
    let mut counts = BTreeMap::new();
    for item in listing["nftables"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let set = &item["set"];
        let Some(name) = set["name"].as_str() else {
            continue;
        };
        let Some((_, refusal)) = COUNTER_SETS.iter().find(|(set_name, _)| *set_name == name) else {
            continue;
        };
        for element in set["elem"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            let inner = &element["elem"];
            let Some(address) = inner["val"]
                .as_str()
                .and_then(|text| text.parse::<IpAddr>().ok())
            else {
                continue;
            };
            let packets = inner["counter"]["packets"].as_u64().unwrap_or(0);
            *counts.entry((*refusal, address)).or_insert(0) += packets;
        }
    }
    counts
}

/// Runs `nft -f -` with `script` on standard input.
///
/// # Errors
/// When nft cannot be started or rejects the script; the message has
/// nft's output.
pub async fn apply(nft: &Path, script: &str) -> Result<(), String> {
    let mut child = tokio::process::Command::new(nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| format!("cannot run {}: {error}; install nftables", nft.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|error| format!("cannot write the ruleset to nft: {error}"))?;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|error| format!("nft failed: {error}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "nft -f - failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    ))
}

/// Reads the agent's table as JSON; `None` when it does not exist.
///
/// # Errors
/// When nft cannot be started, fails otherwise, or prints no JSON.
pub async fn list(nft: &Path) -> Result<Option<Value>, String> {
    let output = tokio::process::Command::new(nft)
        .args(["-j", "list", "table"])
        .args(TABLE.split(' '))
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|error| format!("cannot run {}: {error}; install nftables", nft.display()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("No such file or directory") {
            return Ok(None);
        }
        return Err(format!(
            "nft -j list table {TABLE} failed: {}",
            stderr.trim()
        ));
    }
    serde_json::from_slice(&output.stdout)
        .map(Some)
        .map_err(|error| format!("nft printed no valid JSON: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn address(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    #[test]
    fn render_fills_sets_by_family() {
        let ruleset = Ruleset {
            unsafe_peers: vec![address("10.0.0.7"), address("fd00::7"), address("10.0.0.7")],
            excluded: vec![address("10.0.0.2")],
            own_subnets: vec!["10.0.0.0/24".parse().expect("net")],
            enforcing: vec![address("10.0.0.3")],
        };
        let script = render(&ruleset);
        assert!(
            script.starts_with("table inet sendguard_agent\ndelete table inet sendguard_agent\n")
        );
        assert!(
            script.contains("set unsafe_in4 { type ipv4_addr; counter; elements = { 10.0.0.7 }; }")
        );
        assert!(
            script.contains("set unsafe_out6 { type ipv6_addr; counter; elements = { fd00::7 }; }")
        );
        assert!(script.contains(
            "set excluded4 { type ipv4_addr; flags interval; elements = { 10.0.0.2 }; }"
        ));
        assert!(script.contains(
            "set subnet4 { type ipv4_addr; flags interval; elements = { 10.0.0.0/24 }; }"
        ));
        assert!(script.contains("set subnet6 { type ipv6_addr; flags interval; }"));
        assert!(script.contains("set enforcing4 { type ipv4_addr; elements = { 10.0.0.3 }; }"));
    }

    #[test]
    fn render_checks_exclusions_first() {
        let script = render(&Ruleset::default());
        let input = &script[script.find("chain input").expect("input chain")..];
        let excluded = input
            .find("ip saddr @excluded4 accept")
            .expect("exclusion rule");
        let refused = input
            .find("ip saddr @unsafe_in4 goto refuse")
            .expect("refusal rule");
        assert!(excluded < refused);
        assert!(input.contains("iif \"lo\" accept"));
        let known = input
            .find("ct state { established, related, invalid } accept")
            .expect("known connections accepted");
        assert!(known < excluded);
        let neighbor_discovery = input
            .find("nd-neighbor-solicit, nd-neighbor-advert, nd-redirect } accept")
            .expect("neighbor discovery accepted");
        assert!(neighbor_discovery < refused);
        assert!(
            !script.contains("ct state != new"),
            "untracked packets pass"
        );
        assert!(script.contains("ip daddr @unsafe_out4 goto refuse"));
        let counted = "ip saddr @subnet4 ip saddr != @enforcing4 update @self_in4 { ip saddr }\n";
        assert!(input.contains(counted), "{input}");
        let own_unsafe = input
            .find("ip saddr @subnet4 ip saddr != @enforcing4 goto refuse\n")
            .expect("a refusal that does not depend on the counter set");
        assert!(input.find(counted).expect("counted") < own_unsafe);
        assert!(script.contains("reject with tcp reset"));
        assert!(script.contains("reject with icmpx admin-prohibited"));
    }

    fn listing(counter: u64, dynamic: &[&str]) -> Value {
        json!({"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "sendguard_agent", "handle": 4}},
            {"set": {"family": "inet", "name": "unsafe_in4", "table": "sendguard_agent", "handle": 9,
                "elem": [{"elem": {"val": "10.0.0.7", "counter": {"packets": counter, "bytes": 60}}}]}},
            {"set": {"family": "inet", "name": "self_out4", "table": "sendguard_agent", "handle": 10,
                "elem": dynamic.iter().map(|address| json!({"elem": {"val": address, "counter": {"packets": 2, "bytes": 120}}})).collect::<Vec<_>>()}},
            {"rule": {"family": "inet", "chain": "input", "handle": 12, "expr": []}},
        ]})
    }

    #[test]
    fn digest_ignores_counters_and_dynamic_elements() {
        assert_eq!(digest(&listing(0, &[])), digest(&listing(5, &["10.0.0.9"])));
    }

    #[test]
    fn digest_changes_with_elements_and_rules() {
        let base = listing(0, &[]);
        let mut changed = base.clone();
        changed["nftables"][2]["set"]["elem"] = json!([]);
        assert_ne!(digest(&base), digest(&changed));
        let mut extra_rule = base.clone();
        extra_rule["nftables"].as_array_mut().expect("array").push(
            json!({"rule": {"family": "inet", "chain": "input", "expr": [{"accept": null}]}}),
        );
        assert_ne!(digest(&base), digest(&extra_rule));
    }

    #[test]
    fn counters_read_per_refusal_and_address() {
        let counts = counters(&listing(3, &["10.0.0.9"]));
        assert_eq!(
            counts.get(&(Refusal::FromUnsafe, address("10.0.0.7"))),
            Some(&3)
        );
        assert_eq!(
            counts.get(&(Refusal::ToPeerWhileUnsafe, address("10.0.0.9"))),
            Some(&2)
        );
        assert_eq!(counts.len(), 2);
    }
}
