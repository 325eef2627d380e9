//! The page-fault glue: step 2 of the walk, between the arch trap and the
//! generic fault core. The whole walk:
//!
//! 1. trap: the stubs in `arch/x86_64/entry.rs` save the registers and call
//!    `arch/x86_64/trap.rs`, which turns a #PF from user mode into neutral
//!    fault flags and calls [`page_fault`] here.
//! 2. here: the fast path (a missing page of the demand-zero region the core
//!    served last), else [`page_fault_slow`]: the fault flags (USER_FAULT, plus
//!    TRIED when the task's `RetryTracker` sees the same page again), the
//!    address-space lock and the [`Env`] through which the core maps pages and
//!    queues the task.
//! 3. `mm/core.rs`: `handle_mm_fault` returns `Done`, or `Retry` (the task is
//!    queued and the lock dropped), or `SigBus` / `SigSegv` / `Oom`.
//! 4. the wait, `task/wait.rs`: the env queued the task on the page's wait
//!    queue; `Retry` returns to user mode through the scheduler
//!    (`task/sched.rs`), which runs another task until the page's wake-up (a
//!    pending signal ends the wait early: `task/signal.rs`).
//! 5. the retry: the woken task re-executes the faulting instruction, traps
//!    again and comes back to [`page_fault`] with TRIED. No cap on retries.
//!
//! The other outcomes are handled here too: `SigSegv` kills the task, `SigBus`
//! sends it SIGBUS (delivered on the way out), `Oom` ends the VM. Kernel
//! accesses to user memory (system calls, signal frames) go through the same
//! core with KERNEL_UACCESS flags ([`prepare_user_range`]): there a wait
//! restarts the system call.

use crate::abi::exit::ExitCode;
use crate::abi::layout::{PAGE_SIZE, USER_SPACE_END, USER_SPACE_START};
use crate::abi::syscall::sig;
use crate::arch;
use crate::arch::entry::TrapFrame;
use crate::mm::core::{flags, handle_mm_fault, FaultEnv, PageState, VmFault};
use crate::mm::frame::RunAlloc;
use crate::mm::vma::VmaKind;
use crate::mm::{shared as shared_frames, NoMemory, Perms, USER_RW};
use crate::sync::SpinGuard;
use crate::task::{current, current_tid, kill, task_mut, Task, MM_LOCKS};
use crate::task::{sched, signal, wait};

/// A user page fault (`hw` = present/write/fetch flags from the error code).
pub fn page_fault(frame: &mut TrapFrame, addr: u64, hw: u32) {
    let tid = current_tid();
    let task = task_mut(tid);
    // Fast path (every instruction is emulated): a missing page of the
    // demand-zero region the core served last, a frame left in the batch and
    // the leaf table cached. Exactly what the core would do, minus the lookups.
    if hw & !flags::WRITE == 0 && task.fast.0 <= addr && addr < task.fast.1 && task.retry.page == u64::MAX {
        if let Some(pa) = task.frames.take_cached() {
            if arch::paging::map_4k_if_cached(&task.leaf, addr & !(PAGE_SIZE - 1), pa, task.fast.2) {
                task.faults += 1;
                task.fstats.faults += 1;
                task.fstats.hist[0] += 1;
                sched::return_to_user(frame);
                return;
            }
            task.frames.untake(pa);
        }
    }
    page_fault_slow(task, frame, addr, hw);
}

#[inline(never)]
fn page_fault_slow(task: &mut Task, frame: &mut TrapFrame, addr: u64, hw: u32) {
    let tid = task.tid;
    let f = hw | flags::USER_FAULT | task.retry.begin(addr);
    let outcome = fault(task, addr, f);
    match outcome {
        VmFault::Done | VmFault::Retry => {}
        VmFault::SigSegv => {
            task.retry.end();
            kill(format_args!("segfault at {addr:#x} rip {:#x}", frame.rip))
        }
        VmFault::SigBus => {
            task.retry.end();
            signal::send_signal(tid, sig::SIGBUS);
        }
        VmFault::Oom => out_of_memory(task.cpu, addr),
    }
    sched::return_to_user(frame);
}

/// One pass of the fault core for `task`, with statistics.
fn fault(task: &mut Task, addr: u64, f: u32) -> VmFault {
    task.fstats.faults += 1;
    if f & flags::TRIED != 0 {
        task.fstats.retries += 1;
    }
    let mut env = Env {
        tid: task.tid,
        // Only the task itself changes its tables unless a uffd handler may
        // (a locked instruction costs ~25 us under the CPL0 emulator here).
        guard: task.space.shared_tables.then(|| MM_LOCKS[task.tid].lock()),
        frames: &mut task.frames,
        leaf: &mut task.leaf,
    };
    let outcome = handle_mm_fault(&task.space, addr, f, &mut env);
    drop(env);
    if outcome == VmFault::Done {
        // Remember a writable demand-zero region for the fast path.
        if let Some(v) = task.space.find(addr) {
            if v.kind == VmaKind::AnonZero
                && v.uffd == 0
                && v.perms.write
                && v.perms.user
                && !task.space.shared_tables
            {
                task.fast = (v.start, v.end, v.perms);
            }
        }
        task.faults += 1;
        let retries = task.retry.end();
        let st = &mut task.fstats;
        st.max_retries = st.max_retries.max(retries);
        st.hist[crate::mm::core::retry_bucket(retries)] += 1;
    }
    outcome
}

/// Frames a task takes from the allocator at once for its demand-zero faults.
const FRAME_BATCH: u64 = 16;

/// Maps fresh zero frames and store/shared/userfault pages for the fault core.
struct Env<'a> {
    tid: usize,
    guard: Option<SpinGuard<'static, ()>>,
    frames: &'a mut RunAlloc,
    leaf: &'a mut arch::paging::LeafCache,
}

impl FaultEnv for Env<'_> {
    fn map_zero(&mut self, root: u64, va: u64, perms: Perms) -> Result<(), NoMemory> {
        let pa = self.frames.take(FRAME_BATCH).ok_or(NoMemory)?;
        arch::paging::map_4k_cached(self.leaf, root, va, pa, perms)
    }

    fn map_shared(&mut self, root: u64, va: u64, index: u64, perms: Perms) -> Result<(), NoMemory> {
        let pa = shared_frames::frame(index)?;
        arch::paging::map_4k(root, va, pa, perms)
    }

    fn map_frame(&mut self, root: u64, va: u64, pa: u64, perms: Perms) -> Result<(), NoMemory> {
        arch::paging::map_4k(root, va, pa, perms)
    }

    fn store_page(&mut self, index: u64, f: u32) -> PageState {
        let tid = self.tid;
        crate::mm::store::page(index, || {
            wait::sleep_on(
                tid,
                crate::mm::store::WAIT_KEY,
                f & flags::INTERRUPTIBLE != 0,
                true,
                0,
            );
        })
    }

    fn userfault(&mut self, id: u32, va: u64, f: u32) -> PageState {
        let tid = self.tid;
        crate::uffd::fault(id, va, tid, || {
            wait::sleep_on(
                tid,
                crate::uffd::fault_key(id),
                f & flags::INTERRUPTIBLE != 0,
                true,
                0,
            );
        })
    }

    fn signal_pending(&mut self, f: u32) -> bool {
        signal::fault_signal_pending(self.tid, f)
    }

    fn unlock_mm(&mut self) {
        self.guard = None;
    }
}

/// Forgets the fast-path region (its ranges may now belong to a uffd).
pub fn forget_fast_region(task: &mut Task) {
    task.fast = (0, 0, USER_RW);
}

/// Why a user range could not be made accessible to the kernel.
pub enum UserAccess {
    /// Not valid user memory (or the page can never come): -EFAULT.
    Fault,
    /// The task must wait for a page (queued): restart the system call.
    Restart,
}

/// Makes `[addr, addr + len)` of the current task accessible to the kernel,
/// faulting pages in with KERNEL_UACCESS flags: only a fatal signal ends a
/// wait, and a wait restarts the system call (no busy loop, see
/// docs/guest-kernel.md).
pub fn prepare_user_range(addr: u64, len: u64, write: bool) -> Result<(), UserAccess> {
    let Some(end) = addr.checked_add(len) else {
        return Err(UserAccess::Fault);
    };
    if addr < USER_SPACE_START || end > USER_SPACE_END {
        return Err(UserAccess::Fault);
    }
    let task = current();
    let mut page = addr & !(PAGE_SIZE - 1);
    while page < end {
        if !arch::paging::is_user_mapped(task.space.root, page, write) {
            let w = if write { flags::WRITE } else { 0 };
            let f = flags::KERNEL_UACCESS | w | task.retry.begin(page);
            match fault(task, page, f) {
                VmFault::Done => {}
                VmFault::Retry => return Err(UserAccess::Restart),
                VmFault::SigSegv | VmFault::SigBus => {
                    task.retry.end();
                    return Err(UserAccess::Fault);
                }
                VmFault::Oom => out_of_memory(task.cpu, page),
            }
        }
        page += PAGE_SIZE;
    }
    Ok(())
}

#[cold]
fn out_of_memory(cpu: u32, addr: u64) -> ! {
    kprintln!("guest-kernel: cpu {cpu} out of page frames (fault at {addr:#x})");
    arch::exit_vm(ExitCode::OutOfMemory)
}
