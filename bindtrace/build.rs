//! Builds `bindtrace-ebpf` for the BPF target and leaves the object in `OUT_DIR/bindtrace`,
//! which `src/loader.rs` embeds. The release binary therefore needs no toolchain to run.
//!
//! Set `BINDTRACE_SKIP_EBPF=1` to build without the eBPF toolchain (for `cargo check`, clippy,
//! unit tests): the binary then carries an empty object and refuses to run with a clear message.
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow, bail};

const SKIP: &str = "BINDTRACE_SKIP_EBPF";
const EBPF_PACKAGE: &str = "bindtrace-ebpf";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed={SKIP}");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    if env::var(SKIP).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        println!(
            "cargo:warning={SKIP} is set: building without eBPF programs; this binary will refuse to run"
        );
        fs::write(out_dir.join("bindtrace"), b"")?;
        return Ok(());
    }
    check_toolchain()?;

    // aya-build wraps its inner cargo in `rustup run <toolchain>` whenever rustup is on PATH, and
    // rustup's toolchains here cannot build for bpfel (no prebuilt core, no rust-src). Dropping
    // rustup from PATH makes the inner build use the system cargo/rustc that `./x setup` installs.
    let path = env::var_os("PATH").unwrap_or_default();
    let kept: Vec<PathBuf> = env::split_paths(&path).filter(|d| !d.join("rustup").exists()).collect();
    // SAFETY: build scripts are single-threaded at this point.
    unsafe {
        env::set_var("PATH", env::join_paths(kept)?);
        // aya-ebpf needs `#![feature(asm_experimental_arch)]`; allow it for that crate only, so
        // aya-build does not switch to `-Z build-std` (which would need the Rust sources).
        env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf");
    }

    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let package = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == EBPF_PACKAGE)
        .ok_or_else(|| anyhow!("{EBPF_PACKAGE} not found in the workspace"))?;
    let root_dir = package.manifest_path.parent().context("manifest has no parent")?;
    aya_build::build_ebpf(
        [aya_build::Package { name: EBPF_PACKAGE, root_dir: root_dir.as_str(), ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}

/// Fails early, with the remedy, when the pieces of the eBPF toolchain are missing: otherwise the
/// inner build dies with a linker or "can't find crate for `core`" error that explains nothing.
fn check_toolchain() -> anyhow::Result<()> {
    let path = env::var_os("PATH").unwrap_or_default();
    let on_path = |bin: &str| env::split_paths(&path).any(|d| d.join(bin).is_file());
    let mut missing = Vec::new();
    if !on_path("bpf-linker") {
        missing.push("bpf-linker 0.13 (cargo install bpf-linker --features llvm-22)");
    }
    if !std::path::Path::new("/usr/lib/rustlib/bpfel-unknown-none").exists() {
        missing.push("the prebuilt core library for bpfel-unknown-none (Debian: libstd-rust-web-dev-bpf)");
    }
    if !missing.is_empty() {
        bail!(
            "the eBPF toolchain is incomplete: missing {}.\n\
             On Debian 12 run `sudo ./x setup` from the repository root, which installs everything.\n\
             Elsewhere see README.md (\"Building on another distribution\"), or build with \
             {SKIP}=1 to skip the eBPF programs (the binary then refuses to run).",
            missing.join("; ")
        );
    }
    Ok(())
}
