//! Fuzzes `DataReader` with arbitrary bytes fed in arbitrary chunks, and `encode_data` with
//! its output.
//!
//! Checks:
//! - the output contains no bare CR and no bare LF, except a final CR of an incomplete
//!   message, whose LF may still arrive;
//! - `encode_data(output)` contains `CRLF . CRLF` (or starts with `. CRLF`) only as its final
//!   terminator, and reading it back gives the output again;
//! - feeding the input in one piece or in chunks gives the same outcome;
//! - the reader is done exactly when the input contains an end-of-data line, and then it
//!   consumes the input up to and including the first one;
//! - the stored message never exceeds the size limit.

#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use sendguard::smtp::reader::{BareLineEndings, DataOutcome, DataReader, encode_data};

/// Size limits beyond the small ones, including one that no input reaches.
const LARGE_MAX_SIZES: &[usize] = &[64, 1000, 65_536, usize::MAX];

#[derive(Debug, Arbitrary)]
struct Input {
    reject_bare_line_endings: bool,
    /// Below 32 the limit itself, otherwise an index into `LARGE_MAX_SIZES`.
    max_size_selector: u8,
    /// Chunk lengths. Input after the last chunk is fed in one piece.
    chunk_lens: Vec<u8>,
    data: Vec<u8>,
}

/// Result of reading one input.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    consumed: usize,
    done: bool,
    outcome: DataOutcome,
}

fn max_size(selector: u8) -> usize {
    if selector < 32 {
        usize::from(selector)
    } else {
        LARGE_MAX_SIZES[usize::from(selector) % LARGE_MAX_SIZES.len()]
    }
}

/// Feeds `chunks` in order, stopping at the end of data as a session does. A chunk is fed
/// again from its first unconsumed byte, which must not change anything once done.
fn read(mode: BareLineEndings, max_size: usize, chunks: &[&[u8]]) -> Run {
    let mut reader = DataReader::new(mode, max_size);
    let mut consumed = 0;
    let mut done = false;
    for chunk in chunks {
        let feed = reader.feed(chunk);
        assert!(feed.consumed <= chunk.len(), "consumed more than fed");
        consumed += feed.consumed;
        assert_eq!(feed.done, reader.is_done(), "feed and is_done disagree");
        if feed.done {
            assert_eq!(reader.feed(&chunk[feed.consumed..]).consumed, 0);
            done = true;
            break;
        }
        assert_eq!(
            feed.consumed,
            chunk.len(),
            "input left before the end of data"
        );
    }
    Run {
        consumed,
        done,
        outcome: reader.finish(),
    }
}

fn chunks<'a>(data: &'a [u8], chunk_lens: &[u8]) -> Vec<&'a [u8]> {
    let mut chunks = Vec::new();
    let mut rest = data;
    for &len in chunk_lens {
        let len = usize::from(len).min(rest.len());
        let (chunk, tail) = rest.split_at(len);
        chunks.push(chunk);
        rest = tail;
    }
    chunks.push(rest);
    chunks
}

/// Returns the length of the input up to and including its first end-of-data line.
fn end_of_data(data: &[u8]) -> Option<usize> {
    if data.starts_with(b".\r\n") {
        return Some(3);
    }
    data.windows(5)
        .position(|window| window == b"\r\n.\r\n")
        .map(|start| start + 5)
}

fn assert_no_bare_line_endings(message: &[u8]) {
    for (index, &byte) in message.iter().enumerate() {
        if byte == b'\r' {
            assert_eq!(message.get(index + 1), Some(&b'\n'), "bare CR at {index}");
        }
        if byte == b'\n' {
            assert!(
                index > 0 && message[index - 1] == b'\r',
                "bare LF at {index}"
            );
        }
    }
}

fuzz_target!(|input: Input| {
    let mode = if input.reject_bare_line_endings {
        BareLineEndings::Reject
    } else {
        BareLineEndings::Normalize
    };
    let max_size = max_size(input.max_size_selector);
    let data = &input.data[..];

    let whole = read(mode, max_size, &[data]);
    let chunked = read(mode, max_size, &chunks(data, &input.chunk_lens));
    assert_eq!(whole, chunked, "chunking changed the outcome");

    match end_of_data(data) {
        Some(end) => {
            assert!(whole.done, "end-of-data line at {end} not seen");
            assert_eq!(whole.consumed, end, "end of data in the wrong place");
        }
        None => {
            assert!(!whole.done, "done without an end-of-data line");
            assert_eq!(whole.consumed, data.len(), "input left unconsumed");
        }
    }
    assert_eq!(whole.outcome.received, whole.consumed as u64);

    let message = &whole.outcome.message;
    assert!(message.len() <= max_size, "message above the size limit");
    if whole.outcome.too_large {
        assert!(message.is_empty(), "too large message kept its content");
    }
    if whole.done {
        assert_no_bare_line_endings(message);
    } else {
        assert_no_bare_line_endings(message.strip_suffix(b"\r").unwrap_or(message));
    }

    let mut encoded = Vec::new();
    encode_data(message, &mut encoded);
    assert_eq!(
        end_of_data(&encoded),
        Some(encoded.len()),
        "encoded message ends early"
    );

    // Only a complete message is relayed, and its last line ends with CRLF.
    if whole.done && !whole.outcome.too_large {
        let again = read(BareLineEndings::Reject, usize::MAX, &[&encoded]);
        assert!(again.done);
        assert_eq!(again.consumed, encoded.len());
        assert!(!again.outcome.bare_line_endings);
        assert_eq!(
            &again.outcome.message, message,
            "round trip changed the message"
        );
    }
});
