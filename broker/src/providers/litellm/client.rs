//! The real LiteLLM client: key management calls with the master key as bearer, bounded in
//! time and size, mapped onto [`LitellmError`] (401/403 refusing the credential → auth failed;
//! 401/403 refusing the request, and other statuses →
//! LiteLLM error, transport failures → unavailable).

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use zeroize::Zeroizing;

use super::{
    GenerateKey, GeneratedKey, KeyInfo, LitellmApi, LitellmError, LitellmStats, StatsCounters,
    scrub,
};
use crate::secret::{Secret, sha256_hex};

const USER_AGENT: &str = concat!("botcreds/", env!("CARGO_PKG_VERSION"));
/// Largest response body read from LiteLLM; key answers are a few KiB.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// What the client needs to reach LiteLLM.
#[derive(Clone, Debug)]
pub struct LitellmClientConfig {
    /// The proxy's URL, e.g. `http://litellm:4000`.
    pub url: String,
    pub master_key: Secret,
    /// Bound on each HTTP exchange, body included.
    pub request_timeout: Duration,
    /// Who the broker says it is in `litellm-changed-by` (LiteLLM's audit trail).
    pub changed_by: String,
}

/// The real LiteLLM client.
pub struct LitellmClient {
    http: reqwest::Client,
    base: String,
    master_key: Secret,
    timeout: Duration,
    changed_by: String,
    stats: StatsCounters,
}

impl std::fmt::Debug for LitellmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LitellmClient")
            .field("url", &self.base)
            .finish_non_exhaustive()
    }
}

struct Reply {
    status: u16,
    /// Zeroized on drop: generate answers hold a key.
    body: Zeroizing<Vec<u8>>,
}

impl LitellmClient {
    pub fn new(config: LitellmClientConfig) -> Result<LitellmClient, LitellmError> {
        let base = config.url.trim_end_matches('/').to_string();
        let parsed = reqwest::Url::parse(&base).map_err(|e| LitellmError::Config {
            message: format!("url {base:?} is not a URL: {e}"),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(LitellmError::Config {
                message: format!("url {base:?} is not an http(s) URL"),
            });
        }
        if config.master_key.expose().trim().is_empty() {
            return Err(LitellmError::Config {
                message: "the master key is empty".into(),
            });
        }
        if config.request_timeout.is_zero() {
            return Err(LitellmError::Config {
                message: "the request timeout must be longer than zero".into(),
            });
        }
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout)
            // Never carry the master key along a redirect.
            .redirect(reqwest::redirect::Policy::none())
            // Key operations are rare: a fresh connection each time, so a connection the proxy
            // (or a load balancer) closed while idle never fails a key operation.
            .pool_max_idle_per_host(0)
            .user_agent(USER_AGENT)
            .build()
            .map_err(|e| LitellmError::Config {
                message: format!("cannot build the HTTP client: {e}"),
            })?;
        Ok(LitellmClient {
            http,
            base,
            master_key: Secret::new(config.master_key.expose().trim()),
            timeout: config.request_timeout,
            changed_by: config.changed_by,
            stats: StatsCounters::default(),
        })
    }

    async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> Result<Reply, LitellmError> {
        let mut request = self
            .http
            .request(method, format!("{}{}", self.base, path_and_query))
            // bearer_auth marks the header sensitive, so it stays out of Debug output.
            .bearer_auth(self.master_key.expose())
            .header("litellm-changed-by", &self.changed_by);
        if let Some(body) = body {
            request = request.json(body);
        }
        let mut response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                self.stats.call(false);
                return Err(self.transport_error(&e));
            }
        };
        let status = response.status().as_u16();
        self.stats.call(response.status().is_success());
        let mut body = Zeroizing::new(Vec::new());
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                        return Err(LitellmError::InvalidResponse {
                            message: "the answer is larger than 1 MiB".into(),
                        });
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => return Err(self.transport_error(&e)),
            }
        }
        Ok(Reply { status, body })
    }

    fn transport_error(&self, e: &reqwest::Error) -> LitellmError {
        let message = if e.is_timeout() {
            format!("no answer from {} within {:?}", self.base, self.timeout)
        } else if e.is_connect() {
            format!("cannot connect to {}", self.base)
        } else {
            format!("exchange with {} failed", self.base)
        };
        LitellmError::Unavailable { message }
    }

    /// LiteLLM answers 401/403 both for a credential it refuses and for a request it refuses
    /// (a banned body parameter, an Enterprise-only field). Only the first is the master key's
    /// fault; the body's message tells them apart.
    fn error_for(reply: &Reply) -> LitellmError {
        let message = upstream_message(&reply.body, reply.status);
        match reply.status {
            401 | 403 if credential_refused(&reply.body) => LitellmError::AuthFailed {
                status: reply.status,
                message,
            },
            status => LitellmError::Upstream { status, message },
        }
    }
}

/// LiteLLM's own error text (`error.message`, or a validation `detail[0].msg`), scrubbed.
fn upstream_message(body: &[u8], status: u16) -> String {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let text = parsed.as_ref().and_then(|v| {
        v.pointer("/error/message")
            .and_then(Value::as_str)
            .or_else(|| v.pointer("/detail/0/msg").and_then(Value::as_str))
            .or_else(|| v.get("detail").and_then(Value::as_str))
            .map(str::to_string)
    });
    match text {
        Some(t) => scrub(&t),
        None => format!("status {status} without a LiteLLM error body"),
    }
}

/// What LiteLLM (1.106.2, `user_api_key_auth.py`, `route_checks.py`) says when it refuses the
/// credential itself: none, malformed, unknown, expired or blocked, or a key that is not the
/// proxy admin's (a virtual key configured as the master key).
const CREDENTIAL_REFUSALS: &[&str] = &[
    "no api key passed in",
    "malformed api key",
    "invalid api key",
    "invalid proxy server token",
    "expired key",
    "key is blocked",
    "virtual key is not allowed to call this route",
    "only proxy admin can be used",
];

/// Whether a 401/403 body says the credential was refused. A body without LiteLLM's error text
/// (a gateway in front of it, say) counts as a refused credential: nothing names the request.
fn credential_refused(body: &[u8]) -> bool {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let Some(text) = parsed.as_ref().and_then(|v| {
        v.pointer("/error/message")
            .or_else(|| v.get("detail"))
            .and_then(Value::as_str)
    }) else {
        return true;
    };
    let text = text.to_ascii_lowercase();
    CREDENTIAL_REFUSALS.iter().any(|m| text.contains(m))
}

fn parse_time(v: Option<&Value>) -> Option<OffsetDateTime> {
    let s = v?.as_str()?;
    OffsetDateTime::parse(s, &Rfc3339)
        .ok()
        .or_else(|| OffsetDateTime::parse(&format!("{s}Z"), &Rfc3339).ok())
}

fn invalid(message: &str) -> LitellmError {
    LitellmError::InvalidResponse {
        message: message.to_string(),
    }
}

/// The fields of a `/key/generate` answer the broker reads (reference fixtures README).
#[derive(serde::Deserialize)]
struct GenerateAnswer {
    key: Option<String>,
    token: Option<String>,
    token_id: Option<String>,
    expires: Option<Value>,
}

/// The body of `POST /key/generate` (reference §2, §11).
pub(crate) fn generate_body(r: &GenerateKey) -> Value {
    let mut body = json!({
        "key_alias": r.key_alias,
        "duration": format!("{}s", r.duration_secs),
        "models": r.models,
        "max_budget": r.max_budget,
        "rpm_limit": r.rpm_limit,
        "key_type": "llm_api",
        "metadata": r.metadata,
    });
    if let (Some(period), Some(obj)) = (&r.budget_duration, body.as_object_mut()) {
        obj.insert("budget_duration".into(), Value::String(period.clone()));
    }
    body
}

#[async_trait::async_trait]
impl LitellmApi for LitellmClient {
    async fn generate(&self, request: &GenerateKey) -> Result<GeneratedKey, LitellmError> {
        let body = generate_body(request);
        let reply = self
            .call(Method::POST, "/key/generate", Some(&body))
            .await?;
        if !(200..300).contains(&reply.status) {
            return Err(Self::error_for(&reply));
        }
        let answer: GenerateAnswer = serde_json::from_slice(&reply.body)
            .map_err(|_| invalid("the /key/generate answer is not the expected JSON"))?;
        let key = Secret::new(answer.key.unwrap_or_default());
        if !(key.expose().starts_with("sk-") && key.expose().len() >= 8) {
            return Err(invalid("the /key/generate answer has no sk- key"));
        }
        let computed = sha256_hex(key.expose().as_bytes());
        let token_hash = answer
            .token
            .or(answer.token_id)
            .map(|t| t.to_ascii_lowercase())
            .unwrap_or_else(|| computed.clone());
        if token_hash != computed {
            // The hashing rule is fixed (reference §2); a mismatch means we would later
            // delete the wrong key.
            let generated = GeneratedKey {
                key,
                token_hash: computed.clone(),
                expires: None,
            };
            let _ = self.delete(&generated.token_hash).await;
            return Err(invalid(
                "the token hash LiteLLM sent is not SHA-256 of the key",
            ));
        }
        self.stats.generated();
        Ok(GeneratedKey {
            key,
            token_hash,
            expires: parse_time(answer.expires.as_ref()),
        })
    }

    async fn delete(&self, token_hash: &str) -> Result<bool, LitellmError> {
        let body = json!({ "keys": [token_hash] });
        let reply = self.call(Method::POST, "/key/delete", Some(&body)).await?;
        match reply.status {
            200..=299 => {
                self.stats.deleted();
                Ok(true)
            }
            // None of the keys exist: already gone (reference §11).
            404 => Ok(false),
            _ => Err(Self::error_for(&reply)),
        }
    }

    async fn info(&self, token_hash: &str) -> Result<Option<KeyInfo>, LitellmError> {
        if !token_hash.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(invalid("a token hash is hex"));
        }
        let reply = self
            .call(Method::GET, &format!("/key/info?key={token_hash}"), None)
            .await?;
        match reply.status {
            200..=299 => {}
            404 => return Ok(None),
            _ => return Err(Self::error_for(&reply)),
        }
        let v: Value = serde_json::from_slice(&reply.body)
            .map_err(|_| invalid("the /key/info answer is not JSON"))?;
        let info = v
            .get("info")
            .ok_or_else(|| invalid("the /key/info answer has no info"))?;
        Ok(Some(KeyInfo {
            status: info
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("active")
                .to_string(),
            spend: info.get("spend").and_then(Value::as_f64).unwrap_or(0.0),
            expires: parse_time(info.get("expires")),
            key_alias: info
                .get("key_alias")
                .and_then(Value::as_str)
                .map(str::to_string),
        }))
    }

    fn base_url(&self) -> &str {
        &self.base
    }

    fn stats(&self) -> LitellmStats {
        self.stats.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use botcreds_proto::ErrorCode;

    #[test]
    fn generate_body_matches_the_reference_fields() {
        let r = GenerateKey {
            key_alias: "github-actions-main".into(),
            duration_secs: 3600,
            models: vec!["claude-haiku-3-5".into()],
            max_budget: 10.0,
            budget_duration: None,
            rpm_limit: 120,
            metadata: json!({"scope": "ci"}),
        };
        let b = generate_body(&r);
        assert_eq!(b["duration"], "3600s");
        assert_eq!(b["key_type"], "llm_api");
        assert_eq!(b["max_budget"], 10.0);
        assert!(b.get("budget_duration").is_none());
        let daily = generate_body(&GenerateKey {
            budget_duration: Some("1d".into()),
            ..r
        });
        assert_eq!(daily["budget_duration"], "1d");
    }

    #[test]
    fn upstream_messages_are_read_and_scrubbed() {
        let body = br#"{"error":{"message":"bad sk-abcdefghijklmnop","type":"x","param":null,"code":"400"}}"#;
        assert_eq!(upstream_message(body, 400), "bad sk-<redacted>");
        let v = br#"{"detail":[{"type":"value_error","loc":["body"],"msg":"Value error"}]}"#;
        assert_eq!(upstream_message(v, 422), "Value error");
        assert!(upstream_message(b"<html>", 502).contains("502"));
    }

    /// Real LiteLLM answers 401 for a banned request parameter too; that is not the master key's
    /// fault and must not send the admin to `master_key_file`.
    #[test]
    fn refused_requests_are_told_from_a_refused_master_key() {
        let fixture = |name: &str| -> Vec<u8> {
            std::fs::read(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../tests/fixtures/litellm")
                    .join(name),
            )
            .unwrap()
        };
        let long_reason = format!(
            "Authentication Error, Rejected Request: workspace_id is not allowed in request body. {}",
            "Clientside passthrough requires explicit admin opt-in. ".repeat(20)
        );
        let rejected = serde_json::to_vec(&json!({"error": {"message": long_reason,
            "type": "auth_error", "param": "None", "code": "401"}}))
        .unwrap();
        let admin_only = br#"{"error":{"message":"Authentication Error, Only proxy admin can be used to generate, delete, update info for new keys/users/teams. Route=/key/generate. Your role=unknown. Your user_id=***","type":"auth_error","param":"None","code":"401"}}"#.to_vec();
        // As the real 1.106.2 proxy words a wrong master key.
        let wrong_master = br#"{"error":{"message":"Authentication Error, Invalid proxy server token passed. Received API Key = sk-..., Key Hash (Token) =2ab06c. Unable to find token in cache or `LiteLLM_VerificationTokenTable`","type":"token_not_found_in_db","param":"key","code":"401"}}"#.to_vec();
        let cases: Vec<(&str, u16, Vec<u8>, ErrorCode)> = vec![
            (
                "wrong master key",
                401,
                wrong_master,
                ErrorCode::LitellmAuthFailed,
            ),
            (
                "invalid key",
                401,
                fixture("error-401-invalid-key.json"),
                ErrorCode::LitellmAuthFailed,
            ),
            (
                "no key",
                401,
                fixture("error-401-no-key.json"),
                ErrorCode::LitellmAuthFailed,
            ),
            (
                "expired",
                401,
                fixture("error-401-expired-key.json"),
                ErrorCode::LitellmAuthFailed,
            ),
            (
                "blocked",
                401,
                fixture("error-401-blocked-key.json"),
                ErrorCode::LitellmAuthFailed,
            ),
            (
                "a virtual key, not the master",
                403,
                fixture("error-403-route-not-allowed.json"),
                ErrorCode::LitellmAuthFailed,
            ),
            (
                "a non-admin key",
                401,
                admin_only,
                ErrorCode::LitellmAuthFailed,
            ),
            ("no body", 401, b"".to_vec(), ErrorCode::LitellmAuthFailed),
            ("banned param", 401, rejected, ErrorCode::LitellmError),
            (
                "enterprise field",
                403,
                fixture("error-403-enterprise-field.json"),
                ErrorCode::LitellmError,
            ),
        ];
        for (what, status, body, code) in cases {
            let e = LitellmClient::error_for(&Reply {
                status,
                body: Zeroizing::new(body),
            });
            assert_eq!(e.code(), code, "{what}: {e}");
            let text = e.to_string();
            assert!(text.len() <= 400, "{what}: unbounded: {text}");
            if code == ErrorCode::LitellmError && what == "banned param" {
                assert!(
                    text.contains("workspace_id is not allowed in request body"),
                    "{what}: {text}"
                );
                assert!(!text.contains("master_key_file"), "{what}: {text}");
            }
        }
    }

    #[test]
    fn config_is_checked_and_debug_hides_the_master_key() {
        let cfg = |url: &str, key: &str| LitellmClientConfig {
            url: url.into(),
            master_key: Secret::new(key),
            request_timeout: Duration::from_secs(5),
            changed_by: "botcreds".into(),
        };
        assert!(LitellmClient::new(cfg("ftp://x", "sk-master")).is_err());
        assert!(LitellmClient::new(cfg("http://x", " ")).is_err());
        let c = LitellmClient::new(cfg("http://litellm:4000/", "sk-mastersecret")).unwrap();
        assert_eq!(c.base_url(), "http://litellm:4000");
        assert!(!format!("{c:?}").contains("mastersecret"));
    }
}
