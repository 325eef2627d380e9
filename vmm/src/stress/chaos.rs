//! The stress page source: zero pages, but "retry" and delays at seeded
//! pages, and a hold of every page on demand.

use abi::workload::mix64;
use memory::{FetchOutcome, Notifier, PageSource, RetryReason, ZeroSource};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A zero source that answers "retry" (then serves) and delays at seeded pages,
/// and can hold every page.
#[derive(Debug)]
pub struct ChaosSource {
    inner: ZeroSource,
    seed: u64,
    attempts: Mutex<HashMap<u64, u32>>,
    held: AtomicBool,
    fetches: AtomicU64,
    injected_retries: AtomicU64,
}

impl ChaosSource {
    /// A source seeded with `seed`.
    pub fn new(seed: u64) -> std::io::Result<ChaosSource> {
        Ok(ChaosSource {
            inner: ZeroSource::new()?,
            seed,
            attempts: Mutex::new(HashMap::new()),
            held: AtomicBool::new(false),
            fetches: AtomicU64::new(0),
            injected_retries: AtomicU64::new(0),
        })
    }

    /// Holds every page until [`ChaosSource::release`].
    pub fn hold(&self) {
        self.held.store(true, Ordering::SeqCst);
    }

    /// Ends a hold; parked faults are retried.
    pub fn release(&self) {
        self.held.store(false, Ordering::SeqCst);
        self.inner.notifier().notify();
    }

    /// "Retry" answers injected so far.
    pub fn injected_retries(&self) -> u64 {
        self.injected_retries.load(Ordering::Relaxed)
    }

    /// Fetch calls so far (progress for the watchdog).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }
}

impl PageSource for ChaosSource {
    fn name(&self) -> &str {
        "chaos"
    }

    fn fetch(&self, offset: u64, buf: &mut [u8]) -> FetchOutcome {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        if self.held.load(Ordering::SeqCst) {
            return FetchOutcome::Retry(RetryReason::Held);
        }
        let attempt = {
            let mut a = self
                .attempts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = a.entry(offset).or_insert(0);
            *n += 1;
            *n
        };
        let h = mix64(self.seed ^ offset);
        // About 1 page in 16 answers "not ready" 1 to 3 times before it serves.
        if h.is_multiple_of(16) && u64::from(attempt) <= 1 + (h >> 8) % 3 {
            self.injected_retries.fetch_add(1, Ordering::Relaxed);
            // Available soon: the waiter comes back at once.
            self.inner.notifier().notify();
            return FetchOutcome::Retry(RetryReason::NotReady);
        }
        // About 1 page in 64 is slow (up to 300 us).
        if (h >> 16).is_multiple_of(64) {
            std::thread::sleep(Duration::from_micros((h >> 24) % 300));
        }
        self.inner.fetch(offset, buf)
    }

    fn bulk_cheap(&self) -> bool {
        true
    }

    fn notifier(&self) -> &Notifier {
        self.inner.notifier()
    }
}
