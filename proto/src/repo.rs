//! Repository names, `owner/name`, validated the way GitHub names them.

use std::fmt;
use std::str::FromStr;

/// A GitHub repository `owner/name`, lower-cased (GitHub compares both parts case-insensitively).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RepoName {
    full: String,
    slash: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RepoError {
    #[error("repository {0:?} is not of the form owner/name")]
    Shape(String),
    #[error("repository owner {0:?} is not a valid GitHub account name")]
    Owner(String),
    #[error("repository name {0:?} is not a valid GitHub repository name")]
    Name(String),
}

/// GitHub account names: 1–39 ASCII letters, digits or single hyphens, not at either end.
pub fn valid_owner(owner: &str) -> bool {
    !owner.is_empty()
        && owner.len() <= 39
        && owner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !owner.starts_with('-')
        && !owner.ends_with('-')
}

/// GitHub repository names: 1–100 ASCII letters, digits, `.`, `-`, `_`; never `.` or `..`.
pub fn valid_repo_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        && name != "."
        && name != ".."
}

/// The repository part of a git URL path lower-cased, without one `.git` suffix (any case).
/// `None` when the name still ends in `.git` after that: `infra.git.git` must not become a
/// repository `infra.git` that a rule for `infra` does not name, and GitHub has no
/// repository whose name ends in `.git`.
pub fn strip_git_suffix(name: &str) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    let stripped = lower.strip_suffix(".git").unwrap_or(&lower);
    (!stripped.ends_with(".git")).then(|| stripped.to_string())
}

impl RepoName {
    pub fn owner(&self) -> &str {
        &self.full[..self.slash]
    }

    pub fn name(&self) -> &str {
        &self.full[self.slash + 1..]
    }

    pub fn as_str(&self) -> &str {
        &self.full
    }
}

impl FromStr for RepoName {
    type Err = RepoError;

    fn from_str(s: &str) -> Result<RepoName, RepoError> {
        let (owner, name) = s
            .split_once('/')
            .ok_or_else(|| RepoError::Shape(s.to_string()))?;
        if name.contains('/') {
            return Err(RepoError::Shape(s.to_string()));
        }
        if !valid_owner(owner) {
            return Err(RepoError::Owner(owner.to_string()));
        }
        let name = strip_git_suffix(name).ok_or_else(|| RepoError::Name(name.to_string()))?;
        if !valid_repo_name(&name) {
            return Err(RepoError::Name(name));
        }
        let full = format!("{}/{name}", owner.to_ascii_lowercase());
        Ok(RepoName {
            slash: owner.len(),
            full,
        })
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let long = format!("acme/{}", "x".repeat(300));
        let cases: &[(&str, Option<&str>)] = &[
            ("myorg/repo-a", Some("myorg/repo-a")),
            ("MyOrg/Repo.A", Some("myorg/repo.a")),
            ("acme-corp/web.git", Some("acme-corp/web")),
            ("acme-corp/web.GIT", Some("acme-corp/web")),
            // Regression (infra_git_git_normalises_past_deny): one `.git` is stripped, and a name
            // that still ends in `.git` is refused, so it can never slip past `deny owner/infra`.
            ("owner/infra.git.git", None),
            ("owner/infra.GIT.git", None),
            ("owner/infra.git", Some("owner/infra")),
            ("owner/.git", None),
            ("a/b_c", Some("a/b_c")),
            ("../x", None),
            ("x/..", None),
            ("x/.", None),
            ("my org/x", None),
            ("myorg/x y", None),
            ("myorg", None),
            ("myorg/", None),
            ("/x", None),
            ("a/b/c", None),
            ("-a/b", None),
            (&long, None),
        ];
        for (input, want) in cases {
            let got = input.parse::<RepoName>().ok().map(|r| r.to_string());
            assert_eq!(got.as_deref(), *want, "{input}");
        }
        let r: RepoName = "Acme/Web".parse().unwrap();
        assert_eq!((r.owner(), r.name()), ("acme", "web"));
    }
}
