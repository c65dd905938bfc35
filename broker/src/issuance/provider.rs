//! [`Provider`]: one credential kind, as the issuance service sees it. The service owns the
//! order of work (validate → decide → approval or wait → mint → audit → metrics); a provider
//! knows its kind's request fields, the resource the policy decides on, and how to mint.

use std::time::Duration;

use async_trait::async_trait;
use botcreds_proto::CredentialRequest;
use botcreds_proto::audit::AuditEvent;
use botcreds_proto::litellm::WorkspaceInfo;

use super::{Credential, IssueError};
use crate::identity::Caller;
use crate::issued::Approval;
use crate::policy::Decision;
use crate::policy::remembered::Resource;

/// Longest request `reason`, in bytes.
const MAX_REASON_BYTES: usize = 1024;

/// A request's `reason`, as every kind takes it: at most [`MAX_REASON_BYTES`] bytes of
/// printable text.
pub fn validate_reason(reason: Option<&str>) -> Result<Option<String>, IssueError> {
    match reason {
        Some(text) if text.len() > MAX_REASON_BYTES || text.chars().any(char::is_control) => {
            Err(IssueError::InvalidReason(format!(
                "the reason must be at most {MAX_REASON_BYTES} bytes of printable text"
            )))
        }
        other => Ok(other.map(str::to_string)),
    }
}

/// What a validated request asks for, in the terms approvals store: the resource, the life
/// the credential must still have, the reason, and a LiteLLM workspace key's workspace.
#[derive(Clone, Debug)]
pub struct Subject {
    pub resource: Resource,
    pub min_ttl: Duration,
    pub reason: Option<String>,
    pub workspace: Option<WorkspaceInfo>,
}

/// The policy in force, asked again right before an answer; `Some` is its refusal.
pub type Recheck<'a> = &'a (dyn Fn() -> Option<Decision> + Send + Sync);

/// One mint (or reuse) for a request the policy allowed, a grant covered or an admin approved.
pub struct Mint<'a, A> {
    pub caller: &'a Caller,
    pub bot: Option<&'a str>,
    /// The rule (or grant) that allowed it.
    pub rule: &'a str,
    pub approval: &'a Approval,
    pub ask: &'a A,
    /// The credential the client reports rejected, to be replaced rather than answered again.
    pub replaces: Option<&'a str>,
    /// Audit events to make durable in the same flush as the issue (the request).
    pub before: Vec<AuditEvent>,
    /// Asked right before the answer; its refusal withholds the credential.
    pub recheck: Recheck<'a>,
}

/// What a mint came to.
pub enum Minted<C> {
    /// Handed out; its events (with `before`) are durable.
    Issued(C),
    /// The recheck refused. A credential minted for the request was withdrawn and its end
    /// audited; `before_recorded` says whether `before` was made durable already (it was when
    /// the credential existed before the recheck could run).
    Refused {
        decision: Decision,
        before_recorded: bool,
    },
}

/// One credential kind. Adding a kind is an implementation of this trait, a variant of
/// [`Credential`] (its answer), a [`Resource`] variant (its policy rule shape) and its config
/// section; the service's order of work stays as it is.
#[async_trait]
pub trait Provider: Send + Sync {
    /// A validated request of this kind.
    type Ask: Send + Sync;
    /// What the bot is answered.
    type Answer: Into<Credential> + Send;

    /// Parse and check the request's fields of this kind.
    fn validate(&self, request: &CredentialRequest) -> Result<Self::Ask, IssueError>;

    /// What the policy decides on and an approval request records.
    fn subject(&self, ask: &Self::Ask) -> Subject;

    /// The ask of an approved request, from what its approval stored.
    fn ask_for(&self, subject: Subject) -> Result<Self::Ask, IssueError>;

    /// Fill this kind's fields of the `credential_requested` event.
    fn describe(&self, ask: &Self::Ask, event: &mut AuditEvent);

    /// Whether the recheck before an auto-approved answer also withholds it when the policy
    /// now wants a human (the request then goes to approval), or only when it now denies.
    fn recheck_wants_approval(&self) -> bool;

    /// Mint or reuse, record `before` and the issue's events durably, and build the answer;
    /// refused when `recheck` refuses right before the answer. On an error nothing of
    /// `before` was recorded.
    async fn mint(&self, m: Mint<'_, Self::Ask>) -> Result<Minted<Self::Answer>, IssueError>;

    /// The answer's credential id (an approval request is marked issued with it).
    fn credential_id(answer: &Self::Answer) -> &str;
}
