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
