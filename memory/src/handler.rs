//! Step 2 of a fault's walk, the handler loop: userfault event ([`crate::uffd`])
//! -> **handler loop** -> retry core ([`crate::core`]) -> page source
//! ([`crate::source`]) -> fill ([`crate::uffd`]).
//!
//! One thread, never blocked on anything but `poll`: on the uffd (new events,
//! read with [`Uffd::read_event`]), a stop eventfd, and one [`Subscription`]
//! per distinct source notifier (pages that returned `Retry` may now be
//! available). Each `Event::PageFault` becomes one attempt,
//! [`RetryCore::resolve_access`], whose [`FaultOutcome`] the loop acts on:
//! - `Resolved { pages, by }`: done; the waiting threads are charged in
//!   [`HandlerControl::per_thread`];
//! - `Retry(reason)`: parked, keyed by page, so later events for the same page
//!   merge into it and other faults keep flowing; retried when the source
//!   notifies (`NotReady`, `Held`) or after 1 ms (`MappingChanged`);
//! - `Failed(error)`: recorded in [`HandlerControl::failures`], reported at once
//!   to the owner's event hook as [`HandlerEvent::Failed`], and kept parked:
//!   the page is never zero-filled, a repaired source that notifies serves it.
//!
//! The loop never waits for a vCPU: a vCPU blocked on a page is only ever
//! released by filling that page.
//!
//! **Events to the owner.** [`FaultHandler::set_event_hook`] installs a
//! callback run on the handler thread for each new failure and once when the
//! loop returns ([`HandlerEvent::Stopped`]: asked to stop, broken uffd, or a
//! panic in the loop), so the owner needs no polling. The hook must not block
//! (it delays every fault behind it): send into an unbounded channel and
//! write an eventfd, nothing more.
//!
//! **Several handlers per VM.** Nothing here assumes one handler or one uffd
//! per VM: cores may be shared (their CAS claim lets one fetch), each handler
//! waits on sources through its own subscription, and [`HandlerGroup`] merges
//! the controls of several handlers (`blocked`, `per_thread`, `failures`, ...).
//! The rules are in `docs/retry-core.md` ("Several handler threads, several
//! uffds").

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use serde::Serialize;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::core::{FaultError, FaultOutcome, RetryCore};
use crate::source::{RetryReason, Subscription};
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
    /// poll(2) reports an error or hang-up on the uffd and nothing to read.
    #[error("the userfaultfd is broken (poll revents {revents:#x}, no event to read); guest pages can no longer be served")]
    Broken {
        /// The poll revents bits of the uffd.
        revents: i16,
    },
    /// Subscribing to a source's notifier failed.
    #[error("cannot subscribe to the notifier of page source {source_name}: {error}; raise the process's file descriptor limit")]
    Subscribe {
        /// Name of the source.
        source_name: String,
        /// Why the eventfd could not be created.
        error: io::Error,
    },
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

impl ThreadStats {
    /// Adds `other` (the same thread's faults served by another handler).
    pub fn merge(&mut self, other: &ThreadStats) {
        self.faults = self.faults.saturating_add(other.faults);
        self.retries = self.retries.saturating_add(other.retries);
        self.blocked_ns = self.blocked_ns.saturating_add(other.blocked_ns);
    }
}

/// What a [`FaultHandler`] tells its owner as it happens (see
/// [`FaultHandler::set_event_hook`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerEvent {
    /// A fault failed (once per fault, however often it is retried; also in
    /// [`HandlerControl::failures`], which already holds it when the hook
    /// runs). The faulting thread stays blocked: pause the VM and report it.
    Failed(FaultError),
    /// The loop returned, so this handler serves no more faults. `None`: it
    /// was asked to ([`HandlerControl::stop`]); `Some(message)`: it broke (the
    /// [`HandlerError`] that `run_until_stopped` returns, or a panic in the
    /// loop), and the VM cannot go on unless another handler serves its uffd.
    Stopped(Option<String>),
}

/// The owner's callback for [`HandlerEvent`]s, run on the handler thread.
pub type EventHook = Arc<dyn Fn(HandlerEvent) + Send + Sync>;

/// Runs the hook; a panicking hook loses its event but not the handler.
fn emit(hook: &EventHook, event: HandlerEvent) {
    if std::panic::catch_unwind(AssertUnwindSafe(|| hook(event))).is_err() {
        tracing::error!("the fault handler's event hook panicked; its event is lost");
    }
}

/// Reports `Stopped` when `run_until_stopped` ends, by return or by unwinding.
struct StopReport(Option<EventHook>);

impl StopReport {
    fn returned(mut self, result: &Result<(), HandlerError>) {
        if let Some(hook) = self.0.take() {
            emit(
                &hook,
                HandlerEvent::Stopped(result.as_ref().err().map(ToString::to_string)),
            );
        }
    }
}

impl Drop for StopReport {
    fn drop(&mut self) {
        // Only reached armed when the loop panicked.
        if let Some(hook) = self.0.take() {
            let msg = "the fault handler loop panicked; guest pages can no longer be served";
            emit(&hook, HandlerEvent::Stopped(Some(msg.into())));
        }
    }
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
    /// docs/platform.md) stays listed until the page is served: the kernel does not
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

/// The controls of several handlers of one VM (several handler threads, or
/// several uffds) seen as one. Each view merges the handlers' own: `blocked`
/// interleaves their lists oldest first, `per_thread` adds up a thread's faults
/// served by different handlers, `cores` lists a shared core once.
///
/// Two handlers reading one uffd may each take an event for the same page:
/// that page is then listed (and, if its source fails, reported) by both,
/// for their own waiting threads.
#[derive(Debug, Clone, Default)]
pub struct HandlerGroup {
    controls: Vec<HandlerControl>,
}

impl HandlerGroup {
    /// A group of these handlers' controls.
    pub fn new(controls: Vec<HandlerControl>) -> HandlerGroup {
        HandlerGroup { controls }
    }

    /// Adds a handler's control.
    pub fn push(&mut self, control: HandlerControl) {
        self.controls.push(control);
    }

    /// The controls, in the order given.
    pub fn controls(&self) -> &[HandlerControl] {
        &self.controls
    }

    /// Asks every loop to return.
    pub fn stop(&self) {
        self.controls.iter().for_each(HandlerControl::stop);
    }

    /// Every handler's failures, handler by handler.
    pub fn failures(&self) -> Vec<FaultError> {
        self.controls.iter().flat_map(HandlerControl::failures).collect()
    }

    /// Faults parked in all handlers.
    pub fn pending(&self) -> u64 {
        self.controls.iter().map(HandlerControl::pending).sum()
    }

    /// PAGEFAULT events read by all handlers, and how many merged into a parked fault.
    pub fn events(&self) -> (u64, u64) {
        self.controls
            .iter()
            .map(HandlerControl::events)
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    }

    /// Every core of the handlers, each shared core once.
    pub fn cores(&self) -> Vec<Arc<RetryCore>> {
        let mut v: Vec<Arc<RetryCore>> = Vec::new();
        for c in self.controls.iter().flat_map(HandlerControl::cores) {
            if !v.iter().any(|o| Arc::ptr_eq(o, c)) {
                v.push(c.clone());
            }
        }
        v
    }

    /// See [`HandlerControl::blocked`]: every handler's blocked threads, oldest first.
    pub fn blocked(&self) -> Vec<BlockedFault> {
        let mut v: Vec<BlockedFault> = self.controls.iter().flat_map(HandlerControl::blocked).collect();
        v.sort_by_key(|b| (b.since, b.addr));
        v
    }

    /// See [`HandlerControl::per_thread`]: summed over the handlers.
    pub fn per_thread(&self) -> HashMap<u32, ThreadStats> {
        let mut all: HashMap<u32, ThreadStats> = HashMap::new();
        for c in &self.controls {
            for (tid, s) in c.per_thread() {
                all.entry(tid).or_default().merge(&s);
            }
        }
        all
    }
}

/// Owns a [`Uffd`] and the cores of its regions, and runs the event loop.
pub struct FaultHandler {
    uffd: Arc<Uffd>,
    control: HandlerControl,
    pending: HashMap<u64, Pending>,
    /// One per distinct source notifier of the cores.
    subscriptions: Vec<Subscription>,
    /// `core_subscription[i]`: index in `subscriptions` of core `i`'s notifier.
    core_subscription: Vec<usize>,
    hook: Option<EventHook>,
}

impl fmt::Debug for FaultHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultHandler")
            .field("uffd", &self.uffd)
            .field("control", &self.control)
            .field("pending", &self.pending)
            .field("subscriptions", &self.subscriptions)
            .field("hook", &self.hook.as_ref().map(|_| "set"))
            .finish()
    }
}

impl FaultHandler {
    /// A handler for `cores`, whose regions must already be registered on `uffd`.
    ///
    /// Any set of cores will do, and a core may be given to several handlers;
    /// but every handler reading one uffd must be given every core registered
    /// on it (any of them may read any of its events), and a core's region must
    /// be registered whole on one uffd (see `docs/retry-core.md`).
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
        // Our own eventfd per notifier: another handler waiting on the same
        // source clears its own, never ours.
        let mut subscriptions = Vec::new();
        let mut core_subscription = Vec::with_capacity(cores.len());
        for (i, c) in cores.iter().enumerate() {
            let notifier = c.source().notifier();
            let same = cores[..i]
                .iter()
                .position(|o| std::ptr::eq(o.source().notifier(), notifier));
            match same {
                Some(j) => core_subscription.push(core_subscription[j]),
                None => {
                    let sub = notifier.subscribe().map_err(|error| HandlerError::Subscribe {
                        source_name: c.source().name().to_owned(),
                        error,
                    })?;
                    core_subscription.push(subscriptions.len());
                    subscriptions.push(sub);
                }
            }
        }
        Ok(FaultHandler {
            uffd,
            control: HandlerControl {
                stop: Arc::new(stop),
                shared: Arc::default(),
                cores,
            },
            pending: HashMap::new(),
            subscriptions,
            core_subscription,
            hook: None,
        })
    }

    /// Installs the callback that learns of new failures and of the loop's
    /// end as they happen ([`HandlerEvent`]); it replaces any earlier one.
    ///
    /// It runs on the handler thread, between faults, with no handler lock
    /// held (it may call [`HandlerControl`] methods). It must not block or
    /// take long: every fault waits behind it, and a vCPU blocked from kernel
    /// mode cannot be released by anything else (docs/platform.md). Send into an
    /// unbounded channel and write an eventfd (or set a flag); never a
    /// bounded `send`, a lock a vCPU or the controller may hold, or I/O. A
    /// panic in it is caught and logged (the event is lost); it must not
    /// panic while the loop itself unwinds.
    pub fn set_event_hook(&mut self, hook: EventHook) {
        self.hook = Some(hook);
    }

    /// A handle to stop the loop and read its results.
    pub fn control(&self) -> HandlerControl {
        self.control.clone()
    }

    /// Runs until [`HandlerControl::stop`]. Returns an error only if the uffd
    /// itself is broken; fault failures are recorded, never fatal. Either way
    /// the event hook then gets [`HandlerEvent::Stopped`] (also on a panic).
    pub fn run_until_stopped(&mut self) -> Result<(), HandlerError> {
        let report = StopReport(self.hook.clone());
        let result = self.run_loop();
        report.returned(&result);
        result
    }

    fn run_loop(&mut self) -> Result<(), HandlerError> {
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
        fds.extend(self.subscriptions.iter().map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
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
            let mut notified = vec![false; self.subscriptions.len()];
            for (i, f) in fds[2..].iter().enumerate() {
                if f.revents != 0 {
                    // Clear before retrying so a notify during the retry re-arms it.
                    self.subscriptions[i].clear();
                    notified[i] = true;
                }
            }
            let due: Vec<bool> = self.core_subscription.iter().map(|&s| notified[s]).collect();
            let revents = fds[0].revents;
            if revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 && revents & libc::POLLIN == 0
            {
                return Err(HandlerError::Broken { revents });
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

    /// Lists a new failure, then tells the owner (the list already has it).
    fn record_failure(&self, e: FaultError) {
        self.control
            .shared
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(e.clone());
        if let Some(hook) = &self.hook {
            emit(hook, HandlerEvent::Failed(e));
        }
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
