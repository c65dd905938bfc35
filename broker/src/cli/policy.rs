//! `botcreds policy check FILE` and `botcreds policy explain`.

use std::path::Path;

use botcreds_proto::{Permission, RepoName};

use crate::policy::{Outcome, Policy, PolicyError, Request};

/// Validate a policy file offline; the summary on success.
pub fn check(path: &Path) -> Result<String, PolicyError> {
    let policy = Policy::load(path)?;
    Ok(format!(
        "{}: ok ({} bots)",
        path.display(),
        policy.bot_names().len()
    ))
}

/// What `explain` is asked about.
pub struct Question<'a> {
    pub bot: Option<&'a str>,
    pub repositories: &'a [String],
    pub permissions: &'a [String],
    pub scope: Option<&'a str>,
    /// `github_token` (default) or `deploy_key`.
    pub kind: Option<&'a str>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("{0}")]
    Policy(#[from] PolicyError),
    #[error("{0}")]
    Input(String),
}

/// Decide as the broker would and say which rule decided.
pub fn explain(path: &Path, q: &Question<'_>) -> Result<(Outcome, String), ExplainError> {
    let policy = Policy::load(path)?;
    if let Some(bot) = q.bot
        && !policy.has_bot(bot)
    {
        return Err(ExplainError::Input(format!(
            "the policy has no bot {bot:?} (bots: {})",
            policy.bot_names().join(", ")
        )));
    }
    let repositories = q
        .repositories
        .iter()
        .map(|r| {
            r.parse::<RepoName>()
                .map_err(|e| ExplainError::Input(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let permissions = q
        .permissions
        .iter()
        .map(|p| {
            p.parse::<Permission>()
                .map_err(|e| ExplainError::Input(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let request = match q.scope {
        Some(scope) => Request::Litellm { scope },
        None => {
            if repositories.is_empty() || permissions.is_empty() {
                return Err(ExplainError::Input(
                    "give --repo and --permissions (or --scope for a LiteLLM key)".into(),
                ));
            }
            match q.kind {
                None | Some("github_token") => Request::Github {
                    repositories: &repositories,
                    permissions: &permissions,
                },
                Some("deploy_key") => Request::DeployKey {
                    repositories: &repositories,
                    permissions: &permissions,
                },
                Some(other) => {
                    return Err(ExplainError::Input(format!(
                        "unknown kind {other:?}: github_token or deploy_key"
                    )));
                }
            }
        }
    };
    let decision = policy.decide_for_bot(q.bot, &request);
    let verdict = match decision.outcome {
        Outcome::Allow => "ALLOW (auto-approved)",
        Outcome::RequireApproval => "REQUIRES APPROVAL",
        Outcome::Deny => "DENY",
    };
    let who = match q.bot {
        Some(b) => format!(
            "{b} ({})",
            policy.identity_of(b).unwrap_or_else(|| "?".to_string())
        ),
        None => "a caller matching no bot".to_string(),
    };
    let what = match q.scope {
        Some(s) => format!("LiteLLM key scope {s}"),
        None => format!(
            "{}{} on {}",
            if q.kind == Some("deploy_key") {
                "deploy key "
            } else {
                ""
            },
            q.permissions.join(","),
            q.repositories.join(",")
        ),
    };
    let text = format!(
        "{verdict}\n  who:    {who}\n  asked:  {what}\n  rule:   {}\n  why:    {}\n",
        decision.rule, decision.explanation
    );
    Ok((decision.outcome, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explain_decides_deploy_keys_on_deploy_key_rules() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.yaml");
        std::fs::write(
            &path,
            "bots:\n  b:\n    identity: { type: api_key }\n    auto_approve:\n      - repo: \"o/*\"\n        permissions: [contents:write]\ndefaults:\n  requires_approval: false\n",
        )
        .unwrap();
        let repos = vec!["o/r".to_string()];
        let perms = vec!["contents:write".to_string()];
        let q = |kind| Question {
            bot: Some("b"),
            repositories: &repos,
            permissions: &perms,
            scope: None,
            kind,
        };
        assert_eq!(explain(&path, &q(None)).unwrap().0, Outcome::Allow);
        let (outcome, text) = explain(&path, &q(Some("deploy_key"))).unwrap();
        assert_eq!(outcome, Outcome::Deny, "{text}");
        assert!(text.contains("deploy key contents:write on o/r"), "{text}");
        assert!(explain(&path, &q(Some("ssh"))).is_err());
    }
}
