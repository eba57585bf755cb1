//! Kernel time of BPF programs, from the kernel's own accounting (`kernel.bpf_stats_enabled`).
//! Enabling it costs two clock reads per program run, so only dedicated rounds turn it on.
use std::fs;

use bindtrace_tests::native::programs_held_by;

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns BPF run-time accounting on; restores the previous setting on drop.
pub struct StatsEnabled {
    previous: String,
}

impl StatsEnabled {
    pub fn on() -> std::io::Result<StatsEnabled> {
        let previous = fs::read_to_string(SYSCTL)?.trim().to_owned();
        fs::write(SYSCTL, "1")?;
        Ok(StatsEnabled { previous })
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        let _ = fs::write(SYSCTL, &self.previous);
    }
}

/// One program's counters at one moment.
#[derive(Debug, Clone)]
pub struct ProgStats {
    pub id: u32,
    pub name: String,
    pub run_ns: u64,
    pub runs: u64,
}

/// The counters of every program `pid` holds, by id.
pub fn of_process(pid: u32) -> Vec<ProgStats> {
    let ids = programs_held_by(pid);
    let mut out: Vec<ProgStats> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| ids.contains(&p.id()))
        .map(|p| ProgStats {
            id: p.id(),
            name: p.name_as_str().unwrap_or("?").to_owned(),
            run_ns: p.run_time().as_nanos() as u64,
            runs: p.run_count(),
        })
        .collect();
    out.sort_by_key(|p| p.id);
    out
}

/// Per program: what ran between two readings.
pub fn delta(before: &[ProgStats], after: &[ProgStats]) -> Vec<ProgStats> {
    after
        .iter()
        .map(|a| {
            let b = before.iter().find(|b| b.id == a.id);
            ProgStats {
                id: a.id,
                name: a.name.clone(),
                run_ns: a.run_ns - b.map_or(0, |b| b.run_ns),
                runs: a.runs - b.map_or(0, |b| b.runs),
            }
        })
        .collect()
}
