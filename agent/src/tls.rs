//! The agent's mTLS identity: a key pair made on this host (the private key never leaves it),
//! the broker-issued client certificate and the broker's CA bundle, kept in the state dir.
//!
//! `client.pem` (mode 0600) holds the private key and the certificate together, so that a
//! renewal replaces both in one rename; `ca.pem` holds the CA bundle the broker's server
//! certificate is verified against. agent.toml's `[tls]` may add roots for a server
//! certificate from elsewhere (tailscaled's Let's Encrypt pair): a PEM file and/or the
//! system's roots ([`ServerTrust`]).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use botcreds_proto::enroll::{ADMIN_ROLE_URI, BOT_URI_PREFIX};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::secret::Secret;

/// Default `state_dir` for `auth = "mtls"`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/botcreds";
const CLIENT_FILE: &str = "client.pem";
const CA_FILE: &str = "ca.pem";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

fn file_err(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// What the client certificate says: for status, logs and the renewal schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub bot: String,
    pub admin: bool,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl CertInfo {
    /// When to renew: two-thirds into the certificate's life.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life * 2 / 3
    }

    pub fn describe(&self) -> String {
        format!(
            "mtls (bot {}{}, certificate {}, expires {}, renews {})",
            crate::text::clean(&self.bot),
            if self.admin { ", admin" } else { "" },
            self.serial,
            rfc3339(self.not_after),
            rfc3339(self.renew_at())
        )
    }
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// `[tls]` of agent.toml as configured: roots for the broker's server certificate besides
/// the enrolled CA bundle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerTrustConfig {
    /// `server_ca_file`: PEM certificates the server certificate may chain to.
    pub ca_file: Option<PathBuf>,
    /// `server_roots = "system"`: the platform's roots too.
    pub system_roots: bool,
}

/// The extra roots, read once at startup and kept across certificate renewals.
#[derive(Clone, Default)]
pub struct ServerTrust {
    extra: Vec<reqwest::Certificate>,
    system_roots: bool,
}

impl std::fmt::Debug for ServerTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTrust")
            .field("extra", &self.extra.len())
            .field("system_roots", &self.system_roots)
            .finish()
    }
}

impl ServerTrust {
    /// Read `server_ca_file` (it must hold at least one certificate).
    pub fn load(config: &ServerTrustConfig) -> Result<ServerTrust, TlsError> {
        let extra = match &config.ca_file {
            None => Vec::new(),
            Some(path) => {
                let text = std::fs::read(path)
                    .map_err(|e| file_err(path, format!("[tls] server_ca_file: {e}")))?;
                let certs = reqwest::Certificate::from_pem_bundle(&text).map_err(|e| {
                    file_err(
                        path,
                        format!("[tls] server_ca_file: not PEM certificates: {e}"),
                    )
                })?;
                if certs.is_empty() {
                    return Err(file_err(
                        path,
                        "[tls] server_ca_file holds no PEM certificate",
                    ));
                }
                certs
            }
        };
        Ok(ServerTrust {
            extra,
            system_roots: config.system_roots,
        })
    }
}

/// The identity loaded from the state dir, ready for a reqwest client.
#[derive(Clone)]
pub struct MtlsIdentity {
    pub state_dir: PathBuf,
    pub info: CertInfo,
    identity: reqwest::Identity,
    roots: Vec<reqwest::Certificate>,
    /// SHA-256 (hex) of `ca.pem`: the broker this identity belongs to.
    ca_sha256: String,
    server_trust: ServerTrust,
}

impl std::fmt::Debug for MtlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MtlsIdentity")
            .field("state_dir", &self.state_dir)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl MtlsIdentity {
    /// Read `client.pem` (must be 0600) and `ca.pem` from `state_dir`.
    pub fn load(state_dir: &Path) -> Result<MtlsIdentity, TlsError> {
        let client_path = state_dir.join(CLIENT_FILE);
        let meta = std::fs::metadata(&client_path).map_err(|e| {
            file_err(
                &client_path,
                format!("{e} (enroll first: botcreds-agent enroll --broker URL --token T)"),
            )
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(file_err(
                &client_path,
                format!(
                    "has mode {:o}; refusing a private key readable by group or others (chmod 600)",
                    meta.permissions().mode() & 0o777
                ),
            ));
        }
        let client = Secret::new(
            std::fs::read_to_string(&client_path).map_err(|e| file_err(&client_path, e))?,
        );
        let ca_path = state_dir.join(CA_FILE);
        let ca = std::fs::read(&ca_path).map_err(|e| file_err(&ca_path, e))?;
        MtlsIdentity::from_pems(state_dir, &client, &ca)
    }

    fn from_pems(state_dir: &Path, client: &Secret, ca: &[u8]) -> Result<MtlsIdentity, TlsError> {
        let client_path = state_dir.join(CLIENT_FILE);
        let cert_pem = first_certificate(client.expose())
            .ok_or_else(|| file_err(&client_path, "holds no certificate"))?;
        let info = cert_info(&cert_pem).map_err(|m| file_err(&client_path, m))?;
        let identity = reqwest::Identity::from_pem(client.expose().as_bytes())
            .map_err(|e| file_err(&client_path, format!("not a key and certificate: {e}")))?;
        let roots = reqwest::Certificate::from_pem_bundle(ca)
            .map_err(|e| file_err(&state_dir.join(CA_FILE), e))?;
        if roots.is_empty() {
            return Err(file_err(
                &state_dir.join(CA_FILE),
                "holds no CA certificate",
            ));
        }
        Ok(MtlsIdentity {
            state_dir: state_dir.to_path_buf(),
            info,
            identity,
            roots,
            ca_sha256: {
                use sha2::{Digest, Sha256};
                hex::encode(Sha256::digest(ca))
            },
            server_trust: ServerTrust::default(),
        })
    }

    /// Also trust these roots for the broker's server certificate.
    pub fn with_server_trust(mut self, trust: ServerTrust) -> MtlsIdentity {
        self.server_trust = trust;
        self
    }

    /// SHA-256 (hex) of the broker's CA bundle this identity was enrolled with.
    pub fn ca_fingerprint(&self) -> &str {
        &self.ca_sha256
    }

    /// The extra roots this identity's clients trust.
    pub fn server_trust(&self) -> &ServerTrust {
        &self.server_trust
    }

    /// A reqwest client presenting this certificate and trusting the broker's CAs, plus the
    /// configured extra roots (and the system's with `server_roots = "system"`).
    pub fn client(
        &self,
        builder: reqwest::ClientBuilder,
    ) -> Result<reqwest::Client, reqwest::Error> {
        let roots = self
            .roots
            .iter()
            .chain(&self.server_trust.extra)
            .cloned()
            .collect::<Vec<_>>();
        let builder = builder.identity(self.identity.clone());
        if self.server_trust.system_roots {
            builder.tls_certs_merge(roots).build()
        } else {
            builder.tls_certs_only(roots).build()
        }
    }
}

/// A fresh key pair and a CSR naming `bot` (when known; the join token names it otherwise).
pub fn new_key_and_csr(bot: Option<&str>) -> Result<(Secret, String), TlsError> {
    let key = KeyPair::generate().map_err(|e| TlsError::Invalid(format!("key generation: {e}")))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    if let Some(bot) = bot {
        dn.push(DnType::CommonName, bot);
        let uri = format!("{BOT_URI_PREFIX}{bot}");
        params.subject_alt_names.push(SanType::URI(
            uri.as_str()
                .try_into()
                .map_err(|e| TlsError::Invalid(format!("bot name {bot:?}: {e}")))?,
        ));
    }
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| TlsError::Invalid(format!("CSR: {e}")))?;
    Ok((Secret::new(key.serialize_pem()), csr))
}

/// How far the broker's clock may be ahead of ours for a certificate that starts "now".
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Store a new key and certificate (one file, 0600, replaced atomically) and the CA bundle.
/// The certificate must be for `key`, for `bot` (when the request named one: the broker's
/// answer is not trusted to be for what was asked), name a valid bot, and be valid now; or
/// nothing is written.
pub fn store(
    state_dir: &Path,
    key_pem: &Secret,
    cert_pem: &str,
    ca_pem: &str,
    bot: Option<&str>,
) -> Result<MtlsIdentity, TlsError> {
    let client = Secret::new(format!("{}{}", key_pem.expose(), ensure_newline(cert_pem)));
    // Check everything parses before replacing a working identity.
    let loaded = MtlsIdentity::from_pems(state_dir, &client, ca_pem.as_bytes())?;
    let info = &loaded.info;
    if !valid_bot_name(&info.bot) {
        return Err(TlsError::Invalid(format!(
            "the broker's certificate names {:?}, not a bot name",
            info.bot
        )));
    }
    if let Some(bot) = bot
        && info.bot != bot
    {
        return Err(TlsError::Invalid(format!(
            "the broker's certificate is for bot {:?}, not {bot:?} as asked",
            info.bot
        )));
    }
    let now = SystemTime::now();
    if info.not_after <= now {
        return Err(TlsError::Invalid(format!(
            "the broker's certificate expired at {}",
            rfc3339(info.not_after)
        )));
    }
    if info.not_before > now + CLOCK_SKEW {
        return Err(TlsError::Invalid(format!(
            "the broker's certificate is not valid before {} (check the clocks)",
            rfc3339(info.not_before)
        )));
    }
    let key = KeyPair::from_pem(key_pem.expose())
        .map_err(|e| TlsError::Invalid(format!("the new key: {e}")))?;
    if cert_public_key(cert_pem)? != key.public_key_raw() {
        return Err(TlsError::Invalid(
            "the broker's certificate is not for the key this host made".into(),
        ));
    }
    std::fs::create_dir_all(state_dir).map_err(|e| file_err(state_dir, e))?;
    write_atomic(&state_dir.join(CA_FILE), ca_pem.as_bytes(), 0o644)?;
    write_atomic(
        &state_dir.join(CLIENT_FILE),
        client.expose().as_bytes(),
        0o600,
    )?;
    Ok(loaded)
}

/// The broker's rule for bot names (letters, digits, `.`, `_`, `-`; at most 64): a name
/// outside it is not one the broker issues, and is shown in logs and on terminals.
fn valid_bot_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn ensure_newline(s: &str) -> String {
    if s.ends_with('\n') {
        s.to_string()
    } else {
        format!("{s}\n")
    }
}

fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| file_err(&tmp, e))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(|e| file_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| file_err(path, e))
}

fn first_certificate(pem: &str) -> Option<String> {
    let start = pem.find("-----BEGIN CERTIFICATE-----")?;
    let end_marker = "-----END CERTIFICATE-----";
    let end = pem[start..].find(end_marker)? + start + end_marker.len();
    Some(format!("{}\n", &pem[start..end]))
}

fn cert_der(pem: &str) -> Result<Vec<u8>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.as_ref().to_vec())
        .map_err(|e| format!("certificate PEM: {e}"))
}

fn cert_public_key(pem: &str) -> Result<Vec<u8>, TlsError> {
    let der = cert_der(pem).map_err(TlsError::Invalid)?;
    let (_, cert) = X509Certificate::from_der(&der)
        .map_err(|e| TlsError::Invalid(format!("certificate: {e}")))?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

/// Parse a PEM client certificate.
pub fn cert_info(pem: &str) -> Result<CertInfo, String> {
    let der = cert_der(pem)?;
    let (_, cert) =
        X509Certificate::from_der(&der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut bot = None;
    let mut admin = false;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if let Some(b) = uri.strip_prefix(BOT_URI_PREFIX) {
                    bot = Some(b.to_string());
                } else if *uri == ADMIN_ROLE_URI {
                    admin = true;
                }
            }
        }
    }
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = u64::try_from(t.timestamp()).map_err(|_| "validity before 1970".to_string())?;
        Ok::<_, String>(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
    };
    Ok(CertInfo {
        bot: bot.ok_or("the certificate names no bot")?,
        admin,
        serial: hex::encode(cert.raw_serial()),
        not_before: at(cert.validity().not_before)?,
        not_after: at(cert.validity().not_after)?,
    })
}

/// One line for `botcreds-agent status`: the certificate in `state_dir`, read from disk (the
/// renewal task replaces it there).
pub fn status_line(state_dir: &Path) -> String {
    let path = state_dir.join(CLIENT_FILE);
    match std::fs::read_to_string(&path) {
        Err(e) => format!("mTLS certificate: cannot read {}: {e}", path.display()),
        Ok(text) => {
            let text = Secret::new(text);
            match first_certificate(text.expose()).map(|c| cert_info(&c)) {
                Some(Ok(info)) => {
                    let left = info
                        .not_after
                        .duration_since(SystemTime::now())
                        .map(|d| match d.as_secs() {
                            s if s >= 2 * 3600 => format!("{}h left", s / 3600),
                            s if s >= 120 => format!("{}m left", s / 60),
                            s => format!("{s}s left"),
                        })
                        .unwrap_or_else(|_| "EXPIRED: enroll again".into());
                    format!("mTLS certificate: {} ({left})", info.describe())
                }
                Some(Err(m)) => format!("mTLS certificate: {}: {m}", path.display()),
                None => format!("mTLS certificate: {} holds no certificate", path.display()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate for `key` from a throwaway CA, as the broker would issue it.
    fn issue(key_pem: &Secret, bot: &str, hours: i64) -> (String, String) {
        issue_window(
            key_pem,
            bot,
            time::Duration::ZERO,
            time::Duration::hours(hours),
        )
    }

    /// Like [`issue`], valid from `now + from` to `now + until`.
    fn issue_window(
        key_pem: &Secret,
        bot: &str,
        from: time::Duration,
        until: time::Duration,
    ) -> (String, String) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = KeyPair::from_pem(key_pem.expose()).unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(
            format!("{BOT_URI_PREFIX}{bot}")
                .as_str()
                .try_into()
                .unwrap(),
        )];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now + from;
        p.not_after = now + until;
        (p.signed_by(&key, &issuer).unwrap().pem(), ca_cert.pem())
    }

    #[test]
    fn stores_privately_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let (key, csr) = new_key_and_csr(Some("ci")).unwrap();
        assert!(csr.contains("CERTIFICATE REQUEST"));
        let (cert, ca) = issue(&key, "ci", 24);
        let stored = store(dir.path(), &key, &cert, &ca, Some("ci")).unwrap();
        assert_eq!(stored.info.bot, "ci");
        let mode = std::fs::metadata(dir.path().join(CLIENT_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let loaded = MtlsIdentity::load(dir.path()).unwrap();
        assert_eq!(loaded.info, stored.info);
        // Renewal at two-thirds: 16 h into a 24 h certificate.
        let life = loaded
            .info
            .renew_at()
            .duration_since(loaded.info.not_before)
            .unwrap();
        assert_eq!(life.as_secs(), 16 * 3600);
        assert!(status_line(dir.path()).contains("bot ci"));

        std::fs::set_permissions(
            dir.path().join(CLIENT_FILE),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let err = MtlsIdentity::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn server_trust_reads_its_pem_file_or_says_which_key_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            ServerTrust::load(&ServerTrustConfig::default())
                .unwrap()
                .extra
                .is_empty()
        );
        let (key, _) = new_key_and_csr(None).unwrap();
        let (_, ca) = issue(&key, "ci", 1);
        let good = dir.path().join("roots.pem");
        std::fs::write(&good, &ca).unwrap();
        let trust = ServerTrust::load(&ServerTrustConfig {
            ca_file: Some(good),
            system_roots: true,
        })
        .unwrap();
        assert_eq!(trust.extra.len(), 1);
        assert!(trust.system_roots);
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "nothing here\n").unwrap();
        for (path, want) in [
            (dir.path().join("missing.pem"), "server_ca_file"),
            (empty, "holds no PEM certificate"),
        ] {
            let err = ServerTrust::load(&ServerTrustConfig {
                ca_file: Some(path),
                system_roots: false,
            })
            .unwrap_err()
            .to_string();
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
    }

    /// Enrollment asked for one bot: a certificate for another bot, an expired one or one not
    /// valid yet is refused and nothing is written (the old identity stays).
    #[test]
    fn enrollment_accepts_only_a_current_certificate_for_the_bot_asked_for() {
        let h = time::Duration::hours;
        type Case<'a> = (
            &'a str,
            Option<&'a str>,
            time::Duration,
            time::Duration,
            Option<&'a str>,
        );
        let cases: [Case<'_>; 6] = [
            ("build-host", Some("build-host"), h(0), h(24), None),
            ("build-host", None, h(0), h(24), None),
            (
                "other-bot",
                Some("build-host"),
                h(0),
                h(24),
                Some("for bot \"other-bot\", not \"build-host\""),
            ),
            (
                "build-host",
                Some("build-host"),
                h(-48),
                h(-24),
                Some("expired"),
            ),
            (
                "build-host",
                Some("build-host"),
                h(24),
                h(48),
                Some("not valid before"),
            ),
            (
                "evil\u{1b}[2Kbot",
                None,
                h(0),
                h(24),
                Some("not a bot name"),
            ),
        ];
        for (issued_for, asked, from, until, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            let (key, _) = new_key_and_csr(asked).unwrap();
            let (cert, ca) = issue_window(&key, issued_for, from, until);
            let got = store(dir.path(), &key, &cert, &ca, asked);
            match want {
                None => assert_eq!(got.unwrap().info.bot, issued_for),
                Some(want) => {
                    let err = got
                        .err()
                        .unwrap_or_else(|| panic!("{issued_for} {from}..{until} accepted"));
                    let err = err.to_string();
                    assert!(err.contains(want), "{issued_for}: {err}");
                    assert!(crate::text::is_clean(&err), "{err:?}");
                    assert!(
                        !dir.path().join(CLIENT_FILE).exists(),
                        "{issued_for}: written"
                    );
                }
            }
        }
    }

    #[test]
    fn a_certificate_for_another_key_is_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let (key, _) = new_key_and_csr(None).unwrap();
        let (other, _) = new_key_and_csr(None).unwrap();
        let (cert, ca) = issue(&other, "ci", 1);
        let err = store(dir.path(), &key, &cert, &ca, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not for the key"), "{err}");
        assert!(!dir.path().join(CLIENT_FILE).exists());
    }
}
