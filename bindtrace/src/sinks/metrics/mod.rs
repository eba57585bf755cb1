//! Prometheus metrics: what the lines say, as counters and gauges, served on `/metrics`.
//!
//! **Exact by construction.** The kernel's per-key counts are the truth. Every count that reaches
//! a line (see [`crate::sources::fold`]) is added, at the moment the line is written, to
//! `bindtrace_refused_connections_total` under the labels of that line's report; refusals that
//! found the kernel's COUNTS map full (no key, so no line) are added under `other` when the
//! per-CPU overflow slot is read. So at any instant the sum over all series is exactly what the
//! lines written so far add up to plus the overflow, and after the final flush it is the kernel's
//! total. A key's labels are decided when its line is written: its verdict can change over time
//! (a listener that appears later turns `no_listener` into `listening_now`), and then its later
//! refusals count under the new verdict.
//!
//! **Bounded cardinality.** Client addresses and ports never become labels. A container keeps at
//! most `max_ports` `container_port` values of its own (later ports count under
//! `container_port="other"`), and the family holds at most `max_series` label sets (later ones
//! count in the one series whose labels are all `other`). `bindtrace_cardinality_folded_total`
//! says how many refusals each cap folded. Both caps are first come, first served: a series,
//! once created, is never removed (a counter must not go back).
//!
//! The metrics live in `prometheus-client` families (atomics behind a lock that is held only to
//! add a series or to encode); the HTTP side ([`server`]) runs on its own thread and runtime, so
//! a scrape never waits for event processing and event processing never waits for a scrape.
pub(crate) mod process;
pub(crate) mod server;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use bindtrace_common::{AF_INET6, CountKey};
use prometheus_client::{
    encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};

use crate::{
    diagnose::report::{ContainerReport, Report},
    diagnose::verdict::{Decision, Verdict},
};

/// Where metrics are served unless `--metrics-addr` says otherwise: this host's loopback only,
/// on a port outside the exporters' range 9100-9999 (fully allocated on Prometheus's "default
/// port allocations" list) and below Linux's ephemeral range (32768-60999).
pub(crate) const DEFAULT_ADDR: &str = "127.0.0.1:19462";
/// Default cap on label sets of `bindtrace_refused_connections_total` (plus one `other` series).
pub(crate) const DEFAULT_MAX_SERIES: u32 = 1000;
/// Default cap on `container_port` values per container.
pub(crate) const DEFAULT_MAX_PORTS: u32 = 16;
/// The label value that stands for everything a cap (or the kernel's full COUNTS map) folded.
pub(crate) const OTHER: &str = "other";
/// How often loopback-only listeners behind `bindtrace_loopback_listeners` are checked again.
pub(crate) const LOOPBACK_RECHECK: Duration = Duration::from_secs(5);

/// Stages of `bindtrace_events_lost_total`.
pub(crate) const STAGE_KERNEL_RINGBUF: &str = "kernel_ringbuf";
pub(crate) const STAGE_FOLD_WINDOW: &str = "fold_window";
pub(crate) const STAGE_COUNTS_MAP_FULL: &str = "counts_map_full";
/// Hook invocations the kernel skipped because the program was already running on that CPU:
/// refusals among them are not counted anywhere, so this one is a real loss.
pub(crate) const STAGE_KERNEL_RECURSION: &str = "kernel_recursion";
/// Caps of `bindtrace_cardinality_folded_total`.
pub(crate) const CAP_CONTAINER_PORTS: &str = "container_ports";
pub(crate) const CAP_SERIES: &str = "series";

/// Which workload a series is about: the `container` label and, when a runtime names it, the
/// `runtime` label (and `namespace` and `pod` for a Kubernetes pod). Two runtimes may each run
/// a container of one name: they are two workloads, each with its own port budget.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Workload {
    pub(crate) container: String,
    /// `docker`, `podman`, ...; absent (not empty) when no runtime names the namespace.
    pub(crate) runtime: Option<String>,
    /// The pod's Kubernetes namespace and name; absent for anything else.
    pub(crate) namespace: Option<String>,
    pub(crate) pod: Option<String>,
}

impl Workload {
    pub(crate) fn of(report: &Report) -> Workload {
        let mut w = Workload::named(report.docker.container.as_ref());
        w.container = container_label(report);
        w
    }

    fn named(c: Option<&ContainerReport>) -> Workload {
        Workload {
            container: c.map(|c| c.name.clone()).unwrap_or_default(),
            runtime: c.map(|c| c.runtime.as_str().to_owned()),
            namespace: c.and_then(|c| c.namespace.clone()),
            pod: c.and_then(|c| c.pod.clone()),
        }
    }

    fn other() -> Workload {
        Workload { container: OTHER.into(), runtime: Some(OTHER.into()), namespace: None, pod: None }
    }

    /// `namespace`, `pod`, `runtime`, those that are known.
    fn encode_runtime(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        for (name, value) in [("namespace", &self.namespace), ("pod", &self.pod), ("runtime", &self.runtime)]
        {
            if let Some(v) = value {
                (name, v.as_str()).encode(encoder.encode_label())?;
            }
        }
        Ok(())
    }
}

/// Labels of `bindtrace_refused_connections_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct RefusalLabels {
    pub(crate) bridge: String,
    pub(crate) workload: Workload,
    pub(crate) container_port: String,
    /// The published port on the host, when known (from Docker's port map); absent otherwise.
    pub(crate) host_port: Option<String>,
    pub(crate) proto: String,
    pub(crate) verdict: String,
}

impl RefusalLabels {
    pub(crate) fn of(report: &Report) -> RefusalLabels {
        RefusalLabels {
            bridge: report.bridge.clone(),
            workload: Workload::of(report),
            container_port: report.target_port.to_string(),
            host_port: host_port_label(report),
            proto: report.proto.to_owned(),
            verdict: report.verdict.as_str().to_owned(),
        }
    }

    /// The series everything folded goes to.
    pub(crate) fn other() -> RefusalLabels {
        RefusalLabels {
            bridge: OTHER.into(),
            workload: Workload::other(),
            container_port: OTHER.into(),
            host_port: None,
            proto: OTHER.into(),
            verdict: OTHER.into(),
        }
    }
}

impl EncodeLabelSet for RefusalLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("bridge", self.bridge.as_str()).encode(encoder.encode_label())?;
        ("container", self.workload.container.as_str()).encode(encoder.encode_label())?;
        ("container_port", self.container_port.as_str()).encode(encoder.encode_label())?;
        // Absent rather than empty while unknown.
        if let Some(host_port) = &self.host_port {
            ("host_port", host_port.as_str()).encode(encoder.encode_label())?;
        }
        let Workload { namespace, pod, runtime, .. } = &self.workload;
        for (name, value) in [("namespace", namespace), ("pod", pod)] {
            if let Some(v) = value {
                (name, v.as_str()).encode(encoder.encode_label())?;
            }
        }
        ("proto", self.proto.as_str()).encode(encoder.encode_label())?;
        if let Some(runtime) = runtime {
            ("runtime", runtime.as_str()).encode(encoder.encode_label())?;
        }
        ("verdict", self.verdict.as_str()).encode(encoder.encode_label())
    }
}

/// The `container` label: the one place that names a container.
///
/// The Docker container's name when Docker knows the namespace; otherwise the network namespace,
/// `netns:<inode>` (the inode `ls -l /proc/PID/ns/net` shows). `unknown` when even the namespace
/// is unknown.
pub(crate) fn container_label(report: &Report) -> String {
    if let Some(c) = &report.docker.container {
        return c.name.clone();
    }
    if report.netns == 0 { "unknown".into() } else { format!("netns:{}", report.netns) }
}

/// The `host_port` label: the published port the connection used, when Docker says it is
/// published (absent otherwise, never empty).
pub(crate) fn host_port_label(report: &Report) -> Option<String> {
    report.docker.published.as_ref().map(|b| b.host_port.to_string())
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
}

/// Where a count key is held: `kernel` (in the two count maps, at their last walk) or
/// `userspace` (drained from the kernel, kept until its lines are written and it is idle).
#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct HeldLabels {
    held: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct CapLabels {
    cap: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ListenerLabels {
    pub(crate) workload: Workload,
    pub(crate) address: String,
    pub(crate) port: u16,
}

impl EncodeLabelSet for ListenerLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("container", self.workload.container.as_str()).encode(encoder.encode_label())?;
        ("address", self.address.as_str()).encode(encoder.encode_label())?;
        ("port", self.port).encode(encoder.encode_label())?;
        self.workload.encode_runtime(encoder)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    hook: &'static str,
    /// Why that hook (from BTF, or chosen with --hook).
    hook_reason: String,
    kernel: String,
}

/// Settings from the command line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_series: usize,
    pub(crate) max_ports: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_series: DEFAULT_MAX_SERIES as usize, max_ports: DEFAULT_MAX_PORTS as usize }
    }
}

/// A key last judged `loopback_only`, checked again every [`LOOPBACK_RECHECK`].
#[derive(Debug, Clone)]
struct Tracked {
    workload: Workload,
    target: IpAddr,
    listeners: Vec<(IpAddr, u16)>,
    /// When a line last judged it: a recheck asked before that is older news.
    judged: Instant,
}

/// The metric handles and the bookkeeping behind the caps. Owned by the event loop; the
/// registry that encodes the same families belongs to the server thread.
#[derive(Debug)]
pub(crate) struct Metrics {
    refused: Family<RefusalLabels, Counter>,
    lost: Family<StageLabels, Counter>,
    folded: Family<CapLabels, Counter>,
    loopback: Family<ListenerLabels, Gauge>,
    keys: Family<HeldLabels, Gauge>,
    errors: Family<StageLabels, Counter>,
    limits: Limits,
    /// Label sets that have their own series (the `other` series is not among them).
    series: HashSet<RefusalLabels>,
    /// Per workload, the `container_port` values that have series of their own.
    ports: HashMap<Workload, HashSet<String>>,
    /// Kernel counters already accounted for.
    ringbuf_lost_seen: u64,
    overflow_seen: u64,
    recursion_seen: u64,
    tracked: BTreeMap<CountKey, Tracked>,
    /// Loopback-only listeners the proactive audit found, by (workload, container port),
    /// before (or without) any refusal.
    audited: BTreeMap<(Workload, u16), Vec<(IpAddr, u16)>>,
    published: HashSet<ListenerLabels>,
    last_recheck: Option<Instant>,
    /// A recheck is on the worker: no second one until it is back.
    recheck_in_flight: bool,
}

impl Metrics {
    /// The metrics and a registry that encodes them. `hook` and the kernel release go into
    /// `bindtrace_build_info`.
    // Long because it registers every metric with its help text, one after the other.
    pub(crate) fn new(limits: Limits, hook: &'static str, hook_reason: &str) -> (Metrics, Registry) {
        let mut registry = Registry::default();
        let m = Metrics {
            refused: Family::default(),
            lost: Family::default(),
            folded: Family::default(),
            loopback: Family::default(),
            keys: Family::default(),
            errors: Family::default(),
            limits,
            series: HashSet::new(),
            ports: HashMap::new(),
            ringbuf_lost_seen: 0,
            overflow_seen: 0,
            recursion_seen: 0,
            tracked: BTreeMap::new(),
            audited: BTreeMap::new(),
            published: HashSet::new(),
            last_recheck: None,
            recheck_in_flight: false,
        };
        registry.register(
            "bindtrace_refused_connections",
            "Connection attempts to containers refused with a reset because nothing accepted them \
             (exact: from the kernel's per-key counts), by the verdict of the line they were reported in",
            m.refused.clone(),
        );
        registry.register(
            "bindtrace_loopback_listeners",
            "Listeners bound to loopback only behind a published port (found by the audit) or a \
             refused connection, for as long as they still are (1 per listening address)",
            m.loopback.clone(),
        );
        registry.register(
            "bindtrace_events_lost",
            "What did not get a line of its own: samples the kernel ring buffer could not take \
             (kernel_ringbuf), refusals folded into another line's count (fold_window), refusals \
             that found the kernel's count map full (counts_map_full: their lines say \
             \"count unknown\"); every one is still counted in \
             bindtrace_refused_connections_total. Hook invocations the kernel skipped \
             (kernel_recursion) are not",
            m.lost.clone(),
        );
        registry.register(
            "bindtrace_cardinality_folded",
            "Refusals counted under label value \"other\" because a cap was reached: \
             container_ports (--metrics-max-ports) or series (--metrics-max-series)",
            m.folded.clone(),
        );
        registry.register(
            "bindtrace_count_keys",
            "Count keys (namespace, interface, port) bindtrace holds: in the kernel's two count maps \
             (held=kernel, at their last walk; each holds --counts-size) and drained into userspace \
             (held=userspace, until their lines are written and they are idle)",
            m.keys.clone(),
        );
        registry.register(
            "bindtrace_errors",
            "Transient failures after start, by stage: listing the watched ports (rescan), ports the \
             kernel's scope map had no room for (scope, see --scope-size), tc attachments refused \
             (tc_attach), link-notification overruns or failures (link_events), count-map flips \
             that failed (count_flip). Each is logged and retried; bindtrace keeps running",
            m.errors.clone(),
        );
        for stage in crate::app::hiccups::Stage::ALL {
            let _ = m.errors.get_or_create(&StageLabels { stage: stage.label() });
        }
        for held in ["kernel", "userspace"] {
            let _ = m.keys.get_or_create(&HeldLabels { held });
        }
        let build = Info::new(BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
            hook,
            hook_reason: hook_reason.to_owned(),
            kernel: kernel_release(),
        });
        registry.register("bindtrace_build", "bindtrace's version, kernel hook and kernel release", build);
        registry.register_collector(Box::new(process::ProcessCollector));
        // Present from the start, so that rate() and alerts see them before anything happens.
        for stage in [STAGE_KERNEL_RINGBUF, STAGE_FOLD_WINDOW, STAGE_COUNTS_MAP_FULL, STAGE_KERNEL_RECURSION]
        {
            let _ = m.lost.get_or_create(&StageLabels { stage });
        }
        for cap in [CAP_CONTAINER_PORTS, CAP_SERIES] {
            let _ = m.folded.get_or_create(&CapLabels { cap });
        }
        (m, registry)
    }

    /// A line was written: its count goes to its labels (or `other`), and the loopback-only
    /// listeners it names are tracked.
    /// A line of unknown count (the map was full) adds nothing: its refusal is in the overflow
    /// total, which `on_kernel_stats` adds under `other`.
    pub(crate) fn on_line(&mut self, key: &CountKey, report: &Report) {
        if let Some(count) = report.count {
            let (labels, folded_by) = self.admit(RefusalLabels::of(report));
            self.refused.get_or_create(&labels).inc_by(count);
            if let Some(cap) = folded_by {
                self.folded.get_or_create(&CapLabels { cap }).inc_by(count);
            }
            if count > 1 {
                self.lost.get_or_create(&StageLabels { stage: STAGE_FOLD_WINDOW }).inc_by(count - 1);
            }
        }
        self.track(key, report);
    }

    /// `n` transient failures at `stage` (see `app/hiccups.rs`).
    pub(crate) fn on_errors(&mut self, stage: &'static str, n: u64) {
        self.errors.get_or_create(&StageLabels { stage }).inc_by(n);
    }

    /// How many count keys are held where (see [`HeldLabels`]).
    pub(crate) fn on_count_keys(&mut self, kernel: usize, userspace: usize) {
        self.keys.get_or_create(&HeldLabels { held: "kernel" }).set(kernel as i64);
        self.keys.get_or_create(&HeldLabels { held: "userspace" }).set(userspace as i64);
    }

    /// The kernel's cumulative counters (ring-buffer reservations that failed, refusals counted
    /// in the overflow slot because the active count map was full), read just now.
    pub(crate) fn on_kernel_stats(&mut self, ringbuf_lost: u64, overflow: u64, recursion_misses: u64) {
        if recursion_misses > self.recursion_seen {
            self.lost
                .get_or_create(&StageLabels { stage: STAGE_KERNEL_RECURSION })
                .inc_by(recursion_misses - self.recursion_seen);
            self.recursion_seen = recursion_misses;
        }
        if ringbuf_lost > self.ringbuf_lost_seen {
            self.lost
                .get_or_create(&StageLabels { stage: STAGE_KERNEL_RINGBUF })
                .inc_by(ringbuf_lost - self.ringbuf_lost_seen);
            self.ringbuf_lost_seen = ringbuf_lost;
        }
        if overflow > self.overflow_seen {
            let delta = overflow - self.overflow_seen;
            self.refused.get_or_create(&RefusalLabels::other()).inc_by(delta);
            self.lost.get_or_create(&StageLabels { stage: STAGE_COUNTS_MAP_FULL }).inc_by(delta);
            self.overflow_seen = overflow;
        }
    }

    /// The labels a line's count goes to, and the cap that folded them, if any.
    fn admit(&mut self, mut labels: RefusalLabels) -> (RefusalLabels, Option<&'static str>) {
        if self.series.contains(&labels) {
            return (labels, None);
        }
        let mut folded = None;
        let ports = self.ports.get(&labels.workload);
        let own_port = ports.is_some_and(|p| p.contains(&labels.container_port));
        if !own_port && ports.map_or(0, HashSet::len) >= self.limits.max_ports {
            labels.container_port = OTHER.into();
            folded = Some(CAP_CONTAINER_PORTS);
            if self.series.contains(&labels) {
                return (labels, folded);
            }
        }
        if self.series.len() >= self.limits.max_series {
            return (RefusalLabels::other(), Some(CAP_SERIES));
        }
        if folded.is_none() {
            self.ports.entry(labels.workload.clone()).or_default().insert(labels.container_port.clone());
        }
        self.series.insert(labels.clone());
        (labels, folded)
    }

    /// Follows the key's latest verdict: `loopback_only` adds (or refreshes) its listeners,
    /// anything else removes them.
    fn track(&mut self, key: &CountKey, report: &Report) {
        if report.verdict == Verdict::LoopbackOnly {
            if !self.tracked.contains_key(key) && self.tracked.len() >= self.limits.max_series {
                return;
            }
            let unspecified = if key.family == AF_INET6 {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            } else {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            };
            self.tracked.insert(
                *key,
                Tracked {
                    workload: Workload::of(report),
                    target: report.target_ip.unwrap_or(unspecified),
                    listeners: report.listeners.iter().map(|l| (l.ip, l.port)).collect(),
                    judged: Instant::now(),
                },
            );
        } else if self.tracked.remove(key).is_none() {
            return;
        }
        self.publish_loopback();
    }

    /// The tracked listeners to check again (key and target address), when they are due: at
    /// most every [`LOOPBACK_RECHECK`], and not while a check is still out. The answer comes
    /// back through [`Metrics::loopback_rechecked`].
    /// When the loopback gauge's next recheck is due: None while no key is tracked, or while a
    /// recheck is out (its answer wakes the loop).
    pub(crate) fn loopback_recheck_at(&self) -> Option<Instant> {
        if self.tracked.is_empty() || self.recheck_in_flight {
            return None;
        }
        Some(self.last_recheck.map_or_else(Instant::now, |t| t + LOOPBACK_RECHECK))
    }

    pub(crate) fn loopback_recheck_due(&mut self, now: Instant) -> Option<Vec<(CountKey, IpAddr)>> {
        if self.tracked.is_empty()
            || self.recheck_in_flight
            || self.last_recheck.is_some_and(|t| now.duration_since(t) < LOOPBACK_RECHECK)
        {
            return None;
        }
        self.last_recheck = Some(now);
        self.recheck_in_flight = true;
        Some(self.tracked.iter().map(|(k, t)| (*k, t.target)).collect())
    }

    /// What the recheck asked at `asked` found: each key's verdict, or None when its namespace
    /// is gone. A key judged by a line since then keeps that line's word.
    pub(crate) fn loopback_rechecked(&mut self, found: Vec<(CountKey, Option<Decision>)>, asked: Instant) {
        self.recheck_in_flight = false;
        for (key, decision) in found {
            let Some(t) = self.tracked.get_mut(&key) else { continue };
            if t.judged > asked {
                continue;
            }
            match decision {
                Some(d) if d.verdict == Verdict::LoopbackOnly => {
                    t.listeners = d.listeners.iter().map(|l| (l.addr, l.port)).collect();
                }
                _ => {
                    self.tracked.remove(&key);
                }
            }
        }
        self.publish_loopback();
    }

    /// Both halves at once (the tests'; `decide` gives a key's verdict now).
    #[cfg(test)]
    fn recheck_loopback(
        &mut self,
        now: Instant,
        mut decide: impl FnMut(&CountKey, IpAddr) -> Option<Decision>,
    ) {
        let Some(due) = self.loopback_recheck_due(now) else { return };
        let found = due.into_iter().map(|(key, target)| (key, decide(&key, target))).collect();
        self.loopback_rechecked(found, now);
    }

    /// An audit line was written: a published port whose service listens on loopback only
    /// enters the gauge before any client connects; any other verdict for it takes it out.
    pub(crate) fn on_audit(&mut self, report: &crate::diagnose::report::AuditReport) {
        let key = (Workload::named(Some(&report.container)), report.target_port);
        if report.verdict == Verdict::LoopbackOnly.as_str() {
            let listeners = report.listeners.iter().map(|l| (l.ip, l.port)).collect();
            self.audited.insert(key, listeners);
        } else {
            self.audited.remove(&key);
        }
        self.publish_loopback();
    }

    /// Forgets audit findings of containers that are no longer running (`running` is given the
    /// runtime and the container's name).
    pub(crate) fn retain_audited(&mut self, running: impl Fn(&str, &str) -> bool) {
        let before = self.audited.len();
        self.audited.retain(|(w, _), _| running(w.runtime.as_deref().unwrap_or_default(), &w.container));
        if self.audited.len() != before {
            self.publish_loopback();
        }
    }

    /// Brings the gauge in line with the tracked and audited listeners, touching only what
    /// changed (a scrape never sees the set half-built).
    fn publish_loopback(&mut self) {
        let from_refusals = self.tracked.values().map(|t| (&t.workload, &t.listeners));
        let from_audit = self.audited.iter().map(|((workload, _), listeners)| (workload, listeners));
        let now: HashSet<ListenerLabels> = from_refusals
            .chain(from_audit)
            .flat_map(|(workload, listeners)| {
                listeners.iter().map(|(addr, port)| ListenerLabels {
                    workload: workload.clone(),
                    address: addr.to_string(),
                    port: *port,
                })
            })
            .collect();
        for gone in self.published.difference(&now) {
            self.loopback.remove(gone);
        }
        for new in now.difference(&self.published) {
            self.loopback.get_or_create(new).set(1);
        }
        self.published = now;
    }
}

/// `uname -r`.
fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MetricsError {
    #[error(
        "cannot serve metrics on {addr}: port {port} is already in use (another bindtrace or an \
         exporter?); choose a free port with --metrics-addr {ip}:PORT, or turn metrics off with --no-metrics"
    )]
    InUse { addr: SocketAddr, port: u16, ip: IpAddr },
    #[error(
        "cannot serve metrics on {addr}: {ip} is not an address of this host (in bindtrace's network \
         namespace); use 127.0.0.1:{port}, an address `ip addr` lists, or --no-metrics"
    )]
    NotLocal { addr: SocketAddr, port: u16, ip: IpAddr },
    #[error("cannot serve metrics on {addr}: {source}; choose another with --metrics-addr, or --no-metrics")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("starting the metrics server thread: {0}")]
    Thread(std::io::Error),
}

/// Binds the metrics socket (before anything slow happens, so a busy port fails fast).
pub(crate) fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, MetricsError> {
    std::net::TcpListener::bind(addr).map_err(|source| {
        let (ip, port) = (addr.ip(), addr.port());
        match source.kind() {
            std::io::ErrorKind::AddrInUse => MetricsError::InUse { addr, port, ip },
            std::io::ErrorKind::AddrNotAvailable => MetricsError::NotLocal { addr, port, ip },
            _ => MetricsError::Bind { addr, source },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{diagnose::listeners::Listener, diagnose::report::ListenerReport};

    fn report(netns: u64, port: u16, verdict: Verdict, count: u64) -> Report {
        Report {
            time: String::new(),
            ktime_ns: None,
            event: "refused",
            verdict,
            undiagnosed: None,
            proto: "tcp",
            family: "ipv4",
            target_ip: Some("172.17.0.2".parse().unwrap()),
            target_port: port,
            client_ip: None,
            client_port: None,
            netns,
            netns_cookie: netns,
            bridge: "docker0".into(),
            ifindex: 2,
            veth: String::new(),
            hook: "kfree-skb",
            listeners: vec![ListenerReport {
                ip: "127.0.0.1".parse().unwrap(),
                port,
                pids: vec![],
                pids_omitted: 0,
            }],
            listeners_omitted: 0,
            count: Some(count),
            count_unknown: None,
            count_at_least: false,
            hint: String::new(),
            docker: Default::default(),
        }
    }

    #[test]
    fn docker_names_the_container_and_the_published_port() {
        let mut r = report(7, 8000, Verdict::LoopbackOnly, 3);
        assert_eq!(container_label(&r), "netns:7");
        assert_eq!(host_port_label(&r), None);
        r.docker.container = Some(crate::diagnose::report::ContainerReport {
            runtime: crate::sources::docker::Runtime::Docker,
            id: "30117e5cc65a".into(),
            name: "shop-web".into(),
            image: "demo".into(),
            compose_project: None,
            compose_service: None,
            pod: None,
            namespace: None,
            rootless: false,
        });
        r.docker.published =
            Some(crate::sources::docker::Binding { host_ip: "0.0.0.0".parse().unwrap(), host_port: 18000 });
        assert_eq!(container_label(&r), "shop-web");
        assert_eq!(host_port_label(&r).as_deref(), Some("18000"));
        let (mut m, registry) = Metrics::new(Limits::default(), "kfree-skb", "chosen with --hook");
        m.on_line(&key(7, 8000), &r);
        let t = text(&registry);
        assert!(
            t.contains(
                "bindtrace_refused_connections_total{bridge=\"docker0\",container=\"shop-web\",\
                 container_port=\"8000\",host_port=\"18000\",proto=\"tcp\",runtime=\"docker\",\
                 verdict=\"loopback_only\"} 3"
            ),
            "{t}"
        );
    }

    #[test]
    fn the_audit_fills_the_loopback_gauge_before_any_refusal() {
        let (mut m, registry) = Metrics::new(Limits::default(), "kfree-skb", "chosen with --hook");
        let audit = |verdict: &'static str| crate::diagnose::report::AuditReport {
            time: String::new(),
            event: "audit",
            verdict,
            proto: "tcp",
            family: "ipv4",
            target_ip: None,
            target_port: 8000,
            netns: 7,
            container: crate::diagnose::report::ContainerReport {
                runtime: crate::sources::docker::Runtime::Docker,
                id: "30117e5cc65a".into(),
                name: "shop-web".into(),
                image: "demo".into(),
                compose_project: None,
                compose_service: None,
                pod: None,
                namespace: None,
                rootless: false,
            },
            published: None,
            bindings: vec![],
            listeners: vec![ListenerReport {
                ip: "127.0.0.1".parse().unwrap(),
                port: 8000,
                pids: vec![],
                pids_omitted: 0,
            }],
            listeners_omitted: 0,
            hint: String::new(),
        };
        let gauge = "bindtrace_loopback_listeners{container=\"shop-web\",address=\"127.0.0.1\",port=\"8000\",\
                     runtime=\"docker\"} 1";
        m.on_audit(&audit("loopback_only"));
        assert!(text(&registry).contains(gauge));
        m.on_audit(&audit("ok"));
        assert!(!text(&registry).contains(gauge), "fixed: out of the gauge");
        m.on_audit(&audit("loopback_only"));
        m.retain_audited(|runtime, name| runtime == "docker" && name != "shop-web");
        assert!(!text(&registry).contains(gauge), "container gone: out of the gauge");
    }

    fn key(netns: u64, port: u16) -> CountKey {
        CountKey { netns_cookie: netns, ifindex: 2, port, family: 2, proto: 6 }
    }

    fn text(registry: &Registry) -> String {
        let mut s = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut s, registry).unwrap();
        s
    }

    fn sample_lines<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .collect()
    }

    fn value(line: &str) -> u64 {
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    fn sum(text: &str, name: &str) -> u64 {
        sample_lines(text, name).into_iter().map(value).sum()
    }

    #[test]
    fn counts_go_to_the_labels_of_their_line() {
        let (mut m, registry) = Metrics::new(Limits::default(), "kfree-skb", "chosen with --hook");
        m.on_line(&key(7, 8000), &report(7, 8000, Verdict::LoopbackOnly, 1));
        m.on_line(&key(7, 8000), &report(7, 8000, Verdict::LoopbackOnly, 41));
        m.on_line(&key(7, 8001), &report(7, 8001, Verdict::NoListener, 2));
        let t = text(&registry);
        assert!(
            t.contains(
                "bindtrace_refused_connections_total{bridge=\"docker0\",container=\"netns:7\",\
                 container_port=\"8000\",proto=\"tcp\",verdict=\"loopback_only\"} 42"
            ),
            "{t}"
        );
        assert_eq!(sum(&t, "bindtrace_refused_connections_total"), 44);
        // 44 refusals in 3 lines: 41 had no line of their own.
        assert!(t.contains("bindtrace_events_lost_total{stage=\"fold_window\"} 41"), "{t}");
        assert!(t.contains("bindtrace_build_info{version=\""), "{t}");
        assert!(t.contains("hook=\"kfree-skb\""), "{t}");
        assert!(
            t.contains(
                "bindtrace_loopback_listeners{container=\"netns:7\",address=\"127.0.0.1\",port=\"8000\"} 1"
            ),
            "{t}"
        );
    }

    #[test]
    fn overflow_counts_under_other_and_ringbuf_losses_are_counted() {
        let (mut m, registry) = Metrics::new(Limits::default(), "kfree-skb", "chosen with --hook");
        m.on_kernel_stats(3, 0, 0);
        m.on_kernel_stats(5, 10, 2);
        m.on_kernel_stats(5, 12, 2);
        let t = text(&registry);
        assert!(t.contains("bindtrace_events_lost_total{stage=\"kernel_recursion\"} 2"), "{t}");
        assert!(t.contains("bindtrace_events_lost_total{stage=\"kernel_ringbuf\"} 5"), "{t}");
        assert!(t.contains("bindtrace_events_lost_total{stage=\"counts_map_full\"} 12"), "{t}");
        assert!(
            t.contains(
                "bindtrace_refused_connections_total{bridge=\"other\",container=\"other\",\
                 container_port=\"other\",proto=\"other\",runtime=\"other\",verdict=\"other\"} 12"
            ),
            "{t}"
        );
    }

    #[test]
    fn caps_bound_the_series_and_keep_the_sum_exact() {
        let limits = Limits { max_series: 10, max_ports: 4 };
        let (mut m, registry) = Metrics::new(limits, "kfree-skb", "chosen with --hook");
        let mut total = 0;
        // One container refused on 1 100 ports: 4 of its own, the rest under container_port="other".
        for port in 1000..2100 {
            m.on_line(&key(1, port), &report(1, port, Verdict::NoListener, 2));
            total += 2;
        }
        // 20 more containers: 5 fit (10 series in all), the rest fold into the `other` series.
        for ns in 2..22 {
            m.on_line(&key(ns, 80), &report(ns, 80, Verdict::LoopbackOnly, 3));
            total += 3;
        }
        let t = text(&registry);
        let series = sample_lines(&t, "bindtrace_refused_connections_total");
        assert_eq!(series.len(), 11, "{t}");
        assert_eq!(sum(&t, "bindtrace_refused_connections_total"), total);
        assert!(t.contains(
            "container=\"netns:1\",container_port=\"other\",proto=\"tcp\",verdict=\"no_listener\"} 2192"
        ));
        assert!(t.contains("bindtrace_cardinality_folded_total{cap=\"container_ports\"} 2192"), "{t}");
        assert!(t.contains("bindtrace_cardinality_folded_total{cap=\"series\"} 45"), "{t}");
        assert!(t.contains("verdict=\"other\"} 45"), "{t}");
    }

    /// A name two runtimes use is two workloads: each has its own series and its own port
    /// budget, and a pod's namespace and name are labels.
    #[test]
    fn one_name_in_two_runtimes_is_two_workloads() {
        let limits = Limits { max_series: 100, max_ports: 2 };
        let (mut m, registry) = Metrics::new(limits, "kfree-skb", "chosen with --hook");
        let named = |netns: u64, port: u16, runtime, pod: Option<(&str, &str)>| {
            let mut r = report(netns, port, Verdict::LoopbackOnly, 1);
            r.docker.container = Some(ContainerReport {
                runtime,
                id: "30117e5cc65a".into(),
                name: "web".into(),
                image: "demo".into(),
                compose_project: None,
                compose_service: None,
                namespace: pod.map(|p| p.0.to_owned()),
                rootless: false,
                pod: pod.map(|p| p.1.to_owned()),
            });
            r
        };
        use crate::sources::docker::Runtime;
        for port in [80, 81] {
            m.on_line(&key(1, port), &named(1, port, Runtime::Docker, None));
            m.on_line(&key(2, port), &named(2, port, Runtime::Podman, None));
        }
        let t = text(&registry);
        let series = sample_lines(&t, "bindtrace_refused_connections_total");
        assert_eq!(series.len(), 4, "two ports each, none folded: {t}");
        assert!(t.contains("bindtrace_cardinality_folded_total{cap=\"container_ports\"} 0"), "{t}");
        assert_eq!(series.iter().filter(|l| l.contains("runtime=\"podman\"")).count(), 2, "{t}");
        // The third port of one of them is its own budget's "other".
        m.on_line(&key(2, 82), &named(2, 82, Runtime::Podman, None));
        let t = text(&registry);
        assert!(t.contains("container_port=\"other\",proto=\"tcp\",runtime=\"podman\""), "{t}");
        let gauge = sample_lines(&t, "bindtrace_loopback_listeners");
        let on_80: Vec<_> = gauge.iter().filter(|l| l.contains("port=\"80\"")).collect();
        assert_eq!(on_80.len(), 2, "one listener per workload, told apart by runtime: {t}");
        // A pod: its namespace and name are labels.
        m.on_line(&key(3, 80), &named(3, 80, Runtime::Podman, Some(("shop", "front"))));
        let t = text(&registry);
        assert!(t.contains("namespace=\"shop\",pod=\"front\",proto=\"tcp\""), "{t}");
    }

    #[test]
    fn loopback_listeners_follow_the_verdict_and_the_recheck() {
        let (mut m, registry) = Metrics::new(Limits::default(), "kfree-skb", "chosen with --hook");
        m.on_line(&key(7, 8000), &report(7, 8000, Verdict::LoopbackOnly, 1));
        m.on_line(&key(8, 9000), &report(8, 9000, Verdict::LoopbackOnly, 1));
        assert_eq!(sample_lines(&text(&registry), "bindtrace_loopback_listeners").len(), 2);
        // A later line with another verdict drops it.
        m.on_line(&key(8, 9000), &report(8, 9000, Verdict::ListeningNow, 1));
        assert_eq!(sample_lines(&text(&registry), "bindtrace_loopback_listeners").len(), 1);
        // The recheck sees the listener move to [::1], then the namespace go.
        let t0 = Instant::now();
        m.recheck_loopback(t0, |_, _| {
            Some(Decision {
                verdict: Verdict::LoopbackOnly,
                listeners: vec![Listener { addr: "::1".parse().unwrap(), port: 8000, inode: 1 }],
            })
        });
        let t = text(&registry);
        assert!(t.contains("address=\"::1\",port=\"8000\"} 1"), "{t}");
        assert_eq!(sample_lines(&t, "bindtrace_loopback_listeners").len(), 1);
        m.recheck_loopback(t0 + Duration::from_secs(1), |_, _| None);
        assert_eq!(sample_lines(&text(&registry), "bindtrace_loopback_listeners").len(), 1, "not due yet");
        m.recheck_loopback(t0 + LOOPBACK_RECHECK, |_, _| None);
        assert!(sample_lines(&text(&registry), "bindtrace_loopback_listeners").is_empty());
    }

    /// The recheck runs on the worker: one at a time, and what a line said meanwhile wins over
    /// the older answer.
    #[test]
    fn a_recheck_on_the_worker_is_one_at_a_time_and_older_than_a_new_line() {
        let (mut m, registry) = Metrics::new(Limits::default(), "kfree-skb", "chosen with --hook");
        m.on_line(&key(7, 8000), &report(7, 8000, Verdict::LoopbackOnly, 1));
        m.on_line(&key(8, 9000), &report(8, 9000, Verdict::LoopbackOnly, 1));
        let asked = Instant::now();
        let due = m.loopback_recheck_due(asked).expect("due at first");
        assert_eq!(due.len(), 2);
        assert!(m.loopback_recheck_due(asked + 2 * LOOPBACK_RECHECK).is_none(), "one is out already");
        // A line judges key 7 again after the ask; then the answer says both namespaces are gone.
        m.on_line(&key(7, 8000), &report(7, 8000, Verdict::LoopbackOnly, 1));
        m.loopback_rechecked(due.into_iter().map(|(k, _)| (k, None)).collect(), asked);
        let t = text(&registry);
        assert_eq!(sample_lines(&t, "bindtrace_loopback_listeners").len(), 1, "{t}");
        assert!(t.contains("netns:7"), "{t}");
        assert!(m.loopback_recheck_due(asked + LOOPBACK_RECHECK).is_some(), "back: the next is due");
    }

    #[test]
    fn unknown_namespace_and_openmetrics() {
        let (mut m, registry) = Metrics::new(Limits::default(), "tcp-send-reset", "chosen with --hook");
        m.on_line(&key(0, 80), &report(0, 80, Verdict::Unknown, 1));
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &registry).unwrap();
        assert!(om.contains("container=\"unknown\""), "{om}");
        assert!(om.contains("# TYPE bindtrace_build info"), "{om}");
        assert!(om.ends_with("# EOF\n"), "{om}");
    }
}
