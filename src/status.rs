//! What the exporter knows about its own link to OnSIP: connection,
//! authorization, each subscription, event and error counts, and a short
//! history of recent changes for the status page.
//!
//! Pure data: the session writes it, `/metrics` and the status page read
//! copies. It is the single source of every session metric, so the metrics
//! and the page can never disagree.

use std::collections::VecDeque;

use crate::stanza::SubscriptionState;

/// Failure kinds, the values of `onsip_xmpp_errors_total{kind}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The XMPP server refused our credentials (SASL failure).
    Auth,
    /// TLS could not be set up (untrusted certificate, no STARTTLS...).
    Tls,
    /// TCP connection or DNS failed.
    Connect,
    /// A request or the keepalive got no answer in time.
    Timeout,
    /// The XML stream broke or was closed by the server.
    Stream,
    /// OnSIP refused the `authorize-plain` command.
    Authorize,
    /// A subscribe, list, renew or items request failed.
    Subscribe,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 7] = [
        Self::Auth,
        Self::Tls,
        Self::Connect,
        Self::Timeout,
        Self::Stream,
        Self::Authorize,
        Self::Subscribe,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auth => "auth",
            Self::Tls => "tls",
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Stream => "stream",
            Self::Authorize => "authorize",
            Self::Subscribe => "subscribe",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Pubsub event kinds, the values of `onsip_pubsub_events_total{kind}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    Publish,
    Retract,
    Subscription,
    Ignored,
    Malformed,
}

impl EventKind {
    pub const ALL: [EventKind; 5] = [
        Self::Publish,
        Self::Retract,
        Self::Subscription,
        Self::Ignored,
        Self::Malformed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Publish => "publish",
            Self::Retract => "retract",
            Self::Subscription => "subscription",
            Self::Ignored => "ignored",
            Self::Malformed => "malformed",
        }
    }
}

/// Subscription states as exported (`onsip_subscription_state{state}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeState {
    Pending,
    Subscribed,
    None,
    Unsubscribed,
}

impl NodeState {
    pub const ALL: [NodeState; 4] = [
        Self::Pending,
        Self::Subscribed,
        Self::None,
        Self::Unsubscribed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Subscribed => "subscribed",
            Self::None => "none",
            Self::Unsubscribed => "unsubscribed",
        }
    }
}

impl From<SubscriptionState> for NodeState {
    fn from(state: SubscriptionState) -> Self {
        match state {
            SubscriptionState::Pending | SubscriptionState::Unconfigured => Self::Pending,
            SubscriptionState::Subscribed => Self::Subscribed,
            SubscriptionState::None => Self::None,
        }
    }
}

/// One configured node and our subscription to it.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeStatus {
    pub node: String,
    pub state: NodeState,
    pub subid: Option<String>,
    /// The node name the service uses for it, when a redirect renamed it.
    pub target: Option<String>,
    /// When the subscription expires, Unix seconds.
    pub expiry: Option<i64>,
}

/// How the fleet state was last filled after (re)subscribing.
#[derive(Clone, Debug, PartialEq)]
pub enum Resync {
    /// No subscription completed yet.
    NotYet,
    /// Items retrieval answered: the state is exact as of `at`.
    Items { at: f64, devices: usize },
    /// Items retrieval is not served: state is the last known one, rebuilt
    /// from live events.
    FromEvents { reason: String },
}

/// The last failure, for the status page and logs.
#[derive(Clone, Debug, PartialEq)]
pub struct LastError {
    pub kind: ErrorKind,
    pub message: String,
    pub at: f64,
}

/// The session as the rest of the exporter sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionStatus {
    pub connected: bool,
    pub bound_jid: Option<String>,
    pub connects: u64,
    errors: [u64; 7],
    pub last_error: Option<LastError>,
    pub authorized: bool,
    pub authorization_expiry: Option<i64>,
    pub authorized_addresses: usize,
    pub nodes: Vec<NodeStatus>,
    events: [u64; 5],
    pub last_event: Option<f64>,
    pub resync: Resync,
}

impl SessionStatus {
    /// A status with every configured node not yet subscribed.
    pub fn new(nodes: &[String]) -> Self {
        Self {
            connected: false,
            bound_jid: None,
            connects: 0,
            errors: [0; 7],
            last_error: None,
            authorized: false,
            authorization_expiry: None,
            authorized_addresses: 0,
            nodes: nodes
                .iter()
                .map(|node| NodeStatus {
                    node: node.clone(),
                    state: NodeState::Unsubscribed,
                    subid: None,
                    target: None,
                    expiry: None,
                })
                .collect(),
            events: [0; 5],
            last_event: None,
            resync: Resync::NotYet,
        }
    }

    /// `onsip_up`: connected, authorized, and every node subscribed.
    pub fn up(&self) -> bool {
        self.connected
            && self.authorized
            && !self.nodes.is_empty()
            && self.nodes.iter().all(|n| n.state == NodeState::Subscribed)
    }

    pub fn record_error(&mut self, kind: ErrorKind, message: String, now: f64) {
        self.errors[kind.index()] += 1;
        self.last_error = Some(LastError {
            kind,
            message,
            at: now,
        });
    }

    pub fn errors(&self, kind: ErrorKind) -> u64 {
        self.errors[kind.index()]
    }

    pub fn count_event(&mut self, kind: EventKind, now: f64) {
        self.events[kind as usize] += 1;
        self.last_event = Some(now);
    }

    pub fn events(&self, kind: EventKind) -> u64 {
        self.events[kind as usize]
    }

    /// Sets the connection state; a drop also drops authorization and
    /// subscriptions, since a new stream must redo both.
    pub fn set_connected(&mut self, connected: bool, bound_jid: Option<String>) {
        if connected && !self.connected {
            self.connects += 1;
        }
        self.connected = connected;
        self.bound_jid = bound_jid;
        if !connected {
            self.authorized = false;
            for node in &mut self.nodes {
                node.state = NodeState::Unsubscribed;
            }
        }
    }

    pub fn node_mut(&mut self, node: &str) -> Option<&mut NodeStatus> {
        self.nodes.iter_mut().find(|n| n.node == node)
    }
}

/// The state file's history in this process.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PersistStatus {
    /// Whether a state file is configured.
    pub enabled: bool,
    /// Outcome of the load at start: devices restored, or why not.
    pub loaded: Option<Result<usize, String>>,
    pub writes: u64,
    pub write_errors: u64,
    pub last_write: Option<f64>,
}

/// One line of the status page's "recent changes".
#[derive(Clone, Debug, PartialEq)]
pub struct RecentChange {
    pub at: f64,
    pub address: String,
    pub what: &'static str,
    pub device: String,
}

/// A bounded history: the newest `capacity` changes.
#[derive(Clone, Debug)]
pub struct Recent {
    changes: VecDeque<RecentChange>,
    capacity: usize,
}

impl Recent {
    pub fn new(capacity: usize) -> Self {
        Self {
            changes: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    pub fn push(&mut self, change: RecentChange) {
        if self.changes.len() == self.capacity {
            self.changes.pop_front();
        }
        self.changes.push_back(change);
    }

    /// Newest first.
    pub fn newest_first(&self) -> impl Iterator<Item = &RecentChange> {
        self.changes.iter().rev()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_needs_every_node_subscribed() {
        let mut status = SessionStatus::new(&["/a".into(), "/b".into()]);
        status.set_connected(true, None);
        status.authorized = true;
        assert!(!status.up());
        for node in &mut status.nodes {
            node.state = NodeState::Subscribed;
        }
        assert!(status.up());
        status.set_connected(false, None);
        assert!(!status.up());
        assert!(status
            .nodes
            .iter()
            .all(|n| n.state == NodeState::Unsubscribed));
        assert_eq!(status.connects, 1);
    }

    #[test]
    fn recent_is_bounded_newest_first() {
        let mut recent = Recent::new(2);
        for i in 0..3 {
            recent.push(RecentChange {
                at: f64::from(i),
                address: format!("u{i}@d"),
                what: "registered",
                device: String::new(),
            });
        }
        let order: Vec<f64> = recent.newest_first().map(|c| c.at).collect();
        assert_eq!(order, [2.0, 1.0]);
    }
}
