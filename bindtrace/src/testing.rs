//! Shared by the unit tests: skipping a test that needs root, which `CI` turns into a failure.

/// True when running as root; otherwise says why the test does not run and returns false,
/// except under `CI` (set to anything but empty, `0` or `false`), where a skip would hide a
/// runner without root, so it panics.
pub(crate) fn root_or_skip(why: &str) -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"));
    assert!(!ci, "CI is set, so this test may not skip: needs root ({why})");
    eprintln!("skipped: needs root ({why})");
    false
}
