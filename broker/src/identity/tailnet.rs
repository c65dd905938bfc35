//! Tailnet callers: tailscaled's LocalAPI WhoIs on the connection's real peer address.
//!
//! The `tailscale-localapi` crate provides the transport seam (`LocalApiClient`) and the
//! `UserProfile` type; its `Whois`/`Node` types require fields tailscaled omits and lack the
//! grant `CapMap`, so the response is parsed here, tolerantly: unknown fields are ignored and
//! every `omitempty` field is optional.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tailscale_localapi::{LocalApiClient, UserProfile};

use super::TailnetIdentity;
use crate::error::error_chain;

/// The largest WhoIs answer accepted (real ones are a few KiB).
const MAX_WHOIS_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum WhoIsError {
    #[error("tailscaled is not reachable at {socket}: {message}")]
    Unreachable { socket: String, message: String },
    #[error("tailscaled answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("tailscaled's WhoIs answer could not be read: {0}")]
    Malformed(String),
    #[error("tailscaled did not answer within {0:?}")]
    Timeout(Duration),
}

/// Asks who is behind a peer address. `Ok(None)`: not a tailnet peer (WhoIs 404).
#[async_trait::async_trait]
pub trait WhoIs: Send + Sync + 'static {
    async fn whois(&self, addr: SocketAddr) -> Result<Option<TailnetIdentity>, WhoIsError>;
}

/// HTTP/1.1 over tailscaled's Unix socket, keeping the status of every answer (the crate's
/// own client turns every non-200 into one error, and a 404 must mean "unknown caller").
/// Shared with `tls/server_cert.rs`, which asks tailscaled for the node's certificate pair.
#[derive(Clone)]
pub(crate) struct SocketClient {
    pub(crate) path: PathBuf,
}

impl LocalApiClient for SocketClient {
    async fn get(&self, uri: http::Uri) -> tailscale_localapi::Result<http::Response<Incoming>> {
        let stream = tokio::net::UnixStream::connect(&self.path).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "tailscaled connection ended");
            }
        });
        let request = http::Request::builder()
            .method("GET")
            .uri(uri)
            .header(http::header::HOST, "local-tailscaled.sock")
            .header("Tailscale-Cap", "100")
            .body(Empty::<Bytes>::new())?;
        Ok(sender.send_request(request).await?)
    }
}

/// The real WhoIs: tailscaled's LocalAPI on its Unix socket.
pub struct LocalApiWhoIs {
    client: SocketClient,
    timeout: Duration,
    /// The broker's own node as tailscaled's status last told it, and when it was asked.
    own: tokio::sync::Mutex<Option<(Instant, Option<OwnNode>)>>,
}

/// What the broker needs to know about its own node.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct OwnNode {
    /// `MagicDNSSuffix`, e.g. `tail3f9c2.ts.net`; empty when unknown.
    pub magic_dns_suffix: String,
    /// `Self.TailscaleIPs`.
    pub addresses: Vec<IpAddr>,
}

/// How long the own node's status is reused; a failed status is asked again sooner.
const OWN_NODE_TTL: Duration = Duration::from_secs(30);
const OWN_NODE_RETRY: Duration = Duration::from_secs(2);

impl LocalApiWhoIs {
    pub fn new(socket: PathBuf) -> LocalApiWhoIs {
        LocalApiWhoIs {
            client: SocketClient { path: socket },
            timeout: Duration::from_secs(3),
            own: tokio::sync::Mutex::new(None),
        }
    }

    /// The broker's own node, from `/localapi/v0/status?peers=false`, cached. `None` while
    /// tailscaled cannot say (logged out, or the status cannot be read): then no node is
    /// taken for our own and the tailnet-domain check is skipped, but `Node.Sharer` still
    /// marks shared-in nodes.
    async fn own_node(&self) -> Option<OwnNode> {
        let mut own = self.own.lock().await;
        if let Some((at, known)) = own.as_ref() {
            let ttl = if known.is_some() {
                OWN_NODE_TTL
            } else {
                OWN_NODE_RETRY
            };
            if at.elapsed() < ttl {
                return known.clone();
            }
        }
        let fresh = match self.ask_status().await {
            Ok(node) => node,
            Err(e) => {
                tracing::warn!(error = %e, "tailscaled's status could not be read");
                None
            }
        };
        *own = Some((Instant::now(), fresh.clone()));
        fresh
    }

    async fn ask_status(&self) -> Result<Option<OwnNode>, WhoIsError> {
        let uri: http::Uri = "/localapi/v0/status?peers=false"
            .parse()
            .map_err(|e| WhoIsError::Malformed(format!("bad request URI: {e}")))?;
        let response = self
            .client
            .get(uri)
            .await
            .map_err(|e| WhoIsError::Unreachable {
                socket: self.client.path.display().to_string(),
                message: error_chain(&e),
            })?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_WHOIS_BYTES)
            .collect()
            .await
            .map_err(|e| WhoIsError::Malformed(format!("reading the status: {e}")))?
            .to_bytes();
        if status != 200 {
            return Err(WhoIsError::Status {
                status,
                message: String::from_utf8_lossy(&body)
                    .trim()
                    .chars()
                    .take(200)
                    .collect(),
            });
        }
        parse_own_node(&body)
    }

    async fn ask(&self, addr: SocketAddr) -> Result<Option<TailnetIdentity>, WhoIsError> {
        let socket = self.client.path.display().to_string();
        let addr = canonical(addr);
        let encoded = addr
            .to_string()
            .replace(':', "%3A")
            .replace('[', "%5B")
            .replace(']', "%5D");
        let uri: http::Uri = format!("/localapi/v0/whois?addr={encoded}")
            .parse()
            .map_err(|e| WhoIsError::Malformed(format!("bad request URI: {e}")))?;
        let response = self
            .client
            .get(uri)
            .await
            .map_err(|e| WhoIsError::Unreachable {
                socket: socket.clone(),
                message: error_chain(&e),
            })?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_WHOIS_BYTES)
            .collect()
            .await
            .map_err(|e| WhoIsError::Malformed(format!("reading the answer: {e}")))?
            .to_bytes();
        match status {
            200 => {
                let mut identity = parse_whois(&body)?;
                if let Some(own) = self.own_node().await {
                    mark_against(&mut identity, &own, addr.ip());
                }
                Ok(Some(identity))
            }
            404 => Ok(None),
            _ => Err(WhoIsError::Status {
                status,
                message: String::from_utf8_lossy(&body)
                    .trim()
                    .chars()
                    .take(200)
                    .collect(),
            }),
        }
    }
}

#[async_trait::async_trait]
impl WhoIs for LocalApiWhoIs {
    async fn whois(&self, addr: SocketAddr) -> Result<Option<TailnetIdentity>, WhoIsError> {
        tokio::time::timeout(self.timeout, self.ask(addr))
            .await
            .map_err(|_| WhoIsError::Timeout(self.timeout))?
    }
}

/// IPv4-mapped IPv6 peers (`::ffff:100.x.y.z`) are asked about as IPv4, as tailscaled does.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// Mark `identity` (the WhoIs answer for `peer`) as foreign when its MagicDNS name is outside
/// our node's suffix, and as our own node when `peer` is one of our node's addresses.
pub fn mark_against(identity: &mut TailnetIdentity, own: &OwnNode, peer: IpAddr) {
    let suffix = own
        .magic_dns_suffix
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if !suffix.is_empty() {
        let name = identity.node_name.to_ascii_lowercase();
        let in_ours = name
            .split_once('.')
            .is_some_and(|(_, domain)| domain == suffix);
        if !in_ours {
            identity.foreign = true;
        }
    }
    let peer = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
        IpAddr::V4(_) => peer,
    };
    if own.addresses.contains(&peer) {
        identity.own_node = true;
    }
}

#[derive(Deserialize)]
struct StatusResponse {
    #[serde(rename = "MagicDNSSuffix", default)]
    magic_dns_suffix: Option<String>,
    #[serde(rename = "CurrentTailnet", default)]
    current_tailnet: Option<CurrentTailnet>,
    #[serde(rename = "BackendState", default)]
    backend_state: Option<String>,
    #[serde(rename = "Self", default)]
    self_status: Option<SelfStatus>,
}

#[derive(Deserialize)]
struct CurrentTailnet {
    #[serde(rename = "MagicDNSSuffix", default)]
    magic_dns_suffix: Option<String>,
}

#[derive(Deserialize)]
struct SelfStatus {
    #[serde(rename = "TailscaleIPs", default)]
    tailscale_ips: Option<Vec<IpAddr>>,
}

/// Our node from a status answer; `None` when tailscaled is not running a tailnet yet.
pub fn parse_own_node(body: &[u8]) -> Result<Option<OwnNode>, WhoIsError> {
    let status: StatusResponse =
        serde_json::from_slice(body).map_err(|e| WhoIsError::Malformed(e.to_string()))?;
    if status.backend_state.as_deref() != Some("Running") {
        return Ok(None);
    }
    let suffix = status
        .magic_dns_suffix
        .filter(|s| !s.is_empty())
        .or_else(|| status.current_tailnet.and_then(|t| t.magic_dns_suffix))
        .unwrap_or_default();
    Ok(Some(OwnNode {
        magic_dns_suffix: suffix,
        addresses: status
            .self_status
            .and_then(|s| s.tailscale_ips)
            .unwrap_or_default(),
    }))
}

#[derive(Deserialize)]
struct WhoIsResponse {
    #[serde(rename = "Node")]
    node: Node,
    #[serde(rename = "UserProfile")]
    user_profile: UserProfile,
    #[serde(rename = "CapMap", default)]
    cap_map: Option<BTreeMap<String, Option<Vec<serde_json::Value>>>>,
}

/// The part of `tailcfg.Node` the broker uses; everything `omitempty` upstream is optional.
#[derive(Deserialize)]
struct Node {
    #[serde(rename = "StableID")]
    stable_id: String,
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "ComputedName", default)]
    computed_name: Option<String>,
    #[serde(rename = "Tags", default)]
    tags: Option<Vec<String>>,
    #[serde(rename = "Expired", default)]
    expired: Option<bool>,
    /// Set (non-zero) for nodes shared in from another tailnet.
    #[serde(rename = "Sharer", default)]
    sharer: Option<i64>,
    #[serde(rename = "Hostinfo", default)]
    hostinfo: Option<Hostinfo>,
}

#[derive(Deserialize)]
struct Hostinfo {
    /// The node is in the netmap only because its owner shared it with us.
    #[serde(rename = "ShareeNode", default)]
    sharee_node: Option<bool>,
}

/// Parse a WhoIs answer as tailscaled sends it.
pub fn parse_whois(body: &[u8]) -> Result<TailnetIdentity, WhoIsError> {
    let r: WhoIsResponse =
        serde_json::from_slice(body).map_err(|e| WhoIsError::Malformed(e.to_string()))?;
    if r.node.expired == Some(true) {
        return Err(WhoIsError::Malformed(format!(
            "node {} has an expired key",
            r.node.stable_id
        )));
    }
    let node_name = r.node.name.trim_end_matches('.').to_string();
    let computed_name = match r.node.computed_name {
        Some(n) if !n.is_empty() => n,
        _ => node_name.split('.').next().unwrap_or_default().to_string(),
    };
    let capabilities = r
        .cap_map
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.unwrap_or_default()))
        .collect();
    let shared_in = r.node.sharer.is_some_and(|s| s != 0)
        || r.node
            .hostinfo
            .as_ref()
            .and_then(|h| h.sharee_node)
            .unwrap_or(false);
    Ok(TailnetIdentity {
        foreign: shared_in,
        own_node: false,
        stable_id: r.node.stable_id,
        node_name,
        computed_name,
        tags: r.node.tags.unwrap_or_default(),
        login: r.user_profile.login_name,
        capabilities,
    })
}

/// A short-lived cache in front of a [`WhoIs`], keyed by peer IP. Only positive answers are
/// kept, each for at most `ttl`, so a node that leaves or changes address is seen anew
/// within that time; a failure or 404 always asks tailscaled again next time.
pub struct CachedWhoIs {
    inner: Arc<dyn WhoIs>,
    ttl: Duration,
    entries: Mutex<HashMap<IpAddr, (Instant, TailnetIdentity)>>,
    max_entries: usize,
}

impl CachedWhoIs {
    pub fn new(inner: Arc<dyn WhoIs>, ttl: Duration) -> CachedWhoIs {
        CachedWhoIs {
            inner,
            ttl,
            entries: Mutex::new(HashMap::new()),
            max_entries: 65_536,
        }
    }

    /// The cached identity for `ip`, if fresh, and whether the cache answered.
    fn cached(&self, ip: IpAddr) -> Option<TailnetIdentity> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(&ip)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, id)| id.clone())
    }
}

#[async_trait::async_trait]
impl WhoIs for CachedWhoIs {
    async fn whois(&self, addr: SocketAddr) -> Result<Option<TailnetIdentity>, WhoIsError> {
        let ip = canonical(addr).ip();
        if self.ttl.is_zero() {
            return self.inner.whois(addr).await;
        }
        if let Some(hit) = self.cached(ip) {
            return Ok(Some(hit));
        }
        let answer = self.inner.whois(addr).await;
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match &answer {
            Ok(Some(id)) => {
                if entries.len() >= self.max_entries {
                    let ttl = self.ttl;
                    entries.retain(|_, (at, _)| at.elapsed() < ttl);
                    if entries.len() >= self.max_entries {
                        entries.clear();
                    }
                }
                entries.insert(ip, (Instant::now(), id.clone()));
            }
            _ => {
                entries.remove(&ip);
            }
        }
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAGGED: &str = include_str!("../../../tests/fixtures/tailscale/whois-tagged-bot.json");
    const LAPTOP: &str = include_str!("../../../tests/fixtures/tailscale/whois-user-laptop.json");

    #[test]
    fn parses_the_reference_fixtures_unchanged() {
        let bot = parse_whois(TAGGED.as_bytes()).unwrap();
        assert_eq!(bot.computed_name, "ci-bot-07");
        assert_eq!(bot.node_name, "ci-bot-07.tail3f9c2.ts.net");
        assert_eq!(bot.tags, vec!["tag:ci"]);
        assert_eq!(bot.login, "tagged-devices");
        assert_eq!(bot.capabilities["example.com/cap/credbroker"].len(), 2);

        let laptop = parse_whois(LAPTOP.as_bytes()).unwrap();
        assert!(laptop.tags.is_empty());
        assert!(laptop.capabilities.is_empty());
        assert!(laptop.login.contains('@'));
    }

    #[test]
    fn tolerates_missing_optional_fields_and_rejects_garbage() {
        let minimal = r#"{"Node":{"ID":1,"StableID":"n1","Name":"a.b.ts.net.","Addresses":[]},
            "UserProfile":{"ID":2,"LoginName":"x@y","DisplayName":"X"},"CapMap":null,"Extra":1}"#;
        let id = parse_whois(minimal.as_bytes()).unwrap();
        assert_eq!(id.computed_name, "a");
        assert!(parse_whois(b"not json").is_err());
        assert!(parse_whois(b"{}").is_err());
    }

    struct Counting(std::sync::atomic::AtomicUsize, Option<TailnetIdentity>);

    #[async_trait::async_trait]
    impl WhoIs for Counting {
        async fn whois(&self, _: SocketAddr) -> Result<Option<TailnetIdentity>, WhoIsError> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(self.1.clone())
        }
    }

    #[tokio::test]
    async fn cache_keeps_positive_answers_by_ip_only() {
        let id = parse_whois(TAGGED.as_bytes()).unwrap();
        let inner = Arc::new(Counting(Default::default(), Some(id)));
        let cache = CachedWhoIs::new(inner.clone(), Duration::from_secs(60));
        let a: SocketAddr = "100.101.102.103:1000".parse().unwrap();
        let b: SocketAddr = "100.101.102.103:2000".parse().unwrap();
        cache.whois(a).await.unwrap();
        cache.whois(b).await.unwrap();
        assert_eq!(inner.0.load(std::sync::atomic::Ordering::SeqCst), 1);

        let unknown = Arc::new(Counting(Default::default(), None));
        let cache = CachedWhoIs::new(unknown.clone(), Duration::from_secs(60));
        cache.whois(a).await.unwrap();
        cache.whois(a).await.unwrap();
        assert_eq!(unknown.0.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    /// hostname_matches_shared_in_node: shared-in nodes and nodes outside our MagicDNS suffix
    /// are foreign; the broker's own addresses are its own node.
    #[test]
    fn marks_foreign_and_own_nodes() {
        let shared = r#"{"Node":{"ID":1,"StableID":"n1","Name":"builder.other.ts.net.","Sharer":77,
            "ComputedName":"builder.other.ts.net","Addresses":[]},
            "UserProfile":{"ID":2,"LoginName":"x@y","DisplayName":"X"},"CapMap":null}"#;
        assert!(parse_whois(shared.as_bytes()).unwrap().foreign);
        let sharee = r#"{"Node":{"ID":1,"StableID":"n1","Name":"b.tail3f9c2.ts.net.",
            "Hostinfo":{"ShareeNode":true},"Addresses":[]},
            "UserProfile":{"ID":2,"LoginName":"x@y","DisplayName":"X"},"CapMap":null}"#;
        assert!(parse_whois(sharee.as_bytes()).unwrap().foreign);
        let ours = parse_whois(TAGGED.as_bytes()).unwrap();
        assert!(!ours.foreign && !ours.own_node);

        let status = br#"{"BackendState":"Running","MagicDNSSuffix":"tail3f9c2.ts.net",
            "Self":{"DNSName":"broker.tail3f9c2.ts.net.","TailscaleIPs":["100.64.0.7","fd7a:115c:a1e0::7"]}}"#;
        let own = parse_own_node(status).unwrap().unwrap();
        assert_eq!(own.magic_dns_suffix, "tail3f9c2.ts.net");
        let peer: IpAddr = "100.101.102.103".parse().unwrap();
        let mut id = ours.clone();
        mark_against(&mut id, &own, peer);
        assert!(!id.foreign && !id.own_node);
        let mut other = TailnetIdentity {
            node_name: "builder.other.ts.net".into(),
            computed_name: "builder".into(),
            ..Default::default()
        };
        mark_against(&mut other, &own, peer);
        assert!(other.foreign);
        let mut me = ours.clone();
        mark_against(&mut me, &own, "::ffff:100.64.0.7".parse().unwrap());
        assert!(me.own_node);
        let logged_out = br#"{"BackendState":"NeedsLogin","MagicDNSSuffix":""}"#;
        assert_eq!(parse_own_node(logged_out).unwrap(), None);
    }

    #[test]
    fn mapped_v6_is_asked_as_v4() {
        let a: SocketAddr = "[::ffff:100.64.0.1]:5".parse().unwrap();
        assert_eq!(canonical(a).to_string(), "100.64.0.1:5");
    }
}
