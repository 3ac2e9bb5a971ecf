//! The shipped dashboards and alert rules against a real Prometheus that
//! scrapes the real exporter, fed by the simulator through a real Prosody:
//! every dashboard query returns data, every rule evaluates, and the
//! offline alert goes pending for the phone the test unregisters — and only
//! for it.

mod common;

use std::time::Duration;

use chrono::Utc;
use common::exporter::wait_metric;
use common::prometheus::Prometheus;
use common::promql::{queries_and_rules_problems, query_returns_data, write_shortened_rules, JOB};
use common::wait::eventually_blocking;
use common::world::{series, world, ADDRESSES, DEADLINE, XMPP_PASSWORD};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_and_alerts_against_the_live_exporter() {
    let world = world().await;
    let running = world.exporter(world.flags(), XMPP_PASSWORD).await;
    let addr = running.addr;
    wait_metric(addr, "onsip_up", 1.0, DEADLINE).await;
    let in_an_hour = Utc::now() + chrono::Duration::hours(1);
    for (address, id, ua) in [
        (ADDRESSES[0], "a1", "Yealink SIP-T54W 96.86.0.70"),
        (ADDRESSES[1], "b1", "Polycom/6.4.3 VVX-450"),
    ] {
        world.sim.register_phone(
            address,
            id,
            "sip:phone@192.0.2.10:5060",
            "sip:198.51.100.1:5060",
            ua,
            in_an_hour,
        );
    }
    wait_metric(
        addr,
        &series("onsip_user_agent_devices", ADDRESSES[1]),
        1.0,
        DEADLINE,
    )
    .await;
    wait_metric(
        addr,
        &series("onsip_user_agent_devices", ADDRESSES[0]),
        1.0,
        DEADLINE,
    )
    .await;

    let sim = world.sim.clone();
    // Prometheus' API is blocking: run that half on a blocking thread so the
    // exporter keeps its runtime workers.
    tokio::task::spawn_blocking(move || {
        let rules = tempfile::tempdir().expect("tempdir");
        let mut builder = Prometheus::builder()
            .scrape(JOB, addr, "/metrics")
            .scrape_interval(Duration::from_secs(1))
            .evaluation_interval(Duration::from_secs(1));
        for file in write_shortened_rules(rules.path()) {
            builder = builder.rule_file(file);
        }
        let prom = builder.start();
        let url = prom.url().to_string();
        prom.wait_for_scrape(Duration::from_secs(60));
        // alice's phone seen online by Prometheus, with a few samples for rate().
        eventually_blocking(
            Duration::from_secs(60),
            "several scrapes with alice online",
            || {
                query_returns_data(
                    &url,
                    "count_over_time(onsip_user_agent_devices{user=\"alice\"}[1m]) >= 4",
                )
                .ok()
                .filter(|ok| *ok)
            },
        );

        // alice goes offline.
        assert!(sim.unregister_phone(ADDRESSES[0], "a1"));
        eventually_blocking(
            Duration::from_secs(30),
            "Prometheus sees alice at 0",
            || {
                query_returns_data(&url, "onsip_user_agent_devices{user=\"alice\"} == 0")
                    .ok()
                    .filter(|ok| *ok)
            },
        );

        // The fleet and exporter dashboards as opened, and the address
        // dashboard for bob (alice has no device, so her expiry panel is
        // rightly empty); every rule expression.
        let problems = queries_and_rules_problems(&url, &addr.to_string(), "acme.example", "bob");
        assert!(
            problems.is_empty(),
            "against the live exporter:\n{}",
            problems.join("\n")
        );

        // The offline alert goes pending (or fires) for alice, and only her.
        let offline = eventually_blocking(
            Duration::from_secs(30),
            "OnsipAddressOffline for alice",
            || {
                let alerts = prom.api().alerts();
                let offline: Vec<(String, String)> = alerts
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|a| a["labels"]["alertname"] == "OnsipAddressOffline")
                    .map(|a| {
                        (
                            a["labels"]["user"].as_str().unwrap_or("?").to_owned(),
                            a["state"].as_str().unwrap_or("?").to_owned(),
                        )
                    })
                    .collect();
                offline
                    .iter()
                    .any(|(user, _)| user == "alice")
                    .then_some(offline)
            },
        );
        assert!(
            offline.iter().all(|(user, _)| user == "alice"),
            "only alice is offline: {offline:?}"
        );
        // No exporter-health alert on a healthy exporter.
        for alert in prom.api().alerts().as_array().into_iter().flatten() {
            let name = alert["labels"]["alertname"].as_str().unwrap_or_default();
            assert_eq!(name, "OnsipAddressOffline", "unexpected alert: {alert}");
        }
    })
    .await
    .expect("Prometheus checks");
    running.stop().await;
}
