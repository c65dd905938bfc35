//! `botcreds-agent`.
fn main() {}
