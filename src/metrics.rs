//! `/metrics`: every metric of the contract, encoded at scrape time from a
//! copy of the shared state.
//!
//! The state is read once per scrape, so there are no stale series to remove
//! and no second copy of any figure to keep in step. The lock is held only
//! while copying (`Fleet::snapshot`), never while encoding. Names and labels
//! are an interface (dashboards, alerts): see
//! `shared/reference/metrics-contract.md` and the README.
//!
//! # Why the exposition is written by hand
//!
//! The largest accounts watch 100,000 SIP addresses: seven per-address
//! families make 700,000 samples a scrape. Through prometheus-client's
//! `DescriptorEncoder` each sample cost ~0.4 µs (label sets behind trait
//! objects, every label and value pushed through `fmt::Write` into a staging
//! buffer), ~290 ms a scrape. Here each line is appended to one pre-sized
//! `String`: the escaped label block of an address (`{domain="…",user="…"}`)
//! is built once and copied into its seven lines, and integers are formatted
//! two digits at a time. The few format rules live in [`Out`] for both
//! formats; the tests check the output line for line against
//! prometheus-client's encoding of the same state, and with a parser.
//! prometheus-client still encodes the `process_*` metrics (`process`).

use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus_client::registry::Registry;

use crate::process;
use crate::state::{AddressRow, DomainRow, FleetSnapshot, Shared, SnapshotCursor};

/// Addresses copied per lock hold (~1 ms).
const ROWS_PER_LOCK: usize = 8192;
use crate::status::{ErrorKind, EventKind, NodeState, Resync, SessionStatus};

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

/// What `/metrics` reads, built once at start.
pub struct Metrics {
    state: Shared,
    per_address: bool,
    build: BuildInfo,
    /// Only the `process_*` collector (prometheus-client encodes it).
    process: Registry,
    /// Length of the last response, so the next one is allocated once.
    last_len: AtomicUsize,
}

impl Metrics {
    pub fn new(state: Shared, per_address: bool, build: BuildInfo) -> Self {
        let mut process = Registry::default();
        process.register_collector(Box::new(process::ProcessCollector));
        Self {
            state,
            per_address,
            build,
            process,
            last_len: AtomicUsize::new(0),
        }
    }

    /// Encodes every metric in `format`.
    pub fn encode(&self, format: Format) -> Result<String, std::fmt::Error> {
        // The copy is taken in parts, the lock released in between, so a
        // scrape of a large fleet stalls event ingestion ~1 ms at a time.
        let mut fleet = FleetSnapshot::default();
        let mut cursor = SnapshotCursor::default();
        let session = loop {
            // A poisoned lock means a panic elsewhere; the data is still the
            // best we have, so export it rather than fail every scrape.
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if state
                .fleet
                .snapshot_part(self.per_address, &mut cursor, ROWS_PER_LOCK, &mut fleet)
            {
                break state.session.clone();
            }
            drop(state);
            std::thread::yield_now();
        };
        // Room for this scrape in one allocation: a large fleet's response
        // is tens of MB, and growing by doubling would copy it ~25 times
        // and briefly hold twice its size.
        let hint = self.last_len.load(Ordering::Relaxed);
        let mut out = Vec::with_capacity(hint + hint / 32 + 16 * 1024);
        encode_snapshot(&mut out, format, &session, &fleet, &self.build);
        drop(fleet);
        let mut process = String::new();
        match format {
            Format::Text => {
                prometheus_client::encoding::prometheus_text::encode(&mut process, &self.process)?
            }
            Format::OpenMetrics => {
                prometheus_client::encoding::text::encode_registry(&mut process, &self.process)?;
                prometheus_client::encoding::text::encode_eof(&mut process)?;
            }
        }
        out.extend_from_slice(process.as_bytes());
        self.last_len.store(out.len(), Ordering::Relaxed);
        // Everything written was a `&str`'s bytes or ASCII digits; checking
        // once here (~10 ms per 64 MB) is cheaper than `str` conversions
        // per number, and keeps the crate free of `unsafe`.
        String::from_utf8(out).map_err(|_| std::fmt::Error)
    }
}

/// Appends the session and fleet families of one scrape to `out` (every
/// metric but `process_*`, and without OpenMetrics' `# EOF`). Public for the
/// benchmarks, which time encoding apart from copying the state.
pub fn encode_snapshot(
    out: &mut Vec<u8>,
    format: Format,
    session: &SessionStatus,
    fleet: &FleetSnapshot,
    build: &BuildInfo,
) {
    let mut out = Out {
        buf: out,
        open_metrics: format == Format::OpenMetrics,
    };
    encode_session(&mut out, session, build);
    encode_fleet(&mut out, fleet);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Gauge,
    Counter,
}

/// A sample value. Whole numbers are written without a fraction ("1", not
/// "1.0"), as Go exporters print them.
#[derive(Clone, Copy, Debug)]
enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
}

/// The output and the rules of the chosen format.
///
/// Text 0.0.4 and OpenMetrics differ in three places only: a counter's
/// `# HELP`/`# TYPE` name carries `_total` in text but not in OpenMetrics
/// (samples carry it in both); OpenMetrics escapes `"` in `# HELP` as well as
/// `\` and newline; OpenMetrics ends with `# EOF` (written by the caller).
struct Out<'a> {
    buf: &'a mut Vec<u8>,
    open_metrics: bool,
}

impl Out<'_> {
    /// Writes `# HELP` and `# TYPE`; returns the samples' name.
    fn family(&mut self, name: &str, help: &str, kind: Kind) -> String {
        let sample = match kind {
            Kind::Counter => format!("{name}_total"),
            Kind::Gauge => name.to_owned(),
        };
        let described = if self.open_metrics { name } else { &sample };
        self.buf.put_str("# HELP ");
        self.buf.put_str(described);
        self.buf.put(' ');
        push_help(self.buf, help, self.open_metrics);
        self.buf.put_str("\n# TYPE ");
        self.buf.put_str(described);
        self.buf.put_str(match kind {
            Kind::Counter => " counter\n",
            Kind::Gauge => " gauge\n",
        });
        sample
    }

    /// One sample line.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: Value) {
        self.buf.put_str(name);
        if let Some(((first_name, first_value), rest)) = labels.split_first() {
            self.buf.put('{');
            push_label(self.buf, first_name, first_value);
            for (label, value) in rest {
                self.buf.put(',');
                push_label(self.buf, label, value);
            }
            self.buf.put('}');
        }
        self.buf.put(' ');
        push_value(self.buf, value);
        self.buf.put('\n');
    }

    /// A family of one sample without labels.
    fn scalar(&mut self, name: &str, help: &str, kind: Kind, value: Value) {
        let sample = self.family(name, help, kind);
        self.sample(&sample, &[], value);
    }
}

/// `String`-like appending to the byte buffer the response is built in.
trait Text {
    fn put_str(&mut self, s: &str);
    fn put(&mut self, c: char);
}

impl Text for Vec<u8> {
    #[inline]
    fn put_str(&mut self, s: &str) {
        self.extend_from_slice(s.as_bytes());
    }

    #[inline]
    fn put(&mut self, c: char) {
        let mut utf8 = [0; 4];
        self.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
    }
}

fn push_label(buf: &mut Vec<u8>, name: &str, value: &str) {
    buf.put_str(name);
    buf.put_str("=\"");
    push_escaped(buf, value);
    buf.put('"');
}

/// A label value with `\`, `"` and newline escaped (both formats).
fn push_escaped(buf: &mut Vec<u8>, value: &str) {
    // No early exit: the whole check vectorizes, and values are short.
    let special = value
        .bytes()
        .fold(false, |found, b| found | matches!(b, b'\\' | b'"' | b'\n'));
    if !special {
        buf.put_str(value);
        return;
    }
    for c in value.chars() {
        match c {
            '\\' => buf.put_str("\\\\"),
            '"' => buf.put_str("\\\""),
            '\n' => buf.put_str("\\n"),
            c => buf.put(c),
        }
    }
}

/// `# HELP` text: `\` and newline escaped; `"` too in OpenMetrics, whose
/// grammar has no bare `"` there (text 0.0.4 would read `\"` literally).
fn push_help(buf: &mut Vec<u8>, help: &str, open_metrics: bool) {
    for c in help.chars() {
        match c {
            '\\' => buf.put_str("\\\\"),
            '\n' => buf.put_str("\\n"),
            '"' if open_metrics => buf.put_str("\\\""),
            c => buf.put(c),
        }
    }
}

fn push_value(buf: &mut Vec<u8>, value: Value) {
    match value {
        Value::U64(v) => push_u64(buf, v),
        Value::I64(v) => {
            if v < 0 {
                buf.put('-');
            }
            push_u64(buf, v.unsigned_abs());
        }
        Value::F64(v) => push_f64(buf, v),
    }
}

/// Two-digit pairs "00" to "99", for writing integers two digits a step.
const PAIRS: &[u8; 200] = b"\
0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

/// Decimal digits of `v`, like `itoa`: a fixed buffer filled from the end
/// two digits at a time, no formatter machinery.
fn push_u64(buf: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    while v >= 100 {
        let pair = (v % 100) as usize * 2;
        v /= 100;
        at -= 2;
        digits[at] = PAIRS[pair];
        digits[at + 1] = PAIRS[pair + 1];
    }
    if v >= 10 {
        let pair = v as usize * 2;
        at -= 2;
        digits[at] = PAIRS[pair];
        digits[at + 1] = PAIRS[pair + 1];
    } else {
        at -= 1;
        digits[at] = b'0' + v as u8;
    }
    buf.extend_from_slice(&digits[at..]);
}

/// Whole values below 2^53 as integers; the rest as the shortest decimal
/// that reads back to the same `f64`, with Prometheus' spellings of the
/// non-finite values.
fn push_f64(buf: &mut Vec<u8>, v: f64) {
    use std::io::Write as _;
    if v.fract() == 0.0 && v.abs() < 9e15 {
        push_value(buf, Value::I64(v as i64));
    } else if (FIXED_FROM..9e15).contains(&v.abs()) {
        push_fixed(buf, v);
    } else if v.is_nan() {
        buf.put_str("NaN");
    } else if v.is_infinite() {
        buf.put_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.abs() >= 1e16 || v.abs() < 1e-4 {
        // Exponent form rather than hundreds of zeros.
        let _ = write!(buf, "{v:e}");
    } else {
        let _ = write!(buf, "{v}");
    }
}

/// From here up, [`push_fixed`] applies: the gap between neighbouring
/// `f64` is at least 2^-28 s (3.7 ns), so nine decimals always suffice.
const FIXED_FROM: f64 = 16_777_216.0;

/// A fractional `v` with `2^24 <= |v| < 2^53` (every Unix timestamp) as
/// the fewest decimals that read back to `v`, without the formatter's
/// general shortest-float search (~900 instructions; this is ~100): for
/// k = 1..9 decimals, the nearest k-decimal number is kept once it lies
/// within half the gap to `v`'s neighbours (less a hair for the rounding of
/// `fraction * 1e9`), so a parser rounds it back to `v`. The digits are
/// `Display`'s but within that hair of a midpoint, where one more decimal
/// is written; the value read back is always exact.
fn push_fixed(buf: &mut Vec<u8>, v: f64) {
    let magnitude = v.abs();
    let whole = magnitude.trunc();
    // Exact: both lie in the same binade or the fraction is smaller.
    let nanos = (magnitude - whole) * 1e9;
    let gap = f64::from_bits(magnitude.to_bits() + 1) - magnitude;
    // `nanos` is off by at most half its own gap (< 1e-7 ns): a 1e-6 ns
    // margin keeps a candidate off the exact midpoint, which a parser could
    // round either way.
    let tolerance = gap * 0.5e9 - 1e-6;
    let mut whole = whole as u64;
    let (mut decimals, mut digits) = (9u32, nanos.round() as u64);
    let mut scale = 100_000_000.0;
    for k in 1..=9u32 {
        let candidate = (nanos / scale).round();
        if (candidate * scale - nanos).abs() < tolerance {
            decimals = k;
            digits = candidate as u64;
            break;
        }
        scale /= 10.0;
    }
    if digits >= 10u64.pow(decimals) {
        // Rounded up to the next whole number.
        whole += 1;
        digits = 0;
    }
    if v < 0.0 {
        buf.push(b'-');
    }
    push_u64(buf, whole);
    if digits > 0 {
        buf.push(b'.');
        let mut text = [b'0'; 9];
        let mut rest = digits;
        for at in (0..decimals as usize).rev() {
            text[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        buf.extend_from_slice(&text[..decimals as usize]);
    }
}

fn flag(b: bool) -> Value {
    Value::U64(u64::from(b))
}

fn encode_session(out: &mut Out, session: &SessionStatus, build: &BuildInfo) {
    use Kind::{Counter, Gauge};
    out.scalar(
        "onsip_up",
        "1 when connected, authorized, and every configured subscription is subscribed.",
        Gauge,
        flag(session.up()),
    );
    out.scalar(
        "onsip_xmpp_connected",
        "1 while the XMPP session is online.",
        Gauge,
        flag(session.connected),
    );
    out.scalar(
        "onsip_xmpp_connects",
        "XMPP sessions established.",
        Counter,
        Value::U64(session.connects),
    );
    let name = out.family("onsip_xmpp_errors", "Failures by kind.", Counter);
    for kind in ErrorKind::ALL {
        out.sample(
            &name,
            &[("kind", kind.as_str())],
            Value::U64(session.errors(kind)),
        );
    }
    if let Some(expiry) = session.authorization_expiry {
        out.scalar(
            "onsip_authorization_expiry_timestamp_seconds",
            "When the OnSIP authorization expires.",
            Gauge,
            Value::I64(expiry),
        );
    }
    out.scalar(
        "onsip_authorized_addresses",
        "SIP addresses the authorization covers.",
        Gauge,
        Value::U64(session.authorized_addresses as u64),
    );
    let name = out.family(
        "onsip_subscription_state",
        "1 for the current state of each configured node, 0 for the others.",
        Gauge,
    );
    for node in &session.nodes {
        for state in NodeState::ALL {
            out.sample(
                &name,
                &[("node", node.node.as_str()), ("state", state.as_str())],
                flag(node.state == state),
            );
        }
    }
    let name = out.family(
        "onsip_subscription_expiry_timestamp_seconds",
        "When the subscription expires.",
        Gauge,
    );
    for node in &session.nodes {
        if let Some(expiry) = node.expiry {
            out.sample(&name, &[("node", node.node.as_str())], Value::I64(expiry));
        }
    }
    let name = out.family(
        "onsip_pubsub_events",
        "Pubsub events received by kind.",
        Counter,
    );
    for kind in EventKind::ALL {
        out.sample(
            &name,
            &[("kind", kind.as_str())],
            Value::U64(session.events(kind)),
        );
    }
    if let Some(at) = session.last_event {
        out.scalar(
            "onsip_last_event_timestamp_seconds",
            "When the last pubsub event arrived.",
            Gauge,
            Value::F64(at),
        );
    }
    out.scalar(
        "onsip_state_resync_from_items",
        "1 when the state was last loaded by items retrieval, 0 when it is rebuilt from live events.",
        Gauge,
        flag(matches!(session.resync, Resync::Items { .. })),
    );
    let name = out.family(
        "onsip_exporter_build_info",
        "Always 1; the labels say which build runs.",
        Gauge,
    );
    out.sample(
        &name,
        &[("version", build.version), ("revision", build.revision)],
        Value::U64(1),
    );
}

/// Every address's escaped `{domain="…",user="…"}`, built once a scrape and
/// copied into each of its seven lines: escaping, and the pointer chase to
/// two `Arc<str>` per row, happen once instead of seven times.
struct LabelBlocks {
    text: Vec<u8>,
    /// End of row `i`'s block in `text`; it starts where row `i - 1`'s ends.
    ends: Vec<usize>,
}

impl LabelBlocks {
    fn new(rows: &[AddressRow]) -> Self {
        let mut text = Vec::with_capacity(rows.len() * 48);
        let mut ends = Vec::with_capacity(rows.len());
        for row in rows {
            text.put_str("{domain=\"");
            push_escaped(&mut text, &row.domain);
            text.put_str("\",user=\"");
            push_escaped(&mut text, &row.user);
            text.put_str("\"}");
            ends.push(text.len());
        }
        Self { text, ends }
    }
}

/// One per-address family: a header, then a line per row with a value.
fn per_address(
    out: &mut Out,
    rows: &[AddressRow],
    labels: &LabelBlocks,
    (name, help, kind): (&str, &str, Kind),
    value: impl Fn(&AddressRow) -> Option<Value>,
) {
    let name = out.family(name, help, kind);
    let mut start = 0;
    for (row, &end) in rows.iter().zip(&labels.ends) {
        if let (Some(value), Some(block)) = (value(row), labels.text.get(start..end)) {
            out.buf.put_str(&name);
            out.buf.extend_from_slice(block);
            out.buf.put(' ');
            push_value(out.buf, value);
            out.buf.put('\n');
        }
        start = end;
    }
}

/// One per-domain gauge.
fn per_domain(
    out: &mut Out,
    domains: &[DomainRow],
    name: &str,
    help: &str,
    value: impl Fn(&DomainRow) -> u64,
) {
    let name = out.family(name, help, Kind::Gauge);
    for row in domains {
        out.sample(&name, &[("domain", &row.domain)], Value::U64(value(row)));
    }
}

fn encode_fleet(out: &mut Out, fleet: &FleetSnapshot) {
    use Kind::{Counter, Gauge};
    let rows = &fleet.addresses;
    if !rows.is_empty() {
        let labels = LabelBlocks::new(rows);
        per_address(
            out,
            rows,
            &labels,
            (
                "onsip_user_agent_devices",
                "Devices (user agents) registered for the address now.",
                Gauge,
            ),
            |r| Some(Value::U64(r.devices)),
        );
        per_address(
            out,
            rows,
            &labels,
            (
                "onsip_user_agent_registrations",
                "Items published with an id not currently held (a device came online).",
                Counter,
            ),
            |r| Some(Value::U64(r.registrations)),
        );
        per_address(
            out,
            rows,
            &labels,
            (
                "onsip_user_agent_refreshes",
                "Items re-published with an id already held (a re-registration).",
                Counter,
            ),
            |r| Some(Value::U64(r.refreshes)),
        );
        per_address(
            out,
            rows,
            &labels,
            (
                "onsip_user_agent_retracts",
                "Retract events (a device went offline).",
                Counter,
            ),
            |r| Some(Value::U64(r.retracts)),
        );
        per_address(
            out,
            rows,
            &labels,
            (
                "onsip_user_agent_expirations",
                "Devices dropped because their registration expired (plus grace) with no retract.",
                Counter,
            ),
            |r| Some(Value::U64(r.expirations)),
        );
        per_address(
            out,
            rows,
            &labels,
            (
                "onsip_user_agent_registration_expiry_timestamp_seconds",
                "Latest registration expiry among the address's devices.",
                Gauge,
            ),
            |r| r.latest_expiry.map(Value::I64),
        );
        per_address(
            out,
            rows,
            &labels,
            (
                "onsip_user_agent_last_change_timestamp_seconds",
                "When the address's device set last changed.",
                Gauge,
            ),
            |r| r.last_change.map(Value::F64),
        );
    }
    let domains = &fleet.domains;
    per_domain(
        out,
        domains,
        "onsip_domain_addresses",
        "SIP addresses known in the domain.",
        |d| d.addresses,
    );
    per_domain(
        out,
        domains,
        "onsip_domain_addresses_online",
        "Addresses with at least one device.",
        |d| d.online,
    );
    per_domain(
        out,
        domains,
        "onsip_domain_devices",
        "Devices registered in the domain.",
        |d| d.devices,
    );
    let name = out.family(
        "onsip_domain_devices_by_user_agent",
        "Devices per User-Agent string; past the configured number per domain the rest count under device=\"other\".",
        Gauge,
    );
    for row in domains {
        for (device, count) in &row.by_user_agent {
            out.sample(
                &name,
                &[("domain", &row.domain), ("device", device)],
                Value::U64(*count),
            );
        }
    }
    let name = out.family(
        "onsip_refused_events",
        "Publish events refused because a limit (max addresses, max devices per address) was reached.",
        Counter,
    );
    for (limit, value) in [
        ("addresses", fleet.refused_addresses),
        ("devices", fleet.refused_devices),
    ] {
        out.sample(&name, &[("limit", limit)], Value::U64(value));
    }
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

    /// Awkward on purpose: label values with `\`, `"` and newlines, a
    /// counted refusal, fractional and whole timestamps, addresses with and
    /// without devices, more user agents than the per-domain bound.
    fn awkward_state() -> State {
        let limits = Limits {
            max_user_agents_per_domain: 5,
            max_devices_per_address: 3,
            ..Limits::default()
        };
        let mut state = State::new(
            limits,
            &["/me/foo@example.com".to_owned(), "/x\"y\\z\nw".to_owned()],
        );
        state.fleet.set_watched(&[
            SipAddress::new("bob", "example.com"),
            SipAddress::new("we\"ird\\us\ner", "d\"om"),
        ]);
        let mut events = Vec::new();
        for i in 0..300i64 {
            let address = SipAddress::new(&format!("u{}", i % 50), &format!("d{}.example", i % 5));
            events.push(PubsubEvent::Publish {
                address: address.clone(),
                item_id: Arc::from(format!("{i}")),
                registration: Registration {
                    contact: "sip:foo@192.0.2.1".into(),
                    received: "sip:192.0.2.1:5060".into(),
                    device: format!("Yealink \"T54W\" {}\\x\ny", i % 9),
                    expires: if i % 5 == 0 {
                        None
                    } else {
                        Some(1_700_000_000 + i)
                    },
                },
            });
            if i % 3 == 0 {
                events.push(PubsubEvent::Retract {
                    address,
                    item_id: Arc::from(format!("{i}")),
                });
            }
        }
        state.apply_events(&events, 1_699_999_000.25);
        state.apply_events(&events[..10], 1_699_999_100.0);
        state
            .session
            .record_error(ErrorKind::Auth, "no".into(), 1.0);
        state.session.authorization_expiry = Some(1_700_003_600);
        state.session.nodes[0].expiry = Some(1_700_007_200);
        state.session.resync = Resync::Items {
            at: 5.0,
            devices: 3,
        };
        state
    }

    fn ours(state: &State, format: Format) -> String {
        let mut out = Vec::new();
        encode_snapshot(
            &mut out,
            format,
            &state.session,
            &state.fleet.snapshot(true),
            &build(),
        );
        if format == Format::OpenMetrics {
            out.extend_from_slice(b"# EOF\n");
        }
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn same_lines_as_prometheus_client() {
        let state = awkward_state();
        let text = ours(&state, Format::Text);
        assert!(text.contains("onsip_refused_events_total{limit=\"devices\"} "));
        assert!(!text.contains("onsip_refused_events_total{limit=\"devices\"} 0"));
        assert_eq!(text, reference::encode(&state, Format::Text));
        // prometheus-client writes OpenMetrics HELP text unescaped; the
        // grammar wants `"` escaped there, so the one HELP with quotes differs.
        let expected = reference::encode(&state, Format::OpenMetrics)
            .replace("under device=\"other\"", "under device=\\\"other\\\"");
        assert_eq!(ours(&state, Format::OpenMetrics), expected);
    }

    #[test]
    fn label_values_are_escaped() {
        let text = ours(&awkward_state(), Format::Text);
        for line in [
            "onsip_user_agent_devices{domain=\"d\\\"om\",user=\"we\\\"ird\\\\us\\ner\"} 0",
            "onsip_subscription_state{node=\"/x\\\"y\\\\z\\nw\",state=\"pending\"} 0",
            "onsip_user_agent_last_change_timestamp_seconds{domain=\"d1.example\",user=\"u1\"} 1699999000.25",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?}");
        }
    }

    #[test]
    fn numbers_read_back_exactly() {
        let show = |v: Value| {
            let mut s = Vec::new();
            push_value(&mut s, v);
            String::from_utf8(s).expect("utf-8")
        };
        for v in [
            0,
            7,
            9,
            10,
            42,
            99,
            100,
            101,
            999,
            1000,
            1_700_000_000,
            u64::MAX,
        ] {
            assert_eq!(show(Value::U64(v)), v.to_string());
        }
        for v in [i64::MIN, -1_700_000_000, -10, -1, 0, 1, i64::MAX] {
            assert_eq!(show(Value::I64(v)), v.to_string());
        }
        for (v, text) in [
            (1.0, "1"),
            (-3.0, "-3"),
            (0.5, "0.5"),
            (1_699_999_000.25, "1699999000.25"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "+Inf"),
            (f64::NEG_INFINITY, "-Inf"),
            (1e300, "1e300"),
            (2.5e-7, "2.5e-7"),
        ] {
            assert_eq!(show(Value::F64(v)), text);
        }
        for v in [0.1, 1_712_345_678.123_456_7, 123.456e10, 9.5e15, 1e17] {
            let text = show(Value::F64(v));
            assert_eq!(text.parse::<f64>().ok(), Some(v), "{text}");
        }
        // The fast path for timestamps: exact, and the shortest digits (as
        // `Display` writes them) all but at the margin.
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut longer = 0;
        for i in 0..200_000 {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let unit = (seed >> 11) as f64 / (1u64 << 53) as f64;
            let v = match i % 4 {
                0 => 1.6e9 + unit * 4e8,
                1 => -(1.6e9 + unit * 4e8),
                2 => FIXED_FROM * (1.0 + unit * 1e6),
                _ => (1.7e9 + (unit * 1e9).round() / 1e3).max(FIXED_FROM),
            };
            let text = show(Value::F64(v));
            assert_eq!(text.parse::<f64>().ok(), Some(v), "{text} for {v:?}");
            if text != format!("{v}") {
                assert!(text.len() > format!("{v}").len(), "{text} vs {v}");
                longer += 1;
            }
        }
        assert!(longer < 200, "{longer} longer than needed");
    }

    #[test]
    fn the_buffer_is_sized_from_the_last_scrape() {
        let metrics = Metrics::new(state_with_one_phone(), true, build());
        let first = metrics.encode(Format::Text).expect("encodes");
        let second = metrics.encode(Format::Text).expect("encodes");
        assert!(second.capacity() >= first.len());
        assert!(second.capacity() < 2 * first.len() + 32 * 1024);
    }

    /// `promtool check metrics` (Prometheus' own text parser and linter)
    /// accepts the whole response. scripts/test.sh installs promtool.
    #[test]
    fn promtool_accepts_the_text() {
        use std::io::Write as _;
        let metrics = Metrics::new(Arc::new(Mutex::new(awkward_state())), true, build());
        let text = metrics.encode(Format::Text).expect("encodes");
        let promtool = std::env::var("PROMTOOL_BIN").unwrap_or_else(|_| "promtool".into());
        let mut child = std::process::Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {promtool} (scripts/test.sh --setup installs it): {e}")
            });
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write to promtool");
        let output = child.wait_with_output().expect("promtool ran");
        assert!(
            output.status.success(),
            "promtool check metrics failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The encoding this module replaced (prometheus-client's
    /// `DescriptorEncoder`, as of 0.1.0), kept to prove every name, label,
    /// type and value unchanged.
    mod reference {
        use super::build;
        use crate::metrics::BuildInfo;
        use crate::metrics::Format;
        use crate::state::{FleetSnapshot, State};
        use crate::status::{ErrorKind, EventKind, NodeState, SessionStatus};
        use prometheus_client::collector::Collector;
        use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
        use prometheus_client::metrics::MetricType;
        use prometheus_client::registry::Registry;

        #[derive(Debug)]
        struct Reference {
            session: SessionStatus,
            fleet: FleetSnapshot,
            build: BuildInfo,
        }

        impl Collector for Reference {
            fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
                encode_session(&mut encoder, &self.session, &self.build)?;
                encode_fleet(&mut encoder, &self.fleet)
            }
        }

        pub fn encode(state: &State, format: Format) -> String {
            let mut registry = Registry::default();
            registry.register_collector(Box::new(Reference {
                session: state.session.clone(),
                fleet: state.fleet.snapshot(true),
                build: build(),
            }));
            let mut out = String::new();
            match format {
                Format::Text => {
                    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
                }
                Format::OpenMetrics => {
                    prometheus_client::encoding::text::encode(&mut out, &registry)
                }
            }
            .expect("encodes");
            out
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
                (MetricType::Counter, false) => {
                    metric.encode_counter::<NoLabelSet, _, u64>(&value, None)
                }
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
                let mut metric = encoder.encode_descriptor(
                    "onsip_xmpp_errors",
                    "Failures by kind.",
                    None,
                    Counter,
                )?;
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
                            .encode_family(&[
                                ("node", node.node.as_str()),
                                ("state", state.as_str()),
                            ])?
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
    }
}
