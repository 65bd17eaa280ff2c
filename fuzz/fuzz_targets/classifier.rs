//! Fuzzes the built-in classifier: `Scanner::scan` without clamd on arbitrary bytes.
//!
//! Any byte string must scan without a panic. Time is bounded by libFuzzer's `-timeout`,
//! which scripts/fuzz.sh sets, because a slow input is reported as a finding.

#![no_main]

use std::sync::OnceLock;

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
    RUNTIME.get_or_init(|| {
        match tokio::runtime::Builder::new_current_thread().build() {
            Ok(runtime) => runtime,
            Err(error) => panic!("cannot build a tokio runtime: {error}"),
        }
    })
}

fuzz_target!(|message: &[u8]| {
    // The first byte sets the envelope recipient count, so MANY_RECIPIENTS can fire.
    let (recipients, message) = match message.split_first() {
        Some((&count, rest)) => (usize::from(count), rest),
        None => (1, message),
    };
    let result = runtime().block_on(scanner().scan(ScanInput {
        message,
        recipients,
    }));
    match result {
        Ok(Verdict::Clean | Verdict::Spam { .. }) => {}
        // Without clamd only the built-in rules run, and they give clean or spam.
        Ok(other) => panic!("verdict {other:?} without clamd"),
        Err(error) => panic!("scan without clamd failed: {error}"),
    }
});
