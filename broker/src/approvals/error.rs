//! [`ApprovalError`]: why the approval service refused or failed. Each variant names what
//! happened; [`ApprovalError::code`] is its stable wire code. The HTTP mapping lives in
//! `api/errors.rs`.

use botcreds_proto::ErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    /// No request with this id (or not the asker's).
    #[error("no approval request {0:?}")]
    UnknownRequest(String),
    /// No remembered rule with this id.
    #[error("no remembered rule {0:?}")]
    UnknownRule(String),
    /// No live credential with this id.
    #[error("the broker holds no live credential {0:?}")]
    UnknownCredential(String),
    /// The owner already has the most pending requests allowed.
    #[error("{0} approval requests of yours are already pending; wait for decisions")]
    TooManyPendingForOwner(usize),
    /// The broker already holds the most pending requests allowed.
    #[error("too many approval requests are pending on this broker; wait for decisions")]
    TooManyPending,
    /// The deciding admin made the request (or is the bot).
    #[error("{0}")]
    SelfApproval(String),
    /// "approve + remember" for a caller that matches no policy bot.
    #[error(
        "this caller matches no policy bot, so there is no bot to remember a rule for; approve \
         without remembering"
    )]
    NoBotToRemember,
    /// The request belongs to another bot than the decision named.
    #[error("{0}")]
    WrongBot(String),
    /// The request expired before the decision.
    #[error("request {id} expired at {at}")]
    Expired { id: String, at: String },
    /// The request was decided already.
    #[error("{0}")]
    AlreadyDecided(String),
    #[error("{0}")]
    InvalidDenyReason(String),
    /// A stored record or the store itself failed (internal).
    #[error("approval store: {0}")]
    Store(String),
    /// A stored request whose resource no longer parses (internal).
    #[error("stored approval request does not parse")]
    Unreadable,
    /// The audit log could not be read (internal).
    #[error("reading the audit log: {0}")]
    AuditRead(String),
}

impl ApprovalError {
    /// The stable error code of this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            ApprovalError::UnknownRequest(_) => ErrorCode::UnknownRequest,
            ApprovalError::UnknownRule(_) => ErrorCode::UnknownRule,
            ApprovalError::UnknownCredential(_) => ErrorCode::UnknownCredential,
            ApprovalError::TooManyPendingForOwner(_) | ApprovalError::TooManyPending => {
                ErrorCode::TooManyPending
            }
            ApprovalError::SelfApproval(_) => ErrorCode::SelfApproval,
            ApprovalError::NoBotToRemember => ErrorCode::InvalidRequest,
            ApprovalError::WrongBot(_) => ErrorCode::WrongBot,
            ApprovalError::Expired { .. } => ErrorCode::RequestExpired,
            ApprovalError::AlreadyDecided(_) => ErrorCode::AlreadyDecided,
            ApprovalError::InvalidDenyReason(_) => ErrorCode::InvalidDenyReason,
            ApprovalError::Store(_) | ApprovalError::Unreadable | ApprovalError::AuditRead(_) => {
                ErrorCode::Internal
            }
        }
    }

    /// Seconds after which asking again may succeed.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApprovalError::TooManyPendingForOwner(_) | ApprovalError::TooManyPending => Some(60),
            _ => None,
        }
    }

    /// Whether this is the broker's own failure (logged, answered as a generic message).
    pub fn is_internal(&self) -> bool {
        matches!(
            self,
            ApprovalError::Store(_) | ApprovalError::Unreadable | ApprovalError::AuditRead(_)
        )
    }
}
