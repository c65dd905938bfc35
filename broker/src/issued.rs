//! What the audit log says about a credential handed out or refused: how it was approved
//! ([`Approval`]), the one constructor of the `credential_issued` event, and the one rule for a
//! refusal's `detail`. A leaf module, so the issuance service, the key service (which also
//! serves the provisioner and admin routes), the approval service and the HTTP edge's own
//! refusals all use the same ones.

use botcreds_proto::audit::{AuditEvent, AuditEventKind};

/// How a credential handed out was approved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Approval {
    /// The policy allowed it (or no policy decision applies: the provisioner and admin routes).
    #[default]
    Auto,
    /// A live grant of an earlier approval covered it.
    Grant { request_id: String },
    /// An admin approved this very request.
    Manual { request_id: String },
}

impl Approval {
    /// The wire and audit word: `auto`, `grant` or `manual`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Approval::Auto => "auto",
            Approval::Grant { .. } => "grant",
            Approval::Manual { .. } => "manual",
        }
    }

    /// The approval request it was approved under, if any.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            Approval::Auto => None,
            Approval::Grant { request_id } | Approval::Manual { request_id } => Some(request_id),
        }
    }

    /// Mark an audit event with how its credential was approved.
    pub fn stamp(&self, ev: &mut AuditEvent) {
        ev.approval = Some(self.as_str().to_string());
        ev.request_id = self.request_id().map(str::to_string);
    }
}

/// The `credential_issued` event: who was handed what (`token_id`, `expires_at`) and how it
/// was approved. The caller adds what its kind knows (repositories, scope, rule, reuse).
pub fn credential_issued(
    timestamp: String,
    caller: String,
    approval: &Approval,
    token_id: String,
    expires_at: String,
) -> AuditEvent {
    let mut e = AuditEvent::new(AuditEventKind::CredentialIssued, timestamp);
    e.caller = Some(caller);
    e.token_id = Some(token_id);
    e.expires_at = Some(expires_at);
    approval.stamp(&mut e);
    e
}

/// Longest refusal `detail` in the audit log, in characters: an error's message can carry
/// upstream text or a long policy explanation.
pub const MAX_DENIAL_DETAIL_CHARS: usize = 300;

/// A refusal's `detail`: the message, cut to [`MAX_DENIAL_DETAIL_CHARS`] characters.
pub fn denial_detail(message: &str) -> String {
    message.chars().take(MAX_DENIAL_DETAIL_CHARS).collect()
}
