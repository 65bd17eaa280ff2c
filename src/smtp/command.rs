//! Parsing of SMTP command lines into [`Command`] values.
//!
//! smtp-proto recognises the commands and checks their arguments. MAIL and RCPT paths,
//! parameters and BDAT sizes are parsed here as well, because smtp-proto 0.2.5 falls short
//! for a relay in three ways. It returns quoted local parts without their quotes, and it
//! rejects every parameter that it does not know. It also reads a number that overflows
//! `usize` as the value of its last digits, so `BDAT 99999999999999999999999` parses as a
//! 999-byte chunk. A path is accepted only when this parser and smtp-proto read the same
//! address from it, which guards against addresses that parsers split differently.

use std::borrow::Cow;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use smtp_proto::Request;

/// Maximum length of a path as written, angle brackets and source route included
/// (RFC 5321, section 4.5.3.1.3).
const MAX_PATH_LEN: usize = 256;
/// Maximum length of a domain (RFC 5321, section 4.5.3.1.2).
const MAX_DOMAIN_LEN: usize = 255;
/// Maximum length of one DNS label (RFC 1035).
const MAX_LABEL_LEN: usize = 63;
/// Maximum digits of a SIZE value (RFC 1870).
const MAX_SIZE_DIGITS: usize = 20;
/// Maximum length of client text, such as a command name, stored in a [`CommandError`].
const MAX_ERROR_NAME_LEN: usize = 64;

const MAIL_SYNTAX: &str = "MAIL FROM:<address> [parameters]";
const RCPT_SYNTAX: &str = "RCPT TO:<address> [parameters]";

/// One parsed SMTP command.
/// The `BODY` parameter of MAIL FROM (RFC 6152, RFC 3030).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    SevenBit,
    EightBitMime,
    /// Binary content, sent only with BDAT.
    BinaryMime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `EHLO`. The host is the first word of the argument, and further words are ignored.
    Ehlo {
        host: String,
    },
    /// `HELO`. The host is the first word of the argument, and further words are ignored.
    Helo {
        host: String,
    },
    /// `MAIL FROM`.
    Mail {
        /// The reverse path as written, angle brackets included, such as
        /// `<"john doe"@example.com>` or `<>`. A source route is removed.
        path: String,
        /// The mailbox with the quotes of a quoted local part removed, or `""` for the null
        /// reverse path.
        address: String,
        /// The parameter text after the path as written, without leading and trailing spaces,
        /// or `""` when there is none. Unknown parameters stay here for the upstream server.
        params: String,
        /// The `SIZE` parameter in bytes. A value beyond `u64::MAX` is stored as `u64::MAX`.
        size: Option<u64>,
        /// The `BODY` parameter, when the client sent one.
        body: Option<Body>,
        /// Whether the client sent the `SMTPUTF8` parameter.
        smtputf8: bool,
    },
    /// `RCPT TO`.
    Rcpt {
        /// The forward path as written, angle brackets included. A source route is removed.
        path: String,
        /// The mailbox with the quotes of a quoted local part removed. For `<Postmaster>`
        /// without a domain, this is the local part as written.
        address: String,
        /// The parameter text after the path as written, without leading and trailing spaces,
        /// or `""` when there is none.
        params: String,
    },
    Data,
    /// `BDAT`, with the chunk size in bytes.
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    StartTls,
    Auth,
}

/// Role of the address in a path, which selects the enhanced status code of an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressRole {
    Sender,
    Recipient,
}

impl fmt::Display for AddressRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressRole::Sender => "sender",
            AddressRole::Recipient => "recipient",
        })
    }
}

/// Reason that a command line was rejected.
///
/// The `Display` text is lower-case, free of line breaks and suitable as the text of the
/// reply that [`CommandError::reply_code`] gives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The command name is not an SMTP command. The name is kept for logs, truncated to
    /// 64 characters, and is not part of the message.
    #[error("command not recognized")]
    UnknownCommand { name: String },
    /// An SMTP extension command that the relay does not offer, such as ETRN.
    #[error("command not implemented")]
    NotImplemented { command: &'static str },
    #[error("syntax error, expected \"{expected}\"")]
    Syntax {
        command: &'static str,
        expected: &'static str,
    },
    #[error("invalid {role} address: {reason}")]
    InvalidAddress {
        role: AddressRole,
        reason: &'static str,
    },
    /// A parameter that the relay interprets has an invalid value, or a parameter value
    /// contains characters that RFC 5321 does not allow. The name is the keyword as written,
    /// truncated to 64 characters.
    #[error("invalid {name} parameter, expected {expected}")]
    InvalidParameter {
        name: String,
        expected: &'static str,
    },
    /// A parameter keyword appears twice. Two SIZE values could be read differently by the
    /// relay and the upstream server, so the command is rejected.
    #[error("duplicate {name} parameter")]
    DuplicateParameter { name: String },
    #[error("command line is not valid UTF-8")]
    NotUtf8,
    #[error("command line contains a control character")]
    ControlCharacter,
}

impl CommandError {
    /// Returns the SMTP reply code and the enhanced status code for this error.
    ///
    /// Invalid UTF-8 and control characters get `500 5.5.2` (X.5.2 is "syntax error" in
    /// RFC 3463), because RFC 4954 defines X.5.6 as "Authentication Exchange line is too long".
    pub fn reply_code(&self) -> (u16, &'static str) {
        match self {
            CommandError::UnknownCommand { .. } => (500, "5.5.1"),
            CommandError::NotImplemented { .. } => (502, "5.5.1"),
            CommandError::Syntax { .. }
            | CommandError::InvalidParameter { .. }
            | CommandError::DuplicateParameter { .. } => (501, "5.5.4"),
            CommandError::InvalidAddress {
                role: AddressRole::Sender,
                ..
            } => (501, "5.1.7"),
            CommandError::InvalidAddress {
                role: AddressRole::Recipient,
                ..
            } => (501, "5.1.3"),
            CommandError::NotUtf8 | CommandError::ControlCharacter => (500, "5.5.2"),
        }
    }
}

/// Command names that [`parse_command`] recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Ehlo,
    Helo,
    Mail,
    Rcpt,
    Data,
    Bdat,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    StartTls,
    Auth,
    /// An extension command recognised by smtp-proto that the relay does not offer.
    NotImplemented(&'static str),
}

const VERBS: &[(&str, Verb)] = &[
    ("EHLO", Verb::Ehlo),
    ("HELO", Verb::Helo),
    ("MAIL", Verb::Mail),
    ("RCPT", Verb::Rcpt),
    ("DATA", Verb::Data),
    ("BDAT", Verb::Bdat),
    ("RSET", Verb::Rset),
    ("NOOP", Verb::Noop),
    ("QUIT", Verb::Quit),
    ("VRFY", Verb::Vrfy),
    ("EXPN", Verb::Expn),
    ("HELP", Verb::Help),
    ("STARTTLS", Verb::StartTls),
    ("AUTH", Verb::Auth),
    ("ETRN", Verb::NotImplemented("ETRN")),
    ("ATRN", Verb::NotImplemented("ATRN")),
    ("BURL", Verb::NotImplemented("BURL")),
];

/// Parses one command line, given without its line terminator.
///
/// The line must be valid UTF-8 without control characters (C0, DEL and C1), because RFC 5321
/// commands are ASCII and RFC 6531 allows only UTF-8 beyond that. The command name is
/// case-insensitive and separated from its argument by one space. DATA, RSET, QUIT and
/// STARTTLS take no argument, though trailing spaces are ignored.
pub fn parse_command(line: &[u8]) -> Result<Command, CommandError> {
    if line.iter().any(|&byte| byte < 0x20 || byte == 0x7f) {
        return Err(CommandError::ControlCharacter);
    }
    let line = std::str::from_utf8(line).map_err(|_| CommandError::NotUtf8)?;
    if line.chars().any(|ch| ('\u{80}'..='\u{9f}').contains(&ch)) {
        return Err(CommandError::ControlCharacter);
    }

    let (name, arguments) = line.split_once(' ').unwrap_or((line, ""));
    let Some(verb) = VERBS
        .iter()
        .find(|(verb_name, _)| verb_name.eq_ignore_ascii_case(name))
        .map(|&(_, verb)| verb)
    else {
        return Err(CommandError::UnknownCommand {
            name: truncate(name),
        });
    };

    match verb {
        Verb::Mail => parse_mail(arguments),
        Verb::Rcpt => parse_rcpt(arguments),
        Verb::Bdat => parse_bdat(arguments),
        Verb::NotImplemented(command) => Err(CommandError::NotImplemented { command }),
        _ => parse_with_smtp_proto(verb, line, arguments),
    }
}

/// Parses the commands whose arguments smtp-proto checks on its own.
fn parse_with_smtp_proto(verb: Verb, line: &str, arguments: &str) -> Result<Command, CommandError> {
    let (command_name, expected) = match verb {
        Verb::Ehlo => ("EHLO", "EHLO domain"),
        Verb::Helo => ("HELO", "HELO domain"),
        Verb::Data => ("DATA", "DATA"),
        Verb::Rset => ("RSET", "RSET"),
        Verb::Noop => ("NOOP", "NOOP [string]"),
        Verb::Quit => ("QUIT", "QUIT"),
        Verb::Vrfy => ("VRFY", "VRFY string"),
        Verb::Expn => ("EXPN", "EXPN string"),
        Verb::Help => ("HELP", "HELP [string]"),
        Verb::StartTls => ("STARTTLS", "STARTTLS"),
        Verb::Auth => ("AUTH", "AUTH mechanism [initial-response]"),
        Verb::Mail | Verb::Rcpt | Verb::Bdat | Verb::NotImplemented(_) => {
            unreachable!("{verb:?} is parsed without smtp-proto")
        }
    };
    let syntax_error = CommandError::Syntax {
        command: command_name,
        expected,
    };

    let takes_no_argument = matches!(verb, Verb::Data | Verb::Rset | Verb::Quit | Verb::StartTls);
    if takes_no_argument && !arguments.trim_matches(' ').is_empty() {
        return Err(syntax_error);
    }

    let terminated = with_crlf(line);
    let request = Request::parse(&mut terminated.iter()).map_err(|_| syntax_error.clone())?;
    let command = match (verb, request) {
        (Verb::Ehlo, Request::Ehlo { host }) => Command::Ehlo {
            host: host.into_owned(),
        },
        (Verb::Helo, Request::Helo { host }) => Command::Helo {
            host: host.into_owned(),
        },
        (Verb::Data, Request::Data) => Command::Data,
        (Verb::Rset, Request::Rset) => Command::Rset,
        (Verb::Noop, Request::Noop { .. }) => Command::Noop,
        (Verb::Quit, Request::Quit) => Command::Quit,
        (Verb::Vrfy, Request::Vrfy { .. }) => Command::Vrfy,
        (Verb::Expn, Request::Expn { .. }) => Command::Expn,
        (Verb::Help, Request::Help { .. }) => Command::Help,
        (Verb::StartTls, Request::StartTls) => Command::StartTls,
        (Verb::Auth, Request::Auth { .. }) => Command::Auth,
        // smtp-proto read another command name than this parser did.
        _ => return Err(syntax_error),
    };
    Ok(command)
}

/// Parses `BDAT chunk-size [LAST]` (RFC 3030).
fn parse_bdat(arguments: &str) -> Result<Command, CommandError> {
    let syntax_error = CommandError::Syntax {
        command: "BDAT",
        expected: "BDAT chunk-size [LAST]",
    };

    let mut words = arguments.split(' ').filter(|word| !word.is_empty());
    let size = words
        .next()
        .filter(|word| word.bytes().all(|byte| byte.is_ascii_digit()))
        .and_then(|word| word.parse::<u64>().ok())
        .ok_or_else(|| syntax_error.clone())?;
    let last = match words.next() {
        None => false,
        Some(word) if word.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(syntax_error),
    };
    if words.next().is_some() {
        return Err(syntax_error);
    }
    Ok(Command::Bdat { size, last })
}

/// Parses the arguments of `MAIL FROM:<path> [parameters]`.
fn parse_mail(arguments: &str) -> Result<Command, CommandError> {
    let syntax_error = CommandError::Syntax {
        command: "MAIL",
        expected: MAIL_SYNTAX,
    };
    let (raw_path, params) = split_path_argument(arguments, "FROM:").ok_or(syntax_error)?;
    let path = parse_path(raw_path, AddressRole::Sender)?;

    let mut size = None;
    let mut body = None;
    let mut smtputf8 = false;
    for (keyword, value) in parse_parameters(params, "MAIL", MAIL_SYNTAX)? {
        if keyword.eq_ignore_ascii_case("SIZE") {
            size = Some(parse_size_value(keyword, value)?);
        } else if keyword.eq_ignore_ascii_case("BODY") {
            body = Some(parse_body_value(keyword, value)?);
        } else if keyword.eq_ignore_ascii_case("SMTPUTF8") {
            if value.is_some() {
                return Err(CommandError::InvalidParameter {
                    name: truncate(keyword),
                    expected: "no value",
                });
            }
            smtputf8 = true;
        }
    }

    Ok(Command::Mail {
        path: path.path,
        address: path.address,
        params: params.to_owned(),
        size,
        body,
        smtputf8,
    })
}

/// Parses the arguments of `RCPT TO:<path> [parameters]`.
fn parse_rcpt(arguments: &str) -> Result<Command, CommandError> {
    let syntax_error = CommandError::Syntax {
        command: "RCPT",
        expected: RCPT_SYNTAX,
    };
    let (raw_path, params) = split_path_argument(arguments, "TO:").ok_or(syntax_error)?;
    let path = parse_path(raw_path, AddressRole::Recipient)?;
    parse_parameters(params, "RCPT", RCPT_SYNTAX)?;

    Ok(Command::Rcpt {
        path: path.path,
        address: path.address,
        params: params.to_owned(),
    })
}

/// Splits `FROM:<path> params` into the path with its angle brackets and the trimmed
/// parameter text. One space after the colon is tolerated, because some clients send
/// `MAIL FROM: <address>`. Returns `None` when the keyword or the angle brackets are missing
/// or text follows the path directly.
fn split_path_argument<'a>(arguments: &'a str, keyword: &str) -> Option<(&'a str, &'a str)> {
    let prefix = arguments.get(..keyword.len())?;
    if !prefix.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = &arguments[keyword.len()..];
    let rest = rest.strip_prefix(' ').unwrap_or(rest);
    if !rest.starts_with('<') {
        return None;
    }

    // The path ends at the first '>' outside a quoted string.
    let mut in_quotes = false;
    let mut escaped = false;
    let mut end = None;
    for (index, byte) in rest.bytes().enumerate().skip(1) {
        if escaped {
            escaped = false;
        } else if in_quotes && byte == b'\\' {
            escaped = true;
        } else if byte == b'"' {
            in_quotes = !in_quotes;
        } else if byte == b'>' && !in_quotes {
            end = Some(index);
            break;
        }
    }

    let (path, after) = rest.split_at(end? + 1);
    if after.is_empty() || after.starts_with(' ') {
        Some((path, after.trim_matches(' ')))
    } else {
        None
    }
}

/// A path checked against RFC 5321 with the UTF-8 extensions of RFC 6531.
struct ParsedPath {
    /// The path as written with any source route removed, angle brackets included.
    path: String,
    /// The mailbox with the quotes of a quoted local part removed.
    address: String,
}

/// Parses and checks a path given with its angle brackets.
///
/// A source route (`<@a,@b:user@example.com>`) is accepted and removed, because RFC 5321
/// requires servers to accept the obsolete route syntax and lets them ignore the route.
/// Relaying the route could make the upstream server deliver somewhere other than the address
/// that the policy checked.
fn parse_path(raw_path: &str, role: AddressRole) -> Result<ParsedPath, CommandError> {
    let invalid = |reason| CommandError::InvalidAddress { role, reason };

    if raw_path.len() > MAX_PATH_LEN {
        return Err(invalid("path is longer than 256 octets"));
    }
    let inner = &raw_path[1..raw_path.len() - 1];
    if inner.is_empty() {
        return match role {
            AddressRole::Sender => Ok(ParsedPath {
                path: "<>".to_owned(),
                address: String::new(),
            }),
            AddressRole::Recipient => Err(invalid("empty path")),
        };
    }

    let mailbox = match inner.strip_prefix('@') {
        Some(_) => {
            let (route, mailbox) = inner
                .split_once(':')
                .ok_or_else(|| invalid("source route without ':'"))?;
            let route_is_valid = route
                .split(',')
                .all(|hop| hop.strip_prefix('@').is_some_and(is_valid_domain_name));
            if !route_is_valid {
                return Err(invalid("invalid source route"));
            }
            mailbox
        }
        None => inner,
    };

    // RFC 5321 allows "Postmaster" without a domain as a recipient.
    if role == AddressRole::Recipient && mailbox.eq_ignore_ascii_case("postmaster") {
        check_with_smtp_proto(raw_path, role, "")?;
        return Ok(ParsedPath {
            path: format!("<{mailbox}>"),
            address: mailbox.to_owned(),
        });
    }

    let (local_part, domain) = parse_local_part(mailbox).map_err(invalid)?;
    let domain_is_literal = domain.starts_with('[');
    if domain_is_literal {
        if !is_valid_address_literal(domain) {
            return Err(invalid("invalid address literal"));
        }
    } else if domain.is_empty() {
        return Err(invalid("missing domain"));
    } else if !is_valid_domain_name(domain) {
        return Err(invalid("invalid domain"));
    }

    let address = format!("{local_part}@{domain}");
    // smtp-proto 0.2.5 rejects address literals, so only domain names can be compared.
    if !domain_is_literal {
        check_with_smtp_proto(raw_path, role, &address)?;
    }
    Ok(ParsedPath {
        path: format!("<{mailbox}>"),
        address,
    })
}

/// Splits a mailbox into its local part, with quotes and quoting backslashes removed, and the
/// domain text after the `@`. Returns the reason when the local part is invalid.
fn parse_local_part(mailbox: &str) -> Result<(Cow<'_, str>, &str), &'static str> {
    let Some(quoted) = mailbox.strip_prefix('"') else {
        let (local_part, domain) = mailbox.split_once('@').ok_or("missing '@'")?;
        let is_dot_string = local_part
            .split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(is_atext));
        if !is_dot_string {
            return Err("invalid local part");
        }
        return Ok((Cow::Borrowed(local_part), domain));
    };

    // Quoted-string: qtextSMTP, quoted-pairSMTP and, from RFC 6531, any non-ASCII character.
    let mut local_part = String::new();
    let mut chars = quoted.char_indices();
    loop {
        let Some((index, ch)) = chars.next() else {
            return Err("unterminated quoted local part");
        };
        match ch {
            '"' => {
                let after = &quoted[index + 1..];
                let domain = after.strip_prefix('@').ok_or("missing '@'")?;
                if local_part.is_empty() {
                    return Err("empty local part");
                }
                return Ok((Cow::Owned(local_part), domain));
            }
            '\\' => match chars.next() {
                Some((_, escaped)) if (' '..='~').contains(&escaped) => local_part.push(escaped),
                _ => return Err("invalid quoted local part"),
            },
            ' '..='~' | '\u{80}'.. => local_part.push(ch),
            _ => return Err("invalid quoted local part"),
        }
    }
}

/// Returns whether `ch` may appear in an atom of a dot-string local part: ASCII atext
/// (RFC 5321) or any non-ASCII character (RFC 6531).
fn is_atext(ch: char) -> bool {
    ch.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(ch) || !ch.is_ascii()
}

/// Checks a domain name: LDH labels that neither start nor end with a hyphen, or U-labels
/// that convert to valid A-labels (RFC 6531).
fn is_valid_domain_name(domain: &str) -> bool {
    if domain.is_empty() || domain.len() > MAX_DOMAIN_LEN {
        return false;
    }
    let labels_are_valid = domain.split('.').all(|label| {
        !label.is_empty()
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || !ch.is_ascii())
            && (!label.is_ascii() || label.len() <= MAX_LABEL_LEN)
    });
    if !labels_are_valid {
        return false;
    }
    domain.is_ascii()
        || idna::uts46::Uts46::new()
            .to_ascii(
                domain.as_bytes(),
                idna::uts46::AsciiDenyList::STD3,
                idna::uts46::Hyphens::Allow,
                idna::uts46::DnsLength::Verify,
            )
            .is_ok()
}

/// Checks an address literal: `[IPv4]` or `[IPv6:address]`. General address literals with
/// other tags are rejected.
fn is_valid_address_literal(domain: &str) -> bool {
    let Some(literal) = domain
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
    else {
        return false;
    };
    match literal.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => literal[5..].parse::<Ipv6Addr>().is_ok(),
        _ => literal.parse::<Ipv4Addr>().is_ok(),
    }
}

/// Requires smtp-proto to read the same address from the path as this parser did.
fn check_with_smtp_proto(
    raw_path: &str,
    role: AddressRole,
    address: &str,
) -> Result<(), CommandError> {
    let line = match role {
        AddressRole::Sender => format!("MAIL FROM:{raw_path}\r\n"),
        AddressRole::Recipient => format!("RCPT TO:{raw_path}\r\n"),
    };
    let agrees = match Request::parse(&mut line.as_bytes().iter()) {
        Ok(Request::Mail { from }) => role == AddressRole::Sender && from.address == address,
        Ok(Request::Rcpt { to }) => role == AddressRole::Recipient && to.address == address,
        _ => false,
    };
    if agrees {
        Ok(())
    } else {
        Err(CommandError::InvalidAddress {
            role,
            reason: "ambiguous address syntax",
        })
    }
}

/// Splits parameter text into keywords and optional values, checking the `esmtp-param`
/// syntax of RFC 5321 with the UTF-8 values of RFC 6531. Keywords must not repeat.
fn parse_parameters<'a>(
    params: &'a str,
    command: &'static str,
    expected: &'static str,
) -> Result<Vec<(&'a str, Option<&'a str>)>, CommandError> {
    let mut parsed: Vec<(&str, Option<&str>)> = Vec::new();
    for param in params.split(' ').filter(|param| !param.is_empty()) {
        let (keyword, value) = match param.split_once('=') {
            Some((keyword, value)) => (keyword, Some(value)),
            None => (param, None),
        };

        let keyword_is_valid = keyword
            .bytes()
            .next()
            .is_some_and(|byte| byte.is_ascii_alphanumeric())
            && keyword
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-');
        if !keyword_is_valid {
            return Err(CommandError::Syntax { command, expected });
        }

        let value_is_valid = value.is_none_or(|value| {
            !value.is_empty()
                && value
                    .chars()
                    .all(|ch| (('!'..='~').contains(&ch) && ch != '=') || !ch.is_ascii())
        });
        if !value_is_valid {
            return Err(CommandError::InvalidParameter {
                name: truncate(keyword),
                expected: "a value of printable characters other than '='",
            });
        }

        if parsed
            .iter()
            .any(|(seen, _)| seen.eq_ignore_ascii_case(keyword))
        {
            return Err(CommandError::DuplicateParameter {
                name: truncate(keyword),
            });
        }
        parsed.push((keyword, value));
    }
    Ok(parsed)
}

/// Parses a SIZE value (RFC 1870: 1 to 20 digits). A value beyond `u64::MAX` becomes
/// `u64::MAX`, which is larger than any limit.
fn parse_size_value(keyword: &str, value: Option<&str>) -> Result<u64, CommandError> {
    let invalid = || CommandError::InvalidParameter {
        name: truncate(keyword),
        expected: "a number of bytes with at most 20 digits",
    };
    let value = value.ok_or_else(invalid)?;
    if value.is_empty()
        || value.len() > MAX_SIZE_DIGITS
        || !value.bytes().all(|byte| byte.is_ascii_digit())
    {
        return Err(invalid());
    }
    Ok(value.parse::<u64>().unwrap_or(u64::MAX))
}

/// Parses a BODY value.
fn parse_body_value(keyword: &str, value: Option<&str>) -> Result<Body, CommandError> {
    match value {
        Some(body) if body.eq_ignore_ascii_case("7BIT") => Ok(Body::SevenBit),
        Some(body) if body.eq_ignore_ascii_case("8BITMIME") => Ok(Body::EightBitMime),
        Some(body) if body.eq_ignore_ascii_case("BINARYMIME") => Ok(Body::BinaryMime),
        _ => Err(CommandError::InvalidParameter {
            name: truncate(keyword),
            expected: "7BIT, 8BITMIME or BINARYMIME",
        }),
    }
}

fn with_crlf(line: &str) -> Vec<u8> {
    let mut terminated = Vec::with_capacity(line.len() + 2);
    terminated.extend_from_slice(line.as_bytes());
    terminated.extend_from_slice(b"\r\n");
    terminated
}

fn truncate(text: &str) -> String {
    text.chars().take(MAX_ERROR_NAME_LEN).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn mail(path: &str, address: &str, params: &str) -> Command {
        Command::Mail {
            path: path.to_owned(),
            address: address.to_owned(),
            params: params.to_owned(),
            size: None,
            body: None,
            smtputf8: false,
        }
    }

    fn mail_with(
        path: &str,
        address: &str,
        params: &str,
        size: Option<u64>,
        body_8bitmime: bool,
        smtputf8: bool,
    ) -> Command {
        Command::Mail {
            path: path.to_owned(),
            address: address.to_owned(),
            params: params.to_owned(),
            size,
            body: body_8bitmime.then_some(Body::EightBitMime),
            smtputf8,
        }
    }

    fn rcpt(path: &str, address: &str, params: &str) -> Command {
        Command::Rcpt {
            path: path.to_owned(),
            address: address.to_owned(),
            params: params.to_owned(),
        }
    }

    fn syntax(command: &'static str, expected: &'static str) -> CommandError {
        CommandError::Syntax { command, expected }
    }

    fn bad_sender(reason: &'static str) -> CommandError {
        CommandError::InvalidAddress {
            role: AddressRole::Sender,
            reason,
        }
    }

    fn bad_recipient(reason: &'static str) -> CommandError {
        CommandError::InvalidAddress {
            role: AddressRole::Recipient,
            reason,
        }
    }

    fn bad_param(name: &str, expected: &'static str) -> CommandError {
        CommandError::InvalidParameter {
            name: name.to_owned(),
            expected,
        }
    }

    fn check_table(cases: &[(&str, Result<Command, CommandError>)]) {
        for (line, expected) in cases {
            assert_eq!(&parse_command(line.as_bytes()), expected, "line {line:?}");
        }
    }

    #[test]
    fn simple_commands() {
        check_table(&[
            (
                "EHLO client.example.com",
                Ok(Command::Ehlo {
                    host: "client.example.com".into(),
                }),
            ),
            (
                "ehlo client",
                Ok(Command::Ehlo {
                    host: "client".into(),
                }),
            ),
            (
                "EHLO [192.0.2.1]",
                Ok(Command::Ehlo {
                    host: "[192.0.2.1]".into(),
                }),
            ),
            (
                "EHLO first second",
                Ok(Command::Ehlo {
                    host: "first".into(),
                }),
            ),
            (
                "HELO client.example.com",
                Ok(Command::Helo {
                    host: "client.example.com".into(),
                }),
            ),
            ("DATA", Ok(Command::Data)),
            ("data", Ok(Command::Data)),
            ("DATA  ", Ok(Command::Data)),
            ("RSET", Ok(Command::Rset)),
            ("NOOP", Ok(Command::Noop)),
            ("NOOP anything at all", Ok(Command::Noop)),
            ("QUIT", Ok(Command::Quit)),
            ("VRFY user", Ok(Command::Vrfy)),
            ("EXPN list", Ok(Command::Expn)),
            ("HELP", Ok(Command::Help)),
            ("HELP MAIL", Ok(Command::Help)),
            ("STARTTLS", Ok(Command::StartTls)),
            ("starttls", Ok(Command::StartTls)),
            ("AUTH PLAIN", Ok(Command::Auth)),
            ("AUTH PLAIN dGVzdAB0ZXN0AHRlc3Q=", Ok(Command::Auth)),
            ("AUTH LOGIN", Ok(Command::Auth)),
            ("AUTH X-UNKNOWN", Ok(Command::Auth)),
            (
                "BDAT 100",
                Ok(Command::Bdat {
                    size: 100,
                    last: false,
                }),
            ),
            (
                "BDAT 100 LAST",
                Ok(Command::Bdat {
                    size: 100,
                    last: true,
                }),
            ),
            (
                "bdat 0 last",
                Ok(Command::Bdat {
                    size: 0,
                    last: true,
                }),
            ),
            (
                "BDAT 007",
                Ok(Command::Bdat {
                    size: 7,
                    last: false,
                }),
            ),
            (
                "BDAT 18446744073709551615 LAST",
                Ok(Command::Bdat {
                    size: u64::MAX,
                    last: true,
                }),
            ),
        ]);
    }

    #[test]
    fn simple_command_errors() {
        check_table(&[
            ("", Err(CommandError::UnknownCommand { name: "".into() })),
            (
                "XYZZY",
                Err(CommandError::UnknownCommand {
                    name: "XYZZY".into(),
                }),
            ),
            (
                " DATA",
                Err(CommandError::UnknownCommand { name: "".into() }),
            ),
            (
                "DATA:",
                Err(CommandError::UnknownCommand {
                    name: "DATA:".into(),
                }),
            ),
            (
                "LHLO client",
                Err(CommandError::UnknownCommand {
                    name: "LHLO".into(),
                }),
            ),
            (
                "MAILFROM:<a@example.com>",
                Err(CommandError::UnknownCommand {
                    name: "MAILFROM:<a@example.com>".into(),
                }),
            ),
            (
                "ETRN example.com",
                Err(CommandError::NotImplemented { command: "ETRN" }),
            ),
            (
                "ATRN example.com",
                Err(CommandError::NotImplemented { command: "ATRN" }),
            ),
            (
                "BURL imap://example.com/x LAST",
                Err(CommandError::NotImplemented { command: "BURL" }),
            ),
            ("EHLO", Err(syntax("EHLO", "EHLO domain"))),
            ("EHLO ", Err(syntax("EHLO", "EHLO domain"))),
            ("HELO", Err(syntax("HELO", "HELO domain"))),
            ("DATA x", Err(syntax("DATA", "DATA"))),
            ("RSET x", Err(syntax("RSET", "RSET"))),
            ("QUIT now", Err(syntax("QUIT", "QUIT"))),
            ("STARTTLS x", Err(syntax("STARTTLS", "STARTTLS"))),
            ("VRFY", Err(syntax("VRFY", "VRFY string"))),
            ("EXPN", Err(syntax("EXPN", "EXPN string"))),
            (
                "AUTH",
                Err(syntax("AUTH", "AUTH mechanism [initial-response]")),
            ),
            ("BDAT", Err(syntax("BDAT", "BDAT chunk-size [LAST]"))),
            ("BDAT x", Err(syntax("BDAT", "BDAT chunk-size [LAST]"))),
            ("BDAT -1", Err(syntax("BDAT", "BDAT chunk-size [LAST]"))),
            ("BDAT +5", Err(syntax("BDAT", "BDAT chunk-size [LAST]"))),
            (
                "BDAT 100 FOO",
                Err(syntax("BDAT", "BDAT chunk-size [LAST]")),
            ),
            (
                "BDAT 100 LAST x",
                Err(syntax("BDAT", "BDAT chunk-size [LAST]")),
            ),
            (
                "BDAT 18446744073709551616",
                Err(syntax("BDAT", "BDAT chunk-size [LAST]")),
            ),
            (
                "BDAT 99999999999999999999999",
                Err(syntax("BDAT", "BDAT chunk-size [LAST]")),
            ),
        ]);
    }

    #[test]
    fn mail_commands() {
        check_table(&[
            (
                "MAIL FROM:<a@example.com>",
                Ok(mail("<a@example.com>", "a@example.com", "")),
            ),
            (
                "mail from:<a@example.com>",
                Ok(mail("<a@example.com>", "a@example.com", "")),
            ),
            (
                "MAIL FROM: <a@example.com>",
                Ok(mail("<a@example.com>", "a@example.com", "")),
            ),
            (
                "MAIL FROM:<a@example.com> ",
                Ok(mail("<a@example.com>", "a@example.com", "")),
            ),
            ("MAIL FROM:<>", Ok(mail("<>", "", ""))),
            (
                "MAIL FROM:<> SIZE=0",
                Ok(mail_with("<>", "", "SIZE=0", Some(0), false, false)),
            ),
            (
                "MAIL FROM:<a+tag@sub.example.com>",
                Ok(mail("<a+tag@sub.example.com>", "a+tag@sub.example.com", "")),
            ),
            (
                "MAIL FROM:<first.last@example.com>",
                Ok(mail(
                    "<first.last@example.com>",
                    "first.last@example.com",
                    "",
                )),
            ),
            (
                "MAIL FROM:<!#$%&'*+-/=?^_`{|}~@example.com>",
                Ok(mail(
                    "<!#$%&'*+-/=?^_`{|}~@example.com>",
                    "!#$%&'*+-/=?^_`{|}~@example.com",
                    "",
                )),
            ),
            (
                "MAIL FROM:<A@Example.COM>",
                Ok(mail("<A@Example.COM>", "A@Example.COM", "")),
            ),
            (
                "MAIL FROM:<a@localhost>",
                Ok(mail("<a@localhost>", "a@localhost", "")),
            ),
            (
                "MAIL FROM:<a@1.example>",
                Ok(mail("<a@1.example>", "a@1.example", "")),
            ),
            (
                "MAIL FROM:<a@xn--bcher-kva.example>",
                Ok(mail(
                    "<a@xn--bcher-kva.example>",
                    "a@xn--bcher-kva.example",
                    "",
                )),
            ),
        ]);
    }

    #[test]
    fn mail_quoted_local_parts() {
        check_table(&[
            (
                r#"MAIL FROM:<"john doe"@example.com>"#,
                Ok(mail(
                    r#"<"john doe"@example.com>"#,
                    "john doe@example.com",
                    "",
                )),
            ),
            (
                r#"MAIL FROM:<"a\"b\\c"@example.com>"#,
                Ok(mail(
                    r#"<"a\"b\\c"@example.com>"#,
                    r#"a"b\c@example.com"#,
                    "",
                )),
            ),
            (
                r#"MAIL FROM:<"a>b"@example.com> SIZE=5"#,
                Ok(mail_with(
                    r#"<"a>b"@example.com>"#,
                    "a>b@example.com",
                    "SIZE=5",
                    Some(5),
                    false,
                    false,
                )),
            ),
            (
                r#"MAIL FROM:<"a@b"@example.com>"#,
                Ok(mail(r#"<"a@b"@example.com>"#, "a@b@example.com", "")),
            ),
            (
                r#"MAIL FROM:<"\x"@example.com>"#,
                Ok(mail(r#"<"\x"@example.com>"#, "x@example.com", "")),
            ),
            (
                r#"MAIL FROM:<""@example.com>"#,
                Err(bad_sender("empty local part")),
            ),
            (
                r#"MAIL FROM:<"a"b@example.com>"#,
                Err(bad_sender("missing '@'")),
            ),
            (
                r#"MAIL FROM:<a."b"@example.com>"#,
                Err(bad_sender("invalid local part")),
            ),
            (
                r#"MAIL FROM:<"a@example.com>"#,
                Err(syntax("MAIL", MAIL_SYNTAX)),
            ),
        ]);
    }

    #[test]
    fn mail_utf8_addresses() {
        check_table(&[
            (
                "MAIL FROM:<jöhn@bücher.example> SMTPUTF8",
                Ok(mail_with(
                    "<jöhn@bücher.example>",
                    "jöhn@bücher.example",
                    "SMTPUTF8",
                    None,
                    false,
                    true,
                )),
            ),
            (
                "MAIL FROM:<用户@例子.广告> SMTPUTF8 BODY=8BITMIME",
                Ok(mail_with(
                    "<用户@例子.广告>",
                    "用户@例子.广告",
                    "SMTPUTF8 BODY=8BITMIME",
                    None,
                    true,
                    true,
                )),
            ),
            (
                r#"MAIL FROM:<"jöhn doe"@example.com> smtputf8"#,
                Ok(mail_with(
                    r#"<"jöhn doe"@example.com>"#,
                    "jöhn doe@example.com",
                    "smtputf8",
                    None,
                    false,
                    true,
                )),
            ),
            // The parser leaves the SMTPUTF8 requirement of RFC 6531 to the session.
            (
                "MAIL FROM:<jöhn@example.com>",
                Ok(mail("<jöhn@example.com>", "jöhn@example.com", "")),
            ),
            (
                "MAIL FROM:<a@bü_cher.example>",
                Err(bad_sender("invalid domain")),
            ),
            (
                "MAIL FROM:<a@xn--.example>",
                Err(bad_sender("invalid domain")),
            ),
        ]);
    }

    #[test]
    fn mail_source_routes_and_literals() {
        check_table(&[
            (
                "MAIL FROM:<@relay1.example,@relay2.example:a@example.com>",
                Ok(mail("<a@example.com>", "a@example.com", "")),
            ),
            (
                "MAIL FROM:<@relay.example:a@example.com> SIZE=1",
                Ok(mail_with(
                    "<a@example.com>",
                    "a@example.com",
                    "SIZE=1",
                    Some(1),
                    false,
                    false,
                )),
            ),
            (
                "MAIL FROM:<@relay.example:>",
                Err(bad_sender("missing '@'")),
            ),
            (
                "MAIL FROM:<@relay.example>",
                Err(bad_sender("source route without ':'")),
            ),
            (
                "MAIL FROM:<@:a@example.com>",
                Err(bad_sender("invalid source route")),
            ),
            (
                "MAIL FROM:<@relay,a@example.com:b@example.com>",
                Err(bad_sender("invalid source route")),
            ),
            (
                "MAIL FROM:<@[192.0.2.1]:a@example.com>",
                Err(bad_sender("invalid source route")),
            ),
            (
                "MAIL FROM:<a@[192.0.2.1]>",
                Ok(mail("<a@[192.0.2.1]>", "a@[192.0.2.1]", "")),
            ),
            (
                "MAIL FROM:<a@[IPv6:2001:db8::1]>",
                Ok(mail("<a@[IPv6:2001:db8::1]>", "a@[IPv6:2001:db8::1]", "")),
            ),
            (
                "MAIL FROM:<a@[ipv6:::1]>",
                Ok(mail("<a@[ipv6:::1]>", "a@[ipv6:::1]", "")),
            ),
            (
                "MAIL FROM:<a@[300.1.1.1]>",
                Err(bad_sender("invalid address literal")),
            ),
            (
                "MAIL FROM:<a@[192.0.2.01]>",
                Err(bad_sender("invalid address literal")),
            ),
            (
                "MAIL FROM:<a@[2001:db8::1]>",
                Err(bad_sender("invalid address literal")),
            ),
            (
                "MAIL FROM:<a@[IPv6:zz]>",
                Err(bad_sender("invalid address literal")),
            ),
            (
                "MAIL FROM:<a@[tag:content]>",
                Err(bad_sender("invalid address literal")),
            ),
            (
                "MAIL FROM:<a@[192.0.2.1>",
                Err(bad_sender("invalid address literal")),
            ),
        ]);
    }

    #[test]
    fn mail_syntax_errors() {
        let error = Err(syntax("MAIL", MAIL_SYNTAX));
        check_table(&[
            ("MAIL", error.clone()),
            ("MAIL ", error.clone()),
            ("MAIL FROM:", error.clone()),
            ("MAIL FROM:a@example.com", error.clone()),
            ("MAIL FROM: a@example.com", error.clone()),
            ("MAIL FROM:<a@example.com", error.clone()),
            ("MAIL FROM:<a@example.com>x", error.clone()),
            ("MAIL FROM:<a@example.com>SIZE=1", error.clone()),
            ("MAIL FROM:  <a@example.com>", error.clone()),
            ("MAIL  FROM:<a@example.com>", error.clone()),
            ("MAIL FROM :<a@example.com>", error.clone()),
            ("MAIL TO:<a@example.com>", error.clone()),
            ("MAIL FROM:<a@example.com> =x", error.clone()),
            ("MAIL FROM:<a@example.com> -x", error.clone()),
            ("MAIL FROM:<a@example.com> X_Y", error.clone()),
            ("MAIL FROM:<a@example.com> >", error.clone()),
        ]);
    }

    #[test]
    fn mail_invalid_addresses() {
        check_table(&[
            (
                "MAIL FROM:<a b@example.com>",
                Err(bad_sender("invalid local part")),
            ),
            ("MAIL FROM:<a>", Err(bad_sender("missing '@'"))),
            ("MAIL FROM:<Postmaster>", Err(bad_sender("missing '@'"))),
            ("MAIL FROM:<a@>", Err(bad_sender("missing domain"))),
            (
                "MAIL FROM:<@example.com>",
                Err(bad_sender("source route without ':'")),
            ),
            (
                "MAIL FROM:<.a@example.com>",
                Err(bad_sender("invalid local part")),
            ),
            (
                "MAIL FROM:<a.@example.com>",
                Err(bad_sender("invalid local part")),
            ),
            (
                "MAIL FROM:<a..b@example.com>",
                Err(bad_sender("invalid local part")),
            ),
            (
                "MAIL FROM:<a(b)@example.com>",
                Err(bad_sender("invalid local part")),
            ),
            (
                "MAIL FROM:<a@example..com>",
                Err(bad_sender("invalid domain")),
            ),
            (
                "MAIL FROM:<a@.example.com>",
                Err(bad_sender("invalid domain")),
            ),
            (
                "MAIL FROM:<a@example.com.>",
                Err(bad_sender("invalid domain")),
            ),
            (
                "MAIL FROM:<a@-example.com>",
                Err(bad_sender("invalid domain")),
            ),
            (
                "MAIL FROM:<a@example-.com>",
                Err(bad_sender("invalid domain")),
            ),
            (
                "MAIL FROM:<a@exa_mple.com>",
                Err(bad_sender("invalid domain")),
            ),
            (
                "MAIL FROM:<a@b@example.com>",
                Err(bad_sender("invalid domain")),
            ),
            (
                "MAIL FROM:<a@exa mple.com>",
                Err(bad_sender("invalid domain")),
            ),
            (
                "MAIL FROM:<<a@example.com>",
                Err(bad_sender("invalid local part")),
            ),
        ]);
    }

    /// Builds a path of exactly `len` octets from a 64-octet local part and 63-octet labels.
    fn path_of_len(len: usize) -> String {
        let mut domain_len = len - "<@>".len() - 64;
        let mut labels = Vec::new();
        while domain_len > 0 {
            let label_len = domain_len.min(63);
            labels.push("d".repeat(label_len));
            domain_len -= label_len;
            domain_len = domain_len.saturating_sub(1);
        }
        let path = format!("<{}@{}>", "l".repeat(64), labels.join("."));
        assert_eq!(path.len(), len, "test helper built {path}");
        path
    }

    #[test]
    fn path_length_limit() {
        let longest = path_of_len(256);
        let too_long = path_of_len(257);

        let accepted = parse_command(format!("MAIL FROM:{longest}").as_bytes()).unwrap();
        let Command::Mail { path, .. } = accepted else {
            panic!("expected MAIL, got {accepted:?}")
        };
        assert_eq!(path, longest);
        assert_eq!(
            parse_command(format!("MAIL FROM:{too_long}").as_bytes()),
            Err(bad_sender("path is longer than 256 octets"))
        );
        assert_eq!(
            parse_command(format!("RCPT TO:{too_long}").as_bytes()),
            Err(bad_recipient("path is longer than 256 octets"))
        );
        let long_label = format!("MAIL FROM:<a@{}.example>", "d".repeat(64));
        assert_eq!(
            parse_command(long_label.as_bytes()),
            Err(bad_sender("invalid domain"))
        );
    }

    #[test]
    fn mail_parameters() {
        check_table(&[
            (
                "MAIL FROM:<a@example.com> SIZE=1000 BODY=8BITMIME SMTPUTF8",
                Ok(mail_with(
                    "<a@example.com>",
                    "a@example.com",
                    "SIZE=1000 BODY=8BITMIME SMTPUTF8",
                    Some(1000),
                    true,
                    true,
                )),
            ),
            (
                "MAIL FROM:<a@example.com>  size=10   body=7bit  ",
                Ok(Command::Mail {
                    path: "<a@example.com>".to_owned(),
                    address: "a@example.com".to_owned(),
                    params: "size=10   body=7bit".to_owned(),
                    size: Some(10),
                    body: Some(Body::SevenBit),
                    smtputf8: false,
                }),
            ),
            (
                "MAIL FROM:<a@example.com> BODY=BINARYMIME",
                Ok(Command::Mail {
                    path: "<a@example.com>".to_owned(),
                    address: "a@example.com".to_owned(),
                    params: "BODY=BINARYMIME".to_owned(),
                    size: None,
                    body: Some(Body::BinaryMime),
                    smtputf8: false,
                }),
            ),
            (
                "MAIL FROM:<a@example.com> SIZE=18446744073709551615",
                Ok(mail_with(
                    "<a@example.com>",
                    "a@example.com",
                    "SIZE=18446744073709551615",
                    Some(u64::MAX),
                    false,
                    false,
                )),
            ),
            (
                "MAIL FROM:<a@example.com> SIZE=99999999999999999999",
                Ok(mail_with(
                    "<a@example.com>",
                    "a@example.com",
                    "SIZE=99999999999999999999",
                    Some(u64::MAX),
                    false,
                    false,
                )),
            ),
            (
                "MAIL FROM:<a@example.com> SIZE=00000000000000000042",
                Ok(mail_with(
                    "<a@example.com>",
                    "a@example.com",
                    "SIZE=00000000000000000042",
                    Some(42),
                    false,
                    false,
                )),
            ),
            (
                "MAIL FROM:<a@example.com> RET=HDRS ENVID=abc+2Bdef AUTH=<> XFOO X-BAR=baz",
                Ok(mail(
                    "<a@example.com>",
                    "a@example.com",
                    "RET=HDRS ENVID=abc+2Bdef AUTH=<> XFOO X-BAR=baz",
                )),
            ),
            (
                "MAIL FROM:<a@example.com> RET=BOGUS",
                Ok(mail("<a@example.com>", "a@example.com", "RET=BOGUS")),
            ),
            (
                "MAIL FROM:<a@example.com> X-NAME=jöhn",
                Ok(mail("<a@example.com>", "a@example.com", "X-NAME=jöhn")),
            ),
        ]);
    }

    #[test]
    fn mail_parameter_errors() {
        let size_expected = "a number of bytes with at most 20 digits";
        let body_expected = "7BIT, 8BITMIME or BINARYMIME";
        let value_expected = "a value of printable characters other than '='";
        check_table(&[
            (
                "MAIL FROM:<a@example.com> SIZE=abc",
                Err(bad_param("SIZE", size_expected)),
            ),
            (
                "MAIL FROM:<a@example.com> SIZE=-1",
                Err(bad_param("SIZE", size_expected)),
            ),
            (
                "MAIL FROM:<a@example.com> SIZE",
                Err(bad_param("SIZE", size_expected)),
            ),
            (
                "MAIL FROM:<a@example.com> size=1x",
                Err(bad_param("size", size_expected)),
            ),
            (
                "MAIL FROM:<a@example.com> SIZE=123456789012345678901",
                Err(bad_param("SIZE", size_expected)),
            ),
            (
                "MAIL FROM:<a@example.com> SIZE=",
                Err(bad_param("SIZE", value_expected)),
            ),
            (
                "MAIL FROM:<a@example.com> BODY=FOO",
                Err(bad_param("BODY", body_expected)),
            ),
            (
                "MAIL FROM:<a@example.com> BODY",
                Err(bad_param("BODY", body_expected)),
            ),
            (
                "MAIL FROM:<a@example.com> SMTPUTF8=yes",
                Err(bad_param("SMTPUTF8", "no value")),
            ),
            (
                "MAIL FROM:<a@example.com> XFOO=a=b",
                Err(bad_param("XFOO", value_expected)),
            ),
            (
                "MAIL FROM:<a@example.com> SIZE=1 SIZE=2",
                Err(CommandError::DuplicateParameter {
                    name: "SIZE".into(),
                }),
            ),
            (
                "MAIL FROM:<a@example.com> size=1 SIZE=1",
                Err(CommandError::DuplicateParameter {
                    name: "SIZE".into(),
                }),
            ),
            (
                "MAIL FROM:<a@example.com> XFOO XFOO=1",
                Err(CommandError::DuplicateParameter {
                    name: "XFOO".into(),
                }),
            ),
        ]);
    }

    #[test]
    fn rcpt_commands() {
        let error = Err(syntax("RCPT", RCPT_SYNTAX));
        check_table(&[
            (
                "RCPT TO:<b@example.com>",
                Ok(rcpt("<b@example.com>", "b@example.com", "")),
            ),
            (
                "rcpt to: <b@example.com>",
                Ok(rcpt("<b@example.com>", "b@example.com", "")),
            ),
            (
                "RCPT TO:<Postmaster>",
                Ok(rcpt("<Postmaster>", "Postmaster", "")),
            ),
            (
                "RCPT TO:<postmaster@example.com>",
                Ok(rcpt(
                    "<postmaster@example.com>",
                    "postmaster@example.com",
                    "",
                )),
            ),
            (
                "RCPT TO:<@relay.example:postmaster>",
                Ok(rcpt("<postmaster>", "postmaster", "")),
            ),
            (
                r#"RCPT TO:<"b c"@example.com>"#,
                Ok(rcpt(r#"<"b c"@example.com>"#, "b c@example.com", "")),
            ),
            (
                "RCPT TO:<bü@bücher.example>",
                Ok(rcpt("<bü@bücher.example>", "bü@bücher.example", "")),
            ),
            (
                "RCPT TO:<b@[192.0.2.1]>",
                Ok(rcpt("<b@[192.0.2.1]>", "b@[192.0.2.1]", "")),
            ),
            (
                "RCPT TO:<b@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.com",
                Ok(rcpt(
                    "<b@example.com>",
                    "b@example.com",
                    "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.com",
                )),
            ),
            (
                "RCPT TO:<b@example.com> ORCPT=utf-8;b@example.com XRCPT",
                Ok(rcpt(
                    "<b@example.com>",
                    "b@example.com",
                    "ORCPT=utf-8;b@example.com XRCPT",
                )),
            ),
            ("RCPT TO:<>", Err(bad_recipient("empty path"))),
            ("RCPT TO:<b>", Err(bad_recipient("missing '@'"))),
            ("RCPT TO:<b@>", Err(bad_recipient("missing domain"))),
            (
                "RCPT TO:<b@example..com>",
                Err(bad_recipient("invalid domain")),
            ),
            ("RCPT TO:<b@example.com> =x", error.clone()),
            ("RCPT TO:b@example.com", error.clone()),
            ("RCPT TO:<b@example.com", error.clone()),
            ("RCPT TO:", error.clone()),
            ("RCPT", error.clone()),
            ("RCPT FROM:<b@example.com>", error.clone()),
            (
                "RCPT TO:<b@example.com> NOTIFY=NEVER NOTIFY=NEVER",
                Err(CommandError::DuplicateParameter {
                    name: "NOTIFY".into(),
                }),
            ),
        ]);
    }

    #[test]
    fn invalid_characters() {
        let cases: &[(&[u8], CommandError)] = &[
            (
                b"MAIL FROM:<a@example.com>\tSIZE=1",
                CommandError::ControlCharacter,
            ),
            (b"EHLO\tclient", CommandError::ControlCharacter),
            (b"NOOP \0", CommandError::ControlCharacter),
            (b"DATA\r", CommandError::ControlCharacter),
            (
                b"RCPT TO:<b@example.com>\rRCPT TO:<c@example.com>",
                CommandError::ControlCharacter,
            ),
            (b"NOOP \x7f", CommandError::ControlCharacter),
            ("NOOP \u{85}".as_bytes(), CommandError::ControlCharacter),
            (
                "MAIL FROM:<\"a\u{9b}b\"@example.com>".as_bytes(),
                CommandError::ControlCharacter,
            ),
            (b"MAIL FROM:<\xff@example.com>", CommandError::NotUtf8),
            (b"NOOP \xc3", CommandError::NotUtf8),
            (b"\xc0\xaf", CommandError::NotUtf8),
        ];
        for (line, expected) in cases {
            assert_eq!(
                parse_command(line).as_ref(),
                Err(expected),
                "line {:?}",
                line.escape_ascii().to_string()
            );
        }
    }

    #[test]
    fn unknown_command_name_truncated() {
        let line = "X".repeat(1000);

        let error = parse_command(line.as_bytes()).unwrap_err();

        assert_eq!(
            error,
            CommandError::UnknownCommand {
                name: "X".repeat(64)
            }
        );
    }

    #[test]
    fn error_reply_codes() {
        let cases = [
            (
                CommandError::UnknownCommand { name: "X".into() },
                (500, "5.5.1"),
            ),
            (
                CommandError::NotImplemented { command: "ETRN" },
                (502, "5.5.1"),
            ),
            (syntax("MAIL", MAIL_SYNTAX), (501, "5.5.4")),
            (bad_sender("missing domain"), (501, "5.1.7")),
            (bad_recipient("missing domain"), (501, "5.1.3")),
            (bad_param("SIZE", "a number"), (501, "5.5.4")),
            (
                CommandError::DuplicateParameter {
                    name: "SIZE".into(),
                },
                (501, "5.5.4"),
            ),
            (CommandError::NotUtf8, (500, "5.5.2")),
            (CommandError::ControlCharacter, (500, "5.5.2")),
        ];
        for (error, code) in cases {
            assert_eq!(error.reply_code(), code, "error {error:?}");
        }
    }

    #[test]
    fn error_messages() {
        let cases = [
            (
                CommandError::UnknownCommand {
                    name: "XYZZY".into(),
                },
                "command not recognized",
            ),
            (
                CommandError::NotImplemented { command: "ETRN" },
                "command not implemented",
            ),
            (
                syntax("MAIL", MAIL_SYNTAX),
                "syntax error, expected \"MAIL FROM:<address> [parameters]\"",
            ),
            (
                bad_sender("missing domain"),
                "invalid sender address: missing domain",
            ),
            (
                bad_recipient("empty path"),
                "invalid recipient address: empty path",
            ),
            (
                bad_param("SIZE", "a number of bytes with at most 20 digits"),
                "invalid SIZE parameter, expected a number of bytes with at most 20 digits",
            ),
            (
                CommandError::DuplicateParameter {
                    name: "SIZE".into(),
                },
                "duplicate SIZE parameter",
            ),
            (CommandError::NotUtf8, "command line is not valid UTF-8"),
            (
                CommandError::ControlCharacter,
                "command line contains a control character",
            ),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message);
        }
    }

    const FUZZ_TOKENS: &[&str] = &[
        "MAIL",
        "RCPT",
        "mail",
        " ",
        " ",
        " ",
        "FROM:",
        "TO:",
        "<",
        "<",
        ">",
        ">",
        "\"",
        "\"",
        "\\",
        "@",
        "@",
        ".",
        ".",
        "a",
        "example",
        "com",
        ",",
        ":",
        "SIZE=",
        "1",
        "99999999999999999999",
        "BODY=8BITMIME",
        "SMTPUTF8",
        "=",
        "-",
        "ü",
        "[",
        "]",
        "IPv6:",
        "::1",
        "192.0.2.1",
        "postmaster",
        "\t",
        "BDAT",
        "DATA",
        "EHLO",
        "LAST",
        "(",
        "_",
    ];

    /// Random lines of SMTP-like tokens must never panic, and an accepted MAIL or RCPT must
    /// parse to the same command again when rebuilt from its path and parameters.
    #[test]
    fn random_lines_parse_consistently() {
        let mut rng = StdRng::seed_from_u64(0xc0de);
        let mut accepted = 0;
        for _ in 0..50_000 {
            let mut line = String::new();
            if rng.random_bool(0.5) {
                line.push_str(["MAIL FROM:<", "RCPT TO:<"][rng.random_range(0..2)]);
            }
            for _ in 0..rng.random_range(0..14) {
                line.push_str(FUZZ_TOKENS[rng.random_range(0..FUZZ_TOKENS.len())]);
            }
            if rng.random_bool(0.5) {
                line.push('>');
            }

            let rebuilt = match parse_command(line.as_bytes()) {
                Ok(Command::Mail { path, params, .. }) => format!("MAIL FROM:{path} {params}"),
                Ok(Command::Rcpt { path, params, .. }) => format!("RCPT TO:{path} {params}"),
                _ => continue,
            };
            accepted += 1;
            assert_eq!(
                parse_command(rebuilt.as_bytes()),
                parse_command(line.as_bytes()),
                "line {line:?} rebuilt as {rebuilt:?}"
            );
        }
        assert!(accepted > 100, "only {accepted} random lines were accepted");
    }

    fn random_atom(rng: &mut StdRng) -> String {
        const ATEXT: &[char] = &[
            'a', 'Z', '0', '!', '#', '$', '%', '&', '\'', '*', '+', '-', '/', '=', '?', '^', '_',
            '`', '{', '|', '}', '~', 'ü', '字',
        ];
        (0..rng.random_range(1..6))
            .map(|_| ATEXT[rng.random_range(0..ATEXT.len())])
            .collect()
    }

    fn random_quoted(rng: &mut StdRng) -> (String, String) {
        const QTEXT: &[char] = &[
            'a', ' ', '!', '#', '@', '.', ':', '<', '>', ',', '[', ']', '~', 'ü',
        ];
        let mut written = String::from("\"");
        let mut unquoted = String::new();
        for _ in 0..rng.random_range(1..8) {
            if rng.random_bool(0.2) {
                let escaped = ['"', '\\', 'a', ' '][rng.random_range(0..4)];
                written.push('\\');
                written.push(escaped);
                unquoted.push(escaped);
            } else {
                let ch = QTEXT[rng.random_range(0..QTEXT.len())];
                written.push(ch);
                unquoted.push(ch);
            }
        }
        written.push('"');
        (written, unquoted)
    }

    fn random_domain(rng: &mut StdRng) -> String {
        const LABELS: &[&str] = &[
            "example",
            "com",
            "a1",
            "x-y",
            "0",
            "mail-relay",
            "bücher",
            "例子",
        ];
        let count = rng.random_range(1..4);
        (0..count)
            .map(|_| LABELS[rng.random_range(0..LABELS.len())])
            .collect::<Vec<_>>()
            .join(".")
    }

    /// Valid addresses built from the RFC 5321 and RFC 6531 grammar must pass, which also
    /// shows that smtp-proto reads them the same way.
    #[test]
    fn random_valid_addresses_accepted() {
        let mut rng = StdRng::seed_from_u64(0xadd7);
        for _ in 0..20_000 {
            let (local_written, local_unquoted) = if rng.random_bool(0.5) {
                random_quoted(&mut rng)
            } else {
                let atoms: Vec<String> = (0..rng.random_range(1..4))
                    .map(|_| random_atom(&mut rng))
                    .collect();
                (atoms.join("."), atoms.join("."))
            };
            let domain = random_domain(&mut rng);
            let mailbox = format!("{local_written}@{domain}");
            let line = format!("MAIL FROM:<{mailbox}> SMTPUTF8");

            let expected = mail_with(
                &format!("<{mailbox}>"),
                &format!("{local_unquoted}@{domain}"),
                "SMTPUTF8",
                None,
                false,
                true,
            );
            assert_eq!(
                parse_command(line.as_bytes()),
                Ok(expected),
                "line {line:?}"
            );
        }
    }
}
