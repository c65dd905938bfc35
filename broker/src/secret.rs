//! Secret values: zeroized on drop, redacted in `Debug`, compared in constant time.

use std::fmt;

use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// A secret string (token, key, password). Its `Debug` and `Display` never show the value;
/// the only way to the bytes is [`Secret::expose`], which makes every use easy to find.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Constant-time comparison (length may leak; content does not).
    pub fn ct_eq(&self, other: &[u8]) -> bool {
        self.0.as_bytes().ct_eq(other).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

/// SHA-256 hex of a secret: the form in which keys are stored and tokens are named (shared with the
/// store, whose audit chain uses the same digest form).
pub use botcreds_store::sha256_hex;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_printed() {
        let s = Secret::new("ghs_topsecretvalue");
        assert!(!format!("{s:?} {s}").contains("topsecret"));
        assert!(s.ct_eq(b"ghs_topsecretvalue"));
        assert!(!s.ct_eq(b"ghs_topsecretvaluX"));
        assert!(!s.ct_eq(b"ghs_"));
    }
}
