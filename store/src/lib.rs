//! The broker's persistent state behind one trait: the hash-chained audit log, credential metadata and
//! small namespaced documents. `SledStore` is the embedded default; the trait is the seam for PostgreSQL.
//! `audit::AuditLog` is the group-commit writer in front of it.
//!
//! This is the only crate that depends on sled, so "only the store touches sled" holds by construction.

pub mod audit;
mod auditfile;
mod memory;
mod sled;

use std::path::PathBuf;

use botcreds_proto::audit::{AuditEvent, AuditEventKind};
use sha2::{Digest, Sha256};

pub use self::memory::MemoryStore;
pub use self::sled::SledStore;

/// The hash that the first event of a log chains onto.
pub const GENESIS_HASH: &str = "";

/// Length of a SHA-256 hex digest; stored records start with one.
const HASH_HEX_LEN: usize = 64;

/// Everything the broker keeps across restarts. Implementations are shared between threads.
///
/// Durability: `append_audit` is durable when it returns. `put_credential`, `put_doc` and `delete_doc` are not
/// flushed individually; they reach the disk with the next audit append, the next `flush`, or the backend's own
/// periodic flush, whichever comes first. Callers that need one of them durable on its own call `flush`.
pub trait Store: Send + Sync + 'static {
    /// Append events as one durable batch: assign gap-free `seq` (continuing from the last stored event) and
    /// the chained `hash` = sha256_hex(prev_hash || canonical JSON of the event with hash="" ), insert all, and
    /// flush to disk ONCE before returning. The slice is updated in place with seq and hash.
    ///
    /// All or nothing: on error no event of the batch is acknowledged and the next append reuses the same seqs.
    /// The slice's seq and hash fields are then meaningless.
    fn append_audit(&self, events: &mut [AuditEvent]) -> Result<(), StoreError>;
    /// Events with timestamp >= since, optionally only for one bot / one event kind, in log (seq) order, at most
    /// `limit`. `since` may be any RFC 3339 time; it is compared against the stored UTC `Z` timestamps.
    fn read_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEvent>, StoreError>;
    /// Recompute the chain; report the first broken seq if any.
    fn verify_audit_chain(&self) -> Result<ChainReport, StoreError>;
    /// Credential metadata (never the secret itself).
    fn put_credential(&self, record: &CredentialRecord) -> Result<(), StoreError>;
    fn get_credential(&self, id: &str) -> Result<Option<CredentialRecord>, StoreError>;
    /// All credential records, ordered by id.
    fn list_credentials(&self) -> Result<Vec<CredentialRecord>, StoreError>;
    /// Generic small-document storage for later features (approvals, remembered rules): namespaced keys.
    /// A namespace is non-empty and contains no NUL byte; keys may be any string.
    fn put_doc(&self, namespace: &str, key: &str, value: &[u8]) -> Result<(), StoreError>;
    fn get_doc(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Removing a key that does not exist is not an error.
    fn delete_doc(&self, namespace: &str, key: &str) -> Result<(), StoreError>;
    /// All documents of a namespace, ordered by key.
    fn list_docs(&self, namespace: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Flush everything to disk.
    fn flush(&self) -> Result<(), StoreError>;
}

/// Which audit events to read. `AuditFilter::default()` matches every event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditFilter {
    pub since: Option<String>,
    pub bot: Option<String>,
    pub event: Option<AuditEventKind>,
    pub limit: usize,
    /// Take the newest `limit` matching events (still answered in log order), reading back
    /// from the end of the log and stopping there: a bounded read however long the log is.
    /// With `since`, the walk also stops at the first event older than `since` by more than
    /// [`NEWEST_SINCE_SLACK`] (timestamps are only roughly in seq order).
    pub newest: bool,
}

/// How far out of order a timestamp may be and still be found by a `newest` read with `since`.
pub const NEWEST_SINCE_SLACK: std::time::Duration = std::time::Duration::from_secs(300);

/// Walk events newest first, keeping the newest `limit` that match, in log order.
pub(crate) fn newest_matching(
    filter: &AuditFilter,
    since: Option<&str>,
    newest_first: impl Iterator<Item = Result<AuditEvent, StoreError>>,
) -> Result<Vec<AuditEvent>, StoreError> {
    let stop_before = match since {
        Some(s) => {
            let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map_err(|_| StoreError::InvalidSince(s.to_owned()))?;
            Some(botcreds_proto::audit::rfc3339_millis(
                t - NEWEST_SINCE_SLACK,
            ))
        }
        None => None,
    };
    let mut out = Vec::new();
    for event in newest_first {
        if out.len() >= filter.limit {
            break;
        }
        let event = event?;
        if stop_before
            .as_deref()
            .is_some_and(|stop| event.timestamp.as_str() < stop)
        {
            break;
        }
        if filter.matches(&event, since) {
            out.push(event);
        }
    }
    out.reverse();
    Ok(out)
}

impl Default for AuditFilter {
    fn default() -> AuditFilter {
        AuditFilter {
            since: None,
            bot: None,
            event: None,
            limit: usize::MAX,
            newest: false,
        }
    }
}

impl AuditFilter {
    /// Whether an event passes the bot and kind filters and is not older than `since` (already normalised).
    fn matches(&self, event: &AuditEvent, since: Option<&str>) -> bool {
        since.is_none_or(|since| event.timestamp.as_str() >= since)
            && self
                .bot
                .as_deref()
                .is_none_or(|bot| event.bot.as_deref() == Some(bot))
            && self.event.is_none_or(|kind| event.event == kind)
    }
}

/// The outcome of recomputing the audit chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainReport {
    /// Events stored.
    pub events: u64,
    /// The first seq at which the chain does not hold (missing, unreadable, re-numbered or altered), if any.
    pub first_broken: Option<u64>,
}

/// What the broker remembers about an issued credential. Never the secret itself.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CredentialRecord {
    pub id: String,
    pub kind: String,
    pub bot: Option<String>,
    pub caller: String,
    pub repositories: Vec<String>,
    pub permissions: Vec<String>,
    pub approval: String,
    pub issued_at: String,
    pub expires_at: String,
    pub revoked_at: Option<String>,
}

#[derive(thiserror::Error, Debug)]
pub enum StoreError {
    #[error(
        "data directory {} is locked by another process (is another botcreds broker using it?)",
        dir.display()
    )]
    Locked { dir: PathBuf },
    #[error("data directory {}: {source}", dir.display())]
    DataDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("storage error: {0}")]
    Sled(#[from] ::sled::Error),
    #[error("audit log {}: {source}", path.display())]
    AuditFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("could not encode a record: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("invalid document namespace {0:?}: must be non-empty and contain no NUL byte")]
    InvalidNamespace(String),
    #[error("invalid audit filter: since {0:?} is not an RFC 3339 time")]
    InvalidSince(String),
    /// The backend is unavailable for another reason (used by wrappers and future backends).
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// The last event of the chain, kept in memory so appends need no read.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ChainHead {
    seq: u64,
    hash: String,
}

impl ChainHead {
    fn genesis() -> ChainHead {
        ChainHead {
            seq: 0,
            hash: GENESIS_HASH.to_owned(),
        }
    }
}

/// SHA-256 of `bytes` as lowercase hex: the form of the audit chain's hashes, of stored key hashes and of
/// token names.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// sha256_hex(prev_hash || canonical), hashed incrementally so the record is not copied.
fn chain_hash(prev_hash: &str, canonical: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(prev_hash.as_bytes());
    hasher.update(canonical);
    hex::encode(hasher.finalize())
}

/// Give `event` its place in the chain and return the bytes to store.
///
/// A stored record is the 64-character hex hash followed by the canonical JSON exactly as it was hashed
/// (the event with `hash: ""`). Keeping the hashed bytes, rather than re-serialising on verification, means
/// later additions to `AuditEvent` cannot break the chain of events written before them.
fn seal(event: &mut AuditEvent, head: &mut ChainHead) -> Result<Vec<u8>, StoreError> {
    head.seq += 1;
    event.seq = head.seq;
    event.hash.clear();
    let canonical = serde_json::to_vec(&*event).map_err(StoreError::Encode)?;
    let hash = chain_hash(&head.hash, &canonical);
    let mut record = Vec::with_capacity(HASH_HEX_LEN + canonical.len());
    record.extend_from_slice(hash.as_bytes());
    record.extend_from_slice(&canonical);
    event.hash.clone_from(&hash);
    head.hash = hash;
    Ok(record)
}

/// Split a stored record into its hash and its canonical JSON.
fn split_record(seq: u64, record: &[u8]) -> Result<(&str, &[u8]), StoreError> {
    let corrupt = || StoreError::Corrupt(format!("audit record {seq} has no valid hash prefix"));
    if record.len() < HASH_HEX_LEN {
        return Err(corrupt());
    }
    let (hash, canonical) = record.split_at(HASH_HEX_LEN);
    if !hash.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(corrupt());
    }
    // All bytes are ASCII hex digits, so this cannot fail.
    let hash = std::str::from_utf8(hash).map_err(|_| corrupt())?;
    Ok((hash, canonical))
}

/// Decode a stored record into the event as `append_audit` returned it.
fn decode_event(seq: u64, record: &[u8]) -> Result<AuditEvent, StoreError> {
    let (hash, canonical) = split_record(seq, record)?;
    let mut event: AuditEvent = serde_json::from_slice(canonical).map_err(|e| {
        StoreError::Corrupt(format!("audit record {seq} is not a valid event: {e}"))
    })?;
    if event.seq != seq {
        return Err(StoreError::Corrupt(format!(
            "audit record {seq} claims seq {}",
            event.seq
        )));
    }
    event.hash = hash.to_owned();
    Ok(event)
}

/// Bring `since` into the stored timestamp form (UTC, millisecond precision, `Z`) so that a byte-wise
/// comparison orders correctly even when `since` has no fractional seconds or another offset.
fn normalize_since(since: &str) -> Result<String, StoreError> {
    let t = time::OffsetDateTime::parse(since, &time::format_description::well_known::Rfc3339)
        .map_err(|_| StoreError::InvalidSince(since.to_owned()))?;
    Ok(botcreds_proto::audit::rfc3339_millis(t))
}

fn check_namespace(namespace: &str) -> Result<(), StoreError> {
    if namespace.is_empty() || namespace.contains('\0') {
        return Err(StoreError::InvalidNamespace(namespace.to_owned()));
    }
    Ok(())
}

/// Walks stored records in seq order and remembers where the chain first fails.
struct ChainWalk {
    expected: u64,
    prev_hash: String,
    events: u64,
    first_broken: Option<u64>,
}

impl ChainWalk {
    fn new() -> ChainWalk {
        ChainWalk {
            expected: 1,
            prev_hash: GENESIS_HASH.to_owned(),
            events: 0,
            first_broken: None,
        }
    }

    fn step(&mut self, seq: u64, record: &[u8]) {
        self.events += 1;
        if self.first_broken.is_some() {
            return;
        }
        if seq != self.expected {
            // A missing seq is where the chain breaks.
            self.first_broken = Some(self.expected.min(seq));
            return;
        }
        match Self::link(seq, &self.prev_hash, record) {
            Some(hash) => {
                self.prev_hash = hash;
                self.expected += 1;
            }
            None => self.first_broken = Some(seq),
        }
    }

    /// The stored hash if the record is readable, numbered `seq` and hashes onto `prev_hash`.
    fn link(seq: u64, prev_hash: &str, record: &[u8]) -> Option<String> {
        let (hash, canonical) = split_record(seq, record).ok()?;
        let event: AuditEvent = serde_json::from_slice(canonical).ok()?;
        (event.seq == seq && event.hash.is_empty() && chain_hash(prev_hash, canonical) == hash)
            .then(|| hash.to_owned())
    }

    /// Finish against the head the store holds in memory: a log that ends before the head, or whose last
    /// hash differs from it, lost or changed events at its tail while the store was open.
    fn finish(mut self, head: &ChainHead) -> ChainReport {
        if self.first_broken.is_none() {
            let last = self.expected - 1;
            if last == head.seq {
                if self.prev_hash != head.hash {
                    self.first_broken = Some(head.seq);
                }
            } else {
                self.first_broken = Some(last.min(head.seq) + 1);
            }
        }
        ChainReport {
            events: self.events,
            first_broken: self.first_broken,
        }
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // State behind these mutexes is only assigned once complete, so a panic elsewhere cannot leave it
    // half-updated; carry on rather than poisoning the whole store.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
pub(crate) mod tests {
    //! Behaviour every `Store` must share; each backend's tests call these.

    use super::*;

    pub(crate) fn event(kind: AuditEventKind, timestamp: &str, bot: Option<&str>) -> AuditEvent {
        let mut event = AuditEvent::new(kind, timestamp.to_owned());
        event.bot = bot.map(str::to_owned);
        event
    }

    pub(crate) fn credential(id: &str) -> CredentialRecord {
        CredentialRecord {
            id: id.to_owned(),
            kind: "github_token".to_owned(),
            bot: Some("machina-bot".to_owned()),
            caller: "tailnet:machina-bot".to_owned(),
            repositories: vec!["myorg/repo-a".to_owned()],
            permissions: vec!["contents:write".to_owned()],
            approval: "auto".to_owned(),
            issued_at: "2026-02-17T14:00:00Z".to_owned(),
            expires_at: "2026-02-17T15:00:00Z".to_owned(),
            revoked_at: None,
        }
    }

    fn seqs(events: &[AuditEvent]) -> Vec<u64> {
        events.iter().map(|e| e.seq).collect()
    }

    pub(crate) fn appends_are_gap_free_and_chained(store: &dyn Store) {
        let mut first = vec![
            event(
                AuditEventKind::CredentialRequested,
                "2026-02-17T14:00:00.000Z",
                Some("a"),
            ),
            event(
                AuditEventKind::CredentialIssued,
                "2026-02-17T14:00:00.100Z",
                Some("a"),
            ),
        ];
        store.append_audit(&mut first).unwrap();
        assert_eq!(seqs(&first), [1, 2]);
        let mut empty: Vec<AuditEvent> = Vec::new();
        store.append_audit(&mut empty).unwrap();
        let mut second = vec![event(
            AuditEventKind::CredentialDenied,
            "2026-02-17T14:00:01.000Z",
            Some("b"),
        )];
        store.append_audit(&mut second).unwrap();
        assert_eq!(seqs(&second), [3]);

        // The hash is exactly sha256_hex(prev_hash || JSON of the event with hash "").
        let mut prev = GENESIS_HASH.to_owned();
        for e in first.iter().chain(&second) {
            let mut blank = e.clone();
            blank.hash.clear();
            let mut input = prev.clone().into_bytes();
            input.extend(serde_json::to_vec(&blank).unwrap());
            assert_eq!(e.hash, crate::sha256_hex(&input), "seq {}", e.seq);
            prev.clone_from(&e.hash);
        }

        let stored = store.read_audit(&AuditFilter::default()).unwrap();
        assert_eq!(stored, [first, second].concat());
        assert_eq!(
            store.verify_audit_chain().unwrap(),
            ChainReport {
                events: 3,
                first_broken: None
            }
        );
    }

    pub(crate) fn filters_select_and_limit(store: &dyn Store) {
        use AuditEventKind::*;
        let mut events = vec![
            event(CredentialRequested, "2026-02-17T13:59:59.999Z", Some("a")),
            event(CredentialIssued, "2026-02-17T14:00:00.000Z", Some("a")),
            event(CredentialRequested, "2026-02-17T14:00:00.500Z", Some("b")),
            event(CredentialDenied, "2026-02-17T14:00:02.000Z", Some("b")),
            event(PolicyLoaded, "2026-02-17T14:00:03.000Z", None),
            // Recorded later but stamped earlier (a slow request): still found by `since`, in log order.
            event(CredentialIssued, "2026-02-17T14:00:01.000Z", Some("a")),
        ];
        store.append_audit(&mut events).unwrap();
        let read = |filter: AuditFilter| seqs(&store.read_audit(&filter).unwrap());

        assert_eq!(read(AuditFilter::default()), [1, 2, 3, 4, 5, 6]);
        // `since` without fractional seconds still includes events within that second.
        let since = |s: &str| AuditFilter {
            since: Some(s.to_owned()),
            ..AuditFilter::default()
        };
        assert_eq!(read(since("2026-02-17T14:00:00Z")), [2, 3, 4, 5, 6]);
        assert_eq!(read(since("2026-02-17T14:00:00.600Z")), [4, 5, 6]);
        // Other offsets are converted to UTC.
        assert_eq!(read(since("2026-02-17T16:00:01.5+02:00")), [4, 5]);
        assert_eq!(read(since("2026-02-18T00:00:00Z")), Vec::<u64>::new());
        assert!(matches!(
            store.read_audit(&since("yesterday")),
            Err(StoreError::InvalidSince(_))
        ));

        let bot = AuditFilter {
            bot: Some("a".to_owned()),
            ..AuditFilter::default()
        };
        assert_eq!(read(bot.clone()), [1, 2, 6]);
        let kind = AuditFilter {
            event: Some(CredentialIssued),
            ..AuditFilter::default()
        };
        assert_eq!(read(kind), [2, 6]);
        let all_three = AuditFilter {
            since: Some("2026-02-17T14:00:00.001Z".to_owned()),
            event: Some(CredentialIssued),
            ..bot.clone()
        };
        assert_eq!(read(all_three), [6]);
        assert_eq!(
            read(AuditFilter {
                limit: 2,
                ..bot.clone()
            }),
            [1, 2]
        );
        assert_eq!(
            read(AuditFilter {
                limit: 2,
                ..since("2026-02-17T14:00:00.600Z")
            }),
            [4, 5]
        );
        assert_eq!(
            read(AuditFilter {
                limit: 0,
                ..AuditFilter::default()
            }),
            Vec::<u64>::new()
        );
        // web_audit_reads_the_whole_log: the newest few, read back from the end.
        let newest = |limit: usize, base: AuditFilter| AuditFilter {
            limit,
            newest: true,
            ..base
        };
        assert_eq!(read(newest(2, AuditFilter::default())), [5, 6]);
        assert_eq!(read(newest(2, bot.clone())), [2, 6]);
        assert_eq!(
            read(newest(10, since("2026-02-17T14:00:00.600Z"))),
            [4, 5, 6]
        );
        assert_eq!(read(newest(0, AuditFilter::default())), Vec::<u64>::new());
    }

    pub(crate) fn credentials_round_trip(store: &dyn Store) {
        assert_eq!(store.get_credential("c1").unwrap(), None);
        assert!(store.list_credentials().unwrap().is_empty());
        let mut c2 = credential("c2");
        store.put_credential(&c2).unwrap();
        store.put_credential(&credential("c1")).unwrap();
        assert_eq!(store.get_credential("c2").unwrap(), Some(c2.clone()));
        c2.revoked_at = Some("2026-02-17T14:30:00Z".to_owned());
        c2.bot = None;
        store.put_credential(&c2).unwrap();
        assert_eq!(
            store.list_credentials().unwrap(),
            vec![credential("c1"), c2]
        );
    }

    pub(crate) fn docs_round_trip(store: &dyn Store) {
        store.put_doc("approvals", "b", b"two").unwrap();
        store.put_doc("approvals", "a", b"one").unwrap();
        // A namespace that is a prefix of another must not see the other's documents.
        store.put_doc("approval", "x", b"other").unwrap();
        store.put_doc("rules", "a", b"rule").unwrap();
        store.put_doc("approvals", "a", b"uno").unwrap();
        assert_eq!(
            store.get_doc("approvals", "a").unwrap().as_deref(),
            Some(&b"uno"[..])
        );
        assert_eq!(store.get_doc("approvals", "c").unwrap(), None);
        assert_eq!(
            store.list_docs("approvals").unwrap(),
            vec![
                ("a".to_owned(), b"uno".to_vec()),
                ("b".to_owned(), b"two".to_vec())
            ]
        );
        store.delete_doc("approvals", "a").unwrap();
        store.delete_doc("approvals", "never-there").unwrap();
        assert_eq!(store.get_doc("approvals", "a").unwrap(), None);
        assert_eq!(
            store.list_docs("approvals").unwrap(),
            vec![("b".to_owned(), b"two".to_vec())]
        );
        assert_eq!(
            store.list_docs("approval").unwrap(),
            vec![("x".to_owned(), b"other".to_vec())]
        );
        assert!(store.list_docs("nothing").unwrap().is_empty());
        for bad in ["", "a\0b"] {
            assert!(matches!(
                store.put_doc(bad, "k", b"v"),
                Err(StoreError::InvalidNamespace(_))
            ));
            assert!(matches!(
                store.list_docs(bad),
                Err(StoreError::InvalidNamespace(_))
            ));
        }
        store.flush().unwrap();
    }

    #[test]
    fn chain_walk_reports_the_first_break() {
        let mut head = ChainHead::genesis();
        let records: Vec<Vec<u8>> = (0..4)
            .map(|i| {
                let mut e = event(AuditEventKind::BrokerStarted, &format!("t{i}"), None);
                seal(&mut e, &mut head).unwrap()
            })
            .collect();
        let walk = |entries: &[(u64, &Vec<u8>)], head: &ChainHead| {
            let mut walk = ChainWalk::new();
            for (seq, record) in entries {
                walk.step(*seq, record);
            }
            walk.finish(head)
        };
        let all: Vec<(u64, &Vec<u8>)> = (1..=4).zip(&records).collect();
        assert_eq!(walk(&all, &head).first_broken, None);
        // A gap breaks at the missing seq.
        let gap = [all[0], all[1], all[3]];
        assert_eq!(walk(&gap, &head).first_broken, Some(3));
        // A lost tail breaks after the last stored event.
        assert_eq!(
            walk(&all[..3], &head),
            ChainReport {
                events: 3,
                first_broken: Some(4)
            }
        );
        // A record under another key breaks where it sits.
        let swapped = [all[0], (2, &records[2]), all[2], all[3]];
        assert_eq!(walk(&swapped, &head).first_broken, Some(2));
        // An unreadable record breaks where it sits.
        let garbage = b"not a record".to_vec();
        let unreadable = [all[0], (2, &garbage), all[2], all[3]];
        assert_eq!(walk(&unreadable, &head).first_broken, Some(2));
        // An empty log with a genesis head is whole.
        assert_eq!(
            walk(&[], &ChainHead::genesis()),
            ChainReport {
                events: 0,
                first_broken: None
            }
        );
    }
}
