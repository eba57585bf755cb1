//! The detector's main loop: load, attach, keep the scope current, turn kernel samples and
//! counts into lines, detach on SIGINT/SIGTERM.
use std::{
    collections::{BTreeMap, HashMap},
    io::Write,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::RingBuf;
use bindtrace_common::{CountKey, RefusalEvent, ScopeKey};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    btf::Btf,
    cli::Args,
    enrich,
    fold::{Folder, Line},
    hook,
    kernel_layout::KernelLayout,
    loader::{LoadOptions, Loaded},
    metrics::{self, Metrics},
    netlink::LinkWatcher,
    output::Output,
    privileges,
    report::{LostReport, now_rfc3339},
    scope::{self, Bridges, Port, Resolver},
    sockets, tc, verdict,
};

/// How often the kernel counters are read when nothing is pending: this is the only periodic
/// wake-up while idle.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Link notifications come in bursts (a container start is several); wait this long for the
/// burst to end before recomputing the scope.
const RESCAN_DEBOUNCE: Duration = Duration::from_millis(20);
/// How long the details of an interface that left scope are kept, for lines still in flight.
const DEPARTED_GRACE: Duration = Duration::from_secs(10);

/// Everything set up before the loop, in the order it must be checked.
pub struct Detector {
    loaded: Loaded,
    bridges: Bridges,
    resolver: Resolver,
    ports: BTreeMap<ScopeKey, Port>,
    departed: HashMap<ScopeKey, (Port, Instant)>,
    folder: Folder,
    hook_name: &'static str,
    lost_reported: u64,
    recursion_reported: u64,
    /// None with --no-metrics.
    metrics: Option<Metrics>,
}

pub fn setup(args: &Args) -> anyhow::Result<Detector> {
    crate::loader::check_object()?;
    privileges::check()?;
    privileges::raise_memlock();
    // Bound first: a busy port fails before the slow part of the set-up.
    let metrics_listener = if args.no_metrics { None } else { Some(metrics::bind(args.metrics_addr)?) };
    let btf = Btf::from_sys_fs()?;
    let layout = KernelLayout::resolve(&btf).context("reading this kernel's layout from BTF")?;
    log::debug!("kernel layout from BTF: {layout:?}");
    let tc_mode = tc::AttachMode::detect(&btf);
    drop(btf);
    let (hook, why) = hook::choose(args.hook, &layout)?;
    let bridges = scope::validate(&args.ifaces)?;
    let aya_btf = aya::Btf::from_sys_fs().context("loading /sys/kernel/btf/vmlinux")?;
    let opts = LoadOptions {
        ringbuf_bytes: args.ringbuf_size,
        fold_window_ns: args.fold_window.as_nanos() as u64,
        kernel_log_level: kernel_log_level(),
        tc_mode,
    };
    let loaded = Loaded::load(&layout, hook, &aya_btf, &opts)?;
    match hook.tracepoint() {
        Some(tp) => log::info!("attached tp_btf/{tp} (hook {hook}: {why})"),
        None => log::info!(
            "loaded classifier {} (hook {hook}: {why}); attaching it to each port's host-side veth ({} ingress)",
            hook.program(),
            tc_mode.name()
        ),
    }
    let metrics = match metrics_listener {
        Some(listener) => {
            let limits = metrics::Limits {
                max_series: args.metrics_max_series as usize,
                max_ports: args.metrics_max_ports as usize,
            };
            let (metrics, registry) = Metrics::new(limits, hook.name(), &why);
            let addr = metrics::server::spawn(listener, registry)?;
            log::info!("metrics: serving http://{addr}/metrics");
            Some(metrics)
        }
        None => None,
    };
    let mut detector = Detector {
        loaded,
        bridges,
        resolver: Resolver::new().context("opening bindtrace's own network namespace")?,
        ports: BTreeMap::new(),
        departed: HashMap::new(),
        folder: Folder::new(args.fold_window),
        hook_name: hook.name(),
        lost_reported: 0,
        recursion_reported: 0,
        metrics,
    };
    detector.rescan()?;
    Ok(detector)
}

/// aya-log's level global: kernel-side messages follow the userspace log level.
fn kernel_log_level() -> u8 {
    match log::max_level() {
        log::LevelFilter::Off => 0,
        log::LevelFilter::Error => 1,
        log::LevelFilter::Warn => 2,
        log::LevelFilter::Info => 3,
        log::LevelFilter::Debug => 4,
        log::LevelFilter::Trace => 5,
    }
}

impl Detector {
    /// Recomputes the scope and brings the kernel's SCOPE map in line with it.
    fn rescan(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        let fresh = self.resolver.resolve(&self.bridges).context("resolving bridge ports")?;
        for key in self.ports.keys().filter(|k| !fresh.contains_key(k)).copied().collect::<Vec<_>>() {
            if let Err(e) = self.loaded.scope.remove(&key) {
                log::warn!("removing {key:?} from scope: {e}");
            }
            if let Some(port) = self.ports.remove(&key) {
                log::info!("{}: port {} left scope", self.bridges.name(port.bridge), port.host_ifname);
                self.departed.insert(key, (port, now));
            }
        }
        for (key, port) in &fresh {
            if !self.ports.contains_key(key) {
                self.loaded.scope.insert(*key, port.bridge, 0).context("updating the SCOPE map")?;
                log::info!(
                    "{}: watching {} (netns {}, ifindex {})",
                    self.bridges.name(port.bridge),
                    port.host_ifname,
                    port.ns.inode,
                    port.ifindex
                );
            }
        }
        self.ports = fresh;
        // The tc hook follows the same scope, per port (a no-op for the tracepoint hooks).
        self.loaded.sync_tc(&self.ports)?;
        self.departed.retain(|_, (_, since)| now.duration_since(*since) < DEPARTED_GRACE);
        Ok(())
    }

    fn port_for(&self, key: &CountKey) -> Option<&Port> {
        let scope_key = ScopeKey { netns_cookie: key.netns_cookie, ifindex: key.ifindex, _pad: 0 };
        self.ports.get(&scope_key).or_else(|| self.departed.get(&scope_key).map(|(p, _)| p))
    }

    fn print<W: Write>(&mut self, out: &mut Output<W>, lines: &[Line]) -> anyhow::Result<()> {
        for line in lines {
            let report = enrich::report(line, self.port_for(&line.key), &self.bridges, self.hook_name);
            if let Some(m) = &mut self.metrics {
                m.on_line(&line.key, &report);
            }
            out.refusal(&report).context("writing output")?;
        }
        Ok(())
    }

    /// Checks again the listeners behind `bindtrace_loopback_listeners` (it does nothing until
    /// they are due). Each namespace's listeners are read once per pass.
    fn recheck_loopback(&mut self, now: Instant) {
        let Some(m) = &mut self.metrics else { return };
        let (ports, departed) = (&self.ports, &self.departed);
        let mut read: HashMap<u64, Option<Vec<sockets::Listener>>> = HashMap::new();
        m.recheck_loopback(now, |key, target| {
            let scope_key = ScopeKey { netns_cookie: key.netns_cookie, ifindex: key.ifindex, _pad: 0 };
            let port = ports.get(&scope_key).or_else(|| departed.get(&scope_key).map(|(p, _)| p))?;
            let all = read.entry(key.netns_cookie).or_insert_with(|| sockets::listeners_in(&port.ns).ok());
            Some(verdict::decide(target, key.port, all.as_deref()?))
        });
    }

    fn key_total(&self, key: &CountKey) -> u64 {
        self.loaded.counts.get(key, 0).map(|v| v.iter().map(|c| c.count).sum()).unwrap_or(0)
    }

    /// Reports samples the kernel could not deliver since the last call.
    fn report_lost<W: Write>(&mut self, out: &mut Output<W>) -> anyhow::Result<()> {
        let (ringbuf_lost, overflow) = self.loaded.stats();
        let misses = self.loaded.recursion_misses().unwrap_or(0);
        if let Some(m) = &mut self.metrics {
            m.on_kernel_stats(ringbuf_lost, overflow, misses);
        }
        if ringbuf_lost > self.lost_reported {
            out.lost(&LostReport {
                time: now_rfc3339(),
                event: "lost",
                stage: "kernel_ringbuf",
                count: ringbuf_lost - self.lost_reported,
            })?;
            self.lost_reported = ringbuf_lost;
        }
        // Not a lost sample but possibly lost counts: say so rather than look exact.
        if misses > self.recursion_reported {
            out.lost(&LostReport {
                time: now_rfc3339(),
                event: "lost",
                stage: "kernel_recursion",
                count: misses - self.recursion_reported,
            })?;
            self.recursion_reported = misses;
        }
        if overflow > 0 {
            log::warn!("{overflow} refusals did not fit in the COUNTS map (counted as overflow)");
        }
        Ok(())
    }

    /// Runs until a signal, the optional duration, or an error.
    pub async fn run<W: Write>(
        mut self,
        out: &mut Output<W>,
        duration: Option<Duration>,
    ) -> anyhow::Result<()> {
        let ring: RingBuf<_> = self.loaded.events.take().context("ring buffer already taken")?;
        // SAFETY: the ring buffer owns its fd, and the AsyncFd owns the ring buffer, so the fd
        // stays open for as long as it is registered.
        let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }?;
        let mut links = LinkWatcher::new().context("subscribing to link changes")?;
        let mut kernel_log = KernelLog::new(&mut self.loaded.ebpf);
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let deadline = duration.map(|d| tokio::time::Instant::now() + d);
        let stop_at = async move {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(stop_at);

        log::info!(
            "ready: watching {} ({} container interfaces)",
            self.bridges.names.join(", "),
            self.ports.len()
        );
        // Tests and scripts wait for this line on stderr.
        eprintln!("bindtrace: ready");

        let mut next_poll = Instant::now() + IDLE_POLL;
        loop {
            let sleep = tokio::time::sleep_until(next_poll.into());
            tokio::select! {
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                _ = &mut stop_at => break,
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    let mut samples = Vec::new();
                    while let Some(item) = guard.get_inner_mut().next() {
                        if item.len() >= size_of::<RefusalEvent>() {
                            // SAFETY: RefusalEvent is Pod and the item is at least that long.
                            samples.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<RefusalEvent>()) });
                        }
                    }
                    guard.clear_ready();
                    let now = Instant::now();
                    let mut lines = Vec::new();
                    for ev in samples {
                        let total = self.key_total(&crate::fold::key_of(&ev));
                        lines.extend(self.folder.on_event(ev, total, now));
                    }
                    self.print(out, &lines)?;
                }
                changed = links.changed() => {
                    changed.context("reading link notifications")?;
                    tokio::time::sleep(RESCAN_DEBOUNCE).await;
                    // Drain what arrived during the pause: one rescan covers the burst.
                    let _ = tokio::time::timeout(Duration::ZERO, links.changed()).await;
                    self.rescan()?;
                }
                _ = kernel_log.readable() => kernel_log.flush(),
                _ = sleep => {}
            }
            let now = Instant::now();
            if now >= next_poll {
                let totals = self.loaded.totals();
                let lines = self.folder.on_totals(&totals, now, false);
                self.print(out, &lines)?;
                self.report_lost(out)?;
                self.recheck_loopback(now);
                next_poll = self.next_poll(&totals, now);
            } else if let Some(deadline) = self.folder.next_deadline(now) {
                // A window closes before the idle poll: flush it on time.
                next_poll = next_poll.min(deadline);
            }
        }

        // Nothing counted stays unprinted.
        let totals = self.loaded.totals();
        let lines = self.folder.on_totals(&totals, Instant::now(), true);
        self.print(out, &lines)?;
        self.report_lost(out)?;
        let total: u64 = totals.values().sum();
        match self.loaded.recursion_misses() {
            Some(0) => {
                log::info!("detaching; {total} refusals counted since start (exact: the hook never skipped)")
            }
            Some(m) => log::info!(
                "detaching; {total} refusals counted since start (a lower bound: the kernel skipped the hook {m} times)"
            ),
            None => log::info!("detaching; {total} refusals counted since start"),
        }
        drop(self);
        eprintln!("bindtrace: detached");
        Ok(())
    }

    fn next_poll(&self, totals: &HashMap<CountKey, u64>, now: Instant) -> Instant {
        let idle = now + IDLE_POLL;
        if self.folder.pending(totals) {
            self.folder.next_deadline(now).unwrap_or(idle).min(idle)
        } else {
            idle
        }
    }
}

/// Kernel-side aya-log messages, forwarded to this process's logger. Optional: an object built
/// without log statements has no log buffer, and then this never becomes readable.
struct KernelLog {
    fd: Option<AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>>,
}

impl KernelLog {
    fn new(ebpf: &mut aya::Ebpf) -> KernelLog {
        let fd = match aya_log::EbpfLogger::init(ebpf) {
            // SAFETY: the logger owns its ring buffer fd and the AsyncFd owns the logger.
            Ok(logger) => {
                unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }.ok()
            }
            Err(e) => {
                log::debug!("no kernel-side log buffer: {e}");
                None
            }
        };
        KernelLog { fd }
    }

    async fn readable(&mut self) {
        match &mut self.fd {
            Some(fd) => match fd.readable_mut().await {
                Ok(mut guard) => guard.clear_ready(),
                Err(_) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }

    fn flush(&mut self) {
        if let Some(fd) = &mut self.fd {
            fd.get_mut().flush();
        }
    }
}
