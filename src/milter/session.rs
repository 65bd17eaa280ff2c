//! One milter connection from the MTA: its state and a handler per milter
//! command. Every decision comes from the [`Guard`], as in the SMTP proxy.

use super::message::{
    EnvelopeSender, MessageBuffer, declared_size, milter_reply, parse_sender, split_header,
};
use crate::guard::{Guard, MessageDecision, SenderCheck, Transaction};
use crate::reply::Reply;
use indymilter::{
    Actions, Context, ContextActions, EomContext, MacroStage, Macros, NegotiateContext, ProtoOpts,
    SetErrorReply, SmtpReply, SocketInfo, Status,
};
use std::ffi::{CStr, CString};
use std::net::{IpAddr, Ipv4Addr};

/// Macro with the SASL login name, sent with MAIL when the client logged in.
const LOGIN_MACRO: &CStr = c"{auth_authen}";
/// Macro with the MTA's queue id; Postfix sends it only at end of message.
const QUEUE_ID_MACRO: &CStr = c"i";

/// Stages whose replies sendguard skips on a TCP connection, when the MTA
/// offers it: each header and the end of headers. The MTA sends the packet that follows
/// them (a body chunk or the end of message) at once, and that one waits
/// for a reply.
///
/// Over TCP every other stage keeps its reply and none is left out, although
/// sendguard needs neither DATA nor unknown commands. After connect, HELO,
/// RCPT and DATA Postfix waits for its client, and it sends what it has
/// written so far (a skipped DATA still sends its macros). Its next packet
/// then follows an unanswered one, so Nagle's algorithm holds it until
/// sendguard's delayed ACK, about 40 ms later. With Postfix 3.7 on Linux
/// this made each message take 47 ms instead of 4 ms (benches/e2e.py).
pub const TCP_OPTIONS: ProtoOpts = ProtoOpts::NOREPLY_HEADER.union(ProtoOpts::NOREPLY_EOH);

/// Stages skipped on a unix socket, which has no Nagle's algorithm: the
/// replies to connect, HELO and RCPT, which always continue, and the DATA
/// and unknown-command stages, which sendguard does not use. That saves
/// four round trips per message with one recipient.
pub const UNIX_OPTIONS: ProtoOpts = TCP_OPTIONS
    .union(ProtoOpts::NOREPLY_CONNECT)
    .union(ProtoOpts::NOREPLY_HELO)
    .union(ProtoOpts::NOREPLY_RCPT)
    .union(ProtoOpts::NO_DATA)
    .union(ProtoOpts::NO_UNKNOWN);

/// The state of one milter connection.
pub struct Connection {
    id: String,
    pub span: tracing::Span,
    /// Protocol options agreed with the MTA.
    options: ProtoOpts,
    client: IpAddr,
    /// The client's host name from the connect packet; `None` when the
    /// MTA sent an address literal or "unknown".
    client_name: Option<String>,
    /// The client's HELO or EHLO name.
    helo: Option<String>,
    transactions: u64,
    message: Option<OpenMessage>,
}

/// A transaction between MAIL and the end of its message.
struct OpenMessage {
    transaction: Transaction,
    content: MessageBuffer,
}

impl Connection {
    fn new(id: String) -> Connection {
        let span = tracing::info_span!("milter", id = %id, client = tracing::field::Empty);
        Connection {
            id,
            span,
            options: ProtoOpts::empty(),
            client: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            client_name: None,
            helo: None,
            transactions: 0,
            message: None,
        }
    }

    /// Returns the status for a stage whose reply was either waived in the
    /// negotiation (no reply may be sent) or not (CONTINUE must be sent).
    fn continue_status(&self, no_reply: ProtoOpts) -> Status {
        if self.options.contains(no_reply) {
            Status::Noreply
        } else {
            Status::Continue
        }
    }
}

/// Agrees on the protocol options (`skippable` where the MTA offers them),
/// the end-of-message actions and the macros, and creates the connection's
/// state. Returns `Reject`, which ends the connection, when the MTA cannot
/// keep the space after header colons, because the rebuilt message would
/// then differ from the one received.
pub fn negotiate(
    cx: &mut NegotiateContext<Connection>,
    id: String,
    offered_actions: Actions,
    offered: ProtoOpts,
    skippable: ProtoOpts,
) -> Status {
    let mut connection = Connection::new(id);
    let _entered = connection.span.clone().entered();
    if !offered.contains(ProtoOpts::LEADING_SPACE) {
        tracing::error!(offered = ?offered,
            "the MTA does not offer the milter option SMFIP_HDR_LEADSPC, which keeps the space \
             after header colons; closing the milter connection (set milter_protocol = 6 in \
             Postfix's main.cf)");
        return Status::Reject;
    }
    if !offered_actions.contains(Actions::ADD_HEADER) {
        tracing::warn!(offered = ?offered_actions,
            "the MTA does not let milters add headers; messages that need a header are tempfailed");
    }

    connection.options = ProtoOpts::LEADING_SPACE | (offered & skippable);
    cx.requested_opts = connection.options;
    cx.requested_actions = offered_actions & Actions::ADD_HEADER;
    cx.requested_macros
        .insert(MacroStage::Mail, CString::from(LOGIN_MACRO));
    cx.requested_macros
        .insert(MacroStage::Eom, CString::from(QUEUE_ID_MACRO));
    tracing::debug!(offered = ?offered, offered_actions = ?offered_actions,
        options = ?cx.requested_opts, actions = ?cx.requested_actions, "milter options agreed");
    cx.data = Some(connection);
    Status::Continue
}

/// Takes the client address from the connect packet. Postfix sends it
/// there; `{client_addr}` is not among its default connect macros.
pub fn connect(cx: &mut Context<Connection>, hostname: &CStr, socket: SocketInfo) -> Status {
    let Some(connection) = cx.data.as_mut() else {
        return missing_state();
    };
    connection.client = match &socket {
        SocketInfo::Inet(address) => address.ip().to_canonical(),
        // A client on a unix socket is on this host.
        SocketInfo::Unix(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        SocketInfo::Unknown => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    connection.message = None;
    // Postfix sends "unknown" for a client without a verified reverse DNS
    // name, and Sendmail an address literal such as "[192.0.2.1]".
    let name = hostname.to_string_lossy();
    connection.client_name = (!name.is_empty() && name != "unknown" && !name.starts_with('['))
        .then(|| name.into_owned());
    connection
        .span
        .record("client", tracing::field::display(connection.client));
    tracing::debug!(hostname = %hostname.to_string_lossy(), socket = ?socket, "connect");
    connection.continue_status(ProtoOpts::NOREPLY_CONNECT)
}

pub fn helo(cx: &mut Context<Connection>, hostname: &CStr) -> Status {
    let Some(connection) = cx.data.as_mut() else {
        return missing_state();
    };
    tracing::debug!(helo = %hostname.to_string_lossy(), "HELO");
    connection.helo = Some(hostname.to_string_lossy().into_owned());
    connection.continue_status(ProtoOpts::NOREPLY_HELO)
}

/// Starts a transaction and checks the sender with the Guard.
pub async fn mail(guard: &Guard, cx: &mut Context<Connection>, arguments: Vec<CString>) -> Status {
    let Some(connection) = cx.data.as_mut() else {
        return missing_state();
    };
    connection.message = None;
    let mut arguments = arguments
        .iter()
        .map(|argument| argument.to_string_lossy().into_owned());
    let EnvelopeSender { path, address } = parse_sender(&arguments.next().unwrap_or_default());
    let parameters: Vec<String> = arguments.collect();
    let login = macro_value(&cx.macros, LOGIN_MACRO).filter(|login| !login.is_empty());

    connection.transactions += 1;
    let transaction = Transaction {
        id: format!("{}-{}", connection.id, connection.transactions),
        sender_path: path,
        sender: address,
        login,
        client: connection.client,
        recipients: 0,
        helo: connection.helo.clone(),
        client_name: connection.client_name.clone(),
        recipient_paths: Vec::new(),
    };
    tracing::debug!(transaction = %transaction.id, sender = %transaction.sender_path,
        parameters = ?parameters, login = transaction.login.as_deref().unwrap_or(""), "MAIL");

    let limit = guard.runtime().config.smtp.max_message_size;
    if declared_size(&parameters).is_some_and(|size| size > limit) {
        let reply = Reply::message_too_large(limit);
        tracing::info!(transaction = %transaction.id, reply = %reply, "sender rejected: declared size over the limit");
        return reply_with_error(&mut cx.reply, &reply);
    }
    match guard.check_sender(&transaction).await {
        SenderCheck::Allow => {
            connection.message = Some(OpenMessage {
                transaction,
                content: MessageBuffer::new(limit),
            });
            Status::Continue
        }
        SenderCheck::Refuse(reply) => {
            tracing::debug!(transaction = %transaction.id, reply = %reply, "MAIL rejected");
            reply_with_error(&mut cx.reply, &reply)
        }
    }
}

pub fn rcpt(cx: &mut Context<Connection>, arguments: &[CString]) -> Status {
    let Some(connection) = cx.data.as_mut() else {
        return missing_state();
    };
    if let Some(message) = connection.message.as_mut() {
        message.transaction.recipients += 1;
        if let Some(recipient) = arguments.first() {
            let path = parse_sender(&recipient.to_string_lossy()).path;
            message.transaction.recipient_paths.push(path);
        }
    }
    if let Some(recipient) = arguments.first() {
        tracing::debug!(recipient = %recipient.to_string_lossy(), "RCPT");
    }
    connection.continue_status(ProtoOpts::NOREPLY_RCPT)
}

pub fn header(cx: &mut Context<Connection>, name: &CStr, value: &CStr) -> Status {
    let Some(connection) = cx.data.as_mut() else {
        return missing_state();
    };
    if let Some(message) = connection.message.as_mut() {
        message
            .content
            .push_header(name.to_bytes(), value.to_bytes());
    }
    connection.continue_status(ProtoOpts::NOREPLY_HEADER)
}

pub fn end_of_headers(cx: &mut Context<Connection>) -> Status {
    let Some(connection) = cx.data.as_mut() else {
        return missing_state();
    };
    if let Some(message) = connection.message.as_mut() {
        message.content.end_headers();
    }
    connection.continue_status(ProtoOpts::NOREPLY_EOH)
}

/// Appends a body chunk. Every body chunk gets a CONTINUE reply, because
/// indymilter 0.3 runs this callback for data sent with the end-of-message
/// packet too, and skips the end-of-message callback unless it returns
/// `Continue`.
pub fn body(cx: &mut Context<Connection>, chunk: &[u8]) -> Status {
    if let Some(message) = cx
        .data
        .as_mut()
        .and_then(|connection| connection.message.as_mut())
    {
        message.content.push_body(chunk);
    }
    Status::Continue
}

/// Scans the message through the Guard and replies with its decision.
pub async fn end_of_message(guard: &Guard, cx: &mut EomContext<Connection>) -> Status {
    let queue_id = macro_value(&cx.macros, QUEUE_ID_MACRO).filter(|id| !id.is_empty());
    let Some(connection) = cx.data.as_mut() else {
        return missing_state();
    };
    let Some(message) = connection.message.take() else {
        // Without a transaction there is nothing scanned to accept.
        tracing::warn!(
            "end of message without an accepted MAIL; replying with a temporary failure"
        );
        return reply_with_error(&mut cx.reply, &Reply::local_error());
    };
    let transaction = message.transaction;
    if message.content.exceeded() {
        let reply = Reply::message_too_large(message.content.limit());
        tracing::info!(transaction = %transaction.id, reply = %reply, "message rejected: over the size limit");
        return reply_with_error(&mut cx.reply, &reply);
    }

    match guard
        .check_message(&transaction, message.content.as_bytes())
        .await
    {
        MessageDecision::Reject(reply) => {
            tracing::info!(transaction = %transaction.id, reply = %reply, "message rejected");
            reply_with_error(&mut cx.reply, &reply)
        }
        MessageDecision::Deliver { header, pending } => {
            let status = match &header {
                None => Status::Continue,
                Some(header) => {
                    if let Err(reply) = insert_header(cx, &transaction, header).await {
                        return reply_with_error(&mut cx.reply, &reply);
                    }
                    Status::Accept
                }
            };
            tracing::info!(transaction = %transaction.id, queue_id = queue_id.as_deref().unwrap_or(""),
                header = header.as_deref().unwrap_or(""), "message accepted");
            if let Some(pending) = pending {
                guard.record_delivered(pending, queue_id).await;
            }
            status
        }
    }
}

/// Asks the MTA to put `header` above all others, where the SMTP proxy
/// prepends it. Postfix 3.7 counts index 0 as the top, above its own
/// Received header.
async fn insert_header(
    cx: &EomContext<Connection>,
    transaction: &Transaction,
    header: &str,
) -> Result<(), Reply> {
    let Some((name, value)) = split_header(header) else {
        tracing::error!(transaction = %transaction.id, header, "invalid header from the Guard; replying with a temporary failure");
        return Err(Reply::local_error());
    };
    cx.actions
        .insert_header(0, name, value)
        .await
        .map_err(|error| {
            tracing::error!(%error, transaction = %transaction.id,
                "cannot insert the header; replying with a temporary failure");
            Reply::local_error()
        })
}

/// Ends the open transaction: the MTA aborted it, or the connection failed
/// (a malformed packet, a dropped connection), in which case the MTA
/// applies its `milter_default_action`.
pub fn abort(cx: &mut Context<Connection>) {
    if let Some(message) = cx
        .data
        .as_mut()
        .and_then(|connection| connection.message.take())
    {
        tracing::info!(transaction = %message.transaction.id, "transaction aborted before the end of its message; nothing accepted");
    }
}

pub fn close(cx: &mut Context<Connection>) {
    if let Some(connection) = cx.data.as_ref() {
        tracing::debug!(
            transactions = connection.transactions,
            "milter connection closed"
        );
    }
}

/// Sets `reply` as the milter's reply and returns the matching status:
/// `Tempfail` for a 4xx reply, `Reject` for a 5xx one.
fn reply_with_error(smtp_reply: &mut SmtpReply, reply: &Reply) -> Status {
    let Some(converted) = milter_reply(reply) else {
        tracing::error!(reply = %reply, "a refusal without a 4xx or 5xx code; replying with a temporary failure");
        return reply_with_error(smtp_reply, &Reply::local_error());
    };
    let status = if converted.permanent {
        Status::Reject
    } else {
        Status::Tempfail
    };
    if let Err(error) =
        smtp_reply.set_error_reply(&converted.code, Some(&converted.enhanced), converted.lines)
    {
        // The MTA then replies with its own generic text for the status.
        tracing::warn!(%error, reply = %reply, "reply text not accepted by the milter library; sending the status without it");
    }
    status
}

/// Returns the status for a callback that finds no connection state. The
/// state is created at negotiation, which the library runs first, so this
/// does not happen; a temporary failure keeps mail from passing unscanned.
fn missing_state() -> Status {
    tracing::error!("milter command before option negotiation; replying with a temporary failure");
    Status::Tempfail
}

fn macro_value(macros: &Macros, name: &CStr) -> Option<String> {
    macros
        .get(name)
        .map(|value| value.to_string_lossy().into_owned())
}
