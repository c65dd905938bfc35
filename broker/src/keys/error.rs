//! [`KeyError`]: why the key service (or the Coder check it relies on) did not do what it was
//! asked. Each variant names what happened; [`KeyError::code`] is its stable wire code. The
//! HTTP mapping lives in `api/errors.rs`.

use botcreds_proto::ErrorCode;

use crate::providers::litellm::LitellmError;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// No such scope, or a scope the route does not issue.
    #[error("{0}")]
    InvalidScope(String),
    #[error("{0}")]
    InvalidBudget(String),
    #[error("{0}")]
    InvalidDuration(String),
    #[error("{0}")]
    InvalidKeyName(String),
    /// A workspace the request names that Coder does not confirm, or a malformed one.
    #[error("{0}")]
    InvalidWorkspace(String),
    /// The key exists but belongs to another holder.
    #[error("{0}")]
    Forbidden(String),
    /// A live key already has the name.
    #[error("{0}")]
    Exists(String),
    /// No live key has the name.
    #[error("{0}")]
    NotFound(String),
    /// No key with this id was issued to the caller.
    #[error("the broker holds no LiteLLM key with this id issued to you")]
    UnknownCredential,
    /// LiteLLM refused or failed; `doing` says what the broker was doing.
    #[error("{doing}: {source}")]
    Upstream {
        doing: &'static str,
        source: LitellmError,
    },
    /// Coder did not accept a session token (or it was not one).
    #[error("{0}")]
    InvalidSessionToken(String),
    /// Coder could not be reached.
    #[error("{0}")]
    CoderUnavailable(String),
    /// Coder answered something unusable.
    #[error("{0}")]
    CoderError(String),
    /// The key records could not be read or written (internal).
    #[error("key store: {0}")]
    Store(String),
    /// The audit log refused the key's events (internal): no key was answered.
    #[error("audit log write failed: {0}")]
    Audit(String),
}

impl KeyError {
    /// The stable error code of this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            KeyError::InvalidScope(_) => ErrorCode::InvalidScope,
            KeyError::InvalidBudget(_) => ErrorCode::InvalidBudget,
            KeyError::InvalidDuration(_) => ErrorCode::InvalidDuration,
            KeyError::InvalidKeyName(_) => ErrorCode::InvalidKeyName,
            KeyError::InvalidWorkspace(_) => ErrorCode::InvalidWorkspace,
            KeyError::Forbidden(_) => ErrorCode::Forbidden,
            KeyError::Exists(_) => ErrorCode::KeyExists,
            KeyError::NotFound(_) => ErrorCode::KeyNotFound,
            KeyError::UnknownCredential => ErrorCode::UnknownCredential,
            KeyError::Upstream { source, .. } => source.code(),
            KeyError::InvalidSessionToken(_) => ErrorCode::InvalidSessionToken,
            KeyError::CoderUnavailable(_) => ErrorCode::UpstreamUnavailable,
            KeyError::CoderError(_) => ErrorCode::UpstreamError,
            KeyError::Store(_) | KeyError::Audit(_) => ErrorCode::Internal,
        }
    }

    /// Whether this is the broker's own failure (logged, answered as a generic message).
    pub fn is_internal(&self) -> bool {
        matches!(self, KeyError::Store(_) | KeyError::Audit(_))
    }
}
