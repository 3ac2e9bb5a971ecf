//! What the exporter knows about the fleet: the devices registered per SIP
//! address, with the counters the metrics contract asks for.
//!
//! Pure: no I/O, no clock (every call takes `now` in Unix seconds), so every
//! event order can be unit-tested. The session feeds it events; the metrics
//! and the status page read copies of it (`snapshot`), never holding the lock
//! while they encode.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::stanza::{PubsubEvent, Registration, SipAddress};
use crate::status::{
    EventKind, NodeState, NodeStatus, PersistStatus, Recent, RecentChange, SessionStatus,
};

/// Bounds that keep a hostile or runaway feed from eating the host.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// SIP addresses kept at most; events for more are refused and counted.
    pub max_addresses: usize,
    /// Devices kept per address at most.
    pub max_devices_per_address: usize,
    /// Distinct User-Agent strings exported per domain; the rest count as `other`.
    pub max_user_agents_per_domain: usize,
    /// Seconds past a registration's `expires` before it is dropped as stale.
    pub expiry_grace_seconds: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_addresses: 250_000,
            max_devices_per_address: 64,
            max_user_agents_per_domain: 50,
            expiry_grace_seconds: 120,
        }
    }
}

/// One registered device (a user agent), keyed by its pubsub item id.
#[derive(Clone, Debug, PartialEq)]
pub struct Device {
    pub registration: Registration,
    /// The User-Agent string, shared with the domain's per-UA counts.
    pub user_agent: Arc<str>,
    /// When we first saw this item id, Unix seconds.
    pub first_seen: f64,
    /// When it was last published (registered or refreshed).
    pub last_seen: f64,
}

/// Everything kept per SIP address.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AddressState {
    pub devices: HashMap<Arc<str>, Device>,
    /// Authorized for or configured: exported even with no device.
    pub watched: bool,
    pub registrations: u64,
    pub refreshes: u64,
    pub retracts: u64,
    pub expirations: u64,
    /// When the device set last changed, Unix seconds.
    pub last_change: Option<f64>,
    /// `latest_expiry()`, kept up to date on every change of `devices` by
    /// `Fleet`, so a snapshot need not walk each address's devices (a cache
    /// miss or two per address, under the lock).
    latest: Option<i64>,
}

impl AddressState {
    fn devices_changed(&mut self) {
        self.latest = self.latest_expiry();
    }

    /// The latest `expires` among the devices.
    pub fn latest_expiry(&self) -> Option<i64> {
        self.devices
            .values()
            .filter_map(|d| d.registration.expires)
            .max()
    }
}

#[derive(Clone, Debug, Default)]
struct DomainState {
    addresses: HashMap<Arc<str>, AddressState>,
    /// Devices per User-Agent string, kept up to date on every change so a
    /// scrape need not walk every device.
    user_agents: HashMap<Arc<str>, u32>,
}

/// What applying one event did; the caller counts and logs from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// A new item id: a device came online.
    Registered,
    /// An id we already held: a re-registration.
    Refreshed,
    /// A held id was retracted: a device went offline.
    Retracted,
    /// A retract for an id we do not hold: nothing changes.
    UnknownRetract,
    /// Refused because a limit was reached.
    RefusedAddressLimit,
    RefusedDeviceLimit,
    /// Not a fleet event (subscription notices, ignored or malformed parts).
    NotFleet,
}

/// The devices of every known SIP address.
#[derive(Clone, Debug, Default)]
pub struct Fleet {
    domains: HashMap<Arc<str>, DomainState>,
    addresses: usize,
    devices: usize,
    limits: Limits,
    /// Events refused by a limit, by kind (addresses, devices).
    pub refused_addresses: u64,
    pub refused_devices: u64,
    /// Bumped on every change worth persisting (see `persist`).
    generation: u64,
}

impl Fleet {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A number that changes whenever the devices or watched set change.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Number of known SIP addresses.
    pub fn address_count(&self) -> usize {
        self.addresses
    }

    /// Number of registered devices.
    pub fn device_count(&self) -> usize {
        self.devices
    }

    /// The state of one address, if known.
    pub fn address(&self, address: &SipAddress) -> Option<&AddressState> {
        self.domains
            .get(&address.domain)?
            .addresses
            .get(&address.user)
    }

    /// Visits every known address.
    pub fn for_each_address(&self, mut f: impl FnMut(&Arc<str>, &Arc<str>, &AddressState)) {
        for (domain, state) in &self.domains {
            for (user, address) in &state.addresses {
                f(domain, user, address);
            }
        }
    }

    /// Finds or creates an address entry, honouring `max_addresses`.
    fn entry(
        &mut self,
        address: &SipAddress,
    ) -> Option<(&mut AddressState, &mut HashMap<Arc<str>, u32>)> {
        let known = self
            .domains
            .get(&address.domain)
            .is_some_and(|d| d.addresses.contains_key(&address.user));
        if !known && self.addresses >= self.limits.max_addresses {
            self.refused_addresses += 1;
            return None;
        }
        let domain = self.domains.entry(address.domain.clone()).or_default();
        if !known {
            self.addresses += 1;
            domain
                .addresses
                .insert(address.user.clone(), AddressState::default());
        }
        // The address's state and its domain's per-UA counts are borrowed
        // apart: a publish updates both.
        let DomainState {
            addresses,
            user_agents,
        } = domain;
        let state = addresses.get_mut(&address.user)?;
        Some((state, user_agents))
    }

    /// Applies one parsed event at time `now` (Unix seconds).
    pub fn apply(&mut self, event: &PubsubEvent, now: f64) -> Applied {
        match event {
            PubsubEvent::Publish {
                address,
                item_id,
                registration,
            } => self.publish(address, item_id, registration, now, true),
            PubsubEvent::Retract { address, item_id } => self.retract(address, item_id, now),
            _ => Applied::NotFleet,
        }
    }

    /// Adds or updates a device. `republished` says whether OnSIP published
    /// it again (a re-registration, counted as a refresh) or we merely read it
    /// back (items retrieval, not counted).
    fn publish(
        &mut self,
        address: &SipAddress,
        item_id: &Arc<str>,
        registration: &Registration,
        now: f64,
        republished: bool,
    ) -> Applied {
        let max_devices = self.limits.max_devices_per_address;
        let Some((state, user_agents)) = self.entry(address) else {
            return Applied::RefusedAddressLimit;
        };
        if let Some(device) = state.devices.get_mut(item_id) {
            if device.registration.device != registration.device {
                uncount_user_agent(user_agents, &device.user_agent);
                device.user_agent = count_user_agent(user_agents, &registration.device);
            }
            let changed = device.registration != *registration;
            if changed {
                device.registration = registration.clone();
            }
            if republished {
                device.last_seen = now;
                state.refreshes += 1;
            }
            if changed {
                state.devices_changed();
            }
            if changed || republished {
                self.generation += 1;
            }
            return Applied::Refreshed;
        }
        if state.devices.len() >= max_devices {
            self.refused_devices += 1;
            return Applied::RefusedDeviceLimit;
        }
        let user_agent = count_user_agent(user_agents, &registration.device);
        state.devices.insert(
            item_id.clone(),
            Device {
                registration: registration.clone(),
                user_agent,
                first_seen: now,
                last_seen: now,
            },
        );
        state.registrations += 1;
        state.last_change = Some(now);
        state.devices_changed();
        self.devices += 1;
        self.generation += 1;
        Applied::Registered
    }

    fn retract(&mut self, address: &SipAddress, item_id: &str, now: f64) -> Applied {
        let Some(domain) = self.domains.get_mut(&address.domain) else {
            return Applied::UnknownRetract;
        };
        let Some(state) = domain.addresses.get_mut(&address.user) else {
            return Applied::UnknownRetract;
        };
        // A retract for an id we do not hold (one that registered before we
        // subscribed, or a duplicate) changes nothing and is not counted.
        match state.devices.remove(item_id) {
            Some(device) => {
                uncount_user_agent(&mut domain.user_agents, &device.user_agent);
                state.retracts += 1;
                state.last_change = Some(now);
                state.devices_changed();
                self.devices -= 1;
                self.generation += 1;
                Applied::Retracted
            }
            None => Applied::UnknownRetract,
        }
    }

    /// Drops devices whose registration expired more than the grace period
    /// ago with no refresh or retract (OnSIP may have missed the retract).
    /// Returns the addresses and item ids dropped.
    pub fn expire(&mut self, now: f64) -> Vec<(SipAddress, Arc<str>)> {
        let deadline = now as i64 - self.limits.expiry_grace_seconds;
        let mut dropped = Vec::new();
        for (domain_name, domain) in &mut self.domains {
            for (user, state) in &mut domain.addresses {
                let before = state.devices.len();
                state.devices.retain(|id, device| {
                    let stale = device.registration.expires.is_some_and(|e| e < deadline);
                    if stale {
                        uncount_user_agent(&mut domain.user_agents, &device.user_agent);
                        dropped.push((
                            SipAddress {
                                domain: domain_name.clone(),
                                user: user.clone(),
                            },
                            id.clone(),
                        ));
                    }
                    !stale
                });
                let gone = before - state.devices.len();
                if gone > 0 {
                    state.expirations += gone as u64;
                    state.last_change = Some(now);
                    state.devices_changed();
                    self.devices -= gone;
                    self.generation += 1;
                }
            }
        }
        dropped
    }

    /// Marks exactly `addresses` as watched (authorized or configured): they
    /// are exported with `0` devices until one registers. Addresses no longer
    /// watched stay known (their history matters to alerts) but are unmarked.
    pub fn set_watched<'a>(&mut self, addresses: impl IntoIterator<Item = &'a SipAddress>) {
        for domain in self.domains.values_mut() {
            for state in domain.addresses.values_mut() {
                state.watched = false;
            }
        }
        for address in addresses {
            if let Some((state, _)) = self.entry(address) {
                state.watched = true;
            }
        }
        self.generation += 1;
    }

    /// Puts back an address as saved by `persist` (devices, watched flag,
    /// last change); counters start at zero as after any restart. Devices
    /// past the per-address limit are refused and counted.
    pub fn restore(
        &mut self,
        address: &SipAddress,
        watched: bool,
        last_change: Option<f64>,
        devices: Vec<(Arc<str>, Registration, f64, f64)>,
    ) {
        let max_devices = self.limits.max_devices_per_address;
        let Some((state, user_agents)) = self.entry(address) else {
            return;
        };
        state.watched |= watched;
        state.last_change = last_change;
        let mut added = 0;
        let mut refused = 0;
        for (id, registration, first_seen, last_seen) in devices {
            if state.devices.len() >= max_devices {
                refused += 1;
                continue;
            }
            let user_agent = count_user_agent(user_agents, &registration.device);
            if let Some(old) = state.devices.insert(
                id,
                Device {
                    registration,
                    user_agent,
                    first_seen,
                    last_seen,
                },
            ) {
                uncount_user_agent(user_agents, &old.user_agent);
            } else {
                added += 1;
            }
        }
        state.devices_changed();
        self.devices += added;
        self.refused_devices += refused;
        self.generation += 1;
    }

    /// Replaces the devices of every address for which `in_scope` holds with
    /// exactly `items` (a full items retrieval), counting the differences as
    /// registrations and retracts so the counters stay truthful.
    pub fn resync(
        &mut self,
        in_scope: impl Fn(&SipAddress) -> bool,
        items: &[(SipAddress, Arc<str>, Registration)],
        now: f64,
    ) {
        let mut held: Vec<(SipAddress, Arc<str>)> = Vec::new();
        self.for_each_address(|domain, user, state| {
            let address = SipAddress {
                domain: domain.clone(),
                user: user.clone(),
            };
            if in_scope(&address) {
                held.extend(state.devices.keys().map(|id| (address.clone(), id.clone())));
            }
        });
        let fresh: std::collections::HashSet<(&SipAddress, &Arc<str>)> =
            items.iter().map(|(a, id, _)| (a, id)).collect();
        for (address, id) in &held {
            if !fresh.contains(&(address, id)) {
                self.retract(address, id, now);
            }
        }
        for (address, id, registration) in items {
            self.publish(address, id, registration, now, false);
        }
    }

    /// A copy of what the metrics need, taken quickly under the caller's lock.
    pub fn snapshot(&self, per_address: bool) -> FleetSnapshot {
        let mut snapshot = FleetSnapshot::default();
        self.snapshot_part(
            per_address,
            &mut SnapshotCursor::default(),
            usize::MAX,
            &mut snapshot,
        );
        snapshot
    }

    /// Copies up to `max_rows` more addresses into `out`, from where
    /// `cursor` stopped; returns true once the copy is complete. A scrape
    /// takes the lock once per part, so a large fleet never stalls event
    /// ingestion for long (8,192 rows: ~1 ms). Rows of different parts are
    /// from moments a few ms apart; each row, and each domain's figures
    /// (summed from the same rows), is consistent. The copy resumes by
    /// position, which holds while no address or domain is added: when one
    /// was, it starts over, and after two restarts completes in one go.
    pub fn snapshot_part(
        &self,
        per_address: bool,
        cursor: &mut SnapshotCursor,
        max_rows: usize,
        out: &mut FleetSnapshot,
    ) -> bool {
        let layout = (self.domains.len(), self.addresses);
        if cursor.layout.is_some_and(|l| l != layout) {
            *out = FleetSnapshot::default();
            *cursor = SnapshotCursor {
                restarts: cursor.restarts + 1,
                ..SnapshotCursor::default()
            };
        }
        if cursor.layout.is_none() {
            out.addresses
                .reserve(if per_address { self.addresses } else { 0 });
            out.domains.reserve(self.domains.len());
        }
        cursor.layout = Some(layout);
        let mut budget = if cursor.restarts > 2 {
            usize::MAX
        } else {
            max_rows.max(1)
        };
        out.refused_addresses = self.refused_addresses;
        out.refused_devices = self.refused_devices;
        for (domain_name, domain) in self.domains.iter().skip(cursor.domain) {
            if budget == 0 {
                return false;
            }
            if cursor.address == 0 {
                out.domains.push(DomainRow {
                    domain: domain_name.clone(),
                    addresses: domain.addresses.len() as u64,
                    online: 0,
                    devices: 0,
                    by_user_agent: bounded_user_agents(
                        &domain.user_agents,
                        self.limits.max_user_agents_per_domain,
                    ),
                });
            }
            let FleetSnapshot {
                addresses, domains, ..
            } = out;
            let Some(row) = domains.last_mut() else {
                break;
            };
            for (user, state) in domain.addresses.iter().skip(cursor.address) {
                if budget == 0 {
                    return false;
                }
                budget -= 1;
                cursor.address += 1;
                row.devices += state.devices.len() as u64;
                if !state.devices.is_empty() {
                    row.online += 1;
                }
                if per_address {
                    addresses.push(AddressRow {
                        domain: domain_name.clone(),
                        user: user.clone(),
                        devices: state.devices.len() as u64,
                        registrations: state.registrations,
                        refreshes: state.refreshes,
                        retracts: state.retracts,
                        expirations: state.expirations,
                        latest_expiry: state.latest,
                        last_change: state.last_change,
                    });
                }
            }
            cursor.domain += 1;
            cursor.address = 0;
        }
        true
    }
}

fn count_user_agent(counts: &mut HashMap<Arc<str>, u32>, user_agent: &str) -> Arc<str> {
    if let Some((key, _)) = counts.get_key_value(user_agent) {
        let key = key.clone();
        if let Some(count) = counts.get_mut(user_agent) {
            *count += 1;
        }
        return key;
    }
    let key: Arc<str> = Arc::from(user_agent);
    counts.insert(key.clone(), 1);
    key
}

fn uncount_user_agent(counts: &mut HashMap<Arc<str>, u32>, user_agent: &str) {
    if let Some(count) = counts.get_mut(user_agent) {
        *count -= 1;
        if *count == 0 {
            counts.remove(user_agent);
        }
    }
}

/// The `limit` most common User-Agent strings, the rest summed as `other`.
fn bounded_user_agents(counts: &HashMap<Arc<str>, u32>, limit: usize) -> Vec<(Arc<str>, u64)> {
    let mut rows: Vec<(Arc<str>, u64)> = counts
        .iter()
        .map(|(ua, n)| (ua.clone(), u64::from(*n)))
        .collect();
    if rows.len() > limit {
        rows.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let other: u64 = rows[limit..].iter().map(|(_, n)| n).sum();
        rows.truncate(limit);
        rows.push((Arc::from("other"), other));
    }
    rows
}

/// Where a snapshot taken in parts stands: see [`Fleet::snapshot_part`].
#[derive(Clone, Debug, Default)]
pub struct SnapshotCursor {
    domain: usize,
    address: usize,
    /// (domains, addresses) when the copy began.
    layout: Option<(usize, usize)>,
    restarts: u32,
}

/// Per-address figures, copied out for encoding.
#[derive(Clone, Debug, PartialEq)]
pub struct AddressRow {
    pub domain: Arc<str>,
    pub user: Arc<str>,
    pub devices: u64,
    pub registrations: u64,
    pub refreshes: u64,
    pub retracts: u64,
    pub expirations: u64,
    pub latest_expiry: Option<i64>,
    pub last_change: Option<f64>,
}

/// Per-domain figures, copied out for encoding.
#[derive(Clone, Debug, PartialEq)]
pub struct DomainRow {
    pub domain: Arc<str>,
    pub addresses: u64,
    pub online: u64,
    pub devices: u64,
    pub by_user_agent: Vec<(Arc<str>, u64)>,
}

/// A copy of the fleet for one scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FleetSnapshot {
    pub addresses: Vec<AddressRow>,
    pub domains: Vec<DomainRow>,
    pub refused_addresses: u64,
    pub refused_devices: u64,
}

/// Everything the session writes and the HTTP side reads, behind one lock.
///
/// The lock is a std `Mutex`: sections are short (apply one message, or copy
/// a snapshot) and never cross an `.await`.
#[derive(Debug)]
pub struct State {
    pub fleet: Fleet,
    pub session: SessionStatus,
    pub recent: Recent,
    pub persist: PersistStatus,
}

/// The handle both sides hold.
pub type Shared = Arc<Mutex<State>>;

/// What one message changed, for the session's logs.
#[derive(Debug, Default, PartialEq)]
pub struct MessageOutcome {
    pub malformed: Vec<String>,
    /// Subscription notices: (node, new state) of configured nodes.
    pub subscriptions: Vec<(String, NodeState)>,
}

impl State {
    pub fn new(limits: Limits, nodes: &[String]) -> Self {
        Self {
            fleet: Fleet::new(limits),
            session: SessionStatus::new(nodes),
            recent: Recent::new(RECENT_CHANGES),
            persist: PersistStatus::default(),
        }
    }

    /// Applies every event of one message and counts it by kind.
    pub fn apply_events(&mut self, events: &[PubsubEvent], now: f64) -> MessageOutcome {
        let mut outcome = MessageOutcome::default();
        for event in events {
            let kind = match event {
                PubsubEvent::Publish { .. } => EventKind::Publish,
                PubsubEvent::Retract { .. } => EventKind::Retract,
                PubsubEvent::Subscription(_) => EventKind::Subscription,
                PubsubEvent::Ignored => EventKind::Ignored,
                PubsubEvent::Malformed(_) => EventKind::Malformed,
            };
            self.session.count_event(kind, now);
            match event {
                PubsubEvent::Malformed(err) => outcome.malformed.push(err.to_string()),
                PubsubEvent::Subscription(info) => {
                    if let Some(node) = self.subscription_target(info.node.as_deref()) {
                        node.state = NodeState::from(info.state);
                        if info.subid.is_some() {
                            node.subid.clone_from(&info.subid);
                        }
                        outcome.subscriptions.push((node.node.clone(), node.state));
                    }
                }
                PubsubEvent::Publish {
                    address,
                    registration,
                    ..
                } => {
                    if self.fleet.apply(event, now) == Applied::Registered {
                        self.note(now, address, "registered", &registration.device);
                    }
                }
                PubsubEvent::Retract { address, .. } => {
                    if self.fleet.apply(event, now) == Applied::Retracted {
                        self.note(now, address, "retracted", "");
                    }
                }
                PubsubEvent::Ignored => {}
            }
        }
        outcome
    }

    /// The configured node a subscription notice is about: by name (ours or
    /// the one a redirect gave it), or, when the notice names none, the only
    /// node still pending.
    fn subscription_target(&mut self, node: Option<&str>) -> Option<&mut NodeStatus> {
        let by_name = node.and_then(|n| {
            self.session
                .nodes
                .iter()
                .position(|s| s.node == n || s.target.as_deref() == Some(n))
        });
        let index = by_name.or_else(|| {
            let mut pending = self
                .session
                .nodes
                .iter()
                .enumerate()
                .filter(|(_, n)| n.state == NodeState::Pending);
            match (pending.next(), pending.next()) {
                (Some((i, _)), None) => Some(i),
                _ => None,
            }
        })?;
        self.session.nodes.get_mut(index)
    }

    /// Drops stale registrations (see `Fleet::expire`) and notes them.
    pub fn expire(&mut self, now: f64) -> usize {
        let dropped = self.fleet.expire(now);
        for (address, _) in &dropped {
            self.note(now, address, "expired", "");
        }
        dropped.len()
    }

    fn note(&mut self, at: f64, address: &SipAddress, what: &'static str, device: &str) {
        self.recent.push(RecentChange {
            at,
            address: address.to_string(),
            what,
            device: device.to_owned(),
        });
    }
}

/// Lines of history kept for the status page.
const RECENT_CHANGES: usize = 50;

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SipAddress {
        SipAddress::parse(s).expect("address")
    }

    fn publish(address: &str, id: &str, device: &str, expires: Option<i64>) -> PubsubEvent {
        PubsubEvent::Publish {
            address: addr(address),
            item_id: Arc::from(id),
            registration: Registration {
                contact: format!("sip:{address}"),
                received: "sip:192.0.2.1:5060".into(),
                device: device.into(),
                expires,
            },
        }
    }

    fn retract(address: &str, id: &str) -> PubsubEvent {
        PubsubEvent::Retract {
            address: addr(address),
            item_id: Arc::from(id),
        }
    }

    fn row<'a>(snapshot: &'a FleetSnapshot, user: &str) -> &'a AddressRow {
        snapshot
            .addresses
            .iter()
            .find(|r| &*r.user == user)
            .expect("row")
    }

    #[test]
    fn a_snapshot_in_parts_equals_one_in_one_go() {
        let mut fleet = Fleet::new(Limits::default());
        for i in 0..500 {
            let address = format!("u{i}@d{}.com", i % 7);
            fleet.apply(&publish(&address, "1", "P", Some(i)), 1.0);
        }
        let sorted = |mut s: FleetSnapshot| {
            s.addresses
                .sort_by(|a, b| (&a.domain, &a.user).cmp(&(&b.domain, &b.user)));
            s.domains.sort_by(|a, b| a.domain.cmp(&b.domain));
            s
        };
        let whole = sorted(fleet.snapshot(true));
        assert_eq!(whole.addresses.len(), 500);
        assert_eq!(
            whole
                .addresses
                .iter()
                .filter_map(|r| r.latest_expiry)
                .count(),
            500
        );
        let mut parts = FleetSnapshot::default();
        let mut cursor = SnapshotCursor::default();
        let mut rounds = 0;
        while !fleet.snapshot_part(true, &mut cursor, 64, &mut parts) {
            rounds += 1;
            if rounds == 3 {
                // A new address between two parts: the copy starts over.
                fleet.apply(&publish("new@d0.com", "1", "P", Some(9)), 2.0);
            }
        }
        assert!(rounds > 8);
        let mut expected = fleet.snapshot(true);
        expected = sorted(expected);
        assert_eq!(sorted(parts), expected);
        assert_ne!(expected, whole);
    }

    #[test]
    fn the_latest_expiry_follows_every_change() {
        let limits = Limits {
            expiry_grace_seconds: 0,
            ..Limits::default()
        };
        let mut fleet = Fleet::new(limits);
        let latest = |f: &Fleet| row(&f.snapshot(true), "a").latest_expiry;
        fleet.apply(&publish("a@d.com", "1", "P", Some(100)), 1.0);
        fleet.apply(&publish("a@d.com", "2", "P", Some(300)), 1.0);
        assert_eq!(latest(&fleet), Some(300));
        fleet.apply(&publish("a@d.com", "2", "P", Some(50)), 2.0);
        assert_eq!(latest(&fleet), Some(100));
        fleet.apply(&retract("a@d.com", "1"), 3.0);
        assert_eq!(latest(&fleet), Some(50));
        fleet.expire(60.0);
        assert_eq!(latest(&fleet), None);
    }

    #[test]
    fn new_refresh_retract() {
        let mut fleet = Fleet::new(Limits::default());
        assert_eq!(
            fleet.apply(&publish("a@d.com", "1", "P", None), 10.0),
            Applied::Registered
        );
        assert_eq!(
            fleet.apply(&publish("a@d.com", "1", "P", None), 20.0),
            Applied::Refreshed
        );
        assert_eq!(
            fleet.apply(&publish("a@d.com", "2", "Q", None), 30.0),
            Applied::Registered
        );
        assert_eq!(fleet.device_count(), 2);
        assert_eq!(
            fleet.apply(&retract("a@d.com", "1"), 40.0),
            Applied::Retracted
        );
        let snapshot = fleet.snapshot(true);
        let a = row(&snapshot, "a");
        assert_eq!(
            (a.devices, a.registrations, a.refreshes, a.retracts),
            (1, 2, 1, 1)
        );
        assert_eq!(a.last_change, Some(40.0));
        assert_eq!(snapshot.domains[0].by_user_agent, vec![(Arc::from("Q"), 1)]);
    }

    #[test]
    fn refresh_does_not_change_last_change() {
        let mut fleet = Fleet::new(Limits::default());
        fleet.apply(&publish("a@d.com", "1", "P", None), 10.0);
        fleet.apply(&publish("a@d.com", "1", "P", None), 99.0);
        assert_eq!(row(&fleet.snapshot(true), "a").last_change, Some(10.0));
    }

    #[test]
    fn unknown_and_duplicate_retracts_change_nothing() {
        let mut fleet = Fleet::new(Limits::default());
        assert_eq!(
            fleet.apply(&retract("x@d.com", "9"), 1.0),
            Applied::UnknownRetract
        );
        assert_eq!(fleet.address_count(), 0);
        fleet.apply(&publish("a@d.com", "1", "P", None), 2.0);
        fleet.apply(&retract("a@d.com", "1"), 3.0);
        assert_eq!(
            fleet.apply(&retract("a@d.com", "1"), 4.0),
            Applied::UnknownRetract
        );
        let a = row(&fleet.snapshot(true), "a").clone();
        assert_eq!((a.devices, a.retracts, a.last_change), (0, 1, Some(3.0)));
    }

    #[test]
    fn retract_before_publish_then_publish_registers() {
        // Out of order: the retract of an id arrives before its publish.
        let mut fleet = Fleet::new(Limits::default());
        fleet.apply(&retract("a@d.com", "1"), 1.0);
        assert_eq!(
            fleet.apply(&publish("a@d.com", "1", "P", None), 2.0),
            Applied::Registered
        );
        assert_eq!(fleet.device_count(), 1);
    }

    #[test]
    fn other_addresses_are_untouched() {
        let mut fleet = Fleet::new(Limits::default());
        fleet.apply(&publish("a@d.com", "1", "P", None), 1.0);
        fleet.apply(&publish("b@d.com", "1", "P", None), 1.0);
        fleet.apply(&retract("b@d.com", "1"), 2.0);
        assert_eq!(row(&fleet.snapshot(true), "a").devices, 1);
    }

    #[test]
    fn stale_registrations_expire_after_grace() {
        let limits = Limits {
            expiry_grace_seconds: 60,
            ..Limits::default()
        };
        let mut fleet = Fleet::new(limits);
        fleet.apply(&publish("a@d.com", "1", "P", Some(1_000)), 900.0);
        fleet.apply(&publish("a@d.com", "2", "P", None), 900.0);
        assert!(fleet.expire(1_059.0).is_empty(), "still within grace");
        let dropped = fleet.expire(1_061.0);
        assert_eq!(dropped.len(), 1);
        assert_eq!(&*dropped[0].1, "1");
        let a = row(&fleet.snapshot(true), "a").clone();
        assert_eq!((a.devices, a.expirations), (1, 1));
        // A refresh before the deadline keeps a device alive.
        fleet.apply(&publish("a@d.com", "3", "P", Some(2_000)), 1_900.0);
        fleet.apply(&publish("a@d.com", "3", "P", Some(3_000)), 1_990.0);
        assert!(fleet.expire(2_100.0).is_empty());
    }

    #[test]
    fn watched_addresses_export_zero_and_stay_known() {
        let mut fleet = Fleet::new(Limits::default());
        fleet.set_watched(&[addr("a@d.com"), addr("b@e.com")]);
        let snapshot = fleet.snapshot(true);
        assert_eq!(snapshot.addresses.len(), 2);
        assert!(snapshot.addresses.iter().all(|r| r.devices == 0));
        fleet.set_watched(&[addr("a@d.com")]);
        assert_eq!(fleet.address_count(), 2);
        assert!(fleet.address(&addr("a@d.com")).is_some_and(|s| s.watched));
        assert!(fleet.address(&addr("b@e.com")).is_some_and(|s| !s.watched));
    }

    #[test]
    fn limits_refuse_and_count() {
        let limits = Limits {
            max_addresses: 1,
            max_devices_per_address: 1,
            ..Limits::default()
        };
        let mut fleet = Fleet::new(limits);
        fleet.apply(&publish("a@d.com", "1", "P", None), 1.0);
        assert_eq!(
            fleet.apply(&publish("a@d.com", "2", "P", None), 1.0),
            Applied::RefusedDeviceLimit
        );
        assert_eq!(
            fleet.apply(&publish("b@d.com", "1", "P", None), 1.0),
            Applied::RefusedAddressLimit
        );
        assert_eq!((fleet.refused_addresses, fleet.refused_devices), (1, 1));
        assert_eq!(fleet.device_count(), 1);
    }

    #[test]
    fn user_agents_are_bounded_per_domain() {
        let limits = Limits {
            max_user_agents_per_domain: 2,
            ..Limits::default()
        };
        let mut fleet = Fleet::new(limits);
        for (i, ua) in ["A", "A", "A", "B", "B", "C", "D"].iter().enumerate() {
            fleet.apply(&publish(&format!("u{i}@d.com"), "1", ua, None), 1.0);
        }
        let mut rows = fleet.snapshot(false).domains[0].by_user_agent.clone();
        rows.sort();
        assert_eq!(
            rows,
            vec![
                (Arc::from("A"), 3),
                (Arc::from("B"), 2),
                (Arc::from("other"), 2)
            ]
        );
    }

    #[test]
    fn changed_user_agent_on_refresh_moves_the_count() {
        let mut fleet = Fleet::new(Limits::default());
        fleet.apply(&publish("a@d.com", "1", "Old/1.0", None), 1.0);
        fleet.apply(&publish("a@d.com", "1", "New/2.0", None), 2.0);
        assert_eq!(
            fleet.snapshot(false).domains[0].by_user_agent,
            vec![(Arc::from("New/2.0"), 1)]
        );
    }

    #[test]
    fn resync_replaces_devices_in_scope() {
        let mut fleet = Fleet::new(Limits::default());
        fleet.apply(&publish("a@d.com", "old", "P", None), 1.0);
        fleet.apply(&publish("z@other.com", "keep", "P", None), 1.0);
        let reg = Registration {
            contact: String::new(),
            received: String::new(),
            device: "P".into(),
            expires: None,
        };
        fleet.resync(
            |a| &*a.domain == "d.com",
            &[(addr("a@d.com"), Arc::from("new"), reg)],
            5.0,
        );
        let a = fleet.address(&addr("a@d.com")).expect("a");
        assert!(a.devices.contains_key("new") && !a.devices.contains_key("old"));
        assert!(fleet
            .address(&addr("z@other.com"))
            .is_some_and(|z| z.devices.contains_key("keep")));
        assert_eq!(fleet.device_count(), 2);
    }
}
