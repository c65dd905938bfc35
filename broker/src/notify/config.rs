//! `[notify]` in broker.toml: signed webhooks, a Slack-compatible incoming webhook and retry
//! settings. Parsed strictly and validated once at startup; secrets come from mode-checked
//! files or the environment. Links in messages point at `[web] public_url`, which
//! `config.rs` hands in (the web pages own `[web]`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use botcreds_proto::Ttl;
use botcreds_proto::audit::AuditEventKind;
use serde::Deserialize;

use super::retry::RetryPolicy;
use crate::secret::Secret;
use crate::settings::{Env, Invalid, read_secret_file};

/// The approval events a notification can be sent for, in their wire names.
pub const EVENTS: [AuditEventKind; 4] = [
    AuditEventKind::ApprovalRequested,
    AuditEventKind::ApprovalGranted,
    AuditEventKind::ApprovalDenied,
    AuditEventKind::ApprovalExpired,
];

/// Shortest webhook secret accepted: a guessable secret makes the signature worthless.
const MIN_SECRET_BYTES: usize = 16;
const MAX_ATTEMPTS_LIMIT: u32 = 20;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawNotify {
    #[serde(default)]
    webhooks: Vec<RawWebhook>,
    slack: Option<RawSlack>,
    max_attempts: Option<u32>,
    retry_initial: Option<Ttl>,
    retry_max: Option<Ttl>,
    timeout: Option<Ttl>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    name: Option<String>,
    url: String,
    secret_file: Option<PathBuf>,
    secret_env: Option<String>,
    events: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlack {
    webhook_url_file: Option<PathBuf>,
    webhook_url_env: Option<String>,
    events: Option<Vec<String>>,
}

/// `[notify]`, validated.
#[derive(Debug, Clone, Default)]
pub struct NotifyConfig {
    pub webhooks: Vec<WebhookTarget>,
    pub slack: Option<SlackTarget>,
    pub retry: RetryPolicy,
    /// Per attempt, connection and answer included.
    pub timeout: Duration,
    /// `[web] public_url`: where links to the approval page point, when configured.
    pub public_url: Option<String>,
}

impl NotifyConfig {
    pub fn is_empty(&self) -> bool {
        self.webhooks.is_empty() && self.slack.is_none()
    }

    /// `{public_url}/approvals/{id}`, when a public URL is configured.
    pub fn approval_url(&self, request_id: &str) -> Option<String> {
        self.public_url
            .as_ref()
            .map(|base| format!("{base}/approvals/{request_id}"))
    }
}

/// One signed webhook.
#[derive(Clone)]
pub struct WebhookTarget {
    /// In logs and metrics (`webhooks[0]` unless named); the URL is not logged, as it may
    /// carry a token.
    pub name: String,
    pub url: String,
    pub secret: Secret,
    pub events: Vec<AuditEventKind>,
}

impl std::fmt::Debug for WebhookTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookTarget")
            .field("name", &self.name)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

/// The Slack-compatible incoming webhook; its URL is a secret (it is the credential).
#[derive(Debug, Clone)]
pub struct SlackTarget {
    pub url: Secret,
    pub events: Vec<AuditEventKind>,
}

impl NotifyConfig {
    /// Validate `[notify]`; `public_url` (`[web] public_url`) is where links point, if
    /// anywhere; `resolve` makes config paths absolute.
    pub fn from_raw(
        raw: RawNotify,
        public_url: Option<&str>,
        resolve: &dyn Fn(&Path) -> PathBuf,
        env: &dyn Env,
    ) -> Result<NotifyConfig, Invalid> {
        let defaults = RetryPolicy::default();
        let max_attempts = raw.max_attempts.unwrap_or(defaults.max_attempts);
        if max_attempts == 0 || max_attempts > MAX_ATTEMPTS_LIMIT {
            return Err(Invalid::new(
                "notify.max_attempts",
                format!("must be between 1 and {MAX_ATTEMPTS_LIMIT}"),
            ));
        }
        let initial = raw
            .retry_initial
            .map(Ttl::as_duration)
            .unwrap_or(defaults.initial);
        let max = raw.retry_max.map(Ttl::as_duration).unwrap_or(defaults.max);
        if max < initial {
            return Err(Invalid::new(
                "notify.retry_max",
                "must not be shorter than notify.retry_initial",
            ));
        }
        if max > Duration::from_secs(3600) {
            return Err(Invalid::new("notify.retry_max", "must be at most 1h"));
        }
        let timeout = raw
            .timeout
            .map(Ttl::as_duration)
            .unwrap_or(Duration::from_secs(10));
        if timeout > Duration::from_secs(120) {
            return Err(Invalid::new("notify.timeout", "must be at most 2m"));
        }

        let mut webhooks = Vec::new();
        for (i, w) in raw.webhooks.into_iter().enumerate() {
            let key = |field: &str| format!("notify.webhooks[{i}].{field}");
            let url = check_target_url(&w.url).map_err(|m| Invalid::new(key("url"), m))?;
            let name = match w.name {
                Some(n) if !n.trim().is_empty() && n.len() <= 64 && n.chars().all(is_name_char) => {
                    n
                }
                Some(n) => {
                    return Err(Invalid::new(
                        key("name"),
                        format!("{n:?} must be 1-64 letters, digits, '-', '_' or '.'"),
                    ));
                }
                None => format!("webhooks[{i}]"),
            };
            if webhooks.iter().any(|t: &WebhookTarget| t.name == name) {
                return Err(Invalid::new(key("name"), format!("{name:?} is used twice")));
            }
            let secret = match (&w.secret_file, &w.secret_env) {
                (Some(file), None) => read_secret_file(&resolve(file))
                    .map_err(|m| Invalid::new(key("secret_file"), m))?,
                (None, Some(var)) => Secret::new(env.var(var).ok_or_else(|| {
                    Invalid::new(
                        key("secret_env"),
                        format!("environment variable {var} is not set"),
                    )
                })?),
                _ => {
                    return Err(Invalid::new(
                        key("secret_file"),
                        "give exactly one of secret_file, secret_env (webhooks are always signed)",
                    ));
                }
            };
            // Files usually end with a newline that is not part of the secret.
            let secret = Secret::new(secret.expose().trim());
            if secret.expose().len() < MIN_SECRET_BYTES {
                return Err(Invalid::new(
                    key(if w.secret_file.is_some() {
                        "secret_file"
                    } else {
                        "secret_env"
                    }),
                    format!("the secret must be at least {MIN_SECRET_BYTES} bytes"),
                ));
            }
            let events =
                parse_events(w.events.as_deref()).map_err(|m| Invalid::new(key("events"), m))?;
            webhooks.push(WebhookTarget {
                name,
                url,
                secret,
                events,
            });
        }

        let slack = match raw.slack {
            None => None,
            Some(s) => {
                let url = match (&s.webhook_url_file, &s.webhook_url_env) {
                    (Some(file), None) => read_secret_file(&resolve(file))
                        .map_err(|m| Invalid::new("notify.slack.webhook_url_file", m))?,
                    (None, Some(var)) => Secret::new(env.var(var).ok_or_else(|| {
                        Invalid::new(
                            "notify.slack.webhook_url_env",
                            format!("environment variable {var} is not set"),
                        )
                    })?),
                    _ => {
                        return Err(Invalid::new(
                            "notify.slack.webhook_url_file",
                            "give exactly one of webhook_url_file, webhook_url_env",
                        ));
                    }
                };
                let url = Secret::new(url.expose().trim());
                // The URL is the credential: the error must not repeat it.
                if check_target_url(url.expose()).is_err() {
                    return Err(Invalid::new(
                        "notify.slack",
                        "the webhook URL is not an http(s) URL",
                    ));
                }
                if public_url.is_none() {
                    return Err(Invalid::new(
                        "notify.slack",
                        "the message's buttons link to the approval page: set [web] public_url",
                    ));
                }
                let events = parse_events(s.events.as_deref())
                    .map_err(|m| Invalid::new("notify.slack.events", m))?;
                Some(SlackTarget { url, events })
            }
        };

        Ok(NotifyConfig {
            webhooks,
            slack,
            retry: RetryPolicy {
                max_attempts,
                initial,
                max,
            },
            timeout,
            public_url: public_url.map(str::to_string),
        })
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

fn check_target_url(url: &str) -> Result<String, String> {
    let url = url.trim();
    let ok = (url.starts_with("https://") || url.starts_with("http://"))
        && url.len() > "https://".len()
        && !url.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(url.to_string())
    } else {
        Err("is not an http(s) URL".into())
    }
}

fn parse_events(names: Option<&[String]>) -> Result<Vec<AuditEventKind>, String> {
    let Some(names) = names else {
        return Ok(EVENTS.to_vec());
    };
    if names.is_empty() {
        return Err("name at least one event (or leave `events` out for all)".into());
    }
    let mut out = Vec::new();
    for name in names {
        let kind = EVENTS.iter().find(|k| k.as_str() == name).ok_or_else(|| {
            format!(
                "{name:?} is not one of approval_requested, approval_granted, \
                     approval_denied, approval_expired"
            )
        })?;
        if !out.contains(kind) {
            out.push(*kind);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    use crate::settings::test_env;
    use crate::web::config::{RawWeb, WebConfig};

    fn parse(toml_text: &str, env: &[(&str, &str)], base: &Path) -> Result<NotifyConfig, Invalid> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Doc {
            #[serde(default)]
            notify: RawNotify,
            #[serde(default)]
            web: RawWeb,
        }
        let doc: Doc =
            toml::from_str(toml_text).map_err(|e| Invalid::new("toml", e.to_string()))?;
        let web = WebConfig::from_raw(doc.web)?;
        let env = test_env::env(env);
        let base = base.to_path_buf();
        NotifyConfig::from_raw(
            doc.notify,
            web.public_url.as_deref(),
            &|p: &Path| base.join(p),
            &env,
        )
    }

    const SECRET: &str = "0123456789abcdef0123";

    #[test]
    fn a_full_config() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hook.secret");
        std::fs::write(&file, format!("{SECRET}\n")).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = parse(
            r#"
[web]
public_url = "https://creds.example.ts.net:8443/"
[notify]
max_attempts = 3
retry_initial = "2s"
[[notify.webhooks]]
name = "ops"
url = "https://hooks.example.com/x"
secret_file = "hook.secret"
events = ["approval_requested", "approval_granted"]
[[notify.webhooks]]
url = "http://100.64.0.9:9000/hook"
secret_env = "HOOK2"
[notify.slack]
webhook_url_env = "SLACK"
"#,
            &[
                ("HOOK2", SECRET),
                ("SLACK", "https://hooks.slack.com/services/T0/B0/xyz"),
            ],
            dir.path(),
        )
        .unwrap();
        assert_eq!(c.webhooks.len(), 2);
        assert_eq!(c.webhooks[0].name, "ops");
        assert_eq!(c.webhooks[0].secret.expose(), SECRET);
        assert_eq!(c.webhooks[0].events.len(), 2);
        assert_eq!(c.webhooks[1].name, "webhooks[1]");
        assert_eq!(c.webhooks[1].events, EVENTS.to_vec());
        assert_eq!(c.retry.max_attempts, 3);
        assert_eq!(c.retry.initial, Duration::from_secs(2));
        let slack = c.slack.unwrap();
        assert!(slack.url.expose().starts_with("https://hooks.slack.com/"));
        // Neither the secret nor the Slack URL shows in Debug.
        let debug = format!("{:?} {:?}", c.webhooks, slack);
        assert!(!debug.contains(SECRET) && !debug.contains("xyz"), "{debug}");
    }

    #[test]
    fn errors_name_the_key_and_never_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let loose = dir.path().join("loose.secret");
        std::fs::write(&loose, SECRET).unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
        let hook = "[[notify.webhooks]]\nurl = \"https://h.example/x\"\n";
        let cases = [
            (hook.to_string(), "notify.webhooks[0].secret_file"),
            (
                format!("{hook}secret_env = \"S\"\nsecret_file = \"f\"\n"),
                "notify.webhooks[0].secret_file",
            ),
            (
                format!("{hook}secret_env = \"NOPE\"\n"),
                "notify.webhooks[0].secret_env",
            ),
            (
                format!("{hook}secret_env = \"SHORT\"\n"),
                "notify.webhooks[0].secret_env",
            ),
            (
                format!("{hook}secret_file = \"loose.secret\"\n"),
                "notify.webhooks[0].secret_file",
            ),
            (
                "[[notify.webhooks]]\nurl = \"ftp://x\"\nsecret_env = \"S\"\n".into(),
                "notify.webhooks[0].url",
            ),
            (
                format!("{hook}secret_env = \"S\"\nevents = [\"credential_issued\"]\n"),
                "notify.webhooks[0].events",
            ),
            (
                format!("{hook}secret_env = \"S\"\nevents = []\n"),
                "notify.webhooks[0].events",
            ),
            (
                format!("{hook}secret_env = \"S\"\nname = \"a b\"\n"),
                "notify.webhooks[0].name",
            ),
            (format!("{hook}secret_env = \"S\"\ncolour = 1\n"), "colour"),
            ("[notify]\nmax_attempts = 0\n".into(), "notify.max_attempts"),
            (
                "[notify]\nretry_initial = \"1m\"\nretry_max = \"10s\"\n".into(),
                "notify.retry_max",
            ),
            (
                "[notify.slack]\nwebhook_url_env = \"SLACK\"\n".into(),
                "set [web] public_url",
            ),
            (
                "[web]\npublic_url = \"https://x\"\n[notify.slack]\nwebhook_url_env = \"BADURL\"\n"
                    .into(),
                "notify.slack",
            ),
            (
                "[web]\npublic_url = \"creds:8443\"\n".into(),
                "web.public_url",
            ),
            (
                "[web]\nhosts = [\"https://creds.example.com\"]\n".into(),
                "web.hosts[0]",
            ),
            (
                "[web]\npublic_url = \"https://x/?a=1\"\n".into(),
                "web.public_url",
            ),
            (
                "[web]\npublic_url = \"https://x/botcreds\"\n".into(),
                "web.public_url",
            ),
        ];
        for (text, want) in cases {
            let Invalid { key, message } = parse(
                &text,
                &[
                    ("S", SECRET),
                    ("SHORT", "abc"),
                    ("SLACK", "https://hooks.slack.com/services/T/B/topsecret"),
                    ("BADURL", "topsecret-not-a-url"),
                ],
                dir.path(),
            )
            .unwrap_err();
            let err = format!("{key}: {message}");
            assert!(err.contains(want), "{want}: {err}");
            assert!(!err.contains(SECRET) && !err.contains("topsecret"), "{err}");
        }
    }

    #[test]
    fn defaults() {
        let c = parse("", &[], Path::new("/")).unwrap();
        assert!(c.is_empty());
        assert_eq!(c.retry, RetryPolicy::default());
        let web = WebConfig::from_raw(RawWeb::default()).unwrap();
        assert!(web.enabled);
        assert_eq!(c.approval_url("apr_x"), None);
        let c = NotifyConfig {
            public_url: Some("https://c.example".into()),
            ..NotifyConfig::default()
        };
        assert_eq!(
            c.approval_url("apr_x").as_deref(),
            Some("https://c.example/approvals/apr_x")
        );
    }
}
