//! Rendering records as text lines or JSON lines, flushed one by one (the stream is live).
use std::io::{self, Write};

use crate::{
    hint::endpoint,
    report::{LostReport, Report},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One readable line per refusal.
    Text,
    /// One JSON object per line.
    Json,
}

pub struct Output<W: Write> {
    format: Format,
    out: W,
}

impl<W: Write> Output<W> {
    pub fn new(format: Format, out: W) -> Self {
        Output { format, out }
    }

    pub fn refusal(&mut self, r: &Report) -> io::Result<()> {
        match self.format {
            Format::Json => serde_json::to_writer(&mut self.out, r)?,
            Format::Text => write!(self.out, "{}", text(r))?,
        }
        self.out.write_all(b"\n")?;
        self.out.flush()
    }

    pub fn lost(&mut self, r: &LostReport) -> io::Result<()> {
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

/// `TIME refused CLIENT -> TARGET/tcp on BRIDGE [xN]: VERDICT: HINT`
pub fn text(r: &Report) -> String {
    let client = match (r.client_ip, r.client_port) {
        (Some(ip), Some(port)) => endpoint(ip, port),
        _ => "?".into(),
    };
    let target = match r.target_ip {
        Some(ip) => endpoint(ip, r.target_port),
        None => format!("port {}", r.target_port),
    };
    let count = if r.count > 1 { format!(" [x{}]", r.count) } else { String::new() };
    format!(
        "{} refused {client} -> {target}/{} on {} (netns {}){count}: {}: {}",
        r.time,
        r.proto,
        r.bridge,
        r.netns,
        r.verdict.as_str(),
        r.hint
    )
}
