//! Negative security tests of approvals and grants through the real `botcreds` binary: a deny
//! added after an approval (what the reload ends: tokens, LiteLLM keys, grants, pending
//! requests; and requests in flight across it), self-approval on every decision path,
//! replacement flooding, and concurrent identical requests. Each refusal is a table row: what is tried, the stable code
//! it must be refused with, and the audit events it may add — pending requests, grants,
//! remembered rules and GitHub's mint count must not change.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::process::Stdio;
use std::time::Duration;

use botcreds_proto::approval::{
    ApprovalList, ApprovalRequestView, AuditList, GrantList, GrantView, PolicyView,
};
use botcreds_proto::audit::AuditEventKind;
use botcreds_proto::{ErrorCode, GithubCredential};
use botcreds_tests::broker::binary;
use botcreds_tests::fake_tailscaled::NodeBuilder;
use botcreds_tests::world::{World, code_of, ip};
use serde_json::{Value, json};

const POLICY: &str = r#"
bots:
  ci-bot:
    identity: { tag: "tag:ci" }
    auto_approve:
      - repo: "acme-corp/web"
        permissions: [contents:read]
    requires_approval:
      - repo: "acme-corp/*"
        permissions: [contents:write]
  ops:
    identity: { type: api_key }
    requires_approval:
      - repo: "acme-corp/*"
        permissions: [contents:write]
  ops-node:
    identity: { tag: "tag:ops" }
    requires_approval:
      - repo: "acme-corp/*"
        permissions: [contents:write]
defaults:
  requires_approval: true
  approval_timeout: 24h
"#;

/// [`POLICY`] with a deny for ci-bot on acme-corp/api and acme-corp/infra, added after
/// approvals of them.
const POLICY_WITH_DENY: &str = r#"
bots:
  ci-bot:
    identity: { tag: "tag:ci" }
    deny:
      - repo: "acme-corp/api"
      - repo: "acme-corp/infra"
    auto_approve:
      - repo: "acme-corp/web"
        permissions: [contents:read]
    requires_approval:
      - repo: "acme-corp/*"
        permissions: [contents:write]
  ops:
    identity: { type: api_key }
    requires_approval:
      - repo: "acme-corp/*"
        permissions: [contents:write]
  ops-node:
    identity: { tag: "tag:ops" }
    requires_approval:
      - repo: "acme-corp/*"
        permissions: [contents:write]
defaults:
  requires_approval: true
  approval_timeout: 24h
"#;

/// Alice's machine: a tailnet admin who is no bot.
const ADMIN: &str = "127.0.0.1";
const CI: &str = "127.0.0.2";
/// A tagged node that is an admin (`[admin] tags`) and the policy bot `ops-node` at once.
const OPS_NODE: &str = "127.0.0.5";
/// `ops` is an admin (`[admin] api_key_bots`) and a policy bot at once.
const OPS_KEY: &str = "bck_secOpsAdminKey0123456789abcdefghi";

async fn world() -> World {
    World::builder(POLICY)
        .node(ADMIN, NodeBuilder::new("alice-desk").login("alice@example.com"))
        .node(CI, NodeBuilder::new("ci-bot-07").tags(["tag:ci"]))
        .node(OPS_NODE, NodeBuilder::new("ops-box").tags(["tag:ops"]))
        .api_key("ops", OPS_KEY)
        .toml(
            "[admin]\nusers = [\"alice@example.com\"]\ntags = [\"tag:ops\"]\napi_key_bots = [\"ops\"]\n",
        )
        .toml("[limits]\nreplace_burst = 2\nreplace_interval = \"10m\"\n")
        .start()
        .await
}

/// review-bot and the `ops` admin by API key, LiteLLM keys, no tailnet identity.
async fn litellm_world() -> World {
    World::builder(LITELLM_POLICY)
        .no_tailscaled()
        .api_key("review-bot", REVIEW_KEY)
        .api_key("ops", OPS_KEY)
        .litellm("")
        .toml("[admin]\napi_key_bots = [\"ops\"]\n")
        .start()
        .await
}

/// Who sends a request: a tailnet node by its address, or the `ops` API key.
#[derive(Clone, Copy)]
enum As {
    Node(&'static str),
    Ops,
}

async fn send(w: &World, who: As, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let from = match who {
        As::Node(a) => a,
        As::Ops => ADMIN,
    };
    let client = w.broker.client_from(ip(from));
    let url = format!("{}{path}", w.broker.url);
    let mut req = match method {
        "GET" => client.get(url),
        _ => client.post(url),
    };
    if let As::Ops = who {
        req = req.bearer_auth(OPS_KEY);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn write_request(repo: &str) -> Value {
    json!({"kind": "github_token", "repositories": [repo], "permissions": ["contents:write"]})
}

fn read_request(repo: &str) -> Value {
    json!({"kind": "github_token", "repositories": [repo], "permissions": ["contents:read"]})
}

fn credential(status: u16, body: Value) -> GithubCredential {
    assert_eq!(status, 200, "{body}");
    serde_json::from_value(body).expect("a credential")
}

fn pending_view(status: u16, body: Value) -> ApprovalRequestView {
    assert_eq!(status, 202, "{body}");
    serde_json::from_value(body).expect("an approval request")
}

/// What a refusal must leave as it was.
#[derive(Debug, PartialEq)]
struct Stored {
    pending: Vec<String>,
    grants: Vec<GrantView>,
    remembered: usize,
    mints: u64,
}

async fn stored(w: &World) -> (Stored, usize) {
    let alice = As::Node(ADMIN);
    let (s, pending) = send(w, alice, "GET", "/v1/admin/approvals", None).await;
    assert_eq!(s, 200, "{pending}");
    let pending: ApprovalList = serde_json::from_value(pending).unwrap();
    let (s, grants) = send(w, alice, "GET", "/v1/admin/grants?all=true", None).await;
    assert_eq!(s, 200, "{grants}");
    let grants: GrantList = serde_json::from_value(grants).unwrap();
    let (s, policy) = send(w, alice, "GET", "/v1/admin/policy", None).await;
    assert_eq!(s, 200, "{policy}");
    let policy: PolicyView = serde_json::from_value(policy).unwrap();
    let audit = audit(w).await;
    (
        Stored {
            pending: pending.requests.into_iter().map(|r| r.request_id).collect(),
            grants: grants.grants,
            remembered: policy.remembered.len(),
            mints: w.github.mint_count(),
        },
        audit.len(),
    )
}

async fn audit(w: &World) -> Vec<botcreds_proto::audit::AuditEvent> {
    let (s, log) = send(
        w,
        As::Node(ADMIN),
        "GET",
        "/v1/admin/audit?limit=10000",
        None,
    )
    .await;
    assert_eq!(s, 200, "{log}");
    serde_json::from_value::<AuditList>(log).unwrap().events
}

/// `botcreds ARGS` as the `ops` admin (its API key): the exit code and stderr.
async fn cli_as_ops(w: &World, args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(binary("botcreds"))
        .args(args)
        .env("BOTCREDS_BROKER", &w.broker.url)
        .env("BOTCREDS_API_KEY", OPS_KEY)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("running botcreds");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Approve + remember on the web page as the node at `from`: the detail page's form token,
/// then the form POST from the broker's own origin. Status and the page.
async fn web_approve(w: &World, from: &str, id: &str) -> (u16, String) {
    let client = reqwest::Client::builder()
        .local_address(ip(from))
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let resp = client
        .get(format!("{}/approvals/{id}", w.broker.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let html = resp.text().await.unwrap();
    let start = html.find("name=\"csrf\" value=\"").expect("a form token") + 19;
    let csrf = html[start..].split('"').next().unwrap();
    let resp = client
        .post(format!("{}/approvals/{id}/approve", w.broker.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("origin", w.broker.url.clone())
        .header("sec-fetch-site", "same-origin")
        .body(format!("csrf={csrf}&bot=ops-node&remember=1"))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// One thing tried.
enum Try {
    Http {
        who: As,
        method: &'static str,
        path: String,
        body: Option<Value>,
    },
    CliAsOps(Vec<String>),
    /// Approve + remember on the approval web page, as the node at this address.
    WebApprove {
        from: &'static str,
        id: String,
    },
}

struct Case {
    name: &'static str,
    try_: Try,
    code: ErrorCode,
    /// The audit events the refusal adds, in order.
    events: Vec<AuditEventKind>,
}

/// Regressions for the adversarial review's approval findings, as one table of refusals.
#[tokio::test(flavor = "multi_thread")]
async fn approval_refusals_change_nothing_but_the_audit_log() {
    let mut w = world().await;

    // ci-bot asks for write on acme-corp/api; alice approves it; nobody collects it yet.
    let (s, b) = send(
        &w,
        As::Node(CI),
        "POST",
        "/v1/credentials",
        Some(write_request("acme-corp/api")),
    )
    .await;
    let ci_request = pending_view(s, b).request_id;
    let (s, b) = send(
        &w,
        As::Node(ADMIN),
        "POST",
        &format!("/v1/admin/approvals/{ci_request}/approve"),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    // ops, an admin and a policy bot, asks for write on acme-corp/web.
    let (s, b) = send(
        &w,
        As::Ops,
        "POST",
        "/v1/credentials",
        Some(write_request("acme-corp/web")),
    )
    .await;
    let ops_request = pending_view(s, b).request_id;
    // ops-node, a tagged admin node and a policy bot, asks for write on acme-corp/docs.
    let (s, b) = send(
        &w,
        As::Node(OPS_NODE),
        "POST",
        "/v1/credentials",
        Some(write_request("acme-corp/docs")),
    )
    .await;
    let ops_node_request = pending_view(s, b).request_id;
    // ci-bot spends its replacements of acme-corp/web contents:read (burst 2).
    let (s, b) = send(
        &w,
        As::Node(CI),
        "POST",
        "/v1/credentials",
        Some(read_request("acme-corp/web")),
    )
    .await;
    let mut current = credential(s, b);
    let mut replaced = Vec::new();
    for _ in 0..2 {
        let mut body = read_request("acme-corp/web");
        body["replaces"] = json!(current.credential_id);
        let (s, b) = send(&w, As::Node(CI), "POST", "/v1/credentials", Some(body)).await;
        replaced.push(std::mem::replace(&mut current, credential(s, b)));
    }
    let revoked_events: Vec<String> = audit(&w)
        .await
        .into_iter()
        .filter(|e| e.event == AuditEventKind::CredentialRevoked)
        .filter_map(|e| e.token_id)
        .collect();
    for old in &replaced {
        let info = w.github.token_info(&old.token).expect("minted by the fake");
        assert!(!info.is_active(), "a replaced token is revoked at GitHub");
        assert!(
            revoked_events.contains(&old.credential_id),
            "the replaced token's revocation is audited"
        );
    }

    // ci-bot has write on acme-corp/infra approved and collects the token, and asks for
    // more on acme-corp/api.
    let (s, b) = send(
        &w,
        As::Node(CI),
        "POST",
        "/v1/credentials",
        Some(write_request("acme-corp/infra")),
    )
    .await;
    let infra_request = pending_view(s, b).request_id;
    let (s, b) = send(
        &w,
        As::Node(ADMIN),
        "POST",
        &format!("/v1/admin/approvals/{infra_request}/approve"),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = send(
        &w,
        As::Node(CI),
        "GET",
        &format!("/v1/requests/{infra_request}"),
        None,
    )
    .await;
    let ci_infra = credential(s, b);
    let (s, b) = send(
        &w,
        As::Node(CI),
        "POST",
        "/v1/credentials",
        Some(json!({"kind": "github_token", "repositories": ["acme-corp/api"], "permissions": ["issues:write"]})),
    )
    .await;
    let ci_pending = pending_view(s, b).request_id;

    // The policy now denies ci-bot acme-corp/api: the reload ends the grant, revokes the
    // token and denies the pending request, each audited.
    let loads = w.broker.log_count("policy reloaded");
    std::fs::write(&w.broker.policy_path, POLICY_WITH_DENY).unwrap();
    w.broker.signal("HUP");
    assert!(
        w.broker
            .wait_for_count("policy reloaded", loads + 1, Duration::from_secs(30))
            .await
    );
    let (s, b) = send(&w, As::Node(ADMIN), "GET", "/v1/admin/grants", None).await;
    assert_eq!(s, 200);
    let live: GrantList = serde_json::from_value(b).unwrap();
    assert!(
        live.grants.is_empty(),
        "the denied grant ended: {:?}",
        live.grants
    );
    let ended = audit(&w).await;
    let ended: Vec<_> = ended
        .iter()
        .filter(|e| e.event == AuditEventKind::GrantRevoked)
        .collect();
    let mut ended_requests: Vec<&str> = ended
        .iter()
        .filter_map(|e| e.request_id.as_deref())
        .collect();
    ended_requests.sort_unstable();
    let mut want = vec![ci_request.as_str(), infra_request.as_str()];
    want.sort_unstable();
    assert_eq!(ended_requests, want);
    assert!(ended.iter().all(|e| e.caller.as_deref() == Some("policy")));
    let info = w
        .github
        .token_info(&ci_infra.token)
        .expect("minted by the fake");
    assert!(
        !info.is_active(),
        "the reload revoked the denied token at GitHub"
    );
    let log = audit(&w).await;
    let revoked = log
        .iter()
        .find(|e| {
            e.event == AuditEventKind::CredentialRevoked
                && e.token_id.as_deref() == Some(ci_infra.credential_id.as_str())
        })
        .expect("the revocation is audited");
    assert_eq!(revoked.caller.as_deref(), Some("policy"));
    let info = w
        .github
        .token_info(&current.token)
        .expect("minted by the fake");
    assert!(
        info.is_active(),
        "a token the policy still allows stays live"
    );
    let denied = log
        .iter()
        .find(|e| {
            e.event == AuditEventKind::ApprovalDenied
                && e.request_id.as_deref() == Some(ci_pending.as_str())
        })
        .expect("the denial of the pending request is audited");
    assert_eq!(denied.caller.as_deref(), Some("policy"));

    let replace_body = {
        let mut b = read_request("acme-corp/web");
        b["replaces"] = json!(current.credential_id);
        b
    };
    let requested_denied = vec![
        AuditEventKind::CredentialRequested,
        AuditEventKind::CredentialDenied,
    ];
    let cases = vec![
        Case {
            name: "poll an approved request the policy now denies",
            try_: Try::Http {
                who: As::Node(CI),
                method: "GET",
                path: format!("/v1/requests/{ci_request}"),
                body: None,
            },
            code: ErrorCode::PolicyDenied,
            events: vec![AuditEventKind::CredentialDenied],
        },
        Case {
            name: "ask again for what the ended grant covered",
            try_: Try::Http {
                who: As::Node(CI),
                method: "POST",
                path: "/v1/credentials".into(),
                body: Some(write_request("acme-corp/api")),
            },
            code: ErrorCode::PolicyDenied,
            events: requested_denied.clone(),
        },
        Case {
            name: "approve a pending request the reload denied",
            try_: Try::Http {
                who: As::Node(ADMIN),
                method: "POST",
                path: format!("/v1/admin/approvals/{ci_pending}/approve"),
                body: Some(json!({})),
            },
            code: ErrorCode::AlreadyDecided,
            events: vec![],
        },
        Case {
            name: "poll a pending request the reload denied",
            try_: Try::Http {
                who: As::Node(CI),
                method: "GET",
                path: format!("/v1/requests/{ci_pending}"),
                body: None,
            },
            code: ErrorCode::ApprovalDenied,
            events: vec![],
        },
        Case {
            name: "ask to replace the token the reload revoked",
            try_: Try::Http {
                who: As::Node(CI),
                method: "POST",
                path: "/v1/credentials".into(),
                body: Some({
                    let mut b = write_request("acme-corp/infra");
                    b["replaces"] = json!(ci_infra.credential_id);
                    b
                }),
            },
            code: ErrorCode::PolicyDenied,
            events: requested_denied.clone(),
        },
        Case {
            name: "admin API: approve + persist its own request",
            try_: Try::Http {
                who: As::Ops,
                method: "POST",
                path: format!("/v1/admin/approvals/{ops_request}/approve"),
                body: Some(json!({"persist": true})),
            },
            code: ErrorCode::SelfApproval,
            events: vec![AuditEventKind::ApprovalRefused],
        },
        Case {
            name: "admin API: approve its own request naming its bot",
            try_: Try::Http {
                who: As::Ops,
                method: "POST",
                path: format!("/v1/admin/approvals/{ops_request}/approve"),
                body: Some(json!({"bot": "ops"})),
            },
            code: ErrorCode::SelfApproval,
            events: vec![AuditEventKind::ApprovalRefused],
        },
        Case {
            name: "admin API: approve-all of its own bot",
            try_: Try::Http {
                who: As::Ops,
                method: "POST",
                path: "/v1/admin/approvals/approve-all".into(),
                body: Some(json!({"bot": "ops", "persist": true})),
            },
            code: ErrorCode::SelfApproval,
            events: vec![AuditEventKind::ApprovalRefused],
        },
        Case {
            name: "CLI: approve --persist its own request",
            try_: Try::CliAsOps(vec![
                "approve".into(),
                ops_request.clone(),
                "--persist".into(),
            ]),
            code: ErrorCode::SelfApproval,
            events: vec![AuditEventKind::ApprovalRefused],
        },
        Case {
            name: "CLI: approve --all of its own bot",
            try_: Try::CliAsOps(vec!["approve".into(), "--bot=ops".into(), "--all".into()]),
            code: ErrorCode::SelfApproval,
            events: vec![AuditEventKind::ApprovalRefused],
        },
        Case {
            name: "web page: approve + remember its own request",
            try_: Try::WebApprove {
                from: OPS_NODE,
                id: ops_node_request.clone(),
            },
            code: ErrorCode::SelfApproval,
            events: vec![AuditEventKind::ApprovalRefused],
        },
        Case {
            name: "replace the token once more than [limits] allows",
            try_: Try::Http {
                who: As::Node(CI),
                method: "POST",
                path: "/v1/credentials".into(),
                body: Some(replace_body),
            },
            code: ErrorCode::ReplaceRateLimited,
            events: requested_denied.clone(),
        },
    ];

    for case in cases {
        let (before, audit_len) = stored(&w).await;
        match case.try_ {
            Try::Http {
                who,
                method,
                path,
                body,
            } => {
                let (status, body) = send(&w, who, method, &path, body).await;
                assert_eq!(status, case.code.http_status(), "{}: {body}", case.name);
                assert_eq!(code_of(&body), case.code, "{}: {body}", case.name);
                if case.code == ErrorCode::ReplaceRateLimited {
                    let retry = body["retry_after"].as_u64().unwrap_or(0);
                    assert!(retry >= 1, "{}: retry_after {body}", case.name);
                }
            }
            Try::WebApprove { from, id } => {
                let (status, html) = web_approve(&w, from, &id).await;
                assert_eq!(status, case.code.http_status(), "{}: {html}", case.name);
                assert!(html.contains(case.code.as_str()), "{}: {html}", case.name);
            }
            Try::CliAsOps(args) => {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let (code, stderr) = cli_as_ops(&w, &args).await;
                assert_ne!(code, 0, "{}: {stderr}", case.name);
                assert!(
                    stderr.contains(&format!("({})", case.code)),
                    "{}: {stderr}",
                    case.name
                );
            }
        }
        let (after, _) = stored(&w).await;
        assert_eq!(after, before, "{}: stored state changed", case.name);
        let events = audit(&w).await;
        let added: Vec<AuditEventKind> = events[audit_len..].iter().map(|e| e.event).collect();
        assert_eq!(added, case.events, "{}: audit events", case.name);
        if let (false, Some(last)) = (added.is_empty(), events.last()) {
            assert_eq!(
                last.code.as_deref(),
                Some(case.code.as_str()),
                "{}: the refusal names its code",
                case.name
            );
        }
    }

    // Another admin may approve ops's request.
    let (s, b) = send(
        &w,
        As::Node(ADMIN),
        "POST",
        &format!("/v1/admin/approvals/{ops_request}/approve"),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
}

/// Concurrent identical requests against the fake GitHub cost exactly one mint. GitHub
/// answers slowly here, so every request arrives while the first mint is in flight.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_identical_requests_mint_once_end_to_end() {
    let w = world().await;
    w.github.set_delay(Duration::from_millis(300));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let client = w.broker.client_from(ip(CI));
        let url = format!("{}/v1/credentials", w.broker.url);
        tasks.push(tokio::spawn(async move {
            let resp = client
                .post(url)
                .json(&read_request("acme-corp/web"))
                .send()
                .await
                .expect("request");
            let status = resp.status().as_u16();
            credential(status, resp.json().await.expect("json"))
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap().credential_id);
    }
    assert_eq!(w.github.mint_count(), 1);
    assert_eq!(ids.len(), 1);
}

/// A `botcreds_policy_decisions_total` count from the broker's metrics.
async fn decisions(w: &World, outcome: &str) -> u64 {
    let text = w
        .broker
        .client_from(ip(ADMIN))
        .get(format!("{}/metrics", w.broker.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    let prefix = format!("botcreds_policy_decisions_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map_or(0, |n| n.trim().parse().expect("a count"))
}

/// Regression: a request decided before a reload and answered after it (waiting on its own
/// mint, or on another request's mint of the same token through single flight) was answered
/// under the old policy. GitHub holds the mint here until the reload that denies the scope
/// is in force; both requests, decided `allow` before it, are refused with `policy_denied`.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_during_an_in_flight_mint_wins() {
    let mut w = world().await;
    w.github.hold_mints();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let client = w.broker.client_from(ip(CI));
        let url = format!("{}/v1/credentials", w.broker.url);
        tasks.push(tokio::spawn(async move {
            let resp = client
                .post(url)
                .json(&read_request("acme-corp/web"))
                .send()
                .await
                .expect("request");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.expect("json"))
        }));
    }
    // Both are decided (`allow`) and wait: one on GitHub, one on that mint.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while decisions(&w, "allow").await < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "requests not decided"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let loads = w.broker.log_count("policy reloaded");
    std::fs::write(
        &w.broker.policy_path,
        POLICY_WITH_DENY.replace("- repo: \"acme-corp/api\"", "- repo: \"acme-corp/web\""),
    )
    .unwrap();
    w.broker.signal("HUP");
    assert!(
        w.broker
            .wait_for_count("policy reloaded", loads + 1, Duration::from_secs(30))
            .await
    );
    w.github.release_mints();
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(
            (status, code_of(&body)),
            (403, ErrorCode::PolicyDenied),
            "{body}"
        );
    }
    assert!(
        !audit(&w)
            .await
            .iter()
            .any(|e| e.event == AuditEventKind::CredentialIssued),
        "nothing was handed out"
    );
    // Asked again, it is refused before any mint.
    let (s, b) = send(
        &w,
        As::Node(CI),
        "POST",
        "/v1/credentials",
        Some(read_request("acme-corp/web")),
    )
    .await;
    assert_eq!((s, code_of(&b)), (403, ErrorCode::PolicyDenied), "{b}");
}

/// Regression: a token minted for a request that the recheck then refused (a reload denied
/// the scope while the mint was in flight) stayed live at GitHub and in the reuse cache, held
/// by no bot. With no holder left it is now revoked at GitHub (audited, `credential_revoked`)
/// and dropped from the cache: a later allowed request gets a fresh token.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_minted_for_a_refused_request_is_revoked() {
    let mut w = world().await;
    w.github.hold_mints();
    let pending = {
        let client = w.broker.client_from(ip(CI));
        let url = format!("{}/v1/credentials", w.broker.url);
        tokio::spawn(async move {
            let resp = client
                .post(url)
                .json(&read_request("acme-corp/web"))
                .send()
                .await
                .expect("request");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.expect("json"))
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while decisions(&w, "allow").await < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "request not decided"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reload = |w: &mut World, policy: String| {
        let loads = w.broker.log_count("policy reloaded");
        std::fs::write(&w.broker.policy_path, policy).unwrap();
        w.broker.signal("HUP");
        loads
    };
    let loads = reload(
        &mut w,
        POLICY_WITH_DENY.replace("- repo: \"acme-corp/api\"", "- repo: \"acme-corp/web\""),
    );
    assert!(
        w.broker
            .wait_for_count("policy reloaded", loads + 1, Duration::from_secs(30))
            .await
    );
    w.github.release_mints();
    let (status, body) = pending.await.unwrap();
    assert_eq!(
        (status, code_of(&body)),
        (403, ErrorCode::PolicyDenied),
        "{body}"
    );
    let minted = w.github.issued_tokens();
    assert_eq!(minted.len(), 1, "one mint");
    assert!(
        minted.iter().all(|t| t.revoked),
        "the token nobody holds is revoked at GitHub"
    );
    let revoked: Vec<_> = audit(&w)
        .await
        .into_iter()
        .filter(|e| e.event == AuditEventKind::CredentialRevoked)
        .collect();
    assert_eq!(revoked.len(), 1, "the revocation is audited: {revoked:?}");
    assert!(
        revoked[0]
            .token_id
            .as_deref()
            .is_some_and(|t| t.starts_with("tok_"))
    );

    // Allowed again, the request gets a fresh, working token, not the revoked one.
    let loads = reload(&mut w, POLICY.to_string());
    assert!(
        w.broker
            .wait_for_count("policy reloaded", loads + 1, Duration::from_secs(30))
            .await
    );
    let (s, b) = send(
        &w,
        As::Node(CI),
        "POST",
        "/v1/credentials",
        Some(read_request("acme-corp/web")),
    )
    .await;
    let cred = credential(s, b);
    assert_ne!(Some(&cred.credential_id), revoked[0].token_id.as_ref());
    assert!(
        w.github
            .token_info(&cred.token)
            .is_some_and(|t| t.is_active()),
        "the answered token works"
    );
    assert_eq!(w.github.mint_count(), 2);
}

const LITELLM_POLICY: &str = r#"
bots:
  review-bot:
    identity: { type: api_key }
    requires_approval:
      - litellm_scope: ci
  ops:
    identity: { type: api_key }
defaults:
  requires_approval: true
  approval_timeout: 24h
"#;

const REVIEW_KEY: &str = "bck_secReviewBotKey0123456789abcdefg";

/// Regression (LiteLLM side of the deny-after-approval finding): an approved LiteLLM key
/// request whose scope the policy now denies hands out nothing, and the reload ends its grant
/// and deletes the key already handed out (before, it stayed live until its expiry).
#[tokio::test(flavor = "multi_thread")]
async fn a_deny_added_after_a_litellm_approval_wins() {
    let w = litellm_world().await;
    let (litellm, mut broker) = (w.litellm.clone(), w.broker);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let base = broker.url.clone();
    let call = |key: &'static str, method: &'static str, path: String, body: Option<Value>| {
        let url = format!("{base}{path}");
        let http = http.clone();
        async move {
            let mut r = match method {
                "GET" => http.get(url),
                _ => http.post(url),
            }
            .bearer_auth(key);
            if let Some(b) = body {
                r = r.json(&b);
            }
            let resp = r.send().await.expect("request");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.expect("json"))
        }
    };
    let ask = json!({"kind": "litellm_key", "scope": "ci"});
    let (s, b) = call(
        REVIEW_KEY,
        "POST",
        "/v1/credentials".into(),
        Some(ask.clone()),
    )
    .await;
    let id = pending_view(s, b).request_id;
    let (s, b) = call(
        OPS_KEY,
        "POST",
        format!("/v1/admin/approvals/{id}/approve"),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    // review-bot collects the approved key.
    let (s, b) = call(REVIEW_KEY, "GET", format!("/v1/requests/{id}"), None).await;
    assert_eq!(s, 200, "{b}");
    let key = b["key"].as_str().expect("a key").to_string();
    let key_id = b["credential_id"].as_str().expect("an id").to_string();

    let loads = broker.log_count("policy reloaded");
    std::fs::write(
        &broker.policy_path,
        LITELLM_POLICY.replace(
            "    requires_approval:\n      - litellm_scope: ci\n",
            "    deny:\n      - litellm_scope: ci\n",
        ),
    )
    .unwrap();
    broker.signal("HUP");
    assert!(
        broker
            .wait_for_count("policy reloaded", loads + 1, Duration::from_secs(30))
            .await
    );
    let (s, b) = call(OPS_KEY, "GET", "/v1/admin/grants".into(), None).await;
    assert_eq!(s, 200);
    assert_eq!(b["grants"], json!([]), "the denied grant ended");
    assert!(
        litellm.was_deleted(&key),
        "the reload deleted the denied key in LiteLLM"
    );
    let (s, b) = call(
        OPS_KEY,
        "GET",
        "/v1/admin/audit?event=credential_revoked".into(),
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let log: AuditList = serde_json::from_value(b).unwrap();
    assert!(
        log.events
            .iter()
            .any(|e| e.token_id.as_deref() == Some(key_id.as_str())
                && e.caller.as_deref() == Some("policy")),
        "the key's revocation is audited: {:?}",
        log.events
    );

    let (s, b) = call(REVIEW_KEY, "GET", format!("/v1/requests/{id}"), None).await;
    assert_eq!((s, code_of(&b)), (403, ErrorCode::PolicyDenied), "{b}");
    let (s, b) = call(REVIEW_KEY, "POST", "/v1/credentials".into(), Some(ask)).await;
    assert_eq!((s, code_of(&b)), (403, ErrorCode::PolicyDenied), "{b}");
    assert_eq!(
        litellm.calls_to("/key/generate").len(),
        1,
        "no key was minted after the reload"
    );
}

/// Regression (LiteLLM side of the in-flight finding): an approved LiteLLM key request whose
/// key was being minted when a reload denied the scope was answered with the new key. Now it
/// is refused with `policy_denied` and the key minted for it is deleted in LiteLLM.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_during_an_in_flight_litellm_mint_wins() {
    let w = litellm_world().await;
    let (litellm, mut broker) = (w.litellm.clone(), w.broker);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = |path: &str| format!("{}{path}", broker.url);
    let resp = http
        .post(url("/v1/credentials"))
        .bearer_auth(REVIEW_KEY)
        .json(&json!({"kind": "litellm_key", "scope": "ci"}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let id = pending_view(status, resp.json().await.unwrap()).request_id;
    let resp = http
        .post(url(&format!("/v1/admin/approvals/{id}/approve")))
        .bearer_auth(OPS_KEY)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);

    litellm.hold_generates();
    let poll = {
        let req = http
            .get(url(&format!("/v1/requests/{id}")))
            .bearer_auth(REVIEW_KEY);
        tokio::spawn(async move {
            let resp = req.send().await.expect("request");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.expect("json"))
        })
    };
    // The key's mint has reached LiteLLM (recorded on arrival, then held).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while litellm.calls_to("/key/generate").is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no mint arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let loads = broker.log_count("policy reloaded");
    std::fs::write(
        &broker.policy_path,
        LITELLM_POLICY.replace(
            "    requires_approval:\n      - litellm_scope: ci\n",
            "    deny:\n      - litellm_scope: ci\n",
        ),
    )
    .unwrap();
    broker.signal("HUP");
    assert!(
        broker
            .wait_for_count("policy reloaded", loads + 1, Duration::from_secs(30))
            .await
    );
    litellm.release_generates();
    let (status, body) = poll.await.unwrap();
    assert_eq!(
        (status, code_of(&body)),
        (403, ErrorCode::PolicyDenied),
        "{body}"
    );
    assert!(
        litellm.live_keys().is_empty(),
        "the key minted for the refused request is deleted"
    );
}
