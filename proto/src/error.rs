//! The error-code table shared by the broker and its clients.
//!
//! Every error the broker answers is `{"error": "<message>", "code": "<code>"}` with the HTTP
//! status fixed by the code. Clients branch on `code`, never on the message.

use serde::{Deserialize, Serialize};

macro_rules! error_codes {
    ($( $variant:ident = ($code:literal, $status:literal, $doc:literal), )*) => {
        /// Stable error codes. The string form is the wire form and never changes meaning.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $( #[doc = $doc] $variant, )*
            /// A code this client does not know yet (a newer broker).
            Unknown,
        }

        impl ErrorCode {
            /// Every known code, for documentation and tests.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $( ErrorCode::$variant => $code, )*
                    ErrorCode::Unknown => "unknown",
                }
            }

            /// The HTTP status the broker answers with for this code.
            pub fn http_status(self) -> u16 {
                match self {
                    $( ErrorCode::$variant => $status, )*
                    ErrorCode::Unknown => 500,
                }
            }

            /// The code for its wire form; [`ErrorCode::Unknown`] for codes this build lacks.
            pub fn from_wire(s: &str) -> ErrorCode {
                match s {
                    $( $code => ErrorCode::$variant, )*
                    _ => ErrorCode::Unknown,
                }
            }

            pub fn describe(self) -> &'static str {
                match self {
                    $( ErrorCode::$variant => $doc, )*
                    ErrorCode::Unknown => "an error code this client does not know",
                }
            }
        }
    };
}

error_codes! {
    InvalidJson = ("invalid_json", 400, "The body is not valid JSON."),
    InvalidRequest = ("invalid_request", 400, "The JSON is well-formed but has unknown fields, missing fields or wrong types."),
    UnsupportedMediaType = ("unsupported_media_type", 415, "The body must be sent with Content-Type: application/json."),
    BodyTooLarge = ("body_too_large", 413, "The body is larger than 64 KiB."),
    InvalidKind = ("invalid_kind", 400, "The credential kind is missing or not served by this broker."),
    InvalidRepository = ("invalid_repository", 400, "A repository is not of the form owner/name."),
    NoRepositories = ("no_repositories", 400, "The request names no repository."),
    TooManyRepositories = ("too_many_repositories", 400, "The request names more repositories than one token may cover."),
    ReposAcrossOwners = ("repositories_across_owners", 400, "One token can only cover repositories of one owner (one installation)."),
    UnknownPermission = ("unknown_permission", 400, "A permission is not a GitHub App permission name:level."),
    EmptyPermissions = ("empty_permissions", 400, "The request names no permission."),
    InvalidTtl = ("invalid_ttl", 400, "The ttl is not a duration like 10m or 1h."),
    TtlTooLong = ("ttl_too_long", 400, "The ttl is longer than this credential kind can live."),
    InvalidReason = ("invalid_reason", 400, "The reason is longer than 1024 bytes or has control characters."),
    Unauthenticated = ("unauthenticated", 401, "The caller is neither a known tailnet node nor holds a valid API key or certificate."),
    InvalidApiKey = ("invalid_api_key", 401, "The API key is not known."),
    PolicyDenied = ("policy_denied", 403, "A deny rule, or the defaults, refuse this request."),
    ApprovalRequired = ("approval_required", 403, "The policy requires a human to approve this request."),
    Forbidden = ("forbidden", 403, "The caller may not use this endpoint."),
    NotFound = ("not_found", 404, "No such resource."),
    MethodNotAllowed = ("method_not_allowed", 405, "The endpoint does not accept this method."),
    RequestTimeout = ("request_timeout", 408, "The request took too long to arrive or to answer."),
    Overloaded = ("overloaded", 503, "The broker is shedding load; retry shortly."),
    IdentityUnavailable = ("identity_unavailable", 503, "tailscaled could not be asked who the caller is."),
    GithubNotInstalled = ("github_not_installed", 502, "The GitHub App is not installed on the repository's owner, or the installation is suspended."),
    GithubScopeRejected = ("github_scope_rejected", 502, "GitHub refused the repositories or permissions: the installation does not grant them."),
    GithubAuthFailed = ("github_auth_failed", 502, "GitHub refused the app's JWT: check app_id and the private key."),
    GithubRateLimited = ("github_rate_limited", 502, "GitHub's rate limit is exhausted; see retry_after."),
    InvalidDeployKeyRequest = ("invalid_deploy_key_request", 400, "A deploy_key request must name exactly one repository and one permission, contents:read or contents:write."),
    DeployKeyRejected = ("deploy_key_rejected", 502, "GitHub refused the deploy key (already in use, or the App lacks administration:write on the repository)."),
    InvalidScope = ("invalid_scope", 400, "The LiteLLM key scope is unknown, or not one this endpoint issues."),
    InvalidBudget = ("invalid_budget", 400, "The budget is not a positive number of US dollars, or exceeds the scope's budget."),
    InvalidDuration = ("invalid_duration", 400, "The duration is not like 30m or 2h, or is longer than the scope's lifetime."),
    InvalidKeyName = ("invalid_key_name", 400, "The key name is empty, longer than 128 bytes, or has characters other than letters, digits and . _ - @ +."),
    InvalidWorkspace = ("invalid_workspace", 400, "A workspace field (workspace_id, workspace_name, coder_user, coder_user_id) is missing or empty."),
    InvalidProvisionerSecret = ("invalid_provisioner_secret", 401, "The X-Provisioner-Secret header is missing or wrong."),
    InvalidSessionToken = ("invalid_session_token", 401, "Coder did not accept the session token."),
    KeyNotFound = ("key_not_found", 404, "No live LiteLLM key has this name."),
    KeyExists = ("key_exists", 409, "A live LiteLLM key with this name exists already; revoke or rotate it."),
    LitellmAuthFailed = ("litellm_auth_failed", 502, "LiteLLM refused the master key: check [litellm] master_key_file."),
    LitellmError = ("litellm_error", 502, "LiteLLM refused or failed the key operation."),
    UpstreamError = ("upstream_error", 502, "The upstream service failed or answered something unexpected."),
    UpstreamUnavailable = ("upstream_unavailable", 502, "The upstream service could not be reached."),
    InvalidWait = ("invalid_wait", 400, "The wait is not a duration like 30s, or is longer than the broker allows."),
    ApprovalDenied = ("approval_denied", 403, "A human denied this request; the message carries their reason."),
    ApprovalExpired = ("approval_expired", 403, "Nobody decided this request before its approval_timeout; ask again."),
    UnknownRequest = ("unknown_request", 404, "No approval request has this id (or it is another bot's)."),
    AlreadyDecided = ("already_decided", 409, "The approval request was already decided (approved, issued or denied)."),
    RequestExpired = ("request_expired", 409, "The approval request expired before anyone decided it."),
    WrongBot = ("wrong_bot", 409, "The approval request belongs to another bot than the one named."),
    InvalidDenyReason = ("invalid_deny_reason", 400, "The deny reason is longer than 4 KiB or has control characters other than newline and tab."),
    SelfApproval = ("self_approval", 403, "An admin whose own identity made the approval request (as its policy bot) may not approve it; see [approvals] allow_self_approval."),
    ReplaceRateLimited = ("replace_rate_limited", 429, "Replacements (replaces) of one token scope come faster than [limits] replace_burst and replace_interval allow; see retry_after."),
    TooManyPending = ("too_many_pending", 429, "Too many approval requests are pending (for this bot, or in all); wait for decisions."),
    UnknownBot = ("unknown_bot", 404, "The policy has no bot of this name."),
    UnknownCredential = ("unknown_credential", 404, "The broker holds no live credential with this id."),
    UnknownRule = ("unknown_rule", 404, "No remembered rule has this id."),
    InvalidRevokeTarget = ("invalid_revoke_target", 400, "A revocation names exactly one of credential_id, bot or repo, well-formed."),
    InvalidFilter = ("invalid_filter", 400, "A query parameter (since, bot, event, state, limit) is not valid."),
    InvalidJoinToken = ("invalid_join_token", 401, "The join token is unknown, used already, expired, or for another bot."),
    InvalidCsr = ("invalid_csr", 400, "The certificate signing request is malformed, badly signed, or names another bot or role."),
    CertificateRevoked = ("certificate_revoked", 401, "The client certificate is revoked, expired, or unknown to this broker; enroll again."),
    UnknownCertificate = ("unknown_certificate", 404, "No client certificate has this serial (or the bot has none)."),
    Internal = ("internal", 500, "An internal error; details are in the broker's log."),
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ErrorCode, D::Error> {
        let s = String::deserialize(d)?;
        Ok(ErrorCode::from_wire(&s))
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub code: ErrorCode,
    /// Seconds after which a retry may succeed (rate limits, load shedding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    /// The policy rule that decided, for policy errors (`bots.machina-bot.deny[0]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "duplicate {code}");
            let json = serde_json::to_string(code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), *code);
            assert!((400..600).contains(&code.http_status()));
        }
        assert_eq!(
            serde_json::from_str::<ErrorCode>("\"from_the_future\"").unwrap(),
            ErrorCode::Unknown
        );
    }
}

#[cfg(test)]
mod doc_tests {
    use super::ErrorCode;

    /// docs/api.md lists every code with its status; this keeps the table true.
    #[test]
    fn api_doc_lists_every_code() {
        let doc = include_str!("../../docs/api.md");
        for code in ErrorCode::ALL {
            let row = format!("| `{}` | {} |", code.as_str(), code.http_status());
            assert!(doc.contains(&row), "docs/api.md lacks the row {row}");
        }
    }
}
