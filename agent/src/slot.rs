//! One refresh slot for every kind of credential the agent keeps fresh (GitHub tokens, LiteLLM
//! keys; deploy keys next): the credential held with its times, the failures and retry time,
//! the locks, the wake-up, the supervised task and the cache file, and the steps every kind
//! takes alike — ask the broker and check its answer, accept a credential (backing off when one
//! is due again at once), record a failure (dropping the credential when the broker takes access
//! away), expire it, sleep until the next deadline, write and remove its cache file.
//!
//! What differs per kind is one [`Kind`] implementation: how to ask the broker and check the
//! answer, how an answer is taken in, when a credential is refreshed, what the cache record
//! holds, how its task plans its next step, and what status shows. What a kind does with a step (serve git, write key files)
//! stays in its module, which drives its slots with these pieces.

use std::fmt::Display;
use std::future::Future;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::Notify;

use crate::broker_client::{BrokerError, CredentialBroker};
use crate::cache::DiskCache;
use crate::clock::Clock;
use crate::refresh::{self, Retry};

/// What differs between kinds of credentials.
pub trait Kind: Send + Sync + Sized + 'static {
    /// What a held credential carries besides its id and times (the secret, its details).
    type Value: Clone + Send + Sync + 'static;
    /// The kind's own state next to the common [`State`].
    type Extra: Send + 'static;
    /// A step of the slot's task (fetch, refresh, check, expire, ...).
    type Step: Copy + Send + 'static;
    /// The broker's answer, before it is checked.
    type Answer: Send + 'static;
    /// What the cache file stores.
    type Record: Serialize;
    /// One row of the status output.
    type Status;

    /// The longest a credential of this kind can live: answers and cache records beyond it
    /// (plus clock skew) are refused.
    const MAX_LIFE: Duration;
    /// How logs name a credential of this kind ("credential", "key").
    const NOUN: &'static str;

    /// Names this credential in logs (their `scope` field).
    fn scope(&self) -> &dyn Display;
    /// Names the slot's task for the supervisor's log lines.
    fn task_name(&self) -> String;
    /// Asks the broker for a credential; `replaces` names the one to replace.
    fn ask<'a>(
        &'a self,
        broker: &'a dyn CredentialBroker,
        replaces: Option<&'a str>,
    ) -> impl Future<Output = Result<Self::Answer, BrokerError>> + Send + 'a;
    /// Checks an answer that arrived at `now` and makes it a held credential.
    fn check(&self, answer: Self::Answer, now: SystemTime) -> Result<Held<Self>, BrokerError>;
    /// When a credential fetched at `fetched_at`, expiring at `expires_at`, is due for refresh;
    /// `unit` in `[0, 1)` is the jitter.
    fn refresh_at(&self, fetched_at: SystemTime, expires_at: SystemTime, unit: f64) -> SystemTime;
    /// The next step and when it is due (a time in the past means now); `None`: nothing is due
    /// until the slot is woken.
    fn next_step(&self, now: SystemTime, state: &State<Self>) -> Option<(SystemTime, Self::Step)>;
    /// Why a credential that is due for refresh the moment it arrives is suspicious (shown as
    /// the last error while the slot backs off); `left` is its remaining life.
    fn due_again(&self, left: Duration) -> String;
    /// Takes a checked answer that arrived at `now` into the state (the held credential and the
    /// kind's own bookkeeping); whether the cache file must be written.
    fn accept(&self, state: &mut State<Self>, new: &Held<Self>, now: SystemTime) -> bool;
    /// The cache record of `held`.
    fn record(&self, held: &Held<Self>, state: &State<Self>) -> Self::Record;
    /// The status row at `now`.
    fn status(&self, now: SystemTime, state: &State<Self>) -> Self::Status;
}

/// A credential held, with what every kind knows of it.
pub struct Held<K: Kind> {
    pub value: K::Value,
    pub credential_id: String,
    pub expires_at: SystemTime,
    pub fetched_at: SystemTime,
    pub refresh_at: SystemTime,
}

impl<K: Kind> Clone for Held<K> {
    fn clone(&self) -> Self {
        Held {
            value: self.value.clone(),
            credential_id: self.credential_id.clone(),
            expires_at: self.expires_at,
            fetched_at: self.fetched_at,
            refresh_at: self.refresh_at,
        }
    }
}

/// A held credential reads as its value (`held.name` for a key's name).
impl<K: Kind> std::ops::Deref for Held<K> {
    type Target = K::Value;

    fn deref(&self) -> &K::Value {
        &self.value
    }
}

/// What a slot knows, behind its lock.
pub struct State<K: Kind> {
    pub held: Option<Held<K>>,
    pub last_refresh: Option<SystemTime>,
    /// Failed broker calls in a row (or answers due again at once).
    pub failures: u32,
    /// After a failure: nothing is asked of the broker before this.
    pub retry_at: Option<SystemTime>,
    pub last_error: Option<(SystemTime, String)>,
    pub extra: K::Extra,
}

impl<K: Kind> State<K> {
    /// The held credential, if it may still be handed out at `now`.
    pub fn servable(&self, now: SystemTime) -> Option<&Held<K>> {
        self.held
            .as_ref()
            .filter(|h| refresh::servable(h.expires_at, now))
    }

    /// After a successful answer (the held credential updated by the caller): no failure, no
    /// retry, unless the held credential is already due again, in which case the slot backs off
    /// as after a failure, so a broker handing out short-lived credentials is not asked again
    /// in a tight loop. `earlier_failures` is the count before this answer.
    pub fn succeeded(&mut self, kind: &K, now: SystemTime, earlier_failures: u32) {
        self.failures = 0;
        self.retry_at = None;
        self.last_error = None;
        let Some(held) = &self.held else { return };
        if held.refresh_at > now {
            return;
        }
        let left = held.expires_at.duration_since(now).unwrap_or_default();
        self.failures = earlier_failures.saturating_add(1);
        self.retry_at = Some(refresh::later(
            now,
            refresh::backoff(self.failures, Retry::Soon, rand::random()),
        ));
        self.last_error = Some((now, kind.due_again(left)));
    }
}

/// What [`Slot::failed`] did.
pub struct Failed<K: Kind> {
    /// The credential dropped because the broker took access away.
    pub dropped: Option<Held<K>>,
    /// Whether a servable credential is still held.
    pub still_held: bool,
    pub failures: u32,
    pub retry_in: Duration,
}

/// A failed [`Slot::fetch`]: the broker's error and what the slot did about it.
pub struct Refused<K: Kind> {
    pub error: BrokerError,
    pub failed: Failed<K>,
}

/// One credential a kind keeps fresh.
pub struct Slot<K: Kind> {
    pub kind: K,
    /// Its cache file in `cache_dir`.
    pub file_name: String,
    state: Mutex<State<K>>,
    /// Wakes the slot's task to plan again (something changed).
    pub wake: Notify,
    /// Makes concurrent fetches of one credential share a single broker call.
    pub fetch_lock: tokio::sync::Mutex<()>,
    /// Orders every change of the held credential with its disk write, so memory and disk
    /// never disagree about which credential is current.
    pub disk_lock: tokio::sync::Mutex<()>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

/// Locks plain data; a panic while holding the lock leaves plain data behind, keep going.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<K: Kind> Slot<K> {
    pub fn new(kind: K, file_name: String, extra: K::Extra) -> Slot<K> {
        Slot {
            kind,
            file_name,
            state: Mutex::new(State {
                held: None,
                last_refresh: None,
                failures: 0,
                retry_at: None,
                last_error: None,
                extra,
            }),
            wake: Notify::new(),
            fetch_lock: tokio::sync::Mutex::new(()),
            disk_lock: tokio::sync::Mutex::new(()),
            task: Mutex::new(None),
        }
    }

    pub fn state(&self) -> MutexGuard<'_, State<K>> {
        lock(&self.state)
    }

    /// A copy of the held credential, if servable at `now`.
    pub fn servable(&self, now: SystemTime) -> Option<Held<K>> {
        self.state().servable(now).cloned()
    }

    /// The next step and when it is due.
    pub fn next_step(&self, now: SystemTime) -> Option<(SystemTime, K::Step)> {
        self.kind.next_step(now, &self.state())
    }

    pub fn status(&self, now: SystemTime) -> K::Status {
        self.kind.status(now, &self.state())
    }

    /// Starts the slot's task under the supervisor that restarts it should it crash.
    pub fn spawn<F, Fut>(&self, make: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let task = tokio::spawn(refresh::supervise(self.kind.task_name(), make));
        *lock(&self.task) = Some(task.abort_handle());
    }

    /// Stops the slot's task.
    pub fn abort(&self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }

    /// Lets go of the task without stopping it (it is ending by itself).
    pub fn release_task(&self) {
        lock(&self.task).take();
    }

    /// Whether the slot's task (its supervisor) is running.
    pub fn task_alive(&self) -> bool {
        lock(&self.task).as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Sleeps until the next step is due (or forever, if none is) and returns it; a wake-up
    /// plans again.
    pub async fn due(&self, clock: &dyn Clock) -> K::Step {
        loop {
            let now = clock.now();
            match self.next_step(now) {
                Some((at, step)) if at <= now => return step,
                Some((at, _)) => {
                    tokio::select! {
                        _ = clock.sleep_until(at) => {}
                        _ = self.wake.notified() => {}
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }

    /// One broker call and what follows from it, under the disk lock: an answer accepted
    /// (the cache file written when the kind says so), or a failure recorded (the cache file
    /// removed when the broker took access away). Returns the time the answer arrived.
    pub async fn fetch(
        &self,
        broker: &dyn CredentialBroker,
        clock: &dyn Clock,
        disk: &DiskCache,
        replaces: Option<&str>,
    ) -> (SystemTime, Result<Held<K>, Refused<K>>) {
        let (now, result) = self.ask(broker, clock, replaces).await;
        let _disk = self.disk_lock.lock().await;
        match result {
            Ok(new) => {
                let store = {
                    let mut st = self.state();
                    let earlier_failures = st.failures;
                    let store = self.kind.accept(&mut st, &new, now);
                    st.succeeded(&self.kind, now, earlier_failures);
                    if store { st.held.clone() } else { None }
                };
                if let Some(held) = &store {
                    self.store_cache(disk, held).await;
                }
                (now, Ok(new))
            }
            Err(error) => {
                let failed = self.failed(now, &error);
                if failed.dropped.is_some() {
                    self.remove_cache(disk).await;
                }
                (now, Err(Refused { error, failed }))
            }
        }
    }

    /// One broker call: the answer, checked, and the time it arrived.
    async fn ask(
        &self,
        broker: &dyn CredentialBroker,
        clock: &dyn Clock,
        replaces: Option<&str>,
    ) -> (SystemTime, Result<Held<K>, BrokerError>) {
        let answer = self.kind.ask(broker, replaces).await;
        let now = clock.now();
        (now, answer.and_then(|a| self.kind.check(a, now)))
    }

    /// Records a failed broker call at `now`: the retry time (backoff, or what the broker
    /// asked for, bounded) and the error; drops the credential if the broker took access away.
    fn failed(&self, now: SystemTime, e: &BrokerError) -> Failed<K> {
        let mut st = self.state();
        st.failures = st.failures.saturating_add(1);
        let delay = refresh::retry_delay(st.failures, e.retry(), e.retry_after(), rand::random());
        st.retry_at = Some(refresh::later(now, delay));
        st.last_error = Some((now, e.to_string()));
        let dropped = if e.revokes_access() {
            st.held.take()
        } else {
            None
        };
        Failed {
            dropped,
            still_held: st.servable(now).is_some(),
            failures: st.failures,
            retry_in: delay,
        }
    }

    /// Drops the held credential if it has reached its expiry margin, under the disk lock and
    /// with its cache file; returns the credential dropped.
    pub async fn expire(&self, disk: &DiskCache, clock: &dyn Clock) -> Option<Held<K>> {
        let _disk = self.disk_lock.lock().await;
        let now = clock.now();
        let expired = {
            let mut st = self.state();
            match &st.held {
                Some(h) if refresh::past_margin(h.expires_at, now) => st.held.take(),
                _ => None,
            }
        }?;
        self.remove_cache(disk).await;
        Some(expired)
    }

    /// Writes `held` to the slot's cache file (atomically, off the runtime); a failure is
    /// logged, the credential stays in memory.
    pub async fn store_cache(&self, disk: &DiskCache, held: &Held<K>) {
        let json = {
            let st = self.state();
            serde_json::to_vec(&self.kind.record(held, &st))
        };
        let json = match json {
            Ok(j) => zeroize::Zeroizing::new(j),
            Err(e) => {
                tracing::warn!(scope = %self.kind.scope(), error = %e, "cannot encode the {} for the cache", K::NOUN);
                return;
            }
        };
        let disk = disk.clone();
        let name = self.file_name.clone();
        match tokio::task::spawn_blocking(move || disk.store_bytes(&name, &json)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(
                scope = %self.kind.scope(),
                error = %e,
                "cannot write the cache file; the {} is held in memory only",
                K::NOUN
            ),
            Err(e) => {
                tracing::warn!(scope = %self.kind.scope(), error = %e, "cache write task failed")
            }
        }
    }

    /// Removes the slot's cache file (off the runtime); a failure is logged.
    pub async fn remove_cache(&self, disk: &DiskCache) {
        let disk = disk.clone();
        let name = self.file_name.clone();
        match tokio::task::spawn_blocking(move || disk.remove(&name)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(scope = %self.kind.scope(), error = %e, "cannot remove the cache file")
            }
            Err(e) => {
                tracing::warn!(scope = %self.kind.scope(), error = %e, "cache removal task failed")
            }
        }
    }
}

/// A credential loaded from the cache, and when it was last used.
pub type Cached<K> = (Held<K>, Option<SystemTime>);

/// Times of a cache record as Unix seconds: expiry, fetch, last use.
pub type RecordTimes = (i64, i64, Option<i64>);

/// A held credential of `kind` from a cache record, if its times are in range for the kind and
/// it is still servable at `now`; `Err` with the reason when out of range, `Ok(None)` when
/// expired. The last use comes back checked.
pub fn from_cache<K: Kind>(
    kind: &K,
    value: K::Value,
    credential_id: String,
    (expires_at, fetched_at, last_used): RecordTimes,
    now: SystemTime,
) -> Result<Option<Cached<K>>, String> {
    let (expires_at, fetched_at, last_used) =
        refresh::record_times(expires_at, fetched_at, last_used, K::MAX_LIFE, now)?;
    if !refresh::servable(expires_at, now) {
        return Ok(None);
    }
    let held = Held {
        refresh_at: kind.refresh_at(fetched_at, expires_at, rand::random()),
        value,
        credential_id,
        expires_at,
        fetched_at,
    };
    Ok(Some((held, last_used)))
}
