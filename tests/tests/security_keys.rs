//! Negative security for LiteLLM keys against the real broker binary: what needs the process —
//! policy reloads (the file and SIGHUP) racing issues and revoking keys, and the audit log on
//! disk after a refusal flood. The table of attacks on other holders' keys runs in process in
//! `tests/api/keys.rs`, on the same world (`botcreds_tests::scenes::keys`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use botcreds_tests::scenes::keys::{A_KEY, OPS_KEY, error_of, policy, setup, ws};
use botcreds_tests::world::{World, call};
use serde_json::json;

async fn world() -> World {
    setup().start().await
}

/// Deny `ws-a` the `agent:review` scope in the broker's policy file and wait until the reload
/// (and its enforcement) is done.
async fn reload_denying_ws_a(w: &mut World) {
    let loads = w.broker.log_count("policy reloaded");
    std::fs::write(
        &w.broker.policy_path,
        policy().replace(
            "  ws-a:\n    identity: { type: api_key }\n",
            "  ws-a:\n    identity: { type: api_key }\n    deny: [{ litellm_scope: \"agent:review\" }]\n",
        ),
    )
    .unwrap();
    w.broker.signal("HUP");
    assert!(
        w.broker
            .wait_for_count(
                "policy reloaded",
                loads + 1,
                std::time::Duration::from_secs(30)
            )
            .await,
        "the policy was not reloaded"
    );
}

/// The audit log, read as the `ops` admin.
async fn audit_events(w: &World) -> Vec<botcreds_proto::audit::AuditEvent> {
    let (status, log) = call(
        w.http
            .get(w.url("/v1/admin/audit?limit=10000"))
            .bearer_auth(OPS_KEY),
    )
    .await;
    assert_eq!(status, 200, "{log}");
    serde_json::from_value::<botcreds_proto::approval::AuditList>(log)
        .unwrap()
        .events
}

/// Regression: a policy-allowed (`auto_approve`) LiteLLM key request was decided once, before
/// `KeyService::issue`, which can wait on LiteLLM or on another issue. A reload denying the
/// scope in that window listed the keys before the new one was written, so the key was
/// answered and stayed live. Now the request is decided again after the issue: refused with
/// `policy_denied`, and the key made for it is deleted in LiteLLM.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_during_an_auto_litellm_mint_wins() {
    let mut w = world().await;
    w.litellm.hold_generates();
    let request = w
        .http
        .post(w.url("/v1/credentials"))
        .bearer_auth(A_KEY)
        .json(&json!({"kind": "litellm_key", "scope": "agent:review"}));
    let pending = tokio::spawn(call(request));
    // The mint has reached LiteLLM (recorded on arrival, then held).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while w.litellm.calls_to("/key/generate").is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no mint arrived");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    reload_denying_ws_a(&mut w).await;
    w.litellm.release_generates();
    let (status, body) = pending.await.unwrap();
    assert_eq!(
        (status, error_of(&body).as_str()),
        (403, "policy_denied"),
        "{body}"
    );
    assert!(
        w.litellm.live_keys().is_empty(),
        "the key minted for the refused request is deleted in LiteLLM"
    );
    let (status, list) = call(w.http.get(w.url("/v1/keys")).bearer_auth(OPS_KEY)).await;
    assert_eq!(status, 200, "{list}");
    assert!(
        list["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["status"] != "active"),
        "no live key is left: {list}"
    );
    let events = audit_events(&w).await;
    assert!(
        events.iter().any(|e| {
            e.event == botcreds_proto::audit::AuditEventKind::CredentialDenied
                && e.code.as_deref() == Some("policy_denied")
        }),
        "the refusal is audited"
    );
}

/// Regression: keys a policy reload revoked were audited with the reason "revoked by an
/// admin". The `credential_revoked` event of such a key now says the policy denies it, with
/// `policy` as the caller.
#[tokio::test(flavor = "multi_thread")]
async fn keys_a_reload_revokes_are_audited_as_the_policys() {
    let mut w = world().await;
    let (status, key) = call(
        w.http
            .post(w.url("/v1/credentials"))
            .bearer_auth(A_KEY)
            .json(&json!({"kind": "litellm_key", "scope": "agent:review"})),
    )
    .await;
    assert_eq!(status, 200, "{key}");
    let id = key["credential_id"].as_str().unwrap().to_string();
    reload_denying_ws_a(&mut w).await;
    assert!(
        w.litellm.live_keys().is_empty(),
        "the reload deleted the key"
    );
    let events = audit_events(&w).await;
    let revoked: Vec<_> = events
        .iter()
        .filter(|e| {
            e.event == botcreds_proto::audit::AuditEventKind::CredentialRevoked
                && e.token_id.as_deref() == Some(id.as_str())
        })
        .map(|e| (e.caller.clone(), e.reason.clone()))
        .collect();
    assert_eq!(
        revoked,
        vec![(
            Some("policy".to_string()),
            Some("the policy now denies it".to_string())
        )]
    );
}

/// Regression: refusals of unauthenticated callers on the provisioner API (a wrong or missing
/// `X-Provisioner-Secret`, a bad Coder session token) each cost one fsync'd audit event, so a
/// flood from one peer grew the audit log without bound. Now they share the per-peer budget
/// of the other anonymous refusals: the first ten are written, the rest summarised.
#[tokio::test(flavor = "multi_thread")]
async fn provisioner_refusal_flood_is_summarised_in_the_audit_log() {
    use botcreds_broker::store::{AuditFilter, SledStore, Store};
    use botcreds_proto::audit::AuditEventKind;

    let mut w = world().await;
    let flooder = w.broker.client_from("127.0.0.9".parse().unwrap());
    let body = ws("ws-flood", "flood", "dev");
    for i in 0..50 {
        let req = match i % 5 {
            0 => flooder.post(w.url("/api/v1/keys/workspace")).json(&body),
            1 => flooder
                .post(w.url("/api/v1/keys/user"))
                .bearer_auth("coder-session-wrong-0123456789"),
            2 => flooder
                .delete(w.url("/api/v1/keys/ws-flood"))
                .header("X-Provisioner-Secret", "wrong"),
            _ => flooder
                .post(w.url("/api/v1/keys/workspace"))
                .header("X-Provisioner-Secret", "provisioner-secret-wrong-012345")
                .json(&body),
        };
        let (status, answer) = call(req).await;
        assert!(
            status == 401 || status == 403,
            "request {i}: {status} {answer}"
        );
    }
    assert!(w.broker.stop().await.success());
    let store = SledStore::open(&w.broker.data_dir()).unwrap();
    let events = store.read_audit(&AuditFilter::default()).unwrap();
    let denied = events
        .iter()
        .filter(|e| e.event == AuditEventKind::CredentialDenied)
        .count();
    assert_eq!(
        denied, 10,
        "only the first ten refusals are written one by one"
    );
    let summaries: Vec<_> = events
        .iter()
        .filter(|e| e.event == AuditEventKind::RefusalsSummarized)
        .collect();
    assert_eq!(summaries.len(), 1, "{summaries:?}");
    assert_eq!(summaries[0].client_ip.as_deref(), Some("127.0.0.9"));
    let detail = summaries[0].detail.as_deref().unwrap();
    assert!(detail.starts_with("40 more"), "{detail}");
}
