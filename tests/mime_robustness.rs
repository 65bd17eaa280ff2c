//! Robustness of the built-in classifier against hostile MIME structure, and of the relay
//! against a deeply nested message end to end.
//!
//! The classifier tests drive `Scanner` without clamd, once on the test thread (2 MiB stack
//! unless RUST_MIN_STACK raises it) and once in a task on a tokio worker thread with a 2 MiB
//! stack, as the server runs it. Each test checks the verdict, the scan time and the peak
//! heap use of the scan. Probe rules with a score above the threshold show in the verdict
//! which parts of the message the classifier reached.

mod common;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::clamd::Clamd;
use common::sendguard::Sendguard;
use common::smtp_client::SmtpClient;
use common::upstream::{Upstream, UpstreamOptions};
use sendguard::scan::{RuleConfig, ScanInput, Scanner, SpamConfig, Verdict};

/// Counts heap use per thread, so that a scan's peak can be measured while other tests
/// allocate on their own threads.
mod heap {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    struct CountingAllocator;

    #[global_allocator]
    static ALLOCATOR: CountingAllocator = CountingAllocator;

    thread_local! {
        // Const-initialized cells without destructors never allocate and stay usable
        // until the thread exits.
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn record(delta: isize) {
        let _ = LIVE.try_with(|live| {
            let now = live.get() + delta;
            live.set(now);
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
        });
    }

    // SAFETY: every call is passed to the system allocator unchanged. The counters are
    // thread-local cells, which neither allocate nor lock.
    unsafe impl GlobalAlloc for CountingAllocator {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: the caller upholds the GlobalAlloc contract for `layout`.
            let pointer = unsafe { System.alloc(layout) };
            if !pointer.is_null() {
                record(layout.size() as isize);
            }
            pointer
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            // SAFETY: as for `alloc`.
            let pointer = unsafe { System.alloc_zeroed(layout) };
            if !pointer.is_null() {
                record(layout.size() as isize);
            }
            pointer
        }

        unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
            // SAFETY: `pointer` was allocated by this allocator with `layout`.
            unsafe { System.dealloc(pointer, layout) };
            record(-(layout.size() as isize));
        }

        unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: `pointer` was allocated by this allocator with `layout`.
            let moved = unsafe { System.realloc(pointer, layout, new_size) };
            if !moved.is_null() {
                record(new_size as isize - layout.size() as isize);
            }
            moved
        }
    }

    /// Starts a measurement on this thread and returns its baseline.
    pub fn start() -> isize {
        let live = LIVE.with(|live| live.get());
        PEAK.with(|peak| peak.set(live));
        live
    }

    /// Returns the peak of the bytes allocated on this thread since `start` returned
    /// `baseline`. Memory freed on another thread is not seen, so this can overstate.
    pub fn peak_since(baseline: isize) -> usize {
        PEAK.with(|peak| peak.get().saturating_sub(baseline).max(0) as usize)
    }
}

/// Maximum time of one classifier scan in any test here. A debug build on 2 cores
/// takes under 3 s for the largest input, 10 MiB, so the bound only separates a linear pass
/// from a quadratic one, which would take hours on these inputs.
const MAX_SCAN_TIME: Duration = Duration::from_secs(60);

/// Peak heap use allowed for one scan, as a multiple of the message size plus a constant.
/// The highest measured ratio is about 6, for 100 000 address, date and received header
/// fields. Messages with more MIME parts or header fields are scored without their structure,
/// because mail-parser 0.11.9 keeps 0.1 to 1.5 KiB per part or field.
const MAX_HEAP_PER_INPUT_BYTE: usize = 8;
const MAX_HEAP_BASE: usize = 16 << 20;

/// Stack size of the tokio worker thread, tokio's default stated explicitly.
const WORKER_STACK_SIZE: usize = 2 << 20;

/// Score of the probe rules, above the default threshold of 5.0, so that each matching
/// probe is listed in the verdict.
const PROBE_SCORE: f64 = 10.0;

const PROBE_SUBJECT: &str = "probe-subject";
const PROBE_BODY: &str = "probe-body";

fn probe_rules() -> Vec<RuleConfig> {
    let probe = |name: &str| RuleConfig {
        name: name.to_string(),
        score: PROBE_SCORE,
        ..RuleConfig::default()
    };
    vec![
        RuleConfig {
            header: Some("Subject".to_string()),
            pattern: Some(PROBE_SUBJECT.to_string()),
            ..probe("PROBE_SUBJECT")
        },
        RuleConfig {
            header: Some("From".to_string()),
            pattern: Some("^Prüfer Sender <probe@example\\.com>$".to_string()),
            ..probe("PROBE_FROM")
        },
        RuleConfig {
            body: Some(PROBE_BODY.to_string()),
            ..probe("PROBE_BODY")
        },
        RuleConfig {
            attachment_type: Some(vec!["probe".to_string()]),
            ..probe("PROBE_ATTACHMENT")
        },
        RuleConfig {
            url_host: Some(vec!["probe.example".to_string()]),
            ..probe("PROBE_URL")
        },
    ]
}

fn scanner() -> Scanner {
    let spam = SpamConfig {
        rules: probe_rules(),
        ..SpamConfig::default()
    };
    match Scanner::new(None, &spam) {
        Ok(scanner) => scanner,
        Err(error) => panic!("scanner rejected the probe rules: {error}"),
    }
}

/// Verdict, time and peak heap use of one scan.
#[derive(Debug)]
struct Measured {
    verdict: Verdict,
    elapsed: Duration,
    peak_heap: usize,
}

async fn measure_scan(scanner: &Scanner, message: &[u8]) -> Measured {
    let baseline = heap::start();
    let started = Instant::now();
    let result = scanner
        .scan(ScanInput {
            message,
            recipients: 1,
            envelope: None,
        })
        .await;
    let elapsed = started.elapsed();
    let peak_heap = heap::peak_since(baseline);
    match result {
        Ok(verdict) => Measured {
            verdict,
            elapsed,
            peak_heap,
        },
        Err(error) => panic!("scan without clamd failed: {error}"),
    }
}

fn scan_on_test_thread(scanner: &Scanner, message: &[u8]) -> Measured {
    let runtime = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(runtime) => runtime,
        Err(error) => panic!("cannot build a tokio runtime: {error}"),
    };
    runtime.block_on(measure_scan(scanner, message))
}

fn scan_on_tokio_worker(scanner: Arc<Scanner>, message: Arc<Vec<u8>>) -> Measured {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_stack_size(WORKER_STACK_SIZE)
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => panic!("cannot build a tokio runtime: {error}"),
    };
    let task = runtime.spawn(async move { measure_scan(&scanner, &message).await });
    match runtime.block_on(task) {
        Ok(measured) => measured,
        Err(error) => panic!("scan task on the tokio worker failed: {error}"),
    }
}

fn rules_of(verdict: &Verdict) -> Vec<String> {
    match verdict {
        Verdict::Clean => Vec::new(),
        Verdict::Spam { rules, .. } => rules.clone(),
        other => panic!("verdict {other:?} without clamd"),
    }
}

/// Scans `message` on the test thread and on a tokio worker thread, checks that both give
/// the same verdict within the time and heap bounds, and prints the measurements (shown with
/// `--nocapture`). Returns the rules listed in the verdict, none for a clean message.
fn classify(case: &str, message: Vec<u8>) -> Vec<String> {
    let scanner = Arc::new(scanner());
    let message = Arc::new(message);
    let on_test_thread = scan_on_test_thread(&scanner, &message);
    let on_worker = scan_on_tokio_worker(Arc::clone(&scanner), Arc::clone(&message));

    assert_eq!(
        on_test_thread.verdict, on_worker.verdict,
        "{case}: the verdict depends on the thread"
    );
    let heap_bound = message.len() * MAX_HEAP_PER_INPUT_BYTE + MAX_HEAP_BASE;
    for (thread, run) in [
        ("test thread", &on_test_thread),
        ("tokio worker", &on_worker),
    ] {
        eprintln!(
            "{case}: {} bytes scanned on the {thread} in {:?}, peak heap {} bytes, verdict {:?}",
            message.len(),
            run.elapsed,
            run.peak_heap,
            run.verdict
        );
        assert!(
            run.elapsed < MAX_SCAN_TIME,
            "{case}: scan on the {thread} took {:?}",
            run.elapsed
        );
        assert!(
            run.peak_heap < heap_bound,
            "{case}: scan on the {thread} used {} bytes of heap for {} bytes of input",
            run.peak_heap,
            message.len()
        );
    }

    rules_of(&on_test_thread.verdict)
}

const TOP_HEADERS: &str = "From: alice@example.com\r\n\
    To: bob@example.org\r\n\
    Subject: report\r\n\
    MIME-Version: 1.0\r\n";

/// Builds a message whose multipart/mixed parts nest `depth` levels deep, each with its own
/// boundary, around `innermost`, the headers and body of the innermost part.
fn nested_multipart(depth: usize, innermost: &str) -> Vec<u8> {
    let mut message = String::from(TOP_HEADERS);
    for level in 0..depth {
        let _ = write!(
            message,
            "Content-Type: multipart/mixed; boundary=\"n{level}\"\r\n\r\n--n{level}\r\n"
        );
    }
    message.push_str(innermost);
    message.push_str("\r\n");
    for level in (0..depth).rev() {
        let _ = write!(message, "--n{level}--\r\n");
    }
    message.into_bytes()
}

/// Builds a message whose message/rfc822 parts nest `depth` levels deep around a text
/// message with the probe subject and body.
fn nested_messages(depth: usize) -> Vec<u8> {
    let mut message = String::from(TOP_HEADERS);
    message.push_str("Content-Type: message/rfc822\r\n\r\n");
    for level in 1..depth {
        let _ = write!(
            message,
            "Subject: level {level}\r\nContent-Type: message/rfc822\r\n\r\n"
        );
    }
    let _ = write!(
        message,
        "Subject: {PROBE_SUBJECT}\r\nContent-Type: text/plain\r\n\r\n{PROBE_BODY}\r\n"
    );
    message.into_bytes()
}

/// Builds a multipart/mixed message with `count` parts side by side, alternating text parts
/// and attachments. The last part is a text part with the probe body.
fn sibling_parts(count: usize) -> Vec<u8> {
    let mut message = String::from(TOP_HEADERS);
    message.push_str("Content-Type: multipart/mixed; boundary=\"s\"\r\n\r\n");
    for index in 0..count - 1 {
        if index % 2 == 0 {
            let _ = write!(
                message,
                "--s\r\nContent-Type: text/plain\r\n\r\npart {index}\r\n"
            );
        } else {
            let _ = write!(
                message,
                "--s\r\nContent-Type: application/octet-stream\r\n\
                 Content-Disposition: attachment; filename=\"file{index}.txt\"\r\n\r\n\
                 data {index}\r\n"
            );
        }
    }
    let _ = write!(
        message,
        "--s\r\nContent-Type: text/plain\r\n\r\n{PROBE_BODY}\r\n--s--\r\n"
    );
    message.into_bytes()
}

/// Encodes `data` as base64 in lines of 76 characters.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut encoded = String::new();
    for (index, chunk) in data.chunks(3).enumerate() {
        if index > 0 && index % 19 == 0 {
            encoded.push_str("\r\n");
        }
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
    encoded
}

fn text_part(body: &str) -> String {
    format!("Content-Type: text/plain; charset=utf-8\r\n\r\n{body}")
}

// --- Classifier ---

#[test]
fn folded_header_cut_off_at_end() {
    let cases: &[(&str, &[u8], &[&str])] = &[
        (
            "folded subject",
            b"From: alice@example.com\r\nSubject: probe-subject\r\n continued\r\n\tmore",
            &["PROBE_SUBJECT"],
        ),
        (
            "folded subject with line ending",
            b"From: alice@example.com\r\nSubject: probe-subject\r\n continued\r\n",
            &["PROBE_SUBJECT"],
        ),
        (
            "fold without text",
            b"From: alice@example.com\r\nSubject: probe-subject\r\n ",
            &["PROBE_SUBJECT"],
        ),
        (
            "bare LF fold",
            b"Subject: probe-subject\n more",
            &["PROBE_SUBJECT"],
        ),
        (
            "encoded word cut off",
            b"From: alice@example.com\r\nSubject: =?utf-8?q?probe-subj",
            &[],
        ),
        (
            "content type parameters",
            b"Subject: probe-subject\r\nContent-Type: multipart/mixed;\r\n boundary=",
            &["PROBE_SUBJECT"],
        ),
        (
            "quoted boundary",
            b"Subject: probe-subject\r\nContent-Type: multipart/mixed;\r\n boundary=\"b1",
            &["PROBE_SUBJECT"],
        ),
        (
            "address list",
            b"Subject: probe-subject\r\nTo: bob@example.org,\r\n \"Carol",
            &["PROBE_SUBJECT"],
        ),
        ("header name only", b"Subject", &[]),
        ("colon only", b"Subject:", &[]),
        ("CR only", b"Subject: x\r", &[]),
    ];
    for &(case, message, expected) in cases {
        let rules = classify(case, message.to_vec());
        assert_eq!(rules, expected, "{case}");
    }
}

#[test]
fn nested_multipart_50000_levels() {
    let innermost = text_part(&format!("{PROBE_BODY} https://probe.example/"));
    let message = nested_multipart(50_000, &innermost);

    let rules = classify("50 000 nested multiparts", message);

    // Past 10 000 part markers the classifier scores the top-level headers and the raw
    // text, where the probe text is plain.
    assert_eq!(rules, ["PROBE_BODY", "PROBE_URL"]);
}

#[test]
fn nested_multipart_attachment() {
    let innermost = "Content-Type: application/octet-stream\r\n\
        Content-Disposition: attachment; filename=\"deep.probe\"\r\n\r\ndata";

    // Each level has a Content-Type and three "--" pairs, so 2 000 levels make 8 000 part
    // markers, below the limit of 10 000.
    let parsed = classify(
        "attachment under 2 000 multiparts",
        nested_multipart(2_000, innermost),
    );
    let skipped = classify(
        "attachment under 50 000 multiparts",
        nested_multipart(50_000, innermost),
    );

    assert_eq!(parsed, ["PROBE_ATTACHMENT"]);
    assert_eq!(skipped, Vec::<String>::new());
}

#[test]
fn nested_messages_50000_levels() {
    let rules = classify("50 000 nested messages", nested_messages(50_000));

    // Without the structure, the text of attached messages counts as body text too.
    assert_eq!(rules, ["PROBE_BODY"]);
}

#[test]
fn nested_messages_in_base64_part() {
    let mut inner = String::new();
    for level in 0..5_000 {
        let _ = write!(
            inner,
            "Subject: level {level}\r\nContent-Type: message/rfc822\r\n\r\n"
        );
    }
    inner.push_str("Subject: innermost\r\n\r\nhidden text\r\n");
    let message = format!(
        "From: alice@example.com\r\nSubject: {PROBE_SUBJECT}\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=b1\r\n\r\n\
         --b1\r\nContent-Type: text/plain\r\n\r\n{PROBE_BODY}\r\n\
         --b1\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n\
         {}\r\n--b1--\r\n",
        base64(inner.as_bytes())
    );

    let rules = classify(
        "5 000 nested messages in a base64 part",
        message.into_bytes(),
    );

    // The classifier gives up on the structure of a message with an encoded message
    // part, because mail-parser would parse it with a recursion per nesting level.
    assert_eq!(rules, ["PROBE_SUBJECT", "PROBE_BODY"]);
}

#[test]
fn sibling_parts_50000() {
    let rules = classify("50 000 sibling parts", sibling_parts(50_000));

    assert_eq!(rules, ["PROBE_BODY"]);
}

#[test]
fn empty_parts_1_mib() {
    let mut message =
        format!("{TOP_HEADERS}Content-Type: multipart/mixed; boundary=s\r\n\r\n{PROBE_BODY}\r\n");
    while message.len() < 1 << 20 {
        message.push_str("--s\n\n");
    }

    let rules = classify("1 MiB of empty parts", message.into_bytes());

    assert_eq!(rules, ["PROBE_BODY"]);
}

#[test]
fn unbalanced_quotes_in_content_type() {
    let cases: &[(&str, String, &[&str])] = &[
        (
            "unterminated boundary",
            format!(
                "{TOP_HEADERS}Content-Type: multipart/mixed; boundary=\"b1\r\n\r\n\
                 --b1\r\n{}\r\n--b1--\r\n",
                text_part(PROBE_BODY)
            ),
            &["PROBE_BODY"],
        ),
        (
            // The boundary becomes `b1; charset=`, which never appears, so
            // the whole body is scored as one text.
            "unterminated boundary before another parameter",
            format!(
                "{TOP_HEADERS}Content-Type: multipart/mixed; boundary=\"b1; charset=\"utf-8\r\n\r\n\
                 --b1\r\n{}\r\n--b1--\r\n",
                text_part(PROBE_BODY)
            ),
            &["PROBE_BODY"],
        ),
        (
            "escaped quote in boundary",
            format!(
                "{TOP_HEADERS}Content-Type: multipart/mixed; boundary=\"a\\\"b\"\r\n\r\n\
                 --a\"b\r\n{}\r\n--a\"b--\r\n",
                text_part(PROBE_BODY)
            ),
            &["PROBE_BODY"],
        ),
        (
            "unterminated file name",
            format!(
                "{TOP_HEADERS}Content-Type: multipart/mixed; boundary=b1\r\n\r\n\
                 --b1\r\nContent-Type: application/octet-stream; name=\"x.probe\r\n\
                 Content-Disposition: attachment; filename=\"x.probe\r\n\r\ndata\r\n--b1--\r\n"
            ),
            &["PROBE_ATTACHMENT"],
        ),
        (
            "quote at the end of the header",
            format!("{TOP_HEADERS}Content-Type: text/plain; charset=\"\r\n\r\n{PROBE_BODY}\r\n"),
            &["PROBE_BODY"],
        ),
        (
            "many unbalanced quotes",
            format!(
                "{TOP_HEADERS}Content-Type: text/plain; {}\r\n\r\n{PROBE_BODY}\r\n",
                "a=\"; ".repeat(20_000)
            ),
            &["PROBE_BODY"],
        ),
    ];
    for (case, message, expected) in cases {
        let rules = classify(case, message.clone().into_bytes());
        assert_eq!(rules, *expected, "{case}");
    }
}

#[test]
fn boundary_mid_line() {
    let message = format!(
        "{TOP_HEADERS}Content-Type: multipart/mixed; boundary=b1\r\n\r\n\
         --b1\r\nContent-Type: text/plain\r\n\r\n\
         text --b1\r\nmore text --b1--\r\nstill the first part https://probe.example/\r\n\
         --b1\r\nContent-Type: text/plain\r\n\r\n{PROBE_BODY}\r\n--b1--\r\n"
    );

    let rules = classify("boundary mid-line", message.into_bytes());

    // NOTE: RFC 2046 starts a delimiter only at the start of a line, but
    // mail-parser 0.11.9 ends the first part at "text --b1" and drops the
    // text up to the next delimiter line, so the URL there is not scored.
    // clamd still scans the whole message.
    assert_eq!(rules, ["PROBE_BODY"]);
}

#[test]
fn encoded_words_in_structured_headers() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "display name",
            "From: =?utf-8?q?Pr=C3=BCfer_Sender?= <probe@example.com>\r\n",
            &["PROBE_FROM"],
        ),
        (
            "quoted display name",
            "From: \"=?utf-8?b?UHLDvGZlciBTZW5kZXI=?=\" <probe@example.com>\r\n",
            &["PROBE_FROM"],
        ),
        (
            "encoded address",
            "From: =?utf-8?q?probe=40example=2Ecom?=\r\n",
            &[],
        ),
        (
            "encoded media type",
            "Content-Type: =?utf-8?q?multipart/mixed?=; boundary=b1\r\n",
            &[],
        ),
        (
            "encoded file name",
            "Content-Type: application/octet-stream\r\n\
             Content-Disposition: attachment; filename=\"=?utf-8?q?report=2Eprobe?=\"\r\n",
            &["PROBE_ATTACHMENT"],
        ),
        (
            "encoded message id",
            "Message-ID: <=?utf-8?q?a=40b?=@example.com>\r\nReferences: =?utf-8?q?<x@y>?=\r\n",
            &[],
        ),
        (
            "encoded date and received",
            "Date: =?utf-8?q?Mon,_1_Dec_2025?=\r\n\
             Received: from =?utf-8?q?a?= by =?utf-8?b?Yg==?=; =?utf-8?q?Mon?=\r\n",
            &[],
        ),
        (
            "malformed encoded words",
            "From: =?utf-8?b?!!!?= =?x-unknown?q?a?= =?utf-8?q?unterminated <a@example.com>\r\n\
             To: =?utf-8?q??=, =??q?a?=, =?utf-8*en?q?a?=\r\n",
            &[],
        ),
        (
            "long encoded word",
            &format!(
                "From: =?utf-8?q?{}?= <a@example.com>\r\n",
                "=C3=BC".repeat(100_000)
            ),
            &[],
        ),
    ];
    for (case, headers, expected) in cases {
        let message = format!("{headers}Subject: x\r\n\r\nbody\r\n");
        let rules = classify(case, message.into_bytes());
        assert_eq!(rules, *expected, "{case}");
    }
}

#[test]
fn single_line_10_mib() {
    const SIZE: usize = 10 << 20;
    let mut body_line = format!("{TOP_HEADERS}\r\n{PROBE_BODY} ").into_bytes();
    body_line.resize(body_line.len() + SIZE, b'a');

    let mut header_line = b"Subject: ".to_vec();
    header_line.resize(header_line.len() + SIZE, b'a');
    header_line.extend_from_slice(b"\r\n\r\nbody\r\n");

    // Every host differs, so each URL goes through host normalization. A 2 MiB line of
    // them takes under 2 s in a debug build.
    let mut url_line = format!("{TOP_HEADERS}\r\nhttps://probe.example ").into_bytes();
    let mut index = 0;
    while url_line.len() < 2 << 20 {
        url_line.extend_from_slice(format!("http://a{index}.example/ ").as_bytes());
        index += 1;
    }

    let cases = [
        ("10 MiB body line", body_line, vec!["PROBE_BODY"]),
        ("10 MiB header line", header_line, vec![]),
        ("2 MiB line of URLs", url_line, vec!["PROBE_URL"]),
    ];
    for (case, message, expected) in cases {
        let rules = classify(case, message);
        assert_eq!(rules, expected, "{case}");
    }
}

#[test]
fn headers_100000() {
    let mut message = format!("From: alice@example.com\r\nSubject: {PROBE_SUBJECT}\r\n");
    for index in 0..100_000 {
        let _ = write!(message, "X-Header-{index}: value {index}\r\n");
    }
    let _ = write!(message, "\r\n{PROBE_BODY}\r\n");

    let rules = classify("100 000 headers", message.into_bytes());

    // Past 100 000 lines with a colon, the header fields in the first 1 000 lines count.
    assert_eq!(rules, ["PROBE_SUBJECT", "PROBE_BODY"]);
}

#[test]
fn parsed_headers_100000() {
    // Header fields that mail-parser parses into addresses, dates and received traces.
    let mut message = String::new();
    for index in 0..25_000 {
        let _ = write!(
            message,
            "To: user{index} <user{index}@example.org>\r\n\
             Date: Mon, 1 Dec 2025 10:00:00 +0000\r\n\
             Received: from a{index}.example by b.example; Mon, 1 Dec 2025 10:00:00 +0000\r\n\
             Subject: =?utf-8?q?subject_{index}?=\r\n"
        );
    }
    message.push_str("\r\nbody\r\n");

    let rules = classify("100 000 parsed headers", message.into_bytes());

    assert_eq!(rules, Vec::<String>::new());
}

#[test]
fn address_headers_1_mib() {
    let mut message = format!("Subject: {PROBE_SUBJECT}\n");
    while message.len() < 1 << 20 {
        message.push_str("To:a@b\n");
    }

    let rules = classify("1 MiB of address headers", message.into_bytes());

    assert_eq!(rules, ["PROBE_SUBJECT"]);
}

// --- End to end ---

/// Builds the EICAR test file at run time, so that this source file is not flagged by
/// virus scanners.
fn eicar() -> Vec<u8> {
    let mut eicar = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$".to_vec();
    eicar.extend_from_slice(b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*");
    eicar
}

fn clamd_section(clamd: &Clamd, extra: &str) -> String {
    format!(
        "[scan.clamd]\naddress = \"{}\"\ntimeout = \"30s\"\n{extra}\n",
        clamd.address
    )
}

/// Sends one message in its own session, so that a rejection cannot affect the next one.
fn send(server: &Sendguard, sender: &str, content: &[u8]) -> u16 {
    let mut client = SmtpClient::connect(&server.address);
    client.cmd("EHLO client.test", 250);
    let reply = client.send_message(sender, &["bob@example.net"], content);
    client.quit();
    reply.code
}

#[test]
fn nested_message_through_relay() {
    let clamd = Clamd::start();
    let upstream = Upstream::start(UpstreamOptions::default());
    let server = Sendguard::start(&upstream.address(), &clamd_section(&clamd, ""));

    // clamd (ClamAV 1.4.6 here) stops at its MaxRecursion limit, 17 by default according
    // to clamd.conf(5), long before the EICAR file in base64 at the bottom. AlertExceedsMax
    // turns that into a finding that sendguard rejects as unscannable.
    let eicar_part = format!(
        "Content-Type: application/octet-stream\r\n\
         Content-Transfer-Encoding: base64\r\n\
         Content-Disposition: attachment; filename=\"eicar.com\"\r\n\r\n{}",
        base64(&eicar())
    );
    let infected = nested_multipart(50_000, &eicar_part);
    assert_eq!(send(&server, "deep@example.org", &infected), 554);
    assert!(
        server
            .log()
            .contains("Heuristics.Limits.Exceeded.MaxRecursion"),
        "no MaxRecursion verdict in the log:\n{}",
        server.log()
    );

    // The same file as plain text matches clamd's signature on the raw stream first.
    let eicar_text = String::from_utf8_lossy(&eicar()).into_owned();
    let plain = nested_multipart(50_000, &text_part(&eicar_text));
    assert_eq!(send(&server, "plain@example.org", &plain), 550);

    // A clean message within clamd's limit is relayed unchanged.
    let clean = nested_multipart(10, &text_part("hello"));
    assert_eq!(send(&server, "clean@example.org", &clean), 250);
    let received = upstream.wait_for_messages(1, Duration::from_secs(20));
    assert!(received[0].content == clean, "10-level message changed");

    // Beyond the limit a clean message is unscannable too, and is relayed unchanged when
    // on_unscannable is accept.
    let clean = nested_multipart(50_000, &text_part("hello"));
    assert_eq!(send(&server, "clean@example.org", &clean), 554);
    let accepting = Sendguard::start(
        &upstream.address(),
        &clamd_section(&clamd, "on_unscannable = \"accept\""),
    );
    assert_eq!(send(&accepting, "clean@example.org", &clean), 250);
    let received = upstream.wait_for_messages(2, Duration::from_secs(20));
    assert_eq!(received.len(), 2);
    // sendguard marks the accepted unscannable message with one header field on top.
    let relayed = &received[1].content;
    let marker_end = relayed
        .windows(2)
        .position(|pair| pair == b"\r\n")
        .map_or(0, |end| end + 2);
    let (marker, rest) = relayed.split_at(marker_end);
    let marker = String::from_utf8_lossy(marker);
    assert!(
        marker.starts_with("X-Sendguard-Unscanned: ") && marker.contains("MaxRecursion"),
        "first header field {marker:?}"
    );
    assert!(rest == clean, "50 000-level message changed");
    assert!(!received[1].bare_line_ending);

    let transcript = String::from_utf8_lossy(&upstream.transcript()).into_owned();
    assert!(!transcript.contains("EICAR"), "EICAR reached the upstream");
}
