//! The directory file: each mailbox with its aliases, logins, owner and
//! devices.
//!
//! ```toml
//! [[mailbox]]
//! address = "alice@example.org"
//! aliases = ["a.smith@example.org"]
//! logins = ["alice"]
//! owner = { id = "u-1001", name = "Alice Smith" }
//! devices = [{ id = "dev-17", name = "ALICE-LAPTOP" }]
//! ```

use crate::config::IdentityConfig;
use crate::identity::canonical_address;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// The person a mailbox belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Owner {
    pub id: String,
    pub name: String,
}

/// A device the owner of a mailbox uses.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    pub id: String,
    pub name: String,
}

/// One `[[mailbox]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MailboxEntry {
    pub address: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub logins: Vec<String>,
    #[serde(default)]
    pub owner: Option<Owner>,
    #[serde(default)]
    pub devices: Vec<Device>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectoryFile {
    #[serde(default)]
    mailbox: Vec<MailboxEntry>,
}

/// Failure to load a directory file.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("cannot read directory file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid directory file: {0}")]
    Invalid(String),
}

/// The loaded directory, with every address in canonical form.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    entries: Vec<MailboxEntry>,
    /// Canonical address or alias → index into `entries`.
    by_address: HashMap<String, usize>,
    /// Login as written, lower-cased → index into `entries`.
    by_login: HashMap<String, usize>,
}

impl Directory {
    /// Reads a directory file, canonicalising addresses under `identity`.
    ///
    /// # Errors
    /// When the file cannot be read or is not a valid directory.
    pub fn load(path: &Path, identity: &IdentityConfig) -> Result<Directory, DirectoryError> {
        let text = std::fs::read_to_string(path).map_err(|source| DirectoryError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Directory::parse_with(&text, identity)
    }

    /// Parses directory text with the default identity settings.
    ///
    /// # Errors
    /// When the text is not a valid directory.
    pub fn parse(text: &str) -> Result<Directory, DirectoryError> {
        Directory::parse_with(text, &IdentityConfig::default())
    }

    /// Parses directory text, canonicalising addresses under `identity`.
    ///
    /// # Errors
    /// When the text is not valid TOML, has unknown keys, or maps one
    /// address or login to two mailboxes.
    pub fn parse_with(text: &str, identity: &IdentityConfig) -> Result<Directory, DirectoryError> {
        let file: DirectoryFile =
            toml::from_str(text).map_err(|error| DirectoryError::Invalid(error.to_string()))?;
        let mut directory = Directory::default();
        for (index, mut entry) in file.mailbox.into_iter().enumerate() {
            entry.address = canonical_address(&entry.address, identity);
            if entry.address.is_empty() {
                return Err(DirectoryError::Invalid(format!(
                    "mailbox[{index}].address is empty"
                )));
            }
            let addresses = std::iter::once(entry.address.clone()).chain(
                entry
                    .aliases
                    .iter()
                    .map(|alias| canonical_address(alias, identity)),
            );
            for address in addresses {
                if let Some(&other) = directory.by_address.get(&address)
                    && other != index
                {
                    return Err(DirectoryError::Invalid(format!(
                        "address {address} belongs to both mailbox {} and mailbox {}",
                        directory.entries[other].address, entry.address
                    )));
                }
                directory.by_address.insert(address, index);
            }
            for login in &entry.logins {
                let login = login.to_lowercase();
                if let Some(&other) = directory.by_login.get(&login) {
                    return Err(DirectoryError::Invalid(format!(
                        "login {login} belongs to both mailbox {} and mailbox {}",
                        directory.entries[other].address, entry.address
                    )));
                }
                directory.by_login.insert(login, index);
            }
            directory.entries.push(entry);
        }
        Ok(directory)
    }

    /// Returns the mailbox an already canonical address belongs to: the
    /// entry's main address for an alias, the address itself otherwise.
    pub fn mailbox_of_address(&self, canonical: &str) -> String {
        match self.by_address.get(canonical) {
            Some(&index) => self.entries[index].address.clone(),
            None => canonical.to_string(),
        }
    }

    /// Returns the mailbox a SASL login belongs to, if the directory lists it.
    pub fn mailbox_of_login(&self, login: &str) -> Option<&str> {
        self.by_login
            .get(&login.to_lowercase())
            .map(|&index| self.entries[index].address.as_str())
    }

    /// Returns the entry of a canonical mailbox address.
    pub fn entry(&self, mailbox: &str) -> Option<&MailboxEntry> {
        self.by_address
            .get(mailbox)
            .map(|&index| &self.entries[index])
    }

    /// Returns the mailboxes whose owner uses the device with this id.
    pub fn mailboxes_of_device(&self, device: &str) -> Vec<String> {
        self.entries
            .iter()
            .filter(|entry| entry.devices.iter().any(|known| known.id == device))
            .map(|entry| entry.address.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
        [[mailbox]]
        address = "Alice@Example.org"
        aliases = ["a.smith@example.org", "alice@bücher.example"]
        logins = ["alice"]
        owner = { id = "u-1", name = "Alice Smith" }
        devices = [{ id = "dev-1", name = "ALICE-LAPTOP" }]
    "#;

    #[test]
    fn aliases_map_to_mailbox() {
        let directory = Directory::parse(SAMPLE).expect("valid");
        assert_eq!(
            directory.mailbox_of_address("a.smith@example.org"),
            "alice@example.org"
        );
        assert_eq!(
            directory.mailbox_of_address("alice@xn--bcher-kva.example"),
            "alice@example.org"
        );
        assert_eq!(
            directory.mailbox_of_address("zed@example.org"),
            "zed@example.org"
        );
        assert_eq!(
            directory.mailbox_of_login("ALICE"),
            Some("alice@example.org")
        );
        let entry = directory.entry("alice@example.org").expect("entry");
        assert_eq!(entry.devices.len(), 1);
    }

    #[test]
    fn duplicate_alias_rejected() {
        let text = r#"
            [[mailbox]]
            address = "a@example.org"
            aliases = ["x@example.org"]
            [[mailbox]]
            address = "b@example.org"
            aliases = ["X@example.org"]
        "#;
        let error = Directory::parse(text).expect_err("duplicate");
        assert!(error.to_string().contains("x@example.org"), "{error}");
    }

    #[test]
    fn unknown_key_rejected() {
        let error = Directory::parse("[[mailbox]]\naddress = \"a@b\"\nalias = []\n")
            .expect_err("unknown key");
        assert!(error.to_string().contains("alias"), "{error}");
    }
}
