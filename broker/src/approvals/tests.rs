//! Unit tests of the approval service: lifecycle, dedupe, concurrent decisions, expiry with
//! a moved clock, restart, caps, remembered rules, revocation and bad input.

use std::sync::Arc;
use std::time::Duration;

use botcreds_proto::approval::ApprovalState;
use botcreds_proto::audit::AuditEventKind;
use botcreds_proto::{ErrorCode, Permission, RepoName};

use super::*;
use crate::audit::AuditLog;
use crate::clock::{OffsetClock, SharedClock};
use crate::grants::{TokenIssuer, TokenScope};
use crate::providers::github::SimulatedGithub;
use crate::store::{AuditFilter, MemoryStore, SledStore, Store};

struct World {
    approvals: Arc<Approvals>,
    clock: OffsetClock,
    github: Arc<SimulatedGithub>,
    issuer: Arc<TokenIssuer>,
    audit: AuditLog,
    store: Arc<dyn Store>,
}

fn world_with(store: Arc<dyn Store>, config: ApprovalsConfig) -> World {
    let clock = OffsetClock::default();
    let shared: SharedClock = Arc::new(clock.clone());
    let github = Arc::new(SimulatedGithub::new(shared.clone()));
    let issuer = Arc::new(TokenIssuer::new(github.clone(), shared.clone()));
    let audit = AuditLog::start(store.clone());
    let approvals = Arc::new(
        Approvals::load(store.clone(), audit.clone(), shared, issuer.clone(), config).unwrap(),
    );
    World {
        approvals,
        clock,
        github,
        issuer,
        audit,
        store,
    }
}

/// An admin whose identity matches no policy bot.
fn admin(actor: &str) -> Approver {
    Approver::new(actor, actor)
}

fn world() -> World {
    world_with(Arc::new(MemoryStore::new()), ApprovalsConfig::default())
}

fn resource(repos: &[&str], perms: &[&str]) -> Resource {
    let r: Vec<RepoName> = repos.iter().map(|r| r.parse().unwrap()).collect();
    let p: Vec<Permission> = perms.iter().map(|p| p.parse().unwrap()).collect();
    Resource::github(&r, &p)
}

fn ask(bot: &str, repos: &[&str], perms: &[&str]) -> NewRequest {
    NewRequest {
        owner: bot.into(),
        bot: Some(bot.into()),
        caller: format!("api_key:{bot}"),
        resource: resource(repos, perms),
        reason: Some("deploy".into()),
        rule: format!("bots.{bot}.requires_approval[0]"),
        timeout: Duration::from_secs(60),
        min_ttl: Duration::from_secs(600),
        workspace: None,
        client_ip: None,
        preceding: None,
    }
}

fn events(w: &World, kind: AuditEventKind) -> usize {
    w.audit
        .read(&AuditFilter {
            event: Some(kind),
            ..AuditFilter::default()
        })
        .unwrap()
        .len()
}

#[tokio::test]
async fn lifecycle_pending_approved_issued_with_a_grant() {
    let w = world();
    let mut events_rx = w.approvals.subscribe();
    let r = w
        .approvals
        .request(ask("ci", &["acme/web"], &["contents:write"]))
        .await
        .unwrap();
    assert!(r.created);
    assert_eq!(r.view.state, ApprovalState::Pending);
    assert!(r.view.request_id.starts_with("apr_") && r.view.request_id.len() == 12);
    assert_eq!(
        r.view.poll_url,
        format!("/v1/requests/{}", r.view.request_id)
    );
    assert_eq!(w.approvals.pending().unwrap().len(), 1);
    let ev = events_rx.recv().await.unwrap();
    assert_eq!(ev.kind, AuditEventKind::ApprovalRequested);
    assert_eq!(ev.actor, None);

    let repos: Vec<RepoName> = vec!["acme/web".parse().unwrap()];
    let perms: Vec<Permission> = vec!["contents:read".parse().unwrap()];
    let narrower = Request::Github {
        repositories: &repos,
        permissions: &perms,
    };
    assert!(w.approvals.covering_grant("ci", &narrower).is_none());

    let id = r.view.request_id.clone();
    let d = w
        .approvals
        .approve(&admin("tailnet:alice@example.com"), &id, false)
        .await
        .unwrap();
    assert_eq!(d.request.state, ApprovalState::Approved);
    assert_eq!(
        d.request.decided_by.as_deref(),
        Some("tailnet:alice@example.com")
    );
    let grant = d.grant.unwrap();
    assert_eq!(d.request.grant_id.as_deref(), Some(grant.grant_id.as_str()));
    assert!(d.remembered.is_none());
    let ev = events_rx.recv().await.unwrap();
    assert_eq!(ev.kind, AuditEventKind::ApprovalGranted);
    assert_eq!(ev.actor.as_deref(), Some("tailnet:alice@example.com"));
    assert!(w.approvals.pending().unwrap().is_empty());

    // The grant covers narrower requests of the same bot, not other bots', for 8 hours.
    assert_eq!(
        w.approvals
            .covering_grant("ci", &narrower)
            .map(|g| g.grant_id),
        Some(grant.grant_id.clone())
    );
    assert!(w.approvals.covering_grant("other", &narrower).is_none());
    w.clock.advance(8 * 3600 - 10);
    assert!(w.approvals.covering_grant("ci", &narrower).is_some());
    w.clock.advance(20);
    assert!(w.approvals.covering_grant("ci", &narrower).is_none());
    assert!(!w.approvals.grant_is_live(&grant.grant_id));

    w.approvals.mark_issued(&id, "tok_0123").unwrap();
    let v = w.approvals.get(&id).unwrap();
    assert_eq!(v.state, ApprovalState::Issued);
    assert_eq!(v.credential_id.as_deref(), Some("tok_0123"));
    assert_eq!(events(&w, AuditEventKind::ApprovalRequested), 1);
    assert_eq!(events(&w, AuditEventKind::ApprovalGranted), 1);
}

#[tokio::test]
async fn identical_pending_requests_are_one() {
    let w = world();
    let a = w
        .approvals
        .request(ask("ci", &["acme/web", "acme/api"], &["contents:write"]))
        .await
        .unwrap();
    // Same resource in another order: joined.
    let b = w
        .approvals
        .request(ask("ci", &["acme/api", "acme/web"], &["contents:write"]))
        .await
        .unwrap();
    assert!(a.created && !b.created);
    assert_eq!(a.view.request_id, b.view.request_id);
    // Another bot, or another resource: a new request.
    let c = w
        .approvals
        .request(ask(
            "deploy",
            &["acme/web", "acme/api"],
            &["contents:write"],
        ))
        .await
        .unwrap();
    let d = w
        .approvals
        .request(ask("ci", &["acme/web"], &["contents:write"]))
        .await
        .unwrap();
    assert!(c.created && d.created);
    assert_eq!(w.approvals.pending().unwrap().len(), 3);
    assert_eq!(events(&w, AuditEventKind::ApprovalRequested), 3);

    // Once decided, the same ask opens a new request.
    w.approvals
        .deny("api_key:ops", &a.view.request_id, None)
        .await
        .unwrap();
    let e = w
        .approvals
        .request(ask("ci", &["acme/web", "acme/api"], &["contents:write"]))
        .await
        .unwrap();
    assert!(e.created);
    assert_ne!(e.view.request_id, a.view.request_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_approvals_exactly_one_wins() {
    let w = world();
    let id = w
        .approvals
        .request(ask("ci", &["acme/web"], &["contents:write"]))
        .await
        .unwrap()
        .view
        .request_id;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (approvals, id) = (w.approvals.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                approvals
                    .approve(&admin(&format!("admin{i}")), &id, true)
                    .await
            } else {
                approvals.deny(&format!("admin{i}"), &id, Some("no")).await
            }
        }));
    }
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => wins += 1,
            Err(e) => assert_eq!(e.code(), ErrorCode::AlreadyDecided),
        }
    }
    assert_eq!(wins, 1);
    let decided =
        events(&w, AuditEventKind::ApprovalGranted) + events(&w, AuditEventKind::ApprovalDenied);
    assert_eq!(decided, 1);
    let v = w.approvals.get(&id).unwrap();
    // At most one grant and one remembered rule exist.
    assert_eq!(
        w.approvals.grants(true).len(),
        usize::from(v.state == ApprovalState::Approved)
    );
    assert!(w.approvals.remembered_views().len() <= 1);
}

#[tokio::test]
async fn expiry_follows_the_clock() {
    let w = world();
    let mut rx = w.approvals.subscribe();
    let id = w
        .approvals
        .request(ask("ci", &["acme/web"], &["contents:write"]))
        .await
        .unwrap()
        .view
        .request_id;
    let _ = rx.recv().await.unwrap();
    assert_eq!(w.approvals.sweep().await, 0);
    w.clock.advance(61);
    // Past its timeout it is no longer listed or approvable, even before the sweep.
    assert!(w.approvals.pending().unwrap().is_empty());
    let e = w
        .approvals
        .approve(&admin("a"), &id, false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::RequestExpired);
    assert_eq!(w.approvals.sweep().await, 1);
    assert_eq!(w.approvals.sweep().await, 0);
    let v = w.approvals.get(&id).unwrap();
    assert_eq!(v.state, ApprovalState::Expired);
    assert_eq!(v.decided_by.as_deref(), Some("clock"));
    let ev = rx.recv().await.unwrap();
    assert_eq!(ev.kind, AuditEventKind::ApprovalExpired);
    let e = w.approvals.deny("a", &id, None).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::RequestExpired);
    assert_eq!(events(&w, AuditEventKind::ApprovalExpired), 1);
    assert!(w.approvals.grants(true).is_empty());
}

#[tokio::test]
async fn a_waiter_hears_the_decision() {
    let w = world();
    let id = w
        .approvals
        .request(ask("ci", &["acme/web"], &["contents:write"]))
        .await
        .unwrap()
        .view
        .request_id;
    // Nothing decided: the wait ends pending.
    let v = w
        .approvals
        .wait_decided(&id, Duration::from_millis(20))
        .await
        .unwrap();
    assert_eq!(v.state, ApprovalState::Pending);
    let waiter = {
        let (approvals, id) = (w.approvals.clone(), id.clone());
        tokio::spawn(async move { approvals.wait_decided(&id, Duration::from_secs(60)).await })
    };
    tokio::task::yield_now().await;
    w.approvals
        .approve(&admin("ops"), &id, false)
        .await
        .unwrap();
    let v = waiter.await.unwrap().unwrap();
    assert_eq!(v.state, ApprovalState::Approved);
}

#[tokio::test]
async fn caps_on_pending_requests() {
    let config = ApprovalsConfig {
        max_pending_per_bot: 2,
        max_pending: 3,
        ..ApprovalsConfig::default()
    };
    let w = world_with(Arc::new(MemoryStore::new()), config);
    for repo in ["acme/a", "acme/b"] {
        w.approvals
            .request(ask("ci", &[repo], &["contents:read"]))
            .await
            .unwrap();
    }
    let e = w
        .approvals
        .request(ask("ci", &["acme/c"], &["contents:read"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::TooManyPending);
    // Joining an existing request is not a new one.
    assert!(
        !w.approvals
            .request(ask("ci", &["acme/a"], &["contents:read"]))
            .await
            .unwrap()
            .created
    );
    w.approvals
        .request(ask("other", &["acme/c"], &["contents:read"]))
        .await
        .unwrap();
    let e = w
        .approvals
        .request(ask("third", &["acme/c"], &["contents:read"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::TooManyPending);
    assert_eq!(w.approvals.pending().unwrap().len(), 3);
}

#[tokio::test]
async fn bad_decisions_change_nothing() {
    let w = world();
    let id = w
        .approvals
        .request(ask("ci", &["acme/web"], &["contents:write"]))
        .await
        .unwrap()
        .view
        .request_id;
    let before = w.approvals.get(&id).unwrap();
    let audit_before = w.audit.read(&AuditFilter::default()).unwrap().len();

    let e = w
        .approvals
        .approve(&admin("a"), "apr_nosuchid", false)
        .await;
    assert_eq!(e.unwrap_err().code(), ErrorCode::UnknownRequest);
    let e = w.approvals.deny("a", "apr_nosuchid", None).await;
    assert_eq!(e.unwrap_err().code(), ErrorCode::UnknownRequest);
    let e = w
        .approvals
        .approve_checked(&admin("a"), &id, false, Some("deploy"))
        .await;
    assert_eq!(e.unwrap_err().code(), ErrorCode::WrongBot);
    let e = w
        .approvals
        .deny_checked("a", &id, None, Some("deploy"))
        .await;
    assert_eq!(e.unwrap_err().code(), ErrorCode::WrongBot);
    let huge = "x".repeat(100 * 1024);
    let e = w.approvals.deny("a", &id, Some(&huge)).await;
    assert_eq!(e.unwrap_err().code(), ErrorCode::InvalidDenyReason);
    let e = w.approvals.deny("a", &id, Some("bad\u{1b}[31m")).await;
    assert_eq!(e.unwrap_err().code(), ErrorCode::InvalidDenyReason);
    // Another bot cannot see it.
    let e = w.approvals.get_owned("deploy", &id).unwrap_err();
    assert_eq!(e.code(), ErrorCode::UnknownRequest);
    assert_eq!(w.approvals.get_owned("ci", &id).unwrap(), before);

    assert_eq!(w.approvals.get(&id).unwrap(), before);
    assert!(w.approvals.grants(true).is_empty());
    assert_eq!(
        w.audit.read(&AuditFilter::default()).unwrap().len(),
        audit_before
    );

    // Newline and tab are fine in a reason; a decided request cannot be decided again.
    let d = w
        .approvals
        .deny("a", &id, Some("not now\n\tsee ticket 7"))
        .await
        .unwrap();
    assert_eq!(
        d.request.deny_reason.as_deref(),
        Some("not now\n\tsee ticket 7")
    );
    let e = w
        .approvals
        .approve(&admin("b"), &id, false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::AlreadyDecided);
    assert_eq!(w.approvals.get(&id).unwrap().state, ApprovalState::Denied);
}

#[tokio::test]
async fn remember_and_forget() {
    let w = world();
    let id = w
        .approvals
        .request(ask("ci", &["acme/web"], &["contents:write"]))
        .await
        .unwrap()
        .view
        .request_id;
    let d = w.approvals.approve(&admin("ops"), &id, true).await.unwrap();
    let rule = d.remembered.unwrap();
    assert!(rule.rule_id.starts_with("rem_"));
    assert_eq!(
        d.request.remembered_rule.as_deref(),
        Some(rule.rule_id.as_str())
    );
    let rules = w.approvals.remembered();
    let repos: Vec<RepoName> = vec!["acme/web".parse().unwrap()];
    let perms: Vec<Permission> = vec!["contents:read".parse().unwrap()];
    let req = Request::Github {
        repositories: &repos,
        permissions: &perms,
    };
    assert_eq!(rules.covering("ci", &req).unwrap().id, rule.rule_id);
    assert_eq!(events(&w, AuditEventKind::RuleRemembered), 1);

    let e = w.approvals.forget("ops", "rem_nosuchid").await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::UnknownRule);
    w.approvals.forget("ops", &rule.rule_id).await.unwrap();
    assert!(w.approvals.remembered().covering("ci", &req).is_none());
    assert!(w.approvals.remembered_views().is_empty());
    assert_eq!(events(&w, AuditEventKind::RuleForgotten), 1);
}

#[tokio::test]
async fn pending_requests_grants_and_rules_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (pending_id, approved_id, rule_id) = {
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let w = world_with(store, ApprovalsConfig::default());
        let p = w
            .approvals
            .request(ask("ci", &["acme/web"], &["contents:write"]))
            .await
            .unwrap()
            .view
            .request_id;
        let a = w
            .approvals
            .request(ask("ci", &["acme/api"], &["issues:write"]))
            .await
            .unwrap()
            .view
            .request_id;
        let d = w.approvals.approve(&admin("ops"), &a, true).await.unwrap();
        w.audit.shutdown();
        w.store.flush().unwrap();
        (p, a, d.remembered.unwrap().rule_id)
    };
    let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
    let w = world_with(store, ApprovalsConfig::default());
    let pending = w.approvals.pending().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].request_id, pending_id);
    assert_eq!(
        w.approvals.get(&approved_id).unwrap().state,
        ApprovalState::Approved
    );
    assert_eq!(w.approvals.grants(false).len(), 1);
    assert_eq!(w.approvals.remembered().len(), 1);
    assert_eq!(w.approvals.remembered_views()[0].rule_id, rule_id);
    // Still one request per ask, and decidable after the restart.
    assert!(
        !w.approvals
            .request(ask("ci", &["acme/web"], &["contents:write"]))
            .await
            .unwrap()
            .created
    );
    w.approvals
        .approve(&admin("ops"), &pending_id, false)
        .await
        .unwrap();
    assert!(w.approvals.pending().unwrap().is_empty());
}

#[tokio::test]
async fn revoking_kills_tokens_and_ends_grants() {
    let w = world();
    let id = w
        .approvals
        .request(ask("ci", &["acme/web"], &["contents:write"]))
        .await
        .unwrap()
        .view
        .request_id;
    w.approvals
        .approve(&admin("ops"), &id, false)
        .await
        .unwrap();
    let repos: Vec<RepoName> = vec!["acme/web".parse().unwrap()];
    let perms: Vec<Permission> = vec!["contents:write".parse().unwrap()];
    let scope = TokenScope::new(&repos, &perms).unwrap();
    let issued = w
        .issuer
        .issue_unchecked(&scope, Duration::from_secs(600), None, "ci")
        .await
        .unwrap();
    // Record the holder as the credentials handler does.
    let mut e = botcreds_proto::audit::AuditEvent::new(
        AuditEventKind::CredentialIssued,
        crate::clock::rfc3339_millis(w.approvals.clock().now()),
    );
    e.bot = Some("ci".into());
    e.token_id = Some(issued.token.credential_id.clone());
    w.audit.record(vec![e]).await.unwrap();

    let e = w
        .approvals
        .revoke("ops", &RevokeTarget::Credential("tok_000000000000".into()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::UnknownCredential);
    assert!(w.github.is_live(&issued.token.token));

    let answer = w
        .approvals
        .revoke("ops", &RevokeTarget::Bot("ci".into()))
        .await
        .unwrap();
    assert_eq!(answer.revoked.len(), 1);
    assert_eq!(answer.revoked[0].credential_id, issued.token.credential_id);
    assert_eq!(answer.revoked[0].holders, vec!["ci".to_string()]);
    assert!(answer.revoked[0].revoked_upstream);
    assert_eq!(answer.grants_ended.len(), 1);
    assert!(w.github.is_revoked(&issued.token.token));
    assert!(w.approvals.grants(false).is_empty());
    assert_eq!(events(&w, AuditEventKind::CredentialRevoked), 1);
    assert_eq!(events(&w, AuditEventKind::GrantRevoked), 1);

    // Out of the reuse cache: the next request mints afresh.
    let again = w
        .issuer
        .issue_unchecked(&scope, Duration::from_secs(600), None, "ci")
        .await
        .unwrap();
    assert!(!again.reused);
    let by_repo = w
        .approvals
        .revoke("ops", &RevokeTarget::Repo("acme/web".parse().unwrap()))
        .await
        .unwrap();
    assert_eq!(by_repo.revoked.len(), 1);
    assert!(w.github.is_revoked(&again.token.token));
}

#[test]
fn deny_reasons() {
    assert_eq!(validate_deny_reason(None).unwrap(), None);
    assert_eq!(validate_deny_reason(Some("  ")).unwrap(), None);
    assert!(validate_deny_reason(Some(&"é".repeat(2049))).is_err());
    assert!(validate_deny_reason(Some(&"a".repeat(4096))).is_ok());
    assert!(validate_deny_reason(Some("a\u{7}")).is_err());
}

#[test]
fn config_validation() {
    assert!(ApprovalsConfig::default().validate().is_ok());
    let c = ApprovalsConfig {
        max_pending_per_bot: 0,
        ..ApprovalsConfig::default()
    };
    assert_eq!(c.validate().unwrap_err().0, "approvals.max_pending_per_bot");
    let c: ApprovalsConfig = toml::from_str("grant_ttl = \"2h\"\nmax_wait = \"30s\"").unwrap();
    assert_eq!(c.grant_ttl.as_secs(), 7200);
    assert!(toml::from_str::<ApprovalsConfig>("grant_tll = \"2h\"").is_err());
}

#[tokio::test]
async fn the_credential_request_is_logged_right_before_its_approval_request() {
    let w = world();
    let mut first = ask("ci", &["acme/web"], &["contents:write"]);
    first.preceding = Some(botcreds_proto::audit::AuditEvent::new(
        AuditEventKind::CredentialRequested,
        crate::clock::rfc3339_millis(w.approvals.clock().now()),
    ));
    let id = w
        .approvals
        .request(first.clone())
        .await
        .unwrap()
        .view
        .request_id;
    // Joining does not record it again (the handler does, marked as joined).
    assert!(!w.approvals.request(first).await.unwrap().created);
    let log = w.audit.read(&AuditFilter::default()).unwrap();
    let kinds: Vec<_> = log
        .iter()
        .map(|e| (e.event, e.request_id.clone()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (AuditEventKind::CredentialRequested, Some(id.clone())),
            (AuditEventKind::ApprovalRequested, Some(id)),
        ]
    );
}

fn litellm_ask(bot: &str, scope: &str, workspace: Option<&str>) -> NewRequest {
    NewRequest {
        resource: Resource::Litellm {
            scope: scope.into(),
        },
        workspace: workspace.map(|id| WorkspaceInfo {
            workspace_id: id.into(),
            workspace_name: format!("ws-{id}"),
            coder_user: "alice".into(),
            coder_user_id: "u-1".into(),
        }),
        ..ask(bot, &["acme/web"], &["contents:read"])
    }
}

#[tokio::test]
async fn litellm_requests_dedupe_grant_and_remember_by_scope() {
    let w = world();
    let a = w
        .approvals
        .request(litellm_ask("ci", "agent:write", None))
        .await
        .unwrap();
    let b = w
        .approvals
        .request(litellm_ask("ci", "agent:write", None))
        .await
        .unwrap();
    assert!(a.created && !b.created);
    assert_eq!(a.view.resource.summary(), "litellm agent:write");
    // Workspace keys of different workspaces are different requests, of one workspace one.
    let ws1 = w
        .approvals
        .request(litellm_ask("ci", "workspace", Some("w1")))
        .await
        .unwrap();
    let ws2 = w
        .approvals
        .request(litellm_ask("ci", "workspace", Some("w2")))
        .await
        .unwrap();
    let ws1_again = w
        .approvals
        .request(litellm_ask("ci", "workspace", Some("w1")))
        .await
        .unwrap();
    assert!(ws1.created && ws2.created && !ws1_again.created);
    let (_, _, stored) = w.approvals.resource_of(&ws2.view.request_id).unwrap();
    assert_eq!(stored.map(|s| s.workspace_id).as_deref(), Some("w2"));

    let d = w
        .approvals
        .approve(&admin("ops"), &a.view.request_id, true)
        .await
        .unwrap();
    let (resource, min_ttl, workspace) = w.approvals.resource_of(&a.view.request_id).unwrap();
    assert_eq!(
        resource,
        Resource::Litellm {
            scope: "agent:write".into()
        }
    );
    assert_eq!(min_ttl, Duration::from_secs(600));
    assert!(workspace.is_none());
    let scope = Request::Litellm {
        scope: "agent:write",
    };
    let grant = w.approvals.covering_grant("ci", &scope).unwrap();
    assert_eq!(Some(&grant), d.grant.as_ref());
    assert!(
        w.approvals
            .covering_grant("ci", &Request::Litellm { scope: "ci" })
            .is_none()
    );
    let rule = d.remembered.unwrap();
    assert_eq!(rule.resource.summary(), "litellm agent:write");
    assert!(w.approvals.remembered().covering("ci", &scope).is_some());
}

#[tokio::test]
async fn ending_the_grants_of_a_revoked_key() {
    let w = world();
    let mut grants = Vec::new();
    for (bot, scope) in [
        ("ci", "agent:write"),
        ("ci", "ci"),
        ("deploy", "agent:write"),
    ] {
        let r = w
            .approvals
            .request(litellm_ask(bot, scope, None))
            .await
            .unwrap();
        let d = w
            .approvals
            .approve(&admin("ops"), &r.view.request_id, false)
            .await
            .unwrap();
        grants.push(d.grant.unwrap().grant_id);
    }
    let write = Resource::Litellm {
        scope: "agent:write".into(),
    };
    let ended = w
        .approvals
        .end_grants_for("ops", "ci", &write)
        .await
        .unwrap();
    assert_eq!(ended, vec![grants[0].clone()]);
    assert!(!w.approvals.grant_is_live(&grants[0]));
    assert!(w.approvals.grant_is_live(&grants[1]));
    assert!(w.approvals.grant_is_live(&grants[2]));
    assert_eq!(events(&w, AuditEventKind::GrantRevoked), 1);
    // Nothing left to end: nothing recorded.
    let again = w
        .approvals
        .end_grants_for("ops", "ci", &write)
        .await
        .unwrap();
    assert!(again.is_empty());
    assert_eq!(events(&w, AuditEventKind::GrantRevoked), 1);

    // A bot's revocation ends its LiteLLM grants too.
    let answer = w
        .approvals
        .revoke("ops", &RevokeTarget::Bot("deploy".into()))
        .await
        .unwrap();
    assert_eq!(answer.grants_ended, vec![grants[2].clone()]);
    assert!(w.approvals.grant_is_live(&grants[1]));
}

/// Regression: re-mints (ttl-driven and `replaces`) overwrote the held token, so with five
/// live tokens for one scope `revoke --bot` revoked one.
#[tokio::test]
async fn revoking_a_bot_reaches_every_token_it_was_handed() {
    let w = world();
    let repos: Vec<RepoName> = vec!["acme/web".parse().unwrap()];
    let perms: Vec<Permission> = vec!["contents:write".parse().unwrap()];
    let scope = TokenScope::new(&repos, &perms).unwrap();
    let mut tokens = Vec::new();
    for i in 0..5 {
        // Each request wants 55 minutes, so every 6 minutes the held token is too short.
        let issued = if i % 2 == 1 {
            let last: &crate::grants::IssuedToken = tokens.last().unwrap();
            w.issuer
                .issue_unchecked(
                    &scope,
                    Duration::from_secs(55 * 60),
                    Some(&last.credential_id),
                    "ci",
                )
                .await
                .unwrap()
        } else {
            w.issuer
                .issue_unchecked(&scope, Duration::from_secs(55 * 60), None, "ci")
                .await
                .unwrap()
        };
        assert!(!issued.reused);
        let mut e = botcreds_proto::audit::AuditEvent::new(
            AuditEventKind::CredentialIssued,
            crate::clock::rfc3339_millis(w.approvals.clock().now()),
        );
        e.bot = Some("ci".into());
        e.token_id = Some(issued.token.credential_id.clone());
        w.audit.record(vec![e]).await.unwrap();
        tokens.push(issued.token);
        w.clock.advance(6 * 60);
    }
    // The two replaced ones died with their replacement; three superseded ones live on.
    let live: Vec<_> = tokens
        .iter()
        .filter(|t| w.github.is_live(&t.token))
        .collect();
    assert_eq!(live.len(), 3);
    let answer = w
        .approvals
        .revoke("ops", &RevokeTarget::Bot("ci".into()))
        .await
        .unwrap();
    assert_eq!(answer.revoked.len(), 3, "{:?}", answer.revoked);
    for t in &tokens {
        assert!(
            !w.github.is_live(&t.token),
            "{} still live",
            t.credential_id
        );
    }
}

/// Regression: an admin who is also a policy bot approved (and remembered) its own request.
/// Each way of deciding is refused with `self_approval`, audited, and changes nothing.
#[tokio::test]
async fn an_admin_may_not_approve_its_own_bots_request() {
    let w = world();
    let id = w
        .approvals
        .request(ask("ci", &["acme/web"], &["contents:write"]))
        .await
        .unwrap()
        .view
        .request_id;
    let me = Approver::new("api_key:ci", "ci");
    let cases: Vec<(&str, Result<usize, ApprovalError>)> = vec![
        (
            "approve",
            w.approvals.approve(&me, &id, false).await.map(|_| 1),
        ),
        (
            "approve + remember",
            w.approvals.approve(&me, &id, true).await.map(|_| 1),
        ),
        (
            "approve naming the bot",
            w.approvals
                .approve_checked(&me, &id, true, Some("ci"))
                .await
                .map(|_| 1),
        ),
        (
            "approve all",
            w.approvals
                .approve_all(&me, "ci", true)
                .await
                .map(|d| d.len()),
        ),
    ];
    for (what, result) in cases {
        let e = result.err().unwrap_or_else(|| panic!("{what}: approved"));
        assert_eq!(e.code(), ErrorCode::SelfApproval, "{what}: {}", e);
    }
    assert_eq!(w.approvals.get(&id).unwrap().state, ApprovalState::Pending);
    assert_eq!(w.approvals.pending().unwrap().len(), 1);
    assert!(w.approvals.grants(true).is_empty());
    assert!(w.approvals.remembered_views().is_empty());
    assert_eq!(events(&w, AuditEventKind::ApprovalRefused), 4);
    assert_eq!(events(&w, AuditEventKind::ApprovalGranted), 0);

    // Another admin may; and the bot may withdraw (deny) its own request.
    let d = w
        .approvals
        .approve(&admin("tailnet:alice@example.com"), &id, false)
        .await;
    assert!(d.is_ok());
    let id = w
        .approvals
        .request(ask("ci", &["acme/api"], &["contents:write"]))
        .await
        .unwrap()
        .view
        .request_id;
    assert!(
        w.approvals
            .deny_checked(&me.actor, &id, None, None)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn self_approval_when_the_config_allows_it() {
    let config = ApprovalsConfig {
        allow_self_approval: true,
        ..ApprovalsConfig::default()
    };
    let w = world_with(Arc::new(MemoryStore::new()), config);
    let id = w
        .approvals
        .request(ask("ci", &["acme/web"], &["contents:write"]))
        .await
        .unwrap()
        .view
        .request_id;
    let me = Approver::new("api_key:ci", "ci");
    assert!(w.approvals.approve(&me, &id, false).await.is_ok());
    assert_eq!(events(&w, AuditEventKind::ApprovalRefused), 0);
}

/// Regression: a deny added after an approval left the grant live for its whole life.
/// A reload that denies what a grant covers ends it (audited); others stay.
#[tokio::test]
async fn a_reloaded_policy_ends_the_grants_it_denies() {
    let w = world();
    let mut ids = Vec::new();
    for repo in ["acme/web", "acme/api"] {
        let id = w
            .approvals
            .request(ask("ci", &[repo], &["contents:write"]))
            .await
            .unwrap()
            .view
            .request_id;
        w.approvals
            .approve(&admin("ops"), &id, false)
            .await
            .unwrap();
        ids.push(id);
    }
    let allow = crate::policy::Policy::parse(
        "p.yaml",
        "bots:\n  ci:\n    identity: { type: api_key }\n    requires_approval:\n      - repo: \"acme/*\"\n        permissions: [contents:write]\n",
    )
    .unwrap();
    assert!(
        w.approvals
            .enforce_policy(&allow, None)
            .await
            .grants_ended
            .is_empty()
    );
    let deny = crate::policy::Policy::parse(
        "p.yaml",
        "bots:\n  ci:\n    identity: { type: api_key }\n    deny:\n      - repo: \"acme/web\"\n    requires_approval:\n      - repo: \"acme/*\"\n        permissions: [contents:write]\n",
    )
    .unwrap();
    let ended = w.approvals.enforce_policy(&deny, None).await.grants_ended;
    assert_eq!(ended.len(), 1);
    let live = w.approvals.grants(false);
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].request_id, ids[1]);
    let gone = w
        .approvals
        .grants(true)
        .into_iter()
        .find(|g| g.grant_id == ended[0])
        .unwrap();
    assert_eq!(gone.request_id, ids[0]);
    assert_eq!(gone.revoked_by.as_deref(), Some("policy"));
    assert_eq!(events(&w, AuditEventKind::GrantRevoked), 1);
    // Persisted: a restart does not bring it back.
    let again = Approvals::load(
        w.store.clone(),
        w.audit.clone(),
        Arc::new(w.clock.clone()),
        w.issuer.clone(),
        ApprovalsConfig::default(),
    )
    .unwrap();
    assert_eq!(again.grants(false).len(), 1);
}

fn scope_of(repos: &[&str], perms: &[&str]) -> TokenScope {
    let r: Vec<RepoName> = repos.iter().map(|r| r.parse().unwrap()).collect();
    let p: Vec<Permission> = perms.iter().map(|p| p.parse().unwrap()).collect();
    TokenScope::new(&r, &p).unwrap()
}

/// `ci` and `deploy` may have `acme/*`; the reloaded [`DENY_WEB`] denies `ci` `acme/web`.
const ALLOW_ALL: &str = "bots:\n  ci:\n    identity: { type: api_key }\n    auto_approve:\n      - repo: \"acme/*\"\n        permissions: [contents:read]\n    requires_approval:\n      - repo: \"acme/*\"\n        permissions: [contents:write]\n  deploy:\n    identity: { type: api_key }\n    auto_approve:\n      - repo: \"acme/*\"\n        permissions: [contents:write, contents:read]\n";
const DENY_WEB: &str = "bots:\n  ci:\n    identity: { type: api_key }\n    deny:\n      - repo: \"acme/web\"\n    auto_approve:\n      - repo: \"acme/*\"\n        permissions: [contents:read]\n    requires_approval:\n      - repo: \"acme/*\"\n        permissions: [contents:write]\n  deploy:\n    identity: { type: api_key }\n    auto_approve:\n      - repo: \"acme/*\"\n        permissions: [contents:write, contents:read]\n";

fn policy(text: &str) -> crate::policy::Policy {
    crate::policy::Policy::parse("p.yaml", text).unwrap()
}

/// Regression: a reload that denies a bot a scope left the tokens already handed out to it
/// live at GitHub (up to an hour) and in the reuse cache. Now every live token one of whose
/// holders the new policy denies is revoked (audited, `caller: policy`) and dropped from the
/// cache; tokens nobody denied holds stay.
#[tokio::test]
async fn a_reloaded_policy_revokes_the_live_tokens_it_denies() {
    let w = world();
    let ten = Duration::from_secs(600);
    let web = scope_of(&["acme/web"], &["contents:read"]);
    let api = scope_of(&["acme/api"], &["contents:read"]);
    // ci and deploy share the acme/web token through the reuse cache.
    let shared = w
        .issuer
        .issue_unchecked(&web, ten, None, "ci")
        .await
        .unwrap()
        .token;
    assert!(
        w.issuer
            .issue_unchecked(&web, ten, None, "deploy")
            .await
            .unwrap()
            .reused
    );
    let ci_api = w
        .issuer
        .issue_unchecked(&api, ten, None, "ci")
        .await
        .unwrap()
        .token;
    let docs = scope_of(&["acme/docs"], &["contents:write"]);
    let deploy_docs = w
        .issuer
        .issue_unchecked(&docs, ten, None, "deploy")
        .await
        .unwrap()
        .token;

    w.approvals.enforce_policy(&policy(ALLOW_ALL), None).await;
    assert!(
        w.github.is_live(&shared.token),
        "nothing denied, nothing revoked"
    );
    assert_eq!(events(&w, AuditEventKind::CredentialRevoked), 0);

    w.approvals.enforce_policy(&policy(DENY_WEB), None).await;
    assert!(
        w.github.is_revoked(&shared.token),
        "a denied holder's token is revoked at GitHub"
    );
    assert!(w.github.is_live(&ci_api.token));
    assert!(w.github.is_live(&deploy_docs.token));
    let revoked = w
        .audit
        .read(&AuditFilter {
            event: Some(AuditEventKind::CredentialRevoked),
            ..AuditFilter::default()
        })
        .unwrap();
    assert_eq!(revoked.len(), 1);
    assert_eq!(
        revoked[0].token_id.as_deref(),
        Some(shared.credential_id.as_str())
    );
    assert_eq!(revoked[0].caller.as_deref(), Some("policy"));
    assert!(
        revoked[0]
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("policy")),
        "{:?}",
        revoked[0].detail
    );
    // Out of the reuse cache: deploy, still allowed, gets a fresh token.
    let again = w
        .issuer
        .issue_unchecked(&web, ten, None, "deploy")
        .await
        .unwrap();
    assert!(!again.reused);
    assert_ne!(again.token.credential_id, shared.credential_id);
}

/// Regression: a reload that denies what a pending request asks for left it pending, and
/// approving it made a grant that could never mint. Now the reload decides it `DENIED`
/// (`decided_by: policy`, audited and published like any denial); others stay pending.
#[tokio::test]
async fn a_reloaded_policy_denies_the_pending_requests_it_denies() {
    let w = world();
    let mut heard = w.approvals.subscribe();
    let web = w
        .approvals
        .request(ask("ci", &["acme/web"], &["contents:write"]))
        .await
        .unwrap()
        .view
        .request_id;
    let api = w
        .approvals
        .request(ask("ci", &["acme/api"], &["contents:write"]))
        .await
        .unwrap()
        .view
        .request_id;
    w.approvals.enforce_policy(&policy(ALLOW_ALL), None).await;
    assert_eq!(w.approvals.pending().unwrap().len(), 2);

    w.approvals.enforce_policy(&policy(DENY_WEB), None).await;
    let view = w.approvals.get(&web).unwrap();
    assert_eq!(view.state, ApprovalState::Denied);
    assert_eq!(view.decided_by.as_deref(), Some("policy"));
    assert!(
        view.deny_reason
            .as_deref()
            .is_some_and(|r| r.contains("policy")),
        "{:?}",
        view.deny_reason
    );
    assert_eq!(w.approvals.get(&api).unwrap().state, ApprovalState::Pending);
    assert_eq!(events(&w, AuditEventKind::ApprovalDenied), 1);
    let mut kinds = Vec::new();
    while let Ok(e) = heard.try_recv() {
        kinds.push((e.kind, e.actor));
    }
    assert_eq!(
        kinds.last(),
        Some(&(AuditEventKind::ApprovalDenied, Some("policy".to_string())))
    );

    // An admin can no longer approve it into a grant that never mints.
    let e = w
        .approvals
        .approve(&admin("ops"), &web, false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::AlreadyDecided);
    assert!(w.approvals.grants(true).is_empty());
    // Persisted: a restart does not bring it back.
    let again = Approvals::load(
        w.store.clone(),
        w.audit.clone(),
        Arc::new(w.clock.clone()),
        w.issuer.clone(),
        ApprovalsConfig::default(),
    )
    .unwrap();
    assert_eq!(again.get(&web).unwrap().state, ApprovalState::Denied);
    assert_eq!(again.pending().unwrap().len(), 1);
}
