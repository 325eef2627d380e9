//! The frames behind the `shared=1` touch workload: one table, global page index
//! -> frame, common to all tasks and filled on first use under a lock, so every
//! task maps the same guest-physical frame for the same page (several vCPUs then
//! fault the same host page, which is what the VMM's deduplication is tested on).

use super::frame::{self, RunAlloc};
use super::NoMemory;
use crate::abi::layout::PAGE_SIZE;
use crate::sync::{SpinGuard, SpinLock};

/// `len` entries at `base` (identity-mapped frames); 0 = no frame yet.
pub struct Table {
    base: u64,
    len: u64,
}

static TABLE: SpinLock<Table> = SpinLock::new(Table { base: 0, len: 0 });

/// Sets up the table for `pages` pages (boot CPU, before any task runs).
pub fn init(pages: u64) -> Result<(), NoMemory> {
    let bytes = pages.checked_mul(8).ok_or(NoMemory)?;
    // Never-used frames read as zero: every entry starts as "no frame".
    let base = frame::alloc_contiguous(bytes.div_ceil(PAGE_SIZE)).ok_or(NoMemory)?;
    *TABLE.lock() = Table { base, len: pages };
    Ok(())
}

/// The table, locked.
pub fn lock() -> SpinGuard<'static, Table> {
    TABLE.lock()
}

impl Table {
    /// The frame of page `index`, taken from `run` (asked for up to `want`
    /// frames) if the page has none yet.
    #[inline(always)]
    pub fn get_or_alloc(&mut self, index: u64, run: &mut RunAlloc, want: u64) -> Result<u64, NoMemory> {
        // Tasks map only their work region, which the table covers exactly; an
        // index beyond it would be a kernel bug.
        assert!(
            index < self.len,
            "shared page {index} beyond the table ({})",
            self.len
        );
        // SAFETY: `index < len`, the table's frames are reserved for it at boot
        // and identity-mapped, and the lock (held through `self`) serialises CPUs.
        let entry = unsafe { &mut *(self.base as *mut u64).add(index as usize) };
        if *entry == 0 {
            *entry = run.take(want).ok_or(NoMemory)?;
        }
        Ok(*entry)
    }
}

/// The frame of page `index`, allocated (zeroed) on first use.
pub fn frame(index: u64) -> Result<u64, NoMemory> {
    let mut run = RunAlloc::default();
    lock().get_or_alloc(index, &mut run, 1)
}
