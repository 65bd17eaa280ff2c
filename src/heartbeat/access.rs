//! Access decisions between two devices, exclusions and subnets. Pure.

use crate::config::devices::{DeviceDefinition, DeviceRole};
use ipnet::IpNet;
use std::collections::BTreeSet;
use std::net::IpAddr;

/// Builds the event text logged on a destination that refused an unsafe source.
pub fn incoming_refusal_text(source_name: &str) -> String {
    format!("Access request from computer {source_name} denied because it may be unsafe")
}

/// Builds the event text logged on a source that was kept from an unsafe
/// destination.
pub fn outgoing_refusal_text(destination_name: &str) -> String {
    format!("Access to computer {destination_name} denied because it may be unsafe")
}

/// One end of a connection, with the facts the decision uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Party {
    /// Device id; `None` for an address no device has reported.
    pub id: Option<String>,
    /// Computer name in event texts; the address for an unknown party.
    pub name: String,
    pub is_unsafe: bool,
    /// The reason the party is excluded, when it is.
    pub excluded: Option<String>,
}

/// The end of a connection whose device logs a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The destination refused an unsafe source.
    Destination,
    /// The source was kept from an unsafe destination.
    Source,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Destination => "destination",
            Side::Source => "source",
        }
    }
}

/// A refusal, logged on the device at `side`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub side: Side,
    /// Id of the device that logs it; `None` for an unknown party.
    pub device: Option<String>,
    pub text: String,
}

/// The outcome of an access request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Allowed { reason: String },
    Refused { refusals: Vec<Refusal> },
}

/// Decides whether `source` may connect to `destination`.
///
/// With `reject_unsafe` off nothing is refused. An excluded source is
/// always accepted and an excluded destination always reachable, whatever
/// the health of either. Otherwise an unsafe source is refused by the
/// destination and an unsafe destination is refused to the source; when
/// both are unsafe, both log the refusal. No per-device override exists.
pub fn decide(source: &Party, destination: &Party, reject_unsafe: bool) -> Access {
    if !reject_unsafe {
        return Access::Allowed {
            reason: "devices.reject_unsafe is off".to_string(),
        };
    }
    if let Some(why) = &source.excluded {
        return Access::Allowed {
            reason: format!("source {} is excluded: {why}", source.name),
        };
    }
    if let Some(why) = &destination.excluded {
        return Access::Allowed {
            reason: format!("destination {} is excluded: {why}", destination.name),
        };
    }
    let mut refusals = Vec::new();
    if source.is_unsafe {
        refusals.push(Refusal {
            side: Side::Destination,
            device: destination.id.clone(),
            text: incoming_refusal_text(&source.name),
        });
    }
    if destination.is_unsafe {
        refusals.push(Refusal {
            side: Side::Source,
            device: source.id.clone(),
            text: outgoing_refusal_text(&destination.name),
        });
    }
    if refusals.is_empty() {
        Access::Allowed {
            reason: "neither device is unsafe".to_string(),
        }
    } else {
        Access::Refused { refusals }
    }
}

/// The settings that decide which devices are excluded.
#[derive(Debug, Clone)]
pub struct ExclusionRules<'a> {
    /// `devices.exclusions`: ids or names.
    pub configured: &'a [String],
    /// Ids excluded at run time through the API.
    pub added: &'a BTreeSet<String>,
    /// Ids whose exclusion by the file or by role was lifted at run time
    /// through the API.
    pub lifted: &'a BTreeSet<String>,
    pub update_caches: bool,
    pub message_relays: bool,
}

/// The origin of a device's exclusion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExclusionSource {
    /// Listed in `devices.exclusions`.
    File,
    /// Excluded by default for its role (`devices.exclude_update_caches`,
    /// `devices.exclude_message_relays`).
    Role,
    /// Added through the admin API.
    Api,
}

impl ExclusionSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ExclusionSource::File => "file",
            ExclusionSource::Role => "role",
            ExclusionSource::Api => "api",
        }
    }
}

/// A device's exclusion: its source and the reason shown with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exclusion {
    pub source: ExclusionSource,
    pub reason: String,
}

/// Returns the exclusion the configuration file gives `device`, by listing
/// or by role, whatever the API added or lifted.
pub fn file_exclusion(device: &DeviceDefinition, rules: &ExclusionRules<'_>) -> Option<Exclusion> {
    if rules
        .configured
        .iter()
        .any(|entry| *entry == device.id || entry.eq_ignore_ascii_case(&device.name))
    {
        return Some(Exclusion {
            source: ExclusionSource::File,
            reason: "listed in devices.exclusions".to_string(),
        });
    }
    let reason = match device.role {
        DeviceRole::UpdateCache if rules.update_caches => {
            "role update_cache (devices.exclude_update_caches)"
        }
        DeviceRole::MessageRelay if rules.message_relays => {
            "role message_relay (devices.exclude_message_relays)"
        }
        _ => return None,
    };
    Some(Exclusion {
        source: ExclusionSource::Role,
        reason: reason.to_string(),
    })
}

/// Returns the exclusion in force for `device`, or `None` when it is not
/// excluded. A lift through the API wins over the file and the role, and
/// the file's listing is reported before an exclusion the API added.
pub fn exclusion(device: &DeviceDefinition, rules: &ExclusionRules<'_>) -> Option<Exclusion> {
    if rules.lifted.contains(&device.id) {
        return None;
    }
    let from_file = file_exclusion(device, rules);
    if from_file
        .as_ref()
        .is_some_and(|found| found.source == ExclusionSource::File)
    {
        return from_file;
    }
    if rules.added.contains(&device.id) {
        return Some(Exclusion {
            source: ExclusionSource::Api,
            reason: "excluded through the admin API".to_string(),
        });
    }
    from_file
}

/// Returns why `device` is excluded, or `None` when it is not.
pub fn exclusion_reason(device: &DeviceDefinition, rules: &ExclusionRules<'_>) -> Option<String> {
    exclusion(device, rules).map(|found| found.reason)
}

/// Returns the network of `address` with the configured prefix length.
pub fn subnet_of(address: IpAddr, v4_prefix: u8, v6_prefix: u8) -> IpNet {
    let prefix = match address {
        IpAddr::V4(_) => v4_prefix,
        IpAddr::V6(_) => v6_prefix,
    };
    IpNet::new(address, prefix)
        .unwrap_or_else(|_| IpNet::from(address))
        .trunc()
}

/// Returns a device's subnets: the configured one, else the network of
/// each reported address.
pub fn device_subnets(
    configured: Option<IpNet>,
    addresses: &[IpAddr],
    v4_prefix: u8,
    v6_prefix: u8,
) -> Vec<IpNet> {
    if let Some(subnet) = configured {
        return vec![subnet.trunc()];
    }
    let mut subnets: Vec<IpNet> = addresses
        .iter()
        .map(|address| subnet_of(address.to_canonical(), v4_prefix, v6_prefix))
        .collect();
    subnets.sort();
    subnets.dedup();
    subnets
}

#[cfg(test)]
mod tests {
    use super::*;

    fn party(id: &str, is_unsafe: bool, excluded: bool) -> Party {
        Party {
            id: Some(id.to_string()),
            name: id.to_uppercase(),
            is_unsafe,
            excluded: excluded.then(|| "test".to_string()),
        }
    }

    #[test]
    fn texts_match_product() {
        assert_eq!(
            incoming_refusal_text("PC-1"),
            "Access request from computer PC-1 denied because it may be unsafe"
        );
        assert_eq!(
            outgoing_refusal_text("PC-2"),
            "Access to computer PC-2 denied because it may be unsafe"
        );
    }

    #[test]
    fn unsafe_source_logged_on_destination() {
        let decision = decide(&party("a", true, false), &party("b", false, false), true);
        let Access::Refused { refusals } = decision else {
            panic!("refused expected");
        };
        assert_eq!(refusals.len(), 1);
        assert_eq!(refusals[0].side, Side::Destination);
        assert_eq!(refusals[0].device.as_deref(), Some("b"));
        assert_eq!(refusals[0].text, incoming_refusal_text("A"));
    }

    #[test]
    fn unsafe_destination_logged_on_source() {
        let decision = decide(&party("a", false, false), &party("b", true, false), true);
        let Access::Refused { refusals } = decision else {
            panic!("refused expected");
        };
        assert_eq!(refusals.len(), 1);
        assert_eq!(refusals[0].side, Side::Source);
        assert_eq!(refusals[0].device.as_deref(), Some("a"));
        assert_eq!(refusals[0].text, outgoing_refusal_text("B"));
    }

    #[test]
    fn both_unsafe_logged_on_both() {
        let decision = decide(&party("a", true, false), &party("b", true, false), true);
        let Access::Refused { refusals } = decision else {
            panic!("refused expected");
        };
        let devices: Vec<_> = refusals.iter().map(|r| r.device.as_deref()).collect();
        assert_eq!(devices, [Some("b"), Some("a")]);
    }

    #[test]
    fn table_of_allowed_cases() {
        // (source unsafe, source excluded, destination unsafe, destination
        // excluded, reject_unsafe)
        let cases = [
            (false, false, false, false, true),
            (true, false, true, false, false),
            (true, true, false, false, true),
            (true, false, false, true, true),
            (true, true, true, true, true),
            (false, false, true, true, true),
        ];
        for (su, se, du, de, reject) in cases {
            let decision = decide(&party("s", su, se), &party("d", du, de), reject);
            assert!(
                matches!(decision, Access::Allowed { .. }),
                "{su} {se} {du} {de} {reject}: {decision:?}"
            );
        }
    }

    #[test]
    fn unknown_source_has_no_device() {
        let unknown = Party {
            id: None,
            name: "192.0.2.7".to_string(),
            is_unsafe: false,
            excluded: None,
        };
        let decision = decide(&unknown, &party("b", true, false), true);
        let Access::Refused { refusals } = decision else {
            panic!("refused expected");
        };
        assert_eq!(refusals[0].device, None);
    }

    fn definition(id: &str, name: &str, role: DeviceRole) -> DeviceDefinition {
        DeviceDefinition {
            id: id.to_string(),
            name: name.to_string(),
            role,
            owner: None,
            subnet: None,
            token_sha256: None,
        }
    }

    #[test]
    fn exclusions_by_role_id_and_name() {
        let added = BTreeSet::from(["dev-9".to_string()]);
        let configured = vec!["FILE-SERVER".to_string(), "dev-3".to_string()];
        let lifted = BTreeSet::new();
        let rules = ExclusionRules {
            configured: &configured,
            added: &added,
            lifted: &lifted,
            update_caches: true,
            message_relays: true,
        };
        let cache = definition("c", "CACHE", DeviceRole::UpdateCache);
        let relay = definition("r", "RELAY", DeviceRole::MessageRelay);
        let by_name = definition("f", "file-server", DeviceRole::Server);
        let by_id = definition("dev-3", "X", DeviceRole::Workstation);
        let by_api = definition("dev-9", "Y", DeviceRole::Workstation);
        let plain = definition("w", "W", DeviceRole::Server);
        assert!(exclusion_reason(&cache, &rules).is_some());
        assert!(exclusion_reason(&relay, &rules).is_some());
        assert!(exclusion_reason(&by_name, &rules).is_some());
        assert!(exclusion_reason(&by_id, &rules).is_some());
        assert!(exclusion_reason(&by_api, &rules).is_some());
        assert_eq!(exclusion_reason(&plain, &rules), None);

        let off = ExclusionRules {
            update_caches: false,
            message_relays: false,
            ..rules
        };
        assert_eq!(exclusion_reason(&cache, &off), None);
        assert_eq!(exclusion_reason(&relay, &off), None);
    }

    #[test]
    fn exclusion_sources_and_lifts() {
        let added = BTreeSet::from(["dev-9".to_string(), "dev-3".to_string()]);
        let lifted = BTreeSet::from(["c".to_string(), "f".to_string()]);
        let configured = vec!["FILE-SERVER".to_string(), "dev-3".to_string()];
        let rules = ExclusionRules {
            configured: &configured,
            added: &added,
            lifted: &lifted,
            update_caches: true,
            message_relays: true,
        };
        let cache = definition("c", "CACHE", DeviceRole::UpdateCache);
        let relay = definition("r", "RELAY", DeviceRole::MessageRelay);
        let by_name = definition("f", "file-server", DeviceRole::Server);
        let by_id = definition("dev-3", "X", DeviceRole::Workstation);
        let by_api = definition("dev-9", "Y", DeviceRole::Workstation);
        let source =
            |device: &DeviceDefinition| exclusion(device, &rules).map(|found| found.source);

        // A lift wins over the role and the file's listing.
        assert_eq!(source(&cache), None);
        assert_eq!(source(&by_name), None);
        assert_eq!(source(&relay), Some(ExclusionSource::Role));
        assert_eq!(source(&by_id), Some(ExclusionSource::File));
        assert_eq!(source(&by_api), Some(ExclusionSource::Api));

        // The file's exclusion is still reported under a lift.
        let under_lift = file_exclusion(&cache, &rules).expect("role exclusion");
        assert_eq!(under_lift.source, ExclusionSource::Role);
        let under_lift = file_exclusion(&by_name, &rules).expect("file exclusion");
        assert_eq!(under_lift.source, ExclusionSource::File);
        assert_eq!(file_exclusion(&by_api, &rules), None);
    }

    #[test]
    fn subnets_from_addresses() {
        let addresses: Vec<IpAddr> = vec![
            "10.1.2.3".parse().expect("address"),
            "10.1.2.77".parse().expect("address"),
            "2001:db8::5".parse().expect("address"),
        ];
        let subnets = device_subnets(None, &addresses, 24, 64);
        let shown: Vec<String> = subnets.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["10.1.2.0/24", "2001:db8::/64"]);
        let configured: IpNet = "10.9.0.0/16".parse().expect("network");
        assert_eq!(
            device_subnets(Some(configured), &addresses, 24, 64),
            vec![configured]
        );
    }

    #[test]
    fn mapped_v4_address_uses_v4_prefix() {
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().expect("address");
        let subnets = device_subnets(None, &[mapped], 24, 64);
        assert_eq!(subnets[0].to_string(), "10.1.2.0/24");
    }
}
