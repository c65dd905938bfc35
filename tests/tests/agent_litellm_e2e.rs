//! End-to-end: the real `botcreds-agent` keeps LiteLLM virtual keys from the real `botcreds`
//! broker in its `[[litellm]]` files (key file, env file, Roo Code and OpenCode settings); the
//! broker mints them at the fake LiteLLM, which only accepts live keys on its chat endpoint, so
//! every check below proves a file holds a key that works (or no longer does).
//!
//! The agent connects from 127.0.0.1 (the tagged node `bot-host`, `tag:bots`); the admin from
//! 127.0.0.2 (`admin-desk`, `tag:admin`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use botcreds_tests::agent::{AgentBuilder, AgentHome, AgentProcess};
use botcreds_tests::broker::{BrokerProcess, binary, client_from};
use botcreds_tests::fake_github::FakeGithub;
use botcreds_tests::fake_litellm::{FakeLitellm, FakeLitellmConfig, LitellmBackend, run_tag};
use botcreds_tests::fake_tailscaled::{FakeTailscaled, NodeBuilder};
use botcreds_tests::world::World as BrokerWorld;
use serde_json::{Value, json};

const POLICY: &str = r#"
bots:
  bot-host:
    identity: { tag: "tag:bots" }
    auto_approve:
      - litellm_scope: "workspace"
      - litellm_scope: "ci"
defaults:
  requires_approval: true
  approval_timeout: 24h
"#;

const AGENT_IP: &str = "127.0.0.1";
const ADMIN_IP: &str = "127.0.0.2";
/// Bound on waits for the agent's own log lines; it only turns a hang into a failure.
const WAIT: Duration = Duration::from_secs(60);
/// For waits that include a key reaching its refresh time (30 s after issue here).
const REFRESH_WAIT: Duration = Duration::from_secs(180);

/// The agent's workspace section; `tag` keeps names apart on a real proxy shared by runs.
fn workspace(tag: &str) -> String {
    format!(
        r#"
[litellm.workspace]
workspace_id = "ws-{tag}"
workspace_name = "contractor-{tag}"
coder_user = "alice"
coder_user_id = "usr-def456"
"#
    )
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

struct World {
    backend: LitellmBackend,
    /// The broker refuses to start without a GitHub App; no token is asked for here.
    _github: FakeGithub,
    _tailscaled: FakeTailscaled,
    broker: Option<BrokerProcess>,
}

impl World {
    async fn new() -> World {
        let fake = FakeLitellm::start(FakeLitellmConfig::default()).await;
        World::on(LitellmBackend::of_fake(&fake)).await
    }

    /// A world whose broker uses `backend` as its LiteLLM proxy.
    async fn on(backend: LitellmBackend) -> World {
        let (url, master_key) = (backend.url.clone(), backend.master_key.clone());
        let BrokerWorld {
            github,
            tailscaled,
            broker,
            ..
        } = BrokerWorld::builder(POLICY)
            .node(AGENT_IP, NodeBuilder::new("bot-host").tags(["tag:bots"]))
            .node(ADMIN_IP, NodeBuilder::new("admin-desk").tags(["tag:admin"]))
            .broker(move |b| b.litellm(&url, &master_key, "sweep_interval = \"1s\""))
            // Short-lived ci keys, so that a refresh comes within the test.
            .toml("[litellm.scopes.ci]\nlifetime = \"150s\"\n\n[admin]\ntags = [\"tag:admin\"]\n")
            .start()
            .await;
        World {
            backend,
            _github: github,
            _tailscaled: tailscaled,
            broker: Some(broker),
        }
    }

    /// The double, in cases that need its knobs or records (fake-only cases).
    fn litellm(&self) -> &FakeLitellm {
        self.backend.fake().expect("a fake-only case")
    }

    /// Whether LiteLLM accepts `key` (`/v1/models`): 200, or 401 for a deleted key.
    async fn key_status(&self, key: &str) -> u16 {
        self.backend.models_of(key).await.0
    }

    fn broker(&self) -> &BrokerProcess {
        self.broker.as_ref().expect("broker running")
    }

    fn agent(&self) -> AgentBuilder {
        AgentBuilder::new(&self.broker().url)
    }

    /// An admin call to the broker (rotate, revoke).
    async fn admin(&self, method: reqwest::Method, path: &str) -> (u16, Value) {
        let r = client_from(ip(ADMIN_IP))
            .request(method, format!("{}{path}", self.broker().url))
            .send()
            .await
            .expect("broker reachable");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Stops the broker and starts it again on the same address and data directory (a
    /// restart, not a new broker). The plaintext of live keys is gone with the old process.
    async fn restart_broker(&mut self, stopped: &mut StoppedBroker) {
        let config = std::fs::read_to_string(&stopped.config_path).expect("broker.toml");
        let config = config.replace(
            "listen = [\"127.0.0.1:0\"]",
            &format!("listen = [\"{}\"]", stopped.addr),
        );
        std::fs::write(&stopped.config_path, config).expect("rewrite broker.toml");
        let mut cmd = tokio::process::Command::new(binary("botcreds"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&stopped.config_path)
            .env("RUST_LOG", "info,botcreds_broker=debug")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let dir = stopped.dir.take().expect("stopped broker's directory");
        let broker = BrokerProcess::try_spawn(
            &mut cmd,
            dir,
            stopped.config_path.clone(),
            stopped.policy_path.clone(),
        )
        .await
        .unwrap_or_else(|f| panic!("broker did not restart ({:?}):\n{}", f.status, f.logs));
        assert_eq!(broker.addr, stopped.addr, "same address as before");
        self.broker = Some(broker);
    }

    async fn stop_broker(&mut self) -> StoppedBroker {
        let mut broker = self.broker.take().expect("broker running");
        assert!(broker.stop().await.success(), "{}", broker.logs());
        StoppedBroker {
            addr: broker.addr,
            config_path: broker.config_path.clone(),
            policy_path: broker.policy_path.clone(),
            dir: Some(broker.dir),
        }
    }
}

struct StoppedBroker {
    addr: std::net::SocketAddr,
    config_path: PathBuf,
    policy_path: PathBuf,
    dir: Option<tempfile::TempDir>,
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&read(p)).unwrap_or_else(|e| panic!("{} is not JSON ({e})", p.display()))
}

fn key_in(p: &Path) -> String {
    let text = read(p);
    assert!(
        text.ends_with('\n') && text.trim().starts_with("sk-"),
        "{} should hold a key and a newline: {text:?}",
        p.display()
    );
    text.trim_end().to_string()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("file exists").mode() & 0o7777
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The agent's `status --json`, `litellm` part, first entry.
async fn litellm_status(home: &AgentHome) -> Value {
    let out = home.status_command(&["--json"]).await;
    assert!(out.success, "status --json: {}", out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).expect("status JSON");
    v["litellm"][0].clone()
}

async fn wait_log(agent: &mut AgentProcess, needle: &str, n: usize, within: Duration) {
    assert!(
        agent.wait_for_count(needle, n, within).await,
        "agent log never had {n}× {needle:?}:\n{}",
        agent.logs()
    );
}

/// Logged once the files hold a new key (or lost it).
const FILES_CHANGED: &str = "LiteLLM key files changed";
const ON_CHANGE_OK: &str = "on_change ran";

#[tokio::test]
async fn workspace_key_in_every_file_follows_rotation_and_revocation_and_is_released_on_stop() {
    // On the fake, and on the real proxy when BOTCREDS_REAL_LITELLM_URL names one.
    for backend in LitellmBackend::all().await {
        workspace_key_lifecycle(World::on(backend).await).await;
    }
}

async fn workspace_key_lifecycle(world: World) {
    let b = world.backend.label.clone();
    let tag = run_tag();
    let ws = workspace(&tag);
    let home = world
        .agent()
        .toml("broker_timeout = \"5s\"")
        .litellm(&format!(
            r#"scope = "workspace"
key_file = "{{home}}/out/litellm.key"
env_file = "{{home}}/out/litellm.env"
roo_code = "{{home}}/home/.config/roo-code/settings.json"
opencode = "{{home}}/home/.config/opencode/config.json"
mode = "0640"
check_interval = "1s"
on_change = ["/bin/sh", "-c", "echo \"$BOTCREDS_LITELLM_EVENT $BOTCREDS_LITELLM_SCOPE $BOTCREDS_LITELLM_KEY_NAME\" >> {{home}}/changes"]
{ws}"#
        ))
        .build();
    let dir = home.dir().to_path_buf();
    let key_file = dir.join("out/litellm.key");
    let env_file = dir.join("out/litellm.env");
    let roo = dir.join("home/.config/roo-code/settings.json");
    let opencode = dir.join("home/.config/opencode/config.json");
    let changes = dir.join("changes");
    // The user's own Roo Code settings, which must survive.
    std::fs::create_dir_all(roo.parent().unwrap()).unwrap();
    std::fs::write(
        &roo,
        r#"{"theme": "dark", "currentApiConfigName": "Mine", "apiConfigs": {"Mine": {"apiProvider": "anthropic"}}}"#,
    )
    .unwrap();

    let mut agent = home.start().await;
    wait_log(&mut agent, FILES_CHANGED, 1, WAIT).await;
    wait_log(&mut agent, ON_CHANGE_OK, 1, WAIT).await;

    // The key file holds a key the proxy accepts, for the workspace's models.
    let key1 = key_in(&key_file);
    assert_eq!(world.key_status(&key1).await, 200, "{b}");
    assert_eq!(mode(&key_file), 0o640);
    let base_url = format!("{}/v1", world.backend.url);
    assert_eq!(
        read(&env_file),
        format!(
            "# Written by botcreds-agent; replaced whenever the LiteLLM key changes. Do not edit.\n\
             LITELLM_API_KEY='{key1}'\nLITELLM_BASE_URL='{base_url}'\n\
             OPENAI_API_KEY='{key1}'\nOPENAI_BASE_URL='{base_url}'\n"
        )
    );
    assert_eq!(mode(&env_file), 0o640);
    // Roo Code: the design's profile merged in, the user's choice and settings kept.
    assert_eq!(
        read_json(&roo),
        json!({
            "theme": "dark",
            "currentApiConfigName": "Mine",
            "apiConfigs": {
                "Mine": {"apiProvider": "anthropic"},
                "LiteLLM": {
                    "apiProvider": "openai",
                    "openAiBaseUrl": base_url,
                    "openAiApiKey": key1,
                    "openAiModelId": "claude-sonnet-4-5"
                }
            }
        })
    );
    assert_eq!(
        read_json(&opencode),
        json!({
            "$schema": "https://opencode.ai/config.json",
            "model": "litellm/claude-sonnet-4-5",
            "provider": {"litellm": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "LiteLLM",
                "options": {"baseURL": base_url, "apiKey": key1},
                "models": {
                    "claude-sonnet-4-5": {"name": "claude-sonnet-4-5"},
                    "claude-haiku-3-5": {"name": "claude-haiku-3-5"}
                }
            }}
        })
    );
    assert_eq!(mode(&opencode), 0o640);
    assert_eq!(
        names_in(&dir.join("out")),
        ["litellm.env", "litellm.key"],
        "no temp files"
    );
    assert_eq!(
        read(&changes),
        format!("updated workspace contractor-{tag}\n")
    );

    // Status lists the key, its files and the on_change result; never the key.
    let st = litellm_status(&home).await;
    assert_eq!(st["scope"], "workspace");
    assert_eq!(st["workspace_id"], format!("ws-{tag}").as_str());
    assert_eq!(st["state"], "fresh");
    assert_eq!(st["release_on_stop"], true);
    let name = st["name"].as_str().expect("key name").to_string();
    let outputs = st["outputs"].as_array().expect("outputs");
    assert_eq!(outputs.len(), 4);
    assert!(outputs.iter().all(|o| o["state"] == "written"), "{st}");
    assert_eq!(st["on_change"]["ok"], true, "{st}");
    let table = home.status_command(&[]).await;
    assert!(table.success, "{}", table.stderr);
    for want in [
        "LITELLM SCOPE",
        &format!("workspace (ws-{tag})"),
        &name,
        "key_file",
        "on_change",
    ] {
        assert!(
            table.stdout.contains(want),
            "{want:?} missing:\n{}",
            table.stdout
        );
    }
    assert!(
        !table.stdout.contains(&key1) && !agent.logs().contains(&key1),
        "no key shown"
    );

    // An admin rotates the key: the next check brings the new key into every file. A reader
    // polling the key file meanwhile always sees a whole key, never a partial or empty file.
    let stop_reading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = stop_reading.clone();
        let path = key_file.clone();
        std::thread::spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            let mut reads = 0u64;
            loop {
                // Read once more after the stop: that read starts after the rotation's write.
                let stopping = stop.load(std::sync::atomic::Ordering::Relaxed);
                let text = std::fs::read_to_string(&path).expect("the key file is always there");
                assert!(
                    text.starts_with("sk-") && text.ends_with('\n') && text.len() > 4,
                    "a reader saw {text:?}"
                );
                seen.insert(text);
                reads += 1;
                if stopping {
                    break;
                }
            }
            (reads, seen.len())
        })
    };
    let (status, body) = world
        .admin(reqwest::Method::POST, &format!("/v1/keys/{name}/rotate"))
        .await;
    assert_eq!(status, 200, "{body}");
    wait_log(&mut agent, FILES_CHANGED, 2, WAIT).await;
    wait_log(&mut agent, ON_CHANGE_OK, 2, WAIT).await;
    let key2 = key_in(&key_file);
    assert_ne!(key2, key1);
    assert_eq!(world.key_status(&key1).await, 401, "{b}: old key revoked");
    assert_eq!(world.key_status(&key2).await, 200, "{b}");
    assert!(read(&env_file).contains(&format!("LITELLM_API_KEY='{key2}'\n")));
    assert_eq!(
        read_json(&roo)["apiConfigs"]["LiteLLM"]["openAiApiKey"],
        key2
    );
    assert_eq!(
        read_json(&opencode)["provider"]["litellm"]["options"]["apiKey"],
        key2
    );
    assert_eq!(read(&changes).lines().count(), 2);
    stop_reading.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reads, distinct) = reader.join().expect("the reader saw only whole keys");
    assert!(reads > 0 && distinct == 2, "{reads} reads, {distinct} keys");

    // An admin revokes it: the agent gets a new one and writes it.
    let (status, body) = world
        .admin(reqwest::Method::DELETE, &format!("/v1/keys/{name}"))
        .await;
    assert_eq!(status, 200, "{body}");
    wait_log(&mut agent, FILES_CHANGED, 3, WAIT).await;
    let key3 = key_in(&key_file);
    assert!(key3 != key2 && key3 != key1);
    assert_eq!(world.key_status(&key2).await, 401, "{b}");
    assert_eq!(world.key_status(&key3).await, 200, "{b}");

    // SIGTERM releases the workspace key: LiteLLM deletes it, the files lose it.
    let deletes_before = world
        .backend
        .fake()
        .map(|f| f.calls_to("/key/delete").len());
    let (exit, logs) = agent.stop().await;
    assert!(exit.success(), "{logs}");
    assert!(
        logs.contains("released the LiteLLM key at the broker"),
        "{logs}"
    );
    if let (Some(f), Some(before)) = (world.backend.fake(), deletes_before) {
        assert!(f.was_deleted(&key3), "LiteLLM saw the delete");
        assert!(f.calls_to("/key/delete").len() > before);
    }
    assert_eq!(world.key_status(&key3).await, 401, "{b}: released");
    assert!(
        !key_file.exists() && !env_file.exists(),
        "key and env files removed"
    );
    let roo_after = read_json(&roo);
    assert!(
        roo_after["apiConfigs"]["LiteLLM"]
            .get("openAiApiKey")
            .is_none(),
        "{roo_after}"
    );
    assert_eq!(roo_after["theme"], "dark");
    assert_eq!(
        roo_after["apiConfigs"]["Mine"],
        json!({"apiProvider": "anthropic"})
    );
    assert!(!logs.contains(&key3), "no key in the log");
}

#[tokio::test]
async fn broker_outage_and_agent_restart_keep_the_key_and_refresh_replaces_it_in_time() {
    let mut world = World::new().await;
    let home = world
        .agent()
        .toml("broker_timeout = \"5s\"")
        .litellm(
            r#"scope = "ci"
key_file = "{home}/out/ci.key"
check_interval = "2s"
on_change = ["/bin/sh", "-c", "echo \"$BOTCREDS_LITELLM_EVENT\" >> {home}/changes"]"#,
        )
        .build();
    let key_file = home.dir().join("out/ci.key");
    let mut agent = home.start().await;
    wait_log(&mut agent, FILES_CHANGED, 1, WAIT).await;
    let key1 = key_in(&key_file);
    assert_eq!(world.litellm().chat(&key1, "claude-haiku-3-5").await.0, 200);
    let st = litellm_status(&home).await;
    assert_eq!(
        st["release_on_stop"], false,
        "only workspace keys are released by default"
    );

    // The broker goes away: checks fail, the file keeps the working key.
    let mut stopped = world.stop_broker().await;
    wait_log(
        &mut agent,
        "asking the broker for the LiteLLM key failed",
        1,
        WAIT,
    )
    .await;
    assert_eq!(key_in(&key_file), key1);
    let st = litellm_status(&home).await;
    assert_eq!(st["state"], "serving_from_cache", "{st}");
    assert!(
        st["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("broker unreachable"),
        "{st}"
    );

    // The agent restarts while the broker is still down: the cached key stays in the file.
    let (exit, logs) = agent.stop().await;
    assert!(exit.success(), "{logs}");
    assert_eq!(key_in(&key_file), key1);
    let mut agent = home.start().await;
    wait_log(&mut agent, "loaded cached LiteLLM key", 1, WAIT).await;
    wait_log(
        &mut agent,
        "asking the broker for the LiteLLM key failed",
        1,
        WAIT,
    )
    .await;
    assert_eq!(key_in(&key_file), key1);
    assert_eq!(world.litellm().chat(&key1, "claude-haiku-3-5").await.0, 200);
    assert_eq!(
        read(&home.dir().join("changes")),
        "updated\n",
        "nothing changed, nothing ran"
    );

    // The broker comes back (same address, same data, but without the old key's plaintext,
    // so it replaces the key at the next check).
    world.restart_broker(&mut stopped).await;
    wait_log(&mut agent, FILES_CHANGED, 1, WAIT).await;
    let key2 = key_in(&key_file);
    assert_ne!(key2, key1);
    assert_eq!(world.litellm().chat(&key2, "claude-haiku-3-5").await.0, 200);
    let st = litellm_status(&home).await;
    assert_eq!(st["failures"], 0, "{st}");

    // The 150 s key is refreshed ahead of its expiry: the file gets the new key, the old one
    // is revoked at the broker's rotation.
    wait_log(&mut agent, FILES_CHANGED, 2, REFRESH_WAIT).await;
    let key3 = key_in(&key_file);
    assert_ne!(key3, key2);
    assert_eq!(world.litellm().chat(&key3, "claude-haiku-3-5").await.0, 200);
    assert_eq!(world.litellm().chat(&key2, "claude-haiku-3-5").await.0, 401);
    // "In time", from the fake LiteLLM's records: the old key was deleted while it still lived
    // (a rotation, not a clean-up after expiry), and the new key reached the file before the
    // old one expired, without the file ever losing its key in between.
    let old = world
        .litellm()
        .deleted_key(&key2)
        .expect("the old key was deleted at LiteLLM");
    let old_expires = old.expires.expect("the old key had an expiry");
    assert!(
        old.updated_at < old_expires,
        "the old key was deleted at {}, after it expired at {old_expires}",
        old.updated_at
    );
    // With checks every 2 s, the broker itself replaces a key once less than half its life is
    // left (it stops reusing it): only the agent's own refresh (window 120 s of 150 s here)
    // rotates it earlier. A late refresh would hide behind those checks without this.
    let half_life = (old_expires - old.created_at) / 2;
    assert!(
        old_expires - old.updated_at > half_life,
        "the old key (created {}, expiring {old_expires}) was replaced at {}, with less than half \
         its life left: not by the agent's refresh",
        old.created_at,
        old.updated_at
    );
    let st = litellm_status(&home).await;
    let written = st["outputs"][0]["changed_at"]
        .as_str()
        .and_then(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        })
        .unwrap_or_else(|| panic!("no changed_at for the key file: {st}"));
    assert!(
        written < old_expires,
        "the new key reached the file at {written}, after the old one expired at {old_expires}"
    );
    let changes = read(&home.dir().join("changes"));
    assert!(
        !changes.contains("removed"),
        "the key file went without a key in between: {changes}"
    );
    let (exit, logs) = agent.stop().await;
    assert!(exit.success(), "{logs}");
    assert!(
        !logs.contains("released the LiteLLM key"),
        "a ci key is kept: {logs}"
    );
    assert_eq!(key_in(&key_file), key3, "kept for the next start");
}

#[tokio::test]
async fn a_corrupt_tool_config_is_left_alone_and_reported_while_the_key_file_is_written() {
    let world = World::new().await;
    let home = world
        .agent()
        .litellm(
            r#"scope = "ci"
key_file = "{home}/out/ci.key"
roo_code = "{home}/roo.json"
check_interval = "1s""#,
        )
        .build();
    let roo = home.dir().join("roo.json");
    let corrupt = "{\"theme\": \"dark\",";
    std::fs::write(&roo, corrupt).unwrap();
    let mut agent = home.start().await;
    wait_log(&mut agent, "cannot update a LiteLLM key file", 1, WAIT).await;
    let key = key_in(&home.dir().join("out/ci.key"));
    assert_eq!(read(&roo), corrupt, "not a byte changed");
    let st = litellm_status(&home).await;
    let roo_out = &st["outputs"][1];
    assert_eq!(roo_out["state"], "error", "{st}");
    assert!(
        roo_out["error"]
            .as_str()
            .unwrap_or("")
            .contains("is not valid JSON"),
        "{st}"
    );
    assert!(!st.to_string().contains(&key));

    // Fixed by hand: the next check writes the key into it.
    std::fs::write(&roo, "{\"theme\": \"dark\"}").unwrap();
    wait_log(&mut agent, "LiteLLM key files changed", 2, WAIT).await;
    let v = read_json(&roo);
    assert_eq!(v["apiConfigs"]["LiteLLM"]["openAiApiKey"], key);
    assert_eq!(v["theme"], "dark");
    let (exit, logs) = agent.stop().await;
    assert!(exit.success(), "{logs}");
}

#[tokio::test]
async fn bad_litellm_entries_stop_the_agent_with_the_key_named() {
    let world = World::new().await;
    for (body, want) in [
        (
            "scope = \"team\"\nkey_file = \"/tmp/k\"",
            "litellm[0].scope: \"team\" is not a LiteLLM scope",
        ),
        (
            "scope = \"workspace\"\nkey_file = \"/tmp/k\"",
            "litellm[0].workspace: scope \"workspace\" needs",
        ),
        (
            "scope = \"ci\"\nkey_file = \"/tmp/k\"\nmode = \"0644\"",
            "litellm[0].mode",
        ),
        (
            "scope = \"ci\"\nkey_file = \"k\"",
            "litellm[0].key_file: k must be an absolute path",
        ),
    ] {
        let home = world.agent().litellm(body).build();
        let failure = match home.try_start().await {
            Ok(agent) => panic!("started with {body:?}:\n{}", agent.logs()),
            Err(f) => f,
        };
        assert!(
            failure.logs.contains(want),
            "{body:?}: want {want:?} in\n{}",
            failure.logs
        );
    }
}

/// Whether `key` is one the fake LiteLLM minted (live or deleted since): a partial key is not.
fn minted(world: &World, key: &str) -> bool {
    world.litellm().deleted_key(key).is_some()
        || world
            .litellm()
            .live_keys()
            .iter()
            .any(|k| k.token == botcreds_tests::fake_litellm::hash_token(key))
}

/// Every output and cache file of the agent in `home` is absent or whole: a complete file
/// holding a key LiteLLM minted. Temp files (the agent's own, named `.…botcreds-tmp-…` and
/// `.tmp-…`) are skipped: nobody reads them.
fn assert_whole(world: &World, home: &AgentHome, round: usize) {
    let out = home.dir().join("out");
    let known = |key: &str, what: &str| {
        assert!(
            minted(world, key),
            "round {round}: {what} holds a key LiteLLM never minted (partial?): {key:?}"
        );
    };
    if let Ok(text) = std::fs::read_to_string(out.join("ci.key")) {
        let key = text
            .strip_suffix('\n')
            .unwrap_or_else(|| panic!("round {round}: key file without its newline: {text:?}"));
        known(key, "the key file");
    }
    if let Ok(text) = std::fs::read_to_string(out.join("ci.env")) {
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines.len() == 5 && text.ends_with('\n'),
            "round {round}: partial env file: {text:?}"
        );
        let key = lines[1]
            .strip_prefix("LITELLM_API_KEY='")
            .and_then(|k| k.strip_suffix('\''))
            .unwrap_or_else(|| panic!("round {round}: env file: {text:?}"));
        known(key, "the env file");
    }
    if let Ok(text) = std::fs::read_to_string(out.join("roo.json")) {
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("round {round}: partial roo.json ({e}): {text:?}"));
        if let Some(key) = v["apiConfigs"]["LiteLLM"]["openAiApiKey"].as_str() {
            known(key, "roo.json");
        }
    }
    for entry in std::fs::read_dir(home.cache_dir()).expect("cache dir") {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap();
        // A cache file is a binding line (broker and identity) and the record, each whole JSON.
        let values = serde_json::Deserializer::from_str(&text)
            .into_iter::<Value>()
            .collect::<Result<Vec<_>, _>>()
            .unwrap_or_else(|e| panic!("round {round}: partial cache file {name} ({e})"));
        assert_eq!(
            values.len(),
            2,
            "round {round}: cache file {name} is not a binding and a record: {text:?}"
        );
        let v = &values[1];
        if name.starts_with("litellm-") {
            known(v["key"].as_str().unwrap_or_default(), "the cache");
        }
    }
}

/// `kill -9` in the middle of writing a new key (right after the agent logs it fetched one)
/// never leaves a partial key file, env file, tool config or cache file: each is the old one or
/// the new one, whole, every time.
#[tokio::test]
async fn kill_9_mid_write_never_leaves_a_partial_key_or_cache_file() {
    const ROUNDS: usize = 10;
    const FETCHED: &str = "LiteLLM key fetched";
    let world = World::new().await;
    let home = world
        .agent()
        .litellm(
            r#"scope = "ci"
key_file = "{home}/out/ci.key"
env_file = "{home}/out/ci.env"
roo_code = "{home}/out/roo.json"
check_interval = "1s""#,
        )
        .build();
    let mut agent = home.start().await;
    wait_log(&mut agent, FILES_CHANGED, 1, WAIT).await;
    let name = litellm_status(&home).await["name"]
        .as_str()
        .expect("the key's name")
        .to_string();
    for round in 0..ROUNDS {
        // Rotated at the broker: the agent's next check (within a second) fetches the new key
        // and writes the cache and every file; it is killed somewhere in those writes.
        let before = agent.log_count(FETCHED);
        let (status, body) = world
            .admin(reqwest::Method::POST, &format!("/v1/keys/{name}/rotate"))
            .await;
        assert_eq!(status, 200, "{body}");
        wait_log(&mut agent, FETCHED, before + 1, WAIT).await;
        // Spread the moment over the writes (fsyncs take milliseconds).
        tokio::time::sleep(Duration::from_millis((round as u64 * 7) % 25)).await;
        let exit = agent.kill().await;
        assert!(!exit.success(), "round {round}: killed, not exited");
        assert_whole(&world, &home, round);
        agent = home.start().await;
        // The restarted agent loads its cache and brings the files in line (whole files at
        // every moment, so checking while it writes is part of the test).
        wait_log(&mut agent, "loaded cached LiteLLM key", 1, WAIT).await;
        assert_whole(&world, &home, round);
    }
    // Answering on its socket means it serves, and so listens for SIGTERM too (the handler is
    // set up with the server, just after "agent ready").
    litellm_status(&home).await;
    let (exit, logs) = agent.stop().await;
    assert!(exit.success(), "{exit:?}: {logs}");
}
