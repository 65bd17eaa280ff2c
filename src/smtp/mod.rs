//! The SMTP front-end: the server session, DATA reading and the upstream
//! relay.

pub mod command;
pub mod reader;
pub mod session;
pub mod upstream;
