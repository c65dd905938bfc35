//! Starting the real `botcreds-agent` binary for end-to-end tests: a temp dir with `agent.toml`,
//! its cache and socket, the process with its stderr captured, and the real `git` and
//! `git-credential-botcreds` pointed at it — the way a bot host runs them.
//!
//! The directory ([`AgentHome`]) outlives any one process, so a test can stop the agent and
//! start it again on the same cache, as a restarted service would.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use botcreds_proto::agent::AgentStatus;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::broker::binary;

/// Bound on the agent's start-up (config, cache, socket); generous for a loaded 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on a clean stop: the agent drains connections for up to 5 s.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// One `[[github]]` entry of `agent.toml`.
#[derive(Clone, Debug)]
pub struct GithubEntry {
    host: String,
    protocol: String,
    repositories: Vec<String>,
    permissions: Vec<String>,
    extra: String,
}

impl GithubEntry {
    /// An entry for `host` (as git names it, `127.0.0.1:PORT` for the test git server) over
    /// plain `http`, which is what the test git server speaks.
    pub fn new(host: &str, repositories: &[&str], permissions: &[&str]) -> GithubEntry {
        GithubEntry {
            host: host.to_string(),
            protocol: "http".to_string(),
            repositories: repositories.iter().map(|s| s.to_string()).collect(),
            permissions: permissions.iter().map(|s| s.to_string()).collect(),
            extra: String::new(),
        }
    }

    /// Overrides the protocol (`https` is the agent's default).
    pub fn protocol(mut self, protocol: &str) -> Self {
        self.protocol = protocol.to_string();
        self
    }

    /// Extra keys for this entry, e.g. `refresh_before = "5m"`.
    pub fn toml(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    fn render(&self) -> String {
        let list = |items: &[String]| {
            items
                .iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "[[github]]\nprotocol = {:?}\nhost = {:?}\nrepositories = [{}]\npermissions = [{}]\nreason = \"botcreds e2e\"\n{}\n",
            self.protocol,
            self.host,
            list(&self.repositories),
            list(&self.permissions),
            self.extra
        )
    }
}

/// What the agent under test is configured with.
pub struct AgentBuilder {
    broker: String,
    top_level: String,
    github: Vec<GithubEntry>,
    env: Vec<(String, String)>,
    /// Raw `[[litellm]]` tables, appended last.
    litellm: String,
}

impl AgentBuilder {
    /// An agent that talks to the broker at `broker_url` with the host's tailnet identity.
    pub fn new(broker_url: &str) -> AgentBuilder {
        AgentBuilder {
            broker: broker_url.to_string(),
            top_level: String::new(),
            github: Vec::new(),
            env: Vec::new(),
            litellm: String::new(),
        }
    }

    /// Adds a `[[litellm]]` entry: `body` holds its keys (and may end with its
    /// `[litellm.workspace]` table). `{home}` in it is replaced by the agent's directory.
    pub fn litellm(mut self, body: &str) -> Self {
        self.litellm.push_str("[[litellm]]\n");
        self.litellm.push_str(body);
        self.litellm.push_str("\n\n");
        self
    }

    /// Adds a `[[github]]` entry (entries are tried in the order added).
    pub fn github(mut self, entry: GithubEntry) -> Self {
        self.github.push(entry);
        self
    }

    /// Extra top-level keys, e.g. `helper_timeout = "20s"`.
    pub fn toml(mut self, toml: &str) -> Self {
        self.top_level.push_str(toml);
        self.top_level.push('\n');
        self
    }

    /// An environment variable for the agent process (e.g. `RUST_LOG`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Writes `agent.toml` into a new temp dir, without starting anything.
    pub fn build(self) -> AgentHome {
        let dir = tempfile::Builder::new()
            .prefix("botcreds-agent-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("home")).expect("create HOME");
        std::fs::create_dir_all(root.join("work")).expect("create work dir");
        // The helper timeout inside the agent stays below the helper's own bound (10 s).
        let mut toml = format!(
            "broker = {:?}\nsocket = {:?}\ncache_dir = {:?}\nhelper_timeout = \"8s\"\n{}\n",
            self.broker,
            root.join("run/agent.sock").display().to_string(),
            root.join("cache").display().to_string(),
            self.top_level
        );
        for entry in &self.github {
            toml.push_str(&entry.render());
        }
        toml.push_str(&self.litellm.replace("{home}", &root.display().to_string()));
        let config_path = root.join("agent.toml");
        std::fs::write(&config_path, toml).expect("write agent.toml");
        AgentHome {
            inner: Arc::new(HomeInner {
                dir,
                config_path,
                env: self.env,
            }),
        }
    }

    /// Writes the config and starts `botcreds-agent run`; returns once its socket is up.
    pub async fn start(self) -> AgentProcess {
        self.build().start().await
    }
}

/// Whether git sends the repository path to credential helpers (`credential.useHttpPath`), so
/// that each repository gets its own token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpPath {
    Sent,
    NotSent,
}

/// What a finished command (git, the helper, the status CLI) did.
#[derive(Clone, Debug)]
pub struct Output {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// The agent's directory: `agent.toml`, `cache/`, `run/agent.sock`, a `home/` for git and a
/// `work/` dir for clones. A cheap `Clone` handle; the directory goes when the last one drops.
#[derive(Clone)]
pub struct AgentHome {
    inner: Arc<HomeInner>,
}

struct HomeInner {
    dir: tempfile::TempDir,
    config_path: PathBuf,
    env: Vec<(String, String)>,
}

impl AgentHome {
    pub fn dir(&self) -> &Path {
        self.inner.dir.path()
    }

    pub fn config_path(&self) -> &Path {
        &self.inner.config_path
    }

    pub fn socket(&self) -> PathBuf {
        self.dir().join("run/agent.sock")
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.dir().join("cache")
    }

    /// Where tests clone repositories.
    pub fn work_dir(&self) -> PathBuf {
        self.dir().join("work")
    }

    /// Starts `botcreds-agent run` on this directory; returns once it logged `agent ready`.
    ///
    /// # Panics
    /// If it does not become ready (the panic message carries its log).
    pub async fn start(&self) -> AgentProcess {
        match self.try_start().await {
            Ok(agent) => agent,
            Err(f) => panic!("agent did not start ({:?}); its log:\n{}", f.status, f.logs),
        }
    }

    /// Starts the agent, which may fail to start (for bad-config tests).
    pub async fn try_start(&self) -> Result<AgentProcess, StartFailure> {
        let mut cmd = Command::new(binary("botcreds-agent"));
        cmd.arg("run")
            .arg("--config")
            .arg(self.config_path())
            .env("RUST_LOG", "info")
            .env_remove("BOTCREDS_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in &self.inner.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawning botcreds-agent");
        let stderr = child.stderr.take().expect("piped stderr");
        let logs = Arc::new(Mutex::new(String::new()));
        let (tx, mut rx) = watch::channel(0usize);
        let sink = logs.clone();
        // Keeps reading to the end, so the agent never blocks on a full pipe.
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut n = 0;
            while let Ok(Some(line)) = lines.next_line().await {
                {
                    let mut l = sink.lock().unwrap_or_else(|e| e.into_inner());
                    l.push_str(&line);
                    l.push('\n');
                }
                n += 1;
                let _ = tx.send(n);
            }
        });
        let needle = format!("agent ready socket={}", self.socket().display());
        let ready = tokio::time::timeout(START_TIMEOUT, async {
            loop {
                if lock(&logs).contains(&needle) {
                    return true;
                }
                if rx.changed().await.is_err() {
                    return lock(&logs).contains(&needle);
                }
            }
        })
        .await
        .unwrap_or(false);
        if !ready {
            let _ = child.start_kill();
            let status = child.wait().await.ok();
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
            return Err(StartFailure {
                status,
                logs: lock(&logs).clone(),
            });
        }
        Ok(AgentProcess {
            child,
            home: self.clone(),
            logs,
            lines: rx,
            reader: Some(reader),
        })
    }

    /// A `git` command that uses only `git-credential-botcreds` (by absolute path) against this
    /// agent: no system or user config, a temp `HOME`, no prompting, fixed author.
    pub fn git_command(&self, http_path: HttpPath) -> Command {
        let helper = format!(
            "credential.helper={}",
            binary("git-credential-botcreds").display()
        );
        let use_path = match http_path {
            HttpPath::Sent => "credential.useHttpPath=true",
            HttpPath::NotSent => "credential.useHttpPath=false",
        };
        let mut cmd = Command::new("git");
        // An empty helper first resets any inherited list, so only ours is asked.
        cmd.args(["-c", "credential.helper=", "-c", &helper, "-c", use_path])
            .current_dir(self.work_dir())
            .env("HOME", self.dir().join("home"))
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "")
            .env_remove("SSH_ASKPASS")
            .env("GIT_AUTHOR_NAME", "build bot")
            .env("GIT_AUTHOR_EMAIL", "bot@example.invalid")
            .env("GIT_COMMITTER_NAME", "build bot")
            .env("GIT_COMMITTER_EMAIL", "bot@example.invalid")
            .env("BOTCREDS_AGENT_SOCKET", self.socket())
            .env_remove("BOTCREDS_HELPER_TIMEOUT")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Runs git in `cwd` (relative paths are under [`AgentHome::work_dir`]).
    pub async fn git(&self, cwd: &str, http_path: HttpPath, args: &[&str]) -> Output {
        let mut cmd = self.git_command(http_path);
        cmd.current_dir(self.work_dir().join(cwd)).args(args);
        run(cmd, None).await
    }

    /// Runs `git-credential-botcreds <op>` with `input` on stdin, as git would.
    pub async fn helper(&self, op: &str, input: &str) -> Output {
        let mut cmd = Command::new(binary("git-credential-botcreds"));
        cmd.arg(op)
            .env("BOTCREDS_AGENT_SOCKET", self.socket())
            .env_remove("BOTCREDS_HELPER_TIMEOUT")
            .kill_on_drop(true);
        run(cmd, Some(input.as_bytes())).await
    }

    /// `botcreds-agent status --json` against this agent's socket.
    ///
    /// # Panics
    /// If the command fails or its output is not an `AgentStatus`.
    pub async fn status(&self) -> (AgentStatus, String) {
        let out = self.status_command(&["--json"]).await;
        assert!(out.success, "botcreds-agent status --json: {}", out.stderr);
        let status = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("status JSON not understood ({e}): {}", out.stdout));
        (status, out.stdout)
    }

    /// `botcreds-agent status [args]` against this agent's socket.
    pub async fn status_command(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(binary("botcreds-agent"));
        cmd.arg("status")
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .kill_on_drop(true);
        run(cmd, None).await
    }
}

/// Runs `cmd` to completion with `input` on stdin (or none).
async fn run(mut cmd: Command, input: Option<&[u8]>) -> Output {
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning a command");
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        // `store` and unknown operations exit without reading: a broken pipe is fine.
        let _ = stdin.write_all(input).await;
    }
    let out = child
        .wait_with_output()
        .await
        .expect("waiting for a command");
    Output {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn lock(logs: &Mutex<String>) -> std::sync::MutexGuard<'_, String> {
    logs.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why an agent did not come up.
#[derive(Debug)]
pub struct StartFailure {
    pub status: Option<std::process::ExitStatus>,
    pub logs: String,
}

/// A running agent. Dropping it kills the process (its socket file then stays behind, as after
/// a crash; the next agent replaces it).
pub struct AgentProcess {
    child: Child,
    home: AgentHome,
    logs: Arc<Mutex<String>>,
    lines: watch::Receiver<usize>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl AgentProcess {
    /// The directory this agent runs on (to start it again after [`AgentProcess::stop`]).
    pub fn home(&self) -> &AgentHome {
        &self.home
    }

    /// Everything the agent wrote to stderr so far.
    pub fn logs(&self) -> String {
        lock(&self.logs).clone()
    }

    /// Count of occurrences of `needle` in the log.
    pub fn log_count(&self, needle: &str) -> usize {
        lock(&self.logs).matches(needle).count()
    }

    /// Waits until `needle` occurs in the log (the agent's own signals: fetched, expired, ...).
    pub async fn wait_for_log(&mut self, needle: &str, within: Duration) -> bool {
        self.wait_for_count(needle, 1, within).await
    }

    /// Waits until `needle` occurs at least `n` times in the log.
    pub async fn wait_for_count(&mut self, needle: &str, n: usize, within: Duration) -> bool {
        let logs = self.logs.clone();
        let rx = &mut self.lines;
        tokio::time::timeout(within, async {
            loop {
                if lock(&logs).matches(needle).count() >= n {
                    return true;
                }
                if rx.changed().await.is_err() {
                    return lock(&logs).matches(needle).count() >= n;
                }
            }
        })
        .await
        .unwrap_or(false)
    }

    /// Sends a signal by name (`TERM`, `INT`, ...).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("agent running");
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// SIGKILL, as a crash or the OOM killer would: nothing of the agent's own clean-up runs.
    /// Waits for the exit.
    pub async fn kill(mut self) -> std::process::ExitStatus {
        self.signal("KILL");
        tokio::time::timeout(STOP_TIMEOUT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("agent did not exit after SIGKILL:\n{}", self.logs()))
            .expect("wait")
    }

    /// SIGTERM, then waits for the exit and for the log to be complete.
    pub async fn stop(mut self) -> (std::process::ExitStatus, String) {
        self.signal("TERM");
        let status = tokio::time::timeout(STOP_TIMEOUT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("agent did not exit after SIGTERM:\n{}", self.logs()))
            .expect("wait");
        if let Some(reader) = self.reader.take() {
            // The log is complete once the pipe reaches end of file.
            let _ = tokio::time::timeout(Duration::from_secs(10), reader).await;
        }
        (status, self.logs())
    }
}
