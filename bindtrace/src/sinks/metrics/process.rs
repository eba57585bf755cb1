//! The usual `process_*` metrics (the names every Prometheus client uses), read from
//! `/proc/self` at each scrape. prometheus-client has no process collector, so this one reads
//! the numbers and lets the library encode them.
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Unit,
};

#[derive(Debug)]
pub(crate) struct ProcessCollector;

/// What `/proc/self/stat` and friends say about this process.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    pub(crate) cpu_seconds: f64,
    pub(crate) resident_bytes: i64,
    pub(crate) virtual_bytes: i64,
    pub(crate) start_time_seconds: f64,
    pub(crate) open_fds: i64,
    pub(crate) max_fds: i64,
}

/// Parses `/proc/PID/stat` (fields after the parenthesised comm, which may contain spaces) given
/// clock ticks per second, page size and the boot time (`btime` of /proc/stat).
pub(crate) fn parse_stat(stat: &str, ticks: f64, page: i64, btime: f64) -> Option<(f64, i64, i64, f64)> {
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): field N is f[N - 3].
    let num = |n: usize| -> Option<f64> { f.get(n - 3)?.parse().ok() };
    let cpu = (num(14)? + num(15)?) / ticks;
    let start = btime + num(22)? / ticks;
    let vsize = num(23)? as i64;
    let rss = num(24)? as i64 * page;
    Some((cpu, rss, vsize, start))
}

fn read() -> Option<Sample> {
    // SAFETY: sysconf and getrlimit only read process-wide settings.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as i64;
    let btime: f64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let (cpu_seconds, resident_bytes, virtual_bytes, start_time_seconds) =
        parse_stat(&std::fs::read_to_string("/proc/self/stat").ok()?, ticks, page, btime)?;
    let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as i64;
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    let max_fds = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur as i64
    } else {
        -1
    };
    Some(Sample { cpu_seconds, resident_bytes, virtual_bytes, start_time_seconds, open_fds, max_fds })
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = read() else { return Ok(()) };
        let cpu = ConstCounter::new(s.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu",
            "Total user and system CPU time spent in seconds",
            Some(&Unit::Seconds),
            cpu.metric_type(),
        )?)?;
        let gauges: [(&str, &str, Option<Unit>, i64); 4] = [
            ("process_resident_memory", "Resident memory size in bytes", Some(Unit::Bytes), s.resident_bytes),
            ("process_virtual_memory", "Virtual memory size in bytes", Some(Unit::Bytes), s.virtual_bytes),
            ("process_open_fds", "Number of open file descriptors", None, s.open_fds),
            ("process_max_fds", "Maximum number of open file descriptors", None, s.max_fds),
        ];
        for (name, help, unit, v) in gauges {
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(name, help, unit.as_ref(), g.metric_type())?)?;
        }
        let start = ConstGauge::new(s.start_time_seconds);
        start.encode(encoder.encode_descriptor(
            "process_start_time",
            "Start time of the process since unix epoch in seconds",
            Some(&Unit::Seconds),
            start.metric_type(),
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_in_comm() {
        let stat = "4242 (my (odd) prog) S 1 4242 4242 0 -1 4194560 500 0 0 0 150 50 0 0 20 0 3 0 \
                    1000 104857600 2560 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let (cpu, rss, vsize, start) = parse_stat(stat, 100.0, 4096, 1_700_000_000.0).unwrap();
        assert_eq!(cpu, 2.0);
        assert_eq!(rss, 2560 * 4096);
        assert_eq!(vsize, 104_857_600);
        assert_eq!(start, 1_700_000_010.0);
    }

    #[test]
    fn reads_this_process() {
        let s = read().expect("read /proc/self");
        assert!(s.resident_bytes > 0 && s.open_fds > 0 && s.max_fds > 0, "{s:?}");
        assert!(s.start_time_seconds > 1_600_000_000.0, "{s:?}");
    }
}
