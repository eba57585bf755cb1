//! `bindtrace doctor` where it can and where it cannot work: ready as root here; as an
//! unprivileged process it names every missing capability; inside a container of the image
//! run without `--pid host` it names the flag; the JSON form has every check. The image tests
//! run the image `./x test` builds (env BINDTRACE_IMAGE, default `bindtrace:latest`).
//!
//! Without root, Docker or the image these tests skip, except under CI (the variable `CI` set),
//! where they fail.
use std::{
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use bindtrace_tests::{
    bindtrace::binary,
    docker::{self, DOCKER_SOCK, bindtrace_image, docker, free_port, skip_without_image, unique_name},
    is_root, root_or_skip,
};
use serde_json::Value;

/// Every check, in the order doctor prints them; scripts key on these names.
const CHECKS: [&str; 19] = [
    "kernel",
    "btf",
    "ebpf_object",
    "hooks",
    "lockdown",
    "cap_bpf",
    "cap_perfmon",
    "cap_net_admin",
    "cap_sys_admin",
    "cap_sys_ptrace",
    "pid_namespace",
    "network_namespace",
    "docker",
    "podman",
    "containerd",
    "bridges",
    "workloads",
    "metrics_port",
    "platform",
];
const CAPABILITIES: [&str; 5] =
    ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE"];

/// doctor bounds each probe itself; this only keeps a broken build from hanging the suite.
const AT_MOST: Duration = Duration::from_secs(60);

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn of(mut cmd: Command) -> Run {
        let what = format!("{cmd:?}");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(cmd.stdin(Stdio::null()).output().expect("run the command"));
        });
        let out =
            rx.recv_timeout(AT_MOST).unwrap_or_else(|_| panic!("{what} did not exit within {AT_MOST:?}"));
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// The text line of one check, e.g. `fail  pid_namespace  ...`.
    fn line(&self, check: &str) -> &str {
        self.stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(check))
            .unwrap_or_else(|| panic!("no {check} line in:\n{}", self.stdout))
    }

    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", self.stdout))
    }
}

/// `bindtrace doctor` with a metrics port free right now (another bindtrace may hold the
/// default one on this machine).
fn doctor(extra: &[&str]) -> Command {
    let mut cmd = Command::new(binary());
    cmd.arg("doctor").args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())]).args(extra);
    cmd
}

/// The checks of a JSON report by name, after checking the document's shape: every check once,
/// in order, a known status each, and `ready` agreeing with the failures and the exit status.
fn checks_of(run: &Run) -> Vec<(String, Value)> {
    let doc = run.json();
    let checks = doc["checks"].as_array().expect("checks is an array");
    // Each user's rootless Docker and podman socket has a line of its own (other tests on this
    // machine may have made some): the fixed checks are the others.
    let names: Vec<&str> =
        checks.iter().map(|c| c["name"].as_str().unwrap()).filter(|n| !n.ends_with("_rootless")).collect();
    assert_eq!(names, CHECKS, "{doc}");
    for c in checks {
        let status = c["status"].as_str().unwrap();
        assert!(["ok", "warn", "fail", "skip"].contains(&status), "{c}");
        assert!(c["detail"].as_str().is_some_and(|d| !d.is_empty()), "{c}");
        assert_eq!(
            c["remedy"].is_string(),
            matches!(status, "warn" | "fail"),
            "a remedy exactly where there is something to do: {c}"
        );
    }
    let failed = checks.iter().any(|c| c["status"] == "fail");
    assert_eq!(doc["ready"], !failed, "{doc}");
    assert_eq!(doc["exit_code"].as_i64(), run.code.map(i64::from), "{doc}");
    checks.iter().map(|c| (c["name"].as_str().unwrap().to_owned(), c.clone())).collect()
}

fn status<'a>(checks: &'a [(String, Value)], name: &str) -> &'a str {
    checks.iter().find(|(n, _)| n == name).and_then(|(_, c)| c["status"].as_str()).unwrap()
}

#[test]
fn ready_here_as_root() {
    if !root_or_skip() {
        return;
    }
    let run = Run::of(doctor(&[]));
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.lines().last().unwrap().starts_with("bindtrace doctor: ready"), "{}", run.stdout);
    assert_eq!(
        run.stdout
            .lines()
            .filter(|l| l.split_whitespace().nth(1).is_none_or(|n| !n.ends_with("_rootless")))
            .count(),
        CHECKS.len() + 1,
        "one line per check and the verdict:\n{}",
        run.stdout
    );
    for check in
        ["kernel", "btf", "ebpf_object", "hooks", "pid_namespace", "network_namespace", "metrics_port"]
    {
        assert!(run.line(check).starts_with("ok "), "{}", run.stdout);
    }
    for cap in CAPABILITIES {
        assert!(run.line(&cap.to_ascii_lowercase()).starts_with("ok "), "{}", run.stdout);
    }
    if docker::available() {
        assert!(run.line("docker").starts_with("ok "), "{}", run.stdout);
        assert!(run.line("bridges").contains("docker0"), "{}", run.stdout);
    }
}

#[test]
fn json_has_every_check() {
    let run = Run::of(doctor(&["--format", "json"]));
    let checks = checks_of(&run);
    if is_root() {
        assert_eq!(run.code, Some(0), "{}", run.stdout);
        assert_eq!(status(&checks, "cap_sys_admin"), "ok");
    }
    // The port is checked the way set-up binds it: one in use fails.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = format!("127.0.0.1:{}", held.local_addr().unwrap().port());
    let mut cmd = Command::new(binary());
    cmd.args(["doctor", "--format", "json", "--metrics-addr", &busy]);
    let run = Run::of(cmd);
    let checks = checks_of(&run);
    assert_eq!(status(&checks, "metrics_port"), "fail");
    assert_eq!(run.code, Some(1));
}

/// As nobody, with no capabilities (the errors test's way to drop them): every capability
/// named, not ready; and bindtrace itself, failing set-up, points to doctor.
#[test]
fn unprivileged_names_the_capabilities() {
    if !root_or_skip() {
        return;
    }
    let nobody = |args: &[&str]| {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", &binary()])
            .args(args);
        Run::of(cmd)
    };
    let port = format!("127.0.0.1:{}", free_port());
    let run = nobody(&["doctor", "--metrics-addr", &port]);
    assert_eq!(run.code, Some(1), "{}{}", run.stdout, run.stderr);
    for cap in CAPABILITIES {
        let line = run.line(&cap.to_ascii_lowercase());
        assert!(line.starts_with("fail ") && line.contains(&format!("{cap} missing")), "{line}");
        assert!(line.contains("sudo bindtrace"), "{line}");
    }
    assert!(run.stdout.lines().last().unwrap().contains("not ready"), "{}", run.stdout);
    let run = nobody(&["--no-metrics"]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("CAP_BPF") && run.stderr.contains("`bindtrace doctor`"), "{}", run.stderr);
}

/// `docker run --rm` of the image's doctor; the container is removed on drop too, should the
/// client be stuck.
struct Boxed {
    name: String,
}

impl Boxed {
    fn doctor(flags: &[&str], extra: &[&str]) -> (Boxed, Run) {
        let b = Boxed { name: unique_name("doctor") };
        let socket = format!("{DOCKER_SOCK}:{DOCKER_SOCK}:ro");
        let port = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new("docker");
        cmd.args(["run", "--rm", "--name", &b.name]).args(flags).args(["-v", &socket, &bindtrace_image()]);
        cmd.args(["doctor", "--metrics-addr", &port]).args(extra);
        let run = Run::of(cmd);
        (b, run)
    }
}

impl Drop for Boxed {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.name]);
    }
}

/// The README's least-privilege line without `--pid host`: the capabilities are there, the
/// host's pids are not, and doctor says which flag is missing.
#[test]
fn in_a_container_without_pid_host_names_the_flag() {
    if skip_without_image() {
        return;
    }
    let flags = [
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
        "--network",
        "host",
    ];
    let (_b, run) = Boxed::doctor(&flags, &[]);
    assert_eq!(run.code, Some(1), "{}{}", run.stdout, run.stderr);
    let pid = run.line("pid_namespace");
    assert!(
        pid.starts_with("fail ") && pid.contains("SO_PEERCRED reports pid 0") && pid.contains("--pid host"),
        "{pid}"
    );
    for cap in CAPABILITIES {
        assert!(run.line(&cap.to_ascii_lowercase()).starts_with("ok "), "{}", run.stdout);
    }
    assert!(run.line("network_namespace").starts_with("ok "), "--network host was given:\n{}", run.stdout);
    assert!(run.line("lockdown").contains("unknown"), "{}", run.stdout);
    // With --pid host as well, the same container is ready.
    let mut ready = flags.to_vec();
    ready.extend(["--pid", "host"]);
    let (_b, run) = Boxed::doctor(&ready, &[]);
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
}

/// Docker's default capabilities and a network of its own: the JSON form names each missing
/// capability with the flag that grants it, and the missing --pid host and --network host.
#[test]
fn in_an_unprivileged_container_names_capabilities_and_flags() {
    if skip_without_image() {
        return;
    }
    let (_b, run) = Boxed::doctor(&[], &["--format", "json"]);
    assert_eq!(run.code, Some(1), "{}{}", run.stdout, run.stderr);
    let checks = checks_of(&run);
    for (cap, flag) in
        [("cap_net_admin", "NET_ADMIN"), ("cap_sys_admin", "SYS_ADMIN"), ("cap_sys_ptrace", "SYS_PTRACE")]
    {
        let c = &checks.iter().find(|(n, _)| n == cap).unwrap().1;
        assert_eq!(c["status"], "fail", "{c}");
        assert!(c["remedy"].as_str().unwrap().contains(&format!("--cap-add {flag}")), "{c}");
    }
    let remedy = |name: &str| {
        checks.iter().find(|(n, _)| n == name).unwrap().1["remedy"].as_str().unwrap_or("").to_owned()
    };
    assert_eq!(status(&checks, "pid_namespace"), "fail");
    assert!(remedy("pid_namespace").contains("--pid host"));
    assert_eq!(status(&checks, "network_namespace"), "fail");
    assert!(remedy("network_namespace").contains("--network host"));
}

/// The least-privilege line with --pid host but without --network host: the daemon is seen,
/// its network namespace is not ours, and doctor names the flag.
#[test]
fn in_a_container_without_network_host_names_the_flag() {
    if skip_without_image() {
        return;
    }
    let flags =
        ["--cap-add", "SYS_ADMIN", "--cap-add", "NET_ADMIN", "--cap-add", "SYS_PTRACE", "--pid", "host"];
    let (_b, run) = Boxed::doctor(&flags, &[]);
    assert_eq!(run.code, Some(1), "{}{}", run.stdout, run.stderr);
    assert!(run.line("pid_namespace").starts_with("ok "), "{}", run.stdout);
    let net = run.line("network_namespace");
    assert!(
        net.starts_with("fail ") && net.contains("not the Docker daemon's") && net.contains("--network host"),
        "{net}"
    );
}
