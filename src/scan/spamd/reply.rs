//! Parsing spamd's reply to CHECK and SYMBOLS (the SPAMD/1.x protocol of
//! SpamAssassin 4.0):
//!
//! ```text
//! SPAMD/1.1 0 EX_OK
//! Content-length: 43
//! Spam: True ; 1000.0 / 5.0
//!
//! GTUBE,NO_RECEIVED,NO_RELAYS,TVD_SPACE_RATIO
//! ```
//!
//! Lines end with CRLF. CHECK replies have no body; SYMBOLS replies carry
//! the comma-separated rule names.

use super::super::error::ReplyError;

/// spamd's reply for one message.
#[derive(Debug, Clone, PartialEq)]
pub struct SpamdReply {
    /// spamd's own verdict: the score reached its `required_score`.
    pub spam: bool,
    pub score: f64,
    /// spamd's `required_score`.
    pub threshold: f64,
    /// Names of the rules that matched, in spamd's order; empty for CHECK.
    pub symbols: Vec<String>,
}

/// Parses `reply` as far as it has arrived. Returns `Ok(None)` while the
/// header block or the announced body is incomplete.
pub fn parse_reply(reply: &[u8]) -> Result<Option<SpamdReply>, ReplyError> {
    let Some(status_end) = find(reply, b"\n") else {
        return Ok(None);
    };
    let status = text(&reply[..status_end])?;
    check_status(status.trim_end_matches('\r'))?;

    let Some((headers_end, body_start)) = header_block_end(reply, status_end + 1) else {
        return Ok(None);
    };
    let headers = text(&reply[status_end + 1..headers_end])?;
    let mut spam_header = None;
    let mut content_length = None;
    for line in headers
        .split('\n')
        .map(|line| line.trim_end_matches('\r'))
        .filter(|line| !line.is_empty())
    {
        let Some((name, value)) = line.split_once(':') else {
            return Err(ReplyError::Malformed(format!(
                "header line {line:?} has no colon"
            )));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "spam" => spam_header = Some(value.to_string()),
            "content-length" => {
                let length = value.parse::<usize>().map_err(|_| {
                    ReplyError::Malformed(format!("Content-length {value:?} is not a number"))
                })?;
                content_length = Some(length);
            }
            _ => {}
        }
    }

    let body = &reply[body_start..];
    if let Some(length) = content_length {
        if body.len() < length {
            return Ok(None);
        }
        if body.len() > length {
            return Err(ReplyError::Malformed(format!(
                "{} bytes after the announced Content-length {length}",
                body.len() - length
            )));
        }
    }
    let Some(spam_header) = spam_header else {
        return Err(ReplyError::Malformed(
            "no Spam header in the reply".to_string(),
        ));
    };
    let (spam, score, threshold) = parse_spam_header(&spam_header)?;
    let symbols = text(body)?
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(str::to_string)
        .collect();
    Ok(Some(SpamdReply {
        spam,
        score,
        threshold,
        symbols,
    }))
}

/// Checks the status line, such as `SPAMD/1.1 0 EX_OK`.
fn check_status(line: &str) -> Result<(), ReplyError> {
    let mut words = line.splitn(3, ' ');
    let protocol = words.next().unwrap_or_default();
    if !protocol.starts_with("SPAMD/") {
        return Err(ReplyError::Malformed(format!(
            "status line {line:?} does not start with SPAMD/"
        )));
    }
    let code = words.next().unwrap_or_default();
    let message = words.next().unwrap_or_default().trim();
    match code.parse::<u32>() {
        Ok(0) => Ok(()),
        Ok(code) => Err(ReplyError::Reported(format!("{code} {message}"))),
        Err(_) => Err(ReplyError::Malformed(format!(
            "status line {line:?} has no numeric status code"
        ))),
    }
}

/// Parses the Spam header's value, such as `True ; 1000.0 / 5.0`.
fn parse_spam_header(value: &str) -> Result<(bool, f64, f64), ReplyError> {
    let malformed = || {
        ReplyError::Malformed(format!(
            "Spam header {value:?} is not \"True ; SCORE / THRESHOLD\""
        ))
    };
    let (flag, scores) = value.split_once(';').ok_or_else(malformed)?;
    let spam = match flag.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" => true,
        "false" | "no" => false,
        _ => return Err(malformed()),
    };
    let (score, threshold) = scores.split_once('/').ok_or_else(malformed)?;
    let number = |text: &str| {
        text.trim()
            .parse::<f64>()
            .ok()
            .filter(|number| number.is_finite())
            .ok_or_else(malformed)
    };
    Ok((spam, number(score)?, number(threshold)?))
}

/// Returns where the header block ends and the body starts: at the first
/// empty line after `from`, which may be the status line's end when there
/// are no headers.
fn header_block_end(reply: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut line_start = from;
    loop {
        let rest = &reply[line_start..];
        let line_end = find(rest, b"\n")?;
        let line = &rest[..line_end];
        if line.is_empty() || line == b"\r" {
            return Some((
                line_start.saturating_sub(1).max(from),
                line_start + line_end + 1,
            ));
        }
        line_start += line_end + 1;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn text(bytes: &[u8]) -> Result<&str, ReplyError> {
    std::str::from_utf8(bytes)
        .map_err(|_| ReplyError::Malformed("reply is not valid UTF-8".to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(reply: &str) -> SpamdReply {
        match parse_reply(reply.as_bytes()) {
            Ok(Some(parsed)) => parsed,
            other => panic!("reply {reply:?} gave {other:?}"),
        }
    }

    #[test]
    fn symbols_reply_parses() {
        let reply = complete(
            "SPAMD/1.1 0 EX_OK\r\nContent-length: 43\r\nSpam: True ; 1000.0 / 5.0\r\n\r\nGTUBE,NO_RECEIVED,NO_RELAYS,TVD_SPACE_RATIO",
        );
        assert_eq!(
            reply,
            SpamdReply {
                spam: true,
                score: 1000.0,
                threshold: 5.0,
                symbols: vec![
                    "GTUBE".to_string(),
                    "NO_RECEIVED".to_string(),
                    "NO_RELAYS".to_string(),
                    "TVD_SPACE_RATIO".to_string()
                ],
            }
        );
    }

    #[test]
    fn check_reply_parses() {
        let reply = complete("SPAMD/1.1 0 EX_OK\r\nSpam: False ; -0.0 / 5.0\r\n\r\n");
        assert!(!reply.spam);
        assert_eq!(reply.score, 0.0);
        assert_eq!(reply.threshold, 5.0);
        assert!(reply.symbols.is_empty());
    }

    #[test]
    fn reply_with_bare_line_feeds_parses() {
        let reply =
            complete("SPAMD/1.1 0 EX_OK\nSpam: yes ; 7.2 / 5.0\nContent-length: 8\n\nA,B\r\n,C,");
        assert!(reply.spam);
        assert_eq!(reply.symbols, ["A", "B", "C"]);
    }

    #[test]
    fn partial_reply_is_incomplete() {
        let full = "SPAMD/1.1 0 EX_OK\r\nContent-length: 5\r\nSpam: True ; 6.0 / 5.0\r\n\r\nA,B,C";
        for end in 0..full.len() {
            assert_eq!(
                parse_reply(&full.as_bytes()[..end]),
                Ok(None),
                "first {end} bytes"
            );
        }
        assert!(matches!(parse_reply(full.as_bytes()), Ok(Some(_))));
    }

    #[test]
    fn error_status_is_reported() {
        assert_eq!(
            parse_reply(b"SPAMD/1.0 76 Bad header line: BOGUS SPAMC/1.5\r\n"),
            Err(ReplyError::Reported(
                "76 Bad header line: BOGUS SPAMC/1.5".to_string()
            ))
        );
        assert_eq!(
            parse_reply(b"SPAMD/1.1 75 EX_TEMPFAIL\r\n\r\n"),
            Err(ReplyError::Reported("75 EX_TEMPFAIL".to_string()))
        );
    }

    #[test]
    fn malformed_replies_are_rejected() {
        let cases: [(&[u8], &str); 13] = [
            (b"HTTP/1.1 200 OK\r\n\r\n", "does not start with SPAMD/"),
            (b"SPAMD/1.1 OK EX_OK\r\n\r\n", "no numeric status code"),
            (b"SPAMD/1.1 0 EX_OK\r\n\r\n", "no Spam header"),
            (b"SPAMD/1.1 0 EX_OK\r\nSpam True\r\n\r\n", "has no colon"),
            (
                b"SPAMD/1.1 0 EX_OK\r\nSpam: Maybe ; 1 / 5\r\n\r\n",
                "is not",
            ),
            (b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 1.0\r\n\r\n", "is not"),
            (b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; x / 5\r\n\r\n", "is not"),
            (
                b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; nan / 5\r\n\r\n",
                "is not",
            ),
            (
                b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; inf / 5\r\n\r\n",
                "is not",
            ),
            (
                b"SPAMD/1.1 0 EX_OK\r\nContent-length: -1\r\nSpam: True ; 1 / 5\r\n\r\n",
                "is not a number",
            ),
            (
                b"SPAMD/1.1 0 EX_OK\r\nContent-length: 1\r\nSpam: True ; 1 / 5\r\n\r\nAB",
                "after the announced Content-length",
            ),
            (
                b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 1 / 5\r\n\r\nA,\xff",
                "not valid UTF-8",
            ),
            (b"\xffSPAMD/1.1 0 EX_OK\r\n\r\n", "not valid UTF-8"),
        ];
        for (reply, expected) in cases {
            match parse_reply(reply) {
                Err(ReplyError::Malformed(reason)) => assert!(
                    reason.contains(expected),
                    "{:?} gave {reason:?}",
                    String::from_utf8_lossy(reply)
                ),
                other => panic!(
                    "{:?} gave {other:?}, expected malformed",
                    String::from_utf8_lossy(reply)
                ),
            }
        }
    }
}
