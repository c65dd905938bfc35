//! The admin CLI's HTTP client: finds the broker (`--broker` or `BOTCREDS_BROKER`), speaks
//! JSON to it with the caller's identity (the tailnet connection itself, or
//! `BOTCREDS_API_KEY` as a bearer key), and turns the broker's `{error, code}` answers into a
//! [`CliError`] with a documented process exit code. Also a small table printer.
//!
//! Exit codes (docs/approvals.md): 0 success; 1 other failure; 2 usage (clap); 3 the broker
//! could not be reached or answered garbage; 4 not authenticated (401); 5 forbidden — not an
//! admin, or the policy/a human said no (403); 6 not found (404); 7 conflict — already
//! decided, expired, wrong bot (409); 8 invalid input (400, 413, 415); 9 the broker is busy
//! or failed (429, 5xx, timeouts).

use std::io::IsTerminal;
use std::time::Duration;

use botcreds_proto::{ErrorBody, ErrorCode};
use reqwest::StatusCode;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Environment variable naming the broker (`http://botcreds.example.ts.net:8443`).
pub const BROKER_ENV: &str = "BOTCREDS_BROKER";
/// Environment variable holding an admin API key (sent as `Authorization: Bearer`).
pub const API_KEY_ENV: &str = "BOTCREDS_API_KEY";

/// Process exit codes of the admin CLI.
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const UNREACHABLE: u8 = 3;
    pub const UNAUTHENTICATED: u8 = 4;
    pub const FORBIDDEN: u8 = 5;
    pub const NOT_FOUND: u8 = 6;
    pub const CONFLICT: u8 = 7;
    pub const INVALID: u8 = 8;
    pub const BROKER: u8 = 9;
}

/// A failed CLI command: what to tell the user, the broker's code if it answered with one,
/// and the exit code.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    /// The broker's error code, when the failure is the broker's answer.
    pub code: Option<ErrorCode>,
    pub message: String,
    /// The process exit code (see [`exit`]).
    pub exit: u8,
}

impl CliError {
    pub fn new(exit: u8, message: impl Into<String>) -> CliError {
        CliError {
            code: None,
            message: message.into(),
            exit,
        }
    }

    /// A usage error found after clap parsed the arguments (exit 2).
    pub fn usage(message: impl Into<String>) -> CliError {
        CliError::new(exit::USAGE, message)
    }

    /// The broker's error answer.
    pub fn from_broker(status: u16, code: ErrorCode, message: String) -> CliError {
        CliError {
            exit: exit_for_status(status),
            code: Some(code),
            message: format!("{message} ({code})"),
        }
    }

    /// The exit code as a process [`std::process::ExitCode`].
    pub fn exit_code(&self) -> std::process::ExitCode {
        std::process::ExitCode::from(self.exit)
    }
}

/// The exit code for an HTTP status the broker answered with.
pub fn exit_for_status(status: u16) -> u8 {
    match status {
        200..=299 => exit::OK,
        401 => exit::UNAUTHENTICATED,
        403 => exit::FORBIDDEN,
        404 => exit::NOT_FOUND,
        409 => exit::CONFLICT,
        400 | 405 | 411 | 413 | 415 | 422 => exit::INVALID,
        408 | 429 | 500..=599 => exit::BROKER,
        _ => exit::FAILURE,
    }
}

/// An admin connection to one broker.
#[derive(Clone)]
pub struct BrokerClient {
    base: String,
    api_key: Option<String>,
    http: reqwest::Client,
}

impl std::fmt::Debug for BrokerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerClient")
            .field("base", &self.base)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl BrokerClient {
    /// The broker named by `broker` (from `--broker`), else by `BOTCREDS_BROKER`; the API
    /// key, if any, from `BOTCREDS_API_KEY`.
    pub fn from_args(broker: Option<String>) -> Result<Self, CliError> {
        let broker = broker
            .filter(|b| !b.trim().is_empty())
            .or_else(|| {
                std::env::var(BROKER_ENV)
                    .ok()
                    .filter(|b| !b.trim().is_empty())
            })
            .ok_or_else(|| {
                CliError::usage(format!(
                    "name the broker with --broker URL or {BROKER_ENV}=URL \
                     (e.g. http://botcreds.example.ts.net:8443)"
                ))
            })?;
        let api_key = std::env::var(API_KEY_ENV)
            .ok()
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty());
        BrokerClient::new(&broker, api_key)
    }

    /// A client for `broker` (`http://host:port`, or `host:port` meaning http), sending
    /// `api_key` as a bearer key when given.
    pub fn new(broker: &str, api_key: Option<String>) -> Result<Self, CliError> {
        let broker = broker.trim().trim_end_matches('/');
        let base = if broker.starts_with("http://") || broker.starts_with("https://") {
            broker.to_string()
        } else {
            format!("http://{broker}")
        };
        reqwest::Url::parse(&base)
            .map_err(|e| CliError::usage(format!("the broker address {base} is not a URL: {e}")))?;
        let builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // Admin calls answer at once; a broker that hangs should not hang scripts.
            .timeout(Duration::from_secs(120));
        // An admin client certificate for the mTLS listener, when BOTCREDS_CLIENT_CERT is set.
        let http = super::certs::client_certificate_from_env(builder)?
            .build()
            .map_err(|e| CliError::new(exit::FAILURE, format!("HTTP client: {e}")))?;
        Ok(BrokerClient {
            base,
            api_key,
            http,
        })
    }

    /// The broker's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with('/') {
            format!("{}{path}", self.base)
        } else {
            format!("{}/{path}", self.base)
        }
    }

    fn with_auth(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        self.send(self.http.get(self.url(path))).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, CliError> {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        self.send(self.http.delete(self.url(path))).await
    }

    async fn send<T: DeserializeOwned>(&self, r: reqwest::RequestBuilder) -> Result<T, CliError> {
        let response = self.with_auth(r).send().await.map_err(|e| {
            CliError::new(
                exit::UNREACHABLE,
                format!("cannot reach the broker at {}: {}", self.base, e),
            )
        })?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| {
            CliError::new(
                exit::UNREACHABLE,
                format!("the broker's answer broke off: {e}"),
            )
        })?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| {
                CliError::new(
                    exit::UNREACHABLE,
                    format!("the broker answered {status} with an unexpected body: {e}"),
                )
            });
        }
        Err(error_from(status, &bytes))
    }
}

fn error_from(status: StatusCode, bytes: &[u8]) -> CliError {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => CliError::from_broker(status.as_u16(), body.code, body.error),
        Err(_) => {
            let text: String = String::from_utf8_lossy(bytes).chars().take(200).collect();
            CliError::new(
                match exit_for_status(status.as_u16()) {
                    exit::OK => exit::FAILURE,
                    e => e,
                },
                format!("the broker answered {status}: {}", text.trim()),
            )
        }
    }
}

/// A plain-text table: a header row and left-aligned columns, two spaces apart.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<I, S>(header: I) -> Table
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Table {
            header: header.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, each line ending in a newline. Control characters in cells are
    /// shown as spaces so that a cell cannot break the layout or the terminal.
    pub fn render(&self) -> String {
        let clean = |s: &str| -> String {
            s.chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect()
        };
        let header: Vec<String> = self.header.iter().map(|c| clean(c)).collect();
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| r.iter().map(|c| clean(c)).collect())
            .collect();
        let columns = std::iter::once(&header)
            .chain(rows.iter())
            .map(Vec::len)
            .max()
            .unwrap_or(0);
        let mut widths = vec![0usize; columns];
        for r in std::iter::once(&header).chain(rows.iter()) {
            for (i, c) in r.iter().enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&header).chain(rows.iter()) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                if i + 1 < r.len() {
                    line.push_str(c);
                    let pad = widths[i] - c.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                } else {
                    line.push_str(c);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

/// A one-line progress indicator on stderr while a command waits, shown only when stderr is
/// a terminal (scripts and tests see nothing). Cleared when dropped.
pub struct Progress {
    active: bool,
}

impl Progress {
    pub fn start(message: &str) -> Progress {
        let active = std::io::stderr().is_terminal();
        if active {
            eprint!("\r{message} …");
        }
        Progress { active }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.active {
            // Erase the line so the command's own output starts clean.
            eprint!("\r\x1b[2K");
        }
    }
}

/// Print `value` as pretty JSON on stdout (for `--json`).
pub fn print_json<T: Serialize>(value: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::new(exit::FAILURE, format!("JSON output: {e}")))?;
    println!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_and_cleans() {
        let mut t = Table::new(["ID", "BOT"]);
        t.row(["apr_1", "ci"]);
        t.row(["apr_long_id", "a\nb"]);
        assert_eq!(
            t.render(),
            "ID           BOT\napr_1        ci\napr_long_id  a b\n"
        );
    }

    #[test]
    fn status_to_exit() {
        assert_eq!(exit_for_status(403), exit::FORBIDDEN);
        assert_eq!(exit_for_status(409), exit::CONFLICT);
        assert_eq!(exit_for_status(404), exit::NOT_FOUND);
        assert_eq!(exit_for_status(400), exit::INVALID);
        assert_eq!(exit_for_status(503), exit::BROKER);
        let e = error_from(
            StatusCode::CONFLICT,
            br#"{"error":"already approved","code":"already_decided"}"#,
        );
        assert_eq!(e.code, Some(ErrorCode::AlreadyDecided));
        assert_eq!(e.exit, exit::CONFLICT);
        let e = error_from(StatusCode::BAD_GATEWAY, b"<html>");
        assert_eq!((e.code, e.exit), (None, exit::BROKER));
    }

    #[test]
    fn broker_addresses() {
        let c = BrokerClient::new("127.0.0.1:8443/", None).unwrap();
        assert_eq!(c.base(), "http://127.0.0.1:8443");
        assert_eq!(c.url("v1/x"), "http://127.0.0.1:8443/v1/x");
        assert!(
            !format!(
                "{:?}",
                BrokerClient::new("http://h", Some("k".into())).unwrap()
            )
            .contains("\"k\"")
        );
    }
}
