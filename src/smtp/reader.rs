//! Sans-IO readers for what an SMTP client sends: command lines and DATA content.
//!
//! Both readers work on bytes that the caller has already read from the network and accept
//! input split at any byte boundary. Neither performs I/O. The DATA reader stores at most its
//! size limit, and the line framer keeps the caller's buffer within one line length.

use serde::{Deserialize, Serialize};

/// Command-line framing for the command phase of a session.
///
/// A line ends at CRLF, and a bare LF also ends a line, as Postfix accepts. A line longer than
/// the limit yields one [`CommandLine::TooLong`] once its terminator arrives, and all of its
/// bytes are discarded, so no part of an over-long line is ever parsed as a command.
#[derive(Debug, Clone)]
pub struct CommandLines {
    max_len: usize,
    discarding: bool,
    /// Whether the over-long line being discarded, or the last one
    /// reported, starts with `BDAT`.
    too_long_bdat: bool,
}

/// One framed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandLine {
    /// A complete line without its terminator. Only the CR of a final CRLF is removed, so any
    /// other CR stays in the line.
    Line(Vec<u8>),
    /// A line longer than the limit. Its bytes have been discarded up to and including its LF.
    TooLong,
}

impl CommandLines {
    /// Creates a framer for lines of at most `max_len` bytes, not counting the terminator.
    ///
    /// RFC 5321 requires servers to accept command lines of 512 bytes including CRLF.
    pub fn new(max_len: usize) -> Self {
        Self {
            max_len,
            discarding: false,
            too_long_bdat: false,
        }
    }

    /// Takes the next complete line from the front of `input`, removing its bytes and its
    /// terminator, or returns `None` when `input` does not yet contain a complete line.
    ///
    /// While an over-long line is being discarded, its bytes are removed from `input` as soon
    /// as they arrive, so `input` stays at most `max_len + 1` bytes long between calls when the
    /// caller appends network reads to it.
    pub fn next_line(&mut self, input: &mut Vec<u8>) -> Option<CommandLine> {
        if !self.discarding {
            // A line of max_len bytes needs max_len + 2 bytes with its CRLF, so an LF that is
            // not within that window ends an over-long line.
            let window = input.len().min(self.max_len.saturating_add(2));
            if let Some(lf) = input[..window].iter().position(|&byte| byte == b'\n') {
                let mut line_len = lf;
                if line_len > 0 && input[line_len - 1] == b'\r' {
                    line_len -= 1;
                }
                let line = if line_len > self.max_len {
                    self.too_long_bdat = starts_with_bdat(input);
                    CommandLine::TooLong
                } else {
                    CommandLine::Line(input[..line_len].to_vec())
                };
                input.drain(..=lf);
                return Some(line);
            }
            if window < self.max_len.saturating_add(2) {
                return None;
            }
            self.discarding = true;
            self.too_long_bdat = starts_with_bdat(input);
        }

        match input.iter().position(|&byte| byte == b'\n') {
            Some(lf) => {
                input.drain(..=lf);
                self.discarding = false;
                Some(CommandLine::TooLong)
            }
            None => {
                input.clear();
                None
            }
        }
    }

    /// Whether the last over-long line was a BDAT command. Its chunk size
    /// was never read, so the octets after it cannot be told from commands.
    pub fn too_long_line_was_bdat(&self) -> bool {
        self.too_long_bdat
    }

    /// Returns whether the framer is discarding the rest of an over-long line.
    pub fn is_discarding(&self) -> bool {
        self.discarding
    }
}

/// Policy for a message that contains a bare CR or a bare LF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BareLineEndings {
    /// Convert each bare CR and each bare LF to CRLF and accept the message.
    Normalize,
    /// Reject the message.
    Reject,
}

/// Reader for the content of a DATA command, from the first content line through the
/// end-of-data line.
///
/// Only `CRLF . CRLF` ends the content, judged on the raw bytes: the dot line must follow a
/// real CRLF (or be the first line) and end with CRLF. A dot line after a bare LF or a bare CR,
/// or one ended by a bare LF or CR, is content. So `first\n.\nMAIL FROM:<x@example.com>\r\n`
/// is three lines of content and can never be taken for the end of the message plus a command.
///
/// The stored message has every line ended by CRLF:
/// - A line that follows a real CRLF (or is the first line) and starts with `.` loses that dot.
///   A line that follows a bare CR or LF keeps its leading dot, because only CRLF starts a
///   line in SMTP, and [`encode_data`] stuffs the dot again anyway.
/// - Each bare LF and each bare CR becomes CRLF and sets
///   [`DataOutcome::bare_line_endings`]. A CR counts as bare unless an LF follows it at once, so
///   `CR CR LF` is one bare CR and one CRLF. The output is the same in both
///   [`BareLineEndings`] modes, because the session decides what to do with the flag.
/// - Other bytes, 8-bit bytes and NULs included, pass through unchanged.
#[derive(Debug, Clone)]
pub struct DataReader {
    mode: BareLineEndings,
    max_size: usize,
    state: DataState,
    message: Vec<u8>,
    bare_line_endings: bool,
    too_large: bool,
    received: u64,
}

/// Position of the reader relative to the lines of the raw input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataState {
    /// At the start of a line that follows a real CRLF or starts the content.
    LineStart,
    /// Inside a line, or at the start of a line that follows a bare CR or LF.
    Text,
    /// After a CR inside a line that has already been stored, waiting to see whether an LF
    /// follows.
    Cr,
    /// After the leading dot of a line that follows a real CRLF. The dot has not been stored.
    Dot,
    /// After `.` and CR at the start of such a line. Neither byte has been stored.
    DotCr,
    /// After the end-of-data line.
    Done,
}

/// Result of one [`DataReader::feed`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataFeed {
    /// Bytes consumed from the front of the input. Before the end of data this is the whole
    /// input. When the end-of-data line is in the input, bytes after it are not consumed.
    pub consumed: usize,
    /// Whether the end-of-data line has been consumed.
    pub done: bool,
}

/// Message and flags collected by a [`DataReader`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataOutcome {
    /// The unstuffed content with CRLF line endings, including the CRLF before the final dot,
    /// or empty when [`too_large`](Self::too_large) is set.
    pub message: Vec<u8>,
    /// Whether the content contained a bare CR or a bare LF.
    pub bare_line_endings: bool,
    /// Whether the stored message grew beyond the size limit.
    pub too_large: bool,
    /// Raw bytes consumed, including the end-of-data line.
    pub received: u64,
}

impl DataReader {
    /// Creates a reader positioned at the first content line, right after the DATA command
    /// line. The stored message is capped at `max_size` bytes.
    ///
    /// The first line counts as following a CRLF even when the DATA command line ended with a
    /// bare LF, which [`CommandLines`] accepts.
    pub fn new(mode: BareLineEndings, max_size: usize) -> Self {
        Self {
            mode,
            max_size,
            state: DataState::LineStart,
            message: Vec::new(),
            bare_line_endings: false,
            too_large: false,
            received: 0,
        }
    }

    /// Returns the bare line ending mode that the reader was created with.
    pub fn mode(&self) -> BareLineEndings {
        self.mode
    }

    /// Returns whether the end-of-data line has been consumed.
    pub fn is_done(&self) -> bool {
        self.state == DataState::Done
    }

    /// Consumes content from the front of `input`, up to and including the end-of-data line.
    ///
    /// Bytes after the end-of-data line, such as pipelined commands, are left unconsumed, and
    /// every call after the end returns `consumed: 0`.
    pub fn feed(&mut self, input: &[u8]) -> DataFeed {
        let mut pos = 0;
        // Start of the bytes that are copied to the message unchanged at the next event.
        let mut run_start = 0;

        while pos < input.len() {
            match self.state {
                DataState::Text => {
                    let Some(offset) = find_line_break(&input[pos..]) else {
                        pos = input.len();
                        break;
                    };
                    let at = pos + offset;
                    if input[at] == b'\n' {
                        self.store(&input[run_start..at]);
                        self.store(b"\r\n");
                        self.bare_line_endings = true;
                        pos = at + 1;
                        run_start = pos;
                    } else if at + 1 == input.len() {
                        // The CR is copied with the run. Whether it is bare is decided by the
                        // first byte of the next input.
                        pos = at + 1;
                        self.state = DataState::Cr;
                    } else if input[at + 1] == b'\n' {
                        pos = at + 2;
                        self.state = DataState::LineStart;
                    } else {
                        self.store(&input[run_start..=at]);
                        self.store(b"\n");
                        self.bare_line_endings = true;
                        pos = at + 1;
                        run_start = pos;
                    }
                }
                DataState::LineStart => {
                    if input[pos] == b'.' {
                        self.store(&input[run_start..pos]);
                        pos += 1;
                        run_start = pos;
                        self.state = DataState::Dot;
                    } else {
                        self.state = DataState::Text;
                    }
                }
                DataState::Cr => {
                    if input[pos] == b'\n' {
                        pos += 1;
                        self.state = DataState::LineStart;
                    } else {
                        // The CR was stored with the previous input, so only the LF is missing.
                        self.store(&input[run_start..pos]);
                        self.store(b"\n");
                        self.bare_line_endings = true;
                        run_start = pos;
                        self.state = DataState::Text;
                    }
                }
                DataState::Dot => {
                    if input[pos] == b'\r' {
                        pos += 1;
                        run_start = pos;
                        self.state = DataState::DotCr;
                    } else {
                        self.state = DataState::Text;
                    }
                }
                DataState::DotCr => {
                    if input[pos] == b'\n' {
                        pos += 1;
                        run_start = pos;
                        self.state = DataState::Done;
                    } else {
                        // A "." line ended by a bare CR loses its dot, and the CR counts as bare.
                        self.store(b"\r\n");
                        self.bare_line_endings = true;
                        self.state = DataState::Text;
                    }
                }
                DataState::Done => break,
            }
        }

        self.store(&input[run_start..pos]);
        self.received += pos as u64;
        DataFeed {
            consumed: pos,
            done: self.state == DataState::Done,
        }
    }

    /// Returns the message and the flags. Before the end-of-data line has been consumed, the
    /// message is incomplete and may end inside a line.
    pub fn finish(self) -> DataOutcome {
        DataOutcome {
            message: self.message,
            bare_line_endings: self.bare_line_endings,
            too_large: self.too_large,
            received: self.received,
        }
    }

    fn store(&mut self, bytes: &[u8]) {
        if self.too_large || bytes.is_empty() {
            return;
        }
        // The stored message never exceeds max_size, so the subtraction cannot underflow.
        if bytes.len() > self.max_size - self.message.len() {
            self.too_large = true;
            self.message = Vec::new();
            return;
        }
        let needed = self.message.len() + bytes.len();
        if needed > self.message.capacity() {
            // Grows like Vec does but never past max_size, so the buffer stays within the cap.
            let target = needed
                .max(self.message.capacity().saturating_mul(2))
                .min(self.max_size);
            self.message.reserve_exact(target - self.message.len());
        }
        self.message.extend_from_slice(bytes);
    }
}

fn starts_with_bdat(line: &[u8]) -> bool {
    line.get(..5)
        .is_some_and(|start| start.eq_ignore_ascii_case(b"BDAT "))
}

/// Returns `message` with every bare CR and bare LF turned into CRLF, or
/// `None` when it has none. BDAT content has no dot-stuffing and no end
/// marker, so only its line endings need this.
pub fn normalize_line_endings(message: &[u8]) -> Option<Vec<u8>> {
    let is_bare = |index: usize| match message[index] {
        b'\r' => message.get(index + 1) != Some(&b'\n'),
        b'\n' => index == 0 || message[index - 1] != b'\r',
        _ => false,
    };
    let first_bare = (0..message.len()).find(|&index| is_bare(index))?;
    let mut normalized = Vec::with_capacity(message.len() + 64);
    normalized.extend_from_slice(&message[..first_bare]);
    for index in first_bare..message.len() {
        if is_bare(index) {
            normalized.extend_from_slice(b"\r\n");
        } else {
            normalized.push(message[index]);
        }
    }
    Some(normalized)
}

/// Encodes a message as the content of an upstream DATA command and appends it to `out`.
///
/// Every line that starts with `.` gets another dot, the first line included. Each bare CR and
/// each bare LF becomes CRLF, a message whose last line has no line ending gets a CRLF, and
/// `.\r\n` ends the content. For a message from [`DataReader`], the upstream server therefore
/// reads back exactly the content that the client sent.
pub fn encode_data(message: &[u8], out: &mut Vec<u8>) {
    // Dot-stuffing adds a byte per line, so this only avoids the first reallocations.
    out.reserve(message.len() + message.len() / 64 + 5);

    let mut pos = 0;
    let mut run_start = 0;
    let mut at_line_start = true;

    while pos < message.len() {
        if at_line_start && message[pos] == b'.' {
            // The dot stays in the run and gets a second dot in front of it.
            out.extend_from_slice(&message[run_start..pos]);
            out.push(b'.');
            run_start = pos;
        }

        let Some(offset) = find_line_break(&message[pos..]) else {
            pos = message.len();
            at_line_start = false;
            break;
        };
        let at = pos + offset;
        at_line_start = true;
        if message[at] == b'\n' {
            out.extend_from_slice(&message[run_start..at]);
            out.extend_from_slice(b"\r\n");
            pos = at + 1;
            run_start = pos;
        } else if message.get(at + 1) == Some(&b'\n') {
            pos = at + 2;
        } else {
            out.extend_from_slice(&message[run_start..=at]);
            out.push(b'\n');
            pos = at + 1;
            run_start = pos;
        }
    }

    out.extend_from_slice(&message[run_start..pos]);
    if !at_line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

/// Returns the index of the first CR or LF in `haystack`.
///
/// The chunked test without an early exit lets the compiler vectorize the scan over long lines.
fn find_line_break(haystack: &[u8]) -> Option<usize> {
    const CHUNK: usize = 16;

    let is_break = |byte: &u8| *byte == b'\r' || *byte == b'\n';
    let (chunks, tail) = haystack.as_chunks::<CHUNK>();
    for (index, chunk) in chunks.iter().enumerate() {
        let mut found = false;
        for byte in chunk {
            found |= is_break(byte);
        }
        if found {
            return chunk
                .iter()
                .position(is_break)
                .map(|offset| index * CHUNK + offset);
        }
    }

    let tail_start = chunks.len() * CHUNK;
    tail.iter()
        .position(is_break)
        .map(|offset| tail_start + offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Cut points to feed an input with: whole, byte by byte, at every single split point,
    /// and at every pair of split points for short inputs.
    fn split_plans(len: usize) -> Vec<Vec<usize>> {
        let mut plans = vec![Vec::new(), (1..len).collect()];
        for cut in 1..len {
            plans.push(vec![cut]);
        }
        if len <= 24 {
            for first in 1..len {
                for second in first + 1..len {
                    plans.push(vec![first, second]);
                }
            }
        }
        plans
    }

    fn pieces<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut result = Vec::new();
        let mut start = 0;
        for &cut in cuts {
            result.push(&input[start..cut]);
            start = cut;
        }
        result.push(&input[start..]);
        result
    }

    fn show(bytes: &[u8]) -> String {
        bytes.escape_ascii().to_string()
    }

    // --- CommandLines ---

    struct LinesCase {
        input: &'static [u8],
        max_len: usize,
        lines: &'static [Option<&'static [u8]>],
        leftover: &'static [u8],
        discarding: bool,
    }

    /// Feeds `input` like a session that appends each network read and then takes lines
    /// until none is complete. `None` in the result stands for `TooLong`.
    fn frame_lines(
        max_len: usize,
        input: &[u8],
        cuts: &[usize],
    ) -> (Vec<Option<Vec<u8>>>, Vec<u8>, bool) {
        let mut framer = CommandLines::new(max_len);
        let mut buffer = Vec::new();
        let mut lines = Vec::new();
        for piece in pieces(input, cuts) {
            buffer.extend_from_slice(piece);
            while let Some(line) = framer.next_line(&mut buffer) {
                lines.push(match line {
                    CommandLine::Line(bytes) => Some(bytes),
                    CommandLine::TooLong => None,
                });
            }
            assert!(
                buffer.len() <= max_len + 1,
                "buffer of {} bytes kept for max_len {max_len}",
                buffer.len()
            );
        }
        (lines, buffer, framer.is_discarding())
    }

    #[test]
    fn command_lines_table_at_every_split() {
        let cases = [
            LinesCase {
                input: b"EHLO x\r\n",
                max_len: 16,
                lines: &[Some(b"EHLO x")],
                leftover: b"",
                discarding: false,
            },
            LinesCase {
                input: b"EHLO x\n",
                max_len: 16,
                lines: &[Some(b"EHLO x")],
                leftover: b"",
                discarding: false,
            },
            LinesCase {
                input: b"\r\n",
                max_len: 16,
                lines: &[Some(b"")],
                leftover: b"",
                discarding: false,
            },
            LinesCase {
                input: b"\n",
                max_len: 16,
                lines: &[Some(b"")],
                leftover: b"",
                discarding: false,
            },
            LinesCase {
                input: b"A\r\nB\nC\r\nD",
                max_len: 16,
                lines: &[Some(b"A"), Some(b"B"), Some(b"C")],
                leftover: b"D",
                discarding: false,
            },
            LinesCase {
                input: b"a\rb\r\n",
                max_len: 16,
                lines: &[Some(b"a\rb")],
                leftover: b"",
                discarding: false,
            },
            LinesCase {
                input: b"a\r\r\n",
                max_len: 16,
                lines: &[Some(b"a\r")],
                leftover: b"",
                discarding: false,
            },
            LinesCase {
                input: b"a\0\xff\r\n",
                max_len: 16,
                lines: &[Some(b"a\0\xff")],
                leftover: b"",
                discarding: false,
            },
            LinesCase {
                input: b"NOOP\r",
                max_len: 16,
                lines: &[],
                leftover: b"NOOP\r",
                discarding: false,
            },
            LinesCase {
                input: b"abcd\r\n",
                max_len: 4,
                lines: &[Some(b"abcd")],
                leftover: b"",
                discarding: false,
            },
            LinesCase {
                input: b"abcd\n",
                max_len: 4,
                lines: &[Some(b"abcd")],
                leftover: b"",
                discarding: false,
            },
            LinesCase {
                input: b"abcd\r",
                max_len: 4,
                lines: &[],
                leftover: b"abcd\r",
                discarding: false,
            },
            LinesCase {
                input: b"abcde\r\nx\r\n",
                max_len: 4,
                lines: &[None, Some(b"x")],
                leftover: b"",
                discarding: false,
            },
            LinesCase {
                input: b"abcde\nx\n",
                max_len: 4,
                lines: &[None, Some(b"x")],
                leftover: b"",
                discarding: false,
            },
            LinesCase {
                input: b"abcd\r\r\n",
                max_len: 4,
                lines: &[None],
                leftover: b"",
                discarding: false,
            },
            LinesCase {
                input: b"abcde",
                max_len: 4,
                lines: &[],
                leftover: b"abcde",
                discarding: false,
            },
            LinesCase {
                input: b"abcdefgh",
                max_len: 4,
                lines: &[],
                leftover: b"",
                discarding: true,
            },
            LinesCase {
                input: b"xxxxxxxMAIL FROM:<x@example.com>\r\nNOOP\r\n",
                max_len: 4,
                lines: &[None, Some(b"NOOP")],
                leftover: b"",
                discarding: false,
            },
            LinesCase {
                input: b"aaaaaaaa\nbbbbbbbbbb\r\nQUIT\r\nRS",
                max_len: 4,
                lines: &[None, None, Some(b"QUIT")],
                leftover: b"RS",
                discarding: false,
            },
            LinesCase {
                input: b"abcdefg\r\nRCPT",
                max_len: 4,
                lines: &[None],
                leftover: b"RCPT",
                discarding: false,
            },
            LinesCase {
                input: b"abcdefg\r\nRCPT TO",
                max_len: 4,
                lines: &[None],
                leftover: b"",
                discarding: true,
            },
        ];

        for case in &cases {
            let expected: Vec<Option<Vec<u8>>> = case
                .lines
                .iter()
                .map(|line| line.map(<[u8]>::to_vec))
                .collect();
            for cuts in split_plans(case.input.len()) {
                let (lines, leftover, discarding) = frame_lines(case.max_len, case.input, &cuts);
                let context = format!("input {:?}, cuts {cuts:?}", show(case.input));
                assert_eq!(lines, expected, "{context}");
                assert_eq!(show(&leftover), show(case.leftover), "{context}");
                assert_eq!(discarding, case.discarding, "{context}");
            }
        }
    }

    #[test]
    fn command_lines_drop_long_line_in_one_read() {
        let mut input = vec![b'x'; 100_000];
        input.extend_from_slice(b"\r\nQUIT\r\n");
        let mut framer = CommandLines::new(4096);

        assert_eq!(framer.next_line(&mut input), Some(CommandLine::TooLong));
        assert_eq!(
            framer.next_line(&mut input),
            Some(CommandLine::Line(b"QUIT".to_vec()))
        );
        assert!(input.is_empty());
    }

    // --- DataReader ---

    struct DataCase {
        input: &'static [u8],
        /// The expected message, or `None` when the input has no end-of-data line.
        message: Option<&'static [u8]>,
        bare: bool,
        /// Bytes after the end-of-data line, which must stay unconsumed.
        rest: &'static [u8],
    }

    struct DataRun {
        outcome: DataOutcome,
        done: bool,
        consumed: usize,
    }

    /// Feeds `input` like a session: appends each network read to a buffer, feeds the buffer
    /// and drops the consumed bytes.
    fn read_data(mode: BareLineEndings, max_size: usize, input: &[u8], cuts: &[usize]) -> DataRun {
        let mut reader = DataReader::new(mode, max_size);
        let mut buffer = Vec::new();
        let mut consumed = 0;
        let mut done = false;
        for piece in pieces(input, cuts) {
            buffer.extend_from_slice(piece);
            let feed = reader.feed(&buffer);
            buffer.drain(..feed.consumed);
            consumed += feed.consumed;
            if feed.done {
                done = true;
                break;
            }
            assert!(
                buffer.is_empty(),
                "reader left {} bytes before the end",
                buffer.len()
            );
        }
        assert_eq!(reader.is_done(), done);
        DataRun {
            outcome: reader.finish(),
            done,
            consumed,
        }
    }

    const DATA_CASES: &[DataCase] = &[
        DataCase {
            input: b"hi\r\n.\r\n",
            message: Some(b"hi\r\n"),
            bare: false,
            rest: b"",
        },
        DataCase {
            input: b".\r\n",
            message: Some(b""),
            bare: false,
            rest: b"",
        },
        DataCase {
            input: b"\r\n.\r\n",
            message: Some(b"\r\n"),
            bare: false,
            rest: b"",
        },
        DataCase {
            input: b"..x\r\n.\r\n",
            message: Some(b".x\r\n"),
            bare: false,
            rest: b"",
        },
        DataCase {
            input: b"..\r\n.\r\n",
            message: Some(b".\r\n"),
            bare: false,
            rest: b"",
        },
        DataCase {
            input: b".x\r\n.\r\n",
            message: Some(b"x\r\n"),
            bare: false,
            rest: b"",
        },
        DataCase {
            input: b"a\r\n..\r\n.\r\n",
            message: Some(b"a\r\n.\r\n"),
            bare: false,
            rest: b"",
        },
        DataCase {
            input: b"a\r\n...\r\n.\r\n",
            message: Some(b"a\r\n..\r\n"),
            bare: false,
            rest: b"",
        },
        DataCase {
            input: b"a\r\n. \r\n.\r\n",
            message: Some(b"a\r\n \r\n"),
            bare: false,
            rest: b"",
        },
        DataCase {
            input: b"hi\r\n.\r\nMAIL FROM:<x@example.com>\r\n",
            message: Some(b"hi\r\n"),
            bare: false,
            rest: b"MAIL FROM:<x@example.com>\r\n",
        },
        DataCase {
            input: b".\r\nQUIT\r\n",
            message: Some(b""),
            bare: false,
            rest: b"QUIT\r\n",
        },
        DataCase {
            input: b"a\r\n.\r\n.\r\n",
            message: Some(b"a\r\n"),
            bare: false,
            rest: b".\r\n",
        },
        // Dot lines that must not end the content.
        DataCase {
            input: b"first\n.\nMAIL FROM:<x@example.com>\r\n.\r\n",
            message: Some(b"first\r\n.\r\nMAIL FROM:<x@example.com>\r\n"),
            bare: true,
            rest: b"",
        },
        DataCase {
            input: b"a\n.\nb\r\n.\r\n",
            message: Some(b"a\r\n.\r\nb\r\n"),
            bare: true,
            rest: b"",
        },
        DataCase {
            input: b"a\n.\r\nb\r\n.\r\n",
            message: Some(b"a\r\n.\r\nb\r\n"),
            bare: true,
            rest: b"",
        },
        DataCase {
            input: b"a\r\n.\nb\r\n.\r\n",
            message: Some(b"a\r\n\r\nb\r\n"),
            bare: true,
            rest: b"",
        },
        DataCase {
            input: b"a\r.\r\nb\r\n.\r\n",
            message: Some(b"a\r\n.\r\nb\r\n"),
            bare: true,
            rest: b"",
        },
        DataCase {
            input: b"a\r\n.\rb\r\n.\r\n",
            message: Some(b"a\r\n\r\nb\r\n"),
            bare: true,
            rest: b"",
        },
        DataCase {
            input: b"a\r\n.\r\r\nb\r\n.\r\n",
            message: Some(b"a\r\n\r\n\r\nb\r\n"),
            bare: true,
            rest: b"",
        },
        DataCase {
            input: b".\nb\r\n.\r\n",
            message: Some(b"\r\nb\r\n"),
            bare: true,
            rest: b"",
        },
        DataCase {
            input: b"\n.\r\n.\r\n",
            message: Some(b"\r\n.\r\n"),
            bare: true,
            rest: b"",
        },
        DataCase {
            input: b"a\n.\r\n",
            message: None,
            bare: true,
            rest: b"",
        },
        DataCase {
            input: b"a\r.\r\n",
            message: None,
            bare: true,
            rest: b"",
        },
        DataCase {
            input: b"a\r\n.\n",
            message: None,
            bare: true,
            rest: b"",
        },
        DataCase {
            input: b"a\r\n.\r",
            message: None,
            bare: false,
            rest: b"",
        },
        DataCase {
            input: b"a\r\n.",
            message: None,
            bare: false,
            rest: b"",
        },
        DataCase {
            input: b"a\r\n. \r\n",
            message: None,
            bare: false,
            rest: b"",
        },
        DataCase {
            input: b"a\r\n.\r\r\n",
            message: None,
            bare: true,
            rest: b"",
        },
        DataCase {
            input: b"",
            message: None,
            bare: false,
            rest: b"",
        },
        // Bare line endings.
        DataCase {
            input: b"a\nb\r\n.\r\n",
            message: Some(b"a\r\nb\r\n"),
            bare: true,
            rest: b"",
        },
        DataCase {
            input: b"a\rb\r\n.\r\n",
            message: Some(b"a\r\nb\r\n"),
            bare: true,
            rest: b"",
        },
        DataCase {
            input: b"a\r\r\nb\r\n.\r\n",
            message: Some(b"a\r\n\r\nb\r\n"),
            bare: true,
            rest: b"",
        },
        DataCase {
            input: b"a\r\r\r\n.\r\n",
            message: Some(b"a\r\n\r\n\r\n"),
            bare: true,
            rest: b"",
        },
        DataCase {
            input: b"a\n\r\n.\r\n",
            message: Some(b"a\r\n\r\n"),
            bare: true,
            rest: b"",
        },
        DataCase {
            input: b"a\n\n\r\n.\r\n",
            message: Some(b"a\r\n\r\n\r\n"),
            bare: true,
            rest: b"",
        },
        DataCase {
            input: b"\r\r\n.\r\n",
            message: Some(b"\r\n\r\n"),
            bare: true,
            rest: b"",
        },
        DataCase {
            input: b"a\n..b\r\n.\r\n",
            message: Some(b"a\r\n..b\r\n"),
            bare: true,
            rest: b"",
        },
        // 8-bit bytes and NULs.
        DataCase {
            input: b"\0\xff\xfe caf\xc3\xa9\r\n\x80.\r\n.\r\n",
            message: Some(b"\0\xff\xfe caf\xc3\xa9\r\n\x80.\r\n"),
            bare: false,
            rest: b"",
        },
    ];

    #[test]
    fn data_reader_table_at_every_split() {
        for case in DATA_CASES {
            let consumed = case.input.len() - case.rest.len();
            for cuts in split_plans(case.input.len()) {
                let run = read_data(BareLineEndings::Normalize, usize::MAX, case.input, &cuts);
                let context = format!("input {:?}, cuts {cuts:?}", show(case.input));

                assert_eq!(run.done, case.message.is_some(), "{context}");
                assert_eq!(run.consumed, consumed, "{context}");
                assert_eq!(run.outcome.received, consumed as u64, "{context}");
                assert_eq!(run.outcome.bare_line_endings, case.bare, "{context}");
                assert!(!run.outcome.too_large, "{context}");
                if let Some(message) = case.message {
                    assert_eq!(show(&run.outcome.message), show(message), "{context}");
                }
            }
        }
    }

    #[test]
    fn data_reader_reject_mode_same_output() {
        for case in DATA_CASES {
            let normalized = read_data(BareLineEndings::Normalize, usize::MAX, case.input, &[]);
            let rejected = read_data(BareLineEndings::Reject, usize::MAX, case.input, &[]);

            assert_eq!(
                rejected.outcome,
                normalized.outcome,
                "input {:?}",
                show(case.input)
            );
            assert_eq!(
                rejected.consumed,
                normalized.consumed,
                "input {:?}",
                show(case.input)
            );
        }
    }

    #[test]
    fn data_reader_feed_after_end_consumes_nothing() {
        let mut reader = DataReader::new(BareLineEndings::Normalize, 100);

        assert_eq!(
            reader.feed(b"a\r\n.\r\nNOOP\r\n"),
            DataFeed {
                consumed: 6,
                done: true
            }
        );
        assert_eq!(
            reader.feed(b"NOOP\r\n"),
            DataFeed {
                consumed: 0,
                done: true
            }
        );
        assert_eq!(reader.finish().received, 6);
    }

    #[test]
    fn data_reader_size_limit() {
        let input: &[u8] = b"abcd\r\n..e\r\n.\r\nQUIT\r\n";
        let message: &[u8] = b"abcd\r\n.e\r\n";
        let consumed = input.len() - b"QUIT\r\n".len();
        for max_size in [0, 5, 9, 10, 11, 100] {
            let fits = message.len() <= max_size;
            for cuts in split_plans(input.len()) {
                let run = read_data(BareLineEndings::Normalize, max_size, input, &cuts);
                let context = format!("max_size {max_size}, cuts {cuts:?}");

                assert!(run.done, "{context}");
                assert_eq!(run.consumed, consumed, "{context}");
                assert_eq!(run.outcome.received, consumed as u64, "{context}");
                assert_eq!(run.outcome.too_large, !fits, "{context}");
                let expected: &[u8] = if fits { message } else { b"" };
                assert_eq!(show(&run.outcome.message), show(expected), "{context}");
            }
        }
    }

    #[test]
    fn data_reader_buffer_within_size_limit() {
        let line = [b'x'; 998];
        let mut content = Vec::new();
        for _ in 0..1000 {
            content.extend_from_slice(&line);
            content.extend_from_slice(b"\r\n");
        }
        let max_size = content.len();
        content.extend_from_slice(b".\r\n");
        let cuts: Vec<usize> = (1000..content.len()).step_by(1000).collect();

        let run = read_data(BareLineEndings::Normalize, max_size, &content, &cuts);

        assert!(run.done);
        assert!(!run.outcome.too_large);
        assert_eq!(run.outcome.message.len(), max_size);
        assert!(run.outcome.message.capacity() <= max_size);
    }

    #[test]
    fn data_reader_empty_message_fits_zero_limit() {
        let run = read_data(BareLineEndings::Normalize, 0, b".\r\n", &[]);

        assert!(run.done);
        assert!(!run.outcome.too_large);
        assert!(run.outcome.message.is_empty());
    }

    #[test]
    fn data_reader_large_message_in_chunks() {
        let mut content = Vec::new();
        let mut expected = Vec::new();
        for index in 0..20_000 {
            let line = format!("line {index} {}", "x".repeat(index % 90));
            if index % 7 == 0 {
                content.extend_from_slice(b"..");
                expected.push(b'.');
            }
            content.extend_from_slice(line.as_bytes());
            content.extend_from_slice(b"\r\n");
            expected.extend_from_slice(line.as_bytes());
            expected.extend_from_slice(b"\r\n");
        }
        content.extend_from_slice(b".\r\n");
        let cuts: Vec<usize> = (4093..content.len()).step_by(4093).collect();

        let run = read_data(BareLineEndings::Normalize, 10 << 20, &content, &cuts);

        assert!(run.done);
        assert_eq!(run.consumed, content.len());
        assert!(!run.outcome.bare_line_endings);
        assert!(run.outcome.message == expected, "large message differs");
    }

    /// Applies the DATA rules line by line, as simply as possible. Returns the consumed
    /// length, the message and the bare line ending flag, or `None` without an end-of-data line.
    fn reference_data(raw: &[u8]) -> Option<(usize, Vec<u8>, bool)> {
        let mut message = Vec::new();
        let mut bare = false;
        let mut after_crlf = true;
        let mut start = 0;
        loop {
            let end = start
                + raw[start..]
                    .iter()
                    .position(|&byte| byte == b'\r' || byte == b'\n')?;
            let (crlf, next) = if raw[end] == b'\n' {
                (false, end + 1)
            } else {
                match raw.get(end + 1) {
                    None => return None,
                    Some(b'\n') => (true, end + 2),
                    Some(_) => (false, end + 1),
                }
            };
            let content = &raw[start..end];
            if after_crlf && crlf && content == b"." {
                return Some((next, message, bare));
            }
            let content = match content.split_first() {
                Some((b'.', rest)) if after_crlf => rest,
                _ => content,
            };
            message.extend_from_slice(content);
            message.extend_from_slice(b"\r\n");
            bare |= !crlf;
            after_crlf = crlf;
            start = next;
        }
    }

    fn random_cuts(rng: &mut StdRng, len: usize) -> Vec<usize> {
        if len < 2 {
            return Vec::new();
        }
        if rng.random_bool(0.2) {
            return (1..len).collect();
        }
        let mut cuts: Vec<usize> = (0..rng.random_range(0..4))
            .map(|_| rng.random_range(1..len))
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        cuts
    }

    #[test]
    fn data_reader_matches_reference_on_random_input() {
        let alphabet: &[u8] = b"..\r\r\n\naa \0\xff";
        let mut rng = StdRng::seed_from_u64(0x5e9d);
        for _ in 0..20_000 {
            let len = rng.random_range(0..24);
            let mut input: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            if rng.random_bool(0.5) {
                input.extend_from_slice(b"\r\n.\r\nQUIT\r\n");
            }
            let cuts = random_cuts(&mut rng, input.len());

            let run = read_data(BareLineEndings::Normalize, usize::MAX, &input, &cuts);
            let context = format!("input {:?}, cuts {cuts:?}", show(&input));

            match reference_data(&input) {
                Some((consumed, message, bare)) => {
                    assert!(run.done, "{context}");
                    assert_eq!(run.consumed, consumed, "{context}");
                    assert_eq!(show(&run.outcome.message), show(&message), "{context}");
                    assert_eq!(run.outcome.bare_line_endings, bare, "{context}");
                }
                None => {
                    assert!(!run.done, "{context}");
                    assert_eq!(run.consumed, input.len(), "{context}");
                }
            }
            assert!(
                !run.outcome
                    .message
                    .windows(2)
                    .any(|pair| pair[0] == b'\r' && pair[1] != b'\n'),
                "bare CR in output, {context}"
            );
            let lone_lf = run.outcome.message.first() == Some(&b'\n')
                || run
                    .outcome
                    .message
                    .windows(2)
                    .any(|pair| pair[1] == b'\n' && pair[0] != b'\r');
            assert!(!lone_lf, "bare LF in output, {context}");
        }
    }

    fn random_line(rng: &mut StdRng) -> Vec<u8> {
        const SPECIAL: &[&[u8]] = &[
            b"",
            b".",
            b"..",
            b"...",
            b".x",
            b"x.",
            b". ",
            b"\0",
            b"\xff.\xfe",
            b"caf\xc3\xa9",
        ];
        if rng.random_bool(0.4) {
            return SPECIAL[rng.random_range(0..SPECIAL.len())].to_vec();
        }
        let len = rng.random_range(0..120);
        (0..len)
            .map(|_| {
                loop {
                    let byte: u8 = rng.random();
                    if byte != b'\r' && byte != b'\n' {
                        break byte;
                    }
                }
            })
            .collect()
    }

    #[test]
    fn data_round_trip_through_reader_and_encoder() {
        let mut rng = StdRng::seed_from_u64(0xda7a);
        for _ in 0..2_000 {
            let lines: Vec<Vec<u8>> = (0..rng.random_range(0..12))
                .map(|_| random_line(&mut rng))
                .collect();
            let mut original = Vec::new();
            let mut stuffed = Vec::new();
            for line in &lines {
                if line.first() == Some(&b'.') {
                    stuffed.push(b'.');
                }
                stuffed.extend_from_slice(line);
                stuffed.extend_from_slice(b"\r\n");
                original.extend_from_slice(line);
                original.extend_from_slice(b"\r\n");
            }
            stuffed.extend_from_slice(b".\r\n");
            let cuts = random_cuts(&mut rng, stuffed.len());

            let run = read_data(BareLineEndings::Reject, usize::MAX, &stuffed, &cuts);
            let mut encoded = Vec::new();
            encode_data(&run.outcome.message, &mut encoded);

            let context = format!("stuffed {:?}, cuts {cuts:?}", show(&stuffed));
            assert!(run.done, "{context}");
            assert_eq!(run.consumed, stuffed.len(), "{context}");
            assert!(!run.outcome.bare_line_endings, "{context}");
            assert_eq!(show(&run.outcome.message), show(&original), "{context}");
            assert_eq!(show(&encoded), show(&stuffed), "{context}");
        }
    }

    // --- encode_data ---

    #[test]
    fn encode_data_table() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b".\r\n"),
            (b"a\r\n", b"a\r\n.\r\n"),
            (b"\r\n", b"\r\n.\r\n"),
            (b".a\r\n", b"..a\r\n.\r\n"),
            (b".", b"..\r\n.\r\n"),
            (b"a\r\n.\r\n", b"a\r\n..\r\n.\r\n"),
            (b"a\r\n..\r\nb.\r\n", b"a\r\n...\r\nb.\r\n.\r\n"),
            (b"a", b"a\r\n.\r\n"),
            (b"a\r\nb", b"a\r\nb\r\n.\r\n"),
            (b"a\nb", b"a\r\nb\r\n.\r\n"),
            (b"a\r", b"a\r\n.\r\n"),
            (b"a\n", b"a\r\n.\r\n"),
            (b"a\r\r\n", b"a\r\n\r\n.\r\n"),
            (b"a\n.b", b"a\r\n..b\r\n.\r\n"),
            (b"a\r.b\r\n", b"a\r\n..b\r\n.\r\n"),
            (b"\n.", b"\r\n..\r\n.\r\n"),
            (b"\0\xff\r\n", b"\0\xff\r\n.\r\n"),
        ];
        for &(message, expected) in cases {
            let mut out = Vec::new();
            encode_data(message, &mut out);
            assert_eq!(show(&out), show(expected), "message {:?}", show(message));
        }
    }

    #[test]
    fn encode_data_appends_to_output() {
        let mut out = b"DATA\r\n".to_vec();

        encode_data(b".x\r\n", &mut out);

        assert_eq!(show(&out), show(b"DATA\r\n..x\r\n.\r\n"));
    }

    #[test]
    fn find_line_break_in_every_position() {
        for len in 0..70 {
            for target in 0..=len {
                let mut haystack = vec![b'x'; len];
                if target < len {
                    haystack[target] = if target % 2 == 0 { b'\r' } else { b'\n' };
                }
                let expected = (target < len).then_some(target);
                assert_eq!(
                    find_line_break(&haystack),
                    expected,
                    "len {len}, target {target}"
                );
            }
        }
    }

    #[test]
    fn bare_line_endings_from_config_words() {
        #[derive(Deserialize)]
        struct Setting {
            mode: BareLineEndings,
        }
        let parse = |text: &str| serde_json::from_str::<Setting>(text).map(|setting| setting.mode);

        assert_eq!(
            parse(r#"{"mode":"normalize"}"#).unwrap(),
            BareLineEndings::Normalize
        );
        assert_eq!(
            parse(r#"{"mode":"reject"}"#).unwrap(),
            BareLineEndings::Reject
        );
        assert!(parse(r#"{"mode":"Reject"}"#).is_err());
    }

    #[test]
    fn normalize_line_endings_cases() {
        assert_eq!(normalize_line_endings(b"a\r\nb\r\n"), None);
        assert_eq!(normalize_line_endings(b""), None);
        let cases: [(&[u8], &[u8]); 5] = [
            (b"a\nb", b"a\r\nb"),
            (b"a\rb", b"a\r\nb"),
            (b"\n", b"\r\n"),
            (b"a\r\r\nb", b"a\r\n\r\nb"),
            (b"x\r", b"x\r\n"),
        ];
        for (input, expected) in cases {
            assert_eq!(
                normalize_line_endings(input).as_deref(),
                Some(expected),
                "{input:?}"
            );
        }
    }
}
