//! LiteLLM virtual keys: the scope table, the key service (issue, reuse, rotate, revoke,
//! release, sweep), the records kept in the store, `[litellm]`/`[coder]` configuration, the
//! Coder session check, and the metrics collector.
//!
//! The HTTP side is `api/keys.rs`; LiteLLM itself is behind `providers::litellm::LitellmApi`;
//! `server.rs` builds the service from the config and the edges.

pub mod coder;
pub mod config;
mod error;
pub mod record;
pub mod scopes;
mod service;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

pub use error::KeyError;
pub use service::{
    IssuedLitellmKey, KEY_PROVISIONER, KeyAsk, KeyService, OnExisting, Origin, Released, Revoker,
    SweepReport,
};

/// Metrics of the key service, read at scrape time: live keys per scope, LiteLLM calls and
/// errors.
pub struct KeyMetrics(pub Arc<KeyService>);

impl std::fmt::Debug for KeyMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyMetrics")
    }
}

impl Collector for KeyMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.0.upstream_stats();
        let counters = [
            (
                "botcreds_litellm_calls_ok",
                "LiteLLM API calls that succeeded",
                stats.calls_ok,
            ),
            (
                "botcreds_litellm_calls_failed",
                "LiteLLM API calls that failed or were refused",
                stats.calls_failed,
            ),
            (
                "botcreds_litellm_keys_generated",
                "Virtual keys minted in LiteLLM",
                stats.keys_generated,
            ),
            (
                "botcreds_litellm_keys_deleted",
                "Virtual keys deleted in LiteLLM",
                stats.keys_deleted,
            ),
        ];
        for (name, help, value) in counters {
            let c = ConstCounter::new(value);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let live = self.0.live_per_scope();
        let mut family = encoder.encode_descriptor(
            "botcreds_litellm_keys_live",
            "LiteLLM keys issued by the broker and neither expired nor revoked, per scope",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (scope, n) in live {
            let g = ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX));
            let labels = [("scope", scope)];
            g.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
