//! What can go wrong talking to GitHub, and the stable error code each failure maps to.
//!
//! Messages carry GitHub's own `message` text (opaque, trimmed) or a description of the
//! problem; they never carry the app JWT, an installation token or the private key.

pub(crate) use crate::providers::clean_text;
use botcreds_proto::ErrorCode;

/// A failure of a GitHub App operation. Clients branch on [`GithubError::code`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GithubError {
    #[error(
        "the GitHub App is not installed on {owner:?}, or its installation does not cover the \
         requested repository"
    )]
    NotInstalled { owner: String },
    #[error("the GitHub App's installation on {owner:?} is suspended")]
    Suspended { owner: String },
    #[error("GitHub refused the requested repositories or permissions: {message}")]
    ScopeRejected { message: String },
    #[error("GitHub refused the deploy key: {message}")]
    KeyRejected { message: String },
    #[error("GitHub refused the app's credentials ({message}); check app_id and the private key")]
    AuthFailed { message: String },
    #[error("GitHub's rate limit is exhausted; retry after {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("GitHub answered {status}: {message}")]
    Upstream { status: u16, message: String },
    #[error("GitHub could not be reached: {message}")]
    Unavailable { message: String },
    #[error("GitHub sent an unexpected response: {message}")]
    InvalidResponse { message: String },
    /// The GitHub App settings cannot work (bad key, bad URL); found at start-up.
    #[error("GitHub App configuration: {message}")]
    Config { message: String },
}

impl GithubError {
    /// The stable code the broker answers with for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            GithubError::NotInstalled { .. } | GithubError::Suspended { .. } => {
                ErrorCode::GithubNotInstalled
            }
            GithubError::ScopeRejected { .. } => ErrorCode::GithubScopeRejected,
            GithubError::KeyRejected { .. } => ErrorCode::DeployKeyRejected,
            GithubError::AuthFailed { .. } => ErrorCode::GithubAuthFailed,
            GithubError::RateLimited { .. } => ErrorCode::GithubRateLimited,
            GithubError::Upstream { .. } | GithubError::InvalidResponse { .. } => {
                ErrorCode::UpstreamError
            }
            GithubError::Unavailable { .. } => ErrorCode::UpstreamUnavailable,
            GithubError::Config { .. } => ErrorCode::Internal,
        }
    }

    /// Whether another attempt may succeed without anything changing on our side
    /// (server errors and transport failures; never a 4xx).
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            GithubError::Unavailable { .. } => true,
            GithubError::Upstream { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// GitHub's `message` from an error body, trimmed and stripped of control characters; a
/// generic text naming the status when the body has none.
pub(crate) fn upstream_message(body: &[u8], status: u16) -> String {
    let from_body = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned));
    match from_body {
        Some(m) if !m.trim().is_empty() => clean_text(&m),
        _ => format!("HTTP {status} without a message"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let cases = [
            (
                GithubError::NotInstalled { owner: "a".into() },
                ErrorCode::GithubNotInstalled,
            ),
            (
                GithubError::Suspended { owner: "a".into() },
                ErrorCode::GithubNotInstalled,
            ),
            (
                GithubError::ScopeRejected {
                    message: "m".into(),
                },
                ErrorCode::GithubScopeRejected,
            ),
            (
                GithubError::AuthFailed {
                    message: "m".into(),
                },
                ErrorCode::GithubAuthFailed,
            ),
            (
                GithubError::KeyRejected {
                    message: "m".into(),
                },
                ErrorCode::DeployKeyRejected,
            ),
            (
                GithubError::RateLimited {
                    retry_after_secs: 3,
                },
                ErrorCode::GithubRateLimited,
            ),
            (
                GithubError::Upstream {
                    status: 500,
                    message: "m".into(),
                },
                ErrorCode::UpstreamError,
            ),
            (
                GithubError::InvalidResponse {
                    message: "m".into(),
                },
                ErrorCode::UpstreamError,
            ),
            (
                GithubError::Unavailable {
                    message: "m".into(),
                },
                ErrorCode::UpstreamUnavailable,
            ),
            (
                GithubError::Config {
                    message: "m".into(),
                },
                ErrorCode::Internal,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(err.code(), code, "{err:?}");
        }
    }

    #[test]
    fn messages_from_bodies() {
        let body = include_bytes!("../../../../tests/fixtures/github/error-422-permissions.json");
        assert_eq!(
            upstream_message(body, 422),
            "The permissions requested are not granted to this installation."
        );
        assert_eq!(
            upstream_message(b"<html>oops</html>", 502),
            "HTTP 502 without a message"
        );
        assert_eq!(upstream_message(br#"{"message":"a\nb"}"#, 400), "a b");
        let long = format!(r#"{{"message":"{}"}}"#, "x".repeat(1000));
        assert_eq!(
            upstream_message(long.as_bytes(), 400).chars().count(),
            crate::providers::MAX_MESSAGE_CHARS + 1
        );
    }
}
