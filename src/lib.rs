//! # onsip-ua-exporter
//!
//! A Prometheus exporter for OnSIP's XMPP User-Agent PubSub service: it logs
//! into XMPP, authorizes with OnSIP, subscribes to phone registration events
//! and serves, per SIP address, which devices are online.
//!
//! ## A tour of the layout
//! Pure logic (no I/O, no clock; unit-tested):
//! - [`stanza`]: the OnSIP wire protocol: requests built, replies and events parsed.
//! - [`state`]: devices per SIP address, counters, expiry, snapshots.
//! - [`status`]: the session's own state: link, authorization, subscriptions, errors.
//! - [`config`]: flags + environment + file → one validated `Config`.
//! - [`page`]: the status page and its JSON, rendered from a copy of the state.
//! - [`persist`]: the state file format, capture/restore, atomic writes.
//!
//! I/O edges:
//! - [`xmpp`]: opening a link (TCP, STARTTLS, SASL, bind, presence);
//!   [`xml_guard`]: size and depth limits on what the server sends.
//! - [`session`]: the OnSIP procedure over a link, reconnects, keepalive.
//! - [`metrics`] and [`process`]: `/metrics` encoded from the state at scrape time.
//! - [`http`]: the hyper server; [`web_config`]: its TLS, basic auth and
//!   headers (`--web.config.file`, exporter-toolkit format).
//! - [`app`]: wiring and orderly shutdown; [`telemetry`]: logging;
//!   [`demo`]: the simulator and the exporter together, for a first look.
//! - [`simulate`]: the simulator alone with a fleet and a load, for benchmarks.
//!
//! The OnSIP simulator the tests and the demo run against is its own crate,
//! `onsip-sim`, so a parsing bug here cannot mirror itself there.
#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod demo;
pub mod http;
pub mod metrics;
pub mod page;
pub mod persist;
pub mod process;
pub mod session;
pub mod simulate;
pub mod stanza;
pub mod state;
pub mod status;
pub mod telemetry;
pub mod web_config;
pub mod xml_guard;
pub mod xmpp;
