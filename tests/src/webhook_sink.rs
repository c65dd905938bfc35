//! A webhook receiver double: records every POST the broker's notifier sends and checks its
//! `X-Botcreds-Signature-256` with its own HMAC-SHA256 (written here from RFC 2104 on `sha2`,
//! independently of the broker's `hmac` crate, so the two cross-check). Also serves as the
//! Slack incoming-webhook endpoint (unsigned; Slack answers `ok`).
//!
//! ```no_run
//! # async fn demo() {
//! use botcreds_tests::webhook_sink::WebhookSink;
//! let sink = WebhookSink::start(Some("0123456789abcdef-secret")).await;
//! sink.fail_next(2, 503); // the first two deliveries fail; the notifier must retry
//! // ... configure the broker with [[notify.webhooks]] url = sink.url() ...
//! assert!(sink.wait_for("approval_requested", 1, std::time::Duration::from_secs(10)).await);
//! assert!(sink.received().iter().all(|r| r.signature_ok));
//! # }
//! ```

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::switchable::SwitchableServer;

/// One request the sink received.
#[derive(Clone, Debug)]
pub struct Received {
    /// `X-Botcreds-Event`.
    pub event: Option<String>,
    /// `X-Botcreds-Delivery`.
    pub delivery: Option<String>,
    /// `X-Botcreds-Signature-256` as sent.
    pub signature: Option<String>,
    /// Whether the signature is right for the body under the sink's secret.
    pub signature_ok: bool,
    pub content_type: Option<String>,
    pub body: Bytes,
    /// The body parsed as JSON, when it is.
    pub json: Option<serde_json::Value>,
    pub method: String,
    pub path: String,
    /// The status the sink answered (failures injected by [`WebhookSink::fail_next`] included).
    pub answered: u16,
}

struct Shared {
    secret: Option<Vec<u8>>,
    received: Mutex<Vec<Received>>,
    /// (count, status) of the failures still to answer.
    fail: Mutex<(u32, u16)>,
    count: watch::Sender<usize>,
}

/// The running sink; stops when dropped.
pub struct WebhookSink {
    shared: Arc<Shared>,
    addr: SocketAddr,
    _server: SwitchableServer,
}

impl WebhookSink {
    /// Start on a free loopback port; `secret` is the webhook secret to verify with (`None`
    /// for an unsigned endpoint such as Slack's).
    pub async fn start(secret: Option<&str>) -> WebhookSink {
        let (count, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            secret: secret.map(|s| s.as_bytes().to_vec()),
            received: Mutex::new(Vec::new()),
            fail: Mutex::new((0, 500)),
            count,
        });
        let bound = SwitchableServer::bind_tcp("127.0.0.1:0".parse().expect("address"))
            .expect("binding the webhook sink");
        let addr = bound.local_addr();
        // Any path: a Slack-style URL carries its token in the path.
        let router = Router::new().fallback(receive).with_state(shared.clone());
        WebhookSink {
            shared,
            addr,
            _server: bound.serve(router),
        }
    }

    /// The URL to configure (`http://127.0.0.1:PORT/hook`); any other path on the sink's
    /// address is received as well.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Answer the next `n` requests with `status` (and no body).
    pub fn fail_next(&self, n: u32, status: u16) {
        *self.shared.fail.lock().unwrap() = (n, status);
    }

    /// Everything received so far, in order.
    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    /// Received requests for `event` that were answered 2xx.
    pub fn delivered(&self, event: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.event.as_deref() == Some(event) && (200..300).contains(&r.answered))
            .collect()
    }

    /// Wait until `n` deliveries of `event` were answered 2xx.
    pub async fn wait_for(&self, event: &str, n: usize, within: Duration) -> bool {
        let mut changes = self.shared.count.subscribe();
        tokio::time::timeout(within, async {
            loop {
                if self.delivered(event).len() >= n {
                    return true;
                }
                if changes.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await
        .unwrap_or(false)
    }
}

async fn receive(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let signature = header("x-botcreds-signature-256");
    let signature_ok = match (&shared.secret, &signature) {
        (Some(secret), Some(sig)) => {
            *sig == format!("sha256={}", hex::encode(hmac_sha256(secret, &body)))
        }
        _ => false,
    };
    let answered = {
        let mut fail = shared.fail.lock().unwrap();
        if fail.0 > 0 {
            fail.0 -= 1;
            fail.1
        } else {
            200
        }
    };
    let record = Received {
        event: header("x-botcreds-event"),
        delivery: header("x-botcreds-delivery"),
        signature,
        signature_ok,
        content_type: header("content-type"),
        json: serde_json::from_slice(&body).ok(),
        body,
        answered,
        method: method.to_string(),
        path: uri.path().to_string(),
    };
    let n = {
        let mut received = shared.received.lock().unwrap();
        received.push(record);
        received.len()
    };
    shared.count.send_replace(n);
    StatusCode::from_u16(answered).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// HMAC-SHA256 (RFC 2104): H((K ⊕ opad) ‖ H((K ⊕ ipad) ‖ m)), with 64-byte blocks.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let ipad: Vec<u8> = block.iter().map(|b| b ^ 0x36).collect();
    let opad: Vec<u8> = block.iter().map(|b| b ^ 0x5c).collect();
    let inner = Sha256::new()
        .chain_update(&ipad)
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(&opad)
        .chain_update(inner)
        .finalize()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4231_vectors() {
        // Test case 2: key "Jefe".
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a 131-byte key (longer than a block, so it is hashed first).
        assert_eq!(
            hex::encode(hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[tokio::test]
    async fn verifies_and_fails_on_demand() {
        let sink = WebhookSink::start(Some("k")).await;
        sink.fail_next(1, 503);
        let client = reqwest::Client::new();
        let body = br#"{"event":"approval_requested"}"#;
        let good = format!("sha256={}", hex::encode(hmac_sha256(b"k", body)));
        for (sig, want) in [
            (good.as_str(), 503),
            (good.as_str(), 200),
            ("sha256=00", 200),
        ] {
            let status = client
                .post(sink.url())
                .header("x-botcreds-event", "approval_requested")
                .header("x-botcreds-signature-256", sig)
                .body(body.to_vec())
                .send()
                .await
                .unwrap()
                .status();
            assert_eq!(status.as_u16(), want);
        }
        assert!(
            sink.wait_for("approval_requested", 2, Duration::from_secs(5))
                .await
        );
        let got = sink.received();
        assert_eq!(
            got.iter().map(|r| r.signature_ok).collect::<Vec<_>>(),
            [true, true, false]
        );
        assert_eq!(sink.delivered("approval_requested").len(), 2);
    }
}
