//! Who is calling: every request resolves to one [`Caller`] before anything else happens.
//!
//! Sources, in order: an API key in `Authorization: Bearer` (checked in constant time against
//! stored hashes), else the tailnet identity of the connection's real peer address (tailscaled
//! WhoIs). On the mTLS listener the verified client certificate is the identity (see
//! `crate::tls`). Nothing downstream trusts a header for identity.

pub mod admin;
pub mod api_key;
pub mod config;
pub mod tailnet;

// The types live in the pure policy crate so the policy can match callers without depending on
// the broker; these re-exports keep `crate::identity::Caller` the one path the broker uses.
pub use botcreds_policy::caller::{Caller, CallerVia, TailnetIdentity};
