//! `onsip-ua-exporter demo`: the built-in OnSIP simulator (its in-process
//! XMPP face, so no XMPP server is needed) with a fleet of phones that come,
//! refresh and go, and the exporter logged into it — `/metrics` shows live
//! phones without an OnSIP account.

use std::process::ExitCode;
use std::time::Duration;

use onsip_sim::fleet::{Fleet, FleetSpec};
use onsip_sim::{SimConfig, Simulator};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::app;
use crate::config::{
    Config, DemoArgs, Environment, FileConfig, Flags, LogFormat, AUTH_PASSWORD_ENV, PASSWORD_ENV,
};

/// The XMPP domain the simulator plays.
const DEMO_DOMAIN: &str = "demo.onsip.test";

/// Supplies the demo account's passwords as if they came from the environment.
struct DemoEnv {
    xmpp_password: String,
    web_password: String,
}

impl Environment for DemoEnv {
    fn var(&self, name: &str) -> Option<String> {
        match name {
            PASSWORD_ENV => Some(self.xmpp_password.clone()),
            AUTH_PASSWORD_ENV => Some(self.web_password.clone()),
            _ => None,
        }
    }
}

/// Runs the demo until SIGINT/SIGTERM.
pub async fn run(args: DemoArgs, stop: impl std::future::Future<Output = ()>) -> ExitCode {
    crate::telemetry::init("info", LogFormat::Logfmt);
    let spec = FleetSpec {
        users_per_domain: args.phones.max(1),
        ..FleetSpec::demo(DEMO_DOMAIN)
    };
    let fleet = Fleet::new(spec.clone(), chrono::Utc::now());
    // The account authorizes with one of its SIP addresses and, with
    // auth-for-all, gets every address of the fleet.
    let sip_address = fleet.addresses().first().cloned();
    let mut sim_config = SimConfig::new(DEMO_DOMAIN);
    sim_config.accounts = fleet.accounts();
    let sim = Simulator::new(sim_config.clone());

    let cancel = CancellationToken::new();
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("demo: cannot listen on loopback for the simulator: {err}");
            return ExitCode::FAILURE;
        }
    };
    let xmpp_addr = match listener.local_addr() {
        Ok(addr) => addr,
        Err(err) => {
            eprintln!("demo: {err}");
            return ExitCode::FAILURE;
        }
    };
    let c2s = tokio::spawn(onsip_sim::serve_c2s(sim.clone(), listener, cancel.clone()));
    let players = tokio::spawn(onsip_sim::run_fleet(
        sim.clone(),
        fleet,
        Duration::from_millis(250),
        cancel.clone(),
    ));

    let flags = Flags {
        listen_address: Some(args.listen_address.to_string()),
        jid: Some(spec.owner_jid.clone()),
        server: Some(xmpp_addr.to_string()),
        plaintext: true,
        auth_jid: Some(sim_config.auth_jid.clone()),
        pubsub_jid: Some(sim_config.pubsub_jid.clone()),
        sip_address,
        keepalive: Some(Duration::from_secs(30)),
        ..Flags::default()
    };
    let config = match Config::resolve(
        &flags,
        &FileConfig::default(),
        &DemoEnv {
            xmpp_password: spec.xmpp_password.clone(),
            web_password: spec.web_password.clone(),
        },
    ) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("demo: {err}");
            return ExitCode::FAILURE;
        }
    };
    let exporter = match app::start(config, cancel.clone()).await {
        Ok(exporter) => exporter,
        Err(err) => {
            eprintln!("demo: cannot start the exporter: {err}");
            return ExitCode::FAILURE;
        }
    };
    let addr = exporter.local_addr;
    info!(simulator = %xmpp_addr, "OnSIP simulator serving XMPP");
    println!();
    println!(
        "onsip-ua-exporter demo: {} SIP domains of simulated phones.",
        spec.domains.len()
    );
    println!("  metrics:     http://{addr}/metrics");
    println!("  status page: http://{addr}/");
    println!("Press Ctrl-C to stop.");
    println!();
    stop.await;
    cancel.cancel();
    exporter.stopped().await;
    let _ = players.await;
    let _ = c2s.await;
    ExitCode::SUCCESS
}
