//! One client connection of the SMTP relay.
//!
//! The envelope is forwarded live: the upstream transaction opens at the
//! client's MAIL FROM and each RCPT is passed on, so the client sees the
//! upstream's own replies. The message itself is read whole, scanned, and
//! only then sent upstream; the client gets the upstream's final reply, so
//! it never sees `250` for a message the upstream did not accept.

mod content;
mod forward;

use crate::guard::{Guard, SenderCheck, Transaction};
use crate::reply::Reply;
use crate::smtp::command::{Body, Command, parse_command};
use crate::smtp::reader::{CommandLine, CommandLines};
use crate::smtp::upstream::pool::close_in_background;
use crate::smtp::upstream::{Capabilities, UpstreamConnection};
use crate::tls::MaybeTls;
use arc_swap::ArcSwapOption;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::timeout_at;
use tracing::Instrument;

/// Size of each read from the client socket.
const READ_CHUNK: usize = 64 * 1024;

/// The client connection, before or after STARTTLS.
type ClientStream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;

/// State shared by all sessions of one listener.
pub struct SessionShared {
    pub guard: Arc<Guard>,
    /// Extensions the upstream offered in its last EHLO reply, or `None`
    /// before the first upstream session succeeded.
    pub upstream_capabilities: ArcSwapOption<Capabilities>,
    /// Becomes true once the probe at start has finished, whether or not it
    /// reached the upstream.
    pub upstream_probed: tokio::sync::watch::Receiver<bool>,
}

/// Position of a session in the SMTP dialogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Greeting sent, no HELO or EHLO yet.
    Connected,
    /// HELO or EHLO accepted, no transaction.
    Ready,
    /// MAIL accepted, no recipient accepted yet.
    Mail,
    /// At least one recipient accepted.
    Rcpt,
}

/// Returns the reply for a command sent out of sequence, or `None` when the
/// command may run in `state`.
pub fn sequence_error(state: State, command: &Command) -> Option<Reply> {
    match (state, command) {
        (
            State::Connected,
            Command::Mail { .. } | Command::Rcpt { .. } | Command::Data | Command::Bdat { .. },
        ) => Some(Reply::bad_sequence("Send EHLO or HELO first")),
        (State::Ready, Command::Rcpt { .. }) => Some(Reply::bad_sequence("Send MAIL before RCPT")),
        (State::Ready, Command::Data) => Some(Reply::bad_sequence("Send MAIL before DATA")),
        (State::Ready, Command::Bdat { .. }) => Some(Reply::bad_sequence("Send MAIL before BDAT")),
        (State::Mail | State::Rcpt, Command::Mail { .. }) => {
            Some(Reply::bad_sequence("Nested MAIL command; send RSET first"))
        }
        (State::Mail, Command::Data | Command::Bdat { .. }) => Some(Reply::no_valid_recipients()),
        _ => None,
    }
}

/// Whether a command must be the last of a pipelined group (RFC 2920):
/// its reply changes what the client may send next.
fn ends_pipeline_group(command: &Command) -> bool {
    matches!(
        command,
        Command::Ehlo { .. } | Command::Helo { .. } | Command::Data | Command::Auth
    )
}

/// Returns the first ESMTP parameter keyword not in `offered`. Parameters of
/// extensions this relay does not offer are refused rather than passed on:
/// `AUTH=`, for one, would let any client name the submitter to an upstream
/// that trusts sendguard's own login.
fn unsupported_parameter(params: &str, offered: &[&str]) -> Option<String> {
    params
        .split_ascii_whitespace()
        .map(|parameter| parameter.split('=').next().unwrap_or(parameter))
        .find(|keyword| {
            !offered
                .iter()
                .any(|known| known.eq_ignore_ascii_case(keyword))
        })
        .map(|keyword| keyword.chars().take(32).collect())
}

/// Returns whether a command line that failed to parse is a BDAT command.
fn is_bdat_line(line: &[u8]) -> bool {
    line.get(..4)
        .is_some_and(|verb| verb.eq_ignore_ascii_case(b"BDAT"))
        && line.get(4).is_none_or(|&byte| byte == b' ')
}

/// The parsed MAIL FROM command.
struct MailRequest {
    path: String,
    address: String,
    params: String,
    size: Option<u64>,
    body: Option<Body>,
    smtputf8: bool,
}

/// The envelope of the transaction in progress.
struct Envelope {
    id: String,
    sender_path: String,
    sender: String,
    accepted_recipients: usize,
    /// The accepted recipients' paths, for the scan engines.
    recipient_paths: Vec<String>,
    /// The MAIL and accepted RCPT lines as sent upstream, to replay the
    /// envelope on a new upstream connection.
    upstream_lines: Vec<String>,
    /// Whether MAIL FROM carried SMTPUTF8, which UTF-8 addresses require.
    smtputf8: bool,
    body: Option<Body>,
    /// Content received so far by BDAT; `None` until the first chunk.
    chunks: Option<content::Chunks>,
}

/// Reason a session ends early.
enum Stop {
    /// The client closed the connection or sent QUIT.
    Closed,
    /// The client was silent for too long.
    Timeout,
    /// sendguard is shutting down.
    Shutdown,
    /// The connection failed.
    Io(std::io::Error),
}

/// One client connection.
pub struct Session {
    shared: Arc<SessionShared>,
    stream: ClientStream,
    peer: SocketAddr,
    id: String,
    input: Vec<u8>,
    output: Vec<u8>,
    lines: CommandLines,
    state: State,
    envelope: Option<Envelope>,
    upstream: Option<UpstreamConnection>,
    /// Whether `upstream` came from the pool and has carried no command for
    /// this session yet.
    upstream_from_pool: bool,
    transactions: u32,
    /// Commands refused for syntax or sequence so far.
    errors: u32,
    /// The real client's attributes, as a trusted peer passed them on.
    forwarded: forward::Forwarded,
    /// The name from the client's last EHLO or HELO.
    helo: Option<String>,
    shutdown: watch::Receiver<bool>,
}

impl Session {
    pub fn new(
        shared: Arc<SessionShared>,
        stream: TcpStream,
        peer: SocketAddr,
        id: String,
        shutdown: watch::Receiver<bool>,
    ) -> Session {
        let _ = stream.set_nodelay(true);
        let max_command_line = shared.guard.runtime().config.smtp.max_command_line;

        Session {
            shared,
            stream: MaybeTls::Plain(stream),
            peer,
            id,
            input: Vec::with_capacity(READ_CHUNK),
            output: Vec::with_capacity(512),
            lines: CommandLines::new(max_command_line),
            state: State::Connected,
            envelope: None,
            upstream: None,
            upstream_from_pool: false,
            transactions: 0,
            errors: 0,
            forwarded: forward::Forwarded::default(),
            helo: None,
            shutdown,
        }
    }

    /// Runs the dialogue until the client quits or the connection ends.
    pub async fn run(mut self) {
        let runtime = self.shared.guard.runtime();
        let hostname = runtime.config.smtp.hostname.clone();
        let client = self.peer.ip().to_canonical();
        if !runtime
            .config
            .smtp
            .relay_networks
            .iter()
            .any(|network| network.contains(&client))
        {
            tracing::info!(client = %client, "client not in relay_networks; connection refused");
            self.queue(&Reply::relay_denied(&client.to_string()));
            let _ = self.flush().await;
            return;
        }
        let greeting_delay = runtime.config.smtp.greeting_delay;
        drop(runtime);
        // A client that talks to sendguard directly gets the relay gate's
        // refusal at connect. A forwarding peer's clients are checked at
        // MAIL, once XFORWARD or XCLIENT has named them.
        if !self.is_forwarding_peer()
            && let Some(reply) = self
                .shared
                .guard
                .check_client_device(client, "connect")
                .await
        {
            self.queue(&reply);
            let _ = self.flush().await;
            return;
        }

        // Anything the client sent before our greeting comes from a client
        // that does not wait for replies; none of it is ever relayed.
        let mut early = false;
        if !greeting_delay.is_zero() {
            match tokio::time::timeout(greeting_delay, self.stream.read_buf(&mut self.input)).await
            {
                Err(_) => {}
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(_)) => early = true,
            }
        }
        let sent_early = match &self.stream {
            MaybeTls::Plain(stream) => {
                matches!(stream.try_read_buf(&mut self.input), Ok(read) if read > 0)
            }
            _ => false,
        };
        if early || sent_early {
            tracing::info!(client = %client, "client sent data before the greeting; connection closed");
            self.queue(&Reply::early_talker());
            let _ = self.flush().await;
            return;
        }
        self.queue(&Reply::greeting(&hostname));
        let stop = self.dialogue().await;
        let shutting_down = matches!(stop, Stop::Shutdown);
        match stop {
            Stop::Closed => {}
            Stop::Timeout => {
                tracing::info!("client timed out");
                self.queue(&Reply::timeout(&hostname));
            }
            Stop::Shutdown => self.queue(&Reply::shutting_down(&hostname)),
            Stop::Io(error) => tracing::info!(%error, "client connection failed"),
        }
        let _ = self.flush().await;
        self.release_upstream(shutting_down);
    }

    /// Hands the upstream session to the pool for the next client session
    /// after an RSET, or closes it when it cannot be kept. Runs in a task of
    /// its own, so the client's connection and its place under the
    /// connection limits are freed at once, whatever the upstream's pace.
    fn release_upstream(&mut self, shutting_down: bool) {
        let Some(mut upstream) = self.upstream.take() else {
            return;
        };
        let guard = self.shared.guard.clone();
        let span = tracing::Span::current();
        tokio::spawn(
            async move {
                let keeps = {
                    let runtime = guard.runtime();
                    let pool = &runtime.upstream.pool;
                    !shutting_down && pool.keeps_sessions() && upstream.pool_id() == pool.id()
                };
                if !keeps || upstream.is_closed() {
                    upstream.quit().await;
                    return;
                }
                if let Err(error) = upstream.reset_for_reuse().await {
                    tracing::debug!(%error, "upstream RSET failed; session not kept");
                    return;
                }
                if let Some(upstream) = guard.runtime().upstream.pool.put(upstream, Instant::now())
                {
                    upstream.quit().await;
                }
            }
            .instrument(span),
        );
    }

    async fn dialogue(&mut self) -> Stop {
        loop {
            let line = match self.next_line().await {
                Ok(line) => line,
                Err(stop) => return stop,
            };
            let bytes = match line {
                CommandLine::TooLong if self.lines.too_long_line_was_bdat() => {
                    self.queue(&Reply::bdat_unreadable("command line too long"));
                    return Stop::Closed;
                }
                CommandLine::TooLong => {
                    let limit = self.shared.guard.runtime().config.smtp.max_command_line;
                    self.queue(&Reply::line_too_long(limit));
                    if self.count_error() {
                        return Stop::Closed;
                    }
                    continue;
                }
                CommandLine::Line(bytes) => bytes,
            };
            if let Some((verb, arguments)) = forward::split_forward_command(&bytes) {
                if !self.forward(verb, &arguments).await && self.count_error() {
                    return Stop::Closed;
                }
                continue;
            }
            let command = match parse_command(&bytes) {
                Ok(command) => command,
                Err(error) => {
                    tracing::debug!(%error, "invalid command");
                    if is_bdat_line(&bytes) {
                        self.queue(&Reply::bdat_unreadable(&error.to_string()));
                        return Stop::Closed;
                    }
                    let (code, enhanced) = error.reply_code();
                    self.queue(&Reply::new(code, enhanced, error.to_string()));
                    if self.count_error() {
                        return Stop::Closed;
                    }
                    continue;
                }
            };
            tracing::debug!(command = ?command, "command");

            // A BDAT chunk follows its command line whatever the reply, so
            // its octets are read before anything is decided.
            if let Command::Bdat { size, last } = command {
                if let Err(stop) = self.bdat(size, last).await {
                    return stop;
                }
                continue;
            }
            if ends_pipeline_group(&command) && !self.input.is_empty() {
                tracing::info!(command = ?command, "client pipelined past a command that must end a group; connection closed");
                self.queue(&Reply::improper_pipelining());
                return Stop::Closed;
            }
            if let Some(reply) = sequence_error(self.state, &command) {
                self.queue(&reply);
                if self.count_error() {
                    return Stop::Closed;
                }
                continue;
            }
            match self.execute(command).await {
                Ok(true) => {}
                Ok(false) => return Stop::Closed,
                Err(stop) => return stop,
            }
        }
    }

    /// Runs one command; returns `Ok(false)` when the session should end.
    async fn execute(&mut self, command: Command) -> Result<bool, Stop> {
        let hostname = self.shared.guard.runtime().config.smtp.hostname.clone();
        match command {
            Command::Ehlo { host } => {
                self.reset_transaction().await;
                tracing::debug!(helo = %host, "EHLO");
                self.helo = Some(host);
                self.wait_for_upstream_probe().await;
                let reply = self.ehlo_reply(&hostname);
                self.queue(&reply);
                self.state = State::Ready;
            }
            Command::Helo { host } => {
                self.reset_transaction().await;
                tracing::debug!(helo = %host, "HELO");
                self.helo = Some(host);
                self.queue(&Reply {
                    code: 250,
                    enhanced: None,
                    lines: vec![hostname],
                });
                self.state = State::Ready;
            }
            Command::Mail {
                path,
                address,
                params,
                size,
                body,
                smtputf8,
            } => {
                let request = MailRequest {
                    path,
                    address,
                    params,
                    size,
                    body,
                    smtputf8,
                };
                self.mail(request).await;
            }
            Command::Rcpt {
                path,
                address,
                params,
            } => self.rcpt(path, address, params).await,
            Command::Data => self.data().await?,
            Command::Rset => {
                self.reset_transaction().await;
                if self.state != State::Connected {
                    self.state = State::Ready;
                }
                self.queue(&Reply::ok("Ok"));
            }
            Command::Noop => self.queue(&Reply::ok("Ok")),
            Command::Quit => {
                self.queue(&Reply::closing(&hostname));
                return Ok(false);
            }
            Command::Help => self.queue(&Reply::new(214, "2.0.0", "See RFC 5321")),
            Command::Vrfy => self.queue(&Reply::new(
                252,
                "2.5.2",
                "Cannot VRFY user; send mail to try delivery",
            )),
            // BDAT is handled before the sequence check, with its chunk.
            Command::Bdat { .. } => {}
            Command::StartTls => self.start_tls().await?,
            Command::Auth => {
                self.queue(&Reply::not_implemented("AUTH"));
                if self.count_error() {
                    return Ok(false);
                }
            }
            Command::Expn => {
                self.queue(&Reply::not_implemented("EXPN"));
                if self.count_error() {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Replies to STARTTLS and runs the TLS handshake. Commands the client
    /// pipelined after STARTTLS were sent in plain text, so they are dropped,
    /// never executed inside TLS; the client starts over with EHLO.
    async fn start_tls(&mut self) -> Result<(), Stop> {
        let runtime = self.shared.guard.runtime();
        let Some(acceptor) = runtime.tls_acceptor.clone() else {
            self.queue(&Reply::not_implemented("STARTTLS"));
            return if self.count_error() {
                Err(Stop::Closed)
            } else {
                Ok(())
            };
        };
        if self.stream.is_tls() {
            self.queue(&Reply::bad_sequence("TLS is already active"));
            return Ok(());
        }
        if !self.input.is_empty() {
            tracing::info!(
                bytes = self.input.len(),
                "plain text pipelined after STARTTLS discarded"
            );
            self.input.clear();
        }
        self.lines = CommandLines::new(runtime.config.smtp.max_command_line);
        self.reset_transaction().await;
        self.state = State::Connected;
        self.queue(&Reply::new(220, "2.0.0", "Ready to start TLS"));
        self.flush().await.map_err(Stop::Io)?;

        let Some(plain) = self.stream.take_plain() else {
            return Err(Stop::Closed);
        };
        let handshake = acceptor.accept(plain);
        match tokio::time::timeout(runtime.config.smtp.command_timeout, handshake).await {
            Err(_) => {
                tracing::info!("TLS handshake timed out");
                Err(Stop::Closed)
            }
            Ok(Err(error)) => {
                tracing::info!(%error, "TLS handshake failed");
                Err(Stop::Closed)
            }
            Ok(Ok(tls)) => {
                let (_, connection) = tls.get_ref();
                tracing::debug!(version = ?connection.protocol_version(),
                    cipher = ?connection.negotiated_cipher_suite().map(|suite| suite.suite()), "TLS started");
                self.stream = MaybeTls::Tls(Box::new(tls));
                Ok(())
            }
        }
    }

    /// Waits, at most the upstream connect timeout, for the probe at start,
    /// so that the first clients are offered what the upstream supports
    /// rather than the reduced set used when it is unknown.
    async fn wait_for_upstream_probe(&self) {
        let mut probed = self.shared.upstream_probed.clone();
        if *probed.borrow() {
            return;
        }
        let limit = self.shared.guard.runtime().config.upstream.connect_timeout;
        let _ = tokio::time::timeout(limit, probed.wait_for(|done| *done)).await;
    }

    fn ehlo_reply(&self, hostname: &str) -> Reply {
        let max_size = self.shared.guard.runtime().config.smtp.max_message_size;
        let upstream = self.shared.upstream_capabilities.load_full();
        let upstream = upstream.as_deref();
        let size = match upstream.and_then(|capabilities| capabilities.size) {
            Some(limit) if limit > 0 => limit.min(max_size),
            _ => max_size,
        };
        let mut lines = vec![
            hostname.to_string(),
            "PIPELINING".to_string(),
            format!("SIZE {size}"),
            "CHUNKING".to_string(),
        ];
        if self.shared.guard.runtime().tls_acceptor.is_some() && !self.stream.is_tls() {
            lines.push("STARTTLS".to_string());
        }
        if self.is_forwarding_peer() {
            lines.push("XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT".to_string());
            lines.push("XCLIENT NAME ADDR PROTO HELO LOGIN PORT".to_string());
        }
        // Extensions that change what reaches the upstream are offered only
        // when the upstream offers them too. PIPELINING concerns only this
        // hop, because commands go upstream one at a time.
        if let Some(upstream) = upstream {
            if upstream.eight_bit_mime {
                lines.push("8BITMIME".to_string());
            }
            if upstream.smtputf8 {
                lines.push("SMTPUTF8".to_string());
            }
            if upstream.enhanced_status_codes {
                lines.push("ENHANCEDSTATUSCODES".to_string());
            }
            // Binary content can only go upstream with BDAT.
            if upstream.binarymime && upstream.chunking {
                lines.push("BINARYMIME".to_string());
            }
        }
        Reply {
            code: 250,
            enhanced: None,
            lines,
        }
    }

    fn transaction(&self, envelope: &Envelope) -> Transaction {
        Transaction {
            id: envelope.id.clone(),
            sender_path: envelope.sender_path.clone(),
            sender: envelope.sender.clone(),
            login: self.forwarded.login.clone(),
            client: self
                .forwarded
                .client
                .unwrap_or_else(|| self.peer.ip().to_canonical()),
            recipients: envelope.accepted_recipients,
            // Behind Postfix the forwarded HELO is the real client's; the
            // peer's own EHLO names only Postfix.
            helo: self.forwarded.helo.clone().or_else(|| self.helo.clone()),
            client_name: self.forwarded.name.clone(),
            recipient_paths: envelope.recipient_paths.clone(),
        }
    }

    async fn mail(&mut self, request: MailRequest) {
        let (max_size, require_tls) = {
            let runtime = self.shared.guard.runtime();
            (
                runtime.config.smtp.max_message_size,
                runtime.config.smtp.require_tls,
            )
        };
        if require_tls && !self.stream.is_tls() {
            self.queue(&Reply::tls_required());
            return;
        }
        if let Some(size) = request.size
            && size > max_size
        {
            self.queue(&Reply::message_too_large(max_size));
            return;
        }
        if let Some(keyword) = unsupported_parameter(&request.params, &["SIZE", "BODY", "SMTPUTF8"])
        {
            self.queue(&Reply::parameter_not_supported("MAIL", &keyword));
            return;
        }
        if let Some(reply) = self.unoffered_extension(&request) {
            self.queue(&reply);
            return;
        }
        if !request.address.is_ascii() && !request.smtputf8 {
            self.queue(&Reply::utf8_address_without_smtputf8("sender"));
            return;
        }

        self.transactions += 1;
        let envelope = Envelope {
            id: format!("{}-{}", self.id, self.transactions),
            sender_path: request.path,
            sender: request.address,
            accepted_recipients: 0,
            recipient_paths: Vec::new(),
            upstream_lines: Vec::new(),
            smtputf8: request.smtputf8,
            body: request.body,
            chunks: None,
        };
        let transaction = self.transaction(&envelope);
        if let SenderCheck::Refuse(reply) = self.shared.guard.check_sender(&transaction).await {
            self.queue(&reply);
            return;
        }

        let line = if request.params.is_empty() {
            format!("MAIL FROM:{}", envelope.sender_path)
        } else {
            format!("MAIL FROM:{} {}", envelope.sender_path, request.params)
        };
        let Some(reply) = self.upstream_command(&line, true).await else {
            return;
        };
        if reply.is_positive() {
            self.state = State::Mail;
            let mut envelope = envelope;
            envelope.upstream_lines.push(line);
            self.envelope = Some(envelope);
        }
        self.queue(&reply);
    }

    /// Returns the refusal of a MAIL parameter that needs an extension this
    /// relay does not offer, because the upstream does not.
    fn unoffered_extension(&self, request: &MailRequest) -> Option<Reply> {
        let upstream = self.shared.upstream_capabilities.load_full();
        let offers = |check: fn(&Capabilities) -> bool| upstream.as_deref().is_some_and(check);
        if request.smtputf8 && !offers(|c| c.smtputf8) {
            return Some(Reply::extension_not_offered("SMTPUTF8"));
        }
        match request.body {
            Some(Body::EightBitMime) if !offers(|c| c.eight_bit_mime) => {
                Some(Reply::extension_not_offered("BODY=8BITMIME"))
            }
            Some(Body::BinaryMime) if !offers(|c| c.binarymime && c.chunking) => {
                Some(Reply::extension_not_offered("BODY=BINARYMIME"))
            }
            _ => None,
        }
    }

    async fn rcpt(&mut self, path: String, address: String, params: String) {
        let max_recipients = self.shared.guard.runtime().config.smtp.max_recipients;
        if self
            .envelope
            .as_ref()
            .is_some_and(|envelope| envelope.accepted_recipients >= max_recipients)
        {
            self.queue(&Reply::too_many_recipients(max_recipients));
            return;
        }
        if let Some(keyword) = unsupported_parameter(&params, &[]) {
            self.queue(&Reply::parameter_not_supported("RCPT", &keyword));
            return;
        }
        let smtputf8 = self
            .envelope
            .as_ref()
            .is_some_and(|envelope| envelope.smtputf8);
        if !address.is_ascii() && !smtputf8 {
            self.queue(&Reply::utf8_address_without_smtputf8("recipient"));
            return;
        }
        let line = if params.is_empty() {
            format!("RCPT TO:{path}")
        } else {
            format!("RCPT TO:{path} {params}")
        };
        let Some(reply) = self.upstream_command(&line, false).await else {
            return;
        };
        if reply.is_positive()
            && let Some(envelope) = self.envelope.as_mut()
        {
            envelope.accepted_recipients += 1;
            envelope.recipient_paths.push(path);
            envelope.upstream_lines.push(line);
            self.state = State::Rcpt;
        }
        self.queue(&reply);
    }

    /// Sends a command upstream, connecting first when `connect` is set and
    /// no connection is open. On failure the client gets a 4xx, the
    /// transaction is dropped and `None` is returned.
    async fn upstream_command(&mut self, line: &str, connect: bool) -> Option<Reply> {
        // An upstream session kept open between transactions may have timed
        // out meanwhile; a new transaction starts on a new one.
        if connect
            && self
                .upstream
                .as_mut()
                .is_some_and(|upstream| upstream.is_closed())
        {
            tracing::debug!("upstream session closed while idle; reconnecting");
            self.upstream = None;
        }
        if self.upstream.is_none() && connect {
            let runtime = self.shared.guard.runtime();
            let (pooled, stale) = runtime.upstream.pool.take(Instant::now());
            close_in_background(stale);
            if let Some(connection) = pooled {
                self.upstream = Some(connection);
                self.upstream_from_pool = true;
            }
        }
        if self.upstream.is_none() && connect {
            let runtime = self.shared.guard.runtime();
            match UpstreamConnection::connect(&runtime.upstream).await {
                Ok(connection) => {
                    self.shared
                        .upstream_capabilities
                        .store(Some(Arc::new(connection.capabilities().clone())));
                    self.upstream = Some(connection);
                }
                Err(error) => {
                    tracing::warn!(%error, "upstream unavailable");
                    self.queue(&Reply::upstream_unavailable());
                    return None;
                }
            }
        }
        // Inside a transaction whose upstream session was lost (at an earlier
        // RCPT), a new session with the envelope so far takes its place.
        if self.upstream.is_none()
            && !connect
            && let Some(envelope) = self.envelope.take()
        {
            let replayed = self.replay_envelope(&envelope).await;
            self.envelope = Some(envelope);
            if let Err(reply) = replayed {
                self.queue(&reply);
                return None;
            }
        }
        let Some(upstream) = self.upstream.as_mut() else {
            self.abandon_transaction();
            self.queue(&Reply::upstream_failed());
            return None;
        };
        let from_pool = std::mem::take(&mut self.upstream_from_pool);
        let failure = match upstream.command(line).await {
            Ok(reply) if reply.code == 421 && from_pool => {
                // The upstream ended the idle session just as it was taken:
                // the command goes again on a new session.
                tracing::debug!(upstream_reply = %reply.one_line(), "pooled upstream session closed; reconnecting");
                self.upstream = None;
                return Box::pin(self.upstream_command(line, connect)).await;
            }
            Err(error) if from_pool => {
                tracing::debug!(%error, "pooled upstream session failed; reconnecting");
                self.upstream = None;
                return Box::pin(self.upstream_command(line, connect)).await;
            }
            Ok(reply) if reply.code == 421 => {
                tracing::warn!(upstream_reply = %reply.one_line(), "upstream closed its session");
                reply.one_line()
            }
            Ok(reply) => return Some(reply),
            Err(error) => {
                tracing::warn!(%error, "upstream command failed");
                error.to_string()
            }
        };
        // The upstream closed its session, not ours, so the client gets a
        // temporary failure for this command. A failed MAIL leaves no
        // transaction; after a failed RCPT the transaction goes on with the
        // recipients accepted so far, replayed on a new upstream session.
        tracing::debug!(failure, "upstream session dropped");
        self.upstream = None;
        if connect {
            self.abandon_transaction();
        }
        self.queue(&Reply::upstream_failed());
        None
    }

    /// Drops the transaction in progress, upstream included.
    async fn reset_transaction(&mut self) {
        self.abandon_transaction();
        self.reset_upstream().await;
    }

    fn abandon_transaction(&mut self) {
        self.envelope = None;
        if matches!(self.state, State::Mail | State::Rcpt) {
            self.state = State::Ready;
        }
    }

    /// Resets the upstream transaction; a connection that fails RSET is
    /// closed so the next transaction starts clean.
    async fn reset_upstream(&mut self) {
        if let Some(upstream) = self.upstream.as_mut()
            && let Err(error) = upstream.reset().await
        {
            tracing::warn!(%error, "upstream RSET failed; closing the upstream connection");
            self.upstream = None;
        }
    }

    async fn next_line(&mut self) -> Result<CommandLine, Stop> {
        let timeout = {
            let runtime = self.shared.guard.runtime();
            let smtp = &runtime.config.smtp;
            match self.state {
                State::Connected => smtp.greeting_timeout,
                State::Ready => smtp.idle_timeout,
                State::Mail | State::Rcpt => smtp.command_timeout,
            }
        };
        loop {
            if let Some(line) = self.lines.next_line(&mut self.input) {
                return Ok(line);
            }
            self.flush().await.map_err(Stop::Io)?;
            // On shutdown a client between transactions gets 421 and retries
            // later. A client in the middle of a transaction may finish it.
            let idle = matches!(self.state, State::Connected | State::Ready);
            self.read_more(tokio::time::Instant::now() + timeout, idle)
                .await?;
        }
    }

    /// Appends the next bytes of message content, waiting at most
    /// `data_block_timeout` and never past `deadline`.
    async fn read_content(&mut self, deadline: tokio::time::Instant) -> Result<(), Stop> {
        let block = self.shared.guard.runtime().config.smtp.data_block_timeout;
        let block_deadline = (tokio::time::Instant::now() + block).min(deadline);
        self.read_more(block_deadline, false).await
    }

    /// Appends the next bytes from the client to `input`, waiting until
    /// `deadline` at most. A shutdown ends the wait only when
    /// `interruptible` is set.
    async fn read_more(
        &mut self,
        deadline: tokio::time::Instant,
        interruptible: bool,
    ) -> Result<(), Stop> {
        self.input.reserve(READ_CHUNK);
        if interruptible && *self.shutdown.borrow() {
            return Err(Stop::Shutdown);
        }
        let read = if interruptible {
            tokio::select! {
                read = timeout_at(deadline, self.stream.read_buf(&mut self.input)) => read,
                _ = self.shutdown.changed() => return Err(Stop::Shutdown),
            }
        } else {
            timeout_at(deadline, self.stream.read_buf(&mut self.input)).await
        };
        match read {
            Err(_) => Err(Stop::Timeout),
            Ok(Err(error)) => Err(Stop::Io(error)),
            Ok(Ok(0)) => Err(Stop::Closed),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// Counts a refused command; returns true, with the closing reply
    /// queued, once the client reached `smtp.max_errors`.
    fn count_error(&mut self) -> bool {
        self.errors += 1;
        let limit = self.shared.guard.runtime().config.smtp.max_errors;
        if self.errors < limit {
            return false;
        }
        tracing::info!(
            errors = self.errors,
            "too many invalid commands; connection closed"
        );
        self.queue(&Reply::too_many_errors());
        true
    }

    fn queue(&mut self, reply: &Reply) {
        tracing::debug!(reply = %reply.one_line(), "reply");
        self.output.extend_from_slice(&reply.to_wire());
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.output.is_empty() {
            return Ok(());
        }
        // A client that stops reading must not hold the session forever.
        let limit = self.shared.guard.runtime().config.smtp.command_timeout;
        // TLS buffers what it encrypts, so the flush is what sends it.
        let stream = &mut self.stream;
        let output = &self.output;
        let write = async {
            stream.write_all(output).await?;
            stream.flush().await
        };
        match tokio::time::timeout(limit, write).await {
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "client did not read our reply within {}",
                    humantime::format_duration(limit)
                ),
            )),
            Ok(result) => {
                result?;
                self.output.clear();
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mail() -> Command {
        Command::Mail {
            path: "<a@example.org>".into(),
            address: "a@example.org".into(),
            params: String::new(),
            size: None,
            body: None,
            smtputf8: false,
        }
    }

    fn rcpt() -> Command {
        Command::Rcpt {
            path: "<b@example.org>".into(),
            address: "b@example.org".into(),
            params: String::new(),
        }
    }

    #[test]
    fn sequence_table() {
        let ehlo = Command::Ehlo { host: "c".into() };
        let cases: Vec<(State, Command, Option<u16>)> = vec![
            (State::Connected, ehlo.clone(), None),
            (State::Connected, mail(), Some(503)),
            (State::Connected, rcpt(), Some(503)),
            (State::Connected, Command::Data, Some(503)),
            (State::Connected, Command::Noop, None),
            (State::Connected, Command::Quit, None),
            (State::Ready, mail(), None),
            (State::Ready, rcpt(), Some(503)),
            (State::Ready, Command::Data, Some(503)),
            (State::Mail, mail(), Some(503)),
            (State::Mail, rcpt(), None),
            (State::Mail, Command::Data, Some(554)),
            (State::Rcpt, rcpt(), None),
            (State::Rcpt, Command::Data, None),
            (State::Rcpt, mail(), Some(503)),
            (State::Rcpt, Command::Rset, None),
            (State::Rcpt, ehlo, None),
        ];
        for (state, command, expected) in cases {
            let code = sequence_error(state, &command).map(|reply| reply.code);
            assert_eq!(code, expected, "{state:?} + {command:?}");
        }
    }
}
