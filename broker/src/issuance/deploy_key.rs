//! SSH deploy keys as a [`Provider`]: one repository, `contents:read` or `contents:write`
//! (GitHub's `read_only` true / false), a lifetime. The broker generates an ed25519 key pair,
//! registers the public key at GitHub with an installation token holding
//! `administration:write` on the repository (minted through the [`TokenIssuer`], never handed
//! out), schedules its deletion in the store, and answers once with the private key, which it
//! keeps nowhere (zeroized after the answer is built; never logged or stored).
//!
//! GitHub never deletes a deploy key itself, not even when the App is uninstalled, so the
//! reaper ([`DeployKeys::run_reaper`]) is the only cleanup: every key's deletion is a store
//! document written before the answer, deleted (404 = gone already) when due, retried with
//! backoff, counted as overdue and warned about while it fails, so a restart or a crash
//! never leaves a key behind.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use botcreds_proto::audit::{AuditEvent, AuditEventKind};
use botcreds_proto::{
    CredentialKind, CredentialRequest, DeployKeyCredential, DeployKeyGit, Level, Permission,
    RepoName, Ttl,
};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use serde::{Deserialize, Serialize};
use ssh_key::rand_core::OsRng;
use ssh_key::{Algorithm, LineEnding, PrivateKey};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::provider::{Mint, Minted, Provider, Subject, validate_reason};
use super::{Credential, IssueError};
use crate::audit::AuditLog;
use crate::clock::{SharedClock, rfc3339, rfc3339_millis};
use crate::grants::{Checked, TokenIssuer, TokenScope};
use crate::issued::credential_issued;
use crate::policy::remembered::Resource;
use crate::providers::github::GithubError;
use crate::secret::{Secret, sha256_hex};
use crate::store::Store;

/// Store namespace of the deletion schedule: one document per live deploy key.
const NAMESPACE: &str = "deploy_keys";
/// Who holds the `administration:write` tokens the broker mints for itself.
const HOLDER: &str = "botcreds:deploy-keys";
/// The life an `administration:write` token must still have for one add or delete.
const ADMIN_TOKEN_MIN_TTL: Duration = Duration::from_secs(120);
/// The longest the reaper sleeps without looking at the schedule.
const MAX_IDLE: Duration = Duration::from_secs(30);
/// The longest wait between two attempts to delete one key.
const MAX_BACKOFF_SECS: i64 = 300;

/// A validated deploy-key request.
#[derive(Clone, Debug)]
pub struct DeployKeyAsk {
    pub repository: RepoName,
    /// `contents:read` (read-only key) or `contents:write`.
    pub permission: Permission,
    /// How long the key lives at GitHub.
    pub ttl: Duration,
    pub reason: Option<String>,
}

impl DeployKeyAsk {
    fn read_only(&self) -> bool {
        self.permission.level() == Level::Read
    }
}

/// One key's scheduled deletion, as the store keeps it. No secret: the public key's id only.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Scheduled {
    credential_id: String,
    key_id: u64,
    repository: String,
    /// `contents:read` or `contents:write`: what a revocation's grant end is about.
    #[serde(default)]
    permission: Option<String>,
    /// RFC 3339: when the key is deleted.
    expires_at: String,
    #[serde(default)]
    bot: Option<String>,
    /// Failed deletion attempts so far.
    #[serde(default)]
    attempts: u32,
    /// RFC 3339: no new attempt before this.
    #[serde(default)]
    retry_at: Option<String>,
}

/// Which deploy keys a revocation deletes.
#[derive(Clone, Copy, Debug)]
pub enum RevokeKeys<'a> {
    /// One key, by its `dk_...` id.
    Credential(&'a str),
    /// Every key handed to a bot.
    Bot(&'a str),
    /// Every key of a repository.
    Repo(&'a RepoName),
}

/// A deploy key a revocation deleted (or could not delete yet: the reaper retries).
#[derive(Clone, Debug)]
pub struct RevokedKey {
    pub credential: botcreds_proto::approval::RevokedCredential,
    /// The bot it was handed to and what it was for, whose grant ends with it.
    pub owner: Option<String>,
    pub resource: Option<Resource>,
}

/// What one pass of the reaper did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReapReport {
    pub deleted: usize,
    /// Keys past their expiry that could not be deleted (the overdue gauge).
    pub overdue: usize,
}

/// The deploy-key provider and its reaper. Cheap to clone.
#[derive(Clone)]
pub struct DeployKeys {
    inner: Arc<Inner>,
}

struct Inner {
    issuer: Arc<TokenIssuer>,
    audit: AuditLog,
    clock: SharedClock,
    store: Arc<dyn Store>,
    /// `[limits] max_deploy_key_ttl`.
    max_ttl: Duration,
    /// The life of a key whose request names no `ttl`.
    default_ttl: Duration,
    /// Woken when a key is scheduled, so the reaper sleeps until the earliest expiry.
    wake: tokio::sync::Notify,
    overdue: AtomicU64,
}

impl DeployKeys {
    pub fn new(
        issuer: Arc<TokenIssuer>,
        audit: AuditLog,
        clock: SharedClock,
        store: Arc<dyn Store>,
        max_ttl: Duration,
    ) -> DeployKeys {
        DeployKeys {
            inner: Arc::new(Inner {
                issuer,
                audit,
                clock,
                store,
                max_ttl,
                default_ttl: Duration::from_secs(3600).min(max_ttl),
                wake: tokio::sync::Notify::new(),
                overdue: AtomicU64::new(0),
            }),
        }
    }

    /// Keys whose deletion is scheduled (live at GitHub, or not confirmed deleted).
    pub fn scheduled_count(&self) -> usize {
        self.scheduled().len()
    }

    /// Keys past their expiry that the last reaper pass could not delete.
    pub fn overdue(&self) -> u64 {
        self.inner.overdue.load(Ordering::Relaxed)
    }

    /// The metrics collector (`botcreds_deploy_key_overdue`, `botcreds_deploy_keys_live`).
    pub fn metrics(&self) -> DeployKeyMetrics {
        DeployKeyMetrics(self.clone())
    }

    /// An installation token with `administration:write` on `repo`, for the broker itself;
    /// `rejected` is the id of one GitHub refused as dead (replaced rather than reused).
    async fn admin_token<R>(
        &self,
        repo: &RepoName,
        rejected: Option<&str>,
        recheck: impl Fn() -> Option<R>,
    ) -> Result<Checked<R>, IssueError> {
        let admin = Permission::new("administration", Level::Write)
            .map_err(|e| IssueError::Internal(format!("administration:write: {e}")))?;
        let Some(scope) = TokenScope::new(std::slice::from_ref(repo), &[admin]) else {
            return Err(IssueError::Internal("no repository".into()));
        };
        Ok(self
            .inner
            .issuer
            .issue(&scope, ADMIN_TOKEN_MIN_TTL, rejected, HOLDER, recheck)
            .await?)
    }

    /// Delete one key at GitHub now (404 = gone already).
    async fn delete_at_github(&self, repo: &RepoName, key_id: u64) -> Result<(), IssueError> {
        let mut rejected = None;
        loop {
            let token = match self
                .admin_token(repo, rejected.as_deref(), || None::<Infallible>)
                .await?
            {
                Checked::Issued(i) => i.token,
                Checked::Refused { refusal, .. } => match refusal {},
            };
            match self
                .inner
                .issuer
                .github()
                .delete_deploy_key(&token.token, repo, key_id)
                .await
            {
                // The cached token died at GitHub (revoked there): once more with a new one.
                Err(GithubError::AuthFailed { .. }) if rejected.is_none() => {
                    rejected = Some(token.credential_id);
                }
                other => return other.map_err(|e| IssueError::Token(e.into())),
            }
        }
    }

    fn put(&self, s: &Scheduled) -> Result<(), IssueError> {
        let bytes = serde_json::to_vec(s).map_err(|e| IssueError::Internal(e.to_string()))?;
        self.inner
            .store
            .put_doc(NAMESPACE, &s.credential_id, &bytes)
            .and_then(|()| self.inner.store.flush())
            .map_err(|e| IssueError::Internal(format!("scheduling the deploy key's deletion: {e}")))
    }

    fn unschedule(&self, credential_id: &str) {
        if let Err(e) = self.inner.store.delete_doc(NAMESPACE, credential_id) {
            tracing::error!(credential_id, error = %e, "could not remove a deploy key's deletion from the schedule");
        }
    }

    fn scheduled(&self) -> Vec<Scheduled> {
        match self.inner.store.list_docs(NAMESPACE) {
            Ok(docs) => docs
                .into_iter()
                .filter_map(|(id, bytes)| match serde_json::from_slice(&bytes) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::error!(credential_id = %id, error = %e, "unreadable deploy-key schedule entry");
                        None
                    }
                })
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "could not read the deploy-key schedule");
                Vec::new()
            }
        }
    }

    /// Take back a key the request may not have after all (its audit write failed, or the
    /// policy changed before the answer): delete it at GitHub now, and leave it scheduled
    /// when GitHub does not confirm, so the reaper retries.
    async fn withdraw(&self, s: &Scheduled, repo: &RepoName) -> Option<String> {
        match self.delete_at_github(repo, s.key_id).await {
            Ok(()) => {
                self.unschedule(&s.credential_id);
                None
            }
            Err(e) => {
                tracing::warn!(credential_id = %s.credential_id, error = %e, "GitHub did not confirm deleting a withdrawn deploy key; the reaper retries");
                Some(e.to_string())
            }
        }
    }

    fn event(&self, kind: AuditEventKind, s: &Scheduled) -> AuditEvent {
        let mut e = AuditEvent::new(kind, rfc3339_millis(self.inner.clock.now()));
        e.kind = Some(CredentialKind::DeployKey.as_str().to_string());
        e.bot = s.bot.clone();
        e.token_id = Some(s.credential_id.clone());
        e.repo = Some(s.repository.clone());
        e.repositories = vec![s.repository.clone()];
        e.expires_at = Some(s.expires_at.clone());
        e
    }

    /// One pass over the schedule: delete every key that is due, retry later what fails.
    pub async fn reap_once(&self) -> ReapReport {
        let now = self.inner.clock.now();
        let mut report = ReapReport::default();
        for mut s in self.scheduled() {
            let Some(expires_at) = parse_time(&s.expires_at) else {
                tracing::error!(credential_id = %s.credential_id, "deploy-key schedule entry without a valid expiry; deleting it now");
                s.expires_at = rfc3339(now);
                self.reap_one(s, now, &mut report).await;
                continue;
            };
            if expires_at > now {
                continue;
            }
            if s.retry_at
                .as_deref()
                .and_then(parse_time)
                .is_some_and(|t| t > now)
            {
                report.overdue += 1;
                continue;
            }
            self.reap_one(s, now, &mut report).await;
        }
        self.inner
            .overdue
            .store(report.overdue as u64, Ordering::Relaxed);
        report
    }

    async fn reap_one(&self, mut s: Scheduled, now: OffsetDateTime, report: &mut ReapReport) {
        let deleted = match s.repository.parse::<RepoName>() {
            Ok(repo) => self.delete_at_github(&repo, s.key_id).await,
            Err(e) => Err(IssueError::Internal(format!("stored repository: {e}"))),
        };
        match deleted {
            Ok(()) => {
                let mut e = self.event(AuditEventKind::CredentialExpired, &s);
                e.detail = Some(format!("deploy key {} deleted at GitHub", s.key_id));
                if let Err(err) = self.inner.audit.record(vec![e]).await {
                    // The key is gone; the schedule entry stays so the next pass audits it
                    // (the delete is idempotent).
                    tracing::error!(credential_id = %s.credential_id, error = %err, "audit log write failed for an expired deploy key");
                    return;
                }
                self.unschedule(&s.credential_id);
                report.deleted += 1;
                tracing::info!(credential_id = %s.credential_id, key_id = s.key_id, repo = %s.repository, "deploy key expired and deleted at GitHub");
            }
            Err(err) => {
                s.attempts = s.attempts.saturating_add(1);
                let wait = 2i64
                    .saturating_pow(s.attempts.min(16))
                    .min(MAX_BACKOFF_SECS);
                s.retry_at = Some(rfc3339(now + time::Duration::seconds(wait)));
                report.overdue += 1;
                tracing::warn!(
                    credential_id = %s.credential_id,
                    key_id = s.key_id,
                    repo = %s.repository,
                    attempts = s.attempts,
                    retry_in_secs = wait,
                    code = %err.code(),
                    error = %err,
                    "deploy key is past its expiry and could not be deleted at GitHub; retrying"
                );
                if let Err(e) = self.put(&s) {
                    tracing::error!(credential_id = %s.credential_id, error = %e, "could not record the failed deletion");
                }
            }
        }
    }

    /// Delete the keys `target` names at GitHub now and audit `credential_revoked`. A key
    /// GitHub does not confirm deleting stays scheduled, due now, so the reaper retries.
    pub async fn revoke(&self, actor: &str, target: RevokeKeys<'_>) -> Vec<RevokedKey> {
        let now = self.inner.clock.now();
        let picked: Vec<Scheduled> = self
            .scheduled()
            .into_iter()
            .filter(|s| match target {
                RevokeKeys::Credential(id) => s.credential_id == id,
                RevokeKeys::Bot(bot) => s.bot.as_deref() == Some(bot),
                RevokeKeys::Repo(repo) => s.repository.eq_ignore_ascii_case(&repo.to_string()),
            })
            .collect();
        let mut out = Vec::with_capacity(picked.len());
        for mut s in picked {
            let repo = s.repository.parse::<RepoName>();
            let deleted = match &repo {
                Ok(repo) => self.delete_at_github(repo, s.key_id).await,
                Err(e) => Err(IssueError::Internal(format!("stored repository: {e}"))),
            };
            let error = match deleted {
                Ok(()) => {
                    self.unschedule(&s.credential_id);
                    None
                }
                Err(e) => {
                    tracing::warn!(credential_id = %s.credential_id, key_id = s.key_id, error = %e, "GitHub did not confirm deleting a revoked deploy key; the reaper retries");
                    s.expires_at = rfc3339(now);
                    s.retry_at = None;
                    if let Err(e) = self.put(&s) {
                        tracing::error!(credential_id = %s.credential_id, error = %e, "could not reschedule a revoked deploy key");
                    }
                    Some(e.to_string())
                }
            };
            self.inner.wake.notify_one();
            let mut e = self.event(AuditEventKind::CredentialRevoked, &s);
            e.caller = Some(actor.to_string());
            e.detail = Some(match &error {
                None => format!("deploy key {} deleted at GitHub", s.key_id),
                Some(err) => format!(
                    "deploy key {}: GitHub did not confirm the deletion yet (retried): {err}",
                    s.key_id
                ),
            });
            if let Err(err) = self.inner.audit.record(vec![e]).await {
                tracing::error!(error = %err, "audit log write failed for a revoked deploy key");
            }
            let resource = match (&repo, s.permission.as_deref().map(str::parse::<Permission>)) {
                (Ok(repo), Some(Ok(permission))) => Some(Resource::DeployKey {
                    repository: repo.clone(),
                    permission,
                }),
                _ => None,
            };
            out.push(RevokedKey {
                credential: botcreds_proto::approval::RevokedCredential {
                    credential_id: s.credential_id.clone(),
                    repositories: vec![s.repository.clone()],
                    holders: s.bot.iter().cloned().collect(),
                    expires_at: s.expires_at.clone(),
                    revoked_upstream: error.is_none(),
                    error,
                },
                owner: s.bot.clone(),
                resource,
            });
        }
        out
    }

    /// Delete every live key whose bot `policy` now denies it (deny wins over earlier allows,
    /// approvals and grants): run at start and after each policy reload. Answers their ids.
    pub async fn revoke_denied(&self, policy: &crate::policy::Policy) -> Vec<String> {
        let denied: Vec<String> = self
            .scheduled()
            .into_iter()
            .filter(|s| {
                let (Some(bot), Some(Ok(repo)), Some(Ok(perm))) = (
                    s.bot.as_deref(),
                    Some(s.repository.parse::<RepoName>()),
                    s.permission.as_deref().map(str::parse::<Permission>),
                ) else {
                    return false;
                };
                let request = crate::policy::Request::DeployKey {
                    repositories: std::slice::from_ref(&repo),
                    permissions: std::slice::from_ref(&perm),
                };
                policy.decide_for_bot(Some(bot), &request).outcome == crate::policy::Outcome::Deny
            })
            .map(|s| s.credential_id)
            .collect();
        let mut out = Vec::with_capacity(denied.len());
        for id in denied {
            for k in self.revoke("policy", RevokeKeys::Credential(&id)).await {
                tracing::info!(credential_id = %k.credential.credential_id, "deploy key deleted: the policy now denies it");
                out.push(k.credential.credential_id);
            }
        }
        out
    }

    /// When the reaper should look again: the earliest expiry or retry in the schedule.
    fn next_due(&self) -> Option<OffsetDateTime> {
        self.scheduled()
            .iter()
            .filter_map(|s| {
                let at = parse_time(&s.expires_at)?;
                Some(match s.retry_at.as_deref().and_then(parse_time) {
                    Some(r) => at.max(r),
                    None => at,
                })
            })
            .min()
    }

    /// The reaper: a pass at start (keys that expired while the broker was down), then one
    /// at each expiry or retry time, until `stop`.
    pub async fn run_reaper(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            if *stop.borrow() {
                return;
            }
            let report = self.reap_once().await;
            if report != ReapReport::default() {
                tracing::info!(
                    deleted = report.deleted,
                    overdue = report.overdue,
                    "deploy-key reaper"
                );
            }
            let now = self.inner.clock.now();
            let wait = match self.next_due() {
                Some(at) if at <= now => Duration::from_millis(200),
                Some(at) => Duration::try_from(at - now)
                    .unwrap_or(MAX_IDLE)
                    .min(MAX_IDLE),
                None => MAX_IDLE,
            };
            tokio::select! {
                _ = stop.changed() => {}
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn answer(
        &self,
        m: &Mint<'_, DeployKeyAsk>,
        s: &Scheduled,
        private_key: &str,
        public_key: &str,
    ) -> DeployKeyCredential {
        let github = self.inner.issuer.github();
        let host = ssh_host(github.git_host());
        let repo = &m.ask.repository;
        DeployKeyCredential {
            kind: CredentialKind::DeployKey,
            credential_id: s.credential_id.clone(),
            key_id: s.key_id,
            private_key: private_key.to_string(),
            public_key: public_key.to_string(),
            expires_at: s.expires_at.clone(),
            repository: repo.to_string(),
            read_only: m.ask.read_only(),
            approval: m.approval.as_str().to_string(),
            bot: m.bot.unwrap_or_default().to_string(),
            git: DeployKeyGit {
                ssh_url: format!("git@{host}:{repo}.git"),
                ssh_command: format!(
                    "ssh -i ~/.ssh/botcreds_{} -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes",
                    s.credential_id
                ),
            },
        }
    }
}

/// The SSH host for git: the API's git host without an HTTPS port (`github.com` for
/// api.github.com, the GHES host otherwise).
fn ssh_host(git_host: &str) -> &str {
    match git_host.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => git_host,
    }
}

fn parse_time(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

/// `dk_` + the first 24 hex digits of SHA-256(public key line): names the key, reveals nothing.
fn credential_id_for(public_key: &str) -> String {
    format!("dk_{}", &sha256_hex(public_key.as_bytes())[..24])
}

#[async_trait]
impl Provider for DeployKeys {
    type Ask = DeployKeyAsk;
    type Answer = DeployKeyCredential;

    fn validate(&self, r: &CredentialRequest) -> Result<DeployKeyAsk, IssueError> {
        if r.kind != Some(CredentialKind::DeployKey) {
            return Err(IssueError::Internal(
                "another kind reached the deploy-key provider".into(),
            ));
        }
        if r.scope.is_some() || r.workspace.is_some() {
            return Err(IssueError::InvalidRequest(
                "`scope` and `workspace` belong to litellm_key requests, not deploy_key".into(),
            ));
        }
        if r.replaces.is_some() {
            return Err(IssueError::InvalidRequest(
                "`replaces` is for github_token requests; a deploy key is never reused".into(),
            ));
        }
        let [raw_repo] = r.repositories.as_slice() else {
            return Err(IssueError::InvalidDeployKeyRequest(format!(
                "a deploy key is for exactly one repository; the request names {}",
                r.repositories.len()
            )));
        };
        let repository: RepoName = raw_repo
            .parse()
            .map_err(|e| IssueError::InvalidRepository(format!("{e}")))?;
        let [raw_perm] = r.permissions.as_slice() else {
            return Err(IssueError::InvalidDeployKeyRequest(
                "a deploy key takes exactly one permission: contents:read or contents:write".into(),
            ));
        };
        let permission: Permission = raw_perm
            .parse()
            .map_err(|e| IssueError::UnknownPermission(format!("{e}")))?;
        if permission.name() != "contents" || permission.level() == Level::Admin {
            return Err(IssueError::InvalidDeployKeyRequest(format!(
                "a deploy key is contents:read or contents:write, not {permission}"
            )));
        }
        let max = self.inner.max_ttl;
        let ttl = match &r.ttl {
            None => self.inner.default_ttl,
            Some(raw) => {
                let ttl: Ttl = raw
                    .parse()
                    .map_err(|e| IssueError::InvalidTtl(format!("{e}")))?;
                if ttl.as_duration() > max {
                    return Err(IssueError::TtlTooLong(format!(
                        "ttl {ttl} is longer than the {} a deploy key may live on this broker \
                         ([limits] max_deploy_key_ttl)",
                        Ttl::from_secs(max.as_secs())
                    )));
                }
                if ttl.as_duration().is_zero() {
                    return Err(IssueError::InvalidTtl(
                        "a deploy key's ttl must be positive".into(),
                    ));
                }
                ttl.as_duration()
            }
        };
        let reason = validate_reason(r.reason.as_deref())?;
        Ok(DeployKeyAsk {
            repository,
            permission,
            ttl,
            reason,
        })
    }

    fn subject(&self, ask: &DeployKeyAsk) -> Subject {
        Subject {
            resource: Resource::DeployKey {
                repository: ask.repository.clone(),
                permission: ask.permission.clone(),
            },
            min_ttl: ask.ttl,
            reason: ask.reason.clone(),
            workspace: None,
        }
    }

    fn ask_for(&self, subject: Subject) -> Result<DeployKeyAsk, IssueError> {
        match subject.resource {
            Resource::DeployKey {
                repository,
                permission,
            } => Ok(DeployKeyAsk {
                repository,
                permission,
                ttl: subject.min_ttl.min(self.inner.max_ttl),
                reason: subject.reason,
            }),
            _ => Err(IssueError::Internal(
                "another kind's approval reached the deploy-key provider".into(),
            )),
        }
    }

    fn describe(&self, ask: &DeployKeyAsk, e: &mut AuditEvent) {
        e.kind = Some(CredentialKind::DeployKey.as_str().to_string());
        e.repo = Some(ask.repository.to_string());
        e.repositories = vec![ask.repository.to_string()];
        e.permissions = vec![ask.permission.to_string()];
    }

    fn recheck_wants_approval(&self) -> bool {
        // Nothing is minted before the recheck that runs ahead of the admin token's mint, so
        // a policy that now wants a human sends the request to one.
        true
    }

    async fn mint(
        &self,
        mut m: Mint<'_, DeployKeyAsk>,
    ) -> Result<Minted<DeployKeyCredential>, IssueError> {
        let ask = m.ask;
        let repo = &ask.repository;
        // The recheck runs before the admin token's mint: nothing is created for a request
        // the policy in force refuses.
        let mut token: Secret = match self.admin_token(repo, None, m.recheck).await? {
            Checked::Issued(i) => i.token.token,
            Checked::Refused { refusal, .. } => {
                return Ok(Minted::Refused {
                    decision: refusal,
                    before_recorded: false,
                });
            }
        };
        let mut key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519)
            .map_err(|e| IssueError::Internal(format!("generating an ed25519 key: {e}")))?;
        let now = self.inner.clock.now();
        let expires_at = now
            + time::Duration::try_from(ask.ttl)
                .map_err(|e| IssueError::Internal(format!("ttl: {e}")))?;
        // The comment names the key without the bot's text (which could hold anything).
        let bare_public = key
            .public_key()
            .to_openssh()
            .map_err(|e| IssueError::Internal(format!("encoding the public key: {e}")))?;
        let credential_id = credential_id_for(&bare_public);
        key.set_comment(format!("botcreds {credential_id}"));
        let public_key = key
            .public_key()
            .to_openssh()
            .map_err(|e| IssueError::Internal(format!("encoding the public key: {e}")))?;
        // Zeroizing<String>: wiped when dropped, after the answer is built.
        let private_key = key
            .to_openssh(LineEnding::LF)
            .map_err(|e| IssueError::Internal(format!("encoding the private key: {e}")))?;
        drop(key);
        let title = format!("botcreds {} {credential_id}", m.bot.unwrap_or("-"));
        let github = self.inner.issuer.github();
        let key_id = match github
            .add_deploy_key(&token, repo, &title, &public_key, ask.read_only())
            .await
        {
            // The cached token died at GitHub (revoked there): once more with a new one.
            Err(GithubError::AuthFailed { .. }) => {
                let dead = crate::grants::credential_id_for(&token);
                token = match self.admin_token(repo, Some(&dead), m.recheck).await? {
                    Checked::Issued(i) => i.token.token,
                    Checked::Refused { refusal, .. } => {
                        return Ok(Minted::Refused {
                            decision: refusal,
                            before_recorded: false,
                        });
                    }
                };
                github
                    .add_deploy_key(&token, repo, &title, &public_key, ask.read_only())
                    .await
            }
            other => other,
        }
        .map_err(|e| IssueError::Token(e.into()))?;
        let scheduled = Scheduled {
            credential_id: credential_id.clone(),
            key_id,
            repository: repo.to_string(),
            permission: Some(ask.permission.to_string()),
            expires_at: rfc3339(expires_at),
            bot: m.bot.map(str::to_string),
            attempts: 0,
            retry_at: None,
        };
        // The deletion is on disk before anyone holds the key.
        if let Err(e) = self.put(&scheduled) {
            if let Err(del) = self
                .inner
                .issuer
                .github()
                .delete_deploy_key(&token, repo, key_id)
                .await
            {
                tracing::error!(credential_id, key_id, repo = %repo, error = %del, "a deploy key whose deletion could not be scheduled was not deleted at GitHub; delete it by hand");
            }
            return Err(e);
        }
        self.inner.wake.notify_one();

        let mut done = credential_issued(
            rfc3339_millis(self.inner.clock.now()),
            m.caller.describe(),
            m.approval,
            credential_id.clone(),
            scheduled.expires_at.clone(),
        );
        self.describe(ask, &mut done);
        done.bot = m.bot.map(str::to_string);
        done.client_ip = Some(m.caller.address.ip().to_string());
        done.reason = ask.reason.clone();
        done.rule = Some(m.rule.to_string());
        done.detail = Some(format!(
            "deploy key {key_id} ({})",
            if ask.read_only() {
                "read-only"
            } else {
                "read-write"
            }
        ));
        let mut events = std::mem::take(&mut m.before);
        events.push(done);
        if let Err(e) = self.inner.audit.record(events).await {
            // No durable record, no key.
            self.withdraw(&scheduled, repo).await;
            return Err(IssueError::Audit(e.to_string()));
        }
        // Deny wins right up to the answer.
        if let Some(decision) = (m.recheck)() {
            let error = self.withdraw(&scheduled, repo).await;
            let mut e = self.event(AuditEventKind::CredentialRevoked, &scheduled);
            e.reason = Some("the policy no longer allows the request it was created for".into());
            e.detail = Some(match error {
                None => format!("deploy key {key_id} deleted at GitHub before the answer"),
                Some(err) => format!(
                    "deploy key {key_id} withheld; GitHub did not confirm the deletion yet (the \
                     reaper retries): {err}"
                ),
            });
            if let Err(err) = self.inner.audit.record(vec![e]).await {
                tracing::error!(error = %err, "audit log write failed for a withdrawn deploy key");
            }
            return Ok(Minted::Refused {
                decision,
                before_recorded: true,
            });
        }
        let answer = self.answer(&m, &scheduled, &private_key, &public_key);
        tracing::info!(
            bot = m.bot.unwrap_or("-"),
            credential_id = %credential_id,
            key_id,
            repo = %repo,
            read_only = ask.read_only(),
            approval = m.approval.as_str(),
            request_id = m.approval.request_id().unwrap_or("-"),
            expires_at = %answer.expires_at,
            "deploy key issued"
        );
        Ok(Minted::Issued(answer))
    }

    fn credential_id(answer: &DeployKeyCredential) -> &str {
        &answer.credential_id
    }
}

impl From<DeployKeyCredential> for Credential {
    fn from(c: DeployKeyCredential) -> Credential {
        Credential::DeployKey(c)
    }
}

/// `botcreds_deploy_key_overdue` (keys past their expiry that could not be deleted at GitHub)
/// and `botcreds_deploy_keys_scheduled` (keys the broker will delete), read at scrape time.
pub struct DeployKeyMetrics(DeployKeys);

impl std::fmt::Debug for DeployKeyMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeployKeyMetrics")
    }
}

impl Collector for DeployKeyMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauges = [
            (
                "botcreds_deploy_key_overdue",
                "Deploy keys past their expiry that the broker could not delete at GitHub yet",
                i64::try_from(self.0.overdue()).unwrap_or(i64::MAX),
            ),
            (
                "botcreds_deploy_keys_scheduled",
                "Deploy keys at GitHub whose deletion the broker has scheduled",
                i64::try_from(self.0.scheduled().len()).unwrap_or(i64::MAX),
            ),
        ];
        for (name, help, value) in gauges {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}
