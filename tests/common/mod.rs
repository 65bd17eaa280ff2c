//! Shared harness for the integration tests: real clamd, a recording upstream
//! SMTP server and a line-by-line SMTP client.
#![allow(dead_code, unused_imports)]

pub mod clamd;
pub mod http;
pub mod milter_client;
pub mod postfix;
pub mod sendguard;
pub mod smtp_client;
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
