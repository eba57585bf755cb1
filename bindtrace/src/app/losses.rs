//! What could not be delivered, said as such: samples the ring buffer dropped, hook runs the
//! kernel skipped, refusals that found the COUNTS map full.
use std::io::Write;

use super::detector::Detector;
use crate::{
    diagnose::report::{LostReport, now_rfc3339},
    sinks::output::Output,
};

impl Detector {
    /// Reports samples the kernel could not deliver since the last call, from `stats` (read
    /// with [`Loaded::stats`](crate::kernel::loader::Loaded::stats) just before).
    pub(super) fn report_lost<W: Write>(
        &mut self,
        out: &mut Output<W>,
        stats: (u64, u64),
    ) -> anyhow::Result<()> {
        let (ringbuf_lost, overflow) = stats;
        let misses = self.loaded.recursion_misses().unwrap_or(0);
        if let Some(m) = &mut self.metrics {
            m.on_kernel_stats(ringbuf_lost, overflow, misses);
        }
        if ringbuf_lost > self.lost_reported {
            out.lost(&LostReport {
                time: now_rfc3339(),
                event: "lost",
                stage: "kernel_ringbuf",
                count: ringbuf_lost - self.lost_reported,
            })?;
            self.lost_reported = ringbuf_lost;
        }
        // Not a lost sample but possibly lost counts: say so rather than look exact.
        if misses > self.recursion_reported {
            out.lost(&LostReport {
                time: now_rfc3339(),
                event: "lost",
                stage: "kernel_recursion",
                count: misses - self.recursion_reported,
            })?;
            self.recursion_reported = misses;
        }
        if let Some(connect) = &mut self.docker.connect {
            connect.warn_unattributed(&mut self.loaded.ebpf);
        }
        // Said when it grows, with the total: never once per refusal or per second.
        if overflow > self.keys.overflow_logged {
            log::warn!(
                "{overflow} refusals since start found the kernel's count map full (--counts-size keys): \
                 counted without a key of their own, their lines say \"count unknown\""
            );
            self.keys.overflow_logged = overflow;
        }
        Ok(())
    }
}
