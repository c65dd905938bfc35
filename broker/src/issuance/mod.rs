//! The issuance service: every credential handed to a bot is decided, minted and audited here,
//! whatever its kind and however it was approved. Every operation takes the caller first and
//! audits its own refusals.
//!
//! Order of work for [`Issuance::request`]: validate (the kind's [`Provider`]) → decide on the
//! policy in force (rules, remembered rules) → deny, or for a request that wants a human a live
//! grant or an approval request (optionally waited on) → mint through the provider → audit,
//! durably before the answer → metrics. [`Issuance::poll`] answers an approval request the
//! same way once it is approved.
//!
//! Deny wins on every path: what an approval or grant covers is decided again on the current
//! policy right before the mint, and the provider asks the policy once more right before the
//! answer (a token minted then refused is revoked; a LiteLLM key refused after it exists is
//! revoked).
//!
//! This module is below HTTP: it knows nothing of axum or `ApiError`; `api/` parses, calls and
//! maps [`IssueError`] to a response.

pub mod deploy_key;
mod error;
pub mod events;
pub mod github;
pub mod litellm;
pub mod provider;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use botcreds_proto::approval::{ApprovalRequestView, ApprovalState};
use botcreds_proto::audit::{AuditEvent, AuditEventKind};
use botcreds_proto::litellm::LitellmCredential;
use botcreds_proto::{
    CredentialKind, CredentialRequest, DeployKeyCredential, GithubCredential, Ttl,
};

use crate::approvals::{Approvals, NewRequest, owner_of};
use crate::audit::AuditLog;
use crate::clock::{SharedClock, rfc3339_millis};
use crate::identity::Caller;
use crate::metrics::Metrics;
use crate::policy::remembered::Resource;
use crate::policy::{Decision, Outcome};
use crate::reload::PolicyHandle;

pub use crate::issued::Approval;
pub use deploy_key::DeployKeys;
pub use error::IssueError;
pub use github::GithubTokens;
pub use litellm::LitellmKeys;
pub use provider::{Mint, Minted, Provider, Subject};

/// A credential handed out, as the bot is answered.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(untagged)]
pub enum Credential {
    Github(GithubCredential),
    Litellm(LitellmCredential),
    DeployKey(DeployKeyCredential),
}

impl Credential {
    pub fn credential_id(&self) -> &str {
        match self {
            Credential::Github(c) => &c.credential_id,
            Credential::Litellm(c) => &c.credential_id,
            Credential::DeployKey(c) => &c.credential_id,
        }
    }
}

/// The answer to a request: the credential, or the approval request still waiting for a human.
#[derive(Clone, Debug)]
pub enum Answer {
    Issued(Credential),
    Pending(ApprovalRequestView),
}

/// How long the client is willing to wait for a human: the request's (or the poll's) `wait`,
/// as sent (`30s`, `2m`; `0s`, `0` or absent for none). Parsed only when a wait is needed.
#[derive(Clone, Debug, Default)]
pub struct Wait(Option<String>);

impl Wait {
    pub fn new(raw: Option<String>) -> Wait {
        Wait(raw)
    }

    /// The wait, at most `max`.
    pub fn parse(&self, max: Duration) -> Result<Duration, IssueError> {
        let Some(raw) = self.0.as_deref().map(str::trim) else {
            return Ok(Duration::ZERO);
        };
        if raw == "0" || raw == "0s" {
            return Ok(Duration::ZERO);
        }
        let wait = raw
            .parse::<Ttl>()
            .map_err(|e| IssueError::InvalidWait(format!("wait: {e}")))?
            .as_duration();
        if wait > max {
            return Err(IssueError::InvalidWait(format!(
                "wait may be at most {} on this broker",
                Ttl::from_secs(max.as_secs())
            )));
        }
        Ok(wait)
    }
}

/// The services and settings the issuance service works with.
pub struct IssuanceParts {
    pub policy: Arc<PolicyHandle>,
    pub approvals: Arc<Approvals>,
    pub audit: AuditLog,
    pub metrics: Metrics,
    pub clock: SharedClock,
    pub github: GithubTokens,
    pub deploy_keys: DeployKeys,
    /// `None` without `[litellm]`.
    pub litellm: Option<LitellmKeys>,
    /// The router's request timeout: a waiting request is answered `202` before it fires.
    pub request_timeout: Duration,
}

/// The issuance service. Cheap to share behind an `Arc`.
pub struct Issuance {
    policy: Arc<PolicyHandle>,
    approvals: Arc<Approvals>,
    audit: AuditLog,
    metrics: Metrics,
    clock: SharedClock,
    github: GithubTokens,
    deploy_keys: DeployKeys,
    litellm: Option<LitellmKeys>,
    request_timeout: Duration,
}

/// A request a grant covers or an admin approved, to be answered with its credential.
struct Approved {
    bot: Option<String>,
    /// The approval's rule, or `grant <id>`.
    rule: String,
    subject: Subject,
    approval: Approval,
}

impl Approved {
    fn request_id(&self) -> &str {
        self.approval.request_id().unwrap_or_default()
    }
}

/// A validated request of one kind on the auto path: the request's kind-specific ask, its
/// `credential_requested` event (not yet recorded), and the client's `replaces` and `wait`.
struct Asked<'a, A> {
    ask: A,
    requested: AuditEvent,
    replaces: Option<&'a str>,
    wait: &'a Wait,
}

impl Issuance {
    pub fn new(parts: IssuanceParts) -> Issuance {
        Issuance {
            policy: parts.policy,
            approvals: parts.approvals,
            audit: parts.audit,
            metrics: parts.metrics,
            clock: parts.clock,
            github: parts.github,
            deploy_keys: parts.deploy_keys,
            litellm: parts.litellm,
            request_timeout: parts.request_timeout,
        }
    }

    fn now(&self) -> String {
        rfc3339_millis(self.clock.now())
    }

    /// The deploy-key provider (revocation deletes its keys at GitHub).
    pub fn deploy_keys(&self) -> &DeployKeys {
        &self.deploy_keys
    }

    /// Hand `caller` the credential `request` asks for (`POST /v1/credentials`): issued, or
    /// an approval request to wait on, or a refusal — each one audited.
    pub async fn request(
        &self,
        caller: &Caller,
        request: CredentialRequest,
        wait: Wait,
    ) -> Result<Answer, IssueError> {
        let started = Instant::now();
        match request.kind {
            Some(CredentialKind::LitellmKey) => match &self.litellm {
                Some(p) => self.validate(p, caller, &request, &wait, started).await,
                None => {
                    let e = IssueError::InvalidKind(
                        "credential kind litellm_key is not served by this broker ([litellm] is \
                         not configured)"
                            .into(),
                    );
                    Err(self.refuse_unvalidated(caller, None, e).await)
                }
            },
            Some(CredentialKind::DeployKey) => {
                self.validate(&self.deploy_keys, caller, &request, &wait, started)
                    .await
            }
            Some(CredentialKind::SshDeployKey) => {
                let e = IssueError::InvalidKind(
                    "credential kind ssh_deploy_key is not served; ask for \"deploy_key\"".into(),
                );
                Err(self.refuse_unvalidated(caller, Some(&request), e).await)
            }
            // GitHub's validation refuses a missing kind.
            _ => {
                self.validate(&self.github, caller, &request, &wait, started)
                    .await
            }
        }
    }

    /// Validate a request of `provider`'s kind, then decide it; a request that does not
    /// validate is refused and audited (with its raw repositories and permissions, bounded).
    async fn validate<P: Provider>(
        &self,
        provider: &P,
        caller: &Caller,
        request: &CredentialRequest,
        wait: &Wait,
        started: Instant,
    ) -> Result<Answer, IssueError> {
        match provider.validate(request) {
            Ok(ask) => {
                self.decide(provider, caller, ask, request, wait, started)
                    .await
            }
            Err(e) => Err(self.refuse_unvalidated(caller, Some(request), e).await),
        }
    }

    /// Audit a request whose body could not be read (`code` and `message` say why).
    pub async fn refuse_unread(&self, caller: &Caller, code: &str, message: &str) {
        self.audit_unvalidated(caller, None, code, message).await;
    }

    /// Audit (and count) a request refused before it validated, and hand the error back.
    async fn refuse_unvalidated(
        &self,
        caller: &Caller,
        request: Option<&CredentialRequest>,
        error: IssueError,
    ) -> IssueError {
        let code = error.code();
        self.audit_unvalidated(caller, request, code.as_str(), &error.message())
            .await;
        error
    }

    /// Audit (and count) a request refused before it validated. Its bot is looked up only
    /// here: a request that validates is decided (and its bot found) on the policy in force.
    async fn audit_unvalidated(
        &self,
        caller: &Caller,
        request: Option<&CredentialRequest>,
        code: &str,
        message: &str,
    ) {
        let bot = self.policy.current().bot_for(caller).map(str::to_string);
        let e = events::unvalidated(self.now(), caller, bot.as_deref(), request, code, message);
        self.metrics.request(bot.as_deref(), code);
        if let Err(err) = self.audit.record(vec![e]).await {
            tracing::error!(error = %err, "audit log write failed for a refusal");
        }
    }

    /// Audit a refused request (`before` + `credential_denied` about `subject`, one flush),
    /// count it, and hand the error back.
    async fn refuse(
        &self,
        mut before: Vec<AuditEvent>,
        subject: &AuditEvent,
        rule: Option<&str>,
        error: IssueError,
    ) -> IssueError {
        before.push(events::denied(subject, self.now(), rule, &error));
        self.metrics
            .request(subject.bot.as_deref(), error.code().as_str());
        if let Err(e) = self.audit.record(before).await {
            tracing::error!(error = %e, "audit log write failed for a refusal");
        }
        error
    }

    fn decide_now(&self, caller: &Caller, resource: &Resource) -> Decision {
        self.policy.current().decide_with(
            caller,
            &resource.as_request(),
            &self.approvals.remembered(),
        )
    }

    /// The policy in force now, when it denies `caller` the `resource`: an approval or a grant
    /// never outweighs a deny, whenever the deny was added.
    fn denied_now(&self, caller: &Caller, resource: &Resource) -> Option<Decision> {
        let decision = self.decide_now(caller, resource);
        (decision.outcome == Outcome::Deny).then_some(decision)
    }

    /// Decide a validated request on the policy in force now (not the one seen before the
    /// body arrived: a deny added by a reload meanwhile must win), then hand out, refuse or
    /// ask a human.
    async fn decide<P: Provider>(
        &self,
        provider: &P,
        caller: &Caller,
        ask: P::Ask,
        request: &CredentialRequest,
        wait: &Wait,
        started: Instant,
    ) -> Result<Answer, IssueError> {
        let subject = provider.subject(&ask);
        let decision = self.decide_now(caller, &subject.resource);
        self.metrics
            .decision(events::outcome_label(decision.outcome));
        let mut requested = events::about(
            AuditEventKind::CredentialRequested,
            self.now(),
            caller,
            decision.bot.as_deref(),
        );
        requested.reason = subject.reason.clone();
        provider.describe(&ask, &mut requested);
        let asked = Asked {
            ask,
            requested,
            replaces: request.replaces.as_deref(),
            wait,
        };
        if decision.outcome != Outcome::Allow {
            return self.not_allowed(caller, asked, subject, &decision).await;
        }

        // Decided again right before the answer (after any wait on another request's mint,
        // and after this one's): a reload meanwhile must win.
        let wants_approval = provider.recheck_wants_approval();
        let recheck = || {
            let now = self.decide_now(caller, &subject.resource);
            match now.outcome {
                Outcome::Allow => None,
                Outcome::RequireApproval if !wants_approval => None,
                _ => Some(now),
            }
        };
        let minted = provider
            .mint(Mint {
                caller,
                bot: decision.bot.as_deref(),
                rule: &decision.rule,
                approval: &Approval::Auto,
                ask: &asked.ask,
                replaces: asked.replaces,
                before: vec![asked.requested.clone()],
                recheck: &recheck,
            })
            .await;
        match minted {
            Ok(Minted::Issued(answer)) => {
                self.metrics.request(decision.bot.as_deref(), "issued");
                self.metrics.issue_latency(started.elapsed().as_secs_f64());
                Ok(Answer::Issued(answer.into()))
            }
            Ok(Minted::Refused {
                decision: now,
                before_recorded,
            }) => {
                tracing::info!(bot = decision.bot.as_deref().unwrap_or("-"), rule = %now.rule, "the policy changed before the answer; decided again");
                if before_recorded {
                    // The request is on record with its issue; only the refusal follows.
                    let e = policy_denied(&now);
                    return Err(self
                        .refuse(Vec::new(), &asked.requested, Some(&now.rule), e)
                        .await);
                }
                self.not_allowed(caller, asked, subject, &now).await
            }
            Err(e) => {
                if !e.is_internal() {
                    tracing::warn!(bot = decision.bot.as_deref().unwrap_or("-"), code = %e.code(), error = %e, "no credential issued");
                }
                let requested = asked.requested;
                Err(self
                    .refuse(vec![requested.clone()], &requested, Some(&decision.rule), e)
                    .await)
            }
        }
    }

    /// The answer to a request the policy does not simply allow: a denial, or a live grant /
    /// approval request.
    async fn not_allowed<A: Send + Sync>(
        &self,
        caller: &Caller,
        asked: Asked<'_, A>,
        subject: Subject,
        decision: &Decision,
    ) -> Result<Answer, IssueError> {
        if decision.outcome == Outcome::Deny {
            let requested = asked.requested;
            return Err(self
                .refuse(
                    vec![requested.clone()],
                    &requested,
                    Some(&decision.rule),
                    policy_denied(decision),
                )
                .await);
        }
        self.require_approval(caller, decision, asked, subject)
            .await
    }

    /// A request that needs approval: a live grant issues it, else an approval request is
    /// created (or joined) and optionally waited on.
    async fn require_approval<A: Send + Sync>(
        &self,
        caller: &Caller,
        decision: &Decision,
        asked: Asked<'_, A>,
        subject: Subject,
    ) -> Result<Answer, IssueError> {
        let started = Instant::now();
        let Asked {
            mut requested,
            replaces,
            wait,
            ..
        } = asked;
        let bot = decision.bot.clone();
        let wait = match wait.parse(self.approvals.config().max_wait.as_duration()) {
            Ok(w) => w,
            Err(e) => {
                return Err(self
                    .refuse(vec![requested.clone()], &requested, None, e)
                    .await);
            }
        };
        let owner = owner_of(bot.as_deref(), caller);

        if let Some(grant) = self
            .approvals
            .covering_grant(&owner, &subject.resource.as_request())
        {
            requested.request_id = Some(grant.request_id.clone());
            let approved = Approved {
                bot,
                rule: format!("grant {}", grant.grant_id),
                subject,
                approval: Approval::Grant {
                    request_id: grant.request_id.clone(),
                },
            };
            let credential = self
                .issue_approved(caller, &approved, replaces, vec![requested])
                .await?;
            self.metrics.issue_latency(started.elapsed().as_secs_f64());
            return Ok(Answer::Issued(credential));
        }

        let new = NewRequest {
            owner,
            bot: bot.clone(),
            caller: caller.describe(),
            resource: subject.resource.clone(),
            reason: subject.reason.clone(),
            rule: decision.rule.clone(),
            timeout: decision.approval_timeout,
            min_ttl: subject.min_ttl,
            workspace: subject.workspace.clone(),
            client_ip: Some(caller.address.ip().to_string()),
            preceding: Some(requested.clone()),
        };
        let joined = match self.approvals.request(new).await {
            Ok(r) => r,
            Err(e) => {
                return Err(self
                    .refuse(vec![requested.clone()], &requested, None, e.into())
                    .await);
            }
        };
        self.metrics.request(bot.as_deref(), "approval_pending");
        if !joined.created {
            // A new request recorded this event itself, right before `approval_requested`.
            requested.request_id = Some(joined.view.request_id.clone());
            requested.detail = Some("joined an identical pending approval request".into());
            if let Err(e) = self.audit.record(vec![requested]).await {
                tracing::error!(error = %e, "audit log write failed for an approval request");
            }
        }

        // The router's request timeout bounds every POST; answer 202 before it fires.
        let room = self.request_timeout.saturating_sub(Duration::from_secs(1));
        let view = if wait.is_zero() {
            joined.view
        } else {
            self.approvals
                .wait_decided(&joined.view.request_id, wait.min(room))
                .await?
        };
        self.answer_for(caller, view, replaces).await
    }

    /// `GET /v1/requests/{id}?wait=`: the caller's own approval request, waited on, answered
    /// with its credential once approved.
    pub async fn poll(&self, caller: &Caller, id: &str, wait: Wait) -> Result<Answer, IssueError> {
        let wait = wait.parse(self.approvals.config().max_wait.as_duration())?;
        let bot = self.policy.current().bot_for(caller).map(str::to_string);
        let owner = owner_of(bot.as_deref(), caller);
        let view = self.approvals.get_owned(&owner, id)?;
        let view = if wait.is_zero() || view.state.is_decided() {
            view
        } else {
            self.approvals.wait_decided(id, wait).await?
        };
        self.answer_for(caller, view, None).await
    }

    /// What the bot gets for a request in `view`'s state: the credential once approved, an
    /// error once denied or expired, else the pending request.
    async fn answer_for(
        &self,
        caller: &Caller,
        view: ApprovalRequestView,
        replaces: Option<&str>,
    ) -> Result<Answer, IssueError> {
        match view.state {
            ApprovalState::Pending => Ok(Answer::Pending(view)),
            ApprovalState::Denied => {
                let by = view.decided_by.as_deref().unwrap_or("an admin");
                Err(IssueError::ApprovalDenied {
                    message: match &view.deny_reason {
                        Some(r) => format!("{by} denied request {}: {r}", view.request_id),
                        None => format!("{by} denied request {}", view.request_id),
                    },
                    rule: view.rule.clone(),
                })
            }
            ApprovalState::Expired => Err(IssueError::ApprovalExpired(format!(
                "nobody decided request {} before {}; ask again",
                view.request_id, view.expires_at
            ))),
            ApprovalState::Approved | ApprovalState::Issued => {
                let (resource, min_ttl, workspace) =
                    self.approvals.resource_of(&view.request_id)?;
                let approved = Approved {
                    bot: view.bot.clone(),
                    rule: view.rule.clone(),
                    subject: Subject {
                        resource,
                        min_ttl,
                        reason: None,
                        workspace,
                    },
                    approval: Approval::Manual {
                        request_id: view.request_id.clone(),
                    },
                };
                // A deny added after the approval wins, and says so (rather than "expired",
                // which a reload that ended the grant would otherwise show).
                if let Some(d) = self.denied_now(caller, &approved.subject.resource) {
                    return Err(self
                        .refuse_approved(caller, &approved, Vec::new(), policy_denied(&d))
                        .await);
                }
                let live = view
                    .grant_id
                    .as_deref()
                    .is_some_and(|g| self.approvals.grant_is_live(g));
                if !live {
                    return Err(IssueError::ApprovalExpired(format!(
                        "the grant from request {} was revoked or has expired; ask again",
                        view.request_id
                    )));
                }
                let credential = self
                    .issue_approved(caller, &approved, replaces, Vec::new())
                    .await?;
                // The credential is minted and audited: a failed state write must not
                // withhold it.
                if let Err(e) = self
                    .approvals
                    .mark_issued(&view.request_id, credential.credential_id())
                {
                    tracing::error!(request_id = %view.request_id, code = %e.code(), error = %e, "could not mark the request issued");
                }
                Ok(Answer::Issued(credential))
            }
        }
    }

    /// Audit the refusal of an approved or granted request (`before` + `credential_denied`).
    async fn refuse_approved(
        &self,
        caller: &Caller,
        a: &Approved,
        before: Vec<AuditEvent>,
        error: IssueError,
    ) -> IssueError {
        let mut subject = events::about(
            AuditEventKind::CredentialDenied,
            self.now(),
            caller,
            a.bot.as_deref(),
        );
        a.approval.stamp(&mut subject);
        crate::approvals::fill_resource(&mut subject, &a.subject.resource.to_wire());
        // The deny's rule when a policy refused, else the approval's.
        let rule = error.rule().unwrap_or(&a.rule).to_string();
        self.refuse(before, &subject, Some(&rule), error).await
    }

    /// Hand out the credential of an approved or granted request, unless the policy in force
    /// now denies it (checked here, right before the mint, on every path that hands out what
    /// an approval covered, and again by the provider right before the answer). `before` are
    /// events to record in the same flush (the request).
    async fn issue_approved(
        &self,
        caller: &Caller,
        a: &Approved,
        replaces: Option<&str>,
        before: Vec<AuditEvent>,
    ) -> Result<Credential, IssueError> {
        if let Some(d) = self.denied_now(caller, &a.subject.resource) {
            tracing::info!(bot = a.bot.as_deref().unwrap_or("-"), request_id = %a.request_id(), "approved request refused: the policy now denies it");
            return Err(self
                .refuse_approved(caller, a, before, policy_denied(&d))
                .await);
        }
        match &a.subject.resource {
            Resource::Github { .. } => {
                self.mint_approved(&self.github, caller, a, replaces, before)
                    .await
            }
            Resource::DeployKey { .. } => {
                self.mint_approved(&self.deploy_keys, caller, a, None, before)
                    .await
            }
            Resource::Litellm { .. } => {
                let Some(litellm) = &self.litellm else {
                    let e = IssueError::InvalidKind(
                        "credential kind litellm_key is not served by this broker ([litellm] is \
                         not configured)"
                            .into(),
                    );
                    return Err(self.refuse_approved(caller, a, before, e).await);
                };
                self.mint_approved(litellm, caller, a, replaces, before)
                    .await
            }
        }
    }

    async fn mint_approved<P: Provider>(
        &self,
        provider: &P,
        caller: &Caller,
        a: &Approved,
        replaces: Option<&str>,
        before: Vec<AuditEvent>,
    ) -> Result<Credential, IssueError> {
        let ask = match provider.ask_for(a.subject.clone()) {
            Ok(ask) => ask,
            Err(e) => return Err(self.refuse_approved(caller, a, before, e).await),
        };
        // Decided again right before the answer, after any wait on the mint: a deny a reload
        // added meanwhile wins.
        let recheck = || self.denied_now(caller, &a.subject.resource);
        let minted = provider
            .mint(Mint {
                caller,
                bot: a.bot.as_deref(),
                rule: &a.rule,
                approval: &a.approval,
                ask: &ask,
                replaces,
                before: before.clone(),
                recheck: &recheck,
            })
            .await;
        match minted {
            Ok(Minted::Issued(answer)) => {
                self.metrics.request(a.bot.as_deref(), "issued");
                Ok(answer.into())
            }
            Ok(Minted::Refused {
                decision,
                before_recorded,
            }) => {
                tracing::info!(bot = a.bot.as_deref().unwrap_or("-"), request_id = %a.request_id(), "approved request refused: the policy now denies it");
                let before = if before_recorded { Vec::new() } else { before };
                Err(self
                    .refuse_approved(caller, a, before, policy_denied(&decision))
                    .await)
            }
            Err(e) => Err(self.refuse_approved(caller, a, before, e).await),
        }
    }
}

/// The refusal of a request the policy denies.
fn policy_denied(decision: &Decision) -> IssueError {
    IssueError::PolicyDenied {
        rule: decision.rule.clone(),
        explanation: decision.explanation.clone(),
    }
}
