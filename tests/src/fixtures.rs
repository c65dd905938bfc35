//! Paths and loaders for the reference fixtures under `tests/fixtures/`, the test GitHub App's
//! identity and keys, and a signer for app JWTs, shared by the doubles and the suites.
//!
//! The fixtures are copies of `../shared/reference/*-fixtures/` plus the test app key pair
//! (`github/test-app-key.pem` is PKCS#1, `test-app-key.pkcs8.pem` the same key as PKCS#8,
//! `test-app-key.pub.pem` its public half). Loaders panic with the file name when a fixture is
//! missing: that is a broken checkout, not a condition a test should handle.

use std::path::{Path, PathBuf};

/// The test app's numeric id (`app_id` in the fixtures).
pub const APP_ID: u64 = 912345;
/// The test app's client id (`client_id` in the fixtures; GitHub accepts it as the JWT `iss`).
pub const CLIENT_ID: &str = "Iv23liQ8xKc2mZ4nT7vB";
/// The test app's slug; its bot user is `acme-credbroker[bot]`.
pub const APP_SLUG: &str = "acme-credbroker";
/// The organisation the test app is installed on.
pub const ORG: &str = "acme-corp";
/// `acme-corp`'s account id.
pub const ORG_ACCOUNT_ID: u64 = 81234567;
/// The installation on `acme-corp` (repositories `web` and `infra`).
pub const INSTALLATION_ID: u64 = 51234567;
/// The suspended installation on the user `jdoe-dev` (second entry of `installations-list.json`).
pub const USER_INSTALLATION_ID: u64 = 51299881;
/// The user owning [`USER_INSTALLATION_ID`].
pub const USER: &str = "jdoe-dev";
/// `jdoe-dev`'s account id.
pub const USER_ACCOUNT_ID: u64 = 9876543;

/// The `tests/fixtures` directory of this checkout.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The path of a fixture, relative to `tests/fixtures` (e.g. `"github/installation.json"`).
pub fn path(relative: &str) -> PathBuf {
    dir().join(relative)
}

/// The bytes of a fixture, unchanged.
///
/// # Panics
/// If the file cannot be read.
pub fn bytes(relative: &str) -> Vec<u8> {
    let path = path(relative);
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {} unreadable: {e}", path.display()))
}

/// A fixture as UTF-8 text.
///
/// # Panics
/// If the file cannot be read or is not UTF-8.
pub fn string(relative: &str) -> String {
    String::from_utf8(bytes(relative))
        .unwrap_or_else(|e| panic!("fixture {relative} is not UTF-8: {e}"))
}

/// A fixture parsed as JSON.
///
/// # Panics
/// If the file cannot be read or is not JSON.
pub fn json(relative: &str) -> serde_json::Value {
    serde_json::from_slice(&bytes(relative))
        .unwrap_or_else(|e| panic!("fixture {relative} is not JSON: {e}"))
}

/// A file under `tests/fixtures/github/`, unchanged.
pub fn github(name: &str) -> Vec<u8> {
    bytes(&format!("github/{name}"))
}

/// A file under `tests/fixtures/tailscale/`, unchanged.
pub fn tailscale(name: &str) -> Vec<u8> {
    bytes(&format!("tailscale/{name}"))
}

/// The test app's RSA private key, PKCS#1 PEM (`BEGIN RSA PRIVATE KEY`, as GitHub hands it out).
pub fn app_private_key_pem() -> String {
    string("github/test-app-key.pem")
}

/// The same private key as PKCS#8 PEM (`BEGIN PRIVATE KEY`).
pub fn app_private_key_pkcs8_pem() -> String {
    string("github/test-app-key.pkcs8.pem")
}

/// The test app's public key (SubjectPublicKeyInfo PEM), what [`crate::fake_github`] verifies with.
pub fn app_public_key_pem() -> String {
    string("github/test-app-key.pub.pem")
}

/// The encoding of a private key file written by [`write_app_private_key`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyEncoding {
    /// `BEGIN RSA PRIVATE KEY`.
    Pkcs1,
    /// `BEGIN PRIVATE KEY`.
    Pkcs8,
}

/// Writes the test app's private key into `dir` as `app-key.pem` with mode `0600` (git does not keep
/// file modes, and the broker refuses keys other users can read) and returns its path.
///
/// # Panics
/// If the file cannot be written.
pub fn write_app_private_key(dir: &Path, encoding: KeyEncoding) -> PathBuf {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let pem = match encoding {
        KeyEncoding::Pkcs1 => app_private_key_pem(),
        KeyEncoding::Pkcs8 => app_private_key_pkcs8_pem(),
    };
    let path = dir.join("app-key.pem");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    file.write_all(pem.as_bytes())
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}

/// Now as Unix seconds.
pub fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Signs `claims` as an RS256 JWT with the test app's private key, exactly as a GitHub App client
/// would (header `{"alg":"RS256","typ":"JWT"}`). Pass any claims, valid or not, to probe the fake.
///
/// # Panics
/// If the key cannot be loaded or signing fails.
pub fn sign_app_jwt(claims: &serde_json::Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(app_private_key_pem().as_bytes())
        .unwrap_or_else(|e| panic!("test app key unusable: {e}"));
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        claims,
        &key,
    )
    .unwrap_or_else(|e| panic!("signing a JWT failed: {e}"))
}

/// A valid app JWT for [`APP_ID`] following GitHub's recipe: `iat = now - 60`, `exp = now + 540`,
/// `iss` the numeric app id.
pub fn valid_app_jwt() -> String {
    let now = now_unix();
    sign_app_jwt(&serde_json::json!({ "iat": now - 60, "exp": now + 540, "iss": APP_ID }))
}
