//! Where a migration stands, on either side, while it runs and after it
//! ended: `vmm ctl SOCK migration` and the final JSON report. Each field's
//! QEMU `query-migrate` counterpart is in `docs/migration.md`
//! ("Statistics").

use super::lock;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// The phase of a migration (QEMU's `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Connecting, authenticating, the destination building its VM.
    Setup,
    /// Pre-copy round `n` (from 1) while the VM runs.
    Precopy(u32),
    /// The source is paused; state and page list on their way.
    Switchover,
    /// The destination runs the VM; pages are pushed and requested.
    Postcopy,
    /// The connection was cut during post-copy: both VMs wait.
    Paused,
    /// A recovery connection is being set up (`recover`, `--resume`).
    Recovering,
    /// Every page arrived.
    Complete,
    /// The migration ended without completing.
    Failed,
}

impl Phase {
    /// The name `vmm ctl SOCK migration` reports.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Setup => "setup",
            Phase::Precopy(_) => "pre-copy",
            Phase::Switchover => "switchover",
            Phase::Postcopy => "post-copy",
            Phase::Paused => "paused",
            Phase::Recovering => "recovering",
            Phase::Complete => "complete",
            Phase::Failed => "failed",
        }
    }
}

/// Live counters of a source (updated by the migration threads).
#[derive(Debug)]
pub struct SourceStatus {
    started: Instant,
    phase: Mutex<Phase>,
    error: Mutex<Option<String>>,
    /// Pages sent during pre-copy, every round.
    pub precopy_pages: AtomicU64,
    /// Post-copy data pages announced.
    pub data_pages: AtomicU64,
    /// Pages pushed after the switchover.
    pub pages_pushed: AtomicU64,
    /// Pages sent as answers to requests.
    pub pages_requested: AtomicU64,
    /// Of the pushed and answered pages, those sent as zero pages (address only).
    pub zero_pages: AtomicU64,
    /// Bytes written after the switchover.
    pub postcopy_bytes: AtomicU64,
    summary: Mutex<Option<super::SourceSummary>>,
}

impl Default for SourceStatus {
    fn default() -> Self {
        SourceStatus {
            started: Instant::now(),
            phase: Mutex::new(Phase::Setup),
            error: Mutex::new(None),
            precopy_pages: AtomicU64::new(0),
            data_pages: AtomicU64::new(0),
            pages_pushed: AtomicU64::new(0),
            pages_requested: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            postcopy_bytes: AtomicU64::new(0),
            summary: Mutex::new(None),
        }
    }
}

/// `vmm ctl SRC migration`.
#[derive(Debug, Clone, Serialize)]
pub struct SourceReport {
    /// Always "source".
    pub role: &'static str,
    /// See [`Phase::name`].
    pub status: &'static str,
    /// The pre-copy round in progress (status "pre-copy").
    pub precopy_round: Option<u32>,
    /// Since `migrate` was asked.
    pub elapsed_ms: f64,
    /// Why it failed (status "failed" or "paused").
    pub error: Option<String>,
    /// Pages sent during pre-copy, every round.
    pub precopy_pages: u64,
    /// Post-copy data pages announced.
    pub data_pages: u64,
    /// Pages pushed after the switchover.
    pub pages_pushed: u64,
    /// Pages sent as answers to requests.
    pub pages_requested: u64,
    /// Pushed or answered pages that went as zero pages (address only).
    pub zero_pages: u64,
    /// Bytes written after the switchover.
    pub postcopy_bytes: u64,
    /// The final summary, once the migration ended (downtime parts, round
    /// sizes, bytes per phase).
    pub summary: Option<super::SourceSummary>,
}

impl SourceStatus {
    /// Enters `p`.
    pub fn set_phase(&self, p: Phase) {
        *lock(&self.phase) = p;
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        *lock(&self.phase)
    }

    /// `n` pages were sent by pre-copy.
    pub fn precopy_sent(&self, n: u64) {
        self.precopy_pages.fetch_add(n, Ordering::Relaxed);
    }

    /// The migration ended: completed with `summary`, or failed.
    pub fn ended(&self, r: Result<&super::SourceSummary, String>, resumable: bool) {
        match r {
            Ok(s) => {
                *lock(&self.summary) = Some(s.clone());
                self.set_phase(Phase::Complete);
            }
            Err(e) => {
                *lock(&self.error) = Some(e);
                self.set_phase(if resumable { Phase::Paused } else { Phase::Failed });
            }
        }
    }

    /// What `vmm ctl SRC migration` answers.
    pub fn report(&self) -> SourceReport {
        let phase = self.phase();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SourceReport {
            role: "source",
            status: phase.name(),
            precopy_round: match phase {
                Phase::Precopy(n) => Some(n),
                _ => None,
            },
            elapsed_ms: self.started.elapsed().as_secs_f64() * 1e3,
            error: lock(&self.error).clone(),
            precopy_pages: get(&self.precopy_pages),
            data_pages: get(&self.data_pages),
            pages_pushed: get(&self.pages_pushed),
            pages_requested: get(&self.pages_requested),
            zero_pages: get(&self.zero_pages),
            postcopy_bytes: get(&self.postcopy_bytes),
            summary: lock(&self.summary).clone(),
        }
    }
}

/// Exact percentiles of latency samples (microseconds), not log2 bounds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Largest.
    pub max_us: f64,
    /// Mean.
    pub mean_us: f64,
}

impl Percentiles {
    /// Of `samples` (nanoseconds), nearest-rank.
    pub fn of(samples: &[u64]) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        let mut s = samples.to_vec();
        s.sort_unstable();
        // Nearest rank: the smallest sample with at least q of them at or below it.
        let at = |num: usize, den: usize| {
            let rank = (num * s.len()).div_ceil(den).clamp(1, s.len());
            s[rank - 1] as f64 / 1e3
        };
        Percentiles {
            count: s.len() as u64,
            p50_us: at(50, 100),
            p99_us: at(99, 100),
            max_us: s[s.len() - 1] as f64 / 1e3,
            mean_us: s.iter().sum::<u64>() as f64 / s.len() as f64 / 1e3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_exact_nearest_rank() {
        let s: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        let p = Percentiles::of(&s);
        assert_eq!(
            (p.count, p.p50_us, p.p99_us, p.max_us),
            (1000, 500.0, 990.0, 1000.0)
        );
        assert_eq!(Percentiles::of(&[]).count, 0);
    }

    #[test]
    fn phases_and_report() {
        let s = SourceStatus::default();
        s.set_phase(Phase::Precopy(2));
        let r = s.report();
        assert_eq!((r.status, r.precopy_round), ("pre-copy", Some(2)));
        s.ended(Err("cut".into()), true);
        assert_eq!(s.report().status, "paused");
        assert_eq!(s.report().error.as_deref(), Some("cut"));
    }
}
