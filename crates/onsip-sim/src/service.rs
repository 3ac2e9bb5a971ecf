//! The pure state machine of both OnSIP services: one stanza in (plus
//! `now`), the stanzas to send out. It routes an incoming stanza to the
//! authorization or the pubsub emulation by its `to`, answers the generic
//! bits (ping, disco, unknown requests) and keeps counters.
//!
//! Network faces and the [`crate::Simulator`] handle wrap this; tests drive
//! it directly with the seed's stanzas. Replies are built in `jabber:client`
//! (the component face rewrites them).

use chrono::{DateTime, Utc};
use minidom::Element;
use rxml::xml_ncname;

use crate::auth::{self, AuthOutcome, AuthRequest, AuthStore, AuthorizationInfo, Owners};
use crate::config::SimConfig;
use crate::pubsub::{Ctx, PubSub, PubsubOutcome, Registration, SubscribeAnswer, SubscriptionInfo};
use crate::xml::{
    self, El, ErrorType, StanzaError, NS_COMMANDS, NS_DISCO_INFO, NS_DISCO_ITEMS, NS_PING,
    NS_PUBSUB, NS_PUBSUB_OWNER,
};

/// How the next `authorize-plain` requests are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthorizeAnswer {
    /// Check the password.
    #[default]
    Normal,
    /// Refuse whatever the password (answered per [`crate::AuthErrorStyle`]).
    WrongPassword,
    /// Do not answer at all.
    Silent,
}

/// Counters of what the services saw and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Stanzas handed to the services.
    pub stanzas_in: u64,
    /// Stanzas dropped as malformed (no `id`, no usable `from`).
    pub malformed: u64,
    /// `authorize-plain` that authorized.
    pub authorize_ok: u64,
    /// `authorize-plain` refused (wrong password, unknown address, forced).
    pub authorize_refused: u64,
    /// `authorize-plain` left unanswered (`AuthorizeAnswer::Silent`).
    pub authorize_ignored: u64,
    /// Subscribe requests.
    pub subscribe_requests: u64,
    /// Subscriptions created.
    pub subscriptions_created: u64,
    /// Subscribe requests answered `none`.
    pub subscriptions_refused: u64,
    /// Unsubscribe requests answered with a result.
    pub unsubscribes: u64,
    /// Options (renew) requests answered with a result.
    pub renewals: u64,
    /// Subscription list requests.
    pub list_requests: u64,
    /// Items retrieval requests.
    pub items_requests: u64,
    /// Stanza errors sent.
    pub errors_sent: u64,
    /// Items published (registrations and refreshes).
    pub published: u64,
    /// Items retracted.
    pub retracted: u64,
    /// Event messages built (publish, retract).
    pub event_messages: u64,
    /// `type='error'` messages received: events the server could not
    /// deliver (no available resource, offline storage off) and bounced.
    pub bounces: u64,
}

/// Both services' state.
pub struct Service {
    cfg: SimConfig,
    owners: Owners,
    auth: AuthStore,
    pubsub: PubSub,
    subscribe_answer: SubscribeAnswer,
    authorize_answer: AuthorizeAnswer,
    stats: ServiceStats,
    next_id: u64,
}

enum Target {
    Auth,
    Pubsub,
}

impl Service {
    /// A fresh service: no authorizations, subscriptions or items.
    pub fn new(cfg: SimConfig) -> Self {
        let mut cfg = cfg;
        cfg.pubsub_jid = cfg.pubsub_jid.to_lowercase();
        cfg.auth_jid = cfg.auth_jid.to_lowercase();
        Service {
            owners: Owners::new(&cfg.accounts),
            cfg,
            auth: AuthStore::default(),
            pubsub: PubSub::default(),
            subscribe_answer: SubscribeAnswer::Normal,
            authorize_answer: AuthorizeAnswer::Normal,
            stats: ServiceStats::default(),
            next_id: 0,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    /// Is `jid` (bare or full) one of the two service JIDs?
    pub fn serves(&self, jid: &str) -> bool {
        self.target(jid).is_some()
    }

    fn target(&self, jid: &str) -> Option<Target> {
        let bare = xml::bare_jid(jid)?;
        if bare == self.cfg.pubsub_jid {
            Some(Target::Pubsub)
        } else if bare == self.cfg.auth_jid {
            Some(Target::Auth)
        } else {
            None
        }
    }

    /// Deterministic, opaque ids (subids, command sessions) shaped like
    /// OnSIP's (`548C825398B51`).
    fn fresh_id(&mut self) -> String {
        self.next_id += 1;
        // SplitMix64 step: spreads consecutive counters over the id space.
        let mut z = self.next_id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        format!("{:013X}", z & 0x000F_FFFF_FFFF_FFFF)
    }

    /// Switch how subscribe requests are answered from now on.
    pub fn set_subscribe_answer(&mut self, a: SubscribeAnswer) {
        self.subscribe_answer = a;
    }

    /// Switch how `authorize-plain` requests are answered from now on.
    pub fn set_authorize_answer(&mut self, a: AuthorizeAnswer) {
        self.authorize_answer = a;
    }

    /// Counters so far.
    pub fn stats(&self) -> ServiceStats {
        self.stats
    }

    /// Forget authorizations and subscriptions that lapsed before `now`.
    pub fn expire(&mut self, now: DateTime<Utc>) {
        self.auth.expire(now);
        self.pubsub.expire(now);
    }

    /// Drop the authorizations of one bare JID (or everyone's), as if they lapsed.
    pub fn revoke_authorizations(&mut self, bare_jid: Option<&str>) {
        let bare = bare_jid.and_then(xml::bare_jid);
        self.auth.revoke(bare.as_deref().or(bare_jid));
    }

    /// Live subscriptions at `now`, oldest first.
    pub fn subscriptions(&self, now: DateTime<Utc>) -> Vec<SubscriptionInfo> {
        self.pubsub.subscriptions(now)
    }

    /// Live authorizations at `now`.
    pub fn authorizations(&self, now: DateTime<Utc>) -> Vec<AuthorizationInfo> {
        self.auth.list(now)
    }

    /// Current items per address.
    pub fn registrations(&self) -> Vec<(String, Vec<Registration>)> {
        self.pubsub.all_registrations()
    }

    /// A phone registered or refreshed `address`: store the item and return
    /// the event messages for every subscription covering it.
    pub fn publish(
        &mut self,
        address: &str,
        reg: Registration,
        now: DateTime<Utc>,
    ) -> Vec<Element> {
        self.expire(now);
        let address = auth::normalize_address(address);
        self.stats.published += 1;
        let out = self
            .pubsub
            .publish(&self.cfg, &self.auth, &address, reg, now);
        self.stats.event_messages += out.len() as u64;
        out
    }

    /// A phone unregistered: drop the item and return the retract messages
    /// (none if the item was unknown).
    pub fn retract(&mut self, address: &str, item_id: &str, now: DateTime<Utc>) -> Vec<Element> {
        self.expire(now);
        let address = auth::normalize_address(address);
        let Some(out) = self
            .pubsub
            .retract(&self.cfg, &self.auth, &address, item_id, now)
        else {
            return Vec::new();
        };
        self.stats.retracted += 1;
        self.stats.event_messages += out.len() as u64;
        out
    }

    /// Handle one stanza addressed to either service. Stanzas for other
    /// JIDs, messages, presences, and iq results/errors produce nothing.
    pub fn handle(&mut self, stanza: &Element, now: DateTime<Utc>) -> Vec<Element> {
        self.expire(now);
        self.stats.stanzas_in += 1;
        let Some(target) = stanza.attr("to").and_then(|t| self.target(t)) else {
            return Vec::new();
        };
        if !xml::is_stanza(stanza, "iq") {
            if xml::is_stanza(stanza, "message") && stanza.attr("type") == Some("error") {
                self.stats.bounces += 1;
            }
            // Presence to the service, other messages: nothing to do.
            return Vec::new();
        }
        let from_bare = stanza.attr("from").and_then(xml::bare_jid);
        let (Some(from_bare), Some(_id)) = (from_bare, stanza.attr("id")) else {
            self.stats.malformed += 1;
            tracing::debug!("dropping iq without id or usable from");
            return Vec::new();
        };
        let service_jid = match target {
            Target::Auth => self.cfg.auth_jid.clone(),
            Target::Pubsub => self.cfg.pubsub_jid.clone(),
        };
        let kind = stanza.attr("type").unwrap_or_default();
        if kind == "result" || kind == "error" {
            return Vec::new();
        }
        let result = if kind != "get" && kind != "set" {
            Err(StanzaError::new(ErrorType::Modify, "bad-request").with_text("bad iq type"))
        } else if let Some(r) = self.common(stanza, &service_jid, &target) {
            Ok(r)
        } else {
            match target {
                Target::Auth => self.auth_iq(stanza, kind, now),
                Target::Pubsub => self.pubsub_iq(stanza, kind, &from_bare, now),
            }
        };
        match result {
            Ok(out) => out,
            Err(e) => {
                self.stats.errors_sent += 1;
                vec![xml::iq_error(stanza, &service_jid, &e)]
            }
        }
    }

    /// Ping and disco, same for both services.
    fn common(&self, iq: &Element, service_jid: &str, target: &Target) -> Option<Vec<Element>> {
        if iq.attr("type") != Some("get") {
            return None;
        }
        if iq.has_child("ping", NS_PING) {
            return Some(vec![xml::iq_result(iq, service_jid, None)]);
        }
        if let Some(q) = iq.get_child("query", NS_DISCO_INFO) {
            let (category, kind, name, features): (_, _, _, &[&str]) = match target {
                Target::Auth => (
                    "automation",
                    "command-list",
                    "OnSIP authorization",
                    &[NS_COMMANDS],
                ),
                Target::Pubsub => (
                    "pubsub",
                    "service",
                    "OnSIP user agents",
                    &[
                        NS_PUBSUB,
                        "http://jabber.org/protocol/pubsub#subscribe",
                        "http://jabber.org/protocol/pubsub#retrieve-subscriptions",
                        "http://jabber.org/protocol/pubsub#subscription-options",
                        "http://jabber.org/protocol/pubsub#collections",
                    ],
                ),
            };
            let mut query = El::new("query", NS_DISCO_INFO)
                .attr_opt(xml_ncname!("node"), q.attr("node"))
                .child(
                    El::new("identity", NS_DISCO_INFO)
                        .attr(xml_ncname!("category"), category)
                        .attr(xml_ncname!("type"), kind)
                        .attr(xml_ncname!("name"), name),
                )
                .child(El::new("feature", NS_DISCO_INFO).attr(xml_ncname!("var"), NS_DISCO_INFO))
                .children(features.iter().map(|f| {
                    El::new("feature", NS_DISCO_INFO)
                        .attr(xml_ncname!("var"), *f)
                        .build()
                }));
            if matches!(target, Target::Pubsub) && self.cfg.items_retrieval {
                query = query.child(El::new("feature", NS_DISCO_INFO).attr(
                    xml_ncname!("var"),
                    "http://jabber.org/protocol/pubsub#retrieve-items",
                ));
            }
            return Some(vec![xml::iq_result(iq, service_jid, Some(query.build()))]);
        }
        if let (Some(q), Target::Auth) = (iq.get_child("query", NS_DISCO_ITEMS), target) {
            let mut query =
                El::new("query", NS_DISCO_ITEMS).attr_opt(xml_ncname!("node"), q.attr("node"));
            if q.attr("node") == Some(NS_COMMANDS) {
                query = query.child(
                    El::new("item", NS_DISCO_ITEMS)
                        .attr(xml_ncname!("jid"), service_jid)
                        .attr(xml_ncname!("node"), auth::AUTHORIZE_NODE)
                        .attr(xml_ncname!("name"), "Authorize (plain)"),
                );
            }
            return Some(vec![xml::iq_result(iq, service_jid, Some(query.build()))]);
        }
        None
    }

    fn auth_iq(
        &mut self,
        iq: &Element,
        kind: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<Element>, StanzaError> {
        let command = match (kind, iq.get_child("command", NS_COMMANDS)) {
            ("set", Some(c)) => c,
            _ => return Err(StanzaError::new(ErrorType::Cancel, "service-unavailable")),
        };
        if self.authorize_answer == AuthorizeAnswer::Silent
            && command.attr("node") == Some(auth::AUTHORIZE_NODE)
        {
            self.stats.authorize_ignored += 1;
            return Ok(Vec::new());
        }
        let ttl =
            chrono::Duration::from_std(self.cfg.auth_ttl).unwrap_or(chrono::Duration::hours(1));
        let sessionid = self.fresh_id();
        let req = AuthRequest {
            service_jid: &self.cfg.auth_jid,
            ttl,
            error_style: self.cfg.auth_error,
            force_failure: self.authorize_answer == AuthorizeAnswer::WrongPassword,
            sessionid,
            now,
        };
        match auth::handle_command(iq, command, &self.owners, &mut self.auth, &req) {
            Ok((reply, outcome)) => {
                match outcome {
                    AuthOutcome::Authorized(_) => self.stats.authorize_ok += 1,
                    AuthOutcome::Refused => self.stats.authorize_refused += 1,
                    AuthOutcome::FormSent | AuthOutcome::Cancelled => {}
                }
                Ok(vec![reply])
            }
            Err(e) => {
                if e.condition == "not-authorized" {
                    self.stats.authorize_refused += 1;
                }
                Err(e)
            }
        }
    }

    fn pubsub_iq(
        &mut self,
        iq: &Element,
        kind: &str,
        from_bare: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<Element>, StanzaError> {
        if iq.has_child("pubsub", NS_PUBSUB_OWNER) {
            return Err(StanzaError::new(ErrorType::Auth, "forbidden"));
        }
        let Some(pubsub) = iq.get_child("pubsub", NS_PUBSUB) else {
            return Err(StanzaError::new(ErrorType::Cancel, "service-unavailable"));
        };
        let subid = self.fresh_id();
        let ctx = Ctx {
            cfg: &self.cfg,
            auth: &self.auth,
            answer: self.subscribe_answer,
            now,
            from_bare,
        };
        let child = |name: &str| pubsub.get_child(name, NS_PUBSUB);
        let not_impl = || StanzaError::new(ErrorType::Cancel, "feature-not-implemented");
        match kind {
            "set" => {
                if let Some(sub) = child("subscribe") {
                    self.stats.subscribe_requests += 1;
                    let (out, outcome) = self.pubsub.subscribe(&ctx, iq, pubsub, sub, subid)?;
                    match outcome {
                        PubsubOutcome::Subscribed => self.stats.subscriptions_created += 1,
                        PubsubOutcome::Refused => self.stats.subscriptions_refused += 1,
                        PubsubOutcome::Other => {}
                    }
                    Ok(out)
                } else if let Some(u) = child("unsubscribe") {
                    let out = self.pubsub.unsubscribe(&ctx, iq, u)?;
                    self.stats.unsubscribes += 1;
                    Ok(out)
                } else if let Some(o) = child("options") {
                    let out = self.pubsub.set_options(&ctx, iq, o)?;
                    self.stats.renewals += 1;
                    Ok(out)
                } else if child("publish").is_some() || child("retract").is_some() {
                    Err(StanzaError::new(ErrorType::Auth, "forbidden")
                        .with_text("only OnSIP publishes here"))
                } else {
                    Err(not_impl())
                }
            }
            _ => {
                if let Some(l) = child("subscriptions") {
                    self.stats.list_requests += 1;
                    self.pubsub.list(&ctx, iq, l)
                } else if let Some(i) = child("items") {
                    self.stats.items_requests += 1;
                    self.pubsub.items(&ctx, iq, i)
                } else if let Some(o) = child("options") {
                    self.pubsub.get_options(&ctx, iq, o)
                } else {
                    Err(not_impl())
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
