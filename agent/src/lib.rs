//! The botcreds per-host agent.
