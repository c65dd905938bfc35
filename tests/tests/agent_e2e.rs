//! End-to-end: the real `git` asks the real `git-credential-botcreds`, which asks the real
//! `botcreds-agent`, which asks the real `botcreds` broker, which mints tokens at the fake GitHub
//! for a host the fake tailscaled vouches for; the test git server accepts a token only for what
//! the fake GitHub says it covers.
//!
//! The agent connects from 127.0.0.1, which the fake tailscaled maps to the tagged node
//! `bot-host` (`tag:bots`). The git server listens on `127.0.0.1:PORT`: that is the host the
//! agent's `[[github]]` entries name, while the GitHub the broker talks to is the fake GitHub.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use botcreds_proto::agent::{AgentStatus, CredentialSource, CredentialState, CredentialStatus};
use botcreds_tests::agent::{AgentBuilder, AgentHome, AgentProcess, GithubEntry, HttpPath, Output};
use botcreds_tests::broker::BrokerProcess;
use botcreds_tests::fake_github::{FakeGithub, FakeGithubConfig, TokenInfo};
use botcreds_tests::fake_tailscaled::{FakeTailscaled, NodeBuilder};
use botcreds_tests::git_server::GitServer;
use botcreds_tests::world::World as BrokerWorld;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const POLICY: &str = r#"
bots:
  build-bot:
    identity: { tag: "tag:bots" }
    auto_approve:
      - repo: "acme-corp/web"
        permissions: [contents:write]
      - repo: "acme-corp/*"
        permissions: [contents:read]
    deny:
      - repo: "acme-corp/infra"
defaults:
  requires_approval: true
  approval_timeout: 24h
"#;

/// `POLICY` with reading `acme-corp/*` sent to a human instead of allowed.
const APPROVAL_POLICY: &str = r#"
bots:
  build-bot:
    identity: { tag: "tag:bots" }
    auto_approve:
      - repo: "acme-corp/web"
        permissions: [contents:write]
    requires_approval:
      - repo: "acme-corp/*"
        permissions: [contents:read]
defaults:
  requires_approval: true
  approval_timeout: 24h
"#;

/// An admin API key (`[admin] api_key_bots = ["ops"]`).
const OPS_KEY: &str = "bck_agent_e2e_ops_admin_key_0123456789";

/// The rule that denies `acme-corp/infra`, as the broker names it.
const DENY_RULE: &str = "bots.build-bot.deny[0]";
/// The agent's own source address towards the broker.
const AGENT_IP: &str = "127.0.0.1";
const WEB: &str = "acme-corp/web";
/// Readable only (`acme-corp/*` → `contents:read`).
const DOCS: &str = "acme-corp/docs";
const INFRA: &str = "acme-corp/infra";

/// Bounds on waits for the agent's own signals; generous for a loaded 2-core machine. They only
/// turn a hang into a failure, nothing is measured.
const LOG_WAIT: Duration = Duration::from_secs(60);
/// For waits that include a token reaching its refresh or expiry time (at most ~40 s here).
const EXPIRY_WAIT: Duration = Duration::from_secs(240);

/// How a test's world differs from the default one.
struct Setup {
    github: FakeGithubConfig,
    policy: &'static str,
    /// Extra keys for the `acme-corp/web` entry (refresh settings).
    web_entry: &'static str,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            github: github_config(),
            policy: POLICY,
            web_entry: "",
        }
    }
}

/// The default fake GitHub (installation on `acme-corp`: `web`, `infra`; administration,
/// contents and pull_requests write, checks read) plus `docs`, a repository the policy only
/// lets the bot read.
fn github_config() -> FakeGithubConfig {
    let mut config = FakeGithubConfig::default();
    let org = config
        .installations
        .iter_mut()
        .find(|i| i.owner == "acme-corp")
        .expect("the default config has the acme-corp installation");
    org.repositories.push("docs".into());
    config
}

struct World {
    github: FakeGithub,
    _tailscaled: FakeTailscaled,
    broker: Option<BrokerProcess>,
    git: GitServer,
    home: AgentHome,
}

impl World {
    async fn new() -> World {
        World::with(Setup::default()).await
    }

    async fn with(setup: Setup) -> World {
        let BrokerWorld {
            github,
            tailscaled,
            broker,
            ..
        } = BrokerWorld::builder(setup.policy)
            .github(setup.github)
            .node(AGENT_IP, NodeBuilder::new("bot-host").tags(["tag:bots"]))
            .api_key("ops", OPS_KEY)
            .toml("[admin]\napi_key_bots = [\"ops\"]\n")
            .start()
            .await;

        // The git server trusts exactly what the fake GitHub says a token covers.
        let issuer = github.clone();
        let git = GitServer::start(Arc::new(move |token: &str, repo: &str, write: bool| {
            let level = if write { "write" } else { "read" };
            issuer
                .token_info(token)
                .is_some_and(|info| info.allows(repo, "contents", level))
        }))
        .await
        .expect("git server");
        for repo in [WEB, DOCS, INFRA] {
            git.create_repo(repo).expect("create bare repository");
        }

        let host = git.host();
        let home = AgentBuilder::new(&broker.url)
            .github(GithubEntry::new(&host, &[WEB], &["contents:write"]).toml(setup.web_entry))
            .github(GithubEntry::new(
                &host,
                &["acme-corp/*"],
                &["contents:read"],
            ))
            .build();
        World {
            github,
            _tailscaled: tailscaled,
            broker: Some(broker),
            git,
            home,
        }
    }

    /// Stops the broker (SIGTERM, waits for the exit): from now on the agent cannot reach it.
    async fn stop_broker(&mut self) {
        let mut broker = self.broker.take().expect("broker running");
        broker.stop().await;
    }

    async fn clone(&self, repo: &str, into: &str, http_path: HttpPath) -> Output {
        let url = self.git.url(repo);
        self.home
            .git(".", http_path, &["clone", "--quiet", &url, into])
            .await
    }

    /// Commits a new file in the clone `dir` and pushes `main`.
    async fn commit_and_push(&self, dir: &str) -> Output {
        std::fs::write(self.home.work_dir().join(dir).join("change.txt"), dir).unwrap();
        let add = self
            .home
            .git(dir, HttpPath::Sent, &["add", "change.txt"])
            .await;
        assert!(add.success, "{}", add.stderr);
        let commit = self
            .home
            .git(dir, HttpPath::Sent, &["commit", "--quiet", "-m", "change"])
            .await;
        assert!(commit.success, "{}", commit.stderr);
        self.home
            .git(dir, HttpPath::Sent, &["push", "--quiet", "origin", "main"])
            .await
    }

    /// `git-credential-botcreds get` for `repo` (as with `useHttpPath`), or for the host alone.
    async fn helper_get(&self, repo: Option<&str>) -> Output {
        let mut input = format!("protocol=http\nhost={}\n", self.git.host());
        if let Some(repo) = repo {
            input.push_str(&format!("path={repo}.git\n"));
        }
        self.home.helper("get", &input).await
    }

    /// The token the helper hands out (and its `password_expiry_utc`), checked against what
    /// the fake GitHub knows about it.
    async fn token(&self, repo: Option<&str>) -> (String, TokenInfo) {
        let out = self.helper_get(repo).await;
        assert!(out.success, "the helper always exits 0");
        let field = |name: &str| {
            out.stdout
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::to_string)
                .unwrap_or_else(|| {
                    panic!("no {name} in the helper's answer; stderr: {}", out.stderr)
                })
        };
        assert_eq!(field("username="), "x-access-token");
        let token = field("password=");
        let expiry: i64 = field("password_expiry_utc=").parse().expect("unix seconds");
        let info = self
            .github
            .token_info(&token)
            .expect("the fake GitHub issued the token the helper handed out");
        assert_eq!(
            info.expires_at.unix_timestamp(),
            expiry,
            "git is told GitHub's own expiry"
        );
        assert!(
            info.expires_at > OffsetDateTime::now_utc(),
            "an expired token was handed out"
        );
        (token, info)
    }

    fn active_tokens_for(&self, repo: &str) -> Vec<TokenInfo> {
        self.github
            .issued_tokens()
            .into_iter()
            .filter(|t| t.is_active() && t.repositories == [repo])
            .collect()
    }
}

fn credential<'a>(status: &'a AgentStatus, repo: &str) -> &'a CredentialStatus {
    status
        .credentials
        .iter()
        .find(|c| c.repositories == [repo])
        .unwrap_or_else(|| panic!("{repo} is not tracked: {status:#?}"))
}

fn cache_files(home: &AgentHome) -> Vec<String> {
    match std::fs::read_dir(home.cache_dir()) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("reading the cache dir: {e}"),
    }
}

fn assert_no_token_in(text: &str, what: &str) {
    assert!(!text.contains("ghs_"), "a token reached {what}:\n{text}");
}

/// Stops the agent cleanly and checks that it logged no secret.
async fn stop_agent(agent: AgentProcess) -> String {
    let (status, logs) = agent.stop().await;
    assert!(status.success(), "agent exit {status}:\n{logs}");
    assert!(logs.contains("agent stopped"), "{logs}");
    assert_no_token_in(&logs, "the agent's log");
    logs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_an_allowed_repository() {
    let world = World::new().await;
    let agent = world.home.start().await;

    // The plainest setup: no useHttpPath, so the host-level entry (acme-corp/web) answers.
    let out = world.clone(WEB, "web", HttpPath::NotSent).await;
    assert!(out.success, "{}\nagent:\n{}", out.stderr, agent.logs());
    assert!(world.home.work_dir().join("web/README.md").exists());

    let (_, info) = world.token(None).await;
    assert_eq!(info.repositories, [WEB]);
    assert_eq!(
        info.permissions.get("contents").map(String::as_str),
        Some("write")
    );
    assert!(
        !info.allows(WEB, "pull_requests", "read"),
        "nothing beyond what the agent asked for"
    );
    // The token the agent fetched at startup served git: GitHub minted one token.
    assert_eq!(world.github.mint_count(), 1);
    stop_agent(agent).await;
    assert_no_token_in(&world.broker.as_ref().unwrap().logs(), "the broker's log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_with_write_and_is_refused_with_read_only() {
    let world = World::new().await;
    let agent = world.home.start().await;

    let out = world.clone(WEB, "web", HttpPath::Sent).await;
    assert!(out.success, "{}\nagent:\n{}", out.stderr, agent.logs());
    let out = world.commit_and_push("web").await;
    assert!(out.success, "push with contents:write: {}", out.stderr);
    let local = world
        .home
        .git("web", HttpPath::Sent, &["rev-parse", "HEAD"])
        .await;
    assert_eq!(
        world.git.head(WEB, "main").unwrap(),
        local.stdout.trim(),
        "the push reached the server"
    );

    let out = world.clone(DOCS, "docs", HttpPath::Sent).await;
    assert!(out.success, "{}", out.stderr);
    let before = world.git.head(DOCS, "main").unwrap();
    let out = world.commit_and_push("docs").await;
    assert!(!out.success, "pushed with a read-only token");
    assert!(out.stderr.contains("403"), "{}", out.stderr);
    assert_eq!(world.git.head(DOCS, "main").unwrap(), before);
    // A 403 is not a rejected credential: git sends no erase, the read token stays usable.
    let out = world
        .home
        .git("docs", HttpPath::Sent, &["fetch", "--quiet"])
        .await;
    assert!(out.success, "{}", out.stderr);
    assert!(!agent.logs().contains("rejected"), "{}", agent.logs());
    stop_agent(agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_repository_fails_with_the_brokers_reason() {
    let world = World::new().await;
    let agent = world.home.start().await;

    let out = world.clone(INFRA, "infra", HttpPath::Sent).await;
    assert!(!out.success, "cloned a denied repository");
    assert!(
        out.stderr.contains("policy_denied") && out.stderr.contains(DENY_RULE),
        "git shows the broker's reason: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains(INFRA),
        "the reason names the repository: {}",
        out.stderr
    );
    // A definitive refusal: git stops instead of trying other helpers or prompting.
    assert!(out.stderr.contains("told us to quit"), "{}", out.stderr);
    assert!(!world.home.work_dir().join("infra").exists());

    // Straight from the helper: no credential, `quit=1`, the reason on stderr.
    let out = world.helper_get(Some(INFRA)).await;
    assert!(out.success);
    assert!(!out.stdout.contains("password="), "{}", out.stdout);
    assert!(out.stdout.contains("quit=1"), "{}", out.stdout);
    assert!(out.stderr.contains(DENY_RULE), "{}", out.stderr);

    assert!(
        world
            .github
            .issued_tokens()
            .iter()
            .all(|t| !t.repositories.iter().any(|r| r == INFRA)),
        "no token was minted for the denied repository"
    );
    // The denial does not spill over: the allowed repositories still work.
    let out = world.clone(WEB, "web", HttpPath::Sent).await;
    assert!(out.success, "{}", out.stderr);
    stop_agent(agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_awaiting_approval_clones_once_an_admin_approves() {
    let world = World::with(Setup {
        policy: APPROVAL_POLICY,
        ..Setup::default()
    })
    .await;
    let agent = world.home.start().await;

    // Pending: git fails, and says which request an admin has to approve.
    let out = world.clone(DOCS, "docs", HttpPath::Sent).await;
    assert!(!out.success, "cloned before anyone approved");
    assert!(out.stderr.contains("awaiting approval"), "{}", out.stderr);
    let request_id = out
        .stderr
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .find(|w| w.starts_with("apr_"))
        .unwrap_or_else(|| panic!("no request id in git's stderr: {}", out.stderr))
        .to_string();
    assert!(
        out.stderr
            .contains(&format!("botcreds approve {request_id}")),
        "{}",
        out.stderr
    );
    // Not a definitive refusal: git may ask again later.
    assert!(!out.stderr.contains("told us to quit"), "{}", out.stderr);
    assert!(
        world.active_tokens_for(DOCS).is_empty(),
        "minted before approval"
    );

    // Asking again joins the same request instead of opening another.
    let again = world.helper_get(Some(DOCS)).await;
    assert!(again.stderr.contains(&request_id), "{}", again.stderr);

    let broker = world.broker.as_ref().expect("broker running");
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/v1/admin/approvals/{request_id}/approve",
            broker.url
        ))
        .bearer_auth(OPS_KEY)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        200,
        "{}",
        resp.text().await.unwrap()
    );

    // Approved: the grant lets the agent's next request through at once.
    let out = world.clone(DOCS, "docs", HttpPath::Sent).await;
    assert!(out.success, "{}", out.stderr);
    assert_eq!(world.active_tokens_for(DOCS).len(), 1);
    stop_agent(agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_repository_tokens_with_use_http_path() {
    let world = World::new().await;
    let agent = world.home.start().await;

    for (repo, dir) in [(WEB, "web"), (DOCS, "docs")] {
        let out = world.clone(repo, dir, HttpPath::Sent).await;
        assert!(
            out.success,
            "{repo}: {}\nagent:\n{}",
            out.stderr,
            agent.logs()
        );
    }
    let (web_token, web) = world.token(Some(WEB)).await;
    let (docs_token, docs) = world.token(Some(DOCS)).await;
    assert_ne!(web_token, docs_token, "one token per repository");
    assert_eq!(web.repositories, [WEB]);
    assert_eq!(docs.repositories, [DOCS]);
    assert!(web.allows(WEB, "contents", "write"));
    assert!(!web.allows(DOCS, "contents", "read"));
    assert!(docs.allows(DOCS, "contents", "read"));
    assert!(!docs.allows(DOCS, "contents", "write"));
    assert!(!docs.allows(WEB, "contents", "read"));

    // Without a path the host-level entry answers: acme-corp/web's token.
    let (host_token, _) = world.token(None).await;
    assert_eq!(host_token, web_token);
    // Each repository's token was minted once; every later request came from the agent.
    assert_eq!(world.github.mint_count(), 2);

    let (status, _) = world.home.status().await;
    assert_eq!(credential(&status, WEB).source, CredentialSource::Config);
    assert_eq!(credential(&status, DOCS).source, CredentialSource::Path);
    assert_eq!(
        credential(&status, DOCS).permissions,
        ["contents:read".to_string()]
    );
    stop_agent(agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_from_the_cache_while_the_broker_is_down_also_after_a_restart() {
    let mut world = World::new().await;
    let agent = world.home.start().await;
    let out = world.clone(WEB, "web", HttpPath::Sent).await;
    assert!(out.success, "{}\nagent:\n{}", out.stderr, agent.logs());
    let (token, _) = world.token(Some(WEB)).await;

    world.stop_broker().await;
    let out = world.clone(WEB, "web-outage", HttpPath::Sent).await;
    assert!(
        out.success,
        "clone with the broker down: {}\nagent:\n{}",
        out.stderr,
        agent.logs()
    );
    let out = world
        .home
        .git("web", HttpPath::Sent, &["fetch", "--quiet"])
        .await;
    assert!(out.success, "fetch with the broker down: {}", out.stderr);
    // Nothing cached for this one: a clear failure, not a hang.
    let out = world.clone(DOCS, "docs", HttpPath::Sent).await;
    assert!(!out.success);
    assert!(out.stderr.contains("broker unreachable"), "{}", out.stderr);

    // The agent restarts during the outage: the disk cache carries the token across.
    let logs = stop_agent(agent).await;
    assert!(!logs.contains("loaded cached credential"), "{logs}");
    let agent = world.home.start().await;
    assert!(
        agent.logs().contains("loaded cached credential"),
        "{}",
        agent.logs()
    );
    let out = world.clone(WEB, "web-restarted", HttpPath::Sent).await;
    assert!(
        out.success,
        "clone after the agent restarted, broker down: {}\nagent:\n{}",
        out.stderr,
        agent.logs()
    );
    let out = world
        .home
        .git("web-restarted", HttpPath::Sent, &["fetch", "--quiet"])
        .await;
    assert!(out.success, "{}", out.stderr);
    let (after, _) = world.token(Some(WEB)).await;
    assert_eq!(after, token, "the cached token, not a new one");
    assert_eq!(world.github.mint_count(), 1);
    stop_agent(agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_upstream_fails_once_then_is_replaced() {
    let world = World::new().await;
    let mut agent = world.home.start().await;
    let out = world.clone(WEB, "web", HttpPath::Sent).await;
    assert!(out.success, "{}\nagent:\n{}", out.stderr, agent.logs());
    let (first, _) = world.token(Some(WEB)).await;
    let minted = world.github.mint_count();

    world.github.revoke_all();
    let out = world
        .home
        .git("web", HttpPath::Sent, &["fetch", "--quiet"])
        .await;
    assert!(!out.success, "the revoked token still worked");
    assert!(
        out.stderr.contains("Authentication failed"),
        "{}",
        out.stderr
    );
    // git answered the 401 with `erase`: the agent dropped the token.
    assert!(
        agent
            .wait_for_log("git reported the credential as rejected", LOG_WAIT)
            .await,
        "{}",
        agent.logs()
    );

    let out = world
        .home
        .git("web", HttpPath::Sent, &["fetch", "--quiet"])
        .await;
    assert!(
        out.success,
        "the next attempt gets a fresh token: {}\nagent:\n{}",
        out.stderr,
        agent.logs()
    );
    let (second, info) = world.token(Some(WEB)).await;
    assert_ne!(second, first);
    assert!(info.is_active());
    assert!(
        world.github.token_info(&first).unwrap().revoked,
        "the first one stays dead"
    );
    // The broker still held the revoked token for reuse; it minted anew only because the
    // agent named the rejected credential (`replaces`). Exactly one new token.
    assert_eq!(world.github.mint_count(), minted + 1);
    assert_eq!(world.active_tokens_for(WEB).len(), 1);
    stop_agent(agent).await;
}

/// GitHub hands out 90 s tokens; the agent refreshes a minute before expiry (`refresh_before`),
/// and counts less than a minute left as expired.
fn short_lived_setup() -> Setup {
    let mut github = github_config();
    github.token_lifetime = Duration::from_secs(90);
    Setup {
        github,
        web_entry: "refresh_before = \"1m\"",
        ..Setup::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_agent_never_hands_out_an_expired_token() {
    let mut world = World::with(short_lived_setup()).await;
    let mut agent = world.home.start().await;
    let out = world.clone(WEB, "web", HttpPath::Sent).await;
    assert!(out.success, "{}\nagent:\n{}", out.stderr, agent.logs());
    // `token` checks that what git gets is GitHub's live token with its real expiry.
    world.token(Some(WEB)).await;

    world.stop_broker().await;
    // The agent's own signal that the last token it held reached its expiry margin.
    assert!(
        agent
            .wait_for_log(
                "credential expired without a refresh; dropped it",
                EXPIRY_WAIT
            )
            .await,
        "{}",
        agent.logs()
    );
    let out = world.helper_get(Some(WEB)).await;
    assert!(out.success);
    assert!(
        !out.stdout.contains("password="),
        "handed out an expired token: {}",
        out.stdout
    );
    assert!(out.stderr.contains("broker unreachable"), "{}", out.stderr);
    let out = world.clone(WEB, "web-late", HttpPath::Sent).await;
    assert!(!out.success);
    assert!(out.stderr.contains("broker unreachable"), "{}", out.stderr);

    let (status, _) = world.home.status().await;
    let web = credential(&status, WEB);
    assert_eq!(web.state, CredentialState::Missing, "{web:#?}");
    assert_eq!(web.credential_id, None);
    assert_eq!(web.expires_at, None);
    assert!(
        cache_files(&world.home).is_empty(),
        "the expired token left the disk too"
    );
    stop_agent(agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_cached_token_is_not_served_after_a_restart() {
    let mut world = World::with(short_lived_setup()).await;
    let mut agent = world.home.start().await;
    // Right after the startup fetch the token has ~90 s left and is not due for ~25 s: the
    // outage starts while the agent holds it, before any refresh.
    assert!(
        agent.wait_for_log("credential fetched", LOG_WAIT).await,
        "{}",
        agent.logs()
    );
    world.stop_broker().await;
    let (status, _) = world.home.status().await;
    let expires_at = credential(&status, WEB)
        .expires_at
        .clone()
        .expect("the agent holds a servable token");
    let expires_at = OffsetDateTime::parse(&expires_at, &Rfc3339).unwrap();
    // Served while it has more than a minute left, broker or not.
    let (_, info) = world.token(Some(WEB)).await;
    assert_eq!(info.expires_at, expires_at);
    stop_agent(agent).await;
    assert_eq!(cache_files(&world.home).len(), 1, "the token is on disk");

    // The agent is down while the token's last minute begins. Nothing signals the passing of
    // wall-clock time, so wait for it.
    let unservable_from =
        SystemTime::from(expires_at) - Duration::from_secs(60) + Duration::from_secs(2);
    if let Ok(left) = unservable_from.duration_since(SystemTime::now()) {
        tokio::time::sleep(left).await;
    }

    let agent = world.home.start().await;
    assert!(
        !agent.logs().contains("loaded cached credential"),
        "{}",
        agent.logs()
    );
    let out = world.helper_get(Some(WEB)).await;
    assert!(
        !out.stdout.contains("password="),
        "handed out an expired cached token: {}",
        out.stdout
    );
    assert!(out.stderr.contains("broker unreachable"), "{}", out.stderr);
    let (status, _) = world.home.status().await;
    assert_eq!(credential(&status, WEB).state, CredentialState::Missing);
    assert!(
        cache_files(&world.home).is_empty(),
        "the expired cache file was deleted at startup"
    );
    stop_agent(agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_reachability_and_serving_from_cache_during_an_outage() {
    // 340 s tokens, refreshed when less than 5 minutes remain: due 10-40 s after each fetch,
    // and servable for ~4 more minutes after that.
    let mut github = github_config();
    github.token_lifetime = Duration::from_secs(340);
    let mut world = World::with(Setup {
        github,
        web_entry: "refresh_before = \"5m\"",
        ..Setup::default()
    })
    .await;
    let mut agent = world.home.start().await;
    let out = world.clone(WEB, "web", HttpPath::Sent).await;
    assert!(out.success, "{}\nagent:\n{}", out.stderr, agent.logs());

    let (status, raw) = world.home.status().await;
    assert_no_token_in(&raw, "the status output");
    assert!(status.broker_reachable, "{status:#?}");
    assert_eq!(status.auth, "tailnet");
    assert!(!status.serving_from_cache, "{status:#?}");
    assert!(status.broker_last_contact.is_some());
    let web = credential(&status, WEB);
    assert!(
        matches!(
            web.state,
            CredentialState::Fresh | CredentialState::Refreshing
        ),
        "{web:#?}"
    );
    assert!(web.credential_id.is_some() && web.expires_at.is_some());
    assert_eq!(web.permissions, ["contents:write".to_string()]);
    assert_eq!(web.failures, 0);

    world.stop_broker().await;
    assert!(
        agent
            .wait_for_log(
                "refresh failed; serving the cached credential until it expires",
                EXPIRY_WAIT
            )
            .await,
        "{}",
        agent.logs()
    );
    let (status, raw) = world.home.status().await;
    assert_no_token_in(&raw, "the status output");
    assert!(!status.broker_reachable, "{status:#?}");
    assert!(status.broker_probe_error.is_some());
    assert!(status.serving_from_cache, "{status:#?}");
    let web = credential(&status, WEB);
    assert_eq!(web.state, CredentialState::ServingFromCache, "{web:#?}");
    assert!(web.credential_id.is_some() && web.expires_at.is_some());
    assert!(web.failures >= 1);
    assert!(
        web.last_error
            .as_deref()
            .is_some_and(|e| e.contains("broker unreachable")),
        "{web:#?}"
    );
    assert!(web.next_refresh.is_some(), "it keeps retrying");

    // What status says is what git gets: the cached token still works.
    let out = world.clone(WEB, "web-outage", HttpPath::Sent).await;
    assert!(out.success, "{}", out.stderr);

    let table = world.home.status_command(&[]).await;
    assert!(table.success, "{}", table.stderr);
    for needle in ["UNREACHABLE", "YES", "serving_from_cache", WEB] {
        assert!(table.stdout.contains(needle), "{needle}:\n{}", table.stdout);
    }
    assert_no_token_in(&table.stdout, "the status table");
    stop_agent(agent).await;
}

/// SO_PEERCRED end to end: a user outside the allow-list reaches the socket (its mode opened up
/// here, as group membership would) and is refused before anything reaches the broker. Needs
/// root to run the helper as another uid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uid_outside_the_allow_list_is_refused() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let world = World::new().await;
    // The owner of a directory we just made is our effective uid. Never skipped: a skipped
    // check would report ok for what was not checked.
    let euid = std::fs::metadata(world.home.dir()).unwrap().uid();
    assert_eq!(
        euid, 0,
        "this test needs root (it runs the helper as another uid) and runs as uid {euid}: run \
         the end-to-end suites as root"
    );
    let agent = world.home.start().await;
    for dir in [world.home.dir().to_path_buf(), world.home.dir().join("run")] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(world.home.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let input = format!(
        "protocol=http\nhost={}\npath={DOCS}.git\n",
        world.git.host()
    );
    let mut child =
        tokio::process::Command::new(botcreds_tests::broker::binary("git-credential-botcreds"))
            .arg("get")
            .env("BOTCREDS_AGENT_SOCKET", world.home.socket())
            .uid(65534)
            .gid(65534)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input.as_bytes()).await.unwrap();
    }
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success(), "the helper never fails git");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("uid 65534") && err.contains("may not use this agent"),
        "{err}"
    );
    assert!(
        world.active_tokens_for(DOCS).is_empty(),
        "nothing reached the broker"
    );
    stop_agent(agent).await;
}
