//! Notifications about approval requests: signed webhooks and a Slack-compatible chat card.
//!
//! One task subscribes to the approval service's event stream (requested, granted, denied,
//! expired) and hands each event to every target that wants it; each delivery runs on its own
//! task with bounded retries (exponential backoff with jitter), and at most
//! [`MAX_IN_FLIGHT`] run at once. When deliveries back up, the stream lags and the skipped
//! events are counted and logged instead of piling up in memory. Deliveries are best-effort:
//! not persisted, so a broker restart abandons retries in progress (the audit log remains the
//! record of every decision). Delivery outcomes go to the log and the metrics, not to the
//! audit log, which has no event kind for them.

pub mod config;
pub mod retry;
pub mod sign;
pub mod slack;

use std::sync::Arc;
use std::time::Duration;

use botcreds_proto::approval::WebhookEvent;
use botcreds_proto::audit::AuditEventKind;
use bytes::Bytes;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{Semaphore, broadcast, watch};
use tokio::task::{JoinHandle, JoinSet};

pub use self::config::NotifyConfig;
use self::retry::{Verdict, verdict};
use crate::approvals::ApprovalEvent;
use crate::clock::SharedClock;
use crate::metrics::Metrics;

/// Deliveries running at once (attempts and backoff waits included).
pub const MAX_IN_FLIGHT: usize = 64;
/// How long shutdown waits for deliveries in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("cannot build the notification HTTP client: {0}")]
    Client(String),
}

/// Start the notifier on `events`; it ends when `stop` turns true (after a short drain of the
/// deliveries in flight) or when the event stream closes.
pub fn spawn(
    config: NotifyConfig,
    events: broadcast::Receiver<ApprovalEvent>,
    metrics: Metrics,
    clock: SharedClock,
    stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, NotifyError> {
    if config.is_empty() {
        // Nothing to notify: let go of the stream at once so it never lags on our account.
        drop(events);
        return Ok(tokio::spawn(async {}));
    }
    let client = reqwest::Client::builder()
        .timeout(config.timeout)
        // A signed event goes where it was configured to go, nowhere else.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("botcreds/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| NotifyError::Client(e.to_string()))?;
    tracing::info!(
        webhooks = config.webhooks.len(),
        slack = config.slack.is_some(),
        "notifications enabled"
    );
    let notifier = Notifier {
        inner: Arc::new(Inner {
            config,
            client,
            metrics,
            clock,
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }),
    };
    Ok(tokio::spawn(notifier.run(events, stop)))
}

struct Notifier {
    inner: Arc<Inner>,
}

struct Inner {
    config: NotifyConfig,
    client: reqwest::Client,
    metrics: Metrics,
    clock: SharedClock,
    permits: Arc<Semaphore>,
}

/// One message to one target; the URL may be a credential (Slack's) and is never logged.
struct Delivery {
    channel: &'static str,
    target: String,
    url: String,
    event: &'static str,
    delivery_id: String,
    body: Bytes,
    signature: Option<String>,
}

impl Notifier {
    async fn run(
        self,
        mut events: broadcast::Receiver<ApprovalEvent>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut tasks = JoinSet::new();
        loop {
            let received = tokio::select! {
                _ = stop.wait_for(|stopping| *stopping) => break,
                received = events.recv() => received,
            };
            match received {
                Ok(event) => {
                    if !self.dispatch(&event, &mut tasks, &mut stop).await {
                        break;
                    }
                }
                Err(RecvError::Lagged(skipped)) => {
                    tracing::warn!(
                        skipped,
                        "notifications fell behind the approval events; some were not sent"
                    );
                    self.inner.metrics.notify_skipped(skipped);
                }
                Err(RecvError::Closed) => break,
            }
            while tasks.try_join_next().is_some() {}
        }
        if !tasks.is_empty() {
            let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
                while tasks.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                tracing::warn!(
                    abandoned = tasks.len(),
                    "notification deliveries still retrying at shutdown were abandoned"
                );
            }
        }
    }

    /// Queue the deliveries of one event, waiting for room when too many are in flight;
    /// `false` when shutdown began meanwhile.
    async fn dispatch(
        &self,
        event: &ApprovalEvent,
        tasks: &mut JoinSet<()>,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        let inner = &self.inner;
        let Some(name) = event_name(event.kind) else {
            return true;
        };
        let deliveries = build_deliveries(inner, event, name);
        for delivery in deliveries {
            let permit = tokio::select! {
                _ = stop.wait_for(|stopping| *stopping) => return false,
                permit = inner.permits.clone().acquire_owned() => permit,
            };
            let Ok(permit) = permit else {
                return true;
            };
            let inner = inner.clone();
            tasks.spawn(async move {
                deliver(&inner, delivery).await;
                drop(permit);
            });
        }
        true
    }
}

/// The wire name of an approval event kind; other kinds are not notified.
fn event_name(kind: AuditEventKind) -> Option<&'static str> {
    config::EVENTS.contains(&kind).then(|| kind.as_str())
}

fn build_deliveries(inner: &Inner, event: &ApprovalEvent, name: &'static str) -> Vec<Delivery> {
    let mut out = Vec::new();
    let delivery_id = format!("evt_{}", uuid::Uuid::now_v7().simple());
    let approval_url = inner.config.approval_url(&event.request.request_id);
    let hooks: Vec<_> = inner
        .config
        .webhooks
        .iter()
        .filter(|w| w.events.contains(&event.kind))
        .collect();
    if !hooks.is_empty() {
        let body = WebhookEvent {
            event: name.to_string(),
            delivery_id: delivery_id.clone(),
            timestamp: event.at.clone(),
            request: event.request.clone(),
            approval_url: approval_url.clone(),
        };
        match serde_json::to_vec(&body) {
            Ok(bytes) => {
                let bytes = Bytes::from(bytes);
                for hook in hooks {
                    out.push(Delivery {
                        channel: "webhook",
                        target: hook.name.clone(),
                        url: hook.url.clone(),
                        event: name,
                        delivery_id: delivery_id.clone(),
                        signature: Some(sign::signature_header(
                            hook.secret.expose().as_bytes(),
                            &bytes,
                        )),
                        body: bytes.clone(),
                    });
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot encode a webhook event"),
        }
    }
    if let (Some(slack), Some(page)) = (&inner.config.slack, &approval_url)
        && slack.events.contains(&event.kind)
    {
        let message = slack::message(
            event.kind,
            &event.request,
            event.actor.as_deref(),
            page,
            inner.clock.now(),
        );
        match serde_json::to_vec(&message) {
            Ok(bytes) => out.push(Delivery {
                channel: "slack",
                target: "slack".to_string(),
                url: slack.url.expose().to_string(),
                event: name,
                delivery_id,
                body: Bytes::from(bytes),
                signature: None,
            }),
            Err(e) => tracing::error!(error = %e, "cannot encode a Slack message"),
        }
    }
    out
}

/// Send one delivery, retrying as the policy allows; logs and counts every outcome.
async fn deliver(inner: &Inner, d: Delivery) {
    let policy = inner.config.retry;
    let mut failed = 0u32;
    loop {
        let attempt = failed + 1;
        let mut request = inner
            .client
            .post(&d.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(sign::EVENT_HEADER, d.event)
            .header(sign::DELIVERY_HEADER, &d.delivery_id)
            .body(d.body.clone());
        if let Some(signature) = &d.signature {
            request = request.header(sign::SIGNATURE_HEADER, signature);
        }
        let (verdict, detail, retry_after) = match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                (verdict(status), format!("HTTP {status}"), retry_after)
            }
            Err(e) => (Verdict::Retry, describe_error(e), None),
        };
        match verdict {
            Verdict::Delivered => {
                tracing::info!(
                    channel = d.channel,
                    target = %d.target,
                    event = d.event,
                    delivery = %d.delivery_id,
                    attempt,
                    "notification delivered"
                );
                inner
                    .metrics
                    .notify_delivery(d.channel, &d.target, d.event, "delivered");
                return;
            }
            Verdict::Permanent => {
                tracing::warn!(
                    channel = d.channel,
                    target = %d.target,
                    event = d.event,
                    delivery = %d.delivery_id,
                    attempt,
                    error = %detail,
                    "notification refused by its receiver; not retrying"
                );
                inner
                    .metrics
                    .notify_delivery(d.channel, &d.target, d.event, "failed");
                return;
            }
            Verdict::Retry => {
                failed += 1;
                if !policy.may_retry(failed) {
                    tracing::warn!(
                        channel = d.channel,
                        target = %d.target,
                        event = d.event,
                        delivery = %d.delivery_id,
                        attempts = failed,
                        error = %detail,
                        "notification failed; giving up"
                    );
                    inner
                        .metrics
                        .notify_delivery(d.channel, &d.target, d.event, "failed");
                    return;
                }
                let wait = policy.wait(failed, rand::random::<f64>(), retry_after);
                tracing::warn!(
                    channel = d.channel,
                    target = %d.target,
                    event = d.event,
                    delivery = %d.delivery_id,
                    attempt,
                    error = %detail,
                    retry_in_ms = wait.as_millis() as u64,
                    "notification attempt failed; retrying"
                );
                inner
                    .metrics
                    .notify_delivery(d.channel, &d.target, d.event, "retried");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// A transport error without its URL (a Slack webhook URL is a credential), with its causes.
fn describe_error(e: reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    let e = e.without_url();
    let mut text = format!("{kind}: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use axum::http::HeaderMap;
    use botcreds_proto::{ApprovalRequestView, ApprovalResource, ApprovalState};
    use tokio::sync::Notify;

    use super::config::{EVENTS, WebhookTarget};
    use super::retry::RetryPolicy;
    use super::*;
    use crate::clock::SystemClock;
    use crate::grants::TokenIssuer;
    use crate::providers::github::SimulatedGithub;
    use crate::secret::Secret;

    const SECRET: &str = "0123456789abcdef-unit";

    fn event(n: usize) -> ApprovalEvent {
        ApprovalEvent {
            kind: AuditEventKind::ApprovalRequested,
            request: ApprovalRequestView {
                request_id: format!("apr_test000{n}"),
                state: ApprovalState::Pending,
                bot: Some("ci-bot".into()),
                caller: "tailnet:ci (n1)".into(),
                resource: ApprovalResource::LitellmKey {
                    scope: "agent:write".into(),
                },
                reason: None,
                rule: "defaults".into(),
                created_at: "2026-02-17T15:00:00Z".into(),
                expires_at: "2026-02-18T15:00:00Z".into(),
                decided_by: None,
                decided_at: None,
                deny_reason: None,
                grant_id: None,
                remembered_rule: None,
                credential_id: None,
                poll_url: format!("/v1/requests/apr_test000{n}"),
            },
            actor: None,
            at: "2026-02-17T15:00:00Z".into(),
        }
    }

    struct Receiver {
        got: Mutex<Vec<(u16, HeaderMap, Bytes)>>,
        arrived: Notify,
    }

    /// A receiver that answers 503 to the first request and 200 afterwards.
    async fn receiver() -> (String, Arc<Receiver>) {
        let shared = Arc::new(Receiver {
            got: Mutex::new(Vec::new()),
            arrived: Notify::new(),
        });
        let state = shared.clone();
        let app = axum::Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
            let state = state.clone();
            async move {
                let status = {
                    let mut got = state.got.lock().unwrap();
                    let status = if got.is_empty() { 503 } else { 200 };
                    got.push((status, headers, body));
                    status
                };
                state.arrived.notify_one();
                axum::http::StatusCode::from_u16(status).unwrap()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, shared)
    }

    #[tokio::test]
    async fn lag_retries_and_close_are_handled_and_counted() {
        let (url, receiver) = receiver().await;
        let clock: SharedClock = Arc::new(SystemClock);
        let github = Arc::new(SimulatedGithub::new(clock.clone()));
        let metrics = Metrics::new(Arc::new(TokenIssuer::new(github, clock.clone())));
        let config = NotifyConfig {
            webhooks: vec![WebhookTarget {
                name: "unit".into(),
                url,
                secret: Secret::new(SECRET),
                events: EVENTS.to_vec(),
            }],
            slack: None,
            retry: RetryPolicy {
                max_attempts: 3,
                initial: Duration::from_millis(5),
                max: Duration::from_millis(20),
            },
            timeout: Duration::from_secs(5),
            public_url: None,
        };
        // Overrun the stream before the notifier reads it: 5 events into room for 2.
        let (tx, rx) = broadcast::channel(2);
        for n in 0..5 {
            tx.send(event(n)).unwrap();
        }
        let (_stop_tx, stop_rx) = watch::channel(false);
        let handle = spawn(config, rx, metrics.clone(), clock, stop_rx).unwrap();
        // The two events kept arrive: one 503 and a retry, then the other.
        tokio::time::timeout(Duration::from_secs(10), async {
            while receiver.got.lock().unwrap().len() < 3 {
                receiver.arrived.notified().await;
            }
        })
        .await
        .expect("deliveries arrive");
        // A closed stream ends the notifier cleanly.
        drop(tx);
        tokio::time::timeout(Duration::from_secs(10), handle)
            .await
            .expect("the notifier ends when the stream closes")
            .expect("it did not panic");

        let got = receiver.got.lock().unwrap();
        let mut ids = Vec::new();
        for (_, headers, body) in got.iter() {
            let signature = headers[sign::SIGNATURE_HEADER].to_str().unwrap();
            assert!(sign::verify(SECRET.as_bytes(), body, signature));
            assert_eq!(headers[sign::EVENT_HEADER], "approval_requested");
            let event: WebhookEvent = serde_json::from_slice(body).unwrap();
            ids.push(event.request.request_id);
        }
        // Events 0-2 were skipped; 3 and 4 were delivered, whichever came first after a 503
        // and a retry with the same body.
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique, ["apr_test0003", "apr_test0004"]);
        assert_eq!(got[0].0, 503);
        let retry = got
            .iter()
            .skip(1)
            .find(|(_, _, body)| *body == got[0].2)
            .expect("the failed delivery was retried with the same body");
        assert_eq!(retry.0, 200);
        let text = metrics.render();
        for line in [
            "botcreds_notify_skipped_events_total 3",
            "outcome=\"retried\"} 1",
            "outcome=\"delivered\"} 2",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
    }
}
