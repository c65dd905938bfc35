//! `git-credential-botcreds`: the git credential helper. git runs it per credential lookup; it
//! forwards git's description to the local agent and prints the agent's answer.
//!
//! Std only and no async runtime, so it starts fast. It never hangs git and never fails git:
//! whatever goes wrong, it prints nothing on stdout (git asks its next helper) and, when the
//! user should know, one line on stderr. The exit status is always 0 (git ignores it anyway).

use std::io::{self, BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use botcreds_proto::agent::{
    DEFAULT_SOCKET, GIT_ERASE_PATH, GIT_GET_PATH, QUIT_HEADER, SOCKET_ENV,
};
use botcreds_proto::git_credential::{Description, MAX_LINE_BYTES, Parser, Step};
use local_client::ClientError;

// Included rather than used through the agent library: linking the library would pull the
// agent's TLS stack (and its static initializers) into every git credential lookup.
#[path = "../local_client.rs"]
mod local_client;
#[path = "../text.rs"]
#[allow(dead_code)]
mod text;

const TIMEOUT_ENV: &str = "BOTCREDS_HELPER_TIMEOUT";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const USAGE: &str =
    "usage: git-credential-botcreds [--socket PATH] [--timeout SECONDS] <get|store|erase>";

fn main() -> ExitCode {
    let mut socket = std::env::var_os(SOCKET_ENV).map(PathBuf::from);
    let mut timeout = std::env::var(TIMEOUT_ENV).ok();
    let mut operation = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if let Some(v) = arg.strip_prefix("--socket=") {
            socket = Some(v.into());
        } else if arg == "--socket" {
            socket = args.next().map(PathBuf::from);
        } else if let Some(v) = arg.strip_prefix("--timeout=") {
            timeout = Some(v.to_string());
        } else if arg == "--timeout" {
            timeout = args.next();
        } else if arg == "-h" || arg == "--help" {
            eprintln!("{USAGE}");
            return ExitCode::SUCCESS;
        } else {
            // git appends the operation last.
            operation = Some(arg);
        }
    }
    let path = match operation.as_deref() {
        Some("get") => GIT_GET_PATH,
        Some("erase") => GIT_ERASE_PATH,
        // `store` is a no-op (the agent already has the token), and unknown operations must
        // be ignored; neither needs to read stdin (git ignores SIGPIPE).
        Some(_) => return ExitCode::SUCCESS,
        None => {
            eprintln!("{USAGE}");
            return ExitCode::SUCCESS;
        }
    };
    let socket = socket.unwrap_or_else(|| DEFAULT_SOCKET.into());
    let timeout = match timeout.as_deref().map(parse_timeout) {
        None => DEFAULT_TIMEOUT,
        Some(Some(t)) => t,
        Some(None) => {
            eprintln!(
                "botcreds: {TIMEOUT_ENV} is not a number of seconds; using {}s",
                DEFAULT_TIMEOUT.as_secs()
            );
            DEFAULT_TIMEOUT
        }
    };
    // The wait is bounded from the moment git started us, reading stdin included.
    let deadline = Instant::now() + timeout;

    let description = match read_description(&mut io::stdin().lock()) {
        Ok(d) => d,
        Err(message) => {
            eprintln!("botcreds: {message}; not answering this credential request");
            return ExitCode::SUCCESS;
        }
    };
    if description.quit {
        return ExitCode::SUCCESS;
    }
    let body = match description.encode() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("botcreds: {e}; not answering this credential request");
            return ExitCode::SUCCESS;
        }
    };
    let response = match local_client::request(&socket, "POST", path, "text/plain", &body, deadline)
    {
        Ok(r) => r,
        // No agent: stay silent so git falls through to the next helper.
        Err(ClientError::NotRunning(_)) => return ExitCode::SUCCESS,
        Err(ClientError::TimedOut) => {
            eprintln!(
                "botcreds: the agent at {} did not answer within {}s ({TIMEOUT_ENV}); continuing without a botcreds credential",
                socket.display(),
                timeout.as_secs_f32()
            );
            return ExitCode::SUCCESS;
        }
        Err(ClientError::PermissionDenied(e)) => {
            eprintln!(
                "botcreds: cannot open the agent socket {}: {e} (is this user in the socket's group?)",
                socket.display()
            );
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!(
                "botcreds: talking to the agent at {} failed: {e}",
                socket.display()
            );
            return ExitCode::SUCCESS;
        }
    };
    let mut stdout = io::stdout().lock();
    match response.status {
        200 => {
            let _ = stdout.write_all(&response.body);
        }
        204 => {}
        status => {
            // git shows this on the user's terminal: never a control character from the
            // agent (or from the broker text the agent passes on).
            let message = text::clean(&String::from_utf8_lossy(&response.body));
            if message.is_empty() {
                eprintln!("botcreds: the agent answered HTTP {status}");
            } else {
                eprintln!("{message}");
            }
            if response.header(QUIT_HEADER) == Some("1") {
                let _ = stdout.write_all(b"quit=1\n");
            }
        }
    }
    let _ = stdout.flush();
    ExitCode::SUCCESS
}

/// Reads git's description up to a blank line or end of input, never a line past the limit.
fn read_description(input: &mut impl BufRead) -> Result<Description, String> {
    let mut parser = Parser::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        // One byte more than the limit is enough to know a line is too long.
        let n = io::Read::take(&mut *input, MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("cannot read the credential request: {e}"))?;
        if n == 0 {
            break;
        }
        if parser.feed_line(&line).map_err(|e| e.to_string())? == Step::End {
            break;
        }
    }
    Ok(parser.finish())
}

/// Seconds, fractions allowed, optionally with an `s` or `ms` suffix.
fn parse_timeout(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (number, scale) = if let Some(ms) = s.strip_suffix("ms") {
        (ms, 0.001)
    } else {
        (s.strip_suffix('s').unwrap_or(s), 1.0)
    };
    let value: f64 = number.trim().parse().ok()?;
    (value.is_finite() && value > 0.0 && value * scale <= 3600.0)
        .then(|| Duration::from_secs_f64(value * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_until_blank_line_or_eof() {
        let mut input: &[u8] = b"protocol=https\nhost=github.com\n\nhost=ignored\n";
        let d = read_description(&mut input).unwrap();
        assert_eq!(d.host.as_deref(), Some("github.com"));
        assert_eq!(input, b"host=ignored\n", "stops reading at the blank line");
        let mut eof: &[u8] = b"protocol=https\nhost=github.com";
        assert_eq!(
            read_description(&mut eof).unwrap().host.as_deref(),
            Some("github.com")
        );
    }

    #[test]
    fn refuses_long_and_garbled_lines() {
        let long = format!("host={}\n", "x".repeat(MAX_LINE_BYTES));
        let err = read_description(&mut long.as_bytes()).unwrap_err();
        assert!(err.contains("longer than 65535"), "{err}");
        let err = read_description(&mut &b"protocol=https\nnonsense\n"[..]).unwrap_err();
        assert!(err.contains("line 2 has no '='"), "{err}");
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("10"), Some(Duration::from_secs(10)));
        assert_eq!(parse_timeout("2.5"), Some(Duration::from_millis(2500)));
        assert_eq!(parse_timeout("3s"), Some(Duration::from_secs(3)));
        assert_eq!(parse_timeout("250ms"), Some(Duration::from_millis(250)));
        for bad in ["", "0", "-1", "soon", "inf", "NaN", "99999"] {
            assert_eq!(parse_timeout(bad), None, "{bad}");
        }
    }
}
