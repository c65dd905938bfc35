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
    rfc3339_utc(t, true)
}

/// RFC 3339 in UTC with second precision, as GitHub writes it (`2026-02-17T15:00:00Z`); credential
/// expiry times in answers and audit events.
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    rfc3339_utc(t, false)
}

/// Both forms, written digit by digit: two of them are formatted on every credential request, and
/// `format!` costs several times more.
fn rfc3339_utc(t: time::OffsetDateTime, millis: bool) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let year = t.year();
    let Ok(year) = u16::try_from(year) else {
        // Years before 0 (or beyond the 4 digits below) keep `format!`'s rendering.
        return rfc3339_fmt(t, millis);
    };
    if year > 9999 {
        return rfc3339_fmt(t, millis);
    }
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let digits = |out: &mut [u8], mut value: u16| {
        for slot in out.iter_mut().rev() {
            *slot = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    digits(&mut out[0..4], year);
    digits(&mut out[5..7], u16::from(u8::from(t.month())));
    digits(&mut out[8..10], u16::from(t.day()));
    digits(&mut out[11..13], u16::from(t.hour()));
    digits(&mut out[14..16], u16::from(t.minute()));
    digits(&mut out[17..19], u16::from(t.second()));
    let text = if millis {
        digits(&mut out[20..23], t.millisecond());
        &out[..]
    } else {
        out[19] = b'Z';
        &out[..20]
    };
    // Only ASCII digits and separators were written.
    String::from_utf8_lossy(text).into_owned()
}

fn rfc3339_fmt(t: time::OffsetDateTime, millis: bool) -> String {
    let date = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    if millis {
        format!("{date}.{:03}Z", t.millisecond())
    } else {
        format!("{date}Z")
    }
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

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn timestamps_are_fixed_width_utc() {
        let t = datetime!(2026-02-07 09:05:03.042 +02:00);
        assert_eq!(rfc3339_millis(t), "2026-02-07T07:05:03.042Z");
        assert_eq!(rfc3339(t), "2026-02-07T07:05:03Z");
        for t in [
            datetime!(0001-01-01 00:00:00 UTC),
            datetime!(9999-12-31 23:59:59.999 UTC),
            datetime!(2026-12-02 15:00:30.633 UTC),
            datetime!(2024-02-29 12:00:00.5 -07:30),
        ] {
            let utc = t.to_offset(time::UtcOffset::UTC);
            assert_eq!(rfc3339_millis(t), rfc3339_fmt(utc, true), "{t}");
            assert_eq!(rfc3339(t), rfc3339_fmt(utc, false), "{t}");
            // And what a standard RFC 3339 parser reads back is the same instant.
            let parsed = time::OffsetDateTime::parse(
                &rfc3339_millis(t),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap();
            assert_eq!(
                parsed,
                t.replace_nanosecond(t.millisecond() as u32 * 1_000_000)
                    .unwrap()
            );
        }
    }
}
