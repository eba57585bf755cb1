//! Medians, spreads and percentiles of what the rounds measured.

/// Median, minimum and maximum of a set of round results.
#[derive(Debug, Clone, Copy, Default)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    pub fn of(values: &[f64]) -> Spread {
        if values.is_empty() {
            return Spread::default();
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 };
        Spread { median, min: v[0], max: v[v.len() - 1], n: v.len() }
    }
}

/// The `p`th percentile (0..=100) by the nearest-rank method: a value that was observed.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// p50, p99 and max of latencies in nanoseconds, and how many there were.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
    pub n: usize,
}

impl Latency {
    pub fn of(mut ns: Vec<u64>) -> Latency {
        ns.sort_unstable();
        Latency {
            p50: percentile(&ns, 50.0),
            p99: percentile(&ns, 99.0),
            max: ns.last().copied().unwrap_or(0),
            n: ns.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(Spread::of(&[3.0, 1.0, 2.0]).median, 2.0);
        assert_eq!(Spread::of(&[4.0, 1.0, 2.0, 3.0]).median, 2.5);
        let s = Spread::of(&[5.0, 9.0, 1.0]);
        assert_eq!((s.min, s.max, s.n), (1.0, 9.0, 3));
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 99.0), 0);
    }
}
