//! Scanner against a real clamd loaded with the signatures in
//! `fixtures/clamd`, plus fake clamd servers on loopback for replies that a
//! real clamd cannot easily be made to send.

mod common;

use std::time::{Duration, Instant};

use common::clamd::{Clamd, closed_port_address};
use sendguard::scan::{
    ClamdConfig, GTUBE, OnError, ScanError, ScanInput, Scanner, SpamConfig, Verdict,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const TEST_VIRUS_MARKER: &str = "SENDGUARD-TEST-VIRUS-MARKER-7f3a";
const TEST_PHISHING_MARKER: &str = "SENDGUARD-TEST-PHISHING-MARKER-7f3a";
const TEST_PUA_MARKER: &str = "SENDGUARD-TEST-PUA-MARKER-7f3a";

const EICAR_NAME: &str = "Eicar-Test-Signature.UNOFFICIAL";

/// Builds the EICAR test file at run time so that this source file itself
/// is not flagged by virus scanners.
fn eicar() -> Vec<u8> {
    let mut eicar = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$".to_vec();
    eicar.extend_from_slice(b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*");
    assert_eq!(eicar.len(), 68);
    eicar
}

fn clamd_config(address: &str) -> ClamdConfig {
    ClamdConfig {
        address: address.to_string(),
        timeout: Duration::from_secs(20),
        ..ClamdConfig::default()
    }
}

/// Returns the configuration for a fake clamd that replies to one request
/// per connection, without IDSESSION.
fn fake_config(address: &str) -> ClamdConfig {
    ClamdConfig {
        sessions: 0,
        ..clamd_config(address)
    }
}

fn scanner(clamd: &ClamdConfig) -> Scanner {
    match Scanner::new(Some(clamd), &SpamConfig::default()) {
        Ok(scanner) => scanner,
        Err(error) => panic!("scanner rejected the configuration: {error}"),
    }
}

async fn scan(scanner: &Scanner, message: &[u8]) -> Result<Verdict, ScanError> {
    scanner
        .scan(ScanInput {
            message,
            recipients: 1,
            envelope: None,
        })
        .await
}

async fn verdict(scanner: &Scanner, message: &[u8]) -> Verdict {
    match scan(scanner, message).await {
        Ok(verdict) => verdict,
        Err(error) => panic!("scan failed: {error}"),
    }
}

fn text_message(body: &str) -> Vec<u8> {
    format!(
        "From: alice@example.com\r\n\
         To: bob@example.org\r\n\
         Subject: meeting notes\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n\
         {body}\r\n"
    )
    .into_bytes()
}

fn message_with_attachment(file_name: &str, content_type: &str, data: &[u8]) -> Vec<u8> {
    format!(
        "From: alice@example.com\r\n\
         To: bob@example.org\r\n\
         Subject: the file\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"part-boundary\"\r\n\
         \r\n\
         --part-boundary\r\n\
         Content-Type: text/plain\r\n\
         \r\n\
         Here is the file.\r\n\
         --part-boundary\r\n\
         Content-Type: {content_type}; name=\"{file_name}\"\r\n\
         Content-Disposition: attachment; filename=\"{file_name}\"\r\n\
         Content-Transfer-Encoding: base64\r\n\
         \r\n\
         {}\r\n\
         --part-boundary--\r\n",
        base64_lines(data)
    )
    .into_bytes()
}

/// Encodes `data` as base64 in 76-character lines (RFC 2045).
fn base64_lines(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut encoded = String::new();
    for chunk in data.chunks(3) {
        let bytes = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let group = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]);
        for index in 0..4 {
            if index <= chunk.len() {
                let sextet = (group >> (18 - 6 * index)) & 0x3f;
                encoded.push(ALPHABET[sextet as usize] as char);
            } else {
                encoded.push('=');
            }
        }
    }
    let lines: Vec<&str> = encoded
        .as_bytes()
        .chunks(76)
        .map(|line| std::str::from_utf8(line).unwrap_or_default())
        .collect();
    lines.join("\r\n")
}

/// CRC-32 (IEEE 802.3), as the zip format requires.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xedb8_8320 & mask);
        }
    }
    !crc
}

/// Encodes `data` as a deflate stream of two stored (uncompressed) blocks,
/// split in the middle. Each block starts with a 5-byte header, so the raw
/// stream does not contain `data` in one piece.
fn deflate_in_two_stored_blocks(data: &[u8]) -> Vec<u8> {
    let (first, second) = data.split_at(data.len() / 2);
    let mut stream = Vec::new();
    for (block, is_final) in [(first, false), (second, true)] {
        let length = block.len() as u16;
        // BFINAL bit, then BTYPE 00 (stored), padded to the byte boundary.
        stream.push(u8::from(is_final));
        stream.extend_from_slice(&length.to_le_bytes());
        stream.extend_from_slice(&(!length).to_le_bytes());
        stream.extend_from_slice(block);
    }
    stream
}

/// Builds a zip archive holding one deflate-compressed file.
fn zip_archive(name: &str, data: &[u8]) -> Vec<u8> {
    let compressed = deflate_in_two_stored_blocks(data);
    let crc = crc32(data);
    let compressed_size = compressed.len() as u32;
    let size = data.len() as u32;
    let name_len = name.len() as u16;
    let mut zip = Vec::new();

    // Local file header.
    zip.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
    zip.extend_from_slice(&20u16.to_le_bytes()); // version needed: 2.0 (deflate)
    zip.extend_from_slice(&0u16.to_le_bytes()); // flags
    zip.extend_from_slice(&8u16.to_le_bytes()); // method: deflate
    zip.extend_from_slice(&0u16.to_le_bytes()); // modification time
    zip.extend_from_slice(&0x0021u16.to_le_bytes()); // modification date: 1980-01-01
    zip.extend_from_slice(&crc.to_le_bytes());
    zip.extend_from_slice(&compressed_size.to_le_bytes());
    zip.extend_from_slice(&size.to_le_bytes());
    zip.extend_from_slice(&name_len.to_le_bytes());
    zip.extend_from_slice(&0u16.to_le_bytes()); // extra field length
    zip.extend_from_slice(name.as_bytes());
    zip.extend_from_slice(&compressed);

    // Central directory.
    let directory_offset = zip.len() as u32;
    zip.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
    zip.extend_from_slice(&20u16.to_le_bytes()); // version made by
    zip.extend_from_slice(&20u16.to_le_bytes()); // version needed
    zip.extend_from_slice(&0u16.to_le_bytes()); // flags
    zip.extend_from_slice(&8u16.to_le_bytes()); // method
    zip.extend_from_slice(&0u16.to_le_bytes()); // time
    zip.extend_from_slice(&0x0021u16.to_le_bytes()); // date
    zip.extend_from_slice(&crc.to_le_bytes());
    zip.extend_from_slice(&compressed_size.to_le_bytes());
    zip.extend_from_slice(&size.to_le_bytes());
    zip.extend_from_slice(&name_len.to_le_bytes());
    zip.extend_from_slice(&0u16.to_le_bytes()); // extra field length
    zip.extend_from_slice(&0u16.to_le_bytes()); // comment length
    zip.extend_from_slice(&0u16.to_le_bytes()); // disk number
    zip.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
    zip.extend_from_slice(&0u32.to_le_bytes()); // external attributes
    zip.extend_from_slice(&0u32.to_le_bytes()); // local header offset
    zip.extend_from_slice(name.as_bytes());
    let directory_size = zip.len() as u32 - directory_offset;

    // End of central directory record.
    zip.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    zip.extend_from_slice(&0u16.to_le_bytes()); // this disk
    zip.extend_from_slice(&0u16.to_le_bytes()); // disk with the directory
    zip.extend_from_slice(&1u16.to_le_bytes()); // entries on this disk
    zip.extend_from_slice(&1u16.to_le_bytes()); // entries in total
    zip.extend_from_slice(&directory_size.to_le_bytes());
    zip.extend_from_slice(&directory_offset.to_le_bytes());
    zip.extend_from_slice(&0u16.to_le_bytes()); // comment length
    zip
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

fn virus(name: &str) -> Verdict {
    Verdict::Virus {
        name: name.to_string(),
    }
}

#[tokio::test]
async fn eicar_raw_is_virus() {
    let clamd = Clamd::start();
    let scanner = scanner(&clamd_config(&clamd.address));
    assert_eq!(verdict(&scanner, &eicar()).await, virus(EICAR_NAME));
}

#[tokio::test]
async fn eicar_base64_attachment_is_virus() {
    let clamd = Clamd::start();
    let scanner = scanner(&clamd_config(&clamd.address));
    let message = message_with_attachment("eicar.com", "application/octet-stream", &eicar());
    // The raw message contains EICAR only in base64, so clamd must decode it.
    assert!(!contains(&message, &eicar()));
    assert_eq!(verdict(&scanner, &message).await, virus(EICAR_NAME));
}

#[tokio::test]
async fn eicar_zipped_attachment_is_virus() {
    let clamd = Clamd::start();
    let scanner = scanner(&clamd_config(&clamd.address));
    let zip = zip_archive("eicar.com", &eicar());
    // EICAR is split by a deflate block header inside the archive, so clamd
    // must both decode the base64 and unpack the zip to find it.
    assert!(!contains(&zip, &eicar()));
    let message = message_with_attachment("report.zip", "application/zip", &zip);
    assert_eq!(verdict(&scanner, &message).await, virus(EICAR_NAME));
}

#[tokio::test]
async fn eicar_across_chunk_boundary_is_virus() {
    let clamd = Clamd::start();
    let scanner = scanner(&clamd_config(&clamd.address));
    // The scanner sends 64 KiB chunks; EICAR starts 30 bytes before the end
    // of the first one, so clamd finds it only if the chunks join correctly.
    let mut message = vec![b' '; 64 * 1024 - 30];
    message.extend_from_slice(&eicar());
    message.extend(std::iter::repeat_n(b' ', 3 * 64 * 1024));
    assert_eq!(verdict(&scanner, &message).await, virus(EICAR_NAME));
}

#[tokio::test]
async fn test_signature_is_virus() {
    let clamd = Clamd::start();
    let scanner = scanner(&clamd_config(&clamd.address));
    let message = text_message(&format!("payload {TEST_VIRUS_MARKER} end"));
    assert_eq!(
        verdict(&scanner, &message).await,
        virus("Sendguard.Test.Virus.UNOFFICIAL")
    );
}

#[tokio::test]
async fn phishing_signature_is_spam() {
    let clamd = Clamd::start();
    let scanner = scanner(&clamd_config(&clamd.address));
    let message = text_message(&format!("click {TEST_PHISHING_MARKER} now"));
    let verdict = verdict(&scanner, &message).await;
    assert_eq!(
        verdict,
        Verdict::Spam {
            engine: "clamd".to_string(),
            score: None,
            action: None,
            rules: vec!["Heuristics.Phishing.Sendguard.Test.UNOFFICIAL".to_string()],
        }
    );
    assert_eq!(
        verdict.summary(),
        "spam Heuristics.Phishing.Sendguard.Test.UNOFFICIAL"
    );
}

#[tokio::test]
async fn phishing_signature_as_virus_when_configured() {
    let clamd = Clamd::start();
    let mut config = clamd_config(&clamd.address);
    config.names.insert(
        "Heuristics.Phishing.Sendguard.".to_string(),
        sendguard::scan::NameClass::Virus,
    );
    let scanner = scanner(&config);
    let message = text_message(&format!("click {TEST_PHISHING_MARKER} now"));
    assert_eq!(
        verdict(&scanner, &message).await,
        virus("Heuristics.Phishing.Sendguard.Test.UNOFFICIAL")
    );
}

#[tokio::test]
async fn pua_signature_is_clean() {
    let clamd = Clamd::start();
    let scanner = scanner(&clamd_config(&clamd.address));
    let message = text_message(&format!("tool {TEST_PUA_MARKER} inside"));
    assert_eq!(verdict(&scanner, &message).await, Verdict::Clean);
}

#[tokio::test]
async fn ordinary_message_is_clean() {
    let clamd = Clamd::start();
    let scanner = scanner(&clamd_config(&clamd.address));
    let message = text_message("The meeting moves to 3 pm on Thursday.");
    assert_eq!(verdict(&scanner, &message).await, Verdict::Clean);
}

#[tokio::test]
async fn empty_message_is_clean() {
    let clamd = Clamd::start();
    let scanner = scanner(&clamd_config(&clamd.address));
    assert_eq!(verdict(&scanner, b"").await, Verdict::Clean);
}

#[tokio::test]
async fn gtube_is_spam() {
    let clamd = Clamd::start();
    let scanner = scanner(&clamd_config(&clamd.address));
    let message = text_message(&format!("test {GTUBE}"));
    let verdict = verdict(&scanner, &message).await;
    assert_eq!(
        verdict,
        Verdict::Spam {
            engine: "builtin".to_string(),
            score: Some(1000.0),
            action: None,
            rules: vec!["GTUBE".to_string()],
        }
    );
}

#[tokio::test]
async fn virus_wins_over_gtube() {
    let clamd = Clamd::start();
    let scanner = scanner(&clamd_config(&clamd.address));
    let message = text_message(&format!("{GTUBE} {TEST_VIRUS_MARKER}"));
    assert_eq!(
        verdict(&scanner, &message).await,
        virus("Sendguard.Test.Virus.UNOFFICIAL")
    );
}

#[tokio::test]
async fn unix_socket_scan() {
    let clamd = Clamd::start_with(None);
    let address = clamd.socket.to_string_lossy().to_string();
    assert!(address.starts_with('/'), "socket path {address:?}");
    let scanner = scanner(&clamd_config(&address));
    assert_eq!(verdict(&scanner, &eicar()).await, virus(EICAR_NAME));
    let version = match scanner.ping().await {
        Ok(Some(version)) => version,
        other => panic!("ping over the unix socket gave {other:?}"),
    };
    assert!(version.starts_with("ClamAV "), "{version:?}");
}

#[tokio::test]
async fn ping_returns_version() {
    let clamd = Clamd::start();
    let scanner = scanner(&clamd_config(&clamd.address));
    let version = match scanner.ping().await {
        Ok(Some(version)) => version,
        other => panic!("ping gave {other:?}"),
    };
    assert!(version.starts_with("ClamAV "), "{version:?}");
}

#[tokio::test]
async fn clamd_down_is_error() {
    let address = closed_port_address();
    let scanner = scanner(&clamd_config(&address));
    match scan(&scanner, &text_message("hello")).await {
        Err(ScanError::Connect {
            engine,
            address: reported,
            source,
        }) => {
            assert_eq!(engine, "clamd");
            assert_eq!(reported, address);
            assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused);
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
    match scanner.ping().await {
        Err(ScanError::Connect { .. }) => {}
        other => panic!("expected a connect error from ping, got {other:?}"),
    }
}

#[tokio::test]
async fn clamd_down_accept_runs_rules() {
    let mut config = clamd_config(&closed_port_address());
    config.on_error = OnError::Accept;
    let scanner = scanner(&config);

    let spam = text_message(&format!("test {GTUBE}"));
    assert_eq!(verdict(&scanner, &spam).await.kind(), "spam");

    let clean = text_message("The meeting moves to 3 pm on Thursday.");
    assert_eq!(verdict(&scanner, &clean).await, Verdict::Clean);
}

#[tokio::test]
async fn oversized_message_skips_clamd() {
    // Nothing listens on the address, so any attempt to reach clamd would
    // fail the scan under on_error = tempfail.
    let mut config = clamd_config(&closed_port_address());
    config.max_scan_size = 1024;
    let scanner = scanner(&config);
    let message = text_message(&"x".repeat(2000));
    assert_eq!(
        verdict(&scanner, &message).await,
        Verdict::Unscannable {
            reason: format!(
                "message is {} bytes, above max_scan_size 1024",
                message.len()
            ),
        }
    );
}

#[tokio::test]
async fn stream_max_length_is_unscannable() {
    let clamd = Clamd::start_with(Some("1M"));
    let config = clamd_config(&clamd.address);
    assert!(config.max_scan_size > 2 * 1024 * 1024);
    let scanner = scanner(&config);
    let message = text_message(&"a".repeat(2 * 1024 * 1024));
    match verdict(&scanner, &message).await {
        Verdict::Unscannable { reason } => {
            assert!(reason.contains("StreamMaxLength"), "{reason}");
        }
        other => panic!("expected unscannable, got {other:?}"),
    }

    // A message far above the limit makes clamd close the connection while
    // the scanner is still writing; the reply must still be read.
    let large = text_message(&"a".repeat(20 * 1024 * 1024));
    match verdict(&scanner, &large).await {
        Verdict::Unscannable { reason } => {
            assert!(reason.contains("StreamMaxLength"), "{reason}");
        }
        other => panic!("expected unscannable, got {other:?}"),
    }

    // The same clamd still scans messages below its limit.
    assert_eq!(verdict(&scanner, &eicar()).await, virus(EICAR_NAME));
}

/// Binds a listener on a free loopback port and returns it with its address.
async fn bind_loopback() -> (TcpListener, String) {
    let listener = match TcpListener::bind("127.0.0.1:0").await {
        Ok(listener) => listener,
        Err(error) => panic!("cannot bind a loopback port: {error}"),
    };
    let address = match listener.local_addr() {
        Ok(address) => address.to_string(),
        Err(error) => panic!("cannot read the bound address: {error}"),
    };
    (listener, address)
}

/// Starts a loopback server that runs `reply` on the first connection.
async fn fake_clamd<F, Fut>(reply: F) -> String
where
    F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (listener, address) = bind_loopback().await;
    tokio::spawn(async move {
        if let Ok((stream, _)) = listener.accept().await {
            reply(stream).await;
        }
    });
    address
}

/// Reads one INSTREAM request up to its terminating empty chunk.
async fn read_instream(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut command = [0u8; 10];
    if stream.read_exact(&mut command).await.is_err() {
        return Vec::new();
    }
    assert_eq!(&command, b"zINSTREAM\0");
    let mut data = Vec::new();
    loop {
        let mut length = [0u8; 4];
        if stream.read_exact(&mut length).await.is_err() {
            return data;
        }
        let length = u32::from_be_bytes(length) as usize;
        if length == 0 {
            return data;
        }
        let mut chunk = vec![0u8; length];
        if stream.read_exact(&mut chunk).await.is_err() {
            return data;
        }
        data.extend_from_slice(&chunk);
    }
}

#[tokio::test]
async fn silent_clamd_times_out() {
    let address = fake_clamd(|mut stream| async move {
        read_instream(&mut stream).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let mut config = fake_config(&address);
    config.timeout = Duration::from_millis(300);
    let scanner = scanner(&config);

    let started = Instant::now();
    match scan(&scanner, &text_message("hello")).await {
        Err(error @ ScanError::Timeout { .. }) => {
            assert_eq!(
                error.to_string(),
                format!("clamd at {address} timed out after 300ms while reading the reply")
            );
        }
        other => panic!("expected a time-out, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn max_scan_time_is_error() {
    let address = fake_clamd(|mut stream| async move {
        read_instream(&mut stream).await;
        let _ = stream
            .write_all(b"stream: Heuristics.Limits.Exceeded.MaxScanTime FOUND\0")
            .await;
    })
    .await;
    let scanner = scanner(&fake_config(&address));
    match scan(&scanner, &text_message("hello")).await {
        Err(ScanError::ScannerLimit { signature, .. }) => {
            assert_eq!(signature, "Heuristics.Limits.Exceeded.MaxScanTime");
        }
        other => panic!("expected a scanner-limit error, got {other:?}"),
    }
}

#[tokio::test]
async fn max_scan_time_under_accept_runs_rules() {
    let address = fake_clamd(|mut stream| async move {
        read_instream(&mut stream).await;
        let _ = stream
            .write_all(b"stream: Heuristics.Limits.Exceeded.MaxScanTime FOUND\0")
            .await;
    })
    .await;
    let mut config = fake_config(&address);
    config.on_error = OnError::Accept;
    let scanner = scanner(&config);
    let message = text_message(&format!("test {GTUBE}"));
    assert_eq!(verdict(&scanner, &message).await.kind(), "spam");
}

#[tokio::test]
async fn reply_without_nul_is_read_to_eof() {
    let received = std::sync::Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let sink = received.clone();
    let address = fake_clamd(move |mut stream| async move {
        let data = read_instream(&mut stream).await;
        *sink.lock().await = data;
        let _ = stream.write_all(b"stream: Win.Test.Fake FOUND").await;
    })
    .await;
    let scanner = scanner(&fake_config(&address));
    let message = text_message(&"line of text\r\n".repeat(20_000));
    assert_eq!(verdict(&scanner, &message).await, virus("Win.Test.Fake"));
    assert_eq!(*received.lock().await, message);
}

#[tokio::test]
async fn closed_without_reply_is_protocol_error() {
    let address = fake_clamd(|mut stream| async move {
        read_instream(&mut stream).await;
    })
    .await;
    let scanner = scanner(&fake_config(&address));
    match scan(&scanner, &text_message("hello")).await {
        Err(ScanError::Protocol { .. }) => {}
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

#[tokio::test]
async fn unexpected_reply_is_protocol_error() {
    let address = fake_clamd(|mut stream| async move {
        read_instream(&mut stream).await;
        let _ = stream.write_all(b"UNKNOWN COMMAND\0").await;
    })
    .await;
    let scanner = scanner(&fake_config(&address));
    match scan(&scanner, &text_message("hello")).await {
        Err(ScanError::Protocol { reply, .. }) => assert_eq!(reply, "UNKNOWN COMMAND"),
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

#[tokio::test]
async fn reply_after_early_close_is_read() {
    // Like clamd at its StreamMaxLength: reply after the first chunk and
    // close with data unread, which resets the connection while the scanner
    // is still writing.
    let address = fake_clamd(|mut stream| async move {
        let mut head = vec![0u8; 10 + 4 + 64 * 1024];
        if stream.read_exact(&mut head).await.is_ok() {
            let _ = stream
                .write_all(b"INSTREAM size limit exceeded. ERROR\0")
                .await;
        }
    })
    .await;
    let scanner = scanner(&fake_config(&address));
    let message = text_message(&"b".repeat(16 * 1024 * 1024));
    match verdict(&scanner, &message).await {
        Verdict::Unscannable { reason } => {
            assert!(reason.contains("StreamMaxLength"), "{reason}");
        }
        other => panic!("expected unscannable, got {other:?}"),
    }
}

/// Starts a loopback server that runs `serve` on every connection, with
/// the connection's number counting from 0.
async fn fake_clamd_sessions<F, Fut>(serve: F) -> String
where
    F: Fn(usize, tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (listener, address) = bind_loopback().await;
    tokio::spawn(async move {
        let mut number = 0;
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(number, stream));
            number += 1;
        }
    });
    address
}

/// Reads the IDSESSION command that opens a session.
async fn read_idsession(stream: &mut tokio::net::TcpStream) {
    let mut command = [0u8; 11];
    stream.read_exact(&mut command).await.expect("IDSESSION");
    assert_eq!(&command, b"zIDSESSION\0");
}

#[tokio::test]
async fn scans_share_one_session() {
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = connections.clone();
    let address = fake_clamd_sessions(move |_, mut stream| {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            read_idsession(&mut stream).await;
            for number in 1.. {
                let data = read_instream(&mut stream).await;
                if data.is_empty() {
                    return;
                }
                let reply = if data.windows(4).any(|window| window == b"BAD!") {
                    format!("{number}: stream: Win.Test.Fake FOUND\0")
                } else {
                    format!("{number}: stream: OK\0")
                };
                let _ = stream.write_all(reply.as_bytes()).await;
            }
        }
    })
    .await;
    let scanner = scanner(&clamd_config(&address));

    assert_eq!(
        verdict(&scanner, &text_message("hello")).await,
        Verdict::Clean
    );
    assert_eq!(
        verdict(&scanner, &text_message("BAD!")).await,
        virus("Win.Test.Fake")
    );
    assert_eq!(
        verdict(&scanner, &text_message("again")).await,
        Verdict::Clean
    );
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// Checks that the second scan gets a verdict from a new session when the
/// first session ends after the second request with `ending`, sent
/// without a reply number.
async fn second_scan_survives_session_end(ending: &'static [u8]) {
    let address = fake_clamd_sessions(move |number, mut stream| async move {
        read_idsession(&mut stream).await;
        read_instream(&mut stream).await;
        if number == 0 {
            let _ = stream.write_all(b"1: stream: OK\0").await;
            read_instream(&mut stream).await;
            let _ = stream.write_all(ending).await;
            return;
        }
        let _ = stream.write_all(b"1: stream: Win.Test.Fake FOUND\0").await;
    })
    .await;
    let scanner = scanner(&clamd_config(&address));

    assert_eq!(
        verdict(&scanner, &text_message("hello")).await,
        Verdict::Clean
    );
    assert_eq!(
        verdict(&scanner, &text_message("second")).await,
        virus("Win.Test.Fake")
    );
}

#[tokio::test]
async fn ended_session_replaced() {
    // clamd closes the kept session just as it is reused.
    second_scan_survives_session_end(b"").await;
}

#[tokio::test]
async fn timed_out_kept_session_replaced() {
    // clamd ends a session idle past its read timeout with an unnumbered
    // line; arriving as the session is reused, it is no verdict.
    second_scan_survives_session_end(b"COMMAND READ TIMED OUT\n").await;
}

#[tokio::test]
async fn misnumbered_reply_is_protocol_error() {
    let address = fake_clamd_sessions(|_, mut stream| async move {
        read_idsession(&mut stream).await;
        read_instream(&mut stream).await;
        let _ = stream.write_all(b"2: stream: OK\0").await;
    })
    .await;
    let scanner = scanner(&clamd_config(&address));
    match scan(&scanner, &text_message("hello")).await {
        Err(ScanError::Protocol { reply, .. }) => {
            assert_eq!(
                reply,
                "reply numbered 2 where 1 was expected: 2: stream: OK"
            );
        }
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

#[tokio::test]
async fn real_clamd_sessions_keep_verdicts() {
    let clamd = Clamd::start();
    let scanner = scanner(&clamd_config(&clamd.address));
    for _ in 0..3 {
        assert_eq!(
            verdict(&scanner, &text_message("hello")).await,
            Verdict::Clean
        );
        assert_eq!(verdict(&scanner, &eicar()).await, virus(EICAR_NAME));
    }
}

#[tokio::test]
async fn idle_sessions_closed() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let open = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = open.clone();
    let address = fake_clamd_sessions(move |_, mut stream| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            read_idsession(&mut stream).await;
            for number in 1.. {
                if read_instream(&mut stream).await.is_empty() {
                    break;
                }
                // Slow enough that the burst below needs four sessions.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let reply = format!("{number}: stream: OK\0");
                if stream.write_all(reply.as_bytes()).await.is_err() {
                    break;
                }
            }
            counter.fetch_sub(1, Ordering::SeqCst);
        }
    })
    .await;
    let config = ClamdConfig {
        session_idle_time: Duration::from_millis(500),
        ..clamd_config(&address)
    };
    let scanner = std::sync::Arc::new(scanner(&config));

    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let scanner = scanner.clone();
        burst.spawn(async move { verdict(&scanner, &text_message("burst")).await });
    }
    while let Some(result) = burst.join_next().await {
        assert_eq!(result.expect("scan task"), Verdict::Clean);
    }
    assert_eq!(
        open.load(Ordering::SeqCst),
        4,
        "the burst used four sessions"
    );

    // Scans that keep the newest session busy close the idle ones as they
    // pass their idle time.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(
            verdict(&scanner, &text_message("trickle")).await,
            Verdict::Clean
        );
    }
    wait_for_count(&open, 1).await;

    // With no scans at all, the periodic sweep closes the last one.
    tokio::time::sleep(Duration::from_millis(700)).await;
    scanner.remove_stale_sessions();
    wait_for_count(&open, 0).await;
}

/// Waits up to 5 s for `counter` to reach `expected`.
async fn wait_for_count(counter: &std::sync::atomic::AtomicUsize, expected: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while counter.load(std::sync::atomic::Ordering::SeqCst) != expected {
        assert!(
            Instant::now() < deadline,
            "{} sessions open, expected {expected}",
            counter.load(std::sync::atomic::Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
