//! The mTLS module end to end in one process: CA files, enrollment rules, and real TLS
//! handshakes against the listener's configuration, each attack refused and audited.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use botcreds_proto::ErrorCode;
use botcreds_proto::audit::AuditEventKind;
use botcreds_proto::enroll::EnrolledCertificate;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::config::{CaSource, ServerCertificate, TlsConfig};
use super::*;
use crate::clock::{OffsetClock, SharedClock};
use crate::identity::{Caller, CallerVia};
use crate::store::{AuditFilter, MemoryStore};

struct World {
    _dir: tempfile::TempDir,
    mtls: Arc<Mtls>,
    audit: AuditLog,
    clock: OffsetClock,
    admin: Caller,
}

fn tls_config() -> TlsConfig {
    TlsConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        server_names: vec!["localhost".into()],
        ca: CaSource::DataDir,
        extra_trusted_ca_files: vec![],
        client_cert_ttl: Duration::from_secs(86_400),
        max_join_token_ttl: Duration::from_secs(86_400),
        handshake_timeout: Duration::from_secs(5),
        tailnet_enrollment: false,
        server_certificate: ServerCertificate::Ca,
    }
}

fn world() -> World {
    world_with(tls_config())
}

fn world_with(config: TlsConfig) -> World {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let audit = AuditLog::start(store.clone());
    let clock = OffsetClock::default();
    let shared: SharedClock = Arc::new(clock.clone());
    let mtls = Mtls::start(&config, dir.path(), store, audit.clone(), shared).unwrap();
    World {
        _dir: dir,
        mtls,
        audit,
        clock,
        admin: Caller {
            address: "127.0.0.1:9".parse().unwrap(),
            via: CallerVia::ApiKey { bot: "ops".into() },
        },
    }
}

fn peer() -> SocketAddr {
    "127.0.0.5:40000".parse().unwrap()
}

fn csr_for(key: &KeyPair, bot: &str) -> String {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, bot);
    p.distinguished_name = dn;
    p.subject_alt_names = vec![SanType::URI(
        format!("botcreds://bot/{bot}").as_str().try_into().unwrap(),
    )];
    p.serialize_request(key).unwrap().pem().unwrap()
}

impl World {
    async fn token(&self, bot: &str) -> String {
        self.mtls
            .create_join_token(&self.admin, bot, Duration::from_secs(3600), false)
            .await
            .unwrap()
            .token
    }

    async fn enroll(&self, bot: &str) -> (KeyPair, EnrolledCertificate) {
        let key = KeyPair::generate().unwrap();
        let token = self.token(bot).await;
        let cert = self
            .mtls
            .enroll_with_token(peer(), Some(bot), &token, &csr_for(&key, bot))
            .await
            .unwrap();
        (key, cert)
    }

    fn kinds(&self) -> Vec<AuditEventKind> {
        self.audit
            .read(&AuditFilter::default())
            .unwrap()
            .into_iter()
            .map(|e| e.event)
            .collect()
    }

    fn last_refusal(&self) -> String {
        self.audit
            .read(&AuditFilter::default())
            .unwrap()
            .into_iter()
            .rev()
            .find(|e| e.event == AuditEventKind::CertRefused)
            .and_then(|e| e.detail)
            .unwrap_or_default()
    }

    /// Serve one connection with the listener's handshake; the client side runs `client`.
    async fn handshake_with<F, Fut>(&self, client: F) -> Option<Arc<VerifiedPeer>>
    where
        F: FnOnce(SocketAddr) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mtls = self.mtls.clone();
        let server = tokio::spawn(async move {
            let (stream, peer) = listener.accept().await.unwrap();
            let outcome = mtls.handshake(stream, peer).await;
            match outcome {
                Some((mut tls, verified)) => {
                    // Complete the client's read so TLS 1.3 client auth is settled on both sides.
                    let _ = tls.write_all(b"ok").await;
                    let _ = tls.shutdown().await;
                    Some(verified)
                }
                None => None,
            }
        });
        client(addr).await;
        server.await.unwrap()
    }
}

fn client_config(
    roots: &[CertificateDer<'static>],
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(store);
    Arc::new(match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    })
}

async fn tls_client(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<(), String> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), stream)
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    tls.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
    if buf == b"ok" {
        Ok(())
    } else {
        Err("no answer".into())
    }
}

fn identity_of(
    cert_pem: &str,
    key: &KeyPair,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
    (vec![cert], key)
}

#[tokio::test]
async fn ca_is_created_once_with_a_private_key_and_reloaded() {
    let w = world();
    let (cert_path, key_path) = ca::data_dir_paths(w._dir.path());
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let first = std::fs::read_to_string(&cert_path).unwrap();
    let now = w.clock.now_for_test();
    let err = ca::create_ca_files(&cert_path, &key_path, now).unwrap_err();
    assert!(err.to_string().contains("not replacing"), "{err}");
    let again = CertAuthority::load_or_create(&tls_config(), w._dir.path(), now).unwrap();
    assert_eq!(again.bundle_pem(), first);

    // A key that does not belong to the certificate is refused, as is a readable key.
    std::fs::remove_file(&key_path).unwrap();
    ca::write_private(
        &key_path,
        KeyPair::generate().unwrap().serialize_pem().as_bytes(),
    )
    .unwrap();
    let err = CertAuthority::load_or_create(&tls_config(), w._dir.path(), now).unwrap_err();
    assert!(err.to_string().contains("does not belong"), "{err}");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = CertAuthority::load_or_create(&tls_config(), w._dir.path(), now).unwrap_err();
    assert!(err.to_string().contains("0644"), "{err}");
}

#[tokio::test]
async fn extra_trusted_ca_is_in_the_bundle_and_accepted() {
    let old = world();
    let (old_key, old_cert) = old.enroll("ci").await;
    let (old_ca_cert, _) = ca::data_dir_paths(old._dir.path());

    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let mut config = tls_config();
    config.extra_trusted_ca_files = vec![old_ca_cert];
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let audit = AuditLog::start(store.clone());
    let new = Mtls::start(
        &config,
        dir.path(),
        store,
        audit,
        Arc::new(OffsetClock::default()),
    )
    .unwrap();
    assert_eq!(new.ca().trusted().len(), 2);
    let server = World {
        _dir: dir,
        mtls: new,
        audit: old.audit.clone(),
        clock: OffsetClock::default(),
        admin: old.admin.clone(),
    };
    let roots = server.mtls.ca().trusted().to_vec();
    let identity = identity_of(&old_cert.certificate, &old_key);
    let verified = server
        .handshake_with(|addr| async move {
            tls_client(addr, client_config(&roots, Some(identity)))
                .await
                .unwrap();
        })
        .await;
    assert_eq!(verified.unwrap().cert.bot, "ci");
}

#[tokio::test]
async fn enrolled_certificate_names_the_bot_and_authenticates() {
    let w = world();
    let (key, cert) = w.enroll("ci").await;
    assert_eq!(cert.bot, "ci");
    assert!(!cert.admin);
    let roots = w.mtls.ca().trusted().to_vec();
    let identity = identity_of(&cert.certificate, &key);
    let verified = w
        .handshake_with(|addr| async move {
            tls_client(addr, client_config(&roots, Some(identity)))
                .await
                .unwrap();
        })
        .await
        .expect("handshake");
    assert_eq!(verified.cert.serial, cert.serial);
    let caller = w.mtls.authenticate(&verified, peer()).await.unwrap();
    assert_eq!(
        caller.via,
        CallerVia::Mtls {
            bot: "ci".into(),
            serial: cert.serial.clone(),
            admin: false
        }
    );
    assert!(w.kinds().contains(&AuditEventKind::CertIssued));

    // Renewal keeps the bot; a CSR for another bot is refused.
    let new_key = KeyPair::generate().unwrap();
    let renewed = w
        .mtls
        .renew(&caller, &csr_for(&new_key, "ci"))
        .await
        .unwrap();
    assert_ne!(renewed.serial, cert.serial);
    let err = w
        .mtls
        .renew(&caller, &csr_for(&new_key, "ops"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidCsr);
    assert!(w.kinds().contains(&AuditEventKind::CertRenewed));
    assert_eq!(w.mtls.list().len(), 2);
}

#[tokio::test]
async fn admin_tokens_make_admin_certificates() {
    let w = world();
    let token = w
        .mtls
        .create_join_token(&w.admin, "ops", Duration::from_secs(60), true)
        .await
        .unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = w
        .mtls
        .enroll_with_token(peer(), None, &token.token, &csr_for(&key, "ops"))
        .await
        .unwrap();
    assert!(cert.admin);
    let der = CertificateDer::from_pem_slice(cert.certificate.as_bytes()).unwrap();
    assert!(peer::parse_client_cert(&der).unwrap().admin);
}

#[tokio::test]
async fn join_tokens_are_single_use_expiring_and_bound_to_their_bot() {
    let w = world();
    let key = KeyPair::generate().unwrap();
    let csr = csr_for(&key, "ci");

    let token = w.token("ci").await;
    w.mtls
        .enroll_with_token(peer(), Some("ci"), &token, &csr)
        .await
        .unwrap();
    let reused = w
        .mtls
        .enroll_with_token(peer(), Some("ci"), &token, &csr)
        .await
        .unwrap_err();
    assert_eq!(reused.code(), ErrorCode::InvalidJoinToken);
    assert!(reused.to_string().contains("used already"), "{}", reused);

    let other = w.token("ops").await;
    let err = w
        .mtls
        .enroll_with_token(peer(), Some("ci"), &other, &csr)
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidJoinToken);
    assert!(err.to_string().contains("not for the bot"), "{err}");

    let expiring = w.token("ci").await;
    w.clock.advance(3601);
    let err = w
        .mtls
        .enroll_with_token(peer(), Some("ci"), &expiring, &csr)
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidJoinToken);
    assert!(err.to_string().contains("expired"), "{err}");

    // Only the first enrollment issued anything; each refusal is audited.
    assert_eq!(w.mtls.list().len(), 1);
    let refusals = w
        .kinds()
        .iter()
        .filter(|k| **k == AuditEventKind::CertRefused)
        .count();
    assert_eq!(refusals, 3);
}

#[tokio::test]
async fn csr_for_another_bot_or_badly_signed_issues_nothing_and_keeps_the_token() {
    let w = world();
    let key = KeyPair::generate().unwrap();
    let token = w.token("ci").await;
    let err = w
        .mtls
        .enroll_with_token(peer(), Some("ci"), &token, &csr_for(&key, "ops"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidCsr);
    let err = w
        .mtls
        .enroll_with_token(
            peer(),
            Some("ci"),
            &token,
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidCsr);
    assert!(w.mtls.list().is_empty());
    assert!(w.last_refusal().contains("CSR"), "{}", w.last_refusal());
    // The token was not spent on the bad requests.
    w.mtls
        .enroll_with_token(peer(), Some("ci"), &token, &csr_for(&key, "ci"))
        .await
        .unwrap();
}

#[tokio::test]
async fn revoked_certificates_are_refused_at_request_time() {
    let w = world();
    let (_, cert) = w.enroll("ci").await;
    let (_, other) = w.enroll("ci").await;
    let der = CertificateDer::from_pem_slice(cert.certificate.as_bytes()).unwrap();
    let verified = VerifiedPeer {
        cert: peer::parse_client_cert(&der).unwrap(),
    };
    assert!(w.mtls.authenticate(&verified, peer()).await.is_ok());
    let revoked = w.mtls.revoke_serial(&w.admin, &cert.serial).await.unwrap();
    assert_eq!(revoked, vec![cert.serial.clone()]);
    let err = w.mtls.authenticate(&verified, peer()).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::CertificateRevoked);
    assert!(err.to_string().contains("revoked"), "{err}");
    assert!(w.kinds().contains(&AuditEventKind::CertRevoked));
    // Revoking by bot takes the rest; unknown serials and bots are errors.
    assert_eq!(
        w.mtls.revoke_bot(&w.admin, "ci").await.unwrap(),
        vec![other.serial.clone()]
    );
    assert_eq!(
        w.mtls
            .revoke_serial(&w.admin, "40ff")
            .await
            .unwrap_err()
            .code(),
        ErrorCode::UnknownCertificate
    );
    assert_eq!(
        w.mtls
            .revoke_bot(&w.admin, "nobody")
            .await
            .unwrap_err()
            .code(),
        ErrorCode::UnknownCertificate
    );
    // A certificate past its end is refused even on a live connection.
    let (_, fresh) = w.enroll("ops").await;
    let der = CertificateDer::from_pem_slice(fresh.certificate.as_bytes()).unwrap();
    let live = VerifiedPeer {
        cert: peer::parse_client_cert(&der).unwrap(),
    };
    w.clock.advance(86_401);
    let err = w.mtls.authenticate(&live, peer()).await.unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
}

/// A certificate signed by our CA with a validity window shifted by `offset_secs`.
fn shifted_cert(w: &World, key: &KeyPair, offset_secs: i64) -> String {
    let now = w.clock.now_for_test() + ::time::Duration::seconds(offset_secs);
    let der = w
        .mtls
        .ca()
        .issue_client(key, "ci", false, now, Duration::from_secs(3600))
        .unwrap();
    ca::to_pem(&der)
}

async fn refused_handshake(
    w: &World,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> String {
    let roots = w.mtls.ca().trusted().to_vec();
    let verified = w
        .handshake_with(|addr| async move {
            let outcome = tls_client(addr, client_config(&roots, identity)).await;
            assert!(outcome.is_err(), "the client was let in");
        })
        .await;
    assert!(verified.is_none());
    w.last_refusal()
}

#[tokio::test]
async fn handshakes_without_a_good_certificate_are_refused_and_audited() {
    let w = world();
    let key = KeyPair::generate().unwrap();

    let expired = shifted_cert(&w, &key, -2 * 86_400);
    let why = refused_handshake(&w, Some(identity_of(&expired, &key))).await;
    assert!(why.contains("expired"), "{why}");

    let future = shifted_cert(&w, &key, 2 * 86_400);
    let why = refused_handshake(&w, Some(identity_of(&future, &key))).await;
    assert!(why.contains("not valid yet"), "{why}");

    // A certificate naming the bot, from another CA.
    let other_ca = world();
    let foreign = other_ca
        .mtls
        .ca()
        .issue_client(
            &key,
            "ci",
            false,
            other_ca.clock.now_for_test(),
            Duration::from_secs(3600),
        )
        .unwrap();
    let why = refused_handshake(&w, Some(identity_of(&ca::to_pem(&foreign), &key))).await;
    assert!(why.contains("UnknownIssuer"), "{why}");

    let why = refused_handshake(&w, None).await;
    assert!(
        why.contains("no certificate") || why.contains("NoCertificates"),
        "{why}"
    );
}

#[tokio::test]
async fn plain_http_and_truncated_handshakes_are_refused() {
    let w = world();
    let verified = w
        .handshake_with(|addr| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut buf = Vec::new();
            // The broker answers with at most a TLS alert and closes.
            let _ = s.read_to_end(&mut buf).await;
            assert!(!buf.starts_with(b"HTTP/"), "answered plain HTTP");
        })
        .await;
    assert!(verified.is_none());
    assert!(w.last_refusal().contains("TLS handshake refused"));

    let before = w.kinds().len();
    let verified = w
        .handshake_with(|addr| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            // The start of a TLS record header announcing a ClientHello, then nothing.
            s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
                .await
                .unwrap();
            drop(s);
        })
        .await;
    assert!(verified.is_none());
    assert_eq!(w.kinds().len(), before + 1);
}

impl OffsetClock {
    fn now_for_test(&self) -> ::time::OffsetDateTime {
        crate::clock::Clock::now(self)
    }
}

#[tokio::test]
async fn a_client_that_never_finishes_the_handshake_is_dropped() {
    let mut config = tls_config();
    config.handshake_timeout = Duration::from_millis(300);
    let w = world_with(config);
    let verified = w
        .handshake_with(|addr| async move {
            // Connected, silent: the server gives up on its own and closes.
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut buf = [0u8; 1];
            assert_eq!(s.read(&mut buf).await.unwrap_or(0), 0);
        })
        .await;
    assert!(verified.is_none());
    assert!(
        w.last_refusal().contains("no handshake within"),
        "{}",
        w.last_refusal()
    );
}

/// A "public" root and a pair from it for `domain`, as tailscaled would serve it.
fn public_pair(domain: &str) -> (CertificateDer<'static>, server_cert::HeldPair) {
    let root_key = KeyPair::generate().unwrap();
    let mut root = CertificateParams::default();
    root.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let root_cert = root.self_signed(&root_key).unwrap();
    let issuer = rcgen::Issuer::new(root, root_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![domain.to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let body = format!("{}{}", key.serialize_pem(), leaf.pem());
    (
        root_cert.der().clone(),
        server_cert::parse_pair(body.as_bytes(), domain).unwrap(),
    )
}

struct Swappable(std::sync::Mutex<server_cert::HeldPair>);

#[async_trait::async_trait]
impl server_cert::PairSource for Swappable {
    async fn fetch(&self) -> Result<server_cert::HeldPair, TlsError> {
        Ok(self.0.lock().unwrap().clone())
    }
}

async fn tls_client_named(
    addr: SocketAddr,
    name: &'static str,
    config: Arc<rustls::ClientConfig>,
) -> Result<(), String> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut tls = connector
        .connect(ServerName::try_from(name).unwrap(), stream)
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    tls.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
    (buf == b"ok")
        .then_some(())
        .ok_or_else(|| "no answer".into())
}

#[tokio::test]
async fn tailscaled_pair_is_served_and_its_renewal_swapped_in_without_a_restart() {
    const DOMAIN: &str = "bot-broker.tailnet-1234.ts.net";
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let (root_a, pair_a) = public_pair(DOMAIN);
    let (root_b, pair_b) = public_pair(DOMAIN);
    let source = Arc::new(Swappable(std::sync::Mutex::new(pair_a)));
    let dir = tempfile::tempdir().unwrap();
    let mut config = tls_config();
    config.server_certificate = ServerCertificate::Tailscale {
        socket: dir.path().join("unused.sock"),
    };
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let audit = AuditLog::start(store.clone());
    let clock = OffsetClock::default();
    let mtls = Mtls::open_with_source(
        &config,
        dir.path(),
        store,
        audit.clone(),
        Arc::new(clock.clone()),
        source.clone(),
    )
    .await
    .unwrap();
    let w = World {
        _dir: dir,
        mtls,
        audit,
        clock,
        admin: Caller {
            address: "127.0.0.1:9".parse().unwrap(),
            via: CallerVia::ApiKey { bot: "ops".into() },
        },
    };
    let (key, cert) = w.enroll("ci").await;
    let connect = |root: CertificateDer<'static>| {
        let identity = identity_of(&cert.certificate, &key);
        let config = client_config(&[root], Some(identity));
        let w = &w;
        async move {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let verified = w
                .handshake_with(|addr| async move {
                    let _ = tx.send(tls_client_named(addr, DOMAIN, config).await);
                })
                .await;
            (rx.await.unwrap(), verified.is_some())
        }
    };

    // tailscaled's certificate is presented; client certificates are still the broker CA's.
    assert_eq!(connect(root_a.clone()).await, (Ok(()), true));
    let broker_ca = w.mtls.ca().trusted()[0].clone();
    let (client, _) = connect(broker_ca).await;
    assert!(client.unwrap_err().contains("certificate"));

    // tailscaled renewed: the next refresh swaps the new pair in for the next handshake.
    *source.0.lock().unwrap() = pair_b.clone();
    assert!(
        server_cert::refresh_once(&w.mtls.server_cert, source.as_ref())
            .await
            .unwrap()
    );
    assert_eq!(w.mtls.server_certificate().serial, pair_b.serial);
    assert_eq!(connect(root_b).await, (Ok(()), true));
    let (client, _) = connect(root_a).await;
    assert!(client.unwrap_err().contains("certificate"));
}
