//! mTLS enrollment and renewal: `botcreds-agent enroll` trades a one-time join token and a
//! CSR for the first certificate; the running agent renews at two-thirds of each
//! certificate's life with its current one, backing off while the broker is away.

use std::path::Path;
use std::time::{Duration, SystemTime};

use botcreds_proto::enroll::{EnrollRequest, EnrolledCertificate, RenewRequest};
use botcreds_proto::{ErrorBody, MAX_BODY_BYTES};

use crate::broker_client::{HttpSlot, client_builder, error_chain};
use crate::tls::{self, MtlsIdentity};

/// First retry after a failed renewal; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// The least time between two successful renewals.
const MIN_RENEW_GAP: Duration = Duration::from_secs(10);
const ENROLL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("the broker at {url} is unreachable: {}", crate::text::clean(.message))]
    Unreachable { url: String, message: String },
    #[error("the broker refused: {} ({})", crate::text::clean(&.0.error), .0.code)]
    Refused(ErrorBody),
    #[error("unexpected answer from the broker (HTTP {status}): {}", crate::text::clean(.detail))]
    BadAnswer { status: u16, detail: String },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

impl EnrollError {
    /// Whether trying again later may succeed (the broker was away or busy).
    fn is_transient(&self) -> bool {
        match self {
            EnrollError::Unreachable { .. } => true,
            EnrollError::BadAnswer { status, .. } => *status >= 500,
            EnrollError::Refused(body) => {
                let s = body.code.http_status();
                s >= 500 || s == 408 || s == 429
            }
            EnrollError::Tls(_) => false,
        }
    }
}

/// Enroll this host: make a key pair here, send only the CSR with the join token, and store
/// key, certificate and CA bundle in `state_dir`.
pub async fn enroll(
    broker: &str,
    token: &str,
    bot: Option<&str>,
    state_dir: &Path,
) -> Result<MtlsIdentity, EnrollError> {
    let (key, csr) = tls::new_key_and_csr(bot)?;
    let http = client_builder(ENROLL_TIMEOUT)
        .build()
        .map_err(|e| EnrollError::Unreachable {
            url: broker.to_string(),
            message: e.to_string(),
        })?;
    let request = EnrollRequest {
        bot: bot.map(str::to_string),
        token: Some(token.trim().to_string()),
        csr,
    };
    let cert: EnrolledCertificate = post(&http, broker, "/v1/enroll", &request).await?;
    Ok(tls::store(
        state_dir,
        &key,
        &cert.certificate,
        &cert.ca_bundle,
        bot,
    )?)
}

/// Renew once with the current certificate (the client in `slot`), store the new one and
/// switch the slot to it.
pub async fn renew_once(
    slot: &HttpSlot,
    broker: &str,
    current: &MtlsIdentity,
) -> Result<MtlsIdentity, EnrollError> {
    let (key, csr) = tls::new_key_and_csr(Some(&current.info.bot))?;
    let cert: EnrolledCertificate = post(
        &slot.current(),
        broker,
        "/v1/enroll/renew",
        &RenewRequest { csr },
    )
    .await?;
    // A renewal keeps the bot: a certificate for another one is refused like at enrollment.
    let renewed = tls::store(
        &current.state_dir,
        &key,
        &cert.certificate,
        &cert.ca_bundle,
        Some(&current.info.bot),
    )?;
    slot.use_identity(&renewed)
        .map_err(|e| EnrollError::BadAnswer {
            status: 200,
            detail: format!("the renewed certificate is unusable: {e}"),
        })?;
    Ok(renewed)
}

/// Keep the certificate renewed until `stop` fires: at two-thirds of its life, then with
/// backoff (5 s doubling to 5 min) while the broker is away or refuses.
pub async fn renewal_loop(
    slot: HttpSlot,
    broker: String,
    mut current: MtlsIdentity,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut stop = stop;
    let mut backoff = FIRST_BACKOFF;
    let mut wait = until(current.info.renew_at());
    loop {
        tracing::info!(
            serial = %current.info.serial,
            in_secs = wait.as_secs(),
            "next mTLS certificate renewal"
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        match renew_once(&slot, &broker, &current).await {
            Ok(renewed) => {
                tracing::info!(
                    old = %current.info.serial,
                    new = %renewed.info.serial,
                    expires = ?renewed.info.not_after,
                    "mTLS certificate renewed"
                );
                current = renewed;
                backoff = FIRST_BACKOFF;
                // Never renew back to back, whatever the clocks say.
                wait = until(current.info.renew_at()).max(MIN_RENEW_GAP);
            }
            Err(e) => {
                let expired = current.info.not_after <= SystemTime::now();
                if e.is_transient() {
                    tracing::warn!(error = %e, retry_in_secs = backoff.as_secs(), "mTLS renewal failed; retrying");
                } else {
                    tracing::error!(
                        error = %e,
                        retry_in_secs = backoff.as_secs(),
                        expired,
                        "mTLS renewal refused; if the certificate was revoked or expired, enroll again"
                    );
                }
                wait = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

fn until(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::now()).unwrap_or_default()
}

async fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    broker: &str,
    path: &str,
    body: &B,
) -> Result<T, EnrollError> {
    let url = format!("{}{path}", broker.trim_end_matches('/'));
    let unreachable = |e: reqwest::Error| EnrollError::Unreachable {
        url: url.clone(),
        message: error_chain(&e),
    };
    let mut resp = http
        .post(&url)
        .json(body)
        .send()
        .await
        .map_err(unreachable)?;
    let status = resp.status().as_u16();
    let mut bytes = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(unreachable)? {
        if bytes.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(EnrollError::BadAnswer {
                status,
                detail: "the answer is too large".into(),
            });
        }
        bytes.extend_from_slice(&chunk);
    }
    if status != 200 {
        return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => EnrollError::Refused(body),
            Err(_) => EnrollError::BadAnswer {
                status,
                detail: "the body is not a botcreds error".into(),
            },
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| EnrollError::BadAnswer {
        status,
        detail: format!("not a certificate answer: {e}"),
    })
}
