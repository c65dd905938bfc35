//! Audit log throughput on a sled data directory: how well group commit turns concurrent `record` calls into
//! few fsyncs. Run with `cargo bench -p botcreds-store --bench audit`; results are in events per second.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark setup: a failure ends the run"
)]

use std::sync::Arc;

use botcreds_proto::audit::{AuditEvent, AuditEventKind};
use botcreds_store::audit::AuditLog;
use botcreds_store::{SledStore, Store};
use divan::Bencher;
use divan::counter::ItemsCount;

fn main() {
    divan::main();
}

fn event(writer: usize) -> AuditEvent {
    let mut event = AuditEvent::new(
        AuditEventKind::CredentialIssued,
        "2026-02-17T14:00:00.000Z".to_owned(),
    );
    event.bot = Some(format!("bench-bot-{writer}"));
    event.repositories = vec!["myorg/repo-a".to_owned()];
    event.permissions = vec!["contents:write".to_owned(), "issues:write".to_owned()];
    event.approval = Some("auto".to_owned());
    event.token_id =
        Some("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".to_owned());
    event
}

fn sled_store() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let store = SledStore::open(&dir.path().join("data")).expect("open the sled store");
    (dir, Arc::new(store))
}

/// `writers` request tasks each record one event at the same time; one iteration ends when all are durable.
#[divan::bench(args = [1, 16, 256], sample_count = 30, sample_size = 1)]
fn record_concurrent(bencher: Bencher, writers: usize) {
    let (_dir, store) = sled_store();
    let log = AuditLog::start(store);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("build the tokio runtime");
    bencher.counter(ItemsCount::new(writers)).bench_local(|| {
        runtime.block_on(async {
            let tasks: Vec<_> = (0..writers)
                .map(|w| {
                    let log = log.clone();
                    tokio::spawn(async move { log.record(vec![event(w)]).await })
                })
                .collect();
            for task in tasks {
                task.await
                    .expect("writer task")
                    .expect("record audit event");
            }
        })
    });
    log.shutdown();
}

/// The baseline group commit improves on: one `append_audit` (one fsync) per event.
#[divan::bench(sample_count = 30, sample_size = 1)]
fn append_one_at_a_time(bencher: Bencher) {
    let (_dir, store) = sled_store();
    bencher.counter(ItemsCount::new(1usize)).bench_local(|| {
        store
            .append_audit(&mut [event(0)])
            .expect("append audit event")
    });
}
