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

/// What [`Postfix::start_with`] sets up beyond the defaults.
#[derive(Debug, Clone, Copy, Default)]
pub struct PostfixOptions<'a> {
    /// Lines added at the end of main.cf; a later line overrides an
    /// earlier one with the same name.
    pub main_cf: &'a str,
    /// SASL users (`name@realm`, password) for AUTH PLAIN and LOGIN. When
    /// set, smtpd offers AUTH from a Cyrus sasldb in the instance's
    /// directory and relays for authenticated clients.
    pub sasl_users: &'a [(&'a str, &'a str)],
}

impl Postfix {
    /// Starts Postfix relaying everything it accepts to `relayhost`
    /// (`host:port`), with `main_cf` lines added to its main.cf.
    pub fn start(relayhost: &str, main_cf: &str) -> Postfix {
        Postfix::start_with(
            relayhost,
            PostfixOptions {
                main_cf,
                ..PostfixOptions::default()
            },
        )
    }

    /// Like [`Postfix::start`], with SASL users when `options` has them.
    pub fn start_with(relayhost: &str, options: PostfixOptions<'_>) -> Postfix {
        let main_cf = options.main_cf;
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
        let sasl_main_cf = if options.sasl_users.is_empty() {
            String::new()
        } else {
            setup_sasl(dir.path(), &config, options.sasl_users)
        };

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
                 {sasl_main_cf}\
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

/// Creates a Cyrus sasldb with `users` and the `sasl/smtpd.conf` that
/// Debian's Postfix reads from its config directory, and returns the
/// main.cf lines that turn AUTH on. smtpd runs unchrooted in this harness,
/// so it reads the sasldb at its path in the temporary directory.
fn setup_sasl(dir: &Path, config: &Path, users: &[(&str, &str)]) -> String {
    let sasldb = dir.join("sasldb2");
    for (user, password) in users {
        let (name, realm) = user.split_once('@').expect("SASL user is name@realm");
        let mut child = Command::new("saslpasswd2")
            .arg("-f")
            .arg(&sasldb)
            .args(["-c", "-p", "-u", realm, name])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("run saslpasswd2 (package sasl2-bin)");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("saslpasswd2 stdin");
            stdin
                .write_all(password.as_bytes())
                .expect("write the SASL password");
        }
        let status = child.wait().expect("wait for saslpasswd2");
        assert!(status.success(), "saslpasswd2 failed for {user}");
    }
    let status = Command::new("chown")
        .args(["postfix:postfix"])
        .arg(&sasldb)
        .status()
        .expect("run chown");
    assert!(status.success(), "chown of the sasldb failed");

    let sasl_dir = config.join("sasl");
    std::fs::create_dir_all(&sasl_dir).expect("create the sasl config directory");
    std::fs::write(
        sasl_dir.join("smtpd.conf"),
        format!(
            "pwcheck_method: auxprop\n\
             auxprop_plugin: sasldb\n\
             mech_list: PLAIN LOGIN\n\
             sasldb_path: {}\n",
            sasldb.display()
        ),
    )
    .expect("write sasl/smtpd.conf");
    "smtpd_sasl_auth_enable = yes\n\
     smtpd_sasl_type = cyrus\n\
     smtpd_sasl_path = smtpd\n\
     smtpd_sasl_security_options = noanonymous\n\
     smtpd_relay_restrictions = permit_sasl_authenticated, permit_mynetworks, reject\n"
        .to_string()
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let command = format!("postfix -c {} stop", self.config_dir().display());
        let _ = Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .output();
    }
}
