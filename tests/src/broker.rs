//! Starting the real `botcreds` binary for end-to-end tests: a temp dir with `broker.toml`,
//! the policy and the app key, the process with its stderr captured, and clients that connect
//! from chosen loopback source addresses (127.0.0.2, 127.0.0.3, ...) so that the fake
//! tailscaled can tell bots apart the way the real one does.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// The workspace's `target/<profile>` directory, found from this test binary's own path.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// Path of a workspace binary, after building the workspace's binaries once per test process:
/// always, not only when one is missing, so that a bare `cargo test` never runs a stale binary
/// left from an older build (cargo does not rebuild binaries for another package's tests).
/// Up to date, the build is a quick no-op.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let dir = target_dir();
    BUILT.get_or_init(|| {
        let mut cmd = std::process::Command::new(env!("CARGO"));
        cmd.args(["build", "--workspace", "--bins"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "cargo build --workspace --bins failed");
    });
    let path = dir.join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// What the broker under test is configured with.
pub struct BrokerBuilder {
    policy: String,
    github_api_url: Option<String>,
    app_id: u64,
    tailscaled_socket: Option<PathBuf>,
    tailscale_toml: String,
    open_file_limit: Option<u64>,
    api_keys: Vec<(String, String)>,
    extra_toml: String,
    github_toml: String,
    env: Vec<(String, String)>,
    /// `[litellm]`: proxy URL, master key (written to a 0600 file), extra keys of the table.
    litellm: Option<(String, String, String)>,
}

impl BrokerBuilder {
    pub fn new(policy: &str) -> BrokerBuilder {
        BrokerBuilder {
            policy: policy.to_string(),
            github_api_url: None,
            app_id: 912_345,
            tailscaled_socket: None,
            tailscale_toml: String::new(),
            open_file_limit: None,
            api_keys: Vec::new(),
            extra_toml: String::new(),
            github_toml: String::new(),
            env: Vec::new(),
            litellm: None,
        }
    }

    /// Serve LiteLLM keys through the proxy at `url` (the fake's) with `master_key`, which is
    /// written to `litellm-master.key` (mode 0600); `extra` are more keys of `[litellm]`
    /// (e.g. `sweep_interval = "1s"`). Sub-tables such as `[litellm.scopes.ci]` go in
    /// [`BrokerBuilder::toml`].
    pub fn litellm(mut self, url: &str, master_key: &str, extra: &str) -> Self {
        self.litellm = Some((url.to_string(), master_key.to_string(), extra.to_string()));
        self
    }

    /// Use this GitHub API base URL (the fake's).
    pub fn github(mut self, api_url: &str, app_id: u64) -> Self {
        self.github_api_url = Some(api_url.to_string());
        self.app_id = app_id;
        self
    }

    /// Identify callers with this (fake) tailscaled.
    pub fn tailscaled(mut self, socket: &Path) -> Self {
        self.tailscaled_socket = Some(socket.to_path_buf());
        self
    }

    /// Extra keys for the `[tailscale]` table (e.g. `trust_own_node = true`).
    pub fn tailscale_toml(mut self, toml: &str) -> Self {
        self.tailscale_toml.push_str(toml);
        self
    }

    /// Start the broker with this open-file limit, soft and hard (through `sh -c 'ulimit -n'`),
    /// so that it cannot raise it.
    pub fn open_file_limit(mut self, files: u64) -> Self {
        self.open_file_limit = Some(files);
        self
    }

    /// Admit `key` as the API key of `bot`.
    pub fn api_key(mut self, bot: &str, key: &str) -> Self {
        self.api_keys.push((bot.to_string(), key.to_string()));
        self
    }

    /// Extra keys for the `[github]` table.
    pub fn github_toml(mut self, toml: &str) -> Self {
        self.github_toml.push_str(toml);
        self
    }

    /// Extra top-level tables appended to broker.toml (e.g. `[limits]`).
    pub fn toml(mut self, toml: &str) -> Self {
        self.extra_toml.push_str(toml);
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Write the files and start `botcreds serve`; returns once it listens.
    pub async fn start(self) -> BrokerProcess {
        let open_file_limit = self.open_file_limit;
        let files = self.write_files();
        let program = match open_file_limit {
            None => Command::new(binary("botcreds")),
            Some(files) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit -n {files} && exec \"$0\" \"$@\""))
                    .arg(binary("botcreds"));
                sh
            }
        };
        let cmd = serve(program, &files.config_path, &files.env);
        let BrokerFiles {
            dir,
            config_path,
            policy_path,
            env,
        } = files;
        let mut broker = BrokerProcess::spawn(cmd, dir, config_path, policy_path).await;
        broker.env = env;
        broker
    }

    /// Write `broker.toml`, the policy, the app key and the LiteLLM master key into a new
    /// temporary directory: what both the real binary and an in-process broker
    /// ([`crate::inprocess`]) start from. The open-file limit is the process's business and is
    /// not part of the files.
    pub fn write_files(self) -> BrokerFiles {
        let dir = tempfile::tempdir().expect("tempdir");
        let key_path = dir.path().join("app-key.pem");
        std::fs::copy(crate::fixtures::path("github/test-app-key.pem"), &key_path)
            .expect("copy key");
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let policy_path = dir.path().join("policy.yaml");
        std::fs::write(&policy_path, &self.policy).expect("write policy");

        let mut toml = String::from(
            "listen = [\"127.0.0.1:0\"]\ndata_dir = \"data\"\npolicy = \"policy.yaml\"\n\n",
        );
        match &self.tailscaled_socket {
            Some(s) => toml.push_str(&format!(
                "[tailscale]\nsocket = \"{}\"\nwhois_cache_ttl = \"5s\"\n{}\n",
                s.display(),
                self.tailscale_toml
            )),
            None => toml.push_str("[tailscale]\nenabled = false\n\n"),
        }
        if let Some(url) = &self.github_api_url {
            toml.push_str(&format!(
                "[github]\napp_id = {}\nprivate_key_file = \"app-key.pem\"\napi_url = \"{url}\"\n{}\n",
                self.app_id, self.github_toml
            ));
        }
        for (i, (bot, _)) in self.api_keys.iter().enumerate() {
            let var = format!("BOTCREDS_TEST_KEY_{i}");
            toml.push_str(&format!(
                "[[api_keys]]\nbot = \"{bot}\"\nkey_env = \"{var}\"\n\n"
            ));
        }
        if let Some((url, master_key, extra)) = &self.litellm {
            let path = dir.path().join("litellm-master.key");
            std::fs::write(&path, format!("{master_key}\n")).expect("write master key");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
            toml.push_str(&format!(
                "[litellm]\nurl = \"{url}\"\nmaster_key_file = \"litellm-master.key\"\n{extra}\n"
            ));
        }
        toml.push_str(&self.extra_toml);
        let config_path = dir.path().join("broker.toml");
        std::fs::write(&config_path, &toml).expect("write config");

        let mut env: Vec<(String, String)> = self
            .api_keys
            .iter()
            .enumerate()
            .map(|(i, (_, key))| (format!("BOTCREDS_TEST_KEY_{i}"), key.clone()))
            .collect();
        env.extend(self.env.iter().cloned());
        BrokerFiles {
            dir,
            config_path,
            policy_path,
            env,
        }
    }
}

/// A broker's files, written by [`BrokerBuilder::write_files`], and the environment variables
/// its config names (API keys, secrets given by variable).
pub struct BrokerFiles {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub policy_path: PathBuf,
    pub env: Vec<(String, String)>,
}

/// A running broker. Dropping it kills the process.
pub struct BrokerProcess {
    child: Child,
    pub addr: SocketAddr,
    pub url: String,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub policy_path: PathBuf,
    logs: Arc<Mutex<String>>,
    lines: watch::Receiver<usize>,
    /// The variables the process was started with, for [`BrokerProcess::crash_and_restart`].
    env: Vec<(String, String)>,
}

/// Why a broker did not come up.
#[derive(Debug)]
pub struct StartFailure {
    pub status: Option<std::process::ExitStatus>,
    pub logs: String,
}

impl BrokerProcess {
    async fn spawn(
        mut cmd: Command,
        dir: tempfile::TempDir,
        config_path: PathBuf,
        policy_path: PathBuf,
    ) -> BrokerProcess {
        match Self::try_spawn(&mut cmd, dir, config_path, policy_path).await {
            Ok(b) => b,
            Err(f) => panic!(
                "broker did not start ({:?}); its log:\n{}",
                f.status, f.logs
            ),
        }
    }

    /// Start a broker that may fail to start (for bad-config tests).
    pub async fn try_spawn(
        cmd: &mut Command,
        dir: tempfile::TempDir,
        config_path: PathBuf,
        policy_path: PathBuf,
    ) -> Result<BrokerProcess, StartFailure> {
        let mut child = cmd.spawn().expect("spawning botcreds");
        let stderr = child.stderr.take().expect("piped stderr");
        let logs = Arc::new(Mutex::new(String::new()));
        let (tx, mut rx) = watch::channel(0usize);
        let sink = logs.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            let mut n = 0;
            while let Ok(Some(line)) = reader.next_line().await {
                {
                    let mut l = sink.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
                n += 1;
                let _ = tx.send(n);
            }
        });
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if let Some(addr) = find_listen_addr(&logs.lock().unwrap()) {
                    return Some(addr);
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await
        .ok()
        .flatten();
        let Some(addr) = addr else {
            let status = child.wait().await.ok();
            return Err(StartFailure {
                status,
                logs: logs.lock().unwrap().clone(),
            });
        };
        Ok(BrokerProcess {
            child,
            addr,
            url: format!("http://{addr}"),
            dir,
            config_path,
            policy_path,
            logs,
            lines: rx,
            env: Vec::new(),
        })
    }

    /// `kill -9` the broker and wait until it is gone: no shutdown path runs.
    pub async fn kill9(&mut self) {
        self.child.start_kill().expect("SIGKILL the broker");
        let _ = self.child.wait().await;
    }

    /// The command that starts this broker again on its own config and data.
    pub fn serve_command(&self) -> Command {
        serve(
            Command::new(binary("botcreds")),
            &self.config_path,
            &self.env,
        )
    }

    /// `kill -9` the broker, then start it again on the same config and data directory (a new
    /// port: `url` and `addr` change). Panics with the log if it does not come back.
    pub async fn crash_and_restart(self) -> BrokerProcess {
        let mut old = self;
        old.kill9().await;
        old.start_again().await
    }

    /// Start the broker again on its config, data and environment after it stopped (a new
    /// port: `url` and `addr` change). Panics with the log if it does not come up.
    pub async fn start_again(self) -> BrokerProcess {
        let cmd = self.serve_command();
        let BrokerProcess {
            dir,
            config_path,
            policy_path,
            env,
            ..
        } = self;
        let mut broker = BrokerProcess::spawn(cmd, dir, config_path, policy_path).await;
        broker.env = env;
        broker
    }

    /// Everything the broker wrote to stderr so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Wait until the log contains `needle` (the broker's own readiness and reload signals).
    pub async fn wait_for_log(&mut self, needle: &str, within: Duration) -> bool {
        let logs = self.logs.clone();
        let rx = &mut self.lines;
        tokio::time::timeout(within, async {
            loop {
                if logs.lock().unwrap().contains(needle) {
                    return true;
                }
                if rx.changed().await.is_err() {
                    return logs.lock().unwrap().contains(needle);
                }
            }
        })
        .await
        .unwrap_or(false)
    }

    /// Wait until `needle` occurs at least `n` times in the log.
    pub async fn wait_for_count(&mut self, needle: &str, n: usize, within: Duration) -> bool {
        let logs = self.logs.clone();
        let rx = &mut self.lines;
        tokio::time::timeout(within, async {
            loop {
                if logs.lock().unwrap().matches(needle).count() >= n {
                    return true;
                }
                if rx.changed().await.is_err() {
                    return logs.lock().unwrap().matches(needle).count() >= n;
                }
            }
        })
        .await
        .unwrap_or(false)
    }

    /// Count of occurrences of `needle` in the log.
    pub fn log_count(&self, needle: &str) -> usize {
        self.logs.lock().unwrap().matches(needle).count()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Send a signal (e.g. `libc::SIGHUP` as 1) to the broker.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("broker running");
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// SIGTERM and wait for a clean exit.
    pub async fn stop(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("broker exits after SIGTERM")
            .expect("wait");
        // Let the log reader drain.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while self.lines.changed().await.is_ok() {}
        })
        .await;
        status
    }

    /// An HTTP client whose connections come from `source` (e.g. 127.0.0.2).
    pub fn client_from(&self, source: IpAddr) -> reqwest::Client {
        client_from(source)
    }
}

/// `botcreds serve` on `config` with `env`, its log on a pipe, killed when dropped.
fn serve(mut cmd: Command, config: &Path, env: &[(String, String)]) -> Command {
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info,botcreds_broker=debug")
        .env_remove("BOTCREDS_GITHUB_PRIVATE_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// An HTTP client whose connections come from `source`.
pub fn client_from(source: IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(source)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

fn find_listen_addr(logs: &str) -> Option<SocketAddr> {
    logs.lines()
        .filter(|l| l.contains("botcreds broker listening"))
        .find_map(|l| {
            let start = l.find("addr=")? + 5;
            l[start..].split_whitespace().next()?.parse().ok()
        })
}
