//! The bot-facing side of approvals: what `POST /v1/credentials` does when the policy wants a
//! human (use a live grant, else create or join an approval request and optionally wait for
//! it), and `GET /v1/requests/{id}?wait=30s`, the long-poll, for GitHub tokens and LiteLLM
//! keys alike. Approved in time, the answer is the credential itself and the request becomes
//! `ISSUED`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use botcreds_proto::approval::{ApprovalRequestView, ApprovalState};
use botcreds_proto::audit::{AuditEvent, AuditEventKind};
use botcreds_proto::litellm::WorkspaceInfo;
use botcreds_proto::{ErrorCode, GithubCredential, Ttl};

use super::NewRequest;
use crate::api::AppState;
use crate::api::extract::Authenticated;
use crate::api::keys::LitellmAsk;
use crate::clock::{rfc3339, rfc3339_millis};
use crate::error::ApiError;
use crate::grants::{Checked, TokenScope};
use crate::identity::Caller;
use crate::policy::remembered::Resource;
use crate::policy::{Decision, Outcome};

/// Routes that may hold a request open for minutes; merged outside the request timeout.
pub fn long_poll_routes() -> Router<AppState> {
    Router::new().route("/v1/requests/{id}", get(poll))
}

/// A validated request that the policy sent to a human.
#[derive(Clone, Debug)]
pub struct ApprovalAsk {
    pub resource: Resource,
    /// Lifetime the credential must still have when handed out.
    pub min_ttl: Duration,
    pub reason: Option<String>,
    /// The workspace of a `workspace`-scope LiteLLM key.
    pub workspace: Option<WorkspaceInfo>,
}

/// An approved or granted request, to be answered with its credential.
struct Approved<'a> {
    bot: Option<String>,
    rule: &'a str,
    resource: &'a Resource,
    min_ttl: Duration,
    workspace: Option<WorkspaceInfo>,
    /// `grant` or `manual`.
    approval: &'a str,
    request_id: &'a str,
}

/// Parse a `wait` (`30s`, `2m`; `0s` or `0` for none), at most `max`.
pub fn parse_wait(raw: Option<&str>, max: Duration) -> Result<Duration, ApiError> {
    let Some(raw) = raw.map(str::trim) else {
        return Ok(Duration::ZERO);
    };
    if raw == "0" || raw == "0s" {
        return Ok(Duration::ZERO);
    }
    let wait = raw
        .parse::<Ttl>()
        .map_err(|e| ApiError::new(ErrorCode::InvalidWait, format!("wait: {e}")))?
        .as_duration();
    if wait > max {
        return Err(ApiError::new(
            ErrorCode::InvalidWait,
            format!(
                "wait may be at most {} on this broker",
                Ttl::from_secs(max.as_secs())
            ),
        ));
    }
    Ok(wait)
}

/// Whose requests and grants a caller's are: its policy bot, else its description.
pub fn owner_of(bot: Option<&str>, caller: &Caller) -> String {
    bot.map_or_else(|| caller.describe(), str::to_string)
}

/// The deciding admin as the approval service sees them: how decisions record them, and
/// whose requests their own identity makes under the current policy (self-approval check).
pub fn approver(state: &AppState, caller: &Caller) -> super::Approver {
    let bot = state.policy.current().bot_for(caller).map(str::to_string);
    super::Approver::new(
        crate::api::admin::actor(caller),
        owner_of(bot.as_deref(), caller),
    )
}

/// `POST /v1/credentials` for a request that needs approval. `requested` is the
/// `credential_requested` audit event, not yet recorded.
#[allow(clippy::too_many_arguments)]
pub async fn require_approval(
    state: &AppState,
    caller: &Caller,
    decision: &Decision,
    mut requested: AuditEvent,
    ask: ApprovalAsk,
    wait: Option<&str>,
    replaces: Option<&str>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let wait = match parse_wait(wait, state.approvals.config().max_wait.as_duration()) {
        Ok(w) => w,
        Err(e) => return Err(refuse(state, requested, decision.bot.as_deref(), e).await),
    };
    let owner = owner_of(decision.bot.as_deref(), caller);

    if let Some(grant) = state
        .approvals
        .covering_grant(&owner, &ask.resource.as_request())
    {
        requested.request_id = Some(grant.request_id.clone());
        let rule = format!("grant {}", grant.grant_id);
        let approved = Approved {
            bot: decision.bot.clone(),
            rule: &rule,
            resource: &ask.resource,
            min_ttl: ask.min_ttl,
            workspace: ask.workspace.clone(),
            approval: "grant",
            request_id: &grant.request_id,
        };
        let (answer, _) =
            issue_approved(state, caller, approved, replaces, vec![requested]).await?;
        state.metrics.issue_latency(started.elapsed().as_secs_f64());
        return Ok(answer);
    }

    let new = NewRequest {
        owner,
        bot: decision.bot.clone(),
        caller: caller.describe(),
        resource: ask.resource.clone(),
        reason: ask.reason.clone(),
        rule: decision.rule.clone(),
        timeout: decision.approval_timeout,
        min_ttl: ask.min_ttl,
        workspace: ask.workspace.clone(),
        client_ip: Some(caller.address.ip().to_string()),
        preceding: Some(requested.clone()),
    };
    let joined = match state.approvals.request(new).await {
        Ok(r) => r,
        Err(e) => return Err(refuse(state, requested, decision.bot.as_deref(), e).await),
    };
    state
        .metrics
        .request(decision.bot.as_deref(), "approval_pending");
    if !joined.created {
        // A new request recorded this event itself, right before `approval_requested`.
        requested.request_id = Some(joined.view.request_id.clone());
        requested.detail = Some("joined an identical pending approval request".into());
        if let Err(e) = state.audit.record(vec![requested]).await {
            tracing::error!(error = %e, "audit log write failed for an approval request");
        }
    }

    // The router's request timeout bounds every POST; answer 202 before it fires.
    let room = state
        .limits
        .request_timeout
        .saturating_sub(Duration::from_secs(1));
    let view = if wait.is_zero() {
        joined.view
    } else {
        state
            .approvals
            .wait_decided(&joined.view.request_id, wait.min(room))
            .await?
    };
    answer_for(state, caller, view, replaces).await
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
    let wait = parse_wait(
        query.wait.as_deref(),
        state.approvals.config().max_wait.as_duration(),
    )?;
    let bot = state.policy.current().bot_for(&caller).map(str::to_string);
    let owner = owner_of(bot.as_deref(), &caller);
    let view = state.approvals.get_owned(&owner, &id)?;
    let view = if wait.is_zero() || view.state.is_decided() {
        view
    } else {
        state.approvals.wait_decided(&id, wait).await?
    };
    answer_for(&state, &caller, view, None).await
}

/// What the bot gets for a request in `view`'s state: the credential once approved, an
/// error once denied or expired, else `202` with the request.
async fn answer_for(
    state: &AppState,
    caller: &Caller,
    view: ApprovalRequestView,
    replaces: Option<&str>,
) -> Result<Response, ApiError> {
    match view.state {
        ApprovalState::Pending => Ok((StatusCode::ACCEPTED, Json(view)).into_response()),
        ApprovalState::Denied => Err(ApiError::new(
            ErrorCode::ApprovalDenied,
            match &view.deny_reason {
                Some(r) => format!(
                    "{} denied request {}: {r}",
                    view.decided_by.as_deref().unwrap_or("an admin"),
                    view.request_id
                ),
                None => format!(
                    "{} denied request {}",
                    view.decided_by.as_deref().unwrap_or("an admin"),
                    view.request_id
                ),
            },
        )
        .with_rule(view.rule.clone())),
        ApprovalState::Expired => Err(ApiError::new(
            ErrorCode::ApprovalExpired,
            format!(
                "nobody decided request {} before {}; ask again",
                view.request_id, view.expires_at
            ),
        )),
        ApprovalState::Approved | ApprovalState::Issued => {
            let (resource, min_ttl, workspace) = state.approvals.resource_of(&view.request_id)?;
            let approved = Approved {
                bot: view.bot.clone(),
                rule: &view.rule,
                resource: &resource,
                min_ttl,
                workspace,
                approval: "manual",
                request_id: &view.request_id,
            };
            // A deny added after the approval wins, and says so (rather than "expired",
            // which a reload that ended the grant would otherwise show).
            if let Some(e) = denied_now(state, caller, &resource) {
                refuse_approved(state, caller, &approved, Vec::new(), &e).await;
                return Err(e);
            }
            let live = view
                .grant_id
                .as_deref()
                .is_some_and(|g| state.approvals.grant_is_live(g));
            if !live {
                return Err(ApiError::new(
                    ErrorCode::ApprovalExpired,
                    format!(
                        "the grant from request {} was revoked or has expired; ask again",
                        view.request_id
                    ),
                ));
            }
            let (answer, credential_id) =
                issue_approved(state, caller, approved, replaces, Vec::new()).await?;
            // The credential is minted and audited: a failed state write must not withhold it.
            if let Err(e) = state
                .approvals
                .mark_issued(&view.request_id, &credential_id)
            {
                tracing::error!(request_id = %view.request_id, code = %e.code, "could not mark the request issued");
            }
            Ok(answer)
        }
    }
}

/// Audit a refusal (`credential_requested` + `credential_denied`) and hand the error back.
async fn refuse(
    state: &AppState,
    requested: AuditEvent,
    bot: Option<&str>,
    error: ApiError,
) -> ApiError {
    let mut denied = requested.clone();
    denied.event = AuditEventKind::CredentialDenied;
    denied.timestamp = rfc3339_millis(state.clock.now());
    denied.code = Some(error.code.as_str().to_string());
    denied.detail = Some(error.message.chars().take(300).collect());
    state.metrics.request(bot, error.code.as_str());
    if let Err(e) = state.audit.record(vec![requested, denied]).await {
        tracing::error!(error = %e, "audit log write failed for a refusal");
    }
    error
}

/// The refusal when the policy in force now denies `caller` the `resource`. An approval or
/// a grant never outweighs a deny, whenever the deny was added.
pub(crate) fn denied_now(
    state: &AppState,
    caller: &Caller,
    resource: &Resource,
) -> Option<ApiError> {
    let policy = state.policy.current();
    let decision = policy.decide_with(
        caller,
        &resource.as_request(),
        &state.approvals.remembered(),
    );
    (decision.outcome == Outcome::Deny).then(|| {
        ApiError::new(
            ErrorCode::PolicyDenied,
            format!("denied by policy: {}", decision.explanation),
        )
        .with_rule(decision.rule)
    })
}

/// Audit a refusal of an approved or granted request (`before` + `credential_denied`).
async fn refuse_approved(
    state: &AppState,
    caller: &Caller,
    a: &Approved<'_>,
    mut before: Vec<AuditEvent>,
    error: &ApiError,
) {
    let mut denied = AuditEvent::new(
        AuditEventKind::CredentialDenied,
        rfc3339_millis(state.clock.now()),
    );
    denied.bot = a.bot.clone();
    denied.caller = Some(caller.describe());
    denied.client_ip = Some(caller.address.ip().to_string());
    denied.request_id = Some(a.request_id.to_string());
    denied.approval = Some(a.approval.to_string());
    denied.code = Some(error.code.as_str().to_string());
    denied.rule = error.rule.clone();
    denied.detail = Some(error.message.chars().take(300).collect());
    super::fill_resource(&mut denied, &a.resource.to_wire());
    before.push(denied);
    state.metrics.request(a.bot.as_deref(), error.code.as_str());
    if let Err(e) = state.audit.record(before).await {
        tracing::error!(error = %e, "audit log write failed for a refusal");
    }
}

/// Hand out the credential of an approved or granted request: a GitHub token or a LiteLLM
/// key, as the resource says, unless the policy in force now denies it (checked here, right
/// before the mint, on every path that hands out what an approval covered). Answers the
/// response and the credential's id.
async fn issue_approved(
    state: &AppState,
    caller: &Caller,
    a: Approved<'_>,
    replaces: Option<&str>,
    before: Vec<AuditEvent>,
) -> Result<(Response, String), ApiError> {
    if let Some(e) = denied_now(state, caller, a.resource) {
        tracing::info!(bot = a.bot.as_deref().unwrap_or("-"), request_id = %a.request_id, "approved request refused: the policy now denies it");
        refuse_approved(state, caller, &a, before, &e).await;
        return Err(e);
    }
    match a.resource {
        Resource::Github { .. } => {
            let answer = issue_github(
                state,
                caller,
                a.bot,
                a.rule,
                a.resource,
                a.min_ttl,
                replaces,
                before,
                a.approval,
                Some(a.request_id),
            )
            .await?;
            let id = answer.credential_id.clone();
            Ok((Json(answer).into_response(), id))
        }
        Resource::Litellm { scope } => {
            let ask = LitellmAsk {
                scope: scope.clone(),
                min_remaining: a.min_ttl,
                workspace: a.workspace.clone(),
                reason: None,
            };
            let answer = crate::api::keys::hand_out(
                state,
                caller,
                a.bot.clone(),
                ask,
                replaces.map(str::to_string),
                a.rule,
                Some((a.approval, a.request_id)),
                before,
            )
            .await?;
            // Decided again now the key exists (the issue may have waited on LiteLLM or on
            // another issue): a reload that denied it meanwhile may have missed the key, so
            // it is revoked here and nothing is answered.
            if let Some(e) = denied_now(state, caller, a.resource) {
                tracing::info!(bot = a.bot.as_deref().unwrap_or("-"), request_id = %a.request_id, credential_id = %answer.credential_id, "approved key refused: the policy now denies it");
                if let Some(keys) = &state.keys
                    && let Err(err) = keys
                        .revoke_by_credential_id(
                            &answer.credential_id,
                            crate::keys::Revoker::Policy,
                        )
                        .await
                {
                    tracing::error!(credential_id = %answer.credential_id, code = %err.code, error = %err.message, "could not revoke a key the policy now denies");
                }
                refuse_approved(state, caller, &a, Vec::new(), &e).await;
                return Err(e);
            }
            let id = answer.credential_id.clone();
            Ok((Json(answer).into_response(), id))
        }
    }
}

/// Mint or reuse a token for an approved or granted request, record it durably, and build
/// the answer. `before` are events to record in the same flush (the request).
#[allow(clippy::too_many_arguments)]
pub async fn issue_github(
    state: &AppState,
    caller: &Caller,
    bot: Option<String>,
    rule: &str,
    resource: &Resource,
    min_ttl: Duration,
    replaces: Option<&str>,
    mut before: Vec<AuditEvent>,
    approval: &str,
    request_id: Option<&str>,
) -> Result<GithubCredential, ApiError> {
    let Resource::Github {
        repositories,
        permissions,
    } = resource
    else {
        return Err(ApiError::new(
            ErrorCode::InvalidKind,
            "this approval is not for a GitHub token",
        ));
    };
    let Some(scope) = TokenScope::new(repositories, permissions) else {
        return Err(ApiError::internal("approved request has no repository"));
    };
    let mut done = AuditEvent::new(
        AuditEventKind::CredentialIssued,
        rfc3339_millis(state.clock.now()),
    );
    done.bot = bot.clone();
    done.caller = Some(caller.describe());
    done.repositories = repositories.iter().map(|r| r.to_string()).collect();
    if let [only] = repositories.as_slice() {
        done.repo = Some(only.to_string());
    }
    done.permissions = permissions.iter().map(|p| p.to_string()).collect();
    done.approval = Some(approval.to_string());
    done.client_ip = Some(caller.address.ip().to_string());
    done.rule = Some(rule.to_string());
    done.request_id = request_id.map(str::to_string);

    let who = owner_of(bot.as_deref(), caller);
    // Decided again right before the answer, after any wait on the mint: a deny a reload
    // added meanwhile wins.
    let recheck = || denied_now(state, caller, resource);
    let issued = match state
        .issuer
        .issue(&scope, min_ttl, replaces, &who, recheck)
        .await
    {
        Ok(Checked::Issued(i)) => *i,
        Ok(Checked::Refused {
            refusal: e,
            revoked,
        }) => {
            if let Some(r) = &revoked {
                crate::api::credentials::audit_unheld(state, caller, bot.as_deref(), r).await;
            }
            tracing::info!(
                bot = bot.as_deref().unwrap_or("-"),
                request_id = request_id.unwrap_or("-"),
                "approved request refused: the policy now denies it"
            );
            let mut denied = done.clone();
            denied.event = AuditEventKind::CredentialDenied;
            denied.code = Some(e.code.as_str().to_string());
            denied.rule = e.rule.clone();
            denied.detail = Some(e.message.chars().take(300).collect());
            before.push(denied);
            if let Err(err) = state.audit.record(before).await {
                tracing::error!(error = %err, "audit log write failed for a refusal");
            }
            state.metrics.request(bot.as_deref(), e.code.as_str());
            return Err(e);
        }
        Err(failure) => {
            let e = crate::api::credentials::issue_error(&failure);
            let mut denied = done.clone();
            denied.event = AuditEventKind::CredentialDenied;
            denied.code = Some(e.code.as_str().to_string());
            denied.detail = Some(e.message.chars().take(300).collect());
            before.push(denied);
            if let Err(err) = state.audit.record(before).await {
                tracing::error!(error = %err, "audit log write failed for a refusal");
            }
            state.metrics.request(bot.as_deref(), e.code.as_str());
            return Err(e);
        }
    };
    state.metrics.token_reuse(issued.reused);
    let attribution = crate::api::credentials::attribution(state, bot.as_deref()).await;
    let token = issued.token;
    done.token_id = Some(token.credential_id.clone());
    done.expires_at = Some(rfc3339(token.expires_at));
    done.reused = issued.reused;
    before.push(done);
    if let Some(r) = &issued.replaced {
        before.push(crate::api::credentials::replaced_event(
            state,
            caller,
            bot.as_deref(),
            r,
        ));
    }
    if let Err(e) = state.audit.record(before).await {
        // No durable record, no token.
        return Err(ApiError::internal(format!("audit log write failed: {e}")));
    }

    state.metrics.request(bot.as_deref(), "issued");
    tracing::info!(
        bot = bot.as_deref().unwrap_or("-"),
        credential_id = %token.credential_id,
        reused = issued.reused,
        approval = %approval,
        request_id = request_id.unwrap_or("-"),
        "credential issued"
    );
    Ok(crate::api::credentials::github_answer(
        state,
        &token,
        repositories,
        approval,
        bot,
        attribution,
    ))
}

/// Query parameters as a map, with a rejection turned into `invalid_filter`.
pub fn query_map(
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<HashMap<String, String>, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::new(ErrorCode::InvalidFilter, format!("bad query: {e}")))
}
