//! Physical frame allocator: bump allocation over the Usable regions of the boot
//! memory map, plus a free list of recycled frames.
//!
//! Frames from the bump pointer have never been used, and the VMM guarantees
//! Usable RAM reads as zero, so they are handed out without zeroing (zeroing a
//! page costs ~270 us under the CPL0 emulator). Only recycled frames are zeroed.

use crate::abi::boot::{MemKind, MemRegion, MAX_MEM_REGIONS};
use crate::abi::layout::{FREE_RAM_START, PAGE_SIZE};
use crate::sync::SpinLock;

/// A frame handed out by [`alloc`].
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    /// Physical address (page aligned).
    pub addr: u64,
    /// Known to contain only zeros.
    pub zeroed: bool,
}

struct Allocator {
    /// Usable `[start, end)` ranges, page aligned, at or above FREE_RAM_START.
    ranges: [(u64, u64); MAX_MEM_REGIONS],
    count: usize,
    /// Range the bump pointer is in, and the bump pointer.
    current: usize,
    next: u64,
    /// Head of the free list (0 = empty); each free frame stores the next link.
    free_head: u64,
    /// Frames handed out and not freed.
    used: u64,
}

static FRAMES: SpinLock<Allocator> = SpinLock::new(Allocator {
    ranges: [(0, 0); MAX_MEM_REGIONS],
    count: 0,
    current: 0,
    next: 0,
    free_head: 0,
    used: 0,
});

/// Takes the Usable regions of the memory map. Returns the number of free bytes.
pub fn init(regions: &[MemRegion]) -> u64 {
    let mut a = FRAMES.lock();
    let mut total = 0;
    for r in regions.iter().filter(|r| r.kind == MemKind::Usable as u32) {
        let start = r.start.max(FREE_RAM_START).next_multiple_of(PAGE_SIZE);
        let end = r.start.saturating_add(r.len) & !(PAGE_SIZE - 1);
        if start < end && a.count < MAX_MEM_REGIONS {
            let n = a.count;
            a.ranges[n] = (start, end);
            a.count += 1;
            total += end - start;
        }
    }
    a.current = 0;
    a.next = a.ranges[0].0;
    total
}

impl Allocator {
    /// `n` contiguous never-used frames from the bump pointer.
    fn bump(&mut self, n: u64) -> Option<u64> {
        let bytes = n.checked_mul(PAGE_SIZE)?;
        while self.current < self.count {
            let (_, end) = self.ranges[self.current];
            if end - self.next >= bytes {
                let addr = self.next;
                self.next += bytes;
                self.used += n;
                return Some(addr);
            }
            self.current += 1;
            if self.current < self.count {
                self.next = self.ranges[self.current].0;
            }
        }
        None
    }
}

/// One frame, recycled if possible.
pub fn alloc() -> Option<Frame> {
    let mut a = FRAMES.lock();
    if a.free_head != 0 {
        let addr = a.free_head;
        // SAFETY: a frame on the free list is owned by the allocator and
        // identity-mapped; its first word is the link.
        a.free_head = unsafe { core::ptr::read(addr as *const u64) };
        a.used += 1;
        return Some(Frame { addr, zeroed: false });
    }
    a.bump(1).map(|addr| Frame { addr, zeroed: true })
}

/// One zero-filled frame.
pub fn alloc_zeroed() -> Option<u64> {
    let f = alloc()?;
    if !f.zeroed {
        // SAFETY: the frame was just handed to us.
        unsafe { crate::arch::cpu::zero_page(f.addr) };
    }
    Some(f.addr)
}

/// Up to `max` (at least 1) physically contiguous zero frames: `(first, count)`.
/// Never-used frames first (known zero, left untouched); else one recycled,
/// zeroed frame.
pub fn alloc_run(max: u64) -> Option<(u64, u64)> {
    {
        let mut a = FRAMES.lock();
        while a.current < a.count {
            let (_, end) = a.ranges[a.current];
            let n = ((end - a.next) / PAGE_SIZE).min(max.max(1));
            if n > 0 {
                let addr = a.next;
                a.next += n * PAGE_SIZE;
                a.used += n;
                return Some((addr, n));
            }
            a.current += 1;
            if a.current < a.count {
                a.next = a.ranges[a.current].0;
            }
        }
    }
    alloc_zeroed().map(|pa| (pa, 1))
}

/// Hands out zero frames from contiguous runs: one allocator call (and lock)
/// per run instead of per frame, for populating many pages at once.
#[derive(Debug, Default)]
pub struct RunAlloc {
    next: u64,
    left: u64,
}

impl RunAlloc {
    /// One frame; `want` (at least 1) is how many more the caller may still need,
    /// the size of the run taken when this one is used up.
    #[inline(always)]
    pub fn take(&mut self, want: u64) -> Option<u64> {
        if self.left == 0 {
            let (pa, n) = alloc_run(want)?;
            self.next = pa;
            self.left = n;
        }
        let pa = self.next;
        self.next += PAGE_SIZE;
        self.left -= 1;
        Some(pa)
    }

    /// A frame of the current run, if any is left (no allocator call).
    #[inline(always)]
    pub fn take_cached(&mut self) -> Option<u64> {
        if self.left == 0 {
            return None;
        }
        let pa = self.next;
        self.next += PAGE_SIZE;
        self.left -= 1;
        Some(pa)
    }

    /// Gives back the frame [`RunAlloc::take_cached`] just returned.
    #[inline(always)]
    pub fn untake(&mut self, pa: u64) {
        self.next = pa;
        self.left += 1;
    }

    /// Up to `max` (at least 1) contiguous frames `(first, count)` at once; `want`
    /// as in [`RunAlloc::take`].
    pub fn take_run(&mut self, max: u64, want: u64) -> Option<(u64, u64)> {
        if self.left == 0 {
            let (pa, n) = alloc_run(want)?;
            self.next = pa;
            self.left = n;
        }
        let count = self.left.min(max.max(1));
        let pa = self.next;
        self.next += count * PAGE_SIZE;
        self.left -= count;
        Some((pa, count))
    }

    /// Gives the frames not taken back to the allocator.
    pub fn release(&mut self) {
        while self.left > 0 {
            // SAFETY: taken from the allocator by this run, never handed out.
            unsafe { free(self.next) };
            self.next += PAGE_SIZE;
            self.left -= 1;
        }
    }
}

/// `n` physically contiguous zero frames (never recycled ones), e.g. for the heap.
pub fn alloc_contiguous(n: u64) -> Option<u64> {
    FRAMES.lock().bump(n)
}

/// Returns a frame to the free list.
///
/// # Safety
/// `addr` must come from this allocator and no longer be mapped or referenced.
pub unsafe fn free(addr: u64) {
    let mut a = FRAMES.lock();
    // SAFETY: the caller gives the frame back; we own it now.
    unsafe { core::ptr::write(addr as *mut u64, a.free_head) };
    a.free_head = addr;
    a.used -= 1;
}

/// Frames in use.
#[allow(dead_code)]
pub fn used() -> u64 {
    FRAMES.lock().used
}
