//! An in-memory `Store` with the same semantics as the sled one, for unit tests of the layers above.

use std::collections::BTreeMap;
use std::sync::Mutex;

use botcreds_proto::audit::AuditEvent;

use super::{
    AuditFilter, ChainHead, ChainReport, ChainWalk, CredentialRecord, Store, StoreError,
    check_namespace, decode_event, lock, normalize_since, seal,
};

/// Keeps everything in memory; "flushing" is a no-op. Records are kept in the same encoded form as on disk, so
/// chain verification and decoding run the same code as for sled.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    head: ChainHead,
    /// Record of seq `n` at index `n - 1`.
    audit: Vec<Vec<u8>>,
    credentials: BTreeMap<String, CredentialRecord>,
    docs: BTreeMap<(String, String), Vec<u8>>,
}

impl Default for State {
    fn default() -> State {
        State {
            head: ChainHead::genesis(),
            audit: Vec::new(),
            credentials: BTreeMap::new(),
            docs: BTreeMap::new(),
        }
    }
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }
}

impl Store for MemoryStore {
    fn append_audit(&self, events: &mut [AuditEvent]) -> Result<(), StoreError> {
        let mut state = lock(&self.state);
        let mut head = state.head.clone();
        let mut records = Vec::with_capacity(events.len());
        for event in events.iter_mut() {
            records.push(seal(event, &mut head)?);
        }
        state.audit.extend(records);
        state.head = head;
        Ok(())
    }

    fn read_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEvent>, StoreError> {
        let since = filter.since.as_deref().map(normalize_since).transpose()?;
        let state = lock(&self.state);
        if filter.newest {
            let events = state
                .audit
                .iter()
                .enumerate()
                .rev()
                .map(|(i, record)| decode_event(i as u64 + 1, record));
            return super::newest_matching(filter, since.as_deref(), events);
        }
        let mut out = Vec::new();
        for (seq, record) in (1..).zip(&state.audit) {
            if out.len() >= filter.limit {
                break;
            }
            let event = decode_event(seq, record)?;
            if filter.matches(&event, since.as_deref()) {
                out.push(event);
            }
        }
        Ok(out)
    }

    fn verify_audit_chain(&self) -> Result<ChainReport, StoreError> {
        let state = lock(&self.state);
        let mut walk = ChainWalk::new();
        for (seq, record) in (1..).zip(&state.audit) {
            walk.step(seq, record);
        }
        Ok(walk.finish(&state.head))
    }

    fn put_credential(&self, record: &CredentialRecord) -> Result<(), StoreError> {
        lock(&self.state)
            .credentials
            .insert(record.id.clone(), record.clone());
        Ok(())
    }

    fn get_credential(&self, id: &str) -> Result<Option<CredentialRecord>, StoreError> {
        Ok(lock(&self.state).credentials.get(id).cloned())
    }

    fn list_credentials(&self) -> Result<Vec<CredentialRecord>, StoreError> {
        Ok(lock(&self.state).credentials.values().cloned().collect())
    }

    fn put_doc(&self, namespace: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        check_namespace(namespace)?;
        lock(&self.state)
            .docs
            .insert((namespace.to_owned(), key.to_owned()), value.to_vec());
        Ok(())
    }

    fn get_doc(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        check_namespace(namespace)?;
        Ok(lock(&self.state)
            .docs
            .get(&(namespace.to_owned(), key.to_owned()))
            .cloned())
    }

    fn delete_doc(&self, namespace: &str, key: &str) -> Result<(), StoreError> {
        check_namespace(namespace)?;
        lock(&self.state)
            .docs
            .remove(&(namespace.to_owned(), key.to_owned()));
        Ok(())
    }

    fn list_docs(&self, namespace: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        check_namespace(namespace)?;
        Ok(lock(&self.state)
            .docs
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|((_, key), value)| (key.clone(), value.clone()))
            .collect())
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests as conformance;
    use botcreds_proto::audit::AuditEventKind;

    #[test]
    fn appends_are_gap_free_and_chained() {
        conformance::appends_are_gap_free_and_chained(&MemoryStore::new());
    }

    #[test]
    fn filters_select_and_limit() {
        conformance::filters_select_and_limit(&MemoryStore::new());
    }

    #[test]
    fn credentials_round_trip() {
        conformance::credentials_round_trip(&MemoryStore::new());
    }

    #[test]
    fn docs_round_trip() {
        conformance::docs_round_trip(&MemoryStore::new());
    }

    #[test]
    fn tampering_is_detected() {
        let store = MemoryStore::new();
        let mut events: Vec<AuditEvent> = (0..4)
            .map(|i| {
                conformance::event(
                    AuditEventKind::CredentialIssued,
                    &format!("2026-02-17T14:00:0{i}.000Z"),
                    Some("a"),
                )
            })
            .collect();
        store.append_audit(&mut events).unwrap();
        {
            let mut state = lock(&store.state);
            let record = String::from_utf8(state.audit[2].clone()).unwrap();
            state.audit[2] = record
                .replace("\"bot\":\"a\"", "\"bot\":\"z\"")
                .into_bytes();
        }
        assert_eq!(store.verify_audit_chain().unwrap().first_broken, Some(3));
    }
}
