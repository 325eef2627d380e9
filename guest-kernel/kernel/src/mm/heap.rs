//! The kernel heap: a bump allocator over a contiguous run of frames taken at
//! boot. Freeing only reclaims the most recent allocation; the kernel allocates
//! little (task structures, region lists) and keeps it for the VM's lifetime.
//! A real allocator can replace this behind the same GlobalAlloc.

use core::alloc::{GlobalAlloc, Layout};

use crate::sync::SpinLock;

struct Arena {
    next: u64,
    end: u64,
    /// Start of the last allocation, so it can be freed or grown in place.
    last: u64,
}

/// The global allocator.
pub struct BumpHeap(SpinLock<Arena>);

#[global_allocator]
static HEAP: BumpHeap = BumpHeap(SpinLock::new(Arena {
    next: 0,
    end: 0,
    last: 0,
}));

/// Gives the heap `[start, start + len)` (identity-mapped, unused).
pub fn init(start: u64, len: u64) {
    let mut a = HEAP.0.lock();
    *a = Arena {
        next: start,
        end: start + len,
        last: 0,
    };
}

// SAFETY: allocations are disjoint ranges of the arena, aligned as requested;
// the lock serialises CPUs.
unsafe impl GlobalAlloc for BumpHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let mut a = self.0.lock();
        let align = layout.align() as u64;
        let start = (a.next + align - 1) & !(align - 1);
        match start.checked_add(layout.size() as u64) {
            Some(end) if end <= a.end && start != 0 => {
                a.next = end;
                a.last = start;
                start as *mut u8
            }
            _ => core::ptr::null_mut(),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        let mut a = self.0.lock();
        if ptr as u64 == a.last {
            a.next = a.last;
            a.last = 0;
        }
    }
}
