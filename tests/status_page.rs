//! The status page at `/` as a person on call sees it: rendered by headless
//! Chromium (Debian's `chromium`; the test fails, never skips, when it is
//! missing). A phone goes offline, the page must list its address under
//! "Offline now"; outside text (a hostile User-Agent) must stay text; the
//! JSON twin at `/api/status` must agree. The phone-sized screenshot is kept
//! as `tests/artifacts/status-page.png`.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use common::exporter::{self, http_get, wait_metric};
use common::wait::{eventually, find_binary};
use onsip_sim::{serve_c2s, Account, SimConfig, Simulator};
use onsip_ua_exporter::config::Flags;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(20);
const CHROMIUM_DEADLINE: Duration = Duration::from_secs(90);
const XMPP_DOMAIN: &str = "sim.test";
const JID: &str = "exporter@sim.test";
const PASSWORD: &str = "status-page-pw-91d2";
const HOSTILE_UA: &str = "<img src=x onerror=alert(1)>";

fn devices(address: &str) -> String {
    let (user, domain) = address.split_once('@').expect("address");
    format!("onsip_user_agent_devices{{domain=\"{domain}\",user=\"{user}\"}}")
}

/// Runs `cmd` to completion within `deadline` (killed and failed after),
/// returning its stdout; fails with its stderr if it exits non-zero.
fn run(mut cmd: Command, deadline: Duration) -> String {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {what}: {e}"));
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} still running after {deadline:?}: killed\n{}",
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    assert!(status.success(), "{what} failed ({status}):\n{stderr}");
    stdout
}

/// Headless Chromium with a fresh profile, nothing fetched in the
/// background, a phone-sized window.
fn chromium(profile: &Path) -> Command {
    let mut cmd = Command::new(find_binary("CHROMIUM_BIN", "chromium"));
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--window-size=412,915",
        "--force-device-scale-factor=2",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    cmd
}

/// The `<section id="…">` of a serialized DOM.
fn section<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("<section id=\"{id}\">"))
        .unwrap_or_else(|| panic!("no section {id} in the DOM:\n{dom}"));
    let rest = &dom[start..];
    &rest[..rest.find("</section>").expect("section end")]
}

/// Width and height of a PNG, from its IHDR chunk.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert!(
        bytes.len() > 24 && bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "not a PNG"
    );
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&bytes[16..20]), be(&bytes[20..24]))
}

fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/artifacts");
    std::fs::create_dir_all(&dir).expect("create tests/artifacts");
    dir
}

async fn start() -> (Simulator, exporter::Running, CancellationToken) {
    let sim = Simulator::new(SimConfig::new(XMPP_DOMAIN).with_account(Account::new(
        JID,
        &[
            "alice@acme.example",
            "bob@acme.example",
            "frontdesk@branch.example",
            "lobby@branch.example",
        ],
        PASSWORD,
    )));
    let cancel = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind c2s");
    let c2s: SocketAddr = listener.local_addr().expect("addr");
    tokio::spawn(serve_c2s(sim.clone(), listener, cancel.clone()));
    let flags = Flags {
        sip_address: Some("alice@acme.example".into()),
        ..exporter::flags_for(JID, c2s, XMPP_DOMAIN, None)
    };
    let running = exporter::start(flags, PASSWORD, None).await;
    (sim, running, cancel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_phone_is_listed_in_headless_chromium() {
    let (sim, running, cancel) = start().await;
    let addr = running.addr;
    wait_metric(addr, "onsip_up", 1.0, DEADLINE).await;

    let expires = Utc::now() + chrono::Duration::hours(1);
    let phones = [
        ("alice@acme.example", "a1", "Yealink SIP-T54W 96.86.0.70"),
        ("bob@acme.example", "b1", "Polycom VVX 450 6.4.3"),
        ("frontdesk@branch.example", "f1", HOSTILE_UA),
    ];
    for (address, item, ua) in phones {
        sim.register_phone(
            address,
            item,
            &format!("sip:{address}"),
            "sip:198.51.100.7:5060",
            ua,
            expires,
        );
    }
    for (address, _, _) in phones {
        wait_metric(addr, &devices(address), 1.0, DEADLINE).await;
    }
    assert!(sim.unregister_phone("bob@acme.example", "b1"));
    wait_metric(addr, &devices("bob@acme.example"), 0.0, DEADLINE).await;

    // The JSON twin agrees.
    let (status, json) = http_get(addr, "/api/status").await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    let offline: Vec<&str> = json["offline"]
        .as_array()
        .expect("offline array")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(offline, ["bob@acme.example", "lobby@branch.example"]);
    assert_eq!(json["offline_total"], 2);
    assert_eq!(json["recent"][0]["address"], "bob@acme.example");
    assert_eq!(json["recent"][0]["what"], "retracted");

    // What Chromium renders.
    let url = format!("http://{addr}/");
    let profile = tempfile::tempdir().expect("profile dir");
    let dom = tokio::task::spawn_blocking({
        let url = url.clone();
        let profile = profile.path().to_path_buf();
        move || {
            let mut cmd = chromium(&profile);
            cmd.arg("--dump-dom").arg(&url);
            run(cmd, CHROMIUM_DEADLINE)
        }
    })
    .await
    .expect("chromium task");
    assert!(
        dom.contains("<span class=\"state\">UP</span>"),
        "banner not UP:\n{dom}"
    );
    let offline = section(&dom, "offline");
    assert!(offline.contains("Offline now"), "{offline}");
    assert!(
        offline.contains("<li class=\"offline\"><span class=\"addr\">bob@acme.example</span></li>"),
        "bob is not listed offline:\n{offline}"
    );
    assert!(offline.contains("lobby@branch.example"), "{offline}");
    assert!(!offline.contains("alice@acme.example"), "{offline}");
    assert!(!offline.contains("frontdesk@branch.example"), "{offline}");
    let recent = section(&dom, "recent");
    let first = &recent[recent.find("<li class=\"event\">").expect("an event")..];
    let first = &first[..first.find("</li>").expect("event end")];
    assert!(
        first.contains("bob@acme.example") && first.contains(">retracted<"),
        "the newest change is not bob's retract: {first}"
    );
    // Outside text stays text: no <img> element was made of the UA string.
    assert!(!dom.contains("<img"), "an element was injected:\n{dom}");
    assert!(dom.contains("&lt;img src=x onerror=alert(1)&gt;"), "{dom}");
    let domains = section(&dom, "domains");
    assert!(domains.contains("acme.example") && domains.contains("branch.example"));

    // The screenshot, phone-sized (412×915 CSS pixels at 2×).
    let shot = artifacts().join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    tokio::task::spawn_blocking({
        let shot = shot.clone();
        let profile = tempfile::tempdir().expect("profile dir");
        move || {
            let mut cmd = chromium(profile.path());
            cmd.arg(format!("--screenshot={}", shot.display()))
                .arg(&url);
            run(cmd, CHROMIUM_DEADLINE);
        }
    })
    .await
    .expect("chromium task");
    let png = eventually(DEADLINE, "the screenshot file", || {
        let shot = shot.clone();
        async move { std::fs::read(&shot).ok().filter(|b| b.len() > 1000) }
    })
    .await;
    assert_eq!(png_size(&png), (824, 1830), "phone-sized screenshot");
    eprintln!("screenshot: {}", shot.display());

    running.stop().await;
    cancel.cancel();
}
