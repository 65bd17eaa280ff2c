//! A real spamd for integration tests: SpamAssassin 4.0 from Debian with
//! the rules its package ships, local tests only (`-L`, no DNS), and a
//! private site configuration: the system's `*.pre` files, which load the
//! plugins, and `fixtures/spamd/local.cf`. It listens on a free loopback
//! port and on a unix socket in a temporary directory.
//!
//! Environment:
//! - `SENDGUARD_TEST_SPAMD=host:port` makes [`Spamd::start`] use that
//!   server instead of starting one. It must run with
//!   `fixtures/spamd/local.cf`. `SENDGUARD_TEST_SPAMD_SOCKET` may give its
//!   unix socket; otherwise `socket` is empty.
//! - `SENDGUARD_SPAMD_BIN` sets the spamd program; the default is `spamd`
//!   from `PATH`, then `/usr/sbin/spamd`.

use super::{free_port, program, reused_server, stop_process_group, wait_for_daemon};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long spamd may take to load its rules and reply to PING.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Attempts at starting spamd, because the free port picked for it can be
/// taken by another process before spamd binds it.
const START_ATTEMPTS: usize = 3;

/// Where Debian's spamassassin package keeps the `*.pre` files.
const SYSTEM_SITE_CONFIG: &str = "/etc/spamassassin";

/// A running spamd, stopped on drop (unless it is a reused server).
pub struct Spamd {
    /// TCP address, `127.0.0.1:PORT`.
    pub address: String,
    /// Unix socket path; empty for a reused server without
    /// `SENDGUARD_TEST_SPAMD_SOCKET`.
    pub socket: PathBuf,
    child: Option<Child>,
    log: Option<PathBuf>,
    // Kept so that the directory is deleted after spamd stops.
    _dir: Option<tempfile::TempDir>,
}

impl Spamd {
    /// Returns the server named by `SENDGUARD_TEST_SPAMD`, or starts one.
    pub fn start() -> Spamd {
        if let Some(address) = reused_server("SENDGUARD_TEST_SPAMD") {
            let socket = std::env::var_os("SENDGUARD_TEST_SPAMD_SOCKET")
                .map(PathBuf::from)
                .unwrap_or_default();
            return Spamd {
                address,
                socket,
                child: None,
                log: None,
                _dir: None,
            };
        }
        Spamd::start_own()
    }

    /// Starts a new spamd. Panics with its output if it does not reply to
    /// PING in time.
    pub fn start_own() -> Spamd {
        let dir = match tempfile::Builder::new()
            .prefix("sendguard-spamd-")
            .tempdir()
        {
            Ok(dir) => dir,
            Err(error) => panic!("cannot create a directory for spamd: {error}"),
        };
        // spamd started by root reads its configuration as "nobody".
        if let Err(error) = fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)) {
            panic!("cannot open {} for reading: {error}", dir.path().display());
        }
        let site = dir.path().join("site");
        write_site_config(&site);

        let socket = dir.path().join("spamd.sock");
        let mut last_output = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let log = dir.path().join("spamd.out");
            let _ = fs::remove_file(&socket);
            let mut child = spawn_spamd(dir.path(), &site, port, &socket, &log);
            let address = format!("127.0.0.1:{port}");
            match wait_for_daemon(
                &mut child,
                "spamd",
                &address,
                STARTUP_TIMEOUT,
                replies_to_ping,
            ) {
                Ok(()) => {
                    return Spamd {
                        address,
                        socket,
                        child: Some(child),
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
        panic!("spamd did not start after {START_ATTEMPTS} attempts; last output:\n{last_output}");
    }

    /// Returns spamd's log so far; empty for a reused server.
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|log| fs::read_to_string(log).ok())
            .unwrap_or_default()
    }
}

impl Drop for Spamd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_process_group(&mut child);
        }
    }
}

/// Copies the system's `*.pre` files and the test rules into `site`.
fn write_site_config(site: &Path) {
    if let Err(error) = fs::create_dir_all(site) {
        panic!("cannot create {}: {error}", site.display());
    }
    let entries = match fs::read_dir(SYSTEM_SITE_CONFIG) {
        Ok(entries) => entries,
        Err(error) => {
            panic!("cannot read {SYSTEM_SITE_CONFIG}: {error}; install the spamassassin package")
        }
    };
    let mut copied = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|extension| extension.to_str()) != Some("pre") {
            continue;
        }
        let Some(name) = path.file_name() else {
            continue;
        };
        if let Err(error) = fs::copy(&path, site.join(name)) {
            panic!("cannot copy {}: {error}", path.display());
        }
        copied += 1;
    }
    // Without v320.pre's Check plugin spamd starts but cannot scan.
    assert!(copied > 0, "no *.pre files in {SYSTEM_SITE_CONFIG}");
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/spamd/local.cf");
    if let Err(error) = fs::copy(&rules, site.join("local.cf")) {
        panic!("cannot copy {}: {error}", rules.display());
    }
}

/// Runs spamd in the foreground in its own process group, so that
/// stopping the group stops its children too.
fn spawn_spamd(dir: &Path, site: &Path, port: u16, socket: &Path, log: &Path) -> Child {
    let program = program("SENDGUARD_SPAMD_BIN", "spamd", "/usr/sbin/spamd");
    let output = match File::create(log) {
        Ok(file) => file,
        Err(error) => panic!("cannot create {}: {error}", log.display()),
    };
    let errors = match output.try_clone() {
        Ok(file) => file,
        Err(error) => panic!("cannot duplicate the spamd log handle: {error}"),
    };
    let spawned = Command::new(&program)
        .args(["--local", "--nouser-config", "--syslog=stderr"])
        .args(["--max-children=2", "--min-children=1"])
        .arg(format!("--siteconfigpath={}", site.display()))
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--listen={}", socket.display()))
        .arg(format!("--pidfile={}", dir.join("spamd.pid").display()))
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(output)
        .stderr(errors)
        .spawn();
    match spawned {
        Ok(child) => child,
        Err(error) => panic!(
            "cannot run {}: {error}; install spamd or set SENDGUARD_SPAMD_BIN",
            program.display()
        ),
    }
}

/// Returns whether spamd at `address` replies PONG to PING.
pub fn replies_to_ping(address: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(address) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"PING SPAMC/1.5\r\n\r\n").is_err() {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.starts_with("SPAMD/") && reply.trim_end().ends_with("PONG")
}
