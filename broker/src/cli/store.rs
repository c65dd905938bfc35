//! `botcreds store verify`: open a stopped broker's store offline and check it — the audit
//! chain end to end and every approval document — so an operator (and the crash tests) can tell
//! after a power loss or `kill -9` that nothing is torn.

use std::fmt;
use std::path::Path;

use botcreds_proto::approval::ApprovalRequestView;

use crate::store::{SledStore, Store, StoreError};

/// The approval documents' namespace (`approvals/`' own constant is private to that module).
const APPROVALS_NAMESPACE: &str = "approvals";

/// What `store verify` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreReport {
    pub audit_events: u64,
    /// The first audit seq at which the hash chain does not hold.
    pub first_broken: Option<u64>,
    pub credentials: usize,
    pub approvals: usize,
    pub pending_approvals: usize,
    /// Approval documents that do not parse.
    pub unreadable_approvals: usize,
}

impl StoreReport {
    /// Whether the store is whole: the chain holds and every approval document reads.
    pub fn is_intact(&self) -> bool {
        self.first_broken.is_none() && self.unreadable_approvals == 0
    }
}

impl fmt::Display for StoreReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.first_broken {
            None => writeln!(f, "audit: {} events, chain intact", self.audit_events)?,
            Some(seq) => writeln!(
                f,
                "audit: {} events, chain BROKEN at seq {seq}",
                self.audit_events
            )?,
        }
        writeln!(f, "credentials: {} records", self.credentials)?;
        write!(
            f,
            "approvals: {} requests, {} pending, {} unreadable",
            self.approvals, self.pending_approvals, self.unreadable_approvals
        )
    }
}

/// Open the store in `data_dir` (the broker must be stopped: the store is locked while it
/// runs) and check it.
pub fn verify(data_dir: &Path) -> Result<StoreReport, StoreError> {
    let store = SledStore::open(data_dir)?;
    let chain = store.verify_audit_chain()?;
    let credentials = store.list_credentials()?.len();
    let docs = store.list_docs(APPROVALS_NAMESPACE)?;
    let mut pending = 0;
    let mut unreadable = 0;
    for (_, bytes) in &docs {
        match serde_json::from_slice::<serde_json::Value>(bytes)
            .ok()
            .and_then(|v| {
                serde_json::from_value::<ApprovalRequestView>(v.get("view")?.clone()).ok()
            }) {
            Some(view) if view.state == botcreds_proto::ApprovalState::Pending => pending += 1,
            Some(_) => {}
            None => unreadable += 1,
        }
    }
    Ok(StoreReport {
        audit_events: chain.events,
        first_broken: chain.first_broken,
        credentials,
        approvals: docs.len(),
        pending_approvals: pending,
        unreadable_approvals: unreadable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use botcreds_proto::{ApprovalState, AuditEvent};

    fn event(n: u64) -> AuditEvent {
        serde_json::from_value(serde_json::json!({
            "timestamp": format!("2026-12-02T12:00:{:02}.000Z", n % 60),
            "event": "credential_issued",
            "bot": "ci-bot",
            "token_id": format!("tok_{n:024x}"),
        }))
        .unwrap()
    }

    fn request(id: &str, state: ApprovalState) -> Vec<u8> {
        let view = serde_json::json!({
            "request_id": id,
            "state": state,
            "bot": "ci-bot",
            "caller": "api_key:ci-bot",
            "resource": { "kind": "litellm_key", "scope": "ci" },
            "rule": "defaults",
            "created_at": "2026-12-02T12:00:00Z",
            "expires_at": "2026-12-03T12:00:00Z",
            "poll_url": format!("/v1/requests/{id}"),
        });
        // The stored form must still be a readable view.
        serde_json::from_value::<ApprovalRequestView>(view.clone()).unwrap();
        serde_json::to_vec(
            &serde_json::json!({ "view": view, "owner": "ci-bot", "min_ttl_secs": 60 }),
        )
        .unwrap()
    }

    #[test]
    fn a_whole_store_verifies_and_counts_pending_requests() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        {
            let store = SledStore::open(&data).unwrap();
            store
                .append_audit(&mut (1..=5).map(event).collect::<Vec<_>>())
                .unwrap();
            store
                .put_doc(
                    APPROVALS_NAMESPACE,
                    "apr_a",
                    &request("apr_a", ApprovalState::Pending),
                )
                .unwrap();
            store
                .put_doc(
                    APPROVALS_NAMESPACE,
                    "apr_b",
                    &request("apr_b", ApprovalState::Denied),
                )
                .unwrap();
            store.flush().unwrap();
        }
        let report = verify(&data).unwrap();
        assert!(report.is_intact(), "{report}");
        assert_eq!(
            (
                report.audit_events,
                report.approvals,
                report.pending_approvals
            ),
            (5, 2, 1)
        );
    }

    #[test]
    fn a_torn_approval_document_is_reported_and_fails_the_check() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        {
            let store = SledStore::open(&data).unwrap();
            store
                .put_doc(
                    APPROVALS_NAMESPACE,
                    "apr_a",
                    &request("apr_a", ApprovalState::Pending),
                )
                .unwrap();
            store
                .put_doc(
                    APPROVALS_NAMESPACE,
                    "apr_torn",
                    b"{\"view\":{\"request_id\":",
                )
                .unwrap();
            store.flush().unwrap();
        }
        let report = verify(&data).unwrap();
        assert_eq!(report.unreadable_approvals, 1);
        assert!(!report.is_intact());
        assert!(report.to_string().contains("1 unreadable"), "{report}");
    }
}
