//! The alert e-mail: rendered from the alert payload at each attempt and
//! sent over SMTP through the upstream or `alerts.relay`.

use crate::smtp::upstream::{UpstreamConnection, UpstreamTarget};
use base64::Engine;
use serde_json::Value;

/// The envelope and header addresses of an alert e-mail.
pub struct MailAddresses<'a> {
    pub from: &'a str,
    pub to: &'a [String],
    /// Host name for the `Message-ID`.
    pub hostname: &'a str,
}

/// Renders the alert payload as an RFC 5322 message with CRLF line ends.
pub fn render(
    payload: &Value,
    addresses: &MailAddresses<'_>,
    date: time::OffsetDateTime,
) -> Vec<u8> {
    let text = |name: &str| payload[name].as_str().unwrap_or("").to_string();
    let monitor = payload["monitor"] == Value::Bool(true);
    let mailbox = text("mailbox");
    let lockout = &payload["lockout"];

    let mut subject = match payload["event"].as_str() {
        Some("blocked_permanently") => format!("sendguard: {mailbox} is blocked permanently"),
        _ => format!(
            "sendguard: {mailbox} is locked out until {} (lockout {})",
            lockout["until"].as_str().unwrap_or("?"),
            lockout["number"]
        ),
    };
    if monitor {
        subject = format!("[monitor only] {subject}");
    }

    let body = render_body(payload);
    let date = date
        .format(&time::format_description::well_known::Rfc2822)
        .unwrap_or_default();
    let mut message = String::new();
    let mut header = |name: &str, value: &str| {
        message.push_str(name);
        message.push_str(": ");
        message.push_str(value);
        message.push_str("\r\n");
    };
    header("From", &format!("sendguard <{}>", addresses.from));
    header("To", &addresses.to.join(", "));
    header("Subject", &encode_header_text(&subject));
    header("Date", &date);
    header(
        "Message-ID",
        &format!("<{}@{}>", text("delivery_id"), addresses.hostname),
    );
    header("Auto-Submitted", "auto-generated");
    header("Sendguard-Delivery", &text("delivery_id"));
    header("MIME-Version", "1.0");
    header("Content-Type", "text/plain; charset=utf-8");
    let body = if body.is_ascii() {
        header("Content-Transfer-Encoding", "7bit");
        body
    } else {
        header("Content-Transfer-Encoding", "base64");
        wrap_base64(body.as_bytes())
    };
    message.push_str("\r\n");
    message.push_str(&body);
    message.into_bytes()
}

fn render_body(payload: &Value) -> String {
    let text = |value: &Value| value.as_str().unwrap_or("").to_string();
    let lockout = &payload["lockout"];
    let permanent = lockout["permanent"] == Value::Bool(true);
    let mut lines = vec![text(&payload["summary"]), String::new()];
    let mut field = |name: &str, value: String| lines.push(format!("{name:<15} {value}"));

    field("Mailbox:", text(&payload["mailbox"]));
    if let Some(client) = payload["key_client"].as_str() {
        field("Client:", client.to_string());
    }
    if permanent {
        field("Lockout:", "permanent block".to_string());
    } else {
        field(
            "Lockout:",
            format!(
                "{} of {} timed lockouts, {}",
                lockout["number"],
                lockout["timed_lockouts"],
                text(&lockout["length"])
            ),
        );
    }
    field("Started:", text(&lockout["started"]));
    if !permanent {
        field("Ends:", text(&lockout["until"]));
    }
    field("Why:", text(&payload["reason"]));
    let owner = match &payload["owner"] {
        Value::Object(owner) => format!(
            "{} ({})",
            owner.get("name").and_then(Value::as_str).unwrap_or(""),
            owner.get("id").and_then(Value::as_str).unwrap_or("")
        ),
        _ => "unknown: the mailbox is not in the directory file".to_string(),
    };
    field("Owner:", owner);
    let devices: Vec<String> = payload["devices"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .map(|device| format!("{} ({})", text(&device["name"]), text(&device["id"])))
        .collect();
    field(
        "Devices:",
        if devices.is_empty() {
            "none known".to_string()
        } else {
            devices.join(", ")
        },
    );
    let scan = if payload["endpoint_scan_requested"] == Value::Bool(true) && devices.is_empty() {
        "requested for the mailbox; the directory lists no devices for it"
    } else if payload["endpoint_scan_requested"] == Value::Bool(true) {
        "requested for the owner's devices"
    } else if payload["monitor"] == Value::Bool(true) {
        "not requested in monitor mode"
    } else {
        "not requested (synchronized_security is off)"
    };
    field("Endpoint scan:", scan.to_string());
    let last = &payload["last_message"];
    field(
        "Last message:",
        format!(
            "sender {}, login {}, client {}, transaction {}",
            text(&last["sender"]),
            last["login"].as_str().unwrap_or("none"),
            text(&last["client"]),
            text(&last["transaction"])
        ),
    );

    lines.push(String::new());
    lines.push("Bad messages:".to_string());
    for strike in payload["strikes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let mut line = format!(
            "  {}  {}  transaction {}",
            text(&strike["time"]),
            text(&strike["verdict"]),
            text(&strike["transaction"])
        );
        if let Some(message_id) = strike["message_id"].as_str() {
            line.push_str(&format!("  Message-ID {message_id}"));
        }
        lines.push(line);
    }
    lines.push(String::new());
    lines.push(if permanent {
        "The mailbox stays blocked until support lifts the block with the support credential."
            .to_string()
    } else {
        "A timed lockout cannot be lifted early; it ends on its own at the time above.".to_string()
    });
    lines.push(format!("Delivery id: {}", text(&payload["delivery_id"])));

    let mut body = String::new();
    for line in lines {
        // Payload text is the relay's own, but an owner's name comes from
        // the directory file: no control character may break a line.
        let clean = printable(&line);
        body.push_str(clean.trim_end());
        body.push_str("\r\n");
    }
    body
}

/// Replaces control characters and the bidirectional formatting marks
/// (which can make a name display backwards) with spaces.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            let bidi = matches!(c, '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
            if c.is_control() || bidi { ' ' } else { c }
        })
        .collect()
}

/// Encodes a header value as RFC 2047 encoded words when it is not plain
/// ASCII, each word at most 75 characters and on its own folded line.
fn encode_header_text(text: &str) -> String {
    /// Bytes of text per word: 45 bytes give 60 base64 characters, which
    /// with the 12 of `=?utf-8?b??=` stay below the 75 allowed.
    const WORD_BYTES: usize = 45;
    let clean = printable(text);
    if clean.is_ascii() {
        return clean;
    }
    let mut words = Vec::new();
    let mut current = String::new();
    for c in clean.chars() {
        if current.len() + c.len_utf8() > WORD_BYTES {
            words.push(std::mem::take(&mut current));
        }
        current.push(c);
    }
    if !current.is_empty() {
        words.push(current);
    }
    let encoded: Vec<String> = words
        .iter()
        .map(|word| {
            format!(
                "=?utf-8?b?{}?=",
                base64::engine::general_purpose::STANDARD.encode(word.as_bytes())
            )
        })
        .collect();
    encoded.join("\r\n ")
}

fn wrap_base64(bytes: &[u8]) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut wrapped = String::with_capacity(encoded.len() + encoded.len() / 38);
    for chunk in encoded.as_bytes().chunks(76) {
        wrapped.push_str(std::str::from_utf8(chunk).unwrap_or(""));
        wrapped.push_str("\r\n");
    }
    wrapped
}

/// A failed attempt to send an alert e-mail.
#[derive(Debug)]
pub struct SendError {
    pub message: String,
    /// True for a 5xx refusal, which a retry cannot change (RFC 5321).
    pub permanent: bool,
}

impl SendError {
    fn temporary(message: String) -> SendError {
        SendError {
            message,
            permanent: false,
        }
    }

    fn from_reply(message: String, code: u16) -> SendError {
        SendError {
            message,
            permanent: (500..600).contains(&code),
        }
    }
}

/// Sends `message` from `from` to every address in `to`; returns the
/// relay's reply to the message. `relay_name` names the server in errors.
///
/// # Errors
/// The relay could not be reached, or refused the sender, every
/// recipient, or the message.
pub async fn send(
    target: &UpstreamTarget,
    relay_name: &str,
    from: &str,
    to: &[String],
    message: &[u8],
) -> Result<String, SendError> {
    let mut connection = UpstreamConnection::connect(target)
        .await
        .map_err(|error| SendError::temporary(name_relay(&error.to_string(), relay_name)))?;
    let result = transaction(&mut connection, relay_name, from, to, message).await;
    connection.quit().await;
    result
}

/// Rewords the SMTP client's errors, which call their server "upstream",
/// for the relay that alert e-mail really goes through.
fn name_relay(error: &str, relay_name: &str) -> String {
    error.replacen("upstream", relay_name, 1)
}

async fn transaction(
    connection: &mut UpstreamConnection,
    relay_name: &str,
    from: &str,
    to: &[String],
    message: &[u8],
) -> Result<String, SendError> {
    let failed = |error: crate::smtp::upstream::UpstreamError| {
        SendError::temporary(name_relay(&error.to_string(), relay_name))
    };
    let relay = format!("{relay_name} {}", connection.address());
    let reply = connection
        .command(&format!("MAIL FROM:<{from}>"))
        .await
        .map_err(failed)?;
    if !reply.is_positive() {
        return Err(SendError::from_reply(
            format!("{relay} refused the sender {from}: {}", reply.one_line()),
            reply.code,
        ));
    }
    let mut refused = Vec::new();
    let mut all_permanent = true;
    for recipient in to {
        let reply = connection
            .command(&format!("RCPT TO:<{recipient}>"))
            .await
            .map_err(failed)?;
        if !reply.is_positive() {
            all_permanent &= reply.code >= 500;
            refused.push(format!("{recipient}: {}", reply.one_line()));
        }
    }
    if refused.len() == to.len() {
        return Err(SendError {
            message: format!("{relay} refused every recipient ({})", refused.join("; ")),
            permanent: all_permanent,
        });
    }
    let reply = connection
        .send_message(None, message)
        .await
        .map_err(|error| SendError::temporary(name_relay(&error.to_string(), relay_name)))?;
    if !reply.is_positive() {
        return Err(SendError::from_reply(
            format!("{relay} refused the message: {}", reply.one_line()),
            reply.code,
        ));
    }
    let mut outcome = format!("relay accepted: {}", reply.one_line());
    if !refused.is_empty() {
        outcome.push_str(&format!(" (refused recipients: {})", refused.join("; ")));
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn payload(monitor: bool) -> Value {
        json!({
            "type": "admin_alert",
            "delivery_id": "00ff",
            "event": "lockout_started",
            "monitor": monitor,
            "mailbox": "alice@example.org",
            "owner": { "id": "u-1", "name": "Zoë Smith" },
            "devices": [{ "id": "dev-1", "name": "ZOE-LAPTOP" }],
            "lockout": { "number": 2, "started": "2026-12-04T10:00:00Z",
                         "until": "2026-12-04T12:00:00Z", "permanent": false,
                         "length": "2h", "timed_lockouts": 6 },
            "reason": "5 bad messages within 10m",
            "strikes": [{ "time": "2026-12-04T09:59:00Z", "verdict": "spam GTUBE",
                          "transaction": "sg-1", "message_id": "<a@b>" }],
            "last_message": { "sender": "<alice@example.org>", "login": null,
                              "client": "192.0.2.1", "transaction": "sg-1" },
            "endpoint_scan_requested": !monitor,
            "summary": "alice@example.org is locked out",
        })
    }

    fn rendered(monitor: bool) -> String {
        let to = vec!["secops@example.org".to_string()];
        let addresses = MailAddresses {
            from: "sendguard@relay.example.org",
            to: &to,
            hostname: "relay.example.org",
        };
        let bytes = render(
            &payload(monitor),
            &addresses,
            time::macros::datetime!(2026-12-04 10:00 UTC),
        );
        String::from_utf8(bytes).expect("ASCII message")
    }

    #[test]
    fn alert_mail_headers() {
        let message = rendered(false);
        assert!(message.contains(
            "Subject: sendguard: alice@example.org is locked out until 2026-12-04T12:00:00Z (lockout 2)\r\n"
        ));
        assert!(message.contains("Message-ID: <00ff@relay.example.org>\r\n"));
        assert!(message.contains("Auto-Submitted: auto-generated\r\n"));
        assert!(message.contains("Date: Fri, 04 Dec 2026 10:00:00 +0000\r\n"));
        assert!(message.contains("Content-Transfer-Encoding: base64\r\n"));
    }

    #[test]
    fn alert_mail_body_decodes() {
        let message = rendered(false);
        let (_, body) = message.split_once("\r\n\r\n").expect("header and body");
        let joined: String = body.split("\r\n").collect();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(joined)
            .expect("base64 body");
        let text = String::from_utf8(decoded).expect("UTF-8 body");
        assert!(text.contains("Zoë Smith (u-1)"), "{text}");
        assert!(text.contains("ZOE-LAPTOP (dev-1)"), "{text}");
        assert!(text.contains("2 of 6 timed lockouts, 2h"), "{text}");
        assert!(text.contains("Message-ID <a@b>"), "{text}");
        assert!(text.contains("requested for the owner's devices"), "{text}");
    }

    #[test]
    fn monitor_alert_subject_marked() {
        let message = rendered(true);
        assert!(message.contains("Subject: [monitor only] sendguard:"));
    }

    #[test]
    fn non_ascii_subject_encoded() {
        assert_eq!(encode_header_text("plain"), "plain");
        assert_eq!(encode_header_text("ü"), "=?utf-8?b?w7w=?=");
    }

    #[test]
    fn long_subject_split_into_words() {
        let subject = format!("sendguard: {} is locked out", "zoë".repeat(30));
        let encoded = encode_header_text(&subject);
        let mut decoded = Vec::new();
        for word in encoded.split("\r\n ") {
            assert!(word.len() <= 75, "{word} is {} long", word.len());
            let inner = word
                .strip_prefix("=?utf-8?b?")
                .and_then(|rest| rest.strip_suffix("?="))
                .expect("encoded word");
            decoded.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(inner)
                    .expect("base64"),
            );
        }
        assert_eq!(String::from_utf8(decoded).expect("UTF-8"), subject);
    }

    #[test]
    fn bidi_marks_removed() {
        assert_eq!(printable("Eve\u{202E}lanimirc"), "Eve lanimirc");
    }
}
