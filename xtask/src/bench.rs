//! `cargo xtask bench`: builds bindtrace and the benchmark (release), then runs
//! `bindtrace-bench`, which prints the tables BENCHMARKS.md is made of. Needs root.
use crate::util::{cargo, root, run_cmd};

#[derive(clap::Args)]
pub struct Options {
    /// A smoke run: each phase once and briefly (what CI runs; no figure is meaningful).
    #[arg(long)]
    short: bool,
    /// Interleaved rounds per configuration.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Length of each flood, in seconds.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Also write the tables to this file (markdown).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    build()?;
    let mut bench = command();
    if opts.short {
        bench.arg("--short");
    } else {
        bench.args(["--rounds", &opts.rounds.to_string(), "--seconds", &opts.seconds.to_string()]);
    }
    if let Some(out) = &opts.out {
        bench.arg("--out").arg(out);
    }
    run_cmd(bench)
}

/// The built harness, told where the built bindtrace is.
pub fn command() -> std::process::Command {
    let mut bench = std::process::Command::new(root().join("target/release/bindtrace-bench"));
    bench.env("BINDTRACE_BIN", root().join("target/release/bindtrace")).current_dir(root());
    bench
}

/// bindtrace, the load generator and the harness, all release builds.
pub fn build() -> anyhow::Result<()> {
    let mut build = cargo();
    build.args(["build", "--release", "-p", "bindtrace", "-p", "bindtrace-tests", "--bins"]);
    run_cmd(build)
}
