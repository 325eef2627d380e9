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
//! then persists ([`Persist`](persist::Persist)) as a [`PageStoreState`]: the
//! completion area, the reads in flight with their remaining delays, the held
//! pages and their reads. Restored on another VM, the reads in flight complete
//! there after their remaining delay, and held reads wait for their `RELEASE`.
//! A state that does not fit the new VM is refused ([`StateError`]).
//!
//! The worker never takes the device's mutex (the one a vCPU's `out` takes),
//! and holds its own lock only between writes, never during one: a write into
//! lazily backed guest memory may wait on a userfault, and must block neither
//! a vCPU's port access nor a pause beyond the pause's timeout.
//!
//! Nothing here trusts the guest: bad addresses and slots are rejected (status
//! `REJECTED`, and a [`DeviceEvent::BadRequest`] saying why, a
//! [`RequestError`]), with checked arithmetic on every address the guest
//! supplies, never a panic.
//!
//! The saved state and its checks are in `state.rs`, the tests in `tests.rs`.

mod state;
#[cfg(test)]
mod tests;

pub use state::{HeldRead, InFlightRead, PageStoreArgs, PageStoreState, StateError};

use crate::GuestRam;
use crate::{DeviceEvent, DeviceEventSink};
use abi::layout::{PAGE_LEN as PAGE, PAGE_SIZE};
use abi::pv::store::{self, GuestStats};
use abi::pv::{status, PvRequest};
use sandbox::{SeccompMode, ThreadClass};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

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
    #[error("cannot start the page-store worker thread: {source}")]
    Spawn {
        /// Why (no thread, or no seccomp filter for it).
        #[source]
        source: sandbox::SpawnError,
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
        #[source]
        reason: StateError,
    },
}

/// Why a guest request is rejected: the reason its
/// [`DeviceEvent::BadRequest`] gives. Also why a saved read or completion area
/// does not fit a restored VM ([`StateError`]).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The completion area is not 8-byte aligned.
    #[error("completion area {area:#x} is not 8-byte aligned")]
    UnalignedArea {
        /// Its guest-physical address.
        area: u64,
    },
    /// The completion area is not (wholly) in guest RAM, or wraps.
    #[error("completion area {area:#x} ({len:#x} bytes) is not in guest RAM")]
    AreaNotInRam {
        /// Its guest-physical address.
        area: u64,
        /// Its length in bytes.
        len: usize,
    },
    /// A read or hold of a store page beyond the store.
    #[error("store page {index} does not exist (0..{pages})")]
    NoSuchPage {
        /// The page asked for.
        index: u64,
        /// How many pages the store has.
        pages: u64,
    },
    /// The destination frame of a read is not page aligned.
    #[error("destination frame {dest:#x} is not page aligned")]
    UnalignedFrame {
        /// Its guest-physical address.
        dest: u64,
    },
    /// The destination frame of a read is not (wholly) in guest RAM, or wraps.
    #[error("destination frame {dest:#x} is not in guest RAM")]
    FrameNotInRam {
        /// Its guest-physical address.
        dest: u64,
    },
    /// The completion slot of a read does not exist.
    #[error("completion slot {slot} is out of range (0..{slots})")]
    SlotOutOfRange {
        /// The slot asked for.
        slot: u64,
        /// How many slots the completion area has.
        slots: usize,
    },
    /// A read with id 0, which marks a slot without an answer.
    #[error("request id 0 is reserved (it marks a slot without an answer)")]
    ReservedId,
    /// A read before the completion area is known.
    #[error("READ before INIT: send INIT with the completion area first")]
    ReadBeforeInit,
    /// A hold of one page more than can be held at once.
    #[error("{max} pages are held already, the most at once; release one first")]
    TooManyHeld {
        /// The most pages held at once.
        max: usize,
    },
    /// The statistics to read are not in guest memory.
    #[error("statistics at {gpa:#x} are not in guest memory: {source}")]
    StatsNotInRam {
        /// Their guest-physical address.
        gpa: u64,
        /// Why they cannot be read.
        #[source]
        source: GuestMemoryError,
    },
    /// A request kind the store does not know.
    #[error("unknown kind {kind:#x}")]
    UnknownKind {
        /// The kind sent.
        kind: u32,
    },
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
    /// worker thread (sandboxed in `seccomp` mode), which ends when the
    /// device is dropped.
    pub fn new(
        mem: GuestRam,
        sink: DeviceEventSink,
        stats: GuestStatsCell,
        seccomp: SeccompMode,
    ) -> Result<Self, PageStoreError> {
        let queue = Queue {
            clock: Clock::new(false),
            completion: None,
            reads: Vec::new(),
            serving: None,
            pauses: 0,
            stopped: false,
        };
        PageStore::start(mem, sink, stats, queue, Held::default(), seccomp)
    }

    fn start(
        mem: GuestRam,
        sink: DeviceEventSink,
        stats: GuestStatsCell,
        queue: Queue,
        held: Held,
        seccomp: SeccompMode,
    ) -> Result<Self, PageStoreError> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(queue),
            changed: Condvar::new(),
        });
        let (m, sh) = (mem.clone(), shared.clone());
        sandbox::spawn(
            std::thread::Builder::new().name("page-store".into()),
            ThreadClass::PageStore,
            seccomp,
            move || worker(&m, &sh),
        )
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
    fn request(&mut self, req: &PvRequest) -> Result<(), RequestError> {
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
                    return Err(RequestError::ReadBeforeInit);
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
                    Err(RequestError::NoSuchPage {
                        index: page,
                        pages: store::PAGES,
                    })
                } else if self.held.pages.contains(&page) {
                    Ok(())
                } else if self.held.pages.len() >= store::MAX_HELD_PAGES {
                    Err(RequestError::TooManyHeld {
                        max: store::MAX_HELD_PAGES,
                    })
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
                Err(source) => Err(RequestError::StatsNotInRam { gpa: a[0], source }),
            },
            kind => Err(RequestError::UnknownKind { kind }),
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

fn check_completion_area(mem: &GuestRam, area: u64) -> Result<(), RequestError> {
    if !area.is_multiple_of(8) {
        Err(RequestError::UnalignedArea { area })
    } else if !in_memory(mem, area, AREA_LEN) {
        Err(RequestError::AreaNotInRam { area, len: AREA_LEN })
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

fn check_read(mem: &GuestRam, r: &Read) -> Result<(), RequestError> {
    if r.index >= store::PAGES {
        Err(RequestError::NoSuchPage {
            index: r.index,
            pages: store::PAGES,
        })
    } else if !r.dest.is_multiple_of(PAGE_SIZE) {
        Err(RequestError::UnalignedFrame { dest: r.dest })
    } else if !in_memory(mem, r.dest, PAGE) {
        Err(RequestError::FrameNotInRam { dest: r.dest })
    } else if slot_gpa(0, r.slot).is_none() {
        Err(RequestError::SlotOutOfRange {
            slot: r.slot,
            slots: store::SLOTS,
        })
    } else if r.id == 0 {
        Err(RequestError::ReservedId)
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
