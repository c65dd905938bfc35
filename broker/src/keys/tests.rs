//! Key service tests: a manual clock, the simulated LiteLLM (with a switch to make it fail) and
//! the in-memory store.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use botcreds_proto::ErrorCode;
use botcreds_proto::audit::AuditEventKind;
use botcreds_proto::litellm::{KeyStatus, WorkspaceInfo};

use super::record::NAMESPACE;
use super::scopes::ScopeTable;
use super::*;
use crate::audit::AuditLog;
use crate::clock::{OffsetClock, SharedClock};
use crate::providers::litellm::{
    GenerateKey, GeneratedKey, KeyInfo, LitellmApi, LitellmError, LitellmStats, SimulatedLitellm,
};
use crate::store::{AuditFilter, ChainReport, CredentialRecord, MemoryStore, Store, StoreError};

/// The simulated LiteLLM behind a switch that makes every call fail as "unreachable".
struct Switchable {
    inner: SimulatedLitellm,
    down: AtomicBool,
    /// Every `/key/generate` request, as the real client would send it.
    sent: std::sync::Mutex<Vec<GenerateKey>>,
}

impl Switchable {
    fn check(&self) -> Result<(), LitellmError> {
        if self.down.load(Ordering::SeqCst) {
            Err(LitellmError::Unavailable {
                message: "cannot connect".into(),
            })
        } else {
            Ok(())
        }
    }
}

#[async_trait::async_trait]
impl LitellmApi for Switchable {
    async fn generate(&self, r: &GenerateKey) -> Result<GeneratedKey, LitellmError> {
        self.sent.lock().unwrap().push(r.clone());
        self.check()?;
        self.inner.generate(r).await
    }
    async fn delete(&self, h: &str) -> Result<bool, LitellmError> {
        self.check()?;
        self.inner.delete(h).await
    }
    async fn info(&self, h: &str) -> Result<Option<KeyInfo>, LitellmError> {
        self.check()?;
        self.inner.info(h).await
    }
    fn base_url(&self) -> &str {
        "http://litellm.test"
    }
    fn stats(&self) -> LitellmStats {
        self.inner.stats()
    }
}

/// The in-memory store with switches that make key-record writes or audit appends fail.
#[derive(Default)]
struct FlakyStore {
    inner: MemoryStore,
    fail_docs: AtomicBool,
    fail_audit: AtomicBool,
}

fn refused() -> StoreError {
    StoreError::Unavailable("switched off by the test".into())
}

impl Store for FlakyStore {
    fn append_audit(
        &self,
        events: &mut [botcreds_proto::audit::AuditEvent],
    ) -> Result<(), StoreError> {
        if self.fail_audit.load(Ordering::SeqCst) {
            return Err(refused());
        }
        self.inner.append_audit(events)
    }
    fn read_audit(
        &self,
        filter: &AuditFilter,
    ) -> Result<Vec<botcreds_proto::audit::AuditEvent>, StoreError> {
        self.inner.read_audit(filter)
    }
    fn verify_audit_chain(&self) -> Result<ChainReport, StoreError> {
        self.inner.verify_audit_chain()
    }
    fn put_credential(&self, record: &CredentialRecord) -> Result<(), StoreError> {
        self.inner.put_credential(record)
    }
    fn get_credential(&self, id: &str) -> Result<Option<CredentialRecord>, StoreError> {
        self.inner.get_credential(id)
    }
    fn list_credentials(&self) -> Result<Vec<CredentialRecord>, StoreError> {
        self.inner.list_credentials()
    }
    fn put_doc(&self, namespace: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        if self.fail_docs.load(Ordering::SeqCst) {
            return Err(refused());
        }
        self.inner.put_doc(namespace, key, value)
    }
    fn get_doc(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get_doc(namespace, key)
    }
    fn delete_doc(&self, namespace: &str, key: &str) -> Result<(), StoreError> {
        self.inner.delete_doc(namespace, key)
    }
    fn list_docs(&self, namespace: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.list_docs(namespace)
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }
}

struct World {
    clock: OffsetClock,
    api: Arc<Switchable>,
    store: Arc<FlakyStore>,
    audit: AuditLog,
    keys: KeyService,
}

impl World {
    fn new() -> World {
        let clock = OffsetClock::default();
        let shared: SharedClock = Arc::new(clock.clone());
        let api = Arc::new(Switchable {
            inner: SimulatedLitellm::new(shared.clone()),
            down: AtomicBool::new(false),
            sent: Default::default(),
        });
        let store = Arc::new(FlakyStore::default());
        let audit = AuditLog::start(store.clone());
        let keys = KeyService::new(
            api.clone(),
            store.clone(),
            audit.clone(),
            shared,
            ScopeTable::default(),
            Some(crate::secret::Secret::new("provisioner-secret-0123")),
            Duration::from_secs(60),
        );
        World {
            clock,
            api,
            store,
            audit,
            keys,
        }
    }

    fn events(&self) -> Vec<AuditEventKind> {
        self.audit
            .read(&AuditFilter::default())
            .unwrap()
            .into_iter()
            .map(|e| e.event)
            .collect()
    }

    fn docs(&self) -> usize {
        self.store.list_docs(NAMESPACE).unwrap().len()
    }
}

fn origin(who: &str) -> Origin {
    Origin {
        created_by: who.into(),
        caller: format!("api_key:{who}"),
        bot: Some(who.into()),
        ..Default::default()
    }
}

fn ask(scope: &str, name: &str, on: OnExisting) -> KeyAsk {
    KeyAsk {
        scope: scope.into(),
        name: name.into(),
        budget_usd: None,
        lifetime: None,
        origin: origin("ops"),
        on_existing: on,
        preamble: Vec::new(),
        reason: None,
    }
}

fn workspace(id: &str, name: &str, user: &str) -> WorkspaceInfo {
    WorkspaceInfo {
        workspace_id: id.into(),
        workspace_name: name.into(),
        coder_user: user.into(),
        coder_user_id: format!("usr-{user}"),
    }
}

#[tokio::test]
async fn issue_records_metadata_and_never_the_key() {
    let w = World::new();
    let k = w
        .keys
        .issue(KeyAsk {
            budget_usd: Some(4.0),
            lifetime: Some(Duration::from_secs(1800)),
            ..ask("ci", "github-actions-main", OnExisting::Conflict)
        })
        .await
        .unwrap();
    let r = &k.record;
    assert_eq!(
        (r.scope.as_str(), r.budget_usd, r.rpm_limit),
        ("ci", 4.0, 120)
    );
    assert_eq!(r.budget_period, "run");
    assert_eq!(r.lifetime_secs, 1800);
    assert_eq!(r.models, ["claude-haiku-3-5"]);
    assert!(r.credential_id.starts_with("lk_") && r.credential_id.len() == 27);
    assert_eq!(
        r.token_hash,
        crate::secret::sha256_hex(k.key.expose().as_bytes())
    );
    for (_, doc) in w.store.list_docs(NAMESPACE).unwrap() {
        let text = String::from_utf8(doc).unwrap();
        assert!(
            !text.contains(k.key.expose()),
            "plaintext key in the record"
        );
    }
    assert!(!format!("{k:?}").contains(k.key.expose()));
    assert_eq!(w.events(), [AuditEventKind::CredentialIssued]);
    // A second key of that name is refused while the first lives; nothing changes.
    let e = w
        .keys
        .issue(ask("ci", "github-actions-main", OnExisting::Conflict))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::KeyExists);
    assert_eq!(w.docs(), 1);
    assert_eq!(w.keys.live_per_scope()["ci"], 1);
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let w = World::new();
    let cases = [
        (
            ask("nope", "n", OnExisting::Conflict),
            ErrorCode::InvalidScope,
        ),
        (
            ask("ci", "bad name", OnExisting::Conflict),
            ErrorCode::InvalidKeyName,
        ),
        (
            ask("ci", "", OnExisting::Conflict),
            ErrorCode::InvalidKeyName,
        ),
    ];
    for (a, code) in cases {
        assert_eq!(w.keys.issue(a).await.unwrap_err().code(), code);
    }
    w.api.down.store(true, Ordering::SeqCst);
    let e = w
        .keys
        .issue(ask("ci", "x", OnExisting::Conflict))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::UpstreamUnavailable);
    assert_eq!(w.docs(), 0);
    assert!(w.events().is_empty());
    assert_eq!(w.api.inner.live_keys(), 0);
}

#[tokio::test]
async fn workspace_gets_its_live_key_back_then_a_rotation_after_the_plaintext_is_lost() {
    let w = World::new();
    let ws = workspace("ws-abc123", "contractor-alice", "alice");
    let o = Origin {
        created_by: KEY_PROVISIONER.into(),
        caller: "provisioner".into(),
        ..Default::default()
    };
    let first = w
        .keys
        .issue_workspace(ws.clone(), o.clone(), Duration::ZERO, None, vec![])
        .await
        .unwrap();
    assert_eq!(first.record.name, "contractor-alice");
    assert_eq!(first.record.lifetime_secs, 12 * 3600);
    assert_eq!(first.record.coder_user.as_deref(), Some("alice"));
    let again = w
        .keys
        .issue_workspace(ws.clone(), o.clone(), Duration::ZERO, None, vec![])
        .await
        .unwrap();
    assert!(again.reused);
    assert_eq!(again.key.expose(), first.key.expose());
    assert_eq!(w.api.inner.live_keys(), 1);

    // Another workspace of the same name (another user) gets a qualified name.
    let bob = w
        .keys
        .issue_workspace(
            workspace("ws-2", "contractor-alice", "bob"),
            o.clone(),
            Duration::ZERO,
            None,
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(bob.record.name, "contractor-alice@bob");

    // A broker restart loses the plaintext: asking again rotates.
    w.keys.forget_plaintext(&first.record.credential_id);
    let rotated = w
        .keys
        .issue_workspace(ws, o, Duration::ZERO, None, vec![])
        .await
        .unwrap();
    assert!(!rotated.reused);
    assert_eq!(
        rotated.replaced.as_deref(),
        Some(first.record.credential_id.as_str())
    );
    assert_ne!(rotated.key.expose(), first.key.expose());
    assert_eq!(rotated.record.name, "contractor-alice");
    assert_eq!(w.api.inner.live_keys(), 2);
    assert_eq!(w.events().last(), Some(&AuditEventKind::CredentialRotated));
}

#[tokio::test]
async fn rotate_keeps_the_name_and_revokes_the_old_key() {
    let w = World::new();
    let old = w
        .keys
        .issue(ask("agent:write", "code-gen-bot", OnExisting::Conflict))
        .await
        .unwrap();
    let new = w.keys.rotate("code-gen-bot", "admin:alice").await.unwrap();
    assert_eq!(new.record.name, "code-gen-bot");
    assert_eq!(new.record.scope, "agent:write");
    assert_eq!(
        new.replaced.as_deref(),
        Some(old.record.credential_id.as_str())
    );
    assert!(
        w.api
            .inner
            .info(&old.record.token_hash)
            .await
            .unwrap()
            .is_none()
    );
    let list = w.keys.list().unwrap();
    let status = |id: &str| list.iter().find(|k| k.credential_id == id).unwrap().status;
    assert_eq!(status(&old.record.credential_id), KeyStatus::Revoked);
    assert_eq!(status(&new.record.credential_id), KeyStatus::Active);
    assert_eq!(
        w.keys.rotate("nothing", "a").await.unwrap_err().code(),
        ErrorCode::KeyNotFound
    );
    // LiteLLM down: the rotation fails and the old key stays as it was.
    w.api.down.store(true, Ordering::SeqCst);
    assert_eq!(
        w.keys.rotate("code-gen-bot", "a").await.unwrap_err().code(),
        ErrorCode::UpstreamUnavailable
    );
    w.api.down.store(false, Ordering::SeqCst);
    assert!(
        w.api
            .inner
            .info(&new.record.token_hash)
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn revoke_deletes_upstream_and_strict_revoke_changes_nothing_when_litellm_is_down() {
    let w = World::new();
    let k = w
        .keys
        .issue(ask("ci", "pr-review", OnExisting::Conflict))
        .await
        .unwrap();
    w.api.down.store(true, Ordering::SeqCst);
    let e = w
        .keys
        .revoke_by_name("pr-review", "admin")
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::UpstreamUnavailable);
    assert_eq!(w.keys.list().unwrap()[0].status, KeyStatus::Active);
    w.api.down.store(false, Ordering::SeqCst);
    let r = w.keys.revoke_by_name("pr-review", "admin").await.unwrap();
    assert!(r.revoked);
    assert_eq!(r.name, "pr-review");
    assert!(
        w.api
            .inner
            .info(&k.record.token_hash)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        w.keys
            .revoke_by_name("pr-review", "admin")
            .await
            .unwrap_err()
            .code(),
        ErrorCode::KeyNotFound
    );
    assert_eq!(
        w.events(),
        [
            AuditEventKind::CredentialIssued,
            AuditEventKind::CredentialRevoked
        ]
    );
    // The name is free again.
    w.keys
        .issue(ask("ci", "pr-review", OnExisting::Conflict))
        .await
        .unwrap();
}

#[tokio::test]
async fn revoke_by_bot_and_id_and_lenient_retry_by_the_sweeper() {
    let w = World::new();
    let a = w
        .keys
        .issue(ask("ci", "a", OnExisting::Conflict))
        .await
        .unwrap();
    w.keys
        .issue(ask("ci", "b", OnExisting::Conflict))
        .await
        .unwrap();
    let got = w
        .keys
        .revoke_by_credential_id(
            &a.record.credential_id,
            crate::keys::Revoker::Admin("admin"),
        )
        .await
        .unwrap()
        .unwrap();
    assert!(got.revoked_upstream);
    assert_eq!(got.holders, ["ops"]);
    assert!(
        w.keys
            .revoke_by_credential_id(
                &a.record.credential_id,
                crate::keys::Revoker::Admin("admin")
            )
            .await
            .unwrap()
            .is_none()
    );
    w.api.down.store(true, Ordering::SeqCst);
    let revoked = w.keys.revoke_by_bot("ops", "admin").await.unwrap();
    assert_eq!(revoked.len(), 1);
    assert!(!revoked[0].revoked_upstream);
    assert!(revoked[0].error.is_some());
    assert_eq!(w.api.inner.live_keys(), 1);
    w.api.down.store(false, Ordering::SeqCst);
    let report = w.keys.sweep_once().await.unwrap();
    assert_eq!(report.retried, 1);
    assert_eq!(w.api.inner.live_keys(), 0);
}

#[tokio::test]
async fn sweeper_expires_keys_with_a_manual_clock() {
    let w = World::new();
    let k = w
        .keys
        .issue(KeyAsk {
            lifetime: Some(Duration::from_secs(600)),
            ..ask("ci", "short", OnExisting::Conflict)
        })
        .await
        .unwrap();
    assert_eq!(w.keys.sweep_once().await.unwrap(), SweepReport::default());
    w.clock.advance(601);
    assert_eq!(w.keys.list().unwrap()[0].status, KeyStatus::Expired);
    let report = w.keys.sweep_once().await.unwrap();
    assert_eq!(report.expired, 1);
    assert!(
        w.api
            .inner
            .info(&k.record.token_hash)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(w.events().last(), Some(&AuditEventKind::CredentialExpired));
    assert_eq!(w.keys.live_per_scope()["ci"], 0);
    // A week later the record is forgotten.
    w.clock.advance(8 * 86_400);
    assert_eq!(w.keys.sweep_once().await.unwrap().pruned, 1);
    assert_eq!(w.docs(), 0);
}

#[tokio::test]
async fn release_only_by_the_holder() {
    let w = World::new();
    let k = w
        .keys
        .issue(ask("agent:review", "r", OnExisting::Conflict))
        .await
        .unwrap();
    let id = &k.record.credential_id;
    let e = w
        .keys
        .release(id, "api_key:other", Some("other"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::UnknownCredential);
    let r = w
        .keys
        .release(id, "api_key:ops", Some("ops"))
        .await
        .unwrap();
    assert!(r.released && r.deleted_upstream);
    assert_eq!(w.api.inner.live_keys(), 0);
    assert_eq!(
        w.keys
            .release("lk_nope", "x", None)
            .await
            .unwrap_err()
            .code(),
        ErrorCode::UnknownCredential
    );
}

#[tokio::test]
async fn reuse_honours_min_remaining_and_rejection() {
    let w = World::new();
    let reuse = |rejected: Option<String>| OnExisting::Reuse {
        min_remaining: Duration::from_secs(600),
        rejected,
    };
    let a = w
        .keys
        .issue(ask("ci", "bot.ci", reuse(None)))
        .await
        .unwrap();
    let b = w
        .keys
        .issue(ask("ci", "bot.ci", reuse(None)))
        .await
        .unwrap();
    assert!(b.reused);
    let c = w
        .keys
        .issue(ask(
            "ci",
            "bot.ci",
            reuse(Some(a.record.credential_id.clone())),
        ))
        .await
        .unwrap();
    assert!(!c.reused);
    w.clock.advance(3600 - 300);
    let d = w
        .keys
        .issue(ask("ci", "bot.ci", reuse(None)))
        .await
        .unwrap();
    assert!(!d.reused, "less than 10 minutes left: a new key");
    assert_eq!(w.api.inner.live_keys(), 1);
}

#[test]
fn provisioner_secret_compare() {
    let w = World::new();
    assert!(
        w.keys
            .provisioner_secret_matches(b"provisioner-secret-0123")
    );
    assert!(
        !w.keys
            .provisioner_secret_matches(b"provisioner-secret-0124")
    );
    assert!(!w.keys.provisioner_secret_matches(b""));
}

#[tokio::test]
async fn a_key_that_cannot_be_recorded_is_deleted_in_litellm_again() {
    let w = World::new();
    w.store.fail_docs.store(true, Ordering::SeqCst);
    let e = w
        .keys
        .issue(ask("ci", "a", OnExisting::Conflict))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::Internal);
    assert_eq!(w.api.inner.live_keys(), 0);
    w.store.fail_docs.store(false, Ordering::SeqCst);

    w.store.fail_audit.store(true, Ordering::SeqCst);
    let e = w
        .keys
        .issue(ask("ci", "a", OnExisting::Conflict))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::Internal);
    assert_eq!(w.api.inner.live_keys(), 0);
    assert_eq!(w.docs(), 0);
    w.store.fail_audit.store(false, Ordering::SeqCst);

    // With the store back, the same name works: nothing was left half-made.
    w.keys
        .issue(ask("ci", "a", OnExisting::Conflict))
        .await
        .unwrap();
    assert_eq!(w.api.inner.live_keys(), 1);
}

#[tokio::test]
async fn an_expired_key_not_yet_swept_frees_its_name_and_is_audited() {
    let w = World::new();
    let old = w
        .keys
        .issue(KeyAsk {
            lifetime: Some(Duration::from_secs(60)),
            ..ask("ci", "n", OnExisting::Conflict)
        })
        .await
        .unwrap();
    w.clock.advance(61);
    let new = w
        .keys
        .issue(ask("ci", "n", OnExisting::Conflict))
        .await
        .unwrap();
    assert_ne!(new.record.credential_id, old.record.credential_id);
    assert!(
        w.api
            .inner
            .info(&old.record.token_hash)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        w.events(),
        [
            AuditEventKind::CredentialIssued,
            AuditEventKind::CredentialExpired,
            AuditEventKind::CredentialIssued
        ]
    );
}

#[tokio::test]
async fn issue_events_say_how_the_key_was_decided_and_live_record_finds_it() {
    let w = World::new();
    let reuse = OnExisting::Reuse {
        min_remaining: Duration::from_secs(60),
        rejected: None,
    };
    let auto = w
        .keys
        .issue(ask("agent:write", "ci.agent-write", reuse.clone()))
        .await
        .unwrap();
    let mut approved = ask("agent:write", "ci.agent-write", reuse);
    approved.origin.approval = crate::issued::Approval::Grant {
        request_id: "apr_abcdefgh".into(),
    };
    let again = w.keys.issue(approved).await.unwrap();
    assert!(again.reused);
    let issued: Vec<(Option<String>, Option<String>)> = w
        .audit
        .read(&AuditFilter {
            event: Some(AuditEventKind::CredentialIssued),
            ..AuditFilter::default()
        })
        .unwrap()
        .into_iter()
        .map(|e| (e.approval, e.request_id))
        .collect();
    assert_eq!(
        issued,
        vec![
            (Some("auto".into()), None),
            (Some("grant".into()), Some("apr_abcdefgh".into())),
        ]
    );

    let id = auto.record.credential_id.clone();
    let found = w.keys.live_record(&id).unwrap().unwrap();
    assert_eq!(
        (found.scope.as_str(), found.bot.as_deref()),
        ("agent:write", Some("ops"))
    );
    w.keys
        .revoke_by_credential_id(&id, crate::keys::Revoker::Admin("admin"))
        .await
        .unwrap();
    assert!(w.keys.live_record(&id).unwrap().is_none());
    assert!(w.keys.live_record("lk_unknown").unwrap().is_none());
}

/// LiteLLM's banned client-side parameters (read from the real proxy's `auth_utils.py`; the
/// same file the fake LiteLLM refuses by).
fn litellm_banned_params() -> std::collections::BTreeSet<String> {
    let v: serde_json::Value = serde_json::from_str(include_str!(
        "../../../tests/fixtures/litellm/banned-request-body-params.json"
    ))
    .unwrap();
    v["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

fn object_keys(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                out.push(k.clone());
                object_keys(v, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| object_keys(v, out)),
        _ => {}
    }
}

/// Real LiteLLM answered every `/key/generate` with 401 "Rejected Request: workspace_id is not
/// allowed in request body": the metadata carried `workspace_id` (even as null).
#[tokio::test]
async fn generate_bodies_carry_no_litellm_banned_param() {
    let w = World::new();
    let banned = litellm_banned_params();
    assert!(banned.contains("workspace_id") && banned.contains("api_base"));
    w.keys
        .issue(ask("ci", "github-actions-main", OnExisting::Conflict))
        .await
        .unwrap();
    w.keys
        .issue_workspace(
            workspace("ws-1", "dev", "alice"),
            Origin {
                created_by: KEY_PROVISIONER.into(),
                caller: "provisioner".into(),
                ..Default::default()
            },
            Duration::from_secs(60),
            None,
            Vec::new(),
        )
        .await
        .unwrap();
    let sent = w.api.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 2);
    for r in &sent {
        let body = crate::providers::litellm::generate_body(r);
        let mut names = Vec::new();
        object_keys(&body, &mut names);
        let hits: Vec<&String> = names.iter().filter(|n| banned.contains(*n)).collect();
        assert!(hits.is_empty(), "banned params {hits:?} in {body}");
    }
    // The workspace is still named in the metadata, under a name LiteLLM allows.
    let meta = &sent[1].metadata;
    assert_eq!(meta["coder_workspace_id"], "ws-1");
    assert_eq!(meta["workspace_name"], "dev");
}

/// Service-level negative table: a live key asked for by someone who does not hold it is never
/// answered, rotated or replaced, and nothing stored or minted changes.
#[tokio::test]
async fn keys_of_other_holders_are_never_handed_out_rotated_or_replaced() {
    struct Row {
        name: &'static str,
        victim: KeyAsk,
        victim_workspace: Option<WorkspaceInfo>,
        attack_workspace: Option<(WorkspaceInfo, Origin)>,
        attack: Option<KeyAsk>,
        code: ErrorCode,
    }
    let user_dev = Origin {
        created_by: "dev".into(),
        caller: "coder:dev".into(),
        owner: "coder:usr-dev".into(),
        coder_user: Some("dev".into()),
        ..Default::default()
    };
    let rows = vec![
        Row {
            name: "workspace key of bot a asked for by bot b (with replaces)",
            victim: ask("workspace", "unused", OnExisting::Conflict),
            victim_workspace: Some(workspace("ws-1", "alpha", "alice")),
            attack_workspace: Some((workspace("ws-1", "alpha", "alice"), origin("bot-b"))),
            attack: None,
            code: ErrorCode::Forbidden,
        },
        Row {
            name: "a user key rotating a workspace key named like it",
            victim: ask("workspace", "unused", OnExisting::Conflict),
            victim_workspace: Some(workspace("ws-2", "dev-cli", "carol")),
            attack_workspace: None,
            attack: Some(KeyAsk {
                origin: user_dev.clone(),
                ..ask("user", "dev-cli", OnExisting::Rotate)
            }),
            code: ErrorCode::KeyExists,
        },
        Row {
            name: "reuse by name of another bot's key",
            victim: KeyAsk {
                origin: origin("bot-a"),
                ..ask("agent:review", "shared.agent-review", OnExisting::Conflict)
            },
            victim_workspace: None,
            attack_workspace: None,
            attack: Some(KeyAsk {
                origin: origin("bot-b"),
                ..ask(
                    "agent:review",
                    "shared.agent-review",
                    OnExisting::Reuse {
                        min_remaining: Duration::from_secs(60),
                        rejected: None,
                    },
                )
            }),
            code: ErrorCode::KeyExists,
        },
    ];
    for row in rows {
        let w = World::new();
        let victim = match &row.victim_workspace {
            Some(info) => {
                w.keys
                    .issue_workspace(
                        info.clone(),
                        origin("bot-a"),
                        Duration::from_secs(60),
                        None,
                        Vec::new(),
                    )
                    .await
            }
            None => w.keys.issue(row.victim.clone()).await,
        }
        .unwrap_or_else(|e| panic!("{}: victim: {e:?}", row.name));
        let before = w.keys.list().unwrap();
        let minted = w.api.sent.lock().unwrap().len();
        let result = match (row.attack_workspace, row.attack) {
            (Some((info, o)), _) => {
                w.keys
                    .issue_workspace(
                        info,
                        o,
                        Duration::from_secs(60),
                        Some(victim.record.credential_id.clone()),
                        Vec::new(),
                    )
                    .await
            }
            (None, Some(a)) => w.keys.issue(a).await,
            (None, None) => unreachable!("a row attacks"),
        };
        let e = result
            .map(|k| k.record.name)
            .expect_err(&format!("{}: the attack got a key", row.name));
        assert_eq!(e.code(), row.code, "{}: {}", row.name, e);
        assert_eq!(w.keys.list().unwrap(), before, "{}", row.name);
        assert_eq!(w.api.sent.lock().unwrap().len(), minted, "{}", row.name);
        assert!(
            w.keys
                .live_record(&victim.record.credential_id)
                .unwrap()
                .is_some(),
            "{}",
            row.name
        );
    }
}

/// Records written before holders were stored still belong to the holder the same request
/// names now: a user asking again after an upgrade rotates their own key.
#[tokio::test]
async fn records_without_a_stored_holder_keep_their_holder() {
    let w = World::new();
    let user = Origin {
        created_by: "dev".into(),
        caller: "coder:dev".into(),
        owner: "coder:usr-dev".into(),
        coder_user: Some("dev".into()),
        coder_user_id: Some("usr-dev".into()),
        ..Default::default()
    };
    let first = w
        .keys
        .issue(KeyAsk {
            origin: user.clone(),
            ..ask("user", "dev-cli", OnExisting::Rotate)
        })
        .await
        .unwrap();
    // As an older broker wrote it: no `owner`.
    let id = first.record.credential_id.clone();
    let mut doc: serde_json::Value =
        serde_json::from_slice(&w.store.get_doc(NAMESPACE, &id).unwrap().unwrap()).unwrap();
    doc.as_object_mut().unwrap().remove("owner");
    w.store
        .put_doc(NAMESPACE, &id, &serde_json::to_vec(&doc).unwrap())
        .unwrap();
    let again = w
        .keys
        .issue(KeyAsk {
            origin: user,
            ..ask("user", "dev-cli", OnExisting::Rotate)
        })
        .await
        .unwrap();
    assert_eq!(again.replaced.as_deref(), Some(id.as_str()));
}

/// Regression: every revocation by credential id was audited as "revoked by an admin", also
/// the policy's. The revoker decides `revoked_by`, the event's caller and its reason.
#[tokio::test]
async fn revocations_by_credential_id_say_who_revoked() {
    let cases = [
        (
            crate::keys::Revoker::Admin("api_key:ops"),
            "api_key:ops",
            "revoked by an admin",
        ),
        (
            crate::keys::Revoker::Policy,
            "policy",
            "the policy now denies it",
        ),
    ];
    for (by, actor, reason) in cases {
        let w = World::new();
        let k = w
            .keys
            .issue(ask("ci", "k", OnExisting::Conflict))
            .await
            .unwrap();
        let got = w
            .keys
            .revoke_by_credential_id(&k.record.credential_id, by)
            .await
            .unwrap()
            .expect("a live key");
        assert!(got.revoked_upstream, "{by:?}");
        let revoked: Vec<(Option<String>, Option<String>)> = w
            .audit
            .read(&AuditFilter {
                event: Some(AuditEventKind::CredentialRevoked),
                ..AuditFilter::default()
            })
            .unwrap()
            .into_iter()
            .map(|e| (e.caller, e.reason))
            .collect();
        assert_eq!(
            revoked,
            vec![(Some(actor.to_string()), Some(reason.to_string()))],
            "{by:?}"
        );
    }
}
