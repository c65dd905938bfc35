//! LiteLLM key routes: `POST /v1/credentials/release`, the admin key routes for the CLI
//! (`/v1/keys`), and the key-provisioner API (`/api/v1/keys/*`), wire-compatible with the
//! key-provisioner design's scripts: its bodies and its `{"error": "..."}` error shape. A bot's
//! `POST /v1/credentials` for a `litellm_key` is the issuance service's (`issuance/litellm.rs`).

use std::net::IpAddr;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Json, Router};
use botcreds_proto::ErrorCode;
use botcreds_proto::audit::{AuditEvent, AuditEventKind};
use botcreds_proto::litellm::{
    IssuedKey, KeyList, KeyRevoked, ServiceKeyRequest, ServiceKeyResponse, UserKeyRequest,
    UserKeyResponse, WorkspaceInfo, WorkspaceKeyRequest, WorkspaceKeyResponse,
};
use serde_json::json;

use super::AppState;
use super::extract::{AdminCaller, Authenticated, PeerAddr, json_body};
use crate::clock::rfc3339_millis;
use crate::error::ApiError;
use crate::identity::{Caller, CallerVia};
use crate::issuance::litellm::{DEFAULT_MIN_REMAINING, workspace_field};
use crate::keys::scopes::{check_name, name_part, parse_budget, parse_duration};
use crate::keys::{
    IssuedLitellmKey, KEY_PROVISIONER, KeyAsk, KeyError, KeyService, OnExisting, Origin,
};
use crate::secret::Secret;

/// Header of the key-provisioner scripts' shared secret.
pub const PROVISIONER_HEADER: &str = "x-provisioner-secret";
/// The scopes `/api/v1/keys/service` issues.
const SERVICE_SCOPES: &[&str] = &["ci", "agent:review", "agent:write"];

pub fn routes() -> Router<AppState> {
    Router::new()
        // A key may be named like a sibling route; DELETE on those paths still revokes it.
        .route(
            "/api/v1/keys/workspace",
            post(workspace_key).delete(
                |State(state): State<AppState>,
                 PeerAddr(peer): PeerAddr,
                 Authenticated(c): Authenticated,
                 h: HeaderMap| {
                    revoke_named(state, peer.ip(), c, h, "workspace".to_string())
                },
            ),
        )
        .route(
            "/api/v1/keys/user",
            post(user_key).delete(
                |State(state): State<AppState>,
                 PeerAddr(peer): PeerAddr,
                 Authenticated(c): Authenticated,
                 h: HeaderMap| {
                    revoke_named(state, peer.ip(), c, h, "user".to_string())
                },
            ),
        )
        .route(
            "/api/v1/keys/service",
            post(service_key).delete(
                |State(state): State<AppState>,
                 PeerAddr(peer): PeerAddr,
                 Authenticated(c): Authenticated,
                 h: HeaderMap| {
                    revoke_named(state, peer.ip(), c, h, "service".to_string())
                },
            ),
        )
        .route("/api/v1/keys/{name}", delete(provisioner_revoke))
        .route("/v1/keys", post(admin_create).get(admin_list))
        .route("/v1/keys/{name}", delete(admin_revoke))
        .route("/v1/keys/{name}/rotate", post(admin_rotate))
        .route("/v1/credentials/release", post(release))
}

// ---------------------------------------------------------------------------------------------
// The key-provisioner API's error shape

/// An error of the `/api/v1/keys/*` routes: `{"error": "<phrase>"}` (plus `name` for key
/// errors, `detail` with the explanation for the errors the design does not show).
struct SeedError {
    status: StatusCode,
    body: serde_json::Value,
}

impl SeedError {
    fn secret() -> SeedError {
        SeedError {
            status: StatusCode::UNAUTHORIZED,
            body: json!({"error": "invalid provisioner secret"}),
        }
    }

    fn not_found(name: &str) -> SeedError {
        SeedError {
            status: StatusCode::NOT_FOUND,
            body: json!({"error": "key not found", "name": name}),
        }
    }

    fn not_configured() -> SeedError {
        SeedError::from(ApiError::new(
            ErrorCode::NotFound,
            "LiteLLM keys are not served by this broker ([litellm] is not configured)",
        ))
    }
}

impl From<ApiError> for SeedError {
    fn from(e: ApiError) -> SeedError {
        let phrase = e.code.as_str().replace('_', " ");
        SeedError {
            status: e.status(),
            body: json!({"error": phrase, "detail": e.message}),
        }
    }
}

impl IntoResponse for SeedError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

fn keys_of(state: &AppState) -> Option<&KeyService> {
    state.keys.as_deref()
}

/// Audit a refused provisioner request of a caller who is known (the secret's holder, an
/// admin, an authenticated user): each one is written.
async fn audit_refusal(state: &AppState, caller: &str, ip: Option<String>, e: &SeedError) {
    let ev = refusal_event(state, caller, ip, e);
    if let Err(err) = state.audit.record(vec![ev]).await {
        tracing::error!(error = %err, "audit log write failed for a refusal");
    }
}

/// Audit the refusal of a caller who could not be identified (a missing or wrong
/// `X-Provisioner-Secret`, a bad Coder session token), coming from `peer`: like the broker's
/// other anonymous refusals, only the first few per peer and window are written one by one
/// (`[limits] audited_refusals_per_peer`), the rest are counted into a summary, so that a
/// flood does not cost one durable write each.
async fn audit_unidentified(state: &AppState, peer: IpAddr, caller: &str, e: &SeedError) {
    let ev = refusal_event(state, caller, Some(peer.to_string()), e);
    if let Err(err) = state.audit.record_refusal(peer, ev).await {
        tracing::error!(error = %err, "audit log write failed for a refusal");
    }
}

fn refusal_event(state: &AppState, caller: &str, ip: Option<String>, e: &SeedError) -> AuditEvent {
    let mut ev = AuditEvent::new(
        AuditEventKind::CredentialDenied,
        rfc3339_millis(state.clock.now()),
    );
    ev.caller = Some(caller.to_string());
    ev.client_ip = ip;
    ev.code = e
        .body
        .get("error")
        .and_then(|v| v.as_str())
        .map(|s| s.replace(' ', "_"));
    ev.detail = Some(format!(
        "litellm key-provisioner API: {}",
        crate::issued::denial_detail(
            e.body
                .get("detail")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
        )
    ));
    ev
}

/// Who may use a provisioner route: the `X-Provisioner-Secret` holder (`provisioner`), or an
/// admin. A wrong secret is refused even when the caller is an admin.
/// The provisioner routes' gate: the `X-Provisioner-Secret` header (constant-time compare) or an
/// admin caller. Answers the key service, the actor in words and the caller's address; a refusal
/// is audited.
async fn provisioner_gate<'s>(
    state: &'s AppState,
    peer: IpAddr,
    headers: &HeaderMap,
    caller: &Result<Caller, ApiError>,
) -> Result<(&'s KeyService, String, Option<String>), SeedError> {
    let Some(keys) = keys_of(state) else {
        return Err(SeedError::not_configured());
    };
    let ip = peer_ip(caller);
    let actor = if let Some(value) = headers.get(PROVISIONER_HEADER) {
        if keys.provisioner_secret_matches(value.as_bytes()) {
            Ok("provisioner".to_string())
        } else {
            tracing::warn!("wrong X-Provisioner-Secret");
            Err(SeedError::secret())
        }
    } else {
        match caller {
            Ok(c) if crate::identity::admin::is_admin(&state.admin, c) => Ok(c.describe()),
            _ => Err(SeedError::secret()),
        }
    };
    match actor {
        Ok(actor) => Ok((keys, actor, ip)),
        Err(e) => {
            audit_unidentified(state, peer, "provisioner", &e).await;
            Err(e)
        }
    }
}

/// The design's `created_by`: the provisioner's own name for its calls, else the admin.
fn created_by(actor: &str) -> String {
    if actor == "provisioner" {
        KEY_PROVISIONER.to_string()
    } else {
        actor.to_string()
    }
}

fn peer_ip(caller: &Result<Caller, ApiError>) -> Option<String> {
    caller.as_ref().ok().map(|c| c.address.ip().to_string())
}

fn field(name: &str, value: Option<String>) -> Result<String, ApiError> {
    workspace_field(name, value.as_deref())
        .map_err(|message| ApiError::new(ErrorCode::InvalidWorkspace, message))
}

fn workspace_info(r: WorkspaceKeyRequest) -> Result<WorkspaceInfo, ApiError> {
    Ok(WorkspaceInfo {
        workspace_id: field("workspace_id", r.workspace_id)?,
        workspace_name: field("workspace_name", r.workspace_name)?,
        coder_user: field("coder_user", r.coder_user)?,
        coder_user_id: field("coder_user_id", r.coder_user_id)?,
    })
}

/// `POST /api/v1/keys/workspace`: the startup script's call.
async fn workspace_key(
    State(state): State<AppState>,
    PeerAddr(peer): PeerAddr,
    Authenticated(caller): Authenticated,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<WorkspaceKeyResponse>, SeedError> {
    let (keys, actor, ip) = provisioner_gate(&state, peer.ip(), &headers, &caller).await?;
    let result = async {
        let request: WorkspaceKeyRequest = json_body(&headers, body).await?;
        let info = workspace_info(request)?;
        let created_by = created_by(&actor);
        let origin = Origin {
            created_by,
            caller: actor.clone(),
            client_ip: ip.clone(),
            // The secret's holder and the admins are one gatekeeper of the provisioner API.
            owner: "provisioner".into(),
            ..Default::default()
        };
        keys.issue_workspace(
            info.clone(),
            origin,
            DEFAULT_MIN_REMAINING,
            None,
            Vec::new(),
        )
        .await
        .map(|k| (k, info))
        .map_err(ApiError::from)
    }
    .await;
    let (k, info) = match result {
        Ok(v) => v,
        Err(e) => {
            let e = SeedError::from(e);
            audit_refusal(&state, &actor, ip, &e).await;
            return Err(e);
        }
    };
    Ok(Json(WorkspaceKeyResponse {
        key: k.key.expose().to_string(),
        scope: k.record.scope.clone(),
        budget_usd: k.record.budget_usd,
        rpm_limit: k.record.rpm_limit,
        models: k.record.models.clone(),
        expires_at: k.record.expires_at.clone(),
        metadata: info,
    }))
}

/// Read an optional JSON body: an empty body without a Content-Type is the default value.
async fn optional_json<T: serde::de::DeserializeOwned + Default>(
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ApiError> {
    if headers.get(axum::http::header::CONTENT_TYPE).is_none() {
        let bytes = axum::body::to_bytes(body, botcreds_proto::MAX_BODY_BYTES)
            .await
            .map_err(|_| {
                ApiError::new(ErrorCode::BodyTooLarge, "the body is larger than 64 KiB")
            })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(T::default());
        }
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "send the body as Content-Type: application/json",
        ));
    }
    json_body(headers, body).await
}

/// `POST /api/v1/keys/user`: a self-service key for the user behind a Coder session token
/// (`Authorization: Bearer`), or for the tailnet user of the calling device.
async fn user_key(
    State(state): State<AppState>,
    PeerAddr(peer): PeerAddr,
    Authenticated(caller): Authenticated,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<UserKeyResponse>, SeedError> {
    let Some(keys) = keys_of(&state) else {
        return Err(SeedError::not_configured());
    };
    let ip = peer_ip(&caller);
    let who = async {
        if let Some(value) = headers.get(axum::http::header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(|t| Secret::new(t.trim()))
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::InvalidSessionToken,
                        "the Authorization header must be `Bearer <Coder session token>`",
                    )
                })?;
            // A credential of ours is never sent to a third party, not even to ask whose it is.
            if is_our_credential(&state, keys, &token) {
                tracing::warn!("a botcreds credential was sent as a Coder session token; not forwarded");
                return Err(ApiError::new(
                    ErrorCode::InvalidSessionToken,
                    "this is a botcreds credential (an API key, the provisioner secret or a LiteLLM \
                     key), not a Coder session token; it was not sent to Coder",
                ));
            }
            let Some(coder) = keys.coder() else {
                return Err(ApiError::new(
                    ErrorCode::InvalidSessionToken,
                    "this broker checks no Coder session tokens ([coder] url is not configured)",
                ));
            };
            let user = coder.current_user(&token).await?;
            return Ok((
                user.username.clone(),
                Some(user.id.clone()),
                format!("coder:{}", user.username),
                format!("coder:{}", user.id),
            ));
        }
        match &caller {
            Ok(c) => match &c.via {
                CallerVia::Tailnet(t) if !t.is_tagged() => Ok((
                    t.login.clone(),
                    None,
                    c.describe(),
                    format!("user:{}", t.login),
                )),
                _ => Err(ApiError::new(
                    ErrorCode::Unauthenticated,
                    "a user key needs a Coder session token or a tailnet user's own device",
                )),
            },
            Err(e) => Err(e.clone()),
        }
    }
    .await;
    let (user, user_id, describe, owner) = match who {
        Ok(w) => w,
        Err(e) => {
            let e = SeedError::from(e);
            audit_unidentified(&state, peer.ip(), "user", &e).await;
            return Err(e);
        }
    };
    let result = async {
        let request: UserKeyRequest = optional_json(&headers, body).await?;
        if let Some(named) = request.coder_user.as_deref()
            && !named.eq_ignore_ascii_case(&user)
        {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "coder_user {:?} is not the authenticated user",
                    named.chars().take(64).collect::<String>()
                ),
            ));
        }
        keys.issue(KeyAsk {
            scope: "user".into(),
            name: format!("{}-cli", name_part(&user)),
            budget_usd: None,
            lifetime: None,
            origin: Origin {
                created_by: user.clone(),
                coder_user: Some(user.clone()),
                coder_user_id: user_id.clone(),
                caller: describe.clone(),
                client_ip: ip.clone(),
                owner: owner.clone(),
                ..Default::default()
            },
            // Asking again replaces the user's own key (not another holder's key of that
            // name: that is `key_exists`): the old one is deleted.
            on_existing: OnExisting::Rotate,
            preamble: Vec::new(),
            reason: None,
        })
        .await
        .map_err(ApiError::from)
    }
    .await;
    let k = match result {
        Ok(k) => k,
        Err(e) => {
            let e = SeedError::from(e);
            audit_refusal(&state, &describe, ip, &e).await;
            return Err(e);
        }
    };
    Ok(Json(UserKeyResponse {
        key: k.key.expose().to_string(),
        scope: k.record.scope.clone(),
        budget_usd: k.record.budget_usd,
        rpm_limit: k.record.rpm_limit,
        models: k.record.models.clone(),
        expires_at: k.record.expires_at.clone(),
    }))
}

/// Validate a service/admin create request into an ask.
fn service_ask(
    keys: &KeyService,
    r: ServiceKeyRequest,
    allowed: &[&str],
    origin: Origin,
) -> Result<KeyAsk, ApiError> {
    let scope_name = r.scope.unwrap_or_default();
    let spec = keys.scopes().lookup(&scope_name)?;
    if !allowed.contains(&scope_name.as_str()) {
        return Err(ApiError::new(
            ErrorCode::InvalidScope,
            format!(
                "this endpoint issues {} keys, not {scope_name}",
                allowed.join(", ")
            ),
        ));
    }
    let name = r.name.unwrap_or_default();
    check_name(&name)?;
    let budget_usd = r
        .budget_usd
        .as_ref()
        .map(|b| parse_budget(b, spec))
        .transpose()?;
    let lifetime = r
        .duration
        .as_deref()
        .map(|d| parse_duration(d, spec))
        .transpose()?;
    Ok(KeyAsk {
        scope: scope_name,
        name,
        budget_usd,
        lifetime,
        origin,
        on_existing: OnExisting::Conflict,
        preamble: Vec::new(),
        reason: None,
    })
}

/// `POST /api/v1/keys/service`: a ci / agent key, for the provisioner secret or an admin.
async fn service_key(
    State(state): State<AppState>,
    PeerAddr(peer): PeerAddr,
    Authenticated(caller): Authenticated,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ServiceKeyResponse>, SeedError> {
    let (keys, actor, ip) = provisioner_gate(&state, peer.ip(), &headers, &caller).await?;
    let result = async {
        let request: ServiceKeyRequest = json_body(&headers, body).await?;
        let created_by = created_by(&actor);
        let origin = Origin {
            created_by,
            caller: actor.clone(),
            client_ip: ip.clone(),
            ..Default::default()
        };
        let ask = service_ask(keys, request, SERVICE_SCOPES, origin)?;
        keys.issue(ask).await.map_err(ApiError::from)
    }
    .await;
    let k = match result {
        Ok(k) => k,
        Err(e) => {
            let e = SeedError::from(e);
            audit_refusal(&state, &actor, ip, &e).await;
            return Err(e);
        }
    };
    Ok(Json(ServiceKeyResponse {
        key: k.key.expose().to_string(),
        scope: k.record.scope.clone(),
        name: k.record.name.clone(),
        budget_usd: k.record.budget_usd,
        rpm_limit: k.record.rpm_limit,
        models: k.record.models.clone(),
        expires_at: k.record.expires_at.clone(),
    }))
}

/// `DELETE /api/v1/keys/{name}`: revoke a key by name (deleted in LiteLLM at once).
async fn provisioner_revoke(
    State(state): State<AppState>,
    PeerAddr(peer): PeerAddr,
    Authenticated(caller): Authenticated,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<KeyRevoked>, SeedError> {
    revoke_named(state, peer.ip(), caller, headers, name).await
}

async fn revoke_named(
    state: AppState,
    peer: IpAddr,
    caller: Result<Caller, ApiError>,
    headers: HeaderMap,
    name: String,
) -> Result<Json<KeyRevoked>, SeedError> {
    let (keys, actor, _) = provisioner_gate(&state, peer, &headers, &caller).await?;
    match keys.revoke_by_name(&name, &actor).await {
        Ok(r) => Ok(Json(r)),
        Err(KeyError::NotFound(_)) => Err(SeedError::not_found(&name)),
        Err(e) => Err(SeedError::from(ApiError::from(e))),
    }
}

// ---------------------------------------------------------------------------------------------
// Admin routes for `botcreds keys`

fn admin_keys(state: &AppState) -> Result<&KeyService, ApiError> {
    keys_of(state).ok_or_else(|| {
        ApiError::new(
            ErrorCode::NotFound,
            "LiteLLM keys are not served by this broker ([litellm] is not configured)",
        )
    })
}

fn issued_key(k: IssuedLitellmKey) -> IssuedKey {
    IssuedKey {
        key: k.key.expose().to_string(),
        name: k.record.name.clone(),
        scope: k.record.scope.clone(),
        budget_usd: k.record.budget_usd,
        budget_period: k.record.budget_period.clone(),
        rpm_limit: k.record.rpm_limit,
        models: k.record.models.clone(),
        expires_at: k.record.expires_at.clone(),
        credential_id: k.record.credential_id.clone(),
        replaced: k.replaced,
    }
}

/// `GET /v1/keys`: every key the broker knows (never the keys themselves).
async fn admin_list(
    State(state): State<AppState>,
    AdminCaller(_admin): AdminCaller,
) -> Result<Json<KeyList>, ApiError> {
    let keys = admin_keys(&state)?;
    Ok(Json(KeyList { keys: keys.list()? }))
}

/// `POST /v1/keys`: an admin creates a key of any scope but `workspace` (which needs a Coder
/// workspace; the provisioner route makes those).
async fn admin_create(
    State(state): State<AppState>,
    AdminCaller(admin): AdminCaller,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<IssuedKey>, ApiError> {
    let keys = admin_keys(&state)?;
    let request: ServiceKeyRequest = json_body(&headers, body).await?;
    let origin = Origin {
        created_by: admin.describe(),
        caller: admin.describe(),
        client_ip: Some(admin.address.ip().to_string()),
        ..Default::default()
    };
    let ask = service_ask(
        keys,
        request,
        &["user", "ci", "agent:review", "agent:write"],
        origin,
    )?;
    Ok(Json(issued_key(keys.issue(ask).await?)))
}

/// `DELETE /v1/keys/{name}`.
async fn admin_revoke(
    State(state): State<AppState>,
    AdminCaller(admin): AdminCaller,
    Path(name): Path<String>,
) -> Result<Json<KeyRevoked>, ApiError> {
    let keys = admin_keys(&state)?;
    Ok(Json(keys.revoke_by_name(&name, &admin.describe()).await?))
}

/// `POST /v1/keys/{name}/rotate`: a new key under the same name; the old one deleted.
async fn admin_rotate(
    State(state): State<AppState>,
    AdminCaller(admin): AdminCaller,
    Path(name): Path<String>,
) -> Result<Json<IssuedKey>, ApiError> {
    let keys = admin_keys(&state)?;
    Ok(Json(issued_key(
        keys.rotate(&name, &admin.describe()).await?,
    )))
}

// ---------------------------------------------------------------------------------------------
// Bots: POST /v1/credentials (litellm_key) and release

/// Body of `POST /v1/credentials/release`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    credential_id: String,
}

/// `POST /v1/credentials/release`: the caller gives back one of its own LiteLLM keys, which is
/// deleted in LiteLLM at once. Answers `{"released": true, "credential_id", "kind", "name",
/// "revoked_at", "deleted_upstream"}`; ids of other callers' keys, of GitHub tokens, or unknown
/// ones are `unknown_credential` (404).
async fn release(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<crate::keys::Released>, ApiError> {
    let caller = caller?;
    let request: ReleaseBody = json_body(&headers, body).await?;
    let Some(keys) = keys_of(&state) else {
        return Err(ApiError::new(
            ErrorCode::UnknownCredential,
            "the broker holds no releasable credential with this id",
        ));
    };
    let bot = state.policy.current().bot_for(&caller).map(str::to_string);
    let released = keys
        .release(&request.credential_id, &caller.describe(), bot.as_deref())
        .await?;
    Ok(Json(released))
}

/// Whether a presented bearer value is one of the broker's own credentials: an API key of ours
/// (by format or by hash), the provisioner secret, or a LiteLLM key (`sk-...`).
fn is_our_credential(state: &AppState, keys: &KeyService, token: &Secret) -> bool {
    let t = token.expose();
    t.starts_with("bck_")
        || t.starts_with("sk-")
        || state.api_keys.verify(t).is_some()
        || keys.provisioner_secret_matches(t.as_bytes())
}
