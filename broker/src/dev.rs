//! `botcreds serve --dev`: a development broker that needs nothing installed. Loopback only,
//! a temporary data dir, a demo policy, a fresh demo API key, and a simulated GitHub whose
//! tokens are not valid on github.com, and a simulated LiteLLM whose virtual keys are not valid
//! at any proxy.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use crate::clock::{SharedClock, SystemClock};
use crate::config::{AdminConfig, ApiKeyConfig, Config, LogFormat};
use crate::identity::api_key::generate_key;
use crate::providers::github::SimulatedGithub;
use crate::server::{Edges, ServeError};

/// The demo policy: one API-key bot with the seed's three kinds of rules.
pub const DEMO_POLICY: &str = r#"# botcreds development policy (see docs/policy.md)
bots:
  demo-bot:
    identity: { type: api_key }
    auto_approve:
      - repo: "demo-org/app"
        permissions: [contents:write, issues:write, pull_requests:write]
      - repo: "demo-org/*"
        permissions: [contents:read, issues:read]
      - litellm_scope: "agent:review"
    requires_approval:
      - permissions: [admin]
      - repo: "demo-org/sensitive-*"
    deny:
      - repo: "demo-org/infrastructure"
defaults:
  requires_approval: true
  approval_timeout: 24h
"#;

/// The dev broker's admin (an API-key bot named in `[admin] api_key_bots`).
pub const DEV_ADMIN: &str = "dev-admin";

/// A dev broker's setup: its config, the demo bot's key and the admin key (shown once), and
/// the temporary directory that holds its data (deleted when this is dropped).
pub struct DevSetup {
    pub config: Config,
    pub api_key: String,
    /// The key of `dev-admin`, an admin (`[admin] api_key_bots`) so that the admin CLI and the
    /// approval flow can be tried; it is not a policy bot and gets no credentials.
    pub admin_key: String,
    pub dir: tempfile::TempDir,
}

/// Prepare a development broker listening on `listen` (which must be loopback).
pub fn setup(listen: SocketAddr) -> Result<DevSetup, ServeError> {
    if !listen.ip().is_loopback() {
        return Err(ServeError::Config(format!(
            "--dev listens on loopback only; {listen} is not a loopback address"
        )));
    }
    let dir = tempfile::Builder::new()
        .prefix("botcreds-dev-")
        .tempdir()
        .map_err(ServeError::Io)?;
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, DEMO_POLICY)?;
    let api_key = generate_key();
    let admin_key = generate_key();
    let hash = |key: &str| {
        let mut sha = [0u8; 32];
        sha.copy_from_slice(&<sha2::Sha256 as sha2::Digest>::digest(key.as_bytes()));
        sha
    };
    let config = Config {
        listen: vec![listen],
        data_dir: dir.path().join("data"),
        policy,
        tailscale: None,
        github: None,
        api_keys: vec![
            ApiKeyConfig {
                bot: "demo-bot".into(),
                key_sha256: hash(&api_key),
            },
            ApiKeyConfig {
                bot: DEV_ADMIN.into(),
                key_sha256: hash(&admin_key),
            },
        ],
        admin: AdminConfig {
            api_key_bots: vec![DEV_ADMIN.into()],
            ..Default::default()
        },
        limits: Default::default(),
        approvals: Default::default(),
        log_format: LogFormat::Text,
        log_level: None,
        notify: Default::default(),
        web: Default::default(),
        tls: None,
        litellm: None,
        coder: None,
    };
    Ok(DevSetup {
        config,
        api_key,
        admin_key,
        dir,
    })
}

/// The edges of a dev broker: the simulated GitHub, no tailscaled.
pub fn edges() -> Edges {
    let clock: SharedClock = Arc::new(SystemClock);
    Edges {
        github: Arc::new(SimulatedGithub::new(clock.clone())),
        whois: None,
        litellm: Some(Arc::new(crate::providers::litellm::SimulatedLitellm::new(
            clock.clone(),
        ))),
        clock,
    }
}

/// What `--dev` prints once it is listening.
pub fn banner(addr: SocketAddr, api_key: &str, admin_key: &str, dir: &Path) -> String {
    let data = dir.join("data");
    let policy = dir.join("policy.yaml");
    let body = r#"{"kind":"github_token","repositories":["demo-org/app"],"permissions":["contents:write"],"reason":"trying botcreds"}"#;
    [
        String::new(),
        "==> botcreds development broker".to_string(),
        "    WARNING: GitHub is SIMULATED. Tokens from this broker are NOT valid on github.com.".to_string(),
        "    WARNING: LiteLLM is SIMULATED. Virtual keys from this broker are NOT valid at any LiteLLM proxy.".to_string(),
        "    LiteLLM key:  {\"kind\":\"litellm_key\",\"scope\":\"agent:review\"}".to_string(),
        format!("    Listening on: http://{addr}   (loopback only)"),
        format!("    Data dir:     {} (deleted on exit)", data.display()),
        format!("    Policy:       {}", policy.display()),
        "    Demo bot:     demo-bot".to_string(),
        format!("    API key:      {api_key}"),
        format!("    Admin key:    {admin_key}   (bot {DEV_ADMIN}, an admin; no credentials)"),
        String::new(),
        "    Try it:".to_string(),
        format!("      curl -s http://{addr}/v1/credentials \\"),
        format!("        -H 'Authorization: Bearer {api_key}' -H 'Content-Type: application/json' \\"),
        format!("        -d '{body}'"),
        String::new(),
        "    Denied by policy:   \"repositories\":[\"demo-org/infrastructure\"]".to_string(),
        "    Needs approval:     \"repositories\":[\"demo-org/sensitive-data\"] with contents:write".to_string(),
        "    Approve it as the admin (pending, approve, deny, log, revoke, grants list, ...):".to_string(),
        format!("      export BOTCREDS_BROKER=http://{addr} BOTCREDS_API_KEY={admin_key}"),
        "      botcreds pending && botcreds approve apr_...".to_string(),
        format!(
            "    Explain a decision: botcreds policy explain --policy {} --bot demo-bot --repo demo-org/app --permissions contents:write",
            policy.display()
        ),
        String::new(),
    ]
    .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Outcome, Policy, Request};

    fn decide(repo: &str, perm: &str) -> Outcome {
        let policy = Policy::parse("demo", DEMO_POLICY).unwrap();
        let repos = [repo.parse().unwrap()];
        let perms = [perm.parse().unwrap()];
        policy
            .decide_for_bot(
                Some("demo-bot"),
                &Request::Github {
                    repositories: &repos,
                    permissions: &perms,
                },
            )
            .outcome
    }

    /// The banner shows a LiteLLM key request; the demo policy must allow it.
    #[test]
    fn demo_policy_allows_a_litellm_scope() {
        let policy = Policy::parse("demo", DEMO_POLICY).unwrap();
        let d = policy.decide_for_bot(
            Some("demo-bot"),
            &Request::Litellm {
                scope: "agent:review",
            },
        );
        assert_eq!(d.outcome, Outcome::Allow);
    }

    /// The banner promises these three outcomes; the demo policy must keep them.
    #[test]
    fn demo_policy_shows_allow_deny_and_approval() {
        assert_eq!(decide("demo-org/app", "contents:write"), Outcome::Allow);
        assert_eq!(
            decide("demo-org/infrastructure", "contents:read"),
            Outcome::Deny
        );
        assert_eq!(
            decide("demo-org/sensitive-data", "contents:write"),
            Outcome::RequireApproval
        );
    }

    #[test]
    fn dev_listens_on_loopback_only() {
        assert!(setup("0.0.0.0:0".parse().unwrap()).is_err());
        let s = setup("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(s.api_key.starts_with("bck_"));
        assert!(s.config.policy.exists());
    }
}
