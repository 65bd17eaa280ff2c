//! A small network of network namespaces for the agent tests: one bridge
//! in the root namespace with an address on a private /24, and one
//! namespace per host, each joined to the bridge by a veth pair. Every
//! name carries the test process's id and an index, so parallel tests do
//! not collide. [`Network`]'s `Drop` removes all of it, also after a
//! panic. Needs root.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Runs `ip ARGS`, panicking with its output on failure.
fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        output.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// One host: a namespace and its address.
#[derive(Debug, Clone)]
pub struct Host {
    pub namespace: String,
    pub address: Ipv4Addr,
}

/// The bridge, its namespaces and veth pairs.
pub struct Network {
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub hosts: Vec<Host>,
    veths: Vec<String>,
}

impl Network {
    /// Builds a bridge with `hosts` namespaces on `10.213.N.0/24`, with N
    /// chosen from the process id and `index` and skipped while the root
    /// namespace routes it already.
    pub fn build(index: u32, hosts: usize) -> Network {
        let pid = std::process::id();
        let routes = String::from_utf8_lossy(
            &Command::new("ip")
                .args(["-4", "route"])
                .output()
                .expect("run ip route")
                .stdout,
        )
        .to_string();
        let mut third = (pid.wrapping_mul(7).wrapping_add(index * 31)) % 250 + 1;
        while routes.contains(&format!("10.213.{third}.")) {
            third = third % 250 + 1;
        }
        let tag = format!("{}{index}", pid % 100_000);
        let mut network = Network {
            bridge: format!("sgbr{tag}"),
            gateway: Ipv4Addr::new(10, 213, third as u8, 1),
            hosts: Vec::new(),
            veths: Vec::new(),
        };
        ip(&["link", "add", &network.bridge, "type", "bridge"]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", network.gateway),
            "dev",
            &network.bridge,
        ]);
        ip(&["link", "set", &network.bridge, "up"]);
        for host in 0..hosts {
            let namespace = format!("sendguard-test-{tag}-{host}");
            let veth = format!("sgv{tag}{host}");
            let address = Ipv4Addr::new(10, 213, third as u8, 11 + host as u8);
            ip(&["netns", "add", &namespace]);
            network.hosts.push(Host {
                namespace: namespace.clone(),
                address,
            });
            ip(&[
                "link",
                "add",
                &veth,
                "type",
                "veth",
                "peer",
                "name",
                &format!("{veth}p"),
            ]);
            network.veths.push(veth.clone());
            ip(&["link", "set", &format!("{veth}p"), "netns", &namespace]);
            ip(&["link", "set", &veth, "master", &network.bridge]);
            ip(&["link", "set", &veth, "up"]);
            let inside = |args: &[&str]| {
                let mut full = vec!["netns", "exec", &namespace, "ip"];
                full.extend_from_slice(args);
                ip(&full);
            };
            inside(&["link", "set", &format!("{veth}p"), "name", "eth0"]);
            inside(&["addr", "add", &format!("{address}/24"), "dev", "eth0"]);
            inside(&["link", "set", "eth0", "up"]);
            inside(&["link", "set", "lo", "up"]);
        }
        network
    }

    /// Runs `program ARGS` inside `host`'s namespace and returns its output.
    pub fn exec(&self, host: usize, program: &str, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.hosts[host].namespace, program])
            .args(args)
            .output()
            .expect("run ip netns exec")
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for host in &self.hosts {
            let _ = Command::new("ip")
                .args(["netns", "del", &host.namespace])
                .status();
        }
        for veth in &self.veths {
            // Deleting the namespace removes the pair already; this covers a
            // pair whose peer never moved.
            let _ = Command::new("ip")
                .args(["link", "del", veth])
                .stderr(std::process::Stdio::null())
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

/// Moves the calling thread into the network namespace `namespace`.
fn enter(namespace: &str) {
    let path = format!("/var/run/netns/{namespace}");
    let file = std::fs::File::open(&path).unwrap_or_else(|error| panic!("open {path}: {error}"));
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    // SAFETY: setns only reads the descriptor, which `file` keeps open for
    // the call; it changes the namespace of this thread alone.
    let result = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
    assert_eq!(
        result,
        0,
        "setns into {namespace} failed: {}",
        std::io::Error::last_os_error()
    );
}

/// A TCP service in a namespace that greets every client with its host
/// name; it stops when dropped.
pub struct Service {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Service {
    /// Listens on `0.0.0.0:port` inside `namespace`.
    pub fn start(namespace: &str, port: u16, greeting: &str) -> Service {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_sender, ready) = std::sync::mpsc::channel();
        let namespace = namespace.to_string();
        let greeting = format!("{greeting}\n");
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            enter(&namespace);
            let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind the test service");
            listener
                .set_nonblocking(true)
                .expect("nonblocking listener");
            ready_sender.send(()).expect("report ready");
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.write_all(greeting.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        ready
            .recv_timeout(Duration::from_secs(10))
            .expect("test service listening");
        Service {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The outcome of one connection attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Connected and received this greeting.
    Connected(String),
    /// Refused at once (a TCP reset, or an ICMP error turned into one).
    Refused,
    /// Anything else, with the error.
    Failed(String),
}

/// Connects from inside `namespace` to `target` and reads the greeting.
pub fn probe(namespace: &str, target: SocketAddr) -> Probe {
    let namespace = namespace.to_string();
    std::thread::spawn(move || {
        enter(&namespace);
        let mut stream = match TcpStream::connect_timeout(&target, Duration::from_secs(3)) {
            Ok(stream) => stream,
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Probe::Refused;
            }
            Err(error) => return Probe::Failed(error.to_string()),
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
        let mut greeting = String::new();
        match stream.read_to_string(&mut greeting) {
            Ok(_) => Probe::Connected(greeting.trim().to_string()),
            Err(error) => Probe::Failed(format!("connected, then: {error}")),
        }
    })
    .join()
    .expect("probe thread")
}
