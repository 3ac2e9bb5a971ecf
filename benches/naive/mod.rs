//! The baseline: the same work done the way a user would first write it.
//!
//! - Parsing: xmpp-parsers' typed `pubsub::event::Event` (the stanza taken
//!   by value), then the `<user-agent>` payload read field by field.
//! - Metrics: the tikv `prometheus` crate, one `GaugeVec`/`IntCounterVec`
//!   per metric, updated on every event; a scrape is `Registry::gather`
//!   then `TextEncoder`.
//!
//! It keeps the exporter's `Fleet` for the device bookkeeping (the naive way
//! still has to know how many devices an address has), so every ratio is
//! about parsing or metrics alone.

use std::sync::Arc;

use minidom::Element;
use onsip_ua_exporter::stanza::{PubsubEvent, Registration, SipAddress};
use onsip_ua_exporter::state::{Applied, Fleet};
use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use xmpp_parsers::pubsub::event::{Event, Payload};

const USER_AGENTS: &str = "onsip:user-agents";

/// Parses one `<event/>` the typed way.
pub fn parse(event: Element, out: &mut Vec<PubsubEvent>) {
    let Ok(event) = Event::try_from(event) else {
        out.push(PubsubEvent::Ignored);
        return;
    };
    let Payload::Items {
        node,
        published,
        retracted,
    } = event.payload
    else {
        out.push(PubsubEvent::Ignored);
        return;
    };
    let Ok(address) = SipAddress::from_leaf_node(&node.0) else {
        out.push(PubsubEvent::Ignored);
        return;
    };
    for item in published {
        let (Some(id), Some(payload)) = (item.id, item.payload) else {
            continue;
        };
        let text = |name: &str| {
            payload
                .get_child(name, USER_AGENTS)
                .map(|c| c.text().trim().to_owned())
                .unwrap_or_default()
        };
        let expires = chrono::DateTime::parse_from_rfc3339(&text("expires"))
            .ok()
            .map(|t| t.timestamp());
        out.push(PubsubEvent::Publish {
            address: address.clone(),
            item_id: Arc::from(id.0),
            registration: Registration {
                contact: text("contact"),
                received: text("received"),
                device: text("device"),
                expires,
            },
        });
    }
    for id in retracted {
        out.push(PubsubEvent::Retract {
            address: address.clone(),
            item_id: Arc::from(id.0),
        });
    }
}

/// A `GaugeVec`/`IntCounterVec` per metric of the contract.
pub struct NaiveMetrics {
    registry: Registry,
    devices: IntGaugeVec,
    registrations: IntCounterVec,
    refreshes: IntCounterVec,
    retracts: IntCounterVec,
    expirations: IntCounterVec,
    expiry: IntGaugeVec,
    last_change: GaugeVec,
    domain_addresses: IntGaugeVec,
    domain_online: IntGaugeVec,
    domain_devices: IntGaugeVec,
    by_user_agent: IntGaugeVec,
}

fn gauge(registry: &Registry, name: &str, labels: &[&str]) -> IntGaugeVec {
    let vec = IntGaugeVec::new(Opts::new(name, name), labels).expect("valid metric");
    registry.register(Box::new(vec.clone())).expect("registers");
    vec
}

fn counter(registry: &Registry, name: &str) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, name), &["domain", "user"]).expect("valid metric");
    registry.register(Box::new(vec.clone())).expect("registers");
    vec
}

impl NaiveMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let address = ["domain", "user"];
        let last_change = GaugeVec::new(
            Opts::new(
                "onsip_user_agent_last_change_timestamp_seconds",
                "When the address's device set last changed.",
            ),
            &address,
        )
        .expect("valid metric");
        registry
            .register(Box::new(last_change.clone()))
            .expect("registers");
        Self {
            devices: gauge(&registry, "onsip_user_agent_devices", &address),
            registrations: counter(&registry, "onsip_user_agent_registrations_total"),
            refreshes: counter(&registry, "onsip_user_agent_refreshes_total"),
            retracts: counter(&registry, "onsip_user_agent_retracts_total"),
            expirations: counter(&registry, "onsip_user_agent_expirations_total"),
            expiry: gauge(
                &registry,
                "onsip_user_agent_registration_expiry_timestamp_seconds",
                &address,
            ),
            last_change,
            domain_addresses: gauge(&registry, "onsip_domain_addresses", &["domain"]),
            domain_online: gauge(&registry, "onsip_domain_addresses_online", &["domain"]),
            domain_devices: gauge(&registry, "onsip_domain_devices", &["domain"]),
            by_user_agent: gauge(
                &registry,
                "onsip_domain_devices_by_user_agent",
                &["domain", "device"],
            ),
            registry,
        }
    }

    /// Creates every series of `fleet` as it stands (a registry that has
    /// seen the fleet's history).
    pub fn load(&self, fleet: &Fleet) {
        fleet.for_each_address(|domain, user, state| {
            let labels = [&**domain, &**user];
            self.devices
                .with_label_values(&labels)
                .set(state.devices.len() as i64);
            self.registrations
                .with_label_values(&labels)
                .inc_by(state.registrations);
            self.refreshes
                .with_label_values(&labels)
                .inc_by(state.refreshes);
            self.retracts
                .with_label_values(&labels)
                .inc_by(state.retracts);
            self.expirations
                .with_label_values(&labels)
                .inc_by(state.expirations);
            if let Some(expiry) = state.latest_expiry() {
                self.expiry.with_label_values(&labels).set(expiry);
            }
            if let Some(at) = state.last_change {
                self.last_change.with_label_values(&labels).set(at);
            }
            self.domain_addresses.with_label_values(&[&**domain]).inc();
            if !state.devices.is_empty() {
                self.domain_online.with_label_values(&[&**domain]).inc();
            }
            for device in state.devices.values() {
                self.domain_devices.with_label_values(&[&**domain]).inc();
                self.by_user_agent
                    .with_label_values(&[&**domain, &*device.user_agent])
                    .inc();
            }
        });
    }

    /// Applies `event` to `fleet` and updates the vecs, as a user keeping
    /// live metrics would.
    pub fn apply(&self, fleet: &mut Fleet, event: &PubsubEvent, now: f64) -> Applied {
        let applied = fleet.apply(event, now);
        let (address, device) = match event {
            PubsubEvent::Publish {
                address,
                registration,
                ..
            } => (address, Some(&*registration.device)),
            PubsubEvent::Retract { address, .. } => (address, None),
            _ => return applied,
        };
        let labels = [&*address.domain, &*address.user];
        let Some(state) = fleet.address(address) else {
            return applied;
        };
        let devices = state.devices.len() as i64;
        match applied {
            Applied::Registered => {
                self.registrations.with_label_values(&labels).inc();
                self.devices.with_label_values(&labels).set(devices);
                self.last_change.with_label_values(&labels).set(now);
                self.domain_devices
                    .with_label_values(&[&*address.domain])
                    .inc();
                if devices == 1 {
                    self.domain_online
                        .with_label_values(&[&*address.domain])
                        .inc();
                }
                if let Some(device) = device {
                    self.by_user_agent
                        .with_label_values(&[&*address.domain, device])
                        .inc();
                }
            }
            Applied::Refreshed => {
                self.refreshes.with_label_values(&labels).inc();
            }
            Applied::Retracted => {
                self.retracts.with_label_values(&labels).inc();
                self.devices.with_label_values(&labels).set(devices);
                self.last_change.with_label_values(&labels).set(now);
                self.domain_devices
                    .with_label_values(&[&*address.domain])
                    .dec();
                if devices == 0 {
                    self.domain_online
                        .with_label_values(&[&*address.domain])
                        .dec();
                }
            }
            _ => return applied,
        }
        if let Some(expiry) = state.latest_expiry() {
            self.expiry.with_label_values(&labels).set(expiry);
        }
        applied
    }

    /// One scrape: gather, then the text encoder.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encodes");
        String::from_utf8(out).expect("utf-8")
    }
}
