//! The real-time drivers: the demo fleet populates the simulator, and the
//! load mode publishes at its target rate with every event reaching a
//! subscribed c2s client.

use std::time::Duration;

use futures::StreamExt;
use onsip_sim::fleet::{Fleet, FleetSpec};
use onsip_sim::{run_fleet, run_load, serve_c2s, LoadSpec, SimConfig, Simulator};
use tokio_util::sync::CancellationToken;
use tokio_xmpp::connect::DnsConfig;
use tokio_xmpp::parsers::presence::Presence;
use tokio_xmpp::xmlstream::Timeouts;
use tokio_xmpp::{Client, Event, IqRequest, Stanza};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn demo_fleet_populates_the_simulator() {
    let now = chrono::Utc::now();
    let fleet = Fleet::new(FleetSpec::demo("example.com"), now);
    let mut cfg = SimConfig::new("example.com");
    cfg.accounts = fleet.accounts();
    let sim = Simulator::new(cfg);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run_fleet(
        sim.clone(),
        fleet,
        Duration::from_millis(20),
        cancel.clone(),
    ));
    assert!(
        sim.wait_until(WAIT, |s| !s.registrations().is_empty())
            .await
    );
    cancel.cancel();
    let fleet = tokio::time::timeout(WAIT, task)
        .await
        .expect("stops")
        .expect("joins");
    assert_eq!(fleet.addresses().len(), 18);
    assert!(sim.stats().service.published > 0);
}

#[tokio::test]
async fn load_mode_hits_its_rate_and_every_event_is_delivered() {
    let addresses: Vec<String> = (0..20).map(|i| format!("user{i}@load.example")).collect();
    let mut cfg = SimConfig::new("example.com");
    cfg.accounts.push(onsip_sim::Account {
        jid: "bench@example.com".into(),
        sip_addresses: addresses.clone(),
        web_password: "w".into(),
        xmpp_password: "x".into(),
    });
    let sim = Simulator::new(cfg);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let cancel = CancellationToken::new();
    let server = tokio::spawn(serve_c2s(sim.clone(), listener, cancel.clone()));

    let client = Client::new_plaintext(
        jid::BareJid::new("bench@example.com").expect("jid"),
        "x".to_owned(),
        DnsConfig::addr(&addr),
        Timeouts::tight(),
    );
    let (tx, mut rx) = client.split();
    let (etx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Some(ev) = rx.next().await {
            if etx.send(ev).is_err() {
                break;
            }
        }
    });
    let bound = loop {
        match tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("online")
            .expect("events")
        {
            Event::Online { bound_jid, .. } => break bound_jid.to_string(),
            _ => continue,
        }
    };
    tx.send_stanza(Presence::available().with_priority(1).into())
        .await
        .expect("presence");
    let iq = |xml: String| IqRequest::Set(xml.parse().expect("xml"));
    let auth = tx
        .send_iq(
            Some(jid::Jid::new("commands.auth.example.com").expect("jid")),
            iq("<command xmlns='http://jabber.org/protocol/commands' node='authorize-plain'><x xmlns='jabber:x:data' type='submit'>\
                <field var='sip-address'><value>user0@load.example</value></field><field var='password'><value>w</value></field>\
                <field var='auth-for-all'><value>true</value></field></x></command>"
                .into()),
        )
        .await;
    tokio::time::timeout(WAIT, auth)
        .await
        .expect("auth")
        .expect("auth ok");
    let sub = tx
        .send_iq(
            Some(jid::Jid::new("pubsub.user-agents.example.com").expect("jid")),
            iq(format!(
                "<pubsub xmlns='http://jabber.org/protocol/pubsub'><subscribe node='/me/bench@example.com' jid='{bound}'/>\
                 <options><x xmlns='jabber:x:data' type='submit'><field var='pubsub#subscription_depth'><value>all</value></field></x></options></pubsub>"
            )),
        )
        .await;
    tokio::time::timeout(WAIT, sub)
        .await
        .expect("sub")
        .expect("sub ok");
    assert!(
        sim.wait_until(WAIT, |s| s.sessions().iter().any(|x| x.available))
            .await
    );

    let report = run_load(
        &sim,
        LoadSpec {
            addresses,
            devices_per_address: 2,
            events_per_second: 2000,
            churn: 0.2,
            duration: Duration::from_millis(500),
            seed: 3,
            max_queued: 1000,
        },
        cancel.child_token(),
    )
    .await;
    assert!(report.events > 200 && report.events <= 1001, "{report:?}");
    assert_eq!(report.published + report.retracted, report.events);
    assert_eq!(
        report.delivered, report.events,
        "one subscription: one message per event"
    );
    assert_eq!(report.undeliverable, 0);

    // Every event reaches the client (the subscribed notice came earlier).
    let mut got = 0u64;
    while got < report.events {
        match tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("event")
            .expect("events")
        {
            Event::Stanza(Stanza::Message(m))
                if m.payloads
                    .iter()
                    .any(|p| p.has_child("items", "http://jabber.org/protocol/pubsub#event")) =>
            {
                got += 1
            }
            _ => {}
        }
    }
    assert!(sim.wait_until(WAIT, |s| s.queued() == 0).await);

    cancel.cancel();
    tokio::time::timeout(WAIT, server)
        .await
        .expect("stops")
        .expect("joins")
        .expect("ok");
    reader.abort();
}
