//! Load generator for the end-to-end benchmark (`benches/e2e.py`). It does
//! the parts that Postfix's `smtp-source` cannot:
//!
//! - `latency`: sends messages at a fixed rate (open loop) and prints
//!   latency percentiles. Each latency runs from the transaction's
//!   scheduled start to the reply to its end of DATA, so a slow server
//!   cannot hide its queue by slowing the sender down.
//! - `clamd`: scans one message with clamd's INSTREAM as fast as clamd
//!   answers, over concurrent connections, and prints the rate.
//! - `idle`: opens many SMTP connections, reads each greeting, prints
//!   `ready` and holds them open for a while.
//! - `mailboxes`: fills the Guard's sender cache with tracked mailboxes,
//!   each after the given number of strikes (the policy's threshold of
//!   them starts a lockout), and prints the resident memory per mailbox.
//!
//! Every mode prints one JSON object on standard output. Every loop is
//! bounded by a count, and every network wait by a timeout.

use sendguard::guard::SenderCache;
use sendguard::identity::MailboxKey;
use sendguard::policy::{MailboxState, PolicySettings, Strike, Timestamp};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Timeout of every network wait.
const NETWORK_TIMEOUT: Duration = Duration::from_secs(30);

fn main() {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let Some((mode, rest)) = arguments.split_first() else {
        usage("missing mode");
    };
    let options = parse_options(rest);
    let result = match mode.as_str() {
        "latency" => latency(&options),
        "clamd" => clamd(&options),
        "idle" => idle(&options),
        "mailboxes" => mailboxes(&options),
        other => usage(&format!("unknown mode {other:?}")),
    };
    match result {
        Ok(json) => println!("{json}"),
        Err(error) => {
            eprintln!("loadgen {mode}: {error}");
            std::process::exit(1);
        }
    }
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "loadgen: {problem}\n\
         usage:\n  \
         loadgen latency --target HOST:PORT --message FILE --rate PER_SECOND --count N --concurrency N\n  \
         loadgen clamd --target HOST:PORT --message FILE --count N --concurrency N [--sessions 1]\n  \
         loadgen idle --target HOST:PORT --connections N --hold SECONDS\n  \
         loadgen mailboxes --count N --strikes N"
    );
    std::process::exit(2);
}

fn parse_options(arguments: &[String]) -> HashMap<String, String> {
    let mut options = HashMap::new();
    for pair in arguments.chunks(2) {
        let [name, value] = pair else {
            usage(&format!("option {} has no value", pair[0]));
        };
        let Some(name) = name.strip_prefix("--") else {
            usage(&format!("expected an option, found {name:?}"));
        };
        options.insert(name.to_string(), value.clone());
    }
    options
}

fn option<T: std::str::FromStr>(options: &HashMap<String, String>, name: &str) -> T {
    let Some(text) = options.get(name) else {
        usage(&format!("missing --{name}"));
    };
    match text.parse() {
        Ok(value) => value,
        Err(_) => usage(&format!("invalid value {text:?} for --{name}")),
    }
}

/// Reads a message file and gives it CRLF line endings, as smtp-source's
/// `-F` sends it.
fn read_message(path: &str) -> Result<Vec<u8>, String> {
    let text = std::fs::read(path).map_err(|error| format!("cannot read {path}: {error}"))?;
    let mut message = Vec::with_capacity(text.len() + text.len() / 40);
    for line in text.split(|&byte| byte == b'\n') {
        message.extend_from_slice(line.strip_suffix(b"\r").unwrap_or(line));
        message.extend_from_slice(b"\r\n");
    }
    // split() yields an empty last piece after the final LF.
    if text.ends_with(b"\n") {
        message.truncate(message.len() - 2);
    }
    Ok(message)
}

/// Returns the value at `fraction` (0 to 1) of sorted `values`, by the
/// nearest-rank method.
fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (fraction * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn latency(options: &HashMap<String, String>) -> Result<String, String> {
    let target: String = option(options, "target");
    let message = Arc::new(dot_stuffed(&read_message(&option::<String>(
        options, "message",
    ))?));
    let rate: f64 = option(options, "rate");
    let count: usize = option(options, "count");
    let concurrency: usize = option(options, "concurrency");
    if rate <= 0.0 || count == 0 || concurrency == 0 {
        usage("--rate, --count and --concurrency must be positive");
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start the runtime: {error}"))?;
    runtime.block_on(async move {
        let slots = Arc::new(tokio::sync::Semaphore::new(concurrency));
        let start = tokio::time::Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for index in 0..count {
            let scheduled = start + Duration::from_secs_f64(index as f64 / rate);
            tokio::time::sleep_until(scheduled).await;
            // Waiting for a free slot counts towards the latency, because
            // the clock starts at the scheduled time.
            let permit = slots
                .clone()
                .acquire_owned()
                .await
                .map_err(|error| error.to_string())?;
            let target = target.clone();
            let message = message.clone();
            tasks.spawn(async move {
                let outcome =
                    tokio::time::timeout(NETWORK_TIMEOUT, send_one(&target, &message, index)).await;
                drop(permit);
                match outcome {
                    Ok(Ok(())) => Ok(scheduled.elapsed().as_secs_f64() * 1000.0),
                    Ok(Err(error)) => Err(error),
                    Err(_) => Err(format!("timed out after {NETWORK_TIMEOUT:?}")),
                }
            });
        }
        let mut latencies = Vec::with_capacity(count);
        let mut failures = 0usize;
        let mut first_failure = None;
        while let Some(joined) = tasks.join_next().await {
            match joined.map_err(|error| error.to_string())? {
                Ok(milliseconds) => latencies.push(milliseconds),
                Err(error) => {
                    failures += 1;
                    first_failure.get_or_insert(error);
                }
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        latencies.sort_by(f64::total_cmp);
        Ok(serde_json::json!({
            "sent": latencies.len(),
            "failed": failures,
            "first_failure": first_failure,
            "offered_rate": rate,
            "achieved_rate": latencies.len() as f64 / elapsed,
            "p50_ms": percentile(&latencies, 0.50),
            "p99_ms": percentile(&latencies, 0.99),
            "max_ms": latencies.last().copied().unwrap_or(f64::NAN),
        })
        .to_string())
    })
}

/// Applies SMTP dot-stuffing and appends the end-of-data line.
fn dot_stuffed(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 64);
    for line in message.split_inclusive(|&byte| byte == b'\n') {
        if line.starts_with(b".") {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// Sends one message in a new SMTP session and waits for the reply to
/// its end of DATA; QUIT is sent without waiting for its reply.
async fn send_one(target: &str, message: &[u8], index: usize) -> Result<(), String> {
    let stream = tokio::net::TcpStream::connect(target)
        .await
        .map_err(|error| format!("cannot connect to {target}: {error}"))?;
    stream
        .set_nodelay(true)
        .map_err(|error| format!("cannot set TCP_NODELAY: {error}"))?;
    let mut stream = BufReader::new(stream);
    expect_reply(&mut stream, 220, "greeting").await?;
    let steps: [(String, u16); 4] = [
        ("EHLO loadgen.test\r\n".to_string(), 250),
        (format!("MAIL FROM:<sender{index}@example.org>\r\n"), 250),
        ("RCPT TO:<rcpt@example.net>\r\n".to_string(), 250),
        ("DATA\r\n".to_string(), 354),
    ];
    for (command, code) in &steps {
        write(&mut stream, command.as_bytes()).await?;
        expect_reply(&mut stream, *code, command.trim_end()).await?;
    }
    write(&mut stream, message).await?;
    expect_reply(&mut stream, 250, "end of data").await?;
    let _ = stream.get_mut().write_all(b"QUIT\r\n").await;
    Ok(())
}

async fn write(stream: &mut BufReader<tokio::net::TcpStream>, bytes: &[u8]) -> Result<(), String> {
    stream
        .get_mut()
        .write_all(bytes)
        .await
        .map_err(|error| format!("write failed: {error}"))
}

/// Reads one reply, multi-line included, and checks its code.
async fn expect_reply(
    stream: &mut BufReader<tokio::net::TcpStream>,
    code: u16,
    after: &str,
) -> Result<(), String> {
    let mut line = String::new();
    // RFC 5321 replies are short; a bounded number of lines keeps a broken
    // server from holding this loop.
    for _ in 0..100 {
        line.clear();
        let read = stream
            .read_line(&mut line)
            .await
            .map_err(|error| format!("read failed after {after}: {error}"))?;
        if read == 0 {
            return Err(format!("connection closed after {after}"));
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            return if line.starts_with(&code.to_string()) {
                Ok(())
            } else {
                Err(format!(
                    "unexpected reply after {after}: {}",
                    line.trim_end()
                ))
            };
        }
    }
    Err(format!("reply after {after} has more than 100 lines"))
}

fn clamd(options: &HashMap<String, String>) -> Result<String, String> {
    let target: String = option(options, "target");
    let message = read_message(&option::<String>(options, "message"))?;
    let count: usize = option(options, "count");
    let concurrency: usize = option(options, "concurrency");
    let sessions = options.get("sessions").is_some_and(|value| value == "1");

    // One request is one write: with separate small writes, Nagle's
    // algorithm and the delayed ACK add tens of milliseconds per scan.
    let mut request = Vec::with_capacity(message.len() + 20);
    request.extend_from_slice(b"zINSTREAM\0");
    let length = u32::try_from(message.len()).map_err(|_| "message over 4 GiB".to_string())?;
    request.extend_from_slice(&length.to_be_bytes());
    request.extend_from_slice(&message);
    request.extend_from_slice(&0u32.to_be_bytes());
    let request = Arc::new(request);

    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (target, request, next) = (target.clone(), request.clone(), next.clone());
            std::thread::spawn(move || -> Result<usize, String> {
                let mut scans = 0;
                let mut session = if sessions {
                    Some(ClamdSession::open(&target)?)
                } else {
                    None
                };
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    let reply = match session.as_mut() {
                        Some(session) => session.instream(&request)?,
                        None => instream(&target, &request)?,
                    };
                    if !reply.ends_with("OK") {
                        return Err(format!("clamd replied {reply:?}, expected OK"));
                    }
                    scans += 1;
                }
                Ok(scans)
            })
        })
        .collect();
    let mut scans = 0;
    for worker in workers {
        scans += worker
            .join()
            .map_err(|_| "a clamd worker panicked".to_string())??;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(serde_json::json!({
        "scans": scans,
        "seconds": seconds,
        "rate": scans as f64 / seconds,
    })
    .to_string())
}

/// Connects to clamd with `TCP_NODELAY` and time limits on reads and
/// writes.
fn connect_clamd(target: &str) -> Result<TcpStream, String> {
    let stream = TcpStream::connect(target)
        .map_err(|error| format!("cannot connect to {target}: {error}"))?;
    let configure = |stream: &TcpStream| -> std::io::Result<()> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(NETWORK_TIMEOUT))?;
        stream.set_write_timeout(Some(NETWORK_TIMEOUT))
    };
    configure(&stream).map_err(|error| format!("cannot configure the socket: {error}"))?;
    Ok(stream)
}

/// One clamd connection in an IDSESSION session, as sendguard keeps them.
struct ClamdSession {
    stream: TcpStream,
}

impl ClamdSession {
    fn open(target: &str) -> Result<ClamdSession, String> {
        let mut stream = connect_clamd(target)?;
        stream
            .write_all(b"zIDSESSION\0")
            .map_err(|error| format!("write to clamd failed: {error}"))?;
        Ok(ClamdSession { stream })
    }

    /// Sends one request and returns its reply without the session's
    /// number and the terminating NUL.
    fn instream(&mut self, request: &[u8]) -> Result<String, String> {
        self.stream
            .write_all(request)
            .map_err(|error| format!("write to clamd failed: {error}"))?;
        let mut reply = Vec::new();
        let mut byte = [0u8; 256];
        while !reply.ends_with(&[0]) {
            let count = self
                .stream
                .read(&mut byte)
                .map_err(|error| format!("read from clamd failed: {error}"))?;
            if count == 0 {
                return Err("clamd ended the session".to_string());
            }
            reply.extend_from_slice(&byte[..count]);
        }
        reply.pop();
        let text = String::from_utf8_lossy(&reply).into_owned();
        Ok(text
            .split_once(": ")
            .map_or(text.clone(), |(_, rest)| rest.to_string()))
    }
}

/// Sends one INSTREAM request on a new connection and returns the reply
/// without its terminating NUL.
fn instream(target: &str, request: &[u8]) -> Result<String, String> {
    let mut stream = connect_clamd(target)?;
    stream
        .write_all(request)
        .map_err(|error| format!("write to clamd failed: {error}"))?;
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .map_err(|error| format!("read from clamd failed: {error}"))?;
    while reply.last() == Some(&0) {
        reply.pop();
    }
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

fn idle(options: &HashMap<String, String>) -> Result<String, String> {
    let target: String = option(options, "target");
    let connections: usize = option(options, "connections");
    let hold: f64 = option(options, "hold");

    let start = Instant::now();
    let mut streams = Vec::with_capacity(connections);
    for index in 0..connections {
        let mut stream = TcpStream::connect(&target)
            .map_err(|error| format!("connection {index} to {target} failed: {error}"))?;
        stream
            .set_read_timeout(Some(NETWORK_TIMEOUT))
            .map_err(|error| format!("cannot set a read timeout: {error}"))?;
        let mut greeting = [0u8; 4];
        stream
            .read_exact(&mut greeting)
            .map_err(|error| format!("no greeting on connection {index}: {error}"))?;
        if &greeting[..3] != b"220" {
            return Err(format!(
                "connection {index} was greeted with {:?}",
                String::from_utf8_lossy(&greeting)
            ));
        }
        streams.push(stream);
    }
    let opened = start.elapsed().as_secs_f64();
    // The caller measures the server's memory between this line and the
    // end of the hold.
    eprintln!("ready {connections}");
    std::thread::sleep(Duration::from_secs_f64(hold));
    Ok(serde_json::json!({ "connections": streams.len(), "open_seconds": opened }).to_string())
}

/// Resident set size of this process in bytes, from /proc/self/status.
fn resident_bytes() -> Result<u64, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|error| format!("cannot read /proc/self/status: {error}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
        .ok_or_else(|| "no VmRSS in /proc/self/status".to_string())
}

fn mailboxes(options: &HashMap<String, String>) -> Result<String, String> {
    let count: usize = option(options, "count");
    let strikes: usize = option(options, "strikes");
    let capacity = NonZeroUsize::new(count).unwrap_or_else(|| usage("--count must be positive"));
    let settings = PolicySettings::default();

    let before = resident_bytes()?;
    let mut cache = SenderCache::new(capacity);
    for index in 0..count {
        // The Guard records strikes on the state read from the store, then
        // caches what sender checks need: the most recent lockout, which
        // the threshold's worth of strikes starts.
        let mut state = MailboxState::default();
        for strike in 0..strikes {
            state.record_strike(
                &settings,
                Strike {
                    at: Timestamp((index + strike) as i64),
                    verdict: "virus Eicar-Test-Signature".to_string(),
                    message_id: format!("19a4f3c2e-{index}-{strike}"),
                    header_message_id: Some(format!("<{index}.{strike}@mail.example.org>")),
                },
            );
        }
        cache.put(
            MailboxKey::mailbox(format!("user{index}@example.org")),
            state.block,
        );
    }
    let after = resident_bytes()?;
    let per_mailbox = after.saturating_sub(before) as f64 / count as f64;
    Ok(serde_json::json!({
        "mailboxes": cache.len(),
        "strikes_each": strikes,
        "rss_before": before,
        "rss_after": after,
        "bytes_per_mailbox": per_mailbox,
    })
    .to_string())
}
