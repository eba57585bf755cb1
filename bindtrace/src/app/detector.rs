//! The detector's state: what the set-up built and the event loop keeps current (the scope,
//! the folder, the Docker side, loss accounting). The loop and its handlers live beside it,
//! one file per kind of event.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use bindtrace_common::{CountKey, ScopeKey};
use tokio::sync::watch;

use crate::{
    attribution::connect::ConnectTracker,
    diagnose::audit::Auditor,
    kernel::loader::Loaded,
    netns::{
        loopback::LoopbackNamespaces,
        prefixes::Prefix,
        scope::{Bridges, Port, Resolver},
    },
    sinks::metrics::Metrics,
    sources::{
        conntrack::Conntrack,
        docker::{Inventory, watch::DockerState},
        fold::Folder,
    },
};

/// How often the kernel counters are read when nothing is pending: this is the only periodic
/// wake-up while idle.
pub(super) const IDLE_POLL: Duration = Duration::from_secs(1);
/// Link notifications come in bursts (a container start is several); wait this long for the
/// burst to end before recomputing the scope.
pub(super) const RESCAN_DEBOUNCE: Duration = Duration::from_millis(20);
/// How long the details of an interface that left scope are kept, for lines still in flight.
pub(super) const DEPARTED_GRACE: Duration = Duration::from_secs(10);
/// How long the start waits for the Docker API's first answer before reporting ready anyway.
pub(super) const DOCKER_START_WAIT: Duration = Duration::from_secs(5);
/// A refusal whose connector is not known yet is looked up again after this: the reset that
/// completes the connector's record, and the conntrack event, arrive right after the refusal.
pub(super) const ATTRIBUTION_RETRY: Duration = Duration::from_millis(30);
/// How long a line waits for Docker to report the container a connection came from (a client
/// container that has just started: its start event and inspection come a few ms later).
pub(super) const CLIENT_CONTAINER_WAIT: Duration = Duration::from_millis(500);
/// How often lines waiting for their attribution are looked at again.
pub(super) const ATTRIBUTION_POLL: Duration = Duration::from_millis(2);
/// Samples older than this get no retry (folded lines; their flows are long recorded).
pub(super) const FRESH_SAMPLE: Duration = Duration::from_millis(500);
/// Flips forced by a full count map come at most this often (each waits a grace period and
/// drains a map).
pub(super) const MIN_FLIP_GAP: Duration = Duration::from_millis(250);

/// Everything set up before the loop, in the order it must be checked.
pub(crate) struct Detector {
    pub(super) loaded: Loaded,
    pub(super) bridges: Bridges,
    pub(super) resolver: Resolver,
    /// The `lo` of containers whose forwarder dials their own address (rootless podman).
    pub(super) loopbacks: LoopbackNamespaces,
    /// The namespaces of rootless Docker's containers, whose veths are in RootlessKit's.
    pub(super) rootless: crate::netns::rootless::RootlessNamespaces,
    pub(super) ports: BTreeMap<ScopeKey, Port>,
    pub(super) departed: HashMap<ScopeKey, (Port, Instant)>,
    pub(super) folder: Folder,
    pub(super) keys: KeyLifecycle,
    pub(super) hook_name: &'static str,
    pub(super) lost_reported: u64,
    pub(super) recursion_reported: u64,
    /// The ring's loss counter at the last idle pass: samples lost since then may have been a
    /// key's only announcement, so that pass reads every key's count.
    pub(super) lost_at_pass: u64,
    /// Samples arrived since the last idle pass: the next one reads the loss counters.
    pub(super) samples_since_pass: bool,
    /// Something said a held namespace may be gone (a handle removed, a runtime or link change):
    /// the next wake checks for namespaces only bindtrace keeps alive.
    pub(super) orphans_suspect: bool,
    /// The follow-up checks after such an event: the next one and the step after it. An event
    /// may come before the namespace is unreachable (a runtime tears down in several steps), so
    /// it is checked again at 1, 2, 4 ... 32 s after, then no more until the next event.
    pub(super) orphan_followup: Option<(Instant, Duration)>,
    /// None with --no-metrics.
    pub(super) metrics: Option<Metrics>,
    pub(super) docker: DockerSide,
    /// SO_RCVBUF asked for on the link-notification socket (hidden `--link-events-rcvbuf`).
    pub(super) link_rcvbuf: u32,
    /// Transient failures since start, and when to retry (see `app/hiccups.rs`).
    pub(super) hiccups: super::hiccups::Hiccups,
    /// Line diagnosis, off the loop (see `app/enrichment.rs`).
    pub(super) enricher: super::enrichment::Enricher,
    /// Diagnosed lines waiting for their attribution (see `app/printing.rs`).
    pub(super) awaiting: Vec<super::printing::Awaiting>,
}

/// What the Docker integration adds: containers and networks from the Engine API, who
/// connected (connect tracker, conntrack), and the proactive audit.
pub(super) struct DockerSide {
    /// No `-i`: the bridges of Docker's networks are followed.
    pub(super) auto_bridges: bool,
    /// The watcher's channel (None with --no-docker). `run`'s loop waits on a clone of it;
    /// this one is read whenever the latest state matters (before a line is enriched).
    pub(super) state: Option<watch::Receiver<DockerState>>,
    /// Inode of bindtrace's own network namespace (a connector there is a host process).
    pub(super) own_netns: u64,
    pub(super) inventory: Option<Arc<Inventory>>,
    pub(super) connect: Option<ConnectTracker>,
    pub(super) conntrack: Option<Conntrack>,
    pub(super) prefixes: BTreeSet<Prefix>,
    /// None while it runs on the enrichment worker (see `app/enrichment.rs`).
    pub(super) auditor: Option<Box<Auditor>>,
    /// The inventory changed while the auditor was away: it is told when it is back.
    pub(super) audit_missed_inventory: bool,
}

impl Detector {
    pub(super) fn port_for(&self, key: &CountKey) -> Option<&Port> {
        port_in(&self.ports, &self.departed, key)
    }

    pub(super) fn key_total(&self, key: &CountKey) -> u64 {
        self.loaded.counts.total(key)
    }
}

/// When count keys leave the kernel (see `kernel/counts.rs` for how, and `app/key_sync.rs`).
pub(crate) struct KeyLifecycle {
    /// A key unrefused for this long leaves the kernel at the next flip, and userspace forgets
    /// it once its lines are written.
    pub(super) idle_after: Duration,
    pub(super) next_flip: Instant,
    /// The overflow total at the last flip: when it grows, the active map is full, so flip now.
    pub(super) overflow_at_flip: u64,
    /// When a refusal first found the map full (for the lines of unknown count).
    pub(super) overflow_since: Option<std::time::SystemTime>,
    /// The counts of every line written since start: keys are forgotten, this is not.
    pub(super) counted_in_lines: u64,
    /// The part of `counted_in_lines` that is a lower bound (UDP on the tc hook).
    pub(super) at_least_in_lines: u64,
    /// Lines for overflowing keys whose samples were lost.
    pub(super) overflow_lines: crate::sources::overflow::OverflowLines,
    pub(super) last_flip: Option<Instant>,
    /// The overflow total the log last mentioned.
    pub(super) overflow_logged: u64,
}

impl KeyLifecycle {
    pub(crate) fn new(idle_after: Duration) -> KeyLifecycle {
        KeyLifecycle {
            idle_after,
            next_flip: Instant::now() + idle_after,
            overflow_at_flip: 0,
            overflow_since: None,
            counted_in_lines: 0,
            at_least_in_lines: 0,
            overflow_lines: Default::default(),
            last_flip: None,
            overflow_logged: 0,
        }
    }
}

/// The port a kernel key counts on: in scope now, or departed within [`DEPARTED_GRACE`].
pub(super) fn port_in<'a>(
    ports: &'a BTreeMap<ScopeKey, Port>,
    departed: &'a HashMap<ScopeKey, (Port, Instant)>,
    key: &CountKey,
) -> Option<&'a Port> {
    let scope_key = ScopeKey { netns_cookie: key.netns_cookie, ifindex: key.ifindex, _pad: 0 };
    ports.get(&scope_key).or_else(|| departed.get(&scope_key).map(|(p, _)| p))
}
