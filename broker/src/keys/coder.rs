//! Speaking to Coder: checking a session token (`GET {coder}/api/v2/users/me` with the token in
//! `Coder-Session-Token`) and, with the broker's own token, confirming a workspace
//! (`GET {coder}/api/v2/workspaces/{id}`). The only code that speaks to Coder; tokens are never
//! logged.

use std::time::Duration;

use serde_json::Value;

use super::KeyError;
use super::config::CoderConfig;
use crate::secret::Secret;

/// Who a session token belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoderUser {
    pub id: String,
    pub username: String,
}

/// A workspace as Coder has it (codersdk `Workspace`, the fields the broker reads).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoderWorkspace {
    pub id: String,
    pub name: String,
    pub owner_id: String,
    pub owner_name: String,
}

/// A Coder API client for one deployment.
pub struct CoderClient {
    http: reqwest::Client,
    base: String,
    /// The broker's own token, for workspace lookups.
    token: Option<Secret>,
}

impl std::fmt::Debug for CoderClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoderClient")
            .field("url", &self.base)
            .finish()
    }
}

impl CoderClient {
    pub fn new(config: &CoderConfig) -> Result<CoderClient, String> {
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout.max(Duration::from_secs(1)))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the Coder HTTP client: {e}"))?;
        Ok(CoderClient {
            http,
            base: config.url.clone(),
            token: config.token.clone(),
        })
    }

    /// Whether workspaces can be confirmed (`[coder] token_file` is set).
    pub fn confirms_workspaces(&self) -> bool {
        self.token.is_some()
    }

    /// The workspace `id` as Coder has it; `None` when Coder knows none (404) or no token is
    /// configured. Coder refusing the broker's token is an upstream error.
    pub async fn workspace(&self, id: &str) -> Result<Option<CoderWorkspace>, KeyError> {
        let Some(token) = &self.token else {
            return Ok(None);
        };
        // A workspace id is a UUID in Coder; anything else cannot name one (and must not reach
        // the URL path).
        if id.is_empty()
            || id.len() > 128
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Ok(None);
        }
        let response = self
            .http
            .get(format!("{}/api/v2/workspaces/{id}", self.base))
            .header("Coder-Session-Token", token.expose())
            .send()
            .await
            .map_err(|e| {
                tracing::warn!(coder = %self.base, timeout = e.is_timeout(), "Coder unreachable");
                KeyError::CoderUnavailable(format!(
                    "Coder at {} could not be reached to confirm the workspace",
                    self.base
                ))
            })?;
        let status = response.status().as_u16();
        match status {
            200..=299 => {}
            404 => return Ok(None),
            401 | 403 => {
                return Err(KeyError::CoderError("Coder refused the broker's token ([coder] token_file) when reading a workspace".into()));
            }
            _ => {
                return Err(KeyError::CoderError(format!(
                    "Coder answered {status} when reading a workspace"
                )));
            }
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|_| KeyError::CoderError("Coder's answer broke off".into()))?;
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|_| KeyError::CoderError("Coder's answer is not JSON".into()))?;
        let field = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        match (
            field("id"),
            field("name"),
            field("owner_id"),
            field("owner_name"),
        ) {
            (Some(id), Some(name), Some(owner_id), Some(owner_name)) => Ok(Some(CoderWorkspace {
                id,
                name,
                owner_id,
                owner_name,
            })),
            _ => Err(KeyError::CoderError(
                "Coder's workspace has no id, name or owner".into(),
            )),
        }
    }

    /// The user the token belongs to; `invalid_session_token` when Coder refuses it.
    pub async fn current_user(&self, token: &Secret) -> Result<CoderUser, KeyError> {
        let refused =
            || KeyError::InvalidSessionToken("Coder did not accept the session token".into());
        if token.is_empty() || token.expose().len() > 4096 {
            return Err(refused());
        }
        let response = self
            .http
            .get(format!("{}/api/v2/users/me", self.base))
            .header("Coder-Session-Token", token.expose())
            .send()
            .await
            .map_err(|e| {
                tracing::warn!(coder = %self.base, timeout = e.is_timeout(), "Coder unreachable");
                KeyError::CoderUnavailable(format!(
                    "Coder at {} could not be reached to check the session",
                    self.base
                ))
            })?;
        let status = response.status().as_u16();
        if status == 401 || status == 403 {
            return Err(refused());
        }
        if !(200..300).contains(&status) {
            return Err(KeyError::CoderError(format!(
                "Coder answered {status} when checking the session"
            )));
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|_| KeyError::CoderError("Coder's answer broke off".into()))?;
        let v: Value = serde_json::from_slice(&bytes)
            .map_err(|_| KeyError::CoderError("Coder's answer is not JSON".into()))?;
        let field = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        match (field("id"), field("username")) {
            (Some(id), Some(username)) => Ok(CoderUser { id, username }),
            _ => Err(KeyError::CoderError(
                "Coder's user has no id or username".into(),
            )),
        }
    }
}
