//! Fuzzes `parse_command` with arbitrary lines.
//!
//! For an accepted MAIL or RCPT command, checks that the path starts with `<` and ends with
//! `>`, and that no path, address or parameter text contains CR, LF or NUL. The command
//! rebuilt from its path and parameters must parse to the same command again.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sendguard::smtp::command::{Command, parse_command};

fn assert_no_line_break_or_nul(field: &str, value: &str) {
    assert!(
        !value.contains(['\r', '\n', '\0']),
        "{field} {value:?} contains CR, LF or NUL"
    );
}

fn check_path(path: &str, address: &str, params: &str) {
    assert!(
        path.starts_with('<'),
        "path {path:?} does not start with '<'"
    );
    assert!(path.ends_with('>'), "path {path:?} does not end with '>'");
    assert_no_line_break_or_nul("path", path);
    assert_no_line_break_or_nul("address", address);
    assert_no_line_break_or_nul("params", params);
    assert_eq!(params, params.trim_matches(' '), "params keep outer spaces");
}

fuzz_target!(|line: &[u8]| {
    let command = parse_command(line);
    let rebuilt = match &command {
        Ok(Command::Mail {
            path,
            address,
            params,
            ..
        }) => {
            check_path(path, address, params);
            format!("MAIL FROM:{path} {params}")
        }
        Ok(Command::Rcpt {
            path,
            address,
            params,
        }) => {
            check_path(path, address, params);
            format!("RCPT TO:{path} {params}")
        }
        _ => return,
    };

    // The session relays the path and parameters as text, so the upstream server must read
    // the same command from them. A removed source route is the only part not kept.
    assert_eq!(
        parse_command(rebuilt.as_bytes()),
        command,
        "line {:?} rebuilt as {rebuilt:?}",
        String::from_utf8_lossy(line)
    );
});
