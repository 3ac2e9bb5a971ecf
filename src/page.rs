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
    /// When this view was taken (Unix seconds): times on the page are
    /// relative to it.
    pub now: f64,
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
    /// The state file's story in this process, when one is configured.
    pub state_file: Option<String>,
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
    pub fn from_state(state: &State, version: &'static str, now: f64) -> Self {
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
            now,
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
            state_file: state.persist.enabled.then(|| {
                let persist = &state.persist;
                let loaded = match &persist.loaded {
                    Some(Ok(devices)) => format!("{devices} devices loaded at start"),
                    Some(Err(reason)) => format!("not loaded ({reason})"),
                    None => "not read yet".to_owned(),
                };
                format!(
                    "{loaded}; {} writes, {} failed",
                    persist.writes, persist.write_errors
                )
            }),
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

/// A Unix time as `2026-05-01 12:34:56 UTC`.
fn absolute(t: f64) -> String {
    chrono::DateTime::from_timestamp(t as i64, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// A span of seconds as "42 s", "5 min", "3 h 20 min", "2 d 4 h".
fn span(seconds: f64) -> String {
    let s = seconds.abs().round() as u64;
    match s {
        0..=89 => format!("{s} s"),
        90..=5399 => format!("{} min", (s + 30) / 60),
        5400..=172_799 => {
            let m = (s + 30) / 60;
            if m % 60 == 0 {
                format!("{} h", m / 60)
            } else {
                format!("{} h {} min", m / 60, m % 60)
            }
        }
        _ => {
            let h = (s + 1800) / 3600;
            format!("{} d {} h", h / 24, h % 24)
        }
    }
}

/// "3 min ago" / "in 47 min" relative to `now`, with the absolute time in
/// a `<time>` element (its title on hover, its datetime for machines).
fn when(now: f64, t: Option<f64>) -> String {
    let Some(t) = t else {
        return "<span class=\"muted\">—</span>".to_owned();
    };
    let relative = if t <= now {
        format!("{} ago", span(now - t))
    } else {
        format!("in {}", span(t - now))
    };
    let iso = chrono::DateTime::from_timestamp(t as i64, 0)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default();
    format!(
        "<time datetime=\"{iso}\" title=\"{abs}\">{relative}</time>",
        abs = absolute(t)
    )
}

fn badge(class: &str, text: &str) -> String {
    format!("<span class=\"badge {class}\">{}</span>", escape(text))
}

const STYLE: &str = "\
:root{--bg:#f4f6f8;--card:#fff;--fg:#1b2230;--muted:#5d6675;--line:#e2e6eb;\
--ok:#0f6b2e;--okbg:#e3f3e8;--bad:#a8231b;--badbg:#fbe7e5;--warn:#7a5200;--warnbg:#fdf3d8}\
@media (prefers-color-scheme:dark){:root{--bg:#101318;--card:#1a1f27;--fg:#e7eaf0;--muted:#9ba4b3;\
--line:#2b323c;--ok:#7fe0a0;--okbg:#14301e;--bad:#ff9a90;--badbg:#3b1816;--warn:#ffd47e;--warnbg:#392c0f}}\
*{box-sizing:border-box}\
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif}\
main{max-width:62rem;margin:0 auto;padding:.75rem}\
a{color:inherit}\
.banner{border-radius:12px;padding:.75rem 1rem;margin-bottom:.75rem}\
.banner.ok{background:var(--okbg);color:var(--ok)}.banner.bad{background:var(--badbg);color:var(--bad)}\
.banner .state{font-size:1.6rem;font-weight:800;letter-spacing:.02em;margin-right:.5rem}\
.banner .why{font-weight:600}\
.banner .detail{display:block;font-size:.9rem;margin-top:.2rem;overflow-wrap:anywhere}\
.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(8.5rem,1fr));gap:.5rem;margin-bottom:.75rem}\
.tile{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:.55rem .8rem}\
.tile .n{display:block;font-size:1.55rem;font-weight:750;line-height:1.2}\
.tile .l{color:var(--muted);font-size:.82rem}\
.tile.alert .n{color:var(--bad)}\
section{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:.6rem .8rem;margin-bottom:.75rem}\
h2{font-size:1.05rem;margin:.15rem 0 .45rem}\
h2 .count{color:var(--muted);font-weight:500}\
.scroll{overflow-x:auto}\
table{border-collapse:collapse;width:100%}\
th,td{text-align:left;padding:.35rem .45rem;border-top:1px solid var(--line);vertical-align:top}\
thead th{border-top:0;color:var(--muted);font-size:.8rem;font-weight:600;text-transform:uppercase;letter-spacing:.03em}\
tbody th{color:var(--muted);font-weight:600;white-space:nowrap;width:1%}\
td.num{text-align:right;font-variant-numeric:tabular-nums}\
.badge{display:inline-block;padding:.05rem .5rem;border-radius:999px;font-size:.8rem;font-weight:650;white-space:nowrap}\
.badge.ok{background:var(--okbg);color:var(--ok)}.badge.bad{background:var(--badbg);color:var(--bad)}\
.badge.warn{background:var(--warnbg);color:var(--warn)}\
.muted{color:var(--muted);font-size:.85rem}\
.addr,code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.88em;overflow-wrap:anywhere}\
.err{color:var(--bad);overflow-wrap:anywhere}\
ul.offline-list{list-style:none;margin:0;padding:0;columns:15rem}\
ul.offline-list li{padding:.25rem 0 .25rem .9rem;border-top:1px solid var(--line);break-inside:avoid;position:relative}\
ul.offline-list li.offline::before{content:'';position:absolute;left:0;top:.72rem;width:.45rem;height:.45rem;border-radius:50%;background:var(--bad)}\
.none{color:var(--ok);font-weight:600}\
.stale{background:var(--warnbg);color:var(--warn);border-radius:8px;padding:.3rem .6rem;margin:.2rem 0 .5rem;font-size:.9rem}\
ol.events{list-style:none;margin:0;padding:0}\
ol.events li{padding:.35rem 0;border-top:1px solid var(--line)}\
ol.events .meta{display:block;color:var(--muted);font-size:.85rem;overflow-wrap:anywhere}\
footer{color:var(--muted);font-size:.82rem;text-align:center;padding:.5rem 0 1.5rem}\
";

/// Why the exporter is not up, in a few words, or `None` when it is.
fn down_reason(view: &StatusView) -> Option<String> {
    if view.up {
        return None;
    }
    if !view.connected {
        return Some("XMPP disconnected".to_owned());
    }
    if !view.authorized {
        return Some("not authorized with OnSIP".to_owned());
    }
    if let Some(s) = view.subscriptions.iter().find(|s| s.state != "subscribed") {
        return Some(format!("subscription {} is {}", s.node, s.state));
    }
    Some("no subscription".to_owned())
}

/// Renders the status page: a banner (up or why not), the numbers that
/// matter, the addresses offline now, the last changes, then the details of
/// the link, its subscriptions and the domains. Refreshes every 10 s.
pub fn render_html(view: &StatusView, telemetry_path: &str) -> String {
    let now = view.now;
    let mut h = String::with_capacity(16 * 1024);
    let online: u64 = view.domains.iter().map(|d| d.online).sum();
    let addresses: u64 = view.domains.iter().map(|d| d.addresses).sum();
    let devices: u64 = view.domains.iter().map(|d| d.devices).sum();
    let reason = down_reason(view);
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<meta name=\"color-scheme\" content=\"light dark\">\
<meta http-equiv=\"refresh\" content=\"10\">\
<title>{title} · onsip-ua-exporter</title><style>{STYLE}</style></head><body><main>",
        title = if view.up { "UP" } else { "DOWN" },
    );

    // Banner.
    match &reason {
        None => {
            let _ = write!(
                h,
                "<header class=\"banner ok\" id=\"overall\"><span class=\"state\">UP</span>\
<span class=\"why\">subscribed, receiving OnSIP events</span>\
<span class=\"detail\">as <span class=\"addr\">{jid}</span> · last event {last}</span></header>",
                jid = escape(view.bound_jid.as_deref().unwrap_or("")),
                last = when(now, view.last_event),
            );
        }
        Some(why) => {
            let _ = write!(
                h,
                "<header class=\"banner bad\" id=\"overall\"><span class=\"state\">DOWN</span>\
<span class=\"why\">{why}</span>",
                why = escape(why),
            );
            if let Some(err) = &view.last_error {
                let _ = write!(
                    h,
                    "<span class=\"detail\">last error {at}: {kind}: {message}</span>",
                    at = when(now, Some(err.at)),
                    kind = err.kind,
                    message = escape(&err.message),
                );
            }
            h.push_str("</header>");
        }
    }

    // Tiles.
    let offline_class = if view.offline_total > 0 {
        "tile alert"
    } else {
        "tile"
    };
    let _ = write!(
        h,
        "<div class=\"tiles\">\
<div class=\"tile\"><span class=\"n\">{online}<span class=\"muted\"> / {addresses}</span></span><span class=\"l\">addresses online</span></div>\
<div class=\"{offline_class}\"><span class=\"n\">{offline}</span><span class=\"l\">offline now</span></div>\
<div class=\"tile\"><span class=\"n\">{devices}</span><span class=\"l\">devices registered</span></div>\
<div class=\"tile\"><span class=\"n\">{domains}</span><span class=\"l\">SIP domains</span></div>\
</div>",
        offline = view.offline_total,
        domains = view.domains.len(),
    );

    // Offline now.
    let _ = write!(
        h,
        "<section id=\"offline\"><h2>Offline now <span class=\"count\">({})</span></h2>",
        view.offline_total
    );
    if !view.up {
        h.push_str(
            "<p class=\"stale\">The exporter is down: this is the last known state, not live.</p>",
        );
    }
    if view.offline_total == 0 {
        h.push_str("<p class=\"none\">Every known address has a registered device.</p>");
    } else {
        h.push_str("<ul class=\"offline-list\">");
        for address in &view.offline {
            let _ = write!(
                h,
                "<li class=\"offline\"><span class=\"addr\">{}</span></li>",
                escape(address)
            );
        }
        if view.offline_total > view.offline.len() {
            let _ = write!(
                h,
                "<li>… and {} more (see <a href=\"/api/status\">JSON</a> or {metrics})</li>",
                view.offline_total - view.offline.len(),
                metrics = escape(telemetry_path),
            );
        }
        h.push_str("</ul>");
    }
    h.push_str("</section>");

    // Recent changes.
    let _ = write!(
        h,
        "<section id=\"recent\"><h2>Recent changes{}</h2>",
        if view.recent.is_empty() {
            String::new()
        } else {
            format!(
                " <span class=\"count\">(last {}, newest first)</span>",
                view.recent.len()
            )
        }
    );
    if view.recent.is_empty() {
        h.push_str("<p class=\"muted\">No registration or retract seen yet.</p>");
    } else {
        // A list, not a table: it reads on a phone without side-scrolling.
        h.push_str("<ol class=\"events\">");
        for r in &view.recent {
            let class = match r.what {
                "registered" => "ok",
                "retracted" => "bad",
                _ => "warn",
            };
            let _ = write!(
                h,
                "<li class=\"event\">{badge} <span class=\"addr\">{address}</span>\
<span class=\"meta\">{at}{sep}{device}</span></li>",
                badge = badge(class, r.what),
                address = escape(&r.address),
                at = when(now, Some(r.at)),
                sep = if r.device.is_empty() { "" } else { " · " },
                device = escape(&r.device),
            );
        }
        h.push_str("</ol>");
    }
    h.push_str("</section>");

    // The link.
    let connected = if view.connected {
        badge("ok", "connected")
    } else {
        badge("bad", "disconnected")
    };
    let authorized = if view.authorized {
        badge("ok", "authorized")
    } else {
        badge("bad", "not authorized")
    };
    let _ = write!(
        h,
        "<section id=\"session\"><h2>Link to OnSIP</h2><div class=\"scroll\"><table><tbody>\
<tr><th>XMPP</th><td>{connected} <span class=\"addr\">{jid}</span></td></tr>\
<tr><th>Sessions</th><td>{connects} established</td></tr>\
<tr><th>Authorization</th><td>{authorized} {addresses} addresses · expires {expiry}</td></tr>\
<tr><th>State</th><td>{resync}</td></tr>{state_file}\
<tr><th>Last event</th><td>{last_event}</td></tr>",
        jid = escape(view.bound_jid.as_deref().unwrap_or("")),
        connects = view.connects,
        addresses = view.authorized_addresses,
        expiry = when(now, view.authorization_expiry.map(|e| e as f64)),
        resync = escape(&view.resync),
        state_file = view
            .state_file
            .as_ref()
            .map(|f| format!("<tr><th>State file</th><td>{}</td></tr>", escape(f)))
            .unwrap_or_default(),
        last_event = when(now, view.last_event),
    );
    if let Some(err) = &view.last_error {
        let _ = write!(
            h,
            "<tr><th>Last error</th><td class=\"err\">{kind}: {message} <span class=\"muted\">({at})</span></td></tr>",
            kind = err.kind,
            message = escape(&err.message),
            at = when(now, Some(err.at)),
        );
    }
    h.push_str("</tbody></table></div></section>");

    // Subscriptions.
    h.push_str(
        "<section id=\"subscriptions\"><h2>Subscriptions</h2><div class=\"scroll\"><table>\
<thead><tr><th>Node</th><th>State</th><th>Expires</th></tr></thead><tbody>",
    );
    for s in &view.subscriptions {
        let class = match s.state {
            "subscribed" => "ok",
            "pending" => "warn",
            _ => "bad",
        };
        let _ = write!(
            h,
            "<tr><td><code>{node}</code></td><td>{state}</td><td>{expiry}</td></tr>",
            node = escape(&s.node),
            state = badge(class, s.state),
            expiry = when(now, s.expiry.map(|e| e as f64)),
        );
    }
    h.push_str("</tbody></table></div></section>");

    // Domains.
    h.push_str(
        "<section id=\"domains\"><h2>Domains</h2><div class=\"scroll\"><table>\
<thead><tr><th>Domain</th><th>Online</th><th>Addresses</th><th>Devices</th></tr></thead><tbody>",
    );
    for d in &view.domains {
        let _ = write!(
            h,
            "<tr><td class=\"addr\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            escape(&d.domain),
            d.online,
            d.addresses,
            d.devices
        );
    }
    if view.domains.is_empty() {
        h.push_str("<tr><td colspan=\"4\" class=\"muted\">No SIP address known yet.</td></tr>");
    }
    h.push_str("</tbody></table></div></section>");

    let _ = writeln!(
        h,
        "<footer>onsip-ua-exporter {version} · <a href=\"{metrics}\">metrics</a> · \
<a href=\"/api/status\">JSON</a> · page of {generated}, refreshes every 10 s</footer></main></body></html>",
        version = escape(view.version),
        metrics = escape(telemetry_path),
        generated = absolute(now),
    );
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
        let view = StatusView::from_state(&state, "0.1.0", 100.0);
        assert_eq!(view.offline, vec!["front<desk>@d.com".to_owned()]);
        let html = render_html(&view, "/metrics");
        assert!(!html.contains("<script>"));
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(html.contains(
            "<li class=\"offline\"><span class=\"addr\">front&lt;desk&gt;@d.com</span></li>"
        ));
        // Not subscribed yet: the banner says down and why.
        assert!(html.contains(
            "<span class=\"state\">DOWN</span><span class=\"why\">XMPP disconnected</span>"
        ));
        assert!(html.contains("<title>DOWN · onsip-ua-exporter</title>"));
    }

    #[test]
    fn times_are_relative_to_the_view() {
        assert_eq!(span(0.0), "0 s");
        assert_eq!(span(89.0), "89 s");
        assert_eq!(span(90.0), "2 min");
        assert_eq!(span(47.0 * 60.0), "47 min");
        assert_eq!(span(3.0 * 3600.0 + 20.0 * 60.0), "3 h 20 min");
        assert_eq!(span(2.0 * 3600.0), "2 h");
        assert_eq!(span(50.0 * 3600.0), "2 d 2 h");
        assert_eq!(
            when(1000.0, Some(880.0)),
            "<time datetime=\"1970-01-01T00:14:40Z\" title=\"1970-01-01 00:14:40 UTC\">2 min ago</time>"
        );
        assert!(when(1000.0, Some(1000.0 + 47.0 * 60.0)).contains(">in 47 min</time>"));
        assert_eq!(when(1000.0, None), "<span class=\"muted\">—</span>");
    }
}
