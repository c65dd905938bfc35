//! Request bodies of the broker's HTTP API (bots, provisioners, admins) and the values the
//! broker parses out of them at the edge: never panics on any byte string.
#![no_main]

use botcreds_proto::approval::{ApproveAllBody, ApproveBody, DenyBody, RevokeBody};
use botcreds_proto::enroll::{EnrollRequest, JoinTokenRequest, RenewRequest, RevokeCertRequest};
use botcreds_proto::litellm::{ServiceKeyRequest, UserKeyRequest, WorkspaceKeyRequest};
use botcreds_proto::{CredentialRequest, Permission, RepoName, Ttl};
use libfuzzer_sys::fuzz_target;

fn edge_values(values: impl IntoIterator<Item = String>) {
    for v in values {
        let _ = v.parse::<RepoName>();
        let _ = v.parse::<Permission>();
        let _ = v.parse::<Ttl>();
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = serde_json::from_slice::<CredentialRequest>(data) {
        edge_values(r.repositories.iter().cloned());
        edge_values(r.permissions.iter().cloned());
        edge_values(r.ttl.clone());
        edge_values(r.wait.clone());
        let back = serde_json::to_vec(&r).expect("a parsed request serialises");
        let again: CredentialRequest = serde_json::from_slice(&back).expect("and parses back");
        assert_eq!(again, r);
    }
    let _ = serde_json::from_slice::<WorkspaceKeyRequest>(data);
    let _ = serde_json::from_slice::<UserKeyRequest>(data);
    let _ = serde_json::from_slice::<ServiceKeyRequest>(data);
    let _ = serde_json::from_slice::<ApproveBody>(data);
    let _ = serde_json::from_slice::<ApproveAllBody>(data);
    let _ = serde_json::from_slice::<DenyBody>(data);
    let _ = serde_json::from_slice::<RevokeBody>(data);
    let _ = serde_json::from_slice::<EnrollRequest>(data);
    let _ = serde_json::from_slice::<RenewRequest>(data);
    let _ = serde_json::from_slice::<JoinTokenRequest>(data);
    let _ = serde_json::from_slice::<RevokeCertRequest>(data);
    if let Ok(s) = std::str::from_utf8(data) {
        edge_values([s.to_owned()]);
    }
});
