//! `agent.toml`: which broker, which local users, and which GitHub access this host wants.
//!
//! Parsing is strict: an unknown key or a bad value stops the agent at startup with an error
//! that names it (toml reports the line; checks across keys name the key path, `github[1]`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use botcreds_proto::repo::{valid_owner, valid_repo_name};
use botcreds_proto::{Permission, RepoName, Ttl};
use serde::{Deserialize, Deserializer};

use crate::peer::{AllowList, lookup_group, lookup_user};

/// Default `cache_dir`.
pub const DEFAULT_CACHE_DIR: &str = "/var/cache/botcreds";
/// Default `refresh_before`: refresh a GitHub token once less than this remains of its hour.
pub const DEFAULT_REFRESH_BEFORE: Duration = Duration::from_secs(40 * 60);
/// `min_ttl` defaults to `refresh_before` plus this, so a broker that reuses tokens hands out
/// one that is not itself due for refresh already.
pub const MIN_TTL_MARGIN: Duration = Duration::from_secs(5 * 60);
/// GitHub installation tokens live one hour; a longer `min_ttl` can never be met.
pub const GITHUB_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
const DEFAULT_HELPER_TIMEOUT: Duration = Duration::from_secs(8);
const DEFAULT_BROKER_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
const MAX_REASON_BYTES: usize = 1024;

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Broker base URL without a trailing `/`.
    pub broker: String,
    pub auth: AuthConfig,
    pub cache_dir: PathBuf,
    pub socket: PathBuf,
    /// Group the socket file is given, so its members can connect (the mode is 0660).
    pub socket_group: Option<u32>,
    pub allow: AllowList,
    /// How long a git request waits for the broker before the agent answers without a credential.
    pub helper_timeout: Duration,
    /// Bound on one request to the broker (background refreshes).
    pub broker_timeout: Duration,
    /// Per-repository credentials stop being refreshed when git has not asked for them this long.
    pub idle_timeout: Duration,
    pub github: Vec<GithubEntry>,
    /// `[[litellm]]` entries: LiteLLM virtual keys and the files they are written to.
    pub litellm: Vec<crate::litellm_config::LitellmEntry>,
    /// `[tls]`: what the broker's server certificate is verified against besides the
    /// enrolled CA bundle (`auth = "mtls"` only).
    pub server_trust: crate::tls::ServerTrustConfig,
    /// `[limits]`: what one local user, and all of them together, may make the agent hold.
    pub limits: Limits,
}

/// `[limits]` of agent.toml: bounds on what local users can make the agent hold, so that one
/// allowed user cannot exhaust its memory, file descriptors, cache directory or broker quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Per-repository credentials (from `useHttpPath` requests) tracked at once, all users.
    pub repository_credentials: usize,
    /// Per-repository credentials one local uid may have created and still tracked.
    pub repository_credentials_per_user: usize,
    /// Open connections to the socket, all users.
    pub connections: usize,
    /// Open connections to the socket from one uid.
    pub connections_per_user: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            repository_credentials: 1000,
            repository_credentials_per_user: 100,
            connections: 256,
            connections_per_user: 32,
        }
    }
}

/// How the agent proves who it is to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthConfig {
    /// The host's tailnet identity: nothing to send, the broker asks tailscaled.
    Tailnet,
    /// `Authorization: Bearer <key>` with the key read from this file (mode 0600 or stricter).
    ApiKeyFile(PathBuf),
    /// A client certificate from the broker's CA (`auth = "mtls"`), kept in this state dir
    /// by `botcreds-agent enroll` and renewed by the agent.
    Mtls(PathBuf),
}

/// One `[[github]]` entry: repositories on one host, one owner, the permissions wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GithubEntry {
    /// `https` (default) or `http` (test servers only: git would send the token in clear).
    pub protocol: String,
    /// Lower-cased host as git names it, with `:port` when not the default.
    pub host: String,
    pub repositories: Vec<RepoPattern>,
    pub permissions: Vec<Permission>,
    pub reason: Option<String>,
    pub refresh_before: Duration,
    /// The least remaining lifetime asked of the broker (`ttl` of the request).
    pub min_ttl: Ttl,
}

/// A repository or a glob over one owner's repositories: `acme/web`, `acme/*`, `acme/svc-?`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoPattern {
    owner: String,
    name: String,
}

/// A credential the agent can ask for: exactly what the broker request names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope {
    pub protocol: String,
    pub host: String,
    /// Sorted, without duplicates.
    pub repositories: Vec<RepoName>,
    /// Sorted, without duplicates.
    pub permissions: Vec<Permission>,
}

/// How the agent answers a git request for a host and maybe a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved<'a> {
    /// No entry for this protocol and host: let git ask the next helper.
    NotServed,
    /// The host is served, but only through repository patterns, and git sent no path.
    NeedsPath,
    /// The path is not `owner/name[.git][/...]`.
    BadPath(String),
    /// The host is served, but no entry covers this repository.
    NoEntry(RepoName),
    /// This entry's scope answers the request.
    Scope {
        scope: Scope,
        entry: &'a GithubEntry,
        per_repository: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    broker: String,
    api_key_file: Option<PathBuf>,
    /// `tailnet` (default), `api_key` (with `api_key_file`) or `mtls`.
    auth: Option<String>,
    /// Where `auth = "mtls"` keeps its key, certificate and CA bundle.
    state_dir: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    socket_group: Option<String>,
    #[serde(default)]
    allow_uids: Vec<u32>,
    #[serde(default)]
    allow_users: Vec<String>,
    #[serde(default)]
    allow_groups: Vec<String>,
    helper_timeout: Option<Ttl>,
    broker_timeout: Option<Ttl>,
    idle_timeout: Option<Ttl>,
    #[serde(default)]
    github: Vec<RawGithub>,
    #[serde(default)]
    litellm: Vec<crate::litellm_config::RawLitellm>,
    tls: Option<RawTls>,
    limits: Option<RawLimits>,
}

/// `[limits]` of agent.toml; every key optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    repository_credentials: Option<usize>,
    repository_credentials_per_user: Option<usize>,
    connections: Option<usize>,
    connections_per_user: Option<usize>,
}

/// `[tls]` of agent.toml: extra roots for the broker's server certificate.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    /// PEM certificates the broker's server certificate may chain to.
    server_ca_file: Option<PathBuf>,
    /// `"enrolled"` (default: only the CA bundle from enrollment) or `"system"`.
    server_roots: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGithub {
    host: Option<String>,
    protocol: Option<String>,
    repositories: Vec<Parsed<RepoPattern>>,
    permissions: Vec<Parsed<Permission>>,
    reason: Option<String>,
    refresh_before: Option<Ttl>,
    min_ttl: Option<Ttl>,
}

/// A value deserialized through its `FromStr`, so toml reports a bad one with its position.
struct Parsed<T>(T);

impl<'de, T> Deserialize<'de> for Parsed<T>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Parsed<T>, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(Parsed).map_err(serde::de::Error::custom)
    }
}

impl Config {
    /// Reads and validates `path`, resolving user and group names through the system databases.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Validates the text of an agent.toml; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            message,
        };

        let broker = validate_broker(&raw.broker).map_err(|m| invalid("broker", m))?;
        let auth = match (raw.auth.as_deref(), raw.api_key_file) {
            (Some("mtls"), Some(_)) => {
                return Err(invalid(
                    "api_key_file",
                    "auth = \"mtls\" uses a client certificate, not an API key".into(),
                ));
            }
            (Some("mtls"), None) => {
                let dir = raw
                    .state_dir
                    .unwrap_or_else(|| crate::tls::DEFAULT_STATE_DIR.into());
                if !dir.is_absolute() {
                    return Err(invalid("state_dir", "must be an absolute path".into()));
                }
                if !broker.starts_with("https://") {
                    return Err(invalid(
                        "broker",
                        "auth = \"mtls\" needs the broker's https:// mTLS listener".into(),
                    ));
                }
                AuthConfig::Mtls(dir)
            }
            (Some("tailnet"), Some(_)) => {
                return Err(invalid(
                    "api_key_file",
                    "auth = \"tailnet\" sends no API key; remove api_key_file".into(),
                ));
            }
            (Some("api_key"), None) => {
                return Err(invalid(
                    "api_key_file",
                    "auth = \"api_key\" needs api_key_file".into(),
                ));
            }
            (Some("api_key") | None, Some(file)) if !file.is_absolute() => {
                return Err(invalid("api_key_file", "must be an absolute path".into()));
            }
            (Some("api_key") | None, Some(file)) => AuthConfig::ApiKeyFile(file),
            (Some("tailnet") | None, None) => AuthConfig::Tailnet,
            (Some(other), _) => {
                return Err(invalid(
                    "auth",
                    format!("{other:?} must be \"tailnet\", \"api_key\" or \"mtls\""),
                ));
            }
        };
        let server_trust = match raw.tls {
            None => crate::tls::ServerTrustConfig::default(),
            Some(tls) => {
                if !matches!(auth, AuthConfig::Mtls(_)) {
                    let key = if tls.server_ca_file.is_some() {
                        "tls.server_ca_file"
                    } else {
                        "tls.server_roots"
                    };
                    return Err(invalid(
                        key,
                        "only used with auth = \"mtls\" (the broker's mTLS listener)".into(),
                    ));
                }
                if let Some(file) = &tls.server_ca_file
                    && !file.is_absolute()
                {
                    return Err(invalid(
                        "tls.server_ca_file",
                        "must be an absolute path".into(),
                    ));
                }
                let system_roots = match tls.server_roots.as_deref() {
                    None | Some("enrolled") => false,
                    Some("system") => true,
                    Some(other) => {
                        return Err(invalid(
                            "tls.server_roots",
                            format!("{other:?} must be \"enrolled\" or \"system\""),
                        ));
                    }
                };
                crate::tls::ServerTrustConfig {
                    ca_file: tls.server_ca_file,
                    system_roots,
                }
            }
        };
        let cache_dir = raw.cache_dir.unwrap_or_else(|| DEFAULT_CACHE_DIR.into());
        if !cache_dir.is_absolute() {
            return Err(invalid("cache_dir", "must be an absolute path".into()));
        }
        let socket = raw
            .socket
            .unwrap_or_else(|| botcreds_proto::agent::DEFAULT_SOCKET.into());
        if !socket.is_absolute() {
            return Err(invalid("socket", "must be an absolute path".into()));
        }
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(invalid(
                "socket",
                format!("a unix socket path must be at most {MAX_SOCKET_PATH} bytes"),
            ));
        }
        let socket_group = match raw.socket_group {
            None => None,
            Some(name) => match lookup_group(&name) {
                Ok(Some(group)) => Some(group.gid),
                Ok(None) => return Err(invalid("socket_group", format!("no such group {name:?}"))),
                Err(e) => return Err(invalid("socket_group", format!("looking up {name:?}: {e}"))),
            },
        };

        let mut uids: BTreeSet<u32> = raw.allow_uids.into_iter().collect();
        for (i, name) in raw.allow_users.iter().enumerate() {
            match lookup_user(name) {
                Ok(Some(uid)) => {
                    uids.insert(uid);
                }
                Ok(None) => {
                    return Err(invalid(
                        &format!("allow_users[{i}]"),
                        format!("no such user {name:?}"),
                    ));
                }
                Err(e) => {
                    return Err(invalid(
                        &format!("allow_users[{i}]"),
                        format!("looking up {name:?}: {e}"),
                    ));
                }
            }
        }
        let mut gids = BTreeSet::new();
        let mut member_uids = BTreeSet::new();
        for (i, name) in raw.allow_groups.iter().enumerate() {
            let key = format!("allow_groups[{i}]");
            let group = match lookup_group(name) {
                Ok(Some(group)) => group,
                Ok(None) => return Err(invalid(&key, format!("no such group {name:?}"))),
                Err(e) => return Err(invalid(&key, format!("looking up {name:?}: {e}"))),
            };
            gids.insert(group.gid);
            for member in &group.members {
                // A member name without a passwd entry cannot connect as anyone; skip it.
                if let Ok(Some(uid)) = lookup_user(member) {
                    member_uids.insert(uid);
                }
            }
        }
        let own_uid = rustix::process::geteuid().as_raw();
        let allow = AllowList::new(own_uid, uids, gids, member_uids);

        let duration = |v: Option<Ttl>, default: Duration| v.map_or(default, Ttl::as_duration);
        let helper_timeout = duration(raw.helper_timeout, DEFAULT_HELPER_TIMEOUT);
        let broker_timeout = duration(raw.broker_timeout, DEFAULT_BROKER_TIMEOUT);
        let idle_timeout = duration(raw.idle_timeout, DEFAULT_IDLE_TIMEOUT);

        let mut github = Vec::with_capacity(raw.github.len());
        for (i, entry) in raw.github.into_iter().enumerate() {
            github.push(
                validate_github(entry)
                    .map_err(|(key, m)| invalid(&format!("github[{i}]{key}"), m))?,
            );
        }

        let litellm = crate::litellm_config::validate_entries(raw.litellm)
            .map_err(|(key, m)| invalid(&key, m))?;

        let limits = match raw.limits {
            None => Limits::default(),
            Some(l) => {
                let d = Limits::default();
                let limits = Limits {
                    repository_credentials: l
                        .repository_credentials
                        .unwrap_or(d.repository_credentials),
                    repository_credentials_per_user: l
                        .repository_credentials_per_user
                        .unwrap_or(d.repository_credentials_per_user),
                    connections: l.connections.unwrap_or(d.connections),
                    connections_per_user: l.connections_per_user.unwrap_or(d.connections_per_user),
                };
                for (key, value) in [
                    (
                        "limits.repository_credentials",
                        limits.repository_credentials,
                    ),
                    (
                        "limits.repository_credentials_per_user",
                        limits.repository_credentials_per_user,
                    ),
                    ("limits.connections", limits.connections),
                    ("limits.connections_per_user", limits.connections_per_user),
                ] {
                    if value == 0 {
                        return Err(invalid(key, "must be at least 1".into()));
                    }
                }
                if limits.repository_credentials_per_user > limits.repository_credentials {
                    return Err(invalid(
                        "limits.repository_credentials_per_user",
                        "must not exceed limits.repository_credentials".into(),
                    ));
                }
                if limits.connections_per_user > limits.connections {
                    return Err(invalid(
                        "limits.connections_per_user",
                        "must not exceed limits.connections".into(),
                    ));
                }
                limits
            }
        };

        Ok(Config {
            broker,
            auth,
            cache_dir,
            socket,
            socket_group,
            allow,
            helper_timeout,
            broker_timeout,
            idle_timeout,
            github,
            litellm,
            server_trust,
            limits,
        })
    }

    /// Which credential answers git's `get` for `protocol://host[/path]`. Entries are tried in
    /// file order; the first that covers the request wins.
    pub fn resolve(&self, protocol: &str, host: &str, path: Option<&str>) -> Resolved<'_> {
        let host = host.to_ascii_lowercase();
        let mut entries = self
            .github
            .iter()
            .filter(|e| e.protocol == protocol && e.host == host)
            .peekable();
        if entries.peek().is_none() {
            return Resolved::NotServed;
        }
        let Some(path) = path.filter(|p| !p.is_empty()) else {
            return entries
                .find_map(|entry| {
                    entry.literal_scope().map(|scope| Resolved::Scope {
                        scope,
                        entry,
                        per_repository: false,
                    })
                })
                .unwrap_or(Resolved::NeedsPath);
        };
        let repo = match repo_from_path(path) {
            Some(repo) => repo,
            None => return Resolved::BadPath(path.to_string()),
        };
        entries
            .find(|entry| entry.repositories.iter().any(|p| p.matches(&repo)))
            .map(|entry| Resolved::Scope {
                scope: Scope::new(
                    &entry.protocol,
                    &entry.host,
                    vec![repo.clone()],
                    entry.permissions.clone(),
                ),
                entry,
                per_repository: true,
            })
            .unwrap_or(Resolved::NoEntry(repo))
    }

    /// The entry a cached credential's scope belongs to under this configuration, if any (a
    /// credential cached under an older configuration may no longer be wanted).
    pub fn entry_for(&self, scope: &Scope) -> Option<(&GithubEntry, bool)> {
        let path = match scope.repositories.as_slice() {
            [repo] => Some(repo.as_str()),
            _ => None,
        };
        let literal = self.github.iter().find(|e| {
            e.protocol == scope.protocol
                && e.host == scope.host
                && e.literal_scope().as_ref() == Some(scope)
        });
        if let Some(entry) = literal {
            return Some((entry, false));
        }
        match self.resolve(&scope.protocol, &scope.host, path) {
            Resolved::Scope {
                scope: s,
                entry,
                per_repository: true,
            } if &s == scope => Some((entry, true)),
            _ => None,
        }
    }
}

impl GithubEntry {
    /// The host-level credential: every literal repository of the entry in one token.
    pub fn literal_scope(&self) -> Option<Scope> {
        let repos: Vec<RepoName> = self
            .repositories
            .iter()
            .filter_map(RepoPattern::literal)
            .collect();
        if repos.is_empty() {
            return None;
        }
        Some(Scope::new(
            &self.protocol,
            &self.host,
            repos,
            self.permissions.clone(),
        ))
    }
}

fn validate_broker(url: &str) -> Result<String, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("{url:?} must be an http:// or https:// URL"));
    }
    if parsed.host_str().is_none() {
        return Err(format!("{url:?} has no host"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!("{url:?} must not have a query or fragment"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("must not carry credentials; use api_key_file".into());
    }
    Ok(parsed.as_str().trim_end_matches('/').to_string())
}

fn validate_github(raw: RawGithub) -> Result<GithubEntry, (String, String)> {
    let err = |key: &str, m: String| (key.to_string(), m);
    let protocol = raw.protocol.unwrap_or_else(|| "https".into());
    if !matches!(protocol.as_str(), "https" | "http") {
        return Err(err(
            ".protocol",
            format!("{protocol:?} must be \"https\" (or \"http\" for test servers)"),
        ));
    }
    let host = raw
        .host
        .unwrap_or_else(|| "github.com".into())
        .to_ascii_lowercase();
    if !valid_host(&host) {
        return Err(err(
            ".host",
            format!("{host:?} is not a host name with an optional :port (no scheme, no path)"),
        ));
    }
    if raw.repositories.is_empty() {
        return Err(err(".repositories", "names no repository".into()));
    }
    let repositories: Vec<RepoPattern> = raw.repositories.into_iter().map(|p| p.0).collect();
    let owner = &repositories[0].owner;
    if let Some(other) = repositories.iter().find(|p| &p.owner != owner) {
        return Err(err(
            ".repositories",
            format!(
                "{}/{} and {}/{} have different owners; one token covers one owner's repositories, \
                 so use one [[github]] entry per owner",
                owner, repositories[0].name, other.owner, other.name
            ),
        ));
    }
    if raw.permissions.is_empty() {
        return Err(err(
            ".permissions",
            "names no permission (e.g. \"contents:read\")".into(),
        ));
    }
    let mut permissions: Vec<Permission> = raw.permissions.into_iter().map(|p| p.0).collect();
    permissions.sort();
    permissions.dedup();
    if let Some(reason) = &raw.reason
        && (reason.len() > MAX_REASON_BYTES || reason.chars().any(char::is_control))
    {
        return Err(err(
            ".reason",
            format!("must be at most {MAX_REASON_BYTES} bytes without control characters"),
        ));
    }
    let refresh_before = raw
        .refresh_before
        .map_or(DEFAULT_REFRESH_BEFORE, Ttl::as_duration);
    if refresh_before >= GITHUB_TOKEN_LIFETIME {
        return Err(err(
            ".refresh_before",
            format!(
                "{} must be shorter than a GitHub token's 1h lifetime",
                Ttl::from_secs(refresh_before.as_secs())
            ),
        ));
    }
    let min_ttl = raw.min_ttl.unwrap_or_else(|| {
        Ttl::from_secs(
            (refresh_before + MIN_TTL_MARGIN)
                .min(GITHUB_TOKEN_LIFETIME)
                .as_secs(),
        )
    });
    if min_ttl.as_duration() <= refresh_before {
        return Err(err(
            ".min_ttl",
            format!(
                "{min_ttl} must be longer than refresh_before ({}), or every fresh token would be due \
                 for refresh at once",
                Ttl::from_secs(refresh_before.as_secs())
            ),
        ));
    }
    if min_ttl.as_duration() > GITHUB_TOKEN_LIFETIME {
        return Err(err(
            ".min_ttl",
            format!("{min_ttl} is longer than a GitHub token's 1h lifetime"),
        ));
    }
    Ok(GithubEntry {
        protocol,
        host,
        repositories,
        permissions,
        reason: raw.reason,
        refresh_before,
        min_ttl,
    })
}

/// A DNS name or IP address, optionally with `:port`, as git passes `host=`.
fn valid_host(host: &str) -> bool {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        let Some((addr, after)) = rest.split_once(']') else {
            return false;
        };
        if addr.is_empty()
            || !addr
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        {
            return false;
        }
        match after {
            "" => return true,
            _ => match after.strip_prefix(':') {
                Some(port) => ("x", Some(port)),
                None => return false,
            },
        }
    } else {
        match host.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    let name_ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.parse::<u16>().is_ok_and(|n| n > 0));
    name_ok && port_ok
}

/// `owner/name[.git][/more]` → the repository; git's `path` for an LFS endpoint carries a suffix.
pub fn repo_from_path(path: &str) -> Option<RepoName> {
    let mut parts = path.trim_matches('/').split('/');
    let owner = parts.next()?;
    let name = parts.next()?;
    format!("{owner}/{name}").parse().ok()
}

impl RepoPattern {
    /// The repository itself when the pattern has no wildcard.
    pub fn literal(&self) -> Option<RepoName> {
        if self.name.contains(['*', '?']) {
            return None;
        }
        format!("{}/{}", self.owner, self.name).parse().ok()
    }

    pub fn matches(&self, repo: &RepoName) -> bool {
        repo.owner() == self.owner && glob_match(self.name.as_bytes(), repo.name().as_bytes())
    }
}

impl std::fmt::Display for RepoPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.owner, self.name)
    }
}

impl FromStr for RepoPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<RepoPattern, String> {
        let shape = || {
            format!(
                "repository {s:?} is not of the form owner/name (globs allowed in the name: owner/*)"
            )
        };
        let (owner, name) = s.split_once('/').ok_or_else(shape)?;
        if name.contains('/') || name.is_empty() {
            return Err(shape());
        }
        if !valid_owner(owner) {
            return Err(format!(
                "repository {s:?}: {owner:?} is not a GitHub account name (no wildcards in the owner: \
                 one token covers one owner)"
            ));
        }
        let name = name
            .strip_suffix(".git")
            .unwrap_or(name)
            .to_ascii_lowercase();
        let without_globs = name.replace(['*', '?'], "x");
        if !valid_repo_name(&without_globs) {
            return Err(format!(
                "repository {s:?}: {name:?} is not a GitHub repository name or glob"
            ));
        }
        Ok(RepoPattern {
            owner: owner.to_ascii_lowercase(),
            name,
        })
    }
}

/// `*` matches any run of characters, `?` exactly one; everything else literally.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

impl Scope {
    pub fn new(
        protocol: &str,
        host: &str,
        mut repositories: Vec<RepoName>,
        mut permissions: Vec<Permission>,
    ) -> Scope {
        repositories.sort();
        repositories.dedup();
        permissions.sort();
        permissions.dedup();
        Scope {
            protocol: protocol.to_string(),
            host: host.to_ascii_lowercase(),
            repositories,
            permissions,
        }
    }

    /// A canonical one-line form, e.g. `https://github.com acme/a,acme/b contents:write`.
    pub fn canonical(&self) -> String {
        let repos: Vec<&str> = self.repositories.iter().map(RepoName::as_str).collect();
        let perms: Vec<String> = self.permissions.iter().map(Permission::to_string).collect();
        format!(
            "{}://{} {} {}",
            self.protocol,
            self.host,
            repos.join(","),
            perms.join(",")
        )
    }

    /// The cache file for this scope: a hash, so names reveal nothing and never collide in
    /// practice.
    pub fn cache_file_name(&self) -> String {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.canonical().as_bytes());
        format!("{}.json", hex::encode(&digest[..16]))
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.canonical())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("agent.toml")).map_err(|e| e.to_string())
    }

    const MINIMAL: &str = r#"
broker = "http://broker.example.ts.net:8080/"
[[github]]
repositories = ["Acme/web", "acme/svc-*"]
permissions = ["contents:write"]
"#;

    #[test]
    fn defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.broker, "http://broker.example.ts.net:8080");
        assert_eq!(c.auth, AuthConfig::Tailnet);
        assert_eq!(c.socket, Path::new("/run/botcreds/agent.sock"));
        assert_eq!(c.cache_dir, Path::new(DEFAULT_CACHE_DIR));
        assert_eq!(c.helper_timeout, Duration::from_secs(8));
        let g = &c.github[0];
        assert_eq!(
            (g.protocol.as_str(), g.host.as_str()),
            ("https", "github.com")
        );
        assert_eq!(g.refresh_before, Duration::from_secs(2400));
        assert_eq!(g.min_ttl.as_secs(), 2700);
        assert_eq!(g.repositories[0].to_string(), "acme/web");
    }

    #[test]
    fn full_config() {
        let c = parse(
            r#"
broker = "https://broker.example.ts.net"
api_key_file = "/etc/botcreds/agent.key"
cache_dir = "/var/lib/botcreds-agent"
socket = "/tmp/agent.sock"
socket_group = "root"
allow_uids = [1000, 1001]
allow_users = ["root"]
allow_groups = ["root"]
helper_timeout = "5s"
broker_timeout = "20s"
idle_timeout = "2h"

[[github]]
host = "GHE.example.com:8443"
protocol = "https"
repositories = ["acme/web"]
permissions = ["contents:read", "issues:write", "contents:read"]
reason = "CI bot"
refresh_before = "30m"
min_ttl = "50m"
"#,
        )
        .unwrap();
        assert_eq!(
            c.auth,
            AuthConfig::ApiKeyFile("/etc/botcreds/agent.key".into())
        );
        assert_eq!(c.socket_group, Some(0));
        assert!(c.allow.allows(1001, 5000));
        assert!(!c.allow.allows(1002, 5000));
        assert!(
            c.allow.allows(1002, 0),
            "allow_groups = [root] admits gid 0"
        );
        let g = &c.github[0];
        assert_eq!(g.host, "ghe.example.com:8443");
        assert_eq!(g.permissions.len(), 2, "duplicates dropped");
        assert_eq!(
            (g.refresh_before.as_secs(), g.min_ttl.as_secs()),
            (1800, 3000)
        );
    }

    #[test]
    fn limits_keys() {
        assert_eq!(parse(MINIMAL).unwrap().limits, Limits::default());
        let c = parse(&format!(
            "{MINIMAL}\n[limits]\nrepository_credentials = 50\nrepository_credentials_per_user = 5\nconnections = 20\nconnections_per_user = 4\n"
        ))
        .unwrap();
        assert_eq!(
            c.limits,
            Limits {
                repository_credentials: 50,
                repository_credentials_per_user: 5,
                connections: 20,
                connections_per_user: 4
            }
        );
        for (extra, want) in [
            ("connections = 0", "limits.connections: must be at least 1"),
            (
                "repository_credentials = 2\nrepository_credentials_per_user = 3",
                "limits.repository_credentials_per_user: must not exceed",
            ),
            (
                "connections_per_user = 999",
                "limits.connections_per_user: must not exceed",
            ),
            ("slots = 3", "unknown field `slots`"),
        ] {
            let err = parse(&format!("broker = \"http://b\"\n[limits]\n{extra}\n")).unwrap_err();
            assert!(err.contains(want), "{extra}: {err}");
        }
    }

    #[test]
    fn tls_server_trust_keys() {
        let c = parse("broker = \"https://b\"\nauth = \"mtls\"\n").unwrap();
        assert_eq!(c.server_trust, crate::tls::ServerTrustConfig::default());
        let c = parse(
            "broker = \"https://b\"\nauth = \"mtls\"\n[tls]\nserver_ca_file = \"/etc/le.pem\"\n\
             server_roots = \"system\"\n",
        )
        .unwrap();
        assert_eq!(
            c.server_trust,
            crate::tls::ServerTrustConfig {
                ca_file: Some("/etc/le.pem".into()),
                system_roots: true
            }
        );
        let c =
            parse("broker = \"https://b\"\nauth = \"mtls\"\n[tls]\nserver_roots = \"enrolled\"\n")
                .unwrap();
        assert!(!c.server_trust.system_roots);
        for (text, want) in [
            (
                "broker = \"https://b\"\nauth = \"mtls\"\n[tls]\nserver_ca_file = \"rel.pem\"\n",
                "tls.server_ca_file: must be an absolute path",
            ),
            (
                "broker = \"https://b\"\nauth = \"mtls\"\n[tls]\nserver_roots = \"webpki\"\n",
                "tls.server_roots: \"webpki\" must be",
            ),
            (
                "broker = \"https://b\"\n[tls]\nserver_ca_file = \"/x.pem\"\n",
                "tls.server_ca_file: only used with auth = \"mtls\"",
            ),
            (
                "broker = \"https://b\"\nauth = \"mtls\"\n[tls]\nserver_ca = \"/x.pem\"\n",
                "server_ca",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
    }

    #[test]
    fn mtls_auth_uses_the_state_dir() {
        let c = parse("broker = \"https://b:8444\"\nauth = \"mtls\"\n").unwrap();
        assert_eq!(
            c.auth,
            AuthConfig::Mtls(crate::tls::DEFAULT_STATE_DIR.into())
        );
        let c = parse("broker = \"https://b\"\nauth = \"mtls\"\nstate_dir = \"/s\"\n").unwrap();
        assert_eq!(c.auth, AuthConfig::Mtls("/s".into()));
    }

    #[test]
    fn errors_name_the_key() {
        let with_entry = |entry: &str| format!("broker = \"http://b\"\n[[github]]\n{entry}\n");
        let cases: Vec<(String, &str)> = vec![
            (
                "broker = \"http://b\"\nsockt = \"/x\"\n".into(),
                "unknown field `sockt`",
            ),
            ("socket = \"/x\"\n".into(), "missing field `broker`"),
            (
                "broker = \"http://b\"\nauth = \"mtls\"\n".into(),
                "broker: auth = \"mtls\" needs the broker's https://",
            ),
            (
                "broker = \"https://b\"\nauth = \"mtls\"\nstate_dir = \"rel\"\n".into(),
                "state_dir: must be an absolute path",
            ),
            (
                "broker = \"https://b\"\nauth = \"mtls\"\napi_key_file = \"/k\"\n".into(),
                "api_key_file: auth = \"mtls\" uses a client certificate",
            ),
            (
                "broker = \"https://b\"\nauth = \"x509\"\n".into(),
                "auth: \"x509\" must be",
            ),
            (
                "broker = \"ftp://b\"\n".into(),
                "broker: \"ftp://b\" must be an http",
            ),
            (
                "broker = \"not a url\"\n".into(),
                "broker: \"not a url\" is not a URL",
            ),
            (
                "broker = \"http://u:p@b\"\n".into(),
                "broker: must not carry credentials",
            ),
            (
                "broker = \"http://b\"\nsocket = \"rel.sock\"\n".into(),
                "socket: must be an absolute path",
            ),
            (
                format!("broker = \"http://b\"\nsocket = \"/{}\"\n", "s".repeat(120)),
                "socket: a unix socket path",
            ),
            (
                "broker = \"http://b\"\ncache_dir = \"cache\"\n".into(),
                "cache_dir: must be an absolute path",
            ),
            (
                "broker = \"http://b\"\napi_key_file = \"k\"\n".into(),
                "api_key_file: must be an absolute path",
            ),
            (
                "broker = \"http://b\"\nhelper_timeout = \"soon\"\n".into(),
                "duration \"soon\"",
            ),
            (
                "broker = \"http://b\"\nallow_uids = [-1]\n".into(),
                "allow_uids",
            ),
            (
                "broker = \"http://b\"\nallow_users = [\"no-such-user-xyz\"]\n".into(),
                "allow_users[0]: no such user",
            ),
            (
                "broker = \"http://b\"\nallow_groups = [\"no-such-group-xyz\"]\n".into(),
                "allow_groups[0]: no such group",
            ),
            (
                "broker = \"http://b\"\nsocket_group = \"no-such-group-xyz\"\n".into(),
                "socket_group: no such group",
            ),
            (
                with_entry("repositories = [\"myorg\"]\npermissions = [\"contents:read\"]"),
                "not of the form owner/name",
            ),
            (
                with_entry("repositories = [\"a/b/c\"]\npermissions = [\"contents:read\"]"),
                "not of the form owner/name",
            ),
            (
                with_entry("repositories = [\"*/web\"]\npermissions = [\"contents:read\"]"),
                "no wildcards in the owner",
            ),
            (
                with_entry("repositories = [\"a/we b\"]\npermissions = [\"contents:read\"]"),
                "not a GitHub repository name",
            ),
            (
                with_entry("repositories = []\npermissions = [\"contents:read\"]"),
                "github[0].repositories: names no repository",
            ),
            (
                with_entry("repositories = [\"a/x\", \"b/y\"]\npermissions = [\"contents:read\"]"),
                "different owners",
            ),
            (
                with_entry("repositories = [\"a/x\"]\npermissions = []"),
                "github[0].permissions: names no permission",
            ),
            (
                with_entry("repositories = [\"a/x\"]\npermissions = [\"contents:wrte\"]"),
                "unknown level",
            ),
            (
                with_entry("repositories = [\"a/x\"]\npermissions = [\"content:read\"]"),
                "unknown permission",
            ),
            (
                with_entry(
                    "repositories = [\"a/x\"]\npermissions = [\"contents:read\"]\nhost = \"https://github.com\"",
                ),
                "github[0].host",
            ),
            (
                with_entry(
                    "repositories = [\"a/x\"]\npermissions = [\"contents:read\"]\nhost = \"h:99999\"",
                ),
                "github[0].host",
            ),
            (
                with_entry(
                    "repositories = [\"a/x\"]\npermissions = [\"contents:read\"]\nprotocol = \"ssh\"",
                ),
                "github[0].protocol",
            ),
            (
                with_entry(
                    "repositories = [\"a/x\"]\npermissions = [\"contents:read\"]\nreason = \"a\\nb\"",
                ),
                "github[0].reason",
            ),
            (
                with_entry(
                    "repositories = [\"a/x\"]\npermissions = [\"contents:read\"]\nrefresh_before = \"1h\"",
                ),
                "github[0].refresh_before",
            ),
            (
                with_entry(
                    "repositories = [\"a/x\"]\npermissions = [\"contents:read\"]\nmin_ttl = \"30m\"",
                ),
                "github[0].min_ttl: 30m must be longer than refresh_before",
            ),
            (
                with_entry(
                    "repositories = [\"a/x\"]\npermissions = [\"contents:read\"]\nmin_ttl = \"2h\"",
                ),
                "github[0].min_ttl: 2h is longer",
            ),
            (
                with_entry(
                    "repositories = [\"a/x\"]\npermissions = [\"contents:read\"]\ncolour = 1",
                ),
                "unknown field `colour`",
            ),
        ];
        for (text, want) in cases {
            match parse(&text) {
                Ok(_) => panic!("accepted:\n{text}"),
                Err(e) => assert!(e.contains(want), "{text}\n=> {e}\nwant {want:?}"),
            }
        }
    }

    #[test]
    fn resolves_requests_to_scopes() {
        let c = parse(
            r#"
broker = "http://b"
[[github]]
repositories = ["acme/svc-*"]
permissions = ["contents:read"]
[[github]]
repositories = ["acme/web", "acme/*"]
permissions = ["contents:write"]
[[github]]
host = "127.0.0.1:9000"
protocol = "http"
repositories = ["test/repo"]
permissions = ["contents:read"]
"#,
        )
        .unwrap();
        let scope = |r: Resolved<'_>| match r {
            Resolved::Scope {
                scope,
                per_repository,
                ..
            } => format!("{scope} per_repo={per_repository}"),
            other => format!("{other:?}"),
        };
        let cases = [
            ("https", "gitlab.com", None, "NotServed"),
            ("http", "github.com", None, "NotServed"),
            (
                "https",
                "github.com",
                None,
                "https://github.com acme/web contents:write per_repo=false",
            ),
            (
                "https",
                "GitHub.com",
                Some(""),
                "https://github.com acme/web contents:write per_repo=false",
            ),
            (
                "https",
                "github.com",
                Some("acme/svc-a.git"),
                "https://github.com acme/svc-a contents:read per_repo=true",
            ),
            (
                "https",
                "github.com",
                Some("Acme/Other"),
                "https://github.com acme/other contents:write per_repo=true",
            ),
            (
                "https",
                "github.com",
                Some("acme/web.git/info/lfs"),
                "https://github.com acme/web contents:write per_repo=true",
            ),
            (
                "https",
                "github.com",
                Some("evil/web.git"),
                "NoEntry(RepoName { full: \"evil/web\", slash: 4 })",
            ),
            (
                "https",
                "github.com",
                Some("justone"),
                "BadPath(\"justone\")",
            ),
            (
                "http",
                "127.0.0.1:9000",
                Some("test/repo.git"),
                "http://127.0.0.1:9000 test/repo contents:read per_repo=true",
            ),
        ];
        for (protocol, host, path, want) in cases {
            assert_eq!(
                scope(c.resolve(protocol, host, path)),
                want,
                "{protocol}://{host} {path:?}"
            );
        }
        let only_globs = parse(
            "broker = \"http://b\"\n[[github]]\nrepositories = [\"acme/*\"]\npermissions = [\"contents:read\"]\n",
        )
        .unwrap();
        assert_eq!(
            only_globs.resolve("https", "github.com", None),
            Resolved::NeedsPath
        );
    }

    #[test]
    fn cached_scopes_map_back_to_entries() {
        let c = parse(MINIMAL).unwrap();
        let repo = |s: &str| s.parse::<RepoName>().unwrap();
        let perms = vec!["contents:write".parse::<Permission>().unwrap()];
        let literal = Scope::new("https", "github.com", vec![repo("acme/web")], perms.clone());
        assert_eq!(
            c.entry_for(&literal).map(|(_, per_repo)| per_repo),
            Some(false)
        );
        let per_repo = Scope::new(
            "https",
            "github.com",
            vec![repo("acme/svc-x")],
            perms.clone(),
        );
        assert_eq!(
            c.entry_for(&per_repo).map(|(_, per_repo)| per_repo),
            Some(true)
        );
        let gone = Scope::new("https", "github.com", vec![repo("acme/other")], perms);
        assert!(c.entry_for(&gone).is_none(), "no longer configured");
        let read = Scope::new(
            "https",
            "github.com",
            vec![repo("acme/web")],
            vec!["contents:read".parse().unwrap()],
        );
        assert!(c.entry_for(&read).is_none(), "permissions changed");
    }

    #[test]
    fn globs() {
        for (pattern, text, want) in [
            ("*", "anything", true),
            ("svc-*", "svc-a", true),
            ("svc-*", "svc-", true),
            ("svc-*", "svc", false),
            ("*-api", "billing-api", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("svc-?", "svc-1", true),
            ("svc-?", "svc-12", false),
            ("web", "web", true),
            ("web", "web2", false),
        ] {
            assert_eq!(
                glob_match(pattern.as_bytes(), text.as_bytes()),
                want,
                "{pattern} ~ {text}"
            );
        }
    }

    #[test]
    fn cache_file_names_are_stable_and_distinct() {
        let repo = |s: &str| s.parse::<RepoName>().unwrap();
        let perms = vec!["contents:read".parse::<Permission>().unwrap()];
        let a = Scope::new(
            "https",
            "github.com",
            vec![repo("a/x"), repo("a/y")],
            perms.clone(),
        );
        let b = Scope::new(
            "https",
            "github.com",
            vec![repo("a/y"), repo("a/x")],
            perms.clone(),
        );
        let c = Scope::new("https", "github.com", vec![repo("a/x")], perms);
        assert_eq!(a.cache_file_name(), b.cache_file_name());
        assert_ne!(a.cache_file_name(), c.cache_file_name());
        assert_eq!(a.cache_file_name().len(), 32 + 5);
    }
}
