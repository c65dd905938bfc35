//! What the broker keeps about a LiteLLM key in the store (namespace `litellm_keys`, keyed by
//! credential id): name, scope, limits, owner and LiteLLM's token hash — never the key itself.

use botcreds_proto::litellm::{KeyStatus, KeySummary, WorkspaceInfo};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// The store namespace of key records.
pub const NAMESPACE: &str = "litellm_keys";

/// One key the broker issued.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// `lk_` + the first 24 hex digits of `token_hash`.
    pub credential_id: String,
    /// LiteLLM's id of the key: SHA-256 hex of the key. Deletes the key; cannot call models.
    pub token_hash: String,
    pub name: String,
    pub scope: String,
    pub status: KeyStatus,
    pub budget_usd: f64,
    /// `day` or `run`.
    pub budget_period: String,
    pub rpm_limit: u32,
    pub models: Vec<String>,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub expires_at: String,
    /// `expires_at` as Unix seconds, for comparisons.
    pub expires_unix: i64,
    pub lifetime_secs: u64,
    #[serde(default)]
    pub revoked_at: Option<String>,
    #[serde(default)]
    pub revoked_by: Option<String>,
    /// `key-provisioner`, a user name, an admin or a bot (the design's `created_by`).
    pub created_by: String,
    #[serde(default)]
    pub coder_user: Option<String>,
    #[serde(default)]
    pub coder_user_id: Option<String>,
    /// The policy bot the key was issued to, if a bot asked.
    #[serde(default)]
    pub bot: Option<String>,
    /// How the caller was identified (`api_key:ci`, `tailnet:...`, `provisioner`).
    pub caller: String,
    #[serde(default)]
    pub workspace: Option<WorkspaceInfo>,
    /// Whether LiteLLM has confirmed the key gone (after revocation or expiry).
    #[serde(default)]
    pub upstream_deleted: bool,
    /// For a rotated key: the credential id of its successor.
    #[serde(default)]
    pub replaced_by: Option<String>,
    /// Who holds the key ([`super::Origin::owner_id`]): only they get it again, rotate it or
    /// replace it. Records written before this field derive it ([`KeyRecord::owner_id`]).
    #[serde(default)]
    pub owner: Option<String>,
}

impl KeyRecord {
    /// Active and not past its expiry.
    pub fn is_live(&self, now: OffsetDateTime) -> bool {
        self.status == KeyStatus::Active && self.expires_unix > now.unix_timestamp()
    }

    /// The key's holder: `bot:<name>`, `node:<stable id>`, `provisioner`, `coder:<user id>`,
    /// `user:<login>` or (older records) the caller as described then.
    pub fn owner_id(&self) -> String {
        if let Some(o) = &self.owner {
            return o.clone();
        }
        // Records written before holders were stored: the holder the same request makes now.
        if let Some(b) = &self.bot {
            return format!("bot:{b}");
        }
        match (self.scope.as_str(), &self.coder_user_id, &self.coder_user) {
            ("user", Some(id), _) => format!("coder:{id}"),
            ("user", None, Some(login)) => format!("user:{login}"),
            ("workspace", _, _) if self.created_by == super::service::KEY_PROVISIONER => {
                "provisioner".to_string()
            }
            _ => self.caller.clone(),
        }
    }

    /// Seconds of life left (0 when past expiry).
    pub fn remaining_secs(&self, now: OffsetDateTime) -> u64 {
        u64::try_from(self.expires_unix - now.unix_timestamp()).unwrap_or(0)
    }

    /// The list view; an active key past its expiry shows as expired even before the sweeper ran.
    pub fn summary(&self, now: OffsetDateTime) -> KeySummary {
        let status = if self.status == KeyStatus::Active && !self.is_live(now) {
            KeyStatus::Expired
        } else {
            self.status
        };
        KeySummary {
            name: self.name.clone(),
            scope: self.scope.clone(),
            status,
            budget_usd: self.budget_usd,
            budget_period: self.budget_period.clone(),
            rpm_limit: self.rpm_limit,
            models: self.models.clone(),
            created_at: self.created_at.clone(),
            expires_at: self.expires_at.clone(),
            revoked_at: self.revoked_at.clone(),
            credential_id: self.credential_id.clone(),
            created_by: self.created_by.clone(),
            bot: self.bot.clone(),
            workspace_id: self.workspace.as_ref().map(|w| w.workspace_id.clone()),
        }
    }
}

/// The non-secret id of a key: `lk_` + 24 hex digits of LiteLLM's token hash.
pub fn credential_id_for(token_hash: &str) -> String {
    format!("lk_{}", &token_hash[..token_hash.len().min(24)])
}
