//! `broker.toml`: the broker's configuration, parsed strictly (unknown keys are errors) and
//! validated once at startup. Every key is documented in `docs/configuration.md`.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use botcreds_proto::Ttl;
use serde::Deserialize;

use crate::secret::{Secret, sha256_hex};

/// Where the tailscaled LocalAPI socket usually lives on Linux.
pub const DEFAULT_TAILSCALED_SOCKET: &str = "/var/run/tailscale/tailscaled.sock";
const FALLBACK_TAILSCALED_SOCKET: &str = "/run/tailscale/tailscaled.sock";

/// Environment variable holding the GitHub App private key PEM (instead of `private_key_file`).
pub const ENV_GITHUB_PRIVATE_KEY: &str = "BOTCREDS_GITHUB_PRIVATE_KEY";

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
    approvals: crate::approvals::ApprovalsConfig,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    notify: crate::notify::config::RawNotify,
    #[serde(default)]
    web: crate::notify::config::RawWeb,
    #[serde(default)]
    tls: Option<crate::tls::RawTlsConfig>,
    litellm: Option<crate::keys::config::RawLitellm>,
    coder: Option<crate::keys::config::RawCoder>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTailscale {
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGithub {
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApiKey {
    bot: String,
    key_sha256: Option<String>,
    key_file: Option<PathBuf>,
    key_env: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default = "default_request_timeout")]
    request_timeout: Ttl,
    #[serde(default = "default_concurrency")]
    max_concurrent_requests: usize,
    #[serde(default = "default_max_ttl")]
    max_github_ttl: Ttl,
    /// Replacements (`replaces`) of one token scope one bot may have at once.
    #[serde(default = "default_replace_burst")]
    replace_burst: u32,
    /// How long one more replacement takes to become available again.
    #[serde(default = "default_replace_interval")]
    replace_interval: Ttl,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default = "default_max_connections_per_peer")]
    max_connections_per_peer: usize,
    #[serde(default = "default_idle_timeout")]
    idle_timeout: Ttl,
    #[serde(default = "default_header_read_timeout")]
    header_read_timeout: Ttl,
    #[serde(default = "default_refusals_per_peer")]
    audited_refusals_per_peer: usize,
    #[serde(default = "default_refusal_window")]
    refusal_window: Ttl,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            request_timeout: default_request_timeout(),
            max_concurrent_requests: default_concurrency(),
            max_github_ttl: default_max_ttl(),
            replace_burst: default_replace_burst(),
            replace_interval: default_replace_interval(),
            max_connections: default_max_connections(),
            max_connections_per_peer: default_max_connections_per_peer(),
            idle_timeout: default_idle_timeout(),
            header_read_timeout: default_header_read_timeout(),
            audited_refusals_per_peer: default_refusals_per_peer(),
            refusal_window: default_refusal_window(),
        }
    }
}

impl RawLimits {
    fn limits(&self) -> Limits {
        Limits {
            request_timeout: self.request_timeout.as_duration(),
            max_concurrent_requests: self.max_concurrent_requests,
            max_github_ttl: self.max_github_ttl.as_duration(),
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections_per_peer,
            idle_timeout: self.idle_timeout.as_duration(),
            header_read_timeout: self.header_read_timeout.as_duration(),
            audited_refusals_per_peer: self.audited_refusals_per_peer,
            refusal_window: self.refusal_window.as_duration(),
            replace: crate::grants::ReplaceLimit {
                burst: self.replace_burst,
                interval: self.replace_interval.as_duration(),
            },
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    #[serde(default)]
    format: LogFormat,
    level: Option<String>,
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

/// How the broker writes its logs to stderr.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

fn yes() -> bool {
    true
}
fn default_whois_cache() -> Ttl {
    Ttl::from_secs(5)
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
fn default_request_timeout() -> Ttl {
    Ttl::from_secs(30)
}
fn default_concurrency() -> usize {
    1024
}
fn default_replace_burst() -> u32 {
    crate::grants::ReplaceLimit::default().burst
}
fn default_replace_interval() -> Ttl {
    Ttl::from_secs(crate::grants::ReplaceLimit::default().interval.as_secs())
}
fn default_max_ttl() -> Ttl {
    Ttl::from_secs(3000)
}
fn default_max_connections() -> usize {
    4096
}
fn default_max_connections_per_peer() -> usize {
    128
}
fn default_idle_timeout() -> Ttl {
    Ttl::from_secs(60)
}
fn default_header_read_timeout() -> Ttl {
    Ttl::from_secs(10)
}
fn default_refusals_per_peer() -> usize {
    10
}
fn default_refusal_window() -> Ttl {
    Ttl::from_secs(60)
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
    pub approvals: crate::approvals::ApprovalsConfig,
    pub log_format: LogFormat,
    pub log_level: Option<String>,
    /// `[notify]`: webhooks and the chat card (see `notify/config.rs`).
    pub notify: crate::notify::NotifyConfig,
    /// `[web]`: the approval pages and the public URL links point at.
    pub web: crate::notify::WebConfig,
    /// `[tls]`: the mTLS listener and the broker's CA (docs/mtls.md).
    pub tls: Option<crate::tls::TlsConfig>,
    /// `[litellm]`: LiteLLM virtual keys (docs/litellm.md).
    pub litellm: Option<crate::keys::config::LitellmConfig>,
    /// `[coder]`: where `/api/v1/keys/user` checks Coder session tokens.
    pub coder: Option<crate::keys::config::CoderConfig>,
}

#[derive(Debug, Clone)]
pub struct TailscaleConfig {
    pub socket: PathBuf,
    pub whois_cache_ttl: Duration,
    /// Whether callers on the broker's own node carry the node's identity (never an admin's).
    pub trust_own_node: bool,
}

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

/// One API-key bot: the SHA-256 of its key (the key itself is never kept).
#[derive(Debug, Clone)]
pub struct ApiKeyConfig {
    pub bot: String,
    pub key_sha256: [u8; 32],
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub request_timeout: Duration,
    pub max_concurrent_requests: usize,
    /// The longest `ttl` a GitHub token request may ask for (tokens live one hour).
    pub max_github_ttl: Duration,
    /// How often one bot may have the token of one scope replaced (`replaces`).
    pub replace: crate::grants::ReplaceLimit,
    /// Open connections over all listeners; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Open connections from one peer IP; more are closed as soon as they are accepted.
    pub max_connections_per_peer: usize,
    /// A connection with no request in flight for this long is closed (HTTP/1 and HTTP/2).
    pub idle_timeout: Duration,
    /// An HTTP/1 request head must arrive within this time.
    pub header_read_timeout: Duration,
    /// Unauthenticated refusals audited one by one per peer IP and window; the rest of the
    /// window is counted and audited as one summary event.
    pub audited_refusals_per_peer: usize,
    /// The window of `audited_refusals_per_peer`.
    pub refusal_window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        RawLimits::default().limits()
    }
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

/// Environment lookups, injectable for tests.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
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
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: source.to_string(),
            key: key.to_string(),
            message,
        };
        let resolve = |p: &Path| -> PathBuf {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };

        if raw.listen.is_empty() {
            return Err(invalid("listen", "at least one address is needed".into()));
        }
        let mut listen = Vec::new();
        for (i, a) in raw.listen.iter().enumerate() {
            let key = format!("listen[{i}]");
            let addr: SocketAddr = a.parse().map_err(|_| {
                invalid(
                    &key,
                    format!("{a:?} is not an IP:port address (e.g. 100.64.0.7:8443)"),
                )
            })?;
            if addr.ip().is_unspecified() && !raw.allow_wildcard_listen {
                return Err(invalid(
                    &key,
                    format!(
                        "{a} listens on every interface; give the tailnet or loopback address, \
                         or set allow_wildcard_listen = true"
                    ),
                ));
            }
            listen.push(addr);
        }

        let tailscale = if raw.tailscale.enabled {
            let socket = match raw.tailscale.socket {
                Some(s) => resolve(&s),
                None => default_tailscaled_socket(),
            };
            let ttl = raw.tailscale.whois_cache_ttl.as_duration();
            if ttl > Duration::from_secs(60) {
                return Err(invalid(
                    "tailscale.whois_cache_ttl",
                    "must be at most 60s, so identities follow tailnet changes".into(),
                ));
            }
            Some(TailscaleConfig {
                socket,
                whois_cache_ttl: ttl,
                trust_own_node: raw.tailscale.trust_own_node,
            })
        } else {
            None
        };

        let github = match raw.github {
            None => None,
            Some(g) => {
                let private_key_pem = match (&g.private_key_file, env.var(ENV_GITHUB_PRIVATE_KEY)) {
                    (Some(file), _) => read_secret_file(&resolve(file))
                        .map_err(|m| invalid("github.private_key_file", m))?,
                    (None, Some(pem)) => Secret::new(pem),
                    (None, None) => {
                        return Err(invalid(
                            "github.private_key_file",
                            format!("required (or set {ENV_GITHUB_PRIVATE_KEY})"),
                        ));
                    }
                };
                let api_url = g.api_url.trim_end_matches('/').to_string();
                if !(api_url.starts_with("https://") || api_url.starts_with("http://")) {
                    return Err(invalid(
                        "github.api_url",
                        format!("{api_url:?} is not an http(s) URL"),
                    ));
                }
                if g.app_id == 0 {
                    return Err(invalid(
                        "github.app_id",
                        "must be the app's numeric id".into(),
                    ));
                }
                Some(GithubConfig {
                    app_id: g.app_id,
                    private_key_pem,
                    api_url,
                    app_slug: g.app_slug,
                    bot_user_id: g.bot_user_id,
                    default_min_ttl: g.default_min_ttl.as_duration(),
                    request_timeout: g.request_timeout.as_duration(),
                })
            }
        };

        let mut api_keys = Vec::new();
        for (i, k) in raw.api_keys.iter().enumerate() {
            let key = |field: &str| format!("api_keys[{i}].{field}");
            if k.bot.trim().is_empty() {
                return Err(invalid(&key("bot"), "must name a bot of the policy".into()));
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
                return Err(invalid(
                    &key("key_sha256"),
                    "give exactly one of key_sha256, key_file, key_env".into(),
                ));
            }
            let digest_hex = if let Some(h) = &k.key_sha256 {
                h.trim().to_ascii_lowercase()
            } else if let Some(f) = &k.key_file {
                let secret =
                    read_secret_file(&resolve(f)).map_err(|m| invalid(&key("key_file"), m))?;
                sha256_hex(secret.expose().trim().as_bytes())
            } else {
                let name = k.key_env.as_deref().unwrap_or_default();
                let value = env.var(name).ok_or_else(|| {
                    invalid(
                        &key("key_env"),
                        format!("environment variable {name} is not set"),
                    )
                })?;
                sha256_hex(value.trim().as_bytes())
            };
            let mut key_sha256 = [0u8; 32];
            hex::decode_to_slice(&digest_hex, &mut key_sha256).map_err(|_| {
                invalid(
                    &key("key_sha256"),
                    "must be 64 hex digits (SHA-256 of the key)".into(),
                )
            })?;
            api_keys.push(ApiKeyConfig {
                bot: k.bot.clone(),
                key_sha256,
            });
        }

        for (i, bot) in raw.admin.api_key_bots.iter().enumerate() {
            if !api_keys.iter().any(|k| &k.bot == bot) {
                return Err(invalid(
                    &format!("admin.api_key_bots[{i}]"),
                    format!("{bot:?} has no [[api_keys]] entry"),
                ));
            }
        }
        for (i, tag) in raw.admin.tags.iter().enumerate() {
            if !tag.starts_with("tag:") {
                return Err(invalid(
                    &format!("admin.tags[{i}]"),
                    format!("{tag:?} is not an ACL tag (tag:name)"),
                ));
            }
        }

        let web = crate::notify::WebConfig::from_raw(raw.web.clone())
            .map_err(|(key, message)| invalid(&key, message))?;
        let notify = crate::notify::NotifyConfig::from_raw(raw.notify.clone(), &web, &resolve, env)
            .map_err(|(key, message)| invalid(&key, message))?;

        if raw.limits.max_concurrent_requests == 0 {
            return Err(invalid(
                "limits.max_concurrent_requests",
                "must be at least 1".into(),
            ));
        }
        for (key, value) in [
            ("limits.max_connections", raw.limits.max_connections),
            (
                "limits.max_connections_per_peer",
                raw.limits.max_connections_per_peer,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1".into()));
            }
        }
        if raw.limits.max_connections_per_peer > raw.limits.max_connections {
            return Err(invalid(
                "limits.max_connections_per_peer",
                "must not exceed limits.max_connections".into(),
            ));
        }
        if raw.limits.max_github_ttl.as_duration() > Duration::from_secs(3600) {
            return Err(invalid(
                "limits.max_github_ttl",
                "GitHub installation tokens live at most 1h".into(),
            ));
        }
        if raw.limits.replace_burst == 0 {
            return Err(invalid(
                "limits.replace_burst",
                "must be at least 1 (a client whose token GitHub rejected needs one replacement)"
                    .into(),
            ));
        }
        if raw.limits.replace_interval.as_duration() < Duration::from_secs(1) {
            return Err(invalid(
                "limits.replace_interval",
                "must be at least 1s".into(),
            ));
        }
        if let Some(level) = &raw.log.level
            && tracing_subscriber::EnvFilter::try_new(level).is_err()
        {
            return Err(invalid(
                "log.level",
                format!("{level:?} is not a log filter"),
            ));
        }

        if let Err((key, message)) = raw.approvals.validate() {
            return Err(invalid(key, message));
        }
        let litellm = match &raw.litellm {
            Some(l) => Some(
                crate::keys::config::LitellmConfig::from_raw(l, base, env)
                    .map_err(|(k, m)| invalid(&k, m))?,
            ),
            None => None,
        };
        let coder = match &raw.coder {
            Some(c) => Some(
                crate::keys::config::CoderConfig::from_raw(c, base)
                    .map_err(|(k, m)| invalid(&k, m))?,
            ),
            None => None,
        };
        let tls = match raw.tls {
            Some(t) => Some(
                t.validate(&resolve, tailscale.as_ref().map(|t| t.socket.as_path()))
                    .map_err(|(k, m)| invalid(&k, m))?,
            ),
            None => None,
        };

        Ok(Config {
            listen,
            data_dir: resolve(&raw.data_dir),
            policy: resolve(&raw.policy),
            tailscale,
            github,
            api_keys,
            admin: raw.admin,
            limits: raw.limits.limits(),
            approvals: raw.approvals.clone(),
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

fn default_tailscaled_socket() -> PathBuf {
    let primary = PathBuf::from(DEFAULT_TAILSCALED_SOCKET);
    if !primary.exists() && Path::new(FALLBACK_TAILSCALED_SOCKET).exists() {
        return PathBuf::from(FALLBACK_TAILSCALED_SOCKET);
    }
    primary
}

/// Read a secret file, refusing one that group or others may read or write.
pub fn read_secret_file(path: &Path) -> Result<Secret, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} has mode {mode:04o}; a secret file must not be accessible by group or others \
             (chmod 600 {})",
            path.display(),
            path.display()
        ));
    }
    if meta.len() > 64 * 1024 {
        return Err(format!("{} is larger than 64 KiB", path.display()));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(Secret::new(text))
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

/// An environment of fixed variables, for the config tests of every section.
#[cfg(test)]
pub(crate) mod test_env {
    use std::collections::HashMap;

    pub(crate) struct MapEnv(HashMap<String, String>);

    impl super::Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).cloned()
        }
    }

    pub(crate) fn env(pairs: &[(&str, &str)]) -> MapEnv {
        MapEnv(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
