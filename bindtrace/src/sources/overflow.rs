//! Lines for refusals that found the count map full even when their samples were lost.
//!
//! Such a refusal has no count of its own, so the usual safety net (a full pass over the
//! kernel's counts finds keys whose samples were all lost) cannot find it. The kernel's
//! sampler for them, the `OVERFLOW_SAMPLES` LRU map, remembers when each overflowing key last
//! sent a sample; when samples were lost, userspace reads it and writes a line (of unknown
//! count, without the client) for every key whose latest sample never arrived. As with the
//! counts, a key found there waits one pass: its sample may still be in the ring buffer.
use std::collections::HashMap;

use bindtrace_common::CountKey;

#[derive(Debug, Default)]
pub(crate) struct OverflowLines {
    /// Per key, the kernel time of the latest sample that got a line.
    seen: HashMap<CountKey, u64>,
    /// Keys the last read found with a sample time not seen yet.
    pending: HashMap<CountKey, u64>,
}

impl OverflowLines {
    /// An overflow sample arrived (and gets its line).
    pub(crate) fn on_sample(&mut self, key: CountKey, ktime_ns: u64) {
        let seen = self.seen.entry(key).or_default();
        *seen = (*seen).max(ktime_ns);
        if self.pending.get(&key).is_some_and(|&t| t <= ktime_ns) {
            self.pending.remove(&key);
        }
    }

    /// Whether keys wait for the next read.
    pub(crate) fn awaiting(&self) -> bool {
        !self.pending.is_empty()
    }

    /// `entries`: the sampler map's (key, last sample time), read just now. Returns the keys
    /// whose latest sample was lost: pending at the previous read and still unseen.
    pub(crate) fn on_read(&mut self, entries: Vec<(CountKey, u64)>) -> Vec<CountKey> {
        let mut due = Vec::new();
        let mut pending = HashMap::new();
        for (key, sampled) in &entries {
            if self.seen.get(key).is_some_and(|&t| t >= *sampled) {
                continue;
            }
            if self.pending.get(key).is_some_and(|&t| t >= *sampled) {
                self.seen.insert(*key, *sampled);
                due.push(*key);
            } else {
                pending.insert(*key, *sampled);
            }
        }
        self.pending = pending;
        // Bounded by the map: keys it evicted are forgotten here too.
        let live: std::collections::HashSet<CountKey> = entries.iter().map(|(k, _)| *k).collect();
        self.seen.retain(|k, _| live.contains(k));
        due.sort();
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> CountKey {
        CountKey { netns_cookie: 1, ifindex: 2, port, family: 2, proto: 6 }
    }

    #[test]
    fn a_lost_sample_gets_its_line_at_the_second_read() {
        let mut o = OverflowLines::default();
        assert!(o.on_read(vec![(key(1), 100)]).is_empty(), "its sample may still be on the way");
        assert!(o.awaiting());
        assert_eq!(o.on_read(vec![(key(1), 100)]), vec![key(1)]);
        assert!(o.on_read(vec![(key(1), 100)]).is_empty(), "once");
        assert!(!o.awaiting());
    }

    #[test]
    fn a_sample_that_arrives_between_reads_is_not_repeated() {
        let mut o = OverflowLines::default();
        assert!(o.on_read(vec![(key(1), 100), (key(2), 100)]).is_empty());
        o.on_sample(key(1), 100);
        assert_eq!(o.on_read(vec![(key(1), 100), (key(2), 100)]), vec![key(2)]);
        // A newer sample of key 1, lost too: one more line, a read later.
        assert!(o.on_read(vec![(key(1), 200)]).is_empty());
        assert_eq!(o.on_read(vec![(key(1), 200)]), vec![key(1)]);
    }

    #[test]
    fn keys_the_map_evicted_are_forgotten() {
        let mut o = OverflowLines::default();
        o.on_sample(key(1), 100);
        o.on_read(vec![]);
        assert!(o.seen.is_empty());
    }
}
