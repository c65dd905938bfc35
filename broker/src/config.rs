//! `broker.toml`: the broker's configuration, parsed strictly (unknown keys are errors) and
//! validated once at startup. Every key is documented in `docs/configuration.md`.
//!
//! Each section is parsed and validated by the module that owns it, over the leaf module
//! [`settings`](crate::settings) (the typed [`Invalid`] error, secret files, the environment):
//! `[tailscale]`, `[[api_keys]]` and `[admin]` in `identity/config.rs`, `[github]` in
//! `providers/github/config.rs`, `[approvals]` in `approvals/`, `[notify]` in
//! `notify/config.rs`, `[web]` in `web/config.rs`, `[tls]` in `tls/config.rs`, `[litellm]` and
//! `[coder]` in `keys/config.rs`, `[limits]` in `limits.rs`. This module only names the
//! tables, calls them in turn and adds the file name to their errors. Nothing below it
//! imports it.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::approvals::ApprovalsConfig;
use crate::identity::config::{RawApiKey, RawTailscale};
use crate::keys::config::{CoderConfig, LitellmConfig, RawCoder, RawLitellm};
use crate::limits::RawLimits;
use crate::notify::NotifyConfig;
use crate::notify::config::RawNotify;
use crate::providers::github::config::RawGithub;
use crate::settings::{Invalid, resolve};
use crate::tls::{RawTlsConfig, TlsConfig};
use crate::web::config::{RawWeb, WebConfig};

pub use crate::identity::config::{
    AdminConfig, ApiKeyConfig, DEFAULT_TAILSCALED_SOCKET, TailscaleConfig,
};
pub use crate::limits::Limits;
pub use crate::providers::github::config::{ENV_GITHUB_PRIVATE_KEY, GithubConfig};
#[cfg(test)]
pub(crate) use crate::settings::test_env;
pub use crate::settings::{Env, ProcessEnv, read_secret_file};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Vec<String>,
    #[serde(default)]
    allow_wildcard_listen: bool,
    data_dir: PathBuf,
    policy: PathBuf,
    #[serde(default)]
    tailscale: RawTailscale,
    github: Option<RawGithub>,
    #[serde(default)]
    api_keys: Vec<RawApiKey>,
    #[serde(default)]
    admin: AdminConfig,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    approvals: ApprovalsConfig,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    notify: RawNotify,
    #[serde(default)]
    web: RawWeb,
    #[serde(default)]
    tls: Option<RawTlsConfig>,
    litellm: Option<RawLitellm>,
    coder: Option<RawCoder>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    #[serde(default)]
    format: LogFormat,
    level: Option<String>,
}

/// How the broker writes its logs to stderr.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub data_dir: PathBuf,
    pub policy: PathBuf,
    pub tailscale: Option<TailscaleConfig>,
    pub github: Option<GithubConfig>,
    pub api_keys: Vec<ApiKeyConfig>,
    pub admin: AdminConfig,
    pub limits: Limits,
    /// `[approvals]`: grant lifetime, longest wait, pending caps.
    pub approvals: ApprovalsConfig,
    pub log_format: LogFormat,
    pub log_level: Option<String>,
    /// `[notify]`: webhooks and the chat card (see `notify/config.rs`).
    pub notify: NotifyConfig,
    /// `[web]`: the approval pages and the public URL links point at.
    pub web: WebConfig,
    /// `[tls]`: the mTLS listener and the broker's CA (docs/mtls.md).
    pub tls: Option<TlsConfig>,
    /// `[litellm]`: LiteLLM virtual keys (docs/litellm.md).
    pub litellm: Option<LitellmConfig>,
    /// `[coder]`: where `/api/v1/keys/user` checks Coder session tokens.
    pub coder: Option<CoderConfig>,
}

/// A configuration problem, naming the key (or file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: `{key}`: {message}")]
    Invalid {
        path: String,
        key: String,
        message: String,
    },
}

impl Config {
    /// Read and validate `broker.toml`. Relative paths inside resolve against the file's directory.
    pub fn load(path: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&path.display().to_string(), &text, base, env)
    }

    /// Parse `text` (named `source` in errors); each section validates itself, in the order
    /// of the file's documentation, and the first invalid key is the error.
    pub fn parse(
        source: &str,
        text: &str,
        base: &Path,
        env: &dyn Env,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: source.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let invalid = |Invalid { key, message }: Invalid| ConfigError::Invalid {
            path: source.to_string(),
            key,
            message,
        };
        let listen = listen_addresses(&raw.listen, raw.allow_wildcard_listen).map_err(invalid)?;
        let tailscale = raw.tailscale.validate(base).map_err(invalid)?;
        let github = match raw.github {
            Some(g) => Some(g.validate(base, env).map_err(invalid)?),
            None => None,
        };
        let api_keys =
            crate::identity::config::api_keys(&raw.api_keys, base, env).map_err(invalid)?;
        let admin = raw.admin.validate(&api_keys).map_err(invalid)?;
        let web = WebConfig::from_raw(raw.web).map_err(invalid)?;
        let notify = NotifyConfig::from_raw(
            raw.notify,
            web.public_url.as_deref(),
            &|p: &Path| resolve(base, p),
            env,
        )
        .map_err(invalid)?;
        let limits = raw.limits.validate().map_err(invalid)?;
        if let Some(level) = &raw.log.level
            && tracing_subscriber::EnvFilter::try_new(level).is_err()
        {
            return Err(invalid(Invalid::new(
                "log.level",
                format!("{level:?} is not a log filter"),
            )));
        }
        if let Err((key, message)) = raw.approvals.validate() {
            return Err(invalid(Invalid::new(key, message)));
        }
        let litellm = match &raw.litellm {
            Some(l) => Some(LitellmConfig::from_raw(l, base, env).map_err(invalid)?),
            None => None,
        };
        let coder = match &raw.coder {
            Some(c) => Some(CoderConfig::from_raw(c, base).map_err(invalid)?),
            None => None,
        };
        let tls = match raw.tls {
            Some(t) => Some(
                t.validate(
                    &|p: &Path| resolve(base, p),
                    tailscale.as_ref().map(|t| t.socket.as_path()),
                )
                .map_err(invalid)?,
            ),
            None => None,
        };

        Ok(Config {
            listen,
            data_dir: resolve(base, &raw.data_dir),
            policy: resolve(base, &raw.policy),
            tailscale,
            github,
            api_keys,
            admin,
            limits,
            approvals: raw.approvals,
            log_format: raw.log.format,
            log_level: raw.log.level,
            notify,
            web,
            tls,
            litellm,
            coder,
        })
    }
}

/// The top-level `listen` addresses: at least one, each `IP:port`, and no wildcard unless
/// `allow_wildcard_listen` says so.
fn listen_addresses(listen: &[String], allow_wildcard: bool) -> Result<Vec<SocketAddr>, Invalid> {
    if listen.is_empty() {
        return Err(Invalid::new("listen", "at least one address is needed"));
    }
    let mut out = Vec::new();
    for (i, a) in listen.iter().enumerate() {
        let key = format!("listen[{i}]");
        let addr: SocketAddr = a.parse().map_err(|_| {
            Invalid::new(
                &key,
                format!("{a:?} is not an IP:port address (e.g. 100.64.0.7:8443)"),
            )
        })?;
        if addr.ip().is_unspecified() && !allow_wildcard {
            return Err(Invalid::new(
                key,
                format!(
                    "{a} listens on every interface; give the tailnet or loopback address, \
                     or set allow_wildcard_listen = true"
                ),
            ));
        }
        out.push(addr);
    }
    Ok(out)
}

/// Whether an address is on loopback or in Tailscale's ranges (100.64.0.0/10, fd7a:115c:a1e0::/48).
pub fn is_loopback_or_tailnet(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback() || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            v6.is_loopback() || (s[0] == 0xfd7a && s[1] == 0x115c && s[2] == 0xa1e0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    use crate::secret::sha256_hex;

    use super::test_env::{MapEnv, env};

    const MIN: &str = "listen = [\"127.0.0.1:8443\"]\ndata_dir = \"/tmp/d\"\npolicy = \"p.yaml\"\n";

    fn parse(text: &str, e: &MapEnv) -> Result<Config, ConfigError> {
        Config::parse("broker.toml", text, Path::new("/etc/botcreds"), e)
    }

    #[test]
    fn minimal_config_resolves_relative_paths() {
        let c = parse(MIN, &env(&[])).unwrap();
        assert_eq!(c.policy, PathBuf::from("/etc/botcreds/p.yaml"));
        assert!(c.github.is_none());
        assert!(c.tailscale.is_some());
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (format!("{MIN}colour = 1\n"), "colour"),
            (
                "listen = [\"0.0.0.0:8443\"]\ndata_dir = \"d\"\npolicy = \"p\"\n".to_string(),
                "listen[0]",
            ),
            (
                "listen = [\"nonsense\"]\ndata_dir = \"d\"\npolicy = \"p\"\n".to_string(),
                "listen[0]",
            ),
            (
                format!("{MIN}[github]\napp_id = 1\n"),
                "github.private_key_file",
            ),
            (
                format!("{MIN}[github]\napp_id = 1\nprivate_key_fil = \"x\"\n"),
                "private_key_fil",
            ),
            (
                format!("{MIN}[tailscale]\nwhois_cache_ttl = \"soon\"\n"),
                "whois_cache_ttl",
            ),
            (
                format!("{MIN}[tailscale]\nwhois_cache_ttl = \"5m\"\n"),
                "tailscale.whois_cache_ttl",
            ),
            (
                format!("{MIN}[[api_keys]]\nbot = \"b\"\n"),
                "api_keys[0].key_sha256",
            ),
            (
                format!("{MIN}[[api_keys]]\nbot = \"b\"\nkey_sha256 = \"zz\"\n"),
                "api_keys[0].key_sha256",
            ),
            (
                format!("{MIN}[[api_keys]]\nbot = \"b\"\nkey_env = \"NOPE\"\n"),
                "api_keys[0].key_env",
            ),
            (
                format!("{MIN}[limits]\nmax_github_ttl = \"2h\"\n"),
                "limits.max_github_ttl",
            ),
            (
                format!("{MIN}[limits]\nreplace_burst = 0\n"),
                "limits.replace_burst",
            ),
            (
                format!("{MIN}[limits]\nreplace_interval = \"0s\"\n"),
                "replace_interval",
            ),
            (
                format!("{MIN}[limits]\nmax_connections = 0\n"),
                "limits.max_connections",
            ),
            (
                format!("{MIN}[limits]\nmax_connections = 10\nmax_connections_per_peer = 11\n"),
                "limits.max_connections_per_peer",
            ),
            (
                format!("{MIN}[limits]\nidle_timeout = \"0s\"\n"),
                "idle_timeout",
            ),
            (
                format!("{MIN}[tailscale]\ntrust_own_node = \"yes\"\n"),
                "trust_own_node",
            ),
            (
                format!("{MIN}[admin]\napi_key_bots = [\"ops\"]\n"),
                "admin.api_key_bots[0]",
            ),
            (
                format!("{MIN}[admin]\ntags = [\"admin\"]\n"),
                "admin.tags[0]",
            ),
            (format!("{MIN}[admin]\nuser = [\"a@b\"]\n"), "user"),
        ];
        for (text, key) in cases {
            let err = parse(&text, &env(&[])).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn wildcard_needs_force() {
        let text = "listen = [\"[::]:8443\"]\nallow_wildcard_listen = true\ndata_dir = \"d\"\npolicy = \"p\"\n";
        assert!(parse(text, &env(&[])).is_ok());
    }

    #[test]
    fn secrets_from_env() {
        let text = format!(
            "{MIN}[github]\napp_id = 7\n[[api_keys]]\nbot = \"ci\"\nkey_env = \"CI_KEY\"\n"
        );
        let c = parse(
            &text,
            &env(&[(ENV_GITHUB_PRIVATE_KEY, "PEM"), ("CI_KEY", "bck_abc")]),
        )
        .unwrap();
        assert_eq!(c.github.unwrap().private_key_pem.expose(), "PEM");
        assert_eq!(
            hex::encode(c.api_keys[0].key_sha256),
            sha256_hex(b"bck_abc")
        );
    }

    #[test]
    fn secret_file_mode_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        std::fs::write(&path, "PEM").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_secret_file(&path).unwrap_err();
        assert!(err.contains("0644"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret_file(&path).unwrap().expose(), "PEM");
    }

    #[test]
    fn tailnet_ranges() {
        for (ip, want) in [
            ("127.0.0.1", true),
            ("100.64.0.1", true),
            ("100.127.255.255", true),
            ("100.128.0.1", false),
            ("192.168.1.1", false),
            ("fd7a:115c:a1e0::1", true),
            ("::1", true),
        ] {
            assert_eq!(is_loopback_or_tailnet(ip.parse().unwrap()), want, "{ip}");
        }
    }
}
