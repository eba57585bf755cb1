//! A bindtrace process under test, run in a topology's host namespace, with its JSON lines
//! collected as they arrive.
use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{net::Netns, proc::monotonic_ns};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    TcpSendReset,
    KfreeSkb,
    Tc,
}

impl Hook {
    pub fn arg(self) -> &'static str {
        match self {
            Hook::TcpSendReset => "tcp-send-reset",
            Hook::KfreeSkb => "kfree-skb",
            Hook::Tc => "tc",
        }
    }
}

pub fn binary() -> String {
    std::env::var("BINDTRACE_BIN").expect("BINDTRACE_BIN: run these tests through `sudo ./x test`")
}

/// The pids of every process holding listener number `listener` of a refused line.
pub fn listener_pids(line: &Value, listener: usize) -> Vec<u64> {
    line["listeners"][listener]["pids"]
        .as_array()
        .unwrap_or_else(|| panic!("listener {listener} has no pids: {line}"))
        .iter()
        .map(|p| p["pid"].as_u64().unwrap())
        .collect()
}

/// Interface churn ("watching vethX", "left scope") is logged at debug level, and tests wait
/// for those lines: without `-v`, this raises that module alone, so stderr stays as a user
/// sees it otherwise.
pub fn with_churn_log(cmd: &mut Command) {
    let verbose = cmd.get_args().any(|a| a.to_str().is_some_and(|a| a.starts_with("-v")));
    // A RUST_LOG the caller put on the command wins too (the soak's asks for the Docker
    // watcher's debug lines; it was overwritten, so its 60-minute run's failures lacked them).
    let given = cmd.get_envs().any(|(k, _)| k == "RUST_LOG");
    if !verbose && !given && std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info,bindtrace::app::scope_sync=debug");
    }
}

#[derive(Default)]
struct Shared {
    /// The stdout lines as read. The reader only stamps and stores them: parsing into
    /// [`Value`]s is left to whoever asks ([`Shared::lines`]), so a harness measuring how fast
    /// lines come does not spend the CPU it shares with bindtrace on JSON trees meanwhile.
    raw: Vec<String>,
    /// The first `lines.len()` of `raw`, parsed.
    lines: Vec<Value>,
    /// CLOCK_MONOTONIC when each stdout line was read (the clock of the lines' `ktime_ns`).
    lines_read_ns: Vec<u64>,
    stderr: Vec<String>,
    stderr_read_ns: Vec<u64>,
    ready: bool,
    exited: bool,
}

impl Shared {
    /// Every stdout line so far, parsed (those not parsed yet are, now).
    fn lines(&mut self) -> &[Value] {
        for line in &self.raw[self.lines.len()..] {
            let value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("bindtrace wrote a line that is not JSON ({e}): {line}"));
            self.lines.push(value);
        }
        &self.lines
    }
}

pub struct Bindtrace {
    child: Option<Child>,
    shared: Arc<(Mutex<Shared>, Condvar)>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Bindtrace {
    /// Starts `bindtrace --format json --hook HOOK ARGS...` inside `host` and waits until it says
    /// it is ready.
    pub fn start(host: &Netns, hook: Hook, args: &[&str]) -> Bindtrace {
        let mut bt = Self::spawn(host, hook, args);
        if !bt.wait_ready(Duration::from_secs(20)) {
            let stderr = bt.stderr();
            panic!("bindtrace did not become ready:\n{stderr}");
        }
        bt
    }

    /// Starts `bindtrace --format json --no-metrics ARGS...` in the test's own (the host's)
    /// network namespace, as a user runs it next to Docker, and waits until it is ready.
    pub fn start_here(args: &[&str]) -> Bindtrace {
        let mut cmd = Command::new(binary());
        // No metrics endpoint: the host's 127.0.0.1:19462 may be taken by another bindtrace.
        cmd.args(["--format", "json", "--no-metrics"]).args(args);
        let mut bt = Self::spawn_cmd(cmd);
        if !bt.wait_ready(Duration::from_secs(20)) {
            let stderr = bt.stderr();
            panic!("bindtrace did not become ready:\n{stderr}");
        }
        bt
    }

    /// Waits until a stderr line contains `needle`; false on timeout.
    pub fn wait_stderr(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_until(timeout, |s| s.stderr.iter().any(|l| l.contains(needle)))
    }

    /// Waits until `done(stderr lines so far)`; false on timeout.
    pub fn wait_until_stderr(&self, timeout: Duration, mut done: impl FnMut(&[String]) -> bool) -> bool {
        self.wait_until(timeout, |s| done(&s.stderr))
    }

    /// Waits for a line matching `pred`; false on timeout (for callers that report, not panic).
    pub fn has_line_within(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> bool {
        self.wait_until(timeout, |s| s.lines().iter().any(&pred))
    }

    /// Starts it without waiting (for tests of start-up errors).
    pub fn spawn(host: &Netns, hook: Hook, args: &[&str]) -> Bindtrace {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &host.name, &binary(), "--format", "json", "--hook", hook.arg()])
            .args(args);
        Self::spawn_cmd(cmd)
    }

    pub fn spawn_cmd(mut cmd: Command) -> Bindtrace {
        with_churn_log(&mut cmd);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("start bindtrace");
        let shared: Arc<(Mutex<Shared>, Condvar)> = Arc::default();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let s1 = shared.clone();
        let out_reader = std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let read_ns = monotonic_ns();
                let (m, cv) = &*s1;
                let mut g = m.lock().unwrap();
                g.raw.push(line);
                g.lines_read_ns.push(read_ns);
                drop(g);
                cv.notify_all();
            }
            let (m, cv) = &*s1;
            m.lock().unwrap().exited = true;
            cv.notify_all();
        });
        let s2 = shared.clone();
        let err_reader = std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let read_ns = monotonic_ns();
                let (m, cv) = &*s2;
                let mut g = m.lock().unwrap();
                g.stderr_read_ns.push(read_ns);
                if line.contains("bindtrace: ready") {
                    g.ready = true;
                }
                g.stderr.push(line);
                cv.notify_all();
            }
        });
        Bindtrace { child: Some(child), shared, readers: vec![out_reader, err_reader] }
    }

    fn wait_until(&self, timeout: Duration, mut done: impl FnMut(&mut Shared) -> bool) -> bool {
        let (m, cv) = &*self.shared;
        let deadline = Instant::now() + timeout;
        let mut g = m.lock().unwrap();
        loop {
            if done(&mut g) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    pub fn wait_ready(&mut self, timeout: Duration) -> bool {
        self.wait_until(timeout, |s| s.ready || s.exited) && self.shared.0.lock().unwrap().ready
    }

    /// Waits for a line matching `pred` and returns it.
    pub fn expect_line(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let mut found = None;
        self.wait_until(timeout, |s| {
            found = s.lines().iter().find(|l| pred(l)).cloned();
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "no bindtrace line {what} within {timeout:?}; lines: {:#?}\nstderr:\n{}",
                self.lines(),
                self.stderr()
            )
        })
    }

    /// Waits for a `refused` line for `port` and returns it.
    pub fn expect_refused(&self, port: u16) -> Value {
        self.expect_line(&format!("refused on port {port}"), Duration::from_secs(5), |l| {
            l["event"] == "refused" && l["target_port"] == port
        })
    }

    /// Stops bindtrace and asserts it printed no `refused` line for `port`. A negative check
    /// made after the exit flush (which prints everything counted) cannot pass because
    /// bindtrace was merely slow; the exit must be clean.
    pub fn expect_no_refused_after_exit(&mut self, port: u16) {
        self.expect_none_after_exit(&format!("refused on port {port}"), |l| {
            l["event"] == "refused" && l["target_port"] == port
        });
    }

    /// Stops bindtrace (unless stopped already) and asserts that no line it printed matches
    /// `pred`.
    pub fn expect_none_after_exit(&mut self, what: &str, pred: impl Fn(&Value) -> bool) {
        if self.child.is_some() {
            let code = self.stop();
            assert_eq!(code, Some(0), "bindtrace did not exit cleanly:\n{}", self.stderr());
        }
        let hits: Vec<Value> = self.lines().into_iter().filter(|l| pred(l)).collect();
        assert!(hits.is_empty(), "unexpected lines ({what}): {hits:#?}");
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn lines(&self) -> Vec<Value> {
        self.shared.0.lock().unwrap().lines().to_vec()
    }

    /// Takes the lines read so far, leaving none (a long run keeps its memory bounded so).
    pub fn take_lines(&self) -> Vec<Value> {
        let mut g = self.shared.0.lock().unwrap();
        g.lines();
        g.lines_read_ns.clear();
        g.raw.clear();
        std::mem::take(&mut g.lines)
    }

    /// Every stdout line with the CLOCK_MONOTONIC time it was read.
    pub fn stamped_lines(&self) -> Vec<(u64, Value)> {
        let mut g = self.shared.0.lock().unwrap();
        g.lines();
        g.lines_read_ns.iter().copied().zip(g.lines.iter().cloned()).collect()
    }

    /// The stdout lines from the `from`-th on, with the time each was read: a caller that
    /// waits for lines takes only the new ones, rather than copying every line so far while
    /// the reader thread waits on the lock (and bindtrace, once the pipe is full, on it).
    pub fn stamped_lines_from(&self, from: usize) -> Vec<(u64, Value)> {
        let mut g = self.shared.0.lock().unwrap();
        g.lines();
        let from = from.min(g.lines.len());
        g.lines_read_ns[from..].iter().copied().zip(g.lines[from..].iter().cloned()).collect()
    }

    /// How many stdout lines have been read so far (none parsed: cheap to ask often).
    pub fn lines_read(&self) -> usize {
        self.shared.0.lock().unwrap().raw.len()
    }

    /// Every stderr line with the CLOCK_MONOTONIC time it was read.
    pub fn stamped_stderr(&self) -> Vec<(u64, String)> {
        let g = self.shared.0.lock().unwrap();
        g.stderr_read_ns.iter().copied().zip(g.stderr.iter().cloned()).collect()
    }

    pub fn stderr(&self) -> String {
        self.shared.0.lock().unwrap().stderr.join("\n")
    }

    /// SIGTERM, wait for exit; returns the exit code. Output readers are drained.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().ok();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        status.and_then(|s| s.code())
    }

    /// Waits for the process to exit by itself (start-up errors); returns exit code and stderr.
    pub fn wait_exit(&mut self, timeout: Duration) -> (Option<i32>, String) {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + timeout;
        let code = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("bindtrace did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        (code, self.stderr())
    }
}

impl Drop for Bindtrace {
    fn drop(&mut self) {
        self.stop();
    }
}
