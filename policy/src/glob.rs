//! Patterns in policy rules: repository globs (`myorg/sensitive-*`, `*/infra`) and LiteLLM scope
//! globs (`agent:*`). `*` matches any run of characters and never crosses the `/` of a repository.

use botcreds_proto::RepoName;
use botcreds_proto::repo::{strip_git_suffix, valid_owner, valid_repo_name};

/// LiteLLM key scopes the broker knows (the key-provisioner design's table).
pub const LITELLM_SCOPES: &[&str] = &["workspace", "user", "ci", "agent:review", "agent:write"];

/// GitHub's limits on account and repository names; a pattern segment is held to the same
/// length so a typo'd novel cannot slip in.
const MAX_OWNER_LEN: usize = 39;
const MAX_NAME_LEN: usize = 100;

/// One side of a repository pattern, compiled so the common cases skip the wildcard matcher.
#[derive(Clone, Debug)]
enum Segment {
    /// `*`: anything.
    Any,
    /// No `*`: plain equality.
    Literal(Box<str>),
    /// Contains `*` somewhere.
    Pattern(Box<str>),
}

impl Segment {
    fn compile(text: &str) -> Segment {
        if text.bytes().all(|b| b == b'*') {
            Segment::Any
        } else if text.contains('*') {
            Segment::Pattern(text.into())
        } else {
            Segment::Literal(text.into())
        }
    }

    fn matches(&self, text: &str) -> bool {
        match self {
            Segment::Any => true,
            Segment::Literal(l) => **l == *text,
            Segment::Pattern(p) => wildcard_match(p.as_bytes(), text.as_bytes()),
        }
    }
}

/// A validated `owner/name` pattern, lower-cased like [`RepoName`].
#[derive(Clone, Debug)]
pub struct RepoGlob {
    source: Box<str>,
    owner: Segment,
    name: Segment,
}

impl RepoGlob {
    /// Parses and validates a pattern; the error is a sentence for the policy author.
    pub fn parse(input: &str) -> Result<RepoGlob, String> {
        let bad = |why: &str| format!("bad repository pattern {input:?}: {why}");
        let lower = input.to_ascii_lowercase();
        let Some((owner, name)) = lower.split_once('/') else {
            return Err(bad("expected owner/name, e.g. myorg/repo-a or myorg/*"));
        };
        if name.contains('/') {
            return Err(bad("expected exactly one '/' (owner/name)"));
        }
        if owner.is_empty() || name.is_empty() {
            return Err(bad("owner and name must both be given (use * for any)"));
        }
        if owner.len() > MAX_OWNER_LEN {
            return Err(bad("owner is longer than GitHub allows (39)"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(bad("name is longer than GitHub allows (100)"));
        }
        if let Some(c) = owner
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '*')))
        {
            return Err(bad(&format!(
                "{c:?} cannot appear in an owner (letters, digits, '-' and '*')"
            )));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '*')))
        {
            return Err(bad(&format!(
                "{c:?} cannot appear in a repository name (letters, digits, '.', '-', '_' and '*')"
            )));
        }
        if !owner.contains('*') && !valid_owner(owner) {
            return Err(bad("owner is not a valid GitHub account name"));
        }
        // Requests name repositories without `.git` (RepoName strips it), so a literal rule
        // must too or it would never match.
        let name = if name.contains('*') {
            name.to_string()
        } else {
            // The same normalisation as RepoName: one `.git` off, and never a name that
            // still ends in `.git` (no repository has one, so such a rule names nothing).
            let Some(stripped) = strip_git_suffix(name) else {
                return Err(bad("the name still ends in .git after removing one .git"));
            };
            if !valid_repo_name(&stripped) {
                return Err(bad("name is not a valid GitHub repository name"));
            }
            stripped
        };
        Ok(RepoGlob {
            source: format!("{owner}/{name}").into(),
            owner: Segment::compile(owner),
            name: Segment::compile(&name),
        })
    }

    pub fn matches(&self, repo: &RepoName) -> bool {
        self.owner.matches(repo.owner()) && self.name.matches(repo.name())
    }

    /// `*/*`: the only pattern that covers a request for every repository of an installation.
    pub fn matches_every_repository(&self) -> bool {
        matches!((&self.owner, &self.name), (Segment::Any, Segment::Any))
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

/// A validated LiteLLM scope pattern: a known scope, `*`, or a glob matching at least one scope.
#[derive(Clone, Debug)]
pub struct ScopeGlob {
    source: Box<str>,
}

impl ScopeGlob {
    pub fn parse(input: &str) -> Result<ScopeGlob, String> {
        let known = LITELLM_SCOPES.join(", ");
        if input.is_empty() {
            return Err(format!("litellm_scope is empty; use one of {known} or *"));
        }
        // A pattern that matches no scope is always a typo (`agent:wirte`, `Workspace`).
        if !LITELLM_SCOPES
            .iter()
            .any(|s| wildcard_match(input.as_bytes(), s.as_bytes()))
        {
            return Err(format!(
                "unknown LiteLLM scope {input:?}; use one of {known}, or a pattern such as agent:* or *"
            ));
        }
        Ok(ScopeGlob {
            source: input.into(),
        })
    }

    pub fn matches(&self, scope: &str) -> bool {
        wildcard_match(self.source.as_bytes(), scope.as_bytes())
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of bytes (including none).
///
/// The classic two-pointer algorithm: on a mismatch after a `*`, retry one byte further.
/// Worst case O(len(pattern) × len(text)), which the length limits above keep small.
pub fn wildcard_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<usize> = None;
    let mut resume = 0;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some(p);
                resume = t;
                p += 1;
            }
            Some(&c) if c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some(s) => {
                    p = s + 1;
                    resume += 1;
                    t = resume;
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_table() {
        let cases = [
            ("*", "", true),
            ("*", "abc", true),
            ("abc", "abc", true),
            ("abc", "abd", false),
            ("a*", "abc", true),
            ("*c", "abc", true),
            ("a*c", "abbbc", true),
            ("a*c", "abbbd", false),
            ("sensitive-*", "sensitive-", true),
            ("sensitive-*", "sensitive-db", true),
            ("sensitive-*", "insensitive-db", false),
            ("*-*-x", "a-b-c-x", true),
            ("*ab*ab", "xabyab", true),
            ("*ab*ab", "xabyaba", false),
            ("", "", true),
            ("", "a", false),
        ];
        for (p, t, want) in cases {
            assert_eq!(
                wildcard_match(p.as_bytes(), t.as_bytes()),
                want,
                "{p} vs {t}"
            );
        }
    }

    #[test]
    fn repo_glob_table() {
        let repo = |s: &str| s.parse::<RepoName>().unwrap();
        let cases = [
            ("myorg/repo-a", "myorg/repo-a", true),
            ("myorg/repo-a", "myorg/repo-b", false),
            ("MyOrg/Repo-A", "myorg/repo-a", true),
            ("myorg/repo-a", "MYORG/REPO-A", true),
            ("myorg/sensitive-*", "myorg/sensitive-db", true),
            ("myorg/sensitive-*", "myorg/not-sensitive", false),
            ("myorg/sensitive-*", "other/sensitive-db", false),
            ("*/infra", "acme/infra", true),
            ("*/infra", "acme/infra-2", false),
            ("myorg/*", "myorg/x", true),
            ("my*/x", "myorg/x", true),
            ("*/*", "a/b", true),
            ("myorg/web.git", "myorg/web", true),
            ("myorg/web.GIT", "myorg/web", true),
            ("myorg/infra", "myorg/infra.git", true),
            ("myorg/infra", "MyOrg/Infra.GIT", true),
        ];
        for (glob, name, want) in cases {
            let g = RepoGlob::parse(glob).unwrap();
            assert_eq!(g.matches(&repo(name)), want, "{glob} vs {name}");
        }
        assert!(RepoGlob::parse("*/*").unwrap().matches_every_repository());
        assert!(
            !RepoGlob::parse("myorg/*")
                .unwrap()
                .matches_every_repository()
        );
        assert_eq!(RepoGlob::parse("MyOrg/X-*").unwrap().as_str(), "myorg/x-*");
    }

    #[test]
    fn repo_glob_rejects() {
        let long = format!("a/{}", "x".repeat(101));
        let cases = [
            ("myorg", "owner/name"),
            ("a/b/c", "exactly one"),
            ("/x", "both"),
            ("x/", "both"),
            ("my org/x", "cannot appear in an owner"),
            ("my_org/x", "cannot appear in an owner"),
            ("myorg/x y", "cannot appear in a repository name"),
            ("myorg/x?", "cannot appear in a repository name"),
            ("myörg/x", "cannot appear in an owner"),
            ("-org/x", "not a valid GitHub account"),
            ("org/..", "not a valid GitHub repository"),
            // infra_git_git_normalises_past_deny: a rule for `infra.git.git` names no repository.
            ("org/infra.git.git", "ends in .git"),
            (long.as_str(), "longer than GitHub allows"),
        ];
        for (input, want) in cases {
            let err = RepoGlob::parse(input).unwrap_err();
            assert!(err.contains(want), "{input}: {err}");
        }
    }

    #[test]
    fn scope_glob_table() {
        for (glob, scope, want) in [
            ("agent:write", "agent:write", true),
            ("agent:write", "agent:review", false),
            ("agent:*", "agent:review", true),
            ("agent:*", "workspace", false),
            ("*", "ci", true),
        ] {
            assert_eq!(
                ScopeGlob::parse(glob).unwrap().matches(scope),
                want,
                "{glob} {scope}"
            );
        }
        for bad in ["", "agent:wirte", "Workspace", "admin"] {
            assert!(ScopeGlob::parse(bad).is_err(), "{bad}");
        }
    }
}
