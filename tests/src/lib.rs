//! The botcreds test world: faithful doubles of the outside systems (GitHub, tailscaled, ...) that the
//! end-to-end suites start the real `botcreds` and `botcreds-agent` binaries against.
//!
//! Every double answers with the paths, status codes, headers and bodies documented in
//! `../shared/reference/` and the files under `tests/fixtures/`, so a binary that works against a
//! double works against the real service. Each double runs on its own tokio tasks, is a cheap `Clone`
//! handle, stops when the last handle drops, and has knobs to inject the failures a broker must
//! survive (outages, slow answers, error statuses, rate limits).
//!
//! - [`fake_github`]: the GitHub REST API of a GitHub App (JWT endpoints, installation tokens).
//! - [`fake_litellm`]: LiteLLM's virtual-key management API and a chat endpoint (plus Coder's `users/me`).
//! - [`fake_tailscaled`]: tailscaled's LocalAPI `whois` on a Unix socket.
//! - [`webhook_sink`]: a webhook receiver that verifies the broker's signatures; [`webdriver`]:
//!   a WebDriver client for Chromium.
//! - [`fixtures`]: paths and loaders for `tests/fixtures/**`, the test app key, JWT signing.
//! - [`world`]: the world the suites start (doubles + a broker, real or [`inprocess`]) and their
//!   shared helpers.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: a double or launcher that cannot do its job fails the test using it"
)]
// The repository objects GitHub returns have ~90 fields; `serde_json::json!` recurses per field.
#![recursion_limit = "256"]

pub mod agent;
pub mod broker;
pub mod fake_github;
pub mod fake_litellm;
pub mod fake_tailscaled;
pub mod fixtures;
pub mod git_server;
pub mod inprocess;
pub mod scenes;
pub mod webdriver;
pub mod webhook_sink;
pub mod world;

/// A hyper HTTP/1.1 server for an axum router that can be switched off and on again, so doubles
/// can simulate an outage: while down, the listener is closed (new connections are refused, or
/// fail with `ENOENT` on a Unix socket) and every open connection is dropped mid-stream.
pub(crate) mod switchable {
    use std::convert::Infallible;
    use std::io;
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::sync::Mutex;

    use axum::Router;
    use axum::extract::Request;
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncRead, AsyncWrite};
    use tokio::net::{TcpListener, TcpSocket, UnixListener};
    use tokio::sync::watch;
    use tokio::task::JoinHandle;
    use tower::ServiceExt;

    /// Where a server listens; kept so the same address can be bound again after an outage.
    #[derive(Clone, Debug)]
    pub(crate) enum Endpoint {
        Tcp(SocketAddr),
        Unix(PathBuf),
    }

    enum Listener {
        Tcp(TcpListener),
        Unix(UnixListener),
    }

    impl Endpoint {
        /// Binds the endpoint. TCP uses `SO_REUSEADDR` so a port can be bound again right after
        /// an outage; a Unix socket replaces a stale socket file and is made world-connectable
        /// (`0666`) like tailscaled's.
        fn bind(&self) -> io::Result<Listener> {
            match self {
                Endpoint::Tcp(addr) => {
                    let socket = if addr.is_ipv4() {
                        TcpSocket::new_v4()?
                    } else {
                        TcpSocket::new_v6()?
                    };
                    socket.set_reuseaddr(true)?;
                    socket.bind(*addr)?;
                    Ok(Listener::Tcp(socket.listen(1024)?))
                }
                Endpoint::Unix(path) => {
                    match std::fs::remove_file(path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                    let listener = UnixListener::bind(path)?;
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
                    Ok(Listener::Unix(listener))
                }
            }
        }

        /// What remains of a listener after it closed: a Unix socket file must go, or clients
        /// would see `ECONNREFUSED` instead of the `ENOENT` of a daemon that is not running.
        fn cleanup(&self) {
            if let Endpoint::Unix(path) = self {
                // Already gone is fine: the outcome wanted is "no socket file".
                let _ = std::fs::remove_file(path);
            }
        }
    }

    struct Running {
        stop: watch::Sender<bool>,
        task: JoinHandle<()>,
    }

    /// A bound TCP listener waiting for its router.
    pub(crate) struct BoundTcp {
        listener: TcpListener,
        local: SocketAddr,
    }

    impl BoundTcp {
        /// The address actually bound.
        pub(crate) fn local_addr(&self) -> SocketAddr {
            self.local
        }

        /// Starts serving `router`.
        pub(crate) fn serve(self, router: Router) -> SwitchableServer {
            let server = SwitchableServer {
                endpoint: Endpoint::Tcp(self.local),
                router,
                running: Mutex::new(None),
            };
            server.serve(Listener::Tcp(self.listener));
            server
        }
    }

    /// The server. Dropping it stops accepting and drops all open connections.
    pub(crate) struct SwitchableServer {
        endpoint: Endpoint,
        router: Router,
        running: Mutex<Option<Running>>,
    }

    impl SwitchableServer {
        /// Binds a TCP listener on `addr` (port 0 picks a free port) without serving yet, so the
        /// caller can learn the address before building its router.
        pub(crate) fn bind_tcp(addr: SocketAddr) -> io::Result<BoundTcp> {
            let Listener::Tcp(listener) = Endpoint::Tcp(addr).bind()? else {
                unreachable!("a TCP endpoint binds a TCP listener")
            };
            let local = listener.local_addr()?;
            Ok(BoundTcp { listener, local })
        }

        /// Binds a Unix socket at `path` and starts serving.
        pub(crate) fn start_unix(path: PathBuf, router: Router) -> io::Result<Self> {
            let endpoint = Endpoint::Unix(path);
            let listener = endpoint.bind()?;
            let server = Self {
                endpoint,
                router,
                running: Mutex::new(None),
            };
            server.serve(listener);
            Ok(server)
        }

        fn serve(&self, listener: Listener) {
            let (stop, stopped) = watch::channel(false);
            let task = tokio::spawn(accept_loop(listener, self.router.clone(), stopped));
            let previous = self
                .running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .replace(Running { stop, task });
            if let Some(previous) = previous {
                previous.stop.send_replace(true);
                previous.task.abort();
            }
        }

        /// Takes the server down (`true`) or brings it back on the same address (`false`).
        /// Returns once the change is in effect: after `set_down(true)` the listener is closed
        /// and open connections are dropped; after `set_down(false)` new connections succeed.
        pub(crate) async fn set_down(&self, down: bool) -> io::Result<()> {
            if down {
                let running = self
                    .running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                if let Some(running) = running {
                    running.stop.send_replace(true);
                    // The accept loop owns the listener; it is closed when the task has ended.
                    let _ = running.task.await;
                }
                self.endpoint.cleanup();
                Ok(())
            } else {
                let is_up = self
                    .running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_some();
                if !is_up {
                    self.serve(self.endpoint.bind()?);
                }
                Ok(())
            }
        }
    }

    impl Drop for SwitchableServer {
        fn drop(&mut self) {
            let running = self
                .running
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(running) = running {
                running.stop.send_replace(true);
                running.task.abort();
            }
            self.endpoint.cleanup();
        }
    }

    async fn accept_loop(listener: Listener, router: Router, mut stopped: watch::Receiver<bool>) {
        let for_connections = stopped.clone();
        loop {
            let accepted = tokio::select! {
                biased;
                _ = stopped.wait_for(|stop| *stop) => return,
                accepted = accept(&listener) => accepted,
            };
            match accepted {
                Ok(Conn::Tcp(stream)) => {
                    tokio::spawn(serve_connection(
                        stream,
                        router.clone(),
                        for_connections.clone(),
                    ));
                }
                Ok(Conn::Unix(stream)) => {
                    tokio::spawn(serve_connection(
                        stream,
                        router.clone(),
                        for_connections.clone(),
                    ));
                }
                Err(e) => tracing::debug!(error = %e, "test double: accept failed"),
            }
        }
    }

    enum Conn {
        Tcp(tokio::net::TcpStream),
        Unix(tokio::net::UnixStream),
    }

    async fn accept(listener: &Listener) -> io::Result<Conn> {
        match listener {
            Listener::Tcp(l) => l.accept().await.map(|(s, _)| Conn::Tcp(s)),
            Listener::Unix(l) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
        }
    }

    async fn serve_connection<IO>(io: IO, router: Router, mut stopped: watch::Receiver<bool>)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let router = router.clone();
            async move { Ok::<_, Infallible>(router.oneshot(req).await.unwrap_or_else(|e| match e {})) }
        });
        let connection =
            hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), service);
        tokio::select! {
            result = connection => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "test double: connection ended with an error");
                }
            }
            // Dropping the connection future closes the socket: the peer sees the outage.
            _ = stopped.wait_for(|stop| *stop) => {}
        }
    }
}
