//! A faithful double of the LiteLLM proxy's virtual-key management API (litellm 1.106.2, per
//! `../shared/reference/litellm-keys.md` and `tests/fixtures/litellm/`), with a chat completion
//! endpoint that only live virtual keys may call, and a tiny stand-in for Coder's
//! `GET /api/v2/users/me` so the broker's session-token check can be exercised.
//!
//! # Endpoints (relative to [`FakeLitellm::base_url`])
//! | Method and path | Auth | Success |
//! |---|---|---|
//! | `POST /key/generate` | master key | 200 `GenerateKeyResponse` (shape of `key-generate.response.json`) |
//! | `POST /key/update` | master key | 200 `{"key", ...row}`; 404 `error-404-update-key-not-found.json` |
//! | `POST /key/delete` (`keys` or `key_aliases`) | master key | 200 `{"deleted_keys": [as sent]}`; 404 `error-404-delete-no-keys.json`; 422 `error-422-validation.json` |
//! | `GET /key/info?key=` | master key | 200 `{"key", "info"}`; 404 `error-404-info-key-not-found.json` |
//! | `GET /key/list` (`page`, `size`, `key_alias`, `return_full_object`) | master key | 200 `{"keys", "total_count", "current_page", "total_pages"}` |
//! | `POST /key/regenerate`, `POST /key/{key}/regenerate` | master key | 200 with the new key when [`FakeLitellmConfig::enterprise`]; else 500 "Enterprise feature" |
//! | `POST /v1/chat/completions`, `POST /chat/completions` | a live virtual key (or the master key) | 200; 401/403/422/429 per reference §10 |
//! | `GET /v1/models`, `GET /models` | a live virtual key (or the master key) | 200 `{"data": [{"id", ...}], "object": "list"}`: the key's models |
//! | `GET /api/v2/users/me` (fake Coder) | `Coder-Session-Token` | 200 `{"id", "username", ...}`; 401 |
//! | `GET /api/v2/workspaces/{id}` (fake Coder) | `Coder-Session-Token` | 200 `{"id", "name", "owner_id", "owner_name", ...}`; 404; 401 |
//!
//! Authentication follows reference §1: the first of `x-litellm-api-key`, `Authorization`
//! (`Bearer `/`bearer `/`Basic ` prefix, else 401 malformed), `API-Key`, `x-api-key`,
//! `x-goog-api-key`, `Ocp-Apim-Subscription-Key`. Route checks follow LiteLLM 1.106.2's
//! `route_checks.py`: `key_type` (`llm_api`, `management`, `read_only`, `default`; anything
//! else 422) sets the key's `allowed_routes`; an `llm_api` key on a management route gets 403
//! `error-403-route-not-allowed.json` (FastAPI's `{"detail"}` form), and any other virtual key
//! may only read `/key/info` of keys of its own user (other management routes: 401 "Only proxy
//! admin can be used ..."). Keys are
//! stored by SHA-256 hash; a value starting with `sk-` is hashed, anything else is taken as a
//! hash. All successes are 200.
//!
//! Before authentication every proxy route refuses a body carrying one of LiteLLM's banned
//! client-side parameters (`fixtures/litellm/banned-request-body-params.json`, e.g.
//! `workspace_id`, `api_base`) anywhere in it, with the real proxy's 401 "Rejected Request:
//! <param> is not allowed in request body".
//!
//! Every request is recorded ([`FakeLitellm::calls`]) with the kind of credential it carried,
//! never the credential itself.

// Helpers return the HTTP answer to send as their error; its size does not matter in a double.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::Rng;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::fixtures;
use crate::switchable::SwitchableServer;

/// The master key the fake accepts unless configured otherwise.
pub const DEFAULT_MASTER_KEY: &str = "sk-master-botcreds-test-7c1f";

/// How the fake is set up.
#[derive(Clone, Debug)]
pub struct FakeLitellmConfig {
    pub master_key: String,
    /// A licensed (Enterprise) proxy: `/key/regenerate` works and `tags` are accepted.
    pub enterprise: bool,
    /// Spend added to a key by each chat completion (USD).
    pub cost_per_call: f64,
}

impl Default for FakeLitellmConfig {
    fn default() -> Self {
        FakeLitellmConfig {
            master_key: DEFAULT_MASTER_KEY.to_string(),
            enterprise: false,
            cost_per_call: 0.001,
        }
    }
}

/// The credential a recorded request carried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallAuth {
    None,
    Master,
    /// A virtual key, by hash.
    Virtual(String),
    /// A value that was neither (unknown key, malformed header).
    Rejected,
}

/// One request the fake received.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// The JSON body (`Null` when there was none or it was not JSON).
    pub body: Value,
    pub auth: CallAuth,
    /// `litellm-changed-by`, if sent.
    pub changed_by: Option<String>,
}

/// A key as the fake stores it.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyRow {
    /// SHA-256 hex of the key.
    pub token: String,
    pub key_name: String,
    pub key_alias: Option<String>,
    pub models: Vec<String>,
    pub max_budget: Option<f64>,
    pub budget_duration: Option<String>,
    pub rpm_limit: Option<u64>,
    pub tpm_limit: Option<u64>,
    pub max_parallel_requests: Option<u64>,
    pub key_type: String,
    /// What `key_type` allows (LiteLLM's `allowed_routes`): `["llm_api_routes"]` for `llm_api`.
    pub allowed_routes: Vec<String>,
    pub team_id: Option<String>,
    pub user_id: Option<String>,
    pub metadata: Value,
    pub expires: Option<OffsetDateTime>,
    pub blocked: bool,
    pub spend: f64,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

struct Ledger {
    keys: HashMap<String, KeyRow>,
    deleted: HashMap<String, KeyRow>,
    calls: Vec<Call>,
    fail_next: u32,
    fail_status: u16,
    skew_secs: i64,
    /// (hash, minute) → requests in that minute.
    minute_counts: HashMap<(String, i64), u64>,
    coder_sessions: HashMap<String, (String, String)>,
    /// Fake Coder workspaces by id: (name, owner id, owner name).
    coder_workspaces: HashMap<String, (String, String, String)>,
}

struct Shared {
    config: FakeLitellmConfig,
    master_hash: String,
    ledger: Mutex<Ledger>,
    /// `false` while [`FakeLitellm::hold_generates`] holds `/key/generate` after recording it.
    generates_open: tokio::sync::watch::Sender<bool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Inner {
    shared: Arc<Shared>,
    server: SwitchableServer,
    addr: SocketAddr,
}

/// The fake LiteLLM proxy; a cheap `Clone` handle. Stops when the last handle drops.
#[derive(Clone)]
pub struct FakeLitellm {
    inner: Arc<Inner>,
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// LiteLLM's hashing rule: `sk-...` is hashed, anything else is already a hash.
pub fn hash_token(value: &str) -> String {
    if value.starts_with("sk-") {
        sha256_hex(value)
    } else {
        value.to_string()
    }
}

fn masked(key: &str) -> String {
    let tail: String = key
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("sk-...{tail}")
}

fn iso(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// LiteLLM's duration strings: `<n>s|m|h|d|w|mo`.
pub fn parse_duration(s: &str) -> Option<i64> {
    let s = s.trim();
    let (digits, unit) = if let Some(d) = s.strip_suffix("mo") {
        (d, 30 * 86_400)
    } else {
        let unit = match s.chars().last()? {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => return None,
        };
        (&s[..s.len() - 1], unit)
    };
    let n: i64 = digits.parse().ok()?;
    (n >= 0).then(|| n.saturating_mul(unit))
}

fn fixture_response(status: u16, name: &str) -> Response {
    let body = fixtures::bytes(&format!("litellm/{name}"));
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [("content-type", "application/json")],
        body,
    )
        .into_response()
}

fn proxy_error(status: u16, message: &str, kind: &str, param: Option<&str>) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(json!({
            "error": {"message": message, "type": kind, "param": param, "code": status.to_string()}
        })),
    )
        .into_response()
}

fn validation_error(msg: &str) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        axum::Json(json!({"detail": [{"type": "value_error", "loc": ["body"], "msg": msg}]})),
    )
        .into_response()
}

impl FakeLitellm {
    /// Starts the fake on `127.0.0.1` with a free port.
    pub async fn start(config: FakeLitellmConfig) -> FakeLitellm {
        let shared = Arc::new(Shared {
            master_hash: sha256_hex(&config.master_key),
            config,
            ledger: Mutex::new(Ledger {
                keys: HashMap::new(),
                deleted: HashMap::new(),
                calls: Vec::new(),
                fail_next: 0,
                fail_status: 500,
                skew_secs: 0,
                minute_counts: HashMap::new(),
                coder_sessions: HashMap::new(),
                coder_workspaces: HashMap::new(),
            }),
            generates_open: tokio::sync::watch::channel(true).0,
        });
        let bound = SwitchableServer::bind_tcp(SocketAddr::from(([127, 0, 0, 1], 0)))
            .unwrap_or_else(|e| panic!("fake LiteLLM cannot bind 127.0.0.1: {e}"));
        let addr = bound.local_addr();
        let router = Router::new()
            .route("/key/generate", post(generate))
            .route("/key/update", post(update))
            .route("/key/delete", post(delete_keys))
            .route("/key/info", get(info))
            .route("/key/list", get(list))
            .route("/key/regenerate", post(regenerate_body))
            .route("/key/{*rest}", post(regenerate_path))
            .route("/v1/models", get(models))
            .route("/models", get(models))
            .route("/v1/chat/completions", post(chat))
            .route("/chat/completions", post(chat))
            .route("/api/v2/users/me", get(coder_me))
            .route("/api/v2/workspaces/{id}", get(coder_workspace))
            .layer(axum::middleware::from_fn_with_state(shared.clone(), record))
            .with_state(shared.clone());
        let server = bound.serve(router);
        FakeLitellm {
            inner: Arc::new(Inner {
                shared,
                server,
                addr,
            }),
        }
    }

    /// `http://127.0.0.1:PORT`: the proxy URL to configure (`[litellm] url`), also the fake
    /// Coder URL (`[coder] url`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url())
    }

    pub fn master_key(&self) -> &str {
        &self.inner.shared.config.master_key
    }

    /// Holds every `/key/generate` (recorded in [`FakeLitellm::calls`] on arrival) until
    /// [`FakeLitellm::release_generates`], so a test can act while a mint is in flight.
    pub fn hold_generates(&self) {
        self.inner.shared.generates_open.send_replace(false);
    }

    /// Lets held and later `/key/generate` calls through.
    pub fn release_generates(&self) {
        self.inner.shared.generates_open.send_replace(true);
    }

    /// Every request so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.inner.shared.lock().calls.clone()
    }

    /// Requests to one path (e.g. `/key/generate`).
    pub fn calls_to(&self, path: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.path == path)
            .collect()
    }

    /// Keys neither deleted nor (by the fake's clock) expired.
    pub fn live_keys(&self) -> Vec<KeyRow> {
        let now = self.now();
        let l = self.inner.shared.lock();
        let mut v: Vec<KeyRow> = l
            .keys
            .values()
            .filter(|k| k.expires.is_none_or(|e| e > now))
            .cloned()
            .collect();
        v.sort_by_key(|k| k.created_at);
        v
    }

    /// The stored key with this alias (live, expired or blocked; not deleted).
    pub fn key_by_alias(&self, alias: &str) -> Option<KeyRow> {
        let l = self.inner.shared.lock();
        l.keys
            .values()
            .find(|k| k.key_alias.as_deref() == Some(alias))
            .cloned()
    }

    /// Whether a key (plaintext or hash) was deleted here.
    pub fn was_deleted(&self, key: &str) -> bool {
        self.inner
            .shared
            .lock()
            .deleted
            .contains_key(&hash_token(key))
    }

    /// A deleted (or regenerated) key as it was, by plaintext or hash; its `updated_at` is
    /// when it was deleted, by the fake's clock.
    pub fn deleted_key(&self, key: &str) -> Option<KeyRow> {
        self.inner
            .shared
            .lock()
            .deleted
            .get(&hash_token(key))
            .cloned()
    }

    /// Moves the fake's clock (key expiry) by `secs`.
    pub fn advance_clock(&self, secs: i64) {
        self.inner.shared.lock().skew_secs += secs;
    }

    fn now(&self) -> OffsetDateTime {
        now_of(&self.inner.shared.lock())
    }

    /// Answers the next `n` requests (any path, before authentication) with `status` and a
    /// proxy error body (for 401/403 the real proxy's refusal of the credential).
    pub fn fail_next(&self, n: u32, status: u16) {
        let mut l = self.inner.shared.lock();
        l.fail_next = n;
        l.fail_status = status;
    }

    /// Blocks or unblocks a key (as `/key/block` would).
    pub fn set_blocked(&self, key: &str, blocked: bool) {
        if let Some(k) = self.inner.shared.lock().keys.get_mut(&hash_token(key)) {
            k.blocked = blocked;
        }
    }

    /// Sets a key's spend (to exhaust its budget).
    pub fn set_spend(&self, key: &str, spend: f64) {
        if let Some(k) = self.inner.shared.lock().keys.get_mut(&hash_token(key)) {
            k.spend = spend;
        }
    }

    /// Fake Coder: `token` is a session of user `username` (id `id`).
    pub fn add_coder_session(&self, token: &str, id: &str, username: &str) {
        self.inner
            .shared
            .lock()
            .coder_sessions
            .insert(token.to_string(), (id.to_string(), username.to_string()));
    }

    /// Fake Coder: a workspace `GET /api/v2/workspaces/{id}` answers (to any session token
    /// added with [`FakeLitellm::add_coder_session`]).
    pub fn add_coder_workspace(&self, id: &str, name: &str, owner_id: &str, owner_name: &str) {
        self.inner.shared.lock().coder_workspaces.insert(
            id.to_string(),
            (
                name.to_string(),
                owner_id.to_string(),
                owner_name.to_string(),
            ),
        );
    }

    /// Takes the fake down (connections refused) or brings it back on the same port.
    pub async fn set_down(&self, down: bool) {
        self.inner
            .server
            .set_down(down)
            .await
            .unwrap_or_else(|e| panic!("fake LiteLLM cannot listen again: {e}"));
    }

    /// `POST /v1/chat/completions` with `key` as bearer for `model`: the status and body.
    pub async fn chat(&self, key: &str, model: &str) -> (u16, Value) {
        let r = reqwest::Client::new()
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&json!({"model": model, "messages": [{"role": "user", "content": "Hello"}]}))
            .send()
            .await
            .expect("fake LiteLLM reachable");
        let status = r.status().as_u16();
        let body = r.json().await.unwrap_or(Value::Null);
        (status, body)
    }
}

fn now_of(l: &Ledger) -> OffsetDateTime {
    OffsetDateTime::now_utc() + time::Duration::seconds(l.skew_secs)
}

/// Records every request and applies `fail_next`.
async fn record(
    State(shared): State<Arc<Shared>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 1024 * 1024)
        .await
        .unwrap_or_default();
    let auth = match credential(&parts.headers) {
        Ok(Some(v)) if sha256_hex(&v) == shared.master_hash => CallAuth::Master,
        Ok(Some(v)) => {
            let h = hash_token(&v);
            if shared.lock().keys.contains_key(&h) {
                CallAuth::Virtual(h)
            } else {
                CallAuth::Rejected
            }
        }
        Ok(None) => CallAuth::None,
        Err(_) => CallAuth::Rejected,
    };
    let failing = {
        let mut l = shared.lock();
        l.calls.push(Call {
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().map(str::to_string),
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            auth,
            changed_by: parts
                .headers
                .get("litellm-changed-by")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        });
        if l.fail_next > 0 {
            l.fail_next -= 1;
            Some(l.fail_status)
        } else {
            None
        }
    };
    if let Some(status) = failing {
        // A 401/403 is LiteLLM refusing the credential, as the real proxy words it.
        return match status {
            401 => fixture_response(401, "error-401-invalid-key.json"),
            403 => fixture_response(403, "error-403-route-not-allowed.json"),
            _ => proxy_error(status, "injected failure", "internal_server_error", None),
        };
    }
    // Every proxy route checks the body before authenticating; the fake Coder does not.
    if !parts.uri.path().starts_with("/api/v2/")
        && let Ok(body) = serde_json::from_slice::<Value>(&bytes)
        && let Some(param) = banned_param_in(&body)
    {
        return banned_param_refusal(&param);
    }
    if parts.uri.path() == "/key/generate" {
        let mut open = shared.generates_open.subscribe();
        let _ = open.wait_for(|o| *o).await;
    }
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
    .await
}

/// The credential of a request, by the reference's header order. `Err` is the 401 to answer.
fn credential(headers: &HeaderMap) -> Result<Option<String>, Response> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    if let Some(v) = get("x-litellm-api-key") {
        return Ok(Some(
            v.strip_prefix("Bearer ").unwrap_or(&v).trim().to_string(),
        ));
    }
    if let Some(v) = get("authorization") {
        for prefix in ["Bearer ", "bearer ", "Basic "] {
            if let Some(rest) = v.strip_prefix(prefix) {
                return Ok(Some(rest.trim().to_string()));
            }
        }
        return Err(fixture_response(401, "error-401-malformed-header.json"));
    }
    for name in [
        "api-key",
        "x-api-key",
        "x-goog-api-key",
        "ocp-apim-subscription-key",
    ] {
        if let Some(v) = get(name) {
            return Ok(Some(v.trim().to_string()));
        }
    }
    Ok(None)
}

/// Who is calling: the master key, or a live virtual key (by hash); `Err` is the answer.
enum Caller {
    Master,
    Virtual(String),
}

fn authenticate(shared: &Shared, headers: &HeaderMap) -> Result<Caller, Response> {
    let Some(value) = credential(headers)? else {
        return Err(fixture_response(401, "error-401-no-key.json"));
    };
    // The master key is compared in constant time by the real proxy; equality of digests is
    // good enough for a double.
    if sha256_hex(&value) == shared.master_hash {
        return Ok(Caller::Master);
    }
    let hash = hash_token(&value);
    let l = shared.lock();
    let Some(k) = l.keys.get(&hash) else {
        return Err(fixture_response(401, "error-401-invalid-key.json"));
    };
    if k.blocked {
        return Err(fixture_response(401, "error-401-blocked-key.json"));
    }
    let now = now_of(&l);
    if let Some(exp) = k.expires
        && exp <= now
    {
        return Err(proxy_error(
            401,
            &format!(
                "Authentication Error - Expired Key. Key Expiry time {} and current time {}",
                iso(exp),
                iso(now)
            ),
            "expired_key",
            Some(&k.key_name),
        ));
    }
    Ok(Caller::Virtual(hash))
}

/// The routes a key of this `key_type` may call (LiteLLM's `handle_key_type`); `Err` for a
/// value that is not one of LiteLLM's `LiteLLMKeyType`s (a 422 there).
fn allowed_routes_for(key_type: Option<&Value>) -> Result<Vec<String>, Response> {
    let routes = |r: &str| Ok(vec![r.to_string()]);
    match key_type {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(t)) => match t.as_str() {
            "llm_api" => routes("llm_api_routes"),
            "management" => routes("management_routes"),
            "read_only" => routes("info_routes"),
            "default" => Ok(Vec::new()),
            _ => Err((
                StatusCode::UNPROCESSABLE_ENTITY,
                axum::Json(
                    json!({"detail": [{"type": "enum", "loc": ["body", "key_type"],
                    "msg": "Input should be 'llm_api', 'management', 'read_only' or 'default'"}]}),
                ),
            )
                .into_response()),
        },
        Some(_) => Err(validation_error("key_type: Input should be a valid string")),
    }
}

/// Python's `repr` of a list of strings, as LiteLLM's messages show `allowed_routes`.
fn py_list(items: &[String]) -> String {
    let inner: Vec<String> = items.iter().map(|i| format!("'{i}'")).collect();
    format!("[{}]", inner.join(", "))
}

/// LiteLLM's route checks for a management route (`route_checks.py`): the master key passes.
/// A virtual key must first be allowed the route by its `allowed_routes` (from `key_type`:
/// an `llm_api` key gets 403 "Virtual key is not allowed to call this route"); then, having no
/// proxy-admin role, it may only read info routes (`/key/info`, for its own key — checked by
/// the handler), and anything else is LiteLLM's 401 "Only proxy admin can be used ...".
fn management(shared: &Shared, headers: &HeaderMap, route: &str) -> Result<Caller, Response> {
    let caller = authenticate(shared, headers)?;
    let Caller::Virtual(hash) = &caller else {
        return Ok(caller);
    };
    let allowed = shared
        .lock()
        .keys
        .get(hash)
        .map(|k| k.allowed_routes.clone())
        .unwrap_or_default();
    let info_route = route == "/key/info";
    if !allowed.is_empty() {
        let ok = allowed
            .iter()
            .any(|a| a == route || a == "management_routes" || (a == "info_routes" && info_route));
        if !ok {
            // A bare FastAPI HTTPException here: `{"detail": "..."}`, not the error envelope.
            return Err((
                StatusCode::FORBIDDEN,
                axum::Json(json!({"detail": format!(
                    "Virtual key is not allowed to call this route. Only allowed to call routes: \
                     {}. Tried to call route: {route}",
                    py_list(&allowed)
                )})),
            )
                .into_response());
        }
    }
    if info_route {
        return Ok(caller);
    }
    Err(proxy_error(
        401,
        &format!(
            "Authentication Error, Only proxy admin can be used to generate, delete, update info \
             for new keys/users/teams. Route={route}. Your role=unknown. Your user_id=*******"
        ),
        "auth_error",
        Some("None"),
    ))
}

/// LiteLLM's client-side parameters that no request body may carry
/// (`tests/fixtures/litellm/banned-request-body-params.json`, read from the real proxy's
/// `auth_utils.py`).
fn banned_params() -> &'static std::collections::HashSet<String> {
    static BANNED: std::sync::OnceLock<std::collections::HashSet<String>> =
        std::sync::OnceLock::new();
    BANNED.get_or_init(|| {
        let v = fixtures::json("litellm/banned-request-body-params.json");
        v["params"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// The first banned parameter anywhere in `v`, at any depth. The real proxy looks at the root,
/// `metadata`, `litellm_metadata`, `extra_body`, `litellm_embedding_config`, fallbacks and
/// `litellm_params.metadata` (also JSON text in those places); the double refuses a banned name
/// wherever it is, which is stricter and so catches every body the real one refuses.
fn banned_param_in(v: &Value) -> Option<String> {
    match v {
        Value::Object(m) => m.iter().find_map(|(k, v)| {
            if banned_params().contains(k) {
                Some(k.clone())
            } else {
                banned_param_in(v)
            }
        }),
        Value::Array(a) => a.iter().find_map(banned_param_in),
        Value::String(s) if s.trim_start().starts_with('{') => serde_json::from_str::<Value>(s)
            .ok()
            .and_then(|inner| banned_param_in(&inner)),
        _ => None,
    }
}

/// LiteLLM's answer to a banned parameter: `is_request_body_safe` raises a `ValueError` before
/// any authentication, which the auth handler turns into a 401 `auth_error`.
fn banned_param_refusal(param: &str) -> Response {
    proxy_error(
        401,
        &format!(
            "Authentication Error, Rejected Request: {param} is not allowed in request body. \
             Clientside passthrough requires explicit admin opt-in via either \
             `general_settings.allow_client_side_credentials = true` (proxy-wide) or \
             `configurable_clientside_auth_params` on the deployment in your proxy config.yaml. \
             Relevant Issue: https://huntr.com/bounties/4001e1a2-7b7a-4776-a3ae-e6692ec3d997"
        ),
        "auth_error",
        Some("None"),
    )
}

fn json_object(body: &Bytes) -> Result<serde_json::Map<String, Value>, Response> {
    if body.is_empty() {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(validation_error("Input should be a valid dictionary")),
    }
}

fn new_key() -> String {
    let bytes: [u8; 16] = rand::rng().random();
    format!("sk-{}", URL_SAFE_NO_PAD.encode(bytes))
}

fn row_json(k: &KeyRow) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("key_name".into(), json!(k.key_name));
    m.insert("key_alias".into(), json!(k.key_alias));
    m.insert("spend".into(), json!(k.spend));
    m.insert("expires".into(), json!(k.expires.map(iso)));
    m.insert("models".into(), json!(k.models));
    m.insert("user_id".into(), json!(k.user_id));
    m.insert("team_id".into(), json!(k.team_id));
    m.insert(
        "max_parallel_requests".into(),
        json!(k.max_parallel_requests),
    );
    m.insert("metadata".into(), k.metadata.clone());
    m.insert(
        "blocked".into(),
        if k.blocked { json!(true) } else { Value::Null },
    );
    m.insert("tpm_limit".into(), json!(k.tpm_limit));
    m.insert("rpm_limit".into(), json!(k.rpm_limit));
    m.insert("max_budget".into(), json!(k.max_budget));
    m.insert("budget_duration".into(), json!(k.budget_duration));
    m.insert("allowed_routes".into(), json!(k.allowed_routes));
    m.insert("key_type".into(), json!(k.key_type));
    m.insert("created_at".into(), json!(iso(k.created_at)));
    m.insert("created_by".into(), json!("default_user_id"));
    m.insert("updated_at".into(), json!(iso(k.updated_at)));
    m.insert("updated_by".into(), json!("default_user_id"));
    m
}

/// The generate/regenerate answer: the fixture's shape with this key's values.
fn generate_answer(k: &KeyRow, plaintext: &str, token_field: Value) -> Value {
    let mut v = fixtures::json("litellm/key-generate.response.json");
    if let Some(m) = v.as_object_mut() {
        for (field, value) in row_json(k) {
            if m.contains_key(&field) {
                m.insert(field, value);
            }
        }
        m.insert("key".into(), json!(plaintext));
        m.insert("token".into(), token_field);
        m.insert("token_id".into(), json!(k.token));
        m.insert("duration".into(), Value::Null);
        m.insert("tags".into(), Value::Null);
    }
    v
}

async fn generate(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = management(&shared, &headers, "/key/generate") {
        return r;
    }
    let b = match json_object(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let allowed_routes = match allowed_routes_for(b.get("key_type")) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let tags_set = b
        .get("tags")
        .is_some_and(|t| !t.is_null() && t != &json!([]));
    if tags_set && !shared.config.enterprise {
        return fixture_response(403, "error-403-enterprise-field.json");
    }
    let plaintext = match b.get("key").and_then(Value::as_str) {
        Some(k) if !k.starts_with("sk-") || k.len() < 16 => {
            return proxy_error(
                400,
                "Invalid key format. LiteLLM Virtual Key must start with 'sk-'.",
                "bad_request_error",
                Some("key"),
            );
        }
        Some(k) => k.to_string(),
        None => new_key(),
    };
    let alias = b
        .get("key_alias")
        .and_then(Value::as_str)
        .map(str::to_string);
    if let Some(a) = &alias
        && (a.split('/').any(|s| s == "..") || a.contains("..") || a.chars().any(char::is_control))
    {
        return proxy_error(
            400,
            &format!("Invalid key_alias: {a}"),
            "bad_request_error",
            Some("key_alias"),
        );
    }
    let max_budget = b.get("max_budget").and_then(Value::as_f64);
    if b.get("max_budget").is_some_and(|v| !v.is_null())
        && max_budget.is_none_or(|m| !m.is_finite() || m < 0.0)
    {
        return proxy_error(
            400,
            "max_budget must be a finite number >= 0",
            "bad_request_error",
            Some("max_budget"),
        );
    }
    let duration = match b.get("duration") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match parse_duration(s) {
            Some(secs) => Some(secs),
            None => {
                return proxy_error(
                    400,
                    &format!("Invalid duration format: {s}"),
                    "bad_request_error",
                    Some("duration"),
                );
            }
        },
        Some(_) => return validation_error("duration: Input should be a valid string"),
    };
    let mut l = shared.lock();
    if let Some(a) = &alias
        && l.keys.values().any(|k| k.key_alias.as_deref() == Some(a))
    {
        return proxy_error(
            400,
            &format!(
                "Key with alias '{a}' already exists. Unique key aliases across all keys are required."
            ),
            "bad_request_error",
            Some("key_alias"),
        );
    }
    let now = now_of(&l);
    let token = sha256_hex(&plaintext);
    let strings = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let row = KeyRow {
        token: token.clone(),
        key_name: masked(&plaintext),
        key_alias: alias,
        models: strings(b.get("models")),
        max_budget,
        budget_duration: b
            .get("budget_duration")
            .and_then(Value::as_str)
            .map(str::to_string),
        rpm_limit: b.get("rpm_limit").and_then(Value::as_u64),
        tpm_limit: b.get("tpm_limit").and_then(Value::as_u64),
        max_parallel_requests: b.get("max_parallel_requests").and_then(Value::as_u64),
        key_type: b
            .get("key_type")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string(),
        allowed_routes,
        team_id: b.get("team_id").and_then(Value::as_str).map(str::to_string),
        user_id: b.get("user_id").and_then(Value::as_str).map(str::to_string),
        metadata: b
            .get("metadata")
            .cloned()
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({})),
        expires: duration.map(|d| now + time::Duration::seconds(d)),
        blocked: b.get("blocked").and_then(Value::as_bool).unwrap_or(false),
        spend: b.get("spend").and_then(Value::as_f64).unwrap_or(0.0),
        created_at: now,
        updated_at: now,
    };
    let answer = generate_answer(&row, &plaintext, json!(token));
    l.keys.insert(token, row);
    axum::Json(answer).into_response()
}

async fn update(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = management(&shared, &headers, "/key/update") {
        return r;
    }
    let b = match json_object(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut l = shared.lock();
    let now = now_of(&l);
    let sent = b.get("key").and_then(Value::as_str).map(str::to_string);
    let hash = match (&sent, b.get("key_alias").and_then(Value::as_str)) {
        (Some(k), _) => hash_token(k),
        (None, Some(a)) => match l.keys.values().find(|k| k.key_alias.as_deref() == Some(a)) {
            Some(k) => k.token.clone(),
            None => return fixture_response(404, "error-404-update-key-not-found.json"),
        },
        (None, None) => {
            return validation_error("Value error, either key or key_alias must be provided");
        }
    };
    let Some(k) = l.keys.get_mut(&hash) else {
        return fixture_response(404, "error-404-update-key-not-found.json");
    };
    if let Some(v) = b.get("max_budget") {
        k.max_budget = v.as_f64();
    }
    if let Some(v) = b.get("metadata") {
        k.metadata = v.clone();
    }
    if let Some(v) = b.get("rpm_limit") {
        k.rpm_limit = v.as_u64();
    }
    if let Some(v) = b.get("models").and_then(Value::as_array) {
        k.models = v
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect();
    }
    if let Some(v) = b.get("duration") {
        k.expires = v
            .as_str()
            .and_then(parse_duration)
            .map(|d| now + time::Duration::seconds(d));
    }
    k.updated_at = now;
    let mut m = row_json(k);
    m.insert("key".into(), json!(sent.unwrap_or_else(|| k.token.clone())));
    m.insert("token".into(), json!(k.token));
    axum::Json(Value::Object(m)).into_response()
}

async fn delete_keys(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = management(&shared, &headers, "/key/delete") {
        return r;
    }
    let b = match json_object(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let list = |name: &str| -> Vec<String> {
        b.get(name)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let (keys, aliases) = (list("keys"), list("key_aliases"));
    if keys.is_empty() && aliases.is_empty() {
        return fixture_response(422, "error-422-validation.json");
    }
    let mut l = shared.lock();
    let (sent, hashes): (Vec<String>, Vec<Option<String>>) = if !keys.is_empty() {
        let h = keys
            .iter()
            .map(|k| Some(hash_token(k)).filter(|h| l.keys.contains_key(h)))
            .collect();
        (keys, h)
    } else {
        let h = aliases
            .iter()
            .map(|a| {
                l.keys
                    .values()
                    .find(|k| k.key_alias.as_deref() == Some(a))
                    .map(|k| k.token.clone())
            })
            .collect();
        (aliases, h)
    };
    let found: Vec<String> = hashes.iter().flatten().cloned().collect();
    if found.is_empty() {
        return fixture_response(404, "error-404-delete-no-keys.json");
    }
    if found.len() < sent.len() {
        return proxy_error(
            400,
            &format!(
                "Not all keys passed in were deleted. This probably means you don't have access to delete all the keys passed in. Keys passed in={}, Deleted keys ={}",
                sent.len(),
                found.len()
            ),
            "bad_request_error",
            None,
        );
    }
    let now = now_of(&l);
    for h in found {
        if let Some(mut row) = l.keys.remove(&h) {
            // A deleted row's `updated_at` is when it was deleted (see `deleted_key`).
            row.updated_at = now;
            l.deleted.insert(h, row);
        }
    }
    axum::Json(json!({"deleted_keys": sent})).into_response()
}

async fn info(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let caller = match management(&shared, &headers, "/key/info") {
        Ok(c) => c,
        Err(r) => return r,
    };
    let sent = match (q.get("key").cloned(), &caller) {
        (Some(k), _) => k,
        (None, Caller::Virtual(own)) => own.clone(),
        (None, Caller::Master) => {
            return validation_error("key is required when calling /key/info with the master key");
        }
    };
    let l = shared.lock();
    let hash = hash_token(&sent);
    // A virtual key reads the info of keys of its own user (keys without a user share None).
    if let Caller::Virtual(own) = &caller
        && let Some(target) = l.keys.get(&hash)
        && l.keys.get(own).map(|k| &k.user_id) != Some(&target.user_id)
    {
        return proxy_error(
            403,
            "You are not allowed to access this key's info. Your role=unknown",
            "auth_error",
            None,
        );
    }
    let now = now_of(&l);
    let (row, status) = match (l.keys.get(&hash), l.deleted.get(&hash)) {
        (Some(k), _) if k.blocked => (k, "revoked"),
        (Some(k), _) if k.expires.is_some_and(|e| e <= now) => (k, "expired"),
        (Some(k), _) => (k, "active"),
        (None, Some(k)) => (k, "deleted"),
        (None, None) => return fixture_response(404, "error-404-info-key-not-found.json"),
    };
    let mut m = row_json(row);
    m.insert("status".into(), json!(status));
    axum::Json(json!({"key": sent, "info": Value::Object(m)})).into_response()
}

async fn list(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Err(r) = management(&shared, &headers, "/key/list") {
        return r;
    }
    let page: usize = q.get("page").and_then(|p| p.parse().ok()).unwrap_or(1);
    let size: usize = q.get("size").and_then(|p| p.parse().ok()).unwrap_or(10);
    if page < 1 || !(1..=100).contains(&size) {
        return validation_error("page must be >= 1 and size between 1 and 100");
    }
    let full = q.get("return_full_object").is_some_and(|v| v == "true");
    let l = shared.lock();
    let mut rows: Vec<&KeyRow> = l
        .keys
        .values()
        .filter(|k| {
            q.get("key_alias")
                .is_none_or(|a| k.key_alias.as_deref() == Some(a))
        })
        .filter(|k| {
            q.get("team_id")
                .is_none_or(|t| k.team_id.as_deref() == Some(t))
        })
        .collect();
    rows.sort_by_key(|k| std::cmp::Reverse(k.created_at));
    let total = rows.len();
    let keys: Vec<Value> = rows
        .iter()
        .skip((page - 1) * size)
        .take(size)
        .map(|k| {
            if full {
                let mut m = row_json(k);
                m.insert("token".into(), json!(k.token));
                Value::Object(m)
            } else {
                json!(k.token)
            }
        })
        .collect();
    axum::Json(json!({
        "keys": keys,
        "total_count": total,
        "current_page": page,
        "total_pages": total.div_ceil(size),
    }))
    .into_response()
}

fn regenerate(shared: &Shared, headers: &HeaderMap, key: Option<String>, body: &Bytes) -> Response {
    if let Err(r) = management(shared, headers, "/key/regenerate") {
        return r;
    }
    let b = match json_object(body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if !shared.config.enterprise {
        return proxy_error(
            500,
            "Regenerating Virtual Keys is an Enterprise feature, Get a free trial at https://www.litellm.ai/enterprise",
            "internal_server_error",
            None,
        );
    }
    let Some(sent) = b
        .get("key")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or(key)
    else {
        return proxy_error(400, "No key passed in.", "bad_request_error", Some("key"));
    };
    let mut l = shared.lock();
    let now = now_of(&l);
    let Some(mut row) = l.keys.remove(&hash_token(&sent)) else {
        return proxy_error(
            404,
            &format!("Key {sent} not found."),
            "not_found_error",
            Some("key"),
        );
    };
    let plaintext = b
        .get("new_key")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(new_key);
    let mut old = row.clone();
    old.updated_at = now_of(&l);
    l.deleted.insert(row.token.clone(), old);
    row.token = sha256_hex(&plaintext);
    row.key_name = masked(&plaintext);
    if let Some(d) = b
        .get("duration")
        .and_then(Value::as_str)
        .and_then(parse_duration)
    {
        row.expires = Some(now + time::Duration::seconds(d));
    }
    row.updated_at = now;
    let answer = generate_answer(&row, &plaintext, Value::Null);
    l.keys.insert(row.token.clone(), row);
    axum::Json(answer).into_response()
}

async fn regenerate_body(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    regenerate(&shared, &headers, None, &body)
}

async fn regenerate_path(
    State(shared): State<Arc<Shared>>,
    Path(rest): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match rest.strip_suffix("/regenerate") {
        Some(key) if !key.is_empty() => regenerate(&shared, &headers, Some(key.to_string()), &body),
        _ => proxy_error(404, "Not Found", "not_found_error", None),
    }
}

async fn chat(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let caller = match authenticate(&shared, &headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let b = match json_object(&body) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Some(model) = b.get("model").and_then(Value::as_str).map(str::to_string) else {
        return proxy_error(
            400,
            "Invalid model name passed in model=None",
            "invalid_request_error",
            Some("model"),
        );
    };
    if let Caller::Virtual(hash) = caller {
        let mut l = shared.lock();
        let minute = now_of(&l).unix_timestamp() / 60;
        let Some(k) = l.keys.get(&hash).cloned() else {
            return fixture_response(401, "error-401-invalid-key.json");
        };
        if !k.models.is_empty() && !k.models.contains(&model) {
            return proxy_error(
                403,
                &format!(
                    "key not allowed to access model. This key can only access models={:?}. Tried to access {model}",
                    k.models
                ),
                "key_model_access_denied",
                Some("model"),
            );
        }
        if let Some(max) = k.max_budget
            && k.spend >= max
        {
            return proxy_error(
                422,
                &format!(
                    "Budget has been exceeded! Key={} ({}) Current cost: {}, Max budget: {max}",
                    k.key_alias.clone().unwrap_or_default(),
                    k.key_name,
                    k.spend
                ),
                "budget_exceeded",
                None,
            );
        }
        let count = l.minute_counts.entry((hash.clone(), minute)).or_insert(0);
        if let Some(rpm) = k.rpm_limit
            && *count >= rpm
        {
            let mut r = proxy_error(
                429,
                &format!(
                    "Rate limit exceeded for api_key: {hash}. Limit type: requests. Current limit: {rpm}, Remaining: 0."
                ),
                "rate_limit_error",
                None,
            );
            r.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("60"));
            return r;
        }
        *count += 1;
        if let Some(row) = l.keys.get_mut(&hash) {
            row.spend += shared.config.cost_per_call;
        }
    }
    let _ = (method, uri);
    axum::Json(json!({
        "id": "chatcmpl-fake-litellm",
        "object": "chat.completion",
        "created": OffsetDateTime::now_utc().unix_timestamp(),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the fake LiteLLM."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    }))
    .into_response()
}

/// `GET /v1/models`: the models the calling key may use (the master key: every model some key
/// names), in OpenAI's list shape, as the real proxy answers a virtual key.
async fn models(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let caller = match authenticate(&shared, &headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let l = shared.lock();
    let mut names: Vec<String> = match caller {
        Caller::Virtual(hash) => l
            .keys
            .get(&hash)
            .map(|k| k.models.clone())
            .unwrap_or_default(),
        Caller::Master => l.keys.values().flat_map(|k| k.models.clone()).collect(),
    };
    names.sort();
    names.dedup();
    let data: Vec<Value> = names
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 1677610602, "owned_by": "openai"}))
        .collect();
    axum::Json(json!({"data": data, "object": "list"})).into_response()
}

/// Fake Coder: `GET /api/v2/workspaces/{id}` with `Coder-Session-Token` (codersdk's
/// `Workspace`, the fields a broker reads); 404 for an unknown id, 401 without a session.
async fn coder_workspace(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let token = headers
        .get("coder-session-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let l = shared.lock();
    if !l.coder_sessions.contains_key(token) {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"message": "You must be logged in to use this resource."})),
        )
            .into_response();
    }
    match l.coder_workspaces.get(&id) {
        Some((name, owner_id, owner_name)) => axum::Json(json!({
            "id": id, "name": name, "owner_id": owner_id, "owner_name": owner_name,
            "template_name": "docker", "outdated": false
        }))
        .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(
                json!({"message": "Resource not found or you do not have access to this resource"}),
            ),
        )
            .into_response(),
    }
}

/// Fake Coder: `GET /api/v2/users/me` with `Coder-Session-Token`.
async fn coder_me(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let token = headers
        .get("coder-session-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let found = shared.lock().coder_sessions.get(token).cloned();
    match found {
        Some((id, username)) => axum::Json(json!({
            "id": id,
            "username": username,
            "email": format!("{username}@example.com"),
            "status": "active",
            "login_type": "password"
        }))
        .into_response(),
        None => (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({
                "message": "You must be logged in to use this resource.",
                "detail": "Session token is invalid or expired."
            })),
        )
            .into_response(),
    }
}

/// Which LiteLLM proxy a suite runs against: always this double, and the REAL proxy as well
/// when `BOTCREDS_REAL_LITELLM_URL` (and `BOTCREDS_REAL_LITELLM_MASTER_KEY`) name one, as
/// `tests/litellm-real/litellm_real.py start` prints. Checks that must hold on both go through
/// LiteLLM's own API (`/key/list`, `/v1/models`); fault injection needs [`LitellmBackend::fake`].
#[derive(Clone)]
pub struct LitellmBackend {
    /// `fake` or `real <version>`, for assertion messages.
    pub label: String,
    pub url: String,
    pub master_key: String,
    fake: Option<FakeLitellm>,
}

/// The environment variables naming a running real proxy.
pub const REAL_URL_ENV: &str = "BOTCREDS_REAL_LITELLM_URL";
pub const REAL_MASTER_KEY_ENV: &str = "BOTCREDS_REAL_LITELLM_MASTER_KEY";

impl LitellmBackend {
    pub fn of_fake(fake: &FakeLitellm) -> LitellmBackend {
        LitellmBackend {
            label: "fake".into(),
            url: fake.base_url(),
            master_key: fake.master_key().to_string(),
            fake: Some(fake.clone()),
        }
    }

    /// The real proxy named by the environment, if any. A URL without a master key is a broken
    /// setup and panics with what to set.
    pub fn real_from_env() -> Option<LitellmBackend> {
        let url = std::env::var(REAL_URL_ENV).ok().filter(|u| !u.is_empty())?;
        let master_key = std::env::var(REAL_MASTER_KEY_ENV)
            .unwrap_or_else(|_| panic!("{REAL_URL_ENV} is set but {REAL_MASTER_KEY_ENV} is not"));
        let version = std::env::var("BOTCREDS_REAL_LITELLM_VERSION").unwrap_or_default();
        Some(LitellmBackend {
            label: format!("real {version}").trim().to_string(),
            url: url.trim_end_matches('/').to_string(),
            master_key,
            fake: None,
        })
    }

    /// A fresh double, and the real proxy when the environment names one.
    pub async fn all() -> Vec<LitellmBackend> {
        let fake = FakeLitellm::start(FakeLitellmConfig::default()).await;
        let mut out = vec![LitellmBackend::of_fake(&fake)];
        out.extend(LitellmBackend::real_from_env());
        out
    }

    /// The double, when this is it (for fault injection and call records).
    pub fn fake(&self) -> Option<&FakeLitellm> {
        self.fake.as_ref()
    }

    pub fn is_real(&self) -> bool {
        self.fake.is_none()
    }

    fn http() -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("HTTP client")
    }

    /// `GET /v1/models` with `key`: the status and the model ids it may use. A deleted or
    /// unknown key is 401 on both.
    pub async fn models_of(&self, key: &str) -> (u16, Vec<String>) {
        let r = Self::http()
            .get(format!("{}/v1/models", self.url))
            .bearer_auth(key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{} LiteLLM unreachable: {e}", self.label));
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        let mut ids: Vec<String> = body["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        (status, ids)
    }

    /// The stored key with this alias, as `/key/list?return_full_object=true` shows it
    /// (`metadata`, `max_budget`, `budget_duration`, `key_type`, ...).
    pub async fn key_by_alias(&self, alias: &str) -> Option<Value> {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/key/list", self.url),
            &[
                ("key_alias", alias),
                ("return_full_object", "true"),
                ("size", "100"),
            ],
        )
        .expect("key list URL");
        let r = Self::http()
            .get(url)
            .bearer_auth(&self.master_key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{} LiteLLM unreachable: {e}", self.label));
        assert_eq!(r.status().as_u16(), 200, "{}: /key/list", self.label);
        let body: Value = r.json().await.unwrap_or(Value::Null);
        body["keys"].as_array().and_then(|keys| {
            keys.iter()
                .find(|k| k["key_alias"].as_str() == Some(alias))
                .cloned()
        })
    }
}

/// A short random tag for names in suites that may share one real proxy with other runs: its
/// key aliases are unique across the proxy's keys.
pub fn run_tag() -> String {
    let n: u32 = rand::rng().random();
    format!("{n:08x}")
}
