//! `[devices]` (device health heartbeats and access decisions) and the
//! devices file that defines each device and its token.

use super::Problems;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `[devices]`: the device registry and the rules over it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevicesConfig {
    /// File of `[[device]]` entries; without it no device can report.
    pub file: Option<PathBuf>,
    /// Time without a report after which a device is missing.
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    /// Refuse connections from and to unsafe devices (red or missing).
    pub reject_unsafe: bool,
    /// Device ids or names that are always accepted and always reachable.
    pub exclusions: Vec<String>,
    /// Exclude every device whose role is `update_cache`.
    pub exclude_update_caches: bool,
    /// Exclude every device whose role is `message_relay`.
    pub exclude_message_relays: bool,
    /// Refuse SMTP clients whose address belongs to an unsafe device.
    pub relay_gate: bool,
    /// Prefix length of the subnet of an IPv4 address.
    pub subnet_prefix_v4: u8,
    /// Prefix length of the subnet of an IPv6 address.
    pub subnet_prefix_v6: u8,
    /// URL that receives a `subnet_notice` webhook when a device becomes
    /// unsafe or safe again.
    pub subnet_webhook_url: Option<String>,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        DevicesConfig {
            file: None,
            heartbeat_timeout: Duration::from_secs(60),
            reject_unsafe: false,
            exclusions: Vec::new(),
            exclude_update_caches: true,
            exclude_message_relays: true,
            relay_gate: false,
            subnet_prefix_v4: 24,
            subnet_prefix_v6: 64,
            subnet_webhook_url: None,
        }
    }
}

pub(super) fn validate(devices: &DevicesConfig, has_secret: bool, problems: &mut Problems) {
    if devices.heartbeat_timeout.is_zero() {
        problems.push(
            "devices.heartbeat_timeout",
            "must be longer than zero, such as \"60s\" (four report intervals of 15 s)",
        );
    }
    if devices.subnet_prefix_v4 > 32 {
        problems.push(
            "devices.subnet_prefix_v4",
            format!(
                "{} is above 32; give 0 to 32, such as 24",
                devices.subnet_prefix_v4
            ),
        );
    }
    if devices.subnet_prefix_v6 > 128 {
        problems.push(
            "devices.subnet_prefix_v6",
            format!(
                "{} is above 128; give 0 to 128, such as 64",
                devices.subnet_prefix_v6
            ),
        );
    }
    if let Some(url) = &devices.subnet_webhook_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            problems.push(
                "devices.subnet_webhook_url",
                format!("{url:?} is not an http:// or https:// URL"),
            );
        }
        if !has_secret {
            problems.push(
                "actions.secret_file",
                "missing; devices.subnet_webhook_url needs the key that signs webhooks",
            );
        }
    }
}

/// The purpose of a device; update caches and message relays are
/// excluded by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeviceRole {
    #[default]
    Workstation,
    Server,
    UpdateCache,
    MessageRelay,
}

impl DeviceRole {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceRole::Workstation => "workstation",
            DeviceRole::Server => "server",
            DeviceRole::UpdateCache => "update_cache",
            DeviceRole::MessageRelay => "message_relay",
        }
    }
}

/// One `[[device]]` of the devices file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceDefinition {
    pub id: String,
    /// Computer name, as event texts show it.
    pub name: String,
    #[serde(default)]
    pub role: DeviceRole,
    /// Owner id, as in the directory file.
    #[serde(default)]
    pub owner: Option<String>,
    /// The device's subnet; default: the network of each reported address.
    #[serde(default)]
    pub subnet: Option<IpNet>,
    /// SHA-256 (hexadecimal) of the device's bearer token; without it only
    /// the admin token can report for the device.
    #[serde(default)]
    pub token_sha256: Option<String>,
}

impl DeviceDefinition {
    /// Returns the decoded token hash, when one is set.
    pub fn token_hash(&self) -> Option<[u8; 32]> {
        let bytes = hex::decode(self.token_sha256.as_deref()?).ok()?;
        <[u8; 32]>::try_from(bytes).ok()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevicesFile {
    #[serde(default)]
    device: Vec<DeviceDefinition>,
}

/// The devices defined in the devices file, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceBook {
    pub devices: Vec<DeviceDefinition>,
}

impl DeviceBook {
    /// Reads and checks a devices file.
    ///
    /// # Errors
    /// When the file cannot be read or parsed, or an entry is invalid;
    /// the message lists every invalid entry.
    pub fn load(path: &Path) -> Result<DeviceBook, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
        DeviceBook::parse(&text).map_err(|error| format!("{}: {error}", path.display()))
    }

    /// Parses and checks the text of a devices file.
    ///
    /// # Errors
    /// As [`DeviceBook::load`].
    pub fn parse(text: &str) -> Result<DeviceBook, String> {
        let file: DevicesFile = toml::from_str(text).map_err(|error| {
            // The full text names the line and column; one line keeps it
            // together in logs.
            let message = error
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            format!("invalid devices file: {message}")
        })?;
        let mut problems = Vec::new();
        let mut ids = HashSet::new();
        let mut names = HashSet::new();
        let mut tokens = HashSet::new();
        for (index, device) in file.device.iter().enumerate() {
            let at = format!("device[{index}]");
            // The id is a segment of the API's URL paths, where "." and ".."
            // are resolved away before the request is sent.
            if device.id.trim().is_empty()
                || device.id.contains(['/', '?', '#'])
                || matches!(device.id.as_str(), "." | "..")
            {
                problems.push(format!(
                    "{at}.id {:?} is empty, \".\" or \"..\", or contains '/', '?' or '#'; \
                     it is part of the API's URLs",
                    device.id
                ));
            } else if !ids.insert(device.id.clone()) {
                problems.push(format!(
                    "{at}.id {:?} is used twice; ids must be unique",
                    device.id
                ));
            }
            if device.name.trim().is_empty() {
                problems.push(format!("{at}.name is empty; give the computer name"));
            } else if !names.insert(device.name.to_lowercase()) {
                problems.push(format!(
                    "{at}.name {:?} is used twice; names must be unique because exclusions may name devices",
                    device.name
                ));
            }
            if let Some(hash) = &device.token_sha256
                && device.token_hash().is_none()
            {
                problems.push(format!(
                    "{at}.token_sha256 {hash:?} is not a SHA-256 in hexadecimal (64 digits); \
                     print it with `sendguard token hash FILE`"
                ));
            }
            if let Some(hash) = device.token_hash()
                && !tokens.insert(hash)
            {
                problems.push(format!(
                    "{at}.token_sha256 is the hash of another device's token; give each device \
                     its own token, or one device could report for the other"
                ));
            }
            if device.name.chars().any(char::is_control) {
                problems.push(format!("{at}.name contains control characters"));
            }
        }
        for device in &file.device {
            if device.name != device.id && ids.contains(&device.name) {
                problems.push(format!(
                    "device {:?} has the name {:?}, which is another device's id; exclusions and \
                     access requests would be ambiguous",
                    device.id, device.name
                ));
            }
        }
        if problems.is_empty() {
            Ok(DeviceBook {
                devices: file.device,
            })
        } else {
            Err(problems.join("; "))
        }
    }

    pub fn get(&self, id: &str) -> Option<&DeviceDefinition> {
        self.devices.iter().find(|device| device.id == id)
    }

    /// Finds a device by its id, else by its name (case-insensitive).
    pub fn find(&self, id_or_name: &str) -> Option<&DeviceDefinition> {
        self.get(id_or_name).or_else(|| {
            self.devices
                .iter()
                .find(|device| device.name.eq_ignore_ascii_case(id_or_name))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn devices_file_parses() {
        let text = format!(
            "[[device]]\nid = \"dev-1\"\nname = \"PC-1\"\ntoken_sha256 = \"{HASH}\"\n\
             [[device]]\nid = \"cache\"\nname = \"CACHE\"\nrole = \"update_cache\"\nsubnet = \"10.0.0.0/16\"\n"
        );
        let book = DeviceBook::parse(&text).expect("valid");
        assert_eq!(book.devices.len(), 2);
        assert_eq!(book.devices[0].role, DeviceRole::Workstation);
        assert!(book.devices[0].token_hash().is_some());
        assert_eq!(
            book.find("cache").map(|d| d.role),
            Some(DeviceRole::UpdateCache)
        );
        assert_eq!(book.find("pc-1").map(|d| d.id.as_str()), Some("dev-1"));
    }

    #[test]
    fn devices_file_problems_listed() {
        let text = "[[device]]\nid = \"a\"\nname = \"X\"\ntoken_sha256 = \"abc\"\n\
                    [[device]]\nid = \"a\"\nname = \"x\"\n";
        let error = DeviceBook::parse(text).expect_err("invalid");
        assert!(error.contains("device[0].token_sha256"), "{error}");
        assert!(
            error.contains("device[1].id \"a\" is used twice"),
            "{error}"
        );
        assert!(
            error.contains("device[1].name \"x\" is used twice"),
            "{error}"
        );
    }

    #[test]
    fn dot_segment_ids_rejected() {
        for id in [".", ".."] {
            let error = DeviceBook::parse(&format!("[[device]]\nid = \"{id}\"\nname = \"A\"\n"))
                .expect_err("invalid");
            assert!(error.contains(&format!("device[0].id \"{id}\"")), "{error}");
        }
    }

    #[test]
    fn unknown_role_rejected() {
        let error = DeviceBook::parse("[[device]]\nid = \"a\"\nname = \"A\"\nrole = \"printer\"\n")
            .expect_err("invalid");
        assert!(error.contains("printer"), "{error}");
    }

    #[test]
    fn section_validation() {
        let config = DevicesConfig {
            heartbeat_timeout: Duration::ZERO,
            subnet_prefix_v4: 33,
            subnet_webhook_url: Some("ftp://x".to_string()),
            ..DevicesConfig::default()
        };
        let mut problems = Problems::default();
        validate(&config, false, &mut problems);
        let keys: Vec<&str> = problems.0.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "devices.heartbeat_timeout",
                "devices.subnet_prefix_v4",
                "devices.subnet_webhook_url",
                "actions.secret_file"
            ]
        );
    }
}
