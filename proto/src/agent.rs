//! The agent's local socket API: paths, the git endpoints' framing, and `GET /v1/status`.
//!
//! The agent speaks HTTP/1.1 on a unix socket. The git endpoints take and answer the git
//! credential format itself (see [`crate::git_credential`]), so the helper forwards git's
//! description and prints the answer without any JSON; `curl --unix-socket` works too:
//!
//! ```text
//! printf 'protocol=https\nhost=github.com\npath=acme/web.git\n' |
//!   curl -s --unix-socket /run/botcreds/agent.sock --data-binary @- http://agent/v1/git/get
//! ```
//!
//! Answers of `POST /v1/git/get`:
//! - `200`: the lines to print for git (`username`, `password`, `password_expiry_utc`).
//! - `204`: the agent does not serve this host; print nothing so git asks the next helper.
//! - any other status: print nothing on stdout, and the `text/plain` body (one line saying why,
//!   starting with `botcreds:`) on stderr. [`QUIT_HEADER`] set to `1` means the refusal is
//!   definitive: the helper then answers `quit=1` so git neither prompts nor asks other helpers.

use serde::{Deserialize, Serialize};

/// Where the agent listens unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/botcreds/agent.sock";
/// Environment variable that points the helper (and `botcreds-agent status`) at another socket.
pub const SOCKET_ENV: &str = "BOTCREDS_AGENT_SOCKET";
/// `POST`, body: a git credential description. Answers as described in the module docs.
pub const GIT_GET_PATH: &str = "/v1/git/get";
/// `POST`, body: the rejected credential's description. Always `204` unless the body is bad.
pub const GIT_ERASE_PATH: &str = "/v1/git/erase";
/// `GET`: [`AgentStatus`] as JSON.
pub const STATUS_PATH: &str = "/v1/status";
/// Response header of a refused `get`: `1` when the refusal is definitive (a policy denial).
pub const QUIT_HEADER: &str = "botcreds-quit";

/// `GET /v1/status`: the agent, its broker, and every credential it holds or tracks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub version: String,
    /// The broker's base URL.
    pub broker: String,
    /// How the agent authenticates: `tailnet`, `api_key (file <path>)`, `api_key (env)`.
    pub auth: String,
    pub socket: String,
    /// Whether the broker answered `GET /healthz` just now (a short probe at each status call).
    pub broker_reachable: bool,
    /// Why the probe failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_probe_error: Option<String>,
    /// RFC 3339: the last time the broker answered a credential request (success or refusal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_last_contact: Option<String>,
    /// True when some credential is served from the cache because refreshing it fails.
    pub serving_from_cache: bool,
    pub credentials: Vec<CredentialStatus>,
}

/// Where a tracked credential comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialSource {
    /// A `[[github]]` entry's literal repositories, kept fresh from the start.
    Config,
    /// One repository that git named (`credential.useHttpPath`); kept fresh while in use.
    Path,
}

/// The state of one tracked credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialState {
    /// Held and not yet due for refresh.
    Fresh,
    /// Due for refresh; a refresh is under way or about to be.
    Refreshing,
    /// Refreshing fails; the credential is still served from the cache until it expires.
    ServingFromCache,
    /// Nothing servable is held (never fetched, expired, erased or refused).
    Missing,
}

impl CredentialState {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialState::Fresh => "fresh",
            CredentialState::Refreshing => "refreshing",
            CredentialState::ServingFromCache => "serving_from_cache",
            CredentialState::Missing => "missing",
        }
    }
}

/// One credential the agent holds or tracks. Never carries the token itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialStatus {
    pub protocol: String,
    pub host: String,
    pub repositories: Vec<String>,
    pub permissions: Vec<String>,
    pub source: CredentialSource,
    pub state: CredentialState,
    /// The broker's non-secret id of the token held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_id: Option<String>,
    /// RFC 3339 times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_refresh: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error_at: Option<String>,
    /// Failed fetches since the last success.
    pub failures: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips() {
        let s = AgentStatus {
            version: "0.1.0".into(),
            broker: "http://broker".into(),
            auth: "tailnet".into(),
            socket: DEFAULT_SOCKET.into(),
            broker_reachable: false,
            broker_probe_error: Some("connection refused".into()),
            broker_last_contact: None,
            serving_from_cache: true,
            credentials: vec![CredentialStatus {
                protocol: "https".into(),
                host: "github.com".into(),
                repositories: vec!["acme/web".into()],
                permissions: vec!["contents:read".into()],
                source: CredentialSource::Path,
                state: CredentialState::ServingFromCache,
                credential_id: Some("tok_1".into()),
                expires_at: Some("2026-01-01T00:00:00Z".into()),
                last_refresh: None,
                next_refresh: None,
                last_used: None,
                last_error: Some("broker unreachable".into()),
                last_error_at: None,
                failures: 3,
            }],
        };
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"state\":\"serving_from_cache\""), "{json}");
        assert_eq!(serde_json::from_str::<AgentStatus>(&json).unwrap(), s);
    }
}
