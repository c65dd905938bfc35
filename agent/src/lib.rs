//! The botcreds per-host agent: keeps this host's GitHub credentials fresh, caches them in memory
//! and on disk, and hands them to git through a local socket (`git-credential-botcreds`).
//!
//! Entry point: [`daemon::run`]. The binary in `main.rs` only parses arguments and sets up
//! logging. [`local_client`] is std-only and shared with the git helper binary.

pub mod atomic;
pub mod broker_client;
pub mod cache;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod daemon;
pub mod enroll;
#[cfg(test)]
mod fake_broker;
pub mod litellm;
pub mod litellm_config;
pub mod local_client;
pub mod outputs;
pub mod peer;
pub mod refresh;
pub mod secret;
pub mod slot;
pub mod socket;
pub mod status;
pub mod systemd;
pub mod text;
pub mod tls;

pub use daemon::{AgentError, run};
