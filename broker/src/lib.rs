//! The botcreds broker: identity, policy, grants, providers, store, audit and the HTTP API.
//!
//! `server::run` is the entry point; `main.rs` only parses arguments and calls it. See
//! `docs/ARCHITECTURE.md` for the map.

pub mod api;
pub mod approvals;
pub mod audit;
pub mod cli;
pub mod clock;
pub mod config;
pub mod connections;
pub mod dev;
pub mod error;
pub mod grants;
pub mod identity;
pub mod issuance;
pub mod issued;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod notify;
pub mod providers;
pub mod reload;
pub mod secret;
pub mod server;
pub mod settings;
pub mod store;
pub mod tls;
pub mod web;

// The policy engine is its own crate so "policy is pure" is checked by the compiler (it has no
// I/O dependencies); `crate::policy::…` stays the broker's path to it.
pub use botcreds_policy as policy;
