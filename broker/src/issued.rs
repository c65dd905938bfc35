//! What the audit log says about a credential handed out: how it was approved
//! ([`Approval`]) and the one constructor of the `credential_issued` event. A leaf module, so
//! both the issuance service and the key service (which also serves the provisioner and admin
//! routes) build that event the same way.

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
