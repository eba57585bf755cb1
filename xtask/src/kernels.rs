//! The kernel matrix: bindtrace's core scenarios on the kernels Docker hosts run.
//!
//! For each Debian kernel below, downloads its package (never installed: `apt-get download`
//! through a private apt configuration under `target/kernels/`, so the host's apt state is not
//! touched and bullseye needs no entry in /etc/apt), takes `vmlinuz` and the few modules the
//! scenarios need, builds a small uncompressed initramfs (busybox, iproute2's `ip` and `tc`,
//! `bindtrace`, the `bindtrace-matrix` scenario runner, their shared libraries) and boots it
//! under qemu with software emulation (`-accel tcg`: this machine's /dev/kvm hangs stock
//! kernels). The guest prints `@@` lines on its serial console; this module reads them. The host
//! kernel runs the same runner natively. Downloads and extracted kernels stay cached in
//! `target/kernels/`; a kernel package is fetched once.
//!
//! A guest of another architecture (arm64, under `qemu-system-aarch64`) runs the static builds
//! of bindtrace and of the runner for it (`./x dist`'s way of building), and its busybox, `ip`
//! and `tc` come from Debian's packages for it, fetched and unpacked like its kernel.
//!
//! The ABIs are those of the BTF fixtures in `bindtrace/testdata/btf/`, so the run also checks
//! that the booted kernel's `/sys/kernel/btf/vmlinux` is byte for byte the fixture the unit tests
//! resolve. When Debian has dropped that ABI from its archive, the newest one is used instead
//! and the report says the BTF differs from the fixture.
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Write as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    dist::{self, AARCH64, Arch, X86_64},
    util::{cargo, root, run_cmd},
};

#[derive(clap::Args)]
pub struct Options {
    /// Only these kernels (comma-separated): 6.1, 5.10, 6.1-arm64, host.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Use target/release/{bindtrace,bindtrace-matrix} as they are (no cargo build).
    #[arg(long)]
    no_build: bool,
    /// Write this run's table into README.md (between the kernel-matrix markers).
    #[arg(long)]
    readme: bool,
    /// Give up on a guest after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Without --only: only the kernels that are part of `./x test` (set by the suite).
    #[arg(skip)]
    suite: bool,
}

struct Kernel {
    label: &'static str,
    /// For the table.
    distro: &'static str,
    suite: &'static str,
    /// The kernel's architecture; the guest runs the static builds for it (`./x dist`'s).
    arch: Arch,
    /// ABI of the BTF fixture (see bindtrace/testdata/btf/README.md), or the ABI to fetch.
    abi: &'static str,
    /// The unit tests' BTF of this kernel (None: no fixture, the BTF is only reported).
    fixture: Option<&'static str>,
    /// Hooks bindtrace must accept on it (what each kernel provides, docs/kernels.md, and the fixtures).
    expect: &'static [&'static str],
    /// Part of `./x test` (a guest whose boot and scenarios take too long under emulation runs
    /// only when named with `--only`).
    in_suite: bool,
}

const KERNELS: &[Kernel] = &[
    Kernel {
        label: "6.1",
        distro: "Debian 12 bookworm",
        suite: "bookworm",
        arch: X86_64,
        abi: "6.1.0-56",
        fixture: Some("vmlinux-6.1.btf.gz"),
        expect: &["kfree-skb", "tc"],
        in_suite: true,
    },
    Kernel {
        label: "5.10",
        distro: "Debian 11 bullseye",
        suite: "bullseye",
        arch: X86_64,
        abi: "5.10.0-46",
        fixture: Some("vmlinux-5.10.btf.gz"),
        expect: &["tc"],
        in_suite: true,
    },
    // Debian 12's arm64 kernel on qemu's `virt` board (a Cortex-A57, emulated): the aarch64
    // static binaries on the kernel of an arm64 host (Graviton, Ampere, Apple silicon's VMs).
    Kernel {
        label: "6.1-arm64",
        distro: "Debian 12 bookworm",
        suite: "bookworm",
        arch: AARCH64,
        abi: "6.1.0-57",
        fixture: None,
        expect: &["kfree-skb", "tc"],
        // Measured on 2 shared cores: 25 s from qemu's start to power-off, 3 s to download
        // (once), about 100 s to cross-build bindtrace-matrix (once; bindtrace's aarch64 build
        // is `./x test`'s dist step's).
        in_suite: true,
    },
];

/// Modules the scenarios need, in insmod order (all `=m` in Debian's configs).
const MODULES: &[&str] = &["llc", "stp", "bridge", "veth", "sch_ingress", "cls_bpf"];
/// The UDP socket dump bindtrace reads verdicts from (`udp_diag` and what it needs), in insmod
/// order. Modules in Debian's configs, but taken only where the package has them: a kernel with
/// one built in needs no file, and bindtrace falls back to /proc/net/udp{,6} without udp_diag.
const DIAG_MODULES: &[&str] = &["sock_diag", "inet_diag", "udp_diag"];
const MIRROR: &str = "http://deb.debian.org";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const BEGIN: &str = "<!-- kernel-matrix:begin -->";
const END: &str = "<!-- kernel-matrix:end -->";

/// What one kernel's run said.
#[derive(Default)]
struct Outcome {
    kernel: String,
    how: String,
    release: String,
    hooks: String,
    tc_mode: String,
    checks: String,
    checks_passed: u64,
    checks_failed: u64,
    passed: bool,
    failures: Vec<String>,
    notes: Vec<String>,
    boot_s: Option<f64>,
    run_s: Option<f64>,
    wall_s: f64,
}

/// Checks passed and failed over every kernel (a kernel that failed outside its checks, by
/// timing out or by its BTF, counts one more failure).
#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    pub passed: u64,
    pub failed: u64,
}

/// `cargo xtask kernels`: fails when any kernel failed.
pub fn run(opts: &Options) -> anyhow::Result<()> {
    matrix(opts).map(|_| ())
}

/// The matrix as one step of `cargo xtask test`: every kernel, freshly built binaries. Errors
/// only for what stopped it from running; failed checks are in the summary.
pub fn in_suite() -> anyhow::Result<Summary> {
    let opts = Options { only: Vec::new(), no_build: false, readme: false, timeout: 900, suite: true };
    run_all(&opts).map(|(summary, _)| summary)
}

fn matrix(opts: &Options) -> anyhow::Result<Summary> {
    let (summary, failed) = run_all(opts)?;
    if !failed.is_empty() {
        bail!("the kernel matrix failed on {}", failed.join(", "));
    }
    Ok(summary)
}

/// Runs the selected kernels; returns the summary and the kernels that failed.
fn run_all(opts: &Options) -> anyhow::Result<(Summary, Vec<String>)> {
    let wanted = |label: &str| {
        if opts.only.is_empty() {
            !opts.suite || KERNELS.iter().find(|k| k.label == label).is_none_or(|k| k.in_suite)
        } else {
            opts.only.iter().any(|o| o == label)
        }
    };
    for o in &opts.only {
        if o != "host" && !KERNELS.iter().any(|k| k.label == o) {
            bail!("unknown kernel {o:?}: choose among host, {}", labels());
        }
    }
    let guests: Vec<&Kernel> = KERNELS.iter().filter(|k| wanted(k.label)).collect();
    let native = wanted("host") || guests.iter().any(|k| k.arch == X86_64);
    let cross = guests.iter().any(|k| k.arch == AARCH64);
    if !opts.no_build && native {
        // One package per command, as `cargo xtask test` builds them: building both at once
        // unifies their dependencies' features differently and rebuilds bindtrace (and its eBPF).
        let mut build = cargo();
        build.args(["build", "--release", "-p", "bindtrace"]);
        run_cmd(build)?;
        let mut build = cargo();
        build.args(["build", "--release", "-p", "bindtrace-tests", "--bin", "bindtrace-matrix"]);
        run_cmd(build)?;
    }
    if !opts.no_build && cross {
        // The guest has no libraries of ours: both binaries static, built as `./x dist` builds.
        let epoch = dist::source_epoch()?;
        dist::static_build(AARCH64, &["-p", "bindtrace"], "bindtrace", epoch)?;
        dist::static_build(
            AARCH64,
            &["-p", "bindtrace-tests", "--bin", "bindtrace-matrix"],
            "bindtrace-matrix",
            epoch,
        )?;
    }
    let native_bins = Bins {
        bindtrace: root().join("target/release/bindtrace"),
        matrix: root().join("target/release/bindtrace-matrix"),
    };
    let cross_bins = Bins {
        bindtrace: root().join("target").join(AARCH64.triple).join("release/bindtrace"),
        matrix: root().join("target").join(AARCH64.triple).join("release/bindtrace-matrix"),
    };
    let mut needed = Vec::new();
    if native {
        needed.extend([&native_bins.bindtrace, &native_bins.matrix]);
    }
    if cross {
        needed.extend([&cross_bins.bindtrace, &cross_bins.matrix]);
    }
    for b in needed {
        if !b.is_file() {
            bail!("{} is missing: run without --no-build", b.display());
        }
    }
    let work = root().join("target/kernels");
    fs::create_dir_all(&work)?;

    let mut outcomes = Vec::new();
    if wanted("host") {
        outcomes.push(host(&native_bins, &work)?);
    }
    for k in &guests {
        which(qemu(k.arch).binary).context("qemu is not installed: run `sudo ./x setup`")?;
    }
    for k in guests {
        let bins = if k.arch == AARCH64 { &cross_bins } else { &native_bins };
        let outcome = guest(k, bins, &work, Duration::from_secs(opts.timeout))
            .with_context(|| format!("kernel {}", k.label))?;
        outcomes.push(outcome);
    }

    let table = table(&outcomes);
    let report = work.join("report.md");
    fs::write(&report, &table)?;
    eprintln!("\n{table}\nxtask: kernel matrix report in {}", report.display());
    for o in &outcomes {
        for f in &o.failures {
            eprintln!("xtask: {}: {f}", o.kernel);
        }
    }
    if opts.readme {
        update_readme(&table)?;
    }
    let mut summary = Summary::default();
    for o in &outcomes {
        summary.passed += o.checks_passed;
        summary.failed += o.checks_failed;
        if !o.passed && o.checks_failed == 0 {
            summary.failed += 1;
        }
    }
    let failed = outcomes.iter().filter(|o| !o.passed).map(|o| o.kernel.clone()).collect();
    Ok((summary, failed))
}

fn labels() -> String {
    KERNELS.iter().map(|k| k.label).collect::<Vec<_>>().join(", ")
}

struct Bins {
    bindtrace: PathBuf,
    matrix: PathBuf,
}

/// The host kernel, natively (needs root, like the integration tests).
fn host(bins: &Bins, work: &Path) -> anyhow::Result<Outcome> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")?.trim().to_owned();
    let mut o = Outcome { kernel: release.clone(), how: "host, native".into(), ..Outcome::default() };
    if fs::metadata("/proc/self")?.uid() != 0 {
        o.notes.push("skipped: needs root".into());
        o.passed = true;
        return Ok(o);
    }
    eprintln!("xtask: kernel {release} (host, native)");
    let t0 = Instant::now();
    let mut child = Command::new(&bins.matrix)
        .env("BINDTRACE_BIN", &bins.bindtrace)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bins.matrix.display()))?;
    let stderr = child.stderr.take().expect("piped");
    let err_log = work.join("host.stderr.log");
    let err_thread = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(stderr).read_to_string_lossy(&mut text);
        let _ = fs::write(err_log, text);
    });
    let lines = relay(child.stdout.take().expect("piped"), "host", &work.join("host.log"))?;
    let status = child.wait()?;
    let _ = err_thread.join();
    o.wall_s = t0.elapsed().as_secs_f64();
    parse(&lines, &mut o);
    o.passed = o.passed && status.success();
    Ok(o)
}

trait ReadLossy {
    fn read_to_string_lossy(&mut self, out: &mut String) -> std::io::Result<()>;
}

impl<R: std::io::Read> ReadLossy for R {
    fn read_to_string_lossy(&mut self, out: &mut String) -> std::io::Result<()> {
        let mut bytes = Vec::new();
        self.read_to_end(&mut bytes)?;
        out.push_str(&String::from_utf8_lossy(&bytes));
        Ok(())
    }
}

/// Copies a console stream to `log` and echoes its `@@` lines; returns every line.
fn relay(stream: impl std::io::Read, tag: &str, log: &Path) -> anyhow::Result<Vec<String>> {
    let mut file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut lines = Vec::new();
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        let line = String::from_utf8_lossy(&buf).replace('\r', "");
        let line = line.trim_end_matches('\n').to_owned();
        writeln!(file, "{line}")?;
        if let Some(rest) = marked(&line) {
            eprintln!("  [{tag}] {rest}");
        }
        lines.push(line);
    }
    Ok(lines)
}

/// The text after `@@ `: a line of the runner or of the init script. (The console may put
/// terminal escapes from the firmware before the first one.)
fn marked(line: &str) -> Option<&str> {
    line.find("@@ ").map(|i| &line[i + 3..])
}

/// Reads the runner's and the init script's `@@` lines.
fn parse(lines: &[String], o: &mut Outcome) {
    for line in lines {
        let Some(rest) = marked(line) else { continue };
        let (tag, value) = rest.split_once(' ').unwrap_or((rest, ""));
        match tag {
            "KERNEL" => o.release = value.to_owned(),
            "BOOTED" => o.boot_s = value.strip_prefix("uptime=").and_then(|v| v.parse().ok()),
            "HOOK" if value.starts_with("tc supported") => {
                if let Some(mode) =
                    ["tcx", "clsact"].into_iter().find(|m| value.contains(&format!("({m} ingress)")))
                {
                    o.tc_mode = mode.to_owned();
                }
            }
            "CHECK" if value.contains(" FAIL ") => {
                o.checks_failed += 1;
                o.failures.push(value.to_owned());
            }
            "CHECK" if value.contains(" PASS ") => o.checks_passed += 1,
            "INSMOD_FAILED" => o.failures.push(format!("insmod {value} failed")),
            "RESULT" => {
                o.passed = value.starts_with("PASS ");
                for field in value.split_whitespace() {
                    if let Some(h) = field.strip_prefix("hooks=") {
                        o.hooks = h.to_owned();
                    } else if let Some(t) = field.strip_prefix("time=") {
                        o.run_s = t.trim_end_matches('s').parse().ok();
                    } else if let Some(n) = field.strip_prefix("checks=") {
                        o.checks = n.to_owned();
                    }
                }
            }
            _ => {}
        }
    }
}

/// One Debian kernel under qemu.
fn guest(k: &Kernel, bins: &Bins, work: &Path, timeout: Duration) -> anyhow::Result<Outcome> {
    let (abi, deb) = fetch(k, work)?;
    let kernel = format!("{abi}-{}", deb_arch(k.arch));
    let kdir = extract(&abi, k.arch, &deb, work)?;
    let userland = if k.arch == X86_64 { Userland::Host } else { Userland::Sysroot(sysroot(k, work)?) };
    let initramfs = work.join(format!("initramfs-{}.cpio", cache_name(&abi, k.arch)));
    build_initramfs(k, &kdir, bins, &userland, &initramfs)?;
    let qemu = qemu(k.arch);
    let how = if k.arch == X86_64 {
        format!("{}, qemu", k.distro)
    } else {
        format!("{}, qemu (emulated {})", k.distro, k.arch.name)
    };
    let mut o = Outcome { kernel: kernel.clone(), how, ..Outcome::default() };
    eprintln!(
        "xtask: booting {kernel} under qemu (initramfs {:.1} MB)",
        fs::metadata(&initramfs)?.len() as f64 / 1e6
    );
    let t0 = Instant::now();
    let mut child = Command::new(qemu.binary)
        .args(qemu.machine)
        .args(["-m", "1024", "-smp", "2", "-nic", "none"])
        .arg("-kernel")
        .arg(kdir.join(format!("boot/vmlinuz-{kernel}")))
        .arg("-initrd")
        .arg(&initramfs)
        .arg("-append")
        .arg(format!("console={} panic=-1 quiet loglevel=3", qemu.console))
        .args(["-nographic", "-no-reboot"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", qemu.binary))?;
    let stdout = child.stdout.take().expect("piped");
    let log = work.join(format!("boot-{}.log", cache_name(&abi, k.arch)));
    let tag = k.label.to_owned();
    let reader = std::thread::spawn(move || relay(stdout, &tag, &log));
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let lines = reader.join().map_err(|_| anyhow::anyhow!("console reader panicked"))??;
    o.wall_s = t0.elapsed().as_secs_f64();
    parse(&lines, &mut o);
    if status.is_none() {
        o.passed = false;
        o.failures.push(format!("no result within {timeout:?}: qemu killed"));
    }
    if !lines.iter().any(|l| marked(l) == Some("EXIT 0")) {
        o.passed = false;
    }
    // The unit tests' fixture is this kernel's BTF, byte for byte (when the ABI is the same).
    let booted =
        lines.iter().find_map(|l| marked(l)?.strip_prefix("BTF_SHA256 ")).map(str::trim).unwrap_or("");
    let Some(fixture_name) = k.fixture else {
        o.notes.push(format!("BTF sha256 {booted} (no fixture for this kernel)"));
        return Ok(o);
    };
    let fixture = fixture_sha256(fixture_name)?;
    if abi == k.abi {
        if booted == fixture {
            o.notes.push(format!("BTF = fixture {fixture_name}"));
        } else {
            o.passed = false;
            o.failures.push(format!(
                "the booted kernel's BTF (sha256 {booted}) is not the fixture {fixture_name} ({fixture})"
            ));
        }
    } else {
        o.notes.push(format!(
            "BTF {} the fixture {fixture_name} (fixture ABI {}, booted {abi})",
            if booted == fixture { "equals" } else { "differs from" },
            k.abi
        ));
    }
    Ok(o)
}

/// How qemu emulates one architecture.
struct Qemu {
    binary: &'static str,
    machine: &'static [&'static str],
    /// The serial console the guest's kernel writes to.
    console: &'static str,
}

fn qemu(arch: Arch) -> Qemu {
    if arch == AARCH64 {
        // The `virt` board needs a CPU named; a Cortex-A57 is what Debian's arm64 kernel
        // (ARMv8.0) expects at least, and TCG emulates it faster than `max`.
        Qemu {
            binary: "qemu-system-aarch64",
            machine: &["-M", "virt", "-cpu", "cortex-a57", "-accel", "tcg"],
            console: "ttyAMA0",
        }
    } else {
        Qemu { binary: "qemu-system-x86_64", machine: &["-accel", "tcg", "-cpu", "max"], console: "ttyS0" }
    }
}

/// Debian's name of the architecture (for amd64 and arm64 the same as OCI's).
fn deb_arch(arch: Arch) -> &'static str {
    arch.oci
}

/// The name of a guest's files under `target/kernels/`: the ABI alone for x86_64 (as before
/// there were other architectures, so existing caches stay valid), ABI-ARCH otherwise.
fn cache_name(abi: &str, arch: Arch) -> String {
    if arch == X86_64 { abi.to_owned() } else { format!("{abi}-{}", deb_arch(arch)) }
}

fn fixture_sha256(fixture: &str) -> anyhow::Result<String> {
    let path = root().join("bindtrace/testdata/btf").join(fixture);
    let out = Command::new("sh")
        .arg("-c")
        .arg("gzip -dc \"$1\" | sha256sum")
        .arg("sh")
        .arg(&path)
        .output()
        .context("gzip | sha256sum")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.split_whitespace().next().unwrap_or_default().to_owned())
}

/// The kernel package, from the cache or downloaded: (ABI, path of the .deb).
fn fetch(k: &Kernel, work: &Path) -> anyhow::Result<(String, PathBuf)> {
    let dl = work.join("dl");
    fs::create_dir_all(&dl)?;
    let arch = deb_arch(k.arch);
    if let Some(deb) = cached_deb(&dl, k.abi, arch)? {
        return Ok((k.abi.to_owned(), deb));
    }
    let apt = AptConfig::new(work, k.suite, arch)?;
    eprintln!(
        "xtask: downloading Debian {}'s kernel package list (private apt config {})",
        k.suite,
        apt.conf.display()
    );
    run_cmd(apt.command(&["apt-get", "-q", "update"]))?;
    let mut abi = k.abi.to_owned();
    let mut get = apt.command(&["apt-get", "-q", "download", &format!("linux-image-{abi}-{arch}")]);
    get.current_dir(&dl);
    if get.status().map(|s| !s.success()).unwrap_or(true) {
        // Debian drops superseded ABIs: take the one the meta package points at now.
        let out = apt.command(&["apt-cache", "depends", &format!("linux-image-{arch}")]).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let suffix = format!("-{arch}");
        abi = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Depends: linux-image-")?.strip_suffix(suffix.as_str()))
            .with_context(|| format!("no linux-image-<abi>-{arch} behind linux-image-{arch}"))?
            .to_owned();
        eprintln!("xtask: {} is no longer in {}; using {abi}", k.abi, k.suite);
        if cached_deb(&dl, &abi, arch)?.is_none() {
            let mut get = apt.command(&["apt-get", "-q", "download", &format!("linux-image-{abi}-{arch}")]);
            get.current_dir(&dl);
            run_cmd(get)?;
        }
    }
    let deb = cached_deb(&dl, &abi, arch)?.context("apt-get download left no package")?;
    Ok((abi, deb))
}

fn cached_deb(dl: &Path, abi: &str, arch: &str) -> anyhow::Result<Option<PathBuf>> {
    let prefix = format!("linux-image-{abi}-{arch}_");
    for entry in fs::read_dir(dl)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// apt pointed at one Debian suite (and its security updates) for one architecture, with its
/// own lists and cache.
struct AptConfig {
    conf: PathBuf,
}

impl AptConfig {
    fn new(work: &Path, suite: &str, arch: &str) -> anyhow::Result<AptConfig> {
        // amd64 is the host's: its lists keep the directory they always had.
        let foreign = arch != "amd64";
        let dir = work.join("apt").join(if foreign { format!("{suite}-{arch}") } else { suite.to_owned() });
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let sources = dir.join("sources.list");
        fs::write(
            &sources,
            format!(
                "deb [signed-by={KEYRING}] {MIRROR}/debian {suite} main\n\
                 deb [signed-by={KEYRING}] {MIRROR}/debian-security {suite}-security main\n"
            ),
        )?;
        let conf = dir.join("apt.conf");
        let d = dir.display();
        fs::write(
            &conf,
            format!(
                "Dir::Etc::sourcelist \"{d}/sources.list\";\n\
                 Dir::Etc::sourceparts \"-\";\n\
                 Dir::State::Lists \"{d}/lists\";\n\
                 Dir::Cache \"{d}/cache\";\n\
                 Dir::State::status \"/dev/null\";\n\
                 Acquire::Languages \"none\";\n\
                 APT::Sandbox::User \"root\";\n\
                 {}",
                if foreign {
                    format!("APT::Architecture \"{arch}\";\nAPT::Architectures {{ \"{arch}\"; }};\n")
                } else {
                    String::new()
                }
            ),
        )?;
        Ok(AptConfig { conf })
    }

    fn command(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..]).env("APT_CONFIG", &self.conf);
        cmd
    }
}

/// `boot/vmlinuz-*` and the modules of [`MODULES`] and [`DIAG_MODULES`] out of the package,
/// once per ABI (again when the lists grew since: `.complete` names every module it settled).
fn extract(abi: &str, arch: Arch, deb: &Path, work: &Path) -> anyhow::Result<PathBuf> {
    let kdir = work.join("k").join(cache_name(abi, arch));
    let done = kdir.join(".complete");
    if let Ok(settled) = fs::read_to_string(&done) {
        let has =
            |m: &str| settled.lines().any(|l| l.ends_with(&format!("/{m}.ko")) || l == format!("absent:{m}"));
        if MODULES.iter().chain(DIAG_MODULES).all(|m| has(m)) {
            return Ok(kdir);
        }
    }
    if kdir.exists() {
        fs::remove_dir_all(&kdir)?;
    }
    fs::create_dir_all(&kdir)?;
    let listing =
        Command::new("dpkg-deb").arg("--contents").arg(deb).output().context("dpkg-deb --contents")?;
    if !listing.status.success() {
        bail!("dpkg-deb --contents {}: {}", deb.display(), String::from_utf8_lossy(&listing.stderr));
    }
    let text = String::from_utf8_lossy(&listing.stdout);
    let members: Vec<&str> = text.lines().filter_map(|l| l.split_whitespace().nth(5)).collect();
    let mut wanted: Vec<String> = Vec::new();
    let vmlinuz = format!("./boot/vmlinuz-{abi}-{}", deb_arch(arch));
    if !members.contains(&vmlinuz.as_str()) {
        bail!("{} has no {vmlinuz}", deb.display());
    }
    wanted.push(vmlinuz);
    for m in MODULES {
        let file = format!("/{m}.ko");
        let member = members.iter().find(|p| p.ends_with(&file)).with_context(|| {
            format!("{} has no module {m}.ko (compressed modules are not handled)", deb.display())
        })?;
        wanted.push((*member).to_owned());
    }
    let mut absent = Vec::new();
    for m in DIAG_MODULES {
        let file = format!("/{m}.ko");
        match members.iter().find(|p| p.ends_with(&file)) {
            Some(member) => wanted.push((*member).to_owned()),
            None => absent.push(format!("absent:{m}")),
        }
    }
    let status = Command::new("sh")
        .arg("-c")
        .arg("deb=$1 dir=$2; shift 2; dpkg-deb --fsys-tarfile \"$deb\" | tar -x -C \"$dir\" -f - \"$@\"")
        .arg("sh")
        .arg(deb)
        .arg(&kdir)
        .args(&wanted)
        .status()?;
    if !status.success() {
        bail!("extracting {} failed", deb.display());
    }
    fs::write(done, wanted.iter().chain(&absent).cloned().collect::<Vec<_>>().join("\n"))?;
    Ok(kdir)
}

/// The guest's /init: mount, load modules, run the scenarios, report, power off.
fn init_script(k: &Kernel) -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /run /tmp /var
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
ln -s /run /var/run
echo "@@ BOOTED uptime=$(cut -d' ' -f1 /proc/uptime)"
for m in {modules}; do insmod /lib/modules/$m.ko || echo "@@ INSMOD_FAILED $m"; done
for m in {diag}; do [ -e /lib/modules/$m.ko ] && {{ insmod /lib/modules/$m.ko || echo "@@ INSMOD_FAILED $m"; }}; done
/usr/sbin/ip link set lo up
echo "@@ BTF_SHA256 $(sha256sum /sys/kernel/btf/vmlinux | cut -d' ' -f1)"
BINDTRACE_BIN=/usr/bin/bindtrace /usr/bin/bindtrace-matrix --expect-hooks {expect}
echo "@@ EXIT $?"
echo "@@ DONE uptime=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
"#,
        modules = MODULES.join(" "),
        diag = DIAG_MODULES.join(" "),
        expect = k.expect.join(","),
    )
}

/// Where the guest's busybox, `ip` and `tc` come from.
enum Userland {
    /// The host's own (an x86_64 guest): their libraries are those `ldd` finds.
    Host,
    /// Debian's packages for the guest's architecture, unpacked in this directory.
    Sysroot(PathBuf),
}

/// Packages of a foreign guest's userland: busybox, iproute2 and the libraries `ip` and `tc`
/// load (a missing one fails the initramfs build, naming it).
const USERLAND_PACKAGES: &[&str] = &[
    "busybox-static",
    "iproute2",
    "libc6",
    "libbpf1",
    "libbsd0",
    "libcap2",
    "libelf1",
    "libmd0",
    "libmnl0",
    "libxtables12",
    "zlib1g",
];

/// Debian's userland packages for `k`'s architecture, downloaded with the private apt
/// configuration and unpacked (never installed) once into `target/kernels/userland-SUITE-ARCH/`.
fn sysroot(k: &Kernel, work: &Path) -> anyhow::Result<PathBuf> {
    let arch = deb_arch(k.arch);
    let dir = work.join(format!("userland-{}-{arch}", k.suite));
    // The stamp holds the package list: a changed list unpacks afresh.
    let done = dir.join(".complete");
    let stamp = USERLAND_PACKAGES.join("\n");
    if fs::read_to_string(&done).is_ok_and(|s| s == stamp) {
        return Ok(dir);
    }
    let debs = work.join("dl").join(format!("userland-{}-{arch}", k.suite));
    for d in [&dir, &debs] {
        if d.exists() {
            fs::remove_dir_all(d)?;
        }
        fs::create_dir_all(d)?;
    }
    let apt = AptConfig::new(work, k.suite, arch)?;
    eprintln!(
        "xtask: downloading Debian {}'s {arch} busybox and iproute2 (private apt config {})",
        k.suite,
        apt.conf.display()
    );
    run_cmd(apt.command(&["apt-get", "-q", "update"]))?;
    let mut argv = vec!["apt-get", "-q", "download"];
    argv.extend(USERLAND_PACKAGES);
    let mut get = apt.command(&argv);
    get.current_dir(&debs);
    run_cmd(get)?;
    for entry in fs::read_dir(&debs)? {
        let mut x = Command::new("dpkg-deb");
        x.arg("-x").arg(entry?.path()).arg(&dir);
        run_cmd(x)?;
    }
    fs::write(done, stamp)?;
    Ok(dir)
}

/// `path` inside `root`, its symbolic links followed inside `root` too (an unpacked package's
/// absolute links point into the guest's tree, not the host's).
fn in_root(root: &Path, path: &str) -> anyhow::Result<PathBuf> {
    let mut p = root.join(path.trim_start_matches('/'));
    for _ in 0..16 {
        let Ok(meta) = fs::symlink_metadata(&p) else { return Ok(p) };
        if !meta.file_type().is_symlink() {
            return Ok(p);
        }
        let target = fs::read_link(&p)?;
        p = match target.strip_prefix("/") {
            Ok(inside) => root.join(inside),
            Err(_) => p.parent().expect("a link has a parent").join(target),
        };
    }
    bail!("too many levels of symbolic links at {}", p.display())
}

/// (initramfs path, file) of the interpreter and of every library `bin` needs, recursively,
/// found in the unpacked `root` (with `readelf`: the host cannot run a foreign `ldd`).
fn sysroot_libs(root: &Path, bin: &Path, arch: Arch) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let multiarch = format!("{}-linux-gnu", arch.name);
    let dirs = [format!("lib/{multiarch}"), format!("usr/lib/{multiarch}")];
    let mut found = Vec::new();
    let mut seen = BTreeSet::new();
    let mut todo = vec![bin.to_owned()];
    while let Some(file) = todo.pop() {
        let out =
            Command::new("readelf").args(["-d", "-l"]).arg(&file).output().context("readelf (binutils)")?;
        if !out.status.success() {
            bail!("readelf {}: {}", file.display(), String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines() {
            if let Some((_, interp)) = line.split_once("[Requesting program interpreter: ") {
                let interp = interp.trim_end_matches(']');
                if seen.insert(interp.to_owned()) {
                    found.push((interp.trim_start_matches('/').to_owned(), in_root(root, interp)?));
                }
            } else if line.contains("(NEEDED)") {
                let Some((_, name)) = line.split_once('[') else { continue };
                let name = name.trim_end_matches(']');
                if !seen.insert(name.to_owned()) {
                    continue;
                }
                let mut lib = None;
                for d in &dirs {
                    let p = in_root(root, &format!("{d}/{name}"))?;
                    if p.is_file() {
                        lib = Some(p);
                        break;
                    }
                }
                let lib = lib.with_context(|| {
                    format!(
                        "{name} (needed by {}) is in none of the packages {USERLAND_PACKAGES:?}",
                        file.display()
                    )
                })?;
                found.push((format!("lib/{multiarch}/{name}"), lib.clone()));
                todo.push(lib);
            }
        }
    }
    Ok(found)
}

fn build_initramfs(
    k: &Kernel,
    kdir: &Path,
    bins: &Bins,
    userland: &Userland,
    out: &Path,
) -> anyhow::Result<()> {
    let mut cpio = Cpio::default();
    for d in ["proc", "sys", "dev", "run", "tmp", "var", "etc", "sbin", "usr/sbin", "usr/bin", "lib/modules"]
    {
        cpio.dir(d);
    }
    cpio.file("init", 0o755, init_script(k).as_bytes());
    let [busybox, ip, tc] = match userland {
        Userland::Host => ["/bin/busybox", "/usr/sbin/ip", "/usr/sbin/tc"].map(PathBuf::from),
        Userland::Sysroot(root) => {
            [in_root(root, "/bin/busybox")?, in_root(root, "/bin/ip")?, in_root(root, "/sbin/tc")?]
        }
    };
    cpio.file(
        "bin/busybox",
        0o755,
        &fs::read(&busybox).with_context(|| format!("{} (busybox-static)", busybox.display()))?,
    );
    let mut libs = BTreeSet::new();
    for (src, dst) in [
        (ip.as_path(), "usr/sbin/ip"),
        (tc.as_path(), "usr/sbin/tc"),
        (bins.bindtrace.as_path(), "usr/bin/bindtrace"),
        (bins.matrix.as_path(), "usr/bin/bindtrace-matrix"),
    ] {
        cpio.file(dst, 0o755, &fs::read(src).with_context(|| format!("reading {}", src.display()))?);
        match userland {
            Userland::Host => libs.extend(
                shared_libs(src)?
                    .into_iter()
                    .map(|l| (l.trim_start_matches('/').to_owned(), PathBuf::from(l))),
            ),
            Userland::Sysroot(root) => libs.extend(sysroot_libs(root, src, k.arch)?),
        }
    }
    for (dst, src) in libs {
        let data = fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
        cpio.file(&dst, 0o755, &data);
    }
    for m in MODULES {
        let path = find_file(&kdir.join("lib/modules"), &format!("{m}.ko"))?
            .with_context(|| format!("{m}.ko missing from {}", kdir.display()))?;
        cpio.file(&format!("lib/modules/{m}.ko"), 0o644, &fs::read(path)?);
    }
    for m in DIAG_MODULES {
        if let Some(path) = find_file(&kdir.join("lib/modules"), &format!("{m}.ko"))? {
            cpio.file(&format!("lib/modules/{m}.ko"), 0o644, &fs::read(path)?);
        }
    }
    fs::write(out, cpio.finish()).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// Absolute paths `ldd` prints for `bin` (the loader included).
fn shared_libs(bin: &Path) -> anyhow::Result<Vec<String>> {
    let out = Command::new("ldd").arg(bin).output().context("ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") {
        return Ok(Vec::new());
    }
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(str::to_owned)
        .collect())
}

fn find_file(dir: &Path, name: &str) -> anyhow::Result<Option<PathBuf>> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name)? {
                return Ok(Some(found));
            }
        } else if path.file_name().and_then(|n| n.to_str()) == Some(name) {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

fn which(bin: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
        .with_context(|| format!("{bin} not found on PATH"))
}

/// A `newc` cpio archive (what the kernel unpacks as an initramfs), built in memory. Parent
/// directories are added as needed; owners are root, times zero.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields =
            [self.ino, mode, 0, 0, nlink, 0, data.len() as u32, 0, 0, 0, 0, name.len() as u32 + 1, 0];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        let mut path = String::new();
        for part in name.split('/') {
            if !path.is_empty() {
                path.push('/');
            }
            path.push_str(part);
            if self.dirs.insert(path.clone()) {
                self.entry(&path.clone(), 0o040755, &[]);
            }
        }
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        if let Some((parent, _)) = name.rsplit_once('/') {
            self.dir(parent);
        }
        self.entry(name, 0o100000 | perm, data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

fn secs(v: Option<f64>) -> String {
    v.map_or("-".into(), |s| format!("{s:.1} s"))
}

fn table(outcomes: &[Outcome]) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "| kernel | how | hooks available | result | boot | scenarios | wall |");
    let _ = writeln!(t, "|---|---|---|---|---|---|---|");
    for o in outcomes {
        let hooks = if o.hooks.is_empty() {
            "-".to_owned()
        } else {
            o.hooks
                .split(',')
                .map(|h| {
                    if h == "tc" && !o.tc_mode.is_empty() {
                        format!("tc ({})", o.tc_mode)
                    } else {
                        h.to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut result = if o.passed { "pass".to_owned() } else { "FAIL".to_owned() };
        if !o.checks.is_empty() {
            let failed = o.failures.iter().filter(|f| !f.starts_with("insmod")).count();
            let _ = write!(result, " ({} checks, {failed} failed)", o.checks);
        }
        for n in &o.notes {
            let _ = write!(result, "; {n}");
        }
        let _ = writeln!(
            t,
            "| {} | {} | {hooks} | {result} | {} | {} | {:.0} s |",
            o.release.as_str().trim().chars().take(40).collect::<String>().trim(),
            o.how,
            secs(o.boot_s),
            secs(o.run_s),
            o.wall_s
        );
    }
    let date = Command::new("date").args(["-u", "+%Y-%m-%d"]).output().ok();
    let date = date.map(|d| String::from_utf8_lossy(&d.stdout).trim().to_owned()).unwrap_or_default();
    let _ = writeln!(
        t,
        "\n`cargo xtask kernels`, {date}, {} CPUs. boot: guest uptime when /init starts (qemu TCG); \
         scenarios: the runner's own time; wall: from starting qemu (or the runner) to its exit.",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    t
}

fn update_readme(table: &str) -> anyhow::Result<()> {
    let path = root().join("README.md");
    let text = fs::read_to_string(&path)?;
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        bail!("README.md has no {BEGIN} ... {END} markers");
    };
    let updated = format!("{}{BEGIN}\n{table}{}", &text[..b], &text[e..]);
    fs::write(&path, updated)?;
    eprintln!("xtask: README.md's kernel table updated");
    Ok(())
}
