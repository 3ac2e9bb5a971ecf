//! Proves the test harness works, and that its checks can fail: a real Prosody with STARTTLS and
//! the test CA takes a tokio-xmpp login, comes back on the same ports after a restart, accepts
//! XEP-0114 components with the right secret only; a real Prometheus scrapes a loopback target,
//! answers queries with the served values and loads rule files.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_xmpp::connect::DnsConfig;
use tokio_xmpp::xmlstream::Timeouts;
use tokio_xmpp::{Client, Event};

use common::prometheus::Prometheus;
use common::prosody::{trust_test_ca, Prosody};
use common::wait::{
    bound_listener, eventually, eventually_blocking, find_binary, free_port, listening_ports,
};

fn bare_jid(jid: &str) -> tokio_xmpp::jid::BareJid {
    tokio_xmpp::jid::BareJid::new(jid).expect("a valid bare JID")
}

/// Waits for the client's `Event::Online` and returns the bound JID; `None` if it does not come
/// within `deadline` (tokio-xmpp retries failed logins silently, so a timeout is the failure).
async fn online_within(client: &mut Client, deadline: Duration) -> Option<String> {
    tokio::time::timeout(deadline, async {
        while let Some(event) = client.next().await {
            if let Event::Online { bound_jid, .. } = event {
                return Some(bound_jid.to_string());
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

#[tokio::test]
async fn prosody_starttls_scram_login_with_test_ca() {
    trust_test_ca();
    let t = Instant::now();
    let prosody = Prosody::start();
    eprintln!("prosody (TLS) started in {:?}", t.elapsed());
    assert!(prosody.tls_required());
    assert_eq!(prosody.domain(), "example.test");
    assert_eq!(
        prosody.components(),
        [
            "pubsub.user-agents.example.test",
            "commands.auth.example.test"
        ]
    );
    prosody.register("alice", "correct horse");

    let mut client = Client::new_starttls(
        bare_jid(&prosody.jid("alice")),
        "correct horse",
        DnsConfig::no_srv("127.0.0.1", prosody.c2s_port()),
        Timeouts::default(),
    );
    let t = Instant::now();
    let bound = online_within(&mut client, Duration::from_secs(20))
        .await
        .unwrap_or_else(|| panic!("no Event::Online over STARTTLS\n{}", prosody.log_tail(40)));
    eprintln!("tokio-xmpp online over STARTTLS in {:?}", t.elapsed());
    assert!(
        bound.starts_with("alice@example.test/"),
        "bound JID {bound}"
    );
    // The session really is STARTTLS + SCRAM-SHA-1: Prosody says so in its debug log.
    let log = prosody.log();
    assert!(
        log.contains("Stream encrypted (TLSv1.2"),
        "no TLS 1.2 in the log:\n{}",
        prosody.log_tail(60)
    );
    assert!(
        log.contains("mechanism='SCRAM-SHA-1'"),
        "the client did not authenticate with SCRAM-SHA-1:\n{}",
        prosody.log_tail(60)
    );
    assert!(!log.contains("mechanism='PLAIN'"));
    client.send_end().await.expect("close the stream");
}

#[tokio::test]
async fn prosody_rejects_a_wrong_password() {
    trust_test_ca();
    let prosody = Prosody::start();
    prosody.register("bob", "right");
    let mut client = Client::new_starttls(
        bare_jid(&prosody.jid("bob")),
        "wrong",
        DnsConfig::no_srv("127.0.0.1", prosody.c2s_port()),
        Timeouts::default(),
    );
    assert_eq!(
        online_within(&mut client, Duration::from_secs(3)).await,
        None,
        "a wrong password must not log in"
    );
    let log = prosody.log();
    assert!(
        log.contains("Sending[c2s_unauthed]: <failure"),
        "no auth failure in the log:\n{}",
        prosody.log_tail(40)
    );
}

/// Documents the TLS 1.3 trap (see `ProsodyBuilder::allow_tls13`): tokio-xmpp wants
/// SCRAM-SHA-1-PLUS there, Prosody 0.12 does not offer it, so the login falls back to PLAIN.
#[tokio::test]
async fn prosody_tls13_makes_tokio_xmpp_fall_back_to_plain() {
    trust_test_ca();
    let prosody = Prosody::builder()
        .allow_tls13()
        .sasl_plain(true)
        .user("dave", "pw")
        .start();
    let mut client = Client::new_starttls(
        bare_jid(&prosody.jid("dave")),
        "pw",
        DnsConfig::no_srv("127.0.0.1", prosody.c2s_port()),
        Timeouts::default(),
    );
    online_within(&mut client, Duration::from_secs(20))
        .await
        .unwrap_or_else(|| panic!("no Event::Online over TLS 1.3\n{}", prosody.log_tail(40)));
    let log = prosody.log();
    assert!(
        log.contains("Stream encrypted (TLSv1.3"),
        "{}",
        prosody.log_tail(40)
    );
    assert!(
        log.contains("mechanism='PLAIN'"),
        "{}",
        prosody.log_tail(40)
    );
    client.send_end().await.expect("close the stream");
}

#[tokio::test]
async fn prosody_restart_serves_the_same_ports_and_keeps_users() {
    let mut prosody = Prosody::start_plaintext();
    assert!(!prosody.tls_required());
    prosody.register("carol", "pw");
    let (c2s, component) = (prosody.c2s_addr(), prosody.component_addr());
    let old_pid = prosody.pid().expect("running");

    let stop_took = prosody.stop();
    eprintln!("prosody SIGTERM stop took {stop_took:?}");
    assert!(!prosody.is_running());
    assert!(
        std::fs::read_to_string(format!("/proc/{old_pid}/cmdline")).is_err(),
        "the old process is gone (reaped, no zombie)"
    );
    assert!(
        TcpStream::connect(c2s).is_err(),
        "nothing serves c2s while stopped"
    );

    let t = Instant::now();
    prosody.start_again();
    eprintln!("prosody start_again took {:?}", t.elapsed());
    assert_eq!(prosody.c2s_addr(), c2s);
    assert_eq!(prosody.component_addr(), component);
    let pid = prosody.pid().expect("running again");
    assert_ne!(pid, old_pid);
    let ports = listening_ports(pid);
    assert!(
        ports.contains(&c2s.port()) && ports.contains(&component.port()),
        "{ports:?}"
    );

    // restart() in one go, then a plaintext login of the user registered before both.
    prosody.restart();
    let mut client = Client::new_plaintext(
        bare_jid(&prosody.jid("carol")),
        "pw",
        DnsConfig::addr(&c2s.to_string()),
        Timeouts::default(),
    );
    let bound = online_within(&mut client, Duration::from_secs(20))
        .await
        .unwrap_or_else(|| panic!("no Event::Online after restart\n{}", prosody.log_tail(40)));
    assert!(bound.starts_with("carol@example.test/"), "{bound}");
    client.send_end().await.expect("close the stream");
}

/// An XEP-0114 handshake by hand; returns what the server answered to the handshake.
fn component_handshake(addr: std::net::SocketAddr, jid: &str, secret: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to the component port");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set a read timeout");
    write!(
        s,
        "<stream:stream xmlns='jabber:component:accept' \
         xmlns:stream='http://etherx.jabber.org/streams' to='{jid}'>"
    )
    .expect("send the stream header");
    let read_until = |s: &mut TcpStream, needle: &dyn Fn(&str) -> bool| {
        let mut got = String::new();
        let mut buf = [0u8; 2048];
        while !needle(&got) {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        got
    };
    let header = read_until(&mut s, &|g: &str| g.contains("id="));
    let id = header
        .split("id=")
        .nth(1)
        .and_then(|rest| {
            let quote = rest.chars().next()?;
            rest[1..].split(quote).next().map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no stream id in {header:?}"));
    let digest = hex::encode(Sha1::digest(format!("{id}{secret}").as_bytes()));
    write!(s, "<handshake>{digest}</handshake>").expect("send the handshake");
    read_until(&mut s, &|g: &str| {
        g.contains("<handshake") || g.contains("</stream:stream>") || g.contains("stream:error")
    })
}

#[test]
fn prosody_components_take_the_shared_secret_only() {
    let prosody = Prosody::builder()
        .plaintext()
        .components(&["pubsub.user-agents.example.test"])
        .component_secret("s3cret")
        .native_pubsub("pubsub.example.test")
        .start();
    let log = prosody.log();
    assert!(
        log.contains("Activated host: pubsub.example.test") && !log.contains("\terror\t"),
        "Prosody's own pubsub service did not load cleanly:\n{}",
        prosody.log_tail(40)
    );
    assert_eq!(prosody.component_secret(), "s3cret");
    let ok = component_handshake(
        prosody.component_addr(),
        "pubsub.user-agents.example.test",
        "s3cret",
    );
    assert!(ok.contains("<handshake"), "right secret: {ok}");
    let bad = component_handshake(
        prosody.component_addr(),
        "pubsub.user-agents.example.test",
        "wrong",
    );
    assert!(
        !bad.contains("<handshake") && bad.contains("not-authorized"),
        "wrong secret: {bad}"
    );
}

/// Serves `body` as /metrics on a loopback port from a tokio task; counts the requests.
async fn serve_metrics(body: &'static str) -> (String, Arc<AtomicUsize>) {
    let std_listener = bound_listener();
    std_listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let listener =
        tokio::net::TcpListener::from_std(std_listener).expect("tokio listener from std");
    let addr = listener.local_addr().expect("local addr").to_string();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(response.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (addr, hits)
}

const METRICS: &str = "# HELP infra_smoke_value A fixed value for the harness test.\n\
# TYPE infra_smoke_value gauge\n\
infra_smoke_value{kind=\"fixed\"} 42\n\
infra_smoke_value{kind=\"other\"} 7.5\n";

const RULES: &str = r#"groups:
  - name: infra-smoke
    rules:
      - record: infra_smoke:value:sum
        expr: sum(infra_smoke_value)
      - alert: InfraSmokeHigh
        expr: infra_smoke_value{kind="fixed"} > 40
        labels:
          severity: test
"#;

// multi_thread: the blocking Prometheus calls must not stall the task that serves the scrape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_loopback_target_and_evaluates_rules() {
    let (addr, hits) = serve_metrics(METRICS).await;
    let rules_dir = tempfile::tempdir().expect("temp dir");
    let rules = rules_dir.path().join("smoke-rules.yml");
    std::fs::write(&rules, RULES).expect("write the rule file");

    let t = Instant::now();
    let prom = Prometheus::builder()
        .target(&addr)
        .rule_file(&rules)
        .start();
    eprintln!("prometheus ready in {:?}", t.elapsed());
    prom.wait_for_scrape(Duration::from_secs(30));
    eprintln!("prometheus first scrape {:?} after start", t.elapsed());
    assert!(hits.load(Ordering::SeqCst) >= 1);

    assert_eq!(
        prom.query_value(r#"infra_smoke_value{kind="fixed"}"#),
        Some(42.0)
    );
    assert_eq!(
        prom.query_value(r#"infra_smoke_value{kind="other"}"#),
        Some(7.5)
    );
    assert_eq!(prom.query_value("infra_smoke_value_absent"), None);
    let samples = prom.query_samples("infra_smoke_value");
    assert_eq!(samples.len(), 2, "{samples:?}");
    assert!(samples
        .iter()
        .all(|(l, _)| l["job"] == "exporter" && l["instance"] == addr));
    let raw = prom.query("infra_smoke_value");
    assert_eq!(raw["status"], "success");
    assert_eq!(prom.query_ok("vector(1)")[0]["value"][1], "1");

    // A bad expression is an error answer, not a panic, from query(); query_ok() would panic.
    let bad = prom.query("sum(");
    assert_eq!(bad["status"], "error", "{bad}");

    // Rules: loaded, recorded, alerting.
    let groups = prom.rules();
    assert_eq!(groups[0]["name"], "infra-smoke", "{groups:#}");
    let sum = prom.wait_for_query("infra_smoke:value:sum", Duration::from_secs(15));
    assert_eq!(sum[0]["value"][1], "49.5");
    let alerts = eventually_blocking(Duration::from_secs(15), "InfraSmokeHigh firing", || {
        let alerts = prom.alerts();
        let firing = alerts.as_array().is_some_and(|a| {
            a.iter()
                .any(|x| x["labels"]["alertname"] == "InfraSmokeHigh" && x["state"] == "firing")
        });
        firing.then_some(alerts)
    });
    assert_eq!(alerts.as_array().map(Vec::len), Some(1), "{alerts:#}");
}

#[test]
fn prometheus_refuses_an_invalid_rule_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let rules = dir.path().join("bad.yml");
    std::fs::write(
        &rules,
        "groups:\n  - name: bad\n    rules:\n      - record: x\n        expr: sum(\n",
    )
    .expect("write");
    let result = std::panic::catch_unwind(|| {
        Prometheus::builder()
            .target("127.0.0.1:1")
            .rule_file(&rules)
            .start()
    });
    let err = result.err().expect("start must fail on a bad rule file");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("exited during start-up"), "{msg}");
}

#[tokio::test]
async fn eventually_returns_the_value_and_times_out_loudly() {
    let start = Instant::now();
    let v = eventually(Duration::from_secs(2), "a second poll", || {
        let ready = start.elapsed() > Duration::from_millis(60);
        async move { ready.then_some(7) }
    })
    .await;
    assert_eq!(v, 7);

    let timed_out = tokio::spawn(async {
        eventually(
            Duration::from_millis(100),
            "something that never happens",
            || async { None::<()> },
        )
        .await
    })
    .await
    .expect_err("must panic");
    let msg = timed_out
        .into_panic()
        .downcast::<String>()
        .map(|s| *s)
        .unwrap_or_default();
    assert!(msg.contains("something that never happens"), "{msg}");
}

#[test]
fn free_ports_differ_and_are_bindable() {
    let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
    let unique: std::collections::HashSet<_> = ports.iter().collect();
    assert_eq!(unique.len(), ports.len());
    for p in ports.iter().take(5) {
        std::net::TcpListener::bind(("127.0.0.1", *p)).expect("free port is bindable");
    }
}

#[test]
#[should_panic(expected = "not found on PATH")]
fn a_missing_binary_fails_the_test() {
    find_binary("ONSIP_TEST_NO_SUCH_BIN", "onsip-no-such-binary");
}
