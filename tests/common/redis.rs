//! Real `redis-server` processes for the shared-store tests: one server
//! with the append-only file fsynced on every write, or a three-node Redis
//! Cluster, each node on a free loopback port in a temporary directory.
//!
//! Environment:
//! - `SENDGUARD_REDIS_BIN` sets the redis-server program; the default is
//!   `redis-server` from `PATH`, then `/usr/bin/redis-server`.
//! - `SENDGUARD_REDIS_CLI` sets redis-cli the same way.

use super::free_port;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long redis-server may take to accept commands.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Attempts at starting a server, because the free port picked for it can
/// be taken by another process before redis-server binds it.
const START_ATTEMPTS: usize = 3;

fn server_program() -> PathBuf {
    super::program(
        "SENDGUARD_REDIS_BIN",
        "redis-server",
        "/usr/bin/redis-server",
    )
}

fn cli_program() -> PathBuf {
    super::program("SENDGUARD_REDIS_CLI", "redis-cli", "/usr/bin/redis-cli")
}

/// A running redis-server, stopped on drop.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    cluster: bool,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server with `appendonly yes` and `appendfsync always`, so
    /// every acknowledged write survives a kill -9.
    pub fn start() -> RedisServer {
        RedisServer::start_node(false)
    }

    fn start_node(cluster: bool) -> RedisServer {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut server = RedisServer {
            port: 0,
            dir,
            cluster,
            child: None,
        };
        for attempt in 1..=START_ATTEMPTS {
            server.port = free_port();
            match server.spawn() {
                Ok(()) => return server,
                Err(error) if attempt < START_ATTEMPTS => {
                    eprintln!("redis-server start attempt {attempt} failed: {error}");
                }
                Err(error) => panic!("cannot start redis-server: {error}\n{}", server.log()),
            }
        }
        unreachable!("the last attempt panics")
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("redis.log"))
            .expect("log file");
        let mut command = Command::new(server_program());
        command
            .arg("--port")
            .arg(self.port.to_string())
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--protected-mode",
                "no",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(self.dir.path());
        if self.cluster {
            command.args(["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"]);
        }
        let mut child = command
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|error| format!("cannot run {}: {error}", server_program().display()))?;
        let address = self.address();
        let ready =
            super::wait_for_daemon(&mut child, "redis-server", &address, STARTUP_TIMEOUT, ping);
        match ready {
            Ok(()) => {
                self.child = Some(child);
                Ok(())
            }
            Err(error) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(error)
            }
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.address())
    }

    /// Returns the server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// Kills the server with SIGKILL, so only the append-only file's
    /// contents survive.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and data directory.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the server still runs");
        self.spawn()
            .unwrap_or_else(|error| panic!("cannot restart redis-server: {error}\n{}", self.log()));
    }

    /// Runs redis-cli against this server and returns its standard output.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new(cli_program())
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        assert!(
            output.status.success(),
            "redis-cli {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Waits until a sendguard on the Redis store has subscribed to the other
/// hosts' changes and reloaded the exemptions and device settings after
/// it, which it logs. Until then it could miss a lockout another host
/// starts.
pub fn wait_until_subscribed(host: &super::sendguard::Sendguard) {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    while !host
        .log()
        .contains("device settings and exclusions reloaded")
    {
        assert!(
            Instant::now() < deadline,
            "sendguard did not subscribe:\n{}",
            host.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Returns whether a Redis server at `address` replies PONG to PING.
pub fn ping(address: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(address) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("+PONG")
}

/// Three Redis Cluster primaries without replicas, every slot assigned.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three cluster-enabled servers and joins them with
    /// `redis-cli --cluster create`, then waits until the cluster is ok.
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3).map(|_| RedisServer::start_node(true)).collect();
        let addresses: Vec<String> = nodes.iter().map(RedisServer::address).collect();
        let output = Command::new(cli_program())
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = RedisCluster { nodes };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while !cluster
            .nodes
            .iter()
            .all(|node| node.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(
                Instant::now() < deadline,
                "the cluster did not reach state ok"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    /// Returns the nodes' `redis://` URLs.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}
