//! Log2 latency histograms: bucket `i` counts values of `[2^i, 2^(i+1))`
//! microseconds (bucket 0 also counts 0 us).
//!
//! [`Log2Histogram`] is the plain one (one owner, e.g. a counter struct behind
//! a lock): it grows to the highest bucket recorded, so it never saturates.
//! [`AtomicLog2Histogram`] is the shared one (the retry core's counters,
//! recorded from any handler thread without a lock): a fixed number of
//! buckets, the last of which also counts every longer value.
//! Both give their counts as `Vec<u64>`, the form `Stats::latency_us_log2`
//! and the VMM's reports carry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Buckets needed for every `u64` value (bucket 63 holds `[2^63, u64::MAX]`).
pub const MAX_BUCKETS: usize = 64;

/// The bucket of a value of `us` microseconds: `floor(log2(us))`, 0 for 0 and 1.
pub fn bucket_of(us: u64) -> usize {
    (u64::BITS - 1 - us.max(1).leading_zeros()) as usize
}

/// The exclusive upper bound of bucket `i`, in us (`u64::MAX` for the last).
pub fn bucket_upper_bound_us(i: usize) -> u64 {
    if i + 1 >= MAX_BUCKETS {
        u64::MAX
    } else {
        1 << (i + 1)
    }
}

/// Whole microseconds of `d`, saturating.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The percentile `p` (0..=1) of the counts `hist`: the upper bound of the
/// first bucket at which at least `p` of all values are counted; 0 when empty.
fn percentile_of(hist: &[u64], p: f64) -> u64 {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return 0;
    }
    let want = p.clamp(0.0, 1.0) * total as f64;
    let mut seen = 0u64;
    for (i, &n) in hist.iter().enumerate() {
        seen += n;
        if seen > 0 && seen as f64 >= want {
            return bucket_upper_bound_us(i);
        }
    }
    bucket_upper_bound_us(hist.len().saturating_sub(1))
}

/// A log2 histogram of microsecond values with a single owner.
///
/// ```
/// use vmm_memory::histogram::Log2Histogram;
/// let mut h = Log2Histogram::new();
/// for us in [3, 3, 3, 40] {
///     h.record(us);
/// }
/// assert_eq!(h.buckets(), vec![0, 3, 0, 0, 0, 1]);
/// assert_eq!(h.percentile_upper_bound_us(0.5), 4); // the median is < 4 us
/// assert_eq!(h.percentile_upper_bound_us(0.99), 64);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Log2Histogram {
    /// `counts[i]`: values in bucket `i`; no longer than the highest bucket recorded.
    counts: Vec<u64>,
}

impl Log2Histogram {
    /// An empty histogram.
    pub fn new() -> Log2Histogram {
        Log2Histogram::default()
    }

    /// A histogram with these bucket counts (e.g. a `Stats::latency_us_log2`).
    pub fn from_buckets(counts: Vec<u64>) -> Log2Histogram {
        Log2Histogram { counts }
    }

    /// Counts one value of `us` microseconds.
    pub fn record(&mut self, us: u64) {
        self.record_n(us, 1);
    }

    /// Counts `n` values of `us` microseconds.
    pub fn record_n(&mut self, us: u64, n: u64) {
        let b = bucket_of(us);
        if self.counts.len() <= b {
            self.counts.resize(b + 1, 0);
        }
        self.counts[b] = self.counts[b].saturating_add(n);
    }

    /// Counts one duration (whole microseconds).
    pub fn record_duration(&mut self, d: Duration) {
        self.record(micros(d));
    }

    /// Adds the counts of `other`, bucket by bucket.
    pub fn merge(&mut self, other: &Log2Histogram) {
        self.merge_buckets(&other.counts);
    }

    /// Adds bucket counts given as a slice (e.g. another core's `latency_us_log2`).
    pub fn merge_buckets(&mut self, counts: &[u64]) {
        if self.counts.len() < counts.len() {
            self.counts.resize(counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(counts) {
            *a = a.saturating_add(*b);
        }
    }

    /// The counts, bucket `i` = `[2^i, 2^(i+1))` us, up to the highest bucket
    /// recorded (empty when nothing was).
    pub fn buckets(&self) -> Vec<u64> {
        self.counts.clone()
    }

    /// The counts without copying them.
    pub fn as_slice(&self) -> &[u64] {
        &self.counts
    }

    /// Values counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().fold(0, |a, b| a.saturating_add(*b))
    }

    /// The percentile `p` (0..=1, clamped) as the upper bound, in us, of the
    /// bucket holding it: at least a fraction `p` of the values are below it.
    /// 0 when empty. From a capped [`AtomicLog2Histogram`], a percentile that
    /// falls in the last bucket is only a lower bound (that bucket also counts
    /// longer values).
    pub fn percentile_upper_bound_us(&self, p: f64) -> u64 {
        percentile_of(&self.counts, p)
    }
}

impl From<Vec<u64>> for Log2Histogram {
    fn from(counts: Vec<u64>) -> Log2Histogram {
        Log2Histogram::from_buckets(counts)
    }
}

/// A log2 histogram recorded concurrently (relaxed atomic adds, no lock),
/// with a fixed number of buckets; the last also counts every longer value.
#[derive(Debug)]
pub struct AtomicLog2Histogram {
    counts: Box<[AtomicU64]>,
}

impl AtomicLog2Histogram {
    /// A histogram of `buckets` buckets (clamped to `1..=MAX_BUCKETS`): values
    /// of `2^(buckets-1)` us and more all land in the last one.
    pub fn new(buckets: usize) -> AtomicLog2Histogram {
        let n = buckets.clamp(1, MAX_BUCKETS);
        AtomicLog2Histogram {
            counts: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Number of buckets.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    /// Whether there are no buckets (never: at least one).
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Counts one value of `us` microseconds.
    pub fn record(&self, us: u64) {
        let b = bucket_of(us).min(self.counts.len() - 1);
        self.counts[b].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one duration (whole microseconds).
    pub fn record_duration(&self, d: Duration) {
        self.record(micros(d));
    }

    /// The counts of every bucket (all `len()` of them, trailing zeros included).
    pub fn buckets(&self) -> Vec<u64> {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    /// A plain copy, e.g. for percentiles.
    pub fn snapshot(&self) -> Log2Histogram {
        Log2Histogram::from_buckets(self.buckets())
    }

    /// The percentile `p` of the current counts; see
    /// [`Log2Histogram::percentile_upper_bound_us`].
    pub fn percentile_upper_bound_us(&self, p: f64) -> u64 {
        percentile_of(&self.buckets(), p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1), 0);
        assert_eq!(bucket_of(2), 1);
        assert_eq!(bucket_of(3), 1);
        assert_eq!(bucket_of(48), 5, "48 us falls in [32, 64)");
        assert_eq!(bucket_of(64), 6);
        assert_eq!(bucket_of(u64::MAX), 63);
        assert_eq!(bucket_upper_bound_us(5), 64);
        assert_eq!(bucket_upper_bound_us(63), u64::MAX);
    }

    #[test]
    fn plain_histogram_grows_and_gives_percentiles() {
        let mut h = Log2Histogram::new();
        assert_eq!(h.percentile_upper_bound_us(0.5), 0, "empty");
        assert!(h.buckets().is_empty());
        h.record_n(2, 10);
        h.record(9);
        // The migration report's cases (they used their own function before).
        assert_eq!(h.buckets(), vec![0, 10, 0, 1]);
        assert_eq!(h.percentile_upper_bound_us(0.5), 4);
        assert_eq!(h.percentile_upper_bound_us(0.99), 16);
        assert_eq!(
            h.percentile_upper_bound_us(0.0),
            4,
            "p = 0 is the first non-empty bucket"
        );
        assert_eq!(h.percentile_upper_bound_us(7.0), 16, "p is clamped");
        h.record_duration(Duration::from_millis(3));
        assert_eq!(h.buckets().len(), 12, "3000 us is in [2048, 4096)");
        assert_eq!(h.count(), 12);
        h.record(u64::MAX);
        assert_eq!(h.buckets().len(), MAX_BUCKETS);
        assert_eq!(h.percentile_upper_bound_us(1.0), u64::MAX);
    }

    #[test]
    fn merge_adds_bucket_by_bucket() {
        let mut a = Log2Histogram::from_buckets(vec![1, 2]);
        a.merge(&Log2Histogram::from(vec![0, 1, 4]));
        assert_eq!(a.as_slice(), &[1, 3, 4]);
        a.merge_buckets(&[1]);
        assert_eq!(a.buckets(), vec![2, 3, 4]);
    }

    #[test]
    fn atomic_histogram_is_capped_and_shared() {
        let h = AtomicLog2Histogram::new(4);
        assert_eq!(h.len(), 4);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for us in [0, 1, 5, 7, 8, 1000] {
                        h.record(us);
                    }
                });
            }
        });
        // [0,2): 0 and 1; [4,8): 5, 7; the last bucket: 8 and 1000.
        assert_eq!(h.buckets(), vec![8, 0, 8, 8]);
        assert_eq!(h.snapshot().count(), 24);
        assert_eq!(h.percentile_upper_bound_us(0.5), 8);
        assert_eq!(AtomicLog2Histogram::new(0).len(), 1);
        assert_eq!(AtomicLog2Histogram::new(1000).len(), MAX_BUCKETS);
    }
}
