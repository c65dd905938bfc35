//! Human approvals: the approval-request lifecycle (`PENDING → APPROVED → ISSUED`, or
//! `DENIED`, or `EXPIRED`), grants created by approvals, remembered rules ("approve +
//! remember"), and revocation.
//!
//! Every record lives in the store's documents (namespaces `approvals`, `grants`,
//! `remembered`), so pending requests, grants and remembered rules survive restarts; memory
//! holds an index of them. Decisions are taken under one lock and persisted before the lock is
//! released, so of two concurrent decisions exactly one wins and a failed write changes
//! nothing. Audit events and [`ApprovalEvent`]s follow each change.
//!
//! This module decides and records approval requests; it mints nothing. The bot-facing side
//! (a request that needs approval, `GET /v1/requests/{id}`) is the issuance service
//! (`issuance/`); `revoke.rs` the revocation; `api/admin.rs` the admin routes.

mod error;
mod records;
mod revoke;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use botcreds_proto::Ttl;
use botcreds_proto::approval::{
    ApprovalRequestView, ApprovalState, DecisionAnswer, GrantView, RememberedRuleView,
};
use botcreds_proto::audit::{AuditEvent, AuditEventKind};
use botcreds_proto::litellm::WorkspaceInfo;
use serde::Deserialize;
use time::OffsetDateTime;
use tokio::sync::{broadcast, watch};

use crate::audit::AuditLog;
use crate::clock::{SharedClock, rfc3339, rfc3339_millis};
use crate::grants::TokenIssuer;
use crate::policy::Request;
use crate::policy::remembered::{RememberedRule, RememberedRules, Resource};
use crate::store::Store;

pub use error::ApprovalError;
use records::{GrantRecord, RequestRecord, parse_time};
pub use revoke::{PolicyEnforced, RevokeTarget};

const NS_REQUESTS: &str = "approvals";
const NS_GRANTS: &str = "grants";
const NS_REMEMBERED: &str = "remembered";

/// Longest deny reason, in bytes.
pub const MAX_DENY_REASON_BYTES: usize = 4096;
/// Decided requests and ended grants are kept this long (for `GET /v1/requests/{id}` and
/// listings), then dropped from the store; the audit log keeps their history.
const KEEP_DECIDED: time::Duration = time::Duration::days(7);

/// `[approvals]` in broker.toml.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsConfig {
    /// How long a grant lets a bot refresh what an approval covered (default 8h).
    #[serde(default = "default_grant_ttl")]
    pub grant_ttl: Ttl,
    /// The longest `wait` a request or long-poll may ask for (default 5m).
    #[serde(default = "default_max_wait")]
    pub max_wait: Ttl,
    /// Pending requests one bot (or one unmatched caller) may have at once (default 100).
    #[serde(default = "default_max_pending_per_bot")]
    pub max_pending_per_bot: usize,
    /// Pending requests in all (default 10000).
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    /// How often expired requests and grants are swept (default 1s).
    #[serde(default = "default_sweep_interval")]
    pub sweep_interval: Ttl,
    /// Whether an admin whose identity is also the requesting policy bot (or the requesting
    /// caller) may approve that request (default false: `403 self_approval`).
    #[serde(default)]
    pub allow_self_approval: bool,
}

fn default_grant_ttl() -> Ttl {
    Ttl::from_secs(8 * 3600)
}
fn default_max_wait() -> Ttl {
    Ttl::from_secs(300)
}
fn default_max_pending_per_bot() -> usize {
    100
}
fn default_max_pending() -> usize {
    10_000
}
fn default_sweep_interval() -> Ttl {
    Ttl::from_secs(1)
}

impl Default for ApprovalsConfig {
    fn default() -> Self {
        ApprovalsConfig {
            grant_ttl: default_grant_ttl(),
            max_wait: default_max_wait(),
            max_pending_per_bot: default_max_pending_per_bot(),
            max_pending: default_max_pending(),
            sweep_interval: default_sweep_interval(),
            allow_self_approval: false,
        }
    }
}

impl ApprovalsConfig {
    /// The first invalid key and why, as `(key, message)`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.max_pending_per_bot == 0 {
            return Err(("approvals.max_pending_per_bot", "must be at least 1".into()));
        }
        if self.max_pending < self.max_pending_per_bot {
            return Err((
                "approvals.max_pending",
                "must be at least approvals.max_pending_per_bot".into(),
            ));
        }
        if self.max_wait.as_duration() > Duration::from_secs(3600) {
            return Err(("approvals.max_wait", "must be at most 1h".into()));
        }
        Ok(())
    }
}

/// A change of an approval request, for notifications and the web page.
#[derive(Clone, Debug)]
pub struct ApprovalEvent {
    /// `ApprovalRequested`, `ApprovalGranted`, `ApprovalDenied` or `ApprovalExpired`.
    pub kind: AuditEventKind,
    pub request: ApprovalRequestView,
    /// Who decided (`None` for requests and expiry).
    pub actor: Option<String>,
    /// RFC 3339, UTC.
    pub at: String,
}

/// Who decides an approval request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Approver {
    /// The admin as decisions record them (`tailnet:alice@example.com`, `api_key:ops`).
    pub actor: String,
    /// Whose requests the admin's own identity makes: the policy bot it matches, else its
    /// description — the same as a request's owner, so self-approval is an equality.
    pub owner: String,
}

impl Approver {
    pub fn new(actor: impl Into<String>, owner: impl Into<String>) -> Approver {
        Approver {
            actor: actor.into(),
            owner: owner.into(),
        }
    }
}

/// A new approval request, as the credentials handler knows it.
#[derive(Clone, Debug)]
pub struct NewRequest {
    /// Whose request it is: the policy bot, or for callers that match none, their description.
    pub owner: String,
    pub bot: Option<String>,
    pub caller: String,
    pub resource: Resource,
    pub reason: Option<String>,
    pub rule: String,
    /// The policy's `approval_timeout` for this bot.
    pub timeout: Duration,
    /// Lifetime the credential must have when issued.
    pub min_ttl: Duration,
    /// The workspace of a `workspace`-scope LiteLLM key request.
    pub workspace: Option<WorkspaceInfo>,
    pub client_ip: Option<String>,
    /// An audit event to record just before `approval_requested`, in the same flush, with
    /// the new request's id filled in (the handler's `credential_requested`). Not recorded
    /// when the request joins an existing one.
    pub preceding: Option<AuditEvent>,
}

/// The answer of [`Approvals::request`].
#[derive(Clone, Debug)]
pub struct Requested {
    pub view: ApprovalRequestView,
    /// `false` when an identical pending request already existed and was joined.
    pub created: bool,
}

struct Entry {
    record: RequestRecord,
    expires: OffsetDateTime,
    /// Wakes waiters when the state changes.
    state: watch::Sender<ApprovalState>,
}

#[derive(Default)]
struct Book {
    requests: HashMap<String, Entry>,
    /// Dedupe key → id of the pending request.
    pending_by_key: HashMap<String, String>,
    grants: HashMap<String, GrantRecord>,
    remembered: Vec<RememberedRuleView>,
}

/// The approval service. Cheap to share behind an `Arc`.
pub struct Approvals {
    store: Arc<dyn Store>,
    audit: AuditLog,
    clock: SharedClock,
    issuer: Arc<TokenIssuer>,
    config: ApprovalsConfig,
    book: Mutex<Book>,
    rules: RwLock<Arc<RememberedRules>>,
    events: broadcast::Sender<ApprovalEvent>,
}

fn store_error(e: impl std::fmt::Display) -> ApprovalError {
    ApprovalError::Store(e.to_string())
}

fn unknown_request(id: &str) -> ApprovalError {
    ApprovalError::UnknownRequest(id.chars().take(40).collect())
}

/// Whose requests and grants a caller's are: its policy bot, else its description.
pub fn owner_of(bot: Option<&str>, caller: &crate::identity::Caller) -> String {
    bot.map_or_else(|| caller.describe(), str::to_string)
}

/// A new id: `prefix` and 8 base32 characters (40 random bits).
pub(crate) fn new_id(prefix: &str) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut n: u64 = rand::random::<u64>();
    let mut s = String::with_capacity(prefix.len() + 8);
    s.push_str(prefix);
    for _ in 0..8 {
        s.push(ALPHABET[(n & 31) as usize] as char);
        n >>= 5;
    }
    s
}

/// Check a deny reason: at most 4 KiB, printable (newline and tab allowed).
pub fn validate_deny_reason(reason: Option<&str>) -> Result<Option<String>, ApprovalError> {
    let Some(r) = reason else { return Ok(None) };
    if r.len() > MAX_DENY_REASON_BYTES {
        return Err(ApprovalError::InvalidDenyReason(format!(
            "the deny reason has {} bytes; at most {MAX_DENY_REASON_BYTES} are allowed",
            r.len()
        )));
    }
    if r.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(ApprovalError::InvalidDenyReason(
            "the deny reason has control characters (only newline and tab are allowed)".into(),
        ));
    }
    let r = r.trim();
    Ok((!r.is_empty()).then(|| r.to_string()))
}

impl Approvals {
    /// Load every stored request, grant and remembered rule. Records that no longer parse
    /// are skipped with a warning (they cannot be acted on), and old decided ones dropped.
    pub fn load(
        store: Arc<dyn Store>,
        audit: AuditLog,
        clock: SharedClock,
        issuer: Arc<TokenIssuer>,
        config: ApprovalsConfig,
    ) -> Result<Approvals, ApprovalError> {
        let now = clock.now();
        let mut book = Book::default();
        for (key, bytes) in store.list_docs(NS_REQUESTS).map_err(store_error)? {
            let record: RequestRecord = match serde_json::from_slice(&bytes) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "skipping an unreadable approval request");
                    continue;
                }
            };
            let Some(expires) = parse_time(&record.view.expires_at) else {
                tracing::warn!(key = %key, "skipping an approval request without a valid expiry");
                continue;
            };
            if record.view.state.is_decided()
                && record
                    .view
                    .decided_at
                    .as_deref()
                    .and_then(parse_time)
                    .is_some_and(|t| t + KEEP_DECIDED < now)
            {
                let _ = store.delete_doc(NS_REQUESTS, &key);
                continue;
            }
            if record.view.state == ApprovalState::Pending {
                book.pending_by_key
                    .insert(record.dedupe_key(), record.view.request_id.clone());
            }
            let (state, _) = watch::channel(record.view.state);
            book.requests.insert(
                record.view.request_id.clone(),
                Entry {
                    record,
                    expires,
                    state,
                },
            );
        }
        for (key, bytes) in store.list_docs(NS_GRANTS).map_err(store_error)? {
            match serde_json::from_slice::<GrantRecord>(&bytes) {
                Ok(g) if g.resource().is_some() => {
                    let ended = g.ended_at().is_some_and(|t| t + KEEP_DECIDED < now);
                    if ended {
                        let _ = store.delete_doc(NS_GRANTS, &key);
                    } else {
                        book.grants.insert(g.view.grant_id.clone(), g);
                    }
                }
                _ => tracing::warn!(key = %key, "skipping an unreadable grant"),
            }
        }
        for (key, bytes) in store.list_docs(NS_REMEMBERED).map_err(store_error)? {
            match serde_json::from_slice::<RememberedRuleView>(&bytes) {
                Ok(r) if Resource::from_wire(&r.resource).is_ok() => book.remembered.push(r),
                _ => tracing::warn!(key = %key, "skipping an unreadable remembered rule"),
            }
        }
        book.remembered.sort_by(|a, b| a.rule_id.cmp(&b.rule_id));
        let rules = Arc::new(compile_rules(&book.remembered));
        let (events, _) = broadcast::channel(1024);
        Ok(Approvals {
            store,
            audit,
            clock,
            issuer,
            config,
            book: Mutex::new(book),
            rules: RwLock::new(rules),
            events,
        })
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn config(&self) -> &ApprovalsConfig {
        &self.config
    }

    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// Requested / granted / denied / expired events, as they happen.
    pub fn subscribe(&self) -> broadcast::Receiver<ApprovalEvent> {
        self.events.subscribe()
    }

    /// The remembered rules, for [`crate::policy::Policy::decide_with`].
    pub fn remembered(&self) -> Arc<RememberedRules> {
        self.rules
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Every remembered rule, by id.
    pub fn remembered_views(&self) -> Vec<RememberedRuleView> {
        self.book().remembered.clone()
    }

    /// Pending requests, oldest first. Requests whose timeout passed but that the sweeper has
    /// not reached yet are left out.
    pub fn pending(&self) -> Result<Vec<ApprovalRequestView>, ApprovalError> {
        let now = self.clock.now();
        let book = self.book();
        let mut out: Vec<ApprovalRequestView> = book
            .pending_by_key
            .values()
            .filter_map(|id| book.requests.get(id))
            .filter(|e| e.expires > now)
            .map(|e| e.record.view.clone())
            .collect();
        drop(book);
        out.sort_by(|a, b| {
            (a.created_at.as_str(), a.request_id.as_str())
                .cmp(&(b.created_at.as_str(), b.request_id.as_str()))
        });
        Ok(out)
    }

    /// How many requests are pending per owner (bot).
    pub fn pending_counts(&self) -> HashMap<String, usize> {
        let now = self.clock.now();
        let book = self.book();
        let mut counts = HashMap::new();
        for id in book.pending_by_key.values() {
            if let Some(e) = book.requests.get(id)
                && e.expires > now
            {
                *counts.entry(e.record.owner.clone()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// One request, in whatever state.
    pub fn get(&self, id: &str) -> Result<ApprovalRequestView, ApprovalError> {
        self.book()
            .requests
            .get(id)
            .map(|e| e.record.view.clone())
            .ok_or_else(|| unknown_request(id))
    }

    /// One request of `owner` (the bot asking about it); another owner's is unknown.
    pub fn get_owned(&self, owner: &str, id: &str) -> Result<ApprovalRequestView, ApprovalError> {
        let book = self.book();
        match book.requests.get(id) {
            Some(e) if e.record.owner == owner => Ok(e.record.view.clone()),
            _ => Err(unknown_request(id)),
        }
    }

    /// The stored resource, minimum lifetime and workspace (for a workspace key) of a request.
    pub fn resource_of(
        &self,
        id: &str,
    ) -> Result<(Resource, Duration, Option<WorkspaceInfo>), ApprovalError> {
        let book = self.book();
        let e = book.requests.get(id).ok_or_else(|| unknown_request(id))?;
        let resource = e.record.resource().ok_or(ApprovalError::Unreadable)?;
        Ok((
            resource,
            Duration::from_secs(e.record.min_ttl_secs),
            e.record.workspace.clone(),
        ))
    }

    /// Create an approval request, or join the identical pending one of the same owner.
    pub async fn request(&self, new: NewRequest) -> Result<Requested, ApprovalError> {
        let now = self.clock.now();
        let resource_wire = new.resource.to_wire();
        let key = records::dedupe_key(&new.owner, &resource_wire, new.workspace.as_ref());
        let view = {
            let mut book = self.book();
            if let Some(id) = book.pending_by_key.get(&key)
                && let Some(e) = book.requests.get(id)
                && e.expires > now
            {
                return Ok(Requested {
                    view: e.record.view.clone(),
                    created: false,
                });
            }
            let (mine, all) = book
                .pending_by_key
                .values()
                .filter_map(|id| book.requests.get(id))
                .filter(|e| e.expires > now)
                .fold((0usize, 0usize), |(m, a), e| {
                    (m + usize::from(e.record.owner == new.owner), a + 1)
                });
            if mine >= self.config.max_pending_per_bot {
                return Err(ApprovalError::TooManyPendingForOwner(mine));
            }
            if all >= self.config.max_pending {
                return Err(ApprovalError::TooManyPending);
            }
            let id = loop {
                let id = new_id("apr_");
                if !book.requests.contains_key(&id) {
                    break id;
                }
            };
            let timeout = time::Duration::try_from(new.timeout).unwrap_or(time::Duration::DAY);
            let expires = now + timeout;
            let view = ApprovalRequestView {
                request_id: id.clone(),
                state: ApprovalState::Pending,
                bot: new.bot.clone(),
                caller: new.caller.clone(),
                resource: resource_wire,
                reason: new.reason.clone(),
                rule: new.rule.clone(),
                created_at: rfc3339(now),
                expires_at: rfc3339(expires),
                decided_by: None,
                decided_at: None,
                deny_reason: None,
                grant_id: None,
                remembered_rule: None,
                credential_id: None,
                poll_url: format!("/v1/requests/{id}"),
            };
            let record = RequestRecord {
                view: view.clone(),
                owner: new.owner.clone(),
                min_ttl_secs: new.min_ttl.as_secs(),
                workspace: new.workspace.clone(),
            };
            self.persist_request(&record)?;
            book.pending_by_key.insert(key, id.clone());
            let (state, _) = watch::channel(ApprovalState::Pending);
            book.requests.insert(
                id,
                Entry {
                    record,
                    expires,
                    state,
                },
            );
            view
        };
        let mut e = self.event(AuditEventKind::ApprovalRequested, &view, None);
        e.client_ip = new.client_ip;
        e.expires_at = Some(view.expires_at.clone());
        let mut batch = Vec::with_capacity(2);
        if let Some(mut first) = new.preceding {
            first.request_id = Some(view.request_id.clone());
            batch.push(first);
        }
        batch.push(e);
        if let Err(err) = self.audit.record(batch).await {
            tracing::error!(error = %err, "audit log write failed for an approval request");
        }
        tracing::info!(request_id = %view.request_id, bot = view.bot.as_deref().unwrap_or("-"), "approval requested");
        self.publish(AuditEventKind::ApprovalRequested, &view, None);
        Ok(Requested {
            view,
            created: true,
        })
    }

    /// Approve a pending request: it becomes `APPROVED`, a grant is created, and with
    /// `remember` an auto_approve rule for the bot and resource.
    pub async fn approve(
        &self,
        by: &Approver,
        id: &str,
        remember: bool,
    ) -> Result<DecisionAnswer, ApprovalError> {
        self.approve_checked(by, id, remember, None).await
    }

    /// [`Approvals::approve`], refusing (`wrong_bot`) when the request is not `expect_bot`'s.
    /// Every way of deciding (admin API, CLI, web page) comes here, so the self-approval
    /// refusal holds for all of them.
    pub async fn approve_checked(
        &self,
        by: &Approver,
        id: &str,
        remember: bool,
        expect_bot: Option<&str>,
    ) -> Result<DecisionAnswer, ApprovalError> {
        let actor = by.actor.as_str();
        // A request's owner never changes, so this check outside the decision lock holds.
        let own = {
            let book = self.book();
            book.requests
                .get(id)
                .filter(|e| {
                    e.record.owner == by.owner && e.record.view.state == ApprovalState::Pending
                })
                .map(|e| e.record.view.clone())
        };
        if let Some(view) = own
            && !self.config.allow_self_approval
        {
            let error = ApprovalError::SelfApproval(format!(
                "{actor} made request {id} (as {}), so another admin must approve it",
                by.owner
            ));
            self.refuse_decision(by, Ok(&view), &error).await;
            return Err(error);
        }
        let now = self.clock.now();
        let decided = {
            let mut book = self.book();
            self.decidable(&mut book, id, expect_bot, now)?;
            let entry = book.requests.get(id).ok_or_else(|| unknown_request(id))?;
            let mut record = entry.record.clone();
            let resource = record.resource().ok_or(ApprovalError::Unreadable)?;
            let remembered = match (remember, &record.view.bot) {
                (false, _) => None,
                (true, None) => {
                    return Err(ApprovalError::NoBotToRemember);
                }
                (true, Some(bot)) => Some(RememberedRuleView {
                    rule_id: new_id("rem_"),
                    bot: bot.clone(),
                    resource: resource.to_wire(),
                    request_id: id.to_string(),
                    created_by: actor.to_string(),
                    created_at: rfc3339(now),
                }),
            };
            let grant_expires = now
                + time::Duration::try_from(self.config.grant_ttl.as_duration())
                    .unwrap_or(time::Duration::HOUR);
            let grant = GrantRecord {
                view: GrantView {
                    grant_id: new_id("gr_"),
                    bot: record.view.bot.clone(),
                    caller: record.view.caller.clone(),
                    resource: resource.to_wire(),
                    request_id: id.to_string(),
                    approved_by: actor.to_string(),
                    created_at: rfc3339(now),
                    expires_at: rfc3339(grant_expires),
                    revoked_at: None,
                    revoked_by: None,
                },
                owner: record.owner.clone(),
            };
            record.view.state = ApprovalState::Approved;
            record.view.decided_by = Some(actor.to_string());
            record.view.decided_at = Some(rfc3339(now));
            record.view.grant_id = Some(grant.view.grant_id.clone());
            record.view.remembered_rule = remembered.as_ref().map(|r| r.rule_id.clone());

            // Write the grant and rule first: a request marked approved always has them.
            self.persist_grant(&grant)?;
            if let Some(r) = &remembered {
                self.put_doc(NS_REMEMBERED, &r.rule_id, r)?;
            }
            if let Err(e) = self.persist_request(&record) {
                let _ = self.store.delete_doc(NS_GRANTS, &grant.view.grant_id);
                if let Some(r) = &remembered {
                    let _ = self.store.delete_doc(NS_REMEMBERED, &r.rule_id);
                }
                return Err(e);
            }
            book.pending_by_key.remove(&record.dedupe_key());
            book.grants
                .insert(grant.view.grant_id.clone(), grant.clone());
            if let Some(r) = &remembered {
                book.remembered.push(r.clone());
                book.remembered.sort_by(|a, b| a.rule_id.cmp(&b.rule_id));
                *self.rules.write().unwrap_or_else(PoisonError::into_inner) =
                    Arc::new(compile_rules(&book.remembered));
            }
            let view = record.view.clone();
            if let Some(e) = book.requests.get_mut(id) {
                e.record = record;
                e.state.send_replace(ApprovalState::Approved);
            }
            DecisionAnswer {
                request: view,
                grant: Some(grant.view),
                remembered,
            }
        };
        let mut events = vec![self.event(
            AuditEventKind::ApprovalGranted,
            &decided.request,
            Some(actor),
        )];
        let how = crate::issued::Approval::Manual {
            request_id: decided.request.request_id.clone(),
        };
        events[0].approval = Some(how.as_str().to_string());
        if let Some(g) = &decided.grant {
            events[0].expires_at = Some(g.expires_at.clone());
            events[0].detail = Some(format!("grant {}", g.grant_id));
        }
        if let Some(r) = &decided.remembered {
            let mut e = self.event(
                AuditEventKind::RuleRemembered,
                &decided.request,
                Some(actor),
            );
            e.rule = Some(format!("bots.{}.remembered[{}]", r.bot, r.rule_id));
            events.push(e);
        }
        if let Err(err) = self.audit.record(events).await {
            tracing::error!(error = %err, "audit log write failed for an approval");
        }
        tracing::info!(request_id = %id, actor = %actor, remember, "approval granted");
        self.publish(
            AuditEventKind::ApprovalGranted,
            &decided.request,
            Some(actor),
        );
        Ok(decided)
    }

    /// Deny a pending request, with an optional reason the bot is shown (≤ 4 KiB).
    pub async fn deny(
        &self,
        actor: &str,
        id: &str,
        reason: Option<&str>,
    ) -> Result<DecisionAnswer, ApprovalError> {
        self.deny_checked(actor, id, reason, None).await
    }

    /// [`Approvals::deny`], refusing (`wrong_bot`) when the request is not `expect_bot`'s.
    pub async fn deny_checked(
        &self,
        actor: &str,
        id: &str,
        reason: Option<&str>,
        expect_bot: Option<&str>,
    ) -> Result<DecisionAnswer, ApprovalError> {
        let reason = validate_deny_reason(reason)?;
        let now = self.clock.now();
        let view = {
            let mut book = self.book();
            self.decidable(&mut book, id, expect_bot, now)?;
            let entry = book.requests.get(id).ok_or_else(|| unknown_request(id))?;
            let mut record = entry.record.clone();
            record.view.state = ApprovalState::Denied;
            record.view.decided_by = Some(actor.to_string());
            record.view.decided_at = Some(rfc3339(now));
            record.view.deny_reason = reason.clone();
            self.persist_request(&record)?;
            book.pending_by_key.remove(&record.dedupe_key());
            let view = record.view.clone();
            if let Some(e) = book.requests.get_mut(id) {
                e.record = record;
                e.state.send_replace(ApprovalState::Denied);
            }
            view
        };
        let mut e = self.event(AuditEventKind::ApprovalDenied, &view, Some(actor));
        e.detail = reason;
        if let Err(err) = self.audit.record(vec![e]).await {
            tracing::error!(error = %err, "audit log write failed for a denial");
        }
        tracing::info!(request_id = %id, actor = %actor, "approval denied");
        self.publish(AuditEventKind::ApprovalDenied, &view, Some(actor));
        Ok(DecisionAnswer {
            request: view,
            grant: None,
            remembered: None,
        })
    }

    /// Decide `DENIED` every pending request for which `reason_for` gives a reason, as
    /// `actor`: persisted before memory changes, then audited and published like an admin's
    /// denial (so notifications go out and waiting bots hear it). Answers the denied views.
    fn deny_where(
        &self,
        actor: &str,
        reason_for: impl Fn(&RequestRecord) -> Option<String>,
    ) -> Vec<ApprovalRequestView> {
        let now = self.clock.now();
        let mut book = self.book();
        let chosen: Vec<(String, String)> = book
            .pending_by_key
            .values()
            .filter_map(|id| book.requests.get(id))
            .filter(|e| e.expires > now)
            .filter_map(|e| Some((e.record.view.request_id.clone(), reason_for(&e.record)?)))
            .collect();
        let mut denied = Vec::with_capacity(chosen.len());
        for (id, reason) in chosen {
            let Some(entry) = book.requests.get(&id) else {
                continue;
            };
            let mut record = entry.record.clone();
            record.view.state = ApprovalState::Denied;
            record.view.decided_by = Some(actor.to_string());
            record.view.decided_at = Some(rfc3339(now));
            record.view.deny_reason =
                Some(reason.chars().take(MAX_DENY_REASON_BYTES / 4).collect());
            if let Err(e) = self.persist_request(&record) {
                // Still pending, and approving it is refused at the mint (policy_denied).
                tracing::error!(request_id = %id, code = %e.code(), error = %e, "could not persist a denial");
                continue;
            }
            book.pending_by_key.remove(&record.dedupe_key());
            let view = record.view.clone();
            if let Some(e) = book.requests.get_mut(&id) {
                e.record = record;
                e.state.send_replace(ApprovalState::Denied);
            }
            denied.push(view);
        }
        denied
    }

    /// Audit and publish denials [`Approvals::deny_where`] made.
    async fn announce_denials(&self, actor: &str, denied: &[ApprovalRequestView]) {
        if denied.is_empty() {
            return;
        }
        let events = denied
            .iter()
            .map(|v| {
                let mut e = self.event(AuditEventKind::ApprovalDenied, v, Some(actor));
                e.detail = v.deny_reason.clone();
                e
            })
            .collect();
        if let Err(err) = self.audit.record(events).await {
            tracing::error!(error = %err, "audit log write failed for denials");
        }
        for v in denied {
            tracing::info!(request_id = %v.request_id, actor = %actor, "approval denied");
            self.publish(AuditEventKind::ApprovalDenied, v, Some(actor));
        }
    }

    /// Audit a refused decision (`approval_refused`, with the refusal's code) about one
    /// request, or (`Err(bot)`) about all of a bot's.
    async fn refuse_decision(
        &self,
        by: &Approver,
        subject: Result<&ApprovalRequestView, &str>,
        error: &ApprovalError,
    ) {
        let mut e = match subject {
            Ok(v) => self.event(AuditEventKind::ApprovalRefused, v, Some(&by.actor)),
            Err(bot) => {
                let mut e = AuditEvent::new(
                    AuditEventKind::ApprovalRefused,
                    rfc3339_millis(self.clock.now()),
                );
                e.caller = Some(by.actor.clone());
                e.bot = Some(bot.to_string());
                e
            }
        };
        e.code = Some(error.code().as_str().to_string());
        e.detail = Some(crate::issued::denial_detail(&error.to_string()));
        if let Err(err) = self.audit.record(vec![e]).await {
            tracing::error!(error = %err, "audit log write failed for a refused decision");
        }
        tracing::warn!(actor = %by.actor, code = %error.code(), "approval decision refused");
    }

    /// Approve every pending request of `bot`.
    pub async fn approve_all(
        &self,
        by: &Approver,
        bot: &str,
        remember: bool,
    ) -> Result<Vec<DecisionAnswer>, ApprovalError> {
        if by.owner == bot && !self.config.allow_self_approval {
            let error = ApprovalError::SelfApproval(format!(
                "{} is {bot} itself, so another admin must approve its requests",
                by.actor
            ));
            self.refuse_decision(by, Err(bot), &error).await;
            return Err(error);
        }
        let ids: Vec<String> = self
            .pending()?
            .into_iter()
            .filter(|v| v.bot.as_deref() == Some(bot))
            .map(|v| v.request_id)
            .collect();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match self.approve_checked(by, &id, remember, Some(bot)).await {
                Ok(d) => out.push(d),
                // Decided or expired meanwhile: not this command's to report.
                Err(ApprovalError::AlreadyDecided(_) | ApprovalError::Expired { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Check, under the lock, that request `id` may be decided now; a pending request whose
    /// timeout has passed is expired on the spot.
    fn decidable(
        &self,
        book: &mut Book,
        id: &str,
        expect_bot: Option<&str>,
        now: OffsetDateTime,
    ) -> Result<(), ApprovalError> {
        let entry = book.requests.get(id).ok_or_else(|| unknown_request(id))?;
        if let Some(bot) = expect_bot
            && entry.record.view.bot.as_deref() != Some(bot)
        {
            return Err(ApprovalError::WrongBot(format!(
                "request {id} belongs to {}, not {bot}",
                entry
                    .record
                    .view
                    .bot
                    .as_deref()
                    .unwrap_or("a caller matching no bot")
            )));
        }
        match entry.record.view.state {
            ApprovalState::Pending if entry.expires <= now => {
                // The sweeper publishes the expiry; here it only must not be approved.
                Err(ApprovalError::Expired {
                    id: id.to_string(),
                    at: entry.record.view.expires_at.clone(),
                })
            }
            ApprovalState::Pending => Ok(()),
            ApprovalState::Expired => Err(ApprovalError::Expired {
                id: id.to_string(),
                at: entry.record.view.expires_at.clone(),
            }),
            s => Err(ApprovalError::AlreadyDecided(format!(
                "request {id} is already {s} (by {})",
                entry.record.view.decided_by.as_deref().unwrap_or("someone")
            ))),
        }
    }

    /// Expire every pending request whose timeout has passed (the background sweeper calls
    /// this; tests call it after moving the clock). Returns how many expired.
    pub async fn sweep(&self) -> usize {
        let now = self.clock.now();
        let mut expired = Vec::new();
        {
            let mut book = self.book();
            let due: Vec<String> = book
                .pending_by_key
                .values()
                .filter(|id| book.requests.get(*id).is_some_and(|e| e.expires <= now))
                .cloned()
                .collect();
            for id in due {
                let Some(entry) = book.requests.get(&id) else {
                    continue;
                };
                let mut record = entry.record.clone();
                record.view.state = ApprovalState::Expired;
                record.view.decided_by = Some("clock".into());
                record.view.decided_at = Some(rfc3339(now));
                if let Err(e) = self.persist_request(&record) {
                    tracing::error!(request_id = %id, code = %e.code(), error = %e, "could not persist an expiry; retrying on the next sweep");
                    continue;
                }
                book.pending_by_key.remove(&record.dedupe_key());
                let view = record.view.clone();
                if let Some(e) = book.requests.get_mut(&id) {
                    e.record = record;
                    e.state.send_replace(ApprovalState::Expired);
                }
                expired.push(view);
            }
            // Forget old decided requests and ended grants.
            let old: Vec<String> = book
                .requests
                .iter()
                .filter(|(_, e)| {
                    e.record.view.state.is_decided()
                        && e.record
                            .view
                            .decided_at
                            .as_deref()
                            .and_then(parse_time)
                            .is_some_and(|t| t + KEEP_DECIDED < now)
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in old {
                if self.store.delete_doc(NS_REQUESTS, &id).is_ok() {
                    book.requests.remove(&id);
                }
            }
            let old: Vec<String> = book
                .grants
                .iter()
                .filter(|(_, g)| g.ended_at().is_some_and(|t| t + KEEP_DECIDED < now))
                .map(|(id, _)| id.clone())
                .collect();
            for id in old {
                if self.store.delete_doc(NS_GRANTS, &id).is_ok() {
                    book.grants.remove(&id);
                }
            }
        }
        if expired.is_empty() {
            return 0;
        }
        let events = expired
            .iter()
            .map(|v| self.event(AuditEventKind::ApprovalExpired, v, None))
            .collect();
        if let Err(err) = self.audit.record(events).await {
            tracing::error!(error = %err, "audit log write failed for expiries");
        }
        for v in &expired {
            tracing::info!(request_id = %v.request_id, "approval request expired");
            self.publish(AuditEventKind::ApprovalExpired, v, None);
        }
        expired.len()
    }

    /// Run [`Approvals::sweep`] every `sweep_interval` until `stop` turns true.
    pub async fn run_sweeper(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.config.sweep_interval.as_duration());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => { self.sweep().await; }
                r = stop.changed() => if r.is_err() || *stop.borrow() { return; },
            }
        }
    }

    /// Wait up to `wait` for request `id` to leave `PENDING`; its view then (or still
    /// pending). Expires the request on the spot when its timeout passes during the wait.
    pub async fn wait_decided(
        &self,
        id: &str,
        wait: Duration,
    ) -> Result<ApprovalRequestView, ApprovalError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let (mut rx, expires) = {
                let book = self.book();
                let e = book.requests.get(id).ok_or_else(|| unknown_request(id))?;
                if e.record.view.state.is_decided() {
                    return Ok(e.record.view.clone());
                }
                (e.state.subscribe(), e.expires)
            };
            let now = self.clock.now();
            if expires <= now {
                self.sweep().await;
                let view = self.get(id)?;
                if view.state.is_decided() {
                    return Ok(view);
                }
            }
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                return self.get(id);
            }
            // Wake at the expiry too, so a waiting bot hears of it without the sweeper.
            let until_expiry = Duration::try_from(expires - now).unwrap_or(Duration::ZERO)
                + Duration::from_millis(5);
            let nap = remaining.min(until_expiry);
            let _ = tokio::time::timeout(nap, rx.wait_for(|s| s.is_decided())).await;
        }
    }

    /// Mark an approved request `ISSUED` with the first credential issued under it.
    pub fn mark_issued(&self, id: &str, credential_id: &str) -> Result<(), ApprovalError> {
        let mut book = self.book();
        let Some(entry) = book.requests.get(id) else {
            return Err(unknown_request(id));
        };
        if entry.record.view.state != ApprovalState::Approved {
            return Ok(());
        }
        let mut record = entry.record.clone();
        record.view.state = ApprovalState::Issued;
        record.view.credential_id = Some(credential_id.to_string());
        self.persist_request(&record)?;
        if let Some(e) = book.requests.get_mut(id) {
            e.record = record;
            e.state.send_replace(ApprovalState::Issued);
        }
        Ok(())
    }

    /// A live grant of `owner` that covers `request`.
    pub fn covering_grant(&self, owner: &str, request: &Request<'_>) -> Option<GrantView> {
        let now = self.clock.now();
        self.book()
            .grants
            .values()
            .filter(|g| g.owner == owner && g.is_live(now))
            .find(|g| g.resource().is_some_and(|r| r.covers(request)))
            .map(|g| g.view.clone())
    }

    /// Whether grant `id` is live.
    pub fn grant_is_live(&self, id: &str) -> bool {
        let now = self.clock.now();
        self.book().grants.get(id).is_some_and(|g| g.is_live(now))
    }

    /// Grants, newest first; ended (revoked or expired) ones only with `include_ended`.
    pub fn grants(&self, include_ended: bool) -> Vec<GrantView> {
        let now = self.clock.now();
        let mut out: Vec<GrantView> = self
            .book()
            .grants
            .values()
            .filter(|g| include_ended || g.is_live(now))
            .map(|g| g.view.clone())
            .collect();
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at));
        out
    }

    /// Remove a remembered rule.
    pub async fn forget(
        &self,
        actor: &str,
        rule_id: &str,
    ) -> Result<RememberedRuleView, ApprovalError> {
        let removed = {
            let mut book = self.book();
            let Some(pos) = book.remembered.iter().position(|r| r.rule_id == rule_id) else {
                return Err(ApprovalError::UnknownRule(
                    rule_id.chars().take(40).collect(),
                ));
            };
            self.store
                .delete_doc(NS_REMEMBERED, rule_id)
                .map_err(store_error)?;
            let removed = book.remembered.remove(pos);
            *self.rules.write().unwrap_or_else(PoisonError::into_inner) =
                Arc::new(compile_rules(&book.remembered));
            removed
        };
        let mut e = AuditEvent::new(
            AuditEventKind::RuleForgotten,
            rfc3339_millis(self.clock.now()),
        );
        e.bot = Some(removed.bot.clone());
        e.caller = Some(actor.to_string());
        e.request_id = Some(removed.request_id.clone());
        e.rule = Some(format!(
            "bots.{}.remembered[{}]",
            removed.bot, removed.rule_id
        ));
        fill_resource(&mut e, &removed.resource);
        if let Err(err) = self.audit.record(vec![e]).await {
            tracing::error!(error = %err, "audit log write failed for a forgotten rule");
        }
        tracing::info!(rule_id = %rule_id, actor = %actor, "remembered rule forgotten");
        Ok(removed)
    }

    fn persist_request(&self, record: &RequestRecord) -> Result<(), ApprovalError> {
        self.put_doc(NS_REQUESTS, &record.view.request_id, record)
    }

    fn persist_grant(&self, grant: &GrantRecord) -> Result<(), ApprovalError> {
        self.put_doc(NS_GRANTS, &grant.view.grant_id, grant)
    }

    fn put_doc<T: serde::Serialize>(
        &self,
        ns: &str,
        key: &str,
        value: &T,
    ) -> Result<(), ApprovalError> {
        let bytes = serde_json::to_vec(value).map_err(store_error)?;
        self.store.put_doc(ns, key, &bytes).map_err(store_error)
    }

    /// An audit event about a request.
    fn event(
        &self,
        kind: AuditEventKind,
        view: &ApprovalRequestView,
        actor: Option<&str>,
    ) -> AuditEvent {
        let mut e = AuditEvent::new(kind, rfc3339_millis(self.clock.now()));
        e.bot = view.bot.clone();
        e.caller = Some(match actor {
            Some(a) => a.to_string(),
            None => view.caller.clone(),
        });
        e.request_id = Some(view.request_id.clone());
        e.rule = Some(view.rule.clone());
        e.reason = view.reason.clone();
        fill_resource(&mut e, &view.resource);
        e
    }

    fn publish(&self, kind: AuditEventKind, view: &ApprovalRequestView, actor: Option<&str>) {
        // No subscribers is fine: notifications are optional.
        let _ = self.events.send(ApprovalEvent {
            kind,
            request: view.clone(),
            actor: actor.map(str::to_string),
            at: rfc3339(self.clock.now()),
        });
    }
}

/// Fill an event's resource fields: a token's repositories and permissions, or a key's scope.
pub fn fill_resource(e: &mut AuditEvent, resource: &botcreds_proto::approval::ApprovalResource) {
    match resource {
        botcreds_proto::approval::ApprovalResource::GithubToken {
            repositories,
            permissions,
        } => {
            e.repositories = repositories.clone();
            if let [only] = repositories.as_slice() {
                e.repo = Some(only.clone());
            }
            e.permissions = permissions.clone();
        }
        botcreds_proto::approval::ApprovalResource::LitellmKey { scope } => {
            e.detail = Some(format!("litellm scope {scope}"));
        }
        botcreds_proto::approval::ApprovalResource::DeployKey {
            repository,
            permission,
        } => {
            e.kind = Some(
                botcreds_proto::CredentialKind::DeployKey
                    .as_str()
                    .to_string(),
            );
            e.repositories = vec![repository.clone()];
            e.repo = Some(repository.clone());
            e.permissions = vec![permission.clone()];
        }
    }
}

fn compile_rules(views: &[RememberedRuleView]) -> RememberedRules {
    RememberedRules::new(views.iter().filter_map(|v| {
        Some(RememberedRule {
            id: v.rule_id.clone(),
            bot: v.bot.clone(),
            resource: Resource::from_wire(&v.resource).ok()?,
        })
    }))
}
