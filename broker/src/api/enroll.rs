//! mTLS enrollment routes: `POST /v1/enroll` (join token or tailnet identity + CSR),
//! `POST /v1/enroll/renew` (over mTLS), and the admin routes behind `botcreds enroll create`
//! and `botcreds certs list|revoke`. The substance lives in `crate::tls`.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use botcreds_proto::ErrorCode;
use botcreds_proto::Ttl;
use botcreds_proto::enroll::{
    CertList, EnrollRequest, EnrolledCertificate, JoinToken, JoinTokenRequest, RenewRequest,
    RevokeCertRequest, RevokedCerts,
};

use super::AppState;
use super::extract::{AdminCaller, Authenticated, PeerAddr, json_body};
use crate::error::ApiError;
use crate::tls::{DEFAULT_JOIN_TOKEN_TTL, Mtls};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/enroll", post(enroll))
        .route("/v1/enroll/renew", post(renew))
        .route("/v1/enroll/tokens", post(create_token))
        .route("/v1/certs", get(list))
        .route("/v1/certs/revoke", post(revoke))
}

fn mtls(state: &AppState) -> Result<Arc<Mtls>, ApiError> {
    state.mtls.clone().ok_or_else(|| {
        ApiError::new(
            ErrorCode::NotFound,
            "mTLS is not enabled on this broker (no [tls] in broker.toml)",
        )
    })
}

async fn enroll(
    State(state): State<AppState>,
    PeerAddr(address): PeerAddr,
    Authenticated(caller): Authenticated,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<EnrolledCertificate>, ApiError> {
    let mtls = mtls(&state)?;
    let request: EnrollRequest = json_body(&headers, body).await?;
    if let Some(token) = request.token.as_deref() {
        return Ok(Json(
            mtls.enroll_with_token(address, request.bot.as_deref(), token, &request.csr)
                .await?,
        ));
    }
    // Without a token the caller's identity is what enrolls: none means a token is needed.
    let Ok(caller) = caller else {
        return Err(mtls
            .enroll_tailnet_refused(address, request.bot.as_deref())
            .await
            .into());
    };
    let policy = state.policy.current();
    let policy_bot = policy.bot_for(&caller);
    let certificate = mtls
        .enroll_tailnet(
            &caller,
            policy_bot,
            policy_bot.is_some_and(|b| policy.identity_is_assigned(b)),
            request.bot.as_deref(),
            &request.csr,
        )
        .await?;
    Ok(Json(certificate))
}

async fn renew(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<EnrolledCertificate>, ApiError> {
    let mtls = mtls(&state)?;
    let caller = caller?;
    let request: RenewRequest = json_body(&headers, body).await?;
    Ok(Json(mtls.renew(&caller, &request.csr).await?))
}

async fn create_token(
    State(state): State<AppState>,
    AdminCaller(admin): AdminCaller,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<JoinToken>, ApiError> {
    let mtls = mtls(&state)?;
    let request: JoinTokenRequest = json_body(&headers, body).await?;
    let ttl = match request.ttl.as_deref() {
        None => DEFAULT_JOIN_TOKEN_TTL,
        Some(t) => t
            .parse::<Ttl>()
            .map_err(|e| ApiError::new(ErrorCode::InvalidTtl, e.to_string()))?
            .as_duration(),
    };
    let token = mtls
        .create_join_token(&admin, &request.bot, ttl, request.admin)
        .await?;
    Ok(Json(token))
}

async fn list(
    State(state): State<AppState>,
    AdminCaller(_): AdminCaller,
) -> Result<Json<CertList>, ApiError> {
    let mtls = mtls(&state)?;
    Ok(Json(CertList {
        certificates: mtls.list(),
    }))
}

async fn revoke(
    State(state): State<AppState>,
    AdminCaller(admin): AdminCaller,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<RevokedCerts>, ApiError> {
    let mtls = mtls(&state)?;
    let request: RevokeCertRequest = json_body(&headers, body).await?;
    let revoked = match (request.serial.as_deref(), request.bot.as_deref()) {
        (Some(serial), None) => mtls.revoke_serial(&admin, serial).await?,
        (None, Some(bot)) => mtls.revoke_bot(&admin, bot).await?,
        _ => {
            return Err(ApiError::new(
                ErrorCode::InvalidRevokeTarget,
                "name exactly one of serial or bot",
            ));
        }
    };
    Ok(Json(RevokedCerts { revoked }))
}
