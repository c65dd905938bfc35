//! Upstream credential providers; each outside system gets its own module.

pub mod github;
pub mod litellm;
