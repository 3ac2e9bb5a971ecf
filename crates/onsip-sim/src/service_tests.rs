//! Unit tests of the pure service, driven with the stanzas of OnSIP's
//! User-Agent PubSub page (copied verbatim) and of its authorization samples.

use chrono::{DateTime, TimeZone, Utc};
use minidom::Element;

use super::*;
use crate::config::{Account, AuthErrorStyle, RedirectStyle, SimConfig};
use crate::pubsub::{Registration, SubscribeAnswer, SubscriptionState};
use crate::xml::{NS_CLIENT, NS_DATA, NS_PUBSUB_ERRORS, NS_PUBSUB_EVENT, NS_SHIM, NS_STANZAS};

// ---- The seed, verbatim ----

const SEED_SUBSCRIBE_ME: &str = r#"<iq type='set' id='sub1'
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

const SEED_PENDING: &str = r#"<iq from="pubsub.user-agents.xmpp.onsip.com" type="result" to="foo@example.com/bar-resource" id="sub1" >
<pubsub xmlns="http://jabber.org/protocol/pubsub">
<subscription node="/me/foo@example.com" subscription="pending" jid="foo@example.com" />
</pubsub>
</iq>"#;

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

const SEED_SUBSCRIBE_ME_DOMAIN: &str = r#"<iq type='set' id='sub1'
from='foo@example.com' to='pubsub.user-agents.xmpp.onsip.com'
xmlns='jabber:client'>
<pubsub xmlns='http://jabber.org/protocol/pubsub'>
<subscribe node='/me/foo@example.com/example.com' jid='foo@example.com'/>
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
</x>
</options>
</pubsub>
</iq>"#;

const SEED_SUBSCRIBE_LEAF: &str = r#"<iq type='set' id='sub1'
from='foo@example.com' to='pubsub.user-agents.xmpp.onsip.com'
xmlns='jabber:client'>
<pubsub xmlns='http://jabber.org/protocol/pubsub'>
<subscribe node='/example.com/foo' jid='foo@example.com'/>
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
</x>
</options>
</pubsub>
</iq>"#;

const SEED_NEW_UA: &str = r#"<message from="pubsub.user-agents.xmpp.onsip.com" to="foo@example.com" >
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

// ---- Helpers ----

const PUBSUB: &str = "pubsub.user-agents.xmpp.onsip.com";
const AUTH: &str = "commands.auth.xmpp.onsip.com";
const FOO: &str = "foo@example.com/bar-resource";

/// Parse a seed stanza; the page omits the stream's default namespace on
/// stanzas the server sends, so declare `jabber:client` on the root.
fn seed(xml: &str) -> Element {
    let xml = xml.trim();
    let parsed = if xml.contains("xmlns='jabber:client'") {
        xml.to_owned()
    } else {
        let end = xml
            .find(|c: char| c.is_whitespace() || c == '>')
            .unwrap_or(xml.len());
        format!("{} xmlns='jabber:client'{}", &xml[..end], &xml[end..])
    };
    parsed.parse().expect("seed stanza parses")
}

/// Element equality ignoring whitespace-only text and the listed attributes
/// (present only on our side).
fn assert_same(ours: &Element, want: &Element, extra_ok: &[&str]) {
    assert_eq!(
        (ours.name(), ours.ns()),
        (want.name(), want.ns()),
        "element"
    );
    for (k, v) in want.attrs() {
        let name = k.1.as_str();
        assert_eq!(
            ours.attr(name),
            Some(v.as_str()),
            "attribute {name} of <{}>",
            ours.name()
        );
    }
    for (k, _) in ours.attrs() {
        let name = k.1.as_str();
        assert!(
            want.attr(name).is_some() || extra_ok.contains(&name),
            "unexpected attribute {name} on <{}>",
            ours.name()
        );
    }
    let oc: Vec<&Element> = ours.children().collect();
    let wc: Vec<&Element> = want.children().collect();
    assert_eq!(oc.len(), wc.len(), "children of <{}>", ours.name());
    for (o, w) in oc.iter().zip(wc.iter()) {
        assert_same(o, w, extra_ok);
    }
    if wc.is_empty() {
        assert_eq!(
            ours.text().trim(),
            want.text().trim(),
            "text of <{}>",
            ours.name()
        );
    }
}

fn t(h: u32, m: u32) -> DateTime<Utc> {
    // Before the seed's pubsub#expire (2010-11-02T22:00Z).
    Utc.with_ymd_and_hms(2010, 11, 2, h, m, 0)
        .single()
        .expect("valid time")
}

fn cfg() -> SimConfig {
    SimConfig::new("xmpp.onsip.com").with_account(Account {
        jid: "foo@example.com".into(),
        sip_addresses: vec![
            "foo@example.com".into(),
            "bar@example.com".into(),
            "manager@acme.com".into(),
        ],
        web_password: "webpw".into(),
        xmpp_password: "xmpppw".into(),
    })
}

fn authorize_xml(from: &str, address: &str, password: &str, all: bool) -> Element {
    format!(
        "<iq xmlns='jabber:client' type='set' id='auth1' from='{from}' to='{AUTH}'>\
         <command xmlns='http://jabber.org/protocol/commands' node='authorize-plain' action='execute'>\
         <x xmlns='jabber:x:data' type='submit'>\
         <field var='sip-address'><value>{address}</value></field>\
         <field var='password'><value>{password}</value></field>\
         <field var='auth-for-all'><value>{}</value></field>\
         </x></command></iq>",
        if all { "true" } else { "false" }
    )
    .parse()
    .expect("authorize xml")
}

/// A service where foo@example.com is authorized for all its addresses at 21:00.
fn authorized(cfg: SimConfig) -> Service {
    let mut s = Service::new(cfg);
    let out = s.handle(
        &authorize_xml(FOO, "foo@example.com", "webpw", true),
        t(21, 0),
    );
    assert_eq!(out.len(), 1);
    s
}

fn subscribe_xml(id: &str, node: &str, jid: &str, expire: Option<&str>, depth: &str) -> Element {
    let expire = expire
        .map(|e| format!("<field var='pubsub#expire'><value>{e}</value></field>"))
        .unwrap_or_default();
    format!(
        "<iq xmlns='jabber:client' type='set' id='{id}' from='{FOO}' to='{PUBSUB}'>\
         <pubsub xmlns='http://jabber.org/protocol/pubsub'><subscribe node='{node}' jid='{jid}'/>\
         <options><x xmlns='jabber:x:data' type='submit'>\
         <field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/pubsub#subscribe_options</value></field>\
         <field var='pubsub#subscription_type'><value>items</value></field>\
         <field var='pubsub#subscription_depth'><value>{depth}</value></field>{expire}\
         </x></options></pubsub></iq>"
    )
    .parse()
    .expect("subscribe xml")
}

fn pubsub_iq(kind: &str, id: &str, inner: &str) -> Element {
    format!(
        "<iq xmlns='jabber:client' type='{kind}' id='{id}' from='{FOO}' to='{PUBSUB}'>\
         <pubsub xmlns='http://jabber.org/protocol/pubsub'>{inner}</pubsub></iq>"
    )
    .parse()
    .expect("pubsub xml")
}

fn error_condition(el: &Element) -> Option<(String, Option<String>)> {
    let e = el.get_child("error", NS_CLIENT)?;
    let cond = e
        .children()
        .find(|c| c.ns() == NS_STANZAS && c.name() != "text")?;
    let app = e
        .children()
        .find(|c| c.ns() == NS_PUBSUB_ERRORS)
        .map(|c| c.name().to_owned());
    Some((cond.name().to_owned(), app))
}

fn seed_registration() -> Registration {
    Registration {
        item_id: "4e536ee0246ccf0224154a9e72be7a9c".into(),
        contact: "sip:foo@192.168.0.125:5060;rinstance=d6e716e0dcf01b1b".into(),
        received: "sip:X.Y.W.Z:34873".into(),
        device: "SIP User Agent String".into(),
        expires: DateTime::parse_from_rfc3339("2009-03-05T12:30:34-05:00")
            .expect("seed time")
            .with_timezone(&Utc),
    }
}

fn subid_of(iq: &Element) -> String {
    iq.get_child("pubsub", NS_PUBSUB)
        .and_then(|p| p.get_child("subscription", NS_PUBSUB))
        .and_then(|s| s.attr("subid"))
        .expect("subid")
        .to_owned()
}

// ---- Authorization ----

#[test]
fn authorize_right_password_for_all_addresses() {
    let mut s = Service::new(cfg());
    let out = s.handle(
        &authorize_xml(FOO, "sip:foo@example.com", "webpw", true),
        t(21, 0),
    );
    assert_eq!(out.len(), 1);
    let iq = &out[0];
    assert_eq!(iq.attr("type"), Some("result"));
    assert_eq!(iq.attr("from"), Some(AUTH));
    assert_eq!(iq.attr("to"), Some(FOO));
    let cmd = iq.get_child("command", NS_COMMANDS).expect("command");
    assert_eq!(cmd.attr("status"), Some("completed"));
    assert_eq!(cmd.attr("node"), Some("authorize-plain"));
    let note = cmd.get_child("note", NS_COMMANDS).expect("note");
    assert_eq!(note.attr("type"), Some("info"));
    assert!(note
        .text()
        .contains("JID 'foo@example.com' has been authorized"));
    let form = crate::xml::Form::from_parent(cmd).expect("form");
    assert_eq!(form.form_type, "result");
    assert_eq!(form.value("expires"), Some("2010-11-02T22:00:00Z"));
    let sips: Vec<&str> = form
        .fields
        .iter()
        .filter(|(v, _)| v == "sip")
        .map(|(_, vals)| vals[0].as_str())
        .collect();
    assert_eq!(
        sips,
        ["bar@example.com", "foo@example.com", "manager@acme.com"]
    );
    assert_eq!(s.authorizations(t(21, 0)).len(), 3);
    assert!(cmd.get_child("x", NS_DATA).is_some());
}

#[test]
fn authorize_one_address_and_for_another_jid() {
    let mut s = Service::new(cfg());
    let el: Element = format!(
        "<iq xmlns='jabber:client' type='set' id='a' from='{FOO}' to='{AUTH}'>\
         <command xmlns='http://jabber.org/protocol/commands' node='authorize-plain'>\
         <x xmlns='jabber:x:data' type='submit'>\
         <field var='sip-address'><value>bar@example.com</value></field>\
         <field var='password'><value>webpw</value></field>\
         <field var='jid'><value>Other@Example.com/x</value></field>\
         </x></command></iq>"
    )
    .parse()
    .expect("xml");
    let out = s.handle(&el, t(21, 0));
    let cmd = out[0].get_child("command", NS_COMMANDS).expect("command");
    let form = crate::xml::Form::from_parent(cmd).expect("form");
    assert_eq!(form.fields.iter().filter(|(v, _)| v == "sip").count(), 1);
    let auths = s.authorizations(t(21, 0));
    assert_eq!(auths.len(), 1);
    assert_eq!(auths[0].jid, "other@example.com");
    assert_eq!(auths[0].address, "bar@example.com");
}

#[test]
fn authorize_wrong_password_or_unknown_address_is_an_error_note() {
    let mut s = Service::new(cfg());
    for (addr, pw) in [("foo@example.com", "nope"), ("ghost@example.com", "webpw")] {
        let out = s.handle(&authorize_xml(FOO, addr, pw, true), t(21, 0));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].attr("type"), Some("result"));
        let cmd = out[0].get_child("command", NS_COMMANDS).expect("command");
        assert_eq!(cmd.attr("status"), Some("completed"));
        let note = cmd.get_child("note", NS_COMMANDS).expect("note");
        assert_eq!(note.attr("type"), Some("error"));
        assert!(cmd.get_child("x", NS_DATA).is_none());
    }
    assert!(s.authorizations(t(21, 0)).is_empty());
    assert_eq!(s.stats().authorize_refused, 2);
}

#[test]
fn authorize_failure_as_iq_error_forced_and_silent() {
    let mut c = cfg();
    c.auth_error = AuthErrorStyle::IqError;
    let mut s = Service::new(c);
    let out = s.handle(
        &authorize_xml(FOO, "foo@example.com", "nope", false),
        t(21, 0),
    );
    assert_eq!(out[0].attr("type"), Some("error"));
    assert_eq!(
        error_condition(&out[0]).map(|c| c.0).as_deref(),
        Some("not-authorized")
    );

    s.set_authorize_answer(AuthorizeAnswer::WrongPassword);
    let out = s.handle(
        &authorize_xml(FOO, "foo@example.com", "webpw", false),
        t(21, 0),
    );
    assert_eq!(out[0].attr("type"), Some("error"));

    s.set_authorize_answer(AuthorizeAnswer::Silent);
    assert!(s
        .handle(
            &authorize_xml(FOO, "foo@example.com", "webpw", false),
            t(21, 0)
        )
        .is_empty());
    assert!(s.authorizations(t(21, 0)).is_empty());
}

#[test]
fn authorize_without_form_gets_the_blank_form() {
    let mut s = Service::new(cfg());
    let el: Element = format!(
        "<iq xmlns='jabber:client' type='set' id='a' from='{FOO}' to='{AUTH}'>\
         <command xmlns='http://jabber.org/protocol/commands' node='authorize-plain' action='execute'/></iq>"
    )
    .parse()
    .expect("xml");
    let out = s.handle(&el, t(21, 0));
    let cmd = out[0].get_child("command", NS_COMMANDS).expect("command");
    assert_eq!(cmd.attr("status"), Some("executing"));
    let form = crate::xml::Form::from_parent(cmd).expect("form");
    assert_eq!(form.form_type, "form");
    assert!(form.fields.iter().any(|(v, _)| v == "sip-address"));
}

#[test]
fn authorization_expires_after_ttl() {
    let mut s = authorized(cfg());
    assert_eq!(s.authorizations(t(21, 59)).len(), 3);
    s.expire(t(22, 0));
    assert!(s.authorizations(t(22, 0)).is_empty());
}

// ---- Subscribe ----

#[test]
fn seed_subscribe_is_pending_then_subscribed() {
    let mut s = authorized(cfg());
    let mut req = seed(SEED_SUBSCRIBE_ME);
    // The seed's request omits the resource its reply goes to; a server
    // stamps the full JID.
    req.set_attr(
        rxml::Namespace::NONE,
        rxml::xml_ncname!("from").to_ncname(),
        FOO.to_owned(),
    );
    let out = s.handle(&req, t(21, 0));
    assert_eq!(out.len(), 2, "{out:?}");
    assert_same(&out[0], &seed(SEED_PENDING), &["subid"]);
    assert_same(&out[1], &seed(SEED_SUBSCRIBED), &["subid"]);
    let subid = subid_of(&out[0]);
    let ev_sub = out[1]
        .get_child("event", NS_PUBSUB_EVENT)
        .and_then(|e| e.get_child("subscription", NS_PUBSUB_EVENT))
        .expect("event subscription");
    assert_eq!(ev_sub.attr("subid"), Some(subid.as_str()));

    let subs = s.subscriptions(t(21, 0));
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0].node, "/me/foo@example.com");
    assert_eq!(subs[0].state, SubscriptionState::Subscribed);
    assert_eq!(subs[0].expires, Some(t(22, 0)));
}

#[test]
fn seed_subscribe_without_authorization_is_none() {
    let mut s = Service::new(cfg());
    let out = s.handle(&seed(SEED_SUBSCRIBE_ME), t(21, 0));
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].attr("to"), Some("foo@example.com"));
    assert_same(&out[1], &seed(SEED_NONE), &["subid"]);
    assert!(s.subscriptions(t(21, 0)).is_empty());
    assert_eq!(s.stats().subscriptions_refused, 1);
}

#[test]
fn seed_subscribe_domain_and_leaf_nodes() {
    let mut s = authorized(cfg());
    for (req, node) in [
        (SEED_SUBSCRIBE_ME_DOMAIN, "/me/foo@example.com/example.com"),
        (SEED_SUBSCRIBE_LEAF, "/example.com/foo"),
    ] {
        let out = s.handle(&seed(req), t(21, 0));
        assert_eq!(out.len(), 2);
        let sub = out[0]
            .get_child("pubsub", NS_PUBSUB)
            .and_then(|p| p.get_child("subscription", NS_PUBSUB))
            .expect("subscription");
        assert_eq!(sub.attr("node"), Some(node));
        assert_eq!(sub.attr("subscription"), Some("pending"));
    }
    assert_eq!(s.subscriptions(t(21, 0)).len(), 2);
}

#[test]
fn leaf_of_an_unauthorized_address_is_none() {
    let mut c = cfg();
    c.accounts
        .push(Account::new("zed@example.com", &["zed@zzz.com"], "zpw"));
    let mut s = authorized(c);
    let out = s.handle(
        &subscribe_xml("s", "/zzz.com/zed", FOO, None, "all"),
        t(21, 0),
    );
    let ev = out[1]
        .get_child("event", NS_PUBSUB_EVENT)
        .and_then(|e| e.get_child("subscription", NS_PUBSUB_EVENT))
        .expect("sub");
    assert_eq!(ev.attr("subscription"), Some("none"));
}

#[test]
fn root_and_domain_redirect_to_me_nodes() {
    let mut s = authorized(cfg());
    for (asked, got) in [
        ("/", "/me/foo@example.com"),
        ("/acme.com", "/me/foo@example.com/acme.com"),
    ] {
        let out = s.handle(&subscribe_xml("r", asked, FOO, None, "all"), t(21, 0));
        assert_eq!(subid_of(&out[0]).len(), 13);
        let sub = out[0]
            .get_child("pubsub", NS_PUBSUB)
            .and_then(|p| p.get_child("subscription", NS_PUBSUB))
            .expect("subscription");
        assert_eq!(sub.attr("node"), Some(got));
    }
}

#[test]
fn redirect_as_xep0060_error() {
    let mut c = cfg();
    c.redirect = RedirectStyle::Error;
    let mut s = authorized(c);
    let out = s.handle(&subscribe_xml("r", "/", FOO, None, "all"), t(21, 0));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].attr("type"), Some("error"));
    let redirect = out[0]
        .get_child("error", NS_CLIENT)
        .and_then(|e| e.get_child("redirect", NS_STANZAS))
        .expect("redirect");
    assert_eq!(
        redirect.text(),
        format!("xmpp:{PUBSUB}?;node=/me/foo@example.com")
    );
}

#[test]
fn direct_subscribed_mode() {
    let mut c = cfg();
    c.direct_subscribed = true;
    let mut s = authorized(c.clone());
    let out = s.handle(
        &subscribe_xml("d", "/me/foo@example.com", FOO, None, "all"),
        t(21, 0),
    );
    assert_eq!(out.len(), 1);
    let sub = out[0]
        .get_child("pubsub", NS_PUBSUB)
        .and_then(|p| p.get_child("subscription", NS_PUBSUB))
        .expect("subscription");
    assert_eq!(sub.attr("subscription"), Some("subscribed"));
    // Unauthorized in direct mode: an error, no message.
    let mut s = Service::new(c);
    let out = s.handle(
        &subscribe_xml("d", "/me/foo@example.com", FOO, None, "all"),
        t(21, 0),
    );
    assert_eq!(out.len(), 1);
    assert_eq!(
        error_condition(&out[0]).map(|c| c.0).as_deref(),
        Some("forbidden")
    );
}

#[test]
fn subscribe_answer_overrides() {
    let mut s = authorized(cfg());
    s.set_subscribe_answer(SubscribeAnswer::None);
    let out = s.handle(
        &subscribe_xml("a", "/me/foo@example.com", FOO, None, "all"),
        t(21, 0),
    );
    assert_eq!(out.len(), 2);
    assert!(s.subscriptions(t(21, 0)).is_empty());

    s.set_subscribe_answer(SubscribeAnswer::Silent);
    let out = s.handle(
        &subscribe_xml("b", "/me/foo@example.com", FOO, None, "all"),
        t(21, 0),
    );
    assert_eq!(out.len(), 1, "only the pending result");
    let subs = s.subscriptions(t(21, 0));
    assert_eq!(subs[0].state, SubscriptionState::Pending);
    // A pending subscription gets no events.
    assert!(s
        .publish("foo@example.com", seed_registration(), t(21, 1))
        .is_empty());
}

#[test]
fn eleventh_subscription_per_node_is_refused() {
    let mut s = authorized(cfg());
    let mut subids = Vec::new();
    for i in 0..10 {
        let out = s.handle(
            &subscribe_xml(&format!("s{i}"), "/me/foo@example.com", FOO, None, "all"),
            t(21, 0),
        );
        assert_eq!(out[0].attr("type"), Some("result"), "subscription {i}");
        subids.push(subid_of(&out[0]));
    }
    // Another resource of the same account counts too.
    let mut eleventh = subscribe_xml(
        "s10",
        "/me/foo@example.com",
        "foo@example.com/other",
        None,
        "all",
    );
    eleventh.set_attr(
        rxml::Namespace::NONE,
        rxml::xml_ncname!("from").to_ncname(),
        "foo@example.com/other".to_owned(),
    );
    let out = s.handle(&eleventh, t(21, 0));
    assert_eq!(out.len(), 1);
    assert_eq!(
        error_condition(&out[0]),
        Some((
            "policy-violation".into(),
            Some("too-many-subscriptions".into())
        ))
    );
    // Another node is a separate budget.
    let out = s.handle(
        &subscribe_xml("leaf", "/example.com/foo", FOO, None, "all"),
        t(21, 0),
    );
    assert_eq!(out[0].attr("type"), Some("result"));
    // Unsubscribing one frees a slot.
    let un = pubsub_iq(
        "set",
        "u",
        &format!(
            "<unsubscribe node='/me/foo@example.com' jid='{FOO}' subid='{}'/>",
            subids[0]
        ),
    );
    assert_eq!(s.handle(&un, t(21, 0))[0].attr("type"), Some("result"));
    let out = s.handle(
        &subscribe_xml("again", "/me/foo@example.com", FOO, None, "all"),
        t(21, 0),
    );
    assert_eq!(out[0].attr("type"), Some("result"));
}

#[test]
fn bad_subscribe_requests() {
    let mut s = authorized(cfg());
    let cases = [
        (
            subscribe_xml("1", "/me/foo@example.com", "someone@else.com", None, "all"),
            "bad-request",
        ),
        (
            subscribe_xml("2", "/a/b/c", FOO, None, "all"),
            "item-not-found",
        ),
        (
            subscribe_xml("3", "/me/foo@example.com", FOO, Some("not a time"), "all"),
            "bad-request",
        ),
        (
            subscribe_xml(
                "4",
                "/me/foo@example.com",
                FOO,
                Some("2001-01-01T00:00:00Z"),
                "all",
            ),
            "bad-request",
        ),
        (
            subscribe_xml("5", "/me/foo@example.com", FOO, None, "7"),
            "bad-request",
        ),
    ];
    for (req, cond) in cases {
        let out = s.handle(&req, t(21, 0));
        assert_eq!(out.len(), 1);
        assert_eq!(
            error_condition(&out[0]).map(|c| c.0).as_deref(),
            Some(cond),
            "{req:?}"
        );
    }
    assert!(s.subscriptions(t(21, 0)).is_empty());
}

// ---- List, renew, unsubscribe ----

#[test]
fn list_renew_unsubscribe() {
    let mut s = authorized(cfg());
    let out = s.handle(
        &subscribe_xml(
            "s",
            "/me/foo@example.com",
            FOO,
            Some("2010-11-02T21:30:00Z"),
            "all",
        ),
        t(21, 0),
    );
    let subid = subid_of(&out[0]);

    let out = s.handle(
        &pubsub_iq("get", "l", "<subscriptions node='/me/foo@example.com'/>"),
        t(21, 1),
    );
    let list = out[0]
        .get_child("pubsub", NS_PUBSUB)
        .and_then(|p| p.get_child("subscriptions", NS_PUBSUB))
        .expect("subscriptions");
    let items: Vec<&Element> = list.children().collect();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].attr("subid"), Some(subid.as_str()));
    assert_eq!(items[0].attr("jid"), Some(FOO));
    assert_eq!(items[0].attr("subscription"), Some("subscribed"));

    // Renew.
    let renew = pubsub_iq(
        "set",
        "r",
        &format!(
            "<options node='/me/foo@example.com' jid='{FOO}' subid='{subid}'><x xmlns='jabber:x:data' type='submit'>\
             <field var='FORM_TYPE' type='hidden'><value>http://jabber.org/protocol/pubsub#subscribe_options</value></field>\
             <field var='pubsub#expire'><value>2010-11-02T23:00:00Z</value></field></x></options>"
        ),
    );
    let out = s.handle(&renew, t(21, 2));
    assert_eq!(out[0].attr("type"), Some("result"));
    assert_eq!(out[0].children().count(), 0, "empty result");
    assert_eq!(s.subscriptions(t(21, 2))[0].expires, Some(t(23, 0)));
    // Still alive past the old expiry.
    assert_eq!(s.subscriptions(t(21, 45)).len(), 1);

    // Options get shows the new expiry.
    let out = s.handle(
        &pubsub_iq(
            "get",
            "o",
            &format!("<options node='/me/foo@example.com' jid='{FOO}' subid='{subid}'/>"),
        ),
        t(21, 3),
    );
    let form = out[0]
        .get_child("pubsub", NS_PUBSUB)
        .and_then(|p| p.get_child("options", NS_PUBSUB))
        .and_then(crate::xml::Form::from_parent)
        .expect("form");
    assert_eq!(form.value("pubsub#expire"), Some("2010-11-02T23:00:00Z"));

    // Unknown subid.
    let bad = pubsub_iq(
        "set",
        "u0",
        &format!("<unsubscribe node='/me/foo@example.com' jid='{FOO}' subid='NOPE'/>"),
    );
    assert_eq!(
        error_condition(&s.handle(&bad, t(21, 3))[0]),
        Some(("not-acceptable".into(), Some("invalid-subid".into())))
    );
    // Unsubscribe.
    let un = pubsub_iq(
        "set",
        "u",
        &format!("<unsubscribe node='/me/foo@example.com' jid='{FOO}' subid='{subid}'/>"),
    );
    let out = s.handle(&un, t(21, 4));
    assert_eq!(out[0].attr("type"), Some("result"));
    assert!(s.subscriptions(t(21, 4)).is_empty());
    // Twice: not subscribed.
    let un = pubsub_iq(
        "set",
        "u2",
        &format!("<unsubscribe node='/me/foo@example.com' jid='{FOO}'/>"),
    );
    assert_eq!(
        error_condition(&s.handle(&un, t(21, 4))[0]),
        Some(("unexpected-request".into(), Some("not-subscribed".into())))
    );
}

#[test]
fn subscription_expiry_stops_events() {
    let mut s = authorized(cfg());
    s.handle(
        &subscribe_xml(
            "s",
            "/example.com/foo",
            FOO,
            Some("2010-11-02T21:10:00Z"),
            "all",
        ),
        t(21, 0),
    );
    assert_eq!(
        s.publish("foo@example.com", seed_registration(), t(21, 5))
            .len(),
        1
    );
    assert!(s
        .publish("foo@example.com", seed_registration(), t(21, 10))
        .is_empty());
    assert!(s.subscriptions(t(21, 10)).is_empty());
}

#[test]
fn authorization_lapse_stops_events() {
    let mut s = authorized(cfg());
    s.handle(
        &subscribe_xml("s", "/me/foo@example.com", FOO, None, "all"),
        t(21, 0),
    );
    assert_eq!(
        s.publish("foo@example.com", seed_registration(), t(21, 30))
            .len(),
        1
    );
    assert_eq!(
        s.subscriptions(t(22, 30)).len(),
        1,
        "no pubsub#expire: still there"
    );
    assert!(s
        .publish("foo@example.com", seed_registration(), t(22, 30))
        .is_empty());
    // Re-authorizing revives delivery on the same subscription.
    s.handle(
        &authorize_xml(FOO, "foo@example.com", "webpw", true),
        t(22, 31),
    );
    assert_eq!(
        s.publish("foo@example.com", seed_registration(), t(22, 32))
            .len(),
        1
    );
}

// ---- Events ----

#[test]
fn publish_matches_the_seed_and_fans_out_per_subscription() {
    let mut s = authorized(cfg());
    s.handle(
        &subscribe_xml("a", "/me/foo@example.com", FOO, None, "all"),
        t(21, 0),
    );
    s.handle(
        &subscribe_xml("b", "/me/foo@example.com/example.com", FOO, None, "1"),
        t(21, 0),
    );
    s.handle(
        &subscribe_xml("c", "/example.com/foo", FOO, None, "all"),
        t(21, 0),
    );
    s.handle(
        &subscribe_xml("d", "/example.com/bar", FOO, None, "all"),
        t(21, 0),
    );

    let out = s.publish("foo@example.com", seed_registration(), t(21, 1));
    assert_eq!(out.len(), 3, "two collections and the leaf cover foo");
    // The leaf subscription's message is exactly the seed's.
    let leaf_msg = out
        .iter()
        .find(|m| m.get_child("headers", NS_SHIM).is_none())
        .expect("leaf message");
    let mut want = seed(SEED_NEW_UA);
    // Our timestamps are UTC; the seed's has an offset. Same instant.
    let ua = |m: &Element| {
        m.get_child("event", NS_PUBSUB_EVENT)
            .and_then(|e| e.get_child("items", NS_PUBSUB_EVENT))
            .and_then(|i| i.get_child("item", NS_PUBSUB_EVENT))
            .and_then(|i| i.get_child("user-agent", crate::xml::NS_USER_AGENTS))
            .and_then(|u| u.get_child("expires", crate::xml::NS_USER_AGENTS))
            .map(|e| e.text())
            .expect("expires")
    };
    assert_eq!(
        DateTime::parse_from_rfc3339(&ua(leaf_msg)).expect("ours"),
        DateTime::parse_from_rfc3339(&ua(&want)).expect("seed")
    );
    let replace_expires = |m: &mut Element, text: &str| {
        if let Some(e) = m
            .get_child_mut("event", NS_PUBSUB_EVENT)
            .and_then(|e| e.get_child_mut("items", NS_PUBSUB_EVENT))
            .and_then(|i| i.get_child_mut("item", NS_PUBSUB_EVENT))
            .and_then(|i| i.get_child_mut("user-agent", crate::xml::NS_USER_AGENTS))
            .and_then(|u| u.get_child_mut("expires", crate::xml::NS_USER_AGENTS))
        {
            e.take_nodes();
            e.append_text_node(text.to_owned());
        }
    };
    replace_expires(&mut want, "2009-03-05T17:30:34Z");
    assert_same(leaf_msg, &want, &[]);
    // Collection messages carry the SHIM header naming the collection.
    let mut collections: Vec<String> = out
        .iter()
        .filter_map(|m| m.get_child("headers", NS_SHIM))
        .filter_map(|h| h.get_child("header", NS_SHIM))
        .map(|h| {
            assert_eq!(h.attr("name"), Some("Collection"));
            h.text()
        })
        .collect();
    collections.sort();
    assert_eq!(
        collections,
        ["/me/foo@example.com", "/me/foo@example.com/example.com"]
    );

    // manager@acme.com: only /me/foo@example.com covers it.
    let mut other = seed_registration();
    other.item_id = "other".into();
    assert_eq!(s.publish("manager@acme.com", other, t(21, 2)).len(), 1);

    // Retract: the seed's shape.
    let out = s.retract(
        "foo@example.com",
        "4e536ee0246ccf0224154a9e72be7a9c",
        t(21, 3),
    );
    assert_eq!(out.len(), 3);
    let leaf_msg = out
        .iter()
        .find(|m| m.get_child("headers", NS_SHIM).is_none())
        .expect("leaf message");
    assert_same(leaf_msg, &seed(SEED_RETRACT), &[]);
    // Unknown item: nothing.
    assert!(s
        .retract(
            "foo@example.com",
            "4e536ee0246ccf0224154a9e72be7a9c",
            t(21, 4)
        )
        .is_empty());
}

#[test]
fn me_node_without_depth_all_gets_no_items() {
    let mut s = authorized(cfg());
    s.handle(
        &subscribe_xml("a", "/me/foo@example.com", FOO, None, "1"),
        t(21, 0),
    );
    assert!(s
        .publish("foo@example.com", seed_registration(), t(21, 1))
        .is_empty());
}

#[test]
fn one_message_per_jid_when_configured() {
    let mut c = cfg();
    c.one_message_per_jid = true;
    let mut s = authorized(c);
    s.handle(
        &subscribe_xml("a", "/me/foo@example.com", FOO, None, "all"),
        t(21, 0),
    );
    s.handle(
        &subscribe_xml("b", "/example.com/foo", FOO, None, "all"),
        t(21, 0),
    );
    assert_eq!(
        s.publish("foo@example.com", seed_registration(), t(21, 1))
            .len(),
        1
    );
}

#[test]
fn empty_children_are_written_empty() {
    let mut s = authorized(cfg());
    s.handle(
        &subscribe_xml("c", "/example.com/foo", FOO, None, "all"),
        t(21, 0),
    );
    let mut r = seed_registration();
    r.received = String::new();
    r.device = String::new();
    let out = s.publish("foo@example.com", r, t(21, 1));
    let xml = String::from_utf8(crate::xml::to_bytes(&out[0])).expect("utf8");
    assert!(
        xml.contains("<received/>") || xml.contains("<received></received>"),
        "{xml}"
    );
}

// ---- Items retrieval ----

#[test]
fn items_retrieval_one_block_per_leaf() {
    let mut s = authorized(cfg());
    s.publish("foo@example.com", seed_registration(), t(21, 0));
    let out = s.handle(
        &pubsub_iq("get", "i", "<items node='/me/foo@example.com'/>"),
        t(21, 1),
    );
    let pubsub = out[0].get_child("pubsub", NS_PUBSUB).expect("pubsub");
    let blocks: Vec<(String, usize)> = pubsub
        .children()
        .map(|b| {
            (
                b.attr("node").unwrap_or_default().to_owned(),
                b.children().count(),
            )
        })
        .collect();
    assert_eq!(
        blocks,
        [
            ("/example.com/bar".to_owned(), 0),
            ("/example.com/foo".to_owned(), 1),
            ("/acme.com/manager".to_owned(), 0)
        ]
    );
    let item = pubsub
        .children()
        .nth(1)
        .and_then(|b| b.get_child("item", NS_PUBSUB))
        .expect("item");
    assert_eq!(item.attr("id"), Some("4e536ee0246ccf0224154a9e72be7a9c"));
    assert!(item.has_child("user-agent", crate::xml::NS_USER_AGENTS));

    let out = s.handle(
        &pubsub_iq("get", "i2", "<items node='/example.com/foo'/>"),
        t(21, 1),
    );
    assert_eq!(
        out[0]
            .get_child("pubsub", NS_PUBSUB)
            .expect("pubsub")
            .children()
            .count(),
        1
    );

    let out = s.handle(
        &pubsub_iq("get", "i3", "<items node='/me/other@example.com'/>"),
        t(21, 1),
    );
    assert_eq!(
        error_condition(&out[0]).map(|c| c.0).as_deref(),
        Some("forbidden")
    );
}

#[test]
fn items_retrieval_can_be_switched_off() {
    let mut c = cfg();
    c.items_retrieval = false;
    let mut s = authorized(c);
    let out = s.handle(
        &pubsub_iq("get", "i", "<items node='/me/foo@example.com'/>"),
        t(21, 1),
    );
    assert_eq!(
        error_condition(&out[0]),
        Some(("feature-not-implemented".into(), Some("unsupported".into())))
    );
}

// ---- Everything else ----

#[test]
fn ping_disco_and_unknown_requests() {
    let mut s = Service::new(cfg());
    let ping: Element = format!("<iq xmlns='jabber:client' type='get' id='p' from='{FOO}' to='{PUBSUB}'><ping xmlns='urn:xmpp:ping'/></iq>")
        .parse()
        .expect("xml");
    assert_eq!(s.handle(&ping, t(21, 0))[0].attr("type"), Some("result"));
    let disco: Element = format!("<iq xmlns='jabber:client' type='get' id='d' from='{FOO}' to='{AUTH}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>")
        .parse()
        .expect("xml");
    assert!(s.handle(&disco, t(21, 0))[0].has_child("query", NS_DISCO_INFO));
    let unknown: Element = format!("<iq xmlns='jabber:client' type='get' id='u' from='{FOO}' to='{PUBSUB}'><query xmlns='jabber:iq:version'/></iq>")
        .parse()
        .expect("xml");
    assert_eq!(
        error_condition(&s.handle(&unknown, t(21, 0))[0])
            .map(|c| c.0)
            .as_deref(),
        Some("service-unavailable")
    );
    let publish = pubsub_iq("set", "x", "<publish node='/example.com/foo'/>");
    assert_eq!(
        error_condition(&s.handle(&publish, t(21, 0))[0])
            .map(|c| c.0)
            .as_deref(),
        Some("forbidden")
    );
}

#[test]
fn malformed_and_misaddressed_stanzas_are_dropped() {
    let mut s = Service::new(cfg());
    let no_id: Element = format!("<iq xmlns='jabber:client' type='get' from='{FOO}' to='{PUBSUB}'><ping xmlns='urn:xmpp:ping'/></iq>")
        .parse()
        .expect("xml");
    assert!(s.handle(&no_id, t(21, 0)).is_empty());
    let no_from: Element = format!("<iq xmlns='jabber:client' type='get' id='1' to='{PUBSUB}'><ping xmlns='urn:xmpp:ping'/></iq>")
        .parse()
        .expect("xml");
    assert!(s.handle(&no_from, t(21, 0)).is_empty());
    let elsewhere: Element = format!("<iq xmlns='jabber:client' type='get' id='1' from='{FOO}' to='example.com'><ping xmlns='urn:xmpp:ping'/></iq>")
        .parse()
        .expect("xml");
    assert!(s.handle(&elsewhere, t(21, 0)).is_empty());
    let result: Element =
        format!("<iq xmlns='jabber:client' type='result' id='1' from='{FOO}' to='{PUBSUB}'/>")
            .parse()
            .expect("xml");
    assert!(s.handle(&result, t(21, 0)).is_empty());
    // Component-namespace stanzas are handled the same way.
    let comp: Element = format!("<iq xmlns='jabber:component:accept' type='get' id='c' from='{FOO}' to='{PUBSUB}'><ping xmlns='urn:xmpp:ping'/></iq>")
        .parse()
        .expect("xml");
    assert_eq!(s.handle(&comp, t(21, 0)).len(), 1);
    assert_eq!(s.stats().malformed, 2);
}

#[test]
fn subids_are_distinct_and_stable() {
    let mut a = authorized(cfg());
    let mut b = authorized(cfg());
    let ids_a: Vec<String> = (0..5)
        .map(|i| {
            subid_of(
                &a.handle(
                    &subscribe_xml(&i.to_string(), "/example.com/foo", FOO, None, "all"),
                    t(21, 0),
                )[0],
            )
        })
        .collect();
    let ids_b: Vec<String> = (0..5)
        .map(|i| {
            subid_of(
                &b.handle(
                    &subscribe_xml(&i.to_string(), "/example.com/foo", FOO, None, "all"),
                    t(21, 0),
                )[0],
            )
        })
        .collect();
    assert_eq!(ids_a, ids_b);
    let mut d = ids_a.clone();
    d.sort();
    d.dedup();
    assert_eq!(d.len(), 5);
}

#[test]
#[should_panic(expected = "attribute id")]
fn assert_same_notices_a_different_attribute() {
    let ours = seed(&SEED_RETRACT.replace("4e536ee0", "00000000"));
    assert_same(&ours, &seed(SEED_RETRACT), &[]);
}

#[test]
#[should_panic(expected = "children")]
fn assert_same_notices_a_missing_child() {
    let ours = seed(&SEED_NEW_UA.replace("<device>SIP User Agent String</device>", ""));
    assert_same(&ours, &seed(SEED_NEW_UA), &[]);
}
