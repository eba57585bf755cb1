//! The line sink: each record in the form `--format` chose, flushed one by one (the stream is
//! live), or a run of records written together with one flush ([`Output::hold`]: a burst of new
//! keys costs one write per run, not one per line). `text` is one line per record ([`text`](super::text)), for pipes and logs; `terminal`
//! is a headline with detail lines, short repeats and collapsed scans
//! ([`terminal`](super::terminal), [`collapse`](super::collapse)), for a person; `json` is one
//! object per record.
use std::{
    io::{self, Write},
    time::{Duration, Instant},
};

use super::{collapse::Collapse, collapse::Shown, style::Painter, terminal, text};
use crate::diagnose::report::{AuditReport, LostReport, Report};

/// The output of `bindtrace check` and `bindtrace doctor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// One readable line per refusal.
    Text,
    /// One JSON object per line.
    Json,
}

/// The output of the event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum StreamFormat {
    /// `terminal` when stdout is a terminal, else `text`.
    Auto,
    /// A headline of at most 100 columns, detail lines, short repeats, collapsed scans;
    /// coloured by verdict (NO_COLOR, CLICOLOR and CLICOLOR_FORCE are honoured).
    Terminal,
    /// One line per event, stable and greppable, never coloured.
    Text,
    /// One JSON object per event.
    Json,
}

impl StreamFormat {
    /// `Auto` decided by whether stdout is a terminal.
    pub(crate) fn resolve(self, stdout_is_terminal: bool) -> StreamFormat {
        match self {
            StreamFormat::Auto if stdout_is_terminal => StreamFormat::Terminal,
            StreamFormat::Auto => StreamFormat::Text,
            other => other,
        }
    }
}

/// The terminal form's state: how to colour, what was shown.
struct Screen {
    painter: Painter,
    collapse: Collapse,
}

pub(crate) struct Output<W: Write> {
    format: StreamFormat,
    screen: Screen,
    out: W,
    /// Records are written without a flush until [`Output::release`].
    held: bool,
}

impl<W: Write> Output<W> {
    /// `format` resolved already (not `Auto`); `painter` colours the terminal form only;
    /// `scan_window` is the terminal form's [scan window](super::collapse::SCAN_WINDOW).
    pub(crate) fn new(format: StreamFormat, out: W, painter: Painter, scan_window: Duration) -> Self {
        Output { format, screen: Screen { painter, collapse: Collapse::new(scan_window) }, out, held: false }
    }

    /// From now on records are not flushed one by one: the caller writes a short run of them
    /// and calls [`Output::release`], which flushes them together.
    pub(crate) fn hold(&mut self) {
        self.held = true;
    }

    /// Flushes what was written since [`Output::hold`]; records are flushed one by one again.
    pub(crate) fn release(&mut self) -> io::Result<()> {
        self.held = false;
        self.out.flush()
    }

    fn lines(&mut self, lines: &[String]) -> io::Result<()> {
        for l in lines {
            self.out.write_all(l.as_bytes())?;
            self.out.write_all(b"\n")?;
        }
        if self.held { Ok(()) } else { self.out.flush() }
    }

    pub(crate) fn refusal(&mut self, r: &Report) -> io::Result<()> {
        let lines = match self.format {
            StreamFormat::Json => vec![serde_json::to_string(r)?],
            StreamFormat::Text | StreamFormat::Auto => vec![text::refusal(r)],
            StreamFormat::Terminal => {
                let p = self.screen.painter;
                match self.screen.collapse.on_refusal(r, Instant::now()) {
                    Shown::Full => terminal::refusal(p, r),
                    Shown::Again { first_time } => vec![terminal::repeat(p, r, &first_time)],
                    Shown::Folded => vec![],
                }
            }
        };
        self.lines(&lines)?;
        self.scans_ended()
    }

    /// A published port found misbound before anyone connected.
    pub(crate) fn audit(&mut self, r: &AuditReport) -> io::Result<()> {
        let lines = match self.format {
            StreamFormat::Json => vec![serde_json::to_string(r)?],
            StreamFormat::Text | StreamFormat::Auto => vec![text::audit(r)],
            StreamFormat::Terminal => terminal::audit(self.screen.painter, r),
        };
        self.lines(&lines)
    }

    pub(crate) fn lost(&mut self, r: &LostReport) -> io::Result<()> {
        let line = match self.format {
            StreamFormat::Json => serde_json::to_string(r)?,
            StreamFormat::Text | StreamFormat::Auto => text::lost(r),
            StreamFormat::Terminal => terminal::lost(self.screen.painter, r),
        };
        self.lines(&[line])
    }

    /// The SCAN lines of scans that stopped; called at every wake-up of the event loop.
    pub(crate) fn scans_ended(&mut self) -> io::Result<()> {
        if self.format != StreamFormat::Terminal {
            return Ok(());
        }
        let ended = self.screen.collapse.ended(Instant::now());
        let lines: Vec<String> = ended.iter().flat_map(|s| terminal::scan(self.screen.painter, s)).collect();
        self.lines(&lines)
    }

    /// At exit: the SCAN lines of scans still open.
    pub(crate) fn finish(&mut self) -> io::Result<()> {
        if self.format != StreamFormat::Terminal {
            return Ok(());
        }
        let open = self.screen.collapse.finish();
        let lines: Vec<String> = open.iter().flat_map(|s| terminal::scan(self.screen.painter, s)).collect();
        self.lines(&lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::collapse::{SCAN_PORTS, SCAN_WINDOW, tests::report};

    fn written(format: StreamFormat, reports: &[Report]) -> String {
        let mut out = Output::new(format, Vec::new(), Painter::new(false), SCAN_WINDOW);
        for r in reports {
            out.refusal(r).unwrap();
        }
        out.finish().unwrap();
        String::from_utf8(out.out).unwrap()
    }

    /// A writer that says what reached it flushed: what a pipe's reader would see.
    #[derive(Default)]
    struct Flushes {
        pending: Vec<u8>,
        flushed: Vec<u8>,
        flushes: usize,
    }

    impl Write for Flushes {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.pending.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            self.flushed.append(&mut self.pending);
            self.flushes += 1;
            Ok(())
        }
    }

    #[test]
    fn held_records_are_flushed_together_and_records_after_release_one_by_one() {
        let t = "2026-12-03T10:00:00.000Z";
        let mut out = Output::new(StreamFormat::Json, Flushes::default(), Painter::new(false), SCAN_WINDOW);
        out.hold();
        for port in 1..=3 {
            out.refusal(&report(1, port, 1, t)).unwrap();
        }
        assert_eq!(out.out.flushes, 0);
        assert!(out.out.flushed.is_empty());
        out.release().unwrap();
        assert_eq!(out.out.flushes, 1);
        assert_eq!(out.out.flushed.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count(), 3);
        out.refusal(&report(1, 4, 1, t)).unwrap();
        assert_eq!(out.out.flushes, 2);
        assert!(out.out.pending.is_empty());
    }

    #[test]
    fn auto_is_terminal_on_a_terminal_and_text_elsewhere() {
        assert_eq!(StreamFormat::Auto.resolve(true), StreamFormat::Terminal);
        assert_eq!(StreamFormat::Auto.resolve(false), StreamFormat::Text);
        assert_eq!(StreamFormat::Json.resolve(true), StreamFormat::Json);
        assert_eq!(StreamFormat::Text.resolve(true), StreamFormat::Text);
    }

    #[test]
    fn the_terminal_form_shortens_repeats_and_collapses_scans_the_others_do_not() {
        let t = "2026-12-03T10:00:00.000Z";
        let mut reports = vec![report(1, 8000, 1, t), report(1, 8000, 4, t)];
        reports.extend((1..=100).map(|p| report(2, p, 1, t)));
        let term = written(StreamFormat::Terminal, &reports);
        assert_eq!(term.lines().filter(|l| l.contains(" REFUSED netns 1 ")).count(), 1, "{term}");
        assert_eq!(term.lines().filter(|l| l.contains("   again x4 netns 1 8000/tcp")).count(), 1, "{term}");
        assert_eq!(term.lines().filter(|l| l.contains(" REFUSED netns 2 ")).count(), SCAN_PORTS, "{term}");
        let scans: Vec<&str> = term.lines().filter(|l| l.contains(" SCAN ")).collect();
        assert_eq!(scans, ["2026-12-03T10:00:00Z SCAN netns 2: 100 ports refused (1-100), 10 shown above"]);

        let text = written(StreamFormat::Text, &reports);
        assert_eq!(text.lines().count(), reports.len(), "one line per record:\n{text}");
        let json = written(StreamFormat::Json, &reports);
        assert_eq!(json.lines().count(), reports.len());
        assert!(json.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
    }
}
