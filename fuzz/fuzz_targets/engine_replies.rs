//! Fuzzes the parsers of spamd's and rspamd's replies on arbitrary bytes.
//!
//! Any byte string must parse to a reply or an error without a panic. spamd's reply
//! arrives in pieces and is parsed after each read, so every prefix is parsed too.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sendguard::scan::{parse_rspamd_reply, parse_spamd_reply};

fuzz_target!(|data: &[u8]| {
    // The first two bytes set the HTTP status for rspamd.
    let (status, body) = match data {
        [high, low, rest @ ..] => (u16::from_be_bytes([*high, *low]) % 600, rest),
        _ => (200, data),
    };
    let _ = parse_rspamd_reply(status, body);

    for end in 0..=data.len() {
        let _ = parse_spamd_reply(&data[..end]);
    }
});
