//! Offline admin commands: policy checking and explaining, API-key generation, store checks.

pub mod admin;
pub mod certs;
pub mod client;
pub mod keys;
pub mod policy;
pub mod store;

use crate::identity::api_key::generate_key;
use crate::secret::sha256_hex;

/// A new API key and the config snippet that admits it (the key itself is never stored).
pub fn new_api_key(bot: &str) -> String {
    let key = generate_key();
    format!(
        "API key for {bot} (give it to the bot; it is shown only now):\n  {key}\n\n\
         Add to broker.toml:\n[[api_keys]]\nbot = \"{bot}\"\nkey_sha256 = \"{}\"\n",
        sha256_hex(key.as_bytes())
    )
}
