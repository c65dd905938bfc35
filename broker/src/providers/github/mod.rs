//! The GitHub App provider: the only module that speaks GitHub's API.
//!
//! [`GithubApi`] is the edge the rest of the broker sees. [`GithubClient`] is the real HTTP
//! client (app JWT, installation lookup, token minting and revocation, the app's bot
//! identity); [`SimulatedGithub`] stands in for it under `botcreds serve --dev` and in tests
//! of the layers above. Tokens, JWTs and the private key never appear in an error message,
//! a log line or `Debug` output.

mod client;
pub mod config;
mod errors;
mod jwt;
mod simulated;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use botcreds_proto::{Permission, RepoName};

use crate::secret::Secret;

pub use client::{GithubAppConfig, GithubClient, git_host_for};
pub use errors::GithubError;
pub use simulated::{SIMULATED_APP_SLUG, SIMULATED_INSTALLATION_ID, SimulatedGithub};

/// What the broker needs from GitHub. Implemented by [`GithubClient`] and [`SimulatedGithub`].
#[async_trait::async_trait]
pub trait GithubApi: Send + Sync + 'static {
    /// Mint an installation token for repositories of one owner, scoped to exactly these
    /// permissions (the highest level asked for per permission name).
    async fn create_installation_token(
        &self,
        owner: &str,
        repositories: &[RepoName],
        permissions: &[Permission],
    ) -> Result<InstallationToken, GithubError>;

    /// `DELETE /installation/token` with that token (204). A 401 means the token is already
    /// dead, which is what revocation wants, so it is `Ok` too.
    async fn revoke_installation_token(&self, token: &Secret) -> Result<(), GithubError>;

    /// `POST /repos/{owner}/{repo}/keys` with `token` (an installation token holding
    /// `administration:write` on `repo`): register `public_key` (an OpenSSH public key line)
    /// as a deploy key, read-only or read-write (`read_only` is always sent). Answers GitHub's
    /// id of the key.
    async fn add_deploy_key(
        &self,
        token: &Secret,
        repo: &RepoName,
        title: &str,
        public_key: &str,
        read_only: bool,
    ) -> Result<u64, GithubError>;

    /// `DELETE /repos/{owner}/{repo}/keys/{key_id}` with `token` (204). A 404 means the key is
    /// gone already (deleted before, or the repository with it), which is the goal: `Ok`.
    async fn delete_deploy_key(
        &self,
        token: &Secret,
        repo: &RepoName,
        key_id: u64,
    ) -> Result<(), GithubError>;

    /// The app's bot identity for commit attribution: slug and bot user id (cached after
    /// the first call).
    async fn app_identity(&self) -> Result<AppIdentity, GithubError>;

    /// Host for git URLs: `github.com` for api.github.com, the GHES host (with port) for
    /// `https://HOST/api/v3`.
    fn git_host(&self) -> &str;

    /// Snapshot of upstream call counters and the last rate-limit headroom seen.
    fn stats(&self) -> UpstreamStats;
}

/// An installation token as GitHub issued it.
#[derive(Clone, Debug)]
pub struct InstallationToken {
    pub token: Secret,
    pub expires_at: time::OffsetDateTime,
    /// Permission name → level actually granted (GitHub adds `metadata: read` on its own).
    pub permissions: BTreeMap<String, String>,
    /// `owner/name` of every repository the token reaches.
    pub repositories: Vec<String>,
    pub installation_id: u64,
}

/// The app's bot account, as commits made with its tokens are attributed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppIdentity {
    pub slug: String,
    pub bot_user_id: Option<u64>,
}

impl AppIdentity {
    /// The bot's login and commit author name: `{slug}[bot]`.
    pub fn bot_login(&self) -> String {
        format!("{}[bot]", self.slug)
    }

    /// The noreply address GitHub links to the bot: `{id}+{slug}[bot]@users.noreply.github.com`
    /// (without the id prefix when the id is unknown).
    pub fn noreply_email(&self) -> String {
        match self.bot_user_id {
            Some(id) => format!("{id}+{}@users.noreply.github.com", self.bot_login()),
            None => format!("{}@users.noreply.github.com", self.bot_login()),
        }
    }
}

/// Upstream counters for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpstreamStats {
    /// HTTP exchanges answered with a 2xx status.
    pub calls_ok: u64,
    /// HTTP exchanges answered with another status, or that failed in transport.
    pub calls_failed: u64,
    /// Installation tokens minted.
    pub mints: u64,
    /// `x-ratelimit-remaining` of the last response that carried it.
    pub rate_limit_remaining: Option<u64>,
    /// `x-ratelimit-limit` of the last response that carried it.
    pub rate_limit_limit: Option<u64>,
}

/// Lock-free counters behind [`UpstreamStats`]. `u64::MAX` stands for "not seen yet".
struct StatsCounters {
    calls_ok: AtomicU64,
    calls_failed: AtomicU64,
    mints: AtomicU64,
    rate_limit_remaining: AtomicU64,
    rate_limit_limit: AtomicU64,
}

const NOT_SEEN: u64 = u64::MAX;

impl StatsCounters {
    fn new() -> StatsCounters {
        StatsCounters {
            calls_ok: AtomicU64::new(0),
            calls_failed: AtomicU64::new(0),
            mints: AtomicU64::new(0),
            rate_limit_remaining: AtomicU64::new(NOT_SEEN),
            rate_limit_limit: AtomicU64::new(NOT_SEEN),
        }
    }

    fn call(&self, ok: bool) {
        let c = if ok {
            &self.calls_ok
        } else {
            &self.calls_failed
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn minted(&self) {
        self.mints.fetch_add(1, Ordering::Relaxed);
    }

    fn rate_limit(&self, remaining: Option<u64>, limit: Option<u64>) {
        if let Some(r) = remaining.filter(|r| *r != NOT_SEEN) {
            self.rate_limit_remaining.store(r, Ordering::Relaxed);
        }
        if let Some(l) = limit.filter(|l| *l != NOT_SEEN) {
            self.rate_limit_limit.store(l, Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> UpstreamStats {
        let seen = |v: u64| (v != NOT_SEEN).then_some(v);
        UpstreamStats {
            calls_ok: self.calls_ok.load(Ordering::Relaxed),
            calls_failed: self.calls_failed.load(Ordering::Relaxed),
            mints: self.mints.load(Ordering::Relaxed),
            rate_limit_remaining: seen(self.rate_limit_remaining.load(Ordering::Relaxed)),
            rate_limit_limit: seen(self.rate_limit_limit.load(Ordering::Relaxed)),
        }
    }
}

/// The `permissions` object of a mint request: one entry per name, at the highest level
/// asked for, since GitHub takes one level per permission.
fn permission_levels(permissions: &[Permission]) -> BTreeMap<&'static str, botcreds_proto::Level> {
    let mut best = BTreeMap::new();
    for p in permissions {
        let level = best.entry(p.name()).or_insert(p.level());
        if p.level() > *level {
            *level = p.level();
        }
    }
    best
}
