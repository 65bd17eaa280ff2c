//! Built-in spam rules: compiling `[[scan.spam.rules]]` and scoring a message
//! against them.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::collections::{BTreeSet, HashSet};
use std::ops::Range;
use std::panic::AssertUnwindSafe;

use mail_parser::decoders::html::html_to_text;
use mail_parser::{HeaderName, HeaderValue, Message, MessageParser, MimeHeaders, PartType};
use regex::Regex;

use crate::config::Problems;

use super::config::{RuleConfig, SpamConfig};
use super::default_rules;

/// The GTUBE test string (Generic Test for Unsolicited Bulk Email). A message
/// containing it is always spam while the built-in rules are enabled.
pub const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

/// Score of the GTUBE rule, far above any sensible threshold.
pub const GTUBE_SCORE: f64 = 1000.0;

/// Rule name reported for GTUBE.
pub const GTUBE_RULE: &str = "GTUBE";

/// Depth to which attachments inside attached messages (message/rfc822) are
/// listed for `attachment_type` rules.
const MAX_NESTED_MESSAGES: usize = 4;

/// Maximum number of MIME parts, counted as `--` pairs plus Content-Type
/// fields, for which the rules parse a message's structure. mail-parser
/// 0.11.9 keeps 0.25 to 1.5 KiB of heap per part, so without this limit 1 MiB
/// of empty parts took 50 MiB, measured with the heap counter in
/// tests/mime_robustness.rs. Real mail rarely has 100 parts.
const MAX_PART_MARKERS: usize = 10_000;

/// Maximum number of lines with a colon, each a possible header field, for
/// which the rules parse a message's structure. mail-parser 0.11.9 keeps 120
/// to 400 bytes of heap per header field, so without this limit 1 MiB of
/// `To:a@b` lines took 60 MiB, measured the same way.
const MAX_COLON_LINES: usize = 100_000;

/// Lines at the top of a message whose header fields are parsed when its
/// structure is not.
const FALLBACK_HEADER_LINES: usize = 1_000;

/// The rules that matched a message and their summed score.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuleHits {
    pub score: f64,
    /// Names of the matching rules, in rule order.
    pub rules: Vec<String>,
}

impl RuleHits {
    fn add(&mut self, name: &str, score: f64) {
        self.score += score;
        self.rules.push(name.to_string());
    }
}

struct Rule {
    name: String,
    score: f64,
    matcher: Matcher,
}

enum Matcher {
    /// Header name and the regex for its decoded values.
    Header {
        name: String,
        pattern: Regex,
    },
    Body(Regex),
    /// Lower-case ASCII (punycode) host names.
    UrlHost(Vec<String>),
    /// Lower-case file-name suffixes including the dot, such as ".exe".
    AttachmentType(Vec<String>),
    MinRecipients(usize),
}

/// Compiled rules, ready to score messages.
pub struct RuleSet {
    enabled: bool,
    rules: Vec<Rule>,
    parser: MessageParser,
    gtube: regex::bytes::Regex,
    url: Regex,
    /// The names Content-Type and Content-Transfer-Encoding in any case.
    content_headers: regex::bytes::Regex,
}

impl std::fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.rules.iter().map(|rule| rule.name.as_str()).collect();
        f.debug_struct("RuleSet")
            .field("enabled", &self.enabled)
            .field("rules", &names)
            .finish()
    }
}

impl RuleSet {
    /// Compiles the default rules (unless turned off) and the operator rules.
    /// An operator rule with the name of a default rule replaces it.
    pub fn build(spam: &SpamConfig) -> Result<RuleSet, Problems> {
        let mut problems = Problems::default();
        let mut rules = Vec::new();

        if spam.enabled {
            if spam.default_rules {
                let defaults = default_rules::default_rules()
                    .map_err(|message| single_problem("scan.spam.default_rules", message))?;
                let replaced: HashSet<&str> =
                    spam.rules.iter().map(|rule| rule.name.as_str()).collect();
                for rule in defaults
                    .iter()
                    .filter(|rule| !replaced.contains(rule.name.as_str()))
                {
                    let key = format!("scan.spam.default_rules.{}", rule.name);
                    if let Some(compiled) = compile_rule(rule, &key, &mut problems) {
                        rules.push(compiled);
                    }
                }
            }
            check_duplicate_names(&spam.rules, "scan.spam.rules", &mut problems);
            for (index, rule) in spam.rules.iter().enumerate() {
                let key = format!("scan.spam.rules[{index}]");
                if let Some(compiled) = compile_rule(rule, &key, &mut problems) {
                    rules.push(compiled);
                }
            }
        }

        if !spam.enabled {
            // Disabled rules are still checked, so that turning them back on
            // cannot fail at start-up.
            check_rules(&spam.rules, "scan.spam.rules", &mut problems);
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let gtube = regex::bytes::Regex::new(&regex::escape(GTUBE))
            .map_err(|error| single_problem("scan.spam", format!("GTUBE pattern: {error}")))?;
        let url = Regex::new(r#"(?i)https?://([^\s/?#<>"'\\]+)"#)
            .map_err(|error| single_problem("scan.spam", format!("URL pattern: {error}")))?;
        let content_headers = regex::bytes::Regex::new("(?i-u)content-(?:type|transfer-encoding)")
            .map_err(|error| {
                single_problem("scan.spam", format!("header name pattern: {error}"))
            })?;
        Ok(RuleSet {
            enabled: spam.enabled,
            rules,
            parser: message_parser(),
            gtube,
            url,
            content_headers,
        })
    }

    /// Number of compiled rules, GTUBE not counted.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Scores `raw` (a whole RFC 5322 message) sent to `recipients` envelope
    /// recipients. Any byte string is accepted. Text that does not parse as
    /// a message is only checked for GTUBE and the recipient count. A message
    /// whose structure is not parsed (see [`ParsedMessage`]) is scored on its
    /// top-level headers and its raw text.
    pub fn evaluate(&self, raw: &[u8], recipients: usize) -> RuleHits {
        let mut hits = RuleHits::default();
        if !self.enabled {
            return hits;
        }

        // mail-parser 0.11.9 drops the value of a last header field that has
        // no line ending, which BDAT content can lack.
        let terminated;
        let parse_input = if raw.is_empty() || raw.ends_with(b"\n") {
            raw
        } else {
            terminated = [raw, b"\r\n"].concat();
            &terminated[..]
        };
        let parsed = ParsedMessage::parse(self, parse_input);
        let facts = MessageFacts::new(&parsed, parse_input, &self.url);

        let gtube_in_body = || facts.bodies.iter().any(|body| body.contains(GTUBE));
        if self.gtube.is_match(raw) || gtube_in_body() {
            hits.add(GTUBE_RULE, GTUBE_SCORE);
        }

        for rule in &self.rules {
            if rule.matcher.matches(&facts, recipients) {
                hits.add(&rule.name, rule.score);
            }
        }
        hits
    }
}

/// The parse of a message that the rules score: its MIME structure as parsed
/// by mail-parser, or only its top-level headers when the structure cannot be
/// parsed safely.
struct ParsedMessage<'m> {
    /// The parsed message, or `None` for text without a header.
    message: Option<Message<'m>>,
    /// Whether `message` contains the whole structure. When false it contains
    /// the top-level headers at most, and the rules read the raw message as
    /// one text body and see no attachments.
    structure: bool,
}

impl<'m> ParsedMessage<'m> {
    /// Parses `raw` in full unless [`check_structure`] finds that unsafe or
    /// mail-parser panics on it. Without the structure, the top-level header
    /// fields in the first [`FALLBACK_HEADER_LINES`] lines are parsed.
    ///
    /// mail-parser 0.11.9 parses the decoded content of a base64 or
    /// quoted-printable message/* part separately. It copies the result with
    /// a recursive `Message::into_owned`, which takes 0.8 to 1.6 KiB of stack
    /// per nested message in a release build and 3.2 to 6.4 KiB in a debug
    /// build, measured by parsing 20 000 levels in threads of set stack sizes.
    /// So 2 000 nested message/rfc822 headers in one base64 part, about 80 KB,
    /// can overflow a 2 MiB thread stack and abort the process, and such
    /// messages are not parsed in full. RFC 2046 allows only 7bit, 8bit and
    /// binary for message/rfc822, so real mail rarely has them.
    ///
    /// mail-parser also checks its part stack with `debug_assert!`, which
    /// fails on some malformed nestings of multipart and message/rfc822 parts
    /// in debug builds. A panic must not end the SMTP session, so it is caught.
    fn parse(rules: &RuleSet, raw: &'m [u8]) -> ParsedMessage<'m> {
        let parser = &rules.parser;
        let skip_reason = match check_structure(raw, &rules.content_headers) {
            StructureCheck::Parse => None,
            StructureCheck::EncodedMessage => {
                Some("it has a transfer-encoded message or digest part".to_string())
            }
            StructureCheck::TooManyColonLines(lines) => Some(format!(
                "it has {lines} lines with a colon, more than {MAX_COLON_LINES}"
            )),
            StructureCheck::TooManyParts(markers) => Some(format!(
                "it has {markers} \"--\" pairs and Content-Type fields, more than {MAX_PART_MARKERS}"
            )),
        };
        if let Some(reason) = skip_reason {
            tracing::warn!(
                size = raw.len(),
                "scoring the message's top-level headers and raw text without its MIME structure because {reason}"
            );
            let head = first_lines(raw, FALLBACK_HEADER_LINES);
            return ParsedMessage {
                message: catch_parse(raw, || parser.parse_headers(head))
                    .ok()
                    .flatten(),
                structure: false,
            };
        }

        match catch_parse(raw, || parser.parse(raw)) {
            Ok(message) => ParsedMessage {
                message,
                structure: true,
            },
            Err(()) => ParsedMessage {
                message: None,
                structure: false,
            },
        }
    }
}

impl Drop for ParsedMessage<'_> {
    /// Drops the parsed tree one message at a time. A message/rfc822 part
    /// contains its message, so the derived drop recurses once per nesting
    /// level, and 50 000 nested message/rfc822 parts, about 1.5 MB, overflow a
    /// 2 MiB stack in a debug build. mail-parser parses such nesting without
    /// recursion when the parts are not transfer-encoded.
    fn drop(&mut self) {
        let mut pending: Vec<Message<'_>> = self.message.take().into_iter().collect();
        while let Some(mut message) = pending.pop() {
            for part in &mut message.parts {
                if matches!(part.body, PartType::Message(_))
                    && let PartType::Message(inner) =
                        std::mem::replace(&mut part.body, PartType::Text(Cow::Borrowed("")))
                {
                    pending.push(inner);
                }
            }
        }
    }
}

/// Runs one mail-parser call. Returns `Err` when it panicked, which is
/// logged here.
fn catch_parse<'m>(
    raw: &[u8],
    parse: impl FnOnce() -> Option<Message<'m>>,
) -> Result<Option<Message<'m>>, ()> {
    // The parser is only read, so a panic cannot leave it in a broken state.
    std::panic::catch_unwind(AssertUnwindSafe(parse)).map_err(|_| {
        tracing::warn!(
            size = raw.len(),
            "mail-parser panicked on the message; scoring its raw text without headers or structure"
        );
    })
}

/// Outcome of [`check_structure`].
#[derive(Debug, PartialEq, Eq)]
enum StructureCheck {
    Parse,
    /// mail-parser might decode a part and parse the result as a message.
    EncodedMessage,
    /// The count of lines with a colon, above [`MAX_COLON_LINES`].
    TooManyColonLines(usize),
    /// The count of part markers, above [`MAX_PART_MARKERS`].
    TooManyParts(usize),
}

/// Checks whether the structure of `raw` can be parsed safely.
/// `content_headers` finds the names Content-Type and
/// Content-Transfer-Encoding in any case.
///
/// mail-parser decodes a part and parses the result as a message when a
/// header block has a Content-Type whose media type names `message` or
/// `digest` and a Content-Transfer-Encoding other than 7bit, 8bit or binary.
/// In a message that names `digest`, such an encoding anywhere is enough,
/// because the parts of a multipart/digest are messages by default. The first
/// such part is never inside encoded content, so its header block is a run of
/// non-empty lines in `raw`.
///
/// Every part that mail-parser creates starts after a `--`, even one in the
/// middle of a line, or is a message named by a Content-Type field, so those
/// two counts bound the number of parts. Every header field starts with a
/// line that contains a colon.
///
/// The check errs towards skipping the structure. Names count anywhere in a
/// header field, and values are compared with comments, quotes, spaces and
/// folding removed but encoded words left encoded.
fn check_structure(raw: &[u8], content_headers: &regex::bytes::Regex) -> StructureCheck {
    let colon_lines = raw
        .split(|&byte| byte == b'\n')
        .filter(|line| line.contains(&b':'))
        .count();
    if colon_lines > MAX_COLON_LINES {
        return StructureCheck::TooManyColonLines(colon_lines);
    }

    let mut names = content_headers.find_iter(raw).peekable();
    if names.peek().is_none() {
        // Without a Content-Type there is one part.
        return StructureCheck::Parse;
    }

    let mut markers = count_double_dashes(raw);
    let mut names_digest = false;
    let mut any_encoding = false;
    let mut block_names_message = false;
    let mut block_encoding = false;
    for field in header_fields(raw) {
        if field.is_empty() {
            if block_names_message && block_encoding {
                return StructureCheck::EncodedMessage;
            }
            block_names_message = false;
            block_encoding = false;
            continue;
        }

        // Only the first of each name in a field counts, which keeps the
        // check linear in the length of `raw`.
        let mut content_type = None;
        let mut encoding = None;
        while let Some(name) = names.next_if(|name| name.start() < field.end) {
            let value = &raw[name.end()..field.end];
            if name.len() == "content-type".len() {
                content_type = content_type.or(Some(value));
            } else {
                encoding = encoding.or(Some(value));
            }
        }
        if let Some(value) = content_type {
            markers += 1;
            // The media type ends at the first ';', where the parameters start.
            let value = normalize_value(value);
            let media_type = value.split(|&byte| byte == b';').next().unwrap_or_default();
            let digest = contains(media_type, b"digest");
            names_digest |= digest;
            block_names_message |= digest || contains(media_type, b"message");
        }
        if let Some(value) = encoding {
            let value = normalize_value(value);
            let identity = matches!(&value[..], b"" | b"7bit" | b"8bit" | b"binary");
            block_encoding |= !identity;
            any_encoding |= !identity;
        }
    }

    if (block_names_message && block_encoding) || (names_digest && any_encoding) {
        StructureCheck::EncodedMessage
    } else if markers > MAX_PART_MARKERS {
        StructureCheck::TooManyParts(markers)
    } else {
        StructureCheck::Parse
    }
}

/// Splits `raw` into header fields: each line with the lines after it that
/// start with a space or a tab. A line ends at LF, and the range of a field
/// leaves out its final LF and one CR before that LF. An empty range stands
/// for an empty line.
fn header_fields(raw: &[u8]) -> impl Iterator<Item = Range<usize>> + '_ {
    let line_end = |start: usize| {
        raw[start..]
            .iter()
            .position(|&byte| byte == b'\n')
            .map_or(raw.len(), |offset| start + offset)
    };
    let mut start = 0;
    std::iter::from_fn(move || {
        if start > raw.len() {
            return None;
        }
        let mut end = line_end(start);
        while raw
            .get(end + 1)
            .is_some_and(|&byte| byte == b' ' || byte == b'\t')
        {
            end = line_end(end + 1);
        }
        let field_end = if end > start && raw[end - 1] == b'\r' {
            end - 1
        } else {
            end
        };
        let field = start..field_end;
        start = end + 1;
        Some(field)
    })
}

/// Returns `raw` up to and including its `count`th LF, or all of it.
fn first_lines(raw: &[u8], count: usize) -> &[u8] {
    let end = raw
        .iter()
        .enumerate()
        .filter(|&(_, &byte)| byte == b'\n')
        .nth(count.saturating_sub(1))
        .map_or(raw.len(), |(index, _)| index + 1);
    &raw[..end]
}

/// Counts the non-overlapping occurrences of `--` in `raw`.
fn count_double_dashes(raw: &[u8]) -> usize {
    let mut count = 0;
    let mut rest = raw;
    while let Some(dash) = rest.iter().position(|&byte| byte == b'-') {
        if rest.get(dash + 1) == Some(&b'-') {
            count += 1;
            rest = &rest[dash + 2..];
        } else {
            rest = &rest[dash + 1..];
        }
    }
    count
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Lower-cases a header value and removes a leading colon, white space, line
/// breaks, quotes, backslashes and parenthesized comments from it.
fn normalize_value(value: &[u8]) -> Vec<u8> {
    let mut normalized = Vec::with_capacity(value.len());
    let mut comment_depth = 0usize;
    for &byte in value.strip_prefix(b":").unwrap_or(value) {
        match byte {
            b'(' => comment_depth += 1,
            b')' => comment_depth = comment_depth.saturating_sub(1),
            _ if comment_depth > 0 => {}
            b' ' | b'\t' | b'\r' | b'\n' | b'"' | b'\\' => {}
            _ => normalized.push(byte.to_ascii_lowercase()),
        }
    }
    normalized
}

fn single_problem(key: &str, message: impl Into<String>) -> Problems {
    let mut problems = Problems::default();
    problems.push(key, message);
    problems
}

/// Parses the headers that rules look at into decoded values: RFC 2047
/// encoded words in unstructured headers (Subject, and any header that
/// mail-parser has no parser for) are decoded.
fn message_parser() -> MessageParser {
    MessageParser::new()
        .with_mime_headers()
        .with_date_headers()
        .with_address_headers()
        .with_message_ids()
        .header_text(HeaderName::Subject)
        .header_text(HeaderName::Comments)
        .header_received(HeaderName::Received)
        .default_header_text()
}

impl Matcher {
    fn matches(&self, facts: &MessageFacts<'_, '_>, recipients: usize) -> bool {
        match self {
            Matcher::Header { name, pattern } => facts.header_matches(name, pattern),
            Matcher::Body(pattern) => facts.bodies.iter().any(|body| pattern.is_match(body)),
            Matcher::UrlHost(hosts) => facts
                .url_hosts()
                .iter()
                .any(|host| hosts.iter().any(|listed| host_is_within(host, listed))),
            Matcher::AttachmentType(suffixes) => facts.attachment_names().iter().any(|name| {
                suffixes
                    .iter()
                    .any(|suffix| name.ends_with(suffix.as_str()))
            }),
            Matcher::MinRecipients(minimum) => recipients >= *minimum,
        }
    }
}

/// Checks whether `host` equals `listed` or is a subdomain of it.
fn host_is_within(host: &str, listed: &str) -> bool {
    if host == listed {
        return true;
    }
    host.len() > listed.len()
        && host.ends_with(listed)
        && host.as_bytes()[host.len() - listed.len() - 1] == b'.'
}

/// The parts of a message that rules look at. URL hosts and attachment
/// names are only extracted when a rule needs them.
struct MessageFacts<'p, 'm> {
    message: Option<&'p Message<'m>>,
    /// Whether `message` contains the MIME structure, as in [`ParsedMessage`].
    structure: bool,
    /// Decoded text/plain parts, the HTML source of text/html parts and the
    /// text rendering of that HTML, so that a phrase split by tags still
    /// matches. Without the structure, the raw message as one text.
    bodies: Vec<Cow<'p, str>>,
    url: &'p Regex,
    url_hosts: OnceCell<BTreeSet<String>>,
    attachment_names: OnceCell<Vec<String>>,
}

impl<'p, 'm> MessageFacts<'p, 'm> {
    fn new(parsed: &'p ParsedMessage<'m>, raw: &'p [u8], url: &'p Regex) -> Self {
        let mut bodies = Vec::new();
        match &parsed.message {
            _ if !parsed.structure => bodies.push(String::from_utf8_lossy(raw)),
            None => {}
            Some(message) => {
                // Body parts of the message itself; attached messages are left
                // out so that forwarding a spam sample as an attachment does
                // not count.
                let mut ids: BTreeSet<u32> = message
                    .text_body
                    .iter()
                    .chain(message.html_body.iter())
                    .copied()
                    .collect();
                // A multipart whose boundary never appears, for example
                // because of an unbalanced quote in its Content-Type, comes
                // back as one text part filed as an attachment. Mail clients
                // show that text as the body.
                let root = message.parts.first().map(|part| &part.body);
                if matches!(root, Some(PartType::Text(_) | PartType::Html(_))) {
                    ids.insert(0);
                }
                for id in ids {
                    match message.parts.get(id as usize).map(|part| &part.body) {
                        Some(PartType::Text(text)) => bodies.push(Cow::Borrowed(text.as_ref())),
                        Some(PartType::Html(html)) => {
                            bodies.push(Cow::Borrowed(html.as_ref()));
                            bodies.push(Cow::Owned(html_to_text(html)));
                        }
                        _ => {}
                    }
                }
            }
        }
        MessageFacts {
            message: parsed.message.as_ref(),
            structure: parsed.structure,
            bodies,
            url,
            url_hosts: OnceCell::new(),
            attachment_names: OnceCell::new(),
        }
    }

    fn header_matches(&self, name: &str, pattern: &Regex) -> bool {
        let Some(message) = self.message else {
            return false;
        };
        message
            .headers()
            .iter()
            .filter(|header| header.name().eq_ignore_ascii_case(name))
            .any(|header| {
                header_values(message, header)
                    .iter()
                    .any(|value| pattern.is_match(value))
            })
    }

    fn url_hosts(&self) -> &BTreeSet<String> {
        self.url_hosts.get_or_init(|| {
            let mut hosts = BTreeSet::new();
            for body in &self.bodies {
                for captures in self.url.captures_iter(body) {
                    if let Some(host) = captures.get(1).and_then(|m| url_host(m.as_str())) {
                        hosts.insert(host);
                    }
                }
            }
            hosts
        })
    }

    fn attachment_names(&self) -> &[String] {
        self.attachment_names.get_or_init(|| {
            let mut names = Vec::new();
            if let Some(message) = self.message
                && self.structure
            {
                collect_attachment_names(message, 0, &mut names);
            }
            names
        })
    }
}

/// Lists the normalized file names of `message`'s attachments and of the
/// attachments of messages attached to it.
fn collect_attachment_names(message: &Message<'_>, depth: usize, names: &mut Vec<String>) {
    for id in &message.attachments {
        let Some(part) = message.parts.get(*id as usize) else {
            continue;
        };
        if let Some(name) = part.attachment_name() {
            names.push(normalize_file_name(name));
        }
        if let PartType::Message(inner) = &part.body
            && depth < MAX_NESTED_MESSAGES
        {
            collect_attachment_names(inner, depth + 1, names);
        }
    }
}

/// Lower-cases a file name and strips trailing dots and white space, which
/// Windows ignores: "invoice.exe. " runs as "invoice.exe".
fn normalize_file_name(name: &str) -> String {
    name.trim_end_matches(|c: char| c == '.' || c.is_whitespace())
        .trim_start()
        .to_lowercase()
}

/// Returns the decoded values of one header: each text, each address as
/// `Name <address>`, or the unfolded raw value for other header kinds.
fn header_values<'a>(
    message: &'a Message<'_>,
    header: &'a mail_parser::Header<'_>,
) -> Vec<Cow<'a, str>> {
    match &header.value {
        HeaderValue::Text(text) => vec![Cow::Borrowed(text.as_ref())],
        HeaderValue::TextList(list) => list
            .iter()
            .map(|text| Cow::Borrowed(text.as_ref()))
            .collect(),
        HeaderValue::Address(address) => {
            address.iter().map(format_address).map(Cow::Owned).collect()
        }
        _ => {
            let start = header.offset_start as usize;
            let end = header.offset_end as usize;
            let raw = message.raw_message.get(start..end).unwrap_or_default();
            vec![Cow::Owned(unfold(&String::from_utf8_lossy(raw)))]
        }
    }
}

fn format_address(address: &mail_parser::Addr<'_>) -> String {
    match (address.name(), address.address()) {
        (Some(name), Some(email)) => format!("{name} <{email}>"),
        (Some(name), None) => name.to_string(),
        (None, Some(email)) => email.to_string(),
        (None, None) => String::new(),
    }
}

/// Joins folded header lines with single spaces.
fn unfold(raw: &str) -> String {
    raw.split(['\r', '\n'])
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Extracts the host from a URL authority (`user@host:port`), lower-cased and
/// in ASCII (punycode) form. Text that ends the host in running prose or
/// HTML, such as `)`, `,` or `&quot;`, is cut off.
fn url_host(authority: &str) -> Option<String> {
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let host = match host_port.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next()?,
        None => {
            let end = host_port
                .find(|c: char| !(c.is_alphanumeric() || matches!(c, '.' | '-' | '_')))
                .unwrap_or(host_port.len());
            &host_port[..end]
        }
    };
    normalize_host(host)
}

/// Lower-cases a host name, strips surrounding dots and converts it to
/// punycode. Returns `None` for an empty host.
pub(crate) fn normalize_host(host: &str) -> Option<String> {
    let trimmed = host.trim().trim_matches('.');
    if trimmed.is_empty() {
        return None;
    }
    match idna::domain_to_ascii(trimmed) {
        Ok(ascii) if !ascii.is_empty() => Some(ascii),
        _ => Some(trimmed.to_lowercase()),
    }
}

/// Checks operator rules and reports every problem under `key[index]`.
pub(crate) fn check_rules(rules: &[RuleConfig], key: &str, problems: &mut Problems) {
    check_duplicate_names(rules, key, problems);
    for (index, rule) in rules.iter().enumerate() {
        compile_rule(rule, &format!("{key}[{index}]"), problems);
    }
}

fn check_duplicate_names(rules: &[RuleConfig], key: &str, problems: &mut Problems) {
    let mut seen = HashSet::new();
    for (index, rule) in rules.iter().enumerate() {
        if !rule.name.is_empty() && !seen.insert(rule.name.as_str()) {
            problems.push(
                format!("{key}[{index}].name"),
                format!(
                    "rule name {:?} is used twice; give each rule its own name",
                    rule.name
                ),
            );
        }
    }
}

/// Compiles one rule. Every problem found is pushed under `key.<field>`, and
/// `None` is returned if there was any.
fn compile_rule(rule: &RuleConfig, key: &str, problems: &mut Problems) -> Option<Rule> {
    let before = problems.0.len();
    let label = if rule.name.is_empty() {
        "unnamed rule".to_string()
    } else {
        format!("rule {:?}", rule.name)
    };

    if rule.name.is_empty() {
        problems.push(
            format!("{key}.name"),
            "is empty; give the rule a name such as \"GIFT_CARD_REQUEST\"",
        );
    } else if !rule
        .name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        problems.push(
            format!("{key}.name"),
            format!(
                "{label}: use only ASCII letters, digits, '_', '-' and '.', because the name appears in SMTP replies"
            ),
        );
    }
    if !rule.score.is_finite() {
        problems.push(
            format!("{key}.score"),
            format!("{label}: must be a finite number"),
        );
    }

    let matcher = compile_matcher(rule, key, &label, problems);
    if problems.0.len() > before {
        return None;
    }
    Some(Rule {
        name: rule.name.clone(),
        score: rule.score,
        matcher: matcher?,
    })
}

fn compile_matcher(
    rule: &RuleConfig,
    key: &str,
    label: &str,
    problems: &mut Problems,
) -> Option<Matcher> {
    let matchers_given: Vec<&str> = [
        ("header", rule.header.is_some() || rule.pattern.is_some()),
        ("body", rule.body.is_some()),
        ("url_host", rule.url_host.is_some()),
        ("attachment_type", rule.attachment_type.is_some()),
        ("min_recipients", rule.min_recipients.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, present)| present.then_some(name))
    .collect();
    match matchers_given.len() {
        0 => {
            problems.push(
                key,
                format!(
                    "{label} has no matcher; give exactly one of header + pattern, body, url_host, attachment_type or min_recipients"
                ),
            );
            return None;
        }
        1 => {}
        _ => {
            problems.push(
                key,
                format!(
                    "{label} has several matchers ({}); give exactly one, and split it into several rules if needed",
                    matchers_given.join(", ")
                ),
            );
            return None;
        }
    }

    if rule.header.is_some() || rule.pattern.is_some() {
        return compile_header(rule, key, label, problems);
    }
    if let Some(body) = &rule.body {
        return compile_regex(body, &format!("{key}.body"), label, problems).map(Matcher::Body);
    }
    if let Some(hosts) = &rule.url_host {
        return compile_url_hosts(hosts, &format!("{key}.url_host"), label, problems);
    }
    if let Some(types) = &rule.attachment_type {
        return compile_attachment_types(types, &format!("{key}.attachment_type"), label, problems);
    }
    match rule.min_recipients {
        Some(0) => {
            problems.push(
                format!("{key}.min_recipients"),
                format!("{label}: must be at least 1"),
            );
            None
        }
        Some(minimum) => Some(Matcher::MinRecipients(minimum)),
        None => None,
    }
}

fn compile_header(
    rule: &RuleConfig,
    key: &str,
    label: &str,
    problems: &mut Problems,
) -> Option<Matcher> {
    let Some(name) = &rule.header else {
        problems.push(
            format!("{key}.header"),
            format!("{label}: pattern needs header, the name of the header to match, such as \"Subject\""),
        );
        return None;
    };
    let Some(pattern) = &rule.pattern else {
        problems.push(
            format!("{key}.pattern"),
            format!(
                "{label}: header {name:?} needs pattern, the regex to match its values against"
            ),
        );
        return None;
    };
    let name = name.trim();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_graphic() && c != ':') {
        problems.push(
            format!("{key}.header"),
            format!("{label}: {name:?} is not a header name; give one such as \"Subject\", without the colon"),
        );
        return None;
    }
    let pattern = compile_regex(pattern, &format!("{key}.pattern"), label, problems)?;
    Some(Matcher::Header {
        name: name.to_string(),
        pattern,
    })
}

fn compile_regex(pattern: &str, key: &str, label: &str, problems: &mut Problems) -> Option<Regex> {
    match Regex::new(pattern) {
        Ok(regex) => Some(regex),
        Err(error) => {
            problems.push(key, format!("{label}: invalid regex: {error}"));
            None
        }
    }
}

fn compile_url_hosts(
    hosts: &[String],
    key: &str,
    label: &str,
    problems: &mut Problems,
) -> Option<Matcher> {
    if hosts.is_empty() {
        problems.push(
            key,
            format!("{label}: is empty; list host names such as \"bit.ly\""),
        );
        return None;
    }
    let mut normalized = Vec::new();
    for host in hosts {
        let plain =
            !host.contains(['/', ':', '@', '?', '#']) && !host.contains(char::is_whitespace);
        match normalize_host(host) {
            Some(name) if plain => normalized.push(name),
            _ => problems.push(
                key,
                format!(
                    "{label}: {host:?} is not a host name; give the host only, such as \"bit.ly\""
                ),
            ),
        }
    }
    (normalized.len() == hosts.len()).then_some(Matcher::UrlHost(normalized))
}

fn compile_attachment_types(
    types: &[String],
    key: &str,
    label: &str,
    problems: &mut Problems,
) -> Option<Matcher> {
    if types.is_empty() {
        problems.push(
            key,
            format!("{label}: is empty; list extensions such as \"exe\""),
        );
        return None;
    }
    let mut suffixes = Vec::new();
    for extension in types {
        let plain = extension.trim().trim_start_matches('.');
        if plain.is_empty() || plain.contains(['/', '\\']) || plain.contains(char::is_whitespace) {
            problems.push(
                key,
                format!(
                    "{label}: {extension:?} is not a file-name extension; give one such as \"exe\""
                ),
            );
        } else {
            suffixes.push(format!(".{}", plain.to_lowercase()));
        }
    }
    (suffixes.len() == types.len()).then_some(Matcher::AttachmentType(suffixes))
}
