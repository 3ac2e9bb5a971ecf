//! The in-process c2s face against a real tokio-xmpp 6 client: log in with
//! SASL PLAIN, bind, send presence, authorize, subscribe, receive the
//! `subscribed` notice, a publish and a retract; pings; presence rules;
//! wrong passwords; `drop_links` and the client's reconnect.

use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use minidom::Element;
use onsip_sim::{serve_c2s, Account, SimConfig, Simulator};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_xmpp::connect::DnsConfig;
use tokio_xmpp::parsers::message::Message;
use tokio_xmpp::parsers::presence::Presence;
use tokio_xmpp::xmlstream::Timeouts;
use tokio_xmpp::{Client, Event, IqRequest, IqResponse, Stanza};

const WAIT: Duration = Duration::from_secs(10);
const PUBSUB: &str = "pubsub.user-agents.example.com";
const AUTH: &str = "commands.auth.example.com";

fn config() -> SimConfig {
    SimConfig::new("example.com").with_account(Account {
        jid: "alice@example.com".into(),
        sip_addresses: vec!["alice@acme.example".into(), "bob@acme.example".into()],
        web_password: "web-secret".into(),
        xmpp_password: "xmpp-secret".into(),
    })
}

struct Harness {
    sim: Simulator,
    addr: String,
    cancel: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

async fn start() -> Harness {
    let sim = Simulator::new(config());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let cancel = CancellationToken::new();
    let server = {
        let (sim, cancel) = (sim.clone(), cancel.clone());
        tokio::spawn(async move {
            serve_c2s(sim, listener, cancel).await.expect("c2s server");
        })
    };
    Harness {
        sim,
        addr,
        cancel,
        server,
    }
}

/// A client whose events are drained into a channel by a task, so that the
/// client's 16-deep event queue never stalls its worker.
struct TestClient {
    tx: tokio_xmpp::ClientSender,
    events: mpsc::UnboundedReceiver<Event>,
    reader: tokio::task::JoinHandle<()>,
}

fn client(addr: &str, jid: &str, password: &str) -> TestClient {
    let c = Client::new_plaintext(
        jid::BareJid::new(jid).expect("jid"),
        password.to_owned(),
        DnsConfig::addr(addr),
        Timeouts::tight(),
    );
    let (tx, mut rx) = c.split();
    let (etx, events) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Some(ev) = rx.next().await {
            if etx.send(ev).is_err() {
                break;
            }
        }
    });
    TestClient { tx, events, reader }
}

impl TestClient {
    async fn next_matching<T>(&mut self, mut f: impl FnMut(&Event) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("timed out waiting for an event")
                .expect("client event stream ended");
            if let Some(v) = f(&ev) {
                return v;
            }
        }
    }

    async fn online(&mut self) -> String {
        self.next_matching(|e| match e {
            Event::Online { bound_jid, .. } => Some(bound_jid.to_string()),
            _ => None,
        })
        .await
    }

    async fn message(&mut self) -> Message {
        self.next_matching(|e| match e {
            Event::Stanza(Stanza::Message(m)) => Some(m.clone()),
            _ => None,
        })
        .await
    }

    async fn iq(&self, to: Option<&str>, req: IqRequest) -> Result<Option<Element>, Element> {
        let to = to.map(|t| jid::Jid::new(t).expect("to jid"));
        let token = self.tx.send_iq(to, req).await;
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

fn event_child(m: &Message) -> &Element {
    m.payloads
        .iter()
        .find(|p| p.is("event", "http://jabber.org/protocol/pubsub#event"))
        .expect("pubsub event payload")
}

#[tokio::test]
async fn client_logs_in_subscribes_and_receives_events() {
    let h = start().await;
    let mut c = client(&h.addr, "alice@example.com", "xmpp-secret");
    let bound = c.online().await;
    assert!(bound.starts_with("alice@example.com/"), "{bound}");

    // Server ping.
    let pong = c
        .iq(None, IqRequest::Get(parse("<ping xmlns='urn:xmpp:ping'/>")))
        .await;
    assert!(pong.is_ok(), "{pong:?}");
    // Unknown request to the server.
    let err = c
        .iq(
            None,
            IqRequest::Get(parse("<query xmlns='jabber:iq:version'/>")),
        )
        .await
        .expect_err("service-unavailable");
    assert!(
        err.has_child("service-unavailable", "urn:ietf:params:xml:ns:xmpp-stanzas"),
        "{err:?}"
    );

    // Available presence with a positive priority, so bare-JID events reach us.
    c.tx.send_stanza(Presence::available().with_priority(1).into())
        .await
        .expect("presence");
    assert!(
        h.sim
            .wait_until(WAIT, |s| s
                .sessions()
                .iter()
                .any(|x| x.available && x.priority == 1))
            .await
    );

    // Authorize.
    let auth = c
        .iq(
            Some(AUTH),
            IqRequest::Set(parse(
                "<command xmlns='http://jabber.org/protocol/commands' node='authorize-plain' action='execute'>\
                 <x xmlns='jabber:x:data' type='submit'>\
                 <field var='sip-address'><value>alice@acme.example</value></field>\
                 <field var='password'><value>web-secret</value></field>\
                 <field var='auth-for-all'><value>true</value></field></x></command>",
            )),
        )
        .await
        .expect("authorize result")
        .expect("command payload");
    assert_eq!(auth.attr("status"), Some("completed"));
    assert_eq!(h.sim.authorizations().len(), 2);

    // Subscribe with the full JID: pending, then the subscribed notice.
    let sub = c
        .iq(
            Some(PUBSUB),
            IqRequest::Set(parse(&format!(
                "<pubsub xmlns='http://jabber.org/protocol/pubsub'>\
                 <subscribe node='/me/alice@example.com' jid='{bound}'/>\
                 <options><x xmlns='jabber:x:data' type='submit'>\
                 <field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/pubsub#subscribe_options</value></field>\
                 <field var='pubsub#subscription_type'><value>items</value></field>\
                 <field var='pubsub#subscription_depth'><value>all</value></field>\
                 </x></options></pubsub>"
            ))),
        )
        .await
        .expect("subscribe result")
        .expect("pubsub payload");
    let state = sub
        .get_child("subscription", "http://jabber.org/protocol/pubsub")
        .and_then(|s| s.attr("subscription"))
        .map(str::to_owned);
    assert_eq!(state.as_deref(), Some("pending"));
    let notice = c.message().await;
    assert_eq!(
        notice.from.as_ref().map(|f| f.to_string()).as_deref(),
        Some(PUBSUB)
    );
    assert_eq!(
        notice.to.as_ref().map(|f| f.to_string()).as_deref(),
        Some("alice@example.com")
    );
    let s = event_child(&notice)
        .get_child("subscription", "http://jabber.org/protocol/pubsub#event")
        .expect("subscription");
    assert_eq!(s.attr("subscription"), Some("subscribed"));

    // A phone registers: the seed-shaped event arrives.
    let expires = Utc::now() + chrono::Duration::minutes(30);
    h.sim.register_phone(
        "bob@acme.example",
        "item-1",
        "sip:bob@192.168.1.20:5060",
        "sip:203.0.113.7:40000",
        "Yealink SIP-T54W 96.86.0.70",
        expires,
    );
    let ev = c.message().await;
    let items = event_child(&ev)
        .get_child("items", "http://jabber.org/protocol/pubsub#event")
        .expect("items");
    assert_eq!(items.attr("node"), Some("/acme.example/bob"));
    let ua = items
        .get_child("item", "http://jabber.org/protocol/pubsub#event")
        .and_then(|i| i.get_child("user-agent", "onsip:user-agents"))
        .expect("user-agent");
    assert_eq!(
        ua.get_child("device", "onsip:user-agents")
            .map(|d| d.text())
            .as_deref(),
        Some("Yealink SIP-T54W 96.86.0.70")
    );

    // And goes away: the retract arrives.
    assert!(h.sim.unregister_phone("bob@acme.example", "item-1"));
    let ev = c.message().await;
    let retract = event_child(&ev)
        .get_child("items", "http://jabber.org/protocol/pubsub#event")
        .and_then(|i| i.get_child("retract", "http://jabber.org/protocol/pubsub#event"))
        .expect("retract");
    assert_eq!(retract.attr("id"), Some("item-1"));

    // List our subscription.
    let list = c
        .iq(
            Some(PUBSUB),
            IqRequest::Get(parse(
                "<pubsub xmlns='http://jabber.org/protocol/pubsub'><subscriptions node='/me/alice@example.com'/></pubsub>",
            )),
        )
        .await
        .expect("list")
        .expect("payload");
    let subs = list
        .get_child("subscriptions", "http://jabber.org/protocol/pubsub")
        .expect("subscriptions");
    assert_eq!(subs.children().count(), 1);

    // drop_links: the session goes, the client reconnects by itself.
    let logins = h.sim.stats().c2s_logins;
    h.sim.drop_links();
    let again = c.online().await;
    assert!(again.starts_with("alice@example.com/"));
    assert!(h.sim.stats().c2s_logins > logins);

    h.cancel.cancel();
    tokio::time::timeout(WAIT, h.server)
        .await
        .expect("server stops")
        .expect("server task");
    c.reader.abort();
}

#[tokio::test]
async fn bare_jid_stanzas_need_available_presence() {
    let h = start().await;
    let mut c = client(&h.addr, "alice@example.com", "xmpp-secret");
    c.online().await;
    assert!(h.sim.wait_until(WAIT, |s| s.sessions().len() == 1).await);
    let before = h.sim.stats();
    // A bare-JID message while the resource has sent no presence: undeliverable.
    h.sim.handle_stanza(&parse(&format!(
        "<iq xmlns='jabber:client' type='set' id='x' from='alice@example.com/none' to='{AUTH}'>\
         <command xmlns='http://jabber.org/protocol/commands' node='authorize-plain'>\
         <x xmlns='jabber:x:data' type='submit'>\
         <field var='sip-address'><value>alice@acme.example</value></field>\
         <field var='password'><value>web-secret</value></field></x></command></iq>"
    )));
    // The reply went to a full JID with no session: undeliverable too.
    let after = h.sim.stats();
    assert_eq!(after.undeliverable, before.undeliverable + 1);

    // Negative priority: still not delivered to the bare JID.
    c.tx.send_stanza(Presence::available().with_priority(-1).into())
        .await
        .expect("presence");
    assert!(
        h.sim
            .wait_until(WAIT, |s| s.sessions().iter().any(|x| x.priority == -1))
            .await
    );
    let before = h.sim.stats();
    h.sim.handle_stanza(&parse(&format!(
        "<iq xmlns='jabber:client' type='set' id='s' from='alice@example.com/none' to='{PUBSUB}'>\
         <pubsub xmlns='http://jabber.org/protocol/pubsub'><subscribe node='/acme.example/alice' jid='alice@example.com/none'/></pubsub></iq>"
    )));
    // Result to the absent full JID + subscribed notice to the bare JID: both undeliverable.
    assert_eq!(h.sim.stats().undeliverable, before.undeliverable + 2);

    // Priority 0 counts as available.
    c.tx.send_stanza(Presence::available().with_priority(0).into())
        .await
        .expect("presence");
    assert!(
        h.sim
            .wait_until(WAIT, |s| s
                .sessions()
                .iter()
                .any(|x| x.priority == 0 && x.available))
            .await
    );
    h.sim.register_phone(
        "alice@acme.example",
        "i1",
        "sip:alice@10.0.0.2",
        "",
        "Polycom/6.4.3 VVX-450",
        Utc::now() + chrono::Duration::minutes(5),
    );
    let ev = c.message().await;
    assert!(event_child(&ev).has_child("items", "http://jabber.org/protocol/pubsub#event"));

    h.cancel.cancel();
    tokio::time::timeout(WAIT, h.server)
        .await
        .expect("server stops")
        .expect("server task");
    c.reader.abort();
}

#[tokio::test]
async fn wrong_password_is_refused() {
    let h = start().await;
    let c = client(&h.addr, "alice@example.com", "not-the-password");
    assert!(
        h.sim
            .wait_until(WAIT, |s| s.stats().c2s_auth_failures >= 1)
            .await
    );
    assert!(h.sim.sessions().is_empty());
    c.reader.abort();
    h.cancel.cancel();
    tokio::time::timeout(WAIT, h.server)
        .await
        .expect("server stops")
        .expect("server task");
}
