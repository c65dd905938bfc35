//! The broker's HTTP API: routes, the shared state handle, and the middleware stack.
//!
//! Stack, outermost first: error mapping → load shedding → concurrency limit → timeout;
//! body size is bounded in the handlers that read bodies (so the error is ours, with a code).
//! Authentication is the [`Caller`](crate::identity::Caller) extractor, taken by each handler
//! that needs one, so unknown paths stay 404 for everyone.

pub mod admin;
pub mod credentials;
pub mod enroll;
mod errors;
pub mod extract;
pub mod health;
pub mod keys;
pub mod requests;

use std::sync::Arc;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::http::{Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use botcreds_proto::ErrorCode;
use tower::ServiceBuilder;

use crate::audit::AuditLog;
use crate::clock::SharedClock;
use crate::error::ApiError;
use crate::grants::TokenIssuer;
use crate::identity::api_key::ApiKeys;
use crate::identity::tailnet::WhoIs;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::reload::PolicyHandle;

/// Everything a request handler may use; a cheap `Clone` handle.
#[derive(Clone)]
pub struct AppState(pub Arc<StateInner>);

pub struct StateInner {
    pub policy: Arc<PolicyHandle>,
    pub issuer: Arc<TokenIssuer>,
    pub audit: AuditLog,
    pub whois: Option<Arc<dyn WhoIs>>,
    /// `[tailscale] trust_own_node`: whether a caller on the broker's own node is that node.
    pub trust_own_node: bool,
    pub api_keys: ApiKeys,
    /// Who may use the admin routes.
    pub admin: crate::identity::config::AdminConfig,
    pub metrics: Metrics,
    pub clock: SharedClock,
    pub limits: Limits,
    /// Approval requests, grants, remembered rules and revocation.
    pub approvals: Arc<crate::approvals::Approvals>,
    /// The CA, enrollment and revocation, when `[tls]` is configured.
    pub mtls: Option<Arc<crate::tls::Mtls>>,
    /// LiteLLM virtual keys, when `[litellm]` is configured.
    pub keys: Option<Arc<crate::keys::KeyService>>,
    /// Every credential handed to a bot: decided, minted and audited.
    pub issuance: Arc<crate::issuance::Issuance>,
}

impl std::ops::Deref for AppState {
    type Target = StateInner;
    fn deref(&self) -> &StateInner {
        &self.0
    }
}

/// The full router with its middleware. `pages`: HTTP routes built above this layer (the
/// approval pages of `web/`), served under the same middleware; `server.rs` composes them.
pub fn router(state: AppState, pages: Router<AppState>) -> Router {
    let limits = state.limits.clone();
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/v1/whoami", get(credentials::whoami))
        .route("/v1/credentials", post(credentials::create))
        .merge(enroll::routes())
        .merge(admin::routes())
        .merge(keys::routes())
        .merge(pages)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(middleware_error))
                .load_shed()
                .concurrency_limit(limits.max_concurrent_requests)
                .timeout(limits.request_timeout),
        )
        // Long-polls hold requests for minutes: outside the timeout and concurrency limit.
        .merge(requests::long_poll_routes())
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such endpoint")
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!("this endpoint does not accept {method}"),
    )
}

async fn middleware_error(err: tower::BoxError) -> axum::response::Response {
    if err.is::<tower::timeout::error::Elapsed>() {
        ApiError::new(ErrorCode::RequestTimeout, "the request took too long").into_response()
    } else if err.is::<tower::load_shed::error::Overloaded>() {
        ApiError::new(ErrorCode::Overloaded, "the broker is busy; retry shortly")
            .with_retry_after(1)
            .into_response()
    } else {
        tracing::error!(error = %err, "middleware error");
        (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
    }
}
