//! The durable audit log: events from concurrent requests are grouped into one store append and one flush.
//!
//! One dedicated writer thread takes whatever is queued, appends it with a single `Store::append_audit` call
//! (one fsync), then answers every waiter. N concurrent requests therefore cost one fsync, not N. A caller
//! that gets an error must not hand out the credential the events describe.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;

use botcreds_proto::audit::AuditEvent;
use tokio::sync::{mpsc, oneshot};

use crate::store::{AuditFilter, Store, StoreError};

/// Most events one batch takes from the queue; bounds the latency of the requests at its front.
const MAX_BATCH_EVENTS: usize = 4096;

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
    /// Start the writer thread over `store`.
    pub fn start(store: Arc<dyn Store>) -> AuditLog {
        // The queue is unbounded because its depth is bounded upstream: every entry is a request that the
        // HTTP layer's concurrency limit admitted and that is now waiting for its answer.
        let (tx, rx) = mpsc::unbounded_channel();
        let writer_store = Arc::clone(&store);
        let writer = std::thread::Builder::new()
            .name("botcreds-audit".to_owned())
            .spawn(move || run_writer(&*writer_store, rx))
            // Thread creation fails only when the OS is out of threads or memory, and only at startup.
            .expect("spawn the audit writer thread");
        AuditLog {
            inner: Arc::new(Inner {
                store,
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

fn run_writer(store: &dyn Store, mut queue: mpsc::UnboundedReceiver<Pending>) {
    let mut batch: Vec<Pending> = Vec::new();
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
        commit(store, &mut batch, count);
    }
    tracing::debug!("audit writer stopped");
}

/// Append one batch and answer all of its waiters, all with success or all with the same error.
fn commit(store: &dyn Store, batch: &mut Vec<Pending>, count: usize) {
    let mut events = Vec::with_capacity(count);
    let mut waiters = Vec::with_capacity(batch.len());
    for pending in batch.drain(..) {
        waiters.push((pending.events.len(), pending.reply));
        events.extend(pending.events);
    }
    match store.append_audit(&mut events) {
        Ok(()) => {
            tracing::debug!(
                events = count,
                requests = waiters.len(),
                "audit batch committed"
            );
            let mut events = events.into_iter();
            for (len, reply) in waiters {
                // A waiter that gave up still had its events recorded; nobody is left to tell.
                let _ = reply.send(Ok(events.by_ref().take(len).collect()));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, events = count, requests = waiters.len(), "audit batch failed");
            let e = Arc::new(e);
            for (_, reply) in waiters {
                let _ = reply.send(Err(AuditError::Store(Arc::clone(&e))));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc as std_mpsc;

    use botcreds_proto::audit::AuditEventKind;

    use super::*;
    use crate::store::{ChainReport, CredentialRecord, MemoryStore};

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
}
