//! Line enrichment off the event loop. Diagnosing a line means reading its namespace's
//! listeners (joining the namespace from a thread) and finding who holds them (walking
//! `/proc/PID/fd`): that takes as long as the host makes it, and one process holding a million
//! descriptors makes a single walk take seconds. So it runs on a worker thread, and the loop
//! only hands batches over and takes reports back: scope updates, count reads and runtime
//! events are never behind a slow namespace.
//!
//! The queue is bounded in lines (`--enrich-queue`). A batch that does not fit is not
//! diagnosed: its lines are written at once, with their exact counts, verdict `unknown` and
//! `undiagnosed: "queue_full"`, and counted in `bindtrace_errors_total{stage="enrich"}`. No
//! count waits on the worker for longer than it takes, and none is lost to it.
//!
//! The audit runs there too: checking a started container's published ports reads its
//! namespace the same way. The [`Auditor`] itself travels to the worker with the inventory and
//! comes back with its reports, so its schedule has one owner at a time. So do a UDP line's
//! attribution lookups (a ctnetlink query; the daemon's namespace, a sock_diag dump and a /proc
//! walk for docker-proxy's socket: `attribution/via.rs`) and the periodic recheck of the
//! listeners behind `bindtrace_loopback_listeners` (one read of each tracked namespace).
use std::{
    collections::HashMap,
    panic::{AssertUnwindSafe, catch_unwind},
    sync::{Arc, mpsc},
    thread,
    time::Instant,
};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use bindtrace_common::CountKey;

use crate::{
    attribution::via::{self, UdpLookups, UdpSources},
    diagnose::{
        audit::Auditor,
        enrich,
        listeners::Proto,
        namespace_reads::NamespaceReads,
        report::{AuditReport, Report},
        verdict::{self, Decision},
    },
    netns::{
        Netns,
        scope::{Bridges, Port},
    },
    sources::{docker::Inventory, fold::Line},
};

/// A tracked loopback-only key to check again: its target address, and its namespace (None
/// when its port is gone from scope: the key then leaves the gauge).
pub(crate) type Recheck = (CountKey, std::net::IpAddr, Option<Arc<Netns>>);

/// Lines the queue holds by default: a port scan's burst of new keys fits (a batch of one
/// namespace is one listener dump however many lines it has).
pub(crate) const DEFAULT_QUEUE_LINES: usize = 16_384;

/// What the worker does.
enum Job {
    /// Lines that arrived together: they share one read of each namespace.
    Lines { lines: Vec<(Line, Option<Port>)>, bridges: Bridges, hook: &'static str, udp: UdpSources },
    /// The loopback-only listeners to check again, asked at `asked`.
    Recheck { keys: Vec<Recheck>, asked: Instant },
    /// The audits due at `now`, against `inventory`, for the namespaces in scope.
    Audit {
        auditor: Box<Auditor>,
        inventory: Arc<Inventory>,
        in_scope: HashMap<u64, Arc<Netns>>,
        now: Instant,
    },
}

/// What comes back.
pub(crate) enum Done {
    /// Diagnosed lines, in the order of their batch.
    Lines(Vec<Enriched>),
    /// The auditor, home again, and what it found.
    Audit(Box<Auditor>, Vec<AuditReport>),
    /// Each rechecked key's verdict now (None: its namespace is gone or unreadable).
    Rechecked { found: Vec<(CountKey, Option<Decision>)>, asked: Instant },
}

/// One diagnosed line, with what its UDP lookups found (nothing for TCP).
pub(crate) struct Enriched {
    pub(crate) line: Line,
    pub(crate) report: Report,
    pub(crate) udp: UdpLookups,
}

/// The loop's side of the worker.
pub(crate) struct Enricher {
    jobs: mpsc::Sender<Job>,
    done: Option<UnboundedReceiver<Done>>,
    /// Lines handed to the worker and not back yet.
    queued: usize,
    capacity: usize,
}

impl Enricher {
    /// Starts the worker thread.
    pub(crate) fn start(capacity: usize) -> std::io::Result<Enricher> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (tx, done) = unbounded_channel();
        thread::Builder::new().name("bindtrace-enrich".into()).spawn(move || work(rx, tx))?;
        Ok(Enricher { jobs, done: Some(done), queued: 0, capacity: capacity.max(1) })
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Lines handed over and not back yet.
    pub(crate) fn queued(&self) -> usize {
        self.queued
    }

    /// The receiver of diagnosed batches, for the loop to wait on (taken once).
    pub(crate) fn take_receiver(&mut self) -> Option<UnboundedReceiver<Done>> {
        self.done.take()
    }

    /// Hands `lines` to the worker, as many as the queue has room for (all of them when
    /// `force`: the exit flush waits for its lines anyway). Returns those left out.
    pub(crate) fn submit(
        &mut self,
        mut lines: Vec<(Line, Option<Port>)>,
        bridges: &Bridges,
        hook: &'static str,
        udp: UdpSources,
        force: bool,
    ) -> Vec<(Line, Option<Port>)> {
        let room = if force { lines.len() } else { self.capacity.saturating_sub(self.queued) };
        let rejected = lines.split_off(room.min(lines.len()));
        if lines.is_empty() {
            return rejected;
        }
        let n = lines.len();
        match self.jobs.send(Job::Lines { lines, bridges: bridges.clone(), hook, udp }) {
            Ok(()) => {
                self.queued += n;
                rejected
            }
            // The worker is gone (it should not be: it outlives every panic). Nothing is
            // lost: every line is written undiagnosed.
            Err(mpsc::SendError(Job::Lines { mut lines, .. })) => {
                lines.extend(rejected);
                lines
            }
            Err(mpsc::SendError(_)) => unreachable!("a lines job was sent"),
        }
    }

    /// Sends the loopback recheck to the worker. Gives the keys back if the worker is gone (the
    /// caller then checks them itself, with [`recheck`]).
    pub(crate) fn recheck(&mut self, keys: Vec<Recheck>, asked: Instant) -> Result<(), Vec<Recheck>> {
        match self.jobs.send(Job::Recheck { keys, asked }) {
            Ok(()) => Ok(()),
            Err(mpsc::SendError(Job::Recheck { keys, .. })) => Err(keys),
            Err(mpsc::SendError(_)) => unreachable!("a recheck job was sent"),
        }
    }

    /// Sends the auditor to the worker for the audits due at `now`. Gives it back if the worker
    /// is gone (the caller then runs them itself).
    pub(crate) fn audit(
        &mut self,
        auditor: Box<Auditor>,
        inventory: Arc<Inventory>,
        in_scope: HashMap<u64, Arc<Netns>>,
        now: Instant,
    ) -> Result<(), Box<Auditor>> {
        match self.jobs.send(Job::Audit { auditor, inventory, in_scope, now }) {
            Ok(()) => Ok(()),
            Err(mpsc::SendError(Job::Audit { auditor, .. })) => Err(auditor),
            Err(mpsc::SendError(_)) => unreachable!("an audit job was sent"),
        }
    }

    /// A batch came back.
    pub(crate) fn returned(&mut self, n: usize) {
        self.queued = self.queued.saturating_sub(n);
    }
}

/// The worker: the jobs in their order, one after another. A panic in one
/// diagnosis (a bug) costs that line its diagnosis, never the line or the worker; a panic in
/// an audit pass costs that pass (its ports are checked again at the next).
///
/// Batches of lines queued behind the one taken are diagnosed with it, sharing its namespace
/// reads: each read includes a walk of `/proc` for the listeners' holders (~450 000 instructions
/// with 80 processes, more than the rest of a line's diagnosis and writing), and
/// at 1 000 new keys/s every batch is one line, so a worker that read once per batch fell
/// behind on a busy host and stayed behind. Now the more it is behind, the more lines one
/// read serves (the reads are made after those lines were queued, so none is older than its
/// line).
fn work(jobs: mpsc::Receiver<Job>, done: UnboundedSender<Done>) {
    let mut next: Option<Job> = None;
    loop {
        let job = match next.take() {
            Some(job) => job,
            None => match jobs.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        let result = match job {
            Job::Lines { lines, bridges, hook, udp } => {
                let mut seen = NamespaceReads::default();
                let mut diagnosed = diagnose(lines, &bridges, hook, &udp, &mut seen);
                loop {
                    match jobs.try_recv() {
                        Ok(Job::Lines { lines, bridges, hook, udp }) => {
                            diagnosed.extend(diagnose(lines, &bridges, hook, &udp, &mut seen));
                        }
                        // Another kind of job waits its turn, after these lines.
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                Done::Lines(diagnosed)
            }
            Job::Recheck { keys, asked } => {
                let found = catch_unwind(AssertUnwindSafe(|| recheck(keys))).unwrap_or_else(|_| {
                    log::error!(
                        "a loopback recheck failed (a bug): its listeners are checked again at the next"
                    );
                    Vec::new()
                });
                Done::Rechecked { found, asked }
            }
            Job::Audit { mut auditor, inventory, in_scope, now } => {
                let reports = catch_unwind(AssertUnwindSafe(|| auditor.run(&inventory, &in_scope, now)))
                    .unwrap_or_else(|_| {
                        log::error!("an audit pass failed (a bug): its ports are checked again at the next");
                        Vec::new()
                    });
                Done::Audit(auditor, reports)
            }
        };
        if done.send(result).is_err() {
            return;
        }
    }
}

fn diagnose(
    lines: Vec<(Line, Option<Port>)>,
    bridges: &Bridges,
    hook: &'static str,
    udp: &UdpSources,
    seen: &mut NamespaceReads,
) -> Vec<Enriched> {
    lines
        .into_iter()
        .map(|(line, port)| {
            let report =
                catch_unwind(AssertUnwindSafe(|| enrich::report(&line, port.as_ref(), bridges, hook, seen)))
                    .unwrap_or_else(|_| {
                        log::error!("diagnosing a line failed (a bug): it is written undiagnosed");
                        *seen = NamespaceReads::default();
                        enrich::undiagnosed(&line, port.as_ref(), bridges, hook, enrich::Undiagnosed::Failed)
                    });
            let udp =
                catch_unwind(AssertUnwindSafe(|| via::udp_lookups(&report, udp))).unwrap_or_else(|_| {
                    log::error!("a UDP attribution lookup failed (a bug): the line is written without it");
                    UdpLookups::default()
                });
            Enriched { line, report, udp }
        })
        .collect()
}

/// Each key's verdict now, its namespace read once per pass (what the
/// `bindtrace_loopback_listeners` gauge follows between refusals).
pub(crate) fn recheck(keys: Vec<Recheck>) -> Vec<(CountKey, Option<Decision>)> {
    let mut reads = NamespaceReads::default();
    keys.into_iter()
        .map(|(key, target, ns)| {
            let decision = ns.and_then(|ns| {
                let found = reads.listening(&ns, Proto::from_ip(key.proto)).ok()?;
                Some(verdict::decide(target, key.port, &found.listeners, &found.v6only))
            });
            (key, decision)
        })
        .collect()
}
