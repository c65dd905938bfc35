//! What `GET /v1/litellm/status` answers: each entry's state, files and last `on_change` run.

use std::time::SystemTime;

use axum::Router;
use axum::extract::State;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use botcreds_proto::agent::CredentialState;
use serde::{Deserialize, Serialize};

use crate::credentials::rfc3339;
use crate::peer::AllowList;
use crate::slot::State as SlotState;

use super::key::Key;
use super::plan::next_step;
use super::task::Litellm;

/// `GET` on the agent's socket: every `[[litellm]]` entry's state, as JSON.
pub const LITELLM_STATUS_PATH: &str = "/v1/litellm/status";

/// One `[[litellm]]` entry's state. Never carries the key itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LitellmKeyStatus {
    pub scope: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_id: Option<String>,
    pub state: CredentialState,
    /// The key's name at the broker (LiteLLM `key_alias`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_id: Option<String>,
    /// RFC 3339 times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh: Option<String>,
    /// The last time the broker confirmed (or replaced) the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<String>,
    /// The next time the agent asks the broker (refresh, check or retry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_refresh: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error_at: Option<String>,
    pub failures: u32,
    pub release_on_stop: bool,
    pub outputs: Vec<OutputStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_change: Option<OnChangeStatus>,
}

/// One file of an entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputStatus {
    /// `key_file`, `env_file`, `roo_code` or `opencode`.
    pub kind: String,
    pub path: String,
    /// `written` (holds the current key), `removed` (no key to hold), `error`, or `pending`
    /// (not written yet).
    pub state: String,
    /// When the agent last changed the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The last run of the entry's `on_change` command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnChangeStatus {
    pub at: String,
    pub ok: bool,
    /// `exit status 0`, `exit status 1: <last line of stderr>`, `timed out after 30s`, ...
    pub result: String,
}

impl Key {
    /// The entry's row in `GET /v1/litellm/status`.
    pub(super) fn status_row(&self, now: SystemTime, st: &SlotState<Key>) -> LitellmKeyStatus {
        let (next_at, _) = next_step(now, &self.plan(st));
        let servable = st.servable(now);
        let state = match servable {
            None => CredentialState::Missing,
            Some(_) if st.failures > 0 => CredentialState::ServingFromCache,
            Some(h) if now >= h.refresh_at => CredentialState::Refreshing,
            Some(_) => CredentialState::Fresh,
        };
        LitellmKeyStatus {
            scope: self.entry.scope.clone(),
            workspace_id: self
                .entry
                .workspace
                .as_ref()
                .map(|w| w.workspace_id.clone()),
            state,
            name: servable.map(|h| h.name.clone()),
            credential_id: servable.map(|h| h.credential_id.clone()),
            expires_at: servable.map(|h| rfc3339(h.expires_at)),
            last_refresh: st.last_refresh.map(rfc3339),
            last_check: st.extra.last_check.map(rfc3339),
            next_refresh: Some(rfc3339(next_at.max(now))),
            last_error: st.last_error.as_ref().map(|(_, e)| e.clone()),
            last_error_at: st.last_error.as_ref().map(|(at, _)| rfc3339(*at)),
            failures: st.failures,
            release_on_stop: self.entry.release_on_stop,
            outputs: self
                .entry
                .outputs()
                .into_iter()
                .zip(st.extra.outputs.iter())
                .map(|((kind, path), out)| OutputStatus {
                    kind: kind.to_string(),
                    path: path.display().to_string(),
                    state: out.state.to_string(),
                    changed_at: out.changed_at.map(rfc3339),
                    error: out.error.clone(),
                })
                .collect(),
            on_change: st.extra.on_change.clone(),
        }
    }
}

/// `GET /v1/litellm/status` on the agent's socket, behind the same peer check as the rest.
pub fn routes(litellm: Litellm, allow: AllowList) -> Router {
    Router::new()
        .route(LITELLM_STATUS_PATH, get(status_handler))
        .with_state(litellm)
        .layer(middleware::from_fn_with_state(
            allow,
            crate::socket::check_peer,
        ))
}

pub(super) async fn status_handler(State(litellm): State<Litellm>) -> Response {
    axum::Json(litellm.status()).into_response()
}
