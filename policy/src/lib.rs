//! The policy engine: which bot a caller is, and whether its request is allowed, needs a human,
//! or is denied.
//!
//! A [`Policy`] is loaded once from YAML (see `docs/policy.md`), validated with file positions,
//! and then immutable; [`Policy::decide`] is a pure function of (policy, caller, request) with no
//! I/O. Evaluation order is fixed: `deny` → `auto_approve` → `requires_approval` → `defaults`.
//! Caller → bot matching goes through hash indexes so a policy with thousands of bots costs a
//! handful of lookups per request.
//!
//! This crate depends on no runtime, network or storage crate, so the compiler keeps the engine
//! pure; the only I/O is [`Policy::load`] reading the file. The broker re-exports it as
//! `botcreds_broker::policy`.

pub mod caller;
mod decide;
mod glob;
mod load;
pub mod remembered;

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use botcreds_proto::{Permission, RepoName};

pub use caller::{Caller, CallerVia, TailnetIdentity};
pub use glob::LITELLM_SCOPES;
pub use remembered::{RememberedRule, RememberedRules, Resource};

/// Largest policy file [`Policy::load`] and [`Policy::parse`] accept: room for ~20,000 bots of
/// ten rules (a 10,000-bot policy is about 7.5 MB and parses in about half a second).
pub const MAX_POLICY_BYTES: usize = 16 * 1024 * 1024;

/// Approval timeout when neither the bot nor `defaults` names one.
pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// What a caller asks for, borrowed from the parsed request.
#[derive(Clone, Copy, Debug)]
pub enum Request<'a> {
    /// A GitHub installation token. An empty `repositories` means every repository of the
    /// installation, and an empty `permissions` every permission of the app (GitHub's meaning);
    /// the policy treats both as the broadest possible request.
    Github {
        repositories: &'a [RepoName],
        permissions: &'a [Permission],
    },
    /// A LiteLLM virtual key of one scope (`workspace`, `user`, `ci`, `agent:review`, `agent:write`).
    Litellm { scope: &'a str },
    /// An SSH deploy key (`contents:read` or `contents:write` on one repository). Only rules
    /// with `kind: deploy_key` allow it; `deny` and `requires_approval` rules without a kind
    /// catch it as they catch tokens.
    DeployKey {
        repositories: &'a [RepoName],
        permissions: &'a [Permission],
    },
}

impl<'a> Request<'a> {
    /// The GitHub kind, repositories and permissions of a GitHub request.
    fn github_parts(self) -> Option<(GithubKind, &'a [RepoName], &'a [Permission])> {
        match self {
            Request::Github {
                repositories,
                permissions,
            } => Some((GithubKind::Token, repositories, permissions)),
            Request::DeployKey {
                repositories,
                permissions,
            } => Some((GithubKind::DeployKey, repositories, permissions)),
            Request::Litellm { .. } => None,
        }
    }
}

/// What a GitHub rule is about: a rule's `kind` (`github_token`, the default for
/// `auto_approve`, or `deploy_key`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GithubKind {
    Token,
    DeployKey,
}

impl GithubKind {
    pub fn as_str(self) -> &'static str {
        match self {
            GithubKind::Token => "github_token",
            GithubKind::DeployKey => "deploy_key",
        }
    }
}

/// The verdict of the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Issue without asking anyone.
    Allow,
    /// Queue for a human; expires after [`Decision::approval_timeout`].
    RequireApproval,
    /// Refuse.
    Deny,
}

impl Outcome {
    /// Stable lower-case name for audit records, metrics labels and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::RequireApproval => "require_approval",
            Outcome::Deny => "deny",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A verdict with the reason for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    /// The bot the caller was matched to, if any.
    pub bot: Option<String>,
    /// The rule that decided: `bots.machina-bot.deny[0]`, `bots.x.auto_approve[1]`,
    /// `bots.x.requires_approval[0]`, or `defaults`.
    pub rule: String,
    /// One line for humans: what matched and why that leads to the outcome.
    pub explanation: String,
    /// How long an approval request may wait for a human (the bot's own timeout, else defaults').
    pub approval_timeout: Duration,
}

/// One bot's rules in words, as `policy show` prints them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BotRules {
    pub name: String,
    pub identity: String,
    /// The bot's own approval timeout, if it sets one.
    pub approval_timeout: Option<Duration>,
    pub auto_approve: Vec<String>,
    pub requires_approval: Vec<String>,
    pub deny: Vec<String>,
}

/// A policy that could not be loaded, with the position it concerns. Line and column are
/// 1-based; `0:0` means the error is about the whole file (unreadable, too large).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct PolicyError {
    pub file: String,
    pub line: u64,
    pub column: u64,
    pub message: String,
}

impl PolicyError {
    fn whole_file(file: &str, message: String) -> PolicyError {
        PolicyError {
            file: file.to_string(),
            line: 0,
            column: 0,
            message,
        }
    }
}

/// How a bot proves who it is. Tailnet forms come from tailscaled's WhoIs, never from anything
/// the caller says about itself.
#[derive(Clone, Debug)]
enum Identity {
    /// MagicDNS short name or full node name, lower-cased, without a trailing dot.
    Hostname(Box<str>),
    /// An ACL tag (`tag:ci`); matches tagged nodes carrying it.
    Tag(Box<str>),
    /// Owner login, lower-cased; matches untagged nodes only.
    User(Box<str>),
    /// A capability name granted by the tailnet policy file.
    Capability(Box<str>),
    /// A pre-shared API key configured for this bot's name.
    ApiKey,
    /// A client certificate from the broker's CA naming this bot (`botcreds://bot/NAME`).
    Mtls,
}

impl Identity {
    fn describe(&self) -> String {
        match self {
            Identity::Hostname(h) => format!("tailnet hostname {h}"),
            Identity::Tag(t) => format!("tailnet tag {t}"),
            Identity::User(u) => format!("tailnet user {u} (untagged nodes)"),
            Identity::Capability(c) => format!("tailnet capability {c}"),
            Identity::ApiKey => "API key configured for this bot".to_string(),
            Identity::Mtls => "client certificate naming this bot".to_string(),
        }
    }
}

/// One bot of the policy, compiled.
#[derive(Clone, Debug)]
struct Bot {
    name: String,
    identity: Identity,
    approval_timeout: Option<Duration>,
    deny: Vec<decide::Rule>,
    auto_approve: Vec<decide::Rule>,
    requires_approval: Vec<decide::Rule>,
}

#[derive(Clone, Copy, Debug)]
struct Defaults {
    requires_approval: bool,
    approval_timeout: Duration,
}

impl Default for Defaults {
    fn default() -> Defaults {
        Defaults {
            requires_approval: true,
            approval_timeout: DEFAULT_APPROVAL_TIMEOUT,
        }
    }
}

/// A loaded, validated policy. Immutable; share it behind an `Arc` and swap the `Arc` to reload.
#[derive(Clone)]
pub struct Policy {
    /// In file order: on ties between bots matching one caller, the lower index wins.
    bots: Vec<Bot>,
    by_name: HashMap<String, usize>,
    /// Each index maps a key to the first bot (in file order) with that identity.
    by_hostname: HashMap<Box<str>, usize>,
    by_tag: HashMap<Box<str>, usize>,
    by_user: HashMap<Box<str>, usize>,
    by_capability: HashMap<Box<str>, usize>,
    defaults: Defaults,
}

impl fmt::Debug for Policy {
    // A policy can hold thousands of bots; logs want the shape, not the contents.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("bots", &self.bots.len())
            .field("defaults", &self.defaults)
            .finish()
    }
}

impl Policy {
    /// Reads and validates a policy file of at most [`MAX_POLICY_BYTES`].
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        Policy::load_with_limit(path, MAX_POLICY_BYTES)
    }

    /// [`Policy::load`] with another size limit, for very large policies.
    pub fn load_with_limit(path: &Path, max_bytes: usize) -> Result<Policy, PolicyError> {
        let name = path.display().to_string();
        let text = load::read_bounded(path, max_bytes)
            .map_err(|message| PolicyError::whole_file(&name, message))?;
        load::parse(&name, &text, max_bytes)
    }

    /// Validates policy YAML; `source_name` is used in error positions (`FILE:LINE:COL`).
    pub fn parse(source_name: &str, yaml: &str) -> Result<Policy, PolicyError> {
        load::parse(source_name, yaml, MAX_POLICY_BYTES)
    }

    /// [`Policy::parse`] with another size limit, for very large policies.
    pub fn parse_with_limit(
        source_name: &str,
        yaml: &str,
        max_bytes: usize,
    ) -> Result<Policy, PolicyError> {
        load::parse(source_name, yaml, max_bytes)
    }

    /// Builds the lookup indexes. Names are unique (the loader checks); identities need not be,
    /// and the first bot in file order keeps a shared key.
    fn from_bots(bots: Vec<Bot>, defaults: Defaults) -> Policy {
        let mut policy = Policy {
            by_name: HashMap::with_capacity(bots.len()),
            by_hostname: HashMap::new(),
            by_tag: HashMap::new(),
            by_user: HashMap::new(),
            by_capability: HashMap::new(),
            bots: Vec::new(),
            defaults,
        };
        for (i, bot) in bots.iter().enumerate() {
            policy.by_name.entry(bot.name.clone()).or_insert(i);
            let index = match &bot.identity {
                Identity::Hostname(k) => Some((&mut policy.by_hostname, k)),
                Identity::Tag(k) => Some((&mut policy.by_tag, k)),
                Identity::User(k) => Some((&mut policy.by_user, k)),
                Identity::Capability(k) => Some((&mut policy.by_capability, k)),
                Identity::ApiKey | Identity::Mtls => None,
            };
            if let Some((map, key)) = index {
                map.entry(key.clone()).or_insert(i);
            }
        }
        policy.bots = bots;
        policy
    }

    /// The bot a caller is, if any: an API key names its bot exactly; a tailnet node is matched
    /// by hostname, then tag, then user, then capability, and on ties the first bot in the file.
    pub fn bot_for(&self, caller: &Caller) -> Option<&str> {
        self.bot_index(caller).map(|i| self.bots[i].name.as_str())
    }

    /// Whether `bot`'s identity is one tailscaled vouches for and the node cannot choose: a
    /// tag, a grant capability, or its owner's login. A hostname is the node's own choice
    /// (any node may rename itself), so it is good enough to ask for a short-lived token the
    /// policy allows, but not to be handed a renewable client certificate without a token.
    pub fn identity_is_assigned(&self, bot: &str) -> bool {
        self.by_name.get(bot).is_some_and(|&i| {
            matches!(
                self.bots[i].identity,
                Identity::Tag(_) | Identity::Capability(_) | Identity::User(_)
            )
        })
    }

    fn bot_index(&self, caller: &Caller) -> Option<usize> {
        match &caller.via {
            CallerVia::ApiKey { bot } => self
                .by_name
                .get(bot.as_str())
                .copied()
                .filter(|&i| matches!(self.bots[i].identity, Identity::ApiKey)),
            CallerVia::Tailnet(node) => self.tailnet_bot(node),
            // The broker's CA names the bot only on an admin's join token or on the policy's
            // own mapping of a tailnet host, so a certificate is that bot whatever identity
            // the policy gives it; `{type: mtls}` is for bots with certificates only.
            CallerVia::Mtls { bot, .. } => self.by_name.get(bot.as_str()).copied(),
        }
    }

    fn tailnet_bot(&self, node: &TailnetIdentity) -> Option<usize> {
        // The FQDN always names the node; its short name only within our own tailnet (a node
        // shared in from another tailnet may carry any short name, e.g. one of our bots').
        let short = (!node.foreign).then_some(node.computed_name.as_str());
        let by_host = short
            .into_iter()
            .chain([node.node_name.as_str()])
            .filter_map(|name| lookup(&self.by_hostname, &normalize_hostname(name)))
            .min();
        if by_host.is_some() {
            return by_host;
        }
        if node.is_tagged() {
            let by_tag = node
                .tags
                .iter()
                .filter_map(|t| lookup(&self.by_tag, t))
                .min();
            if by_tag.is_some() {
                return by_tag;
            }
        } else if !node.login.is_empty() {
            let login = lowercase(&node.login);
            if let Some(i) = lookup(&self.by_user, &login) {
                return Some(i);
            }
        }
        if self.by_capability.is_empty() {
            return None;
        }
        node.capabilities
            .keys()
            .filter_map(|c| lookup(&self.by_capability, c))
            .min()
    }

    /// The policy's verdict on `request` from `caller`.
    pub fn decide(&self, caller: &Caller, request: &Request<'_>) -> Decision {
        decide::decide(self, self.bot_index(caller), None, request, None)
    }

    /// [`Policy::decide`] with remembered rules ("approve + remember") layered on the file:
    /// they are checked after the bot's `auto_approve` rules, before `requires_approval`.
    pub fn decide_with(
        &self,
        caller: &Caller,
        request: &Request<'_>,
        remembered: &RememberedRules,
    ) -> Decision {
        decide::decide(
            self,
            self.bot_index(caller),
            None,
            request,
            Some(remembered),
        )
    }

    /// The verdict for a named bot (`None`: a caller that matches no bot), for
    /// `botcreds policy explain`. An unknown name is treated as an unknown caller.
    pub fn decide_for_bot(&self, bot: Option<&str>, request: &Request<'_>) -> Decision {
        let index = bot.and_then(|name| self.by_name.get(name).copied());
        let unknown_name = if index.is_none() { bot } else { None };
        decide::decide(self, index, unknown_name, request, None)
    }

    /// Every bot's rules in words, in file order (for `policy show`).
    pub fn describe_bots(&self) -> Vec<BotRules> {
        let describe = |rules: &[decide::Rule]| {
            rules
                .iter()
                .map(|r| {
                    let mut s = String::new();
                    r.describe(&mut s);
                    s
                })
                .collect()
        };
        self.bots
            .iter()
            .map(|b| BotRules {
                name: b.name.clone(),
                identity: b.identity.describe(),
                approval_timeout: b.approval_timeout,
                auto_approve: describe(&b.auto_approve),
                requires_approval: describe(&b.requires_approval),
                deny: describe(&b.deny),
            })
            .collect()
    }

    /// `defaults.requires_approval`.
    pub fn defaults_require_approval(&self) -> bool {
        self.defaults.requires_approval
    }

    /// `defaults.approval_timeout` (24 h when unset).
    pub fn default_approval_timeout(&self) -> Duration {
        self.defaults.approval_timeout
    }

    pub fn has_bot(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Bot names in file order.
    pub fn bot_names(&self) -> Vec<&str> {
        self.bots.iter().map(|b| b.name.as_str()).collect()
    }

    /// How the bot is recognised, in words (`tailnet tag tag:ci`).
    pub fn identity_of(&self, bot: &str) -> Option<String> {
        self.by_name
            .get(bot)
            .map(|&i| self.bots[i].identity.describe())
    }

    /// How long an approval request of this bot may wait (unknown or `None`: the default).
    pub fn approval_timeout_for(&self, bot: Option<&str>) -> Duration {
        bot.and_then(|name| self.by_name.get(name))
            .and_then(|&i| self.bots[i].approval_timeout)
            .unwrap_or(self.defaults.approval_timeout)
    }

    fn approval_timeout_of(&self, bot: Option<usize>) -> Duration {
        bot.and_then(|i| self.bots[i].approval_timeout)
            .unwrap_or(self.defaults.approval_timeout)
    }
}

fn lookup(map: &HashMap<Box<str>, usize>, key: &str) -> Option<usize> {
    if key.is_empty() {
        return None;
    }
    map.get(key).copied()
}

/// Lower-cases only when needed, so the usual already-lower-case name costs no allocation.
fn lowercase(s: &str) -> Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}

/// DNS names compare case-insensitively and may be written fully qualified (`host.ts.net.`).
fn normalize_hostname(s: &str) -> Cow<'_, str> {
    let s = s.strip_suffix('.').unwrap_or(s);
    lowercase(s)
}
