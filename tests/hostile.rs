//! Hostile input: what a broken or malicious peer can put on the exporter's
//! XMPP stream, and what it must not achieve. Nothing panics; the stream
//! survives whatever is well-formed; malformed XML ends the stream and the
//! exporter reconnects; no other address's state changes; limits refuse and
//! count; resources stay bounded.
//!
//! Three layers:
//! - parser/state properties over the public API, with seeded generators
//!   and the cargo-fuzz harness (`fuzz/common/harness.rs`, shared here);
//! - the exporter in-process against the simulator's c2s face, where
//!   `Simulator::send_raw` writes arbitrary bytes into the exporter's stream
//!   and `Simulator::inject_stanza` routes a stanza with any `from`;
//! - the exporter *binary* in its own process, for what can kill a process
//!   or eat its memory (a giant stanza, a nesting bomb), measured from /proc;
//! - and one test through a real Prosody, for odd but well-formed stanzas
//!   that a server forwards.
//!
//! Each network test follows the same pattern: set up (bob has a phone),
//! send the hostile thing, then a normal publish for alice, and check the
//! counters that must move, that the link stayed (or came back), and that
//! bob's series are exactly as before.

mod common;

#[path = "../fuzz/common/harness.rs"]
mod harness;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::exporter::{self, http_get, samples, scrape, wait_metric};
use common::wait::{eventually, free_port};
use minidom::Element;
use onsip_sim::{serve_c2s, Account, AuthorizeAnswer, SimConfig, Simulator};
use onsip_ua_exporter::config::Flags;
use onsip_ua_exporter::stanza::{self, PubsubEvent, Registration, SipAddress};
use onsip_ua_exporter::state::{Fleet, Limits, State};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(20);
const XMPP_DOMAIN: &str = "example.com";
const JID: &str = "exporter@example.com";
const PUBSUB: &str = "pubsub.user-agents.example.com";
const XMPP_PASSWORD: &str = "xmpp-secret-hostile";
const WEB_PASSWORD: &str = "web-secret-hostile";
const SIP_DOMAIN: &str = "acme.example";
const EVENT_NS: &str = "http://jabber.org/protocol/pubsub#event";

// =============================================================================
// Parser and state properties (no network)
// =============================================================================

/// Runs `f` on a thread with a 256 MiB stack: the harness's own checks are
/// about invariants; how deep a stack the parsers need is the business of
/// `deep_nesting_does_not_overflow_a_worker_stack`, which measures it
/// against a worker's 2 MiB in a child process (an overflow aborts).
fn on_big_stack(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(256 * 1024 * 1024)
        .spawn(f)
        .expect("spawn")
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
}

/// The fuzz target's seed corpus and any crash reproducer kept under
/// `fuzz/regressions/stanza/` replay cleanly through the fuzz harness.
#[test]
fn fuzz_seeds_and_regressions_replay() {
    on_big_stack(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let mut replayed = 0;
        for dir in ["seeds/stanza", "regressions/stanza"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
                continue;
            };
            for entry in entries.flatten() {
                let bytes = std::fs::read(entry.path()).expect("read corpus file");
                harness::run_one(&bytes);
                replayed += 1;
            }
        }
        assert!(replayed >= 10, "only {replayed} corpus files found");
    });
}

/// The seed corpus really exercises the state: publishes land, limits bite.
#[test]
fn seed_corpus_reaches_the_state() {
    on_big_stack(|| {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/stanza/many-items-limits.xml"),
        )
        .expect("seed");
        let stream = harness::parse_stream(&text).expect("seed is well-formed");
        let mut state = State::new(harness::limits(), &[harness::NODE.to_owned()]);
        let mut model = harness::Model::new(harness::limits());
        for el in stream.children() {
            harness::handle(&mut state, &mut model, el);
        }
        assert_eq!(state.fleet.address_count(), 6, "max_addresses");
        assert!(state.fleet.refused_addresses >= 1 && state.fleet.refused_devices >= 1);
    });
}

/// A random stanza stream from a grammar of OnSIP-ish and hostile pieces.
fn random_stream(rng: &mut StdRng) -> String {
    const NODES: &[&str] = &[
        "/example.com/foo",
        "/example.com/bar",
        "/EXAMPLE.com/foo",
        "/acme.com/manager",
        "/d.com/a",
        "/d.com/b",
        "/e.com/c",
        "/f.com/d",
        "/g.com/e",
        "/h.com/f",
        "/me/foo@example.com",
        "/example.com",
        "/",
        "",
        "//",
        "/a/b/c",
        "/d.com/a b",
        "/d.com/\u{1F4DE}",
        "/d.com/a@b",
    ];
    const IDS: &[&str] = &["1", "2", "3", "4", "", "\u{0301}", "a\tb", "x"];
    const STAMPS: &[&str] = &[
        "2009-03-05T12:30:34-05:00",
        "2030-01-01T00:00:00Z",
        "9999-12-31T23:59:59Z",
        "0000-01-01T00:00:00Z",
        "",
        "garbage",
        "2009-13-45T99:99:99Z",
        "2009-03-05T12:30:34",
        "99999-01-01T00:00:00Z",
        "-2009-03-05T12:30:34Z",
        "2009-03-05T12:30:34+99:99",
        "1e308",
        "2009-03-05T12:30:34.99999999999999999999Z",
    ];
    const DEVICES: &[&str] = &[
        "Yealink",
        "Polycom",
        "A",
        "B",
        "C",
        "",
        "&lt;script&gt;alert(1)&lt;/script&gt;",
        "quote\" back\\slash",
        "new\nline",
        "other",
    ];
    const FROMS: &[&str] = &[
        "pubsub.user-agents.xmpp.onsip.com",
        "commands.auth.xmpp.onsip.com",
        "mallory@example.com",
    ];
    let pick = |rng: &mut StdRng, list: &[&'static str]| list[rng.gen_range(0..list.len())];
    let mut out = String::new();
    for _ in 0..rng.gen_range(1..6) {
        let from = pick(rng, FROMS);
        match rng.gen_range(0..10) {
            0..=5 => {
                out.push_str(&format!(
                    "<message from='{from}' to='foo@example.com'><event xmlns='{EVENT_NS}'>"
                ));
                for _ in 0..rng.gen_range(0..4) {
                    match rng.gen_range(0..8) {
                        0..=4 => {
                            let ns = if rng.gen_ratio(1, 12) {
                                " xmlns='urn:evil'"
                            } else {
                                ""
                            };
                            let node = pick(rng, NODES);
                            let node = if rng.gen_ratio(1, 15) {
                                String::new()
                            } else {
                                format!(" node='{node}'")
                            };
                            out.push_str(&format!("<items{ns}{node}>"));
                            for _ in 0..rng.gen_range(0..6) {
                                let id = pick(rng, IDS);
                                match rng.gen_range(0..6) {
                                    0 | 1 => out.push_str(&format!("<retract id='{id}'/>")),
                                    2 => out.push_str(&format!("<item id='{id}'/>")),
                                    3 => out.push_str("<purge/>"),
                                    _ => {
                                        let ua_ns = if rng.gen_ratio(1, 10) {
                                            "urn:evil"
                                        } else {
                                            "onsip:user-agents"
                                        };
                                        let device = pick(rng, DEVICES);
                                        let stamp = pick(rng, STAMPS);
                                        out.push_str(&format!(
                                            "<item id='{id}'><user-agent xmlns='{ua_ns}'><contact>sip:x@192.0.2.1</contact><received/><device>{device}</device><expires>{stamp}</expires></user-agent></item>"
                                        ));
                                    }
                                }
                            }
                            out.push_str("</items>");
                        }
                        5 => {
                            let state = pick(
                                rng,
                                &["subscribed", "none", "pending", "unconfigured", "bogus", ""],
                            );
                            out.push_str(&format!(
                                "<subscription node='/me/foo@example.com' subscription='{state}' jid='foo@example.com' subid='s'/>"
                            ));
                        }
                        6 => out.push_str("<delete node='/d.com/a'/>"),
                        _ => out.push_str("<x xmlns='urn:unknown'><items node='/d.com/a'/></x>"),
                    }
                }
                out.push_str("</event></message>");
            }
            6 | 7 => {
                out.push_str(&format!(
                    "<iq from='{from}' type='result' id='i'><pubsub xmlns='http://jabber.org/protocol/pubsub'>"
                ));
                for _ in 0..rng.gen_range(0..3) {
                    let node = pick(rng, NODES);
                    out.push_str(&format!("<items node='{node}'>"));
                    for _ in 0..rng.gen_range(0..5) {
                        let id = pick(rng, IDS);
                        let device = pick(rng, DEVICES);
                        let stamp = pick(rng, STAMPS);
                        out.push_str(&format!(
                            "<item id='{id}'><user-agent xmlns='onsip:user-agents'><device>{device}</device><expires>{stamp}</expires></user-agent></item>"
                        ));
                    }
                    out.push_str("</items>");
                }
                if rng.gen_ratio(1, 3) {
                    let state = pick(rng, &["subscribed", "pending", "bogus"]);
                    out.push_str(&format!(
                        "<subscription node='/me/foo@example.com' subscription='{state}'/>"
                    ));
                }
                out.push_str("</pubsub></iq>");
            }
            _ => {
                let status = pick(rng, &["completed", "executing", ""]);
                out.push_str(&format!(
                    "<iq from='{from}' type='result' id='a'><command xmlns='http://jabber.org/protocol/commands' status='{status}'><x xmlns='jabber:x:data' type='result'>"
                ));
                if rng.gen_ratio(1, 2) {
                    let stamp = pick(rng, STAMPS);
                    out.push_str(&format!(
                        "<field var='expires'><value>{stamp}</value></field>"
                    ));
                }
                out.push_str("<field var='sip'>");
                for _ in 0..rng.gen_range(0..5) {
                    let address = pick(
                        rng,
                        &[
                            "foo@example.com",
                            "a@d.com",
                            "b@d.com",
                            "c@e.com",
                            "sip:d@f.com",
                            "bad",
                            "@",
                            "x@",
                        ],
                    );
                    out.push_str(&format!("<value>{address}</value>"));
                }
                out.push_str("</field>");
                if rng.gen_ratio(1, 8) {
                    out.push_str("<note type='error'>no</note>");
                }
                out.push_str("</x></command></iq>");
            }
        }
    }
    out
}

/// Thousands of random stanza streams (OnSIP-shaped, with hostile
/// variations) through the fuzz harness: the fleet always matches the
/// reference model, its own sums, and its limits; metrics and the status
/// page render without a broken line or an unescaped tag.
#[test]
fn random_stanza_streams_keep_the_fleet_consistent() {
    on_big_stack(|| {
        let mut rng = StdRng::seed_from_u64(0x5EED_0001);
        let mut applied = 0;
        for _ in 0..1500 {
            let text = random_stream(&mut rng);
            assert!(
                harness::parse_stream(&text).is_some(),
                "generator made bad XML: {text}"
            );
            harness::run_one(text.as_bytes());
            applied += 1;
        }
        assert_eq!(applied, 1500);
    });
}

/// Byte-level mutations of the seed corpus (flips, truncations, splices,
/// duplications): whatever still parses is applied and checked; nothing
/// panics.
#[test]
fn mutated_seeds_never_break_an_invariant() {
    on_big_stack(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/stanza");
        let seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
            .expect("seed dir")
            .flatten()
            .map(|e| std::fs::read(e.path()).expect("seed"))
            .collect();
        let mut rng = StdRng::seed_from_u64(0x5EED_0002);
        for _ in 0..20_000 {
            let mut data = seeds[rng.gen_range(0..seeds.len())].clone();
            for _ in 0..rng.gen_range(1..5) {
                if data.is_empty() {
                    break;
                }
                let at = rng.gen_range(0..data.len());
                match rng.gen_range(0..6) {
                    0 => data[at] = rng.gen(),
                    1 => data.truncate(at),
                    2 => {
                        let other = &seeds[rng.gen_range(0..seeds.len())];
                        let from = rng.gen_range(0..other.len());
                        let to = rng.gen_range(from..other.len().min(from + 200) + 1);
                        data.splice(at..at, other[from..to].iter().copied());
                    }
                    3 => {
                        let end = rng.gen_range(at..data.len().min(at + 300) + 1);
                        let chunk = data[at..end].to_vec();
                        data.splice(at..at, chunk);
                    }
                    4 => {
                        let token: &[u8] = [
                            b"<retract id='4e536ee0246ccf0224154a9e72be7a9c'/>".as_slice(),
                            b"&amp;",
                            b"<![CDATA[x]]>",
                            b"xmlns='urn:evil'",
                            b"\xC3\x28",
                            b"</items><items node='/example.com/bar'>",
                        ][rng.gen_range(0..6)];
                        data.splice(at..at, token.iter().copied());
                    }
                    _ => {
                        let end = rng.gen_range(at..data.len());
                        data.drain(at..end);
                    }
                }
            }
            harness::run_one(&data);
        }
    });
}

fn addr(s: &str) -> SipAddress {
    SipAddress::parse(s).expect("address")
}

fn random_event(rng: &mut StdRng, addresses: &[SipAddress]) -> PubsubEvent {
    let address = addresses[rng.gen_range(0..addresses.len())].clone();
    let item_id: Arc<str> = Arc::from(format!("i{}", rng.gen_range(0..6)));
    match rng.gen_range(0..5) {
        0 | 1 => PubsubEvent::Publish {
            address,
            item_id,
            registration: Registration {
                contact: String::new(),
                received: String::new(),
                device: format!("UA{}", rng.gen_range(0..4)),
                expires: if rng.gen() {
                    Some(rng.gen_range(0..2_000_000_000))
                } else {
                    None
                },
            },
        },
        2 | 3 => PubsubEvent::Retract { address, item_id },
        _ => PubsubEvent::Ignored,
    }
}

/// Whatever hostile sequence of publishes, duplicate and out-of-order
/// retracts, limit refusals and expiry sweeps hits other addresses, a
/// bystander's whole state (devices, counters, last change) is untouched.
#[test]
fn events_for_other_addresses_never_touch_a_bystander() {
    let mut rng = StdRng::seed_from_u64(0x5EED_0003);
    let others: Vec<SipAddress> = (0..12)
        .map(|i| addr(&format!("u{i}@d{}.com", i % 3)))
        .collect();
    let bystander = addr("bystander@d0.com");
    for round in 0..300 {
        let limits = Limits {
            max_addresses: rng.gen_range(1..10),
            max_devices_per_address: rng.gen_range(1..5),
            max_user_agents_per_domain: 2,
            expiry_grace_seconds: 60,
        };
        let mut state = State::new(limits, &[]);
        let mut events = vec![PubsubEvent::Publish {
            address: bystander.clone(),
            item_id: Arc::from("keep"),
            registration: Registration {
                contact: "sip:b@192.0.2.9".into(),
                received: String::new(),
                device: "UA0".into(),
                expires: None,
            },
        }];
        state.apply_events(&events, 1.0);
        let before = state.fleet.address(&bystander).cloned().expect("bystander");
        for step in 0..50 {
            events.clear();
            for _ in 0..rng.gen_range(1..20) {
                events.push(random_event(&mut rng, &others));
            }
            state.apply_events(&events, 2.0 + f64::from(step));
            if rng.gen_ratio(1, 10) {
                state.expire(rng.gen_range(0.0..2.1e9));
            }
            assert_eq!(
                state.fleet.address(&bystander),
                Some(&before),
                "round {round} step {step}: the bystander changed"
            );
        }
    }
}

/// One bad item (no id, no payload, payload in another namespace) never
/// hides the good items of the same message, and is counted as malformed.
#[test]
fn one_bad_item_never_hides_the_others() {
    let xml = format!(
        "<event xmlns='{EVENT_NS}'><items node='/d.com/a'>\
         <item id='1'><user-agent xmlns='onsip:user-agents'><device>A</device></user-agent></item>\
         <item><user-agent xmlns='onsip:user-agents'/></item>\
         <item id='2'/>\
         <item id='3'><user-agent xmlns='urn:evil'/></item>\
         <retract/>\
         <item id='4'><user-agent xmlns='onsip:user-agents'><expires>nonsense</expires></user-agent></item>\
         </items></event>"
    );
    let event: Element = xml.parse().expect("xml");
    let mut out = Vec::new();
    stanza::parse_event(&event, &mut out);
    let publishes: Vec<&str> = out
        .iter()
        .filter_map(|e| match e {
            PubsubEvent::Publish { item_id, .. } => Some(&**item_id),
            _ => None,
        })
        .collect();
    let malformed = out
        .iter()
        .filter(|e| matches!(e, PubsubEvent::Malformed(_)))
        .count();
    assert_eq!(publishes, ["1", "4"]);
    assert_eq!(malformed, 4);
    let mut fleet = Fleet::new(Limits::default());
    for e in &out {
        fleet.apply(e, 1.0);
    }
    assert_eq!(fleet.device_count(), 2);
}

/// An element that is not in the pubsub#event namespace is not a pubsub
/// retract, even inside a genuine `<items>`: a payload of another protocol
/// must never take a phone offline.
#[test]
fn a_retract_in_a_foreign_namespace_is_not_a_retract() {
    let xml = format!(
        "<event xmlns='{EVENT_NS}'><items node='/d.com/a'>\
         <retract xmlns='urn:evil' id='1'/>\
         <item xmlns='urn:evil' id='2'><user-agent xmlns='onsip:user-agents'/></item>\
         </items></event>"
    );
    let event: Element = xml.parse().expect("xml");
    let mut out = Vec::new();
    stanza::parse_event(&event, &mut out);
    assert!(
        out.iter()
            .all(|e| !matches!(e, PubsubEvent::Retract { .. } | PubsubEvent::Publish { .. })),
        "elements of urn:evil were read as pubsub items/retracts: {out:?}"
    );
}

/// Timestamps that are not RFC 3339 read as "no expiry", never as a wrong
/// time, and never panic (also at the edges of chrono's range).
#[test]
fn invalid_timestamps_read_as_none() {
    for bad in [
        "",
        "garbage",
        "2009-13-45T99:99:99Z",
        "2009-03-05T12:30:34",
        "99999-01-01T00:00:00Z",
        "-2009-03-05T12:30:34Z",
        "2009-03-05T12:30:34+99:99",
        "1e308",
        "2009-02-30T00:00:00Z",
        "２００９-03-05T12:30:34Z",
    ] {
        assert_eq!(stanza::parse_timestamp(bad), None, "{bad:?}");
    }
    assert_eq!(
        stanza::parse_timestamp("9999-12-31T23:59:59Z"),
        Some(253_402_300_799)
    );
    assert_eq!(
        stanza::parse_timestamp("0000-01-01T00:00:00+23:59"),
        Some(-62_167_305_540)
    );
    for t in [i64::MIN, i64::MAX, -62_167_305_540, 253_402_300_799] {
        let _ = stanza::format_timestamp(t);
    }
}

// =============================================================================
// The exporter in-process, against the simulator's c2s face
// =============================================================================

/// The simulator on an in-process c2s face, an exporter logged in, and bob
/// with one phone online (the address that must never change).
struct World {
    sim: Simulator,
    running: exporter::Running,
    alice_phones: u32,
    _cancel: CancellationToken,
    _guard: CancelOnDrop,
}

struct CancelOnDrop(CancellationToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

fn account() -> Account {
    let mut account = Account::new(
        JID,
        &["alice@acme.example", "bob@acme.example"],
        WEB_PASSWORD,
    );
    account.xmpp_password = XMPP_PASSWORD.into();
    account
}

/// The simulator serving c2s on loopback.
async fn simulator() -> (Simulator, SocketAddr, CancellationToken) {
    let sim = Simulator::new(SimConfig::new(XMPP_DOMAIN).with_account(account()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind c2s");
    let c2s = listener.local_addr().expect("c2s addr");
    let cancel = CancellationToken::new();
    tokio::spawn(serve_c2s(sim.clone(), listener, cancel.clone()));
    (sim, c2s, cancel)
}

fn series(metric: &str, user: &str) -> String {
    format!("{metric}{{domain=\"{SIP_DOMAIN}\",user=\"{user}\"}}")
}

fn devices(user: &str) -> String {
    series("onsip_user_agent_devices", user)
}

fn event_kind(kind: &str) -> String {
    format!("onsip_pubsub_events_total{{kind=\"{kind}\"}}")
}

/// Every series about `user`.
fn rows_of(m: &HashMap<String, f64>, user: &str) -> BTreeMap<String, f64> {
    let needle = format!("user=\"{user}\"");
    m.iter()
        .filter(|(k, _)| k.contains(&needle))
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

fn value(m: &HashMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

async fn world_with(tweak: impl FnOnce(Flags) -> Flags) -> World {
    let (sim, c2s, cancel) = simulator().await;
    let flags = Flags {
        sip_address: Some("alice@acme.example".into()),
        ..exporter::flags_for(JID, c2s, XMPP_DOMAIN, None)
    };
    let running = exporter::start(tweak(flags), XMPP_PASSWORD, Some(WEB_PASSWORD)).await;
    wait_metric(running.addr, "onsip_up", 1.0, DEADLINE).await;
    // Phones before the items retrieval would count as refreshes there.
    wait_metric(running.addr, "onsip_state_resync_from_items", 1.0, DEADLINE).await;
    sim.register_phone(
        "bob@acme.example",
        "bob-1",
        "sip:bob@192.0.2.20:5060",
        "sip:198.51.100.2:5060",
        "Bob Phone/1.0",
        Utc::now() + chrono::Duration::hours(2),
    );
    wait_metric(running.addr, &devices("bob"), 1.0, DEADLINE).await;
    World {
        sim,
        running,
        alice_phones: 0,
        _guard: CancelOnDrop(cancel.clone()),
        _cancel: cancel,
    }
}

async fn world() -> World {
    world_with(|f| f).await
}

impl World {
    fn addr(&self) -> SocketAddr {
        self.running.addr
    }

    /// Writes `bytes` into the exporter's XMPP stream.
    fn raw(&self, bytes: impl Into<Vec<u8>>) {
        assert_eq!(self.sim.send_raw(JID, bytes), 1, "one exporter session");
    }

    /// A normal publish for alice through the service; waits until the
    /// exporter shows it (so everything queued before it was processed).
    async fn alice_publishes(&mut self) {
        self.alice_phones += 1;
        let n = self.alice_phones;
        self.sim.register_phone(
            "alice@acme.example",
            &format!("alice-{n}"),
            "sip:alice@192.0.2.10:5060",
            "sip:198.51.100.1:5060",
            "Alice Phone/2.0",
            Utc::now() + chrono::Duration::hours(1),
        );
        wait_metric(self.addr(), &devices("alice"), f64::from(n), DEADLINE).await;
    }
}

/// A pubsub event message with `body` inside `<event>`, from the service.
fn event_message(body: &str) -> String {
    format!(
        "<message from='{PUBSUB}' to='{JID}'><event xmlns='{EVENT_NS}'>{body}</event></message>"
    )
}

fn item(id: &str, device: &str, expires: &str) -> String {
    format!(
        "<item id='{id}'><user-agent xmlns='onsip:user-agents'><contact>sip:x@192.0.2.1:5060</contact>\
         <received>sip:198.51.100.9:5060</received><device>{device}</device><expires>{expires}</expires>\
         </user-agent></item>"
    )
}

/// Asserts the link never dropped, the exporter is up, and bob is as before.
fn assert_undisturbed(
    m: &HashMap<String, f64>,
    before: &HashMap<String, f64>,
    bob_before: &BTreeMap<String, f64>,
) {
    assert_eq!(m.get("onsip_xmpp_connected"), Some(&1.0), "still connected");
    assert_eq!(m.get("onsip_up"), Some(&1.0), "still up");
    assert_eq!(
        m.get("onsip_xmpp_connects_total"),
        before.get("onsip_xmpp_connects_total"),
        "the stream must have survived (no reconnect)"
    );
    assert_eq!(&rows_of(m, "bob"), bob_before, "bob's series changed");
}

/// Payloads of other namespaces are counted as ignored, an item without
/// our payload as malformed; nothing of them is applied; an `<event>` of
/// another namespace is not an event at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_namespaces_are_counted_and_never_applied() {
    let mut w = world().await;
    let before = scrape(w.addr()).await;
    let bob_before = rows_of(&before, "bob");
    w.raw(event_message(
        "<x xmlns='urn:evil'><items node='/acme.example/bob'><retract id='bob-1'/></items></x>\
         <items xmlns='urn:evil' node='/acme.example/bob'><retract id='bob-1'/></items>\
         <items node='/acme.example/carol'><item id='c1'><user-agent xmlns='urn:evil'><device>D</device></user-agent></item></items>"
    ));
    // An <event> in another namespace: not a pubsub event, not counted.
    w.raw(format!(
        "<message from='{PUBSUB}' to='{JID}'><event xmlns='urn:evil'><items node='/acme.example/bob'><retract id='bob-1'/></items></event></message>"
    ));
    // Unknown top-level payloads next to a genuine event.
    w.raw(format!(
        "<message from='{PUBSUB}' to='{JID}'><y xmlns='urn:evil2'/><event xmlns='{EVENT_NS}'><purge node='/acme.example/bob'/></event></message>"
    ));
    w.alice_publishes().await;
    let m = scrape(w.addr()).await;
    assert_undisturbed(&m, &before, &bob_before);
    assert_eq!(
        value(&m, &event_kind("ignored")) - value(&before, &event_kind("ignored")),
        3.0,
        "<x>, foreign <items>, <purge>"
    );
    assert_eq!(
        value(&m, &event_kind("malformed")) - value(&before, &event_kind("malformed")),
        1.0,
        "the item without an onsip:user-agents payload"
    );
    assert!(
        !m.keys().any(|k| k.contains("user=\"carol\"")),
        "carol got a series"
    );
    assert_eq!(m.get(&devices("alice")), Some(&1.0));
}

/// Events that do not come from the pubsub service, or are not for us, or
/// are errors, are counted as ignored and change nothing — even when they
/// carry a retract of bob's phone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_not_from_the_service_or_not_for_us_are_ignored() {
    let mut w = world().await;
    let before = scrape(w.addr()).await;
    let bob_before = rows_of(&before, "bob");
    let body = format!(
        "<event xmlns='{EVENT_NS}'><items node='/acme.example/bob'><retract id='bob-1'/>{}</items></event>",
        item("evil-1", "Evil/1.0", "2099-01-01T00:00:00Z")
    );
    let bound = w.sim.sessions()[0].jid.clone();
    let spoofs = [
        format!("<message from='mallory@example.com/x' to='{JID}'>{body}</message>"),
        format!("<message from='{PUBSUB}.evil.net' to='{JID}'>{body}</message>"),
        format!("<message from='evil.net' to='{JID}'>{body}</message>"),
        format!("<message from='mallory@{PUBSUB}' to='{JID}'>{body}</message>"),
        format!("<message from='{PUBSUB}/spoof' to='{JID}'>{body}</message>"),
        format!("<message to='{JID}'>{body}</message>"),
        format!("<message from='{PUBSUB}' to='someone-else@example.com'>{body}</message>"),
        format!("<message from='{PUBSUB}' to='{JID}/another-resource'>{body}</message>"),
        format!("<message from='{PUBSUB}' to='{bound}' type='error'>{body}</message>"),
    ];
    for spoof in &spoofs {
        w.raw(spoof.as_bytes());
    }
    // The same through the simulator's router (what a server would deliver).
    let routed: Element = format!(
        "<message xmlns='jabber:client' from='mallory@example.com/x' to='{JID}'>{body}</message>"
    )
    .parse()
    .expect("xml");
    w.sim.inject_stanza(routed);
    w.alice_publishes().await;
    let m = scrape(w.addr()).await;
    assert_undisturbed(&m, &before, &bob_before);
    assert_eq!(
        value(&m, &event_kind("ignored")) - value(&before, &event_kind("ignored")),
        (spoofs.len() + 1) as f64,
        "every spoofed event counted as ignored"
    );
    assert_eq!(
        value(&m, &event_kind("retract")),
        value(&before, &event_kind("retract"))
    );
}

/// An item for a node we never subscribed to (another domain, a collection
/// node, an empty node) changes no address we know; unreadable nodes count
/// as malformed; the stream stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_for_nodes_never_subscribed_touch_no_known_address() {
    let mut w = world().await;
    let before = scrape(w.addr()).await;
    let bob_before = rows_of(&before, "bob");
    let alice_domain_before: BTreeMap<String, f64> = before
        .iter()
        .filter(|(k, _)| k.starts_with("onsip_domain_") && k.contains(SIP_DOMAIN))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    w.raw(event_message(&format!(
        "<items node='/elsewhere.example/mallory'>{}</items>\
         <items node='/me/other@example.com'>{}</items>\
         <items node=''>{}</items>\
         <items node='/acme.example'>{}</items>",
        item("m1", "M", "2099-01-01T00:00:00Z"),
        item("m2", "M", "2099-01-01T00:00:00Z"),
        item("m3", "M", "2099-01-01T00:00:00Z"),
        item("m4", "M", "2099-01-01T00:00:00Z"),
    )));
    w.raw(event_message(
        "<items node='/acme.example/bob/extra'><retract id='bob-1'/></items>",
    ));
    w.alice_publishes().await;
    let m = scrape(w.addr()).await;
    assert_undisturbed(&m, &before, &bob_before);
    assert_eq!(
        value(&m, &event_kind("malformed")) - value(&before, &event_kind("malformed")),
        4.0,
        "collection node, empty node, domain node, 3-part node"
    );
    // acme.example's domain rows moved only by alice's phone.
    let online = format!("onsip_domain_addresses_online{{domain=\"{SIP_DOMAIN}\"}}");
    let devs = format!("onsip_domain_devices{{domain=\"{SIP_DOMAIN}\"}}");
    assert_eq!(value(&m, &online), alice_domain_before[&online] + 1.0);
    assert_eq!(value(&m, &devs), alice_domain_before[&devs] + 1.0);
    eprintln!(
        "items for /elsewhere.example/mallory: devices series = {:?}",
        m.get("onsip_user_agent_devices{domain=\"elsewhere.example\",user=\"mallory\"}")
    );
}

/// Thousands of items in one message: the address and device caps refuse
/// and count exactly; known addresses (bob) and authorized ones (alice) are
/// unaffected; no more series than the caps allow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_items_in_one_message_hit_the_caps_and_are_counted() {
    const MAX_ADDRESSES: usize = 40;
    const MAX_DEVICES: usize = 8;
    let mut w = world_with(|f| Flags {
        max_addresses: Some(MAX_ADDRESSES),
        max_devices: Some(MAX_DEVICES),
        ..f
    })
    .await;
    let before = scrape(w.addr()).await;
    let bob_before = rows_of(&before, "bob");
    // 3000 devices for one new address, 3000 retracts of unknown ids.
    let mut body = String::from("<items node='/acme.example/flood'>");
    for i in 0..3000 {
        body.push_str(&item(&format!("f{i}"), "Flood/1.0", "2099-01-01T00:00:00Z"));
    }
    for i in 0..3000 {
        body.push_str(&format!("<retract id='unknown-{i}'/>"));
    }
    body.push_str("</items>");
    // 2000 new addresses, one device each, in another domain.
    for i in 0..2000 {
        body.push_str(&format!(
            "<items node='/flood.example/u{i}'>{}</items>",
            item("1", "Flood/1.0", "2099-01-01T00:00:00Z")
        ));
    }
    let message = event_message(&body);
    eprintln!("flood message: {} bytes", message.len());
    w.raw(message);
    w.alice_publishes().await;
    let m = scrape(w.addr()).await;
    assert_undisturbed(&m, &before, &bob_before);
    // alice and bob (authorized) + flood = 3 known; 37 of the 2000 fit.
    let kept_new = MAX_ADDRESSES - 3;
    assert_eq!(
        value(&m, "onsip_refused_events_total{limit=\"devices\"}")
            - value(&before, "onsip_refused_events_total{limit=\"devices\"}"),
        (3000 - MAX_DEVICES) as f64
    );
    assert_eq!(
        value(&m, "onsip_refused_events_total{limit=\"addresses\"}")
            - value(&before, "onsip_refused_events_total{limit=\"addresses\"}"),
        (2000 - kept_new) as f64
    );
    assert_eq!(m.get(&devices("flood")), Some(&(MAX_DEVICES as f64)));
    assert_eq!(
        value(&m, "onsip_domain_addresses{domain=\"flood.example\"}"),
        kept_new as f64
    );
    let address_series = m
        .keys()
        .filter(|k| k.starts_with("onsip_user_agent_devices{"))
        .count();
    assert!(address_series <= MAX_ADDRESSES, "{address_series} series");
    assert_eq!(
        value(&m, &event_kind("publish")) - value(&before, &event_kind("publish")),
        5001.0,
        "3000 + 2000 + alice's"
    );
    assert_eq!(
        value(&m, &event_kind("retract")) - value(&before, &event_kind("retract")),
        3000.0
    );
}

/// Unreadable `expires` values register the device with no expiry (kept
/// until retracted); only the readable one sets the expiry gauge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_timestamps_register_without_expiry() {
    let mut w = world().await;
    let before = scrape(w.addr()).await;
    let bob_before = rows_of(&before, "bob");
    let long = "9".repeat(8000);
    let stamps = [
        "",
        "garbage",
        "2009-13-45T99:99:99Z",
        "2099-03-05T12:30:34",
        "99999-01-01T00:00:00Z",
        "-2099-03-05T12:30:34Z",
        "2099-03-05T12:30:34+99:99",
        "1e308",
        "2099-02-30T00:00:00Z",
        &long,
        "9999-12-31T23:59:59Z",
    ];
    let mut body = String::from("<items node='/acme.example/carol'>");
    for (i, stamp) in stamps.iter().enumerate() {
        body.push_str(&item(&format!("c{i}"), "Carol/1.0", stamp));
    }
    body.push_str("</items>");
    w.raw(event_message(&body));
    w.alice_publishes().await;
    let m = scrape(w.addr()).await;
    assert_undisturbed(&m, &before, &bob_before);
    assert_eq!(m.get(&devices("carol")), Some(&(stamps.len() as f64)));
    assert_eq!(
        m.get(&series(
            "onsip_user_agent_registration_expiry_timestamp_seconds",
            "carol"
        )),
        Some(&253_402_300_799.0)
    );
    assert_eq!(
        value(&m, &event_kind("malformed")),
        value(&before, &event_kind("malformed"))
    );
}

/// Duplicate and out-of-order publishes and retracts: a duplicate publish
/// is a refresh, a duplicate or early retract changes nothing, a publish
/// after its retract registers again; counters say exactly that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_out_of_order_publish_retract() {
    let mut w = world().await;
    let before = scrape(w.addr()).await;
    let bob_before = rows_of(&before, "bob");
    let node = "/acme.example/dave";
    let publish = |id: &str| item(id, "Dave/1.0", "2099-01-01T00:00:00Z");
    let retract = |id: &str| format!("<retract id='{id}'/>");
    for body in [
        retract("d1"),                                                  // early: nothing
        publish("d1"),                                                  // registered
        publish("d1"),                                                  // refresh
        retract("d1"),                                                  // retracted
        retract("d1"),                                                  // duplicate: nothing
        format!("{}{}{}", publish("d2"), retract("d2"), publish("d2")), // reg, ret, reg
        format!("{}{}", retract("d3"), publish("d3")),                  // early retract, then reg
    ] {
        w.raw(event_message(&format!(
            "<items node='{node}'>{body}</items>"
        )));
    }
    w.alice_publishes().await;
    let m = scrape(w.addr()).await;
    assert_undisturbed(&m, &before, &bob_before);
    let dave = |metric: &str| m.get(&series(metric, "dave")).copied();
    assert_eq!(dave("onsip_user_agent_devices"), Some(2.0), "d2 and d3");
    assert_eq!(dave("onsip_user_agent_registrations_total"), Some(4.0));
    assert_eq!(dave("onsip_user_agent_refreshes_total"), Some(1.0));
    assert_eq!(dave("onsip_user_agent_retracts_total"), Some(2.0));
    assert_eq!(
        value(&m, &event_kind("publish")) - value(&before, &event_kind("publish")),
        6.0,
        "5 for dave, 1 for alice"
    );
    assert_eq!(
        value(&m, &event_kind("retract")) - value(&before, &event_kind("retract")),
        5.0
    );
}

/// Well-formed stanzas that xmpp-parsers refuses (bad type, bad JID, iq
/// without id, unknown top-level element) are counted as malformed and
/// skipped: the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn well_formed_but_invalid_stanzas_are_skipped_not_fatal() {
    let mut w = world().await;
    let before = scrape(w.addr()).await;
    let bob_before = rows_of(&before, "bob");
    let retract_bob = format!(
        "<event xmlns='{EVENT_NS}'><items node='/acme.example/bob'><retract id='bob-1'/></items></event>"
    );
    let invalid = [
        format!("<message from='{PUBSUB}' to='{JID}' type='bogus'>{retract_bob}</message>"),
        format!("<message from='not@a@jid' to='{JID}'>{retract_bob}</message>"),
        format!("<message from='{PUBSUB}' to='@@'>{retract_bob}</message>"),
        "<iq type='result' from='example.com'/>".to_owned(),
        "<iq type='get' id='x' from='example.com'/>".to_owned(),
        "<presence type='bogus'/>".to_owned(),
    ];
    for stanza in &invalid {
        w.raw(stanza.as_bytes());
    }
    // Oddities xmpp-parsers accepts: must not be fatal either.
    w.raw(format!(
        "<message from='{PUBSUB}' to='{JID}' xml:lang='xx-\u{1F4DE}' id=''>{retract_bob}<body>hi</body><thread>t</thread></message>"
    ));
    w.raw("<iq type='get' id='ping-1' from='example.com'><ping xmlns='urn:xmpp:ping'/></iq>");
    w.raw("<iq type='set' id='set-1' from='mallory@example.com/x'><query xmlns='jabber:iq:roster'/></iq>");
    w.alice_publishes().await;
    let m = scrape(w.addr()).await;
    assert_eq!(m.get("onsip_xmpp_connected"), Some(&1.0));
    assert_eq!(
        m.get("onsip_xmpp_connects_total"),
        before.get("onsip_xmpp_connects_total"),
        "a stanza xmpp-parsers refuses must not cost the stream"
    );
    let malformed = value(&m, &event_kind("malformed")) - value(&before, &event_kind("malformed"));
    eprintln!(
        "malformed counted: {malformed} of {} invalid",
        invalid.len()
    );
    assert!(malformed >= 4.0, "malformed moved by {malformed}");
    // The one well-formed, valid retract of bob from the service applies:
    // it is genuine. Everything else left bob alone.
    assert_eq!(m.get(&devices("bob")), Some(&0.0));
    let _ = bob_before;
}

/// Not-well-formed XML necessarily ends the stream: each time the exporter
/// counts a stream error, reconnects, re-subscribes and goes on; bob's
/// phone, registrations and retracts are kept across every reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_xml_ends_the_stream_and_the_exporter_recovers() {
    let mut w = world().await;
    let bob_kept = |m: &HashMap<String, f64>| -> BTreeMap<String, f64> {
        rows_of(m, "bob")
            .into_iter()
            .filter(|(k, _)| !k.starts_with("onsip_user_agent_refreshes_total"))
            .collect()
    };
    let before = scrape(w.addr()).await;
    let bob_before = bob_kept(&before);
    let long_attribute = format!("<message id='{}'/>", "a".repeat(10_000));
    let payloads: Vec<(&str, Vec<u8>)> = vec![
        ("mismatched tags", b"<message><unclosed></message>".to_vec()),
        (
            "invalid UTF-8",
            b"<message><body>\xff\xfe</body></message>".to_vec(),
        ),
        ("undeclared prefix", b"<p:message/>".to_vec()),
        (
            "DTD and entities",
            b"<!DOCTYPE lolz [<!ENTITY lol 'lol'>]><message>&lol;</message>".to_vec(),
        ),
        ("duplicate attribute", b"<message a='1' a='2'/>".to_vec()),
        (
            "attribute over the token limit",
            long_attribute.into_bytes(),
        ),
        ("text at stream level", b"hello".to_vec()),
        ("NUL character", b"<message>\0</message>".to_vec()),
        ("stream footer", b"</stream:stream>".to_vec()),
    ];
    for (what, bytes) in payloads {
        let m0 = scrape(w.addr()).await;
        let connects = value(&m0, "onsip_xmpp_connects_total");
        let errors = value(&m0, "onsip_xmpp_errors_total{kind=\"stream\"}");
        w.raw(bytes);
        wait_metric(
            w.addr(),
            "onsip_xmpp_connects_total",
            connects + 1.0,
            DEADLINE,
        )
        .await;
        wait_metric(w.addr(), "onsip_up", 1.0, DEADLINE).await;
        w.alice_publishes().await;
        let m = scrape(w.addr()).await;
        assert_eq!(m.get("onsip_xmpp_connected"), Some(&1.0), "{what}");
        assert!(
            value(&m, "onsip_xmpp_errors_total{kind=\"stream\"}") > errors,
            "{what}: no stream error counted"
        );
        assert_eq!(bob_kept(&m), bob_before, "{what}: bob's state changed");
    }
}

/// A reconnect reloads the phones by items retrieval. That is not a
/// re-registration: `onsip_user_agent_refreshes_total` counts "items
/// re-published with an id already held" (metrics contract), and no phone
/// re-registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_is_not_counted_as_a_refresh() {
    let w = world().await;
    let before = scrape(w.addr()).await;
    let connects = value(&before, "onsip_xmpp_connects_total");
    let items_requests = w.sim.stats().service.items_requests;
    w.raw(b"<message><unclosed></message>".to_vec());
    wait_metric(
        w.addr(),
        "onsip_xmpp_connects_total",
        connects + 1.0,
        DEADLINE,
    )
    .await;
    assert!(
        w.sim
            .wait_until(DEADLINE, |s| s.stats().service.items_requests
                > items_requests)
            .await,
        "the new link retrieved the items"
    );
    // The items reply is on its way: watch bob's refresh counter for a
    // while (it must not move at all).
    let refreshes = series("onsip_user_agent_refreshes_total", "bob");
    let watch_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < watch_until {
        let m = scrape(w.addr()).await;
        assert_eq!(
            m.get(&refreshes),
            before.get(&refreshes),
            "the items retrieval after a reconnect was counted as a re-registration of bob's phone"
        );
        assert_eq!(m.get(&devices("bob")), Some(&1.0), "bob's phone kept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A stranger that guesses the id of a pending request (ids are
/// `ouae-0`, `ouae-1`… per link) must not be able to answer it: iq replies
/// are only taken from the JID the request went to. Here mallory answers
/// the authorize request with an authorization for an address of hers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iq_replies_from_a_stranger_are_not_taken_as_answers() {
    let w = world().await;
    let before = scrape(w.addr()).await;
    let connects = value(&before, "onsip_xmpp_connects_total");
    // The service stops answering authorize; the link is dropped, so the
    // new link's first request (ouae-0) is an authorize left pending.
    w.sim.set_authorize_answer(AuthorizeAnswer::Silent);
    let stanzas_before = w.sim.stats().service.stanzas_in;
    w.sim.drop_links();
    wait_metric(
        w.addr(),
        "onsip_xmpp_connects_total",
        connects + 1.0,
        DEADLINE,
    )
    .await;
    assert!(
        w.sim
            .wait_until(DEADLINE, |s| s.stats().service.stanzas_in > stanzas_before)
            .await,
        "the authorize request reached the service"
    );
    let full = w.sim.sessions()[0].jid.clone();
    w.raw(format!(
        "<iq type='result' id='ouae-0' from='mallory@example.com/x' to='{full}'>\
         <command xmlns='http://jabber.org/protocol/commands' node='authorize-plain' status='completed'>\
         <x xmlns='jabber:x:data' type='result'>\
         <field var='expires'><value>2099-01-01T00:00:00Z</value></field>\
         <field var='sip'><value>mallory@evil.example</value></field>\
         </x></command></iq>"
    ));
    // Let the service answer again: the exporter's own authorize times out
    // and is retried. Either the forged answer shows (a failure), or the
    // genuine one does.
    tokio::time::sleep(Duration::from_millis(500)).await;
    w.sim.set_authorize_answer(AuthorizeAnswer::Normal);
    let outcome = eventually(DEADLINE, "an authorization, forged or genuine", || async {
        let m = scrape(w.addr()).await;
        let forged: Vec<String> = m
            .iter()
            .filter(|(k, _)| k.contains("evil.example"))
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        if !forged.is_empty() {
            return Some(Err(format!(
                "authorized_addresses={:?}, forged series: {forged:?}",
                m.get("onsip_authorized_addresses")
            )));
        }
        (m.get("onsip_authorized_addresses") == Some(&2.0)).then_some(Ok(()))
    })
    .await;
    if let Err(evidence) = outcome {
        panic!("mallory's forged authorize reply (from mallory@example.com/x) was accepted: {evidence}");
    }
}

/// Values far longer than any real one (a 200 KB User-Agent string) must
/// not end up verbatim in a label: one hostile publish would otherwise add
/// its whole size to every scrape, and to the memory per device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_user_agent_string_does_not_bloat_the_scrape() {
    let mut w = world().await;
    let (_, body_before) = http_get(w.addr(), "/metrics").await;
    let huge = "U".repeat(200_000);
    w.raw(event_message(&format!(
        "<items node='/acme.example/erin'>{}</items>",
        item("e1", &huge, "2099-01-01T00:00:00Z")
    )));
    w.alice_publishes().await;
    let (_, body) = http_get(w.addr(), "/metrics").await;
    let m = samples(&body);
    assert_eq!(m.get(&devices("erin")), Some(&1.0));
    assert!(
        body.len() < body_before.len() + 16 * 1024,
        "one 200 KB User-Agent string grew the scrape from {} to {} bytes",
        body_before.len(),
        body.len()
    );
}

// =============================================================================
// The exporter binary in its own process: memory and crashes
// =============================================================================

/// The exporter binary logged into an in-process simulator, its web port,
/// and its pid for /proc.
struct Process {
    child: Child,
    web: SocketAddr,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    fn start(c2s: SocketAddr) -> Self {
        let port = free_port();
        let web = SocketAddr::from(([127, 0, 0, 1], port));
        // ONSIP_HOSTILE_EXPORTER_BIN: measure another build (e.g. release).
        let bin = std::env::var_os("ONSIP_HOSTILE_EXPORTER_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_onsip-ua-exporter").into());
        let child = Command::new(bin)
            .args([
                "--xmpp.jid",
                JID,
                "--xmpp.server",
                &c2s.to_string(),
                "--xmpp.insecure-plaintext-for-tests",
                "--xmpp.timeout",
                "5s",
                "--xmpp.max-backoff",
                "2s",
                "--onsip.auth-jid",
                &format!("commands.auth.{XMPP_DOMAIN}"),
                "--onsip.pubsub-jid",
                PUBSUB,
                "--onsip.sip-address",
                "alice@acme.example",
                "--web.listen-address",
                &web.to_string(),
                "--log.level",
                "warn",
            ])
            .env("ONSIP_XMPP_PASSWORD", XMPP_PASSWORD)
            .env("ONSIP_AUTH_PASSWORD", WEB_PASSWORD)
            .stdin(Stdio::null())
            .spawn()
            .expect("start the exporter binary");
        Self { child, web }
    }

    /// (VmRSS, VmHWM) in KiB.
    fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Starts the binary, waits until it is up and bob's phone is on it.
async fn process_world() -> (Simulator, Process, CancellationToken) {
    let (sim, c2s, cancel) = simulator().await;
    let mut process = Process::start(c2s);
    let web = process.web;
    eventually(DEADLINE, "the exporter binary listens", || {
        let up = common::wait::port_accepts(web);
        let alive = process.alive();
        async move {
            assert!(alive, "the exporter binary exited at start");
            up.then_some(())
        }
    })
    .await;
    wait_metric(process.web, "onsip_up", 1.0, DEADLINE).await;
    wait_metric(process.web, "onsip_state_resync_from_items", 1.0, DEADLINE).await;
    sim.register_phone(
        "bob@acme.example",
        "bob-1",
        "sip:bob@192.0.2.20:5060",
        "sip:198.51.100.2:5060",
        "Bob Phone/1.0",
        Utc::now() + chrono::Duration::hours(2),
    );
    wait_metric(process.web, &devices("bob"), 1.0, DEADLINE).await;
    (sim, process, cancel)
}

/// The start of a pubsub event from the service whose payload is an
/// element of another namespace, left open: close with [`CLOSE_FOREIGN`].
fn open_event_with_foreign_payload() -> Vec<u8> {
    format!("<message from='{PUBSUB}' to='{JID}'><event xmlns='{EVENT_NS}'><x xmlns='urn:evil'>")
        .into_bytes()
}

const CLOSE_FOREIGN: &[u8] = b"</x></event></message>";

/// Stanza size the exporter must refuse without buffering it whole.
const GIANT: usize = 50 * 1024 * 1024;

/// Scrapes without panicking when the process is gone (`None` then).
async fn try_scrape(web: SocketAddr) -> Option<HashMap<String, f64>> {
    tokio::time::timeout(Duration::from_secs(5), tokio::spawn(scrape(web)))
        .await
        .ok()?
        .ok()
}

/// Sends a normal publish for alice and waits (up to `limit`) until the
/// exporter process shows it, sampling its peak RSS on the way. Returns the
/// highest VmHWM seen (KiB). Panics if the process dies.
async fn alice_shows(sim: &Simulator, process: &mut Process, n: u32, limit: Duration) -> u64 {
    sim.register_phone(
        "alice@acme.example",
        &format!("alice-{n}"),
        "sip:alice@192.0.2.10:5060",
        "sip:198.51.100.1:5060",
        "Alice Phone/2.0",
        Utc::now() + chrono::Duration::hours(1),
    );
    let deadline = Instant::now() + limit;
    let mut peak = 0;
    loop {
        if !process.alive() {
            let status = process.child.wait().expect("wait");
            panic!("the exporter process died: {status}");
        }
        peak = peak.max(process.memory().1);
        if let Some(m) = try_scrape(process.web).await {
            if m.get(&devices("alice")) == Some(&f64::from(n)) && m.get("onsip_up") == Some(&1.0) {
                return peak;
            }
        }
        assert!(Instant::now() < deadline, "alice's phone {n} never showed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A 50 MB stanza, in two shapes (one 50 MB text node; 1.2 million small
/// elements), inside a pubsub event from the service: the exporter must
/// refuse it without holding it in memory — its peak RSS may not grow by
/// more than a bounded amount — and be back afterwards with bob's state.
/// Prints the figures (set ONSIP_HOSTILE_EXPORTER_BIN to measure a
/// release build).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_giant_stanza_is_refused_with_bounded_memory() {
    let (sim, mut process, cancel) = process_world().await;
    let _guard = CancelOnDrop(cancel);
    let mut report = Vec::new();
    let mut worst = 0;
    for (n, shape) in [(1, "text"), (2, "elements")] {
        let (_, hwm0) = process.memory();
        let mut giant = open_event_with_foreign_payload();
        let filler: &[u8] = match shape {
            "text" => b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz",
            _ => b"<i>0123456789abcdefghijklmnopqrstuvwxyz</i>",
        };
        while giant.len() < GIANT {
            giant.extend_from_slice(filler);
        }
        giant.extend_from_slice(CLOSE_FOREIGN);
        let size = giant.len();
        let started = Instant::now();
        assert_eq!(sim.send_raw(JID, giant), 1);
        let peak = alice_shows(&sim, &mut process, n, Duration::from_secs(180)).await;
        let (rss1, hwm1) = process.memory();
        let growth = hwm1.max(peak).saturating_sub(hwm0) >> 10;
        worst = worst.max(growth);
        let m = try_scrape(process.web).await.expect("scrape");
        report.push(format!(
            "{shape}: {} MiB stanza handled in {:?}, peak RSS +{growth} MiB, RSS after {} MiB, \
             connects_total={:?}",
            size >> 20,
            started.elapsed(),
            rss1 >> 10,
            m.get("onsip_xmpp_connects_total"),
        ));
        assert_eq!(m.get(&devices("bob")), Some(&1.0), "bob's phone kept");
    }
    eprintln!("giant stanzas:\n  {}", report.join("\n  "));
    assert!(
        worst < 64,
        "a 50 MiB stanza raised the exporter's peak RSS by up to {worst} MiB: there is no \
         maximum stanza size (tokio-xmpp 6 / rxml 0.14 cap only one token, at 8 KiB)\n  {}",
        report.join("\n  ")
    );
}

/// A stanza nested 10 000 elements deep (70 KB) must not crash the process:
/// the element tree is built by recursion (xso's minidom builder, two
/// frames per level) on a 2 MiB tokio worker stack. The exporter stays or
/// comes back, with bob's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deeply_nested_stanza_does_not_kill_the_process() {
    let (sim, mut process, cancel) = process_world().await;
    let _guard = CancelOnDrop(cancel);
    let depth = 10_000;
    let mut bomb = open_event_with_foreign_payload();
    bomb.extend(std::iter::repeat_n(b"<a>".iter().copied(), depth).flatten());
    bomb.extend(std::iter::repeat_n(b"</a>".iter().copied(), depth).flatten());
    bomb.extend_from_slice(CLOSE_FOREIGN);
    assert_eq!(sim.send_raw(JID, bomb), 1);
    alice_shows(&sim, &mut process, 1, Duration::from_secs(60)).await;
    let m = try_scrape(process.web).await.expect("scrape");
    assert_eq!(m.get(&devices("bob")), Some(&1.0), "bob's phone kept");
}

// =============================================================================
// Through a real Prosody: odd but well-formed stanzas a server forwards
// =============================================================================

/// The simulator as a component of a real Prosody sends (as its pubsub
/// service) stanzas OnSIP never would but a server forwards: foreign
/// payloads, a thousand items, a subscription notice for a node we do not
/// have, a headline with a body. Prosody delivers them; the exporter counts
/// them and keeps the stream and bob's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_stanzas_forwarded_by_prosody_keep_the_stream() {
    use common::prosody::Prosody;
    let prosody = Prosody::builder().start();
    prosody.register("exporter", XMPP_PASSWORD);
    let jid = prosody.jid("exporter");
    let mut account = Account::new(
        &jid,
        &["alice@acme.example", "bob@acme.example"],
        WEB_PASSWORD,
    );
    account.xmpp_password = XMPP_PASSWORD.into();
    let sim = Simulator::new(SimConfig::new(prosody.domain()).with_account(account));
    let cancel = CancellationToken::new();
    let _guard = CancelOnDrop(cancel.clone());
    tokio::spawn(onsip_sim::attach_component(
        sim.clone(),
        prosody.component_addr(),
        prosody.component_secret().to_owned(),
        cancel.clone(),
    ));
    let probe = sim.clone();
    eventually(DEADLINE, "components attached", || {
        let ok = probe.components_connected();
        async move { ok.then_some(()) }
    })
    .await;
    let flags = Flags {
        sip_address: Some("alice@acme.example".into()),
        ..exporter::flags_for(
            &jid,
            prosody.c2s_addr(),
            prosody.domain(),
            Some(prosody.ca_cert_path()),
        )
    };
    let running = exporter::start(flags, XMPP_PASSWORD, Some(WEB_PASSWORD)).await;
    let addr = running.addr;
    wait_metric(addr, "onsip_up", 1.0, DEADLINE).await;
    wait_metric(addr, "onsip_state_resync_from_items", 1.0, DEADLINE).await;
    sim.register_phone(
        "bob@acme.example",
        "bob-1",
        "sip:bob@192.0.2.20:5060",
        "sip:198.51.100.2:5060",
        "Bob Phone/1.0",
        Utc::now() + chrono::Duration::hours(2),
    );
    wait_metric(addr, &devices("bob"), 1.0, DEADLINE).await;
    let before = scrape(addr).await;
    let bob_before = rows_of(&before, "bob");
    let pubsub = sim.config().pubsub_jid.clone();
    let send = |body: String, extra: &str| {
        let xml = format!(
            "<message xmlns='jabber:client' from='{pubsub}' to='{jid}'{extra}>{body}</message>"
        );
        sim.inject_stanza(xml.parse::<Element>().expect("xml"));
    };
    let event = |inner: &str| format!("<event xmlns='{EVENT_NS}'>{inner}</event>");
    send(event("<x xmlns='urn:evil'/>"), "");
    send(
        event(&format!(
            "<items node='/acme.example/carol'>{}</items>",
            item("c1", "C", "2099-01-01T00:00:00Z").replace("onsip:user-agents", "urn:evil")
        )),
        "",
    );
    send(
        event("<subscription node='/me/nobody@example.com' subscription='none' jid='nobody@example.com'/>"),
        "",
    );
    send(
        format!(
            "<body>hello</body>{}",
            event("<purge node='/acme.example/bob'/>")
        ),
        " type='headline'",
    );
    let mut flood = String::from("<items node='/acme.example/flood'>");
    for i in 0..1000 {
        flood.push_str(&format!("<retract id='r{i}'/>"));
    }
    flood.push_str("</items>");
    send(event(&flood), "");
    sim.register_phone(
        "alice@acme.example",
        "alice-1",
        "sip:alice@192.0.2.10:5060",
        "sip:198.51.100.1:5060",
        "Alice Phone/2.0",
        Utc::now() + chrono::Duration::hours(1),
    );
    wait_metric(addr, &devices("alice"), 1.0, DEADLINE).await;
    let m = scrape(addr).await;
    assert_undisturbed(&m, &before, &bob_before);
    assert_eq!(
        value(&m, &event_kind("ignored")) - value(&before, &event_kind("ignored")),
        2.0,
        "<x> and <purge>"
    );
    assert_eq!(
        value(&m, &event_kind("malformed")) - value(&before, &event_kind("malformed")),
        1.0,
        "carol's item without our payload"
    );
    assert_eq!(
        value(&m, &event_kind("retract")) - value(&before, &event_kind("retract")),
        1000.0
    );
    running.stop().await;
}

/// The parser path of the harness (minidom, xmpp-parsers' typed parse —
/// the exporter's — then `parse_event` and the state) on a stanza nested
/// 8 000 deep (56 KB), on a thread with the stack of a tokio worker
/// (2 MiB): it must not overflow. A stack overflow aborts the process, so
/// this runs in a child process (this test binary, running
/// `deep_nesting_child` only).
#[test]
fn deep_nesting_does_not_overflow_a_worker_stack() {
    let output = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "deep_nesting_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("ONSIP_HOSTILE_CHILD", "deep")
        .stdin(Stdio::null())
        .output()
        .expect("run the child");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "an 8 000-deep stanza through the parsers on a 2 MiB stack: {} — {}",
        output.status,
        stderr
            .lines()
            .filter(|l| l.contains("overflow") || l.contains("panicked"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
}

/// The child of `deep_nesting_does_not_overflow_a_worker_stack`; does
/// nothing unless run by it.
#[test]
fn deep_nesting_child() {
    if std::env::var_os("ONSIP_HOSTILE_CHILD").is_none_or(|v| v != "deep") {
        return;
    }
    let depth = 8_000;
    let text = format!(
        "<message from='{}' to='{}'><event xmlns='{EVENT_NS}'><x xmlns='urn:evil'>{}{}</x></event></message>",
        harness::PUBSUB_JID,
        harness::OUR_BARE_JID,
        "<a>".repeat(depth),
        "</a>".repeat(depth)
    );
    assert!(text.len() < harness::MAX_INPUT);
    assert!(harness::parse_stream(&text).is_some());
    std::thread::Builder::new()
        .stack_size(2 * 1024 * 1024)
        .spawn(move || harness::run_one(text.as_bytes()))
        .expect("spawn")
        .join()
        .expect("the harness panicked");
}
