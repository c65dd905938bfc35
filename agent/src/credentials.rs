//! The GitHub tokens this agent holds, in memory and in the disk cache: git's `get` and
//! `erase`, and one [`Slot`] per credential whose task sleeps until its next deadline to
//! refresh, retry, expire or forget it.
//!
//! Two locks per credential (the slot's), for two different waits: `fetch_lock` makes
//! concurrent fetches of one credential share a single broker call; `disk_lock` orders every
//! change of the held credential with its disk write, so memory and disk never disagree about
//! which token is current, without making an `erase` wait for a slow broker.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use botcreds_proto::agent::{CredentialSource, CredentialState, CredentialStatus};
use botcreds_proto::git_credential::Description;
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::broker_client::{BrokerClient, BrokerError, CredentialBroker, Issued};
use crate::cache::{CACHE_FORMAT, CacheRecord, DiskCache};
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, GithubEntry, Resolved, Scope};
use crate::refresh::{self, Action, Timeline};
use crate::secret::Secret;
use crate::slot::{self, Held, Kind, Slot, State, lock};

/// Replacements of one credential that git's `erase` may cause within [`REPLACEMENT_WINDOW`]:
/// more rejections than that are a loop (or a local user minting tokens), not a revoked token.
const MAX_REPLACEMENTS: usize = 2;
const REPLACEMENT_WINDOW: Duration = Duration::from_secs(10 * 60);

/// How the agent answers git's `get`.
#[derive(Debug)]
pub enum GitAnswer {
    Credential {
        token: Secret,
        expires_at: SystemTime,
    },
    /// Not a host this agent serves: git should ask its next helper.
    NotServed,
    /// No credential, and why (for the helper's stderr). `quit` when the refusal is definitive.
    Refused {
        status: u16,
        message: String,
        quit: bool,
    },
}

/// A new per-repository credential would exceed `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotLimit {
    #[error(
        "uid {uid} already has {limit} per-repository credentials, the most one user may \
         (limits.repository_credentials_per_user in agent.toml); they are forgotten after idle_timeout"
    )]
    PerUser { uid: u32, limit: usize },
    #[error(
        "the agent already tracks {limit} per-repository credentials, its limit \
         (limits.repository_credentials in agent.toml); they are forgotten after idle_timeout"
    )]
    Total { limit: usize },
}

/// The outside world of the agent's credential tasks: the broker they ask and the clock they
/// plan by. The daemon uses the real ones; tests swap in fakes.
#[derive(Clone)]
pub struct Edges {
    pub broker: Arc<dyn CredentialBroker>,
    pub clock: Arc<dyn Clock>,
}

/// The agent's credentials: a cheap handle to shared state.
#[derive(Clone)]
pub struct Credentials {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<Config>,
    /// The HTTP client, for what is not a credential (the status probe, mTLS renewal).
    client: Arc<BrokerClient>,
    edges: Edges,
    disk: DiskCache,
    slots: Mutex<HashMap<String, Arc<Slot<Token>>>>,
    /// When the broker last answered a credential request (even with a refusal).
    last_contact: Mutex<Option<SystemTime>>,
}

/// A GitHub token of one scope: the [`Kind`] of the agent's GitHub slots.
pub struct Token {
    scope: Scope,
    entry: GithubEntry,
    source: CredentialSource,
    /// The uid whose request created this per-repository slot (`[limits]`).
    owner: Option<u32>,
    idle_timeout: Duration,
}

/// A GitHub slot's own state.
#[derive(Default)]
pub struct TokenState {
    /// The id of a credential git reported rejected; sent with the next request so that the
    /// broker does not hand the same one back from its reuse cache.
    rejected: Option<String>,
    last_used: Option<SystemTime>,
    /// When git's `erase` last made the agent drop this credential (within the window).
    replacements: Vec<SystemTime>,
}

impl Kind for Token {
    type Value = Secret;
    type Extra = TokenState;
    type Step = Action;
    type Answer = Issued;
    type Record = CacheRecord;
    type Status = CredentialStatus;

    const MAX_LIFE: Duration = refresh::MAX_GITHUB_TOKEN_LIFE;
    const NOUN: &'static str = "credential";

    fn scope(&self) -> &dyn Display {
        &self.scope
    }

    fn task_name(&self) -> String {
        format!("credential {}", self.scope)
    }

    async fn ask<'a>(
        &'a self,
        broker: &'a dyn CredentialBroker,
        replaces: Option<&'a str>,
    ) -> Result<Issued, BrokerError> {
        broker
            .github_token(&self.scope, &self.entry, replaces)
            .await
    }

    fn check(&self, issued: Issued, now: SystemTime) -> Result<Held<Token>, BrokerError> {
        let bad = |detail: String| BrokerError::BadAnswer {
            status: 200,
            detail,
        };
        if !refresh::servable(issued.expires_at, now) {
            return Err(bad(format!(
                "the credential expires at {}, less than a minute from now (check the clocks)",
                rfc3339(issued.expires_at)
            )));
        }
        refresh::check_lifetime(issued.expires_at, now, refresh::MAX_GITHUB_TOKEN_LIFE).map_err(
            |why| {
                bad(format!(
                    "the GitHub token expires at {}: {why}",
                    rfc3339(issued.expires_at)
                ))
            },
        )?;
        Ok(Held {
            refresh_at: self.refresh_at(now, issued.expires_at, rand::random()),
            value: issued.token,
            credential_id: issued.credential_id,
            expires_at: issued.expires_at,
            fetched_at: now,
        })
    }

    fn refresh_at(&self, _fetched_at: SystemTime, expires_at: SystemTime, unit: f64) -> SystemTime {
        let before = self.entry.refresh_before;
        refresh::refresh_at(expires_at, before, refresh::refresh_jitter(before, unit))
    }

    fn next_step(&self, now: SystemTime, st: &State<Token>) -> Option<(SystemTime, Action)> {
        refresh::next_action(now, &self.timeline(st), self.idle_timeout)
    }

    fn due_again(&self, left: Duration) -> String {
        format!(
            "the broker handed out a token with only {}m left, less than refresh_before ({}m)",
            left.as_secs() / 60,
            self.entry.refresh_before.as_secs() / 60
        )
    }

    fn accept(&self, st: &mut State<Token>, new: &Held<Token>, now: SystemTime) -> bool {
        st.held = Some(new.clone());
        st.extra.rejected = None;
        st.last_refresh = Some(now);
        true
    }

    fn record(&self, held: &Held<Token>, st: &State<Token>) -> CacheRecord {
        CacheRecord {
            format: CACHE_FORMAT,
            protocol: self.scope.protocol.clone(),
            host: self.scope.host.clone(),
            repositories: self
                .scope
                .repositories
                .iter()
                .map(|r| r.to_string())
                .collect(),
            permissions: self
                .scope
                .permissions
                .iter()
                .map(|p| p.to_string())
                .collect(),
            credential_id: held.credential_id.clone(),
            token: held.value.clone(),
            expires_at: time_to_unix(held.expires_at),
            fetched_at: time_to_unix(held.fetched_at),
            last_used: st.extra.last_used.map(time_to_unix),
        }
    }

    fn status(&self, now: SystemTime, st: &State<Token>) -> CredentialStatus {
        let next = self.next_step(now, st);
        let servable = st.servable(now);
        let state = match servable {
            None => CredentialState::Missing,
            Some(h) if now >= h.refresh_at && st.failures > 0 => CredentialState::ServingFromCache,
            Some(h) if now >= h.refresh_at => CredentialState::Refreshing,
            Some(_) => CredentialState::Fresh,
        };
        CredentialStatus {
            protocol: self.scope.protocol.clone(),
            host: self.scope.host.clone(),
            repositories: self
                .scope
                .repositories
                .iter()
                .map(|r| r.to_string())
                .collect(),
            permissions: self
                .scope
                .permissions
                .iter()
                .map(|p| p.to_string())
                .collect(),
            source: self.source,
            state,
            credential_id: servable.map(|h| h.credential_id.clone()),
            expires_at: servable.map(|h| rfc3339(h.expires_at)),
            last_refresh: st.last_refresh.map(rfc3339),
            next_refresh: match next {
                Some((at, Action::Fetch)) => Some(rfc3339(at.max(now))),
                _ => None,
            },
            last_used: st.extra.last_used.map(rfc3339),
            last_error: st.last_error.as_ref().map(|(_, e)| e.clone()),
            last_error_at: st.last_error.as_ref().map(|(at, _)| rfc3339(*at)),
            failures: st.failures,
        }
    }
}

impl Token {
    fn timeline(&self, st: &State<Token>) -> Timeline {
        Timeline {
            expires_at: st.held.as_ref().map(|h| h.expires_at),
            refresh_at: st.held.as_ref().map(|h| h.refresh_at),
            retry_at: st.retry_at,
            always_fresh: self.source == CredentialSource::Config,
            last_used: st.extra.last_used,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// git is waiting: a credential someone else fetched meanwhile is as good.
    Git,
    /// The refresh deadline passed: fetch even though the held one is still servable.
    Refresh,
}

impl Credentials {
    /// Loads the disk cache, tracks every configured credential and starts their tasks, asking
    /// `broker` on the system clock. Must be called inside the tokio runtime.
    pub fn start(config: Arc<Config>, broker: BrokerClient, disk: DiskCache) -> Credentials {
        let client = Arc::new(broker);
        let edges = Edges {
            broker: client.clone(),
            clock: Arc::new(SystemClock),
        };
        Credentials::start_with(config, client, edges, disk)
    }

    /// [`Credentials::start`] with the broker and clock the tasks use given (`client` serves
    /// only the status probe and the mTLS renewal).
    pub fn start_with(
        config: Arc<Config>,
        client: Arc<BrokerClient>,
        edges: Edges,
        disk: DiskCache,
    ) -> Credentials {
        let inner = Arc::new(Inner {
            config,
            client,
            edges,
            disk,
            slots: Mutex::new(HashMap::new()),
            last_contact: Mutex::new(None),
        });
        inner.load_disk_cache();
        for entry in &inner.config.github {
            if let Some(scope) = entry.literal_scope() {
                // Configured credentials are not limited: `limits` bound what requests add.
                let _ = inner.slot(scope, entry, CredentialSource::Config, None, None);
            }
        }
        Credentials { inner }
    }

    pub fn broker(&self) -> &BrokerClient {
        &self.inner.client
    }

    /// The broker and clock the credential tasks use (shared with the LiteLLM keys).
    pub fn edges(&self) -> &Edges {
        &self.inner.edges
    }

    pub fn last_contact(&self) -> Option<SystemTime> {
        *lock(&self.inner.last_contact)
    }

    /// The broker answered another part of the agent (LiteLLM keys): `status` shows the last
    /// contact over all of them.
    pub fn record_broker_contact(&self, at: SystemTime) {
        self.inner.record_contact(at);
    }

    /// Answers git's `get` for the local user `uid` (whose per-repository credentials count
    /// against `[limits]`).
    pub async fn git_get(&self, d: &Description, uid: u32) -> GitAnswer {
        let (protocol, host) = match required(d) {
            Ok(v) => v,
            Err(message) => {
                return GitAnswer::Refused {
                    status: 400,
                    message,
                    quit: false,
                };
            }
        };
        let refused = |status, message| GitAnswer::Refused {
            status,
            message,
            quit: false,
        };
        let (scope, entry, per_repository) = match self.inner.config.resolve(
            protocol,
            host,
            d.path.as_deref(),
        ) {
            Resolved::NotServed => return GitAnswer::NotServed,
            Resolved::NeedsPath => {
                return refused(
                    404,
                    format!(
                        "botcreds: {protocol}://{host} is configured with repository patterns only, and git did not \
                         say which repository it wants; run: git config --global credential.{protocol}://{host}.useHttpPath true"
                    ),
                );
            }
            Resolved::BadPath(path) => {
                return refused(
                    400,
                    format!("botcreds: path {path:?} is not of the form owner/repository"),
                );
            }
            Resolved::NoEntry(repo) => {
                return refused(
                    404,
                    format!(
                        "botcreds: {repo} on {host} is not among this agent's configured repositories"
                    ),
                );
            }
            Resolved::Scope {
                scope,
                entry,
                per_repository,
            } => (scope, entry, per_repository),
        };
        let source = if per_repository {
            CredentialSource::Path
        } else {
            CredentialSource::Config
        };
        let now = self.inner.now();
        let slot = match self.inner.slot(scope, entry, source, Some(now), Some(uid)) {
            Ok(slot) => slot,
            Err(limit) => {
                tracing::warn!(uid, %limit, "refused a new per-repository credential");
                return refused(429, format!("botcreds: {limit}"));
            }
        };
        if let Some(held) = slot.servable(now) {
            return GitAnswer::Credential {
                token: held.value,
                expires_at: held.expires_at,
            };
        }
        let fetch = tokio::spawn(fetch(self.inner.clone(), slot.clone(), Purpose::Git));
        let what = describe_repos(&slot.kind.scope);
        match tokio::time::timeout(self.inner.config.helper_timeout, fetch).await {
            Ok(Ok(Ok(Some(held)))) => GitAnswer::Credential {
                token: held.value,
                expires_at: held.expires_at,
            },
            Ok(Ok(Ok(None))) => refused(
                500,
                format!("botcreds: no credential for {what}; try again"),
            ),
            Ok(Ok(Err(e))) => GitAnswer::Refused {
                status: e.local_status(),
                message: format!("botcreds: no credential for {what} on {host}: {e}"),
                quit: e.is_definitive(),
            },
            Ok(Err(join)) => refused(
                500,
                format!("botcreds: fetching a credential for {what} failed: {join}"),
            ),
            Err(_) => refused(
                504,
                format!(
                    "botcreds: the broker did not answer within {}s (helper_timeout); no credential for {what} yet, \
                     try again",
                    self.inner.config.helper_timeout.as_secs_f32()
                ),
            ),
        }
    }

    /// Answers git's `erase`: drops the credential git says was rejected, so the next `get`
    /// fetches a new one — only when git names the held token as its `password` (compared in
    /// constant time), and at most [`MAX_REPLACEMENTS`] times per [`REPLACEMENT_WINDOW`]: an
    /// erase without the token, or a loop of them, must not mint a token per call (the next
    /// request `replaces` the dropped one, which bypasses the broker's reuse). `Err` carries a
    /// message for bad input.
    pub async fn git_erase(&self, d: &Description) -> Result<(), String> {
        let (protocol, host) = required(d)?;
        let Resolved::Scope { scope, .. } =
            self.inner.config.resolve(protocol, host, d.path.as_deref())
        else {
            return Ok(());
        };
        let slot = lock(&self.inner.slots)
            .get(&scope.cache_file_name())
            .cloned();
        let Some(slot) = slot else {
            return Ok(());
        };
        let Some(password) = d.password.as_deref() else {
            tracing::info!(scope = %slot.kind.scope, "git sent erase without a password; keeping the credential");
            return Ok(());
        };
        let _disk = slot.disk_lock.lock().await;
        let now = self.inner.now();
        let dropped = {
            let mut st = slot.state();
            let matches = st.held.as_ref().is_some_and(|h| {
                bool::from(password.as_bytes().ct_eq(h.value.expose().as_bytes()))
            });
            st.extra
                .replacements
                .retain(|at| now.duration_since(*at).unwrap_or_default() < REPLACEMENT_WINDOW);
            if !matches {
                None
            } else if st.extra.replacements.len() >= MAX_REPLACEMENTS {
                tracing::warn!(
                    scope = %slot.kind.scope,
                    limit = MAX_REPLACEMENTS,
                    window_s = REPLACEMENT_WINDOW.as_secs(),
                    "git reported the credential as rejected again; too many replacements, keeping it"
                );
                None
            } else {
                st.extra.replacements.push(now);
                let taken = st.held.take();
                if let Some(h) = &taken {
                    st.extra.rejected = Some(h.credential_id.clone());
                }
                taken
            }
        };
        if let Some(held) = dropped {
            tracing::info!(
                scope = %slot.kind.scope,
                credential_id = %held.credential_id,
                "git reported the credential as rejected; dropped it, the next request fetches a new one"
            );
            slot.remove_cache(&self.inner.disk).await;
            slot.wake.notify_one();
        }
        Ok(())
    }

    /// Every tracked credential, for `GET /v1/status`.
    pub fn status(&self) -> Vec<CredentialStatus> {
        let now = self.inner.now();
        let mut slots: Vec<Arc<Slot<Token>>> = lock(&self.inner.slots).values().cloned().collect();
        slots.sort_by(|a, b| a.kind.scope.cmp(&b.kind.scope));
        slots.iter().map(|slot| slot.status(now)).collect()
    }

    /// Stops every credential's task.
    pub fn shutdown(&self) {
        for slot in lock(&self.inner.slots).values() {
            slot.abort();
        }
    }
}

fn required(d: &Description) -> Result<(&str, &str), String> {
    let protocol = d
        .protocol
        .as_deref()
        .filter(|p| !p.is_empty())
        .ok_or("botcreds: the credential request has no protocol")?;
    let host = d
        .host
        .as_deref()
        .filter(|h| !h.is_empty())
        .ok_or("botcreds: the credential request has no host")?;
    Ok((protocol, host))
}

fn describe_repos(scope: &Scope) -> String {
    scope
        .repositories
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Inner {
    fn now(&self) -> SystemTime {
        self.edges.clock.now()
    }

    fn load_disk_cache(self: &Arc<Self>) {
        let (loaded, problems) = match self.disk.load() {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(cache_dir = %self.disk.dir().display(), error = %e, "cannot read the cache directory; starting empty");
                return;
            }
        };
        for p in problems {
            tracing::warn!(
                cache_dir = %self.disk.dir().display(),
                file = %p.file_name,
                "cache file {}; its credential will be fetched anew",
                p.reason
            );
        }
        let now = self.now();
        for l in loaded {
            let record = l.record;
            let Ok(scope) = record.scope() else { continue };
            let Some((entry, per_repository)) = self.config.entry_for(&scope) else {
                tracing::info!(scope = %scope, "cached credential is no longer configured; removing it");
                let _ = self.disk.remove(&l.file_name);
                continue;
            };
            let times = (record.expires_at, record.fetched_at, record.last_used);
            // Checked before a slot is tracked: a record out of range must not take a
            // per-repository place.
            let kind = self.token(scope.clone(), entry, CredentialSource::Config, None);
            let (held, last_used) = match slot::from_cache(
                &kind,
                record.token,
                record.credential_id,
                times,
                now,
            ) {
                Ok(Some(loaded)) => loaded,
                Ok(None) => {
                    let _ = self.disk.remove(&l.file_name);
                    continue;
                }
                Err(reason) => {
                    tracing::warn!(scope = %scope, file = %l.file_name, "cached credential has times out of range ({reason}); removed, fetching anew");
                    let _ = self.disk.remove(&l.file_name);
                    continue;
                }
            };
            let source = if per_repository {
                CredentialSource::Path
            } else {
                CredentialSource::Config
            };
            tracing::info!(
                scope = %scope,
                credential_id = %held.credential_id,
                expires_at = %rfc3339(held.expires_at),
                "loaded cached credential"
            );
            let slot = match self.slot(scope, entry, source, None, None) {
                Ok(slot) => slot,
                Err(limit) => {
                    tracing::info!(file = %l.file_name, %limit, "not loading this cached credential; removing it");
                    let _ = self.disk.remove(&l.file_name);
                    continue;
                }
            };
            let mut st = slot.state();
            st.last_refresh = Some(held.fetched_at);
            st.extra.last_used = last_used;
            st.held = Some(held);
            drop(st);
            slot.wake.notify_one();
        }
    }

    fn token(
        &self,
        scope: Scope,
        entry: &GithubEntry,
        source: CredentialSource,
        owner: Option<u32>,
    ) -> Token {
        Token {
            scope,
            entry: entry.clone(),
            source,
            owner,
            idle_timeout: self.config.idle_timeout,
        }
    }

    /// The slot for `scope`, created (with its task) if new; `used` marks git's use of it.
    /// A new per-repository slot counts against `[limits]`, for `owner` (the uid whose request
    /// creates it; `None` for one loaded from the cache) and in total.
    fn slot(
        self: &Arc<Self>,
        scope: Scope,
        entry: &GithubEntry,
        source: CredentialSource,
        used: Option<SystemTime>,
        owner: Option<u32>,
    ) -> Result<Arc<Slot<Token>>, SlotLimit> {
        let file_name = scope.cache_file_name();
        let mut slots = lock(&self.slots);
        if source == CredentialSource::Path && !slots.contains_key(&file_name) {
            let limits = self.config.limits;
            let per_repository = slots
                .values()
                .filter(|s| s.kind.source == CredentialSource::Path);
            let (total, mine) = per_repository.fold((0, 0), |(total, mine), s| {
                (
                    total + 1,
                    mine + usize::from(owner.is_some() && s.kind.owner == owner),
                )
            });
            if let Some(uid) = owner
                && mine >= limits.repository_credentials_per_user
            {
                return Err(SlotLimit::PerUser {
                    uid,
                    limit: limits.repository_credentials_per_user,
                });
            }
            if total >= limits.repository_credentials {
                return Err(SlotLimit::Total {
                    limit: limits.repository_credentials,
                });
            }
        }
        let slot = slots
            .entry(file_name.clone())
            .or_insert_with(|| {
                let slot = Arc::new(Slot::new(
                    self.token(scope, entry, source, owner),
                    file_name,
                    TokenState::default(),
                ));
                let (inner, supervised) = (self.clone(), slot.clone());
                slot.spawn(move || run_slot(inner.clone(), supervised.clone()));
                slot
            })
            .clone();
        drop(slots);
        if let Some(now) = used {
            slot.state().extra.last_used = Some(now);
            // Being used can turn an idle per-repository credential back into one that is kept
            // fresh; a configured one is kept fresh anyway, its task has nothing to plan anew.
            if slot.kind.source == CredentialSource::Path {
                slot.wake.notify_one();
            }
        }
        Ok(slot)
    }

    async fn expire(&self, slot: &Slot<Token>) {
        if let Some(held) = slot.expire(&self.disk, self.edges.clock.as_ref()).await {
            tracing::info!(
                scope = %slot.kind.scope,
                credential_id = %held.credential_id,
                "credential expired without a refresh; dropped it"
            );
        }
    }

    /// Removes an unused per-repository slot; false if it became wanted again meanwhile.
    fn forget(&self, slot: &Arc<Slot<Token>>) -> bool {
        let mut slots = lock(&self.slots);
        let now = self.now();
        let due = matches!(
            slot.next_step(now),
            Some((at, Action::Forget)) if at <= now
        );
        if due
            && slots
                .get(&slot.file_name)
                .is_some_and(|s| Arc::ptr_eq(s, slot))
        {
            slots.remove(&slot.file_name);
            slot.release_task();
            return true;
        }
        false
    }

    fn record_contact(&self, at: SystemTime) {
        *lock(&self.last_contact) = Some(at);
    }
}

/// One broker call for `slot`, shared by everyone who needs it at the same moment. `Ok(None)`:
/// a refresh that is no longer due once the lock was ours (a fetch for git just did it).
async fn fetch(
    inner: Arc<Inner>,
    slot: Arc<Slot<Token>>,
    purpose: Purpose,
) -> Result<Option<Held<Token>>, BrokerError> {
    let _fetching = slot.fetch_lock.lock().await;
    let now = inner.now();
    match purpose {
        Purpose::Git => {
            if let Some(held) = slot.servable(now) {
                return Ok(Some(held));
            }
        }
        Purpose::Refresh => {
            let due = matches!(
                slot.next_step(now),
                Some((at, Action::Fetch)) if at <= now
            );
            if !due {
                return Ok(None);
            }
        }
    }
    let rejected = slot.state().extra.rejected.clone();
    let (now, result) = slot
        .fetch(
            inner.edges.broker.as_ref(),
            inner.edges.clock.as_ref(),
            &inner.disk,
            rejected.as_deref(),
        )
        .await;
    match result {
        Ok(held) => {
            inner.record_contact(now);
            tracing::info!(
                scope = %slot.kind.scope,
                credential_id = %held.credential_id,
                expires_at = %rfc3339(held.expires_at),
                "credential fetched"
            );
            slot.wake.notify_one();
            Ok(Some(held))
        }
        Err(slot::Refused { error: e, failed }) => {
            if e.broker_answered() {
                inner.record_contact(now);
            }
            if let Some(held) = failed.dropped {
                tracing::warn!(
                    scope = %slot.kind.scope,
                    credential_id = %held.credential_id,
                    error = %e,
                    "the broker refuses this credential now; dropped the cached copy"
                );
            } else if failed.still_held {
                tracing::warn!(
                    scope = %slot.kind.scope,
                    error = %e,
                    failures = failed.failures,
                    retry_in_s = failed.retry_in.as_secs(),
                    "refresh failed; serving the cached credential until it expires"
                );
            } else {
                tracing::warn!(
                    scope = %slot.kind.scope,
                    error = %e,
                    failures = failed.failures,
                    retry_in_s = failed.retry_in.as_secs(),
                    "fetching the credential failed"
                );
            }
            slot.wake.notify_one();
            Err(e)
        }
    }
}

/// A credential's life: sleep until the next deadline (or a wake-up), do what is due, repeat.
async fn run_slot(inner: Arc<Inner>, slot: Arc<Slot<Token>>) {
    loop {
        match slot.due(inner.edges.clock.as_ref()).await {
            Action::Fetch => {
                let _ = fetch(inner.clone(), slot.clone(), Purpose::Refresh).await;
            }
            Action::Expire => inner.expire(&slot).await,
            Action::Forget => {
                if inner.forget(&slot) {
                    return;
                }
            }
        }
    }
}

pub(crate) fn time_to_unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// RFC 3339 in UTC, to the second.
pub fn rfc3339(t: SystemTime) -> String {
    OffsetDateTime::from_unix_timestamp(time_to_unix(t))
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// Unix seconds for git's `password_expiry_utc`.
pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::Path;

    use axum::Json;
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;

    use super::*;
    use crate::broker_client::Auth;

    /// What the fake broker answers every credential request with.
    type Answer = Arc<Mutex<(StatusCode, serde_json::Value)>>;

    async fn credentials(State(answer): State<Answer>) -> Response {
        let (status, body) = lock(&answer).clone();
        (status, Json(body)).into_response()
    }

    async fn serve(answer: Answer) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/v1/credentials", post(credentials))
            .with_state(answer);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        (addr, tx)
    }

    fn config(broker: SocketAddr, dir: &Path) -> Arc<Config> {
        let toml = format!(
            r#"
broker = "http://{broker}"
cache_dir = "{d}/cache"
socket = "{d}/agent.sock"
[[github]]
repositories = ["acme/web"]
permissions = ["contents:read"]
"#,
            d = dir.display()
        );
        Arc::new(Config::parse(&toml, Path::new("agent.toml")).unwrap())
    }

    fn start(config: &Arc<Config>) -> Credentials {
        let disk = DiskCache::open(&config.cache_dir).unwrap();
        let broker =
            BrokerClient::new(&config.broker, Auth::Tailnet, Duration::from_secs(2)).unwrap();
        Credentials::start(config.clone(), broker, disk)
    }

    fn token(expires_at: &str) -> serde_json::Value {
        serde_json::json!({
            "kind": "github_token", "credential_id": "tok_1", "token": "ghs_test",
            "expires_at": expires_at, "repositories": ["acme/web"],
            "permissions": {"contents": "read"}, "approval": "auto", "bot": "b",
            "git": {"clone_url": "", "askpass_script": ""},
            "attribution": {"name": "n", "email": "e", "trailer": "t"}
        })
    }

    fn task_alive(creds: &Credentials) -> bool {
        lock(&creds.inner.slots).values().all(|s| s.task_alive())
    }

    /// The credential tasks have no step signal: poll the status, bounded.
    async fn wait_for_failure(creds: &Credentials, what: &str) {
        for _ in 0..600 {
            if creds.status().first().is_some_and(|s| s.failures > 0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for a failed fetch: {what}");
    }

    fn description() -> Description {
        Description {
            protocol: Some("https".into()),
            host: Some("github.com".into()),
            path: Some("acme/web".into()),
            ..Description::default()
        }
    }

    /// A broker answering 429 with `retry_after` = u64::MAX overflowed the retry time and
    /// killed the credential's refresh task for good.
    #[tokio::test]
    async fn huge_retry_after_neither_panics_nor_kills_the_task() {
        for retry_after in [u64::MAX, i64::MAX as u64, 10 * 365 * 86_400] {
            let tmp = tempfile::tempdir().unwrap();
            let answer: Answer = Arc::new(Mutex::new((
                StatusCode::TOO_MANY_REQUESTS,
                serde_json::json!({"error": "slow down", "code": "overloaded", "retry_after": retry_after}),
            )));
            let (addr, _stop) = serve(answer).await;
            let creds = start(&config(addr, tmp.path()));
            wait_for_failure(&creds, &retry_after.to_string()).await;
            assert!(
                task_alive(&creds),
                "retry_after {retry_after}: the task died"
            );
            let next = creds.status()[0].next_refresh.clone().unwrap();
            let next = OffsetDateTime::parse(&next, &Rfc3339).unwrap();
            let bound = OffsetDateTime::now_utc()
                + time::Duration::seconds(refresh::MAX_SERVER_DELAY.as_secs() as i64 + 5);
            assert!(
                next <= bound,
                "retry_after {retry_after}: next fetch at {next}"
            );
            creds.shutdown();
        }
    }

    /// A broker handing out a token that "expires" in the year 9999 (or later than a GitHub
    /// token can live) must not make it look eternal: it is refused, not cached.
    #[tokio::test]
    async fn tokens_living_longer_than_github_allows_are_refused() {
        let later = |secs: i64| {
            (OffsetDateTime::now_utc() + time::Duration::seconds(secs))
                .format(&Rfc3339)
                .unwrap()
        };
        let cases = [
            ("the year 9999", "9999-12-31T23:59:59Z".to_string(), false),
            ("a day", later(86_400), false),
            ("two hours", later(2 * 3600), false),
            ("an hour (GitHub's)", later(3600), true),
            ("half an hour", later(1800), true),
        ];
        for (name, expires_at, ok) in cases {
            let tmp = tempfile::tempdir().unwrap();
            let answer: Answer = Arc::new(Mutex::new((StatusCode::OK, token(&expires_at))));
            let (addr, _stop) = serve(answer).await;
            let creds = start(&config(addr, tmp.path()));
            let got = creds.git_get(&description(), 0).await;
            match (ok, &got) {
                (true, GitAnswer::Credential { .. }) => {}
                (false, GitAnswer::Refused { message, .. }) => {
                    assert!(message.contains("longer than"), "{name}: {message}")
                }
                _ => panic!("{name}: {got:?}"),
            }
            creds.shutdown();
        }
    }

    /// Cache records with times out of range (at the end of time, far in the future, a life
    /// longer than GitHub's hour) panicked the planner and `GET /v1/status`, or made a token
    /// look eternal; they are dropped when loading.
    #[tokio::test]
    async fn cache_records_with_extreme_times_are_dropped() {
        let now = time_to_unix(SystemTime::now());
        let cases: [(&str, i64, i64, Option<i64>); 7] = [
            (
                "last used at the end of time",
                now + 1800,
                now,
                Some(i64::MAX),
            ),
            ("fetched at the end of time", now + 1800, i64::MAX, None),
            ("expires at the end of time", i64::MAX, now, None),
            ("expires in the year 9999", 253_402_300_799, now, None),
            ("lives longer than an hour", now + 3 * 3600, now, None),
            ("fetched in the far future", now + 1800, now + 86_400, None),
            (
                "last used before the epoch",
                now + 1800,
                now,
                Some(i64::MIN),
            ),
        ];
        for (name, expires_at, fetched_at, last_used) in cases {
            let tmp = tempfile::tempdir().unwrap();
            // Nothing listens on port 9: only the cache can give a credential.
            let config = config("127.0.0.1:9".parse().unwrap(), tmp.path());
            let disk = DiskCache::open(&config.cache_dir).unwrap();
            let scope = config.github[0].literal_scope().unwrap();
            let record = CacheRecord {
                format: CACHE_FORMAT,
                protocol: scope.protocol.clone(),
                host: scope.host.clone(),
                repositories: vec!["acme/web".into()],
                permissions: vec!["contents:read".into()],
                credential_id: "tok_1".into(),
                token: Secret::new("ghs_cached".into()),
                expires_at,
                fetched_at,
                last_used,
            };
            disk.store(&scope.cache_file_name(), &record).unwrap();
            let for_task = config.clone();
            let creds = tokio::spawn(async move { start(&for_task) })
                .await
                .unwrap_or_else(|_| panic!("{name}: loading panicked"));
            let status = tokio::spawn({
                let creds = creds.clone();
                async move { creds.status() }
            })
            .await
            .unwrap_or_else(|_| panic!("{name}: the status panicked"));
            assert_eq!(status[0].credential_id, None, "{name}: the record was used");
            assert!(task_alive(&creds), "{name}: the task died");
            creds.shutdown();
        }
    }
}

#[cfg(test)]
mod erase_and_slot_tests {
    //! git's `get` and `erase` against a stand-in broker that reuses the live token of a scope
    //! (as the real one does) unless the request says which one it `replaces`.
    use std::collections::BTreeMap;
    use std::path::Path;

    use axum::Json;
    use axum::extract::State;
    use axum::routing::post;
    use botcreds_proto::{
        Attribution, CredentialKind, CredentialRequest, GitAccess, GithubCredential,
    };

    use super::*;
    use crate::broker_client::Auth;

    #[derive(Default)]
    struct Fake {
        /// repositories joined → (credential id, token)
        live: HashMap<String, (String, String)>,
        minted: u32,
    }

    type Shared = Arc<Mutex<Fake>>;

    async fn issue(
        State(fake): State<Shared>,
        Json(r): Json<CredentialRequest>,
    ) -> Json<GithubCredential> {
        let mut f = lock(&fake);
        let key = r.repositories.join(",");
        let reuse = f
            .live
            .get(&key)
            .filter(|(id, _)| r.replaces.as_deref() != Some(id.as_str()))
            .cloned();
        let (id, token) = match reuse {
            Some(live) => live,
            None => {
                f.minted += 1;
                let live = (
                    format!("tok_{}", f.minted),
                    format!("ghs_test{:04}", f.minted),
                );
                f.live.insert(key, live.clone());
                live
            }
        };
        let expires = OffsetDateTime::now_utc() + time::Duration::hours(1);
        Json(GithubCredential {
            kind: CredentialKind::GithubToken,
            credential_id: id,
            token,
            expires_at: expires.format(&Rfc3339).unwrap(),
            repositories: r.repositories.clone(),
            permissions: BTreeMap::from([("contents".into(), "read".into())]),
            approval: "auto".into(),
            bot: "test-bot".into(),
            git: GitAccess {
                clone_url: String::new(),
                clone_urls: vec![],
                askpass_script: String::new(),
            },
            attribution: Attribution {
                name: "botcreds[bot]".into(),
                email: "bot@example.invalid".into(),
                trailer: "Bot: test-bot".into(),
            },
        })
    }

    /// A running stand-in broker and credentials configured with `extra` (top-level keys).
    async fn start(dir: &Path, extra: &str) -> (Credentials, Shared) {
        let fake: Shared = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/v1/credentials", post(issue))
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let text = format!(
            "broker = \"http://{addr}\"\ncache_dir = {:?}\nsocket = \"/nonexistent/agent.sock\"\n{extra}\n\
             [[github]]\nhost = \"github.com\"\nrepositories = [\"acme/*\"]\npermissions = [\"contents:read\"]\n",
            dir.join("cache").display().to_string()
        );
        let config = Arc::new(Config::parse(&text, Path::new("agent.toml")).unwrap());
        let disk = DiskCache::open(&config.cache_dir).unwrap();
        let broker =
            BrokerClient::new(&config.broker, Auth::Tailnet, Duration::from_secs(5)).unwrap();
        (Credentials::start(config, broker, disk), fake)
    }

    fn request(repo: &str, password: Option<&str>) -> Description {
        Description {
            protocol: Some("https".into()),
            host: Some("github.com".into()),
            path: Some(format!("{repo}.git")),
            password: password.map(str::to_string),
            ..Description::default()
        }
    }

    async fn token(creds: &Credentials, repo: &str) -> String {
        match creds.git_get(&request(repo, None), 0).await {
            GitAnswer::Credential { token, .. } => token.expose().to_string(),
            other => panic!("no credential for {repo}: {other:?}"),
        }
    }

    /// git's `erase` carries the password it saw rejected: only that password may make the
    /// agent drop the token it holds (else any local user's erase mints a new token).
    #[tokio::test]
    async fn erase_without_the_held_password_keeps_the_token() {
        let tmp = tempfile::tempdir().unwrap();
        let (creds, fake) = start(tmp.path(), "").await;
        let held = token(&creds, "acme/web").await;
        let cases: [(&str, Option<&str>); 4] = [
            ("no password", None),
            ("another token", Some("ghs_test9999")),
            ("a prefix of the token", Some(&held[..held.len() - 1])),
            ("empty", Some("")),
        ];
        for (what, password) in cases {
            creds
                .git_erase(&request("acme/web", password))
                .await
                .unwrap();
            assert_eq!(
                token(&creds, "acme/web").await,
                held,
                "{what}: the token was dropped"
            );
            assert_eq!(lock(&fake).minted, 1, "{what}: a new token was minted");
        }
        // The held password itself: dropped, and the next get has a new token.
        creds
            .git_erase(&request("acme/web", Some(&held)))
            .await
            .unwrap();
        let next = token(&creds, "acme/web").await;
        assert_ne!(next, held);
        assert_eq!(lock(&fake).minted, 2);
        creds.shutdown();
    }

    /// One local user asking for thousands of repositories must not make thousands of
    /// credentials (slots, broker calls, cache files): capped per uid and in total, with a
    /// clear refusal to git.
    #[tokio::test]
    async fn unbounded_per_repository_slots_are_capped() {
        let tmp = tempfile::tempdir().unwrap();
        let (creds, fake) = start(
            tmp.path(),
            "[limits]\nrepository_credentials = 5\nrepository_credentials_per_user = 3\n",
        )
        .await;
        // (uid, repository, served?)
        let cases = [
            (1000, "acme/r1", true),
            (1000, "acme/r2", true),
            (1000, "acme/r3", true),
            (1000, "acme/r4", false),
            // Already tracked: serving it creates nothing.
            (1000, "acme/r1", true),
            (1001, "acme/r1", true),
            (1001, "acme/r5", true),
            (1001, "acme/r6", true),
            (1001, "acme/r7", false),
            (1002, "acme/r8", false),
        ];
        for (uid, repo, served) in cases {
            match creds.git_get(&request(repo, None), uid).await {
                GitAnswer::Credential { .. } => assert!(served, "uid {uid} {repo}: served"),
                GitAnswer::Refused {
                    status, message, ..
                } => {
                    assert!(!served, "uid {uid} {repo}: refused: {message}");
                    assert_eq!(status, 429, "{message}");
                    assert!(
                        message.contains("limits.repository_credentials"),
                        "{message}"
                    );
                }
                other => panic!("uid {uid} {repo}: {other:?}"),
            }
        }
        assert_eq!(
            lock(&fake).minted,
            5,
            "one broker call per tracked repository"
        );
        assert_eq!(creds.status().len(), 5);
        creds.shutdown();
    }

    /// Even with the right password, erase-and-get in a loop does not mint a token per round:
    /// replacements of one credential are rate-limited.
    #[tokio::test]
    async fn erase_get_loops_do_not_mint_a_token_each() {
        let tmp = tempfile::tempdir().unwrap();
        let (creds, fake) = start(tmp.path(), "").await;
        for _ in 0..30 {
            let held = token(&creds, "acme/web").await;
            creds
                .git_erase(&request("acme/web", Some(&held)))
                .await
                .unwrap();
        }
        let minted = lock(&fake).minted;
        assert!(
            minted <= 1 + MAX_REPLACEMENTS as u32,
            "30 erase+get rounds minted {minted} tokens"
        );
        creds.shutdown();
    }
}

#[cfg(test)]
mod simulated_time_tests {
    //! Refresh, retry and expiry on simulated time: a fake broker in the process and tokio's
    //! paused clock, so an hour of a token's life passes in milliseconds.
    use std::path::Path;

    use super::*;
    use crate::broker_client::Auth;
    use crate::fake_broker::{Logs, edges, until};

    const MIN: Duration = Duration::from_secs(60);

    /// Credentials for `acme/web` (`entry` adds keys to its `[[github]]` entry) on `edges`.
    fn start(dir: &Path, entry: &str, edges: &Edges) -> Credentials {
        let toml = format!(
            "broker = \"http://127.0.0.1:9\"\ncache_dir = {:?}\nsocket = \"/nonexistent/agent.sock\"\n\
             [[github]]\nrepositories = [\"acme/web\"]\npermissions = [\"contents:read\"]\n{entry}\n",
            dir.join("cache").display().to_string()
        );
        let config = Arc::new(Config::parse(&toml, Path::new("agent.toml")).unwrap());
        let disk = DiskCache::open(&config.cache_dir).unwrap();
        let client = Arc::new(
            BrokerClient::new(&config.broker, Auth::Tailnet, Duration::from_secs(5)).unwrap(),
        );
        Credentials::start_with(config, client, edges.clone(), disk)
    }

    fn request() -> Description {
        Description {
            protocol: Some("https".into()),
            host: Some("github.com".into()),
            path: Some("acme/web".into()),
            ..Description::default()
        }
    }

    fn cache_files(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("cache")).unwrap().count()
    }

    fn status(creds: &Credentials) -> CredentialStatus {
        creds.status().into_iter().next().unwrap()
    }

    /// The agent refreshes a token `refresh_before` ahead of its expiry, so git never waits:
    /// over several lifetimes, every token is replaced while it still lives.
    #[tokio::test(start_paused = true)]
    async fn tokens_are_refreshed_before_they_expire() {
        let tmp = tempfile::tempdir().unwrap();
        let (edges, broker) = edges(90 * Duration::from_secs(1), MIN);
        let creds = start(tmp.path(), "refresh_before = \"1m\"", &edges);
        let mut seen: Vec<(String, SystemTime)> = Vec::new();
        until("five tokens", 10 * MIN, || {
            let now = edges.clock.now();
            let st = status(&creds);
            if !seen.is_empty() {
                assert_ne!(st.state, CredentialState::Missing, "a gap at {now:?}");
            }
            if let Some(id) = st.credential_id.clone()
                && seen.last().is_none_or(|(last, _)| *last != id)
            {
                seen.push((id, now));
            }
            seen.len() >= 5
        })
        .await;
        assert_eq!(broker.st().tokens_minted as usize, seen.len());
        assert!(status(&creds).failures == 0);
        creds.shutdown();
    }

    /// e2e `a_running_agent_never_hands_out_an_expired_token`, on simulated time: with the
    /// broker down, the held token is dropped (memory and disk) once less than a minute is
    /// left, and git gets the broker's failure instead.
    #[tokio::test(start_paused = true)]
    async fn a_token_past_its_expiry_margin_is_dropped_while_the_broker_is_down() {
        let (logs, _guard) = Logs::capture();
        let tmp = tempfile::tempdir().unwrap();
        let (edges, broker) = edges(90 * Duration::from_secs(1), MIN);
        let creds = start(tmp.path(), "refresh_before = \"1m\"", &edges);
        match creds.git_get(&request(), 0).await {
            GitAnswer::Credential { token, .. } => assert_eq!(token.expose(), "ghs_fake0001"),
            other => panic!("{other:?}"),
        }
        broker.set_down(true);
        until("the token's expiry margin", 5 * MIN, || {
            logs.contains("credential expired without a refresh; dropped it")
        })
        .await;
        match creds.git_get(&request(), 0).await {
            GitAnswer::Refused { message, .. } => {
                assert!(message.contains("broker unreachable"), "{message}")
            }
            other => panic!("handed out an expired token: {other:?}"),
        }
        let st = status(&creds);
        assert_eq!(st.state, CredentialState::Missing, "{st:#?}");
        assert_eq!(st.credential_id, None);
        assert_eq!(st.expires_at, None);
        assert_eq!(
            cache_files(tmp.path()),
            0,
            "the expired token left the disk too"
        );
        creds.shutdown();
    }

    /// e2e `an_expired_cached_token_is_not_served_after_a_restart`, on simulated time: a
    /// token served from memory while the broker is down is on disk; an agent started once its
    /// last minute has begun neither loads nor serves it, and deletes the file.
    #[tokio::test(start_paused = true)]
    async fn an_expired_cached_token_is_not_loaded_after_a_restart() {
        let (logs, _guard) = Logs::capture();
        let tmp = tempfile::tempdir().unwrap();
        let (edges, broker) = edges(90 * Duration::from_secs(1), MIN);
        let creds = start(tmp.path(), "refresh_before = \"1m\"", &edges);
        until("the first fetch", MIN, || {
            logs.contains("credential fetched")
        })
        .await;
        broker.set_down(true);
        let expires_at = status(&creds).expires_at.expect("a servable token");
        match creds.git_get(&request(), 0).await {
            GitAnswer::Credential { expires_at: e, .. } => assert_eq!(rfc3339(e), expires_at),
            other => panic!("{other:?}"),
        }
        creds.shutdown();
        assert_eq!(cache_files(tmp.path()), 1, "the token is on disk");

        // The agent is down while the token's last minute begins.
        let expires = SystemTime::from(OffsetDateTime::parse(&expires_at, &Rfc3339).unwrap());
        let unservable_from = expires - MIN + Duration::from_secs(2);
        tokio::time::sleep(unservable_from.duration_since(edges.clock.now()).unwrap()).await;

        let before = logs.text().len();
        let creds = start(tmp.path(), "refresh_before = \"1m\"", &edges);
        assert!(
            !logs.text()[before..].contains("loaded cached credential"),
            "{}",
            logs.text()
        );
        match creds.git_get(&request(), 0).await {
            GitAnswer::Refused { message, .. } => {
                assert!(message.contains("broker unreachable"), "{message}")
            }
            other => panic!("handed out an expired cached token: {other:?}"),
        }
        assert_eq!(status(&creds).state, CredentialState::Missing);
        assert_eq!(
            cache_files(tmp.path()),
            0,
            "the expired cache file was deleted at startup"
        );
        creds.shutdown();
    }

    /// e2e `status_shows_reachability_and_serving_from_cache_during_an_outage` (the
    /// credential's part), on simulated time: refreshes that fail while the broker is down
    /// show as serving from cache with the error and the next try, and git still gets the
    /// token.
    #[tokio::test(start_paused = true)]
    async fn failing_refreshes_serve_from_the_cache_and_show_it() {
        let (logs, _guard) = Logs::capture();
        let tmp = tempfile::tempdir().unwrap();
        let (edges, broker) = edges(340 * Duration::from_secs(1), MIN);
        let creds = start(tmp.path(), "refresh_before = \"5m\"", &edges);
        assert!(matches!(
            creds.git_get(&request(), 0).await,
            GitAnswer::Credential { .. }
        ));
        let web = status(&creds);
        assert!(
            matches!(
                web.state,
                CredentialState::Fresh | CredentialState::Refreshing
            ),
            "{web:#?}"
        );
        assert!(web.credential_id.is_some() && web.expires_at.is_some());
        assert_eq!(web.failures, 0);

        broker.set_down(true);
        until("a failed refresh", 5 * MIN, || {
            logs.contains("refresh failed; serving the cached credential until it expires")
        })
        .await;
        let web = status(&creds);
        assert_eq!(web.state, CredentialState::ServingFromCache, "{web:#?}");
        assert!(web.credential_id.is_some() && web.expires_at.is_some());
        assert!(web.failures >= 1);
        assert!(
            web.last_error
                .as_deref()
                .is_some_and(|e| e.contains("broker unreachable")),
            "{web:#?}"
        );
        assert!(web.next_refresh.is_some(), "it keeps retrying");
        assert!(matches!(
            creds.git_get(&request(), 0).await,
            GitAnswer::Credential { .. }
        ));
        creds.shutdown();
    }
}
