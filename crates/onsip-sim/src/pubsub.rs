//! Pure emulation of `pubsub.user-agents.<domain>`: subscriptions (subscribe,
//! list, renew, unsubscribe, expiry, the per-node limit), the current
//! user-agent items, items retrieval, and the fan-out of publish/retract
//! events to subscribers.
//!
//! Choices where OnSIP's documentation is silent (see also the crate docs):
//! - which addresses a subscription covers is decided at event time from the
//!   live authorizations, so events stop when an authorization lapses, as
//!   they would at OnSIP;
//! - a collection subscription gets item events only with
//!   `pubsub#subscription_type=items`, and `/me/<jid>` only with
//!   `pubsub#subscription_depth=all` (its children are the per-domain
//!   collections), as XEP-0248 defines; the defaults are `items` and `1`;
//! - the limit counts live subscriptions per resolved node per *bare* JID;
//! - one message per subscription (XEP-0060), or one per bare JID when
//!   configured; messages go to the subscriber's bare JID.
//!
//! No I/O and no clock: every call takes `now`.

use std::collections::HashMap;

use chrono::{DateTime, SecondsFormat, Utc};
use minidom::Element;
use rxml::xml_ncname;

use crate::auth::AuthStore;
use crate::config::{RedirectStyle, SimConfig};
use crate::node::Node;
use crate::xml::{
    self, El, ErrorType, Form, StanzaError, NS_CLIENT, NS_DATA, NS_PUBSUB, NS_PUBSUB_EVENT,
    NS_SHIM, NS_USER_AGENTS, SUBSCRIBE_OPTIONS_FORM,
};

/// Subscription state as XEP-0060 names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionState {
    /// Accepted but not confirmed (only with [`crate::SubscribeAnswer::Silent`]).
    Pending,
    /// Live: receives events.
    Subscribed,
}

impl SubscriptionState {
    /// XEP-0060 attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionState::Pending => "pending",
            SubscriptionState::Subscribed => "subscribed",
        }
    }
}

/// A snapshot of one subscription, for tests and the demo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionInfo {
    /// Resolved node name.
    pub node: String,
    /// JID as given in the subscribe request (usually full).
    pub jid: String,
    /// Subscription id.
    pub subid: String,
    /// State.
    pub state: SubscriptionState,
    /// `pubsub#expire`, if any.
    pub expires: Option<DateTime<Utc>>,
    /// When it was created.
    pub created: DateTime<Utc>,
}

/// One registered user agent: the payload of an item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// Item id (opaque; a refresh republishes the same id).
    pub item_id: String,
    /// SIP Contact URI.
    pub contact: String,
    /// Source address the registration came from (`sip:ip:port`). Empty
    /// strings are written as empty elements, as OnSIP sometimes does.
    pub received: String,
    /// SIP User-Agent string.
    pub device: String,
    /// When the SIP registration expires.
    pub expires: DateTime<Utc>,
}

impl Registration {
    /// The `<item id=..><user-agent xmlns='onsip:user-agents'>..` element,
    /// shaped like the seed's "New user-agent notification".
    pub fn to_item(&self, ns: &str) -> Element {
        let child = |name: &str, text: &str| {
            let e = El::new(name, NS_USER_AGENTS);
            if text.is_empty() {
                e.build()
            } else {
                e.text(text).build()
            }
        };
        let ua = El::new("user-agent", NS_USER_AGENTS)
            .child(child("contact", &self.contact))
            .child(child("received", &self.received))
            .child(child("device", &self.device))
            .child(child(
                "expires",
                &self.expires.to_rfc3339_opts(SecondsFormat::Secs, true),
            ))
            .build();
        El::new("item", ns)
            .attr(xml_ncname!("id"), self.item_id.clone())
            .child(ua)
            .build()
    }
}

#[derive(Debug, Clone)]
struct Subscription {
    subid: String,
    node: Node,
    jid: String,
    bare: String,
    state: SubscriptionState,
    expires: Option<DateTime<Utc>>,
    type_items: bool,
    depth_all: bool,
    created: DateTime<Utc>,
}

impl Subscription {
    fn live(&self, now: DateTime<Utc>) -> bool {
        self.expires.is_none_or(|e| e > now)
    }

    fn info(&self) -> SubscriptionInfo {
        SubscriptionInfo {
            node: self.node.to_string(),
            jid: self.jid.clone(),
            subid: self.subid.clone(),
            state: self.state,
            expires: self.expires,
            created: self.created,
        }
    }

    /// Would an event on `address` reach this subscription at `now`?
    fn covers(&self, address: &str, auth: &AuthStore, now: DateTime<Utc>) -> bool {
        if self.state != SubscriptionState::Subscribed || !self.live(now) {
            return false;
        }
        if !self.node.contains_address(address) || !auth.is_authorized(&self.bare, address, now) {
            return false;
        }
        match self.node {
            Node::Me(_) => self.type_items && self.depth_all,
            Node::MeDomain(..) => self.type_items,
            _ => true,
        }
    }

    fn options_form(&self) -> Element {
        let expire = self
            .expires
            .map(|e| e.to_rfc3339_opts(SecondsFormat::Secs, true))
            .unwrap_or_default();
        El::new("x", NS_DATA)
            .attr(xml_ncname!("type"), "form")
            .child(xml::form_field(
                "FORM_TYPE",
                Some("hidden"),
                &[SUBSCRIBE_OPTIONS_FORM],
            ))
            .child(xml::form_field(
                "pubsub#subscription_type",
                Some("list-single"),
                &[if self.type_items { "items" } else { "nodes" }],
            ))
            .child(xml::form_field(
                "pubsub#subscription_depth",
                Some("list-single"),
                &[if self.depth_all { "all" } else { "1" }],
            ))
            .child(xml::form_field(
                "pubsub#expire",
                Some("text-single"),
                &[&expire],
            ))
            .build()
    }
}

/// How the next subscribe request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SubscribeAnswer {
    /// As OnSIP: `subscribed` when the JID is authorized for the node, else `none`.
    #[default]
    Normal,
    /// Always `none` (as for an unauthorized JID).
    None,
    /// Only the `pending` iq result, never the follow-up message; the
    /// subscription stays pending and gets no events.
    Silent,
}

/// Per-call inputs from the dispatcher.
pub struct Ctx<'a> {
    /// Configuration.
    pub cfg: &'a SimConfig,
    /// Live authorizations.
    pub auth: &'a AuthStore,
    /// Subscribe answer override.
    pub answer: SubscribeAnswer,
    /// Current time.
    pub now: DateTime<Utc>,
    /// Bare JID of the requester (lower-case).
    pub from_bare: &'a str,
}

/// What a pubsub request did, for counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PubsubOutcome {
    /// A subscription was created.
    Subscribed,
    /// The subscribe was answered `none`.
    Refused,
    /// Other requests.
    Other,
}

/// Subscriptions and items.
#[derive(Debug, Default)]
pub struct PubSub {
    subs: Vec<Subscription>,
    items: HashMap<String, Vec<Registration>>,
}

fn bad(kind: ErrorType, cond: &'static str) -> StanzaError {
    StanzaError::new(kind, cond)
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Subscription options read from a submitted form.
struct Options {
    /// `Some(None)`: explicitly no expiry (`presence`); `None`: not given.
    expire: Option<Option<DateTime<Utc>>>,
    type_items: Option<bool>,
    depth_all: Option<bool>,
}

fn read_options(form: Option<&Form>, now: DateTime<Utc>) -> Result<Options, StanzaError> {
    let invalid = || bad(ErrorType::Modify, "bad-request").pubsub("invalid-options");
    let mut o = Options {
        expire: None,
        type_items: None,
        depth_all: None,
    };
    let Some(form) = form else { return Ok(o) };
    if let Some(e) = form.value("pubsub#expire").filter(|v| !v.is_empty()) {
        if e == "presence" {
            // We do not track presence for the component face: treat as "until unsubscribed".
            o.expire = Some(None);
        } else {
            let t = parse_time(e).ok_or_else(|| invalid().with_text("bad pubsub#expire"))?;
            if t <= now {
                return Err(invalid().with_text("pubsub#expire is in the past"));
            }
            o.expire = Some(Some(t));
        }
    }
    if let Some(t) = form.value("pubsub#subscription_type") {
        o.type_items = Some(match t {
            "items" => true,
            "nodes" => false,
            _ => return Err(invalid().with_text("bad pubsub#subscription_type")),
        });
    }
    if let Some(d) = form.value("pubsub#subscription_depth") {
        o.depth_all = Some(match d {
            "all" => true,
            "1" => false,
            _ => return Err(invalid().with_text("bad pubsub#subscription_depth")),
        });
    }
    Ok(o)
}

impl PubSub {
    /// Forget subscriptions past their `pubsub#expire`.
    pub fn expire(&mut self, now: DateTime<Utc>) {
        self.subs.retain(|s| s.live(now));
    }

    /// Snapshot of every live subscription, oldest first.
    pub fn subscriptions(&self, now: DateTime<Utc>) -> Vec<SubscriptionInfo> {
        self.subs
            .iter()
            .filter(|s| s.live(now))
            .map(Subscription::info)
            .collect()
    }

    /// Current items of `address`.
    pub fn registrations(&self, address: &str) -> Vec<Registration> {
        self.items.get(address).cloned().unwrap_or_default()
    }

    /// Every address that has items, with them.
    pub fn all_registrations(&self) -> Vec<(String, Vec<Registration>)> {
        let mut v: Vec<_> = self
            .items
            .iter()
            .filter(|(_, r)| !r.is_empty())
            .map(|(a, r)| (a.clone(), r.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Resolve a requested node name for `bare`, applying OnSIP's redirects.
    /// `Err` carries the stanza error to answer.
    fn resolve(
        &self,
        ctx: &Ctx<'_>,
        name: Option<&str>,
        follow: bool,
    ) -> Result<Node, StanzaError> {
        let name =
            name.ok_or_else(|| bad(ErrorType::Modify, "bad-request").pubsub("nodeid-required"))?;
        let node = Node::parse(name)
            .ok_or_else(|| bad(ErrorType::Cancel, "item-not-found").with_text("no such node"))?;
        match node.redirect(ctx.from_bare) {
            None => Ok(node),
            Some(target) if follow || ctx.cfg.redirect == RedirectStyle::Follow => Ok(target),
            Some(target) => {
                let mut e = bad(ErrorType::Modify, "redirect");
                e.condition_text = Some(format!("xmpp:{}?;node={target}", ctx.cfg.pubsub_jid));
                Err(e)
            }
        }
    }

    /// Is `bare` authorized for anything under `node` at `now`?
    fn node_authorized(node: &Node, bare: &str, auth: &AuthStore, now: DateTime<Utc>) -> bool {
        match node {
            Node::Me(j) => j == bare && !auth.addresses(j, now).is_empty(),
            Node::MeDomain(j, d) => {
                j == bare
                    && auth
                        .addresses(j, now)
                        .iter()
                        .any(|a| a.rsplit_once('@').is_some_and(|(_, dom)| dom == d))
            }
            Node::Leaf { .. } => node
                .address()
                .is_some_and(|a| auth.is_authorized(bare, &a, now)),
            Node::Root | Node::Domain(_) => false,
        }
    }

    /// `<subscribe node jid/>` (+ `<options/>` sibling). Returns the replies
    /// (iq result, then possibly an event message).
    pub fn subscribe(
        &mut self,
        ctx: &Ctx<'_>,
        iq: &Element,
        pubsub: &Element,
        sub: &Element,
        subid: String,
    ) -> Result<(Vec<Element>, PubsubOutcome), StanzaError> {
        let cfg = ctx.cfg;
        let jid_attr = sub
            .attr("jid")
            .ok_or_else(|| bad(ErrorType::Modify, "bad-request").pubsub("invalid-jid"))?;
        if xml::bare_jid(jid_attr).as_deref() != Some(ctx.from_bare) {
            return Err(bad(ErrorType::Modify, "bad-request").pubsub("invalid-jid"));
        }
        let node = self.resolve(ctx, sub.attr("node"), false)?;
        let form = pubsub
            .get_child("options", NS_PUBSUB)
            .and_then(Form::from_parent);
        let opts = read_options(form.as_ref(), ctx.now)?;
        let expires = match opts.expire {
            Some(e) => e,
            None => cfg
                .default_subscription_ttl
                .and_then(|d| chrono::Duration::from_std(d).ok())
                .map(|d| ctx.now + d),
        };
        let type_items = opts.type_items.unwrap_or(true);
        let depth_all = opts.depth_all.unwrap_or(false);
        if matches!(node, Node::Me(_)) && (!depth_all || !type_items) {
            tracing::info!(node = %node, "subscription without depth=all/type=items on /me/<jid> gets no item events");
        }

        let authorized = ctx.answer != SubscribeAnswer::None
            && Self::node_authorized(&node, ctx.from_bare, ctx.auth, ctx.now);
        let node_name = node.to_string();
        let to_bare = ctx.from_bare.to_owned();

        if !authorized {
            if cfg.direct_subscribed {
                return Err(bad(ErrorType::Auth, "forbidden")
                    .with_text("JID is not authorized for this node"));
            }
            let result = subscription_result(iq, cfg, &node_name, jid_attr, &subid, "pending");
            let msg = subscription_message(cfg, &to_bare, &node_name, jid_attr, &subid, "none");
            return Ok((vec![result, msg], PubsubOutcome::Refused));
        }

        let existing = self
            .subs
            .iter()
            .filter(|s| s.node == node && s.bare == ctx.from_bare && s.live(ctx.now))
            .count();
        if existing >= cfg.max_subscriptions_per_node {
            return Err(bad(ErrorType::Wait, "policy-violation")
                .pubsub("too-many-subscriptions")
                .with_text(format!(
                    "at most {} subscriptions per node per JID",
                    cfg.max_subscriptions_per_node
                )));
        }

        let state = if ctx.answer == SubscribeAnswer::Silent && !cfg.direct_subscribed {
            SubscriptionState::Pending
        } else {
            SubscriptionState::Subscribed
        };
        self.subs.push(Subscription {
            subid: subid.clone(),
            node,
            jid: jid_attr.to_owned(),
            bare: to_bare.clone(),
            state,
            expires,
            type_items,
            depth_all,
            created: ctx.now,
        });

        let mut out = Vec::new();
        if cfg.direct_subscribed {
            out.push(subscription_result(
                iq,
                cfg,
                &node_name,
                jid_attr,
                &subid,
                "subscribed",
            ));
        } else {
            out.push(subscription_result(
                iq, cfg, &node_name, jid_attr, &subid, "pending",
            ));
            if state == SubscriptionState::Subscribed {
                out.push(subscription_message(
                    cfg,
                    &to_bare,
                    &node_name,
                    jid_attr,
                    &subid,
                    "subscribed",
                ));
            }
        }
        Ok((out, PubsubOutcome::Subscribed))
    }

    /// Find the one subscription an `<options/>`/`<unsubscribe/>` names.
    fn find(&self, ctx: &Ctx<'_>, el: &Element) -> Result<usize, StanzaError> {
        if let Some(j) = el.attr("jid") {
            if xml::bare_jid(j).as_deref() != Some(ctx.from_bare) {
                return Err(bad(ErrorType::Modify, "bad-request").pubsub("invalid-jid"));
            }
        }
        let node = self.resolve(ctx, el.attr("node"), true)?;
        let mine: Vec<usize> = self
            .subs
            .iter()
            .enumerate()
            .filter(|(_, s)| s.node == node && s.bare == ctx.from_bare && s.live(ctx.now))
            .filter(|(_, s)| {
                el.attr("jid")
                    .is_none_or(|j| j == s.jid || !j.contains('/'))
            })
            .map(|(i, _)| i)
            .collect();
        match el.attr("subid").filter(|s| !s.is_empty()) {
            Some(subid) => mine
                .into_iter()
                .find(|i| self.subs.get(*i).is_some_and(|s| s.subid == subid))
                .ok_or_else(|| bad(ErrorType::Modify, "not-acceptable").pubsub("invalid-subid")),
            None => match mine.as_slice() {
                [] => Err(bad(ErrorType::Cancel, "unexpected-request").pubsub("not-subscribed")),
                [one] => Ok(*one),
                _ => Err(bad(ErrorType::Modify, "bad-request").pubsub("subid-required")),
            },
        }
    }

    /// `<unsubscribe node jid subid/>`.
    pub fn unsubscribe(
        &mut self,
        ctx: &Ctx<'_>,
        iq: &Element,
        el: &Element,
    ) -> Result<Vec<Element>, StanzaError> {
        let i = self.find(ctx, el)?;
        self.subs.remove(i);
        Ok(vec![xml::iq_result(iq, &ctx.cfg.pubsub_jid, None)])
    }

    /// `iq set` `<options node jid subid><x type='submit'/></options>`: renew.
    pub fn set_options(
        &mut self,
        ctx: &Ctx<'_>,
        iq: &Element,
        el: &Element,
    ) -> Result<Vec<Element>, StanzaError> {
        let i = self.find(ctx, el)?;
        let form = Form::from_parent(el);
        if form.as_ref().is_none_or(|f| f.form_type != "submit") {
            return Err(
                bad(ErrorType::Modify, "bad-request").with_text("options need a submitted form")
            );
        }
        let opts = read_options(form.as_ref(), ctx.now)?;
        if let Some(s) = self.subs.get_mut(i) {
            if let Some(e) = opts.expire {
                s.expires = e;
            }
            if let Some(t) = opts.type_items {
                s.type_items = t;
            }
            if let Some(d) = opts.depth_all {
                s.depth_all = d;
            }
        }
        Ok(vec![xml::iq_result(iq, &ctx.cfg.pubsub_jid, None)])
    }

    /// `iq get` `<options node jid subid/>`: the current options form.
    pub fn get_options(
        &self,
        ctx: &Ctx<'_>,
        iq: &Element,
        el: &Element,
    ) -> Result<Vec<Element>, StanzaError> {
        let i = self.find(ctx, el)?;
        let Some(s) = self.subs.get(i) else {
            return Err(bad(ErrorType::Cancel, "item-not-found"));
        };
        let opts = El::new("options", NS_PUBSUB)
            .attr(xml_ncname!("node"), s.node.to_string())
            .attr(xml_ncname!("jid"), s.jid.clone())
            .attr(xml_ncname!("subid"), s.subid.clone())
            .child(s.options_form())
            .build();
        let payload = El::new("pubsub", NS_PUBSUB).child(opts).build();
        Ok(vec![xml::iq_result(iq, &ctx.cfg.pubsub_jid, Some(payload))])
    }

    /// `iq get` `<subscriptions [node]/>`: the requester's subscriptions.
    pub fn list(
        &self,
        ctx: &Ctx<'_>,
        iq: &Element,
        el: &Element,
    ) -> Result<Vec<Element>, StanzaError> {
        let node = match el.attr("node") {
            Some(n) => Some(self.resolve(ctx, Some(n), true)?),
            None => None,
        };
        let subs = self
            .subs
            .iter()
            .filter(|s| s.bare == ctx.from_bare && s.live(ctx.now))
            .filter(|s| node.as_ref().is_none_or(|n| *n == s.node))
            .map(|s| {
                El::new("subscription", NS_PUBSUB)
                    .attr(xml_ncname!("node"), s.node.to_string())
                    .attr(xml_ncname!("jid"), s.jid.clone())
                    .attr(xml_ncname!("subid"), s.subid.clone())
                    .attr(xml_ncname!("subscription"), s.state.as_str())
                    .build()
            });
        let list = El::new("subscriptions", NS_PUBSUB)
            .attr_opt(xml_ncname!("node"), node.as_ref().map(|n| n.to_string()))
            .children(subs)
            .build();
        let payload = El::new("pubsub", NS_PUBSUB).child(list).build();
        Ok(vec![xml::iq_result(iq, &ctx.cfg.pubsub_jid, Some(payload))])
    }

    /// `iq get` `<items node [max_items]/>`: one `<items/>` block per leaf.
    pub fn items(
        &self,
        ctx: &Ctx<'_>,
        iq: &Element,
        el: &Element,
    ) -> Result<Vec<Element>, StanzaError> {
        if !ctx.cfg.items_retrieval {
            return Err(
                bad(ErrorType::Cancel, "feature-not-implemented").unsupported("retrieve-items")
            );
        }
        let node = self.resolve(ctx, el.attr("node"), true)?;
        let forbidden =
            || bad(ErrorType::Auth, "forbidden").with_text("JID is not authorized for this node");
        let leaves: Vec<String> = match &node {
            Node::Leaf { .. } => {
                let a = node.address().ok_or_else(forbidden)?;
                if !ctx.auth.is_authorized(ctx.from_bare, &a, ctx.now) {
                    return Err(forbidden());
                }
                vec![a]
            }
            Node::Me(j) | Node::MeDomain(j, _) => {
                if j != ctx.from_bare {
                    return Err(forbidden());
                }
                ctx.auth
                    .addresses(j, ctx.now)
                    .into_iter()
                    .filter(|a| node.contains_address(a))
                    .collect()
            }
            Node::Root | Node::Domain(_) => return Err(forbidden()),
        };
        let max = el.attr("max_items").and_then(|m| m.parse::<usize>().ok());
        let blocks = leaves.iter().filter_map(|a| {
            let leaf = Node::leaf_of(a)?;
            let regs = self.items.get(a).map(Vec::as_slice).unwrap_or_default();
            let skip = max.map_or(0, |m| regs.len().saturating_sub(m));
            Some(
                El::new("items", NS_PUBSUB)
                    .attr(xml_ncname!("node"), leaf.to_string())
                    .children(regs.iter().skip(skip).map(|r| r.to_item(NS_PUBSUB)))
                    .build(),
            )
        });
        let payload = El::new("pubsub", NS_PUBSUB).children(blocks).build();
        Ok(vec![xml::iq_result(iq, &ctx.cfg.pubsub_jid, Some(payload))])
    }

    /// Store (or refresh) a registration and build the event messages.
    pub fn publish(
        &mut self,
        cfg: &SimConfig,
        auth: &AuthStore,
        address: &str,
        reg: Registration,
        now: DateTime<Utc>,
    ) -> Vec<Element> {
        let Some(leaf) = Node::leaf_of(address) else {
            tracing::warn!(address, "publish: not a user@domain SIP address");
            return Vec::new();
        };
        let item = reg.to_item(NS_PUBSUB_EVENT);
        let list = self.items.entry(address.to_owned()).or_default();
        list.retain(|r| r.item_id != reg.item_id);
        list.push(reg);
        self.fanout(cfg, auth, address, &leaf, item, now)
    }

    /// Remove a registration; if it existed, build the retract messages
    /// (`None`: no such item, nothing sent).
    pub fn retract(
        &mut self,
        cfg: &SimConfig,
        auth: &AuthStore,
        address: &str,
        item_id: &str,
        now: DateTime<Utc>,
    ) -> Option<Vec<Element>> {
        let leaf = Node::leaf_of(address)?;
        let list = self.items.get_mut(address)?;
        let before = list.len();
        list.retain(|r| r.item_id != item_id);
        if list.len() == before {
            return None;
        }
        if list.is_empty() {
            self.items.remove(address);
        }
        let retract = El::new("retract", NS_PUBSUB_EVENT)
            .attr(xml_ncname!("id"), item_id)
            .build();
        Some(self.fanout(cfg, auth, address, &leaf, retract, now))
    }

    fn fanout(
        &self,
        cfg: &SimConfig,
        auth: &AuthStore,
        address: &str,
        leaf: &Node,
        payload: Element,
        now: DateTime<Utc>,
    ) -> Vec<Element> {
        let mut seen: Vec<&str> = Vec::new();
        let mut out = Vec::new();
        for s in self.subs.iter().filter(|s| s.covers(address, auth, now)) {
            if cfg.one_message_per_jid {
                if seen.contains(&s.bare.as_str()) {
                    continue;
                }
                seen.push(&s.bare);
            }
            let items = El::new("items", NS_PUBSUB_EVENT)
                .attr(xml_ncname!("node"), leaf.to_string())
                .child(payload.clone())
                .build();
            let mut msg = El::new("message", NS_CLIENT)
                .attr(xml_ncname!("from"), cfg.pubsub_jid.clone())
                .attr(xml_ncname!("to"), s.bare.clone())
                .child(El::new("event", NS_PUBSUB_EVENT).child(items));
            if cfg.collection_header && s.node.is_collection() {
                msg = msg.child(
                    El::new("headers", NS_SHIM).child(
                        El::new("header", NS_SHIM)
                            .attr(xml_ncname!("name"), "Collection")
                            .text(s.node.to_string()),
                    ),
                );
            }
            out.push(msg.build());
        }
        out
    }
}

fn subscription_result(
    iq: &Element,
    cfg: &SimConfig,
    node: &str,
    jid: &str,
    subid: &str,
    state: &str,
) -> Element {
    let sub = El::new("subscription", NS_PUBSUB)
        .attr(xml_ncname!("node"), node)
        .attr(xml_ncname!("jid"), jid)
        .attr(xml_ncname!("subid"), subid)
        .attr(xml_ncname!("subscription"), state)
        .build();
    xml::iq_result(
        iq,
        &cfg.pubsub_jid,
        Some(El::new("pubsub", NS_PUBSUB).child(sub).build()),
    )
}

fn subscription_message(
    cfg: &SimConfig,
    to_bare: &str,
    node: &str,
    jid: &str,
    subid: &str,
    state: &str,
) -> Element {
    let sub = El::new("subscription", NS_PUBSUB_EVENT)
        .attr(xml_ncname!("node"), node)
        .attr(xml_ncname!("subscription"), state)
        .attr(xml_ncname!("jid"), jid)
        .attr(xml_ncname!("subid"), subid)
        .build();
    El::new("message", NS_CLIENT)
        .attr(xml_ncname!("from"), cfg.pubsub_jid.clone())
        .attr(xml_ncname!("to"), to_bare)
        .child(El::new("event", NS_PUBSUB_EVENT).child(sub))
        .build()
}
