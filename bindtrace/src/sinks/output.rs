//! The line sink: each record as a text line ([`text`](super::text)) or a JSON line, flushed
//! one by one (the stream is live).
use std::io::{self, Write};

use super::text;
use crate::diagnose::report::{AuditReport, LostReport, Report};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// One readable line per refusal.
    Text,
    /// One JSON object per line.
    Json,
}

pub(crate) struct Output<W: Write> {
    format: Format,
    out: W,
}

impl<W: Write> Output<W> {
    pub(crate) fn new(format: Format, out: W) -> Self {
        Output { format, out }
    }

    pub(crate) fn refusal(&mut self, r: &Report) -> io::Result<()> {
        match self.format {
            Format::Json => serde_json::to_writer(&mut self.out, r)?,
            Format::Text => write!(self.out, "{}", text::refusal(r))?,
        }
        self.out.write_all(b"\n")?;
        self.out.flush()
    }

    /// A published port found misbound before anyone connected.
    pub(crate) fn audit(&mut self, r: &AuditReport) -> io::Result<()> {
        match self.format {
            Format::Json => serde_json::to_writer(&mut self.out, r)?,
            Format::Text => write!(self.out, "{}", text::audit(r))?,
        }
        self.out.write_all(b"\n")?;
        self.out.flush()
    }

    pub(crate) fn lost(&mut self, r: &LostReport) -> io::Result<()> {
        match self.format {
            Format::Json => serde_json::to_writer(&mut self.out, r)?,
            Format::Text if r.stage == "kernel_recursion" => write!(
                self.out,
                "{} the kernel skipped the hook {} times because it was already running on that CPU: \
                 refusals among those are not counted (counts since then are lower bounds)",
                r.time, r.count
            )?,
            Format::Text => write!(
                self.out,
                "{} lost {} samples at stage {} (their refusals are still counted in the lines above and below)",
                r.time, r.count, r.stage
            )?,
        }
        self.out.write_all(b"\n")?;
        self.out.flush()
    }
}
