//! GitHub installation tokens as a [`Provider`]: the request's repositories, permissions and
//! ttl, the [`TokenIssuer`] (reuse, single flight, the recheck under its lock), the
//! `credential_issued` event with the token's scope, and the seed's answer (clone URLs,
//! askpass script, commit attribution).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use botcreds_proto::audit::{AuditEvent, AuditEventKind};
use botcreds_proto::{
    Attribution, CredentialKind, CredentialRequest, GitAccess, GithubCredential, Permission,
    RepoName, Ttl,
};

use super::provider::{Mint, Minted, Provider, Subject, validate_reason};
use super::{Credential, IssueError};
use crate::audit::AuditLog;
use crate::clock::{SharedClock, rfc3339, rfc3339_millis};
use crate::grants::{Checked, Replaced, TokenIssuer, TokenScope};
use crate::identity::Caller;
use crate::issued::credential_issued;
use crate::metrics::Metrics;
use crate::policy::remembered::Resource;

/// GitHub accepts at most this many repositories per token.
const MAX_REPOSITORIES: usize = 500;
const MAX_PERMISSIONS: usize = 64;

/// A validated GitHub token request.
#[derive(Clone, Debug)]
pub struct GithubAsk {
    pub repositories: Vec<RepoName>,
    pub permissions: Vec<Permission>,
    /// Life the token must still have when handed out.
    pub min_ttl: Duration,
    pub reason: Option<String>,
}

/// The GitHub token provider.
pub struct GithubTokens {
    issuer: Arc<TokenIssuer>,
    audit: AuditLog,
    clock: SharedClock,
    metrics: Metrics,
    /// The longest `ttl` a request may ask (`[limits] max_github_ttl`).
    max_ttl: Duration,
    /// The life a token must still have when the request names no `ttl`.
    default_min_ttl: Duration,
}

impl GithubTokens {
    pub fn new(
        issuer: Arc<TokenIssuer>,
        audit: AuditLog,
        clock: SharedClock,
        metrics: Metrics,
        max_ttl: Duration,
        default_min_ttl: Duration,
    ) -> GithubTokens {
        GithubTokens {
            issuer,
            audit,
            clock,
            metrics,
            max_ttl,
            default_min_ttl,
        }
    }

    /// Commit attribution: the App's bot login and noreply address, and the bot's trailer.
    async fn attribution(&self, bot: Option<&str>) -> Attribution {
        let trailer = format!("Bot: {}", bot.unwrap_or("unknown"));
        match self.issuer.github().app_identity().await {
            Ok(app) => Attribution {
                name: app.bot_login(),
                email: app.noreply_email(),
                trailer,
            },
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

    /// `credential_revoked` for a token the issuer revoked itself (superseded by a replacement).
    fn replaced_event(
        &self,
        caller: &Caller,
        bot: Option<&str>,
        replaced: &Replaced,
    ) -> AuditEvent {
        let mut e = AuditEvent::new(
            AuditEventKind::CredentialRevoked,
            rfc3339_millis(self.clock.now()),
        );
        e.bot = bot.map(str::to_string);
        e.caller = Some(caller.describe());
        e.token_id = Some(replaced.credential_id.clone());
        e.repositories = replaced.repositories.clone();
        e.expires_at = Some(rfc3339(replaced.expires_at));
        e.detail = Some(match &replaced.error {
            None => {
                "replaced at the client's report that GitHub rejected it; revoked at GitHub".into()
            }
            Some(err) => format!("replaced; GitHub did not confirm the revocation: {err}"),
        });
        e
    }

    /// Audit the revocation of a token minted for a request the recheck then refused (held by
    /// nobody; see [`Checked::Refused`]).
    async fn audit_unheld(&self, caller: &Caller, bot: Option<&str>, revoked: &Replaced) {
        let mut e = self.replaced_event(caller, bot, revoked);
        e.reason = Some("the policy no longer allows the request it was minted for".into());
        e.detail = Some(match &revoked.error {
            None => "minted for a request the policy then refused; held by nobody; revoked at \
                     GitHub"
                .into(),
            Some(err) => format!(
                "minted for a request the policy then refused; held by nobody; GitHub did not \
                 confirm the revocation: {err}"
            ),
        });
        if let Err(err) = self.audit.record(vec![e]).await {
            tracing::error!(error = %err, "audit log write failed for a revoked token");
        }
    }

    /// The seed's answer for a token: the clone URLs and the askpass script carry it.
    fn answer(
        &self,
        token: &crate::grants::IssuedToken,
        repositories: &[RepoName],
        m: &Mint<'_, GithubAsk>,
        attribution: Attribution,
    ) -> GithubCredential {
        let host = self.issuer.github().git_host();
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
            approval: m.approval.as_str().to_string(),
            bot: m.bot.unwrap_or_default().to_string(),
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
}

/// Fill an event's repository and permission fields.
pub fn describe_scope(repositories: &[RepoName], permissions: &[Permission], e: &mut AuditEvent) {
    e.repositories = repositories.iter().map(|r| r.to_string()).collect();
    if let [only] = repositories {
        e.repo = Some(only.to_string());
    }
    e.permissions = permissions.iter().map(|p| p.to_string()).collect();
}

#[async_trait]
impl Provider for GithubTokens {
    type Ask = GithubAsk;
    type Answer = GithubCredential;

    fn validate(&self, r: &CredentialRequest) -> Result<GithubAsk, IssueError> {
        match r.kind {
            Some(CredentialKind::GithubToken) => {}
            Some(other) => {
                return Err(IssueError::InvalidKind(format!(
                    "credential kind {} is not served by this broker yet",
                    other.as_str()
                )));
            }
            None => {
                return Err(IssueError::InvalidKind(
                    "the request names no kind (e.g. \"kind\": \"github_token\")".into(),
                ));
            }
        }
        if r.scope.is_some() {
            return Err(IssueError::InvalidRequest(
                "`scope` belongs to litellm_key requests, not github_token".into(),
            ));
        }
        if r.repositories.is_empty() {
            return Err(IssueError::NoRepositories);
        }
        if r.repositories.len() > MAX_REPOSITORIES {
            return Err(IssueError::TooManyRepositories(format!(
                "at most {MAX_REPOSITORIES} repositories per token"
            )));
        }
        let mut repositories = Vec::with_capacity(r.repositories.len());
        for raw in &r.repositories {
            let repo: RepoName = raw
                .parse()
                .map_err(|e| IssueError::InvalidRepository(format!("{e}")))?;
            if !repositories.contains(&repo) {
                repositories.push(repo);
            }
        }
        let owner = repositories[0].owner().to_string();
        if let Some(other) = repositories.iter().find(|r| r.owner() != owner) {
            return Err(IssueError::ReposAcrossOwners(format!(
                "{other} belongs to another owner than {owner}; ask for one token per owner"
            )));
        }
        if r.permissions.is_empty() {
            return Err(IssueError::EmptyPermissions);
        }
        if r.permissions.len() > MAX_PERMISSIONS {
            return Err(IssueError::UnknownPermission("too many permissions".into()));
        }
        let mut permissions = Vec::with_capacity(r.permissions.len());
        for raw in &r.permissions {
            let p: Permission = raw
                .parse()
                .map_err(|e| IssueError::UnknownPermission(format!("{e}")))?;
            if !permissions.contains(&p) {
                permissions.push(p);
            }
        }
        let max = self.max_ttl;
        let min_ttl = match &r.ttl {
            None => self.default_min_ttl.min(max),
            Some(raw) => {
                let ttl: Ttl = raw
                    .parse()
                    .map_err(|e| IssueError::InvalidTtl(format!("{e}")))?;
                if ttl.as_duration() > max {
                    return Err(IssueError::TtlTooLong(format!(
                        "ttl {ttl} is longer than the {} a GitHub token can still have when handed out",
                        Ttl::from_secs(max.as_secs())
                    )));
                }
                ttl.as_duration()
            }
        };
        let reason = validate_reason(r.reason.as_deref())?;
        Ok(GithubAsk {
            repositories,
            permissions,
            min_ttl,
            reason,
        })
    }

    fn subject(&self, ask: &GithubAsk) -> Subject {
        Subject {
            resource: Resource::github(&ask.repositories, &ask.permissions),
            min_ttl: ask.min_ttl,
            reason: ask.reason.clone(),
            workspace: None,
        }
    }

    fn ask_for(&self, subject: Subject) -> Result<GithubAsk, IssueError> {
        match subject.resource {
            Resource::Github {
                repositories,
                permissions,
            } => Ok(GithubAsk {
                repositories,
                permissions,
                min_ttl: subject.min_ttl,
                reason: subject.reason,
            }),
            // Another kind's approval never reaches this provider (the service dispatches
            // on the resource).
            _ => Err(IssueError::Internal(
                "another kind's approval reached the GitHub provider".into(),
            )),
        }
    }

    fn describe(&self, ask: &GithubAsk, e: &mut AuditEvent) {
        describe_scope(&ask.repositories, &ask.permissions, e);
    }

    fn recheck_wants_approval(&self) -> bool {
        // The token is withheld under the issuer's lock before anyone holds it, so a reload
        // that now wants a human sends the request to one.
        true
    }

    async fn mint(
        &self,
        mut m: Mint<'_, GithubAsk>,
    ) -> Result<Minted<GithubCredential>, IssueError> {
        let ask = m.ask;
        let Some(scope) = TokenScope::new(&ask.repositories, &ask.permissions) else {
            return Err(IssueError::Internal(
                "validated request has no repository".into(),
            ));
        };
        let who = crate::approvals::owner_of(m.bot, m.caller);
        let issued = match self
            .issuer
            .issue(&scope, ask.min_ttl, m.replaces, &who, m.recheck)
            .await?
        {
            Checked::Issued(i) => *i,
            Checked::Refused { refusal, revoked } => {
                if let Some(r) = &revoked {
                    self.audit_unheld(m.caller, m.bot, r).await;
                }
                return Ok(Minted::Refused {
                    decision: refusal,
                    before_recorded: false,
                });
            }
        };
        self.metrics.token_reuse(issued.reused);
        let attribution = self.attribution(m.bot).await;
        let token = &issued.token;
        let mut done = credential_issued(
            rfc3339_millis(self.clock.now()),
            m.caller.describe(),
            m.approval,
            token.credential_id.clone(),
            rfc3339(token.expires_at),
        );
        done.bot = m.bot.map(str::to_string);
        done.client_ip = Some(m.caller.address.ip().to_string());
        describe_scope(&ask.repositories, &ask.permissions, &mut done);
        done.reason = ask.reason.clone();
        done.rule = Some(m.rule.to_string());
        done.reused = issued.reused;
        let mut events = std::mem::take(&mut m.before);
        events.push(done);
        if let Some(r) = &issued.replaced {
            events.push(self.replaced_event(m.caller, m.bot, r));
        }
        if let Err(e) = self.audit.record(events).await {
            // No durable record, no token.
            return Err(IssueError::Audit(e.to_string()));
        }
        let answer = self.answer(token, &ask.repositories, &m, attribution);
        tracing::info!(
            bot = m.bot.unwrap_or("-"),
            credential_id = %token.credential_id,
            reused = issued.reused,
            approval = m.approval.as_str(),
            request_id = m.approval.request_id().unwrap_or("-"),
            expires_at = %answer.expires_at,
            "credential issued"
        );
        Ok(Minted::Issued(answer))
    }

    fn credential_id(answer: &GithubCredential) -> &str {
        &answer.credential_id
    }
}

impl From<GithubCredential> for Credential {
    fn from(c: GithubCredential) -> Credential {
        Credential::Github(c)
    }
}
