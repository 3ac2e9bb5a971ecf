//! The passwords never show: the real binary runs at trace level
//! (`--log.level trace` and `RUST_LOG=trace`) against the simulator's c2s
//! face, with a wrong OnSIP web password, with the right ones (given by
//! files this time, and behind basic auth), and with a wrong XMPP password.
//! Its whole output (stderr and stdout, through shutdown), `/metrics`, `/`
//! and `/api/status` must not hold any password, its base64, or the base64
//! SASL PLAIN message (`\0user\0password`) that carries it on the wire.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::exporter::{http_request, samples};
use common::wait::{eventually, free_port, loopback, ChildServer};
use onsip_sim::{serve_c2s, Account, SimConfig, Simulator};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(30);
const XMPP_DOMAIN: &str = "sim.test";
const JID: &str = "exporter@sim.test";
const XMPP_PASSWORD: &str = "Xmpp-Pass-4c1e9a";
const WEB_PASSWORD: &str = "Portal-Pass-77d0b2";
const WRONG_WEB_PASSWORD: &str = "Wrong-Portal-3f5a61";
const WRONG_XMPP_PASSWORD: &str = "Wrong-Xmpp-e82c04";
const SCRAPE_USER: &str = "prometheus";
const SCRAPE_PASSWORD: &str = "Scrape-Pass-19b7de";

fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Every form in which a password could leak.
fn forbidden() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for password in [
        XMPP_PASSWORD,
        WEB_PASSWORD,
        WRONG_WEB_PASSWORD,
        WRONG_XMPP_PASSWORD,
        SCRAPE_PASSWORD,
    ] {
        out.push((password.to_owned(), format!("{password} itself")));
        // Base64 at each of the three alignments it can have inside a
        // longer encoded message (the whole-character part only).
        for prefix in ["", "a", "ab"] {
            let encoded = base64(format!("{prefix}{password}").as_bytes());
            let skip = if prefix.is_empty() { 0 } else { 4 };
            let core = &encoded[skip..encoded.len().saturating_sub(4)];
            out.push((
                core.to_owned(),
                format!("base64 of {password} (alignment {})", prefix.len()),
            ));
        }
        let plain = base64(format!("\0exporter\0{password}").as_bytes());
        out.push((plain, format!("SASL PLAIN message with {password}")));
    }
    out.push((
        base64(format!("{SCRAPE_USER}:{SCRAPE_PASSWORD}").as_bytes()),
        "basic-auth header value".to_owned(),
    ));
    out
}

fn assert_clean(what: &str, text: &str) {
    for (needle, name) in forbidden() {
        if let Some(at) = text.find(&needle) {
            let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
            let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
            panic!(
                "{name} ({needle:?}) found in {what}, in this line:\n{:?}",
                &text[line_start..line_end]
            );
        }
    }
}

struct Run {
    name: &'static str,
    /// Extra arguments.
    args: Vec<String>,
    /// Extra environment.
    env: Vec<(&'static str, String)>,
    /// What `/api/status` must show before the output is checked.
    wait_for: fn(&serde_json::Value) -> bool,
    /// Basic-auth credentials for the scrape.
    scrape_as: Option<(&'static str, &'static str)>,
}

fn basic(credentials: Option<(&str, &str)>) -> Vec<(&'static str, String)> {
    credentials
        .map(|(u, p)| {
            vec![(
                "Authorization",
                format!("Basic {}", base64(format!("{u}:{p}").as_bytes())),
            )]
        })
        .unwrap_or_default()
}

async fn get(addr: SocketAddr, path: &str, credentials: Option<(&str, &str)>) -> (u16, String) {
    let headers = basic(credentials);
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let (status, _, body) = http_request(addr, path, &headers).await;
    (status, body)
}

/// Runs the binary once, waits for `run.wait_for`, reads the endpoints,
/// stops it with SIGTERM and returns everything it said and served.
async fn run_binary(run: Run, c2s: SocketAddr, dir: &Path) -> (String, String, serde_json::Value) {
    let port = free_port();
    let addr = loopback(port);
    let log = dir.join(format!("{}.log", run.name));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_onsip-ua-exporter"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "trace")
        .args([
            "--log.level",
            "trace",
            "--web.listen-address",
            &addr.to_string(),
            "--xmpp.jid",
            JID,
            "--xmpp.server",
            &c2s.to_string(),
            "--xmpp.insecure-plaintext-for-tests",
            "--onsip.auth-jid",
            &format!("commands.auth.{XMPP_DOMAIN}"),
            "--onsip.pubsub-jid",
            &format!("pubsub.user-agents.{XMPP_DOMAIN}"),
            "--onsip.sip-address",
            "alice@acme.example",
            "--xmpp.timeout",
            "3s",
            "--xmpp.max-backoff",
            "1s",
        ])
        .args(&run.args);
    for (name, value) in &run.env {
        cmd.env(name, value);
    }
    let mut child = ChildServer::spawn(run.name, cmd, &log, &[]);

    let (wait_for, credentials) = (run.wait_for, run.scrape_as);
    let status: serde_json::Value = eventually(
        DEADLINE,
        &format!("{}: expected state", run.name),
        || async move {
            if !common::wait::port_accepts(addr) {
                return None;
            }
            let (code, body) = get(addr, "/api/status", credentials).await;
            let json: serde_json::Value = serde_json::from_str(&body).ok()?;
            (code == 200 && wait_for(&json)).then_some(json)
        },
    )
    .await;
    let mut served = String::new();
    for path in ["/metrics", "/", "/api/status"] {
        let (code, body) = get(addr, path, run.scrape_as).await;
        assert_eq!(code, 200, "{}: {path}", run.name);
        served.push_str(&format!("==== {path}\n{body}\n"));
    }
    if run.scrape_as.is_some() {
        // A refused scrape with a wrong password, for the logs to not show.
        let (code, _) = get(addr, "/metrics", Some((SCRAPE_USER, WRONG_WEB_PASSWORD))).await;
        assert_eq!(code, 401);
    }
    child.terminate(Duration::from_secs(15));
    assert_eq!(
        child.exit_status().and_then(|s| s.code()),
        Some(0),
        "{}: exit status",
        run.name
    );
    let output = std::fs::read_to_string(&log).expect("read the exporter's output");
    (output, served, status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_appear_in_output_metrics_or_pages() {
    let mut account = Account::new(
        JID,
        &["alice@acme.example", "bob@acme.example"],
        WEB_PASSWORD,
    );
    account.xmpp_password = XMPP_PASSWORD.to_owned();
    let sim = Simulator::new(SimConfig::new(XMPP_DOMAIN).with_account(account));
    let cancel = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind c2s");
    let c2s = listener.local_addr().expect("addr");
    tokio::spawn(serve_c2s(sim.clone(), listener, cancel.clone()));

    let dir = tempfile::tempdir().expect("tempdir");
    let xmpp_file = dir.path().join("xmpp-password");
    let web_file = dir.path().join("web-password");
    std::fs::write(&xmpp_file, format!("{XMPP_PASSWORD}\n")).expect("write");
    std::fs::write(&web_file, format!("{WEB_PASSWORD}\n")).expect("write");
    let web_config = dir.path().join("web.yml");
    std::fs::write(
        &web_config,
        format!(
            "basic_auth_users:\n  {SCRAPE_USER}: '{}'\n",
            bcrypt::hash(SCRAPE_PASSWORD, 4).expect("bcrypt")
        ),
    )
    .expect("write");

    let runs = vec![
        Run {
            name: "wrong-web-password-by-env",
            args: vec!["--log.format".into(), "logfmt".into()],
            env: vec![
                ("ONSIP_XMPP_PASSWORD", XMPP_PASSWORD.to_owned()),
                ("ONSIP_AUTH_PASSWORD", WRONG_WEB_PASSWORD.to_owned()),
            ],
            wait_for: |s| s["connected"] == true && s["last_error"]["kind"] == "authorize",
            scrape_as: None,
        },
        Run {
            name: "right-passwords-by-file",
            args: vec![
                "--log.format".into(),
                "json".into(),
                "--xmpp.password-file".into(),
                xmpp_file.display().to_string(),
                "--onsip.auth-password-file".into(),
                web_file.display().to_string(),
                "--web.config.file".into(),
                web_config.display().to_string(),
            ],
            env: vec![],
            wait_for: |s| s["up"] == true,
            scrape_as: Some((SCRAPE_USER, SCRAPE_PASSWORD)),
        },
        Run {
            name: "wrong-xmpp-password-by-env",
            args: vec![],
            env: vec![
                ("ONSIP_XMPP_PASSWORD", WRONG_XMPP_PASSWORD.to_owned()),
                ("ONSIP_AUTH_PASSWORD", WEB_PASSWORD.to_owned()),
            ],
            wait_for: |s| s["last_error"]["kind"] == "auth",
            scrape_as: None,
        },
    ];
    for run in runs {
        let name = run.name;
        let json_logs = run.args.iter().any(|a| a == "json");
        let (output, served, status) = run_binary(run, c2s, dir.path()).await;
        eprintln!(
            "{name}: {} lines of output, {} bytes served",
            output.lines().count(),
            served.len()
        );
        // The run did what it was meant to, at trace level.
        assert!(
            output.contains(if json_logs {
                "\"TRACE\""
            } else {
                "level=trace"
            }),
            "{name}: no trace-level line: is trace on?\n{output}"
        );
        if name == "right-passwords-by-file" {
            let metrics = &served[..served.find("==== /\n").expect("page")];
            assert_eq!(samples(metrics).get("onsip_up"), Some(&1.0), "{name}");
        } else {
            assert!(status["last_error"]["message"].is_string(), "{status}");
        }
        assert_clean(&format!("{name}: the exporter's output"), &output);
        assert_clean(&format!("{name}: what it served"), &served);
    }
    cancel.cancel();
}
