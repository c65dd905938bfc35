//! End-to-end: the real `botcreds` binary serving LiteLLM virtual keys: bot requests under the
//! policy, the key-provisioner API exactly as its design shows, the keys CLI and no plaintext key
//! on disk or in the log on every LiteLLM backend (the fake, and the real proxy when
//! `BOTCREDS_REAL_LITELLM_URL` names one); the approval flow's waits, the sweeper, a dead LiteLLM
//! and tailnet users' keys through the fake alone.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use botcreds_proto::ErrorCode;
use botcreds_tests::broker::{BrokerBuilder, BrokerProcess, binary};
use botcreds_tests::fake_github::{FakeGithub, FakeGithubConfig};
use botcreds_tests::fake_litellm::{FakeLitellm, FakeLitellmConfig, LitellmBackend, run_tag};
use botcreds_tests::fake_tailscaled::NodeBuilder;
use botcreds_tests::world::{World, call, code_of};
use serde_json::{Value, json};

const POLICY: &str = r#"
bots:
  review-bot:
    identity: { type: api_key }
    auto_approve:
      - litellm_scope: "agent:review"
      - litellm_scope: workspace
    requires_approval:
      - litellm_scope: ci
    deny:
      - litellm_scope: "agent:write"
  other-bot:
    identity: { type: api_key }
    auto_approve:
      - litellm_scope: "agent:review"
  ops:
    identity: { type: api_key }
defaults:
  requires_approval: true
  approval_timeout: 24h
"#;

const REVIEW_KEY: &str = "bck_e2eReviewBotKey0123456789abcdefgh";
const OTHER_KEY: &str = "bck_e2eOtherBotKey0123456789abcdefghi";
const OPS_KEY: &str = "bck_e2eOpsAdminKey0123456789abcdefghi";
const SECRET: &str = "provisioner-secret-e2e-0123456789";
const SONNET: &str = "claude-sonnet-4-5";
const HAIKU: &str = "claude-haiku-3-5";
/// A tailnet user's laptop and a tagged CI node, as the fake tailscaled maps them.
const LAPTOP: &str = "127.0.0.3";
const TAGGED: &str = "127.0.0.4";

async fn world(extra_litellm: &str) -> World {
    World::builder(POLICY)
        .node(
            LAPTOP,
            NodeBuilder::new("alice-laptop").login("alice@example.com"),
        )
        .node(TAGGED, NodeBuilder::new("ci-runner").tags(["tag:ci"]))
        .api_key("review-bot", REVIEW_KEY)
        .api_key("other-bot", OTHER_KEY)
        .api_key("ops", OPS_KEY)
        .litellm(extra_litellm)
        .coder()
        .toml("[admin]\napi_key_bots = [\"ops\"]\n")
        .env("BOTCREDS_PROVISIONER_SECRET", SECRET)
        .start()
        .await
}

/// The suite's requests to its world.
trait KeysWorld {
    async fn credential(&self, key: &str, body: Value) -> (u16, Value);
    async fn provisioner(&self, path: &str, secret: Option<&str>, body: Value) -> (u16, Value);
    async fn cli(&self, args: &[&str]) -> (i32, String, String);
}

impl KeysWorld for World {
    async fn credential(&self, key: &str, body: Value) -> (u16, Value) {
        call(
            self.http
                .post(self.url("/v1/credentials"))
                .bearer_auth(key)
                .json(&body),
        )
        .await
    }

    async fn provisioner(&self, path: &str, secret: Option<&str>, body: Value) -> (u16, Value) {
        let mut r = self.http.post(self.url(path)).json(&body);
        if let Some(s) = secret {
            r = r.header("X-Provisioner-Secret", s);
        }
        call(r).await
    }

    async fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = tokio::process::Command::new(binary("botcreds"))
            .args(args)
            .env("BOTCREDS_BROKER", &self.broker.url)
            .env("BOTCREDS_API_KEY", OPS_KEY)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("running botcreds");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

fn keys_of(v: &Value) -> BTreeSet<&str> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect()
}

fn set(items: &[&'static str]) -> BTreeSet<&'static str> {
    items.iter().copied().collect()
}

/// Every file under `dir`, read whole.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.push((p, bytes));
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The approval flow for LiteLLM keys: wait, approve with the CLI, grant, remember, deny,
/// and revocation by bot and by credential id.
#[tokio::test(flavor = "multi_thread")]
async fn litellm_keys_that_need_a_human_go_through_the_approval_flow() {
    let mut w = world("").await;
    let url = w.url("/v1/credentials");
    let waiting = |key: &'static str, scope: &str| {
        let (http, url) = (w.http.clone(), url.clone());
        let body =
            json!({"kind": "litellm_key", "scope": scope, "reason": "nightly", "wait": "20s"});
        tokio::spawn(async move { call(http.post(url).bearer_auth(key).json(&body)).await })
    };
    let ask = |scope: &str| json!({"kind": "litellm_key", "scope": scope});

    // review-bot's `ci` keys require approval; the bot waits for the decision.
    let bot = waiting(REVIEW_KEY, "ci");
    assert!(
        w.broker
            .wait_for_log("approval requested", Duration::from_secs(20))
            .await
    );
    let (code, out, err) = w.cli(&["pending", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    let id = list["requests"][0]["request_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(list["requests"][0]["bot"], "review-bot");
    assert_eq!(
        list["requests"][0]["resource"],
        json!({"kind": "litellm_key", "scope": "ci"})
    );
    let (_, table, _) = w.cli(&["pending"]).await;
    assert!(
        table.contains(&id) && table.contains("litellm ci"),
        "{table}"
    );
    assert!(w.litellm.calls_to("/key/generate").is_empty());

    let (code, out, err) = w.cli(&["approve", &id]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("APPROVED"), "{out}");
    let (status, cred) = bot.await.unwrap();
    assert_eq!(status, 200, "{cred}");
    assert_eq!(
        (&cred["kind"], &cred["scope"], &cred["name"], &cred["bot"]),
        (
            &json!("litellm_key"),
            &json!("ci"),
            &json!("review-bot.ci"),
            &json!("review-bot")
        )
    );
    let key = cred["key"].as_str().unwrap().to_string();
    assert_eq!(w.litellm.chat(&key, HAIKU).await.0, 200);
    let (_, polled) = call(
        w.http
            .get(w.url(&format!("/v1/requests/{id}")))
            .bearer_auth(REVIEW_KEY),
    )
    .await;
    assert_eq!(
        polled["key"], cred["key"],
        "the approved request answers the key"
    );

    // The grant lets the next request through without a human.
    let (status, again) = w.credential(REVIEW_KEY, ask("ci")).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["key"], cred["key"]);
    let (_, out, _) = w.cli(&["pending", "--json"]).await;
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["requests"],
        json!([])
    );
    let (_, out, _) = w
        .cli(&[
            "log",
            "--event=credential_issued",
            "--bot=review-bot",
            "--json",
        ])
        .await;
    assert!(
        out.contains("\"grant\"") && out.contains("\"manual\""),
        "{out}"
    );

    // Denied: other-bot's `agent:write` falls to `defaults`.
    let denied = waiting(OTHER_KEY, "agent:write");
    assert!(
        w.broker
            .wait_for_count("approval requested", 2, Duration::from_secs(20))
            .await
    );
    let (_, out, _) = w.cli(&["pending", "--json"]).await;
    let list: Value = serde_json::from_str(&out).unwrap();
    let other = list["requests"][0]["request_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(list["requests"][0]["rule"], "defaults");
    let (code, _, err) = w.cli(&["deny", &other, "--reason=no budget"]).await;
    assert_eq!(code, 0, "{err}");
    let (status, body) = denied.await.unwrap();
    assert_eq!((status, code_of(&body)), (403, ErrorCode::ApprovalDenied));
    assert!(
        body["error"].as_str().unwrap().contains("no budget"),
        "{body}"
    );

    // Revoking the bot deletes its key in LiteLLM and ends the grant.
    let (code, out, err) = w.cli(&["revoke", "--bot=review-bot", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let revoked: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        revoked["grants_ended"].as_array().unwrap().len(),
        1,
        "{revoked}"
    );
    assert_eq!(w.litellm.chat(&key, HAIKU).await.0, 401);
    let (status, body) = w.credential(REVIEW_KEY, ask("ci")).await;
    assert_eq!(status, 202, "the grant is gone: {body}");
    let id = body["request_id"].as_str().unwrap().to_string();

    // Approve + remember: a remembered litellm_scope rule; revoking the key by id ends the
    // new grant, and the remembered rule still issues without a human.
    let (code, _, err) = w.cli(&["approve", &id, "--persist"]).await;
    assert_eq!(code, 0, "{err}");
    let (status, second) = call(
        w.http
            .get(w.url(&format!("/v1/requests/{id}?wait=5s")))
            .bearer_auth(REVIEW_KEY),
    )
    .await;
    assert_eq!(status, 200, "{second}");
    let second_key = second["key"].as_str().unwrap().to_string();
    assert_ne!(second_key, key);
    let (_, shown, _) = w.cli(&["policy", "show"]).await;
    assert!(shown.contains("litellm ci (remembered"), "{shown}");
    let lk = second["credential_id"].as_str().unwrap();
    let (code, out, err) = w.cli(&["revoke", lk, "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let revoked: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        revoked["grants_ended"].as_array().unwrap().len(),
        1,
        "{revoked}"
    );
    assert_eq!(w.litellm.chat(&second_key, HAIKU).await.0, 401);
    let (_, out, _) = w.cli(&["grants", "list", "--json"]).await;
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["grants"],
        json!([])
    );
    let (status, third) = w.credential(REVIEW_KEY, ask("ci")).await;
    assert_eq!(status, 200, "{third}");
    assert_eq!(
        w.litellm
            .chat(third["key"].as_str().unwrap(), HAIKU)
            .await
            .0,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sweeper_deletes_expired_keys_in_litellm() {
    let mut w = world("sweep_interval = \"1s\"\n").await;
    let (status, sk) = w
        .provisioner(
            "/api/v1/keys/service",
            Some(SECRET),
            json!({"scope": "agent:review", "name": "pr-review-bot", "duration": "2s"}),
        )
        .await;
    assert_eq!(status, 200, "{sk}");
    let key = sk["key"].as_str().unwrap().to_string();
    assert!(
        w.broker
            .wait_for_log("LiteLLM key expired", Duration::from_secs(60))
            .await,
        "the sweeper never expired the key:\n{}",
        w.broker.logs()
    );
    assert!(w.litellm.was_deleted(&key));
    let (code, out, _) = w.cli(&["keys", "list"]).await;
    assert_eq!(code, 0);
    assert!(out.lines().nth(1).unwrap().ends_with("expired"), "{out}");
    // The name is free again.
    let (status, _) = w
        .provisioner(
            "/api/v1/keys/service",
            Some(SECRET),
            json!({"scope": "agent:review", "name": "pr-review-bot"}),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_litellm_gives_clear_errors() {
    let w = world("").await;
    let service = |name: &str| json!({"scope": "ci", "name": name});

    w.litellm.fail_next(1, 401);
    let (status, body) = w
        .provisioner("/api/v1/keys/service", Some(SECRET), service("a"))
        .await;
    assert_eq!(
        (status, body["error"].clone()),
        (502, json!("litellm auth failed"))
    );
    w.litellm.fail_next(1, 500);
    let (status, body) = w
        .provisioner("/api/v1/keys/service", Some(SECRET), service("a"))
        .await;
    assert_eq!(
        (status, body["error"].clone()),
        (502, json!("litellm error"))
    );

    w.litellm.set_down(true).await;
    let (status, body) = w
        .provisioner("/api/v1/keys/service", Some(SECRET), service("a"))
        .await;
    assert_eq!(
        (status, body["error"].clone()),
        (502, json!("upstream unavailable"))
    );
    assert!(
        body["detail"].as_str().unwrap().contains("LiteLLM"),
        "{body}"
    );
    let (status, body) = w
        .credential(
            REVIEW_KEY,
            json!({"kind": "litellm_key", "scope": "agent:review"}),
        )
        .await;
    assert_eq!(
        (status, code_of(&body)),
        (502, ErrorCode::UpstreamUnavailable)
    );
    let (code, _, err) = w.cli(&["keys", "create", "ci", "--name", "b"]).await;
    assert_eq!(code, 9, "{err}");
    assert!(err.contains("upstream_unavailable"), "{err}");

    // Back up: nothing was left half-made.
    w.litellm.set_down(false).await;
    assert!(w.litellm.live_keys().is_empty());
    let (code, out, _) = w.cli(&["keys", "list"]).await;
    assert_eq!((code, out.as_str()), (0, "no keys\n"));
    let (status, _) = w
        .provisioner("/api/v1/keys/service", Some(SECRET), service("a"))
        .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn user_keys_for_tailnet_users_and_metrics() {
    let w = world("").await;
    let from = |source: &str| w.broker.client_from(source.parse().unwrap());

    // The tailnet user of an untagged device, no body at all (as a bare curl -X POST sends).
    let (status, uk) = call(from(LAPTOP).post(w.url("/api/v1/keys/user"))).await;
    assert_eq!(status, 200, "{uk}");
    assert_eq!(uk["scope"], "user");
    let row = w
        .litellm
        .key_by_alias("alice@example.com-cli")
        .expect("user key in LiteLLM");
    assert_eq!(row.metadata["created_by"], "alice@example.com");
    assert_eq!(row.budget_duration.as_deref(), Some("1d"));
    // Naming someone else is refused; a tagged node is not a user.
    let (status, body) = call(
        from(LAPTOP)
            .post(w.url("/api/v1/keys/user"))
            .json(&json!({"coder_user": "bob"})),
    )
    .await;
    assert_eq!((status, body["error"].clone()), (403, json!("forbidden")));
    let (status, body) = call(from(TAGGED).post(w.url("/api/v1/keys/user"))).await;
    assert_eq!(
        (status, body["error"].clone()),
        (401, json!("unauthenticated"))
    );
    // Asking again replaces the key.
    let (status, again) = call(from(LAPTOP).post(w.url("/api/v1/keys/user"))).await;
    assert_eq!(status, 200);
    assert_ne!(again["key"], uk["key"]);
    assert_eq!(
        w.litellm.chat(uk["key"].as_str().unwrap(), HAIKU).await.0,
        401
    );
    assert_eq!(
        w.litellm
            .chat(again["key"].as_str().unwrap(), HAIKU)
            .await
            .0,
        200
    );

    // An admin may use the service route without the provisioner secret.
    let (status, body) = call(
        w.http
            .post(w.url("/api/v1/keys/service"))
            .bearer_auth(OPS_KEY)
            .json(&json!({"scope": "agent:write", "name": "code-gen-bot"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        w.litellm.key_by_alias("code-gen-bot").unwrap().metadata["created_by"],
        "api_key:ops"
    );
    // A bot that is no admin may not.
    let (status, body) = call(
        w.http
            .post(w.url("/api/v1/keys/service"))
            .bearer_auth(REVIEW_KEY)
            .json(&json!({"scope": "ci", "name": "x"})),
    )
    .await;
    assert_eq!(
        (status, body),
        (401, json!({"error": "invalid provisioner secret"}))
    );

    let (_, metrics) = call(w.http.get(w.url("/metrics"))).await;
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    assert!(
        metrics.contains("botcreds_litellm_keys_live{scope=\"user\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("botcreds_litellm_keys_live{scope=\"agent:write\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("botcreds_litellm_keys_generated_total 3"),
        "{metrics}"
    );

    // A key named like a route ("service") is still revoked by name.
    let (status, _) = w
        .provisioner(
            "/api/v1/keys/service",
            Some(SECRET),
            json!({"scope": "ci", "name": "service"}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = call(
        w.http
            .delete(w.url("/api/v1/keys/service"))
            .header("X-Provisioner-Secret", SECRET),
    )
    .await;
    assert_eq!((status, body["name"].clone()), (200, json!("service")));
}

// ---------------------------------------------------------------------------------------------
// The key lifecycle on every LiteLLM backend: the fake, and the REAL proxy when
// BOTCREDS_REAL_LITELLM_URL names one (tests/litellm-real/litellm_real.py). Names carry a run tag,
// since a real proxy outlives one test run.

/// The policy of [`world_on`]'s broker: `rb-<tag>` with `deny` rules `deny` (a flow list's
/// items, e.g. `{ litellm_scope: "agent:review" }`) besides the one for `agent:write`.
fn policy_on(tag: &str, deny: &str) -> String {
    format!(
        r#"
bots:
  rb-{tag}:
    identity: {{ type: api_key }}
    auto_approve: [{{ litellm_scope: "agent:review" }}, {{ litellm_scope: workspace }}]
    requires_approval: [{{ litellm_scope: ci }}]
    deny: [{{ litellm_scope: "agent:write" }}{deny}]
  ob-{tag}:
    identity: {{ type: api_key }}
    auto_approve: [{{ litellm_scope: workspace }}]
  ops:
    identity: {{ type: api_key }}
"#
    )
}

/// `botcreds ARGS` as the `ops` admin against `broker`: exit code, stdout, stderr.
async fn cli_on(broker: &BrokerProcess, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(binary("botcreds"))
        .args(args)
        .env("BOTCREDS_BROKER", &broker.url)
        .env("BOTCREDS_API_KEY", OPS_KEY)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("running botcreds");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A broker on `backend`, with bots and names tagged `tag`; Coder is always a double.
async fn world_on(
    backend: &LitellmBackend,
    tag: &str,
    master_key: &str,
) -> (BrokerProcess, FakeLitellm, FakeGithub, reqwest::Client) {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let coder = match backend.fake() {
        Some(f) => f.clone(),
        None => FakeLitellm::start(FakeLitellmConfig::default()).await,
    };
    let github = FakeGithub::start(FakeGithubConfig::default()).await;
    let broker = BrokerBuilder::new(&policy_on(tag, ""))
        .github(&github.base_url(), botcreds_tests::fixtures::APP_ID)
        .api_key(&format!("rb-{tag}"), REVIEW_KEY)
        .api_key(&format!("ob-{tag}"), OTHER_KEY)
        .api_key("ops", OPS_KEY)
        .litellm(&backend.url, master_key, "")
        .toml(&format!(
            "[coder]\nurl = \"{}\"\n\n[admin]\napi_key_bots = [\"ops\"]\n",
            coder.base_url()
        ))
        .env("BOTCREDS_PROVISIONER_SECRET", SECRET)
        .start()
        .await;
    (
        broker,
        coder,
        github,
        reqwest::Client::builder().no_proxy().build().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn key_lifecycle_on_every_litellm_backend() {
    for backend in LitellmBackend::all().await {
        let b = backend.label.as_str();
        let tag = run_tag();
        let (broker, coder, _github, http) = world_on(&backend, &tag, &backend.master_key).await;
        let url = |p: &str| format!("{}{p}", broker.url);
        let review = json!({"kind": "litellm_key", "scope": "agent:review"});

        // A bot's key: minted with metadata LiteLLM accepts, for its models only.
        let (status, cred) = call(
            http.post(url("/v1/credentials"))
                .bearer_auth(REVIEW_KEY)
                .json(&review),
        )
        .await;
        assert_eq!(status, 200, "{b}: {cred}");
        let key = cred["key"].as_str().unwrap().to_string();
        let name = format!("rb-{tag}.agent-review");
        assert_eq!(cred["name"], name.as_str(), "{b}");
        assert_eq!(
            backend.models_of(&key).await,
            (200, vec![HAIKU.to_string()]),
            "{b}"
        );
        let row = backend
            .key_by_alias(&name)
            .await
            .unwrap_or_else(|| panic!("{b}: no key {name}"));
        assert_eq!(row["max_budget"], 2.0, "{b}: {row}");
        assert_eq!(row["key_type"], "llm_api", "{b}");
        assert_eq!(
            row["metadata"]["botcreds_bot"],
            format!("rb-{tag}").as_str(),
            "{b}"
        );
        assert!(row["metadata"].get("workspace_id").is_none(), "{b}: {row}");
        // Asking again answers the same key; releasing deletes it in LiteLLM.
        let (_, again) = call(
            http.post(url("/v1/credentials"))
                .bearer_auth(REVIEW_KEY)
                .json(&review),
        )
        .await;
        assert_eq!(again["key"], cred["key"], "{b}");
        let (status, rel) = call(
            http.post(url("/v1/credentials/release"))
                .bearer_auth(REVIEW_KEY)
                .json(&json!({"credential_id": cred["credential_id"]})),
        )
        .await;
        assert_eq!(
            (status, &rel["deleted_upstream"]),
            (200, &json!(true)),
            "{b}: {rel}"
        );
        assert_eq!(
            backend.models_of(&key).await.0,
            401,
            "{b}: a released key is dead"
        );

        // The startup script's workspace key: the workspace id is kept as coder_workspace_id.
        let ws_name = format!("ws-{tag}");
        let ws = json!({"workspace_id": format!("wsid-{tag}"), "workspace_name": ws_name, "coder_user": "alice", "coder_user_id": "usr-alice"});
        let (status, wk) = call(
            http.post(url("/api/v1/keys/workspace"))
                .header("X-Provisioner-Secret", SECRET)
                .json(&ws),
        )
        .await;
        assert_eq!(status, 200, "{b}: {wk}");
        assert_eq!(
            wk["metadata"], ws,
            "{b}: the provisioner API keeps the design's names"
        );
        let ws_key = wk["key"].as_str().unwrap().to_string();
        assert_eq!(
            backend.models_of(&ws_key).await,
            (200, vec![HAIKU.to_string(), SONNET.to_string()]),
            "{b}"
        );
        let row = backend
            .key_by_alias(&ws_name)
            .await
            .unwrap_or_else(|| panic!("{b}: no key {ws_name}"));
        assert_eq!(
            row["metadata"]["coder_workspace_id"],
            format!("wsid-{tag}").as_str(),
            "{b}: {row}"
        );
        assert_eq!(row["budget_duration"], "1d", "{b}");
        let (_, again) = call(
            http.post(url("/api/v1/keys/workspace"))
                .header("X-Provisioner-Secret", SECRET)
                .json(&ws),
        )
        .await;
        assert_eq!(
            again["key"], wk["key"],
            "{b}: a live workspace key comes back"
        );
        // Another bot naming that workspace gets nothing, and the key lives on.
        let theft = json!({"kind": "litellm_key", "scope": "workspace", "workspace": ws});
        let (status, body) = call(
            http.post(url("/v1/credentials"))
                .bearer_auth(OTHER_KEY)
                .json(&theft),
        )
        .await;
        assert_eq!(
            (status, code_of(&body)),
            (403, ErrorCode::Forbidden),
            "{b}: {body}"
        );
        assert_eq!(backend.models_of(&ws_key).await.0, 200, "{b}");

        // A service key: a second one of the name is refused; rotation and revocation reach LiteLLM.
        let svc = format!("svc-{tag}");
        let (status, sk) = call(
            http.post(url("/api/v1/keys/service"))
                .header("X-Provisioner-Secret", SECRET)
                .json(&json!({"scope": "ci", "name": svc})),
        )
        .await;
        assert_eq!(status, 200, "{b}: {sk}");
        let (status, body) = call(
            http.post(url("/api/v1/keys/service"))
                .header("X-Provisioner-Secret", SECRET)
                .json(&json!({"scope": "ci", "name": svc})),
        )
        .await;
        assert_eq!(
            (status, body["error"].clone()),
            (409, json!("key exists")),
            "{b}"
        );
        let (status, rotated) = call(
            http.post(url(&format!("/v1/keys/{svc}/rotate")))
                .bearer_auth(OPS_KEY),
        )
        .await;
        assert_eq!(status, 200, "{b}: {rotated}");
        assert_eq!(
            backend.models_of(sk["key"].as_str().unwrap()).await.0,
            401,
            "{b}: the old key is deleted"
        );
        let new_key = rotated["key"].as_str().unwrap().to_string();
        assert_eq!(backend.models_of(&new_key).await.0, 200, "{b}");
        let (status, body) = call(
            http.delete(url(&format!("/api/v1/keys/{svc}")))
                .header("X-Provisioner-Secret", SECRET),
        )
        .await;
        assert_eq!(
            (status, &body["revoked"]),
            (200, &json!(true)),
            "{b}: {body}"
        );
        assert_eq!(
            backend.models_of(&new_key).await.0,
            401,
            "{b}: a revoked key is dead"
        );

        // A Coder user's key; asking again replaces it.
        let user = format!("u{tag}");
        coder.add_coder_session(
            &format!("session-{tag}-0123456789"),
            &format!("id-{tag}"),
            &user,
        );
        let (status, uk) = call(
            http.post(url("/api/v1/keys/user"))
                .bearer_auth(format!("session-{tag}-0123456789")),
        )
        .await;
        assert_eq!(status, 200, "{b}: {uk}");
        let (_, uk2) = call(
            http.post(url("/api/v1/keys/user"))
                .bearer_auth(format!("session-{tag}-0123456789")),
        )
        .await;
        assert_ne!(uk2["key"], uk["key"], "{b}");
        assert_eq!(
            backend.models_of(uk["key"].as_str().unwrap()).await.0,
            401,
            "{b}"
        );
        assert_eq!(
            backend.models_of(uk2["key"].as_str().unwrap()).await.0,
            200,
            "{b}"
        );

        // A key that needs a human: approved with `botcreds approve`, then answered to the bot.
        let (status, pending) = call(
            http.post(url("/v1/credentials"))
                .bearer_auth(REVIEW_KEY)
                .json(&json!({"kind": "litellm_key", "scope": "ci"})),
        )
        .await;
        assert_eq!(status, 202, "{b}: {pending}");
        let id = pending["request_id"].as_str().unwrap().to_string();
        let cli = |args: Vec<String>| {
            let broker_url = broker.url.clone();
            async move {
                let out = tokio::process::Command::new(binary("botcreds"))
                    .args(&args)
                    .env("BOTCREDS_BROKER", broker_url)
                    .env("BOTCREDS_API_KEY", OPS_KEY)
                    .stdin(Stdio::null())
                    .output()
                    .await
                    .expect("running botcreds");
                (
                    out.status.code().unwrap_or(-1),
                    String::from_utf8_lossy(&out.stdout).into_owned(),
                )
            }
        };
        let (code, out) = cli(vec!["approve".into(), id.clone()]).await;
        assert_eq!(code, 0, "{b}: {out}");
        let (status, approved) = call(
            http.get(url(&format!("/v1/requests/{id}")))
                .bearer_auth(REVIEW_KEY),
        )
        .await;
        assert_eq!(status, 200, "{b}: {approved}");
        let ci_key = approved["key"].as_str().unwrap().to_string();
        assert_eq!(
            backend.models_of(&ci_key).await,
            (200, vec![HAIKU.to_string()]),
            "{b}"
        );

        // `botcreds keys`: create, rotate, revoke, each reaching LiteLLM.
        let cli_name = format!("cli-{tag}");
        let (code, out) = cli([
            "keys", "create", "ci", "--name", &cli_name, "--budget", "3", "--json",
        ]
        .map(String::from)
        .to_vec())
        .await;
        assert_eq!(code, 0, "{b}: {out}");
        let created: Value = serde_json::from_str(&out).unwrap();
        let first = created["key"].as_str().unwrap().to_string();
        assert_eq!(backend.models_of(&first).await.0, 200, "{b}");
        let row = backend
            .key_by_alias(&cli_name)
            .await
            .expect("cli key in LiteLLM");
        assert_eq!(row["max_budget"], 3.0, "{b}: {row}");
        let (code, out) = cli(["keys", "rotate", "--name", &cli_name, "--json"]
            .map(String::from)
            .to_vec())
        .await;
        assert_eq!(code, 0, "{b}: {out}");
        let second: Value = serde_json::from_str(&out).unwrap();
        let second = second["key"].as_str().unwrap().to_string();
        assert_eq!(backend.models_of(&first).await.0, 401, "{b}");
        assert_eq!(backend.models_of(&second).await.0, 200, "{b}");
        let (code, out) = cli(["keys", "revoke", "--name", &cli_name]
            .map(String::from)
            .to_vec())
        .await;
        assert_eq!(code, 0, "{b}: {out}");
        assert_eq!(backend.models_of(&second).await.0, 401, "{b}");

        // Clean up what lives on, so a real proxy shared by later runs holds nothing of ours.
        for name in [
            ws_name.clone(),
            format!("{user}-cli"),
            format!("rb-{tag}.ci"),
        ] {
            let (status, body) = call(
                http.delete(url(&format!("/v1/keys/{name}")))
                    .bearer_auth(OPS_KEY),
            )
            .await;
            assert_eq!(status, 200, "{b}: revoking {name}: {body}");
        }
        assert_eq!(backend.models_of(&ws_key).await.0, 401, "{b}");
        drop(broker);

        // A broker holding the wrong master key: LiteLLM's refusal of the credential is
        // litellm_auth_failed, told apart from a refused request.
        let (wrong, _, _github, http) =
            world_on(&backend, &tag, "sk-not-the-master-key-0000").await;
        let (status, body) = call(
            http.post(format!("{}/api/v1/keys/service", wrong.url))
                .header("X-Provisioner-Secret", SECRET)
                .json(&json!({"scope": "ci", "name": format!("never-{tag}")})),
        )
        .await;
        assert_eq!(
            (status, body["error"].clone()),
            (502, json!("litellm auth failed")),
            "{b}: {body}"
        );
    }
}

/// The bot route on every backend: the answer and what LiteLLM stores, reuse, refusals that
/// mint nothing, a workspace key, release by its holder only, and a reload that denies the
/// scope deleting the live key in LiteLLM (audited as the policy's doing).
#[tokio::test(flavor = "multi_thread")]
async fn bot_keys_refusals_release_and_reload_on_every_litellm_backend() {
    for backend in LitellmBackend::all().await {
        let b = backend.label.as_str();
        let tag = run_tag();
        let (mut broker, _coder, _github, http) =
            world_on(&backend, &tag, &backend.master_key).await;
        let base = broker.url.clone();
        let url = |p: &str| format!("{base}{p}");
        let ask =
            |scope: &str| json!({"kind": "litellm_key", "scope": scope, "reason": "review PRs"});
        let credential = |key: &str, body: Value| {
            call(
                http.post(url("/v1/credentials"))
                    .bearer_auth(key)
                    .json(&body),
            )
        };
        let bot = format!("rb-{tag}");
        let name = format!("{bot}.agent-review");

        let (status, cred) = credential(REVIEW_KEY, ask("agent:review")).await;
        assert_eq!(status, 200, "{b}: {cred}");
        for (field, want) in [
            ("kind", json!("litellm_key")),
            ("scope", json!("agent:review")),
            ("name", json!(name)),
            ("budget_usd", json!(2.0)),
            ("budget_period", json!("run")),
            ("rpm_limit", json!(60)),
            ("models", json!([HAIKU])),
            ("bot", json!(bot)),
            ("base_url", json!(format!("{}/v1", backend.url))),
        ] {
            assert_eq!(cred[field], want, "{b}: {field} of {cred}");
        }
        assert!(cred["credential_id"].as_str().unwrap().starts_with("lk_"));
        let key = cred["key"].as_str().unwrap().to_string();
        assert_eq!(
            backend.models_of(&key).await,
            (200, vec![HAIKU.to_string()]),
            "{b}"
        );
        // What LiteLLM stores: the reference's fields and the design's metadata.
        let row = backend
            .key_by_alias(&name)
            .await
            .unwrap_or_else(|| panic!("{b}: no key {name}"));
        assert_eq!(row["max_budget"], 2.0, "{b}: {row}");
        assert_eq!(row["rpm_limit"], 60, "{b}: {row}");
        assert!(
            row["budget_duration"].is_null(),
            "{b}: per-run budgets never reset: {row}"
        );
        let meta = &row["metadata"];
        for field in [
            "scope",
            "key_type",
            "created_by",
            "created_at",
            "coder_workspace_id",
            "workspace_name",
            "coder_user",
            "coder_user_id",
            "expires_at",
            "budget_usd",
            "rpm_limit",
            "models",
        ] {
            assert!(
                meta.get(field).is_some(),
                "{b}: metadata lacks {field}: {meta}"
            );
        }
        assert_eq!(
            (meta["key_type"].clone(), meta["scope"].clone()),
            (json!("virtual"), json!("agent:review")),
            "{b}: {meta}"
        );

        // What the broker asked the double for: the reference's fields, and who changed it.
        if let Some(fake) = backend.fake() {
            let generated = fake.calls_to("/key/generate");
            assert_eq!(generated.len(), 1);
            let body = &generated[0].body;
            assert_eq!(body["key_alias"], name.as_str());
            assert_eq!(body["duration"], "3600s");
            assert_eq!(body["max_budget"], json!(2.0));
            assert_eq!(body["rpm_limit"], 60);
            assert_eq!(body["key_type"], "llm_api");
            assert!(
                body.get("budget_duration").is_none(),
                "per-run budgets never reset"
            );
            assert_eq!(body["metadata"]["botcreds_bot"], bot.as_str());
            assert_eq!(generated[0].changed_by.as_deref(), Some("botcreds"));
        }

        // Asking again answers the same live key.
        let (status, again) = credential(REVIEW_KEY, ask("agent:review")).await;
        assert_eq!((status, &again["key"]), (200, &cred["key"]), "{b}: {again}");

        // Deny, approval and bad input mint nothing in LiteLLM.
        let (status, body) = credential(REVIEW_KEY, ask("agent:write")).await;
        assert_eq!(
            (status, code_of(&body)),
            (403, ErrorCode::PolicyDenied),
            "{b}"
        );
        assert!(
            body["rule"].as_str().unwrap().contains("deny"),
            "{b}: {body}"
        );
        let (status, body) = credential(REVIEW_KEY, ask("ci")).await;
        assert_eq!(
            (status, &body["state"]),
            (202, &json!("PENDING")),
            "{b}: {body}"
        );
        let refusals = [
            (ask("gpu"), ErrorCode::InvalidScope),
            (
                json!({"kind": "litellm_key", "scope": "workspace"}),
                ErrorCode::InvalidWorkspace,
            ),
            (
                json!({"kind": "litellm_key", "scope": "agent:review", "ttl": "5h"}),
                ErrorCode::TtlTooLong,
            ),
        ];
        for (body, code) in refusals {
            let (status, answer) = credential(REVIEW_KEY, body.clone()).await;
            assert_eq!((status, code_of(&answer)), (400, code), "{b}: {body}");
        }
        for alias in [format!("{bot}.agent-write"), format!("{bot}.ci")] {
            assert!(
                backend.key_by_alias(&alias).await.is_none(),
                "{b}: {alias} was minted"
            );
        }

        if let Some(fake) = backend.fake() {
            assert_eq!(fake.calls_to("/key/generate").len(), 1, "one mint so far");
        }

        // A workspace key through the policy, for the agent.
        let ws_name = format!("dev-{tag}");
        let ws = json!({"workspace_id": format!("wsid-{tag}"), "workspace_name": ws_name, "coder_user": "alice", "coder_user_id": "usr-1"});
        let (status, wk) = credential(
            REVIEW_KEY,
            json!({"kind": "litellm_key", "scope": "workspace", "workspace": ws}),
        )
        .await;
        assert_eq!(status, 200, "{b}: {wk}");
        assert_eq!(
            (wk["name"].clone(), wk["budget_period"].clone()),
            (json!(ws_name), json!("day")),
            "{b}"
        );

        // Release: only by its holder; then the key is dead at the proxy.
        let release = |who: &str| {
            call(
                http.post(url("/v1/credentials/release"))
                    .bearer_auth(who)
                    .json(&json!({"credential_id": cred["credential_id"]})),
            )
        };
        let (status, body) = release(OTHER_KEY).await;
        assert_eq!(
            (status, code_of(&body)),
            (404, ErrorCode::UnknownCredential),
            "{b}"
        );
        assert_eq!(backend.models_of(&key).await.0, 200, "{b}: not released");
        let (status, body) = release(REVIEW_KEY).await;
        assert_eq!(
            (status, &body["released"], &body["deleted_upstream"]),
            (200, &json!(true), &json!(true)),
            "{b}: {body}"
        );
        assert_eq!(backend.models_of(&key).await.0, 401, "{b}");

        // A reload that denies the scope deletes the live key in LiteLLM, as the policy's doing.
        let (status, cred) = credential(REVIEW_KEY, ask("agent:review")).await;
        assert_eq!(status, 200, "{b}: {cred}");
        let key = cred["key"].as_str().unwrap().to_string();
        let loads = broker.log_count("policy reloaded");
        std::fs::write(
            &broker.policy_path,
            policy_on(&tag, r#", { litellm_scope: "agent:review" }"#),
        )
        .unwrap();
        broker.signal("HUP");
        assert!(
            broker
                .wait_for_count("policy reloaded", loads + 1, Duration::from_secs(30))
                .await,
            "{b}: no reload"
        );
        assert_eq!(
            backend.models_of(&key).await.0,
            401,
            "{b}: the key lives on"
        );
        let (status, log) = call(
            http.get(url("/v1/admin/audit?event=credential_revoked"))
                .bearer_auth(OPS_KEY),
        )
        .await;
        assert_eq!(status, 200, "{b}: {log}");
        let revoked: Vec<(Value, Value)> = log["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["token_id"] == cred["credential_id"])
            .map(|e| (e["caller"].clone(), e["reason"].clone()))
            .collect();
        assert_eq!(
            revoked,
            vec![(json!("policy"), json!("the policy now denies it"))],
            "{b}"
        );
        let (status, body) = credential(REVIEW_KEY, ask("agent:review")).await;
        assert_eq!(
            (status, code_of(&body)),
            (403, ErrorCode::PolicyDenied),
            "{b}: {body}"
        );

        // Clean up what lives on, so a real proxy shared by later runs holds nothing of ours.
        let (status, body) = call(
            http.delete(url(&format!("/v1/keys/{ws_name}")))
                .bearer_auth(OPS_KEY),
        )
        .await;
        assert_eq!(status, 200, "{b}: revoking {ws_name}: {body}");
    }
}

/// The key-provisioner API on every backend: the design's bodies, what LiteLLM stores, bad
/// input minting nothing, revocation by name, and no plaintext key (nor the master key) on
/// the broker's disk or in its log.
#[tokio::test(flavor = "multi_thread")]
async fn provisioner_api_bodies_on_every_litellm_backend() {
    for backend in LitellmBackend::all().await {
        let b = backend.label.as_str();
        let tag = run_tag();
        let (mut broker, coder, _github, http) =
            world_on(&backend, &tag, &backend.master_key).await;
        let base = broker.url.clone();
        let url = |p: &str| format!("{base}{p}");
        let provisioner = |path: &str, secret: Option<&str>, body: Value| {
            let mut r = http.post(url(path)).json(&body);
            if let Some(s) = secret {
                r = r.header("X-Provisioner-Secret", s);
            }
            call(r)
        };
        let mut handed_out: Vec<String> = Vec::new();
        let ws_name = format!("ca-{tag}");
        let workspace = json!({
            "workspace_id": format!("ws-{tag}"),
            "workspace_name": ws_name,
            "coder_user": "alice",
            "coder_user_id": "usr-def456"
        });

        for secret in [Some("wrong"), None] {
            let (status, body) =
                provisioner("/api/v1/keys/workspace", secret, workspace.clone()).await;
            assert_eq!(
                (status, body),
                (401, json!({"error": "invalid provisioner secret"})),
                "{b}"
            );
        }

        let (status, ws) =
            provisioner("/api/v1/keys/workspace", Some(SECRET), workspace.clone()).await;
        assert_eq!(status, 200, "{b}: {ws}");
        assert_eq!(
            keys_of(&ws),
            set(&[
                "key",
                "scope",
                "budget_usd",
                "rpm_limit",
                "models",
                "expires_at",
                "metadata"
            ]),
            "{b}"
        );
        assert_eq!(
            (
                ws["scope"].clone(),
                ws["budget_usd"].clone(),
                ws["rpm_limit"].clone(),
                ws["models"].clone(),
                ws["metadata"].clone()
            ),
            (
                json!("workspace"),
                json!(5.0),
                json!(30),
                json!([SONNET, HAIKU]),
                workspace.clone()
            ),
            "{b}"
        );
        let ws_key = ws["key"].as_str().unwrap().to_string();
        handed_out.push(ws_key.clone());
        assert_eq!(
            backend.models_of(&ws_key).await,
            (200, vec![HAIKU.to_string(), SONNET.to_string()]),
            "{b}"
        );
        let row = backend
            .key_by_alias(&ws_name)
            .await
            .unwrap_or_else(|| panic!("{b}: no key {ws_name}"));
        assert_eq!(row["budget_duration"], "1d", "{b}: {row}");
        assert_eq!(
            (
                row["metadata"]["created_by"].clone(),
                row["metadata"]["coder_workspace_id"].clone()
            ),
            (json!("key-provisioner"), json!(format!("ws-{tag}"))),
            "{b}: {row}"
        );
        // Idempotent: the live key comes back.
        let (status, again) =
            provisioner("/api/v1/keys/workspace", Some(SECRET), workspace.clone()).await;
        assert_eq!((status, &again["key"]), (200, &ws["key"]), "{b}");
        let (status, body) = provisioner(
            "/api/v1/keys/workspace",
            Some(SECRET),
            json!({"workspace_id": "x"}),
        )
        .await;
        assert_eq!(
            (status, &body["error"]),
            (400, &json!("invalid workspace")),
            "{b}"
        );

        // A service key, as manage-service-keys.sh asks; a second of the name is refused.
        let svc = format!("gha-{tag}");
        let service = json!({"scope": "ci", "name": svc, "budget_usd": 10, "duration": "1h"});
        let (status, sk) = provisioner("/api/v1/keys/service", Some(SECRET), service.clone()).await;
        assert_eq!(status, 200, "{b}: {sk}");
        assert_eq!(
            keys_of(&sk),
            set(&[
                "key",
                "scope",
                "name",
                "budget_usd",
                "rpm_limit",
                "models",
                "expires_at"
            ]),
            "{b}"
        );
        assert_eq!(
            (
                sk["scope"].clone(),
                sk["name"].clone(),
                sk["budget_usd"].clone(),
                sk["rpm_limit"].clone(),
                sk["models"].clone()
            ),
            (
                json!("ci"),
                json!(svc),
                json!(10.0),
                json!(120),
                json!([HAIKU])
            ),
            "{b}"
        );
        let row = backend
            .key_by_alias(&svc)
            .await
            .unwrap_or_else(|| panic!("{b}: no key {svc}"));
        assert_eq!(
            (row["max_budget"].clone(), row["rpm_limit"].clone()),
            (json!(10.0), json!(120)),
            "{b}: {row}"
        );
        let sk_key = sk["key"].as_str().unwrap().to_string();
        handed_out.push(sk_key.clone());
        let (status, body) = provisioner("/api/v1/keys/service", Some(SECRET), service).await;
        assert_eq!((status, &body["error"]), (409, &json!("key exists")), "{b}");

        // Bad input: clear errors, nothing minted.
        let bad_name = format!("bad-{tag}");
        let bad = [
            (
                json!({"scope": "ci", "name": bad_name, "budget_usd": "ten"}),
                "invalid budget",
            ),
            (
                json!({"scope": "ci", "name": bad_name, "budget_usd": -1}),
                "invalid budget",
            ),
            (
                json!({"scope": "ci", "name": bad_name, "budget_usd": 11}),
                "invalid budget",
            ),
            (
                json!({"scope": "ci", "name": bad_name, "duration": "soon"}),
                "invalid duration",
            ),
            (
                json!({"scope": "ci", "name": bad_name, "duration": "3h"}),
                "invalid duration",
            ),
            (json!({"scope": "gpu", "name": bad_name}), "invalid scope"),
            (
                json!({"scope": "workspace", "name": bad_name}),
                "invalid scope",
            ),
            (
                json!({"scope": "ci", "name": format!("a b{tag}")}),
                "invalid key name",
            ),
        ];
        for (body, error) in bad {
            let (status, answer) =
                provisioner("/api/v1/keys/service", Some(SECRET), body.clone()).await;
            assert_eq!(
                (status, &answer["error"]),
                (400, &json!(error)),
                "{b}: {body}: {answer}"
            );
            assert!(answer["detail"].is_string(), "{b}: {answer}");
        }
        assert!(
            backend.key_by_alias(&bad_name).await.is_none(),
            "{b}: minted"
        );
        if let Some(fake) = backend.fake() {
            assert_eq!(
                fake.calls_to("/key/generate").len(),
                2,
                "the workspace key (once) and the service key"
            );
        }

        // A user key with a Coder session token (Coder is a double on every backend).
        let user = format!("u{tag}");
        coder.add_coder_session(&format!("sess-{tag}"), "usr-def456", &user);
        let user_key = |token: String| {
            call(
                http.post(url("/api/v1/keys/user"))
                    .bearer_auth(token)
                    .json(&json!({"coder_user": user})),
            )
        };
        let (status, uk) = user_key(format!("sess-{tag}")).await;
        assert_eq!(status, 200, "{b}: {uk}");
        assert_eq!(
            keys_of(&uk),
            set(&[
                "key",
                "scope",
                "budget_usd",
                "rpm_limit",
                "models",
                "expires_at"
            ]),
            "{b}"
        );
        assert_eq!(
            (
                uk["scope"].clone(),
                uk["budget_usd"].clone(),
                uk["rpm_limit"].clone()
            ),
            (json!("user"), json!(20.0), json!(60)),
            "{b}"
        );
        handed_out.push(uk["key"].as_str().unwrap().to_string());
        let (status, body) = user_key(format!("sess-nobody-{tag}")).await;
        assert_eq!(
            (status, &body["error"]),
            (401, &json!("invalid session token")),
            "{b}"
        );

        // Revocation by name: the design's bodies; the key is dead at the proxy at once.
        let delete = |name: &str, secret: &str| {
            call(
                http.delete(url(&format!("/api/v1/keys/{name}")))
                    .header("X-Provisioner-Secret", secret.to_string()),
            )
        };
        let (status, body) = delete(&svc, "wrong").await;
        assert_eq!(
            (status, body),
            (401, json!({"error": "invalid provisioner secret"})),
            "{b}"
        );
        assert_eq!(backend.models_of(&sk_key).await.0, 200, "{b}: not revoked");
        let (status, body) = delete(&svc, SECRET).await;
        assert_eq!(status, 200, "{b}: {body}");
        assert_eq!(
            keys_of(&body),
            set(&["revoked", "name", "revoked_at"]),
            "{b}"
        );
        assert_eq!(
            (&body["revoked"], &body["name"]),
            (&json!(true), &json!(svc)),
            "{b}"
        );
        assert_eq!(backend.models_of(&sk_key).await.0, 401, "{b}");
        if let Some(fake) = backend.fake() {
            assert!(fake.was_deleted(&sk_key));
        }
        let (status, body) = delete(&svc, SECRET).await;
        assert_eq!(
            (status, body),
            (404, json!({"error": "key not found", "name": svc})),
            "{b}"
        );

        // Clean up what lives on (a real proxy outlives the run), then look at the disk.
        for name in [ws_name.clone(), format!("{user}-cli")] {
            let (status, body) = delete(&name, SECRET).await;
            assert_eq!(status, 200, "{b}: revoking {name}: {body}");
        }
        assert_eq!(backend.models_of(&ws_key).await.0, 401, "{b}");
        broker.stop().await;
        let files = files_under(&broker.data_dir());
        assert!(
            files.iter().any(|(_, bytes)| contains(bytes, &svc)),
            "{b}: the scan reads the broker's key records"
        );
        let logs = broker.logs();
        for secret in handed_out
            .iter()
            .map(String::as_str)
            .chain([backend.master_key.as_str(), SECRET])
        {
            for (path, bytes) in &files {
                assert!(
                    !contains(bytes, secret),
                    "{b}: a secret is in {}",
                    path.display()
                );
            }
            assert!(
                !logs.contains(secret),
                "{b}: a secret is in the broker's log"
            );
        }
        assert!(
            logs.contains("LiteLLM key issued"),
            "{b}: the log is the broker's"
        );
    }
}

/// `botcreds keys` on every backend: the CLI's output, the list, rotation and revocation
/// reaching LiteLLM, and its exit codes.
#[tokio::test(flavor = "multi_thread")]
async fn keys_cli_output_on_every_litellm_backend() {
    for backend in LitellmBackend::all().await {
        let b = backend.label.as_str();
        let tag = run_tag();
        let (broker, _coder, _github, _http) = world_on(&backend, &tag, &backend.master_key).await;
        let name = format!("gha-{tag}");
        let (code, out, err) = cli_on(
            &broker,
            &[
                "keys",
                "create",
                "ci",
                "--name",
                &name,
                "--budget",
                "10",
                "--duration",
                "1h",
            ],
        )
        .await;
        assert_eq!(code, 0, "{b}: {err}");
        assert!(
            out.starts_with("✓ CI key created\nKey:     sk-"),
            "{b}: {out}"
        );
        assert!(out.contains("Budget:  $10/run"), "{b}: {out}");
        let first = out
            .lines()
            .nth(1)
            .unwrap()
            .trim_start_matches("Key:")
            .trim()
            .to_string();
        assert_eq!(backend.models_of(&first).await.0, 200, "{b}");

        let (code, out, _) = cli_on(&broker, &["keys", "list"]).await;
        assert_eq!(code, 0, "{b}");
        let mut lines = out.lines();
        let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            header,
            ["SCOPE", "NAME", "BUDGET", "RPM", "EXPIRES", "STATUS"],
            "{b}"
        );
        let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            (row[0], row[1], row[2], row[3], row[5]),
            ("ci", name.as_str(), "$10/run", "120", "active"),
            "{b}"
        );
        assert!(!out.contains(&first), "{b}: list never shows keys");

        let (code, out, _) = cli_on(&broker, &["keys", "rotate", "--name", &name]).await;
        assert_eq!(code, 0, "{b}: {out}");
        assert!(
            out.starts_with(&format!(
                "✓ Key \"{name}\" rotated\nOld key revoked\nNew key: sk-"
            )),
            "{b}: {out}"
        );
        let second = out
            .lines()
            .nth(2)
            .unwrap()
            .trim_start_matches("New key:")
            .trim()
            .to_string();
        assert_ne!(first, second, "{b}");
        assert_eq!(backend.models_of(&first).await.0, 401, "{b}");
        assert_eq!(backend.models_of(&second).await.0, 200, "{b}");
        let row = backend
            .key_by_alias(&name)
            .await
            .unwrap_or_else(|| panic!("{b}: no key {name}"));
        assert_eq!(
            (row["max_budget"].clone(), row["key_name"].clone()),
            (
                json!(10.0),
                json!(format!("sk-...{}", &second[second.len() - 4..]))
            ),
            "{b}: {row}"
        );

        let (code, out, _) = cli_on(&broker, &["keys", "list", "--json"]).await;
        assert_eq!(code, 0, "{b}");
        let list: Value = serde_json::from_str(&out).unwrap();
        let statuses: BTreeSet<&str> = list["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["status"].as_str().unwrap())
            .collect();
        assert_eq!(statuses, set(&["active", "revoked"]), "{b}");

        let (code, out, _) = cli_on(&broker, &["keys", "revoke", "--name", &name]).await;
        assert_eq!(
            (code, out),
            (0, format!("✓ Key \"{name}\" revoked\n")),
            "{b}"
        );
        assert_eq!(backend.models_of(&second).await.0, 401, "{b}");
        let (code, _, err) = cli_on(&broker, &["keys", "revoke", "--name", &name]).await;
        assert_eq!(code, 6, "{b}: {err}");
        assert!(err.contains("key_not_found"), "{b}: {err}");
        let (code, _, err) = cli_on(
            &broker,
            &[
                "keys",
                "create",
                "ci",
                "--name",
                &format!("x-{tag}"),
                "--budget",
                "lots",
            ],
        )
        .await;
        assert_eq!(code, 8, "{b}: {err}");
        assert!(err.contains("invalid_budget"), "{b}: {err}");
        assert!(
            backend.key_by_alias(&format!("x-{tag}")).await.is_none(),
            "{b}"
        );
        // Not an admin: refused.
        let out = tokio::process::Command::new(binary("botcreds"))
            .args(["keys", "list"])
            .env("BOTCREDS_BROKER", &broker.url)
            .env("BOTCREDS_API_KEY", REVIEW_KEY)
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(5), "{b}");
    }
}
