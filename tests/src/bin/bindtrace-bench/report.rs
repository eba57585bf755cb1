//! The figures, as markdown tables, and the behaviour checks a run must pass.
use std::{collections::BTreeMap, fmt::Write as _, process::Command};

use bindtrace_tests::Hook;

use crate::{
    Options,
    bpfstats::ProgStats,
    load::Load,
    ordinary::{ORDINARY_CONFIGS, SCENARIOS, Scenario, Wrk},
    phases::THROUGHPUT_CONFIGS,
    procfs::Sched,
    stats::{Latency, Spread},
    tracer::{Config, Startup},
};

/// One flood under one configuration.
#[derive(Debug)]
pub struct FloodRound {
    pub load: Load,
    /// The container's `Tcp OutRsts` delta: the resets that really happened.
    pub out_rsts: u64,
    pub counted: Option<u64>,
    pub lost_samples: u64,
    pub cpu: Option<Sched>,
    pub peak_rss_kib: Option<u64>,
    pub folded_delays: Vec<u64>,
    /// Refusals/s over the mean of the no-tracer runs just before and just after.
    pub ratio: Option<f64>,
}

pub struct LatencyRun {
    pub hook: Hook,
    pub label: &'static str,
    pub keys: usize,
    pub keys_with_line: usize,
    /// First lines whose sample was lost (the count came from the periodic read).
    pub without_sample: usize,
    /// First lines that named the load generator as the process that connected.
    pub connector_named: usize,
    pub first_line: Latency,
    pub load: Load,
    pub out_rsts: u64,
    pub counted: u64,
    pub lost_samples: u64,
}

pub struct BpfRun {
    pub config: Config,
    pub refusals: u64,
    pub progs: Vec<ProgStats>,
    /// kfree-skb only: datagrams sent to a closed port out of scope, and the programs' runs then.
    pub unrelated: Option<(u32, Vec<ProgStats>)>,
    /// kfree-skb only: ordinary TCP connections on loopback, and the programs' runs then.
    pub ordinary: Option<(u32, Vec<ProgStats>)>,
}

pub struct IdleRun {
    pub seconds: f64,
    pub per_thread: Vec<(String, Sched)>,
    pub peak_rss_kib: u64,
}

/// One wrk run of the ordinary-traffic phase.
#[derive(Debug)]
pub struct OrdinaryRun {
    pub scenario: Scenario,
    pub config: Config,
    pub wrk: Wrk,
    /// The tracer's CPU time during the run (schedstat).
    pub cpu: Option<Sched>,
    /// Requests/s over the mean of the no-tracer runs of the same scenario around it.
    pub ratio: Option<f64>,
}

/// One start of a configuration in the ordinary-traffic phase and the runs under it.
#[derive(Debug)]
pub struct OrdinarySession {
    pub config: Config,
    pub runs: Vec<OrdinaryRun>,
    /// What the tracer counted in all (bindtrace: the sum of its refused lines' counts).
    pub counted: Option<u64>,
    /// bindtrace's refused lines: a healthy server must have none.
    pub refused_lines: usize,
    /// The container namespace's `Tcp OutRsts` delta over the session.
    pub out_rsts: u64,
}

/// bpf_stats of bindtrace's programs during one-connection-per-request ordinary traffic.
pub struct OrdinaryBpf {
    pub hook: Hook,
    pub scenario: Scenario,
    pub wrk: Wrk,
    pub progs: Vec<ProgStats>,
    pub counted: Option<u64>,
}

pub struct Report {
    pub command: String,
    pub throughput: BTreeMap<String, Vec<FloodRound>>,
    pub latency: Vec<LatencyRun>,
    pub bpf: Vec<BpfRun>,
    pub idle: Option<IdleRun>,
    pub startups: Vec<Startup>,
    pub ordinary: Vec<OrdinarySession>,
    pub ordinary_bpf: Vec<OrdinaryBpf>,
}

/// bindtrace's throughput over bpftrace's, round by round: the median and the lowest (the issue's targets).
const BPFTRACE_MEDIAN: f64 = 1.00;
const BPFTRACE_LOWEST: f64 = 0.995;
const LATENCY_P99_NS: u64 = 10_000_000;
const PEAK_RSS_KIB: u64 = 16 * 1024;
const ATTACHED_MS: f64 = 50.0;
/// bindtrace's requests/s on ordinary traffic, as a share of no tracer's (the issue's target).
const ORDINARY_TARGET: f64 = 0.99;

impl Report {
    pub fn new(o: &Options) -> Report {
        let command = if o.short {
            "sudo ./x bench --short".to_owned()
        } else {
            format!("sudo ./x bench --rounds {} --seconds {}", o.rounds, o.seconds)
        };
        Report {
            command,
            throughput: BTreeMap::new(),
            latency: Vec::new(),
            bpf: Vec::new(),
            idle: None,
            startups: Vec::new(),
            ordinary: Vec::new(),
            ordinary_bpf: Vec::new(),
        }
    }

    fn rounds(&self, c: Config) -> &[FloodRound] {
        self.throughput.get(&c.label()).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Every flood of either bindtrace configuration.
    fn bindtrace_rounds(&self) -> impl Iterator<Item = &FloodRound> {
        bindtrace_configs().flat_map(|c| self.rounds(c))
    }

    /// `c`'s throughput relative to no tracer, per round (each run against the no-tracer runs
    /// on either side of it), or relative to `base`'s in the same round.
    fn ratios(&self, c: Config, base: Config) -> Spread {
        let own = self.rounds(c).iter().filter_map(|r| r.ratio);
        let r: Vec<f64> = if base == Config::NoTracer {
            own.collect()
        } else {
            own.zip(self.rounds(base).iter().filter_map(|r| r.ratio)).map(|(a, b)| a / b).collect()
        };
        Spread::of(&r)
    }

    /// What must hold for the run to count as working (behaviour, not speed).
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        for c in THROUGHPUT_CONFIGS {
            if let Config::Bindtrace(h) = c {
                for (i, r) in self.rounds(c).iter().enumerate() {
                    if r.counted != Some(r.out_rsts) {
                        f.push(format!(
                            "{} round {}: counted {:?} refusals, the container sent {} resets",
                            h.arg(),
                            i + 1,
                            r.counted,
                            r.out_rsts
                        ));
                    }
                }
            }
        }
        for l in &self.latency {
            if l.keys_with_line < l.keys {
                f.push(format!(
                    "{} {}: lines for {} of {} new keys",
                    l.hook.arg(),
                    l.label,
                    l.keys_with_line,
                    l.keys
                ));
            }
            if l.counted != l.out_rsts {
                f.push(format!(
                    "{} {}: counted {} of {} resets",
                    l.hook.arg(),
                    l.label,
                    l.counted,
                    l.out_rsts
                ));
            }
        }
        for b in &self.bpf {
            if b.progs.iter().all(|p| p.runs == 0) {
                f.push(format!("{}: no program run was accounted", b.config.label()));
            }
            // bindtrace as users run it includes the connect tracker: measure it, or fail.
            if matches!(b.config, Config::Bindtrace(_))
                && !b.progs.iter().any(|p| p.name.contains("receive_re") && p.runs > 0)
            {
                f.push(format!("{}: the connect tracker (tcp_receive_reset) did not run", b.config.label()));
            }
        }
        self.ordinary_failures(&mut f);
        f
    }

    /// A healthy server: every request answered 2xx, no connect error, and bindtrace refused
    /// nothing (no line, a count of 0, after its exit flush); its connect tracker ran.
    fn ordinary_failures(&self, f: &mut Vec<String>) {
        for s in &self.ordinary {
            for r in &s.runs {
                let w = &r.wrk;
                if w.requests == 0 || w.non_2xx > 0 || w.errors[0] > 0 {
                    f.push(format!(
                        "ordinary traffic, {}, {}: {} requests, {} not 2xx, {} connect errors",
                        r.scenario.label(),
                        s.config.label(),
                        w.requests,
                        w.non_2xx,
                        w.errors[0]
                    ));
                }
            }
            if let Config::Bindtrace(h) = s.config
                && (s.refused_lines > 0 || s.counted != Some(0))
            {
                f.push(format!(
                    "ordinary traffic, bindtrace --hook {}: {} refused line(s), counted {:?}, for a server that refuses nothing",
                    h.arg(),
                    s.refused_lines,
                    s.counted
                ));
            }
        }
        for b in &self.ordinary_bpf {
            if b.wrk.requests == 0 || b.counted != Some(0) {
                f.push(format!(
                    "ordinary traffic (bpf_stats), {}, {}: {} requests, counted {:?}",
                    b.hook.arg(),
                    b.scenario.label(),
                    b.wrk.requests,
                    b.counted
                ));
            }
            // Connections that succeed receive no reset: the tracker is loaded, and idle.
            if !b.progs.iter().any(|p| p.name.contains("receive_re")) {
                f.push(format!(
                    "ordinary traffic (bpf_stats), {}: the connect tracker (tcp_receive_reset) is not loaded",
                    b.hook.arg()
                ));
            }
        }
    }

    /// The ordinary-traffic runs of `c` under `scenario`.
    fn ordinary_runs(&self, c: Config, scenario: Scenario) -> impl Iterator<Item = &OrdinaryRun> {
        self.ordinary
            .iter()
            .flat_map(|s| s.runs.iter())
            .filter(move |r| r.config == c && r.scenario == scenario)
    }

    fn ordinary_ratios(&self, c: Config, scenario: Scenario) -> Spread {
        Spread::of(&self.ordinary_runs(c, scenario).filter_map(|r| r.ratio).collect::<Vec<_>>())
    }

    pub fn markdown(&self, o: &Options) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "## Run\n");
        let _ = writeln!(s, "Command: `{}`  ", self.command);
        let _ = writeln!(s, "{}\n", machine());
        let _ = writeln!(
            s,
            "Load: `bindtrace-loadgen`, one thread on CPU {} (the kernel's reset path runs there too: a veth \
             delivers in the sender's softirq), non-blocking connects with up to 64 in flight, each kept until \
             its reset arrives; the tracer, the harness and the loopback-bound server on CPU {}. Floods of {} s \
             against 172.17.0.2:{} (a server bound to 127.0.0.1:{} in the container namespace), {} round(s); \
             each tracer's run sits between two runs without a tracer and is compared with their mean. \
             Ground truth: the container namespace's `Tcp OutRsts` delta.\n",
            o.gen_cpu,
            o.tracer_cpu,
            o.seconds,
            crate::SERVER_PORT,
            crate::SERVER_PORT,
            o.rounds
        );
        self.throughput_table(&mut s);
        self.bpf_table(&mut s);
        self.latency_table(&mut s);
        self.resources_table(&mut s);
        self.ordinary_table(&mut s, o);
        if o.short {
            let _ = writeln!(
                s,
                "### Targets\n\nA smoke run (one round, 1 s floods): it checks that the harness works; its figures are not a measurement.\n"
            );
        } else {
            self.targets_table(&mut s);
        }
        s
    }

    fn throughput_table(&self, s: &mut String) {
        let _ = writeln!(s, "### Throughput\n");
        let _ = writeln!(
            s,
            "| configuration | runs | refusals/s seen by the client, median [min–max] | ratio to the no-tracer runs around it, median [min–max] | resets counted / sent (OutRsts) | samples lost | tracer peak RSS |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        for c in THROUGHPUT_CONFIGS {
            let rounds = self.rounds(c);
            if rounds.is_empty() {
                continue;
            }
            let rate = Spread::of(&rounds.iter().map(|r| r.load.refused_per_sec).collect::<Vec<_>>());
            let ratio = if c == Config::NoTracer {
                "1".to_owned()
            } else {
                let r = self.ratios(c, Config::NoTracer);
                format!("{:.3} [{:.3}–{:.3}]", r.median, r.min, r.max)
            };
            let counted: u64 = rounds.iter().filter_map(|r| r.counted).sum();
            let sent: u64 = rounds.iter().map(|r| r.out_rsts).sum();
            let exact = match c {
                Config::NoTracer => format!("– / {sent}"),
                _ => {
                    let exact_rounds = rounds.iter().filter(|r| r.counted == Some(r.out_rsts)).count();
                    format!("{counted} / {sent} ({exact_rounds}/{} rounds exact)", rounds.len())
                }
            };
            let lost = match c {
                Config::Bindtrace(_) => rounds.iter().map(|r| r.lost_samples).sum::<u64>().to_string(),
                _ => "–".into(),
            };
            let rss = match rounds.iter().filter_map(|r| r.peak_rss_kib).max() {
                Some(kib) => format!("{:.1} MiB", kib as f64 / 1024.0),
                None => "–".into(),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} [{:.0}–{:.0}] | {ratio} | {exact} | {lost} | {rss} |",
                c.label(),
                rounds.len(),
                rate.median,
                rate.min,
                rate.max
            );
        }
        let _ = writeln!(s);
        let delays: Vec<u64> =
            self.bindtrace_rounds().flat_map(|r| r.folded_delays.iter().copied()).collect();
        let d = Latency::of(delays);
        let _ = writeln!(
            s,
            "Folded lines (the hammered key, one line per 1 s fold window): read {} after their window closed at \
             p50, {} at p99, {} at most ({} lines).\n",
            ms(d.p50),
            ms(d.p99),
            ms(d.max),
            d.n
        );
    }

    fn bpf_table(&self, s: &mut String) {
        let _ = writeln!(s, "### Kernel time (kernel.bpf_stats_enabled, dedicated rounds)\n");
        let _ = writeln!(
            s,
            "bpf_stats adds two clock reads to every run; the empty bpftrace program shows that floor.\n"
        );
        let _ =
            writeln!(s, "| configuration | program | runs | ns per run | refusals | run time per refusal |");
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for b in &self.bpf {
            for p in &b.progs {
                let per_run =
                    if p.runs > 0 { format!("{:.0}", p.run_ns as f64 / p.runs as f64) } else { "–".into() };
                let per_refusal = if b.refusals > 0 {
                    format!("{:.0} ns", p.run_ns as f64 / b.refusals as f64)
                } else {
                    "–".into()
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {per_run} | {} | {per_refusal} |",
                    b.config.label(),
                    p.name,
                    p.runs,
                    b.refusals
                );
            }
            if let Some((connections, progs)) = &b.ordinary {
                let runs: u64 = progs.iter().filter(|p| p.name.contains("kfree")).map(|p| p.runs).sum();
                let _ = writeln!(
                    s,
                    "| {} on {connections} ordinary TCP connections (64 bytes each way, loopback) | bt_kfree_skb | {runs} | {} | – | – |",
                    b.config.label(),
                    progs
                        .iter()
                        .find(|p| p.name.contains("kfree") && p.runs > 0)
                        .map_or("–".into(), |p| format!("{:.0}", p.run_ns as f64 / p.runs as f64))
                );
            }
            if let Some((sent, progs)) = &b.unrelated {
                for p in progs.iter().filter(|p| p.runs > 0) {
                    let _ = writeln!(
                        s,
                        "| {} on {sent} UDP datagrams to a closed port out of scope | {} | {} | {:.0} | – | – |",
                        b.config.label(),
                        p.name,
                        p.runs,
                        p.run_ns as f64 / p.runs as f64
                    );
                }
            }
        }
        let _ = writeln!(s);
    }

    fn latency_table(&self, s: &mut String) {
        let _ = writeln!(s, "### Latency from the refusal (ktime_ns) to its first line\n");
        let _ = writeln!(
            s,
            "| hook | new keys | load | keys with a line | connector named (the load generator) | p50 | p99 | max | counted / sent | samples lost |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
        for l in &self.latency {
            let no_sample = if l.without_sample > 0 {
                format!(" ({} without a sample)", l.without_sample)
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} ({:.0} refusals/s) | {}{no_sample} | {} of {} | {} | {} | {} | {} / {} | {} |",
                l.hook.arg(),
                l.keys,
                l.label,
                l.load.refused_per_sec,
                l.keys_with_line,
                l.connector_named,
                l.keys_with_line,
                ms(l.first_line.p50),
                ms(l.first_line.p99),
                ms(l.first_line.max),
                l.counted,
                l.out_rsts,
                l.lost_samples
            );
        }
        let _ = writeln!(s);
    }

    fn resources_table(&self, s: &mut String) {
        let _ = writeln!(s, "### bindtrace itself\n");
        let _ = writeln!(s, "| figure | value |");
        let _ = writeln!(s, "|---|---|");
        for c in bindtrace_configs() {
            let rounds = self.rounds(c);
            let cpu = Spread::of(
                &rounds
                    .iter()
                    .filter_map(|r| r.cpu.map(|c| c.run_ns as f64 / 1e6 / r.load.seconds))
                    .collect::<Vec<_>>(),
            );
            let _ = writeln!(
                s,
                "| CPU during the flood, {} | {:.1} ms per second [{:.1}–{:.1}] |",
                c.label(),
                cpu.median,
                cpu.min,
                cpu.max
            );
        }
        let peak = self.peak_rss_kib();
        let _ =
            writeln!(s, "| peak RSS (VmHWM), over every bindtrace flood | {:.1} MiB |", peak as f64 / 1024.0);
        if let Some(idle) = &self.idle {
            let total = idle.per_thread.iter().fold(Sched::default(), |a, (_, t)| Sched {
                run_ns: a.run_ns + t.run_ns,
                timeslices: a.timeslices + t.timeslices,
            });
            let busy: Vec<String> = idle
                .per_thread
                .iter()
                .filter(|(_, t)| t.timeslices > 0)
                .map(|(n, t)| format!("{n} {}", t.timeslices))
                .collect();
            let _ =
                writeln!(s, "| idle {} s: CPU | {:.2} ms in all |", idle.seconds, total.run_ns as f64 / 1e6);
            let _ = writeln!(
                s,
                "| idle {} s: wake-ups (times a thread was put on a CPU) | {} ({:.2}/s; by thread: {}) |",
                idle.seconds,
                total.timeslices,
                total.timeslices as f64 / idle.seconds,
                if busy.is_empty() { "none".into() } else { busy.join(", ") }
            );
            let _ = writeln!(s, "| idle peak RSS | {:.1} MiB |", idle.peak_rss_kib as f64 / 1024.0);
        }
        let attached: Vec<f64> =
            self.startups.iter().filter_map(|st| st.attached_ns).map(|n| n as f64 / 1e6).collect();
        let ready: Vec<f64> = self.startups.iter().map(|st| st.ready_ns as f64 / 1e6).collect();
        let (a, r) = (Spread::of(&attached), Spread::of(&ready));
        let _ = writeln!(
            s,
            "| start to hook attached (log line), {} starts | median {:.0} ms, max {:.0} ms |",
            a.n, a.median, a.max
        );
        let _ =
            writeln!(s, "| start to `bindtrace: ready` | median {:.0} ms, max {:.0} ms |", r.median, r.max);
        let _ = writeln!(s);
    }

    /// bindtrace's peak RSS over its floods (bpftrace's is in the throughput table).
    fn peak_rss_kib(&self) -> u64 {
        self.bindtrace_rounds().filter_map(|r| r.peak_rss_kib).max().unwrap_or(0)
    }

    fn targets_table(&self, s: &mut String) {
        let _ = writeln!(s, "### Targets\n");
        let _ = writeln!(s, "| target | measured | met |");
        let _ = writeln!(s, "|---|---|---|");
        // The refusal phases' targets, when any of them ran (`--only ordinary` runs none).
        if !self.throughput.is_empty()
            || !self.latency.is_empty()
            || !self.bpf.is_empty()
            || self.idle.is_some()
        {
            let bpftrace = Config::Bpftrace(crate::tracer::BPFTRACE_COUNT);
            for c in bindtrace_configs() {
                let b = self.ratios(c, bpftrace);
                if b.n == 0 {
                    continue;
                }
                let _ = writeln!(
                    s,
                    "| {} throughput / bpftrace's: median ≥ 1.00, lowest ≥ 0.995 | {:.3} [{:.3}–{:.3}] | {} |",
                    c.label(),
                    b.median,
                    b.min,
                    b.max,
                    met(b.median >= BPFTRACE_MEDIAN && b.min >= BPFTRACE_LOWEST)
                );
            }
            let per_refusal = |b: &BpfRun| {
                let ns: u64 = b.progs.iter().map(|p| p.run_ns).sum();
                (b.refusals > 0).then(|| ns as f64 / b.refusals as f64)
            };
            let bpftrace_ns = self.bpf.iter().find(|b| b.config == bpftrace).and_then(per_refusal);
            for b in self.bpf.iter().filter(|b| matches!(b.config, Config::Bindtrace(_))) {
                if let (Some(ours), Some(theirs)) = (per_refusal(b), bpftrace_ns) {
                    let _ = writeln!(
                        s,
                        "| {} kernel time per refusal (all its programs, bpf_stats) ≤ bpftrace's | {ours:.0} ns against {theirs:.0} ns | {} |",
                        b.config.label(),
                        met(ours <= theirs)
                    );
                }
            }
            for l in &self.latency {
                let moderate = l.label.starts_with("1 000");
                let every_sample = l.keys_with_line == l.keys && l.without_sample == 0;
                let (what, ok) = if moderate {
                    ("", l.first_line.p99 <= LATENCY_P99_NS && l.keys_with_line == l.keys)
                } else {
                    (
                        ", every key's line with its sample, no sample lost",
                        l.first_line.p99 <= LATENCY_P99_NS && every_sample && l.lost_samples == 0,
                    )
                };
                let _ = writeln!(
                    s,
                    "| p99 first line ≤ 10 ms, {} new keys at {}{what}, {} | {}; {} of {} keys with a line, {} without a sample, {} samples lost | {} |",
                    l.keys,
                    l.label,
                    l.hook.arg(),
                    ms(l.first_line.p99),
                    l.keys_with_line,
                    l.keys,
                    l.without_sample,
                    l.lost_samples,
                    met(ok)
                );
            }
            let all_exact = self.bindtrace_rounds().all(|r| r.counted == Some(r.out_rsts))
                && self.latency.iter().all(|l| l.counted == l.out_rsts);
            let _ = writeln!(
                s,
                "| counts exact at the maximum rate | every run compared with OutRsts | {} |",
                met(all_exact)
            );
            let peak = self.peak_rss_kib();
            let _ = writeln!(
                s,
                "| bindtrace peak RSS ≤ 16 MiB | {:.1} MiB | {} |",
                peak as f64 / 1024.0,
                met(peak <= PEAK_RSS_KIB)
            );
            if let Some(idle) = &self.idle {
                let wakeups: u64 = idle.per_thread.iter().map(|(_, t)| t.timeslices).sum();
                let _ = writeln!(
                    s,
                    "| no periodic wake-up while idle | {wakeups} wake-ups in {:.0} s | {} |",
                    idle.seconds,
                    met(wakeups == 0)
                );
            }
            let attached: Vec<f64> =
                self.startups.iter().filter_map(|st| st.attached_ns).map(|n| n as f64 / 1e6).collect();
            let a = Spread::of(&attached);
            if a.n > 0 {
                let _ = writeln!(
                    s,
                    "| attached within 50 ms of start, every start | median {:.0} ms [{:.0}–{:.0}] over {} starts | {} |",
                    a.median,
                    a.min,
                    a.max,
                    a.n,
                    met(a.max <= ATTACHED_MS)
                );
            }
        }
        for c in ORDINARY_CONFIGS.into_iter().filter(|c| matches!(c, Config::Bindtrace(_))) {
            for scenario in SCENARIOS {
                let r = self.ordinary_ratios(c, scenario);
                if r.n == 0 {
                    continue;
                }
                // Met only when the whole spread is above it.
                let verdict = met(r.min >= ORDINARY_TARGET);
                let _ = writeln!(
                    s,
                    "| {} requests/s ≥ 0.99 of no tracer, ordinary traffic, {} | {:.3} [{:.3}–{:.3}] | {verdict} |",
                    c.label(),
                    scenario.label(),
                    r.median,
                    r.min,
                    r.max
                );
            }
        }
        let _ = writeln!(s);
    }
}

impl Report {
    fn ordinary_table(&self, s: &mut String, o: &Options) {
        if self.ordinary.is_empty() {
            return;
        }
        let _ = writeln!(s, "### Ordinary traffic (HTTP requests that succeed)\n");
        let _ = writeln!(
            s,
            "nginx (one worker, CPU {}) on 0.0.0.0:{} in the container namespace answers `ok` to every request; \
             `wrk -t1 -c{} -d{}s` on CPU {} in the host namespace, keep-alive or `Connection: close` (one \
             connection per request), to the container's address or to a port published by DNAT (iptables, \
             nat OUTPUT, in the host namespace; conntrack on). {}\n",
            o.tracer_cpu,
            crate::ordinary::HTTP_PORT,
            crate::ordinary::CONNECTIONS,
            if o.short { 1 } else { 3 },
            o.gen_cpu,
            if o.short {
                "Smoke run: each configuration started once for all four scenarios, ratios to the one no-tracer run before them."
            } else {
                "Each tracer run sits between two no-tracer runs of the same scenario and is compared with their mean."
            }
        );
        let _ = writeln!(
            s,
            "| traffic | configuration | runs | requests/s, median [min–max] | ratio to the no-tracer runs around it, median [min–max] | socket errors | tracer CPU, ms per s |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        for scenario in SCENARIOS {
            for c in ORDINARY_CONFIGS {
                let runs: Vec<&OrdinaryRun> = self.ordinary_runs(c, scenario).collect();
                if runs.is_empty() {
                    continue;
                }
                let rate = Spread::of(&runs.iter().map(|r| r.wrk.per_sec).collect::<Vec<_>>());
                let ratio = if c == Config::NoTracer {
                    "1".to_owned()
                } else {
                    let r = self.ordinary_ratios(c, scenario);
                    format!("{:.3} [{:.3}–{:.3}]", r.median, r.min, r.max)
                };
                let errors: u64 = runs.iter().map(|r| r.wrk.errors.iter().sum::<u64>()).sum();
                let cpu = Spread::of(
                    &runs
                        .iter()
                        .filter_map(|r| r.cpu.map(|c| c.run_ns as f64 / 1e6 / r.wrk.seconds))
                        .collect::<Vec<_>>(),
                );
                let cpu = if cpu.n == 0 {
                    "–".into()
                } else {
                    format!("{:.1} [{:.1}–{:.1}]", cpu.median, cpu.min, cpu.max)
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {:.0} [{:.0}–{:.0}] | {ratio} | {errors} | {cpu} |",
                    scenario.label(),
                    c.label(),
                    runs.len(),
                    rate.median,
                    rate.min,
                    rate.max
                );
            }
        }
        let lines: usize = self.ordinary.iter().map(|s| s.refused_lines).sum();
        let rsts: u64 = self.ordinary.iter().map(|s| s.out_rsts).sum();
        let _ = writeln!(
            s,
            "\nbindtrace's refused lines over the phase: {lines} (the server refuses nothing); the container sent {rsts} resets.\n"
        );
        if self.ordinary_bpf.is_empty() {
            return;
        }
        let _ = writeln!(
            s,
            "Kernel time during one-connection-per-request traffic (kernel.bpf_stats_enabled, dedicated runs): \
             each of bindtrace's programs that ran, with its runs per request. The connect tracker \
             (`bt_receive_reset`, on `tcp_receive_reset`) runs only for resets a socket receives, and its \
             parking (`bt_sock_set_state`, every TCP state change) is loaded but not attached unless a reset \
             was processed outside its connecting task: neither appears when the server refuses nothing.\n"
        );
        let _ = writeln!(
            s,
            "| hook | traffic | program | runs | ns per run | runs per request | ns per request |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        for b in &self.ordinary_bpf {
            for p in b.progs.iter().filter(|p| p.runs > 0) {
                let req = b.wrk.requests.max(1) as f64;
                let _ = writeln!(
                    s,
                    "| {} | {} ({} requests) | {} | {} | {:.0} | {:.2} | {:.0} |",
                    b.hook.arg(),
                    b.scenario.label(),
                    b.wrk.requests,
                    p.name,
                    p.runs,
                    p.run_ns as f64 / p.runs as f64,
                    p.runs as f64 / req,
                    p.run_ns as f64 / req
                );
            }
        }
        let _ = writeln!(s);
    }
}

/// The throughput configurations that run bindtrace.
fn bindtrace_configs() -> impl Iterator<Item = Config> {
    THROUGHPUT_CONFIGS.into_iter().filter(|c| matches!(c, Config::Bindtrace(_)))
}

fn met(b: bool) -> &'static str {
    if b { "met" } else { "missed" }
}

fn ms(ns: u64) -> String {
    if ns >= 10_000_000 { format!("{:.0} ms", ns as f64 / 1e6) } else { format!("{:.2} ms", ns as f64 / 1e6) }
}

/// Kernel, CPU, memory, versions: enough to say what the figures were measured on.
fn machine() -> String {
    let sh = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "?".into())
    };
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "?".into());
    // Not available_parallelism: this process is pinned to one CPU.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let bindtrace = sh(&bindtrace_tests::bindtrace::binary(), &["--version"]);
    format!(
        "Machine: Linux {}, {cpus} × {model}, {:.0} GiB; {bindtrace} (commit {}); {}; {}",
        sh("uname", &["-r"]),
        mem_kib as f64 / 1024.0 / 1024.0,
        sh("git", &["rev-parse", "--short", "HEAD"]),
        sh("bpftrace", &["--version"]),
        sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
    )
}
