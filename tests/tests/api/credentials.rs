//! In process: the handler-level cases of `broker_e2e`'s world — the GitHub token flow's
//! answers, reuse, policy decisions from tailnet identity and API keys, input validation,
//! GitHub's and tailscaled's failures, metrics — against the same doubles, with the broker
//! running in the test's runtime.

use std::time::Duration;

use botcreds_proto::{ErrorCode, GithubCredential};
use botcreds_tests::fake_github::{FakeGithubConfig, TokenFormat};
use botcreds_tests::inprocess::InProcessBroker;
use botcreds_tests::scenes::broker::{
    CI, LAPTOP, NOT_ON_TAILNET, SCRIPT_KEY, STRANGER, setup, token_request,
};
use botcreds_tests::world::{World, WorldBuilder, code_of, ip};
use serde_json::{Value, json};

type W = World<InProcessBroker>;

async fn world() -> W {
    setup().start_in_process().await
}

async fn world_with(
    config: FakeGithubConfig,
    extra: impl FnOnce(WorldBuilder) -> WorldBuilder,
) -> W {
    extra(setup().github(config)).start_in_process().await
}

/// POST /v1/credentials from `from`, returning status and JSON body.
async fn ask(w: &W, from: &str, body: Value) -> (u16, Value) {
    w.ask(from, body).await
}

async fn ask_with(w: &W, from: &str, body: Value, key: Option<&str>) -> (u16, Value) {
    w.ask_with(from, body, key).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tailnet_bot_gets_a_scoped_token_with_the_seed_json() {
    let w = world().await;
    let (status, body) = ask(
        &w,
        CI,
        token_request(&["acme-corp/web"], &["contents:write"]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let cred: GithubCredential = serde_json::from_value(body.clone()).unwrap();
    assert!(cred.token.starts_with("ghs_"));
    assert_eq!(cred.bot, "ci-bot");
    assert_eq!(cred.approval, "auto");
    assert!(cred.credential_id.starts_with("tok_"));
    assert!(!cred.credential_id.contains(&cred.token[4..12]));
    assert_eq!(cred.repositories, vec!["acme-corp/web"]);
    assert_eq!(
        cred.permissions.get("contents").map(String::as_str),
        Some("write")
    );
    assert!(cred.git.clone_url.ends_with("/acme-corp/web.git"));
    assert!(
        cred.git
            .clone_url
            .contains(&format!("x-access-token:{}@", cred.token))
    );
    assert!(cred.git.askpass_script.starts_with("#!/bin/sh"));
    assert!(cred.git.askpass_script.contains(&cred.token));
    assert_eq!(cred.attribution.name, "acme-credbroker[bot]");
    assert_eq!(
        cred.attribution.email,
        "41898283+acme-credbroker[bot]@users.noreply.github.com"
    );
    assert_eq!(cred.attribution.trailer, "Bot: ci-bot");
    assert!(
        time::OffsetDateTime::parse(
            &cred.expires_at,
            &time::format_description::well_known::Rfc3339
        )
        .is_ok()
    );

    // GitHub really scoped it: one repository, only contents:write.
    let info = w
        .github
        .token_info(&cred.token)
        .expect("GitHub issued this token");
    assert_eq!(info.repositories, vec!["acme-corp/web"]);
    assert!(!info.allows("acme-corp/web", "pull_requests", "read"));
    assert!(!info.allows("acme-corp/web", "administration", "read"));
    assert!(info.allows("acme-corp/web", "contents", "write"));
    assert!(!info.allows("acme-corp/infra", "contents", "read"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_requests_reuse_one_token_and_whois_is_cached() {
    let w = world().await;
    let req = token_request(
        &["acme-corp/web"],
        &["contents:write", "pull_requests:write"],
    );
    let (s1, b1) = ask(&w, CI, req.clone()).await;
    let (s2, b2) = ask(&w, CI, req).await;
    assert_eq!((s1, s2), (200, 200), "{b1} {b2}");
    assert_eq!(b1["token"], b2["token"]);
    assert_eq!(
        w.github.mint_count(),
        1,
        "second identical request made no upstream call"
    );
    // Same scope written differently (order, duplicates) is the same grant.
    let (s3, b3) = ask(
        &w,
        CI,
        token_request(
            &["ACME-corp/web", "acme-corp/web"],
            &["pull_requests:write", "contents:write"],
        ),
    )
    .await;
    assert_eq!(s3, 200, "{b3}");
    assert_eq!(b3["token"], b1["token"]);
    assert_eq!(w.github.mint_count(), 1);
    // A different scope is a different token.
    let (s4, b4) = ask(
        &w,
        CI,
        token_request(&["acme-corp/web"], &["contents:read"]),
    )
    .await;
    assert_eq!(s4, 200, "{b4}");
    assert_ne!(b4["token"], b1["token"]);
    assert_eq!(w.github.mint_count(), 2);
    assert!(
        w.tailscaled.whois_calls() <= 2,
        "WhoIs answers are cached briefly"
    );

    // GitHub revokes the token behind the broker's back; a client that saw it rejected says
    // so, and gets a fresh token instead of the cached dead one.
    w.github.revoke_all();
    let mut again = token_request(&["acme-corp/web"], &["contents:read"]);
    again["replaces"] = b4["credential_id"].clone();
    let (s5, b5) = ask(&w, CI, again.clone()).await;
    assert_eq!(s5, 200, "{b5}");
    assert_ne!(b5["token"], b4["token"]);
    assert!(
        w.github
            .token_info(b5["token"].as_str().unwrap())
            .unwrap()
            .is_active()
    );
    assert_eq!(w.github.mint_count(), 3);
    let (_, b6) = ask(&w, CI, again).await;
    assert_eq!(
        b6["token"], b5["token"],
        "a stale report reuses the new token"
    );
    assert_eq!(w.github.mint_count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn policy_decisions_from_tailnet_identity() {
    let w = world().await;
    // deny beats auto_approve (acme-corp/* contents:read would allow it).
    let (s, b) = ask(
        &w,
        CI,
        token_request(&["acme-corp/infra"], &["contents:read"]),
    )
    .await;
    assert_eq!((s, code_of(&b)), (403, ErrorCode::PolicyDenied), "{b}");
    assert_eq!(b["rule"], "bots.ci-bot.deny[0]");
    // Glob acme-corp/* covers another repository for read...
    let (s, b) = ask(
        &w,
        CI,
        token_request(&["acme-corp/docs"], &["contents:read"]),
    )
    .await;
    // ...the installation does not cover it, so GitHub refuses: 502 with a code.
    assert_eq!(
        (s, code_of(&b)),
        (502, ErrorCode::GithubNotInstalled),
        "{b}"
    );
    // ...but not for write.
    let (s, b) = ask(
        &w,
        CI,
        token_request(&["acme-corp/docs"], &["contents:write"]),
    )
    .await;
    assert_eq!(
        (s, b["state"].as_str()),
        (202, Some("PENDING")),
        "approval request: {b}"
    );
    assert_eq!(b["rule"], "defaults");
    // admin-level permissions need approval.
    let (s, b) = ask(
        &w,
        CI,
        token_request(&["acme-corp/web"], &["administration:write"]),
    )
    .await;
    assert_eq!(
        (s, b["state"].as_str()),
        (202, Some("PENDING")),
        "approval request: {b}"
    );
    assert_eq!(b["rule"], "bots.ci-bot.requires_approval[0]");
    // A user-owned node matched by hostname.
    let (s, b) = ask(
        &w,
        LAPTOP,
        token_request(&["acme-corp/web"], &["contents:read"]),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["bot"], "laptop-bot");
    let (s, b) = ask(
        &w,
        LAPTOP,
        token_request(&["acme-corp/web"], &["contents:write"]),
    )
    .await;
    assert_eq!(
        (s, b["state"].as_str()),
        (202, Some("PENDING")),
        "approval request: {b}"
    );
    // A tailnet node that matches no bot falls to defaults.
    let (s, b) = ask(
        &w,
        STRANGER,
        token_request(&["acme-corp/web"], &["contents:read"]),
    )
    .await;
    assert_eq!(
        (s, b["state"].as_str()),
        (202, Some("PENDING")),
        "approval request: {b}"
    );
    assert_eq!(b["rule"], "defaults");
    // Not a tailnet peer at all, no key: unauthenticated.
    let (s, b) = ask(
        &w,
        NOT_ON_TAILNET,
        token_request(&["acme-corp/web"], &["contents:read"]),
    )
    .await;
    assert_eq!((s, code_of(&b)), (401, ErrorCode::Unauthenticated), "{b}");
    assert_eq!(
        w.github.mint_count(),
        1,
        "only the laptop's request was minted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_key_bot_and_bad_keys() {
    let w = world().await;
    let req = token_request(&["acme-corp/web"], &["contents:read"]);
    let (s, b) = ask_with(&w, NOT_ON_TAILNET, req.clone(), Some(SCRIPT_KEY)).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["bot"], "script-bot");
    let (s, b) = ask_with(&w, CI, req.clone(), Some("bck_wrong")).await;
    assert_eq!(
        (s, code_of(&b)),
        (401, ErrorCode::InvalidApiKey),
        "a wrong key never falls back to tailnet identity: {b}"
    );
    let client = w.broker.client_from(ip(CI));
    let resp = client
        .post(format!("{}/v1/credentials", w.broker.url))
        .header("Authorization", format!("Basic {SCRIPT_KEY}"))
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let who: Value = w
        .broker
        .client_from(ip(NOT_ON_TAILNET))
        .get(format!("{}/v1/whoami", w.broker.url))
        .bearer_auth(SCRIPT_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(who["bot"], "script-bot");
    assert_eq!(who["via"], "api_key");
    let who: Value = w
        .broker
        .client_from(ip(CI))
        .get(format!("{}/v1/whoami", w.broker.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(who["bot"], "ci-bot");
    assert_eq!(who["tags"], json!(["tag:ci"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_a_clear_code_and_mints_nothing() {
    let w = world_with(FakeGithubConfig::default(), |b| {
        b.toml("[limits]\nrequest_timeout = \"2s\"\n")
    })
    .await;
    let url = format!("{}/v1/credentials", w.broker.url);
    let client = w.broker.client_from(ip(CI));
    let long = format!("acme-corp/{}", "x".repeat(300));
    let cases: Vec<(&str, String, u16, ErrorCode)> = vec![
        ("malformed json", "{\"kind\": \"github_token\",".into(), 400, ErrorCode::InvalidJson),
        ("not an object", "\"a string\"".into(), 400, ErrorCode::InvalidRequest),
        ("unknown field", json!({"kind":"github_token","repositories":["acme-corp/web"],"permissions":["contents:read"],"colour":"red"}).to_string(), 400, ErrorCode::InvalidRequest),
        ("wrong type", json!({"kind":"github_token","repositories":"acme-corp/web","permissions":["contents:read"]}).to_string(), 400, ErrorCode::InvalidRequest),
        ("no kind", json!({"repositories":["acme-corp/web"],"permissions":["contents:read"]}).to_string(), 400, ErrorCode::InvalidKind),
        ("unknown kind", json!({"kind":"aws_keys","repositories":["acme-corp/web"],"permissions":["contents:read"]}).to_string(), 400, ErrorCode::InvalidRequest),
        ("unknown permission", token_request(&["acme-corp/web"], &["contents:owner"]).to_string(), 400, ErrorCode::UnknownPermission),
        ("typo permission", token_request(&["acme-corp/web"], &["content:read"]).to_string(), 400, ErrorCode::UnknownPermission),
        ("empty permissions", token_request(&["acme-corp/web"], &[]).to_string(), 400, ErrorCode::EmptyPermissions),
        ("no repositories", token_request(&[], &["contents:read"]).to_string(), 400, ErrorCode::NoRepositories),
        ("dot-dot repo", token_request(&["../x"], &["contents:read"]).to_string(), 400, ErrorCode::InvalidRepository),
        ("spaces", token_request(&["acme corp/web"], &["contents:read"]).to_string(), 400, ErrorCode::InvalidRepository),
        ("300 chars", token_request(&[&long], &["contents:read"]).to_string(), 400, ErrorCode::InvalidRepository),
        ("two owners", token_request(&["acme-corp/web", "other/x"], &["contents:read"]).to_string(), 400, ErrorCode::ReposAcrossOwners),
        ("garbage ttl", json!({"kind":"github_token","repositories":["acme-corp/web"],"permissions":["contents:read"],"ttl":"soon"}).to_string(), 400, ErrorCode::InvalidTtl),
        ("ttl too long", json!({"kind":"github_token","repositories":["acme-corp/web"],"permissions":["contents:read"],"ttl":"2h"}).to_string(), 400, ErrorCode::TtlTooLong),
        ("control chars in reason", json!({"kind":"github_token","repositories":["acme-corp/web"],"permissions":["contents:read"],"reason":"a\u{0}b"}).to_string(), 400, ErrorCode::InvalidReason),
        ("over 64 KiB", json!({"kind":"github_token","repositories":["acme-corp/web"],"permissions":["contents:read"],"reason":"x".repeat(70_000)}).to_string(), 413, ErrorCode::BodyTooLarge),
    ];
    for (name, body, status, code) in cases {
        let resp = client
            .post(&url)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{name}");
        let b: Value = resp.json().await.unwrap();
        assert_eq!(code_of(&b), code, "{name}: {b}");
        assert!(b["error"].as_str().is_some_and(|m| !m.is_empty()), "{name}");
    }
    // Not JSON at all.
    let resp = client
        .post(&url)
        .header("Content-Type", "text/plain")
        .body("hi")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 415);
    // Unknown path and wrong method are JSON errors too.
    let resp = client
        .get(format!("{}/v1/nope", w.broker.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    assert_eq!(code_of(&resp.json().await.unwrap()), ErrorCode::NotFound);
    let resp = client.get(&url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    assert_eq!(
        code_of(&resp.json().await.unwrap()),
        ErrorCode::MethodNotAllowed
    );

    // A slow client: headers sent, body never finished.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{CI}:0").parse().unwrap()).unwrap();
    let mut stream = socket.connect(w.broker.addr).await.unwrap();
    stream
        .write_all(b"POST /v1/credentials HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"kind\":")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");

    assert_eq!(w.github.mint_count(), 0, "bad input never reaches GitHub");
    // The broker is still fine.
    let (s, b) = ask(
        &w,
        CI,
        token_request(&["acme-corp/web"], &["contents:read"]),
    )
    .await;
    assert_eq!(s, 200, "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn github_failures_map_to_502_codes_without_half_issued_state() {
    let w = world().await;
    let req = token_request(&["acme-corp/web"], &["contents:read"]);
    // A permission the installation lacks: GitHub answers 422.
    let (s, b) = ask(&w, CI, token_request(&["acme-corp/web"], &["issues:write"])).await;
    assert_eq!(
        (s, code_of(&b)),
        (502, ErrorCode::GithubScopeRejected),
        "{b}"
    );
    // An owner without the app installed.
    let (s, b) = ask(&w, CI, token_request(&["ghost-org/x"], &["contents:read"])).await;
    assert_eq!(
        (s, code_of(&b)),
        (502, ErrorCode::GithubNotInstalled),
        "{b}"
    );
    // Transient 5xx are retried.
    w.github.fail_next(1, 502);
    let (s, b) = ask(&w, CI, req.clone()).await;
    assert_eq!(s, 200, "one 502 is retried: {b}");
    // Persistent 5xx: 502 upstream_error.
    w.github.fail_next(10, 500);
    let (s, b) = ask(
        &w,
        CI,
        token_request(&["acme-corp/web"], &["pull_requests:write"]),
    )
    .await;
    assert_eq!((s, code_of(&b)), (502, ErrorCode::UpstreamError), "{b}");
    w.github.fail_next(0, 500);
    // Rate limited.
    w.github.exhaust_rate_limit();
    let (s, b) = ask(
        &w,
        CI,
        token_request(&["acme-corp/web"], &["contents:write"]),
    )
    .await;
    assert_eq!((s, code_of(&b)), (502, ErrorCode::GithubRateLimited), "{b}");
    assert!(b["retry_after"].as_u64().is_some(), "{b}");
    w.github.restore_rate_limit();
    // Dead upstream.
    w.github.set_down(true).await;
    let (s, b) = ask(
        &w,
        CI,
        token_request(&["acme-corp/web"], &["contents:write"]),
    )
    .await;
    assert_eq!(
        (s, code_of(&b)),
        (502, ErrorCode::UpstreamUnavailable),
        "{b}"
    );
    // The token minted before the outage is still served from the reuse cache.
    let (s, b) = ask(&w, CI, req).await;
    assert_eq!(s, 200, "{b}");
    w.github.set_down(false).await;
    let (s, b) = ask(
        &w,
        CI,
        token_request(&["acme-corp/web"], &["contents:write"]),
    )
    .await;
    assert_eq!(s, 200, "recovers when GitHub is back: {b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tailscaled_down_is_identity_unavailable_but_api_keys_work() {
    let w = world().await;
    w.tailscaled.set_down(true).await;
    let req = token_request(&["acme-corp/web"], &["contents:read"]);
    let (s, b) = ask(&w, STRANGER, req.clone()).await;
    assert_eq!(
        (s, code_of(&b)),
        (503, ErrorCode::IdentityUnavailable),
        "{b}"
    );
    let (s, b) = ask_with(&w, STRANGER, req, Some(SCRIPT_KEY)).await;
    assert_eq!(s, 200, "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ghes_long_tokens_and_metrics() {
    let config = FakeGithubConfig::default()
        .ghes()
        .token_format(TokenFormat::Long);
    let w = world_with(config, |b| b).await;
    let (s, b) = ask(
        &w,
        CI,
        token_request(&["acme-corp/web"], &["contents:read"]),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let token = b["token"].as_str().unwrap();
    assert!(
        token.starts_with("ghs_") && token.len() > 40,
        "long-form token accepted"
    );
    let host = w.github.addr().to_string();
    assert_eq!(
        b["git"]["clone_url"].as_str().unwrap(),
        format!("https://x-access-token:{token}@{host}/acme-corp/web.git")
    );
    let (s, _) = ask(
        &w,
        CI,
        token_request(&["acme-corp/web"], &["contents:read"]),
    )
    .await;
    assert_eq!(s, 200);
    let metrics = w
        .broker
        .client_from(ip(CI))
        .get(format!("{}/metrics", w.broker.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "botcreds_credential_requests_total{bot=\"ci-bot\",outcome=\"issued\"} 2",
        "botcreds_token_reuse_total{result=\"hit\"} 1",
        "botcreds_token_reuse_total{result=\"miss\"} 1",
        "botcreds_github_token_mints_total 1",
        "botcreds_github_rate_limit_remaining",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
    let ready = w
        .broker
        .client_from(ip(CI))
        .get(format!("{}/readyz", w.broker.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 200);
}
