//! The entries and their tasks: one slot per `[[litellm]]` entry, loaded from the cache, asking
//! the broker when its next step is due (fetch, refresh, check), expiring the key, and
//! releasing it when the agent stops.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::broker_client::Released;
use crate::cache::{DiskCache, ReadError};
use crate::config::Config;
use crate::credentials::{Credentials, Edges, rfc3339};
use crate::slot::{self, Held, Slot, lock};

use super::files::write_files;
use super::key::{
    CACHE_PREFIX, KEY_CACHE_FORMAT, Key, KeyRecord, KeyState, KeyValue, OutputState,
    cache_file_name, check_texts, plain_base_url, plain_key,
};
use super::plan::Step;
use super::status::LitellmKeyStatus;

/// The agent's LiteLLM keys: a cheap handle to shared state.
#[derive(Clone)]
pub struct Litellm {
    inner: Arc<Inner>,
}

pub(super) struct Inner {
    /// For the broker and clock (one client, one identity for the whole agent) and the time of
    /// the last contact.
    pub(super) credentials: Credentials,
    pub(super) disk: DiskCache,
    pub(super) slots: Vec<Arc<Slot<Key>>>,
    /// Bumped after every step an entry takes (an answer, a file change, an `on_change` run),
    /// so that a watcher can wait for the next one instead of polling.
    pub(super) steps: tokio::sync::watch::Sender<u64>,
}

impl Litellm {
    /// Loads cached keys, writes them to their files, and starts one task per entry. Must be
    /// called inside the tokio runtime, after [`Credentials::start`] (which cleans the cache
    /// directory of temp files); asks the broker through the credentials' edges.
    pub fn start(config: Arc<Config>, credentials: Credentials, disk: DiskCache) -> Litellm {
        let slots: Vec<Arc<Slot<Key>>> = config
            .litellm
            .iter()
            .map(|entry| {
                let outputs = vec![
                    OutputState {
                        state: "pending",
                        ..OutputState::default()
                    };
                    entry.outputs().len()
                ];
                Arc::new(Slot::new(
                    Key {
                        entry: entry.clone(),
                        files: Arc::new(Mutex::new(())),
                        on_change_lock: tokio::sync::Mutex::new(()),
                    },
                    cache_file_name(entry),
                    KeyState {
                        last_check: None,
                        outputs,
                        on_change: None,
                    },
                ))
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
            slot.spawn(move || run_slot(for_task.clone(), supervised.clone()));
        }
        Litellm { inner }
    }

    /// A receiver that changes after every step any entry takes.
    pub fn steps(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.steps.subscribe()
    }

    /// Every entry's state, for `GET /v1/litellm/status`.
    pub fn status(&self) -> Vec<LitellmKeyStatus> {
        let now = self.inner.now();
        self.inner.slots.iter().map(|s| s.status(now)).collect()
    }

    /// Stops every entry's task, then releases (revokes at the broker) the keys of entries with
    /// `release_on_stop`, all within `bound`. A released key is removed from its files and the
    /// cache; a key the broker could not be asked to release stays in both (it is still valid,
    /// and a restarted agent uses it again).
    pub async fn shutdown(&self, bound: Duration) {
        for slot in &self.inner.slots {
            slot.abort();
        }
        let mut releases = tokio::task::JoinSet::new();
        for slot in &self.inner.slots {
            let held = slot.state().held.clone();
            let Some(held) = held.filter(|_| slot.kind.entry.release_on_stop) else {
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
    pub(super) fn edges(&self) -> &Edges {
        self.credentials.edges()
    }

    pub(super) fn now(&self) -> SystemTime {
        self.edges().clock.now()
    }

    pub(super) fn step_done(&self) {
        self.steps.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn load_cache(self: &Arc<Self>) {
        let now = self.now();
        for slot in &self.slots {
            let entry = &slot.kind.entry;
            if std::fs::symlink_metadata(self.disk.dir().join(&slot.file_name)).is_err() {
                continue;
            }
            let text = match self.disk.read_private(&slot.file_name) {
                Ok(text) => text,
                Err(ReadError::Refused(reason)) => {
                    tracing::warn!(scope = %entry.scope, file = %slot.file_name, "cached LiteLLM key {reason}; fetching anew");
                    continue;
                }
                Err(ReadError::Corrupt(reason)) => {
                    tracing::warn!(scope = %entry.scope, file = %slot.file_name, "cached LiteLLM key {reason}; removed, fetching anew");
                    let _ = self.disk.remove(&slot.file_name);
                    continue;
                }
            };
            let record = match serde_json::from_str::<KeyRecord>(&text) {
                Ok(r) if r.format == KEY_CACHE_FORMAT && r.identity == entry.identity() => r,
                Ok(_) => {
                    let _ = self.disk.remove(&slot.file_name);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(scope = %entry.scope, file = %slot.file_name, error = %e, "cached LiteLLM key is corrupt; removed, fetching anew");
                    let _ = self.disk.remove(&slot.file_name);
                    continue;
                }
            };
            // The cache is the agent's own, but what it holds goes into files users source: the
            // same checks as for a broker answer.
            let checked = (|| {
                if !plain_key(record.key.expose()) {
                    return Err("the key has characters a LiteLLM key cannot have".to_string());
                }
                plain_base_url(&record.base_url)
                    .map_err(|why| format!("base_url is not a plain http(s) URL: {why}"))?;
                check_texts(
                    &record.credential_id,
                    &record.name,
                    &record.budget_period,
                    &record.models,
                )
            })();
            let times = (record.expires_at, record.fetched_at, None);
            let value = KeyValue {
                key: record.key,
                name: record.name,
                scope: record.scope,
                budget_usd: record.budget_usd,
                budget_period: record.budget_period,
                rpm_limit: record.rpm_limit,
                models: record.models,
                base_url: record.base_url,
            };
            // Times first, as a broker answer's are checked first.
            let loaded = match slot::from_cache(&slot.kind, value, record.credential_id, times, now)
            {
                Ok(loaded) => checked.map(|()| loaded),
                Err(reason) => Err(reason),
            };
            let held = match loaded {
                Ok(Some((held, _))) => held,
                Ok(None) => {
                    // Expired while the agent was down: never written again.
                    let _ = self.disk.remove(&slot.file_name);
                    continue;
                }
                Err(reason) => {
                    tracing::warn!(scope = %entry.scope, file = %slot.file_name, "cached LiteLLM key is out of range ({reason}); removed, fetching anew");
                    let _ = self.disk.remove(&slot.file_name);
                    continue;
                }
            };
            tracing::info!(
                scope = %entry.scope,
                name = %held.name,
                credential_id = %held.credential_id,
                expires_at = %rfc3339(held.expires_at),
                "loaded cached LiteLLM key"
            );
            let mut st = slot.state();
            st.last_refresh = Some(held.fetched_at);
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

    /// One broker call for `slot`: a first key, a refresh, or a check.
    async fn ask(self: &Arc<Self>, slot: &Arc<Slot<Key>>, step: Step) {
        let held_id = slot.state().held.as_ref().map(|h| h.credential_id.clone());
        let replaces = match step {
            Step::Refresh => held_id.clone(),
            _ => None,
        };
        let entry = &slot.kind.entry;
        let edges = self.edges();
        let (now, result) = slot
            .fetch(
                edges.broker.as_ref(),
                edges.clock.as_ref(),
                &self.disk,
                replaces.as_deref(),
            )
            .await;
        if result
            .as_ref()
            .map_or_else(|r| r.error.broker_answered(), |_| true)
        {
            self.credentials.record_broker_contact(now);
        }
        match result {
            Ok(new) => {
                if held_id.as_deref() == Some(new.credential_id.as_str()) {
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
                self.sync_files(slot).await;
            }
            Err(slot::Refused { error: e, failed }) => match failed.dropped {
                Some(held) => {
                    tracing::warn!(
                        scope = %entry.scope,
                        credential_id = %held.credential_id,
                        error = %e,
                        "the broker refuses this LiteLLM key now; removing it from the files"
                    );
                    self.sync_files(slot).await;
                }
                None => {
                    let held = slot.state().held.is_some();
                    tracing::warn!(
                        scope = %entry.scope,
                        error = %e,
                        "asking the broker for the LiteLLM key failed{}",
                        if held { "; the files keep the key held until it expires" } else { "" }
                    );
                }
            },
        }
    }

    /// Drops a key that reached its expiry margin without a replacement.
    async fn expire(&self, slot: &Arc<Slot<Key>>) {
        if let Some(held) = slot.expire(&self.disk, self.edges().clock.as_ref()).await {
            tracing::warn!(
                scope = %slot.kind.entry.scope,
                credential_id = %held.credential_id,
                "LiteLLM key expired without a refresh; removed it from the files"
            );
            self.sync_files(slot).await;
        }
    }

    /// Revokes `held` at the broker; on success (or 404), removes it from files and cache.
    async fn release(&self, slot: &Arc<Slot<Key>>, held: &Held<Key>, bound: Duration) {
        let scope = &slot.kind.entry.scope;
        match self
            .edges()
            .broker
            .release_credential(&held.credential_id, bound)
            .await
        {
            Ok(outcome) => {
                tracing::info!(
                    scope = %scope,
                    name = %held.name,
                    credential_id = %held.credential_id,
                    already = outcome == Released::AlreadyGone,
                    "released the LiteLLM key at the broker"
                );
                slot.state().held = None;
                slot.remove_cache(&self.disk).await;
                let entry = slot.kind.entry.clone();
                let files = slot.kind.files.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    let _one_writer = lock(&files);
                    write_files(&entry, None)
                })
                .await;
            }
            Err(e) => tracing::warn!(
                scope = %scope,
                credential_id = %held.credential_id,
                error = %e,
                "cannot release the LiteLLM key at the broker; it stays valid until it expires"
            ),
        }
    }
}

/// An entry's life: write what the cache holds, then sleep until the next deadline and do
/// what is due, forever.
pub(super) async fn run_slot(inner: Arc<Inner>, slot: Arc<Slot<Key>>) {
    let cached = slot.state().held.is_some();
    if cached {
        inner.sync_files(&slot).await;
        inner.step_done();
    }
    loop {
        match slot.due(inner.edges().clock.as_ref()).await {
            Step::Expire => inner.expire(&slot).await,
            step @ (Step::Fetch | Step::Refresh | Step::Check) => inner.ask(&slot, step).await,
        }
        inner.step_done();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, SystemTime};

    use axum::Router;
    use axum::extract::State;
    use axum::response::{IntoResponse, Response};
    use botcreds_proto::agent::CredentialState;
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;

    use super::super::key::{KEY_CACHE_FORMAT, KeyRecord, cache_file_name};
    use super::Litellm;
    use crate::cache::DiskCache;
    use crate::config::Config;
    use crate::credentials::Credentials;
    use crate::credentials::time_to_unix as to_unix;
    use crate::refresh;
    use crate::secret::Secret;
    use crate::slot::lock;

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
            litellm.inner.slots[0].task_alive()
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

    /// e2e `broker_outage_and_agent_restart_keep_the_key_and_refresh_replaces_it_in_time`, on
    /// simulated time: a fake broker in the process and tokio's paused clock.
    mod simulated_time {
        use std::path::Path;

        use super::*;
        use crate::broker_client::{Auth, BrokerClient};
        use crate::credentials::Edges;
        use crate::fake_broker::{Logs, edges, until};

        const SEC: Duration = Duration::from_secs(1);

        /// One `ci` entry checked every 2 s, its key file under `dir/out`.
        fn start(dir: &Path, edges: &Edges) -> (Credentials, Litellm) {
            let toml = format!(
                r#"
broker = "http://127.0.0.1:9"
cache_dir = "{d}/cache"
socket = "{d}/agent.sock"
[[litellm]]
scope = "ci"
key_file = "{d}/out/ci.key"
check_interval = "2s"
"#,
                d = dir.display()
            );
            let config = Arc::new(Config::parse(&toml, Path::new("agent.toml")).unwrap());
            let disk = DiskCache::open(&config.cache_dir).unwrap();
            let client = Arc::new(
                BrokerClient::new(&config.broker, Auth::Tailnet, Duration::from_secs(5)).unwrap(),
            );
            let creds =
                Credentials::start_with(config.clone(), client, edges.clone(), disk.clone());
            let litellm = Litellm::start(config, creds.clone(), disk);
            (creds, litellm)
        }

        fn key_in(p: &Path) -> String {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .trim()
                .to_string()
        }

        #[tokio::test(start_paused = true)]
        async fn outage_and_restart_keep_the_key_and_refresh_replaces_it_in_time() {
            let (logs, _guard) = Logs::capture();
            let tmp = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(tmp.path().join("out")).unwrap();
            let key_file = tmp.path().join("out/ci.key");
            let (edges, broker) = edges(Duration::from_secs(3600), 150 * SEC);
            let (creds, litellm) = start(tmp.path(), &edges);
            until("the first key in the file", 60 * SEC, || {
                key_in(&key_file) == "sk-fake-1"
            })
            .await;
            assert!(
                !litellm.status()[0].release_on_stop,
                "only workspace keys are released by default"
            );

            // The broker goes away: checks fail, the file keeps the working key.
            broker.set_down(true);
            until("a failed check", 60 * SEC, || {
                logs.contains("asking the broker for the LiteLLM key failed")
            })
            .await;
            assert_eq!(key_in(&key_file), "sk-fake-1");
            let st = litellm.status().remove(0);
            assert_eq!(st.state, CredentialState::ServingFromCache, "{st:?}");
            assert!(
                st.last_error
                    .as_deref()
                    .unwrap_or("")
                    .contains("broker unreachable"),
                "{st:?}"
            );

            // The agent restarts while the broker is still down: the cached key stays.
            litellm.shutdown(Duration::from_secs(5)).await;
            creds.shutdown();
            assert_eq!(key_in(&key_file), "sk-fake-1");
            let before = logs.text().len();
            let (creds, litellm) = start(tmp.path(), &edges);
            until(
                "the cached key loaded, then a failed check",
                60 * SEC,
                || {
                    let new = logs.text()[before..].to_string();
                    new.contains("loaded cached LiteLLM key")
                        && new.contains("asking the broker for the LiteLLM key failed")
                },
            )
            .await;
            assert_eq!(key_in(&key_file), "sk-fake-1");

            // The broker comes back without the old key's plaintext: it replaces the key at
            // the next check.
            broker.st().key = None;
            broker.set_down(false);
            until("the new key in the file", 60 * SEC, || {
                key_in(&key_file) == "sk-fake-2"
            })
            .await;
            assert_eq!(litellm.status()[0].failures, 0);

            // The 150 s key is refreshed ahead of its expiry, the file never without a key.
            until("the refreshed key in the file", 300 * SEC, || {
                let key = key_in(&key_file);
                assert!(!key.is_empty(), "the key file lost its key");
                key == "sk-fake-3"
            })
            .await;
            let (old, replaced_at) = broker.st().rotated.last().cloned().unwrap();
            assert_eq!(old.n, 2, "the refresh replaced the key held");
            assert!(
                replaced_at < old.expires_at,
                "replaced at {replaced_at:?}, after it expired"
            );
            let half_life = old.expires_at.duration_since(old.created_at).unwrap() / 2;
            assert!(
                old.expires_at.duration_since(replaced_at).unwrap() > half_life,
                "replaced with less than half its life left: not by the refresh window"
            );
            let st = litellm.status().remove(0);
            let written = st.outputs[0]
                .changed_at
                .as_deref()
                .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
                .map(SystemTime::from)
                .unwrap_or_else(|| panic!("no changed_at for the key file: {st:?}"));
            assert!(
                written < old.expires_at,
                "the new key reached the file late"
            );
            let text = logs.text();
            assert!(
                !text.contains("expired without a refresh") && !text.contains("refuses this"),
                "the key file went without a key in between: {text}"
            );
            litellm.shutdown(Duration::from_secs(5)).await;
            creds.shutdown();
            assert!(
                !logs.contains("released the LiteLLM key"),
                "a ci key is kept"
            );
            assert_eq!(key_in(&key_file), "sk-fake-3", "kept for the next start");
        }
    }
}
