//! `botcreds-agent status`: asks the running agent over its socket and prints a table (or the
//! JSON as is).

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use botcreds_proto::agent::{AgentStatus, STATUS_PATH};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::local_client::{self, ClientError};

/// The status probe waits for the broker's health check (a few seconds) on top of this.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// Fetches the status JSON from the agent listening on `socket`.
pub fn fetch(socket: &Path) -> Result<(AgentStatus, String), String> {
    let deadline = Instant::now() + STATUS_TIMEOUT;
    let response = local_client::request(socket, "GET", STATUS_PATH, "text/plain", b"", deadline)
        .map_err(|e| match e {
        ClientError::NotRunning(_) => format!("no agent is running on {} ({e})", socket.display()),
        ClientError::PermissionDenied(_) => format!("cannot open {}: {e}", socket.display()),
        ClientError::TimedOut => format!(
            "the agent on {} did not answer within {}s",
            socket.display(),
            STATUS_TIMEOUT.as_secs()
        ),
        other => format!("asking the agent on {} failed: {other}", socket.display()),
    })?;
    let body = String::from_utf8_lossy(&response.body).into_owned();
    if response.status != 200 {
        return Err(format!(
            "the agent answered HTTP {}: {}",
            response.status,
            body.trim_end()
        ));
    }
    let status: AgentStatus = serde_json::from_str(&body)
        .map_err(|e| format!("the agent's status is not understood: {e}"))?;
    Ok((status, body))
}

/// A human-readable table; `now` makes times relative ("in 52m").
pub fn render(status: &AgentStatus, now: SystemTime) -> String {
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
            if status.serving_from_cache {
                "YES: refreshing fails, credentials are served from the cache until they expire"
                    .into()
            } else {
                "no".into()
            },
        ),
    ];
    for (k, v) in rows {
        out.push_str(&format!("{k:<13}{v}\n"));
    }
    out.push('\n');
    if status.credentials.is_empty() {
        out.push_str("no credentials tracked\n");
        return out;
    }
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
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            table
                .iter()
                .map(|row| row[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in &table {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&" ".repeat(widths[i] - cell.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
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
        let text = render(&status, now);
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
}
