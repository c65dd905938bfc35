//! A faithful double of tailscaled's LocalAPI `whois` on a Unix socket, as described in
//! `../shared/reference/tailscale-localapi.md`: the broker asks it who is behind a tailnet address.
//!
//! # Quick start
//! ```no_run
//! # async fn demo() {
//! use botcreds_tests::fake_tailscaled::{FakeTailscaled, NodeBuilder, WhoIsBody};
//! let tailscaled = FakeTailscaled::start().await;
//! // The tagged CI bot of the fixtures, served byte-for-byte:
//! tailscaled.add_node("100.101.102.103".parse().unwrap(), WhoIsBody::fixture("whois-tagged-bot.json"));
//! // A generated node in tailscaled's exact output format:
//! let body = NodeBuilder::new("review-bot")
//!     .tags(["tag:bots"])
//!     .capability("example.com/cap/credbroker", [serde_json::json!({"github": {"repos": ["acme-corp/web"]}})])
//!     .build();
//! tailscaled.add_node_at_addresses(body);
//! // Give the broker `tailscaled.socket_path()` as its LocalAPI socket.
//! # }
//! ```
//!
//! # What it answers
//! Any method (tailscaled does not check it), HTTP/1.1:
//! - `Host` other than `local-tailscaled.sock` (or empty), or any `Origin`/`Referer` header:
//!   `403 invalid localapi request`.
//! - `X-Tailscale-Reason` that is not standard base64: `400 invalid reason header`.
//! - A path outside `/localapi/v0/`, or an unknown endpoint under it: `404 404 page not found`.
//! - `/localapi/v0/whois?addr=A` with `A` an IP, `IP:port`, `[IPv6]:port` (IPv4-mapped IPv6 is
//!   unmapped; the port is ignored) or `nodekey:<64 hex>`, percent-encoded or not:
//!   `200` with the node's body and `Content-Type: application/json`; no such node:
//!   `404 no match for IP:port`; no or empty `addr`: `400 missing 'addr' parameter`; unparsable:
//!   `400 invalid 'addr' parameter`; bad node key: `400 invalid nodekey in 'addr' parameter`.
//!
//! - `/localapi/v0/status` (`?peers=false` or not; the fake has no peers): `200` with an
//!   `ipnstate.Status` for the node set by [`FakeTailscaled::set_self`] (Go's
//!   `json.Encoder` with tab indentation and a trailing newline); without one, the logged-out
//!   shape (`BackendState: "NeedsLogin"`, empty `Self.DNSName`, `CertDomains: null`).
//! - `/localapi/v0/cert/{domain}?type=T` (`ipn/localapi/cert.go` + `ipnlocal/cert.go`):
//!   a connection without write/cert permission ([`FakeTailscaled::set_cert_denied`]):
//!   `403 cert access denied`; a domain that does not look like one (empty, `..`, `:`, `/`, `\\`,
//!   NUL, no dot): `500 invalid domain`; a node without HTTPS certificates (no `CertDomains`):
//!   `500 your Tailscale account does not support getting TLS certs`; another domain:
//!   `500 invalid domain "D"; must be one of ["A"]`; then `type` `""`/`crt`/`cert` answers the
//!   chain PEM, `key` the key PEM, `pair` the key PEM then the chain PEM (`Content-Type:
//!   text/plain`), anything else `400 invalid type; want "cert" (default), "key", or "pair"`.
//!   Keys are served as tailscaled writes them: SEC1 `EC PRIVATE KEY` ([`CertPair::from_pkcs8`]).
//!
//! Errors are Go `http.Error` answers: `text/plain; charset=utf-8`, the message and `\n`. Every answer
//! carries `Tailscale-Version`, `Tailscale-Cap`, `Content-Security-Policy`, `X-Frame-Options: DENY` and
//! `X-Content-Type-Options: nosniff`.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use base64::Engine;
use serde::Serialize;

use crate::fixtures;
use crate::switchable::SwitchableServer;

/// The `Tailscale-Version` the fake reports (the reference snapshot's version string).
pub const TAILSCALE_VERSION: &str = "1.103.0-t0a1b2c3d4-g9e8d7c6b5";
/// The `Tailscale-Cap` (capability version) the fake reports.
pub const TAILSCALE_CAP: u32 = 145;
/// The only `Host` tailscaled accepts besides an empty one.
pub const LOCALAPI_HOST: &str = "local-tailscaled.sock";
/// The user id of the `tagged-devices` pseudo-user in generated bodies (as in the fixtures).
pub const TAGGED_DEVICES_USER_ID: i64 = 5201133779012345;
/// The tailnet's MagicDNS suffix in generated bodies (as in the fixtures).
pub const DEFAULT_TAILNET: &str = "tail3f9c2.ts.net";

const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; frame-ancestors 'none'; script-src 'none'; script-src-elem 'none'; script-src-attr 'none'";

/// A WhoIs answer body, served byte-for-byte. Build one from a fixture, from bytes, or with
/// [`NodeBuilder`].
#[derive(Clone)]
pub struct WhoIsBody {
    bytes: Bytes,
    node_key: Option<String>,
    addresses: Vec<IpAddr>,
}

impl std::fmt::Debug for WhoIsBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhoIsBody")
            .field("addresses", &self.addresses)
            .field("len", &self.bytes.len())
            .finish()
    }
}

impl WhoIsBody {
    /// A file of `tests/fixtures/tailscale/`, e.g. `"whois-tagged-bot.json"` or
    /// `"whois-user-laptop.json"`.
    ///
    /// # Panics
    /// If the fixture cannot be read.
    pub fn fixture(name: &str) -> Self {
        Self::from_bytes(fixtures::tailscale(name))
    }

    /// Any bytes, served as they are (even if they are not JSON, to test a client's parser). If they
    /// are a WhoIs JSON object, its `Node.Key` and `Node.Addresses` are used for lookups.
    pub fn from_bytes(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        let parsed: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
        let node = parsed.as_ref().and_then(|v| v.get("Node"));
        let node_key = node
            .and_then(|n| n.get("Key"))
            .and_then(|k| k.as_str())
            .map(str::to_ascii_lowercase);
        let addresses = node
            .and_then(|n| n.get("Addresses"))
            .and_then(|a| a.as_array())
            .map(|list| {
                list.iter()
                    .filter_map(|cidr| cidr.as_str())
                    .filter_map(|cidr| cidr.split('/').next())
                    .filter_map(|ip| ip.parse::<IpAddr>().ok())
                    .collect()
            })
            .unwrap_or_default();
        Self {
            bytes,
            node_key,
            addresses,
        }
    }

    /// The exact bytes served.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.bytes).ok()
    }

    /// The node's tailnet addresses (`Node.Addresses` without prefix lengths).
    pub fn addresses(&self) -> &[IpAddr] {
        &self.addresses
    }
}

/// Builds a WhoIs body in tailscaled's exact output shape: Go's `json.MarshalIndent(res, "", "\t")`
/// of `apitype.WhoIsResponse` — tab indentation, no trailing newline, struct field order, `omitempty`
/// fields left out when empty, `<`, `>` and `&` escaped as `\u003c`..., capability names sorted,
/// `CapMap: null` when no capability matched. A tagged node is owned by the `tagged-devices`
/// pseudo-user; an untagged one by its login (default `<name>@example.com`).
///
/// Everything not set is derived from the name, so two builders with one name give one node.
/// The setters named after a field set it as is, so a fixture can be rebuilt exactly.
#[derive(Clone, Debug)]
pub struct NodeBuilder {
    name: String,
    tailnet: String,
    node_id: Option<i64>,
    stable_id: Option<String>,
    user_id: Option<i64>,
    node_key: Option<String>,
    machine_key: Option<String>,
    disco_key: Option<String>,
    key_expiry: Option<String>,
    addresses: Vec<IpAddr>,
    endpoints: Vec<String>,
    home_derp: i64,
    ipn_version: Option<String>,
    os: Option<String>,
    os_version: Option<String>,
    os_hostname: Option<String>,
    created: Option<String>,
    cap: i64,
    tags: Vec<String>,
    last_seen: Option<String>,
    online: Option<bool>,
    machine_authorized: bool,
    computed_name: Option<String>,
    login: Option<String>,
    display_name: Option<String>,
    profile_pic_url: Option<String>,
    groups: Vec<String>,
    capabilities: BTreeMap<String, Vec<String>>,
    sharer: Option<i64>,
}

impl NodeBuilder {
    /// A node whose MagicDNS short name (and OS hostname) is `name`, online and authorized, running
    /// Linux, on the [`DEFAULT_TAILNET`].
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            tailnet: DEFAULT_TAILNET.to_owned(),
            node_id: None,
            stable_id: None,
            user_id: None,
            node_key: None,
            machine_key: None,
            disco_key: None,
            key_expiry: None,
            addresses: Vec::new(),
            endpoints: Vec::new(),
            home_derp: 1,
            ipn_version: Some(TAILSCALE_VERSION.to_owned()),
            os: Some("linux".to_owned()),
            os_version: None,
            os_hostname: None,
            created: Some("2026-05-11T08:22:19Z".to_owned()),
            cap: i64::from(TAILSCALE_CAP),
            tags: Vec::new(),
            last_seen: None,
            online: Some(true),
            machine_authorized: true,
            computed_name: None,
            login: None,
            display_name: None,
            profile_pic_url: None,
            groups: Vec::new(),
            capabilities: BTreeMap::new(),
            sharer: None,
        }
    }

    /// A node shared in from another tailnet by user `sharer`: `Node.Sharer` is set and, as
    /// tailscaled computes it for shared-in nodes, `ComputedName` is the FQDN without its dot
    /// (unless [`NodeBuilder::computed_name`] says otherwise). Combine with
    /// [`NodeBuilder::tailnet`] for the other tailnet's domain.
    pub fn shared_in_by(mut self, sharer: i64) -> Self {
        self.sharer = Some(sharer);
        self
    }

    /// ACL tags (`tag:ci`); a node with tags is a tagged node owned by `tagged-devices`.
    pub fn tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tags.extend(tags.into_iter().map(Into::into));
        self
    }

    /// The owning user's login name (`alice@example.com`); ignored for tagged nodes.
    pub fn login(mut self, login: &str) -> Self {
        self.login = Some(login.to_owned());
        self
    }

    /// The owning user's display name (default: the login's local part).
    pub fn display_name(mut self, display_name: &str) -> Self {
        self.display_name = Some(display_name.to_owned());
        self
    }

    /// `UserProfile.ProfilePicURL`.
    pub fn profile_pic_url(mut self, url: &str) -> Self {
        self.profile_pic_url = Some(url.to_owned());
        self
    }

    /// `UserProfile.Groups` (`group:eng`).
    pub fn groups<I, S>(mut self, groups: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.groups.extend(groups.into_iter().map(Into::into));
        self
    }

    /// Adds grant capability values under `name` in the top-level `CapMap`. Calling it again for one
    /// name appends (several matching grants). No values gives `"name": null`, which still means
    /// "has the capability". Object keys come out sorted; use [`NodeBuilder::capability_raw`] to keep
    /// an order.
    pub fn capability<I>(mut self, name: &str, values: I) -> Self
    where
        I: IntoIterator<Item = serde_json::Value>,
    {
        let entry = self.capabilities.entry(name.to_owned()).or_default();
        entry.extend(values.into_iter().map(|v| v.to_string()));
        self
    }

    /// Like [`NodeBuilder::capability`] with each value given as JSON text, copied with its key order
    /// (as tailscaled copies the policy's raw JSON).
    ///
    /// # Panics
    /// If a value is not JSON.
    pub fn capability_raw<I, S>(mut self, name: &str, values: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let entry = self.capabilities.entry(name.to_owned()).or_default();
        for value in values {
            let value = value.as_ref();
            if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(value) {
                panic!("capability value for {name} is not JSON: {e}");
            }
            entry.push(compact_json(value));
        }
        self
    }

    /// `Node.ComputedName` (default: the name).
    pub fn computed_name(mut self, computed_name: &str) -> Self {
        self.computed_name = Some(computed_name.to_owned());
        self
    }

    /// The MagicDNS suffix (default [`DEFAULT_TAILNET`]); `Node.Name` is `<name>.<tailnet>.`.
    pub fn tailnet(mut self, tailnet: &str) -> Self {
        self.tailnet = tailnet.to_owned();
        self
    }

    /// A tailnet address; the first IPv4 and IPv6 given become `Node.Addresses`. Default: an address
    /// in `100.64.0.0/10` and one in `fd7a:115c:a1e0::/48`, derived from the name.
    pub fn address(mut self, ip: IpAddr) -> Self {
        self.addresses.push(ip);
        self
    }

    /// Several tailnet addresses, see [`NodeBuilder::address`].
    pub fn addresses<I: IntoIterator<Item = IpAddr>>(mut self, ips: I) -> Self {
        self.addresses.extend(ips);
        self
    }

    /// `Hostinfo.Hostname`, the OS hostname (default: the name). When it differs from the computed
    /// name, `ComputedNameWithHost` is `computed (sanitized hostname)`.
    pub fn os_hostname(mut self, hostname: &str) -> Self {
        self.os_hostname = Some(hostname.to_owned());
        self
    }

    /// `Hostinfo.OS` (default `linux`).
    pub fn os(mut self, os: &str) -> Self {
        self.os = Some(os.to_owned());
        self
    }

    /// `Hostinfo.OSVersion` (default: absent).
    pub fn os_version(mut self, version: &str) -> Self {
        self.os_version = Some(version.to_owned());
        self
    }

    /// `Hostinfo.IPNVersion` (default [`TAILSCALE_VERSION`]).
    pub fn ipn_version(mut self, version: &str) -> Self {
        self.ipn_version = Some(version.to_owned());
        self
    }

    /// `Node.ID`.
    pub fn node_id(mut self, id: i64) -> Self {
        self.node_id = Some(id);
        self
    }

    /// `Node.StableID`.
    pub fn stable_id(mut self, id: &str) -> Self {
        self.stable_id = Some(id.to_owned());
        self
    }

    /// `UserProfile.ID` and `Node.User` (for tagged nodes: default [`TAGGED_DEVICES_USER_ID`]).
    pub fn user_id(mut self, id: i64) -> Self {
        self.user_id = Some(id);
        self
    }

    /// `Node.Key` (`nodekey:<64 hex>`).
    pub fn node_key(mut self, key: &str) -> Self {
        self.node_key = Some(key.to_owned());
        self
    }

    /// `Node.Machine` (`mkey:<64 hex>`).
    pub fn machine_key(mut self, key: &str) -> Self {
        self.machine_key = Some(key.to_owned());
        self
    }

    /// `Node.DiscoKey` (`discokey:<64 hex>`).
    pub fn disco_key(mut self, key: &str) -> Self {
        self.disco_key = Some(key.to_owned());
        self
    }

    /// `Node.KeyExpiry` (RFC 3339; default absent, as for tagged nodes).
    pub fn key_expiry(mut self, expiry: &str) -> Self {
        self.key_expiry = Some(expiry.to_owned());
        self
    }

    /// `Node.Endpoints` (`ip:port`).
    pub fn endpoints<I, S>(mut self, endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.endpoints.extend(endpoints.into_iter().map(Into::into));
        self
    }

    /// `Node.HomeDERP` (default 1; 0 leaves it out).
    pub fn home_derp(mut self, region: i64) -> Self {
        self.home_derp = region;
        self
    }

    /// `Node.Created` (RFC 3339).
    pub fn created(mut self, created: &str) -> Self {
        self.created = Some(created.to_owned());
        self
    }

    /// `Node.Cap`, the peer's capability version (default [`TAILSCALE_CAP`]).
    pub fn cap(mut self, cap: i64) -> Self {
        self.cap = cap;
        self
    }

    /// `Node.LastSeen` (RFC 3339; default absent).
    pub fn last_seen(mut self, last_seen: &str) -> Self {
        self.last_seen = Some(last_seen.to_owned());
        self
    }

    /// `Node.Online` (default `true`; `None` leaves it out).
    pub fn online(mut self, online: Option<bool>) -> Self {
        self.online = online;
        self
    }

    /// The body, in tailscaled's format.
    pub fn build(&self) -> WhoIsBody {
        let tagged = !self.tags.is_empty();
        let login = self
            .login
            .clone()
            .unwrap_or_else(|| format!("{}@example.com", self.name));
        let (user_id, login_name, display_name) = if tagged {
            (
                self.user_id.unwrap_or(TAGGED_DEVICES_USER_ID),
                "tagged-devices".to_owned(),
                "Tagged Devices".to_owned(),
            )
        } else {
            let display = self
                .display_name
                .clone()
                .unwrap_or_else(|| login.split('@').next().unwrap_or(&login).to_owned());
            (
                self.user_id
                    .unwrap_or_else(|| derived_i64(&format!("user:{login}"))),
                login,
                display,
            )
        };
        let (v4, v6) = self.tailnet_addresses();
        let os_hostname = self
            .os_hostname
            .clone()
            .unwrap_or_else(|| self.name.clone());
        let computed = self.computed_name.clone().unwrap_or_else(|| {
            if self.sharer.is_some() {
                format!("{}.{}", self.name, self.tailnet.trim_end_matches('.'))
            } else {
                self.name.clone()
            }
        });
        let host_if_different = sanitize_hostname(&os_hostname);
        let computed_with_host =
            if host_if_different.is_empty() || host_if_different.eq_ignore_ascii_case(&computed) {
                computed.clone()
            } else {
                format!("{computed} ({host_if_different})")
            };
        let hex_of = |kind: &str| hex::encode(sha256(&format!("{kind}:{}", self.name)));
        let node = WireNode {
            id: self
                .node_id
                .unwrap_or_else(|| derived_i64(&format!("node:{}", self.name))),
            stable_id: self
                .stable_id
                .clone()
                .unwrap_or_else(|| derived_stable_id(&self.name)),
            name: format!("{}.{}.", self.name, self.tailnet.trim_end_matches('.')),
            user: user_id,
            sharer: self.sharer.unwrap_or(0),
            key: self
                .node_key
                .clone()
                .unwrap_or_else(|| format!("nodekey:{}", hex_of("nodekey"))),
            key_expiry: self.key_expiry.clone(),
            machine: Some(
                self.machine_key
                    .clone()
                    .unwrap_or_else(|| format!("mkey:{}", hex_of("mkey"))),
            ),
            disco_key: Some(
                self.disco_key
                    .clone()
                    .unwrap_or_else(|| format!("discokey:{}", hex_of("discokey"))),
            ),
            addresses: [
                v4.map(|ip| format!("{ip}/32")),
                v6.map(|ip| format!("{ip}/128")),
            ]
            .into_iter()
            .flatten()
            .collect(),
            endpoints: self.endpoints.clone(),
            home_derp: self.home_derp,
            hostinfo: Some(WireHostinfo {
                ipn_version: self.ipn_version.clone(),
                os: self.os.clone(),
                os_version: self.os_version.clone(),
                hostname: Some(os_hostname),
            }),
            created: self.created.clone(),
            cap: self.cap,
            tags: self.tags.clone(),
            last_seen: self.last_seen.clone(),
            online: self.online,
            machine_authorized: self.machine_authorized,
            computed_name: computed,
            computed_name_with_host: computed_with_host,
        };
        let profile = WireUserProfile {
            id: user_id,
            login_name,
            display_name,
            profile_pic_url: if tagged {
                None
            } else {
                self.profile_pic_url.clone()
            },
            groups: if tagged {
                Vec::new()
            } else {
                self.groups.clone()
            },
        };
        // Go's Marshal then Indent: build the compact document (capability values are raw JSON
        // copied in order), escape as Go does, then indent with tabs.
        let mut compact = String::from("{\"Node\":");
        compact.push_str(&serde_json::to_string(&node).unwrap_or_default());
        compact.push_str(",\"UserProfile\":");
        compact.push_str(&serde_json::to_string(&profile).unwrap_or_default());
        compact.push_str(",\"CapMap\":");
        if self.capabilities.is_empty() {
            compact.push_str("null");
        } else {
            compact.push('{');
            for (i, (name, values)) in self.capabilities.iter().enumerate() {
                if i > 0 {
                    compact.push(',');
                }
                compact.push_str(&serde_json::to_string(name).unwrap_or_default());
                compact.push(':');
                if values.is_empty() {
                    compact.push_str("null");
                } else {
                    compact.push('[');
                    compact.push_str(&values.join(","));
                    compact.push(']');
                }
            }
            compact.push('}');
        }
        compact.push('}');
        WhoIsBody::from_bytes(go_indent(&go_escape(&compact)))
    }

    fn tailnet_addresses(&self) -> (Option<IpAddr>, Option<IpAddr>) {
        let v4 = self.addresses.iter().find(|ip| ip.is_ipv4()).copied();
        let v6 = self.addresses.iter().find(|ip| ip.is_ipv6()).copied();
        if v4.is_some() || v6.is_some() {
            return (v4, v6);
        }
        let h = sha256(&format!("addr:{}", self.name));
        let v4 = Ipv4Addr::new(100, 64 + (h[0] % 64), h[1], h[2].max(1));
        let v6 = Ipv6Addr::new(
            0xfd7a,
            0x115c,
            0xa1e0,
            0,
            0,
            0,
            u16::from_be_bytes([h[3], h[4]]),
            u16::from_be_bytes([h[5], h[6]]),
        );
        (Some(IpAddr::V4(v4)), Some(IpAddr::V6(v6)))
    }
}

/// `tailcfg.Node`, the fields a WhoIs answer carries, in Go's struct order.
#[derive(Serialize)]
struct WireNode {
    #[serde(rename = "ID")]
    id: i64,
    #[serde(rename = "StableID")]
    stable_id: String,
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "User")]
    user: i64,
    #[serde(rename = "Sharer", skip_serializing_if = "is_zero")]
    sharer: i64,
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "KeyExpiry", skip_serializing_if = "Option::is_none")]
    key_expiry: Option<String>,
    #[serde(rename = "Machine", skip_serializing_if = "Option::is_none")]
    machine: Option<String>,
    #[serde(rename = "DiscoKey", skip_serializing_if = "Option::is_none")]
    disco_key: Option<String>,
    #[serde(rename = "Addresses")]
    addresses: Vec<String>,
    #[serde(rename = "Endpoints", skip_serializing_if = "Vec::is_empty")]
    endpoints: Vec<String>,
    #[serde(rename = "HomeDERP", skip_serializing_if = "is_zero")]
    home_derp: i64,
    #[serde(rename = "Hostinfo", skip_serializing_if = "Option::is_none")]
    hostinfo: Option<WireHostinfo>,
    #[serde(rename = "Created", skip_serializing_if = "Option::is_none")]
    created: Option<String>,
    #[serde(rename = "Cap", skip_serializing_if = "is_zero")]
    cap: i64,
    #[serde(rename = "Tags", skip_serializing_if = "Vec::is_empty")]
    tags: Vec<String>,
    #[serde(rename = "LastSeen", skip_serializing_if = "Option::is_none")]
    last_seen: Option<String>,
    #[serde(rename = "Online", skip_serializing_if = "Option::is_none")]
    online: Option<bool>,
    #[serde(rename = "MachineAuthorized", skip_serializing_if = "is_false")]
    machine_authorized: bool,
    #[serde(rename = "ComputedName", skip_serializing_if = "String::is_empty")]
    computed_name: String,
    #[serde(
        rename = "ComputedNameWithHost",
        skip_serializing_if = "String::is_empty"
    )]
    computed_name_with_host: String,
}

/// `tailcfg.Hostinfo`, the subset a peer reliably sees.
#[derive(Serialize)]
struct WireHostinfo {
    #[serde(rename = "IPNVersion", skip_serializing_if = "Option::is_none")]
    ipn_version: Option<String>,
    #[serde(rename = "OS", skip_serializing_if = "Option::is_none")]
    os: Option<String>,
    #[serde(rename = "OSVersion", skip_serializing_if = "Option::is_none")]
    os_version: Option<String>,
    #[serde(rename = "Hostname", skip_serializing_if = "Option::is_none")]
    hostname: Option<String>,
}

/// `tailcfg.UserProfile`.
#[derive(Serialize)]
struct WireUserProfile {
    #[serde(rename = "ID")]
    id: i64,
    #[serde(rename = "LoginName")]
    login_name: String,
    #[serde(rename = "DisplayName")]
    display_name: String,
    #[serde(rename = "ProfilePicURL", skip_serializing_if = "Option::is_none")]
    profile_pic_url: Option<String>,
    #[serde(rename = "Groups", skip_serializing_if = "Vec::is_empty")]
    groups: Vec<String>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn sha256(seed: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(seed.as_bytes()).into()
}

/// A positive id below 2^53 (JSON-safe), like the control plane's.
fn derived_i64(seed: &str) -> i64 {
    let h = sha256(seed);
    let mut first = [0u8; 8];
    first.copy_from_slice(&h[..8]);
    1_000_000_000_000_000 + (u64::from_be_bytes(first) % 8_000_000_000_000_000) as i64
}

/// `n` + 10 alphanumerics + `CNTRL`, the shape of Tailscale's stable node ids.
fn derived_stable_id(name: &str) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let h = sha256(&format!("stable:{name}"));
    let body: String = h[..10]
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect();
    format!("n{body}CNTRL")
}

/// `dnsname.SanitizeHostname`: first label, lower case, runs of other characters as `-`, trimmed.
fn sanitize_hostname(hostname: &str) -> String {
    let hostname = hostname.trim().trim_end_matches(".local");
    let label = hostname.split('.').next().unwrap_or_default();
    let mut out = String::with_capacity(label.len());
    for c in label.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out = out.trim_matches('-');
    out.chars().take(63).collect()
}

/// Go's `encoding/json` escapes `<`, `>`, `&`, U+2028 and U+2029 in strings (HTML-safe output). Those
/// characters can only occur inside strings in compact JSON, so replacing them everywhere is exact.
fn go_escape(compact: &str) -> String {
    let mut out = String::with_capacity(compact.len());
    for c in compact.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            _ => out.push(c),
        }
    }
    out
}

/// Removes insignificant whitespace from JSON text (Go's `json.Compact`).
fn compact_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in text.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !c.is_whitespace() {
            out.push(c);
        }
    }
    out
}

/// Go's `json.Indent(dst, src, "", "\t")` of compact JSON: one element per line, `": "` after keys,
/// empty arrays and objects stay `[]`/`{}`, no trailing newline.
fn go_indent(compact: &str) -> String {
    let mut out = String::with_capacity(compact.len() * 2);
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut need_indent = false;
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        for _ in 0..depth {
            out.push('\t');
        }
    };
    for c in compact.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        if need_indent && c != ']' && c != '}' {
            need_indent = false;
            depth += 1;
            newline(&mut out, depth);
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                need_indent = true;
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            '}' | ']' => {
                if need_indent {
                    // An empty object or array stays on one line.
                    need_indent = false;
                } else {
                    depth = depth.saturating_sub(1);
                    newline(&mut out, depth);
                }
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The server

/// The fake tailscaled: a cheap `Clone` handle; the server stops and the socket's temporary
/// directory is removed when the last handle drops.
#[derive(Clone)]
pub struct FakeTailscaled {
    inner: Arc<Inner>,
}

struct Inner {
    // Field order matters for drop: the server stops before the directory goes.
    server: SwitchableServer,
    shared: Arc<Shared>,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for FakeTailscaled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeTailscaled")
            .field("socket", &self.inner.socket)
            .finish()
    }
}

struct Shared {
    ledger: Mutex<Ledger>,
}

#[derive(Default)]
struct Ledger {
    nodes: HashMap<IpAddr, WhoIsBody>,
    self_node: Option<SelfNode>,
    cert_pairs: HashMap<String, CertPair>,
    cert_denied: bool,
    cert_requests: Vec<String>,
    whois_calls: u64,
    whois_addrs: Vec<String>,
    fail_next: u32,
    delay: Duration,
    whois_denied: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl FakeTailscaled {
    /// Starts the fake on `tailscaled.sock` in a new temporary directory.
    ///
    /// # Panics
    /// If the directory or the socket cannot be created.
    pub async fn start() -> FakeTailscaled {
        let dir = tempfile::Builder::new()
            .prefix("fake-tailscaled-")
            .tempdir()
            .unwrap_or_else(|e| {
                panic!("fake tailscaled: cannot create a temporary directory: {e}")
            });
        let socket = dir.path().join("tailscaled.sock");
        let shared = Arc::new(Shared {
            ledger: Mutex::new(Ledger::default()),
        });
        let router = Router::new().fallback(localapi).with_state(shared.clone());
        let server = SwitchableServer::start_unix(socket.clone(), router).unwrap_or_else(|e| {
            panic!(
                "fake tailscaled: cannot listen on {}: {e}",
                socket.display()
            )
        });
        FakeTailscaled {
            inner: Arc::new(Inner {
                server,
                shared,
                socket,
                _dir: dir,
            }),
        }
    }

    /// The LocalAPI socket to give the broker.
    pub fn socket_path(&self) -> &Path {
        &self.inner.socket
    }

    /// Maps a tailnet IP to a node: WhoIs for that IP (any port) answers `body`. IPv4-mapped IPv6
    /// addresses are stored unmapped.
    pub fn add_node(&self, ip: IpAddr, body: WhoIsBody) {
        self.inner.shared.lock().nodes.insert(unmap(ip), body);
    }

    /// Maps every address in the body's `Node.Addresses` to it and returns them.
    pub fn add_node_at_addresses(&self, body: WhoIsBody) -> Vec<IpAddr> {
        let addresses = body.addresses().to_vec();
        let mut ledger = self.inner.shared.lock();
        for ip in &addresses {
            ledger.nodes.insert(unmap(*ip), body.clone());
        }
        addresses
    }

    /// Forgets the node at `ip` (WhoIs then answers 404); returns whether there was one.
    pub fn remove_node(&self, ip: IpAddr) -> bool {
        self.inner.shared.lock().nodes.remove(&unmap(ip)).is_some()
    }

    /// Stops tailscaled (`true`: the socket file is removed, open connections are dropped, so
    /// clients get `ENOENT`) or starts it again (`false`). Returns once in effect.
    ///
    /// # Panics
    /// If the socket cannot be created again.
    pub async fn set_down(&self, down: bool) {
        self.inner
            .server
            .set_down(down)
            .await
            .unwrap_or_else(|e| panic!("fake tailscaled cannot listen again: {e}"));
    }

    /// How many `/localapi/v0/whois` requests arrived, whatever their answer (to test a cache).
    pub fn whois_calls(&self) -> u64 {
        self.inner.shared.lock().whois_calls
    }

    /// The `addr` values of WhoIs requests so far, decoded, in order (to check that a client passes
    /// the peer's real address and port).
    pub fn whois_addrs(&self) -> Vec<String> {
        self.inner.shared.lock().whois_addrs.clone()
    }

    /// Answers the next `n` requests with `500 server has no local backend`.
    pub fn fail_next(&self, n: u32) {
        self.inner.shared.lock().fail_next = n;
    }

    /// Delays every answer by `delay` (zero turns it off).
    pub fn set_delay(&self, delay: Duration) {
        self.inner.shared.lock().delay = delay;
    }

    /// Makes WhoIs answer `403 whois access denied`, as for a connection without read access.
    pub fn set_whois_denied(&self, denied: bool) {
        self.inner.shared.lock().whois_denied = denied;
    }

    /// This node as `/localapi/v0/status` reports it (its MagicDNS name and `CertDomains`).
    pub fn set_self(&self, node: SelfNode) {
        self.inner.shared.lock().self_node = Some(node);
    }

    /// The certificate pair tailscaled holds for `domain` (what `cert/{domain}` serves).
    /// Setting another one later is tailscaled's renewal.
    pub fn set_cert_pair(&self, domain: &str, pair: CertPair) {
        self.inner
            .shared
            .lock()
            .cert_pairs
            .insert(domain.to_string(), pair);
    }

    /// Makes `cert/` answer `403 cert access denied`, as for a connection that is neither
    /// root/operator nor allowed by `TS_PERMIT_CERT_UID`.
    pub fn set_cert_denied(&self, denied: bool) {
        self.inner.shared.lock().cert_denied = denied;
    }

    /// The `cert/` requests so far, as `domain?type=T` (decoded), in order.
    pub fn cert_requests(&self) -> Vec<String> {
        self.inner.shared.lock().cert_requests.clone()
    }
}

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Headers tailscaled's LocalAPI puts on every answer.
fn localapi_headers(headers: &mut HeaderMap) {
    headers.insert(
        "Tailscale-Version",
        HeaderValue::from_static(TAILSCALE_VERSION),
    );
    headers.insert("Tailscale-Cap", HeaderValue::from(TAILSCALE_CAP));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
}

/// Go's `http.Error`: plain text, the message and a newline.
fn http_error(status: StatusCode, message: &str) -> Response {
    let mut response = Response::new(Body::from(format!("{message}\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    localapi_headers(response.headers_mut());
    response
}

/// What `whois?addr=` can name.
enum Lookup {
    Ip(IpAddr),
    NodeKey(String),
}

/// `serveWhoIs`'s parsing: `nodekey:`, a bare IP (port 0), or `IP:port`/`[IPv6]:port`.
fn parse_addr(value: &str) -> Result<Lookup, &'static str> {
    if let Some(hex_part) = value.strip_prefix("nodekey:") {
        let valid = hex_part.len() == 64 && hex_part.bytes().all(|b| b.is_ascii_hexdigit());
        return if valid {
            Ok(Lookup::NodeKey(value.to_ascii_lowercase()))
        } else {
            Err("invalid nodekey in 'addr' parameter")
        };
    }
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Ok(Lookup::Ip(unmap(ip)));
    }
    match value.parse::<std::net::SocketAddr>() {
        Ok(addr) => Ok(Lookup::Ip(unmap(addr.ip()))),
        Err(_) => Err("invalid 'addr' parameter"),
    }
}

async fn localapi(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let is_whois = path == "/localapi/v0/whois";
    let (delay, fail) = {
        let mut ledger = shared.lock();
        if is_whois {
            ledger.whois_calls += 1;
        }
        let fail = ledger.fail_next > 0;
        if fail {
            ledger.fail_next -= 1;
        }
        (ledger.delay, fail)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if fail {
        return http_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server has no local backend",
        );
    }
    let headers = req.headers();
    let host_ok = match headers.get(header::HOST) {
        None => true,
        Some(host) => host.is_empty() || host.as_bytes() == LOCALAPI_HOST.as_bytes(),
    };
    let browser = [header::ORIGIN, header::REFERER]
        .iter()
        .any(|name| headers.get(name).is_some_and(|v| !v.is_empty()));
    if !host_ok || browser {
        return http_error(StatusCode::FORBIDDEN, "invalid localapi request");
    }
    if let Some(reason) = headers.get("X-Tailscale-Reason")
        && base64::engine::general_purpose::STANDARD
            .decode(reason.as_bytes())
            .is_err()
    {
        return http_error(StatusCode::BAD_REQUEST, "invalid reason header");
    }
    if path == "/localapi/v0/status" {
        return status(&shared);
    }
    if let Some(domain) = path.strip_prefix("/localapi/v0/cert/") {
        return cert(&shared, &percent_decode(domain), &req);
    }
    if !is_whois {
        return http_error(StatusCode::NOT_FOUND, "404 page not found");
    }
    whois(&shared, &req)
}

fn whois(shared: &Shared, req: &Request) -> Response {
    // Go's FormValue: the first value, percent-decoded; a query that cannot be parsed has no addr.
    let addr = Query::<Vec<(String, String)>>::try_from_uri(req.uri())
        .ok()
        .and_then(|Query(pairs)| pairs.into_iter().find(|(k, _)| k == "addr").map(|(_, v)| v))
        .unwrap_or_default();
    let mut ledger = shared.lock();
    ledger.whois_addrs.push(addr.clone());
    if ledger.whois_denied {
        return http_error(StatusCode::FORBIDDEN, "whois access denied");
    }
    if addr.is_empty() {
        return http_error(StatusCode::BAD_REQUEST, "missing 'addr' parameter");
    }
    let lookup = match parse_addr(&addr) {
        Ok(lookup) => lookup,
        Err(message) => return http_error(StatusCode::BAD_REQUEST, message),
    };
    let found = match lookup {
        Lookup::Ip(ip) => ledger.nodes.get(&ip).cloned(),
        Lookup::NodeKey(key) => ledger
            .nodes
            .values()
            .find(|body| body.node_key.as_deref() == Some(key.as_str()))
            .cloned(),
    };
    drop(ledger);
    match found {
        Some(body) => {
            let mut response = Response::new(Body::from(body.bytes));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            localapi_headers(response.headers_mut());
            response
        }
        None => http_error(StatusCode::NOT_FOUND, "no match for IP:port"),
    }
}

// ---------------------------------------------------------------------------------------------
// Status and certificates

/// This node as tailscaled's status reports it.
#[derive(Clone, Debug)]
pub struct SelfNode {
    /// The OS hostname (`Self.HostName`).
    pub host_name: String,
    /// The MagicDNS FQDN without the trailing dot; `Self.DNSName` carries the dot.
    pub dns_name: String,
    pub tailscale_ips: Vec<IpAddr>,
    /// Names tailscaled gets certificates for; empty when HTTPS certificates are off for the
    /// tailnet (then `CertDomains` is `null`).
    pub cert_domains: Vec<String>,
}

impl SelfNode {
    /// The node `host` in the tailnet `tailnet` (e.g. `"tailnet-1234.ts.net"`), HTTPS
    /// certificates enabled for its name.
    pub fn new(host: &str, tailnet: &str) -> SelfNode {
        let dns_name = format!("{host}.{tailnet}");
        SelfNode {
            host_name: host.to_string(),
            dns_name: dns_name.clone(),
            tailscale_ips: vec![
                IpAddr::V4(Ipv4Addr::new(100, 88, 77, 66)),
                IpAddr::V6(Ipv6Addr::new(
                    0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0x6458, 0x4d42,
                )),
            ],
            cert_domains: vec![dns_name],
        }
    }

    /// The same node in a tailnet without HTTPS certificates.
    pub fn without_https(mut self) -> SelfNode {
        self.cert_domains.clear();
        self
    }
}

/// A key and certificate chain as tailscaled keeps them: the key PEM (SEC1 `EC PRIVATE KEY`)
/// and the chain PEM, leaf first. Served byte-for-byte.
#[derive(Clone)]
pub struct CertPair {
    key_pem: Bytes,
    cert_pem: Bytes,
}

impl std::fmt::Debug for CertPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertPair")
            .field("cert_pem_len", &self.cert_pem.len())
            .finish_non_exhaustive()
    }
}

impl CertPair {
    /// The key and chain exactly as given (to serve odd or broken answers).
    pub fn raw(key_pem: impl Into<Bytes>, cert_pem: impl Into<Bytes>) -> CertPair {
        CertPair {
            key_pem: key_pem.into(),
            cert_pem: cert_pem.into(),
        }
    }

    /// A P-256 key in PKCS#8 PEM (what rcgen writes) re-encoded as tailscaled writes it
    /// (`x509.MarshalECPrivateKey`: SEC1 with the curve named), and the chain PEM.
    ///
    /// # Panics
    /// If the key is not a PKCS#8 P-256 key.
    pub fn from_pkcs8(key_pem: &str, cert_pem: &str) -> CertPair {
        use rustls::pki_types::PrivatePkcs8KeyDer;
        use rustls::pki_types::pem::PemObject;
        let pkcs8 = PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes())
            .unwrap_or_else(|e| panic!("CertPair::from_pkcs8: not a PKCS#8 PEM key: {e}"));
        let sec1 = sec1_from_pkcs8_p256(pkcs8.secret_pkcs8_der())
            .unwrap_or_else(|| panic!("CertPair::from_pkcs8: not a P-256 PKCS#8 key"));
        let b64 = base64::engine::general_purpose::STANDARD.encode(sec1);
        let mut pem = String::from("-----BEGIN EC PRIVATE KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END EC PRIVATE KEY-----\n");
        CertPair::raw(pem, cert_pem.to_string())
    }
}

/// PKCS#8 `PrivateKeyInfo { 0, {ecPublicKey, prime256v1}, OCTET STRING ECPrivateKey }` with
/// the inner `ECPrivateKey { 1, key, [1] pub }` given its `[0] prime256v1` parameters.
fn sec1_from_pkcs8_p256(pkcs8: &[u8]) -> Option<Vec<u8>> {
    const PRIME256V1: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    // The inner ECPrivateKey starts with SEQUENCE, version 1, OCTET STRING of 32 bytes.
    let start = pkcs8
        .windows(7)
        .position(|w| w[0] == 0x30 && w[2..] == [0x02, 0x01, 0x01, 0x04, 0x20])?;
    let inner_len = usize::from(*pkcs8.get(start + 1)?);
    let inner = pkcs8.get(start + 2..start + 2 + inner_len)?;
    if !pkcs8.windows(PRIME256V1.len()).any(|w| w == PRIME256V1) {
        return None;
    }
    let (head, tail) = inner.split_at(5 + 32);
    let mut body = head.to_vec();
    body.push(0xa0);
    body.push(PRIME256V1.len() as u8);
    body.extend_from_slice(&PRIME256V1);
    body.extend_from_slice(tail);
    if body.len() > 127 {
        return None;
    }
    let mut out = vec![0x30, body.len() as u8];
    out.extend(body);
    Some(out)
}

/// `%XX` escapes of a path decoded, as Go's `URL.Path` is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex_pair) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex_pair, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `ipnstate.Status` without peers, in Go's field order.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct StatusBody {
    version: &'static str,
    #[serde(rename = "TUN")]
    tun: bool,
    backend_state: &'static str,
    #[serde(skip_serializing_if = "is_false")]
    have_node_key: bool,
    #[serde(rename = "AuthURL")]
    auth_url: String,
    tailscale_ips: Option<Vec<IpAddr>>,
    #[serde(rename = "Self")]
    self_status: PeerStatusBody,
    health: Vec<String>,
    #[serde(rename = "MagicDNSSuffix")]
    magic_dns_suffix: String,
    current_tailnet: Option<TailnetStatusBody>,
    cert_domains: Option<Vec<String>>,
    peer: Option<BTreeMap<String, serde_json::Value>>,
    user: Option<BTreeMap<String, serde_json::Value>>,
    client_version: Option<serde_json::Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct TailnetStatusBody {
    name: String,
    #[serde(rename = "MagicDNSSuffix")]
    magic_dns_suffix: String,
    #[serde(rename = "MagicDNSEnabled")]
    magic_dns_enabled: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct PeerStatusBody {
    #[serde(rename = "ID")]
    id: String,
    public_key: String,
    host_name: String,
    #[serde(rename = "DNSName")]
    dns_name: String,
    #[serde(rename = "OS")]
    os: String,
    #[serde(rename = "UserID")]
    user_id: i64,
    #[serde(rename = "TailscaleIPs")]
    tailscale_ips: Option<Vec<IpAddr>>,
    addrs: Option<Vec<String>>,
    cur_addr: String,
    relay: String,
    rx_bytes: i64,
    tx_bytes: i64,
    created: &'static str,
    last_write: &'static str,
    last_seen: &'static str,
    last_handshake: &'static str,
    online: bool,
    exit_node: bool,
    exit_node_option: bool,
    active: bool,
    #[serde(rename = "PeerAPIURL")]
    peer_api_url: Option<Vec<String>>,
    in_network_map: bool,
    in_magic_sock: bool,
    in_engine: bool,
}

const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

fn status_body(node: Option<&SelfNode>) -> Vec<u8> {
    let zero_peer =
        |dns_name: String, host_name: String, ips: Option<Vec<IpAddr>>| PeerStatusBody {
            id: String::new(),
            public_key: "nodekey:0000000000000000000000000000000000000000000000000000000000000000"
                .into(),
            host_name,
            dns_name,
            os: "linux".into(),
            user_id: 0,
            tailscale_ips: ips,
            addrs: None,
            cur_addr: String::new(),
            relay: String::new(),
            rx_bytes: 0,
            tx_bytes: 0,
            created: GO_ZERO_TIME,
            last_write: GO_ZERO_TIME,
            last_seen: GO_ZERO_TIME,
            last_handshake: GO_ZERO_TIME,
            online: false,
            exit_node: false,
            exit_node_option: false,
            active: false,
            peer_api_url: None,
            in_network_map: false,
            in_magic_sock: false,
            in_engine: false,
        };
    let body = match node {
        None => StatusBody {
            version: TAILSCALE_VERSION,
            tun: true,
            backend_state: "NeedsLogin",
            have_node_key: false,
            auth_url: String::new(),
            tailscale_ips: None,
            self_status: zero_peer(String::new(), "fake-host".into(), None),
            health: vec![],
            magic_dns_suffix: String::new(),
            current_tailnet: None,
            cert_domains: None,
            peer: None,
            user: None,
            client_version: None,
        },
        Some(n) => {
            let suffix = n
                .dns_name
                .split_once('.')
                .map(|(_, rest)| rest.to_string())
                .unwrap_or_default();
            let mut me = zero_peer(
                format!("{}.", n.dns_name),
                n.host_name.clone(),
                Some(n.tailscale_ips.clone()),
            );
            me.id = derived_stable_id(&n.host_name);
            me.public_key = format!("nodekey:{}", hex::encode(sha256(&n.host_name)));
            me.user_id = derived_i64(&n.host_name);
            me.online = true;
            me.peer_api_url = Some(
                n.tailscale_ips
                    .iter()
                    .map(|ip| match ip {
                        IpAddr::V4(v4) => format!("http://{v4}:41641"),
                        IpAddr::V6(v6) => format!("http://[{v6}]:41641"),
                    })
                    .collect(),
            );
            me.in_network_map = true;
            me.in_magic_sock = true;
            StatusBody {
                version: TAILSCALE_VERSION,
                tun: true,
                backend_state: "Running",
                have_node_key: true,
                auth_url: String::new(),
                tailscale_ips: Some(n.tailscale_ips.clone()),
                self_status: me,
                health: vec![],
                magic_dns_suffix: suffix.clone(),
                current_tailnet: Some(TailnetStatusBody {
                    name: "example.com".into(),
                    magic_dns_suffix: suffix,
                    magic_dns_enabled: true,
                }),
                cert_domains: (!n.cert_domains.is_empty()).then(|| n.cert_domains.clone()),
                peer: None,
                user: None,
                client_version: None,
            }
        }
    };
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"\t");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
    if body.serialize(&mut ser).is_err() {
        return b"{}\n".to_vec();
    }
    out.push(b'\n');
    out
}

fn status(shared: &Shared) -> Response {
    let node = shared.lock().self_node.clone();
    let mut response = Response::new(Body::from(status_body(node.as_ref())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    localapi_headers(response.headers_mut());
    response
}

/// `validLookingCertDomain`.
fn valid_looking_cert_domain(name: &str) -> bool {
    !(name.is_empty()
        || name.contains("..")
        || name.contains([':', '/', '\\', '\0'])
        || !name.contains('.'))
}

fn cert(shared: &Shared, domain: &str, req: &Request) -> Response {
    let kind = Query::<Vec<(String, String)>>::try_from_uri(req.uri())
        .ok()
        .and_then(|Query(pairs)| pairs.into_iter().find(|(k, _)| k == "type").map(|(_, v)| v))
        .unwrap_or_default();
    let mut ledger = shared.lock();
    ledger.cert_requests.push(format!("{domain}?type={kind}"));
    if ledger.cert_denied {
        return http_error(StatusCode::FORBIDDEN, "cert access denied");
    }
    if !valid_looking_cert_domain(domain) {
        return http_error(StatusCode::INTERNAL_SERVER_ERROR, "invalid domain");
    }
    let cert_domains = ledger
        .self_node
        .as_ref()
        .map(|n| n.cert_domains.clone())
        .unwrap_or_default();
    if cert_domains.is_empty() {
        return http_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "your Tailscale account does not support getting TLS certs",
        );
    }
    if !cert_domains.iter().any(|d| d == domain) {
        // Go's %q of a []string: ["a" "b"].
        let quoted: Vec<String> = cert_domains.iter().map(|d| format!("{d:?}")).collect();
        return http_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!(
                "invalid domain {domain:?}; must be one of [{}]",
                quoted.join(" ")
            ),
        );
    }
    let Some(pair) = ledger.cert_pairs.get(domain).cloned() else {
        // The real one would now order a certificate from Let's Encrypt.
        return http_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("acme.GetReg: the fake tailscaled holds no certificate for {domain:?}"),
        );
    };
    drop(ledger);
    let body: Vec<u8> = match kind.as_str() {
        "" | "crt" | "cert" => pair.cert_pem.to_vec(),
        "key" => pair.key_pem.to_vec(),
        "pair" => [pair.key_pem.as_ref(), pair.cert_pem.as_ref()].concat(),
        _ => {
            return http_error(
                StatusCode::BAD_REQUEST,
                r#"invalid type; want "cert" (default), "key", or "pair""#,
            );
        }
    };
    let mut response = Response::new(Body::from(body));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    localapi_headers(response.headers_mut());
    response
}
