//! The broker's HTTP API as the agent uses it: `POST /v1/credentials` for GitHub tokens and
//! `GET /healthz`, authenticated by the host's tailnet identity or an API key.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use botcreds_proto::{
    CredentialKind, CredentialRequest, ErrorBody, ErrorCode, GithubCredential, MAX_BODY_BYTES,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::{AuthConfig, GithubEntry, Scope};
use crate::refresh::Retry;
use crate::secret::Secret;

/// Environment variable holding an API key when `api_key_file` is not configured.
pub const API_KEY_ENV: &str = "BOTCREDS_API_KEY";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// How the agent authenticates to the broker.
pub enum Auth {
    /// Nothing to send: the broker asks tailscaled who the connection comes from.
    Tailnet,
    ApiKey {
        key: Secret,
        origin: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("api_key_file {path}: {message}")]
    KeyFile { path: String, message: String },
    #[error("{API_KEY_ENV}: {0}")]
    Env(String),
}

impl Auth {
    /// Resolves the configured method: the key file if configured, else `env_key` (the value
    /// of [`API_KEY_ENV`]) if set, else the tailnet identity.
    pub fn load(config: &AuthConfig, env_key: Option<String>) -> Result<Auth, AuthError> {
        match config {
            AuthConfig::ApiKeyFile(path) => {
                let key = read_key_file(path).map_err(|message| AuthError::KeyFile {
                    path: path.display().to_string(),
                    message,
                })?;
                Ok(Auth::ApiKey {
                    key,
                    origin: format!("file {}", path.display()),
                })
            }
            AuthConfig::Tailnet => match env_key {
                None => Ok(Auth::Tailnet),
                Some(raw) => {
                    let key = validate_key(raw.trim()).map_err(AuthError::Env)?;
                    Ok(Auth::ApiKey {
                        key,
                        origin: "env".into(),
                    })
                }
            },
        }
    }

    /// For status output and logs: the method, never the key.
    pub fn describe(&self) -> String {
        match self {
            Auth::Tailnet => "tailnet".into(),
            Auth::ApiKey { origin, .. } => format!("api_key ({origin})"),
        }
    }
}

fn read_key_file(path: &Path) -> Result<Secret, String> {
    let meta = fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "has mode {:o}; refusing a key readable by group or others (chmod 600)",
            meta.mode() & 0o7777
        ));
    }
    if meta.len() > 4096 {
        return Err("is larger than 4096 bytes".into());
    }
    let text = Secret::new(fs::read_to_string(path).map_err(|e| e.to_string())?);
    validate_key(text.expose().trim())
}

fn validate_key(key: &str) -> Result<Secret, String> {
    if key.is_empty() {
        return Err("the API key is empty".into());
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the API key has whitespace or non-ASCII characters inside".into());
    }
    Ok(Secret::new(key.to_string()))
}

/// A GitHub token the broker issued.
#[derive(Debug, Clone)]
pub struct Issued {
    pub token: Secret,
    pub credential_id: String,
    pub expires_at: SystemTime,
}

/// Why the broker gave no credential.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unreachable: {0}")]
    Unreachable(String),
    #[error("{}", refusal(.body))]
    Refused { status: u16, body: ErrorBody },
    #[error("unexpected answer from the broker (HTTP {status}): {detail}")]
    BadAnswer { status: u16, detail: String },
}

fn refusal(body: &ErrorBody) -> String {
    let mut s = format!("{} ({}", body.error, body.code);
    if let Some(rule) = &body.rule {
        s.push_str(&format!(", rule {rule}"));
    }
    if let Some(after) = body.retry_after {
        s.push_str(&format!(", retry after {after}s"));
    }
    s.push(')');
    s
}

impl BrokerError {
    fn code(&self) -> Option<ErrorCode> {
        match self {
            BrokerError::Refused { body, .. } => Some(body.code),
            _ => None,
        }
    }

    /// How soon a background retry makes sense.
    pub fn retry(&self) -> Retry {
        match self {
            BrokerError::Unreachable(_) => Retry::Soon,
            BrokerError::Refused { status, .. } | BrokerError::BadAnswer { status, .. } => {
                if *status >= 500 || *status == 408 || *status == 429 {
                    Retry::Soon
                } else {
                    Retry::Later
                }
            }
        }
    }

    /// Seconds the broker asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            BrokerError::Refused { body, .. } => body.retry_after.map(Duration::from_secs),
            _ => None,
        }
    }

    /// The broker no longer lets this host have the credential: stop serving the copy we hold,
    /// even though GitHub would still accept it until it expires.
    pub fn revokes_access(&self) -> bool {
        matches!(
            self.code(),
            Some(
                ErrorCode::PolicyDenied
                    | ErrorCode::Forbidden
                    | ErrorCode::Unauthenticated
                    | ErrorCode::InvalidApiKey
            )
        )
    }

    /// A refusal that asking again will not change (git should neither prompt nor try others).
    pub fn is_definitive(&self) -> bool {
        self.code() == Some(ErrorCode::PolicyDenied)
    }

    /// Whether the broker itself answered (it is reachable, even if it refused).
    pub fn broker_answered(&self) -> bool {
        !matches!(self, BrokerError::Unreachable(_))
    }

    /// The HTTP status the agent's socket answers git with for this failure.
    pub fn local_status(&self) -> u16 {
        match self {
            BrokerError::Unreachable(_) => 503,
            BrokerError::Refused {
                status: 401 | 403, ..
            } => 403,
            _ => 502,
        }
    }
}

/// A client for one broker.
pub struct BrokerClient {
    http: reqwest::Client,
    base: String,
    auth: Auth,
}

impl BrokerClient {
    /// `base` is the broker URL without a trailing `/`; `timeout` bounds each request.
    pub fn new(base: &str, auth: Auth, timeout: Duration) -> Result<BrokerClient, reqwest::Error> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("botcreds-agent/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(timeout)
            // The broker must see this host's own tailnet address; a proxy from the
            // environment would hide it.
            .no_proxy()
            .build()?;
        Ok(BrokerClient {
            http,
            base: base.to_string(),
            auth,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    fn authorize(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            Auth::Tailnet => req,
            Auth::ApiKey { key, .. } => req.bearer_auth(key.expose()),
        }
    }

    /// Asks for a GitHub token covering `scope`, with at least `entry.min_ttl` left.
    pub async fn github_token(
        &self,
        scope: &Scope,
        entry: &GithubEntry,
        replaces: Option<&str>,
    ) -> Result<Issued, BrokerError> {
        let body = CredentialRequest {
            kind: Some(CredentialKind::GithubToken),
            repositories: scope.repositories.iter().map(|r| r.to_string()).collect(),
            permissions: scope.permissions.iter().map(|p| p.to_string()).collect(),
            scope: None,
            reason: entry.reason.clone(),
            ttl: Some(entry.min_ttl.to_string()),
            replaces: replaces.map(str::to_string),
            workspace: None,
            wait: None,
        };
        let req = self.authorize(
            self.http
                .post(format!("{}/v1/credentials", self.base))
                .json(&body),
        );
        let resp = req
            .send()
            .await
            .map_err(|e| BrokerError::Unreachable(error_chain(&e)))?;
        let status = resp.status().as_u16();
        let bytes = read_limited(resp).await.map_err(|detail| {
            if status == 200 {
                BrokerError::BadAnswer { status, detail }
            } else {
                BrokerError::Unreachable(detail)
            }
        })?;
        if status != 200 {
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(body) => BrokerError::Refused { status, body },
                Err(_) => BrokerError::BadAnswer {
                    status,
                    detail: "the body is not a botcreds error".into(),
                },
            });
        }
        let bad = |detail: String| BrokerError::BadAnswer { status, detail };
        let cred: GithubCredential = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("not a GitHub credential: {e}")))?;
        if cred.kind != CredentialKind::GithubToken {
            return Err(bad(format!(
                "asked for github_token, got {}",
                cred.kind.as_str()
            )));
        }
        if cred.token.is_empty() || !cred.token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad(
                "the token is empty or has characters a token cannot have".into(),
            ));
        }
        let expires_at = OffsetDateTime::parse(&cred.expires_at, &Rfc3339).map_err(|e| {
            bad(format!(
                "expires_at {:?} is not RFC 3339: {e}",
                cred.expires_at
            ))
        })?;
        let granted: Vec<String> = cred
            .repositories
            .iter()
            .map(|r| r.to_ascii_lowercase())
            .collect();
        if let Some(missing) = scope
            .repositories
            .iter()
            .find(|r| !granted.iter().any(|g| g == r.as_str()))
        {
            return Err(bad(format!("the token does not cover {missing}")));
        }
        Ok(Issued {
            token: Secret::new(cred.token),
            credential_id: cred.credential_id,
            expires_at: SystemTime::from(expires_at),
        })
    }

    /// `GET /healthz` with a short timeout.
    pub async fn probe(&self) -> Result<(), String> {
        let resp = self
            .http
            .get(format!("{}/healthz", self.base))
            .timeout(PROBE_TIMEOUT)
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        match resp.status().as_u16() {
            200 => Ok(()),
            s => Err(format!("/healthz answered HTTP {s}")),
        }
    }
}

async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| error_chain(&e))? {
        if out.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(format!("the answer is larger than {MAX_BODY_BYTES} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// An error and its causes on one line: reqwest's own message alone says little
/// ("error sending request").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn api_key_file_must_be_private() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("key");
        fs::write(&path, "bck_abc123\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let config = AuthConfig::ApiKeyFile(path.clone());
        let err = Auth::load(&config, None).err().unwrap().to_string();
        assert!(
            err.contains("mode 640") && err.contains("chmod 600"),
            "{err}"
        );

        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let auth = Auth::load(&config, Some("ignored".into())).unwrap();
        match &auth {
            Auth::ApiKey { key, .. } => assert_eq!(key.expose(), "bck_abc123"),
            Auth::Tailnet => panic!("expected a key"),
        }
        assert!(auth.describe().starts_with("api_key (file "));

        fs::write(&path, "  \n").unwrap();
        assert!(
            Auth::load(&config, None)
                .err()
                .unwrap()
                .to_string()
                .contains("empty")
        );
        fs::write(&path, "two words").unwrap();
        assert!(
            Auth::load(&config, None)
                .err()
                .unwrap()
                .to_string()
                .contains("whitespace")
        );
        let missing = AuthConfig::ApiKeyFile(tmp.path().join("nope"));
        assert!(Auth::load(&missing, None).is_err());
    }

    #[test]
    fn env_key_or_tailnet() {
        assert_eq!(
            Auth::load(&AuthConfig::Tailnet, None).unwrap().describe(),
            "tailnet"
        );
        assert_eq!(
            Auth::load(&AuthConfig::Tailnet, Some("k1\n".into()))
                .unwrap()
                .describe(),
            "api_key (env)"
        );
        assert!(Auth::load(&AuthConfig::Tailnet, Some("".into())).is_err());
    }

    #[test]
    fn classifies_failures() {
        let refused = |status: u16, code: ErrorCode| BrokerError::Refused {
            status,
            body: ErrorBody {
                error: "no".into(),
                code,
                retry_after: None,
                rule: Some("bots.x.deny[0]".into()),
            },
        };
        let denied = refused(403, ErrorCode::PolicyDenied);
        assert!(denied.is_definitive() && denied.revokes_access());
        assert_eq!(denied.retry(), Retry::Later);
        assert_eq!(denied.local_status(), 403);
        assert_eq!(
            denied.to_string(),
            "no (policy_denied, rule bots.x.deny[0])"
        );
        let approval = refused(403, ErrorCode::ApprovalRequired);
        assert!(!approval.is_definitive() && !approval.revokes_access());
        let upstream = refused(502, ErrorCode::UpstreamUnavailable);
        assert_eq!(
            (upstream.retry(), upstream.local_status()),
            (Retry::Soon, 502)
        );
        let down = BrokerError::Unreachable("connection refused".into());
        assert_eq!(
            (down.retry(), down.local_status(), down.broker_answered()),
            (Retry::Soon, 503, false)
        );
    }
}
