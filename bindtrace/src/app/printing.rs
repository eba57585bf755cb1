//! From folded lines to written reports: diagnosis for each line (on the enrichment worker),
//! then its attribution, which may be worth waiting a moment for (without holding up the
//! loop), then the sinks.
use std::{
    io::Write,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bindtrace_common::RefusalEvent;
use tokio::sync::mpsc::UnboundedReceiver;

use super::{
    detector::{ATTRIBUTION_POLL, ATTRIBUTION_RETRY, CLIENT_CONTAINER_WAIT, Detector, FRESH_SAMPLE},
    enrichment::{Done, Enriched},
    hiccups::Stage,
};
use crate::{
    attribution::via::{self, UdpLookups, UdpSources},
    diagnose::{
        enrich::{self, Undiagnosed},
        hint::{HintContext, hint_in},
        report::{DockerContext, Report},
    },
    kernel::clock::monotonic_ns,
    sinks::output::Output,
    sources::fold::Line,
};

impl Detector {
    /// The Docker side of one line: the container, the published port, `via`. Returns None
    /// while it is worth waiting for more (see [`ATTRIBUTION_RETRY`], [`CLIENT_CONTAINER_WAIT`]).
    pub(super) fn attribution(
        &self,
        report: &Report,
        line: &Line,
        udp: &UdpLookups,
        waited: Duration,
    ) -> Option<DockerContext> {
        let fresh = line
            .sample
            .is_some_and(|s| monotonic_ns().saturating_sub(s.ktime_ns) < FRESH_SAMPLE.as_nanos() as u64);
        let tracking = self.docker.connect.is_some() || self.docker.conntrack.is_some();
        let ctx = via::docker_context(
            report,
            self.docker.inventory.as_deref(),
            self.docker.connect.as_ref(),
            self.docker.conntrack.as_ref(),
            udp,
        );
        // Worth waiting for: the connector's record (completed by the reset) or conntrack's
        // event, for a moment; the container a client process runs in, while Docker is up and
        // may not have reported it yet. A UDP line has nothing to wait for: conntrack's entry
        // and the proxy's socket existed before the datagram was refused (or are gone for good),
        // so its lookups are made once, on the worker, not polled.
        let no_via = ctx.via.is_none() && tracking && report.proto != "udp" && waited < ATTRIBUTION_RETRY;
        // RootlessKit's namespace, where a rootless daemon's docker-proxy runs, is no container's.
        let unknown_client = ctx.client_container.is_none()
            && ctx.via != Some(crate::diagnose::report::Via::Rootlesskit)
            && ctx.client_netns.is_some_and(|ino| self.unknown_netns(ino))
            && self.docker_up()
            && waited < CLIENT_CONTAINER_WAIT;
        if fresh && (no_via || unknown_client) { None } else { Some(ctx) }
    }

    /// Completes a report with its Docker context and writes it.
    pub(super) fn emit<W: Write>(
        &mut self,
        out: &mut Output<W>,
        line: &Line,
        mut report: Report,
        ctx: DockerContext,
    ) -> anyhow::Result<()> {
        report.hint = hint_in(
            &HintContext { host_port: ctx.published.map(|p| p.host_port), udp: report.proto == "udp" },
            report.verdict,
            report.target_ip,
            report.target_port,
            &report.listeners,
        );
        if let Some(why) = report.undiagnosed.and_then(Undiagnosed::from_str) {
            report.hint = why.hint().to_owned();
        }
        report.docker = ctx;
        self.keys.counted_in_lines += line.count.unwrap_or(0);
        if report.count_at_least {
            self.keys.at_least_in_lines += line.count.unwrap_or(0);
        }
        if line.count.is_none() {
            self.keys.overflow_since.get_or_insert_with(std::time::SystemTime::now);
            report.count_unknown = Some(self.count_unknown());
        }
        if let Some(m) = &mut self.metrics {
            m.on_line(&line.key, &report);
        }
        out.refusal(&report).context("writing output")
    }

    /// Hands `lines` to the enrichment worker (see `app/enrichment.rs`); those the queue has
    /// no room for are written at once, undiagnosed, and counted. With `force` (the exit
    /// flush) every line is queued.
    pub(super) fn print<W: Write>(
        &mut self,
        out: &mut Output<W>,
        lines: &[Line],
        force: bool,
    ) -> anyhow::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let batch = lines.iter().map(|l| (l.clone(), self.port_for(&l.key).cloned())).collect();
        let udp = UdpSources {
            daemon: self.docker.inventory.as_ref().and_then(|inv| inv.daemon.clone()),
            conntrack: self.docker.conntrack.is_some(),
            tables: self.docker.conntrack.as_ref().map(|c| c.tables_by_refused()).unwrap_or_default(),
            connects: self.docker.connect.as_ref().and_then(|c| c.udp()),
        };
        let rejected = self.enricher.submit(batch, &self.bridges, self.hook_name, udp, force);
        if rejected.is_empty() {
            self.hiccups.succeeded(Stage::Enrich);
            return Ok(());
        }
        let capacity = self.enricher.capacity();
        self.hiccup(
            Stage::Enrich,
            rejected.len() as u64,
            format_args!(
                "{} lines are written without a diagnosis (verdict unknown, undiagnosed \"queue_full\"): the \
                 enrichment queue holds {capacity} lines (--enrich-queue) and a namespace is slow to read",
                rejected.len()
            ),
        );
        self.sync_docker()?;
        for (line, port) in rejected {
            let report = enrich::undiagnosed(
                &line,
                port.as_ref(),
                &self.bridges,
                self.hook_name,
                Undiagnosed::QueueFull,
            );
            // No UDP lookups either: they would make the loop wait as long as the worker does.
            self.attribute_or_wait(
                out,
                Enriched { line, report, udp: UdpLookups::default() },
                Instant::now(),
            )?;
        }
        Ok(())
    }

    /// What the worker sends back: diagnosed lines, or the auditor with its reports. `ring`
    /// takes the samples waiting in the kernel's ring buffer (see [`Detector::on_enriched`]).
    pub(super) fn on_done<W: Write>(
        &mut self,
        out: &mut Output<W>,
        done: Done,
        ring: &mut dyn FnMut() -> Vec<RefusalEvent>,
    ) -> anyhow::Result<()> {
        match done {
            Done::Lines(batch) => self.on_enriched(out, batch, ring),
            Done::Audit(auditor, reports) => self.on_audited(out, auditor, reports),
            Done::Rechecked { found, asked } => {
                self.on_rechecked(found, asked);
                Ok(())
            }
        }
    }

    /// A batch the worker diagnosed: each line is written once its attribution is complete.
    ///
    /// A burst of new keys comes back as batches of thousands of lines, and writing one takes
    /// its ~10 us (the report, its hint, the metrics, the JSON): the loop would not read the
    /// ring meanwhile, and a 256 KiB ring holds ~2 900 samples, ~20 ms of a burst at the
    /// maximum rate. So the lines are written in runs of [`EMIT_RUN`], each with one flush, and
    /// the ring is drained between runs: samples wait in userspace for their turn, not in the
    /// kernel where a full ring drops them.
    fn on_enriched<W: Write>(
        &mut self,
        out: &mut Output<W>,
        batch: Vec<Enriched>,
        ring: &mut dyn FnMut() -> Vec<RefusalEvent>,
    ) -> anyhow::Result<()> {
        self.enricher.returned(batch.len());
        self.sync_docker()?;
        let now = Instant::now();
        let mut batch = batch.into_iter().peekable();
        while batch.peek().is_some() {
            out.hold();
            for enriched in batch.by_ref().take(EMIT_RUN) {
                self.attribute_or_wait(out, enriched, now)?;
            }
            out.release().context("writing output")?;
            let samples = ring();
            if !samples.is_empty() {
                self.on_samples(out, samples)?;
            }
        }
        Ok(())
    }

    fn attribute_or_wait<W: Write>(
        &mut self,
        out: &mut Output<W>,
        enriched: Enriched,
        since: Instant,
    ) -> anyhow::Result<()> {
        let Enriched { line, report, udp } = enriched;
        match self.attribution(&report, &line, &udp, since.elapsed()) {
            Some(ctx) => self.emit(out, &line, report, ctx),
            None => {
                self.awaiting.push(Awaiting { enriched: Enriched { line, report, udp }, since });
                Ok(())
            }
        }
    }

    /// Lines still waiting for the connector's record or Docker, looked at again (every
    /// [`ATTRIBUTION_POLL`] while there are any: see [`Detector::next_attribution_poll`]).
    pub(super) fn retry_attribution<W: Write>(&mut self, out: &mut Output<W>) -> anyhow::Result<()> {
        if self.awaiting.is_empty() {
            return Ok(());
        }
        self.sync_docker()?;
        for a in std::mem::take(&mut self.awaiting) {
            self.attribute_or_wait(out, a.enriched, a.since)?;
        }
        Ok(())
    }

    /// When the lines awaiting their attribution are due for another look.
    pub(super) fn next_attribution_poll(&self, now: Instant) -> Option<Instant> {
        (!self.awaiting.is_empty()).then(|| now + ATTRIBUTION_POLL)
    }

    /// The exit flush's end: every line handed to the worker back and written (and the
    /// auditor back, with what it found), and those awaiting attribution given the time they
    /// are owed (each waits at most [`CLIENT_CONTAINER_WAIT`]).
    pub(super) async fn drain_lines<W: Write>(
        &mut self,
        out: &mut Output<W>,
        done: &mut Option<UnboundedReceiver<Done>>,
    ) -> anyhow::Result<()> {
        while self.enricher.queued() > 0 || self.docker.auditor.is_none() {
            match done.as_mut() {
                Some(rx) => match rx.recv().await {
                    // The final count was read: samples still arriving change no line.
                    Some(d) => self.on_done(out, d, &mut Vec::new)?,
                    None => anyhow::bail!(
                        "the enrichment worker stopped with {} lines queued",
                        self.enricher.queued()
                    ),
                },
                None => break,
            }
        }
        while !self.awaiting.is_empty() {
            tokio::time::sleep(ATTRIBUTION_POLL).await;
            self.retry_attribution(out)?;
        }
        Ok(())
    }
}

/// Lines of a diagnosed batch written with one flush, between two reads of the ring buffer:
/// short enough that the ring is read every ~0.5 ms during a burst, long enough that the write
/// is not per line.
const EMIT_RUN: usize = 32;

/// A diagnosed line waiting for its attribution, since `since`.
pub(crate) struct Awaiting {
    enriched: Enriched,
    since: Instant,
}
