//! The worlds of the suites that are split between the real binary and the in-process API
//! tests (`tests/tests/api/`): each scene's policy, its callers' addresses and keys, and its
//! [`WorldBuilder`], so both halves of a suite start from the same world.

/// `broker_e2e` and `api::credentials`: the GitHub token flow from tailnet identity and API keys.
pub mod broker {
    use serde_json::{Value, json};

    use crate::fake_tailscaled::NodeBuilder;
    use crate::world::{World, WorldBuilder};

    pub const POLICY: &str = r#"
bots:
  ci-bot:
    identity: { tag: "tag:ci" }
    auto_approve:
      - repo: "acme-corp/web"
        permissions: [contents:write, pull_requests:write]
      - repo: "acme-corp/*"
        permissions: [contents:read]
      - repo: "acme-corp/web"
        permissions: [issues:write]
      - repo: "ghost-org/*"
        permissions: [contents:read]
    requires_approval:
      - permissions: [admin]
    deny:
      - repo: "acme-corp/infra"
  laptop-bot:
    identity: { type: tailnet, hostname: alice-laptop }
    auto_approve:
      - repo: "acme-corp/web"
        permissions: [contents:read]
  script-bot:
    identity: { type: api_key }
    auto_approve:
      - repo: "acme-corp/web"
        permissions: [contents:read]
defaults:
  requires_approval: true
  approval_timeout: 24h
"#;

    pub const CI: &str = "127.0.0.2";
    pub const LAPTOP: &str = "127.0.0.3";
    pub const STRANGER: &str = "127.0.0.4";
    pub const NOT_ON_TAILNET: &str = "127.0.0.5";
    pub const SCRIPT_KEY: &str = "bck_e2eScriptKey0123456789abcdefghij";

    /// ci-bot (`tag:ci`), alice's laptop, bob's node; script-bot's API key.
    pub fn setup() -> WorldBuilder {
        World::builder(POLICY)
            .node(CI, NodeBuilder::new("ci-bot-07").tags(["tag:ci"]))
            .node(
                LAPTOP,
                NodeBuilder::new("alice-laptop").login("alice@example.com"),
            )
            .node(
                STRANGER,
                NodeBuilder::new("stranger").login("bob@example.com"),
            )
            .api_key("script-bot", SCRIPT_KEY)
    }

    pub fn token_request(repos: &[&str], perms: &[&str]) -> Value {
        json!({"kind": "github_token", "repositories": repos, "permissions": perms, "reason": "e2e"})
    }
}
