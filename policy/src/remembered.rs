//! Remembered rules: auto_approve rules added by "approve + remember", layered on the policy
//! file without changing its format. They are checked right after the bot's own `auto_approve`
//! rules, so `deny` still wins over them and a reload of the file does not drop them.
//!
//! Also [`Resource`], the owned form of a request that grants and remembered rules cover.

use std::collections::HashMap;

use botcreds_proto::approval::ApprovalResource;
use botcreds_proto::{Permission, RepoName};

use super::Request;

/// What a grant or a remembered rule is for: exact repositories and permissions (sorted,
/// deduplicated), or one LiteLLM scope.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Resource {
    Github {
        repositories: Vec<RepoName>,
        permissions: Vec<Permission>,
    },
    Litellm {
        scope: String,
    },
    /// An SSH deploy key: one repository, `contents:read` or `contents:write`.
    DeployKey {
        repository: RepoName,
        permission: Permission,
    },
}

/// A stored resource that no longer parses (a permission renamed in a later version).
#[derive(Debug, thiserror::Error)]
#[error("stored resource is not valid: {0}")]
pub struct ResourceError(String);

impl Resource {
    /// The resource of a GitHub request, normalised so identical requests compare equal.
    pub fn github(repositories: &[RepoName], permissions: &[Permission]) -> Resource {
        let mut repositories = repositories.to_vec();
        repositories.sort();
        repositories.dedup();
        let mut permissions = permissions.to_vec();
        permissions.sort();
        permissions.dedup();
        Resource::Github {
            repositories,
            permissions,
        }
    }

    /// The borrowed request this resource stands for.
    pub fn as_request(&self) -> Request<'_> {
        match self {
            Resource::Github {
                repositories,
                permissions,
            } => Request::Github {
                repositories,
                permissions,
            },
            Resource::Litellm { scope } => Request::Litellm { scope },
            Resource::DeployKey {
                repository,
                permission,
            } => Request::DeployKey {
                repositories: std::slice::from_ref(repository),
                permissions: std::slice::from_ref(permission),
            },
        }
    }

    /// Whether a request asks for no more than this resource: every repository is one of its
    /// repositories and every permission is covered by one of its permissions (write covers
    /// read), or the same LiteLLM scope. A request for "everything" (no repositories or no
    /// permissions) is never covered.
    pub fn covers(&self, request: &Request<'_>) -> bool {
        match (self, request) {
            (
                Resource::Github {
                    repositories,
                    permissions,
                },
                Request::Github {
                    repositories: asked_repos,
                    permissions: asked_perms,
                },
            ) => {
                !asked_repos.is_empty()
                    && !asked_perms.is_empty()
                    && asked_repos.iter().all(|r| repositories.contains(r))
                    && asked_perms
                        .iter()
                        .all(|q| permissions.iter().any(|p| p.covers(q)))
            }
            (Resource::Litellm { scope }, Request::Litellm { scope: asked }) => scope == asked,
            (
                Resource::DeployKey {
                    repository,
                    permission,
                },
                Request::DeployKey {
                    repositories: asked_repos,
                    permissions: asked_perms,
                },
            ) => {
                !asked_repos.is_empty()
                    && !asked_perms.is_empty()
                    && asked_repos.iter().all(|r| r == repository)
                    && asked_perms.iter().all(|q| permission.covers(q))
            }
            _ => false,
        }
    }

    /// Whether the resource reaches this repository.
    pub fn touches_repo(&self, repo: &RepoName) -> bool {
        match self {
            Resource::Github { repositories, .. } => repositories.contains(repo),
            Resource::DeployKey { repository, .. } => repository == repo,
            Resource::Litellm { .. } => false,
        }
    }

    /// The wire form.
    pub fn to_wire(&self) -> ApprovalResource {
        match self {
            Resource::Github {
                repositories,
                permissions,
            } => ApprovalResource::GithubToken {
                repositories: repositories.iter().map(|r| r.to_string()).collect(),
                permissions: permissions.iter().map(|p| p.to_string()).collect(),
            },
            Resource::Litellm { scope } => ApprovalResource::LitellmKey {
                scope: scope.clone(),
            },
            Resource::DeployKey {
                repository,
                permission,
            } => ApprovalResource::DeployKey {
                repository: repository.to_string(),
                permission: permission.to_string(),
            },
        }
    }

    /// Parse the wire (and stored) form.
    pub fn from_wire(wire: &ApprovalResource) -> Result<Resource, ResourceError> {
        match wire {
            ApprovalResource::GithubToken {
                repositories,
                permissions,
            } => {
                let repos = repositories
                    .iter()
                    .map(|r| r.parse::<RepoName>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| ResourceError(e.to_string()))?;
                let perms = permissions
                    .iter()
                    .map(|p| p.parse::<Permission>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| ResourceError(e.to_string()))?;
                Ok(Resource::github(&repos, &perms))
            }
            ApprovalResource::LitellmKey { scope } => Ok(Resource::Litellm {
                scope: scope.clone(),
            }),
            ApprovalResource::DeployKey {
                repository,
                permission,
            } => Ok(Resource::DeployKey {
                repository: repository
                    .parse()
                    .map_err(|e: botcreds_proto::RepoError| ResourceError(e.to_string()))?,
                permission: permission
                    .parse()
                    .map_err(|e: botcreds_proto::PermissionError| ResourceError(e.to_string()))?,
            }),
        }
    }
}

/// One remembered rule, as the decision needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RememberedRule {
    /// `rem_...`; names the rule in decisions (`bots.BOT.remembered[rem_...]`).
    pub id: String,
    pub bot: String,
    pub resource: Resource,
}

/// Every remembered rule, indexed by bot. Immutable; swapped whole when a rule is added or
/// forgotten.
#[derive(Clone, Debug, Default)]
pub struct RememberedRules {
    by_bot: HashMap<String, Vec<RememberedRule>>,
    len: usize,
}

impl RememberedRules {
    pub fn new(rules: impl IntoIterator<Item = RememberedRule>) -> RememberedRules {
        let mut by_bot: HashMap<String, Vec<RememberedRule>> = HashMap::new();
        let mut len = 0;
        for rule in rules {
            len += 1;
            by_bot.entry(rule.bot.clone()).or_default().push(rule);
        }
        for rules in by_bot.values_mut() {
            rules.sort_by(|a, b| a.id.cmp(&b.id));
        }
        RememberedRules { by_bot, len }
    }

    /// The first of the bot's remembered rules that covers the request.
    pub fn covering(&self, bot: &str, request: &Request<'_>) -> Option<&RememberedRule> {
        self.by_bot
            .get(bot)?
            .iter()
            .find(|r| r.resource.covers(request))
    }

    pub fn for_bot(&self, bot: &str) -> &[RememberedRule] {
        self.by_bot.get(bot).map(Vec::as_slice).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gh(repos: &[&str], perms: &[&str]) -> Resource {
        let r: Vec<RepoName> = repos.iter().map(|r| r.parse().unwrap()).collect();
        let p: Vec<Permission> = perms.iter().map(|p| p.parse().unwrap()).collect();
        Resource::github(&r, &p)
    }

    #[test]
    fn normalised_and_covering() {
        assert_eq!(
            gh(&["A/y", "a/x", "a/y"], &["issues:read", "contents:write"]),
            gh(&["a/x", "a/y"], &["contents:write", "issues:read"])
        );
        let held = gh(&["a/x", "a/y"], &["contents:write", "issues:read"]);
        let cases: &[(&[&str], &[&str], bool)] = &[
            (&["a/x"], &["contents:read"], true),
            (&["a/x", "a/y"], &["contents:write", "issues:read"], true),
            (&["a/x"], &["issues:write"], false),
            (&["a/z"], &["contents:read"], false),
            (&["a/x"], &["pull_requests:read"], false),
            (&[], &["contents:read"], false),
            (&["a/x"], &[], false),
        ];
        for (repos, perms, want) in cases {
            let r: Vec<RepoName> = repos.iter().map(|r| r.parse().unwrap()).collect();
            let p: Vec<Permission> = perms.iter().map(|p| p.parse().unwrap()).collect();
            let req = Request::Github {
                repositories: &r,
                permissions: &p,
            };
            assert_eq!(held.covers(&req), *want, "{repos:?} {perms:?}");
        }
        let scope = Resource::Litellm {
            scope: "agent:write".into(),
        };
        assert!(scope.covers(&Request::Litellm {
            scope: "agent:write"
        }));
        assert!(!scope.covers(&Request::Litellm { scope: "ci" }));
        assert!(!held.covers(&Request::Litellm {
            scope: "agent:write"
        }));
    }

    #[test]
    fn wire_round_trip() {
        let r = gh(&["a/x"], &["contents:write"]);
        assert_eq!(Resource::from_wire(&r.to_wire()).unwrap(), r);
        let bad = ApprovalResource::GithubToken {
            repositories: vec!["a/x".into()],
            permissions: vec!["colour:write".into()],
        };
        assert!(Resource::from_wire(&bad).is_err());
    }

    #[test]
    fn indexed_by_bot() {
        let rules = RememberedRules::new([
            RememberedRule {
                id: "rem_b".into(),
                bot: "x".into(),
                resource: gh(&["a/x"], &["contents:read"]),
            },
            RememberedRule {
                id: "rem_a".into(),
                bot: "y".into(),
                resource: gh(&["a/x"], &["contents:write"]),
            },
        ]);
        assert_eq!(rules.len(), 2);
        let repos = ["a/x".parse().unwrap()];
        let perms = ["contents:write".parse().unwrap()];
        let req = Request::Github {
            repositories: &repos,
            permissions: &perms,
        };
        assert!(rules.covering("x", &req).is_none());
        assert_eq!(rules.covering("y", &req).unwrap().id, "rem_a");
        assert!(rules.for_bot("z").is_empty());
    }
}
