//! Fuzzes `CommandLines` with arbitrary bytes fed in arbitrary chunks.
//!
//! Checks, for every call of `next_line`:
//! - the bytes removed from the buffer are exactly the returned line and its terminator, or
//!   the discarded part of an over-long line, so lines plus discarded bytes add up to the
//!   input consumed;
//! - no returned line is longer than `max_len` or contains an LF;
//! - the buffer stays at most `max_len + 1` bytes long while no line is being discarded.
//!
//! At the end the sequence of lines must match a plain split of the whole input at each LF,
//! so the chunking never changes the result.

#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use sendguard::smtp::reader::{CommandLine, CommandLines};

/// Line length limits beyond the small ones, including the RFC 5321 command line limit and
/// a limit that no input reaches.
const LARGE_MAX_LENS: &[usize] = &[64, 510, 512, 1000, 4096, usize::MAX];

#[derive(Debug, Arbitrary)]
struct Input {
    /// Below 32 the limit itself, otherwise an index into `LARGE_MAX_LENS`.
    max_len_selector: u8,
    /// Chunk lengths. Input after the last chunk is fed in one piece.
    chunk_lens: Vec<u8>,
    data: Vec<u8>,
}

fn max_len(selector: u8) -> usize {
    if selector < 32 {
        usize::from(selector)
    } else {
        LARGE_MAX_LENS[usize::from(selector) % LARGE_MAX_LENS.len()]
    }
}

/// Splits the whole input at each LF and frames each complete line on its own.
fn expected_lines(data: &[u8], max_len: usize) -> Vec<CommandLine> {
    let mut lines = Vec::new();
    let mut segments: Vec<&[u8]> = data.split(|&byte| byte == b'\n').collect();
    // The last segment has no LF after it, so it is not a complete line.
    segments.pop();
    for segment in segments {
        let content = segment.strip_suffix(b"\r").unwrap_or(segment);
        if content.len() > max_len {
            lines.push(CommandLine::TooLong);
        } else {
            lines.push(CommandLine::Line(content.to_vec()));
        }
    }
    lines
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

fuzz_target!(|input: Input| {
    let max_len = max_len(input.max_len_selector);
    let data = &input.data[..];
    let mut framer = CommandLines::new(max_len);
    let mut buffer = Vec::new();
    let mut lines = Vec::new();
    // Bytes of `data` appended to the buffer, and bytes removed from its front.
    let mut fed = 0;
    let mut consumed = 0;
    // Bytes of the current over-long line discarded before its terminator arrived.
    let mut discarded_in_line = 0;

    for chunk in chunks(data, &input.chunk_lens) {
        buffer.extend_from_slice(chunk);
        fed += chunk.len();

        // Every call either removes bytes or returns None, so this ends after at most one
        // call per fed byte plus the final None.
        loop {
            let before = buffer.len();
            let line = framer.next_line(&mut buffer);
            let removed = before - buffer.len();
            let removed_bytes = &data[consumed..consumed + removed];
            consumed += removed;
            assert_eq!(
                buffer.len(),
                fed - consumed,
                "buffer is not the unconsumed input"
            );
            assert_eq!(&buffer[..], &data[consumed..fed], "buffer changed");

            match line {
                Some(CommandLine::Line(line)) => {
                    assert_eq!(discarded_in_line, 0, "line returned while discarding");
                    assert!(line.len() <= max_len, "line longer than {max_len}");
                    assert!(!line.contains(&b'\n'), "line contains LF");
                    assert!(removed_bytes.starts_with(&line), "line is not the input");
                    let terminator = &removed_bytes[line.len()..];
                    assert!(
                        terminator == b"\n" || terminator == b"\r\n",
                        "terminator {terminator:?}"
                    );
                    lines.push(CommandLine::Line(line));
                }
                Some(CommandLine::TooLong) => {
                    assert_eq!(removed_bytes.last(), Some(&b'\n'), "TooLong without LF");
                    let lfs = removed_bytes.iter().filter(|&&byte| byte == b'\n').count();
                    assert_eq!(lfs, 1, "TooLong consumed {lfs} lines");
                    let whole_line = discarded_in_line + removed - 1;
                    let crlf = if removed >= 2 {
                        removed_bytes[removed - 2] == b'\r'
                    } else {
                        discarded_in_line > 0 && data[consumed - 2] == b'\r'
                    };
                    let content_len = whole_line - usize::from(crlf);
                    assert!(
                        content_len > max_len,
                        "line of {content_len} bytes reported too long for {max_len}"
                    );
                    discarded_in_line = 0;
                    lines.push(CommandLine::TooLong);
                }
                None => {
                    assert!(!removed_bytes.contains(&b'\n'), "LF discarded silently");
                    if removed > 0 {
                        assert!(framer.is_discarding(), "bytes removed without a line");
                        discarded_in_line += removed;
                    }
                    if !framer.is_discarding() {
                        assert!(
                            buffer.len() <= max_len.saturating_add(1),
                            "buffer holds {} bytes for max_len {max_len}",
                            buffer.len()
                        );
                    }
                    break;
                }
            }
        }
    }

    assert_eq!(
        lines,
        expected_lines(data, max_len),
        "chunking changed the lines"
    );
});
