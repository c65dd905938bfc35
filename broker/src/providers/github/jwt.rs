//! The GitHub App JWT: RS256, signed with the app's private key, reused while it has life left.

use std::sync::Mutex;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use time::OffsetDateTime;

use super::errors::GithubError;
use crate::secret::Secret;

/// Back-dating of `iat`: GitHub's docs recommend 60 s to absorb clock drift.
const BACKDATE_SECS: i64 = 60;
/// `exp` relative to now. With `iat = now - 60` the token lives 600 s, GitHub's maximum,
/// and stays within the limit even if our clock runs slightly ahead.
const LIFETIME_AHEAD_SECS: i64 = 540;
/// A cached JWT is replaced once less than this much of its life remains, so a request
/// never reaches GitHub with a token that expires in flight.
const REFRESH_MARGIN_SECS: i64 = 60;

#[derive(Serialize)]
struct Claims {
    iat: i64,
    exp: i64,
    /// The numeric app id, serialized as a JSON number (the form every GHES version accepts).
    iss: u64,
}

struct CachedJwt {
    jwt: Secret,
    expires_at: OffsetDateTime,
}

/// Signs app JWTs for one GitHub App.
pub(crate) struct AppJwt {
    app_id: u64,
    key: EncodingKey,
    cached: Mutex<Option<CachedJwt>>,
}

impl AppJwt {
    /// Parse the private key (PKCS#1 or PKCS#8 PEM) and prove it can sign, so a bad key
    /// fails at start-up with a message that names the problem but never the key.
    pub(crate) fn new(app_id: u64, private_key_pem: &Secret) -> Result<AppJwt, GithubError> {
        if app_id == 0 {
            return Err(config_error(
                "app_id must be the GitHub App's numeric id, not 0",
            ));
        }
        let pem = private_key_pem.expose().trim();
        if pem.is_empty() {
            return Err(config_error("the GitHub App private key is empty"));
        }
        if !pem.contains("-----BEGIN ") {
            return Err(config_error(
                "the GitHub App private key is not a PEM file (no -----BEGIN line)",
            ));
        }
        if pem.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
            return Err(config_error(
                "the GitHub App private key is encrypted; use the unencrypted PEM GitHub issued",
            ));
        }
        if pem.contains("PUBLIC KEY-----") && !pem.contains("PRIVATE KEY-----") {
            return Err(config_error(
                "the GitHub App key file holds a public key; the broker needs the private key",
            ));
        }
        if pem.contains("-----BEGIN EC PRIVATE KEY-----")
            || pem.contains("-----BEGIN OPENSSH PRIVATE KEY-----")
        {
            return Err(config_error(
                "the GitHub App private key is not an RSA key (GitHub Apps sign with RS256)",
            ));
        }
        let key = EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| {
            config_error(&format!("the GitHub App private key {}", key_problem(&e)))
        })?;
        let jwt = AppJwt {
            app_id,
            key,
            cached: Mutex::new(None),
        };
        // Parsing only checks the PEM framing; a signature proves the RSA key itself.
        jwt.sign(OffsetDateTime::now_utc()).map_err(|_| {
            config_error("the GitHub App private key cannot sign (not a usable RSA key)")
        })?;
        Ok(jwt)
    }

    /// A JWT valid at `now` with at least [`REFRESH_MARGIN_SECS`] of life left: the cached
    /// one when it qualifies, else a freshly signed one.
    pub(crate) fn bearer(&self, now: OffsetDateTime) -> Result<Secret, GithubError> {
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cached.as_ref() {
            let remaining = (c.expires_at - now).whole_seconds();
            // A clock that jumped backwards could leave a JWT "issued in the future"; re-sign then.
            let issued_at =
                c.expires_at - time::Duration::seconds(BACKDATE_SECS + LIFETIME_AHEAD_SECS);
            if remaining >= REFRESH_MARGIN_SECS && issued_at <= now {
                return Ok(c.jwt.clone());
            }
        }
        let (jwt, expires_at) = self.sign(now)?;
        *cached = Some(CachedJwt {
            jwt: jwt.clone(),
            expires_at,
        });
        Ok(jwt)
    }

    fn sign(&self, now: OffsetDateTime) -> Result<(Secret, OffsetDateTime), GithubError> {
        let now_s = now.unix_timestamp();
        let claims = Claims {
            iat: now_s - BACKDATE_SECS,
            exp: now_s + LIFETIME_AHEAD_SECS,
            iss: self.app_id,
        };
        let header = Header::new(Algorithm::RS256);
        let jwt =
            jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| GithubError::Config {
                message: format!("signing the app JWT failed: {}", key_problem(&e)),
            })?;
        Ok((
            Secret::new(jwt),
            now + time::Duration::seconds(LIFETIME_AHEAD_SECS),
        ))
    }
}

impl std::fmt::Debug for AppJwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppJwt")
            .field("app_id", &self.app_id)
            .finish_non_exhaustive()
    }
}

fn config_error(message: &str) -> GithubError {
    GithubError::Config {
        message: message.to_string(),
    }
}

/// A fixed description of a key error. The library's own texts are not passed on: some
/// (base64 errors) quote bytes of the input.
fn key_problem(e: &jsonwebtoken::errors::Error) -> &'static str {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::InvalidKeyFormat => "is not an RSA private key in PKCS#1 or PKCS#8 PEM form",
        ErrorKind::InvalidRsaKey(_) | ErrorKind::RsaFailedSigning => {
            "is not a usable RSA private key"
        }
        ErrorKind::Base64(_) => "is not valid PEM (bad base64 between the BEGIN and END lines)",
        ErrorKind::InvalidAlgorithm | ErrorKind::UnsupportedAlgorithm => {
            "does not fit RS256 (GitHub Apps need an RSA key)"
        }
        _ => "could not be read as an RSA private key in PEM form",
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{DecodingKey, Validation};

    use super::*;

    const PKCS1: &str = include_str!("../../../../tests/fixtures/github/test-app-key.pem");
    const PKCS8: &str = include_str!("../../../../tests/fixtures/github/test-app-key.pkcs8.pem");
    const PUBLIC: &str = include_str!("../../../../tests/fixtures/github/test-app-key.pub.pem");

    fn verify(jwt: &Secret) -> serde_json::Value {
        let key = DecodingKey::from_rsa_pem(PUBLIC.as_bytes()).unwrap();
        let mut v = Validation::new(Algorithm::RS256);
        v.required_spec_claims = ["exp".to_string(), "iat".to_string()].into();
        jsonwebtoken::decode::<serde_json::Value>(jwt.expose(), &key, &v)
            .unwrap()
            .claims
    }

    #[test]
    fn both_key_forms_sign_verifiable_jwts() {
        for pem in [PKCS1, PKCS8] {
            let signer = AppJwt::new(912345, &Secret::new(pem)).unwrap();
            let now = OffsetDateTime::now_utc();
            let jwt = signer.bearer(now).unwrap();
            let claims = verify(&jwt);
            let t = now.unix_timestamp();
            assert_eq!(claims["iat"], serde_json::json!(t - 60));
            assert_eq!(claims["exp"], serde_json::json!(t + 540));
            assert_eq!(
                claims["iss"],
                serde_json::json!(912345u64),
                "iss is a JSON number"
            );
            let header = jsonwebtoken::decode_header(jwt.expose()).unwrap();
            assert_eq!(header.alg, Algorithm::RS256);
            assert_eq!(header.typ.as_deref(), Some("JWT"));
        }
    }

    #[test]
    fn reused_until_less_than_a_minute_remains() {
        let signer = AppJwt::new(7, &Secret::new(PKCS1)).unwrap();
        let t0 = OffsetDateTime::now_utc();
        let first = signer.bearer(t0).unwrap();
        let later = signer.bearer(t0 + time::Duration::seconds(480)).unwrap();
        assert_eq!(first.expose(), later.expose(), "60 s left: still reused");
        let fresh = signer.bearer(t0 + time::Duration::seconds(481)).unwrap();
        assert_ne!(first.expose(), fresh.expose(), "59 s left: re-signed");
        let back = signer.bearer(t0 - time::Duration::seconds(3600)).unwrap();
        assert_ne!(
            fresh.expose(),
            back.expose(),
            "clock went backwards: re-signed"
        );
    }

    #[test]
    fn bad_keys_are_named_never_quoted() {
        let body: String = PKCS1.lines().nth(1).unwrap().to_string();
        let cases = [
            ("", "empty"),
            ("just some text", "not a PEM file"),
            (PUBLIC, "holds a public key"),
            (
                "-----BEGIN ENCRYPTED PRIVATE KEY-----\nabc\n-----END ENCRYPTED PRIVATE KEY-----",
                "encrypted",
            ),
            (
                "-----BEGIN EC PRIVATE KEY-----\nabc\n-----END EC PRIVATE KEY-----",
                "not an RSA key",
            ),
            (
                &format!(
                    "-----BEGIN RSA PRIVATE KEY-----\n{body}!!\n-----END RSA PRIVATE KEY-----"
                ),
                "private key",
            ),
            (
                &format!("-----BEGIN RSA PRIVATE KEY-----\n{body}\n-----END RSA PRIVATE KEY-----"),
                "private key",
            ),
        ];
        for (pem, want) in cases {
            let err = AppJwt::new(1, &Secret::new(pem)).unwrap_err();
            let text = format!("{err} {err:?}");
            assert!(text.contains(want), "{want:?} not in {text}");
            assert!(!text.contains(&body[..20]), "key material in {text}");
            assert_eq!(err.code(), botcreds_proto::ErrorCode::Internal);
        }
        assert!(AppJwt::new(0, &Secret::new(PKCS1)).is_err());
    }

    #[test]
    fn debug_hides_the_key() {
        let signer = AppJwt::new(7, &Secret::new(PKCS8)).unwrap();
        let jwt = signer.bearer(OffsetDateTime::now_utc()).unwrap();
        let dbg = format!("{signer:?}");
        assert!(!dbg.contains(jwt.expose()));
        assert!(!dbg.contains(&PKCS8.lines().nth(1).unwrap()[..20]));
    }
}
