//! Developer tasks that need more than one cargo command: `cargo xtask <task>`.
mod bench;
mod deb;
mod deploy_check;
mod dist;
mod image;
mod kernels;
mod lint;
mod oci;
mod soak;
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
    /// The release tarballs: static x86_64 and aarch64 binaries, reproducible, with sha256s (target/dist).
    Dist(dist::Options),
    /// The Debian package target/dist/bindtrace_VERSION_amd64.deb (the dist binary, unit, man page).
    Deb(deb::Options),
    /// Validate deploy/kubernetes, the workflows and the systemd unit offline (and broken copies fail).
    DeployCheck(deploy_check::Options),
    /// The soak: bindtrace under namespace, container and runtime churn for N minutes (leaks, lost counts).
    Soak(soak::Options),
    /// The container image bindtrace:VERSION and :latest, FROM scratch with the dist binary (--oci DIR: amd64+arm64 OCI layout).
    Image(image::Options),
    /// The kernel matrix: the core scenarios on Debian's 6.1 and 5.10 under qemu, and natively.
    Kernels(kernels::Options),
}

fn main() -> std::process::ExitCode {
    // `dist` makes cargo call this binary as its rustc wrapper: `xtask RUSTC ARGS...`.
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if std::env::var_os(dist::REMAP_ENV).is_some()
        && args
            .first()
            .and_then(|a| std::path::Path::new(a).file_name())
            .is_some_and(|n| n.to_string_lossy().starts_with("rustc"))
    {
        dist::wrap_rustc(&args);
    }
    let result = match Cli::parse().task {
        Task::Lint => lint::run(),
        Task::Test(opts) => test::run(&opts),
        Task::Kernels(opts) => kernels::run(&opts),
        Task::Bench(opts) => bench::run(&opts),
        Task::Soak(opts) => soak::run(&opts),
        Task::Dist(opts) => dist::run(&opts),
        Task::Image(opts) => image::run(&opts),
        Task::Deb(opts) => deb::run(&opts),
        Task::DeployCheck(opts) => deploy_check::run(&opts),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
