//! The slow page store (see [`abi::pv::store`]): the guest asks for a page and
//! the device answers *later*. A request is accepted during the `out` (status
//! OK), queued, and a worker thread fills the guest frame once the request's
//! delay has passed, then writes the request id into the guest's completion
//! slot. The guest notices on its timer tick. Reads of a page the guest holds
//! (`HOLD`) wait, unanswered, until it releases the page (`RELEASE`), which
//! answers them at once: tests wait for states, not for the delay. Also
//! receives the guest kernel's fault statistics (`STATS`).
//!
//! Snapshots and migration need the device quiescent: a [`PageStoreHandle`]
//! (cloned from the device before it goes onto the I/O bus) pauses the worker
//! from the VMM's controller thread. [`PageStoreHandle::pause`] returns once
//! the worker is not writing guest memory, and it writes none until
//! [`PageStoreHandle::resume`]; the device's clock stands still meanwhile, so
//! a read due in 5 ms at the pause is due 5 ms after the resume. The device
//! then persists ([`Persist`]) as a [`PageStoreState`]: the completion area,
//! the reads in flight with their remaining delays, the held pages and their
//! reads. Restored on another VM, the reads in flight complete there after
//! their remaining delay, and held reads wait for their `RELEASE`.
//!
//! The worker never takes the device's mutex (the one a vCPU's `out` takes),
//! and holds its own lock only between writes, never during one: a write into
//! lazily backed guest memory may wait on a userfault, and must block neither
//! a vCPU's port access nor a pause beyond the pause's timeout.
//!
//! Nothing here trusts the guest: bad addresses and slots are rejected (status
//! `REJECTED`, and a [`DeviceEvent::BadRequest`] saying why), with checked
//! arithmetic on every address the guest supplies, never a panic.

use crate::GuestRam;
use crate::{DeviceEvent, DeviceEventSink};
use abi::layout::{PAGE_LEN as PAGE, PAGE_SIZE};
use abi::pv::store::{self, GuestStats};
use abi::pv::{status, PvRequest};
use persist::Persist;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

/// The latest statistics the guest sent (shared with the VMM's outcome).
pub type GuestStatsCell = Arc<Mutex<Option<GuestStats>>>;

/// Longest delay a read waits; a READ asking for more waits this long.
pub const MAX_DELAY: Duration = Duration::from_secs(10);

/// A pause timeout for callers without a better one: far longer than a page
/// write takes, short enough that a userfault nobody serves is reported.
pub const DEFAULT_PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

const _: () = assert!(PAGE_SIZE == PAGE as u64);
/// The completion area, in bytes.
const AREA_LEN: usize = store::SLOTS * 8;

/// Errors of the page store.
#[derive(Debug, thiserror::Error)]
pub enum PageStoreError {
    /// The worker thread could not be started.
    #[error(
        "cannot start the page-store worker thread: {source}; the host is short of threads or memory, free some and start the VM again"
    )]
    Spawn {
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The worker was still writing guest memory when the pause timed out.
    #[error(
        "the page store did not pause within {timeout:?}: its worker is still writing store page {index} into guest frame {dest:#x}, probably blocked on a userfault that nobody serves; check the VMM's userfault handler, then pause again (the device was left running)"
    )]
    PauseTimeout {
        /// How long the pause waited.
        timeout: Duration,
        /// The store page being written.
        index: u64,
        /// The guest frame being written.
        dest: u64,
    },
    /// A save of a device that is not paused.
    #[error(
        "cannot save the page store while it runs: pause it first (PageStoreHandle::pause, and wait for it to return), and resume it only once guest memory is saved, or reads served meanwhile would be served again after the restore"
    )]
    NotPaused,
    /// A state that this VM cannot take.
    #[error(
        "the saved page-store state does not fit this VM: {reason}; the state is corrupted or was saved by a VM with another memory layout"
    )]
    InvalidState {
        /// What does not fit.
        reason: String,
    },
}

/// A read the worker answers after its delay, as saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlightRead {
    /// Store page.
    pub index: u64,
    /// Guest frame the page goes to.
    pub dest: u64,
    /// Completion slot the id goes to.
    pub slot: u64,
    /// Request id (never 0).
    pub id: u64,
    /// Microseconds of the delay that were left at the save (device time:
    /// the time the device was paused does not count), rounded up.
    pub remaining_us: u64,
}

/// A read of a held page, waiting for the page's `RELEASE`, as saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldRead {
    /// Store page (one of [`PageStoreState::held_pages`]).
    pub index: u64,
    /// Guest frame the page goes to.
    pub dest: u64,
    /// Completion slot the id goes to.
    pub slot: u64,
    /// Request id (never 0).
    pub id: u64,
}

/// The saved state of a [`PageStore`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageStoreState {
    /// Guest-physical address of the completion area (`INIT`), if the guest
    /// sent one.
    pub completion_area: Option<u64>,
    /// Reads accepted and not answered yet, earliest due first.
    pub in_flight: Vec<InFlightRead>,
    /// Pages the guest holds, in the order it held them.
    pub held_pages: Vec<u64>,
    /// Reads waiting for a held page's release, in the order they came.
    pub held_reads: Vec<HeldRead>,
    /// The statistics the guest sent last (`STATS`), restored into the new
    /// VM's [`GuestStatsCell`].
    pub stats: Option<GuestStats>,
}

/// What a restored [`PageStore`] needs besides its state: the new VM's
/// resources.
pub struct PageStoreArgs {
    /// The new VM's guest memory.
    pub mem: GuestRam,
    /// Where rejected requests are reported.
    pub sink: DeviceEventSink,
    /// Where the guest's statistics land.
    pub stats: GuestStatsCell,
    /// Start paused (one pause held, which [`PageStoreHandle::resume`] ends):
    /// the reads' remaining delays then count from the resume, and nothing is
    /// written into guest memory before it (restore devices, then memory and
    /// vCPUs, then resume). `false` starts the delays at the restore.
    pub start_paused: bool,
}

impl std::fmt::Debug for PageStoreArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageStoreArgs")
            .field("start_paused", &self.start_paused)
            .finish_non_exhaustive()
    }
}

/// One accepted read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Read {
    index: u64,
    dest: u64,
    slot: u64,
    id: u64,
}

/// A read queued for the worker, due at `due` on the device clock.
#[derive(Debug)]
struct Queued {
    due: Duration,
    read: Read,
}

/// Time that passes only while the device runs (not paused).
#[derive(Debug)]
struct Clock {
    epoch: Instant,
    /// Time spent stopped before the current stop.
    stopped_for: Duration,
    /// Since when it stands still, if it does.
    stopped_at: Option<Instant>,
}

impl Clock {
    fn new(stopped: bool) -> Clock {
        let epoch = Instant::now();
        Clock {
            epoch,
            stopped_for: Duration::ZERO,
            stopped_at: stopped.then_some(epoch),
        }
    }

    /// Device time.
    fn now(&self) -> Duration {
        self.stopped_at
            .unwrap_or_else(Instant::now)
            .saturating_duration_since(self.epoch)
            .saturating_sub(self.stopped_for)
    }

    fn stop(&mut self) {
        self.stopped_at.get_or_insert_with(Instant::now);
    }

    fn start(&mut self) {
        if let Some(at) = self.stopped_at.take() {
            self.stopped_for += at.elapsed();
        }
    }

    /// Ends the stop as if there had been none (a failed pause).
    fn cancel_stop(&mut self) {
        self.stopped_at = None;
    }
}

/// What the device, its handles and its worker share.
#[derive(Debug)]
struct Queue {
    clock: Clock,
    /// The completion area (`INIT`).
    completion: Option<u64>,
    /// Reads not answered yet (at most one per slot), in arrival order.
    reads: Vec<Queued>,
    /// The read the worker is writing into guest memory, without the lock.
    serving: Option<Read>,
    /// Pauses in force; the worker serves nothing while there is one.
    pauses: usize,
    /// The device is gone: the worker ends.
    stopped: bool,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled on every change of `queue` that a waiter may wait for.
    changed: Condvar,
}

impl Shared {
    // Nothing panics while holding the lock; should something do, the queue
    // is still consistent (every change is one assignment or push), so a
    // poisoned lock is used as it is.
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, q: MutexGuard<'a, Queue>) -> MutexGuard<'a, Queue> {
        self.changed.wait(q).unwrap_or_else(PoisonError::into_inner)
    }

    fn wait_for<'a>(&self, q: MutexGuard<'a, Queue>, d: Duration) -> MutexGuard<'a, Queue> {
        self.changed
            .wait_timeout(q, d)
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }
}

/// Pauses and resumes a [`PageStore`]'s worker from any thread, without the
/// device's mutex (which the vCPUs take). Cheap to clone.
#[derive(Debug, Clone)]
pub struct PageStoreHandle {
    shared: Arc<Shared>,
}

impl PageStoreHandle {
    /// Pauses the device: returns once its worker is not writing guest memory,
    /// and it writes none until [`PageStoreHandle::resume`]. A read being
    /// written at the call is finished first, for at most `timeout`; if it
    /// takes longer (a write blocked on a userfault nobody serves), the pause
    /// is withdrawn, the device runs on as if it had not been asked, and the
    /// error says which write is stuck.
    ///
    /// The device's clock stops at the call: the time until the resume does
    /// not count against the reads' delays. Pauses nest: each successful one
    /// needs its own resume. Requests the guest sends while the device is
    /// paused are accepted and queued as usual.
    pub fn pause(&self, timeout: Duration) -> Result<(), PageStoreError> {
        // No deadline past the end of time (`Duration::MAX`): wait as long as it takes.
        let deadline = Instant::now().checked_add(timeout);
        let mut q = self.shared.lock();
        q.pauses += 1;
        q.clock.stop();
        while let Some(read) = q.serving {
            let Some(deadline) = deadline else {
                // Woken when the write is done.
                q = self.shared.wait(q);
                continue;
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                q.pauses -= 1;
                if q.pauses == 0 {
                    q.clock.cancel_stop();
                    self.shared.changed.notify_all();
                }
                return Err(PageStoreError::PauseTimeout {
                    timeout,
                    index: read.index,
                    dest: read.dest,
                });
            }
            q = self.shared.wait_for(q, left);
        }
        Ok(())
    }

    /// Ends one pause; the device runs again once every pause has ended. A
    /// resume without a pause does nothing (and is logged).
    pub fn resume(&self) {
        let mut q = self.shared.lock();
        let Some(left) = q.pauses.checked_sub(1) else {
            tracing::warn!("page store resumed without being paused");
            return;
        };
        q.pauses = left;
        if left == 0 {
            q.clock.start();
            self.shared.changed.notify_all();
        }
    }

    /// Whether a pause is in force and the worker is idle (a save would
    /// succeed).
    pub fn is_paused(&self) -> bool {
        let q = self.shared.lock();
        q.pauses > 0 && q.serving.is_none()
    }
}

/// Held pages and the reads waiting for their release (touched only by the
/// vCPUs' requests, under the device's mutex).
#[derive(Debug, Default)]
struct Held {
    pages: Vec<u64>,
    reads: Vec<Read>,
}

/// The page-store device.
pub struct PageStore {
    mem: GuestRam,
    sink: DeviceEventSink,
    stats: GuestStatsCell,
    shared: Arc<Shared>,
    held: Held,
}

impl std::fmt::Debug for PageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageStore").finish_non_exhaustive()
    }
}

impl PageStore {
    /// A store over guest memory `mem`; statistics land in `stats`. Starts the
    /// worker thread, which ends when the device is dropped.
    pub fn new(mem: GuestRam, sink: DeviceEventSink, stats: GuestStatsCell) -> Result<Self, PageStoreError> {
        let queue = Queue {
            clock: Clock::new(false),
            completion: None,
            reads: Vec::new(),
            serving: None,
            pauses: 0,
            stopped: false,
        };
        PageStore::start(mem, sink, stats, queue, Held::default())
    }

    fn start(
        mem: GuestRam,
        sink: DeviceEventSink,
        stats: GuestStatsCell,
        queue: Queue,
        held: Held,
    ) -> Result<Self, PageStoreError> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(queue),
            changed: Condvar::new(),
        });
        let (m, sh) = (mem.clone(), shared.clone());
        std::thread::Builder::new()
            .name("page-store".into())
            .spawn(move || worker(&m, &sh))
            .map_err(|source| PageStoreError::Spawn { source })?;
        Ok(PageStore {
            mem,
            sink,
            stats,
            shared,
            held,
        })
    }

    /// A handle that pauses and resumes this device (take it before the
    /// device goes onto the I/O bus).
    pub fn handle(&self) -> PageStoreHandle {
        PageStoreHandle {
            shared: self.shared.clone(),
        }
    }

    fn handle_request(&mut self, gpa: u64) -> u32 {
        let addr = GuestAddress(gpa);
        let Ok(req) = self.mem.read_obj::<PvRequest>(addr) else {
            (self.sink)(DeviceEvent::BadRequest(format!(
                "page-store request at {gpa:#x} outside guest memory"
            )));
            return status::REJECTED;
        };
        let st = match self.request(&req) {
            Ok(()) => status::OK,
            Err(why) => {
                (self.sink)(DeviceEvent::BadRequest(format!(
                    "page-store request kind {:#x} at {gpa:#x} rejected: {why}",
                    req.kind
                )));
                status::REJECTED
            }
        };
        // `status` is the second u32 of the request, which was just read whole.
        if let Some(at) = addr.checked_add(4) {
            let _ = self.mem.write_obj(st, at);
        }
        st
    }

    /// Carries out one request; `Err` says why it is rejected.
    fn request(&mut self, req: &PvRequest) -> Result<(), String> {
        let a = req.args;
        match req.kind {
            store::INIT => {
                check_completion_area(&self.mem, a[0])?;
                self.shared.lock().completion = Some(a[0]);
                Ok(())
            }
            store::READ => {
                let read = Read {
                    index: a[0],
                    dest: a[1],
                    slot: a[2],
                    id: a[3],
                };
                check_read(&self.mem, &read)?;
                let delay = Duration::from_micros(a[4]).min(MAX_DELAY);
                let mut q = self.shared.lock();
                if q.completion.is_none() {
                    return Err("READ before INIT: send INIT with the completion area first".into());
                }
                // Bounded: one read per slot is outstanding at a time (a
                // guest reuses a slot only once its read is answered).
                q.reads.retain(|r| r.read.slot != read.slot);
                self.held.reads.retain(|r| r.slot != read.slot);
                if self.held.pages.contains(&read.index) {
                    self.held.reads.push(read);
                } else {
                    let due = q.clock.now() + delay;
                    q.reads.push(Queued { due, read });
                    self.shared.changed.notify_all();
                }
                Ok(())
            }
            store::HOLD => {
                let page = a[0];
                if page >= store::PAGES {
                    Err(format!("store page {page} does not exist (0..{})", store::PAGES))
                } else if self.held.pages.contains(&page) {
                    Ok(())
                } else if self.held.pages.len() >= store::MAX_HELD_PAGES {
                    Err(format!(
                        "{} pages are held already, the most at once; release one first",
                        store::MAX_HELD_PAGES
                    ))
                } else {
                    self.held.pages.push(page);
                    Ok(())
                }
            }
            store::RELEASE => {
                let page = a[0];
                self.held.pages.retain(|&p| p != page);
                let (go, keep): (Vec<Read>, Vec<Read>) = std::mem::take(&mut self.held.reads)
                    .into_iter()
                    .partition(|r| r.index == page);
                self.held.reads = keep;
                if !go.is_empty() {
                    let mut q = self.shared.lock();
                    let now = q.clock.now();
                    q.reads
                        .extend(go.into_iter().map(|read| Queued { due: now, read }));
                    self.shared.changed.notify_all();
                }
                Ok(())
            }
            store::STATS => match self.mem.read_obj::<GuestStats>(GuestAddress(a[0])) {
                Ok(s) => {
                    *self.stats.lock().unwrap_or_else(PoisonError::into_inner) = Some(s);
                    Ok(())
                }
                Err(e) => Err(format!("statistics at {:#x} are not in guest memory: {e}", a[0])),
            },
            other => Err(format!("unknown kind {other:#x}")),
        }
    }
}

impl Drop for PageStore {
    fn drop(&mut self) {
        self.shared.lock().stopped = true;
        self.shared.changed.notify_all();
    }
}

/// Whether `[gpa, gpa + len)` is guest RAM (and does not wrap).
fn in_memory(mem: &GuestRam, gpa: u64, len: usize) -> bool {
    u64::try_from(len).ok().and_then(|l| gpa.checked_add(l)).is_some()
        && mem.check_range(GuestAddress(gpa), len)
}

fn check_completion_area(mem: &GuestRam, area: u64) -> Result<(), String> {
    if !area.is_multiple_of(8) {
        Err(format!("completion area {area:#x} is not 8-byte aligned"))
    } else if !in_memory(mem, area, AREA_LEN) {
        Err(format!(
            "completion area {area:#x} ({AREA_LEN:#x} bytes) is not in guest RAM"
        ))
    } else {
        Ok(())
    }
}

/// The guest address of `slot`'s word in the completion area at `area`.
fn slot_gpa(area: u64, slot: u64) -> Option<GuestAddress> {
    let slot = usize::try_from(slot).ok().filter(|&s| s < store::SLOTS)?;
    let offset = u64::try_from(slot).ok()?.checked_mul(8)?;
    GuestAddress(area).checked_add(offset)
}

fn check_read(mem: &GuestRam, r: &Read) -> Result<(), String> {
    if r.index >= store::PAGES {
        Err(format!(
            "store page {} does not exist (0..{})",
            r.index,
            store::PAGES
        ))
    } else if !r.dest.is_multiple_of(PAGE_SIZE) {
        Err(format!("destination frame {:#x} is not page aligned", r.dest))
    } else if !in_memory(mem, r.dest, PAGE) {
        Err(format!("destination frame {:#x} is not in guest RAM", r.dest))
    } else if slot_gpa(0, r.slot).is_none() {
        Err(format!(
            "completion slot {} is out of range (0..{})",
            r.slot,
            store::SLOTS
        ))
    } else if r.id == 0 {
        Err("request id 0 is reserved (it marks a slot without an answer)".into())
    } else {
        Ok(())
    }
}

/// Serves reads in deadline order (delays may differ per request), while the
/// device is not paused, until it is dropped.
fn worker(mem: &GuestRam, shared: &Shared) {
    let mut q = shared.lock();
    loop {
        if q.stopped {
            return;
        }
        if q.pauses > 0 {
            // Woken by the last resume (or the drop).
            q = shared.wait(q);
            continue;
        }
        let now = q.clock.now();
        // The first of the earliest: reads due at once keep their order.
        let next = q
            .reads
            .iter()
            .enumerate()
            .min_by_key(|(_, r)| r.due)
            .map(|(i, r)| (i, r.due));
        q = match next {
            // Woken by a new read, a pause or the drop.
            None => shared.wait(q),
            Some((i, due)) if due <= now => {
                let read = q.reads.remove(i).read;
                let area = q.completion;
                q.serving = Some(read);
                drop(q);
                serve(mem, area, &read);
                let mut q = shared.lock();
                q.serving = None;
                shared.changed.notify_all();
                q
            }
            Some((_, due)) => shared.wait_for(q, due - now),
        };
    }
}

fn serve(mem: &GuestRam, area: Option<u64>, r: &Read) {
    let mut page = [0u8; PAGE];
    for (k, chunk) in page.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&store::word(r.index, k as u64).to_le_bytes());
    }
    if let Err(e) = mem.write_slice(&page, GuestAddress(r.dest)) {
        tracing::warn!(
            "page store: writing page {} into {:#x} failed: {e}",
            r.index,
            r.dest
        );
        return;
    }
    let Some(at) = area.and_then(|a| slot_gpa(a, r.slot)) else {
        return;
    };
    // The data is written before the id: x86 stores are not reordered, and the
    // fence keeps the compiler from doing it.
    std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
    if let Err(e) = mem.write_obj(r.id, at) {
        tracing::warn!(
            "page store: writing the id of slot {} at {:#x} failed: {e}",
            r.slot,
            at.0
        );
    }
}

/// Microseconds in `d`, rounded up.
fn micros_ceil(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1000)).unwrap_or(u64::MAX)
}

impl Persist for PageStore {
    type State = PageStoreState;
    type ConstructorArgs = PageStoreArgs;
    type Error = PageStoreError;

    /// Requires a pause ([`PageStoreHandle::pause`] returned): the saved reads
    /// are then exactly those not written into guest memory, and none will be
    /// until the resume. Keep the device paused until guest memory is saved.
    fn save(&self) -> Result<PageStoreState, PageStoreError> {
        let q = self.shared.lock();
        if q.pauses == 0 || q.serving.is_some() {
            return Err(PageStoreError::NotPaused);
        }
        let now = q.clock.now();
        let mut queued: Vec<&Queued> = q.reads.iter().collect();
        // Stable: reads due together keep their order.
        queued.sort_by_key(|r| r.due);
        let in_flight = queued
            .into_iter()
            .map(|r| InFlightRead {
                index: r.read.index,
                dest: r.read.dest,
                slot: r.read.slot,
                id: r.read.id,
                remaining_us: micros_ceil(r.due.saturating_sub(now)),
            })
            .collect();
        let held_reads = self
            .held
            .reads
            .iter()
            .map(|r| HeldRead {
                index: r.index,
                dest: r.dest,
                slot: r.slot,
                id: r.id,
            })
            .collect();
        let stats = *self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(PageStoreState {
            completion_area: q.completion,
            in_flight,
            held_pages: self.held.pages.clone(),
            held_reads,
            stats,
        })
    }

    fn restore(args: PageStoreArgs, state: &PageStoreState) -> Result<Self, PageStoreError> {
        check_state(&args.mem, state).map_err(|reason| PageStoreError::InvalidState { reason })?;
        let clock = Clock::new(args.start_paused);
        let now = clock.now();
        let reads = state
            .in_flight
            .iter()
            .map(|r| Queued {
                due: now + Duration::from_micros(r.remaining_us),
                read: Read {
                    index: r.index,
                    dest: r.dest,
                    slot: r.slot,
                    id: r.id,
                },
            })
            .collect();
        let queue = Queue {
            clock,
            completion: state.completion_area,
            reads,
            serving: None,
            pauses: usize::from(args.start_paused),
            stopped: false,
        };
        let held = Held {
            pages: state.held_pages.clone(),
            reads: state
                .held_reads
                .iter()
                .map(|r| Read {
                    index: r.index,
                    dest: r.dest,
                    slot: r.slot,
                    id: r.id,
                })
                .collect(),
        };
        *args.stats.lock().unwrap_or_else(PoisonError::into_inner) = state.stats;
        PageStore::start(args.mem, args.sink, args.stats, queue, held)
    }
}

/// Checks a saved state against the new VM's memory, as strictly as the
/// requests that built it were checked.
fn check_state(mem: &GuestRam, state: &PageStoreState) -> Result<(), String> {
    if let Some(area) = state.completion_area {
        check_completion_area(mem, area)?;
    } else if !state.in_flight.is_empty() || !state.held_reads.is_empty() {
        return Err("it has reads but no completion area".into());
    }
    if state.held_pages.len() > store::MAX_HELD_PAGES {
        return Err(format!(
            "{} held pages, at most {} can be",
            state.held_pages.len(),
            store::MAX_HELD_PAGES
        ));
    }
    for (i, &page) in state.held_pages.iter().enumerate() {
        if page >= store::PAGES {
            return Err(format!(
                "held store page {page} does not exist (0..{})",
                store::PAGES
            ));
        }
        if state.held_pages[..i].contains(&page) {
            return Err(format!("store page {page} is held twice"));
        }
    }
    let in_flight = state.in_flight.iter().map(|r| {
        let read = Read {
            index: r.index,
            dest: r.dest,
            slot: r.slot,
            id: r.id,
        };
        if Duration::from_micros(r.remaining_us) > MAX_DELAY {
            Err(format!(
                "read of store page {} has {} us left, more than the longest delay ({MAX_DELAY:?})",
                r.index, r.remaining_us
            ))
        } else {
            Ok(read)
        }
    });
    let held = state.held_reads.iter().map(|r| {
        if state.held_pages.contains(&r.index) {
            Ok(Read {
                index: r.index,
                dest: r.dest,
                slot: r.slot,
                id: r.id,
            })
        } else {
            Err(format!(
                "a read waits for store page {}, which is not held",
                r.index
            ))
        }
    });
    let mut slots = [false; store::SLOTS];
    for read in in_flight.chain(held) {
        let read = read?;
        check_read(mem, &read).map_err(|e| format!("a saved read is invalid: {e}"))?;
        let slot = usize::try_from(read.slot).map_err(|e| e.to_string())?;
        match slots.get_mut(slot) {
            Some(used) if !*used => *used = true,
            _ => return Err(format!("completion slot {slot} has two reads")),
        }
    }
    Ok(())
}

impl MutDevicePio for PageStore {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }

    fn pio_write(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
        let Ok(raw) = <[u8; 4]>::try_from(data) else {
            (self.sink)(DeviceEvent::BadRequest(
                "page-store doorbell needs a 32-bit out".into(),
            ));
            return;
        };
        self.handle_request(u64::from(u32::from_le_bytes(raw)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the tests put the completion area.
    const AREA: u64 = 0x1000;
    /// Long enough for anything the tests wait for, on a loaded machine.
    const PATIENCE: Duration = Duration::from_secs(20);

    type Events = Arc<Mutex<Vec<DeviceEvent>>>;

    fn ram() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn sink() -> (DeviceEventSink, Events) {
        let seen = Events::default();
        let s = seen.clone();
        (Arc::new(move |e| s.lock().unwrap().push(e)), seen)
    }

    fn device(mem: &GuestRam) -> (PageStore, Events) {
        let (sink, seen) = sink();
        (PageStore::new(mem.clone(), sink, Arc::default()).unwrap(), seen)
    }

    fn send(dev: &mut PageStore, mem: &GuestRam, kind: u32, args: [u64; 6]) -> u32 {
        mem.write_obj(
            PvRequest {
                kind,
                status: 0,
                args,
            },
            GuestAddress(0x100),
        )
        .unwrap();
        dev.pio_write(
            PioAddress(abi::ports::PAGE_STORE_PORT),
            0,
            &0x100u32.to_le_bytes(),
        );
        mem.read_obj::<PvRequest>(GuestAddress(0x100)).unwrap().status
    }

    fn slot_in(mem: &GuestRam, area: u64, slot: u64) -> u64 {
        mem.read_obj::<u64>(GuestAddress(area + slot * 8)).unwrap()
    }

    fn slot(mem: &GuestRam, slot: u64) -> u64 {
        slot_in(mem, AREA, slot)
    }

    fn wait_for_id_in(mem: &GuestRam, area: u64, slot: u64, id: u64) {
        let start = Instant::now();
        while slot_in(mem, area, slot) != id {
            assert!(start.elapsed() < PATIENCE, "slot {slot} never got id {id}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn wait_for_id(mem: &GuestRam, slot: u64, id: u64) {
        wait_for_id_in(mem, AREA, slot, id);
    }

    /// Whether the frame at `dest` holds store page `index`.
    fn holds_page(mem: &GuestRam, dest: u64, index: u64) -> bool {
        (0..512).all(|k| mem.read_obj::<u64>(GuestAddress(dest + 8 * k)).unwrap() == store::word(index, k))
    }

    fn args(mem: &GuestRam, start_paused: bool) -> (PageStoreArgs, Events, GuestStatsCell) {
        let (sink, seen) = sink();
        let stats = GuestStatsCell::default();
        let args = PageStoreArgs {
            mem: mem.clone(),
            sink,
            stats: stats.clone(),
            start_paused,
        };
        (args, seen, stats)
    }

    #[test]
    fn read_is_answered_later_with_the_page_and_the_id() {
        let mem = ram();
        let stats: GuestStatsCell = Arc::default();
        let mut dev = PageStore::new(mem.clone(), Arc::new(|_| {}), stats.clone()).unwrap();
        assert_eq!(
            send(&mut dev, &mem, store::INIT, [AREA, 0, 0, 0, 0, 0]),
            status::OK
        );
        assert_eq!(
            send(&mut dev, &mem, store::READ, [7, 0x3000, 5, 42, 20_000, 0]),
            status::OK
        );
        assert_eq!(slot(&mem, 5), 0, "not answered yet");
        let start = Instant::now();
        wait_for_id(&mem, 5, 42);
        assert!(start.elapsed() >= Duration::from_millis(10));
        assert!(holds_page(&mem, 0x3000, 7));
        // Hostile: bad slot, unaligned frame.
        assert_eq!(
            send(&mut dev, &mem, store::READ, [7, 0x3001, 99, 1, 0, 0]),
            status::REJECTED
        );
        mem.write_obj(
            GuestStats {
                faults: 3,
                ..Default::default()
            },
            GuestAddress(0x5000),
        )
        .unwrap();
        assert_eq!(
            send(&mut dev, &mem, store::STATS, [0x5000, 0, 0, 0, 0, 0]),
            status::OK
        );
        assert_eq!(stats.lock().unwrap().unwrap().faults, 3);
    }

    #[test]
    fn held_reads_wait_for_the_release_and_others_do_not() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let (mut dev, _) = device(&mem);
        assert_eq!(
            send(&mut dev, &mem, store::INIT, [0x1000, 0, 0, 0, 0, 0]),
            status::OK
        );
        assert_eq!(send(&mut dev, &mem, store::HOLD, [9, 0, 0, 0, 0, 0]), status::OK);
        assert_eq!(
            send(&mut dev, &mem, store::READ, [9, 0x3000, 1, 7, 0, 0]),
            status::OK
        );
        // Another page is not held: answered after its (zero) delay.
        assert_eq!(
            send(&mut dev, &mem, store::READ, [4, 0x4000, 2, 8, 0, 0]),
            status::OK
        );
        wait_for_id(&mem, 2, 8);
        // The worker served page 4 after the held read was queued: had page 9
        // gone to the worker, it would be answered by now (same zero delay,
        // sent first). Check once more after the worker had every chance.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x1000 + 8)).unwrap(), 0, "held");
        assert_eq!(
            send(&mut dev, &mem, store::RELEASE, [9, 0, 0, 0, 0, 0]),
            status::OK
        );
        wait_for_id(&mem, 1, 7);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x3000 + 8 * 511)).unwrap(),
            store::word(9, 511)
        );
        // Released: later reads of it are answered again.
        assert_eq!(
            send(&mut dev, &mem, store::READ, [9, 0x5000, 3, 9, 0, 0]),
            status::OK
        );
        wait_for_id(&mem, 3, 9);
        // Hostile: out-of-range page, too many held pages.
        assert_eq!(
            send(&mut dev, &mem, store::HOLD, [store::PAGES, 0, 0, 0, 0, 0]),
            status::REJECTED
        );
        for p in 0..store::MAX_HELD_PAGES as u64 {
            assert_eq!(send(&mut dev, &mem, store::HOLD, [p, 0, 0, 0, 0, 0]), status::OK);
        }
        assert_eq!(
            send(&mut dev, &mem, store::HOLD, [100, 0, 0, 0, 0, 0]),
            status::REJECTED
        );
        assert_eq!(
            send(&mut dev, &mem, store::HOLD, [0, 0, 0, 0, 0, 0]),
            status::OK,
            "already held"
        );
    }

    #[test]
    fn a_read_in_flight_at_the_save_completes_on_the_restored_vm_only() {
        let mem = ram();
        let (mut dev, _) = device(&mem);
        let pause = dev.handle();
        assert_eq!(
            send(&mut dev, &mem, store::INIT, [AREA, 0, 0, 0, 0, 0]),
            status::OK
        );
        // Served before the pause: must not be saved.
        assert_eq!(
            send(&mut dev, &mem, store::READ, [8, 0x4000, 6, 43, 0, 0]),
            status::OK
        );
        wait_for_id(&mem, 6, 43);
        // Due long after the save.
        assert_eq!(
            send(&mut dev, &mem, store::READ, [7, 0x3000, 5, 42, 1_500_000, 0]),
            status::OK
        );
        pause.pause(DEFAULT_PAUSE_TIMEOUT).unwrap();
        let state = dev.save().unwrap();
        assert_eq!(state.completion_area, Some(AREA));
        assert_eq!(state.in_flight.len(), 1, "only the read not served: {state:?}");
        let r = state.in_flight[0];
        assert_eq!((r.index, r.dest, r.slot, r.id), (7, 0x3000, 5, 42));
        assert!(r.remaining_us > 0 && r.remaining_us <= 1_500_000, "{r:?}");
        let json = serde_json::to_string(&state).unwrap();
        let back: PageStoreState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);

        let mem2 = ram();
        let (args, events, _) = args(&mem2, false);
        let restored_at = Instant::now();
        let new = PageStore::restore(args, &back).unwrap();
        assert_eq!(slot(&mem2, 5), 0, "answered before its remaining delay");
        wait_for_id(&mem2, 5, 42);
        assert!(
            restored_at.elapsed() >= Duration::from_micros(r.remaining_us),
            "answered after {:?}, {} us were left",
            restored_at.elapsed(),
            r.remaining_us
        );
        assert!(holds_page(&mem2, 0x3000, 7));
        // The old VM's read was due before the new one's: paused since the
        // save, the old device did not serve it.
        assert_eq!(slot(&mem, 5), 0, "served on the old VM after the save");
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x3000)).unwrap(), 0);
        assert!(events.lock().unwrap().is_empty());
        // Served once: nothing is left in flight on the new device.
        let h = new.handle();
        h.pause(DEFAULT_PAUSE_TIMEOUT).unwrap();
        assert!(new.save().unwrap().in_flight.is_empty());
        h.resume();
    }

    #[test]
    fn held_pages_and_reads_survive_a_restore_and_are_answered_at_the_release() {
        let mem = ram();
        let (mut dev, _) = device(&mem);
        assert_eq!(
            send(&mut dev, &mem, store::INIT, [AREA, 0, 0, 0, 0, 0]),
            status::OK
        );
        assert_eq!(send(&mut dev, &mem, store::HOLD, [9, 0, 0, 0, 0, 0]), status::OK);
        assert_eq!(send(&mut dev, &mem, store::HOLD, [10, 0, 0, 0, 0, 0]), status::OK);
        assert_eq!(
            send(&mut dev, &mem, store::READ, [9, 0x3000, 1, 7, 0, 0]),
            status::OK
        );
        let guest_stats = GuestStats {
            faults: 11,
            store_reads: 1,
            ..Default::default()
        };
        mem.write_obj(guest_stats, GuestAddress(0x5000)).unwrap();
        assert_eq!(
            send(&mut dev, &mem, store::STATS, [0x5000, 0, 0, 0, 0, 0]),
            status::OK
        );
        dev.handle().pause(DEFAULT_PAUSE_TIMEOUT).unwrap();
        let state = dev.save().unwrap();
        assert_eq!(state.held_pages, [9, 10]);
        assert_eq!(
            state.held_reads,
            [HeldRead {
                index: 9,
                dest: 0x3000,
                slot: 1,
                id: 7
            }]
        );
        assert!(state.in_flight.is_empty());
        assert_eq!(state.stats, Some(guest_stats));
        let back: PageStoreState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();

        let mem2 = ram();
        let (args, _, stats2) = args(&mem2, false);
        let mut new = PageStore::restore(args, &back).unwrap();
        assert_eq!(*stats2.lock().unwrap(), Some(guest_stats));
        // Still held: a zero-delay read would be answered within this.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(slot(&mem2, 1), 0, "a held read was answered without its release");
        assert_eq!(
            send(&mut new, &mem2, store::RELEASE, [9, 0, 0, 0, 0, 0]),
            status::OK
        );
        wait_for_id(&mem2, 1, 7);
        assert!(holds_page(&mem2, 0x3000, 9));
        assert_eq!(slot(&mem, 1), 0, "answered on the old VM");
        // Page 10 is still held on the new device.
        assert_eq!(
            send(&mut new, &mem2, store::READ, [10, 0x4000, 2, 8, 0, 0]),
            status::OK
        );
        let h = new.handle();
        h.pause(DEFAULT_PAUSE_TIMEOUT).unwrap();
        let state = new.save().unwrap();
        assert_eq!(state.held_pages, [10]);
        assert_eq!(state.held_reads.len(), 1);
        assert!(state.in_flight.is_empty());
        h.resume();
    }

    #[test]
    fn nothing_is_served_while_paused_and_paused_time_does_not_count() {
        let mem = ram();
        let (mut dev, _) = device(&mem);
        let h = dev.handle();
        assert_eq!(
            send(&mut dev, &mem, store::INIT, [AREA, 0, 0, 0, 0, 0]),
            status::OK
        );
        // Sent before the pause, 300 ms.
        assert_eq!(
            send(&mut dev, &mem, store::READ, [5, 0x5000, 3, 13, 300_000, 0]),
            status::OK
        );
        assert!(!h.is_paused());
        h.pause(DEFAULT_PAUSE_TIMEOUT).unwrap();
        assert!(h.is_paused());
        // Sent while paused: due at once, and in 200 ms.
        assert_eq!(
            send(&mut dev, &mem, store::READ, [3, 0x3000, 1, 11, 0, 0]),
            status::OK
        );
        assert_eq!(
            send(&mut dev, &mem, store::READ, [4, 0x4000, 2, 12, 200_000, 0]),
            status::OK
        );
        std::thread::sleep(Duration::from_millis(400));
        for s in 1..=3 {
            assert_eq!(slot(&mem, s), 0, "slot {s} answered while paused");
        }
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x3000)).unwrap(), 0);
        // The clock stands still: two saves agree to the microsecond.
        let first = dev.save().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(dev.save().unwrap(), first);
        let left: Vec<(u64, u64)> = first.in_flight.iter().map(|r| (r.id, r.remaining_us)).collect();
        assert_eq!(left.len(), 3, "{left:?}");
        assert_eq!(left[0], (11, 0));
        assert_eq!(left[1], (12, 200_000), "full delay for a read sent while paused");
        assert_eq!(left[2].0, 13);
        let before_pause = left[2].1;
        assert!(before_pause > 0 && before_pause <= 300_000, "{left:?}");

        let resumed = Instant::now();
        h.resume();
        assert!(!h.is_paused());
        wait_for_id(&mem, 1, 11);
        wait_for_id(&mem, 2, 12);
        assert!(resumed.elapsed() >= Duration::from_millis(200));
        wait_for_id(&mem, 3, 13);
        assert!(resumed.elapsed() >= Duration::from_micros(before_pause));
        assert!(holds_page(&mem, 0x3000, 3) && holds_page(&mem, 0x4000, 4) && holds_page(&mem, 0x5000, 5));
        // Resumed: a save is refused again.
        assert!(matches!(dev.save(), Err(PageStoreError::NotPaused)));
    }

    #[test]
    fn a_save_needs_a_pause_and_pauses_nest() {
        let mem = ram();
        let (dev, _) = device(&mem);
        let h = dev.handle();
        let err = dev.save().unwrap_err();
        assert!(matches!(err, PageStoreError::NotPaused));
        assert!(err.to_string().contains("pause it first"), "{err}");
        h.pause(DEFAULT_PAUSE_TIMEOUT).unwrap();
        h.pause(Duration::MAX).unwrap(); // no deadline: no overflow either
        h.resume();
        assert!(h.is_paused(), "one pause is still in force");
        assert!(dev.save().is_ok());
        h.resume();
        assert!(!h.is_paused());
        h.resume(); // without a pause: nothing happens
        assert!(!h.is_paused());
        assert!(dev.save().is_err());
    }

    /// Makes the worker look stuck in a write (as in a userfault nobody
    /// serves), once it is idle.
    fn fake_stuck_write(dev: &PageStore, read: Read) {
        let start = Instant::now();
        loop {
            let mut q = dev.shared.lock();
            if q.serving.is_none() && q.reads.is_empty() {
                q.serving = Some(read);
                return;
            }
            drop(q);
            assert!(start.elapsed() < PATIENCE, "the worker never became idle");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn end_stuck_write(dev: &PageStore) {
        dev.shared.lock().serving = None;
        dev.shared.changed.notify_all();
    }

    #[test]
    fn a_pause_waits_for_the_write_in_progress_within_its_timeout() {
        let mem = ram();
        let (mut dev, _) = device(&mem);
        let h = dev.handle();
        assert_eq!(
            send(&mut dev, &mem, store::INIT, [AREA, 0, 0, 0, 0, 0]),
            status::OK
        );
        let stuck = Read {
            index: 9,
            dest: 0x3000,
            slot: 0,
            id: 1,
        };
        fake_stuck_write(&dev, stuck);
        let err = h.pause(Duration::from_millis(50)).unwrap_err();
        assert!(
            matches!(
                err,
                PageStoreError::PauseTimeout {
                    index: 9,
                    dest: 0x3000,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("userfault"), "{err}");
        // Withdrawn: the device runs on.
        assert!(!h.is_paused());
        assert!(dev.save().is_err());
        end_stuck_write(&dev);
        assert_eq!(
            send(&mut dev, &mem, store::READ, [2, 0x4000, 3, 5, 0, 0]),
            status::OK
        );
        wait_for_id(&mem, 3, 5);

        // A pause with time enough returns once the write is done.
        fake_stuck_write(&dev, stuck);
        let h2 = h.clone();
        let pauser = std::thread::spawn(move || h2.pause(PATIENCE));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!pauser.is_finished(), "the pause returned during a write");
        assert!(dev.save().is_err(), "saved during a write");
        // The vCPUs' requests go on meanwhile; the new read waits for the resume.
        assert_eq!(
            send(&mut dev, &mem, store::READ, [2, 0x5000, 4, 6, 0, 0]),
            status::OK
        );
        end_stuck_write(&dev);
        pauser.join().unwrap().unwrap();
        assert!(h.is_paused());
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(slot(&mem, 4), 0, "answered while paused");
        assert_eq!(dev.save().unwrap().in_flight.len(), 1);
        h.resume();
        wait_for_id(&mem, 4, 6);
    }

    #[test]
    fn a_restore_can_start_paused() {
        let state = PageStoreState {
            completion_area: Some(AREA),
            in_flight: vec![InFlightRead {
                index: 1,
                dest: 0x3000,
                slot: 0,
                id: 99,
                remaining_us: 0,
            }],
            ..Default::default()
        };
        let mem = ram();
        let (args, _, _) = args(&mem, true);
        let dev = PageStore::restore(args, &state).unwrap();
        let h = dev.handle();
        assert!(h.is_paused());
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(slot(&mem, 0), 0, "answered before the resume");
        assert_eq!(dev.save().unwrap(), state);
        h.resume();
        wait_for_id(&mem, 0, 99);
        assert!(holds_page(&mem, 0x3000, 1));
    }

    #[test]
    fn a_new_read_on_a_slot_replaces_the_unanswered_one() {
        let mem = ram();
        let (mut dev, _) = device(&mem);
        assert_eq!(
            send(&mut dev, &mem, store::INIT, [AREA, 0, 0, 0, 0, 0]),
            status::OK
        );
        assert_eq!(
            send(&mut dev, &mem, store::READ, [1, 0x3000, 1, 5, 10_000_000, 0]),
            status::OK
        );
        assert_eq!(
            send(&mut dev, &mem, store::READ, [2, 0x4000, 1, 6, 0, 0]),
            status::OK
        );
        wait_for_id(&mem, 1, 6);
        let h = dev.handle();
        h.pause(DEFAULT_PAUSE_TIMEOUT).unwrap();
        assert!(
            dev.save().unwrap().in_flight.is_empty(),
            "the queue holds one read per slot"
        );
    }

    #[test]
    fn hostile_init_and_read_arguments_are_rejected() {
        let mem = ram();
        let (mut dev, events) = device(&mem);
        let rejected = |dev: &mut PageStore, kind, args| send(dev, &mem, kind, args) == status::REJECTED;
        let mut bad = 0;
        // READ before INIT.
        assert!(rejected(&mut dev, store::READ, [7, 0x3000, 1, 1, 0, 0]));
        bad += 1;
        for area in [
            u64::MAX - 7,     // aligned, wraps around (its last word would be at 0x1f0)
            u64::MAX,         // unaligned, wraps
            0x1_0000 - 8,     // crosses the end of RAM
            0x1_0000,         // just past it
            0xfe04,           // unaligned
            u64::MAX - 0x1ff, // ends at 2^64 exactly
            0x8000_0000_0000_0000,
        ] {
            assert!(
                rejected(&mut dev, store::INIT, [area, 0, 0, 0, 0, 0]),
                "area {area:#x}"
            );
            bad += 1;
        }
        // The area that ends exactly at the end of RAM fits.
        let area = 0x1_0000 - 0x200;
        assert_eq!(
            send(&mut dev, &mem, store::INIT, [area, 0, 0, 0, 0, 0]),
            status::OK
        );
        for args in [
            [7, 0x3000, u64::MAX, 1, 0, 0],            // slot far out of range
            [7, 0x3000, store::SLOTS as u64, 1, 0, 0], // slot just out of range
            [7, !0xfff, 1, 1, 0, 0],                   // frame at the top of the address space
            [7, 0x1_0000, 1, 1, 0, 0],                 // frame just past RAM
            [7, 0x3001, 1, 1, 0, 0],                   // unaligned frame
            [store::PAGES, 0x3000, 1, 1, 0, 0],        // no such page
            [u64::MAX, 0x3000, 1, 1, 0, 0],            // no such page
            [7, 0x3000, 1, 0, 0, 0],                   // id 0
        ] {
            assert!(rejected(&mut dev, store::READ, args), "{args:x?}");
            bad += 1;
        }
        assert!(rejected(&mut dev, store::STATS, [u64::MAX - 8, 0, 0, 0, 0, 0]));
        assert!(rejected(&mut dev, 0x1ff, [0; 6]));
        bad += 2;
        {
            let events = events.lock().unwrap();
            assert_eq!(events.len(), bad, "one event per rejected request: {events:?}");
            assert!(events.iter().all(|e| matches!(e, DeviceEvent::BadRequest(_))));
            assert!(
                events.iter().any(
                    |e| matches!(e, DeviceEvent::BadRequest(m) if m.contains("slot 64 is out of range"))
                ),
                "{events:?}"
            );
        }
        // Nothing was queued, and the device still works.
        let h = dev.handle();
        h.pause(DEFAULT_PAUSE_TIMEOUT).unwrap();
        assert!(dev.save().unwrap().in_flight.is_empty());
        h.resume();
        let last = store::SLOTS as u64 - 1;
        assert_eq!(
            send(&mut dev, &mem, store::READ, [7, 0x3000, last, 3, 0, 0]),
            status::OK
        );
        wait_for_id_in(&mem, area, last, 3);
        assert!(holds_page(&mem, 0x3000, 7));
    }

    #[test]
    fn a_corrupted_state_is_rejected_by_the_restore() {
        let valid = PageStoreState {
            completion_area: Some(AREA),
            in_flight: vec![InFlightRead {
                index: 1,
                dest: 0x3000,
                slot: 0,
                id: 5,
                remaining_us: 1000,
            }],
            held_pages: vec![4],
            held_reads: vec![HeldRead {
                index: 4,
                dest: 0x4000,
                slot: 1,
                id: 6,
            }],
            stats: None,
        };
        let mem = ram();
        let (a, _, _) = args(&mem, true);
        assert!(PageStore::restore(a, &valid).is_ok());
        let mut cases: Vec<(PageStoreState, &str)> = Vec::new();
        let mut s = valid.clone();
        s.completion_area = Some(u64::MAX - 7);
        cases.push((s, "completion area"));
        let mut s = valid.clone();
        s.completion_area = None;
        cases.push((s, "no completion area"));
        let mut s = valid.clone();
        s.in_flight[0].dest = 0x2_0000;
        cases.push((s, "not in guest RAM"));
        let mut s = valid.clone();
        s.in_flight[0].slot = store::SLOTS as u64;
        cases.push((s, "out of range"));
        let mut s = valid.clone();
        s.in_flight[0].remaining_us = 10_000_001;
        cases.push((s, "longest delay"));
        let mut s = valid.clone();
        s.held_reads[0].slot = 0;
        cases.push((s, "two reads"));
        let mut s = valid.clone();
        s.held_reads[0].index = 5;
        cases.push((s, "not held"));
        let mut s = valid.clone();
        s.held_pages = (0..=store::MAX_HELD_PAGES as u64).collect();
        cases.push((s, "held pages"));
        let mut s = valid.clone();
        s.held_pages.push(4);
        cases.push((s, "held twice"));
        let mut s = valid.clone();
        s.held_pages.push(store::PAGES);
        cases.push((s, "does not exist"));
        for (state, why) in cases {
            let (a, _, _) = args(&mem, true);
            let err = PageStore::restore(a, &state).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, PageStoreError::InvalidState { .. }), "{msg}");
            assert!(
                msg.contains(why) && msg.contains("does not fit this VM"),
                "{why}: {msg}"
            );
        }
    }
}
