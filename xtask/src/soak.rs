//! `cargo xtask soak [--minutes N]`: builds bindtrace and the soak harness (release), then runs
//! `bindtrace-soak`, which churns namespaces, containers and the Docker socket around a running
//! bindtrace and fails on a lost count or a leak. Needs root and a Docker daemon.
use crate::util::{root, run_cmd};

#[derive(clap::Args)]
pub struct Options {
    /// How long to run, in minutes (CI runs 3).
    #[arg(long, default_value_t = 60)]
    minutes: u64,
    /// Minutes whose maxima are the steady values (default: a sixth of the run, at least 1).
    #[arg(long)]
    warmup: Option<u64>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    crate::bench::build()?;
    run_cmd(command(opts.minutes, opts.warmup))
}

/// The built harness, told where the built bindtrace is.
pub fn command(minutes: u64, warmup: Option<u64>) -> std::process::Command {
    let mut soak = std::process::Command::new(root().join("target/release/bindtrace-soak"));
    soak.env("BINDTRACE_BIN", root().join("target/release/bindtrace")).current_dir(root());
    soak.args(["--minutes", &minutes.to_string()]);
    if let Some(w) = warmup {
        soak.args(["--warmup", &w.to_string()]);
    }
    soak
}
