//! The Postfix milter front-end: the same decisions as the SMTP proxy,
//! taken by the same [`Guard`], for mail that Postfix receives itself.
//!
//! Postfix sends each SMTP event as a milter command (protocol version 6,
//! spoken by indymilter). sendguard checks the sender with the Guard at
//! MAIL and rebuilds the message from the header and body packets. At the
//! end of the message it replies with the Guard's verdict: accept (with the
//! Guard's header inserted when it has one), or reject or tempfail with the
//! Guard's reply text. The identity is the SASL login from the macro
//! `{auth_authen}` when the client logged in, otherwise the envelope sender.
//!
//! A connection that fails (a malformed packet, a dropped connection, a
//! timeout) ends without a reply to the open command, so Postfix applies
//! its `milter_default_action` and no message passes unscanned.

mod message;
mod session;

pub(crate) use message::parse_sender;

use crate::guard::Guard;
use indymilter::{Callbacks, EitherListener, EitherStream, Listener};
use session::Connection;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Poll, ready};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;
use tracing::Instrument;

/// Time allowed for each milter command when the configuration has no
/// `[milter]` section to take it from.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Pause after a failed accept, so that running out of file descriptors
/// does not spin the accept loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The bound milter listener: TCP, or a unix socket removed at shutdown.
pub struct MilterListener {
    listener: EitherListener<TcpListener, UnixListener>,
    socket_path: Option<PathBuf>,
    description: String,
}

impl MilterListener {
    /// Binds `listen`: `host:port`, or an absolute path for a unix socket.
    /// A socket file left behind by a stopped sendguard is replaced; one
    /// that another process still accepts connections on is not.
    ///
    /// # Errors
    /// When the address is invalid, in use, or the socket cannot be created.
    pub async fn bind(listen: &str) -> io::Result<MilterListener> {
        if !listen.starts_with('/') {
            let listener = TcpListener::bind(listen).await?;
            return Ok(MilterListener {
                description: listener.local_addr()?.to_string(),
                listener: EitherListener::Tcp(listener),
                socket_path: None,
            });
        }

        let path = Path::new(listen);
        remove_stale_socket(path).await?;
        let listener = UnixListener::bind(path)?;
        Ok(MilterListener {
            listener: EitherListener::Unix(listener),
            socket_path: Some(path.to_path_buf()),
            description: listen.to_string(),
        })
    }

    /// Returns the bound address: `host:port` or the socket path.
    pub fn local_address(&self) -> &str {
        &self.description
    }
}

/// Removes a socket file at `path` unless a process accepts connections on
/// it. A path that is not a socket is left alone, so the bind fails.
async fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(metadata) = tokio::fs::symlink_metadata(path).await else {
        return Ok(());
    };
    if !metadata.file_type().is_socket() {
        return Ok(());
    }
    if UnixStream::connect(path).await.is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another process accepts connections on {}", path.display()),
        ));
    }
    tokio::fs::remove_file(path).await
}

/// Serves milter connections on `listener` until `shutdown` becomes true.
/// Commands in progress then finish; idle connections are closed.
pub async fn run(listener: MilterListener, guard: Arc<Guard>, shutdown: watch::Receiver<bool>) {
    let runtime = guard.runtime();
    let config = indymilter::Config {
        // Postfix opens one milter connection per smtpd and cleanup process,
        // and each carries one message at a time, like an SMTP connection.
        max_connections: runtime.config.smtp.max_connections,
        actions: indymilter::Actions::empty(),
        connection_timeout: runtime
            .config
            .milter
            .as_ref()
            .map_or(DEFAULT_TIMEOUT, |milter| milter.timeout),
    };
    drop(runtime);
    let MilterListener {
        listener,
        socket_path,
        description,
    } = listener;
    tracing::info!(listen = %description, "milter listening");

    let skippable = if socket_path.is_some() {
        session::UNIX_OPTIONS
    } else {
        session::TCP_OPTIONS
    };
    let callbacks = callbacks(guard, skippable);
    let accepting = RetryingListener {
        listener,
        pause: None,
    };
    let mut stop = shutdown;
    let stopped = async move {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    if let Err(error) = indymilter::run(accepting, callbacks, config, stopped).await {
        tracing::error!(%error, listen = %description, "milter listener failed; milter connections are no longer served");
    }
    if let Some(path) = socket_path
        && let Err(error) = std::fs::remove_file(&path)
    {
        tracing::warn!(%error, socket = %path.display(), "cannot remove the milter socket");
    }
    tracing::info!(listen = %description, "milter stopped");
}

/// Wires each milter stage to its handler in [`session`], inside the
/// connection's tracing span.
fn callbacks(guard: Arc<Guard>, skippable: indymilter::ProtoOpts) -> Callbacks<Connection> {
    let prefix = format!("m{:06x}", rand::random::<u32>() & 0xff_ffff);
    let counter = Arc::new(AtomicU64::new(0));
    let mail_guard = guard.clone();
    let eom_guard = guard;

    Callbacks::new()
        .on_negotiate(move |cx, actions, options| {
            let id = format!("{prefix}{:x}", counter.fetch_add(1, Ordering::Relaxed));
            Box::pin(std::future::ready(session::negotiate(
                cx, id, actions, options, skippable,
            )))
        })
        .on_connect(|cx, hostname, socket| {
            let _entered = span_of(&cx.data).entered();
            Box::pin(std::future::ready(session::connect(cx, &hostname, socket)))
        })
        .on_helo(|cx, hostname| {
            let _entered = span_of(&cx.data).entered();
            Box::pin(std::future::ready(session::helo(cx, &hostname)))
        })
        .on_mail(move |cx, arguments| {
            let guard = mail_guard.clone();
            let span = span_of(&cx.data);
            Box::pin(async move { session::mail(&guard, cx, arguments).await }.instrument(span))
        })
        .on_rcpt(|cx, arguments| {
            let _entered = span_of(&cx.data).entered();
            Box::pin(std::future::ready(session::rcpt(cx, &arguments)))
        })
        .on_header(|cx, name, value| {
            Box::pin(std::future::ready(session::header(cx, &name, &value)))
        })
        .on_eoh(|cx| Box::pin(std::future::ready(session::end_of_headers(cx))))
        .on_body(|cx, chunk| Box::pin(std::future::ready(session::body(cx, &chunk))))
        .on_eom(move |cx| {
            let guard = eom_guard.clone();
            let span = span_of(&cx.data);
            Box::pin(async move { session::end_of_message(&guard, cx).await }.instrument(span))
        })
        .on_abort(|cx| {
            let _entered = span_of(&cx.data).entered();
            session::abort(cx);
            Box::pin(std::future::ready(indymilter::Status::Continue))
        })
        .on_close(|cx| {
            let _entered = span_of(&cx.data).entered();
            session::close(cx);
            Box::pin(std::future::ready(indymilter::Status::Continue))
        })
}

fn span_of(connection: &Option<Connection>) -> tracing::Span {
    connection
        .as_ref()
        .map_or_else(tracing::Span::none, |connection| connection.span.clone())
}

/// A listener that logs a failed accept and tries again after a pause.
/// indymilter 0.3 stops serving for good at the first accept error.
struct RetryingListener {
    listener: EitherListener<TcpListener, UnixListener>,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Listener for RetryingListener {
    type Io = EitherStream<TcpStream, UnixStream>;

    fn poll_accept(&mut self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<Self::Io>> {
        // Each failed accept starts a pause, and a new pause is never ready
        // at once, so this loop runs at most twice per poll.
        loop {
            if let Some(pause) = self.pause.as_mut() {
                ready!(pause.as_mut().poll(cx));
                self.pause = None;
            }
            match ready!(self.listener.poll_accept(cx)) {
                Ok(EitherStream::Tcp(stream)) => {
                    // Replies such as an inserted header followed by ACCEPT
                    // are separate writes; Nagle's algorithm would hold the
                    // second until the MTA's delayed acknowledgement.
                    if let Err(error) = stream.set_nodelay(true) {
                        tracing::warn!(%error, "cannot set TCP_NODELAY on a milter connection");
                    }
                    return Poll::Ready(Ok(EitherStream::Tcp(stream)));
                }
                Ok(stream) => return Poll::Ready(Ok(stream)),
                Err(error) => {
                    tracing::error!(%error, "cannot accept a milter connection");
                    self.pause = Some(Box::pin(tokio::time::sleep(ACCEPT_ERROR_PAUSE)));
                }
            }
        }
    }
}
