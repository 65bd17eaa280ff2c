//! Fuzzes the built-in classifier: `Scanner::scan` without clamd on arbitrary bytes.
//!
//! Any byte string must scan without a panic. Time is bounded by libFuzzer's `-timeout`,
//! which scripts/fuzz.sh sets, because a slow input is reported as a finding.
//!
//! The classifier catches panics inside mail-parser and scores the message without its
//! structure. So that the fuzzer gets past those inputs, a panic whose location is in
//! mail-parser's source unwinds to that handler and is printed once per location, and any
//! other panic aborts as libFuzzer expects. A stack overflow aborts in every case.

#![no_main]

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use sendguard::scan::{ScanInput, Scanner, SpamConfig, Verdict};
use tokio::runtime::Runtime;

fn scanner() -> &'static Scanner {
    static SCANNER: OnceLock<Scanner> = OnceLock::new();
    SCANNER.get_or_init(|| match Scanner::new(None, &SpamConfig::default()) {
        Ok(scanner) => scanner,
        Err(error) => panic!("default spam configuration rejected: {error}"),
    })
}

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(
        || match tokio::runtime::Builder::new_current_thread().build() {
            Ok(runtime) => runtime,
            Err(error) => panic!("cannot build a tokio runtime: {error}"),
        },
    )
}

/// Installs a panic hook that lets panics in mail-parser unwind, on top of the hook of
/// libfuzzer-sys, which aborts on every panic.
fn let_mail_parser_panics_unwind() {
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let abort_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let location = info
            .location()
            .filter(|location| location.file().contains("/mail-parser-"));
        let Some(location) = location else {
            abort_hook(info);
            return;
        };
        let mut seen = SEEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if seen
            .get_or_insert_with(HashSet::new)
            .insert(location.to_string())
        {
            eprintln!("caught by the classifier: {info}");
        }
    }));
}

fuzz_target!(init: let_mail_parser_panics_unwind(), |message: &[u8]| {
    // The first byte sets the envelope recipient count, so MANY_RECIPIENTS can fire.
    let (recipients, message) = match message.split_first() {
        Some((&count, rest)) => (usize::from(count), rest),
        None => (1, message),
    };
    let result = runtime().block_on(scanner().scan(ScanInput {
        message,
        recipients,
        envelope: None,
    }));
    match result {
        Ok(Verdict::Clean | Verdict::Spam { .. }) => {}
        // Without clamd only the built-in rules run, and they give clean or spam.
        Ok(other) => panic!("verdict {other:?} without clamd"),
        Err(error) => panic!("scan without clamd failed: {error}"),
    }
});
