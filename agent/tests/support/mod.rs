//! Shared by the agent's integration suites: a stand-in broker that speaks the broker's wire
//! contract (`botcreds_proto`), checks the agent's API key, and records every contract
//! violation instead of asserting inside its handler (a failed assertion there would only
//! show as a dropped connection); the test git server; and the agent process itself.
//! A [`World`] dropped at the end of a passing test fails it if the stand-in saw a violation.
#![allow(dead_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

#[path = "../../../tests/src/git_server.rs"]
pub mod git_server;

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use botcreds_proto::agent::AgentStatus;
use botcreds_proto::{
    Attribution, CredentialKind, CredentialRequest, ErrorBody, ErrorCode, GitAccess,
    GithubCredential,
};
use git_server::GitServer;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

pub const HELPER: &str = env!("CARGO_BIN_EXE_git-credential-botcreds");
pub const AGENT: &str = env!("CARGO_BIN_EXE_botcreds-agent");

/// What the stand-in broker issued, and what the git server therefore accepts.
#[derive(Default)]
pub struct Issued {
    /// token → (repositories, may write)
    pub tokens: HashMap<String, (Vec<String>, bool)>,
    pub revoked: HashSet<String>,
    /// Every request's repositories and ttl, in order.
    pub requests: Vec<(Vec<String>, Option<String>)>,
    pub denied_repos: HashSet<String>,
    pub counter: u32,
    /// How long issued tokens live (default: GitHub's hour).
    pub lifetime: Option<time::Duration>,
    /// Wakes waiters after every request.
    pub requested: Arc<tokio::sync::Notify>,
    /// Every way the agent broke the broker's contract (unauthenticated, garbled, wrong kind):
    /// answered with the broker's error, and checked when the [`World`] is dropped.
    pub violations: Vec<String>,
    /// The `error` text of refusals of [`Issued::denied_repos`] (default: the policy's words).
    pub deny_message: Option<String>,
}

/// The API key the agent authenticates with (`api_key_file` in the test agent.toml).
pub const API_KEY: &str = "bck_agent_tests_0123456789abcdef";

pub type Shared = Arc<Mutex<Issued>>;

pub struct Broker {
    pub url: String,
    pub stop: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Broker {
    pub async fn start(issued: Shared) -> Broker {
        let app = axum::Router::new()
            .route("/v1/credentials", post(issue))
            .route("/healthz", get(|| async { "ok" }))
            .with_state(issued);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Broker {
            url,
            stop: Some(tx),
            task,
        }
    }

    /// Stops listening and closes every connection, as a killed broker would.
    pub async fn kill(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = self.task.await;
    }
}

fn refuse(status: StatusCode, code: ErrorCode, error: String) -> Response {
    let body = ErrorBody {
        error,
        code,
        retry_after: None,
        rule: None,
    };
    (status, Json(body)).into_response()
}

async fn issue(State(issued): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let mut world = issued.lock().unwrap();
    world.requested.notify_waiters();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer != Some(API_KEY) {
        let violation = match bearer {
            None => "a credential request without an API key".to_string(),
            Some(_) => "a credential request with another API key than the agent's".to_string(),
        };
        world.violations.push(violation.clone());
        return refuse(
            StatusCode::UNAUTHORIZED,
            ErrorCode::InvalidApiKey,
            violation,
        );
    }
    let req: CredentialRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            let violation = format!("a credential request that is not one: {e}");
            world.violations.push(violation.clone());
            return refuse(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidRequest,
                violation,
            );
        }
    };
    world
        .requests
        .push((req.repositories.clone(), req.ttl.clone()));
    if req.kind != Some(CredentialKind::GithubToken) {
        let violation = format!("asked for {:?}, not a GitHub token", req.kind);
        world.violations.push(violation.clone());
        return refuse(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            violation,
        );
    }
    if let Some(repo) = req
        .repositories
        .iter()
        .find(|r| world.denied_repos.contains(*r))
    {
        let body = ErrorBody {
            error: world
                .deny_message
                .clone()
                .unwrap_or_else(|| format!("policy denies {repo} to test-bot")),
            code: ErrorCode::PolicyDenied,
            retry_after: None,
            rule: Some("bots.test-bot.deny[0]".into()),
        };
        return (StatusCode::FORBIDDEN, Json(body)).into_response();
    }
    world.counter += 1;
    let token = format!("ghs_test{:04}", world.counter);
    let write = req.permissions.iter().any(|p| p == "contents:write");
    world
        .tokens
        .insert(token.clone(), (req.repositories.clone(), write));
    let expires = OffsetDateTime::now_utc() + world.lifetime.unwrap_or(time::Duration::hours(1));
    let mut permissions = std::collections::BTreeMap::new();
    permissions.insert(
        "contents".to_string(),
        if write { "write" } else { "read" }.to_string(),
    );
    Json(GithubCredential {
        kind: CredentialKind::GithubToken,
        credential_id: format!("tok_{}", world.counter),
        token,
        expires_at: expires.format(&Rfc3339).unwrap(),
        repositories: req.repositories.clone(),
        permissions,
        approval: "auto".into(),
        bot: "test-bot".into(),
        git: GitAccess {
            clone_url: String::new(),
            clone_urls: vec![],
            askpass_script: String::new(),
        },
        attribution: Attribution {
            name: "botcreds[bot]".into(),
            email: "1+botcreds[bot]@users.noreply.github.com".into(),
            trailer: "Bot: test-bot".into(),
        },
    })
    .into_response()
}

/// Everything one test needs: broker, git server, a temp dir, the agent's config.
pub struct World {
    pub issued: Shared,
    pub broker: Option<Broker>,
    pub git: GitServer,
    pub dir: tempfile::TempDir,
    pub agent: Option<Agent>,
}

impl Drop for World {
    /// A passing test fails if the stand-in broker saw the agent break the contract.
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let violations = std::mem::take(&mut self.issued.lock().unwrap().violations);
        assert!(
            violations.is_empty(),
            "the stand-in broker saw the agent break the broker's contract:\n{}\nagent log:\n{}",
            violations.join("\n"),
            self.agent_log()
        );
    }
}

pub struct Agent {
    pub child: Child,
    pub log: Arc<Mutex<String>>,
    pub drain: tokio::task::JoinHandle<()>,
}

impl World {
    pub async fn new() -> World {
        World::with_readonly_extra("").await
    }

    /// `extra` is appended to the `other/readonly` entry (the one fetched at startup).
    pub async fn with_readonly_extra(extra: &str) -> World {
        World::with_toml("", extra, "").await
    }

    /// `top` holds more top-level keys, `extra` is appended to the `other/readonly` entry and
    /// `tail` (tables such as `[limits]`) to the end of agent.toml.
    pub async fn with_toml(top: &str, extra: &str, tail: &str) -> World {
        let issued: Shared = Arc::default();
        let check_state = issued.clone();
        let git = GitServer::start(Arc::new(move |token: &str, repo: &str, write: bool| {
            let world = check_state.lock().unwrap();
            if world.revoked.contains(token) {
                return false;
            }
            world.tokens.get(token).is_some_and(|(repos, may_write)| {
                repos.iter().any(|r| r == repo) && (!write || *may_write)
            })
        }))
        .await
        .unwrap();
        for repo in ["acme/web", "acme/api", "acme/secret", "other/readonly"] {
            git.create_repo(repo).unwrap();
        }
        let broker = Broker::start(issued.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("home")).unwrap();
        let config = format!(
            r#"
broker = "{broker}"
api_key_file = "{dir}/agent.key"
socket = "{dir}/run/agent.sock"
cache_dir = "{dir}/cache"
helper_timeout = "5s"
{top}

[[github]]
protocol = "http"
host = "{host}"
repositories = ["acme/*"]
permissions = ["contents:write"]
reason = "agent tests"

[[github]]
protocol = "http"
host = "{host}"
repositories = ["other/readonly"]
permissions = ["contents:read"]
{extra}

{tail}
"#,
            broker = broker.url,
            dir = dir.path().display(),
            host = git.host(),
        );
        std::fs::write(dir.path().join("agent.toml"), config).unwrap();
        let key = dir.path().join("agent.key");
        std::fs::write(&key, format!("{API_KEY}\n")).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        World {
            issued,
            broker: Some(broker),
            git,
            dir,
            agent: None,
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run/agent.sock")
    }

    pub async fn start_agent(&mut self) {
        self.start_agent_with(|_| {}).await
    }

    /// Starts the agent after `setup` adjusted its command (limits, environment).
    pub async fn start_agent_with(&mut self, setup: impl FnOnce(&mut Command)) {
        let mut cmd = Command::new(AGENT);
        setup(&mut cmd);
        let mut child = cmd
            .args(["run", "--config"])
            .arg(self.dir.path().join("agent.toml"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = Arc::new(Mutex::new(String::new()));
        loop {
            let Some(line) = lines.next_line().await.unwrap() else {
                panic!("agent exited before it was ready:\n{}", log.lock().unwrap());
            };
            log.lock().unwrap().push_str(&format!("{line}\n"));
            if line.contains("agent ready") {
                assert!(
                    line.contains(&format!("socket={}", self.socket().display())),
                    "{line}"
                );
                break;
            }
        }
        // Keep draining, so the agent never blocks on a full pipe; keep the text for failures.
        let sink = log.clone();
        let drain = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        self.agent = Some(Agent { child, log, drain });
    }

    /// SIGTERM, and the agent exits cleanly and removes its socket.
    pub async fn stop_agent(&mut self) {
        let mut agent = self.agent.take().expect("agent running");
        let pid = rustix::process::Pid::from_raw(agent.child.id().expect("pid") as i32)
            .expect("a child's pid is positive");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let status = agent.child.wait().await.unwrap();
        // The log is complete once the pipe reaches end of file.
        agent.drain.await.unwrap();
        assert!(
            status.success(),
            "agent exit {status}:\n{}",
            agent.log.lock().unwrap()
        );
        assert!(!self.socket().exists(), "socket removed on shutdown");
        assert!(agent.log.lock().unwrap().contains("agent stopped"));
    }

    pub fn agent_log(&self) -> String {
        self.agent
            .as_ref()
            .map(|a| a.log.lock().unwrap().clone())
            .unwrap_or_default()
    }

    /// Runs git with only our helper configured, per-repository tokens, and no prompting.
    pub async fn git(&self, cwd: &Path, args: &[&str]) -> (bool, String) {
        let helper = format!("credential.helper={HELPER}");
        let out = Command::new("git")
            .args([
                "-c",
                "credential.helper=",
                "-c",
                &helper,
                "-c",
                "credential.useHttpPath=true",
            ])
            .args(args)
            .current_dir(cwd)
            .env("HOME", self.dir.path().join("home"))
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_AUTHOR_NAME", "bot")
            .env("GIT_AUTHOR_EMAIL", "bot@example.invalid")
            .env("GIT_COMMITTER_NAME", "bot")
            .env("GIT_COMMITTER_EMAIL", "bot@example.invalid")
            .env("BOTCREDS_AGENT_SOCKET", self.socket())
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), stderr)
    }

    pub async fn clone(&self, repo: &str, into: &str) -> (bool, String) {
        let url = self.git.url(repo);
        self.git(self.dir.path(), &["clone", "--quiet", &url, into])
            .await
    }

    pub async fn status(&self) -> AgentStatus {
        let out = Command::new(AGENT)
            .args(["status", "--json", "--socket"])
            .arg(self.socket())
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub async fn helper(&self, op: &str, input: &str, env: &[(&str, &str)]) -> (String, String) {
        let mut cmd = Command::new(HELPER);
        cmd.arg(op)
            .env("BOTCREDS_AGENT_SOCKET", self.socket())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        {
            use tokio::io::AsyncWriteExt;
            let mut stdin = child.stdin.take().unwrap();
            // `store` and unknown operations exit without reading: a broken pipe is expected.
            let _ = stdin.write_all(input.as_bytes()).await;
        }
        let out = child.wait_with_output().await.unwrap();
        assert!(out.status.success(), "the helper always exits 0");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// Fails (never skips) a test that needs root: it runs processes as other uids. A skipped
/// check would report ok for something that was not checked.
pub fn require_root(why: &str) {
    let euid = rustix::process::geteuid().as_raw();
    assert_eq!(
        euid, 0,
        "this test needs root ({why}) and runs as uid {euid}: run the agent suites as root"
    );
}
