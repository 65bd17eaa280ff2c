use std::time::{Duration, Instant};

use super::rules::RuleHits;
use super::*;

fn scanner(spam: &SpamConfig) -> Scanner {
    match Scanner::new(None, spam) {
        Ok(scanner) => scanner,
        Err(error) => panic!("scanner rejected the configuration: {error}"),
    }
}

fn default_scanner() -> Scanner {
    scanner(&SpamConfig::default())
}

fn hits(scanner: &Scanner, message: &str, recipients: usize) -> RuleHits {
    scanner.rules.evaluate(message.as_bytes(), recipients)
}

fn scan(scanner: &Scanner, message: &[u8], recipients: usize) -> Verdict {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => panic!("cannot build a tokio runtime: {error}"),
    };
    match runtime.block_on(scanner.scan(ScanInput {
        message,
        recipients,
        envelope: None,
    })) {
        Ok(verdict) => verdict,
        Err(error) => panic!("scan failed: {error}"),
    }
}

fn plain_message(subject: &str, body: &str) -> String {
    format!(
        "From: Alice Example <alice@example.com>\r\n\
         To: Bob Example <bob@example.org>\r\n\
         Subject: {subject}\r\n\
         Date: Mon, 1 Dec 2025 10:00:00 +0000\r\n\
         Message-ID: <1@example.com>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n\
         {body}\r\n"
    )
}

fn html_message(subject: &str, html: &str) -> String {
    format!(
        "From: alice@example.com\r\n\
         To: bob@example.org\r\n\
         Subject: {subject}\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/html; charset=utf-8\r\n\
         \r\n\
         {html}\r\n"
    )
}

fn message_with_attachment(file_name: &str) -> String {
    format!(
        "From: alice@example.com\r\n\
         To: bob@example.org\r\n\
         Subject: the files\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b1\"\r\n\
         \r\n\
         --b1\r\n\
         Content-Type: text/plain\r\n\
         \r\n\
         Here are the files.\r\n\
         --b1\r\n\
         Content-Type: application/octet-stream\r\n\
         Content-Disposition: attachment; filename=\"{file_name}\"\r\n\
         Content-Transfer-Encoding: base64\r\n\
         \r\n\
         TVqQAAMAAAAEAAAA\r\n\
         --b1--\r\n"
    )
}

fn rule(name: &str, score: f64) -> RuleConfig {
    RuleConfig {
        name: name.to_string(),
        score,
        ..RuleConfig::default()
    }
}

fn operator_rules(rules: Vec<RuleConfig>) -> SpamConfig {
    SpamConfig {
        default_rules: false,
        rules,
        ..SpamConfig::default()
    }
}

const BUSINESS_MESSAGE: &str = "Hi Bob,\r\n\r\n\
    thanks for the call this morning. As agreed, I attach the revised quote for \r\n\
    the 40 units; delivery would be in week 12. Our account manager will confirm \r\n\
    the shipping date. The specification is at https://www.example.com/specs/x40 \r\n\
    and the installation guide is on https://docs.example.org/guide?id=12#setup.\r\n\r\n\
    Please remember to update your password in the supplier portal before Friday.\r\n\r\n\
    Best regards,\r\nAlice\r\n";

#[test]
fn default_rules_parse_and_compile() {
    let defaults = match default_rules::default_rules() {
        Ok(defaults) => defaults,
        Err(error) => panic!("{error}"),
    };
    assert_eq!(defaults.len(), 11);
    assert_eq!(default_scanner().rules.len(), defaults.len());
}

#[test]
fn default_rule_alone_below_threshold() {
    let threshold = SpamConfig::default().threshold;
    let defaults = default_rules::default_rules().unwrap_or_default();
    assert!(!defaults.is_empty());
    for rule in defaults {
        assert!(
            rule.score < threshold,
            "{} scores {} alone, at or above the threshold {threshold}",
            rule.name,
            rule.score
        );
    }
}

#[test]
fn default_rules_each_fire() {
    let many = 60;
    let cases: Vec<(&str, String, usize)> = vec![
        (
            "SCRIPT_ATTACHMENT",
            message_with_attachment("invoice.pdf.VBS"),
            1,
        ),
        (
            "EXECUTABLE_ATTACHMENT",
            message_with_attachment("setup.exe. "),
            1,
        ),
        (
            "PHISH_VERIFY_ACCOUNT",
            plain_message(
                "Notice",
                "Dear user, please verify your e-mail\r\naccount today.",
            ),
            1,
        ),
        (
            "PHISH_VERIFY_ACCOUNT",
            html_message(
                "Notice",
                "<p>Your mailbox account <b>has been</b> suspended.</p>",
            ),
            1,
        ),
        (
            "PHISH_PASSWORD_EXPIRY",
            plain_message("Notice", "Your network password will expire in 2 days."),
            1,
        ),
        (
            "URL_RAW_IP",
            html_message(
                "Notice",
                "<a href=\"http://203.0.113.9/owa/login.php\">Open</a>",
            ),
            1,
        ),
        (
            "URL_SHORTENER",
            plain_message("Notice", "See (https://bit.ly/3xYz) for the document."),
            1,
        ),
        (
            "ADVANCE_FEE",
            plain_message(
                "Hello",
                "I will present you as the next of kin to my late client.",
            ),
            1,
        ),
        (
            "SUBJECT_ADVANCE_FEE",
            plain_message("=?utf-8?q?URGENT_BUSINESS_PROPOSAL?=", "Hello."),
            1,
        ),
        (
            "GIFT_CARD_REQUEST",
            plain_message(
                "quick favour",
                "Can you buy me some Google Play gift cards today?",
            ),
            1,
        ),
        (
            "CRYPTO_PAYMENT",
            plain_message("Payment", "You must send $1500 within 48 hours in Bitcoin."),
            1,
        ),
        (
            "MANY_RECIPIENTS",
            plain_message("Lunch", "Lunch is at noon."),
            many,
        ),
    ];

    let scanner = default_scanner();
    for (name, message, recipients) in &cases {
        let hits = hits(&scanner, message, *recipients);
        assert_eq!(hits.rules, [*name], "message for {name}:\n{message}");
    }

    let fired: std::collections::BTreeSet<&str> = cases.iter().map(|(name, _, _)| *name).collect();
    for rule in default_rules::default_rules().unwrap_or_default() {
        assert!(
            fired.contains(rule.name.as_str()),
            "no test message for {}",
            rule.name
        );
    }
}

#[test]
fn business_message_scores_zero() {
    let scanner = default_scanner();
    let message = plain_message("Quote for the X40 units", BUSINESS_MESSAGE);
    let hits = hits(&scanner, &message, 3);
    assert_eq!(hits.rules, Vec::<String>::new());
    assert_eq!(hits.score, 0.0);
    assert_eq!(scan(&scanner, message.as_bytes(), 3), Verdict::Clean);
}

#[test]
fn intranet_password_notice_stays_clean() {
    let scanner = default_scanner();
    let message = plain_message(
        "Password expiry",
        "Your password expires in 5 days. Change it at https://10.1.2.3/password before then.",
    );
    let hits = hits(&scanner, &message, 1);
    assert_eq!(hits.rules, ["PHISH_PASSWORD_EXPIRY", "URL_RAW_IP"]);
    assert!(hits.score < 5.0);
    assert_eq!(scan(&scanner, message.as_bytes(), 1), Verdict::Clean);
}

#[test]
fn two_strong_signals_are_spam() {
    let scanner = default_scanner();
    let message = "From: alice@example.com\r\n\
         To: bob@example.org\r\n\
         Subject: Mailbox notice\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b1\"\r\n\
         \r\n\
         --b1\r\n\
         Content-Type: text/plain\r\n\
         \r\n\
         Please verify your account by running the attached tool.\r\n\
         --b1\r\n\
         Content-Type: application/octet-stream; name=\"tool.scr\"\r\n\
         Content-Disposition: attachment\r\n\
         \r\n\
         MZ\r\n\
         --b1--\r\n";
    let verdict = scan(&scanner, message.as_bytes(), 1);
    assert_eq!(
        verdict,
        Verdict::Spam {
            engine: "builtin".to_string(),
            score: Some(6.0),
            action: None,
            rules: vec![
                "SCRIPT_ATTACHMENT".to_string(),
                "PHISH_VERIFY_ACCOUNT".to_string()
            ],
        }
    );
    assert_eq!(
        verdict.summary(),
        "spam score 6.0 (SCRIPT_ATTACHMENT, PHISH_VERIFY_ACCOUNT)"
    );
}

#[test]
fn phishing_with_many_recipients_is_spam() {
    let scanner = default_scanner();
    let message = plain_message(
        "Notice",
        "Your email account will be deactivated. Verify your account now.",
    );
    let verdict = scan(&scanner, message.as_bytes(), 80);
    assert_eq!(verdict.kind(), "spam", "{verdict:?}");
}

#[test]
fn gtube_raw_is_spam() {
    let scanner = default_scanner();
    let message = plain_message("test", &format!("Spam test: {GTUBE}"));
    let verdict = scan(&scanner, message.as_bytes(), 1);
    assert_eq!(
        verdict,
        Verdict::Spam {
            engine: "builtin".to_string(),
            score: Some(1000.0),
            action: None,
            rules: vec!["GTUBE".to_string()],
        }
    );
    assert_eq!(verdict.summary(), "spam score 1000.0 (GTUBE)");
}

#[test]
fn gtube_in_base64_body_is_spam() {
    let scanner = default_scanner();
    // Base64 of GTUBE followed by CRLF, so the raw message does not contain it.
    let encoded = "WEpTKkM0SkRCUUFETjEuTlNCTjMqMklETkVOKkdUVUJFLVNUQU5EQVJELUFOVEktVUJFLVRFU1QtRU1BSUwqQy4zNFgNCg==";
    let message = format!(
        "From: a@example.com\r\nSubject: t\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n{encoded}\r\n"
    );
    assert!(!message.contains(GTUBE));
    assert_eq!(hits(&scanner, &message, 1).rules, ["GTUBE"]);
}

#[test]
fn gtube_without_default_rules_is_spam() {
    let scanner = scanner(&operator_rules(Vec::new()));
    assert_eq!(scanner.rules.len(), 0);
    let verdict = scan(&scanner, GTUBE.as_bytes(), 1);
    assert_eq!(verdict.kind(), "spam");
}

#[test]
fn disabled_rules_ignore_gtube() {
    let spam = SpamConfig {
        enabled: false,
        ..SpamConfig::default()
    };
    let scanner = scanner(&spam);
    let message = plain_message("test", GTUBE);
    assert_eq!(scan(&scanner, message.as_bytes(), 500), Verdict::Clean);
}

#[test]
fn header_rule_matches_decoded_subject() {
    let mut subject = rule("SUBJECT_INVOICE", 5.0);
    subject.header = Some("subject".to_string());
    subject.pattern = Some("^Rechnung für".to_string());
    let scanner = scanner(&operator_rules(vec![subject]));

    let encoded = plain_message("=?iso-8859-1?q?Rechnung_f=FCr_Mai?=", "Hallo");
    assert_eq!(hits(&scanner, &encoded, 1).rules, ["SUBJECT_INVOICE"]);

    let other = plain_message("Angebot", "Rechnung für Mai");
    assert!(hits(&scanner, &other, 1).rules.is_empty());
}

#[test]
fn header_rule_matches_addresses() {
    let mut from = rule("FROM_DISPLAY_NAME", 1.0);
    from.header = Some("From".to_string());
    from.pattern = Some("^Alice Example <alice@example\\.com>$".to_string());
    let scanner = scanner(&operator_rules(vec![from]));
    let message = plain_message("hi", "hello");
    assert_eq!(hits(&scanner, &message, 1).rules, ["FROM_DISPLAY_NAME"]);
}

#[test]
fn body_rule_matches_quoted_printable() {
    let mut body = rule("WIRE", 2.0);
    body.body = Some("(?i)wire transfer today".to_string());
    let scanner = scanner(&operator_rules(vec![body]));
    let message = "From: a@example.com\r\nSubject: x\r\nMIME-Version: 1.0\r\n\
                   Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\
                   Please make the wire trans=\r\nfer=20today.\r\n";
    assert_eq!(hits(&scanner, message, 1).rules, ["WIRE"]);
}

#[test]
fn body_rule_skips_attachments() {
    let mut body = rule("MZ", 2.0);
    body.body = Some("TVqQ".to_string());
    let scanner = scanner(&operator_rules(vec![body]));
    assert!(
        hits(&scanner, &message_with_attachment("a.bin"), 1)
            .rules
            .is_empty()
    );
}

#[test]
fn url_host_matches_subdomains_only() {
    let mut hosts = rule("SHORT", 1.0);
    hosts.url_host = Some(vec!["Bit.LY.".to_string(), "bücher.example".to_string()]);
    let scanner = scanner(&operator_rules(vec![hosts]));

    for matching in [
        "http://bit.ly/x",
        "HTTPS://user:pw@BIT.ly:443/x",
        "https://www.bit.ly",
        "<a href='https://links.bit.ly?q=1'>",
        "https://xn--bcher-kva.example/",
        "https://BÜCHER.example/",
    ] {
        let message = plain_message("x", &format!("see {matching} now"));
        assert_eq!(hits(&scanner, &message, 1).rules, ["SHORT"], "{matching}");
    }
    for other in [
        "http://notbit.ly/x",
        "http://bit.ly.example.com/",
        "bit.ly/x",
        "mailto:bit.ly",
    ] {
        let message = plain_message("x", &format!("see {other} now"));
        assert!(hits(&scanner, &message, 1).rules.is_empty(), "{other}");
    }
}

#[test]
fn attachment_type_matches_case_insensitive() {
    let mut types = rule("ARCHIVE", 1.0);
    types.attachment_type = Some(vec![".TAR.GZ".to_string(), "zip".to_string()]);
    let scanner = scanner(&operator_rules(vec![types]));
    for name in ["Backup.tar.GZ", "a.ZIP", "a.zip. "] {
        assert_eq!(
            hits(&scanner, &message_with_attachment(name), 1).rules,
            ["ARCHIVE"],
            "{name}"
        );
    }
    for name in ["zip", "a.gz", "a.zipx"] {
        assert!(
            hits(&scanner, &message_with_attachment(name), 1)
                .rules
                .is_empty(),
            "{name}"
        );
    }
}

#[test]
fn attachment_type_inside_attached_message() {
    let scanner = default_scanner();
    let inner = message_with_attachment("run.hta");
    let message = format!(
        "From: a@example.com\r\nSubject: fwd\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"outer\"\r\n\r\n\
         --outer\r\nContent-Type: text/plain\r\n\r\nforwarded\r\n\
         --outer\r\nContent-Type: message/rfc822\r\n\r\n{inner}\r\n--outer--\r\n"
    );
    assert_eq!(hits(&scanner, &message, 1).rules, ["SCRIPT_ATTACHMENT"]);
}

#[test]
fn min_recipients_counts_envelope() {
    let mut many = rule("TEN", 1.5);
    many.min_recipients = Some(10);
    let scanner = scanner(&operator_rules(vec![many]));
    let message = plain_message("x", "y");
    assert!(hits(&scanner, &message, 9).rules.is_empty());
    assert_eq!(hits(&scanner, &message, 10).rules, ["TEN"]);
}

#[test]
fn negative_score_lowers_total() {
    let mut gift = rule("GIFT", 4.0);
    gift.body = Some("gift".to_string());
    let mut allow = rule("INTERNAL", -3.0);
    allow.header = Some("X-Internal".to_string());
    allow.pattern = Some("^yes$".to_string());
    let spam = SpamConfig {
        threshold: 3.5,
        ..operator_rules(vec![gift, allow])
    };
    let scanner = scanner(&spam);
    let message = plain_message("x", "a gift");
    assert_eq!(scan(&scanner, message.as_bytes(), 1).kind(), "spam");
    let internal = format!("X-Internal: yes\r\n{message}");
    let hits = hits(&scanner, &internal, 1);
    assert_eq!(hits.rules, ["GIFT", "INTERNAL"]);
    assert_eq!(hits.score, 1.0);
    assert_eq!(scan(&scanner, internal.as_bytes(), 1), Verdict::Clean);
}

#[test]
fn operator_rule_replaces_default() {
    let mut quiet = rule("MANY_RECIPIENTS", 0.0);
    quiet.min_recipients = Some(1000);
    let spam = SpamConfig {
        rules: vec![quiet],
        ..SpamConfig::default()
    };
    let scanner = scanner(&spam);
    assert_eq!(scanner.rules.len(), 11);
    let message = plain_message("Lunch", "Lunch is at noon.");
    assert!(hits(&scanner, &message, 60).rules.is_empty());
    assert_eq!(hits(&scanner, &message, 1000).rules, ["MANY_RECIPIENTS"]);
}

#[test]
fn validate_reports_every_bad_rule() {
    let mut none = rule("NONE", 1.0);
    none.name = String::new();

    let mut several = rule("SEVERAL", 1.0);
    several.body = Some("x".to_string());
    several.min_recipients = Some(3);

    let mut bad_regex = rule("BAD_REGEX", 1.0);
    bad_regex.body = Some("(unclosed".to_string());

    let mut pattern_only = rule("PATTERN_ONLY", 1.0);
    pattern_only.pattern = Some("x".to_string());

    let mut header_only = rule("HEADER_ONLY", 1.0);
    header_only.header = Some("Subject".to_string());

    let mut empty_hosts = rule("EMPTY_HOSTS", 1.0);
    empty_hosts.url_host = Some(Vec::new());

    let mut url_not_host = rule("URL_NOT_HOST", 1.0);
    url_not_host.url_host = Some(vec!["https://bit.ly/".to_string()]);

    let mut zero_recipients = rule("ZERO", 1.0);
    zero_recipients.min_recipients = Some(0);

    let mut infinite = rule("INFINITE", f64::INFINITY);
    infinite.min_recipients = Some(2);

    let mut good = rule("GOOD", 1.0);
    good.body = Some("fine".to_string());
    let duplicate = good.clone();

    let mut bad_name = rule("bad name", 1.0);
    bad_name.body = Some("x".to_string());

    let spam = operator_rules(vec![
        none,
        several,
        bad_regex,
        pattern_only,
        header_only,
        empty_hosts,
        url_not_host,
        zero_recipients,
        infinite,
        good,
        duplicate,
        bad_name,
    ]);
    let mut problems = crate::config::Problems::default();
    spam.validate(&mut problems);
    let keys: Vec<&str> = problems
        .0
        .iter()
        .map(|problem| problem.key.as_str())
        .collect();
    assert_eq!(
        keys,
        [
            "scan.spam.rules[10].name",
            "scan.spam.rules[0].name",
            "scan.spam.rules[0]",
            "scan.spam.rules[1]",
            "scan.spam.rules[2].body",
            "scan.spam.rules[3].header",
            "scan.spam.rules[4].pattern",
            "scan.spam.rules[5].url_host",
            "scan.spam.rules[6].url_host",
            "scan.spam.rules[7].min_recipients",
            "scan.spam.rules[8].score",
            "scan.spam.rules[11].name",
        ],
        "{problems}"
    );
    assert!(
        problems.0[4].message.contains("BAD_REGEX"),
        "{}",
        problems.0[4].message
    );
    assert!(
        problems.0[4].message.contains("invalid regex"),
        "{}",
        problems.0[4].message
    );
    assert!(
        problems.0[3].message.contains("body, min_recipients"),
        "{}",
        problems.0[3].message
    );

    let error = match Scanner::new(None, &spam) {
        Ok(_) => panic!("scanner accepted bad rules"),
        Err(error) => error,
    };
    assert!(
        error.contains("scan.spam.rules[2].body: rule \"BAD_REGEX\": invalid regex"),
        "{error}"
    );
    assert!(error.contains("scan.spam.rules[8].score"), "{error}");
}

#[test]
fn scanner_new_rejects_bad_clamd() {
    let clamd = ClamdConfig {
        address: "clamd.sock".to_string(),
        ..ClamdConfig::default()
    };
    match Scanner::new(Some(&clamd), &SpamConfig::default()) {
        Ok(_) => panic!("relative socket path accepted"),
        Err(error) => assert!(error.starts_with("scan.clamd.address:"), "{error}"),
    }
}

#[test]
fn oversized_message_is_unscannable_without_clamd() {
    // Nothing listens on port 1, so contacting clamd would fail the scan.
    let clamd = ClamdConfig {
        address: "127.0.0.1:1".to_string(),
        max_scan_size: 100,
        ..ClamdConfig::default()
    };
    let scanner = match Scanner::new(Some(&clamd), &SpamConfig::default()) {
        Ok(scanner) => scanner,
        Err(error) => panic!("{error}"),
    };
    let message = plain_message("hello", &"a".repeat(200));
    let length = message.len();
    assert_eq!(
        scan(&scanner, message.as_bytes(), 1),
        Verdict::Unscannable {
            reason: format!("message is {length} bytes, above max_scan_size 100"),
        }
    );

    // The built-in rules still run, and spam takes precedence.
    let spam = plain_message("hello", &format!("{GTUBE} {}", "a".repeat(200)));
    assert_eq!(scan(&scanner, spam.as_bytes(), 1).kind(), "spam");
}

#[test]
fn ping_without_clamd_is_none() {
    let scanner = default_scanner();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let Ok(runtime) = runtime else {
        panic!("cannot build a tokio runtime");
    };
    assert!(matches!(runtime.block_on(scanner.ping()), Ok(None)));
}

#[test]
fn scanner_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Scanner>();
    assert_send_sync::<std::sync::Arc<Scanner>>();
}

/// xorshift64: a small deterministic generator for the fuzz tests.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}

#[test]
fn random_bytes_do_not_panic() {
    let scanner = default_scanner();
    let mut random = Xorshift(0x5eed_1234_abcd_ef01);
    for _ in 0..2000 {
        let length = random.below(2048);
        let bytes: Vec<u8> = (0..length).map(|_| random.next() as u8).collect();
        scanner.rules.evaluate(&bytes, random.below(100));
    }
}

#[test]
fn mutated_messages_do_not_panic() {
    let scanner = default_scanner();
    let seeds = [
        message_with_attachment("a.exe"),
        html_message(
            "=?utf-8?b?w6k=?=",
            "<a href=\"http://[::1]:80/\">x</a> http://@/ https://[/",
        ),
        plain_message("x", BUSINESS_MESSAGE),
    ];
    // Fragments that stress the MIME, encoded-word and URL parsers.
    let fragments: [&[u8]; 12] = [
        b"\r\n",
        b"--b1",
        b"--b1--",
        b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n",
        b"Content-Type: message/rfc822\r\n\r\n",
        b"=?utf-8?q?",
        b"?=",
        b"Content-Transfer-Encoding: base64\r\n",
        b"=\r\n",
        b"http://",
        b"\xff\xfe\x00",
        b"filename*=utf-8''%E9%",
    ];
    let mut random = Xorshift(0x0dd_ba11_cafe_f00d);
    for round in 0..3000 {
        let mut bytes = seeds[round % seeds.len()].clone().into_bytes();
        for _ in 0..random.below(8) {
            let position = random.below(bytes.len() + 1);
            match random.below(3) {
                0 => {
                    let fragment = fragments[random.below(fragments.len())];
                    bytes.splice(position..position, fragment.iter().copied());
                }
                1 => {
                    let end = (position + random.below(32)).min(bytes.len());
                    bytes.drain(position..end);
                }
                _ => {
                    if position < bytes.len() {
                        bytes[position] = random.next() as u8;
                    }
                }
            }
        }
        scanner.rules.evaluate(&bytes, 1);
    }
}

#[test]
fn deeply_nested_message_does_not_panic() {
    let scanner = default_scanner();
    let mut message = message_with_attachment("deep.scr");
    for _ in 0..50 {
        message = format!(
            "Subject: n\r\nMIME-Version: 1.0\r\nContent-Type: message/rfc822\r\n\r\n{message}"
        );
    }
    scanner.rules.evaluate(message.as_bytes(), 1);
    let mut multipart = String::from("hello");
    for depth in 0..200 {
        multipart = format!(
            "Content-Type: multipart/mixed; boundary=\"b{depth}\"\r\n\r\n--b{depth}\r\n{multipart}\r\n--b{depth}--\r\n"
        );
    }
    scanner.rules.evaluate(
        format!("Subject: m\r\nMIME-Version: 1.0\r\n{multipart}").as_bytes(),
        1,
    );
}

#[test]
fn large_message_scans_in_linear_time() {
    let scanner = default_scanner();
    let line = "Quarterly numbers: revenue up, costs flat, näher am Ziel, 進捗は順調です. \r\n";
    let mut body = String::with_capacity(10 * 1024 * 1024 + line.len());
    while body.len() < 10 * 1024 * 1024 {
        body.push_str(line);
    }
    let text = plain_message("report", &body);
    let html = html_message(
        "report",
        &format!("<html><body><p>{body}</p></body></html>"),
    );

    for message in [&text, &html] {
        let started = Instant::now();
        let hits = hits(&scanner, message, 1);
        let elapsed = started.elapsed();
        assert!(hits.rules.is_empty(), "{:?}", hits.rules);
        // A quadratic pass over 10 MiB would take hours; the bound only has
        // to separate that from a linear scan on a slow machine.
        assert!(
            elapsed < Duration::from_secs(120),
            "10 MiB took {elapsed:?}"
        );
        eprintln!("10 MiB message scored in {elapsed:?}");
    }
}

#[test]
fn config_example_parses_and_validates() {
    #[derive(serde::Deserialize)]
    struct Example {
        scan: ExampleScan,
    }
    #[derive(serde::Deserialize)]
    struct ExampleScan {
        clamd: ClamdConfig,
        spam: SpamConfig,
    }

    let example: Example = match toml::from_str(include_str!("../../config.toml.example")) {
        Ok(example) => example,
        Err(error) => panic!("config.toml.example does not parse: {error}"),
    };
    assert_eq!(
        example.scan.clamd,
        ClamdConfig {
            address: "127.0.0.1:3310".to_string(),
            ..ClamdConfig::default()
        }
    );
    assert_eq!(example.scan.spam, SpamConfig::default());

    let mut problems = crate::config::Problems::default();
    example.scan.clamd.validate(&mut problems);
    example.scan.spam.validate(&mut problems);
    assert!(problems.is_empty(), "{problems}");
}

#[test]
fn config_example_rules_compile() {
    // The commented [[scan.spam.rules]] examples, uncommented.
    let text: String = include_str!("../../config.toml.example")
        .lines()
        .skip_while(|line| !line.starts_with("# [[scan.spam.rules]]"))
        .take_while(|line| !line.starts_with("[policy]"))
        .map(|line| {
            line.strip_prefix("# ")
                .unwrap_or(line.trim_start_matches('#'))
        })
        .map(|line| format!("{line}\n"))
        .collect();
    let spam: SpamConfig = match toml::from_str::<toml::Table>(&text)
        .map_err(|error| error.to_string())
        .and_then(|table| {
            let rules = table.get("scan").and_then(|scan| scan.get("spam")).cloned();
            rules
                .ok_or_else(|| "no [scan.spam] in the examples".to_string())
                .and_then(|value| {
                    value
                        .try_into()
                        .map_err(|error: toml::de::Error| error.to_string())
                })
        }) {
        Ok(spam) => spam,
        Err(error) => panic!("rule examples do not parse: {error}\n{text}"),
    };
    assert_eq!(spam.rules.len(), 5);
    let scanner = scanner(&spam);
    assert_eq!(scanner.rule_count(), 15);
}

#[test]
fn huge_timeout_does_not_panic() {
    let listener = match std::net::TcpListener::bind("127.0.0.1:0") {
        Ok(listener) => listener,
        Err(error) => panic!("cannot bind a loopback port: {error}"),
    };
    let address = match listener.local_addr() {
        Ok(address) => address.to_string(),
        Err(error) => panic!("{error}"),
    };
    drop(listener);
    let clamd: ClamdConfig = match toml::from_str(&format!(
        "address = \"{address}\"\ntimeout = \"1000years\"\n"
    )) {
        Ok(clamd) => clamd,
        Err(error) => panic!("{error}"),
    };
    let scanner = match Scanner::new(Some(&clamd), &SpamConfig::default()) {
        Ok(scanner) => scanner,
        Err(error) => panic!("{error}"),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let Ok(runtime) = runtime else {
        panic!("cannot build a tokio runtime");
    };
    let result = runtime.block_on(scanner.scan(ScanInput {
        message: b"Subject: x\r\n\r\nhello\r\n",
        recipients: 1,
        envelope: None,
    }));
    assert!(
        matches!(result, Err(ScanError::Connect { .. })),
        "{result:?}"
    );
}

#[test]
fn disabled_rules_are_still_checked() {
    let mut bad = rule("BAD", 1.0);
    bad.body = Some("(".to_string());
    let spam = SpamConfig {
        enabled: false,
        ..operator_rules(vec![bad])
    };
    match Scanner::new(None, &spam) {
        Ok(_) => panic!("invalid rule accepted while rules are disabled"),
        Err(error) => assert!(error.starts_with("scan.spam.rules[0].body"), "{error}"),
    }
}

/// A message/rfc822 part whose body is another message/rfc822 header block,
/// inside a multipart whose first boundary line runs into the part headers.
/// mail-parser 0.11.9 loses track of its part stack on it and, in debug
/// builds, panics in a `debug_assert!`.
const PART_STACK_MISMATCH: &[u8] = b"Content-Type:multipart; boundary=outer\n\r\n\
    --outerContent-Type: message/rfc822\n\n\
    Content-Type: message/rfc822\r\n\n\n--outer--";

#[test]
fn parser_panic_falls_back_to_raw_checks() {
    let scanner = default_scanner();
    let mut message = PART_STACK_MISMATCH.to_vec();
    message.extend_from_slice(b"\r\n");
    message.extend_from_slice(GTUBE.as_bytes());

    let hits = scanner.rules.evaluate(&message, 60);

    assert_eq!(hits.rules, ["GTUBE", "MANY_RECIPIENTS"]);
    assert_eq!(scan(&scanner, &message, 1).kind(), "spam");
    assert_eq!(scan(&scanner, PART_STACK_MISMATCH, 1), Verdict::Clean);
}

/// Encodes `data` as base64 in lines of 76 characters.
fn base64_lines(data: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut encoded = String::new();
    for chunk in data.chunks(3) {
        let bytes = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let value = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]);
        for position in 0..4 {
            if position <= chunk.len() {
                encoded.push(char::from(
                    ALPHABET[(value >> (18 - 6 * position)) as usize & 63],
                ));
            } else {
                encoded.push('=');
            }
        }
    }
    let mut lines = String::new();
    for (index, character) in encoded.chars().enumerate() {
        if index > 0 && index % 76 == 0 {
            lines.push_str("\r\n");
        }
        lines.push(character);
    }
    lines
}

/// Builds `depth` message/rfc822 headers, each starting the next nested
/// message, around a short text message.
fn message_chain(depth: usize) -> String {
    let mut chain = String::new();
    for level in 0..depth {
        chain.push_str(&format!(
            "Subject: level {level}\r\nContent-Type: message/rfc822\r\n\r\n"
        ));
    }
    chain.push_str("Subject: innermost\r\n\r\ntext\r\n");
    chain
}

#[test]
fn encoded_nested_messages_no_overflow() {
    // mail-parser 0.11.9 copies the parse of an encoded message part
    // recursively, so this message would overflow the 2 MiB test thread
    // stack if it were parsed in full.
    let mut subject = rule("SUBJECT", 10.0);
    subject.header = Some("Subject".to_string());
    subject.pattern = Some("^outer$".to_string());
    let mut body = rule("BODY", 10.0);
    body.body = Some("plain text before".to_string());
    let scanner = scanner(&operator_rules(vec![subject, body]));
    let message = format!(
        "Subject: outer\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=b1\r\n\r\n\
         --b1\r\nContent-Type: text/plain\r\n\r\nplain text before\r\n\
         --b1\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n\
         {}\r\n--b1--\r\n",
        base64_lines(message_chain(20_000).as_bytes())
    );

    let hits = scanner.rules.evaluate(message.as_bytes(), 1);

    // The top-level headers and the raw text are still scored.
    assert_eq!(hits.rules, ["SUBJECT", "BODY"]);
}

#[test]
fn message_chain_drops_iteratively() {
    let scanner = default_scanner();
    let mut message = String::from("Subject: outer\r\nMIME-Version: 1.0\r\n");
    message.push_str(
        "Content-Type: multipart/mixed; boundary=b1\r\n\r\n\
         --b1\r\nContent-Type: application/octet-stream\r\n\
         Content-Disposition: attachment; filename=\"run.scr\"\r\n\r\nMZ\r\n\
         --b1\r\nContent-Type: message/rfc822\r\n\r\n",
    );
    // Below the part limit, so the structure is parsed.
    message.push_str(&message_chain(9_000));
    message.push_str("--b1--\r\n");

    let hits = scanner.rules.evaluate(message.as_bytes(), 1);

    // The attachment beside the chain shows that the structure was parsed.
    assert_eq!(hits.rules, ["SCRIPT_ATTACHMENT"]);
}

#[test]
fn encoded_message_parts_skip_structure() {
    let mut decoded = rule("DECODED", 10.0);
    decoded.body = Some("decoded probe".to_string());
    let scanner = scanner(&operator_rules(vec![decoded]));
    let text_part = format!(
        "Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n",
        base64_lines(b"a decoded probe")
    );
    let inner = base64_lines(b"Subject: inner\r\n\r\nhello\r\n");
    // (extra part, whether the structure is parsed)
    let cases = [
        (String::new(), true),
        (
            "Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\nhi\r\n".to_string(),
            true,
        ),
        (
            "Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
             Subject: inner\r\n\r\nhi\r\n"
                .to_string(),
            true,
        ),
        (
            format!(
                "Content-Type: application/pdf; name=\"message.pdf\"\r\n\
                 Content-Transfer-Encoding: base64\r\n\r\n{inner}\r\n"
            ),
            true,
        ),
        (
            format!(
                "Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n{inner}\r\n"
            ),
            false,
        ),
        (
            format!(
                "content-transfer-encoding: Quoted-Printable\r\nCONTENT-TYPE: Message/Global\r\n\r\n{inner}\r\n"
            ),
            false,
        ),
        (
            format!(
                "Content-Type:\r\n (comment) \"message\"/rfc822\r\n\
                 Content-Transfer-Encoding: =?utf-8?q?base64?=\r\n\r\n{inner}\r\n"
            ),
            false,
        ),
        (
            format!(
                "Content-Type: multipart/digest; boundary=d\r\n\r\n\
                 --d\r\nContent-Transfer-Encoding: base64\r\n\r\n{inner}\r\n--d--\r\n"
            ),
            false,
        ),
    ];
    for (extra_part, structure) in cases {
        let message = format!(
            "Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n\
             --b1\r\n{text_part}--b1\r\n{extra_part}--b1--\r\n"
        );
        let expected: &[&str] = if structure { &["DECODED"] } else { &[] };
        assert_eq!(
            scanner.rules.evaluate(message.as_bytes(), 1).rules,
            expected,
            "extra part:\n{extra_part}"
        );
    }
}

#[test]
fn missing_boundary_scores_body() {
    let mut phrase = rule("PHRASE", 10.0);
    phrase.body = Some("visible phrase".to_string());
    let scanner = scanner(&operator_rules(vec![phrase]));
    // The unbalanced quote makes the boundary `b1; charset=`, which never
    // appears, so the whole body is one text part.
    let message = "Subject: x\r\nMIME-Version: 1.0\r\n\
        Content-Type: multipart/mixed; boundary=\"b1; charset=\"utf-8\r\n\r\n\
        --b1\r\nContent-Type: text/plain\r\n\r\na visible phrase\r\n--b1--\r\n";

    assert_eq!(hits(&scanner, message, 1).rules, ["PHRASE"]);
}

#[test]
fn unterminated_last_header_scored() {
    let mut subject = rule("SUBJECT", 10.0);
    subject.header = Some("Subject".to_string());
    subject.pattern = Some("^probe".to_string());
    let scanner = scanner(&operator_rules(vec![subject]));

    for message in [
        "Subject: probe",
        "From: a@example.com\r\nSubject: probe",
        "Subject: probe\r\n folded",
        "Subject: probe\r\n folded\r\n\t",
        "Subject: probe\n folded",
    ] {
        assert_eq!(
            hits(&scanner, message, 1).rules,
            ["SUBJECT"],
            "message {message:?}"
        );
    }
}

#[test]
fn part_limit_skips_structure() {
    let mut phrase = rule("PHRASE", 10.0);
    phrase.body = Some("visible phrase".to_string());
    let scanner = scanner(&operator_rules(vec![phrase]));
    let with_parts = |count: usize| {
        let mut message = String::from(
            "Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=s\r\n\r\n",
        );
        for _ in 0..count {
            message.push_str("--s\r\n\r\nx\r\n");
        }
        message.push_str(
            "--s\r\nContent-Type: application/octet-stream\r\n\
             Content-Disposition: attachment; filename=\"run.scr\"\r\n\r\nMZ\r\n\
             --s\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n",
        );
        message.push_str(&base64_lines(b"a visible phrase"));
        message.push_str("\r\n--s--\r\n");
        message
    };

    // 9 000 parts are parsed, so the attachment and the decoded text count.
    let below = with_parts(9_000);
    let default_hits = hits(&default_scanner(), &below, 1);
    assert_eq!(default_hits.rules, ["SCRIPT_ATTACHMENT"]);
    assert_eq!(hits(&scanner, &below, 1).rules, ["PHRASE"]);

    // Past 10 000 part markers only the raw text counts, where the phrase is
    // still base64.
    let above = with_parts(10_001);
    assert!(hits(&default_scanner(), &above, 1).rules.is_empty());
    assert!(hits(&scanner, &above, 1).rules.is_empty());
}

#[test]
fn colon_line_limit_skips_structure() {
    let mut subject = rule("SUBJECT", 10.0);
    subject.header = Some("Subject".to_string());
    subject.pattern = Some("^probe$".to_string());
    let mut last = rule("LAST", 10.0);
    last.header = Some("X-Last".to_string());
    last.pattern = Some("^yes$".to_string());
    let scanner = scanner(&operator_rules(vec![subject, last]));
    let with_fields = |count: usize| {
        let mut message = String::from("Subject: probe\r\n");
        for index in 0..count {
            message.push_str(&format!("X-Field-{index}: value\r\n"));
        }
        message.push_str("X-Last: yes\r\n\r\nbody\r\n");
        message
    };

    assert_eq!(
        hits(&scanner, &with_fields(99_990), 1).rules,
        ["SUBJECT", "LAST"]
    );
    // Past 100 000 lines with a colon only the first 1 000 lines are read
    // for header fields.
    assert_eq!(hits(&scanner, &with_fields(100_000), 1).rules, ["SUBJECT"]);
}

#[test]
fn config_example_engines_parse_with_defaults() {
    // The commented [scan.rspamd] and [scan.spamd] settings, uncommented:
    // settings start with '#' and a key, prose with "# ".
    let text: String = include_str!("../../config.toml.example")
        .lines()
        .skip_while(|line| !line.starts_with("#[scan.rspamd]"))
        .take_while(|line| !line.starts_with("[scan.spam]"))
        .filter_map(|line| line.strip_prefix('#'))
        .filter(|line| !line.is_empty() && !line.starts_with([' ', '#']))
        .map(|line| format!("{line}\n"))
        .collect();

    #[derive(serde::Deserialize)]
    struct Example {
        scan: ExampleScan,
    }
    #[derive(serde::Deserialize)]
    struct ExampleScan {
        rspamd: RspamdConfig,
        spamd: SpamdConfig,
    }
    let example: Example = match toml::from_str(&text) {
        Ok(example) => example,
        Err(error) => panic!("engine examples do not parse: {error}\n{text}"),
    };
    assert_eq!(
        example.scan.rspamd,
        RspamdConfig {
            address: "127.0.0.1:11333".to_string(),
            ..RspamdConfig::default()
        }
    );
    assert_eq!(
        example.scan.spamd,
        SpamdConfig {
            address: "127.0.0.1:783".to_string(),
            ..SpamdConfig::default()
        }
    );

    let mut problems = crate::config::Problems::default();
    example.scan.rspamd.validate(&mut problems);
    example.scan.spamd.validate(&mut problems);
    assert!(problems.is_empty(), "{problems}");
}
