//! Extractors: the authenticated [`Caller`], and JSON bodies with bounded size and
//! error codes of our own.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, request::Parts};
use botcreds_proto::{ErrorCode, MAX_BODY_BYTES};
use serde::de::DeserializeOwned;

use super::AppState;
use crate::error::ApiError;
use crate::identity::{Caller, CallerVia};
use crate::tls::VerifiedPeer;

/// Where the request came from, whatever its authentication.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

impl<S: Send + Sync> FromRequestParts<S> for PeerAddr {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<PeerAddr, ApiError> {
        parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| PeerAddr(c.0))
            .ok_or_else(|| ApiError::internal("connection has no peer address"))
    }
}

/// The address the connection was accepted on (this host's side).
#[derive(Clone, Copy, Debug)]
pub struct LocalAddr(pub SocketAddr);

/// Whether a connection is from this very host over a non-loopback address (a local user
/// reaching the broker on the node's own tailnet address): such a caller is the own node.
/// Loopback is left out: tailscaled never names a loopback peer.
pub fn from_own_host(local: Option<SocketAddr>, peer: SocketAddr) -> bool {
    let unmap = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        std::net::IpAddr::V4(_) => ip,
    };
    let peer = unmap(peer.ip());
    local.is_some_and(|l| unmap(l.ip()) == peer) && !peer.is_loopback()
}

/// Authentication outcome, handed to handlers so that they can audit refusals too.
pub struct Authenticated(pub Result<Caller, ApiError>);

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let PeerAddr(address) = PeerAddr::from_request_parts(parts, state).await?;
        // On the mTLS listener the verified client certificate is the identity.
        if let Some(peer) = parts.extensions.get::<Arc<VerifiedPeer>>().cloned() {
            return Ok(Authenticated(match &state.mtls {
                Some(mtls) => mtls
                    .authenticate(&peer, address)
                    .await
                    .map_err(ApiError::from),
                None => Err(ApiError::internal("a TLS connection without [tls]")),
            }));
        }
        let local = parts.extensions.get::<LocalAddr>().map(|l| l.0);
        Ok(Authenticated(
            authenticate(state, &parts.headers, address, local).await,
        ))
    }
}

async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    address: SocketAddr,
    local: Option<SocketAddr>,
) -> Result<Caller, ApiError> {
    if let Some(value) = headers.get(AUTHORIZATION) {
        let key = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidApiKey,
                    "the Authorization header must be `Bearer <api key>`",
                )
            })?;
        return match state.api_keys.verify(key) {
            Some(bot) => {
                let caller = Caller {
                    address,
                    via: CallerVia::ApiKey {
                        bot: bot.to_string(),
                    },
                };
                // An `[[api_keys]]` entry speaks for a policy bot only when that bot is
                // `type: api_key`; a key naming a bot recognised otherwise (a tag, a host) would
                // otherwise act under that bot's name, next to it.
                let policy = state.policy.current();
                if policy.has_bot(bot) && policy.bot_for(&caller).is_none() {
                    tracing::warn!(
                        bot,
                        "API key for a bot whose policy identity is not api_key"
                    );
                    return Err(ApiError::new(
                        ErrorCode::InvalidApiKey,
                        format!(
                            "this API key names bot {bot:?}, whose policy identity is {}, not \
                             `type: api_key`",
                            policy.identity_of(bot).unwrap_or_default()
                        ),
                    ));
                }
                Ok(caller)
            }
            None => Err(ApiError::new(ErrorCode::InvalidApiKey, "unknown API key")),
        };
    }
    let Some(whois) = &state.whois else {
        return Err(ApiError::new(
            ErrorCode::Unauthenticated,
            "no API key presented, and tailnet identity is not enabled on this broker",
        ));
    };
    let answer = whois.whois(address).await.map(|found| {
        found.map(|mut identity| {
            identity.own_node |= from_own_host(local, address);
            identity
        })
    });
    match answer {
        Ok(Some(identity)) if identity.own_node && !state.trust_own_node => {
            // Any local user of the broker's host connects from the node's own address; the
            // node's identity (its tags, its owner) is not theirs.
            tracing::warn!(peer = %address, "a caller on the broker's own node");
            Err(ApiError::new(
                ErrorCode::Unauthenticated,
                "calls from the broker's own node do not carry the node's tailnet identity; \
                 use an API key or a client certificate ([tailscale] trust_own_node)",
            ))
        }
        Ok(Some(identity)) => Ok(Caller {
            address,
            via: CallerVia::Tailnet(identity),
        }),
        Ok(None) => Err(ApiError::new(
            ErrorCode::Unauthenticated,
            format!(
                "{} is not a known tailnet peer and presented no API key",
                address.ip()
            ),
        )),
        Err(e) => {
            tracing::warn!(error = %e, peer = %address, "WhoIs failed");
            Err(ApiError::new(
                ErrorCode::IdentityUnavailable,
                "tailscaled could not say who is calling; retry shortly",
            )
            .with_retry_after(1))
        }
    }
}

/// Audit the refusal of a request whose caller could not be identified, coming from `peer`:
/// per peer only the first few are written one by one (`[limits] audited_refusals_per_peer`),
/// the rest are counted into a summary; the request metrics count every one.
pub async fn audit_unauthenticated(state: &AppState, peer: SocketAddr, error: &ApiError) {
    let mut e = botcreds_proto::audit::AuditEvent::new(
        botcreds_proto::audit::AuditEventKind::CredentialDenied,
        crate::clock::rfc3339_millis(state.clock.now()),
    );
    e.client_ip = Some(peer.ip().to_string());
    e.code = Some(error.code.as_str().to_string());
    e.detail = Some(crate::issued::denial_detail(&error.message));
    state.metrics.request(None, error.code.as_str());
    if let Err(err) = state.audit.record_refusal(peer.ip(), e).await {
        tracing::error!(error = %err, "audit log write failed for a refusal");
    }
}

/// An authenticated caller who is an admin (`[admin]` in broker.toml); others get 403, and
/// callers who cannot be identified 401.
pub struct AdminCaller(pub Caller);

impl FromRequestParts<AppState> for AdminCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Authenticated(caller) = Authenticated::from_request_parts(parts, state).await?;
        let caller = caller?;
        if crate::identity::admin::is_admin(&state.admin, &caller) {
            Ok(AdminCaller(caller))
        } else {
            tracing::warn!(caller = %caller.describe(), "non-admin caller on an admin route");
            Err(ApiError::new(
                ErrorCode::Forbidden,
                "this endpoint is for botcreds admins ([admin] in broker.toml)",
            ))
        }
    }
}

/// Read a JSON body: `application/json`, at most 64 KiB, and well-formed; each failure
/// with its own code.
pub async fn json_body<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ApiError> {
    let is_json = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "send the body as Content-Type: application/json",
        ));
    }
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|e| {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit");
            if too_large {
                ApiError::new(ErrorCode::BodyTooLarge, "the body is larger than 64 KiB")
            } else {
                ApiError::new(ErrorCode::RequestTimeout, "the body could not be read")
            }
        })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        use serde_json::error::Category;
        let code = match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => ErrorCode::InvalidJson,
            Category::Data => ErrorCode::InvalidRequest,
        };
        ApiError::new(code, format!("bad request body: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// own_node_inherits_admin: a local user reaching the broker on the node's own address.
    #[test]
    fn own_host_is_the_same_non_loopback_address() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        let cases = [
            (Some("100.64.0.7:8443"), "100.64.0.7:5000", true),
            (Some("[::ffff:100.64.0.7]:8443"), "100.64.0.7:5000", true),
            (
                Some("[fd7a:115c:a1e0::7]:8443"),
                "[fd7a:115c:a1e0::7]:5000",
                true,
            ),
            (Some("100.64.0.7:8443"), "100.64.0.8:5000", false),
            (Some("127.0.0.1:8443"), "127.0.0.1:5000", false),
            (None, "100.64.0.7:5000", false),
        ];
        for (local, peer, want) in cases {
            assert_eq!(
                from_own_host(local.map(at), at(peer)),
                want,
                "{local:?} {peer}"
            );
        }
    }
}
