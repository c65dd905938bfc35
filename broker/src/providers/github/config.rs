//! `[github]` in broker.toml: the GitHub App the broker mints installation tokens with.
//! Parsed strictly here so that `config.rs` only names the table.

use std::path::{Path, PathBuf};
use std::time::Duration;

use botcreds_proto::Ttl;
use serde::Deserialize;

use crate::secret::Secret;
use crate::settings::{Env, Invalid, read_secret_file, resolve};

/// Environment variable holding the GitHub App private key PEM (instead of `private_key_file`).
pub const ENV_GITHUB_PRIVATE_KEY: &str = "BOTCREDS_GITHUB_PRIVATE_KEY";

/// `[github]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGithub {
    app_id: u64,
    private_key_file: Option<PathBuf>,
    #[serde(default = "default_api_url")]
    api_url: String,
    app_slug: Option<String>,
    bot_user_id: Option<u64>,
    #[serde(default = "default_min_ttl")]
    default_min_ttl: Ttl,
    #[serde(default = "default_upstream_timeout")]
    request_timeout: Ttl,
}

fn default_api_url() -> String {
    "https://api.github.com".to_string()
}
fn default_min_ttl() -> Ttl {
    Ttl::from_secs(600)
}
fn default_upstream_timeout() -> Ttl {
    Ttl::from_secs(10)
}

/// `[github]`, validated.
#[derive(Debug, Clone)]
pub struct GithubConfig {
    pub app_id: u64,
    pub private_key_pem: Secret,
    pub api_url: String,
    pub app_slug: Option<String>,
    pub bot_user_id: Option<u64>,
    /// Lifetime a token must still have when handed out, if the request names none.
    pub default_min_ttl: Duration,
    pub request_timeout: Duration,
}

impl RawGithub {
    /// Validate; the private key comes from `private_key_file` (relative to `base`) or the
    /// environment.
    pub fn validate(self, base: &Path, env: &dyn Env) -> Result<GithubConfig, Invalid> {
        let private_key_pem = match (&self.private_key_file, env.var(ENV_GITHUB_PRIVATE_KEY)) {
            (Some(file), _) => read_secret_file(&resolve(base, file))
                .map_err(|m| Invalid::new("github.private_key_file", m))?,
            (None, Some(pem)) => Secret::new(pem),
            (None, None) => {
                return Err(Invalid::new(
                    "github.private_key_file",
                    format!("required (or set {ENV_GITHUB_PRIVATE_KEY})"),
                ));
            }
        };
        let api_url = self.api_url.trim_end_matches('/').to_string();
        if !(api_url.starts_with("https://") || api_url.starts_with("http://")) {
            return Err(Invalid::new(
                "github.api_url",
                format!("{api_url:?} is not an http(s) URL"),
            ));
        }
        if self.app_id == 0 {
            return Err(Invalid::new(
                "github.app_id",
                "must be the app's numeric id",
            ));
        }
        Ok(GithubConfig {
            app_id: self.app_id,
            private_key_pem,
            api_url,
            app_slug: self.app_slug,
            bot_user_id: self.bot_user_id,
            default_min_ttl: self.default_min_ttl.as_duration(),
            request_timeout: self.request_timeout.as_duration(),
        })
    }
}
