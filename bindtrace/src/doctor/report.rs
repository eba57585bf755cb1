//! What `bindtrace doctor` prints: one line per check (text), or one JSON object with every
//! check, and the exit status (0 ready, 1 not).
use std::io::{self, Write};

use serde::Serialize;

use crate::sinks::escape::escaped;

pub(crate) const EXIT_READY: u8 = 0;
pub(crate) const EXIT_NOT_READY: u8 = 1;

/// How one check came out. Only `Fail` stops bindtrace; `Warn` means it runs without
/// something (container names, a known-good platform); `Skip` that the check does not apply
/// here (a runtime that is not installed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Status {
    Ok,
    Warn,
    Fail,
    Skip,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
            Status::Skip => "skip",
        }
    }
}

/// One line of the report. `name` is stable (scripts and the JSON form key on it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Check {
    pub(crate) name: &'static str,
    pub(crate) status: Status,
    /// What was found.
    pub(crate) detail: String,
    /// What to do about it (None when there is nothing to do).
    pub(crate) remedy: Option<String>,
}

impl Check {
    pub(crate) fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check { name, status: Status::Ok, detail: detail.into(), remedy: None }
    }
    pub(crate) fn skip(name: &'static str, detail: impl Into<String>) -> Check {
        Check { name, status: Status::Skip, detail: detail.into(), remedy: None }
    }
    pub(crate) fn warn(name: &'static str, detail: impl Into<String>, remedy: impl Into<String>) -> Check {
        Check { name, status: Status::Warn, detail: detail.into(), remedy: Some(remedy.into()) }
    }
    pub(crate) fn fail(name: &'static str, detail: impl Into<String>, remedy: impl Into<String>) -> Check {
        Check { name, status: Status::Fail, detail: detail.into(), remedy: Some(remedy.into()) }
    }
}

#[derive(Serialize)]
struct JsonDoc<'a> {
    ready: bool,
    exit_code: u8,
    checks: &'a [Check],
}

pub(crate) fn exit_code(checks: &[Check]) -> u8 {
    if checks.iter().any(|c| c.status == Status::Fail) { EXIT_NOT_READY } else { EXIT_READY }
}

pub(crate) fn write_json<W: Write>(checks: &[Check], out: &mut W) -> io::Result<()> {
    let code = exit_code(checks);
    serde_json::to_writer(&mut *out, &JsonDoc { ready: code == EXIT_READY, exit_code: code, checks })?;
    writeln!(out)
}

/// `STATUS  NAME  DETAIL  -> REMEDY`, aligned, then a closing verdict line. Details carry
/// container and interface names, which others choose: escaped for the terminal.
pub(crate) fn write_text<W: Write>(checks: &[Check], out: &mut W) -> io::Result<()> {
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for c in checks {
        let mut line = format!("{:<4}  {:<width$}  {}", c.status.word(), c.name, c.detail);
        if let Some(remedy) = &c.remedy {
            line.push_str("  -> ");
            line.push_str(remedy);
        }
        writeln!(out, "{}", escaped(&line))?;
    }
    let failed: Vec<&str> = checks.iter().filter(|c| c.status == Status::Fail).map(|c| c.name).collect();
    let warned = checks.iter().filter(|c| c.status == Status::Warn).count();
    match failed.len() {
        0 => writeln!(
            out,
            "bindtrace doctor: ready ({warned} {})",
            if warned == 1 { "warning" } else { "warnings" }
        ),
        n => writeln!(out, "bindtrace doctor: not ready: {n} failed ({})", failed.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Check> {
        vec![
            Check::ok("kernel", "Linux 6.18"),
            Check::warn("lockdown", "unknown", "read it on the host"),
            Check::fail("pid_namespace", "the daemon is outside", "add --pid host"),
            Check::skip("podman", "no socket"),
        ]
    }

    #[test]
    fn a_failure_is_not_ready() {
        assert_eq!(exit_code(&sample()), EXIT_NOT_READY);
        assert_eq!(exit_code(&sample()[..2]), EXIT_READY);
    }

    #[test]
    fn text_has_a_line_per_check_and_a_verdict() {
        let mut out = Vec::new();
        write_text(&sample(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert_eq!(lines[0], "ok    kernel         Linux 6.18");
        assert_eq!(lines[2], "fail  pid_namespace  the daemon is outside  -> add --pid host");
        assert_eq!(lines[4], "bindtrace doctor: not ready: 1 failed (pid_namespace)");
    }

    #[test]
    fn json_is_one_object_with_every_check() {
        let mut out = Vec::new();
        write_json(&sample(), &mut out).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["ready"], false);
        assert_eq!(v["exit_code"], 1);
        assert_eq!(v["checks"].as_array().unwrap().len(), 4);
        assert_eq!(v["checks"][1]["status"], "warn");
        assert_eq!(v["checks"][3]["remedy"], serde_json::Value::Null);
    }

    #[test]
    fn outside_text_cannot_write_to_the_terminal() {
        let mut out = Vec::new();
        write_text(&[Check::ok("workloads", "container \x1b[2Jevil")], &mut out).unwrap();
        assert!(!String::from_utf8(out).unwrap().contains('\x1b'));
    }
}
