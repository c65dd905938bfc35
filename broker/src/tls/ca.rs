//! The broker's own certificate authority: created on first start under `<data_dir>/tls/`
//! (key 0600) or loaded from configured files; issues the server certificate and client
//! certificates, and names every CA the TLS listener trusts (the rotation window).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ::time::{Duration as TimeDuration, OffsetDateTime};
use botcreds_proto::enroll::{ADMIN_ROLE_URI, BOT_URI_PREFIX};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::TlsError;
use super::config::{CaSource, TlsConfig};

/// How long a CA created by the broker is valid.
const CA_LIFETIME_DAYS: i64 = 10 * 365;
/// How long the server certificate is valid; it is issued anew on every start.
const SERVER_CERT_LIFETIME_DAYS: i64 = 365;
/// Validity starts this much before "now" so that hosts with slightly slow clocks accept it.
const BACKDATE: TimeDuration = TimeDuration::minutes(5);

/// The active CA (which signs) and every CA the listener trusts.
pub struct CertAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// The active CA certificate, then the extra trusted ones.
    trusted: Vec<CertificateDer<'static>>,
    bundle_pem: String,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority")
            .field("trusted", &self.trusted.len())
            .finish_non_exhaustive()
    }
}

/// The paths of a CA kept in the data directory.
pub fn data_dir_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    let dir = data_dir.join("tls");
    (dir.join("ca.crt"), dir.join("ca.key"))
}

impl CertAuthority {
    /// Load the configured CA, or the one in the data directory, creating it there on first
    /// start; then add the extra trusted CA certificates.
    pub fn load_or_create(
        config: &TlsConfig,
        data_dir: &Path,
        now: OffsetDateTime,
    ) -> Result<CertAuthority, TlsError> {
        let (cert_path, key_path) = match &config.ca {
            CaSource::Files { cert, key } => (cert.clone(), key.clone()),
            CaSource::DataDir => {
                let (cert, key) = data_dir_paths(data_dir);
                if !cert.exists() && !key.exists() {
                    create_ca_files(&cert, &key, now)?;
                }
                (cert, key)
            }
        };
        let cert_pem = std::fs::read_to_string(&cert_path)
            .map_err(|e| TlsError::Ca(format!("cannot read {}: {e}", cert_path.display())))?;
        let key_pem = crate::settings::read_secret_file(&key_path).map_err(TlsError::Ca)?;
        let key = KeyPair::from_pem(key_pem.expose()).map_err(|e| {
            TlsError::Ca(format!("{} is not a private key: {e}", key_path.display()))
        })?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| {
            TlsError::Ca(format!(
                "{} is not a PEM certificate: {e}",
                cert_path.display()
            ))
        })?;
        let spki = cert_public_key(&cert_der)
            .map_err(|m| TlsError::Ca(format!("{}: {m}", cert_path.display())))?;
        if spki != key.der_bytes() {
            return Err(TlsError::Ca(format!(
                "{} does not belong to the key in {}",
                cert_path.display(),
                key_path.display()
            )));
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| {
            TlsError::Ca(format!("{} is not a usable CA: {e}", cert_path.display()))
        })?;
        let mut trusted = vec![cert_der];
        for path in &config.extra_trusted_ca_files {
            let text = std::fs::read(path)
                .map_err(|e| TlsError::Ca(format!("cannot read {}: {e}", path.display())))?;
            let mut found = 0;
            for cert in CertificateDer::pem_slice_iter(&text) {
                let cert = cert.map_err(|e| {
                    TlsError::Ca(format!("{}: not a PEM certificate: {e}", path.display()))
                })?;
                trusted.push(cert);
                found += 1;
            }
            if found == 0 {
                return Err(TlsError::Ca(format!(
                    "{} holds no PEM certificate",
                    path.display()
                )));
            }
        }
        let bundle_pem = trusted.iter().map(|c| to_pem(c)).collect();
        Ok(CertAuthority {
            issuer,
            trusted,
            bundle_pem,
        })
    }

    /// Every trusted CA certificate, the active one first.
    pub fn trusted(&self) -> &[CertificateDer<'static>] {
        &self.trusted
    }

    /// The trusted CA certificates as one PEM bundle.
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// A client certificate for `bot` around `public_key`; subject and names are ours, never
    /// the request's.
    pub fn issue_client(
        &self,
        public_key: &impl PublicKeyData,
        bot: &str,
        admin: bool,
        now: OffsetDateTime,
        lifetime: std::time::Duration,
    ) -> Result<CertificateDer<'static>, TlsError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, bot);
        dn.push(DnType::OrganizationName, "botcreds");
        params.distinguished_name = dn;
        params
            .subject_alt_names
            .push(uri(&format!("{BOT_URI_PREFIX}{bot}"))?);
        if admin {
            params.subject_alt_names.push(uri(ADMIN_ROLE_URI)?);
        }
        params.serial_number = Some(random_serial());
        // Backdating is capped to a tenth of the lifetime so that short-lived certificates are
        // not mostly spent before they are issued (agents renew at two-thirds of the span).
        let backdate = BACKDATE.min(TimeDuration::seconds(lifetime.as_secs() as i64 / 10));
        params.not_before = now - backdate;
        params.not_after = now + TimeDuration::seconds(lifetime.as_secs() as i64);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| TlsError::Issue(e.to_string()))?;
        Ok(cert.der().clone())
    }

    /// A fresh key and server certificate naming `names` (DNS names or IP addresses).
    pub fn issue_server(
        &self,
        names: &[String],
        now: OffsetDateTime,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let key = KeyPair::generate().map_err(|e| TlsError::Issue(e.to_string()))?;
        let mut params = CertificateParams::new(names.to_vec())
            .map_err(|e| TlsError::Issue(format!("server_names: {e}")))?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().map(String::as_str).unwrap_or("botcreds"),
        );
        params.distinguished_name = dn;
        params.serial_number = Some(random_serial());
        params.not_before = now - BACKDATE;
        params.not_after = now + TimeDuration::days(SERVER_CERT_LIFETIME_DAYS);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| TlsError::Issue(e.to_string()))?;
        let key_der = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| TlsError::Issue(e.to_string()))?;
        Ok((vec![cert.der().clone()], key_der))
    }

    /// The root store the client verifier checks against.
    pub fn root_store(&self) -> Result<Arc<rustls::RootCertStore>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.trusted {
            roots
                .add(c.clone())
                .map_err(|e| TlsError::Ca(format!("a trusted CA certificate is unusable: {e}")))?;
        }
        Ok(Arc::new(roots))
    }
}

/// Create a CA key (0600, written before the certificate) and its self-signed certificate;
/// existing files are never replaced.
pub fn create_ca_files(
    cert_path: &Path,
    key_path: &Path,
    now: OffsetDateTime,
) -> Result<(), TlsError> {
    let io = |what: &str, e: std::io::Error| TlsError::Ca(format!("{what}: {e}"));
    if cert_path.exists() {
        return Err(TlsError::Ca(format!(
            "{} exists already; not replacing a CA",
            cert_path.display()
        )));
    }
    if let Some(dir) = key_path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io(&dir.display().to_string(), e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io(&dir.display().to_string(), e))?;
    }
    let key = KeyPair::generate().map_err(|e| TlsError::Issue(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    // A random suffix keeps a rotated CA's name distinct from the one it replaces.
    let suffix: [u8; 4] = rand::random();
    dn.push(
        DnType::CommonName,
        format!("botcreds CA {} {}", now.date(), hex::encode(suffix)),
    );
    dn.push(DnType::OrganizationName, "botcreds");
    params.distinguished_name = dn;
    params.serial_number = Some(random_serial());
    params.not_before = now - BACKDATE;
    params.not_after = now + TimeDuration::days(CA_LIFETIME_DAYS);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params
        .self_signed(&key)
        .map_err(|e| TlsError::Issue(e.to_string()))?;
    write_private(key_path, key.serialize_pem().as_bytes())
        .map_err(|e| io(&key_path.display().to_string(), e))?;
    std::fs::write(cert_path, cert.pem()).map_err(|e| io(&cert_path.display().to_string(), e))?;
    tracing::info!(cert = %cert_path.display(), "created the broker's mTLS certificate authority");
    Ok(())
}

/// Write a file only its owner can read, refusing to replace an existing one.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

fn uri(s: &str) -> Result<SanType, TlsError> {
    s.try_into()
        .map(SanType::URI)
        .map_err(|e| TlsError::Issue(format!("{s:?} is not a URI: {e}")))
}

/// 16 random bytes, first byte in 0x40..=0x7f so the DER integer is positive, minimal and
/// always 16 bytes (the hex form stays stable between issuing and parsing).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x3f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn cert_public_key(der: &CertificateDer<'_>) -> Result<Vec<u8>, String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

/// A DER certificate as PEM.
pub fn to_pem(cert: &CertificateDer<'_>) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}
