//! Keeping the scope current: the watched bridges' ports in the kernel's SCOPE map (and the tc
//! attachments), and their address prefixes in the connect tracker and conntrack.
use std::{collections::HashSet, time::Instant};

use anyhow::Context as _;
use bindtrace_common::ScopeKey;

use super::{
    detector::{DEPARTED_GRACE, Detector},
    hiccups::Stage,
};
use crate::{
    netns::{
        prefixes,
        scope::{self, Resolved},
    },
    sources::link_events::{LinkChanges, LinkWatcher},
};

/// What one rescan could not do (each already counted and logged as a hiccup).
#[derive(Debug, Default)]
pub(super) struct RescanGaps {
    /// Ports the SCOPE map had no room for.
    pub(super) scope_full: usize,
    /// Ports skipped because their namespace could not be opened.
    pub(super) skipped: usize,
    /// Ports that left scope.
    pub(super) gone: usize,
    /// Ports the tc hook could not be attached to, and how many it is attached to.
    pub(super) tc_failed: usize,
    pub(super) tc_attached: usize,
}

/// The follow-up checks for orphaned namespaces after an event: 1 s after it, then doubling.
const ORPHAN_FOLLOWUP_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
/// The last step: the checks stop about a minute after the event.
const ORPHAN_FOLLOWUP_LAST: std::time::Duration = std::time::Duration::from_secs(32);

impl Detector {
    /// Recomputes the scope and brings the kernel's SCOPE map in line with it. An error means
    /// the ports could not be listed at all (the scope stays as it was); what failed for single
    /// ports is counted, logged and tried again at the next rescan, which a backoff schedules.
    pub(super) fn rescan(&mut self) -> anyhow::Result<RescanGaps> {
        let now = Instant::now();
        let workloads = self.workload_pids();
        let mut resolved = self
            .resolver
            .resolve(&mut self.bridges, &workloads)
            .context("listing the watched bridges' ports")?;
        self.add_loopback_ports(&mut resolved);
        let mut fresh = resolved.ports;
        // A port whose namespace could not be opened is not watched yet: the retry tries again.
        match resolved.skipped.first() {
            Some((ifname, e)) => self.hiccup(
                Stage::Rescan,
                resolved.skipped.len() as u64,
                format_args!(
                    "{} ports are not watched yet, the first ({ifname}) because its namespace could not \
                     be opened: {e}",
                    resolved.skipped.len()
                ),
            ),
            None => self.hiccups.succeeded(Stage::Rescan),
        }
        let gone: HashSet<ScopeKey> = self.ports.keys().filter(|k| !fresh.contains_key(k)).copied().collect();
        for &key in &gone {
            if let Err(e) = self.loaded.scope.remove(&key) {
                log::warn!("removing {key:?} from scope: {e}");
            }
            if let Some(port) = self.ports.remove(&key) {
                log::debug!("{}: port {} left scope", port.on(&self.bridges), port.shown());
                self.departed.insert(key, (port, now));
            }
        }
        let mut gaps = RescanGaps { skipped: resolved.skipped.len(), gone: gone.len(), ..Default::default() };
        let mut scope_error = None;
        fresh.retain(|key, port| {
            // Known with the same bridge: nothing to do. A veth first seen before its master
            // was set (a CNI plugin creates it, then enslaves it) is re-entered with its bridge.
            if self.ports.get(key).is_some_and(|known| known.bridge == port.bridge) {
                return true;
            }
            if let Err(e) = self.loaded.scope.insert(*key, port.bridge, 0) {
                // Left out of `ports`, so the next rescan tries it again.
                gaps.scope_full += 1;
                scope_error.get_or_insert_with(|| format!("{} ({e})", port.shown()));
                return false;
            }
            // Churn (Docker enslaves a veth, then moves its peer): debug, not every user's concern.
            log::debug!(
                "{}: watching {} (netns {}, ifindex {})",
                port.on(&self.bridges),
                port.shown(),
                port.ns.inode,
                port.ifindex
            );
            true
        });
        match scope_error {
            Some(first) => self.hiccup(
                Stage::Scope,
                gaps.scope_full as u64,
                format_args!(
                    "{} ports could not be added to the kernel's SCOPE map, first {first}: their refusals \
                     are not seen until they fit (it holds --scope-size ports)",
                    gaps.scope_full
                ),
            ),
            None => self.hiccups.succeeded(Stage::Scope),
        }
        self.ports = fresh;
        // The tc hook follows the same scope, per port (a no-op for the tracepoint hooks).
        let (failed, attached) = self.loaded.sync_tc(&self.ports);
        (gaps.tc_failed, gaps.tc_attached) = (failed.len(), attached);
        match failed.first() {
            Some(first) => self.hiccup(
                Stage::TcAttach,
                failed.len() as u64,
                format_args!(
                    "{} ports are not watched, the first because {first}; their refusals are not seen \
                     until the hook is attached",
                    failed.len(),
                ),
            ),
            None => self.hiccups.succeeded(Stage::TcAttach),
        }
        // No hook can count for the departed ports any more: their keys may leave the kernel.
        self.retire_keys(&gone);
        self.forget_departed(now);
        self.refresh_prefixes();
        Ok(gaps)
    }

    /// The `lo` of every container whose forwarder dials its own address (rootless podman,
    /// `netns/loopback.rs`), next to the bridges' ports. From a stale inventory too: a
    /// container is kept only while its process is still in the namespace it was reported with.
    fn add_loopback_ports(&mut self, resolved: &mut Resolved) {
        let inventory = self.docker.inventory.clone();
        let containers = inventory.iter().flat_map(|inv| inv.containers.values().map(|c| &**c));
        let (ports, skipped) = self.loopbacks.ports(containers);
        resolved.ports.extend(ports);
        resolved.skipped.extend(skipped);
        // Rootless Docker's containers: their veths and bridge are in RootlessKit's namespace.
        let containers = inventory.iter().flat_map(|inv| inv.containers.values().map(|c| &**c));
        let (ports, skipped) = self.rootless.ports(&mut self.bridges, containers);
        resolved.ports.extend(ports);
        resolved.skipped.extend(skipped);
        // Their NAT (a daemon with `--userland-proxy=false`) is in RootlessKit's table.
        if let Some(ct) = &self.docker.conntrack {
            ct.set_tables(self.rootless.tables());
        }
    }

    /// Lets go of ports that left scope more than [`DEPARTED_GRACE`] ago, and so of the
    /// namespaces they hold open (the kernel frees a namespace, and may hand its inode to the
    /// next one made, only once nobody holds it). Called by every rescan and every idle pass:
    /// without a link change there is no rescan.
    pub(super) fn forget_departed(&mut self, now: Instant) {
        self.departed.retain(|_, (_, since)| now.duration_since(*since) < DEPARTED_GRACE);
    }

    /// When the next follow-up check for orphaned namespaces is due.
    pub(super) fn orphan_followup_due(&self) -> Option<Instant> {
        self.orphan_followup.map(|(at, _)| at)
    }

    /// When the next departed port's grace ends (a wake-up is due then, for it alone).
    pub(super) fn departed_due(&self) -> Option<Instant> {
        self.departed.values().map(|(_, since)| *since + DEPARTED_GRACE).min()
    }

    /// At every wake of the loop (cheap when nothing is due): departed ports leave after their
    /// grace even when no link event brings a rescan, and namespaces only bindtrace keeps alive
    /// are let go (see [`crate::netns::scope::Resolver::release_orphans`]), their ports with
    /// them: at once when an event made them suspect, else when the resolver's timer is due.
    pub(super) fn scope_upkeep(&mut self, now: Instant) {
        self.forget_departed(now);
        if std::mem::take(&mut self.orphans_suspect) {
            self.orphan_followup = Some((now, ORPHAN_FOLLOWUP_FIRST));
        }
        let forced = self.orphan_followup.is_some_and(|(at, _)| now >= at);
        if let Some((_, step)) = self.orphan_followup.filter(|_| forced) {
            self.orphan_followup = (step <= ORPHAN_FOLLOWUP_LAST).then(|| (now + step, step * 2));
        }
        match self.resolver.release_orphans(now, forced) {
            Ok(0) => {}
            Ok(n) => {
                log::info!(
                    "{n} namespaces were alive only because bindtrace held them (deleted meanwhile): letting go"
                );
                self.rescan_or_retry();
            }
            Err(e) => log::debug!("checking for namespaces only bindtrace holds: {e} (tried again later)"),
        }
    }

    /// A rescan from the event loop: a failure to list the ports is a hiccup, retried later.
    /// When ports were skipped for want of descriptors while others left, the departed ones'
    /// namespaces were still open during the scan: scan once more now that they are closed.
    pub(super) fn rescan_or_retry(&mut self) {
        for _ in 0..2 {
            match self.rescan() {
                Ok(gaps) if gaps.skipped > 0 && gaps.gone > 0 => continue,
                Ok(_) => return,
                Err(e) => {
                    return self.hiccup(Stage::Rescan, 1, format_args!("{e:#} (the scope stays as it was)"));
                }
            }
        }
    }

    /// What the link watcher reported: overruns and failures are hiccups (the rescan that
    /// follows re-reads every link, so nothing stays missed). A failed watcher is dropped; the
    /// retry makes a new one.
    pub(super) fn on_link_changes(
        &mut self,
        links: &mut Option<LinkWatcher>,
        changes: impl Iterator<Item = std::io::Result<LinkChanges>>,
    ) {
        for c in changes {
            match c {
                Ok(c) if c.overruns > 0 => self.hiccup(
                    Stage::LinkEvents,
                    c.overruns,
                    format_args!(
                        "the link-notification socket overran (ENOBUFS): notifications were lost, every \
                         link is read again"
                    ),
                ),
                Ok(_) => {}
                Err(e) => {
                    *links = None;
                    self.hiccup(
                        Stage::LinkEvents,
                        1,
                        format_args!("reading link notifications: {e} (the watcher is opened again)"),
                    );
                }
            }
        }
    }

    /// Retries what failed once its backoff is over: a new link watcher if the old one failed,
    /// then a rescan (which retries listing the ports, SCOPE entries and tc attachments).
    pub(super) fn retry_hiccups(&mut self, links: &mut Option<LinkWatcher>, now: Instant) {
        if !self.hiccups.retry_due(now) {
            return;
        }
        self.hiccups.take_due(now);
        if links.is_none() {
            match LinkWatcher::new(self.link_rcvbuf) {
                Ok(l) => {
                    *links = Some(l);
                    self.hiccups.succeeded(Stage::LinkEvents);
                }
                Err(e) => {
                    self.hiccup(Stage::LinkEvents, 1, format_args!("subscribing to link changes again: {e}"))
                }
            }
        }
        self.rescan_or_retry();
    }

    /// Counts and logs a hiccup (see `app/hiccups.rs`), and adds it to `bindtrace_errors_total`.
    pub(super) fn hiccup(&mut self, stage: Stage, n: u64, what: std::fmt::Arguments<'_>) {
        self.hiccups.failed(stage, n, what, Instant::now());
        if let Some(m) = &mut self.metrics {
            m.on_errors(stage.label(), n);
        }
    }

    /// The main processes of the workloads whose namespaces are watched with their interfaces
    /// (not only through a bridge): every runtime's, when no `-i` names the bridges.
    pub(super) fn workload_pids(&self) -> Vec<u32> {
        if !self.docker.auto_bridges {
            return Vec::new();
        }
        let Some(inv) = &self.docker.inventory else { return Vec::new() };
        let mut pids: Vec<u32> =
            inv.containers.values().filter(|c| c.pid != 0 && c.owns_netns()).map(|c| c.pid).collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// The watched bridges' address prefixes, for the connect tracker and conntrack, and each
    /// address on its own of the interfaces that have no bridge: routed workload veths, and the
    /// namespaces watched on `lo` (what their forwarder dials, from inside them).
    pub(super) fn refresh_prefixes(&mut self) {
        let mut prefixes = match prefixes::interface_prefixes(&self.bridges.names) {
            Ok(p) => p,
            Err(e) => {
                log::debug!("reading the bridges' addresses: {e}");
                return;
            }
        };
        // Routed veths, and rootless Docker's (their bridge is in RootlessKit's namespace, not
        // ours): the container's own addresses, which its forwarder dials.
        for port in self.ports.values().filter(|p| p.bridge == scope::NO_BRIDGE || p.in_other_namespace()) {
            let ifindex = port.ifindex;
            match port.ns.run(move || prefixes::addresses_of_interface(ifindex)) {
                Ok(addrs) => prefixes.extend(addrs.into_iter().map(|a| prefixes::prefix_of(a, host_bits(a)))),
                Err(e) => log::debug!("reading the addresses of {}: {e}", port.host_ifname),
            }
        }
        for port in self.ports.values().filter(|p| p.on_loopback()) {
            match port.ns.run(prefixes::global_addresses) {
                Ok(addrs) => prefixes.extend(addrs.into_iter().map(|a| prefixes::prefix_of(a, host_bits(a)))),
                Err(e) => log::debug!("reading the addresses of netns {}: {e}", port.ns.inode),
            }
        }
        if prefixes == self.docker.prefixes {
            return;
        }
        let shown: Vec<String> = prefixes.iter().map(prefixes::show_prefix).collect();
        log::debug!("watched prefixes: {}", shown.join(", "));
        if let Some(c) = &mut self.docker.connect {
            c.set_prefixes(&prefixes);
        }
        if let Some(c) = &self.docker.conntrack {
            c.set_prefixes(&prefixes);
        }
        self.docker.prefixes = prefixes;
    }
}

/// The length of a prefix that is one address.
fn host_bits(ip: std::net::IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}
