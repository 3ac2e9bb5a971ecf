//! Faults the exporter must survive, each against a real Prosody with the
//! simulator attached: a server restart, a link that goes silent, OnSIP
//! answering `none`, refusing the password or not answering, a registration
//! that expires without a retract, an exporter restart with a state file.

mod common;

use std::time::Duration;

use chrono::Utc;
use common::exporter::{scrape, wait_metric};
use common::proxy::SilentProxy;
use common::wait::eventually;
use common::world::{series, world, world_with, ADDRESSES, DEADLINE, XMPP_PASSWORD};
use onsip_sim::{AuthorizeAnswer, SubscribeAnswer};
use onsip_ua_exporter::config::Flags;

fn register(world: &common::world::World, address: &str, id: &str, expires: chrono::DateTime<Utc>) {
    world.sim.register_phone(
        address,
        id,
        "sip:phone@192.0.2.10:5060",
        "sip:198.51.100.1:5060",
        "Yealink SIP-T54W 96.86.0.70",
        expires,
    );
}

/// Registers a phone for an hour and waits until `/metrics` shows it.
async fn phone_online(
    world: &common::world::World,
    addr: std::net::SocketAddr,
    address: &str,
    id: &str,
) {
    register(world, address, id, Utc::now() + chrono::Duration::hours(1));
    wait_metric(
        addr,
        &series("onsip_user_agent_devices", address),
        1.0,
        DEADLINE,
    )
    .await;
}

/// Waits until `series` is at least `min`.
async fn wait_at_least(addr: std::net::SocketAddr, series: &str, min: f64) -> f64 {
    eventually(DEADLINE, &format!("{series} >= {min}"), || async move {
        let value = scrape(addr).await.get(series).copied().unwrap_or(0.0);
        (value >= min).then_some(value)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prosody_restart_reconnects_renews_and_resyncs() {
    let mut world = world().await;
    let running = world.exporter(world.flags(), XMPP_PASSWORD).await;
    let addr = running.addr;
    wait_metric(addr, "onsip_up", 1.0, DEADLINE).await;
    let alice = series("onsip_user_agent_devices", ADDRESSES[0]);
    let bob = series("onsip_user_agent_devices", ADDRESSES[1]);
    register(
        &world,
        ADDRESSES[0],
        "a1",
        Utc::now() + chrono::Duration::hours(1),
    );
    wait_metric(addr, &alice, 1.0, DEADLINE).await;

    world.prosody.stop();
    wait_metric(addr, "onsip_xmpp_connected", 0.0, DEADLINE).await;
    assert_eq!(scrape(addr).await.get("onsip_up"), Some(&0.0));
    // A phone registers while the link is down: its event is lost.
    register(
        &world,
        ADDRESSES[1],
        "b1",
        Utc::now() + chrono::Duration::hours(1),
    );
    world.prosody.start_again();
    world.wait_components().await;

    wait_metric(addr, "onsip_up", 1.0, DEADLINE).await;
    let m = scrape(addr).await;
    assert_eq!(m.get("onsip_xmpp_connects_total"), Some(&2.0));
    assert!(
        m.get("onsip_xmpp_errors_total{kind=\"connect\"}")
            .copied()
            .unwrap_or(0.0)
            >= 1.0
            || m.get("onsip_xmpp_errors_total{kind=\"stream\"}")
                .copied()
                .unwrap_or(0.0)
                >= 1.0
    );
    // Items retrieval after re-subscribing brought the missed phone in.
    wait_metric(addr, &bob, 1.0, DEADLINE).await;
    assert_eq!(scrape(addr).await.get(&alice), Some(&1.0));
    // The old subscription was renewed, not piled up.
    assert_eq!(world.our_subscriptions(), 1);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_link_is_detected_and_replaced() {
    let world = world().await;
    let proxy = SilentProxy::start(world.prosody.c2s_addr()).await;
    let flags = Flags {
        server: Some(proxy.addr.to_string()),
        keepalive: Some(Duration::from_millis(800)),
        timeout: Some(Duration::from_millis(800)),
        ..world.flags()
    };
    let running = world.exporter(flags, XMPP_PASSWORD).await;
    let addr = running.addr;
    wait_metric(addr, "onsip_up", 1.0, DEADLINE).await;
    let started = std::time::Instant::now();
    proxy.freeze_current();
    wait_at_least(addr, "onsip_xmpp_errors_total{kind=\"timeout\"}", 1.0).await;
    let detected = started.elapsed();
    // Keepalive (0.8 s of silence) + response timeout (0.8 s), plus slack.
    assert!(
        detected < Duration::from_secs(6),
        "took {detected:?} to notice the silent link"
    );
    wait_metric(addr, "onsip_xmpp_connects_total", 2.0, DEADLINE).await;
    wait_metric(addr, "onsip_up", 1.0, DEADLINE).await;
    // Events flow on the new link.
    phone_online(&world, addr, ADDRESSES[1], "b1").await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_none_is_visible_and_recovers() {
    let world = world().await;
    world.sim.set_subscribe_answer(SubscribeAnswer::None);
    let running = world.exporter(world.flags(), XMPP_PASSWORD).await;
    let addr = running.addr;
    let node = format!("/me/{}", world.prosody.jid("exporter"));
    wait_metric(
        addr,
        &format!("onsip_subscription_state{{node=\"{node}\",state=\"none\"}}"),
        1.0,
        DEADLINE,
    )
    .await;
    // Retried with backoff: the error count keeps rising.
    wait_at_least(addr, "onsip_xmpp_errors_total{kind=\"subscribe\"}", 2.0).await;
    assert_eq!(scrape(addr).await.get("onsip_up"), Some(&0.0));
    world.sim.set_subscribe_answer(SubscribeAnswer::Normal);
    wait_metric(addr, "onsip_up", 1.0, DEADLINE).await;
    assert_eq!(world.our_subscriptions(), 1);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_unanswered_authorization_recover() {
    let world = world().await;
    world
        .sim
        .set_authorize_answer(AuthorizeAnswer::WrongPassword);
    let running = world.exporter(world.flags(), XMPP_PASSWORD).await;
    let addr = running.addr;
    wait_at_least(addr, "onsip_xmpp_errors_total{kind=\"authorize\"}", 2.0).await;
    let m = scrape(addr).await;
    assert_eq!(m.get("onsip_up"), Some(&0.0));
    assert_eq!(
        m.get("onsip_xmpp_connected"),
        Some(&1.0),
        "the XMPP link itself stays up"
    );
    world.sim.set_authorize_answer(AuthorizeAnswer::Silent);
    wait_at_least(addr, "onsip_xmpp_errors_total{kind=\"timeout\"}", 1.0).await;
    world.sim.set_authorize_answer(AuthorizeAnswer::Normal);
    wait_metric(addr, "onsip_up", 1.0, DEADLINE).await;
    assert_eq!(
        scrape(addr).await.get("onsip_authorized_addresses"),
        Some(&2.0)
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_expiring_without_retract_is_dropped() {
    let world = world().await;
    let flags = Flags {
        expiry_grace: Some(Duration::from_secs(1)),
        ..world.flags()
    };
    let running = world.exporter(flags, XMPP_PASSWORD).await;
    let addr = running.addr;
    wait_metric(addr, "onsip_up", 1.0, DEADLINE).await;
    let expires = Utc::now() + chrono::Duration::seconds(2);
    register(&world, ADDRESSES[0], "stale", expires);
    register(
        &world,
        ADDRESSES[0],
        "fresh",
        Utc::now() + chrono::Duration::hours(1),
    );
    let devices = series("onsip_user_agent_devices", ADDRESSES[0]);
    wait_metric(addr, &devices, 2.0, DEADLINE).await;
    wait_metric(
        addr,
        &series("onsip_user_agent_expirations_total", ADDRESSES[0]),
        1.0,
        DEADLINE,
    )
    .await;
    // Not before expiry + grace.
    assert!(
        Utc::now() >= expires + chrono::Duration::seconds(1),
        "dropped before expiry + grace"
    );
    let m = scrape(addr).await;
    assert_eq!(m.get(&devices), Some(&1.0));
    assert_eq!(
        m.get(&series("onsip_user_agent_retracts_total", ADDRESSES[0])),
        Some(&0.0)
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_state_file_keeps_phones_and_drops_expired() {
    // Items retrieval off: after the restart only the state file can know.
    let world = world_with(|c| c.items_retrieval = false).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.json");
    let flags = Flags {
        state_file: Some(path.clone()),
        expiry_grace: Some(Duration::from_secs(1)),
        ..world.flags()
    };
    let first = world.exporter(flags.clone(), XMPP_PASSWORD).await;
    wait_metric(first.addr, "onsip_up", 1.0, DEADLINE).await;
    let short = Utc::now() + chrono::Duration::seconds(2);
    register(
        &world,
        ADDRESSES[0],
        "long",
        Utc::now() + chrono::Duration::hours(1),
    );
    register(&world, ADDRESSES[1], "short", short);
    wait_metric(
        first.addr,
        &series("onsip_user_agent_devices", ADDRESSES[1]),
        1.0,
        DEADLINE,
    )
    .await;
    first.stop().await;
    assert!(path.is_file(), "state written on shutdown");

    // Down until the short registration is past expiry + grace.
    let past = short + chrono::Duration::seconds(2);
    eventually(DEADLINE, "short registration expired", || async move {
        (Utc::now() > past).then_some(())
    })
    .await;
    let second = world.exporter(flags, XMPP_PASSWORD).await;
    // Known at once, before the session is even up.
    let m = scrape(second.addr).await;
    assert_eq!(
        m.get(&series("onsip_user_agent_devices", ADDRESSES[0])),
        Some(&1.0)
    );
    assert_eq!(
        m.get(&series("onsip_user_agent_devices", ADDRESSES[1])),
        Some(&0.0)
    );
    wait_metric(second.addr, "onsip_up", 1.0, DEADLINE).await;
    assert_eq!(
        scrape(second.addr)
            .await
            .get("onsip_state_resync_from_items"),
        Some(&0.0)
    );
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_state_file_is_moved_aside_not_fatal() {
    let world = world().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.json");
    std::fs::write(&path, "{ not json").expect("write corrupt file");
    let flags = Flags {
        state_file: Some(path.clone()),
        ..world.flags()
    };
    let running = world.exporter(flags, XMPP_PASSWORD).await;
    wait_metric(running.addr, "onsip_up", 1.0, DEADLINE).await;
    let (_, status) = common::exporter::http_get(running.addr, "/api/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    let story = status["state_file"].as_str().unwrap_or_default().to_owned();
    assert!(
        story.starts_with("not loaded ("),
        "status page says: {story}"
    );
    let aside = dir.path().join("state.json.corrupt");
    assert_eq!(
        std::fs::read_to_string(&aside).expect("kept aside"),
        "{ not json"
    );
    running.stop().await;
    assert!(path.is_file(), "a good state was written at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_authorization_is_renewed_with_the_subscription() {
    // Authorizations that last 4 s: re-authorized at half-life, the
    // subscription renewed (same subid, later expiry), events keep flowing.
    let world = world_with(|c| c.auth_ttl = Duration::from_secs(4)).await;
    let running = world.exporter(world.flags(), XMPP_PASSWORD).await;
    let addr = running.addr;
    wait_metric(addr, "onsip_up", 1.0, DEADLINE).await;
    let first = world.sim.subscriptions();
    assert_eq!(first.len(), 1);
    let first_expiry = first[0].expires.expect("subscription has an expiry");
    let sim = world.sim.clone();
    let subid = first[0].subid.clone();
    let renewed = eventually(DEADLINE, "subscription renewed with a later expiry", || {
        let subs = sim.subscriptions();
        async move {
            match subs.as_slice() {
                [s] if s.expires.is_some_and(|e| e > first_expiry) => Some(s.clone()),
                _ => None,
            }
        }
    })
    .await;
    assert_eq!(renewed.subid, subid, "renewed in place, not re-subscribed");
    // Past the first authorization's lifetime, events still arrive.
    let past = first_expiry + chrono::Duration::seconds(1);
    eventually(DEADLINE, "first authorization lapsed", || async move {
        (Utc::now() > past).then_some(())
    })
    .await;
    phone_online(&world, addr, ADDRESSES[0], "late").await;
    let m = scrape(addr).await;
    assert_eq!(m.get("onsip_up"), Some(&1.0));
    assert_eq!(m.get("onsip_xmpp_connects_total"), Some(&1.0));
    assert!(
        m.get("onsip_authorization_expiry_timestamp_seconds")
            .copied()
            .unwrap_or(0.0)
            > first_expiry.timestamp() as f64
    );
    assert_eq!(world.our_subscriptions(), 1);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_unsubscribes_writes_state_and_exits_zero() {
    let world = world().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state.json");
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, format!("{XMPP_PASSWORD}\n")).expect("password file");
    let port = common::wait::free_port();
    let flags = world.flags();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_onsip-ua-exporter"))
        .args([
            "--web.listen-address",
            &format!("127.0.0.1:{port}"),
            "--xmpp.jid",
            flags.jid.as_deref().expect("jid"),
            "--xmpp.password-file",
            password_file.to_str().expect("utf-8 path"),
            "--xmpp.server",
            flags.server.as_deref().expect("server"),
            "--xmpp.ca-file",
            world.prosody.ca_cert_path().to_str().expect("utf-8 path"),
            "--onsip.auth-jid",
            flags.auth_jid.as_deref().expect("auth jid"),
            "--onsip.pubsub-jid",
            flags.pubsub_jid.as_deref().expect("pubsub jid"),
            "--onsip.sip-address",
            ADDRESSES[0],
            "--state.file",
            state.to_str().expect("utf-8 path"),
        ])
        .env("ONSIP_AUTH_PASSWORD", common::world::WEB_PASSWORD)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the exporter binary");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    eventually(DEADLINE, "binary serving with onsip_up 1", || async move {
        if !common::wait::port_accepts(addr) {
            return None;
        }
        (scrape(addr).await.get("onsip_up") == Some(&1.0)).then_some(())
    })
    .await;
    phone_online(&world, addr, ADDRESSES[0], "p1").await;
    assert_eq!(world.our_subscriptions(), 1);

    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(status.success());
    let exit = common::wait::eventually_blocking(DEADLINE, "exporter exits after SIGTERM", || {
        child.try_wait().ok().flatten()
    });
    let mut stderr = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert!(exit.success(), "exit status {exit:?}\n{stderr}");
    assert_eq!(
        world.our_subscriptions(),
        0,
        "unsubscribed before exit\n{stderr}"
    );
    let saved = std::fs::read_to_string(&state).expect("state file written");
    assert!(saved.contains("\"id\":\"p1\""), "{saved}");
    assert!(!stderr.contains(XMPP_PASSWORD) && !stderr.contains(common::world::WEB_PASSWORD));
}
