//! LiteLLM virtual keys as a [`Provider`]: the request's scope, ttl and workspace, and the
//! [`KeyService`] (reuse, rotation, the record and its audit events). A key exists before the
//! recheck can run, so a refusal then revokes it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use botcreds_proto::audit::AuditEvent;
use botcreds_proto::litellm::{LitellmCredential, WorkspaceInfo};
use botcreds_proto::{CredentialKind, CredentialRequest, Ttl};

use super::provider::{Mint, Minted, Provider, Subject, validate_reason};
use super::{Credential, IssueError};
use crate::identity::{Caller, CallerVia};
use crate::keys::scopes::{name_part, scope_part};
use crate::keys::{KeyAsk, KeyError, KeyService, OnExisting, Origin, Revoker};
use crate::policy::remembered::Resource;

/// A live key handed out again must have at least this long left (or what the request's
/// `ttl` asks); otherwise it is rotated.
pub const DEFAULT_MIN_REMAINING: Duration = Duration::from_secs(600);
/// Longest workspace field (bytes).
pub const MAX_FIELD_BYTES: usize = 128;

/// What a `litellm_key` request asks for, validated.
#[derive(Clone, Debug)]
pub struct LitellmAsk {
    pub scope: String,
    /// Life the handed-out key must still have.
    pub min_remaining: Duration,
    pub workspace: Option<WorkspaceInfo>,
    pub reason: Option<String>,
}

/// The LiteLLM key provider.
pub struct LitellmKeys {
    keys: Arc<KeyService>,
}

impl LitellmKeys {
    pub fn new(keys: Arc<KeyService>) -> LitellmKeys {
        LitellmKeys { keys }
    }
}

/// One workspace field: 1 to [`MAX_FIELD_BYTES`] bytes of printable text, trimmed.
pub fn workspace_field(name: &str, value: Option<&str>) -> Result<String, String> {
    let v = value.unwrap_or_default().trim();
    if v.is_empty() || v.len() > MAX_FIELD_BYTES || v.chars().any(char::is_control) {
        return Err(format!(
            "{name} must be 1 to {MAX_FIELD_BYTES} bytes of printable text"
        ));
    }
    Ok(v.to_string())
}

/// Who holds a bot-path key: the key-name part and the holder id. A policy bot is itself; a
/// caller no bot matches is named by what cannot be renamed (a tailnet node's stable id), so a
/// node renamed like a bot never lands on that bot's key name.
fn key_holder(caller: &Caller, bot: Option<&str>) -> (String, String) {
    if let Some(b) = bot {
        return (b.to_string(), format!("bot:{b}"));
    }
    match &caller.via {
        CallerVia::Tailnet(t) => (
            format!("node-{}", t.stable_id),
            format!("node:{}", t.stable_id),
        ),
        CallerVia::ApiKey { bot } => (format!("api_key-{bot}"), format!("api_key:{bot}")),
        CallerVia::Mtls { bot, .. } => (format!("mtls-{bot}"), format!("mtls:{bot}")),
    }
}

fn key_error(e: KeyError) -> IssueError {
    IssueError::Key(e)
}

#[async_trait]
impl Provider for LitellmKeys {
    type Ask = LitellmAsk;
    type Answer = LitellmCredential;

    fn validate(&self, r: &CredentialRequest) -> Result<LitellmAsk, IssueError> {
        if !r.repositories.is_empty() || !r.permissions.is_empty() {
            return Err(IssueError::InvalidRequest(
                "`repositories` and `permissions` belong to github_token requests, not litellm_key"
                    .into(),
            ));
        }
        let Some(scope) = r.scope.as_deref() else {
            return Err(IssueError::InvalidScope(
                "a litellm_key request names its scope (workspace, user, ci, agent:review, \
                 agent:write)"
                    .into(),
            ));
        };
        let spec = self.keys.scopes().lookup(scope).map_err(key_error)?;
        let min_remaining = match &r.ttl {
            None => DEFAULT_MIN_REMAINING.min(spec.lifetime / 2),
            Some(raw) => {
                let ttl: Ttl = raw
                    .parse()
                    .map_err(|e| IssueError::InvalidTtl(format!("{e}")))?;
                if ttl.as_duration() > spec.lifetime {
                    return Err(IssueError::TtlTooLong(format!(
                        "ttl {ttl} is longer than the {scope} scope's lifetime of {}",
                        Ttl::from_secs(spec.lifetime.as_secs())
                    )));
                }
                ttl.as_duration()
            }
        };
        let workspace = match (scope, &r.workspace) {
            ("workspace", None) => {
                return Err(IssueError::InvalidWorkspace(
                    "a workspace key names its workspace (workspace_id, workspace_name, \
                     coder_user, coder_user_id)"
                        .into(),
                ));
            }
            ("workspace", Some(w)) => {
                let field = |name, value: &str| {
                    workspace_field(name, Some(value)).map_err(IssueError::InvalidWorkspace)
                };
                Some(WorkspaceInfo {
                    workspace_id: field("workspace_id", &w.workspace_id)?,
                    workspace_name: field("workspace_name", &w.workspace_name)?,
                    coder_user: field("coder_user", &w.coder_user)?,
                    coder_user_id: field("coder_user_id", &w.coder_user_id)?,
                })
            }
            (_, Some(_)) => {
                return Err(IssueError::InvalidRequest(
                    "`workspace` belongs to workspace-scope requests only".into(),
                ));
            }
            (_, None) => None,
        };
        let reason = validate_reason(r.reason.as_deref())?;
        Ok(LitellmAsk {
            scope: scope.to_string(),
            min_remaining,
            workspace,
            reason,
        })
    }

    fn subject(&self, ask: &LitellmAsk) -> Subject {
        Subject {
            resource: Resource::Litellm {
                scope: ask.scope.clone(),
            },
            min_ttl: ask.min_remaining,
            reason: ask.reason.clone(),
            workspace: ask.workspace.clone(),
        }
    }

    fn ask_for(&self, subject: Subject) -> Result<LitellmAsk, IssueError> {
        match subject.resource {
            Resource::Litellm { scope } => Ok(LitellmAsk {
                scope,
                min_remaining: subject.min_ttl,
                workspace: subject.workspace,
                reason: subject.reason,
            }),
            // Another kind's approval never reaches this provider (the service dispatches
            // on the resource).
            _ => Err(IssueError::Internal(
                "another kind's approval reached the LiteLLM provider".into(),
            )),
        }
    }

    fn describe(&self, ask: &LitellmAsk, e: &mut AuditEvent) {
        e.detail = Some(format!("litellm_key scope {}", ask.scope));
    }

    fn recheck_wants_approval(&self) -> bool {
        // The key exists (and its issue is recorded) before the recheck runs: only a deny
        // takes it back.
        false
    }

    async fn mint(&self, m: Mint<'_, LitellmAsk>) -> Result<Minted<LitellmCredential>, IssueError> {
        let ask = m.ask;
        let (owner, owner_id) = key_holder(m.caller, m.bot);
        let origin = Origin {
            created_by: owner.clone(),
            owner: owner_id,
            bot: m.bot.map(str::to_string),
            caller: m.caller.describe(),
            client_ip: Some(m.caller.address.ip().to_string()),
            approval: m.approval.clone(),
            ..Default::default()
        };
        let replaces = m.replaces.map(str::to_string);
        let k = match &ask.workspace {
            Some(info) => {
                self.keys
                    .issue_workspace(info.clone(), origin, ask.min_remaining, replaces, m.before)
                    .await
            }
            None => {
                self.keys
                    .issue(KeyAsk {
                        scope: ask.scope.clone(),
                        name: format!("{}.{}", name_part(&owner), scope_part(&ask.scope)),
                        budget_usd: None,
                        lifetime: None,
                        origin,
                        on_existing: OnExisting::Reuse {
                            min_remaining: ask.min_remaining,
                            rejected: replaces,
                        },
                        preamble: m.before,
                        reason: ask.reason.clone(),
                    })
                    .await
            }
        }
        .map_err(key_error)?;
        // Decided again now the key exists: the issue may have waited on LiteLLM or on another
        // issue, and a reload meanwhile lists the keys before this one was written, so a deny
        // it added is enforced here: the key is revoked and nothing is answered.
        if let Some(decision) = (m.recheck)() {
            tracing::info!(
                bot = m.bot.unwrap_or("-"),
                request_id = m.approval.request_id().unwrap_or("-"),
                credential_id = %k.record.credential_id,
                "LiteLLM key refused: the policy now denies it"
            );
            if let Err(err) = self
                .keys
                .revoke_by_credential_id(&k.record.credential_id, Revoker::Policy)
                .await
            {
                tracing::error!(credential_id = %k.record.credential_id, code = %err.code(), error = %err, "could not revoke a key the policy now denies");
            }
            return Ok(Minted::Refused {
                decision,
                before_recorded: true,
            });
        }
        let answer = LitellmCredential {
            kind: CredentialKind::LitellmKey,
            credential_id: k.record.credential_id.clone(),
            key: k.key.expose().to_string(),
            name: k.record.name.clone(),
            scope: k.record.scope.clone(),
            budget_usd: k.record.budget_usd,
            budget_period: k.record.budget_period.clone(),
            rpm_limit: k.record.rpm_limit,
            models: k.record.models.clone(),
            expires_at: k.record.expires_at.clone(),
            base_url: self.keys.tool_base_url(),
            bot: m.bot.unwrap_or_default().to_string(),
        };
        tracing::info!(
            bot = answer.bot.as_str(),
            credential_id = %answer.credential_id,
            reused = k.reused,
            approval = m.approval.as_str(),
            "LiteLLM key handed out"
        );
        Ok(Minted::Issued(answer))
    }

    fn credential_id(answer: &LitellmCredential) -> &str {
        &answer.credential_id
    }
}

impl From<LitellmCredential> for Credential {
    fn from(c: LitellmCredential) -> Credential {
        Credential::Litellm(c)
    }
}
