//! A private Postfix instance for tests: its own config, queue and data
//! directories in a temporary directory, an SMTP listener on a free
//! loopback port, and a numeric relayhost, so it never touches DNS or the
//! system's Postfix. Stopped when dropped.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

pub struct Postfix {
    pub dir: tempfile::TempDir,
    /// `127.0.0.1:PORT` of its smtpd.
    pub address: String,
}

impl Postfix {
    /// Starts Postfix relaying everything it accepts to `relayhost`
    /// (`host:port`), with `main_cf` lines added to its main.cf.
    pub fn start(relayhost: &str, main_cf: &str) -> Postfix {
        let dir = tempfile::Builder::new()
            .prefix("sendguard-postfix-")
            .tempdir()
            .expect("temporary directory");
        let config = dir.path().join("etc");
        let queue = dir.path().join("queue");
        let data = dir.path().join("data");
        for path in [&config, &queue, &data] {
            std::fs::create_dir_all(path).expect("create Postfix directory");
        }
        // Postfix's daemons run as the postfix user: they need to reach the
        // directories, and own the data directory.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("open the test directory to the postfix user");
        let status = Command::new("chown")
            .args(["postfix:postfix"])
            .arg(&data)
            .status()
            .expect("run chown");
        assert!(
            status.success(),
            "chown of the Postfix data directory failed"
        );
        let port = super::sendguard::free_port();
        let address = format!("127.0.0.1:{port}");
        let (relay_host, relay_port) = relayhost.rsplit_once(':').expect("relayhost is host:port");

        std::fs::write(
            config.join("main.cf"),
            format!(
                "compatibility_level = 3.6\n\
                 queue_directory = {queue}\n\
                 data_directory = {data}\n\
                 mail_owner = postfix\n\
                 setgid_group = postdrop\n\
                 myhostname = postfix.test\n\
                 mydomain = test\n\
                 mydestination =\n\
                 inet_interfaces = 127.0.0.1\n\
                 inet_protocols = ipv4\n\
                 mynetworks = 127.0.0.0/8\n\
                 smtpd_relay_restrictions = permit_mynetworks, reject\n\
                 relayhost = [{relay_host}]:{relay_port}\n\
                 smtp_dns_support_level = disabled\n\
                 smtpd_peername_lookup = no\n\
                 disable_dns_lookups = yes\n\
                 smtp_tls_security_level = none\n\
                 smtpd_tls_security_level = none\n\
                 alias_maps =\n\
                 alias_database =\n\
                 biff = no\n\
                 maillog_file = {log}\n\
                 maillog_file_prefixes = {tmp}\n\
                 queue_run_delay = 1s\n\
                 minimal_backoff_time = 1s\n\
                 maximal_backoff_time = 2s\n\
                 {main_cf}\n",
                queue = queue.display(),
                data = data.display(),
                log = dir.path().join("maillog").display(),
                tmp = dir.path().display(),
            ),
        )
        .expect("write main.cf");
        let master = std::fs::read_to_string("/etc/postfix/master.cf")
            .expect("Postfix is installed (/etc/postfix/master.cf)");
        // Replace the stock port-25 listener with the test port and add the
        // log service that maillog_file needs.
        let master: String = master
            .lines()
            .map(|line| {
                if line.starts_with("smtp      inet") {
                    format!("{address}      inet  n       -       n       -       -       smtpd")
                } else {
                    line.to_string()
                }
            })
            .chain((!master.contains("postlogd")).then(|| {
                "postlog   unix-dgram n  -       n       -       1       postlogd".to_string()
            }))
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(config.join("master.cf"), master + "\n").expect("write master.cf");

        let postfix = Postfix { dir, address };
        postfix.run(&["start"]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&postfix.address).is_err() {
            assert!(
                Instant::now() < deadline,
                "Postfix did not listen on {}:\n{}",
                postfix.address,
                postfix.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        postfix
    }

    fn config_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("etc")
    }

    /// Runs `postfix -c DIR ARGS` and panics with its output on failure.
    /// Postfix prints errors only to a terminal, so it runs under script(1).
    fn run(&self, args: &[&str]) {
        let command = format!(
            "postfix -c {} {}",
            self.config_dir().display(),
            args.join(" ")
        );
        let output = Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .output()
            .expect("run script(1)");
        assert!(
            output.status.success(),
            "{command} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            self.log()
        );
    }

    /// Postfix's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let command = format!("postfix -c {} stop", self.config_dir().display());
        let _ = Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .output();
    }
}
