//! The benchmark's phases, in order: warm-up, interleaved throughput rounds, first-line
//! latency, kernel time (BPF stats, dedicated rounds), idle cost, ordinary traffic.
use std::{
    collections::HashMap,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use bindtrace_tests::{Hook, snmp_out_rsts};

use crate::{
    Lab, Options, SERVER_PORT, bpfstats,
    load::{self, Load, Shape},
    procfs::{self, Sched},
    report::{BpfRun, FloodRound, IdleRun, LatencyRun, Report},
    stats::Latency,
    tracer::{BPFTRACE_COUNT, BPFTRACE_EMPTY, Config, Running, Startup},
};

/// bindtrace's default fold window: a folded line is due this long after the key's last line.
const FOLD_WINDOW_NS: u64 = 1_000_000_000;

pub const THROUGHPUT_CONFIGS: [Config; 4] = [
    Config::NoTracer,
    Config::Bindtrace(Hook::TcpSendReset),
    Config::Bindtrace(Hook::KfreeSkb),
    Config::Bpftrace(BPFTRACE_COUNT),
];

pub fn run_all(lab: &Lab, o: &Options) -> anyhow::Result<Report> {
    let mut report = Report::new(o);
    eprintln!("bindtrace-bench: warm-up");
    flood(lab, o, o.seconds.min(1.0), (SERVER_PORT, SERVER_PORT))?;

    if o.runs("throughput") {
        throughput(lab, o, &mut report)?;
    }

    let (moderate_keys, max_keys) = if o.short { (300u16, 1000u16) } else { (3000, 10000) };
    for hook in [Hook::TcpSendReset, Hook::KfreeSkb].into_iter().filter(|_| o.runs("latency")) {
        eprintln!("bindtrace-bench: first-line latency, {}", hook.arg());
        report.latency.push(latency_run(lab, o, hook, "1 000 new keys/s", 30000, moderate_keys, Some(1000))?);
        // The maximum rate is also the ksoftirqd-heavy run: past a few thousand packets per
        // softirq pass the kernel defers the rest of its receive work to ksoftirqd.
        report.latency.push(latency_run(lab, o, hook, "maximum rate", 40000, max_keys, None)?);
        // With RPS on the container's interface its receive path (the SYN, the refusal, the
        // reset) runs on the other CPU, in whatever task was running there: who is "current"
        // at the refusal is then not the connector. The connector column says whether the
        // attribution holds.
        // Not in the smoke run: with RPS steering the refusals to the CPU bindtrace and the
        // harness share, the kernel ran no tracing program (ours or bpftrace's) for some of the
        // resets the container sent, about 1 % at the maximum rate and now and then one at
        // 1 000 new keys/s (see BENCHMARKS.md); the full run reports that as a failure until
        // it is understood.
        if !o.short {
            let _rps = Rps::steer(&lab.ctr.ns, "eth0", o.tracer_cpu)?;
            report.latency.push(latency_run(
                lab,
                o,
                hook,
                "1 000 new keys/s, RPS on",
                20000,
                moderate_keys,
                Some(1000),
            )?);
            report.latency.push(latency_run(lab, o, hook, "maximum rate, RPS on", 50000, max_keys, None)?);
        }
    }

    if o.runs("bpf") {
        let _stats = bpfstats::StatsEnabled::on()?;
        for config in [
            Config::Bindtrace(Hook::TcpSendReset),
            Config::Bindtrace(Hook::KfreeSkb),
            Config::Bpftrace(BPFTRACE_COUNT),
            Config::Bpftrace(BPFTRACE_EMPTY),
        ] {
            eprintln!("bindtrace-bench: kernel time (bpf_stats), {}", config.label());
            report.bpf.push(bpf_round(lab, o, config)?);
        }
    }

    if o.runs("idle") {
        eprintln!("bindtrace-bench: idle");
        report.idle = Some(idle_run(lab, o)?);
    }

    // Last: its DNAT rule turns conntrack on in the host namespace, which would change the
    // other phases' reset path.
    if o.runs("ordinary") {
        eprintln!("bindtrace-bench: ordinary traffic");
        crate::ordinary::run(lab, o, &mut report)?;
    }
    Ok(report)
}

/// Each round runs every tracer between two runs without one (none, A, none, B, none, C, then
/// the next round's first none): the machine's speed drifts by several percent over seconds
/// (a shared VM), so each run is compared with the mean of the no-tracer runs on either side.
fn throughput(lab: &Lab, o: &Options, report: &mut Report) -> anyhow::Result<()> {
    let tracers: Vec<Config> = THROUGHPUT_CONFIGS.into_iter().filter(|c| *c != Config::NoTracer).collect();
    let mut baseline = vec![throughput_round(lab, o, Config::NoTracer, &mut report.startups)?];
    let mut runs: Vec<(Config, FloodRound, usize)> = Vec::new();
    for round in 1..=o.rounds {
        for &config in &tracers {
            eprintln!("bindtrace-bench: round {round}/{}: {}", o.rounds, config.label());
            let r = throughput_round(lab, o, config, &mut report.startups)?;
            runs.push((config, r, baseline.len() - 1));
            baseline.push(throughput_round(lab, o, Config::NoTracer, &mut report.startups)?);
        }
    }
    for (config, mut r, before) in runs {
        let around =
            (baseline[before].load.refused_per_sec + baseline[before + 1].load.refused_per_sec) / 2.0;
        r.ratio = Some(r.load.refused_per_sec / around);
        report.throughput.entry(config.label()).or_default().push(r);
    }
    report.throughput.insert(Config::NoTracer.label(), baseline);
    Ok(())
}

/// The generator alone, hammering `ports` on the container, for `seconds`.
fn flood(lab: &Lab, o: &Options, seconds: f64, ports: (u16, u16)) -> anyhow::Result<Load> {
    let shape = Shape { target: lab.ctr.ipv4, ports, seconds, rate: None, max: None, extra: &[] };
    load::run(&lab.topo.host, o.gen_cpu, &shape)
}

fn throughput_round(
    lab: &Lab,
    o: &Options,
    config: Config,
    startups: &mut Vec<Startup>,
) -> anyhow::Result<FloodRound> {
    let rsts_before = snmp_out_rsts(&lab.ctr.ns);
    let tracer = Running::start(config, &lab.topo.host, o.tracer_cpu, &[])?;
    startups.extend(tracer.startup());
    let pid = tracer.pid();
    let sched_before = pid.map(Sched::read);
    let load = flood(lab, o, o.seconds, (SERVER_PORT, SERVER_PORT))?;
    let cpu = pid.zip(sched_before).map(|(p, b)| Sched::read(p).since(b));
    let peak_rss_kib = pid.map(procfs::peak_rss_kib);
    let stopped = tracer.stop()?;
    let out_rsts = snmp_out_rsts(&lab.ctr.ns) - rsts_before;
    if load.refused == 0 {
        anyhow::bail!("{}: the generator saw no refusals: {load:?}", config.label());
    }
    Ok(FloodRound {
        load,
        out_rsts,
        counted: stopped.counted,
        lost_samples: stopped.lost_samples,
        cpu,
        peak_rss_kib,
        folded_delays: folded_delays(&stopped.lines),
        ratio: None,
    })
}

/// For each line after a key's first: how long after its fold window closed it was read.
/// Lines read before the window closed are the exit's final flush and are left out.
fn folded_delays(lines: &[(u64, serde_json::Value)]) -> Vec<u64> {
    let mut last: HashMap<(u64, u64), u64> = HashMap::new();
    let mut delays = Vec::new();
    for (read_ns, l) in lines {
        let key = (l["netns_cookie"].as_u64().unwrap_or(0), l["target_port"].as_u64().unwrap_or(0));
        if let Some(prev) = last.insert(key, *read_ns) {
            let due = prev + FOLD_WINDOW_NS;
            if *read_ns >= due {
                delays.push(read_ns - due);
            }
        }
    }
    delays
}

/// Refusals to `keys` new ports from `first_port` on, at `rate` per second (None: as fast as
/// possible); the latency from each port's first refusal (`ktime_ns`) to its first line.
fn latency_run(
    lab: &Lab,
    o: &Options,
    hook: Hook,
    label: &'static str,
    first_port: u16,
    keys: u16,
    rate: Option<u32>,
) -> anyhow::Result<LatencyRun> {
    let ports = (first_port, first_port + keys - 1);
    let rsts_before = snmp_out_rsts(&lab.ctr.ns);
    let tracer = Running::start(Config::Bindtrace(hook), &lab.topo.host, o.tracer_cpu, &[])?;
    let (seconds, max) = match rate {
        // Each port once: every attempt is a new key.
        Some(r) => (keys as f64 / r as f64 + 5.0, Some(keys as u64)),
        None => (o.seconds.min(2.0), None),
    };
    let shape = Shape { target: lab.ctr.ipv4, ports, seconds, rate, max, extra: &[] };
    let load = load::run(&lab.topo.host, o.gen_cpu, &shape)?;
    // Lines may still be on their way for a burst of new keys: wait for every port's first.
    let deadline = Instant::now() + Duration::from_secs(60);
    let Running::Bindtrace { bt, .. } = &tracer else { unreachable!() };
    // Per port: the first line's latency (u64::MAX without a sample) and whether it named the
    // load generator as the connecting process.
    let mut first: HashMap<u16, (u64, bool)> = HashMap::new();
    // Only the lines read since the last look: copying all of them every 50 ms held the
    // reader thread's lock long enough, with 10 000 lines, to be part of what was measured.
    // And parsed only once enough have been read to complete the count: the harness shares
    // bindtrace's CPU, and parsing each line as it came took a third of that CPU in a burst.
    let mut seen = 0;
    loop {
        let missing = keys as usize - first.len();
        if bt.lines_read() < seen + missing && Instant::now() <= deadline {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let new = bt.stamped_lines_from(seen);
        seen += new.len();
        for (read_ns, l) in new {
            let Some(port) = l["target_port"].as_u64().map(|p| p as u16) else { continue };
            if l["event"] == "refused" && (ports.0..=ports.1).contains(&port) {
                let ktime = l["ktime_ns"].as_u64().unwrap_or(0);
                let latency = if ktime > 0 { read_ns.saturating_sub(ktime) } else { u64::MAX };
                let connector =
                    l["client_process"]["comm"].as_str().is_some_and(|c| c.starts_with(LOADGEN_COMM));
                first.entry(port).or_insert((latency, connector));
            }
        }
        if first.len() >= keys as usize || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    settle_out_rsts(&lab.ctr.ns);
    let stopped = tracer.stop()?;
    let out_rsts = snmp_out_rsts(&lab.ctr.ns) - rsts_before;
    let without_sample = first.values().filter(|(v, _)| *v == u64::MAX).count();
    let connector_named = first.values().filter(|(_, named)| *named).count();
    Ok(LatencyRun {
        hook,
        label,
        keys: keys as usize,
        keys_with_line: first.len(),
        without_sample,
        connector_named,
        first_line: Latency::of(first.into_values().map(|(v, _)| v).filter(|&v| v != u64::MAX).collect()),
        load,
        out_rsts,
        counted: stopped.counted.unwrap_or(0),
        lost_samples: stopped.lost_samples,
    })
}

/// Waits until the container has sent its last reset: with RPS on, up to a backlog queue of
/// SYNs (net.core.netdev_max_backlog, 1 000) is still waiting on the other CPU when the load
/// generator is done, and a tracer stopped then would miss the resets they cause.
fn settle_out_rsts(ns: &bindtrace_tests::net::Netns) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = snmp_out_rsts(ns);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = snmp_out_rsts(ns);
        if now == last {
            return;
        }
        last = now;
    }
}

/// The load generator's comm as the kernel keeps it (15 bytes of `bindtrace-loadgen`).
const LOADGEN_COMM: &str = "bindtrace-loadg";

/// Receive Packet Steering on an interface of a namespace, to one CPU, until dropped.
struct Rps {
    ns: String,
    file: String,
}

impl Rps {
    fn steer(ns: &bindtrace_tests::net::Netns, ifname: &str, cpu: usize) -> anyhow::Result<Rps> {
        // sysfs shows the devices of the namespace it was mounted in: `ip netns exec` mounts
        // one for the namespace.
        let rps = Rps { ns: ns.name.clone(), file: format!("/sys/class/net/{ifname}/queues/rx-0/rps_cpus") };
        rps.write(&format!("{:x}", 1u64 << cpu))?;
        Ok(rps)
    }

    fn write(&self, mask: &str) -> anyhow::Result<()> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "sh", "-c", &format!("echo {mask} > {}", self.file)])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "RPS on {} in {}: {} (a kernel without CONFIG_RPS?)",
            self.file,
            self.ns,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }
}

impl Drop for Rps {
    fn drop(&mut self) {
        let _ = self.write("0");
    }
}

/// A flood with BPF run-time accounting on; for kfree-skb also a burst of drops that are not
/// refusals in scope (UDP to a closed loopback port), to price the hook on other traffic. The
/// same for tcp-send-reset, where bt_kfree_skb runs as a second program (UDP only): its cost on
/// those drops is what counting UDP adds to that hook.
fn bpf_round(lab: &Lab, o: &Options, config: Config) -> anyhow::Result<BpfRun> {
    let rsts_before = snmp_out_rsts(&lab.ctr.ns);
    let tracer = Running::start(config, &lab.topo.host, o.tracer_cpu, &[])?;
    let pid = tracer.pid().expect("a tracer");
    let before = bpfstats::of_process(pid);
    flood(lab, o, o.seconds, (SERVER_PORT, SERVER_PORT))?;
    let after = bpfstats::of_process(pid);
    let refusals = snmp_out_rsts(&lab.ctr.ns) - rsts_before;
    let on_kfree_skb = matches!(config, Config::Bindtrace(Hook::KfreeSkb | Hook::TcpSendReset));
    let (unrelated, ordinary) = if on_kfree_skb {
        let count = if o.short { 20_000 } else { 200_000 };
        load::udp_drops(&lab.topo.host, count);
        let dropped = bpfstats::of_process(pid);
        let connections = if o.short { 200 } else { 2_000 };
        load::ordinary_tcp(&lab.topo.host, connections);
        (
            Some((count, bpfstats::delta(&after, &dropped))),
            Some((connections, bpfstats::delta(&dropped, &bpfstats::of_process(pid)))),
        )
    } else {
        (None, None)
    };
    tracer.stop()?;
    Ok(BpfRun { config, refusals, progs: bpfstats::delta(&before, &after), unrelated, ordinary })
}

fn idle_run(lab: &Lab, o: &Options) -> anyhow::Result<IdleRun> {
    let seconds = if o.short { 2.0 } else { 10.0 };
    let tracer = Running::start(Config::Bindtrace(Hook::TcpSendReset), &lab.topo.host, o.tracer_cpu, &[])?;
    let pid = tracer.pid().expect("bindtrace");
    std::thread::sleep(Duration::from_secs(1));
    let before = procfs::threads(pid);
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let after = procfs::threads(pid);
    let rss = procfs::peak_rss_kib(pid);
    tracer.stop()?;
    let mut per_thread: Vec<(String, Sched)> = Vec::new();
    for (i, (name, a)) in after.iter().enumerate() {
        let b = before.get(i).map(|(_, s)| *s).unwrap_or_default();
        per_thread.push((name.clone(), a.since(b)));
    }
    Ok(IdleRun { seconds, per_thread, peak_rss_kib: rss })
}

/// Mounts tracefs where bpftrace looks for tracepoints when the machine has not (and unmounts
/// it afterwards); leaves an existing mount alone.
pub struct TracefsMount {
    mounted: bool,
}

const TRACEFS: &str = "/sys/kernel/tracing";

impl TracefsMount {
    pub fn ensure() -> anyhow::Result<TracefsMount> {
        if Path::new(TRACEFS).join("events").exists() {
            return Ok(TracefsMount { mounted: false });
        }
        let status = Command::new("mount").args(["-t", "tracefs", "nodev", TRACEFS]).status()?;
        if !status.success() {
            anyhow::bail!("mounting tracefs on {TRACEFS} for bpftrace failed");
        }
        Ok(TracefsMount { mounted: true })
    }
}

impl Drop for TracefsMount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(TRACEFS).status();
        }
    }
}
