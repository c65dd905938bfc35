//! [`KeyService`]: issue, reuse, rotate, revoke, release, list and sweep LiteLLM keys.
//!
//! Every mutation runs under one async lock, so two requests for the same name cannot both
//! mint. Order of work for an issue: LiteLLM mints → the record is written → the audit events
//! are flushed → the key is answered. If the record or the audit write fails, the key is
//! deleted in LiteLLM again, so nothing is left half-made.
//!
//! Plaintext keys live only in memory ([`Secret`], redacted), for the broker's life: a workspace
//! (or bot) asking again while its key lives gets that key back. After a restart the plaintext
//! is gone, so asking again rotates: a new key is minted and the old one deleted.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use botcreds_proto::approval::RevokedCredential;
use botcreds_proto::audit::{AuditEvent, AuditEventKind};
use botcreds_proto::litellm::{KeyRevoked, KeyStatus, KeySummary, WorkspaceInfo};
use serde_json::json;
use time::OffsetDateTime;

use super::KeyError;
use super::record::{KeyRecord, NAMESPACE, credential_id_for};
use super::scopes::{ScopeSpec, ScopeTable, check_name};
use crate::audit::AuditLog;
use crate::clock::{SharedClock, rfc3339, rfc3339_millis};
use crate::issued::{Approval, credential_issued};
use crate::providers::litellm::{
    GenerateKey, GeneratedKey, LitellmApi, LitellmError, LitellmStats,
};
use crate::secret::Secret;
use crate::store::Store;

/// Ended keys are kept this long after their expiry for `keys list` and then forgotten.
const RETAIN_ENDED_SECS: i64 = 7 * 86_400;
/// The design's `created_by` for keys the provisioner scripts ask for.
pub const KEY_PROVISIONER: &str = "key-provisioner";

/// Who asks for a key, for the record, the metadata and the audit log.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Origin {
    pub created_by: String,
    pub coder_user: Option<String>,
    pub coder_user_id: Option<String>,
    pub workspace: Option<WorkspaceInfo>,
    pub bot: Option<String>,
    /// `api_key:ci`, `tailnet:node (id)`, `provisioner`, `coder:alice`.
    pub caller: String,
    pub client_ip: Option<String>,
    /// How the issue was decided, for the audit log (`auto` by default).
    pub approval: Approval,
    /// The stable holder of the key (see [`Origin::owner_id`]); empty: derived from `bot` or
    /// `caller`.
    pub owner: String,
}

impl Origin {
    /// Who holds the key: the explicit `owner`, else `bot:<bot>`, else the caller. A live key
    /// is answered again, rotated or replaced only for the same holder.
    pub fn owner_id(&self) -> String {
        if !self.owner.is_empty() {
            self.owner.clone()
        } else if let Some(b) = &self.bot {
            format!("bot:{b}")
        } else {
            self.caller.clone()
        }
    }
}

/// What to do when a live key already has the name asked for.
#[derive(Clone, Debug, PartialEq)]
pub enum OnExisting {
    /// Refuse with `key_exists`.
    Conflict,
    /// Mint a new key and delete the old one.
    Rotate,
    /// Answer the live key if its plaintext is still in memory, it has `min_remaining` left
    /// and is not `rejected`; else rotate.
    Reuse {
        min_remaining: Duration,
        rejected: Option<String>,
    },
}

/// A validated request for a key.
#[derive(Clone, Debug)]
pub struct KeyAsk {
    pub scope: String,
    pub name: String,
    /// At most the scope's budget; `None` is the scope's budget.
    pub budget_usd: Option<f64>,
    /// At most the scope's lifetime; `None` is the scope's lifetime.
    pub lifetime: Option<Duration>,
    pub origin: Origin,
    pub on_existing: OnExisting,
    /// Events to flush in the same batch before the issue event (e.g. `credential_requested`).
    pub preamble: Vec<AuditEvent>,
    pub reason: Option<String>,
}

/// A key handed out.
#[derive(Clone, Debug)]
pub struct IssuedLitellmKey {
    pub key: Secret,
    pub record: KeyRecord,
    /// The live key was answered again.
    pub reused: bool,
    /// For a rotation: the credential id of the key it replaced.
    pub replaced: Option<String>,
}

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Keys past their expiry, deleted in LiteLLM (or marked for a retry) and marked expired.
    pub expired: usize,
    /// Earlier deletions that failed and succeeded now.
    pub retried: usize,
    /// Deletions that failed this time (retried next sweep).
    pub failed: usize,
    /// Old records forgotten.
    pub pruned: usize,
}

/// The answer of [`KeyService::release`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Released {
    pub released: bool,
    pub credential_id: String,
    pub kind: String,
    pub name: String,
    pub revoked_at: String,
    /// Whether LiteLLM confirmed the key deleted (else the sweeper retries).
    pub deleted_upstream: bool,
}

/// Whether ending a key still has to delete it in LiteLLM.
enum Upstream {
    Delete,
    AlreadyDeleted,
}

/// Who revokes a key by its credential id: `revoked_by`, the audit event's caller and its
/// reason follow from it, so a key the policy ended never reads as an admin's doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revoker<'a> {
    /// An admin, described (`revoked_by` and the audit's caller).
    Admin(&'a str),
    /// The policy in force, which now denies the key's scope to its bot (at a reload, or
    /// when a request is decided again after its key was made).
    Policy,
}

impl Revoker<'_> {
    /// The actor recorded as `revoked_by` and as the audit event's caller.
    pub fn actor(&self) -> &str {
        match self {
            Revoker::Admin(actor) => actor,
            Revoker::Policy => "policy",
        }
    }

    /// The audit event's reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Revoker::Admin(_) => "revoked by an admin",
            Revoker::Policy => "the policy now denies it",
        }
    }
}

/// LiteLLM virtual keys: the scope table, the records, the live plaintexts and the upstream.
pub struct KeyService {
    api: Arc<dyn LitellmApi>,
    store: Arc<dyn Store>,
    audit: AuditLog,
    clock: SharedClock,
    scopes: ScopeTable,
    provisioner_secret: Option<Secret>,
    sweep_interval: Duration,
    ops: tokio::sync::Mutex<()>,
    live: Mutex<HashMap<String, Secret>>,
    coder: Option<super::coder::CoderClient>,
}

impl std::fmt::Debug for KeyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyService")
            .field("litellm", &self.api.base_url())
            .finish_non_exhaustive()
    }
}

fn store_error(e: impl std::fmt::Display) -> KeyError {
    KeyError::Store(e.to_string())
}

fn upstream_error(e: &LitellmError, doing: &'static str) -> KeyError {
    tracing::warn!(error = %e, code = %e.code(), "LiteLLM {doing} failed");
    KeyError::Upstream {
        doing,
        source: e.clone(),
    }
}

impl KeyService {
    pub fn new(
        api: Arc<dyn LitellmApi>,
        store: Arc<dyn Store>,
        audit: AuditLog,
        clock: SharedClock,
        scopes: ScopeTable,
        provisioner_secret: Option<Secret>,
        sweep_interval: Duration,
    ) -> KeyService {
        KeyService {
            api,
            store,
            audit,
            clock,
            scopes,
            provisioner_secret,
            sweep_interval: sweep_interval.max(Duration::from_secs(1)),
            ops: tokio::sync::Mutex::new(()),
            live: Mutex::new(HashMap::new()),
            coder: None,
        }
    }

    /// Check `/api/v1/keys/user` session tokens against this Coder deployment.
    pub fn with_coder(mut self, coder: super::coder::CoderClient) -> KeyService {
        self.coder = Some(coder);
        self
    }

    /// The Coder client, when `[coder]` is configured.
    pub fn coder(&self) -> Option<&super::coder::CoderClient> {
        self.coder.as_ref()
    }

    pub fn scopes(&self) -> &ScopeTable {
        &self.scopes
    }

    /// The OpenAI-compatible base URL tools use: `{proxy}/v1`.
    pub fn tool_base_url(&self) -> String {
        format!("{}/v1", self.api.base_url())
    }

    pub fn upstream_stats(&self) -> LitellmStats {
        self.api.stats()
    }

    /// Whether `presented` is the provisioner secret (constant time over SHA-256 digests, so
    /// neither content nor length leaks). Always false when none is configured.
    pub fn provisioner_secret_matches(&self, presented: &[u8]) -> bool {
        use sha2::Digest;
        use subtle::ConstantTimeEq;
        let Some(secret) = &self.provisioner_secret else {
            return false;
        };
        let a = sha2::Sha256::digest(secret.expose().as_bytes());
        let b = sha2::Sha256::digest(presented);
        a.ct_eq(&b).into()
    }

    fn records(&self) -> Result<Vec<KeyRecord>, KeyError> {
        let docs = self.store.list_docs(NAMESPACE).map_err(store_error)?;
        let mut out = Vec::with_capacity(docs.len());
        for (id, bytes) in docs {
            match serde_json::from_slice::<KeyRecord>(&bytes) {
                Ok(r) => out.push(r),
                Err(e) => tracing::error!(credential_id = %id, error = %e, "unreadable key record"),
            }
        }
        Ok(out)
    }

    fn put(&self, r: &KeyRecord) -> Result<(), KeyError> {
        let bytes = serde_json::to_vec(r).map_err(store_error)?;
        self.store
            .put_doc(NAMESPACE, &r.credential_id, &bytes)
            .map_err(store_error)
    }

    fn plaintext(&self, id: &str) -> Option<Secret> {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    pub(super) fn forget_plaintext(&self, id: &str) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    fn event(&self, kind: AuditEventKind, r: &KeyRecord, caller: &str) -> AuditEvent {
        let mut e = AuditEvent::new(kind, rfc3339_millis(self.clock.now()));
        e.bot = r.bot.clone();
        e.caller = Some(caller.to_string());
        e.token_id = Some(r.credential_id.clone());
        e.expires_at = Some(r.expires_at.clone());
        e.detail = Some(format!("litellm_key {} scope {}", r.name, r.scope));
        e
    }

    /// `credential_issued` for a key handed out under `origin` (new or answered again).
    fn issued_event(&self, r: &KeyRecord, origin: &Origin) -> AuditEvent {
        let mut e = credential_issued(
            rfc3339_millis(self.clock.now()),
            origin.caller.clone(),
            &origin.approval,
            r.credential_id.clone(),
            r.expires_at.clone(),
        );
        e.bot = r.bot.clone();
        e.detail = Some(format!("litellm_key {} scope {}", r.name, r.scope));
        e
    }

    /// Every record, newest first, as the list shows them.
    pub fn list(&self) -> Result<Vec<KeySummary>, KeyError> {
        let now = self.clock.now();
        let mut records = self.records()?;
        records.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.name.cmp(&b.name)));
        Ok(records.iter().map(|r| r.summary(now)).collect())
    }

    /// Live keys per scope (metrics).
    pub fn live_per_scope(&self) -> BTreeMap<String, usize> {
        let now = self.clock.now();
        let mut out: BTreeMap<String, usize> =
            self.scopes.iter().map(|s| (s.name.clone(), 0)).collect();
        if let Ok(records) = self.records() {
            for r in records.iter().filter(|r| r.is_live(now)) {
                *out.entry(r.scope.clone()).or_default() += 1;
            }
        }
        out
    }

    /// Issue a key (or answer / rotate the live one of that name, per `ask.on_existing`).
    pub async fn issue(&self, ask: KeyAsk) -> Result<IssuedLitellmKey, KeyError> {
        let _guard = self.ops.lock().await;
        self.issue_locked(ask).await
    }

    /// A `workspace` key for a Coder workspace: its live key if the broker still holds it,
    /// else a new one (rotating a live key whose plaintext was lost in a restart). The name is
    /// the workspace name, or `workspace_name@coder_user` when another workspace holds that.
    pub async fn issue_workspace(
        &self,
        info: WorkspaceInfo,
        mut origin: Origin,
        min_remaining: Duration,
        rejected: Option<String>,
        preamble: Vec<AuditEvent>,
    ) -> Result<IssuedLitellmKey, KeyError> {
        self.confirm_workspace(&info).await?;
        let _guard = self.ops.lock().await;
        let now = self.clock.now();
        let records = self.records()?;
        let live: Vec<&KeyRecord> = records.iter().filter(|r| r.is_live(now)).collect();
        let held_by = |name: &str| live.iter().find(|r| r.name == name);
        let mine = live.iter().find(|r| {
            r.scope == "workspace"
                && r.workspace
                    .as_ref()
                    .is_some_and(|w| w.workspace_id == info.workspace_id)
        });
        // A workspace's key belongs to whoever had it made (the provisioner, or one bot):
        // naming the workspace is not enough to get, rotate or replace it.
        if let Some(r) = mine
            && r.owner_id() != origin.owner_id()
        {
            return Err(KeyError::Forbidden(format!(
                "workspace {:?} has a live key issued to another holder; it is not handed \
                     out, rotated or replaced for you",
                info.workspace_id.chars().take(128).collect::<String>()
            )));
        }
        let name = match mine {
            Some(r) => r.name.clone(),
            None => {
                let plain = super::scopes::name_part(&info.workspace_name);
                let qualified = format!("{}@{}", plain, super::scopes::name_part(&info.coder_user));
                if held_by(&plain).is_none() {
                    plain
                } else if held_by(&qualified).is_none() {
                    qualified
                } else {
                    return Err(KeyError::Exists(format!(
                        "live keys named {plain:?} and {qualified:?} belong to other workspaces"
                    )));
                }
            }
        };
        origin.coder_user = Some(info.coder_user.clone());
        origin.coder_user_id = Some(info.coder_user_id.clone());
        origin.workspace = Some(info);
        self.issue_locked(KeyAsk {
            scope: "workspace".into(),
            name,
            budget_usd: None,
            lifetime: None,
            origin,
            on_existing: OnExisting::Reuse {
                min_remaining,
                rejected,
            },
            preamble,
            reason: None,
        })
        .await
    }

    /// With a Coder token configured, the workspace must exist in Coder with this name and
    /// owner; the request's word alone names no workspace.
    async fn confirm_workspace(&self, info: &WorkspaceInfo) -> Result<(), KeyError> {
        let Some(coder) = self.coder.as_ref().filter(|c| c.confirms_workspaces()) else {
            return Ok(());
        };
        let refuse = |why: String| Err(KeyError::InvalidWorkspace(why));
        let id: String = info.workspace_id.chars().take(128).collect();
        match coder.workspace(&info.workspace_id).await? {
            None => refuse(format!("Coder knows no workspace {id:?}")),
            Some(w) if w.name != info.workspace_name => refuse(format!(
                "Coder's workspace {id:?} is not named {:?}",
                info.workspace_name.chars().take(128).collect::<String>()
            )),
            Some(w) if w.owner_name != info.coder_user || w.owner_id != info.coder_user_id => {
                refuse(format!(
                    "Coder's workspace {id:?} is not owned by {:?} ({:?})",
                    info.coder_user.chars().take(128).collect::<String>(),
                    info.coder_user_id.chars().take(128).collect::<String>()
                ))
            }
            Some(_) => Ok(()),
        }
    }

    async fn issue_locked(&self, ask: KeyAsk) -> Result<IssuedLitellmKey, KeyError> {
        let spec = self.scopes.lookup(&ask.scope)?.clone();
        check_name(&ask.name)?;
        let now = self.clock.now();
        let records = self.records()?;
        let existing = records
            .iter()
            .find(|r| r.name == ask.name && r.is_live(now))
            .cloned();
        let mut replaced: Option<KeyRecord> = None;
        if let Some(old) = existing {
            // Reuse and rotation act on the asker's own key of that scope only; a live key of
            // the name held by anyone else (or of another scope) is a collision, never handed
            // out or deleted.
            if ask.on_existing != OnExisting::Conflict
                && (old.owner_id() != ask.origin.owner_id() || old.scope != ask.scope)
            {
                return Err(KeyError::Exists(format!(
                    "a live key named {:?} (scope {}) belongs to another holder; revoke it \
                         or ask under another name",
                    old.name, old.scope
                )));
            }
            match &ask.on_existing {
                OnExisting::Conflict => {
                    return Err(KeyError::Exists(format!(
                        "a live key named {:?} exists (scope {}, expires {}); revoke or rotate it",
                        old.name, old.scope, old.expires_at
                    )));
                }
                OnExisting::Reuse {
                    min_remaining,
                    rejected,
                } => {
                    let fresh = old.remaining_secs(now) >= min_remaining.as_secs()
                        && old.scope == ask.scope
                        && rejected.as_deref() != Some(old.credential_id.as_str());
                    if fresh && let Some(key) = self.plaintext(&old.credential_id) {
                        let mut events = ask.preamble.clone();
                        let mut ev = self.issued_event(&old, &ask.origin);
                        ev.reused = true;
                        ev.client_ip = ask.origin.client_ip.clone();
                        ev.reason = ask.reason.clone();
                        events.push(ev);
                        self.audit
                            .record(events)
                            .await
                            .map_err(|e| KeyError::Audit(e.to_string()))?;
                        return Ok(IssuedLitellmKey {
                            key,
                            record: old,
                            reused: true,
                            replaced: None,
                        });
                    }
                }
                OnExisting::Rotate => {}
            }
            // Rotation: the old key goes first, since LiteLLM wants aliases unique. If LiteLLM
            // cannot delete it, nothing changes.
            self.delete_upstream(&old).await.map_err(|e| {
                upstream_error(&e, "deleting the old key in LiteLLM for the rotation")
            })?;
            let mut ended = old.clone();
            ended.status = KeyStatus::Revoked;
            ended.revoked_at = Some(rfc3339(now));
            ended.revoked_by = Some(ask.origin.caller.clone());
            ended.upstream_deleted = true;
            self.put(&ended)?;
            self.forget_plaintext(&ended.credential_id);
            replaced = Some(ended);
        }
        // Ended keys of this name whose deletion failed earlier still hold the alias.
        for stale in records
            .iter()
            .filter(|r| r.name == ask.name && !r.upstream_deleted && !r.is_live(now))
        {
            self.delete_upstream(stale).await.map_err(|e| {
                upstream_error(&e, "deleting an ended key of the same name in LiteLLM")
            })?;
            if stale.status == KeyStatus::Active {
                // Expired, and the sweeper has not come by yet: end it as the sweeper would.
                self.end_locked(
                    stale.clone(),
                    KeyStatus::Expired,
                    "sweeper",
                    "expired",
                    Upstream::AlreadyDeleted,
                )
                .await?;
            } else {
                let mut done = stale.clone();
                done.upstream_deleted = true;
                self.put(&done)?;
            }
        }

        let result = self.mint(&ask, &spec, now, replaced.as_ref()).await;
        if let (Err(e), Some(old)) = (&result, &replaced) {
            // The old key is gone and no new one came: say so in the audit log.
            let mut ev = self.event(AuditEventKind::CredentialRevoked, old, &ask.origin.caller);
            ev.detail = Some(format!(
                "litellm_key {} scope {}: deleted for a rotation whose new key failed ({})",
                old.name,
                old.scope,
                e.code()
            ));
            if let Err(err) = self.audit.record(vec![ev]).await {
                tracing::error!(error = %err, "audit log write failed for a failed rotation");
            }
        }
        result
    }

    async fn mint(
        &self,
        ask: &KeyAsk,
        spec: &ScopeSpec,
        now: OffsetDateTime,
        replaced: Option<&KeyRecord>,
    ) -> Result<IssuedLitellmKey, KeyError> {
        let lifetime = ask.lifetime.unwrap_or(spec.lifetime).min(spec.lifetime);
        let lifetime_secs = lifetime.as_secs().max(1);
        let budget = ask
            .budget_usd
            .unwrap_or(spec.budget_usd)
            .min(spec.budget_usd);
        let now = now.replace_nanosecond(0).unwrap_or(now);
        let planned_expiry =
            now + time::Duration::seconds(i64::try_from(lifetime_secs).unwrap_or(i64::MAX / 4));
        let o = &ask.origin;
        let w = o.workspace.as_ref();
        // LiteLLM refuses any body naming one of its client-side parameters anywhere, metadata
        // included (`auth_utils.py`: `workspace_id` is one), so the workspace id travels as
        // `coder_workspace_id`; docs/litellm.md has the mapping.
        let metadata = json!({
            "scope": spec.name,
            "key_type": "virtual",
            "created_by": o.created_by,
            "created_at": rfc3339(now),
            "coder_workspace_id": w.map(|w| w.workspace_id.clone()),
            "workspace_name": w.map(|w| w.workspace_name.clone()),
            "coder_user": o.coder_user,
            "coder_user_id": o.coder_user_id,
            "expires_at": rfc3339(planned_expiry),
            "budget_usd": budget,
            "rpm_limit": spec.rpm_limit,
            "models": spec.models,
            "issued_by": "botcreds",
            "botcreds_name": ask.name,
            "botcreds_bot": o.bot,
            "botcreds_caller": o.caller,
        });
        let generated = self
            .api
            .generate(&GenerateKey {
                key_alias: ask.name.clone(),
                duration_secs: lifetime_secs,
                models: spec.models.clone(),
                max_budget: budget,
                budget_duration: spec.period.budget_duration(),
                rpm_limit: spec.rpm_limit,
                metadata,
            })
            .await
            .map_err(|e| upstream_error(&e, "minting the key in LiteLLM"))?;
        // LiteLLM counts from its own clock; keep the earlier of the two expiries.
        let expires = generated
            .expires
            .map(|e| e.min(planned_expiry))
            .unwrap_or(planned_expiry);
        let credential_id = credential_id_for(&generated.token_hash);
        let record = KeyRecord {
            credential_id: credential_id.clone(),
            token_hash: generated.token_hash.clone(),
            name: ask.name.clone(),
            scope: spec.name.clone(),
            status: KeyStatus::Active,
            budget_usd: budget,
            budget_period: spec.period.as_str().to_string(),
            rpm_limit: spec.rpm_limit,
            models: spec.models.clone(),
            created_at: rfc3339(now),
            expires_at: rfc3339(expires),
            expires_unix: expires.unix_timestamp(),
            lifetime_secs,
            revoked_at: None,
            revoked_by: None,
            created_by: o.created_by.clone(),
            coder_user: o.coder_user.clone(),
            coder_user_id: o.coder_user_id.clone(),
            bot: o.bot.clone(),
            caller: o.caller.clone(),
            workspace: o.workspace.clone(),
            upstream_deleted: false,
            replaced_by: None,
            owner: Some(o.owner_id()),
        };
        if let Err(e) = self.put(&record) {
            self.roll_back(&generated).await;
            return Err(e);
        }
        let mut events = ask.preamble.clone();
        let mut ev = match replaced {
            Some(old) => {
                let mut ev = self.event(AuditEventKind::CredentialRotated, &record, &o.caller);
                ev.detail = Some(format!(
                    "litellm_key {} scope {} replaces {}",
                    record.name, record.scope, old.credential_id
                ));
                o.approval.stamp(&mut ev);
                ev
            }
            None => self.issued_event(&record, o),
        };
        ev.client_ip = o.client_ip.clone();
        ev.reason = ask.reason.clone();
        events.push(ev);
        if let Err(e) = self.audit.record(events).await {
            self.roll_back(&generated).await;
            let _ = self.store.delete_doc(NAMESPACE, &credential_id);
            return Err(KeyError::Audit(e.to_string()));
        }
        if let Some(old) = replaced {
            let mut old = old.clone();
            old.replaced_by = Some(credential_id.clone());
            if let Err(e) = self.put(&old) {
                tracing::warn!(error = %e, "could not link the rotated key to its successor");
            }
        }
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(credential_id.clone(), generated.key.clone());
        tracing::info!(
            credential_id = %credential_id,
            name = %record.name,
            scope = %record.scope,
            expires_at = %record.expires_at,
            rotated = replaced.is_some(),
            "LiteLLM key issued"
        );
        Ok(IssuedLitellmKey {
            key: generated.key,
            record,
            reused: false,
            replaced: replaced.map(|r| r.credential_id.clone()),
        })
    }

    /// Delete a key minted but not recorded.
    async fn roll_back(&self, generated: &GeneratedKey) {
        match self.api.delete(&generated.token_hash).await {
            Ok(_) => tracing::warn!(
                credential_id = %credential_id_for(&generated.token_hash),
                "key deleted in LiteLLM again: it could not be recorded"
            ),
            Err(e) => tracing::error!(
                credential_id = %credential_id_for(&generated.token_hash),
                error = %e,
                "a key minted in LiteLLM could not be recorded NOR deleted; delete it by hand"
            ),
        }
    }

    async fn delete_upstream(&self, r: &KeyRecord) -> Result<(), LitellmError> {
        self.api.delete(&r.token_hash).await.map(|_| ())
    }

    /// End a record: delete upstream, mark `status`, forget the plaintext, audit. A failed
    /// upstream deletion still ends the key in the broker; the sweeper retries the deletion.
    async fn end_locked(
        &self,
        mut r: KeyRecord,
        status: KeyStatus,
        actor: &str,
        why: &str,
        upstream: Upstream,
    ) -> Result<(KeyRecord, Option<LitellmError>), KeyError> {
        let upstream = match upstream {
            Upstream::Delete => self.delete_upstream(&r).await.err(),
            Upstream::AlreadyDeleted => None,
        };
        let now = self.clock.now();
        r.status = status;
        if status == KeyStatus::Revoked {
            r.revoked_at = Some(rfc3339(now));
            r.revoked_by = Some(actor.to_string());
        }
        r.upstream_deleted = upstream.is_none();
        self.put(&r)?;
        self.forget_plaintext(&r.credential_id);
        let kind = match status {
            KeyStatus::Expired => AuditEventKind::CredentialExpired,
            _ => AuditEventKind::CredentialRevoked,
        };
        let mut ev = self.event(kind, &r, actor);
        ev.reason = Some(why.to_string());
        if let Some(e) = &upstream {
            ev.code = Some(e.code().as_str().to_string());
            ev.detail = Some(format!(
                "litellm_key {} scope {}; LiteLLM deletion failed and is retried: {e}",
                r.name, r.scope
            ));
        }
        if let Err(e) = self.audit.record(vec![ev]).await {
            tracing::error!(error = %e, "audit log write failed for a key's end");
        }
        tracing::info!(
            credential_id = %r.credential_id,
            name = %r.name,
            deleted_upstream = r.upstream_deleted,
            "LiteLLM key {}",
            status.as_str()
        );
        Ok((r, upstream))
    }

    /// Revoke the live key named `name`: deleted in LiteLLM at once. If LiteLLM cannot delete
    /// it the key stays live and the error says why (nothing changed).
    pub async fn revoke_by_name(&self, name: &str, actor: &str) -> Result<KeyRevoked, KeyError> {
        let _guard = self.ops.lock().await;
        let now = self.clock.now();
        let found = self
            .records()?
            .into_iter()
            .find(|r| r.name == name && r.is_live(now));
        let Some(r) = found else {
            return Err(KeyError::NotFound(format!(
                "no live key is named {:?}",
                name.chars().take(128).collect::<String>()
            )));
        };
        self.delete_upstream(&r)
            .await
            .map_err(|e| upstream_error(&e, "deleting the key in LiteLLM (it was NOT revoked)"))?;
        let (r, _) = self
            .end_locked(
                r,
                KeyStatus::Revoked,
                actor,
                "revoked",
                Upstream::AlreadyDeleted,
            )
            .await?;
        Ok(KeyRevoked {
            revoked: true,
            name: r.name,
            revoked_at: r.revoked_at.unwrap_or_default(),
        })
    }

    /// Rotate the live key named `name`: a new key with the same name, scope, budget and
    /// lifetime; the old one deleted in LiteLLM.
    pub async fn rotate(&self, name: &str, actor: &str) -> Result<IssuedLitellmKey, KeyError> {
        let _guard = self.ops.lock().await;
        let now = self.clock.now();
        let found = self
            .records()?
            .into_iter()
            .find(|r| r.name == name && r.is_live(now));
        let Some(old) = found else {
            return Err(KeyError::NotFound(format!(
                "no live key is named {:?}",
                name.chars().take(128).collect::<String>()
            )));
        };
        let origin = Origin {
            created_by: old.created_by.clone(),
            coder_user: old.coder_user.clone(),
            coder_user_id: old.coder_user_id.clone(),
            workspace: old.workspace.clone(),
            bot: old.bot.clone(),
            caller: actor.to_string(),
            owner: old.owner_id(),
            ..Default::default()
        };
        self.issue_locked(KeyAsk {
            scope: old.scope.clone(),
            name: old.name.clone(),
            budget_usd: Some(old.budget_usd),
            lifetime: Some(Duration::from_secs(old.lifetime_secs)),
            origin,
            on_existing: OnExisting::Rotate,
            preamble: Vec::new(),
            reason: Some("rotated".into()),
        })
        .await
    }

    /// An agent giving back its own key when it stops: deleted in LiteLLM. Keys of other
    /// callers are `unknown_credential`, as are ids the broker never issued.
    pub async fn release(
        &self,
        credential_id: &str,
        caller: &str,
        bot: Option<&str>,
    ) -> Result<Released, KeyError> {
        let _guard = self.ops.lock().await;
        let unknown = || KeyError::UnknownCredential;
        let found = self
            .records()?
            .into_iter()
            .find(|r| r.credential_id == credential_id)
            .ok_or_else(unknown)?;
        let owned = match (&found.bot, bot) {
            (Some(a), Some(b)) => a == b,
            _ => found.caller == caller,
        };
        if !owned {
            return Err(unknown());
        }
        let record = if found.status == KeyStatus::Active {
            self.end_locked(
                found,
                KeyStatus::Revoked,
                caller,
                "released by its holder",
                Upstream::Delete,
            )
            .await?
            .0
        } else {
            found
        };
        Ok(Released {
            released: true,
            credential_id: record.credential_id,
            kind: "litellm_key".into(),
            name: record.name,
            revoked_at: record
                .revoked_at
                .unwrap_or_else(|| record.expires_at.clone()),
            deleted_upstream: record.upstream_deleted,
        })
    }

    fn revoked_view(r: &KeyRecord, err: Option<&LitellmError>) -> RevokedCredential {
        RevokedCredential {
            credential_id: r.credential_id.clone(),
            repositories: Vec::new(),
            holders: r
                .bot
                .clone()
                .or_else(|| r.coder_user.clone())
                .into_iter()
                .collect(),
            expires_at: r.expires_at.clone(),
            revoked_upstream: err.is_none(),
            error: err.map(|e| e.to_string()),
        }
    }

    /// Revoke one live key by credential id (`lk_...`); `None` when no live key has it. A
    /// failed LiteLLM deletion still revokes in the broker (`revoked_upstream: false`), and
    /// the sweeper retries the deletion.
    pub async fn revoke_by_credential_id(
        &self,
        id: &str,
        by: Revoker<'_>,
    ) -> Result<Option<RevokedCredential>, KeyError> {
        let _guard = self.ops.lock().await;
        let now = self.clock.now();
        let Some(r) = self
            .records()?
            .into_iter()
            .find(|r| r.credential_id == id && r.is_live(now))
        else {
            return Ok(None);
        };
        let (r, err) = self
            .end_locked(
                r,
                KeyStatus::Revoked,
                by.actor(),
                by.reason(),
                Upstream::Delete,
            )
            .await?;
        Ok(Some(Self::revoked_view(&r, err.as_ref())))
    }

    /// The live key with credential id `id` (`lk_...`), if any.
    pub fn live_record(&self, id: &str) -> Result<Option<KeyRecord>, KeyError> {
        let now = self.clock.now();
        Ok(self
            .records()?
            .into_iter()
            .find(|r| r.credential_id == id && r.is_live(now)))
    }

    /// Revoke every live key issued to the policy bot `bot`.
    pub async fn revoke_by_bot(
        &self,
        bot: &str,
        actor: &str,
    ) -> Result<Vec<RevokedCredential>, KeyError> {
        let _guard = self.ops.lock().await;
        let now = self.clock.now();
        let mut out = Vec::new();
        for r in self
            .records()?
            .into_iter()
            .filter(|r| r.bot.as_deref() == Some(bot) && r.is_live(now))
        {
            let (r, err) = self
                .end_locked(
                    r,
                    KeyStatus::Revoked,
                    actor,
                    "revoked by an admin",
                    Upstream::Delete,
                )
                .await?;
            out.push(Self::revoked_view(&r, err.as_ref()));
        }
        Ok(out)
    }

    /// One sweep: expire keys past their expiry (deleted in LiteLLM, marked expired), retry
    /// deletions that failed before, forget records ended more than a week ago.
    pub async fn sweep_once(&self) -> Result<SweepReport, KeyError> {
        let _guard = self.ops.lock().await;
        let now = self.clock.now();
        let mut report = SweepReport::default();
        for r in self.records()? {
            if r.status == KeyStatus::Active && !r.is_live(now) {
                let (_, err) = self
                    .end_locked(
                        r,
                        KeyStatus::Expired,
                        "sweeper",
                        "expired",
                        Upstream::Delete,
                    )
                    .await?;
                report.expired += 1;
                if err.is_some() {
                    report.failed += 1;
                }
            } else if r.status != KeyStatus::Active && !r.upstream_deleted {
                match self.delete_upstream(&r).await {
                    Ok(()) => {
                        let mut done = r;
                        done.upstream_deleted = true;
                        self.put(&done)?;
                        report.retried += 1;
                    }
                    Err(e) => {
                        tracing::warn!(credential_id = %r.credential_id, error = %e, "LiteLLM deletion retry failed");
                        report.failed += 1;
                    }
                }
            } else if r.status != KeyStatus::Active
                && r.expires_unix + RETAIN_ENDED_SECS < now.unix_timestamp()
            {
                self.store
                    .delete_doc(NAMESPACE, &r.credential_id)
                    .map_err(store_error)?;
                report.pruned += 1;
            }
        }
        Ok(report)
    }

    /// Sweep every `sweep_interval` until `stop` turns true.
    pub async fn run_sweeper(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.sweep_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tick.tick() => {}
            }
            if *stop.borrow() {
                return;
            }
            match self.sweep_once().await {
                Ok(r) if r != SweepReport::default() => tracing::info!(
                    expired = r.expired,
                    retried = r.retried,
                    failed = r.failed,
                    pruned = r.pruned,
                    "LiteLLM key sweep"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "LiteLLM key sweep failed"),
            }
        }
    }
}
