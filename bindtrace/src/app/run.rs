//! The detector's main loop: load, attach, keep the scope current, turn kernel samples and
//! counts into lines, detach on SIGINT/SIGTERM.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::Write,
    os::unix::fs::MetadataExt,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::RingBuf;
use bindtrace_common::{CountKey, RefusalEvent, ScopeKey};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    diagnose::audit::Auditor,
    kernel::btf::Btf,
    app::cli::Args,
    attribution::connect::{self, ConnectTracker, Prefix},
    sources::conntrack::Conntrack,
    sources::docker::{self, Inventory, watch::DockerState},
    diagnose::enrich,
    sources::fold::{Folder, Line},
    diagnose::hint::{HintContext, hint_in},
    kernel::hook,
    kernel::layout::KernelLayout,
    kernel::loader::{LoadOptions, Loaded},
    sinks::metrics::{self, Metrics},
    netlink::LinkWatcher,
    netns::Netns,
    sinks::output::Output,
    kernel::privileges,
    diagnose::report::{DockerContext, LostReport, Report, now_rfc3339},
    netns::scope::{self, Bridges, Port, Resolver},
    kernel::sock_layout::SockLayout,
    diagnose::sockets, kernel::tc,
    app::timer::PollTimer,
    diagnose::verdict, attribution::via,
};

/// How often the kernel counters are read when nothing is pending: this is the only periodic
/// wake-up while idle.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Link notifications come in bursts (a container start is several); wait this long for the
/// burst to end before recomputing the scope.
const RESCAN_DEBOUNCE: Duration = Duration::from_millis(20);
/// How long the details of an interface that left scope are kept, for lines still in flight.
const DEPARTED_GRACE: Duration = Duration::from_secs(10);
/// How long the start waits for the Docker API's first answer before reporting ready anyway.
const DOCKER_START_WAIT: Duration = Duration::from_secs(5);
/// A refusal whose connector is not known yet is looked up again after this: the reset that
/// completes the connector's record, and the conntrack event, arrive right after the refusal.
const ATTRIBUTION_RETRY: Duration = Duration::from_millis(30);
/// How long a line waits for Docker to report the container a connection came from (a client
/// container that has just started: its start event and inspection come a few ms later).
const CLIENT_CONTAINER_WAIT: Duration = Duration::from_millis(500);
/// How often lines waiting for their attribution are looked at again.
const ATTRIBUTION_POLL: Duration = Duration::from_millis(2);
/// Samples older than this get no retry (folded lines; their flows are long recorded).
const FRESH_SAMPLE: Duration = Duration::from_millis(500);

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
    docker: DockerSide,
}

/// What the Docker integration adds: containers and networks from the Engine API, who
/// connected (connect tracker, conntrack), and the proactive audit.
struct DockerSide {
    /// No `-i`: the bridges of Docker's networks are followed.
    auto_bridges: bool,
    /// The watcher's channel (None with --no-docker). `run`'s loop waits on a clone of it;
    /// this one is read whenever the latest state matters (before a line is enriched).
    state: Option<watch::Receiver<DockerState>>,
    /// Inode of bindtrace's own network namespace (a connector there is a host process).
    own_netns: u64,
    inventory: Option<Arc<Inventory>>,
    connect: Option<ConnectTracker>,
    conntrack: Option<Conntrack>,
    prefixes: BTreeSet<Prefix>,
    auditor: Auditor,
}

pub fn setup(args: &Args) -> anyhow::Result<Detector> {
    crate::kernel::loader::check_object()?;
    privileges::check()?;
    privileges::raise_memlock();
    // Bound first: a busy port fails before the slow part of the set-up.
    let metrics_listener = if args.no_metrics { None } else { Some(metrics::bind(args.metrics_addr)?) };
    let btf = Btf::from_sys_fs()?;
    let layout = KernelLayout::resolve(&btf).context("reading this kernel's layout from BTF")?;
    log::debug!("kernel layout from BTF: {layout:?}");
    let tc_mode = tc::AttachMode::detect(&btf);
    let sock_layout = SockLayout::resolve(&btf);
    drop(btf);
    let (hook, why) = hook::choose(args.hook, &layout)?;
    let auto_bridges = args.ifaces.is_empty();
    let bridges =
        if auto_bridges { scope::validate_auto(!args.no_docker)? } else { scope::validate(&args.ifaces)? };
    let docker_socket = match args.no_docker {
        true => None,
        false => Some(docker::socket_path(args.docker_host.as_deref()).map_err(anyhow::Error::msg)?),
    };
    // Before aya's copy of the BTF is parsed (see `Loaded::loader`).
    let loader = Loaded::loader();
    let aya_btf = aya::Btf::from_sys_fs().context("loading /sys/kernel/btf/vmlinux")?;
    let opts = LoadOptions {
        ringbuf_bytes: args.ringbuf_size,
        fold_window_ns: args.fold_window.as_nanos() as u64,
        kernel_log_level: kernel_log_level(),
        globals: match &sock_layout {
            Ok(s) => s.globals(layout.net_cookie, layout.net_ns_inum),
            Err(_) => SockLayout::unresolved_globals(),
        },
        tc_mode,
    };
    let mut loaded = Loaded::load(loader, &layout, hook, &aya_btf, &opts)?;
    match hook.tracepoint() {
        Some(tp) => log::info!("attached tp_btf/{tp} (hook {hook}: {why})"),
        None => log::info!(
            "loaded classifier {} (hook {hook}: {why}); attaching it to each port's host-side veth ({} ingress)",
            hook.program(),
            tc_mode.name()
        ),
    }
    let connect = match sock_layout {
        Ok(_) => match ConnectTracker::attach(&mut loaded.ebpf, &aya_btf) {
            Ok(c) => {
                log::info!("attached tp_btf/inet_sock_set_state (who connects to the watched bridges)");
                Some(c)
            }
            Err(e) => {
                log::warn!("not tracking who connects ({e:#}): `via` docker-proxy/direct will be missing");
                None
            }
        },
        Err(e) => {
            log::warn!(
                "not tracking who connects (struct sock layout: {e}): `via` docker-proxy/direct will be missing"
            );
            None
        }
    };
    let conntrack = match Conntrack::spawn() {
        Ok(c) => Some(c),
        Err(e) => {
            log::warn!("no conntrack events ({e}): NATed connections will not be reported as `via` dnat");
            None
        }
    };
    let docker_state = docker_socket.map(|path| docker::watch::spawn(docker::Client::new(path)));
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
        docker: DockerSide {
            auto_bridges,
            state: docker_state,
            inventory: None,
            connect,
            conntrack,
            own_netns: std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).unwrap_or(0),
            prefixes: BTreeSet::new(),
            auditor: Auditor::new(args.audit_grace),
        },
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
        self.refresh_prefixes();
        Ok(())
    }

    /// The watched bridges' address prefixes, for the connect tracker and conntrack.
    fn refresh_prefixes(&mut self) {
        let prefixes = match connect::interface_prefixes(&self.bridges.names) {
            Ok(p) => p,
            Err(e) => {
                log::debug!("reading the bridges' addresses: {e}");
                return;
            }
        };
        if prefixes == self.docker.prefixes {
            return;
        }
        let shown: Vec<String> = prefixes.iter().map(connect::show_prefix).collect();
        log::debug!("watched prefixes: {}", shown.join(", "));
        if let Some(c) = &mut self.docker.connect {
            c.set_prefixes(&prefixes);
        }
        if let Some(c) = &self.docker.conntrack {
            c.set_prefixes(&prefixes);
        }
        self.docker.prefixes = prefixes;
    }

    /// Takes in what the Docker watcher reports: new networks' bridges (without `-i`), the
    /// inventory for names and published ports, and container starts for the audit.
    fn apply_docker(&mut self, state: &DockerState) -> anyhow::Result<()> {
        let Some(inv) = state.inventory().cloned() else { return Ok(()) };
        let mut added = false;
        if self.docker.auto_bridges {
            let before: BTreeSet<String> =
                self.docker.inventory.as_ref().map(|i| i.bridges().into_iter().collect()).unwrap_or_default();
            let now: BTreeSet<String> = inv.bridges().into_iter().collect();
            for bridge in &now {
                if self.bridges.add(bridge) {
                    added = true;
                    // Docker creates the bridge with the network; one missing here means
                    // bindtrace runs in another network namespace than Docker's.
                    if scope::validate(std::slice::from_ref(bridge)).is_ok() {
                        log::info!("following Docker network bridge {bridge}");
                    } else {
                        log::debug!("Docker network bridge {bridge} is not in this network namespace");
                    }
                }
            }
            for gone in before.difference(&now) {
                log::info!("Docker network bridge {gone} removed");
            }
        }
        self.docker.inventory = Some(inv.clone());
        if added {
            self.rescan()?;
        }
        if state.is_up() {
            self.docker.auditor.on_inventory(&inv, Instant::now());
        }
        Ok(())
    }

    /// Applies the Docker watcher's latest state if it changed since last looked at.
    fn sync_docker(&mut self) -> anyhow::Result<()> {
        let Some(rx) = self.docker.state.as_mut() else { return Ok(()) };
        if !rx.has_changed().unwrap_or(false) {
            return Ok(());
        }
        let state = rx.borrow_and_update().clone();
        self.apply_docker(&state)
    }

    fn docker_up(&self) -> bool {
        self.docker.state.as_ref().is_some_and(|rx| rx.borrow().is_up())
    }

    /// Runs the audit checks that are due and prints what they find.
    fn run_audits<W: Write>(&mut self, out: &mut Output<W>) -> anyhow::Result<()> {
        let Some(inv) = self.docker.inventory.clone() else { return Ok(()) };
        let in_scope: HashMap<u64, Arc<Netns>> =
            self.ports.values().map(|p| (p.ns.inode, p.ns.clone())).collect();
        for report in self.docker.auditor.run(&inv, &in_scope, Instant::now()) {
            if let Some(m) = &mut self.metrics {
                m.on_audit(&report);
            }
            out.audit(&report).context("writing output")?;
        }
        if let Some(m) = &mut self.metrics {
            m.retain_audited(|name| inv.containers.values().any(|c| c.name == name));
        }
        Ok(())
    }

    /// The Docker side of one line: the container, the published port, `via`. Returns None
    /// while it is worth waiting for more (see [`ATTRIBUTION_RETRY`], [`CLIENT_CONTAINER_WAIT`]).
    fn attribution(&self, report: &Report, line: &Line, waited: Duration) -> Option<DockerContext> {
        let fresh = line
            .sample
            .is_some_and(|s| monotonic_ns().saturating_sub(s.ktime_ns) < FRESH_SAMPLE.as_nanos() as u64);
        let tracking = self.docker.connect.is_some() || self.docker.conntrack.is_some();
        let ctx = via::docker_context(
            report,
            self.docker.inventory.as_deref(),
            self.docker.connect.as_ref(),
            self.docker.conntrack.as_ref(),
        );
        // Worth waiting for: the connector's record (completed by the reset) or conntrack's
        // event, for a moment; the container a client process runs in, while Docker is up and
        // may not have reported it yet.
        let no_via = ctx.via.is_none() && tracking && waited < ATTRIBUTION_RETRY;
        let unknown_client = ctx.client_container.is_none()
            && ctx.client_netns.is_some_and(|ino| self.unknown_netns(ino))
            && self.docker_up()
            && waited < CLIENT_CONTAINER_WAIT;
        if fresh && (no_via || unknown_client) { None } else { Some(ctx) }
    }

    /// Completes a report with its Docker context and writes it.
    fn emit<W: Write>(
        &mut self,
        out: &mut Output<W>,
        line: &Line,
        mut report: Report,
        ctx: DockerContext,
    ) -> anyhow::Result<()> {
        if let Some(p) = ctx.published {
            report.hint = hint_in(
                &HintContext { host_port: Some(p.host_port) },
                report.verdict,
                report.target_ip,
                report.target_port,
                &report.listeners,
            );
        }
        report.docker = ctx;
        if let Some(m) = &mut self.metrics {
            m.on_line(&line.key, &report);
        }
        out.refusal(&report).context("writing output")
    }

    /// Whether a connector's namespace is neither ours nor a container Docker has reported.
    fn unknown_netns(&self, ino: u64) -> bool {
        ino != self.docker.own_netns
            && self.docker.inventory.as_ref().is_none_or(|inv| inv.by_netns(ino).is_none())
    }

    fn port_for(&self, key: &CountKey) -> Option<&Port> {
        let scope_key = ScopeKey { netns_cookie: key.netns_cookie, ifindex: key.ifindex, _pad: 0 };
        self.ports.get(&scope_key).or_else(|| self.departed.get(&scope_key).map(|(p, _)| p))
    }

    /// Writes `lines`. Each is written as soon as its attribution is complete; those still
    /// waiting for the connector's record or Docker are looked at again every
    /// [`ATTRIBUTION_POLL`], all together, so one slow line never holds up the batch by more.
    async fn print<W: Write>(&mut self, out: &mut Output<W>, lines: &[Line]) -> anyhow::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut seen = enrich::Snapshots::default();
        let mut pending: Vec<(&Line, Report)> = lines
            .iter()
            .map(|line| {
                let report =
                    enrich::report(line, self.port_for(&line.key), &self.bridges, self.hook_name, &mut seen);
                (line, report)
            })
            .collect();
        // Let the conntrack reader and the Docker watcher catch up with what is queued.
        tokio::task::yield_now().await;
        let started = Instant::now();
        loop {
            self.sync_docker()?;
            let waited = started.elapsed();
            let mut waiting = Vec::new();
            for (line, report) in pending {
                match self.attribution(&report, line, waited) {
                    Some(ctx) => self.emit(out, line, report, ctx)?,
                    None => waiting.push((line, report)),
                }
            }
            if waiting.is_empty() {
                return Ok(());
            }
            pending = waiting;
            tokio::time::sleep(ATTRIBUTION_POLL).await;
        }
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

    /// Reports samples the kernel could not deliver since the last call, from `stats` (read
    /// with [`Loaded::stats`](crate::kernel::loader::Loaded::stats) just before).
    fn report_lost<W: Write>(&mut self, out: &mut Output<W>, stats: (u64, u64)) -> anyhow::Result<()> {
        let (ringbuf_lost, overflow) = stats;
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

        let mut docker_state = self.docker.state.clone();
        if let Some(rx) = docker_state.as_mut() {
            let _ = tokio::time::timeout(
                DOCKER_START_WAIT,
                rx.wait_for(|s| !matches!(s, DockerState::Connecting)),
            )
            .await;
            rx.borrow_and_update();
            let state = self.docker.state.as_mut().map(|r| r.borrow_and_update().clone());
            let state = state.unwrap_or(DockerState::Connecting);
            self.apply_docker(&state)?;
            if self.bridges.names.is_empty()
                && let DockerState::Down { error, .. } = &state
            {
                anyhow::bail!(
                    "no bridge to watch: there is no {} here and the Docker API is unavailable ({error}); \
                     name the bridges with -i",
                    scope::DOCKER0
                );
            }
        }
        self.run_audits(out)?;

        log::info!(
            "ready: watching {} ({} container interfaces)",
            self.bridges.names.join(", "),
            self.ports.len()
        );
        // Tests and scripts wait for this line on stderr.
        eprintln!("bindtrace: ready");

        let mut poll_timer = PollTimer::new().context("creating the poll timer")?;
        let mut next_full = Instant::now() + IDLE_POLL;
        let mut next_poll = next_full;
        loop {
            poll_timer.arm(next_poll).context("arming the poll timer")?;
            let audit_at = self.docker.auditor.next_due();
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
                        let total = self.key_total(&crate::sources::fold::key_of(&ev));
                        lines.extend(self.folder.on_event(ev, total, now));
                    }
                    self.print(out, &lines).await?;
                }
                () = docker_changed(&mut docker_state) => {
                    self.sync_docker()?;
                    self.run_audits(out)?;
                }
                _ = sleep_until_opt(audit_at) => self.run_audits(out)?,
                changed = links.changed() => {
                    changed.context("reading link notifications")?;
                    tokio::time::sleep(RESCAN_DEBOUNCE).await;
                    // Drain what arrived during the pause: one rescan covers the burst.
                    let _ = tokio::time::timeout(Duration::ZERO, links.changed()).await;
                    self.rescan()?;
                }
                _ = kernel_log.readable() => kernel_log.flush(),
                fired = poll_timer.wait() => fired.context("waiting on the poll timer")?,
            }
            let now = Instant::now();
            if now >= next_full {
                // The idle pass: the loss counters, the loopback gauge, and, only when samples
                // were lost (a key may then be known to the kernel alone), every key's count.
                // Otherwise every key announced itself with a sample, and closed windows are
                // read one key at a time below: a pass over 10 000 keys takes ~40 ms of syscalls.
                let stats = self.loaded.stats();
                if stats.0 > self.lost_reported || self.folder.awaiting_samples() {
                    let totals = self.loaded.totals();
                    let lines = self.folder.on_totals(&totals, now, false);
                    self.print(out, &lines).await?;
                }
                self.report_lost(out, stats)?;
                self.recheck_loopback(now);
                next_full = now + IDLE_POLL;
            }
            // Windows that closed: one lookup per key, not a pass over the whole map (a burst
            // of new ports closes a window every millisecond or so).
            {
                let mut lines = Vec::new();
                for key in self.folder.due(now) {
                    let total = self.key_total(&key);
                    lines.extend(self.folder.on_key_total(key, total, now));
                }
                self.print(out, &lines).await?;
            }
            next_poll = self.folder.next_deadline().map_or(next_full, |d| d.min(next_full));
        }

        // Nothing counted stays unprinted.
        let totals = self.loaded.totals();
        let lines = self.folder.on_totals(&totals, Instant::now(), true);
        self.print(out, &lines).await?;
        self.report_lost(out, self.loaded.stats())?;
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
}

/// Resolves when the Docker state changed (never without Docker, or once the watcher is gone).
/// `rx` is the loop's own clone: the state itself is read from the detector's receiver.
async fn docker_changed(rx: &mut Option<watch::Receiver<DockerState>>) {
    if let Some(r) = rx.as_mut()
        && r.changed().await.is_ok()
    {
        r.borrow_and_update();
        return;
    }
    *rx = None;
    std::future::pending().await
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
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
