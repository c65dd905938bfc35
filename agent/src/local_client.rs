//! A minimal blocking HTTP/1.1 client for the agent's unix socket, std and libc only: the git
//! helper starts in a millisecond and waits a bounded time, with no async runtime to set up.
//! It talks only to a server that is the agent ([`check_server`], `SO_PEERCRED`).

use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Instant;

/// Largest answer read from the agent.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// An HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug)]
pub enum ClientError {
    /// No agent listens there (no socket file, or nobody accepting).
    NotRunning(io::Error),
    /// The socket exists but this user may not open it.
    PermissionDenied(io::Error),
    /// The deadline passed.
    TimedOut,
    /// The process serving the socket is not the agent ([`check_server`]).
    Untrusted(String),
    Io(io::Error),
    BadResponse(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::NotRunning(e) => write!(f, "the agent is not running ({e})"),
            ClientError::PermissionDenied(e) => write!(f, "{e}"),
            ClientError::TimedOut => f.write_str("timed out"),
            ClientError::Untrusted(m) => f.write_str(m),
            ClientError::Io(e) => write!(f, "{e}"),
            ClientError::BadResponse(m) => write!(f, "unexpected answer: {m}"),
        }
    }
}

impl std::error::Error for ClientError {}

fn io_error(e: io::Error) -> ClientError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::TimedOut,
        _ => ClientError::Io(e),
    }
}

/// Whether the process serving `socket` as `server_uid` may be taken for the agent: root, or
/// the owner of the socket's directory when that directory is not writable by group or others
/// and sits in a directory owned by root or that user and not writable by group or others
/// either (as `/run/botcreds` in `/run`, made by systemd's `RuntimeDirectory=` for an agent
/// running as its own user). Anyone else could only have put their socket there by replacing
/// the agent's: git's `erase` would hand them the token, and their `get` answer would be used.
pub fn check_server(socket: &Path, server_uid: u32) -> Result<(), String> {
    if server_uid == 0 {
        return Ok(());
    }
    let refuse = |why: String| {
        format!(
            "the socket {} is served by uid {server_uid}, not by root nor by the owner of a socket \
             directory only they can change ({why}); refusing to talk to it",
            socket.display()
        )
    };
    let dir = socket
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = std::fs::canonicalize(dir).map_err(|e| refuse(format!("{}: {e}", dir.display())))?;
    let meta = std::fs::metadata(&dir).map_err(|e| refuse(format!("{}: {e}", dir.display())))?;
    if meta.uid() != server_uid {
        return Err(refuse(format!(
            "{} belongs to uid {}",
            dir.display(),
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(refuse(format!(
            "{} has mode {:o}",
            dir.display(),
            meta.mode() & 0o7777
        )));
    }
    if let Some(parent) = dir.parent() {
        let meta =
            std::fs::metadata(parent).map_err(|e| refuse(format!("{}: {e}", parent.display())))?;
        if meta.uid() != 0 && meta.uid() != server_uid {
            return Err(refuse(format!(
                "{} belongs to uid {}",
                parent.display(),
                meta.uid()
            )));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(refuse(format!(
                "{} has mode {:o}",
                parent.display(),
                meta.mode() & 0o7777
            )));
        }
    }
    Ok(())
}

/// The uid of the process at the other end of `stream` (`SO_PEERCRED`).
fn server_uid(stream: &UnixStream) -> io::Result<u32> {
    Ok(rustix::net::sockopt::socket_peercred(stream)?.uid.as_raw())
}

/// Sends one request with `Connection: close` and reads the answer, all before `deadline`.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
    deadline: Instant,
) -> Result<Response, ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ClientError::NotRunning(e),
        io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(e),
        _ => ClientError::Io(e),
    })?;
    // Before a byte of the request (an erase carries the token) goes out.
    let uid = server_uid(&stream).map_err(ClientError::Io)?;
    check_server(socket, uid).map_err(ClientError::Untrusted)?;
    let remaining = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(ClientError::TimedOut)
    };
    stream
        .set_write_timeout(Some(remaining()?))
        .map_err(io_error)?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: agent\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    match stream.write_all(&request) {
        Ok(()) => {}
        // The agent answers a refused peer at once and closes without reading: its answer is
        // still there to read.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) => {}
        Err(e) => return Err(io_error(e)),
    }

    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(response) = parse_response(&buf, false)? {
            return Ok(response);
        }
        stream
            .set_read_timeout(Some(remaining()?))
            .map_err(io_error)?;
        let n = stream.read(&mut chunk).map_err(io_error)?;
        if n == 0 {
            return parse_response(&buf, true)?.ok_or_else(|| {
                ClientError::BadResponse("the connection closed before a whole answer".into())
            });
        }
        if buf.len() + n > MAX_RESPONSE_BYTES {
            return Err(ClientError::BadResponse(format!(
                "larger than {MAX_RESPONSE_BYTES} bytes"
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A whole response from `buf`, or `None` if more bytes are needed (`eof`: no more will come).
fn parse_response(buf: &[u8], eof: bool) -> Result<Option<Response>, ClientError> {
    let bad = |m: &str| ClientError::BadResponse(m.to_string());
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| bad("the header is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(bad("no status line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(bad("not HTTP/1.x"));
    }
    let status: u16 = code
        .parse()
        .map_err(|_| bad("the status is not a number"))?;
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad("a header line has no ':'"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let rest = &buf[head_end + 4..];
    let header = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        match decode_chunked(rest)? {
            Some(body) => body,
            None if eof => return Err(bad("the chunked body ended early")),
            None => return Ok(None),
        }
    } else if let Some(len) = header("content-length") {
        let len: usize = len.parse().map_err(|_| bad("bad Content-Length"))?;
        if rest.len() < len {
            if eof {
                return Err(bad("the body is shorter than its Content-Length"));
            }
            return Ok(None);
        }
        rest[..len].to_vec()
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else if eof {
        rest.to_vec()
    } else {
        return Ok(None);
    };
    Ok(Some(Response {
        status,
        headers,
        body,
    }))
}

/// The decoded body once the terminating chunk has arrived; `None` while incomplete.
fn decode_chunked(mut data: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let size_text = std::str::from_utf8(&data[..line_end])
            .map_err(|_| ClientError::BadResponse("bad chunk size".into()))?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| ClientError::BadResponse("bad chunk size".into()))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(Some(body));
        }
        if data.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn parses_responses() {
        type Case<'a> = (&'a [u8], bool, Option<(u16, &'a [u8])>);
        let cases: Vec<Case<'_>> = vec![
            (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", false, Some((200, b"hello"))),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhel", false, None),
            (b"HTTP/1.1 204 No Content\r\n\r\n", false, Some((204, b""))),
            (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", false, Some((200, b"abcde"))),
            (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nab", false, None),
            (b"HTTP/1.1 403 Forbidden\r\n\r\nno", true, Some((403, b"no"))),
            (b"HTTP/1.1 403 Forbidden\r\n\r\nno", false, None),
            (b"HTTP/1.1 200 OK\r\n", false, None),
        ];
        for (input, eof, want) in cases {
            let got = parse_response(input, eof)
                .unwrap()
                .map(|r| (r.status, r.body));
            assert_eq!(
                got,
                want.map(|(s, b)| (s, b.to_vec())),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        for bad in [
            &b"SMTP 220 hi\r\n\r\n"[..],
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nnocolon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
        ] {
            assert!(
                parse_response(bad, true).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort", true).is_err()
        );
        let r = parse_response(b"HTTP/1.1 403 X\r\nBotcreds-Quit: 1\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(r.header("botcreds-quit"), Some("1"));
    }

    /// Someone who can put a socket where the agent's should be must not get git's erase (with
    /// the token) nor hand git a password: only a server running as root, or as the owner of a
    /// socket directory nobody else can change, is the agent.
    #[test]
    fn only_root_or_the_owner_of_a_safe_socket_directory_is_the_agent() {
        let me = rustix::process::geteuid().as_raw();
        let stranger = if me == 0 { 4242 } else { me + 1 };
        let tmp = tempfile::tempdir().unwrap();
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        // (what, socket dir mode, its parent's mode, server uid, trusted)
        let cases = [
            ("root", 0o777, 0o777, 0, true),
            ("the directory's owner", 0o755, 0o700, me, true),
            ("another user", 0o755, 0o700, stranger, false),
            (
                "owner of a world-writable directory",
                0o777,
                0o700,
                me,
                me == 0,
            ),
            (
                "owner of a group-writable directory",
                0o775,
                0o700,
                me,
                me == 0,
            ),
            (
                "owner of a directory in a world-writable one",
                0o755,
                0o1777,
                me,
                me == 0,
            ),
        ];
        for (what, dir_mode, parent_mode, server, trusted) in cases {
            let parent = tmp
                .path()
                .join(format!("p{dir_mode:o}-{parent_mode:o}-{server}"));
            let dir = parent.join("run");
            std::fs::create_dir_all(&dir).unwrap();
            mode(&dir, dir_mode);
            mode(&parent, parent_mode);
            let got = check_server(&dir.join("agent.sock"), server);
            assert_eq!(got.is_ok(), trusted, "{what}: {got:?}");
            if let Err(e) = got {
                assert!(e.contains(&format!("uid {server}")), "{what}: {e}");
            }
        }
        if me == 0 {
            // An agent running as its own user (systemd's RuntimeDirectory= makes the socket
            // directory theirs, in root's /run).
            let parent = tmp.path().join("svc");
            let dir = parent.join("run");
            std::fs::create_dir_all(&dir).unwrap();
            std::os::unix::fs::chown(&dir, Some(4242), None).unwrap();
            mode(&parent, 0o755);
            assert_eq!(check_server(&dir.join("agent.sock"), 4242), Ok(()));
            assert!(check_server(&dir.join("agent.sock"), 4243).is_err());
            mode(&parent, 0o1777);
            assert!(check_server(&dir.join("agent.sock"), 4242).is_err());
        }
    }

    #[test]
    fn missing_socket_means_not_running() {
        let tmp = tempfile::tempdir().unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let err = request(
            &tmp.path().join("none.sock"),
            "GET",
            "/",
            "text/plain",
            b"",
            deadline,
        )
        .unwrap_err();
        assert!(matches!(err, ClientError::NotRunning(_)), "{err:?}");
        // A socket file nobody accepts on.
        let path = tmp.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let err = request(&path, "GET", "/", "text/plain", b"", deadline).unwrap_err();
        assert!(matches!(err, ClientError::NotRunning(_)), "{err:?}");
    }

    #[test]
    fn a_silent_agent_times_out() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("silent.sock");
        // Accepts (the kernel backlog does) but never answers.
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let deadline = Instant::now() + std::time::Duration::from_millis(200);
        let err = request(
            &path,
            "POST",
            "/v1/git/get",
            "text/plain",
            b"host=x\n",
            deadline,
        )
        .unwrap_err();
        assert!(matches!(err, ClientError::TimedOut), "{err:?}");
    }
}
