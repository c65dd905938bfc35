//! Webhook signatures: HMAC-SHA256 over the exact body bytes, sent as
//! `X-Botcreds-Signature-256: sha256=<hex>` (the same scheme as GitHub's webhooks), so receivers
//! can reuse their GitHub verification code.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "x-botcreds-signature-256";
/// The header naming the event (`approval_requested`, ...).
pub const EVENT_HEADER: &str = "x-botcreds-event";
/// The header carrying the delivery id (`evt_...`), the same on every retry.
pub const DELIVERY_HEADER: &str = "x-botcreds-delivery";

type HmacSha256 = Hmac<Sha256>;

/// The header value for `body` signed with `secret`: `sha256=` and 64 lower-case hex digits.
pub fn signature_header(secret: &[u8], body: &[u8]) -> String {
    format!("sha256={}", hex::encode(hmac_sha256(secret, body)))
}

/// HMAC-SHA256 of `message` under `key`.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail here.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// Whether `header` is the right signature of `body` under `secret`; compared in constant
/// time. What a receiver does; the broker uses it in tests and documents it.
pub fn verify(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex_mac) = header.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(given) = hex::decode(hex_mac) else {
        return false;
    };
    let mut mac = match HmacSha256::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => return false,
    };
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4231_test_case_2() {
        // RFC 4231 §4.3: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn github_documented_vector() {
        // GitHub's "Validating webhook deliveries" example: secret "It's a Secret to Everybody",
        // payload "Hello, World!".
        assert_eq!(
            signature_header(b"It's a Secret to Everybody", b"Hello, World!"),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }

    #[test]
    fn verify_accepts_only_the_exact_body_and_secret() {
        let header = signature_header(b"s3cret", b"{\"a\":1}");
        assert!(verify(b"s3cret", b"{\"a\":1}", &header));
        assert!(!verify(b"s3cret", b"{\"a\": 1}", &header));
        assert!(!verify(b"other", b"{\"a\":1}", &header));
        assert!(!verify(
            b"s3cret",
            b"{\"a\":1}",
            &header.replace("sha256=", "sha1=")
        ));
        assert!(!verify(b"s3cret", b"{\"a\":1}", "sha256=zz"));
        assert!(!verify(
            b"s3cret",
            b"{\"a\":1}",
            &header[..header.len() - 2]
        ));
    }
}
