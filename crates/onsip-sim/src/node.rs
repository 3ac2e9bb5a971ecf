//! OnSIP User-Agent PubSub node names: parsing, redirects and which SIP
//! addresses a node covers.
//!
//! The tree, from OnSIP's page: `/me/<jid>` (every address `<jid>` is
//! authorized for), `/me/<jid>/<sip-domain>` (those in one domain) and the
//! leaves `/<sip-domain>/<sip-user>`. `/` redirects to `/me/<jid>` and
//! `/<sip-domain>` to `/me/<jid>/<sip-domain>`.

use std::fmt;

/// A parsed node name. Every part is lower-case.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Node {
    /// `/`: redirected to `/me/<jid>`.
    Root,
    /// `/<sip-domain>`: redirected to `/me/<jid>/<sip-domain>`.
    Domain(String),
    /// `/me/<jid>`: collection of every address `<jid>` is authorized for.
    Me(String),
    /// `/me/<jid>/<sip-domain>`: collection of those in `<sip-domain>`.
    MeDomain(String, String),
    /// `/<sip-domain>/<sip-user>`: one SIP address's user agents.
    Leaf {
        /// SIP domain.
        domain: String,
        /// SIP user.
        user: String,
    },
}

impl Node {
    /// Parse a node name; `None` if it is not one of OnSIP's shapes.
    pub fn parse(name: &str) -> Option<Node> {
        let rest = name.strip_prefix('/')?;
        if rest.is_empty() {
            return Some(Node::Root);
        }
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return None;
        }
        let lower = |s: &str| s.to_lowercase();
        match parts.as_slice() {
            ["me"] => None,
            ["me", jid] => valid_bare_jid(jid).then(|| Node::Me(lower(jid))),
            ["me", jid, domain] => {
                valid_bare_jid(jid).then(|| Node::MeDomain(lower(jid), lower(domain)))
            }
            [domain] => Some(Node::Domain(lower(domain))),
            [domain, user] => Some(Node::Leaf {
                domain: lower(domain),
                user: lower(user),
            }),
            _ => None,
        }
    }

    /// The leaf node of SIP address `user@domain`.
    pub fn leaf_of(address: &str) -> Option<Node> {
        let (user, domain) = address.split_once('@')?;
        if user.is_empty() || domain.is_empty() || domain.contains('/') || user.contains('/') {
            return None;
        }
        Some(Node::Leaf {
            domain: domain.to_lowercase(),
            user: user.to_lowercase(),
        })
    }

    /// Where OnSIP redirects this node for subscriber `bare_jid`, if it does.
    pub fn redirect(&self, bare_jid: &str) -> Option<Node> {
        match self {
            Node::Root => Some(Node::Me(bare_jid.to_owned())),
            Node::Domain(d) => Some(Node::MeDomain(bare_jid.to_owned(), d.clone())),
            _ => None,
        }
    }

    /// `true` for the `/me/...` collection nodes.
    pub fn is_collection(&self) -> bool {
        matches!(
            self,
            Node::Me(_) | Node::MeDomain(..) | Node::Root | Node::Domain(_)
        )
    }

    /// The SIP address of a leaf.
    pub fn address(&self) -> Option<String> {
        match self {
            Node::Leaf { domain, user } => Some(format!("{user}@{domain}")),
            _ => None,
        }
    }

    /// Does this (resolved) node contain the leaf of `address`, ignoring
    /// authorization? `/me/<jid>` contains every address.
    pub fn contains_address(&self, address: &str) -> bool {
        let Some((user, domain)) = address.split_once('@') else {
            return false;
        };
        match self {
            Node::Me(_) => true,
            Node::MeDomain(_, d) => d == domain,
            Node::Leaf { domain: d, user: u } => d == domain && u == user,
            Node::Root | Node::Domain(_) => false,
        }
    }
}

fn valid_bare_jid(s: &str) -> bool {
    matches!(jid::Jid::new(s), Ok(j) if j.is_bare())
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Node::Root => f.write_str("/"),
            Node::Domain(d) => write!(f, "/{d}"),
            Node::Me(j) => write!(f, "/me/{j}"),
            Node::MeDomain(j, d) => write!(f, "/me/{j}/{d}"),
            Node::Leaf { domain, user } => write!(f, "/{domain}/{user}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_seed_nodes() {
        assert_eq!(
            Node::parse("/me/foo@example.com"),
            Some(Node::Me("foo@example.com".into()))
        );
        assert_eq!(
            Node::parse("/me/foo@example.com/example.com"),
            Some(Node::MeDomain(
                "foo@example.com".into(),
                "example.com".into()
            ))
        );
        assert_eq!(
            Node::parse("/example.com/foo"),
            Some(Node::Leaf {
                domain: "example.com".into(),
                user: "foo".into()
            })
        );
        assert_eq!(Node::parse("/"), Some(Node::Root));
        assert_eq!(
            Node::parse("/acme.com"),
            Some(Node::Domain("acme.com".into()))
        );
    }

    #[test]
    fn rejects_other_shapes() {
        for bad in [
            "",
            "me",
            "/me",
            "/me/",
            "/a/b/c",
            "//",
            "/me/a@b/c/d",
            "/me/a@b/res/x",
        ] {
            assert_eq!(Node::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn redirects_root_and_domain() {
        assert_eq!(
            Node::Root
                .redirect("foo@example.com")
                .map(|n| n.to_string()),
            Some("/me/foo@example.com".into())
        );
        assert_eq!(
            Node::Domain("acme.com".into())
                .redirect("foo@example.com")
                .map(|n| n.to_string()),
            Some("/me/foo@example.com/acme.com".into())
        );
        assert_eq!(Node::Me("a@b".into()).redirect("a@b"), None);
    }

    #[test]
    fn round_trips_names() {
        for n in [
            "/me/foo@example.com",
            "/me/foo@example.com/acme.com",
            "/acme.com/manager",
        ] {
            assert_eq!(Node::parse(n).map(|n| n.to_string()).as_deref(), Some(n));
        }
    }
}
