//! [`IssueError`]: why no credential was handed out. Each variant names what happened;
//! [`IssueError::code`] is its stable wire code. The HTTP mapping lives in `api/errors.rs`.

use botcreds_proto::ErrorCode;

use crate::approvals::ApprovalError;
use crate::keys::KeyError;

/// The message a client (and the audit log's `detail`) gets for the broker's own failures:
/// the detail is logged where the response is built, never answered.
const INTERNAL_MESSAGE: &str = "internal error; see the broker log";

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// No kind, or a kind this broker does not serve.
    #[error("{0}")]
    InvalidKind(String),
    /// Fields of another kind, or a field out of place.
    #[error("{0}")]
    InvalidRequest(String),
    #[error("name at least one repository")]
    NoRepositories,
    #[error("{0}")]
    TooManyRepositories(String),
    #[error("{0}")]
    InvalidRepository(String),
    #[error("{0}")]
    ReposAcrossOwners(String),
    #[error("name at least one permission, e.g. contents:read")]
    EmptyPermissions,
    #[error("{0}")]
    UnknownPermission(String),
    #[error("{0}")]
    InvalidTtl(String),
    #[error("{0}")]
    TtlTooLong(String),
    #[error("{0}")]
    InvalidReason(String),
    #[error("{0}")]
    InvalidDeployKeyRequest(String),
    #[error("{0}")]
    InvalidScope(String),
    #[error("{0}")]
    InvalidWorkspace(String),
    #[error("{0}")]
    InvalidWait(String),
    /// The policy in force denies the request.
    #[error("denied by policy: {explanation}")]
    PolicyDenied { rule: String, explanation: String },
    /// An admin denied the approval request.
    #[error("{message}")]
    ApprovalDenied { message: String, rule: String },
    /// Nobody decided in time, or the grant ended.
    #[error("{0}")]
    ApprovalExpired(String),
    /// GitHub refused or failed, or the replacement limit.
    #[error(transparent)]
    Token(#[from] crate::grants::IssueError),
    /// The key service refused or failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The approval service refused or failed.
    #[error(transparent)]
    Approvals(#[from] ApprovalError),
    /// The audit log did not take the issue's events: no credential is answered.
    #[error("audit log write failed: {0}")]
    Audit(String),
    /// A broken invariant (e.g. a validated request without a repository).
    #[error("{0}")]
    Internal(String),
}

impl IssueError {
    /// The stable error code of this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            IssueError::InvalidKind(_) => ErrorCode::InvalidKind,
            IssueError::InvalidRequest(_) => ErrorCode::InvalidRequest,
            IssueError::NoRepositories => ErrorCode::NoRepositories,
            IssueError::TooManyRepositories(_) => ErrorCode::TooManyRepositories,
            IssueError::InvalidRepository(_) => ErrorCode::InvalidRepository,
            IssueError::ReposAcrossOwners(_) => ErrorCode::ReposAcrossOwners,
            IssueError::EmptyPermissions => ErrorCode::EmptyPermissions,
            IssueError::UnknownPermission(_) => ErrorCode::UnknownPermission,
            IssueError::InvalidTtl(_) => ErrorCode::InvalidTtl,
            IssueError::TtlTooLong(_) => ErrorCode::TtlTooLong,
            IssueError::InvalidReason(_) => ErrorCode::InvalidReason,
            IssueError::InvalidDeployKeyRequest(_) => ErrorCode::InvalidDeployKeyRequest,
            IssueError::InvalidScope(_) => ErrorCode::InvalidScope,
            IssueError::InvalidWorkspace(_) => ErrorCode::InvalidWorkspace,
            IssueError::InvalidWait(_) => ErrorCode::InvalidWait,
            IssueError::PolicyDenied { .. } => ErrorCode::PolicyDenied,
            IssueError::ApprovalDenied { .. } => ErrorCode::ApprovalDenied,
            IssueError::ApprovalExpired(_) => ErrorCode::ApprovalExpired,
            IssueError::Token(e) => e.code(),
            IssueError::Key(e) => e.code(),
            IssueError::Approvals(e) => e.code(),
            IssueError::Audit(_) | IssueError::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The policy rule behind a refusal, when one decided it.
    pub fn rule(&self) -> Option<&str> {
        match self {
            IssueError::PolicyDenied { rule, .. } | IssueError::ApprovalDenied { rule, .. } => {
                Some(rule)
            }
            _ => None,
        }
    }

    /// Seconds after which asking again may succeed.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            IssueError::Token(e) => e.retry_after(),
            IssueError::Approvals(e) => e.retry_after(),
            _ => None,
        }
    }

    /// Whether this is the broker's own failure: its detail is logged, not answered.
    pub fn is_internal(&self) -> bool {
        match self {
            IssueError::Audit(_) | IssueError::Internal(_) => true,
            IssueError::Key(e) => e.is_internal(),
            IssueError::Approvals(e) => e.is_internal(),
            _ => false,
        }
    }

    /// What the client is told (and the audit log's `detail` says): the error itself, or for
    /// the broker's own failures a pointer to the log.
    pub fn message(&self) -> String {
        if self.is_internal() {
            INTERNAL_MESSAGE.to_string()
        } else {
            self.to_string()
        }
    }
}
