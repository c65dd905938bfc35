//! SSH deploy keys end to end: the real `botcreds` binary against the fake GitHub. A key is
//! issued once (its private key never on the broker's disk or in its log), registered at
//! GitHub with `read_only` as asked, and deleted at GitHub when it expires — also when the
//! broker was killed and restarted in between, and also when GitHub fails for a while (the
//! key is then overdue, counted and warned about, and retried).
//!
//! Time is shortened with short `ttl`s; the tests wait on the broker's own log lines, never
//! on durations.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::path::Path;
use std::time::Duration;

use botcreds_tests::broker::{BrokerBuilder, BrokerProcess};
use botcreds_tests::fake_github::{FakeGithub, FakeGithubConfig};
use serde_json::{Value, json};

const POLICY: &str = r#"
bots:
  deployer:
    identity: { type: api_key }
    auto_approve:
      - repo: "acme-corp/*"
        permissions: [contents:write]
      - kind: deploy_key
        repo: "acme-corp/web"
        permissions: [contents:write]
  ops:
    identity: { type: api_key }
defaults:
  requires_approval: false
"#;

const KEY: &str = "bck_e2eDeployerBotKey0123456789abcdefg";
const OPS_KEY: &str = "bck_e2eOpsAdminKey0123456789abcdefghij";
/// Generous bounds for a loaded machine: a wait that runs out fails the test, nothing else.
const WITHIN: Duration = Duration::from_secs(120);
const DELETED: &str = "deploy key expired and deleted at GitHub";

async fn world() -> (FakeGithub, BrokerProcess) {
    let github = FakeGithub::start(FakeGithubConfig::default()).await;
    let broker = BrokerBuilder::new(POLICY)
        .github(&github.base_url(), botcreds_tests::fixtures::APP_ID)
        .api_key("deployer", KEY)
        .api_key("ops", OPS_KEY)
        .toml("[admin]\napi_key_bots = [\"ops\"]\n")
        .start()
        .await;
    (github, broker)
}

async fn ask(broker: &BrokerProcess, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/credentials", broker.url))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .expect("request sent");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Every file under `dir`, read whole (the data directory is small).
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                hits.push(path.display().to_string());
            }
        }
    }
    hits
}

#[tokio::test]
async fn a_deploy_key_is_issued_once_and_deleted_at_expiry_across_a_restart() {
    let (github, broker) = world().await;
    let (status, key) = ask(
        &broker,
        json!({"kind": "deploy_key", "repositories": ["acme-corp/web"],
               "permissions": ["contents:read"], "ttl": "5s", "reason": "release"}),
    )
    .await;
    assert_eq!(status, 200, "{key}");
    assert_eq!(key["kind"], "deploy_key");
    assert_eq!(key["read_only"], true);
    assert_eq!(key["git"]["ssh_url"], "git@127.0.0.1:acme-corp/web.git");
    let private = key["private_key"].as_str().expect("private key");
    assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
    let credential_id = key["credential_id"].as_str().unwrap().to_string();
    let held = github.deploy_keys();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].id, key["key_id"].as_u64().unwrap());
    assert!(held[0].read_only, "read_only is sent as asked");
    assert!(held[0].title.contains(&credential_id), "{}", held[0].title);
    assert_eq!(held[0].key, key["public_key"].as_str().unwrap());
    // The deploy key's token is the broker's own: no token with administration:write was
    // handed to the bot, and the answer carries none.
    assert!(key.get("token").is_none());

    // The private key is on neither the broker's disk nor its log: no line of its body is.
    let body_lines: Vec<String> = private
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .map(str::to_string)
        .collect();
    assert!(body_lines.len() >= 3, "{}", body_lines.len());
    let nowhere = |broker: &BrokerProcess| {
        for line in &body_lines {
            assert!(
                files_containing(&broker.data_dir(), line.as_bytes()).is_empty(),
                "the private key is on the broker's disk"
            );
            assert!(
                !broker.logs().contains(line.as_str()),
                "the private key is in the log"
            );
        }
    };
    nowhere(&broker);

    // Killed before the key expires: the schedule is in the store, so the next broker
    // deletes the key all the same.
    let mut broker = broker.crash_and_restart().await;
    assert!(
        broker.wait_for_log(DELETED, WITHIN).await,
        "the restarted broker did not delete the key; log:\n{}",
        broker.logs()
    );
    assert!(github.deploy_keys().is_empty(), "the key is gone at GitHub");
    assert!(
        !files_containing(&broker.data_dir(), b"credential_expired").is_empty(),
        "credential_expired is audited"
    );
    nowhere(&broker);
    broker.stop().await;
    nowhere(&broker);
}

#[tokio::test]
async fn a_key_github_will_not_delete_is_overdue_warned_about_and_retried() {
    let (github, mut broker) = world().await;
    let (status, key) = ask(
        &broker,
        json!({"kind": "deploy_key", "repositories": ["acme-corp/web"],
               "permissions": ["contents:write"], "ttl": "2s"}),
    )
    .await;
    assert_eq!(status, 200, "{key}");
    assert_eq!(github.deploy_keys().len(), 1);
    assert!(
        !github.deploy_keys()[0].read_only,
        "contents:write is read_only false"
    );
    // GitHub answers 500 to everything for a while.
    github.fail_next(1_000_000, 500);
    assert!(
        broker
            .wait_for_log("could not be deleted at GitHub; retrying", WITHIN)
            .await,
        "no warning; log:\n{}",
        broker.logs()
    );
    let metrics = reqwest::get(format!("{}/metrics", broker.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("botcreds_deploy_key_overdue 1"),
        "{metrics}"
    );
    assert_eq!(
        github.deploy_keys().len(),
        1,
        "still there while GitHub fails"
    );
    github.fail_next(0, 500);
    assert!(
        broker.wait_for_log(DELETED, WITHIN).await,
        "not deleted after GitHub recovered; log:\n{}",
        broker.logs()
    );
    assert!(github.deploy_keys().is_empty());
    broker.stop().await;
}

#[tokio::test]
async fn a_token_rule_does_not_allow_deploy_keys_and_bad_requests_change_nothing() {
    let (github, mut broker) = world().await;
    for (body, code) in [
        (
            json!({"kind": "deploy_key", "repositories": ["acme-corp/infra"],
                   "permissions": ["contents:write"]}),
            "policy_denied",
        ),
        (
            json!({"kind": "deploy_key", "repositories": ["acme-corp/web", "acme-corp/infra"],
                   "permissions": ["contents:read"]}),
            "invalid_deploy_key_request",
        ),
        (
            json!({"kind": "deploy_key", "repositories": ["acme-corp/web"],
                   "permissions": ["administration:write"]}),
            "invalid_deploy_key_request",
        ),
        (
            json!({"kind": "deploy_key", "repositories": ["acme-corp/web"],
                   "permissions": ["contents:read"], "ttl": "25h"}),
            "ttl_too_long",
        ),
    ] {
        let (status, answer) = ask(&broker, body.clone()).await;
        assert_eq!(answer["code"], code, "{body} → {status} {answer}");
    }
    assert!(github.deploy_keys().is_empty());
    // The same bot's token under the token rule is unaffected.
    let (status, token) = ask(
        &broker,
        json!({"kind": "github_token", "repositories": ["acme-corp/infra"],
               "permissions": ["contents:write"]}),
    )
    .await;
    assert_eq!(status, 200, "{token}");
    broker.stop().await;
}

#[tokio::test]
async fn botcreds_revoke_deletes_a_deploy_key_at_github_at_once() {
    let (github, mut broker) = world().await;
    let (status, key) = ask(
        &broker,
        json!({"kind": "deploy_key", "repositories": ["acme-corp/web"],
               "permissions": ["contents:write"], "ttl": "1h"}),
    )
    .await;
    assert_eq!(status, 200, "{key}");
    let id = key["credential_id"].as_str().unwrap().to_string();
    assert_eq!(github.deploy_keys().len(), 1);

    let output = tokio::process::Command::new(botcreds_tests::broker::binary("botcreds"))
        .args(["revoke", &id, "--broker", &broker.url])
        .env("BOTCREDS_API_KEY", OPS_KEY)
        .output()
        .await
        .expect("botcreds revoke runs");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(github.deploy_keys().is_empty(), "deleted at GitHub at once");
    // Revoking it again: the broker holds no such key any more.
    let again = reqwest::Client::new()
        .post(format!("{}/v1/admin/revoke", broker.url))
        .bearer_auth(OPS_KEY)
        .json(&json!({"credential_id": id}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status().as_u16(), 404);
    broker.stop().await;
}
