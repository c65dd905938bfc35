//! Reading a client certificate: the bot and role it names (SAN URIs), its serial and its
//! validity. Used on every verified TLS connection and on every certificate the broker issues.

use ::time::OffsetDateTime;
use botcreds_proto::enroll::{ADMIN_ROLE_URI, BOT_URI_PREFIX};
use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// What a client certificate says, parsed once per connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCert {
    pub bot: String,
    pub admin: bool,
    /// Serial number, lower-case hex.
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// The verified peer certificate of a TLS connection, attached to each of its requests.
#[derive(Clone, Debug)]
pub struct VerifiedPeer {
    pub cert: ClientCert,
}

/// Parse a client certificate; exactly one bot URI is required.
pub fn parse_client_cert(der: &CertificateDer<'_>) -> Result<ClientCert, String> {
    let (_, cert) = X509Certificate::from_der(der.as_ref())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut bot: Option<String> = None;
    let mut admin = false;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            let GeneralName::URI(uri) = name else {
                continue;
            };
            if let Some(name) = uri.strip_prefix(BOT_URI_PREFIX) {
                if bot.is_some() {
                    return Err("the certificate names more than one bot".into());
                }
                bot = Some(name.to_string());
            } else if *uri == ADMIN_ROLE_URI {
                admin = true;
            }
        }
    }
    let bot = bot.ok_or_else(|| format!("the certificate names no bot ({BOT_URI_PREFIX}NAME)"))?;
    let time = |t: x509_parser::time::ASN1Time| {
        OffsetDateTime::from_unix_timestamp(t.timestamp())
            .map_err(|e| format!("validity out of range: {e}"))
    };
    Ok(ClientCert {
        bot,
        admin,
        serial: hex::encode(cert.raw_serial()),
        not_before: time(cert.validity().not_before)?,
        not_after: time(cert.validity().not_after)?,
    })
}
