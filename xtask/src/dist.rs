//! `cargo xtask dist`: the release tarball. A static (glibc `+crt-static`) x86_64 binary, the
//! licences and the README in `target/dist/bindtrace-VERSION-x86_64-linux.tar.gz`, with a
//! `.sha256` beside it (`sha256sum -c` format).
//!
//! Reproducible: the same commit gives the same bytes wherever the tree is checked out. The
//! checkout and cargo's home are remapped out of the binary (`--remap-path-prefix`), for the
//! eBPF object too (aya-build replaces its inner build's RUSTFLAGS, so the remap reaches it
//! through a rustc wrapper: this xtask binary itself, see [`wrap_rustc`]); the tarball is
//! written with sorted names, the commit's time, numeric owner 0 and `gzip -n`.
//!
//! aarch64 is not built: Debian 12's amd64 packages carry Rust's standard library for x86_64
//! (and the BPF target) only; the aarch64 one needs the arm64 architecture added to dpkg (see
//! docs/install.md).
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::util::{cargo, root, run_cmd};

pub const TARGET: &str = "x86_64-unknown-linux-gnu";
/// What the paths of the checkout and of cargo's home become inside the binary.
const SRC_PREFIX: &str = "/build/bindtrace";
const CARGO_PREFIX: &str = "/build/cargo";
/// Set by `dist` for [`wrap_rustc`]: the `--remap-path-prefix` flags, separated by 0x1f.
pub const REMAP_ENV: &str = "BINDTRACE_DIST_REMAP";

#[derive(clap::Args)]
pub struct Options {
    /// Where the tarball and its checksum go (default: target/dist).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// What `dist` produced.
pub struct Artefacts {
    pub version: String,
    /// The commit the tree is at (empty outside git).
    pub revision: String,
    /// Seconds since the epoch: SOURCE_DATE_EPOCH, else the commit's time.
    pub epoch: u64,
    pub binary: PathBuf,
    pub tarball: PathBuf,
    pub sha256: String,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let a = build(opts.out.clone())?;
    println!("{}  {}", a.sha256, a.tarball.display());
    Ok(())
}

pub fn version() -> &'static str {
    // xtask takes the workspace's version, as bindtrace does.
    env!("CARGO_PKG_VERSION")
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).current_dir(root()).stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn source_epoch() -> anyhow::Result<u64> {
    if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
        return v.trim().parse().with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number"));
    }
    let ct = git(&["log", "-1", "--format=%ct", "HEAD"])
        .context("no commit time: build from a git checkout or set SOURCE_DATE_EPOCH")?;
    ct.parse().with_context(|| format!("git log gave {ct:?}"))
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/nonexistent"))
}

fn remap_flags() -> Vec<String> {
    vec![
        format!("--remap-path-prefix={}={SRC_PREFIX}", root().display()),
        format!("--remap-path-prefix={}={CARGO_PREFIX}", cargo_home().display()),
    ]
}

/// Builds the static binary and the tarball; returns where they are.
pub fn build(out: Option<PathBuf>) -> anyhow::Result<Artefacts> {
    let version = version().to_owned();
    let epoch = source_epoch()?;
    let revision = git(&["rev-parse", "HEAD"]).unwrap_or_default();
    let out = out.unwrap_or_else(|| root().join("target/dist"));
    let started = std::time::Instant::now();

    let mut rustflags = vec!["-C".to_owned(), "target-feature=+crt-static".to_owned()];
    rustflags.extend(["-C".to_owned(), "strip=symbols".to_owned()]);
    let wrapper = std::env::current_exe().context("the xtask binary's path")?;
    let mut build = cargo();
    build
        .args(["build", "--release", "--locked", "-p", "bindtrace", "--target", TARGET])
        // Scoped to the target triple: build scripts, proc-macros and aya-build's eBPF build
        // do not get +crt-static. The path remaps go to every rustc through the wrapper.
        .env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS", rustflags.join(" "))
        .env("RUSTC_WRAPPER", &wrapper)
        .env(REMAP_ENV, remap_flags().join("\x1f"))
        .env("SOURCE_DATE_EPOCH", epoch.to_string());
    run_cmd(build)?;
    let binary = root().join("target").join(TARGET).join("release/bindtrace");
    check_static(&binary)?;

    let name = format!("bindtrace-{version}-x86_64-linux");
    let stage = out.join("stage");
    let dir = stage.join(&name);
    let _ = fs::remove_dir_all(&stage);
    fs::create_dir_all(&dir)?;
    copy_mode(&binary, &dir.join("bindtrace"), 0o755)?;
    for f in ["LICENSE-MIT", "LICENSE-APACHE", "README.md"] {
        copy_mode(&root().join(f), &dir.join(f), 0o644)?;
    }
    set_mode(&dir, 0o755)?;

    let tarball = out.join(format!("{name}.tar.gz"));
    write_tarball(&stage, &name, epoch, &tarball)?;
    let sha256 = sha256sum(&tarball)?;
    let file_name = tarball.file_name().unwrap().to_string_lossy().into_owned();
    fs::write(out.join(format!("{file_name}.sha256")), format!("{sha256}  {file_name}\n"))?;
    eprintln!("xtask: dist took {:.0?}", started.elapsed());
    Ok(Artefacts { version, revision, epoch, binary: dir.join("bindtrace"), tarball, sha256 })
}

fn copy_mode(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    fs::copy(from, to).with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
    set_mode(to, mode)
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// `tar --sort=name --mtime=@EPOCH --owner=0 --group=0 --numeric-owner | gzip -n`.
fn write_tarball(stage: &Path, name: &str, epoch: u64, tarball: &Path) -> anyhow::Result<()> {
    let file = fs::File::create(tarball).with_context(|| format!("create {}", tarball.display()))?;
    let mut tar = Command::new("tar")
        .args(["--format=gnu", "--sort=name", &format!("--mtime=@{epoch}")])
        .args(["--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(stage)
        .args(["-cf", "-", name])
        .stdout(Stdio::piped())
        .spawn()
        .context("tar")?;
    let gzip = Command::new("gzip")
        .args(["-n", "-9"])
        .stdin(tar.stdout.take().expect("piped"))
        .stdout(file)
        .status()
        .context("gzip")?;
    let tar = tar.wait()?;
    if !tar.success() || !gzip.success() {
        bail!("writing {} failed (tar {tar}, gzip {gzip})", tarball.display());
    }
    Ok(())
}

pub fn sha256sum(path: &Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum").arg(path).output().context("sha256sum")?;
    if !out.status.success() {
        bail!("sha256sum {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.split_whitespace().next().unwrap_or_default().to_owned())
}

/// Fails unless `binary` is an ELF executable without an interpreter and without DT_NEEDED
/// libraries (static or static-pie): it must run in an image holding nothing else.
fn check_static(binary: &Path) -> anyhow::Result<()> {
    let bytes = fs::read(binary).with_context(|| format!("read {}", binary.display()))?;
    match elf_dependencies(&bytes) {
        Some((false, 0)) => Ok(()),
        Some((interp, needed)) => {
            bail!("{} is not static (interpreter: {interp}, needed libraries: {needed})", binary.display())
        }
        None => bail!("{} is not a 64-bit little-endian ELF file", binary.display()),
    }
}

/// (has PT_INTERP, number of DT_NEEDED entries) of a 64-bit little-endian ELF image.
fn elf_dependencies(b: &[u8]) -> Option<(bool, usize)> {
    if b.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
    let phoff = u64_at(0x20)? as usize;
    let phentsize = u16_at(0x36)? as usize;
    let phnum = u16_at(0x38)? as usize;
    let (mut interp, mut needed) = (false, 0);
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        match u32_at(ph)? {
            3 => interp = true,
            2 => {
                // PT_DYNAMIC: entries of (d_tag, d_val); DT_NEEDED is 1, DT_NULL ends.
                let (off, size) = (u64_at(ph + 8)? as usize, u64_at(ph + 32)? as usize);
                for e in (off..off + size).step_by(16) {
                    match u64_at(e)? {
                        0 => break,
                        1 => needed += 1,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((interp, needed))
}

/// The rustc wrapper `dist` installs (cargo runs `xtask rustc ARGS...`): adds the remap flags
/// to every compilation, the eBPF crate's included, then runs rustc.
pub fn wrap_rustc(args: &[std::ffi::OsString]) -> ! {
    use std::os::unix::process::CommandExt as _;
    let (rustc, rest) = args.split_first().expect("cargo passes rustc's path");
    let mut cmd = Command::new(rustc);
    cmd.args(rest);
    // Queries such as `rustc -vV` or `--print` must stay untouched: only compilations get flags.
    let compiling = rest.iter().any(|a| a == "--crate-name");
    if compiling && let Ok(remap) = std::env::var(REMAP_ENV) {
        cmd.args(remap.split('\x1f').filter(|s| !s.is_empty()));
    }
    let err = cmd.exec();
    eprintln!("xtask: running {rustc:?}: {err}");
    std::process::exit(127)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_xtask_is_dynamic() {
        // The xtask itself is an ordinary dynamically linked binary: the check must say so.
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        let (interp, needed) = elf_dependencies(&me).unwrap();
        assert!(interp && needed > 0, "{interp} {needed}");
        assert!(elf_dependencies(b"#!/bin/sh\n").is_none());
    }
}
