//! One output record: a refusal (or a folded run of them) with everything that explains it.
use std::net::IpAddr;

use serde::Serialize;

use crate::{sockets::Holder, verdict::Verdict};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenerReport {
    pub ip: IpAddr,
    pub port: u16,
    pub pids: Vec<Holder>,
}

/// The JSON line, field for field; the text line is rendered from it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// RFC 3339, when bindtrace wrote the line.
    pub time: String,
    /// Kernel monotonic time of the sampled refusal (absent when every sample was lost).
    pub ktime_ns: Option<u64>,
    pub event: &'static str,
    pub verdict: Verdict,
    pub proto: &'static str,
    pub family: &'static str,
    pub target_ip: Option<IpAddr>,
    pub target_port: u16,
    pub client_ip: Option<IpAddr>,
    pub client_port: Option<u16>,
    /// Namespace inode (as `ls -l /proc/PID/ns/net` shows it) and cookie.
    pub netns: u64,
    pub netns_cookie: u64,
    pub bridge: String,
    /// Container-side interface index and host-side veth name.
    pub ifindex: u32,
    pub veth: String,
    pub hook: &'static str,
    pub listeners: Vec<ListenerReport>,
    /// Refusals this line stands for (exact: from the kernel's counters).
    pub count: u64,
    pub hint: String,
}

/// A line about lines: what could not be delivered.
#[derive(Debug, Clone, Serialize)]
pub struct LostReport {
    pub time: String,
    pub event: &'static str,
    /// Where: `kernel_ringbuf` (samples dropped, their counts are still in the next lines), or
    /// `kernel_recursion` (hook invocations the kernel skipped: those refusals are not counted).
    pub stage: &'static str,
    pub count: u64,
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
