//! Keeping the scope current: the watched bridges' ports in the kernel's SCOPE map (and the tc
//! attachments), and their address prefixes in the connect tracker and conntrack.
use std::{collections::HashSet, time::Instant};

use anyhow::Context as _;
use bindtrace_common::ScopeKey;

use super::detector::{DEPARTED_GRACE, Detector};
use crate::netns::prefixes;

impl Detector {
    /// Recomputes the scope and brings the kernel's SCOPE map in line with it.
    pub(super) fn rescan(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        let fresh = self.resolver.resolve(&self.bridges).context("resolving bridge ports")?;
        let gone: HashSet<ScopeKey> = self.ports.keys().filter(|k| !fresh.contains_key(k)).copied().collect();
        for &key in &gone {
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
        // No hook can count for the departed ports any more: their keys may leave the kernel.
        self.retire_keys(&gone);
        self.departed.retain(|_, (_, since)| now.duration_since(*since) < DEPARTED_GRACE);
        self.refresh_prefixes();
        Ok(())
    }

    /// The watched bridges' address prefixes, for the connect tracker and conntrack.
    pub(super) fn refresh_prefixes(&mut self) {
        let prefixes = match prefixes::interface_prefixes(&self.bridges.names) {
            Ok(p) => p,
            Err(e) => {
                log::debug!("reading the bridges' addresses: {e}");
                return;
            }
        };
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
