//! The mTLS listener's server certificate: a rustls resolver holding the current pair, issued
//! by the broker's CA or fetched from tailscaled's LocalAPI (`[tls] server_certificate =
//! "tailscale"`) and swapped in without a restart when tailscaled has renewed it.
//!
//! tailscaled's pair is its Let's Encrypt certificate for the node's MagicDNS name. The broker
//! asks `GET /localapi/v0/status?peers=false` for `Self.DNSName` and `CertDomains`, then
//! `GET /localapi/v0/cert/{domain}?type=pair`, which answers the private key PEM followed by
//! the certificate chain PEM. The key lives only in memory: it is never logged, never put in
//! an error message and never written to the broker's disk.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ::time::OffsetDateTime;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Deserialize;
use tailscale_localapi::LocalApiClient;

use crate::error::error_chain;
use crate::identity::tailnet::SocketClient;

use super::TlsError;

/// How often the pair is asked for again while the held one is still young.
pub const REFRESH_EVERY: Duration = Duration::from_secs(12 * 3600);
/// How soon to try again after tailscaled failed to answer.
pub const RETRY_AFTER: Duration = Duration::from_secs(5 * 60);
/// The largest LocalAPI answer accepted (a status without peers or a pair is a few KiB).
const MAX_ANSWER_BYTES: usize = 256 * 1024;
/// A LocalAPI call that takes longer is given up. tailscaled may talk to Let's Encrypt
/// before answering a certificate request, which takes seconds.
const LOCALAPI_TIMEOUT: Duration = Duration::from_secs(60);

/// The pair in use, with what the refresh schedule and the logs need to know of it.
#[derive(Clone)]
pub struct HeldPair {
    pub key: Arc<CertifiedKey>,
    /// The DNS name it was asked for (for `"ca"`: the first of `server_names`).
    pub domain: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// Hex serial of the leaf certificate, for the logs.
    pub serial: String,
}

impl std::fmt::Debug for HeldPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldPair")
            .field("domain", &self.domain)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The resolver the listener's `ServerConfig` asks on every handshake: the current pair,
/// replaced as a whole by [`ServerCertResolver::swap`] (handshakes in flight keep the old).
pub struct ServerCertResolver {
    current: RwLock<HeldPair>,
}

impl std::fmt::Debug for ServerCertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCertResolver")
            .field("current", &*self.read())
            .finish()
    }
}

impl ServerCertResolver {
    pub fn new(pair: HeldPair) -> ServerCertResolver {
        ServerCertResolver {
            current: RwLock::new(pair),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HeldPair> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The pair now in use.
    pub fn current(&self) -> HeldPair {
        self.read().clone()
    }

    /// Serve `pair` from the next handshake on.
    pub fn swap(&self, pair: HeldPair) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = pair;
    }
}

impl ResolvesServerCert for ServerCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.read().key.clone())
    }
}

/// A certificate chain and its key as one `CertifiedKey`, checked to belong together; with
/// `must_name`, the leaf must also name that DNS name.
pub fn held_pair(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    domain: &str,
    must_name: bool,
) -> Result<HeldPair, TlsError> {
    let provider = CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    let leaf = chain
        .first()
        .cloned()
        .ok_or_else(|| TlsError::ServerCert("the answer holds no certificate".into()))?;
    let (not_before, not_after, serial, names) = leaf_facts(&leaf)?;
    let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
        TlsError::ServerCert(format!(
            "the private key does not belong to the certificate ({e})"
        ))
    })?;
    if must_name && !names.iter().any(|n| n.eq_ignore_ascii_case(domain)) {
        return Err(TlsError::ServerCert(format!(
            "the certificate names {names:?}, not {domain:?}"
        )));
    }
    Ok(HeldPair {
        key: Arc::new(certified),
        domain: domain.to_string(),
        not_before,
        not_after,
        serial,
    })
}

/// Validity, serial and DNS names of a leaf certificate.
fn leaf_facts(
    leaf: &CertificateDer<'_>,
) -> Result<(OffsetDateTime, OffsetDateTime, String, Vec<String>), TlsError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(leaf)
        .map_err(|e| TlsError::ServerCert(format!("the certificate is not X.509: {e}")))?;
    let names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((
        cert.validity().not_before.to_datetime(),
        cert.validity().not_after.to_datetime(),
        hex::encode(cert.raw_serial()),
        names,
    ))
}

/// Parse tailscaled's `type=pair` answer: one private key PEM block (SEC1 `EC PRIVATE KEY`,
/// PKCS#8 or PKCS#1), then the certificate chain, leaf first. Anything else is refused;
/// errors describe the answer's shape, never its key.
pub fn parse_pair(body: &[u8], domain: &str) -> Result<HeldPair, TlsError> {
    let bad = |m: String| TlsError::ServerCert(m);
    let mut key: Option<PrivateKeyDer<'static>> = None;
    let mut chain = Vec::new();
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(body) {
        let (kind, der) =
            section.map_err(|e| bad(format!("the answer is not PEM ({})", pem_error(&e))))?;
        match kind {
            SectionKind::Certificate => chain.push(CertificateDer::from(der)),
            SectionKind::EcPrivateKey | SectionKind::PrivateKey | SectionKind::RsaPrivateKey => {
                if key.is_some() {
                    return Err(bad("the answer holds more than one private key".into()));
                }
                if !chain.is_empty() {
                    return Err(bad(
                        "the answer puts a private key after a certificate".into()
                    ));
                }
                key = Some(match kind {
                    SectionKind::EcPrivateKey => PrivateKeyDer::Sec1(der.into()),
                    SectionKind::RsaPrivateKey => PrivateKeyDer::Pkcs1(der.into()),
                    _ => PrivateKeyDer::Pkcs8(der.into()),
                });
            }
            other => {
                return Err(bad(format!(
                    "the answer holds an unexpected PEM section ({other:?})"
                )));
            }
        }
    }
    let Some(key) = key else {
        return Err(bad(format!(
            "the answer holds no private key ({} certificate(s))",
            chain.len()
        )));
    };
    if chain.is_empty() {
        return Err(bad(
            "the answer holds a private key but no certificate".into()
        ));
    }
    held_pair(chain, key, domain, true)
}

/// A PEM error without any of the input (which may be key material).
fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { .. } => "a section has no END line".into(),
        E::IllegalSectionStart { .. } => "a BEGIN line is malformed".into(),
        E::Base64Decode(_) => "bad base64".into(),
        _ => "unreadable".into(),
    }
}

/// When to ask tailscaled again: every `every`, and as soon as less than a third of the held
/// certificate's life is left (tailscaled renews at two-thirds, so the new one is there).
pub fn next_refresh(pair: &HeldPair, now: OffsetDateTime, every: Duration) -> Duration {
    let life = pair.not_after - pair.not_before;
    let renew_at = pair.not_before + life * 2 / 3;
    let until_renew = renew_at - now;
    if until_renew <= ::time::Duration::ZERO {
        // Old already: tailscaled has not renewed yet, or failed to; do not hammer it.
        return RETRY_AFTER.min(every);
    }
    Duration::try_from(until_renew).unwrap_or(every).min(every)
}

/// Where a pair comes from; the seam for tests.
#[async_trait::async_trait]
pub trait PairSource: Send + Sync + 'static {
    async fn fetch(&self) -> Result<HeldPair, TlsError>;
}

/// tailscaled's LocalAPI on its Unix socket.
pub struct LocalApiPairSource {
    client: SocketClient,
}

impl LocalApiPairSource {
    pub fn new(socket: PathBuf) -> LocalApiPairSource {
        LocalApiPairSource {
            client: SocketClient { path: socket },
        }
    }

    async fn get(&self, uri: &str) -> Result<(u16, Bytes), TlsError> {
        let socket = self.client.path.display().to_string();
        let uri: http::Uri = uri
            .parse()
            .map_err(|e| TlsError::ServerCert(format!("bad LocalAPI URI {uri}: {e}")))?;
        let call = async {
            let response = self.client.get(uri).await.map_err(|e| {
                TlsError::ServerCert(format!(
                    "tailscaled is not reachable at {socket}: {}",
                    error_chain(&e)
                ))
            })?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| TlsError::ServerCert(format!("reading tailscaled's answer: {e}")))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(LOCALAPI_TIMEOUT, call)
            .await
            .map_err(|_| {
                TlsError::ServerCert(format!(
                    "tailscaled at {socket} did not answer within {LOCALAPI_TIMEOUT:?}"
                ))
            })?
    }

    /// The node's MagicDNS name, as tailscaled will issue a certificate for it.
    async fn domain(&self) -> Result<String, TlsError> {
        let (status, body) = self.get("/localapi/v0/status?peers=false").await?;
        if status != 200 {
            return Err(refused("status", status, &body));
        }
        domain_from_status(&body)
    }
}

#[async_trait::async_trait]
impl PairSource for LocalApiPairSource {
    async fn fetch(&self) -> Result<HeldPair, TlsError> {
        let domain = self.domain().await?;
        let (status, body) = self
            .get(&format!("/localapi/v0/cert/{domain}?type=pair"))
            .await?;
        if status != 200 {
            // An error answer is tailscaled's message, never key material.
            return Err(refused(&format!("cert/{domain}"), status, &body));
        }
        parse_pair(&body, &domain)
    }
}

fn refused(what: &str, status: u16, body: &[u8]) -> TlsError {
    let message: String = String::from_utf8_lossy(body)
        .trim()
        .chars()
        .take(300)
        .collect();
    TlsError::ServerCert(format!(
        "tailscaled refused /localapi/v0/{what}: {status} {message}"
    ))
}

#[derive(Deserialize)]
struct Status {
    #[serde(rename = "BackendState", default)]
    backend_state: String,
    #[serde(rename = "Self", default)]
    self_status: Option<SelfStatus>,
    #[serde(rename = "CertDomains", default)]
    cert_domains: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct SelfStatus {
    #[serde(rename = "DNSName", default)]
    dns_name: String,
}

/// `Self.DNSName` without its trailing dot, checked against `CertDomains`: the name
/// tailscaled gets certificates for.
pub fn domain_from_status(body: &[u8]) -> Result<String, TlsError> {
    let status: Status = serde_json::from_slice(body)
        .map_err(|e| TlsError::ServerCert(format!("tailscaled's status is unreadable: {e}")))?;
    let name = status
        .self_status
        .map(|s| s.dns_name.trim_end_matches('.').to_ascii_lowercase())
        .unwrap_or_default();
    if name.is_empty() {
        return Err(TlsError::ServerCert(format!(
            "tailscaled knows no MagicDNS name for this node (BackendState {:?}); is it logged in?",
            status.backend_state
        )));
    }
    let domains = status.cert_domains.unwrap_or_default();
    if domains.is_empty() {
        return Err(TlsError::ServerCert(format!(
            "tailscaled offers no HTTPS certificate for {name}: enable HTTPS certificates \
             for the tailnet (admin console, DNS page)"
        )));
    }
    if !domains.iter().any(|d| d.eq_ignore_ascii_case(&name)) {
        return Err(TlsError::ServerCert(format!(
            "tailscaled offers certificates for {domains:?}, not for this node's name {name}"
        )));
    }
    Ok(name)
}

/// Ask `source` again on schedule and swap a new pair in; runs until aborted (the task's
/// handle is dropped with the `Mtls` that owns it).
pub async fn refresh_loop(
    resolver: Arc<ServerCertResolver>,
    source: Arc<dyn PairSource>,
    clock: crate::clock::SharedClock,
) {
    let mut wait = next_refresh(&resolver.current(), clock.now(), REFRESH_EVERY);
    loop {
        tokio::time::sleep(wait).await;
        wait = match refresh_once(&resolver, source.as_ref()).await {
            Ok(_) => next_refresh(&resolver.current(), clock.now(), REFRESH_EVERY),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?RETRY_AFTER,
                    "cannot refresh the mTLS server certificate from tailscaled; keeping the current one");
                RETRY_AFTER
            }
        };
    }
}

/// Fetch once; swap when the certificate differs from the held one. `Ok(true)`: swapped.
pub async fn refresh_once(
    resolver: &ServerCertResolver,
    source: &dyn PairSource,
) -> Result<bool, TlsError> {
    let fresh = source.fetch().await?;
    let held = resolver.current();
    let same = held.key.end_entity_cert().ok() == fresh.key.end_entity_cert().ok();
    if same {
        return Ok(false);
    }
    tracing::info!(domain = %fresh.domain, serial = %fresh.serial, not_after = %fresh.not_after,
        previous = %held.serial, "mTLS server certificate renewed from tailscaled");
    resolver.swap(fresh);
    Ok(true)
}

/// A task aborted when this handle drops.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

    const DOMAIN: &str = "bot-broker.tailnet-1234.ts.net";

    /// A "public" CA and a leaf for `names`: (key PEM, chain PEM leaf first).
    fn issued(names: &[&str], days: i64) -> (String, String) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut leaf =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let now = OffsetDateTime::now_utc();
        leaf.not_before = now - ::time::Duration::hours(1);
        leaf.not_after = now + ::time::Duration::days(days);
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        (
            key.serialize_pem(),
            format!("{}{}", cert.pem(), ca_cert.pem()),
        )
    }

    fn install_provider() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }

    #[test]
    fn parses_a_pair_as_tailscaled_answers_it() {
        install_provider();
        let (key, chain) = issued(&[DOMAIN], 90);
        let pair = parse_pair(format!("{key}{chain}").as_bytes(), DOMAIN).unwrap();
        assert_eq!(pair.domain, DOMAIN);
        assert_eq!(
            pair.key.cert.len(),
            2,
            "leaf and intermediate are both served"
        );
        assert!(pair.not_after > OffsetDateTime::now_utc() + ::time::Duration::days(89));
        assert!(!format!("{pair:?}").contains("PRIVATE"));
    }

    #[test]
    fn refuses_garbage_and_wrong_keys_without_echoing_the_key() {
        install_provider();
        let (key, chain) = issued(&[DOMAIN], 90);
        let (other_key, other_chain) = issued(&["other.tailnet-1234.ts.net"], 90);
        let key_body = key.lines().nth(1).unwrap().to_string();
        let cases: Vec<(String, &str)> = vec![
            ("not PEM at all".into(), "no private key"),
            (String::new(), "no private key"),
            (chain.clone(), "no private key"),
            (key.clone(), "no certificate"),
            (format!("{other_key}{chain}"), "does not belong"),
            (
                format!("{key}{other_key}{chain}"),
                "more than one private key",
            ),
            (format!("{chain}{key}"), "after a certificate"),
            (format!("{other_key}{other_chain}"), "not \"bot-broker"),
            (
                format!("{key}-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
                "not X.509",
            ),
            (
                format!("{key}-----BEGIN CERTIFICATE-----\n!!!!\n"),
                "not PEM",
            ),
        ];
        for (body, want) in cases {
            let err = parse_pair(body.as_bytes(), DOMAIN).unwrap_err().to_string();
            assert!(err.contains(want), "{want:?} not in {err:?}");
            assert!(!err.contains(&key_body), "the key leaked into {err:?}");
        }
    }

    #[test]
    fn the_domain_comes_from_self_dnsname_and_cert_domains() {
        let ok =
            br#"{"BackendState":"Running","Self":{"DNSName":"Bot-Broker.tailnet-1234.ts.net."},
            "CertDomains":["bot-broker.tailnet-1234.ts.net"],"Peer":null}"#;
        assert_eq!(domain_from_status(ok).unwrap(), DOMAIN);
        for (body, want) in [
            (
                &br#"{"BackendState":"Running","Self":{"DNSName":"a.b.ts.net."},"CertDomains":null}"#[..],
                "enable HTTPS certificates",
            ),
            (
                br#"{"BackendState":"Running","Self":{"DNSName":"a.b.ts.net."},"CertDomains":["c.b.ts.net"]}"#,
                "not for this node's name a.b.ts.net",
            ),
            (
                br#"{"BackendState":"NeedsLogin","Self":{"DNSName":""},"CertDomains":null}"#,
                "NeedsLogin",
            ),
            (b"<html>", "unreadable"),
        ] {
            let err = domain_from_status(body).unwrap_err().to_string();
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
    }

    fn pair_valid(from: OffsetDateTime, days: i64) -> HeldPair {
        install_provider();
        let (key, chain) = issued(&[DOMAIN], 90);
        let mut pair = parse_pair(format!("{key}{chain}").as_bytes(), DOMAIN).unwrap();
        pair.not_before = from;
        pair.not_after = from + ::time::Duration::days(days);
        pair
    }

    #[test]
    fn refresh_schedule_every_12h_and_when_a_third_of_the_life_is_left() {
        let t0 = OffsetDateTime::UNIX_EPOCH + ::time::Duration::days(20_000);
        let pair = pair_valid(t0, 90);
        // Young: the regular interval.
        assert_eq!(next_refresh(&pair, t0, REFRESH_EVERY), REFRESH_EVERY);
        // Six hours before two-thirds (day 60): then.
        let near = t0 + ::time::Duration::days(60) - ::time::Duration::hours(6);
        assert_eq!(
            next_refresh(&pair, near, REFRESH_EVERY),
            Duration::from_secs(6 * 3600)
        );
        // Past two-thirds and still held: retry soon, not in a hot loop.
        let late = t0 + ::time::Duration::days(70);
        assert_eq!(next_refresh(&pair, late, REFRESH_EVERY), RETRY_AFTER);
    }

    struct Serving(std::sync::Mutex<Result<HeldPair, String>>);

    #[async_trait::async_trait]
    impl PairSource for Serving {
        async fn fetch(&self) -> Result<HeldPair, TlsError> {
            self.0.lock().unwrap().clone().map_err(TlsError::ServerCert)
        }
    }

    #[tokio::test]
    async fn a_renewed_pair_is_swapped_in_and_a_failure_keeps_the_old_one() {
        let now = OffsetDateTime::now_utc();
        let first = pair_valid(now, 90);
        let renewed = pair_valid(now, 90);
        let resolver = ServerCertResolver::new(first.clone());
        let source = Serving(std::sync::Mutex::new(Ok(first.clone())));
        assert!(
            !refresh_once(&resolver, &source).await.unwrap(),
            "same pair"
        );
        *source.0.lock().unwrap() = Ok(renewed.clone());
        assert!(refresh_once(&resolver, &source).await.unwrap());
        assert_eq!(resolver.current().serial, renewed.serial);
        assert_ne!(renewed.serial, first.serial);
        *source.0.lock().unwrap() = Err("tailscaled is not reachable".into());
        assert!(refresh_once(&resolver, &source).await.is_err());
        assert_eq!(resolver.current().serial, renewed.serial);
    }

    #[tokio::test]
    async fn startup_fails_naming_the_key_when_tailscaled_refuses() {
        install_provider();
        let dir = tempfile::tempdir().unwrap();
        let config = super::super::TlsConfig {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            server_names: vec!["localhost".into()],
            ca: super::super::config::CaSource::DataDir,
            extra_trusted_ca_files: vec![],
            client_cert_ttl: Duration::from_secs(3600),
            max_join_token_ttl: Duration::from_secs(3600),
            handshake_timeout: Duration::from_secs(5),
            tailnet_enrollment: false,
            server_certificate: super::super::ServerCertificate::Tailscale {
                socket: dir.path().join("tailscaled.sock"),
            },
        };
        let store: Arc<dyn crate::store::Store> = Arc::new(crate::store::MemoryStore::new());
        let audit = crate::audit::AuditLog::start(store.clone());
        let clock: crate::clock::SharedClock = Arc::new(crate::clock::OffsetClock::default());
        let err = super::super::Mtls::open(&config, dir.path(), store, audit, clock)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("tls.server_certificate"), "{err}");
        assert!(err.contains("not reachable"), "{err}");
    }
}
