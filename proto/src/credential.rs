//! Credential requests and the credentials the broker answers with (`POST /v1/credentials`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What kind of credential a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    GithubToken,
    LitellmKey,
    /// An SSH deploy key for one repository, deleted at GitHub when it expires.
    DeployKey,
    /// An early draft's name for `deploy_key`: refused with `invalid_kind` naming the kind to use.
    SshDeployKey,
}

impl CredentialKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::GithubToken => "github_token",
            CredentialKind::LitellmKey => "litellm_key",
            CredentialKind::DeployKey => "deploy_key",
            CredentialKind::SshDeployKey => "ssh_deploy_key",
        }
    }
}

/// Body of `POST /v1/credentials`. Values are user input and stay strings here; the broker
/// validates them and answers each kind of bad value with its own error code.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialRequest {
    pub kind: Option<CredentialKind>,
    /// `owner/name` repositories the token must reach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repositories: Vec<String>,
    /// `name:level` GitHub App permissions, e.g. `contents:write`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<String>,
    /// LiteLLM scope (`workspace`, `user`, `ci`, `agent:review`, `agent:write`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Why the bot wants it; shown to approvers and kept in the audit log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The least lifetime the credential must still have when handed out (`10m`, `1h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// The `credential_id` of a credential the upstream rejected (git's `erase`): the broker
    /// will not hand that one out again and mints a fresh one instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
    /// For `litellm_key` requests of scope `workspace`: the Coder workspace the key serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<crate::litellm::WorkspaceInfo>,
    /// When the policy sends the request to a human: how long to hold the request open for
    /// the decision (`60s`). Approved in time, the answer is the credential; otherwise `202`
    /// with the approval request to long-poll.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<String>,
}

/// Ready-to-use git settings for a GitHub token (the seed's `git` object).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitAccess {
    /// `https://x-access-token:TOKEN@HOST/owner/repo.git` for the first repository.
    pub clone_url: String,
    /// One clone URL per repository, in request order.
    #[serde(default)]
    pub clone_urls: Vec<String>,
    /// A shell script for `GIT_ASKPASS` that prints the token.
    pub askpass_script: String,
}

/// Who a commit made with the token should be attributed to (the seed's `attribution`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attribution {
    /// The app's bot account, `app-slug[bot]`.
    pub name: String,
    /// `ID+app-slug[bot]@users.noreply.github.com`.
    pub email: String,
    /// Commit trailer naming the botcreds bot: `Bot: machina-bot`.
    pub trailer: String,
}

/// A GitHub installation token as the broker hands it out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GithubCredential {
    pub kind: CredentialKind,
    /// Stable, non-secret id of the token (`tok_` + a hash prefix of the token).
    pub credential_id: String,
    pub token: String,
    /// RFC 3339, UTC.
    pub expires_at: String,
    pub repositories: Vec<String>,
    /// What GitHub granted, `name -> level`.
    pub permissions: BTreeMap<String, String>,
    /// `auto` (policy) or `manual` (a human approved).
    pub approval: String,
    pub bot: String,
    pub git: GitAccess,
    pub attribution: Attribution,
}

impl std::fmt::Debug for GitAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitAccess")
            .field("clone_url", &"<redacted>")
            .field("clone_urls", &self.clone_urls.len())
            .field("askpass_script", &"<redacted>")
            .finish()
    }
}

impl std::fmt::Debug for GithubCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GithubCredential")
            .field("credential_id", &self.credential_id)
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .field("repositories", &self.repositories)
            .field("permissions", &self.permissions)
            .field("approval", &self.approval)
            .field("bot", &self.bot)
            .field("git", &self.git)
            .field("attribution", &self.attribution)
            .finish()
    }
}

/// Ready-to-use git settings for a deploy key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployKeyGit {
    /// `git@HOST:owner/repo.git`.
    pub ssh_url: String,
    /// For `GIT_SSH_COMMAND`, with `KEY_FILE` standing for where the caller saved the key:
    /// `ssh -i KEY_FILE -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes`.
    pub ssh_command: String,
}

/// An SSH deploy key as the broker hands it out, once: the broker keeps no copy of the
/// private key, and deletes the key at GitHub at `expires_at`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployKeyCredential {
    pub kind: CredentialKind,
    /// Stable, non-secret id (`dk_` + a hash prefix of the public key).
    pub credential_id: String,
    /// GitHub's id of the deploy key on the repository.
    pub key_id: u64,
    /// The ed25519 private key, OpenSSH format.
    pub private_key: String,
    /// The public key line as registered at GitHub.
    pub public_key: String,
    /// RFC 3339, UTC: when the broker deletes the key at GitHub.
    pub expires_at: String,
    /// `owner/name`.
    pub repository: String,
    /// `true` for `contents:read`, `false` for `contents:write`.
    pub read_only: bool,
    /// `auto`, `grant` or `manual`.
    pub approval: String,
    pub bot: String,
    pub git: DeployKeyGit,
}

impl Drop for DeployKeyCredential {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.private_key);
    }
}

impl std::fmt::Debug for DeployKeyCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeployKeyCredential")
            .field("credential_id", &self.credential_id)
            .field("key_id", &self.key_id)
            .field("private_key", &"<redacted>")
            .field("public_key", &self.public_key)
            .field("expires_at", &self.expires_at)
            .field("repository", &self.repository)
            .field("read_only", &self.read_only)
            .field("approval", &self.approval)
            .field("bot", &self.bot)
            .field("git", &self.git)
            .finish()
    }
}

/// `GET /v1/whoami`: how the broker sees the caller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoAmI {
    /// The policy bot the caller matched, if any.
    pub bot: Option<String>,
    /// `tailnet`, `api_key` or `mtls`.
    pub via: String,
    pub node: Option<String>,
    pub login: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    pub address: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_rejects_unknown_fields() {
        let err = serde_json::from_str::<CredentialRequest>(
            r#"{"kind":"github_token","repositories":[],"permissions":[],"colour":"red"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn deploy_key_kind_and_debug() {
        let kind: CredentialKind = serde_json::from_str(r#""deploy_key""#).unwrap();
        assert_eq!(kind, CredentialKind::DeployKey);
        assert_eq!(kind.as_str(), "deploy_key");
        let c = DeployKeyCredential {
            kind,
            credential_id: "dk_1".into(),
            key_id: 7,
            private_key: "-----BEGIN OPENSSH PRIVATE KEY-----\nsecretsecret".into(),
            public_key: "ssh-ed25519 AAAA".into(),
            expires_at: "2026-01-01T00:00:00Z".into(),
            repository: "a/b".into(),
            read_only: true,
            approval: "auto".into(),
            bot: "b".into(),
            git: DeployKeyGit {
                ssh_url: "git@github.com:a/b.git".into(),
                ssh_command: "ssh -i KEY_FILE".into(),
            },
        };
        assert!(!format!("{c:?}").contains("secret"));
    }

    #[test]
    fn debug_never_shows_the_token() {
        let c = GithubCredential {
            kind: CredentialKind::GithubToken,
            credential_id: "tok_1".into(),
            token: "ghs_secretsecret".into(),
            expires_at: "2026-01-01T00:00:00Z".into(),
            repositories: vec!["a/b".into()],
            permissions: BTreeMap::new(),
            approval: "auto".into(),
            bot: "b".into(),
            git: GitAccess {
                clone_url: "https://x-access-token:ghs_secretsecret@github.com/a/b.git".into(),
                clone_urls: vec![],
                askpass_script: "#!/bin/sh\necho ghs_secretsecret".into(),
            },
            attribution: Attribution {
                name: "n".into(),
                email: "e".into(),
                trailer: "t".into(),
            },
        };
        assert!(!format!("{c:?}").contains("secret"));
    }
}
