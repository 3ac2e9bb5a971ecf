//! The status page at `/` and its JSON twin at `/api/status`: a pure render
//! of a copy of the state. Every outside value (SIP addresses, User-Agent
//! strings, error texts) is HTML-escaped; no external assets; readable on a
//! phone. Secrets are not in the state, so they cannot reach the page.

use std::fmt::Write as _;

use serde::Serialize;

use crate::state::State;
use crate::status::Resync;

/// Most offline addresses listed (the total is always shown).
const MAX_OFFLINE_LISTED: usize = 500;

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct StatusView {
    pub version: &'static str,
    pub up: bool,
    pub connected: bool,
    pub bound_jid: Option<String>,
    pub connects: u64,
    pub last_error: Option<ErrorView>,
    pub authorized: bool,
    pub authorization_expiry: Option<i64>,
    pub authorized_addresses: usize,
    pub subscriptions: Vec<SubscriptionView>,
    pub resync: String,
    pub last_event: Option<f64>,
    pub domains: Vec<DomainView>,
    pub offline_total: usize,
    pub offline: Vec<String>,
    pub recent: Vec<RecentView>,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ErrorView {
    pub kind: &'static str,
    pub message: String,
    pub at: f64,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct SubscriptionView {
    pub node: String,
    pub state: &'static str,
    pub expiry: Option<i64>,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct DomainView {
    pub domain: String,
    pub addresses: u64,
    pub online: u64,
    pub devices: u64,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct RecentView {
    pub at: f64,
    pub address: String,
    pub what: &'static str,
    pub device: String,
}

impl StatusView {
    /// Copies what the page shows out of the state (call under the lock).
    pub fn from_state(state: &State, version: &'static str) -> Self {
        let session = &state.session;
        let snapshot = state.fleet.snapshot(false);
        let mut domains: Vec<DomainView> = snapshot
            .domains
            .iter()
            .map(|d| DomainView {
                domain: d.domain.to_string(),
                addresses: d.addresses,
                online: d.online,
                devices: d.devices,
            })
            .collect();
        domains.sort_by(|a, b| a.domain.cmp(&b.domain));
        let mut offline = Vec::new();
        let mut offline_total = 0;
        state.fleet.for_each_address(|domain, user, address| {
            if address.devices.is_empty() {
                offline_total += 1;
                if offline.len() < MAX_OFFLINE_LISTED {
                    offline.push(format!("{user}@{domain}"));
                }
            }
        });
        offline.sort();
        Self {
            version,
            up: session.up(),
            connected: session.connected,
            bound_jid: session.bound_jid.clone(),
            connects: session.connects,
            last_error: session.last_error.as_ref().map(|e| ErrorView {
                kind: e.kind.as_str(),
                message: e.message.clone(),
                at: e.at,
            }),
            authorized: session.authorized,
            authorization_expiry: session.authorization_expiry,
            authorized_addresses: session.authorized_addresses,
            subscriptions: session
                .nodes
                .iter()
                .map(|n| SubscriptionView {
                    node: n.node.clone(),
                    state: n.state.as_str(),
                    expiry: n.expiry,
                })
                .collect(),
            resync: match &session.resync {
                Resync::NotYet => "not yet".to_owned(),
                Resync::Items { devices, .. } => {
                    format!("loaded by items retrieval ({devices} devices)")
                }
                Resync::FromEvents { reason } => {
                    format!("rebuilt from live events (items retrieval: {reason})")
                }
            },
            last_event: session.last_event,
            domains,
            offline_total,
            offline,
            recent: state
                .recent
                .newest_first()
                .map(|c| RecentView {
                    at: c.at,
                    address: c.address.clone(),
                    what: c.what,
                    device: c.device.clone(),
                })
                .collect(),
        }
    }
}

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn time(unix: Option<f64>) -> String {
    match unix {
        Some(t) => chrono::DateTime::from_timestamp(t as i64, 0)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_default(),
        None => "—".to_owned(),
    }
}

fn yes_no(ok: bool, yes: &str, no: &str) -> String {
    let (class, text) = if ok { ("ok", yes) } else { ("bad", no) };
    format!("<span class=\"{class}\">{text}</span>")
}

/// Renders the status page.
pub fn render_html(view: &StatusView, telemetry_path: &str) -> String {
    let mut h = String::with_capacity(8 * 1024);
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<meta http-equiv=\"refresh\" content=\"10\">\
<title>onsip-ua-exporter</title><style>\
body{{font-family:system-ui,sans-serif;margin:1rem;max-width:60rem;color:#222}}\
table{{border-collapse:collapse;width:100%;margin-bottom:1rem}}td,th{{border-bottom:1px solid #ddd;padding:.3rem;text-align:left}}\
.ok{{color:#0a0;font-weight:bold}}.bad{{color:#c00;font-weight:bold}}code{{word-break:break-all}}\
</style></head><body><h1>onsip-ua-exporter {version}</h1>\
<p>Overall: {up} · <a href=\"{metrics}\">metrics</a> · <a href=\"/api/status\">JSON</a></p>",
        version = escape(view.version),
        up = yes_no(view.up, "UP", "DOWN"),
        metrics = escape(telemetry_path),
    );
    let _ = write!(
        h,
        "<h2>Session</h2><table>\
<tr><th>XMPP</th><td>{connected} {jid}</td></tr>\
<tr><th>Sessions established</th><td>{connects}</td></tr>\
<tr><th>Authorization</th><td>{authorized}, {addresses} addresses, expires {expiry}</td></tr>\
<tr><th>State</th><td>{resync}</td></tr>\
<tr><th>Last event</th><td>{last_event}</td></tr>",
        connected = yes_no(view.connected, "connected", "disconnected"),
        jid = escape(view.bound_jid.as_deref().unwrap_or("")),
        connects = view.connects,
        authorized = yes_no(view.authorized, "authorized", "not authorized"),
        addresses = view.authorized_addresses,
        expiry = time(view.authorization_expiry.map(|e| e as f64)),
        resync = escape(&view.resync),
        last_event = time(view.last_event),
    );
    if let Some(err) = &view.last_error {
        let _ = write!(
            h,
            "<tr><th>Last error</th><td class=\"bad\">{kind}: {message} ({at})</td></tr>",
            kind = err.kind,
            message = escape(&err.message),
            at = time(Some(err.at)),
        );
    }
    h.push_str(
        "</table><h2>Subscriptions</h2><table><tr><th>Node</th><th>State</th><th>Expires</th></tr>",
    );
    for s in &view.subscriptions {
        let _ = write!(
            h,
            "<tr><td><code>{node}</code></td><td>{state}</td><td>{expiry}</td></tr>",
            node = escape(&s.node),
            state = yes_no(s.state == "subscribed", s.state, s.state),
            expiry = time(s.expiry.map(|e| e as f64)),
        );
    }
    h.push_str("</table><h2>Domains</h2><table><tr><th>Domain</th><th>Addresses</th><th>Online</th><th>Devices</th></tr>");
    for d in &view.domains {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&d.domain),
            d.addresses,
            d.online,
            d.devices
        );
    }
    let _ = write!(
        h,
        "</table><h2 id=\"offline\">Offline now ({})</h2><ul>",
        view.offline_total
    );
    for address in &view.offline {
        let _ = write!(h, "<li class=\"offline\">{}</li>", escape(address));
    }
    if view.offline_total > view.offline.len() {
        let _ = write!(
            h,
            "<li>… and {} more</li>",
            view.offline_total - view.offline.len()
        );
    }
    h.push_str("</ul><h2>Recent changes</h2><table><tr><th>When</th><th>Address</th><th>What</th><th>Device</th></tr>");
    for r in &view.recent {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            time(Some(r.at)),
            escape(&r.address),
            r.what,
            escape(&r.device)
        );
    }
    h.push_str("</table></body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stanza::{PubsubEvent, Registration, SipAddress};
    use crate::state::Limits;
    use std::sync::Arc;

    #[test]
    fn outside_text_is_escaped_and_offline_listed() {
        let mut state = State::new(Limits::default(), &["/me/a@d.com".to_owned()]);
        state
            .fleet
            .set_watched(&[SipAddress::new("front<desk>", "d.com")]);
        state.apply_events(
            &[PubsubEvent::Publish {
                address: SipAddress::new("bob", "d.com"),
                item_id: Arc::from("1"),
                registration: Registration {
                    contact: String::new(),
                    received: String::new(),
                    device: "<script>alert(1)</script>".into(),
                    expires: None,
                },
            }],
            1.0,
        );
        let view = StatusView::from_state(&state, "0.1.0");
        assert_eq!(view.offline, vec!["front<desk>@d.com".to_owned()]);
        let html = render_html(&view, "/metrics");
        assert!(!html.contains("<script>"));
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains("<li class=\"offline\">front&lt;desk&gt;@d.com</li>"));
    }
}
