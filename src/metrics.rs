//! `/metrics`: every metric of the contract, encoded at scrape time from a
//! copy of the shared state.
//!
//! One prometheus-client `Collector` reads the state, so there are no stale
//! series to remove and no second copy of any figure to keep in step. The
//! lock is held only while copying (`State::snapshot`), never while encoding.
//! Names and labels are an interface (dashboards, alerts): see
//! `shared/reference/metrics-contract.md` and the README.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::process;
use crate::state::{FleetSnapshot, Shared};
use crate::status::{ErrorKind, EventKind, NodeState, SessionStatus};

/// The response formats `/metrics` can produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4.
    Text,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Text => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// Picks the format from an `Accept` header as Prometheus sends it.
    pub fn negotiate(accept: Option<&str>) -> Self {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Text,
        }
    }
}

/// Build facts for `onsip_exporter_build_info`.
#[derive(Clone, Debug)]
pub struct BuildInfo {
    pub version: &'static str,
    pub revision: &'static str,
}

/// The registry, built once at start and then only read.
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    pub fn new(state: Shared, per_address: bool, build: BuildInfo) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(StateCollector {
            state,
            per_address,
            build,
        }));
        registry.register_collector(Box::new(process::ProcessCollector));
        Self { registry }
    }

    /// Encodes every metric in `format`.
    pub fn encode(&self, format: Format) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(64 * 1024);
        match format {
            Format::Text => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?
            }
            Format::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut out, &self.registry)?
            }
        }
        Ok(out)
    }
}

#[derive(Debug)]
struct StateCollector {
    state: Shared,
    per_address: bool,
    build: BuildInfo,
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (fleet, session) = {
            // A poisoned lock means a panic elsewhere; the data is still the
            // best we have, so export it rather than fail every scrape.
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            (
                state.fleet.snapshot(self.per_address),
                state.session.clone(),
            )
        };
        encode_session(&mut encoder, &session, &self.build)?;
        encode_fleet(&mut encoder, &fleet)
    }
}

/// A gauge or counter without labels.
fn scalar(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    encode_value(&mut metric, kind, value)
}

fn encode_value(
    metric: &mut MetricEncoder,
    kind: MetricType,
    value: f64,
) -> Result<(), std::fmt::Error> {
    // Whole numbers (counts, whole-second timestamps) are written without a
    // fraction: "1" reads better than "1.0" and is what Go exporters print.
    let whole = value.fract() == 0.0 && value.abs() < 9e15;
    match (kind, whole) {
        (MetricType::Counter, true) => {
            metric.encode_counter::<NoLabelSet, _, u64>(&(value as u64), None)
        }
        (MetricType::Counter, false) => metric.encode_counter::<NoLabelSet, _, u64>(&value, None),
        (_, true) => metric.encode_gauge(&(value as i64)),
        (_, false) => metric.encode_gauge(&value),
    }
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

fn encode_session(
    encoder: &mut DescriptorEncoder,
    session: &SessionStatus,
    build: &BuildInfo,
) -> Result<(), std::fmt::Error> {
    use MetricType::{Counter, Gauge};
    scalar(
        encoder,
        "onsip_up",
        "1 when connected, authorized, and every configured subscription is subscribed.",
        Gauge,
        flag(session.up()),
    )?;
    scalar(
        encoder,
        "onsip_xmpp_connected",
        "1 while the XMPP session is online.",
        Gauge,
        flag(session.connected),
    )?;
    scalar(
        encoder,
        "onsip_xmpp_connects",
        "XMPP sessions established.",
        Counter,
        session.connects as f64,
    )?;
    {
        let mut metric =
            encoder.encode_descriptor("onsip_xmpp_errors", "Failures by kind.", None, Counter)?;
        for kind in ErrorKind::ALL {
            metric
                .encode_family(&[("kind", kind.as_str())])?
                .encode_counter::<NoLabelSet, _, u64>(&session.errors(kind), None)?;
        }
    }
    if let Some(expiry) = session.authorization_expiry {
        scalar(
            encoder,
            "onsip_authorization_expiry_timestamp_seconds",
            "When the OnSIP authorization expires.",
            Gauge,
            expiry as f64,
        )?;
    }
    scalar(
        encoder,
        "onsip_authorized_addresses",
        "SIP addresses the authorization covers.",
        Gauge,
        session.authorized_addresses as f64,
    )?;
    {
        let mut metric = encoder.encode_descriptor(
            "onsip_subscription_state",
            "1 for the current state of each configured node, 0 for the others.",
            None,
            Gauge,
        )?;
        for node in &session.nodes {
            for state in NodeState::ALL {
                metric
                    .encode_family(&[("node", node.node.as_str()), ("state", state.as_str())])?
                    .encode_gauge(&i64::from(node.state == state))?;
            }
        }
    }
    {
        let mut metric = encoder.encode_descriptor(
            "onsip_subscription_expiry_timestamp_seconds",
            "When the subscription expires.",
            None,
            Gauge,
        )?;
        for node in &session.nodes {
            if let Some(expiry) = node.expiry {
                metric
                    .encode_family(&[("node", node.node.as_str())])?
                    .encode_gauge(&expiry)?;
            }
        }
    }
    {
        let mut metric = encoder.encode_descriptor(
            "onsip_pubsub_events",
            "Pubsub events received by kind.",
            None,
            Counter,
        )?;
        for kind in EventKind::ALL {
            metric
                .encode_family(&[("kind", kind.as_str())])?
                .encode_counter::<NoLabelSet, _, u64>(&session.events(kind), None)?;
        }
    }
    if let Some(at) = session.last_event {
        scalar(
            encoder,
            "onsip_last_event_timestamp_seconds",
            "When the last pubsub event arrived.",
            Gauge,
            at,
        )?;
    }
    let resync_from_items = matches!(session.resync, crate::status::Resync::Items { .. });
    scalar(
        encoder,
        "onsip_state_resync_from_items",
        "1 when the state was last loaded by items retrieval, 0 when it is rebuilt from live events.",
        Gauge,
        flag(resync_from_items),
    )?;
    let mut metric = encoder.encode_descriptor(
        "onsip_exporter_build_info",
        "Always 1; the labels say which build runs.",
        None,
        Gauge,
    )?;
    metric
        .encode_family(&[("version", build.version), ("revision", build.revision)])?
        .encode_gauge(&1i64)
}

/// One per-address metric: a descriptor, then a sample per row.
fn per_address(
    encoder: &mut DescriptorEncoder,
    fleet: &FleetSnapshot,
    name: &str,
    help: &str,
    kind: MetricType,
    value: impl Fn(&crate::state::AddressRow) -> Option<f64>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for row in &fleet.addresses {
        if let Some(v) = value(row) {
            let labels = [("domain", &*row.domain), ("user", &*row.user)];
            encode_value(&mut metric.encode_family(&labels)?, kind, v)?;
        }
    }
    Ok(())
}

/// One per-domain metric.
fn per_domain(
    encoder: &mut DescriptorEncoder,
    fleet: &FleetSnapshot,
    name: &str,
    help: &str,
    value: impl Fn(&crate::state::DomainRow) -> u64,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for row in &fleet.domains {
        metric
            .encode_family(&[("domain", &*row.domain)])?
            .encode_gauge(&value(row))?;
    }
    Ok(())
}

fn encode_fleet(
    encoder: &mut DescriptorEncoder,
    fleet: &FleetSnapshot,
) -> Result<(), std::fmt::Error> {
    use MetricType::{Counter, Gauge};
    if !fleet.addresses.is_empty() {
        per_address(
            encoder,
            fleet,
            "onsip_user_agent_devices",
            "Devices (user agents) registered for the address now.",
            Gauge,
            |r| Some(r.devices as f64),
        )?;
        per_address(
            encoder,
            fleet,
            "onsip_user_agent_registrations",
            "Items published with an id not currently held (a device came online).",
            Counter,
            |r| Some(r.registrations as f64),
        )?;
        per_address(
            encoder,
            fleet,
            "onsip_user_agent_refreshes",
            "Items re-published with an id already held (a re-registration).",
            Counter,
            |r| Some(r.refreshes as f64),
        )?;
        per_address(
            encoder,
            fleet,
            "onsip_user_agent_retracts",
            "Retract events (a device went offline).",
            Counter,
            |r| Some(r.retracts as f64),
        )?;
        per_address(
            encoder,
            fleet,
            "onsip_user_agent_expirations",
            "Devices dropped because their registration expired (plus grace) with no retract.",
            Counter,
            |r| Some(r.expirations as f64),
        )?;
        per_address(
            encoder,
            fleet,
            "onsip_user_agent_registration_expiry_timestamp_seconds",
            "Latest registration expiry among the address's devices.",
            Gauge,
            |r| r.latest_expiry.map(|e| e as f64),
        )?;
        per_address(
            encoder,
            fleet,
            "onsip_user_agent_last_change_timestamp_seconds",
            "When the address's device set last changed.",
            Gauge,
            |r| r.last_change,
        )?;
    }
    per_domain(
        encoder,
        fleet,
        "onsip_domain_addresses",
        "SIP addresses known in the domain.",
        |d| d.addresses,
    )?;
    per_domain(
        encoder,
        fleet,
        "onsip_domain_addresses_online",
        "Addresses with at least one device.",
        |d| d.online,
    )?;
    per_domain(
        encoder,
        fleet,
        "onsip_domain_devices",
        "Devices registered in the domain.",
        |d| d.devices,
    )?;
    {
        let mut metric = encoder.encode_descriptor(
            "onsip_domain_devices_by_user_agent",
            "Devices per User-Agent string; past the configured number per domain the rest count under device=\"other\".",
            None,
            Gauge,
        )?;
        for row in &fleet.domains {
            for (device, count) in &row.by_user_agent {
                metric
                    .encode_family(&[("domain", &*row.domain), ("device", &**device)])?
                    .encode_gauge(count)?;
            }
        }
    }
    let mut metric = encoder.encode_descriptor(
        "onsip_refused_events",
        "Publish events refused because a limit (max addresses, max devices per address) was reached.",
        None,
        Counter,
    )?;
    for (limit, value) in [
        ("addresses", fleet.refused_addresses),
        ("devices", fleet.refused_devices),
    ] {
        metric
            .encode_family(&[("limit", limit)])?
            .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stanza::{PubsubEvent, Registration, SipAddress};
    use crate::state::{Limits, State};
    use std::sync::{Arc, Mutex};

    fn state_with_one_phone() -> Shared {
        let mut state = State::new(Limits::default(), &["/me/foo@example.com".to_owned()]);
        state
            .fleet
            .set_watched(&[SipAddress::new("bob", "example.com")]);
        state.apply_events(
            &[PubsubEvent::Publish {
                address: SipAddress::new("foo", "example.com"),
                item_id: Arc::from("1"),
                registration: Registration {
                    contact: "sip:foo@192.0.2.1".into(),
                    received: "sip:192.0.2.1:5060".into(),
                    device: "Yealink \"T54W\"".into(),
                    expires: Some(1_700_000_000),
                },
            }],
            1_699_999_000.0,
        );
        Arc::new(Mutex::new(state))
    }

    fn build() -> BuildInfo {
        BuildInfo {
            version: "1.2.3",
            revision: "abc",
        }
    }

    #[test]
    fn exact_lines_for_one_phone() {
        let metrics = Metrics::new(state_with_one_phone(), true, build());
        let text = metrics.encode(Format::Text).expect("encodes");
        for line in [
            "onsip_user_agent_devices{domain=\"example.com\",user=\"foo\"} 1",
            "onsip_user_agent_devices{domain=\"example.com\",user=\"bob\"} 0",
            "onsip_user_agent_registrations_total{domain=\"example.com\",user=\"foo\"} 1",
            "onsip_user_agent_registration_expiry_timestamp_seconds{domain=\"example.com\",user=\"foo\"} 1700000000",
            "onsip_domain_addresses{domain=\"example.com\"} 2",
            "onsip_domain_addresses_online{domain=\"example.com\"} 1",
            "onsip_domain_devices_by_user_agent{domain=\"example.com\",device=\"Yealink \\\"T54W\\\"\"} 1",
            "onsip_pubsub_events_total{kind=\"publish\"} 1",
            "onsip_subscription_state{node=\"/me/foo@example.com\",state=\"unsubscribed\"} 1",
            "onsip_subscription_state{node=\"/me/foo@example.com\",state=\"subscribed\"} 0",
            "onsip_up 0",
            "onsip_xmpp_errors_total{kind=\"auth\"} 0",
            "onsip_exporter_build_info{version=\"1.2.3\",revision=\"abc\"} 1",
            "# TYPE onsip_user_agent_retracts_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        // No expiry sample for an address without devices.
        assert!(!text.contains(
            "onsip_user_agent_registration_expiry_timestamp_seconds{domain=\"example.com\",user=\"bob\"}"
        ));
    }

    #[test]
    fn per_address_metrics_can_be_switched_off() {
        let metrics = Metrics::new(state_with_one_phone(), false, build());
        let text = metrics.encode(Format::Text).expect("encodes");
        assert!(!text.contains("onsip_user_agent_devices"));
        assert!(text.contains("onsip_domain_devices{domain=\"example.com\"} 1"));
    }

    #[test]
    fn openmetrics_ends_with_eof() {
        let metrics = Metrics::new(state_with_one_phone(), true, build());
        let text = metrics.encode(Format::OpenMetrics).expect("encodes");
        assert!(text.ends_with("# EOF\n"));
        assert_eq!(
            Format::negotiate(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            )),
            Format::OpenMetrics
        );
        assert_eq!(Format::negotiate(None), Format::Text);
    }
}
