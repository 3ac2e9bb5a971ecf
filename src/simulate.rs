//! `onsip-ua-exporter simulate`: the built-in OnSIP simulator's in-process
//! XMPP face on a given address, with a fleet of a given size and a load
//! mode, for benchmarks against a separately started exporter (see
//! `scripts/bench-fleet.sh`).
//!
//! It prints the XMPP address, the account JID and passwords to give the
//! exporter, waits for the exporter to subscribe, then runs the load given
//! by the `--load.*` flags and prints its figures:
//! 1. `--load.phones N`: N phones register (a new item each), at most as
//!    fast as the link drains; they stay online;
//! 2. `--load.rate`/`--load.churn`/`--load.duration`: random phones
//!    register, refresh and (with probability churn) go away, at that rate
//!    (`0`: as fast as the link drains), with back-pressure;
//! 3. with `--probe.metrics-url`, during the load, a probe phone in its own
//!    SIP domain comes and goes every `--probe.interval`, and the time until
//!    `/metrics` shows it (`onsip_domain_devices{domain="probe.sim.test"}`)
//!    is measured: the latency from OnSIP publishing to a scrape showing it.
//!
//! With `--sim.commands`, it then reads more loads from standard input, one
//! a line, written as the same `--load.*`/`--probe.*` flags (an empty line
//! or `quit` ends), each answered by its figures and a `done` line: one
//! exporter can be measured through several phases. It serves until
//! interrupted.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use chrono::Utc;
use clap::{Args, Parser};
use onsip_sim::fleet::USER_AGENTS;
use onsip_sim::{Account, LoadSpec, Registration, SimConfig, Simulator, SubscriptionState};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::config::SimulateArgs;

/// The XMPP domain the simulator plays.
pub const XMPP_DOMAIN: &str = "sim.onsip.test";
/// The SIP domain of the latency probe's phone (nothing else is in it).
pub const PROBE_DOMAIN: &str = "probe.sim.test";
const ACCOUNT: &str = "bench";
const XMPP_PASSWORD: &str = "sim-xmpp-password";
const WEB_PASSWORD: &str = "sim-web-password";

/// One load: what `--load.*` and `--probe.*` ask for.
#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Phones to register first (new items, spread over the addresses); they stay online.
    #[arg(long = "load.phones", default_value_t = 0)]
    pub phones: usize,
    /// Events per second of the random load; 0 publishes as fast as the link drains.
    #[arg(long = "load.rate", default_value_t = 1000)]
    pub rate: u32,
    /// Probability that an event on an online phone of the random load is its retract.
    #[arg(long = "load.churn", default_value_t = 0.1)]
    pub churn: f64,
    /// How long the random load runs (0s: none).
    #[arg(long = "load.duration", default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Phone slots per address of the random load (its phones are not the --load.phones ones).
    #[arg(long = "load.devices-per-address", default_value_t = 1)]
    pub devices_per_address: usize,
    /// Seed of the random load.
    #[arg(long = "load.seed", default_value_t = 1)]
    pub seed: u64,
    /// Back-pressure: pause while more stanzas than this wait to be written.
    #[arg(long = "load.max-queued", default_value_t = 10_000)]
    pub max_queued: usize,
    /// The exporter's metrics URL (http://host:port/path): measure how long
    /// until a published event shows there, during the random load.
    #[arg(long = "probe.metrics-url")]
    pub probe_url: Option<String>,
    /// Time between two probe events.
    #[arg(long = "probe.interval", default_value = "50ms", value_parser = humantime::parse_duration)]
    pub probe_interval: Duration,
}

/// A load line read from standard input.
#[derive(Parser, Debug)]
#[command(name = "load", no_binary_name = true)]
struct LoadLine {
    #[command(flatten)]
    load: LoadArgs,
}

/// The fleet: `user<i>@domain<i % domains>.sim.test`, plus the probe's address.
fn fleet_addresses(addresses: usize, domains: usize) -> Vec<String> {
    let domains = domains.max(1);
    (0..addresses)
        .map(|i| format!("user{i}@domain{}.sim.test", i % domains))
        .collect()
}

fn probe_address() -> String {
    format!("probe@{PROBE_DOMAIN}")
}

/// Runs the simulator until `stop` resolves.
pub async fn run(args: SimulateArgs, stop: impl std::future::Future<Output = ()>) -> ExitCode {
    crate::telemetry::init(&args.log_level, crate::config::LogFormat::Logfmt);
    let addresses = fleet_addresses(args.addresses, args.domains);
    let jid = format!("{ACCOUNT}@{XMPP_DOMAIN}");
    let mut owned = addresses.clone();
    owned.push(probe_address());
    let mut config = SimConfig::new(XMPP_DOMAIN);
    config.accounts = vec![Account {
        jid: jid.clone(),
        sip_addresses: owned,
        web_password: WEB_PASSWORD.to_owned(),
        xmpp_password: XMPP_PASSWORD.to_owned(),
    }];
    // 12 h: no re-authorization in the middle of a measurement.
    config.auth_ttl = Duration::from_secs(12 * 3600);
    let sim = Simulator::new(config.clone());
    let listener = match tokio::net::TcpListener::bind(args.listen_address).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!(
                "simulate: --sim.listen-address: cannot listen on {}: {err}",
                args.listen_address
            );
            return ExitCode::FAILURE;
        }
    };
    let xmpp_addr = listener.local_addr().unwrap_or(args.listen_address);
    let cancel = CancellationToken::new();
    let c2s = tokio::spawn(onsip_sim::serve_c2s(sim.clone(), listener, cancel.clone()));
    print_banner(&args, xmpp_addr, &jid, &config, addresses.first());

    let work = async {
        if !wait_for_subscriber(&sim, args.wait).await {
            say(&format!(
                "no exporter subscribed within {}; serving without load",
                humantime::format_duration(args.wait)
            ));
            return;
        }
        say("exporter subscribed");
        run_load(&sim, &addresses, &args.load).await;
        say("done");
        if args.commands {
            commands(&sim, &addresses).await;
        }
    };
    tokio::pin!(work);
    let stop = async {
        stop.await;
    };
    tokio::pin!(stop);
    tokio::select! {
        () = &mut work => stop.await,
        () = &mut stop => {}
    }
    cancel.cancel();
    let _ = c2s.await;
    ExitCode::SUCCESS
}

fn say(line: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn print_banner(
    args: &SimulateArgs,
    xmpp: SocketAddr,
    jid: &str,
    config: &SimConfig,
    sip_address: Option<&String>,
) {
    let sip_address = sip_address.cloned().unwrap_or_else(probe_address);
    say(&format!(
        "onsip-ua-exporter simulate: {} SIP addresses in {} domains (+ {} for the latency probe)",
        args.addresses,
        args.domains.max(1),
        probe_address()
    ));
    say(&format!("xmpp_address: {xmpp}"));
    say(&format!("jid: {jid}"));
    say(&format!("xmpp_password: {XMPP_PASSWORD}"));
    say(&format!("auth_password: {WEB_PASSWORD}"));
    say(&format!("auth_jid: {}", config.auth_jid));
    say(&format!("pubsub_jid: {}", config.pubsub_jid));
    say(&format!("sip_address: {sip_address}"));
    say(&format!(
        "exporter: ONSIP_XMPP_PASSWORD={XMPP_PASSWORD} ONSIP_AUTH_PASSWORD={WEB_PASSWORD} \
         onsip-ua-exporter --xmpp.jid {jid} --xmpp.server {xmpp} \
         --xmpp.insecure-plaintext-for-tests --onsip.auth-jid {} --onsip.pubsub-jid {} \
         --onsip.sip-address {sip_address}",
        config.auth_jid, config.pubsub_jid
    ));
}

async fn wait_for_subscriber(sim: &Simulator, wait: Duration) -> bool {
    sim.wait_until(wait, |s| {
        s.subscriptions()
            .iter()
            .any(|sub| sub.state == SubscriptionState::Subscribed)
    })
    .await
}

/// Reads load lines from standard input until it ends, `quit` or an empty line.
async fn commands(sim: &Simulator, addresses: &[String]) {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let line = line.trim();
        if line.is_empty() || line == "quit" {
            return;
        }
        match LoadLine::try_parse_from(line.split_whitespace()) {
            Ok(parsed) => run_load(sim, addresses, &parsed.load).await,
            Err(err) => say(&format!("error: {}", err.to_string().trim())),
        }
        say("done");
    }
}

/// Runs one load and prints its figures.
async fn run_load(sim: &Simulator, addresses: &[String], load: &LoadArgs) {
    if load.phones > 0 {
        preload(sim, addresses, load.phones, load.max_queued).await;
    }
    if load.duration.is_zero() {
        return;
    }
    let spec = LoadSpec {
        addresses: addresses.to_vec(),
        devices_per_address: load.devices_per_address.max(1),
        events_per_second: load.rate,
        churn: load.churn,
        duration: load.duration,
        seed: load.seed,
        max_queued: load.max_queued.max(2),
    };
    let cancel = CancellationToken::new();
    let probe = load.probe_url.as_deref().map(|url| {
        let sim = sim.clone();
        let url = url.to_owned();
        let interval = load.probe_interval;
        let cancel = cancel.clone();
        tokio::spawn(async move { probe(&sim, &url, interval, cancel).await })
    });
    let report = onsip_sim::run_load(sim, spec, CancellationToken::new()).await;
    cancel.cancel();
    say(&format!(
        "load: {} events ({} publishes, {} retracts) in {:.2} s: {:.0} events/s (asked {}/s, churn {})",
        report.events,
        report.published,
        report.retracted,
        report.elapsed.as_secs_f64(),
        report.events_per_second,
        load.rate,
        load.churn
    ));
    say(&format!(
        "load: {} stanzas delivered, {} undeliverable, {} back-pressure pauses, at most {} queued",
        report.delivered, report.undeliverable, report.backpressure_waits, report.max_queued
    ));
    let mut json = serde_json::json!({
        "events": report.events,
        "published": report.published,
        "retracted": report.retracted,
        "delivered": report.delivered,
        "undeliverable": report.undeliverable,
        "elapsed_s": report.elapsed.as_secs_f64(),
        "events_per_second": report.events_per_second,
        "backpressure_waits": report.backpressure_waits,
        "max_queued": report.max_queued,
    });
    if let Some(probe) = probe {
        match probe.await {
            Ok(Ok(mut samples)) if !samples.is_empty() => {
                samples.sort_by(f64::total_cmp);
                let p = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
                say(&format!(
                    "probe: event to /metrics latency p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms (n={})",
                    p(0.5) * 1e3,
                    p(0.9) * 1e3,
                    p(0.99) * 1e3,
                    p(1.0) * 1e3,
                    samples.len()
                ));
                json["latency_ms"] = serde_json::json!({
                    "p50": p(0.5) * 1e3, "p90": p(0.9) * 1e3, "p99": p(0.99) * 1e3,
                    "max": p(1.0) * 1e3, "n": samples.len(),
                });
            }
            Ok(Ok(_)) => say("probe: no sample"),
            Ok(Err(err)) => say(&format!("probe: failed: {err}")),
            Err(err) => say(&format!("probe: failed: {err}")),
        }
    }
    say(&format!("json: {json}"));
}

/// Registers `phones` phones, `phones / addresses` (rounded up) on the
/// first addresses, pausing while the link lags.
async fn preload(sim: &Simulator, addresses: &[String], phones: usize, max_queued: usize) {
    if addresses.is_empty() {
        return;
    }
    let start = Instant::now();
    let expires = Utc::now() + chrono::Duration::hours(12);
    let max_queued = max_queued.max(2);
    let mut waits = 0u64;
    for k in 0..phones {
        if k % 256 == 0 {
            if sim.queued() > max_queued {
                waits += 1;
                sim.wait_queue_below(max_queued / 2, Duration::from_secs(60))
                    .await;
            }
            tokio::task::yield_now().await;
        }
        let (i, slot) = (k % addresses.len(), k / addresses.len());
        let address = &addresses[i];
        let user = address.split('@').next().unwrap_or_default();
        sim.publish(
            address,
            Registration {
                item_id: format!("phone-{i}-{slot}"),
                contact: format!(
                    "sip:{user}@10.{}.{}.{}:5060",
                    i >> 16 & 255,
                    i >> 8 & 255,
                    i & 255
                ),
                received: format!("sip:198.51.100.{}:{}", i % 250, 5060 + slot),
                device: USER_AGENTS[i % USER_AGENTS.len()].to_owned(),
                expires,
            },
        );
    }
    let elapsed = start.elapsed().as_secs_f64();
    say(&format!(
        "preload: {phones} phones registered in {elapsed:.2} s ({:.0}/s, {waits} back-pressure pauses)",
        phones as f64 / elapsed.max(1e-9)
    ));
}

/// Publishes a probe phone (then its retract) every `interval` and polls
/// `url` until the exporter shows the change; returns the latencies in
/// seconds.
async fn probe(
    sim: &Simulator,
    url: &str,
    interval: Duration,
    cancel: CancellationToken,
) -> Result<Vec<f64>, String> {
    let target = HttpTarget::parse(url)?;
    let address = probe_address();
    let line = |online: bool| {
        format!(
            "onsip_domain_devices{{domain=\"{PROBE_DOMAIN}\"}} {}",
            u8::from(online)
        )
    };
    let mut samples = Vec::new();
    let mut online = false;
    let mut n = 0u64;
    while !cancel.is_cancelled() {
        n += 1;
        let item_id = format!("probe-{n}");
        let started = Instant::now();
        online = !online;
        if online {
            sim.publish(
                &address,
                Registration {
                    item_id: "probe".into(),
                    contact: format!("sip:probe@192.0.2.1:5060;n={item_id}"),
                    received: "sip:192.0.2.1:5060".into(),
                    device: "latency probe".into(),
                    expires: Utc::now() + chrono::Duration::hours(1),
                },
            );
        } else {
            sim.unregister_phone(&address, "probe");
        }
        let want = line(online);
        let deadline = started + Duration::from_secs(10);
        loop {
            let body = target.get().await?;
            if body.lines().any(|l| l == want) {
                samples.push(started.elapsed().as_secs_f64());
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("the probe event did not show within 10 s ({want})"));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::select! {
            () = cancel.cancelled() => {}
            () = tokio::time::sleep(interval.saturating_sub(started.elapsed())) => {}
        }
    }
    Ok(samples)
}

/// A plain-HTTP GET target (`http://host:port/path`), read with a tiny
/// HTTP/1.1 client: the exporter has no HTTP client dependency.
struct HttpTarget {
    addr: String,
    path: String,
}

impl HttpTarget {
    fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("--probe.metrics-url: {url:?} is not an http:// URL"))?;
        let (addr, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/metrics"),
        };
        Ok(Self {
            addr: addr.to_owned(),
            path: path.to_owned(),
        })
    }

    /// The body of a 200 answer.
    async fn get(&self) -> Result<String, String> {
        let fail = |e: std::io::Error| format!("GET http://{}{}: {e}", self.addr, self.path);
        let mut tcp = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(fail)?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.path, self.addr
        );
        tcp.write_all(request.as_bytes()).await.map_err(fail)?;
        let mut response = Vec::new();
        tcp.read_to_end(&mut response).await.map_err(fail)?;
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("GET {}: no HTTP header", self.path))?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(format!(
                "GET {}: {}",
                self.path,
                head.lines().next().unwrap_or("")
            ));
        }
        Ok(body.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_lines_parse_like_flags() {
        let line = LoadLine::try_parse_from(
            "--load.rate 0 --load.duration 20s --probe.metrics-url http://127.0.0.1:1/metrics"
                .split_whitespace(),
        )
        .expect("parses");
        assert_eq!(line.load.rate, 0);
        assert_eq!(line.load.duration, Duration::from_secs(20));
        assert_eq!(line.load.phones, 0);
        assert!(LoadLine::try_parse_from(["--load.bogus"]).is_err());
    }

    #[test]
    fn urls_and_addresses() {
        let t = HttpTarget::parse("http://127.0.0.1:9847/metrics").expect("url");
        assert_eq!(
            (t.addr.as_str(), t.path.as_str()),
            ("127.0.0.1:9847", "/metrics")
        );
        assert!(HttpTarget::parse("https://x/metrics").is_err());
        assert_eq!(
            fleet_addresses(3, 2),
            [
                "user0@domain0.sim.test",
                "user1@domain1.sim.test",
                "user2@domain0.sim.test"
            ]
        );
    }
}
