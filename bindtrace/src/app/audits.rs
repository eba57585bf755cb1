//! The proactive checks of loopback listeners: audits of published ports as they come due, and
//! the periodic recheck behind the `bindtrace_loopback_listeners` gauge.
use std::{collections::HashMap, io::Write, sync::Arc, time::Instant};

use anyhow::Context as _;

use super::detector::{Detector, port_in};
use crate::{
    diagnose::{namespace_reads::NamespaceReads, verdict},
    netns::Netns,
    sinks::output::Output,
};

impl Detector {
    /// Runs the audit checks that are due and prints what they find.
    pub(super) fn run_audits<W: Write>(&mut self, out: &mut Output<W>) -> anyhow::Result<()> {
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

    /// Checks again the listeners behind `bindtrace_loopback_listeners` (it does nothing until
    /// they are due). Each namespace's listeners are read once per pass.
    pub(super) fn recheck_loopback(&mut self, now: Instant) {
        let Some(m) = &mut self.metrics else { return };
        let (ports, departed) = (&self.ports, &self.departed);
        let mut reads = NamespaceReads::default();
        m.recheck_loopback(now, |key, target| {
            let port = port_in(ports, departed, key)?;
            let found = reads.listening(&port.ns).ok()?;
            Some(verdict::decide(target, key.port, &found.listeners))
        });
    }
}
