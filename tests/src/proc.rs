//! Processes started by tests: listeners in a namespace.
use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const LISTENER_PY: &str = include_str!("listener.py");

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`, so of bindtrace's `ktime_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// True when the environment variable `CI` is set (to anything but empty, `0` or `false`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// Says why a test does not run here and lets it pass as skipped; under `CI` a skip would
/// hide a runner without root or Docker, so it panics instead.
pub fn skip(why: &str) {
    assert!(!in_ci(), "CI is set, so this test may not skip: {why}");
    eprintln!("skipped: {why}");
}

/// True when running as root; otherwise [`skip`]s (which panics under `CI`).
pub fn root_or_skip() -> bool {
    if is_root() {
        return true;
    }
    skip("needs root");
    false
}

/// Which kind of socket [`wait_socket`] waits for.
#[derive(Clone, Copy)]
pub enum Bound {
    /// A TCP socket in LISTEN (state 0A in /proc/net/tcp{,6}).
    TcpListening,
    /// An unconnected UDP socket (state 07 in /proc/net/udp{,6}).
    Udp,
}

/// Waits until the network namespace of `pid` has a socket of `kind` on `port` (read from
/// its /proc/PID/net tables, so no tool is needed in the container); panics after 10 s,
/// naming `who`.
pub fn wait_socket(pid: u32, port: u16, kind: Bound, who: &str) {
    let (tables, state, what) = match kind {
        Bound::TcpListening => (["tcp", "tcp6"], "0A", "listened on"),
        Bound::Udp => (["udp", "udp6"], "07", "bound UDP port"),
    };
    let want = format!(":{port:04X} ");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = tables.iter().any(|t| {
            std::fs::read_to_string(format!("/proc/{pid}/net/{t}"))
                .unwrap_or_default()
                .lines()
                .any(|l| l.split_whitespace().nth(3) == Some(state) && l.contains(&want))
        });
        if found {
            return;
        }
        assert!(Instant::now() < deadline, "{who} never {what} {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A python listener (see listener.py) running in a namespace; killed on drop.
pub struct Listener {
    child: Child,
    /// Every process holding the socket(s), host pid namespace.
    pub pids: Vec<u32>,
}

impl Listener {
    /// `ip netns exec NS python3 listener.py ADDR PORT EXTRA...`; returns once it listens.
    pub fn start(ns: &str, addr: &str, port: u16, extra: &[&str]) -> Listener {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", LISTENER_PY, addr, &port.to_string()])
            .args(extra)
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("start python3 listener");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("read listener");
        let pids: Vec<u32> = line
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("listener on {addr}:{port} in {ns} did not start: {line:?}"))
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(pids[0], child.id(), "ip netns exec execs the command");
        Listener { child, pids }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}
