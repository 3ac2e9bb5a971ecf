//! `--web.config.file` with real TLS clients (ureq over rustls, and a bare
//! tokio-rustls handshake): TLS on the metrics port, basic auth with bcrypt
//! (wrong password → 401, the cache), the configured headers, plain HTTP
//! refused on the TLS port, mutual TLS requiring a certificate from the
//! configured CA, a rotated certificate served without a restart, and a bad
//! file making the binary exit 1 with a message naming the key.
//!
//! The exporter runs in-process against the simulator's c2s face (no
//! Prosody needed), so `/metrics` has real content to protect.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::exporter::{self, TestEnv};
use common::wait::{eventually, eventually_blocking};
use onsip_sim::{serve_c2s, Account, SimConfig, Simulator};
use onsip_ua_exporter::config::{Config, FileConfig, Flags};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(20);
const XMPP_DOMAIN: &str = "sim.test";
const JID: &str = "exporter@sim.test";
const XMPP_PASSWORD: &str = "xmpp-pw-7f3a";
const WEB_USER: &str = "prometheus";
const WEB_PASSWORD: &str = "scrape-pw-c41b";

// ---------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).expect("CA cert");
    Ca { cert, key }
}

/// A leaf certificate signed by `ca`: (certificate PEM, key PEM).
fn leaf(ca: &Ca, name: &str, client: bool) -> (String, String) {
    let key = KeyPair::generate().expect("leaf key");
    let sans = if client {
        vec![format!("{name}.clients.test")]
    } else {
        vec!["localhost".to_owned(), "127.0.0.1".to_owned()]
    };
    let mut params = CertificateParams::new(sans).expect("leaf params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![if client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    let cert = params.signed_by(&key, &ca.cert, &ca.key).expect("sign");
    (cert.pem(), key.serialize_pem())
}

fn der_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("PEM certificates")
}

fn der_key(pem: &str) -> PrivateKeyDer<'static> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .expect("PEM key")
        .expect("a key")
}

/// A TLS client configuration trusting `server_ca`, with an optional client
/// certificate (PEM pair).
fn client_tls(server_ca: &Ca, client: Option<&(String, String)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_ca.cert.der().clone()).expect("root");
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(der_certs(cert), der_key(key))
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

// ---------------------------------------------------------------------------
// The world: simulator c2s face + exporter with a web config
// ---------------------------------------------------------------------------

struct World {
    rt: tokio::runtime::Runtime,
    sim: Simulator,
    exporter: Option<exporter::Running>,
    cancel: CancellationToken,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    server_ca: Ca,
}

impl Drop for World {
    fn drop(&mut self) {
        // The exporter first (it unsubscribes), then the simulator.
        if let Some(running) = self.exporter.take() {
            self.rt.block_on(running.stop());
        }
        self.cancel.cancel();
    }
}

/// Starts the simulator and an exporter whose web config is `web_yaml`
/// (written next to the server certificate `server.crt`/`server.key`,
/// which it may name by relative path).
fn world(web_yaml: &str, extra_files: &[(&str, &str)]) -> World {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let server_ca = ca("web test server CA");
    let (cert, key) = leaf(&server_ca, "exporter", false);
    std::fs::write(dir.path().join("server.crt"), cert).expect("write cert");
    std::fs::write(dir.path().join("server.key"), key).expect("write key");
    for (name, text) in extra_files {
        std::fs::write(dir.path().join(name), text).expect("write file");
    }
    let web_path = dir.path().join("web.yml");
    std::fs::write(&web_path, web_yaml).expect("write web config");

    let sim = Simulator::new(SimConfig::new(XMPP_DOMAIN).with_account(Account::new(
        JID,
        &["alice@acme.example", "bob@acme.example"],
        XMPP_PASSWORD,
    )));
    let cancel = CancellationToken::new();
    let (running, addr) = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind c2s");
        let c2s = listener.local_addr().expect("c2s addr");
        tokio::spawn(serve_c2s(sim.clone(), listener, cancel.clone()));
        let flags = Flags {
            web_config_file: Some(web_path),
            sip_address: Some("alice@acme.example".into()),
            ..exporter::flags_for(JID, c2s, XMPP_DOMAIN, None)
        };
        let running = exporter::start(flags, XMPP_PASSWORD, None).await;
        let addr = running.addr;
        (running, addr)
    });
    World {
        rt,
        sim,
        exporter: Some(running),
        cancel,
        addr,
        dir,
        server_ca,
    }
}

fn bcrypt_hash(password: &str) -> String {
    // Cost 10: what `htpasswd -B` makes and the toolkit documents.
    bcrypt::hash(password, 10).expect("bcrypt")
}

/// What a GET came back with.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A GET through ureq (a real HTTP client over rustls). `Err`: the request
/// failed below HTTP (TLS refused, connection closed...).
fn get(
    tls: &Arc<rustls::ClientConfig>,
    url: &str,
    credentials: Option<(&str, &str)>,
) -> Result<Reply, String> {
    let agent = ureq::AgentBuilder::new()
        .tls_config(tls.clone())
        .timeout(Duration::from_secs(10))
        .build();
    let mut request = agent.get(url);
    if let Some((user, password)) = credentials {
        let token = base64_encode(format!("{user}:{password}").as_bytes());
        request = request.set("Authorization", &format!("Basic {token}"));
    }
    let response = match request.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(ureq::Error::Transport(t)) => return Err(t.to_string()),
    };
    let status = response.status();
    let headers = response
        .headers_names()
        .into_iter()
        .filter_map(|n| Some((n.clone(), response.header(&n)?.to_owned())))
        .collect();
    let body = response.into_string().map_err(|e| e.to_string())?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn https(addr: SocketAddr, path: &str) -> String {
    format!("https://localhost:{}{path}", addr.port())
}

/// A bare TLS handshake (plus one HTTP/1.0 request, so TLS 1.3's late
/// client-certificate verdict is seen): the server's certificate, and the
/// HTTP status line or the error.
async fn handshake(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> (Option<CertificateDer<'static>>, Result<String, String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let connector = tokio_rustls::TlsConnector::from(tls);
    let name = ServerName::try_from("localhost").expect("name");
    let mut stream = match connector.connect(name, tcp).await {
        Ok(s) => s,
        Err(e) => return (None, Err(e.to_string())),
    };
    let cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first().cloned());
    let result = async {
        stream
            .write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        Ok(text.lines().next().unwrap_or("").to_owned())
    }
    .await;
    (cert, result)
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn tls_with_basic_auth_and_headers() {
    let yaml = format!(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  min_version: TLS12\n\
         http_server_config:\n  headers:\n    Strict-Transport-Security: max-age=31536000\n    X-Frame-Options: deny\n\
         basic_auth_users:\n  {WEB_USER}: '{}'\n",
        bcrypt_hash(WEB_PASSWORD)
    );
    let w = world(&yaml, &[]);
    let tls = client_tls(&w.server_ca, None);
    let metrics = https(w.addr, "/metrics");

    // The link comes up (seen with the right password).
    eventually_blocking(DEADLINE, "onsip_up 1 over https with the password", || {
        get(&tls, &metrics, Some((WEB_USER, WEB_PASSWORD)))
            .ok()
            .filter(|r| r.status == 200 && r.body.contains("\nonsip_up 1\n"))
    });
    w.sim.register_phone(
        "alice@acme.example",
        "item-1",
        "sip:alice@192.0.2.10:5060",
        "sip:198.51.100.1:5060",
        "Yealink SIP-T54W",
        Utc::now() + chrono::Duration::hours(1),
    );
    let series = "onsip_user_agent_devices{domain=\"acme.example\",user=\"alice\"} 1";
    eventually_blocking(DEADLINE, "alice's phone on /metrics", || {
        get(&tls, &metrics, Some((WEB_USER, WEB_PASSWORD)))
            .ok()
            .filter(|r| r.body.contains(series))
    });

    // No credentials, a wrong password, an unknown user, another scheme: 401,
    // with the challenge, and nothing of the metrics.
    let bad: [Option<(&str, &str)>; 4] = [
        None,
        Some((WEB_USER, "wrong-password")),
        Some(("mallory", WEB_PASSWORD)),
        Some(("", "")),
    ];
    for credentials in bad {
        let reply = get(&tls, &metrics, credentials).expect("an HTTP answer");
        assert_eq!(reply.status, 401, "{credentials:?}: {reply:?}");
        assert_eq!(
            reply.header("WWW-Authenticate"),
            Some("Basic realm=\"onsip-ua-exporter\"")
        );
        assert!(!reply.body.contains("onsip_"), "{}", reply.body);
        // The configured headers are on refusals too.
        assert_eq!(reply.header("X-Frame-Options"), Some("deny"));
    }
    for path in ["/", "/api/status", "/nope"] {
        let reply = get(&tls, &https(w.addr, path), None).expect("answer");
        assert_eq!(reply.status, 401, "{path} without credentials");
        assert!(!reply.body.contains("alice"), "{path}: {}", reply.body);
    }

    // Probes stay open: kubelet cannot send credentials; they reveal nothing.
    for (path, body) in [("/healthz", "ok\n"), ("/readyz", "ready\n")] {
        let reply = get(&tls, &https(w.addr, path), None).expect("answer");
        assert_eq!((reply.status, reply.body.as_str()), (200, body), "{path}");
    }

    // The right password: the page and the JSON, with the headers.
    let reply = get(&tls, &https(w.addr, "/"), Some((WEB_USER, WEB_PASSWORD))).expect("page");
    assert_eq!(reply.status, 200);
    assert!(reply.body.contains("alice@acme.example"), "{}", reply.body);
    assert_eq!(
        reply.header("Strict-Transport-Security"),
        Some("max-age=31536000")
    );
    assert_eq!(reply.header("X-Frame-Options"), Some("deny"));
    assert_eq!(reply.header("X-Content-Type-Options"), Some("nosniff"));
    assert_eq!(reply.header("Cache-Control"), Some("no-store"));
    assert!(reply
        .header("Content-Security-Policy")
        .is_some_and(|csp| csp.contains("default-src 'none'")));
    let reply = get(
        &tls,
        &https(w.addr, "/api/status"),
        Some((WEB_USER, WEB_PASSWORD)),
    )
    .expect("json");
    let json: serde_json::Value = serde_json::from_str(&reply.body).expect("JSON");
    assert_eq!(json["authorized"], serde_json::Value::Bool(true));

    // Plain HTTP to the TLS port: a 400 that says why, never the metrics.
    let (status, body) = w.rt.block_on(exporter::http_get(w.addr, "/metrics"));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("HTTP request to an HTTPS server"), "{body}");
    let plain = ureq::get(&format!("http://127.0.0.1:{}/metrics", w.addr.port()))
        .set(
            "Authorization",
            &format!(
                "Basic {}",
                base64_encode(format!("{WEB_USER}:{WEB_PASSWORD}").as_bytes())
            ),
        )
        .call();
    match plain {
        Ok(r) => panic!("plain HTTP served: {}", r.status()),
        Err(ureq::Error::Status(code, _)) => assert_eq!(code, 400),
        Err(ureq::Error::Transport(_)) => {}
    }
}

/// bcrypt costs 50–250 ms at cost 10; a verified (user, password) is
/// cached, so repeated scrapes do not pay it. Figures printed for the
/// record; the assertion is loose enough for a loaded CI machine.
#[test]
fn verified_password_is_cached() {
    let yaml = format!(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n\
         basic_auth_users:\n  {WEB_USER}: '{}'\n",
        bcrypt_hash(WEB_PASSWORD)
    );
    let w = world(&yaml, &[]);
    let tls = client_tls(&w.server_ca, None);
    let url = https(w.addr, "/healthz");
    // /healthz is not authenticated: the price of TLS and HTTP alone.
    let started = Instant::now();
    for _ in 0..5 {
        assert_eq!(get(&tls, &url, None).expect("healthz").status, 200);
    }
    let baseline = started.elapsed() / 5;
    let url = https(w.addr, "/api/status");
    let started = Instant::now();
    let first = get(&tls, &url, Some((WEB_USER, WEB_PASSWORD))).expect("first");
    let first_time = started.elapsed();
    assert_eq!(first.status, 200);
    let started = Instant::now();
    for _ in 0..5 {
        let reply = get(&tls, &url, Some((WEB_USER, WEB_PASSWORD))).expect("cached");
        assert_eq!(reply.status, 200);
    }
    let cached_time = started.elapsed() / 5;
    let started = Instant::now();
    let wrong = get(&tls, &url, Some((WEB_USER, "wrong"))).expect("wrong");
    let wrong_time = started.elapsed();
    assert_eq!(wrong.status, 401);
    eprintln!(
        "request without auth {baseline:?}; first verification {first_time:?}; cached {cached_time:?}; wrong password {wrong_time:?}"
    );
    // A wrong password always pays bcrypt; a cached right one does not.
    assert!(
        cached_time < wrong_time,
        "cached {cached_time:?} should be cheaper than a bcrypt check {wrong_time:?}"
    );
}

#[test]
fn mutual_tls_requires_a_certificate_from_the_client_ca() {
    let client_ca = ca("web test client CA");
    let rogue_ca = ca("rogue CA");
    let good = leaf(&client_ca, "prometheus", true);
    let rogue = leaf(&rogue_ca, "prometheus", true);
    let yaml = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  \
                client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: clients-ca.crt\n";
    let w = world(yaml, &[("clients-ca.crt", &client_ca.cert.pem())]);
    let url = https(w.addr, "/metrics");

    let with_cert = client_tls(&w.server_ca, Some(&good));
    let reply = eventually_blocking(DEADLINE, "/metrics with a client certificate", || {
        get(&with_cert, &url, None).ok()
    });
    assert_eq!(reply.status, 200);
    assert!(reply.body.contains("onsip_up"), "{}", reply.body);

    // No certificate, or one from another CA: no HTTP answer at all.
    for (what, tls) in [
        ("no client certificate", client_tls(&w.server_ca, None)),
        (
            "a certificate of another CA",
            client_tls(&w.server_ca, Some(&rogue)),
        ),
    ] {
        match get(&tls, &url, None) {
            Ok(reply) => panic!("{what}: served {reply:?}"),
            Err(err) => eprintln!("{what}: refused: {err}"),
        }
        let (_, result) = w.rt.block_on(handshake(w.addr, tls.clone()));
        assert!(
            !result.as_deref().unwrap_or("").contains("200"),
            "{what}: {result:?}"
        );
    }
    let (cert, result) = w.rt.block_on(handshake(w.addr, with_cert));
    assert!(cert.is_some());
    assert_eq!(result.as_deref(), Ok("HTTP/1.0 200 OK"));
}

#[test]
fn rotated_certificate_is_served_without_restart() {
    let yaml = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n";
    let w = world(yaml, &[]);
    let tls = client_tls(&w.server_ca, None);
    let (first, result) = w.rt.block_on(handshake(w.addr, tls.clone()));
    assert_eq!(result.as_deref(), Ok("HTTP/1.0 200 OK"));
    let first = first.expect("server certificate");

    // cert-manager style: new files moved into place.
    let (cert, key) = leaf(&w.server_ca, "exporter-renewed", false);
    let dir = w.dir.path();
    std::fs::write(dir.join("new.crt"), &cert).expect("write");
    std::fs::write(dir.join("new.key"), &key).expect("write");
    std::fs::rename(dir.join("new.key"), dir.join("server.key")).expect("rename");
    std::fs::rename(dir.join("new.crt"), dir.join("server.crt")).expect("rename");
    let expected = der_certs(&cert).remove(0);
    w.rt.block_on(eventually(
        DEADLINE,
        "the renewed certificate served",
        || {
            let tls = tls.clone();
            let expected = expected.clone();
            async move {
                let (cert, result) = handshake(w.addr, tls).await;
                (cert.as_ref() == Some(&expected) && result.is_ok()).then_some(())
            }
        },
    ));
    assert_ne!(first, expected);

    // A broken rewrite keeps the last good certificate.
    std::fs::write(dir.join("server.crt"), "not a certificate").expect("write");
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let (cert, result) = w.rt.block_on(handshake(w.addr, tls.clone()));
        assert_eq!(cert.as_ref(), Some(&expected));
        assert_eq!(result.as_deref(), Ok("HTTP/1.0 200 OK"));
    }
}

fn run_binary(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_onsip-ua-exporter"))
        .args(args)
        .env_clear()
        .env("ONSIP_XMPP_PASSWORD", XMPP_PASSWORD)
        .env("ONSIP_XMPP_JID", JID)
        .output()
        .expect("run the exporter")
}

#[test]
fn invalid_web_config_exits_1_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: [(&str, &str); 4] = [
        (
            "basic_auth_users:\n  prometheus: plaintext-password\n",
            "basic_auth_users.prometheus: is not a bcrypt hash",
        ),
        (
            "tls_server_config:\n  cert_file: absent.crt\n  key_file: absent.key\n",
            "tls_server_config.cert_file: cannot read",
        ),
        (
            "http_server_config:\n  headers:\n    Content-Type: text/html\n",
            "http_server_config.headers.Content-Type: cannot be configured",
        ),
        (
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth: x\n",
            "unknown field `client_auth`",
        ),
    ];
    for (i, (yaml, expected)) in cases.iter().enumerate() {
        let path: PathBuf = dir.path().join(format!("web{i}.yml"));
        std::fs::write(&path, yaml).expect("write");
        let path_text = path.display().to_string();
        for subcommand in [None, Some("check-config")] {
            let mut args = vec!["--web.config.file", path_text.as_str()];
            args.extend(subcommand);
            let out = run_binary(&args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
            assert!(
                stderr.contains(&format!(
                    "invalid configuration: --web.config.file: {path_text}: "
                )),
                "{stderr}"
            );
            assert!(stderr.contains(expected), "{expected:?} not in {stderr}");
        }
    }
    // And a valid one passes check-config.
    let hash = bcrypt::hash("x", 4).expect("hash");
    let good = dir.path().join("good.yml");
    std::fs::write(
        &good,
        format!("basic_auth_users:\n  prometheus: '{hash}'\n"),
    )
    .expect("write");
    let out = run_binary(&[
        "--web.config.file",
        good.to_str().expect("utf-8"),
        "check-config",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The web config is checked at start-up by the library too (in-process
/// embedding, as the tests and the demo do).
#[test]
fn config_resolution_rejects_a_key_that_does_not_match() {
    let server_ca = ca("ca");
    let (cert, _) = leaf(&server_ca, "a", false);
    let (_, other_key) = leaf(&server_ca, "b", false);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("c.pem"), cert).expect("write");
    std::fs::write(dir.path().join("k.pem"), other_key).expect("write");
    let web = dir.path().join("web.yml");
    std::fs::write(
        &web,
        "tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n",
    )
    .expect("write");
    let flags = Flags {
        web_config_file: Some(web),
        ..exporter::flags_for(
            JID,
            "127.0.0.1:5222".parse().expect("addr"),
            XMPP_DOMAIN,
            None,
        )
    };
    let env = TestEnv([("ONSIP_XMPP_PASSWORD", XMPP_PASSWORD.to_owned())].into());
    let err = Config::resolve(&flags, &FileConfig::default(), &env).expect_err("mismatch");
    assert!(
        err.to_string()
            .contains("tls_server_config.key_file: certificate and key do not make a usable pair"),
        "{err}"
    );
}
