//! One minute's figures: bindtrace's process (from /proc), its count keys and errors (from its
//! metrics), its lines, and the refusals made; and the checks against the warm-up's maxima.
use std::net::SocketAddr;

use bindtrace_tests::metrics::{Scrape, http_get};
use serde_json::Value;

use crate::RSS_MARGIN_PERCENT;

/// What the metrics endpoint says.
#[derive(Debug, Clone, Copy)]
pub struct Metrics {
    pub keys_kernel: u64,
    pub keys_userspace: u64,
    pub errors: u64,
    pub refused_total: u64,
}

pub fn scrape(addr: SocketAddr) -> Metrics {
    let reply = http_get(addr, "/metrics", None).expect("scrape bindtrace's metrics");
    assert_eq!(reply.status, 200, "{reply:?}");
    let s = Scrape::parse(&reply.body);
    Metrics {
        keys_kernel: s.sum("bindtrace_count_keys", &[("held", "kernel")]),
        keys_userspace: s.sum("bindtrace_count_keys", &[("held", "userspace")]),
        errors: s.sum("bindtrace_errors_total", &[]),
        refused_total: s.sum("bindtrace_refused_connections_total", &[]),
    }
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub minute: u64,
    pub rounds: u32,
    pub rss_kib: u64,
    pub fds: u64,
    pub threads: u64,
    pub metrics: Metrics,
    pub lines: u64,
    pub counted: u64,
    pub made: u64,
    /// What the descriptors are, for a failure's message.
    pub fd_kinds: String,
}

impl Sample {
    pub const HEADER: &str = "| minute | rounds | RSS KiB | fds | threads | keys kernel | keys userspace | lines | lines' counts | refusals made | metrics total | errors |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

    /// `lines`: the refused lines so far and the sum of their counts.
    pub fn read(
        minute: u64,
        rounds: u32,
        pid: u32,
        metrics: Metrics,
        lines: (u64, u64),
        made: u64,
    ) -> Sample {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        // The least of three reads 300 ms apart: a request to the Docker API in flight holds a
        // socket for a moment (one extra fd at minutes 7, 36 and 40 of a 40-minute run, gone a
        // minute later), a leak holds it for good.
        let fds = (0..3)
            .map(|i| {
                if i > 0 {
                    std::thread::sleep(std::time::Duration::from_millis(300));
                }
                std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0)
            })
            .min()
            .unwrap_or(0);
        Sample {
            minute,
            rounds,
            rss_kib: field("VmRSS:"),
            fds,
            threads: field("Threads:"),
            metrics,
            lines: lines.0,
            counted: lines.1,
            fd_kinds: fd_kinds(pid),
            made,
        }
    }

    pub fn row(&self) -> String {
        let m = &self.metrics;
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            self.minute,
            self.rounds,
            self.rss_kib,
            self.fds,
            self.threads,
            m.keys_kernel,
            m.keys_userspace,
            self.lines,
            self.counted,
            self.made,
            m.refused_total,
            m.errors
        )
    }

    /// What grew past the warm-up's maxima.
    pub fn above_steady(&self, warmup: &[Sample]) -> Vec<String> {
        let max = |f: fn(&Sample) -> u64| warmup.iter().map(f).max().unwrap_or(0);
        let mut out = Vec::new();
        let mut check = |what: &str, now: u64, limit: u64| {
            if now > limit {
                out.push(format!("minute {}: {what} {now} above its steady {limit}", self.minute));
            }
        };
        let fds = format!("fds ({})", self.fd_kinds);
        check(&fds, self.fds, max(|s| s.fds));
        check("threads", self.threads, max(|s| s.threads));
        check("kernel count keys", self.metrics.keys_kernel, max(|s| s.metrics.keys_kernel));
        check("userspace count keys", self.metrics.keys_userspace, max(|s| s.metrics.keys_userspace));
        let rss = max(|s| s.rss_kib);
        check("RSS KiB", self.rss_kib, rss + rss * RSS_MARGIN_PERCENT / 100);
        out
    }
}

/// The sum of the refused lines' counts (lines of unknown count add nothing: their refusals
/// are in the overflow total).
pub fn counted(lines: &[Value]) -> u64 {
    lines.iter().filter(|l| l["event"] == "refused").map(|l| l["count"].as_u64().unwrap_or(0)).sum()
}

/// The overflow figure of the exit summary ("..., N found the count map full ..."), 0 if absent.
pub fn summary_overflow(stderr: &str) -> u64 {
    let Some(at) = stderr.find(" found the count map full") else { return 0 };
    stderr[..at].rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// bindtrace's descriptors by kind ("socket", "anon_inode:bpf-map", "net", ...), counted.
fn fd_kinds(pid: u32) -> String {
    let mut kinds = std::collections::BTreeMap::<String, u64>::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten() {
        let target =
            std::fs::read_link(e.path()).map(|t| t.to_string_lossy().into_owned()).unwrap_or_default();
        let kind = target.split(['[', ':']).next().unwrap_or("").to_owned();
        let kind = if kind == "anon_inode" { target } else { kind };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ")
}
