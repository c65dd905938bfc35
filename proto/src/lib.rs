//! Wire types shared by the botcreds broker, agent and CLI. Plain data, no I/O.
//!
//! Request bodies carry user input as plain strings; the broker parses them into the
//! validated types here ([`Permission`], [`RepoName`], [`Ttl`]) at the edge, so each kind of
//! bad input gets its own stable [`ErrorCode`].

pub mod agent;
pub mod approval;
pub mod audit;
pub mod credential;
pub mod enroll;
pub mod error;
pub mod git_credential;
pub mod litellm;
pub mod permission;
pub mod repo;
pub mod ttl;

pub use approval::{ApprovalRequestView, ApprovalResource, ApprovalState, DecisionAnswer};
pub use audit::{AuditEvent, AuditEventKind};
pub use credential::{
    Attribution, CredentialKind, CredentialRequest, DeployKeyCredential, DeployKeyGit, GitAccess,
    GithubCredential,
};
pub use error::{ErrorBody, ErrorCode};
pub use permission::{Level, Permission, PermissionError};
pub use repo::{RepoError, RepoName};
pub use ttl::{Ttl, TtlError};

/// Largest request body any botcreds endpoint accepts.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
