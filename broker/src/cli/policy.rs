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
            Request::Github {
                repositories: &repositories,
                permissions: &permissions,
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
            "{} on {}",
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
