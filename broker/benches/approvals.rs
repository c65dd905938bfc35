//! Approval service latency on a sled data directory: listing 10,000 pending requests as the
//! admin route answers them, and the time from an approval to the waiting bot holding its
//! token. Run with `cargo bench -p botcreds-broker --bench approvals`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark setup: a failure ends the run"
)]

use std::sync::Arc;
use std::time::Duration;

use botcreds_broker::approvals::{Approvals, ApprovalsConfig, NewRequest};
use botcreds_broker::audit::AuditLog;
use botcreds_broker::clock::{SharedClock, SystemClock};
use botcreds_broker::grants::{TokenIssuer, TokenScope};
use botcreds_broker::policy::remembered::Resource;
use botcreds_broker::providers::github::SimulatedGithub;
use botcreds_broker::store::{SledStore, Store};
use botcreds_proto::approval::{ApprovalList, ApprovalState};
use botcreds_proto::{Permission, RepoName};
use divan::Bencher;

fn main() {
    divan::main();
}

struct World {
    _dir: tempfile::TempDir,
    approvals: Arc<Approvals>,
    issuer: Arc<TokenIssuer>,
    runtime: tokio::runtime::Runtime,
}

fn world() -> World {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let store: Arc<dyn Store> =
        Arc::new(SledStore::open(&dir.path().join("data")).expect("open the sled store"));
    let clock: SharedClock = Arc::new(SystemClock);
    let github = Arc::new(SimulatedGithub::new(clock.clone()));
    let issuer = Arc::new(TokenIssuer::new(github, clock.clone()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let audit = runtime.block_on(async { AuditLog::start(store.clone()) });
    let config = ApprovalsConfig {
        max_pending_per_bot: 20_000,
        max_pending: 20_000,
        ..ApprovalsConfig::default()
    };
    let approvals = Arc::new(
        Approvals::load(store, audit, clock, issuer.clone(), config).expect("load approvals"),
    );
    World {
        _dir: dir,
        approvals,
        issuer,
        runtime,
    }
}

fn ask(i: usize) -> NewRequest {
    let repos: Vec<RepoName> = vec![format!("acme/repo-{i}").parse().expect("repo")];
    let perms: Vec<Permission> = vec!["contents:write".parse().expect("permission")];
    NewRequest {
        owner: format!("bot-{}", i % 50),
        bot: Some(format!("bot-{}", i % 50)),
        caller: format!("api_key:bot-{}", i % 50),
        resource: Resource::github(&repos, &perms),
        reason: Some("release".into()),
        rule: "defaults".into(),
        timeout: Duration::from_secs(24 * 3600),
        min_ttl: Duration::from_secs(600),
        workspace: None,
        client_ip: None,
        preceding: None,
    }
}

/// `GET /v1/admin/approvals` with 10,000 pending requests: the listing and its JSON.
#[divan::bench(sample_count = 30)]
fn list_10000_pending(bencher: Bencher) {
    let w = world();
    w.runtime.block_on(async {
        for i in 0..10_000 {
            w.approvals.request(ask(i)).await.expect("request");
        }
    });
    bencher.bench(|| {
        let list = ApprovalList {
            requests: w.approvals.pending().expect("pending"),
        };
        assert_eq!(list.requests.len(), 10_000);
        serde_json::to_vec(&list).expect("json").len()
    });
}

/// From `approve` to the waiting bot holding its token: the waiter wakes on the decision and
/// the token comes from the issuer (simulated GitHub, reuse cache warm after the first).
#[divan::bench(sample_count = 200)]
fn approve_to_waiting_bot(bencher: Bencher) {
    let w = world();
    let mut i = 0usize;
    bencher
        .with_inputs(|| {
            i += 1;
            let id = w
                .runtime
                .block_on(w.approvals.request(ask(i)))
                .expect("request")
                .view
                .request_id;
            let (approvals, issuer, wid) = (w.approvals.clone(), w.issuer.clone(), id.clone());
            let waiter = w.runtime.spawn(async move {
                let view = approvals
                    .wait_decided(&wid, Duration::from_secs(60))
                    .await
                    .expect("wait");
                assert_eq!(view.state, ApprovalState::Approved);
                let repos: Vec<RepoName> = vec!["acme/web".parse().expect("repo")];
                let perms: Vec<Permission> = vec!["contents:write".parse().expect("permission")];
                let scope = TokenScope::new(&repos, &perms).expect("scope");
                let no_recheck = || None::<std::convert::Infallible>;
                match issuer
                    .issue(&scope, Duration::from_secs(600), None, "ci", no_recheck)
                    .await
                    .expect("token")
                {
                    botcreds_broker::grants::Checked::Issued(i) => i.token.credential_id,
                    botcreds_broker::grants::Checked::Refused { refusal, .. } => match refusal {},
                }
            });
            (id, waiter)
        })
        .bench_local_values(|(id, waiter)| {
            w.runtime.block_on(async {
                w.approvals
                    .approve(
                        &botcreds_broker::approvals::Approver::new("bench", "bench"),
                        &id,
                        false,
                    )
                    .await
                    .expect("approve");
                waiter.await.expect("waiter")
            })
        });
}
