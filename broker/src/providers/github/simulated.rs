//! An in-process stand-in for GitHub, for `botcreds serve --dev` and tests of the layers
//! above: no network, tokens that look real and are NOT valid on github.com.

use std::collections::HashMap;
use std::sync::Mutex;

use botcreds_proto::{Permission, RepoName};
use rand::distr::{Alphanumeric, SampleString};
use time::OffsetDateTime;

use super::errors::GithubError;
use super::{
    AppIdentity, GithubApi, InstallationToken, StatsCounters, UpstreamStats, permission_levels,
};
use crate::clock::SharedClock;
use crate::secret::{Secret, sha256_hex};

/// The slug the simulated app reports.
pub const SIMULATED_APP_SLUG: &str = "botcreds-dev-simulated";
/// The installation id every simulated token carries.
pub const SIMULATED_INSTALLATION_ID: u64 = 4_242_424;
/// Simulated tokens live one hour, as GitHub's do.
const TOKEN_LIFETIME_SECS: i64 = 3600;

/// A simulated GitHub App. Remembers (by hash) the tokens it minted and revoked until they
/// would have expired.
pub struct SimulatedGithub {
    clock: SharedClock,
    tokens: Mutex<Tokens>,
    deploy_keys: Mutex<DeployKeys>,
    stats: StatsCounters,
}

/// The deploy keys registered here: id → (repository, the key's type and base64 body).
#[derive(Default)]
struct DeployKeys {
    next_id: u64,
    held: HashMap<u64, (String, String)>,
}

#[derive(Default)]
struct Tokens {
    /// SHA-256 of a live token → its expiry.
    live: HashMap<String, OffsetDateTime>,
    /// SHA-256 of a revoked token → when it would have expired.
    revoked: HashMap<String, OffsetDateTime>,
}

impl Tokens {
    fn prune(&mut self, now: OffsetDateTime) {
        self.live.retain(|_, exp| *exp > now);
        self.revoked.retain(|_, exp| *exp > now);
    }
}

impl std::fmt::Debug for SimulatedGithub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatedGithub").finish_non_exhaustive()
    }
}

impl SimulatedGithub {
    pub fn new(clock: SharedClock) -> SimulatedGithub {
        tracing::warn!(
            "GITHUB IS SIMULATED: tokens from this broker are fake and NOT valid on github.com \
             (development mode only; configure [github] for real tokens)"
        );
        SimulatedGithub {
            clock,
            tokens: Mutex::new(Tokens::default()),
            deploy_keys: Mutex::new(DeployKeys::default()),
            stats: StatsCounters::new(),
        }
    }

    /// Whether `token` was revoked here (and would not have expired yet).
    pub fn is_revoked(&self, token: &Secret) -> bool {
        let key = sha256_hex(token.expose().as_bytes());
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens.revoked.contains_key(&key)
    }

    /// Revoke every live token, as GitHub does when a token is revoked outside the broker.
    pub fn revoke_all(&self) {
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let live: Vec<(String, OffsetDateTime)> = tokens.live.drain().collect();
        tokens.revoked.extend(live);
    }

    /// The deploy keys held now: `(id, owner/name)`, sorted by id.
    pub fn deploy_keys(&self) -> Vec<(u64, String)> {
        let keys = self.deploy_keys.lock().unwrap_or_else(|e| e.into_inner());
        let mut held: Vec<(u64, String)> = keys
            .held
            .iter()
            .map(|(id, (r, _))| (*id, r.clone()))
            .collect();
        held.sort();
        held
    }

    /// The refusal GitHub gives a dead token (unknown, revoked or expired).
    fn require_live(&self, token: &Secret) -> Result<(), GithubError> {
        if self.is_live(token) {
            return Ok(());
        }
        self.stats.call(false);
        Err(GithubError::AuthFailed {
            message: "Bad credentials".into(),
        })
    }

    /// Whether `token` was minted here, is not revoked and has not expired.
    pub fn is_live(&self, token: &Secret) -> bool {
        let key = sha256_hex(token.expose().as_bytes());
        let now = self.clock.now();
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens.live.get(&key).is_some_and(|exp| *exp > now)
    }
}

#[async_trait::async_trait]
impl GithubApi for SimulatedGithub {
    async fn create_installation_token(
        &self,
        owner: &str,
        repositories: &[RepoName],
        permissions: &[Permission],
    ) -> Result<InstallationToken, GithubError> {
        // The same refusals as the real client, so development shows real behaviour.
        if repositories.is_empty() || permissions.is_empty() {
            self.stats.call(false);
            return Err(GithubError::ScopeRejected {
                message: "a token needs at least one repository and one permission".into(),
            });
        }
        if let Some(other) = repositories
            .iter()
            .find(|r| !r.owner().eq_ignore_ascii_case(owner))
        {
            self.stats.call(false);
            return Err(GithubError::ScopeRejected {
                message: format!("repository {other} does not belong to {owner:?}"),
            });
        }
        let now = self.clock.now();
        let token = format!("ghs_{}", Alphanumeric.sample_string(&mut rand::rng(), 36));
        let expires_at = now + time::Duration::seconds(TOKEN_LIFETIME_SECS);
        {
            let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
            tokens.prune(now);
            tokens.live.insert(sha256_hex(token.as_bytes()), expires_at);
        }
        let mut repos: Vec<String> = repositories.iter().map(|r| r.to_string()).collect();
        repos.sort();
        repos.dedup();
        self.stats.call(true);
        self.stats.minted();
        Ok(InstallationToken {
            token: Secret::new(token),
            expires_at,
            permissions: permission_levels(permissions)
                .into_iter()
                .map(|(n, l)| (n.to_string(), l.as_str().to_string()))
                .collect(),
            repositories: repos,
            installation_id: SIMULATED_INSTALLATION_ID,
        })
    }

    async fn revoke_installation_token(&self, token: &Secret) -> Result<(), GithubError> {
        let key = sha256_hex(token.expose().as_bytes());
        let now = self.clock.now();
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens.prune(now);
        // Like GitHub, revoking an unknown or dead token succeeds: it is dead either way.
        if let Some(expires_at) = tokens.live.remove(&key) {
            tokens.revoked.insert(key, expires_at);
        }
        self.stats.call(true);
        Ok(())
    }

    async fn add_deploy_key(
        &self,
        token: &Secret,
        repo: &RepoName,
        _title: &str,
        public_key: &str,
        _read_only: bool,
    ) -> Result<u64, GithubError> {
        self.require_live(token)?;
        let material: String = public_key
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let mut keys = self.deploy_keys.lock().unwrap_or_else(|e| e.into_inner());
        // Like GitHub, one public key is on one repository at most.
        if keys.held.values().any(|(_, m)| *m == material) {
            self.stats.call(false);
            return Err(GithubError::KeyRejected {
                message: "Validation Failed: key is already in use".into(),
            });
        }
        keys.next_id += 1;
        let id = keys.next_id;
        keys.held.insert(id, (repo.to_string(), material));
        self.stats.call(true);
        Ok(id)
    }

    async fn delete_deploy_key(
        &self,
        token: &Secret,
        repo: &RepoName,
        key_id: u64,
    ) -> Result<(), GithubError> {
        self.require_live(token)?;
        let mut keys = self.deploy_keys.lock().unwrap_or_else(|e| e.into_inner());
        // A key that is not there is gone already, as a 404 at GitHub.
        if keys
            .held
            .get(&key_id)
            .is_some_and(|(r, _)| *r == repo.to_string())
        {
            keys.held.remove(&key_id);
        }
        self.stats.call(true);
        Ok(())
    }

    async fn app_identity(&self) -> Result<AppIdentity, GithubError> {
        Ok(AppIdentity {
            slug: SIMULATED_APP_SLUG.to_string(),
            bot_user_id: None,
        })
    }

    fn git_host(&self) -> &str {
        "github.com"
    }

    fn stats(&self) -> UpstreamStats {
        self.stats.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::{Clock, OffsetClock};

    fn repos(names: &[&str]) -> Vec<RepoName> {
        names.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn perms(names: &[&str]) -> Vec<Permission> {
        names.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[tokio::test]
    async fn mints_echoes_and_revokes() {
        let clock = OffsetClock::default();
        let sim = SimulatedGithub::new(Arc::new(clock.clone()));
        let before = clock.now();
        let t = sim
            .create_installation_token(
                "acme",
                &repos(&["acme/web", "acme/api"]),
                &perms(&["contents:read", "contents:write", "issues:read"]),
            )
            .await
            .unwrap();
        let value = t.token.expose();
        assert!(value.starts_with("ghs_") && value.len() == 40, "shape");
        assert!(value[4..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(t.repositories, ["acme/api", "acme/web"]);
        assert_eq!(
            t.permissions.get("contents").map(String::as_str),
            Some("write")
        );
        assert_eq!(
            t.permissions.get("issues").map(String::as_str),
            Some("read")
        );
        assert_eq!(t.installation_id, SIMULATED_INSTALLATION_ID);
        let hour = time::Duration::hours(1);
        assert!(before + hour <= t.expires_at && t.expires_at <= clock.now() + hour);
        assert!(!format!("{t:?}").contains(value));

        let other = sim
            .create_installation_token("acme", &repos(&["acme/web"]), &perms(&["contents:read"]))
            .await
            .unwrap();
        assert_ne!(other.token.expose(), value);
        assert_eq!(sim.stats().mints, 2);

        assert!(sim.is_live(&t.token) && !sim.is_revoked(&t.token));
        sim.revoke_installation_token(&t.token).await.unwrap();
        assert!(sim.is_revoked(&t.token) && !sim.is_live(&t.token));
        assert!(sim.is_live(&other.token));
        sim.revoke_installation_token(&Secret::new("ghs_unknown"))
            .await
            .unwrap();

        clock.advance(TOKEN_LIFETIME_SECS + 1);
        assert!(!sim.is_live(&other.token), "expired");
    }

    #[tokio::test]
    async fn refuses_what_github_would_widen() {
        let sim = SimulatedGithub::new(Arc::new(OffsetClock::default()));
        let cases = [
            ("acme", repos(&[]), perms(&["contents:read"])),
            ("acme", repos(&["acme/web"]), perms(&[])),
            ("acme", repos(&["other/web"]), perms(&["contents:read"])),
        ];
        for (owner, r, p) in cases {
            let e = sim
                .create_installation_token(owner, &r, &p)
                .await
                .unwrap_err();
            assert!(matches!(e, GithubError::ScopeRejected { .. }), "{e:?}");
        }
        assert_eq!(sim.stats().mints, 0);
    }

    #[tokio::test]
    async fn identity_and_host() {
        let sim = SimulatedGithub::new(Arc::new(OffsetClock::default()));
        let id = sim.app_identity().await.unwrap();
        assert_eq!(id.bot_login(), "botcreds-dev-simulated[bot]");
        assert_eq!(
            id.noreply_email(),
            "botcreds-dev-simulated[bot]@users.noreply.github.com"
        );
        assert_eq!(sim.git_host(), "github.com");
    }
}
