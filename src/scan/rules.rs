//! Built-in spam rules: compiling `[[scan.spam.rules]]` and scoring a message
//! against them.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::collections::{BTreeSet, HashSet};

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
        Ok(RuleSet {
            enabled: spam.enabled,
            rules,
            parser: message_parser(),
            gtube,
            url,
        })
    }

    /// Number of compiled rules, GTUBE not counted.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Scores `raw` (a whole RFC 5322 message) sent to `recipients` envelope
    /// recipients. Any byte string is accepted: text that does not parse as
    /// a message is only checked for GTUBE and the recipient count.
    pub fn evaluate(&self, raw: &[u8], recipients: usize) -> RuleHits {
        let mut hits = RuleHits::default();
        if !self.enabled {
            return hits;
        }

        let parsed = self.parser.parse(raw);
        let facts = MessageFacts::new(parsed.as_ref(), &self.url);

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
    /// Decoded text/plain parts, the HTML source of text/html parts and the
    /// text rendering of that HTML, so that a phrase split by tags still
    /// matches.
    bodies: Vec<Cow<'p, str>>,
    url: &'p Regex,
    url_hosts: OnceCell<BTreeSet<String>>,
    attachment_names: OnceCell<Vec<String>>,
}

impl<'p, 'm> MessageFacts<'p, 'm> {
    fn new(message: Option<&'p Message<'m>>, url: &'p Regex) -> Self {
        let mut bodies = Vec::new();
        if let Some(message) = message {
            // Body parts of the message itself; attached messages are left out
            // so that forwarding a spam sample as an attachment does not count.
            let ids: BTreeSet<u32> = message
                .text_body
                .iter()
                .chain(message.html_body.iter())
                .copied()
                .collect();
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
        MessageFacts {
            message,
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
            if let Some(message) = self.message {
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
