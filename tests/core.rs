//! The exporter end to end against a real Prosody (STARTTLS + SCRAM, a test
//! CA) with the OnSIP simulator attached as an XEP-0114 component: login,
//! authorize, subscribe, phones registering, refreshing and going offline,
//! a wrong password, clean unsubscribe on shutdown, and a real scrape that
//! `promtool check metrics` accepts.

mod common;

use chrono::Utc;
use common::exporter::{self, scrape, wait_metric};
use common::wait::{eventually, find_binary};
use common::world::{series, world, ADDRESSES, DEADLINE, XMPP_PASSWORD};

fn alice(series_name: &str) -> String {
    series(series_name, ADDRESSES[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phones_come_and_go_on_metrics() {
    let world = world().await;
    let running = world.exporter(world.flags(), XMPP_PASSWORD).await;
    let addr = running.addr;

    wait_metric(addr, "onsip_up", 1.0, DEADLINE).await;
    let m = scrape(addr).await;
    assert_eq!(m.get("onsip_xmpp_connected"), Some(&1.0));
    assert_eq!(m.get("onsip_authorized_addresses"), Some(&2.0));
    let node = format!("/me/{}", world.prosody.jid("exporter"));
    assert_eq!(
        m.get(&format!(
            "onsip_subscription_state{{node=\"{node}\",state=\"subscribed\"}}"
        )),
        Some(&1.0)
    );
    // Authorized addresses are exported with 0 devices before any phone.
    assert_eq!(m.get(&alice("onsip_user_agent_devices")), Some(&0.0));
    assert_eq!(
        m.get("onsip_user_agent_devices{domain=\"acme.example\",user=\"bob\"}"),
        Some(&0.0)
    );
    // Logged in with SCRAM over TLS, not PLAIN.
    let log = world.prosody.log();
    assert!(
        log.contains("SCRAM-SHA-1") || log.contains("SCRAM-SHA-256"),
        "no SCRAM in Prosody's log:\n{log}"
    );

    let expires = Utc::now() + chrono::Duration::hours(1);
    world.sim.register_phone(
        "alice@acme.example",
        "item-1",
        "sip:alice@192.0.2.10:5060",
        "sip:198.51.100.1:34873",
        "Yealink SIP-T54W 96.86.0.70",
        expires,
    );
    wait_metric(addr, &alice("onsip_user_agent_devices"), 1.0, DEADLINE).await;
    let m = scrape(addr).await;
    assert_eq!(
        m.get(&alice("onsip_user_agent_registrations_total")),
        Some(&1.0)
    );
    assert_eq!(
        m.get(&alice(
            "onsip_user_agent_registration_expiry_timestamp_seconds"
        )),
        Some(&(expires.timestamp() as f64))
    );
    assert_eq!(
        m.get("onsip_domain_addresses_online{domain=\"acme.example\"}"),
        Some(&1.0)
    );
    assert_eq!(
        m.get("onsip_domain_devices_by_user_agent{domain=\"acme.example\",device=\"Yealink SIP-T54W 96.86.0.70\"}"),
        Some(&1.0)
    );

    // The same item again is a refresh, not a second device.
    world.sim.register_phone(
        "alice@acme.example",
        "item-1",
        "sip:alice@192.0.2.10:5060",
        "sip:198.51.100.1:34873",
        "Yealink SIP-T54W 96.86.0.70",
        expires,
    );
    wait_metric(
        addr,
        &alice("onsip_user_agent_refreshes_total"),
        1.0,
        DEADLINE,
    )
    .await;
    assert_eq!(
        scrape(addr).await.get(&alice("onsip_user_agent_devices")),
        Some(&1.0)
    );

    // A second phone, then both go offline.
    world.sim.register_phone(
        "alice@acme.example",
        "item-2",
        "sip:alice@192.0.2.11:5060",
        "sip:198.51.100.1:34874",
        "Polycom/6.4.3 VVX-450",
        expires,
    );
    wait_metric(addr, &alice("onsip_user_agent_devices"), 2.0, DEADLINE).await;
    assert!(world.sim.unregister_phone("alice@acme.example", "item-1"));
    assert!(world.sim.unregister_phone("alice@acme.example", "item-2"));
    wait_metric(addr, &alice("onsip_user_agent_devices"), 0.0, DEADLINE).await;
    let m = scrape(addr).await;
    assert_eq!(m.get(&alice("onsip_user_agent_retracts_total")), Some(&2.0));
    assert_eq!(
        m.get(&alice("onsip_user_agent_registrations_total")),
        Some(&2.0)
    );
    assert_eq!(
        m.get("onsip_pubsub_events_total{kind=\"retract\"}"),
        Some(&2.0)
    );
    assert_eq!(
        m.get("onsip_pubsub_events_total{kind=\"malformed\"}"),
        Some(&0.0)
    );
    assert_eq!(m.get("onsip_up"), Some(&1.0));

    // Exactly one subscription of ours at the service; none after shutdown.
    assert_eq!(world.our_subscriptions(), 1);
    running.stop().await;
    assert_eq!(world.our_subscriptions(), 0, "unsubscribed on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_visible_and_not_fatal() {
    let world = world().await;
    let running = world.exporter(world.flags(), "not-the-password").await;
    let addr = running.addr;
    eventually(DEADLINE, "auth errors rise past 2", || async move {
        let m = scrape(addr).await;
        (m.get("onsip_xmpp_errors_total{kind=\"auth\"}")
            .copied()
            .unwrap_or(0.0)
            >= 2.0)
            .then_some(m)
    })
    .await;
    let m = scrape(addr).await;
    assert_eq!(m.get("onsip_up"), Some(&0.0));
    assert_eq!(m.get("onsip_xmpp_connected"), Some(&0.0));
    let (status, page) = exporter::http_get(addr, "/").await;
    assert_eq!(status, 200);
    assert!(
        page.contains("auth:"),
        "status page names the failure:\n{page}"
    );
    assert!(
        !page.contains("not-the-password"),
        "the password leaked onto the page"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_a_real_scrape() {
    let world = world().await;
    let running = world.exporter(world.flags(), XMPP_PASSWORD).await;
    wait_metric(running.addr, "onsip_up", 1.0, DEADLINE).await;
    world.sim.register_phone(
        "bob@acme.example",
        "x",
        "sip:bob@192.0.2.2",
        "sip:198.51.100.2:5060",
        "Cisco/SPA504G-7.6.2f",
        Utc::now() + chrono::Duration::hours(1),
    );
    wait_metric(
        running.addr,
        "onsip_user_agent_devices{domain=\"acme.example\",user=\"bob\"}",
        1.0,
        DEADLINE,
    )
    .await;
    let (_, body) = exporter::http_get(running.addr, "/metrics").await;
    let promtool = find_binary("PROMTOOL_BIN", "promtool");
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write scrape");
    let out = child.wait_with_output().expect("promtool output");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_xep0060_direct_subscribed_reply() {
    // A generic XEP-0060 service answers `subscribed` in the iq result, with
    // no notice message after it.
    let world = common::world::world_with(|c| c.direct_subscribed = true).await;
    let running = world.exporter(world.flags(), XMPP_PASSWORD).await;
    wait_metric(running.addr, "onsip_up", 1.0, DEADLINE).await;
    let m = scrape(running.addr).await;
    assert_eq!(
        m.get("onsip_pubsub_events_total{kind=\"subscription\"}"),
        Some(&0.0)
    );
    world.sim.register_phone(
        ADDRESSES[1],
        "b",
        "sip:bob@192.0.2.3",
        "sip:198.51.100.3:5060",
        "Fanvil X4U 2.12.14",
        Utc::now() + chrono::Duration::hours(1),
    );
    wait_metric(
        running.addr,
        &series("onsip_user_agent_devices", ADDRESSES[1]),
        1.0,
        DEADLINE,
    )
    .await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_node_is_followed() {
    // Subscribing to "/" is redirected to "/me/<jid>" with an XEP-0060
    // redirect error; the exporter follows it and keeps the configured name.
    let world = common::world::world_with(|c| c.redirect = onsip_sim::RedirectStyle::Error).await;
    let flags = onsip_ua_exporter::config::Flags {
        nodes: vec!["/".into()],
        ..world.flags()
    };
    let running = world.exporter(flags, XMPP_PASSWORD).await;
    wait_metric(
        running.addr,
        "onsip_subscription_state{node=\"/\",state=\"subscribed\"}",
        1.0,
        DEADLINE,
    )
    .await;
    let subs = world.sim.subscriptions();
    assert_eq!(subs.len(), 1);
    assert_eq!(
        subs[0].node,
        format!("/me/{}", world.prosody.jid("exporter"))
    );
    world.sim.register_phone(
        ADDRESSES[0],
        "a",
        "sip:alice@192.0.2.3",
        "sip:198.51.100.3:5060",
        "Fanvil X4U 2.12.14",
        Utc::now() + chrono::Duration::hours(1),
    );
    wait_metric(
        running.addr,
        &alice("onsip_user_agent_devices"),
        1.0,
        DEADLINE,
    )
    .await;
    running.stop().await;
    assert_eq!(
        world.our_subscriptions(),
        0,
        "unsubscribed from the redirected node"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_exports_only_the_addresses_its_nodes_cover() {
    // Subscribed to alice's leaf node only: bob is authorized too, but a
    // shard must not export (and page on) zeros for addresses it does not watch.
    let world = common::world::world().await;
    let flags = onsip_ua_exporter::config::Flags {
        nodes: vec!["/acme.example/alice".into()],
        ..world.flags()
    };
    let running = world.exporter(flags, XMPP_PASSWORD).await;
    wait_metric(running.addr, "onsip_up", 1.0, DEADLINE).await;
    let m = scrape(running.addr).await;
    assert_eq!(m.get(&alice("onsip_user_agent_devices")), Some(&0.0));
    assert_eq!(
        m.get(&series("onsip_user_agent_devices", ADDRESSES[1])),
        None
    );
    assert_eq!(m.get("onsip_authorized_addresses"), Some(&2.0));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_login() {
    // XEP-0368: TLS from the first byte on Prosody's direct-TLS port.
    let port = common::wait::free_port();
    let world = common::world::world_with_prosody(
        |b| b.global_config(&format!("c2s_direct_tls_ports = {{ {port} }}\nc2s_direct_tls_interfaces = {{ \"127.0.0.1\" }}\n")),
        |_| {},
    )
    .await;
    let flags = onsip_ua_exporter::config::Flags {
        server: Some(format!("127.0.0.1:{port}")),
        direct_tls: true,
        ..world.flags()
    };
    let running = world.exporter(flags, XMPP_PASSWORD).await;
    wait_metric(running.addr, "onsip_up", 1.0, DEADLINE).await;
    let log = world.prosody.log();
    assert!(
        log.contains("SCRAM-SHA-1") || log.contains("SCRAM-SHA-256"),
        "no SCRAM in Prosody's log"
    );
    running.stop().await;
}
