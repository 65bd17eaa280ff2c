//! Shared harness for the integration tests: real clamd, rspamd and spamd,
//! a recording upstream SMTP server and a line-by-line SMTP client.
#![allow(dead_code, unused_imports)]

pub mod clamd;
pub mod http;
pub mod milter_client;
pub mod netns;
pub mod postfix;
pub mod recording_clamd;
pub mod redis;
pub mod rspamd;
pub mod sendguard;
pub mod smtp_client;
pub mod spamd;
pub mod sse;
pub mod tls;
pub mod upstream;
pub mod webhook;

/// Returns a loopback port that was free a moment ago (bound to port 0 and
/// closed again).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("failed to bind 127.0.0.1:0 to find a free port")
        .port()
}

/// Returns `127.0.0.1:PORT` where nothing listens, for connection-refused
/// tests.
pub fn closed_address() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// Returns the program named by the environment variable `variable`, else
/// `name` found on `PATH`, else `fallback`.
pub fn program(variable: &str, name: &str, fallback: &str) -> std::path::PathBuf {
    if let Some(program) = std::env::var_os(variable) {
        return std::path::PathBuf::from(program);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| std::path::PathBuf::from(fallback))
}

/// Returns whether the tests run as root, by the owner of `/proc/self`.
pub fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|metadata| metadata.uid() == 0)
}

/// Stops a daemon that was spawned as the leader of its own process group
/// (`CommandExt::process_group(0)`), workers included: SIGTERM to the
/// group, then SIGKILL to the group after 10 s.
pub fn stop_process_group(child: &mut std::process::Child) {
    let group = format!("-{}", child.id());
    let signal = |name: &str| {
        let _ = std::process::Command::new("kill")
            .args([name, "--", &group])
            .stderr(std::process::Stdio::null())
            .status();
    };
    signal("-TERM");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            // Workers may outlive the leader for a moment.
            signal("-KILL");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    signal("-KILL");
    let _ = child.wait();
}

/// Returns the address in the environment variable `variable` when it is
/// set and not blank: a server the tests reuse instead of starting one.
pub fn reused_server(variable: &str) -> Option<String> {
    std::env::var(variable)
        .ok()
        .map(|address| address.trim().to_string())
        .filter(|address| !address.is_empty())
}

/// Waits up to `timeout` until `ready(address)` holds for the daemon
/// `name` started as `child`; fails when it exits first or time runs out.
pub fn wait_for_daemon(
    child: &mut std::process::Child,
    name: &str,
    address: &str,
    timeout: std::time::Duration,
    ready: impl Fn(&str) -> bool,
) -> Result<(), String> {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(status)) => return Err(format!("{name} exited with {status}")),
            Ok(None) => {}
            Err(error) => return Err(format!("cannot check {name}'s status: {error}")),
        }
        if ready(address) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Err(format!(
        "{name} did not reply on {address} within {timeout:?}"
    ))
}

/// Returns an ordinary business message with a Date header and real words,
/// with `extra_line` in its body. Stock SpamAssassin scores a message
/// without them close to its threshold of 5.
pub fn realistic_message(extra_line: &str) -> Vec<u8> {
    format!(
        "From: Alice Example <alice@example.org>\r\n\
         To: Bob Example <bob@example.net>\r\n\
         Subject: Minutes of the planning meeting\r\n\
         Date: Fri, 04 Dec 2026 10:15:00 +0000\r\n\
         Message-ID: <20261204101500.12345@example.org>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         Hi Bob,\r\n\
         \r\n\
         thank you for joining the planning meeting this morning. As agreed, the\r\n\
         budget review moves to Tuesday, and Carol will send the updated figures\r\n\
         before then. Please check the draft schedule and tell me if the dates\r\n\
         for the site visit work for your team.\r\n\
         {extra_line}\r\n\
         Best regards,\r\n\
         Alice\r\n"
    )
    .into_bytes()
}
