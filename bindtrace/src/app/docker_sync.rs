//! Taking in what the Docker watcher reports: new networks' bridges, the inventory behind names
//! and published ports, container starts for the audit.
use std::{collections::BTreeSet, sync::Arc, time::Instant};

use super::detector::Detector;
use crate::{
    netns::scope,
    sources::docker::{Inventory, watch::DockerState},
};

impl Detector {
    /// Takes in what the Docker watcher reports: new networks' bridges (without `-i`), the
    /// inventory for names and published ports, and container starts for the audit.
    pub(super) fn apply_docker(&mut self, state: &DockerState) -> anyhow::Result<()> {
        let Some(inv) = state.inventory().cloned() else { return Ok(()) };
        let mut added = false;
        // The first inventory's bridges are in the start-up summary ("ready: watching ..."):
        // one line each only for networks that come later.
        let at_start = self.docker.inventory.is_none();
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
                        if at_start {
                            log::debug!("following Docker network bridge {bridge}");
                        } else {
                            log::info!("following Docker network bridge {bridge}");
                        }
                    } else {
                        log::debug!("Docker network bridge {bridge} is not in this network namespace");
                    }
                }
            }
            for gone in before.difference(&now) {
                log::info!("Docker network bridge {gone} removed");
            }
        }
        // Containers forwarded over their own `lo`, and rootless Docker's, are in scope through
        // the inventory, not through a bridge of ours: a change among them is a rescan too.
        added |= loopback_forwarders(self.docker.inventory.as_deref()) != loopback_forwarders(Some(&inv));
        // While the daemon is away its last word is kept, marked stale: names only for
        // containers whose process is still in the namespace.
        let workloads_before = self.workload_pids();
        self.docker.inventory = Some(if state.is_up() { inv.clone() } else { Arc::new(inv.as_stale()) });
        // A workload's veths are watched once it is known: its namespace may have got them
        // before the runtime reported it (containerd's CNI set-up), with no link change since.
        if added || self.workload_pids() != workloads_before {
            self.rescan_or_retry();
        }
        if state.is_up() {
            match self.docker.auditor.as_mut() {
                Some(a) => a.on_inventory(&inv, Instant::now()),
                None => self.docker.audit_missed_inventory = true,
            }
        }
        Ok(())
    }

    /// Applies the Docker watcher's latest state if it changed since last looked at.
    pub(super) fn sync_docker(&mut self) -> anyhow::Result<()> {
        let Some(rx) = self.docker.state.as_mut() else { return Ok(()) };
        if !rx.has_changed().unwrap_or(false) {
            return Ok(());
        }
        let state = rx.borrow_and_update().clone();
        self.apply_docker(&state)
    }

    pub(super) fn docker_up(&self) -> bool {
        self.docker.state.as_ref().is_some_and(|rx| rx.borrow().is_up())
    }

    /// Whether a connector's namespace is neither ours nor a container Docker has reported.
    pub(super) fn unknown_netns(&self, ino: u64) -> bool {
        ino != self.docker.own_netns
            && self.docker.inventory.as_ref().is_none_or(|inv| inv.by_netns(ino).is_none())
    }
}

/// The containers whose `lo` is in scope (see `netns/loopback.rs`), and rootless Docker's,
/// whose veths are in RootlessKit's namespace (`netns/rootless.rs`), with the process and
/// namespace they were reported with.
fn loopback_forwarders(inv: Option<&Inventory>) -> BTreeSet<(String, u32, Vec<u64>)> {
    inv.iter()
        .flat_map(|i| i.containers.values())
        .filter(|c| c.forwards_over_loopback() || c.rootless_daemon.is_some())
        .map(|c| (c.id.clone(), c.pid, c.netns_inodes.clone()))
        .collect()
}
