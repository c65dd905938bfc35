//! API-key callers: `Authorization: Bearer <key>`, checked against the SHA-256 of every
//! configured key in constant time. Keys are never stored, only their hashes.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::config::ApiKeyConfig;

/// The configured API keys (hashes) and the bots they name.
#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Vec<ApiKeyConfig>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys")
            .field(
                "bots",
                &self.keys.iter().map(|k| &k.bot).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl ApiKeys {
    pub fn new(keys: Vec<ApiKeyConfig>) -> ApiKeys {
        ApiKeys { keys }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The bot a presented key belongs to. Every configured hash is compared, in constant
    /// time, whatever matches earlier, so timing tells nothing about which key was close.
    pub fn verify(&self, presented: &str) -> Option<&str> {
        let digest: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
        let mut found: Option<&str> = None;
        for k in &self.keys {
            let hit: bool = k.key_sha256.ct_eq(&digest).into();
            if hit && found.is_none() {
                found = Some(&k.bot);
            }
        }
        found
    }
}

/// A fresh random API key: `bck_` and 32 base62 characters (~190 bits).
pub fn generate_key() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let body: String = (0..32)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("bck_{body}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::sha256_hex;

    fn keys(pairs: &[(&str, &str)]) -> ApiKeys {
        ApiKeys::new(
            pairs
                .iter()
                .map(|(bot, key)| {
                    let mut h = [0u8; 32];
                    hex::decode_to_slice(sha256_hex(key.as_bytes()), &mut h).unwrap();
                    ApiKeyConfig {
                        bot: bot.to_string(),
                        key_sha256: h,
                    }
                })
                .collect(),
        )
    }

    #[test]
    fn verifies_by_hash() {
        let k = keys(&[("a", "bck_one"), ("b", "bck_two")]);
        assert_eq!(k.verify("bck_two"), Some("b"));
        assert_eq!(k.verify("bck_one"), Some("a"));
        assert_eq!(k.verify("bck_three"), None);
        assert_eq!(k.verify(""), None);
        assert!(!format!("{k:?}").contains("bck_"));
    }

    #[test]
    fn generated_keys_differ() {
        let (a, b) = (generate_key(), generate_key());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
    }
}
