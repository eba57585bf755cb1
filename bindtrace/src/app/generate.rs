//! `bindtrace generate man|bash|zsh|fish`: the man page and shell completions, written from the
//! same clap definition that parses the command line, so they cannot drift from it. Hidden:
//! packagers run it at build time (`cargo xtask deb`); users get the files from the package.
use std::io::{self, Write};

use clap::CommandFactory as _;
use clap_complete::Shell;

use crate::app::cli::Args;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Artefact {
    /// The man page, roff (section 1).
    Man,
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct GenerateArgs {
    /// What to print on stdout.
    #[arg(value_enum)]
    pub(crate) what: Artefact,
}

/// Writes the artefact to `out`; exit status 0, or 1 when writing fails (e.g. a closed pipe).
pub(crate) fn run(args: &GenerateArgs, out: &mut impl Write) -> std::process::ExitCode {
    match write(args.what, out) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bindtrace: generate: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn write(what: Artefact, out: &mut impl Write) -> io::Result<()> {
    let mut cmd = Args::command();
    let name = cmd.get_name().to_owned();
    match what {
        Artefact::Man => clap_mangen::Man::new(cmd).render(out)?,
        Artefact::Bash => clap_complete::generate(Shell::Bash, &mut cmd, name, out),
        Artefact::Zsh => clap_complete::generate(Shell::Zsh, &mut cmd, name, out),
        Artefact::Fish => clap_complete::generate(Shell::Fish, &mut cmd, name, out),
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(what: Artefact) -> String {
        let mut buf = Vec::new();
        write(what, &mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn man_page_documents_the_options_and_check() {
        let man = text(Artefact::Man);
        assert!(man.contains(".TH bindtrace 1"), "section 1 header");
        for option in ["metrics\\-addr", "duration", "no\\-docker", "check"] {
            assert!(man.contains(option), "man page lacks {option}");
        }
        // Hidden things stay hidden: the packager's subcommand is not advertised.
        assert!(!man.contains("generate"), "hidden subcommand in the man page");
    }

    #[test]
    fn completions_know_the_flags() {
        for (shell, marker) in [
            (Artefact::Bash, "complete -F"),
            (Artefact::Zsh, "#compdef bindtrace"),
            (Artefact::Fish, "complete -c bindtrace"),
        ] {
            let script = text(shell);
            assert!(script.contains(marker), "{shell:?} lacks {marker}");
            assert!(script.contains("metrics-addr"), "{shell:?} lacks --metrics-addr");
        }
    }

    #[test]
    fn generate_parses_and_is_hidden_from_help() {
        use clap::Parser as _;
        let a = Args::try_parse_from(["bindtrace", "generate", "zsh"]).unwrap();
        assert!(matches!(
            a.command,
            Some(crate::app::cli::Command::Generate(GenerateArgs { what: Artefact::Zsh }))
        ));
        assert!(Args::try_parse_from(["bindtrace", "generate", "powershell"]).is_err());
        let help = Args::command().render_help().to_string();
        assert!(!help.contains("generate"), "{help}");
    }
}
