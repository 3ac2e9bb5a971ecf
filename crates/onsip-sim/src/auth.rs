//! Pure emulation of `commands.auth.<domain>`: the XEP-0050 `authorize-plain`
//! command, and the per-JID store of authorizations with their expiry that
//! the pubsub service consults.
//!
//! No I/O and no clock: every call takes `now`.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, SecondsFormat, Utc};
use minidom::Element;
use rxml::xml_ncname;

use crate::config::{Account, AuthErrorStyle};
use crate::xml::{self, El, ErrorType, Form, StanzaError, NS_COMMANDS, NS_DATA};

/// The one command node the service offers.
pub const AUTHORIZE_NODE: &str = "authorize-plain";

/// A live authorization: `jid` may receive events of `address` until `expires`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizationInfo {
    /// Bare JID that was authorized.
    pub jid: String,
    /// SIP address it was authorized for.
    pub address: String,
    /// When the authorization lapses.
    pub expires: DateTime<Utc>,
}

/// Authorizations per bare JID, each address with its own deadline.
#[derive(Debug, Default)]
pub struct AuthStore {
    by_jid: HashMap<String, BTreeMap<String, DateTime<Utc>>>,
    /// The earliest expiry held: `expire` has nothing to drop before it.
    /// The service calls `expire` on every publish; without this it walked
    /// every authorized address each time (O(addresses) per event).
    earliest: Option<DateTime<Utc>>,
}

impl AuthStore {
    /// Authorize `bare_jid` for `addresses` until `expires` (extends or
    /// shortens any earlier authorization of the same pair).
    pub fn authorize(&mut self, bare_jid: &str, addresses: &[String], expires: DateTime<Utc>) {
        let entry = self.by_jid.entry(bare_jid.to_owned()).or_default();
        for a in addresses {
            entry.insert(a.clone(), expires);
        }
        if !addresses.is_empty() {
            self.earliest = Some(self.earliest.map_or(expires, |e| e.min(expires)));
        }
    }

    /// Is `bare_jid` authorized for `address` at `now`?
    pub fn is_authorized(&self, bare_jid: &str, address: &str, now: DateTime<Utc>) -> bool {
        self.by_jid
            .get(bare_jid)
            .and_then(|m| m.get(address))
            .is_some_and(|exp| *exp > now)
    }

    /// Addresses `bare_jid` is authorized for at `now`, sorted.
    pub fn addresses(&self, bare_jid: &str, now: DateTime<Utc>) -> Vec<String> {
        self.by_jid
            .get(bare_jid)
            .map(|m| {
                m.iter()
                    .filter(|(_, exp)| **exp > now)
                    .map(|(a, _)| a.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Forget lapsed authorizations.
    pub fn expire(&mut self, now: DateTime<Utc>) {
        if self.earliest.is_none_or(|e| e > now) {
            return;
        }
        self.by_jid.retain(|_, m| {
            m.retain(|_, exp| *exp > now);
            !m.is_empty()
        });
        self.earliest = self.by_jid.values().flat_map(|m| m.values()).min().copied();
    }

    /// Drop the authorizations of one bare JID, or of everyone.
    pub fn revoke(&mut self, bare_jid: Option<&str>) {
        match bare_jid {
            Some(j) => {
                self.by_jid.remove(j);
            }
            None => self.by_jid.clear(),
        }
    }

    /// Every live authorization, sorted by JID then address.
    pub fn list(&self, now: DateTime<Utc>) -> Vec<AuthorizationInfo> {
        let mut out: Vec<AuthorizationInfo> = self
            .by_jid
            .iter()
            .flat_map(|(jid, m)| {
                m.iter()
                    .filter(|(_, exp)| **exp > now)
                    .map(move |(address, expires)| AuthorizationInfo {
                        jid: jid.clone(),
                        address: address.clone(),
                        expires: *expires,
                    })
            })
            .collect();
        out.sort_by(|a, b| (&a.jid, &a.address).cmp(&(&b.jid, &b.address)));
        out
    }
}

/// What an `authorize-plain` request came to, for counters and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    /// Authorized these addresses.
    Authorized(Vec<String>),
    /// Refused (wrong password, unknown address, forced failure).
    Refused,
    /// First step of the command: the blank form was sent.
    FormSent,
    /// The client cancelled the command.
    Cancelled,
}

/// Normalise a SIP address as typed by a user: drop `sip:`, lower-case.
pub fn normalize_address(raw: &str) -> String {
    let t = raw.trim();
    let t = t
        .strip_prefix("sip:")
        .or_else(|| t.strip_prefix("SIP:"))
        .unwrap_or(t);
    t.to_lowercase()
}

/// Owner lookup for authorization: address → account.
pub struct Owners {
    accounts: Vec<Account>,
    by_address: HashMap<String, usize>,
}

impl Owners {
    /// Index `accounts` by their SIP addresses (first owner wins on duplicates).
    pub fn new(accounts: &[Account]) -> Self {
        let mut by_address = HashMap::new();
        for (i, a) in accounts.iter().enumerate() {
            for addr in &a.sip_addresses {
                by_address.entry(normalize_address(addr)).or_insert(i);
            }
        }
        Owners {
            accounts: accounts.to_vec(),
            by_address,
        }
    }

    /// Owner of `address`.
    pub fn owner(&self, address: &str) -> Option<&Account> {
        self.by_address
            .get(address)
            .and_then(|i| self.accounts.get(*i))
    }

    /// All accounts.
    pub fn accounts(&self) -> &[Account] {
        &self.accounts
    }
}

/// Inputs of one `authorize-plain` execution besides the iq itself.
pub struct AuthRequest<'a> {
    /// The auth service's JID (the `from` of replies).
    pub service_jid: &'a str,
    /// Lifetime of a new authorization.
    pub ttl: chrono::Duration,
    /// How a refusal is answered.
    pub error_style: AuthErrorStyle,
    /// Refuse whatever the password.
    pub force_failure: bool,
    /// Command session id to hand out.
    pub sessionid: String,
    /// Current time.
    pub now: DateTime<Utc>,
}

/// Handle an `iq type='set'` carrying a `<command/>`. Returns the reply and
/// what happened; `Err` is a stanza error for the caller to send.
pub fn handle_command(
    iq: &Element,
    command: &Element,
    owners: &Owners,
    store: &mut AuthStore,
    req: &AuthRequest<'_>,
) -> Result<(Element, AuthOutcome), StanzaError> {
    if command.attr("node") != Some(AUTHORIZE_NODE) {
        return Err(
            StanzaError::new(ErrorType::Cancel, "item-not-found").with_text("unknown command node")
        );
    }
    let sessionid = command
        .attr("sessionid")
        .map(str::to_owned)
        .unwrap_or_else(|| req.sessionid.clone());
    let action = command.attr("action").unwrap_or("execute");
    if action == "cancel" {
        let reply = command_reply(&sessionid, "canceled", Vec::new());
        return Ok((
            xml::iq_result(iq, req.service_jid, Some(reply)),
            AuthOutcome::Cancelled,
        ));
    }
    let form = match Form::from_parent(command) {
        Some(f) if f.form_type == "submit" => f,
        // XEP-0050 first step: no form yet, hand out the blank one.
        _ => return Ok((blank_form_reply(iq, req, &sessionid), AuthOutcome::FormSent)),
    };

    let (Some(raw_address), Some(password)) = (form.value("sip-address"), form.value("password"))
    else {
        return Err(StanzaError::new(ErrorType::Modify, "bad-request")
            .with_text("sip-address and password are required"));
    };
    let address = normalize_address(raw_address);
    let target = match form.value("jid").filter(|j| !j.is_empty()) {
        Some(j) => xml::bare_jid(j).ok_or_else(|| {
            StanzaError::new(ErrorType::Modify, "jid-malformed").with_text("bad jid field")
        })?,
        None => iq
            .attr("from")
            .and_then(xml::bare_jid)
            .ok_or_else(|| StanzaError::new(ErrorType::Modify, "bad-request"))?,
    };

    let owner = owners
        .owner(&address)
        .filter(|o| o.web_password == password && !req.force_failure);
    let Some(owner) = owner else {
        return refusal(iq, req, &sessionid, &address);
    };

    let addresses: Vec<String> = if form.flag("auth-for-all") {
        let mut all: Vec<String> = owner
            .sip_addresses
            .iter()
            .map(|a| normalize_address(a))
            .collect();
        all.sort();
        all.dedup();
        all
    } else {
        vec![address]
    };
    let expires = req.now + req.ttl;
    store.authorize(&target, &addresses, expires);

    let expires_s = expires.to_rfc3339_opts(SecondsFormat::Secs, true);
    let note = format!(
        "JID '{target}' has been authorized to access resources for SIP Address(es) '{}' until {expires_s}",
        addresses.join(", ")
    );
    let mut x = El::new("x", NS_DATA)
        .attr(xml_ncname!("type"), "result")
        .child(xml::form_field("expires", Some("fixed"), &[&expires_s]));
    for a in &addresses {
        x = x.child(xml::form_field("sip", Some("fixed"), &[a]));
    }
    let reply = command_reply(
        &sessionid,
        "completed",
        vec![
            El::new("note", NS_COMMANDS)
                .attr(xml_ncname!("type"), "info")
                .text(note)
                .build(),
            x.build(),
        ],
    );
    Ok((
        xml::iq_result(iq, req.service_jid, Some(reply)),
        AuthOutcome::Authorized(addresses),
    ))
}

fn refusal(
    iq: &Element,
    req: &AuthRequest<'_>,
    sessionid: &str,
    address: &str,
) -> Result<(Element, AuthOutcome), StanzaError> {
    let text = format!(
        "Authorization failed for SIP Address '{address}': wrong password or unknown address"
    );
    match req.error_style {
        AuthErrorStyle::IqError => {
            Err(StanzaError::new(ErrorType::Auth, "not-authorized").with_text(text))
        }
        AuthErrorStyle::Note => {
            let reply = command_reply(
                sessionid,
                "completed",
                vec![El::new("note", NS_COMMANDS)
                    .attr(xml_ncname!("type"), "error")
                    .text(text)
                    .build()],
            );
            Ok((
                xml::iq_result(iq, req.service_jid, Some(reply)),
                AuthOutcome::Refused,
            ))
        }
    }
}

fn command_reply(sessionid: &str, status: &str, children: Vec<Element>) -> Element {
    El::new("command", NS_COMMANDS)
        .attr(xml_ncname!("node"), AUTHORIZE_NODE)
        .attr(xml_ncname!("sessionid"), sessionid)
        .attr(xml_ncname!("status"), status)
        .children(children)
        .build()
}

fn blank_form_reply(iq: &Element, req: &AuthRequest<'_>, sessionid: &str) -> Element {
    let field = |var: &str, t: &str, label: &str| {
        El::new("field", NS_DATA)
            .attr(xml_ncname!("var"), var)
            .attr(xml_ncname!("type"), t)
            .attr(xml_ncname!("label"), label)
            .build()
    };
    let x = El::new("x", NS_DATA)
        .attr(xml_ncname!("type"), "form")
        .child(El::new("title", NS_DATA).text("Authorize a JID for SIP addresses"))
        .child(field("sip-address", "text-single", "SIP Address"))
        .child(field("password", "text-private", "Password"))
        .child(field("jid", "jid-single", "JID to authorize"))
        .child(field(
            "auth-for-all",
            "boolean",
            "Authorize all addresses of this owner",
        ))
        .build();
    let actions = El::new("actions", NS_COMMANDS)
        .attr(xml_ncname!("execute"), "complete")
        .child(El::new("complete", NS_COMMANDS))
        .build();
    let cmd = El::new("command", NS_COMMANDS)
        .attr(xml_ncname!("node"), AUTHORIZE_NODE)
        .attr(xml_ncname!("sessionid"), sessionid)
        .attr(xml_ncname!("status"), "executing")
        .child(actions)
        .child(x)
        .build();
    xml::iq_result(iq, req.service_jid, Some(cmd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0)
            .single()
            .expect("valid time")
    }

    #[test]
    fn store_expires_and_lists() {
        let mut s = AuthStore::default();
        let t = now();
        s.authorize(
            "a@x",
            &["u@d".into(), "v@d".into()],
            t + chrono::Duration::seconds(10),
        );
        assert!(s.is_authorized("a@x", "u@d", t));
        assert!(!s.is_authorized("b@x", "u@d", t));
        assert_eq!(
            s.addresses("a@x", t),
            vec!["u@d".to_string(), "v@d".to_string()]
        );
        assert_eq!(s.list(t).len(), 2);
        let later = t + chrono::Duration::seconds(10);
        assert!(!s.is_authorized("a@x", "u@d", later));
        s.expire(later);
        assert!(s.list(later).is_empty());
    }

    #[test]
    fn normalizes_addresses() {
        assert_eq!(
            normalize_address(" sip:Foo@Example.COM "),
            "foo@example.com"
        );
    }
}
