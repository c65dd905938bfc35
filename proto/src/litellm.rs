//! LiteLLM virtual keys as the broker hands them out (`POST /v1/credentials` with
//! `"kind": "litellm_key"`), and the key-provisioner API's bodies (`/api/v1/keys/*`).

use serde::{Deserialize, Serialize};

use crate::CredentialKind;

/// The scopes of the key-provisioner design.
pub const LITELLM_SCOPES: &[&str] = &["workspace", "user", "ci", "agent:review", "agent:write"];

/// Coder workspace identity carried in a `workspace` key's metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceInfo {
    pub workspace_id: String,
    pub workspace_name: String,
    pub coder_user: String,
    pub coder_user_id: String,
}

/// A LiteLLM virtual key as the broker hands it to a bot or agent.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct LitellmCredential {
    pub kind: CredentialKind,
    /// Non-secret id: `lk_` + the first 24 hex digits of LiteLLM's token hash (SHA-256 of the key).
    pub credential_id: String,
    /// The virtual key, `sk-...`. Only ever in this answer; the broker keeps its hash.
    pub key: String,
    /// The key's name (LiteLLM `key_alias`), unique per live key.
    pub name: String,
    pub scope: String,
    pub budget_usd: f64,
    /// `day` (the budget resets daily) or `run` (the budget is for the key's whole life).
    pub budget_period: String,
    pub rpm_limit: u32,
    pub models: Vec<String>,
    /// RFC 3339, UTC. Every key expires.
    pub expires_at: String,
    /// The OpenAI-compatible base URL tools should use (`{proxy}/v1`).
    pub base_url: String,
    pub bot: String,
}

impl std::fmt::Debug for LitellmCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LitellmCredential")
            .field("credential_id", &self.credential_id)
            .field("key", &"<redacted>")
            .field("name", &self.name)
            .field("scope", &self.scope)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Whether a key still works.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    Active,
    /// Reached its expiry; deleted in LiteLLM by the sweeper.
    Expired,
    /// Revoked (or replaced by a rotation) before its expiry; deleted in LiteLLM.
    Revoked,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Expired => "expired",
            KeyStatus::Revoked => "revoked",
        }
    }
}

/// Body of `POST /api/v1/keys/workspace` (the startup script's call). The fields are optional
/// here so that a missing one is answered with `invalid_workspace` naming it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceKeyRequest {
    #[serde(default)]
    pub workspace_id: Option<String>,
    #[serde(default)]
    pub workspace_name: Option<String>,
    #[serde(default)]
    pub coder_user: Option<String>,
    #[serde(default)]
    pub coder_user_id: Option<String>,
}

/// Answer of `POST /api/v1/keys/workspace`, exactly the key-provisioner design's fields.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkspaceKeyResponse {
    pub key: String,
    pub scope: String,
    pub budget_usd: f64,
    pub rpm_limit: u32,
    pub models: Vec<String>,
    /// RFC 3339, UTC, second precision.
    pub expires_at: String,
    pub metadata: WorkspaceInfo,
}

/// Body of `POST /api/v1/keys/user`. Who the user is comes from the Coder session token or the
/// tailnet identity; `coder_user`, when sent, must name that same user.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserKeyRequest {
    #[serde(default)]
    pub coder_user: Option<String>,
}

/// Answer of `POST /api/v1/keys/user`, exactly the key-provisioner design's fields.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct UserKeyResponse {
    pub key: String,
    pub scope: String,
    pub budget_usd: f64,
    pub rpm_limit: u32,
    pub models: Vec<String>,
    pub expires_at: String,
}

/// Body of `POST /api/v1/keys/service` and of the admin `POST /v1/keys`. Values are user input:
/// `budget_usd` stays a JSON value so that `"ten"` is answered `invalid_budget`, not a parse error.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceKeyRequest {
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// US dollars; at most the scope's budget (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_usd: Option<serde_json::Value>,
    /// `30m`, `1h`, ...; at most the scope's lifetime (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
}

/// Answer of `POST /api/v1/keys/service`, exactly the key-provisioner design's fields.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceKeyResponse {
    pub key: String,
    pub scope: String,
    pub name: String,
    pub budget_usd: f64,
    pub rpm_limit: u32,
    pub models: Vec<String>,
    pub expires_at: String,
}

/// Answer of `DELETE /api/v1/keys/{name}` and of the admin revoke.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRevoked {
    pub revoked: bool,
    pub name: String,
    pub revoked_at: String,
}

/// One key as the admin list shows it (never the key itself).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeySummary {
    pub name: String,
    pub scope: String,
    pub status: KeyStatus,
    pub budget_usd: f64,
    /// `day` or `run`.
    pub budget_period: String,
    pub rpm_limit: u32,
    pub models: Vec<String>,
    pub created_at: String,
    pub expires_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    /// `lk_` + a prefix of LiteLLM's token hash.
    pub credential_id: String,
    /// Who asked for it: `key-provisioner`, a user name, an admin or a bot.
    pub created_by: String,
    /// The policy bot the key was issued to, if a bot asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_id: Option<String>,
}

/// Answer of the admin `GET /v1/keys`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyList {
    pub keys: Vec<KeySummary>,
}

/// Answer of the admin `POST /v1/keys` (create) and `POST /v1/keys/{name}/rotate`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct IssuedKey {
    pub key: String,
    pub name: String,
    pub scope: String,
    pub budget_usd: f64,
    pub budget_period: String,
    pub rpm_limit: u32,
    pub models: Vec<String>,
    pub expires_at: String,
    pub credential_id: String,
    /// For a rotation: the `credential_id` of the key it replaced (now revoked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced: Option<String>,
}

macro_rules! redacted_debug {
    ($t:ty, $($field:ident),*) => {
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($t))
                    .field("key", &"<redacted>")
                    $(.field(stringify!($field), &self.$field))*
                    .finish_non_exhaustive()
            }
        }
    };
}

redacted_debug!(WorkspaceKeyResponse, scope, expires_at, metadata);
redacted_debug!(UserKeyResponse, scope, expires_at);
redacted_debug!(ServiceKeyResponse, scope, name, expires_at);
redacted_debug!(IssuedKey, name, scope, expires_at, credential_id, replaced);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn design_bodies_round_trip() {
        let workspace: WorkspaceKeyResponse = serde_json::from_str(
            r#"{"key": "sk-litellm-ws-abc123", "scope": "workspace", "budget_usd": 5.0,
                "rpm_limit": 30, "models": ["claude-sonnet-4-5", "claude-haiku-3-5"],
                "expires_at": "2026-02-06T22:00:00Z",
                "metadata": {"workspace_id": "ws-abc123", "workspace_name": "contractor-alice",
                             "coder_user": "alice", "coder_user_id": "usr-def456"}}"#,
        )
        .unwrap();
        let text = serde_json::to_string(&workspace).unwrap();
        assert!(text.contains(r#""budget_usd":5.0"#), "{text}");
        let service: ServiceKeyRequest = serde_json::from_str(
            r#"{"scope": "ci", "name": "github-actions-main", "budget_usd": 10, "duration": "1h"}"#,
        )
        .unwrap();
        assert_eq!(service.budget_usd, Some(serde_json::json!(10)));
        assert!(serde_json::from_str::<WorkspaceKeyRequest>(r#"{"workspace": "x"}"#).is_err());
    }

    #[test]
    fn debug_never_shows_the_key() {
        let k = IssuedKey {
            key: "sk-secretsecretsecret".into(),
            name: "n".into(),
            scope: "ci".into(),
            budget_usd: 1.0,
            budget_period: "run".into(),
            rpm_limit: 1,
            models: vec![],
            expires_at: "e".into(),
            credential_id: "lk_1".into(),
            replaced: None,
        };
        assert!(!format!("{k:?}").contains("secret"));
        let u = UserKeyResponse {
            key: "sk-secretsecretsecret".into(),
            scope: "user".into(),
            budget_usd: 1.0,
            rpm_limit: 1,
            models: vec![],
            expires_at: "e".into(),
        };
        assert!(!format!("{u:?}").contains("secret"));
    }
}
