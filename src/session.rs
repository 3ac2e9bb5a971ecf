//! The OnSIP session: keep an XMPP link up, authorize, subscribe, renew, and
//! feed every pubsub event into the shared state. I/O edge.
//!
//! Per link, two futures run side by side until the link is lost:
//! - the *pump* owns the XML stream: it writes queued stanzas, reads
//!   everything, hands iq replies to whoever waits for them, answers pings,
//!   applies events to the state and pings the server when it goes quiet;
//! - the *workflow* does the OnSIP procedure as plain sequential code:
//!   authorize, list/renew/subscribe each node, load current items, sleep
//!   until re-authorization is due, repeat.
//!
//! The outer loop reconnects with capped exponential backoff and jitter.
//! Every failure is recorded in `SessionStatus` (hence `/metrics`) and
//! logged once per change; nothing is logged per event at info level.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use minidom::Element;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::jid::{FullJid, Jid};
use tokio_xmpp::parsers::message::{Message, MessageType};
use tokio_xmpp::parsers::presence::Presence;
use tokio_xmpp::parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};
use tokio_xmpp::xmlstream::{FallibleStreamElement, ReadError, XmppStreamElement};
use tokio_xmpp::Stanza;
use tracing::{debug, info, warn};

use crate::config::{Config, Transport};
use crate::stanza::{self, ns, PubsubEvent, SipAddress, SubscriptionState};
use crate::state::Shared;
use crate::status::{ErrorKind, NodeState, Resync};
use crate::xmpp::{self, Link, LinkError};

/// Current time as Unix seconds.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Capped exponential backoff with full jitter.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    /// The next delay: uniform in [ceiling/2, ceiling], ceiling doubling up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Runs the session until `cancel` fires. Returns an error only for a
/// start-up problem (an unreadable CA file): every runtime failure is
/// recorded and retried.
pub async fn run(
    config: Arc<Config>,
    shared: Shared,
    cancel: CancellationToken,
) -> Result<(), String> {
    let tls = match &config.xmpp.transport {
        Transport::StartTls { ca_file, .. } => Some(xmpp::tls_config(ca_file.as_deref())?),
        Transport::PlaintextForTests => {
            warn!("XMPP link without TLS: --xmpp.insecure-plaintext-for-tests is for loopback tests only");
            None
        }
    };
    let mut backoff = Backoff::new(Duration::from_millis(500), config.xmpp.max_backoff);
    let mut last_failure: Option<(ErrorKind, String)> = None;
    loop {
        let opened = tokio::select! {
            opened = xmpp::open(&config.xmpp, tls.as_ref()) => opened,
            () = cancel.cancelled() => return Ok(()),
        };
        let failure = match opened {
            Ok(link) => {
                let started = Instant::now();
                info!(jid = %link.bound_jid, "XMPP session online");
                lock(&shared)
                    .session
                    .set_connected(true, Some(link.bound_jid.to_string()));
                last_failure = None;
                let outcome = run_link(link, &config, &shared, &cancel).await;
                lock(&shared).session.set_connected(false, None);
                match outcome {
                    None => {
                        info!("XMPP session closed");
                        return Ok(());
                    }
                    Some(err) => {
                        // A link that stayed up a while starts the backoff afresh.
                        if started.elapsed() > Duration::from_secs(60) {
                            backoff.reset();
                        }
                        err
                    }
                }
            }
            Err(err) => err,
        };
        lock(&shared)
            .session
            .record_error(failure.kind, failure.message.clone(), unix_now());
        let delay = backoff.next_delay();
        let this = (failure.kind, failure.message.clone());
        if last_failure.as_ref() != Some(&this) {
            warn!(kind = failure.kind.as_str(), cause = %failure.message, retry_in = ?delay, "XMPP session down");
            last_failure = Some(this);
        } else {
            debug!(kind = failure.kind.as_str(), cause = %failure.message, retry_in = ?delay, "XMPP session still down");
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = cancel.cancelled() => return Ok(()),
        }
    }
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, crate::state::State> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// Work the pump does on a reply the moment it arrives, in stream order
/// with the events around it (see `Workflow::resync`).
type ReplyHook = Box<dyn FnOnce(&IqReply, &Shared) + Send>;

/// One request waiting for its reply.
struct Waiter {
    /// The JID the request went to: a reply from anyone else is not it.
    from: Jid,
    reply: oneshot::Sender<IqReply>,
    hook: Option<ReplyHook>,
}

/// Waiters for iq replies, by stanza id.
type Pending = Arc<Mutex<HashMap<String, Waiter>>>;

/// An iq reply: the payload of a result, or the error.
type IqReply = Result<Option<Element>, StanzaError>;

/// Why a request got no usable reply.
#[derive(Debug)]
enum RequestError {
    Timeout,
    LinkGone,
}

/// Sends iq requests through the pump and waits for their replies.
#[derive(Clone)]
struct Requester {
    out: mpsc::Sender<Stanza>,
    pending: Pending,
    timeout: Duration,
    next_id: Arc<AtomicU64>,
    /// Random per link, so ids cannot be guessed to forge a reply.
    id_prefix: u64,
}

/// Removes a waiter when its request ends, answered or not.
struct PendingGuard<'a> {
    pending: &'a Pending,
    id: String,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.remove(&self.id);
        }
    }
}

impl Requester {
    async fn request(
        &self,
        to: &Jid,
        set: bool,
        payload: Element,
    ) -> Result<IqReply, RequestError> {
        self.request_with_hook(to, set, payload, None).await
    }

    /// Like `request`, with `hook` run by the pump on the reply before any
    /// later stanza is handled.
    async fn request_with_hook(
        &self,
        to: &Jid,
        set: bool,
        payload: Element,
        hook: Option<ReplyHook>,
    ) -> Result<IqReply, RequestError> {
        let id = format!(
            "ouae-{:016x}-{}",
            self.id_prefix,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let (tx, rx) = oneshot::channel();
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(
                id.clone(),
                Waiter {
                    from: to.clone(),
                    reply: tx,
                    hook,
                },
            );
        }
        let _guard = PendingGuard {
            pending: &self.pending,
            id: id.clone(),
        };
        let iq = if set {
            Iq::Set {
                from: None,
                to: Some(to.clone()),
                id,
                payload,
            }
        } else {
            Iq::Get {
                from: None,
                to: Some(to.clone()),
                id,
                payload,
            }
        };
        self.out
            .send(Stanza::Iq(iq))
            .await
            .map_err(|_| RequestError::LinkGone)?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(RequestError::LinkGone),
            Err(_) => Err(RequestError::Timeout),
        }
    }
}

/// Runs one link until it is lost (`Some(error)`) or cancelled (`None`).
async fn run_link(
    link: Link,
    config: &Arc<Config>,
    shared: &Shared,
    cancel: &CancellationToken,
) -> Option<LinkError> {
    let Link { stream, bound_jid } = link;
    let (out_tx, out_rx) = mpsc::channel(256);
    let pending: Pending = Arc::default();
    let notify = Arc::new(Notify::new());
    let requester = Requester {
        out: out_tx,
        pending: pending.clone(),
        timeout: config.xmpp.timeout,
        next_id: Arc::default(),
        id_prefix: rand::random(),
    };
    let pump = Pump {
        config: config.clone(),
        shared: shared.clone(),
        pending,
        notify: notify.clone(),
        bound_jid: bound_jid.clone(),
        malformed_log: RateLimitedLog::default(),
    };
    let pump = pump.run(stream, out_rx);
    tokio::pin!(pump);
    let mut workflow = Workflow {
        config: config.clone(),
        shared: shared.clone(),
        requester,
        notify,
        full_jid: bound_jid,
        effective_nodes: HashMap::new(),
        resynced: false,
    };
    let lost = {
        let steps = workflow.run();
        tokio::pin!(steps);
        tokio::select! {
            err = &mut pump => Some(err),
            never = &mut steps => match never {},
            () = cancel.cancelled() => None,
        }
    };
    if lost.is_some() {
        return lost;
    }
    // Shutting down: unsubscribe while the pump still carries the replies,
    // all within one deadline, then close the stream.
    let deadline = config.xmpp.timeout.min(Duration::from_secs(5));
    let goodbye = async {
        workflow.unsubscribe_all().await;
        let _ = workflow
            .requester
            .out
            .send(Stanza::Presence(Presence::unavailable()))
            .await;
        // With every sender gone the pump closes the stream and returns.
        drop(workflow);
    };
    // The pump must keep running to carry the unsubscribe replies.
    let goodbye = async { tokio::join!(goodbye, &mut pump) };
    let _ = tokio::time::timeout(deadline, goodbye).await;
    None
}

/// Logs a repeated warning at most every ten seconds, with a count of the
/// ones in between, so hostile input cannot flood the log.
#[derive(Default)]
struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    fn warn(&mut self, what: &str, detail: &str) {
        let due = self
            .last
            .is_none_or(|t| t.elapsed() > Duration::from_secs(10));
        if due {
            warn!(suppressed = self.suppressed, detail, "{what}");
            self.last = Some(Instant::now());
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
            debug!(detail, "{what}");
        }
    }
}

/// Owns the XML stream of one link.
struct Pump {
    config: Arc<Config>,
    shared: Shared,
    pending: Pending,
    notify: Arc<Notify>,
    bound_jid: FullJid,
    malformed_log: RateLimitedLog,
}

impl Pump {
    async fn run(mut self, mut stream: xmpp::Stream, mut out: mpsc::Receiver<Stanza>) -> LinkError {
        let mut events = Vec::new();
        let mut pings = 0u64;
        loop {
            tokio::select! {
                outgoing = out.recv() => match outgoing {
                    Some(stanza) => {
                        if let Err(err) = xmpp::send(&mut stream, stanza).await {
                            return LinkError { kind: ErrorKind::Stream, message: err.to_string() };
                        }
                    }
                    None => {
                        let _ = SinkExt::<&XmppStreamElement>::close(&mut stream).await;
                        return LinkError { kind: ErrorKind::Stream, message: "closed by us".into() };
                    }
                },
                incoming = stream.next() => {
                    let element = match incoming {
                        None => return LinkError { kind: ErrorKind::Stream, message: "server closed the connection".into() },
                        Some(Err(ReadError::SoftTimeout)) => {
                            // Quiet for a keepalive period: ask for a sign of
                            // life. No answer within the response timeout ends
                            // the stream with a hard timeout error.
                            pings += 1;
                            let ping = Iq::Get { from: None, to: None, id: format!("keepalive-{pings}"), payload: stanza::ping_request() };
                            if let Err(err) = xmpp::send(&mut stream, Stanza::Iq(ping)).await {
                                return LinkError { kind: ErrorKind::Stream, message: err.to_string() };
                            }
                            continue;
                        }
                        Some(Err(err)) => return xmpp::read_error(err),
                        Some(Ok(element)) => element,
                    };
                    match element {
                        FallibleStreamElement::Ok(XmppStreamElement::Stanza(stanza)) => {
                            if let Some(reply) = self.handle(stanza, &mut events) {
                                if let Err(err) = xmpp::send(&mut stream, reply).await {
                                    return LinkError { kind: ErrorKind::Stream, message: err.to_string() };
                                }
                            }
                        }
                        FallibleStreamElement::Ok(XmppStreamElement::StreamError(err)) => {
                            return LinkError { kind: ErrorKind::Stream, message: format!("stream error from server: {err:?}") };
                        }
                        FallibleStreamElement::Ok(_) => {}
                        FallibleStreamElement::Err(err) => {
                            // A stanza xmpp-parsers cannot read (bad attribute,
                            // bad JID): count it and go on with the stream.
                            lock(&self.shared).session.count_event(crate::status::EventKind::Malformed, unix_now());
                            self.malformed_log.warn("malformed stanza skipped", &err.to_string());
                        }
                    }
                }
            }
        }
    }

    /// Handles one stanza; returns a reply to send, if any.
    fn handle(&mut self, stanza: Stanza, events: &mut Vec<PubsubEvent>) -> Option<Stanza> {
        match stanza {
            Stanza::Iq(Iq::Result {
                from, id, payload, ..
            }) => {
                self.complete(from.as_ref(), &id, Ok(payload));
                None
            }
            Stanza::Iq(Iq::Error {
                from, id, error, ..
            }) => {
                self.complete(from.as_ref(), &id, Err(error));
                None
            }
            Stanza::Iq(Iq::Get {
                from, id, payload, ..
            }) if payload.is("ping", ns::PING) => Some(Stanza::Iq(Iq::Result {
                from: None,
                to: from,
                id,
                payload: None,
            })),
            Stanza::Iq(Iq::Get { from, id, .. } | Iq::Set { from, id, .. }) => {
                Some(Stanza::Iq(Iq::Error {
                    from: None,
                    to: from,
                    id,
                    error: StanzaError::new(
                        ErrorType::Cancel,
                        DefinedCondition::ServiceUnavailable,
                        "en",
                        "not supported",
                    ),
                    payload: None,
                }))
            }
            Stanza::Message(message) => {
                self.on_message(message, events);
                None
            }
            Stanza::Presence(_) => None,
        }
    }

    /// Hands a reply to its waiter, if it comes from where the request went
    /// (a reply with a matching id from anyone else is a forgery: dropped).
    fn complete(&self, from: Option<&Jid>, id: &str, reply: IqReply) {
        let waiter = self
            .pending
            .lock()
            .ok()
            .and_then(|mut pending| match pending.get(id) {
                Some(waiter) if Some(&waiter.from) == from => pending.remove(id),
                Some(_) => {
                    debug!(id, from = ?from, "iq reply from the wrong sender dropped");
                    None
                }
                None => None,
            });
        if let Some(waiter) = waiter {
            if let Some(hook) = waiter.hook {
                hook(&reply, &self.shared);
            }
            let _ = waiter.reply.send(reply);
        }
    }

    fn on_message(&mut self, message: Message, events: &mut Vec<PubsubEvent>) {
        let Some(event) = message
            .payloads
            .iter()
            .find(|p| p.is("event", ns::PUBSUB_EVENT))
        else {
            return;
        };
        let now = unix_now();
        let from_service = message.from.as_ref() == Some(&self.config.onsip.pubsub_jid);
        let to_us = match &message.to {
            None => true,
            Some(to) => {
                to.to_bare() == self.bound_jid.to_bare()
                    && to.resource().is_none_or(|r| r == self.bound_jid.resource())
            }
        };
        if !from_service || !to_us || message.type_ == MessageType::Error {
            lock(&self.shared)
                .session
                .count_event(crate::status::EventKind::Ignored, now);
            debug!(from = ?message.from, to = ?message.to, "pubsub event ignored: not from the service or not for us");
            return;
        }
        events.clear();
        stanza::parse_event(event, events);
        let outcome = lock(&self.shared).apply_events(events, now);
        for detail in &outcome.malformed {
            self.malformed_log
                .warn("malformed pubsub payload skipped", detail);
        }
        if !outcome.subscriptions.is_empty() {
            for (node, state) in &outcome.subscriptions {
                info!(node, state = state.as_str(), "subscription state");
            }
            self.notify.notify_waiters();
        }
    }
}

/// Why a workflow step failed.
struct StepError {
    kind: ErrorKind,
    message: String,
}

fn step_error(kind: ErrorKind, message: impl Into<String>) -> StepError {
    StepError {
        kind,
        message: message.into(),
    }
}

fn request_failed(kind: ErrorKind, what: &str, err: RequestError) -> StepError {
    match err {
        RequestError::Timeout => {
            step_error(ErrorKind::Timeout, format!("{what}: no reply in time"))
        }
        RequestError::LinkGone => step_error(kind, format!("{what}: link lost")),
    }
}

fn describe(error: &StanzaError) -> String {
    let text = error
        .texts
        .values()
        .next()
        .map(String::as_str)
        .unwrap_or("");
    format!("{:?} {text}", error.defined_condition)
        .trim()
        .to_owned()
}

/// The OnSIP procedure over one link.
struct Workflow {
    config: Arc<Config>,
    shared: Shared,
    requester: Requester,
    notify: Arc<Notify>,
    full_jid: FullJid,
    /// Configured node → the node the service actually gave us (after a
    /// redirect) and our subid there.
    effective_nodes: HashMap<String, (String, Option<String>)>,
    /// Whether items retrieval was tried on this link.
    resynced: bool,
}

/// Most redirects followed for one subscribe (as OnSIP's own SDK does).
const MAX_REDIRECTS: usize = 5;

impl Workflow {
    async fn run(&mut self) -> std::convert::Infallible {
        let mut retry = Backoff::new(
            Duration::from_secs(1),
            self.config.xmpp.max_backoff.min(Duration::from_secs(30)),
        );
        let mut last_error: Option<String> = None;
        loop {
            let wait = match self.establish().await {
                Ok(next) => {
                    retry.reset();
                    if last_error.take().is_some() {
                        info!("authorized and subscribed again");
                    }
                    next
                }
                Err(err) => {
                    lock(&self.shared).session.record_error(
                        err.kind,
                        err.message.clone(),
                        unix_now(),
                    );
                    if last_error.as_deref() != Some(&err.message) {
                        warn!(kind = err.kind.as_str(), cause = %err.message, "OnSIP authorization or subscription failed; retrying");
                        last_error = Some(err.message);
                    }
                    retry.next_delay()
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Authorizes, makes sure every node is subscribed (reusing ours),
    /// loads current items once per link. Returns when to do it again.
    async fn establish(&mut self) -> Result<Duration, StepError> {
        let expires = self.authorize().await?;
        let expire_text = expires.map(stanza::format_timestamp);
        let nodes = self.config.onsip.nodes.clone();
        let mut failures = Vec::new();
        for node in &nodes {
            if let Err(err) = self
                .ensure_subscription(node, expire_text.as_deref(), expires)
                .await
            {
                self.set_node(node, NodeState::None, None);
                failures.push(err);
            }
        }
        if !self.resynced {
            self.resynced = true;
            self.resync().await;
        }
        if let Some(err) = failures.into_iter().next() {
            return Err(err);
        }
        Ok(refresh_delay(
            expires,
            unix_now(),
            self.config.onsip.reauthorize_before,
        ))
    }

    async fn authorize(&mut self) -> Result<Option<i64>, StepError> {
        let onsip = &self.config.onsip;
        let full = self.full_jid.to_string();
        let command = stanza::authorize_command(&stanza::AuthorizeRequest {
            sip_address: &onsip.sip_address,
            password: onsip.auth_password.expose(),
            jid: Some(&full),
            auth_for_all: onsip.auth_for_all,
        });
        let reply = self
            .requester
            .request(&onsip.auth_jid, true, command)
            .await
            .map_err(|e| request_failed(ErrorKind::Authorize, "authorize", e))?;
        let result = match reply {
            Ok(Some(command)) => stanza::parse_authorize_reply(&command),
            Ok(None) => Err("empty reply".to_owned()),
            Err(error) => Err(describe(&error)),
        };
        let mut state = lock(&self.shared);
        match result {
            Ok(auth) => {
                let first = !state.session.authorized
                    || state.session.authorized_addresses != auth.addresses.len();
                state.session.authorized = true;
                state.session.authorization_expiry = auth.expires;
                state.session.authorized_addresses = auth.addresses.len();
                // Only the authorized addresses our nodes cover: a shard
                // subscribed to one domain must not export (and alert on)
                // zeros for the domains other shards watch.
                let scopes: Vec<NodeScope> = onsip.nodes.iter().map(|n| NodeScope::of(n)).collect();
                let watched: Vec<SipAddress> = auth
                    .addresses
                    .iter()
                    .filter(|a| scopes.iter().any(|s| s.covers(a)))
                    .chain(&onsip.watch)
                    .cloned()
                    .collect();
                state.fleet.set_watched(&watched);
                drop(state);
                if first {
                    info!(addresses = auth.addresses.len(), expires = ?auth.expires.map(stanza::format_timestamp), "authorized with OnSIP");
                } else {
                    debug!(expires = ?auth.expires, "authorization renewed");
                }
                Ok(auth.expires)
            }
            Err(message) => {
                state.session.authorized = false;
                Err(step_error(
                    ErrorKind::Authorize,
                    format!("authorize refused: {message}"),
                ))
            }
        }
    }

    fn set_node(&self, node: &str, node_state: NodeState, expiry: Option<i64>) {
        let mut state = lock(&self.shared);
        if let Some(status) = state.session.node_mut(node) {
            status.state = node_state;
            status.expiry = expiry;
            status.subid = self
                .effective_nodes
                .get(node)
                .and_then(|(_, subid)| subid.clone());
        }
    }

    fn node_state(&self, node: &str) -> Option<NodeState> {
        lock(&self.shared)
            .session
            .nodes
            .iter()
            .find(|n| n.node == node)
            .map(|n| n.state)
    }

    /// Reuses and renews our subscription to `node` if the service lists
    /// one, else subscribes. Extra subscriptions of ours are removed, so
    /// restarts never pile up towards OnSIP's limit of 10 per node.
    async fn ensure_subscription(
        &mut self,
        node: &str,
        expire: Option<&str>,
        expires: Option<i64>,
    ) -> Result<(), StepError> {
        let full = self.full_jid.to_string();
        let target = self
            .effective_nodes
            .get(node)
            .map_or_else(|| node.to_owned(), |(n, _)| n.clone());
        let pubsub = self.config.onsip.pubsub_jid.clone();
        let listed = self
            .requester
            .request(&pubsub, false, stanza::list_subscriptions_request(&target))
            .await
            .map_err(|e| request_failed(ErrorKind::Subscribe, "list subscriptions", e))?;
        let ours: Vec<stanza::SubscriptionInfo> = match listed {
            Ok(payload) => stanza::parse_subscriptions_reply(payload.as_ref())
                .map_err(|e| {
                    step_error(
                        ErrorKind::Subscribe,
                        format!("list subscriptions of {target}: {e}"),
                    )
                })?
                .into_iter()
                .filter(|s| {
                    s.jid.as_deref() == Some(full.as_str()) && s.state != SubscriptionState::None
                })
                .collect(),
            // Listing is optional in XEP-0060: fall back to subscribing.
            Err(error) => {
                debug!(node = target, error = %describe(&error), "listing subscriptions not served");
                Vec::new()
            }
        };
        if let Some((keep, extras)) = ours.split_first() {
            for extra in extras {
                let _ = self
                    .requester
                    .request(
                        &pubsub,
                        true,
                        stanza::unsubscribe_request(&target, &full, extra.subid.as_deref()),
                    )
                    .await;
            }
            if let (Some(subid), Some(expire)) = (keep.subid.as_deref(), expire) {
                let renewed = self
                    .requester
                    .request(
                        &pubsub,
                        true,
                        stanza::renew_request(&target, &full, subid, expire),
                    )
                    .await
                    .map_err(|e| request_failed(ErrorKind::Subscribe, "renew subscription", e))?;
                if renewed.is_ok() {
                    self.effective_nodes
                        .insert(node.to_owned(), (target, Some(subid.to_owned())));
                    let state = NodeState::from(keep.state);
                    self.set_node(node, state, expires);
                    if state == NodeState::Subscribed {
                        return Ok(());
                    }
                    return self.await_outcome(node, expires).await;
                }
            } else if keep.state == SubscriptionState::Subscribed {
                self.effective_nodes
                    .insert(node.to_owned(), (target, keep.subid.clone()));
                self.set_node(node, NodeState::Subscribed, expires);
                return Ok(());
            }
        }
        self.subscribe(node, target, expire, expires).await
    }

    async fn subscribe(
        &mut self,
        node: &str,
        mut target: String,
        expire: Option<&str>,
        expires: Option<i64>,
    ) -> Result<(), StepError> {
        let full = self.full_jid.to_string();
        let pubsub = self.config.onsip.pubsub_jid.clone();
        for _ in 0..=MAX_REDIRECTS {
            // Say which name the service will use before asking, so a notice
            // that overtakes the reply is matched to this node.
            {
                let mut state = lock(&self.shared);
                if let Some(status) = state.session.node_mut(node) {
                    status.state = NodeState::Pending;
                    status.target = (target != node).then(|| target.clone());
                }
            }
            let reply = self
                .requester
                .request(
                    &pubsub,
                    true,
                    stanza::subscribe_request(&target, &full, expire),
                )
                .await
                .map_err(|e| request_failed(ErrorKind::Subscribe, "subscribe", e))?;
            match reply {
                Ok(payload) => {
                    let info = stanza::parse_subscribe_reply(payload.as_ref()).map_err(|e| {
                        step_error(ErrorKind::Subscribe, format!("subscribe to {target}: {e}"))
                    })?;
                    self.effective_nodes
                        .insert(node.to_owned(), (target.clone(), info.subid.clone()));
                    // The notice may already have arrived and set the state.
                    let already = self.node_state(node);
                    let state = match (info.state, already) {
                        (
                            SubscriptionState::Pending,
                            Some(s @ (NodeState::Subscribed | NodeState::None)),
                        ) => s,
                        (state, _) => NodeState::from(state),
                    };
                    self.set_node(node, state, expires);
                    return match state {
                        NodeState::Subscribed => Ok(()),
                        NodeState::None => Err(step_error(
                            ErrorKind::Subscribe,
                            format!(
                                "subscription to {target} refused (none): not authorized for it"
                            ),
                        )),
                        _ => self.await_outcome(node, expires).await,
                    };
                }
                Err(error) => match &error.defined_condition {
                    DefinedCondition::Redirect {
                        new_address: Some(uri),
                    }
                    | DefinedCondition::Gone {
                        new_address: Some(uri),
                    } => match redirected_node(uri) {
                        Some(next) => {
                            info!(from = target, to = next, "subscription redirected");
                            target = next;
                        }
                        None => {
                            return Err(step_error(
                                ErrorKind::Subscribe,
                                format!("redirect without a node: {uri}"),
                            ))
                        }
                    },
                    _ => {
                        return Err(step_error(
                            ErrorKind::Subscribe,
                            format!("subscribe to {target}: {}", describe(&error)),
                        ))
                    }
                },
            }
        }
        Err(step_error(
            ErrorKind::Subscribe,
            format!("more than {MAX_REDIRECTS} redirects"),
        ))
    }

    /// Waits for the `subscribed`/`none` notice that follows `pending`.
    async fn await_outcome(&self, node: &str, expires: Option<i64>) -> Result<(), StepError> {
        let deadline = tokio::time::Instant::now() + self.config.xmpp.timeout;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.node_state(node) {
                Some(NodeState::Subscribed) => {
                    self.set_node(node, NodeState::Subscribed, expires);
                    return Ok(());
                }
                Some(NodeState::None) => {
                    return Err(step_error(
                        ErrorKind::Subscribe,
                        format!("subscription to {node} refused (none): not authorized for it"),
                    ))
                }
                _ => {}
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(step_error(
                    ErrorKind::Timeout,
                    format!("subscription to {node} still pending"),
                ));
            }
        }
    }

    /// Loads current items for every node (XEP-0060 items retrieval) and
    /// replaces the state of the addresses they cover. When the service does
    /// not serve it, keeps the last-known state and says so.
    async fn resync(&mut self) {
        let pubsub = self.config.onsip.pubsub_jid.clone();
        lock(&self.shared).session.resync = Resync::NotYet;
        for node in &self.config.onsip.nodes {
            let target = self
                .effective_nodes
                .get(node)
                .map_or_else(|| node.clone(), |(n, _)| n.clone());
            // The reply is applied by the pump as it arrives, so an event
            // that follows it on the stream is applied after it, never undone.
            let scope = NodeScope::of(&target);
            let hook: ReplyHook = Box::new(move |reply, shared| {
                let Ok(payload) = reply else { return };
                let mut events = Vec::new();
                stanza::parse_items_reply(payload.as_ref(), &mut events);
                let items: Vec<_> = events
                    .into_iter()
                    .filter_map(|event| match event {
                        PubsubEvent::Publish {
                            address,
                            item_id,
                            registration,
                        } => Some((address, item_id, registration)),
                        _ => None,
                    })
                    .collect();
                let now = unix_now();
                let mut state = lock(shared);
                state.fleet.resync(|a| scope.covers(a), &items, now);
                let devices = match state.session.resync {
                    Resync::Items { devices, .. } => devices + items.len(),
                    _ => items.len(),
                };
                state.session.resync = Resync::Items { at: now, devices };
            });
            let reply = self
                .requester
                .request_with_hook(&pubsub, false, stanza::items_request(&target), Some(hook))
                .await;
            let reason = match reply {
                Ok(Ok(_)) => continue,
                Ok(Err(error)) => describe(&error),
                Err(RequestError::Timeout) => "no reply in time".to_owned(),
                Err(RequestError::LinkGone) => "link lost".to_owned(),
            };
            info!(
                node = target,
                reason, "items retrieval not available; state kept and rebuilt from live events"
            );
            lock(&self.shared).session.resync = Resync::FromEvents { reason };
            return;
        }
        if let Resync::Items { devices, .. } = lock(&self.shared).session.resync {
            info!(devices, "state loaded by items retrieval");
        }
    }

    /// Ends every subscription of ours (on shutdown).
    async fn unsubscribe_all(&mut self) {
        let full = self.full_jid.to_string();
        let pubsub = self.config.onsip.pubsub_jid.clone();
        let nodes: Vec<(String, String, Option<String>)> = self
            .effective_nodes
            .iter()
            .map(|(node, (target, subid))| (node.clone(), target.clone(), subid.clone()))
            .collect();
        for (node, target, subid) in nodes {
            let reply = self
                .requester
                .request(
                    &pubsub,
                    true,
                    stanza::unsubscribe_request(&target, &full, subid.as_deref()),
                )
                .await;
            match reply {
                Ok(Ok(_)) => {
                    info!(node, "unsubscribed");
                    self.set_node(&node, NodeState::Unsubscribed, None);
                }
                Ok(Err(error)) => warn!(node, error = %describe(&error), "unsubscribe refused"),
                Err(err) => warn!(node, error = ?err, "unsubscribe got no reply"),
            }
        }
    }
}

/// Which addresses an items retrieval of a node covers.
#[derive(Debug, PartialEq)]
enum NodeScope {
    All,
    Domain(String),
    Address(SipAddress),
}

impl NodeScope {
    fn of(node: &str) -> Self {
        let parts: Vec<&str> = node.trim_start_matches('/').split('/').collect();
        match parts.as_slice() {
            ["me", _jid, domain] => Self::Domain(domain.to_ascii_lowercase()),
            ["me", ..] | [""] => Self::All,
            _ => SipAddress::from_leaf_node(node).map_or(Self::All, Self::Address),
        }
    }

    fn covers(&self, address: &SipAddress) -> bool {
        match self {
            Self::All => true,
            Self::Domain(domain) => &*address.domain == domain,
            Self::Address(a) => a == address,
        }
    }
}

/// The node named in an XEP-0060 redirect URI (`xmpp:service?;node=/x`).
fn redirected_node(uri: &str) -> Option<String> {
    let node = uri.split(';').find_map(|part| part.strip_prefix("node="))?;
    let node = node.split('&').next()?;
    (!node.is_empty()).then(|| node.to_owned())
}

/// How long until re-authorization: `before` ahead of expiry, or half the
/// remaining time when that is shorter; at least one second; 45 minutes when
/// the service gave no expiry (OnSIP's clients re-authorized every 45–50).
pub fn refresh_delay(expires: Option<i64>, now: f64, before: Duration) -> Duration {
    let Some(expires) = expires else {
        return Duration::from_secs(45 * 60);
    };
    let remaining = (expires as f64 - now).max(0.0);
    let before = before.as_secs_f64();
    let delay = if remaining > 2.0 * before {
        remaining - before
    } else {
        remaining / 2.0
    };
    Duration::from_secs_f64(delay.max(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let delays: Vec<Duration> = (0..6).map(|_| backoff.next_delay()).collect();
        for (delay, ceiling) in delays.iter().zip([1, 2, 4, 8, 8, 8]) {
            let ceiling = Duration::from_secs(ceiling);
            assert!(
                *delay >= ceiling / 2 && *delay <= ceiling,
                "{delay:?} vs {ceiling:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_secs(1));
    }

    #[test]
    fn refresh_delay_cases() {
        let before = Duration::from_secs(15 * 60);
        assert_eq!(
            refresh_delay(Some(3600), 0.0, before),
            Duration::from_secs(2700)
        );
        assert_eq!(
            refresh_delay(Some(20), 0.0, before),
            Duration::from_secs(10)
        );
        assert_eq!(
            refresh_delay(Some(0), 100.0, before),
            Duration::from_secs(1)
        );
        assert_eq!(refresh_delay(None, 0.0, before), Duration::from_secs(2700));
    }

    #[test]
    fn redirect_uris_and_scopes() {
        assert_eq!(
            redirected_node("xmpp:pubsub.user-agents.xmpp.onsip.com?;node=/me/foo@example.com"),
            Some("/me/foo@example.com".to_owned())
        );
        assert_eq!(redirected_node("xmpp:pubsub.example.com"), None);
        let a = SipAddress::new("u", "d.com");
        assert!(NodeScope::of("/me/x@d.com").covers(&a));
        assert!(NodeScope::of("/me/x@d.com/d.com").covers(&a));
        assert!(!NodeScope::of("/me/x@d.com/e.com").covers(&a));
        assert_eq!(NodeScope::of("/d.com/u"), NodeScope::Address(a));
    }
}
