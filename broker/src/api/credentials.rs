//! `POST /v1/credentials` (a credential under the policy, any kind) and `GET /v1/whoami`.
//!
//! The handler authenticates, reads the body and hands it to the issuance service
//! ([`crate::issuance`]), which validates, decides, mints and audits; the answer is the
//! credential, or `202` with the approval request to wait on.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use botcreds_proto::CredentialRequest;
use botcreds_proto::credential::WhoAmI;

use super::AppState;
use super::extract::{Authenticated, PeerAddr, json_body};
use crate::error::ApiError;
use crate::identity::CallerVia;
use crate::issuance::{Answer, Wait};

pub async fn whoami(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Json<WhoAmI>, ApiError> {
    let caller = caller?;
    let bot = state.policy.current().bot_for(&caller).map(str::to_string);
    let (via, node, login, tags) = match &caller.via {
        CallerVia::Tailnet(t) => (
            "tailnet",
            Some(t.node_name.clone()),
            (!t.is_tagged()).then(|| t.login.clone()),
            t.tags.clone(),
        ),
        CallerVia::ApiKey { .. } => ("api_key", None, None, Vec::new()),
        CallerVia::Mtls { .. } => ("mtls", None, None, Vec::new()),
    };
    Ok(Json(WhoAmI {
        bot,
        via: via.to_string(),
        node,
        login,
        tags,
        address: caller.address.ip().to_string(),
    }))
}

pub async fn create(
    State(state): State<AppState>,
    PeerAddr(peer): PeerAddr,
    Authenticated(caller): Authenticated,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = match caller {
        Ok(c) => c,
        Err(e) => {
            super::extract::audit_unauthenticated(&state, peer, &e).await;
            return Err(e);
        }
    };
    let mut request: CredentialRequest = match json_body(&headers, body).await {
        Ok(r) => r,
        Err(e) => {
            state
                .issuance
                .refuse_unread(&caller, e.code.as_str(), &e.message)
                .await;
            return Err(e);
        }
    };
    let wait = Wait::new(request.wait.take());
    let answer = state.issuance.request(&caller, request, wait).await?;
    Ok(answer_response(answer))
}

/// The response for an answer: the credential, or `202` with the pending approval request.
pub(crate) fn answer_response(answer: Answer) -> Response {
    match answer {
        Answer::Issued(credential) => Json(credential).into_response(),
        Answer::Pending(view) => (StatusCode::ACCEPTED, Json(view)).into_response(),
    }
}
