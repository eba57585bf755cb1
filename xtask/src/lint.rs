//! `cargo fmt --check` and clippy with warnings as errors, for the userspace crates.
use crate::util::{cargo, run};

pub fn run() -> anyhow::Result<()> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--check"]);
    run(fmt)?;
    let mut clippy = cargo();
    clippy.args(["clippy", "--all-targets", "--", "-D", "warnings"]);
    run(clippy)
}
