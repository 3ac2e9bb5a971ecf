//! XML helpers shared by the pure services and the two network faces:
//! namespace constants, a small element builder, data-form reading and
//! writing, stanza error replies, and the `jabber:client` ↔
//! `jabber:component:accept` namespace rewrite.
//!
//! Everything here works on `minidom::Element` rather than xmpp-parsers'
//! typed stanzas, because typed stanzas are tied to one default namespace per
//! build and the component face must speak the other one.

use minidom::Element;
use rxml::{xml_ncname, Namespace, NcNameStr};

/// `jabber:client`, the namespace the pure services build their replies in.
pub const NS_CLIENT: &str = "jabber:client";
/// XEP-0114 stanza namespace.
pub const NS_COMPONENT: &str = "jabber:component:accept";
/// RFC 6120 stream namespace.
pub const NS_STREAM: &str = "http://etherx.jabber.org/streams";
/// RFC 6120 stanza error conditions.
pub const NS_STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
/// RFC 6120 SASL.
pub const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
/// RFC 6120 resource binding.
pub const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
/// RFC 3921 legacy session establishment.
pub const NS_SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
/// XEP-0050 ad-hoc commands.
pub const NS_COMMANDS: &str = "http://jabber.org/protocol/commands";
/// XEP-0004 data forms.
pub const NS_DATA: &str = "jabber:x:data";
/// XEP-0060 pubsub.
pub const NS_PUBSUB: &str = "http://jabber.org/protocol/pubsub";
/// XEP-0060 pubsub events.
pub const NS_PUBSUB_EVENT: &str = "http://jabber.org/protocol/pubsub#event";
/// XEP-0060 pubsub application error conditions.
pub const NS_PUBSUB_ERRORS: &str = "http://jabber.org/protocol/pubsub#errors";
/// XEP-0060 pubsub owner use cases.
pub const NS_PUBSUB_OWNER: &str = "http://jabber.org/protocol/pubsub#owner";
/// XEP-0131 stanza headers (the `Collection` header).
pub const NS_SHIM: &str = "http://jabber.org/protocol/shim";
/// OnSIP's user-agent item payload.
pub const NS_USER_AGENTS: &str = "onsip:user-agents";
/// XEP-0199 ping.
pub const NS_PING: &str = "urn:xmpp:ping";
/// XEP-0030 service discovery, info.
pub const NS_DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
/// XEP-0030 service discovery, items.
pub const NS_DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
/// RFC 6121 roster.
pub const NS_ROSTER: &str = "jabber:iq:roster";
/// `FORM_TYPE` of XEP-0060 subscription options.
pub const SUBSCRIBE_OPTIONS_FORM: &str = "http://jabber.org/protocol/pubsub#subscribe_options";

/// A tiny fluent builder over `minidom::Element`.
///
/// minidom 0.19 wants owned, validated attribute names; taking
/// `&'static NcNameStr` (from `xml_ncname!`) checks names at compile time so
/// building a reply can never fail at run time.
pub struct El(Element);

impl El {
    /// Start an element `name` in namespace `ns`.
    pub fn new(name: &str, ns: &str) -> Self {
        El(Element::builder(name, ns).build())
    }

    /// Set an attribute.
    pub fn attr(mut self, name: &'static NcNameStr, value: impl Into<String>) -> Self {
        self.0
            .set_attr(Namespace::NONE, name.to_ncname(), value.into());
        self
    }

    /// Set an attribute if `value` is `Some`.
    pub fn attr_opt(self, name: &'static NcNameStr, value: Option<impl Into<String>>) -> Self {
        match value {
            Some(v) => self.attr(name, v),
            None => self,
        }
    }

    /// Append a child element.
    pub fn child(mut self, child: impl Into<Element>) -> Self {
        self.0.append_child(child.into());
        self
    }

    /// Append several child elements.
    pub fn children(mut self, children: impl IntoIterator<Item = Element>) -> Self {
        for c in children {
            self.0.append_child(c);
        }
        self
    }

    /// Append a text node (escaped on output).
    pub fn text(mut self, text: impl Into<String>) -> Self {
        self.0.append_text_node(text.into());
        self
    }

    /// Finish.
    pub fn build(self) -> Element {
        self.0
    }
}

impl From<El> for Element {
    fn from(e: El) -> Element {
        e.0
    }
}

/// Is `el` a top-level stanza named `name`, in either stanza namespace?
pub fn is_stanza(el: &Element, name: &str) -> bool {
    el.name() == name && (el.ns() == NS_CLIENT || el.ns() == NS_COMPONENT)
}

/// Rebuild `el` with every element in namespace `from_ns` moved to `to_ns`.
///
/// Replies are built in `jabber:client`; on a component link the stanza and
/// its stanza-namespace children (`<error/>`) must be in
/// `jabber:component:accept` instead.
pub fn rewrite_ns(el: &Element, from_ns: &str, to_ns: &str) -> Element {
    let ns = el.ns();
    let new_ns = if ns == from_ns { to_ns.to_owned() } else { ns };
    let mut out = Element::builder(el.name(), new_ns).build();
    for ((ans, name), value) in el.attrs().iter() {
        out.set_attr(ans.clone(), name.clone(), value.clone());
    }
    for node in el.nodes() {
        match node {
            minidom::Node::Element(child) => {
                out.append_child(rewrite_ns(child, from_ns, to_ns));
            }
            minidom::Node::Text(t) => out.append_text_node(t.clone()),
        }
    }
    out
}

/// Serialise an element (no XML declaration). The root element carries its
/// own `xmlns`, so the bytes are valid inside any stream.
pub fn to_bytes(el: &Element) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Err(e) = el.write_to(&mut buf) {
        // Only happens for elements we could not have built with `El`.
        tracing::warn!(cause = %e, "cannot serialise element");
        buf.clear();
    }
    buf
}

/// Lower-case bare JID of `jid`, or `None` if it does not parse.
pub fn bare_jid(jid: &str) -> Option<String> {
    jid::Jid::new(jid)
        .ok()
        .map(|j| j.to_bare().to_string().to_lowercase())
}

/// The domain part of `jid` (lower-case), or `None` if it does not parse.
pub fn jid_domain(jid: &str) -> Option<String> {
    jid::Jid::new(jid)
        .ok()
        .map(|j| j.domain().as_str().to_lowercase())
}

/// Stanza error `type` attribute values (RFC 6120 §8.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    /// Do not retry.
    Cancel,
    /// Retry after changing the data sent.
    Modify,
    /// Retry after providing credentials.
    Auth,
    /// Retry after waiting.
    Wait,
}

impl ErrorType {
    fn as_str(self) -> &'static str {
        match self {
            ErrorType::Cancel => "cancel",
            ErrorType::Modify => "modify",
            ErrorType::Auth => "auth",
            ErrorType::Wait => "wait",
        }
    }
}

/// A stanza error to send back: RFC 6120 condition, optional application
/// condition (XEP-0060 `pubsub#errors`), optional text.
#[derive(Debug, Clone)]
pub struct StanzaError {
    /// Error type.
    pub kind: ErrorType,
    /// RFC 6120 defined condition, e.g. `item-not-found`.
    pub condition: &'static str,
    /// Text content of the defined condition (used by `redirect`/`gone`).
    pub condition_text: Option<String>,
    /// Application-specific condition: (element name, namespace, optional `feature` attribute).
    pub app: Option<(&'static str, &'static str, Option<&'static str>)>,
    /// Human-readable text.
    pub text: Option<String>,
}

impl StanzaError {
    /// An error with just a defined condition.
    pub fn new(kind: ErrorType, condition: &'static str) -> Self {
        StanzaError {
            kind,
            condition,
            condition_text: None,
            app: None,
            text: None,
        }
    }

    /// Add a `pubsub#errors` application condition.
    pub fn pubsub(mut self, name: &'static str) -> Self {
        self.app = Some((name, NS_PUBSUB_ERRORS, None));
        self
    }

    /// Add `<unsupported feature='..'/>` from `pubsub#errors`.
    pub fn unsupported(mut self, feature: &'static str) -> Self {
        self.app = Some(("unsupported", NS_PUBSUB_ERRORS, Some(feature)));
        self
    }

    /// Add a human-readable text.
    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.text = Some(text.into());
        self
    }

    /// The `<error/>` element.
    pub fn to_element(&self) -> Element {
        let mut cond = El::new(self.condition, NS_STANZAS);
        if let Some(t) = &self.condition_text {
            cond = cond.text(t.clone());
        }
        let mut e = El::new("error", NS_CLIENT)
            .attr(xml_ncname!("type"), self.kind.as_str())
            .child(cond);
        if let Some((name, ns, feature)) = self.app {
            e = e.child(El::new(name, ns).attr_opt(xml_ncname!("feature"), feature));
        }
        if let Some(t) = &self.text {
            e = e.child(El::new("text", NS_STANZAS).attr_ns_lang().text(t.clone()));
        }
        e.build()
    }
}

impl El {
    /// `xml:lang='en'` on a `<text/>`.
    fn attr_ns_lang(mut self) -> Self {
        self.0.set_attr(
            Namespace::xml().clone(),
            xml_ncname!("lang").to_ncname(),
            "en",
        );
        self
    }
}

/// The `iq type='result'` answering `req`, from `from`, with an optional payload.
pub fn iq_result(req: &Element, from: &str, payload: Option<Element>) -> Element {
    let mut iq = El::new("iq", NS_CLIENT)
        .attr(xml_ncname!("type"), "result")
        .attr(xml_ncname!("id"), req.attr("id").unwrap_or_default())
        .attr(xml_ncname!("from"), from)
        .attr_opt(xml_ncname!("to"), req.attr("from"));
    if let Some(p) = payload {
        iq = iq.child(p);
    }
    iq.build()
}

/// The `iq type='error'` answering `req`, from `from`.
pub fn iq_error(req: &Element, from: &str, err: &StanzaError) -> Element {
    El::new("iq", NS_CLIENT)
        .attr(xml_ncname!("type"), "error")
        .attr(xml_ncname!("id"), req.attr("id").unwrap_or_default())
        .attr(xml_ncname!("from"), from)
        .attr_opt(xml_ncname!("to"), req.attr("from"))
        .child(err.to_element())
        .build()
}

/// A submitted or result XEP-0004 data form, read leniently.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Form {
    /// The form's `type` attribute (`submit`, `result`, `form`, `cancel`).
    pub form_type: String,
    /// Fields in document order: (`var`, values).
    pub fields: Vec<(String, Vec<String>)>,
}

impl Form {
    /// Read the first `<x xmlns='jabber:x:data'/>` child of `parent`.
    pub fn from_parent(parent: &Element) -> Option<Form> {
        parent.get_child("x", NS_DATA).map(Form::from_x)
    }

    /// Read an `<x xmlns='jabber:x:data'/>` element.
    pub fn from_x(x: &Element) -> Form {
        let fields = x
            .children()
            .filter(|c| c.is("field", NS_DATA))
            .filter_map(|f| {
                let var = f.attr("var")?.to_owned();
                let values = f
                    .children()
                    .filter(|v| v.is("value", NS_DATA))
                    .map(|v| v.text().trim().to_owned())
                    .collect();
                Some((var, values))
            })
            .collect();
        Form {
            form_type: x.attr("type").unwrap_or_default().to_owned(),
            fields,
        }
    }

    /// First value of field `var`.
    pub fn value(&self, var: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(v, _)| v == var)
            .and_then(|(_, vals)| vals.first())
            .map(String::as_str)
    }

    /// Field `var` read as an XEP-0004 boolean (`1`/`true`); absent is `false`.
    pub fn flag(&self, var: &str) -> bool {
        matches!(self.value(var), Some("1") | Some("true"))
    }
}

/// A `<field var=.. type=..><value>..</value></field>` element.
pub fn form_field(var: &str, field_type: Option<&str>, values: &[&str]) -> Element {
    El::new("field", NS_DATA)
        .attr(xml_ncname!("var"), var)
        .attr_opt(xml_ncname!("type"), field_type)
        .children(
            values
                .iter()
                .map(|v| El::new("value", NS_DATA).text(*v).build()),
        )
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrite_moves_stanza_and_error_namespace_only() {
        let err = StanzaError::new(ErrorType::Cancel, "item-not-found").pubsub("invalid-subid");
        let iq: Element = "<iq xmlns='jabber:client' type='get' id='a1' from='u@d/r' to='s.d'><pubsub xmlns='http://jabber.org/protocol/pubsub'/></iq>"
            .parse()
            .expect("test xml");
        let reply = iq_error(&iq, "s.d", &err);
        let c = rewrite_ns(&reply, NS_CLIENT, NS_COMPONENT);
        assert!(c.is("iq", NS_COMPONENT));
        let e = c.get_child("error", NS_COMPONENT).expect("error child");
        assert!(e.has_child("item-not-found", NS_STANZAS));
        assert!(e.has_child("invalid-subid", NS_PUBSUB_ERRORS));
        let s = String::from_utf8(to_bytes(&c)).expect("utf8");
        assert!(s.starts_with("<iq xmlns='jabber:component:accept'"), "{s}");
    }

    #[test]
    fn form_reads_values_and_flags() {
        let x: Element = "<x xmlns='jabber:x:data' type='submit'><field var='a'><value> 1 </value></field><field var='b'><value>x</value><value>y</value></field></x>"
            .parse()
            .expect("test xml");
        let f = Form::from_x(&x);
        assert_eq!(f.form_type, "submit");
        assert!(f.flag("a"));
        assert!(!f.flag("missing"));
        assert_eq!(f.value("b"), Some("x"));
    }

    #[test]
    fn bare_jid_lowercases_and_strips_resource() {
        assert_eq!(
            bare_jid("Foo@Example.com/Res").as_deref(),
            Some("foo@example.com")
        );
        assert_eq!(bare_jid("@@bad"), None);
    }
}
