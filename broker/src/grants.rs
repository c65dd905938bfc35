//! Issuing GitHub installation tokens, with reuse: identical (owner/installation,
//! repositories, permissions) requests share one live token while it still has the requested
//! lifetime left. Live tokens are kept in memory only, never on disk.
//!
//! Concurrent identical requests wait on one mint (single flight), so a burst costs one
//! upstream call. Every token handed out is tracked until it expires, superseded ones too,
//! with the scope it was minted for and who it was handed to, so revocation (and a policy
//! reload) reaches all of them; a replaced token is revoked when its replacement is
//! minted, and replacements are rate limited per caller and scope.
//!
//! Deny wins on the answer too: the caller's `recheck` (the policy in force) runs after the
//! wait and the mint, under the same lock that records the holder, right before a token is
//! answered — from the cache or freshly minted. A reload that swaps the policy either comes
//! before that check (which then refuses) or finds the holder recorded (and revokes).

use std::collections::{BTreeMap, BTreeSet, HashMap};
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
    /// The token this one replaced at the client's report that GitHub rejected it; it was
    /// revoked at GitHub (or GitHub did not confirm) before this answer.
    pub replaced: Option<Replaced>,
}

/// A token the issuer revoked at GitHub itself — superseded by a replacement, or minted for a
/// request the recheck refused — and what the revocation did.
#[derive(Clone, Debug)]
pub struct Replaced {
    pub credential_id: String,
    pub repositories: Vec<String>,
    pub expires_at: OffsetDateTime,
    /// GitHub's refusal when it did not confirm the revocation.
    pub error: Option<String>,
}

/// A live token handed out: what it was minted for and to whom.
#[derive(Clone, Debug)]
pub struct HandedOut {
    pub token: IssuedToken,
    /// The scope asked for (the reuse key), which a policy decides on.
    pub scope: TokenScope,
    /// Who it was answered to: policy bots, or for callers matching none their description
    /// (the `who` of [`TokenIssuer::issue`]).
    pub holders: BTreeSet<String>,
}

/// The answer of [`TokenIssuer::issue`]: a token, or the recheck's refusal.
#[derive(Debug)]
pub enum Checked<R> {
    Issued(Box<Issued>),
    /// The recheck refused right before the answer (the policy changed meanwhile); the
    /// caller was handed nothing. `revoked` is the token minted for this request, which
    /// nobody holds: revoked at GitHub (or GitHub did not confirm) and never cached. The
    /// caller audits it.
    Refused {
        refusal: R,
        revoked: Option<Replaced>,
    },
}

/// Why [`TokenIssuer::issue`] handed out nothing.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error(transparent)]
    Github(#[from] GithubError),
    /// The caller asked for replacements of this scope faster than `[limits]` allows.
    #[error(
        "too many replacements of this token; another replacement is allowed in {retry_after_secs}s"
    )]
    ReplaceLimited { retry_after_secs: u64 },
}

impl IssueError {
    /// The stable error code: GitHub's refusal's, or `replace_rate_limited`.
    pub fn code(&self) -> botcreds_proto::ErrorCode {
        match self {
            IssueError::Github(e) => e.code(),
            IssueError::ReplaceLimited { .. } => botcreds_proto::ErrorCode::ReplaceRateLimited,
        }
    }

    /// Seconds after which asking again may succeed (GitHub's rate limit, or the bucket's).
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            IssueError::Github(GithubError::RateLimited { retry_after_secs })
            | IssueError::ReplaceLimited { retry_after_secs } => Some(*retry_after_secs),
            IssueError::Github(_) => None,
        }
    }
}

/// How often one caller may have the token of one scope replaced (`replaces`): a bucket of
/// `burst` replacements that regains one every `interval`. Each replacement is a mint, and
/// mints spend the App's rate limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplaceLimit {
    pub burst: u32,
    pub interval: Duration,
}

impl Default for ReplaceLimit {
    fn default() -> Self {
        ReplaceLimit {
            burst: 3,
            interval: Duration::from_secs(60),
        }
    }
}

/// One caller's replacement bucket for one scope.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Replacements available (fractional while refilling).
    available: f64,
    at: OffsetDateTime,
}

/// Buckets kept before full ones (indistinguishable from absent ones) are forgotten.
const MAX_BUCKETS: usize = 10_000;

type Slot = Arc<tokio::sync::Mutex<Option<IssuedToken>>>;

/// Mints tokens through a [`GithubApi`] and keeps the live ones for reuse.
pub struct TokenIssuer {
    github: Arc<dyn GithubApi>,
    clock: SharedClock,
    slots: Mutex<HashMap<TokenScope, Slot>>,
    /// Every token handed out, by credential id, until it expires — the one a scope's slot
    /// holds and those it superseded — so revocation reaches all of them. A slot's token
    /// that is not here (revoked) is never answered again.
    handed_out: Mutex<HashMap<String, HandedOut>>,
    replace_limit: ReplaceLimit,
    buckets: Mutex<HashMap<(String, TokenScope), Bucket>>,
}

impl TokenIssuer {
    pub fn new(github: Arc<dyn GithubApi>, clock: SharedClock) -> TokenIssuer {
        TokenIssuer {
            github,
            clock,
            slots: Mutex::new(HashMap::new()),
            handed_out: Mutex::new(HashMap::new()),
            replace_limit: ReplaceLimit::default(),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Use `limit` for replacements instead of the default.
    pub fn with_replace_limit(mut self, limit: ReplaceLimit) -> TokenIssuer {
        self.replace_limit = limit;
        self
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

    /// Take one replacement from `who`'s bucket for `scope`, or say when one is available.
    fn take_replacement(&self, who: &str, scope: &TokenScope) -> Result<(), IssueError> {
        let limit = self.replace_limit;
        let now = self.clock.now();
        let per_sec = 1.0 / limit.interval.as_secs_f64().max(0.001);
        let burst = f64::from(limit.burst);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_BUCKETS {
            buckets.retain(|_, b| {
                b.available + (now - b.at).as_seconds_f64().max(0.0) * per_sec < burst
            });
        }
        let bucket = buckets
            .entry((who.to_string(), scope.clone()))
            .or_insert(Bucket {
                available: burst,
                at: now,
            });
        let elapsed = (now - bucket.at).as_seconds_f64().max(0.0);
        bucket.available = (bucket.available + elapsed * per_sec).min(burst);
        bucket.at = now;
        if bucket.available >= 1.0 {
            bucket.available -= 1.0;
            return Ok(());
        }
        let wait = ((1.0 - bucket.available) / per_sec).ceil().max(1.0);
        Err(IssueError::ReplaceLimited {
            retry_after_secs: wait as u64,
        })
    }

    /// A token for `scope` that stays valid for at least `min_ttl`, for `who` (the bot): the
    /// live one if it qualifies, else a freshly minted one (which then replaces it). A live
    /// token whose id is `rejected` (a client saw GitHub refuse it) never qualifies: it is
    /// replaced — at most as often as the replacement limit lets `who` — and revoked.
    ///
    /// `recheck` runs right before the answer, after any wait on another request's mint and
    /// after this one's, and before a mint: `Some(refusal)` (the policy in force no longer
    /// allows it) answers [`Checked::Refused`] and hands nothing out. A token minted for a
    /// refused request has no holder, so it is revoked at GitHub and never cached: a live
    /// token nobody was answered would otherwise outlive every policy that could end it.
    pub async fn issue<R>(
        &self,
        scope: &TokenScope,
        min_ttl: Duration,
        rejected: Option<&str>,
        who: &str,
        recheck: impl Fn() -> Option<R>,
    ) -> Result<Checked<R>, IssueError> {
        let slot = self.slot(scope);
        let mut held = slot.lock().await;
        let now = self.clock.now();
        let mut replacing = None;
        if let Some(t) = held.clone()
            && t.expires_at > now
        {
            let enough_life = t.expires_at - now >= min_ttl;
            let mut handed_out = self.handed_out.lock().unwrap_or_else(|e| e.into_inner());
            // A token no longer tracked was revoked: neither answered nor replaced again.
            if let Some(entry) = handed_out.get_mut(&t.credential_id) {
                if rejected == Some(t.credential_id.as_str()) {
                    drop(handed_out);
                    // Only a replacement the ttl does not force anyway counts against the limit.
                    if enough_life {
                        self.take_replacement(who, scope)?;
                    }
                    replacing = Some(t);
                } else if enough_life {
                    // Record the holder and re-decide under one lock: a reload's sweep either
                    // sees this holder or this check sees the reloaded policy.
                    let added = entry.holders.insert(who.to_string());
                    if let Some(refusal) = recheck() {
                        if added {
                            entry.holders.remove(who);
                        }
                        return Ok(Checked::Refused {
                            refusal,
                            revoked: None,
                        });
                    }
                    return Ok(Checked::Issued(Box::new(Issued {
                        token: t,
                        reused: true,
                        replaced: None,
                    })));
                }
            }
        }
        // Nothing is minted for a request the policy in force refuses (it may have waited on
        // another request's mint while a reload swapped the policy).
        if let Some(refusal) = recheck() {
            return Ok(Checked::Refused {
                refusal,
                revoked: None,
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
        let refused = {
            let mut handed_out = self.handed_out.lock().unwrap_or_else(|e| e.into_inner());
            handed_out.retain(|_, h| h.token.expires_at > now);
            let refused = recheck();
            if refused.is_none() {
                handed_out.insert(
                    token.credential_id.clone(),
                    HandedOut {
                        token: token.clone(),
                        scope: scope.clone(),
                        holders: BTreeSet::from([who.to_string()]),
                    },
                );
                if let Some(old) = &replacing {
                    handed_out.remove(&old.credential_id);
                }
            }
            refused
        };
        if let Some(refusal) = refused {
            // Nobody holds the new token: it is neither tracked nor cached, and it is revoked
            // before the refusal is answered. A rejected token it was to replace stays tracked
            // (and revocable) but leaves the slot: a client saw GitHub refuse it.
            if replacing.is_some() {
                *held = None;
            }
            drop(held);
            let error = match self.github.revoke_installation_token(&token.token).await {
                Ok(()) => None,
                Err(e) => {
                    tracing::warn!(credential_id = %token.credential_id, error = %e, "GitHub did not confirm revoking a token minted for a refused request");
                    Some(e.to_string())
                }
            };
            return Ok(Checked::Refused {
                refusal,
                revoked: Some(Replaced {
                    credential_id: token.credential_id,
                    repositories: token.repositories,
                    expires_at: token.expires_at,
                    error,
                }),
            });
        }
        *held = Some(token.clone());
        drop(held);
        let replaced = match replacing {
            None => None,
            Some(old) => {
                let error = match self.github.revoke_installation_token(&old.token).await {
                    Ok(()) => None,
                    Err(e) => {
                        tracing::warn!(credential_id = %old.credential_id, error = %e, "GitHub did not confirm revoking a replaced token");
                        Some(e.to_string())
                    }
                };
                Some(Replaced {
                    credential_id: old.credential_id,
                    repositories: old.repositories,
                    expires_at: old.expires_at,
                    error,
                })
            }
        };
        Ok(Checked::Issued(Box::new(Issued {
            token,
            reused: false,
            replaced,
        })))
    }

    /// [`TokenIssuer::issue`] without a recheck, for tests of the cache itself.
    #[cfg(test)]
    pub async fn issue_unchecked(
        &self,
        scope: &TokenScope,
        min_ttl: Duration,
        rejected: Option<&str>,
        who: &str,
    ) -> Result<Issued, IssueError> {
        match self
            .issue(scope, min_ttl, rejected, who, || {
                None::<std::convert::Infallible>
            })
            .await?
        {
            Checked::Issued(i) => Ok(*i),
            Checked::Refused { refusal, .. } => match refusal {},
        }
    }

    /// Remove every live token that `pick` selects — the one a scope's slot holds and the
    /// superseded ones still alive — and return them so the caller can revoke them upstream.
    /// A slot's token that is taken is never answered again: later requests mint afresh.
    pub fn take_where(&self, pick: impl Fn(&HandedOut) -> bool) -> Vec<HandedOut> {
        let now = self.clock.now();
        let mut handed_out = self.handed_out.lock().unwrap_or_else(|e| e.into_inner());
        handed_out.retain(|_, h| h.token.expires_at > now);
        let ids: Vec<String> = handed_out
            .values()
            .filter(|h| pick(h))
            .map(|h| h.token.credential_id.clone())
            .collect();
        ids.iter().filter_map(|id| handed_out.remove(id)).collect()
    }

    /// How many tokens handed out are still live — superseded ones too (for metrics).
    pub fn live_tokens(&self) -> usize {
        let now = self.clock.now();
        self.handed_out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|h| h.token.expires_at > now)
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

    /// An issuer over the simulated GitHub, on a clock the test moves.
    fn simulated() -> (OffsetClock, Arc<SimulatedGithub>, TokenIssuer) {
        let clock = OffsetClock::default();
        let shared: SharedClock = Arc::new(clock.clone());
        let github = Arc::new(SimulatedGithub::new(shared.clone()));
        let issuer = TokenIssuer::new(github.clone(), shared);
        (clock, github, issuer)
    }

    #[tokio::test]
    async fn reuses_while_enough_life_remains_then_mints_again() {
        let (clock, github, issuer) = simulated();
        let s = scope(&["acme/web"], &["contents:read"]);
        let ten = Duration::from_secs(600);

        let first = issuer.issue_unchecked(&s, ten, None, "ci").await.unwrap();
        assert!(!first.reused);
        let second = issuer.issue_unchecked(&s, ten, None, "ci").await.unwrap();
        assert!(second.reused);
        assert_eq!(first.token.credential_id, second.token.credential_id);
        assert_eq!(github.stats().mints, 1);

        // 55 minutes later less than 10 minutes remain: a new token.
        clock.advance(55 * 60);
        let third = issuer.issue_unchecked(&s, ten, None, "ci").await.unwrap();
        assert!(!third.reused);
        assert_ne!(third.token.credential_id, first.token.credential_id);
        assert_eq!(github.stats().mints, 2);
        assert!(third.token.expires_at > crate::clock::Clock::now(&clock));

        // A client reports the live token rejected: a fresh one, once.
        let id = third.token.credential_id.clone();
        let fourth = issuer
            .issue_unchecked(&s, ten, Some(&id), "ci")
            .await
            .unwrap();
        assert!(!fourth.reused);
        assert_ne!(fourth.token.credential_id, id);
        let fifth = issuer
            .issue_unchecked(&s, ten, Some(&id), "ci")
            .await
            .unwrap();
        assert!(fifth.reused, "a stale report does not mint again");
        assert_eq!(github.stats().mints, 3);
    }

    /// A GitHub whose mints wait at a gate the test opens, so a test can hold the first
    /// mint until every other request has reached the point where it blocks.
    struct GatedGithub {
        inner: SimulatedGithub,
        open: tokio::sync::watch::Sender<bool>,
    }

    #[async_trait::async_trait]
    impl GithubApi for GatedGithub {
        async fn create_installation_token(
            &self,
            owner: &str,
            repositories: &[RepoName],
            permissions: &[Permission],
        ) -> Result<InstallationToken, GithubError> {
            let mut open = self.open.subscribe();
            let _ = open.wait_for(|o| *o).await;
            self.inner
                .create_installation_token(owner, repositories, permissions)
                .await
        }
        async fn revoke_installation_token(&self, token: &Secret) -> Result<(), GithubError> {
            self.inner.revoke_installation_token(token).await
        }
        async fn add_deploy_key(
            &self,
            token: &Secret,
            repo: &RepoName,
            title: &str,
            public_key: &str,
            read_only: bool,
        ) -> Result<u64, GithubError> {
            self.inner
                .add_deploy_key(token, repo, title, public_key, read_only)
                .await
        }
        async fn delete_deploy_key(
            &self,
            token: &Secret,
            repo: &RepoName,
            key_id: u64,
        ) -> Result<(), GithubError> {
            self.inner.delete_deploy_key(token, repo, key_id).await
        }
        async fn app_identity(&self) -> Result<crate::providers::github::AppIdentity, GithubError> {
            self.inner.app_identity().await
        }
        fn git_host(&self) -> &str {
            self.inner.git_host()
        }
        fn stats(&self) -> crate::providers::github::UpstreamStats {
            self.inner.stats()
        }
    }

    /// Regression: this test used to run on the current-thread runtime against a GitHub that
    /// never yields, so the requests ran one after another and it passed without single
    /// flight. Now 32 requests run on worker threads; the first mint is held until every
    /// request has been polled to the point where it waits (on the mint or on the scope's
    /// lock), so without single flight each of them mints.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_identical_requests_mint_once() {
        let shared: SharedClock = Arc::new(OffsetClock::default());
        let (open, _) = tokio::sync::watch::channel(false);
        let github = Arc::new(GatedGithub {
            inner: SimulatedGithub::new(shared.clone()),
            open,
        });
        let issuer = Arc::new(TokenIssuer::new(github.clone(), shared));
        let s = scope(&["acme/web"], &["contents:write"]);
        let (parked, mut parked_rx) = tokio::sync::watch::channel(0usize);
        let parked = Arc::new(parked);
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (issuer, s, parked) = (issuer.clone(), s.clone(), parked.clone());
            tasks.push(tokio::spawn(async move {
                let mut fut =
                    std::pin::pin!(issuer.issue_unchecked(&s, Duration::from_secs(60), None, "ci"));
                let mut counted = false;
                std::future::poll_fn(|cx| {
                    let r = fut.as_mut().poll(cx);
                    if r.is_pending() && !counted {
                        counted = true;
                        parked.send_modify(|n| *n += 1);
                    }
                    r
                })
                .await
                .unwrap()
            }));
        }
        parked_rx.wait_for(|n| *n == 32).await.unwrap();
        github.open.send_replace(true);
        let mut ids = std::collections::HashSet::new();
        for t in tasks {
            ids.insert(t.await.unwrap().token.credential_id);
        }
        assert_eq!(github.stats().mints, 1);
        assert_eq!(ids.len(), 1, "every request got the one token");
        assert_eq!(issuer.live_tokens(), 1);
    }

    /// Regression: a replacement (or a ttl-driven re-mint) overwrote the held token, so the
    /// superseded one stayed live at GitHub and out of reach of revocation.
    #[tokio::test]
    async fn superseded_tokens_stay_revocable_and_a_replaced_one_is_revoked() {
        let (clock, github, issuer) = simulated();
        let s = scope(&["acme/web"], &["contents:read"]);
        let ten = Duration::from_secs(600);

        let first = issuer
            .issue_unchecked(&s, ten, None, "ci")
            .await
            .unwrap()
            .token;
        // The client reports the first rejected: the replacement revokes it at GitHub.
        let second = issuer
            .issue_unchecked(&s, ten, Some(&first.credential_id), "ci")
            .await
            .unwrap()
            .token;
        assert_ne!(first.credential_id, second.credential_id);
        assert!(
            github.is_revoked(&first.token),
            "the replaced token is revoked"
        );
        // 55 minutes on, a request needing 10 minutes gets a third token; the second is
        // superseded but still live and still the broker's to revoke.
        clock.advance(55 * 60);
        let third = issuer
            .issue_unchecked(&s, ten, None, "ci")
            .await
            .unwrap()
            .token;
        assert_ne!(third.credential_id, second.credential_id);
        assert!(github.is_live(&second.token));

        let mut taken: Vec<String> = issuer
            .take_where(|_| true)
            .into_iter()
            .map(|h| h.token.credential_id)
            .collect();
        taken.sort();
        let mut want = vec![second.credential_id.clone(), third.credential_id.clone()];
        want.sort();
        assert_eq!(taken, want, "every live token, superseded ones too");
        assert!(issuer.take_where(|_| true).is_empty());
    }

    /// Regression: `replaces` with the newest token's id minted on every request, so one bot
    /// could spend the App's rate limit (20 requests → 19 mints).
    #[tokio::test]
    async fn replacements_are_rate_limited_per_bot_and_scope() {
        let (clock, github, issuer) = simulated();
        let s = scope(&["acme/web"], &["contents:read"]);
        let ten = Duration::from_secs(600);
        let mut current = issuer
            .issue_unchecked(&s, ten, None, "ci")
            .await
            .unwrap()
            .token;
        let mut refused = 0;
        for _ in 0..20 {
            match issuer
                .issue_unchecked(&s, ten, Some(&current.credential_id), "ci")
                .await
            {
                Ok(i) => current = i.token,
                Err(_) => refused += 1,
            }
        }
        let limit = ReplaceLimit::default();
        assert_eq!(github.stats().mints, 1 + u64::from(limit.burst));
        assert_eq!(refused, 20 - limit.burst as usize);
        // Another bot has its own bucket; time refills this one.
        let other = issuer
            .issue_unchecked(&s, ten, Some(&current.credential_id), "deploy")
            .await;
        assert!(other.is_ok());
        current = other.unwrap().token;
        match issuer
            .issue_unchecked(&s, ten, Some(&current.credential_id), "ci")
            .await
        {
            Err(IssueError::ReplaceLimited { retry_after_secs }) => {
                assert!((1..=60).contains(&retry_after_secs), "{retry_after_secs}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        clock.advance(60);
        assert!(
            issuer
                .issue_unchecked(&s, ten, Some(&current.credential_id), "ci")
                .await
                .is_ok()
        );
    }

    /// Regression: `live_tokens` counted the scopes whose slot held a token, so a token a
    /// re-mint superseded — handed out and live at GitHub — was missing from the gauge.
    #[tokio::test]
    async fn live_tokens_counts_superseded_tokens() {
        let (clock, github, issuer) = simulated();
        let s = scope(&["acme/web"], &["contents:read"]);
        let ten = Duration::from_secs(600);
        let first = issuer
            .issue_unchecked(&s, ten, None, "ci")
            .await
            .unwrap()
            .token;
        assert_eq!(issuer.live_tokens(), 1);
        clock.advance(55 * 60);
        issuer.issue_unchecked(&s, ten, None, "ci").await.unwrap();
        assert!(github.is_live(&first.token));
        assert_eq!(issuer.live_tokens(), 2, "the superseded token is live too");
        // Past the first one's expiry only the second counts.
        clock.advance(6 * 60);
        assert_eq!(issuer.live_tokens(), 1);
    }

    /// The recheck decides before every answer: a refusal hands nothing out, from the cache
    /// or from a fresh mint, and records no holder; a request it allows still gets the token.
    /// Regression: a token minted for a refused request stayed live at GitHub and cached,
    /// held by nobody; it is now revoked at GitHub and never cached.
    #[tokio::test]
    async fn the_recheck_refuses_cached_and_minted_tokens_alike() {
        let shared: SharedClock = Arc::new(OffsetClock::default());
        let github = Arc::new(SimulatedGithub::new(shared.clone()));
        let issuer = TokenIssuer::new(github.clone(), shared);
        let s = scope(&["acme/web"], &["contents:read"]);
        let ten = Duration::from_secs(600);
        let holders = |issuer: &TokenIssuer| -> Vec<Vec<String>> {
            issuer
                .handed_out
                .lock()
                .unwrap()
                .values()
                .map(|h| h.holders.iter().cloned().collect())
                .collect()
        };
        // Refused before the mint: nothing minted.
        let refused = issuer
            .issue(&s, ten, None, "ci", || Some("denied"))
            .await
            .unwrap();
        assert!(matches!(
            refused,
            Checked::Refused {
                refusal: "denied",
                revoked: None
            }
        ));
        assert_eq!(github.stats().mints, 0);
        // Refused after the mint (the policy changed while GitHub answered): the minted
        // token is revoked at GitHub, neither tracked nor cached.
        let calls = std::sync::atomic::AtomicU32::new(0);
        let refused = issuer
            .issue(&s, ten, None, "ci", || {
                (calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0).then_some("denied")
            })
            .await
            .unwrap();
        let Checked::Refused {
            refusal: "denied",
            revoked: Some(revoked),
        } = refused
        else {
            panic!("not refused with a revoked token: {refused:?}");
        };
        assert!(revoked.error.is_none());
        assert_eq!(github.stats().mints, 1);
        assert!(holders(&issuer).is_empty(), "not tracked");
        // Allowed: a fresh token, held by deploy.
        let ok = issuer
            .issue_unchecked(&s, ten, None, "deploy")
            .await
            .unwrap();
        assert!(!ok.reused, "the revoked token was not cached");
        assert_ne!(ok.token.credential_id, revoked.credential_id);
        assert_eq!(github.stats().mints, 2);
        assert_eq!(holders(&issuer), vec![vec!["deploy".to_string()]]);
        // The cached token, refused to ci: still deploy's alone, and live.
        let refused = issuer
            .issue(&s, ten, None, "ci", || Some("denied"))
            .await
            .unwrap();
        assert!(matches!(
            refused,
            Checked::Refused {
                refusal: "denied",
                revoked: None
            }
        ));
        assert!(github.is_live(&ok.token.token));
        assert_eq!(holders(&issuer), vec![vec!["deploy".to_string()]]);
        // Taken (revoked): never answered from the slot again.
        assert_eq!(issuer.take_where(|_| true).len(), 1);
        let fresh = issuer
            .issue_unchecked(&s, ten, None, "deploy")
            .await
            .unwrap();
        assert!(!fresh.reused);
        assert_ne!(fresh.token.credential_id, ok.token.credential_id);
    }

    /// A replacement whose recheck refuses after its mint: the new token is revoked, and the
    /// rejected one it was to replace leaves the slot (still tracked, so revocable) — the next
    /// allowed request gets a fresh token, never the one a client saw GitHub refuse.
    #[tokio::test]
    async fn a_refused_replacement_answers_the_rejected_token_to_nobody() {
        let shared: SharedClock = Arc::new(OffsetClock::default());
        let github = Arc::new(SimulatedGithub::new(shared.clone()));
        let issuer = TokenIssuer::new(github.clone(), shared);
        let s = scope(&["acme/web"], &["contents:read"]);
        let ten = Duration::from_secs(600);
        let first = issuer
            .issue_unchecked(&s, ten, None, "ci")
            .await
            .unwrap()
            .token;
        let calls = std::sync::atomic::AtomicU32::new(0);
        let refused = issuer
            .issue(&s, ten, Some(&first.credential_id), "ci", || {
                (calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0).then_some("denied")
            })
            .await
            .unwrap();
        assert!(matches!(
            refused,
            Checked::Refused {
                revoked: Some(_),
                ..
            }
        ));
        let next = issuer
            .issue_unchecked(&s, ten, None, "deploy")
            .await
            .unwrap();
        assert!(!next.reused, "the rejected token was answered again");
        assert_ne!(next.token.credential_id, first.credential_id);
        assert_eq!(
            issuer
                .take_where(|h| h.token.credential_id == first.credential_id)
                .len(),
            1,
            "the rejected token stays tracked"
        );
    }

    #[test]
    fn credential_ids_hide_the_token() {
        let t = Secret::new("ghs_abcdefghijklmnopqrstuvwxyz0123456789");
        let id = credential_id_for(&t);
        assert!(id.starts_with("tok_") && id.len() == 28);
        assert!(!id.contains("abcdef"));
    }
}
