//! Prometheus metrics, rendered at `GET /metrics` in the OpenMetrics text format.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::grants::TokenIssuer;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The policy bot, or `-` for callers matching none.
    pub bot: String,
    /// `issued`, or the error code that ended the request.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReuseLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NotifyLabels {
    /// `webhook` or `slack`.
    pub channel: &'static str,
    /// The webhook's configured name (never its URL).
    pub target: String,
    pub event: &'static str,
    /// `delivered`, `retried` (one failed attempt, another follows) or `failed` (given up).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `total_cap` (`[limits] max_connections`) or `peer_cap` (`max_connections_per_peer`).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub outcome: &'static str,
}

/// The broker's metrics; a cheap handle.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    decisions: Family<DecisionLabels, Counter>,
    token_reuse: Family<ReuseLabels, Counter>,
    policy_reloads: Family<DecisionLabels, Counter>,
    issue_seconds: Histogram,
    notify_deliveries: Family<NotifyLabels, Counter>,
    notify_skipped: Counter,
    connections_refused: Family<RefusedLabels, Counter>,
    connections_closed_idle: Counter,
    connections_open: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Upstream counters read from the GitHub client at scrape time.
struct UpstreamCollector {
    issuer: Arc<TokenIssuer>,
}

impl std::fmt::Debug for UpstreamCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpstreamCollector")
    }
}

impl Collector for UpstreamCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.issuer.github().stats();
        let ok = ConstCounter::new(stats.calls_ok);
        ok.encode(encoder.encode_descriptor(
            "botcreds_github_calls_ok",
            "GitHub API calls that succeeded",
            None,
            ok.metric_type(),
        )?)?;
        let failed = ConstCounter::new(stats.calls_failed);
        failed.encode(encoder.encode_descriptor(
            "botcreds_github_calls_failed",
            "GitHub API calls that failed (after retries)",
            None,
            failed.metric_type(),
        )?)?;
        let mints = ConstCounter::new(stats.mints);
        mints.encode(encoder.encode_descriptor(
            "botcreds_github_token_mints",
            "Installation tokens minted at GitHub",
            None,
            mints.metric_type(),
        )?)?;
        if let Some(remaining) = stats.rate_limit_remaining {
            let g = ConstGauge::new(remaining as i64);
            g.encode(encoder.encode_descriptor(
                "botcreds_github_rate_limit_remaining",
                "x-ratelimit-remaining on GitHub's last answer",
                None,
                g.metric_type(),
            )?)?;
        }
        if let Some(limit) = stats.rate_limit_limit {
            let g = ConstGauge::new(limit as i64);
            g.encode(encoder.encode_descriptor(
                "botcreds_github_rate_limit_limit",
                "x-ratelimit-limit on GitHub's last answer",
                None,
                g.metric_type(),
            )?)?;
        }
        let live = ConstGauge::new(self.issuer.live_tokens() as i64);
        live.encode(encoder.encode_descriptor(
            "botcreds_live_tokens",
            "Installation tokens handed out and not yet expired (superseded ones too)",
            None,
            live.metric_type(),
        )?)?;
        Ok(())
    }
}

impl Metrics {
    pub fn new(issuer: Arc<TokenIssuer>) -> Metrics {
        Metrics::with_collectors(issuer, Vec::new())
    }

    /// The broker's metrics plus collectors read at scrape time (LiteLLM keys).
    pub fn with_collectors(issuer: Arc<TokenIssuer>, extra: Vec<Box<dyn Collector>>) -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "botcreds_credential_requests",
            "Credential requests by bot and outcome",
            requests.clone(),
        );
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "botcreds_policy_decisions",
            "Policy decisions by outcome (allow, approval, deny)",
            decisions.clone(),
        );
        let token_reuse = Family::<ReuseLabels, Counter>::default();
        registry.register(
            "botcreds_token_reuse",
            "Token requests answered from the reuse cache (hit) or by a new mint (miss)",
            token_reuse.clone(),
        );
        let policy_reloads = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "botcreds_policy_reloads",
            "Policy reloads by result (ok, rejected)",
            policy_reloads.clone(),
        );
        let issue_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "botcreds_credential_issue_seconds",
            "Time to answer an allowed credential request, audit flush included",
            issue_seconds.clone(),
        );
        let notify_deliveries = Family::<NotifyLabels, Counter>::default();
        registry.register(
            "botcreds_notify_deliveries",
            "Notification attempts by channel, target, event and outcome",
            notify_deliveries.clone(),
        );
        let notify_skipped = Counter::default();
        registry.register(
            "botcreds_notify_skipped_events",
            "Approval events not notified because deliveries fell behind",
            notify_skipped.clone(),
        );
        let connections_refused = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "botcreds_connections_refused",
            "Connections closed at accept because a cap was reached, by cap (total_cap, peer_cap)",
            connections_refused.clone(),
        );
        let connections_closed_idle = Counter::default();
        registry.register(
            "botcreds_connections_closed_idle",
            "Connections closed because no request was in flight for [limits] idle_timeout",
            connections_closed_idle.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "botcreds_connections_open",
            "Connections open now, over all listeners",
            connections_open.clone(),
        );
        registry.register_collector(Box::new(UpstreamCollector { issuer }));
        for c in extra {
            registry.register_collector(c);
        }
        Metrics {
            inner: Arc::new(Inner {
                registry,
                requests,
                decisions,
                token_reuse,
                policy_reloads,
                issue_seconds,
                notify_deliveries,
                notify_skipped,
                connections_refused,
                connections_closed_idle,
                connections_open,
            }),
        }
    }

    pub fn request(&self, bot: Option<&str>, outcome: &str) {
        self.inner
            .requests
            .get_or_create(&RequestLabels {
                bot: bot.unwrap_or("-").to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn decision(&self, outcome: &'static str) {
        self.inner
            .decisions
            .get_or_create(&DecisionLabels { outcome })
            .inc();
    }

    pub fn token_reuse(&self, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.inner
            .token_reuse
            .get_or_create(&ReuseLabels { result })
            .inc();
    }

    pub fn policy_reload(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "rejected" };
        self.inner
            .policy_reloads
            .get_or_create(&DecisionLabels { outcome })
            .inc();
    }

    pub fn issue_latency(&self, seconds: f64) {
        self.inner.issue_seconds.observe(seconds);
    }

    pub fn notify_delivery(
        &self,
        channel: &'static str,
        target: &str,
        event: &'static str,
        outcome: &'static str,
    ) {
        self.inner
            .notify_deliveries
            .get_or_create(&NotifyLabels {
                channel,
                target: target.to_string(),
                event,
                outcome,
            })
            .inc();
    }

    pub fn notify_skipped(&self, events: u64) {
        self.inner.notify_skipped.inc_by(events);
    }

    /// A connection was refused at accept; `reason` is `total_cap` or `peer_cap`.
    pub fn connection_refused(&self, reason: &'static str) {
        self.inner
            .connections_refused
            .get_or_create(&RefusedLabels { reason })
            .inc();
    }

    /// A connection was closed for idleness.
    pub fn connection_closed_idle(&self) {
        self.inner.connections_closed_idle.inc();
    }

    /// The gauge of open connections, kept by [`crate::connections::Connections`].
    pub fn connections_open(&self) -> Gauge {
        self.inner.connections_open.clone()
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}
