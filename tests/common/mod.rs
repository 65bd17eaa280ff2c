//! Shared harness for the integration tests: real clamd, a recording upstream
//! SMTP server and a line-by-line SMTP client.
#![allow(dead_code)]

pub mod clamd;
pub mod milter_client;
pub mod postfix;
pub mod sendguard;
pub mod smtp_client;
pub mod tls;
pub mod upstream;
