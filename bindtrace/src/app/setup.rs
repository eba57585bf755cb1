//! Set-up, in the order failures must surface: privileges and the metrics port first, then
//! the kernel's layout, the hook, the eBPF object, and the optional sources (connect tracker,
//! conntrack, Docker). Everything that can fail for a reason the user can fix fails here,
//! before the loop starts.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    os::unix::fs::MetadataExt,
};

use anyhow::Context as _;

use super::{
    cli::Args,
    detector::{Detector, DockerSide, KeyLifecycle},
    enrichment::Enricher,
};
use crate::{
    attribution::connect::{self, ConnectTracker},
    diagnose::audit::Auditor,
    kernel::{
        btf::Btf,
        hook,
        layout::KernelLayout,
        loader::{self, LoadOptions, Loaded, UdpCounting},
        privileges,
        sock_layout::SockLayout,
        tc,
    },
    netns::scope::{self, Resolver},
    sinks::metrics::{self, Metrics},
    sources::{conntrack::Conntrack, containerd, docker, fold::Folder},
};

pub(crate) fn setup(args: &Args) -> anyhow::Result<Detector> {
    loader::check_object()?;
    privileges::check()?;
    privileges::raise_memlock();
    privileges::raise_nofile();
    // Bound first: a busy port fails before the slow part of the set-up.
    let metrics_listener = if args.no_metrics { None } else { Some(metrics::bind(args.metrics_addr)?) };
    let btf = Btf::from_sys_fs()?;
    let layout = KernelLayout::resolve(&btf).context("reading this kernel's layout from BTF")?;
    log::debug!("kernel layout from BTF: {layout:?}");
    let tc_mode = tc::AttachMode::choose(&btf, args.tc_clsact);
    let sock_layout = SockLayout::resolve(&btf);
    // What aya's program loads look up, at their ids in this kernel's BTF: taken before our
    // parse is dropped, turned into aya's (small) BTF after, so that the two never add up.
    let tracepoints: Vec<String> =
        loader::TRACEPOINTS.iter().chain(&connect::TRACEPOINTS).map(|tp| format!("btf_trace_{tp}")).collect();
    let program_types = btf.program_types(&tracepoints, &connect::FUNCTIONS);
    drop(btf);
    let (hook, why) = hook::choose(args.hook, &layout)?;
    let auto_bridges = args.ifaces.is_empty();
    let bridges =
        if auto_bridges { scope::validate_auto(!args.no_docker)? } else { scope::validate(&args.ifaces)? };
    let docker_sockets = match args.no_docker {
        true => None,
        false => Some(
            docker::socket_plan(&args.docker_host, args.run_dir.as_deref()).map_err(anyhow::Error::msg)?,
        ),
    };
    let loader = Loaded::loader();
    let program_btf = program_types.aya_btf().context("the BTF for loading the programs")?;
    let opts = LoadOptions {
        ringbuf_bytes: args.ringbuf_size,
        counts_size: args.counts_size,
        scope_size: args.scope_size,
        fold_window_ns: args.fold_window.as_nanos() as u64,
        kernel_log_level: kernel_log_level(),
        globals: match &sock_layout {
            Ok(s) => s.globals(layout.net_cookie, layout.net_ns_inum),
            Err(_) => SockLayout::unresolved_globals(),
        },
        tc_mode,
    };
    let mut loaded = Loaded::load(loader, &layout, hook, &program_btf, &opts)?;
    match hook.tracepoint() {
        Some(tp) => log::info!("attached tp_btf/{tp} (hook {hook}: {why})"),
        None => log::info!(
            "loaded classifier {} (hook {hook}: {why}); attaching it to each port's host-side veth ({} ingress)",
            hook.program(),
            tc_mode.name()
        ),
    }
    match &loaded.udp {
        UdpCounting::NotCounted(_) => log::warn!("{}", loaded.udp.describe()),
        _ => log::info!("{}", loaded.udp.describe()),
    }
    if !loaded.counts.lifecycle() {
        log::warn!(
            "this kernel cannot wait for an RCU grace period here (membarrier without \
             MEMBARRIER_CMD_GLOBAL, as with nohz_full CPUs): count keys are never deleted, so once \
             {} keys were refused, further new keys are counted as overflow",
            args.counts_size
        );
    }
    let connect = attach_connect_tracker(&mut loaded, &program_btf, sock_layout.as_ref().map(|_| ()));
    // Everything is loaded: from here on, in this thread and every thread started after it,
    // only what the running daemon still needs (see privileges::KEPT).
    privileges::restrict().context("dropping the capabilities set-up needed")?;
    let conntrack = match Conntrack::spawn() {
        Ok(c) => Some(c),
        Err(e) => {
            log::warn!("no conntrack events ({e}): NATed connections will not be reported as `via` dnat");
            None
        }
    };
    // Each engine's API and containerd's state directory, followed on their own, as one state;
    // podman sockets made later join it.
    let docker_state = docker_sockets.map(|(paths, watched)| {
        let appearing = watched.and_then(|places| {
            docker::appear::spawn(places, paths.clone())
                .inspect_err(|e| {
                    log::warn!(
                        "not watching for podman sockets made later ({e}): restart bindtrace to follow one"
                    )
                })
                .ok()
        });
        let mut parts: Vec<_> =
            paths.into_iter().map(|p| docker::watch::spawn(docker::Client::new(p))).collect();
        parts.push(containerd::spawn(args.containerd_state.clone()));
        docker::watch::merge_all(parts, appearing)
    });
    let metrics = match metrics_listener {
        Some(listener) => Some(serve_metrics(args, listener, hook.name(), &why)?),
        None => None,
    };
    let mut detector = Detector {
        loaded,
        bridges,
        resolver: Resolver::new().context("opening bindtrace's own network namespace")?,
        ports: BTreeMap::new(),
        loopbacks: Default::default(),
        rootless: Default::default(),
        departed: HashMap::new(),
        folder: Folder::new(args.fold_window),
        keys: KeyLifecycle::new(args.idle_key_after),
        hook_name: hook.name(),
        lost_reported: 0,
        lost_at_pass: 0,
        samples_since_pass: false,
        orphans_suspect: false,
        orphan_followup: None,
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
            auditor: Some(Box::new(Auditor::new(args.audit_grace))),
            audit_missed_inventory: false,
        },
        link_rcvbuf: args.link_events_rcvbuf,
        hiccups: Default::default(),
        enricher: Enricher::start(args.enrich_queue).context("starting the enrichment worker")?,
        awaiting: Vec::new(),
    };
    // Listing the ports must work once; single ports that cannot be watched are hiccups
    // (logged, counted, retried), unless the tc hook could be attached to none of them.
    let gaps = detector.rescan()?;
    if gaps.tc_failed > 0 && gaps.tc_attached == 0 {
        anyhow::bail!(
            "the tc hook could not be attached to any of the {} ports (see the warning above); \
             choose another with --hook",
            gaps.tc_failed
        );
    }
    Ok(detector)
}

/// The connect tracker (who connected: `via` docker-proxy or direct) is optional: without it
/// lines lack `via`, which is said once here.
fn attach_connect_tracker(
    loaded: &mut Loaded,
    aya_btf: &aya::Btf,
    sock_layout: Result<(), &crate::kernel::btf::BtfError>,
) -> Option<ConnectTracker> {
    let attached = match sock_layout {
        Ok(()) => ConnectTracker::attach(&mut loaded.ebpf, aya_btf).map_err(|e| format!("{e:#}")),
        Err(e) => Err(format!("struct sock layout: {e}")),
    };
    match attached {
        Ok(c) => {
            log::debug!("attached tp_btf/tcp_receive_reset (who made the refused connections)");
            Some(c)
        }
        Err(e) => {
            log::warn!("not tracking who connects ({e}): `via` docker-proxy/direct will be missing");
            None
        }
    }
}

/// The metrics and the thread that serves them on the listener bound at the start.
fn serve_metrics(
    args: &Args,
    listener: std::net::TcpListener,
    hook: &'static str,
    why: &str,
) -> anyhow::Result<Metrics> {
    let limits = metrics::Limits {
        max_series: args.metrics_max_series as usize,
        max_ports: args.metrics_max_ports as usize,
    };
    let (metrics, registry) = Metrics::new(limits, hook, why);
    let addr = metrics::server::spawn(listener, registry)?;
    log::info!("metrics: serving http://{addr}/metrics");
    Ok(metrics)
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
