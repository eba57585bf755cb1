//! Keeping the count keys bounded: flips that let idle keys leave the kernel, retiring the
//! keys of ports that left scope, and forgetting keys whose lines are all written. The
//! protocol that makes this safe is in `kernel/counts.rs`.
use std::{
    collections::HashSet,
    time::{Instant, SystemTime},
};

use bindtrace_common::ScopeKey;

use super::{
    detector::{Detector, MIN_FLIP_GAP},
    hiccups::Stage,
};
use crate::{diagnose::report::CountUnknown, sources::fold::Line};

impl Detector {
    /// At every idle pass, with the overflow total just read: flip when the period is over, or
    /// at once when refusals found the active map full (the other map is empty by then: the
    /// last flip drained it).
    pub(super) fn sync_keys(&mut self, now: Instant, overflow: u64) {
        if overflow > 0 && self.keys.overflow_since.is_none() {
            self.keys.overflow_since = Some(SystemTime::now());
        }
        let full = overflow > self.keys.overflow_at_flip
            && self.keys.last_flip.is_none_or(|t| now.duration_since(t) >= MIN_FLIP_GAP);
        if self.loaded.counts.lifecycle() && (full || now >= self.keys.next_flip) {
            match self.loaded.counts.flip() {
                Ok(moved) => {
                    self.hiccups.succeeded(Stage::CountFlip);
                    log::debug!(
                        "count maps flipped{}: {} idle keys ({} refusals) moved to userspace",
                        if full { " (the active map was full)" } else { "" },
                        moved.keys,
                        moved.refusals
                    )
                }
                Err(e) => self.hiccup(
                    Stage::CountFlip,
                    1,
                    format_args!("flipping the count maps: {e} (keys stay in the kernel until the next try)"),
                ),
            }
            self.keys.overflow_at_flip = overflow;
            self.keys.next_flip = now + self.keys.idle_after;
            self.keys.last_flip = Some(now);
            self.forget_idle(now);
        }
        if let Some(m) = &mut self.metrics {
            m.on_count_keys(self.loaded.counts.kernel_keys(), self.folder.len());
        }
    }

    /// The ports in `gone` left scope (their SCOPE and TC_PORTS entries are deleted): their keys
    /// leave the kernel; their counts stay until their lines are written.
    pub(super) fn retire_keys(&mut self, gone: &HashSet<ScopeKey>) {
        match self.loaded.counts.retire(gone) {
            Ok(moved) if moved.keys > 0 => {
                log::debug!(
                    "{} keys ({} refusals) of departed ports moved to userspace",
                    moved.keys,
                    moved.refusals
                )
            }
            Ok(_) => {}
            Err(e) => {
                log::warn!("retiring the count keys of departed ports: {e} (they leave at the next flip)")
            }
        }
    }

    /// Forgets keys idle for the whole period whose every refusal has its line and whose
    /// count only userspace holds. A forgotten key refused again starts from zero.
    fn forget_idle(&mut self, now: Instant) {
        let mut forgotten = 0usize;
        for (key, reported) in self.folder.idle(self.keys.idle_after, now) {
            let counts = &self.loaded.counts;
            if counts.in_kernel(&key) || counts.total(&key) != reported {
                continue;
            }
            self.folder.forget(&key);
            self.loaded.counts.forget(&key);
            forgotten += 1;
        }
        if forgotten > 0 {
            self.folder.shrink();
            self.loaded.counts.shrink();
            log::debug!(
                "forgot {forgotten} idle keys; {} keys in userspace ({} drained)",
                self.folder.len(),
                self.loaded.counts.drained_keys()
            );
        }
    }

    /// Lines for overflowing keys whose samples were lost (see `sources/overflow.rs`): read the
    /// kernel's sampler map when samples were lost while the map overflowed.
    pub(super) fn overflow_lines(&mut self, samples_lost: bool, overflow: u64) -> Vec<Line> {
        if overflow == 0 || !(samples_lost || self.keys.overflow_lines.awaiting()) {
            return Vec::new();
        }
        let entries: Vec<_> = self.loaded.overflow_samples.iter().filter_map(Result::ok).collect();
        self.keys
            .overflow_lines
            .on_read(entries)
            .into_iter()
            .map(|key| Line { key, count: None, sample: None })
            .collect()
    }

    /// What a line of unknown count says about the overflow: the total so far, and since when.
    pub(super) fn count_unknown(&self) -> CountUnknown {
        let since = self.keys.overflow_since.unwrap_or_else(SystemTime::now);
        CountUnknown {
            reason: "map_full",
            overflowed: self.loaded.stats().1,
            since: humantime::format_rfc3339_seconds(since).to_string(),
        }
    }
}
