//! The one place outside text is made safe for a terminal. Process names, command lines,
//! container names, labels and interface names come from whoever runs a container, and
//! bindtrace prints them on a root terminal: every text sink and every stderr line passes them
//! through here, so no byte a tenant controls can move the cursor, change the title, reorder
//! the line (bidi controls) or start a line of its own.
//!
//! Escaped, visibly and reversibly (`\u{1b}`, `\\`): C0 and C1 controls, DEL, the bidi
//! embeddings, overrides and isolates, zero-width and other invisible format characters, the
//! line and paragraph separators, and the backslash itself (so an escape in the input cannot
//! pass for one of ours). `char::is_control` alone misses the bidi and format characters.
//! JSON lines need none of this: serde escapes controls, and a JSON reader does not render.
use std::{borrow::Cow, fmt::Write as _};

/// Characters a terminal may act on or hide, beyond the backslash.
pub(crate) fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00ad}'
                | '\u{061c}'
                | '\u{180e}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{206f}'
                | '\u{feff}'
                | '\u{fff9}'..='\u{fffb}'
        )
}

/// `s` with every character a terminal could act on escaped; free text (a hint, a log
/// message) that stays on one line and shows what it holds.
pub(crate) fn escaped(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c == '\\' || needs_escape(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `s` as one field among others: [`escaped`], and quoted when it holds white space (any of
/// Unicode's: a no-break or ideographic space splits a field for a reader as well as an ASCII
/// one), a quote or nothing at all, so that it cannot pass for two fields or for the text
/// around it.
pub(crate) fn field(s: &str) -> Cow<'_, str> {
    let e = escaped(s);
    if !e.is_empty() && !e.contains(|c: char| c.is_whitespace() || c == '"') {
        return e;
    }
    Cow::Owned(format!("\"{}\"", e.replace('"', "\\\"")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_controls_are_shown_not_sent() {
        let hostile = "\u{1b}]0;PWNED\u{7}\u{1b}[2J\rfake\nline\u{9b}\u{7f}";
        let e = escaped(hostile);
        assert!(!e.chars().any(|c| c.is_control()), "{e}");
        assert_eq!(e, "\\u{1b}]0;PWNED\\u{7}\\u{1b}[2J\\u{d}fake\\u{a}line\\u{9b}\\u{7f}");
    }

    #[test]
    fn bidi_and_invisible_characters_are_escaped() {
        for c in ['\u{202e}', '\u{2066}', '\u{2069}', '\u{200b}', '\u{200f}', '\u{feff}', '\u{2028}'] {
            let s = format!("a{c}b");
            assert_eq!(escaped(&s), format!("a\\u{{{:x}}}b", c as u32), "{:x}", c as u32);
        }
    }

    #[test]
    fn backslashes_cannot_pass_for_our_escapes() {
        assert_eq!(escaped(r"\u{1b}"), r"\\u{1b}");
        assert_eq!(escaped("plain text, ünïcode ok"), "plain text, ünïcode ok");
        assert!(matches!(escaped("gunicorn"), Cow::Borrowed(_)));
    }

    #[test]
    fn fields_with_spaces_or_quotes_are_quoted() {
        assert_eq!(field("curl"), "curl");
        assert_eq!(field("curl (pid 1) in container db"), "\"curl (pid 1) in container db\"");
        assert_eq!(field("a\"b"), "\"a\\\"b\"");
        assert_eq!(field(""), "\"\"");
        assert_eq!(field("x\ny"), "x\\u{a}y");
    }

    /// Unicode spaces went unquoted (what the sanitiser fuzz target checks).
    #[test]
    fn fields_with_unicode_spaces_are_quoted() {
        for space in ['\u{a0}', '\u{2009}', '\u{3000}', '\u{1680}'] {
            let s = format!("curl{space}(pid 1)");
            assert_eq!(field(&s), format!("\"{s}\""), "{:x}", space as u32);
        }
    }
}
