//! The HTTP answers of the domain errors of mTLS (`tls::MtlsError`): each refusal keeps its
//! code and message; an internal failure is logged here, once, and the client gets the
//! generic internal error.

use crate::error::ApiError;
use crate::tls::MtlsError;

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
