//! Why an mTLS operation (enrollment, renewal, revocation, a request's certificate check) was
//! refused or failed. Each refusal has its stable error code ([`MtlsError::code`]); the
//! message is what the client is told and what the refusal's audit event records.
//! `api/errors.rs` turns these into HTTP answers and logs the internal ones.

use botcreds_proto::ErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum MtlsError {
    #[error("bot name {0:?} must be 1-64 ASCII letters, digits, '.', '_' or '-'")]
    BadBotName(String),
    #[error("join tokens live at most {max_secs}s ([tls] max_join_token_ttl)")]
    JoinTokenTtlTooLong { max_secs: u64 },
    /// The CSR is malformed, badly signed, or names another bot or a role.
    #[error("{0}")]
    InvalidCsr(String),
    #[error("the join token is unknown or was used already")]
    UnknownJoinToken,
    #[error("the join token has expired; create a new one (botcreds enroll create)")]
    ExpiredJoinToken,
    #[error("the join token is not for the bot {0:?}")]
    JoinTokenForAnotherBot(String),
    /// A token-less enrollment from a caller who could not be identified.
    #[error("a join token is required (botcreds enroll create --bot NAME)")]
    JoinTokenRequired,
    #[error("a join token is required ([tls] tailnet_enrollment is off)")]
    TailnetEnrollmentOff,
    #[error("the policy maps this caller to no bot; use a join token")]
    NoBotForCaller,
    #[error("the policy does not map this caller to the bot {0:?}; use a join token")]
    NotTheCallersBot(String),
    #[error(
        "the bot {0:?} is identified by hostname, which a node chooses itself; enroll it with a join token (botcreds enroll create --bot {0})"
    )]
    HostnameIdentified(String),
    #[error("renewal needs the current client certificate: call the mTLS listener")]
    RenewalNeedsCertificate,
    #[error("the client certificate is unknown to this broker")]
    CertificateUnknown,
    #[error("the client certificate {serial} was revoked at {at}")]
    CertificateRevoked { serial: String, at: String },
    #[error("the client certificate expired at {0}")]
    CertificateExpired(String),
    #[error("the client certificate does not match its record")]
    CertificateMismatch,
    #[error("no client certificate has the serial {0}")]
    UnknownSerial(String),
    #[error("the bot {0:?} has no client certificate")]
    BotWithoutCertificate(String),
    /// The store, the audit log or the CA failed; the detail is for the log only.
    #[error("{0}")]
    Internal(String),
}

impl MtlsError {
    /// The stable code of the refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            MtlsError::BadBotName(_) => ErrorCode::InvalidRequest,
            MtlsError::JoinTokenTtlTooLong { .. } => ErrorCode::TtlTooLong,
            MtlsError::InvalidCsr(_) => ErrorCode::InvalidCsr,
            MtlsError::UnknownJoinToken
            | MtlsError::ExpiredJoinToken
            | MtlsError::JoinTokenForAnotherBot(_)
            | MtlsError::JoinTokenRequired
            | MtlsError::TailnetEnrollmentOff => ErrorCode::InvalidJoinToken,
            MtlsError::NoBotForCaller
            | MtlsError::NotTheCallersBot(_)
            | MtlsError::HostnameIdentified(_) => ErrorCode::Forbidden,
            MtlsError::RenewalNeedsCertificate => ErrorCode::Unauthenticated,
            MtlsError::CertificateUnknown
            | MtlsError::CertificateRevoked { .. }
            | MtlsError::CertificateExpired(_)
            | MtlsError::CertificateMismatch => ErrorCode::CertificateRevoked,
            MtlsError::UnknownSerial(_) | MtlsError::BotWithoutCertificate(_) => {
                ErrorCode::UnknownCertificate
            }
            MtlsError::Internal(_) => ErrorCode::Internal,
        }
    }

    /// An internal failure with its context (`reading a join token: …`).
    pub(crate) fn internal(context: &str, e: impl std::fmt::Display) -> MtlsError {
        MtlsError::Internal(format!("{context}: {e}"))
    }
}
