//! Checking a certificate signing request: its self-signature must verify, it may name only
//! the bot it is for (CN and SAN), and only its public key is used for the certificate.

use rcgen::{CertificateSigningRequestParams, DnType, DnValue, IsCa, SanType};

use botcreds_proto::enroll::BOT_URI_PREFIX;

/// The largest CSR accepted (real ones are under 1 KiB).
const MAX_CSR_BYTES: usize = 16 * 1024;

/// The CSR's public key, after checking that the CSR is well-formed, self-signed by that key,
/// and names nothing but `bot`.
pub fn public_key_for(pem: &str, bot: &str) -> Result<rcgen::PublicKey, String> {
    if pem.len() > MAX_CSR_BYTES {
        return Err("the CSR is larger than 16 KiB".into());
    }
    let csr = CertificateSigningRequestParams::from_pem(pem).map_err(|e| match e {
        rcgen::Error::InvalidCertificationRequestSignature => {
            "the CSR's signature does not verify with its own public key".to_string()
        }
        rcgen::Error::UnsupportedExtension => {
            "the CSR asks for an extension the broker does not issue".to_string()
        }
        other => format!("the CSR cannot be read: {other}"),
    })?;
    let params = &csr.params;
    if let Some(cn) = params.distinguished_name.get(&DnType::CommonName) {
        let cn = match cn {
            DnValue::Utf8String(s) => s.as_str(),
            DnValue::PrintableString(s) => s.as_str(),
            _ => return Err("the CSR's common name is not a text string".into()),
        };
        if cn != bot {
            return Err(format!(
                "the CSR names {cn:?} in its common name, not the bot {bot:?}"
            ));
        }
    }
    let own = format!("{BOT_URI_PREFIX}{bot}");
    for san in &params.subject_alt_names {
        match san {
            SanType::URI(uri) if uri.as_str() == own => {}
            SanType::URI(uri) => {
                return Err(format!(
                    "the CSR names {:?}; it may only name {own:?} (roles are granted by the \
                     join token, not asked for)",
                    uri.as_str()
                ));
            }
            _ => {
                return Err(format!(
                    "the CSR asks for a subject alternative name other than {own:?}"
                ));
            }
        }
    }
    if !matches!(params.is_ca, IsCa::NoCa | IsCa::ExplicitNoCa) {
        return Err("the CSR asks to be a CA".into());
    }
    Ok(csr.public_key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, KeyPair};

    fn csr(cn: Option<&str>, uris: &[&str]) -> String {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        if let Some(cn) = cn {
            dn.push(DnType::CommonName, cn);
        }
        p.distinguished_name = dn;
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        p.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn accepts_only_its_own_bot() {
        assert!(public_key_for(&csr(Some("ci"), &["botcreds://bot/ci"]), "ci").is_ok());
        assert!(public_key_for(&csr(None, &[]), "ci").is_ok());
        let other_cn = public_key_for(&csr(Some("ops"), &[]), "ci").unwrap_err();
        assert!(other_cn.contains("\"ops\""), "{other_cn}");
        let other_uri = public_key_for(&csr(None, &["botcreds://bot/ops"]), "ci").unwrap_err();
        assert!(other_uri.contains("botcreds://bot/ops"), "{other_uri}");
        let admin = public_key_for(
            &csr(None, &["botcreds://bot/ci", "botcreds://role/admin"]),
            "ci",
        )
        .unwrap_err();
        assert!(admin.contains("role/admin"), "{admin}");
        assert!(public_key_for("garbage", "ci").is_err());
    }

    /// A CSR whose signature was made by another key than the one it carries.
    #[test]
    fn wrong_key_in_signature_is_refused() {
        use rustls::pki_types::CertificateSigningRequestDer;
        use rustls::pki_types::pem::PemObject;
        let good = csr(Some("ci"), &[]);
        let der = CertificateSigningRequestDer::from_pem_slice(good.as_bytes()).unwrap();
        let mut bytes = der.as_ref().to_vec();
        // Swap in another key's public point: the structure stays valid, the signature not.
        let other = KeyPair::generate().unwrap();
        let mine = x509_public_key(&bytes);
        let at = bytes
            .windows(mine.len())
            .position(|w| w == mine.as_slice())
            .unwrap();
        bytes[at..at + mine.len()].copy_from_slice(other.public_key_raw());
        let pem = pem_of("CERTIFICATE REQUEST", &bytes);
        let err = public_key_for(&pem, "ci").unwrap_err();
        assert!(err.contains("signature"), "{err}");
    }

    fn x509_public_key(csr_der: &[u8]) -> Vec<u8> {
        use x509_parser::prelude::FromDer;
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(csr_der)
                .unwrap();
        csr.certification_request_info
            .subject_pki
            .subject_public_key
            .data
            .to_vec()
    }

    fn pem_of(label: &str, der: &[u8]) -> String {
        use base64::Engine;
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            base64::engine::general_purpose::STANDARD.encode(der)
        )
    }
}
