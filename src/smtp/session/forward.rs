//! XFORWARD and XCLIENT: the attributes a trusted peer (Postfix as
//! `smtpd_proxy_filter` or `content_filter`, a submission proxy such as
//! nginx's mail proxy) passes on about the real client.
//!
//! Both carry `NAME=VALUE` pairs with xtext-encoded values (RFC 3461:
//! `+XX` is the byte with hex code XX). `[UNAVAILABLE]` and `[TEMPUNAVAIL]`
//! mean the peer does not know the value.

use super::{Session, State};
use crate::reply::Reply;
use std::net::IpAddr;

/// Attributes of the real client, as a trusted peer passed them on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Forwarded {
    pub client: Option<IpAddr>,
    pub login: Option<String>,
    pub helo: Option<String>,
    /// The client's host name, from `NAME`.
    pub name: Option<String>,
}

/// Decodes xtext: `+XX` becomes the byte 0xXX.
fn decode_xtext(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'+' {
            let hex = std::str::from_utf8(bytes.get(index + 1..index + 3)?).ok()?;
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
        }
    }
    let decoded = String::from_utf8(decoded).ok()?;
    // A decoded value must stay one printable token: a CR, LF or NUL in a
    // login or host name could smuggle text into logs or replies.
    (!decoded.chars().any(char::is_control)).then_some(decoded)
}

/// Parses the `NAME=VALUE` attributes after XFORWARD or XCLIENT into
/// `forwarded`, or returns what is wrong with them.
fn parse_attributes(arguments: &str, forwarded: &mut Forwarded) -> Result<(), String> {
    if arguments.trim().is_empty() {
        return Err("no attributes given".to_string());
    }
    for attribute in arguments.split_ascii_whitespace() {
        let (name, value) = attribute
            .split_once('=')
            .ok_or_else(|| format!("attribute {attribute:?} is not NAME=VALUE"))?;
        let value = decode_xtext(value).ok_or_else(|| format!("invalid xtext in {name}"))?;
        let known = !matches!(value.as_str(), "[UNAVAILABLE]" | "[TEMPUNAVAIL]");
        match name.to_ascii_uppercase().as_str() {
            "ADDR" => {
                forwarded.client = if known {
                    let address = value.strip_prefix("IPV6:").unwrap_or(&value);
                    Some(
                        address
                            .parse::<IpAddr>()
                            .map_err(|_| format!("ADDR {value:?} is not an IP address"))?
                            .to_canonical(),
                    )
                } else {
                    None
                };
            }
            "LOGIN" => forwarded.login = known.then_some(value).filter(|login| !login.is_empty()),
            "HELO" => forwarded.helo = known.then_some(value),
            "NAME" => forwarded.name = known.then_some(value),
            // PORT, PROTO, IDENT, SOURCE, DESTADDR, DESTPORT carry nothing
            // the policy or the scan engines use.
            "PORT" | "PROTO" | "IDENT" | "SOURCE" | "DESTADDR" | "DESTPORT" => {}
            _ => return Err(format!("unknown attribute {name}")),
        }
    }
    Ok(())
}

/// Whether a command line is XFORWARD or XCLIENT; returns the verb and the
/// arguments.
pub(super) fn split_forward_command(line: &[u8]) -> Option<(&'static str, String)> {
    let text = std::str::from_utf8(line).ok()?;
    let (verb, arguments) = text.split_once(' ').unwrap_or((text, ""));
    let verb = if verb.eq_ignore_ascii_case("XFORWARD") {
        "XFORWARD"
    } else if verb.eq_ignore_ascii_case("XCLIENT") {
        "XCLIENT"
    } else {
        return None;
    };
    Some((verb, arguments.to_string()))
}

impl Session {
    /// Returns whether the peer may use XFORWARD and XCLIENT.
    pub(super) fn is_forwarding_peer(&self) -> bool {
        let peer = self.peer.ip().to_canonical();
        self.shared
            .guard
            .runtime()
            .config
            .smtp
            .xclient_peers
            .iter()
            .any(|network| network.contains(&peer))
    }

    /// Runs XFORWARD or XCLIENT from a trusted peer.
    ///
    /// XFORWARD updates the attributes for the following transactions and
    /// answers `250`. XCLIENT replaces the session's client as if it had
    /// connected anew: the session resets and answers with a greeting, so
    /// the peer says EHLO again (Postfix's XCLIENT rules). Returns false
    /// when the command was refused.
    pub(super) async fn forward(&mut self, verb: &'static str, arguments: &str) -> bool {
        if !self.is_forwarding_peer() {
            tracing::info!(
                verb,
                "XFORWARD or XCLIENT from a peer not in xclient_peers refused"
            );
            self.queue(&Reply::new(
                550,
                "5.7.0",
                format!("{verb} is not allowed from this address"),
            ));
            return false;
        }
        if matches!(self.state, State::Mail | State::Rcpt) {
            self.queue(&Reply::bad_sequence(&format!(
                "{verb} is not allowed inside a transaction"
            )));
            return false;
        }
        let mut forwarded = self.forwarded.clone();
        if verb == "XCLIENT" {
            forwarded = Forwarded::default();
        }
        if let Err(problem) = parse_attributes(arguments, &mut forwarded) {
            self.queue(&Reply::new(
                501,
                "5.5.4",
                format!("Invalid {verb}: {problem}"),
            ));
            return false;
        }
        tracing::info!(verb, client = ?forwarded.client, login = ?forwarded.login,
            helo = ?forwarded.helo, name = ?forwarded.name,
            "client attributes forwarded by a trusted peer");
        self.forwarded = forwarded;
        if verb == "XCLIENT" {
            self.reset_transaction().await;
            self.state = State::Connected;
            let hostname = self.shared.guard.runtime().config.smtp.hostname.clone();
            self.queue(&Reply::greeting(&hostname));
        } else {
            self.queue(&Reply::ok("Ok"));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xtext_decoding() {
        assert_eq!(decode_xtext("alice+2Bnews").as_deref(), Some("alice+news"));
        assert_eq!(decode_xtext("plain").as_deref(), Some("plain"));
        assert_eq!(decode_xtext("bad+2"), None);
        assert_eq!(decode_xtext("bad+ZZ"), None);
        assert_eq!(decode_xtext("line+0Dbreak"), None);
    }

    #[test]
    fn attributes_parsed() {
        let mut forwarded = Forwarded::default();
        parse_attributes(
            "NAME=client.example ADDR=192.0.2.7 PORT=4321 PROTO=ESMTP HELO=client.example SOURCE=REMOTE",
            &mut forwarded,
        )
        .expect("valid");
        assert_eq!(
            forwarded.client,
            Some("192.0.2.7".parse().expect("address"))
        );
        assert_eq!(forwarded.helo.as_deref(), Some("client.example"));
        assert_eq!(forwarded.name.as_deref(), Some("client.example"));

        parse_attributes("NAME=[UNAVAILABLE]", &mut forwarded).expect("valid");
        assert_eq!(forwarded.name, None);

        parse_attributes("LOGIN=alice ADDR=IPV6:2001:db8::1", &mut forwarded).expect("valid");
        assert_eq!(forwarded.login.as_deref(), Some("alice"));
        assert_eq!(
            forwarded.client,
            Some("2001:db8::1".parse().expect("address"))
        );

        parse_attributes("LOGIN=[UNAVAILABLE]", &mut forwarded).expect("valid");
        assert_eq!(forwarded.login, None);
    }

    #[test]
    fn bad_attributes_rejected() {
        let mut forwarded = Forwarded::default();
        assert!(parse_attributes("", &mut forwarded).is_err());
        assert!(parse_attributes("ADDR", &mut forwarded).is_err());
        assert!(parse_attributes("ADDR=not-an-ip", &mut forwarded).is_err());
        assert!(parse_attributes("COLOR=blue", &mut forwarded).is_err());
    }

    #[test]
    fn forward_commands_recognised() {
        assert_eq!(
            split_forward_command(b"xforward ADDR=1.2.3.4"),
            Some(("XFORWARD", "ADDR=1.2.3.4".to_string()))
        );
        assert_eq!(
            split_forward_command(b"XCLIENT"),
            Some(("XCLIENT", String::new()))
        );
        assert_eq!(split_forward_command(b"MAIL FROM:<a@b>"), None);
    }
}
