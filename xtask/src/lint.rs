//! `cargo fmt --check` and clippy with warnings as errors, for the userspace crates.
use crate::util::{cargo, run_cmd};

pub fn run() -> anyhow::Result<()> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--check"]);
    run_cmd(fmt)?;
    let mut clippy = cargo();
    clippy.args(["clippy", "--all-targets", "--", "-D", "warnings"]);
    run_cmd(clippy)
}
