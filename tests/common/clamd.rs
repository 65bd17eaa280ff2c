//! A real clamd for integration tests, loaded with the test signatures in
//! `fixtures/clamd` and listening on a loopback port and a unix socket in a
//! temporary directory.
//!
//! Environment:
//! - `SENDGUARD_TEST_CLAMD=host:port` makes [`Clamd::start`] use that server
//!   instead of starting one. It must have the signatures from
//!   `fixtures/clamd` loaded. `SENDGUARD_TEST_CLAMD_SOCKET` may give its unix
//!   socket; otherwise `socket` is empty.
//! - `SENDGUARD_CLAMD_BIN` sets the clamd program; the default is `clamd`
//!   from `PATH`, then `/usr/sbin/clamd`.

use super::free_port;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long clamd may take to load the test signatures and reply to PING.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Attempts at starting clamd, because the free port picked for it can be
/// taken by another process before clamd binds it.
const START_ATTEMPTS: usize = 3;

/// File extensions that clamd loads as signature databases.
const SIGNATURE_EXTENSIONS: &[&str] = &["ndb", "hdb", "hsb", "ldb", "cdb", "fp", "sfp", "ign2"];

/// A running clamd, killed on drop (unless it is a reused external server).
pub struct Clamd {
    /// TCP address, `127.0.0.1:PORT`.
    pub address: String,
    /// Unix socket path; empty for a reused server without
    /// `SENDGUARD_TEST_CLAMD_SOCKET`.
    pub socket: PathBuf,
    child: Option<Child>,
    /// clamd.conf and the log file, to start the same clamd again.
    files: Option<(PathBuf, PathBuf)>,
    // Kept so that the directory is deleted after clamd stops.
    _dir: Option<tempfile::TempDir>,
}

impl Clamd {
    /// Starts clamd with its default `StreamMaxLength`, or returns the server
    /// named by `SENDGUARD_TEST_CLAMD`.
    pub fn start() -> Clamd {
        if let Some(address) = super::reused_server("SENDGUARD_TEST_CLAMD") {
            let socket = std::env::var_os("SENDGUARD_TEST_CLAMD_SOCKET")
                .map(PathBuf::from)
                .unwrap_or_default();
            return Clamd {
                address,
                socket,
                child: None,
                files: None,
                _dir: None,
            };
        }
        Clamd::start_with(None)
    }

    /// Starts a new clamd, with `StreamMaxLength` set to `stream_max_length`
    /// (clamd syntax, such as "1M") when given. Panics with clamd's output if
    /// it does not reply to PING within 20 s.
    pub fn start_with(stream_max_length: Option<&str>) -> Clamd {
        let dir = match tempfile::Builder::new()
            .prefix("sendguard-clamd-")
            .tempdir()
        {
            Ok(dir) => dir,
            Err(error) => panic!("cannot create a directory for clamd: {error}"),
        };
        let database = dir.path().join("db");
        let scratch = dir.path().join("tmp");
        create_dir(&database);
        create_dir(&scratch);
        copy_signatures(&database);

        let socket = dir.path().join("clamd.sock");
        let mut last_output = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let config = dir.path().join("clamd.conf");
            write_config(
                &config,
                &database,
                &scratch,
                &socket,
                port,
                stream_max_length,
            );

            let log = dir.path().join("clamd.out");
            let mut child = spawn_clamd(&config, &log);
            let address = format!("127.0.0.1:{port}");
            match wait_until_ready(&mut child, &address) {
                Ok(()) => {
                    return Clamd {
                        address,
                        socket,
                        child: Some(child),
                        files: Some((config, log)),
                        _dir: Some(dir),
                    };
                }
                Err(reason) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_output =
                        format!("{reason}\n{}", fs::read_to_string(&log).unwrap_or_default());
                }
            }
        }
        panic!("clamd did not start after {START_ATTEMPTS} attempts; last output:\n{last_output}");
    }
}

impl Clamd {
    /// Stops this clamd; its port then refuses connections.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts this clamd again on the same port with the same
    /// configuration. Panics for a reused external server.
    pub fn restart(&mut self) {
        self.stop();
        let (config, log) = self
            .files
            .clone()
            .expect("only a clamd started by the test can restart");
        let mut child = spawn_clamd(&config, &log);
        if let Err(reason) = wait_until_ready(&mut child, &self.address) {
            let _ = child.kill();
            panic!(
                "clamd did not restart: {reason}\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        self.child = Some(child);
    }
}

impl Drop for Clamd {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Returns a loopback address where no clamd listens.
pub use super::closed_address as closed_port_address;

fn create_dir(path: &Path) {
    if let Err(error) = fs::create_dir_all(path) {
        panic!("cannot create {}: {error}", path.display());
    }
}

fn copy_signatures(database: &Path) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/clamd");
    let entries = match fs::read_dir(&fixtures) {
        Ok(entries) => entries,
        Err(error) => panic!("cannot read {}: {error}", fixtures.display()),
    };
    let mut copied = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let is_signature = path
            .extension()
            .and_then(|extension| extension.to_str())
            .is_some_and(|extension| SIGNATURE_EXTENSIONS.contains(&extension));
        if !is_signature {
            continue;
        }
        let Some(name) = path.file_name() else {
            continue;
        };
        if let Err(error) = fs::copy(&path, database.join(name)) {
            panic!("cannot copy {}: {error}", path.display());
        }
        copied += 1;
    }
    // clamd exits at start-up when its database directory has no signatures.
    assert!(copied > 0, "no signature files in {}", fixtures.display());
}

fn write_config(
    config: &Path,
    database: &Path,
    scratch: &Path,
    socket: &Path,
    port: u16,
    stream_max_length: Option<&str>,
) {
    let mut text = format!(
        "Foreground yes\n\
         DatabaseDirectory {}\n\
         TemporaryDirectory {}\n\
         TCPSocket {port}\n\
         TCPAddr 127.0.0.1\n\
         LocalSocket {}\n\
         AlertExceedsMax yes\n",
        database.display(),
        scratch.display(),
        socket.display(),
    );
    if let Some(length) = stream_max_length {
        text.push_str(&format!("StreamMaxLength {length}\n"));
    }
    if let Err(error) = fs::write(config, text) {
        panic!("cannot write {}: {error}", config.display());
    }
}

fn clamd_program() -> PathBuf {
    super::program("SENDGUARD_CLAMD_BIN", "clamd", "/usr/sbin/clamd")
}

fn spawn_clamd(config: &Path, log: &Path) -> Child {
    let program = clamd_program();
    let output = match fs::File::create(log) {
        Ok(file) => file,
        Err(error) => panic!("cannot create {}: {error}", log.display()),
    };
    let errors = match output.try_clone() {
        Ok(file) => file,
        Err(error) => panic!("cannot duplicate the clamd log handle: {error}"),
    };
    let spawned = Command::new(&program)
        .arg("-c")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(output)
        .stderr(errors)
        .spawn();
    match spawned {
        Ok(child) => child,
        Err(error) => panic!(
            "cannot run {}: {error}; install clamav-daemon or set SENDGUARD_CLAMD_BIN",
            program.display()
        ),
    }
}

/// Waits until clamd replies PONG to PING, or fails when it exits or the
/// start-up time runs out.
fn wait_until_ready(child: &mut Child, address: &str) -> Result<(), String> {
    let socket_address: SocketAddr = match address.parse() {
        Ok(parsed) => parsed,
        Err(error) => return Err(format!("invalid address {address}: {error}")),
    };
    super::wait_for_daemon(child, "clamd", address, STARTUP_TIMEOUT, |_| {
        ping(socket_address)
    })
}

fn ping(address: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"zPING\0").is_err() {
        return false;
    }
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    reply.starts_with(b"PONG")
}
