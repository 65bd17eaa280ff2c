//! Every SMTP reply sendguard writes itself, named by outcome, each with its
//! enhanced status code (RFC 3463).

use crate::identity::MailboxKey;
use crate::policy::Lockout;
use crate::scan::Verdict;
use std::fmt;

/// An SMTP reply: code, enhanced status code and one or more text lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Enhanced status code such as `5.7.1`; `None` for replies that carry
    /// none (the greeting, or an upstream reply without one).
    pub enhanced: Option<String>,
    pub lines: Vec<String>,
}

impl Reply {
    /// Builds a one-line reply; the text is made SMTP-safe.
    pub fn new(code: u16, enhanced: &str, text: impl AsRef<str>) -> Reply {
        Reply {
            code,
            enhanced: (!enhanced.is_empty()).then(|| enhanced.to_string()),
            lines: vec![sanitize(text.as_ref())],
        }
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// Encodes the reply for the wire, each line ending in CRLF.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        let lines: &[String] = if self.lines.is_empty() {
            &[String::new()]
        } else {
            &self.lines
        };
        for (index, line) in lines.iter().enumerate() {
            let separator = if index + 1 == lines.len() { ' ' } else { '-' };
            let text = match &self.enhanced {
                Some(enhanced) => format!("{}{separator}{enhanced} {line}", self.code),
                None => format!("{}{separator}{line}", self.code),
            };
            out.extend_from_slice(text.trim_end().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    /// Returns the reply as one line of text for logs and events.
    pub fn one_line(&self) -> String {
        let text = self.lines.join(" / ");
        match &self.enhanced {
            Some(enhanced) => format!("{} {enhanced} {text}", self.code),
            None => format!("{} {text}", self.code),
        }
    }

    pub fn ok(text: &str) -> Reply {
        Reply::new(250, "2.0.0", text)
    }

    pub fn greeting(hostname: &str) -> Reply {
        Reply {
            code: 220,
            enhanced: None,
            lines: vec![format!("{hostname} ESMTP sendguard")],
        }
    }

    pub fn closing(hostname: &str) -> Reply {
        Reply::new(221, "2.0.0", format!("{hostname} closing connection"))
    }

    pub fn start_data() -> Reply {
        Reply {
            code: 354,
            enhanced: None,
            lines: vec!["End data with <CR><LF>.<CR><LF>".to_string()],
        }
    }

    /// Builds the relay gate's refusal of a client on an unsafe device,
    /// with the product's event text.
    pub fn unsafe_device(text: &str) -> Reply {
        Reply::new(554, "5.7.1", text)
    }

    pub fn relay_denied(client: &str) -> Reply {
        Reply::new(
            554,
            "5.7.1",
            format!("Client {client} is not in relay_networks; relaying denied"),
        )
    }

    /// Builds the rejection of a locked-out sender, with the lockout's end
    /// time and number.
    pub fn sender_blocked(key: &MailboxKey, lockout: &Lockout) -> Reply {
        let text = match lockout.until {
            Some(until) => format!(
                "Sender {} is locked out until {} (lockout {}) after repeated spam or virus \
                 messages; have the device checked for malware and contact your mail administrator",
                key.mailbox,
                until.to_rfc3339(),
                lockout.level
            ),
            None => format!(
                "Sender {} is blocked permanently (lockout {}) after repeated spam or virus \
                 messages; contact your mail administrator, who can ask support to lift the block",
                key.mailbox, lockout.level
            ),
        };
        Reply::new(550, "5.7.1", text)
    }

    pub fn virus(verdict: &Verdict) -> Reply {
        Reply::new(
            550,
            "5.7.1",
            format!(
                "Message rejected: {} found; remove the infected content and scan the sending device",
                verdict.summary()
            ),
        )
    }

    pub fn spam(verdict: &Verdict) -> Reply {
        Reply::new(
            550,
            "5.7.1",
            format!(
                "Message rejected as {}; if it is legitimate, contact your mail administrator",
                verdict.summary()
            ),
        )
    }

    /// Builds the rejection of a message the scanner could not scan whole. The
    /// detailed reason stays in the log and the events; it names settings
    /// the client has no use for.
    pub fn unscannable() -> Reply {
        Reply::new(
            554,
            "5.7.1",
            "Message rejected because the virus scanner cannot scan it whole; send large \
             attachments another way or contact your mail administrator",
        )
    }

    /// Builds the temporary failure for a scan that `engine` could not
    /// finish.
    pub fn scanner_failed(engine: &str) -> Reply {
        let scanner = if engine == "clamd" {
            "virus scanner"
        } else {
            "spam scanner"
        };
        Reply::new(
            451,
            "4.7.1",
            format!("Message not scanned because the {scanner} is unavailable; try again later"),
        )
    }

    pub fn local_error() -> Reply {
        Reply::new(451, "4.3.0", "Local error in processing; try again later")
    }

    pub fn message_too_large(limit: u64) -> Reply {
        Reply::new(
            552,
            "5.3.4",
            format!("Message size exceeds the limit of {limit} bytes"),
        )
    }

    pub fn bare_line_ending() -> Reply {
        Reply::new(
            550,
            "5.6.0",
            "Message contains a bare CR or LF; end every line with CRLF",
        )
    }

    pub fn upstream_unavailable() -> Reply {
        Reply::new(
            451,
            "4.4.1",
            "Upstream mail server is unavailable; try again later",
        )
    }

    pub fn replay_refused() -> Reply {
        Reply::new(
            451,
            "4.4.2",
            "Upstream mail server refused the envelope on a new connection; try again later",
        )
    }

    pub fn upstream_failed() -> Reply {
        Reply::new(
            451,
            "4.4.2",
            "Connection to the upstream mail server failed; try again later",
        )
    }

    pub fn timeout(hostname: &str) -> Reply {
        Reply::new(
            421,
            "4.4.2",
            format!("{hostname} timeout exceeded; closing connection"),
        )
    }

    pub fn shutting_down(hostname: &str) -> Reply {
        Reply::new(
            421,
            "4.3.0",
            format!("{hostname} is shutting down; try again later"),
        )
    }

    pub fn line_too_long(limit: usize) -> Reply {
        Reply::new(
            500,
            "5.5.2",
            format!("Command line too long; the limit is {limit} octets"),
        )
    }

    pub fn message_line_too_long(limit: usize) -> Reply {
        Reply::new(
            550,
            "5.6.0",
            format!("Message has a line longer than {limit} octets; wrap or encode long lines"),
        )
    }

    pub fn early_talker() -> Reply {
        Reply::new(
            554,
            "5.5.1",
            "Data sent before the greeting; wait for the 220 greeting before sending",
        )
    }

    pub fn improper_pipelining() -> Reply {
        Reply::new(
            503,
            "5.5.0",
            "Improper use of SMTP command pipelining: EHLO, HELO and DATA must be the \
             last command in a group; wait for their reply",
        )
    }

    /// Builds the closing reply to a BDAT command whose size cannot be read: the
    /// chunk's end is unknown, so its octets could be taken for commands.
    pub fn bdat_unreadable(problem: &str) -> Reply {
        Reply::new(
            421,
            "4.5.0",
            format!(
                "Invalid BDAT command ({problem}); closing the connection because the chunk cannot be skipped"
            ),
        )
    }

    pub fn extension_not_offered(parameter: &str) -> Reply {
        Reply::new(
            555,
            "5.5.4",
            format!(
                "{parameter} is not offered here because the upstream server does not support it"
            ),
        )
    }

    pub fn utf8_address_without_smtputf8(role: &str) -> Reply {
        Reply::new(
            553,
            "5.6.7",
            format!(
                "The {role} address contains UTF-8; send MAIL FROM with the SMTPUTF8 parameter"
            ),
        )
    }

    pub fn too_many_recipients(limit: usize) -> Reply {
        Reply::new(
            452,
            "4.5.3",
            format!("Too many recipients; send the rest in another message (limit {limit})"),
        )
    }

    pub fn too_many_connections(scope: &str) -> Reply {
        Reply::new(
            421,
            "4.7.0",
            format!("Too many connections {scope}; try again later"),
        )
    }

    pub fn parameter_not_supported(command: &str, keyword: &str) -> Reply {
        Reply::new(
            555,
            "5.5.4",
            format!(
                "{command} parameter {keyword} is not supported here; send the command without it"
            ),
        )
    }

    pub fn tls_required() -> Reply {
        Reply::new(530, "5.7.0", "Must issue a STARTTLS command first")
    }

    pub fn too_many_errors() -> Reply {
        Reply::new(
            421,
            "4.7.0",
            "Too many invalid commands; closing connection",
        )
    }

    pub fn bad_sequence(text: &str) -> Reply {
        Reply::new(503, "5.5.1", text)
    }

    pub fn not_implemented(command: &str) -> Reply {
        Reply::new(502, "5.5.1", format!("{command} is not implemented"))
    }

    pub fn no_valid_recipients() -> Reply {
        Reply::new(554, "5.5.1", "No valid recipients")
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.one_line())
    }
}

/// Makes text safe for a reply line: printable ASCII only (anything else
/// becomes `?`), at most 400 characters.
pub fn sanitize(text: &str) -> String {
    text.chars()
        .take(400)
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiline_wire_format() {
        let reply = Reply {
            code: 250,
            enhanced: None,
            lines: vec!["first".into(), "second".into()],
        };
        assert_eq!(reply.to_wire(), b"250-first\r\n250 second\r\n");
    }

    #[test]
    fn enhanced_code_on_each_line() {
        let reply = Reply::new(550, "5.7.1", "no");
        assert_eq!(reply.to_wire(), b"550 5.7.1 no\r\n");
    }

    #[test]
    fn text_is_sanitized() {
        let reply = Reply::new(550, "5.7.1", "bad\r\n250 ok\u{7f}é");
        assert_eq!(reply.to_wire(), b"550 5.7.1 bad??250 ok??\r\n");
    }
}
