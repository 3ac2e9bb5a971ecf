//! The [`Simulator`] handle: the pure [`Service`] behind a lock, plus the
//! routing table of live network links (component links into Prosody,
//! in-process c2s sessions), so that whatever the service emits reaches the
//! right socket. Tests and the demo drive and inspect the simulator through
//! this handle.
//!
//! Locks are `std::sync::Mutex`, never held across an `.await`: every
//! critical section is a short, non-blocking piece of bookkeeping. The
//! service lock is taken before the links lock (never the other way round),
//! and outgoing stanzas are queued while the service lock is held, so events
//! leave in the order the service produced them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use minidom::Element;
use tokio::sync::{mpsc, watch, Notify};

use crate::auth::AuthorizationInfo;
use crate::config::SimConfig;
use crate::pubsub::{Registration, SubscribeAnswer, SubscriptionInfo};
use crate::service::{AuthorizeAnswer, Service, ServiceStats};
use crate::xml;

/// State of one component link (one per service JID).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComponentStatus {
    /// Component JID.
    pub jid: String,
    /// Handshake done and link up.
    pub connected: bool,
    /// Successful handshakes so far.
    pub connects: u64,
    /// Why the last attempt or link failed, if it did.
    pub last_error: Option<String>,
}

/// One c2s session of the in-process endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// Bound full JID.
    pub jid: String,
    /// Sent available presence.
    pub available: bool,
    /// Presence priority.
    pub priority: i8,
}

/// Counters for tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// What the services saw and did.
    pub service: ServiceStats,
    /// Stanzas handed to a link (component or c2s session).
    pub delivered: u64,
    /// Stanzas with nowhere to go (no link for the sender, no available
    /// resource for the recipient).
    pub undeliverable: u64,
    /// Stanzas queued on links, not yet written.
    pub queued: usize,
    /// Successful component handshakes.
    pub component_connects: u64,
    /// Successful c2s logins.
    pub c2s_logins: u64,
    /// Failed c2s SASL attempts.
    pub c2s_auth_failures: u64,
}

/// An outgoing queue of one link.
pub(crate) type Outlet = mpsc::UnboundedSender<Element>;

/// What a c2s session writes: a stanza, or (test facility, see
/// [`Simulator::send_raw`]) bytes written verbatim.
#[derive(Debug)]
pub(crate) enum Outbound {
    Stanza(Element),
    Raw(Vec<u8>),
}

/// The outgoing queue of one c2s session.
pub(crate) type SessionOutlet = mpsc::UnboundedSender<Outbound>;

struct ComponentLink {
    id: u64,
    tx: Outlet,
}

struct Session {
    id: u64,
    bare: String,
    tx: SessionOutlet,
    available: bool,
    priority: i8,
}

#[derive(Default)]
struct Links {
    components: HashMap<String, ComponentLink>,
    status: BTreeMap<String, ComponentStatus>,
    sessions: BTreeMap<String, Session>,
}

#[derive(Default)]
struct Counters {
    delivered: AtomicU64,
    undeliverable: AtomicU64,
    component_connects: AtomicU64,
    c2s_logins: AtomicU64,
    c2s_auth_failures: AtomicU64,
}

struct Inner {
    config: SimConfig,
    service: Mutex<Service>,
    links: Mutex<Links>,
    counters: Counters,
    queued: AtomicUsize,
    drained: Notify,
    next_link: AtomicU64,
    drop_tx: watch::Sender<u64>,
    changed: watch::Sender<u64>,
}

/// Cheap-clone handle on one simulated OnSIP.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the simulator down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Simulator {
    /// A simulator with `cfg`; no links yet (see [`crate::attach_component`]
    /// and [`crate::serve_c2s`]).
    pub fn new(cfg: SimConfig) -> Self {
        let service = Service::new(cfg);
        let config = service.config().clone();
        Simulator {
            inner: Arc::new(Inner {
                config,
                service: Mutex::new(service),
                links: Mutex::new(Links::default()),
                counters: Counters::default(),
                queued: AtomicUsize::new(0),
                drained: Notify::new(),
                next_link: AtomicU64::new(1),
                drop_tx: watch::Sender::new(0),
                changed: watch::Sender::new(0),
            }),
        }
    }

    /// The configuration (service JIDs lower-cased).
    pub fn config(&self) -> &SimConfig {
        &self.inner.config
    }

    /// Publish a registration of `address` (`user@domain`): a phone came
    /// online or refreshed (same `item_id`). Every subscription covering the
    /// address gets the seed's "New user-agent notification".
    pub fn register_phone(
        &self,
        address: &str,
        item_id: &str,
        contact: &str,
        received: &str,
        user_agent: &str,
        expires: DateTime<Utc>,
    ) {
        self.publish(
            address,
            Registration {
                item_id: item_id.to_owned(),
                contact: contact.to_owned(),
                received: received.to_owned(),
                device: user_agent.to_owned(),
                expires,
            },
        );
    }

    /// Publish a registration (see [`Self::register_phone`]).
    pub fn publish(&self, address: &str, reg: Registration) {
        let now = Utc::now();
        let mut svc = lock(&self.inner.service);
        let out = svc.publish(address, reg, now);
        self.route(out);
        drop(svc);
        self.bump();
    }

    /// Retract item `item_id` of `address`: the phone went offline. Returns
    /// `false` (and sends nothing) if there was no such item.
    pub fn unregister_phone(&self, address: &str, item_id: &str) -> bool {
        let now = Utc::now();
        let mut svc = lock(&self.inner.service);
        let before = svc.stats().retracted;
        let out = svc.retract(address, item_id, now);
        let existed = svc.stats().retracted > before;
        self.route(out);
        drop(svc);
        self.bump();
        existed
    }

    /// Change how subscribe requests are answered from now on.
    pub fn set_subscribe_answer(&self, a: SubscribeAnswer) {
        lock(&self.inner.service).set_subscribe_answer(a);
    }

    /// Change how `authorize-plain` requests are answered from now on.
    pub fn set_authorize_answer(&self, a: AuthorizeAnswer) {
        lock(&self.inner.service).set_authorize_answer(a);
    }

    /// Drop the authorizations of `bare_jid` (or everyone's with `None`), as
    /// if they had lapsed: events stop until the client re-authorizes.
    pub fn revoke_authorizations(&self, bare_jid: Option<&str>) {
        lock(&self.inner.service).revoke_authorizations(bare_jid);
        self.bump();
    }

    /// Close every component link and c2s session now. Component links
    /// reconnect by themselves; c2s clients must reconnect.
    pub fn drop_links(&self) {
        self.inner.drop_tx.send_modify(|g| *g += 1);
    }

    /// Live subscriptions, oldest first.
    pub fn subscriptions(&self) -> Vec<SubscriptionInfo> {
        lock(&self.inner.service).subscriptions(Utc::now())
    }

    /// Live authorizations.
    pub fn authorizations(&self) -> Vec<AuthorizationInfo> {
        lock(&self.inner.service).authorizations(Utc::now())
    }

    /// Current items, per address.
    pub fn registrations(&self) -> Vec<(String, Vec<Registration>)> {
        lock(&self.inner.service).registrations()
    }

    /// Counters.
    pub fn stats(&self) -> SimStats {
        let c = &self.inner.counters;
        SimStats {
            service: lock(&self.inner.service).stats(),
            delivered: c.delivered.load(Ordering::Relaxed),
            undeliverable: c.undeliverable.load(Ordering::Relaxed),
            queued: self.inner.queued.load(Ordering::Relaxed),
            component_connects: c.component_connects.load(Ordering::Relaxed),
            c2s_logins: c.c2s_logins.load(Ordering::Relaxed),
            c2s_auth_failures: c.c2s_auth_failures.load(Ordering::Relaxed),
        }
    }

    /// Status of the component links (after [`crate::attach_component`] started).
    pub fn component_status(&self) -> Vec<ComponentStatus> {
        lock(&self.inner.links).status.values().cloned().collect()
    }

    /// Are both component links up?
    pub fn components_connected(&self) -> bool {
        let links = lock(&self.inner.links);
        [&self.inner.config.auth_jid, &self.inner.config.pubsub_jid]
            .iter()
            .all(|j| links.components.contains_key(j.as_str()))
    }

    /// Sessions on the in-process c2s endpoint.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        lock(&self.inner.links)
            .sessions
            .iter()
            .map(|(jid, s)| SessionInfo {
                jid: jid.clone(),
                available: s.available,
                priority: s.priority,
            })
            .collect()
    }

    /// Wait until `pred` holds, re-checking whenever links, presence or
    /// service state change (and at least every 50 ms, for time-based
    /// conditions). Returns whether it held before `timeout`.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&Simulator) -> bool,
    ) -> bool {
        let mut rx = self.inner.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if pred(self) {
                return true;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return false;
            }
            let step = (deadline - now).min(Duration::from_millis(50));
            // Err (timeout) or a closed channel: just re-check.
            let _ = tokio::time::timeout(step, rx.changed()).await;
        }
    }

    /// Hand the services one stanza as if it came from the network, and
    /// route whatever they answer. Faces call this; tests may too.
    pub fn handle_stanza(&self, stanza: &Element) {
        let now = Utc::now();
        let mut svc = lock(&self.inner.service);
        let out = svc.handle(stanza, now);
        self.route(out);
        drop(svc);
        self.bump();
    }

    // ---- test facilities: hostile traffic ----
    //
    // What a well-behaved OnSIP never sends, for tests of how a client copes:
    // arbitrary bytes (malformed XML, a giant stanza) and arbitrary stanzas
    // (a spoofed `from`, unknown namespaces, thousands of items). Nothing
    // here goes through the service: its state and counters do not change.

    /// **Test facility.** Writes `bytes` verbatim into the in-process c2s
    /// stream of every session `to` names: a full JID names one session, a
    /// bare JID every session of that account (whatever its presence). No
    /// check of any kind: the bytes may be malformed XML, a partial stanza,
    /// or a stanza of any size. They are queued behind (and in order with)
    /// the stanzas already queued for the session, and written without
    /// holding up other sessions' traffic.
    ///
    /// Only the c2s face ([`crate::serve_c2s`]) carries raw bytes; component
    /// links into a real server are never given any (the server would end
    /// the link). Returns the number of sessions the bytes were queued on.
    pub fn send_raw(&self, to: &str, bytes: impl Into<Vec<u8>>) -> usize {
        let bytes = bytes.into();
        let links = lock(&self.inner.links);
        let bare = xml::bare_jid(to).unwrap_or_else(|| to.to_owned());
        let exact = links.sessions.contains_key(to);
        let mut queued = 0;
        for (jid, session) in &links.sessions {
            let hit = if exact {
                jid == to
            } else {
                session.bare == bare
            };
            if hit && self.enqueue(&session.tx, Outbound::Raw(bytes.clone())) {
                queued += 1;
            }
        }
        queued
    }

    /// **Test facility.** Routes `stanza` exactly as if one of the services
    /// had emitted it, without the service seeing or checking it: through
    /// the component link of the service its `from` names, when there is one
    /// (so a real server such as Prosody checks and forwards it), otherwise
    /// straight to the c2s sessions its `to` names (so any `from` can be
    /// spoofed there). Bare-JID delivery follows the usual presence rules.
    pub fn inject_stanza(&self, stanza: Element) {
        {
            let links = lock(&self.inner.links);
            self.route_one(&links, stanza);
        }
        self.bump();
    }

    /// Is `jid` one of the two service JIDs?
    pub fn serves(&self, jid: &str) -> bool {
        let cfg = &self.inner.config;
        xml::bare_jid(jid).is_some_and(|b| b == cfg.pubsub_jid || b == cfg.auth_jid)
    }

    /// Stanzas queued on links and not yet written.
    pub fn queued(&self) -> usize {
        self.inner.queued.load(Ordering::Relaxed)
    }

    /// Wait (up to `timeout`) until at most `max` stanzas are queued: the
    /// back-pressure of the load generator.
    pub async fn wait_queue_below(&self, max: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.queued() <= max {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.queued() <= max;
            }
        }
    }

    fn bump(&self) {
        self.inner.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Queue each stanza on the link that should carry it. Called with the
    /// service lock held, so order is kept.
    fn route(&self, out: Vec<Element>) {
        if out.is_empty() {
            return;
        }
        let links = lock(&self.inner.links);
        for el in out {
            self.route_one(&links, el);
        }
    }

    fn route_one(&self, links: &Links, el: Element) {
        let c = &self.inner.counters;
        // Through Prosody when the sending service has a component link.
        if let Some(link) = el
            .attr("from")
            .and_then(xml::bare_jid)
            .and_then(|f| links.components.get(&f))
        {
            self.enqueue(&link.tx, el);
            return;
        }
        // Otherwise straight to the in-process c2s sessions.
        let Some(to) = el.attr("to").map(str::to_owned) else {
            c.undeliverable.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let is_full = jid::Jid::new(&to).map(|j| j.is_full()).unwrap_or(false);
        if is_full {
            match links.sessions.get(&to) {
                Some(s) => {
                    self.enqueue(&s.tx, Outbound::Stanza(el));
                }
                None => {
                    c.undeliverable.fetch_add(1, Ordering::Relaxed);
                }
            }
            return;
        }
        let bare = xml::bare_jid(&to).unwrap_or(to);
        // Like a real server: a bare-JID stanza reaches only resources that
        // sent available presence with a non-negative priority.
        let targets: Vec<&Session> = links
            .sessions
            .values()
            .filter(|s| s.bare == bare && s.available && s.priority >= 0)
            .collect();
        if targets.is_empty() {
            c.undeliverable.fetch_add(1, Ordering::Relaxed);
            return;
        }
        for s in targets {
            self.enqueue(&s.tx, Outbound::Stanza(el.clone()));
        }
    }

    fn enqueue<T>(&self, tx: &mpsc::UnboundedSender<T>, item: T) -> bool {
        if tx.send(item).is_ok() {
            self.inner.queued.fetch_add(1, Ordering::Relaxed);
            self.inner
                .counters
                .delivered
                .fetch_add(1, Ordering::Relaxed);
            true
        } else {
            self.inner
                .counters
                .undeliverable
                .fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    // ---- for the faces ----

    /// A link wrote (or discarded) `n` queued stanzas.
    pub(crate) fn dequeued(&self, n: usize) {
        let _ = self
            .inner
            .queued
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
                Some(q.saturating_sub(n))
            });
        self.inner.drained.notify_waiters();
    }

    /// Receiver that changes on every [`Self::drop_links`].
    pub(crate) fn drop_signal(&self) -> watch::Receiver<u64> {
        self.inner.drop_tx.subscribe()
    }

    fn link_id(&self) -> u64 {
        self.inner.next_link.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn component_up(&self, jid: &str) -> (u64, mpsc::UnboundedReceiver<Element>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.link_id();
        {
            let mut links = lock(&self.inner.links);
            links
                .components
                .insert(jid.to_owned(), ComponentLink { id, tx });
            let st = links.status.entry(jid.to_owned()).or_default();
            st.jid = jid.to_owned();
            st.connected = true;
            st.connects += 1;
            st.last_error = None;
        }
        self.inner
            .counters
            .component_connects
            .fetch_add(1, Ordering::Relaxed);
        self.bump();
        (id, rx)
    }

    pub(crate) fn component_down(&self, jid: &str, id: u64, error: Option<String>) {
        {
            let mut links = lock(&self.inner.links);
            if links.components.get(jid).is_some_and(|l| l.id == id) {
                links.components.remove(jid);
            }
            let st = links.status.entry(jid.to_owned()).or_default();
            st.jid = jid.to_owned();
            st.connected = false;
            if error.is_some() {
                st.last_error = error;
            }
        }
        self.bump();
    }

    pub(crate) fn component_failed(&self, jid: &str, error: String) {
        {
            let mut links = lock(&self.inner.links);
            let st = links.status.entry(jid.to_owned()).or_default();
            st.jid = jid.to_owned();
            st.connected = false;
            st.last_error = Some(error);
        }
        self.bump();
    }

    pub(crate) fn c2s_auth_failed(&self) {
        self.inner
            .counters
            .c2s_auth_failures
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Bind a resource for `bare`. A taken resource gets a suffix (RFC 6120
    /// lets the server override the resource).
    pub(crate) fn session_up(
        &self,
        bare: &str,
        resource: &str,
    ) -> (String, u64, mpsc::UnboundedReceiver<Outbound>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.link_id();
        let full = {
            let mut links = lock(&self.inner.links);
            let mut full = format!("{bare}/{resource}");
            if links.sessions.contains_key(&full) {
                full = format!("{bare}/{resource}-{id}");
            }
            links.sessions.insert(
                full.clone(),
                Session {
                    id,
                    bare: bare.to_owned(),
                    tx,
                    available: false,
                    priority: 0,
                },
            );
            full
        };
        self.inner
            .counters
            .c2s_logins
            .fetch_add(1, Ordering::Relaxed);
        self.bump();
        (full, id, rx)
    }

    pub(crate) fn session_presence(&self, full: &str, available: bool, priority: i8) {
        {
            let mut links = lock(&self.inner.links);
            if let Some(s) = links.sessions.get_mut(full) {
                s.available = available;
                s.priority = priority;
            }
        }
        self.bump();
    }

    pub(crate) fn session_down(&self, full: &str, id: u64) {
        {
            let mut links = lock(&self.inner.links);
            if links.sessions.get(full).is_some_and(|s| s.id == id) {
                links.sessions.remove(full);
            }
        }
        self.bump();
    }

    /// Deliver a stanza from one c2s session to another local JID (or
    /// count it undeliverable).
    pub(crate) fn deliver_local(&self, el: Element) {
        let links = lock(&self.inner.links);
        self.route_one(&links, el);
    }
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("xmpp_domain", &self.inner.config.xmpp_domain)
            .field("pubsub_jid", &self.inner.config.pubsub_jid)
            .field("auth_jid", &self.inner.config.auth_jid)
            .finish_non_exhaustive()
    }
}
