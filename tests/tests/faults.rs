//! Transient failures after start, each injected for real: bindtrace keeps running, says so
//! once, counts it in `bindtrace_errors_total{stage}`, and reports the refusals that come
//! after. (A runtime socket that goes away and comes back: `docker.rs`, test 7.)
use std::{process::Command, time::Duration};

use bindtrace_tests::{
    Bindtrace, Container, Hook, Listener, Topology, bindtrace::binary, connect, metrics::scrape, root_or_skip,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// The log line of `c`'s port in scope with its own namespace (Docker's order puts the peer in
/// the host's namespace for a moment first).
fn watching(c: &Container) -> String {
    format!("watching {} (netns {},", c.host_veth, c.ns.inode())
}

/// Refuses one connection to a loopback-bound server in `c` and returns its line.
fn refused_line(bt: &Bindtrace, topo: &Topology, c: &Container, port: u16) -> Value {
    let _server = Listener::start(&c.ns.name, "127.0.0.1", port, &[]);
    let err = connect(&topo.host, c.ipv4, port).expect_err("refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let inode = c.ns.inode();
    bt.expect_line(&format!("the refusal on {}", c.host_veth), WAIT, |l| {
        l["event"] == "refused" && l["netns"] == inode && l["target_port"] == port
    })
}

/// The container goes as Docker removes one: its veth first (bindtrace holds its namespace
/// open while the port is in scope, so deleting the namespace alone would leave the veth).
fn remove(topo: &Topology, c: Container) {
    topo.host.ip(&["link", "del", &c.host_veth]);
    drop(c);
}

fn errors(topo: &Topology, stage: &str) -> u64 {
    scrape(&topo.host).sum("bindtrace_errors_total", &[("stage", stage)])
}

fn warnings_with(bt: &Bindtrace, needle: &str) -> usize {
    bt.stderr().lines().filter(|l| l.contains("WARN") && l.contains(needle)).count()
}

/// bindtrace under `prlimit --nofile=SOFT:HARD`, in the topology's host namespace.
fn start_with_nofile(topo: &Topology, soft: u64, hard: u64) -> Bindtrace {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &topo.host.name, "prlimit", &format!("--nofile={soft}:{hard}"), "--"])
        .arg(binary())
        .args(["--format", "json", "--hook", Hook::KfreeSkb.arg(), "-v"]);
    let mut bt = Bindtrace::spawn_cmd(cmd);
    assert!(bt.wait_ready(Duration::from_secs(20)), "not ready:\n{}", bt.stderr());
    bt
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).expect("read /proc/PID/fd").count() as u64
}

/// 3a. A SCOPE map too small for the ports (`--scope-size 2`, three containers): the third is
/// not watched, which is said once and counted; once another container goes, it is watched and
/// its refusal reported.
#[test]
fn a_full_scope_map_is_a_hiccup_and_the_port_joins_once_there_is_room() {
    if !root_or_skip() {
        return;
    }
    let mut topo = Topology::new();
    let mut bt = Bindtrace::start(&topo.host, Hook::KfreeSkb, &["--scope-size", "2", "-v"]);
    let first = topo.container();
    let second = topo.container();
    for c in [&first, &second] {
        assert!(bt.wait_stderr(&watching(c), WAIT), "never watched {}:\n{}", c.host_veth, bt.stderr());
    }
    let third = topo.container();
    assert!(
        bt.wait_stderr(
            &format!("could not be added to the kernel's SCOPE map, first {}", third.host_veth),
            WAIT
        ),
        "the full SCOPE map was not reported:\n{}",
        bt.stderr()
    );
    assert!(errors(&topo, "scope") >= 1, "bindtrace_errors_total{{stage=\"scope\"}} did not rise");
    // Room: the first container goes, the third joins at the rescan that follows.
    remove(&topo, first);
    assert!(bt.wait_stderr(&watching(&third), WAIT), "the third never joined:\n{}", bt.stderr());
    assert!(bt.wait_stderr("scope: working again", WAIT), "{}", bt.stderr());
    let line = refused_line(&bt, &topo, &third, 8080);
    assert_eq!(line["verdict"], "loopback_only", "{line}");
    let line = refused_line(&bt, &topo, &second, 8081);
    assert_eq!(line["verdict"], "loopback_only", "{line}");
    assert_eq!(bt.stop(), Some(0), "clean exit:\n{}", bt.stderr());
    // Quiet: retries while the map was full repeat nothing at WARN.
    assert_eq!(warnings_with(&bt, "SCOPE map"), 1, "{}", bt.stderr());
}

/// 3b. EMFILE: under a hard limit a few descriptors above what bindtrace holds idle, new
/// containers' namespaces cannot be opened. Their ports are skipped, said and counted; once
/// descriptors are free again, the retry watches them and their refusals are reported.
#[test]
fn emfile_skips_ports_until_descriptors_are_free() {
    if !root_or_skip() {
        return;
    }
    let mut topo = Topology::new();
    // What this bindtrace holds when idle, here.
    let idle = {
        let mut bt = start_with_nofile(&topo, 4096, 4096);
        let n = open_fds(bt.pid());
        assert_eq!(bt.stop(), Some(0), "{}", bt.stderr());
        n
    };
    let limit = idle + 4;
    let mut bt = start_with_nofile(&topo, limit, limit);
    let mut containers: Vec<Container> = (0..7).map(|_| topo.container()).collect();
    assert!(
        bt.wait_stderr("Too many open files", WAIT),
        "EMFILE was not reported ({idle} descriptors idle, limit {limit}):\n{}",
        bt.stderr()
    );
    assert!(errors(&topo, "rescan") >= 1, "bindtrace_errors_total{{stage=\"rescan\"}} did not rise");
    // The ports watched before descriptors ran out stay watched. (Whether re-checking a held
    // namespace itself meets EMFILE depends on which descriptor runs out first: this guards the
    // outcome, it does not force that race.)
    // (Docker's order puts a peer in the host's namespace first: that one leaves scope once it
    // moves, before it is watched in its own.)
    let log = bt.stderr();
    for c in &containers {
        let Some(at) = log.find(&watching(c)) else { continue };
        let left = format!("port {} left scope", c.host_veth);
        assert!(!log[at..].contains(&left), "{} left scope for want of descriptors:\n{log}", c.host_veth);
    }
    let last = containers.pop().expect("seven containers");
    // Descriptors come back when the containers that hold them go.
    for c in containers {
        remove(&topo, c);
    }
    assert!(bt.wait_stderr(&watching(&last), WAIT), "never watched once fds were free:\n{}", bt.stderr());
    let line = refused_line(&bt, &topo, &last, 8080);
    assert_eq!(line["verdict"], "loopback_only", "{line}");
    assert_eq!(bt.stop(), Some(0), "clean exit:\n{}", bt.stderr());
    // Quiet: one warning for the skipped ports, at most one from the metrics server (a scrape
    // may have come while bindtrace was out of descriptors).
    assert_eq!(warnings_with(&bt, "rescan: "), 1, "{}", bt.stderr());
    assert!(warnings_with(&bt, "metrics: accept failed") <= 1, "{}", bt.stderr());
}

/// RLIMIT_NOFILE: the soft limit is raised to the hard limit at start, never the hard limit.
#[test]
fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
    if !root_or_skip() {
        return;
    }
    let topo = Topology::new();
    let mut bt = start_with_nofile(&topo, 256, 8192);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", bt.pid())).expect("limits");
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("Max open files");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&fields[3..5], ["8192", "8192"], "{line}");
    assert_eq!(bt.stop(), Some(0), "{}", bt.stderr());
}

/// 3c. ENOBUFS: the link-notification socket with the smallest receive buffer, bindtrace
/// stopped (SIGSTOP) while five containers start, then resumed: the overrun is said and
/// counted, every link is read again, and all five are watched.
#[test]
fn a_netlink_overrun_rereads_every_link() {
    if !root_or_skip() {
        return;
    }
    let mut topo = Topology::new();
    let mut bt = Bindtrace::start(&topo.host, Hook::KfreeSkb, &["--link-events-rcvbuf", "1", "-v"]);
    let pid = bt.pid() as i32;
    // SAFETY: signals to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let containers: Vec<Container> = (0..5).map(|_| topo.container()).collect();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    assert!(bt.wait_stderr("overran (ENOBUFS)", WAIT), "no overrun reported:\n{}", bt.stderr());
    for c in &containers {
        assert!(bt.wait_stderr(&watching(c), WAIT), "never watched {}:\n{}", c.host_veth, bt.stderr());
    }
    assert!(
        errors(&topo, "link_events") >= 1,
        "bindtrace_errors_total{{stage=\"link_events\"}} did not rise"
    );
    let line = refused_line(&bt, &topo, containers.last().expect("five"), 8080);
    assert_eq!(line["verdict"], "loopback_only", "{line}");
    assert_eq!(bt.stop(), Some(0), "clean exit:\n{}", bt.stderr());
}

/// Processes in namespace `ns` holding `n` open descriptors between them (of /dev/null, at
/// most 19 000 each: this host's hard limit is 20 000 and raising it needs CAP_SYS_RESOURCE),
/// so finding who holds a socket there walks all of them.
struct FdHoarders(Vec<std::process::Child>);

impl FdHoarders {
    const PER_PROCESS: u64 = 19_000;

    fn start(ns: &str, n: u64) -> FdHoarders {
        use std::io::{BufRead, BufReader};
        let script = "import os, sys\n\
                      import resource\n\
                      n = int(sys.argv[1])\n\
                      resource.setrlimit(resource.RLIMIT_NOFILE, (n + 64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n\
                      fds = [os.open('/dev/null', os.O_RDONLY) for _ in range(n)]\n\
                      print('ready', flush=True)\n\
                      sys.stdin.read()\n";
        // Held from the first process on, so a failed start kills those already running.
        let mut hoarders = FdHoarders(Vec::new());
        let mut left = n;
        while left > 0 {
            let here = left.min(Self::PER_PROCESS);
            left -= here;
            let mut child = Command::new("ip")
                .args(["netns", "exec", ns, "python3", "-c", script, &here.to_string()])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("start python3");
            let stdout = child.stdout.take().expect("stdout");
            hoarders.0.push(child);
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).expect("read");
            assert_eq!(line.trim(), "ready", "a process holding {here} descriptors did not start");
        }
        hoarders
    }
}

impl Drop for FdHoarders {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Test 2: the enrichment queue forced full (`--enrich-queue 1`; processes in one namespace
/// hold 100 000 descriptors, so diagnosing that namespace's line walks them all): another
/// namespace's new port still gets its scope entry and its line, written at once without a
/// diagnosis, with its count; the drop counter rises; the slow lines come out too.
#[test]
fn a_full_enrichment_queue_writes_lines_undiagnosed_and_counts_them() {
    if !root_or_skip() {
        return;
    }
    let mut topo = Topology::new();
    let slow = topo.container();
    let _hoarders = FdHoarders::start(&slow.ns.name, 100_000);
    let _server = Listener::start(&slow.ns.name, "127.0.0.1", 8080, &[]);
    let mut bt = Bindtrace::start(&topo.host, Hook::KfreeSkb, &["--enrich-queue", "1", "-v"]);
    assert!(bt.wait_stderr(&watching(&slow), WAIT), "never watched {}:\n{}", slow.host_veth, bt.stderr());
    // The slow namespace's refusal goes first and keeps the worker walking; the other's comes
    // right after. The queue holds one line, so the second is written undiagnosed, unless the
    // walk was over already (then another round).
    let mut undiagnosed = None;
    let mut others = Vec::new();
    for round in 0..5u16 {
        let other = topo.container();
        assert!(
            bt.wait_stderr(&watching(&other), WAIT),
            "never watched {}:\n{}",
            other.host_veth,
            bt.stderr()
        );
        let err = connect(&topo.host, slow.ipv4, 9000 + round).expect_err("refused");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        let err = connect(&topo.host, other.ipv4, 8080).expect_err("refused");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        let inode = other.ns.inode();
        let line = bt.expect_line(&format!("the refusal on {}", other.host_veth), WAIT, |l| {
            l["event"] == "refused" && l["netns"] == inode && l["target_port"] == 8080
        });
        others.push(other);
        if line["undiagnosed"] == "queue_full" {
            undiagnosed = Some(line);
            break;
        }
    }
    let line = undiagnosed.unwrap_or_else(|| panic!("no line was written undiagnosed:\n{}", bt.stderr()));
    assert_eq!(line["verdict"], "unknown", "{line}");
    assert_eq!(line["count"], 1, "{line}");
    assert!(errors(&topo, "enrich") >= 1, "bindtrace_errors_total{{stage=\"enrich\"}} did not rise");
    assert_eq!(bt.stop(), Some(0), "clean exit:\n{}", bt.stderr());
    // After the exit flush: every slow refusal has its line, diagnosed.
    let rounds = others.len() as u16;
    let slow_inode = slow.ns.inode();
    for port in 9000..9000 + rounds {
        let found: Vec<Value> = bt
            .lines()
            .into_iter()
            .filter(|l| l["event"] == "refused" && l["netns"] == slow_inode && l["target_port"] == port)
            .collect();
        assert_eq!(found.len(), 1, "the slow namespace's port {port}: {found:?}\n{}", bt.stderr());
        assert_eq!(found[0]["verdict"], "no_listener", "{}", found[0]);
        assert!(found[0].get("undiagnosed").is_none(), "{}", found[0]);
    }
    assert_eq!(warnings_with(&bt, "enrich: "), 1, "{}", bt.stderr());
}
