//! Benchmarks of the three hot paths: parsing a pubsub event, applying it to
//! the fleet state, and encoding `/metrics` for a large fleet.
//! Run with `cargo bench --bench hot_paths`; figures go in BENCHMARKS.md.

use std::sync::{Arc, Mutex};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use minidom::Element;
use onsip_ua_exporter::metrics::{BuildInfo, Format, Metrics};
use onsip_ua_exporter::stanza::{self, PubsubEvent, Registration, SipAddress};
use onsip_ua_exporter::state::{Fleet, Limits, State};

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

fn parse_and_apply(c: &mut Criterion) {
    let event: Element = EVENT.parse().expect("event xml");
    let mut group = c.benchmark_group("events");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse", |b| {
        let mut out = Vec::with_capacity(4);
        b.iter(|| {
            out.clear();
            stanza::parse_event(&event, &mut out);
            out.len()
        })
    });
    // 10,000 addresses, publishes and retracts cycling over them.
    let events: Vec<PubsubEvent> = (0..20_000)
        .map(|i| {
            let address = SipAddress::new(&format!("user{}", i % 10_000), "example.com");
            let item_id = Arc::from(format!("item-{}", i % 10_000));
            if i < 10_000 {
                PubsubEvent::Publish {
                    address,
                    item_id,
                    registration: Registration {
                        contact: format!("sip:user{i}@192.0.2.1:5060"),
                        received: "sip:198.51.100.7:34873".into(),
                        device: format!("Yealink SIP-T54W 96.86.0.{}", i % 7),
                        expires: Some(1_900_000_000),
                    },
                }
            } else {
                PubsubEvent::Retract { address, item_id }
            }
        })
        .collect();
    group.bench_function("apply (publish+retract cycle)", |b| {
        let mut fleet = Fleet::new(Limits::default());
        let mut i = 0usize;
        b.iter(|| {
            let applied = fleet.apply(&events[i % events.len()], 1.0);
            i += 1;
            applied
        })
    });
    group.bench_function("parse and apply", |b| {
        let mut state = State::new(Limits::default(), &[]);
        let mut out = Vec::with_capacity(4);
        b.iter(|| {
            out.clear();
            stanza::parse_event(&event, &mut out);
            state.apply_events(&out, 1.0)
        })
    });
    group.finish();
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
    state.apply_events(&events, 1_800_000_000.0);
    state
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("scrape");
    group.sample_size(10);
    let state = Arc::new(Mutex::new(fleet_state(100_000)));
    let metrics = Metrics::new(
        state.clone(),
        true,
        BuildInfo {
            version: "bench",
            revision: "bench",
        },
    );
    group.bench_function("encode 100k addresses (text)", |b| {
        b.iter(|| metrics.encode(Format::Text).map(|s| s.len()))
    });
    group.bench_function("snapshot 100k addresses (lock held)", |b| {
        b.iter_batched(
            || (),
            |()| {
                let state = state.lock().expect("lock");
                state.fleet.snapshot(true).addresses.len()
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, parse_and_apply, encode);
criterion_main!(benches);
