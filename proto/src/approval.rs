//! Approval requests and the admin API's bodies: states (`PENDING → APPROVED → ISSUED`, or
//! `DENIED`, or `EXPIRED`), the request as bots and admins see it, grants, remembered rules,
//! revocation, and the signed webhook event.

use serde::{Deserialize, Serialize};

use crate::audit::AuditEvent;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ApprovalState {
    Pending,
    Approved,
    Issued,
    Denied,
    Expired,
}

impl ApprovalState {
    /// Whether a human (or the clock) has already decided.
    pub fn is_decided(self) -> bool {
        !matches!(self, ApprovalState::Pending)
    }

    /// Whether the decision lets the bot have the credential.
    pub fn is_approved(self) -> bool {
        matches!(self, ApprovalState::Approved | ApprovalState::Issued)
    }

    /// The wire form: `PENDING`, `APPROVED`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalState::Pending => "PENDING",
            ApprovalState::Approved => "APPROVED",
            ApprovalState::Issued => "ISSUED",
            ApprovalState::Denied => "DENIED",
            ApprovalState::Expired => "EXPIRED",
        }
    }
}

impl std::fmt::Display for ApprovalState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an approval request, a grant or a remembered rule is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ApprovalResource {
    /// A GitHub installation token: `owner/name` repositories (sorted, lower-case) and
    /// `name:level` permissions (sorted).
    GithubToken {
        repositories: Vec<String>,
        permissions: Vec<String>,
    },
    /// A LiteLLM virtual key of one scope.
    LitellmKey { scope: String },
    /// An SSH deploy key: one `owner/name` repository (lower-case) and `contents:read` or
    /// `contents:write`.
    DeployKey {
        repository: String,
        permission: String,
    },
}

impl ApprovalResource {
    /// One line for tables and chat messages: `acme/web contents:write,issues:read` or
    /// `litellm agent:write`.
    pub fn summary(&self) -> String {
        match self {
            ApprovalResource::GithubToken {
                repositories,
                permissions,
            } => format!("{} {}", repositories.join(","), permissions.join(",")),
            ApprovalResource::LitellmKey { scope } => format!("litellm {scope}"),
            ApprovalResource::DeployKey {
                repository,
                permission,
            } => format!("deploy key {repository} {permission}"),
        }
    }
}

/// An approval request as the requesting bot and admins see it: the body of `202` answers,
/// of `GET /v1/requests/{id}` and of the admin listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRequestView {
    /// `apr_` and 8 base32 characters.
    pub request_id: String,
    pub state: ApprovalState,
    /// The policy bot asking; `None` for a caller that matches no bot.
    pub bot: Option<String>,
    /// How the caller was identified (`tailnet:ci-bot-07 (nStable)`, `api_key:ci-helper`).
    pub caller: String,
    pub resource: ApprovalResource,
    /// The bot's reason, as it gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The policy rule that sent the request to a human (`bots.x.requires_approval[0]`,
    /// `defaults`).
    pub rule: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// When a pending request expires (the policy's `approval_timeout` after creation).
    pub expires_at: String,
    /// The admin who decided (`tailnet:alice@example.com`, `api_key:ops`) or `clock` for expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<String>,
    /// Why an admin denied it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_reason: Option<String>,
    /// The grant an approval created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    /// The remembered rule an "approve + remember" created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remembered_rule: Option<String>,
    /// The first credential issued under the approval (state `ISSUED`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_id: Option<String>,
    /// Where the requesting bot long-polls: `/v1/requests/{id}`.
    pub poll_url: String,
}

/// `GET /v1/admin/approvals`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalList {
    pub requests: Vec<ApprovalRequestView>,
}

/// `POST /v1/admin/approvals/{id}/approve`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproveBody {
    /// "Approve + remember": also add an auto_approve rule for this bot and resource that
    /// survives restarts (`botcreds policy forget` removes it).
    #[serde(default)]
    pub persist: bool,
    /// When given, the request must belong to this bot (`wrong_bot` otherwise): a form or a
    /// script states what it believes it approves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot: Option<String>,
}

/// `POST /v1/admin/approvals/approve-all`: every pending request of one bot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproveAllBody {
    pub bot: String,
    #[serde(default)]
    pub persist: bool,
}

/// `POST /v1/admin/approvals/{id}/deny`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenyBody {
    /// Shown to the bot; at most 4 KiB of printable text (newlines and tabs allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot: Option<String>,
}

/// The answer to an approve or deny.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionAnswer {
    pub request: ApprovalRequestView,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<GrantView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remembered: Option<RememberedRuleView>,
}

/// The answer to an approve-all.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApproveAllAnswer {
    pub approved: Vec<DecisionAnswer>,
}

/// A grant: while it lives, the bot's requests that it covers are issued without asking a
/// human again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantView {
    /// `gr_` and 8 base32 characters.
    pub grant_id: String,
    pub bot: Option<String>,
    pub caller: String,
    pub resource: ApprovalResource,
    /// The approval request it came from.
    pub request_id: String,
    pub approved_by: String,
    pub created_at: String,
    pub expires_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_by: Option<String>,
}

/// `GET /v1/admin/grants`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantList {
    pub grants: Vec<GrantView>,
}

/// An auto_approve rule added by "approve + remember", kept apart from the policy file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RememberedRuleView {
    /// `rem_` and 8 base32 characters; `botcreds policy forget RULE_ID` removes it.
    pub rule_id: String,
    pub bot: String,
    pub resource: ApprovalResource,
    pub request_id: String,
    pub created_by: String,
    pub created_at: String,
}

/// `POST /v1/admin/revoke`: name exactly one target.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot: Option<String>,
    /// `owner/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
}

/// One live credential that a revocation killed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedCredential {
    pub credential_id: String,
    pub repositories: Vec<String>,
    /// Bots the broker handed this credential to.
    pub holders: Vec<String>,
    pub expires_at: String,
    /// Whether the upstream confirmed it dead; `false` means the broker dropped it but the
    /// upstream call failed (see `error`).
    pub revoked_upstream: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The answer to a revocation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeAnswer {
    pub revoked: Vec<RevokedCredential>,
    /// Grants ended, so nothing refreshes the credentials without a new approval.
    pub grants_ended: Vec<String>,
}

/// One bot of the policy, for `botcreds bots list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BotView {
    pub name: String,
    /// In words: `tailnet tag tag:ci`.
    pub identity: String,
    pub approval_timeout: String,
    pub auto_approve: usize,
    pub requires_approval: usize,
    pub deny: usize,
    pub remembered: usize,
    pub pending: usize,
    pub grants: usize,
}

/// `GET /v1/admin/bots`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BotList {
    pub bots: Vec<BotView>,
}

/// One bot's rules, as `policy show` prints them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyBotView {
    pub name: String,
    pub identity: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_timeout: Option<String>,
    pub auto_approve: Vec<String>,
    pub requires_approval: Vec<String>,
    pub deny: Vec<String>,
}

/// `GET /v1/admin/policy`: the live policy and the remembered rules layered on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyView {
    pub path: String,
    pub defaults_requires_approval: bool,
    pub defaults_approval_timeout: String,
    pub bots: Vec<PolicyBotView>,
    pub remembered: Vec<RememberedRuleView>,
}

/// `GET /v1/admin/audit`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditList {
    pub events: Vec<AuditEvent>,
}

/// What a webhook receives (POST, JSON, signed: `X-Botcreds-Signature-256: sha256=<hex>` is
/// HMAC-SHA256 of the exact body with the webhook's secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookEvent {
    /// `approval_requested`, `approval_granted`, `approval_denied`, `approval_expired`.
    pub event: String,
    /// Unique per event (`evt_...`); the same on every retry of it, so receivers can drop
    /// duplicates.
    pub delivery_id: String,
    /// RFC 3339, UTC.
    pub timestamp: String,
    pub request: ApprovalRequestView,
    /// `{public_url}/approvals/{id}` when the broker has a `public_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_url: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_wire_form() {
        let r = ApprovalResource::GithubToken {
            repositories: vec!["acme/web".into()],
            permissions: vec!["contents:write".into()],
        };
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["kind"], "github_token");
        assert_eq!(serde_json::from_value::<ApprovalResource>(json).unwrap(), r);
        let l: ApprovalResource =
            serde_json::from_str(r#"{"kind":"litellm_key","scope":"agent:write"}"#).unwrap();
        assert_eq!(l.summary(), "litellm agent:write");
        assert_eq!(r.summary(), "acme/web contents:write");
    }

    #[test]
    fn states_are_screaming() {
        assert_eq!(
            serde_json::to_string(&ApprovalState::Pending).unwrap(),
            "\"PENDING\""
        );
        assert_eq!(ApprovalState::Issued.as_str(), "ISSUED");
        assert!(ApprovalState::Issued.is_approved() && ApprovalState::Issued.is_decided());
        assert!(!ApprovalState::Denied.is_approved());
    }

    #[test]
    fn bodies_refuse_unknown_fields() {
        assert!(serde_json::from_str::<ApproveBody>(r#"{"persist":true,"x":1}"#).is_err());
        assert!(serde_json::from_str::<DenyBody>(r#"{"why":"no"}"#).is_err());
        assert!(serde_json::from_str::<RevokeBody>(r#"{"token":"t"}"#).is_err());
        let b: ApproveBody = serde_json::from_str("{}").unwrap();
        assert!(!b.persist && b.bot.is_none());
    }
}
