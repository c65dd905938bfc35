//! Policy engine benchmarks: `decide()` (bot lookup included) and `Policy::parse` on a policy of
//! 10,000 bots with 10 rules each. Run with `cargo bench -p botcreds-policy --bench policy`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark setup: a failure ends the run"
)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::LazyLock;

use botcreds_policy::{Caller, CallerVia, Outcome, Policy, Request, TailnetIdentity};
use botcreds_proto::{Permission, RepoName};
use divan::{Bencher, black_box};

const BOTS: usize = 10_000;
/// A hostname bot in the middle of the file (index % 3 == 0 is a hostname identity).
const MIDDLE: usize = 5_001;
/// The generated file is ~7.5 MB; give it room whatever the default limit.
const LIMIT: usize = 64 * 1024 * 1024;

fn main() {
    divan::main();
}

/// Ten rules per bot, mixing literal names, globs and several permissions, with identities
/// rotating through hostname, tag and API key.
fn policy_yaml() -> String {
    let mut y = String::with_capacity(BOTS * 800);
    y.push_str("bots:\n");
    for i in 0..BOTS {
        let org = format!("org{}", i % 50);
        let identity = match i % 3 {
            0 => format!("{{ type: tailnet, hostname: bot-{i} }}"),
            1 => format!("{{ tag: \"tag:bot-{i}\" }}"),
            _ => "{ type: api_key }".to_string(),
        };
        let _ = write!(
            y,
            r#"  bot-{i}:
    identity: {identity}
    deny:
      - repo: "{org}/infra-*"
      - repo: "*/secrets"
        permissions: [contents:write]
    auto_approve:
      - repo: "{org}/svc-{i}-*"
        permissions: [contents:write, issues:write, pull_requests:write]
      - repo: "{org}/lib-{i}"
        permissions: [contents:read, metadata:read]
      - repo: "{org}/docs-*"
        permissions: [contents:write, pages:write]
      - repo: "{org}/tools-{i}"
        permissions: [contents:write, actions:write, checks:write]
      - litellm_scope: "agent:*"
    requires_approval:
      - permissions: [admin]
      - repo: "{org}/sensitive-*"
      - repo: "*/prod-*"
        permissions: [deployments:write, environments:write]
"#
        );
    }
    y.push_str("defaults:\n  requires_approval: true\n  approval_timeout: 24h\n");
    y
}

struct Fixture {
    yaml: String,
    policy: Policy,
    caller: Caller,
    allow: (Vec<RepoName>, Vec<Permission>),
    deny: (Vec<RepoName>, Vec<Permission>),
    approval: (Vec<RepoName>, Vec<Permission>),
}

fn request(repos: &[&str], perms: &[&str]) -> (Vec<RepoName>, Vec<Permission>) {
    (
        repos.iter().map(|r| r.parse().unwrap()).collect(),
        perms.iter().map(|p| p.parse().unwrap()).collect(),
    )
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let yaml = policy_yaml();
    let policy = Policy::parse_with_limit("bench.yaml", &yaml, LIMIT).unwrap();
    let org = format!("org{}", MIDDLE % 50);
    let caller = Caller {
        address: "100.64.0.9:40000".parse().unwrap(),
        via: CallerVia::Tailnet(TailnetIdentity {
            stable_id: "nBENCH".into(),
            node_name: format!("bot-{MIDDLE}.tail3f9c2.ts.net"),
            computed_name: format!("bot-{MIDDLE}"),
            tags: vec![],
            login: "alice@example.com".into(),
            capabilities: BTreeMap::new(),
            ..Default::default()
        }),
    };
    let fixture = Fixture {
        allow: request(
            &[
                &format!("{org}/svc-{MIDDLE}-api"),
                &format!("{org}/svc-{MIDDLE}-web"),
            ],
            &["contents:write", "issues:read"],
        ),
        deny: request(&[&format!("{org}/infra-core")], &["contents:read"]),
        approval: request(&[&format!("{org}/sensitive-db")], &["contents:read"]),
        yaml,
        policy,
        caller,
    };
    // The benchmarks below must exercise the paths their names promise.
    for ((repos, perms), want) in [
        (&fixture.allow, Outcome::Allow),
        (&fixture.deny, Outcome::Deny),
        (&fixture.approval, Outcome::RequireApproval),
    ] {
        let d = fixture.policy.decide(
            &fixture.caller,
            &Request::Github {
                repositories: repos,
                permissions: perms,
            },
        );
        assert_eq!(d.outcome, want, "{}", d.explanation);
        assert_ne!(d.rule, "defaults", "{}", d.explanation);
    }
    fixture
});

fn bench_decide(bencher: Bencher, which: fn(&Fixture) -> &(Vec<RepoName>, Vec<Permission>)) {
    let f = &*FIXTURE;
    let (repos, perms) = which(f);
    let request = Request::Github {
        repositories: repos,
        permissions: perms,
    };
    bencher.bench(|| f.policy.decide(black_box(&f.caller), black_box(&request)));
}

#[divan::bench]
fn decide_allow(bencher: Bencher) {
    bench_decide(bencher, |f| &f.allow);
}

#[divan::bench]
fn decide_deny(bencher: Bencher) {
    bench_decide(bencher, |f| &f.deny);
}

#[divan::bench]
fn decide_require_approval(bencher: Bencher) {
    bench_decide(bencher, |f| &f.approval);
}

#[divan::bench]
fn decide_litellm(bencher: Bencher) {
    let f = &*FIXTURE;
    let request = Request::Litellm {
        scope: "agent:write",
    };
    bencher.bench(|| f.policy.decide(black_box(&f.caller), black_box(&request)));
}

#[divan::bench]
fn bot_for_hostname(bencher: Bencher) {
    let f = &*FIXTURE;
    bencher.bench(|| f.policy.bot_for(black_box(&f.caller)).is_some());
}

/// Parsing the whole ~7 MiB file takes a while; a few samples are enough.
#[divan::bench(sample_count = 5, sample_size = 1)]
fn parse_10k_bots(bencher: Bencher) {
    let f = &*FIXTURE;
    bencher
        .counter(divan::counter::BytesCount::new(f.yaml.len()))
        .bench(|| Policy::parse_with_limit("bench.yaml", black_box(&f.yaml), LIMIT).is_ok());
}
