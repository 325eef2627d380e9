//! Statistics of the guest kernel, reported to the VMM
//! (`abi::pv::store::GuestStats`, SYS_STATS and the end of the run).
//!
//! Global event counters live here. The per-fault figures ([`FaultStats`]) are
//! counted per task by the fault path (`mm/fault.rs`: no shared cache line, no
//! locked instruction there) and summed when asked.

use core::sync::atomic::{AtomicU64, Ordering};

use super::TASKS;

/// Fault waits ended by a signal (`signal.rs`).
pub static SIGNAL_INTERRUPTIONS: AtomicU64 = AtomicU64::new(0);
/// Messages queued on in-guest userfaultfds (`uffd.rs`).
pub static USERFAULTS: AtomicU64 = AtomicU64::new(0);
/// Timer ticks on all CPUs (`sched.rs`).
pub static TICKS: AtomicU64 = AtomicU64::new(0);
/// Task switches (`sched.rs`).
pub static SWITCHES: AtomicU64 = AtomicU64::new(0);

/// The statistics as the ABI struct.
pub fn guest_stats() -> crate::abi::pv::store::GuestStats {
    let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut f = FaultStats::default();
    for slot in &TASKS {
        let ptr = slot.load(Ordering::Acquire);
        if ptr.is_null() {
            continue;
        }
        // SAFETY: tasks are never freed; the counters are plain words another
        // CPU may be updating (a slightly stale sum is fine).
        let t = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ptr).fstats)) };
        f.faults += t.faults;
        f.retries += t.retries;
        f.max_retries = f.max_retries.max(t.max_retries);
        for (a, b) in f.hist.iter_mut().zip(t.hist) {
            *a += b;
        }
    }
    crate::abi::pv::store::GuestStats {
        faults: f.faults,
        retries: f.retries,
        max_retries: f.max_retries,
        retry_hist: f.hist,
        signal_interruptions: r(&SIGNAL_INTERRUPTIONS),
        userfaults: r(&USERFAULTS),
        store_reads: r(&crate::mm::store::READS),
        ticks: r(&TICKS),
        switches: r(&SWITCHES),
    }
}

/// Fault figures of one task.
#[derive(Debug, Clone, Copy, Default)]
pub struct FaultStats {
    pub(crate) faults: u64,
    pub(crate) retries: u64,
    pub(crate) max_retries: u64,
    pub(crate) hist: [u64; 8],
}
