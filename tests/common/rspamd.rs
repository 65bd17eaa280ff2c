//! A real rspamd for integration tests: Debian's package with its stock
//! rules, in the foreground, with `fixtures/rspamd` as the override
//! directory (`LOCAL_CONFDIR`). Its normal worker listens on a free
//! loopback port, and its DNS goes to `scripts/lib/refuse-dns.pl` on
//! loopback, which refuses every query, so rspamd stays offline.
//!
//! The compiled Hyperscan databases are kept in
//! `target/tmp/rspamd-hs-cache` across runs: the first start compiles them
//! (about 9 s), later starts take under a second.
//!
//! Environment:
//! - `SENDGUARD_TEST_RSPAMD=host:port` makes [`Rspamd::start`] use that
//!   server instead of starting one. It must run with `fixtures/rspamd`.
//! - `SENDGUARD_RSPAMD_BIN` sets the rspamd program; the default is
//!   `rspamd` from `PATH`, then `/usr/bin/rspamd`.

use super::{
    free_port, program, reused_server, running_as_root, stop_process_group, wait_for_daemon,
};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

/// How long rspamd may take to reply to `/ping`; the first start compiles
/// the Hyperscan databases.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);

/// Attempts at starting rspamd, because the free port picked for it can be
/// taken by another process before rspamd binds it.
const START_ATTEMPTS: usize = 3;

/// A running rspamd, stopped on drop (unless it is a reused server).
pub struct Rspamd {
    /// `127.0.0.1:PORT` of the normal worker.
    pub address: String,
    child: Option<Child>,
    dns: Option<RefusingDns>,
    log: Option<PathBuf>,
    // Kept so that the directory is deleted after rspamd stops.
    _dir: Option<tempfile::TempDir>,
}

impl Rspamd {
    /// Returns the server named by `SENDGUARD_TEST_RSPAMD`, or starts one.
    pub fn start() -> Rspamd {
        if let Some(address) = reused_server("SENDGUARD_TEST_RSPAMD") {
            return Rspamd {
                address,
                child: None,
                dns: None,
                log: None,
                _dir: None,
            };
        }
        Rspamd::start_own()
    }

    /// Starts a new rspamd. Panics with its output if it does not reply to
    /// `/ping` in time.
    pub fn start_own() -> Rspamd {
        let dir = match tempfile::Builder::new()
            .prefix("sendguard-rspamd-")
            .tempdir()
        {
            Ok(dir) => dir,
            Err(error) => panic!("cannot create a directory for rspamd: {error}"),
        };
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("rspamd-hs-cache");
        create_dir(&cache);
        // One start at a time, so that two first starts do not compile the
        // shared databases at once.
        let lock = match File::create(cache.join(".start-lock")) {
            Ok(lock) => lock,
            Err(error) => panic!("cannot create the rspamd start lock: {error}"),
        };
        if let Err(error) = lock.lock() {
            panic!("cannot take the rspamd start lock: {error}");
        }

        let dns = RefusingDns::start();
        let mut last_output = String::new();
        for attempt in 0..START_ATTEMPTS {
            let port = free_port();
            let instance = dir.path().join(format!("attempt-{attempt}"));
            for name in ["db", "run", "log"] {
                create_dir(&instance.join(name));
            }
            let log = instance.join("rspamd.out");
            let mut child = spawn_rspamd(&instance, &cache, port, dns.port, &log);
            let address = format!("127.0.0.1:{port}");
            match wait_for_daemon(
                &mut child,
                "rspamd",
                &address,
                STARTUP_TIMEOUT,
                replies_to_ping,
            ) {
                Ok(()) => {
                    return Rspamd {
                        address,
                        child: Some(child),
                        dns: Some(dns),
                        log: Some(log),
                        _dir: Some(dir),
                    };
                }
                Err(reason) => {
                    stop_process_group(&mut child);
                    last_output =
                        format!("{reason}\n{}", fs::read_to_string(&log).unwrap_or_default());
                }
            }
        }
        panic!("rspamd did not start after {START_ATTEMPTS} attempts; last output:\n{last_output}");
    }

    /// Returns rspamd's log so far; empty for a reused server.
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|log| fs::read_to_string(log).ok())
            .unwrap_or_default()
    }
}

impl Drop for Rspamd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_process_group(&mut child);
        }
        drop(self.dns.take());
    }
}

/// The DNS server that refuses every query, `scripts/lib/refuse-dns.pl`.
struct RefusingDns {
    port: u16,
    child: Child,
    // Held open so the script never writes to a closed pipe.
    _stdout: BufReader<ChildStdout>,
}

impl RefusingDns {
    fn start() -> RefusingDns {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/lib/refuse-dns.pl");
        let spawned = Command::new("perl")
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(error) => panic!("cannot run perl {}: {error}", script.display()),
        };
        let Some(stdout) = child.stdout.take() else {
            panic!("no standard output from {}", script.display());
        };
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        let port = match stdout.read_line(&mut line) {
            Ok(_) => line.trim().parse::<u16>().ok(),
            Err(_) => None,
        };
        let Some(port) = port else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} did not print its port; it printed {line:?}",
                script.display()
            );
        };
        RefusingDns {
            port,
            child,
            _stdout: stdout,
        }
    }
}

impl Drop for RefusingDns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn create_dir(path: &Path) {
    if let Err(error) = fs::create_dir_all(path) {
        panic!("cannot create {}: {error}", path.display());
    }
}

/// Runs rspamd in the foreground in its own process group, so that
/// stopping the group stops its workers too.
fn spawn_rspamd(instance: &Path, cache: &Path, port: u16, dns_port: u16, log: &Path) -> Child {
    let program = program("SENDGUARD_RSPAMD_BIN", "rspamd", "/usr/bin/rspamd");
    let overrides = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/rspamd");
    let output = match File::create(log) {
        Ok(file) => file,
        Err(error) => panic!("cannot create {}: {error}", log.display()),
    };
    let errors = match output.try_clone() {
        Ok(file) => file,
        Err(error) => panic!("cannot duplicate the rspamd log handle: {error}"),
    };
    let var = |name: &str, value: &Path| format!("--var={name}={}", value.display());
    let mut command = Command::new(&program);
    command.args(["-f", "-c", "/etc/rspamd/rspamd.conf"]);
    if running_as_root() {
        // rspamd drops to its own user otherwise, which cannot write to a
        // temporary directory made by root.
        command.args(["-u", "root", "-g", "root", "-i"]);
    }
    command
        .arg(var("LOCAL_CONFDIR", &overrides))
        .arg(var("DBDIR", &instance.join("db")))
        .arg(var("RUNDIR", &instance.join("run")))
        .arg(var("LOGDIR", &instance.join("log")))
        .arg(var("SENDGUARD_HS_CACHE", cache))
        .arg(format!("--var=SENDGUARD_RSPAMD_PORT={port}"))
        .arg(format!("--var=SENDGUARD_DNS_PORT={dns_port}"))
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(output)
        .stderr(errors);
    match command.spawn() {
        Ok(child) => child,
        Err(error) => panic!(
            "cannot run {}: {error}; install rspamd or set SENDGUARD_RSPAMD_BIN",
            program.display()
        ),
    }
}

/// Returns whether rspamd at `address` replies "pong" to `GET /ping`.
pub fn replies_to_ping(address: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(address) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /ping HTTP/1.0\r\nHost: rspamd\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.") && reply.contains("pong")
}
