//! Crash safety of the real broker: `kill -9` at random points under a bounded load, 50 rounds.
//! After every crash the store must open cleanly (`botcreds store verify`: the audit chain whole,
//! every approval document readable), every token a client was answered with must have its
//! durable `credential_issued` event, and approval requests pending before the crash must still
//! be pending after it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use botcreds_tests::broker::{BrokerBuilder, BrokerProcess, binary};
use botcreds_tests::fake_github::{FakeGithub, FakeGithubConfig, InstallationSpec};
use botcreds_tests::fixtures;
use serde_json::{Value, json};
use tokio::sync::Notify;

const ROUNDS: usize = 50;
/// Concurrent clients hammering the broker in each round.
const CLIENTS: usize = 6;
/// Distinct repositories asked for (each its own token scope).
const REPOS: usize = 20;
const BOT_KEY: &str = "bck_crashBotKey0123456789abcdefghijklmn";
const ADMIN_KEY: &str = "bck_crashAdminKey0123456789abcdefghijk";

const POLICY: &str = r#"
bots:
  load-bot:
    identity: { type: api_key }
    auto_approve:
      - repo: "crash-org/r*"
        permissions: [contents:read]
    requires_approval:
      - repo: "crash-org/guarded-*"
defaults:
  requires_approval: true
  approval_timeout: 24h
"#;

fn github_config() -> FakeGithubConfig {
    let mut repos: Vec<String> = (0..REPOS).map(|i| format!("r{i}")).collect();
    repos.extend((0..ROUNDS).map(|i| format!("guarded-{i}")));
    FakeGithubConfig::empty().with_installation(
        InstallationSpec::organization("crash-org", 77_000_001)
            .permission("contents", "write")
            .repositories(repos.iter().map(String::as_str)),
    )
}

/// A small deterministic generator (xorshift), so a failing round can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// One client's loop: ask for tokens until the broker goes away, recording the credential ids
/// it was answered with in `answered`.
async fn hammer(url: String, seed: u64, answered: Arc<Mutex<Vec<String>>>, first: Arc<Notify>) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut rng = Rng(seed | 1);
    for _ in 0..10_000 {
        let repo = format!("crash-org/r{}", rng.below(REPOS as u64));
        let mut body = json!({
            "kind": "github_token",
            "repositories": [repo],
            "permissions": ["contents:read"],
            "reason": "crash test",
        });
        // Some requests force a fresh mint, so tokens keep being issued under load.
        if rng.below(3) == 0 {
            body["replaces"] = json!(format!("tok_{:024x}", rng.below(u64::MAX)));
        }
        let resp = match client
            .post(format!("{url}/v1/credentials"))
            .bearer_auth(BOT_KEY)
            .json(&body)
            .send()
            .await
        {
            Ok(r) => r,
            Err(_) => break,
        };
        if resp.status().as_u16() != 200 {
            continue;
        }
        let Ok(v) = resp.json::<Value>().await else {
            break;
        };
        if let Some(id) = v["credential_id"].as_str() {
            answered.lock().unwrap().push(id.to_owned());
            first.notify_one();
        }
    }
}

async fn admin_get(broker: &BrokerProcess, path: &str) -> Value {
    let resp = reqwest::Client::new()
        .get(format!("{}{path}", broker.url))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .expect("admin request");
    assert_eq!(resp.status().as_u16(), 200, "GET {path}");
    resp.json().await.expect("json")
}

/// `botcreds store verify` on the stopped broker's data directory.
fn verify_store(broker: &BrokerProcess, round: usize) -> String {
    let out = std::process::Command::new(binary("botcreds"))
        .args(["store", "verify", "--data-dir"])
        .arg(broker.data_dir())
        .output()
        .expect("botcreds store verify");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "round {round}: the store is not intact after kill -9:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_loses_no_answered_token_and_no_pending_approval() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let github = FakeGithub::start(github_config()).await;
    let mut broker = BrokerBuilder::new(POLICY)
        .github(&github.base_url(), fixtures::APP_ID)
        .api_key("load-bot", BOT_KEY)
        .api_key("ops", ADMIN_KEY)
        .toml("[admin]\napi_key_bots = [\"ops\"]\n")
        .start()
        .await;
    let mut rng = Rng(0x5eed_cafe_f00d);
    let mut pending: BTreeSet<String> = BTreeSet::new();
    let mut total_answered = 0usize;

    for round in 0..ROUNDS {
        let round_start = std::time::Instant::now();
        // A request that needs a human: it must survive every later crash.
        let resp = reqwest::Client::new()
            .post(format!("{}/v1/credentials", broker.url))
            .bearer_auth(BOT_KEY)
            .json(&json!({
                "kind": "github_token",
                "repositories": [format!("crash-org/guarded-{round}")],
                "permissions": ["contents:read"],
                "reason": "needs a human",
            }))
            .send()
            .await
            .expect("approval request");
        assert_eq!(resp.status().as_u16(), 202, "round {round}");
        let v: Value = resp.json().await.unwrap();
        let id = v["request_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no request id in {v}"))
            .to_owned();
        pending.insert(id);

        let answered = Arc::new(Mutex::new(Vec::new()));
        let first = Arc::new(Notify::new());
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let seed = rng.below(u64::MAX) ^ c as u64;
                tokio::spawn(hammer(
                    broker.url.clone(),
                    seed,
                    answered.clone(),
                    first.clone(),
                ))
            })
            .collect();
        // Crash at a random point once issuing is under way.
        tokio::time::timeout(Duration::from_secs(30), first.notified())
            .await
            .unwrap_or_else(|_| panic!("round {round}: no token answered within 30 s"));
        tokio::time::sleep(Duration::from_millis(rng.below(400))).await;
        broker.kill9().await;
        for c in clients {
            c.await.expect("client task");
        }
        let answered = std::mem::take(&mut *answered.lock().unwrap());
        total_answered += answered.len();

        let report = verify_store(&broker, round);
        assert!(
            report.contains(&format!("{} pending", pending.len())),
            "round {round}: expected {} pending approvals:\n{report}",
            pending.len()
        );
        broker = broker.crash_and_restart().await;

        // This round's events: everything since shortly before it started.
        let since = round_start.elapsed().as_secs() + 2;
        let issued = admin_get(
            &broker,
            &format!("/v1/admin/audit?event=credential_issued&limit=10000&since={since}s"),
        )
        .await;
        assert!(
            issued["events"].as_array().map_or(0, Vec::len) < 10_000,
            "round {round}: the audit read hit its limit; the check would be incomplete"
        );
        let durable: BTreeSet<&str> = issued["events"]
            .as_array()
            .expect("events")
            .iter()
            .filter_map(|e| e["token_id"].as_str())
            .collect();
        for id in &answered {
            assert!(
                durable.contains(id.as_str()),
                "round {round}: token {id} was answered but has no durable credential_issued event"
            );
        }
        let listed = admin_get(&broker, "/v1/admin/approvals").await;
        let listed: BTreeSet<String> = listed["requests"]
            .as_array()
            .expect("approval list")
            .iter()
            .filter(|r| r["state"] == "PENDING")
            .filter_map(|r| r["request_id"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(
            listed, pending,
            "round {round}: pending approvals after restart"
        );
    }
    assert!(
        total_answered >= ROUNDS,
        "the load answered only {total_answered} tokens in {ROUNDS} rounds: the test did not exercise issuing"
    );
}
