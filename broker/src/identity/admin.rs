//! Who is an admin: tailnet users, tags or a grant capability named in `[admin]`, a bot
//! whose API key `[admin] api_key_bots` lists, or a client certificate with the admin role.
//! Admins decide approvals and manage keys.

use super::config::AdminConfig;
use super::{Caller, CallerVia};

/// Whether `caller` may use the admin routes.
pub fn is_admin(config: &AdminConfig, caller: &Caller) -> bool {
    match &caller.via {
        CallerVia::ApiKey { bot } => config.api_key_bots.iter().any(|b| b == bot),
        // The role is set by the broker's CA from the join token, never asked for in a CSR.
        CallerVia::Mtls { admin, .. } => *admin,
        // A caller on the broker's own node is never an admin by the node's identity, even
        // with `[tailscale] trust_own_node`: any local user could be it.
        CallerVia::Tailnet(node) if node.own_node => false,
        CallerVia::Tailnet(node) => {
            if node.is_tagged() {
                // A tagged node's identity is its tags; its owner login is a pseudo-user.
                if node.tags.iter().any(|t| config.tags.contains(t)) {
                    return true;
                }
            } else if config
                .users
                .iter()
                .any(|u| u.eq_ignore_ascii_case(&node.login))
            {
                return true;
            }
            config
                .capability
                .as_ref()
                .is_some_and(|cap| node.capabilities.contains_key(cap))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::TailnetIdentity;

    fn tailnet(login: &str, tags: &[&str], caps: &[&str]) -> Caller {
        Caller {
            address: "100.64.0.9:4000".parse().unwrap(),
            via: CallerVia::Tailnet(TailnetIdentity {
                login: login.into(),
                tags: tags.iter().map(|t| t.to_string()).collect(),
                capabilities: caps.iter().map(|c| (c.to_string(), vec![])).collect(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn table() {
        let config = AdminConfig {
            users: vec!["alice@example.com".into()],
            tags: vec!["tag:admin".into()],
            capability: Some("example.com/cap/botcreds-admin".into()),
            api_key_bots: vec!["ops".into()],
        };
        let key = |bot: &str| Caller {
            address: "127.0.0.1:1".parse().unwrap(),
            via: CallerVia::ApiKey { bot: bot.into() },
        };
        let cert = |bot: &str, admin: bool| Caller {
            address: "127.0.0.1:1".parse().unwrap(),
            via: CallerVia::Mtls {
                bot: bot.into(),
                serial: "40aa".into(),
                admin,
            },
        };
        let cases = [
            (tailnet("Alice@Example.com", &[], &[]), true),
            (tailnet("bob@example.com", &[], &[]), false),
            (tailnet("tagged-devices", &["tag:admin"], &[]), true),
            (tailnet("tagged-devices", &["tag:ci"], &[]), false),
            // A tagged node never counts as its (pseudo-)owner.
            (tailnet("alice@example.com", &["tag:ci"], &[]), false),
            (
                tailnet("bob@example.com", &[], &["example.com/cap/botcreds-admin"]),
                true,
            ),
            (key("ops"), true),
            (key("ci"), false),
            (cert("ops", true), true),
            (cert("ci", false), false),
            // own_node_inherits_admin: a local user of the broker's host is not its admin owner.
            (
                Caller {
                    via: CallerVia::Tailnet(TailnetIdentity {
                        login: "alice@example.com".into(),
                        own_node: true,
                        ..Default::default()
                    }),
                    ..tailnet("x", &[], &[])
                },
                false,
            ),
        ];
        for (i, (caller, want)) in cases.iter().enumerate() {
            assert_eq!(is_admin(&config, caller), *want, "case {i}");
        }
        assert!(!is_admin(
            &AdminConfig::default(),
            &tailnet("alice@example.com", &[], &[])
        ));
    }
}
