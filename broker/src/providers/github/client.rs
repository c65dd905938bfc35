//! The real GitHub App client: REST calls with the app JWT, bounded, retried when GitHub
//! (not the request) failed, and mapped onto [`GithubError`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use botcreds_proto::{Permission, RepoName};
use rand::Rng;
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use zeroize::Zeroizing;

use super::errors::{GithubError, clean_text, upstream_message};
use super::jwt::AppJwt;
use super::{
    AppIdentity, GithubApi, InstallationToken, StatsCounters, UpstreamStats, permission_levels,
};
use crate::clock::SharedClock;
use crate::secret::Secret;

const USER_AGENT: &str = concat!("botcreds/", env!("CARGO_PKG_VERSION"));
const ACCEPT: &str = "application/vnd.github+json";
const API_VERSION: &str = "2022-11-28";
/// Largest response body read from GitHub; real answers are a few KiB.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// Attempts per call when GitHub answers 5xx or cannot be reached.
const MAX_ATTEMPTS: u32 = 3;
/// First retry delay; doubled per attempt, plus up to half of it again as jitter.
const DEFAULT_RETRY_BASE: Duration = Duration::from_millis(200);
/// How long an owner → installation id answer is trusted.
const INSTALLATION_CACHE_SECS: i64 = 600;
/// After a failed bot-user lookup, how long to wait before asking again.
const BOT_LOOKUP_RETRY_SECS: i64 = 600;
/// GitHub accepts at most this many repositories in one mint request.
const MAX_REPOSITORIES: usize = 500;
/// Longest wait reported for a rate limit (GitHub's windows are one hour).
const MAX_RETRY_AFTER_SECS: u64 = 3600;
/// Reported wait for a rate limit that names no time.
const DEFAULT_RETRY_AFTER_SECS: u64 = 60;

/// The GitHub App settings the client needs.
#[derive(Clone, Debug)]
pub struct GithubAppConfig {
    /// The numeric app id (sent as the JWT `iss`).
    pub app_id: u64,
    /// The app's RSA private key, PKCS#1 or PKCS#8 PEM.
    pub private_key_pem: Secret,
    /// `https://api.github.com`, or `https://HOST/api/v3` for GitHub Enterprise Server.
    pub api_url: String,
    /// The app's slug, if known; otherwise learned from `GET /app`.
    pub app_slug: Option<String>,
    /// The app bot's user id, if known; otherwise learned from `GET /users/{slug}[bot]`.
    pub bot_user_id: Option<u64>,
    /// Bound on each HTTP exchange with GitHub, body included.
    pub request_timeout: Duration,
}

/// The real GitHub App client.
pub struct GithubClient {
    http: reqwest::Client,
    /// The API base without a trailing slash; paths are appended.
    base: String,
    git_host: String,
    app_id: u64,
    jwt: AppJwt,
    clock: SharedClock,
    timeout: Duration,
    retry_base: Duration,
    installations: Mutex<HashMap<String, CachedInstallation>>,
    /// Serialises the first identity lookups so a burst of issuances asks GitHub once.
    identity: tokio::sync::Mutex<IdentityState>,
    stats: StatsCounters,
}

#[derive(Clone, Copy)]
struct CachedInstallation {
    id: u64,
    cached_at: OffsetDateTime,
}

#[derive(Default)]
struct IdentityState {
    slug: Option<String>,
    bot_user_id: Option<u64>,
    /// Set after a failed bot-user lookup: no new attempt before this time.
    bot_lookup_after: Option<OffsetDateTime>,
}

/// How a call authenticates.
enum Auth<'a> {
    AppJwt,
    Installation(&'a Secret),
    Anonymous,
}

/// A response read in full (bounded). The body is zeroized on drop: mint answers hold a token.
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for GithubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GithubClient")
            .field("app_id", &self.app_id)
            .field("api_url", &self.base)
            .field("git_host", &self.git_host)
            .finish_non_exhaustive()
    }
}

impl GithubClient {
    /// Validate the settings and parse the key now, so a bad key or URL stops start-up with
    /// a message naming the problem (never the key).
    pub fn new(config: GithubAppConfig, clock: SharedClock) -> Result<GithubClient, GithubError> {
        let (base, git_host) = parse_api_url(&config.api_url)?;
        let jwt = AppJwt::new(config.app_id, &config.private_key_pem)?;
        if let Some(slug) = &config.app_slug
            && !valid_slug(slug)
        {
            return Err(GithubError::Config {
                message: format!("app_slug {slug:?} is not a GitHub App slug"),
            });
        }
        if config.request_timeout.is_zero() {
            return Err(GithubError::Config {
                message: "the GitHub request timeout must be longer than zero".into(),
            });
        }
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout)
            // Never carry a JWT or token along a redirect; a moved repository is reported.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(USER_AGENT)
            .build()
            .map_err(|e| GithubError::Config {
                message: format!("cannot build the HTTP client: {}", error_chain(&e)),
            })?;
        Ok(GithubClient {
            http,
            base,
            git_host,
            app_id: config.app_id,
            jwt,
            clock,
            timeout: config.request_timeout,
            retry_base: DEFAULT_RETRY_BASE,
            installations: Mutex::new(HashMap::new()),
            identity: tokio::sync::Mutex::new(IdentityState {
                slug: config.app_slug,
                bot_user_id: config.bot_user_id,
                bot_lookup_after: None,
            }),
            stats: StatsCounters::new(),
        })
    }

    /// Change the first retry delay (default 200 ms). Test worlds that fake GitHub's
    /// failures use a short one.
    pub fn with_retry_backoff(mut self, base: Duration) -> GithubClient {
        self.retry_base = base;
        self
    }

    /// One call, retried with exponential backoff and jitter while GitHub answers 5xx or
    /// cannot be reached. Every other answer is returned as is for the caller to map.
    async fn call(
        &self,
        method: Method,
        path: &str,
        auth: Auth<'_>,
        body: Option<&Value>,
    ) -> Result<Reply, GithubError> {
        let mut attempt = 0;
        loop {
            let outcome = match self.exchange(method.clone(), path, &auth, body).await {
                Ok(reply) if reply.status >= 500 => Err(GithubError::Upstream {
                    status: reply.status,
                    message: upstream_message(&reply.body, reply.status),
                }),
                other => other,
            };
            attempt += 1;
            match outcome {
                Err(e) if e.is_transient() && attempt < MAX_ATTEMPTS => {
                    let delay = self.backoff(attempt);
                    tracing::debug!(
                        %method, path, attempt, error = %e, ?delay,
                        "GitHub call failed; retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
                other => return other,
            }
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.retry_base.saturating_mul(1 << (attempt - 1).min(16));
        let jitter_ms = u64::try_from(base.as_millis() / 2).unwrap_or(u64::MAX);
        base + Duration::from_millis(rand::rng().random_range(0..=jitter_ms))
    }

    /// One HTTP exchange: send, record counters and rate-limit headroom, read the bounded body.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        auth: &Auth<'_>,
        body: Option<&Value>,
    ) -> Result<Reply, GithubError> {
        let mut request = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .header(reqwest::header::ACCEPT, ACCEPT)
            .header("X-GitHub-Api-Version", API_VERSION);
        // bearer_auth marks the header sensitive, so it is left out of any Debug output.
        request = match auth {
            Auth::AppJwt => request.bearer_auth(self.jwt.bearer(self.clock.now())?.expose()),
            Auth::Installation(token) => request.bearer_auth(token.expose()),
            Auth::Anonymous => request,
        };
        if let Some(body) = body {
            request = request.json(body);
        }
        let mut response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                self.stats.call(false);
                return Err(self.transport_error(&e));
            }
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        self.stats.call(response.status().is_success());
        self.stats.rate_limit(
            header_u64(&headers, "x-ratelimit-remaining"),
            header_u64(&headers, "x-ratelimit-limit"),
        );
        if response
            .content_length()
            .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut body = Zeroizing::new(Vec::new());
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                        return Err(too_large());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => return Err(self.transport_error(&e)),
            }
        }
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    fn transport_error(&self, e: &reqwest::Error) -> GithubError {
        let message = if e.is_timeout() {
            format!("no answer within {:?}", self.timeout)
        } else if e.is_connect() {
            format!("cannot connect: {}", error_chain(e))
        } else {
            error_chain(e)
        };
        GithubError::Unavailable { message }
    }

    /// The error for a non-success answer, from its status (GitHub's text stays opaque).
    fn error_for(&self, reply: &Reply) -> GithubError {
        let message = upstream_message(&reply.body, reply.status);
        match reply.status {
            401 => GithubError::AuthFailed { message },
            403 | 429 => match self.rate_limit_wait(&reply.headers) {
                Some(retry_after_secs) => GithubError::RateLimited { retry_after_secs },
                None if reply.status == 429 => GithubError::RateLimited {
                    retry_after_secs: DEFAULT_RETRY_AFTER_SECS,
                },
                None => GithubError::Upstream {
                    status: 403,
                    message,
                },
            },
            422 => GithubError::ScopeRejected { message },
            301 | 302 | 307 | 308 => GithubError::Upstream {
                status: reply.status,
                message: format!("moved ({message}); was the repository renamed or transferred?"),
            },
            status => GithubError::Upstream { status, message },
        }
    }

    /// Seconds to wait when the headers say a rate limit was hit: `retry-after` (secondary
    /// limits), else the primary window's reset when `x-ratelimit-remaining` is 0.
    fn rate_limit_wait(&self, headers: &HeaderMap) -> Option<u64> {
        if let Some(secs) = header_u64(headers, "retry-after") {
            return Some(secs.clamp(1, MAX_RETRY_AFTER_SECS));
        }
        if header_u64(headers, "x-ratelimit-remaining") != Some(0) {
            return None;
        }
        let now = self.clock.now().unix_timestamp();
        Some(match header_u64(headers, "x-ratelimit-reset") {
            Some(reset) => {
                let wait = i64::try_from(reset).unwrap_or(i64::MAX).saturating_sub(now);
                u64::try_from(wait)
                    .unwrap_or(0)
                    .clamp(1, MAX_RETRY_AFTER_SECS)
            }
            None => DEFAULT_RETRY_AFTER_SECS,
        })
    }

    fn cached_installation(&self, owner_key: &str) -> Option<u64> {
        let now = self.clock.now();
        let mut cache = self.installations.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(owner_key) {
            Some(c)
                if (now - c.cached_at).whole_seconds() < INSTALLATION_CACHE_SECS
                    && c.cached_at <= now =>
            {
                Some(c.id)
            }
            Some(_) => {
                cache.remove(owner_key);
                None
            }
            None => None,
        }
    }

    fn forget_installation(&self, owner_key: &str) {
        let mut cache = self.installations.lock().unwrap_or_else(|e| e.into_inner());
        cache.remove(owner_key);
    }

    /// `GET /repos/{owner}/{repo}/installation`: the installation that covers `repo`, refused
    /// when suspended, remembered for the owner.
    async fn lookup_installation(
        &self,
        owner_key: &str,
        repo: &RepoName,
    ) -> Result<u64, GithubError> {
        let path = format!("/repos/{}/{}/installation", repo.owner(), repo.name());
        let reply = self.call(Method::GET, &path, Auth::AppJwt, None).await?;
        match reply.status {
            200..=299 => {}
            404 => {
                return Err(GithubError::NotInstalled {
                    owner: owner_key.to_string(),
                });
            }
            _ => return Err(self.error_for(&reply)),
        }
        let v = parse_json(&reply.body, "installation")?;
        let id = v
            .get("id")
            .and_then(Value::as_u64)
            .ok_or_else(|| invalid("the installation has no numeric id"))?;
        if v.get("suspended_at").is_some_and(|s| !s.is_null()) {
            return Err(GithubError::Suspended {
                owner: owner_key.to_string(),
            });
        }
        let mut cache = self.installations.lock().unwrap_or_else(|e| e.into_inner());
        // Owners are few (one per installation); the bound only guards against surprises.
        if cache.len() >= 10_000 {
            cache.clear();
        }
        cache.insert(
            owner_key.to_string(),
            CachedInstallation {
                id,
                cached_at: self.clock.now(),
            },
        );
        Ok(id)
    }

    /// `GET /app`: the app's slug.
    async fn fetch_app_slug(&self) -> Result<String, GithubError> {
        let reply = self.call(Method::GET, "/app", Auth::AppJwt, None).await?;
        if !(200..300).contains(&reply.status) {
            return Err(self.error_for(&reply));
        }
        let v = parse_json(&reply.body, "app")?;
        let slug = v
            .get("slug")
            .and_then(Value::as_str)
            .filter(|s| valid_slug(s))
            .ok_or_else(|| invalid("the app has no usable slug"))?;
        if let Some(id) = v.get("id").and_then(Value::as_u64)
            && id != self.app_id
        {
            tracing::warn!(
                configured = self.app_id,
                github = id,
                "GET /app names another app id than the configured one"
            );
        }
        Ok(slug.to_string())
    }

    /// `GET /users/{slug}[bot]` (no credentials needed): the bot account's user id.
    async fn fetch_bot_user_id(&self, slug: &str) -> Result<u64, GithubError> {
        let path = format!("/users/{slug}%5Bbot%5D");
        let reply = self.call(Method::GET, &path, Auth::Anonymous, None).await?;
        if !(200..300).contains(&reply.status) {
            return Err(self.error_for(&reply));
        }
        parse_json(&reply.body, "user")?
            .get("id")
            .and_then(Value::as_u64)
            .ok_or_else(|| invalid("the bot user has no numeric id"))
    }
}

#[async_trait::async_trait]
impl GithubApi for GithubClient {
    async fn create_installation_token(
        &self,
        owner: &str,
        repositories: &[RepoName],
        permissions: &[Permission],
    ) -> Result<InstallationToken, GithubError> {
        let body = mint_request(owner, repositories, permissions)?;
        let owner_key = owner.to_ascii_lowercase();
        // mint_request refused an empty list.
        let Some(first) = repositories.first() else {
            return Err(no_repository());
        };
        let (mut id, mut from_cache) = match self.cached_installation(&owner_key) {
            Some(id) => (id, true),
            None => (self.lookup_installation(&owner_key, first).await?, false),
        };
        loop {
            let path = format!("/app/installations/{id}/access_tokens");
            let reply = self
                .call(Method::POST, &path, Auth::AppJwt, Some(&body))
                .await?;
            match reply.status {
                200..=299 => {
                    let token = parse_token(&reply.body, id, owner, repositories, permissions)?;
                    self.stats.minted();
                    return Ok(token);
                }
                // A remembered installation may have been removed, re-installed or suspended
                // since: ask once more which installation covers the repository.
                404 | 403 if from_cache && self.rate_limit_wait(&reply.headers).is_none() => {
                    self.forget_installation(&owner_key);
                    id = self.lookup_installation(&owner_key, first).await?;
                    from_cache = false;
                }
                404 => {
                    self.forget_installation(&owner_key);
                    return Err(GithubError::NotInstalled { owner: owner_key });
                }
                _ => return Err(self.error_for(&reply)),
            }
        }
    }

    async fn revoke_installation_token(&self, token: &Secret) -> Result<(), GithubError> {
        let reply = self
            .call(
                Method::DELETE,
                "/installation/token",
                Auth::Installation(token),
                None,
            )
            .await?;
        match reply.status {
            200..=299 => Ok(()),
            // Expired or already revoked: the token is dead, which is the goal.
            401 => Ok(()),
            _ => Err(self.error_for(&reply)),
        }
    }

    async fn add_deploy_key(
        &self,
        token: &Secret,
        repo: &RepoName,
        title: &str,
        public_key: &str,
        read_only: bool,
    ) -> Result<u64, GithubError> {
        let path = format!("/repos/{}/{}/keys", repo.owner(), repo.name());
        let body = json!({"title": title, "key": public_key, "read_only": read_only});
        let reply = self
            .call(Method::POST, &path, Auth::Installation(token), Some(&body))
            .await?;
        match reply.status {
            200..=299 => parse_json(&reply.body, "deploy key")?
                .get("id")
                .and_then(Value::as_u64)
                .ok_or_else(|| invalid("the deploy key has no numeric id")),
            404 => Err(GithubError::NotInstalled {
                owner: repo.owner().to_ascii_lowercase(),
            }),
            // "key is already in use", or a key GitHub does not take.
            422 => Err(GithubError::KeyRejected {
                message: validation_message(&reply.body, reply.status),
            }),
            _ => match self.error_for(&reply) {
                GithubError::Upstream {
                    status: 403,
                    message,
                } => Err(GithubError::KeyRejected {
                    message: format!("{message} (the App needs administration:write on {repo})"),
                }),
                other => Err(other),
            },
        }
    }

    async fn delete_deploy_key(
        &self,
        token: &Secret,
        repo: &RepoName,
        key_id: u64,
    ) -> Result<(), GithubError> {
        let path = format!("/repos/{}/{}/keys/{key_id}", repo.owner(), repo.name());
        let reply = self
            .call(Method::DELETE, &path, Auth::Installation(token), None)
            .await?;
        match reply.status {
            200..=299 => Ok(()),
            // Deleted before (a retry after a lost answer), or gone with the repository.
            404 => Ok(()),
            _ => Err(self.error_for(&reply)),
        }
    }

    async fn app_identity(&self) -> Result<AppIdentity, GithubError> {
        let mut state = self.identity.lock().await;
        let slug = match &state.slug {
            Some(slug) => slug.clone(),
            None => {
                let slug = self.fetch_app_slug().await?;
                state.slug = Some(slug.clone());
                slug
            }
        };
        let now = self.clock.now();
        if state.bot_user_id.is_none() && state.bot_lookup_after.is_none_or(|t| now >= t) {
            match self.fetch_bot_user_id(&slug).await {
                Ok(id) => state.bot_user_id = Some(id),
                Err(e) => {
                    // Attribution works without the id (a plainer noreply address).
                    tracing::warn!(error = %e, slug, "could not learn the app bot's user id");
                    state.bot_lookup_after =
                        Some(now + time::Duration::seconds(BOT_LOOKUP_RETRY_SECS));
                }
            }
        }
        Ok(AppIdentity {
            slug,
            bot_user_id: state.bot_user_id,
        })
    }

    fn git_host(&self) -> &str {
        &self.git_host
    }

    fn stats(&self) -> UpstreamStats {
        self.stats.snapshot()
    }
}

/// The JSON body of a mint request, after refusing requests that would widen the token:
/// no repositories (GitHub would cover all of them), no permissions (all of the
/// installation's), another owner's repository, or more repositories than GitHub takes.
fn mint_request(
    owner: &str,
    repositories: &[RepoName],
    permissions: &[Permission],
) -> Result<Value, GithubError> {
    if repositories.is_empty() {
        return Err(no_repository());
    }
    if repositories.len() > MAX_REPOSITORIES {
        return Err(GithubError::ScopeRejected {
            message: format!(
                "{} repositories requested; one token covers at most {MAX_REPOSITORIES}",
                repositories.len()
            ),
        });
    }
    if let Some(other) = repositories
        .iter()
        .find(|r| !r.owner().eq_ignore_ascii_case(owner))
    {
        return Err(GithubError::ScopeRejected {
            message: format!(
                "repository {other} does not belong to {owner:?}; one token covers one owner"
            ),
        });
    }
    if permissions.is_empty() {
        return Err(GithubError::ScopeRejected {
            message: "no permission requested; refusing a token with all of the \
                      installation's permissions"
                .into(),
        });
    }
    let mut names: Vec<&str> = repositories.iter().map(RepoName::name).collect();
    names.sort_unstable();
    names.dedup();
    let levels: serde_json::Map<String, Value> = permission_levels(permissions)
        .into_iter()
        .map(|(name, level)| (name.to_string(), Value::from(level.as_str())))
        .collect();
    Ok(json!({ "repositories": names, "permissions": levels }))
}

fn no_repository() -> GithubError {
    GithubError::ScopeRejected {
        message: "no repository requested; refusing a token that would reach every \
                  repository of the installation"
            .into(),
    }
}

/// A 201 answer to a mint, read leniently: only `token` and `expires_at` are required. The
/// requested scope fills in what GitHub left out.
fn parse_token(
    body: &[u8],
    installation_id: u64,
    owner: &str,
    repositories: &[RepoName],
    permissions: &[Permission],
) -> Result<InstallationToken, GithubError> {
    let v = parse_json(body, "access token")?;
    let token = v
        .get("token")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("the access token answer has no token"))?;
    // Only the prefix is checked: the newer `ghs_APPID_JWT` form is long and variable.
    if !token.starts_with("ghs_") || token.len() <= 4 {
        return Err(invalid(
            "the token is not an installation token (no ghs_ prefix)",
        ));
    }
    // The token goes into HTTP headers and git credential lines.
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid("the token has characters outside printable ASCII"));
    }
    let expires_at = v
        .get("expires_at")
        .and_then(Value::as_str)
        .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
        .ok_or_else(|| invalid("expires_at is missing or not an RFC 3339 time"))?;
    let granted = match v.get("permissions").and_then(Value::as_object) {
        Some(map) => map
            .iter()
            .filter_map(|(k, v)| v.as_str().map(|l| (k.clone(), l.to_string())))
            .collect(),
        None => permission_levels(permissions)
            .into_iter()
            .map(|(n, l)| (n.to_string(), l.as_str().to_string()))
            .collect(),
    };
    let reached = match v.get("repositories").and_then(Value::as_array) {
        Some(list) => list
            .iter()
            .filter_map(|r| {
                r.get("full_name")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .or_else(|| {
                        r.get("name")
                            .and_then(Value::as_str)
                            .map(|n| format!("{owner}/{n}"))
                    })
            })
            .collect(),
        None => repositories.iter().map(|r| r.to_string()).collect(),
    };
    Ok(InstallationToken {
        token: Secret::new(token),
        expires_at,
        permissions: granted,
        repositories: reached,
        installation_id,
    })
}

/// A `validation-error` body's message with its first error's own message (`key is already
/// in use`), cleaned like [`upstream_message`].
fn validation_message(body: &[u8], status: u16) -> String {
    let first = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
        v.get("errors")?
            .as_array()?
            .first()
            .and_then(|e| e.get("message").or(Some(e)))
            .and_then(Value::as_str)
            .map(clean_text)
    });
    let message = upstream_message(body, status);
    match first {
        Some(f) if !f.is_empty() => format!("{message}: {f}"),
        _ => message,
    }
}

/// Parse a body as JSON without quoting it in the error (mint answers hold a token).
fn parse_json(body: &[u8], what: &str) -> Result<Value, GithubError> {
    serde_json::from_slice(body).map_err(|e| {
        invalid(&format!(
            "the {what} answer is not JSON (line {}, column {})",
            e.line(),
            e.column()
        ))
    })
}

fn invalid(message: &str) -> GithubError {
    GithubError::InvalidResponse {
        message: message.to_string(),
    }
}

fn too_large() -> GithubError {
    invalid(&format!(
        "the response body is larger than {} KiB",
        MAX_RESPONSE_BYTES / 1024
    ))
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// The error and its causes, made safe for one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    clean_text(&crate::error::error_chain(e))
}

/// GitHub App slugs: lower-case letters, digits and hyphens (case tolerated).
fn valid_slug(slug: &str) -> bool {
    !slug.is_empty()
        && slug.len() <= 100
        && slug
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Check an API base URL and split it into the base calls are appended to and the host git
/// URLs use.
fn parse_api_url(api_url: &str) -> Result<(String, String), GithubError> {
    let bad = |why: &str| GithubError::Config {
        message: format!(
            "api_url {api_url:?} {why}; use https://api.github.com or https://HOST/api/v3"
        ),
    };
    let url =
        reqwest::Url::parse(api_url.trim()).map_err(|e| bad(&format!("is not a URL ({e})")))?;
    if !matches!(url.scheme(), "https" | "http") {
        return Err(bad("is not http(s)"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("must not carry credentials"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("must not have a query or fragment"));
    }
    let Some(git_host) = derive_git_host(&url) else {
        return Err(bad("has no host"));
    };
    let base = url.as_str().trim_end_matches('/').to_string();
    Ok((base, git_host))
}

/// The git host for an API base URL: `https://api.github.com` → `github.com`,
/// `https://api.SUB.ghe.com` → `SUB.ghe.com`, `https://HOST[:port]/api/v3` → `HOST[:port]`;
/// any other URL → its own host. Refuses what [`GithubClient::new`] would refuse.
pub fn git_host_for(api_url: &str) -> Result<String, GithubError> {
    parse_api_url(api_url).map(|(_, host)| host)
}

fn derive_git_host(api_url: &reqwest::Url) -> Option<String> {
    let host = api_url.host_str()?;
    let host_port = |h: &str| match api_url.port() {
        Some(p) => format!("{h}:{p}"),
        None => h.to_string(),
    };
    let path = api_url.path().trim_end_matches('/');
    if path.is_empty()
        && let Some(rest) = host.strip_prefix("api.")
        && rest.contains('.')
    {
        return Some(host_port(rest));
    }
    Some(host_port(host))
}
