//! Display width: how many terminal columns a string takes (wide CJK characters take two,
//! combining marks none), and eliding the middle of a value that does not fit, so that both
//! ends (a pod name's hash, an address's port) stay readable.
use std::borrow::Cow;

use unicode_width::UnicodeWidthChar as _;

/// Columns `s` takes on a terminal. Input is already escaped (no controls), so every
/// character has a width.
pub(crate) fn width(s: &str) -> usize {
    s.chars().map(|c| c.width().unwrap_or(0)).sum()
}

/// `s` if it fits in `max` columns, else its start and end around `…`, at most `max` columns
/// wide (the end gets the extra column when the room is odd: suffixes tell names apart).
pub(crate) fn elide_middle(s: &str, max: usize) -> Cow<'_, str> {
    if width(s) <= max {
        return Cow::Borrowed(s);
    }
    if max == 0 {
        return Cow::Borrowed("");
    }
    let room = max - 1; // the ellipsis takes one column
    let (head_room, tail_room) = (room / 2, room - room / 2);
    let mut head = String::new();
    let mut used = 0;
    for c in s.chars() {
        let w = c.width().unwrap_or(0);
        if used + w > head_room {
            break;
        }
        head.push(c);
        used += w;
    }
    let mut tail: Vec<char> = Vec::new();
    let mut used = 0;
    for c in s.chars().rev() {
        let w = c.width().unwrap_or(0);
        if used + w > tail_room {
            break;
        }
        tail.push(c);
        used += w;
    }
    tail.reverse();
    Cow::Owned(format!("{head}…{}", tail.into_iter().collect::<String>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_untouched() {
        assert_eq!(elide_middle("web", 10), "web");
        assert!(matches!(elide_middle("web", 3), Cow::Borrowed(_)));
    }

    #[test]
    fn long_values_keep_both_ends_within_the_width() {
        let pod = "payments-api-7d9f8b6c5d-x2x9q";
        let e = elide_middle(pod, 15);
        assert_eq!(e, "payment…d-x2x9q");
        assert_eq!(width(&e), 15);
    }

    #[test]
    fn wide_characters_count_two_columns() {
        assert_eq!(width("日本語"), 6);
        let e = elide_middle("日本語のコンテナ名前", 9);
        assert!(width(&e) <= 9, "{e}");
        assert!(e.starts_with("日本") && e.ends_with("名前"), "{e}");
        assert_eq!(width("e\u{301}"), 1, "a combining accent takes no column");
    }
}
