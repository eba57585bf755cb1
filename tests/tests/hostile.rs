//! Hostile containers (need root, and Docker for the proxy and audit tests): nothing a
//! tenant controls reaches the operator's terminal raw, grows without bound, or passes for
//! the daemon's own processes.
use std::{
    io::Read,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bindtrace_tests::{
    Bindtrace, Hook, Topology,
    bindtrace::binary,
    connect,
    docker::{self, Container, Image, curl, free_port},
    hostile::{HostileListener, helper},
    root_or_skip,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);

/// Root (and Docker, for some) is needed; under CI a missing prerequisite fails the test.
fn skip(needs_docker: bool) -> bool {
    if !root_or_skip() {
        return true;
    }
    if needs_docker && !docker::available() {
        bindtrace_tests::skip("no Docker daemon answers here");
        return true;
    }
    false
}

/// What a tenant can put in a command line: OSC (title), CSI (clear), BEL, CR, a newline
/// followed by a line of its own, a bidi override, and bulk.
fn hostile_args() -> Vec<String> {
    let mut args: Vec<String> = [
        "\u{1b}]0;PWNED\u{7}",
        "\u{1b}[2J\u{1b}[H",
        "--bind=127.0.0.1:8000\r",
        "x\n2026-01-01T00:00:00Z refused 1.2.3.4:1 -> 5.6.7.8:80/tcp: FORGED",
        "evil\u{202e}txt.exe",
        "zero\u{200b}width",
    ]
    .map(String::from)
    .to_vec();
    for i in 0..4 {
        args.push(format!("--pad{i}={}", "A".repeat(100_000)));
    }
    args
}

/// Bytes a terminal would act on: C0 controls but the newline, DEL, and (decoded) C1 controls,
/// bidi controls, zero-width characters.
fn terminal_controls(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    text.chars()
        .filter(|&c| {
            (c.is_control() && c != '\n')
                || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        })
        .map(|c| format!("U+{:04X}", c as u32))
        .collect()
}

/// Runs bindtrace with `args` in `host`'s namespace until `during` has run, then stops it and
/// returns everything it wrote (stdout, stderr).
fn run_raw(host: &str, args: &[&str], during: impl FnOnce()) -> (Vec<u8>, Vec<u8>) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", host, &binary()])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("start bindtrace");
    let err = Arc::new(Mutex::new(Vec::new()));
    let mut stderr = child.stderr.take().unwrap();
    let err_writer = err.clone();
    let err_thread = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            err_writer.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let mut stdout = child.stdout.take().unwrap();
    let out_thread = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        out
    });
    let deadline = Instant::now() + WAIT;
    while !String::from_utf8_lossy(&err.lock().unwrap()).contains("bindtrace: ready") {
        assert!(Instant::now() < deadline, "not ready:\n{}", String::from_utf8_lossy(&err.lock().unwrap()));
        assert!(
            child.try_wait().unwrap().is_none(),
            "exited:\n{}",
            String::from_utf8_lossy(&err.lock().unwrap())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    during();
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    let out = out_thread.join().unwrap();
    err_thread.join().unwrap();
    let err = err.lock().unwrap().clone();
    assert!(status.success(), "bindtrace failed:\n{}", String::from_utf8_lossy(&err));
    (out, err)
}

/// 1. A loopback-bound server whose comm and argv carry terminal escapes, a forged line and
///    400 KB: the text output and stderr hold no control byte and no forged line; the JSON
///    lines parse and stay under the documented bound.
#[test]
fn hostile_names_and_arguments_reach_no_terminal_raw() {
    if skip(false) {
        return;
    }
    let mut topo = Topology::new();
    let c = topo.container();
    let args = hostile_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = HostileListener::start(&c.ns.name, "127.0.0.1", 8000, &args);
    let refuse = || {
        let err = connect(&topo.host, c.ipv4, 8000).expect_err("refused");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    };

    let common = ["--hook", Hook::TcpSendReset.arg(), "--no-metrics", "--no-docker", "-v"];
    let (out, err) = run_raw(&topo.host.name, &[&common[..], &["--format", "text"]].concat(), refuse);
    let out_text = String::from_utf8_lossy(&out);
    assert!(out_text.contains(" refused "), "a refused line:\n{out_text}");
    assert!(out_text.contains("\\u{1b}]0;PWNED"), "the name is shown, escaped:\n{out_text}");
    for (what, bytes) in [("stdout", &out), ("stderr", &err)] {
        let found = terminal_controls(bytes);
        assert!(
            found.is_empty(),
            "{what} has terminal controls {found:?}:\n{}",
            String::from_utf8_lossy(bytes)
        );
        let text = String::from_utf8_lossy(bytes);
        assert!(!text.lines().any(|l| l.contains("FORGED") && !l.contains(" refused 172.")), "forged line");
    }
    assert!(out_text.lines().all(|l| l.starts_with("20")), "every line is bindtrace's own:\n{out_text}");

    let (out, _) = run_raw(&topo.host.name, &[&common[..], &["--format", "json"]].concat(), refuse);
    let mut refused = 0;
    for line in String::from_utf8_lossy(&out).lines() {
        assert!(line.len() < 16 * 1024, "a JSON line of {} bytes", line.len());
        let v: Value = serde_json::from_str(line).expect("JSON");
        if v["event"] == "refused" {
            refused += 1;
            let holder = &v["listeners"][0]["pids"][0];
            assert_eq!(holder["pid"], server.pid(), "{v:#}");
            assert_eq!(holder["comm"], "\u{1b}]0;PWNED\u{7}\u{1b}[2J", "JSON carries the real name");
            let kept = holder["cmdline"].as_str().unwrap().len();
            assert!(kept <= 4096, "cmdline kept {kept} bytes");
            assert!(holder["cmdline_truncated"].as_u64().unwrap() > 390_000, "{holder:#}");
        }
    }
    assert_eq!(refused, 1);
}

/// 2. A container process calling itself docker-proxy, run from its own file at the proxy's
///    path with a fake -host-port, dialing another container, is `direct` from that container;
///    the daemon's real proxy is still recognised.
#[test]
fn a_process_named_docker_proxy_is_not_the_proxy() {
    if skip(true) {
        return;
    }
    let fake = helper();
    let img = Image::busybox_with(&[("/usr/bin/docker-proxy", &fake), ("/usr/sbin/docker-proxy", &fake)]);
    let port = free_port();
    let target = Container::run(
        &img,
        &["-p", &format!("{port}:8000")],
        &["httpd", "-f", "-p", "127.0.0.1:8000", "-h", "/www"],
    );
    target.wait_listening(8000);
    let ip = target.ip("bridge").to_string();
    let bt = Bindtrace::start_here(&["--fold-window", "200ms"]);

    // The daemon's own proxy first: still recognised.
    let (code, _) = curl(&format!("http://127.0.0.1:{port}/"));
    assert!(code == 52 || code == 56, "curl: {code}");
    let line = bt.expect_line("refused via the real proxy", WAIT, |l| {
        l["event"] == "refused"
            && l["container"]["name"] == target.name.as_str()
            && l["via"] == "docker-proxy"
    });
    assert_eq!(line["published"]["host_port"], port, "{line:#}");

    // The impostor: comm docker-proxy, exe at /usr/bin/docker-proxy in its own root. It dials
    // once a second: a dial inside the fold window of the proxy's refusal is folded into that
    // line (which names the window's first client), so the next one gets a line of its own.
    let impostor = Container::run(
        &img,
        &[],
        &[
            "sh",
            "-c",
            &format!(
                "for i in 1 2 3 4 5 6 7 8 9 10; do /usr/bin/docker-proxy dial {ip} 8000 -host-ip 0.0.0.0 \
                 -host-port 6666; sleep 1; done; sleep 60"
            ),
        ],
    );
    let line = bt.expect_line("refused from the impostor", WAIT, |l| {
        l["event"] == "refused"
            && l["container"]["name"] == target.name.as_str()
            && !l["client_container"].is_null()
    });
    assert_eq!(line["via"], "direct", "{line:#}");
    assert_eq!(line["client_container"]["name"], impostor.name.as_str(), "{line:#}");
    assert_eq!(line["client_process"]["comm"], "docker-proxy", "{line:#}");
    assert!(line["published"].is_null(), "no port taken from its argv: {line:#}");
}

/// 5. After set-up every thread of bindtrace holds only the documented capabilities
///    (CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_BPF, and CAP_DAC_OVERRIDE for the
///    users' rootless podman sockets, mode 0600) and no_new_privs.
#[test]
fn every_thread_keeps_only_the_documented_capabilities() {
    if skip(false) {
        return;
    }
    let topo = Topology::new();
    let bt = Bindtrace::start(&topo.host, Hook::TcpSendReset, &[]);
    let kept: u64 = [21u32, 12, 19, 39, 1].iter().fold(0, |m, b| m | (1u64 << b));
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{}/task", bt.pid())).unwrap().flatten().collect();
    assert!(tasks.len() >= 2, "the metrics thread runs too");
    for task in tasks {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_else(|| panic!("{name}"))
        };
        let eff = u64::from_str_radix(field("CapEff:"), 16).unwrap();
        let prm = u64::from_str_radix(field("CapPrm:"), 16).unwrap();
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap();
        assert_eq!(eff & !kept, 0, "thread {} has CapEff {eff:x}", comm.trim());
        assert_eq!(prm & !kept, 0, "thread {} has CapPrm {prm:x}", comm.trim());
        assert_eq!(field("NoNewPrivs:"), "1", "thread {}", comm.trim());
    }
}

/// `(ports checked, namespace reads)` of an "audit pass: N ports checked, M namespace reads" line.
fn audit_pass(line: &str) -> Option<(u64, u64)> {
    let rest = line.split("audit pass: ").nth(1)?;
    let (checked, rest) = rest.split_once(" ports checked, ")?;
    let (reads, _) = rest.split_once(" namespace reads")?;
    Some((checked.parse().ok()?, reads.parse().ok()?))
}

/// `n` consecutive host ports that are free now.
fn free_range(n: u16) -> u16 {
    (20..60)
        .map(|k| k * 1000)
        .find(|&base| (base..base + n).all(|p| std::net::TcpListener::bind(("0.0.0.0", p)).is_ok()))
        .expect("a free block of ports")
}

/// 4. A container publishing a 1 000-port range (the most the shared Docker 20.10 should run:
///    one docker-proxy per port): the audit reads its namespace once per pass, as counted.
#[test]
fn a_thousand_published_ports_cost_one_namespace_read_per_pass() {
    if skip(true) {
        return;
    }
    let img = Image::busybox();
    let base = free_range(1000);
    let range = format!("127.0.0.1:{base}-{}:8000-8999", base + 999);
    let c = Container::run(&img, &["-p", &range], &["httpd", "-f", "-p", "127.0.0.1:8000", "-h", "/www"]);
    c.wait_listening(8000);
    let mut bt = Bindtrace::start_here(&["-v", "--audit-grace", "0s"]);
    // Other containers on this host (the machine's own Docker is shared) add their ports to a
    // pass, each at most one read: alone, the line reads "1000 ports checked, 1 namespace
    // reads"; a read per port would make it at least 1000 reads whatever else runs.
    let mut pass = None;
    bt.wait_until_stderr(WAIT, |lines| {
        pass = lines.iter().find_map(|l| audit_pass(l).filter(|&(checked, _)| checked >= 1000));
        pass.is_some()
    });
    let (checked, reads) = pass.unwrap_or_else(|| {
        panic!(
            "no audit pass with our 1000 ports:\n{}",
            bt.stderr().lines().filter(|l| l.contains("audit pass")).collect::<Vec<_>>().join("\n")
        )
    });
    assert!(
        (1..=1 + (checked - 1000)).contains(&reads),
        "one read for our 1000 ports, at most one per other port: {checked} ports checked, {reads} namespace reads"
    );
    // Counted after the exit flush: every line written is in.
    assert_eq!(bt.stop(), Some(0), "{}", bt.stderr());
    let audits: Vec<Value> = bt
        .lines()
        .into_iter()
        .filter(|l| l["event"] == "audit" && l["container"]["name"] == c.name.as_str())
        .collect();
    assert_eq!(audits.len(), 1000, "one audit line per published port");
    assert_eq!(audits.iter().filter(|l| l["verdict"] == "loopback_only").count(), 1);
}
