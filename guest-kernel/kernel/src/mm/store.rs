//! The slow page store (abi::pv::store), seen from the guest: a page cache of
//! store pages (store index -> frame), reads sent to the VMM's device, which
//! answers later through the completion area, and one wait queue for all
//! store pages (like Linux's hashed page wait queues: a completion wakes every
//! waiter, those whose page is still missing retry and wait again).

use core::sync::atomic::{AtomicU64, Ordering};

use crate::abi::pv::status;
use crate::abi::pv::store::{self, PAGES, SLOTS};
use crate::mm::core::PageState;
use crate::mm::frame;
use crate::sync::SpinLock;

/// Wait-queue key of the store.
pub const WAIT_KEY: u64 = 1;

#[repr(C, align(64))]
struct Completions([AtomicU64; SLOTS]);
/// Written by the VMM (request id per slot).
static COMPLETIONS: Completions = Completions([const { AtomicU64::new(0) }; SLOTS]);

struct Cache {
    /// Per store page: 0 = absent, 1 = being read, else its frame.
    pages: [u64; PAGES as usize],
    /// Per slot: request id (0 = free), page, frame.
    slot_id: [u64; SLOTS],
    slot_page: [u64; SLOTS],
    slot_frame: [u64; SLOTS],
    next_id: u64,
    ok: bool,
}

static CACHE: SpinLock<Cache> = SpinLock::new(Cache {
    pages: [0; PAGES as usize],
    slot_id: [0; SLOTS],
    slot_page: [0; SLOTS],
    slot_frame: [0; SLOTS],
    next_id: 1,
    ok: false,
});
/// Reads outstanding (the tick polls only when non-zero).
static IN_FLIGHT: AtomicU64 = AtomicU64::new(0);
/// Delay the VMM applies per read (`store_delay_us=`).
static DELAY_US: AtomicU64 = AtomicU64::new(0);
/// Reads sent.
pub static READS: AtomicU64 = AtomicU64::new(0);

/// Hands the completion area to the VMM (boot CPU).
pub fn init(delay_us: u64) {
    DELAY_US.store(delay_us, Ordering::Relaxed);
    let area = COMPLETIONS.0.as_ptr() as u64;
    let st = crate::pv::send_store(store::INIT, [area, 0, 0, 0, 0, 0]);
    CACHE.lock().ok = st == status::OK;
}

/// Store page `index`: its frame, or start reading it (once) and queue the
/// task through `sleep` (called with the cache locked, so a completion cannot
/// slip in between the check and the sleep).
pub fn page(index: u64, sleep: impl FnOnce()) -> PageState {
    let mut c = CACHE.lock();
    let Some(&state) = c.pages.get(index as usize) else {
        return PageState::Gone;
    };
    if !c.ok {
        return PageState::Gone;
    }
    match state {
        0 => {
            // No free slot: wait for any completion and try again.
            if let Some(slot) = c.slot_id.iter().position(|&id| id == 0) {
                let Some(f) = frame::alloc() else {
                    return PageState::Gone;
                };
                let id = c.next_id;
                c.next_id += 1;
                c.slot_id[slot] = id;
                c.slot_page[slot] = index;
                c.slot_frame[slot] = f.addr;
                c.pages[index as usize] = 1;
                COMPLETIONS.0[slot].store(0, Ordering::Relaxed);
                IN_FLIGHT.fetch_add(1, Ordering::AcqRel);
                READS.fetch_add(1, Ordering::Relaxed);
                let delay = DELAY_US.load(Ordering::Relaxed);
                if crate::pv::send_store(store::READ, [index, f.addr, slot as u64, id, delay, 0])
                    != status::OK
                {
                    return PageState::Gone;
                }
            }
            sleep();
            PageState::Wait
        }
        1 => {
            sleep();
            PageState::Wait
        }
        pa => PageState::Ready(pa),
    }
}

/// Holds (`on`) or releases store page `index` in the VMM's device
/// (`store::HOLD` / `store::RELEASE`, for the test suite): 0 or EINVAL.
pub fn hold(index: u64, on: bool) -> i64 {
    let kind = if on { store::HOLD } else { store::RELEASE };
    if index >= PAGES || crate::pv::send_store(kind, [index, 0, 0, 0, 0, 0]) != status::OK {
        return crate::abi::syscall::EINVAL;
    }
    0
}

/// Notices completed reads (timer tick, idle loop); wakes the waiters.
pub fn poll() {
    if IN_FLIGHT.load(Ordering::Acquire) == 0 {
        return;
    }
    let mut done = false;
    {
        let mut c = CACHE.lock();
        for slot in 0..SLOTS {
            let id = c.slot_id[slot];
            if id != 0 && COMPLETIONS.0[slot].load(Ordering::Acquire) == id {
                let page = c.slot_page[slot] as usize;
                c.pages[page] = c.slot_frame[slot];
                c.slot_id[slot] = 0;
                IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
                done = true;
            }
        }
    }
    if done {
        crate::task::wait::wake_all(WAIT_KEY);
    }
}
