//! The LiteLLM provider: the only module that speaks LiteLLM's key management API.
//!
//! [`LitellmApi`] is the edge the key service sees. [`LitellmClient`] is the real HTTP client
//! (`/key/generate`, `/key/delete`, `/key/info` with the master key as bearer, per
//! `../shared/reference/litellm-keys.md`); [`SimulatedLitellm`] stands in for it under
//! `botcreds serve --dev`. The master key and minted keys never appear in an error message, a
//! log line or `Debug` output: keys travel as [`Secret`], and upstream texts are scrubbed of
//! anything that looks like a key.

mod client;
mod simulated;

use std::sync::atomic::{AtomicU64, Ordering};

use botcreds_proto::ErrorCode;
use time::OffsetDateTime;

use crate::secret::Secret;

#[cfg(test)]
pub(crate) use client::generate_body;
pub use client::{LitellmClient, LitellmClientConfig};
pub use simulated::SimulatedLitellm;

/// What the broker needs from LiteLLM. Implemented by [`LitellmClient`] and [`SimulatedLitellm`].
#[async_trait::async_trait]
pub trait LitellmApi: Send + Sync + 'static {
    /// `POST /key/generate`: a new virtual key.
    async fn generate(&self, request: &GenerateKey) -> Result<GeneratedKey, LitellmError>;

    /// `POST /key/delete {"keys": [hash]}`. `Ok(true)` when LiteLLM deleted it, `Ok(false)`
    /// when it did not know the key (404: already gone, which is what deletion wants).
    async fn delete(&self, token_hash: &str) -> Result<bool, LitellmError>;

    /// `GET /key/info?key=<hash>`: the key's status and spend; `None` when LiteLLM does not
    /// know it.
    async fn info(&self, token_hash: &str) -> Result<Option<KeyInfo>, LitellmError>;

    /// The proxy's base URL (no trailing slash); tools use `{base}/v1`.
    fn base_url(&self) -> &str;

    /// Call counters for metrics.
    fn stats(&self) -> LitellmStats;
}

/// A key to mint. Budget, limits and metadata as the key service computed them.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateKey {
    /// LiteLLM `key_alias`; unique across LiteLLM's keys.
    pub key_alias: String,
    /// Lifetime in seconds (sent as `duration: "<n>s"`); every key expires.
    pub duration_secs: u64,
    pub models: Vec<String>,
    pub max_budget: f64,
    /// `Some("1d")` for a budget that resets daily; `None` for one budget over the key's life.
    pub budget_duration: Option<String>,
    pub rpm_limit: u32,
    pub metadata: serde_json::Value,
}

/// A key LiteLLM minted.
#[derive(Clone, Debug)]
pub struct GeneratedKey {
    /// The plaintext virtual key, `sk-...`.
    pub key: Secret,
    /// SHA-256 hex of the key: LiteLLM's id for it, safe to store and log.
    pub token_hash: String,
    /// When LiteLLM will stop accepting it.
    pub expires: Option<OffsetDateTime>,
}

/// What `/key/info` says about a key.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyInfo {
    /// `active`, `expired`, `revoked` or `deleted`.
    pub status: String,
    pub spend: f64,
    pub expires: Option<OffsetDateTime>,
    pub key_alias: Option<String>,
}

/// Counters of LiteLLM calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LitellmStats {
    pub calls_ok: u64,
    pub calls_failed: u64,
    pub keys_generated: u64,
    pub keys_deleted: u64,
}

/// A failure of a LiteLLM key operation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LitellmError {
    #[error(
        "LiteLLM refused the master key ({status}: {message}); check [litellm] master_key_file"
    )]
    AuthFailed { status: u16, message: String },
    #[error("LiteLLM answered {status}: {message}")]
    Upstream { status: u16, message: String },
    #[error("LiteLLM could not be reached: {message}")]
    Unavailable { message: String },
    #[error("LiteLLM sent an unexpected response: {message}")]
    InvalidResponse { message: String },
    #[error("LiteLLM configuration: {message}")]
    Config { message: String },
}

impl LitellmError {
    /// The stable code the broker answers with for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            LitellmError::AuthFailed { .. } => ErrorCode::LitellmAuthFailed,
            LitellmError::Upstream { .. } | LitellmError::InvalidResponse { .. } => {
                ErrorCode::LitellmError
            }
            LitellmError::Unavailable { .. } => ErrorCode::UpstreamUnavailable,
            LitellmError::Config { .. } => ErrorCode::Internal,
        }
    }
}

/// `sk-...` key values removed from an upstream text (LiteLLM's masked form `sk-...abcd` stays),
/// then made safe for one line ([`crate::providers::clean_text`]).
pub(crate) fn scrub(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("sk-") {
        out.push_str(&rest[..at]);
        let tail = &rest[at + 3..];
        let len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
            .unwrap_or(tail.len());
        if len == 0 || tail.starts_with("...") {
            out.push_str("sk-");
        } else {
            out.push_str("sk-<redacted>");
        }
        rest = &tail[len..];
    }
    out.push_str(rest);
    crate::providers::clean_text(&out)
}

/// Lock-free counters behind [`LitellmStats`].
#[derive(Default)]
pub(crate) struct StatsCounters {
    calls_ok: AtomicU64,
    calls_failed: AtomicU64,
    keys_generated: AtomicU64,
    keys_deleted: AtomicU64,
}

impl StatsCounters {
    pub(crate) fn call(&self, ok: bool) {
        let c = if ok {
            &self.calls_ok
        } else {
            &self.calls_failed
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn generated(&self) {
        self.keys_generated.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn deleted(&self) {
        self.keys_deleted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> LitellmStats {
        LitellmStats {
            calls_ok: self.calls_ok.load(Ordering::Relaxed),
            calls_failed: self.calls_failed.load(Ordering::Relaxed),
            keys_generated: self.keys_generated.load(Ordering::Relaxed),
            keys_deleted: self.keys_deleted.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_removes_keys_but_keeps_masked_forms() {
        let s = scrub("Key=alias (sk-...j6Vw) bad sk-olSSlocd_0aA1Fi9ubj6Vw here; sk-");
        assert!(!s.contains("olSSlocd"), "{s}");
        assert!(s.contains("sk-...j6Vw"), "{s}");
        assert!(s.contains("sk-<redacted> here"), "{s}");
    }

    #[test]
    fn codes() {
        let auth = LitellmError::AuthFailed {
            status: 401,
            message: "x".into(),
        };
        assert_eq!(auth.code(), ErrorCode::LitellmAuthFailed);
        let down = LitellmError::Unavailable {
            message: "x".into(),
        };
        assert_eq!(down.code(), ErrorCode::UpstreamUnavailable);
        let other = LitellmError::Upstream {
            status: 400,
            message: "x".into(),
        };
        assert_eq!(other.code(), ErrorCode::LitellmError);
    }
}
