//! `git-credential-botcreds`.
fn main() {}
