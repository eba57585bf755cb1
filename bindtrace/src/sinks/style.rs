//! Colour for the terminal form: by verdict, so that what needs a fix stands out from what
//! resolves itself. Off unless stdout is a terminal, and as NO_COLOR, CLICOLOR and
//! CLICOLOR_FORCE say (anstream reads them, the same rules clap follows for `--help`).
use anstyle::{AnsiColor, Style};

use crate::diagnose::verdict::Verdict;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Painter {
    colour: bool,
}

impl Painter {
    pub(crate) fn new(colour: bool) -> Self {
        Painter { colour }
    }

    /// Colour when stdout is a terminal and the environment allows it, or when CLICOLOR_FORCE
    /// asks for it anyway.
    pub(crate) fn for_stdout() -> Self {
        let choice = anstream::AutoStream::choice(&std::io::stdout());
        Painter::new(!matches!(choice, anstream::ColorChoice::Never))
    }

    /// `text` in `style` (already escaped: the style is the only escape sequence written).
    pub(crate) fn paint(self, style: Style, text: &str) -> String {
        if self.colour && style != Style::new() { format!("{style}{text}{style:#}") } else { text.to_owned() }
    }
}

fn fg(c: AnsiColor) -> Style {
    Style::new().fg_color(Some(c.into()))
}

/// Red for a misbinding to fix, yellow for a port nothing listens on, green for a service that
/// was merely starting, dim for what cannot be known.
pub(crate) fn verdict(v: Verdict) -> Style {
    match v {
        Verdict::LoopbackOnly | Verdict::WrongFamily | Verdict::OtherAddress => fg(AnsiColor::Red).bold(),
        Verdict::NoListener => fg(AnsiColor::Yellow).bold(),
        Verdict::ListeningNow => fg(AnsiColor::Green),
        Verdict::Unknown => Style::new().dimmed(),
    }
}

/// The verdict named by the audit (`ok` only in `bindtrace check`).
pub(crate) fn verdict_named(name: &str) -> Style {
    const ALL: [Verdict; 6] = [
        Verdict::LoopbackOnly,
        Verdict::WrongFamily,
        Verdict::OtherAddress,
        Verdict::NoListener,
        Verdict::ListeningNow,
        Verdict::Unknown,
    ];
    match ALL.into_iter().find(|v| v.as_str() == name) {
        Some(v) => verdict(v),
        None => fg(AnsiColor::Green),
    }
}

pub(crate) fn label() -> Style {
    Style::new().bold()
}

pub(crate) fn scan() -> Style {
    fg(AnsiColor::Magenta).bold()
}

pub(crate) fn lost() -> Style {
    fg(AnsiColor::Magenta)
}

pub(crate) fn dim() -> Style {
    Style::new().dimmed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_off_writes_the_text_alone() {
        assert_eq!(Painter::new(false).paint(verdict(Verdict::LoopbackOnly), "x"), "x");
        let on = Painter::new(true).paint(verdict(Verdict::LoopbackOnly), "x");
        assert!(on.starts_with('\u{1b}') && on.contains('x') && on.ends_with('m'), "{on:?}");
    }
}
