//! A faithful double of the GitHub REST API as a GitHub App sees it: app JWT verification, installation
//! lookup, installation tokens (mint, list repositories, revoke), rate-limit headers, and knobs to inject
//! outages, errors and rate limiting. Shapes, status codes and error bodies follow
//! `../shared/reference/github-app.md` and the fixtures in `tests/fixtures/github/`.
//!
//! # Quick start
//! ```no_run
//! # async fn demo() {
//! use botcreds_tests::fake_github::{FakeGithub, FakeGithubConfig};
//! let github = FakeGithub::start(FakeGithubConfig::default()).await;
//! // Point the broker at `github.base_url()` with app id 912345 and
//! // `tests/fixtures/github/test-app-key.pem` (see `fixtures::write_app_private_key`).
//! let url = github.base_url();
//! # let _ = url;
//! assert_eq!(github.mint_count(), 0);
//! # }
//! ```
//!
//! # Endpoints (relative to [`FakeGithub::base_url`])
//! | Method and path | Auth | Success |
//! |---|---|---|
//! | `GET /app` | JWT | 200 `integration` |
//! | `GET /app/installations` (`per_page`, `page`, `Link`) | JWT | 200 array of `installation` |
//! | `GET /app/installations/{id}` | JWT | 200 `installation`; 404 |
//! | `POST /app/installations/{id}/access_tokens` | JWT | 201 `installation-token`; 403 suspended, 404, 422 |
//! | `GET /repos/{owner}/{repo}/installation` | JWT | 200; 404 `error-404-not-installed.json` |
//! | `GET /orgs/{org}/installation` (organisations only) | JWT | 200; 404 |
//! | `GET /users/{user}/installation` (any account) | JWT | 200; 404 |
//! | `DELETE /installation/token` | the token | 204; 401 `error-401-bad-credentials.json` |
//! | `GET /installation/repositories` (`per_page`, `page`, `Link`) | a token | 200 |
//! | `GET /users/{login}` (`{slug}[bot]` and installation accounts) | none | 200; 404 |
//! | `POST /repos/{owner}/{repo}/keys` (`key`, `title`, `read_only`) | a token with `administration:write` on the repo | 201 `deploy-key`; 403, 404, 422 (malformed, or key already in use on any repo) |
//! | `GET /repos/{owner}/{repo}/keys` | same | 200 array of `deploy-key` |
//! | `DELETE /repos/{owner}/{repo}/keys/{id}` | same | 204; 404 when no such key (a double delete) |
//!
//! A token reaching the repository without `administration:write` gets `403` "Resource not
//! accessible by integration" with `x-accepted-github-permissions: administration=write`; a token
//! not reaching the repository gets `404`. [`FakeGithub::deploy_keys`] lists the keys held.
//!
//! Every answer carries `x-ratelimit-{limit,remaining,used,reset,resource}`, `x-github-request-id`
//! and `x-github-api-version-selected`. JSON bodies use `application/json; charset=utf-8`.
//!
//! # Authentication rules
//! - A request without a non-empty `User-Agent` gets `403` (plain text) before anything else.
//! - JWT endpoints want `Authorization: Bearer <JWT>`, RS256 over the configured public key. Missing,
//!   malformed, badly signed, non-RS256, or with an `iss` that is neither the app id (number or string)
//!   nor the client id: 401 `error-401-bad-jwt.json`. `exp - now > 600`: 401
//!   `error-401-jwt-exp-too-far.json`. Expired, `iat` more than 60 s ahead, or `exp`/`iat` not integers:
//!   401 with GitHub's observed message for that claim. "now" is the fake's clock, see
//!   [`FakeGithub::set_clock_skew`].
//! - Token endpoints take `Authorization: Bearer <token>` or `token <token>`. No header: 401
//!   `Requires authentication`; unknown, expired or revoked: 401 `error-401-bad-credentials.json`.
//!
//! # Rate limits
//! Each credential has its own hourly window of [`FakeGithubConfig::rate_limit`] requests: JWT calls
//! count against the app, token calls against the token's installation, anonymous calls against a
//! 60-request window. A request over the limit gets `403` with `error-403-rate-limited.json` and
//! `x-ratelimit-remaining: 0`. [`FakeGithub::exhaust_rate_limit`] and
//! [`FakeGithub::set_secondary_rate_limit`] force that state (the latter as `429` with `retry-after`).
//!
//! Messages GitHub does not document (marked UNVERIFIED in the reference) are the observed ones:
//! match on status codes in code under test.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rand::Rng;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::fixtures;
use crate::switchable::SwitchableServer;

/// Every `app-permissions` name of api.github.com with the levels it accepts (reference §6).
pub const APP_PERMISSIONS: &[(&str, &[&str])] = &[
    ("actions", RW),
    ("administration", RW),
    ("artifact_metadata", RW),
    ("attestations", RW),
    ("checks", RW),
    ("code_quality", RW),
    ("codespaces", RW),
    ("contents", RW),
    ("dependabot_secrets", RW),
    ("deployments", RW),
    ("discussions", RW),
    ("environments", RW),
    ("issues", RW),
    ("merge_queues", RW),
    ("metadata", RW),
    ("packages", RW),
    ("pages", RW),
    ("pull_requests", RW),
    ("repository_custom_properties", RW),
    ("repository_hooks", RW),
    ("repository_projects", RWA),
    ("secret_scanning_alerts", RW),
    ("secrets", RW),
    ("security_events", RW),
    ("single_file", RW),
    ("statuses", RW),
    ("vulnerability_alerts", RW),
    ("workflows", &["write"]),
    ("custom_properties_for_organizations", RW),
    ("members", RW),
    ("organization_administration", RW),
    ("organization_custom_roles", RW),
    ("organization_custom_org_roles", RW),
    ("organization_custom_properties", RWA),
    ("organization_copilot_seat_management", RW),
    ("organization_copilot_agent_settings", RW),
    ("organization_announcement_banners", RW),
    ("organization_events", &["read"]),
    ("organization_hooks", RW),
    ("organization_personal_access_tokens", RW),
    ("organization_personal_access_token_requests", RW),
    ("organization_plan", &["read"]),
    ("organization_projects", RWA),
    ("organization_packages", RW),
    ("organization_secrets", RW),
    ("organization_self_hosted_runners", RW),
    ("organization_user_blocking", RW),
    ("email_addresses", RW),
    ("followers", RW),
    ("git_ssh_keys", RW),
    ("gpg_keys", RW),
    ("interaction_limits", RW),
    ("profile", &["write"]),
    ("starring", RW),
    ("enterprise_custom_properties_for_organizations", RWA),
];

/// Permissions GHES 3.19 has beyond api.github.com's list (reference §6).
const GHES_EXTRA_PERMISSIONS: &[&str] = &[
    "enterprise_administration",
    "enterprise_custom_properties",
    "enterprise_organization_installations",
    "enterprise_organization_installation_repositories",
];
/// Permissions of api.github.com that GHES 3.19 lacks.
const GHES_MISSING_PERMISSIONS: &[&str] = &[
    "custom_properties_for_organizations",
    "enterprise_custom_properties_for_organizations",
];

const RW: &[&str] = &["read", "write"];
const RWA: &[&str] = &["read", "write", "admin"];

/// The path prefix a GitHub Enterprise Server puts in front of the REST API.
pub const GHES_PREFIX: &str = "/api/v3";

const ANONYMOUS_RATE_LIMIT: u32 = 60;
const RATE_WINDOW_SECS: i64 = 3600;
const REQUEST_LOG_CAPACITY: usize = 10_000;
const JWT_CACHE_CAPACITY: usize = 256;
/// `exp` may be at most this far ahead of GitHub's clock.
const MAX_JWT_LIFETIME_SECS: i64 = 600;
/// `iat` may be at most this far ahead of GitHub's clock.
const IAT_FUTURE_TOLERANCE_SECS: i64 = 60;
const INSTALLATION_CREATED_AT: &str = "2025-11-02T14:20:31Z";
const INSTALLATION_UPDATED_AT: &str = "2026-07-30T08:41:09Z";
const DOCS: &str = "https://docs.github.com/rest";
const DOCS_CREATE_TOKEN: &str =
    "https://docs.github.com/rest/apps/apps#create-an-installation-access-token-for-an-app";
const DEFAULT_API_VERSION: &str = "2022-11-28";

/// The kind of account an app is installed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccountType {
    /// `"Organization"`.
    Organization,
    /// `"User"`.
    User,
}

impl AccountType {
    fn as_str(self) -> &'static str {
        match self {
            AccountType::Organization => "Organization",
            AccountType::User => "User",
        }
    }
}

/// The installation's `repository_selection`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepositorySelection {
    /// `"all"`: every repository of the account (the [`InstallationSpec::repositories`] listed).
    All,
    /// `"selected"`: only the listed repositories.
    Selected,
}

impl RepositorySelection {
    fn as_str(self) -> &'static str {
        match self {
            RepositorySelection::All => "all",
            RepositorySelection::Selected => "selected",
        }
    }
}

/// The form of the installation tokens the fake hands out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenFormat {
    /// `ghs_` + 36 alphanumerics (40 characters), the classic form.
    Classic,
    /// The newer stateless form `ghs_<APPID>_<JWT-like>`: longer, variable length, with dots and
    /// base64url characters. Clients must only rely on the `ghs_` prefix.
    Long,
}

/// One installation of the app, as configured for a test.
#[derive(Clone, Debug)]
pub struct InstallationSpec {
    /// The installation id (`id`, used in `/app/installations/{id}`).
    pub id: u64,
    /// The account login the app is installed on (`account.login`).
    pub owner: String,
    /// The account's id (`account.id`, `target_id`).
    pub account_id: u64,
    /// Organisation or user.
    pub account_type: AccountType,
    /// What the installation was granted: permission name → `read`/`write`/`admin`.
    pub permissions: BTreeMap<String, String>,
    /// Repository names (without owner) the installation reaches; with
    /// [`RepositorySelection::All`] these are all the account's repositories.
    pub repositories: Vec<String>,
    /// `repository_selection`.
    pub repository_selection: RepositorySelection,
    /// A suspended installation can be looked up but cannot mint tokens (403).
    pub suspended: bool,
}

impl InstallationSpec {
    /// An installation on an organisation, with `metadata: read` (which every installation has), no
    /// repositories and `selected` repository selection.
    pub fn organization(owner: &str, id: u64) -> Self {
        Self::new(owner, id, AccountType::Organization)
    }

    /// An installation on a user account; otherwise like [`InstallationSpec::organization`].
    pub fn user(owner: &str, id: u64) -> Self {
        Self::new(owner, id, AccountType::User)
    }

    fn new(owner: &str, id: u64, account_type: AccountType) -> Self {
        Self {
            id,
            owner: owner.to_owned(),
            account_id: derived_id(&format!("account:{owner}"), 1_000_000, 90_000_000),
            account_type,
            permissions: BTreeMap::from([("metadata".to_owned(), "read".to_owned())]),
            repositories: Vec::new(),
            repository_selection: RepositorySelection::Selected,
            suspended: false,
        }
    }

    /// Sets the account id (default: derived from the login).
    pub fn account_id(mut self, id: u64) -> Self {
        self.account_id = id;
        self
    }

    /// Grants a permission at a level, e.g. `("contents", "write")`.
    pub fn permission(mut self, name: &str, level: &str) -> Self {
        self.permissions.insert(name.to_owned(), level.to_owned());
        self
    }

    /// Adds repositories by name (without the owner).
    pub fn repositories<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.repositories.extend(names.into_iter().map(Into::into));
        self
    }

    /// Marks the installation as covering all the account's repositories (`"all"`).
    pub fn all_repositories(mut self) -> Self {
        self.repository_selection = RepositorySelection::All;
        self
    }

    /// Marks the installation as suspended.
    pub fn suspended(mut self) -> Self {
        self.suspended = true;
        self
    }
}

/// How the fake GitHub is set up. [`Default`] reproduces the fixtures: app `912345`
/// (`acme-credbroker`), installed on `acme-corp` (`51234567`: `web`, `infra`; administration write,
/// contents write, metadata read, pull_requests write, checks read) and, suspended, on the user
/// `jdoe-dev` (`51299881`, all repositories: `dotfiles`; contents read, metadata read).
#[derive(Clone, Debug)]
pub struct FakeGithubConfig {
    /// The numeric app id (accepted as `iss`, as a number or a string).
    pub app_id: u64,
    /// The app's client id (also accepted as `iss`).
    pub client_id: String,
    /// The app slug; the bot user is `{app_slug}[bot]`.
    pub app_slug: String,
    /// The app's display name (`GET /app` → `name`).
    pub app_name: String,
    /// The id of the `{app_slug}[bot]` user (`GET /users/{slug}[bot]`); commit e-mails use it.
    pub bot_user_id: u64,
    /// The app's RSA public key (SPKI PEM) that JWT signatures are checked against.
    pub public_key_pem: String,
    /// The installations of the app.
    pub installations: Vec<InstallationSpec>,
    /// The form of minted tokens.
    pub token_format: TokenFormat,
    /// How long minted tokens live (GitHub: one hour). `expires_at` is truncated to whole seconds.
    pub token_lifetime: Duration,
    /// Serve under [`GHES_PREFIX`] like GitHub Enterprise Server; [`FakeGithub::base_url`] then ends
    /// in `/api/v3` and paths without the prefix are 404.
    pub ghes: bool,
    /// Requests per hour per credential (GitHub: at least 5000 for an installation).
    pub rate_limit: u32,
}

impl Default for FakeGithubConfig {
    fn default() -> Self {
        Self::empty()
            .with_installation(
                InstallationSpec::organization(fixtures::ORG, fixtures::INSTALLATION_ID)
                    .account_id(fixtures::ORG_ACCOUNT_ID)
                    .permission("administration", "write")
                    .permission("contents", "write")
                    .permission("pull_requests", "write")
                    .permission("checks", "read")
                    .repositories(["web", "infra"]),
            )
            .with_installation(
                InstallationSpec::user(fixtures::USER, fixtures::USER_INSTALLATION_ID)
                    .account_id(fixtures::USER_ACCOUNT_ID)
                    .permission("contents", "read")
                    .repositories(["dotfiles"])
                    .all_repositories()
                    .suspended(),
            )
    }
}

impl FakeGithubConfig {
    /// The fixture app with no installations; add them with [`FakeGithubConfig::with_installation`].
    pub fn empty() -> Self {
        Self {
            app_id: fixtures::APP_ID,
            client_id: fixtures::CLIENT_ID.to_owned(),
            app_slug: fixtures::APP_SLUG.to_owned(),
            app_name: "Acme Credbroker".to_owned(),
            bot_user_id: 41898283,
            public_key_pem: fixtures::app_public_key_pem(),
            installations: Vec::new(),
            token_format: TokenFormat::Classic,
            token_lifetime: Duration::from_secs(3600),
            ghes: false,
            rate_limit: 5000,
        }
    }

    /// Adds an installation.
    pub fn with_installation(mut self, installation: InstallationSpec) -> Self {
        self.installations.push(installation);
        self
    }

    /// Serves under `/api/v3` like GitHub Enterprise Server.
    pub fn ghes(mut self) -> Self {
        self.ghes = true;
        self
    }

    /// Hands out tokens in `format`.
    pub fn token_format(mut self, format: TokenFormat) -> Self {
        self.token_format = format;
        self
    }

    /// Sets the lifetime of minted tokens.
    pub fn token_lifetime(mut self, lifetime: Duration) -> Self {
        self.token_lifetime = lifetime;
        self
    }

    /// Sets the per-credential hourly request limit.
    pub fn rate_limit(mut self, limit: u32) -> Self {
        self.rate_limit = limit;
        self
    }
}

/// What the fake knows about a token it issued, for assertions and for the git smart-HTTP double,
/// which accepts only tokens GitHub issued and only for what they cover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    /// The installation the token belongs to.
    pub installation_id: u64,
    /// The installation's account login.
    pub owner: String,
    /// Repositories the token reaches, as `owner/name` (all of the installation's when none were named).
    pub repositories: Vec<String>,
    /// The token's permissions: name → level.
    pub permissions: BTreeMap<String, String>,
    /// When the token stops working (the `expires_at` that was returned).
    pub expires_at: OffsetDateTime,
    /// Whether the token was revoked (`DELETE /installation/token`, [`FakeGithub::revoke_all`]).
    pub revoked: bool,
}

impl TokenInfo {
    /// Neither revoked nor expired.
    pub fn is_active(&self) -> bool {
        !self.revoked && OffsetDateTime::now_utc() < self.expires_at
    }

    /// Whether the token is active, reaches `repository` (`owner/name`, case-insensitive) and holds
    /// `permission` at `level` or above (`read` < `write` < `admin`; write covers read).
    pub fn allows(&self, repository: &str, permission: &str, level: &str) -> bool {
        self.is_active()
            && self
                .repositories
                .iter()
                .any(|r| r.eq_ignore_ascii_case(repository))
            && self
                .permissions
                .get(permission)
                .is_some_and(|held| level_rank(held) >= level_rank(level) && level_rank(level) > 0)
    }
}

/// A deploy key the fake holds (`POST /repos/{o}/{r}/keys`), until it is deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeployKey {
    pub id: u64,
    /// `owner/name` as the installation spells it.
    pub repository: String,
    /// The public key line as sent (`ssh-ed25519 AAAA... comment`).
    pub key: String,
    pub title: String,
    pub read_only: bool,
    pub created_at: String,
}

impl DeployKey {
    /// The key type and base64 body, without the comment: what "already in use" compares.
    fn material(&self) -> String {
        key_material(&self.key)
    }
}

fn key_material(line: &str) -> String {
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// One request the fake answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path relative to the API root (without `/api/v3` on GHES) and without the query.
    pub path: String,
    /// The status answered.
    pub status: u16,
}

/// A forced rate-limit state, see [`FakeGithub::exhaust_rate_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RateLimitMode {
    Normal,
    Exhausted,
    Secondary { retry_after_secs: u64 },
}

/// The fake GitHub server: a cheap `Clone` handle; the server stops when the last handle drops.
#[derive(Clone)]
pub struct FakeGithub {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    server: SwitchableServer,
    addr: SocketAddr,
}

impl std::fmt::Debug for FakeGithub {
    // Tokens and keys stay out of debug output: only where it listens.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeGithub")
            .field("base_url", &self.inner.shared.base_url)
            .finish()
    }
}

impl FakeGithub {
    /// Starts the fake on `127.0.0.1` with a free port.
    ///
    /// # Panics
    /// If the configuration is invalid (bad public key, an unknown permission name or level, two
    /// installations with one id) or no port can be bound: both are mistakes in the test.
    pub async fn start(config: FakeGithubConfig) -> FakeGithub {
        let key = DecodingKey::from_rsa_pem(config.public_key_pem.as_bytes()).unwrap_or_else(|e| {
            panic!("FakeGithubConfig.public_key_pem is not an RSA public key: {e}")
        });
        let installations = build_installations(&config);
        let prefix = if config.ghes { GHES_PREFIX } else { "" };
        let ledger = Ledger {
            installations,
            tokens: HashMap::new(),
            token_format: config.token_format,
            token_lifetime: config.token_lifetime,
            mint_count: 0,
            log: VecDeque::new(),
            path_counts: HashMap::new(),
            fail_next: 0,
            fail_status: StatusCode::INTERNAL_SERVER_ERROR,
            delay: Duration::ZERO,
            rate_mode: RateLimitMode::Normal,
            buckets: HashMap::new(),
            last_jwt_claims: None,
            verified_jwts: HashMap::new(),
            clock_skew_secs: 0,
            request_seq: 0,
            deploy_keys: Vec::new(),
            next_deploy_key_id: 71_000_001,
        };
        // Bodies carry URLs with the port, so bind before building the state and the router.
        let bound = SwitchableServer::bind_tcp(SocketAddr::from(([127, 0, 0, 1], 0)))
            .unwrap_or_else(|e| panic!("fake GitHub cannot bind 127.0.0.1: {e}"));
        let addr = bound.local_addr();
        let origin = format!("http://{addr}");
        let base_url = format!("{origin}{prefix}");
        let web_url = if config.ghes {
            origin
        } else {
            "https://github.com".to_owned()
        };
        let shared = Arc::new(Shared {
            app_id: config.app_id,
            client_id: config.client_id.clone(),
            slug: config.app_slug.clone(),
            app_name: config.app_name.clone(),
            bot_user_id: config.bot_user_id,
            ghes: config.ghes,
            prefix,
            base_url,
            web_url,
            key,
            rate_limit: config.rate_limit,
            bodies: Bodies::load(),
            ledger: Mutex::new(ledger),
            mints_open: tokio::sync::watch::channel(true).0,
        });
        let server = bound.serve(build_router(shared.clone(), prefix));
        FakeGithub {
            inner: Arc::new(Inner {
                shared,
                server,
                addr,
            }),
        }
    }

    /// The REST base URL to give the broker: `http://127.0.0.1:PORT`, or
    /// `http://127.0.0.1:PORT/api/v3` with [`FakeGithubConfig::ghes`].
    pub fn base_url(&self) -> String {
        self.inner.shared.base_url.clone()
    }

    /// `base_url() + path`, e.g. `url("/app")`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.inner.shared.base_url)
    }

    /// The socket address the fake listens on.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Takes the server down (the listener is closed, so connections are refused, and open
    /// keep-alive connections are dropped) or brings it back on the same port. Returns once in effect.
    ///
    /// # Panics
    /// If the port cannot be bound again.
    pub async fn set_down(&self, down: bool) {
        self.inner.server.set_down(down).await.unwrap_or_else(|e| {
            panic!(
                "fake GitHub cannot listen on {} again: {e}",
                self.inner.addr
            )
        });
    }

    /// Stops serving for good (same as dropping the last handle, but waits until the port is closed).
    pub async fn shutdown(self) {
        self.set_down(true).await;
    }

    /// Answers the next `n` requests (any path, before authentication) with `status` and a
    /// `basic-error` JSON body whose message is the status's reason phrase.
    pub fn fail_next(&self, n: u32, status: u16) {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut st = self.inner.shared.lock();
        st.fail_next = n;
        st.fail_status = status;
    }

    /// Delays every answer by `delay` (zero turns it off), to exercise client timeouts.
    pub fn set_delay(&self, delay: Duration) {
        self.inner.shared.lock().delay = delay;
    }

    /// Holds every token mint (`POST .../access_tokens`) at the door until
    /// [`FakeGithub::release_mints`], so a test can act while a mint is in flight.
    pub fn hold_mints(&self) {
        self.inner.shared.mints_open.send_replace(false);
    }

    /// Lets held and later mints through.
    pub fn release_mints(&self) {
        self.inner.shared.mints_open.send_replace(true);
    }

    /// Makes every credential over its limit: each request gets `403` with the rate-limited fixture
    /// and `x-ratelimit-remaining: 0` until [`FakeGithub::restore_rate_limit`].
    pub fn exhaust_rate_limit(&self) {
        self.inner.shared.lock().rate_mode = RateLimitMode::Exhausted;
    }

    /// Answers every request with a secondary rate limit: `429`, `retry-after: <secs>`,
    /// `x-ratelimit-remaining: 0`, until [`FakeGithub::restore_rate_limit`].
    pub fn set_secondary_rate_limit(&self, retry_after: Duration) {
        self.inner.shared.lock().rate_mode = RateLimitMode::Secondary {
            retry_after_secs: retry_after.as_secs(),
        };
    }

    /// Ends a forced rate limit and starts fresh windows for every credential.
    pub fn restore_rate_limit(&self) {
        let mut st = self.inner.shared.lock();
        st.rate_mode = RateLimitMode::Normal;
        st.buckets.clear();
    }

    /// Shifts the fake's clock for JWT checks by `secs` (positive: GitHub's clock is ahead of ours),
    /// to test a client's tolerance of clock drift.
    pub fn set_clock_skew(&self, secs: i64) {
        self.inner.shared.lock().clock_skew_secs = secs;
    }

    /// Sets the lifetime of tokens minted from now on.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.inner.shared.lock().token_lifetime = lifetime;
    }

    /// Suspends or unsuspends an installation at run time. Suspended installations still answer
    /// lookups (with `suspended_at`/`suspended_by` set) but minting gets 403 and their tokens stop
    /// working (403). Returns false if there is no such installation.
    pub fn set_suspended(&self, installation_id: u64, suspended: bool) -> bool {
        let mut st = self.inner.shared.lock();
        match st
            .installations
            .iter_mut()
            .find(|i| i.id == installation_id)
        {
            Some(installation) => {
                installation.suspended_at = suspended.then(|| rfc3339(OffsetDateTime::now_utc()));
                true
            }
            None => false,
        }
    }

    /// How many tokens were minted (`201` answers of `POST .../access_tokens`).
    pub fn mint_count(&self) -> u64 {
        self.inner.shared.lock().mint_count
    }

    /// How many requests had a path (relative to the API root) starting with `path_prefix`,
    /// whatever their status; e.g. `calls("/app/installations/")` or `calls("/repos/")`.
    pub fn calls(&self, path_prefix: &str) -> u64 {
        self.inner
            .shared
            .lock()
            .path_counts
            .iter()
            .filter(|(path, _)| path.starts_with(path_prefix))
            .map(|(_, n)| n)
            .sum()
    }

    /// The most recent requests (up to 10 000), oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.inner.shared.lock().log.iter().cloned().collect()
    }

    /// What the fake knows about `token`, if it issued it (also after expiry or revocation).
    pub fn token_info(&self, token: &str) -> Option<TokenInfo> {
        let st = self.inner.shared.lock();
        st.tokens.get(token).map(|record| record.info(&st))
    }

    /// All tokens issued so far, for assertions that cannot know the token value (no values returned).
    pub fn issued_tokens(&self) -> Vec<TokenInfo> {
        let st = self.inner.shared.lock();
        st.tokens.values().map(|record| record.info(&st)).collect()
    }

    /// Revokes every token issued so far.
    pub fn revoke_all(&self) {
        for record in self.inner.shared.lock().tokens.values_mut() {
            record.revoked = true;
        }
    }

    /// Makes every token issued so far expire now (a client then gets 401 Bad credentials).
    pub fn expire_all(&self) {
        let now = OffsetDateTime::now_utc();
        for record in self.inner.shared.lock().tokens.values_mut() {
            record.expires_at = record.expires_at.min(now);
        }
    }

    /// The deploy keys the fake holds now, in creation order.
    pub fn deploy_keys(&self) -> Vec<DeployKey> {
        self.inner.shared.lock().deploy_keys.clone()
    }

    /// The claims of the last JWT whose signature verified (whether or not its claims were accepted).
    pub fn last_jwt_claims(&self) -> Option<Value> {
        self.inner.shared.lock().last_jwt_claims.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// State

struct Shared {
    app_id: u64,
    client_id: String,
    slug: String,
    app_name: String,
    bot_user_id: u64,
    ghes: bool,
    prefix: &'static str,
    base_url: String,
    web_url: String,
    key: DecodingKey,
    rate_limit: u32,
    bodies: Bodies,
    ledger: Mutex<Ledger>,
    /// `false` while [`FakeGithub::hold_mints`] holds token mints at the door.
    mints_open: tokio::sync::watch::Sender<bool>,
}

struct Ledger {
    installations: Vec<Installation>,
    tokens: HashMap<String, TokenRecord>,
    token_format: TokenFormat,
    token_lifetime: Duration,
    mint_count: u64,
    log: VecDeque<RequestRecord>,
    path_counts: HashMap<String, u64>,
    fail_next: u32,
    fail_status: StatusCode,
    delay: Duration,
    rate_mode: RateLimitMode,
    buckets: HashMap<Bucket, Window>,
    last_jwt_claims: Option<Value>,
    verified_jwts: HashMap<String, Value>,
    clock_skew_secs: i64,
    request_seq: u64,
    deploy_keys: Vec<DeployKey>,
    next_deploy_key_id: u64,
}

#[derive(Clone)]
struct Installation {
    id: u64,
    owner: String,
    account_id: u64,
    account_type: AccountType,
    permissions: BTreeMap<String, String>,
    repos: Vec<Repo>,
    selection: RepositorySelection,
    suspended_at: Option<String>,
}

#[derive(Clone)]
struct Repo {
    id: u64,
    name: String,
}

struct TokenRecord {
    installation_id: u64,
    repo_ids: Vec<u64>,
    selection: RepositorySelection,
    permissions: BTreeMap<String, String>,
    expires_at: OffsetDateTime,
    revoked: bool,
}

impl TokenRecord {
    fn info(&self, st: &Ledger) -> TokenInfo {
        let installation = st
            .installations
            .iter()
            .find(|i| i.id == self.installation_id);
        let owner = installation.map(|i| i.owner.clone()).unwrap_or_default();
        let repositories = installation
            .map(|i| {
                i.repos
                    .iter()
                    .filter(|r| self.repo_ids.contains(&r.id))
                    .map(|r| format!("{}/{}", i.owner, r.name))
                    .collect()
            })
            .unwrap_or_default();
        TokenInfo {
            installation_id: self.installation_id,
            owner,
            repositories,
            permissions: self.permissions.clone(),
            expires_at: self.expires_at,
            revoked: self.revoked,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Bucket {
    App,
    Installation(u64),
    Anonymous,
}

struct Window {
    used: u32,
    reset: i64,
}

/// The rate-limit headers of one answer.
struct RateSnapshot {
    limit: u32,
    used: u32,
    reset: i64,
}

impl RateSnapshot {
    fn apply(&self, headers: &mut HeaderMap) {
        let remaining = self.limit.saturating_sub(self.used);
        for (name, value) in [
            ("x-ratelimit-limit", self.limit.to_string()),
            ("x-ratelimit-remaining", remaining.to_string()),
            ("x-ratelimit-used", self.used.to_string()),
            ("x-ratelimit-reset", self.reset.to_string()),
            ("x-ratelimit-resource", "core".to_owned()),
        ] {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        }
    }
}

/// Fixture error bodies, served byte-for-byte.
struct Bodies {
    bad_jwt: Bytes,
    exp_too_far: Bytes,
    bad_credentials: Bytes,
    rate_limited: Bytes,
    secondary_rate_limited: Bytes,
    not_installed: Bytes,
    permissions_422: Bytes,
    repositories_422: Bytes,
}

impl Bodies {
    fn load() -> Self {
        let rate_limited = fixtures::github("error-403-rate-limited.json");
        // The same body answered as 429: only the status inside changes.
        let secondary = String::from_utf8_lossy(&rate_limited)
            .replace("\"status\": \"403\"", "\"status\": \"429\"");
        Self {
            bad_jwt: fixtures::github("error-401-bad-jwt.json").into(),
            exp_too_far: fixtures::github("error-401-jwt-exp-too-far.json").into(),
            bad_credentials: fixtures::github("error-401-bad-credentials.json").into(),
            rate_limited: rate_limited.into(),
            secondary_rate_limited: secondary.into(),
            not_installed: fixtures::github("error-404-not-installed.json").into(),
            permissions_422: fixtures::github("error-422-permissions.json").into(),
            repositories_422: fixtures::github("error-422-repositories.json").into(),
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ledger> {
        // A panicking test thread must not take the fake down with it.
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn relative<'a>(&self, path: &'a str) -> &'a str {
        path.strip_prefix(self.prefix).unwrap_or(path)
    }

    fn permission_known(&self, name: &str, level: &str) -> bool {
        if self.ghes {
            if GHES_EXTRA_PERMISSIONS.contains(&name) {
                return RW.contains(&level);
            }
            if GHES_MISSING_PERMISSIONS.contains(&name) {
                return false;
            }
        }
        APP_PERMISSIONS
            .iter()
            .any(|(known, levels)| *known == name && levels.contains(&level))
    }

    /// The credential a request is counted against.
    fn bucket_for(&self, st: &Ledger, headers: &HeaderMap) -> Bucket {
        match authorization(headers) {
            Some((_, credential)) if credential.starts_with("ghs_") => {
                st.tokens.get(credential).map_or(Bucket::Anonymous, |t| {
                    Bucket::Installation(t.installation_id)
                })
            }
            Some((scheme, credential))
                if scheme.eq_ignore_ascii_case("bearer") && credential.split('.').count() == 3 =>
            {
                Bucket::App
            }
            _ => Bucket::Anonymous,
        }
    }

    /// Counts a request against its credential's window, or answers it as rate limited.
    fn charge(&self, st: &mut Ledger, bucket: Bucket) -> Result<RateSnapshot, Box<Response>> {
        let limit = if bucket == Bucket::Anonymous {
            ANONYMOUS_RATE_LIMIT
        } else {
            self.rate_limit
        };
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mode = st.rate_mode;
        let window = st.buckets.entry(bucket).or_insert(Window {
            used: 0,
            reset: now + RATE_WINDOW_SECS,
        });
        if now >= window.reset {
            window.used = 0;
            window.reset = now + RATE_WINDOW_SECS;
        }
        let exhausted = RateSnapshot {
            limit,
            used: limit,
            reset: window.reset,
        };
        match mode {
            RateLimitMode::Secondary { retry_after_secs } => {
                let mut response = raw_json(
                    StatusCode::TOO_MANY_REQUESTS,
                    self.bodies.secondary_rate_limited.clone(),
                );
                exhausted.apply(response.headers_mut());
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
                Err(Box::new(response))
            }
            RateLimitMode::Exhausted => Err(Box::new(self.rate_limited(&exhausted))),
            RateLimitMode::Normal if window.used >= limit => {
                Err(Box::new(self.rate_limited(&exhausted)))
            }
            RateLimitMode::Normal => {
                window.used += 1;
                Ok(RateSnapshot {
                    limit,
                    used: window.used,
                    reset: window.reset,
                })
            }
        }
    }

    fn rate_limited(&self, snapshot: &RateSnapshot) -> Response {
        let mut response = raw_json(StatusCode::FORBIDDEN, self.bodies.rate_limited.clone());
        snapshot.apply(response.headers_mut());
        response
    }

    fn record(&self, st: &mut Ledger, method: &str, path: &str, status: StatusCode) {
        if st.log.len() == REQUEST_LOG_CAPACITY {
            st.log.pop_front();
        }
        st.log.push_back(RequestRecord {
            method: method.to_owned(),
            path: path.to_owned(),
            status: status.as_u16(),
        });
        match st.path_counts.get_mut(path) {
            Some(n) => *n += 1,
            None => {
                st.path_counts.insert(path.to_owned(), 1);
            }
        }
    }

    // -- authentication ------------------------------------------------------------------------

    /// Checks the app JWT of a request; the error is the complete 401 answer.
    fn require_jwt(&self, headers: &HeaderMap) -> Result<(), Box<Response>> {
        let bad_jwt = || raw_json(StatusCode::UNAUTHORIZED, self.bodies.bad_jwt.clone());
        let Some((scheme, jwt)) = authorization(headers) else {
            return Err(Box::new(bad_jwt()));
        };
        // GitHub requires the Bearer scheme for JWTs; `token <jwt>` is not decoded as one.
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Box::new(bad_jwt()));
        }
        let mut st = self.lock();
        let claims = match st.verified_jwts.get(jwt) {
            Some(claims) => claims.clone(),
            None => {
                drop(st);
                let claims = self
                    .verify_signature(jwt)
                    .ok_or_else(|| Box::new(bad_jwt()))?;
                st = self.lock();
                if st.verified_jwts.len() >= JWT_CACHE_CAPACITY {
                    st.verified_jwts.clear();
                }
                st.verified_jwts.insert(jwt.to_owned(), claims.clone());
                claims
            }
        };
        st.last_jwt_claims = Some(claims.clone());
        let now = OffsetDateTime::now_utc().unix_timestamp() + st.clock_skew_secs;
        drop(st);

        let iss_ok = match claims.get("iss") {
            Some(Value::Number(n)) => n.as_u64() == Some(self.app_id),
            Some(Value::String(s)) => *s == self.app_id.to_string() || *s == self.client_id,
            _ => false,
        };
        if !iss_ok {
            return Err(Box::new(bad_jwt()));
        }
        let Some(iat) = claims.get("iat").and_then(Value::as_i64) else {
            return Err(Box::new(basic_error(
                StatusCode::UNAUTHORIZED,
                "'Issued at' claim ('iat') must be an Integer representing the time that the assertion was issued",
                DOCS,
            )));
        };
        let Some(exp) = claims.get("exp").and_then(Value::as_i64) else {
            return Err(Box::new(basic_error(
                StatusCode::UNAUTHORIZED,
                "'Expiration time' claim ('exp') must be a numeric value representing the future time at which the assertion expires",
                DOCS,
            )));
        };
        if exp <= now {
            return Err(Box::new(basic_error(
                StatusCode::UNAUTHORIZED,
                "'Expiration time' claim ('exp') is in the past",
                DOCS,
            )));
        }
        if exp - now > MAX_JWT_LIFETIME_SECS {
            return Err(Box::new(raw_json(
                StatusCode::UNAUTHORIZED,
                self.bodies.exp_too_far.clone(),
            )));
        }
        if iat > now + IAT_FUTURE_TOLERANCE_SECS {
            return Err(Box::new(basic_error(
                StatusCode::UNAUTHORIZED,
                "'Issued at' claim ('iat') is in the future",
                DOCS,
            )));
        }
        Ok(())
    }

    /// Verifies an RS256 signature and returns the claims; time claims are checked by the caller so
    /// that each failure gets GitHub's answer for it.
    fn verify_signature(&self, jwt: &str) -> Option<Value> {
        let mut validation = Validation::new(Algorithm::RS256);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        jsonwebtoken::decode::<Value>(jwt, &self.key, &validation)
            .ok()
            .map(|data| data.claims)
    }

    /// Finds the installation token of a request; the error is the complete 401/403 answer.
    fn require_token(&self, headers: &HeaderMap) -> Result<String, Box<Response>> {
        let Some((scheme, token)) = authorization(headers) else {
            return Err(Box::new(basic_error(
                StatusCode::UNAUTHORIZED,
                "Requires authentication",
                DOCS,
            )));
        };
        let bad_credentials = || {
            raw_json(
                StatusCode::UNAUTHORIZED,
                self.bodies.bad_credentials.clone(),
            )
        };
        if !(scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token")) {
            return Err(Box::new(bad_credentials()));
        }
        let st = self.lock();
        let Some(record) = st.tokens.get(token) else {
            return Err(Box::new(bad_credentials()));
        };
        if record.revoked || OffsetDateTime::now_utc() >= record.expires_at {
            return Err(Box::new(bad_credentials()));
        }
        let suspended = st
            .installations
            .iter()
            .any(|i| i.id == record.installation_id && i.suspended_at.is_some());
        if suspended {
            return Err(Box::new(basic_error(
                StatusCode::FORBIDDEN,
                "This installation has been suspended",
                DOCS,
            )));
        }
        Ok(token.to_owned())
    }

    // -- bodies ----------------------------------------------------------------------------------

    fn account_json(&self, login: &str, id: u64, kind: &str) -> Value {
        let api = &self.base_url;
        let web = &self.web_url;
        let (url, repos_url, events_url) = if kind == "Organization" {
            (
                format!("{api}/orgs/{login}"),
                format!("{api}/orgs/{login}/repos"),
                format!("{api}/orgs/{login}/events"),
            )
        } else {
            (
                format!("{api}/users/{login}"),
                format!("{api}/users/{login}/repos"),
                format!("{api}/users/{login}/events{{/privacy}}"),
            )
        };
        let (node_prefix, avatar_url, html_url) = match kind {
            "Organization" => (
                "O",
                format!("https://avatars.githubusercontent.com/u/{id}?v=4"),
                format!("{web}/{login}"),
            ),
            "Bot" => (
                "BOT",
                format!(
                    "https://avatars.githubusercontent.com/in/{}?v=4",
                    self.app_id
                ),
                format!("{web}/apps/{}", self.slug),
            ),
            _ => (
                "U",
                format!("https://avatars.githubusercontent.com/u/{id}?v=4"),
                format!("{web}/{login}"),
            ),
        };
        json!({
            "login": login,
            "id": id,
            "node_id": node_id(node_prefix, id),
            "avatar_url": avatar_url,
            "gravatar_id": "",
            "url": url,
            "html_url": html_url,
            "followers_url": format!("{api}/users/{login}/followers"),
            "following_url": format!("{api}/users/{login}/following{{/other_user}}"),
            "gists_url": format!("{api}/users/{login}/gists{{/gist_id}}"),
            "starred_url": format!("{api}/users/{login}/starred{{/owner}}{{/repo}}"),
            "subscriptions_url": format!("{api}/users/{login}/subscriptions"),
            "organizations_url": format!("{api}/users/{login}/orgs"),
            "repos_url": repos_url,
            "events_url": events_url,
            "received_events_url": format!("{api}/users/{login}/received_events"),
            "type": kind,
            "user_view_type": "public",
            "site_admin": false
        })
    }

    fn installation_json(&self, i: &Installation) -> Value {
        let api = &self.base_url;
        let web = &self.web_url;
        let account = self.account_json(&i.owner, i.account_id, i.account_type.as_str());
        let html_url = match i.account_type {
            AccountType::Organization => format!(
                "{web}/organizations/{}/settings/installations/{}",
                i.owner, i.id
            ),
            AccountType::User => format!("{web}/settings/installations/{}", i.id),
        };
        json!({
            "id": i.id,
            "client_id": self.client_id,
            "account": account,
            "repository_selection": i.selection.as_str(),
            "access_tokens_url": format!("{api}/app/installations/{}/access_tokens", i.id),
            "repositories_url": format!("{api}/installation/repositories"),
            "html_url": html_url,
            "app_id": self.app_id,
            "app_slug": self.slug,
            "target_id": i.account_id,
            "target_type": i.account_type.as_str(),
            "permissions": i.permissions,
            "events": [],
            "created_at": INSTALLATION_CREATED_AT,
            "updated_at": INSTALLATION_UPDATED_AT,
            "single_file_name": null,
            "has_multiple_single_files": false,
            "single_file_paths": [],
            "suspended_by": if i.suspended_at.is_some() { account } else { Value::Null },
            "suspended_at": i.suspended_at
        })
    }

    fn repository_json(&self, i: &Installation, repo: &Repo) -> Value {
        let api = &self.base_url;
        let web = &self.web_url;
        let full = format!("{}/{}", i.owner, repo.name);
        let r = format!("{api}/repos/{full}");
        let host = web
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        json!({
            "id": repo.id,
            "node_id": node_id("R", repo.id),
            "name": repo.name,
            "full_name": full,
            "owner": self.account_json(&i.owner, i.account_id, i.account_type.as_str()),
            "private": true,
            "html_url": format!("{web}/{full}"),
            "description": null,
            "fork": false,
            "url": r,
            "archive_url": format!("{r}/{{archive_format}}{{/ref}}"),
            "assignees_url": format!("{r}/assignees{{/user}}"),
            "blobs_url": format!("{r}/git/blobs{{/sha}}"),
            "branches_url": format!("{r}/branches{{/branch}}"),
            "collaborators_url": format!("{r}/collaborators{{/collaborator}}"),
            "comments_url": format!("{r}/comments{{/number}}"),
            "commits_url": format!("{r}/commits{{/sha}}"),
            "compare_url": format!("{r}/compare/{{base}}...{{head}}"),
            "contents_url": format!("{r}/contents/{{+path}}"),
            "contributors_url": format!("{r}/contributors"),
            "deployments_url": format!("{r}/deployments"),
            "downloads_url": format!("{r}/downloads"),
            "events_url": format!("{r}/events"),
            "forks_url": format!("{r}/forks"),
            "git_commits_url": format!("{r}/git/commits{{/sha}}"),
            "git_refs_url": format!("{r}/git/refs{{/sha}}"),
            "git_tags_url": format!("{r}/git/tags{{/sha}}"),
            "git_url": format!("git://{host}/{full}.git"),
            "issue_comment_url": format!("{r}/issues/comments{{/number}}"),
            "issue_events_url": format!("{r}/issues/events{{/number}}"),
            "issues_url": format!("{r}/issues{{/number}}"),
            "keys_url": format!("{r}/keys{{/key_id}}"),
            "labels_url": format!("{r}/labels{{/name}}"),
            "languages_url": format!("{r}/languages"),
            "merges_url": format!("{r}/merges"),
            "milestones_url": format!("{r}/milestones{{/number}}"),
            "notifications_url": format!("{r}/notifications{{?since,all,participating}}"),
            "pulls_url": format!("{r}/pulls{{/number}}"),
            "releases_url": format!("{r}/releases{{/id}}"),
            "ssh_url": format!("git@{host}:{full}.git"),
            "stargazers_url": format!("{r}/stargazers"),
            "statuses_url": format!("{r}/statuses/{{sha}}"),
            "subscribers_url": format!("{r}/subscribers"),
            "subscription_url": format!("{r}/subscription"),
            "tags_url": format!("{r}/tags"),
            "teams_url": format!("{r}/teams"),
            "trees_url": format!("{r}/git/trees{{/sha}}"),
            "clone_url": format!("{web}/{full}.git"),
            "mirror_url": null,
            "hooks_url": format!("{r}/hooks"),
            "svn_url": format!("{web}/{full}"),
            "homepage": null,
            "language": null,
            "forks_count": 0,
            "stargazers_count": 0,
            "watchers_count": 0,
            "size": 0,
            "default_branch": "main",
            "open_issues_count": 0,
            "is_template": false,
            "topics": [],
            "has_issues": true,
            "has_projects": false,
            "has_wiki": false,
            "has_pages": false,
            "has_downloads": true,
            "has_discussions": false,
            "archived": false,
            "disabled": false,
            "visibility": "private",
            "pushed_at": INSTALLATION_UPDATED_AT,
            "created_at": INSTALLATION_CREATED_AT,
            "updated_at": INSTALLATION_UPDATED_AT,
            "permissions": { "admin": false, "maintain": false, "push": true, "triage": false, "pull": true },
            "allow_forking": false,
            "web_commit_signoff_required": false,
            "license": null,
            "forks": 0,
            "open_issues": 0,
            "watchers": 0
        })
    }
}

fn build_installations(config: &FakeGithubConfig) -> Vec<Installation> {
    let mut seen = std::collections::HashSet::new();
    config
        .installations
        .iter()
        .map(|spec| {
            assert!(
                seen.insert(spec.id),
                "two installations with id {}",
                spec.id
            );
            for (name, level) in &spec.permissions {
                let known = APP_PERMISSIONS
                    .iter()
                    .any(|(n, levels)| n == name && levels.contains(&level.as_str()))
                    || (config.ghes
                        && GHES_EXTRA_PERMISSIONS.contains(&name.as_str())
                        && RW.contains(&level.as_str()));
                assert!(
                    known,
                    "installation {} has unknown permission {name}:{level}",
                    spec.id
                );
            }
            Installation {
                id: spec.id,
                owner: spec.owner.clone(),
                account_id: spec.account_id,
                account_type: spec.account_type,
                permissions: spec.permissions.clone(),
                repos: spec
                    .repositories
                    .iter()
                    .map(|name| Repo {
                        id: repo_id(&spec.owner, name),
                        name: name.clone(),
                    })
                    .collect(),
                selection: spec.repository_selection,
                suspended_at: spec.suspended.then(|| "2026-06-01T12:00:00Z".to_owned()),
            }
        })
        .collect()
}

/// Repository ids of the fixtures, so default-config answers match them; others are derived.
fn repo_id(owner: &str, name: &str) -> u64 {
    match (owner, name) {
        ("acme-corp", "web") => 734501122,
        ("acme-corp", "infra") => 734501987,
        _ => derived_id(
            &format!(
                "repo:{}/{}",
                owner.to_ascii_lowercase(),
                name.to_ascii_lowercase()
            ),
            600_000_000,
            300_000_000,
        ),
    }
}

/// A stable id in `[base, base + span)` derived from `seed`.
fn derived_id(seed: &str, base: u64, span: u64) -> u64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(seed.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    base + u64::from_be_bytes(first) % span
}

/// GitHub's global node id form: `<prefix>_` + base64url(msgpack `[0, id]`).
fn node_id(prefix: &str, id: u64) -> String {
    let mut packed = vec![0x92, 0x00];
    match u32::try_from(id) {
        Ok(small) => {
            packed.push(0xce);
            packed.extend_from_slice(&small.to_be_bytes());
        }
        Err(_) => {
            packed.push(0xcf);
            packed.extend_from_slice(&id.to_be_bytes());
        }
    }
    format!("{prefix}_{}", URL_SAFE_NO_PAD.encode(packed))
}

fn level_rank(level: &str) -> u8 {
    match level {
        "read" => 1,
        "write" => 2,
        "admin" => 3,
        _ => 0,
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// `Authorization: <scheme> <credential>`, split.
fn authorization(headers: &HeaderMap) -> Option<(&str, &str)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, credential) = value.trim().split_once(' ')?;
    let credential = credential.trim();
    (!credential.is_empty()).then_some((scheme, credential))
}

fn raw_json(status: StatusCode, body: Bytes) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    raw_json(status, serde_json::to_vec(value).unwrap_or_default().into())
}

/// A `basic-error` body like GitHub's: message, documentation URL, status as a string.
fn basic_error(status: StatusCode, message: &str, documentation_url: &str) -> Response {
    json_response(
        status,
        &json!({
            "message": message,
            "documentation_url": documentation_url,
            "status": status.as_str(),
        }),
    )
}

fn not_found(documentation_url: &str) -> Response {
    basic_error(StatusCode::NOT_FOUND, "Not Found", documentation_url)
}

// ---------------------------------------------------------------------------------------------
// Routing

fn build_router(shared: Arc<Shared>, prefix: &'static str) -> Router {
    let api = Router::new()
        .route("/app", get(get_app))
        .route("/app/installations", get(list_installations))
        .route("/app/installations/{id}", get(get_installation))
        .route("/app/installations/{id}/access_tokens", post(create_token))
        .route(
            "/repos/{owner}/{repo}/installation",
            get(get_repo_installation),
        )
        .route("/orgs/{org}/installation", get(get_org_installation))
        .route("/users/{user}/installation", get(get_user_installation))
        .route("/users/{user}", get(get_user))
        .route("/installation/token", delete(revoke_token))
        .route("/installation/repositories", get(list_token_repositories))
        .route(
            "/repos/{owner}/{repo}/keys",
            post(create_deploy_key).get(list_deploy_keys),
        )
        .route("/repos/{owner}/{repo}/keys/{id}", delete(delete_deploy_key))
        .fallback(fallback_not_found)
        .method_not_allowed_fallback(fallback_not_found);
    let root = if prefix.is_empty() {
        api
    } else {
        Router::new().nest(prefix, api).fallback(fallback_not_found)
    };
    root.layer(middleware::from_fn_with_state(shared.clone(), front))
        .with_state(shared)
}

async fn fallback_not_found() -> Response {
    not_found(DOCS)
}

/// What every request goes through: injected delay and failures, the User-Agent rule, rate
/// limiting, the request log, and the headers GitHub puts on every answer.
async fn front(State(sh): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_owned();
    let path = sh.relative(req.uri().path()).to_owned();
    let api_version = req
        .headers()
        .get("x-github-api-version")
        .and_then(|v| v.to_str().ok())
        .unwrap_or(DEFAULT_API_VERSION)
        .to_owned();
    let (delay, injected) = {
        let mut st = sh.lock();
        let injected = (st.fail_next > 0).then(|| {
            st.fail_next -= 1;
            st.fail_status
        });
        (st.delay, injected)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if method == "POST" && path.ends_with("/access_tokens") {
        let mut open = sh.mints_open.subscribe();
        let _ = open.wait_for(|o| *o).await;
    }
    let user_agent_ok = req
        .headers()
        .get(header::USER_AGENT)
        .is_some_and(|v| !v.as_bytes().iter().all(u8::is_ascii_whitespace));
    let mut response = if let Some(status) = injected {
        basic_error(
            status,
            status.canonical_reason().unwrap_or("Server Error"),
            DOCS,
        )
    } else if !user_agent_ok {
        user_agent_required()
    } else {
        let charged = {
            let mut st = sh.lock();
            let bucket = sh.bucket_for(&st, req.headers());
            sh.charge(&mut st, bucket)
        };
        match charged {
            Ok(snapshot) => {
                let mut response = next.run(req).await;
                snapshot.apply(response.headers_mut());
                response
            }
            Err(limited) => *limited,
        }
    };
    let request_id = {
        let mut st = sh.lock();
        sh.record(&mut st, &method, &path, response.status());
        st.request_seq += 1;
        st.request_seq
    };
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&format!(
        "0C41:{:05X}:{:06X}:{:06X}:{:08X}",
        request_id & 0xF_FFFF,
        sh.app_id & 0xFF_FFFF,
        request_id.wrapping_mul(2_654_435_761) & 0xFF_FFFF,
        request_id
    )) {
        headers.insert(HeaderName::from_static("x-github-request-id"), value);
    }
    if let Ok(value) = HeaderValue::from_str(&api_version) {
        headers.insert(
            HeaderName::from_static("x-github-api-version-selected"),
            value,
        );
    }
    response
}

/// GitHub's answer to a request without a User-Agent (plain text; exact wording UNVERIFIED).
fn user_agent_required() -> Response {
    (
        StatusCode::FORBIDDEN,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "Request forbidden by administrative rules. Please make sure your request has a User-Agent header \
         (https://docs.github.com/en/rest/overview/resources-in-the-rest-api#user-agent-required). \
         Check https://developer.github.com for other possible causes.\n",
    )
        .into_response()
}

macro_rules! jwt_or_401 {
    ($sh:expr, $headers:expr) => {
        if let Err(response) = $sh.require_jwt(&$headers) {
            return *response;
        }
    };
}

async fn get_app(State(sh): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    jwt_or_401!(sh, headers);
    let st = sh.lock();
    // The app's own permissions: the highest level any installation was granted.
    let mut permissions: BTreeMap<String, String> = BTreeMap::new();
    for installation in &st.installations {
        for (name, level) in &installation.permissions {
            let entry = permissions
                .entry(name.clone())
                .or_insert_with(|| level.clone());
            if level_rank(level) > level_rank(entry) {
                entry.clone_from(level);
            }
        }
    }
    let owner = st.installations.first().map_or_else(
        || sh.account_json(fixtures::ORG, fixtures::ORG_ACCOUNT_ID, "Organization"),
        |i| sh.account_json(&i.owner, i.account_id, i.account_type.as_str()),
    );
    let body = json!({
        "id": sh.app_id,
        "client_id": sh.client_id,
        "slug": sh.slug,
        "node_id": node_id("A", sh.app_id),
        "owner": owner,
        "name": sh.app_name,
        "description": "",
        "external_url": format!("{}/apps/{}", sh.web_url, sh.slug),
        "html_url": format!("{}/apps/{}", sh.web_url, sh.slug),
        "created_at": INSTALLATION_CREATED_AT,
        "updated_at": INSTALLATION_UPDATED_AT,
        "permissions": permissions,
        "events": [],
        "installations_count": st.installations.len(),
    });
    drop(st);
    json_response(StatusCode::OK, &body)
}

#[derive(serde::Deserialize)]
struct PageQuery {
    per_page: Option<String>,
    page: Option<String>,
}

/// One page of `items` (GitHub's `per_page` ≤ 100, default 30; `page` from 1) and its `Link` header.
fn paginate<T: Clone>(items: &[T], query: &PageQuery, url: &str) -> (Vec<T>, Option<String>) {
    let per_page = query
        .per_page
        .as_deref()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(30)
        .min(100);
    let page = query
        .page
        .as_deref()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1);
    let last = items.len().div_ceil(per_page).max(1);
    let start = (page - 1).saturating_mul(per_page).min(items.len());
    let end = start.saturating_add(per_page).min(items.len());
    let link = |p: usize, rel: &str| format!("<{url}?per_page={per_page}&page={p}>; rel=\"{rel}\"");
    let mut links = Vec::new();
    if page > 1 {
        links.push(link((page - 1).min(last), "prev"));
    }
    if page < last {
        links.push(link(page + 1, "next"));
        links.push(link(last, "last"));
    }
    if page > 1 {
        links.push(link(1, "first"));
    }
    (
        items[start..end].to_vec(),
        (!links.is_empty()).then(|| links.join(", ")),
    )
}

fn with_link(mut response: Response, link: Option<String>) -> Response {
    if let Some(value) = link.and_then(|l| HeaderValue::from_str(&l).ok()) {
        response.headers_mut().insert(header::LINK, value);
    }
    response
}

async fn list_installations(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Response {
    jwt_or_401!(sh, headers);
    let installations = sh.lock().installations.clone();
    let (page, link) = paginate(
        &installations,
        &query,
        &format!("{}/app/installations", sh.base_url),
    );
    let body = Value::Array(page.iter().map(|i| sh.installation_json(i)).collect());
    with_link(json_response(StatusCode::OK, &body), link)
}

async fn get_installation(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    jwt_or_401!(sh, headers);
    let found = id
        .parse::<u64>()
        .ok()
        .and_then(|id| sh.lock().installations.iter().find(|i| i.id == id).cloned());
    match found {
        Some(installation) => json_response(StatusCode::OK, &sh.installation_json(&installation)),
        None => not_found(
            "https://docs.github.com/rest/apps/apps#get-an-installation-for-the-authenticated-app",
        ),
    }
}

async fn get_repo_installation(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Path((owner, repo)): Path<(String, String)>,
) -> Response {
    jwt_or_401!(sh, headers);
    let found = sh
        .lock()
        .installations
        .iter()
        .find(|i| {
            i.owner.eq_ignore_ascii_case(&owner)
                && i.repos.iter().any(|r| r.name.eq_ignore_ascii_case(&repo))
        })
        .cloned();
    match found {
        Some(installation) => json_response(StatusCode::OK, &sh.installation_json(&installation)),
        None => raw_json(StatusCode::NOT_FOUND, sh.bodies.not_installed.clone()),
    }
}

async fn get_org_installation(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(org): Path<String>,
) -> Response {
    jwt_or_401!(sh, headers);
    let found = sh
        .lock()
        .installations
        .iter()
        .find(|i| i.account_type == AccountType::Organization && i.owner.eq_ignore_ascii_case(&org))
        .cloned();
    match found {
        Some(installation) => json_response(StatusCode::OK, &sh.installation_json(&installation)),
        None => not_found(
            "https://docs.github.com/rest/apps/apps#get-an-organization-installation-for-the-authenticated-app",
        ),
    }
}

async fn get_user_installation(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> Response {
    jwt_or_401!(sh, headers);
    let found = sh
        .lock()
        .installations
        .iter()
        .find(|i| i.owner.eq_ignore_ascii_case(&user))
        .cloned();
    match found {
        Some(installation) => json_response(StatusCode::OK, &sh.installation_json(&installation)),
        None => not_found(
            "https://docs.github.com/rest/apps/apps#get-a-user-installation-for-the-authenticated-app",
        ),
    }
}

async fn get_user(State(sh): State<Arc<Shared>>, Path(login): Path<String>) -> Response {
    let bot_login = format!("{}[bot]", sh.slug);
    let (login, id, kind) = if login.eq_ignore_ascii_case(&bot_login) {
        (bot_login, sh.bot_user_id, "Bot")
    } else {
        let st = sh.lock();
        match st
            .installations
            .iter()
            .find(|i| i.owner.eq_ignore_ascii_case(&login))
        {
            Some(i) => (i.owner.clone(), i.account_id, i.account_type.as_str()),
            None => return not_found("https://docs.github.com/rest/users/users#get-a-user"),
        }
    };
    let mut body = sh.account_json(&login, id, kind);
    if let Value::Object(map) = &mut body {
        for (key, value) in [
            ("name", Value::Null),
            ("company", Value::Null),
            ("blog", json!("")),
            ("location", Value::Null),
            ("email", Value::Null),
            ("hireable", Value::Null),
            ("bio", Value::Null),
            ("twitter_username", Value::Null),
            ("public_repos", json!(0)),
            ("public_gists", json!(0)),
            ("followers", json!(0)),
            ("following", json!(0)),
            ("created_at", json!(INSTALLATION_CREATED_AT)),
            ("updated_at", json!(INSTALLATION_UPDATED_AT)),
        ] {
            map.insert(key.to_owned(), value);
        }
    }
    json_response(StatusCode::OK, &body)
}

/// Why a token request is refused: the complete answer.
enum MintRefusal {
    Repositories,
    Permissions,
    Invalid(&'static str),
}

/// Parses an access-token request body into (repository ids, permissions); `None` means "not named".
#[allow(clippy::type_complexity)]
fn parse_token_request(
    sh: &Shared,
    installation: &Installation,
    body: &Value,
) -> Result<(Option<Vec<u64>>, Option<BTreeMap<String, String>>), MintRefusal> {
    let Value::Object(body) = body else {
        return Err(MintRefusal::Invalid(
            "Invalid request.\n\nThe request body must be a JSON object.",
        ));
    };
    let mut repo_ids: Option<Vec<u64>> = None;
    if let Some(names) = body.get("repositories") {
        let Value::Array(names) = names else {
            return Err(MintRefusal::Invalid(
                "Invalid request.\n\nFor 'properties/repositories', the value is not an array.",
            ));
        };
        let ids = repo_ids.get_or_insert_with(Vec::new);
        for name in names {
            let Some(name) = name.as_str() else {
                return Err(MintRefusal::Invalid(
                    "Invalid request.\n\nFor 'items', the value is not a string.",
                ));
            };
            match installation
                .repos
                .iter()
                .find(|r| r.name.eq_ignore_ascii_case(name))
            {
                Some(repo) if !ids.contains(&repo.id) => ids.push(repo.id),
                Some(_) => {}
                None => return Err(MintRefusal::Repositories),
            }
        }
    }
    if let Some(wanted) = body.get("repository_ids") {
        let Value::Array(wanted) = wanted else {
            return Err(MintRefusal::Invalid(
                "Invalid request.\n\nFor 'properties/repository_ids', the value is not an array.",
            ));
        };
        let ids = repo_ids.get_or_insert_with(Vec::new);
        for id in wanted {
            let Some(id) = id.as_u64() else {
                return Err(MintRefusal::Invalid(
                    "Invalid request.\n\nFor 'items', the value is not an integer.",
                ));
            };
            if !installation.repos.iter().any(|r| r.id == id) {
                return Err(MintRefusal::Repositories);
            }
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    let mut permissions: Option<BTreeMap<String, String>> = None;
    if let Some(requested) = body.get("permissions") {
        let Value::Object(requested) = requested else {
            return Err(MintRefusal::Invalid(
                "Invalid request.\n\nFor 'properties/permissions', the value is not an object.",
            ));
        };
        if !requested.is_empty() {
            let granted = permissions.get_or_insert_with(BTreeMap::new);
            for (name, level) in requested {
                let Some(level) = level.as_str() else {
                    return Err(MintRefusal::Permissions);
                };
                let held = installation.permissions.get(name);
                let covered = held.is_some_and(|held| level_rank(held) >= level_rank(level));
                if !sh.permission_known(name, level) || !covered {
                    return Err(MintRefusal::Permissions);
                }
                granted.insert(name.clone(), level.to_owned());
            }
            // GitHub adds metadata:read to every scoped token of an installation that has it.
            if installation.permissions.contains_key("metadata") {
                granted
                    .entry("metadata".to_owned())
                    .or_insert_with(|| "read".to_owned());
            }
        }
    }
    Ok((repo_ids, permissions))
}

fn new_token(format: TokenFormat, app_id: u64, installation_id: u64, expires_at: i64) -> String {
    let mut rng = rand::rng();
    let alnum = |rng: &mut rand::rngs::ThreadRng, n: usize| -> String {
        (0..n)
            .map(|_| char::from(rng.sample(rand::distr::Alphanumeric)))
            .collect()
    };
    match format {
        TokenFormat::Classic => format!("ghs_{}", alnum(&mut rng, 36)),
        TokenFormat::Long => {
            let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
            let claims = json!({ "iss": app_id, "iid": installation_id, "exp": expires_at, "jti": alnum(&mut rng, 16) });
            let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
            let mut signature = [0u8; 256];
            rng.fill(&mut signature[..]);
            format!(
                "ghs_{app_id}_{header}.{payload}.{}",
                URL_SAFE_NO_PAD.encode(signature)
            )
        }
    }
}

#[derive(serde::Serialize)]
struct InstallationToken<'a> {
    token: &'a str,
    expires_at: String,
    permissions: &'a BTreeMap<String, String>,
    repository_selection: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    repositories: Option<Vec<Value>>,
}

async fn create_token(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    jwt_or_401!(sh, headers);
    let Some(installation) = id
        .parse::<u64>()
        .ok()
        .and_then(|id| sh.lock().installations.iter().find(|i| i.id == id).cloned())
    else {
        return not_found(DOCS_CREATE_TOKEN);
    };
    if installation.suspended_at.is_some() {
        return basic_error(
            StatusCode::FORBIDDEN,
            "This installation has been suspended",
            DOCS_CREATE_TOKEN,
        );
    }
    let request = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(value) => value,
            Err(_) => {
                return basic_error(
                    StatusCode::BAD_REQUEST,
                    "Problems parsing JSON",
                    DOCS_CREATE_TOKEN,
                );
            }
        }
    };
    let (repo_ids, permissions) = match parse_token_request(&sh, &installation, &request) {
        Ok(parsed) => parsed,
        Err(MintRefusal::Repositories) => {
            return raw_json(
                StatusCode::UNPROCESSABLE_ENTITY,
                sh.bodies.repositories_422.clone(),
            );
        }
        Err(MintRefusal::Permissions) => {
            return raw_json(
                StatusCode::UNPROCESSABLE_ENTITY,
                sh.bodies.permissions_422.clone(),
            );
        }
        Err(MintRefusal::Invalid(message)) => {
            return basic_error(StatusCode::UNPROCESSABLE_ENTITY, message, DOCS_CREATE_TOKEN);
        }
    };
    let named = repo_ids.is_some();
    let repo_ids = repo_ids.unwrap_or_else(|| installation.repos.iter().map(|r| r.id).collect());
    let permissions = permissions.unwrap_or_else(|| installation.permissions.clone());
    let selection = if named {
        RepositorySelection::Selected
    } else {
        installation.selection
    };

    let mut st = sh.lock();
    let now = OffsetDateTime::now_utc();
    let lifetime = time::Duration::try_from(st.token_lifetime).unwrap_or(time::Duration::HOUR);
    // Whole seconds, so that `expires_at` as answered is exactly when the token stops working.
    let expires_at = OffsetDateTime::from_unix_timestamp((now + lifetime).unix_timestamp())
        .unwrap_or(now + lifetime);
    let token = loop {
        let candidate = new_token(
            st.token_format,
            sh.app_id,
            installation.id,
            expires_at.unix_timestamp(),
        );
        if !st.tokens.contains_key(&candidate) {
            break candidate;
        }
    };
    st.tokens.insert(
        token.clone(),
        TokenRecord {
            installation_id: installation.id,
            repo_ids: repo_ids.clone(),
            selection,
            permissions: permissions.clone(),
            expires_at,
            revoked: false,
        },
    );
    st.mint_count += 1;
    drop(st);

    let repositories = named.then(|| {
        installation
            .repos
            .iter()
            .filter(|r| repo_ids.contains(&r.id))
            .map(|r| sh.repository_json(&installation, r))
            .collect()
    });
    let body = InstallationToken {
        token: &token,
        expires_at: rfc3339(expires_at),
        permissions: &permissions,
        repository_selection: selection.as_str(),
        repositories,
    };
    raw_json(
        StatusCode::CREATED,
        serde_json::to_vec(&body).unwrap_or_default().into(),
    )
}

async fn revoke_token(State(sh): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let token = match sh.require_token(&headers) {
        Ok(token) => token,
        Err(response) => return *response,
    };
    if let Some(record) = sh.lock().tokens.get_mut(&token) {
        record.revoked = true;
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn list_token_repositories(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Response {
    let token = match sh.require_token(&headers) {
        Ok(token) => token,
        Err(response) => return *response,
    };
    let (installation, repos, selection) = {
        let st = sh.lock();
        let Some(record) = st.tokens.get(&token) else {
            return raw_json(StatusCode::UNAUTHORIZED, sh.bodies.bad_credentials.clone());
        };
        let Some(installation) = st
            .installations
            .iter()
            .find(|i| i.id == record.installation_id)
        else {
            return raw_json(StatusCode::UNAUTHORIZED, sh.bodies.bad_credentials.clone());
        };
        let repos: Vec<Repo> = installation
            .repos
            .iter()
            .filter(|r| record.repo_ids.contains(&r.id))
            .cloned()
            .collect();
        (installation.clone(), repos, record.selection)
    };
    let (page, link) = paginate(
        &repos,
        &query,
        &format!("{}/installation/repositories", sh.base_url),
    );
    let body = json!({
        "total_count": repos.len(),
        "repository_selection": selection.as_str(),
        "repositories": page.iter().map(|r| sh.repository_json(&installation, r)).collect::<Vec<_>>(),
    });
    with_link(json_response(StatusCode::OK, &body), link)
}

// ---------------------------------------------------------------------------------------------
// Deploy keys (reference §4.5)

impl Shared {
    /// The repository `owner/repo` as its installation spells it, when `token` reaches it with
    /// `administration:write`; else GitHub's refusal (404 outside the token, 403 without the
    /// permission).
    fn deploy_key_access(
        &self,
        headers: &HeaderMap,
        owner: &str,
        repo: &str,
    ) -> Result<String, Box<Response>> {
        let token = self.require_token(headers)?;
        let st = self.lock();
        let Some(info) = st.tokens.get(&token).map(|r| r.info(&st)) else {
            return Err(Box::new(raw_json(
                StatusCode::UNAUTHORIZED,
                self.bodies.bad_credentials.clone(),
            )));
        };
        let wanted = format!("{owner}/{repo}");
        let Some(full) = info
            .repositories
            .iter()
            .find(|r| r.eq_ignore_ascii_case(&wanted))
            .cloned()
        else {
            return Err(Box::new(not_found(DEPLOY_KEYS_DOCS)));
        };
        if !info.allows(&full, "administration", "write") {
            let mut response = basic_error(
                StatusCode::FORBIDDEN,
                "Resource not accessible by integration",
                DEPLOY_KEYS_DOCS,
            );
            response.headers_mut().insert(
                HeaderName::from_static("x-accepted-github-permissions"),
                HeaderValue::from_static("administration=write"),
            );
            return Err(Box::new(response));
        }
        Ok(full)
    }

    fn deploy_key_json(&self, k: &DeployKey) -> Value {
        json!({
            "id": k.id,
            "key": k.key,
            "url": format!("{}/repos/{}/keys/{}", self.base_url, k.repository, k.id),
            "title": k.title,
            "verified": true,
            "created_at": k.created_at,
            "read_only": k.read_only,
            "added_by": null,
            "last_used": null,
            "enabled": true,
        })
    }
}

const DEPLOY_KEYS_DOCS: &str =
    "https://docs.github.com/rest/deploy-keys/deploy-keys#create-a-deploy-key";

fn validation_failed(field: &str, code: &str, message: &str) -> Response {
    json_response(
        StatusCode::UNPROCESSABLE_ENTITY,
        &json!({
            "message": "Validation Failed",
            "errors": [{"resource": "PublicKey", "code": code, "field": field, "message": message}],
            "documentation_url": DEPLOY_KEYS_DOCS,
            "status": "422",
        }),
    )
}

async fn create_deploy_key(
    State(sh): State<Arc<Shared>>,
    Path((owner, repo)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let repository = match sh.deploy_key_access(&headers, &owner, &repo) {
        Ok(r) => r,
        Err(response) => return *response,
    };
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return basic_error(
            StatusCode::BAD_REQUEST,
            "Problems parsing JSON",
            DEPLOY_KEYS_DOCS,
        );
    };
    let Some(key) = body.get("key").and_then(Value::as_str) else {
        return validation_failed("key", "missing_field", "key is missing");
    };
    let mut parts = key.split_whitespace();
    let well_formed = matches!(
        (parts.next(), parts.next()),
        (Some("ssh-ed25519" | "ssh-rsa" | "ecdsa-sha2-nistp256"), Some(b)) if base64::engine::general_purpose::STANDARD.decode(b).is_ok()
    );
    if !well_formed {
        return validation_failed(
            "key",
            "custom",
            "key is invalid. You must supply a key in OpenSSH public key format",
        );
    }
    let title = match body.get("title") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(t)) => t.clone(),
        Some(_) => return validation_failed("title", "invalid", "title is invalid"),
    };
    // Anything but `true` is a read-write key (reference §4.5).
    let read_only = body.get("read_only") == Some(&Value::Bool(true));
    let mut st = sh.lock();
    let material = key_material(key);
    if st.deploy_keys.iter().any(|k| k.material() == material) {
        return validation_failed("key", "custom", "key is already in use");
    }
    let id = st.next_deploy_key_id;
    st.next_deploy_key_id += 1;
    let record = DeployKey {
        id,
        repository,
        key: key.to_owned(),
        title,
        read_only,
        created_at: rfc3339(OffsetDateTime::now_utc()),
    };
    let json = sh.deploy_key_json(&record);
    st.deploy_keys.push(record);
    json_response(StatusCode::CREATED, &json)
}

async fn list_deploy_keys(
    State(sh): State<Arc<Shared>>,
    Path((owner, repo)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let repository = match sh.deploy_key_access(&headers, &owner, &repo) {
        Ok(r) => r,
        Err(response) => return *response,
    };
    let st = sh.lock();
    let keys: Vec<Value> = st
        .deploy_keys
        .iter()
        .filter(|k| k.repository == repository)
        .map(|k| sh.deploy_key_json(k))
        .collect();
    json_response(StatusCode::OK, &Value::Array(keys))
}

async fn delete_deploy_key(
    State(sh): State<Arc<Shared>>,
    Path((owner, repo, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let repository = match sh.deploy_key_access(&headers, &owner, &repo) {
        Ok(r) => r,
        Err(response) => return *response,
    };
    let Ok(id) = id.parse::<u64>() else {
        return not_found(DEPLOY_KEYS_DOCS);
    };
    let mut st = sh.lock();
    let before = st.deploy_keys.len();
    st.deploy_keys
        .retain(|k| !(k.id == id && k.repository == repository));
    if st.deploy_keys.len() == before {
        return not_found(DEPLOY_KEYS_DOCS);
    }
    StatusCode::NO_CONTENT.into_response()
}
