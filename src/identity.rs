//! Turns a SASL login or an envelope sender into the mailbox key that
//! strikes and lockouts are counted under.
//!
//! Addresses compare with the domain lower-cased and in IDNA A-label form
//! (`bücher.example` and `xn--bcher-kva.example` are one domain), the local
//! part case-insensitive and `+tag` subaddresses stripped, each configurable.
//! The directory then maps aliases and logins to their mailbox.

use crate::config::{IdentityConfig, Unauthenticated};
use crate::directory::Directory;
use serde::Serialize;
use std::fmt;
use std::net::IpAddr;

/// The key strikes and lockouts are counted under.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct MailboxKey {
    /// Canonical mailbox address, or `<>` for the null sender under
    /// `client-and-sender`.
    pub mailbox: String,
    /// The client address, set only under `unauthenticated =
    /// "client-and-sender"` for senders without a login.
    pub client: Option<IpAddr>,
}

impl MailboxKey {
    pub fn mailbox(mailbox: impl Into<String>) -> MailboxKey {
        MailboxKey {
            mailbox: mailbox.into(),
            client: None,
        }
    }
}

impl fmt::Display for MailboxKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.client {
            None => f.write_str(&self.mailbox),
            Some(client) => write!(f, "{} from {client}", self.mailbox),
        }
    }
}

/// The facts that identify who sent a message.
#[derive(Debug, Clone, Copy)]
pub struct SenderFacts<'a> {
    /// Envelope sender address without angle brackets; empty for `<>`.
    pub envelope: &'a str,
    /// SASL login, when the client authenticated.
    pub login: Option<&'a str>,
    pub client: IpAddr,
}

/// Who a message is attributed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribution {
    /// Key whose lockout refuses this sender; `None` when the message
    /// belongs to no mailbox (a null sender without login).
    pub block_key: Option<MailboxKey>,
    /// Key a bad message counts against; `None` when it is not counted.
    pub strike_key: Option<MailboxKey>,
    /// Why the message is not counted, when it is not.
    pub uncounted_reason: Option<&'static str>,
}

/// Returns the canonical form of an address under `config`.
///
/// The domain is lower-cased and converted to IDNA A-labels; a domain that
/// is not valid IDNA is kept lower-cased as it is. An address literal such
/// as `[192.0.2.1]` is kept as written. An address without `@` is treated
/// as a bare local part.
pub fn canonical_address(address: &str, config: &IdentityConfig) -> String {
    let address = address.trim();
    let (local, domain) = match address.rsplit_once('@') {
        Some((local, domain)) => (local, Some(domain)),
        None => (address, None),
    };

    let mut local = local.to_string();
    if config.strip_subaddress
        && let Some(plus) = local.find('+')
        && plus > 0
        && !local.starts_with('"')
    {
        local.truncate(plus);
    }
    if !config.case_sensitive_local_part {
        local = local.to_lowercase();
    }

    match domain {
        None => local,
        Some(domain) => format!("{local}@{}", canonical_domain(domain)),
    }
}

/// Returns a domain lower-cased in IDNA A-label form, without a trailing dot.
pub fn canonical_domain(domain: &str) -> String {
    let domain = domain.trim_end_matches('.');
    if domain.starts_with('[') {
        return domain.to_ascii_lowercase();
    }
    match idna::domain_to_ascii(domain) {
        Ok(ascii) if !ascii.is_empty() => ascii,
        _ => domain.to_lowercase(),
    }
}

/// Maps a login or an envelope sender to the mailbox it belongs to.
pub fn attribute(
    facts: SenderFacts<'_>,
    config: &IdentityConfig,
    directory: &Directory,
) -> Attribution {
    if let Some(login) = facts.login.filter(|login| !login.is_empty()) {
        let key = MailboxKey::mailbox(mailbox_of_login(login, config, directory));
        return Attribution {
            block_key: Some(key.clone()),
            strike_key: Some(key),
            uncounted_reason: None,
        };
    }

    let envelope_mailbox = (!facts.envelope.is_empty())
        .then(|| directory.mailbox_of_address(&canonical_address(facts.envelope, config)));
    match config.unauthenticated {
        Unauthenticated::Sender => {
            let key = envelope_mailbox.map(MailboxKey::mailbox);
            Attribution {
                uncounted_reason: key
                    .is_none()
                    .then_some("null sender without a login belongs to no mailbox"),
                block_key: key.clone(),
                strike_key: key,
            }
        }
        Unauthenticated::ClientAndSender => {
            let key = MailboxKey {
                mailbox: envelope_mailbox.unwrap_or_else(|| "<>".to_string()),
                client: Some(facts.client),
            };
            Attribution {
                block_key: Some(key.clone()),
                strike_key: Some(key),
                uncounted_reason: None,
            }
        }
        Unauthenticated::Ignore => Attribution {
            // A blocked mailbox stays blocked for unauthenticated use of its
            // address too, but only logged-in senders add strikes.
            block_key: envelope_mailbox.map(MailboxKey::mailbox),
            strike_key: None,
            uncounted_reason: Some(
                "sender did not log in and [identity] unauthenticated = \"ignore\"",
            ),
        },
    }
}

fn mailbox_of_login(login: &str, config: &IdentityConfig, directory: &Directory) -> String {
    if let Some(mailbox) = directory.mailbox_of_login(login) {
        return mailbox.to_string();
    }
    if login.contains('@') {
        directory.mailbox_of_address(&canonical_address(login, config))
    } else {
        login.to_lowercase()
    }
}

/// Turns a mailbox as an operator may type it (`<Alice@Example.org>`,
/// `"alice"@example.org`, `alice+tag@example.org`) into its mailbox key.
///
/// # Errors
/// When the text contains no valid address and is no login in the directory.
pub fn mailbox_from_input(
    text: &str,
    config: &IdentityConfig,
    directory: &Directory,
) -> Result<String, String> {
    let trimmed = text.trim();
    let bare = trimmed
        .strip_prefix('<')
        .and_then(|inner| inner.strip_suffix('>'))
        .unwrap_or(trimmed);
    let unquoted = match bare.rsplit_once('@') {
        Some((local, domain))
            if local.len() >= 2 && local.starts_with('"') && local.ends_with('"') =>
        {
            let mut unescaped = String::new();
            let mut characters = local[1..local.len() - 1].chars();
            while let Some(character) = characters.next() {
                // A quoted-pair stands for the character after the backslash.
                let literal = if character == '\\' {
                    characters.next()
                } else {
                    Some(character)
                };
                unescaped.extend(literal);
            }
            format!("{unescaped}@{domain}")
        }
        _ => bare.to_string(),
    };
    let invalid = || {
        format!(
            "invalid mailbox {text:?}: give an address such as alice@example.org, or a login \
             listed in the directory file"
        )
    };
    if !bare.contains('@') {
        // A SASL login stands for the mailbox the directory maps it to.
        return directory
            .mailbox_of_login(bare)
            .map(str::to_string)
            .ok_or_else(invalid);
    }
    let quoted_local = bare.starts_with('"');
    let (local, domain) = unquoted.rsplit_once('@').ok_or_else(invalid)?;
    let domain_valid = !domain.is_empty()
        && (domain.starts_with('[')
            || !domain.chars().any(|c| {
                c.is_whitespace()
                    || matches!(
                        c,
                        '/' | '\\' | '<' | '>' | '(' | ')' | ',' | ';' | ':' | '"' | '[' | ']'
                    )
            }));
    let local_valid = !local.is_empty() && (quoted_local || !local.contains('@'));
    if !domain_valid || !local_valid || unquoted.chars().any(char::is_control) {
        return Err(invalid());
    }
    let canonical = canonical_address(&unquoted, config);
    Ok(directory.mailbox_of_address(&canonical))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::Directory;

    #[test]
    fn mailbox_input_rejects_typos() {
        let directory = Directory::parse(
            "[[mailbox]]\naddress = \"alice@example.org\"\nlogins = [\"alice\"]\n",
        )
        .expect("directory");
        let config = IdentityConfig::default();
        for text in [
            "alice@@example.org",
            "/",
            "a\u{0}b@example.org",
            "alice@example.org/unblock",
            "@",
            "",
            "<>",
            "bob",
        ] {
            assert!(
                mailbox_from_input(text, &config, &directory).is_err(),
                "{text:?} was accepted"
            );
        }
        for (text, mailbox) in [
            ("Alice@Example.org", "alice@example.org"),
            ("<alice+news@example.org>", "alice@example.org"),
            ("alice", "alice@example.org"),
            ("\"bob\"@example.org", "bob@example.org"),
        ] {
            assert_eq!(
                mailbox_from_input(text, &config, &directory).as_deref(),
                Ok(mailbox),
                "{text:?}"
            );
        }
    }

    fn config() -> IdentityConfig {
        IdentityConfig::default()
    }

    #[test]
    fn canonical_forms() {
        let cases = [
            ("Alice@Example.ORG", "alice@example.org"),
            ("alice+news@example.org", "alice@example.org"),
            ("alice@example.org.", "alice@example.org"),
            ("alice@bücher.example", "alice@xn--bcher-kva.example"),
            ("alice@XN--BCHER-KVA.example", "alice@xn--bcher-kva.example"),
            ("+tag@example.org", "+tag@example.org"),
            ("postmaster", "postmaster"),
            ("bob@[192.0.2.1]", "bob@[192.0.2.1]"),
        ];
        for (input, expected) in cases {
            assert_eq!(
                canonical_address(input, &config()),
                expected,
                "input {input}"
            );
        }
    }

    #[test]
    fn canonical_respects_options() {
        let strict = IdentityConfig {
            strip_subaddress: false,
            case_sensitive_local_part: true,
            ..config()
        };
        assert_eq!(
            canonical_address("Alice+x@Example.org", &strict),
            "Alice+x@example.org"
        );
    }

    #[test]
    fn login_wins_over_envelope() {
        let directory = Directory::parse(
            r#"
            [[mailbox]]
            address = "alice@example.org"
            logins = ["alice"]
            "#,
        )
        .expect("valid directory");
        let facts = SenderFacts {
            envelope: "someone@else.example",
            login: Some("ALICE"),
            client: "192.0.2.1".parse().expect("address"),
        };
        let attribution = attribute(facts, &config(), &directory);
        assert_eq!(
            attribution.strike_key,
            Some(MailboxKey::mailbox("alice@example.org"))
        );
    }

    #[test]
    fn null_sender_unattributed() {
        let facts = SenderFacts {
            envelope: "",
            login: None,
            client: "192.0.2.1".parse().expect("address"),
        };
        let attribution = attribute(facts, &config(), &Directory::default());
        assert_eq!(attribution.strike_key, None);
        assert_eq!(attribution.block_key, None);
        assert!(attribution.uncounted_reason.is_some());
    }

    #[test]
    fn client_and_sender_pairs() {
        let config = IdentityConfig {
            unauthenticated: Unauthenticated::ClientAndSender,
            ..config()
        };
        let client: IpAddr = "192.0.2.7".parse().expect("address");
        let facts = SenderFacts {
            envelope: "Alice@Example.org",
            login: None,
            client,
        };
        let attribution = attribute(facts, &config, &Directory::default());
        assert_eq!(
            attribution.strike_key,
            Some(MailboxKey {
                mailbox: "alice@example.org".to_string(),
                client: Some(client)
            })
        );

        let null = SenderFacts {
            envelope: "",
            ..facts
        };
        let attribution = attribute(null, &config, &Directory::default());
        assert_eq!(
            attribution.strike_key.map(|key| key.mailbox),
            Some("<>".to_string())
        );
    }

    #[test]
    fn ignore_mode_counts_nothing_unauthenticated() {
        let config = IdentityConfig {
            unauthenticated: Unauthenticated::Ignore,
            ..config()
        };
        let facts = SenderFacts {
            envelope: "alice@example.org",
            login: None,
            client: "192.0.2.1".parse().expect("address"),
        };
        let attribution = attribute(facts, &config, &Directory::default());
        assert_eq!(attribution.strike_key, None);
        assert_eq!(
            attribution.block_key,
            Some(MailboxKey::mailbox("alice@example.org"))
        );
    }
}
