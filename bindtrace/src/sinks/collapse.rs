//! What the terminal form shows of each refusal line: the whole block the first time a key
//! (namespace, port, protocol) is seen or when something about it changed, one short repeat
//! line otherwise, and nothing while the workload is being scanned: more than
//! [`SCAN_PORTS`] new ports of one namespace within the scan window fold into one SCAN line,
//! written when the scan stops (the window passes without a line for it) or at exit. The
//! piped and JSON forms keep one line per key; this is for a person watching.
use std::{
    collections::{BTreeSet, HashMap, VecDeque, hash_map::DefaultHasher},
    hash::{Hash, Hasher},
    time::{Duration, Instant},
};

use super::terminal::{ScanSummary, workload};
use crate::diagnose::report::Report;

/// New ports of one workload within the window beyond which it is a scan (a service with ten
/// misbound ports started at once still gets all ten blocks).
pub(crate) const SCAN_PORTS: usize = 10;
/// The default scan window: new ports this close together count towards a scan, and a scan
/// ends when this long passes without a line for it.
pub(crate) const SCAN_WINDOW: Duration = Duration::from_secs(2);
/// Keys remembered for repeats; beyond it, keys not seen for [`FORGET_AFTER`] are forgotten
/// (their next line is a whole block again, which is all forgetting costs).
const SEEN_MAX: usize = 65_536;
const FORGET_AFTER: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Shown {
    /// The whole block.
    Full,
    /// A short line: nothing changed since the block written at `first_time`.
    Again { first_time: String },
    /// Folded into a scan's line.
    Folded,
}

type Key = (u64, u16, &'static str);

struct Seen {
    fingerprint: u64,
    first_time: String,
    last: Instant,
}

struct Scan {
    summary: ScanSummary,
    ports: BTreeSet<u16>,
    last: Instant,
}

#[derive(Default)]
struct Workload {
    /// New ports within the window: (when, port, RFC 3339 time).
    recent: VecDeque<(Instant, u16, String)>,
    scan: Option<Scan>,
}

pub(crate) struct Collapse {
    window: Duration,
    seen: HashMap<Key, Seen>,
    workloads: HashMap<u64, Workload>,
}

/// What, if it changes, makes a repeat worth a whole block again: the verdict, who listens
/// where, the fix, the container, the published address and how the client got there (not the
/// client's port, which changes with every attempt).
fn fingerprint(r: &Report) -> u64 {
    let mut h = DefaultHasher::new();
    r.verdict.hash(&mut h);
    for l in &r.listeners {
        (l.ip, l.port).hash(&mut h);
        for p in &l.pids {
            (p.pid, &p.comm).hash(&mut h);
        }
    }
    r.hint.hash(&mut h);
    r.docker.container.as_ref().map(|c| &c.id).hash(&mut h);
    r.docker.published.as_ref().map(|b| (b.host_ip, b.host_port)).hash(&mut h);
    r.docker.via.map(|v| v.as_str()).hash(&mut h);
    r.docker.client_container.as_ref().map(|c| &c.id).hash(&mut h);
    h.finish()
}

impl Collapse {
    pub(crate) fn new(window: Duration) -> Self {
        Collapse { window, seen: HashMap::new(), workloads: HashMap::new() }
    }

    pub(crate) fn on_refusal(&mut self, r: &Report, now: Instant) -> Shown {
        let key: Key = (r.netns, r.target_port, r.proto);
        let known = self.seen.contains_key(&key);
        let wl = self.workloads.entry(r.netns).or_default();
        if let Some(scan) = &mut wl.scan
            && (!known || scan.ports.contains(&r.target_port))
        {
            scan.ports.insert(r.target_port);
            fold_into(&mut scan.summary, r);
            scan.summary.ports = scan.ports.len();
            scan.last = now;
            return Shown::Folded;
        }
        if !known {
            wl.recent.push_back((now, r.target_port, r.time.clone()));
            while wl.recent.front().is_some_and(|(t, _, _)| now.duration_since(*t) > self.window) {
                wl.recent.pop_front();
            }
            if wl.recent.len() > SCAN_PORTS {
                let ports: BTreeSet<u16> = wl.recent.iter().map(|(_, p, _)| *p).collect();
                let mut summary = ScanSummary {
                    workload: workload(r.docker.container.as_ref(), r.netns),
                    ports: ports.len(),
                    lowest: 0,
                    highest: 0,
                    refusals: 0,
                    count_partial: false,
                    shown: wl.recent.len() - 1,
                    first_time: wl.recent[0].2.clone(),
                    last_time: r.time.clone(),
                };
                fold_into(&mut summary, r);
                wl.recent.clear();
                wl.scan = Some(Scan { summary, ports, last: now });
                return Shown::Folded;
            }
        }
        let fp = fingerprint(r);
        self.forget_old(now);
        match self.seen.get_mut(&key) {
            Some(s) if s.fingerprint == fp => {
                s.last = now;
                Shown::Again { first_time: s.first_time.clone() }
            }
            _ => {
                self.seen.insert(key, Seen { fingerprint: fp, first_time: r.time.clone(), last: now });
                Shown::Full
            }
        }
    }

    /// Scans that stopped (no line for them within the window), ready for their SCAN line.
    pub(crate) fn ended(&mut self, now: Instant) -> Vec<ScanSummary> {
        let window = self.window;
        self.close(|scan| now.duration_since(scan.last) >= window, now)
    }

    /// Every scan still open (at exit).
    pub(crate) fn finish(&mut self) -> Vec<ScanSummary> {
        self.close(|_| true, Instant::now())
    }

    fn close(&mut self, done: impl Fn(&Scan) -> bool, now: Instant) -> Vec<ScanSummary> {
        let mut out = Vec::new();
        let window = self.window;
        for wl in self.workloads.values_mut() {
            if wl.scan.as_ref().is_some_and(&done) {
                let scan = wl.scan.take().expect("checked");
                let mut s = scan.summary;
                s.lowest = scan.ports.first().copied().unwrap_or(0);
                s.highest = scan.ports.last().copied().unwrap_or(0);
                out.push(s);
            }
            while wl.recent.front().is_some_and(|(t, _, _)| now.duration_since(*t) > window) {
                wl.recent.pop_front();
            }
        }
        self.workloads.retain(|_, wl| wl.scan.is_some() || !wl.recent.is_empty());
        out.sort_by(|a, b| a.first_time.cmp(&b.first_time));
        out
    }

    fn forget_old(&mut self, now: Instant) {
        if self.seen.len() < SEEN_MAX {
            return;
        }
        self.seen.retain(|_, s| now.duration_since(s.last) < FORGET_AFTER);
        if self.seen.len() >= SEEN_MAX {
            self.seen.clear();
        }
    }
}

fn fold_into(s: &mut ScanSummary, r: &Report) {
    match r.count {
        Some(n) => s.refusals += n,
        None => s.count_partial = true,
    }
    s.count_partial |= r.count_at_least;
    s.last_time = r.time.clone();
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::diagnose::{report::DockerContext, verdict::Verdict};

    pub(crate) fn report(netns: u64, port: u16, count: u64, time: &str) -> Report {
        Report {
            time: time.into(),
            ktime_ns: Some(1),
            event: "refused",
            verdict: Verdict::NoListener,
            undiagnosed: None,
            proto: "tcp",
            family: "ipv4",
            target_ip: Some("172.17.0.2".parse().unwrap()),
            target_port: port,
            client_ip: Some("172.17.0.1".parse().unwrap()),
            client_port: Some(40000),
            netns,
            netns_cookie: netns,
            bridge: "docker0".into(),
            ifindex: 2,
            veth: "veth1".into(),
            hook: "tcp-send-reset",
            listeners: vec![],
            listeners_omitted: 0,
            count: Some(count),
            count_unknown: None,
            count_at_least: false,
            hint: "nothing listens".into(),
            docker: DockerContext::default(),
        }
    }

    #[test]
    fn repeats_are_short_until_something_changes() {
        let mut c = Collapse::new(SCAN_WINDOW);
        let t = Instant::now();
        assert_eq!(c.on_refusal(&report(1, 8000, 1, "T1"), t), Shown::Full);
        let again = Shown::Again { first_time: "T1".into() };
        assert_eq!(c.on_refusal(&report(1, 8000, 3, "T2"), t), again);
        let mut changed = report(1, 8000, 1, "T3");
        changed.verdict = Verdict::LoopbackOnly;
        assert_eq!(c.on_refusal(&changed, t), Shown::Full);
        assert_eq!(c.on_refusal(&changed, t), Shown::Again { first_time: "T3".into() });
        assert_eq!(c.on_refusal(&report(2, 8000, 1, "T4"), t), Shown::Full, "another namespace");
    }

    #[test]
    fn many_new_ports_fold_into_one_scan() {
        let mut c = Collapse::new(SCAN_WINDOW);
        let t0 = Instant::now();
        // The application port, refused before the scan, keeps its own lines.
        assert_eq!(c.on_refusal(&report(1, 8000, 1, "T0"), t0), Shown::Full);
        let t = t0 + SCAN_WINDOW + Duration::from_secs(1);
        let shown: Vec<Shown> = (1..=1000).map(|p| c.on_refusal(&report(1, p, 1, "T1"), t)).collect();
        assert!(shown[..SCAN_PORTS].iter().all(|s| *s == Shown::Full), "{:?}", &shown[..12]);
        assert!(shown[SCAN_PORTS..].iter().all(|s| *s == Shown::Folded));
        assert!(matches!(c.on_refusal(&report(1, 8000, 1, "T2"), t), Shown::Again { .. }));
        // Repeats of scanned ports fold too, and keep the scan open.
        assert_eq!(c.on_refusal(&report(1, 3, 2, "T3"), t), Shown::Folded);
        assert!(c.ended(t).is_empty(), "still open within the window");
        let ended = c.ended(t + SCAN_WINDOW);
        assert_eq!(ended.len(), 1);
        let s = &ended[0];
        assert_eq!((s.ports, s.lowest, s.highest), (1000, 1, 1000));
        assert_eq!(s.shown, SCAN_PORTS);
        assert_eq!(s.refusals, 1000 - SCAN_PORTS as u64 + 2);
        assert_eq!((s.first_time.as_str(), s.last_time.as_str()), ("T1", "T3"));
        assert!(c.finish().is_empty());
    }

    #[test]
    fn new_ports_spread_over_time_are_no_scan() {
        let mut c = Collapse::new(SCAN_WINDOW);
        let t = Instant::now();
        for p in 1..=50u16 {
            let at = t + SCAN_WINDOW * u32::from(p) / 4;
            assert_eq!(c.on_refusal(&report(1, p, 1, "T"), at), Shown::Full, "port {p}");
        }
        assert!(c.finish().is_empty());
    }
}
