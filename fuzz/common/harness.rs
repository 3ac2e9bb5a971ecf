//! The stanza-to-state harness shared by the cargo-fuzz target
//! (`fuzz/fuzz_targets/stanza.rs`) and the seeded property tests
//! (`tests/hostile.rs`, which includes this file with `#[path]`).
//!
//! Input: bytes that are read as the inside of a client XML stream (default
//! namespace `jabber:client`), so the seed document's stanzas work verbatim.
//! Every top-level element is handled the way the session handles it: the
//! typed parse of xmpp-parsers first (`Message` / `Iq`, which the exporter's
//! stream does through xso; a refused stanza is skipped), then
//! - `<message>` from the pubsub service to us, not an error, with a pubsub
//!   `<event>`: `stanza::parse_event`, then `State::apply_events`;
//! - `<iq type='result'>` with a payload: `parse_items_reply`
//!   (→ `Fleet::resync`), `parse_subscribe_reply`, `parse_subscriptions_reply`
//!   and, for a `<command>`, `parse_authorize_reply` (→ `Fleet::set_watched`).
//!
//! After every stanza the fleet is compared with a reference model (a plain
//! map of address → item ids, with the same limits) and its own invariants
//! are checked: device count equals the sum over addresses, no address over
//! the per-address cap, no more addresses than the cap, refused counters as
//! the model counts them, per-domain and per-User-Agent sums agree. At the
//! end the metrics are encoded in both formats and the status page rendered.
//! Any disagreement panics, which is what the fuzzer reports.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use minidom::Element;
use onsip_ua_exporter::stanza::{self, ns, PubsubEvent, Registration, SipAddress};
use onsip_ua_exporter::state::{Limits, State};

/// Small limits, so that inputs of a few hundred bytes reach them.
pub fn limits() -> Limits {
    Limits {
        max_addresses: 6,
        max_devices_per_address: 3,
        max_user_agents_per_domain: 2,
        expiry_grace_seconds: 120,
    }
}

/// The node the harness's state is configured with (the seed's).
pub const NODE: &str = "/me/foo@example.com";

/// Fixed clock: 2023-11-14T22:13:20Z.
pub const NOW: f64 = 1_700_000_000.0;

/// Largest input handled (bigger ones are cut): keeps each run fast; the
/// giant-stanza case is an integration test, not a fuzz case.
pub const MAX_INPUT: usize = 64 * 1024;

/// What the fleet should hold, computed the simplest possible way.
#[derive(Debug, Default)]
pub struct Model {
    limits: Limits,
    /// Address → item id → `expires`.
    addresses: BTreeMap<SipAddress, BTreeMap<Arc<str>, Option<i64>>>,
    refused_addresses: u64,
    refused_devices: u64,
}

impl Model {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    fn entry(&mut self, address: &SipAddress) -> Option<&mut BTreeMap<Arc<str>, Option<i64>>> {
        if !self.addresses.contains_key(address) {
            if self.addresses.len() >= self.limits.max_addresses {
                self.refused_addresses += 1;
                return None;
            }
            self.addresses.insert(address.clone(), BTreeMap::new());
        }
        self.addresses.get_mut(address)
    }

    pub fn publish(&mut self, address: &SipAddress, id: &Arc<str>, expires: Option<i64>) {
        let max = self.limits.max_devices_per_address;
        let Some(devices) = self.entry(address) else {
            return;
        };
        if let Some(slot) = devices.get_mut(id) {
            *slot = expires;
        } else if devices.len() >= max {
            self.refused_devices += 1;
        } else {
            devices.insert(id.clone(), expires);
        }
    }

    pub fn retract(&mut self, address: &SipAddress, id: &str) {
        if let Some(devices) = self.addresses.get_mut(address) {
            devices.remove(id);
        }
    }

    pub fn watch(&mut self, addresses: &[SipAddress]) {
        for address in addresses {
            let _ = self.entry(address);
        }
    }

    /// A full items retrieval over every address (the harness's scope).
    pub fn resync(&mut self, items: &[(SipAddress, Arc<str>, Registration)]) {
        let fresh: BTreeSet<(&SipAddress, &Arc<str>)> =
            items.iter().map(|(a, id, _)| (a, id)).collect();
        for (address, devices) in &mut self.addresses {
            devices.retain(|id, _| fresh.contains(&(address, id)));
        }
        for (address, id, registration) in items {
            self.publish(address, id, registration.expires);
        }
    }

    pub fn expire(&mut self, now: f64) {
        let deadline = now as i64 - self.limits.expiry_grace_seconds;
        for devices in self.addresses.values_mut() {
            devices.retain(|_, expires| !expires.is_some_and(|e| e < deadline));
        }
    }

    pub fn device_count(&self) -> usize {
        self.addresses.values().map(BTreeMap::len).sum()
    }
}

/// Panics unless `state`'s fleet agrees with `model` and with itself.
pub fn check(state: &State, model: &Model) {
    let fleet = &state.fleet;
    let limits = fleet.limits().clone();
    let mut seen: BTreeMap<SipAddress, BTreeSet<Arc<str>>> = BTreeMap::new();
    let mut sum = 0usize;
    fleet.for_each_address(|domain, user, address| {
        assert!(
            address.devices.len() <= limits.max_devices_per_address,
            "{user}@{domain} holds {} devices, over the cap {}",
            address.devices.len(),
            limits.max_devices_per_address
        );
        sum += address.devices.len();
        let key = SipAddress {
            domain: domain.clone(),
            user: user.clone(),
        };
        let ids = address.devices.keys().cloned().collect();
        assert!(seen.insert(key, ids).is_none(), "address listed twice");
    });
    assert_eq!(
        fleet.device_count(),
        sum,
        "device count != sum over addresses"
    );
    assert_eq!(fleet.address_count(), seen.len(), "address count != listed");
    assert!(
        fleet.address_count() <= limits.max_addresses,
        "over max_addresses"
    );
    let expected: BTreeMap<SipAddress, BTreeSet<Arc<str>>> = model
        .addresses
        .iter()
        .map(|(a, ids)| (a.clone(), ids.keys().cloned().collect()))
        .collect();
    assert_eq!(seen, expected, "fleet differs from the model");
    assert_eq!(fleet.device_count(), model.device_count());
    assert_eq!(
        (fleet.refused_addresses, fleet.refused_devices),
        (model.refused_addresses, model.refused_devices),
        "refused counters differ from the model"
    );
    for per_address in [true, false] {
        let snapshot = fleet.snapshot(per_address);
        let devices: u64 = snapshot.domains.iter().map(|d| d.devices).sum();
        assert_eq!(devices as usize, sum, "domain rows do not add up");
        for domain in &snapshot.domains {
            let by_ua: u64 = domain.by_user_agent.iter().map(|(_, n)| n).sum();
            assert_eq!(by_ua, domain.devices, "per-UA rows of {}", domain.domain);
            assert!(
                domain.by_user_agent.len() <= limits.max_user_agents_per_domain + 1,
                "too many UA series in {}",
                domain.domain
            );
            assert!(domain.online <= domain.addresses);
        }
        if per_address {
            assert_eq!(snapshot.addresses.len(), seen.len());
            let rows: u64 = snapshot.addresses.iter().map(|r| r.devices).sum();
            assert_eq!(rows as usize, sum);
        } else {
            assert!(snapshot.addresses.is_empty());
        }
    }
}

/// Touches the helpers that read attribute values and texts, so that
/// hostile strings reach them too.
fn poke(element: &Element, depth: usize) {
    if depth > 64 {
        return;
    }
    for (_, value) in element.attrs() {
        let _ = SipAddress::parse(value);
        let _ = SipAddress::from_leaf_node(value);
        let _ = stanza::SubscriptionState::parse(value);
    }
    let _ = stanza::parse_timestamp(element.text().trim());
    if element.is("user-agent", ns::USER_AGENTS) {
        let _ = stanza::parse_user_agent(element);
    }
    for child in element.children() {
        poke(child, depth + 1);
    }
}

/// Mirrors one message's events into the model (publish and retract only).
fn mirror(model: &mut Model, events: &[PubsubEvent]) {
    for event in events {
        match event {
            PubsubEvent::Publish {
                address,
                item_id,
                registration,
            } => model.publish(address, item_id, registration.expires),
            PubsubEvent::Retract { address, item_id } => model.retract(address, item_id),
            _ => {}
        }
    }
}

/// The pubsub service and our JID in the harness (the seed document's).
pub const PUBSUB_JID: &str = "pubsub.user-agents.xmpp.onsip.com";
pub const OUR_BARE_JID: &str = "foo@example.com";

/// Applies one `<event>` payload to the state and the model, then checks.
fn apply_event(state: &mut State, model: &mut Model, event: &Element) {
    let mut events = Vec::new();
    stanza::parse_event(event, &mut events);
    let outcome = state.apply_events(&events, NOW);
    let malformed = events
        .iter()
        .filter(|e| matches!(e, PubsubEvent::Malformed(_)))
        .count();
    assert_eq!(outcome.malformed.len(), malformed);
    mirror(model, &events);
    check(state, model);
}

/// Handles one iq result payload as the workflow would.
fn apply_iq_payload(state: &mut State, model: &mut Model, payload: &Element) {
    let _ = stanza::parse_subscribe_reply(Some(payload));
    let _ = stanza::parse_subscriptions_reply(Some(payload));
    if payload.name() == "command" {
        if let Ok(auth) = stanza::parse_authorize_reply(payload) {
            state.fleet.set_watched(&auth.addresses);
            model.watch(&auth.addresses);
            check(state, model);
        }
        return;
    }
    let mut events = Vec::new();
    stanza::parse_items_reply(Some(payload), &mut events);
    let items: Vec<(SipAddress, Arc<str>, Registration)> = events
        .into_iter()
        .filter_map(|e| match e {
            PubsubEvent::Publish {
                address,
                item_id,
                registration,
            } => Some((address, item_id, registration)),
            _ => None,
        })
        .collect();
    if !items.is_empty() {
        state.fleet.resync(|_| true, &items, NOW);
        model.resync(&items);
        check(state, model);
    }
}

/// Handles one stanza as the session would, checking after each step: the
/// typed parse of xmpp-parsers first (what the exporter's stream does; a
/// stanza it refuses is skipped), then the session's filters, then our
/// parsers on the payload.
pub fn handle(state: &mut State, model: &mut Model, stanza_el: &Element) {
    use xmpp_parsers::iq::Iq;
    use xmpp_parsers::jid::Jid;
    use xmpp_parsers::message::{Message, MessageType};

    poke(stanza_el, 0);
    match stanza_el.name() {
        "message" => {
            let Ok(message) = Message::try_from(stanza_el.clone()) else {
                return;
            };
            let from_service =
                message.from.as_ref().map(Jid::to_string).as_deref() == Some(PUBSUB_JID);
            let to_us = message
                .to
                .as_ref()
                .is_none_or(|to| to.to_bare().to_string() == OUR_BARE_JID);
            if !from_service || !to_us || message.type_ == MessageType::Error {
                return;
            }
            if let Some(event) = message
                .payloads
                .iter()
                .find(|p| p.is("event", ns::PUBSUB_EVENT))
            {
                apply_event(state, model, event);
            }
        }
        "iq" => {
            if let Ok(Iq::Result {
                payload: Some(payload),
                ..
            }) = Iq::try_from(stanza_el.clone())
            {
                apply_iq_payload(state, model, &payload);
            }
        }
        _ => {}
    }
}

/// Reads `text` as the inside of a client stream; `None` if it is not
/// well-formed (the real stream would end there).
pub fn parse_stream(text: &str) -> Option<Element> {
    let wrapped = format!(
        "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>{text}</stream:stream>"
    );
    wrapped.parse::<Element>().ok()
}

/// One fuzz case: bytes in, panics on any broken invariant.
pub fn run_one(data: &[u8]) {
    let data = &data[..data.len().min(MAX_INPUT)];
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The exporter's byte-level guard runs before any XML parser: what it
    // refuses (too big, too deep) ends the stream and is never parsed.
    let mut guard = onsip_ua_exporter::xml_guard::Scanner::new(Default::default());
    let header =
        "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>";
    if guard.scan(header.as_bytes()).is_err() || guard.scan(text.as_bytes()).is_err() {
        return;
    }
    // A lone stanza that is not well-formed on its own also goes through
    // minidom directly (another parse path, another error path).
    let _ = text.parse::<Element>();
    let Some(stream) = parse_stream(text) else {
        return;
    };
    let mut state = State::new(limits(), &[NODE.to_owned()]);
    let mut model = Model::new(limits());
    for stanza_el in stream.children() {
        handle(&mut state, &mut model, stanza_el);
    }
    // Expiry at a time chosen by the input.
    let later = NOW + (data.len() as f64) * 3600.0;
    state.expire(later);
    model.expire(later);
    check(&state, &model);
    render(state);
}

/// Encodes the metrics (both formats) and renders the status page.
pub fn render(state: State) {
    let shared = Arc::new(Mutex::new(state));
    let metrics = onsip_ua_exporter::metrics::Metrics::new(
        shared.clone(),
        true,
        onsip_ua_exporter::metrics::BuildInfo {
            version: "fuzz",
            revision: "fuzz",
        },
    );
    for format in [
        onsip_ua_exporter::metrics::Format::Text,
        onsip_ua_exporter::metrics::Format::OpenMetrics,
    ] {
        let text = metrics.encode(format).expect("metrics encode");
        check_exposition(&text);
    }
    let state = shared.lock().unwrap_or_else(|p| p.into_inner());
    let view = onsip_ua_exporter::page::StatusView::from_state(&state, "fuzz", NOW);
    let html = onsip_ua_exporter::page::render_html(&view, "/metrics");
    check_html_tags(&html);
}

/// The tags the status page itself writes: any other tag came from input
/// that was not escaped.
const PAGE_TAGS: &[&str] = &[
    "!doctype", "html", "head", "meta", "title", "style", "body", "main", "header", "footer", "h1",
    "h2", "h3", "p", "a", "span", "table", "thead", "tbody", "tr", "th", "td", "ul", "ol", "li",
    "code", "small", "section", "div", "nav", "strong", "em", "b", "i", "br", "time", "details",
    "summary", "pre", "abbr",
];

/// Panics if the page holds a tag outside [`PAGE_TAGS`].
pub fn check_html_tags(html: &str) {
    for (i, _) in html.match_indices('<') {
        let rest = html[i + 1..].trim_start_matches('/');
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '!' || *c == '-')
            .collect::<String>()
            .to_ascii_lowercase();
        assert!(
            PAGE_TAGS.contains(&name.as_str()),
            "status page holds an unexpected tag <{name}…> (unescaped input?) near {:?}",
            &html[i..html.len().min(i + 80)]
        );
    }
}

/// Every line of an exposition is a comment, `# EOF`, or one sample whose
/// label values keep their quotes balanced: a hostile User-Agent string must
/// not break a line or a label set open.
pub fn check_exposition(text: &str) {
    let mut per_name: HashMap<&str, usize> = HashMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("sample without value: {line:?}"));
        let name = &line[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        *per_name.entry(name).or_default() += 1;
        let rest = &line[name_end..];
        let value_part = if let Some(labels) = rest.strip_prefix('{') {
            // Walk the label set honouring escapes.
            let mut in_quotes = false;
            let mut escaped = false;
            let mut end = None;
            for (i, c) in labels.char_indices() {
                if escaped {
                    escaped = false;
                    continue;
                }
                match c {
                    '\\' if in_quotes => escaped = true,
                    '"' => in_quotes = !in_quotes,
                    '}' if !in_quotes => {
                        end = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let end = end.unwrap_or_else(|| panic!("unterminated label set: {line:?}"));
            &labels[end + 1..]
        } else {
            rest
        };
        let value = value_part
            .split_whitespace()
            .next()
            .unwrap_or_else(|| panic!("no value: {line:?}"));
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "bad value {value:?} in {line:?}"
        );
    }
}
