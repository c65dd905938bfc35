//! The domain services' errors as HTTP errors: each keeps its code and message; the broker's
//! own failures are logged here, once, and answered with a generic message.

use crate::approvals::ApprovalError;
use crate::error::ApiError;
use crate::grants;
use crate::issuance::IssueError;
use crate::keys::KeyError;
use crate::tls::MtlsError;

impl From<IssueError> for ApiError {
    fn from(e: IssueError) -> ApiError {
        if e.is_internal() {
            return ApiError::internal(&e);
        }
        let mut out = ApiError::new(e.code(), e.message());
        if let Some(rule) = e.rule() {
            out = out.with_rule(rule);
        }
        if let Some(secs) = e.retry_after() {
            out = out.with_retry_after(secs);
        }
        out
    }
}

impl From<ApprovalError> for ApiError {
    fn from(e: ApprovalError) -> ApiError {
        if e.is_internal() {
            return ApiError::internal(&e);
        }
        let out = ApiError::new(e.code(), e.to_string());
        match e.retry_after() {
            Some(secs) => out.with_retry_after(secs),
            None => out,
        }
    }
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> ApiError {
        if e.is_internal() {
            return ApiError::internal(&e);
        }
        ApiError::new(e.code(), e.to_string())
    }
}

impl From<grants::IssueError> for ApiError {
    fn from(e: grants::IssueError) -> ApiError {
        let out = ApiError::new(e.code(), e.to_string());
        match e.retry_after() {
            Some(secs) => out.with_retry_after(secs),
            None => out,
        }
    }
}

impl From<MtlsError> for ApiError {
    fn from(e: MtlsError) -> ApiError {
        match e {
            MtlsError::Internal(detail) => ApiError::internal(detail),
            refusal => ApiError::new(refusal.code(), refusal.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use botcreds_proto::ErrorCode;

    use super::*;

    #[test]
    fn refusals_keep_code_and_message_internal_errors_say_nothing() {
        let e = ApiError::from(MtlsError::JoinTokenForAnotherBot("ci".into()));
        assert_eq!(e.code, ErrorCode::InvalidJoinToken);
        assert_eq!(e.message, "the join token is not for the bot \"ci\"");
        let e = ApiError::from(MtlsError::Internal("store: disk on fire".into()));
        assert_eq!(e.code, ErrorCode::Internal);
        assert!(!e.message.contains("disk on fire"), "{}", e.message);
    }
}
