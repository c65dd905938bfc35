//! Upstream credential providers; each outside system gets its own module.

pub mod github;
pub mod litellm;

/// Longest piece of an upstream's error text kept in a message.
pub(crate) const MAX_MESSAGE_CHARS: usize = 300;

/// Opaque upstream text made safe for one log line or error message: no control characters
/// (no forged log lines), bounded length.
pub(crate) fn clean_text(s: &str) -> String {
    let mut out: String = s
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_MESSAGE_CHARS)
        .collect();
    if s.trim().chars().count() > MAX_MESSAGE_CHARS {
        out.push('…');
    }
    out
}
