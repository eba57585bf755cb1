//! The configurations compared: nothing, bindtrace with one of its hooks, or a bpftrace
//! program on the same tracepoint. Each is started pinned to the tracer CPU and stopped cleanly.
use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bindtrace_tests::{
    Bindtrace, Hook, Netns, bindtrace::binary, native::programs_held_by, proc::monotonic_ns,
};
use serde_json::Value;

/// What a user would write instead of bindtrace: count NO_SOCKET resets by port (the port is
/// bytes 2-3 of the sender's sockaddr, the same offset for IPv4 and IPv6).
pub const BPFTRACE_COUNT: &str = "tracepoint:tcp:tcp_send_reset /args->reason == 1/ \
{ @refused[(uint16)((args->saddr[2] << 8) | args->saddr[3])] = count(); }";
/// The floor any program on this tracepoint pays: one that does nothing.
pub const BPFTRACE_EMPTY: &str = "tracepoint:tcp:tcp_send_reset { }";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Config {
    NoTracer,
    Bindtrace(Hook),
    Bpftrace(&'static str),
}

impl Config {
    pub fn label(self) -> String {
        match self {
            Config::NoTracer => "no tracer".into(),
            Config::Bindtrace(h) => format!("bindtrace --hook {}", h.arg()),
            Config::Bpftrace(p) if p == BPFTRACE_EMPTY => "bpftrace, empty program (floor)".into(),
            Config::Bpftrace(_) => "bpftrace, count by port".into(),
        }
    }
}

/// How long one start took, as seen from outside.
#[derive(Debug, Clone, Copy, Default)]
pub struct Startup {
    /// Spawn to the log line saying the hook is attached.
    pub attached_ns: Option<u64>,
    /// Spawn to `bindtrace: ready` (the scope is in the kernel too).
    pub ready_ns: u64,
}

pub enum Running {
    Nothing,
    Bindtrace { bt: Bindtrace, spawned_ns: u64 },
    Bpftrace { child: Child, stdout: std::thread::JoinHandle<String> },
}

/// What a configuration counted, read after it stopped.
pub struct Stopped {
    /// bindtrace: every `refused` line; bpftrace: nothing.
    pub lines: Vec<(u64, Value)>,
    /// Refusals the tracer counted in total (None for no tracer).
    pub counted: Option<u64>,
    /// bindtrace's `lost` lines, summed.
    pub lost_samples: u64,
}

impl Running {
    pub fn start(config: Config, host: &Netns, cpu: usize, extra: &[&str]) -> anyhow::Result<Running> {
        match config {
            Config::NoTracer => Ok(Running::Nothing),
            Config::Bindtrace(hook) => {
                let mut cmd = Command::new("taskset");
                cmd.args(["-c", &cpu.to_string(), "ip", "netns", "exec", &host.name, &binary()])
                    .args(["--format", "json", "--hook", hook.arg(), "-i", "docker0", "--no-docker"])
                    .args(extra);
                let spawned_ns = monotonic_ns();
                let mut bt = Bindtrace::spawn_cmd(cmd);
                if !bt.wait_ready(Duration::from_secs(30)) {
                    anyhow::bail!("bindtrace --hook {} did not become ready:\n{}", hook.arg(), bt.stderr());
                }
                Ok(Running::Bindtrace { bt, spawned_ns })
            }
            Config::Bpftrace(program) => start_bpftrace(program, cpu),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        match self {
            Running::Nothing => None,
            Running::Bindtrace { bt, .. } => Some(bt.pid()),
            Running::Bpftrace { child, .. } => Some(child.id()),
        }
    }

    pub fn startup(&self) -> Option<Startup> {
        let Running::Bindtrace { bt, spawned_ns } = self else { return None };
        let stderr = bt.stamped_stderr();
        let at = |needle: &str| stderr.iter().find(|(_, l)| l.contains(needle)).map(|(t, _)| t - spawned_ns);
        Some(Startup {
            attached_ns: at("attached tp_btf/").or(at("loaded classifier")),
            ready_ns: at("bindtrace: ready")?,
        })
    }

    /// Stops the tracer (SIGTERM / SIGINT, as a user would) and collects what it counted.
    pub fn stop(self) -> anyhow::Result<Stopped> {
        match self {
            Running::Nothing => Ok(Stopped { lines: Vec::new(), counted: None, lost_samples: 0 }),
            Running::Bindtrace { mut bt, .. } => {
                let code = bt.stop();
                if code != Some(0) {
                    anyhow::bail!("bindtrace exited with {code:?}:\n{}", bt.stderr());
                }
                let lines = bt.stamped_lines();
                let refused: Vec<(u64, Value)> =
                    lines.iter().filter(|(_, l)| l["event"] == "refused").cloned().collect();
                let counted = refused.iter().map(|(_, l)| l["count"].as_u64().unwrap_or(0)).sum();
                let lost_samples = lines
                    .iter()
                    .filter(|(_, l)| l["event"] == "lost" && l["stage"] == "kernel_ringbuf")
                    .map(|(_, l)| l["count"].as_u64().unwrap_or(0))
                    .sum();
                Ok(Stopped { lines: refused, counted: Some(counted), lost_samples })
            }
            Running::Bpftrace { child, stdout } => {
                unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
                let output = child.wait_with_output()?;
                let text = stdout.join().unwrap_or_default();
                if !output.status.success() {
                    anyhow::bail!("bpftrace exited with {}:\n{text}", output.status);
                }
                Ok(Stopped { lines: Vec::new(), counted: Some(bpftrace_total(&text)), lost_samples: 0 })
            }
        }
    }
}

/// `bpftrace -e PROGRAM` in the root namespace (tracefs must be visible: classic tracepoints
/// find their id there), ready once it holds its program and has printed "Attaching".
fn start_bpftrace(program: &'static str, cpu: usize) -> anyhow::Result<Running> {
    let mut child = Command::new("taskset")
        .args(["-c", &cpu.to_string(), "bpftrace", "-e", program])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!(
                "starting bpftrace ({e}): install it with `sudo ./x setup` (Debian package bpftrace)"
            )
        })?;
    let mut out = BufReader::new(child.stdout.take().expect("piped"));
    let mut first = String::new();
    out.read_line(&mut first)?;
    if !first.starts_with("Attaching") {
        let _ = child.kill();
        let _ = child.wait();
        anyhow::bail!("bpftrace did not attach: {first:?}");
    }
    // "Attaching" comes before the attach itself: wait until it holds the program and a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while programs_held_by(child.id()).is_empty() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("bpftrace loaded no program within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let stdout = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = out.read_to_string(&mut rest);
        rest
    });
    Ok(Running::Bpftrace { child, stdout })
}

/// Sum of a bpftrace count map as printed at exit: `@refused[8000]: 1234` lines.
pub fn bpftrace_total(text: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with('@'))
        .filter_map(|l| l.rsplit_once(": "))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum()
}
