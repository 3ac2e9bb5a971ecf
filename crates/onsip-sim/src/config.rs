//! The simulator's configuration: the service JIDs, the accounts it knows,
//! and the switches that choose between behaviours OnSIP's documentation
//! leaves open (pending vs direct `subscribed`, redirect style, how a failed
//! authorization is answered, whether items retrieval is served).

use std::time::Duration;

/// One OnSIP customer account: the owner of some SIP addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Bare XMPP JID this account logs in with on the c2s face
    /// (`alice@example.com`).
    pub jid: String,
    /// SIP addresses (`user@sip-domain`) this account owns.
    pub sip_addresses: Vec<String>,
    /// Web-portal password, checked by `authorize-plain`.
    pub web_password: String,
    /// XMPP password, checked by the c2s face's SASL PLAIN.
    pub xmpp_password: String,
}

/// How `/` and `/<sip-domain>` subscriptions are redirected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RedirectStyle {
    /// Treat the request as made to the redirected node and answer with the
    /// redirected node's name (what OnSIP's page describes).
    #[default]
    Follow,
    /// Answer an XEP-0060 `<redirect/>` stanza error carrying
    /// `xmpp:<pubsub-jid>?;node=<redirected node>`.
    Error,
}

/// How a failed `authorize-plain` is answered (OnSIP's clients saw both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthErrorStyle {
    /// `iq type='result'` with a `completed` command holding
    /// `<note type='error'>`.
    #[default]
    Note,
    /// `iq type='error'` with `<not-authorized/>`.
    IqError,
}

/// Simulator configuration. Start from [`SimConfig::new`] and adjust fields.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The XMPP domain users log in to (`example.com`). The c2s face serves it.
    pub xmpp_domain: String,
    /// JID of the User-Agent PubSub service (`pubsub.user-agents.<domain>`).
    pub pubsub_jid: String,
    /// JID of the authorization command service (`commands.auth.<domain>`).
    pub auth_jid: String,
    /// Lifetime of an authorization (OnSIP: about an hour).
    pub auth_ttl: Duration,
    /// Known accounts.
    pub accounts: Vec<Account>,
    /// Serve XEP-0060 items retrieval; when `false` answer
    /// `feature-not-implemented` (OnSIP may not serve it).
    pub items_retrieval: bool,
    /// Behave like a generic XEP-0060 service: `subscribed` (or an error)
    /// directly in the iq result, no follow-up `<message/>`.
    pub direct_subscribed: bool,
    /// How `/` and `/<sip-domain>` are redirected.
    pub redirect: RedirectStyle,
    /// How a failed authorization is answered.
    pub auth_error: AuthErrorStyle,
    /// Live subscriptions allowed per node per bare JID (OnSIP: 10).
    pub max_subscriptions_per_node: usize,
    /// Lifetime of a subscription whose options carry no `pubsub#expire`.
    /// `None`: until unsubscribed (OnSIP's default is undocumented).
    pub default_subscription_ttl: Option<Duration>,
    /// Add a SHIM `Collection` header naming the subscribed collection node
    /// to events delivered through a `/me/...` subscription.
    pub collection_header: bool,
    /// Send one event message per subscriber bare JID instead of one per
    /// subscription (XEP-0060 sends one per subscription).
    pub one_message_per_jid: bool,
}

impl SimConfig {
    /// Defaults for `xmpp_domain`: service JIDs `pubsub.user-agents.<domain>`
    /// and `commands.auth.<domain>`, 1 h authorizations, OnSIP's behaviour
    /// (pending then `subscribed`, 10 subscriptions per node), items
    /// retrieval served, no accounts.
    pub fn new(xmpp_domain: &str) -> Self {
        let domain = xmpp_domain.to_lowercase();
        SimConfig {
            pubsub_jid: format!("pubsub.user-agents.{domain}"),
            auth_jid: format!("commands.auth.{domain}"),
            xmpp_domain: domain,
            auth_ttl: Duration::from_secs(3600),
            accounts: Vec::new(),
            items_retrieval: true,
            direct_subscribed: false,
            redirect: RedirectStyle::Follow,
            auth_error: AuthErrorStyle::Note,
            max_subscriptions_per_node: 10,
            default_subscription_ttl: None,
            collection_header: true,
            one_message_per_jid: false,
        }
    }

    /// Add an account (builder style).
    pub fn with_account(mut self, account: Account) -> Self {
        self.accounts.push(account);
        self
    }
}

impl Account {
    /// An account whose XMPP and web passwords are the same.
    pub fn new(jid: &str, sip_addresses: &[&str], password: &str) -> Self {
        Account {
            jid: jid.to_lowercase(),
            sip_addresses: sip_addresses.iter().map(|a| a.to_lowercase()).collect(),
            web_password: password.to_owned(),
            xmpp_password: password.to_owned(),
        }
    }
}
