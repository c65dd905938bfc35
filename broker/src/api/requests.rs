//! `GET /v1/requests/{id}?wait=30s`: a bot's long-poll on its own approval request, answered
//! by the issuance service — the credential once approved, `202` while pending.

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::get;
use botcreds_proto::ErrorCode;

use super::AppState;
use super::credentials::answer_response;
use super::extract::Authenticated;
use crate::error::ApiError;
use crate::issuance::Wait;

/// Routes that may hold a request open for minutes; merged outside the request timeout.
pub fn long_poll_routes() -> Router<AppState> {
    Router::new().route("/v1/requests/{id}", get(poll))
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PollQuery {
    wait: Option<String>,
}

/// `GET /v1/requests/{id}?wait=30s`: the caller's own request, waited on.
async fn poll(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Path(id): Path<String>,
    query: Result<Query<PollQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let caller = caller?;
    let Query(query) = query.map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidWait,
            format!("bad query (only `wait` is allowed): {e}"),
        )
    })?;
    let answer = state
        .issuance
        .poll(&caller, &id, Wait::new(query.wait))
        .await?;
    Ok(answer_response(answer))
}
