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

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

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

/// An unresolved fault of one page, in the table every handler thread of a
/// pool shares: the first event for a page creates it, later events (read by
/// any thread of the pool) join its waiters.
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
    /// A handler thread is attempting it now: no other one starts an attempt.
    busy: bool,
}

impl Pending {
    fn snapshot(&self) -> impl Iterator<Item = BlockedFault> + '_ {
        self.waiters.iter().map(|w| BlockedFault {
            tid: w.tid,
            addr: self.addr,
            guest_offset: self.guest,
            since: w.since,
            retries: u64::from(self.retries - w.retries_at_join),
            reason: self.reason.clone(),
            failure: self.failure.clone(),
        })
    }
}

/// What one handler thread of a pool did (see [`HandlerControl::thread_stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HandlerThreadStats {
    /// The thread's index in its pool.
    pub index: usize,
    /// The CPU it ran on when it last woke up (pinned threads stay on theirs).
    pub cpu: Option<usize>,
    /// Returns from `poll` (wake-ups).
    pub wakeups: u64,
    /// PAGEFAULT events it read.
    pub events: u64,
    /// Of those, events found by the short poll before sleeping (no wake-up).
    pub spin_events: u64,
    /// Resolution attempts it made (first tries and retries).
    pub attempts: u64,
    /// PAGEFAULT events it read, by faulting thread (gettid).
    pub by_thread: BTreeMap<u32, u64>,
}

/// Lock-free counters of one handler thread.
#[derive(Debug)]
struct ThreadCounters {
    wakeups: AtomicU64,
    events: AtomicU64,
    spin_events: AtomicU64,
    attempts: AtomicU64,
    /// `u64::MAX` = unknown.
    cpu: AtomicU64,
}

impl Default for ThreadCounters {
    fn default() -> ThreadCounters {
        ThreadCounters {
            wakeups: AtomicU64::new(0),
            events: AtomicU64::new(0),
            spin_events: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            cpu: AtomicU64::new(u64::MAX),
        }
    }
}

/// The unresolved faults of a pool and its per-thread accounting, behind one
/// lock taken twice per fault (insert before the attempt, so in-progress
/// faults are visible; settle after). Uncontended it costs tens of ns against
/// a fault of tens of us; several handler threads take it at most once each
/// per event.
#[derive(Debug, Default)]
struct Table {
    pending: HashMap<u64, Pending>,
    /// Entries not being attempted (parked for a retry, or failed).
    parked: u64,
    /// Parked entries whose reason is `MappingChanged` (re-tried on a 1 ms timeout).
    mapping: u64,
    threads: HashMap<u32, ThreadStats>,
    /// `by_handler[i][tid]`: events of thread `tid` read by handler thread `i`.
    by_handler: Vec<HashMap<u32, u64>>,
}

impl Table {
    fn park(&mut self, reason: Option<&RetryReason>) {
        self.parked += 1;
        if reason == Some(&RetryReason::MappingChanged) {
            self.mapping += 1;
        }
    }

    fn unpark(&mut self, reason: Option<&RetryReason>) {
        self.parked = self.parked.saturating_sub(1);
        if reason == Some(&RetryReason::MappingChanged) {
            self.mapping = self.mapping.saturating_sub(1);
        }
    }
}

/// What every handler thread of a pool shares (one per pool).
#[derive(Debug)]
struct Shared {
    /// One stop eventfd per thread of the pool.
    stops: Vec<EventFd>,
    failures: Mutex<Vec<FaultError>>,
    table: Mutex<Table>,
    pending: AtomicU64,
    mapping: AtomicU64,
    events: AtomicU64,
    merged: AtomicU64,
    counters: Vec<ThreadCounters>,
}

impl Shared {
    fn table(&self) -> MutexGuard<'_, Table> {
        // Every update leaves the table consistent before it can panic (no
        // user code runs under the lock), so a poisoned lock holds valid data.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish_counts(&self, t: &Table) {
        self.pending.store(t.parked, Ordering::Relaxed);
        self.mapping.store(t.mapping, Ordering::Relaxed);
    }
}

fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Controls a running [`FaultHandler`] (or every thread of a pool, see
/// [`FaultHandler::pool`]) from another thread.
#[derive(Debug, Clone)]
pub struct HandlerControl {
    shared: Arc<Shared>,
    cores: Vec<Arc<RetryCore>>,
}

impl HandlerControl {
    /// Asks the loop (every thread of the pool) to return; each checks
    /// between batches of events.
    pub fn stop(&self) {
        for s in &self.shared.stops {
            let _ = s.write(1);
        }
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

    /// PAGEFAULT events read, and how many of them merged into a fault
    /// already known (parked, or being attempted by another thread of the pool).
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

    /// Handler threads of the pool.
    pub fn threads(&self) -> usize {
        self.shared.stops.len()
    }

    /// What each handler thread of the pool did, by index.
    pub fn thread_stats(&self) -> Vec<HandlerThreadStats> {
        let by: Vec<HashMap<u32, u64>> = self.shared.table().by_handler.clone();
        self.shared
            .counters
            .iter()
            .enumerate()
            .map(|(index, c)| {
                let cpu = c.cpu.load(Ordering::Relaxed);
                HandlerThreadStats {
                    index,
                    cpu: usize::try_from(cpu).ok().filter(|_| cpu != u64::MAX),
                    wakeups: c.wakeups.load(Ordering::Relaxed),
                    events: c.events.load(Ordering::Relaxed),
                    spin_events: c.spin_events.load(Ordering::Relaxed),
                    attempts: c.attempts.load(Ordering::Relaxed),
                    by_thread: by
                        .get(index)
                        .map(|m| m.iter().map(|(&k, &v)| (k, v)).collect())
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    /// Faults read from the uffd and not resolved yet (in progress, parked for
    /// a retry, held, or failed), one entry per blocked thread, oldest first,
    /// whichever thread of the pool read them.
    /// A thread that left its fault (a vCPU interrupted by a signal, see
    /// docs/platform.md) stays listed until the page is served: the kernel does not
    /// tell the handler. Faults outside every region are only in `failures()`.
    pub fn blocked(&self) -> Vec<BlockedFault> {
        let mut v: Vec<BlockedFault> = self
            .shared
            .table()
            .pending
            .values()
            .flat_map(Pending::snapshot)
            .collect();
        v.sort_by_key(|b| (b.since, b.addr));
        v
    }

    /// Resolved faults per faulting thread (gettid). Empty unless the uffd
    /// negotiated `Features::THREAD_ID`.
    pub fn per_thread(&self) -> HashMap<u32, ThreadStats> {
        self.shared.table().threads.clone()
    }
}

/// The controls of several handlers of one VM (several uffds, or handlers
/// built apart on one uffd) seen as one. Each view merges the handlers' own: `blocked`
/// interleaves their lists oldest first, `per_thread` adds up a thread's faults
/// served by different handlers, `cores` lists a shared core once. The threads
/// of one pool share one control, which the group keeps once.
///
/// Two handlers built apart (not one pool) that read one uffd may each take
/// an event for the same page: that page is then listed (and, if its source
/// fails, reported) by both, for their own waiting threads. A pool has one
/// table for all its threads, so it lists every page once.
#[derive(Debug, Clone, Default)]
pub struct HandlerGroup {
    controls: Vec<HandlerControl>,
}

impl HandlerGroup {
    /// A group of these handlers' controls.
    pub fn new(controls: Vec<HandlerControl>) -> HandlerGroup {
        let mut g = HandlerGroup::default();
        controls.into_iter().for_each(|c| g.push(c));
        g
    }

    /// Adds a handler's control (once per pool).
    pub fn push(&mut self, control: HandlerControl) {
        if !self
            .controls
            .iter()
            .any(|c| Arc::ptr_eq(&c.shared, &control.shared))
        {
            self.controls.push(control);
        }
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

/// The result of one attempt, before it is settled in the table.
enum Attempt {
    Done,
    Parked(RetryReason),
    Failed(FaultError),
}

/// One handler thread: reads a [`Uffd`] and serves the faults of its regions'
/// cores. Several threads over one uffd form a pool ([`FaultHandler::pool`]).
pub struct FaultHandler {
    uffd: Arc<Uffd>,
    control: HandlerControl,
    /// This thread's index in its pool.
    index: usize,
    /// One per distinct source notifier of the cores.
    subscriptions: Vec<Subscription>,
    /// `core_subscription[i]`: index in `subscriptions` of core `i`'s notifier.
    core_subscription: Vec<usize>,
    hook: Option<EventHook>,
    /// How long to keep reading the uffd after an event before sleeping in poll.
    spin: Duration,
}

impl fmt::Debug for FaultHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultHandler")
            .field("uffd", &self.uffd)
            .field("control", &self.control)
            .field("index", &self.index)
            .field("subscriptions", &self.subscriptions)
            .field("hook", &self.hook.as_ref().map(|_| "set"))
            .field("spin", &self.spin)
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
        let mut v = FaultHandler::pool(uffd, cores, 1)?;
        Ok(v.remove(0))
    }

    /// `threads` handlers (at least one) reading one `uffd` for `cores`, to
    /// run on a thread each. They share one table of unresolved faults: an
    /// event for a page another thread of the pool is attempting (or has
    /// parked) joins that fault, so each page is attempted by one thread at
    /// a time, listed once in `blocked`, and reported once if it fails. They
    /// share one [`HandlerControl`] (`stop` stops them all). Each waits on the
    /// sources through its own subscriptions.
    pub fn pool(
        uffd: Arc<Uffd>,
        cores: Vec<Arc<RetryCore>>,
        threads: usize,
    ) -> Result<Vec<FaultHandler>, HandlerError> {
        let threads = threads.max(1);
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
        let stops = (0..threads)
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(HandlerError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        let shared = Arc::new(Shared {
            stops,
            failures: Mutex::default(),
            table: Mutex::new(Table {
                by_handler: vec![HashMap::new(); threads],
                ..Table::default()
            }),
            pending: AtomicU64::new(0),
            mapping: AtomicU64::new(0),
            events: AtomicU64::new(0),
            merged: AtomicU64::new(0),
            counters: (0..threads).map(|_| ThreadCounters::default()).collect(),
        });
        let control = HandlerControl { shared, cores };
        (0..threads)
            .map(|index| {
                let (subscriptions, core_subscription) = subscribe(&control.cores)?;
                Ok(FaultHandler {
                    uffd: uffd.clone(),
                    control: control.clone(),
                    index,
                    subscriptions,
                    core_subscription,
                    hook: None,
                    spin: Duration::ZERO,
                })
            })
            .collect()
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
    /// panic while the loop itself unwinds. In a pool, give every thread the
    /// hook: a failure is reported once, by the thread that saw it first.
    pub fn set_event_hook(&mut self, hook: EventHook) {
        self.hook = Some(hook);
    }

    /// After serving events, keep reading the uffd for up to `spin` before
    /// sleeping in `poll` (0, the default: sleep at once). A fault arriving
    /// within it is read without a wake-up; an idle handler still sleeps
    /// after one `spin`, so nothing busy-loops while nothing faults.
    pub fn set_spin(&mut self, spin: Duration) {
        self.spin = spin;
    }

    /// A handle to stop the loop and read its results (shared by the pool).
    pub fn control(&self) -> HandlerControl {
        self.control.clone()
    }

    /// This thread's index in its pool.
    pub fn index(&self) -> usize {
        self.index
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

    fn counters(&self) -> &ThreadCounters {
        &self.control.shared.counters[self.index]
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
                fd: self.control.shared.stops[self.index].as_raw_fd(),
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
            let timeout = if self.control.shared.mapping.load(Ordering::Relaxed) > 0 {
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
            let c = self.counters();
            c.wakeups.fetch_add(1, Ordering::Relaxed);
            if let Some(cpu) = crate::affinity::current_cpu() {
                c.cpu.store(cpu as u64, Ordering::Relaxed);
            }
            if fds[1].revents != 0 {
                let _ = self.control.shared.stops[self.index].read();
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
            let mut served = false;
            while let Some(ev) = self.uffd.read_event()? {
                self.on_event(&cores, ev);
                served = true;
            }
            self.retry_pending(&cores, &due);
            if served && !self.spin.is_zero() {
                self.spin_for_events(&cores)?;
            }
        }
    }

    /// The short poll before sleeping: reads the uffd until `spin` passes
    /// without an event (each event restarts it).
    fn spin_for_events(&mut self, cores: &[Arc<RetryCore>]) -> Result<(), HandlerError> {
        let mut until = Instant::now() + self.spin;
        while Instant::now() < until {
            match self.uffd.read_event()? {
                Some(ev) => {
                    self.counters().spin_events.fetch_add(1, Ordering::Relaxed);
                    self.on_event(cores, ev);
                    until = Instant::now() + self.spin;
                }
                None => std::hint::spin_loop(),
            }
        }
        Ok(())
    }

    fn on_event(&mut self, cores: &[Arc<RetryCore>], ev: Event) {
        match ev {
            Event::PageFault {
                addr,
                thread_id,
                flags,
            } => {
                let shared = &self.control.shared;
                shared.events.fetch_add(1, Ordering::Relaxed);
                self.counters().events.fetch_add(1, Ordering::Relaxed);
                let page = addr & !(crate::page_size() as u64 - 1);
                let core = cores.iter().position(|c| c.contains(page));
                let now = Instant::now();
                let mut t = shared.table();
                if let (Some(tid), Some(m)) = (thread_id, t.by_handler.get_mut(self.index)) {
                    *m.entry(tid).or_default() += 1;
                }
                if let Some(p) = t.pending.get_mut(&page) {
                    // Parked, or being attempted by another thread of the pool:
                    // its fill wakes this thread too.
                    shared.merged.fetch_add(1, Ordering::Relaxed);
                    p.write |= flags.write;
                    // A thread faulting again (after a signal) keeps its first
                    // `since`; its second event must not count as a second fault.
                    if thread_id.is_none() || !p.waiters.iter().any(|w| w.tid == thread_id) {
                        p.waiters.push(Waiter {
                            tid: thread_id,
                            since: now,
                            retries_at_join: p.retries,
                        });
                    }
                    return;
                }
                let Some(ci) = core else {
                    drop(t);
                    tracing::error!(addr, "userfault outside every region");
                    self.record_failure(FaultError::OutOfRegion { addr });
                    return;
                };
                let region = cores[ci].region();
                // Visible as "in progress" while the source works on it.
                t.pending.insert(
                    page,
                    Pending {
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
                        busy: true,
                    },
                );
                drop(t);
                let a = self.attempt(&cores[ci], page, flags.write, 0, now);
                self.settle(page, a);
            }
            Event::Remove { start, end } => {
                for c in cores {
                    c.handle_remove(start, end);
                }
            }
            Event::Unknown(code) => tracing::warn!(code, "ignoring unknown userfaultfd event"),
        }
    }

    /// One attempt (no lock held).
    fn attempt(&self, core: &RetryCore, addr: u64, write: bool, retries: u32, first: Instant) -> Attempt {
        self.counters().attempts.fetch_add(1, Ordering::Relaxed);
        match core.resolve_access(&self.uffd, addr, write) {
            FaultOutcome::Resolved { .. } => {
                core.record_fault(retries, first.elapsed());
                Attempt::Done
            }
            FaultOutcome::Retry(reason) => {
                tracing::debug!(addr, ?reason, retries, "fault parked");
                Attempt::Parked(reason)
            }
            FaultOutcome::Failed(e) => Attempt::Failed(e),
        }
    }

    /// Records an attempt's result in the table: a finished fault goes away
    /// and every waiting thread is charged; anything else is parked.
    fn settle(&self, page: u64, a: Attempt) {
        let shared = &self.control.shared;
        let mut t = shared.table();
        let Some(p) = t.pending.get_mut(&page) else {
            return;
        };
        p.busy = false;
        let mut new_failure = None;
        match a {
            Attempt::Done => {
                if let Some(p) = t.pending.remove(&page) {
                    let now = Instant::now();
                    for w in &p.waiters {
                        if let Some(tid) = w.tid {
                            let s = t.threads.entry(tid).or_default();
                            s.faults += 1;
                            s.retries += u64::from(p.retries - w.retries_at_join);
                            s.blocked_ns = s
                                .blocked_ns
                                .saturating_add(nanos(now.saturating_duration_since(w.since)));
                        }
                    }
                }
            }
            Attempt::Parked(reason) => {
                p.reason = Some(reason);
                // A failed page whose source now answers Retry is no longer failing.
                p.failure = None;
                let r = p.reason.clone();
                t.park(r.as_ref());
            }
            Attempt::Failed(e) => {
                if !p.failed {
                    tracing::error!(error = %e, "guest page fault failed");
                    new_failure = Some(e.clone());
                    p.failed = true;
                }
                p.failure = Some(e);
                p.reason = None;
                t.park(None);
            }
        }
        shared.publish_counts(&t);
        drop(t);
        if let Some(e) = new_failure {
            self.record_failure(e);
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

    /// Retries the parked faults whose source notified (and every
    /// `MappingChanged` one); a fault another thread of the pool is attempting
    /// is left to it.
    fn retry_pending(&mut self, cores: &[Arc<RetryCore>], due: &[bool]) {
        let shared = &self.control.shared;
        if shared.pending.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut todo = Vec::new();
        {
            let mut t = shared.table();
            let mut unparked = Vec::new();
            for p in t.pending.values_mut() {
                let mapping = p.reason == Some(RetryReason::MappingChanged);
                if p.busy || !(due[p.core] || mapping) {
                    continue;
                }
                p.busy = true;
                p.retries += 1;
                unparked.push(p.reason.clone());
                todo.push((p.addr, p.core, p.write, p.retries, p.first));
            }
            for r in unparked {
                t.unpark(r.as_ref());
            }
            shared.publish_counts(&t);
        }
        for (addr, ci, write, retries, first) in todo {
            cores[ci].note_retry();
            let a = self.attempt(&cores[ci], addr, write, retries, first);
            self.settle(addr, a);
        }
    }
}

/// Our own eventfd per distinct notifier of `cores`: another handler waiting
/// on the same source clears its own, never ours. Returns the subscriptions
/// and, per core, the index of its notifier's.
fn subscribe(cores: &[Arc<RetryCore>]) -> Result<(Vec<Subscription>, Vec<usize>), HandlerError> {
    let mut subscriptions = Vec::new();
    let mut core_subscription: Vec<usize> = Vec::with_capacity(cores.len());
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
    Ok((subscriptions, core_subscription))
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test sizes are small
mod tests;
