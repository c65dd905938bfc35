//! The end-to-end world every suite starts from: the doubles (GitHub, tailscaled with its
//! nodes, LiteLLM with the fake Coder) and a broker configured against them, either the real
//! binary ([`WorldBuilder::start`]) or in this process ([`WorldBuilder::start_in_process`]);
//! and the helpers the suites share (addresses, error codes, requests, the CLI).
//!
//! ```text
//! let w = World::builder(POLICY)
//!     .node(CI, NodeBuilder::new("ci-bot-07").tags(["tag:ci"]))
//!     .api_key("ops", OPS_KEY)
//!     .litellm("")
//!     .start()
//!     .await;
//! ```

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Stdio;

use botcreds_proto::{ErrorBody, ErrorCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::broker::{BrokerBuilder, BrokerProcess, binary};
use crate::fake_github::{FakeGithub, FakeGithubConfig};
use crate::fake_litellm::{FakeLitellm, FakeLitellmConfig};
use crate::fake_tailscaled::{FakeTailscaled, NodeBuilder};
use crate::inprocess::InProcessBroker;

/// A loopback address written as text (the suites name their callers `"127.0.0.2"`, ...).
pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The stable code of a broker error body; panics, showing the body, if it is none.
pub fn code_of(body: &Value) -> ErrorCode {
    serde_json::from_value::<ErrorBody>(body.clone())
        .unwrap_or_else(|e| panic!("not an error body ({e}): {body}"))
        .code
}

/// Send `request`: the status and the body as JSON, or as a JSON string when it is not JSON.
pub async fn call(request: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = request.send().await.expect("broker reachable");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// A finished `botcreds` CLI run.
pub struct CliRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    /// stdout as JSON; panics with both streams if it is not.
    pub fn json<T: DeserializeOwned>(&self) -> T {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }

    /// Asserts the run succeeded.
    pub fn ok(self) -> CliRun {
        assert_eq!(
            self.code, 0,
            "stdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }
}

/// `botcreds ARGS` against the broker at `url`, as `api_key` (or, without one, as the tailnet
/// identity of 127.0.0.1, where the CLI connects from).
pub async fn cli(url: &str, api_key: Option<&str>, args: &[&str]) -> CliRun {
    let mut cmd = tokio::process::Command::new(binary("botcreds"));
    cmd.args(args)
        .env("BOTCREDS_BROKER", url)
        .env_remove("BOTCREDS_API_KEY")
        .stdin(Stdio::null());
    if let Some(k) = api_key {
        cmd.env("BOTCREDS_API_KEY", k);
    }
    let out = cmd.output().await.expect("running botcreds");
    CliRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn plain_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("reqwest client")
}

/// What the world's helpers need of a broker, real or in-process.
pub trait Broker {
    fn url(&self) -> &str;
    fn data_dir(&self) -> PathBuf;
}

impl Broker for BrokerProcess {
    fn url(&self) -> &str {
        &self.url
    }
    fn data_dir(&self) -> PathBuf {
        BrokerProcess::data_dir(self)
    }
}

impl Broker for InProcessBroker {
    fn url(&self) -> &str {
        &self.url
    }
    fn data_dir(&self) -> PathBuf {
        InProcessBroker::data_dir(self)
    }
}

type Configure = Box<dyn FnOnce(BrokerBuilder) -> BrokerBuilder + Send>;

/// How the world is set up; see the module docs.
pub struct WorldBuilder {
    policy: String,
    github: FakeGithubConfig,
    nodes: Vec<(IpAddr, NodeBuilder)>,
    tailscaled: bool,
    litellm_config: FakeLitellmConfig,
    /// `[litellm]`'s extra keys when the broker serves LiteLLM keys.
    litellm: Option<String>,
    coder: bool,
    coder_sessions: Vec<(String, String, String)>,
    broker: Vec<Configure>,
}

/// The doubles and the broker.
pub struct World<B = BrokerProcess> {
    pub github: FakeGithub,
    /// Always running; the broker asks it unless [`WorldBuilder::no_tailscaled`].
    pub tailscaled: FakeTailscaled,
    /// Always running (with its fake Coder); the broker uses it only after
    /// [`WorldBuilder::litellm`] (and Coder after [`WorldBuilder::coder`]).
    pub litellm: FakeLitellm,
    pub broker: B,
    /// A plain client (no proxy) for requests whose source address does not matter.
    pub http: reqwest::Client,
}

impl World {
    pub fn builder(policy: &str) -> WorldBuilder {
        WorldBuilder {
            policy: policy.to_string(),
            github: FakeGithubConfig::default(),
            nodes: Vec::new(),
            tailscaled: true,
            litellm_config: FakeLitellmConfig::default(),
            litellm: None,
            coder: false,
            coder_sessions: Vec::new(),
            broker: Vec::new(),
        }
    }
}

impl WorldBuilder {
    /// The fake GitHub's setup (the default: the fixtures' app and installations).
    pub fn github(mut self, config: FakeGithubConfig) -> Self {
        self.github = config;
        self
    }

    /// A tailnet node that connects from `addr` (a loopback address such as `"127.0.0.2"`).
    pub fn node(mut self, addr: &str, node: NodeBuilder) -> Self {
        self.nodes.push((ip(addr), node));
        self
    }

    /// No tailnet identity: `[tailscale] enabled = false`.
    pub fn no_tailscaled(mut self) -> Self {
        self.tailscaled = false;
        self
    }

    /// Serve LiteLLM keys through a fake LiteLLM (default setup); `extra` are more keys of
    /// `[litellm]`.
    pub fn litellm(self, extra: &str) -> Self {
        self.litellm_with(FakeLitellmConfig::default(), extra)
    }

    /// [`WorldBuilder::litellm`] with the fake set up as `config`.
    pub fn litellm_with(mut self, config: FakeLitellmConfig, extra: &str) -> Self {
        self.litellm_config = config;
        self.litellm = Some(extra.to_string());
        self
    }

    /// `[coder]` pointing at the fake LiteLLM's fake Coder.
    pub fn coder(mut self) -> Self {
        self.coder = true;
        self
    }

    /// A Coder session the fake Coder knows.
    pub fn coder_session(mut self, token: &str, id: &str, username: &str) -> Self {
        self.coder_sessions
            .push((token.to_string(), id.to_string(), username.to_string()));
        self
    }

    /// Admit `key` as the API key of `bot`.
    pub fn api_key(self, bot: &str, key: &str) -> Self {
        let (bot, key) = (bot.to_string(), key.to_string());
        self.broker(move |b| b.api_key(&bot, &key))
    }

    /// Extra top-level tables of broker.toml.
    pub fn toml(self, toml: &str) -> Self {
        let toml = toml.to_string();
        self.broker(move |b| b.toml(&toml))
    }

    /// An environment variable of the broker (a secret its config names).
    pub fn env(self, key: &str, value: &str) -> Self {
        let (key, value) = (key.to_string(), value.to_string());
        self.broker(move |b| b.env(&key, &value))
    }

    /// Anything else of the broker's setup.
    pub fn broker(
        mut self,
        configure: impl FnOnce(BrokerBuilder) -> BrokerBuilder + Send + 'static,
    ) -> Self {
        self.broker.push(Box::new(configure));
        self
    }

    /// Start the doubles and configure the broker against them.
    async fn doubles(self) -> World<BrokerBuilder> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let github = FakeGithub::start(self.github).await;
        let tailscaled = FakeTailscaled::start().await;
        for (addr, node) in &self.nodes {
            tailscaled.add_node(*addr, node.build());
        }
        let mut broker =
            BrokerBuilder::new(&self.policy).github(&github.base_url(), crate::fixtures::APP_ID);
        if self.tailscaled {
            broker = broker.tailscaled(tailscaled.socket_path());
        }
        let litellm = FakeLitellm::start(self.litellm_config).await;
        if let Some(extra) = &self.litellm {
            broker = broker.litellm(&litellm.base_url(), litellm.master_key(), extra);
        }
        if self.coder {
            broker = broker.toml(&format!("[coder]\nurl = \"{}\"\n\n", litellm.base_url()));
        }
        for (token, id, username) in &self.coder_sessions {
            litellm.add_coder_session(token, id, username);
        }
        for configure in self.broker {
            broker = configure(broker);
        }
        World {
            github,
            tailscaled,
            litellm,
            broker,
            http: plain_client(),
        }
    }

    /// Start the doubles and the real `botcreds` binary.
    pub async fn start(self) -> World<BrokerProcess> {
        let (world, builder) = self.doubles().await.swap_broker(());
        world.swap_broker(builder.start().await).0
    }

    /// Start the doubles and the broker in this process ([`crate::inprocess`]).
    pub async fn start_in_process(self) -> World<InProcessBroker> {
        let (world, builder) = self.doubles().await.swap_broker(());
        world.swap_broker(builder.start_in_process().await).0
    }
}

impl<B> World<B> {
    /// The same doubles with `broker` in place of this one, which is handed back.
    fn swap_broker<N>(self, broker: N) -> (World<N>, B) {
        let world = World {
            github: self.github,
            tailscaled: self.tailscaled,
            litellm: self.litellm,
            broker,
            http: self.http,
        };
        (world, self.broker)
    }
}

impl<B: Broker> World<B> {
    /// The broker's URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.broker.url())
    }

    /// An HTTP client whose connections come from `from` (e.g. `"127.0.0.2"`).
    pub fn client_from(&self, from: &str) -> reqwest::Client {
        crate::broker::client_from(ip(from))
    }

    /// `POST /v1/credentials` from the node at `from`: the status and the JSON body.
    pub async fn ask(&self, from: &str, body: Value) -> (u16, Value) {
        self.ask_with(from, body, None).await
    }

    /// `POST /v1/credentials` from `from`, with `key` as the bearer if given.
    pub async fn ask_with(&self, from: &str, body: Value, key: Option<&str>) -> (u16, Value) {
        let mut req = self
            .client_from(from)
            .post(self.url("/v1/credentials"))
            .json(&body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("json body"))
    }

    /// `botcreds ARGS` against this broker; see [`cli`].
    pub async fn run_cli(&self, api_key: Option<&str>, args: &[&str]) -> CliRun {
        cli(self.broker.url(), api_key, args).await
    }
}

impl World<BrokerProcess> {
    /// Stop the broker (SIGTERM, a clean exit) and start it again on the same config, data
    /// and environment (a new port).
    pub async fn restart(mut self) -> World<BrokerProcess> {
        assert!(self.broker.stop().await.success());
        self.broker = self.broker.start_again().await;
        self
    }
}
