//! Revocation: kill live GitHub tokens at GitHub, drop them from the reuse cache, and end the
//! grants that would refresh them (or those of a revoked LiteLLM key), so nothing comes back
//! without a new approval. A (re)loaded policy is enforced here too: whatever it denies that
//! earlier decisions left live — tokens, LiteLLM keys, grants, pending requests — ends.
//!
//! Who holds a token is read from the audit log (`credential_issued` events of the last two
//! hours; installation tokens live one hour), because the reuse cache shares one token among
//! every bot that asks for the same scope.

use std::collections::{BTreeSet, HashMap};

use botcreds_proto::RepoName;
use botcreds_proto::approval::{GrantView, RevokeAnswer, RevokedCredential};
use botcreds_proto::audit::{AuditEvent, AuditEventKind};
use botcreds_proto::litellm::KeyStatus;

use super::ApprovalError;
use super::records::GrantRecord;
use super::{Approvals, NS_GRANTS};
use crate::clock::{rfc3339, rfc3339_millis};
use crate::grants::{HandedOut, IssuedToken};
use crate::policy::remembered::Resource;
use crate::policy::{Outcome, Policy, Request};

use crate::store::AuditFilter;

/// Who ends what a reloaded policy denies, as `revoked_by`, `decided_by` and the audit's caller.
const POLICY_ACTOR: &str = "policy";

/// What enforcing a (re)loaded policy ended because the policy now denies it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyEnforced {
    /// GitHub tokens (`tok_...`) and LiteLLM keys (`lk_...`) revoked.
    pub credentials_revoked: Vec<String>,
    pub grants_ended: Vec<String>,
    /// Pending approval requests decided `DENIED`.
    pub requests_denied: Vec<String>,
}

/// Revoke every live LiteLLM key whose bot `policy` denies the key's scope, through the key
/// service's revocation (deleted in LiteLLM, audited). Answers their ids.
async fn revoke_denied_keys(policy: &Policy, keys: &crate::keys::KeyService) -> Vec<String> {
    let listed = match keys.list() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(code = %e.code(), error = %e, "could not list LiteLLM keys to enforce the policy");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for k in listed.iter().filter(|k| k.status == KeyStatus::Active) {
        let Some(bot) = k.bot.as_deref() else {
            continue;
        };
        let request = Request::Litellm { scope: &k.scope };
        if policy.decide_for_bot(Some(bot), &request).outcome != Outcome::Deny {
            continue;
        }
        match keys
            .revoke_by_credential_id(&k.credential_id, crate::keys::Revoker::Policy)
            .await
        {
            Ok(Some(_)) => {
                tracing::info!(credential_id = %k.credential_id, bot, "LiteLLM key revoked: the policy now denies it");
                out.push(k.credential_id.clone());
            }
            // Ended meanwhile.
            Ok(None) => {}
            Err(e) => {
                tracing::error!(credential_id = %k.credential_id, code = %e.code(), error = %e, "could not revoke a LiteLLM key the policy now denies");
            }
        }
    }
    out
}

/// What to revoke.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RevokeTarget {
    /// One live credential, by its `tok_...` id.
    Credential(String),
    /// Everything a bot holds, and its grants.
    Bot(String),
    /// Every live token reaching a repository, and every grant touching it.
    Repo(RepoName),
}

impl Approvals {
    /// Revoke `target`. A credential id the broker holds no live token for is
    /// `unknown_credential`; a bot or repository with nothing live revokes nothing.
    pub async fn revoke(
        &self,
        actor: &str,
        target: &RevokeTarget,
    ) -> Result<RevokeAnswer, ApprovalError> {
        let now = self.clock.now();
        let mut holders = self.holders(now)?;
        let picked: Vec<HandedOut> = match target {
            RevokeTarget::Credential(id) => {
                self.issuer.take_where(|h| h.token.credential_id == *id)
            }
            RevokeTarget::Bot(bot) => self.issuer.take_where(|h| {
                h.holders.contains(bot)
                    || holders
                        .get(&h.token.credential_id)
                        .is_some_and(|a| a.contains(bot))
            }),
            RevokeTarget::Repo(repo) => {
                let name = repo.to_string();
                self.issuer.take_where(|h| {
                    h.token
                        .repositories
                        .iter()
                        .any(|r| r.eq_ignore_ascii_case(&name))
                })
            }
        };
        // Who holds each: the issuer's record, and the audit log's.
        for h in &picked {
            holders
                .entry(h.token.credential_id.clone())
                .or_default()
                .extend(h.holders.iter().cloned());
        }
        let picked: Vec<IssuedToken> = picked.into_iter().map(|h| h.token).collect();
        if let RevokeTarget::Credential(id) = target
            && picked.is_empty()
        {
            return Err(ApprovalError::UnknownCredential(
                id.chars().take(40).collect(),
            ));
        }

        // End the grants that would refresh what was revoked.
        let token_owners: BTreeSet<&str> = picked
            .iter()
            .filter_map(|t| holders.get(&t.credential_id))
            .flatten()
            .map(String::as_str)
            .collect();
        let token_repos: Vec<RepoName> = picked
            .iter()
            .flat_map(|t| t.repositories.iter())
            .filter_map(|r| r.parse::<RepoName>().ok())
            .collect();
        let ended = self.end_grants(actor, now, |g| match target {
            RevokeTarget::Bot(bot) => g.owner == *bot || g.view.bot.as_deref() == Some(bot),
            RevokeTarget::Repo(repo) => g.resource().is_some_and(|r| r.touches_repo(repo)),
            RevokeTarget::Credential(_) => {
                token_owners.contains(g.owner.as_str())
                    && g.resource()
                        .is_some_and(|r| token_repos.iter().any(|t| r.touches_repo(t)))
            }
        })?;

        let mut revoked = Vec::with_capacity(picked.len());
        let mut events = Vec::new();
        for t in &picked {
            let (ok, error) = match self
                .issuer
                .github()
                .revoke_installation_token(&t.token)
                .await
            {
                Ok(()) => (true, None),
                Err(e) => {
                    tracing::warn!(credential_id = %t.credential_id, error = %e, "GitHub did not confirm a revocation");
                    (false, Some(e.to_string()))
                }
            };
            let holders: Vec<String> = holders
                .get(&t.credential_id)
                .map(|h| h.iter().cloned().collect())
                .unwrap_or_default();
            let mut e = AuditEvent::new(
                AuditEventKind::CredentialRevoked,
                rfc3339_millis(self.clock.now()),
            );
            e.caller = Some(actor.to_string());
            e.bot = holders.first().cloned();
            e.token_id = Some(t.credential_id.clone());
            e.repositories = t.repositories.clone();
            e.expires_at = Some(rfc3339(t.expires_at));
            e.detail = Some(match &error {
                None => format!("revoked at GitHub; holders: {}", holders.join(",")),
                Some(err) => format!("dropped, but GitHub did not confirm: {err}"),
            });
            events.push(e);
            revoked.push(RevokedCredential {
                credential_id: t.credential_id.clone(),
                repositories: t.repositories.clone(),
                holders,
                expires_at: rfc3339(t.expires_at),
                revoked_upstream: ok,
                error,
            });
        }
        events.extend(self.grant_events(actor, &ended));
        if let Err(err) = self.audit.record(events).await {
            tracing::error!(error = %err, "audit log write failed for a revocation");
        }
        tracing::info!(
            actor = %actor,
            credentials = revoked.len(),
            grants = ended.len(),
            "revocation"
        );
        Ok(RevokeAnswer {
            revoked,
            grants_ended: ended.into_iter().map(|g| g.grant_id).collect(),
        })
    }

    /// Enforce `policy` (just loaded, at a reload or at startup) on what earlier decisions
    /// left behind — deny wins over earlier allows and approvals: revoke every live GitHub
    /// token one of whose holders it denies (at GitHub, dropped from the reuse cache), and
    /// with `keys` every live LiteLLM key whose bot it denies the scope; end the grants it
    /// denies; decide `DENIED` the pending requests it denies. Each change is audited with
    /// `caller: policy`.
    pub async fn enforce_policy(
        &self,
        policy: &Policy,
        keys: Option<&crate::keys::KeyService>,
    ) -> PolicyEnforced {
        let mut credentials_revoked = self.revoke_denied_tokens(policy).await;
        if let Some(keys) = keys {
            credentials_revoked.extend(revoke_denied_keys(policy, keys).await);
        }
        let grants_ended = self.end_denied_grants(policy).await;
        let denied = self.deny_where(POLICY_ACTOR, |r| {
            let resource = r.resource()?;
            let d = policy.decide_for_bot(r.view.bot.as_deref(), &resource.as_request());
            (d.outcome == Outcome::Deny)
                .then(|| format!("the policy now denies it: {}", d.explanation))
        });
        self.announce_denials(POLICY_ACTOR, &denied).await;
        PolicyEnforced {
            credentials_revoked,
            grants_ended,
            requests_denied: denied.into_iter().map(|v| v.request_id).collect(),
        }
    }

    /// Revoke every live token handed out to someone `policy` denies its scope: taken from
    /// the issuer (so never answered again), revoked at GitHub, audited. Answers their ids.
    async fn revoke_denied_tokens(&self, policy: &Policy) -> Vec<String> {
        let denied_to = |h: &HandedOut| -> Vec<String> {
            let request = Request::Github {
                repositories: &h.scope.repositories,
                permissions: &h.scope.permissions,
            };
            h.holders
                .iter()
                .filter(|who| policy.decide_for_bot(Some(who), &request).outcome == Outcome::Deny)
                .cloned()
                .collect()
        };
        let taken = self.issuer.take_where(|h| !denied_to(h).is_empty());
        let mut events = Vec::with_capacity(taken.len());
        let mut ids = Vec::with_capacity(taken.len());
        for h in &taken {
            let denied = denied_to(h);
            let t = &h.token;
            let error = self
                .issuer
                .github()
                .revoke_installation_token(&t.token)
                .await
                .err();
            let holders: Vec<&str> = h.holders.iter().map(String::as_str).collect();
            let mut e = AuditEvent::new(
                AuditEventKind::CredentialRevoked,
                rfc3339_millis(self.clock.now()),
            );
            e.caller = Some(POLICY_ACTOR.to_string());
            e.bot = denied.first().cloned();
            e.token_id = Some(t.credential_id.clone());
            e.repositories = t.repositories.clone();
            e.permissions = h
                .scope
                .permissions
                .iter()
                .map(ToString::to_string)
                .collect();
            e.expires_at = Some(rfc3339(t.expires_at));
            e.reason = Some("the policy now denies it".into());
            e.detail = Some(match &error {
                None => format!(
                    "revoked at GitHub: the policy now denies it to {}; holders: {}",
                    denied.join(","),
                    holders.join(",")
                ),
                Some(err) => format!(
                    "dropped (the policy now denies it to {}), but GitHub did not confirm the revocation: {err}",
                    denied.join(",")
                ),
            });
            if let Some(err) = &error {
                tracing::warn!(credential_id = %t.credential_id, error = %err, "GitHub did not confirm a revocation");
            }
            tracing::info!(credential_id = %t.credential_id, denied = %denied.join(","), "token revoked: the policy now denies it");
            events.push(e);
            ids.push(t.credential_id.clone());
        }
        if !events.is_empty()
            && let Err(err) = self.audit.record(events).await
        {
            tracing::error!(error = %err, "audit log write failed for tokens the policy revoked");
        }
        ids
    }

    /// End every live grant that `policy` denies. Answers the ended grants' ids; each gets a
    /// `grant_revoked` event.
    async fn end_denied_grants(&self, policy: &Policy) -> Vec<String> {
        let now = self.clock.now();
        let denied = |g: &GrantRecord| {
            g.resource().is_some_and(|r| {
                policy
                    .decide_for_bot(g.view.bot.as_deref(), &r.as_request())
                    .outcome
                    == Outcome::Deny
            })
        };
        let ended = match self.end_grants(POLICY_ACTOR, now, denied) {
            Ok(ended) => ended,
            Err(e) => {
                // Minting re-decides against the current policy too, so a grant left live
                // here still hands out nothing the policy denies.
                tracing::error!(code = %e.code(), error = %e, "could not end grants the reloaded policy denies");
                return Vec::new();
            }
        };
        if ended.is_empty() {
            return Vec::new();
        }
        let mut events = self.grant_events(POLICY_ACTOR, &ended);
        for e in &mut events {
            e.detail = Some(format!(
                "{}: ended because the policy now denies it",
                e.detail.as_deref().unwrap_or("grant")
            ));
        }
        if let Err(err) = self.audit.record(events).await {
            tracing::error!(error = %err, "audit log write failed for grants the policy ended");
        }
        for g in &ended {
            tracing::info!(grant_id = %g.grant_id, bot = g.bot.as_deref().unwrap_or("-"), "grant ended: the policy now denies it");
        }
        ended.into_iter().map(|g| g.grant_id).collect()
    }

    /// End the live grants of `owner` for `resource` (a revoked LiteLLM key's), so nothing
    /// hands out another without a new approval. Answers the ended grants' ids.
    pub async fn end_grants_for(
        &self,
        actor: &str,
        owner: &str,
        resource: &Resource,
    ) -> Result<Vec<String>, ApprovalError> {
        let now = self.clock.now();
        let ended = self.end_grants(actor, now, |g| {
            g.owner == owner && g.resource().as_ref() == Some(resource)
        })?;
        if ended.is_empty() {
            return Ok(Vec::new());
        }
        if let Err(err) = self.audit.record(self.grant_events(actor, &ended)).await {
            tracing::error!(error = %err, "audit log write failed for ended grants");
        }
        tracing::info!(actor = %actor, grants = ended.len(), "grants ended");
        Ok(ended.into_iter().map(|g| g.grant_id).collect())
    }

    /// Mark every live grant that `pick` chooses revoked, persisted before memory changes.
    fn end_grants(
        &self,
        actor: &str,
        now: time::OffsetDateTime,
        pick: impl Fn(&GrantRecord) -> bool,
    ) -> Result<Vec<GrantView>, ApprovalError> {
        let mut book = self.book();
        let chosen: Vec<String> = book
            .grants
            .values()
            .filter(|g| g.is_live(now) && pick(g))
            .map(|g| g.view.grant_id.clone())
            .collect();
        let mut ended = Vec::new();
        for id in chosen {
            let Some(g) = book.grants.get(&id) else {
                continue;
            };
            let mut g = g.clone();
            g.view.revoked_at = Some(rfc3339(now));
            g.view.revoked_by = Some(actor.to_string());
            let bytes = serde_json::to_vec(&g).map_err(super::store_error)?;
            self.store
                .put_doc(NS_GRANTS, &id, &bytes)
                .map_err(super::store_error)?;
            book.grants.insert(id, g.clone());
            ended.push(g.view);
        }
        Ok(ended)
    }

    /// `grant_revoked` audit events for ended grants.
    fn grant_events(&self, actor: &str, ended: &[GrantView]) -> Vec<AuditEvent> {
        ended
            .iter()
            .map(|g| {
                let mut e = AuditEvent::new(
                    AuditEventKind::GrantRevoked,
                    rfc3339_millis(self.clock.now()),
                );
                e.caller = Some(actor.to_string());
                e.bot = g.bot.clone();
                e.request_id = Some(g.request_id.clone());
                e.detail = Some(format!("grant {}", g.grant_id));
                super::fill_resource(&mut e, &g.resource);
                e
            })
            .collect()
    }

    /// credential id → bots it was handed to, from recent `credential_issued` events.
    fn holders(
        &self,
        now: time::OffsetDateTime,
    ) -> Result<HashMap<String, BTreeSet<String>>, ApprovalError> {
        let filter = AuditFilter {
            since: Some(rfc3339_millis(now - time::Duration::hours(2))),
            event: Some(AuditEventKind::CredentialIssued),
            ..AuditFilter::default()
        };
        let events = self
            .audit
            .read(&filter)
            .map_err(|e| ApprovalError::AuditRead(e.to_string()))?;
        let mut out: HashMap<String, BTreeSet<String>> = HashMap::new();
        for e in events {
            if let (Some(id), Some(bot)) = (e.token_id, e.bot.or(e.caller)) {
                out.entry(id).or_default().insert(bot);
            }
        }
        Ok(out)
    }
}
