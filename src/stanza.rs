//! The OnSIP wire protocol as pure functions: build the requests the exporter
//! sends (authorize, subscribe, list, renew, unsubscribe, items retrieval) and
//! parse what OnSIP sends back into typed values.
//!
//! No I/O and no clock here: everything takes and returns plain values, so the
//! seed document's stanzas can be unit-tested verbatim.
//!
//! Parsing is written by hand over `minidom::Element` instead of
//! `xmpp_parsers::pubsub::PubSubEvent` because the latter rejects a whole
//! message for one bad item (and for `expiry='presence'`), while we must count
//! and skip only the bad payload and still apply the rest of the message; and
//! because xmpp-parsers has no XEP-0050 module and hides `subid` and
//! `subscription='pending'` in subscribe replies.

use std::fmt;
use std::sync::Arc;

use minidom::Element;

/// XML namespaces of the protocols we speak.
pub mod ns {
    pub const PUBSUB: &str = "http://jabber.org/protocol/pubsub";
    pub const PUBSUB_EVENT: &str = "http://jabber.org/protocol/pubsub#event";
    pub const COMMANDS: &str = "http://jabber.org/protocol/commands";
    pub const DATA_FORMS: &str = "jabber:x:data";
    pub const USER_AGENTS: &str = "onsip:user-agents";
    pub const STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
    pub const PING: &str = "urn:xmpp:ping";
}

/// The ad-hoc command node OnSIP uses for password authorization.
pub const AUTHORIZE_NODE: &str = "authorize-plain";

/// Builds an attribute name that is checked at compile time.
macro_rules! name {
    ($s:literal) => {
        minidom::rxml::xml_ncname!($s).to_owned()
    };
}

/// A SIP address `user@domain`. The domain is shared between the addresses
/// of a domain (`Arc`) because large fleets have few domains and many users.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SipAddress {
    pub domain: Arc<str>,
    pub user: Arc<str>,
}

impl SipAddress {
    pub fn new(user: &str, domain: &str) -> Self {
        Self {
            domain: Arc::from(domain.to_ascii_lowercase()),
            user: Arc::from(user),
        }
    }

    /// Parses `user@domain` (an optional `sip:` scheme is accepted).
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let text = text.trim();
        let text = text.strip_prefix("sip:").unwrap_or(text);
        match text.split_once('@') {
            Some((user, domain)) if valid_part(user) && valid_part(domain) => {
                Ok(Self::new(user, domain))
            }
            _ => Err(ParseError::BadAddress(text.to_owned())),
        }
    }

    /// Parses a leaf node name `/<domain>/<user>`.
    pub fn from_leaf_node(node: &str) -> Result<Self, ParseError> {
        let mut parts = node.strip_prefix('/').unwrap_or("").split('/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(domain), Some(user), None)
                if valid_part(domain) && valid_part(user) && domain != "me" =>
            {
                Ok(Self::new(user, domain))
            }
            _ => Err(ParseError::BadNode(node.to_owned())),
        }
    }

    /// The leaf node that carries this address's events.
    pub fn leaf_node(&self) -> String {
        format!("/{}/{}", self.domain, self.user)
    }
}

fn valid_part(part: &str) -> bool {
    !part.is_empty()
        && part.len() <= 256
        && !part
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '/' || c == '@')
}

impl fmt::Display for SipAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.user, self.domain)
    }
}

/// One registration of a device (user agent) as OnSIP publishes it.
#[derive(Clone, Debug, PartialEq)]
pub struct Registration {
    /// The SIP Contact URI (kept for the status page, never a label).
    pub contact: String,
    /// The source address the registration came from.
    pub received: String,
    /// The SIP User-Agent string.
    pub device: String,
    /// When the registration expires, Unix seconds; `None` when absent,
    /// empty or unreadable (the device is then kept until retracted).
    pub expires: Option<i64>,
}

/// Why a payload could not be understood.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("node {0:?} is not a /<domain>/<user> leaf")]
    BadNode(String),
    #[error("{0:?} is not a SIP address user@domain")]
    BadAddress(String),
    #[error("<{element}> has no {attribute} attribute")]
    MissingAttribute {
        element: &'static str,
        attribute: &'static str,
    },
    #[error("item {0:?} has no onsip:user-agents payload")]
    MissingUserAgent(String),
    #[error("unknown subscription state {0:?}")]
    BadSubscriptionState(String),
    #[error("unexpected reply: {0}")]
    UnexpectedReply(String),
}

/// The states XEP-0060 gives a subscription.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SubscriptionState {
    Pending,
    Subscribed,
    None,
    Unconfigured,
}

impl SubscriptionState {
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        match text {
            "pending" => Ok(Self::Pending),
            "subscribed" => Ok(Self::Subscribed),
            "none" => Ok(Self::None),
            "unconfigured" => Ok(Self::Unconfigured),
            other => Err(ParseError::BadSubscriptionState(other.to_owned())),
        }
    }
}

/// A subscription as the service reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct SubscriptionInfo {
    pub node: Option<String>,
    pub jid: Option<String>,
    pub subid: Option<String>,
    pub state: SubscriptionState,
}

/// One thing a pubsub `<event>` told us.
#[derive(Clone, Debug, PartialEq)]
pub enum PubsubEvent {
    /// A device registered or re-registered.
    Publish {
        address: SipAddress,
        item_id: Arc<str>,
        registration: Registration,
    },
    /// A device went offline.
    Retract {
        address: SipAddress,
        item_id: Arc<str>,
    },
    /// The state of one of our subscriptions changed.
    Subscription(SubscriptionInfo),
    /// A part we understood but have no use for (another namespace,
    /// a purge or delete notification...).
    Ignored,
    /// A part we could not understand; the rest of the event still applies.
    Malformed(ParseError),
}

/// Parses the `<event xmlns='http://jabber.org/protocol/pubsub#event'>` payload
/// of a message into `out` (appending, so a caller can reuse one buffer).
/// Each item and retract is judged on its own: one bad item never hides the
/// others.
pub fn parse_event(event: &Element, out: &mut Vec<PubsubEvent>) {
    for child in event.children() {
        if !child.has_ns(ns::PUBSUB_EVENT) {
            out.push(PubsubEvent::Ignored);
            continue;
        }
        match child.name() {
            "items" => parse_items(child, out),
            "subscription" => out.push(match parse_subscription(child) {
                Ok(info) => PubsubEvent::Subscription(info),
                Err(err) => PubsubEvent::Malformed(err),
            }),
            _ => out.push(PubsubEvent::Ignored),
        }
    }
}

fn parse_items(items: &Element, out: &mut Vec<PubsubEvent>) {
    let address = match items.attr("node") {
        Some(node) => SipAddress::from_leaf_node(node),
        None => Err(ParseError::MissingAttribute {
            element: "items",
            attribute: "node",
        }),
    };
    for child in items.children() {
        let address = match &address {
            Ok(address) => address.clone(),
            Err(err) => {
                out.push(PubsubEvent::Malformed(err.clone()));
                continue;
            }
        };
        // Match by name *and* namespace: `<retract xmlns='urn:other'/>` is
        // not a retract.
        if !child.has_ns(ns::PUBSUB_EVENT) {
            out.push(PubsubEvent::Ignored);
            continue;
        }
        out.push(match child.name() {
            "item" => parse_item(address, child),
            "retract" => match child.attr("id") {
                Some(id) if !id.is_empty() => PubsubEvent::Retract {
                    address,
                    item_id: Arc::from(id),
                },
                _ => PubsubEvent::Malformed(ParseError::MissingAttribute {
                    element: "retract",
                    attribute: "id",
                }),
            },
            _ => PubsubEvent::Ignored,
        });
    }
}

fn parse_item(address: SipAddress, item: &Element) -> PubsubEvent {
    let id = match item.attr("id") {
        Some(id) if !id.is_empty() => id,
        _ => {
            return PubsubEvent::Malformed(ParseError::MissingAttribute {
                element: "item",
                attribute: "id",
            })
        }
    };
    match item.get_child("user-agent", ns::USER_AGENTS) {
        Some(user_agent) => PubsubEvent::Publish {
            address,
            item_id: Arc::from(id),
            registration: parse_user_agent(user_agent),
        },
        None => PubsubEvent::Malformed(ParseError::MissingUserAgent(id.to_owned())),
    }
}

/// Reads a `<user-agent xmlns='onsip:user-agents'>` payload. Every child may
/// be missing or empty (OnSIP's SDK fixtures have `<received/>` and friends).
pub fn parse_user_agent(user_agent: &Element) -> Registration {
    let text = |name: &str| {
        user_agent
            .get_child(name, ns::USER_AGENTS)
            .map(|child| truncated(child.text().trim()))
            .unwrap_or_default()
    };
    Registration {
        contact: text("contact"),
        received: text("received"),
        device: text("device"),
        expires: parse_timestamp(&text("expires")),
    }
}

/// Longest text kept from a payload field. The User-Agent string becomes a
/// label value: a hostile 200 kB one must not bloat every scrape.
pub const MAX_FIELD_CHARS: usize = 128;

fn truncated(text: &str) -> String {
    match text.char_indices().nth(MAX_FIELD_CHARS) {
        Some((end, _)) => text[..end].to_owned(),
        None => text.to_owned(),
    }
}

/// Parses an ISO-8601 / RFC 3339 timestamp into Unix seconds.
pub fn parse_timestamp(text: &str) -> Option<i64> {
    if text.is_empty() {
        return None;
    }
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp())
}

/// Formats Unix seconds as the UTC timestamp form OnSIP's samples use.
pub fn format_timestamp(unix_seconds: i64) -> String {
    chrono::DateTime::from_timestamp(unix_seconds, 0)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn parse_subscription(el: &Element) -> Result<SubscriptionInfo, ParseError> {
    let state = el
        .attr("subscription")
        .ok_or(ParseError::MissingAttribute {
            element: "subscription",
            attribute: "subscription",
        })?;
    Ok(SubscriptionInfo {
        node: el.attr("node").map(str::to_owned),
        jid: el.attr("jid").map(str::to_owned),
        subid: el.attr("subid").map(str::to_owned),
        state: SubscriptionState::parse(state)?,
    })
}

// ---------------------------------------------------------------------------
// Requests

fn data_form(form_type: Option<&str>, fields: &[(&str, &str)]) -> Element {
    let mut form = Element::builder("x", ns::DATA_FORMS)
        .attr(name!("type"), "submit")
        .build();
    if let Some(form_type) = form_type {
        form.append_child(
            Element::builder("field", ns::DATA_FORMS)
                .attr(name!("var"), "FORM_TYPE")
                .attr(name!("type"), "hidden")
                .append(Element::builder("value", ns::DATA_FORMS).append(form_type))
                .build(),
        );
    }
    for (var, value) in fields {
        form.append_child(
            Element::builder("field", ns::DATA_FORMS)
                .attr(name!("var"), *var)
                .append(Element::builder("value", ns::DATA_FORMS).append(*value))
                .build(),
        );
    }
    form
}

/// What to authorize with `authorize-plain`.
pub struct AuthorizeRequest<'a> {
    pub sip_address: &'a str,
    /// The OnSIP web-portal password. Only ever placed in the stanza.
    pub password: &'a str,
    /// The JID to authorize; `None` lets the service use the iq's `from`.
    pub jid: Option<&'a str>,
    pub auth_for_all: bool,
}

/// The `<command>` payload of the authorize iq (XEP-0050, submitted in one step).
pub fn authorize_command(req: &AuthorizeRequest<'_>) -> Element {
    let mut fields = vec![
        ("sip-address", req.sip_address),
        ("password", req.password),
        (
            "auth-for-all",
            if req.auth_for_all { "true" } else { "false" },
        ),
    ];
    if let Some(jid) = req.jid {
        fields.push(("jid", jid));
    }
    Element::builder("command", ns::COMMANDS)
        .attr(name!("node"), AUTHORIZE_NODE)
        .attr(name!("action"), "execute")
        .append(data_form(None, &fields))
        .build()
}

/// A successful authorization.
#[derive(Clone, Debug, PartialEq)]
pub struct Authorization {
    /// Unix seconds; `None` if the service did not say.
    pub expires: Option<i64>,
    /// Every SIP address the JID may now watch.
    pub addresses: Vec<SipAddress>,
    /// `sip` values that were not SIP addresses.
    pub skipped: usize,
}

/// Reads the `<command>` of an authorize reply. A `note type='error'` is a
/// refusal (wrong password, unknown address) and its text is returned.
pub fn parse_authorize_reply(command: &Element) -> Result<Authorization, String> {
    if !command.is("command", ns::COMMANDS) {
        return Err(format!("reply is <{}>, not a command", command.name()));
    }
    for note in command.children().filter(|c| c.is("note", ns::COMMANDS)) {
        if note.attr("type") == Some("error") {
            return Err(note.text());
        }
    }
    let mut auth = Authorization {
        expires: None,
        addresses: Vec::new(),
        skipped: 0,
    };
    if let Some(form) = command.get_child("x", ns::DATA_FORMS) {
        for field in form.children().filter(|c| c.is("field", ns::DATA_FORMS)) {
            for value in field.children().filter(|c| c.is("value", ns::DATA_FORMS)) {
                let value = value.text();
                match field.attr("var") {
                    Some("expires") => auth.expires = parse_timestamp(value.trim()),
                    // One unreadable address must not cost the others their
                    // authorization: it is skipped and counted.
                    Some("sip") => match SipAddress::parse(&value) {
                        Ok(address) => auth.addresses.push(address),
                        Err(_) => auth.skipped += 1,
                    },
                    _ => {}
                }
            }
        }
    }
    if command.attr("status") == Some("completed") || auth.expires.is_some() {
        Ok(auth)
    } else {
        Err(format!(
            "command status {:?} without an expiry",
            command.attr("status").unwrap_or("")
        ))
    }
}

/// The `<pubsub>` payload of a subscribe iq, with the options form of the
/// seed document. `expire` is a UTC timestamp (the authorization's expiry).
pub fn subscribe_request(node: &str, jid: &str, expire: Option<&str>) -> Element {
    let mut fields = vec![
        ("pubsub#subscription_type", "items"),
        ("pubsub#subscription_depth", "all"),
    ];
    if let Some(expire) = expire {
        fields.push(("pubsub#expire", expire));
    }
    Element::builder("pubsub", ns::PUBSUB)
        .append(
            Element::builder("subscribe", ns::PUBSUB)
                .attr(name!("node"), node)
                .attr(name!("jid"), jid),
        )
        .append(Element::builder("options", ns::PUBSUB).append(data_form(
            Some("http://jabber.org/protocol/pubsub#subscribe_options"),
            &fields,
        )))
        .build()
}

/// The `<pubsub>` payload that lists a node's subscriptions.
pub fn list_subscriptions_request(node: &str) -> Element {
    Element::builder("pubsub", ns::PUBSUB)
        .append(Element::builder("subscriptions", ns::PUBSUB).attr(name!("node"), node))
        .build()
}

/// The `<pubsub>` payload that renews a subscription with a new expiry.
pub fn renew_request(node: &str, jid: &str, subid: &str, expire: &str) -> Element {
    Element::builder("pubsub", ns::PUBSUB)
        .append(
            Element::builder("options", ns::PUBSUB)
                .attr(name!("node"), node)
                .attr(name!("jid"), jid)
                .attr(name!("subid"), subid)
                .append(data_form(
                    Some("http://jabber.org/protocol/pubsub#subscribe_options"),
                    &[("pubsub#expire", expire)],
                )),
        )
        .build()
}

/// The `<pubsub>` payload that ends a subscription.
pub fn unsubscribe_request(node: &str, jid: &str, subid: Option<&str>) -> Element {
    let mut unsubscribe = Element::builder("unsubscribe", ns::PUBSUB)
        .attr(name!("node"), node)
        .attr(name!("jid"), jid);
    if let Some(subid) = subid {
        unsubscribe = unsubscribe.attr(name!("subid"), subid);
    }
    Element::builder("pubsub", ns::PUBSUB)
        .append(unsubscribe)
        .build()
}

/// The `<pubsub>` payload that asks for a node's current items (XEP-0060 §6.5).
pub fn items_request(node: &str) -> Element {
    Element::builder("pubsub", ns::PUBSUB)
        .append(Element::builder("items", ns::PUBSUB).attr(name!("node"), node))
        .build()
}

/// The `<ping>` payload used as a keepalive (XEP-0199).
pub fn ping_request() -> Element {
    Element::builder("ping", ns::PING).build()
}

/// Reads a subscribe reply's `<pubsub><subscription/></pubsub>`. An empty
/// result (allowed by XEP-0060) reads as `pending`: the outcome then comes
/// as an event message.
pub fn parse_subscribe_reply(payload: Option<&Element>) -> Result<SubscriptionInfo, ParseError> {
    let Some(pubsub) = payload else {
        return Ok(SubscriptionInfo {
            node: None,
            jid: None,
            subid: None,
            state: SubscriptionState::Pending,
        });
    };
    match pubsub.get_child("subscription", ns::PUBSUB) {
        Some(subscription) => parse_subscription(subscription),
        None => Err(ParseError::UnexpectedReply(format!(
            "<{}> without <subscription>",
            pubsub.name()
        ))),
    }
}

/// Reads a list-subscriptions reply.
pub fn parse_subscriptions_reply(
    payload: Option<&Element>,
) -> Result<Vec<SubscriptionInfo>, ParseError> {
    let Some(subscriptions) = payload.and_then(|p| p.get_child("subscriptions", ns::PUBSUB)) else {
        return Ok(Vec::new());
    };
    let node = subscriptions.attr("node");
    subscriptions
        .children()
        .filter(|c| c.is("subscription", ns::PUBSUB))
        .map(|c| {
            parse_subscription(c).map(|mut info| {
                if info.node.is_none() {
                    info.node = node.map(str::to_owned);
                }
                info
            })
        })
        .collect()
}

/// Reads an items-retrieval reply: every `<items node=...>` block (one per
/// leaf under a collection node) into publish events.
pub fn parse_items_reply(payload: Option<&Element>, out: &mut Vec<PubsubEvent>) {
    let Some(pubsub) = payload else { return };
    for items in pubsub.children().filter(|c| c.is("items", ns::PUBSUB)) {
        let address = match items.attr("node").map(SipAddress::from_leaf_node) {
            Some(Ok(address)) => address,
            Some(Err(err)) => {
                out.push(PubsubEvent::Malformed(err));
                continue;
            }
            None => {
                out.push(PubsubEvent::Malformed(ParseError::MissingAttribute {
                    element: "items",
                    attribute: "node",
                }));
                continue;
            }
        };
        for item in items.children().filter(|c| c.is("item", ns::PUBSUB)) {
            out.push(parse_item(address.clone(), item));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses a stanza written as in the seed (single quotes, no namespace on
    /// `<message>`) by giving it the client namespace the stream would.
    fn parse_stanza(xml: &str) -> Element {
        let xml = xml
            .replacen("<message ", "<message xmlns='jabber:client' ", 1)
            .replacen("<iq ", "<iq xmlns='jabber:client' ", 1);
        xml.parse().expect("stanza parses")
    }

    fn events_of(message: &Element) -> Vec<PubsubEvent> {
        let event = message
            .get_child("event", ns::PUBSUB_EVENT)
            .expect("has an event");
        let mut out = Vec::new();
        parse_event(event, &mut out);
        out
    }

    // The seed document's stanzas, verbatim.
    const SEED_PUBLISH: &str = r#"<message from="pubsub.user-agents.xmpp.onsip.com" to="foo@example.com" >
<event xmlns="http://jabber.org/protocol/pubsub#event">
<items node="/example.com/foo" >
<item id="4e536ee0246ccf0224154a9e72be7a9c" >
<user-agent xmlns="onsip:user-agents">
<contact>sip:foo@192.168.0.125:5060;rinstance=d6e716e0dcf01b1b</contact>
<received>sip:X.Y.W.Z:34873</received>
<device>SIP User Agent String</device>
<expires>2009-03-05T12:30:34-05:00</expires>
</user-agent>
</item>
</items>
</event>
</message>"#;

    const SEED_RETRACT: &str = r#"<message from="pubsub.user-agents.xmpp.onsip.com" to="foo@example.com" >
<event xmlns="http://jabber.org/protocol/pubsub#event">
<items node="/example.com/foo" >
<retract id="4e536ee0246ccf0224154a9e72be7a9c" />
</items>
</event>
</message>"#;

    const SEED_SUBSCRIBED: &str = r#"<message from="pubsub.user-agents.xmpp.onsip.com" to="foo@example.com" >
<event xmlns="http://jabber.org/protocol/pubsub#event">
<subscription node="/me/foo@example.com" subscription="subscribed" jid="foo@example.com" />
</event>
</message>"#;

    const SEED_NONE: &str = r#"<message from="pubsub.user-agents.xmpp.onsip.com" to="foo@example.com" >
<event xmlns="http://jabber.org/protocol/pubsub#event">
<subscription node="/me/foo@example.com" subscription="none" jid="foo@example.com" />
</event>
</message>"#;

    const SEED_PENDING: &str = r#"<iq from="pubsub.user-agents.xmpp.onsip.com" type="result" to="foo@example.com/bar-resource" id="sub1" >
<pubsub xmlns="http://jabber.org/protocol/pubsub">
<subscription node="/me/foo@example.com" subscription="pending" jid="foo@example.com" />
</pubsub>
</iq>"#;

    const SEED_SUBSCRIBE_REQUEST: &str = r#"<iq type='set' id='sub1'
from='foo@example.com' to='pubsub.user-agents.xmpp.onsip.com'
xmlns='jabber:client'>
<pubsub xmlns='http://jabber.org/protocol/pubsub'>
<subscribe node='/me/foo@example.com' jid='foo@example.com'/>
<options>
<x xmlns='jabber:x:data' type='submit'>
<field var='FORM_TYPE' type='hidden'>
<value>http://jabber.org/protocol/pubsub#subscribe_options</value>
</field>
<field var='pubsub#subscription_type'>
<value>items</value>
</field>
<field var='pubsub#subscription_depth'>
<value>all</value>
</field>
<field var='pubsub#expire'>
<value>2010-11-02T22:00:00.0000000Z</value>
</field>
</x>
</options>
</pubsub>
</iq>"#;

    #[test]
    fn seed_publish_is_a_device_of_foo_at_example_com() {
        let events = events_of(&parse_stanza(SEED_PUBLISH));
        assert_eq!(
            events,
            vec![PubsubEvent::Publish {
                address: SipAddress::new("foo", "example.com"),
                item_id: Arc::from("4e536ee0246ccf0224154a9e72be7a9c"),
                registration: Registration {
                    contact: "sip:foo@192.168.0.125:5060;rinstance=d6e716e0dcf01b1b".into(),
                    received: "sip:X.Y.W.Z:34873".into(),
                    device: "SIP User Agent String".into(),
                    // 2009-03-05T12:30:34-05:00 == 17:30:34Z
                    expires: Some(1_236_274_234),
                },
            }]
        );
    }

    #[test]
    fn seed_retract_removes_the_same_item() {
        let events = events_of(&parse_stanza(SEED_RETRACT));
        assert_eq!(
            events,
            vec![PubsubEvent::Retract {
                address: SipAddress::new("foo", "example.com"),
                item_id: Arc::from("4e536ee0246ccf0224154a9e72be7a9c"),
            }]
        );
    }

    #[test]
    fn seed_subscription_notifications() {
        for (xml, state) in [
            (SEED_SUBSCRIBED, SubscriptionState::Subscribed),
            (SEED_NONE, SubscriptionState::None),
        ] {
            assert_eq!(
                events_of(&parse_stanza(xml)),
                vec![PubsubEvent::Subscription(SubscriptionInfo {
                    node: Some("/me/foo@example.com".into()),
                    jid: Some("foo@example.com".into()),
                    subid: None,
                    state,
                })]
            );
        }
    }

    #[test]
    fn seed_pending_reply() {
        let iq = parse_stanza(SEED_PENDING);
        let info = parse_subscribe_reply(iq.get_child("pubsub", ns::PUBSUB)).expect("parses");
        assert_eq!(info.state, SubscriptionState::Pending);
        assert_eq!(info.node.as_deref(), Some("/me/foo@example.com"));
    }

    #[test]
    fn subscribe_request_matches_the_seed_form() {
        let seed = parse_stanza(SEED_SUBSCRIBE_REQUEST);
        let seed_pubsub = seed.get_child("pubsub", ns::PUBSUB).expect("pubsub");
        let ours = subscribe_request(
            "/me/foo@example.com",
            "foo@example.com",
            Some("2010-11-02T22:00:00.0000000Z"),
        );
        // Compare structure, not whitespace: same children, attributes, values.
        assert_eq!(canonical(&ours), canonical(seed_pubsub));
    }

    /// A whitespace-free rendering of an element tree for comparisons.
    fn canonical(el: &Element) -> String {
        let mut attrs: Vec<String> = el
            .attrs()
            .iter()
            .map(|((_, k), v)| format!("{}={v}", k.as_str()))
            .collect();
        attrs.sort();
        let children: Vec<String> = el.children().map(canonical).collect();
        format!(
            "<{} {} [{}] {}>{}",
            el.name(),
            el.ns(),
            attrs.join(","),
            el.text().trim(),
            children.join("")
        )
    }

    #[test]
    fn empty_children_publish_time_and_shim_are_tolerated() {
        let xml = r#"<message from='pubsub.user-agents.xmpp.onsip.com' to='a@b'>
<event xmlns='http://jabber.org/protocol/pubsub#event'>
<items node='/example.onsip.com/alice'>
<item id='sip:alice@10.0.0.1'><user-agent xmlns='onsip:user-agents' publish-time='2011-01-01T00:00:00Z'>
<contact>sip:alice@10.0.0.1</contact><received/><device/><expires/><time>2011-01-01T00:00:00Z</time>
</user-agent></item>
</items></event>
<headers xmlns='http://jabber.org/protocol/shim'><header name='Collection'>/me/a@b</header></headers>
</message>"#;
        let events = events_of(&parse_stanza(xml));
        match &events[..] {
            [PubsubEvent::Publish {
                address,
                registration,
                ..
            }] => {
                assert_eq!(address.to_string(), "alice@example.onsip.com");
                assert_eq!(registration.device, "");
                assert_eq!(registration.expires, None);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn one_bad_item_does_not_hide_the_others() {
        let xml = r#"<message from='p' to='a@b'><event xmlns='http://jabber.org/protocol/pubsub#event'>
<items node='/d.com/u'>
<item id='1'><user-agent xmlns='onsip:user-agents'><device>A</device></user-agent></item>
<item id='2'><something-else xmlns='urn:x'/></item>
<item><user-agent xmlns='onsip:user-agents'/></item>
<retract id='3'/>
<retract/>
</items>
<items node='not-a-leaf'><retract id='4'/></items>
</event></message>"#;
        let events = events_of(&parse_stanza(xml));
        let kinds: Vec<&str> = events
            .iter()
            .map(|e| match e {
                PubsubEvent::Publish { .. } => "publish",
                PubsubEvent::Retract { .. } => "retract",
                PubsubEvent::Malformed(_) => "malformed",
                PubsubEvent::Subscription(_) => "subscription",
                PubsubEvent::Ignored => "ignored",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "publish",
                "malformed",
                "malformed",
                "retract",
                "malformed",
                "malformed"
            ]
        );
    }

    #[test]
    fn invalid_timestamp_keeps_the_device_without_expiry() {
        let el: Element =
            "<user-agent xmlns='onsip:user-agents'><expires>yesterday</expires></user-agent>"
                .parse()
                .expect("xml");
        assert_eq!(parse_user_agent(&el).expires, None);
    }

    #[test]
    fn leaf_nodes_and_addresses() {
        assert_eq!(
            SipAddress::from_leaf_node("/Example.com/foo").map(|a| a.to_string()),
            Ok("foo@example.com".to_owned())
        );
        for bad in [
            "",
            "/",
            "/example.com",
            "/me/foo@example.com",
            "/a/b/c",
            "//u",
        ] {
            assert!(SipAddress::from_leaf_node(bad).is_err(), "{bad}");
        }
        assert_eq!(
            SipAddress::parse("sip:hiro@example.onsip.com").map(|a| a.leaf_node()),
            Ok("/example.onsip.com/hiro".to_owned())
        );
        assert!(SipAddress::parse("no-at-sign").is_err());
    }

    #[test]
    fn authorize_reply_from_onsip_samples() {
        let iq = parse_stanza(
            r#"<iq from="commands.auth.xmpp.onsip.com" type="result" id="5020" to="hiro@example.onsip.com/psi">
  <command xmlns="http://jabber.org/protocol/commands" status="completed" node="authorize-plain" sessionid="...">
    <note type="info">JID 'hiro@example.onsip.com' has been authorized to access resources for SIP Address(es) '...' until 2012-11-13T16:09:58Z</note>
    <x xmlns="jabber:x:data" type="result">
      <field type="fixed" var="expires"><value>2012-11-13T16:09:58Z</value></field>
      <field type="fixed" var="sip"><value>hiro@example.onsip.com</value></field>
      <field type="fixed" var="sip"><value>hiro_marketing@example.onsip.com</value></field>
    </x>
  </command>
</iq>"#,
        );
        let auth = parse_authorize_reply(iq.get_child("command", ns::COMMANDS).expect("command"))
            .expect("authorized");
        assert_eq!(auth.expires, Some(1_352_822_998));
        let addresses: Vec<String> = auth.addresses.iter().map(|a| a.to_string()).collect();
        assert_eq!(
            addresses,
            ["hiro@example.onsip.com", "hiro_marketing@example.onsip.com"]
        );
    }

    #[test]
    fn authorize_error_note_is_a_refusal() {
        let command: Element = r#"<command xmlns="http://jabber.org/protocol/commands" status="completed" node="authorize-plain"><note type="error">Authorization failed</note></command>"#
            .parse()
            .expect("xml");
        assert_eq!(
            parse_authorize_reply(&command),
            Err("Authorization failed".to_owned())
        );
    }

    #[test]
    fn authorize_command_carries_the_form() {
        let command = authorize_command(&AuthorizeRequest {
            sip_address: "hiro@example.onsip.com",
            password: "pw<&>",
            jid: Some("hiro@example.onsip.com/exporter"),
            auth_for_all: true,
        });
        assert_eq!(command.attr("node"), Some("authorize-plain"));
        let form = command.get_child("x", ns::DATA_FORMS).expect("form");
        let fields: Vec<(String, String)> = form
            .children()
            .map(|f| {
                (
                    f.attr("var").unwrap_or_default().to_owned(),
                    f.children().map(|v| v.text()).collect(),
                )
            })
            .collect();
        assert!(fields.contains(&("password".into(), "pw<&>".into())));
        assert!(fields.contains(&("auth-for-all".into(), "true".into())));
        assert!(fields.contains(&("jid".into(), "hiro@example.onsip.com/exporter".into())));
    }

    #[test]
    fn subscriptions_list_and_items_reply() {
        let reply: Element = r#"<pubsub xmlns="http://jabber.org/protocol/pubsub"><subscriptions node="/me/hiro@example.onsip.com"><subscription subscription="subscribed" subid="548C825398B51" jid="hiro@example.onsip.com/psi"/></subscriptions></pubsub>"#
            .parse()
            .expect("xml");
        let subs = parse_subscriptions_reply(Some(&reply)).expect("parses");
        assert_eq!(subs.len(), 1);
        assert_eq!(subs[0].subid.as_deref(), Some("548C825398B51"));
        assert_eq!(subs[0].node.as_deref(), Some("/me/hiro@example.onsip.com"));

        let items: Element = r#"<pubsub xmlns="http://jabber.org/protocol/pubsub"><items node="/d.com/a"><item id="x"><user-agent xmlns="onsip:user-agents"><device>P</device></user-agent></item></items><items node="/d.com/b"/></pubsub>"#
            .parse()
            .expect("xml");
        let mut out = Vec::new();
        parse_items_reply(Some(&items), &mut out);
        assert_eq!(out.len(), 1);
        assert!(
            matches!(&out[0], PubsubEvent::Publish { address, .. } if address.to_string() == "a@d.com")
        );
    }
}
