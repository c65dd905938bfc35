//! The agent's local API: HTTP/1.1 on a unix socket of mode 0660, with each connection's peer
//! (SO_PEERCRED) checked against the allow-list before any handler runs.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::IncomingStream;
use botcreds_proto::MAX_BODY_BYTES;
use botcreds_proto::agent::{
    AgentStatus, CredentialState, GIT_ERASE_PATH, GIT_GET_PATH, QUIT_HEADER, STATUS_PATH,
};
use botcreds_proto::git_credential::{self, Description};
use tokio::net::UnixListener;

use crate::config::Config;
use crate::credentials::{Credentials, GitAnswer, rfc3339, unix_seconds};
use crate::peer::AllowList;

/// The user and group of the process at the other end of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// `(uid, gid)`; `None` if the kernel would not say (then the peer is refused).
    pub ids: Option<(u32, u32)>,
    pub pid: Option<i32>,
}

impl Connected<IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Peer {
        match stream.io().peer_cred() {
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

/// Binds the socket: creates its directory if needed, replaces a stale socket file (but not a
/// live agent's, nor a file that is not a socket), mode 0660, group `group` if given.
pub fn bind(path: &Path, group: Option<u32>) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)?;
    }
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
    // Bind with a umask that already gives 0660, so there is no moment at which the socket is
    // open to everyone; chmod afterwards in case the umask was stricter.
    // SAFETY: umask has no preconditions; this runs before the agent starts other threads
    // that create files.
    let old = unsafe { libc::umask(0o117) };
    let listener = UnixListener::bind(path);
    unsafe { libc::umask(old) };
    let listener = listener?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Some(gid) = group {
        let cpath = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "socket path contains NUL"))?;
        // SAFETY: cpath is a valid C string; uid -1 leaves the owner unchanged.
        if unsafe { libc::chown(cpath.as_ptr(), u32::MAX, gid) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(listener)
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
            text(
                StatusCode::FORBIDDEN,
                format!(
                    "botcreds: uid {uid} (gid {gid}) may not use this agent; add the user to allow_users, \
                     allow_uids or allow_groups in agent.toml"
                ),
            )
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
