//! `cargo xtask dist`: the release tarballs. A static (glibc `+crt-static`) binary for x86_64
//! and one for aarch64, each with the licences and the README in
//! `target/dist/bindtrace-VERSION-ARCH-linux.tar.gz`, with a `.sha256` beside it
//! (`sha256sum -c` format).
//!
//! Reproducible: the same commit gives the same bytes wherever the tree is checked out. The
//! checkout and cargo's home are remapped out of the binary (`--remap-path-prefix`), for the
//! eBPF object too (aya-build replaces its inner build's RUSTFLAGS, so the remap reaches it
//! through a rustc wrapper: this xtask binary itself, see [`wrap_rustc`]); the tarball is
//! written with sorted names, the commit's time, numeric owner 0 and `gzip -n`.
//!
//! aarch64 is cross-built with Debian's packages that `./x setup` installs: Rust's std for
//! aarch64 (libstd-rust-web-dev:arm64), gcc-aarch64-linux-gnu as the linker and
//! libc6-dev-arm64-cross for the static glibc. The eBPF object inside is the same kind of
//! bytecode for both: aya-build builds it for bpfel (the target is little-endian) with
//! `bpf_target_arch="aarch64"`, which only matters to programs reading `pt_regs` (kprobes);
//! bindtrace's are BTF tracepoints and a classifier, whose arguments are arch-independent.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::util::{cargo, root, run_cmd};

/// One architecture `dist` builds for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arch {
    /// The name in the tarball's file name (`uname -m`'s).
    pub name: &'static str,
    pub triple: &'static str,
    /// The name OCI image platforms use (GOARCH's).
    pub oci: &'static str,
    /// The ELF header's e_machine.
    e_machine: u16,
    /// The linker for a cross build (None: the host's `cc`).
    linker: Option<&'static str>,
}

pub const X86_64: Arch =
    Arch { name: "x86_64", triple: "x86_64-unknown-linux-gnu", oci: "amd64", e_machine: 62, linker: None };
pub const AARCH64: Arch = Arch {
    name: "aarch64",
    triple: "aarch64-unknown-linux-gnu",
    oci: "arm64",
    e_machine: 183,
    linker: Some("aarch64-linux-gnu-gcc"),
};
pub const ARCHES: [Arch; 2] = [X86_64, AARCH64];

impl Arch {
    /// cargo's per-target environment prefix, `CARGO_TARGET_<TRIPLE>`.
    fn cargo_env(&self, key: &str) -> String {
        format!("CARGO_TARGET_{}_{key}", self.triple.to_uppercase().replace('-', "_"))
    }
}
/// What the paths of the checkout and of cargo's home become inside the binary.
const SRC_PREFIX: &str = "/build/bindtrace";
const CARGO_PREFIX: &str = "/build/cargo";
/// Set by `dist` for [`wrap_rustc`]: the `--remap-path-prefix` flags, separated by 0x1f.
pub const REMAP_ENV: &str = "BINDTRACE_DIST_REMAP";

#[derive(clap::Args)]
pub struct Options {
    /// Where the tarballs and their checksums go (default: target/dist).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Build only these architectures (repeatable; default: x86_64 and aarch64).
    #[arg(long = "arch", value_parser = ["x86_64", "aarch64"])]
    arches: Vec<String>,
}

/// What `dist` produced.
pub struct Artefacts {
    pub arch: Arch,
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
    for arch in ARCHES.iter().filter(|a| opts.arches.is_empty() || opts.arches.iter().any(|n| n == a.name)) {
        let a = build(opts.out.clone(), *arch)?;
        println!("{}  {}", a.sha256, a.tarball.display());
    }
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

pub fn source_epoch() -> anyhow::Result<u64> {
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

/// Fails, naming the remedy, when a cross build's pieces are missing: otherwise cargo dies
/// with "can't find crate for `std`" or a linker error that says nothing about the set-up.
fn check_cross_toolchain(arch: Arch) -> anyhow::Result<()> {
    let Some(linker) = arch.linker else { return Ok(()) };
    let out = Command::new("rustc").args(["--print", "sysroot"]).output().context("rustc --print sysroot")?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let std_dir = sysroot.join("lib/rustlib").join(arch.triple).join("lib");
    let has_std = fs::read_dir(&std_dir)
        .is_ok_and(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("libstd-")));
    let has_linker = Command::new(linker).arg("--version").output().is_ok_and(|o| o.status.success());
    let has_libc = Path::new("/usr/aarch64-linux-gnu/lib/libc.a").exists();
    if !has_std || !has_linker || !has_libc {
        bail!(
            "cannot build for {}: {}{}{}run `sudo ./x setup` (Debian 12: it adds dpkg's arm64 architecture and \
             installs libstd-rust-web-dev:arm64 at rustc-web's version, gcc-aarch64-linux-gnu and \
             libc6-dev-arm64-cross), or build x86_64 only with `./x dist --arch x86_64`",
            arch.triple,
            if has_std { String::new() } else { format!("no Rust std in {}; ", std_dir.display()) },
            if has_linker { String::new() } else { format!("no linker {linker}; ") },
            if has_libc { "" } else { "no static glibc for aarch64; " },
        );
    }
    Ok(())
}

/// Builds the static binary for `arch` and its tarball; returns where they are.
pub fn build(out: Option<PathBuf>, arch: Arch) -> anyhow::Result<Artefacts> {
    let version = version().to_owned();
    let epoch = source_epoch()?;
    let revision = git(&["rev-parse", "HEAD"]).unwrap_or_default();
    let out = out.unwrap_or_else(|| root().join("target/dist"));
    let started = std::time::Instant::now();

    let binary = static_build(arch, &["-p", "bindtrace"], "bindtrace", epoch)?;

    let name = format!("bindtrace-{version}-{}-linux", arch.name);
    let stage = out.join(format!("stage-{}", arch.name));
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
    eprintln!("xtask: dist for {} took {:.0?}", arch.name, started.elapsed());
    Ok(Artefacts { arch, version, revision, epoch, binary: dir.join("bindtrace"), tarball, sha256 })
}

/// Builds `cargo_args` (a package, maybe a `--bin`) as a static binary for `arch`, with the
/// flags and wrapper of the release build, so that every static build for one target shares
/// cargo's cache (the kernel matrix builds its aarch64 guest's binaries with this too); returns
/// `target/TRIPLE/release/BIN`, checked to be static.
pub fn static_build(arch: Arch, cargo_args: &[&str], bin: &str, epoch: u64) -> anyhow::Result<PathBuf> {
    check_cross_toolchain(arch)?;
    let mut rustflags = vec!["-C".to_owned(), "target-feature=+crt-static".to_owned()];
    rustflags.extend(["-C".to_owned(), "strip=symbols".to_owned()]);
    let wrapper = std::env::current_exe().context("the xtask binary's path")?;
    let mut build = cargo();
    build
        .args(["build", "--release", "--locked", "--target", arch.triple])
        .args(cargo_args)
        // Scoped to the target triple: build scripts, proc-macros and aya-build's eBPF build
        // do not get +crt-static. The path remaps go to every rustc through the wrapper.
        .env(arch.cargo_env("RUSTFLAGS"), rustflags.join(" "))
        .env("RUSTC_WRAPPER", &wrapper)
        .env(REMAP_ENV, remap_flags().join("\x1f"))
        .env("SOURCE_DATE_EPOCH", epoch.to_string());
    if let Some(linker) = arch.linker {
        build.env(arch.cargo_env("LINKER"), linker);
    }
    run_cmd(build)?;
    let binary = root().join("target").join(arch.triple).join("release").join(bin);
    check_static(&binary, arch)?;
    Ok(binary)
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

/// Fails unless `binary` is an ELF executable for `arch` without an interpreter and without
/// DT_NEEDED libraries (static or static-pie): it must run in an image holding nothing else.
fn check_static(binary: &Path, arch: Arch) -> anyhow::Result<()> {
    let bytes = fs::read(binary).with_context(|| format!("read {}", binary.display()))?;
    let machine = bytes.get(0x12..0x14).map(|m| u16::from_le_bytes([m[0], m[1]]));
    if machine != Some(arch.e_machine) {
        bail!("{} is not an {} ELF file (e_machine {machine:?})", binary.display(), arch.name);
    }
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
