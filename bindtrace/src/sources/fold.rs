//! Folding: the first refusal of a key gets its line at once; repeats within the fold window
//! become one line with a count.
//!
//! Counts come from the kernel's exact per-key totals, not from the events: an event is only a
//! sample (with the client's address), and samples may be lost when the ring buffer is full.
//! Each line carries the increase of the key's total since the previous line, so per key the
//! `count`s of all lines add up to the kernel's total, whatever was lost on the way.
//!
//! A refusal that found the kernel's count map full has no total: its sample (rate-limited per
//! key by the kernel) becomes a line whose count is unknown, and keeps no state here.
//!
//! Closing windows are found through a heap of deadlines, not a walk over every key: a burst
//! of 10 000 new ports wakes the loop hundreds of times while its lines are written, and two
//! walks per wake (which windows closed, when the next one closes) were a fifth of the loop's
//! time in such a burst.
use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, HashSet},
    time::{Duration, Instant},
};

use bindtrace_common::{CountKey, EVENT_OVERFLOW, RefusalEvent};

/// One line to print: `count` refusals of `key`, with the latest sample seen for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Line {
    pub(crate) key: CountKey,
    /// None: the refusal found the count map full and is counted only in the overflow total.
    pub(crate) count: Option<u64>,
    pub(crate) sample: Option<RefusalEvent>,
}

#[derive(Debug, Default)]
struct KeyState {
    /// Sum of the counts already printed.
    reported: u64,
    last_line: Option<Instant>,
    /// Last time a sample arrived or the total grew: keys idle long enough are forgotten.
    last_active: Option<Instant>,
    sample: Option<RefusalEvent>,
    /// The count was read after the window of `last_line` closed: nothing is due for this key
    /// until a new sample arrives (the kernel sends one for the first refusal after a window).
    settled: bool,
}

impl KeyState {
    /// Whether a line was printed for this key less than `window` ago.
    fn in_window(&self, window: Duration, now: Instant) -> bool {
        self.last_line.is_some_and(|t| now.duration_since(t) < window)
    }
}

#[derive(Debug)]
pub(crate) struct Folder {
    window: Duration,
    keys: HashMap<CountKey, KeyState>,
    /// Keys found in the kernel's map by a full pass before any sample of theirs arrived.
    /// Their sample (with the client's address) is usually still in the ring buffer: they get
    /// a line without one only if it has not come by the next full pass (it was lost).
    map_only: HashSet<CountKey>,
    /// When each line's window closes, earliest first. An entry is stale once its key has had
    /// a newer line, was settled or forgotten: it is dropped when it comes up (at most one
    /// window after it was pushed), so the heap holds about one window's lines.
    closing: BinaryHeap<Reverse<(Instant, CountKey)>>,
}

pub(crate) fn key_of(ev: &RefusalEvent) -> CountKey {
    CountKey {
        netns_cookie: ev.netns_cookie,
        ifindex: ev.ifindex,
        port: ev.target_port,
        family: ev.family,
        proto: ev.proto,
    }
}

impl Folder {
    pub(crate) fn new(window: Duration) -> Folder {
        Folder { window, keys: HashMap::new(), map_only: HashSet::new(), closing: BinaryHeap::new() }
    }

    /// A sample arrived; `total` is the key's kernel total read just now (it includes this
    /// refusal: the kernel counts before it sends). A line is due at once unless the key had
    /// one within the window.
    pub(crate) fn on_event(&mut self, ev: RefusalEvent, total: u64, now: Instant) -> Option<Line> {
        let key = key_of(&ev);
        if ev.flags & EVENT_OVERFLOW != 0 {
            return Some(Line { key, count: None, sample: Some(ev) });
        }
        self.map_only.remove(&key);
        let state = self.keys.entry(key).or_default();
        state.sample = Some(ev);
        state.settled = false;
        state.last_active = Some(now);
        if state.in_window(self.window, now) || total <= state.reported {
            return None;
        }
        Some(take_line(&mut self.closing, self.window, key, state, total, now))
    }

    /// Keys whose window has closed and whose count has not been read since: each needs one
    /// lookup of its kernel count ([`Folder::on_key_total`]), not a pass over the whole map.
    /// Each closed window is returned once: the caller reads every key it is given.
    pub(crate) fn due(&mut self, now: Instant) -> Vec<CountKey> {
        let mut due = Vec::new();
        while let Some(&Reverse((at, key))) = self.closing.peek() {
            if at > now {
                break;
            }
            self.closing.pop();
            let current = self
                .keys
                .get(&key)
                .is_some_and(|s| !s.settled && s.last_line.is_some_and(|t| t + self.window == at));
            if current {
                due.push(key);
            }
        }
        due
    }

    /// A due key's kernel count, read just now: a line for what its window folded, if anything.
    pub(crate) fn on_key_total(&mut self, key: CountKey, total: u64, now: Instant) -> Option<Line> {
        let state = self.keys.get_mut(&key)?;
        if total > state.reported && !state.in_window(self.window, now) {
            return Some(take_line(&mut self.closing, self.window, key, state, total, now));
        }
        state.settled = true;
        None
    }

    /// Periodic pass over the kernel's totals: a line for every key whose total grew and whose
    /// window has closed (keys whose samples were all lost are found here too). With `final_flush`
    /// windows are ignored, so that nothing counted is left unprinted at exit.
    pub(crate) fn on_totals(
        &mut self,
        totals: &HashMap<CountKey, u64>,
        now: Instant,
        final_flush: bool,
    ) -> Vec<Line> {
        let mut lines = Vec::new();
        for (key, &total) in totals {
            if !final_flush && !self.keys.contains_key(key) && self.map_only.insert(*key) {
                continue;
            }
            self.map_only.remove(key);
            let state = self.keys.entry(*key).or_default();
            if total <= state.reported {
                continue;
            }
            if state.in_window(self.window, now) && !final_flush {
                continue;
            }
            lines.push(take_line(&mut self.closing, self.window, *key, state, total, now));
        }
        lines.sort_by_key(|l| l.key);
        lines
    }

    /// Keys with no sample and no new count for `idle` or longer, whose every refusal up to
    /// `reported` has its line: candidates for [`Folder::forget`] once the caller has checked
    /// that the kernel holds nothing more for them.
    pub(crate) fn idle(&self, idle: Duration, now: Instant) -> Vec<(CountKey, u64)> {
        self.keys
            .iter()
            .filter(|(k, s)| {
                !self.map_only.contains(k)
                    && s.last_active.is_none_or(|t| now.duration_since(t) >= idle)
                    && !s.in_window(self.window, now)
            })
            .map(|(k, s)| (*k, s.reported))
            .collect()
    }

    /// Drops a key: if it is refused again it is new, and its lines count from zero.
    pub(crate) fn forget(&mut self, key: &CountKey) {
        self.keys.remove(key);
        self.map_only.remove(key);
    }

    /// Keys with state (a gauge for the operator, and for the soak).
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// Gives memory back after a large forget.
    pub(crate) fn shrink(&mut self) {
        self.keys.shrink_to_fit();
        self.map_only.shrink_to_fit();
        self.closing.shrink_to_fit();
    }

    /// Whether a full pass found keys whose sample has not arrived yet (the next pass decides).
    pub(crate) fn awaiting_samples(&self) -> bool {
        !self.map_only.is_empty()
    }

    /// The earliest instant at which a key's window closes with its count not yet read, or
    /// earlier: a stale entry at the top costs one wake-up that [`Folder::due`] discards.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.closing.peek().map(|Reverse((at, _))| *at)
    }
}

/// A line for what `state` counted since its last one, and the window it opens (a free
/// function: the callers hold `state` borrowed from the folder's keys, `closing` beside it).
fn take_line(
    closing: &mut BinaryHeap<Reverse<(Instant, CountKey)>>,
    window: Duration,
    key: CountKey,
    state: &mut KeyState,
    total: u64,
    now: Instant,
) -> Line {
    let line = Line { key, count: Some(total - state.reported), sample: state.sample };
    state.reported = total;
    state.last_line = Some(now);
    state.last_active = Some(now);
    state.settled = false;
    closing.push(Reverse((now + window, key)));
    line
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
        assert_eq!(first.count, Some(1));
        assert_eq!(f.on_event(ev(80), 2, t0 + Duration::from_millis(10)), None);
        assert_eq!(f.on_event(ev(80), 5, t0 + Duration::from_millis(20)), None);
        let totals = HashMap::from([(key_of(&ev(80)), 5)]);
        assert!(f.on_totals(&totals, t0 + Duration::from_millis(500), false).is_empty());
        let lines = f.on_totals(&totals, t0 + Duration::from_millis(1001), false);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].count, Some(4));
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
                printed += f.on_event(ev(80), total, now).and_then(|l| l.count).unwrap_or(0);
            }
            printed += f
                .on_totals(&HashMap::from([(k, total)]), now, false)
                .iter()
                .filter_map(|l| l.count)
                .sum::<u64>();
        }
        printed +=
            f.on_totals(&HashMap::from([(k, 100)]), t0, true).iter().filter_map(|l| l.count).sum::<u64>();
        assert_eq!(printed, 100);
    }

    #[test]
    fn keys_known_only_from_the_map_get_lines_at_the_next_pass() {
        let mut f = Folder::new(Duration::from_secs(1));
        let k = key_of(&ev(443));
        let t0 = Instant::now();
        // The sample may still be on its way: not yet.
        assert!(f.on_totals(&HashMap::from([(k, 9)]), t0, false).is_empty());
        let lines = f.on_totals(&HashMap::from([(k, 9)]), t0 + Duration::from_secs(1), false);
        assert_eq!(lines, vec![Line { key: k, count: Some(9), sample: None }]);
    }

    #[test]
    fn a_sample_that_arrives_after_a_full_pass_gets_the_first_line() {
        let mut f = Folder::new(Duration::from_secs(1));
        let k = key_of(&ev(443));
        let t0 = Instant::now();
        assert!(f.on_totals(&HashMap::from([(k, 1)]), t0, false).is_empty());
        let line = f.on_event(ev(443), 1, t0 + Duration::from_millis(2)).expect("line with the sample");
        assert!(line.sample.is_some());
        assert!(f.on_totals(&HashMap::from([(k, 1)]), t0 + Duration::from_secs(1), false).is_empty());
    }

    #[test]
    fn a_closing_window_costs_one_lookup_and_settles() {
        let t0 = Instant::now();
        let mut f = Folder::new(Duration::from_secs(1));
        let k = key_of(&ev(80));
        f.on_event(ev(80), 1, t0).expect("first line");
        assert_eq!(f.next_deadline(), Some(t0 + Duration::from_secs(1)));
        assert!(f.due(t0 + Duration::from_millis(999)).is_empty());
        let later = t0 + Duration::from_secs(1);
        assert_eq!(f.due(later), vec![k]);
        // Folded refusals: a line, and a new window.
        assert_eq!(f.on_key_total(k, 7, later).and_then(|l| l.count), Some(6));
        assert_eq!(f.next_deadline(), Some(later + Duration::from_secs(1)));
        // Nothing new: settled, no more deadlines for it.
        let end = later + Duration::from_secs(1);
        assert_eq!(f.due(end), vec![k]);
        assert_eq!(f.on_key_total(k, 7, end), None);
        assert!(f.due(end).is_empty());
        assert_eq!(f.next_deadline(), None);
        // A new sample after the window: a line at once.
        assert_eq!(f.on_event(ev(80), 8, end + Duration::from_secs(3)).and_then(|l| l.count), Some(1));
    }

    #[test]
    fn each_closed_window_is_due_once_and_stale_ones_never() {
        let t0 = Instant::now();
        let window = Duration::from_secs(1);
        let mut f = Folder::new(window);
        for port in 1..=1000 {
            f.on_event(ev(port), 1, t0 + Duration::from_micros(port as u64)).expect("first line");
        }
        // A forgotten key's window closes with nothing to read.
        f.forget(&key_of(&ev(7)));
        assert_eq!(f.next_deadline(), Some(t0 + Duration::from_micros(1) + window));
        let due = f.due(t0 + Duration::from_micros(500) + window);
        assert_eq!(due.len(), 499, "ports 1..=500 but the forgotten one");
        assert!(!due.contains(&key_of(&ev(7))));
        assert_eq!(f.next_deadline(), Some(t0 + Duration::from_micros(501) + window));
        let rest = f.due(t0 + Duration::from_secs(5));
        assert_eq!(rest.len(), 500);
        assert!(f.due(t0 + Duration::from_secs(6)).is_empty(), "each window is due once");
        for key in due.into_iter().chain(rest) {
            assert_eq!(f.on_key_total(key, 1, t0 + Duration::from_secs(6)), None);
        }
        assert_eq!(f.next_deadline(), None, "settled keys leave no deadline: no wake-up while idle");
    }

    #[test]
    fn an_event_already_covered_by_a_flush_prints_nothing() {
        let t0 = Instant::now();
        let mut f = Folder::new(Duration::from_millis(10));
        let k = key_of(&ev(80));
        assert!(f.on_totals(&HashMap::from([(k, 1)]), t0, false).is_empty());
        assert_eq!(f.on_totals(&HashMap::from([(k, 1)]), t0, false).len(), 1);
        assert_eq!(f.on_event(ev(80), 1, t0 + Duration::from_secs(1)), None);
    }

    #[test]
    fn an_overflowing_refusal_gets_a_line_of_unknown_count_and_no_state() {
        let t0 = Instant::now();
        let mut f = Folder::new(Duration::from_secs(1));
        let overflow = RefusalEvent { flags: EVENT_OVERFLOW, ..ev(9000) };
        let line = f.on_event(overflow, 0, t0).expect("a line at once");
        assert_eq!(line.count, None);
        assert!(line.sample.is_some());
        assert_eq!(f.len(), 0);
        assert!(f.on_totals(&HashMap::new(), t0, true).is_empty());
    }

    #[test]
    fn idle_keys_are_offered_for_forgetting_only_after_their_lines() {
        let t0 = Instant::now();
        let mut f = Folder::new(Duration::from_secs(1));
        let k = key_of(&ev(80));
        f.on_event(ev(80), 1, t0).expect("first line");
        let idle = Duration::from_secs(10);
        assert!(f.idle(idle, t0 + Duration::from_secs(9)).is_empty());
        assert_eq!(f.idle(idle, t0 + Duration::from_secs(10)), vec![(k, 1)]);
        f.forget(&k);
        assert_eq!(f.len(), 0);
        // Back after being forgotten: a new key, counted from zero.
        let line = f.on_event(ev(80), 1, t0 + Duration::from_secs(11)).expect("a new first line");
        assert_eq!(line.count, Some(1));
    }
}
