//! A simulator of OnSIP's two XMPP services, so the exporter's tests and demo
//! run without an OnSIP account:
//!
//! - `commands.auth.<domain>`: the XEP-0050 `authorize-plain` command;
//! - `pubsub.user-agents.<domain>`: the XEP-0060 User-Agent PubSub service
//!   (subscribe with OnSIP's pending → `subscribed`/`none` dance, list,
//!   renew, unsubscribe, the 10-per-node limit, expiry, items retrieval,
//!   publish and retract events shaped exactly like OnSIP's page).
//!
//! # Layout
//!
//! Pure, clock-free logic (stanza in + `now` → stanzas out), unit-tested with
//! the seed's stanzas:
//! - [`node`]: node names, redirects, coverage;
//! - [`auth`]: `authorize-plain` and the authorization store;
//! - [`pubsub`]: subscriptions, items and event fan-out;
//! - [`service`]: the dispatcher over both, plus ping/disco and counters;
//! - [`fleet`]: a seeded scenario generator (phones that come, refresh and
//!   go) and the event plan of the load mode;
//! - `xml`: element builder, forms, stanza errors.
//!
//! I/O edges:
//! - [`Simulator`] (`sim`): cheap-clone handle; the service behind a lock and
//!   the routing table of live links; the control API for tests;
//! - [`attach_component`] (`component`): XEP-0114 links into a real server
//!   (Prosody), one per service JID, reconnecting until cancelled;
//! - [`serve_c2s`] (`c2s`): a small in-process XMPP server for the demo;
//! - [`run_fleet`] / [`run_load`] (`drive`): apply a fleet scenario in real
//!   time, or publish at a target rate with back-pressure.
//!
//! # Behaviour choices (where OnSIP's documentation leaves room)
//!
//! - Redirects of `/` and `/<sip-domain>`: followed by default (the answer
//!   names the redirected node); [`RedirectStyle::Error`] answers an
//!   XEP-0060 `<redirect/>` error instead.
//! - A failed authorization: a `completed` command with `<note type='error'>`
//!   by default; [`AuthErrorStyle::IqError`] answers `not-authorized`.
//! - Authorizing a full JID authorizes its bare JID.
//! - Subscribe: the iq result is `pending` (with a `subid`), then a
//!   `<message/>` to the bare JID carries `subscribed` or `none` (with the
//!   same `subid`). With `direct_subscribed`, the iq result says `subscribed`
//!   (or is a `forbidden` error) and no message follows.
//! - The limit (default 10) counts live subscriptions per resolved node per
//!   bare JID; the next one gets `policy-violation` +
//!   `too-many-subscriptions` (type `wait`).
//! - Coverage is evaluated at event time against live authorizations, so
//!   events stop when an authorization lapses. `/me/<jid>` needs
//!   `subscription_depth=all` and collections need `subscription_type=items`
//!   (defaults: `items`, `1`), as XEP-0248 defines.
//! - Events: one message per subscription, to the subscriber's bare JID
//!   (or one per bare JID with `one_message_per_jid`); a SHIM `Collection`
//!   header names the collection for `/me/...` subscriptions.
//! - Subscriptions that pass their `pubsub#expire` vanish silently.
//! - Items retrieval answers one `<items node=/d/u>` block per covered leaf
//!   (empty blocks included), or `feature-not-implemented` when disabled.

pub mod auth;
mod c2s;
mod component;
pub mod config;
mod drive;
pub mod fleet;
pub mod node;
pub mod pubsub;
pub mod service;
mod sim;
mod xml;

pub use auth::AuthorizationInfo;
pub use c2s::serve_c2s;
pub use component::{attach_component, handshake_digest};
pub use config::{Account, AuthErrorStyle, RedirectStyle, SimConfig};
pub use drive::{run_fleet, run_load, LoadReport, LoadSpec};
pub use pubsub::{Registration, SubscribeAnswer, SubscriptionInfo, SubscriptionState};
pub use service::{AuthorizeAnswer, Service, ServiceStats};
pub use sim::{ComponentStatus, SessionInfo, SimStats, Simulator};

/// Errors of the network faces.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The configuration cannot work (e.g. an invalid service JID).
    #[error("bad simulator configuration: {0}")]
    Config(String),
    /// An I/O error that stops a face.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
