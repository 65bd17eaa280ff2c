//! The pure parts of the milter front-end: the message rebuilt from its
//! milter packets, the envelope sender taken from the MAIL packet, and
//! replies in the form Postfix accepts from a milter.

use crate::reply::Reply;

/// A message rebuilt from the HEADER, EOH and BODY packets, in the form the
/// SMTP proxy hands to the Guard: headers, an empty line, then the body,
/// with CRLF line endings.
///
/// Postfix 3.7 sends each header as name and value (with the protocol
/// option `SMFIP_HDR_LEADSPC`, the value keeps its leading space) and the
/// lines of a folded header separated by a bare LF. It drops spaces and
/// tabs between a header name and its colon, so such a header comes back
/// without them. Body chunks arrive with CRLF line endings and may contain
/// NUL bytes; they are kept as they are.
#[derive(Debug)]
pub struct MessageBuffer {
    bytes: Vec<u8>,
    /// Maximum size in bytes; a larger message is dropped from memory.
    limit: u64,
    exceeded: bool,
}

impl MessageBuffer {
    pub fn new(limit: u64) -> MessageBuffer {
        MessageBuffer {
            bytes: Vec::new(),
            limit,
            exceeded: false,
        }
    }

    /// Appends `name:value` and CRLF, turning each bare LF of a folded
    /// value into CRLF.
    pub fn push_header(&mut self, name: &[u8], value: &[u8]) {
        let mut line = Vec::with_capacity(name.len() + value.len() + 4);
        line.extend_from_slice(name);
        line.push(b':');
        let mut previous = None;
        for &byte in value {
            if byte == b'\n' && previous != Some(b'\r') {
                line.push(b'\r');
            }
            line.push(byte);
            previous = Some(byte);
        }
        line.extend_from_slice(b"\r\n");
        self.append(&line);
    }

    /// Appends the empty line that ends the headers.
    pub fn end_headers(&mut self) {
        self.append(b"\r\n");
    }

    pub fn push_body(&mut self, chunk: &[u8]) {
        self.append(chunk);
    }

    /// Returns whether the message grew past the limit; its content is
    /// gone then.
    pub fn exceeded(&self) -> bool {
        self.exceeded
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn append(&mut self, data: &[u8]) {
        if self.exceeded {
            return;
        }
        let size = self.bytes.len() as u64 + data.len() as u64;
        if size > self.limit {
            self.exceeded = true;
            self.bytes = Vec::new();
            return;
        }
        self.bytes.extend_from_slice(data);
    }
}

/// The envelope sender from the first argument of a MAIL packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeSender {
    /// The path with angle brackets, as the client wrote it.
    pub path: String,
    /// The address without brackets, source route or quotes; empty for `<>`.
    pub address: String,
}

/// Parses the sender argument of a MAIL packet. Postfix sends it in angle
/// brackets, with a local part that needs them in double quotes. The input
/// was already checked by the MTA, so a form this does not understand is
/// kept as it is rather than refused.
pub fn parse_sender(argument: &str) -> EnvelopeSender {
    let trimmed = argument.trim();
    let inner = trimmed.strip_prefix('<').unwrap_or(trimmed);
    let inner = inner.strip_suffix('>').unwrap_or(inner);
    let path = format!("<{inner}>");

    // A source route (`@relay1,@relay2:user@example.org`) is obsolete and
    // names relays, not the sender.
    let mailbox = match inner.strip_prefix('@') {
        Some(_) => inner.split_once(':').map_or(inner, |(_, mailbox)| mailbox),
        None => inner,
    };
    let address = unquote_local_part(mailbox).unwrap_or_else(|| mailbox.to_string());
    EnvelopeSender { path, address }
}

/// Returns `mailbox` with a quoted local part unquoted (`"a b"@x` becomes
/// `a b@x`), or `None` when its local part is not quoted or the quotes
/// are malformed.
fn unquote_local_part(mailbox: &str) -> Option<String> {
    let quoted = mailbox.strip_prefix('"')?;
    let mut local_part = String::new();
    let mut chars = quoted.char_indices();
    while let Some((index, ch)) = chars.next() {
        match ch {
            '"' => {
                let domain = &quoted[index + 1..];
                return domain
                    .starts_with('@')
                    .then(|| format!("{local_part}{domain}"));
            }
            '\\' => local_part.push(chars.next()?.1),
            _ => local_part.push(ch),
        }
    }
    None
}

/// Returns the declared message size from the ESMTP arguments of MAIL.
pub fn declared_size(arguments: &[String]) -> Option<u64> {
    arguments.iter().find_map(|argument| {
        let (keyword, value) = argument.split_once('=')?;
        keyword
            .eq_ignore_ascii_case("SIZE")
            .then(|| value.parse().ok())
            .flatten()
    })
}

/// Splits a header line `Name: value` into the name and the value with its
/// leading space, as an insert-header request carries them when
/// `SMFIP_HDR_LEADSPC` is in force.
pub fn split_header(header: &str) -> Option<(&str, &str)> {
    let (name, value) = header.split_once(':')?;
    (!name.is_empty()).then_some((name, value))
}

/// A reply in the parts that a milter sends with SMFIR_REPLYCODE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MilterReply {
    /// `true` for a 5xx reply (reject), `false` for a 4xx one (tempfail).
    pub permanent: bool,
    pub code: String,
    pub enhanced: String,
    pub lines: Vec<String>,
}

/// Converts a 4xx or 5xx reply for Postfix's milter client. Postfix 3.7
/// treats a reply whose enhanced status code does not start with the reply
/// code's digit as malformed and applies `milter_default_action` instead,
/// so such a code (or a missing one) becomes `4.0.0` or `5.0.0`. Postfix
/// also turns `%%` into `%` and drops a single `%`, so each `%` is doubled.
/// A reply outside 4xx and 5xx is not a refusal and returns `None`.
pub fn milter_reply(reply: &Reply) -> Option<MilterReply> {
    let class = reply.code / 100;
    if class != 4 && class != 5 {
        return None;
    }
    let class_digit = char::from(b'0' + class as u8);
    let enhanced = reply
        .enhanced
        .clone()
        .filter(|enhanced| enhanced.starts_with(class_digit))
        .unwrap_or_else(|| format!("{class}.0.0"));
    let lines = reply
        .lines
        .iter()
        .map(|line| line.replace('%', "%%"))
        .collect();
    Some(MilterReply {
        permanent: class == 5,
        code: reply.code.to_string(),
        enhanced,
        lines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_rebuilt_with_crlf() {
        let mut message = MessageBuffer::new(1000);
        message.push_header(b"Subject", b" hello");
        message.push_header(b"X-Folded", b" first\n\tsecond");
        message.push_header(b"X-Empty", b"");
        message.end_headers();
        message.push_body(b"line one\r\n");
        message.push_body(b"line two\r\n");
        assert_eq!(
            message.as_bytes(),
            b"Subject: hello\r\nX-Folded: first\r\n\tsecond\r\nX-Empty:\r\n\r\nline one\r\nline two\r\n"
        );
        assert!(!message.exceeded());
    }

    #[test]
    fn header_crlf_kept() {
        let mut message = MessageBuffer::new(1000);
        message.push_header(b"X-Folded", b" a\r\n b");
        assert_eq!(message.as_bytes(), b"X-Folded: a\r\n b\r\n");
    }

    #[test]
    fn body_nul_bytes_kept() {
        let mut message = MessageBuffer::new(1000);
        message.end_headers();
        message.push_body(b"a\0b\r\n\0");
        assert_eq!(message.as_bytes(), b"\r\na\0b\r\n\0");
    }

    #[test]
    fn message_over_limit_dropped() {
        let mut message = MessageBuffer::new(10);
        message.push_body(b"0123456789");
        assert!(!message.exceeded());
        message.push_body(b"x");
        assert!(message.exceeded());
        assert!(message.as_bytes().is_empty());
        message.push_body(b"y");
        assert!(message.as_bytes().is_empty());
        assert_eq!(message.limit(), 10);
    }

    #[test]
    fn sender_forms() {
        let cases = [
            (
                "<alice@example.org>",
                "<alice@example.org>",
                "alice@example.org",
            ),
            ("<>", "<>", ""),
            (
                "alice@example.org",
                "<alice@example.org>",
                "alice@example.org",
            ),
            (
                "<@relay.example,@other.example:bob@example.org>",
                "<@relay.example,@other.example:bob@example.org>",
                "bob@example.org",
            ),
            (
                "<\"john doe\"@example.org>",
                "<\"john doe\"@example.org>",
                "john doe@example.org",
            ),
            (
                "<\"a\\\"b\"@example.org>",
                "<\"a\\\"b\"@example.org>",
                "a\"b@example.org",
            ),
            (
                "<\"unterminated@example.org>",
                "<\"unterminated@example.org>",
                "\"unterminated@example.org",
            ),
        ];
        for (argument, path, address) in cases {
            let sender = parse_sender(argument);
            assert_eq!(sender.path, path, "path of {argument}");
            assert_eq!(sender.address, address, "address of {argument}");
        }
    }

    #[test]
    fn size_argument_found() {
        let arguments = ["BODY=8BITMIME".to_string(), "size=1234".to_string()];
        assert_eq!(declared_size(&arguments), Some(1234));
        assert_eq!(declared_size(&["SIZE=x".to_string()]), None);
        assert_eq!(declared_size(&[]), None);
    }

    #[test]
    fn header_split_keeps_space() {
        assert_eq!(
            split_header("X-Sendguard-Spam: Yes, spam"),
            Some(("X-Sendguard-Spam", " Yes, spam"))
        );
        assert_eq!(split_header(": value"), None);
        assert_eq!(split_header("no colon"), None);
    }

    #[test]
    fn reply_for_postfix() {
        let reply = Reply::new(550, "5.7.1", "100% spam");
        let converted = milter_reply(&reply).expect("a refusal");
        assert!(converted.permanent);
        assert_eq!(converted.code, "550");
        assert_eq!(converted.enhanced, "5.7.1");
        assert_eq!(converted.lines, vec!["100%% spam".to_string()]);

        let temporary = milter_reply(&Reply::scanner_failed("clamd")).expect("a refusal");
        assert!(!temporary.permanent);
        assert_eq!(temporary.enhanced, "4.7.1");
    }

    #[test]
    fn reply_enhanced_code_matches_class() {
        let missing = Reply {
            code: 451,
            enhanced: None,
            lines: vec!["later".into()],
        };
        assert_eq!(milter_reply(&missing).expect("refusal").enhanced, "4.0.0");
        let mismatched = Reply::new(550, "4.7.1", "no");
        assert_eq!(
            milter_reply(&mismatched).expect("refusal").enhanced,
            "5.0.0"
        );
        assert_eq!(milter_reply(&Reply::ok("fine")), None);
    }
}
