//! `botcreds-agent run`: opens the cache, binds the socket, starts the credentials' tasks and
//! serves until the shutdown future resolves.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::broker_client::{Auth, BrokerClient};
use crate::cache::{CacheBinding, CacheError, DiskCache};
use crate::config::Config;
use crate::credentials::Credentials;
use crate::litellm::{self, Litellm};
use crate::socket::{self, AppState, ServeLimits};
use crate::systemd;

/// How long open connections may finish after shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on releasing LiteLLM keys at the broker when stopping: a broker that is down must not
/// hold the shutdown.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot build the broker client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("serving the socket failed: {0}")]
    Serve(std::io::Error),
}

/// Raises the soft limit on open files to the hard limit (each socket connection, cache file
/// and broker connection is one), and returns the limit in force.
fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // `None` is RLIM_INFINITY, which libc spells u64::MAX.
    let (soft, hard) = (
        limit.current.unwrap_or(u64::MAX),
        limit.maximum.unwrap_or(u64::MAX),
    );
    if soft < hard {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            tracing::debug!(from = soft, to = hard, "raised the open-file limit");
            return hard;
        }
        tracing::warn!(soft, hard, "cannot raise the open-file limit");
    }
    soft
}

/// Socket connections the open-file limit leaves room for: half of it, so that cache files,
/// broker connections and the runtime never run out.
fn connection_budget(fd_limit: u64) -> usize {
    usize::try_from(fd_limit / 2).unwrap_or(usize::MAX).max(1)
}

/// Runs the agent until `shutdown` resolves, then closes the socket and stops every task.
pub async fn run(
    config: Config,
    auth: Auth,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let config = Arc::new(config);
    let fd_limit = raise_fd_limit();
    // Bound to this broker and identity: a cache from another one is dropped, not served.
    let disk = DiskCache::open(&config.cache_dir)?.bound_to(CacheBinding {
        broker: config.broker.clone(),
        identity: auth.fingerprint(),
    });
    let auth_text = auth.describe();
    let mtls_identity = match &auth {
        Auth::Mtls(identity) => Some(identity.clone()),
        _ => None,
    };
    let broker = BrokerClient::new(&config.broker, auth, config.broker_timeout)?;
    // With a client certificate, renew it in the background (two-thirds into its life).
    let (renew_stop, renew_rx) = tokio::sync::watch::channel(false);
    let renewal = mtls_identity.map(|identity| {
        tokio::spawn(crate::enroll::renewal_loop(
            broker.http_slot(),
            config.broker.clone(),
            identity,
            renew_rx,
        ))
    });
    let listener =
        socket::bind(&config.socket, config.socket_group).map_err(|source| AgentError::Socket {
            path: config.socket.clone(),
            source,
        })?;
    if config.github.is_empty() && config.litellm.is_empty() {
        tracing::warn!(
            "agent.toml has no [[github]] entry: git requests will all be passed on to other helpers"
        );
    }
    let credentials = Credentials::start(config.clone(), broker, disk.clone());
    let litellm = Litellm::start(config.clone(), credentials.clone(), disk);
    let app = socket::router(AppState {
        credentials: credentials.clone(),
        config: config.clone(),
        auth: auth_text.clone(),
    })
    .merge(litellm::routes(litellm.clone(), config.allow.clone()));

    tracing::info!(broker = %config.broker, auth = %auth_text, cache_dir = %config.cache_dir.display(), "agent starting");
    tracing::info!(socket = %config.socket.display(), "agent ready");
    systemd::notify("READY=1");

    let stop = Arc::new(Notify::new());
    let limits = ServeLimits {
        allow: config.allow.clone(),
        connections: config.limits.connections.min(connection_budget(fd_limit)),
        connections_per_user: config.limits.connections_per_user,
        lifetime: config.helper_timeout + socket::CONNECTION_GRACE,
    };
    if limits.connections < config.limits.connections {
        tracing::warn!(
            configured = config.limits.connections,
            open_files = fd_limit,
            using = limits.connections,
            "limits.connections is more than the open-file limit allows"
        );
    }
    let server = socket::serve(listener, app, limits, {
        let stop = stop.clone();
        async move { stop.notified().await }
    });
    tokio::pin!(server);
    let served = tokio::select! {
        result = &mut server => result,
        () = shutdown => {
            tracing::info!("shutting down");
            systemd::notify("STOPPING=1");
            stop.notify_one();
            match tokio::time::timeout(DRAIN_TIMEOUT, &mut server).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!("connections still open after {}s; closing them", DRAIN_TIMEOUT.as_secs());
                    Ok(())
                }
            }
        }
    };
    credentials.shutdown();
    let _ = renew_stop.send(true);
    if let Some(renewal) = renewal {
        let _ = renewal.await;
    }
    litellm.shutdown(RELEASE_TIMEOUT).await;
    if let Err(e) = std::fs::remove_file(&config.socket) {
        tracing::warn!(socket = %config.socket.display(), error = %e, "cannot remove the socket file");
    }
    served.map_err(AgentError::Serve)?;
    tracing::info!("agent stopped");
    Ok(())
}
