//! `cargo xtask deb`: `target/dist/bindtrace_VERSION_amd64.deb`, made with `dpkg-deb` from
//! `dist`'s static binary: the binary in /usr/bin, the systemd unit (deploy/systemd) in
//! /lib/systemd/system, the man page (`bindtrace generate man`, gzip -n) in
//! /usr/share/man/man1, bash, zsh and fish completions in their vendor directories, the
//! copyright file and the maintainer scripts in deploy/deb.
//!
//! Reproducible like the tarball: every mtime is the commit's time, owners are root
//! (`--root-owner-group`), gzip without a name or time, and dpkg-deb reads SOURCE_DATE_EPOCH.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{
    dist::{self, Artefacts},
    util::{root, run_cmd},
};

#[derive(clap::Args)]
pub struct Options {}

pub fn run(_opts: &Options) -> anyhow::Result<()> {
    let deb = build()?;
    println!("{}", deb.display());
    Ok(())
}

/// Builds `dist`, then the package; returns the .deb's path.
pub fn build() -> anyhow::Result<PathBuf> {
    let dist = dist::build(None, dist::X86_64)?;
    package(&dist)
}

/// Where each file goes, relative to the package root, and its mode.
struct Entry {
    path: &'static str,
    mode: u32,
    contents: Vec<u8>,
}

fn package(dist: &Artefacts) -> anyhow::Result<PathBuf> {
    let out = root().join("target/dist");
    let stage = out.join("deb");
    let _ = fs::remove_dir_all(&stage);

    let deploy = root().join("deploy");
    let read = |p: PathBuf| fs::read(&p).with_context(|| format!("read {}", p.display()));
    let generated = |what: &str| generate(&dist.binary, what);
    let files = vec![
        Entry { path: "usr/bin/bindtrace", mode: 0o755, contents: read(dist.binary.clone())? },
        Entry {
            path: "lib/systemd/system/bindtrace.service",
            mode: 0o644,
            contents: read(deploy.join("systemd/bindtrace.service"))?,
        },
        Entry { path: "usr/share/man/man1/bindtrace.1.gz", mode: 0o644, contents: gzip(&generated("man")?)? },
        Entry {
            path: "usr/share/bash-completion/completions/bindtrace",
            mode: 0o644,
            contents: generated("bash")?,
        },
        Entry {
            path: "usr/share/zsh/vendor-completions/_bindtrace",
            mode: 0o644,
            contents: generated("zsh")?,
        },
        Entry {
            path: "usr/share/fish/vendor_completions.d/bindtrace.fish",
            mode: 0o644,
            contents: generated("fish")?,
        },
        Entry {
            path: "usr/share/doc/bindtrace/copyright",
            mode: 0o644,
            contents: read(deploy.join("deb/copyright"))?,
        },
    ];
    for f in &files {
        write(&stage.join(f.path), &f.contents, f.mode)?;
    }

    let control = stage.join("DEBIAN");
    let installed_kib: u64 = files.iter().map(|f| (f.contents.len() as u64).div_ceil(1024)).sum();
    write(&control.join("control"), control_file(&dist.version, installed_kib).as_bytes(), 0o644)?;
    write(&control.join("md5sums"), md5sums(&stage, &files)?.as_bytes(), 0o644)?;
    for script in ["postinst", "prerm", "postrm"] {
        write(&control.join(script), &read(deploy.join("deb").join(script))?, 0o755)?;
    }
    set_mtimes(&stage, dist.epoch)?;

    let deb = out.join(format!("bindtrace_{}_amd64.deb", dist.version));
    let mut dpkg = Command::new("dpkg-deb");
    dpkg.args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&stage)
        .arg(&deb)
        .env("SOURCE_DATE_EPOCH", dist.epoch.to_string());
    run_cmd(dpkg).map_err(|e| e.context("dpkg-deb (Debian package dpkg)"))?;
    eprintln!("xtask: {} ({} KiB installed)", deb.display(), installed_kib);
    Ok(deb)
}

fn control_file(version: &str, installed_kib: u64) -> String {
    format!(
        "Package: bindtrace
Version: {version}
Architecture: amd64
Maintainer: The bindtrace developers <bindtrace@users.noreply.github.com>
Installed-Size: {installed_kib}
Section: net
Priority: optional
Homepage: https://github.com/bindtrace/bindtrace
Description: finds connections refused because a container listens on loopback
 bindtrace watches the kernel's reset path with eBPF and reports, as it happens, every
 connection to a Docker container that was refused because the service inside listens on
 127.0.0.1 (or on the wrong address, family or port): which container, which published port,
 which process is bound where, and the fix. `bindtrace check` audits the published ports once.
 .
 The binary is static; the kernel needs BTF. The service is installed but not enabled:
 `systemctl enable --now bindtrace`.
"
    )
}

/// The binary's own output for `bindtrace generate WHAT` (it needs no privileges for that).
fn generate(binary: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    let out = Command::new(binary).args(["generate", what]).output().context("bindtrace generate")?;
    if !out.status.success() || out.stdout.is_empty() {
        bail!("bindtrace generate {what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

/// `gzip -n -9`: no name and no time in the header, so the bytes depend on the contents only.
fn gzip(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    use std::io::Write as _;
    let mut child = Command::new("gzip")
        .args(["-n", "-9", "-c"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("gzip")?;
    child.stdin.take().expect("piped").write_all(data)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("gzip failed: {}", out.status);
    }
    Ok(out.stdout)
}

fn md5sums(stage: &Path, files: &[Entry]) -> anyhow::Result<String> {
    let mut lines = String::new();
    for f in files {
        let out = Command::new("md5sum").arg(f.path).current_dir(stage).output().context("md5sum")?;
        if !out.status.success() {
            bail!("md5sum {}: {}", f.path, String::from_utf8_lossy(&out.stderr));
        }
        lines.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    Ok(lines)
}

fn write(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let parent = path.parent().expect("a file in the stage");
    fs::create_dir_all(parent)?;
    fs::write(path, contents).with_context(|| format!("write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Every file and directory of the stage gets the commit's time and directories 0755 (the
/// umask must not leak into the package).
fn set_mtimes(stage: &Path, epoch: u64) -> anyhow::Result<()> {
    let mut cmd = Command::new("find");
    cmd.arg(stage).args(["-type", "d", "-exec", "chmod", "0755", "{}", "+"]);
    run_cmd(cmd)?;
    let mut touch = Command::new("find");
    touch.arg(stage).args(["-exec", "touch", "--no-dereference", "-d", &format!("@{epoch}"), "{}", "+"]);
    run_cmd(touch)
}
