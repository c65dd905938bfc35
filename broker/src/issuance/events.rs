//! The audit events and metric labels of an issue, built in one place for every kind and path:
//! the request, its refusal (the one rule for the refusal's `detail`, [`denial_detail`]), and
//! the outcome's label. `credential_issued` itself is built by
//! [`crate::issued::credential_issued`].

use botcreds_proto::CredentialRequest;
use botcreds_proto::audit::{AuditEvent, AuditEventKind};

use super::IssueError;
use crate::identity::Caller;
pub use crate::issued::{MAX_DENIAL_DETAIL_CHARS, denial_detail};
use crate::policy::Outcome;

/// Raw input kept on the refusal of a request that did not validate: at most this many
/// repositories and permissions, each cut to `MAX_RAW_CHARS`.
const MAX_RAW_ITEMS: usize = 20;
const MAX_RAW_CHARS: usize = 120;

/// The `botcreds_decisions_total` label of a policy outcome.
pub fn outcome_label(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Allow => "allow",
        Outcome::RequireApproval => "approval",
        Outcome::Deny => "deny",
    }
}

/// An event about `caller`'s request: who asked, from where, for which bot.
pub fn about(
    kind: AuditEventKind,
    timestamp: String,
    caller: &Caller,
    bot: Option<&str>,
) -> AuditEvent {
    let mut e = AuditEvent::new(kind, timestamp);
    e.bot = bot.map(str::to_string);
    e.caller = Some(caller.describe());
    e.client_ip = Some(caller.address.ip().to_string());
    e
}

/// `credential_denied` for a request the event `subject` describes (its
/// `credential_requested`, or the approved request): the subject's fields, the refusal's
/// code, the deciding rule and the detail.
pub fn denied(
    subject: &AuditEvent,
    timestamp: String,
    rule: Option<&str>,
    error: &IssueError,
) -> AuditEvent {
    let mut e = subject.clone();
    e.event = AuditEventKind::CredentialDenied;
    e.timestamp = timestamp;
    e.code = Some(error.code().as_str().to_string());
    e.rule = rule.map(str::to_string);
    e.detail = Some(denial_detail(&error.message()));
    e
}

/// `credential_denied` for a request refused before it validated, with its raw input bounded.
pub fn unvalidated(
    timestamp: String,
    caller: &Caller,
    bot: Option<&str>,
    request: Option<&CredentialRequest>,
    code: &str,
    message: &str,
) -> AuditEvent {
    let mut e = about(AuditEventKind::CredentialDenied, timestamp, caller, bot);
    e.code = Some(code.to_string());
    e.detail = Some(denial_detail(message));
    if let Some(r) = request {
        // Raw input, bounded: kept for the audit trail only.
        let bounded = |items: &[String]| {
            items
                .iter()
                .take(MAX_RAW_ITEMS)
                .map(|s| s.chars().take(MAX_RAW_CHARS).collect())
                .collect()
        };
        e.repositories = bounded(&r.repositories);
        e.permissions = bounded(&r.permissions);
    }
    e
}
