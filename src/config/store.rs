//! `[store]`: where strikes, lockouts and events are kept, and how a shared
//! Redis store is reached.

use super::Problems;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// The engine that stores mailbox state and the events report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The embedded SQLite file at `store.path`, for one relay host.
    #[default]
    Sqlite,
    /// A Redis server or Redis Cluster shared by several relay hosts.
    Redis,
}

/// The behaviour of a relay host while the Redis store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Reply with a temporary failure (4xx), so the client retries later.
    #[default]
    Tempfail,
    /// Decide with this host's own SQLite store and merge its strikes into
    /// Redis once Redis is back.
    Local,
}

/// `[store]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// SQLite database file; created with its directory's permissions. With
    /// the Redis backend it still keeps this host's device health and
    /// subnet notices, and the fallback state of `on_store_error = "local"`.
    pub path: PathBuf,
    /// `"sqlite"` (default) or `"redis"`.
    #[serde(default)]
    pub backend: Backend,
    /// `redis://[user:password@]host:port[/db]` of one Redis server.
    #[serde(default)]
    pub url: Option<String>,
    /// `redis://host:port` of Redis Cluster nodes; used instead of `url`.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Prefix of every Redis key and channel, so several deployments can
    /// share one Redis. Default `"sendguard:"`.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// Behaviour while Redis cannot be reached: `"tempfail"` (default) or
    /// `"local"`.
    #[serde(default)]
    pub on_store_error: OnStoreError,
    /// Time allowed for one Redis command, and for connecting. Default 2 s.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_key_prefix() -> String {
    "sendguard:".to_string()
}

fn default_timeout() -> Duration {
    Duration::from_secs(2)
}

impl StoreConfig {
    /// Returns a SQLite store configuration for `path`.
    pub fn sqlite(path: PathBuf) -> StoreConfig {
        StoreConfig {
            path,
            backend: Backend::Sqlite,
            url: None,
            nodes: Vec::new(),
            key_prefix: default_key_prefix(),
            on_store_error: OnStoreError::Tempfail,
            timeout: default_timeout(),
        }
    }

    /// Records every invalid value of the section.
    pub fn validate(&self, problems: &mut Problems) {
        if self.path.as_os_str().is_empty() {
            problems.push("store.path", "is empty; give the SQLite database file");
        }
        if self.timeout.is_zero() {
            problems.push("store.timeout", "must be longer than zero, such as \"2s\"");
        }
        if self.key_prefix.is_empty() {
            problems.push(
                "store.key_prefix",
                "is empty, so sendguard's keys would have generic names such as \"events\" in a \
                 Redis that others may share; use a prefix such as \"sendguard:\"",
            );
        } else if self.key_prefix.contains(['{', '}']) {
            problems.push(
                "store.key_prefix",
                format!(
                    "{:?} contains a brace; braces mark Redis Cluster hash tags, so use a \
                     prefix without them, such as \"sendguard:\"",
                    self.key_prefix
                ),
            );
        }
        match self.backend {
            Backend::Sqlite => {
                if self.url.is_some() || !self.nodes.is_empty() {
                    problems.push(
                        "store.backend",
                        "is \"sqlite\", but store.url or store.nodes is set; set backend = \
                         \"redis\" to use Redis, or remove url and nodes",
                    );
                }
            }
            Backend::Redis => self.validate_redis(problems),
        }
    }

    fn validate_redis(&self, problems: &mut Problems) {
        match (&self.url, self.nodes.is_empty()) {
            (None, true) => problems.push(
                "store.url",
                "is missing; backend = \"redis\" needs url = \"redis://host:port\" for one \
                 server, or nodes = [...] for a Redis Cluster",
            ),
            (Some(_), false) => problems.push(
                "store.nodes",
                "is set together with store.url; give url for one Redis server or nodes for a \
                 Redis Cluster, not both",
            ),
            (Some(url), true) => check_url("store.url", url, problems),
            (None, false) => {
                for (index, node) in self.nodes.iter().enumerate() {
                    check_url(&format!("store.nodes[{index}]"), node, problems);
                }
            }
        }
    }
}

fn check_url(key: &str, url: &str, problems: &mut Problems) {
    // Opening a client parses the URL without connecting.
    if let Err(error) = redis::Client::open(url) {
        problems.push(
            key,
            format!("{url:?} is an invalid Redis URL ({error}); write it as \"redis://host:port\""),
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Backend, Config, OnStoreError};

    /// Parses a config whose `[store]` section contains `path` and `lines`,
    /// and returns the key of each problem.
    fn problems(lines: &str) -> Vec<String> {
        let text = format!(
            "[upstream]\naddress = \"127.0.0.1:2526\"\n[store]\npath = \"/tmp/sendguard.db\"\n{lines}\n"
        );
        match Config::parse(&text) {
            Ok(_) => Vec::new(),
            Err(problems) => problems.0.into_iter().map(|problem| problem.key).collect(),
        }
    }

    #[test]
    fn sqlite_is_default() {
        let text = "[upstream]\naddress = \"127.0.0.1:2526\"\n[store]\npath = \"/tmp/s.db\"\n";
        let config = Config::parse(text).expect("valid");
        assert_eq!(config.store.backend, Backend::Sqlite);
        assert_eq!(config.store.key_prefix, "sendguard:");
        assert_eq!(config.store.on_store_error, OnStoreError::Tempfail);
    }

    #[test]
    fn redis_url_accepted() {
        let text = "[upstream]\naddress = \"127.0.0.1:2526\"\n[store]\npath = \"/tmp/s.db\"\n\
                    backend = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\non_store_error = \"local\"\n";
        let config = Config::parse(text).expect("valid");
        assert_eq!(config.store.backend, Backend::Redis);
        assert_eq!(config.store.on_store_error, OnStoreError::Local);
    }

    #[test]
    fn redis_without_url_rejected() {
        assert_eq!(problems("backend = \"redis\""), ["store.url"]);
    }

    #[test]
    fn redis_url_and_nodes_rejected() {
        let lines =
            "backend = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nnodes = [\"redis://127.0.0.1:2\"]";
        assert_eq!(problems(lines), ["store.nodes"]);
    }

    #[test]
    fn invalid_node_url_named() {
        let lines = "backend = \"redis\"\nnodes = [\"redis://127.0.0.1:2\", \"http://x\"]";
        assert_eq!(problems(lines), ["store.nodes[1]"]);
    }

    #[test]
    fn url_with_sqlite_rejected() {
        assert_eq!(problems("url = \"redis://127.0.0.1:1\""), ["store.backend"]);
    }

    #[test]
    fn brace_in_prefix_rejected() {
        let lines = "backend = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nkey_prefix = \"a{b}\"";
        assert_eq!(problems(lines), ["store.key_prefix"]);
        let lines = "backend = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nkey_prefix = \"\"";
        assert_eq!(problems(lines), ["store.key_prefix"]);
    }

    #[test]
    fn zero_timeout_rejected() {
        assert_eq!(problems("timeout = \"0s\""), ["store.timeout"]);
    }
}
