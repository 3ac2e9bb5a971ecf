//! Running the exporter in-process against a test server, and reading its
//! HTTP endpoints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use onsip_ua_exporter::app::{self, Exporter};
use onsip_ua_exporter::config::{Config, Environment, FileConfig, Flags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Supplies passwords as the environment would.
pub struct TestEnv(pub HashMap<&'static str, String>);

impl Environment for TestEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

/// Flags for an exporter that logs into `c2s` as `jid` and talks to the
/// services of `xmpp_domain` (as the simulator names them).
pub fn flags_for(jid: &str, c2s: SocketAddr, xmpp_domain: &str, ca_file: Option<&Path>) -> Flags {
    Flags {
        listen_address: Some("127.0.0.1:0".into()),
        jid: Some(jid.into()),
        server: Some(c2s.to_string()),
        ca_file: ca_file.map(Path::to_path_buf),
        plaintext: ca_file.is_none(),
        auth_jid: Some(format!("commands.auth.{xmpp_domain}")),
        pubsub_jid: Some(format!("pubsub.user-agents.{xmpp_domain}")),
        timeout: Some(Duration::from_secs(3)),
        keepalive: Some(Duration::from_secs(5)),
        max_backoff: Some(Duration::from_secs(2)),
        ..Flags::default()
    }
}

/// A running in-process exporter; stops when dropped.
pub struct Running {
    pub addr: SocketAddr,
    pub cancel: CancellationToken,
    exporter: Option<Exporter>,
}

impl Running {
    /// Cancels and waits for an orderly stop (unsubscribe, close).
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(exporter) = self.exporter.take() {
            tokio::time::timeout(Duration::from_secs(15), exporter.stopped())
                .await
                .expect("exporter stops within 15 s");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Starts an exporter with `flags`, the XMPP password (and optionally a
/// different OnSIP web password).
pub async fn start(flags: Flags, xmpp_password: &str, web_password: Option<&str>) -> Running {
    let mut env = HashMap::from([("ONSIP_XMPP_PASSWORD", xmpp_password.to_owned())]);
    if let Some(web) = web_password {
        env.insert("ONSIP_AUTH_PASSWORD", web.to_owned());
    }
    let config =
        Config::resolve(&flags, &FileConfig::default(), &TestEnv(env)).expect("valid config");
    onsip_ua_exporter::telemetry::init("debug", onsip_ua_exporter::config::LogFormat::Logfmt);
    let cancel = CancellationToken::new();
    let exporter = app::start(config, cancel.clone())
        .await
        .expect("exporter starts");
    Running {
        addr: exporter.local_addr,
        cancel,
        exporter: Some(exporter),
    }
}

/// A plain HTTP/1.0 GET; returns status and body (headers dropped).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = http_request(addr, path, &[]).await;
    (status, body)
}

/// A GET with extra headers; returns status, raw headers and body.
pub async fn http_request(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let bytes = http_request_bytes(addr, path, headers).await;
    let text = String::from_utf8_lossy(&bytes.1).into_owned();
    (bytes.0, bytes.2, text)
}

/// A GET returning the body as bytes (for gzip).
pub async fn http_request_bytes(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<u8>, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to exporter");
    let mut request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    (status, raw[split + 4..].to_vec(), head)
}

/// The samples of a scrape: `name{labels}` → value.
pub fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Scrapes `/metrics` and returns its samples.
pub async fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "metrics status");
    samples(&body)
}

/// Polls `/metrics` until `series` has `value`.
pub async fn wait_metric(addr: SocketAddr, series: &str, value: f64, deadline: Duration) {
    let what = format!("{series} == {value}");
    crate::common::wait::eventually(deadline, &what, || async {
        (scrape(addr).await.get(series) == Some(&value)).then_some(())
    })
    .await
}
