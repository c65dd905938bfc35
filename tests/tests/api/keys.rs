//! In process: the negative-security table for LiteLLM keys of `security_keys`. Each row is an
//! attack on someone else's key (a workspace key taken by another bot, names that collide, a
//! tag bot's API key, a user key rotating a workspace key, our own credential sent to Coder)
//! with the refusal (or the separate key) it must get, and proof that nothing the victim holds
//! changed: the victim's key still lives in LiteLLM, and the broker's key list is what it was
//! apart from the attacker's own new key. Also the long-name case and Coder's confirmation of
//! workspaces.

use std::collections::BTreeMap;

use botcreds_tests::broker::{BrokerBuilder, binary};
use botcreds_tests::fake_github::{FakeGithub, FakeGithubConfig};
use botcreds_tests::fake_litellm::{FakeLitellm, FakeLitellmConfig};
use botcreds_tests::inprocess::InProcessBroker;
use botcreds_tests::scenes::keys::*;
use botcreds_tests::world::{World, call};
use serde_json::{Value, json};

async fn world() -> World<InProcessBroker> {
    setup().start_in_process().await
}

/// What an attack is.
enum Attack {
    /// `POST /v1/credentials` with this API key and body.
    Bot(&'static str, Value),
    /// `POST /v1/credentials` from a tailnet address, approved by an admin, then polled.
    TailnetApproved(&'static str, Value),
    /// `POST /api/v1/keys/user` with `Authorization: Bearer <token>`.
    UserKey(String),
}

/// What it must get.
#[derive(Debug, PartialEq)]
enum Expect {
    /// Refused with this status and error code (or seed phrase).
    Refused(u16, &'static str),
    /// A key of its own, named so, distinct from the victim's.
    OwnKey(&'static str),
}

/// The victim's key, set up before the attack: how it is asked for and the answer's key.
enum Victim {
    Bot(&'static str, Value),
    Provisioner(&'static str, Value),
}

struct Case {
    name: &'static str,
    victim: Victim,
    attack: Attack,
    expect: Expect,
}

fn cases() -> Vec<Case> {
    let review = json!({"kind": "litellm_key", "scope": "agent:review"});
    vec![
        Case {
            name: "workspace_key_theft_by_another_bot_with_replaces",
            victim: Victim::Bot(
                A_KEY,
                json!({"kind": "litellm_key", "scope": "workspace", "workspace": ws("ws-1", "alpha", "alice")}),
            ),
            // `replaces` is filled in with the victim's credential id.
            attack: Attack::Bot(
                B_KEY,
                json!({"kind": "litellm_key", "scope": "workspace", "workspace": ws("ws-1", "alpha", "alice")}),
            ),
            expect: Expect::Refused(403, "forbidden"),
        },
        Case {
            name: "workspace_key_of_the_provisioner_taken_by_a_bot",
            victim: Victim::Provisioner("/api/v1/keys/workspace", ws("ws-2", "beta", "bob")),
            attack: Attack::Bot(
                B_KEY,
                json!({"kind": "litellm_key", "scope": "workspace", "workspace": ws("ws-2", "beta", "bob")}),
            ),
            expect: Expect::Refused(403, "forbidden"),
        },
        Case {
            name: "bot_names_cut_to_60_characters_collide",
            victim: Victim::Bot(LONG_ONE_KEY, review.clone()),
            attack: Attack::Bot(LONG_TWO_KEY, review.clone()),
            expect: Expect::OwnKey("build-farm-worker-with-a-very-long-descr"),
        },
        Case {
            name: "api_key_for_a_tag_identity_bot",
            victim: Victim::Bot(A_KEY, review.clone()),
            attack: Attack::Bot(TAG_BOT_KEY, review.clone()),
            expect: Expect::Refused(401, "invalid_api_key"),
        },
        Case {
            name: "unmatched_tailnet_node_renamed_like_a_bot",
            victim: Victim::Bot(A_KEY, review.clone()),
            attack: Attack::TailnetApproved(IMPOSTOR, review.clone()),
            expect: Expect::OwnKey("node-"),
        },
        Case {
            name: "user_key_rotates_a_workspace_key_of_that_name",
            victim: Victim::Provisioner("/api/v1/keys/workspace", ws("ws-3", "dev-cli", "carol")),
            attack: Attack::UserKey("coder-session-dev-0123456789".into()),
            expect: Expect::Refused(409, "key exists"),
        },
        Case {
            name: "broker_api_key_forwarded_to_coder",
            victim: Victim::Bot(A_KEY, review.clone()),
            attack: Attack::UserKey(A_KEY.into()),
            expect: Expect::Refused(401, "invalid session token"),
        },
        Case {
            name: "provisioner_secret_forwarded_to_coder",
            victim: Victim::Bot(A_KEY, review.clone()),
            attack: Attack::UserKey(SECRET.into()),
            expect: Expect::Refused(401, "invalid session token"),
        },
    ]
}

/// The suite's questions to its world.
trait KeysWorld {
    async fn key_list(&self) -> BTreeMap<String, (String, String)>;
    async fn approve_and_poll(&self, from: &str, body: &Value) -> (u16, Value);
}

impl KeysWorld for World<InProcessBroker> {
    /// The broker's key list, by credential id: (name, status).
    async fn key_list(&self) -> BTreeMap<String, (String, String)> {
        let (status, body) = call(self.http.get(self.url("/v1/keys")).bearer_auth(OPS_KEY)).await;
        assert_eq!(status, 200, "{body}");
        body["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                (
                    k["credential_id"].as_str().unwrap().to_string(),
                    (
                        k["name"].as_str().unwrap().to_string(),
                        k["status"].as_str().unwrap().to_string(),
                    ),
                )
            })
            .collect()
    }

    async fn approve_and_poll(&self, from: &str, body: &Value) -> (u16, Value) {
        let client = self.broker.client_from(from.parse().unwrap());
        let (status, pending) = call(client.post(self.url("/v1/credentials")).json(body)).await;
        if status != 202 {
            return (status, pending);
        }
        let id = pending["request_id"]
            .as_str()
            .expect("request id")
            .to_string();
        let out = tokio::process::Command::new(binary("botcreds"))
            .args(["approve", &id])
            .env("BOTCREDS_BROKER", &self.broker.url)
            .env("BOTCREDS_API_KEY", OPS_KEY)
            .output()
            .await
            .expect("botcreds approve");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        call(client.get(self.url(&format!("/v1/requests/{id}")))).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attacks_on_other_holders_keys_are_refused_and_change_nothing() {
    let mut failures = Vec::new();
    for case in cases() {
        // A fresh world per row: no row leans on another's leftovers.
        let w = world().await;
        let (status, victim) = match &case.victim {
            Victim::Bot(key, body) => {
                call(
                    w.http
                        .post(w.url("/v1/credentials"))
                        .bearer_auth(key)
                        .json(body),
                )
                .await
            }
            Victim::Provisioner(path, body) => {
                call(
                    w.http
                        .post(w.url(path))
                        .header("X-Provisioner-Secret", SECRET)
                        .json(body),
                )
                .await
            }
        };
        assert_eq!(status, 200, "{}: victim setup: {victim}", case.name);
        let victim_key = victim["key"].as_str().unwrap().to_string();
        let before = w.key_list().await;
        let live_before = w.litellm.live_keys().len();
        let coder_calls_before = w.litellm.calls_to("/api/v2/users/me").len();

        let (status, answer) = match case.attack {
            Attack::Bot(key, mut body) => {
                if let Some(id) = victim["credential_id"].as_str() {
                    body["replaces"] = json!(id);
                }
                call(
                    w.http
                        .post(w.url("/v1/credentials"))
                        .bearer_auth(key)
                        .json(&body),
                )
                .await
            }
            Attack::TailnetApproved(from, body) => w.approve_and_poll(from, &body).await,
            Attack::UserKey(token) => {
                call(w.http.post(w.url("/api/v1/keys/user")).bearer_auth(&token)).await
            }
        };
        let after = w.key_list().await;
        // The victim's key lives on, at LiteLLM and in the broker.
        let (victim_alive, _) = w.litellm.chat(&victim_key, "claude-haiku-3-5").await;
        let victim_record_same = before.iter().all(|(id, v)| after.get(id) == Some(v));
        let outcome = match &case.expect {
            Expect::Refused(code, phrase) => {
                let ok = status == *code
                    && error_of(&answer) == *phrase
                    && after == before
                    && w.litellm.live_keys().len() == live_before;
                if matches!(case.name, n if n.contains("forwarded_to_coder")) {
                    ok && w.litellm.calls_to("/api/v2/users/me").len() == coder_calls_before
                } else {
                    ok
                }
            }
            Expect::OwnKey(prefix) => {
                status == 200
                    && answer["key"].as_str().is_some_and(|k| k != victim_key)
                    && answer["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with(prefix))
                    && answer["name"] != victim["name"]
                    && after.len() == before.len() + 1
            }
        };
        if !(outcome && victim_alive != 401 && victim_record_same) {
            failures.push(format!(
                "{}: expected {:?}, got {status} {answer}; victim key alive: {victim_alive}; \
                 victim record unchanged: {victim_record_same}",
                case.name, case.expect
            ));
        }
        drop(w);
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// The long-name case in detail: the names differ and both stay within LiteLLM's alias rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_bot_names_keep_distinct_key_names() {
    let w = world().await;
    let body = json!({"kind": "litellm_key", "scope": "agent:review"});
    let mut names = Vec::new();
    for key in [LONG_ONE_KEY, LONG_TWO_KEY] {
        let (status, cred) = call(
            w.http
                .post(w.url("/v1/credentials"))
                .bearer_auth(key)
                .json(&body),
        )
        .await;
        assert_eq!(status, 200, "{cred}");
        names.push(cred["name"].as_str().unwrap().to_string());
    }
    assert_ne!(names[0], names[1]);
    for n in &names {
        assert!(n.len() <= 128 && n.ends_with(".agent-review"), "{n}");
    }
}

/// With a Coder token configured, a workspace key is made only for a workspace Coder knows, with
/// the name and owner Coder gives it; nothing is minted otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workspace_keys_are_only_for_workspaces_coder_confirms() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let github = FakeGithub::start(FakeGithubConfig::default()).await;
    let litellm = FakeLitellm::start(FakeLitellmConfig::default()).await;
    litellm.add_coder_session("coder-admin-token-0123456789", "usr-admin", "admin");
    litellm.add_coder_workspace("ws-real", "alpha", "usr-alice", "alice");
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("coder.token");
    std::fs::write(&token_file, "coder-admin-token-0123456789\n").unwrap();
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let broker = BrokerBuilder::new(&policy())
        .github(&github.base_url(), botcreds_tests::fixtures::APP_ID)
        .api_key("ws-a", A_KEY)
        .litellm(&litellm.base_url(), litellm.master_key(), "")
        .toml(&format!(
            "[coder]\nurl = \"{}\"\ntoken_file = \"{}\"\n",
            litellm.base_url(),
            token_file.display()
        ))
        .env("BOTCREDS_PROVISIONER_SECRET", SECRET)
        .start_in_process()
        .await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let ask = |id: &str, name: &str, user: &str, user_id: &str| {
        json!({"kind": "litellm_key", "scope": "workspace", "workspace":
            {"workspace_id": id, "workspace_name": name, "coder_user": user, "coder_user_id": user_id}})
    };
    let rows = [
        (
            "unknown workspace",
            ask("ws-none", "alpha", "alice", "usr-alice"),
            400,
            "invalid_workspace",
        ),
        (
            "another name",
            ask("ws-real", "beta", "alice", "usr-alice"),
            400,
            "invalid_workspace",
        ),
        (
            "another owner",
            ask("ws-real", "alpha", "mallory", "usr-mallory"),
            400,
            "invalid_workspace",
        ),
        (
            "another owner id",
            ask("ws-real", "alpha", "alice", "usr-mallory"),
            400,
            "invalid_workspace",
        ),
    ];
    for (what, body, status, code) in rows {
        let (got, answer) = call(
            http.post(format!("{}/v1/credentials", broker.url))
                .bearer_auth(A_KEY)
                .json(&body),
        )
        .await;
        assert_eq!(
            (got, error_of(&answer).as_str()),
            (status, code),
            "{what}: {answer}"
        );
        assert!(litellm.live_keys().is_empty(), "{what}: nothing minted");
    }
    // The same through the provisioner route.
    let (got, answer) = call(
        http.post(format!("{}/api/v1/keys/workspace", broker.url))
            .header("X-Provisioner-Secret", SECRET)
            .json(&ask("ws-none", "alpha", "alice", "usr-alice")["workspace"]),
    )
    .await;
    assert_eq!(
        (got, error_of(&answer).as_str()),
        (400, "invalid workspace"),
        "{answer}"
    );
    assert!(litellm.live_keys().is_empty());
    // The workspace as Coder has it.
    let (got, answer) = call(
        http.post(format!("{}/v1/credentials", broker.url))
            .bearer_auth(A_KEY)
            .json(&ask("ws-real", "alpha", "alice", "usr-alice")),
    )
    .await;
    assert_eq!(got, 200, "{answer}");
    assert_eq!(litellm.live_keys().len(), 1);
}
