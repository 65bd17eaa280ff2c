//! The built-in spam classifier on a 2 KiB and a 10 MiB message, and the
//! DATA reader (dot-unstuffing and line-ending checks) on the same sizes,
//! fed in 64 KiB reads as a socket delivers them.

use base64::Engine;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sendguard::scan::{ScanInput, Scanner, SpamConfig};
use sendguard::smtp::reader::{BareLineEndings, DataReader, encode_data};
use std::hint::black_box;

const PROSE: &str = "The quarterly figures are attached as agreed in last week's meeting. \
Please check the totals for the northern region before Friday, since the auditors asked \
for the reconciled numbers and the notes on the two late invoices.";

/// Builds a message of about `size` bytes with CRLF line endings: plain
/// text up to 8 KiB, a text part and a base64 attachment above.
fn message(size: usize) -> Vec<u8> {
    let mut text = String::from(
        "From: Alice Example <alice@example.org>\r\n\
         To: Bob Example <bob@example.net>\r\n\
         Subject: Quarterly figures\r\n\
         Date: Mon, 02 Dec 2024 10:15:00 +0000\r\n\
         Message-ID: <bench.20241202101500@example.org>\r\n\
         MIME-Version: 1.0\r\n",
    );

    let mut prose_lines = Vec::new();
    let mut line = String::new();
    for word in PROSE.split(' ').cycle().take(400) {
        if line.len() + word.len() + 1 > 72 {
            prose_lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }

    if size <= 8192 {
        text.push_str("Content-Type: text/plain; charset=us-ascii\r\n\r\n");
        for line in prose_lines.iter().cycle() {
            if text.len() + line.len() + 2 > size {
                break;
            }
            text.push_str(line);
            text.push_str("\r\n");
        }
        return text.into_bytes();
    }

    text.push_str(
        "Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
         --b1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n",
    );
    for line in &prose_lines[..12] {
        text.push_str(line);
        text.push_str("\r\n");
    }
    text.push_str(
        "\r\n--b1\r\nContent-Type: text/csv; name=figures.csv\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n",
    );
    // CSV rows of pseudo-random figures, base64-encoded in lines of 76
    // characters, so the decoded part is valid text as in real mail.
    let room = size.saturating_sub(text.len() + 8);
    let mut csv = String::with_capacity(room);
    let mut state: u32 = 2_463_534_242;
    let mut row = 0u32;
    while csv.len() < room / 78 * 57 {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        csv.push_str(&format!(
            "{row},region-{},{}.{:02}\n",
            state % 9,
            state % 99_991,
            state % 100
        ));
        row += 1;
    }
    let encoded = base64::engine::general_purpose::STANDARD.encode(csv.as_bytes());
    for line in encoded.as_bytes().chunks(76) {
        text.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        text.push_str("\r\n");
    }
    text.push_str("--b1--\r\n");
    text.into_bytes()
}

fn classifier(c: &mut Criterion) {
    let scanner = Scanner::new(None, &SpamConfig::default()).expect("default rules compile");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("classifier");
    group.sample_size(10);
    for (name, size) in [("2KiB", 2048), ("10MiB", 10 << 20)] {
        let message = message(size);
        group.throughput(Throughput::Bytes(message.len() as u64));
        group.bench_with_input(BenchmarkId::new("rules", name), &message, |b, message| {
            b.iter(|| {
                let verdict = runtime.block_on(scanner.scan(ScanInput {
                    message,
                    recipients: 1,
                    envelope: None,
                }));
                black_box(verdict)
            })
        });
    }
    group.finish();
}

fn data_reader(c: &mut Criterion) {
    let mut group = c.benchmark_group("data_reader");
    group.sample_size(10);
    for (name, size) in [("2KiB", 2048), ("10MiB", 10 << 20)] {
        let mut wire = Vec::new();
        encode_data(&message(size), &mut wire);
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_with_input(BenchmarkId::new("feed", name), &wire, |b, wire| {
            b.iter(|| {
                let mut reader = DataReader::new(BareLineEndings::Normalize, 32 << 20);
                for chunk in wire.chunks(64 * 1024) {
                    let feed = reader.feed(chunk);
                    if feed.done {
                        break;
                    }
                }
                black_box(reader.finish())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, classifier, data_reader);
criterion_main!(benches);
