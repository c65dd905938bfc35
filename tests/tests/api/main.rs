//! The in-process API tests: the broker's handlers through `botcreds_broker::server::run` in
//! the test's runtime (`botcreds_tests::inprocess`), against the same doubles the real-binary
//! suites use. Each module holds the handler-level cases of one of those suites — validation
//! tables, refusal codes, answer shapes — that need no real process, signal, crash, agent,
//! browser or real LiteLLM: `credentials` (from `broker_e2e`), `attacks` (from
//! `security_attacks`), `keys` (from `security_keys`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod attacks;
mod credentials;
mod keys;
