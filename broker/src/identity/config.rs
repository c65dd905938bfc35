//! The identity sections of broker.toml: `[tailscale]` (WhoIs), `[[api_keys]]` and `[admin]`.
//! Parsed strictly here so that `config.rs` only names the tables.

use std::path::{Path, PathBuf};
use std::time::Duration;

use botcreds_proto::Ttl;
use serde::Deserialize;

use crate::secret::sha256_hex;
use crate::settings::{Env, Invalid, read_secret_file, resolve};

/// Where the tailscaled LocalAPI socket usually lives on Linux.
pub const DEFAULT_TAILSCALED_SOCKET: &str = "/var/run/tailscale/tailscaled.sock";
const FALLBACK_TAILSCALED_SOCKET: &str = "/run/tailscale/tailscaled.sock";

/// `[tailscale]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTailscale {
    #[serde(default = "yes")]
    enabled: bool,
    socket: Option<PathBuf>,
    #[serde(default = "default_whois_cache")]
    whois_cache_ttl: Ttl,
    #[serde(default)]
    trust_own_node: bool,
}

impl Default for RawTailscale {
    fn default() -> Self {
        RawTailscale {
            enabled: true,
            socket: None,
            whois_cache_ttl: default_whois_cache(),
            trust_own_node: false,
        }
    }
}

fn yes() -> bool {
    true
}
fn default_whois_cache() -> Ttl {
    Ttl::from_secs(5)
}

/// `[tailscale]`, validated.
#[derive(Debug, Clone)]
pub struct TailscaleConfig {
    pub socket: PathBuf,
    pub whois_cache_ttl: Duration,
    /// Whether callers on the broker's own node carry the node's identity (never an admin's).
    pub trust_own_node: bool,
}

impl RawTailscale {
    /// `None` when `enabled = false`; a relative socket path is relative to `base`.
    pub fn validate(self, base: &Path) -> Result<Option<TailscaleConfig>, Invalid> {
        if !self.enabled {
            return Ok(None);
        }
        let socket = match self.socket {
            Some(s) => resolve(base, &s),
            None => default_tailscaled_socket(),
        };
        let ttl = self.whois_cache_ttl.as_duration();
        if ttl > Duration::from_secs(60) {
            return Err(Invalid::new(
                "tailscale.whois_cache_ttl",
                "must be at most 60s, so identities follow tailnet changes",
            ));
        }
        Ok(Some(TailscaleConfig {
            socket,
            whois_cache_ttl: ttl,
            trust_own_node: self.trust_own_node,
        }))
    }
}

fn default_tailscaled_socket() -> PathBuf {
    let primary = PathBuf::from(DEFAULT_TAILSCALED_SOCKET);
    if !primary.exists() && Path::new(FALLBACK_TAILSCALED_SOCKET).exists() {
        return PathBuf::from(FALLBACK_TAILSCALED_SOCKET);
    }
    primary
}

/// One `[[api_keys]]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiKey {
    bot: String,
    key_sha256: Option<String>,
    key_file: Option<PathBuf>,
    key_env: Option<String>,
}

/// One API-key bot: the SHA-256 of its key (the key itself is never kept).
#[derive(Debug, Clone)]
pub struct ApiKeyConfig {
    pub bot: String,
    pub key_sha256: [u8; 32],
}

/// Validate `[[api_keys]]`: each entry names a bot and exactly one source of its key.
pub fn api_keys(
    raw: &[RawApiKey],
    base: &Path,
    env: &dyn Env,
) -> Result<Vec<ApiKeyConfig>, Invalid> {
    let mut api_keys = Vec::new();
    for (i, k) in raw.iter().enumerate() {
        let key = |field: &str| format!("api_keys[{i}].{field}");
        if k.bot.trim().is_empty() {
            return Err(Invalid::new(key("bot"), "must name a bot of the policy"));
        }
        let sources = [
            k.key_sha256.is_some(),
            k.key_file.is_some(),
            k.key_env.is_some(),
        ]
        .iter()
        .filter(|s| **s)
        .count();
        if sources != 1 {
            return Err(Invalid::new(
                key("key_sha256"),
                "give exactly one of key_sha256, key_file, key_env",
            ));
        }
        let digest_hex = if let Some(h) = &k.key_sha256 {
            h.trim().to_ascii_lowercase()
        } else if let Some(f) = &k.key_file {
            let secret = read_secret_file(&resolve(base, f))
                .map_err(|m| Invalid::new(key("key_file"), m))?;
            sha256_hex(secret.expose().trim().as_bytes())
        } else {
            let name = k.key_env.as_deref().unwrap_or_default();
            let value = env.var(name).ok_or_else(|| {
                Invalid::new(
                    key("key_env"),
                    format!("environment variable {name} is not set"),
                )
            })?;
            sha256_hex(value.trim().as_bytes())
        };
        let mut key_sha256 = [0u8; 32];
        hex::decode_to_slice(&digest_hex, &mut key_sha256).map_err(|_| {
            Invalid::new(
                key("key_sha256"),
                "must be 64 hex digits (SHA-256 of the key)",
            )
        })?;
        api_keys.push(ApiKeyConfig {
            bot: k.bot.clone(),
            key_sha256,
        });
    }
    Ok(api_keys)
}

/// Who may use the admin routes: tailnet users, tags, a tailnet grant capability, and
/// API-key bots (for scripts).
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Tailnet login names (`alice@example.com`) of untagged nodes.
    #[serde(default)]
    pub users: Vec<String>,
    /// ACL tags (`tag:admin`) of tagged nodes.
    #[serde(default)]
    pub tags: Vec<String>,
    /// A capability from tailnet grants (`example.com/cap/botcreds-admin`).
    #[serde(default)]
    pub capability: Option<String>,
    /// Bots (named in `[[api_keys]]`) whose API key makes them admins.
    #[serde(default)]
    pub api_key_bots: Vec<String>,
}

impl AdminConfig {
    /// Every admin bot must have an API key; tags must be ACL tags.
    pub fn validate(self, api_keys: &[ApiKeyConfig]) -> Result<AdminConfig, Invalid> {
        for (i, bot) in self.api_key_bots.iter().enumerate() {
            if !api_keys.iter().any(|k| &k.bot == bot) {
                return Err(Invalid::new(
                    format!("admin.api_key_bots[{i}]"),
                    format!("{bot:?} has no [[api_keys]] entry"),
                ));
            }
        }
        for (i, tag) in self.tags.iter().enumerate() {
            if !tag.starts_with("tag:") {
                return Err(Invalid::new(
                    format!("admin.tags[{i}]"),
                    format!("{tag:?} is not an ACL tag (tag:name)"),
                ));
            }
        }
        Ok(self)
    }
}
