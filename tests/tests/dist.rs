//! The release artefacts beyond x86_64 (`sudo ./x test` builds them and passes their places):
//! the aarch64 tarball of `./x dist` (directory in BINDTRACE_DIST) holds a static aarch64 ELF
//! that runs `--version` under qemu-user, and the OCI layout of `./x image --oci DIR` (in
//! BINDTRACE_OCI) is an index of an amd64 and an arm64 image that skopeo reads, whose layers
//! hold binaries that run, and whose host image Docker loads and runs.
//!
//! Without the artefacts, qemu-aarch64-static or skopeo these tests skip, except under CI (the
//! variable `CI` set), where they fail.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use bindtrace_tests::{docker, net::unique, skip};

const ELF_AARCH64: u16 = 183;
const ELF_X86_64: u16 = 62;

fn run(program: &str, args: &[&str], dir: Option<&Path>) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args);
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    cmd.output().unwrap_or_else(|e| panic!("starting {program}: {e}"))
}

fn run_ok(program: &str, args: &[&str], dir: Option<&Path>) -> String {
    let out = run(program, args, dir);
    assert!(
        out.status.success(),
        "{program} {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn on_path(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// What `--version` prints: the workspace's version, as bindtrace takes it.
fn expected_version() -> String {
    format!("bindtrace {}\n", env!("CARGO_PKG_VERSION"))
}

/// The directory in `var`, or None after skipping (a failure under CI).
fn artefact_dir(var: &str, made_by: &str) -> Option<PathBuf> {
    match std::env::var_os(var).map(PathBuf::from) {
        Some(dir) if dir.is_dir() => Some(dir),
        _ => {
            skip(&format!("{var} names no directory (`sudo ./x test` builds it with `{made_by}`)"));
            None
        }
    }
}

fn tools_or_skip(tools: &[&str]) -> bool {
    for tool in tools {
        if !on_path(tool) {
            skip(&format!("{tool} is not installed (`sudo ./x setup` installs it)"));
            return false;
        }
    }
    true
}

/// A scratch directory of this test's own, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Scratch {
        let dir = std::env::temp_dir().join(unique(&format!("bt-{what}")));
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// e_machine, and whether the ELF file is self-contained: no PT_INTERP, no DT_NEEDED.
fn elf_machine_and_static(path: &Path) -> (u16, bool) {
    let b = fs::read(path).unwrap();
    assert_eq!(&b[..6], b"\x7fELF\x02\x01", "{} is not a 64-bit little-endian ELF file", path.display());
    let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36) as usize, u16_at(0x38) as usize);
    let mut self_contained = true;
    for ph in (0..phnum).map(|i| phoff + i * phentsize) {
        match u32_at(ph) {
            3 => self_contained = false, // PT_INTERP
            2 => {
                // PT_DYNAMIC: (d_tag, d_val) pairs; DT_NEEDED is 1, DT_NULL ends.
                let (off, size) = (u64_at(ph + 8), u64_at(ph + 32));
                for e in (off..off + size).step_by(16) {
                    match u64_at(e) {
                        0 => break,
                        1 => self_contained = false,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    (u16_at(0x12), self_contained)
}

/// Runs `binary --version`, under qemu-user for aarch64.
fn version_of(binary: &Path, machine: u16) -> String {
    let binary = binary.to_str().unwrap();
    match machine {
        ELF_AARCH64 => run_ok("qemu-aarch64-static", &[binary, "--version"], None),
        ELF_X86_64 => run_ok(binary, &["--version"], None),
        other => panic!("{binary}: unexpected e_machine {other}"),
    }
}

#[test]
fn aarch64_tarball_holds_a_static_binary_that_runs_under_qemu() {
    let Some(dist) = artefact_dir("BINDTRACE_DIST", "./x dist") else { return };
    if !tools_or_skip(&["qemu-aarch64-static"]) {
        return;
    }
    let name = format!("bindtrace-{}-aarch64-linux", env!("CARGO_PKG_VERSION"));
    let tarball = format!("{name}.tar.gz");
    assert!(dist.join(&tarball).is_file(), "no {tarball} in {}", dist.display());
    // The checksum file is in `sha256sum -c` form and matches.
    let checked = run_ok("sha256sum", &["-c", &format!("{tarball}.sha256")], Some(&dist));
    assert_eq!(checked.trim(), format!("{tarball}: OK"));

    // Owner 0, the binary executable, the licences and the README beside it.
    let listing = run_ok("tar", &["-tvzf", dist.join(&tarball).to_str().unwrap(), "--numeric-owner"], None);
    let mut entries: Vec<(String, String)> = listing
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[5].to_owned(), format!("{} {}", f[0], f[1]))
        })
        .collect();
    entries.sort();
    let want: Vec<(String, String)> = [
        ("", "drwxr-xr-x"),
        ("/LICENSE-APACHE", "-rw-r--r--"),
        ("/LICENSE-MIT", "-rw-r--r--"),
        ("/README.md", "-rw-r--r--"),
        ("/bindtrace", "-rwxr-xr-x"),
    ]
    .iter()
    .map(|(p, mode)| (format!("{name}{p}{}", if p.is_empty() { "/" } else { "" }), format!("{mode} 0/0")))
    .collect();
    assert_eq!(entries, want, "{listing}");

    let scratch = Scratch::new("arm64-dist");
    run_ok("tar", &["-xzf", dist.join(&tarball).to_str().unwrap(), "-C", scratch.0.to_str().unwrap()], None);
    let binary = scratch.0.join(&name).join("bindtrace");
    let (machine, self_contained) = elf_machine_and_static(&binary);
    assert_eq!(machine, ELF_AARCH64, "e_machine of {}", binary.display());
    assert!(self_contained, "{} has an interpreter or needs libraries", binary.display());
    // file(1) agrees, independently of the reader above.
    let file = run_ok("file", &["-b", binary.to_str().unwrap()], None);
    assert!(file.contains("ARM aarch64") && file.contains("static"), "file says: {file}");

    assert_eq!(version_of(&binary, machine), expected_version());
}

/// `skopeo ARGS`, its stdout.
fn skopeo(args: &[&str]) -> String {
    run_ok("skopeo", args, None)
}

/// `skopeo ARGS` choosing linux/`arch` from an index.
fn skopeo_for(arch: &str, args: &[&str]) -> String {
    let mut all = vec!["--override-os", "linux", "--override-arch", arch];
    all.extend_from_slice(args);
    skopeo(&all)
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn oci_layout_is_an_index_of_amd64_and_arm64_images_that_run() {
    let Some(layout) = artefact_dir("BINDTRACE_OCI", "./x image --oci DIR") else { return };
    if !tools_or_skip(&["skopeo", "qemu-aarch64-static"]) {
        return;
    }
    let version = env!("CARGO_PKG_VERSION");
    for tag in [version, "latest"] {
        let reference = format!("oci:{}:{tag}", layout.display());
        // The tag names an image index with one manifest per platform.
        let raw = json(&skopeo(&["inspect", "--raw", &reference]));
        assert_eq!(raw["mediaType"], "application/vnd.oci.image.index.v1+json", "{raw}");
        let mut platforms: Vec<String> = raw["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| format!("{}/{}", m["platform"]["os"].as_str().unwrap(), m["platform"]["architecture"]))
            .collect();
        platforms.sort();
        assert_eq!(platforms, ["linux/\"amd64\"", "linux/\"arm64\""], "{raw}");
    }

    let reference = format!("oci:{}:{version}", layout.display());
    for (arch, machine) in [("amd64", ELF_X86_64), ("arm64", ELF_AARCH64)] {
        // skopeo picks the platform's image: its config says so and carries the labels.
        let config = json(&skopeo_for(arch, &["inspect", &reference]));
        assert_eq!(config["Architecture"], arch, "{config}");
        assert_eq!(config["Labels"]["org.opencontainers.image.version"], version, "{config}");

        // Its one layer holds /bindtrace, a static binary for that architecture that runs.
        let scratch = Scratch::new(&format!("arm64-oci-{arch}"));
        let copy = scratch.0.join("image");
        let copy_ref = format!("dir:{}", copy.display());
        skopeo_for(arch, &["copy", "--quiet", &reference, &copy_ref]);
        let manifest = json(&fs::read_to_string(copy.join("manifest.json")).unwrap());
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1, "{manifest}");
        let digest = layers[0]["digest"].as_str().unwrap().strip_prefix("sha256:").unwrap();
        let root = scratch.0.join("root");
        fs::create_dir(&root).unwrap();
        let blob = copy.join(digest);
        let listing = run_ok("tar", &["-tzf", blob.to_str().unwrap()], None);
        assert_eq!(listing, "bindtrace\n", "the {arch} layer holds more than the binary");
        run_ok("tar", &["-xzf", blob.to_str().unwrap(), "-C", root.to_str().unwrap()], None);
        let binary = root.join("bindtrace");
        assert_eq!(elf_machine_and_static(&binary), (machine, true), "{arch} layer's binary");
        assert_eq!(version_of(&binary, machine), expected_version());
    }
}

/// A Docker image tag of this test's own, removed on drop.
struct LoadedImage(String);

impl Drop for LoadedImage {
    fn drop(&mut self) {
        let _ = docker::docker(&["rmi", "-f", &self.0]);
    }
}

#[test]
fn oci_layout_loads_into_docker_for_the_host_and_runs() {
    let Some(layout) = artefact_dir("BINDTRACE_OCI", "./x image --oci DIR") else { return };
    if !tools_or_skip(&["skopeo"]) {
        return;
    }
    if !bindtrace_tests::is_root() || !docker::available() {
        skip("needs root and a Docker daemon");
        return;
    }
    let image = LoadedImage(format!("{}:{}", unique("bt-arm64-oci"), env!("CARGO_PKG_VERSION")));
    let from = format!("oci:{}:{}", layout.display(), env!("CARGO_PKG_VERSION"));
    // Without --override-arch skopeo picks the host's platform from the index.
    skopeo(&["copy", "--quiet", &from, &format!("docker-daemon:{}", image.0)]);
    let arch = docker::docker_ok(&["image", "inspect", "--format", "{{.Architecture}}", &image.0]);
    let host = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("the image has no platform for this host ({other})"),
    };
    assert_eq!(arch, host);
    let out = docker::docker(&["run", "--rm", &image.0, "--version"]);
    assert!(out.status.success(), "docker run: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected_version());
}
