//! Benchmarks of the hot paths: parsing a pubsub event, applying it to the
//! fleet state, and encoding `/metrics` for a large fleet; each beside the
//! same work done the naive way (`naive`: xmpp-parsers' typed event, the
//! tikv `prometheus` crate with a vec per metric).
//!
//! `cargo bench --bench hot_paths` runs the criterion benches, then a
//! summary measured in the same run: ours and naive interleaved round by
//! round (so machine noise hits both alike) with their ratio, how long a
//! scrape stalls ingestion, and memory. Figures go in BENCHMARKS.md.
//!
//! Profiling: `HOT_PATHS_PROFILE=<parse|apply|parse-apply|encode|snapshot>`
//! runs only that work in a loop, in `profile_target`, e.g.
//! `valgrind --tool=callgrind --toggle-collect='*profile_target*' <bench binary>`.

mod naive;

use std::hint::black_box;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, BatchSize, Criterion, Throughput};
use minidom::Element;
use onsip_ua_exporter::metrics::{encode_snapshot, BuildInfo, Format, Metrics};
use onsip_ua_exporter::stanza::{self, PubsubEvent, Registration, SipAddress};
use onsip_ua_exporter::state::{Fleet, Limits, State};

use naive::NaiveMetrics;

const EVENT: &str = r#"<event xmlns="http://jabber.org/protocol/pubsub#event">
<items node="/example.com/foo" >
<item id="4e536ee0246ccf0224154a9e72be7a9c" >
<user-agent xmlns="onsip:user-agents">
<contact>sip:foo@192.168.0.125:5060;rinstance=d6e716e0dcf01b1b</contact>
<received>sip:X.Y.W.Z:34873</received>
<device>SIP User Agent String</device>
<expires>2009-03-05T12:30:34-05:00</expires>
</user-agent>
</item>
</items>
</event>"#;

/// Addresses the event streams cycle over.
const STREAM_ADDRESSES: usize = 10_000;
/// The scrape benches' fleet: 100,000 addresses, 150,000 devices.
const FLEET_ADDRESSES: usize = 100_000;

const BUILD: BuildInfo = BuildInfo {
    version: "bench",
    revision: "bench",
};

/// A realistic stream as OnSIP sends it: over `STREAM_ADDRESSES`
/// addresses, each device registers, refreshes twice, then retracts; each
/// `<event/>` as its own element, as they arrive.
fn event_stream() -> Vec<Element> {
    let mut out = Vec::with_capacity(STREAM_ADDRESSES * 4);
    for round in 0..4 {
        for i in 0..STREAM_ADDRESSES {
            let node = format!("/domain{}.example.com/user{i}", i % 50);
            let xml = if round < 3 {
                format!(
                    r#"<event xmlns="http://jabber.org/protocol/pubsub#event"><items node="{node}"><item id="item-{i}"><user-agent xmlns="onsip:user-agents"><contact>sip:user{i}@192.0.2.{}:5060;rinstance=d6e716e0dcf01b1b</contact><received>sip:198.51.100.7:{}</received><device>Yealink SIP-T54W 96.86.0.{}</device><expires>2030-03-05T12:30:{:02}-05:00</expires></user-agent></item></items></event>"#,
                    i % 250,
                    1024 + i,
                    i % 7,
                    round * 10
                )
            } else {
                format!(
                    r#"<event xmlns="http://jabber.org/protocol/pubsub#event"><items node="{node}"><retract id="item-{i}"/></items></event>"#
                )
            };
            out.push(xml.parse().expect("event xml"));
        }
    }
    out
}

fn parsed_stream(elements: &[Element]) -> Vec<PubsubEvent> {
    let mut out = Vec::with_capacity(elements.len());
    for element in elements {
        stanza::parse_event(element, &mut out);
    }
    out
}

/// A fleet of `addresses` SIP addresses over 50 domains, 1.5 devices each.
pub fn fleet_state(addresses: usize) -> State {
    let mut state = State::new(Limits::default(), &["/me/bench@example.com".to_owned()]);
    let mut events = Vec::new();
    for i in 0..addresses {
        let address = SipAddress::new(
            &format!("user{i}"),
            &format!("domain{}.example.com", i % 50),
        );
        for d in 0..(1 + i % 2) {
            events.push(PubsubEvent::Publish {
                address: address.clone(),
                item_id: Arc::from(format!("{i}-{d}")),
                registration: Registration {
                    contact: format!("sip:user{i}@192.0.2.1:5060"),
                    received: "sip:198.51.100.7:34873".into(),
                    device: format!("Polycom/6.4.{} VVX-450", i % 9),
                    expires: Some(1_900_000_000 + i as i64),
                },
            });
        }
    }
    // Distinct, fractional change times, as live events leave them.
    for (n, event) in events.chunks(1000).enumerate() {
        state.apply_events(event, 1_800_000_000.0 + n as f64 * 0.001_237);
    }
    state
}

fn events(c: &mut Criterion) {
    let element: Element = EVENT.parse().expect("event xml");
    let stream = event_stream();
    let parsed = parsed_stream(&stream);
    let mut group = c.benchmark_group("events");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse", |b| {
        let mut out = Vec::with_capacity(4);
        b.iter(|| {
            out.clear();
            stanza::parse_event(&element, &mut out);
            out.len()
        })
    });
    group.bench_function("parse (naive: xmpp-parsers typed event)", |b| {
        let mut out = Vec::with_capacity(4);
        b.iter_batched(
            || element.clone(),
            |element| {
                out.clear();
                naive::parse(element, &mut out);
                out.len()
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("apply (register, refresh x2, retract)", |b| {
        let mut fleet = Fleet::new(Limits::default());
        let mut i = 0usize;
        b.iter(|| {
            let applied = fleet.apply(&parsed[i % parsed.len()], 1.0);
            i += 1;
            applied
        })
    });
    group.bench_function("apply (naive: + tikv vecs)", |b| {
        let mut fleet = Fleet::new(Limits::default());
        let naive = NaiveMetrics::new();
        let mut i = 0usize;
        b.iter(|| {
            let applied = naive.apply(&mut fleet, &parsed[i % parsed.len()], 1.0);
            i += 1;
            applied
        })
    });
    group.bench_function("parse and apply (stream)", |b| {
        let mut state = State::new(Limits::default(), &[]);
        let mut out = Vec::with_capacity(4);
        let mut i = 0usize;
        b.iter(|| {
            out.clear();
            stanza::parse_event(&stream[i % stream.len()], &mut out);
            i += 1;
            state.apply_events(&out, 1.0)
        })
    });
    group.finish();
}

fn scrape(c: &mut Criterion) {
    let mut group = c.benchmark_group("scrape");
    group.sample_size(10);
    let state = Arc::new(Mutex::new(fleet_state(FLEET_ADDRESSES)));
    let metrics = Metrics::new(state.clone(), true, BUILD);
    group.bench_function("encode 100k addresses (text)", |b| {
        b.iter(|| metrics.encode(Format::Text).map(|s| s.len()))
    });
    group.bench_function("encode 100k addresses (openmetrics)", |b| {
        b.iter(|| metrics.encode(Format::OpenMetrics).map(|s| s.len()))
    });
    group.bench_function("snapshot 100k addresses (lock held)", |b| {
        b.iter_batched(
            || (),
            |()| {
                let state = state.lock().expect("lock");
                state.fleet.snapshot(true)
            },
            // Dropping the copy is not part of the lock hold.
            BatchSize::LargeInput,
        )
    });
    {
        let state = state.lock().expect("lock");
        let snapshot = state.fleet.snapshot(true);
        let mut out = Vec::new();
        group.bench_function("encode only, from a snapshot (text)", |b| {
            b.iter(|| {
                out.clear();
                encode_snapshot(&mut out, Format::Text, &state.session, &snapshot, &BUILD);
                out.len()
            })
        });
    }
    let body = metrics.encode(Format::Text).expect("encodes");
    group.bench_function("gzip the 100k response (level 1)", |b| {
        b.iter(|| gzip(body.as_bytes()).len())
    });
    let naive = NaiveMetrics::new();
    naive.load(&state.lock().expect("lock").fleet);
    group.bench_function(
        "encode 100k addresses (naive: tikv gather + TextEncoder)",
        |b| b.iter(|| naive.encode().len()),
    );
    group.finish();
}

/// What `/metrics` does with `Accept-Encoding: gzip` (see `http.rs`).
fn gzip(body: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    encoder.write_all(body).expect("gzip");
    encoder.finish().expect("gzip")
}

/// Median seconds per operation of `ours` and `naive`, run alternately for
/// `rounds` rounds of `ops` operations each.
fn interleaved(
    rounds: usize,
    ops: usize,
    mut ours: impl FnMut(usize),
    mut naive: impl FnMut(usize),
) -> (f64, f64) {
    let mut a = Vec::with_capacity(rounds);
    let mut b = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        ours(ops);
        a.push(t.elapsed().as_secs_f64() / ops as f64);
        let t = Instant::now();
        naive(ops);
        b.push(t.elapsed().as_secs_f64() / ops as f64);
    }
    (median(&mut a), median(&mut b))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn human(seconds: f64) -> String {
    match seconds {
        s if s >= 1.0 => format!("{s:.2} s"),
        s if s >= 1e-3 => format!("{:.1} ms", s * 1e3),
        s if s >= 1e-6 => format!("{:.2} µs", s * 1e6),
        s => format!("{:.0} ns", s * 1e9),
    }
}

fn vm_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The same-run comparison table, ingestion stalls and memory.
fn summary(_: &mut Criterion) {
    // `cargo bench` passes --bench; `cargo test --benches` does not: then
    // only check that everything runs, with tiny counts.
    let full = std::env::args().any(|a| a == "--bench");
    let (rounds, fleet_size) = if full {
        (15, FLEET_ADDRESSES)
    } else {
        (1, 1_000)
    };
    let mut rows: Vec<(String, f64, f64)> = Vec::new();

    let element: Element = EVENT.parse().expect("event xml");
    let stream = event_stream();
    let parsed = parsed_stream(&stream);
    let mut out = Vec::with_capacity(4);
    let (ours, naive) = interleaved(
        rounds,
        20_000,
        |n| {
            for _ in 0..n {
                out.clear();
                stanza::parse_event(black_box(&element), &mut out);
            }
        },
        |n| {
            let mut out = Vec::with_capacity(4);
            for _ in 0..n {
                out.clear();
                // The clone is the stanza the typed parser consumes; it is
                // timed on the naive side only as a user would pay it too.
                naive::parse(black_box(&element).clone(), &mut out);
            }
        },
    );
    rows.push(("parse one event".into(), ours, naive));

    let (mut fleet_a, mut fleet_b) = (Fleet::new(Limits::default()), Fleet::new(Limits::default()));
    let naive_metrics = NaiveMetrics::new();
    let (mut i, mut j) = (0usize, 0usize);
    let (ours, naive) = interleaved(
        rounds,
        parsed.len(),
        |n| {
            for _ in 0..n {
                black_box(fleet_a.apply(&parsed[i % parsed.len()], 1.0));
                i += 1;
            }
        },
        |n| {
            for _ in 0..n {
                black_box(naive_metrics.apply(&mut fleet_b, &parsed[j % parsed.len()], 1.0));
                j += 1;
            }
        },
    );
    rows.push(("apply one event (stream)".into(), ours, naive));

    let mut state_a = State::new(Limits::default(), &[]);
    let mut fleet_c = Fleet::new(Limits::default());
    let naive_metrics = NaiveMetrics::new();
    let (mut i, mut j) = (0usize, 0usize);
    let (ours, naive) = interleaved(
        rounds,
        stream.len(),
        |n| {
            let mut out = Vec::with_capacity(4);
            for _ in 0..n {
                out.clear();
                stanza::parse_event(&stream[i % stream.len()], &mut out);
                black_box(state_a.apply_events(&out, 1.0));
                i += 1;
            }
        },
        |n| {
            let mut out = Vec::with_capacity(4);
            for _ in 0..n {
                out.clear();
                naive::parse(stream[j % stream.len()].clone(), &mut out);
                for event in &out {
                    black_box(naive_metrics.apply(&mut fleet_c, event, 1.0));
                }
                j += 1;
            }
        },
    );
    rows.push(("parse + apply one event (stream)".into(), ours, naive));

    let state = Arc::new(Mutex::new(fleet_state(fleet_size)));
    let rss_state = vm_rss_bytes();
    let metrics = Metrics::new(state.clone(), true, BUILD);
    let naive_metrics = NaiveMetrics::new();
    naive_metrics.load(&state.lock().expect("lock").fleet);
    let rss_naive = vm_rss_bytes();
    let mut sizes = (0, 0);
    let (ours, naive) = interleaved(
        rounds.min(9),
        1,
        |_| sizes.0 = metrics.encode(Format::Text).map_or(0, |s| s.len()),
        |_| sizes.1 = naive_metrics.encode().len(),
    );
    rows.push((format!("scrape {fleet_size} addresses (text)"), ours, naive));

    println!();
    println!("same-run comparison (median of {rounds} interleaved rounds)");
    println!("| work | ours | naive | naive / ours |\n|---|---:|---:|---:|");
    for (work, ours, naive) in &rows {
        println!(
            "| {work} | {} | {} | {:.1}x |",
            human(*ours),
            human(*naive),
            naive / ours
        );
    }
    let parse_apply = rows[2].1;
    println!(
        "parse + apply: {:.2} M events/s (target >= 1 M/s)",
        1e-6 / parse_apply
    );
    println!(
        "response size: ours {:.1} MB, naive {:.1} MB",
        sizes.0 as f64 / 1e6,
        sizes.1 as f64 / 1e6
    );
    // (The fleet's own size is measured end to end, on the exporter's
    // process: this process reuses memory freed by the criterion benches.)
    println!(
        "memory: the naive vecs add {:.0} MB of RSS on top of the fleet state",
        rss_naive.saturating_sub(rss_state) as f64 / 1e6
    );
    drop(naive_metrics);

    // Ingestion stall: one thread applies events (lock, apply one
    // message, unlock) while another scrapes back to back; the longest
    // lock wait of the applying thread is how long a scrape stalls
    // ingestion. Measured with no scrapes too, for the floor.
    let scrapes = if full { 20 } else { 2 };
    for scraping in [false, true] {
        let stop = Arc::new(AtomicBool::new(false));
        let scraper = {
            let stop = stop.clone();
            let metrics = Metrics::new(state.clone(), true, BUILD);
            std::thread::spawn(move || {
                let mut times = Vec::new();
                for _ in 0..scrapes {
                    if !scraping {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                    let t = Instant::now();
                    black_box(metrics.encode(Format::Text).map(|s| s.len()).unwrap_or(0));
                    times.push(t.elapsed().as_secs_f64());
                }
                stop.store(true, Ordering::Relaxed);
                times
            })
        };
        let mut waits = Vec::new();
        let mut k = 0usize;
        let mut out = Vec::with_capacity(4);
        while !stop.load(Ordering::Relaxed) {
            out.clear();
            stanza::parse_event(&stream[k % stream.len()], &mut out);
            k += 1;
            let t = Instant::now();
            let mut guard = state.lock().expect("lock");
            waits.push(t.elapsed().as_secs_f64());
            guard.apply_events(&out, 1.0);
            drop(guard);
            if waits.len() % 64 == 0 {
                // Like the pump between stanzas: let the other side in.
                std::thread::yield_now();
            }
        }
        let mut times = scraper.join().unwrap_or_default();
        waits.sort_by(f64::total_cmp);
        times.sort_by(f64::total_cmp);
        if scraping {
            println!(
                "scrape {fleet_size} addresses while ingesting: p50 {} p99 {} (n={})",
                human(percentile(&times, 0.5)),
                human(percentile(&times, 0.99)),
                times.len()
            );
        }
        println!(
            "ingestion lock wait {} scrapes: p99.9 {} max {} over {} events",
            if scraping { "during" } else { "without" },
            human(percentile(&waits, 0.999)),
            human(percentile(&waits, 1.0)),
            waits.len()
        );
    }
}

/// `HOT_PATHS_PROFILE`: run one piece of work in a loop for a profiler.
fn profile(what: &str) {
    match what {
        "parse" | "apply" | "parse-apply" => {
            let stream = event_stream();
            let parsed = parsed_stream(&stream);
            profile_target(|| match what {
                "parse" => {
                    let mut out = Vec::with_capacity(4);
                    for element in &stream {
                        out.clear();
                        stanza::parse_event(element, &mut out);
                    }
                }
                "apply" => {
                    let mut fleet = Fleet::new(Limits::default());
                    for event in &parsed {
                        black_box(fleet.apply(event, 1.0));
                    }
                }
                _ => {
                    let mut state = State::new(Limits::default(), &[]);
                    let mut out = Vec::with_capacity(4);
                    for element in &stream {
                        out.clear();
                        stanza::parse_event(element, &mut out);
                        black_box(state.apply_events(&out, 1.0));
                    }
                }
            });
        }
        "encode" | "snapshot" => {
            let state = Arc::new(Mutex::new(fleet_state(FLEET_ADDRESSES)));
            let metrics = Metrics::new(state.clone(), true, BUILD);
            profile_target(|| {
                if what == "encode" {
                    black_box(metrics.encode(Format::Text).map(|s| s.len()).unwrap_or(0));
                } else {
                    black_box(state.lock().expect("lock").fleet.snapshot(true));
                }
            });
        }
        other => eprintln!("HOT_PATHS_PROFILE: unknown {other:?}"),
    }
}

#[inline(never)]
fn profile_target(mut work: impl FnMut()) {
    let times: usize = std::env::var("HOT_PATHS_PROFILE_TIMES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    for _ in 0..times {
        work();
    }
}

criterion_group!(benches, events, scrape, summary);

fn main() {
    if let Ok(what) = std::env::var("HOT_PATHS_PROFILE") {
        profile(&what);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
