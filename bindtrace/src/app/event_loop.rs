//! The event loop: waits on signals, the ring buffer, link changes, Docker, audits and the poll
//! timer, and hands each to its handler; the final flush prints everything still counted.
use std::{
    io::Write,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use bindtrace_common::{EVENT_CONNECT_UNATTRIBUTED, EVENT_OVERFLOW};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::{mpsc::UnboundedReceiver, watch},
};

use super::{
    detector::{DOCKER_START_WAIT, Detector, IDLE_POLL, RESCAN_DEBOUNCE},
    enrichment::Done,
    timer::PollTimer,
};
use crate::{
    netns::scope,
    sinks::output::Output,
    sources::{
        docker::watch::DockerState,
        fold::key_of,
        kernel_log::KernelLog,
        link_events::{LinkChanges, LinkWatcher},
        ring,
    },
};

/// When the loop must wake next even if nothing arrives: the idle pass, the earliest fold
/// window to close, or the rescan a burst of link changes asked for. None: nothing is pending,
/// the loop sleeps until the kernel, a runtime, netlink or inotify says something.
struct Deadlines {
    next_full: Option<Instant>,
    /// The idle pass that reads the loss counters after samples: set by the first sample after
    /// a pass and kept, so that a flood's stream of wake-ups does not push it back.
    after_samples: Option<Instant>,
    next_poll: Option<Instant>,
    rescan_at: Option<Instant>,
}

impl Detector {
    /// Runs until a signal, the optional duration, or an error.
    pub(crate) async fn run<W: Write>(
        mut self,
        out: &mut Output<W>,
        duration: Option<Duration>,
    ) -> anyhow::Result<()> {
        let ring: RingBuf<MapData> = self.loaded.events.take().context("ring buffer already taken")?;
        // SAFETY: the ring buffer owns its fd, and the AsyncFd owns the ring buffer, so the fd
        // stays open for as long as it is registered.
        let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }?;
        let mut links = Some(LinkWatcher::new(self.link_rcvbuf).context("subscribing to link changes")?);
        let mut kernel_log = KernelLog::new(&mut self.loaded.ebpf);
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let stop_at = sleep_until_opt(duration.map(|d| Instant::now() + d));
        tokio::pin!(stop_at);

        let mut docker_state = self.docker.state.clone();
        let mut enriched = self.enricher.take_receiver();
        self.start(out, docker_state.as_mut()).await?;

        let mut poll_timer = PollTimer::new().context("creating the poll timer")?;
        // Handles of namespaces (`ip netns`, Docker's): their removal may leave a namespace that
        // only bindtrace holds, and says so without a timer.
        let mut handles = crate::sources::containerd::inotify::Watcher::new("namespace handles")
            .inspect_err(|e| log::debug!("no inotify on the namespace handles ({e}): checked on a timer"))
            .ok();
        if handles.is_none() {
            self.resolver.watch_lost();
        }
        let mut at = Deadlines { next_full: None, after_samples: None, next_poll: None, rescan_at: None };
        self.plan_wake(&mut at, Instant::now());
        loop {
            if let Some(h) = handles.as_mut() {
                for dir in crate::netns::HANDLE_DIRS {
                    h.watch_existing(std::path::Path::new(dir));
                }
            }
            poll_timer.arm(at.next_poll).context("arming the poll timer")?;
            let audit_at = self.docker.auditor.as_ref().and_then(|a| a.next_due());
            tokio::select! {
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                _ = &mut stop_at => break,
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    let samples = ring::drain(guard.get_inner_mut());
                    guard.clear_ready();
                    self.on_samples(out, samples)?;
                }
                done = enriched_batch(&mut enriched) => {
                    self.on_done(out, done, &mut || ring::drain(ring.get_mut()))?;
                }
                () = docker_changed(&mut docker_state) => {
                    self.orphans_suspect = true;
                    self.sync_docker()?;
                    self.run_audits(out)?;
                }
                changed = handles_changed(&mut handles) => {
                    if let Err(e) = changed {
                        log::debug!("inotify on the namespace handles failed ({e}): checked on a timer");
                        handles = None;
                        self.resolver.watch_lost();
                    }
                    self.orphans_suspect = true;
                }
                _ = sleep_until_opt(audit_at) => self.run_audits(out)?,
                changed = link_changes(&mut links) => {
                    self.orphans_suspect = true;
                    self.on_link_changes(&mut links, std::iter::once(changed));
                    // A container start is a burst of notifications: one rescan covers it, at a
                    // deadline of the loop's own, so samples and events are not held up meanwhile.
                    at.rescan_at.get_or_insert(Instant::now() + RESCAN_DEBOUNCE);
                }
                _ = kernel_log.readable() => kernel_log.flush(),
                fired = poll_timer.wait() => fired.context("waiting on the poll timer")?,
            }
            self.on_wake(out, &mut at)?;
            self.retry_hiccups(&mut links, Instant::now());
        }
        self.finish(out, &mut enriched).await
    }

    /// Before the loop: Docker's first answer (for its bridges and names), the first audits,
    /// then the ready line.
    async fn start<W: Write>(
        &mut self,
        out: &mut Output<W>,
        docker_state: Option<&mut watch::Receiver<DockerState>>,
    ) -> anyhow::Result<()> {
        if let Some(rx) = docker_state {
            let _ = tokio::time::timeout(DOCKER_START_WAIT, rx.wait_for(|s| s.settled())).await;
            rx.borrow_and_update();
            let state = self.docker.state.as_mut().map(|r| r.borrow_and_update().clone());
            let state = state.unwrap_or(DockerState::Connecting);
            self.apply_docker(&state)?;
            if self.bridges.names.is_empty()
                && let DockerState::Down { error, .. } = &state
            {
                anyhow::bail!(
                    "no bridge to watch: there is no {} here and the Docker API is unavailable ({error}); \
                     name the bridges with -i",
                    scope::DOCKER0
                );
            }
        }
        self.run_audits(out)?;
        log::info!(
            "ready: watching {} ({} container interfaces)",
            self.bridges.names.join(", "),
            self.ports.len()
        );
        // Tests and scripts wait for this line on stderr.
        eprintln!("bindtrace: ready");
        Ok(())
    }

    /// Samples from the ring buffer: each key's total read at once, folded into lines.
    pub(super) fn on_samples<W: Write>(
        &mut self,
        out: &mut Output<W>,
        samples: Vec<bindtrace_common::RefusalEvent>,
    ) -> anyhow::Result<()> {
        let now = Instant::now();
        let mut lines = Vec::new();
        let mut overflowed = false;
        let mut unattributed = false;
        for ev in samples {
            if ev.flags & EVENT_CONNECT_UNATTRIBUTED != 0 {
                unattributed = true;
                continue;
            }
            if ev.flags & EVENT_OVERFLOW != 0 {
                self.keys.overflow_lines.on_sample(key_of(&ev), ev.ktime_ns);
                overflowed = true;
            }
            let total = self.key_total(&key_of(&ev));
            lines.extend(self.folder.on_event(ev, total, now));
        }
        self.samples_since_pass = true;
        if unattributed && let Some(connect) = &mut self.docker.connect {
            // Parking now, not at the next idle pass: the connects that start meanwhile
            // would go unattributed too.
            connect.warn_unattributed(&mut self.loaded.ebpf);
        }
        if overflowed {
            // The active map is full: make room now rather than at the next idle pass.
            self.sync_keys(now, self.loaded.stats().1);
        }
        self.print(out, &lines, false)
    }

    /// After every wake-up: the idle pass when it is due, then the fold windows that closed.
    fn on_wake<W: Write>(&mut self, out: &mut Output<W>, at: &mut Deadlines) -> anyhow::Result<()> {
        let now = Instant::now();
        if at.rescan_at.is_some_and(|t| t <= now) {
            at.rescan_at = None;
            self.rescan_or_retry();
        }
        if at.next_full.is_some_and(|t| now >= t) {
            // The idle pass: the loss counters, the loopback gauge, and, only when samples
            // were lost (a key may then be known to the kernel alone), every key's count.
            // Otherwise every key announced itself with a sample, and closed windows are
            // read one key at a time below: a pass over 10 000 keys takes ~40 ms of syscalls.
            let stats = self.loaded.stats();
            let samples_lost = stats.0 > self.lost_at_pass;
            self.lost_at_pass = stats.0;
            if samples_lost || self.folder.awaiting_samples() {
                let totals = self.loaded.counts.totals();
                let lines = self.folder.on_totals(&totals, now, false);
                self.print(out, &lines, false)?;
            }
            let lines = self.overflow_lines(samples_lost, stats.1);
            self.print(out, &lines, false)?;
            self.report_lost(out, stats)?;
            self.sync_keys(now, stats.1);
            self.recheck_loopback(now);
            self.samples_since_pass = false;
            at.after_samples = None;
        }
        self.scope_upkeep(now);
        // Windows that closed: one lookup per key, not a pass over the whole map (a burst of
        // new ports closes a window every millisecond or so).
        let mut lines = Vec::new();
        for key in self.folder.due(now) {
            let total = self.key_total(&key);
            lines.extend(self.folder.on_key_total(key, total, now));
        }
        if !lines.is_empty() && self.samples_since_pass {
            // A folded line completes its key's count: the samples lost meanwhile are said with
            // it (and in the metrics), not only at the next idle pass.
            let stats = self.loaded.stats();
            self.report_lost(out, stats)?;
        }
        self.print(out, &lines, false)?;
        self.retry_attribution(out)?;
        // The terminal form's scans that stopped get their SCAN line.
        out.scans_ended().context("writing output")?;
        self.plan_wake(at, now);
        Ok(())
    }

    /// The next deadline of the loop: the earliest of everything pending, or none.
    fn plan_wake(&self, at: &mut Deadlines, now: Instant) {
        if self.samples_since_pass || self.folder.awaiting_samples() || self.keys.overflow_lines.awaiting() {
            at.after_samples.get_or_insert(now + IDLE_POLL);
        }
        at.next_full = at.after_samples.into_iter().chain(self.next_idle_pass(now)).min();
        at.next_poll = [
            at.next_full,
            self.folder.next_deadline(),
            self.next_attribution_poll(now),
            at.rescan_at,
            self.hiccups.next_retry(),
            self.departed_due(),
            self.orphan_followup_due(),
            self.resolver.orphan_check_due(),
        ]
        .into_iter()
        .flatten()
        .min();
    }

    /// When the idle pass must run next for what it keeps (besides the samples' losses, read
    /// a second after them: [`Deadlines::after_samples`]). Idle means nothing is pending: no
    /// key the kernel or userspace still holds (flipped out and forgotten at the key
    /// lifecycle's pace), no loopback gauge to recheck. Then the loop has no timer at all.
    fn next_idle_pass(&self, now: Instant) -> Option<Instant> {
        let counts = &self.loaded.counts;
        let reclaim = counts.lifecycle()
            && (counts.kernel_keys() > 0 || self.folder.len() > 0 || counts.drained_keys() > 0);
        let loopback = self.metrics.as_ref().and_then(|m| m.loopback_recheck_at());
        [reclaim.then_some(self.keys.next_flip.max(now)), loopback].into_iter().flatten().min()
    }

    /// After the loop: nothing counted stays unprinted (every line queued for diagnosis is
    /// waited for), then the summary and the detach.
    async fn finish<W: Write>(
        mut self,
        out: &mut Output<W>,
        enriched: &mut Option<UnboundedReceiver<Done>>,
    ) -> anyhow::Result<()> {
        let totals = self.loaded.counts.totals();
        let lines = self.folder.on_totals(&totals, Instant::now(), true);
        self.print(out, &lines, true)?;
        self.drain_lines(out, enriched).await?;
        let stats = self.loaded.stats();
        self.report_lost(out, stats)?;
        out.finish().context("writing output")?;
        log::info!(
            "detaching; {}",
            summary(
                self.keys.counted_in_lines,
                self.keys.at_least_in_lines,
                stats.1,
                self.loaded.recursion_misses()
            )
        );
        drop(self);
        eprintln!("bindtrace: detached");
        Ok(())
    }
}

/// The exit summary's figures: every refusal counted (per key, plus those that found the map
/// full), and whether that is exact. `at_least` of the keyed ones are UDP on the tc hook, a
/// lower bound whatever the hook's own exactness.
fn summary(keyed: u64, at_least: u64, overflow: u64, recursion_misses: Option<u64>) -> String {
    let total = keyed + overflow;
    let split = if overflow > 0 {
        format!(
            " ({keyed} with their own count, {overflow} found the count map full and are counted without a key)"
        )
    } else {
        String::new()
    };
    let exactness = match recursion_misses {
        Some(0) if at_least > 0 => " (the hook never skipped)".to_owned(),
        Some(0) => " (exact: the hook never skipped)".to_owned(),
        Some(m) => format!(" (a lower bound: the kernel skipped the hook {m} times)"),
        None => " (exact unless the kernel skipped the hook: this kernel does not say)".to_owned(),
    };
    if at_least > 0 {
        return format!(
            "at least {total} refusals counted since start{exactness}{split}; at least {at_least} UDP \
             datagrams among them, counted from the ICMP port unreachables the tc hook saw, which \
             the kernel rate-limits"
        );
    }
    format!("{total} refusals counted since start{exactness}{split}")
}

/// The next result of the enrichment worker (never once its channel is gone).
async fn enriched_batch(rx: &mut Option<UnboundedReceiver<Done>>) -> Done {
    if let Some(r) = rx.as_mut()
        && let Some(batch) = r.recv().await
    {
        return batch;
    }
    *rx = None;
    std::future::pending().await
}

/// The link watcher's next wake-up; never while there is no watcher (it failed, and the retry
/// that makes a new one is pending).
async fn link_changes(links: &mut Option<LinkWatcher>) -> std::io::Result<LinkChanges> {
    match links.as_mut() {
        Some(l) => l.changed().await,
        None => std::future::pending().await,
    }
}

/// Resolves when a namespace handle directory changed (never without the watch).
async fn handles_changed(
    handles: &mut Option<crate::sources::containerd::inotify::Watcher>,
) -> std::io::Result<()> {
    match handles.as_mut() {
        Some(h) => {
            h.changed().await?;
            h.drain();
            Ok(())
        }
        None => std::future::pending().await,
    }
}

/// Resolves when the Docker state changed (never without Docker, or once the watcher is gone).
/// `rx` is the loop's own clone: the state itself is read from the detector's receiver.
async fn docker_changed(rx: &mut Option<watch::Receiver<DockerState>>) {
    if let Some(r) = rx.as_mut()
        && r.changed().await.is_ok()
    {
        r.borrow_and_update();
        return;
    }
    *rx = None;
    std::future::pending().await
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::summary;

    #[test]
    fn the_summary_says_at_least_when_udp_was_counted_from_replies() {
        assert_eq!(
            summary(5, 0, 0, Some(0)),
            "5 refusals counted since start (exact: the hook never skipped)"
        );
        let s = summary(7, 4, 0, Some(0));
        assert!(s.starts_with("at least 7 refusals counted since start (the hook never skipped)"), "{s}");
        assert!(s.contains("at least 4 UDP datagrams among them"), "{s}");
    }
}
