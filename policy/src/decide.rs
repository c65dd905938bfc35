//! Evaluating one request against one bot's rules: `deny` → `auto_approve` → `requires_approval`
//! → `defaults`. Pure and allocation-light: only the returned [`Decision`] owns memory.

use std::fmt::{self, Write as _};

use botcreds_proto::{Permission, RepoName};

use super::glob::{RepoGlob, ScopeGlob};
use super::remembered::RememberedRules;
use super::{Bot, Decision, GithubKind, Outcome, Policy, Request};

/// A compiled rule of one section.
#[derive(Clone, Debug)]
pub(super) enum Rule {
    /// Meets GitHub requests only. At least one field is set (the loader checks); auto_approve
    /// rules have both.
    Github {
        /// `None` (no `kind` in a deny / requires_approval rule): both GitHub kinds. An
        /// auto_approve rule always has one (`github_token` unless it says otherwise), so a
        /// token rule never allows a deploy key.
        kind: Option<GithubKind>,
        repo: Option<RepoGlob>,
        permissions: Option<Vec<RulePermission>>,
    },
    /// Meets LiteLLM requests only.
    Litellm { scope: ScopeGlob },
}

/// A permission in a rule: `name:level`, or the keyword `admin` for every admin-level permission.
#[derive(Clone, Debug)]
pub(super) enum RulePermission {
    Admin,
    Exact(Permission),
}

impl RulePermission {
    /// deny / requires_approval: a request at this level or above is caught (denying
    /// `contents:read` also denies `contents:write`).
    fn hits(&self, requested: &Permission) -> bool {
        match self {
            RulePermission::Admin => requested.is_admin_level(),
            RulePermission::Exact(p) => {
                p.name() == requested.name() && requested.level() >= p.level()
            }
        }
    }

    /// auto_approve: this grant is enough for the request (write covers read).
    fn covers(&self, requested: &Permission) -> bool {
        match self {
            RulePermission::Admin => requested.is_admin_level(),
            RulePermission::Exact(p) => p.covers(requested),
        }
    }
}

impl fmt::Display for RulePermission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RulePermission::Admin => f.write_str("admin"),
            RulePermission::Exact(p) => p.fmt(f),
        }
    }
}

/// What made a deny / requires_approval rule match, for the explanation.
enum Hit<'a> {
    Github {
        repo: Option<(Subject<'a, RepoName>, &'a RepoGlob)>,
        permission: Option<(Subject<'a, Permission>, &'a RulePermission)>,
    },
    Scope {
        requested: &'a str,
        glob: &'a ScopeGlob,
    },
}

/// A requested item, or the whole set when the request named none (GitHub's "all").
enum Subject<'a, T> {
    One(&'a T),
    All,
}

impl Rule {
    /// deny / requires_approval semantics: every field the rule names must be met by ANY part
    /// of the request.
    fn hits<'a>(&'a self, request: &Request<'a>) -> Option<Hit<'a>> {
        match (self, request) {
            (
                Rule::Github {
                    kind,
                    repo,
                    permissions,
                },
                request,
            ) if request
                .github_parts()
                .is_some_and(|(k, _, _)| kind.is_none_or(|rk| rk == k)) =>
            {
                let (_, repositories, requested) = request.github_parts()?;
                let repo = match repo {
                    None => None,
                    // A request for every repository includes whichever one the rule names.
                    Some(glob) if repositories.is_empty() => Some((Subject::All, glob)),
                    Some(glob) => Some((
                        Subject::One(repositories.iter().find(|r| glob.matches(r))?),
                        glob,
                    )),
                };
                let permission = match permissions {
                    None => None,
                    Some(rule_perms) if requested.is_empty() => {
                        Some((Subject::All, rule_perms.first()?))
                    }
                    Some(rule_perms) => requested.iter().find_map(|q| {
                        rule_perms
                            .iter()
                            .find(|p| p.hits(q))
                            .map(|p| (Subject::One(q), p))
                    }),
                };
                if permissions.is_some() && permission.is_none() {
                    return None;
                }
                Some(Hit::Github { repo, permission })
            }
            (Rule::Litellm { scope }, Request::Litellm { scope: requested }) => {
                scope.matches(requested).then_some(Hit::Scope {
                    requested,
                    glob: scope,
                })
            }
            _ => None,
        }
    }

    /// auto_approve semantics: this one rule covers EVERY requested repository and permission.
    fn covers(&self, request: &Request<'_>) -> bool {
        match (self, request) {
            (
                Rule::Github {
                    kind,
                    repo: Some(glob),
                    permissions: Some(rule_perms),
                },
                request,
            ) => {
                let Some((asked_kind, repositories, permissions)) = request.github_parts() else {
                    return false;
                };
                if kind.unwrap_or(GithubKind::Token) != asked_kind {
                    return false;
                }
                let repos_ok = if repositories.is_empty() {
                    glob.matches_every_repository()
                } else {
                    repositories.iter().all(|r| glob.matches(r))
                };
                // "Every permission of the app" is never covered by a finite list.
                repos_ok
                    && !permissions.is_empty()
                    && permissions
                        .iter()
                        .all(|q| rule_perms.iter().any(|p| p.covers(q)))
            }
            (Rule::Litellm { scope }, Request::Litellm { scope: requested }) => {
                scope.matches(requested)
            }
            _ => false,
        }
    }

    pub(super) fn describe(&self, out: &mut String) {
        match self {
            Rule::Github {
                kind,
                repo,
                permissions,
            } => {
                if let Some(GithubKind::DeployKey) = kind {
                    out.push_str("kind deploy_key ");
                }
                if let Some(glob) = repo {
                    out.push_str(glob.as_str());
                }
                if let Some(perms) = permissions {
                    if repo.is_some() {
                        out.push(' ');
                    }
                    out.push('[');
                    for (i, p) in perms.iter().enumerate() {
                        if i > 0 {
                            out.push_str(", ");
                        }
                        let _ = write!(out, "{p}");
                    }
                    out.push(']');
                }
            }
            Rule::Litellm { scope } => {
                let _ = write!(out, "litellm_scope {}", scope.as_str());
            }
        }
    }
}

/// The rule lists of a bot, in evaluation order.
#[derive(Clone, Copy)]
pub(super) enum Section {
    Deny,
    AutoApprove,
    RequiresApproval,
}

impl Section {
    pub(super) fn key(self) -> &'static str {
        match self {
            Section::Deny => "deny",
            Section::AutoApprove => "auto_approve",
            Section::RequiresApproval => "requires_approval",
        }
    }
}

/// The verdict for bot index `bot` (`None`: no bot; `unknown_name` says which name was asked
/// for, when one was). `remembered` rules are checked right after the bot's `auto_approve`.
pub(super) fn decide(
    policy: &Policy,
    bot: Option<usize>,
    unknown_name: Option<&str>,
    request: &Request<'_>,
    remembered: Option<&RememberedRules>,
) -> Decision {
    let approval_timeout = policy.approval_timeout_of(bot);
    let Some(index) = bot else {
        let mut explanation = match unknown_name {
            Some(name) => format!("the policy has no bot named {name:?}; "),
            None => "the caller matches no bot of the policy; ".to_string(),
        };
        push_defaults(policy, &mut explanation);
        return Decision {
            outcome: default_outcome(policy),
            bot: None,
            rule: "defaults".to_string(),
            explanation,
            approval_timeout,
        };
    };
    let b = &policy.bots[index];
    let verdict = |outcome, section: Section, i: usize, explanation| Decision {
        outcome,
        bot: Some(b.name.clone()),
        rule: format!("bots.{}.{}[{i}]", b.name, section.key()),
        explanation,
        approval_timeout,
    };

    for (i, rule) in b.deny.iter().enumerate() {
        if let Some(hit) = rule.hits(request) {
            let explanation = explain_hit(&hit, Section::Deny, "so the request is denied");
            return verdict(Outcome::Deny, Section::Deny, i, explanation);
        }
    }
    for (i, rule) in b.auto_approve.iter().enumerate() {
        if rule.covers(request) {
            let explanation = explain_cover(rule, request);
            return verdict(Outcome::Allow, Section::AutoApprove, i, explanation);
        }
    }
    if let Some(rule) = remembered.and_then(|r| r.covering(&b.name, request)) {
        return Decision {
            outcome: Outcome::Allow,
            bot: Some(b.name.clone()),
            rule: format!("bots.{}.remembered[{}]", b.name, rule.id),
            explanation: format!(
                "remembered rule {} (approve + remember) covers the request, so it is allowed",
                rule.id
            ),
            approval_timeout,
        };
    }
    for (i, rule) in b.requires_approval.iter().enumerate() {
        if let Some(hit) = rule.hits(request) {
            let explanation =
                explain_hit(&hit, Section::RequiresApproval, "so a human must approve");
            return verdict(
                Outcome::RequireApproval,
                Section::RequiresApproval,
                i,
                explanation,
            );
        }
    }
    Decision {
        outcome: default_outcome(policy),
        bot: Some(b.name.clone()),
        rule: "defaults".to_string(),
        explanation: explain_no_rule(policy, b),
        approval_timeout,
    }
}

fn default_outcome(policy: &Policy) -> Outcome {
    if policy.defaults.requires_approval {
        Outcome::RequireApproval
    } else {
        Outcome::Deny
    }
}

fn push_defaults(policy: &Policy, out: &mut String) {
    out.push_str(if policy.defaults.requires_approval {
        "defaults.requires_approval is true, so a human must approve"
    } else {
        "defaults.requires_approval is false, so the request is denied"
    });
}

fn explain_no_rule(policy: &Policy, bot: &Bot) -> String {
    let mut out = format!("no rule of bot {} matched; ", bot.name);
    push_defaults(policy, &mut out);
    out
}

fn explain_hit(hit: &Hit<'_>, section: Section, consequence: &str) -> String {
    let mut out = String::with_capacity(96);
    let key = section.key();
    match hit {
        Hit::Github { repo, permission } => {
            if let Some((subject, glob)) = repo {
                match subject {
                    Subject::One(r) => {
                        let _ = write!(out, "repository {r}");
                    }
                    Subject::All => out.push_str("a request for every repository"),
                }
                let _ = write!(out, " matches {key} pattern {}", glob.as_str());
            }
            if let Some((subject, rule_perm)) = permission {
                if repo.is_some() {
                    out.push_str(" and ");
                }
                match subject {
                    Subject::One(p) => {
                        let _ = write!(out, "permission {p}");
                    }
                    Subject::All => out.push_str("a request for every permission"),
                }
                let _ = write!(out, " matches {key} permission {rule_perm}");
            }
        }
        Hit::Scope { requested, glob } => {
            let _ = write!(
                out,
                "LiteLLM scope {requested} matches {key} scope {}",
                glob.as_str()
            );
        }
    }
    out.push_str(", ");
    out.push_str(consequence);
    out
}

fn explain_cover(rule: &Rule, request: &Request<'_>) -> String {
    let mut out = String::with_capacity(96);
    out.push_str("auto_approve rule ");
    rule.describe(&mut out);
    match request {
        Request::Github { .. } => {
            out.push_str(" covers every requested repository and permission, so it is allowed")
        }
        Request::DeployKey { .. } => {
            out.push_str(" covers the deploy key's repository and permission, so it is allowed")
        }
        Request::Litellm { scope } => {
            let _ = write!(out, " covers LiteLLM scope {scope}, so it is allowed");
        }
    }
    out
}
