//! The rspamd and spamd clients against the real engines (see
//! `tests/common/rspamd.rs` and `tests/common/spamd.rs`), and against fake
//! servers for failures the real ones do not produce on demand.

mod common;

use common::realistic_message;
use common::rspamd::Rspamd;
use common::spamd::Spamd;
use sendguard::config::ScanConfig;
use sendguard::scan::{
    ActionClass, Envelope, OnError, RspamdConfig, ScanError, ScanInput, ScanReport, Scanner,
    SpamConfig, SpamdCommand, SpamdConfig, Verdict,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

fn gtube_message() -> Vec<u8> {
    realistic_message(GTUBE)
}

fn marker_message() -> Vec<u8> {
    realistic_message("Reference: sendguard-test-marker")
}

fn rspamd_config(address: &str) -> RspamdConfig {
    RspamdConfig {
        address: address.to_string(),
        timeout: Duration::from_secs(30),
        ..RspamdConfig::default()
    }
}

fn spamd_config(address: &str) -> SpamdConfig {
    SpamdConfig {
        address: address.to_string(),
        timeout: Duration::from_secs(30),
        ..SpamdConfig::default()
    }
}

/// Builds a scanner with the given engines and the built-in rules turned
/// off, so every verdict comes from the engines under test.
fn scanner(rspamd: Option<RspamdConfig>, spamd: Option<SpamdConfig>) -> Scanner {
    let config = ScanConfig {
        clamd: None,
        spam: SpamConfig {
            enabled: false,
            ..SpamConfig::default()
        },
        rspamd,
        spamd,
    };
    match Scanner::from_config(&config) {
        Ok(scanner) => scanner,
        Err(error) => panic!("scanner rejected the configuration: {error}"),
    }
}

/// Returns the envelope of a message from 127.0.0.1, which rspamd treats
/// as local.
fn local_envelope<'a>(recipients: &'a [String]) -> Envelope<'a> {
    Envelope {
        transaction: "test-1",
        sender: "<alice@example.org>",
        recipients,
        client: Some("127.0.0.1".parse().expect("address")),
        client_name: Some("localhost"),
        helo: Some("localhost"),
        login: None,
    }
}

async fn scan(scanner: &Scanner, message: &[u8]) -> Result<Verdict, ScanError> {
    let recipients = ["<bob@example.net>".to_string()];
    scanner
        .scan(ScanInput {
            message,
            recipients: 1,
            envelope: Some(local_envelope(&recipients)),
        })
        .await
}

async fn verdict(scanner: &Scanner, message: &[u8]) -> Verdict {
    match scan(scanner, message).await {
        Ok(verdict) => verdict,
        Err(error) => panic!("scan failed: {error}"),
    }
}

async fn report(scanner: &Scanner, message: &[u8]) -> ScanReport {
    let recipients = ["<bob@example.net>".to_string()];
    scanner
        .report(ScanInput {
            message,
            recipients: 1,
            envelope: Some(local_envelope(&recipients)),
        })
        .await
}

#[tokio::test]
async fn rspamd_gtube_is_spam() {
    let rspamd = Rspamd::start();
    let scanner = scanner(Some(rspamd_config(&rspamd.address)), None);
    let verdict = verdict(&scanner, &gtube_message()).await;
    assert_eq!(
        verdict,
        Verdict::Spam {
            engine: "rspamd".to_string(),
            score: Some(15.0),
            action: Some("reject".to_string()),
            rules: vec!["GTUBE".to_string()],
        }
    );
    assert_eq!(
        verdict.summary(),
        "spam rspamd score 15.0 action reject (GTUBE)"
    );
}

#[tokio::test]
async fn spamd_gtube_is_spam() {
    let spamd = Spamd::start();
    let scanner = scanner(None, Some(spamd_config(&spamd.address)));
    match verdict(&scanner, &gtube_message()).await {
        Verdict::Spam {
            engine,
            score,
            action,
            rules,
        } => {
            assert_eq!(engine, "spamd");
            // GTUBE alone is 1000 points; other rules move it a little.
            let score = score.expect("spamd reports a score");
            assert!((990.0..1010.0).contains(&score), "score {score}");
            assert_eq!(action, None);
            assert!(rules.contains(&"GTUBE".to_string()), "{rules:?}");
        }
        other => panic!("expected spam, got {other:?}"),
    }
}

#[tokio::test]
async fn rspamd_marker_score_passes_through() {
    let rspamd = Rspamd::start();
    let scanner = scanner(Some(rspamd_config(&rspamd.address)), None);
    match verdict(&scanner, &marker_message()).await {
        Verdict::Suspect {
            engine,
            score,
            action,
            rules,
        } => {
            assert_eq!(engine, "rspamd");
            assert_eq!(action.as_deref(), Some("add header"));
            // The marker's 7.25 plus stock symbols worth a few tenths.
            let score = score.expect("rspamd reports a score");
            assert!((6.5..8.0).contains(&score), "score {score}");
            assert_eq!(
                rules.first().map(String::as_str),
                Some("SENDGUARD_TEST_MARKER(7.25)"),
                "{rules:?}"
            );
        }
        other => panic!("expected a suspect verdict, got {other:?}"),
    }
}

#[tokio::test]
async fn spamd_marker_score_passes_through() {
    let spamd = Spamd::start();
    let scanner = scanner(None, Some(spamd_config(&spamd.address)));
    match verdict(&scanner, &marker_message()).await {
        Verdict::Spam { score, rules, .. } => {
            let score = score.expect("spamd reports a score");
            assert!((6.5..8.0).contains(&score), "score {score}");
            assert!(
                rules.contains(&"SENDGUARD_TEST_MARKER".to_string()),
                "{rules:?}"
            );
        }
        other => panic!("expected spam, got {other:?}"),
    }

    // CHECK returns the score without rule names.
    let check = SpamdConfig {
        command: SpamdCommand::Check,
        ..spamd_config(&spamd.address)
    };
    match verdict(&scanner_with_spamd(check), &marker_message()).await {
        Verdict::Spam { score, rules, .. } => {
            assert!(score.is_some_and(|score| score > 7.0), "score {score:?}");
            assert!(rules.is_empty(), "{rules:?}");
        }
        other => panic!("expected spam, got {other:?}"),
    }

    // An operator threshold above the score makes the same message clean.
    let lenient = SpamdConfig {
        threshold: Some(10.0),
        ..spamd_config(&spamd.address)
    };
    assert_eq!(
        verdict(&scanner_with_spamd(lenient), &marker_message()).await,
        Verdict::Clean
    );
}

fn scanner_with_spamd(config: SpamdConfig) -> Scanner {
    scanner(None, Some(config))
}

#[tokio::test]
async fn realistic_message_is_clean_everywhere() {
    let rspamd = Rspamd::start();
    let spamd = Spamd::start();
    let scanner = scanner(
        Some(rspamd_config(&rspamd.address)),
        Some(spamd_config(&spamd.address)),
    );
    let report = report(&scanner, &realistic_message("")).await;
    let engines: Vec<&str> = report.results.iter().map(|result| result.engine).collect();
    assert_eq!(engines, ["rspamd", "spamd"]);
    for engine in &report.results {
        match &engine.result {
            Ok(verdict) => assert_eq!(*verdict, Verdict::Clean, "{}", engine.engine),
            Err(error) => panic!("{} failed: {error}", engine.engine),
        }
    }
    assert_eq!(report.into_verdict().ok(), Some(Verdict::Clean));
}

#[tokio::test]
async fn spamd_over_unix_socket() {
    let shared = Spamd::start();
    // A reused spamd may come without its socket path; start one with it.
    let own;
    let socket = if shared.socket.as_os_str().is_empty() {
        own = Spamd::start_own();
        own.socket.clone()
    } else {
        shared.socket.clone()
    };
    let scanner = scanner(None, Some(spamd_config(&socket.display().to_string())));
    assert_eq!(verdict(&scanner, &gtube_message()).await.kind(), "spam");
    assert_eq!(
        verdict(&scanner, &realistic_message("")).await,
        Verdict::Clean
    );
}

#[tokio::test]
async fn rspamd_receives_the_envelope() {
    let rspamd = Rspamd::start();
    let scanner = scanner(Some(rspamd_config(&rspamd.address)), None);
    let message = realistic_message("Check: sendguard-envelope-check");
    let recipients = ["<bob@example.net>".to_string()];
    let envelope = Envelope {
        transaction: "envelope-1",
        sender: "<alice@example.org>",
        recipients: &recipients,
        client: Some("192.0.2.44".parse().expect("address")),
        client_name: Some("pc44.example.org"),
        helo: Some("pc44-helo.example.org"),
        login: Some("alice"),
    };
    // The test rule fires only when every header arrived as sent.
    match scan_with(&scanner, &message, envelope).await {
        Ok(Verdict::Spam { rules, action, .. }) => {
            assert_eq!(action.as_deref(), Some("reject"));
            assert!(
                rules
                    .iter()
                    .any(|rule| rule.starts_with("SENDGUARD_TEST_ENVELOPE(")),
                "{rules:?}"
            );
        }
        other => panic!("expected spam from the envelope rule, got {other:?}"),
    }

    // One field off, and it does not.
    for changed in [
        Envelope {
            login: None,
            ..envelope
        },
        Envelope {
            client_name: None,
            ..envelope
        },
        Envelope {
            helo: Some("other.example.org"),
            ..envelope
        },
        Envelope {
            sender: "<carol@example.org>",
            ..envelope
        },
    ] {
        match scan_with(&scanner, &message, changed).await {
            Ok(Verdict::Spam { rules, .. }) => panic!("rule fired for {changed:?}: {rules:?}"),
            Ok(_) => {}
            Err(error) => panic!("scan failed: {error}"),
        }
    }
}

async fn scan_with(
    scanner: &Scanner,
    message: &[u8],
    envelope: Envelope<'_>,
) -> Result<Verdict, ScanError> {
    scanner
        .scan(ScanInput {
            message,
            recipients: 1,
            envelope: Some(envelope),
        })
        .await
}

#[tokio::test]
async fn engine_down_follows_on_error() {
    let closed = common::closed_address();
    for engine in ["rspamd", "spamd"] {
        // Under tempfail the scan fails with the engine's connect error.
        let (rspamd, spamd) = engines_at(engine, &closed, OnError::Tempfail);
        match scan(&scanner(rspamd, spamd), &realistic_message("")).await {
            Err(ScanError::Connect {
                engine: failed,
                address,
                source,
            }) => {
                assert_eq!(failed, engine);
                assert_eq!(address, closed);
                assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused);
            }
            other => panic!("{engine}: expected a connect error, got {other:?}"),
        }

        // Under accept the other engines decide: here the built-in rules.
        let (rspamd, spamd) = engines_at(engine, &closed, OnError::Accept);
        let config = ScanConfig {
            rspamd,
            spamd,
            ..ScanConfig::default()
        };
        let scanner = match Scanner::from_config(&config) {
            Ok(scanner) => scanner,
            Err(error) => panic!("{error}"),
        };
        assert_eq!(
            verdict(&scanner, &realistic_message("")).await,
            Verdict::Clean,
            "{engine}"
        );
        assert_eq!(
            verdict(&scanner, &gtube_message()).await.engine(),
            Some("builtin"),
            "{engine}"
        );
    }
}

/// Returns a configuration with only `engine` set, at `address`.
fn engines_at(
    engine: &str,
    address: &str,
    on_error: OnError,
) -> (Option<RspamdConfig>, Option<SpamdConfig>) {
    match engine {
        "rspamd" => (
            Some(RspamdConfig {
                on_error,
                ..rspamd_config(address)
            }),
            None,
        ),
        _ => (
            None,
            Some(SpamdConfig {
                on_error,
                ..spamd_config(address)
            }),
        ),
    }
}

#[tokio::test]
async fn partial_failure_is_never_clean() {
    let spamd = Spamd::start();
    let closed = common::closed_address();
    // spamd finds the message clean, but rspamd is down under tempfail.
    let scanner = scanner(
        Some(rspamd_config(&closed)),
        Some(spamd_config(&spamd.address)),
    );
    match scan(&scanner, &realistic_message("")).await {
        Err(error) => assert_eq!(error.engine(), "rspamd"),
        Ok(verdict) => panic!("expected a failure, got {verdict:?}"),
    }
    // spamd's spam still decides while rspamd is down.
    assert_eq!(
        verdict(&scanner, &gtube_message()).await.engine(),
        Some("spamd")
    );
}

#[tokio::test]
async fn add_header_counts_when_mapped_to_spam() {
    let rspamd = Rspamd::start();
    let mut config = rspamd_config(&rspamd.address);
    config
        .actions
        .insert("add header".to_string(), ActionClass::Spam);
    let scanner = scanner(Some(config), None);
    let verdict = verdict(&scanner, &marker_message()).await;
    assert_eq!(verdict.kind(), "spam", "{verdict:?}");
    assert!(
        verdict
            .summary()
            .contains("action add header (SENDGUARD_TEST_MARKER(7.25)"),
        "{}",
        verdict.summary()
    );
}

/// Starts a loopback server that runs `serve` on every connection and
/// counts the connections.
async fn fake_server<F, Fut>(serve: F) -> (String, Arc<AtomicUsize>)
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = match TcpListener::bind("127.0.0.1:0").await {
        Ok(listener) => listener,
        Err(error) => panic!("cannot bind a loopback port: {error}"),
    };
    let address = match listener.local_addr() {
        Ok(address) => address.to_string(),
        Err(error) => panic!("cannot read the bound address: {error}"),
    };
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(stream));
        }
    });
    (address, connections)
}

/// Reads one HTTP request with a Content-Length body; `false` when the
/// client closed the connection.
async fn read_http_request(stream: &mut TcpStream) -> bool {
    let mut request = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        if let Some(end) = request.windows(4).position(|window| window == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .and_then(|value| value.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if request.len() >= end + 4 + length {
                return true;
            }
        }
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return false,
            Ok(read) => request.extend_from_slice(&buffer[..read]),
        }
    }
}

fn http_response(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test]
async fn rspamd_client_reuses_connections() {
    // A server that keeps connections open, unlike rspamd 3.4.
    let (address, connections) = fake_server(|mut stream| async move {
        while read_http_request(&mut stream).await {
            let body = r#"{"action":"no action","score":0.5,"symbols":{}}"#;
            if stream
                .write_all(&http_response("200 OK", body))
                .await
                .is_err()
            {
                return;
            }
        }
    })
    .await;
    let scanner = scanner(Some(rspamd_config(&address)), None);
    for _ in 0..3 {
        assert_eq!(
            verdict(&scanner, &realistic_message("")).await,
            Verdict::Clean
        );
    }
    assert_eq!(connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn rspamd_bad_replies_are_failures() {
    let cases: [(&str, &str, &str); 3] = [
        ("200 OK", "not json", "invalid JSON"),
        // The error quotes the reason in Rust's debug form.
        ("200 OK", r#"{"score":3.0}"#, r#"no \"action\""#),
        (
            "500 Internal Server Error",
            r#"{"error":"broken"}"#,
            "HTTP 500: broken",
        ),
    ];
    for (status, body, expected) in cases {
        let (address, _) = fake_server(move |mut stream| async move {
            if read_http_request(&mut stream).await {
                let _ = stream.write_all(&http_response(status, body)).await;
            }
        })
        .await;
        let error = match scan(&scanner(Some(rspamd_config(&address)), None), b"x").await {
            Err(error) => error,
            Ok(verdict) => panic!("{body}: expected a failure, got {verdict:?}"),
        };
        assert_eq!(error.engine(), "rspamd");
        let text = error.to_string();
        assert!(text.contains(expected), "{body}: {text}");

        // Under accept the same reply leaves the message to the others.
        let accepting = RspamdConfig {
            on_error: OnError::Accept,
            ..rspamd_config(&address)
        };
        assert_eq!(
            verdict(&scanner(Some(accepting), None), b"x").await,
            Verdict::Clean
        );
    }
}

#[tokio::test]
async fn spamd_bad_replies_are_failures() {
    let cases: [(&[u8], &str); 4] = [
        (b"garbage\r\n\r\n", "does not start with SPAMD/"),
        (b"SPAMD/1.1 0 EX_OK\r\n\r\n", "no Spam header"),
        (b"SPAMD/1.1 76 Bad header line\r\n", "76 Bad header line"),
        (
            b"SPAMD/1.1 0 EX_OK\r\nContent-length: 50\r\nSpam: True ; 9.0 / 5.0\r\n\r\nA,B",
            "closed in the middle of the reply",
        ),
    ];
    for (reply, expected) in cases {
        let (address, _) = fake_server(move |mut stream| async move {
            let mut request = vec![0u8; 4096];
            let _ = stream.read(&mut request).await;
            let _ = stream.write_all(reply).await;
        })
        .await;
        let error = match scan(&scanner(None, Some(spamd_config(&address))), b"x").await {
            Err(error) => error,
            Ok(verdict) => panic!("expected a failure, got {verdict:?}"),
        };
        assert_eq!(error.engine(), "spamd");
        let text = error.to_string();
        assert!(
            text.contains(expected),
            "{:?}: {text}",
            String::from_utf8_lossy(reply)
        );
    }
}

#[tokio::test]
async fn silent_engines_time_out() {
    let (address, _) = fake_server(|stream| async move {
        // Hold the connection without replying.
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(stream);
    })
    .await;
    let timeout = Duration::from_millis(300);
    let rspamd = RspamdConfig {
        timeout,
        ..rspamd_config(&address)
    };
    let spamd = SpamdConfig {
        timeout,
        ..spamd_config(&address)
    };
    for (name, scanner) in [
        ("rspamd", scanner(Some(rspamd), None)),
        ("spamd", scanner(None, Some(spamd))),
    ] {
        let started = Instant::now();
        match scan(&scanner, &realistic_message("")).await {
            Err(error @ ScanError::Timeout { .. }) => {
                assert_eq!(error.engine(), name);
                assert!(
                    error.to_string().contains("timed out after 300ms"),
                    "{error}"
                );
            }
            other => panic!("{name}: expected a time-out, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{name}");
    }
}
