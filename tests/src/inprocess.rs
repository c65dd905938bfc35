//! The broker in the test's own runtime, mini-redis style: the same `broker.toml` the real
//! binary would read ([`BrokerBuilder::write_files`]), loaded with `Config::load`, the production
//! edges built from it by `Edges::from_config` (so GitHub, tailscaled and LiteLLM are the doubles
//! of this crate, spoken to over their real protocols), and `server::run` on a listener bound
//! here on an ephemeral port. No process, no log to scrape: for the handler-level cases
//! (validation tables, refusal codes, answer shapes). What needs a real process (signals, a
//! crash, the log, the CLI, the agent) stays with [`crate::broker::BrokerProcess`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use botcreds_broker::config::{Config, Env};
use botcreds_broker::server::{self, Edges, ServeError};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::broker::{BrokerBuilder, BrokerFiles};

/// The variables the config names (`key_env`, secrets), without touching the process's
/// environment, which every test of the binary shares.
struct TestEnv(HashMap<String, String>);

impl Env for TestEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).filter(|v| !v.is_empty()).cloned()
    }
}

/// A broker running in this process. Dropping it shuts the server down (the task ends with
/// the test's runtime at the latest).
pub struct InProcessBroker {
    pub addr: SocketAddr,
    pub url: String,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub policy_path: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl BrokerBuilder {
    /// Start the broker in this process (see the module docs); returns once it answers
    /// `/healthz`. Panics with the start-up error if it does not come up.
    pub async fn start_in_process(self) -> InProcessBroker {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let BrokerFiles {
            dir,
            config_path,
            policy_path,
            env,
        } = self.write_files();
        let env = TestEnv(env.into_iter().collect());
        let config = Config::load(&config_path, &env)
            .unwrap_or_else(|e| panic!("the test broker's config does not load: {e}"));
        let edges =
            Edges::from_config(&config).unwrap_or_else(|e| panic!("the test broker's edges: {e}"));
        // Bound before the server runs: connections made meanwhile wait in the backlog.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        let (shutdown, stop) = oneshot::channel::<()>();
        let mut task = tokio::spawn(server::run(config, edges, vec![listener], async {
            let _ = stop.await;
        }));
        let url = format!("http://{addr}");
        // Readiness: the first answer to /healthz, or the start-up error if `run` returns.
        let health = reqwest::Client::new().get(format!("{url}/healthz")).send();
        tokio::select! {
            answer = health => {
                let answer = answer.expect("the in-process broker answers /healthz");
                assert!(answer.status().is_success(), "/healthz: {}", answer.status());
            }
            ended = &mut task => panic!("the in-process broker did not start: {:?}", ended.map(|r| r.map_err(|e| error_chain(&e)))),
        }
        InProcessBroker {
            addr,
            url,
            dir,
            config_path,
            policy_path,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    s
}

impl InProcessBroker {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// An HTTP client whose connections come from `source` (e.g. 127.0.0.2).
    pub fn client_from(&self, source: std::net::IpAddr) -> reqwest::Client {
        crate::broker::client_from(source)
    }

    /// Shut down as SIGTERM would (drain, flush the audit log) and wait for the end.
    pub async fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            let ended = task.await.expect("the in-process broker's task");
            if let Err(e) = ended {
                panic!(
                    "the in-process broker stopped with an error: {}",
                    error_chain(&e)
                );
            }
        }
    }
}

impl Drop for InProcessBroker {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}
