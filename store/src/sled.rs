//! The embedded default `Store`: sled in the broker's data directory for credentials and documents, and
//! the audit log as append-only JSON-lines segments in `data_dir/audit/` (see `auditfile`).
//!
//! Trees: `credentials` (id → JSON) and `docs` (namespace, NUL, key → bytes). Brokers before the file log
//! kept the audit log in sled (`audit`: big-endian seq → record, `audit_by_time`: its time index); `open`
//! moves such a log into the files and then empties those trees.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use ::sled::{Db, Tree};
use botcreds_proto::audit::AuditEvent;

use super::auditfile::{AuditFile, SEGMENT_BYTES};
use super::{
    AuditFilter, ChainHead, ChainReport, ChainWalk, CredentialRecord, Store, StoreError,
    check_namespace, decode_event, split_record,
};

/// sled's page cache. Its default is 1 GiB; sled now holds only credentials and documents.
const CACHE_CAPACITY: u64 = 4 * 1024 * 1024;

/// The audit log's directory inside the data directory.
const AUDIT_DIR: &str = "audit";
/// Trees of the audit log before it moved to files; emptied by the migration at open.
const AUDIT_TREE: &str = "audit";
const AUDIT_BY_TIME_TREE: &str = "audit_by_time";
const CREDENTIALS_TREE: &str = "credentials";
const DOCS_TREE: &str = "docs";

/// How many bytes of old records the migration copies per durable batch.
const MIGRATION_BATCH_BYTES: usize = 4 * 1024 * 1024;

pub struct SledStore {
    dir: PathBuf,
    db: Db,
    audit: AuditFile,
    credentials: Tree,
    docs: Tree,
    /// A credential or document was written since sled was last flushed; the next audit append flushes it
    /// (the trait's durability contract).
    unflushed: AtomicBool,
}

impl fmt::Debug for SledStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledStore")
            .field("dir", &self.dir)
            .field("audit_seq", &self.audit.head().seq)
            .finish_non_exhaustive()
    }
}

impl SledStore {
    /// Open (creating if missing, mode 0700) the data directory. Fails with [`StoreError::Locked`] while
    /// another process has it open.
    pub fn open(dir: &Path) -> Result<SledStore, StoreError> {
        Self::open_with(dir, SEGMENT_BYTES)
    }

    fn open_with(dir: &Path, segment_bytes: u64) -> Result<SledStore, StoreError> {
        ensure_private_dir(dir)?;
        // sled's lock on the directory also guards the audit files: open it first.
        let db = ::sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_CAPACITY)
            .open()
            .map_err(|e| open_error(dir, e))?;
        let audit = AuditFile::open(&dir.join(AUDIT_DIR), segment_bytes)?;
        migrate_sled_audit(&db, &audit)?;
        tracing::debug!(dir = %dir.display(), audit_seq = audit.head().seq, "store opened");
        Ok(SledStore {
            dir: dir.to_owned(),
            audit,
            credentials: db.open_tree(CREDENTIALS_TREE)?,
            docs: db.open_tree(DOCS_TREE)?,
            db,
            unflushed: AtomicBool::new(false),
        })
    }

    /// A store whose audit segments rotate after `segment_bytes`, to test rotation with little data.
    #[cfg(test)]
    pub(crate) fn open_with_segment_bytes(dir: &Path, segment_bytes: u64) -> SledStore {
        Self::open_with(dir, segment_bytes).unwrap()
    }

    fn flush_sled(&self) -> Result<(), StoreError> {
        if self.unflushed.swap(false, Ordering::SeqCst)
            && let Err(e) = self.db.flush()
        {
            self.unflushed.store(true, Ordering::SeqCst);
            return Err(e.into());
        }
        Ok(())
    }
}

/// Move an audit log kept in sled by an older broker into the file log: every event in seq order with its
/// seq and hash, each link verified, flushed, and only then the sled trees emptied. An interrupted
/// migration is finished by the next open: the file log then holds a prefix of the sled log.
fn migrate_sled_audit(db: &Db, log: &AuditFile) -> Result<(), StoreError> {
    let old = db.open_tree(AUDIT_TREE)?;
    let by_time = db.open_tree(AUDIT_BY_TIME_TREE)?;
    if old.is_empty() {
        if !by_time.is_empty() {
            // Interrupted between the two clears below.
            by_time.clear()?;
            db.flush()?;
        }
        return Ok(());
    }
    let start = log.head();
    let mismatch = |what: String| {
        StoreError::Corrupt(format!(
            "cannot move the audit log from sled to {}: {what}; the sled log is left as it was",
            AUDIT_DIR
        ))
    };
    let mut head = start.clone();
    let mut found_start = start.seq == 0;
    let mut batch: Vec<Vec<u8>> = Vec::new();
    let mut batch_bytes = 0;
    let mut max_timestamp: Option<String> = None;
    let mut moved = 0u64;
    for entry in old.iter() {
        let (key, record) = entry?;
        let seq = seq_from_key(&key)?;
        if seq < start.seq {
            continue;
        }
        if seq == start.seq {
            // Copied by an interrupted run: it must be the very event the file log ends with.
            let (hash, _) = split_record(seq, &record)?;
            if hash != start.hash {
                return Err(mismatch(format!(
                    "event {seq} differs between sled and the file log"
                )));
            }
            found_start = true;
            continue;
        }
        if !found_start {
            return Err(mismatch(format!(
                "the file log ends at seq {} which sled does not hold",
                start.seq
            )));
        }
        if seq != head.seq + 1 {
            return Err(mismatch(format!("seq {} is missing", head.seq + 1)));
        }
        let hash = ChainWalk::link(seq, &head.hash, &record)
            .ok_or_else(|| mismatch(format!("the chain is broken at seq {seq}")))?;
        let event = decode_event(seq, &record)?;
        if max_timestamp
            .as_deref()
            .is_none_or(|max| event.timestamp.as_str() > max)
        {
            max_timestamp = Some(event.timestamp);
        }
        head = ChainHead { seq, hash };
        batch_bytes += record.len();
        batch.push(record.to_vec());
        moved += 1;
        if batch_bytes >= MIGRATION_BATCH_BYTES {
            log.append_records(&batch, head.clone(), max_timestamp.as_deref())?;
            batch.clear();
            batch_bytes = 0;
            max_timestamp = None;
        }
    }
    if !found_start {
        return Err(mismatch(format!(
            "the file log ends at seq {} which sled does not hold",
            start.seq
        )));
    }
    log.append_records(&batch, head.clone(), max_timestamp.as_deref())?;
    old.clear()?;
    by_time.clear()?;
    db.flush()?;
    tracing::info!(
        events = moved,
        audit_seq = head.seq,
        "moved the audit log from sled into {AUDIT_DIR}/"
    );
    Ok(())
}

impl Store for SledStore {
    fn append_audit(&self, events: &mut [AuditEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        // Credentials and documents written before these events are durable before the events are.
        self.flush_sled()?;
        self.audit.append(events)
    }

    fn read_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEvent>, StoreError> {
        self.audit.read(filter)
    }

    fn verify_audit_chain(&self) -> Result<ChainReport, StoreError> {
        self.audit.verify()
    }

    fn put_credential(&self, record: &CredentialRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(record).map_err(StoreError::Encode)?;
        self.credentials.insert(record.id.as_bytes(), value)?;
        self.unflushed.store(true, Ordering::SeqCst);
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
        self.unflushed.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn get_doc(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.docs.get(doc_key(namespace, key)?)?.map(|v| v.to_vec()))
    }

    fn delete_doc(&self, namespace: &str, key: &str) -> Result<(), StoreError> {
        self.docs.remove(doc_key(namespace, key)?)?;
        self.unflushed.store(true, Ordering::SeqCst);
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
        // The audit log is flushed by every append; sled holds the rest.
        self.unflushed.store(false, Ordering::SeqCst);
        if let Err(e) = self.db.flush() {
            self.unflushed.store(true, Ordering::SeqCst);
            return Err(e.into());
        }
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
    use crate::auditfile::push_line;
    use crate::seal;
    use crate::tests as conformance;
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

    /// The audit log's only segment in a test store.
    fn segment(store: &SledStore) -> PathBuf {
        let mut files: Vec<PathBuf> = fs::read_dir(store.dir.join(AUDIT_DIR))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        files.pop().unwrap()
    }

    /// Edit the stored lines of the audit log in place, straight in its file.
    fn edit_lines(store: &SledStore, f: impl FnOnce(&mut Vec<String>)) {
        let path = segment(store);
        let text = fs::read_to_string(&path).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        f(&mut lines);
        let mut text = lines.join("\n");
        text.push('\n');
        fs::write(&path, text).unwrap();
    }

    /// Overwrite the stored line of `seq` with `f` applied to it.
    fn rewrite(store: &SledStore, seq: u64, f: impl FnOnce(String) -> String) {
        edit_lines(store, |lines| {
            let i = usize::try_from(seq - 1).unwrap();
            lines[i] = f(std::mem::take(&mut lines[i]));
        });
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
            let store = reopen(&path).unwrap();
            store.append_audit(&mut first).unwrap();
            store
                .put_credential(&conformance::credential("c1"))
                .unwrap();
            store.put_doc("rules", "r1", b"remembered").unwrap();
            store.flush().unwrap();
        }
        let store = reopen(&path).unwrap();
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
        let mut line = Vec::new();
        push_line(&mut line, &record);
        let line = String::from_utf8(line).unwrap();
        rewrite(&store, 2, |_| line.trim_end().to_owned());
        assert_eq!(store.verify_audit_chain().unwrap().first_broken, Some(3));
    }

    #[test]
    fn removed_events_are_detected() {
        let (_dir, store) = open_temp();
        let mut events: Vec<AuditEvent> = (0..5).map(issued).collect();
        store.append_audit(&mut events).unwrap();
        let mut second = String::new();
        edit_lines(&store, |lines| second = lines.remove(1));
        assert_eq!(
            store.verify_audit_chain().unwrap(),
            ChainReport {
                events: 4,
                first_broken: Some(2)
            }
        );
        edit_lines(&store, |lines| lines.insert(1, second));
        assert_eq!(store.verify_audit_chain().unwrap().first_broken, None);
        // A tail lost while the store is open is reported after the last stored event.
        edit_lines(&store, |lines| {
            lines.pop();
        });
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

    /// Write events the way brokers before the file log did: into sled's `audit` and `audit_by_time` trees.
    /// Open a data directory this test had open a moment ago. sled's background threads hold
    /// its file lock for a moment after the handle is dropped (a new process never sees that),
    /// so a lock still held is waited out — a readiness wait, bounded, not a timing claim.
    fn reopen(path: &Path) -> Result<SledStore, StoreError> {
        for _ in 0..1000 {
            match SledStore::open(path) {
                Err(StoreError::Locked { .. }) => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                other => return other,
            }
        }
        SledStore::open(path)
    }

    /// The raw sled database under a data directory (as an older broker wrote it), waiting out
    /// a lock still held by the previous handle's threads like [`reopen`].
    fn raw_sled(path: &Path) -> ::sled::Db {
        for _ in 0..1000 {
            match ::sled::Config::new().path(path).open() {
                Err(::sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                other => return other.unwrap(),
            }
        }
        ::sled::Config::new().path(path).open().unwrap()
    }

    fn write_old_sled_log(path: &Path, events: &mut [AuditEvent]) -> Vec<Vec<u8>> {
        ensure_private_dir(path).unwrap();
        let db = raw_sled(path);
        let audit = db.open_tree(AUDIT_TREE).unwrap();
        let by_time = db.open_tree(AUDIT_BY_TIME_TREE).unwrap();
        let mut head = ChainHead::genesis();
        let mut records = Vec::new();
        for event in events.iter_mut() {
            let record = seal(event, &mut head).unwrap();
            audit
                .insert(event.seq.to_be_bytes(), record.as_slice())
                .unwrap();
            let mut time_key = event.timestamp.clone().into_bytes();
            time_key.push(0);
            time_key.extend_from_slice(&event.seq.to_be_bytes());
            by_time.insert(time_key, &[][..]).unwrap();
            records.push(record);
        }
        db.flush().unwrap();
        records
    }

    fn old_trees_are_empty(store: &SledStore) -> bool {
        store.db.open_tree(AUDIT_TREE).unwrap().is_empty()
            && store.db.open_tree(AUDIT_BY_TIME_TREE).unwrap().is_empty()
    }

    #[test]
    fn an_audit_log_in_sled_is_moved_to_the_file_log_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let mut events: Vec<AuditEvent> = (0..50).map(issued).collect();
        write_old_sled_log(&path, &mut events);

        let store = reopen(&path).unwrap();
        assert!(old_trees_are_empty(&store));
        assert_eq!(store.read_audit(&AuditFilter::default()).unwrap(), events);
        assert_eq!(
            store.verify_audit_chain().unwrap(),
            ChainReport {
                events: 50,
                first_broken: None
            }
        );
        let mut next = vec![issued(50)];
        store.append_audit(&mut next).unwrap();
        assert_eq!(next[0].seq, 51);
        drop(store);
        // Opening again moves nothing twice.
        let store = reopen(&path).unwrap();
        assert_eq!(store.read_audit(&AuditFilter::default()).unwrap().len(), 51);
        assert_eq!(store.verify_audit_chain().unwrap().first_broken, None);
    }

    #[test]
    fn an_interrupted_move_is_finished_by_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let mut events: Vec<AuditEvent> = (0..10).map(issued).collect();
        let records = write_old_sled_log(&path, &mut events);
        // The first run copied four events into the file log and stopped.
        {
            let log = AuditFile::open(&path.join(AUDIT_DIR), SEGMENT_BYTES).unwrap();
            let head = ChainHead {
                seq: 4,
                hash: events[3].hash.clone(),
            };
            log.append_records(&records[..4], head, None).unwrap();
        }
        let store = reopen(&path).unwrap();
        assert!(old_trees_are_empty(&store));
        assert_eq!(store.read_audit(&AuditFilter::default()).unwrap(), events);
        assert_eq!(store.verify_audit_chain().unwrap().first_broken, None);
    }

    #[test]
    fn a_move_that_does_not_match_the_file_log_is_refused_and_keeps_the_sled_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        // A file log that is not a prefix of the sled log (say, a broker downgraded after the move).
        {
            let store = reopen(&path).unwrap();
            let mut other: Vec<AuditEvent> = (100..103).map(issued).collect();
            store.append_audit(&mut other).unwrap();
        }
        let mut events: Vec<AuditEvent> = (0..5).map(issued).collect();
        write_old_sled_log(&path, &mut events);
        let err = reopen(&path).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
        assert!(err.to_string().contains("left as it was"), "{err}");
        let db = raw_sled(&path);
        assert_eq!(db.open_tree(AUDIT_TREE).unwrap().len(), 5);
    }

    #[test]
    fn documents_written_before_an_append_are_flushed_by_it() {
        let (_dir, store) = open_temp();
        store.put_doc("rules", "r1", b"v").unwrap();
        assert!(store.unflushed.load(Ordering::SeqCst));
        store.append_audit(&mut [issued(0)]).unwrap();
        assert!(!store.unflushed.load(Ordering::SeqCst));
    }
}
