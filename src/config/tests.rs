use super::*;

const MINIMAL: &str = r#"
[upstream]
address = "127.0.0.1:2526"
[store]
path = "/tmp/sendguard-test.db"
"#;

#[test]
fn minimal_uses_defaults() {
    let config = Config::parse(MINIMAL).expect("valid");
    assert_eq!(config.policy.threshold, 5);
    assert_eq!(config.policy.window, Duration::from_secs(600));
    assert_eq!(config.policy.first_lockout, Duration::from_secs(3600));
    assert_eq!(config.policy.timed_lockouts, 6);
    assert_eq!(config.smtp.max_message_size, 26_214_400);
    assert!(config.identity.strip_subaddress);
    assert_eq!(config.identity.unauthenticated, Unauthenticated::Sender);
    assert!(config.scan.clamd.is_none());
    assert!(config.directory.is_none());
}

#[test]
fn example_file_is_valid() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml.example"))
        .expect("example exists");
    let config = Config::parse(&text).unwrap_or_else(|problems| panic!("{problems}"));
    assert!(config.scan.clamd.is_some());
}

#[test]
fn every_problem_reported_at_once() {
    let text = r#"
[smtp]
max_message_size = 0
listen = "not an address"
[upstream]
address = "no-port"
[policy]
threshold = 0
window = "0s"
timed_lockouts = 65
[identity]
unauthenticated = "nobody"
[bogus]
x = 1
"#;
    let problems = Config::parse(text).expect_err("invalid");
    let keys: Vec<&str> = problems
        .0
        .iter()
        .map(|problem| problem.key.as_str())
        .collect();
    for expected in [
        "smtp.listen",
        "upstream.address",
        "policy.threshold",
        "policy.window",
        "policy.timed_lockouts",
        "identity.unauthenticated",
        "store",
        "bogus",
    ] {
        assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
    }
}

#[test]
fn unknown_key_named() {
    let text = format!("{MINIMAL}\n[policy]\nthreshhold = 3\n");
    let problems = Config::parse(&text).expect_err("invalid");
    assert_eq!(problems.0.len(), 1, "{problems}");
    assert_eq!(problems.0[0].key, "policy.threshhold");
}

#[test]
fn durations_parse_humantime() {
    let text = format!("{MINIMAL}\n[policy]\nwindow = \"2s\"\nfirst_lockout = \"3s\"\n");
    let config = Config::parse(&text).expect("valid");
    assert_eq!(config.policy.window, Duration::from_secs(2));
    assert_eq!(config.policy.first_lockout, Duration::from_secs(3));
}

#[test]
fn digest_changes_with_policy() {
    let first = Config::parse(MINIMAL).expect("valid");
    let text = format!("{MINIMAL}\n[policy]\nthreshold = 3\n");
    let second = Config::parse(&text).expect("valid");
    assert_ne!(first.policy_digest(), second.policy_digest());
    assert_eq!(
        first.policy_digest(),
        Config::parse(MINIMAL).expect("valid").policy_digest()
    );
}

#[test]
fn bare_addresses_are_networks() {
    let text = format!(
        "{MINIMAL}\n[smtp]\nrelay_networks = [\"10.0.0.0/8\", \"127.0.0.1\", \"::1\"]\nxclient_peers = [\"192.0.2.5\"]\n"
    );
    let config = Config::parse(&text).unwrap_or_else(|problems| panic!("{problems}"));
    assert_eq!(config.smtp.relay_networks.len(), 3);
    assert!(
        config.smtp.relay_networks[1]
            .contains(&"127.0.0.1".parse::<std::net::IpAddr>().expect("address"))
    );
    assert_eq!(config.smtp.xclient_peers[0].prefix_len(), 32);

    let bad = format!("{MINIMAL}\n[smtp]\nrelay_networks = [\"bogus\"]\n");
    let problems = Config::parse(&bad).expect_err("invalid");
    assert!(problems.to_string().contains("\"bogus\""), "{problems}");
}

fn problem_keys(extra: &str) -> Vec<String> {
    match Config::parse(&format!("{MINIMAL}{extra}")) {
        Ok(_) => Vec::new(),
        Err(problems) => problems.0.into_iter().map(|problem| problem.key).collect(),
    }
}

#[test]
fn actions_default_to_nothing() {
    let config = Config::parse(MINIMAL).expect("valid");
    assert!(!config.synchronized_security.enabled);
    assert!(config.alerts.webhook_url.is_none());
    assert!(config.alerts.admin_addresses.is_empty());
    assert_eq!(config.actions.retry_initial, Duration::from_secs(30));
    assert_eq!(config.actions.give_up_after, Duration::from_secs(172_800));
}

#[test]
fn scan_enabled_without_url_warns() {
    let keys = problem_keys("[synchronized_security]\nenabled = true\n");
    assert!(keys.is_empty(), "{keys:?}");
    let text = format!("{MINIMAL}[synchronized_security]\nenabled = true\n");
    let config = Config::parse(&text).expect("valid: agents receive the scan requests");
    let warnings: Vec<String> = config.warnings().into_iter().map(|w| w.key).collect();
    assert_eq!(warnings, ["synchronized_security.endpoint_scan_url"]);
}

#[test]
fn webhook_needs_secret_file() {
    let keys = problem_keys("[alerts]\nwebhook_url = \"https://alerts.example.org/hook\"\n");
    assert_eq!(keys, ["actions.secret_file"]);
}

#[test]
fn webhook_url_must_be_http() {
    let keys = problem_keys(
        "[alerts]\nwebhook_url = \"ftp://alerts.example.org/\"\n\
         [actions]\nsecret_file = \"/etc/sendguard/secret\"\n",
    );
    assert_eq!(keys, ["alerts.webhook_url"]);
}

#[test]
fn alert_addresses_validated() {
    let keys = problem_keys(
        "[alerts]\nadmin_addresses = [\"ok@example.org\", \"<bad@example.org>\", \"nobody\", \
         \"sécu@exämple.org\", \"a@b@c\", \"-oops@x\", \"x@.\", \"root@localhost\"]\n\
         from = \"a b@example.org\"\nrelay = \"localhost\"\n",
    );
    assert_eq!(
        keys,
        [
            "alerts.admin_addresses[1]",
            "alerts.admin_addresses[2]",
            "alerts.admin_addresses[3]",
            "alerts.admin_addresses[4]",
            "alerts.admin_addresses[5]",
            "alerts.admin_addresses[6]",
            "alerts.from",
            "alerts.relay"
        ]
    );
}

#[test]
fn webhook_url_typos_reported() {
    for url in [
        "http:///x",
        "http://127.0.0.1:0/x",
        " http://a.example/",
        "mailto:a@b",
    ] {
        let keys = problem_keys(&format!(
            "[alerts]\nwebhook_url = \"{url}\"\n[actions]\nsecret_file = \"/etc/secret\"\n"
        ));
        assert_eq!(keys, ["alerts.webhook_url"], "{url}");
    }
}

#[test]
fn retry_max_not_below_initial() {
    let keys = problem_keys("[actions]\nretry_initial = \"10m\"\nretry_max = \"1m\"\n");
    assert_eq!(keys, ["actions.retry_max"]);
}

#[test]
fn worker_threads_bounded() {
    assert!(problem_keys("[smtp]\nworker_threads = 1\n").is_empty());
    assert!(problem_keys("[smtp]\nworker_threads = 256\n").is_empty());
    assert_eq!(
        problem_keys("[smtp]\nworker_threads = 100000\n"),
        ["smtp.worker_threads"]
    );
}

#[test]
fn pool_durations_above_zero() {
    assert_eq!(
        pool_problem_keys("pool_idle_time = \"0s\"\npool_max_age = \"0s\"\n"),
        ["upstream.pool_idle_time", "upstream.pool_max_age"]
    );
}

/// Returns the keys of the problems found with `extra` lines in [upstream].
fn pool_problem_keys(extra: &str) -> Vec<String> {
    let text = MINIMAL.replace(
        "address = \"127.0.0.1:2526\"\n",
        &format!("address = \"127.0.0.1:2526\"\n{extra}"),
    );
    match Config::parse(&text) {
        Ok(_) => Vec::new(),
        Err(problems) => problems.0.into_iter().map(|problem| problem.key).collect(),
    }
}

#[test]
fn pool_and_sessions_bounded() {
    assert_eq!(
        pool_problem_keys("pool_size = 4294967296\npool_idle_time = \"1000y\"\n"),
        ["upstream.pool_idle_time", "upstream.pool_size"]
    );
    assert!(pool_problem_keys("pool_size = 0\npool_idle_time = \"1h\"\n").is_empty());
    assert_eq!(
        problem_keys(
            "[scan.clamd]\naddress = \"127.0.0.1:3310\"\nsessions = 100000\nsession_idle_time = \"1y\"\n"
        ),
        ["scan.clamd.session_idle_time", "scan.clamd.sessions"]
    );
}
