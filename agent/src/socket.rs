//! The agent's local API: HTTP/1.1 on a unix socket of mode 0660 in a directory only the
//! agent's user or root can change, with each connection's peer (SO_PEERCRED) checked against
//! the allow-list the moment it is accepted ([`serve`]: refused peers are answered and closed
//! at once, connections are capped per uid and in total, and time-limited), and again by a
//! middleware before any handler runs.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use botcreds_proto::MAX_BODY_BYTES;
use botcreds_proto::agent::{
    AgentStatus, CredentialState, GIT_ERASE_PATH, GIT_GET_PATH, QUIT_HEADER, STATUS_PATH,
};
use botcreds_proto::git_credential::{self, Description};
use hyper::body::Incoming;
use tokio::net::UnixListener;

use crate::config::Config;
use crate::credentials::{Credentials, GitAnswer, rfc3339, unix_seconds};
use crate::peer::AllowList;

/// The user and group of the process at the other end of a connection, given to handlers as
/// `ConnectInfo<Peer>`.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// `(uid, gid)`; `None` if the kernel would not say (then the peer is refused).
    pub ids: Option<(u32, u32)>,
    pub pid: Option<i32>,
}

impl Peer {
    /// The peer of an accepted connection (`SO_PEERCRED`).
    fn of(stream: &tokio::net::UnixStream) -> Peer {
        match stream.peer_cred() {
            Ok(cred) => Peer {
                ids: Some((cred.uid(), cred.gid())),
                pid: cred.pid(),
            },
            Err(_) => Peer {
                ids: None,
                pid: None,
            },
        }
    }
}

/// Checks that only the agent's user (`uid`) or root can change `dir`, the socket's directory,
/// and each directory above it: otherwise another user could swap the socket file (for a
/// symlink while it is set up, or for their own socket while it is served). The socket's own
/// directory must be a real directory owned by `uid` or root and not writable by group or
/// others; an ancestor may be writable by others only with the sticky bit (`/tmp`), which
/// stops them from renaming what they do not own.
pub fn check_socket_dir(dir: &Path, uid: u32) -> io::Result<()> {
    let refuse = |what: &Path, why: String| {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{}: {why}; refusing to serve the socket there (another user could replace it)",
                what.display()
            ),
        )
    };
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.file_type().is_symlink() {
        return Err(refuse(dir, "is a symbolic link".into()));
    }
    if !meta.is_dir() {
        return Err(refuse(dir, "is not a directory".into()));
    }
    let owner_ok = |owner: u32| owner == uid || owner == 0;
    if !owner_ok(meta.uid()) {
        return Err(refuse(
            dir,
            format!(
                "belongs to uid {}, not to the agent's uid {uid} or root",
                meta.uid()
            ),
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(refuse(
            dir,
            format!(
                "has mode {:o}, writable by group or others",
                meta.mode() & 0o7777
            ),
        ));
    }
    for ancestor in dir.ancestors().skip(1) {
        let meta = std::fs::metadata(ancestor)?;
        if !owner_ok(meta.uid()) {
            return Err(refuse(
                ancestor,
                format!(
                    "belongs to uid {}, not to the agent's uid {uid} or root",
                    meta.uid()
                ),
            ));
        }
        if meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0 {
            return Err(refuse(
                ancestor,
                format!(
                    "has mode {:o}, writable by group or others without the sticky bit",
                    meta.mode() & 0o7777
                ),
            ));
        }
    }
    Ok(())
}

/// Binds the socket: creates its directory if needed (0755) and checks it
/// ([`check_socket_dir`]), replaces a stale socket file (but not a live agent's, nor a file
/// that is not a socket), mode 0660, group `group` if given.
///
/// The socket is bound, chmod-ed and chown-ed inside a fresh private (0700) directory and only
/// then renamed into place, so the mode and group are never set through a path someone else
/// could have swapped (`fchmod`/`fchown` on a unix socket's fd do not change the file).
pub fn bind(path: &Path, group: Option<u32>) -> io::Result<UnixListener> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "the socket path has no directory",
            )
        })?;
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the socket path has no file name",
        )
    })?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)?;
    check_socket_dir(dir, rustix::process::geteuid().as_raw())?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "another agent is already listening on this socket",
                    ));
                }
                Err(_) => std::fs::remove_file(path)?,
            }
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket; refusing to replace it",
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let private = PrivateDir::new(dir, name)?;
    let staged = private.path.join(name);
    // Bind with a umask that already gives 0660, so there is no moment at which the socket is
    // open to everyone; chmod afterwards in case the umask was stricter.
    // This runs before the agent starts other threads that create files.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o117));
    let listener = UnixListener::bind(&staged);
    rustix::process::umask(old);
    let listener = listener?;
    // Inside our own 0700 directory: nobody else can have swapped `staged`.
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o660))?;
    if let Some(gid) = group {
        std::os::unix::fs::lchown(&staged, None, Some(gid))?;
    }
    std::fs::rename(&staged, path)?;
    Ok(listener)
}

/// A fresh 0700 directory next to the socket, removed (with what is left in it) on drop.
struct PrivateDir {
    path: std::path::PathBuf,
}

impl PrivateDir {
    fn new(dir: &Path, name: &std::ffi::OsStr) -> io::Result<PrivateDir> {
        let mut template = dir
            .join(format!(".{}-XXXXXX", name.to_string_lossy()))
            .into_os_string()
            .into_vec();
        template.push(0);
        // No safe wrapper offers mkdtemp (rustix does not), and its 0700 directory with a
        // random name made in one step is what this needs.
        // SAFETY: template is a NUL-terminated buffer mkdtemp rewrites in place.
        #[allow(unsafe_code)]
        let made = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
        if made.is_null() {
            return Err(io::Error::last_os_error());
        }
        template.pop();
        Ok(PrivateDir {
            path: std::ffi::OsString::from_vec(template).into(),
        })
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Bound on reading a request's header once a connection is accepted.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection's whole life beyond the time a git request may wait for the broker
/// (`helper_timeout`): enough for a body and the answer, not for holding a descriptor.
pub const CONNECTION_GRACE: Duration = Duration::from_secs(20);
/// Pause after `accept` fails (out of descriptors), so that a full table is not a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one log line per refused uid in this long.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// How the accept loop treats connections: who may connect, how many at once, how long.
#[derive(Debug, Clone)]
pub struct ServeLimits {
    pub allow: AllowList,
    /// Open connections of all users (root and the agent's own user are not counted).
    pub connections: usize,
    /// Open connections of one uid.
    pub connections_per_user: usize,
    /// The longest a connection may stay open.
    pub lifetime: Duration,
}

/// Open connections per uid; a [`ConnectionSlot`] gives its place back when dropped.
#[derive(Default)]
struct Counts {
    total: usize,
    per_uid: HashMap<u32, usize>,
}

struct ConnectionSlot {
    counts: Arc<Mutex<Counts>>,
    uid: u32,
    counted_in_total: bool,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if self.counted_in_total {
            c.total -= 1;
        }
        if let Some(n) = c.per_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                c.per_uid.remove(&self.uid);
            }
        }
    }
}

/// Serves `app` on `listener` until `stop` resolves, then waits for open connections.
///
/// Each connection's peer is checked (`SO_PEERCRED`) the moment it is accepted: a user not in
/// the allow-list, or one over its share of connections, gets a one-line answer and the
/// connection is closed at once — a socket-group member must not be able to hold descriptors.
/// Allowed connections get [`HEADER_READ_TIMEOUT`], no keep-alive (the helper sends one
/// request per connection) and at most `limits.lifetime`.
pub async fn serve(
    listener: UnixListener,
    app: Router,
    limits: ServeLimits,
    stop: impl Future<Output = ()>,
) -> io::Result<()> {
    let own_uid = rustix::process::geteuid().as_raw();
    let counts = Arc::new(Mutex::new(Counts::default()));
    let mut refusals_logged: HashMap<u32, Instant> = HashMap::new();
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    loop {
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
        let (stream, _) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a connection on the socket");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let peer = Peer::of(&stream);
        let Some((uid, _)) = peer.ids.filter(|(u, g)| limits.allow.allows(*u, *g)) else {
            let message = match peer.ids {
                Some((uid, gid)) => {
                    let now = Instant::now();
                    let log = refusals_logged
                        .get(&uid)
                        .is_none_or(|at| now.duration_since(*at) >= REFUSAL_LOG_INTERVAL);
                    if log {
                        refusals_logged.insert(uid, now);
                        tracing::warn!(uid, gid, pid = ?peer.pid, "refused a local user not in the allow-list");
                    }
                    refused_message(uid, gid)
                }
                None => {
                    "botcreds: the agent could not tell which user is connecting; refused".into()
                }
            };
            answer_and_close(stream, StatusCode::FORBIDDEN, &message);
            continue;
        };
        let trusted = uid == 0 || uid == own_uid;
        let slot = {
            let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
            let mine = c.per_uid.get(&uid).copied().unwrap_or(0);
            if mine >= limits.connections_per_user || (!trusted && c.total >= limits.connections) {
                None
            } else {
                *c.per_uid.entry(uid).or_default() += 1;
                if !trusted {
                    c.total += 1;
                }
                Some(ConnectionSlot {
                    counts: counts.clone(),
                    uid,
                    counted_in_total: !trusted,
                })
            }
        };
        let Some(slot) = slot else {
            answer_and_close(
                stream,
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "botcreds: too many open connections to the agent (uid {uid}; limits.connections_per_user \
                     and limits.connections in agent.toml); try again"
                ),
            );
            continue;
        };
        let app = app.clone();
        let lifetime = limits.lifetime;
        connections.spawn(async move {
            let _slot = slot;
            let service = hyper_util::service::TowerToHyperService::new(
                tower::ServiceExt::map_request(app, move |mut request: Request<Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
                    request
                }),
            );
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            match tokio::time::timeout(lifetime, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(uid, error = %e, "connection ended with an error"),
                Err(_) => tracing::debug!(uid, "connection open too long; closed"),
            }
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}

fn refused_message(uid: u32, gid: u32) -> String {
    format!(
        "botcreds: uid {uid} (gid {gid}) may not use this agent; add the user to allow_users, \
         allow_uids or allow_groups in agent.toml"
    )
}

/// Writes a whole HTTP answer if the socket takes it at once (a fresh connection's buffer
/// always does), reads what the client already sent (so that closing does not reset the
/// connection under its reader), and closes. Never waits.
fn answer_and_close(stream: tokio::net::UnixStream, status: StatusCode, message: &str) {
    let body = format!("{message}\n");
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    let _ = stream.try_write(format!("{head}{body}").as_bytes());
    let mut sink = [0u8; 4096];
    while matches!(stream.try_read(&mut sink), Ok(n) if n > 0) {}
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub credentials: Credentials,
    pub config: Arc<Config>,
    pub auth: String,
}

/// The local API's routes, each behind the peer check.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(GIT_GET_PATH, post(git_get))
        .route(GIT_ERASE_PATH, post(git_erase))
        .route(STATUS_PATH, get(status))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            state.config.allow.clone(),
            check_peer,
        ))
        .with_state(state)
}

/// Lets only the allow-listed local users through (`SO_PEERCRED` of the connection).
pub(crate) async fn check_peer(
    State(allow): State<AllowList>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    request: Request,
    next: Next,
) -> Response {
    match peer.ids {
        Some((uid, gid)) if allow.allows(uid, gid) => next.run(request).await,
        Some((uid, gid)) => {
            tracing::warn!(uid, gid, pid = ?peer.pid, path = %request.uri().path(), "refused a local user not in the allow-list");
            text(StatusCode::FORBIDDEN, refused_message(uid, gid))
        }
        None => text(
            StatusCode::FORBIDDEN,
            "botcreds: the agent could not tell which user is connecting; refused".into(),
        ),
    }
}

fn text(status: StatusCode, mut message: String) -> Response {
    if !message.ends_with('\n') {
        message.push('\n');
    }
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message,
    )
        .into_response()
}

fn parse_description(body: &[u8]) -> Result<Description, String> {
    git_credential::parse(body).map_err(|e| format!("botcreds: garbled credential request: {e}"))
}

async fn git_get(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    body: Bytes,
) -> Response {
    let request = match parse_description(&body) {
        Ok(d) => d,
        Err(message) => return text(StatusCode::BAD_REQUEST, message),
    };
    // check_peer let only known peers through.
    let Some((uid, _)) = peer.ids else {
        return StatusCode::FORBIDDEN.into_response();
    };
    match state.credentials.git_get(&request, uid).await {
        GitAnswer::Credential { token, expires_at } => {
            let answer = Description {
                username: Some("x-access-token".into()),
                password: Some(token.expose().to_string()),
                password_expiry_utc: Some(unix_seconds(expires_at)),
                ..Description::default()
            };
            match answer.encode() {
                Ok(bytes) => (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                    bytes,
                )
                    .into_response(),
                Err(e) => text(
                    StatusCode::BAD_GATEWAY,
                    format!("botcreds: the broker's token cannot be given to git: {e}"),
                ),
            }
        }
        GitAnswer::NotServed => StatusCode::NO_CONTENT.into_response(),
        GitAnswer::Refused {
            status,
            message,
            quit,
        } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut response = text(status, message);
            if quit {
                response
                    .headers_mut()
                    .insert(QUIT_HEADER, HeaderValue::from_static("1"));
            }
            response
        }
    }
}

async fn git_erase(State(state): State<AppState>, body: Bytes) -> Response {
    let request = match parse_description(&body) {
        Ok(d) => d,
        Err(message) => return text(StatusCode::BAD_REQUEST, message),
    };
    match state.credentials.git_erase(&request).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(message) => text(StatusCode::BAD_REQUEST, message),
    }
}

async fn status(State(state): State<AppState>) -> Response {
    let probe = state.credentials.broker().probe().await;
    let credentials = state.credentials.status();
    let body = AgentStatus {
        version: env!("CARGO_PKG_VERSION").into(),
        broker: state.config.broker.clone(),
        auth: state.auth.clone(),
        socket: state.config.socket.display().to_string(),
        broker_reachable: probe.is_ok(),
        broker_probe_error: probe.err(),
        broker_last_contact: state.credentials.last_contact().map(rfc3339),
        serving_from_cache: credentials
            .iter()
            .any(|c| c.state == CredentialState::ServingFromCache),
        credentials,
    };
    axum::Json(body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bind_sets_mode_and_refuses_to_clobber() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("run/agent.sock");
        let listener = bind(&path, None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);

        let err = bind(&path, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");

        drop(listener);
        // The file stays behind (a crash); a new agent replaces it.
        assert!(path.exists());
        bind(&path, None).unwrap();

        let plain = tmp.path().join("plain");
        std::fs::write(&plain, "x").unwrap();
        assert_eq!(
            bind(&plain, None).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(std::fs::read_to_string(&plain).unwrap(), "x");
    }
}

#[cfg(test)]
mod dir_tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// Another user who can write the socket's directory can swap the socket (for a symlink
    /// while the agent sets it up, or for their own socket while it serves): the agent refuses
    /// to bind there, and leaves nothing behind.
    #[tokio::test]
    async fn socket_directory_writable_by_others_is_refused() {
        let cases: [(&str, u32, u32, bool); 6] = [
            // (what, socket dir mode, parent mode, accepted)
            ("private directory", 0o755, 0o700, true),
            ("parent sticky and world-writable", 0o755, 0o1777, true),
            ("world-writable", 0o777, 0o700, false),
            ("group-writable", 0o775, 0o700, false),
            ("sticky world-writable", 0o1777, 0o700, false),
            ("parent world-writable", 0o755, 0o777, false),
        ];
        for (what, mode, parent_mode, accepted) in cases {
            let tmp = tempfile::tempdir().unwrap();
            let parent = tmp.path().join("p");
            let dir = parent.join("run");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
            std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(parent_mode))
                .unwrap();
            let path = dir.join("agent.sock");
            let got = bind(&path, None);
            if accepted {
                got.unwrap_or_else(|e| panic!("{what}: {e}"));
                let meta = std::fs::symlink_metadata(&path).unwrap();
                assert!(meta.file_type().is_socket(), "{what}");
                assert_eq!(meta.mode() & 0o777, 0o660, "{what}");
            } else {
                let err = got.err().unwrap_or_else(|| panic!("{what}: accepted"));
                assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{what}: {err}");
                assert!(
                    err.to_string().contains("writable by group or others"),
                    "{what}: {err}"
                );
                assert!(!path.exists(), "{what}: a socket was made");
            }
            let names: Vec<_> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .filter(|n| n != "agent.sock")
                .collect();
            assert!(names.is_empty(), "{what}: left behind {names:?}");
        }
        // A directory (or an ancestor) of another user, who could rename things in it.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        let me = rustix::process::geteuid().as_raw();
        let stranger = if me == 0 { 4242 } else { me + 1 };
        if me == 0 {
            std::os::unix::fs::chown(&dir, Some(stranger), None).unwrap();
            let err = check_socket_dir(&dir, me).unwrap_err().to_string();
            assert!(err.contains(&format!("belongs to uid {stranger}")), "{err}");
        }
        // Seen from an agent running as another (non-root) user, our directory is foreign.
        let agent = if me == 0 { 4243 } else { stranger };
        let owner = std::fs::metadata(&dir).unwrap().uid();
        let err = check_socket_dir(&dir, agent).unwrap_err().to_string();
        assert!(err.contains(&format!("belongs to uid {owner}")), "{err}");
        // A symlinked socket directory is not followed.
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("real")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("real"), tmp.path().join("link")).unwrap();
        let err =
            bind(&tmp.path().join("link/agent.sock"), None).expect_err("symlinked dir accepted");
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
    }
}
