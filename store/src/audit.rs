//! The durable audit log: events from concurrent requests are grouped into one store append and one flush.
//!
//! One dedicated writer thread takes whatever is queued, appends it with a single `Store::append_audit` call
//! (one fsync), then answers every waiter. N concurrent requests therefore cost one fsync, not N. A caller
//! that gets an error must not hand out the credential the events describe.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use botcreds_proto::audit::{AuditEvent, AuditEventKind};
use tokio::sync::{mpsc, oneshot};

use crate::{AuditFilter, Store, StoreError};

/// Most events one batch takes from the queue; bounds the latency of the requests at its front.
const MAX_BATCH_EVENTS: usize = 4096;
/// Event slots the writer keeps allocated between batches.
const KEPT_EVENTS: usize = 256;
/// Peers whose refusal windows are tracked at once; beyond it, new peers share one window
/// (under the unspecified address), so a flood from many addresses cannot grow the table.
const MAX_REFUSAL_PEERS: usize = 16_384;

#[derive(thiserror::Error, Debug, Clone)]
pub enum AuditError {
    /// The store refused the batch; none of its events are acknowledged.
    #[error("audit store failed: {0}")]
    Store(Arc<StoreError>),
    #[error("audit log is shut down")]
    Closed,
    /// The writer thread ended without answering (it panicked).
    #[error("audit writer stopped before confirming the events")]
    WriterStopped,
}

/// A cheap `Clone` handle to the audit log. The writer stops when `shutdown` is called or the last handle drops.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    refusals: Mutex<RefusalWindows>,
    /// `None` once shut down. Senders hold the read side, so after `shutdown` takes the write side no send
    /// can slip in behind the close and go unanswered.
    queue: RwLock<Option<mpsc::UnboundedSender<Pending>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// One `record` call waiting for its events to be durable.
struct Pending {
    events: Vec<AuditEvent>,
    reply: oneshot::Sender<Result<Vec<AuditEvent>, AuditError>>,
}

type Queued = Result<Option<oneshot::Receiver<Result<Vec<AuditEvent>, AuditError>>>, AuditError>;

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let open = self
            .inner
            .queue
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        f.debug_struct("AuditLog")
            .field("open", &open)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Start the writer thread over `store`, with the default limits on anonymous refusals.
    pub fn start(store: Arc<dyn Store>) -> AuditLog {
        AuditLog::start_with(store, RefusalLimits::default())
    }

    /// Start the writer thread over `store`; anonymous refusals are written one by one only
    /// up to `limits` (see [`AuditLog::record_refusal`]).
    pub fn start_with(store: Arc<dyn Store>, limits: RefusalLimits) -> AuditLog {
        // The queue is unbounded because its depth is bounded upstream: every entry is a request that the
        // HTTP layer's concurrency limit admitted and that is now waiting for its answer.
        let (tx, rx) = mpsc::unbounded_channel();
        let writer_store = Arc::clone(&store);
        #[allow(
            clippy::expect_used,
            reason = "as std::thread::spawn does, at startup only"
        )]
        let writer = std::thread::Builder::new()
            .name("botcreds-audit".to_owned())
            .spawn(move || run_writer(&*writer_store, rx))
            // Thread creation fails only when the OS is out of threads or memory, and only at startup.
            .expect("spawn the audit writer thread");
        AuditLog {
            inner: Arc::new(Inner {
                store,
                refusals: Mutex::new(RefusalWindows::new(limits)),
                queue: RwLock::new(Some(tx)),
                writer: Mutex::new(Some(writer)),
            }),
        }
    }

    /// Durably record these events (e.g. credential_requested + credential_issued of one request); the
    /// future resolves after they are flushed, with seq/hash filled in, in the order given.
    ///
    /// The events are queued when `record` is called, not when the future is first polled, and dropping the
    /// future does not withdraw them. On error none of them is acknowledged.
    pub fn record(
        &self,
        events: Vec<AuditEvent>,
    ) -> impl Future<Output = Result<Vec<AuditEvent>, AuditError>> + Send + 'static {
        let queued = self.enqueue(events);
        async move {
            match queued? {
                None => Ok(Vec::new()),
                Some(reply) => reply.await.map_err(|_| AuditError::WriterStopped)?,
            }
        }
    }

    fn enqueue(&self, events: Vec<AuditEvent>) -> Queued {
        if events.is_empty() {
            return Ok(None);
        }
        let (reply, answer) = oneshot::channel();
        let queue = self
            .inner
            .queue
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let sender = queue.as_ref().ok_or(AuditError::Closed)?;
        // Fails only if the writer thread is gone (it panicked).
        sender
            .send(Pending { events, reply })
            .map_err(|_| AuditError::Closed)?;
        Ok(Some(answer))
    }

    /// Record the refusal of a caller who could not be identified (no or a wrong API key, an
    /// unknown tailnet peer, a refused TLS handshake), coming from `peer`. Each such refusal
    /// would otherwise cost one durable write, so only the first few per peer and window are
    /// written one by one; the rest are counted and written as one `refusals_summarized` event
    /// when the window ends (by the next refusal from that peer, by
    /// [`AuditLog::flush_refusal_summaries`], or at shutdown). Resolves at once for a refusal
    /// that was only counted.
    pub fn record_refusal(
        &self,
        peer: IpAddr,
        event: AuditEvent,
    ) -> impl Future<Output = Result<(), AuditError>> + Send + 'static {
        let events = self.lock_refusals().note(peer, event, Instant::now());
        let recorded = self.record(events);
        async move { recorded.await.map(|_| ()) }
    }

    /// Write the summaries of every refusal window that has ended (called periodically).
    pub fn flush_refusal_summaries(
        &self,
    ) -> impl Future<Output = Result<(), AuditError>> + Send + 'static {
        let events = self.lock_refusals().ended(Instant::now(), false);
        let recorded = self.record(events);
        async move { recorded.await.map(|_| ()) }
    }

    fn lock_refusals(&self) -> std::sync::MutexGuard<'_, RefusalWindows> {
        self.inner
            .refusals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether events can still be recorded: not shut down, and the writer thread is alive (readiness).
    pub fn is_running(&self) -> bool {
        self.inner
            .queue
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|sender| !sender.is_closed())
    }

    /// Read stored events. Synchronous: the store answers from its cache or a short disk read.
    pub fn read(&self, filter: &AuditFilter) -> Result<Vec<AuditEvent>, AuditError> {
        self.inner
            .store
            .read_audit(filter)
            .map_err(|e| AuditError::Store(Arc::new(e)))
    }

    /// Stop the writer after draining queued events, and wait for it. Idempotent; also runs when the last
    /// handle drops. Later `record` calls fail with [`AuditError::Closed`].
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

impl Inner {
    fn shutdown(&self) {
        // Counted refusals of open windows are written before the queue closes.
        let summaries = self
            .refusals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .ended(Instant::now(), true);
        if !summaries.is_empty()
            && let Some(sender) = self
                .queue
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
        {
            let (reply, _) = oneshot::channel();
            let _ = sender.send(Pending {
                events: summaries,
                reply,
            });
        }
        // Dropping the only sender closes the queue; the writer drains what is in it and then ends.
        drop(
            self.queue
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        // Hold the lock while joining so a concurrent `shutdown` also returns only once the writer is done.
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(handle) = writer.take()
            && handle.join().is_err()
        {
            tracing::error!("audit writer thread panicked");
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// How many anonymous refusals per peer are written one by one, and over what window.
#[derive(Clone, Copy, Debug)]
pub struct RefusalLimits {
    pub per_peer: usize,
    pub window: Duration,
}

impl Default for RefusalLimits {
    fn default() -> RefusalLimits {
        RefusalLimits {
            per_peer: 10,
            window: Duration::from_secs(60),
        }
    }
}

/// The open refusal windows, by peer.
struct RefusalWindows {
    limits: RefusalLimits,
    peers: HashMap<IpAddr, RefusalWindow>,
}

struct RefusalWindow {
    started: Instant,
    written: usize,
    /// Counted, not written: how many, by error code, and the last one's time.
    counted: u64,
    codes: BTreeMap<String, u64>,
    first_at: String,
    last_at: String,
}

impl RefusalWindows {
    fn new(limits: RefusalLimits) -> RefusalWindows {
        RefusalWindows {
            limits,
            peers: HashMap::new(),
        }
    }

    /// The events to write for one refusal from `peer` at `now`: the summary of the peer's
    /// ended window if it counted any, then this refusal unless its window is full.
    fn note(&mut self, peer: IpAddr, mut event: AuditEvent, now: Instant) -> Vec<AuditEvent> {
        let mut out = Vec::new();
        if event.client_ip.is_none() {
            event.client_ip = Some(peer.to_string());
        }
        let mut key = peer;
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_REFUSAL_PEERS {
            out.extend(self.ended(now, false));
            if self.peers.len() >= MAX_REFUSAL_PEERS {
                key = IpAddr::from([0, 0, 0, 0]);
            }
        }
        let window = self.limits.window;
        if let Some(w) = self.peers.get(&key)
            && now.duration_since(w.started) >= window
            && let Some(w) = self.peers.remove(&key)
        {
            out.extend(w.summary(key));
        }
        let w = self.peers.entry(key).or_insert_with(|| RefusalWindow {
            started: now,
            written: 0,
            counted: 0,
            codes: BTreeMap::new(),
            first_at: String::new(),
            last_at: String::new(),
        });
        if w.written < self.limits.per_peer {
            w.written += 1;
            out.push(event);
        } else {
            if w.counted == 0 {
                w.first_at = event.timestamp.clone();
            }
            w.counted += 1;
            w.last_at = event.timestamp;
            let code = event
                .code
                .unwrap_or_else(|| event.event.as_str().to_string());
            *w.codes.entry(code).or_insert(0) += 1;
        }
        out
    }

    /// Summaries of the windows that ended by `now` (or of all windows, at shutdown), which
    /// are forgotten.
    fn ended(&mut self, now: Instant, all: bool) -> Vec<AuditEvent> {
        let window = self.limits.window;
        let mut out = Vec::new();
        self.peers.retain(|peer, w| {
            if all || now.duration_since(w.started) >= window {
                out.extend(w.summary(*peer));
                false
            } else {
                true
            }
        });
        out
    }
}

impl RefusalWindow {
    fn summary(&self, peer: IpAddr) -> Option<AuditEvent> {
        if self.counted == 0 {
            return None;
        }
        let mut e = AuditEvent::new(AuditEventKind::RefusalsSummarized, self.last_at.clone());
        e.client_ip = (!peer.is_unspecified()).then(|| peer.to_string());
        e.code = (self.codes.len() == 1)
            .then(|| self.codes.keys().next().cloned())
            .flatten();
        let codes: Vec<String> = self
            .codes
            .iter()
            .map(|(code, n)| format!("{code} x{n}"))
            .collect();
        e.detail = Some(format!(
            "{} more unauthenticated refusals from {} between {} and {} were counted, not \
             written one by one ({})",
            self.counted,
            if peer.is_unspecified() {
                "peers beyond the tracked limit".to_string()
            } else {
                peer.to_string()
            },
            self.first_at,
            self.last_at,
            codes.join(", ")
        ));
        Some(e)
    }
}

fn run_writer(store: &dyn Store, mut queue: mpsc::UnboundedReceiver<Pending>) {
    let mut batch: Vec<Pending> = Vec::new();
    let mut events: Vec<AuditEvent> = Vec::new();
    while let Some(first) = queue.blocking_recv() {
        let mut count = first.events.len();
        batch.push(first);
        while count < MAX_BATCH_EVENTS {
            match queue.try_recv() {
                Ok(next) => {
                    count += next.events.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        commit(store, &mut batch, &mut events, count);
    }
    tracing::debug!("audit writer stopped");
}

/// Append one batch and answer all of its waiters, all with success or all with the same error.
///
/// The events travel in `events` (kept between batches) and go back to each waiter in the vector it
/// sent them in, so a batch allocates nothing per request and each vector is freed by the thread that
/// allocated it.
fn commit(store: &dyn Store, batch: &mut Vec<Pending>, events: &mut Vec<AuditEvent>, count: usize) {
    events.clear();
    events.reserve(count);
    let mut lens = Vec::with_capacity(batch.len());
    for pending in batch.iter_mut() {
        lens.push(pending.events.len());
        events.append(&mut pending.events);
    }
    match store.append_audit(events) {
        Ok(()) => {
            tracing::debug!(
                events = count,
                requests = batch.len(),
                "audit batch committed"
            );
            let mut stamped = events.drain(..);
            for (mut pending, len) in batch.drain(..).zip(lens) {
                pending.events.extend(stamped.by_ref().take(len));
                // A waiter that gave up still had its events recorded; nobody is left to tell.
                let _ = pending.reply.send(Ok(pending.events));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, events = count, requests = batch.len(), "audit batch failed");
            let e = Arc::new(e);
            for pending in batch.drain(..) {
                let _ = pending.reply.send(Err(AuditError::Store(Arc::clone(&e))));
            }
            events.clear();
        }
    }
    if events.capacity() > KEPT_EVENTS {
        // A burst grew it; do not keep that memory for good.
        *events = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc as std_mpsc;

    use botcreds_proto::audit::AuditEventKind;

    use super::*;
    use crate::{ChainReport, CredentialRecord, MemoryStore};

    fn event(bot: &str) -> AuditEvent {
        let mut event = AuditEvent::new(
            AuditEventKind::CredentialRequested,
            "2026-02-17T14:00:00.000Z".to_owned(),
        );
        event.bot = Some(bot.to_owned());
        event
    }

    /// A `MemoryStore` that counts appends, can hold the first append until released (so the test knows
    /// requests are piling up behind it), and can fail chosen appends.
    struct GatedStore {
        inner: MemoryStore,
        appends: AtomicUsize,
        entered: Mutex<Option<std_mpsc::Sender<()>>>,
        release: Mutex<Option<std_mpsc::Receiver<()>>>,
        /// 1-based numbers of the appends that fail.
        fail_appends: Vec<usize>,
    }

    struct Gate {
        entered: std_mpsc::Receiver<()>,
        release: std_mpsc::Sender<()>,
    }

    impl GatedStore {
        fn new(fail_appends: Vec<usize>) -> (Arc<GatedStore>, Gate) {
            let (entered_tx, entered_rx) = std_mpsc::channel();
            let (release_tx, release_rx) = std_mpsc::channel();
            let store = Arc::new(GatedStore {
                inner: MemoryStore::new(),
                appends: AtomicUsize::new(0),
                entered: Mutex::new(Some(entered_tx)),
                release: Mutex::new(Some(release_rx)),
                fail_appends,
            });
            let gate = Gate {
                entered: entered_rx,
                release: release_tx,
            };
            (store, gate)
        }
    }

    impl Store for GatedStore {
        fn append_audit(&self, events: &mut [AuditEvent]) -> Result<(), StoreError> {
            let n = self.appends.fetch_add(1, Ordering::SeqCst) + 1;
            if let Some(entered) = self.entered.lock().unwrap().take() {
                entered.send(()).unwrap();
                let release = self.release.lock().unwrap().take().unwrap();
                release.recv().unwrap();
            }
            if self.fail_appends.contains(&n) {
                return Err(StoreError::Unavailable("disk full".to_owned()));
            }
            self.inner.append_audit(events)
        }
        fn read_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEvent>, StoreError> {
            self.inner.read_audit(filter)
        }
        fn verify_audit_chain(&self) -> Result<ChainReport, StoreError> {
            self.inner.verify_audit_chain()
        }
        fn put_credential(&self, record: &CredentialRecord) -> Result<(), StoreError> {
            self.inner.put_credential(record)
        }
        fn get_credential(&self, id: &str) -> Result<Option<CredentialRecord>, StoreError> {
            self.inner.get_credential(id)
        }
        fn list_credentials(&self) -> Result<Vec<CredentialRecord>, StoreError> {
            self.inner.list_credentials()
        }
        fn put_doc(&self, namespace: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
            self.inner.put_doc(namespace, key, value)
        }
        fn get_doc(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get_doc(namespace, key)
        }
        fn delete_doc(&self, namespace: &str, key: &str) -> Result<(), StoreError> {
            self.inner.delete_doc(namespace, key)
        }
        fn list_docs(&self, namespace: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            self.inner.list_docs(namespace)
        }
        fn flush(&self) -> Result<(), StoreError> {
            self.inner.flush()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_records_share_one_append() {
        let (store, gate) = GatedStore::new(Vec::new());
        let log = AuditLog::start(store.clone());
        // The first request occupies the writer; the other 199 queue up behind it.
        let first = tokio::spawn(log.record(vec![event("bot-0")]));
        gate.entered.recv().unwrap();
        let rest: Vec<_> = (1..200)
            .map(|i| {
                // Some requests record two events, as credential_requested + credential_issued do.
                let events = if i % 2 == 0 {
                    vec![event(&format!("bot-{i}"))]
                } else {
                    vec![event(&format!("bot-{i}")), event(&format!("bot-{i}"))]
                };
                tokio::spawn(log.record(events))
            })
            .collect();
        gate.release.send(()).unwrap();

        let mut seqs = Vec::new();
        for (i, task) in std::iter::once(first).chain(rest).enumerate() {
            let events = task.await.unwrap().unwrap();
            assert_eq!(events.len(), if i % 2 == 0 { 1 } else { 2 });
            for e in &events {
                // Each caller gets its own events back, stamped.
                assert_eq!(e.bot.as_deref(), Some(format!("bot-{i}").as_str()));
                assert_eq!(e.hash.len(), 64);
                seqs.push(e.seq);
            }
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=300).collect::<Vec<u64>>());
        // One append for the first request, one for everything queued behind it.
        assert_eq!(store.appends.load(Ordering::SeqCst), 2);
        assert_eq!(store.verify_audit_chain().unwrap().first_broken, None);
    }

    #[tokio::test]
    async fn store_failure_reaches_every_waiter_of_the_batch() {
        let (store, gate) = GatedStore::new(vec![2]);
        let log = AuditLog::start(store.clone());
        let first = log.record(vec![event("bot-0")]);
        gate.entered.recv().unwrap();
        let failing: Vec<_> = (1..=10)
            .map(|i| log.record(vec![event(&format!("bot-{i}"))]))
            .collect();
        gate.release.send(()).unwrap();

        assert_eq!(first.await.unwrap()[0].seq, 1);
        for waiter in failing {
            let err = waiter.await.unwrap_err();
            assert!(
                matches!(&err, AuditError::Store(e) if matches!(**e, StoreError::Unavailable(_)))
            );
            assert!(err.to_string().contains("disk full"), "{err}");
        }
        // Nothing of the failed batch was stored, and the log carries on without a gap.
        assert_eq!(store.read_audit(&AuditFilter::default()).unwrap().len(), 1);
        let after = log.record(vec![event("bot-11")]).await.unwrap();
        assert_eq!(after[0].seq, 2);
        assert_eq!(store.appends.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn shutdown_drains_the_queue_then_refuses() {
        let (store, gate) = GatedStore::new(Vec::new());
        let log = AuditLog::start(store.clone());
        let first = log.record(vec![event("bot-0")]);
        gate.entered.recv().unwrap();
        let queued: Vec<_> = (1..=5)
            .map(|i| log.record(vec![event(&format!("bot-{i}"))]))
            .collect();
        gate.release.send(()).unwrap();
        assert!(log.is_running());
        log.shutdown();
        log.shutdown();
        assert!(!log.is_running());

        assert_eq!(first.await.unwrap()[0].seq, 1);
        for waiter in queued {
            assert_eq!(waiter.await.unwrap().len(), 1);
        }
        assert_eq!(store.read_audit(&AuditFilter::default()).unwrap().len(), 6);
        assert!(matches!(
            log.record(vec![event("late")]).await,
            Err(AuditError::Closed)
        ));
        // Reading still works after the writer stopped.
        assert_eq!(log.read(&AuditFilter::default()).unwrap().len(), 6);
    }

    #[tokio::test]
    async fn dropping_the_last_handle_stops_the_writer() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let log = AuditLog::start(Arc::clone(&store));
        let copy = log.clone();
        let recorded = copy.record(vec![event("bot")]);
        drop(log);
        drop(copy);
        assert_eq!(recorded.await.unwrap()[0].seq, 1);
        // The writer thread, which held the other reference, has ended.
        assert_eq!(Arc::strong_count(&store), 1);
    }

    /// A store that panics, standing in for a bug below the audit log.
    struct PanickingStore(MemoryStore);

    impl Store for PanickingStore {
        fn append_audit(&self, _events: &mut [AuditEvent]) -> Result<(), StoreError> {
            panic!("store bug");
        }
        fn read_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEvent>, StoreError> {
            self.0.read_audit(filter)
        }
        fn verify_audit_chain(&self) -> Result<ChainReport, StoreError> {
            self.0.verify_audit_chain()
        }
        fn put_credential(&self, record: &CredentialRecord) -> Result<(), StoreError> {
            self.0.put_credential(record)
        }
        fn get_credential(&self, id: &str) -> Result<Option<CredentialRecord>, StoreError> {
            self.0.get_credential(id)
        }
        fn list_credentials(&self) -> Result<Vec<CredentialRecord>, StoreError> {
            self.0.list_credentials()
        }
        fn put_doc(&self, namespace: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
            self.0.put_doc(namespace, key, value)
        }
        fn get_doc(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.0.get_doc(namespace, key)
        }
        fn delete_doc(&self, namespace: &str, key: &str) -> Result<(), StoreError> {
            self.0.delete_doc(namespace, key)
        }
        fn list_docs(&self, namespace: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            self.0.list_docs(namespace)
        }
        fn flush(&self) -> Result<(), StoreError> {
            self.0.flush()
        }
    }

    #[tokio::test]
    async fn a_dead_writer_fails_closed() {
        let log = AuditLog::start(Arc::new(PanickingStore(MemoryStore::new())));
        assert!(matches!(
            log.record(vec![event("bot")]).await,
            Err(AuditError::WriterStopped)
        ));
        // The waiter's answer was dropped while the thread unwound; once it has ended, the log says so.
        log.shutdown();
        assert!(!log.is_running());
        assert!(matches!(
            log.record(vec![event("bot")]).await,
            Err(AuditError::Closed)
        ));
    }

    #[tokio::test]
    async fn recording_nothing_is_a_no_op() {
        let (store, _gate) = GatedStore::new(Vec::new());
        let log = AuditLog::start(store.clone());
        assert!(log.record(Vec::new()).await.unwrap().is_empty());
        assert_eq!(store.appends.load(Ordering::SeqCst), 0);
    }

    fn refusal(code: &str) -> AuditEvent {
        let mut e = AuditEvent::new(
            AuditEventKind::CredentialDenied,
            "2026-02-17T14:00:00.000Z".to_owned(),
        );
        e.code = Some(code.to_owned());
        e
    }

    /// unauthenticated_refusal_flood_writes_every_event: one durable event per refusal let one
    /// client write gigabytes a day. Per peer and window, the first few are written; the rest
    /// become one summary.
    #[test]
    fn anonymous_refusals_are_summarised_per_peer_and_window() {
        let limits = RefusalLimits {
            per_peer: 3,
            window: Duration::from_secs(60),
        };
        let mut windows = RefusalWindows::new(limits);
        let (a, b): (IpAddr, IpAddr) =
            ("100.64.0.1".parse().unwrap(), "100.64.0.2".parse().unwrap());
        let t0 = Instant::now();
        let mut written = Vec::new();
        for i in 0..25 {
            let code = if i % 2 == 0 {
                "unauthenticated"
            } else {
                "invalid_api_key"
            };
            written.extend(windows.note(a, refusal(code), t0));
        }
        assert_eq!(
            written.len(),
            3,
            "only the first three are written one by one"
        );
        assert!(
            written
                .iter()
                .all(|e| e.client_ip.as_deref() == Some("100.64.0.1"))
        );
        // Another peer has its own window.
        assert_eq!(windows.note(b, refusal("unauthenticated"), t0).len(), 1);
        assert!(
            windows
                .ended(t0 + Duration::from_secs(59), false)
                .is_empty()
        );
        let summaries = windows.ended(t0 + Duration::from_secs(60), false);
        assert_eq!(summaries.len(), 1, "{summaries:?}");
        let s = &summaries[0];
        assert_eq!(s.event, AuditEventKind::RefusalsSummarized);
        assert_eq!(s.client_ip.as_deref(), Some("100.64.0.1"));
        let detail = s.detail.as_deref().unwrap();
        assert!(detail.starts_with("22 more"), "{detail}");
        assert!(detail.contains("invalid_api_key x11") && detail.contains("unauthenticated x11"));
        // A new window writes again; a refusal after the window ended brings its summary along.
        for _ in 0..5 {
            windows.note(a, refusal("unauthenticated"), t0 + Duration::from_secs(61));
        }
        let next = windows.note(a, refusal("unauthenticated"), t0 + Duration::from_secs(200));
        let kinds: Vec<_> = next.iter().map(|e| e.event).collect();
        assert_eq!(
            kinds,
            [
                AuditEventKind::RefusalsSummarized,
                AuditEventKind::CredentialDenied
            ]
        );
        assert_eq!(next[0].code.as_deref(), Some("unauthenticated"));
        // At shutdown every counted refusal is summarised (b: a new window, 3 written, 4 counted).
        for _ in 0..7 {
            windows.note(b, refusal("unauthenticated"), t0 + Duration::from_secs(1));
        }
        let last = windows.ended(t0, true);
        assert_eq!(last.len(), 1);
        let detail = last[0].detail.as_deref().unwrap();
        assert!(detail.starts_with("4 more"), "{detail}");
    }

    #[tokio::test]
    async fn summaries_are_written_at_shutdown() {
        let store = Arc::new(MemoryStore::new());
        let log = AuditLog::start_with(
            store.clone(),
            RefusalLimits {
                per_peer: 1,
                window: Duration::from_secs(3600),
            },
        );
        let peer: IpAddr = "100.64.0.1".parse().unwrap();
        for _ in 0..4 {
            log.record_refusal(peer, refusal("unauthenticated"))
                .await
                .unwrap();
        }
        log.shutdown();
        let kinds: Vec<_> = store
            .read_audit(&AuditFilter::default())
            .unwrap()
            .into_iter()
            .map(|e| e.event)
            .collect();
        assert_eq!(
            kinds,
            [
                AuditEventKind::CredentialDenied,
                AuditEventKind::RefusalsSummarized
            ]
        );
    }
}
