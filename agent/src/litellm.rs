//! LiteLLM virtual keys for `[[litellm]]` entries: fetched from the broker, cached on disk like
//! GitHub tokens, written to the entry's files (see [`crate::outputs`]), refreshed ahead of
//! expiry, checked regularly so that a revocation or rotation on the broker reaches the files,
//! removed from the files when the key dies, and released at the broker when the agent stops.
//!
//! One task per entry sleeps until its next deadline: refresh (a share of the key's lifetime
//! before expiry), check (`check_interval`), retry after a failure, or expiry. While the broker
//! is down the files stay as they are until the key's own expiry, also across agent restarts.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use botcreds_proto::agent::CredentialState;
use botcreds_proto::litellm::LitellmCredential;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::Notify;

use crate::broker_client::{BrokerError, Released};
use crate::cache::{DiskCache, ReadError};
use crate::config::Config;
use crate::credentials::time_to_unix as to_unix;
use crate::credentials::{Credentials, rfc3339};
use crate::litellm_config::LitellmEntry;
use crate::outputs::{self, FileSpec, KeyMaterial, Outcome, OutputKind};
use crate::peer::AllowList;
use crate::refresh::{self, EXPIRY_MARGIN, Retry};
use crate::secret::Secret;

/// `GET` on the agent's socket: every `[[litellm]]` entry's state, as JSON.
pub const LITELLM_STATUS_PATH: &str = "/v1/litellm/status";
/// Version of the cache file layout for keys.
const KEY_CACHE_FORMAT: u32 = 1;
/// Cache files of keys start with this (GitHub token files are bare hashes).
const CACHE_PREFIX: &str = "litellm-";
/// Without `refresh_before`, the refresh window is a share of the lifetime, but at most this:
/// a 30-day key is refreshed a day ahead, not a week.
pub const MAX_DEFAULT_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// The refresh window is never shorter than this, so a refresh comes before the key is
/// dropped at its expiry margin.
pub const MIN_WINDOW: Duration = Duration::from_secs(2 * 60);
const MAX_KEY_BYTES: usize = 512;
const MAX_TEXT_BYTES: usize = 256;
/// How much of an `on_change` command's stderr is kept for the log and status.
const MAX_ON_CHANGE_OUTPUT: usize = 2048;

// ---------------------------------------------------------------------------------------------
// Timing: pure functions of the clock.

/// How long before expiry a key of `lifetime` is refreshed: `refresh_before` if set, else
/// `fraction` of the lifetime (at most a day); never more than half the lifetime, never less
/// than [`MIN_WINDOW`].
pub fn refresh_window(lifetime: Duration, fraction: f64, before: Option<Duration>) -> Duration {
    let wanted = match before {
        Some(b) => b,
        None => lifetime.mul_f64(fraction).min(MAX_DEFAULT_WINDOW),
    };
    wanted.min(lifetime / 2).max(MIN_WINDOW)
}

/// When a key fetched at `fetched_at` and expiring at `expires_at` is due for refresh;
/// `unit` in `[0, 1)` spreads refreshes of many agents (see [`refresh::refresh_jitter`]).
pub fn refresh_at(
    entry: &LitellmEntry,
    fetched_at: SystemTime,
    expires_at: SystemTime,
    unit: f64,
) -> SystemTime {
    let lifetime = expires_at.duration_since(fetched_at).unwrap_or_default();
    let window = refresh_window(lifetime, entry.refresh_fraction, entry.refresh_before);
    refresh::refresh_at(expires_at, window, refresh::refresh_jitter(window, unit))
}

/// What an entry's task knows when it plans its next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub expires_at: Option<SystemTime>,
    pub refresh_at: Option<SystemTime>,
    /// Next regular check with the broker (revocation, rotation).
    pub next_check: Option<SystemTime>,
    /// After a failure: nothing is asked of the broker before this.
    pub retry_at: Option<SystemTime>,
}

/// The next step of an entry's task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// The key is about to expire and nothing replaced it: remove it from the files.
    Expire,
    /// Nothing held: ask for a key.
    Fetch,
    /// The key is due for refresh: ask for a new one.
    Refresh,
    /// Ask the broker which key is current (a revoked or rotated key comes back different).
    Check,
}

/// The next step and when it is due (a time in the past means now).
pub fn next_step(now: SystemTime, p: &Plan) -> (SystemTime, Step) {
    let Some(expires_at) = p.expires_at else {
        return (p.retry_at.unwrap_or(now), Step::Fetch);
    };
    let expire = expires_at
        .checked_sub(EXPIRY_MARGIN)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let later = |t: SystemTime| p.retry_at.map_or(t, |r| r.max(t));
    let first = match (p.refresh_at, p.next_check) {
        (Some(r), Some(c)) => Some(r.min(c)),
        (r, c) => r.or(c),
    };
    // Whatever the reason to ask, it is a refresh once the refresh time has come.
    let ask = first.map(later).map(|at| {
        if p.refresh_at.is_some_and(|r| r <= at) {
            (at, Step::Refresh)
        } else {
            (at, Step::Check)
        }
    });
    match ask {
        Some(a) if a.0 < expire => a,
        _ => (expire, Step::Expire),
    }
}

// ---------------------------------------------------------------------------------------------
// Status, as `GET /v1/litellm/status` answers it.

/// One `[[litellm]]` entry's state. Never carries the key itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LitellmKeyStatus {
    pub scope: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_id: Option<String>,
    pub state: CredentialState,
    /// The key's name at the broker (LiteLLM `key_alias`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_id: Option<String>,
    /// RFC 3339 times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh: Option<String>,
    /// The last time the broker confirmed (or replaced) the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<String>,
    /// The next time the agent asks the broker (refresh, check or retry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_refresh: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error_at: Option<String>,
    pub failures: u32,
    pub release_on_stop: bool,
    pub outputs: Vec<OutputStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_change: Option<OnChangeStatus>,
}

/// One file of an entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputStatus {
    /// `key_file`, `env_file`, `roo_code` or `opencode`.
    pub kind: String,
    pub path: String,
    /// `written` (holds the current key), `removed` (no key to hold), `error`, or `pending`
    /// (not written yet).
    pub state: String,
    /// When the agent last changed the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The last run of the entry's `on_change` command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnChangeStatus {
    pub at: String,
    pub ok: bool,
    /// `exit status 0`, `exit status 1: <last line of stderr>`, `timed out after 30s`, ...
    pub result: String,
}

// ---------------------------------------------------------------------------------------------
// The cache record of a key.

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyRecord {
    format: u32,
    /// The entry's identity (scope and workspace); must match the file name.
    identity: String,
    credential_id: String,
    key: Secret,
    name: String,
    scope: String,
    budget_usd: f64,
    budget_period: String,
    rpm_limit: u32,
    models: Vec<String>,
    base_url: String,
    /// Unix seconds.
    expires_at: i64,
    fetched_at: i64,
}

/// The cache file of an entry: a hash of its identity, so names reveal nothing.
pub fn cache_file_name(entry: &LitellmEntry) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(entry.identity().as_bytes());
    format!("{CACHE_PREFIX}{}.json", hex::encode(&digest[..16]))
}

// ---------------------------------------------------------------------------------------------
// The held key.

#[derive(Clone)]
struct Held {
    key: Secret,
    credential_id: String,
    name: String,
    scope: String,
    budget_usd: f64,
    budget_period: String,
    rpm_limit: u32,
    models: Vec<String>,
    base_url: String,
    expires_at: SystemTime,
    fetched_at: SystemTime,
    refresh_at: SystemTime,
}

impl Held {
    fn record(&self, identity: &str) -> KeyRecord {
        KeyRecord {
            format: KEY_CACHE_FORMAT,
            identity: identity.to_string(),
            credential_id: self.credential_id.clone(),
            key: self.key.clone(),
            name: self.name.clone(),
            scope: self.scope.clone(),
            budget_usd: self.budget_usd,
            budget_period: self.budget_period.clone(),
            rpm_limit: self.rpm_limit,
            models: self.models.clone(),
            base_url: self.base_url.clone(),
            expires_at: to_unix(self.expires_at),
            fetched_at: to_unix(self.fetched_at),
        }
    }
}

/// Whether `key` looks like a LiteLLM key: 1 to 512 bytes of letters, digits and `-_.~+/=:`.
fn plain_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_KEY_BYTES
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~+/=:".contains(&b))
}

/// Whether `url` is a plain `http(s)://host[:port][/path]` URL, checked against an allow-list
/// before anything else: it ends up in env files that users source (as root, too) and in tool
/// configs, so it may hold only letters, digits and `-._:/[]%` (no space, quote, `;`, `&`, `$`,
/// `~`, ...), and no user name, password, query or fragment.
pub fn plain_base_url(url: &str) -> Result<(), &'static str> {
    const MAX_URL_BYTES: usize = 2048;
    if url.is_empty() || url.len() > MAX_URL_BYTES {
        return Err("empty or too long");
    }
    if !url
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._:/[]%".contains(&b))
    {
        return Err("it has characters outside letters, digits and -._:/[]%");
    }
    let parsed = reqwest::Url::parse(url).map_err(|_| "it does not parse")?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("the scheme is not http or https");
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("it names no host");
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("it has a user name or password");
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err("it has a query or fragment");
    }
    // `http:/v1` parses (the URL standard fills in the slashes); a plain URL spells them out.
    if !url[parsed.scheme().len()..].starts_with("://") {
        return Err("it does not start with http:// or https://");
    }
    Ok(())
}

/// Whether `s` may be logged and shown as it is: 1 to [`MAX_TEXT_BYTES`] bytes without control
/// characters (ESC, newlines) or bidirectional overrides, which could forge or hide log lines.
fn plain_text(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_TEXT_BYTES && crate::text::is_clean(s)
}

/// Checks the text a held key keeps from the broker's answer (logged, cached and shown by
/// `/v1/status` as it is); the reason when one is not plain.
fn check_texts(
    credential_id: &str,
    name: &str,
    budget_period: &str,
    models: &[String],
) -> Result<(), String> {
    if !plain_text(credential_id) || !plain_text(name) {
        return Err("credential_id or name is empty, too long or has control characters".into());
    }
    // `day` or `run` today; empty is tolerated, it is only shown.
    if !budget_period.is_empty() && !plain_text(budget_period) {
        return Err("budget_period is too long or has control characters".into());
    }
    if let Some(m) = models
        .iter()
        .find(|m| !plain_text(m) || m.contains(char::is_whitespace))
    {
        return Err(format!("model {m:?} is not a model name"));
    }
    Ok(())
}

/// Checks the broker's answer and makes it a held key. The key and base URL end up in env
/// files and JSON, so they must be plain: no quotes, spaces or shell characters (the env file
/// quotes them as well, see [`outputs::env_file_content`]).
fn validate_answer(
    cred: LitellmCredential,
    entry: &LitellmEntry,
    now: SystemTime,
) -> Result<Held, BrokerError> {
    let bad = |detail: String| BrokerError::BadAnswer {
        status: 200,
        detail,
    };
    if !plain_key(&cred.key) {
        return Err(bad(
            "the key is empty, too long, or has characters a LiteLLM key cannot have".into(),
        ));
    }
    if cred.scope != entry.scope {
        return Err(bad(format!(
            "asked for a {} key, got a {} key",
            entry.scope, cred.scope
        )));
    }
    if let Err(why) = plain_base_url(&cred.base_url) {
        return Err(bad(format!(
            "base_url {:?} is not a plain http(s) URL: {why}",
            cred.base_url
        )));
    }
    check_texts(
        &cred.credential_id,
        &cred.name,
        &cred.budget_period,
        &cred.models,
    )
    .map_err(bad)?;
    // Kept in the cache as JSON, which has no NaN or infinity: such a record would not load.
    if !(cred.budget_usd.is_finite() && cred.budget_usd >= 0.0) {
        return Err(bad(format!(
            "budget_usd {} is not a dollar amount",
            cred.budget_usd
        )));
    }
    let expires_at = OffsetDateTime::parse(&cred.expires_at, &Rfc3339)
        .map(SystemTime::from)
        .map_err(|e| {
            bad(format!(
                "expires_at {:?} is not RFC 3339: {e}",
                cred.expires_at
            ))
        })?;
    if !refresh::servable(expires_at, now) {
        return Err(bad(format!(
            "the key expires at {}, less than a minute from now (check the clocks)",
            cred.expires_at
        )));
    }
    refresh::check_lifetime(expires_at, now, refresh::MAX_LITELLM_KEY_LIFE)
        .map_err(|why| bad(format!("the key expires at {}: {why}", cred.expires_at)))?;
    Ok(Held {
        refresh_at: refresh_at(entry, now, expires_at, rand::random()),
        key: Secret::new(cred.key),
        credential_id: cred.credential_id,
        name: cred.name,
        scope: cred.scope,
        budget_usd: cred.budget_usd,
        budget_period: cred.budget_period,
        rpm_limit: cred.rpm_limit,
        models: cred.models,
        base_url: cred.base_url,
        expires_at,
        fetched_at: now,
    })
}

// ---------------------------------------------------------------------------------------------
// The entries and their tasks.

/// The agent's LiteLLM keys: a cheap handle to shared state.
#[derive(Clone)]
pub struct Litellm {
    inner: Arc<Inner>,
}

struct Inner {
    /// For its broker client (one client, one identity for the whole agent).
    credentials: Credentials,
    disk: DiskCache,
    slots: Vec<Arc<Slot>>,
    /// Bumped after every step an entry takes (an answer, a file change, an `on_change` run),
    /// so that a watcher can wait for the next one instead of polling.
    steps: tokio::sync::watch::Sender<u64>,
}

struct Slot {
    entry: LitellmEntry,
    file_name: String,
    state: Mutex<SlotState>,
    wake: Notify,
    /// Held by the blocking thread that writes the files: one writer per entry at a time,
    /// even while a stopping agent's task is being aborted.
    files: Arc<Mutex<()>>,
    on_change_lock: tokio::sync::Mutex<()>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

#[derive(Default)]
struct SlotState {
    held: Option<Held>,
    last_refresh: Option<SystemTime>,
    last_check: Option<SystemTime>,
    failures: u32,
    retry_at: Option<SystemTime>,
    last_error: Option<(SystemTime, String)>,
    /// Per output, in `entry.outputs()` order: state, when changed, error.
    outputs: Vec<OutputState>,
    on_change: Option<OnChangeStatus>,
}

#[derive(Clone, Default)]
struct OutputState {
    state: &'static str,
    changed_at: Option<SystemTime>,
    error: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Litellm {
    /// Loads cached keys, writes them to their files, and starts one task per entry. Must be
    /// called inside the tokio runtime, after [`Credentials::start`] (which cleans the cache
    /// directory of temp files).
    pub fn start(config: Arc<Config>, credentials: Credentials, disk: DiskCache) -> Litellm {
        let slots: Vec<Arc<Slot>> = config
            .litellm
            .iter()
            .map(|entry| {
                Arc::new(Slot {
                    file_name: cache_file_name(entry),
                    entry: entry.clone(),
                    state: Mutex::new(SlotState {
                        outputs: vec![
                            OutputState {
                                state: "pending",
                                ..OutputState::default()
                            };
                            entry.outputs().len()
                        ],
                        ..SlotState::default()
                    }),
                    wake: Notify::new(),
                    files: Arc::new(Mutex::new(())),
                    on_change_lock: tokio::sync::Mutex::new(()),
                    task: Mutex::new(None),
                })
            })
            .collect();
        let inner = Arc::new(Inner {
            credentials,
            disk,
            slots,
            steps: tokio::sync::watch::Sender::new(0),
        });
        inner.load_cache();
        for slot in &inner.slots {
            let (for_task, supervised) = (inner.clone(), slot.clone());
            let task = tokio::spawn(refresh::supervise(
                format!("LiteLLM key {}", slot.entry.scope),
                move || run_slot(for_task.clone(), supervised.clone()),
            ));
            *lock(&slot.task) = Some(task.abort_handle());
        }
        Litellm { inner }
    }

    /// A receiver that changes after every step any entry takes.
    pub fn steps(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.steps.subscribe()
    }

    /// Every entry's state, for `GET /v1/litellm/status`.
    pub fn status(&self) -> Vec<LitellmKeyStatus> {
        let now = SystemTime::now();
        self.inner.slots.iter().map(|s| s.status(now)).collect()
    }

    /// Stops every entry's task, then releases (revokes at the broker) the keys of entries with
    /// `release_on_stop`, all within `bound`. A released key is removed from its files and the
    /// cache; a key the broker could not be asked to release stays in both (it is still valid,
    /// and a restarted agent uses it again).
    pub async fn shutdown(&self, bound: Duration) {
        for slot in &self.inner.slots {
            if let Some(task) = lock(&slot.task).take() {
                task.abort();
            }
        }
        let mut releases = tokio::task::JoinSet::new();
        for slot in &self.inner.slots {
            let held = lock(&slot.state).held.clone();
            let Some(held) = held.filter(|_| slot.entry.release_on_stop) else {
                continue;
            };
            let inner = self.inner.clone();
            let slot = slot.clone();
            releases.spawn(async move { inner.release(&slot, &held, bound).await });
        }
        if releases.is_empty() {
            return;
        }
        let done = tokio::time::timeout(bound, releases.join_all()).await;
        self.inner.step_done();
        if done.is_err() {
            tracing::warn!(
                "releasing LiteLLM keys took longer than {}s; stopping anyway (the keys stay valid until they expire)",
                bound.as_secs()
            );
        }
    }
}

impl Inner {
    fn broker(&self) -> &crate::broker_client::BrokerClient {
        self.credentials.broker()
    }

    fn step_done(&self) {
        self.steps.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn load_cache(self: &Arc<Self>) {
        let now = SystemTime::now();
        for slot in &self.slots {
            if std::fs::symlink_metadata(self.disk.dir().join(&slot.file_name)).is_err() {
                continue;
            }
            let text = match self.disk.read_private(&slot.file_name) {
                Ok(text) => text,
                Err(ReadError::Refused(reason)) => {
                    tracing::warn!(scope = %slot.entry.scope, file = %slot.file_name, "cached LiteLLM key {reason}; fetching anew");
                    continue;
                }
                Err(ReadError::Corrupt(reason)) => {
                    tracing::warn!(scope = %slot.entry.scope, file = %slot.file_name, "cached LiteLLM key {reason}; removed, fetching anew");
                    let _ = self.disk.remove(&slot.file_name);
                    continue;
                }
            };
            let record = match serde_json::from_str::<KeyRecord>(&text) {
                Ok(r) if r.format == KEY_CACHE_FORMAT && r.identity == slot.entry.identity() => r,
                Ok(_) => {
                    let _ = self.disk.remove(&slot.file_name);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(scope = %slot.entry.scope, file = %slot.file_name, error = %e, "cached LiteLLM key is corrupt; removed, fetching anew");
                    let _ = self.disk.remove(&slot.file_name);
                    continue;
                }
            };
            let checked = refresh::record_times(
                record.expires_at,
                record.fetched_at,
                None,
                refresh::MAX_LITELLM_KEY_LIFE,
                now,
            )
            .and_then(|times| {
                // The cache is the agent's own, but what it holds goes into files users
                // source: the same checks as for a broker answer.
                if !plain_key(record.key.expose()) {
                    return Err("the key has characters a LiteLLM key cannot have".into());
                }
                plain_base_url(&record.base_url)
                    .map_err(|why| format!("base_url is not a plain http(s) URL: {why}"))?;
                check_texts(
                    &record.credential_id,
                    &record.name,
                    &record.budget_period,
                    &record.models,
                )?;
                Ok(times)
            });
            let (expires_at, fetched_at) = match checked {
                Ok((expires_at, fetched_at, _)) => (expires_at, fetched_at),
                Err(reason) => {
                    tracing::warn!(scope = %slot.entry.scope, file = %slot.file_name, "cached LiteLLM key is out of range ({reason}); removed, fetching anew");
                    let _ = self.disk.remove(&slot.file_name);
                    continue;
                }
            };
            if !refresh::servable(expires_at, now) {
                // Expired while the agent was down: never written again.
                let _ = self.disk.remove(&slot.file_name);
                continue;
            }
            let held = Held {
                refresh_at: refresh_at(&slot.entry, fetched_at, expires_at, rand::random()),
                key: record.key,
                credential_id: record.credential_id,
                name: record.name,
                scope: record.scope,
                budget_usd: record.budget_usd,
                budget_period: record.budget_period,
                rpm_limit: record.rpm_limit,
                models: record.models,
                base_url: record.base_url,
                expires_at,
                fetched_at,
            };
            tracing::info!(
                scope = %slot.entry.scope,
                name = %held.name,
                credential_id = %held.credential_id,
                expires_at = %rfc3339(expires_at),
                "loaded cached LiteLLM key"
            );
            let mut st = lock(&slot.state);
            st.last_refresh = Some(fetched_at);
            st.held = Some(held);
        }
        // Keys of entries no longer configured.
        let wanted: Vec<&str> = self.slots.iter().map(|s| s.file_name.as_str()).collect();
        if let Ok(names) = self.disk.list(CACHE_PREFIX) {
            for name in names.iter().filter(|n| !wanted.contains(&n.as_str())) {
                tracing::info!(file = %name, "cached LiteLLM key is no longer configured; removing it");
                let _ = self.disk.remove(name);
            }
        }
    }

    async fn store_cache(&self, slot: &Slot, held: &Held) {
        let json = match serde_json::to_vec(&held.record(&slot.entry.identity())) {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!(scope = %slot.entry.scope, error = %e, "cannot encode the LiteLLM key for the cache");
                return;
            }
        };
        let disk = self.disk.clone();
        let name = slot.file_name.clone();
        match tokio::task::spawn_blocking(move || disk.store_bytes(&name, &json)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(scope = %slot.entry.scope, error = %e, "cannot write the cache file; the key is held in memory only")
            }
            Err(e) => {
                tracing::warn!(scope = %slot.entry.scope, error = %e, "cache write task failed")
            }
        }
    }

    async fn remove_cache(&self, slot: &Slot) {
        let disk = self.disk.clone();
        let name = slot.file_name.clone();
        match tokio::task::spawn_blocking(move || disk.remove(&name)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(scope = %slot.entry.scope, error = %e, "cannot remove the cache file")
            }
            Err(e) => {
                tracing::warn!(scope = %slot.entry.scope, error = %e, "cache removal task failed")
            }
        }
    }

    /// One broker call for `slot`: a first key, a refresh, or a check.
    async fn ask(self: &Arc<Self>, slot: &Arc<Slot>, step: Step) {
        let held_id = lock(&slot.state)
            .held
            .as_ref()
            .map(|h| h.credential_id.clone());
        let replaces = match step {
            Step::Refresh => held_id.clone(),
            _ => None,
        };
        let entry = &slot.entry;
        let result = self
            .broker()
            .litellm_key(
                &entry.scope,
                entry.workspace.as_ref(),
                entry.reason.as_deref(),
                replaces.as_deref(),
            )
            .await;
        let now = SystemTime::now();
        if result
            .as_ref()
            .map_or_else(BrokerError::broker_answered, |_| true)
        {
            self.credentials.record_broker_contact(now);
        }
        match result.and_then(|cred| validate_answer(cred, entry, now)) {
            Ok(new) => {
                let same = held_id.as_deref() == Some(new.credential_id.as_str());
                let store = {
                    let mut st = lock(&slot.state);
                    let earlier_failures = st.failures;
                    st.last_check = Some(now);
                    st.failures = 0;
                    st.retry_at = None;
                    st.last_error = None;
                    let mut store = !same;
                    if !same {
                        st.last_refresh = Some(now);
                        st.held = Some(new.clone());
                    } else if let Some(h) = st.held.as_mut()
                        && h.expires_at != new.expires_at
                    {
                        // The broker extended the life of the key held.
                        h.expires_at = new.expires_at;
                        h.refresh_at = new.refresh_at;
                        store = true;
                    }
                    let current = st.held.clone();
                    if let Some(h) = &current
                        && h.refresh_at <= now
                    {
                        // Due again at once (a key shorter-lived than the refresh window, or a
                        // refresh answered with the key held): ask again with growing backoff,
                        // not in a tight loop.
                        st.failures = earlier_failures.saturating_add(1);
                        st.retry_at = Some(refresh::later(
                            now,
                            refresh::backoff(st.failures, Retry::Soon, rand::random()),
                        ));
                        let left = h.expires_at.duration_since(now).unwrap_or_default();
                        st.last_error = Some((
                            now,
                            format!(
                                "the broker handed out a key with only {}s left, within its refresh window",
                                left.as_secs()
                            ),
                        ));
                    }
                    current.filter(|_| store)
                };
                if same {
                    tracing::debug!(scope = %entry.scope, credential_id = %new.credential_id, "the broker confirms the LiteLLM key held");
                } else {
                    tracing::info!(
                        scope = %entry.scope,
                        name = %new.name,
                        credential_id = %new.credential_id,
                        replaced = held_id.as_deref().unwrap_or("-"),
                        expires_at = %rfc3339(new.expires_at),
                        "LiteLLM key fetched"
                    );
                }
                if let Some(held) = store {
                    self.store_cache(slot, &held).await;
                }
                self.sync_files(slot).await;
            }
            Err(e) => {
                let dropped = {
                    let mut st = lock(&slot.state);
                    st.failures = st.failures.saturating_add(1);
                    let delay = refresh::retry_delay(
                        st.failures,
                        e.retry(),
                        e.retry_after(),
                        rand::random(),
                    );
                    st.retry_at = Some(refresh::later(now, delay));
                    st.last_error = Some((now, e.to_string()));
                    if e.revokes_access() {
                        st.held.take()
                    } else {
                        None
                    }
                };
                match dropped {
                    Some(held) => {
                        tracing::warn!(
                            scope = %entry.scope,
                            credential_id = %held.credential_id,
                            error = %e,
                            "the broker refuses this LiteLLM key now; removing it from the files"
                        );
                        self.remove_cache(slot).await;
                        self.sync_files(slot).await;
                    }
                    None => {
                        let held = lock(&slot.state).held.is_some();
                        tracing::warn!(
                            scope = %entry.scope,
                            error = %e,
                            "asking the broker for the LiteLLM key failed{}",
                            if held { "; the files keep the key held until it expires" } else { "" }
                        );
                    }
                }
            }
        }
    }

    /// Drops a key that reached its expiry margin without a replacement.
    async fn expire(&self, slot: &Arc<Slot>) {
        let dropped = {
            let mut st = lock(&slot.state);
            match &st.held {
                Some(h) if !refresh::servable(h.expires_at, SystemTime::now()) => st.held.take(),
                _ => None,
            }
        };
        if let Some(held) = dropped {
            tracing::warn!(
                scope = %slot.entry.scope,
                credential_id = %held.credential_id,
                "LiteLLM key expired without a refresh; removed it from the files"
            );
            self.remove_cache(slot).await;
            self.sync_files(slot).await;
        }
    }

    /// Brings every file of `slot` in line with the key held (or its absence), and runs
    /// `on_change` (in the background) when any file changed.
    async fn sync_files(&self, slot: &Arc<Slot>) {
        let held = lock(&slot.state)
            .held
            .clone()
            .filter(|h| refresh::servable(h.expires_at, SystemTime::now()));
        let has_key = held.is_some();
        let entry = slot.entry.clone();
        let files = slot.files.clone();
        let results = tokio::task::spawn_blocking(move || {
            let _one_writer = lock(&files);
            write_files(&entry, held.as_ref())
        })
        .await;
        let results = match results {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(scope = %slot.entry.scope, error = %e, "writing the key files failed");
                return;
            }
        };
        let now = SystemTime::now();
        let mut changed = false;
        {
            let mut st = lock(&slot.state);
            for (i, result) in results.into_iter().enumerate() {
                let Some(out) = st.outputs.get_mut(i) else {
                    continue;
                };
                match result {
                    Ok(outcome) => {
                        out.state = if has_key { "written" } else { "removed" };
                        out.error = None;
                        if outcome != Outcome::Unchanged {
                            out.changed_at = Some(now);
                            changed = true;
                        }
                    }
                    Err(message) => {
                        if out.error.as_deref() != Some(message.as_str()) {
                            tracing::warn!(scope = %slot.entry.scope, error = %message, "cannot update a LiteLLM key file");
                        }
                        out.state = "error";
                        out.error = Some(message);
                    }
                }
            }
        }
        if changed {
            let event = if has_key { "updated" } else { "removed" };
            tracing::info!(scope = %slot.entry.scope, event, "LiteLLM key files changed");
            if slot.entry.on_change.is_some() {
                tokio::spawn(run_on_change(slot.clone(), event, self.steps.clone()));
            }
        }
    }

    /// Revokes `held` at the broker; on success (or 404), removes it from files and cache.
    async fn release(&self, slot: &Arc<Slot>, held: &Held, bound: Duration) {
        match self
            .broker()
            .release_credential(&held.credential_id, bound)
            .await
        {
            Ok(outcome) => {
                tracing::info!(
                    scope = %slot.entry.scope,
                    name = %held.name,
                    credential_id = %held.credential_id,
                    already = outcome == Released::AlreadyGone,
                    "released the LiteLLM key at the broker"
                );
                lock(&slot.state).held = None;
                self.remove_cache(slot).await;
                let entry = slot.entry.clone();
                let files = slot.files.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    let _one_writer = lock(&files);
                    write_files(&entry, None)
                })
                .await;
            }
            Err(e) => tracing::warn!(
                scope = %slot.entry.scope,
                credential_id = %held.credential_id,
                error = %e,
                "cannot release the LiteLLM key at the broker; it stays valid until it expires"
            ),
        }
    }
}

/// Writes (or clears) every file of `entry`; one result per output, errors as text.
fn write_files(entry: &LitellmEntry, held: Option<&Held>) -> Vec<Result<Outcome, String>> {
    let spec = FileSpec {
        mode: entry.mode,
        group: entry.group,
    };
    let material = held.map(|h| KeyMaterial {
        key: h.key.expose(),
        base_url: &h.base_url,
        models: &h.models,
        model: entry.model.as_deref(),
    });
    entry
        .outputs()
        .into_iter()
        .map(|(key, path)| {
            let kind = OutputKind::from_key(key).ok_or_else(|| format!("unknown output {key}"))?;
            outputs::sync(kind, path, spec, material.as_ref()).map_err(|e| e.to_string())
        })
        .collect()
}

/// Runs the entry's `on_change` command (one run at a time per entry), bounded by its timeout.
/// Its environment says what happened; the key itself is never passed.
async fn run_on_change(
    slot: Arc<Slot>,
    event: &'static str,
    steps: tokio::sync::watch::Sender<u64>,
) {
    let Some(argv) = slot.entry.on_change.clone() else {
        return;
    };
    let _one_at_a_time = slot.on_change_lock.lock().await;
    let (name, expires, key) = {
        let st = lock(&slot.state);
        let h = st.held.as_ref();
        (
            h.map(|h| h.name.clone()).unwrap_or_default(),
            h.map(|h| rfc3339(h.expires_at)).unwrap_or_default(),
            h.map(|h| h.key.clone()),
        )
    };
    let vars = [
        ("BOTCREDS_LITELLM_EVENT", event.to_string()),
        ("BOTCREDS_LITELLM_SCOPE", slot.entry.scope.clone()),
        ("BOTCREDS_LITELLM_KEY_NAME", name),
        ("BOTCREDS_LITELLM_EXPIRES_AT", expires),
        (
            "BOTCREDS_LITELLM_KEY_FILE",
            slot.entry.key_file.display().to_string(),
        ),
    ];
    let started = SystemTime::now();
    let (ok, result) = run_command(&argv, &vars, slot.entry.on_change_timeout, key.as_ref()).await;
    if ok {
        tracing::info!(scope = %slot.entry.scope, event, "on_change ran: {result}");
    } else {
        tracing::warn!(scope = %slot.entry.scope, event, "on_change failed: {result}");
    }
    lock(&slot.state).on_change = Some(OnChangeStatus {
        at: rfc3339(started),
        ok,
        result,
    });
    steps.send_modify(|n| *n = n.wrapping_add(1));
}

/// The only variables `on_change` gets from the agent's environment (the agent's may hold
/// `BOTCREDS_API_KEY`, `NOTIFY_SOCKET`, ...); its own `BOTCREDS_LITELLM_*` come on top.
pub const ON_CHANGE_ENV: &[&str] = &["PATH", "HOME", "LANG"];
/// `PATH` for `on_change` when the agent has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How much of `on_change`'s stderr is kept (its end); the rest is read and discarded.
pub const MAX_ON_CHANGE_CAPTURE: usize = 64 * 1024;
/// Once the command exited, its output is awaited this much longer at most: a process that
/// left its process group may hold the pipe open for ever.
const PIPE_GRACE: Duration = Duration::from_millis(500);

/// Runs `argv` with `vars` in its environment, bounded by `timeout`: whether it succeeded, and
/// a one-line account (`exit status 0`, `exit status 1: <last line of stderr>`, `timed out
/// after 30s; killed`), with `key` redacted from it.
///
/// The command runs in its own process group with a cleared environment (plus
/// [`ON_CHANGE_ENV`]). Its exit ends the wait, whatever its children do; then, or on timeout,
/// the whole group is killed, so nothing it started in the background outlives it. Only the
/// last [`MAX_ON_CHANGE_CAPTURE`] bytes of its stderr are kept.
pub async fn run_command(
    argv: &[String],
    vars: &[(&str, String)],
    timeout: Duration,
    key: Option<&Secret>,
) -> (bool, String) {
    let Some(program) = argv.first() else {
        return (false, "no command".into());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&argv[1..]).env_clear();
    for name in ON_CHANGE_ENV {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", DEFAULT_PATH);
    }
    cmd.envs(vars.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return (false, format!("cannot start {program}: {e}")),
    };
    // The group's id is the child's pid (`process_group(0)`); never 0 or 1 (kill(-1) would
    // signal every process).
    let mut group = ProcessGroup(
        child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .filter(|p| *p > 1),
    );
    let tail = Arc::new(Mutex::new(std::collections::VecDeque::new()));
    let mut reader = tokio::spawn(read_tail(child.stderr.take(), tail.clone()));
    let waited = tokio::time::timeout(timeout, child.wait()).await;
    // Whatever the command left running goes now. (The group outlives the reaped child while
    // any member is left, so its id cannot have been reused by then.)
    group.kill();
    let status = match waited {
        Err(_) => {
            let _ = child.wait().await;
            None
        }
        Ok(Err(e)) => return (false, format!("waiting for it failed: {e}")),
        Ok(Ok(status)) => Some(status),
    };
    if tokio::time::timeout(PIPE_GRACE, &mut reader).await.is_err() {
        reader.abort();
    }
    let Some(status) = status else {
        return (
            false,
            format!("timed out after {}s; killed", timeout.as_secs()),
        );
    };
    let stderr = {
        let mut tail = lock(&tail);
        String::from_utf8_lossy(tail.make_contiguous()).into_owned()
    };
    let stderr = redact(&stderr, key);
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .chars()
        .take(MAX_ON_CHANGE_OUTPUT)
        .collect::<String>();
    let code = match status.code() {
        Some(code) => format!("exit status {code}"),
        None => "killed by a signal".to_string(),
    };
    let text = if last.is_empty() || status.success() {
        code
    } else {
        format!("{code}: {last}")
    };
    (status.success(), text)
}

/// Reads `stderr` to its end, keeping only its last [`MAX_ON_CHANGE_CAPTURE`] bytes in `tail`.
async fn read_tail(
    stderr: Option<tokio::process::ChildStderr>,
    tail: Arc<Mutex<std::collections::VecDeque<u8>>>,
) {
    use tokio::io::AsyncReadExt;
    let Some(mut stderr) = stderr else { return };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut tail = lock(&tail);
                tail.extend(&buf[..n]);
                let excess = tail.len().saturating_sub(MAX_ON_CHANGE_CAPTURE);
                tail.drain(..excess);
            }
        }
    }
}

/// The process group of an `on_change` run; killed when dropped too (the agent stopping
/// mid-run), so no part of it is left behind.
struct ProcessGroup(Option<i32>);

impl ProcessGroup {
    /// Kills the group, once.
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            // `pgid` > 1 is the group this run created.
            if let Some(pgid) = rustix::process::Pid::from_raw(pgid) {
                let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
            }
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

fn redact(text: &str, key: Option<&Secret>) -> String {
    match key {
        Some(k) if !k.expose().is_empty() => text.replace(k.expose(), "<redacted>"),
        _ => text.to_string(),
    }
}

/// An entry's life: write what the cache holds, then sleep until the next deadline and do
/// what is due, forever.
async fn run_slot(inner: Arc<Inner>, slot: Arc<Slot>) {
    let cached = lock(&slot.state).held.is_some();
    if cached {
        inner.sync_files(&slot).await;
        inner.step_done();
    }
    loop {
        let now = SystemTime::now();
        let (at, step) = next_step(now, &slot.plan());
        if at > now {
            let delay = at.duration_since(now).unwrap_or_default();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = slot.wake.notified() => {}
            }
            continue;
        }
        match step {
            Step::Expire => inner.expire(&slot).await,
            Step::Fetch | Step::Refresh | Step::Check => inner.ask(&slot, step).await,
        }
        inner.step_done();
    }
}

impl Slot {
    fn plan(&self) -> Plan {
        let st = lock(&self.state);
        Plan {
            expires_at: st.held.as_ref().map(|h| h.expires_at),
            refresh_at: st.held.as_ref().map(|h| h.refresh_at),
            next_check: st.held.as_ref().map(|h| {
                refresh::later(
                    st.last_check.unwrap_or(h.fetched_at).max(h.fetched_at),
                    self.entry.check_interval,
                )
            }),
            retry_at: st.retry_at,
        }
    }

    fn status(&self, now: SystemTime) -> LitellmKeyStatus {
        let (next_at, _) = next_step(now, &self.plan());
        let st = lock(&self.state);
        let servable = st
            .held
            .as_ref()
            .filter(|h| refresh::servable(h.expires_at, now));
        let state = match servable {
            None => CredentialState::Missing,
            Some(_) if st.failures > 0 => CredentialState::ServingFromCache,
            Some(h) if now >= h.refresh_at => CredentialState::Refreshing,
            Some(_) => CredentialState::Fresh,
        };
        LitellmKeyStatus {
            scope: self.entry.scope.clone(),
            workspace_id: self
                .entry
                .workspace
                .as_ref()
                .map(|w| w.workspace_id.clone()),
            state,
            name: servable.map(|h| h.name.clone()),
            credential_id: servable.map(|h| h.credential_id.clone()),
            expires_at: servable.map(|h| rfc3339(h.expires_at)),
            last_refresh: st.last_refresh.map(rfc3339),
            last_check: st.last_check.map(rfc3339),
            next_refresh: Some(rfc3339(next_at.max(now))),
            last_error: st.last_error.as_ref().map(|(_, e)| e.clone()),
            last_error_at: st.last_error.as_ref().map(|(at, _)| rfc3339(*at)),
            failures: st.failures,
            release_on_stop: self.entry.release_on_stop,
            outputs: self
                .entry
                .outputs()
                .into_iter()
                .zip(st.outputs.iter())
                .map(|((kind, path), out)| OutputStatus {
                    kind: kind.to_string(),
                    path: path.display().to_string(),
                    state: out.state.to_string(),
                    changed_at: out.changed_at.map(rfc3339),
                    error: out.error.clone(),
                })
                .collect(),
            on_change: st.on_change.clone(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The local route.

/// `GET /v1/litellm/status` on the agent's socket, behind the same peer check as the rest.
pub fn routes(litellm: Litellm, allow: AllowList) -> Router {
    Router::new()
        .route(LITELLM_STATUS_PATH, get(status_handler))
        .with_state(litellm)
        .layer(middleware::from_fn_with_state(
            allow,
            crate::socket::check_peer,
        ))
}

async fn status_handler(State(litellm): State<Litellm>) -> Response {
    axum::Json(litellm.status()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(86_400);

    fn t(mins: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000) + MIN * mins as u32
    }

    #[test]
    fn refresh_windows_suit_lifetimes_from_an_hour_to_a_month() {
        let f = 0.25;
        let cases = [
            ("1h ci key", HOUR, None, 15 * MIN),
            ("2h agent key", 2 * HOUR, None, 30 * MIN),
            ("12h workspace key", 12 * HOUR, None, 3 * HOUR),
            ("30d user key: a day ahead at most", 30 * DAY, None, DAY),
            ("refresh_before wins", 12 * HOUR, Some(HOUR), HOUR),
            (
                "refresh_before capped at half",
                HOUR,
                Some(2 * HOUR),
                30 * MIN,
            ),
            ("never under the minimum", 4 * MIN, None, MIN_WINDOW),
            ("tiny keys: the minimum", MIN, None, MIN_WINDOW),
        ];
        for (name, lifetime, before, want) in cases {
            assert_eq!(refresh_window(lifetime, f, before), want, "{name}");
        }
        assert_eq!(refresh_window(HOUR, 0.5, None), 30 * MIN);
    }

    #[test]
    fn plans_the_next_step() {
        let held = Plan {
            expires_at: Some(t(60)),
            refresh_at: Some(t(45)),
            next_check: Some(t(5)),
            retry_at: None,
        };
        let cases: Vec<(&str, SystemTime, Plan, (SystemTime, Step))> = vec![
            (
                "nothing held: fetch now",
                t(0),
                Plan {
                    expires_at: None,
                    refresh_at: None,
                    next_check: None,
                    retry_at: None,
                },
                (t(0), Step::Fetch),
            ),
            (
                "nothing held, failing: fetch after backoff",
                t(0),
                Plan {
                    expires_at: None,
                    refresh_at: None,
                    next_check: None,
                    retry_at: Some(t(2)),
                },
                (t(2), Step::Fetch),
            ),
            ("held: check first", t(0), held, (t(5), Step::Check)),
            (
                "check due after the refresh time: refresh",
                t(44),
                Plan {
                    next_check: Some(t(50)),
                    ..held
                },
                (t(45), Step::Refresh),
            ),
            (
                "failing: the check waits for the backoff",
                t(6),
                Plan {
                    retry_at: Some(t(8)),
                    ..held
                },
                (t(8), Step::Check),
            ),
            (
                "backoff past the refresh time: refresh then",
                t(44),
                Plan {
                    next_check: Some(t(40)),
                    retry_at: Some(t(46)),
                    ..held
                },
                (t(46), Step::Refresh),
            ),
            (
                "backoff beyond expiry: expire first",
                t(58),
                Plan {
                    retry_at: Some(t(62)),
                    ..held
                },
                (t(59), Step::Expire),
            ),
        ];
        for (name, now, plan, want) in cases {
            assert_eq!(next_step(now, &plan), want, "{name}");
        }
    }

    fn entry() -> LitellmEntry {
        LitellmEntry {
            scope: "ci".into(),
            workspace: None,
            reason: None,
            key_file: "/k".into(),
            env_file: None,
            roo_code: None,
            opencode: None,
            model: None,
            mode: 0o600,
            group: None,
            on_change: None,
            on_change_timeout: Duration::from_secs(30),
            refresh_fraction: 0.25,
            refresh_before: None,
            check_interval: Duration::from_secs(300),
            release_on_stop: false,
        }
    }

    fn answer(key: &str, expires: &str) -> LitellmCredential {
        LitellmCredential {
            kind: botcreds_proto::CredentialKind::LitellmKey,
            credential_id: "lk_0123".into(),
            key: key.into(),
            name: "ci-build".into(),
            scope: "ci".into(),
            budget_usd: 10.0,
            budget_period: "run".into(),
            rpm_limit: 120,
            models: vec!["claude-haiku-3-5".into()],
            expires_at: expires.into(),
            base_url: "http://127.0.0.1:4000/v1".into(),
            bot: "b".into(),
        }
    }

    #[test]
    fn answers_are_checked_before_anything_is_written() {
        let now =
            SystemTime::from(OffsetDateTime::parse("2026-02-06T14:30:00Z", &Rfc3339).unwrap());
        let e = entry();
        let held =
            validate_answer(answer("sk-abc_DEF-123", "2026-02-06T15:30:00Z"), &e, now).unwrap();
        assert!(held.refresh_at.duration_since(now).unwrap() <= 45 * MIN);
        assert!(held.refresh_at.duration_since(now).unwrap() >= 45 * MIN - MIN);
        for (mutate, want) in [
            (
                Box::new(|c: &mut LitellmCredential| c.key = "sk-a b".into())
                    as Box<dyn Fn(&mut LitellmCredential)>,
                "characters",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.key = String::new()),
                "empty",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.key = "sk-$(reboot)".into()),
                "characters",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.scope = "user".into()),
                "asked for a ci key, got a user key",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.base_url = "ftp://x/v1".into()),
                "base_url",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.base_url = "http://x/v1'".into()),
                "base_url",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.expires_at = "tomorrow".into()),
                "RFC 3339",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.expires_at = "2026-02-06T14:30:30Z".into()),
                "less than a minute",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.models = vec!["a b".into()]),
                "model",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.expires_at = "9999-12-31T23:59:59Z".into()),
                "longer than",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.budget_usd = f64::NAN),
                "budget",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.budget_usd = f64::INFINITY),
                "budget",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.budget_usd = -1.0),
                "budget",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.expires_at = "2027-03-01T00:00:00Z".into()),
                "longer than",
            ),
        ] {
            let mut c = answer("sk-abc", "2026-02-06T15:30:00Z");
            mutate(&mut c);
            let err = validate_answer(c, &e, now).err().unwrap().to_string();
            assert!(err.contains(want), "{err} / {want}");
            assert!(!err.contains("reboot"), "no key in errors: {err}");
        }
    }

    /// Regression: a hostile broker's key name, model names, credential id or budget period
    /// with bidirectional overrides (or an ESC, a newline) reached the agent's log (`LiteLLM
    /// key fetched name=…`), its cache and `/v1/status`. Every such answer is now either refused
    /// with a clean error or held with clean text only.
    #[test]
    fn broker_text_with_control_characters_never_reaches_logs_or_the_cache() {
        let now =
            SystemTime::from(OffsetDateTime::parse("2026-02-06T14:30:00Z", &Rfc3339).unwrap());
        let e = entry();
        let hostile = [
            "ci\x1b[2K\rfatal: forged",
            "ci\nINFO forged log line",
            "ci-\u{202e}dliub",
            "ci\u{7}bell",
            "ci\u{9b}31m",
        ];
        type Mutate = Box<dyn Fn(&mut LitellmCredential, &str)>;
        let fields: [(&str, Mutate); 6] = [
            ("name", Box::new(|c, h| c.name = h.into())),
            ("models", Box::new(|c, h| c.models = vec![h.into()])),
            ("credential_id", Box::new(|c, h| c.credential_id = h.into())),
            ("budget_period", Box::new(|c, h| c.budget_period = h.into())),
            ("scope", Box::new(|c, h| c.scope = h.into())),
            ("expires_at", Box::new(|c, h| c.expires_at = h.into())),
        ];
        for (field, mutate) in &fields {
            for h in hostile {
                let mut c = answer("sk-abc", "2026-02-06T15:30:00Z");
                mutate(&mut c, h);
                match validate_answer(c, &e, now) {
                    Err(err) => {
                        let shown = err.to_string();
                        assert!(
                            crate::text::is_clean(&shown),
                            "{field} {h:?}: error {shown:?}"
                        );
                    }
                    Ok(held) => {
                        let mut texts = vec![
                            held.name.clone(),
                            held.credential_id.clone(),
                            held.scope.clone(),
                            held.budget_period.clone(),
                            held.base_url.clone(),
                        ];
                        texts.extend(held.models.iter().cloned());
                        for t in &texts {
                            assert!(crate::text::is_clean(t), "{field} {h:?}: held {t:?}");
                        }
                        let stored = serde_json::to_string(&held.record("ci")).unwrap();
                        assert!(
                            !stored.contains("\\u001b")
                                && !stored.contains("\\n")
                                && !stored.contains('\u{202e}'),
                            "{field} {h:?}: cached {stored}"
                        );
                    }
                }
            }
        }
    }

    /// A broker answer's base URL ends up in an env file that users source as root: only plain
    /// http(s) URLs pass, whatever a compromised broker sends.
    #[test]
    fn base_url_shell_injection_is_refused() {
        let now =
            SystemTime::from(OffsetDateTime::parse("2026-02-06T14:30:00Z", &Rfc3339).unwrap());
        let refused = [
            "http://litellm:4000/v1;id>/tmp/PWNED",
            "http://litellm:4000/v1&id",
            "http://litellm:4000/v1|id",
            "http://litellm:4000/v1<x",
            "http://litellm:4000/v1>x",
            "http://litellm:4000/(v1)",
            "http://litellm:4000/~root",
            "http://litellm:4000/v1 id",
            "http://litellm:4000/v1\tid",
            "http://litellm:4000/v1\nid",
            "http://litellm:4000/v1$(id)",
            "http://litellm:4000/v1`id`",
            "http://litellm:4000/v1'",
            "http://litellm:4000/v1#frag",
            "http://litellm:4000/v1?a=b",
            "http://user:pw@litellm:4000/v1",
            "http://user@litellm:4000/v1",
            "file:///etc/shadow",
            "ftp://litellm/v1",
            "javascript:alert(1)",
            "http:/v1",
            "",
        ];
        for url in refused {
            let mut c = answer("sk-abc", "2026-02-06T15:30:00Z");
            c.base_url = url.into();
            let err = validate_answer(c, &entry(), now).err();
            assert!(err.is_some(), "{url:?} was accepted");
        }
        for url in [
            "http://litellm:4000/v1",
            "https://llm.example.com/v1/",
            "http://127.0.0.1:4000",
            "http://[::1]:4000/v1",
            "https://llm.example.com/a-b_c.d/%20v1",
        ] {
            let mut c = answer("sk-abc", "2026-02-06T15:30:00Z");
            c.base_url = url.into();
            let held = validate_answer(c, &entry(), now).unwrap();
            assert_eq!(held.base_url, url, "kept as sent");
        }
    }

    #[test]
    fn cache_names_depend_on_scope_and_workspace_only() {
        let a = entry();
        let b = LitellmEntry {
            key_file: "/elsewhere".into(),
            ..entry()
        };
        let c = LitellmEntry {
            scope: "user".into(),
            ..entry()
        };
        assert_eq!(cache_file_name(&a), cache_file_name(&b));
        assert_ne!(cache_file_name(&a), cache_file_name(&c));
        assert!(cache_file_name(&a).starts_with("litellm-"));
    }

    #[test]
    fn redacts_the_key_from_command_output() {
        let k = Secret::new("sk-secret".into());
        assert_eq!(redact("got sk-secret ok", Some(&k)), "got <redacted> ok");
        assert_eq!(redact("plain", None), "plain");
    }

    /// The whole life of a key against a fake broker: first fetch into every file, a check that
    /// finds the key rotated, an outage (files untouched), a restart from the cache while the
    /// broker is down, and the release at shutdown that clears the files.
    mod flow {
        use std::net::SocketAddr;
        use std::path::{Path, PathBuf};

        use axum::Json;
        use axum::routing::post;
        use botcreds_proto::CredentialRequest;

        use super::*;
        use crate::broker_client::{Auth, BrokerClient};

        #[derive(Default)]
        struct Fake {
            /// Answer every credential request with this refusal (HTTP 429) instead.
            refuse: Option<serde_json::Value>,
            minted: u32,
            current: Option<String>,
            released: Vec<String>,
            requests: Vec<CredentialRequest>,
        }

        type Shared = Arc<Mutex<Fake>>;

        fn mint(f: &mut Fake) -> u32 {
            f.minted += 1;
            f.current = Some(format!("lk_{}", f.minted));
            f.minted
        }

        async fn credentials(
            State(fake): State<Shared>,
            Json(r): Json<CredentialRequest>,
        ) -> Response {
            let mut f = lock(&fake);
            if let Some(body) = f.refuse.clone() {
                f.requests.push(r);
                return (axum::http::StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
            }
            let n = match (&f.current, &r.replaces) {
                (Some(c), Some(rep)) if c == rep => mint(&mut f),
                (None, _) => mint(&mut f),
                (Some(_), _) => f.minted,
            };
            f.requests.push(r);
            let expires = OffsetDateTime::now_utc() + time::Duration::hours(12);
            Json(serde_json::json!({
                "kind": "litellm_key", "credential_id": format!("lk_{n}"), "key": format!("sk-test-{n}"),
                "name": "contractor-alice", "scope": "workspace", "budget_usd": 5.0,
                "budget_period": "day", "rpm_limit": 30,
                "models": ["claude-sonnet-4-5", "claude-haiku-3-5"],
                "expires_at": expires.format(&Rfc3339).unwrap(),
                "base_url": "http://127.0.0.1:4000/v1", "bot": "ws-bot"
            }))
            .into_response()
        }

        async fn release(State(fake): State<Shared>, Json(v): Json<serde_json::Value>) -> Response {
            let mut f = lock(&fake);
            let id = v["credential_id"].as_str().unwrap_or_default().to_string();
            if f.current.as_deref() == Some(id.as_str()) {
                f.current = None;
                f.released.push(id);
                Json(serde_json::json!({"released": true})).into_response()
            } else {
                (
                    axum::http::StatusCode::NOT_FOUND,
                    Json(serde_json::json!({"error": "no such credential", "code": "unknown_credential"})),
                )
                    .into_response()
            }
        }

        /// Serves the fake on `addr` (port 0: any) until the sender is dropped.
        async fn serve(
            fake: Shared,
            addr: SocketAddr,
        ) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_reuseaddr(true).unwrap();
            socket.bind(addr).unwrap();
            let listener = socket.listen(64).unwrap();
            let local = listener.local_addr().unwrap();
            let app = Router::new()
                .route("/v1/credentials", post(credentials))
                .route("/v1/credentials/release", post(release))
                .with_state(fake);
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = rx.await;
                    })
                    .await
                    .unwrap();
            });
            (local, tx)
        }

        fn start(config: &Arc<Config>) -> (Credentials, Litellm) {
            let disk = DiskCache::open(&config.cache_dir).unwrap();
            let broker =
                BrokerClient::new(&config.broker, Auth::Tailnet, Duration::from_secs(2)).unwrap();
            let creds = Credentials::start(config.clone(), broker, disk.clone());
            let litellm = Litellm::start(config.clone(), creds.clone(), disk);
            (creds, litellm)
        }

        async fn wait_until(litellm: &Litellm, what: &str, f: impl Fn() -> bool) {
            let mut steps = litellm.steps();
            let done = tokio::time::timeout(Duration::from_secs(60), async {
                while !f() {
                    if steps.changed().await.is_err() {
                        break;
                    }
                }
            })
            .await;
            assert!(done.is_ok() && f(), "timed out waiting for: {what}");
        }

        fn read(p: &Path) -> String {
            std::fs::read_to_string(p).unwrap_or_default()
        }

        fn json(p: &Path) -> serde_json::Value {
            serde_json::from_str(&read(p)).unwrap_or_default()
        }

        #[tokio::test]
        async fn key_life_from_fetch_to_release() {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path();
            let fake: Shared = Arc::default();
            let (addr, stop) = serve(fake.clone(), "127.0.0.1:0".parse().unwrap()).await;
            let out = |name: &str| -> PathBuf { dir.join("out").join(name) };
            let changes = dir.join("changes");
            let toml = format!(
                r#"
broker = "http://{addr}"
cache_dir = "{d}/cache"
socket = "{d}/agent.sock"
[[litellm]]
scope = "workspace"
key_file = "{d}/out/key"
env_file = "{d}/out/env"
roo_code = "{d}/out/roo.json"
opencode = "{d}/out/opencode.json"
check_interval = "1s"
on_change = ["/bin/sh", "-c", "echo \"$BOTCREDS_LITELLM_EVENT $BOTCREDS_LITELLM_KEY_NAME\" >> {changes}"]
[litellm.workspace]
workspace_id = "ws-abc123"
workspace_name = "contractor-alice"
coder_user = "alice"
coder_user_id = "usr-def456"
"#,
                d = dir.display(),
                changes = changes.display(),
            );
            std::fs::create_dir_all(dir.join("out")).unwrap();
            std::fs::write(out("roo.json"), r#"{"theme": "dark"}"#).unwrap();
            let config = Arc::new(Config::parse(&toml, Path::new("agent.toml")).unwrap());

            let (creds, litellm) = start(&config);
            wait_until(
                &litellm,
                "the first key in every file and on_change run",
                || {
                    read(&out("key")) == "sk-test-1\n"
                        && read(&changes) == "updated contractor-alice\n"
                },
            )
            .await;
            assert!(read(&out("env")).contains("LITELLM_API_KEY='sk-test-1'\n"));
            let roo = json(&out("roo.json"));
            assert_eq!(roo["apiConfigs"]["LiteLLM"]["openAiApiKey"], "sk-test-1");
            assert_eq!(roo["theme"], "dark", "the user's settings stay");
            assert_eq!(
                json(&out("opencode.json"))["provider"]["litellm"]["options"]["apiKey"],
                "sk-test-1"
            );
            {
                let f = lock(&fake);
                let first = &f.requests[0];
                assert_eq!(first.scope.as_deref(), Some("workspace"));
                assert_eq!(first.workspace.as_ref().unwrap().workspace_id, "ws-abc123");
            }

            // Rotated (or revoked and replaced) on the broker: the next check brings the new key.
            mint(&mut lock(&fake));
            wait_until(&litellm, "the rotated key in the files", || {
                read(&out("key")) == "sk-test-2\n" && read(&changes).lines().count() == 2
            })
            .await;
            assert!(read(&out("env")).contains("OPENAI_API_KEY='sk-test-2'\n"));
            let status = litellm.status();
            assert_eq!(status[0].credential_id.as_deref(), Some("lk_2"));
            assert!(
                status[0].outputs.iter().all(|o| o.state == "written"),
                "{status:?}"
            );
            assert!(
                status[0].on_change.as_ref().is_some_and(|r| r.ok),
                "{status:?}"
            );

            // Outage: checks fail, the files keep the key.
            drop(stop);
            wait_until(&litellm, "a failed check", || {
                litellm.status()[0].failures > 0
            })
            .await;
            assert_eq!(read(&out("key")), "sk-test-2\n");
            assert_eq!(litellm.status()[0].state, CredentialState::ServingFromCache);

            // Stopping while the broker is down: the release fails within its bound and the key
            // stays in the files and the cache.
            litellm.shutdown(Duration::from_secs(2)).await;
            creds.shutdown();
            assert_eq!(read(&out("key")), "sk-test-2\n");

            // A restarted agent serves the cached key while the broker is still down.
            let (creds, litellm) = start(&config);
            assert_eq!(litellm.status()[0].credential_id.as_deref(), Some("lk_2"));
            wait_until(&litellm, "a failed check after the restart", || {
                litellm.status()[0].failures > 0
            })
            .await;
            assert_eq!(read(&out("key")), "sk-test-2\n");
            assert_eq!(
                read(&changes).lines().count(),
                2,
                "nothing changed, nothing ran"
            );

            // The broker is back: checks succeed; stopping releases the key and clears the files.
            let (_, stop) = serve(fake.clone(), addr).await;
            wait_until(&litellm, "a successful check", || {
                litellm.status()[0].failures == 0
            })
            .await;
            litellm.shutdown(Duration::from_secs(5)).await;
            creds.shutdown();
            assert_eq!(lock(&fake).released, vec!["lk_2".to_string()]);
            assert!(!out("key").exists() && !out("env").exists());
            let roo = json(&out("roo.json"));
            assert!(
                roo["apiConfigs"]["LiteLLM"].get("openAiApiKey").is_none(),
                "{roo}"
            );
            assert_eq!(roo["theme"], "dark");
            let cached = std::fs::read_dir(dir.join("cache"))
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("litellm-"))
                .count();
            assert_eq!(cached, 0, "a released key leaves the cache");
            drop(stop);
        }

        /// Config of one `workspace` entry against the fake at `addr`, files under `dir`.
        fn one_entry(addr: SocketAddr, dir: &Path) -> Arc<Config> {
            let toml = format!(
                r#"
broker = "http://{addr}"
cache_dir = "{d}/cache"
socket = "{d}/agent.sock"
[[litellm]]
scope = "workspace"
key_file = "{d}/out/key"
[litellm.workspace]
workspace_id = "ws-abc123"
workspace_name = "contractor-alice"
coder_user = "alice"
coder_user_id = "usr-def456"
"#,
                d = dir.display(),
            );
            Arc::new(Config::parse(&toml, Path::new("agent.toml")).unwrap())
        }

        fn task_alive(litellm: &Litellm) -> bool {
            lock(&litellm.inner.slots[0].task)
                .as_ref()
                .is_some_and(|t| !t.is_finished())
        }

        /// A broker answering 429 with `retry_after` = u64::MAX overflowed the retry time and
        /// killed the entry's task for good; the delay is now clamped and the task lives on.
        #[tokio::test]
        async fn huge_retry_after_neither_panics_nor_kills_the_task() {
            let tmp = tempfile::tempdir().unwrap();
            for retry_after in [u64::MAX, i64::MAX as u64, 10 * 365 * 86_400] {
                let fake: Shared = Arc::default();
                lock(&fake).refuse = Some(serde_json::json!({
                    "error": "slow down", "code": "overloaded", "retry_after": retry_after
                }));
                let (addr, stop) = serve(fake.clone(), "127.0.0.1:0".parse().unwrap()).await;
                let config = one_entry(addr, tmp.path());
                let (creds, litellm) = start(&config);
                wait_until(&litellm, "a refused fetch", || {
                    litellm.status()[0].failures > 0
                })
                .await;
                assert!(
                    task_alive(&litellm),
                    "retry_after {retry_after}: the task died"
                );
                let status = litellm.status();
                let next =
                    OffsetDateTime::parse(status[0].next_refresh.as_deref().unwrap(), &Rfc3339)
                        .unwrap();
                assert!(
                    next <= OffsetDateTime::now_utc()
                        + time::Duration::seconds(refresh::MAX_SERVER_DELAY.as_secs() as i64 + 5),
                    "retry_after {retry_after}: next ask at {next}, beyond the clamp"
                );
                litellm.shutdown(Duration::from_secs(1)).await;
                creds.shutdown();
                drop(stop);
            }
        }

        /// A cache record with times at the end of (or before) time panicked the loader or
        /// `GET /v1/litellm/status`; such records are dropped on load instead.
        #[tokio::test]
        async fn cache_records_with_extreme_times_are_dropped() {
            let now = to_unix(SystemTime::now());
            let cases = [
                ("fetched at the end of time", now + 3600, i64::MAX),
                ("expires at the end of time", i64::MAX, now),
                ("both at the end of time", i64::MAX, i64::MAX),
                ("expires beyond any key's life", now + 400 * 86_400, now),
                ("fetched in the far future", now + 3600, now + 100 * 86_400),
                ("negative times", now + 3600, i64::MIN),
            ];
            for (name, expires_at, fetched_at) in cases {
                let tmp = tempfile::tempdir().unwrap();
                // A broker that never answers: only the cache can give the entry a key.
                let config = one_entry("127.0.0.1:9".parse().unwrap(), tmp.path());
                let entry = &config.litellm[0];
                let disk = DiskCache::open(&config.cache_dir).unwrap();
                let record = KeyRecord {
                    format: KEY_CACHE_FORMAT,
                    identity: entry.identity(),
                    credential_id: "lk_1".into(),
                    key: Secret::new("sk-cached".into()),
                    name: "n".into(),
                    scope: entry.scope.clone(),
                    budget_usd: 1.0,
                    budget_period: "day".into(),
                    rpm_limit: 1,
                    models: vec![],
                    base_url: "http://127.0.0.1:4000/v1".into(),
                    expires_at,
                    fetched_at,
                };
                disk.store_bytes(
                    &cache_file_name(entry),
                    &serde_json::to_vec(&record).unwrap(),
                )
                .unwrap();
                let for_task = config.clone();
                let (creds, litellm) = tokio::task::spawn(async move { start(&for_task) })
                    .await
                    .unwrap_or_else(|_| panic!("{name}: starting on the record panicked"));
                let status = litellm.status();
                assert_eq!(status[0].credential_id, None, "{name}: the record was used");
                assert!(task_alive(&litellm), "{name}: the task died");
                assert!(
                    !tmp.path().join("out/key").exists(),
                    "{name}: the record's key was written"
                );
                litellm.shutdown(Duration::from_secs(1)).await;
                creds.shutdown();
            }
        }

        /// Regression: the cache checked only a record's key and base URL, so a record written
        /// before answers were checked for control characters (or edited on disk) brought a
        /// hostile name into the log (`loaded cached LiteLLM key name=…`) and `/v1/status`.
        #[tokio::test]
        async fn cache_records_with_control_characters_are_dropped() {
            type Mutate = fn(&mut KeyRecord);
            let cases: [(&str, Mutate); 5] = [
                ("name with ESC", |r| r.name = "n\x1b[2Kforged".into()),
                ("name with bidi", |r| r.name = "n\u{202e}txt".into()),
                ("credential id with newline", |r| {
                    r.credential_id = "lk_1\nINFO forged".into()
                }),
                ("model with bidi", |r| r.models = vec!["m\u{2066}x".into()]),
                ("budget period with ESC", |r| {
                    r.budget_period = "day\x1b]0;title\x07".into()
                }),
            ];
            let now = to_unix(SystemTime::now());
            for (name, mutate) in cases {
                let tmp = tempfile::tempdir().unwrap();
                let config = one_entry("127.0.0.1:9".parse().unwrap(), tmp.path());
                let entry = &config.litellm[0];
                let disk = DiskCache::open(&config.cache_dir).unwrap();
                let mut record = KeyRecord {
                    format: KEY_CACHE_FORMAT,
                    identity: entry.identity(),
                    credential_id: "lk_1".into(),
                    key: Secret::new("sk-cached".into()),
                    name: "n".into(),
                    scope: entry.scope.clone(),
                    budget_usd: 1.0,
                    budget_period: "day".into(),
                    rpm_limit: 1,
                    models: vec![],
                    base_url: "http://127.0.0.1:4000/v1".into(),
                    expires_at: now + 3600,
                    fetched_at: now,
                };
                mutate(&mut record);
                disk.store_bytes(
                    &cache_file_name(entry),
                    &serde_json::to_vec(&record).unwrap(),
                )
                .unwrap();
                let for_task = config.clone();
                let (creds, litellm) = tokio::task::spawn(async move { start(&for_task) })
                    .await
                    .unwrap();
                let status = litellm.status();
                assert_eq!(status[0].name, None, "{name}: the record was used");
                assert!(
                    !tmp.path().join("out/key").exists(),
                    "{name}: the record's key was written"
                );
                litellm.shutdown(Duration::from_secs(1)).await;
                creds.shutdown();
            }
        }
    }
}
