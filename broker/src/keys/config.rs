//! `[litellm]` and `[coder]` in broker.toml: raw (strict) forms and their validation. The
//! broker's `config.rs` embeds these tables and calls [`LitellmConfig::from_raw`] and
//! [`CoderConfig::from_raw`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use botcreds_proto::Ttl;
use serde::Deserialize;

use super::scopes::{ScopeOverride, ScopeTable};
use crate::secret::Secret;
use crate::settings::{Env, Invalid, read_secret_file, resolve};

/// Environment variable holding the LiteLLM master key (instead of `master_key_file`).
pub const ENV_LITELLM_MASTER_KEY: &str = "BOTCREDS_LITELLM_MASTER_KEY";
/// Environment variable holding the provisioner secret (instead of `provisioner_secret_file`).
pub const ENV_PROVISIONER_SECRET: &str = "BOTCREDS_PROVISIONER_SECRET";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLitellm {
    url: String,
    master_key_file: Option<PathBuf>,
    provisioner_secret_file: Option<PathBuf>,
    #[serde(default = "default_sweep")]
    sweep_interval: Ttl,
    #[serde(default = "default_timeout")]
    request_timeout: Ttl,
    #[serde(default)]
    scopes: BTreeMap<String, ScopeOverride>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCoder {
    url: String,
    #[serde(default = "default_timeout")]
    request_timeout: Ttl,
    /// A Coder token the broker reads workspaces with (to confirm workspace keys).
    #[serde(default)]
    token_file: Option<std::path::PathBuf>,
}

fn default_sweep() -> Ttl {
    Ttl::from_secs(60)
}
fn default_timeout() -> Ttl {
    Ttl::from_secs(10)
}

/// The validated `[litellm]` table.
#[derive(Debug, Clone)]
pub struct LitellmConfig {
    pub url: String,
    pub master_key: Secret,
    /// The shared secret of the key-provisioner scripts; `None` refuses every
    /// `X-Provisioner-Secret` (admins can still use the routes).
    pub provisioner_secret: Option<Secret>,
    pub sweep_interval: Duration,
    pub request_timeout: Duration,
    pub scopes: ScopeTable,
}

/// The validated `[coder]` table.
#[derive(Debug, Clone)]
pub struct CoderConfig {
    /// Coder's URL; session tokens are checked at `{url}/api/v2/users/me`.
    pub url: String,
    pub request_timeout: Duration,
    /// The broker's own Coder token: with it, a workspace key is made only for a workspace
    /// `GET {url}/api/v2/workspaces/{id}` confirms (name and owner).
    pub token: Option<Secret>,
}

fn http_url(url: &str) -> Option<String> {
    let url = url.trim().trim_end_matches('/');
    let parsed = reqwest::Url::parse(url).ok()?;
    (matches!(parsed.scheme(), "http" | "https") && parsed.host().is_some())
        .then(|| url.to_string())
}

impl LitellmConfig {
    /// Validate `[litellm]`; a relative file is relative to `base` (the config's folder).
    pub fn from_raw(
        raw: &RawLitellm,
        base: &Path,
        env: &dyn Env,
    ) -> Result<LitellmConfig, Invalid> {
        let url = http_url(&raw.url).ok_or_else(|| {
            Invalid::new(
                "litellm.url",
                format!(
                    "{:?} is not an http(s) URL (e.g. http://litellm:4000)",
                    raw.url
                ),
            )
        })?;
        let master_key = match (&raw.master_key_file, env.var(ENV_LITELLM_MASTER_KEY)) {
            (Some(file), _) => read_secret_file(&resolve(base, file))
                .map_err(|m| Invalid::new("litellm.master_key_file", m))?,
            (None, Some(v)) => Secret::new(v),
            (None, None) => {
                return Err(Invalid::new(
                    "litellm.master_key_file",
                    format!("required (or set {ENV_LITELLM_MASTER_KEY})"),
                ));
            }
        };
        let master_key = Secret::new(master_key.expose().trim());
        if master_key.is_empty() {
            return Err(Invalid::new(
                "litellm.master_key_file",
                "the master key is empty",
            ));
        }
        let provisioner_secret = match (
            &raw.provisioner_secret_file,
            env.var(ENV_PROVISIONER_SECRET),
        ) {
            (Some(file), _) => Some(
                read_secret_file(&resolve(base, file))
                    .map_err(|m| Invalid::new("litellm.provisioner_secret_file", m))?,
            ),
            (None, Some(v)) => Some(Secret::new(v)),
            (None, None) => None,
        }
        .map(|s| Secret::new(s.expose().trim()));
        if let Some(s) = &provisioner_secret
            && s.expose().len() < 16
        {
            return Err(Invalid::new(
                "litellm.provisioner_secret_file",
                "the provisioner secret must be at least 16 characters",
            ));
        }
        let sweep = raw.sweep_interval.as_duration();
        if sweep > Duration::from_secs(3600) {
            return Err(Invalid::new("litellm.sweep_interval", "must be at most 1h"));
        }
        let timeout = raw.request_timeout.as_duration();
        if timeout > Duration::from_secs(120) {
            return Err(Invalid::new(
                "litellm.request_timeout",
                "must be at most 120s",
            ));
        }
        let scopes = ScopeTable::with_overrides(&raw.scopes)
            .map_err(|(key, message)| Invalid { key, message })?;
        Ok(LitellmConfig {
            url,
            master_key,
            provisioner_secret,
            sweep_interval: sweep,
            request_timeout: timeout,
            scopes,
        })
    }
}

impl CoderConfig {
    /// Validate `[coder]`; a relative `token_file` is relative to `base` (the config's folder).
    pub fn from_raw(raw: &RawCoder, base: &Path) -> Result<CoderConfig, Invalid> {
        let url = http_url(&raw.url).ok_or_else(|| {
            Invalid::new("coder.url", format!("{:?} is not an http(s) URL", raw.url))
        })?;
        let timeout = raw.request_timeout.as_duration();
        if timeout > Duration::from_secs(120) {
            return Err(Invalid::new(
                "coder.request_timeout",
                "must be at most 120s",
            ));
        }
        let token = match &raw.token_file {
            Some(file) => {
                let t = read_secret_file(&resolve(base, file))
                    .map_err(|m| Invalid::new("coder.token_file", m))?;
                let t = Secret::new(t.expose().trim());
                if t.is_empty() {
                    return Err(Invalid::new("coder.token_file", "the token is empty"));
                }
                Some(t)
            }
            None => None,
        };
        Ok(CoderConfig {
            url,
            request_timeout: timeout,
            token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    use crate::settings::test_env::{MapEnv, env};

    fn parse(text: &str, e: &MapEnv, base: &Path) -> Result<LitellmConfig, (String, String)> {
        let raw: RawLitellm = toml::from_str(text).map_err(|e| ("toml".into(), e.to_string()))?;
        LitellmConfig::from_raw(&raw, base, e).map_err(|e| (e.key, e.message))
    }

    #[test]
    fn env_secrets_and_defaults() {
        let c = parse(
            "url = \"http://litellm:4000/\"\n",
            &env(&[
                (ENV_LITELLM_MASTER_KEY, "sk-master\n"),
                (ENV_PROVISIONER_SECRET, "0123456789abcdef"),
            ]),
            Path::new("/"),
        )
        .unwrap();
        assert_eq!(c.url, "http://litellm:4000");
        assert_eq!(c.master_key.expose(), "sk-master");
        assert_eq!(c.sweep_interval, Duration::from_secs(60));
        assert_eq!(c.scopes, ScopeTable::default());
        assert!(!format!("{c:?}").contains("sk-master"));
    }

    #[test]
    fn errors_name_the_key() {
        let e = env(&[(ENV_LITELLM_MASTER_KEY, "sk-m")]);
        let cases = [
            ("url = \"litellm\"\n", "litellm.url"),
            (
                "url = \"http://l\"\nsweep_interval = \"2h\"\n",
                "litellm.sweep_interval",
            ),
            (
                "url = \"http://l\"\n[scopes.ci]\nbudget_usd = -2\n",
                "litellm.scopes.ci.budget_usd",
            ),
            (
                "url = \"http://l\"\n[scopes.bogus]\n",
                "litellm.scopes.bogus",
            ),
            (
                "url = \"http://l\"\nmaster_key_file = \"/nonexistent/k\"\n",
                "litellm.master_key_file",
            ),
        ];
        for (text, key) in cases {
            assert_eq!(
                parse(text, &e, Path::new("/")).unwrap_err().0,
                key,
                "{text}"
            );
        }
        assert_eq!(
            parse("url = \"http://l\"\n", &env(&[]), Path::new("/"))
                .unwrap_err()
                .0,
            "litellm.master_key_file"
        );
        let short = env(&[
            (ENV_LITELLM_MASTER_KEY, "sk-m"),
            (ENV_PROVISIONER_SECRET, "short"),
        ]);
        assert_eq!(
            parse("url = \"http://l\"\n", &short, Path::new("/"))
                .unwrap_err()
                .0,
            "litellm.provisioner_secret_file"
        );
        assert!(parse("url = \"http://l\"\ncolour = 1\n", &e, Path::new("/")).is_err());
    }

    #[test]
    fn master_key_file_mode_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        std::fs::write(&path, "sk-master\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = "url = \"http://l\"\nmaster_key_file = \"master.key\"\n";
        let err = parse(text, &env(&[]), dir.path()).unwrap_err();
        assert!(err.1.contains("0644"), "{err:?}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            parse(text, &env(&[]), dir.path())
                .unwrap()
                .master_key
                .expose(),
            "sk-master"
        );
    }

    #[test]
    fn coder_url_is_checked() {
        let raw: RawCoder = toml::from_str("url = \"https://coder.example.com/\"\n").unwrap();
        assert_eq!(
            CoderConfig::from_raw(&raw, Path::new("/")).unwrap().url,
            "https://coder.example.com"
        );
        let raw: RawCoder = toml::from_str("url = \"coder\"\n").unwrap();
        assert_eq!(
            CoderConfig::from_raw(&raw, Path::new("/")).unwrap_err().key,
            "coder.url"
        );
    }
}
