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
mod tests;
