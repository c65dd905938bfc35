//! Health, readiness and metrics endpoints (no authentication; nothing secret in them).

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;

use super::AppState;

/// Liveness: the process answers.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: the policy is loaded and the audit log accepts writes.
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let policy_ok = !state.policy.path().as_os_str().is_empty();
    let audit_ok = state.audit.is_running();
    let body = serde_json::json!({
        "policy": if policy_ok { "ok" } else { "missing" },
        "audit": if audit_ok { "ok" } else { "stopped" },
        "bots": state.policy.current().bot_names().len(),
    });
    let status = if policy_ok && audit_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body))
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
