//! Developer tasks that need more than one cargo command: `cargo xtask <task>`.
mod bench;
mod kernels;
mod lint;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "bindtrace developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Formatting and clippy (warnings are errors).
    Lint,
    /// Lint, unit tests, release build, then the root integration tests (namespaces, real kernel).
    Test(test::Options),
    /// The benchmark: bindtrace against no tracer and bpftrace on the reset path (BENCHMARKS.md).
    Bench(bench::Options),
    /// The kernel matrix: the core scenarios on Debian's 6.1 and 5.10 under qemu, and natively.
    Kernels(kernels::Options),
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().task {
        Task::Lint => lint::run(),
        Task::Test(opts) => test::run(&opts),
        Task::Kernels(opts) => kernels::run(&opts),
        Task::Bench(opts) => bench::run(&opts),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
