//! GitHub App permissions: a name from GitHub's `app-permissions` schema and a level.

use std::fmt;
use std::str::FromStr;

/// Access level of a permission. Order matters: `read < write < admin`, and a higher level
/// covers a lower one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Read,
    Write,
    Admin,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Read => "read",
            Level::Write => "write",
            Level::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Level> {
        match s {
            "read" => Some(Level::Read),
            "write" => Some(Level::Write),
            "admin" => Some(Level::Admin),
            _ => None,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const RW: &[Level] = &[Level::Read, Level::Write];
const RWA: &[Level] = &[Level::Read, Level::Write, Level::Admin];
const R: &[Level] = &[Level::Read];
const W: &[Level] = &[Level::Write];

/// Every permission GitHub's `app-permissions` schema knows (api.github.com, plus the
/// GHEC/GHES additions), with the levels it accepts.
pub const KNOWN_PERMISSIONS: &[(&str, &[Level])] = &[
    ("actions", RW),
    ("administration", RW),
    ("artifact_metadata", RW),
    ("attestations", RW),
    ("checks", RW),
    ("code_quality", RW),
    ("codespaces", RW),
    ("contents", RW),
    ("dependabot_secrets", RW),
    ("deployments", RW),
    ("discussions", RW),
    ("environments", RW),
    ("issues", RW),
    ("merge_queues", RW),
    ("metadata", RW),
    ("packages", RW),
    ("pages", RW),
    ("pull_requests", RW),
    ("repository_custom_properties", RW),
    ("repository_hooks", RW),
    ("repository_projects", RWA),
    ("secret_scanning_alerts", RW),
    ("secrets", RW),
    ("security_events", RW),
    ("single_file", RW),
    ("statuses", RW),
    ("vulnerability_alerts", RW),
    ("workflows", W),
    ("custom_properties_for_organizations", RW),
    ("members", RW),
    ("organization_administration", RW),
    ("organization_custom_roles", RW),
    ("organization_custom_org_roles", RW),
    ("organization_custom_properties", RWA),
    ("organization_copilot_seat_management", RW),
    ("organization_copilot_agent_settings", RW),
    ("organization_announcement_banners", RW),
    ("organization_events", R),
    ("organization_hooks", RW),
    ("organization_personal_access_tokens", RW),
    ("organization_personal_access_token_requests", RW),
    ("organization_plan", R),
    ("organization_projects", RWA),
    ("organization_packages", RW),
    ("organization_secrets", RW),
    ("organization_self_hosted_runners", RW),
    ("organization_user_blocking", RW),
    ("email_addresses", RW),
    ("followers", RW),
    ("git_ssh_keys", RW),
    ("gpg_keys", RW),
    ("interaction_limits", RW),
    ("profile", W),
    ("starring", RW),
    ("enterprise_custom_properties_for_organizations", RWA),
    ("enterprise_administration", RW),
    ("enterprise_custom_properties", RW),
    ("enterprise_organization_installations", RW),
    ("enterprise_organization_installation_repositories", RW),
];

/// The levels GitHub accepts for a permission name, or `None` for an unknown name.
pub fn known_levels(name: &str) -> Option<&'static [Level]> {
    KNOWN_PERMISSIONS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, levels)| *levels)
}

/// A GitHub App permission with its level, written `name:level` (`contents:write`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Permission {
    name: &'static str,
    level: Level,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PermissionError {
    #[error("permission {0:?} is not of the form name:level (e.g. contents:write)")]
    Malformed(String),
    #[error("unknown permission {0:?}")]
    UnknownName(String),
    #[error("unknown level {level:?} in permission {input:?} (read, write or admin)")]
    UnknownLevel { input: String, level: String },
    #[error("permission {name:?} has no level {level}; it accepts {accepted}")]
    LevelNotAccepted {
        name: String,
        level: Level,
        accepted: String,
    },
}

impl Permission {
    pub fn new(name: &str, level: Level) -> Result<Permission, PermissionError> {
        let (static_name, levels) = KNOWN_PERMISSIONS
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| PermissionError::UnknownName(name.to_string()))?;
        if !levels.contains(&level) {
            return Err(PermissionError::LevelNotAccepted {
                name: name.to_string(),
                level,
                accepted: levels
                    .iter()
                    .map(|l| l.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        Ok(Permission {
            name: static_name,
            level,
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn level(&self) -> Level {
        self.level
    }

    /// Whether holding `self` is enough for a request of `other`: same name, level at least as high.
    pub fn covers(&self, other: &Permission) -> bool {
        self.name == other.name && self.level >= other.level
    }

    /// Admin-level requests: the `admin` level itself, and write access to a repository's or
    /// organization's administration.
    pub fn is_admin_level(&self) -> bool {
        self.level == Level::Admin
            || (self.level == Level::Write
                && matches!(self.name, "administration" | "organization_administration"))
    }
}

impl FromStr for Permission {
    type Err = PermissionError;

    fn from_str(s: &str) -> Result<Permission, PermissionError> {
        let (name, level) = s
            .split_once(':')
            .ok_or_else(|| PermissionError::Malformed(s.to_string()))?;
        if name.is_empty() || level.is_empty() || level.contains(':') {
            return Err(PermissionError::Malformed(s.to_string()));
        }
        let level = Level::parse(level).ok_or_else(|| PermissionError::UnknownLevel {
            input: s.to_string(),
            level: level.to_string(),
        })?;
        Permission::new(name, level)
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays() {
        let cases = [
            ("contents:write", Ok("contents:write")),
            ("issues:read", Ok("issues:read")),
            ("workflows:write", Ok("workflows:write")),
            (
                "organization_projects:admin",
                Ok("organization_projects:admin"),
            ),
            ("contents", Err("not of the form")),
            ("contents:", Err("not of the form")),
            (":read", Err("not of the form")),
            ("contents:write:x", Err("not of the form")),
            ("content:write", Err("unknown permission")),
            ("pull-requests:write", Err("unknown permission")),
            ("contents:owner", Err("unknown level")),
            ("contents:admin", Err("has no level admin")),
            ("workflows:read", Err("has no level read")),
        ];
        for (input, want) in cases {
            match (input.parse::<Permission>(), want) {
                (Ok(p), Ok(s)) => assert_eq!(p.to_string(), s, "{input}"),
                (Err(e), Err(msg)) => assert!(e.to_string().contains(msg), "{input}: {e}"),
                (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn write_covers_read_not_the_reverse() {
        let w: Permission = "contents:write".parse().unwrap();
        let r: Permission = "contents:read".parse().unwrap();
        let i: Permission = "issues:read".parse().unwrap();
        assert!(w.covers(&r));
        assert!(w.covers(&w));
        assert!(!r.covers(&w));
        assert!(!w.covers(&i));
    }

    #[test]
    fn admin_level() {
        for (p, admin) in [
            ("administration:write", true),
            ("administration:read", false),
            ("repository_projects:admin", true),
            ("contents:write", false),
        ] {
            assert_eq!(
                p.parse::<Permission>().unwrap().is_admin_level(),
                admin,
                "{p}"
            );
        }
    }
}
