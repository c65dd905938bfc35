//! Issuing GitHub installation tokens, with reuse: identical (owner/installation,
//! repositories, permissions) requests share one live token while it still has the requested
//! lifetime left. Live tokens are kept in memory only, never on disk.
//!
//! Concurrent identical requests wait on one mint (single flight), so a burst costs one
//! upstream call.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use botcreds_proto::{Permission, RepoName};
use time::OffsetDateTime;

use crate::clock::SharedClock;
use crate::providers::github::{GithubApi, GithubError, InstallationToken};
use crate::secret::{Secret, sha256_hex};

/// What identifies a reusable token: owner, sorted repositories, sorted permissions.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenScope {
    pub owner: String,
    pub repositories: Vec<RepoName>,
    pub permissions: Vec<Permission>,
}

impl TokenScope {
    /// Normalise a request: repositories and permissions sorted and deduplicated, and for
    /// each permission name only the highest level asked for.
    pub fn new(repositories: &[RepoName], permissions: &[Permission]) -> Option<TokenScope> {
        let owner = repositories.first()?.owner().to_string();
        let mut repos = repositories.to_vec();
        repos.sort();
        repos.dedup();
        let mut best: BTreeMap<&'static str, Permission> = BTreeMap::new();
        for p in permissions {
            let keep = best
                .get(p.name())
                .is_none_or(|held| held.level() < p.level());
            if keep {
                best.insert(p.name(), p.clone());
            }
        }
        Some(TokenScope {
            owner,
            repositories: repos,
            permissions: best.into_values().collect(),
        })
    }
}

/// A live installation token held by the broker.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    pub token: Secret,
    /// `tok_` + the first 24 hex digits of SHA-256(token): names the token, reveals nothing.
    pub credential_id: String,
    pub expires_at: OffsetDateTime,
    pub permissions: BTreeMap<String, String>,
    pub repositories: Vec<String>,
    pub installation_id: u64,
}

impl IssuedToken {
    fn from_upstream(t: InstallationToken) -> IssuedToken {
        IssuedToken {
            credential_id: credential_id_for(&t.token),
            token: t.token,
            expires_at: t.expires_at,
            permissions: t.permissions,
            repositories: t.repositories,
            installation_id: t.installation_id,
        }
    }
}

/// The non-secret id of a token.
pub fn credential_id_for(token: &Secret) -> String {
    let h = sha256_hex(token.expose().as_bytes());
    format!("tok_{}", &h[..24])
}

/// The answer of [`TokenIssuer::issue`]: the token and whether it came from the reuse cache.
#[derive(Clone, Debug)]
pub struct Issued {
    pub token: IssuedToken,
    pub reused: bool,
}

type Slot = Arc<tokio::sync::Mutex<Option<IssuedToken>>>;

/// Mints tokens through a [`GithubApi`] and keeps the live ones for reuse.
pub struct TokenIssuer {
    github: Arc<dyn GithubApi>,
    clock: SharedClock,
    slots: Mutex<HashMap<TokenScope, Slot>>,
}

impl TokenIssuer {
    pub fn new(github: Arc<dyn GithubApi>, clock: SharedClock) -> TokenIssuer {
        TokenIssuer {
            github,
            clock,
            slots: Mutex::new(HashMap::new()),
        }
    }

    pub fn github(&self) -> &Arc<dyn GithubApi> {
        &self.github
    }

    fn slot(&self, scope: &TokenScope) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slots.get(scope) {
            return s.clone();
        }
        // Forget scopes whose tokens have lapsed before the map grows without bound.
        if slots.len() >= 50_000 {
            slots
                .retain(|_, s| Arc::strong_count(s) > 1 || s.try_lock().is_ok_and(|g| g.is_some()));
        }
        let s: Slot = Arc::default();
        slots.insert(scope.clone(), s.clone());
        s
    }

    /// A token for `scope` that stays valid for at least `min_ttl`: the live one if it
    /// qualifies, else a freshly minted one (which then replaces it). A live token whose id
    /// is `rejected` (a client saw GitHub refuse it) never qualifies.
    pub async fn issue(
        &self,
        scope: &TokenScope,
        min_ttl: Duration,
        rejected: Option<&str>,
    ) -> Result<Issued, GithubError> {
        let slot = self.slot(scope);
        let mut held = slot.lock().await;
        let now = self.clock.now();
        if let Some(t) = held.as_ref()
            && t.expires_at - now >= min_ttl
            && rejected != Some(t.credential_id.as_str())
        {
            return Ok(Issued {
                token: t.clone(),
                reused: true,
            });
        }
        let minted = self
            .github
            .create_installation_token(&scope.owner, &scope.repositories, &scope.permissions)
            .await?;
        let token = IssuedToken::from_upstream(minted);
        if token.expires_at - now < min_ttl {
            tracing::warn!(
                credential_id = %token.credential_id,
                expires_at = %token.expires_at,
                "GitHub issued a token that lives less than the requested ttl"
            );
        }
        *held = Some(token.clone());
        Ok(Issued {
            token,
            reused: false,
        })
    }

    /// Remove from the reuse cache every live token that `pick` selects, and return them so
    /// the caller can revoke them upstream. Later requests for those scopes mint afresh.
    pub async fn take_where(&self, pick: impl Fn(&IssuedToken) -> bool) -> Vec<IssuedToken> {
        let slots: Vec<Slot> = {
            let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots.values().cloned().collect()
        };
        let now = self.clock.now();
        let mut taken = Vec::new();
        for slot in slots {
            let mut held = slot.lock().await;
            if held.as_ref().is_some_and(|t| t.expires_at > now && pick(t))
                && let Some(t) = held.take()
            {
                taken.push(t);
            }
        }
        taken
    }

    /// How many scopes currently hold a live token (for metrics).
    pub fn live_tokens(&self) -> usize {
        let now = self.clock.now();
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .values()
            .filter(|s| {
                s.try_lock()
                    .is_ok_and(|g| g.as_ref().is_some_and(|t| t.expires_at > now))
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::OffsetClock;
    use crate::providers::github::SimulatedGithub;

    fn scope(repos: &[&str], perms: &[&str]) -> TokenScope {
        let r: Vec<RepoName> = repos.iter().map(|r| r.parse().unwrap()).collect();
        let p: Vec<Permission> = perms.iter().map(|p| p.parse().unwrap()).collect();
        TokenScope::new(&r, &p).unwrap()
    }

    #[test]
    fn scope_normalises() {
        assert_eq!(
            scope(
                &["a/y", "a/x", "a/y"],
                &["issues:read", "contents:read", "contents:write"]
            ),
            scope(&["a/x", "a/y"], &["contents:write", "issues:read"])
        );
        assert_ne!(
            scope(&["a/x"], &["contents:read"]),
            scope(&["a/x"], &["contents:write"])
        );
    }

    #[tokio::test]
    async fn reuses_while_enough_life_remains_then_mints_again() {
        let clock = OffsetClock::default();
        let shared: SharedClock = Arc::new(clock.clone());
        let github = Arc::new(SimulatedGithub::new(shared.clone()));
        let issuer = TokenIssuer::new(github.clone(), shared.clone());
        let s = scope(&["acme/web"], &["contents:read"]);
        let ten = Duration::from_secs(600);

        let first = issuer.issue(&s, ten, None).await.unwrap();
        assert!(!first.reused);
        let second = issuer.issue(&s, ten, None).await.unwrap();
        assert!(second.reused);
        assert_eq!(first.token.credential_id, second.token.credential_id);
        assert_eq!(github.stats().mints, 1);

        // 55 minutes later less than 10 minutes remain: a new token.
        clock.advance(55 * 60);
        let third = issuer.issue(&s, ten, None).await.unwrap();
        assert!(!third.reused);
        assert_ne!(third.token.credential_id, first.token.credential_id);
        assert_eq!(github.stats().mints, 2);
        assert!(third.token.expires_at > shared.now());

        // A client reports the live token rejected: a fresh one, once.
        let id = third.token.credential_id.clone();
        let fourth = issuer.issue(&s, ten, Some(&id)).await.unwrap();
        assert!(!fourth.reused);
        assert_ne!(fourth.token.credential_id, id);
        let fifth = issuer.issue(&s, ten, Some(&id)).await.unwrap();
        assert!(fifth.reused, "a stale report does not mint again");
        assert_eq!(github.stats().mints, 3);
    }

    #[tokio::test]
    async fn concurrent_identical_requests_mint_once() {
        let shared: SharedClock = Arc::new(OffsetClock::default());
        let github = Arc::new(SimulatedGithub::new(shared.clone()));
        let issuer = Arc::new(TokenIssuer::new(github.clone(), shared));
        let s = scope(&["acme/web"], &["contents:write"]);
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (issuer, s) = (issuer.clone(), s.clone());
            tasks.push(tokio::spawn(async move {
                issuer
                    .issue(&s, Duration::from_secs(60), None)
                    .await
                    .unwrap()
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(github.stats().mints, 1);
        assert_eq!(issuer.live_tokens(), 1);
    }

    #[test]
    fn credential_ids_hide_the_token() {
        let t = Secret::new("ghs_abcdefghijklmnopqrstuvwxyz0123456789");
        let id = credential_id_for(&t);
        assert!(id.starts_with("tok_") && id.len() == 28);
        assert!(!id.contains("abcdef"));
    }
}
