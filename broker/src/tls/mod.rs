//! mTLS identity: the broker's own CA, enrollment with one-time join tokens, renewal,
//! revocation, and the TLS listener's client verification. See docs/mtls.md.
//!
//! Certificates name their bot in a SAN URI (`botcreds://bot/NAME`) and admins carry a second
//! one (`botcreds://role/admin`). Every issued certificate is recorded in the store; a
//! certificate is accepted only while its record exists, is not revoked and has not lapsed,
//! checked on every request so revocation reaches live keep-alive connections too.

pub mod ca;
pub mod config;
pub mod csr;
mod error;
pub mod listener;
pub mod peer;
pub mod server_cert;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use botcreds_proto::audit::{AuditEvent, AuditEventKind};
use botcreds_proto::enroll::{CertSummary, EnrolledCertificate, JoinToken};
use serde::{Deserialize, Serialize};

use crate::audit::AuditLog;
use crate::clock::{SharedClock, rfc3339, rfc3339_millis};
use crate::identity::{Caller, CallerVia};
use crate::secret::sha256_hex;
use crate::store::Store;

pub use self::ca::CertAuthority;
pub use self::config::{RawTlsConfig, ServerCertificate, TlsConfig};
pub use self::error::MtlsError;
pub use self::peer::{ClientCert, VerifiedPeer};

/// Store namespace of issued certificates, keyed by serial.
const CERTS_NS: &str = "tls.certs";
/// Store namespace of join tokens, keyed by the SHA-256 of the token.
const TOKENS_NS: &str = "tls.join_tokens";
/// Join tokens live this long unless `--ttl` says otherwise.
pub const DEFAULT_JOIN_TOKEN_TTL: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("mTLS CA: {0}")]
    Ca(String),
    #[error("issuing a certificate: {0}")]
    Issue(String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("a stored mTLS record is unreadable: {0}")]
    Record(String),
    #[error("server certificate: {0}")]
    ServerCert(String),
}

/// How a certificate came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IssuedVia {
    Token,
    Tailnet,
    Renewal,
}

impl IssuedVia {
    fn as_str(self) -> &'static str {
        match self {
            IssuedVia::Token => "token",
            IssuedVia::Tailnet => "tailnet",
            IssuedVia::Renewal => "renewal",
        }
    }
}

/// What the broker remembers of an issued certificate (never a key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    pub serial: String,
    pub bot: String,
    pub admin: bool,
    pub issued_at: String,
    pub expires_at: String,
    /// Unix seconds of `expires_at`, for the request-time check.
    pub expires_unix: i64,
    pub issued_via: IssuedVia,
    /// Who enrolled: the caller's description.
    pub caller: String,
    #[serde(default)]
    pub renewed_from: Option<String>,
    #[serde(default)]
    pub revoked_at: Option<String>,
}

/// What a new client certificate is for, and who asked for it (audited as `who` from
/// `address`).
struct NewCert<'a> {
    bot: &'a str,
    admin: bool,
    via: IssuedVia,
    who: &'a str,
    address: SocketAddr,
    /// The serial a renewal replaces.
    renewed_from: Option<String>,
}

/// A join token as stored: only its hash is the key.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct JoinTokenRecord {
    bot: String,
    admin: bool,
    created_at: String,
    expires_unix: i64,
    created_by: String,
}

/// The mTLS side of the broker, shared by the listener, the extractor and the routes.
pub struct Mtls {
    config: TlsConfig,
    ca: CertAuthority,
    server_config: Arc<rustls::ServerConfig>,
    /// The server certificate in use; swapped when tailscaled renews its pair.
    server_cert: Arc<server_cert::ServerCertResolver>,
    /// Re-fetches tailscaled's pair (`server_certificate = "tailscale"`); stops with `Mtls`.
    _refresher: Option<server_cert::AbortOnDrop>,
    store: Arc<dyn Store>,
    audit: AuditLog,
    clock: SharedClock,
    /// Every issued certificate by serial, mirrored from the store.
    certs: Mutex<HashMap<String, CertRecord>>,
    /// Serialises join-token use so that a token is consumed exactly once.
    tokens: Mutex<()>,
}

impl std::fmt::Debug for Mtls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mtls")
            .field("listen", &self.config.listen)
            .finish_non_exhaustive()
    }
}

impl Mtls {
    /// Load (or create) the CA, issue the server certificate from it, and read the certificate
    /// records. For `server_certificate = "tailscale"` use [`Mtls::open`].
    pub fn start(
        config: &TlsConfig,
        data_dir: &Path,
        store: Arc<dyn Store>,
        audit: AuditLog,
        clock: SharedClock,
    ) -> Result<Arc<Mtls>, TlsError> {
        if config.server_certificate != ServerCertificate::Ca {
            return Err(TlsError::ServerCert(
                "server_certificate = \"tailscale\" needs tailscaled's pair: start with Mtls::open"
                    .into(),
            ));
        }
        let now = clock.now();
        let ca = CertAuthority::load_or_create(config, data_dir, now)?;
        let (chain, key) = ca.issue_server(&config.server_names, now)?;
        // The CA's certificate names every configured name (DNS or IP); the first one only
        // labels it in logs.
        let label = config.server_names.first().cloned().unwrap_or_default();
        let pair = server_cert::held_pair(chain, key, &label, false)?;
        Mtls::assemble(config, ca, pair, None, store, audit, clock)
    }

    /// Like [`Mtls::start`], and for `server_certificate = "tailscale"` first fetch the
    /// node's pair from tailscaled (failing when it is unreachable or refuses), then keep
    /// re-fetching it in the background and swap renewals in.
    pub async fn open(
        config: &TlsConfig,
        data_dir: &Path,
        store: Arc<dyn Store>,
        audit: AuditLog,
        clock: SharedClock,
    ) -> Result<Arc<Mtls>, TlsError> {
        match &config.server_certificate {
            ServerCertificate::Ca => Mtls::start(config, data_dir, store, audit, clock),
            ServerCertificate::Tailscale { socket } => {
                let source = Arc::new(server_cert::LocalApiPairSource::new(socket.clone()));
                Mtls::open_with_source(config, data_dir, store, audit, clock, source).await
            }
        }
    }

    /// [`Mtls::open`] with the server certificate from `source`.
    pub async fn open_with_source(
        config: &TlsConfig,
        data_dir: &Path,
        store: Arc<dyn Store>,
        audit: AuditLog,
        clock: SharedClock,
        source: Arc<dyn server_cert::PairSource>,
    ) -> Result<Arc<Mtls>, TlsError> {
        let pair = source.fetch().await.map_err(|e| {
            TlsError::ServerCert(format!(
                "tls.server_certificate = \"tailscale\": cannot get this node's certificate \
                 from tailscaled: {}",
                match e {
                    TlsError::ServerCert(m) => m,
                    other => other.to_string(),
                }
            ))
        })?;
        let now = clock.now();
        if pair.not_after <= now {
            return Err(TlsError::ServerCert(format!(
                "tls.server_certificate = \"tailscale\": tailscaled's certificate for {} \
                 expired at {}",
                pair.domain, pair.not_after
            )));
        }
        tracing::info!(domain = %pair.domain, serial = %pair.serial, not_after = %pair.not_after,
            "mTLS server certificate from tailscaled");
        let ca = CertAuthority::load_or_create(config, data_dir, now)?;
        let resolver = Arc::new(server_cert::ServerCertResolver::new(pair));
        let refresher = server_cert::AbortOnDrop(tokio::spawn(server_cert::refresh_loop(
            resolver.clone(),
            source,
            clock.clone(),
        )));
        Mtls::assemble_with(config, ca, resolver, Some(refresher), store, audit, clock)
    }

    fn assemble(
        config: &TlsConfig,
        ca: CertAuthority,
        pair: server_cert::HeldPair,
        refresher: Option<server_cert::AbortOnDrop>,
        store: Arc<dyn Store>,
        audit: AuditLog,
        clock: SharedClock,
    ) -> Result<Arc<Mtls>, TlsError> {
        let resolver = Arc::new(server_cert::ServerCertResolver::new(pair));
        Mtls::assemble_with(config, ca, resolver, refresher, store, audit, clock)
    }

    fn assemble_with(
        config: &TlsConfig,
        ca: CertAuthority,
        resolver: Arc<server_cert::ServerCertResolver>,
        refresher: Option<server_cert::AbortOnDrop>,
        store: Arc<dyn Store>,
        audit: AuditLog,
        clock: SharedClock,
    ) -> Result<Arc<Mtls>, TlsError> {
        let server_config = listener::server_config(&ca, resolver.clone())?;
        let mut certs = HashMap::new();
        for (serial, bytes) in store.list_docs(CERTS_NS)? {
            let record: CertRecord = serde_json::from_slice(&bytes)
                .map_err(|e| TlsError::Record(format!("certificate {serial}: {e}")))?;
            certs.insert(serial, record);
        }
        Ok(Arc::new(Mtls {
            config: config.clone(),
            ca,
            server_config,
            server_cert: resolver,
            _refresher: refresher,
            store,
            audit,
            clock,
            certs: Mutex::new(certs),
            tokens: Mutex::new(()),
        }))
    }

    /// The server certificate the listener presents now.
    pub fn server_certificate(&self) -> server_cert::HeldPair {
        self.server_cert.current()
    }

    pub fn config(&self) -> &TlsConfig {
        &self.config
    }

    pub fn ca(&self) -> &CertAuthority {
        &self.ca
    }

    /// A one-time join token for `bot`, stored only as its hash.
    pub async fn create_join_token(
        &self,
        admin_caller: &Caller,
        bot: &str,
        ttl: Duration,
        admin: bool,
    ) -> Result<JoinToken, MtlsError> {
        check_bot_name(bot)?;
        if ttl > self.config.max_join_token_ttl {
            return Err(MtlsError::JoinTokenTtlTooLong {
                max_secs: self.config.max_join_token_ttl.as_secs(),
            });
        }
        let now = self.clock.now();
        let expires = now + ::time::Duration::seconds(ttl.as_secs() as i64);
        let token = format!("bcj_{}", random_base62(32));
        let record = JoinTokenRecord {
            bot: bot.to_string(),
            admin,
            created_at: rfc3339(now),
            expires_unix: expires.unix_timestamp(),
            created_by: admin_caller.describe(),
        };
        let bytes = serde_json::to_vec(&record)
            .map_err(|e| MtlsError::internal("encoding a join token", e))?;
        self.store
            .put_doc(TOKENS_NS, &sha256_hex(token.as_bytes()), &bytes)
            .map_err(|e| MtlsError::internal("storing a join token", e))?;
        let mut e = self.event(
            AuditEventKind::EnrollTokenCreated,
            Some(bot),
            Some(admin_caller),
        );
        e.expires_at = Some(rfc3339(expires));
        e.detail = Some(format!("join token{}", if admin { " (admin)" } else { "" }));
        self.record(e).await?;
        Ok(JoinToken {
            token,
            bot: bot.to_string(),
            admin,
            expires_at: rfc3339(expires),
        })
    }

    /// Enrollment with a join token: the token must be unused, unexpired and for `bot` (the
    /// token's own bot when the request names none), and the CSR must name nothing but that
    /// bot. Nothing is issued (nor the token used) otherwise.
    pub async fn enroll_with_token(
        &self,
        address: SocketAddr,
        bot: Option<&str>,
        token: &str,
        csr_pem: &str,
    ) -> Result<EnrolledCertificate, MtlsError> {
        let who = format!("join_token ({})", address.ip());
        let bot = match bot {
            Some(b) => b.to_string(),
            None => match self.token_bot(token) {
                Ok(b) => b,
                Err(e) => return Err(self.refuse_unauthenticated(None, &who, address, e).await),
            },
        };
        let bot = bot.as_str();
        // Nothing is proven before the token is used up: audited like any unidentified caller.
        let refused = |e: MtlsError| self.refuse_unauthenticated(Some(bot), &who, address, e);
        if let Err(e) = check_bot_name(bot) {
            return Err(refused(e).await);
        }
        let key = match csr::public_key_for(csr_pem, bot) {
            Ok(k) => k,
            Err(m) => return Err(refused(MtlsError::InvalidCsr(m)).await),
        };
        let admin = match self.consume_token(token, bot) {
            Ok(admin) => admin,
            Err(e) => return Err(refused(e).await),
        };
        self.issue(
            &key,
            NewCert {
                bot,
                admin,
                via: IssuedVia::Token,
                who: &who,
                address,
                renewed_from: None,
            },
        )
        .await
    }

    /// The bot a join token is for, without using it.
    fn token_bot(&self, token: &str) -> Result<String, MtlsError> {
        let hash = sha256_hex(token.trim().as_bytes());
        match self
            .store
            .get_doc(TOKENS_NS, &hash)
            .map_err(|e| MtlsError::internal("reading a join token", e))?
        {
            Some(bytes) => serde_json::from_slice::<JoinTokenRecord>(&bytes)
                .map(|r| r.bot)
                .map_err(|e| MtlsError::internal("a stored join token", e)),
            None => Err(MtlsError::UnknownJoinToken),
        }
    }

    /// Audit and return the refusal of a token-less enrollment whose caller is unknown.
    pub async fn enroll_tailnet_refused(
        &self,
        address: SocketAddr,
        bot: Option<&str>,
    ) -> MtlsError {
        self.refuse_unauthenticated(
            bot,
            &format!("anonymous ({})", address.ip()),
            address,
            MtlsError::JoinTokenRequired,
        )
        .await
    }

    /// Enrollment of a tailnet caller the policy maps to `bot` (`[tls] tailnet_enrollment`).
    /// `identity_assigned`: whether the policy identifies that bot by something the node cannot
    /// choose for itself (a tag, a capability, its owner's login; not its hostname).
    pub async fn enroll_tailnet(
        &self,
        caller: &Caller,
        policy_bot: Option<&str>,
        identity_assigned: bool,
        bot: Option<&str>,
        csr_pem: &str,
    ) -> Result<EnrolledCertificate, MtlsError> {
        let who = caller.describe();
        let Some(bot) = bot.or(policy_bot) else {
            return Err(self
                .refuse(None, &who, caller.address, MtlsError::NoBotForCaller)
                .await);
        };
        let refused = |e: MtlsError| self.refuse(Some(bot), &who, caller.address, e);
        if !self.config.tailnet_enrollment {
            return Err(refused(MtlsError::TailnetEnrollmentOff).await);
        }
        if !matches!(caller.via, CallerVia::Tailnet(_)) || policy_bot != Some(bot) {
            return Err(refused(MtlsError::NotTheCallersBot(bot.to_string())).await);
        }
        if !identity_assigned {
            // A node renamed like a hostname-identified bot would otherwise get a certificate
            // for it that outlives the rename and renews itself.
            return Err(refused(MtlsError::HostnameIdentified(bot.to_string())).await);
        }
        let key = match csr::public_key_for(csr_pem, bot) {
            Ok(k) => k,
            Err(m) => return Err(refused(MtlsError::InvalidCsr(m)).await),
        };
        self.issue(
            &key,
            NewCert {
                bot,
                admin: false,
                via: IssuedVia::Tailnet,
                who: &who,
                address: caller.address,
                renewed_from: None,
            },
        )
        .await
    }

    /// Renewal: a new certificate for the bot of the caller's current (verified, unrevoked)
    /// certificate, with the same role.
    pub async fn renew(
        &self,
        caller: &Caller,
        csr_pem: &str,
    ) -> Result<EnrolledCertificate, MtlsError> {
        let who = caller.describe();
        let CallerVia::Mtls { bot, serial, admin } = &caller.via else {
            return Err(self
                .refuse(
                    None,
                    &who,
                    caller.address,
                    MtlsError::RenewalNeedsCertificate,
                )
                .await);
        };
        let key = match csr::public_key_for(csr_pem, bot) {
            Ok(k) => k,
            Err(m) => {
                return Err(self
                    .refuse(Some(bot), &who, caller.address, MtlsError::InvalidCsr(m))
                    .await);
            }
        };
        self.issue(
            &key,
            NewCert {
                bot,
                admin: *admin,
                via: IssuedVia::Renewal,
                who: &who,
                address: caller.address,
                renewed_from: Some(serial.clone()),
            },
        )
        .await
    }

    async fn issue(
        &self,
        key: &rcgen::PublicKey,
        cert: NewCert<'_>,
    ) -> Result<EnrolledCertificate, MtlsError> {
        let NewCert {
            bot,
            admin,
            via,
            who,
            address,
            renewed_from,
        } = cert;
        let now = self.clock.now();
        let der = self
            .ca
            .issue_client(key, bot, admin, now, self.config.client_cert_ttl)
            .map_err(|e| MtlsError::internal("issuing a client certificate", e))?;
        let parsed = peer::parse_client_cert(&der)
            .map_err(|e| MtlsError::internal("reading the issued certificate", e))?;
        let record = CertRecord {
            serial: parsed.serial.clone(),
            bot: bot.to_string(),
            admin,
            issued_at: rfc3339(now),
            expires_at: rfc3339(parsed.not_after),
            expires_unix: parsed.not_after.unix_timestamp(),
            issued_via: via,
            caller: who.to_string(),
            renewed_from: renewed_from.clone(),
            revoked_at: None,
        };
        self.put_record(&record)?;
        let kind = match via {
            IssuedVia::Renewal => AuditEventKind::CertRenewed,
            _ => AuditEventKind::CertIssued,
        };
        let mut e = self.event(kind, Some(bot), None);
        e.caller = Some(who.to_string());
        e.client_ip = Some(address.ip().to_string());
        e.expires_at = Some(record.expires_at.clone());
        e.detail = Some(format!(
            "client certificate {} via {}{}{}",
            record.serial,
            via.as_str(),
            if admin { ", admin" } else { "" },
            renewed_from
                .map(|s| format!(", renews {s}"))
                .unwrap_or_default()
        ));
        // The certificate is answered only once its issuance is durable in the audit log.
        if let Err(err) = self.record(e).await {
            self.lock_certs().remove(&record.serial);
            let _ = self.store.delete_doc(CERTS_NS, &record.serial);
            return Err(err);
        }
        tracing::info!(bot, serial = %record.serial, via = via.as_str(), "client certificate issued");
        Ok(EnrolledCertificate {
            bot: bot.to_string(),
            serial: record.serial,
            admin,
            certificate: ca::to_pem(&der),
            ca_bundle: self.ca.bundle_pem().to_string(),
            not_before: rfc3339(parsed.not_before),
            expires_at: record.expires_at,
        })
    }

    /// Use a join token once. Its record goes before anything is issued, so a second use
    /// (even a concurrent one) finds nothing.
    fn consume_token(&self, token: &str, bot: &str) -> Result<bool, MtlsError> {
        let hash = sha256_hex(token.trim().as_bytes());
        let _guard = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(bytes) = self
            .store
            .get_doc(TOKENS_NS, &hash)
            .map_err(|e| MtlsError::internal("reading a join token", e))?
        else {
            return Err(MtlsError::UnknownJoinToken);
        };
        let record: JoinTokenRecord = serde_json::from_slice(&bytes)
            .map_err(|e| MtlsError::internal("a stored join token", e))?;
        if record.expires_unix <= self.clock.now().unix_timestamp() {
            self.store
                .delete_doc(TOKENS_NS, &hash)
                .map_err(|e| MtlsError::internal("deleting an expired join token", e))?;
            return Err(MtlsError::ExpiredJoinToken);
        }
        if record.bot != bot {
            // Left in place: its rightful bot may still use it.
            return Err(MtlsError::JoinTokenForAnotherBot(bot.to_string()));
        }
        self.store
            .delete_doc(TOKENS_NS, &hash)
            .and_then(|()| self.store.flush())
            .map_err(|e| MtlsError::internal("using up a join token", e))?;
        Ok(record.admin)
    }

    /// The caller a verified client certificate stands for, checked against the records on
    /// every request: unknown, revoked and lapsed certificates are refused (and audited).
    pub async fn authenticate(
        &self,
        peer: &VerifiedPeer,
        address: SocketAddr,
    ) -> Result<Caller, MtlsError> {
        let cert = &peer.cert;
        let now = self.clock.now().unix_timestamp();
        let problem = match self.lock_certs().get(&cert.serial) {
            None => Some(MtlsError::CertificateUnknown),
            Some(r) if r.revoked_at.is_some() => Some(MtlsError::CertificateRevoked {
                serial: r.serial.clone(),
                at: r.revoked_at.clone().unwrap_or_default(),
            }),
            Some(r) if r.expires_unix <= now => {
                Some(MtlsError::CertificateExpired(r.expires_at.clone()))
            }
            Some(r) if r.bot != cert.bot || r.admin != cert.admin => {
                Some(MtlsError::CertificateMismatch)
            }
            Some(_) => None,
        };
        let who = format!("mtls:{} ({})", cert.bot, cert.serial);
        if let Some(problem) = problem {
            tracing::warn!(peer = %address, serial = %cert.serial, "{problem}");
            return Err(self
                .refuse_unauthenticated(Some(&cert.bot), &who, address, problem)
                .await);
        }
        Ok(Caller {
            address,
            via: CallerVia::Mtls {
                bot: cert.bot.clone(),
                serial: cert.serial.clone(),
                admin: cert.admin,
            },
        })
    }

    /// Revoke one certificate by serial. Revoking a revoked one changes nothing.
    pub async fn revoke_serial(
        &self,
        admin: &Caller,
        serial: &str,
    ) -> Result<Vec<String>, MtlsError> {
        let serial = serial.trim().to_ascii_lowercase();
        let record = self.lock_certs().get(&serial).cloned();
        let Some(record) = record else {
            return Err(MtlsError::UnknownSerial(serial));
        };
        self.revoke(admin, vec![record], &format!("serial {serial}"))
            .await
    }

    /// Revoke every unrevoked certificate of `bot`.
    pub async fn revoke_bot(&self, admin: &Caller, bot: &str) -> Result<Vec<String>, MtlsError> {
        let records: Vec<CertRecord> = self
            .lock_certs()
            .values()
            .filter(|r| r.bot == bot)
            .cloned()
            .collect();
        if records.is_empty() {
            return Err(MtlsError::BotWithoutCertificate(bot.to_string()));
        }
        self.revoke(admin, records, &format!("bot {bot}")).await
    }

    async fn revoke(
        &self,
        admin: &Caller,
        records: Vec<CertRecord>,
        what: &str,
    ) -> Result<Vec<String>, MtlsError> {
        let now = rfc3339(self.clock.now());
        let mut revoked = Vec::new();
        let mut bots = Vec::new();
        for mut r in records.into_iter().filter(|r| r.revoked_at.is_none()) {
            r.revoked_at = Some(now.clone());
            self.put_record(&r)?;
            revoked.push(r.serial.clone());
            if !bots.contains(&r.bot) {
                bots.push(r.bot.clone());
            }
        }
        self.store
            .flush()
            .map_err(|e| MtlsError::internal("storing revocations", e))?;
        if !revoked.is_empty() {
            let mut e = self.event(
                AuditEventKind::CertRevoked,
                bots.first().map(String::as_str),
                Some(admin),
            );
            e.detail = Some(format!("revoked {what}: {}", revoked.join(", ")));
            self.record(e).await?;
        }
        Ok(revoked)
    }

    /// Every issued certificate, oldest first.
    pub fn list(&self) -> Vec<CertSummary> {
        let mut all: Vec<CertSummary> = self
            .lock_certs()
            .values()
            .map(|r| CertSummary {
                serial: r.serial.clone(),
                bot: r.bot.clone(),
                admin: r.admin,
                issued_at: r.issued_at.clone(),
                expires_at: r.expires_at.clone(),
                issued_via: r.issued_via.as_str().to_string(),
                revoked_at: r.revoked_at.clone(),
            })
            .collect();
        all.sort_by(|a, b| (&a.issued_at, &a.serial).cmp(&(&b.issued_at, &b.serial)));
        all
    }

    /// Audit a refused TLS handshake (wrong CA, expired, no certificate, not TLS, cut short).
    pub async fn refuse_handshake(&self, address: SocketAddr, reason: &str) {
        tracing::warn!(peer = %address, reason, "mTLS handshake refused");
        let mut e = self.event(AuditEventKind::CertRefused, None, None);
        e.client_ip = Some(address.ip().to_string());
        e.code = Some("tls_handshake".into());
        e.detail = Some(format!("TLS handshake refused: {reason}"));
        // Anyone can open connections: per peer, only the first few are written one by one.
        if let Err(err) = self.audit.record_refusal(address.ip(), e).await {
            tracing::error!(error = %err, "audit log write failed for a refused handshake");
        }
    }

    /// Audit a refusal and hand the error back.
    async fn refuse(
        &self,
        bot: Option<&str>,
        who: &str,
        address: SocketAddr,
        err: MtlsError,
    ) -> MtlsError {
        let mut e = self.event(AuditEventKind::CertRefused, bot, None);
        e.caller = Some(who.to_string());
        e.client_ip = Some(address.ip().to_string());
        e.code = Some(err.code().as_str().to_string());
        e.detail = Some(err.to_string());
        match self.record(e).await {
            Ok(()) => err,
            Err(audit_err) => audit_err,
        }
    }

    /// [`Mtls::refuse`] for a caller who could not be identified (or whose certificate is no
    /// longer good): audited one by one only up to `[limits] audited_refusals_per_peer`.
    async fn refuse_unauthenticated(
        &self,
        bot: Option<&str>,
        who: &str,
        address: SocketAddr,
        err: MtlsError,
    ) -> MtlsError {
        let mut e = self.event(AuditEventKind::CertRefused, bot, None);
        e.caller = Some(who.to_string());
        e.code = Some(err.code().as_str().to_string());
        e.detail = Some(err.to_string());
        match self.audit.record_refusal(address.ip(), e).await {
            Ok(()) => err,
            Err(audit_err) => MtlsError::internal("audit log write failed", audit_err),
        }
    }

    fn event(
        &self,
        kind: AuditEventKind,
        bot: Option<&str>,
        caller: Option<&Caller>,
    ) -> AuditEvent {
        let mut e = AuditEvent::new(kind, rfc3339_millis(self.clock.now()));
        e.bot = bot.map(str::to_string);
        if let Some(c) = caller {
            e.caller = Some(c.describe());
            e.client_ip = Some(c.address.ip().to_string());
        }
        e
    }

    async fn record(&self, event: AuditEvent) -> Result<(), MtlsError> {
        self.audit
            .record(vec![event])
            .await
            .map(|_| ())
            .map_err(|e| MtlsError::internal("audit log write failed", e))
    }

    fn put_record(&self, record: &CertRecord) -> Result<(), MtlsError> {
        let bytes = serde_json::to_vec(record)
            .map_err(|e| MtlsError::internal("encoding a certificate record", e))?;
        self.store
            .put_doc(CERTS_NS, &record.serial, &bytes)
            .map_err(|e| MtlsError::internal("storing a certificate record", e))?;
        self.lock_certs()
            .insert(record.serial.clone(), record.clone());
        Ok(())
    }

    fn lock_certs(&self) -> std::sync::MutexGuard<'_, HashMap<String, CertRecord>> {
        self.certs.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Bot names as the policy allows them; they end up in SAN URIs.
fn check_bot_name(bot: &str) -> Result<(), MtlsError> {
    let ok = !bot.is_empty()
        && bot.len() <= 64
        && bot
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(MtlsError::BadBotName(bot.to_string()))
    }
}

fn random_base62(n: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}
