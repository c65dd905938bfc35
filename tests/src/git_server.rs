//! A git smart-HTTP server for end-to-end tests: the real `git http-backend` (CGI) behind a small
//! axum server on 127.0.0.1, serving bare repositories from a temp dir. Like GitHub it demands
//! HTTP Basic auth, and a caller-supplied check decides whether the password (a token) may read
//! a repository (fetch, clone) or write it (push).
//!
//! Answers as GitHub does: no or unknown credentials → `401` with
//! `WWW-Authenticate: Basic realm="GitHub"` (git then runs `erase` and may ask again); a token
//! that may read but not write, on a push → `403` (git does not erase on a 403).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use tempfile::TempDir;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Decides whether `token` may access `owner/repo` (lower-case, without `.git`); `write` is true
/// for a push.
pub type TokenCheck = Arc<dyn Fn(&str, &str, bool) -> bool + Send + Sync>;

/// Largest request body (a push) the server reads.
const MAX_BODY_BYTES: usize = 64 << 20;

/// A running git server; stops when dropped.
pub struct GitServer {
    addr: SocketAddr,
    root: TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

struct ServerState {
    root: PathBuf,
    check: TokenCheck,
}

impl GitServer {
    /// Starts a server on 127.0.0.1 with an ephemeral port and an empty repository root.
    pub async fn start(check: TokenCheck) -> std::io::Result<GitServer> {
        let root = tempfile::tempdir()?;
        let state = Arc::new(ServerState {
            root: root.path().to_path_buf(),
            check,
        });
        let app = Router::new().fallback(handle).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(GitServer {
            addr,
            root,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// The host as git names it in a credential request: `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The clone URL of `owner/repo`.
    pub fn url(&self, repo: &str) -> String {
        format!("http://{}/{repo}.git", self.addr)
    }

    /// Where the bare repositories live (`<root>/<owner>/<repo>.git`).
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Creates the bare repository `owner/repo` with one commit on `main` (a `README.md`), and
    /// returns its path.
    pub fn create_repo(&self, repo: &str) -> std::io::Result<PathBuf> {
        let path = self.repo_path(repo);
        std::fs::create_dir_all(&path)?;
        git(
            &path,
            &["init", "--quiet", "--bare", "--initial-branch=main"],
            None,
        )?;
        git(&path, &["config", "http.receivepack", "true"], None)?;
        let blob = git(
            &path,
            &["hash-object", "-w", "--stdin"],
            Some(format!("# {repo}\n").as_bytes()),
        )?;
        let tree = git(
            &path,
            &["mktree"],
            Some(format!("100644 blob {blob}\tREADME.md\n").as_bytes()),
        )?;
        let commit = git(&path, &["commit-tree", &tree, "-m", "initial commit"], None)?;
        git(&path, &["update-ref", "refs/heads/main", &commit], None)?;
        Ok(path)
    }

    /// The commit `branch` of `owner/repo` points at, to check what a push did.
    pub fn head(&self, repo: &str, branch: &str) -> std::io::Result<String> {
        git(
            &self.repo_path(repo),
            &["rev-parse", &format!("refs/heads/{branch}")],
            None,
        )
    }

    fn repo_path(&self, repo: &str) -> PathBuf {
        self.root.path().join(format!("{repo}.git"))
    }

    /// Stops serving and waits for the server task.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Runs a git plumbing command in `dir` with no user or system configuration; trimmed stdout.
fn git(dir: &Path, args: &[&str], stdin: Option<&[u8]>) -> std::io::Result<String> {
    use std::io::Write;
    let mut child = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "botcreds tests")
        .env("GIT_AUTHOR_EMAIL", "tests@botcreds.invalid")
        .env("GIT_COMMITTER_NAME", "botcreds tests")
        .env("GIT_COMMITTER_EMAIL", "tests@botcreds.invalid")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input)?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn status_only(status: StatusCode, message: &str) -> Response {
    (status, message.to_string()).into_response()
}

fn unauthorized() -> Response {
    let mut r = status_only(StatusCode::UNAUTHORIZED, "Invalid username or token.\n");
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"GitHub\""),
    );
    r
}

/// `(user, password)` of an `Authorization: Basic` header.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// `/owner/repo[.git]/rest` → (`owner/repo`, `rest`).
fn split_path(path: &str) -> Option<(String, String)> {
    let mut parts = path.trim_start_matches('/').splitn(3, '/');
    let owner = parts.next().filter(|s| !s.is_empty())?;
    let name = parts.next().filter(|s| !s.is_empty())?;
    let rest = parts.next().unwrap_or_default();
    let name = name.strip_suffix(".git").unwrap_or(name);
    let ok = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s != ".."
            && s != "."
    };
    if !ok(owner) || !ok(name) {
        return None;
    }
    Some((
        format!("{owner}/{name}").to_ascii_lowercase(),
        rest.to_string(),
    ))
}

async fn handle(State(state): State<Arc<ServerState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Some((repo, rest)) = split_path(parts.uri.path()) else {
        return status_only(StatusCode::NOT_FOUND, "Not Found\n");
    };
    let query = parts.uri.query().unwrap_or_default().to_string();
    let write = rest == "git-receive-pack"
        || (rest == "info/refs" && query.contains("service=git-receive-pack"));
    let Some((user, token)) = basic_credentials(&parts.headers) else {
        return unauthorized();
    };
    if !(state.check)(&token, &repo, write) {
        // A token that may read but not write gets GitHub's 403, so git does not erase it.
        if write && (state.check)(&token, &repo, false) {
            return status_only(
                StatusCode::FORBIDDEN,
                &format!("Permission to {repo}.git denied to {user}.\n"),
            );
        }
        return unauthorized();
    }
    let body = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => return status_only(StatusCode::PAYLOAD_TOO_LARGE, "request too large\n"),
    };
    match run_backend(&state.root, &parts, &repo, &rest, &query, &user, &body).await {
        Ok(response) => response,
        Err(e) => status_only(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("git http-backend: {e}\n"),
        ),
    }
}

async fn run_backend(
    root: &Path,
    parts: &axum::http::request::Parts,
    repo: &str,
    rest: &str,
    query: &str,
    user: &str,
    body: &[u8],
) -> std::io::Result<Response> {
    let header = |name: &HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("REQUEST_METHOD", parts.method.as_str())
        // The repository is always `<owner>/<repo>.git` on disk, with or without `.git` in the URL.
        .env("PATH_INFO", format!("/{repo}.git/{rest}"))
        .env("QUERY_STRING", query)
        .env("CONTENT_TYPE", header(&header::CONTENT_TYPE))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("REMOTE_USER", user)
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let encoding = header(&header::CONTENT_ENCODING);
    if !encoding.is_empty() {
        cmd.env("HTTP_CONTENT_ENCODING", encoding);
    }
    let protocol = header(&HeaderName::from_static("git-protocol"));
    if !protocol.is_empty() {
        cmd.env("HTTP_GIT_PROTOCOL", protocol);
    }
    let mut child = cmd.spawn()?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| std::io::Error::other("no stdin"))?;
    let input = body.to_vec();
    // Feed the body while the backend writes its answer, so neither side fills a pipe and waits.
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&input).await;
    });
    let output = child.wait_with_output().await?;
    let _ = writer.await;
    parse_cgi(&output.stdout).ok_or_else(|| {
        std::io::Error::other(format!(
            "unparseable CGI answer; stderr: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    })
}

/// A CGI answer: header lines (with an optional `Status:`), a blank line, the body.
fn parse_cgi(out: &[u8]) -> Option<Response> {
    let (head_len, sep_len) = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4))
        .or_else(|| out.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2)))?;
    let head = std::str::from_utf8(&out[..head_len]).ok()?;
    let mut response = Response::new(Body::from(out[head_len + sep_len..].to_vec()));
    for line in head.lines() {
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split(' ').next()?.parse().ok()?;
            *response.status_mut() = StatusCode::from_u16(code).ok()?;
        } else {
            response.headers_mut().append(
                HeaderName::from_bytes(name.trim().as_bytes()).ok()?,
                HeaderValue::from_str(value).ok()?,
            );
        }
    }
    Some(response)
}
