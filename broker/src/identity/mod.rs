//! Who is calling: every request resolves to one [`Caller`] before anything else happens.
//!
//! Sources, in order: an API key in `Authorization: Bearer` (checked in constant time against
//! stored hashes), else the tailnet identity of the connection's real peer address (tailscaled
//! WhoIs). On the mTLS listener the verified client certificate is the identity (see
//! `crate::tls`). Nothing downstream trusts a header for identity.

pub mod admin;
pub mod api_key;
pub mod config;
pub mod tailnet;

use std::collections::BTreeMap;
use std::net::SocketAddr;

/// The authenticated caller of one request.
#[derive(Clone, Debug, PartialEq)]
pub struct Caller {
    /// The connection's real peer address.
    pub address: SocketAddr,
    pub via: CallerVia,
}

#[derive(Clone, Debug, PartialEq)]
pub enum CallerVia {
    /// A tailnet node, as tailscaled's WhoIs describes it.
    Tailnet(TailnetIdentity),
    /// A pre-shared API key configured for the named bot.
    ApiKey { bot: String },
    /// A client certificate issued by the broker's CA (`botcreds://bot/NAME`), checked
    /// against its record on every request.
    Mtls {
        bot: String,
        /// Serial number, lower-case hex.
        serial: String,
        /// Whether it carries the admin role (`botcreds://role/admin`).
        admin: bool,
    },
}

/// What WhoIs tells about a tailnet peer.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct TailnetIdentity {
    /// Stable node id, e.g. `nQ4wFz5tK21CNTRL`: the best key for audit logs.
    pub stable_id: String,
    /// MagicDNS FQDN without the trailing dot, e.g. `ci-bot-07.tail3f9c2.ts.net`.
    pub node_name: String,
    /// MagicDNS short name (`ComputedName`), e.g. `ci-bot-07`.
    pub computed_name: String,
    /// ACL tags (`tag:ci`); non-empty means a tagged node, whose identity is its tags.
    pub tags: Vec<String>,
    /// Owner login (`alice@example.com`); `tagged-devices` for tagged nodes.
    pub login: String,
    /// Grant capabilities from the tailnet policy (`CapMap`): name → values.
    pub capabilities: BTreeMap<String, Vec<serde_json::Value>>,
    /// The node is not of the broker's own tailnet: shared in (`Node.Sharer`,
    /// `Hostinfo.ShareeNode`), or its MagicDNS name is outside the broker node's MagicDNS
    /// suffix. Its short name says nothing about which of our hosts it is.
    pub foreign: bool,
    /// The node is the broker's own (the peer address is one of its tailnet addresses): a
    /// local user of the broker's host, who must not inherit the node's identity.
    pub own_node: bool,
}

impl TailnetIdentity {
    pub fn is_tagged(&self) -> bool {
        !self.tags.is_empty()
    }
}

impl Caller {
    /// A short description for logs and audit: `tailnet:ci-bot-07 (nQ4w...)`, `api_key:ci-helper`.
    pub fn describe(&self) -> String {
        match &self.via {
            CallerVia::Tailnet(t) => format!("tailnet:{} ({})", t.computed_name, t.stable_id),
            CallerVia::ApiKey { bot } => format!("api_key:{bot}"),
            CallerVia::Mtls { bot, serial, .. } => format!("mtls:{bot} ({serial})"),
        }
    }
}
