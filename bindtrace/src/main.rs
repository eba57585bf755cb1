//! bindtrace's binary: the program lives in the library (`lib.rs`), so the fuzz targets and
//! the corpus replay tests can call the same parsers.
fn main() -> std::process::ExitCode {
    bindtrace::run()
}
