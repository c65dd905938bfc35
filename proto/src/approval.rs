//! Approval request states: `PENDING → APPROVED → ISSUED`, or `DENIED`, or `EXPIRED`.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ApprovalState {
    Pending,
    Approved,
    Issued,
    Denied,
    Expired,
}

impl ApprovalState {
    /// Whether a human (or the clock) has already decided.
    pub fn is_decided(self) -> bool {
        !matches!(self, ApprovalState::Pending)
    }
}
