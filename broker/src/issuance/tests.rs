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
    deploy_keys: DeployKeys,
    /// The simulated GitHub and the movable clock, when the world was built over them.
    sim: Option<(Arc<SimulatedGithub>, OffsetClock)>,
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
        let offset = OffsetClock::default();
        let clock: SharedClock = Arc::new(offset.clone());
        let sim = Arc::new(SimulatedGithub::new(clock.clone()));
        let mut w = World::with_edges(
            policy,
            clock.clone(),
            sim.clone(),
            Arc::new(SimulatedLitellm::new(clock)),
        );
        w.sim = Some((sim, offset));
        w
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
                store.clone(),
                audit.clone(),
                clock.clone(),
                issuer.clone(),
                ApprovalsConfig::default(),
            )
            .unwrap(),
        );
        let metrics = Metrics::new(issuer.clone());
        let deploy_keys = DeployKeys::new(
            issuer.clone(),
            audit.clone(),
            clock.clone(),
            store.clone(),
            Duration::from_secs(24 * 3600),
        );
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
            deploy_keys: deploy_keys.clone(),
            litellm: Some(LitellmKeys::new(keys)),
            request_timeout: Duration::from_secs(30),
        }));
        World {
            issuance,
            deploy_keys,
            sim: None,
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
    async fn add_deploy_key(
        &self,
        token: &Secret,
        repo: &botcreds_proto::RepoName,
        title: &str,
        public_key: &str,
        read_only: bool,
    ) -> Result<u64, GithubError> {
        self.inner
            .add_deploy_key(token, repo, title, public_key, read_only)
            .await
    }
    async fn delete_deploy_key(
        &self,
        token: &Secret,
        repo: &botcreds_proto::RepoName,
        key_id: u64,
    ) -> Result<(), GithubError> {
        self.inner.delete_deploy_key(token, repo, key_id).await
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

// ---------------------------------------------------------------------------------------------
// Deploy keys

const DEPLOY_KEY_POLICY: &str = r#"
bots:
  ci:
    identity: { type: api_key }
    auto_approve:
      - repo: "acme/*"
        permissions: [contents:write]
      - kind: deploy_key
        repo: "acme/web"
        permissions: [contents:read]
    requires_approval:
      - kind: deploy_key
        repo: "acme/ask"
    deny:
      - repo: "acme/infra"
defaults:
  requires_approval: false
"#;

fn deploy_key(repo: &str, perm: &str, ttl: Option<&str>) -> CredentialRequest {
    CredentialRequest {
        kind: Some(CredentialKind::DeployKey),
        repositories: vec![repo.to_string()],
        permissions: vec![perm.to_string()],
        ttl: ttl.map(str::to_string),
        reason: Some("deploy".into()),
        ..Default::default()
    }
}

fn key_of(c: Credential) -> botcreds_proto::DeployKeyCredential {
    match c {
        Credential::DeployKey(k) => k,
        other => panic!("not a deploy key: {}", other.credential_id()),
    }
}

#[tokio::test]
async fn deploy_key_is_generated_registered_scheduled_and_audited() {
    let w = World::with_policy(DEPLOY_KEY_POLICY);
    let (sim, _) = w.sim.clone().unwrap();
    let k = key_of(issued(
        w.issuance
            .request(
                &caller("ci"),
                deploy_key("acme/web", "contents:read", Some("2h")),
                Wait::default(),
            )
            .await
            .unwrap(),
    ));
    assert!(k.read_only);
    assert_eq!(k.repository, "acme/web");
    assert_eq!(k.git.ssh_url, "git@github.com:acme/web.git");
    assert!(
        k.git
            .ssh_command
            .contains("-o IdentitiesOnly=yes -o StrictHostKeyChecking=yes"),
        "{}",
        k.git.ssh_command
    );
    assert!(k.credential_id.starts_with("dk_"));
    // A real OpenSSH ed25519 key whose public half is the one registered.
    let private = ssh_key::PrivateKey::from_openssh(&k.private_key).unwrap();
    assert_eq!(private.algorithm(), ssh_key::Algorithm::Ed25519);
    assert_eq!(
        private.public_key().key_data(),
        ssh_key::PublicKey::from_openssh(&k.public_key)
            .unwrap()
            .key_data()
    );
    assert_eq!(sim.deploy_keys(), vec![(k.key_id, "acme/web".to_string())]);
    assert_eq!(w.deploy_keys.scheduled_count(), 1);

    let done = w.last(AuditEventKind::CredentialIssued);
    assert_eq!(done.kind.as_deref(), Some("deploy_key"));
    assert_eq!(done.token_id.as_deref(), Some(k.credential_id.as_str()));
    assert_eq!(done.repo.as_deref(), Some("acme/web"));
    assert_eq!(done.permissions, vec!["contents:read".to_string()]);
    assert_eq!(done.approval.as_deref(), Some("auto"));
    // The private key is nowhere in the audit log nor in Debug output.
    let log = serde_json::to_string(&w.events()).unwrap();
    let debug = format!("{k:?}");
    for line in k.private_key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!log.contains(line));
        assert!(!debug.contains(line));
    }
}

#[tokio::test]
async fn deploy_key_requests_are_checked_and_need_a_deploy_key_rule() {
    let w = World::with_policy(DEPLOY_KEY_POLICY);
    let ci = caller("ci");
    let cases = [
        (
            CredentialRequest {
                repositories: vec!["acme/web".into(), "acme/api".into()],
                ..deploy_key("acme/web", "contents:read", None)
            },
            ErrorCode::InvalidDeployKeyRequest,
        ),
        (
            deploy_key("acme/web", "issues:write", None),
            ErrorCode::InvalidDeployKeyRequest,
        ),
        (
            CredentialRequest {
                permissions: vec!["contents:read".into(), "contents:write".into()],
                ..deploy_key("acme/web", "contents:read", None)
            },
            ErrorCode::InvalidDeployKeyRequest,
        ),
        (
            deploy_key("acme/web", "contents:read", Some("25h")),
            ErrorCode::TtlTooLong,
        ),
        (
            deploy_key("not a repo", "contents:read", None),
            ErrorCode::InvalidRepository,
        ),
        // A contents:write token rule allows tokens, not deploy keys.
        (
            deploy_key("acme/api", "contents:write", None),
            ErrorCode::PolicyDenied,
        ),
        // The deploy_key rule names contents:read only.
        (
            deploy_key("acme/web", "contents:write", None),
            ErrorCode::PolicyDenied,
        ),
        // Deny (no kind) wins for keys too.
        (
            deploy_key("acme/infra", "contents:read", None),
            ErrorCode::PolicyDenied,
        ),
        (
            CredentialRequest {
                kind: Some(CredentialKind::SshDeployKey),
                ..deploy_key("acme/web", "contents:read", None)
            },
            ErrorCode::InvalidKind,
        ),
    ];
    for (request, code) in cases {
        let e = w
            .issuance
            .request(&ci, request.clone(), Wait::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{request:?}: {e}");
    }
    assert_eq!(w.deploy_keys.scheduled_count(), 0);
    assert!(w.sim.as_ref().unwrap().0.deploy_keys().is_empty());
    // The token the same bot may have is still a token.
    let c = issued(
        w.issuance
            .request(
                &ci,
                github(&["acme/api"], &["contents:write"]),
                Wait::default(),
            )
            .await
            .unwrap(),
    );
    assert!(matches!(c, Credential::Github(_)));
}

#[tokio::test]
async fn deploy_key_approval_then_poll_and_the_grant_cover_keys() {
    let w = World::with_policy(DEPLOY_KEY_POLICY);
    let ci = caller("ci");
    let view = pending(
        w.issuance
            .request(
                &ci,
                deploy_key("acme/ask", "contents:write", Some("30m")),
                Wait::default(),
            )
            .await
            .unwrap(),
    );
    assert_eq!(
        view.resource,
        botcreds_proto::ApprovalResource::DeployKey {
            repository: "acme/ask".into(),
            permission: "contents:write".into(),
        }
    );
    w.approvals
        .approve(&Approver::new("ops", "ops"), &view.request_id, false)
        .await
        .unwrap();
    let k = key_of(issued(
        w.issuance
            .poll(&ci, &view.request_id, Wait::new(Some("5s".into())))
            .await
            .unwrap(),
    ));
    assert!(!k.read_only);
    assert_eq!(k.approval, "manual");
    assert_eq!(
        w.approvals.get(&view.request_id).unwrap().state,
        ApprovalState::Issued
    );
    // The grant covers the next identical request: a new key, no new approval.
    let again = key_of(issued(
        w.issuance
            .request(
                &ci,
                deploy_key("acme/ask", "contents:read", Some("30m")),
                Wait::default(),
            )
            .await
            .unwrap(),
    ));
    assert_eq!(again.approval, "grant");
    assert_ne!(again.key_id, k.key_id);
    assert_eq!(w.deploy_keys.scheduled_count(), 2);
}

#[tokio::test]
async fn the_reaper_deletes_keys_at_expiry_and_audits_it() {
    let w = World::with_policy(DEPLOY_KEY_POLICY);
    let (sim, clock) = w.sim.clone().unwrap();
    let k = key_of(issued(
        w.issuance
            .request(
                &caller("ci"),
                deploy_key("acme/web", "contents:read", Some("10m")),
                Wait::default(),
            )
            .await
            .unwrap(),
    ));
    // Not due yet: nothing happens.
    assert_eq!(
        w.deploy_keys.reap_once().await,
        deploy_key::ReapReport::default()
    );
    assert_eq!(sim.deploy_keys().len(), 1);
    clock.advance(601);
    let report = w.deploy_keys.reap_once().await;
    assert_eq!(report.deleted, 1);
    assert_eq!(report.overdue, 0);
    assert!(sim.deploy_keys().is_empty());
    assert_eq!(w.deploy_keys.scheduled_count(), 0);
    let expired = w.last(AuditEventKind::CredentialExpired);
    assert_eq!(expired.kind.as_deref(), Some("deploy_key"));
    assert_eq!(expired.token_id.as_deref(), Some(k.credential_id.as_str()));
    // Idempotent: a second pass finds nothing to do.
    assert_eq!(
        w.deploy_keys.reap_once().await,
        deploy_key::ReapReport::default()
    );
}

#[tokio::test]
async fn a_deploy_key_the_policy_refuses_before_the_answer_is_deleted() {
    let w = World::with_policy(DEPLOY_KEY_POLICY);
    let (sim, _) = w.sim.clone().unwrap();
    let ci = caller("ci");
    let ask = deploy_key("acme/web", "contents:read", None);
    let validated = w.deploy_keys.validate(&ask).unwrap();
    // The policy turns to deny once the key exists at GitHub, before the answer.
    let recheck = || {
        (!sim.deploy_keys().is_empty()).then(|| {
            w.policy
                .current()
                .decide_for_bot(Some("ci"), &crate::policy::Request::Litellm { scope: "x" })
        })
    };
    let minted = w
        .deploy_keys
        .mint(Mint {
            caller: &ci,
            bot: Some("ci"),
            rule: "test",
            approval: &Approval::Auto,
            ask: &validated,
            replaces: None,
            before: Vec::new(),
            recheck: &recheck,
        })
        .await
        .unwrap();
    assert!(matches!(
        minted,
        Minted::Refused {
            before_recorded: true,
            ..
        }
    ));
    assert!(sim.deploy_keys().is_empty(), "the withheld key is deleted");
    assert_eq!(w.deploy_keys.scheduled_count(), 0);
    assert_eq!(
        w.last(AuditEventKind::CredentialRevoked).kind.as_deref(),
        Some("deploy_key")
    );
}

#[tokio::test]
async fn revoking_deploy_keys_deletes_them_at_github_by_id_bot_or_repo() {
    use super::deploy_key::RevokeKeys;
    let w = World::with_policy(DEPLOY_KEY_POLICY);
    let (sim, _) = w.sim.clone().unwrap();
    let ci = caller("ci");
    let mut keys = Vec::new();
    for _ in 0..3 {
        keys.push(key_of(issued(
            w.issuance
                .request(
                    &ci,
                    deploy_key("acme/web", "contents:read", None),
                    Wait::default(),
                )
                .await
                .unwrap(),
        )));
    }
    let unknown = w
        .deploy_keys
        .revoke(
            "admin",
            RevokeKeys::Credential("dk_000000000000000000000000"),
        )
        .await;
    assert!(unknown.is_empty());
    assert_eq!(sim.deploy_keys().len(), 3, "an unknown id deletes nothing");

    let one = w
        .deploy_keys
        .revoke("admin", RevokeKeys::Credential(&keys[0].credential_id))
        .await;
    assert_eq!(one.len(), 1);
    assert!(one[0].credential.revoked_upstream);
    assert_eq!(sim.deploy_keys().len(), 2);
    let revoked = w.last(AuditEventKind::CredentialRevoked);
    assert_eq!(
        revoked.token_id.as_deref(),
        Some(keys[0].credential_id.as_str())
    );
    assert_eq!(revoked.kind.as_deref(), Some("deploy_key"));
    assert_eq!(revoked.caller.as_deref(), Some("admin"));

    let other = w
        .deploy_keys
        .revoke("admin", RevokeKeys::Bot("someone-else"))
        .await;
    assert!(other.is_empty());
    let repo: botcreds_proto::RepoName = "acme/web".parse().unwrap();
    let by_repo = w.deploy_keys.revoke("admin", RevokeKeys::Repo(&repo)).await;
    assert_eq!(by_repo.len(), 2);
    assert!(sim.deploy_keys().is_empty());
    assert_eq!(
        w.deploy_keys.scheduled_count(),
        0,
        "nothing left for the reaper"
    );
}

#[tokio::test]
async fn a_reloaded_policy_that_denies_a_deploy_key_deletes_it() {
    let w = World::with_policy(DEPLOY_KEY_POLICY);
    let (sim, _) = w.sim.clone().unwrap();
    let k = key_of(issued(
        w.issuance
            .request(
                &caller("ci"),
                deploy_key("acme/web", "contents:read", None),
                Wait::default(),
            )
            .await
            .unwrap(),
    ));
    // Still allowed: nothing happens.
    assert!(
        w.deploy_keys
            .revoke_denied(&w.policy.current())
            .await
            .is_empty()
    );
    assert_eq!(sim.deploy_keys().len(), 1);
    w.reload(&DEPLOY_KEY_POLICY.replace("- repo: \"acme/infra\"", "- repo: \"acme/web\""));
    assert_eq!(
        w.deploy_keys.revoke_denied(&w.policy.current()).await,
        vec![k.credential_id.clone()]
    );
    assert!(sim.deploy_keys().is_empty());
    assert_eq!(
        w.last(AuditEventKind::CredentialRevoked).caller.as_deref(),
        Some("policy")
    );
}

#[tokio::test]
async fn a_broker_token_revoked_at_github_is_replaced_for_deploy_keys() {
    let w = World::with_policy(DEPLOY_KEY_POLICY);
    let (sim, clock) = w.sim.clone().unwrap();
    let ci = caller("ci");
    let ask = || deploy_key("acme/web", "contents:read", Some("10m"));
    issued(
        w.issuance
            .request(&ci, ask(), Wait::default())
            .await
            .unwrap(),
    );
    // Someone revokes the broker's cached administration:write token at GitHub.
    sim.revoke_all();
    issued(
        w.issuance
            .request(&ci, ask(), Wait::default())
            .await
            .unwrap(),
    );
    assert_eq!(sim.deploy_keys().len(), 2);
    sim.revoke_all();
    clock.advance(601);
    assert_eq!(w.deploy_keys.reap_once().await.deleted, 2);
    assert!(sim.deploy_keys().is_empty());
}
