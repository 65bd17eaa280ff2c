//! Runs the real `sendguard` binary on a free loopback port with a config
//! written into a temporary directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A running `sendguard serve`, killed on drop.
pub struct Sendguard {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub address: String,
    child: Option<Child>,
}

pub use super::free_port;

impl Sendguard {
    /// Starts sendguard relaying to `upstream`, with `extra` TOML appended to
    /// a config that has [smtp], [upstream] and [store].
    pub fn start(upstream: &str, extra: &str) -> Sendguard {
        Sendguard::start_with(upstream, "", extra)
    }

    /// Like [`Sendguard::start`], with `smtp_extra` lines added to [smtp].
    pub fn start_with(upstream: &str, smtp_extra: &str, extra: &str) -> Sendguard {
        Sendguard::start_full(upstream, smtp_extra, "", extra)
    }

    /// Like [`Sendguard::start_with`], with `upstream_extra` lines added to
    /// [upstream].
    pub fn start_full(
        upstream: &str,
        smtp_extra: &str,
        upstream_extra: &str,
        extra: &str,
    ) -> Sendguard {
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = free_port();
        let address = format!("127.0.0.1:{port}");
        let config = format!(
            "[smtp]\nlisten = \"{address}\"\nhostname = \"sendguard.test\"\n\
             relay_networks = [\"127.0.0.0/8\", \"::1/128\"]\n{smtp_extra}\n\
             [upstream]\naddress = \"{upstream}\"\ntimeout = \"10s\"\nconnect_timeout = \"5s\"\n{upstream_extra}\n\
             [store]\npath = \"{}\"\n{extra}\n",
            dir.path().join("sendguard.db").display()
        );
        let config_path = dir.path().join("sendguard.toml");
        std::fs::write(&config_path, config).expect("write config");
        let mut sendguard = Sendguard {
            dir,
            config_path,
            address,
            child: None,
        };
        sendguard.spawn();
        sendguard
    }

    /// Replaces the config file (for reload tests).
    pub fn rewrite_config(&self, transform: impl FnOnce(&str) -> String) {
        let text = std::fs::read_to_string(&self.config_path).expect("read config");
        std::fs::write(&self.config_path, transform(&text)).expect("write config");
    }

    fn spawn(&mut self) {
        // A port from `free_port` can be taken by another test between the
        // check and sendguard's bind; sendguard then exits, and the port is
        // replaced with a new one. Readiness is the "sendguard started" log
        // line, written once every listener is bound, because a successful
        // connect could reach the other test's server.
        const ATTEMPTS: usize = 5;
        for _ in 0..ATTEMPTS {
            let before = self.log().len();
            let child = self.spawn_child();
            self.child = Some(child);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let log = self.log();
                let new_log = log.get(before..).unwrap_or("");
                if new_log.contains("sendguard started") {
                    return;
                }
                if let Some(child) = self.child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    self.child = None;
                    if self.replace_busy_port(new_log) {
                        break;
                    }
                    panic!("sendguard exited with {status}:\n{log}");
                }
                assert!(Instant::now() < deadline, "sendguard did not start:\n{log}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!(
            "sendguard found no free port in {ATTEMPTS} attempts:\n{}",
            self.log()
        );
    }

    fn spawn_child(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("sendguard.log"))
            .expect("log file");
        Command::new(env!("CARGO_BIN_EXE_sendguard"))
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .env("SENDGUARD_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start sendguard")
    }

    /// Moves the listener that failed with "Address already in use" to a
    /// new free port; returns false when the log names no such listener.
    fn replace_busy_port(&mut self, log: &str) -> bool {
        let Some(line) = log
            .lines()
            .find(|line| line.contains("Address already in use"))
        else {
            return false;
        };
        let config = std::fs::read_to_string(&self.config_path).expect("read config");
        for word in line.split([' ', ',', ';']) {
            let address = word.trim_end_matches(':');
            let quoted = format!("\"{address}\"");
            if !address.starts_with("127.0.0.1:") || !config.contains(&quoted) {
                continue;
            }
            let replacement = format!("127.0.0.1:{}", free_port());
            let config = config.replace(&quoted, &format!("\"{replacement}\""));
            std::fs::write(&self.config_path, config).expect("write config");
            if self.address == address {
                self.address = replacement;
            }
            return true;
        }
        false
    }

    /// Returns the `listen` address of a config section, such as
    /// `"admin"` or `"milter"`, as the server uses it now.
    pub fn listen_address(&self, section: &str) -> String {
        let text = std::fs::read_to_string(&self.config_path).expect("read config");
        let table: toml::Table = text.parse().expect("config is TOML");
        table[section]["listen"]
            .as_str()
            .unwrap_or_else(|| panic!("no {section}.listen in the config"))
            .to_string()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits up to `timeout` for the server to exit and returns whether it
    /// did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Process id of the running server.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sendguard.log")).unwrap_or_default()
    }

    /// Kills the server with SIGKILL and waits for it to die.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same config and store.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Sends SIGHUP and waits until the log shows the reload outcome.
    pub fn reload(&self) {
        let pid = self.child.as_ref().expect("running").id();
        let before = self.log().matches("reload").count();
        let status = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.log().matches("reload").count() == before {
            assert!(
                Instant::now() < deadline,
                "no reload in the log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs a `sendguard` subcommand with this server's config.
    pub fn cli(&self, args: &[&str]) -> Output {
        run_cli(args, &self.config_path)
    }

    /// Returns the events report as parsed JSON lines.
    pub fn events(&self) -> Vec<serde_json::Value> {
        let output = self.cli(&["events", "--format", "json"]);
        assert!(
            output.status.success(),
            "events failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
            .collect()
    }

    /// Returns the events of one type.
    pub fn events_of(&self, kind: &str) -> Vec<serde_json::Value> {
        self.events()
            .into_iter()
            .filter(|event| event["type"] == kind)
            .collect()
    }

    /// Waits until `condition` holds on the events report.
    pub fn wait_for_events(
        &self,
        timeout: Duration,
        condition: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.events();
            if condition(&events) {
                return events;
            }
            assert!(
                Instant::now() < deadline,
                "condition not met; events: {events:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Runs `sendguard ARGS --config CONFIG`.
pub fn run_cli(args: &[&str], config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sendguard"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run sendguard")
}

impl Drop for Sendguard {
    fn drop(&mut self) {
        self.kill9();
    }
}
