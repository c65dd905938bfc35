//! End-to-end: human approvals through the real `botcreds` binary — bots asking and waiting
//! over HTTP, admins deciding with the `botcreds` CLI (tailnet identity of 127.0.0.1, or an
//! admin API key), against the fake GitHub and the fake tailscaled.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::time::Duration;

use botcreds_proto::approval::{
    ApprovalList, ApprovalRequestView, ApprovalState, AuditList, BotList, GrantList, PolicyView,
    RevokeAnswer,
};
use botcreds_proto::{ErrorCode, GithubCredential};
use botcreds_tests::broker::binary;
use botcreds_tests::fake_tailscaled::NodeBuilder;
use botcreds_tests::world::{CliRun, World, WorldBuilder, code_of, ip};
use serde_json::{Value, json};

const POLICY: &str = r#"
bots:
  ci-bot:
    identity: { tag: "tag:ci" }
    auto_approve:
      - repo: "acme-corp/web"
        permissions: [contents:read]
    requires_approval:
      - repo: "acme-corp/*"
        permissions: [contents:write]
  deploy-bot:
    identity: { tag: "tag:deploy" }
    approval_timeout: 2s
    requires_approval:
      - repo: "acme-corp/*"
        permissions: [contents:write]
  script-bot:
    identity: { type: api_key }
    auto_approve:
      - repo: "acme-corp/web"
        permissions: [contents:read]
defaults:
  requires_approval: true
  approval_timeout: 24h
"#;

/// The admin's machine: the CLI connects from 127.0.0.1.
const ADMIN: &str = "127.0.0.1";
const CI: &str = "127.0.0.2";
const DEPLOY: &str = "127.0.0.3";
const STRANGER: &str = "127.0.0.4";
const SCRIPT_KEY: &str = "bck_e2eScriptKey0123456789abcdefghij";
const OPS_KEY: &str = "bck_e2eOpsAdminKey0123456789abcdefgh";

fn setup(policy: &str) -> WorldBuilder {
    World::builder(policy)
        .api_key("script-bot", SCRIPT_KEY)
        .api_key("ops", OPS_KEY)
        .toml("[admin]\nusers = [\"alice@example.com\"]\napi_key_bots = [\"ops\"]\n")
}

async fn world() -> World {
    setup(POLICY)
        .node(
            ADMIN,
            NodeBuilder::new("alice-desk").login("alice@example.com"),
        )
        .node(CI, NodeBuilder::new("ci-bot-07").tags(["tag:ci"]))
        .node(DEPLOY, NodeBuilder::new("deploy-01").tags(["tag:deploy"]))
        .node(
            STRANGER,
            NodeBuilder::new("bobs-box").login("bob@example.com"),
        )
        .start()
        .await
}

/// Stop the broker and start it again on the same data directory and config.
async fn restart(w: World) -> World {
    w.restart().await
}

/// Run `botcreds ARGS` against the broker (tailnet identity of 127.0.0.1 unless `api_key`).
async fn cli_as(w: &World, api_key: Option<&str>, args: &[&str]) -> CliRun {
    w.run_cli(api_key, args).await
}

async fn cli(w: &World, args: &[&str]) -> CliRun {
    cli_as(w, None, args).await
}

async fn ask(w: &World, from: &str, body: Value) -> (u16, Value) {
    let resp = w
        .broker
        .client_from(ip(from))
        .post(format!("{}/v1/credentials", w.broker.url))
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json body"))
}

async fn poll(w: &World, from: &str, id: &str, wait: &str) -> (u16, Value) {
    let resp = w
        .broker
        .client_from(ip(from))
        .get(format!("{}/v1/requests/{id}?wait={wait}", w.broker.url))
        .send()
        .await
        .expect("poll");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json body"))
}

fn write_request(repo: &str) -> Value {
    json!({"kind": "github_token", "repositories": [repo], "permissions": ["contents:write"],
           "reason": "release 1.2"})
}

fn credential(status: u16, body: Value) -> GithubCredential {
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body).expect("a credential")
}

fn view(status: u16, body: Value) -> ApprovalRequestView {
    assert_eq!(status, 202, "{body}");
    serde_json::from_value(body).expect("an approval request")
}

async fn pending(w: &World) -> Vec<ApprovalRequestView> {
    cli(w, &["pending", "--json"])
        .await
        .ok()
        .json::<ApprovalList>()
        .requests
}

#[tokio::test(flavor = "multi_thread")]
async fn a_waiting_bot_gets_its_token_when_an_admin_approves_with_the_cli() {
    let mut w = world().await;
    let bot = {
        let client = w.broker.client_from(ip(CI));
        let url = format!("{}/v1/credentials", w.broker.url);
        let mut body = write_request("acme-corp/web");
        body["wait"] = json!("20s");
        tokio::spawn(async move {
            let resp = client.post(url).json(&body).send().await.expect("request");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.expect("json"))
        })
    };
    assert!(
        w.broker
            .wait_for_log("approval requested", Duration::from_secs(20))
            .await
    );
    let list = pending(&w).await;
    assert_eq!(list.len(), 1);
    let id = list[0].request_id.clone();
    assert_eq!(list[0].bot.as_deref(), Some("ci-bot"));
    assert_eq!(list[0].reason.as_deref(), Some("release 1.2"));
    let table = cli(&w, &["pending"]).await.ok();
    assert!(table.stdout.starts_with("ID"), "{}", table.stdout);
    assert!(table.stdout.contains(&id) && table.stdout.contains("acme-corp/web contents:write"));
    assert!(
        table.stderr.is_empty(),
        "no progress line off a terminal: {}",
        table.stderr
    );

    let approved = cli(&w, &["approve", &id]).await.ok();
    assert!(approved.stdout.contains("APPROVED"), "{}", approved.stdout);

    let (status, body) = bot.await.unwrap();
    let cred = credential(status, body);
    assert_eq!(cred.approval, "manual");
    assert_eq!(cred.bot, "ci-bot");
    assert!(
        w.github
            .token_info(&cred.token)
            .unwrap()
            .allows("acme-corp/web", "contents", "write")
    );

    // The grant lets the next request through without a human.
    let (status, body) = ask(&w, CI, write_request("acme-corp/web")).await;
    let again = credential(status, body);
    assert_eq!(again.approval, "grant");
    assert!(pending(&w).await.is_empty());

    let grants: GrantList = cli(&w, &["grants", "list", "--json"]).await.ok().json();
    assert_eq!(grants.grants.len(), 1);
    assert_eq!(grants.grants[0].request_id, id);
    assert_eq!(grants.grants[0].approved_by, "tailnet:alice@example.com");
    let table = cli(&w, &["grants", "list"]).await.ok();
    assert!(table.stdout.contains("live"), "{}", table.stdout);

    let bots: BotList = cli(&w, &["bots", "list", "--json"]).await.ok().json();
    let ci = bots.bots.iter().find(|b| b.name == "ci-bot").unwrap();
    assert_eq!((ci.grants, ci.pending, ci.requires_approval), (1, 0, 1));
    assert!(
        cli(&w, &["bots", "list"])
            .await
            .ok()
            .stdout
            .contains("deploy-bot")
    );

    let log: AuditList = cli(&w, &["log", "--event=approval_granted", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(log.events.len(), 1);
    assert_eq!(log.events[0].request_id.as_deref(), Some(id.as_str()));
    let log: AuditList = cli(&w, &["log", "--bot=ci-bot", "--since=1h", "--json"])
        .await
        .ok()
        .json();
    assert!(
        log.events
            .iter()
            .all(|e| e.bot.as_deref() == Some("ci-bot"))
    );
    assert!(
        log.events
            .iter()
            .any(|e| e.approval.as_deref() == Some("grant"))
    );
    let table = cli(&w, &["log"]).await.ok();
    assert!(table.stdout.contains("approval_requested") && table.stdout.contains(&id));
    assert!(
        !table.stdout.contains(&cred.token),
        "the log never shows a token"
    );

    // Revoking the credential kills it at GitHub and ends the grant.
    let revoked: RevokeAnswer = cli(&w, &["revoke", &cred.credential_id, "--json"])
        .await
        .ok()
        .json();
    assert_eq!(revoked.revoked.len(), 1);
    assert!(revoked.revoked[0].revoked_upstream);
    assert_eq!(revoked.revoked[0].holders, vec!["ci-bot".to_string()]);
    assert_eq!(revoked.grants_ended.len(), 1);
    assert!(w.github.token_info(&cred.token).unwrap().revoked);
    let grants: GrantList = cli(&w, &["grants", "list", "--json"]).await.ok().json();
    assert!(grants.grants.is_empty());
    // Unknown now: nothing live under that id.
    let again_revoke = cli(&w, &["revoke", &cred.credential_id]).await;
    assert_eq!(again_revoke.code, 6, "{}", again_revoke.stderr);
    assert!(again_revoke.stderr.contains("unknown_credential"));

    // Without the grant a human is asked again.
    let (status, body) = ask(&w, CI, write_request("acme-corp/web")).await;
    assert_ne!(view(status, body).request_id, id);
    assert!(!w.broker.logs().contains(&cred.token));
}

#[tokio::test(flavor = "multi_thread")]
async fn accepted_then_long_poll_and_only_the_owner_may_poll() {
    let w = world().await;
    let (status, body) = ask(&w, CI, write_request("acme-corp/infra")).await;
    let v = view(status, body);
    assert_eq!(v.state, ApprovalState::Pending);
    assert_eq!(v.poll_url, format!("/v1/requests/{}", v.request_id));
    // Identical asks are one request.
    let (status, body) = ask(&w, CI, write_request("acme-corp/infra")).await;
    assert_eq!(view(status, body).request_id, v.request_id);

    let (status, body) = poll(&w, CI, &v.request_id, "0s").await;
    assert_eq!(view(status, body).state, ApprovalState::Pending);
    let (status, body) = poll(&w, STRANGER, &v.request_id, "0s").await;
    assert_eq!((status, code_of(&body)), (404, ErrorCode::UnknownRequest));
    let (status, body) = poll(&w, CI, &v.request_id, "banana").await;
    assert_eq!((status, code_of(&body)), (400, ErrorCode::InvalidWait));
    let (status, body) = poll(&w, CI, &v.request_id, "2h").await;
    assert_eq!((status, code_of(&body)), (400, ErrorCode::InvalidWait));

    let waiter = {
        let client = w.broker.client_from(ip(CI));
        let url = format!("{}/v1/requests/{}?wait=60s", w.broker.url, v.request_id);
        tokio::spawn(async move {
            let resp = client.get(url).send().await.expect("poll");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.expect("json"))
        })
    };
    // An admin API key works as well as the tailnet identity.
    cli_as(&w, Some(OPS_KEY), &["approve", &v.request_id])
        .await
        .ok();
    let (status, body) = waiter.await.unwrap();
    let cred = credential(status, body);
    assert_eq!(cred.repositories, vec!["acme-corp/infra".to_string()]);

    let shown: ApprovalRequestView = w
        .broker
        .client_from(ip(ADMIN))
        .get(format!(
            "{}/v1/admin/approvals/{}",
            w.broker.url, v.request_id
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(shown.state, ApprovalState::Issued);
    assert_eq!(shown.decided_by.as_deref(), Some("api_key:ops"));
    assert_eq!(
        shown.credential_id.as_deref(),
        Some(cred.credential_id.as_str())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn deny_reaches_the_waiting_bot_and_bad_decisions_change_nothing() {
    let mut w = world().await;
    let bot = {
        let client = w.broker.client_from(ip(CI));
        let url = format!("{}/v1/credentials", w.broker.url);
        let mut body = write_request("acme-corp/web");
        body["wait"] = json!("20s");
        tokio::spawn(async move {
            let resp = client.post(url).json(&body).send().await.expect("request");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.expect("json"))
        })
    };
    assert!(
        w.broker
            .wait_for_log("approval requested", Duration::from_secs(20))
            .await
    );
    let id = pending(&w).await[0].request_id.clone();

    // Bad input: each a clear error and exit code, and nothing changes.
    let run = cli(
        &w,
        &["deny", &id, &format!("--reason={}", "x".repeat(5000))],
    )
    .await;
    assert_eq!(run.code, 8, "{}", run.stderr);
    assert!(run.stderr.contains("invalid_deny_reason"), "{}", run.stderr);
    let run = cli(
        &w,
        &["deny", &id, &format!("--reason={}", "x".repeat(100 * 1024))],
    )
    .await;
    assert_eq!(run.code, 8, "{}", run.stderr);
    let run = cli(&w, &["approve", "apr_nosuchid"]).await;
    assert_eq!(run.code, 6, "{}", run.stderr);
    assert!(run.stderr.contains("unknown_request"));
    let run = cli(&w, &["approve", &id, "--bot=deploy-bot"]).await;
    assert_eq!(run.code, 7, "{}", run.stderr);
    assert!(run.stderr.contains("wrong_bot"));
    assert_eq!(pending(&w).await.len(), 1);

    let denied = cli(&w, &["deny", &id, "--reason=not during the freeze"])
        .await
        .ok();
    assert!(denied.stdout.contains("DENIED"), "{}", denied.stdout);
    let (status, body) = bot.await.unwrap();
    assert_eq!((status, code_of(&body)), (403, ErrorCode::ApprovalDenied));
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not during the freeze")
    );

    let run = cli(&w, &["approve", &id]).await;
    assert_eq!(run.code, 7, "{}", run.stderr);
    assert!(run.stderr.contains("already_decided"));
    let (status, body) = poll(&w, CI, &id, "0s").await;
    assert_eq!((status, code_of(&body)), (403, ErrorCode::ApprovalDenied));
    assert_eq!(w.github.mint_count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn approve_all_remember_forget_and_revoke_by_bot_and_repo() {
    let w = world().await;
    for repo in ["acme-corp/web", "acme-corp/infra"] {
        let (status, body) = ask(&w, CI, write_request(repo)).await;
        view(status, body);
    }
    let (status, body) = ask(&w, DEPLOY, write_request("acme-corp/web")).await;
    let deploy_request = view(status, body);

    let run = cli(&w, &["approve", "--bot=nosuchbot", "--all"]).await;
    assert_eq!(run.code, 6, "{}", run.stderr);
    let run = cli(&w, &["approve", "--bot=ci-bot", "--all", "--persist"])
        .await
        .ok();
    assert_eq!(run.stdout.matches("APPROVED").count(), 2, "{}", run.stdout);
    assert!(run.stdout.contains("remembered as rule"));
    let left = pending(&w).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].request_id, deploy_request.request_id);

    let policy: PolicyView = cli(&w, &["policy", "show", "--json"]).await.ok().json();
    assert_eq!(policy.remembered.len(), 2);
    assert!(policy.defaults_requires_approval);
    let shown = cli(&w, &["policy", "show"]).await.ok();
    assert!(shown.stdout.contains("(remembered"), "{}", shown.stdout);
    assert!(shown.stdout.contains("bot ci-bot"));

    let web = credential_of(ask(&w, CI, write_request("acme-corp/web")).await);
    let infra = credential_of(ask(&w, CI, write_request("acme-corp/infra")).await);

    // By repository: the infra token dies, and the grant touching infra ends.
    let answer: RevokeAnswer = cli(&w, &["revoke", "--repo=acme-corp/infra", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(answer.revoked.len(), 1);
    assert_eq!(answer.revoked[0].credential_id, infra.credential_id);
    assert_eq!(answer.grants_ended.len(), 1);
    assert!(w.github.token_info(&infra.token).unwrap().revoked);
    assert!(!w.github.token_info(&web.token).unwrap().revoked);

    // By bot: everything else of ci-bot.
    let run = cli(&w, &["revoke", "--bot=ci-bot"]).await.ok();
    assert!(run.stdout.contains(&web.credential_id), "{}", run.stdout);
    assert!(w.github.token_info(&web.token).unwrap().revoked);
    let grants: GrantList = cli(&w, &["grants", "list", "--json"]).await.ok().json();
    assert!(grants.grants.is_empty());
    let all: GrantList = cli(&w, &["grants", "list", "--all", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(all.grants.len(), 2);
    assert!(
        all.grants
            .iter()
            .all(|g| g.revoked_by.as_deref() == Some("tailnet:alice@example.com"))
    );

    // The remembered rules still approve without a human, until forgotten.
    let again = credential_of(ask(&w, CI, write_request("acme-corp/web")).await);
    assert_eq!(again.approval, "auto");
    for rule in &policy.remembered {
        cli(&w, &["policy", "forget", &rule.rule_id]).await.ok();
    }
    let run = cli(&w, &["policy", "forget", &policy.remembered[0].rule_id]).await;
    assert_eq!(run.code, 6, "{}", run.stderr);
    assert!(run.stderr.contains("unknown_rule"));
    let (status, body) = ask(&w, CI, write_request("acme-corp/web")).await;
    view(status, body);

    let bad = cli(&w, &["revoke", "--repo=not a repo"]).await;
    assert_eq!(bad.code, 8, "{}", bad.stderr);
    let log: AuditList = cli(&w, &["log", "--event=grant_revoked", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(log.events.len(), 2);
    let log: AuditList = cli(&w, &["log", "--event=rule_forgotten", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(log.events.len(), 2);
    let bad = cli(&w, &["log", "--event=nonsense"]).await;
    assert_eq!(bad.code, 8, "{}", bad.stderr);
    assert!(bad.stderr.contains("invalid_filter"));
}

fn credential_of((status, body): (u16, Value)) -> GithubCredential {
    credential(status, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_undecided_request_expires() {
    let w = world().await;
    let mut body = write_request("acme-corp/web");
    body["wait"] = json!("10s");
    // deploy-bot's approval_timeout is 2s: the waiting bot hears of the expiry.
    let (status, body) = ask(&w, DEPLOY, body).await;
    assert_eq!((status, code_of(&body)), (403, ErrorCode::ApprovalExpired));
    let log: AuditList = cli(&w, &["log", "--event=approval_expired", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(log.events.len(), 1);
    let id = log.events[0].request_id.clone().unwrap();
    let run = cli(&w, &["approve", &id]).await;
    assert_eq!(run.code, 7, "{}", run.stderr);
    assert!(run.stderr.contains("request_expired"));
    assert!(pending(&w).await.is_empty());
    assert_eq!(w.github.mint_count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn pending_requests_survive_a_restart() {
    let w = world().await;
    let (status, body) = ask(&w, CI, write_request("acme-corp/web")).await;
    let v = view(status, body);
    let w = restart(w).await;
    let list = pending(&w).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].request_id, v.request_id);
    // The same ask still joins it.
    let (status, body) = ask(&w, CI, write_request("acme-corp/web")).await;
    assert_eq!(view(status, body).request_id, v.request_id);
    cli(&w, &["approve", &v.request_id]).await.ok();
    let (status, body) = poll(&w, CI, &v.request_id, "5s").await;
    credential(status, body);
}

#[tokio::test(flavor = "multi_thread")]
async fn non_admins_are_refused_and_exit_codes_are_documented() {
    let w = world().await;
    let (status, body) = ask(&w, CI, write_request("acme-corp/web")).await;
    let v = view(status, body);

    // A bot's API key is not an admin's.
    let run = cli_as(&w, Some(SCRIPT_KEY), &["pending"]).await;
    assert_eq!(run.code, 5, "{}", run.stderr);
    assert!(run.stderr.contains("forbidden"), "{}", run.stderr);
    let run = cli_as(&w, Some(SCRIPT_KEY), &["approve", &v.request_id]).await;
    assert_eq!(run.code, 5, "{}", run.stderr);
    let run = cli_as(&w, Some("bck_wrong"), &["pending"]).await;
    assert_eq!(run.code, 4, "{}", run.stderr);
    // Tailnet nodes that are not admins.
    for from in [CI, STRANGER] {
        for path in ["/v1/admin/approvals", "/v1/admin/grants", "/v1/admin/audit"] {
            let resp = w
                .broker
                .client_from(ip(from))
                .get(format!("{}{path}", w.broker.url))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 403, "{from} {path}");
        }
        let resp = w
            .broker
            .client_from(ip(from))
            .post(format!(
                "{}/v1/admin/approvals/{}/approve",
                w.broker.url, v.request_id
            ))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 403);
    }
    assert_eq!(pending(&w).await.len(), 1);

    // No broker named: usage error; nobody listening: unreachable.
    let out = tokio::process::Command::new(binary("botcreds"))
        .arg("pending")
        .env_remove("BOTCREDS_BROKER")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = tokio::process::Command::new(binary("botcreds"))
        .args(["pending", "--broker", "http://127.0.0.1:9"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(3));

    for shell in ["bash", "zsh", "fish"] {
        let run = cli(&w, &["completions", shell]).await.ok();
        assert!(run.stdout.contains("botcreds") && run.stdout.contains("approve"));
    }
}

const LITELLM_POLICY: &str = r#"
bots:
  review-bot:
    identity: { type: api_key }
    auto_approve:
      - litellm_scope: "agent:review"
  other-bot:
    identity: { type: api_key }
    auto_approve:
      - litellm_scope: "agent:review"
defaults:
  requires_approval: true
  approval_timeout: 24h
"#;
const REVIEW_KEY: &str = "bck_e2eReviewBotKey0123456789abcdefgh";
const OTHER_KEY: &str = "bck_e2eOtherBotKey0123456789abcdefghi";

#[tokio::test(flavor = "multi_thread")]
async fn revoke_deletes_litellm_keys_by_id_and_by_bot() {
    let w = World::builder(LITELLM_POLICY)
        .api_key("review-bot", REVIEW_KEY)
        .api_key("other-bot", OTHER_KEY)
        .api_key("ops", OPS_KEY)
        .toml("[admin]\napi_key_bots = [\"ops\"]\n")
        .litellm("")
        .no_tailscaled()
        .start()
        .await;
    let litellm = w.litellm.clone();
    let key_of = |bot_key: &'static str| {
        let url = format!("{}/v1/credentials", w.broker.url);
        async move {
            let resp = reqwest::Client::new()
                .post(url)
                .bearer_auth(bot_key)
                .json(&json!({"kind": "litellm_key", "scope": "agent:review"}))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 200);
            let v: Value = resp.json().await.unwrap();
            (
                v["credential_id"].as_str().unwrap().to_string(),
                v["key"].as_str().unwrap().to_string(),
            )
        }
    };
    let (review_id, review_key) = key_of(REVIEW_KEY).await;
    let (_, other_key) = key_of(OTHER_KEY).await;

    let answer: RevokeAnswer = cli_as(&w, Some(OPS_KEY), &["revoke", &review_id, "--json"])
        .await
        .ok()
        .json();
    assert_eq!(answer.revoked.len(), 1);
    assert_eq!(answer.revoked[0].credential_id, review_id);
    assert!(answer.revoked[0].revoked_upstream);
    assert!(litellm.was_deleted(&review_key));
    assert!(!litellm.was_deleted(&other_key));
    let run = cli_as(&w, Some(OPS_KEY), &["revoke", &review_id]).await;
    assert_eq!(run.code, 6, "{}", run.stderr);

    let answer: RevokeAnswer = cli_as(&w, Some(OPS_KEY), &["revoke", "--bot=other-bot", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(answer.revoked.len(), 1);
    assert_eq!(answer.revoked[0].holders, vec!["other-bot".to_string()]);
    assert!(litellm.was_deleted(&other_key));
}
