//! Admin routes under `/v1/admin/`: approvals (list, show, approve, approve-all, deny), the
//! audit log, revocation, grants, bots and the policy with its remembered rules. Every
//! handler takes [`AdminCaller`], so non-admins get 403 and unidentified callers 401.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use botcreds_proto::approval::{
    ApprovalList, ApprovalRequestView, ApproveAllAnswer, ApproveAllBody, ApproveBody, AuditList,
    BotList, BotView, DecisionAnswer, DenyBody, GrantList, PolicyBotView, PolicyView,
    RememberedRuleView, RevokeAnswer, RevokeBody,
};
use botcreds_proto::audit::AuditEventKind;
use botcreds_proto::{ErrorCode, RepoName, Ttl};

use super::AppState;
use super::extract::{AdminCaller, json_body};
use crate::approvals::RevokeTarget;
use crate::clock::rfc3339_millis;
use crate::error::ApiError;
use crate::identity::{Caller, CallerVia};
use crate::issuance::deploy_key::{RevokeKeys, RevokedKey};
use crate::policy::Resource;
use crate::store::AuditFilter;

/// The deciding admin as the approval service sees them: how decisions record them, and
/// whose requests their own identity makes under the current policy (self-approval check).
pub fn approver(state: &AppState, caller: &Caller) -> crate::approvals::Approver {
    let bot = state.policy.current().bot_for(caller).map(str::to_string);
    crate::approvals::Approver::new(
        actor(caller),
        crate::approvals::owner_of(bot.as_deref(), caller),
    )
}

/// Query parameters as a map, with a rejection turned into `invalid_filter`.
pub fn query_map(
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<HashMap<String, String>, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::new(ErrorCode::InvalidFilter, format!("bad query: {e}")))
}

/// Most audit events one query returns.
const MAX_AUDIT_LIMIT: usize = 10_000;
const DEFAULT_AUDIT_LIMIT: usize = 1_000;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/approvals", get(list_approvals))
        .route("/v1/admin/approvals/approve-all", post(approve_all))
        .route("/v1/admin/approvals/{id}", get(show_approval))
        .route("/v1/admin/approvals/{id}/approve", post(approve))
        .route("/v1/admin/approvals/{id}/deny", post(deny))
        .route("/v1/admin/audit", get(audit))
        .route("/v1/admin/revoke", post(revoke))
        .route("/v1/admin/grants", get(grants))
        .route("/v1/admin/bots", get(bots))
        .route("/v1/admin/policy", get(policy))
        .route("/v1/admin/policy/remembered/{rule_id}", delete(forget))
}

/// The admin's identity in words, as decisions record it: `tailnet:alice@example.com`,
/// `tailnet:tag:admin`, `api_key:ops`.
pub fn actor(caller: &Caller) -> String {
    match &caller.via {
        CallerVia::Tailnet(t) if !t.is_tagged() && !t.login.is_empty() => {
            format!("tailnet:{}", t.login)
        }
        _ => caller.describe(),
    }
}

async fn list_approvals(
    State(state): State<AppState>,
    AdminCaller(_): AdminCaller,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<ApprovalList>, ApiError> {
    let query = query_map(query)?;
    let mut bot = None;
    for (k, v) in &query {
        match k.as_str() {
            "bot" => bot = Some(v.clone()),
            _ => return Err(bad_filter(k)),
        }
    }
    let mut requests = state.approvals.pending()?;
    if let Some(bot) = bot {
        requests.retain(|r| r.bot.as_deref() == Some(bot.as_str()));
    }
    Ok(Json(ApprovalList { requests }))
}

async fn show_approval(
    State(state): State<AppState>,
    AdminCaller(_): AdminCaller,
    Path(id): Path<String>,
) -> Result<Json<ApprovalRequestView>, ApiError> {
    Ok(Json(state.approvals.get(&id)?))
}

async fn approve(
    State(state): State<AppState>,
    AdminCaller(caller): AdminCaller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<DecisionAnswer>, ApiError> {
    let body: ApproveBody = json_body(&headers, body).await?;
    let answer = state
        .approvals
        .approve_checked(
            &approver(&state, &caller),
            &id,
            body.persist,
            body.bot.as_deref(),
        )
        .await?;
    Ok(Json(answer))
}

async fn approve_all(
    State(state): State<AppState>,
    AdminCaller(caller): AdminCaller,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ApproveAllAnswer>, ApiError> {
    let body: ApproveAllBody = json_body(&headers, body).await?;
    known_bot(&state, &body.bot)?;
    let approved = state
        .approvals
        .approve_all(&approver(&state, &caller), &body.bot, body.persist)
        .await?;
    Ok(Json(ApproveAllAnswer { approved }))
}

async fn deny(
    State(state): State<AppState>,
    AdminCaller(caller): AdminCaller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<DecisionAnswer>, ApiError> {
    let body: DenyBody = json_body(&headers, body).await?;
    let answer = state
        .approvals
        .deny_checked(
            &actor(&caller),
            &id,
            body.reason.as_deref(),
            body.bot.as_deref(),
        )
        .await?;
    Ok(Json(answer))
}

/// `GET /v1/admin/audit?since=24h&bot=NAME&event=KIND&limit=N`; `since` is a duration back
/// from now or an RFC 3339 time. Events oldest first.
async fn audit(
    State(state): State<AppState>,
    AdminCaller(_): AdminCaller,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<AuditList>, ApiError> {
    let query = query_map(query)?;
    let mut filter = AuditFilter {
        limit: DEFAULT_AUDIT_LIMIT,
        ..AuditFilter::default()
    };
    for (k, v) in &query {
        match k.as_str() {
            "since" => filter.since = Some(parse_since(&state, v)?),
            "bot" => filter.bot = Some(v.clone()),
            "event" => {
                let kind: AuditEventKind =
                    serde_json::from_value(serde_json::Value::String(v.clone())).map_err(|_| {
                        ApiError::new(
                            ErrorCode::InvalidFilter,
                            format!(
                                "event {:?} is not an audit event kind (e.g. approval_granted)",
                                v.chars().take(60).collect::<String>()
                            ),
                        )
                    })?;
                filter.event = Some(kind);
            }
            "limit" => {
                filter.limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_AUDIT_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::new(
                            ErrorCode::InvalidFilter,
                            format!("limit must be a number from 1 to {MAX_AUDIT_LIMIT}"),
                        )
                    })?;
            }
            _ => return Err(bad_filter(k)),
        }
    }
    // The read walks audit segment files: on the blocking pool, never on a runtime worker.
    let log = state.audit.clone();
    let events = tokio::task::spawn_blocking(move || log.read(&filter))
        .await
        .map_err(|e| ApiError::internal(format!("reading the audit log: {e}")))?
        .map_err(|e| ApiError::internal(format!("reading the audit log: {e}")))?;
    Ok(Json(AuditList { events }))
}

fn parse_since(state: &AppState, v: &str) -> Result<String, ApiError> {
    if let Ok(ttl) = v.parse::<Ttl>() {
        let back = time::Duration::try_from(ttl.as_duration()).unwrap_or(time::Duration::ZERO);
        return Ok(rfc3339_millis(state.clock.now() - back));
    }
    if let Ok(t) = time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339) {
        return Ok(rfc3339_millis(t));
    }
    Err(ApiError::new(
        ErrorCode::InvalidFilter,
        format!(
            "since {:?} is neither a duration like 24h nor an RFC 3339 time",
            v.chars().take(60).collect::<String>()
        ),
    ))
}

fn bad_filter(key: &str) -> ApiError {
    ApiError::new(
        ErrorCode::InvalidFilter,
        format!(
            "unknown query parameter {:?}",
            key.chars().take(60).collect::<String>()
        ),
    )
}

fn known_bot(state: &AppState, bot: &str) -> Result<(), ApiError> {
    if state.policy.current().has_bot(bot) {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::UnknownBot,
            format!(
                "the policy has no bot {:?}",
                bot.chars().take(60).collect::<String>()
            ),
        ))
    }
}

/// `POST /v1/admin/revoke`: GitHub tokens (`tok_...`) through the approval service, LiteLLM
/// keys (`lk_...`) through the key service; a bot's revocation covers both.
async fn revoke(
    State(state): State<AppState>,
    AdminCaller(caller): AdminCaller,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<RevokeAnswer>, ApiError> {
    let body: RevokeBody = json_body(&headers, body).await?;
    let actor = actor(&caller);
    let invalid = |m: &str| ApiError::new(ErrorCode::InvalidRevokeTarget, m.to_string());
    match (body.credential_id, body.bot, body.repo) {
        (Some(id), None, None) => {
            let hex_after = |prefix: &str| {
                id.len() <= 64
                    && id
                        .strip_prefix(prefix)
                        .is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
            };
            if hex_after("tok_") {
                let target = RevokeTarget::Credential(id);
                return Ok(Json(state.approvals.revoke(&actor, &target).await?));
            }
            if hex_after("dk_") {
                let revoked = state
                    .issuance
                    .deploy_keys()
                    .revoke(&actor, RevokeKeys::Credential(&id))
                    .await;
                if revoked.is_empty() {
                    return Err(ApiError::new(
                        ErrorCode::UnknownCredential,
                        format!("the broker holds no live credential {id:?}"),
                    ));
                }
                return Ok(Json(deploy_keys_revoked(&state, &actor, revoked).await?));
            }
            if !hex_after("lk_") {
                return Err(invalid(
                    "credential_id must be tok_ (GitHub), dk_ (deploy key) or lk_ (LiteLLM) and \
                     hex digits",
                ));
            }
            let Some(keys) = &state.keys else {
                return Err(ApiError::new(
                    ErrorCode::UnknownCredential,
                    format!("the broker holds no live credential {id:?}"),
                ));
            };
            // The grant that would hand the bot another key of this scope ends with the key.
            let record = keys.live_record(&id)?;
            match keys
                .revoke_by_credential_id(&id, crate::keys::Revoker::Admin(&actor))
                .await?
            {
                Some(r) => {
                    let grants_ended = match record {
                        Some(k) => {
                            let owner = k.bot.unwrap_or(k.caller);
                            let resource = Resource::Litellm { scope: k.scope };
                            state
                                .approvals
                                .end_grants_for(&actor, &owner, &resource)
                                .await?
                        }
                        None => Vec::new(),
                    };
                    Ok(Json(RevokeAnswer {
                        revoked: vec![r],
                        grants_ended,
                    }))
                }
                None => Err(ApiError::new(
                    ErrorCode::UnknownCredential,
                    format!("the broker holds no live credential {id:?}"),
                )),
            }
        }
        (None, Some(bot), None) => {
            known_bot(&state, &bot)?;
            let mut answer = state
                .approvals
                .revoke(&actor, &RevokeTarget::Bot(bot.clone()))
                .await?;
            if let Some(keys) = &state.keys {
                answer
                    .revoked
                    .extend(keys.revoke_by_bot(&bot, &actor).await?);
            }
            let revoked = state
                .issuance
                .deploy_keys()
                .revoke(&actor, RevokeKeys::Bot(&bot))
                .await;
            answer
                .revoked
                .extend(revoked.into_iter().map(|k| k.credential));
            Ok(Json(answer))
        }
        (None, None, Some(repo)) => {
            let repo = repo
                .parse::<RepoName>()
                .map_err(|e| invalid(&format!("repo: {e}")))?;
            let mut answer = state
                .approvals
                .revoke(&actor, &RevokeTarget::Repo(repo.clone()))
                .await?;
            let revoked = state
                .issuance
                .deploy_keys()
                .revoke(&actor, RevokeKeys::Repo(&repo))
                .await;
            answer
                .revoked
                .extend(revoked.into_iter().map(|k| k.credential));
            Ok(Json(answer))
        }
        _ => Err(invalid("name exactly one of credential_id, bot or repo")),
    }
}

/// The answer for deploy keys revoked by id: each key, and the grant that would hand its bot
/// another key of the same repository and permission ended with it.
async fn deploy_keys_revoked(
    state: &AppState,
    actor: &str,
    revoked: Vec<RevokedKey>,
) -> Result<RevokeAnswer, ApiError> {
    let mut answer = RevokeAnswer::default();
    for k in revoked {
        if let (Some(owner), Some(resource)) = (&k.owner, &k.resource) {
            answer.grants_ended.extend(
                state
                    .approvals
                    .end_grants_for(actor, owner, resource)
                    .await?,
            );
        }
        answer.revoked.push(k.credential);
    }
    Ok(answer)
}

async fn grants(
    State(state): State<AppState>,
    AdminCaller(_): AdminCaller,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<GrantList>, ApiError> {
    let query = query_map(query)?;
    let mut all = false;
    for (k, v) in &query {
        match (k.as_str(), v.as_str()) {
            ("all", "true" | "1") => all = true,
            ("all", "false" | "0") => all = false,
            _ => return Err(bad_filter(k)),
        }
    }
    Ok(Json(GrantList {
        grants: state.approvals.grants(all),
    }))
}

async fn bots(
    State(state): State<AppState>,
    AdminCaller(_): AdminCaller,
) -> Result<Json<BotList>, ApiError> {
    let policy = state.policy.current();
    let pending = state.approvals.pending_counts();
    let grants = state.approvals.grants(false);
    let remembered = state.approvals.remembered();
    let bots = policy
        .describe_bots()
        .into_iter()
        .map(|b| BotView {
            identity: b.identity,
            approval_timeout: Ttl::from_secs(policy.approval_timeout_for(Some(&b.name)).as_secs())
                .to_string(),
            auto_approve: b.auto_approve.len(),
            requires_approval: b.requires_approval.len(),
            deny: b.deny.len(),
            remembered: remembered.for_bot(&b.name).len(),
            pending: pending.get(&b.name).copied().unwrap_or(0),
            grants: grants
                .iter()
                .filter(|g| g.bot.as_deref() == Some(b.name.as_str()))
                .count(),
            name: b.name,
        })
        .collect();
    Ok(Json(BotList { bots }))
}

async fn policy(
    State(state): State<AppState>,
    AdminCaller(_): AdminCaller,
) -> Result<Json<PolicyView>, ApiError> {
    let policy = state.policy.current();
    let bots = policy
        .describe_bots()
        .into_iter()
        .map(|b| PolicyBotView {
            name: b.name,
            identity: b.identity,
            approval_timeout: b
                .approval_timeout
                .map(|d| Ttl::from_secs(d.as_secs()).to_string()),
            auto_approve: b.auto_approve,
            requires_approval: b.requires_approval,
            deny: b.deny,
        })
        .collect();
    Ok(Json(PolicyView {
        path: state.policy.path().display().to_string(),
        defaults_requires_approval: policy.defaults_require_approval(),
        defaults_approval_timeout: Ttl::from_secs(policy.default_approval_timeout().as_secs())
            .to_string(),
        bots,
        remembered: state.approvals.remembered_views(),
    }))
}

async fn forget(
    State(state): State<AppState>,
    AdminCaller(caller): AdminCaller,
    Path(rule_id): Path<String>,
) -> Result<Json<RememberedRuleView>, ApiError> {
    Ok(Json(
        state.approvals.forget(&actor(&caller), &rule_id).await?,
    ))
}
