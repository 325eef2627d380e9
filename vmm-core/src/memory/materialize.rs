//! Fetching lazily backed memory in full, or one page, through the retry
//! cores, as a fault would: the background prefetch of a lazy restore, a
//! snapshot or migration of lazily backed memory (pages not fetched yet would
//! be missing from it), and a migration destination placing arrived pages.

use ::memory::{FaultOutcome, Origin, PageState, RetryCore, RetryReason, Uffd};
use abi::layout::PAGE_SIZE;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Errors of fetching memory through the retry cores.
#[derive(Debug, thiserror::Error)]
pub enum MaterializeError {
    /// The source cannot give a page.
    #[error("{0}")]
    Fault(#[source] ::memory::FaultError),
    /// The page is not guest RAM.
    #[error("guest page {0:#x} is outside guest RAM")]
    OutsideRam(u64),
}

/// Fetches every missing page of the source's data ranges through the retry
/// cores, as a fault would (so it races safely with the handler: the cores'
/// page claims decide who fills a page). Used by the background prefetch of a
/// lazy restore and before a snapshot or migration of lazily backed memory,
/// whose pages not yet fetched (or still being filled) would otherwise be
/// missing from it.
#[derive(Debug, Clone)]
pub struct Materializer {
    pub(super) uffd: Arc<Uffd>,
    pub(super) cores: Vec<Arc<RetryCore>>,
    /// Shared with the memory: a migration destination built before its
    /// state learns them at the switchover ([`set_ranges`](Self::set_ranges)).
    pub(super) ranges: SharedRanges,
}

/// Data ranges `(gpa, len)` shared by a lazy memory and its materializers.
pub(super) type SharedRanges = Arc<std::sync::RwLock<Arc<Vec<(u64, u64)>>>>;

impl Materializer {
    /// Replaces the data ranges (`(gpa, len)`, sorted) for every clone and
    /// for the memory's later materializers.
    pub fn set_ranges(&self, ranges: Vec<(u64, u64)>) {
        *self
            .ranges
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(ranges);
    }

    /// Fetches the missing pages, counting the faults it resolved in `done`
    /// (a fault-around run is one). Stops early (`Ok`) when `stop` is set;
    /// fails on a page the source cannot give.
    pub fn run(&self, stop: &AtomicBool, done: &AtomicU64) -> Result<(), MaterializeError> {
        let ranges = self
            .ranges
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for &(gpa, len) in ranges.iter() {
            let mut a = gpa;
            while a < gpa + len {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let Some((core, host)) = self.cores.iter().find_map(|c| {
                    let r = c.region();
                    (a >= r.guest_offset && a - r.guest_offset < r.size)
                        .then(|| (c, r.host_base + (a - r.guest_offset)))
                }) else {
                    a += PAGE_SIZE;
                    continue;
                };
                loop {
                    match core.page_state(host) {
                        Some(PageState::Missing) => {
                            let report = core.resolve_waiting_from(
                                &self.uffd,
                                host,
                                Instant::now() + Duration::from_millis(100),
                                Origin::Prefetch,
                            );
                            match report.outcome {
                                FaultOutcome::Resolved { .. } => done.fetch_add(1, Ordering::Relaxed),
                                FaultOutcome::Failed(e) => return Err(MaterializeError::Fault(e)),
                                FaultOutcome::Retry(RetryReason::TimedOut)
                                    if stop.load(Ordering::Relaxed) =>
                                {
                                    return Ok(())
                                }
                                FaultOutcome::Retry(_) => 0,
                            };
                        }
                        // Another thread is filling it: its data is not in
                        // memory yet, and whoever reads memory next (a
                        // snapshot, a migration) must see it. Fills never wait
                        // for a vCPU, so this is short.
                        Some(PageState::InFlight) if !stop.load(Ordering::Relaxed) => {
                            std::thread::sleep(Duration::from_micros(50));
                        }
                        _ => break,
                    }
                }
                a += PAGE_SIZE;
            }
        }
        Ok(())
    }
}

impl Materializer {
    /// The page size the retry cores fill in (4 KiB, or the huge page).
    pub fn page_size(&self) -> u64 {
        self.cores
            .iter()
            .map(|c| c.page_size())
            .max()
            .unwrap_or(PAGE_SIZE)
    }

    /// Whether guest page `gpa` is mapped (not missing, not being filled).
    pub fn is_present(&self, gpa: u64) -> bool {
        self.cores.iter().any(|c| {
            let r = c.region();
            gpa >= r.guest_offset
                && gpa - r.guest_offset < r.size
                && c.page_state(r.host_base + (gpa - r.guest_offset)) == Some(PageState::Present)
        })
    }

    /// Resolves guest page `gpa` through its retry core if it is still
    /// missing (a migrated page that just arrived). Gives up quietly after a
    /// few seconds: the page then stays with the source and a fault fetches it.
    pub fn resolve_page(&self, gpa: u64) -> Result<(), MaterializeError> {
        let Some((core, host)) = self.cores.iter().find_map(|c| {
            let r = c.region();
            (gpa >= r.guest_offset && gpa - r.guest_offset < r.size)
                .then(|| (c, r.host_base + (gpa - r.guest_offset)))
        }) else {
            return Err(MaterializeError::OutsideRam(gpa));
        };
        for _ in 0..50 {
            if core.page_state(host) != Some(PageState::Missing) {
                return Ok(());
            }
            let report = core.resolve_waiting_from(
                &self.uffd,
                host,
                Instant::now() + Duration::from_millis(100),
                Origin::Prefetch,
            );
            match report.outcome {
                FaultOutcome::Resolved { .. } => return Ok(()),
                FaultOutcome::Failed(e) => return Err(MaterializeError::Fault(e)),
                FaultOutcome::Retry(_) => {}
            }
        }
        Ok(())
    }
}
