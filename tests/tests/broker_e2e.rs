//! End-to-end: the real `botcreds` binary against the fake GitHub and the fake tailscaled.
//! Bots connect from distinct loopback addresses that the fake tailscaled maps to nodes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::net::IpAddr;
use std::time::Duration;

use botcreds_proto::{ErrorBody, ErrorCode, GithubCredential};
use botcreds_tests::broker::{BrokerBuilder, BrokerProcess};
use botcreds_tests::fake_github::{FakeGithub, FakeGithubConfig, TokenFormat};
use botcreds_tests::fake_tailscaled::{FakeTailscaled, NodeBuilder};
use serde_json::{Value, json};

const POLICY: &str = r#"
bots:
  ci-bot:
    identity: { tag: "tag:ci" }
    auto_approve:
      - repo: "acme-corp/web"
        permissions: [contents:write, pull_requests:write]
      - repo: "acme-corp/*"
        permissions: [contents:read]
      - repo: "acme-corp/web"
        permissions: [issues:write]
      - repo: "ghost-org/*"
        permissions: [contents:read]
    requires_approval:
      - permissions: [admin]
    deny:
      - repo: "acme-corp/infra"
  laptop-bot:
    identity: { type: tailnet, hostname: alice-laptop }
    auto_approve:
      - repo: "acme-corp/web"
        permissions: [contents:read]
  script-bot:
    identity: { type: api_key }
    auto_approve:
      - repo: "acme-corp/web"
        permissions: [contents:read]
defaults:
  requires_approval: true
  approval_timeout: 24h
"#;

const CI: &str = "127.0.0.2";
const LAPTOP: &str = "127.0.0.3";
const STRANGER: &str = "127.0.0.4";
const NOT_ON_TAILNET: &str = "127.0.0.5";
const SCRIPT_KEY: &str = "bck_e2eScriptKey0123456789abcdefghij";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

struct World {
    github: FakeGithub,
    tailscaled: FakeTailscaled,
    broker: BrokerProcess,
}

async fn world_with(
    config: FakeGithubConfig,
    extra: impl FnOnce(BrokerBuilder) -> BrokerBuilder,
) -> World {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let github = FakeGithub::start(config).await;
    let tailscaled = FakeTailscaled::start().await;
    tailscaled.add_node(
        ip(CI),
        NodeBuilder::new("ci-bot-07").tags(["tag:ci"]).build(),
    );
    tailscaled.add_node(
        ip(LAPTOP),
        NodeBuilder::new("alice-laptop")
            .login("alice@example.com")
            .build(),
    );
    tailscaled.add_node(
        ip(STRANGER),
        NodeBuilder::new("stranger")
            .login("bob@example.com")
            .build(),
    );
    let builder = BrokerBuilder::new(POLICY)
        .github(&github.base_url(), github_app_id())
        .tailscaled(tailscaled.socket_path())
        .api_key("script-bot", SCRIPT_KEY);
    let broker = extra(builder).start().await;
    World {
        github,
        tailscaled,
        broker,
    }
}

fn github_app_id() -> u64 {
    botcreds_tests::fixtures::APP_ID
}

async fn world() -> World {
    world_with(FakeGithubConfig::default(), |b| b).await
}

/// POST /v1/credentials from `from`, returning status and JSON body.
async fn ask(w: &World, from: &str, body: Value) -> (u16, Value) {
    ask_with(w, from, body, None).await
}

async fn ask_with(w: &World, from: &str, body: Value, key: Option<&str>) -> (u16, Value) {
    let client = w.broker.client_from(ip(from));
    let mut req = client
        .post(format!("{}/v1/credentials", w.broker.url))
        .json(&body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("json body");
    (status, body)
}

fn token_request(repos: &[&str], perms: &[&str]) -> Value {
    json!({"kind": "github_token", "repositories": repos, "permissions": perms, "reason": "e2e"})
}

fn code_of(body: &Value) -> ErrorCode {
    serde_json::from_value::<ErrorBody>(body.clone())
        .unwrap_or_else(|e| panic!("not an error body ({e}): {body}"))
        .code
}

#[tokio::test(flavor = "multi_thread")]
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

#[tokio::test(flavor = "multi_thread")]
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

#[tokio::test(flavor = "multi_thread")]
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

#[tokio::test(flavor = "multi_thread")]
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

#[tokio::test(flavor = "multi_thread")]
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

#[tokio::test(flavor = "multi_thread")]
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

#[tokio::test(flavor = "multi_thread")]
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

/// The fake tailscaled's refusals reach the broker: WhoIs answered `403 whois access denied`
/// (the broker's user lacks read access) or `500 server has no local backend`. Each is a
/// clear `503 identity_unavailable` with a retry hint, never a crash, never another caller's
/// identity; API keys keep working, and identity returns with tailscaled.
#[tokio::test(flavor = "multi_thread")]
async fn tailscaled_refusing_whois_is_identity_unavailable() {
    let w = world().await;
    let req = token_request(&["acme-corp/web"], &["contents:read"]);
    type Mode = fn(&FakeTailscaled, bool);
    // Each mode from a peer not asked about before: positive answers are cached for 5 s.
    let modes: [(&str, Mode, &str, u16); 2] = [
        (
            "whois access denied",
            |t, on| t.set_whois_denied(on),
            STRANGER,
            202,
        ),
        (
            "no local backend",
            |t, on| t.fail_next(if on { u32::MAX } else { 0 }),
            LAPTOP,
            200,
        ),
    ];
    for (what, set, from, back) in modes {
        set(&w.tailscaled, true);
        let client = w.broker.client_from(ip(from));
        let resp = client
            .post(format!("{}/v1/credentials", w.broker.url))
            .json(&req)
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.headers().get("retry-after").map(|v| v.as_bytes()),
            Some(&b"1"[..]),
            "{what}"
        );
        let (s, b) = (resp.status().as_u16(), resp.json::<Value>().await.unwrap());
        assert_eq!(
            (s, code_of(&b)),
            (503, ErrorCode::IdentityUnavailable),
            "{what}: {b}"
        );
        let (s, b) = ask_with(&w, from, req.clone(), Some(SCRIPT_KEY)).await;
        assert_eq!(s, 200, "{what}: API keys do not need tailscaled: {b}");
        set(&w.tailscaled, false);
        let (s, b) = ask(&w, from, req.clone()).await;
        assert_eq!(s, back, "{what}: identity is back: {b}");
    }
    let resp = w
        .broker
        .client_from(ip(STRANGER))
        .get(format!("{}/healthz", w.broker.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!w.broker.logs().contains("panicked"), "{}", w.broker.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_reloads_on_change_and_keeps_the_last_good_one() {
    let mut w = world().await;
    let req = token_request(&["acme-corp/web"], &["contents:read"]);
    let (s, b) = ask(&w, STRANGER, req.clone()).await;
    assert_eq!(s, 202, "the defaults ask a human: {b}");

    // A good change: the stranger becomes a bot (file change is noticed without a signal).
    let grown = POLICY.replace(
            "defaults:",
            "  stranger-bot:\n    identity: { user: bob@example.com }\n    auto_approve:\n      - repo: \"acme-corp/web\"\n        permissions: [contents:read]\ndefaults:",
    );
    std::fs::write(&w.broker.policy_path, &grown).unwrap();
    assert!(
        w.broker
            .wait_for_log("policy reloaded", Duration::from_secs(30))
            .await,
        "{}",
        w.broker.logs()
    );
    let (s, b) = ask(&w, STRANGER, req.clone()).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["bot"], "stranger-bot");

    // A bad change (typo): rejected with file:line:col, the last good policy stays.
    std::fs::write(&w.broker.policy_path, grown.replace("auto_approve:\n      - repo: \"acme-corp/web\"\n        permissions: [contents:read]\ndefaults", "auto_aprove: []\ndefaults")).unwrap();
    assert!(
        w.broker
            .wait_for_log("policy reload failed", Duration::from_secs(30))
            .await,
        "{}",
        w.broker.logs()
    );
    assert!(
        w.broker.logs().contains("policy.yaml:"),
        "error names the file: {}",
        w.broker.logs()
    );
    let (s, b) = ask(&w, STRANGER, req.clone()).await;
    assert_eq!(s, 200, "still the last good policy: {b}");

    // SIGHUP forces a reload even of an unchanged file: the typo is reported again.
    let failures = w.broker.log_count("policy reload failed");
    w.broker.signal("HUP");
    assert!(
        wait_for_count(&mut w.broker, "policy reload failed", failures + 1).await,
        "{}",
        w.broker.logs()
    );

    // Back to the original policy.
    let loads = w.broker.log_count("policy reloaded");
    std::fs::write(&w.broker.policy_path, POLICY).unwrap();
    assert!(wait_for_count(&mut w.broker, "policy reloaded", loads + 1).await);
    let (s, b) = ask(&w, STRANGER, req).await;
    assert_eq!(s, 202, "the defaults ask a human again: {b}");
}

async fn wait_for_count(broker: &mut BrokerProcess, needle: &str, n: usize) -> bool {
    broker
        .wait_for_count(needle, n, Duration::from_secs(30))
        .await
}

#[tokio::test(flavor = "multi_thread")]
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

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_in_logs_or_on_disk() {
    let w = world().await;
    let mut tokens = Vec::new();
    for perms in [
        &["contents:read"][..],
        &["contents:write"],
        &["pull_requests:write"],
    ] {
        let (s, b) = ask(&w, CI, token_request(&["acme-corp/web"], perms)).await;
        assert_eq!(s, 200, "{b}");
        tokens.push(b["token"].as_str().unwrap().to_string());
    }
    let (s, _) = ask(
        &w,
        CI,
        token_request(&["acme-corp/infra"], &["contents:read"]),
    )
    .await;
    assert_eq!(s, 403);
    let World { mut broker, .. } = w;
    let status = broker.stop().await;
    assert!(status.success(), "clean exit on SIGTERM");
    let logs = broker.logs();
    let key = botcreds_tests::fixtures::app_private_key_pem();
    let key_line = key.lines().nth(1).unwrap();
    assert!(
        logs.contains("credential issued"),
        "the run was logged:\n{logs}"
    );
    for t in &tokens {
        assert!(!logs.contains(t.as_str()), "token in the log");
        assert!(!logs.contains(&t[4..]), "token body in the log");
    }
    assert!(!logs.contains(key_line), "private key in the log");
    assert!(!logs.contains("eyJ"), "a JWT in the log");
    assert!(!logs.contains(SCRIPT_KEY));
    // Nothing secret in the broker's data directory either.
    let mut files = vec![broker.data_dir()];
    let mut scanned = 0;
    while let Some(p) = files.pop() {
        if p.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                files.push(e.unwrap().path());
            }
        } else {
            let bytes = std::fs::read(&p).unwrap();
            scanned += bytes.len();
            for t in &tokens {
                assert!(
                    !bytes.windows(t.len()).any(|w| w == t.as_bytes()),
                    "token in {}",
                    p.display()
                );
            }
        }
    }
    assert!(scanned > 0, "the data dir holds the audit log");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_config_is_a_startup_error_naming_the_key() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cases = [
        (
            "listen = [\"0.0.0.0:0\"]\ndata_dir = \"d\"\npolicy = \"p.yaml\"\n",
            "listen[0]",
        ),
        (
            "listen = [\"127.0.0.1:0\"]\ndata_dir = \"d\"\npolicy = \"p.yaml\"\ncolour = 1\n",
            "colour",
        ),
        (
            "listen = [\"127.0.0.1:0\"]\ndata_dir = \"d\"\npolicy = \"p.yaml\"\n[github]\napp_id = 1\nprivate_key_file = \"loose.pem\"\n",
            "github.private_key_file",
        ),
        (
            "listen = [\"127.0.0.1:0\"]\ndata_dir = \"d\"\npolicy = \"broken.yaml\"\n[github]\napp_id = 1\nprivate_key_file = \"tight.pem\"\n",
            "broken.yaml:6:23",
        ),
    ];
    for (toml, needle) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.yaml"), "bots: {}\n").unwrap();
        std::fs::write(dir.path().join("broken.yaml"), "bots:\n  a:\n    identity: { type: api_key }\n    auto_approve:\n      - repo: \"o/r\"\n        permissions: [contents:rite]\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        for (name, mode) in [("loose.pem", 0o644), ("tight.pem", 0o600)] {
            let p = dir.path().join(name);
            std::fs::copy(
                botcreds_tests::fixtures::path("github/test-app-key.pem"),
                &p,
            )
            .unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let config = dir.path().join("broker.toml");
        std::fs::write(&config, toml).unwrap();
        let out = tokio::process::Command::new(botcreds_tests::broker::binary("botcreds"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .output()
            .await
            .unwrap();
        assert!(!out.status.success(), "{needle}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{needle}: {stderr}");
        assert!(!stderr.contains("BEGIN RSA"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_log_is_durable_chained_and_names_tokens_by_hash() {
    use botcreds_broker::store::{AuditFilter, SledStore, Store};
    use botcreds_proto::audit::AuditEventKind;

    let w = world().await;
    let (s, issued) = ask(
        &w,
        CI,
        token_request(&["acme-corp/web"], &["contents:read"]),
    )
    .await;
    assert_eq!(s, 200, "{issued}");
    let (s, _) = ask(
        &w,
        CI,
        token_request(&["acme-corp/infra"], &["contents:read"]),
    )
    .await;
    assert_eq!(s, 403);
    let (s, _) = ask(&w, CI, token_request(&["acme-corp/web"], &["nope:read"])).await;
    assert_eq!(s, 400);
    let World { mut broker, .. } = w;
    assert!(broker.stop().await.success());

    let store = SledStore::open(&broker.data_dir()).expect("open the stopped broker's store");
    let report = store.verify_audit_chain().unwrap();
    assert_eq!(report.first_broken, None);
    let events = store.read_audit(&AuditFilter::default()).unwrap();
    let kinds: Vec<AuditEventKind> = events.iter().map(|e| e.event).collect();
    assert_eq!(kinds[0], AuditEventKind::BrokerStarted);
    let issued_event = events
        .iter()
        .find(|e| e.event == AuditEventKind::CredentialIssued)
        .expect("credential_issued recorded");
    assert_eq!(issued_event.bot.as_deref(), Some("ci-bot"));
    assert_eq!(issued_event.repo.as_deref(), Some("acme-corp/web"));
    assert_eq!(issued_event.permissions, vec!["contents:read"]);
    assert_eq!(issued_event.approval.as_deref(), Some("auto"));
    assert_eq!(
        issued_event.token_id,
        issued["credential_id"].as_str().map(str::to_string)
    );
    assert_eq!(
        issued_event.expires_at,
        issued["expires_at"].as_str().map(str::to_string)
    );
    assert_eq!(issued_event.client_ip.as_deref(), Some(CI));
    assert_eq!(issued_event.reason.as_deref(), Some("e2e"));
    let denied: Vec<_> = events
        .iter()
        .filter(|e| e.event == AuditEventKind::CredentialDenied)
        .collect();
    assert_eq!(denied.len(), 2, "{denied:?}");
    assert_eq!(denied[0].code.as_deref(), Some("policy_denied"));
    assert_eq!(denied[0].rule.as_deref(), Some("bots.ci-bot.deny[0]"));
    assert_eq!(denied[1].code.as_deref(), Some("unknown_permission"));
    let requested = kinds
        .iter()
        .filter(|k| **k == AuditEventKind::CredentialRequested)
        .count();
    assert_eq!(requested, 2, "validated requests are recorded as requested");
    let token = issued["token"].as_str().unwrap();
    let all = serde_json::to_string(&events).unwrap();
    assert!(!all.contains(token), "the audit log never holds a token");
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_broker_works_out_of_the_box() {
    use tokio::io::AsyncBufReadExt;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut child = tokio::process::Command::new(botcreds_tests::broker::binary("botcreds"))
        .args(["serve", "--dev", "--listen", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut url, mut key, mut admin_key, mut warned) = (None, None, None, false);
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            warned |= line.contains("NOT valid on github.com");
            if let Some(u) = line.split("Listening on: ").nth(1) {
                url = u.split_whitespace().next().map(str::to_string);
            }
            if let Some(k) = line.split("API key: ").nth(1) {
                key = Some(k.trim().to_string());
            }
            if let Some(k) = line.split("Admin key: ").nth(1) {
                admin_key = k.split_whitespace().next().map(str::to_string);
            }
            if url.is_some() && key.is_some() && admin_key.is_some() && warned {
                break;
            }
        }
    })
    .await
    .expect("the dev banner appears");
    let (url, key, admin_key) = (url.unwrap(), key.unwrap(), admin_key.unwrap());
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let client = reqwest::Client::new();
    let post = |repo: &str| {
        client
            .post(format!("{url}/v1/credentials"))
            .bearer_auth(&key)
            .json(&json!({"kind":"github_token","repositories":[repo],"permissions":["contents:write"]}))
            .send()
    };
    let ok = post("demo-org/app").await.unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    let body: Value = ok.json().await.unwrap();
    assert!(body["token"].as_str().unwrap().starts_with("ghs_"));
    assert_eq!(
        post("demo-org/infrastructure")
            .await
            .unwrap()
            .status()
            .as_u16(),
        403
    );
    let approval = post("demo-org/sensitive-data").await.unwrap();
    assert_eq!(approval.status().as_u16(), 202);
    let approval: Value = approval.json().await.unwrap();
    assert_eq!(approval["state"], "PENDING");
    let id = approval["request_id"].as_str().unwrap().to_string();

    // The printed admin key drives the admin CLI, as the banner says.
    let admin = |args: &[&str]| {
        std::process::Command::new(botcreds_tests::broker::binary("botcreds"))
            .args(args)
            .env("BOTCREDS_BROKER", &url)
            .env("BOTCREDS_API_KEY", &admin_key)
            .output()
            .unwrap()
    };
    let pending = admin(&["pending"]);
    let table = String::from_utf8_lossy(&pending.stdout);
    assert!(pending.status.success() && table.contains(&id), "{table}");
    let approved = admin(&["approve", &id]);
    assert!(
        approved.status.success(),
        "{}",
        String::from_utf8_lossy(&approved.stderr)
    );
    let granted = post("demo-org/sensitive-data").await.unwrap();
    assert_eq!(granted.status().as_u16(), 200);
    // The demo bot's key is not an admin's.
    let as_bot = std::process::Command::new(botcreds_tests::broker::binary("botcreds"))
        .arg("pending")
        .env("BOTCREDS_BROKER", &url)
        .env("BOTCREDS_API_KEY", &key)
        .output()
        .unwrap();
    assert!(!as_bot.status.success());
    child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_check_and_explain_cli() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("policy.yaml");
    std::fs::write(&good, POLICY).unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        POLICY.replace(
            "contents:read]\n    requires",
            "contents:reed]\n    requires",
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(botcreds_tests::broker::binary("botcreds"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = run(&["policy", "check", good.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("3 bots"), "{out}");
    let (ok, out) = run(&["policy", "check", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        out.contains("bad.yaml:") && out.contains("contents:reed"),
        "{out}"
    );

    let p = good.to_str().unwrap();
    // (bot, repository, permissions, succeeds, expected words)
    type Case<'a> = (Option<&'a str>, &'a str, &'a str, bool, &'a [&'a str]);
    let cases: &[Case] = &[
        (
            Some("ci-bot"),
            "acme-corp/infra",
            "contents:read",
            true,
            &["DENY", "bots.ci-bot.deny[0]"],
        ),
        (
            Some("ci-bot"),
            "acme-corp/web",
            "contents:write,pull_requests:write",
            true,
            &["ALLOW", "bots.ci-bot.auto_approve[0]"],
        ),
        (
            None,
            "acme-corp/web",
            "contents:read",
            true,
            &["REQUIRES APPROVAL", "defaults"],
        ),
        (
            Some("nobody"),
            "acme-corp/web",
            "contents:read",
            false,
            &["no bot"],
        ),
    ];
    for (bot, repo, perms, succeeds, words) in cases {
        let mut args = vec![
            "policy",
            "explain",
            "--policy",
            p,
            "--repo",
            repo,
            "--permissions",
            perms,
        ];
        if let Some(b) = bot {
            args.extend(["--bot", b]);
        }
        let (ok, out) = run(&args);
        assert_eq!(ok, *succeeds, "{args:?}: {out}");
        for w in *words {
            assert!(out.contains(w), "{args:?}: missing {w} in {out}");
        }
    }
}
