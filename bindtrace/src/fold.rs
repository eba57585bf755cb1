//! Folding: the first refusal of a key gets its line at once; repeats within the fold window
//! become one line with a count.
//!
//! Counts come from the kernel's exact per-key totals, not from the events: an event is only a
//! sample (with the client's address), and samples may be lost when the ring buffer is full.
//! Each line carries the increase of the key's total since the previous line, so per key the
//! `count`s of all lines add up to the kernel's total, whatever was lost on the way.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use bindtrace_common::{CountKey, RefusalEvent};

/// One line to print: `count` refusals of `key`, with the latest sample seen for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub key: CountKey,
    pub count: u64,
    pub sample: Option<RefusalEvent>,
}

#[derive(Debug, Default)]
struct KeyState {
    /// Sum of the counts already printed.
    reported: u64,
    last_line: Option<Instant>,
    sample: Option<RefusalEvent>,
}

impl KeyState {
    /// Whether a line was printed for this key less than `window` ago.
    fn in_window(&self, window: Duration, now: Instant) -> bool {
        self.last_line.is_some_and(|t| now.duration_since(t) < window)
    }
}

#[derive(Debug)]
pub struct Folder {
    window: Duration,
    keys: HashMap<CountKey, KeyState>,
}

pub fn key_of(ev: &RefusalEvent) -> CountKey {
    CountKey {
        netns_cookie: ev.netns_cookie,
        ifindex: ev.ifindex,
        port: ev.target_port,
        family: ev.family,
        proto: ev.proto,
    }
}

impl Folder {
    pub fn new(window: Duration) -> Folder {
        Folder { window, keys: HashMap::new() }
    }

    /// A sample arrived; `total` is the key's kernel total read just now (it includes this
    /// refusal: the kernel counts before it sends). A line is due at once unless the key had
    /// one within the window.
    pub fn on_event(&mut self, ev: RefusalEvent, total: u64, now: Instant) -> Option<Line> {
        let key = key_of(&ev);
        let state = self.keys.entry(key).or_default();
        state.sample = Some(ev);
        if state.in_window(self.window, now) || total <= state.reported {
            return None;
        }
        Some(Self::take_line(key, state, total, now))
    }

    fn take_line(key: CountKey, state: &mut KeyState, total: u64, now: Instant) -> Line {
        let line = Line { key, count: total - state.reported, sample: state.sample };
        state.reported = total;
        state.last_line = Some(now);
        line
    }

    /// Periodic pass over the kernel's totals: a line for every key whose total grew and whose
    /// window has closed (keys whose samples were all lost are found here too). With `final_flush`
    /// windows are ignored, so that nothing counted is left unprinted at exit.
    pub fn on_totals(
        &mut self,
        totals: &HashMap<CountKey, u64>,
        now: Instant,
        final_flush: bool,
    ) -> Vec<Line> {
        let mut lines = Vec::new();
        for (key, &total) in totals {
            let state = self.keys.entry(*key).or_default();
            if total <= state.reported {
                continue;
            }
            if state.in_window(self.window, now) && !final_flush {
                continue;
            }
            lines.push(Self::take_line(*key, state, total, now));
        }
        lines.sort_by_key(|l| l.key);
        lines
    }

    /// Whether some key has refusals not yet printed (then the caller polls soon).
    pub fn pending(&self, totals: &HashMap<CountKey, u64>) -> bool {
        totals.iter().any(|(k, &t)| self.keys.get(k).is_none_or(|s| t > s.reported))
    }

    /// The earliest instant at which a currently open window closes.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        self.keys
            .values()
            .filter(|s| s.in_window(self.window, now))
            .filter_map(|s| s.last_line.map(|t| t + self.window))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(port: u16) -> RefusalEvent {
        RefusalEvent {
            netns_cookie: 7,
            ifindex: 2,
            target_port: port,
            family: 2,
            proto: 6,
            ..Default::default()
        }
    }

    #[test]
    fn first_refusal_prints_at_once_repeats_fold() {
        let t0 = Instant::now();
        let mut f = Folder::new(Duration::from_secs(1));
        let first = f.on_event(ev(80), 1, t0).expect("first line at once");
        assert_eq!(first.count, 1);
        assert_eq!(f.on_event(ev(80), 2, t0 + Duration::from_millis(10)), None);
        assert_eq!(f.on_event(ev(80), 5, t0 + Duration::from_millis(20)), None);
        let totals = HashMap::from([(key_of(&ev(80)), 5)]);
        assert!(f.on_totals(&totals, t0 + Duration::from_millis(500), false).is_empty());
        let lines = f.on_totals(&totals, t0 + Duration::from_millis(1001), false);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].count, 4);
        assert!(f.on_totals(&totals, t0 + Duration::from_secs(5), false).is_empty());
    }

    #[test]
    fn counts_add_up_to_the_kernel_total_even_when_samples_are_lost() {
        let t0 = Instant::now();
        let mut f = Folder::new(Duration::from_millis(100));
        let k = key_of(&ev(80));
        let mut printed = 0;
        // Only a few samples arrive; the kernel total keeps growing regardless.
        for (i, total) in [3u64, 10, 11, 40, 41, 100].into_iter().enumerate() {
            let now = t0 + Duration::from_millis(70 * i as u64);
            if i % 2 == 0 {
                printed += f.on_event(ev(80), total, now).map_or(0, |l| l.count);
            }
            printed +=
                f.on_totals(&HashMap::from([(k, total)]), now, false).iter().map(|l| l.count).sum::<u64>();
        }
        printed += f.on_totals(&HashMap::from([(k, 100)]), t0, true).iter().map(|l| l.count).sum::<u64>();
        assert_eq!(printed, 100);
    }

    #[test]
    fn keys_known_only_from_the_map_get_lines() {
        let mut f = Folder::new(Duration::from_secs(1));
        let k = key_of(&ev(443));
        let lines = f.on_totals(&HashMap::from([(k, 9)]), Instant::now(), false);
        assert_eq!(lines, vec![Line { key: k, count: 9, sample: None }]);
    }

    #[test]
    fn an_event_already_covered_by_a_flush_prints_nothing() {
        let t0 = Instant::now();
        let mut f = Folder::new(Duration::from_millis(10));
        let k = key_of(&ev(80));
        assert_eq!(f.on_totals(&HashMap::from([(k, 1)]), t0, false).len(), 1);
        assert_eq!(f.on_event(ev(80), 1, t0 + Duration::from_secs(1)), None);
    }
}
