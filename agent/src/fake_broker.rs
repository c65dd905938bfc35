//! In-process test doubles for the credential slots: a broker that mints GitHub tokens and
//! LiteLLM keys on the test's clock (and can be taken down), a clock on tokio's paused time, a
//! way to step that time until something happened, and a log capture.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use botcreds_proto::litellm::{LitellmCredential, WorkspaceInfo};

use crate::broker_client::{BrokerError, BrokerFuture, CredentialBroker, Issued, Released};
use crate::clock::{Clock, TokioClock};
use crate::config::{GithubEntry, Scope};
use crate::credentials::{Edges, rfc3339};
use crate::secret::Secret;
use crate::slot::lock;

/// A key the fake broker holds live.
#[derive(Clone, Debug)]
pub struct LiveKey {
    pub n: u32,
    pub created_at: SystemTime,
    pub expires_at: SystemTime,
}

/// What the fake broker does and has done.
#[derive(Debug)]
pub struct FakeState {
    /// Unreachable: every call fails as a connection would.
    pub down: bool,
    pub token_life: Duration,
    pub key_life: Duration,
    pub tokens_minted: u32,
    pub keys_minted: u32,
    /// The live key: handed back until a request `replaces` it (as the real broker reuses).
    pub key: Option<LiveKey>,
    /// Keys replaced by a refresh, and when.
    pub rotated: Vec<(LiveKey, SystemTime)>,
    pub released: Vec<String>,
}

/// A broker in the test's process, on the test's clock.
pub struct FakeBroker {
    clock: Arc<dyn Clock>,
    pub state: Mutex<FakeState>,
}

impl FakeBroker {
    pub fn new(clock: Arc<dyn Clock>, token_life: Duration, key_life: Duration) -> Arc<FakeBroker> {
        Arc::new(FakeBroker {
            clock,
            state: Mutex::new(FakeState {
                down: false,
                token_life,
                key_life,
                tokens_minted: 0,
                keys_minted: 0,
                key: None,
                rotated: Vec::new(),
                released: Vec::new(),
            }),
        })
    }

    pub fn set_down(&self, down: bool) {
        lock(&self.state).down = down;
    }

    pub fn st(&self) -> std::sync::MutexGuard<'_, FakeState> {
        lock(&self.state)
    }

    fn unreachable() -> BrokerError {
        BrokerError::Unreachable("connection refused".into())
    }
}

impl CredentialBroker for FakeBroker {
    fn github_token<'a>(
        &'a self,
        scope: &'a Scope,
        _entry: &'a GithubEntry,
        _replaces: Option<&'a str>,
    ) -> BrokerFuture<'a, Issued> {
        let now = self.clock.now();
        let answer = {
            let mut st = lock(&self.state);
            if st.down {
                Err(FakeBroker::unreachable())
            } else {
                st.tokens_minted += 1;
                let n = st.tokens_minted;
                assert!(!scope.repositories.is_empty());
                Ok(Issued {
                    token: Secret::new(format!("ghs_fake{n:04}")),
                    credential_id: format!("tok_{n}"),
                    expires_at: now + st.token_life,
                })
            }
        };
        Box::pin(async move { answer })
    }

    fn litellm_key<'a>(
        &'a self,
        scope: &'a str,
        _workspace: Option<&'a WorkspaceInfo>,
        _reason: Option<&'a str>,
        replaces: Option<&'a str>,
    ) -> BrokerFuture<'a, LitellmCredential> {
        let now = self.clock.now();
        let answer = {
            let mut st = lock(&self.state);
            if st.down {
                Err(FakeBroker::unreachable())
            } else {
                let current = st.key.clone();
                let key = match current {
                    Some(k) if replaces != Some(format!("lk_{}", k.n).as_str()) => k,
                    old => {
                        if let Some(old) = old {
                            st.rotated.push((old, now));
                        }
                        st.keys_minted += 1;
                        let k = LiveKey {
                            n: st.keys_minted,
                            created_at: now,
                            expires_at: now + st.key_life,
                        };
                        st.key = Some(k.clone());
                        k
                    }
                };
                Ok(LitellmCredential {
                    kind: botcreds_proto::CredentialKind::LitellmKey,
                    credential_id: format!("lk_{}", key.n),
                    key: format!("sk-fake-{}", key.n),
                    name: "ci-build".into(),
                    scope: scope.to_string(),
                    budget_usd: 1.0,
                    budget_period: "run".into(),
                    rpm_limit: 60,
                    models: vec!["claude-haiku-3-5".into()],
                    expires_at: rfc3339(key.expires_at),
                    base_url: "http://127.0.0.1:4000/v1".into(),
                    bot: "ci-bot".into(),
                })
            }
        };
        Box::pin(async move { answer })
    }

    fn release_credential<'a>(
        &'a self,
        credential_id: &'a str,
        _timeout: Duration,
    ) -> BrokerFuture<'a, Released> {
        let answer = {
            let mut st = lock(&self.state);
            if st.down {
                Err(FakeBroker::unreachable())
            } else if st
                .key
                .as_ref()
                .is_some_and(|k| format!("lk_{}", k.n) == credential_id)
            {
                st.key = None;
                st.released.push(credential_id.to_string());
                Ok(Released::Released)
            } else {
                Ok(Released::AlreadyGone)
            }
        };
        Box::pin(async move { answer })
    }
}

/// A clock on tokio's (paused) time, starting at the real now, and a fake broker on it.
pub fn edges(token_life: Duration, key_life: Duration) -> (Edges, Arc<FakeBroker>) {
    let clock: Arc<dyn Clock> = Arc::new(TokioClock::starting_at(SystemTime::now()));
    let broker = FakeBroker::new(clock.clone(), token_life, key_life);
    let edges = Edges {
        broker: broker.clone(),
        clock,
    };
    (edges, broker)
}

/// Steps the paused clock a second at a time until `done` holds, for at most `bound` of
/// simulated time (no wall-clock wait: tokio jumps to each timer).
pub async fn until(what: &str, bound: Duration, mut done: impl FnMut() -> bool) {
    let step = Duration::from_secs(1);
    let mut waited = Duration::ZERO;
    while !done() {
        assert!(
            waited < bound,
            "{what}: not within {}s of simulated time",
            bound.as_secs()
        );
        tokio::time::sleep(step).await;
        waited += step;
    }
}

/// The log lines written while the guard lives (on this thread: the paused runtime's).
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.0)).into_owned()
    }

    pub fn contains(&self, needle: &str) -> bool {
        self.text().contains(needle)
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
