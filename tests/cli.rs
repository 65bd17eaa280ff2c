//! The command line: `check`, `config check`, and their exit codes.

mod common;

use common::clamd::Clamd;
use std::path::Path;
use std::process::{Command, Output};

const EICAR: &str = r"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";
const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

fn sendguard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sendguard"))
        .args(args)
        .output()
        .expect("run sendguard")
}

fn write_config(dir: &Path, clamd_address: &str) -> String {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[upstream]\naddress = \"127.0.0.1:25\"\n[store]\npath = \"{}\"\n\
             [scan.clamd]\naddress = \"{clamd_address}\"\ntimeout = \"5s\"\n",
            dir.join("store.db").display()
        ),
    )
    .expect("write config");
    path.display().to_string()
}

fn check(dir: &Path, config: &str, content: &str) -> Output {
    let message = dir.join("message.eml");
    std::fs::write(&message, content).expect("write message");
    sendguard(&[
        "check",
        message.to_str().expect("utf-8 path"),
        "--config",
        config,
    ])
}

/// Returns the result `check` printed for `engine` ("verdict" for the
/// combined verdict), without the timing.
fn printed(output: &Output, engine: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find(|line| line.split_whitespace().next() == Some(engine))
        .unwrap_or_else(|| panic!("no line for {engine} in {stdout:?}"));
    let text = line[engine.len()..].trim();
    match text.rfind(" [") {
        Some(timing) if text.ends_with(" ms]") => text[..timing].to_string(),
        _ => text.to_string(),
    }
}

#[test]
fn check_exit_codes() {
    let clamd = Clamd::start();
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = write_config(dir.path(), &clamd.address);

    let clean = check(dir.path(), &config, "Subject: hi\r\n\r\nLunch?\r\n");
    assert_eq!(clean.status.code(), Some(0));
    assert_eq!(printed(&clean, "clamd"), "clean");
    assert_eq!(printed(&clean, "builtin"), "clean");
    assert_eq!(printed(&clean, "verdict"), "clean");

    let virus = check(
        dir.path(),
        &config,
        &format!("Subject: hi\r\n\r\n{EICAR}\r\n"),
    );
    assert_eq!(virus.status.code(), Some(1));
    assert!(printed(&virus, "clamd").contains("Eicar"));
    assert!(printed(&virus, "verdict").contains("Eicar"));

    let spam = check(
        dir.path(),
        &config,
        &format!("Subject: hi\r\n\r\n{GTUBE}\r\n"),
    );
    assert_eq!(spam.status.code(), Some(1));
    assert_eq!(printed(&spam, "clamd"), "clean");
    assert_eq!(printed(&spam, "verdict"), "spam score 1000.0 (GTUBE)");
}

#[test]
fn check_scanner_down_exits_2() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = write_config(dir.path(), &common::clamd::closed_port_address());
    let output = check(dir.path(), &config, "Subject: hi\r\n\r\nLunch?\r\n");
    assert_eq!(output.status.code(), Some(2));
    let clamd = printed(&output, "clamd");
    assert!(
        clamd.starts_with("error (on_error tempfail): cannot connect to clamd at"),
        "{clamd}"
    );
    assert_eq!(printed(&output, "builtin"), "clean");
    assert_eq!(
        printed(&output, "verdict"),
        "temporary failure: clamd failed"
    );
}

#[test]
fn config_check_accepts_example() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml.example");
    let output = sendguard(&["config", "check", example]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("valid"));
}

#[test]
fn config_check_lists_every_problem() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[upstream]\naddress = \"nowhere\"\n[policy]\nthreshold = 0\nwindow = \"soon\"\n\
         [scan.spam]\nthreshold = 5.0\n[[scan.spam.rules]]\nname = \"BROKEN\"\nscore = 1.0\nbody = \"(\"\n",
    )
    .expect("write config");
    let output = sendguard(&["config", "check", path.to_str().expect("utf-8 path")]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for key in [
        "upstream.address",
        "policy.threshold",
        "policy.window",
        "store",
        "scan.spam.rules[0]",
    ] {
        assert!(stderr.contains(key), "{key} missing from:\n{stderr}");
    }
}

#[test]
fn config_check_lists_engine_problems() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        format!(
            "[upstream]\naddress = \"127.0.0.1:25\"\n[store]\npath = \"{}\"\n\
             [scan.rspamd]\naddress = \"/run/rspamd.sock\"\ntimeout = \"0s\"\n\
             [scan.rspamd.actions]\ngreylist = \"spam\"\n\
             [scan.spamd]\naddress = \"spamd\"\nuser = \"two words\"\n",
            dir.path().join("store.db").display()
        ),
    )
    .expect("write config");
    let output = sendguard(&["config", "check", path.to_str().expect("utf-8 path")]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for (key, reason) in [
        ("scan.rspamd.address", "sendguard reaches rspamd over TCP"),
        ("scan.rspamd.timeout", "must be longer than zero"),
        (
            "scan.rspamd.actions.\"greylist\"",
            "never counts as a strike",
        ),
        ("scan.spamd.address", "neither \"host:port\""),
        ("scan.spamd.user", "\"two words\" is not a user name"),
    ] {
        let line = stderr
            .lines()
            .find(|line| line.contains(&format!("{key}: ")))
            .unwrap_or_else(|| panic!("{key} missing from:\n{stderr}"));
        assert!(line.contains(reason), "{line}");
    }

    // An unknown key in an engine section is named with its section.
    std::fs::write(
        &path,
        format!(
            "[upstream]\naddress = \"127.0.0.1:25\"\n[store]\npath = \"{}\"\n\
             [scan.spamd]\naddress = \"127.0.0.1:783\"\nusername = \"x\"\n",
            dir.path().join("store.db").display()
        ),
    )
    .expect("write config");
    let output = sendguard(&["config", "check", path.to_str().expect("utf-8 path")]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("scan.spamd"), "{stderr}");
    assert!(stderr.contains("username"), "{stderr}");
}

#[test]
fn status_of_unknown_store_explains() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = write_config(dir.path(), "127.0.0.1:3310");
    let output = sendguard(&["status", "alice@example.org", "--config", &config]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no such file"));
}

#[test]
fn config_check_warns_small_scan_size() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        format!(
            "[smtp]\nmax_message_size = 20000000\n[upstream]\naddress = \"127.0.0.1:25\"\n\
             [store]\npath = \"{}\"\n[scan.clamd]\naddress = \"127.0.0.1:3310\"\nmax_scan_size = 1000000\n",
            dir.path().join("store.db").display()
        ),
    )
    .expect("write config");
    let output = sendguard(&["config", "check", path.to_str().expect("utf-8 path")]);
    assert!(output.status.success(), "a warning is not an error");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("warning: scan.clamd.max_scan_size"),
        "{stdout}"
    );
}

#[test]
fn config_check_lists_every_file_problem() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("config.toml");
    let missing = dir.path().join("missing");
    std::fs::write(
        &path,
        format!(
            "[upstream]\naddress = \"127.0.0.1:25\"\n[store]\npath = \"{store}\"\n\
             [directory]\npath = \"{missing}/directory.toml\"\n\
             [alerts]\nwebhook_url = \"http://127.0.0.1:9/alert\"\n\
             [actions]\nsecret_file = \"{missing}/secret\"\n\
             [admin]\nlisten = \"127.0.0.1:8025\"\ntoken_file = \"{missing}/admin.token\"\n",
            store = dir.path().join("store.db").display(),
            missing = missing.display(),
        ),
    )
    .expect("write config");
    let output = sendguard(&["config", "check", path.to_str().expect("utf-8 path")]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for key in ["directory.path", "actions.secret_file", "admin.token_file"] {
        assert!(stderr.contains(key), "{key} missing from:\n{stderr}");
    }
    assert!(stderr.contains("head -c 32 /dev/urandom"), "{stderr}");
}

/// Runs `sendguard config check` on `config` with an empty system trust
/// store, as on a host without the ca-certificates package. `{secret}` in
/// `config` becomes the path of a webhook secret file.
fn check_without_trust_store(config: &str) -> Output {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("sendguard.toml");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "c2VjcmV0LWtleS1mb3ItdGVzdHM=\n").expect("write secret");
    let config = config.replace("{secret}", &secret.display().to_string());
    std::fs::write(&path, config).expect("write config");
    let empty = dir.path().join("no-certificates");
    std::fs::create_dir(&empty).expect("empty directory");
    Command::new(env!("CARGO_BIN_EXE_sendguard"))
        .args(["config", "check"])
        .arg(&path)
        .env("SSL_CERT_FILE", empty.join("none.pem"))
        .env("SSL_CERT_DIR", &empty)
        .output()
        .expect("run sendguard")
}

#[test]
fn trust_store_needed_only_for_webhooks() {
    let base = "[upstream]\naddress = \"127.0.0.1:2526\"\ntls = \"none\"\n\
                [store]\npath = \"/tmp/sendguard-cli-check.db\"\n";
    let output = check_without_trust_store(base);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let with_webhook = format!(
        "{base}[synchronized_security]\nenabled = true\n\
                  endpoint_scan_url = \"https://edr.example.org/scan\"\n\
         [actions]\nsecret_file = \"{{secret}}\"\n"
    );
    let output = check_without_trust_store(&with_webhook);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no trusted CA certificates"), "{stderr}");
}
