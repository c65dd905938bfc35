//! `[limits]` in broker.toml: request, connection, token-life and refusal-audit bounds. They
//! bound several parts at once (the accept loop, the API's middleware and handlers, the token
//! issuer, the audit log), so the section is its own module below all of them, over
//! `settings` like every other section.

use std::time::Duration;

use botcreds_proto::Ttl;
use serde::Deserialize;

use crate::grants::ReplaceLimit;
use crate::settings::Invalid;

/// `[limits]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    #[serde(default = "default_request_timeout")]
    request_timeout: Ttl,
    #[serde(default = "default_concurrency")]
    max_concurrent_requests: usize,
    #[serde(default = "default_max_ttl")]
    max_github_ttl: Ttl,
    #[serde(default = "default_max_deploy_key_ttl")]
    max_deploy_key_ttl: Ttl,
    /// Replacements (`replaces`) of one token scope one bot may have at once.
    #[serde(default = "default_replace_burst")]
    replace_burst: u32,
    /// How long one more replacement takes to become available again.
    #[serde(default = "default_replace_interval")]
    replace_interval: Ttl,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default = "default_max_connections_per_peer")]
    max_connections_per_peer: usize,
    #[serde(default = "default_idle_timeout")]
    idle_timeout: Ttl,
    #[serde(default = "default_header_read_timeout")]
    header_read_timeout: Ttl,
    #[serde(default = "default_refusals_per_peer")]
    audited_refusals_per_peer: usize,
    #[serde(default = "default_refusal_window")]
    refusal_window: Ttl,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            request_timeout: default_request_timeout(),
            max_concurrent_requests: default_concurrency(),
            max_github_ttl: default_max_ttl(),
            max_deploy_key_ttl: default_max_deploy_key_ttl(),
            replace_burst: default_replace_burst(),
            replace_interval: default_replace_interval(),
            max_connections: default_max_connections(),
            max_connections_per_peer: default_max_connections_per_peer(),
            idle_timeout: default_idle_timeout(),
            header_read_timeout: default_header_read_timeout(),
            audited_refusals_per_peer: default_refusals_per_peer(),
            refusal_window: default_refusal_window(),
        }
    }
}

fn default_request_timeout() -> Ttl {
    Ttl::from_secs(30)
}
fn default_concurrency() -> usize {
    1024
}
fn default_replace_burst() -> u32 {
    ReplaceLimit::default().burst
}
fn default_replace_interval() -> Ttl {
    Ttl::from_secs(ReplaceLimit::default().interval.as_secs())
}
fn default_max_ttl() -> Ttl {
    Ttl::from_secs(3000)
}
fn default_max_deploy_key_ttl() -> Ttl {
    Ttl::from_secs(24 * 3600)
}
fn default_max_connections() -> usize {
    4096
}
fn default_max_connections_per_peer() -> usize {
    128
}
fn default_idle_timeout() -> Ttl {
    Ttl::from_secs(60)
}
fn default_header_read_timeout() -> Ttl {
    Ttl::from_secs(10)
}
fn default_refusals_per_peer() -> usize {
    10
}
fn default_refusal_window() -> Ttl {
    Ttl::from_secs(60)
}

/// `[limits]`, validated.
#[derive(Debug, Clone)]
pub struct Limits {
    pub request_timeout: Duration,
    pub max_concurrent_requests: usize,
    /// The longest `ttl` a GitHub token request may ask for (tokens live one hour).
    pub max_github_ttl: Duration,
    /// The longest `ttl` a deploy key may ask for (it is deleted at GitHub then).
    pub max_deploy_key_ttl: Duration,
    /// How often one bot may have the token of one scope replaced (`replaces`).
    pub replace: ReplaceLimit,
    /// Open connections over all listeners; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Open connections from one peer IP; more are closed as soon as they are accepted.
    pub max_connections_per_peer: usize,
    /// A connection with no request in flight for this long is closed (HTTP/1 and HTTP/2).
    pub idle_timeout: Duration,
    /// An HTTP/1 request head must arrive within this time.
    pub header_read_timeout: Duration,
    /// Unauthenticated refusals audited one by one per peer IP and window; the rest of the
    /// window is counted and audited as one summary event.
    pub audited_refusals_per_peer: usize,
    /// The window of `audited_refusals_per_peer`.
    pub refusal_window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        RawLimits::default().limits()
    }
}

impl RawLimits {
    /// Validate: every cap at least 1, GitHub's one-hour token life, a usable replace limit.
    pub fn validate(&self) -> Result<Limits, Invalid> {
        if self.max_concurrent_requests == 0 {
            return Err(Invalid::new(
                "limits.max_concurrent_requests",
                "must be at least 1",
            ));
        }
        for (key, value) in [
            ("limits.max_connections", self.max_connections),
            (
                "limits.max_connections_per_peer",
                self.max_connections_per_peer,
            ),
        ] {
            if value == 0 {
                return Err(Invalid::new(key, "must be at least 1"));
            }
        }
        if self.max_connections_per_peer > self.max_connections {
            return Err(Invalid::new(
                "limits.max_connections_per_peer",
                "must not exceed limits.max_connections",
            ));
        }
        if self.max_github_ttl.as_duration() > Duration::from_secs(3600) {
            return Err(Invalid::new(
                "limits.max_github_ttl",
                "GitHub installation tokens live at most 1h",
            ));
        }
        if self.max_deploy_key_ttl.as_duration().is_zero() {
            return Err(Invalid::new(
                "limits.max_deploy_key_ttl",
                "must be positive",
            ));
        }
        if self.replace_burst == 0 {
            return Err(Invalid::new(
                "limits.replace_burst",
                "must be at least 1 (a client whose token GitHub rejected needs one replacement)",
            ));
        }
        if self.replace_interval.as_duration() < Duration::from_secs(1) {
            return Err(Invalid::new(
                "limits.replace_interval",
                "must be at least 1s",
            ));
        }
        Ok(self.limits())
    }

    fn limits(&self) -> Limits {
        Limits {
            request_timeout: self.request_timeout.as_duration(),
            max_concurrent_requests: self.max_concurrent_requests,
            max_github_ttl: self.max_github_ttl.as_duration(),
            max_deploy_key_ttl: self.max_deploy_key_ttl.as_duration(),
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections_per_peer,
            idle_timeout: self.idle_timeout.as_duration(),
            header_read_timeout: self.header_read_timeout.as_duration(),
            audited_refusals_per_peer: self.audited_refusals_per_peer,
            refusal_window: self.refusal_window.as_duration(),
            replace: ReplaceLimit {
                burst: self.replace_burst,
                interval: self.replace_interval.as_duration(),
            },
        }
    }
}
