//! Unit tests of the issuance service over simulated GitHub and LiteLLM: every path (auto,
//! approval and poll, grant), the audit events each writes, and the rules all paths share
//! (deny wins, one refusal detail rule).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use botcreds_proto::approval::ApprovalState;
use botcreds_proto::audit::{AuditEvent, AuditEventKind};
use botcreds_proto::{CredentialKind, CredentialRequest, ErrorCode};

use super::*;
use crate::approvals::{ApprovalsConfig, Approver};
use crate::clock::OffsetClock;
use crate::grants::TokenIssuer;
use crate::identity::CallerVia;
use crate::keys::KeyService;
use crate::keys::scopes::ScopeTable;
use crate::providers::github::{GithubApi, GithubError, InstallationToken, SimulatedGithub};
use crate::providers::litellm::{
    GenerateKey, GeneratedKey, KeyInfo, LitellmApi, LitellmError, LitellmStats, SimulatedLitellm,
};
use crate::secret::Secret;
use crate::store::{AuditFilter, MemoryStore, Store};

const POLICY: &str = r#"
bots:
  ci:
    identity: { type: api_key }
    auto_approve:
      - repo: "acme/*"
        permissions: [contents:read]
      - litellm_scope: "agent:review"
    requires_approval:
      - repo: "acme/*"
        permissions: [contents:write]
      - litellm_scope: "agent:write"
    deny:
      - repo: "acme/infra"
"#;

struct World {
    issuance: Arc<Issuance>,
    approvals: Arc<Approvals>,
    audit: AuditLog,
    policy: Arc<PolicyHandle>,
    policy_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl World {
    fn new() -> World {
        World::with_policy(POLICY)
    }

    fn with_policy(policy: &str) -> World {
        let clock: SharedClock = Arc::new(OffsetClock::default());
        World::with_edges(
            policy,
            clock.clone(),
            Arc::new(SimulatedGithub::new(clock.clone())),
            Arc::new(SimulatedLitellm::new(clock)),
        )
    }

    fn with_edges(
        policy: &str,
        clock: SharedClock,
        github: Arc<dyn GithubApi>,
        litellm: Arc<dyn LitellmApi>,
    ) -> World {
        let dir = tempfile::tempdir().unwrap();
        let policy_path = dir.path().join("policy.yaml");
        std::fs::write(&policy_path, policy).unwrap();
        let policy = Arc::new(PolicyHandle::load(&policy_path).unwrap());
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let audit = AuditLog::start(store.clone());
        let issuer = Arc::new(TokenIssuer::new(github, clock.clone()));
        let keys = Arc::new(KeyService::new(
            litellm,
            store.clone(),
            audit.clone(),
            clock.clone(),
            ScopeTable::default(),
            None,
            Duration::from_secs(60),
        ));
        let approvals = Arc::new(
            Approvals::load(
                store,
                audit.clone(),
                clock.clone(),
                issuer.clone(),
                ApprovalsConfig::default(),
            )
            .unwrap(),
        );
        let metrics = Metrics::new(issuer.clone());
        let issuance = Arc::new(Issuance::new(IssuanceParts {
            policy: policy.clone(),
            approvals: approvals.clone(),
            audit: audit.clone(),
            metrics: metrics.clone(),
            clock: clock.clone(),
            github: GithubTokens::new(
                issuer,
                audit.clone(),
                clock.clone(),
                metrics,
                Duration::from_secs(3600),
                Duration::from_secs(600),
            ),
            litellm: Some(LitellmKeys::new(keys)),
            request_timeout: Duration::from_secs(30),
        }));
        World {
            issuance,
            approvals,
            audit,
            policy,
            policy_path,
            _dir: dir,
        }
    }

    /// Swap in a new policy, as a reload does.
    fn reload(&self, policy: &str) {
        std::fs::write(&self.policy_path, policy).unwrap();
        self.policy.reload(true).unwrap();
    }

    fn events(&self) -> Vec<AuditEvent> {
        self.audit
            .read(&AuditFilter {
                limit: 1000,
                ..Default::default()
            })
            .unwrap()
    }

    fn kinds(&self) -> Vec<AuditEventKind> {
        self.events().into_iter().map(|e| e.event).collect()
    }

    fn last(&self, kind: AuditEventKind) -> AuditEvent {
        self.events()
            .into_iter()
            .rev()
            .find(|e| e.event == kind)
            .unwrap_or_else(|| panic!("no {kind:?} event"))
    }
}

fn caller(bot: &str) -> Caller {
    Caller {
        address: "100.64.0.7:41000".parse().unwrap(),
        via: CallerVia::ApiKey { bot: bot.into() },
    }
}

fn github(repos: &[&str], perms: &[&str]) -> CredentialRequest {
    CredentialRequest {
        kind: Some(CredentialKind::GithubToken),
        repositories: repos.iter().map(|s| s.to_string()).collect(),
        permissions: perms.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn litellm(scope: &str) -> CredentialRequest {
    CredentialRequest {
        kind: Some(CredentialKind::LitellmKey),
        scope: Some(scope.into()),
        ..Default::default()
    }
}

fn issued(answer: Answer) -> Credential {
    match answer {
        Answer::Issued(c) => c,
        Answer::Pending(v) => panic!("pending: {}", v.request_id),
    }
}

fn pending(answer: Answer) -> ApprovalRequestView {
    match answer {
        Answer::Pending(v) => v,
        Answer::Issued(c) => panic!("issued {}", c.credential_id()),
    }
}

#[tokio::test]
async fn github_auto_is_requested_then_issued_in_one_flush() {
    let w = World::new();
    let c = issued(
        w.issuance
            .request(
                &caller("ci"),
                github(&["acme/web"], &["contents:read"]),
                Wait::default(),
            )
            .await
            .unwrap(),
    );
    let Credential::Github(token) = &c else {
        panic!("not a token")
    };
    assert_eq!(token.approval, "auto");
    assert_eq!(token.bot, "ci");
    assert_eq!(
        w.kinds(),
        vec![
            AuditEventKind::CredentialRequested,
            AuditEventKind::CredentialIssued
        ]
    );
    let done = w.last(AuditEventKind::CredentialIssued);
    assert_eq!(done.approval.as_deref(), Some("auto"));
    assert_eq!(done.request_id, None);
    assert_eq!(done.token_id.as_deref(), Some(token.credential_id.as_str()));
    assert_eq!(done.repo.as_deref(), Some("acme/web"));
    assert_eq!(done.rule.as_deref(), Some("bots.ci.auto_approve[0]"));
    assert_eq!(done.caller.as_deref(), Some("api_key:ci"));
}

#[tokio::test]
async fn litellm_auto_is_requested_then_issued_through_the_key_service() {
    let w = World::new();
    let c = issued(
        w.issuance
            .request(&caller("ci"), litellm("agent:review"), Wait::default())
            .await
            .unwrap(),
    );
    let Credential::Litellm(key) = &c else {
        panic!("not a key")
    };
    assert_eq!(key.scope, "agent:review");
    assert_eq!(
        w.kinds(),
        vec![
            AuditEventKind::CredentialRequested,
            AuditEventKind::CredentialIssued
        ]
    );
    let requested = w.last(AuditEventKind::CredentialRequested);
    assert_eq!(
        requested.detail.as_deref(),
        Some("litellm_key scope agent:review")
    );
    let done = w.last(AuditEventKind::CredentialIssued);
    assert_eq!(done.approval.as_deref(), Some("auto"));
    assert_eq!(done.token_id.as_deref(), Some(key.credential_id.as_str()));
}

#[tokio::test]
async fn bad_input_is_refused_with_its_code_and_audited() {
    let w = World::new();
    let cases = [
        (github(&[], &["contents:read"]), ErrorCode::NoRepositories),
        (github(&["acme/web"], &[]), ErrorCode::EmptyPermissions),
        (
            github(&["nope"], &["contents:read"]),
            ErrorCode::InvalidRepository,
        ),
        (
            github(&["acme/web", "other/web"], &["contents:read"]),
            ErrorCode::ReposAcrossOwners,
        ),
        (
            github(&["acme/web"], &["contents:rule"]),
            ErrorCode::UnknownPermission,
        ),
        (litellm("nonsense"), ErrorCode::InvalidScope),
        (CredentialRequest::default(), ErrorCode::InvalidKind),
    ];
    for (request, code) in cases {
        let e = w
            .issuance
            .request(&caller("ci"), request, Wait::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{e}");
        let denied = w.last(AuditEventKind::CredentialDenied);
        assert_eq!(denied.code.as_deref(), Some(code.as_str()));
    }
    assert!(
        !w.kinds().contains(&AuditEventKind::CredentialIssued),
        "bad input issued something"
    );
}

/// A deny whose explanation is long: a repository name of 100 characters, named twice.
fn long_deny_policy(repo: &str) -> String {
    format!(
        "bots:\n  ci:\n    identity: {{ type: api_key }}\n    deny:\n      - repo: \"{repo}\"\n        permissions: [contents:read]\n"
    )
}

#[tokio::test]
async fn every_refusal_detail_is_cut_to_one_length() {
    let repo = format!("acme/{}", "r".repeat(100));
    let w = World::with_policy(&long_deny_policy(&repo));
    let e = w
        .issuance
        .request(
            &caller("ci"),
            github(&[&repo], &["contents:read"]),
            Wait::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::PolicyDenied);
    // The client gets the whole explanation; the audit log a bounded detail.
    let message = e.message();
    assert!(message.chars().count() > events::MAX_DENIAL_DETAIL_CHARS);
    let denied = w.last(AuditEventKind::CredentialDenied);
    let detail = denied.detail.unwrap();
    assert_eq!(detail.chars().count(), events::MAX_DENIAL_DETAIL_CHARS);
    assert!(message.starts_with(&detail));
    assert_eq!(denied.rule.as_deref(), Some("bots.ci.deny[0]"));
}

#[tokio::test]
async fn approval_then_poll_answers_the_token_once_approved() {
    let w = World::new();
    let ci = caller("ci");
    let view = pending(
        w.issuance
            .request(
                &ci,
                github(&["acme/web"], &["contents:write"]),
                Wait::default(),
            )
            .await
            .unwrap(),
    );
    assert_eq!(view.state, ApprovalState::Pending);
    // Still pending: the poll answers the request.
    let again = pending(
        w.issuance
            .poll(&ci, &view.request_id, Wait::default())
            .await
            .unwrap(),
    );
    assert_eq!(again.request_id, view.request_id);

    w.approvals
        .approve(&Approver::new("ops", "ops"), &view.request_id, false)
        .await
        .unwrap();
    let c = issued(
        w.issuance
            .poll(&ci, &view.request_id, Wait::new(Some("5s".into())))
            .await
            .unwrap(),
    );
    let Credential::Github(token) = &c else {
        panic!("not a token")
    };
    assert_eq!(token.approval, "manual");
    let done = w.last(AuditEventKind::CredentialIssued);
    assert_eq!(done.approval.as_deref(), Some("manual"));
    assert_eq!(done.request_id.as_deref(), Some(view.request_id.as_str()));
    assert_eq!(
        w.approvals.get(&view.request_id).unwrap().state,
        ApprovalState::Issued
    );

    // The grant the approval made covers the same request: no second approval.
    let c = issued(
        w.issuance
            .request(
                &ci,
                github(&["acme/web"], &["contents:write"]),
                Wait::default(),
            )
            .await
            .unwrap(),
    );
    let Credential::Github(token) = &c else {
        panic!("not a token")
    };
    assert_eq!(token.approval, "grant");
    let done = w.last(AuditEventKind::CredentialIssued);
    assert_eq!(done.approval.as_deref(), Some("grant"));
    assert_eq!(done.request_id.as_deref(), Some(view.request_id.as_str()));
    assert!(done.rule.as_deref().unwrap().starts_with("grant "));
}

#[tokio::test]
async fn a_deny_added_after_the_approval_wins_on_the_poll() {
    let w = World::new();
    let ci = caller("ci");
    let view = pending(
        w.issuance
            .request(&ci, litellm("agent:write"), Wait::default())
            .await
            .unwrap(),
    );
    w.approvals
        .approve(&Approver::new("ops", "ops"), &view.request_id, false)
        .await
        .unwrap();
    w.reload(&format!("{POLICY}      - litellm_scope: \"agent:*\"\n"));
    let e = w
        .issuance
        .poll(&ci, &view.request_id, Wait::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::PolicyDenied);
    assert_eq!(e.rule(), Some("bots.ci.deny[1]"));
    let denied = w.last(AuditEventKind::CredentialDenied);
    assert_eq!(denied.approval.as_deref(), Some("manual"));
    assert_eq!(denied.request_id.as_deref(), Some(view.request_id.as_str()));
    assert_eq!(denied.rule.as_deref(), Some("bots.ci.deny[1]"));
    assert!(!w.kinds().contains(&AuditEventKind::CredentialIssued));
}

#[tokio::test]
async fn a_bad_wait_is_refused_only_when_a_human_is_needed() {
    let w = World::new();
    let ci = caller("ci");
    // Allowed outright: the wait is never read.
    w.issuance
        .request(
            &ci,
            github(&["acme/web"], &["contents:read"]),
            Wait::new(Some("soon".into())),
        )
        .await
        .unwrap();
    let e = w
        .issuance
        .request(
            &ci,
            github(&["acme/web"], &["contents:write"]),
            Wait::new(Some("soon".into())),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidWait);
    let denied = w.last(AuditEventKind::CredentialDenied);
    assert_eq!(denied.code.as_deref(), Some("invalid_wait"));
    assert!(w.approvals.pending().unwrap().is_empty());
}

#[test]
fn approval_words_and_outcome_labels_come_from_one_place() {
    assert_eq!(Approval::Auto.as_str(), "auto");
    let grant = Approval::Grant {
        request_id: "apr_x".into(),
    };
    assert_eq!(
        (grant.as_str(), grant.request_id()),
        ("grant", Some("apr_x"))
    );
    let manual = Approval::Manual {
        request_id: "apr_y".into(),
    };
    assert_eq!(manual.as_str(), "manual");
    assert_eq!(events::outcome_label(Outcome::Allow), "allow");
    assert_eq!(events::outcome_label(Outcome::RequireApproval), "approval");
    assert_eq!(events::outcome_label(Outcome::Deny), "deny");
}

/// Holds each mint until the test opens the gate, and says when a mint is waiting there: the
/// test reloads the policy while a mint is in flight.
struct Gate {
    entered: tokio::sync::Notify,
    open: tokio::sync::watch::Sender<bool>,
}

impl Gate {
    fn new() -> Gate {
        Gate {
            entered: tokio::sync::Notify::new(),
            open: tokio::sync::watch::Sender::new(false),
        }
    }

    async fn pass(&self) {
        let mut open = self.open.subscribe();
        self.entered.notify_one();
        let _ = open.wait_for(|o| *o).await;
    }
}

struct GatedGithub {
    inner: SimulatedGithub,
    gate: Gate,
}

#[async_trait::async_trait]
impl GithubApi for GatedGithub {
    async fn create_installation_token(
        &self,
        owner: &str,
        repositories: &[botcreds_proto::RepoName],
        permissions: &[botcreds_proto::Permission],
    ) -> Result<InstallationToken, GithubError> {
        self.gate.pass().await;
        self.inner
            .create_installation_token(owner, repositories, permissions)
            .await
    }
    async fn revoke_installation_token(&self, token: &Secret) -> Result<(), GithubError> {
        self.inner.revoke_installation_token(token).await
    }
    async fn app_identity(&self) -> Result<crate::providers::github::AppIdentity, GithubError> {
        self.inner.app_identity().await
    }
    fn git_host(&self) -> &str {
        self.inner.git_host()
    }
    fn stats(&self) -> crate::providers::github::UpstreamStats {
        self.inner.stats()
    }
}

struct GatedLitellm {
    inner: SimulatedLitellm,
    gate: Gate,
}

#[async_trait::async_trait]
impl LitellmApi for GatedLitellm {
    async fn generate(&self, request: &GenerateKey) -> Result<GeneratedKey, LitellmError> {
        self.gate.pass().await;
        self.inner.generate(request).await
    }
    async fn delete(&self, token_hash: &str) -> Result<bool, LitellmError> {
        self.inner.delete(token_hash).await
    }
    async fn info(&self, token_hash: &str) -> Result<Option<KeyInfo>, LitellmError> {
        self.inner.info(token_hash).await
    }
    fn base_url(&self) -> &str {
        self.inner.base_url()
    }
    fn stats(&self) -> LitellmStats {
        self.inner.stats()
    }
}

/// POLICY with `contents:read` on acme needing a human instead of allowed outright.
const READ_NEEDS_APPROVAL: &str = r#"
bots:
  ci:
    identity: { type: api_key }
    auto_approve:
      - litellm_scope: "agent:review"
    requires_approval:
      - repo: "acme/*"
    deny:
      - litellm_scope: "agent:review"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_during_a_token_mint_withholds_it_and_asks_a_human() {
    let clock: SharedClock = Arc::new(OffsetClock::default());
    let gh = Arc::new(GatedGithub {
        inner: SimulatedGithub::new(clock.clone()),
        gate: Gate::new(),
    });
    let w = World::with_edges(
        POLICY,
        clock.clone(),
        gh.clone(),
        Arc::new(SimulatedLitellm::new(clock)),
    );
    let issuance = w.issuance.clone();
    let asked = tokio::spawn(async move {
        issuance
            .request(
                &caller("ci"),
                github(&["acme/web"], &["contents:read"]),
                Wait::default(),
            )
            .await
    });
    gh.gate.entered.notified().await;
    w.reload(READ_NEEDS_APPROVAL);
    gh.gate.open.send_replace(true);
    let view = pending(asked.await.unwrap().unwrap());
    assert_eq!(view.rule, "bots.ci.requires_approval[0]");
    // The token minted for the request is held by nobody: revoked, and said so first.
    assert_eq!(
        w.kinds(),
        vec![
            AuditEventKind::CredentialRevoked,
            AuditEventKind::CredentialRequested,
            AuditEventKind::ApprovalRequested
        ]
    );
    assert_eq!(gh.inner.stats().mints, 1);
    let revoked = w.last(AuditEventKind::CredentialRevoked);
    assert!(
        revoked
            .detail
            .unwrap()
            .contains("held by nobody; revoked at GitHub")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_added_during_a_key_mint_revokes_the_key() {
    let clock: SharedClock = Arc::new(OffsetClock::default());
    let ll = Arc::new(GatedLitellm {
        inner: SimulatedLitellm::new(clock.clone()),
        gate: Gate::new(),
    });
    let w = World::with_edges(
        POLICY,
        clock.clone(),
        Arc::new(SimulatedGithub::new(clock)),
        ll.clone(),
    );
    let issuance = w.issuance.clone();
    let asked = tokio::spawn(async move {
        issuance
            .request(&caller("ci"), litellm("agent:review"), Wait::default())
            .await
    });
    ll.gate.entered.notified().await;
    w.reload(READ_NEEDS_APPROVAL);
    ll.gate.open.send_replace(true);
    let e = asked.await.unwrap().unwrap_err();
    assert_eq!(e.code(), ErrorCode::PolicyDenied);
    assert_eq!(e.rule(), Some("bots.ci.deny[0]"));
    assert_eq!(ll.inner.live_keys(), 0);
    assert_eq!(
        w.kinds(),
        vec![
            AuditEventKind::CredentialRequested,
            AuditEventKind::CredentialIssued,
            AuditEventKind::CredentialRevoked,
            AuditEventKind::CredentialDenied
        ]
    );
    let denied = w.last(AuditEventKind::CredentialDenied);
    assert_eq!(denied.rule.as_deref(), Some("bots.ci.deny[0]"));
}
