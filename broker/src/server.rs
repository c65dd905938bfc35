//! Running the broker: wire the parts together, serve the listeners, reload the policy,
//! and shut down cleanly when the shutdown future resolves.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use botcreds_proto::audit::{AuditEvent, AuditEventKind};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::api::extract::LocalAddr;
use crate::api::{AppState, StateInner, router};
use crate::audit::{AuditLog, RefusalLimits};
use crate::clock::{SharedClock, SystemClock, rfc3339_millis};
use crate::config::{Config, Limits};
use crate::connections::{Activity, Connections, RESERVED_FILES, raise_file_limit};
use crate::grants::TokenIssuer;
use crate::identity::api_key::ApiKeys;
use crate::identity::tailnet::{CachedWhoIs, LocalApiWhoIs, WhoIs};
use crate::keys::KeyService;
use crate::metrics::Metrics;
use crate::policy::PolicyError;
use crate::providers::github::{GithubApi, GithubAppConfig, GithubClient, GithubError};
use crate::reload::{PolicyHandle, Reload};
use crate::store::{SledStore, Store, StoreError};

/// How long in-flight requests may take to finish after shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the policy file's size and time are looked at.
const POLICY_POLL: Duration = Duration::from_secs(2);
/// How long a connection closed for idleness may take to finish its goodbye (HTTP/2 GOAWAY).
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(5);
/// HTTP/2 pings: how often, and how long an answer may take before the connection is closed.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests one HTTP/2 connection may have in flight at once.
const H2_MAX_STREAMS: u32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("policy")]
    Policy(#[from] PolicyError),
    #[error("store")]
    Store(#[from] StoreError),
    #[error("github")]
    Github(#[from] GithubError),
    #[error("config: {0}")]
    Config(String),
    #[error("I/O")]
    Io(#[from] std::io::Error),
}

/// The outside world, injectable: tests and `--dev` swap these, never the middle.
pub struct Edges {
    pub github: Arc<dyn GithubApi>,
    pub whois: Option<Arc<dyn WhoIs>>,
    pub clock: SharedClock,
    /// LiteLLM's key API (`[litellm]`), if keys are served.
    pub litellm: Option<Arc<dyn crate::providers::litellm::LitellmApi>>,
}

impl Edges {
    /// The production edges named by the config: GitHub's API and the local tailscaled.
    pub fn from_config(config: &Config) -> Result<Edges, ServeError> {
        let clock: SharedClock = Arc::new(SystemClock);
        let Some(gh) = &config.github else {
            return Err(ServeError::Config(
                "[github] is missing: the broker needs a GitHub App to mint tokens (or run --dev)"
                    .into(),
            ));
        };
        let github = GithubClient::new(
            GithubAppConfig {
                app_id: gh.app_id,
                private_key_pem: gh.private_key_pem.clone(),
                api_url: gh.api_url.clone(),
                app_slug: gh.app_slug.clone(),
                bot_user_id: gh.bot_user_id,
                request_timeout: gh.request_timeout,
            },
            clock.clone(),
        )?;
        let whois = config.tailscale.as_ref().map(|ts| {
            let live: Arc<dyn WhoIs> = Arc::new(LocalApiWhoIs::new(ts.socket.clone()));
            Arc::new(CachedWhoIs::new(live, ts.whois_cache_ttl)) as Arc<dyn WhoIs>
        });
        let litellm = litellm_edge(config)?;
        Ok(Edges {
            github: Arc::new(github),
            whois,
            clock,
            litellm,
        })
    }
}

/// The LiteLLM edge `[litellm]` names: the real client, or `None` without `[litellm]`.
fn litellm_edge(
    config: &Config,
) -> Result<Option<Arc<dyn crate::providers::litellm::LitellmApi>>, ServeError> {
    let Some(l) = &config.litellm else {
        return Ok(None);
    };
    let client = crate::providers::litellm::LitellmClient::new(
        crate::providers::litellm::LitellmClientConfig {
            url: l.url.clone(),
            master_key: l.master_key.clone(),
            request_timeout: l.request_timeout,
            changed_by: "botcreds".into(),
        },
    )
    .map_err(|e| ServeError::Config(format!("[litellm]: {e}")))?;
    Ok(Some(Arc::new(client)))
}

/// The key service over the edges' LiteLLM, with `[litellm]`'s scope table, provisioner
/// secret and sweep interval (defaults under `--dev`) and `[coder]`'s session check.
fn key_service(
    config: &Config,
    edges: &Edges,
    store: Arc<dyn Store>,
    audit: AuditLog,
) -> Result<Option<Arc<KeyService>>, ServeError> {
    let Some(api) = &edges.litellm else {
        return Ok(None);
    };
    let (scopes, secret, sweep) = match &config.litellm {
        Some(l) => (
            l.scopes.clone(),
            l.provisioner_secret.clone(),
            l.sweep_interval,
        ),
        None => (
            crate::keys::scopes::ScopeTable::default(),
            None,
            Duration::from_secs(60),
        ),
    };
    let mut service = KeyService::new(
        api.clone(),
        store,
        audit,
        edges.clock.clone(),
        scopes,
        secret,
        sweep,
    );
    if let Some(c) = &config.coder {
        let client = crate::keys::coder::CoderClient::new(c).map_err(ServeError::Config)?;
        service = service.with_coder(client);
    }
    Ok(Some(Arc::new(service)))
}

/// Bind every configured listen address.
pub async fn bind(config: &Config) -> Result<Vec<TcpListener>, ServeError> {
    let mut listeners = Vec::new();
    for addr in &config.listen {
        let l = TcpListener::bind(addr).await.map_err(|e| {
            ServeError::Io(std::io::Error::new(
                e.kind(),
                format!("cannot listen on {addr}: {e}"),
            ))
        })?;
        listeners.push(l);
    }
    Ok(listeners)
}

/// Run the broker until `shutdown` resolves, then drain in-flight requests and flush the
/// audit log.
pub async fn run(
    config: Config,
    edges: Edges,
    listeners: Vec<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&config.data_dir)?);
    let audit = AuditLog::start_with(
        store.clone(),
        RefusalLimits {
            per_peer: config.limits.audited_refusals_per_peer,
            window: config.limits.refusal_window,
        },
    );
    let policy = Arc::new(PolicyHandle::load(&config.policy)?);
    let issuer = Arc::new(
        TokenIssuer::new(edges.github.clone(), edges.clock.clone())
            .with_replace_limit(config.limits.replace),
    );
    let keys = key_service(&config, &edges, store.clone(), audit.clone())?;
    let deploy_keys = crate::issuance::DeployKeys::new(
        issuer.clone(),
        audit.clone(),
        edges.clock.clone(),
        store.clone(),
        config.limits.max_deploy_key_ttl,
    );
    let mut collectors: Vec<Box<dyn prometheus_client::collector::Collector>> = keys
        .iter()
        .map(|k| Box::new(crate::keys::KeyMetrics(k.clone())) as _)
        .collect();
    collectors.push(Box::new(deploy_keys.metrics()));
    let metrics = Metrics::with_collectors(issuer.clone(), collectors);
    let approvals = Arc::new(
        crate::approvals::Approvals::load(
            store.clone(),
            audit.clone(),
            edges.clock.clone(),
            issuer.clone(),
            config.approvals.clone(),
        )
        .map_err(|e| ServeError::Config(format!("loading approval requests: {e}")))?,
    );
    // Keys, grants and pending requests from before end if the policy in force denies them.
    approvals
        .enforce_policy(&policy.current(), keys.as_deref())
        .await;
    let mtls = match &config.tls {
        Some(tls) => Some(
            crate::tls::Mtls::open(
                tls,
                &config.data_dir,
                store.clone(),
                audit.clone(),
                edges.clock.clone(),
            )
            .await
            .map_err(|e| ServeError::Config(e.to_string()))?,
        ),
        None => None,
    };
    let issuance = Arc::new(crate::issuance::Issuance::new(
        crate::issuance::IssuanceParts {
            policy: policy.clone(),
            approvals: approvals.clone(),
            audit: audit.clone(),
            metrics: metrics.clone(),
            clock: edges.clock.clone(),
            github: crate::issuance::GithubTokens::new(
                issuer.clone(),
                audit.clone(),
                edges.clock.clone(),
                metrics.clone(),
                config.limits.max_github_ttl,
                config
                    .github
                    .as_ref()
                    .map(|g| g.default_min_ttl)
                    .unwrap_or(Duration::from_secs(600)),
            ),
            deploy_keys: deploy_keys.clone(),
            litellm: keys.clone().map(crate::issuance::LitellmKeys::new),
            request_timeout: config.limits.request_timeout,
        },
    ));
    let state = AppState(Arc::new(StateInner {
        policy: policy.clone(),
        issuer,
        audit: audit.clone(),
        whois: edges.whois.clone(),
        trust_own_node: config.tailscale.as_ref().is_some_and(|t| t.trust_own_node),
        api_keys: ApiKeys::new(config.api_keys.clone()),
        admin: config.admin.clone(),
        metrics: metrics.clone(),
        clock: edges.clock.clone(),
        limits: config.limits.clone(),
        approvals: approvals.clone(),
        mtls: mtls.clone(),
        keys: keys.clone(),
        issuance,
    }));

    let mut started = AuditEvent::new(
        AuditEventKind::BrokerStarted,
        rfc3339_millis(edges.clock.now()),
    );
    started.detail = Some(format!(
        "policy {} with {} bots",
        config.policy.display(),
        policy.current().bot_names().len()
    ));
    if let Err(e) = audit.record(vec![started]).await {
        return Err(ServeError::Config(format!(
            "the audit log does not accept writes: {e}"
        )));
    }

    // The approval pages are HTTP above the API: composed here, served under its middleware.
    let pages = crate::web::routes(state.clone(), crate::web::WebState::new(config.web.clone()));
    let app = router(state.clone(), pages);
    let connections = connection_caps(&config.limits, &metrics);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let watcher = tokio::spawn(watch_policy(state.clone(), stop_rx.clone()));
    let summaries = tokio::spawn(write_refusal_summaries(audit.clone(), stop_rx.clone()));
    let sweeper = tokio::spawn(approvals.clone().run_sweeper(stop_rx.clone()));
    let key_sweeper = keys
        .clone()
        .map(|k| tokio::spawn(k.run_sweeper(stop_rx.clone())));
    // Keys from before end if the policy in force denies them.
    deploy_keys.revoke_denied(&policy.current()).await;
    let reaper = tokio::spawn(deploy_keys.run_reaper(stop_rx.clone()));
    let notifier = crate::notify::spawn(
        config.notify.clone(),
        approvals.subscribe(),
        metrics.clone(),
        edges.clock.clone(),
        stop_rx.clone(),
    )
    .map_err(|e| ServeError::Config(e.to_string()))?;
    let mut accept_tasks = Vec::new();
    for listener in listeners {
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "botcreds broker listening");
        accept_tasks.push(tokio::spawn(accept_loop(
            listener,
            app.clone(),
            connections.clone(),
            metrics.clone(),
            config.limits.clone(),
            stop_rx.clone(),
            None,
        )));
    }
    if let Some(mtls) = &mtls {
        for listener in crate::tls::listener::bind(mtls).await? {
            let addr = listener.local_addr()?;
            tracing::info!(%addr, "botcreds mTLS listening");
            accept_tasks.push(tokio::spawn(accept_loop(
                listener,
                app.clone(),
                connections.clone(),
                metrics.clone(),
                config.limits.clone(),
                stop_rx.clone(),
                Some(mtls.clone()),
            )));
        }
    }

    shutdown.await;
    tracing::info!("shutting down: draining requests");
    let _ = stop_tx.send(true);
    for t in accept_tasks {
        let _ = t.await;
    }
    // Every connection task saw the stop too and is closing gracefully.
    if tokio::time::timeout(DRAIN_TIMEOUT, connections.all_closed())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.open(),
            "some connections did not finish within {DRAIN_TIMEOUT:?}"
        );
    }
    let _ = watcher.await;
    let _ = summaries.await;
    let _ = sweeper.await;
    if let Some(t) = key_sweeper {
        let _ = t.await;
    }
    let _ = reaper.await;
    let _ = notifier.await;
    audit.shutdown();
    store.flush()?;
    tracing::info!("botcreds broker stopped");
    Ok(())
}

/// The connection caps of `[limits]`, with the total kept below the open-file limit (raised
/// to its hard limit first) so that accepting never fails for want of a descriptor.
fn connection_caps(limits: &Limits, metrics: &Metrics) -> Arc<Connections> {
    let files = raise_file_limit();
    let (total, per_peer) = caps_within(limits, files);
    match files {
        Some(files) => {
            if total < limits.max_connections {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    open_file_limit = files,
                    "limits.max_connections is above what the open-file limit allows; using {total}"
                );
            }
            tracing::info!(
                open_file_limit = files,
                max_connections = total,
                max_connections_per_peer = per_peer,
                "connection limits"
            );
        }
        None => tracing::warn!("cannot read the open-file limit"),
    }
    Connections::with_gauge(total, per_peer, metrics.connections_open())
}

/// `(max_connections, max_connections_per_peer)` within `files` open files: the total leaves
/// [`RESERVED_FILES`] free, and when that lowers it one peer gets at most half of it.
fn caps_within(limits: &Limits, files: Option<u64>) -> (usize, usize) {
    let mut total = limits.max_connections;
    let mut per_peer = limits.max_connections_per_peer;
    if let Some(files) = files {
        let room = usize::try_from(files.saturating_sub(RESERVED_FILES))
            .unwrap_or(usize::MAX)
            .max(1);
        if room < total {
            total = room;
            // One peer must not be able to take every place that is left.
            per_peer = per_peer.min((total / 2).max(1));
        }
    }
    (total, per_peer.min(total))
}

async fn accept_loop(
    listener: TcpListener,
    app: axum::Router,
    connections: Arc<Connections>,
    metrics: Metrics,
    limits: Limits,
    mut stop: tokio::sync::watch::Receiver<bool>,
    tls: Option<Arc<crate::tls::Mtls>>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(H2_KEEP_ALIVE_INTERVAL))
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT)
        .max_concurrent_streams(H2_MAX_STREAMS);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        // Over a cap: close at once (dropping the socket), before any byte is read.
        let admitted = match connections.admit(peer.ip()) {
            Ok(a) => a,
            Err(refused) => {
                tracing::debug!(%peer, limit = refused.as_str(), "connection refused");
                metrics.connection_refused(refused.metric_reason());
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok();
        let (app, builder, stop) = (app.clone(), builder.clone(), stop.clone());
        let (tls, idle_timeout, metrics) = (tls.clone(), limits.idle_timeout, metrics.clone());
        tokio::spawn(async move {
            let _admitted = admitted;
            let activity = Activity::new();
            let busy = activity.clone();
            let service = move |verified: Option<Arc<crate::tls::VerifiedPeer>>| {
                let busy = busy.clone();
                let app = app.clone();
                tower::service_fn(
                    move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                        req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                        if let Some(local) = local {
                            req.extensions_mut().insert(LocalAddr(local));
                        }
                        if let Some(v) = &verified {
                            req.extensions_mut().insert(v.clone());
                        }
                        let in_flight = busy.begin();
                        let call = app.clone().oneshot(req);
                        async move {
                            let response = call.await;
                            drop(in_flight);
                            response
                        }
                    },
                )
            };
            match tls {
                // The handshake runs in the connection's task so a slow client cannot hold
                // up the accept loop; the verified certificate rides along with every request.
                Some(tls) => {
                    let Some((stream, verified)) = tls.handshake(stream, peer).await else {
                        return;
                    };
                    let conn = builder.serve_connection(
                        TokioIo::new(stream),
                        TowerToHyperService::new(service(Some(verified))),
                    );
                    serve(conn, peer, &activity, idle_timeout, &metrics, stop).await;
                }
                None => {
                    let conn = builder.serve_connection(
                        TokioIo::new(stream),
                        TowerToHyperService::new(service(None)),
                    );
                    serve(conn, peer, &activity, idle_timeout, &metrics, stop).await;
                }
            }
        });
    }
}

/// Drive one connection until it ends, closing it gracefully when the broker stops or when no
/// request has been in flight for `idle_timeout`.
async fn serve<C>(
    conn: C,
    peer: SocketAddr,
    activity: &Activity,
    idle_timeout: Duration,
    metrics: &Metrics,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    C: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + GracefulConn,
{
    let mut conn = std::pin::pin!(conn);
    let grace = tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            return;
        }
        _ = stop.wait_for(|stopping| *stopping) => DRAIN_TIMEOUT,
        () = activity.idle(idle_timeout) => {
            tracing::debug!(%peer, "closing an idle connection");
            metrics.connection_closed_idle();
            IDLE_CLOSE_GRACE
        }
    };
    conn.as_mut().shut_down();
    match tokio::time::timeout(grace, conn).await {
        Ok(Err(e)) => tracing::debug!(error = %e, %peer, "connection ended with an error"),
        Ok(Ok(())) => {}
        Err(_) => tracing::debug!(%peer, "connection dropped after {grace:?} of closing"),
    }
}

/// hyper-util's connection types, closable through a pinned reference.
trait GracefulConn {
    fn shut_down(self: std::pin::Pin<&mut Self>);
}

impl<I, S, E> GracefulConn for auto::Connection<'_, I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: hyper::body::Body + Send + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn shut_down(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Write the summaries of ended anonymous-refusal windows once a second (the rest are written
/// at shutdown by the audit log itself).
async fn write_refusal_summaries(audit: AuditLog, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = audit.flush_refusal_summaries().await {
            tracing::error!(error = %e, "audit log write failed for refusal summaries");
        }
    }
}

/// Reload the policy on SIGHUP and when the file changes; a bad file keeps the last good policy.
async fn watch_policy(state: AppState, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reloading on file change only");
            None
        }
    };
    let mut tick = tokio::time::interval(POLICY_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            _ = stop.changed() => return,
            _ = async {
                match hangup.as_mut() {
                    Some(h) => { h.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => true,
            _ = tick.tick() => false,
        };
        if !forced && !state.policy.looks_changed() {
            continue;
        }
        // Parsing a large policy takes a while: off the runtime's workers.
        let result = state.policy.clone().reload_on_blocking_pool(forced).await;
        let now = rfc3339_millis(state.clock.now());
        let event = match result {
            Ok(Reload::Unchanged) => continue,
            Ok(Reload::Loaded { bots }) => {
                // Deny wins over earlier allows and approvals: end what the new policy denies.
                let ended = state
                    .approvals
                    .enforce_policy(&state.policy.current(), state.keys.as_deref())
                    .await;
                let keys_deleted = state
                    .issuance
                    .deploy_keys()
                    .revoke_denied(&state.policy.current())
                    .await;
                if !keys_deleted.is_empty() {
                    tracing::info!(
                        deploy_keys_deleted = keys_deleted.len(),
                        "deploy keys the reloaded policy denies were deleted"
                    );
                }
                tracing::info!(bots, credentials_revoked = ended.credentials_revoked.len(), grants_ended = ended.grants_ended.len(), requests_denied = ended.requests_denied.len(), path = %state.policy.path().display(), "policy reloaded");
                state.metrics.policy_reload(true);
                let mut e = AuditEvent::new(AuditEventKind::PolicyLoaded, now);
                e.detail = Some(format!("{bots} bots"));
                e
            }
            Err(err) => {
                tracing::error!(error = %err, "policy reload failed; keeping the last good policy");
                state.metrics.policy_reload(false);
                let mut e = AuditEvent::new(AuditEventKind::PolicyRejected, now);
                e.detail = Some(err.to_string());
                e
            }
        };
        if let Err(e) = state.audit.record(vec![event]).await {
            tracing::error!(error = %e, "audit log write failed for a policy reload");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// h2c_connection_exhaustion: at a 256 open-file limit, 300 silent connections starved
    /// everyone; now the caps stay below the limit and one peer gets at most half.
    #[test]
    fn connection_caps_fit_the_open_file_limit() {
        let limits = Limits::default();
        assert_eq!(caps_within(&limits, None), (4096, 128));
        assert_eq!(caps_within(&limits, Some(1_048_576)), (4096, 128));
        assert_eq!(caps_within(&limits, Some(256)), (128, 64));
        assert_eq!(caps_within(&limits, Some(100)), (1, 1));
        let one_peer = Limits {
            max_connections: 50,
            max_connections_per_peer: 50,
            ..Limits::default()
        };
        assert_eq!(caps_within(&one_peer, Some(1024)), (50, 50));
    }
}
