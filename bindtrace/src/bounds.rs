//! How much of what others control bindtrace keeps. Containers choose their process names,
//! command lines, labels and how many sockets and processes they have; none of it may grow a
//! line, a report or bindtrace's memory without limit. What is cut is counted and said.
//!
//! | what | kept | the rest |
//! |---|---|---|
//! | a process's command line | [`CMDLINE_BYTES`] bytes | `cmdline_truncated` (bytes) in JSON |
//! | processes listed per listening socket | [`HOLDERS`] | `pids_omitted` in JSON, `+N more` in text |
//! | listeners listed per line | [`LISTENERS`] | `listeners_omitted` in JSON |
//! | a container's name, image, compose labels | [`LABEL_BYTES`] bytes each | cut at a character boundary |
//! | one runtime event | [`EVENT_BYTES`] bytes | skipped, counted, and the inventory re-read |

/// Bytes of `/proc/PID/cmdline` kept per process: enough for any server's own flags, far
/// below what `ARG_MAX` allows (a 300 KB command line is the attack this bounds).
pub(crate) const CMDLINE_BYTES: usize = 4096;
/// Processes named per listening socket. A pre-forking server shares one socket among all its
/// workers; the first few (lowest pids: the parent first) say which program it is.
pub(crate) const HOLDERS: usize = 8;
/// Listeners named per line (for `no_listener`, every listener of the namespace is shown).
pub(crate) const LISTENERS: usize = 16;
/// Bytes kept of a container's name, image and compose labels.
pub(crate) const LABEL_BYTES: usize = 256;
/// Largest runtime event taken in (Docker's are a few hundred bytes; an image's labels, which
/// every container event carries, can make one huge).
pub(crate) const EVENT_BYTES: usize = 64 * 1024;

/// `s` cut to at most `max` bytes at a character boundary, and how many bytes were cut.
pub(crate) fn cut(mut s: String, max: usize) -> (String, usize) {
    if s.len() <= max {
        return (s, 0);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let cut = s.len() - end;
    s.truncate(end);
    (s, cut)
}

/// The first `max` items of `v`, and how many were left out.
pub(crate) fn first<T>(mut v: Vec<T>, max: usize) -> (Vec<T>, usize) {
    let omitted = v.len().saturating_sub(max);
    v.truncate(max);
    (v, omitted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_at_character_boundaries_and_counts() {
        assert_eq!(cut("gunicorn".into(), 16), ("gunicorn".into(), 0));
        assert_eq!(cut("ééé".into(), 3), ("é".into(), 4));
        assert_eq!(first(vec![1, 2, 3], 2), (vec![1, 2], 1));
        assert_eq!(first(vec![1], 2), (vec![1], 0));
    }
}
