//! Reading a policy: bounded input → YAML with source positions → validated, compiled bots.
//!
//! Every error, syntactic or semantic, carries `FILE:LINE:COLUMN` so a policy author can jump to
//! it; semantic checks use `serde_saphyr::Spanned` positions captured while parsing.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::marker::PhantomData;
use std::path::Path;

use botcreds_proto::{Permission, PermissionError, Ttl};
use serde::Deserialize;
use serde::de::{MapAccess, Visitor};
use serde_saphyr::{Location, Spanned};

use super::decide::{Rule, RulePermission, Section};
use super::glob::{RepoGlob, ScopeGlob};
use super::{Bot, Defaults, GithubKind, Identity, Policy, PolicyError};

/// The file as written. Field names are the policy format; unknown ones are errors so a typo
/// (`auto_aprove`) cannot silently drop a rule.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    bots: Option<Ordered<RawBot>>,
    #[serde(default)]
    defaults: Option<RawDefaults>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBot {
    identity: Spanned<Ordered<Spanned<String>>>,
    #[serde(default)]
    approval_timeout: Option<Spanned<String>>,
    #[serde(default)]
    auto_approve: Option<Vec<Spanned<RawRule>>>,
    #[serde(default)]
    requires_approval: Option<Vec<Spanned<RawRule>>>,
    #[serde(default)]
    deny: Option<Vec<Spanned<RawRule>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    repo: Option<Spanned<String>>,
    #[serde(default)]
    permissions: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    litellm_scope: Option<Spanned<String>>,
    /// `github_token` (the default) or `deploy_key`.
    #[serde(default)]
    kind: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    #[serde(default)]
    requires_approval: Option<bool>,
    #[serde(default)]
    approval_timeout: Option<Spanned<String>>,
}

/// A mapping kept in file order with the position of each key: bot order decides ties, and
/// errors about a bot or identity field point at its key.
struct Ordered<V>(Vec<(Spanned<String>, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Ordered<V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct OrderedVisitor<V>(PhantomData<V>);

        impl<'de, V: Deserialize<'de>> Visitor<'de> for OrderedVisitor<V> {
            type Value = Ordered<V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered<V>, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(1024));
                while let Some(key) = map.next_key::<Spanned<String>>()? {
                    entries.push((key, map.next_value()?));
                }
                Ok(Ordered(entries))
            }
        }

        d.deserialize_map(OrderedVisitor(PhantomData))
    }
}

/// Reads at most `max_bytes` (+1 to detect overflow) so a huge or endless file cannot exhaust
/// memory before the size check.
pub(super) fn read_bounded(path: &Path, max_bytes: usize) -> Result<String, String> {
    let file = File::open(path).map_err(|e| format!("cannot open policy: {e}"))?;
    let mut buf = Vec::new();
    file.take(max_bytes as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read policy: {e}"))?;
    if buf.len() > max_bytes {
        return Err(too_large(max_bytes));
    }
    String::from_utf8(buf).map_err(|e| {
        format!(
            "policy is not UTF-8 (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}

fn too_large(max_bytes: usize) -> String {
    const MIB: usize = 1024 * 1024;
    if max_bytes.is_multiple_of(MIB) {
        format!("policy is larger than the {} MiB limit", max_bytes / MIB)
    } else {
        format!("policy is larger than the {max_bytes}-byte limit")
    }
}

pub(super) fn parse(file: &str, yaml: &str, max_bytes: usize) -> Result<Policy, PolicyError> {
    if yaml.len() > max_bytes {
        return Err(PolicyError::whole_file(file, too_large(max_bytes)));
    }
    // The byte limit bounds the document; scale the parser's event and node budgets with it
    // so any file under the limit parses, while alias expansion keeps its own caps.
    let mut budget = serde_saphyr::Budget::default();
    budget.max_events = budget.max_events.max(max_bytes);
    budget.max_nodes = budget.max_nodes.max(max_bytes);
    let options = serde_saphyr::options! {
        budget: Some(budget),
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
        with_snippet: false,
    };
    let raw: RawPolicy =
        serde_saphyr::from_str_with_options(yaml, options).map_err(|e| yaml_error(file, &e))?;
    Builder { file }.policy(raw)
}

/// Turns a parser error into `FILE:LINE:COL: message`, the message without the parser's own
/// "at line X, column Y" suffix.
fn yaml_error(file: &str, err: &serde_saphyr::Error) -> PolicyError {
    let (line, column) = err
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((0, 0));
    let options = serde_saphyr::render_options! {
        formatter: &PlainMessages,
        snippets: serde_saphyr::SnippetMode::Off,
    };
    PolicyError {
        file: file.to_string(),
        line,
        column,
        message: err.render_with_options(options),
    }
}

struct NoLocationSuffix;

impl serde_saphyr::Localizer for NoLocationSuffix {
    fn attach_location<'a>(&self, base: Cow<'a, str>, _loc: Location) -> Cow<'a, str> {
        base
    }
}

/// The parser's user-facing messages, with the terse type errors said in policy terms.
struct PlainMessages;

impl serde_saphyr::MessageFormatter for PlainMessages {
    fn localizer(&self) -> &dyn serde_saphyr::Localizer {
        &NoLocationSuffix
    }

    fn format_message<'a>(&self, err: &'a serde_saphyr::Error) -> Cow<'a, str> {
        let message = serde_saphyr::UserMessageFormatter.format_message(err);
        let plainer = match message.as_ref() {
            "expected sequence start" => "expected a list here, e.g. [contents:read]",
            "expected mapping start" => "expected a mapping (key: value) here",
            "expected string scalar" => "expected a single text value here",
            _ => return message,
        };
        Cow::Borrowed(plainer)
    }
}

struct Builder<'a> {
    file: &'a str,
}

impl Builder<'_> {
    fn err(&self, at: &Location, message: impl Into<String>) -> PolicyError {
        PolicyError {
            file: self.file.to_string(),
            line: at.line(),
            column: at.column(),
            message: message.into(),
        }
    }

    fn policy(&self, raw: RawPolicy) -> Result<Policy, PolicyError> {
        let entries = raw.bots.map(|b| b.0).unwrap_or_default();
        let mut seen = HashSet::with_capacity(entries.len());
        let mut bots = Vec::with_capacity(entries.len());
        for (name, raw_bot) in entries {
            // The parser rejects duplicate keys; merge keys (`<<`) could still repeat a name.
            if !seen.insert(name.value.clone()) {
                return Err(self.err(&name.referenced, format!("duplicate bot {:?}", name.value)));
            }
            bots.push(self.bot(name, raw_bot)?);
        }
        let mut defaults = Defaults::default();
        if let Some(d) = raw.defaults {
            if let Some(r) = d.requires_approval {
                defaults.requires_approval = r;
            }
            if let Some(t) = &d.approval_timeout {
                defaults.approval_timeout = self.duration(t)?;
            }
        }
        Ok(Policy::from_bots(bots, defaults))
    }

    fn bot(&self, name: Spanned<String>, raw: RawBot) -> Result<Bot, PolicyError> {
        if !valid_bot_name(&name.value) {
            return Err(self.err(
                &name.referenced,
                format!(
                    "bot name {:?} must be 1-64 ASCII letters, digits, '.', '_' or '-'",
                    name.value
                ),
            ));
        }
        let identity = self.identity(&raw.identity)?;
        let approval_timeout = match &raw.approval_timeout {
            Some(t) => Some(self.duration(t)?),
            None => None,
        };
        Ok(Bot {
            identity,
            approval_timeout,
            deny: self.rules(raw.deny, Section::Deny)?,
            auto_approve: self.rules(raw.auto_approve, Section::AutoApprove)?,
            requires_approval: self.rules(raw.requires_approval, Section::RequiresApproval)?,
            name: name.value,
        })
    }

    fn duration(&self, raw: &Spanned<String>) -> Result<std::time::Duration, PolicyError> {
        raw.value
            .parse::<Ttl>()
            .map(Ttl::as_duration)
            .map_err(|e| self.err(&raw.referenced, format!("approval_timeout: {e}")))
    }

    fn identity(&self, raw: &Spanned<Ordered<Spanned<String>>>) -> Result<Identity, PolicyError> {
        let fields = &raw.value.0;
        let kind = fields
            .iter()
            .find(|(k, _)| k.value == "type")
            .map(|(_, v)| v);
        let mut selector: Option<(&Spanned<String>, &Spanned<String>)> = None;
        for (key, value) in fields {
            match key.value.as_str() {
                "type" => {}
                "hostname" | "tag" | "user" | "capability" => {
                    if let Some((previous, _)) = selector {
                        return Err(self.err(
                            &key.referenced,
                            format!(
                                "identity has both {} and {}; give exactly one",
                                previous.value, key.value
                            ),
                        ));
                    }
                    selector = Some((key, value));
                }
                other => {
                    return Err(self.err(
                        &key.referenced,
                        format!(
                            "unknown identity field `{other}`; expected type, hostname, tag, \
                             user or capability"
                        ),
                    ));
                }
            }
        }
        match kind.map(|k| (k, k.value.as_str())) {
            Some((_, "mtls")) => match selector {
                Some((key, _)) => Err(self.err(
                    &key.referenced,
                    format!(
                        "an mtls identity takes no {}; the client certificate names the bot \
                         (botcreds://bot/NAME)",
                        key.value
                    ),
                )),
                None => Ok(Identity::Mtls),
            },
            Some((_, "api_key")) => match selector {
                Some((key, _)) => Err(self.err(
                    &key.referenced,
                    format!(
                        "an api_key identity takes no {}; the key itself is configured in the \
                         broker config (api_keys)",
                        key.value
                    ),
                )),
                None => Ok(Identity::ApiKey),
            },
            Some((_, "tailnet")) | None => match selector {
                Some((key, value)) => self.tailnet_identity(&key.value, value),
                None => Err(self.err(
                    &raw.referenced,
                    if kind.is_some() {
                        "a tailnet identity needs one of hostname, tag, user or capability"
                    } else {
                        "identity needs one of hostname, tag, user or capability, or type: api_key"
                    },
                )),
            },
            Some((kind, other)) => Err(self.err(
                &kind.referenced,
                format!("unknown identity type `{other}`; expected tailnet, api_key or mtls"),
            )),
        }
    }

    fn tailnet_identity(
        &self,
        field: &str,
        value: &Spanned<String>,
    ) -> Result<Identity, PolicyError> {
        let v = value.value.as_str();
        let bad = |why: String| Err(self.err(&value.referenced, why));
        let no_space = !v.is_empty() && v.len() <= 256 && !v.chars().any(char::is_whitespace);
        match field {
            "hostname" => {
                let host = v.strip_suffix('.').unwrap_or(v).to_ascii_lowercase();
                let ok = !host.is_empty()
                    && host.len() <= 253
                    && host.split('.').all(|label| {
                        !label.is_empty()
                            && label
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    });
                if !ok {
                    return bad(format!(
                        "hostname {v:?} is not a DNS name (letters, digits, '-' and '.')"
                    ));
                }
                Ok(Identity::Hostname(host.into()))
            }
            "tag" => match v.strip_prefix("tag:") {
                Some(name) if !name.is_empty() && no_space && !name.contains(',') => {
                    Ok(Identity::Tag(v.into()))
                }
                _ => bad(format!("tag {v:?} must look like tag:name")),
            },
            "user" => {
                if !(no_space && v.contains('@')) {
                    return bad(format!(
                        "user {v:?} must be a tailnet login such as alice@example.com"
                    ));
                }
                Ok(Identity::User(v.to_ascii_lowercase().into()))
            }
            _ => {
                if !no_space {
                    return bad(format!(
                        "capability {v:?} must be a capability name such as \
                         example.com/cap/botcreds"
                    ));
                }
                Ok(Identity::Capability(v.into()))
            }
        }
    }

    fn rules(
        &self,
        raw: Option<Vec<Spanned<RawRule>>>,
        section: Section,
    ) -> Result<Vec<Rule>, PolicyError> {
        raw.unwrap_or_default()
            .iter()
            .map(|r| self.rule(r, section))
            .collect()
    }

    fn rule(&self, raw: &Spanned<RawRule>, section: Section) -> Result<Rule, PolicyError> {
        let r = &raw.value;
        let kind = match &r.kind {
            None => None,
            Some(k) => Some(match k.value.as_str() {
                "github_token" => GithubKind::Token,
                "deploy_key" => GithubKind::DeployKey,
                other => {
                    return Err(self.err(
                        &k.referenced,
                        format!(
                            "unknown rule kind {other:?}: github_token or deploy_key (LiteLLM \
                             rules use litellm_scope)"
                        ),
                    ));
                }
            }),
        };
        if let Some(scope) = &r.litellm_scope {
            if let Some(k) = &r.kind {
                return Err(self.err(
                    &k.referenced,
                    "a litellm_scope rule has no kind; kind is github_token or deploy_key",
                ));
            }
            if r.repo.is_some() || r.permissions.is_some() {
                return Err(self.err(
                    &scope.referenced,
                    "a litellm_scope rule is about LiteLLM keys and cannot also name repo or \
                     permissions; write two rules",
                ));
            }
            let scope =
                ScopeGlob::parse(&scope.value).map_err(|m| self.err(&scope.referenced, m))?;
            return Ok(Rule::Litellm { scope });
        }
        if r.repo.is_none() && r.permissions.is_none() {
            return Err(self.err(
                &raw.referenced,
                format!(
                    "empty {} rule: give repo, permissions or litellm_scope",
                    section.key()
                ),
            ));
        }
        let repo = match &r.repo {
            Some(g) => Some(RepoGlob::parse(&g.value).map_err(|m| self.err(&g.referenced, m))?),
            None => None,
        };
        let permissions = match &r.permissions {
            Some(list) => Some(self.permissions(list)?),
            None => None,
        };
        if matches!(section, Section::AutoApprove) && (repo.is_none() || permissions.is_none()) {
            return Err(self.err(
                &raw.referenced,
                "an auto_approve rule for GitHub needs both repo and permissions, so it never \
                 approves more than it names",
            ));
        }
        // An auto_approve rule allows one kind only: a token rule must not allow deploy keys.
        let kind = match section {
            Section::AutoApprove => Some(kind.unwrap_or(GithubKind::Token)),
            _ => kind,
        };
        Ok(Rule::Github {
            kind,
            repo,
            permissions,
        })
    }

    fn permissions(
        &self,
        list: &Spanned<Vec<Spanned<String>>>,
    ) -> Result<Vec<RulePermission>, PolicyError> {
        if list.value.is_empty() {
            return Err(self.err(
                &list.referenced,
                "permissions is empty; name at least one (e.g. [contents:read]) or leave it out",
            ));
        }
        list.value
            .iter()
            .map(|p| {
                if p.value == "admin" {
                    return Ok(RulePermission::Admin);
                }
                p.value
                    .parse::<Permission>()
                    .map(RulePermission::Exact)
                    .map_err(|e| {
                        let message = match e {
                            // The proto error names only the part before the colon.
                            PermissionError::UnknownName(_) => format!(
                                "unknown permission {:?}: not a GitHub App permission name \
                                 (e.g. contents, issues, pull_requests), nor the keyword admin",
                                p.value
                            ),
                            other => other.to_string(),
                        };
                        self.err(&p.referenced, message)
                    })
            })
            .collect()
    }
}

/// Bot names appear in audit records, CLI flags and rule names (`bots.NAME.deny[0]`).
fn valid_bot_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
