//! The agent's requests to the server's admin API, made with the device's
//! own token.

use super::config::AgentConfig;
use serde_json::{Value, json};
use std::net::IpAddr;

/// The API client of one device.
pub struct Api {
    http: reqwest::Client,
    /// Client without a total timeout, for the event stream.
    stream_http: reqwest::Client,
    base: String,
    token: String,
    pub device: String,
}

/// Maximum length of a heartbeat's reason that the server accepts, in
/// bytes.
const MAX_REASON: usize = 1000;

/// Maximum length of the server's error text quoted in an error, in
/// bytes; a proxy's error page can be megabytes long.
const MAX_QUOTED_REPLY: usize = 300;

/// Returns `text` cut to [`MAX_QUOTED_REPLY`] bytes, with the number of
/// bytes left out.
fn quote_reply(text: &str) -> String {
    let text = text.trim();
    if text.len() <= MAX_QUOTED_REPLY {
        return text.to_string();
    }
    let mut end = MAX_QUOTED_REPLY;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} ... ({} more bytes)", &text[..end], text.len() - end)
}

/// Maximum silence on the event stream before it counts as broken; the
/// server sends a keep-alive comment every 15 s.
const STREAM_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(45);

impl Api {
    /// Builds the client for `config` with `token`.
    ///
    /// # Errors
    /// When TLS cannot be set up (an unreadable `ca_file`).
    pub fn new(config: &AgentConfig, token: String) -> Result<Api, String> {
        let build = |total: bool| {
            let tls = crate::tls::verifying_client_config(config.ca_file.as_deref(), "ca_file")
                .map_err(|error| format!("ca_file: {error}"))?;
            let mut builder = reqwest::Client::builder()
                .use_preconfigured_tls(tls)
                .redirect(reqwest::redirect::Policy::none())
                .connect_timeout(config.request_timeout)
                .user_agent(concat!("sendguard-agent/", env!("CARGO_PKG_VERSION")));
            builder = if total {
                builder.timeout(config.request_timeout)
            } else {
                builder.read_timeout(STREAM_READ_TIMEOUT)
            };
            builder
                .build()
                .map_err(|error| format!("cannot build the HTTP client: {error}"))
        };
        Ok(Api {
            http: build(true)?,
            stream_http: build(false)?,
            base: config.server.trim_end_matches('/').to_string(),
            token,
            device: config.device.clone(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, request: reqwest::RequestBuilder, what: &str) -> Result<Value, String> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|error| {
                let mut text = format!("{what} failed");
                crate::append_causes(&mut text, &error);
                text
            })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|error| format!("{what}: cannot read the server's reply: {error}"))?;
        if !status.is_success() {
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|value| value["error"].as_str().map(str::to_string))
                .unwrap_or(text);
            return Err(format!(
                "{what}: the server answered {status}: {}",
                quote_reply(&message)
            ));
        }
        serde_json::from_str(&text)
            .map_err(|error| format!("{what}: the reply is not JSON: {error}"))
    }

    /// Sends a heartbeat with `health` (`green`, `yellow`, `red` or
    /// `offline`) and the reasons of a health that is not green, and
    /// returns the device's view.
    ///
    /// # Errors
    /// When the request fails or the server refuses it.
    pub async fn heartbeat(
        &self,
        health: &str,
        addresses: &[IpAddr],
        reasons: &[String],
    ) -> Result<Value, String> {
        let mut body = json!({
            "device": self.device,
            "health": health,
            "addresses": addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
        });
        if !reasons.is_empty() {
            let mut reason = reasons.join("; ");
            if reason.len() > MAX_REASON {
                let mut end = MAX_REASON;
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                reason.truncate(end);
            }
            body["reason"] = reason.into();
        }
        self.send(
            self.http.post(self.url("/api/v1/heartbeats")).json(&body),
            "heartbeat",
        )
        .await
    }

    /// Returns the device's subnet view: its subnets, every peer on them
    /// and its own state.
    ///
    /// # Errors
    /// When the request fails or the server refuses it.
    pub async fn subnet(&self) -> Result<Value, String> {
        let path = format!(
            "/api/v1/devices/{}/subnet",
            crate::admin::percent_encode(&self.device)
        );
        self.send(self.http.get(self.url(&path)), "subnet refresh")
            .await
    }

    /// Reports refused connections between `source` and `destination` (a
    /// device id or an address), which the server records on the device
    /// that refuses under its rules.
    ///
    /// # Errors
    /// When the request fails or the server refuses it.
    pub async fn report_refusal(
        &self,
        source: &str,
        destination: &str,
        attempts: u64,
    ) -> Result<Value, String> {
        let body = json!({ "source": source, "destination": destination, "attempts": attempts });
        self.send(
            self.http.post(self.url("/api/v1/access")).json(&body),
            "refusal report",
        )
        .await
    }

    /// Reports the result of an on-demand scan.
    ///
    /// # Errors
    /// When the request fails or the server refuses it.
    pub async fn report_scan(&self, body: &Value) -> Result<Value, String> {
        let path = format!(
            "/api/v1/devices/{}/scans",
            crate::admin::percent_encode(&self.device)
        );
        self.send(self.http.post(self.url(&path)).json(body), "scan report")
            .await
    }

    /// Opens the device's event stream after notice `after` (or at the
    /// newest notice when `None`).
    ///
    /// # Errors
    /// When the request fails or the server refuses it.
    pub async fn open_stream(&self, after: Option<i64>) -> Result<reqwest::Response, String> {
        let path = format!(
            "/api/v1/devices/{}/events",
            crate::admin::percent_encode(&self.device)
        );
        let mut request = self
            .stream_http
            .get(self.url(&path))
            .bearer_auth(&self.token)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(after) = after {
            request = request.header("Last-Event-ID", after.to_string());
        }
        let response = request.send().await.map_err(|error| {
            let mut text = "event stream connection failed".to_string();
            crate::append_causes(&mut text, &error);
            text
        })?;
        if !response.status().is_success() {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            return Err(format!(
                "event stream: the server answered {status}: {}",
                quote_reply(&text)
            ));
        }
        // A proxy or another service on the port can reply 200 with a
        // page. Taking that for the stream would count as contact with the
        // server and keep the agent from failing open.
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
            .to_string();
        if !content_type.starts_with("text/event-stream") {
            return Err(format!(
                "event stream: the server replied {} with content type {content_type:?}, not \
                 text/event-stream; check that server is sendguard's admin API",
                response.status()
            ));
        }
        Ok(response)
    }
}

/// Reads the device's global unicast addresses with `ip -j address`.
///
/// # Errors
/// When `ip` cannot be run or prints no valid JSON.
pub async fn interface_addresses() -> Result<Vec<IpAddr>, String> {
    let output = tokio::process::Command::new("ip")
        .args(["-j", "address", "show"])
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|error| {
            format!("cannot run `ip -j address show`: {error}; install iproute2 or set addresses")
        })?;
    if !output.status.success() {
        return Err(format!(
            "`ip -j address show` failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let interfaces: Value = serde_json::from_slice(&output.stdout)
        .map_err(|error| format!("`ip -j address show` printed no valid JSON: {error}"))?;
    Ok(global_addresses(&interfaces))
}

/// Returns the addresses of scope `global` from `ip -j address` output.
pub fn global_addresses(interfaces: &Value) -> Vec<IpAddr> {
    let mut addresses = Vec::new();
    for interface in interfaces.as_array().map(Vec::as_slice).unwrap_or(&[]) {
        for info in interface["addr_info"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            if info["scope"] != "global" {
                continue;
            }
            if let Some(address) = info["local"].as_str().and_then(|text| text.parse().ok()) {
                addresses.push(address);
            }
        }
    }
    addresses
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves one connection on loopback with `reply`, and returns the
    /// base URL.
    async fn serve_once(reply: impl Into<String>) -> String {
        let reply = reply.into();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let (mut connection, _) = listener.accept().await.expect("accept");
            let mut request = [0u8; 4096];
            let _ = connection.read(&mut request).await;
            let _ = connection.write_all(reply.as_bytes()).await;
        });
        format!("http://{address}")
    }

    fn api_for(server: &str) -> Api {
        let config = AgentConfig::parse(&format!(
            "server = \"{server}\"\ndevice = \"ws-1\"\ntoken_file = \"/nonexistent\"\n"
        ))
        .expect("valid config");
        Api::new(&config, "token".to_string()).expect("client")
    }

    #[tokio::test]
    async fn stream_rejects_html_page() {
        let server = serve_once(
            "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 6\r\n\r\n<html>",
        )
        .await;
        let error = api_for(&server)
            .open_stream(None)
            .await
            .expect_err("an HTML page is no event stream");
        assert!(error.contains("\"text/html\""), "{error}");
    }

    #[tokio::test]
    async fn long_error_page_cut() {
        let page = format!("<html>{}</html>", "x".repeat(1_000_000));
        let reply = format!(
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\r\n{page}",
            page.len()
        );
        let error = api_for(&serve_once(reply).await)
            .subnet()
            .await
            .expect_err("500");
        assert!(error.len() < 1000, "{} bytes", error.len());
        assert!(
            error.contains("500 Internal Server Error: <html>xxx"),
            "{error}"
        );
        assert!(error.ends_with("(999713 more bytes)"), "{error}");
    }

    #[tokio::test]
    async fn stream_accepts_event_stream() {
        let server = serve_once(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        api_for(&server)
            .open_stream(None)
            .await
            .expect("an event stream");
    }

    #[test]
    fn only_global_addresses_reported() {
        let output = json!([
            {"ifname": "lo", "addr_info": [{"family": "inet", "local": "127.0.0.1", "scope": "host"}]},
            {"ifname": "eth0", "addr_info": [
                {"family": "inet", "local": "10.0.0.7", "scope": "global"},
                {"family": "inet6", "local": "fe80::1", "scope": "link"},
                {"family": "inet6", "local": "fd00::7", "scope": "global"}
            ]}
        ]);
        let addresses: Vec<String> = global_addresses(&output)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(addresses, ["10.0.0.7", "fd00::7"]);
    }
}
