//! mTLS enrollment: join tokens, certificate signing requests and the certificates the broker
//! issues from them (`/v1/enroll`, `/v1/enroll/renew`, `/v1/enroll/tokens`, `/v1/certs`).

use serde::{Deserialize, Serialize};

/// The SAN URI prefix naming the bot a client certificate belongs to: `botcreds://bot/NAME`.
pub const BOT_URI_PREFIX: &str = "botcreds://bot/";
/// The SAN URI an admin client certificate carries in addition to its bot URI.
pub const ADMIN_ROLE_URI: &str = "botcreds://role/admin";

/// `POST /v1/enroll`: a new host asks for its first certificate.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The bot the certificate is for. Optional: a join token names its bot, and a tailnet
    /// caller is the bot the policy maps it to; when given, it must agree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot: Option<String>,
    /// The one-time join token from `botcreds enroll create`. Optional only for a tailnet
    /// caller that the policy maps to `bot`, on a broker with `[tls] tailnet_enrollment`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// PKCS#10 certificate signing request, PEM. Only its public key is used.
    pub csr: String,
}

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("bot", &self.bot)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// `POST /v1/enroll/renew` over mTLS: a new certificate for the bot of the current one.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// PKCS#10 certificate signing request, PEM.
    pub csr: String,
}

/// The answer to enrollment and renewal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolledCertificate {
    pub bot: String,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// Whether the certificate carries the admin role.
    #[serde(default)]
    pub admin: bool,
    /// The client certificate, PEM.
    pub certificate: String,
    /// Every CA certificate the broker trusts (the active one first), PEM; the agent
    /// verifies the broker's server certificate against it.
    pub ca_bundle: String,
    /// RFC 3339 start and end of the certificate's validity.
    pub not_before: String,
    pub expires_at: String,
}

/// `POST /v1/enroll/tokens` (admin): create a one-time join token.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenRequest {
    pub bot: String,
    /// How long the token may be used, like `1h` (default 1h, at most `[tls] max_join_token_ttl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// Whether certificates enrolled with the token carry the admin role.
    #[serde(default)]
    pub admin: bool,
}

/// A created join token: shown once, stored by the broker only as a hash.
#[derive(Clone, Serialize, Deserialize)]
pub struct JoinToken {
    pub token: String,
    pub bot: String,
    #[serde(default)]
    pub admin: bool,
    pub expires_at: String,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("token", &"<redacted>")
            .field("bot", &self.bot)
            .field("admin", &self.admin)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// One issued client certificate, as `GET /v1/certs` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertSummary {
    pub serial: String,
    pub bot: String,
    #[serde(default)]
    pub admin: bool,
    pub issued_at: String,
    pub expires_at: String,
    /// `token`, `tailnet` or `renewal`.
    pub issued_via: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertList {
    pub certificates: Vec<CertSummary>,
}

/// `POST /v1/certs/revoke` (admin): exactly one of `serial` or `bot`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeCertRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedCerts {
    /// Serials newly revoked by this call.
    pub revoked: Vec<String>,
}
