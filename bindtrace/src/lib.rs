//! bindtrace: finds connections to containers refused because the service inside listens on
//! loopback (or the wrong address, family or port), as they happen, and says how to fix it.
//!
//! The folders are the pipeline: `sources` (kernel samples and counts, links, Docker,
//! conntrack) -> `diagnose` (listeners, verdict, hint) and `attribution` (who connected, via
//! what) -> `sinks` (lines, metrics). `kernel` loads and attaches the eBPF side, `netns` knows
//! the namespaces and which interfaces are in scope, `netlink` is the socket plumbing they
//! share, and `app` wires it all; `run` parses the arguments and calls it; `main.rs` only
//! calls `run`.
mod app;
mod attribution;
mod bounds;
mod diagnose;
mod doctor;
mod kernel;
mod netlink;
mod netns;
mod sinks;
mod sources;
#[cfg(test)]
mod testing;

use clap::Parser as _;

use app::{
    check,
    cli::{Args, Command},
    generate, setup,
};
use sinks::{output::Output, style::Painter};

#[doc(hidden)]
pub mod fuzzing;

/// The whole program: `main.rs` calls this and returns its exit code.
pub fn run() -> std::process::ExitCode {
    // glibc raises its mmap threshold to the size of the largest block freed, so after the
    // 5.5 MB vmlinux BTF blob is freed the next parses' multi-MB buffers come from the heap,
    // grow there by copying, and stay resident when freed. A fixed threshold (which also stops
    // the raising) puts them in their own mappings, given back on free.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    std::process::ExitCode::SUCCESS
                }
                // `check` promises 3 for "could not run", bad usage included.
                _ if std::env::args().any(|a| a == "check") => {
                    std::process::ExitCode::from(check::EXIT_CANNOT_RUN)
                }
                _ => std::process::ExitCode::from(2),
            };
        }
    };
    // -v raises bindtrace's own messages (and the kernel side's, which aya-log forwards under
    // the same crate name), not aya's loader internals.
    let level = match args.verbose {
        0 => "info",
        1 => "info,bindtrace=debug",
        _ => "debug,bindtrace=trace",
    };
    // Log lines carry names and command lines that containers choose: escaped like the text
    // sink's, so a message cannot write to the terminal or start a line of its own.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format(|buf, record| {
            use std::io::Write as _;
            let style = buf.default_level_style(record.level());
            let message = record.args().to_string();
            writeln!(
                buf,
                "[{} {style}{:<5}{style:#}] {}",
                buf.timestamp_millis(),
                record.level(),
                sinks::escape::escaped(&message)
            )
        })
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bindtrace: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Some(Command::Generate(what)) = &args.command {
        return generate::run(what, &mut std::io::stdout().lock());
    }
    if let Some(Command::Check(check_args)) = &args.command {
        let mut stdout = std::io::stdout().lock();
        return std::process::ExitCode::from(runtime.block_on(check::run(check_args, &mut stdout)));
    }
    if let Some(Command::Doctor(doctor_args)) = &args.command {
        let mut stdout = std::io::stdout().lock();
        return std::process::ExitCode::from(runtime.block_on(doctor::run(doctor_args, &mut stdout)));
    }
    let result = runtime.block_on(async {
        // Any set-up failure points to the command that checks all of it at once.
        let detector = setup::setup(&args).map_err(|e| anyhow::anyhow!("{e:#}. {}", doctor::HINT))?;
        let stdout = std::io::stdout().lock();
        let scan_window = args.scan_window.unwrap_or(sinks::collapse::SCAN_WINDOW);
        let format = args.format.resolve(std::io::IsTerminal::is_terminal(&stdout));
        // Not a LineWriter: it would write every line on its own; the sink flushes each record,
        // or each run of records it was told to hold.
        let stdout = std::io::BufWriter::with_capacity(64 * 1024, stdout);
        let mut out = Output::new(format, stdout, Painter::for_stdout(), scan_window);
        detector.run(&mut out, args.duration).await
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bindtrace: error: {}", sinks::escape::escaped(&format!("{e:#}")));
            std::process::ExitCode::FAILURE
        }
    }
}
