//! The embedded default `Store`: sled in the broker's data directory.
//!
//! Trees: `audit` (big-endian seq → record), `audit_by_time` (timestamp, NUL, big-endian seq → empty; the
//! index behind `--since`), `credentials` (id → JSON) and `docs` (namespace, NUL, key → bytes).

use std::convert::Infallible;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ::sled::transaction::{ConflictableTransactionResult, TransactionError};
use ::sled::{Db, Transactional, Tree};
use botcreds_proto::audit::AuditEvent;

use super::{
    AuditFilter, ChainHead, ChainReport, ChainWalk, CredentialRecord, Store, StoreError,
    check_namespace, decode_event, lock, normalize_since, seal, split_record,
};

/// sled's page cache. Its default is 1 GiB; the broker's whole RSS target under load is 64 MiB.
const CACHE_CAPACITY: u64 = 16 * 1024 * 1024;

const AUDIT_TREE: &str = "audit";
const AUDIT_BY_TIME_TREE: &str = "audit_by_time";
const CREDENTIALS_TREE: &str = "credentials";
const DOCS_TREE: &str = "docs";

#[derive(Clone, Copy)]
enum AuditWrite {
    Insert,
    Withdraw,
}

pub struct SledStore {
    dir: PathBuf,
    db: Db,
    audit: Tree,
    audit_by_time: Tree,
    credentials: Tree,
    docs: Tree,
    /// The chain's last event. Held across a whole append so that seqs are assigned in commit order.
    head: Mutex<ChainHead>,
}

impl fmt::Debug for SledStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledStore")
            .field("dir", &self.dir)
            .field("audit_seq", &lock(&self.head).seq)
            .finish_non_exhaustive()
    }
}

impl SledStore {
    /// Open (creating if missing, mode 0700) the data directory. Fails with [`StoreError::Locked`] while
    /// another process has it open.
    pub fn open(dir: &Path) -> Result<SledStore, StoreError> {
        ensure_private_dir(dir)?;
        let db = ::sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_CAPACITY)
            .open()
            .map_err(|e| open_error(dir, e))?;
        let audit = db.open_tree(AUDIT_TREE)?;
        let head = match audit.last()? {
            None => ChainHead::genesis(),
            Some((key, record)) => {
                let seq = seq_from_key(&key)?;
                let (hash, _) = split_record(seq, &record)?;
                ChainHead {
                    seq,
                    hash: hash.to_owned(),
                }
            }
        };
        tracing::debug!(dir = %dir.display(), audit_seq = head.seq, "store opened");
        Ok(SledStore {
            dir: dir.to_owned(),
            audit,
            audit_by_time: db.open_tree(AUDIT_BY_TIME_TREE)?,
            credentials: db.open_tree(CREDENTIALS_TREE)?,
            docs: db.open_tree(DOCS_TREE)?,
            db,
            head: Mutex::new(head),
        })
    }

    /// Write records (seq, time index key, record) to both audit trees atomically, or take them out again.
    fn write_audit(
        &self,
        records: &[(u64, Vec<u8>, Vec<u8>)],
        write: AuditWrite,
    ) -> Result<(), StoreError> {
        (&self.audit, &self.audit_by_time)
            .transaction(
                |(audit, by_time)| -> ConflictableTransactionResult<(), Infallible> {
                    for (seq, time_key, record) in records {
                        let key = seq.to_be_bytes();
                        match write {
                            AuditWrite::Insert => {
                                audit.insert(&key, record.as_slice())?;
                                by_time.insert(time_key.as_slice(), &[][..])?;
                            }
                            AuditWrite::Withdraw => {
                                audit.remove(&key)?;
                                by_time.remove(time_key.as_slice())?;
                            }
                        }
                    }
                    Ok(())
                },
            )
            .map_err(|e| match e {
                TransactionError::Storage(e) => StoreError::Sled(e),
                TransactionError::Abort(never) => match never {},
            })
    }

    fn read_record(&self, seq: u64) -> Result<Option<AuditEvent>, StoreError> {
        self.audit
            .get(seq.to_be_bytes())?
            .map(|record| decode_event(seq, &record))
            .transpose()
    }
}

impl Store for SledStore {
    fn append_audit(&self, events: &mut [AuditEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut head = lock(&self.head);
        let mut next = head.clone();
        let mut records = Vec::with_capacity(events.len());
        for event in events.iter_mut() {
            let record = seal(event, &mut next)?;
            records.push((event.seq, time_key(&event.timestamp, event.seq), record));
        }
        self.write_audit(&records, AuditWrite::Insert)?;
        if let Err(e) = self.db.flush() {
            // Nobody will be told these events were recorded, so take them out again; the next batch reuses
            // their seqs. If the removal itself cannot be written either, a crash may leave them on disk: the
            // log may then hold events whose callers saw an error, but never lacks one whose caller saw success.
            if let Err(undo) = self.write_audit(&records, AuditWrite::Withdraw) {
                tracing::error!(error = %undo, "could not withdraw an unflushed audit batch");
            }
            return Err(e.into());
        }
        *head = next;
        Ok(())
    }

    fn read_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEvent>, StoreError> {
        let since = filter.since.as_deref().map(normalize_since).transpose()?;
        let mut out = Vec::new();
        if filter.limit == 0 {
            return Ok(out);
        }
        if filter.newest {
            let events = self.audit.iter().rev().map(|entry| {
                let (key, record) = entry?;
                decode_event(seq_from_key(&key)?, &record)
            });
            return super::newest_matching(filter, since.as_deref(), events);
        }
        match since.as_deref() {
            Some(since) => {
                // Timestamps come from the callers, so they are only roughly in seq order: take every seq
                // the time index has from `since` on, then return those events in log order.
                let mut seqs = Vec::new();
                for entry in self.audit_by_time.range(since.as_bytes()..) {
                    let (key, _) = entry?;
                    seqs.push(seq_from_time_key(&key)?);
                }
                seqs.sort_unstable();
                for seq in seqs {
                    let Some(event) = self.read_record(seq)? else {
                        continue;
                    };
                    if filter.matches(&event, Some(since)) {
                        out.push(event);
                        if out.len() >= filter.limit {
                            break;
                        }
                    }
                }
            }
            None => {
                for entry in self.audit.iter() {
                    let (key, record) = entry?;
                    let event = decode_event(seq_from_key(&key)?, &record)?;
                    if filter.matches(&event, None) {
                        out.push(event);
                        if out.len() >= filter.limit {
                            break;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    fn verify_audit_chain(&self) -> Result<ChainReport, StoreError> {
        // Verify up to the head as of now; appends may continue meanwhile without blocking on this walk.
        let head = lock(&self.head).clone();
        let mut walk = ChainWalk::new();
        for entry in self.audit.range(..=head.seq.to_be_bytes()) {
            let (key, record) = entry?;
            match seq_from_key(&key) {
                Ok(seq) => walk.step(seq, &record),
                Err(_) => walk.unreadable(),
            }
        }
        Ok(walk.finish(&head))
    }

    fn put_credential(&self, record: &CredentialRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(record).map_err(StoreError::Encode)?;
        self.credentials.insert(record.id.as_bytes(), value)?;
        Ok(())
    }

    fn get_credential(&self, id: &str) -> Result<Option<CredentialRecord>, StoreError> {
        self.credentials
            .get(id.as_bytes())?
            .map(|value| decode_credential(&value))
            .transpose()
    }

    fn list_credentials(&self) -> Result<Vec<CredentialRecord>, StoreError> {
        self.credentials
            .iter()
            .values()
            .map(|value| decode_credential(&value?))
            .collect()
    }

    fn put_doc(&self, namespace: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.docs.insert(doc_key(namespace, key)?, value)?;
        Ok(())
    }

    fn get_doc(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.docs.get(doc_key(namespace, key)?)?.map(|v| v.to_vec()))
    }

    fn delete_doc(&self, namespace: &str, key: &str) -> Result<(), StoreError> {
        self.docs.remove(doc_key(namespace, key)?)?;
        Ok(())
    }

    fn list_docs(&self, namespace: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = doc_key(namespace, "")?;
        self.docs
            .scan_prefix(&prefix)
            .map(|entry| {
                let (key, value) = entry?;
                let key = String::from_utf8(key[prefix.len()..].to_vec()).map_err(|_| {
                    StoreError::Corrupt(format!(
                        "document key in namespace {namespace:?} is not UTF-8"
                    ))
                })?;
                Ok((key, value.to_vec()))
            })
            .collect()
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

/// Create the data directory owner-only if it is missing; warn if an existing one is open to others.
fn ensure_private_dir(dir: &Path) -> Result<(), StoreError> {
    let dir_error = |source| StoreError::DataDir {
        dir: dir.to_owned(),
        source,
    };
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    dir = %dir.display(),
                    mode = format_args!("{mode:o}"),
                    "data directory is accessible to other users; expected 0700"
                );
            }
            Ok(())
        }
        Ok(_) => Err(dir_error(io::Error::new(
            io::ErrorKind::NotADirectory,
            "exists and is not a directory",
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(dir_error)?;
            // The umask may have taken bits away from 0700; set it exactly.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(dir_error)
        }
        Err(e) => Err(dir_error(e)),
    }
}

/// sled 0.34 reports a held lock only as an `Other` I/O error with this message (sled is pinned, so it holds).
fn open_error(dir: &Path, e: ::sled::Error) -> StoreError {
    match e {
        ::sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            StoreError::Locked {
                dir: dir.to_owned(),
            }
        }
        other => StoreError::Sled(other),
    }
}

fn seq_from_key(key: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(key)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt(format!("audit key of {} bytes is not a seq", key.len())))
}

fn time_key(timestamp: &str, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(timestamp.len() + 9);
    key.extend_from_slice(timestamp.as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn seq_from_time_key(key: &[u8]) -> Result<u64, StoreError> {
    key.len()
        .checked_sub(8)
        .and_then(|at| <[u8; 8]>::try_from(&key[at..]).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt("audit time index key is too short".to_owned()))
}

fn doc_key(namespace: &str, key: &str) -> Result<Vec<u8>, StoreError> {
    check_namespace(namespace)?;
    let mut out = Vec::with_capacity(namespace.len() + 1 + key.len());
    out.extend_from_slice(namespace.as_bytes());
    out.push(0);
    out.extend_from_slice(key.as_bytes());
    Ok(out)
}

fn decode_credential(value: &[u8]) -> Result<CredentialRecord, StoreError> {
    serde_json::from_slice(value)
        .map_err(|e| StoreError::Corrupt(format!("credential record is not valid JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests as conformance;
    use botcreds_proto::audit::AuditEventKind;

    fn open_temp() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("data")).unwrap();
        (dir, store)
    }

    fn issued(i: u64) -> AuditEvent {
        conformance::event(
            AuditEventKind::CredentialIssued,
            &format!("2026-02-17T14:00:{:02}.000Z", i % 60),
            Some("machina-bot"),
        )
    }

    /// Overwrite the stored record of `seq` with `f` applied to it, straight in the sled tree.
    fn rewrite(store: &SledStore, seq: u64, f: impl FnOnce(String) -> String) {
        let key = seq.to_be_bytes();
        let record = store.audit.get(key).unwrap().unwrap();
        let record = f(String::from_utf8(record.to_vec()).unwrap());
        store.audit.insert(key, record.as_bytes()).unwrap();
    }

    #[test]
    fn appends_are_gap_free_and_chained() {
        conformance::appends_are_gap_free_and_chained(&open_temp().1);
    }

    #[test]
    fn filters_select_and_limit() {
        conformance::filters_select_and_limit(&open_temp().1);
    }

    #[test]
    fn credentials_round_trip() {
        conformance::credentials_round_trip(&open_temp().1);
    }

    #[test]
    fn docs_round_trip() {
        conformance::docs_round_trip(&open_temp().1);
    }

    #[test]
    fn seq_and_chain_continue_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let mut first: Vec<AuditEvent> = (0..3).map(issued).collect();
        {
            let store = SledStore::open(&path).unwrap();
            store.append_audit(&mut first).unwrap();
            store
                .put_credential(&conformance::credential("c1"))
                .unwrap();
            store.put_doc("rules", "r1", b"remembered").unwrap();
            store.flush().unwrap();
        }
        let store = SledStore::open(&path).unwrap();
        let mut second: Vec<AuditEvent> = (3..5).map(issued).collect();
        store.append_audit(&mut second).unwrap();
        assert_eq!(second.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5]);
        let all = store.read_audit(&AuditFilter::default()).unwrap();
        assert_eq!(all, [first, second].concat());
        assert_eq!(
            store.verify_audit_chain().unwrap(),
            ChainReport {
                events: 5,
                first_broken: None
            }
        );
        assert_eq!(
            store.get_credential("c1").unwrap(),
            Some(conformance::credential("c1"))
        );
        assert_eq!(
            store.get_doc("rules", "r1").unwrap().as_deref(),
            Some(&b"remembered"[..])
        );
    }

    #[test]
    fn tampering_with_a_stored_event_is_detected_at_its_seq() {
        let (_dir, store) = open_temp();
        let mut events: Vec<AuditEvent> = (0..5).map(issued).collect();
        store.append_audit(&mut events).unwrap();
        assert_eq!(store.verify_audit_chain().unwrap().first_broken, None);

        // Change who got the token, keep the stored hash.
        rewrite(&store, 3, |r| {
            r.replace("\"bot\":\"machina-bot\"", "\"bot\":\"other-bot\"")
        });
        assert_eq!(
            store.verify_audit_chain().unwrap(),
            ChainReport {
                events: 5,
                first_broken: Some(3)
            }
        );
        // Reading still works and shows the altered record: detection is the verifier's job.
        let read = store.read_audit(&AuditFilter::default()).unwrap();
        assert_eq!(read[2].bot.as_deref(), Some("other-bot"));
    }

    #[test]
    fn tampering_that_rehashes_the_event_breaks_the_next_link() {
        let (_dir, store) = open_temp();
        let mut events: Vec<AuditEvent> = (0..5).map(issued).collect();
        store.append_audit(&mut events).unwrap();
        // A careful forger recomputes event 2's own hash; event 3 still chains onto the old one.
        let mut forged = events[1].clone();
        forged.bot = Some("other-bot".to_owned());
        let mut head = ChainHead {
            seq: 1,
            hash: events[0].hash.clone(),
        };
        let record = seal(&mut forged, &mut head).unwrap();
        store.audit.insert(2u64.to_be_bytes(), record).unwrap();
        assert_eq!(store.verify_audit_chain().unwrap().first_broken, Some(3));
    }

    #[test]
    fn removed_events_are_detected() {
        let (_dir, store) = open_temp();
        let mut events: Vec<AuditEvent> = (0..5).map(issued).collect();
        store.append_audit(&mut events).unwrap();
        let second = store.audit.remove(2u64.to_be_bytes()).unwrap().unwrap();
        assert_eq!(
            store.verify_audit_chain().unwrap(),
            ChainReport {
                events: 4,
                first_broken: Some(2)
            }
        );
        store.audit.insert(2u64.to_be_bytes(), second).unwrap();
        assert_eq!(store.verify_audit_chain().unwrap().first_broken, None);
        // A tail lost while the store is open is reported after the last stored event.
        store.audit.remove(5u64.to_be_bytes()).unwrap();
        assert_eq!(
            store.verify_audit_chain().unwrap(),
            ChainReport {
                events: 4,
                first_broken: Some(5)
            }
        );
    }

    #[test]
    fn data_dir_is_created_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested").join("data");
        let _store = SledStore::open(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "mode {mode:o}");
    }

    #[test]
    fn data_dir_that_is_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        fs::write(&path, b"").unwrap();
        let err = SledStore::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::DataDir { .. }), "{err:?}");
    }

    #[test]
    fn second_open_of_a_held_data_dir_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let _held = SledStore::open(&path).unwrap();
        let err = SledStore::open(&path).unwrap_err();
        assert!(
            matches!(&err, StoreError::Locked { dir } if *dir == path),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains("locked by another process"), "{message}");
        assert!(message.contains(&path.display().to_string()), "{message}");
    }
}
