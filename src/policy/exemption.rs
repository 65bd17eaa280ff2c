//! Exemptions: senders, logins or client networks whose bad messages are
//! still rejected but never counted towards a lockout. An exemption never
//! lifts a block that is already in force.

use super::Timestamp;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// The subject an exemption matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum ExemptionKind {
    /// A mailbox, in canonical form, whether it sends with or without a
    /// login.
    Sender(String),
    /// A SASL login, compared without case.
    Login(String),
    /// Every client address inside this network.
    Network(IpNet),
}

/// One exemption with its audit facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exemption {
    pub id: i64,
    #[serde(flatten)]
    pub kind: ExemptionKind,
    pub reason: String,
    /// Name of the person who created it, as given.
    pub author: String,
    pub created: Timestamp,
    /// End of the exemption (exclusive).
    pub expires: Timestamp,
}

/// The facts of a bad message that exemptions are matched against.
#[derive(Debug, Clone, Copy)]
pub struct ExemptionFacts<'a> {
    /// The mailbox the message counts against, canonical.
    pub mailbox: &'a str,
    pub login: Option<&'a str>,
    pub client: IpAddr,
}

impl Exemption {
    /// Returns whether this exemption covers a message with `facts` at
    /// `now`.
    pub fn covers(&self, facts: &ExemptionFacts<'_>, now: Timestamp) -> bool {
        if now >= self.expires {
            return false;
        }
        match &self.kind {
            ExemptionKind::Sender(mailbox) => mailbox == facts.mailbox,
            ExemptionKind::Login(login) => facts
                .login
                .is_some_and(|given| given.eq_ignore_ascii_case(login)),
            ExemptionKind::Network(network) => network.contains(&facts.client),
        }
    }
}

/// Returns the first exemption that covers `facts` at `now`.
pub fn find<'e>(
    exemptions: &'e [Exemption],
    facts: &ExemptionFacts<'_>,
    now: Timestamp,
) -> Option<&'e Exemption> {
    exemptions
        .iter()
        .find(|exemption| exemption.covers(facts, now))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exemption(kind: ExemptionKind) -> Exemption {
        Exemption {
            id: 1,
            kind,
            reason: "newsletter migration".to_string(),
            author: "jdoe".to_string(),
            created: Timestamp(0),
            expires: Timestamp(10_000),
        }
    }

    fn facts(login: Option<&'static str>) -> ExemptionFacts<'static> {
        ExemptionFacts {
            mailbox: "news@example.org",
            login,
            client: "192.0.2.10".parse().expect("address"),
        }
    }

    #[test]
    fn sender_matches_mailbox() {
        let sender = exemption(ExemptionKind::Sender("news@example.org".into()));
        assert!(sender.covers(&facts(None), Timestamp(5)));
        let other = exemption(ExemptionKind::Sender("ceo@example.org".into()));
        assert!(!other.covers(&facts(None), Timestamp(5)));
    }

    #[test]
    fn login_matches_without_case() {
        let login = exemption(ExemptionKind::Login("News".into()));
        assert!(login.covers(&facts(Some("news")), Timestamp(5)));
        assert!(!login.covers(&facts(None), Timestamp(5)));
    }

    #[test]
    fn network_matches_client() {
        let inside = exemption(ExemptionKind::Network("192.0.2.0/24".parse().expect("net")));
        assert!(inside.covers(&facts(None), Timestamp(5)));
        let outside = exemption(ExemptionKind::Network(
            "198.51.100.0/24".parse().expect("net"),
        ));
        assert!(!outside.covers(&facts(None), Timestamp(5)));
    }

    #[test]
    fn expired_exemption_covers_nothing() {
        let sender = exemption(ExemptionKind::Sender("news@example.org".into()));
        assert!(sender.covers(&facts(None), Timestamp(9_999)));
        assert!(!sender.covers(&facts(None), Timestamp(10_000)));
    }

    #[test]
    fn find_returns_first_match() {
        let list = vec![
            exemption(ExemptionKind::Login("other".into())),
            exemption(ExemptionKind::Network("192.0.2.0/24".parse().expect("net"))),
        ];
        let found = find(&list, &facts(None), Timestamp(5)).expect("a match");
        assert!(matches!(found.kind, ExemptionKind::Network(_)));
    }
}
