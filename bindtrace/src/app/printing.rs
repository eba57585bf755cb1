//! From folded lines to written reports: diagnosis for each line, then its attribution, which
//! may be worth waiting a moment for, then the sinks.
use std::{
    io::Write,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::detector::{ATTRIBUTION_POLL, ATTRIBUTION_RETRY, CLIENT_CONTAINER_WAIT, Detector, FRESH_SAMPLE};
use crate::{
    attribution::via,
    diagnose::{
        enrich,
        hint::{HintContext, hint_in},
        namespace_reads::NamespaceReads,
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
    pub(super) fn emit<W: Write>(
        &mut self,
        out: &mut Output<W>,
        line: &Line,
        mut report: Report,
        ctx: DockerContext,
    ) -> anyhow::Result<()> {
        report.hint = hint_in(
            &HintContext { host_port: ctx.published.map(|p| p.host_port) },
            report.verdict,
            report.target_ip,
            report.target_port,
            &report.listeners,
        );
        report.docker = ctx;
        self.keys.counted_in_lines += line.count.unwrap_or(0);
        if line.count.is_none() {
            self.keys.overflow_since.get_or_insert_with(std::time::SystemTime::now);
            report.count_unknown = Some(self.count_unknown());
        }
        if let Some(m) = &mut self.metrics {
            m.on_line(&line.key, &report);
        }
        out.refusal(&report).context("writing output")
    }

    /// Writes `lines`. Each is written as soon as its attribution is complete; those still
    /// waiting for the connector's record or Docker are looked at again every
    /// [`ATTRIBUTION_POLL`], all together, so one slow line never holds up the batch by more.
    pub(super) async fn print<W: Write>(
        &mut self,
        out: &mut Output<W>,
        lines: &[Line],
    ) -> anyhow::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut seen = NamespaceReads::default();
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
}
