//! The stored forms of approval requests and grants (JSON documents in the store).

use botcreds_proto::approval::{ApprovalRequestView, ApprovalResource, GrantView};
use botcreds_proto::litellm::WorkspaceInfo;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::policy::remembered::Resource;

/// An approval request as stored: what bots and admins see, plus whose it is.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct RequestRecord {
    pub view: ApprovalRequestView,
    /// The policy bot, or for a caller matching no bot its description: only the owner may
    /// poll the request, and identical pending requests of one owner are one request.
    pub owner: String,
    /// Lifetime the credential must still have when issued.
    pub min_ttl_secs: u64,
    /// The workspace of a `workspace`-scope LiteLLM key request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<WorkspaceInfo>,
}

impl RequestRecord {
    pub fn dedupe_key(&self) -> String {
        dedupe_key(&self.owner, &self.view.resource, self.workspace.as_ref())
    }

    pub fn resource(&self) -> Option<Resource> {
        Resource::from_wire(&self.view.resource).ok()
    }
}

/// Identical requests of one owner share this key; workspace keys for different workspaces
/// are different requests.
pub(super) fn dedupe_key(
    owner: &str,
    resource: &ApprovalResource,
    workspace: Option<&WorkspaceInfo>,
) -> String {
    // The resource's JSON is canonical: `Resource` sorts and deduplicates before `to_wire`.
    let resource = serde_json::to_string(resource).unwrap_or_default();
    match workspace {
        Some(w) => format!("{owner}\u{0}{resource}\u{0}{}", w.workspace_id),
        None => format!("{owner}\u{0}{resource}"),
    }
}

/// A grant as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct GrantRecord {
    pub view: GrantView,
    pub owner: String,
}

impl GrantRecord {
    pub fn resource(&self) -> Option<Resource> {
        Resource::from_wire(&self.view.resource).ok()
    }

    /// Neither revoked nor expired at `now`.
    pub fn is_live(&self, now: OffsetDateTime) -> bool {
        self.view.revoked_at.is_none() && parse_time(&self.view.expires_at).is_some_and(|t| t > now)
    }

    /// When the grant stopped being live (revocation or expiry), if it has.
    pub fn ended_at(&self) -> Option<OffsetDateTime> {
        self.view
            .revoked_at
            .as_deref()
            .and_then(parse_time)
            .or_else(|| parse_time(&self.view.expires_at))
    }
}

/// Parse an RFC 3339 time as written by [`crate::clock::rfc3339`].
pub(crate) fn parse_time(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}
