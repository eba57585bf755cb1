//! The image (`./x image`) against the real Docker Engine, run with the lines the README
//! documents: the privileged line and the least-privilege line. Each starts the article's case
//! (a server bound to 127.0.0.1 published with `-p`), curls it as a user would, and checks
//! what `docker logs` says, `bindtrace check` from the image, and that `docker stop` leaves no
//! program in the kernel. Run as root through `sudo ./x test`, which builds the image under a
//! test name and passes it in BINDTRACE_IMAGE (default `bindtrace:latest`).
//!
//! Without root, Docker or the image these tests skip, except under CI (the variable `CI` set),
//! where they fail.
use std::{process::Command, time::Duration};

use bindtrace_tests::{
    docker::{
        Container, Image, bindtrace_image, curl, docker, docker_ok, free_port, skip_without_image,
        unique_name,
    },
    native::{programs_held_by, wait_unloaded},
};

/// The README's privileged line, without `docker run` and the image.
const PRIVILEGED: &[&str] = &[
    "--privileged",
    "--pid",
    "host",
    "--network",
    "host",
    "-v",
    "/var/run/docker.sock:/var/run/docker.sock:ro",
];

/// The README's least-privilege line: what bindtrace really needs (without any one of the
/// three, bindtrace refuses to start and names the missing capability). SYS_ADMIN stands in for
/// BPF and PERFMON, which Docker 20.10 does not know (its seccomp profile allows bpf() only with
/// SYS_ADMIN), and enters containers' namespaces; NET_ADMIN for rtnetlink and the tc hook;
/// SYS_PTRACE to read other processes' /proc/PID/ns/net and /proc/PID/fd.
const LEAST_PRIVILEGE: &[&str] = &[
    "--cap-drop",
    "ALL",
    "--cap-add",
    "SYS_ADMIN",
    "--cap-add",
    "NET_ADMIN",
    "--cap-add",
    "SYS_PTRACE",
    "--read-only",
    "--security-opt",
    "no-new-privileges",
    "--pid",
    "host",
    "--network",
    "host",
    "-v",
    "/var/run/docker.sock:/var/run/docker.sock:ro",
];

/// A bindtrace container, `docker rm -f`'d on drop (or its Compose project taken down).
struct Tracer {
    name: String,
    compose_project: Option<String>,
}

impl Tracer {
    fn start(flags: &[&str], metrics_port: u16) -> Tracer {
        // The guard first: a container that was created but failed to start is removed too.
        let t = Tracer { name: unique_name("bindtrace"), compose_project: None };
        let addr = format!("127.0.0.1:{metrics_port}");
        let mut args = vec!["run", "-d", "--name", &t.name];
        args.extend_from_slice(flags);
        let image = bindtrace_image();
        // The metrics port is picked free: another bindtrace may hold the default one here.
        args.extend_from_slice(&[&image, "--metrics-addr", &addr]);
        docker_ok(&args);
        t.wait_logs("bindtrace: ready", Duration::from_secs(30));
        t
    }

    /// `docker-compose -p PROJECT up -d` of deploy/compose/docker-compose.yml.
    fn compose_up(metrics_port: u16) -> Tracer {
        let project = unique_name("compose").replace('-', "");
        let t = Tracer { name: format!("{project}_bindtrace_1"), compose_project: Some(project) };
        let out = t.compose(&["up", "-d"], metrics_port);
        assert!(out.status.success(), "docker-compose up: {}", String::from_utf8_lossy(&out.stderr));
        t.wait_logs("bindtrace: ready", Duration::from_secs(30));
        t
    }

    fn compose(&self, args: &[&str], metrics_port: u16) -> std::process::Output {
        let project = self.compose_project.as_deref().expect("a Compose project");
        Command::new("docker-compose")
            .arg("-f")
            .arg(compose_file())
            .args(["-p", project, "--ansi", "never"])
            .args(args)
            .env("BINDTRACE_IMAGE", bindtrace_image())
            .env("BINDTRACE_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
            .output()
            .expect("run docker-compose")
    }

    /// `docker stop`, or `docker-compose stop` for a Compose service; panics unless it exits 0.
    fn stop(&self) {
        let out = match &self.compose_project {
            None => docker(&["stop", "-t", "20", &self.name]),
            Some(_) => self.compose(&["stop"], 0),
        };
        assert!(out.status.success(), "stop: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn logs(&self) -> String {
        let out = docker(&["logs", &self.name]);
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    fn wait_logs(&self, needle: &str, timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let logs = self.logs();
            if logs.contains(needle) {
                return logs;
            }
            let running = docker_ok(&["inspect", "--format", "{{.State.Running}}", &self.name]);
            assert!(running == "true", "bindtrace's container exited:\n{logs}");
            assert!(std::time::Instant::now() < deadline, "docker logs never showed {needle:?}:\n{logs}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn pid(&self) -> u32 {
        docker_ok(&["inspect", "--format", "{{.State.Pid}}", &self.name]).parse().unwrap()
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if self.compose_project.is_some() {
            let _ = self.compose(&["down"], 0);
        }
        let _ = docker(&["rm", "-f", &self.name]);
    }
}

fn compose_file() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/compose/docker-compose.yml")
}

/// `--privileged` asks runc for every capability the Engine knows; an Engine whose own bounding
/// set lacks one (a daemon that itself runs in a restricted container, as on this repository's
/// development machine, which lacks CAP_SYS_RESOURCE) fails every privileged container with
/// "unable to apply caps". There the test grants what `--privileged` would and the daemon can:
/// each capability of its bounding set, no seccomp, AppArmor or masked paths. Elsewhere it runs
/// the documented line unchanged.
fn privileged_flags() -> Vec<String> {
    let probe =
        docker(&["run", "--rm", "--privileged", "--network", "none", &bindtrace_image(), "--version"]);
    if probe.status.success() {
        return PRIVILEGED.iter().map(|s| s.to_string()).collect();
    }
    let err = String::from_utf8_lossy(&probe.stderr);
    assert!(err.contains("unable to apply caps"), "docker run --privileged failed: {err}");
    let bounding = daemon_bounding_set();
    eprintln!(
        "note: this Engine cannot grant --privileged (its bounding set is {bounding:#x}); granting its capabilities instead"
    );
    let mut flags: Vec<String> = Vec::new();
    for (bit, name) in CAPABILITIES.iter().enumerate() {
        if bounding & (1 << bit) != 0 {
            flags.extend(["--cap-add".to_owned(), name.to_string()]);
        }
    }
    for opt in ["seccomp=unconfined", "apparmor=unconfined", "systempaths=unconfined"] {
        flags.extend(["--security-opt".to_owned(), opt.to_owned()]);
    }
    flags.extend(PRIVILEGED[1..].iter().map(|s| s.to_string()));
    flags
}

/// CapBnd of the Docker daemon's process .
fn daemon_bounding_set() -> u64 {
    let pid = Command::new("pidof").arg("dockerd").output().unwrap();
    let pid = String::from_utf8_lossy(&pid.stdout).split_whitespace().next().unwrap_or_default().to_owned();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("dockerd's /proc status");
    let hex = status.lines().find_map(|l| l.strip_prefix("CapBnd:")).expect("CapBnd");
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

/// Capability names by bit (linux/capability.h), as `--cap-add` spells them.
const CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
];

/// `start(metrics_port)` starts bindtrace; `flags` are the same privileges for `check`.
fn the_article_case(flags: &[&str], start: impl FnOnce(u16) -> Tracer) {
    let img = Image::busybox();
    let port = free_port();
    let server = Container::run(
        &img,
        &["-p", &format!("{port}:8000")],
        &["httpd", "-f", "-p", "127.0.0.1:8000", "-h", "/www"],
    );
    server.wait_listening(8000);
    let metrics_port = free_port();
    let tracer = start(metrics_port);
    let held = programs_held_by(tracer.pid());
    assert!(!held.is_empty(), "bindtrace holds no BPF program:\n{}", tracer.logs());

    // What the user sees: an empty reply (docker-proxy accepted, then was refused) or a reset.
    let (code, _) = curl(&format!("http://localhost:{port}/"));
    assert!(code == 52 || code == 56, "curl should get an empty reply (52) or a reset (56), got {code}");
    let logs = tracer.wait_logs(&format!("container {}", server.name), Duration::from_secs(15));
    let line = logs
        .lines()
        .find(|l| l.contains(" refused ") && l.contains(&server.name))
        .unwrap_or_else(|| panic!("no refused line for {}:\n{logs}", server.name));
    assert!(line.contains(server.short_id()), "{line}");
    assert!(line.contains(&format!("-p 127.0.0.1:{port}:8000")), "the fix names the published port: {line}");
    assert!(line.contains("0.0.0.0"), "the fix says to bind 0.0.0.0: {line}");

    // The metrics endpoint answers on the host's loopback (host network).
    let (code, body) = curl(&format!("http://127.0.0.1:{metrics_port}/metrics"));
    assert_eq!(code, 0, "metrics: curl exit {code}");
    assert!(body.contains("bindtrace_refused_connections_total"), "{body}");

    // `bindtrace check` from the image, with the same flags: exit 1 for a loopback-only port.
    let mut check: Vec<&str> = vec!["run", "--rm"];
    check.extend_from_slice(flags);
    let image = bindtrace_image();
    check.extend_from_slice(&[&image, "check"]);
    let out = Command::new("docker").args(&check).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "check: {text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&server.name) && text.contains("loopback"), "{text}");

    // `docker stop` ends it cleanly, and its programs leave the kernel.
    tracer.stop();
    let code = docker_ok(&["inspect", "--format", "{{.State.ExitCode}}", &tracer.name]);
    assert_eq!(code, "0", "bindtrace exited with {code}:\n{}", tracer.logs());
    assert_eq!(wait_unloaded(&held), Vec::<u32>::new(), "programs still loaded after docker stop");
}

/// `docker run -d --privileged --pid host --network host -v /var/run/docker.sock:...:ro`.
#[test]
fn image_privileged_line() {
    if skip_without_image() {
        return;
    }
    let flags = privileged_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    the_article_case(&flags, |port| Tracer::start(&flags, port));
}

/// Named capabilities, read-only root, no-new-privileges: the same checks.
#[test]
fn image_least_privilege_line() {
    if skip_without_image() {
        return;
    }
    the_article_case(LEAST_PRIVILEGE, |port| Tracer::start(LEAST_PRIVILEGE, port));
}

/// deploy/compose/docker-compose.yml (the least-privilege form) with docker-compose 1.29: the
/// same checks, `docker-compose stop` exiting 0.
#[test]
fn compose_service() {
    if skip_without_image() {
        return;
    }
    if Command::new("docker-compose").arg("version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "CI is set and docker-compose is missing");
        bindtrace_tests::skip("no docker-compose (Debian package docker-compose)");
        return;
    }
    the_article_case(LEAST_PRIVILEGE, Tracer::compose_up);
}

/// The image holds the binary and nothing else, and it runs there (static, no libc needed).
#[test]
fn image_holds_only_the_binary() {
    if skip_without_image() {
        return;
    }
    let image = bindtrace_image();
    let out = docker_ok(&["run", "--rm", "--network", "none", &image, "--version"]);
    assert!(out.starts_with("bindtrace "), "{out}");
    let name = unique_name("export");
    docker_ok(&["create", "--name", &name, &image]);
    let listing =
        Command::new("sh").arg("-c").arg(format!("docker export {name} | tar -t")).output().unwrap();
    let _ = docker(&["rm", "-f", &name]);
    let files: Vec<String> = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .map(|l| l.trim_end_matches('/').to_owned())
        // Docker adds its own mount points and empty directories to every container.
        .filter(|l| {
            !matches!(l.as_str(), ".dockerenv" | "dev" | "etc" | "proc" | "sys")
                && !l.starts_with("dev/")
                && !l.starts_with("etc/")
        })
        .collect();
    assert_eq!(files, ["bindtrace"], "{files:?}");
    let labels = docker_ok(&["image", "inspect", "--format", "{{json .Config.Labels}}", &image]);
    for key in ["version", "revision", "created", "source", "licenses"] {
        assert!(labels.contains(&format!("org.opencontainers.image.{key}")), "{labels}");
    }
    let size: u64 = docker_ok(&["image", "inspect", "--format", "{{.Size}}", &image]).parse().unwrap();
    assert!(size <= 25 << 20, "{size} bytes");
}
