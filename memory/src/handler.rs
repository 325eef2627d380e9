//! The userfault event loop: poll, read events, hand faults to the retry core.
//!
//! One thread, never blocked on anything but `poll`: on the uffd (new events),
//! a stop eventfd, and each source's notifier (pages that returned `Retry` may
//! now be available). A fault that cannot be resolved now is parked, keyed by
//! page, so later events for the same page merge into it and other faults keep
//! flowing. The loop never waits for a vCPU: a vCPU blocked on a page is only
//! ever released by filling that page.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use serde::Serialize;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::core::{FaultError, FaultOutcome, RetryCore};
use crate::source::RetryReason;
use crate::uffd::{Event, Uffd, UffdError};

/// Errors that stop the event loop.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// poll(2) failed.
    #[error("polling the userfaultfd failed: {0}")]
    Poll(io::Error),
    /// Creating the stop eventfd failed.
    #[error("cannot create the handler's stop eventfd: {0}; raise the process's file descriptor limit")]
    EventFd(io::Error),
    /// Reading events failed.
    #[error("the fault handler cannot read userfaultfd events: {0}")]
    Uffd(#[from] UffdError),
    /// Two regions overlap.
    #[error("guest memory regions at host {a:#x} and {b:#x} overlap; give each host range to one core")]
    Overlap {
        /// Start of one region.
        a: u64,
        /// Start of the other.
        b: u64,
    },
}

/// A fault read from the userfaultfd and not resolved yet: the thread `tid`
/// is blocked in the host kernel on the page at `addr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockedFault {
    /// The faulting thread (gettid), if the uffd negotiated
    /// `Features::THREAD_ID` (as [`Uffd::for_guest_memory`] asks for).
    pub tid: Option<u32>,
    /// Host address of the page.
    pub addr: u64,
    /// Guest offset of the page (guest-physical address for the VMM's regions).
    pub guest_offset: u64,
    /// When the handler read this thread's event.
    pub since: Instant,
    /// Attempts after the first since this thread joined the fault.
    pub retries: u64,
    /// Why the last attempt did not resolve it; `None` while the first attempt
    /// is in progress, or when it failed (see `failure`).
    pub reason: Option<RetryReason>,
    /// Set when the source failed: the page will only be served once the
    /// source is repaired and notifies.
    pub failure: Option<FaultError>,
}

/// Per-thread fault accounting (threads identified by gettid).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ThreadStats {
    /// Faults of this thread that were resolved.
    pub faults: u64,
    /// Retry attempts made while this thread waited.
    pub retries: u64,
    /// Sum of fault latencies, from reading the event to resolution.
    pub blocked_ns: u64,
}

#[derive(Debug)]
struct Waiter {
    tid: Option<u32>,
    since: Instant,
    /// The fault's retry count when this thread joined it.
    retries_at_join: u32,
}

#[derive(Debug)]
struct Pending {
    core: usize,
    addr: u64,
    guest: u64,
    first: Instant,
    retries: u32,
    reason: Option<RetryReason>,
    failed: bool,
    failure: Option<FaultError>,
    waiters: Vec<Waiter>,
    /// Some waiter's access is a write (see [`RetryCore::resolve_access`]).
    write: bool,
}

/// What [`HandlerControl::blocked`] and [`HandlerControl::per_thread`] read:
/// a mirror of the loop's unresolved faults, updated once before and once
/// after each attempt (uncontended locks, ~tens of ns against a ~10-50 us fault).
#[derive(Debug, Default)]
struct Tracking {
    blocked: HashMap<u64, Vec<BlockedFault>>,
    threads: HashMap<u32, ThreadStats>,
}

#[derive(Debug, Default)]
struct Shared {
    failures: Mutex<Vec<FaultError>>,
    tracking: Mutex<Tracking>,
    pending: AtomicU64,
    events: AtomicU64,
    merged: AtomicU64,
}

impl Shared {
    fn tracking(&self) -> MutexGuard<'_, Tracking> {
        // The mirror is rebuilt from the loop's own state on every update, so a
        // panicked holder leaves nothing to repair.
        self.tracking.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Pending {
    fn snapshot(&self) -> Vec<BlockedFault> {
        self.waiters
            .iter()
            .map(|w| BlockedFault {
                tid: w.tid,
                addr: self.addr,
                guest_offset: self.guest,
                since: w.since,
                retries: u64::from(self.retries - w.retries_at_join),
                reason: self.reason.clone(),
                failure: self.failure.clone(),
            })
            .collect()
    }

    /// Publishes this fault's current state (or, when `done`, removes it and
    /// charges every waiting thread).
    fn publish(&self, shared: &Shared, done: bool) {
        let mut t = shared.tracking();
        if !done {
            t.blocked.insert(self.addr, self.snapshot());
            return;
        }
        t.blocked.remove(&self.addr);
        let now = Instant::now();
        for w in &self.waiters {
            if let Some(tid) = w.tid {
                let s = t.threads.entry(tid).or_default();
                s.faults += 1;
                s.retries += u64::from(self.retries - w.retries_at_join);
                s.blocked_ns = s
                    .blocked_ns
                    .saturating_add(nanos(now.saturating_duration_since(w.since)));
            }
        }
    }
}

/// Controls a running [`FaultHandler`] from another thread.
#[derive(Debug, Clone)]
pub struct HandlerControl {
    stop: Arc<EventFd>,
    shared: Arc<Shared>,
    cores: Vec<Arc<RetryCore>>,
}

impl HandlerControl {
    /// Asks the loop to return (it checks between batches of events).
    pub fn stop(&self) {
        let _ = self.stop.write(1);
    }

    /// Every fault that failed so far (the VMM pauses the VM and reports these).
    pub fn failures(&self) -> Vec<FaultError> {
        self.shared
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Faults waiting for a source (retry or failed).
    pub fn pending(&self) -> u64 {
        self.shared.pending.load(Ordering::Relaxed)
    }

    /// PAGEFAULT events read, and how many of them merged into a parked fault.
    pub fn events(&self) -> (u64, u64) {
        (
            self.shared.events.load(Ordering::Relaxed),
            self.shared.merged.load(Ordering::Relaxed),
        )
    }

    /// The cores (for statistics).
    pub fn cores(&self) -> &[Arc<RetryCore>] {
        &self.cores
    }

    /// Faults read from the uffd and not resolved yet (in progress, parked for
    /// a retry, held, or failed), one entry per blocked thread, oldest first.
    /// A thread that left its fault (a vCPU interrupted by a signal, see
    /// PLATFORM.md) stays listed until the page is served: the kernel does not
    /// tell the handler. Faults outside every region are only in `failures()`.
    pub fn blocked(&self) -> Vec<BlockedFault> {
        let mut v: Vec<BlockedFault> = self
            .shared
            .tracking()
            .blocked
            .values()
            .flatten()
            .cloned()
            .collect();
        v.sort_by_key(|b| (b.since, b.addr));
        v
    }

    /// Resolved faults per faulting thread (gettid). Empty unless the uffd
    /// negotiated `Features::THREAD_ID`.
    pub fn per_thread(&self) -> HashMap<u32, ThreadStats> {
        self.shared.tracking().threads.clone()
    }
}

/// Owns a [`Uffd`] and the cores of its regions, and runs the event loop.
#[derive(Debug)]
pub struct FaultHandler {
    uffd: Arc<Uffd>,
    control: HandlerControl,
    pending: HashMap<u64, Pending>,
}

impl FaultHandler {
    /// A handler for `cores`, whose regions must already be registered on `uffd`.
    pub fn new(uffd: Arc<Uffd>, cores: Vec<Arc<RetryCore>>) -> Result<FaultHandler, HandlerError> {
        for (i, a) in cores.iter().enumerate() {
            for b in &cores[i + 1..] {
                let (ra, rb) = (a.region(), b.region());
                if ra.host_base < rb.host_base + rb.size && rb.host_base < ra.host_base + ra.size {
                    return Err(HandlerError::Overlap {
                        a: ra.host_base,
                        b: rb.host_base,
                    });
                }
            }
        }
        let stop = EventFd::new(EFD_NONBLOCK).map_err(HandlerError::EventFd)?;
        Ok(FaultHandler {
            uffd,
            control: HandlerControl {
                stop: Arc::new(stop),
                shared: Arc::default(),
                cores,
            },
            pending: HashMap::new(),
        })
    }

    /// A handle to stop the loop and read its results.
    pub fn control(&self) -> HandlerControl {
        self.control.clone()
    }

    /// Runs until [`HandlerControl::stop`]. Returns an error only if the uffd
    /// itself is broken; fault failures are recorded, never fatal.
    pub fn run_until_stopped(&mut self) -> Result<(), HandlerError> {
        let cores = self.control.cores.clone();
        let mut fds = vec![
            libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.control.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        fds.extend(cores.iter().map(|c| libc::pollfd {
            fd: c.source().notifier().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }));
        loop {
            // A pending MappingChanged is cleared by the REMOVE reader's thread
            // right after we read its event, with no further wake-up for us:
            // re-check after 1 ms. Everything else sleeps until an fd is ready.
            let timeout = if self
                .pending
                .values()
                .any(|p| p.reason == Some(RetryReason::MappingChanged))
            {
                1
            } else {
                -1
            };
            for f in fds.iter_mut() {
                f.revents = 0;
            }
            // SAFETY: `fds` is a valid array of pollfd of the given length for the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(HandlerError::Poll(e));
            }
            if fds[1].revents != 0 {
                let _ = self.control.stop.read();
                return Ok(());
            }
            let mut due = vec![false; cores.len()];
            for (i, f) in fds[2..].iter().enumerate() {
                if f.revents != 0 {
                    // Clear before retrying so a notify during the retry re-arms it.
                    cores[i].source().notifier().clear_event();
                    due[i] = true;
                }
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLHUP) != 0 && fds[0].revents & libc::POLLIN == 0 {
                return Err(HandlerError::Poll(io::Error::from_raw_os_error(libc::EPIPE)));
            }
            while let Some(ev) = self.uffd.read_event()? {
                self.on_event(&cores, ev);
            }
            self.retry_pending(&cores, &due);
        }
    }

    fn on_event(&mut self, cores: &[Arc<RetryCore>], ev: Event) {
        match ev {
            Event::PageFault {
                addr,
                thread_id,
                flags,
            } => {
                self.control.shared.events.fetch_add(1, Ordering::Relaxed);
                let page = addr & !(crate::page_size() as u64 - 1);
                if let Some(p) = self.pending.get_mut(&page) {
                    self.control.shared.merged.fetch_add(1, Ordering::Relaxed);
                    p.write |= flags.write;
                    // A thread faulting again (after a signal) keeps its first
                    // `since`; its second event must not count as a second fault.
                    if thread_id.is_none() || !p.waiters.iter().any(|w| w.tid == thread_id) {
                        p.waiters.push(Waiter {
                            tid: thread_id,
                            since: Instant::now(),
                            retries_at_join: p.retries,
                        });
                        p.publish(&self.control.shared, false);
                    }
                    return;
                }
                let Some(ci) = cores.iter().position(|c| c.contains(page)) else {
                    tracing::error!(addr, "userfault outside every region");
                    self.record_failure(FaultError::OutOfRegion { addr });
                    return;
                };
                let now = Instant::now();
                let region = cores[ci].region();
                let mut p = Pending {
                    core: ci,
                    addr: page,
                    guest: region.guest_offset + (page - region.host_base),
                    first: now,
                    retries: 0,
                    reason: None,
                    failed: false,
                    failure: None,
                    waiters: vec![Waiter {
                        tid: thread_id,
                        since: now,
                        retries_at_join: 0,
                    }],
                    write: flags.write,
                };
                // Visible as "in progress" while the source works on it.
                p.publish(&self.control.shared, false);
                let done = self.attempt(&cores[ci], &mut p);
                p.publish(&self.control.shared, done);
                if !done {
                    self.pending.insert(page, p);
                }
            }
            Event::Remove { start, end } => {
                for c in cores {
                    c.handle_remove(start, end);
                }
            }
            Event::Unknown(code) => tracing::warn!(code, "ignoring unknown userfaultfd event"),
        }
        self.control
            .shared
            .pending
            .store(self.pending.len() as u64, Ordering::Relaxed);
    }

    /// One attempt; returns whether the fault is finished.
    fn attempt(&self, core: &RetryCore, p: &mut Pending) -> bool {
        match core.resolve_access(&self.uffd, p.addr, p.write) {
            FaultOutcome::Resolved { .. } => {
                core.record_fault(p.retries, p.first.elapsed());
                true
            }
            FaultOutcome::Retry(reason) => {
                tracing::debug!(addr = p.addr, ?reason, retries = p.retries, "fault parked");
                p.reason = Some(reason);
                // A failed page whose source now answers Retry is no longer failing.
                p.failure = None;
                false
            }
            FaultOutcome::Failed(e) => {
                if !p.failed {
                    tracing::error!(error = %e, "guest page fault failed");
                    p.failure = Some(e.clone());
                    self.record_failure(e);
                    p.failed = true;
                }
                p.reason = None;
                false
            }
        }
    }

    fn record_failure(&self, e: FaultError) {
        self.control
            .shared
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(e);
    }

    fn retry_pending(&mut self, cores: &[Arc<RetryCore>], due: &[bool]) {
        let mut pending = std::mem::take(&mut self.pending);
        pending.retain(|_, p| {
            let mapping = p.reason == Some(RetryReason::MappingChanged);
            if !(due[p.core] || mapping) {
                return true;
            }
            p.retries += 1;
            cores[p.core].note_retry();
            let done = self.attempt(&cores[p.core], p);
            p.publish(&self.control.shared, done);
            !done
        });
        self.pending = pending;
        self.control
            .shared
            .pending
            .store(self.pending.len() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test sizes are small
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    use super::*;
    use crate::core::{AfterRemove, CoreConfig, PageState};
    use crate::source::{FileSource, Rule, TestSource, ZeroSource};
    use crate::testutil::*;

    fn file_source(pages: u64) -> (PatternFile, Arc<TestSource>) {
        let f = PatternFile::new(pages);
        let inner = Arc::new(FileSource::open(&f.0, 0).expect("open pattern file"));
        (f, Arc::new(TestSource::new(inner).expect("test source")))
    }

    const NO_AROUND: CoreConfig = CoreConfig {
        fault_around: 0,
        after_remove: AfterRemove::Zero,
    };

    #[test]
    fn zero_source_sequential_and_random() {
        let src = Arc::new(TestSource::new(Arc::new(ZeroSource::new().expect("eventfd"))).expect("eventfd"));
        let fx = Fixture::start(64, src.clone(), NO_AROUND);
        for p in 0..32 {
            assert_eq!(fx.read(p, 5), 0);
        }
        // A fixed shuffle of the upper half, touched from two threads.
        let order: Vec<u64> = (0..32).map(|i| 32 + (i * 13) % 32).collect();
        let ts: Vec<_> = order.iter().map(|&p| fx.touch(p, 1)).collect();
        for t in ts {
            assert_eq!(join_within(t, "random toucher"), 0);
        }
        wait_for("64 faults recorded", || fx.core.stats().faults == 64);
        let s = fx.core.stats();
        assert_eq!(s.pages_zeroed, 64);
        assert_eq!(s.pages_copied, 0);
        assert_eq!(s.faults, 64);
        assert_eq!(src.max_fetches_per_page(), 1);
        assert_eq!(s.latency_us_log2.iter().sum::<u64>(), 64);
    }

    #[test]
    fn file_source_concurrent_touchers_fetch_each_page_once() {
        let (_f, src) = file_source(32);
        // Slow pages make the threads pile up on the same fault.
        for p in (0..32).step_by(4) {
            src.set_rule(p * ps(), Rule::Delay(Duration::from_millis(5)));
        }
        let fx = Fixture::start(32, src.clone(), NO_AROUND);
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let map = fx.map.clone();
                std::thread::spawn(move || {
                    for i in 0..32u64 {
                        let p = if t % 2 == 0 { i } else { (i * 7 + t) % 32 };
                        let off = (t * 97 + i) % ps();
                        // SAFETY: `map` is alive for the whole thread.
                        let v = unsafe { std::ptr::read_volatile(map.ptr().add((p * ps() + off) as usize)) };
                        assert_eq!(v, pattern(p, off), "page {p} offset {off}");
                    }
                })
            })
            .collect();
        for t in threads {
            join_within(t, "concurrent toucher");
        }
        assert_eq!(src.max_fetches_per_page(), 1, "a page was fetched twice");
        wait_for("32 pages copied", || fx.core.stats().pages_copied == 32);
        assert!(fx.control.failures().is_empty());
    }

    #[test]
    fn retry_then_serve_counts_retries() {
        let (_f, src) = file_source(8);
        src.set_rule(5 * ps(), Rule::RetryTimes(3));
        let fx = Fixture::start(8, src.clone(), NO_AROUND);
        assert_eq!(join_within(fx.touch(5, 9), "retried page"), pattern(5, 9));
        wait_for("the fault to be recorded", || fx.core.stats().faults == 1);
        let s = fx.core.stats();
        assert_eq!(s.retries_max, 3);
        assert_eq!(s.retries_total, 3);
        assert_eq!(s.faults, 1);
        assert_eq!(src.fetches_of(5 * ps()), 4);
    }

    #[test]
    fn held_page_blocks_only_its_toucher_until_release() {
        let (_f, src) = file_source(8);
        src.set_rule(2 * ps(), Rule::Hold);
        let fx = Fixture::start(8, src.clone(), NO_AROUND);
        let done = Arc::new(AtomicBool::new(false));
        let held = {
            let (map, done) = (fx.map.clone(), done.clone());
            std::thread::spawn(move || {
                // SAFETY: `map` is alive for the whole thread.
                let v = unsafe { std::ptr::read_volatile(map.ptr().add(2 * ps() as usize + 3)) };
                done.store(true, Ordering::Release);
                v
            })
        };
        wait_for("the held fault to be parked", || fx.control.pending() == 1);
        // Other faults keep flowing while one is held.
        assert_eq!(join_within(fx.touch(3, 0), "neighbour"), pattern(3, 0));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!done.load(Ordering::Acquire), "held page was served");
        let calls = src.fetch_calls();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            src.fetch_calls(),
            calls,
            "a held page must be waited for, not polled"
        );
        src.release(2 * ps());
        assert_eq!(join_within(held, "released page"), pattern(2, 3));
        wait_for("no parked fault", || fx.control.pending() == 0);
    }

    #[test]
    fn failed_page_is_reported_and_never_zero_filled() {
        let (_f, src) = file_source(8);
        src.set_rule(3 * ps(), Rule::Fail("sector unreadable".into()));
        let fx = Fixture::start(8, src.clone(), NO_AROUND);
        let t = fx.touch(3, 7);
        wait_for("the failure to be reported", || !fx.control.failures().is_empty());
        let failures = fx.control.failures();
        let msg = failures[0].to_string();
        assert!(
            msg.starts_with(&format!("guest page {:#x} (host {:#x})", 3 * ps(), fx.addr(3))),
            "{msg}"
        );
        assert!(
            msg.contains("sector unreadable") && msg.contains("not zero-filled"),
            "{msg}"
        );
        std::thread::sleep(Duration::from_millis(30));
        assert!(!t.is_finished(), "the toucher must stay blocked");
        assert_eq!(fx.core.page_state(fx.addr(3)), Some(PageState::Missing));
        // Fix the source: the parked fault is retried and served with real data.
        src.clear_rule(3 * ps());
        assert_eq!(join_within(t, "repaired page"), pattern(3, 7));
        assert_eq!(fx.control.failures().len(), 1);
    }

    #[test]
    fn fault_around_needs_fewer_events_than_pages() {
        let (_f, src) = file_source(64);
        let config = CoreConfig {
            fault_around: 16,
            after_remove: AfterRemove::Zero,
        };
        let fx = Fixture::start(64, src.clone(), config);
        for p in 0..64 {
            assert_eq!(fx.read(p, p), pattern(p, p));
        }
        // Counters are updated after the fill wakes the toucher: wait for them.
        wait_for("64 pages copied", || fx.core.stats().pages_copied == 64);
        let (events, _) = fx.control.events();
        assert_eq!(events, 4, "one event per 16-page window");
        let s = fx.core.stats();
        assert_eq!(s.fault_around_pages, 60);
        assert_eq!(src.max_fetches_per_page(), 1);
    }

    #[test]
    fn fault_around_skips_present_and_bad_neighbours() {
        let (_f, src) = file_source(32);
        src.set_rule(25 * ps(), Rule::Fail("bad neighbour".into()));
        let config = CoreConfig {
            fault_around: 16,
            after_remove: AfterRemove::Zero,
        };
        let fx = Fixture::start(32, src.clone(), config);
        // Page 4 mapped behind the core's back: the run copy stops there (EAGAIN
        // with a partial count), EEXIST on it, and the rest is copied.
        fx.uffd
            .copy(fx.addr(4), &vec![0xEE; ps() as usize], false)
            .expect("populate");
        assert_eq!(fx.read(2, 1), pattern(2, 1));
        assert_eq!(fx.read(4, 1), 0xEE, "an existing page must not be overwritten");
        assert_eq!(fx.read(6, 1), pattern(6, 1));
        wait_for("15 pages copied", || fx.core.stats().pages_copied == 15);
        let s = fx.core.stats();
        assert_eq!((s.eagain, s.eexist), (1, 1), "{s:?}");
        assert_eq!(fx.control.events().0, 1);
        // A failing neighbour in the window: the faulting page alone is served.
        assert_eq!(fx.read(20, 1), pattern(20, 1));
        assert!(
            fx.control.failures().is_empty(),
            "a bad neighbour must not fail the fault"
        );
        assert_eq!(fx.core.page_state(fx.addr(21)), Some(PageState::Missing));
    }

    #[test]
    fn removed_pages_fault_again() {
        let (_f, src) = file_source(8);
        let fx = Fixture::start(8, src.clone(), NO_AROUND);
        assert_eq!(fx.read(1, 0), pattern(1, 0));
        fx.map.discard(ps() as usize, ps() as usize).expect("madvise");
        // madvise returns once the event is read, maybe before it is applied.
        wait_for("the REMOVE to apply", || {
            fx.core.page_state(fx.addr(1)) == Some(PageState::Removed)
        });
        assert_eq!(fx.read(1, 0), 0, "DONTNEED memory reads zero");
        assert_eq!(src.fetches_of(ps()), 1);

        let (_f2, src2) = file_source(8);
        let refetch = CoreConfig {
            fault_around: 0,
            after_remove: AfterRemove::Refetch,
        };
        let fx2 = Fixture::start(8, src2.clone(), refetch);
        assert_eq!(fx2.read(1, 0), pattern(1, 0));
        fx2.map.discard(ps() as usize, ps() as usize).expect("madvise");
        assert_eq!(fx2.read(1, 0), pattern(1, 0));
        assert_eq!(src2.fetches_of(ps()), 2);
        wait_for("the REMOVE to be counted", || fx2.core.stats().removes == 1);
    }

    #[test]
    fn overlapping_regions_are_refused() {
        let src: Arc<dyn crate::source::PageSource> = Arc::new(ZeroSource::new().expect("eventfd"));
        let r = crate::core::Region {
            host_base: 0x10_0000,
            size: 0x4000,
            guest_offset: 0,
        };
        let a = Arc::new(RetryCore::new(r, src.clone(), NO_AROUND).expect("core"));
        let r2 = crate::core::Region {
            host_base: 0x10_2000,
            ..r
        };
        let b = Arc::new(RetryCore::new(r2, src, NO_AROUND).expect("core"));
        let uffd = Arc::new(Uffd::for_guest_memory().expect("uffd"));
        let err = FaultHandler::new(uffd, vec![a, b]).expect_err("overlap");
        assert!(err.to_string().contains("overlap"), "{err}");
    }

    /// Touches byte `off` of `page` on a new thread that first sends its tid.
    fn touch_with_tid(fx: &Fixture, page: u64, off: u64) -> (u32, std::thread::JoinHandle<u8>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let addr = fx.addr(page) + off;
        let map = fx.map.clone();
        let t = std::thread::spawn(move || {
            let _keep = map;
            tx.send(gettid()).expect("send tid");
            // SAFETY: `_keep` holds the mapping alive while we read it.
            unsafe { std::ptr::read_volatile(addr as *const u8) }
        });
        (rx.recv().expect("toucher tid"), t)
    }

    #[test]
    fn closed_gate_blocks_and_lists_threads_until_opened() {
        let src = Arc::new(TestSource::new(Arc::new(ZeroSource::new().expect("eventfd"))).expect("eventfd"));
        src.close_gate();
        let guest_base = 0x10_0000;
        let around = CoreConfig {
            fault_around: 4,
            after_remove: AfterRemove::Zero,
        };
        let fx = Fixture::start_at(8, src.clone(), around, guest_base);
        let (tid_a, a) = touch_with_tid(&fx, 3, 5);
        wait_for("the gated fault to be parked", || {
            fx.control
                .blocked()
                .first()
                .is_some_and(|b| b.reason == Some(RetryReason::Held))
        });
        let (tid_b, b) = touch_with_tid(&fx, 3, 9);
        wait_for("the second thread to be listed", || {
            fx.control.blocked().len() == 2
        });
        let blocked = fx.control.blocked();
        assert_eq!(
            blocked.iter().map(|b| b.tid).collect::<Vec<_>>(),
            vec![Some(tid_a), Some(tid_b)],
            "oldest first"
        );
        for f in &blocked {
            assert_eq!((f.addr, f.guest_offset), (fx.addr(3), guest_base + 3 * ps()));
            assert_eq!(f.failure, None);
        }
        assert_eq!(
            src.held_pages(),
            vec![guest_base + 3 * ps()],
            "the faulting page only"
        );
        let calls = src.fetch_calls();
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !a.is_finished() && !b.is_finished(),
            "a closed gate served a page"
        );
        assert_eq!(
            src.fetch_calls(),
            calls,
            "a closed gate must be waited for, not polled"
        );
        assert!(fx.control.per_thread().is_empty());

        src.open_gate();
        assert_eq!(join_within(a, "first toucher"), 0);
        assert_eq!(join_within(b, "second toucher"), 0);
        wait_for("nothing blocked", || fx.control.blocked().is_empty());
        let per = fx.control.per_thread();
        for tid in [tid_a, tid_b] {
            let s = per.get(&tid).copied().unwrap_or_default();
            assert_eq!((s.faults, s.retries), (1, 1), "thread {tid}: {s:?}");
            assert!(s.blocked_ns >= 50_000_000, "thread {tid} waited >= 50 ms: {s:?}");
        }
        assert!(src.held_pages().is_empty());
        assert_eq!(fx.control.events(), (2, 1));
        let json = serde_json::to_string(&per[&tid_a]).expect("serialize");
        assert!(
            json.starts_with("{\"faults\":1,\"retries\":1,\"blocked_ns\":"),
            "{json}"
        );
    }

    #[test]
    fn blocked_shows_in_progress_and_failed_faults() {
        let (_f, src) = file_source(8);
        src.set_rule(ps(), Rule::Delay(Duration::from_millis(300)));
        src.set_rule(2 * ps(), Rule::Fail("bad sector".into()));
        let fx = Fixture::start(8, src.clone(), NO_AROUND);
        let (tid, slow) = touch_with_tid(&fx, 1, 0);
        wait_for("the slow fault to be listed", || !fx.control.blocked().is_empty());
        let b = &fx.control.blocked()[0];
        assert_eq!(
            (b.tid, b.addr, b.reason.clone()),
            (Some(tid), fx.addr(1), None),
            "in progress"
        );
        assert_eq!(join_within(slow, "slow page"), pattern(1, 0));
        wait_for("the slow fault to be accounted", || {
            fx.control.per_thread().contains_key(&tid)
        });
        let s = fx.control.per_thread()[&tid];
        assert_eq!((s.faults, s.retries), (1, 0));
        assert!(s.blocked_ns >= 300_000_000, "{s:?}");

        let (tid, bad) = touch_with_tid(&fx, 2, 0);
        wait_for("the failure to be listed", || {
            fx.control.blocked().first().is_some_and(|b| b.failure.is_some())
        });
        let b = &fx.control.blocked()[0];
        assert_eq!((b.tid, b.guest_offset), (Some(tid), 2 * ps()));
        assert!(b
            .failure
            .as_ref()
            .is_some_and(|e| e.to_string().contains("bad sector")));
        src.clear_rule(2 * ps());
        assert_eq!(join_within(bad, "repaired page"), pattern(2, 0));
        wait_for("nothing blocked", || fx.control.blocked().is_empty());
        assert_eq!(fx.control.per_thread()[&tid].faults, 1);
    }
}
