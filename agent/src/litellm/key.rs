//! What a LiteLLM key is to the agent: the slot [`Kind`] of a `[[litellm]]` entry, the key
//! held and its cache record, and the checks every broker answer and cache record passes
//! before anything is written (keys and URLs end up in files users source).

use std::fmt::Display;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use botcreds_proto::litellm::LitellmCredential;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::broker_client::{BrokerError, CredentialBroker};
use crate::credentials::time_to_unix as to_unix;
use crate::litellm_config::LitellmEntry;
use crate::refresh::{self};
use crate::secret::Secret;
use crate::slot::{Held, Kind, State as SlotState};

use super::plan::{Plan, Step, next_step, refresh_at};
use super::status::{LitellmKeyStatus, OnChangeStatus};

/// Version of the cache file layout for keys.
pub(super) const KEY_CACHE_FORMAT: u32 = 1;
/// Cache files of keys start with this (GitHub token files are bare hashes).
pub(super) const CACHE_PREFIX: &str = "litellm-";
pub(super) const MAX_KEY_BYTES: usize = 512;
pub(super) const MAX_TEXT_BYTES: usize = 256;

/// The key of one `[[litellm]]` entry: the [`Kind`] of the agent's LiteLLM slots.
pub struct Key {
    pub(super) entry: LitellmEntry,
    /// Held by the blocking thread that writes the files: one writer per entry at a time,
    /// even while a stopping agent's task is being aborted.
    pub(super) files: Arc<Mutex<()>>,
    pub(super) on_change_lock: tokio::sync::Mutex<()>,
}

/// A LiteLLM slot's own state.
pub struct KeyState {
    pub(super) last_check: Option<SystemTime>,
    /// Per output, in `entry.outputs()` order: state, when changed, error.
    pub(super) outputs: Vec<OutputState>,
    pub(super) on_change: Option<OnChangeStatus>,
}

#[derive(Clone, Default)]
pub(super) struct OutputState {
    pub(super) state: &'static str,
    pub(super) changed_at: Option<SystemTime>,
    pub(super) error: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    pub(super) format: u32,
    /// The entry's identity (scope and workspace); must match the file name.
    pub(super) identity: String,
    pub(super) credential_id: String,
    pub(super) key: Secret,
    pub(super) name: String,
    pub(super) scope: String,
    pub(super) budget_usd: f64,
    pub(super) budget_period: String,
    pub(super) rpm_limit: u32,
    pub(super) models: Vec<String>,
    pub(super) base_url: String,
    /// Unix seconds.
    pub(super) expires_at: i64,
    pub(super) fetched_at: i64,
}

/// The cache file of an entry: a hash of its identity, so names reveal nothing.
pub fn cache_file_name(entry: &LitellmEntry) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(entry.identity().as_bytes());
    format!("{CACHE_PREFIX}{}.json", hex::encode(&digest[..16]))
}

/// What a held key carries besides its id and times.
#[derive(Clone)]
pub struct KeyValue {
    pub(super) key: Secret,
    pub(super) name: String,
    pub(super) scope: String,
    pub(super) budget_usd: f64,
    pub(super) budget_period: String,
    pub(super) rpm_limit: u32,
    pub(super) models: Vec<String>,
    pub(super) base_url: String,
}

impl Held<Key> {
    fn record(&self, identity: &str) -> KeyRecord {
        KeyRecord {
            format: KEY_CACHE_FORMAT,
            identity: identity.to_string(),
            credential_id: self.credential_id.clone(),
            key: self.key.clone(),
            name: self.name.clone(),
            scope: self.scope.clone(),
            budget_usd: self.budget_usd,
            budget_period: self.budget_period.clone(),
            rpm_limit: self.rpm_limit,
            models: self.models.clone(),
            base_url: self.base_url.clone(),
            expires_at: to_unix(self.expires_at),
            fetched_at: to_unix(self.fetched_at),
        }
    }
}

/// Whether `key` looks like a LiteLLM key: 1 to 512 bytes of letters, digits and `-_.~+/=:`.
pub(super) fn plain_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_KEY_BYTES
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~+/=:".contains(&b))
}

/// Whether `url` is a plain `http(s)://host[:port][/path]` URL, checked against an allow-list
/// before anything else: it ends up in env files that users source (as root, too) and in tool
/// configs, so it may hold only letters, digits and `-._:/[]%` (no space, quote, `;`, `&`, `$`,
/// `~`, ...), and no user name, password, query or fragment.
pub fn plain_base_url(url: &str) -> Result<(), &'static str> {
    const MAX_URL_BYTES: usize = 2048;
    if url.is_empty() || url.len() > MAX_URL_BYTES {
        return Err("empty or too long");
    }
    if !url
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._:/[]%".contains(&b))
    {
        return Err("it has characters outside letters, digits and -._:/[]%");
    }
    let parsed = reqwest::Url::parse(url).map_err(|_| "it does not parse")?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("the scheme is not http or https");
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("it names no host");
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("it has a user name or password");
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err("it has a query or fragment");
    }
    // `http:/v1` parses (the URL standard fills in the slashes); a plain URL spells them out.
    if !url[parsed.scheme().len()..].starts_with("://") {
        return Err("it does not start with http:// or https://");
    }
    Ok(())
}

/// Whether `s` may be logged and shown as it is: 1 to [`MAX_TEXT_BYTES`] bytes without control
/// characters (ESC, newlines) or bidirectional overrides, which could forge or hide log lines.
pub(super) fn plain_text(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_TEXT_BYTES && crate::text::is_clean(s)
}

/// Checks the text a held key keeps from the broker's answer (logged, cached and shown by
/// `/v1/status` as it is); the reason when one is not plain.
pub(super) fn check_texts(
    credential_id: &str,
    name: &str,
    budget_period: &str,
    models: &[String],
) -> Result<(), String> {
    if !plain_text(credential_id) || !plain_text(name) {
        return Err("credential_id or name is empty, too long or has control characters".into());
    }
    // `day` or `run` today; empty is tolerated, it is only shown.
    if !budget_period.is_empty() && !plain_text(budget_period) {
        return Err("budget_period is too long or has control characters".into());
    }
    if let Some(m) = models
        .iter()
        .find(|m| !plain_text(m) || m.contains(char::is_whitespace))
    {
        return Err(format!("model {m:?} is not a model name"));
    }
    Ok(())
}

/// Checks the broker's answer and makes it a held key. The key and base URL end up in env
/// files and JSON, so they must be plain: no quotes, spaces or shell characters (the env file
/// quotes them as well, see [`outputs::env_file_content`]).
pub(super) fn validate_answer(
    cred: LitellmCredential,
    entry: &LitellmEntry,
    now: SystemTime,
) -> Result<Held<Key>, BrokerError> {
    let bad = |detail: String| BrokerError::BadAnswer {
        status: 200,
        detail,
    };
    if !plain_key(&cred.key) {
        return Err(bad(
            "the key is empty, too long, or has characters a LiteLLM key cannot have".into(),
        ));
    }
    if cred.scope != entry.scope {
        return Err(bad(format!(
            "asked for a {} key, got a {} key",
            entry.scope, cred.scope
        )));
    }
    if let Err(why) = plain_base_url(&cred.base_url) {
        return Err(bad(format!(
            "base_url {:?} is not a plain http(s) URL: {why}",
            cred.base_url
        )));
    }
    check_texts(
        &cred.credential_id,
        &cred.name,
        &cred.budget_period,
        &cred.models,
    )
    .map_err(bad)?;
    // Kept in the cache as JSON, which has no NaN or infinity: such a record would not load.
    if !(cred.budget_usd.is_finite() && cred.budget_usd >= 0.0) {
        return Err(bad(format!(
            "budget_usd {} is not a dollar amount",
            cred.budget_usd
        )));
    }
    let expires_at = OffsetDateTime::parse(&cred.expires_at, &Rfc3339)
        .map(SystemTime::from)
        .map_err(|e| {
            bad(format!(
                "expires_at {:?} is not RFC 3339: {e}",
                cred.expires_at
            ))
        })?;
    if !refresh::servable(expires_at, now) {
        return Err(bad(format!(
            "the key expires at {}, less than a minute from now (check the clocks)",
            cred.expires_at
        )));
    }
    refresh::check_lifetime(expires_at, now, refresh::MAX_LITELLM_KEY_LIFE)
        .map_err(|why| bad(format!("the key expires at {}: {why}", cred.expires_at)))?;
    Ok(Held {
        refresh_at: refresh_at(entry, now, expires_at, rand::random()),
        value: KeyValue {
            key: Secret::new(cred.key),
            name: cred.name,
            scope: cred.scope,
            budget_usd: cred.budget_usd,
            budget_period: cred.budget_period,
            rpm_limit: cred.rpm_limit,
            models: cred.models,
            base_url: cred.base_url,
        },
        credential_id: cred.credential_id,
        expires_at,
        fetched_at: now,
    })
}

impl Kind for Key {
    type Value = KeyValue;
    type Extra = KeyState;
    type Step = Step;
    type Answer = LitellmCredential;
    type Record = KeyRecord;
    type Status = LitellmKeyStatus;

    const MAX_LIFE: Duration = refresh::MAX_LITELLM_KEY_LIFE;
    const NOUN: &'static str = "key";

    fn scope(&self) -> &dyn Display {
        &self.entry.scope
    }

    fn task_name(&self) -> String {
        format!("LiteLLM key {}", self.entry.scope)
    }

    async fn ask<'a>(
        &'a self,
        broker: &'a dyn CredentialBroker,
        replaces: Option<&'a str>,
    ) -> Result<LitellmCredential, BrokerError> {
        let entry = &self.entry;
        broker
            .litellm_key(
                &entry.scope,
                entry.workspace.as_ref(),
                entry.reason.as_deref(),
                replaces,
            )
            .await
    }

    fn check(&self, answer: LitellmCredential, now: SystemTime) -> Result<Held<Key>, BrokerError> {
        validate_answer(answer, &self.entry, now)
    }

    fn refresh_at(&self, fetched_at: SystemTime, expires_at: SystemTime, unit: f64) -> SystemTime {
        refresh_at(&self.entry, fetched_at, expires_at, unit)
    }

    fn next_step(&self, now: SystemTime, st: &SlotState<Key>) -> Option<(SystemTime, Step)> {
        Some(next_step(now, &self.plan(st)))
    }

    fn due_again(&self, left: Duration) -> String {
        format!(
            "the broker handed out a key with only {}s left, within its refresh window",
            left.as_secs()
        )
    }

    fn accept(&self, st: &mut SlotState<Key>, new: &Held<Key>, now: SystemTime) -> bool {
        st.extra.last_check = Some(now);
        let same = st
            .held
            .as_ref()
            .is_some_and(|h| h.credential_id == new.credential_id);
        if !same {
            st.last_refresh = Some(now);
            st.held = Some(new.clone());
            return true;
        }
        match st.held.as_mut() {
            Some(h) if h.expires_at != new.expires_at => {
                // The broker extended the life of the key held.
                h.expires_at = new.expires_at;
                h.refresh_at = new.refresh_at;
                true
            }
            // Confirmed as it is: nothing to write. (Due again at once, a key shorter-lived
            // than its refresh window, backs off: see `State::succeeded`.)
            _ => false,
        }
    }

    fn record(&self, held: &Held<Key>, _st: &SlotState<Key>) -> KeyRecord {
        held.record(&self.entry.identity())
    }

    fn status(&self, now: SystemTime, st: &SlotState<Key>) -> LitellmKeyStatus {
        self.status_row(now, st)
    }
}

impl Key {
    pub(super) fn plan(&self, st: &SlotState<Key>) -> Plan {
        Plan {
            expires_at: st.held.as_ref().map(|h| h.expires_at),
            refresh_at: st.held.as_ref().map(|h| h.refresh_at),
            next_check: st.held.as_ref().map(|h| {
                refresh::later(
                    st.extra
                        .last_check
                        .unwrap_or(h.fetched_at)
                        .max(h.fetched_at),
                    self.entry.check_interval,
                )
            }),
            retry_at: st.retry_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;

    const MIN: Duration = Duration::from_secs(60);

    fn entry() -> LitellmEntry {
        LitellmEntry {
            scope: "ci".into(),
            workspace: None,
            reason: None,
            key_file: "/k".into(),
            env_file: None,
            roo_code: None,
            opencode: None,
            model: None,
            mode: 0o600,
            group: None,
            on_change: None,
            on_change_timeout: Duration::from_secs(30),
            refresh_fraction: 0.25,
            refresh_before: None,
            check_interval: Duration::from_secs(300),
            release_on_stop: false,
        }
    }

    fn answer(key: &str, expires: &str) -> LitellmCredential {
        LitellmCredential {
            kind: botcreds_proto::CredentialKind::LitellmKey,
            credential_id: "lk_0123".into(),
            key: key.into(),
            name: "ci-build".into(),
            scope: "ci".into(),
            budget_usd: 10.0,
            budget_period: "run".into(),
            rpm_limit: 120,
            models: vec!["claude-haiku-3-5".into()],
            expires_at: expires.into(),
            base_url: "http://127.0.0.1:4000/v1".into(),
            bot: "b".into(),
        }
    }

    #[test]
    fn answers_are_checked_before_anything_is_written() {
        let now =
            SystemTime::from(OffsetDateTime::parse("2026-02-06T14:30:00Z", &Rfc3339).unwrap());
        let e = entry();
        let held =
            validate_answer(answer("sk-abc_DEF-123", "2026-02-06T15:30:00Z"), &e, now).unwrap();
        assert!(held.refresh_at.duration_since(now).unwrap() <= 45 * MIN);
        assert!(held.refresh_at.duration_since(now).unwrap() >= 45 * MIN - MIN);
        for (mutate, want) in [
            (
                Box::new(|c: &mut LitellmCredential| c.key = "sk-a b".into())
                    as Box<dyn Fn(&mut LitellmCredential)>,
                "characters",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.key = String::new()),
                "empty",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.key = "sk-$(reboot)".into()),
                "characters",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.scope = "user".into()),
                "asked for a ci key, got a user key",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.base_url = "ftp://x/v1".into()),
                "base_url",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.base_url = "http://x/v1'".into()),
                "base_url",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.expires_at = "tomorrow".into()),
                "RFC 3339",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.expires_at = "2026-02-06T14:30:30Z".into()),
                "less than a minute",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.models = vec!["a b".into()]),
                "model",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.expires_at = "9999-12-31T23:59:59Z".into()),
                "longer than",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.budget_usd = f64::NAN),
                "budget",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.budget_usd = f64::INFINITY),
                "budget",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.budget_usd = -1.0),
                "budget",
            ),
            (
                Box::new(|c: &mut LitellmCredential| c.expires_at = "2027-03-01T00:00:00Z".into()),
                "longer than",
            ),
        ] {
            let mut c = answer("sk-abc", "2026-02-06T15:30:00Z");
            mutate(&mut c);
            let err = validate_answer(c, &e, now).err().unwrap().to_string();
            assert!(err.contains(want), "{err} / {want}");
            assert!(!err.contains("reboot"), "no key in errors: {err}");
        }
    }

    /// Regression: a hostile broker's key name, model names, credential id or budget period
    /// with bidirectional overrides (or an ESC, a newline) reached the agent's log (`LiteLLM
    /// key fetched name=…`), its cache and `/v1/status`. Every such answer is now either refused
    /// with a clean error or held with clean text only.
    #[test]
    fn broker_text_with_control_characters_never_reaches_logs_or_the_cache() {
        let now =
            SystemTime::from(OffsetDateTime::parse("2026-02-06T14:30:00Z", &Rfc3339).unwrap());
        let e = entry();
        let hostile = [
            "ci\x1b[2K\rfatal: forged",
            "ci\nINFO forged log line",
            "ci-\u{202e}dliub",
            "ci\u{7}bell",
            "ci\u{9b}31m",
        ];
        type Mutate = Box<dyn Fn(&mut LitellmCredential, &str)>;
        let fields: [(&str, Mutate); 6] = [
            ("name", Box::new(|c, h| c.name = h.into())),
            ("models", Box::new(|c, h| c.models = vec![h.into()])),
            ("credential_id", Box::new(|c, h| c.credential_id = h.into())),
            ("budget_period", Box::new(|c, h| c.budget_period = h.into())),
            ("scope", Box::new(|c, h| c.scope = h.into())),
            ("expires_at", Box::new(|c, h| c.expires_at = h.into())),
        ];
        for (field, mutate) in &fields {
            for h in hostile {
                let mut c = answer("sk-abc", "2026-02-06T15:30:00Z");
                mutate(&mut c, h);
                match validate_answer(c, &e, now) {
                    Err(err) => {
                        let shown = err.to_string();
                        assert!(
                            crate::text::is_clean(&shown),
                            "{field} {h:?}: error {shown:?}"
                        );
                    }
                    Ok(held) => {
                        let mut texts = vec![
                            held.name.clone(),
                            held.credential_id.clone(),
                            held.scope.clone(),
                            held.budget_period.clone(),
                            held.base_url.clone(),
                        ];
                        texts.extend(held.models.iter().cloned());
                        for t in &texts {
                            assert!(crate::text::is_clean(t), "{field} {h:?}: held {t:?}");
                        }
                        let stored = serde_json::to_string(&held.record("ci")).unwrap();
                        assert!(
                            !stored.contains("\\u001b")
                                && !stored.contains("\\n")
                                && !stored.contains('\u{202e}'),
                            "{field} {h:?}: cached {stored}"
                        );
                    }
                }
            }
        }
    }

    /// A broker answer's base URL ends up in an env file that users source as root: only plain
    /// http(s) URLs pass, whatever a compromised broker sends.
    #[test]
    fn base_url_shell_injection_is_refused() {
        let now =
            SystemTime::from(OffsetDateTime::parse("2026-02-06T14:30:00Z", &Rfc3339).unwrap());
        let refused = [
            "http://litellm:4000/v1;id>/tmp/PWNED",
            "http://litellm:4000/v1&id",
            "http://litellm:4000/v1|id",
            "http://litellm:4000/v1<x",
            "http://litellm:4000/v1>x",
            "http://litellm:4000/(v1)",
            "http://litellm:4000/~root",
            "http://litellm:4000/v1 id",
            "http://litellm:4000/v1\tid",
            "http://litellm:4000/v1\nid",
            "http://litellm:4000/v1$(id)",
            "http://litellm:4000/v1`id`",
            "http://litellm:4000/v1'",
            "http://litellm:4000/v1#frag",
            "http://litellm:4000/v1?a=b",
            "http://user:pw@litellm:4000/v1",
            "http://user@litellm:4000/v1",
            "file:///etc/shadow",
            "ftp://litellm/v1",
            "javascript:alert(1)",
            "http:/v1",
            "",
        ];
        for url in refused {
            let mut c = answer("sk-abc", "2026-02-06T15:30:00Z");
            c.base_url = url.into();
            let err = validate_answer(c, &entry(), now).err();
            assert!(err.is_some(), "{url:?} was accepted");
        }
        for url in [
            "http://litellm:4000/v1",
            "https://llm.example.com/v1/",
            "http://127.0.0.1:4000",
            "http://[::1]:4000/v1",
            "https://llm.example.com/a-b_c.d/%20v1",
        ] {
            let mut c = answer("sk-abc", "2026-02-06T15:30:00Z");
            c.base_url = url.into();
            let held = validate_answer(c, &entry(), now).unwrap();
            assert_eq!(held.base_url, url, "kept as sent");
        }
    }

    #[test]
    fn cache_names_depend_on_scope_and_workspace_only() {
        let a = entry();
        let b = LitellmEntry {
            key_file: "/elsewhere".into(),
            ..entry()
        };
        let c = LitellmEntry {
            scope: "user".into(),
            ..entry()
        };
        assert_eq!(cache_file_name(&a), cache_file_name(&b));
        assert_ne!(cache_file_name(&a), cache_file_name(&c));
        assert!(cache_file_name(&a).starts_with("litellm-"));
    }
}
