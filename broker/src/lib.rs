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
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod providers;
pub mod reload;
pub mod secret;
pub mod server;
pub mod store;
pub mod tls;
pub mod web;
