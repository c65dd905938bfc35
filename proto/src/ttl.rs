//! Lifetimes written as durations: `90s`, `10m`, `1h`, `24h`, `7d`, or combinations like `1h30m`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A positive duration parsed from the short form used in configs, policies and requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ttl(Duration);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TtlError {
    #[error("duration {0:?} is not like 90s, 10m, 1h or 7d")]
    Malformed(String),
    #[error("duration {0:?} must be greater than zero")]
    Zero(String),
    #[error("duration {0:?} is too large")]
    Overflow(String),
}

impl Ttl {
    pub const fn from_secs(secs: u64) -> Ttl {
        Ttl(Duration::from_secs(secs))
    }

    pub fn as_duration(self) -> Duration {
        self.0
    }

    pub fn as_secs(self) -> u64 {
        self.0.as_secs()
    }
}

impl FromStr for Ttl {
    type Err = TtlError;

    fn from_str(s: &str) -> Result<Ttl, TtlError> {
        let malformed = || TtlError::Malformed(s.to_string());
        if s.is_empty() || s.len() > 32 {
            return Err(malformed());
        }
        let mut total: u64 = 0;
        let mut digits = String::new();
        let mut saw_unit = false;
        for c in s.chars() {
            if c.is_ascii_digit() {
                digits.push(c);
                continue;
            }
            let unit: u64 = match c {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86_400,
                'w' => 7 * 86_400,
                _ => return Err(malformed()),
            };
            if digits.is_empty() {
                return Err(malformed());
            }
            let n: u64 = digits
                .parse()
                .map_err(|_| TtlError::Overflow(s.to_string()))?;
            total = n
                .checked_mul(unit)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(|| TtlError::Overflow(s.to_string()))?;
            digits.clear();
            saw_unit = true;
        }
        if !digits.is_empty() || !saw_unit {
            return Err(malformed());
        }
        if total == 0 {
            return Err(TtlError::Zero(s.to_string()));
        }
        if total > 100 * 365 * 86_400 {
            return Err(TtlError::Overflow(s.to_string()));
        }
        Ok(Ttl(Duration::from_secs(total)))
    }
}

impl fmt::Display for Ttl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut secs = self.0.as_secs();
        if secs == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
            if secs >= size {
                write!(f, "{}{unit}", secs / size)?;
                secs %= size;
            }
        }
        Ok(())
    }
}

impl serde::Serialize for Ttl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Ttl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Ttl, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases: &[(&str, Option<u64>)] = &[
            ("90s", Some(90)),
            ("10m", Some(600)),
            ("1h", Some(3600)),
            ("1h30m", Some(5400)),
            ("24h", Some(86_400)),
            ("7d", Some(604_800)),
            ("2w", Some(1_209_600)),
            ("", None),
            ("1", None),
            ("h", None),
            ("0s", None),
            ("1.5h", None),
            ("-1h", None),
            ("1 h", None),
            ("1y", None),
            ("99999999999999999999h", None),
            ("soon", None),
        ];
        for (input, want) in cases {
            assert_eq!(
                input.parse::<Ttl>().ok().map(Ttl::as_secs),
                *want,
                "{input}"
            );
        }
        assert_eq!(Ttl::from_secs(5400).to_string(), "1h30m");
    }
}
