//! The generic fault core, Linux style: regions (VMAs) of an address space and
//! `handle_mm_fault`, which returns a typed outcome ([`VmFault`]) under fault
//! flags ([`flags`]). No architecture, no kernel globals: everything it needs
//! comes through [`FaultEnv`], so the host test suite compiles this very file
//! (tests/tests/guest_suite.rs, `#[path]`) and unit-tests it.
//!
//! Step 3 of the page-fault walk: called by the fault glue (`mm/fault.rs`,
//! after the arch trap), which turns the outcome into what the task sees. A
//! fault that must wait (slow page store, userfaultfd) asks the env to queue
//! the task on a wait queue (`task/wait.rs`), drops the address-space lock and
//! returns [`VmFault::Retry`]; the task then sleeps (the scheduler runs
//! another) and, once it runs again, re-executes the access, which faults
//! again and retries with [`flags::TRIED`]. There is no cap on the number of
//! retries. With a signal pending that the flags let interrupt the wait
//! (INTERRUPTIBLE: any unblocked signal; KILLABLE: a fatal one), the fault
//! returns Retry without waiting (Linux's `fault_signal_pending`): the signal
//! is handled and the access re-executed.

use alloc::vec::Vec;

/// Page size.
pub const PAGE: u64 = 4096;

/// Fault flags (Linux's FAULT_FLAG_*) plus what the hardware reported.
pub mod flags {
    /// The fault may drop the lock, wait and return `Retry`.
    pub const ALLOW_RETRY: u32 = 1 << 0;
    /// A fatal signal ends the wait.
    pub const KILLABLE: u32 = 1 << 1;
    /// Any unblocked signal ends the wait (faults from user mode).
    pub const INTERRUPTIBLE: u32 = 1 << 2;
    /// This is a retry of a fault that returned `Retry`.
    pub const TRIED: u32 = 1 << 3;
    /// The access came from user mode.
    pub const USER: u32 = 1 << 4;
    /// The access was a write.
    pub const WRITE: u32 = 1 << 5;
    /// The access was an instruction fetch.
    pub const INSTRUCTION: u32 = 1 << 6;
    /// The page was present: a protection violation.
    pub const PRESENT: u32 = 1 << 7;
    /// Flags of a fault from user mode.
    pub const USER_FAULT: u32 = ALLOW_RETRY | KILLABLE | INTERRUPTIBLE | USER;
    /// Flags of a kernel access to user memory (copy from/to user in a system
    /// call): only a fatal signal ends the wait (see docs/guest-kernel.md).
    pub const KERNEL_UACCESS: u32 = ALLOW_RETRY | KILLABLE;
}

/// How a fault ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmFault {
    /// The page is mapped: re-execute the access.
    Done,
    /// Not yet: the lock was dropped and the task queued to wait (or a signal
    /// is pending). Retry the access with TRIED after sleeping / the signal.
    Retry,
    /// The page can never be provided (userfaultfd handler gone).
    SigBus,
    /// Invalid access.
    SigSegv,
    /// No frame left.
    Oom,
}

/// No page frame left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoMemory;

/// Access rights of a mapping, in neutral form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms {
    pub write: bool,
    pub exec: bool,
    pub user: bool,
}

/// What backs a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmaKind {
    /// Demand-zero anonymous memory.
    AnonZero,
    /// The `shared=1` work area: global page `first_page + (va - start) / 4K`.
    Shared { first_page: u64 },
    /// A segment of the user program, mapped eagerly.
    Image,
    /// The task's argument page, mapped eagerly.
    Args,
    /// The slow page store: store page `first_page + (va - start) / 4K`.
    Store { first_page: u64 },
}

/// One region `[start, end)`, page aligned.
#[derive(Debug, Clone, Copy)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub perms: Perms,
    pub kind: VmaKind,
    /// In-guest userfaultfd the region is registered with (0 = none).
    pub uffd: u32,
}

impl Vma {
    /// A region without userfaultfd.
    pub const fn new(start: u64, end: u64, perms: Perms, kind: VmaKind) -> Vma {
        Vma {
            start,
            end,
            perms,
            kind,
            uffd: 0,
        }
    }
}

/// Why a region cannot be added or registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmaError {
    /// Empty or unaligned range.
    BadRange,
    /// Overlaps an existing region.
    Overlap,
    /// Not (entirely) anonymous memory of one region.
    NotAnon,
}

/// A user address space.
#[derive(Debug)]
pub struct AddressSpace {
    /// Architecture page-table root (physical address).
    pub root: u64,
    vmas: Vec<Vma>,
    /// Some range is registered with a userfaultfd: another task (its handler)
    /// may then change these page tables, so faults must take the lock.
    pub shared_tables: bool,
}

impl AddressSpace {
    /// An empty space with page-table root `root`.
    pub fn new(root: u64) -> Self {
        AddressSpace {
            root,
            vmas: Vec::new(),
            shared_tables: false,
        }
    }

    /// Adds a region.
    pub fn add(&mut self, vma: Vma) -> Result<(), VmaError> {
        if vma.start >= vma.end || vma.start % PAGE != 0 || vma.end % PAGE != 0 {
            return Err(VmaError::BadRange);
        }
        if self.vmas.iter().any(|v| v.start < vma.end && vma.start < v.end) {
            return Err(VmaError::Overlap);
        }
        self.vmas.push(vma);
        Ok(())
    }

    /// The region containing `addr`. Newest first: the regions added last (the
    /// work area) take most faults.
    pub fn find(&self, addr: u64) -> Option<&Vma> {
        self.vmas.iter().rev().find(|v| v.start <= addr && addr < v.end)
    }

    /// Registers `[start, end)`, inside one anonymous region, with userfaultfd
    /// `id`, splitting the region around it.
    pub fn register_uffd(&mut self, start: u64, end: u64, id: u32) -> Result<(), VmaError> {
        if start >= end || start % PAGE != 0 || end % PAGE != 0 {
            return Err(VmaError::BadRange);
        }
        let i = self
            .vmas
            .iter()
            .position(|v| v.start <= start && end <= v.end && v.kind == VmaKind::AnonZero && v.uffd == 0)
            .ok_or(VmaError::NotAnon)?;
        let v = self.vmas.remove(i);
        self.shared_tables = true;
        for (s, e, u) in [(v.start, start, 0), (start, end, id), (end, v.end, 0)] {
            if s < e {
                self.vmas.push(Vma {
                    start: s,
                    end: e,
                    uffd: u,
                    ..v
                });
            }
        }
        Ok(())
    }
}

/// Whether a page is available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// Here is its frame.
    Ready(u64),
    /// Not yet: the env queued the task on the page's wait queue.
    Wait,
    /// Never: whoever had to provide it is gone.
    Gone,
}

/// What the fault core needs from the kernel.
pub trait FaultEnv {
    /// Maps a zero-filled frame at `va`.
    fn map_zero(&mut self, root: u64, va: u64, perms: Perms) -> Result<(), NoMemory>;
    /// Maps the shared frame of global page `index` at `va`.
    fn map_shared(&mut self, root: u64, va: u64, index: u64, perms: Perms) -> Result<(), NoMemory>;
    /// Maps frame `pa` at `va`.
    fn map_frame(&mut self, root: u64, va: u64, pa: u64, perms: Perms) -> Result<(), NoMemory>;
    /// Store page `index`: its frame, or fetch it (once) and queue the task.
    fn store_page(&mut self, index: u64, flags: u32) -> PageState;
    /// A userfault at `va` for userfaultfd `id`: the frame the handler already
    /// provided, or queue a message (once per page) and the task.
    fn userfault(&mut self, id: u32, va: u64, flags: u32) -> PageState;
    /// Whether a signal is pending that ends a wait under `flags`.
    fn signal_pending(&mut self, flags: u32) -> bool;
    /// Drops the address-space lock (before the task sleeps).
    fn unlock_mm(&mut self);
}

/// Handles a fault at `addr` of `space` (whose lock the caller holds; it is
/// dropped through the env before a `Retry`).
pub fn handle_mm_fault(space: &AddressSpace, addr: u64, flags: u32, env: &mut impl FaultEnv) -> VmFault {
    let Some(vma) = space.find(addr) else {
        return VmFault::SigSegv;
    };
    let p = vma.perms;
    let allowed = (flags & flags::WRITE == 0 || p.write)
        && (flags & flags::INSTRUCTION == 0 || p.exec)
        && (flags & flags::USER == 0 || p.user);
    // A present page faults only on a protection violation (no copy-on-write).
    if flags & flags::PRESENT != 0 || !allowed {
        return VmFault::SigSegv;
    }
    let page = addr & !(PAGE - 1);
    let index = (page - vma.start) / PAGE;
    let mapped = if vma.uffd != 0 {
        match wait_for(env, flags, |env| env.userfault(vma.uffd, page, flags)) {
            Ok(pa) => env.map_frame(space.root, page, pa, p),
            Err(outcome) => return outcome,
        }
    } else {
        match vma.kind {
            VmaKind::AnonZero => env.map_zero(space.root, page, p),
            VmaKind::Shared { first_page } => env.map_shared(space.root, page, first_page + index, p),
            VmaKind::Store { first_page } => {
                match wait_for(env, flags, |env| env.store_page(first_page + index, flags)) {
                    Ok(pa) => env.map_frame(space.root, page, pa, p),
                    Err(outcome) => return outcome,
                }
            }
            // Mapped eagerly: a missing page there is not ours to fill.
            VmaKind::Image | VmaKind::Args => return VmFault::SigSegv,
        }
    };
    match mapped {
        Ok(()) => VmFault::Done,
        Err(NoMemory) => VmFault::Oom,
    }
}

/// The frame `get` provides, or the outcome to return: a pending signal or a
/// needed wait gives `Retry` (lock dropped), a gone source `SigBus`.
fn wait_for<E: FaultEnv>(
    env: &mut E,
    flags: u32,
    get: impl FnOnce(&mut E) -> PageState,
) -> Result<u64, VmFault> {
    if flags & flags::ALLOW_RETRY == 0 {
        // This kernel never waits with the lock held.
        return Err(VmFault::SigBus);
    }
    if env.signal_pending(flags) {
        env.unlock_mm();
        return Err(VmFault::Retry);
    }
    match get(env) {
        PageState::Ready(pa) => Ok(pa),
        PageState::Wait => {
            env.unlock_mm();
            Err(VmFault::Retry)
        }
        PageState::Gone => Err(VmFault::SigBus),
    }
}

/// Histogram bucket of a retry count (the buckets the VMM reports, defined in
/// the ABI).
pub const fn retry_bucket(retries: u64) -> usize {
    crate::abi::pv::store::hist_bucket(retries)
}

/// Per-fault retry bookkeeping of one task: the fault glue (`mm/fault.rs`) calls
/// [`RetryTracker::begin`] on every fault and [`RetryTracker::end`] when it
/// completes, and gets the flags (TRIED) and the retry count.
#[derive(Debug, Clone, Copy)]
pub struct RetryTracker {
    /// Page of the fault in progress (`u64::MAX` = none).
    pub page: u64,
    /// Retries of it so far.
    pub retries: u64,
}

impl Default for RetryTracker {
    fn default() -> Self {
        RetryTracker {
            page: u64::MAX,
            retries: 0,
        }
    }
}

impl RetryTracker {
    /// A fault at `addr`: TRIED if it retries the fault in progress.
    pub fn begin(&mut self, addr: u64) -> u32 {
        let page = addr & !(PAGE - 1);
        if page == self.page {
            self.retries += 1;
            flags::TRIED
        } else {
            self.page = page;
            self.retries = 0;
            0
        }
    }

    /// The fault completed (or failed for good): its retry count.
    pub fn end(&mut self) -> u64 {
        self.page = u64::MAX;
        core::mem::take(&mut self.retries)
    }
}
