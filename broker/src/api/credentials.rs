//! `POST /v1/credentials` (issue a credential under the policy) and `GET /v1/whoami`.
//!
//! Order of work: authenticate → validate the body → decide → mint or reuse → record the
//! audit events durably → answer. The token is never answered before its audit record is on
//! disk, and every refusal is audited too.

use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use botcreds_proto::audit::{AuditEvent, AuditEventKind};
use botcreds_proto::credential::WhoAmI;
use botcreds_proto::{
    Attribution, CredentialKind, CredentialRequest, ErrorCode, GitAccess, GithubCredential,
    Permission, RepoName, Ttl,
};

use super::AppState;
use super::extract::{Authenticated, PeerAddr, json_body};
use crate::clock::{rfc3339, rfc3339_millis};
use crate::error::ApiError;
use crate::grants::{Checked, TokenScope};
use crate::identity::{Caller, CallerVia};
use crate::policy::{Decision, Outcome, Request};

/// GitHub accepts at most this many repositories per token.
const MAX_REPOSITORIES: usize = 500;
const MAX_PERMISSIONS: usize = 64;
const MAX_REASON_BYTES: usize = 1024;

/// A validated GitHub token request.
struct GithubAsk {
    repositories: Vec<RepoName>,
    permissions: Vec<Permission>,
    min_ttl: Duration,
    reason: Option<String>,
}

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
) -> Result<axum::response::Response, ApiError> {
    let started = Instant::now();
    let caller = match caller {
        Ok(c) => c,
        Err(e) => {
            super::extract::audit_unauthenticated(&state, peer, &e).await;
            return Err(e);
        }
    };
    let policy = state.policy.current();
    let bot = policy.bot_for(&caller).map(str::to_string);

    let request: CredentialRequest = match json_body(&headers, body).await {
        Ok(r) => r,
        Err(e) => {
            refuse(&state, Some(&caller), bot.as_deref(), None, &e).await;
            return Err(e);
        }
    };
    if request.kind == Some(CredentialKind::LitellmKey) {
        return super::keys::issue_for_bot(&state, caller, request).await;
    }
    let ask = match validate(&state, &request) {
        Ok(a) => a,
        Err(e) => {
            refuse(&state, Some(&caller), bot.as_deref(), Some(&request), &e).await;
            return Err(e);
        }
    };

    // Decide on the policy in force now, not the one seen before the body arrived: a deny
    // added by a reload meanwhile must win.
    drop(policy);
    let policy = state.policy.current();
    let decision = policy.decide_with(
        &caller,
        &Request::Github {
            repositories: &ask.repositories,
            permissions: &ask.permissions,
        },
        &state.approvals.remembered(),
    );
    drop(policy);
    state.metrics.decision(match decision.outcome {
        Outcome::Allow => "allow",
        Outcome::RequireApproval => "approval",
        Outcome::Deny => "deny",
    });
    let requested = requested_event(&state, &caller, decision.bot.as_deref(), &ask);
    if decision.outcome != Outcome::Allow {
        return not_allowed(&state, &caller, &request, &ask, requested, &decision).await;
    }

    let Some(scope) = TokenScope::new(&ask.repositories, &ask.permissions) else {
        return Err(ApiError::internal("validated request has no repository"));
    };
    let who = crate::approvals::api::owner_of(decision.bot.as_deref(), &caller);
    // Decided again right before the answer (after any wait on another request's mint of
    // this token, and after this one's): a reload meanwhile must win.
    let request_now = Request::Github {
        repositories: &ask.repositories,
        permissions: &ask.permissions,
    };
    let recheck = || {
        let now = state.policy.current().decide_with(
            &caller,
            &request_now,
            &state.approvals.remembered(),
        );
        (now.outcome != Outcome::Allow).then_some(now)
    };
    let issued = match state
        .issuer
        .issue(
            &scope,
            ask.min_ttl,
            request.replaces.as_deref(),
            &who,
            recheck,
        )
        .await
    {
        Ok(Checked::Issued(i)) => *i,
        Ok(Checked::Refused {
            refusal: now,
            revoked,
        }) => {
            tracing::info!(bot = decision.bot.as_deref().unwrap_or("-"), rule = %now.rule, "the policy changed before the answer; decided again");
            if let Some(r) = &revoked {
                audit_unheld(&state, &caller, decision.bot.as_deref(), r).await;
            }
            return not_allowed(&state, &caller, &request, &ask, requested, &now).await;
        }
        Err(failure) => {
            let e = issue_error(&failure);
            tracing::warn!(bot = decision.bot.as_deref().unwrap_or("-"), code = %e.code, error = %failure, "no token issued");
            return Err(record_denial(&state, requested, &decision, e).await);
        }
    };
    state.metrics.token_reuse(issued.reused);
    let attribution = attribution(&state, decision.bot.as_deref()).await;

    let token = issued.token;
    let mut done = AuditEvent::new(
        AuditEventKind::CredentialIssued,
        rfc3339_millis(state.clock.now()),
    );
    done.bot = decision.bot.clone();
    done.caller = Some(caller.describe());
    done.repo = requested.repo.clone();
    done.repositories = requested.repositories.clone();
    done.permissions = requested.permissions.clone();
    done.approval = Some("auto".into());
    done.token_id = Some(token.credential_id.clone());
    done.expires_at = Some(rfc3339(token.expires_at));
    done.client_ip = Some(caller.address.ip().to_string());
    done.reason = ask.reason.clone();
    done.rule = Some(decision.rule.clone());
    done.reused = issued.reused;
    let mut events = vec![requested, done];
    if let Some(r) = &issued.replaced {
        events.push(replaced_event(&state, &caller, decision.bot.as_deref(), r));
    }
    if let Err(e) = state.audit.record(events).await {
        // No durable record, no token.
        return Err(ApiError::internal(format!("audit log write failed: {e}")));
    }

    let answer = github_answer(
        &state,
        &token,
        &ask.repositories,
        "auto",
        decision.bot.clone(),
        attribution,
    );
    state.metrics.request(decision.bot.as_deref(), "issued");
    state.metrics.issue_latency(started.elapsed().as_secs_f64());
    tracing::info!(
        bot = decision.bot.as_deref().unwrap_or("-"),
        credential_id = %token.credential_id,
        reused = issued.reused,
        expires_at = %answer.expires_at,
        "credential issued"
    );
    Ok(axum::response::IntoResponse::into_response(Json(answer)))
}

fn validate(state: &AppState, r: &CredentialRequest) -> Result<GithubAsk, ApiError> {
    match r.kind {
        Some(CredentialKind::GithubToken) => {}
        Some(other) => {
            return Err(ApiError::new(
                ErrorCode::InvalidKind,
                format!(
                    "credential kind {} is not served by this broker yet",
                    other.as_str()
                ),
            ));
        }
        None => {
            return Err(ApiError::new(
                ErrorCode::InvalidKind,
                "the request names no kind (e.g. \"kind\": \"github_token\")",
            ));
        }
    }
    if r.scope.is_some() {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "`scope` belongs to litellm_key requests, not github_token",
        ));
    }
    if r.repositories.is_empty() {
        return Err(ApiError::new(
            ErrorCode::NoRepositories,
            "name at least one repository",
        ));
    }
    if r.repositories.len() > MAX_REPOSITORIES {
        return Err(ApiError::new(
            ErrorCode::TooManyRepositories,
            format!("at most {MAX_REPOSITORIES} repositories per token"),
        ));
    }
    let mut repositories = Vec::with_capacity(r.repositories.len());
    for raw in &r.repositories {
        let repo: RepoName = raw
            .parse()
            .map_err(|e| ApiError::new(ErrorCode::InvalidRepository, format!("{e}")))?;
        if !repositories.contains(&repo) {
            repositories.push(repo);
        }
    }
    let owner = repositories[0].owner().to_string();
    if let Some(other) = repositories.iter().find(|r| r.owner() != owner) {
        return Err(ApiError::new(
            ErrorCode::ReposAcrossOwners,
            format!("{other} belongs to another owner than {owner}; ask for one token per owner"),
        ));
    }
    if r.permissions.is_empty() {
        return Err(ApiError::new(
            ErrorCode::EmptyPermissions,
            "name at least one permission, e.g. contents:read",
        ));
    }
    if r.permissions.len() > MAX_PERMISSIONS {
        return Err(ApiError::new(
            ErrorCode::UnknownPermission,
            "too many permissions",
        ));
    }
    let mut permissions = Vec::with_capacity(r.permissions.len());
    for raw in &r.permissions {
        let p: Permission = raw
            .parse()
            .map_err(|e| ApiError::new(ErrorCode::UnknownPermission, format!("{e}")))?;
        if !permissions.contains(&p) {
            permissions.push(p);
        }
    }
    let max = state.limits.max_github_ttl;
    let min_ttl = match &r.ttl {
        None => state.default_min_ttl.min(max),
        Some(raw) => {
            let ttl: Ttl = raw
                .parse()
                .map_err(|e| ApiError::new(ErrorCode::InvalidTtl, format!("{e}")))?;
            if ttl.as_duration() > max {
                return Err(ApiError::new(
                    ErrorCode::TtlTooLong,
                    format!(
                        "ttl {ttl} is longer than the {} a GitHub token can still have when handed out",
                        Ttl::from_secs(max.as_secs())
                    ),
                ));
            }
            ttl.as_duration()
        }
    };
    let reason = match &r.reason {
        None => None,
        Some(text) if text.len() > MAX_REASON_BYTES || text.chars().any(char::is_control) => {
            return Err(ApiError::new(
                ErrorCode::InvalidReason,
                format!("the reason must be at most {MAX_REASON_BYTES} bytes of printable text"),
            ));
        }
        Some(text) => Some(text.clone()),
    };
    Ok(GithubAsk {
        repositories,
        permissions,
        min_ttl,
        reason,
    })
}

/// The answer to a request the policy does not simply allow: a denial, or a live grant /
/// approval request (see approvals/api.rs).
async fn not_allowed(
    state: &AppState,
    caller: &Caller,
    request: &CredentialRequest,
    ask: &GithubAsk,
    requested: AuditEvent,
    decision: &Decision,
) -> Result<axum::response::Response, ApiError> {
    if decision.outcome == Outcome::Deny {
        let e = ApiError::new(ErrorCode::PolicyDenied, denial_message(decision))
            .with_rule(decision.rule.clone());
        return Err(record_denial(state, requested, decision, e).await);
    }
    let approval = crate::approvals::api::ApprovalAsk {
        resource: crate::policy::Resource::github(&ask.repositories, &ask.permissions),
        min_ttl: ask.min_ttl,
        reason: ask.reason.clone(),
        workspace: None,
    };
    crate::approvals::api::require_approval(
        state,
        caller,
        decision,
        requested,
        approval,
        request.wait.as_deref(),
        request.replaces.as_deref(),
    )
    .await
}

fn denial_message(decision: &Decision) -> String {
    format!("denied by policy: {}", decision.explanation)
}

fn requested_event(
    state: &AppState,
    caller: &Caller,
    bot: Option<&str>,
    ask: &GithubAsk,
) -> AuditEvent {
    let mut e = AuditEvent::new(
        AuditEventKind::CredentialRequested,
        rfc3339_millis(state.clock.now()),
    );
    e.bot = bot.map(str::to_string);
    e.caller = Some(caller.describe());
    e.repositories = ask.repositories.iter().map(|r| r.to_string()).collect();
    if let [only] = ask.repositories.as_slice() {
        e.repo = Some(only.to_string());
    }
    e.permissions = ask.permissions.iter().map(|p| p.to_string()).collect();
    e.client_ip = Some(caller.address.ip().to_string());
    e.reason = ask.reason.clone();
    e
}

/// Audit a refused, validated request (requested + denied, one flush) and count it.
async fn record_denial(
    state: &AppState,
    requested: AuditEvent,
    decision: &Decision,
    error: ApiError,
) -> ApiError {
    let mut denied = requested.clone();
    denied.event = AuditEventKind::CredentialDenied;
    denied.timestamp = rfc3339_millis(state.clock.now());
    denied.code = Some(error.code.as_str().to_string());
    denied.rule = Some(decision.rule.clone());
    denied.detail = Some(error.message.clone());
    state
        .metrics
        .request(decision.bot.as_deref(), error.code.as_str());
    if let Err(e) = state.audit.record(vec![requested, denied]).await {
        tracing::error!(error = %e, "audit log write failed for a denial");
    }
    error
}

/// GitHub's refusal or failure as the API's error, with GitHub's wait when rate limited.
pub(crate) fn upstream_error(upstream: &crate::providers::github::GithubError) -> ApiError {
    let e = ApiError::new(upstream.code(), upstream.to_string());
    match upstream {
        crate::providers::github::GithubError::RateLimited { retry_after_secs } => {
            e.with_retry_after(*retry_after_secs)
        }
        _ => e,
    }
}

/// Why no token was issued, as the API's error: GitHub's refusal, or the replacement limit.
pub(crate) fn issue_error(failure: &crate::grants::IssueError) -> ApiError {
    match failure {
        crate::grants::IssueError::Github(upstream) => upstream_error(upstream),
        crate::grants::IssueError::ReplaceLimited { retry_after_secs } => {
            ApiError::new(ErrorCode::ReplaceRateLimited, failure.to_string())
                .with_retry_after(*retry_after_secs)
        }
    }
}

/// `credential_revoked` for the token a replacement superseded (revoked at GitHub as the
/// replacement was minted).
pub(crate) fn replaced_event(
    state: &AppState,
    caller: &Caller,
    bot: Option<&str>,
    replaced: &crate::grants::Replaced,
) -> AuditEvent {
    let mut e = AuditEvent::new(
        AuditEventKind::CredentialRevoked,
        rfc3339_millis(state.clock.now()),
    );
    e.bot = bot.map(str::to_string);
    e.caller = Some(caller.describe());
    e.token_id = Some(replaced.credential_id.clone());
    e.repositories = replaced.repositories.clone();
    e.expires_at = Some(rfc3339(replaced.expires_at));
    e.detail = Some(match &replaced.error {
        None => "replaced at the client's report that GitHub rejected it; revoked at GitHub".into(),
        Some(err) => format!("replaced; GitHub did not confirm the revocation: {err}"),
    });
    e
}

/// Audit the revocation of a token minted for a request the recheck then refused (held by
/// nobody; see [`crate::grants::Checked::Refused`]).
pub(crate) async fn audit_unheld(
    state: &AppState,
    caller: &Caller,
    bot: Option<&str>,
    revoked: &crate::grants::Replaced,
) {
    let mut e = replaced_event(state, caller, bot, revoked);
    e.reason = Some("the policy no longer allows the request it was minted for".into());
    e.detail = Some(match &revoked.error {
        None => {
            "minted for a request the policy then refused; held by nobody; revoked at GitHub".into()
        }
        Some(err) => format!(
            "minted for a request the policy then refused; held by nobody; GitHub did not \
             confirm the revocation: {err}"
        ),
    });
    if let Err(err) = state.audit.record(vec![e]).await {
        tracing::error!(error = %err, "audit log write failed for a revoked token");
    }
}

/// The seed's answer for a token: the clone URLs and the askpass script carry it.
pub(crate) fn github_answer(
    state: &AppState,
    token: &crate::grants::IssuedToken,
    repositories: &[RepoName],
    approval: &str,
    bot: Option<String>,
    attribution: Attribution,
) -> GithubCredential {
    let host = state.issuer.github().git_host();
    let secret = token.token.expose();
    let clone_urls: Vec<String> = repositories
        .iter()
        .map(|r| format!("https://x-access-token:{secret}@{host}/{r}.git"))
        .collect();
    GithubCredential {
        kind: CredentialKind::GithubToken,
        credential_id: token.credential_id.clone(),
        token: secret.to_string(),
        expires_at: rfc3339(token.expires_at),
        repositories: repositories.iter().map(|r| r.to_string()).collect(),
        permissions: token.permissions.clone(),
        approval: approval.to_string(),
        bot: bot.unwrap_or_default(),
        git: GitAccess {
            clone_url: clone_urls.first().cloned().unwrap_or_default(),
            clone_urls,
            askpass_script: format!(
                "#!/bin/sh\ncase \"$1\" in\n  Username*) echo x-access-token ;;\n  *) echo {secret} ;;\nesac\n"
            ),
        },
        attribution,
    }
}

/// Audit a request refused before it could be decided (bad identity or bad body).
async fn refuse(
    state: &AppState,
    caller: Option<&Caller>,
    bot: Option<&str>,
    request: Option<&CredentialRequest>,
    error: &ApiError,
) {
    let mut e = AuditEvent::new(
        AuditEventKind::CredentialDenied,
        rfc3339_millis(state.clock.now()),
    );
    e.bot = bot.map(str::to_string);
    e.caller = caller.map(Caller::describe);
    e.client_ip = caller.map(|c| c.address.ip().to_string());
    e.code = Some(error.code.as_str().to_string());
    e.detail = Some(error.message.chars().take(300).collect());
    if let Some(r) = request {
        // Raw input, bounded: kept for the audit trail only.
        e.repositories = r
            .repositories
            .iter()
            .take(20)
            .map(|s| s.chars().take(120).collect())
            .collect();
        e.permissions = r
            .permissions
            .iter()
            .take(20)
            .map(|s| s.chars().take(120).collect())
            .collect();
    }
    state.metrics.request(bot, error.code.as_str());
    if let Err(err) = state.audit.record(vec![e]).await {
        tracing::error!(error = %err, "audit log write failed for a refusal");
    }
}

pub(crate) async fn attribution(state: &AppState, bot: Option<&str>) -> Attribution {
    let trailer = format!("Bot: {}", bot.unwrap_or("unknown"));
    match state.issuer.github().app_identity().await {
        Ok(app) => {
            let name = format!("{}[bot]", app.slug);
            let email = match app.bot_user_id {
                Some(id) => format!("{id}+{name}@users.noreply.github.com"),
                None => format!("{name}@users.noreply.github.com"),
            };
            Attribution {
                name,
                email,
                trailer,
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not learn the app's bot identity for attribution");
            Attribution {
                name: String::new(),
                email: String::new(),
                trailer,
            }
        }
    }
}
