//! Audit events as stored and as `botcreds log` prints them (the seed's event names and fields).

use serde::{Deserialize, Serialize};

/// The seed's event names, plus policy and admin events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditEventKind {
    CredentialRequested,
    CredentialIssued,
    CredentialDenied,
    CredentialRefreshed,
    CredentialRevoked,
    /// A credential was replaced by a new one under the same name (LiteLLM key rotation).
    CredentialRotated,
    /// A credential reached its expiry and was removed upstream (LiteLLM key sweeper).
    CredentialExpired,
    ApprovalRequested,
    ApprovalGranted,
    ApprovalDenied,
    ApprovalExpired,
    /// An admin's decision was refused (self-approval).
    ApprovalRefused,
    /// An admin ended a grant (revocation), so nothing refreshes under it any more.
    GrantRevoked,
    /// "Approve + remember" added an auto_approve rule for a bot.
    RuleRemembered,
    /// An admin removed a remembered rule (`botcreds policy forget`).
    RuleForgotten,
    PolicyLoaded,
    PolicyRejected,
    BrokerStarted,
    /// An admin created a one-time join token for a bot (mTLS enrollment).
    EnrollTokenCreated,
    /// A client certificate was issued on enrollment (join token or tailnet identity).
    CertIssued,
    /// A client certificate was renewed with the current one.
    CertRenewed,
    /// An admin revoked client certificates (by serial or bot).
    CertRevoked,
    /// An enrollment, renewal, TLS handshake or certificate use was refused.
    CertRefused,
    /// Unauthenticated refusals from one peer beyond `[limits] audited_refusals_per_peer`
    /// in one window, counted instead of written one by one.
    RefusalsSummarized,
}

impl AuditEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditEventKind::CredentialRequested => "credential_requested",
            AuditEventKind::CredentialIssued => "credential_issued",
            AuditEventKind::CredentialDenied => "credential_denied",
            AuditEventKind::CredentialRefreshed => "credential_refreshed",
            AuditEventKind::CredentialRevoked => "credential_revoked",
            AuditEventKind::CredentialRotated => "credential_rotated",
            AuditEventKind::CredentialExpired => "credential_expired",
            AuditEventKind::ApprovalRequested => "approval_requested",
            AuditEventKind::ApprovalGranted => "approval_granted",
            AuditEventKind::ApprovalDenied => "approval_denied",
            AuditEventKind::ApprovalExpired => "approval_expired",
            AuditEventKind::ApprovalRefused => "approval_refused",
            AuditEventKind::GrantRevoked => "grant_revoked",
            AuditEventKind::RuleRemembered => "rule_remembered",
            AuditEventKind::RuleForgotten => "rule_forgotten",
            AuditEventKind::PolicyLoaded => "policy_loaded",
            AuditEventKind::PolicyRejected => "policy_rejected",
            AuditEventKind::BrokerStarted => "broker_started",
            AuditEventKind::EnrollTokenCreated => "enroll_token_created",
            AuditEventKind::CertIssued => "cert_issued",
            AuditEventKind::CertRenewed => "cert_renewed",
            AuditEventKind::CertRevoked => "cert_revoked",
            AuditEventKind::CertRefused => "cert_refused",
            AuditEventKind::RefusalsSummarized => "refusals_summarized",
        }
    }
}

/// An audit timestamp: RFC 3339 in UTC with millisecond precision (`2026-02-17T14:00:00.000Z`). All
/// stored timestamps have this one form, so byte-wise comparison orders them.
pub fn rfc3339_millis(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// One audit record. Optional fields are left out of the JSON when empty.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Position in the log, from 1, gap-free.
    #[serde(default)]
    pub seq: u64,
    /// RFC 3339, UTC, with sub-second precision.
    pub timestamp: String,
    pub event: AuditEventKind,
    /// The credential kind when it is not a GitHub token or LiteLLM key named otherwise
    /// (`deploy_key`); absent on older events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot: Option<String>,
    /// How the caller was identified: `tailnet:<node>`, `api_key:<bot>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repositories: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<String>,
    /// `auto` or `manual`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<String>,
    /// Non-secret id of the issued token (a hash, never the token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Error code or policy rule behind a denial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The approval request (`apr_...`) the event is about, or that the grant or remembered
    /// rule it concerns came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Whether an issued token was reused from the broker's cache.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reused: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// SHA-256 over the previous event's hash and this event (hex); chains the log.
    #[serde(default)]
    pub hash: String,
}

impl AuditEvent {
    pub fn new(event: AuditEventKind, timestamp: String) -> AuditEvent {
        AuditEvent {
            seq: 0,
            timestamp,
            event,
            kind: None,
            bot: None,
            caller: None,
            repo: None,
            repositories: Vec::new(),
            permissions: Vec::new(),
            approval: None,
            token_id: None,
            expires_at: None,
            client_ip: None,
            reason: None,
            code: None,
            rule: None,
            request_id: None,
            reused: false,
            detail: None,
            hash: String::new(),
        }
    }
}
