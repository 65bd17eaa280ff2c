//! Recording upstream SMTP server: the smarthost that sendguard relays to in
//! the integration tests.
//!
//! It speaks ESMTP on 127.0.0.1 and records exactly what it receives, so a
//! test can compare the bytes sendguard relayed with the bytes its client
//! sent. By default it offers neither STARTTLS nor AUTH. The `starttls`
//! option adds STARTTLS (RFC 3207) with rustls, and the transcripts then
//! contain the decrypted bytes of the TLS session. The `auth` option adds
//! AUTH PLAIN and LOGIN (RFC 4954). Only CRLF.CRLF ends the message content, and a dot is
//! removed only at the start of a line that follows a CRLF (RFC 5321, 4.5.2).
//! Any bare CR or bare LF is flagged, so a test can check that sendguard never
//! passes one on.
//!
//! The server runs on std threads: one accept thread plus one thread per
//! connection. `stop()` or dropping the `Upstream` closes the listener, shuts
//! down open connections and joins every thread.

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use rustls::{ServerConfig, ServerConnection, StreamOwned};

use super::tls::{Transport, complete_handshake};

/// EHLO capabilities advertised unless `UpstreamOptions::capabilities` is set.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "PIPELINING",
    "SIZE 52428800",
    "8BITMIME",
    "SMTPUTF8",
    "ENHANCEDSTATUSCODES",
];

/// Reply to the end of DATA unless configured otherwise. `{queue_id}` is
/// replaced by the message's queue id.
pub const DEFAULT_DATA_REPLY: &str = "250 2.0.0 Ok: queued as {queue_id}";

/// Point in the dialogue where the server closes the connection without
/// replying, to simulate an upstream failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClosePoint {
    /// Close right after accepting the connection, before the greeting.
    Connect,
    /// Close when EHLO or HELO arrives.
    Ehlo,
    /// Close when MAIL arrives.
    Mail,
    /// Close when the first RCPT of a transaction arrives.
    Rcpt,
    /// Close when DATA arrives, before sending 354.
    Data,
    /// Read the whole content and its terminator, record the transaction
    /// with no reply, then close before sending the final reply.
    AfterData,
}

/// Behaviour of an `Upstream`. Build it with `UpstreamOptions::default()` and
/// the chained setters below.
#[derive(Clone, Debug)]
pub struct UpstreamOptions {
    /// When false, `Upstream::start` reserves a port but listens on nothing,
    /// so connections to `address()` are refused.
    pub listen: bool,
    /// Host name in the greeting and the EHLO reply.
    pub hostname: String,
    /// Greeting line. `None` sends `220 <hostname> ESMTP recorder`. A greeting
    /// starting with 421 is followed by closing the connection; any other
    /// non-2xx greeting makes every command except QUIT fail with 503.
    pub greeting: Option<String>,
    /// EHLO capability lines, without the reply code.
    pub capabilities: Vec<String>,
    /// Replies to RCPT for specific addresses, as (address, reply line).
    /// Addresses match case-insensitively. A 2xx reply accepts the recipient.
    pub rcpt_replies: Vec<(String, String)>,
    /// Reply to every MAIL command in place of `250 2.1.0 Ok`. A non-2xx
    /// reply rejects the transaction.
    pub mail_reply: Option<String>,
    /// Replies to the first MAIL commands, in order, across all
    /// connections; later ones get `mail_reply`.
    pub mail_replies: Vec<String>,
    /// Extra delay before the reply to RSET.
    pub rset_delay: Duration,
    /// When true, QUIT gets no reply and the connection stays open.
    pub ignore_quit: bool,

    /// Reply to the end of DATA. `{queue_id}` is replaced by the queue id.
    pub data_reply: String,
    /// Replies to the end of DATA for the first messages, in order, across
    /// all connections; later messages get `data_reply`.
    pub data_replies: Vec<String>,
    /// Delay before every reply, the greeting included.
    pub reply_delay: Duration,
    /// Extra delay before the reply to the end of DATA.
    pub data_reply_delay: Duration,
    /// Where to close the connection without replying.
    pub close_at: Option<ClosePoint>,
    /// Apply `close_at` to the first N connections only (`None`: all).
    pub close_connections: Option<usize>,
    /// Read timeout on each connection. A connection idle for longer is
    /// closed without a reply. It also bounds each TLS handshake read.
    pub read_timeout: Duration,
    /// TLS configuration for STARTTLS. `None` leaves STARTTLS unadvertised
    /// and rejects it with 454.
    pub starttls: Option<Arc<ServerConfig>>,
    /// Plaintext bytes sent in the same write as the 220 reply to STARTTLS,
    /// before the handshake. Empty sends nothing extra.
    pub inject_after_starttls: Vec<u8>,
    /// When true, MAIL before a successful STARTTLS gets 530.
    pub require_tls: bool,
    /// The only accepted AUTH credentials. `None` leaves AUTH unadvertised
    /// and rejects it with 502 as an unknown command.
    pub auth: Option<Credentials>,
    /// When true, AUTH is advertised and accepted only inside TLS, and AUTH
    /// before STARTTLS gets 538.
    pub auth_requires_tls: bool,
}

/// A user name and password for `UpstreamOptions::auth`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        UpstreamOptions {
            listen: true,
            hostname: "upstream.test".to_string(),
            greeting: None,
            capabilities: DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).collect(),
            rcpt_replies: Vec::new(),
            mail_reply: None,
            mail_replies: Vec::new(),
            rset_delay: Duration::ZERO,
            ignore_quit: false,

            data_reply: DEFAULT_DATA_REPLY.to_string(),
            data_replies: Vec::new(),
            reply_delay: Duration::ZERO,
            data_reply_delay: Duration::ZERO,
            close_at: None,
            close_connections: None,
            read_timeout: Duration::from_secs(120),
            starttls: None,
            inject_after_starttls: Vec::new(),
            require_tls: false,
            auth: None,
            auth_requires_tls: false,
        }
    }
}

impl UpstreamOptions {
    /// Reserves a port but listens on nothing.
    pub fn no_listen(mut self) -> Self {
        self.listen = false;
        self
    }

    pub fn hostname(mut self, hostname: &str) -> Self {
        self.hostname = hostname.to_string();
        self
    }

    pub fn greeting(mut self, line: &str) -> Self {
        self.greeting = Some(line.to_string());
        self
    }

    /// Replaces the EHLO capability list.
    pub fn capabilities(mut self, capabilities: &[&str]) -> Self {
        self.capabilities = capabilities.iter().map(|c| c.to_string()).collect();
        self
    }

    /// Sets the reply to RCPT for `address`, usually a rejection such as
    /// `550 5.1.1 <bob@example.net> user unknown`.
    pub fn reject_rcpt(mut self, address: &str, reply: &str) -> Self {
        self.rcpt_replies
            .push((address.to_string(), reply.to_string()));
        self
    }

    pub fn mail_reply(mut self, reply: &str) -> Self {
        self.mail_reply = Some(reply.to_string());
        self
    }

    pub fn data_reply(mut self, reply: &str) -> Self {
        self.data_reply = reply.to_string();
        self
    }

    pub fn rset_delay(mut self, delay: Duration) -> Self {
        self.rset_delay = delay;
        self
    }

    pub fn ignore_quit(mut self) -> Self {
        self.ignore_quit = true;
        self
    }

    pub fn mail_replies(mut self, replies: &[&str]) -> Self {
        self.mail_replies = replies.iter().map(|r| r.to_string()).collect();
        self
    }

    pub fn data_replies(mut self, replies: &[&str]) -> Self {
        self.data_replies = replies.iter().map(|r| r.to_string()).collect();
        self
    }

    pub fn reply_delay(mut self, delay: Duration) -> Self {
        self.reply_delay = delay;
        self
    }

    pub fn data_reply_delay(mut self, delay: Duration) -> Self {
        self.data_reply_delay = delay;
        self
    }

    /// Closes every connection at `point`.
    pub fn close_at(mut self, point: ClosePoint) -> Self {
        self.close_at = Some(point);
        self.close_connections = None;
        self
    }

    /// Closes only the first `connections` connections at `point`; later
    /// connections behave normally.
    pub fn close_at_first(mut self, point: ClosePoint, connections: usize) -> Self {
        self.close_at = Some(point);
        self.close_connections = Some(connections);
        self
    }

    pub fn read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = timeout;
        self
    }

    /// Advertises STARTTLS and, when a client sends it, replies
    /// `220 2.0.0 Ready to start TLS` and runs the TLS handshake with
    /// `config`. The session state is then reset, so the client has to send
    /// EHLO again.
    pub fn starttls(mut self, config: Arc<ServerConfig>) -> Self {
        self.starttls = Some(config);
        self
    }

    /// Sends `bytes` in plaintext in the same write as the 220 reply to
    /// STARTTLS, before the handshake. A client must discard them.
    pub fn inject_after_starttls(mut self, bytes: &[u8]) -> Self {
        self.inject_after_starttls = bytes.to_vec();
        self
    }

    /// Rejects MAIL with `530 5.7.0 Must issue a STARTTLS command first`
    /// until TLS is active.
    pub fn require_tls(mut self) -> Self {
        self.require_tls = true;
        self
    }

    /// Advertises `AUTH PLAIN LOGIN`, accepts only `username` and `password`
    /// and rejects MAIL with 530 until a client has authenticated.
    pub fn auth(mut self, username: &str, password: &str) -> Self {
        self.auth = Some(Credentials {
            username: username.to_string(),
            password: password.to_string(),
        });
        self
    }

    /// Advertises and accepts AUTH only inside TLS, as smarthosts usually
    /// do. Takes effect together with `auth`. Without `starttls` as well,
    /// no client can authenticate, so every MAIL gets 530.
    pub fn auth_requires_tls(mut self) -> Self {
        self.auth_requires_tls = true;
        self
    }
}

/// One mail transaction whose content the server read completely.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// 1-based number of the connection that carried the transaction.
    pub connection: usize,
    /// The EHLO or HELO line of the session, without the line ending.
    pub helo_line: String,
    /// The MAIL line as received, without the line ending.
    pub mail_line: String,
    /// Every RCPT line as received, rejected ones included, without the line
    /// ending.
    pub rcpt_lines: Vec<String>,
    /// Addresses from the accepted RCPT commands, without angle brackets.
    pub accepted_rcpts: Vec<String>,
    /// Message content after dot-unstuffing, up to and including the CRLF
    /// before the terminating `.` line.
    pub content: Vec<u8>,
    pub queue_id: String,
    /// The reply sent to the end of DATA, or `None` when the server closed
    /// the connection instead (`ClosePoint::AfterData`).
    pub data_reply: Option<String>,
    /// True when any line of the transaction, from MAIL to the terminator,
    /// contained a bare CR or ended in a bare LF.
    pub bare_line_ending: bool,
    /// True when the transaction arrived inside TLS.
    pub tls: bool,
    /// User name of the successful AUTH before the transaction, if any.
    pub auth_user: Option<String>,
}

impl Received {
    /// Returns true when the end of DATA got a 2xx reply.
    pub fn accepted(&self) -> bool {
        self.data_reply
            .as_deref()
            .is_some_and(|reply| reply.starts_with('2'))
    }
}

/// Raw bytes of one connection in both directions. Inside TLS these are the
/// decrypted bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectionTranscript {
    /// The client's address as `IP:PORT`.
    pub peer_address: String,
    pub received: Vec<u8>,
    pub sent: Vec<u8>,
    /// Length of `received` when the TLS handshake started, or `None` when
    /// the connection never started one. Bytes before this offset crossed
    /// the network in plaintext.
    pub received_before_tls: Option<usize>,
    /// Length of `sent` when the TLS handshake started, as for
    /// `received_before_tls`.
    pub sent_before_tls: Option<usize>,
}

impl ConnectionTranscript {
    /// Returns the part of `received` that arrived in plaintext, which is
    /// all of it on a connection without TLS.
    pub fn plaintext_received(&self) -> &[u8] {
        &self.received[..self.received_before_tls.unwrap_or(self.received.len())]
    }

    /// Returns the part of `sent` that was sent in plaintext.
    pub fn plaintext_sent(&self) -> &[u8] {
        &self.sent[..self.sent_before_tls.unwrap_or(self.sent.len())]
    }
}

/// A running recording SMTP server on 127.0.0.1.
pub struct Upstream {
    address: String,
    shared: Arc<Shared>,
    accept_thread: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    options: Mutex<UpstreamOptions>,
    state: Mutex<State>,
    state_changed: Condvar,
    stopping: AtomicBool,
    connection_threads: Mutex<Vec<(TcpStream, JoinHandle<()>)>>,
}

#[derive(Default)]
struct State {
    transactions: Vec<Received>,
    connections: Vec<ConnectionTranscript>,
    transcript: Vec<u8>,
    bare_line_ending: bool,
    replied_messages: usize,
    replied_mails: usize,
    plaintext_after_starttls: bool,
    auth_failures: usize,
    tls_handshake_errors: Vec<String>,
}

impl Shared {
    fn lock_state(&self) -> MutexGuard<'_, State> {
        // A panicking connection thread must not hide the recorded data from
        // the test, so a poisoned lock is still used.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Upstream {
    /// Starts the server on a free port of 127.0.0.1.
    pub fn start(options: UpstreamOptions) -> Upstream {
        let listener =
            TcpListener::bind("127.0.0.1:0").expect("failed to bind 127.0.0.1:0 for the upstream");
        let address = listener
            .local_addr()
            .expect("failed to read the upstream's local address")
            .to_string();
        let listen = options.listen;
        let shared = Arc::new(Shared {
            options: Mutex::new(options),
            state: Mutex::new(State::default()),
            state_changed: Condvar::new(),
            stopping: AtomicBool::new(!listen),
            connection_threads: Mutex::new(Vec::new()),
        });

        let accept_thread = if listen {
            listener
                .set_nonblocking(true)
                .expect("failed to make the upstream listener non-blocking");
            let shared = Arc::clone(&shared);
            Some(
                thread::Builder::new()
                    .name(format!("upstream-accept-{address}"))
                    .spawn(move || accept_loop(listener, shared))
                    .expect("failed to spawn the upstream accept thread"),
            )
        } else {
            drop(listener);
            None
        };

        Upstream {
            address,
            shared,
            accept_thread: Mutex::new(accept_thread),
        }
    }

    /// Address as `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        self.address.clone()
    }

    /// Replaces the options. New connections use them; open connections keep
    /// the options they started with.
    pub fn set_options(&self, options: UpstreamOptions) {
        *self.shared.options.lock().unwrap() = options;
    }

    /// Transactions whose end of DATA got a 2xx reply, in the order the
    /// server finished reading them.
    pub fn messages(&self) -> Vec<Received> {
        let state = self.shared.lock_state();
        state
            .transactions
            .iter()
            .filter(|t| t.accepted())
            .cloned()
            .collect()
    }

    /// Returns every transaction whose content was read completely,
    /// whatever the reply to the end of DATA was.
    pub fn transactions(&self) -> Vec<Received> {
        self.shared.lock_state().transactions.clone()
    }

    /// Waits until at least `count` messages are accepted and returns them
    /// all. Panics with the received transcript when `timeout` passes first.
    pub fn wait_for_messages(&self, count: usize, timeout: Duration) -> Vec<Received> {
        self.wait_until(timeout, &format!("{count} accepted messages"), |state| {
            state.transactions.iter().filter(|t| t.accepted()).count() >= count
        });
        self.messages()
    }

    /// Waits until at least `count` transactions are recorded, accepted or
    /// not, and returns them all. Panics when `timeout` passes first.
    pub fn wait_for_transactions(&self, count: usize, timeout: Duration) -> Vec<Received> {
        self.wait_until(timeout, &format!("{count} transactions"), |state| {
            state.transactions.len() >= count
        });
        self.transactions()
    }

    /// Waits until at least `count` connections were accepted. Panics when
    /// `timeout` passes first.
    pub fn wait_for_connections(&self, count: usize, timeout: Duration) {
        self.wait_until(timeout, &format!("{count} connections"), |state| {
            state.connections.len() >= count
        });
    }

    fn wait_until(&self, timeout: Duration, what: &str, done: impl Fn(&State) -> bool) {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock_state();
        while !done(&state) {
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "upstream {} timed out after {:?} waiting for {what}: {} connections, {} transactions ({} accepted)\n--- received by the upstream ---\n{}",
                    self.address,
                    timeout,
                    state.connections.len(),
                    state.transactions.len(),
                    state.transactions.iter().filter(|t| t.accepted()).count(),
                    render_tail(&state.transcript, 8192),
                );
            }
            state = self
                .shared
                .state_changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// Number of connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.lock_state().connections.len()
    }

    /// Everything received on all connections, raw. Lines of concurrent
    /// connections interleave in arrival order.
    pub fn transcript(&self) -> Vec<u8> {
        self.shared.lock_state().transcript.clone()
    }

    /// Raw bytes received and sent, per connection, in accept order.
    pub fn connection_transcripts(&self) -> Vec<ConnectionTranscript> {
        self.shared.lock_state().connections.clone()
    }

    /// Returns true when any received line, on any connection, contained a
    /// bare CR or ended in a bare LF.
    pub fn saw_bare_line_ending(&self) -> bool {
        self.shared.lock_state().bare_line_ending
    }

    /// Returns true when a client sent bytes after the STARTTLS line that
    /// had arrived before the 220 reply went out, on any connection. These
    /// bytes are plaintext that a client pipelined after STARTTLS. The
    /// server discards them, as RFC 3207 requires, and keeps them in the
    /// transcripts.
    pub fn saw_plaintext_after_starttls(&self) -> bool {
        self.shared.lock_state().plaintext_after_starttls
    }

    /// Number of AUTH attempts rejected with 535, on all connections.
    pub fn auth_failures(&self) -> usize {
        self.shared.lock_state().auth_failures
    }

    /// Errors of the TLS handshakes that failed, in order, each as
    /// `connection N: error`.
    pub fn tls_handshake_errors(&self) -> Vec<String> {
        self.shared.lock_state().tls_handshake_errors.clone()
    }

    /// Waits until at least `count` TLS handshakes failed and returns their
    /// errors. Panics when `timeout` passes first.
    pub fn wait_for_tls_handshake_errors(&self, count: usize, timeout: Duration) -> Vec<String> {
        self.wait_until(
            timeout,
            &format!("{count} failed TLS handshakes"),
            |state| state.tls_handshake_errors.len() >= count,
        );
        self.tls_handshake_errors()
    }

    /// Closes the listener, shuts down open connections and joins every
    /// thread. Connections to `address()` are refused afterwards. Calling it
    /// again does nothing.
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let accept_thread = self.accept_thread.lock().unwrap().take();
        if let Some(handle) = accept_thread {
            let _ = handle.join();
        }

        let connection_threads =
            std::mem::take(&mut *self.shared.connection_threads.lock().unwrap());
        for (stream, _) in &connection_threads {
            let _ = stream.shutdown(Shutdown::Both);
        }
        for (_, handle) in connection_threads {
            let _ = handle.join();
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop();
    }
}

pub use super::{closed_address, free_port};

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stopping.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => start_connection(stream, &shared),
            Err(error) if error.kind() == ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5))
            }
            Err(error) => {
                eprintln!("upstream: accept failed: {error}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn start_connection(stream: TcpStream, shared: &Arc<Shared>) {
    let options = shared.options.lock().unwrap().clone();
    let peer_address = stream
        .peer_addr()
        .map(|address| address.to_string())
        .unwrap_or_default();
    let number = {
        let mut state = shared.lock_state();
        state.connections.push(ConnectionTranscript {
            peer_address,
            ..ConnectionTranscript::default()
        });
        shared.state_changed.notify_all();
        state.connections.len()
    };

    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(options.read_timeout)))
        .and_then(|()| stream.set_nodelay(true))
        .and_then(|()| stream.try_clone());
    let handle_for_stop = match setup {
        Ok(clone) => clone,
        Err(error) => {
            eprintln!("upstream: failed to set up connection {number}: {error}");
            return;
        }
    };

    let close_at = options.close_at.filter(|_| {
        options
            .close_connections
            .is_none_or(|limit| number <= limit)
    });
    let thread_shared = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name(format!("upstream-connection-{number}"))
        .spawn(move || {
            let mut session = Session::new(thread_shared, stream, number, options, close_at);
            // An I/O error only means the peer went away or timed out, and
            // everything received so far is already recorded.
            let _ = session.run();
            session.close();
        });
    match spawned {
        Ok(handle) => shared
            .connection_threads
            .lock()
            .unwrap()
            .push((handle_for_stop, handle)),
        Err(error) => {
            eprintln!("upstream: failed to spawn the thread for connection {number}: {error}")
        }
    }
}

/// Result of reading one line: its raw bytes, with the line ending.
struct Line {
    raw: Vec<u8>,
    bare_line_ending: bool,
}

impl Line {
    /// Line text without the line ending, lossily decoded.
    fn text(&self) -> String {
        let without_lf = self.raw.strip_suffix(b"\n").unwrap_or(&self.raw);
        let without_ending = without_lf.strip_suffix(b"\r").unwrap_or(without_lf);
        String::from_utf8_lossy(without_ending).into_owned()
    }
}

struct Transaction {
    mail_line: String,
    rcpt_lines: Vec<String>,
    accepted_rcpts: Vec<String>,
    bare_line_ending: bool,
    /// Content received so far by BDAT chunks.
    chunks: Vec<u8>,
}

/// Upper bound on the reads that drain plaintext pipelined after STARTTLS,
/// so a client that keeps sending cannot hold the session in that loop.
const MAX_DRAIN_READS: usize = 64;

struct Session {
    shared: Arc<Shared>,
    /// Reads and writes the dialogue. Replies go to the inner transport
    /// through `get_mut`, which leaves the read buffer alone.
    stream: BufReader<Transport<ServerConnection>>,
    /// Clone of the TCP socket, for shutting it down once TLS owns the
    /// stream.
    socket: TcpStream,
    number: usize,
    options: UpstreamOptions,
    close_at: Option<ClosePoint>,
    helo_line: Option<String>,
    transaction: Option<Transaction>,
    greeting_ok: bool,
    /// User name of the successful AUTH in this session.
    auth_user: Option<String>,
}

impl Session {
    fn new(
        shared: Arc<Shared>,
        stream: TcpStream,
        number: usize,
        options: UpstreamOptions,
        close_at: Option<ClosePoint>,
    ) -> Session {
        let socket = stream
            .try_clone()
            .expect("failed to clone the upstream connection");
        Session {
            shared,
            stream: BufReader::new(Transport::Plain(stream)),
            socket,
            number,
            options,
            close_at,
            helo_line: None,
            transaction: None,
            greeting_ok: true,
            auth_user: None,
        }
    }

    fn is_tls(&self) -> bool {
        self.stream.get_ref().is_tls()
    }

    fn closes_at(&self, point: ClosePoint) -> bool {
        self.close_at == Some(point)
    }

    fn close(&mut self) {
        if let Transport::Tls(stream) = self.stream.get_mut() {
            stream.conn.send_close_notify();
            let _ = stream.flush();
        }
        let _ = self.socket.shutdown(Shutdown::Both);
    }

    fn run(&mut self) -> io::Result<()> {
        if self.closes_at(ClosePoint::Connect) {
            return Ok(());
        }

        let greeting = self
            .options
            .greeting
            .clone()
            .unwrap_or_else(|| format!("220 {} ESMTP recorder", self.options.hostname));
        self.reply(&greeting)?;
        if greeting.starts_with("421") {
            return Ok(());
        }
        self.greeting_ok = greeting.starts_with('2');

        while let Some(line) = self.read_line()? {
            let text = line.text();
            let verb = text.split(' ').next().unwrap_or("").to_ascii_uppercase();
            let verb = verb.split(':').next().unwrap_or("").to_string();
            if !self.greeting_ok && verb != "QUIT" {
                self.reply("503 5.5.1 Error: no service")?;
                continue;
            }
            match verb.as_str() {
                "EHLO" | "HELO" => {
                    if self.closes_at(ClosePoint::Ehlo) {
                        return Ok(());
                    }
                    self.transaction = None;
                    self.helo_line = Some(text.clone());
                    if verb == "EHLO" {
                        let capabilities = self.ehlo_capabilities();
                        let mut reply = vec![format!("250-{}", self.options.hostname)];
                        let count = capabilities.len();
                        for (index, capability) in capabilities.iter().enumerate() {
                            let separator = if index + 1 == count { ' ' } else { '-' };
                            reply.push(format!("250{separator}{capability}"));
                        }
                        if count == 0 {
                            reply[0].replace_range(3..4, " ");
                        }
                        self.reply(&reply.join("\n"))?;
                    } else {
                        self.reply(&format!("250 {}", self.options.hostname))?;
                    }
                }
                "MAIL" => {
                    if self.closes_at(ClosePoint::Mail) {
                        return Ok(());
                    }
                    self.mail(&text, line.bare_line_ending)?;
                }
                "RCPT" => {
                    let first_rcpt = self
                        .transaction
                        .as_ref()
                        .is_some_and(|t| t.rcpt_lines.is_empty());
                    if first_rcpt && self.closes_at(ClosePoint::Rcpt) {
                        return Ok(());
                    }
                    self.rcpt(&text)?;
                }
                "DATA" => {
                    if !self.data()? {
                        return Ok(());
                    }
                }
                "BDAT" => {
                    if !self.bdat(&text)? {
                        return Ok(());
                    }
                }
                "RSET" => {
                    self.transaction = None;
                    self.sleep(self.options.rset_delay);
                    self.reply("250 2.0.0 Ok")?;
                }
                "NOOP" => self.reply("250 2.0.0 Ok")?,
                "QUIT" if self.options.ignore_quit => {
                    // Keeps the connection open without a reply, until the
                    // peer or the server's stop closes it.
                    self.sleep(Duration::from_secs(120));
                    return Ok(());
                }
                "QUIT" => {
                    self.reply("221 2.0.0 Bye")?;
                    return Ok(());
                }
                "STARTTLS" => {
                    if !self.starttls(&text)? {
                        return Ok(());
                    }
                }
                "AUTH" if self.options.auth.is_some() => {
                    if !self.auth(&text)? {
                        return Ok(());
                    }
                }
                "VRFY" => self.reply("502 5.5.1 VRFY command is disabled")?,
                "" => self.reply("500 5.5.2 Error: bad syntax")?,
                _ => self.reply("502 5.5.2 Error: command not recognized")?,
            }
        }
        Ok(())
    }

    fn mail(&mut self, text: &str, bare_line_ending: bool) -> io::Result<()> {
        if self.helo_line.is_none() {
            return self.reply("503 5.5.1 Error: send HELO/EHLO first");
        }
        if self.transaction.is_some() {
            return self.reply("503 5.5.1 Error: nested MAIL command");
        }
        if self.options.require_tls && !self.is_tls() {
            return self.reply("530 5.7.0 Must issue a STARTTLS command first");
        }
        if self.options.auth.is_some() && self.auth_user.is_none() {
            return self.reply("530 5.7.0 Authentication required");
        }
        let Some(arguments) = strip_prefix_ignore_case(text, "MAIL FROM:") else {
            return self.reply("501 5.5.4 Syntax: MAIL FROM:<address>");
        };
        if let Some(declared) = size_parameter(arguments)
            && let Some(limit) = self.size_limit()
            && declared > limit
        {
            return self.reply("552 5.3.4 Message size exceeds fixed limit");
        }

        let reply = {
            let mut state = self.shared.lock_state();
            let reply = self
                .options
                .mail_replies
                .get(state.replied_mails)
                .or(self.options.mail_reply.as_ref())
                .cloned()
                .unwrap_or_else(|| "250 2.1.0 Ok".to_string());
            state.replied_mails += 1;
            reply
        };
        if reply.starts_with('2') {
            self.transaction = Some(Transaction {
                mail_line: text.to_string(),
                rcpt_lines: Vec::new(),
                accepted_rcpts: Vec::new(),
                bare_line_ending,
                chunks: Vec::new(),
            });
        }
        self.reply(&reply)
    }

    fn rcpt(&mut self, text: &str) -> io::Result<()> {
        let Some(transaction) = self.transaction.as_mut() else {
            return self.reply("503 5.5.1 Error: need MAIL command");
        };
        let Some(arguments) = strip_prefix_ignore_case(text, "RCPT TO:") else {
            return self.reply("501 5.5.4 Syntax: RCPT TO:<address>");
        };
        transaction.rcpt_lines.push(text.to_string());

        let address = path_address(arguments);
        let reply = self
            .options
            .rcpt_replies
            .iter()
            .find(|(rejected, _)| rejected.eq_ignore_ascii_case(&address))
            .map(|(_, reply)| reply.clone())
            .unwrap_or_else(|| "250 2.1.5 Ok".to_string());
        if reply.starts_with('2') {
            transaction.accepted_rcpts.push(address);
        }
        self.reply(&reply)
    }

    /// Handles DATA. Returns false when the connection is to be closed.
    fn data(&mut self) -> io::Result<bool> {
        let Some(transaction) = self.transaction.as_ref() else {
            self.reply("503 5.5.1 Error: need RCPT command")?;
            return Ok(true);
        };
        if transaction.accepted_rcpts.is_empty() {
            self.reply("554 5.5.1 Error: no valid recipients")?;
            return Ok(true);
        }
        if self.closes_at(ClosePoint::Data) {
            return Ok(false);
        }
        self.reply("354 End data with <CR><LF>.<CR><LF>")?;

        let Some(content) = self.read_content()? else {
            // The peer closed or timed out in the middle of the content.
            return Ok(false);
        };
        self.complete_message(content)
    }

    /// Handles `BDAT size [LAST]` (RFC 3030): reads the chunk's octets in
    /// every case, then answers. Returns false when the connection is to be
    /// closed.
    fn bdat(&mut self, text: &str) -> io::Result<bool> {
        let mut words = text.split_ascii_whitespace().skip(1);
        let size = words.next().and_then(|size| size.parse::<usize>().ok());
        let last = words
            .next()
            .is_some_and(|word| word.eq_ignore_ascii_case("LAST"));
        let Some(size) = size else {
            self.reply("501 5.5.4 Syntax: BDAT size [LAST]")?;
            return Ok(false);
        };
        let mut chunk = vec![0u8; size];
        if self.stream.read_exact(&mut chunk).is_err() {
            return Ok(false);
        }
        {
            let mut state = self.shared.lock_state();
            state.transcript.extend_from_slice(&chunk);
            state.connections[self.number - 1]
                .received
                .extend_from_slice(&chunk);
            self.shared.state_changed.notify_all();
        }
        let Some(transaction) = self.transaction.as_mut() else {
            self.reply("503 5.5.1 Error: need MAIL command")?;
            return Ok(true);
        };
        if transaction.accepted_rcpts.is_empty() {
            self.reply("554 5.5.1 Error: no valid recipients")?;
            return Ok(true);
        }
        transaction.bare_line_ending |= has_bare_line_ending(&chunk);
        transaction.chunks.extend_from_slice(&chunk);
        if !last {
            self.reply(&format!("250 2.0.0 {size} octets received"))?;
            return Ok(true);
        }
        let content = std::mem::take(&mut transaction.chunks);
        self.complete_message(content)
    }

    /// Records a complete message and answers it. Returns false when the
    /// connection is to be closed.
    fn complete_message(&mut self, content: Vec<u8>) -> io::Result<bool> {
        let transaction = self.transaction.take().expect("a transaction is open");
        let queue_id = next_queue_id();
        let mut received = Received {
            connection: self.number,
            helo_line: self.helo_line.clone().unwrap_or_default(),
            mail_line: transaction.mail_line,
            rcpt_lines: transaction.rcpt_lines,
            accepted_rcpts: transaction.accepted_rcpts,
            content,
            queue_id: queue_id.clone(),
            data_reply: None,
            bare_line_ending: transaction.bare_line_ending,
            tls: self.is_tls(),
            auth_user: self.auth_user.clone(),
        };

        if self.closes_at(ClosePoint::AfterData) {
            self.record_transaction(received);
            return Ok(false);
        }

        self.sleep(self.options.data_reply_delay);
        let reply = {
            let mut state = self.shared.lock_state();
            let template = self
                .options
                .data_replies
                .get(state.replied_messages)
                .unwrap_or(&self.options.data_reply)
                .clone();
            state.replied_messages += 1;
            template.replace("{queue_id}", &queue_id)
        };
        received.data_reply = Some(reply.clone());
        // Record before replying, so a test that got the relay's reply finds
        // the message here.
        self.record_transaction(received);
        self.reply(&reply)?;
        Ok(true)
    }

    /// Reads message content up to CRLF.CRLF and removes dot-stuffing.
    /// Returns `None` when the connection ended first.
    fn read_content(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut content = Vec::new();
        // The CRLF of the DATA command precedes the first content line.
        let mut at_line_start = true;
        loop {
            let Some(line) = self.read_line()? else {
                return Ok(None);
            };
            if at_line_start && line.raw == b".\r\n" {
                return Ok(Some(content));
            }
            // A line starts only after CRLF, so a dot after a bare LF stays.
            let unstuffed = match line.raw.strip_prefix(b".") {
                Some(rest) if at_line_start => rest,
                _ => &line.raw[..],
            };
            content.extend_from_slice(unstuffed);
            at_line_start = line.raw.ends_with(b"\r\n");
        }
    }

    /// Reads up to and including the next LF, records it and flags a bare
    /// line ending on the open transaction. Returns `None` at the end of the
    /// stream; an unterminated tail is recorded but not returned.
    fn read_line(&mut self) -> io::Result<Option<Line>> {
        let mut raw = Vec::new();
        let result = self.stream.read_until(b'\n', &mut raw);
        let complete = raw.ends_with(b"\n");
        let bare_line_ending = has_bare_line_ending(&raw);
        if !raw.is_empty() {
            let mut state = self.shared.lock_state();
            state.transcript.extend_from_slice(&raw);
            state.connections[self.number - 1]
                .received
                .extend_from_slice(&raw);
            state.bare_line_ending |= bare_line_ending;
            self.shared.state_changed.notify_all();
        }
        result?;
        if !complete {
            return Ok(None);
        }
        if let Some(transaction) = self.transaction.as_mut() {
            transaction.bare_line_ending |= bare_line_ending;
        }
        Ok(Some(Line {
            raw,
            bare_line_ending,
        }))
    }

    /// Sends a reply. Lines of a multi-line reply are separated by `\n` in
    /// `text` and each is sent with CRLF.
    fn reply(&mut self, text: &str) -> io::Result<()> {
        self.sleep(self.options.reply_delay);
        let mut bytes = Vec::new();
        for line in text.split('\n') {
            bytes.extend_from_slice(line.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        }
        self.send(&bytes)
    }

    /// Records `bytes` as sent and writes them in one write.
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.shared.lock_state().connections[self.number - 1]
            .sent
            .extend_from_slice(bytes);
        let transport = self.stream.get_mut();
        transport.write_all(bytes)?;
        transport.flush()
    }

    fn record_transaction(&self, received: Received) {
        let mut state = self.shared.lock_state();
        state.transactions.push(received);
        self.shared.state_changed.notify_all();
    }

    /// Sleeps for `duration`, returning early when the server stops.
    fn sleep(&self, duration: Duration) {
        let deadline = Instant::now() + duration;
        while !self.shared.stopping.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            thread::sleep((deadline - now).min(Duration::from_millis(20)));
        }
    }

    fn size_limit(&self) -> Option<u64> {
        self.options.capabilities.iter().find_map(|capability| {
            let mut words = capability.split_whitespace();
            let keyword = words.next()?;
            if !keyword.eq_ignore_ascii_case("SIZE") {
                return None;
            }
            // RFC 1870: SIZE 0 or SIZE without a number declares no limit.
            words.next()?.parse::<u64>().ok().filter(|limit| *limit > 0)
        })
    }
}

/// Why an AUTH dialogue ended without credentials to check.
enum AuthStop {
    /// The connection ended during the dialogue.
    Closed,
    /// The client sent `*` to cancel (RFC 4954, 4).
    Aborted,
    /// A response was not valid base64.
    InvalidBase64,
}

/// STARTTLS and AUTH.
impl Session {
    /// Returns the EHLO capabilities for the current state of the session.
    fn ehlo_capabilities(&self) -> Vec<String> {
        let mut capabilities = self.options.capabilities.clone();
        if self.options.starttls.is_some() && !self.is_tls() {
            capabilities.push("STARTTLS".to_string());
        }
        if self.options.auth.is_some() && (!self.options.auth_requires_tls || self.is_tls()) {
            capabilities.push("AUTH PLAIN LOGIN".to_string());
        }
        capabilities
    }

    /// Handles STARTTLS (RFC 3207). Returns false when the connection is to
    /// be closed, which follows a failed handshake.
    fn starttls(&mut self, text: &str) -> io::Result<bool> {
        let Some(config) = self.options.starttls.clone() else {
            self.reply("454 4.7.0 TLS not available")?;
            return Ok(true);
        };
        if self.is_tls() {
            self.reply("554 5.5.1 Error: TLS already active")?;
            return Ok(true);
        }
        if !text.eq_ignore_ascii_case("STARTTLS") {
            self.reply("501 5.5.4 Syntax: STARTTLS")?;
            return Ok(true);
        }
        if self.transaction.is_some() {
            self.reply("503 5.5.1 Error: MAIL transaction in progress")?;
            return Ok(true);
        }

        self.sleep(self.options.reply_delay);
        // Whatever arrived after the STARTTLS line was sent before the client
        // saw the 220, so it is plaintext and must not be read as part of the
        // TLS session.
        let pipelined = self.take_pipelined_plaintext()?;
        if !pipelined.is_empty() {
            let mut state = self.shared.lock_state();
            state.transcript.extend_from_slice(&pipelined);
            state.connections[self.number - 1]
                .received
                .extend_from_slice(&pipelined);
            state.plaintext_after_starttls = true;
            self.shared.state_changed.notify_all();
        }

        let mut reply = b"220 2.0.0 Ready to start TLS\r\n".to_vec();
        reply.extend_from_slice(&self.options.inject_after_starttls);
        self.send(&reply)?;
        {
            let mut state = self.shared.lock_state();
            let connection = &mut state.connections[self.number - 1];
            connection.received_before_tls = Some(connection.received.len());
            connection.sent_before_tls = Some(connection.sent.len());
        }

        let plain = std::mem::replace(&mut self.stream, BufReader::new(Transport::Detached));
        let mut socket = plain.into_inner().into_plain();
        let handshake = ServerConnection::new(config)
            .map_err(|error| io::Error::new(ErrorKind::InvalidInput, error))
            .and_then(|mut connection| {
                complete_handshake(&mut connection, &mut socket)?;
                Ok(connection)
            });
        let connection = match handshake {
            Ok(connection) => connection,
            Err(error) => {
                eprintln!(
                    "upstream: TLS handshake failed on connection {}: {error}",
                    self.number
                );
                let mut state = self.shared.lock_state();
                state
                    .tls_handshake_errors
                    .push(format!("connection {}: {error}", self.number));
                self.shared.state_changed.notify_all();
                return Ok(false);
            }
        };
        self.stream = BufReader::new(Transport::Tls(Box::new(StreamOwned::new(
            connection, socket,
        ))));

        // RFC 3207, 4.2: the server discards what it learned from the client
        // before TLS, so the client has to send EHLO again.
        self.helo_line = None;
        self.transaction = None;
        self.auth_user = None;
        Ok(true)
    }

    /// Takes the bytes that follow the STARTTLS line in the read buffer and
    /// those already waiting on the socket, without waiting for more.
    fn take_pipelined_plaintext(&mut self) -> io::Result<Vec<u8>> {
        let mut bytes = self.stream.buffer().to_vec();
        self.stream.consume(bytes.len());

        // NOTE: bytes that a client sends later than this, yet before it
        // reads the 220, reach the TLS handshake and make it fail instead of
        // raising the flag.
        self.socket.set_nonblocking(true)?;
        let mut chunk = [0u8; 4096];
        let mut result = Ok(());
        for _ in 0..MAX_DRAIN_READS {
            match self.socket.read(&mut chunk) {
                Ok(0) => break,
                Ok(count) => bytes.extend_from_slice(&chunk[..count]),
                Err(error) if error.kind() == ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(error) => {
                    result = Err(error);
                    break;
                }
            }
        }
        self.socket.set_nonblocking(false)?;
        result.map(|()| bytes)
    }

    /// Handles AUTH PLAIN (RFC 4616) and AUTH LOGIN, each with or without an
    /// initial response (RFC 4954). Returns false when the connection ended
    /// during the dialogue.
    fn auth(&mut self, text: &str) -> io::Result<bool> {
        if self.options.auth_requires_tls && !self.is_tls() {
            self.reply("538 5.7.11 Encryption required for requested authentication mechanism")?;
            return Ok(true);
        }
        if self.helo_line.is_none() {
            self.reply("503 5.5.1 Error: send HELO/EHLO first")?;
            return Ok(true);
        }
        if self.auth_user.is_some() {
            self.reply("503 5.5.1 Error: already authenticated")?;
            return Ok(true);
        }
        if self.transaction.is_some() {
            self.reply("503 5.5.1 Error: MAIL transaction in progress")?;
            return Ok(true);
        }

        let words: Vec<&str> = text.split_ascii_whitespace().skip(1).collect();
        let (mechanism, initial_response) = match words.as_slice() {
            [mechanism] => (mechanism.to_ascii_uppercase(), None),
            [mechanism, response] => (mechanism.to_ascii_uppercase(), Some(*response)),
            _ => {
                self.reply("501 5.5.4 Syntax: AUTH mechanism [initial-response]")?;
                return Ok(true);
            }
        };
        let credentials = match mechanism.as_str() {
            "PLAIN" => self.plain_credentials(initial_response)?,
            "LOGIN" => self.login_credentials(initial_response)?,
            _ => {
                self.reply("504 5.5.4 Unrecognized authentication type")?;
                return Ok(true);
            }
        };
        let (username, password) = match credentials {
            Ok(credentials) => credentials,
            Err(AuthStop::Closed) => return Ok(false),
            Err(AuthStop::Aborted) => {
                self.reply("501 5.7.0 Authentication aborted")?;
                return Ok(true);
            }
            Err(AuthStop::InvalidBase64) => {
                self.reply("501 5.5.2 Cannot decode response")?;
                return Ok(true);
            }
        };

        let expected = self.options.auth.as_ref().expect("AUTH is configured");
        let valid =
            username == expected.username.as_bytes() && password == expected.password.as_bytes();
        if valid {
            self.auth_user = Some(expected.username.clone());
            self.reply("235 2.7.0 Authentication successful")?;
        } else {
            self.shared.lock_state().auth_failures += 1;
            self.reply("535 5.7.8 Error: authentication failed")?;
        }
        Ok(true)
    }

    /// Reads the PLAIN message `authzid NUL authcid NUL password` and returns
    /// the user name and password. A message without exactly three fields,
    /// or with an authorization identity other than empty or the user name,
    /// returns an empty user name, which never matches.
    fn plain_credentials(
        &mut self,
        initial_response: Option<&str>,
    ) -> io::Result<Result<(Vec<u8>, Vec<u8>), AuthStop>> {
        let message = match self.auth_response(initial_response, "")? {
            Ok(message) => message,
            Err(stop) => return Ok(Err(stop)),
        };
        let fields: Vec<&[u8]> = message.split(|byte| *byte == 0).collect();
        let credentials = match fields.as_slice() {
            [authzid, authcid, password] if authzid.is_empty() || authzid == authcid => {
                (authcid.to_vec(), password.to_vec())
            }
            _ => (Vec::new(), Vec::new()),
        };
        Ok(Ok(credentials))
    }

    /// Runs the LOGIN dialogue (`334 Username:` then `334 Password:`, both
    /// base64-encoded) and returns the user name and password. An initial
    /// response stands for the user name.
    fn login_credentials(
        &mut self,
        initial_response: Option<&str>,
    ) -> io::Result<Result<(Vec<u8>, Vec<u8>), AuthStop>> {
        let username = match self.auth_response(initial_response, "VXNlcm5hbWU6")? {
            Ok(username) => username,
            Err(stop) => return Ok(Err(stop)),
        };
        let password = match self.auth_response(None, "UGFzc3dvcmQ6")? {
            Ok(password) => password,
            Err(stop) => return Ok(Err(stop)),
        };
        Ok(Ok((username, password)))
    }

    /// Returns the decoded `initial_response`, or sends `334 <prompt>` and
    /// returns the decoded response line. `=` is an empty response.
    fn auth_response(
        &mut self,
        initial_response: Option<&str>,
        prompt: &str,
    ) -> io::Result<Result<Vec<u8>, AuthStop>> {
        let encoded = match initial_response {
            Some(response) => response.to_string(),
            None => {
                self.reply(&format!("334 {prompt}"))?;
                let Some(line) = self.read_line()? else {
                    return Ok(Err(AuthStop::Closed));
                };
                line.text()
            }
        };
        let decoded = match encoded.as_str() {
            "*" => Err(AuthStop::Aborted),
            "=" => Ok(Vec::new()),
            _ => BASE64
                .decode(encoded.as_bytes())
                .map_err(|_| AuthStop::InvalidBase64),
        };
        Ok(decoded)
    }
}

/// Returns true when `raw` contains a CR that is not part of a final CRLF, or
/// ends in an LF without a CR before it.
fn has_bare_line_ending(raw: &[u8]) -> bool {
    let body = if let Some(body) = raw.strip_suffix(b"\r\n") {
        body
    } else if raw.ends_with(b"\n") {
        return true;
    } else {
        raw
    };
    body.contains(&b'\r')
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// Extracts the address from `<address> parameters`, tolerating a space
/// before the path and a path without angle brackets.
fn path_address(arguments: &str) -> String {
    let arguments = arguments.trim_start();
    if let Some(rest) = arguments.strip_prefix('<') {
        rest.split('>').next().unwrap_or("").to_string()
    } else {
        arguments.split(' ').next().unwrap_or("").to_string()
    }
}

fn size_parameter(arguments: &str) -> Option<u64> {
    arguments
        .split(' ')
        .skip(1)
        .find_map(|parameter| strip_prefix_ignore_case(parameter, "SIZE="))
        .and_then(|value| value.parse().ok())
}

fn next_queue_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let sequence = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:05X}{:06X}", std::process::id() & 0xF_FFFF, sequence)
}

/// Renders the last `limit` bytes with control and non-ASCII bytes escaped,
/// one received line per output line.
fn render_tail(bytes: &[u8], limit: usize) -> String {
    let start = bytes.len().saturating_sub(limit);
    let mut rendered = String::new();
    if start > 0 {
        rendered.push_str(&format!("[{start} earlier bytes omitted]\n"));
    }
    for line in bytes[start..].split_inclusive(|byte| *byte == b'\n') {
        rendered.push_str(&line.escape_ascii().to_string());
        rendered.push('\n');
    }
    rendered
}
