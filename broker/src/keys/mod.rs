//! LiteLLM virtual keys: the scope table, the key service (issue, reuse, rotate, revoke,
//! release, sweep), the records kept in the store, `[litellm]`/`[coder]` configuration, the
//! Coder session check, and the metrics collector.
//!
//! The HTTP side is `api/keys.rs`; LiteLLM itself is behind `providers::litellm::LitellmApi`.

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

/// The LiteLLM edge `[litellm]` names: the real client, or `None` without `[litellm]`.
pub fn litellm_edge(
    config: &crate::config::Config,
) -> Result<Option<Arc<dyn crate::providers::litellm::LitellmApi>>, crate::server::ServeError> {
    let Some(l) = &config.litellm else {
        return Ok(None);
    };
    let client = crate::providers::litellm::LitellmClient::new(
        crate::providers::litellm::LitellmClientConfig {
            url: l.url.clone(),
            master_key: l.master_key.clone(),
            request_timeout: l.request_timeout,
            changed_by: "botcreds".into(),
        },
    )
    .map_err(|e| crate::server::ServeError::Config(format!("[litellm]: {e}")))?;
    Ok(Some(Arc::new(client)))
}

/// The key service over the edges' LiteLLM, with `[litellm]`'s scope table, provisioner
/// secret and sweep interval (defaults under `--dev`) and `[coder]`'s session check.
pub fn service_for(
    config: &crate::config::Config,
    edges: &crate::server::Edges,
    store: Arc<dyn crate::store::Store>,
    audit: crate::audit::AuditLog,
) -> Result<Option<Arc<KeyService>>, crate::server::ServeError> {
    let Some(api) = &edges.litellm else {
        return Ok(None);
    };
    let (scopes, secret, sweep) = match &config.litellm {
        Some(l) => (
            l.scopes.clone(),
            l.provisioner_secret.clone(),
            l.sweep_interval,
        ),
        None => (
            scopes::ScopeTable::default(),
            None,
            std::time::Duration::from_secs(60),
        ),
    };
    let mut service = KeyService::new(
        api.clone(),
        store,
        audit,
        edges.clock.clone(),
        scopes,
        secret,
        sweep,
    );
    if let Some(c) = &config.coder {
        let client = coder::CoderClient::new(c).map_err(crate::server::ServeError::Config)?;
        service = service.with_coder(client);
    }
    Ok(Some(Arc::new(service)))
}

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
