//! The XEP-0114 face attached to a real Prosody, with a real tokio-xmpp
//! client logging in to Prosody: authorize, subscribe, receive the notice
//! and events through Prosody's routing, survive `drop_links`.
//!
//! Needs the `prosody` and `prosodyctl` binaries (Debian package `prosody`),
//! which the project's scripts/test.sh installs:
//! `cargo test -p onsip-sim --test prosody`.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use minidom::Element;
use onsip_sim::{attach_component, Account, SimConfig, Simulator};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_xmpp::connect::DnsConfig;
use tokio_xmpp::parsers::message::Message;
use tokio_xmpp::parsers::presence::Presence;
use tokio_xmpp::xmlstream::Timeouts;
use tokio_xmpp::{Client, Event, IqRequest, IqResponse, Stanza};

const WAIT: Duration = Duration::from_secs(15);
const SECRET: &str = "component-secret";
const PUBSUB: &str = "pubsub.user-agents.example.com";
const AUTH: &str = "commands.auth.example.com";

/// A Prosody in a temporary directory, killed and cleaned up on drop.
struct Prosody {
    dir: PathBuf,
    child: Child,
    c2s: SocketAddr,
    component: SocketAddr,
}

impl Drop for Prosody {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

async fn start_prosody() -> Prosody {
    let dir = std::env::temp_dir().join(format!(
        "onsip-sim-prosody-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(dir.join("data")).expect("temp dir");
    let (c2s_port, comp_port) = (free_port(), free_port());
    let d = dir.display();
    let cfg = format!(
        r#"
pidfile = "{d}/prosody.pid"
data_path = "{d}/data"
run_as_root = true
log = {{ {{ levels = {{ min = "info" }}, to = "file", filename = "{d}/prosody.log" }} }}
c2s_ports = {{ {c2s_port} }}
c2s_interfaces = {{ "127.0.0.1" }}
component_ports = {{ {comp_port} }}
component_interfaces = {{ "127.0.0.1" }}
s2s_ports = {{ }}
modules_enabled = {{ "roster"; "saslauth"; "disco"; "ping" }}
modules_disabled = {{ "s2s"; "offline" }}
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
authentication = "internal_plain"

VirtualHost "example.com"

Component "{AUTH}"
    component_secret = "{SECRET}"

Component "{PUBSUB}"
    component_secret = "{SECRET}"
"#
    );
    let cfg_path = dir.join("prosody.cfg.lua");
    std::fs::write(&cfg_path, cfg).expect("write config");
    let status = Command::new("prosodyctl")
        .arg("--config")
        .arg(&cfg_path)
        .args(["register", "alice", "example.com", "xmpp-secret"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("prosodyctl (install the prosody package)");
    assert!(status.success(), "prosodyctl register failed");
    let child = Command::new("prosody")
        .arg("--config")
        .arg(&cfg_path)
        .arg("-F")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prosody (install the prosody package)");
    let p = Prosody {
        dir,
        child,
        c2s: ([127, 0, 0, 1], c2s_port).into(),
        component: ([127, 0, 0, 1], comp_port).into(),
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    for addr in [p.c2s, p.component] {
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "prosody did not start listening"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    p
}

struct TestClient {
    tx: tokio_xmpp::ClientSender,
    events: mpsc::UnboundedReceiver<Event>,
}

impl TestClient {
    fn new(addr: SocketAddr) -> Self {
        let c = Client::new_plaintext(
            jid::BareJid::new("alice@example.com").expect("jid"),
            "xmpp-secret".to_owned(),
            DnsConfig::addr(&addr.to_string()),
            Timeouts::tight(),
        );
        let (tx, mut rx) = c.split();
        let (etx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(ev) = rx.next().await {
                if etx.send(ev).is_err() {
                    break;
                }
            }
        });
        TestClient { tx, events }
    }

    async fn next_matching<T>(&mut self, mut f: impl FnMut(&Event) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("timed out waiting for an event")
                .expect("client ended");
            if let Some(v) = f(&ev) {
                return v;
            }
        }
    }

    async fn message(&mut self) -> Message {
        self.next_matching(|e| match e {
            Event::Stanza(Stanza::Message(m)) => Some(m.clone()),
            _ => None,
        })
        .await
    }

    async fn iq(&self, to: &str, req: IqRequest) -> Result<Option<Element>, Element> {
        let token = self
            .tx
            .send_iq(Some(jid::Jid::new(to).expect("jid")), req)
            .await;
        match tokio::time::timeout(WAIT, token)
            .await
            .expect("iq timed out")
            .expect("iq failed")
        {
            IqResponse::Result(p) => Ok(p),
            IqResponse::Error(e) => Err(Element::from(e)),
        }
    }
}

fn parse(xml: &str) -> Element {
    xml.parse().expect("test xml")
}

fn event(m: &Message) -> &Element {
    m.payloads
        .iter()
        .find(|p| p.is("event", "http://jabber.org/protocol/pubsub#event"))
        .expect("event payload")
}

#[tokio::test]
async fn component_face_through_prosody() {
    let prosody = start_prosody().await;
    let sim = Simulator::new(SimConfig::new("example.com").with_account(Account {
        jid: "alice@example.com".into(),
        sip_addresses: vec!["alice@acme.example".into(), "bob@acme.example".into()],
        web_password: "web-secret".into(),
        xmpp_password: "xmpp-secret".into(),
    }));
    let cancel = CancellationToken::new();
    let attach = tokio::spawn(attach_component(
        sim.clone(),
        prosody.component,
        SECRET.into(),
        cancel.clone(),
    ));
    assert!(
        sim.wait_until(WAIT, |s| s.components_connected()).await,
        "{:?}",
        sim.component_status()
    );

    let mut c = TestClient::new(prosody.c2s);
    let bound = c
        .next_matching(|e| match e {
            Event::Online { bound_jid, .. } => Some(bound_jid.to_string()),
            _ => None,
        })
        .await;
    c.tx.send_stanza(Presence::available().with_priority(1).into())
        .await
        .expect("presence");

    let auth = c
        .iq(
            AUTH,
            IqRequest::Set(parse(
                "<command xmlns='http://jabber.org/protocol/commands' node='authorize-plain' action='execute'>\
                 <x xmlns='jabber:x:data' type='submit'>\
                 <field var='sip-address'><value>alice@acme.example</value></field>\
                 <field var='password'><value>web-secret</value></field>\
                 <field var='auth-for-all'><value>1</value></field></x></command>",
            )),
        )
        .await
        .expect("authorize")
        .expect("payload");
    assert_eq!(auth.attr("status"), Some("completed"));
    // Prosody stamped the client's full JID; the sim authorized its bare JID.
    assert_eq!(sim.authorizations()[0].jid, "alice@example.com");

    let sub = c
        .iq(
            PUBSUB,
            IqRequest::Set(parse(&format!(
                "<pubsub xmlns='http://jabber.org/protocol/pubsub'><subscribe node='/me/alice@example.com' jid='{bound}'/>\
                 <options><x xmlns='jabber:x:data' type='submit'>\
                 <field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/pubsub#subscribe_options</value></field>\
                 <field var='pubsub#subscription_type'><value>items</value></field>\
                 <field var='pubsub#subscription_depth'><value>all</value></field></x></options></pubsub>"
            ))),
        )
        .await
        .expect("subscribe")
        .expect("payload");
    assert_eq!(
        sub.get_child("subscription", "http://jabber.org/protocol/pubsub")
            .and_then(|s| s.attr("subscription")),
        Some("pending")
    );
    let notice = c.message().await;
    assert_eq!(
        event(&notice)
            .get_child("subscription", "http://jabber.org/protocol/pubsub#event")
            .and_then(|s| s.attr("subscription")),
        Some("subscribed")
    );

    sim.register_phone(
        "bob@acme.example",
        "i1",
        "sip:bob@192.168.1.5:5060",
        "sip:203.0.113.9:5060",
        "Polycom/6.4.3 VVX-450",
        Utc::now() + chrono::Duration::minutes(10),
    );
    let ev = c.message().await;
    assert_eq!(
        ev.from.as_ref().map(|f| f.to_string()).as_deref(),
        Some(PUBSUB)
    );
    assert_eq!(
        event(&ev)
            .get_child("items", "http://jabber.org/protocol/pubsub#event")
            .and_then(|i| i.attr("node")),
        Some("/acme.example/bob")
    );

    // Links dropped: the sim reconnects to Prosody and serves again.
    let connects = sim.stats().component_connects;
    sim.drop_links();
    assert!(
        sim.wait_until(WAIT, |s| s.stats().component_connects >= connects + 2
            && s.components_connected())
            .await,
        "{:?}",
        sim.component_status()
    );
    let pong = c
        .iq(
            PUBSUB,
            IqRequest::Get(parse("<ping xmlns='urn:xmpp:ping'/>")),
        )
        .await;
    assert!(pong.is_ok(), "{pong:?}");
    assert!(sim.unregister_phone("bob@acme.example", "i1"));
    let ev = c.message().await;
    assert!(event(&ev)
        .get_child("items", "http://jabber.org/protocol/pubsub#event")
        .is_some_and(|i| i.has_child("retract", "http://jabber.org/protocol/pubsub#event")));

    // Unavailable: Prosody bounces bare-JID events back to the component.
    c.tx.send_stanza(Presence::unavailable().into())
        .await
        .expect("unavailable");
    // A round trip after the presence proves Prosody has processed it.
    let pong = c
        .iq(
            PUBSUB,
            IqRequest::Get(parse("<ping xmlns='urn:xmpp:ping'/>")),
        )
        .await;
    assert!(pong.is_ok(), "{pong:?}");
    let bounces = sim.stats().service.bounces;
    sim.register_phone(
        "bob@acme.example",
        "i2",
        "sip:bob@192.168.1.5:5060",
        "",
        "Polycom/6.4.3 VVX-450",
        Utc::now() + chrono::Duration::minutes(10),
    );
    assert!(
        sim.wait_until(WAIT, |s| s.stats().service.bounces > bounces)
            .await
    );

    cancel.cancel();
    tokio::time::timeout(WAIT, attach)
        .await
        .expect("attach stops")
        .expect("joins")
        .expect("ok");
    drop(prosody);
}
