//! Transient failures after start: counted per stage, logged quietly, retried with backoff.
//! Only set-up failures end bindtrace; once it runs, a failed rescan, a full SCOPE map, one
//! port's tc attach error, EMFILE or a netlink overrun is a hiccup: bindtrace keeps the state
//! it had, says so once (then again only when the number has grown, with the total, at most
//! once a [`RELOG_EVERY`]), and tries again after a backoff that doubles up to [`MAX_BACKOFF`].
use std::{
    collections::BTreeMap,
    fmt::Display,
    time::{Duration, Instant},
};

/// Where a hiccup happened: the `stage` label of `bindtrace_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Stage {
    /// Listing the watched bridges' ports (a link dump, a namespace that could not be opened).
    Rescan,
    /// A port that could not be added to the kernel's SCOPE map (full: `--scope-size`).
    Scope,
    /// The tc hook could not be attached to one port.
    TcAttach,
    /// The link-notification socket overran (ENOBUFS) or failed; the scope is re-read whole.
    LinkEvents,
    /// The count maps could not be flipped.
    CountFlip,
    /// Lines written undiagnosed: the enrichment queue was full. Nothing to retry: the
    /// next lines are queued again as soon as there is room.
    Enrich,
}

impl Stage {
    pub(crate) const ALL: [Stage; 6] =
        [Stage::Rescan, Stage::Scope, Stage::TcAttach, Stage::LinkEvents, Stage::CountFlip, Stage::Enrich];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Stage::Rescan => "rescan",
            Stage::Scope => "scope",
            Stage::TcAttach => "tc_attach",
            Stage::LinkEvents => "link_events",
            Stage::CountFlip => "count_flip",
            Stage::Enrich => "enrich",
        }
    }

    /// Whether a failure schedules a retry (a rescan); those that do not just wait for the
    /// next event.
    fn retries(self) -> bool {
        self != Stage::Enrich
    }
}

/// The first retry comes this long after a failure; each further failure doubles it.
pub(crate) const FIRST_BACKOFF: Duration = Duration::from_millis(500);
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A warning that keeps repeating is said again at most this often (with its total).
pub(crate) const RELOG_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct StageState {
    total: u64,
    /// The total the log last mentioned, and when.
    logged: u64,
    logged_at: Option<Instant>,
    /// Failures since the last success: the backoff grows with them.
    streak: u32,
    retry_at: Option<Instant>,
}

/// Every stage's count, log state and retry time.
#[derive(Debug, Default)]
pub(crate) struct Hiccups {
    stages: BTreeMap<Stage, StageState>,
}

impl Hiccups {
    /// Counts `n` failures of `stage` (ports of one pass fail together), logs them unless that
    /// would repeat itself, and schedules a retry. `what` says what failed and what bindtrace
    /// does meanwhile.
    pub(crate) fn failed(&mut self, stage: Stage, n: u64, what: impl Display, now: Instant) {
        if n == 0 {
            return;
        }
        let s = self.stages.entry(stage).or_default();
        s.total += n;
        s.streak = s.streak.saturating_add(1);
        let backoff = FIRST_BACKOFF.saturating_mul(1 << (s.streak - 1).min(16)).min(MAX_BACKOFF);
        let retry = if stage.retries() {
            s.retry_at = Some(now + backoff);
            format!("; retrying in {}", humantime::format_duration(backoff))
        } else {
            String::new()
        };
        let due = s.logged_at.is_none_or(|t| now.duration_since(t) >= RELOG_EVERY);
        if s.logged == 0 || (due && s.total > s.logged) {
            let times =
                if s.total == 1 { String::new() } else { format!(" ({} times since start)", s.total) };
            log::warn!("{}: {what}{retry}{times}", stage.label());
            s.logged = s.total;
            s.logged_at = Some(now);
        } else {
            log::debug!("{}: {what} (again; {} times since start)", stage.label(), s.total);
        }
    }

    /// The stage worked: the backoff starts over, and a recovery after a logged failure is said.
    pub(crate) fn succeeded(&mut self, stage: Stage) {
        let Some(s) = self.stages.get_mut(&stage) else { return };
        if s.streak > 0 {
            log::info!("{}: working again ({} failures since start)", stage.label(), s.total);
        }
        s.streak = 0;
        s.retry_at = None;
    }

    /// The earliest retry any stage waits for.
    pub(crate) fn next_retry(&self) -> Option<Instant> {
        self.stages.values().filter_map(|s| s.retry_at).min()
    }

    /// Whether a retry is due at `now` (the caller then redoes the work; success or failure
    /// is reported back with `succeeded` or `failed`).
    pub(crate) fn retry_due(&self, now: Instant) -> bool {
        self.next_retry().is_some_and(|t| t <= now)
    }

    /// Clears the retry times that are due, so that one retry pass covers them all.
    pub(crate) fn take_due(&mut self, now: Instant) {
        for s in self.stages.values_mut() {
            if s.retry_at.is_some_and(|t| t <= now) {
                s.retry_at = None;
            }
        }
    }

    #[cfg(test)]
    fn total(&self, stage: Stage) -> u64 {
        self.stages.get(&stage).map_or(0, |s| s.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets_on_success() {
        let mut h = Hiccups::default();
        let t0 = Instant::now();
        h.failed(Stage::Scope, 1, "full", t0);
        assert_eq!(h.next_retry(), Some(t0 + FIRST_BACKOFF));
        h.failed(Stage::Scope, 1, "full", t0);
        assert_eq!(h.next_retry(), Some(t0 + FIRST_BACKOFF * 2));
        for _ in 0..40 {
            h.failed(Stage::Scope, 1, "full", t0);
        }
        assert_eq!(h.next_retry(), Some(t0 + MAX_BACKOFF));
        assert_eq!(h.total(Stage::Scope), 42);
        h.succeeded(Stage::Scope);
        assert_eq!(h.next_retry(), None);
        h.failed(Stage::Scope, 1, "full", t0);
        assert_eq!(h.next_retry(), Some(t0 + FIRST_BACKOFF));
    }

    #[test]
    fn due_retries_are_taken_once() {
        let mut h = Hiccups::default();
        let t0 = Instant::now();
        h.failed(Stage::Rescan, 1, "x", t0);
        h.failed(Stage::TcAttach, 3, "y", t0);
        assert!(!h.retry_due(t0));
        let later = t0 + MAX_BACKOFF;
        assert!(h.retry_due(later));
        h.take_due(later);
        assert!(!h.retry_due(later));
        assert_eq!(h.total(Stage::TcAttach), 3);
        h.failed(Stage::TcAttach, 0, "nothing", later);
        assert_eq!(h.total(Stage::TcAttach), 3);
    }
}
