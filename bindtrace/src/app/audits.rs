//! The proactive checks of loopback listeners: audits of published ports as they come due, and
//! the periodic recheck behind the `bindtrace_loopback_listeners` gauge.
use std::{collections::HashMap, io::Write, sync::Arc, time::Instant};

use anyhow::Context as _;

use bindtrace_common::CountKey;

use super::{
    detector::{Detector, port_in},
    enrichment,
};
use crate::{
    diagnose::{audit::Auditor, report::AuditReport, verdict::Decision},
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

    /// Sends the listeners behind `bindtrace_loopback_listeners` to the worker to be checked
    /// again, when they are due (reading a namespace takes as long as the host makes it: not on
    /// the loop); [`Detector::on_rechecked`] takes in what it found.
    pub(super) fn recheck_loopback(&mut self, now: Instant) {
        let Some(m) = &mut self.metrics else { return };
        let Some(due) = m.loopback_recheck_due(now) else { return };
        let keys: Vec<enrichment::Recheck> = due
            .into_iter()
            .map(|(key, target)| {
                (key, target, port_in(&self.ports, &self.departed, &key).map(|p| p.ns.clone()))
            })
            .collect();
        if let Err(keys) = self.enricher.recheck(keys, now) {
            // No worker: check here rather than not at all.
            m.loopback_rechecked(enrichment::recheck(keys), now);
        }
    }

    /// The worker's recheck is back.
    pub(super) fn on_rechecked(&mut self, found: Vec<(CountKey, Option<Decision>)>, asked: Instant) {
        if let Some(m) = &mut self.metrics {
            m.loopback_rechecked(found, asked);
        }
    }
}
