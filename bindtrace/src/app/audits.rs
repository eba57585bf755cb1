//! The proactive checks of loopback listeners: audits of published ports as they come due, and
//! the periodic recheck behind the `bindtrace_loopback_listeners` gauge.
use std::{collections::HashMap, io::Write, sync::Arc, time::Instant};

use anyhow::Context as _;

use super::detector::{Detector, port_in};
use crate::{
    diagnose::{
        audit::Auditor, listeners::Proto, namespace_reads::NamespaceReads, report::AuditReport, verdict,
    },
    netns::Netns,
    sinks::output::Output,
};

impl Detector {
    /// Sends the auditor to the worker when checks are due (see `app/enrichment.rs`); what it
    /// finds is printed when it is back ([`Detector::on_audited`]).
    pub(super) fn run_audits<W: Write>(&mut self, out: &mut Output<W>) -> anyhow::Result<()> {
        let Some(inv) = self.docker.inventory.clone() else { return Ok(()) };
        let now = Instant::now();
        if self.docker.auditor.as_ref().and_then(|a| a.next_due()).is_none_or(|t| t > now) {
            return Ok(());
        }
        let Some(auditor) = self.docker.auditor.take() else { return Ok(()) };
        let in_scope: HashMap<u64, Arc<Netns>> =
            self.ports.values().map(|p| (p.ns.inode, p.ns.clone())).collect();
        if let Err(mut auditor) = self.enricher.audit(auditor, inv.clone(), in_scope.clone(), now) {
            // No worker: check here rather than not at all.
            let reports = auditor.run(&inv, &in_scope, now);
            return self.on_audited(out, auditor, reports);
        }
        Ok(())
    }

    /// The auditor is back: it learns what the inventory did meanwhile, and its reports are
    /// written.
    pub(super) fn on_audited<W: Write>(
        &mut self,
        out: &mut Output<W>,
        mut auditor: Box<Auditor>,
        reports: Vec<AuditReport>,
    ) -> anyhow::Result<()> {
        if std::mem::take(&mut self.docker.audit_missed_inventory)
            && let Some(inv) = &self.docker.inventory
            && !inv.stale
        {
            auditor.on_inventory(inv, Instant::now());
        }
        self.docker.auditor = Some(auditor);
        for report in reports {
            if let Some(m) = &mut self.metrics {
                m.on_audit(&report);
            }
            out.audit(&report).context("writing output")?;
        }
        if let (Some(m), Some(inv)) = (&mut self.metrics, &self.docker.inventory) {
            m.retain_audited(|runtime, name| {
                inv.containers.values().any(|c| c.runtime.as_str() == runtime && c.name == name)
            });
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
            let found = reads.listening(&port.ns, Proto::from_ip(key.proto)).ok()?;
            Some(verdict::decide(target, key.port, &found.listeners, &found.v6only))
        });
    }
}
