//! What /proc says about a process: CPU time and scheduling counts over all its threads, and
//! its peak resident set.
use std::fs;

/// Sum over the process's threads of /proc/PID/task/TID/schedstat: time on a CPU (ns, exact)
/// and the number of times a thread was put on a CPU (each wake-up is one).
#[derive(Debug, Clone, Copy, Default)]
pub struct Sched {
    pub run_ns: u64,
    pub timeslices: u64,
}

impl Sched {
    pub fn read(pid: u32) -> Sched {
        let mut total = Sched::default();
        for (_, s) in threads(pid) {
            total.run_ns += s.run_ns;
            total.timeslices += s.timeslices;
        }
        total
    }

    pub fn since(self, earlier: Sched) -> Sched {
        Sched {
            run_ns: self.run_ns.saturating_sub(earlier.run_ns),
            timeslices: self.timeslices.saturating_sub(earlier.timeslices),
        }
    }
}

/// Each thread's name and schedstat.
pub fn threads(pid: u32) -> Vec<(String, Sched)> {
    let mut out = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let dir = task.path();
        let Ok(stat) = fs::read_to_string(dir.join("schedstat")) else { continue };
        let f: Vec<u64> = stat.split_whitespace().filter_map(|v| v.parse().ok()).collect();
        if f.len() < 3 {
            continue;
        }
        let name = fs::read_to_string(dir.join("comm")).unwrap_or_default().trim().to_owned();
        out.push((name, Sched { run_ns: f[0], timeslices: f[2] }));
    }
    out
}

/// Peak resident set size (VmHWM) in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_field(pid, "VmHWM:").unwrap_or(0)
}

fn status_field(pid: u32, name: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(name))?.split_whitespace().next()?.parse().ok()
}
