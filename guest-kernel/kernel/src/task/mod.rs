//! Tasks: the [`Task`] (a task's private part), the task table ([`SCHED`]),
//! finding the current task, creating tasks and ending them.
//!
//! Tasks are pinned to a vCPU; each vCPU round-robins its runnable tasks on the
//! timer tick. The kernel is "stackless" per task: a task's whole kernel state
//! while it is not running is its saved user register frame (`ctx`). A task
//! that must wait (page fault on a slow page, `wait`, `uffd_read`, ...) is put
//! on a wait queue and the CPU switches to another task by popping that task's
//! frame; when woken, the task resumes in user mode, at the faulting
//! instruction (it re-faults: the retry, with TRIED) or at its `int3` (the
//! system call restarts). So every kernel path is short, interrupts stay off in
//! the kernel (they are on in user mode and in the idle loop only), and one
//! kernel stack per vCPU suffices.
//!
//! Scheduler state that other CPUs change (state, signals, wait key) lives in
//! [`SCHED`] under one spinlock; the rest of a task ([`Task`]) is only touched
//! by the CPU it is pinned to.
//!
//! The rest of the subsystem, one file per job:
//! - `sched.rs`: run queues, switching, the timer tick, the way back to user
//!   mode;
//! - `wait.rs`: wait queues (sleep, wake-up, timed sleep, wait for a child);
//! - `signal.rs`: sending, masks, delivery to handlers, SIGKILL/SIGSTOP/SIGCONT;
//! - `stats.rs`: the counters reported to the VMM.
//!
//! The page-fault path runs on top of them: arch trap (`arch/x86_64/trap.rs`)
//! -> `mm/fault.rs` -> `mm/core.rs` -> the wait (`wait.rs`, `sched.rs`) -> the
//! retry (the task re-faults with TRIED). It finds the current task here.

pub mod sched;
pub mod signal;
pub mod stats;
pub mod wait;

use alloc::boxed::Box;
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use crate::abi::boot::MAX_VCPUS;
use crate::abi::exit::ExitCode;
use crate::abi::layout::{
    LARGE_PAGE_SIZE, PAGE_SIZE, USER_ANON_BASE, USER_ANON_SIZE, USER_ARGS_ADDR, USER_STACK_SIZE,
    USER_STACK_TOP, USER_STORE_BASE, USER_WORK_BASE,
};
use crate::abi::pv::store::PAGES as STORE_PAGES;
use crate::abi::syscall::{sig, status, TaskArgs};
use crate::abi::workload::task_plan;
use crate::arch;
use crate::arch::entry::TrapFrame;
use crate::loader::{self, LoadError};
use crate::mm::core::RetryTracker;
use crate::mm::frame::{self, RunAlloc};
use crate::mm::vma::{AddressSpace, Vma, VmaKind};
use crate::mm::{shared as shared_frames, NoMemory, Perms, USER_RO, USER_RW};
use crate::sync::SpinLock;
use crate::Shared;

use self::stats::FaultStats;

/// Most tasks over the VM's life (ids are not reused).
pub const MAX_TASKS: usize = 64;
const NONE: usize = usize::MAX;
const CPUS: usize = MAX_VCPUS as usize;

/// A task's private part (touched only by its CPU).
#[derive(Debug)]
pub struct Task {
    pub tid: usize,
    pub cpu: u32,
    pub space: AddressSpace,
    pub args: TaskArgs,
    /// Saved user registers while not running.
    pub ctx: TrapFrame,
    /// Signal handlers (0 default, 1 ignore) and their restorers.
    pub handlers: [u64; 32],
    pub restorers: [u64; 32],
    /// Page faults completed for the task (kernel accesses included).
    pub faults: u64,
    pub retry: RetryTracker,
    pub(crate) fstats: FaultStats,
    /// Fast-path state of the task's own demand-zero faults: a batch of
    /// never-used frames and the last leaf table.
    pub(crate) frames: RunAlloc,
    pub(crate) leaf: arch::paging::LeafCache,
    /// The writable demand-zero region (no uffd) of the last fault the core
    /// resolved: `[start, end)`, perms. A cache of the core's decision.
    pub(crate) fast: (u64, u64, Perms),
    /// Checksum verdict of its SYS_REPORT, if it reported.
    pub checksum_ok: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    Runnable,
    Sleeping,
    Dead,
}

/// What other CPUs may change, under [`SCHED`].
#[derive(Debug, Clone, Copy)]
struct Sched {
    state: State,
    cpu: u32,
    stopped: bool,
    key: u64,
    interruptible: bool,
    fault_wait: bool,
    wake_at: u64,
    pending: u64,
    blocked: u64,
    parent: usize,
    exit: i64,
    /// Counts for the VM's verdict (workload tasks, the test runner).
    top_level: bool,
    /// Must have reported a matching checksum (workload tasks).
    needs_report: bool,
}

const FREE: Sched = Sched {
    state: State::Free,
    cpu: 0,
    stopped: false,
    key: 0,
    interruptible: false,
    fault_wait: false,
    wake_at: 0,
    pending: 0,
    blocked: 0,
    parent: NONE,
    exit: 0,
    top_level: false,
    needs_report: false,
};

struct Table {
    t: [Sched; MAX_TASKS],
    count: usize,
    live_top: u32,
    failed: bool,
}

static SCHED: SpinLock<Table> = SpinLock::new(Table {
    t: [FREE; MAX_TASKS],
    count: 0,
    live_top: 0,
    failed: false,
});
static TASKS: [AtomicPtr<Task>; MAX_TASKS] = [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_TASKS];
/// Each CPU's running task (NONE = idle).
static CURRENT: [AtomicUsize; CPUS] = [const { AtomicUsize::new(NONE) }; CPUS];
/// Per-task address-space locks (page-table changes).
pub(crate) static MM_LOCKS: [SpinLock<()>; MAX_TASKS] = [const { SpinLock::new(()) }; MAX_TASKS];
fn this_cpu() -> usize {
    arch::entry::current_cpu().expect("kernel code on an unknown stack") as usize
}

/// Task `tid`'s private part.
///
/// Only its own CPU calls this (tasks are pinned), and traps on a CPU do not
/// nest except the idle loop's tick, which touches no task: one reference at a time.
pub(crate) fn task_mut(tid: usize) -> &'static mut Task {
    let ptr = TASKS[tid].load(Ordering::Acquire);
    assert!(!ptr.is_null(), "no task {tid}");
    // SAFETY: set once from a leaked Box before the task is runnable; see above.
    unsafe { &mut *ptr }
}

/// The current task's id.
pub fn current_tid() -> usize {
    CURRENT[this_cpu()].load(Ordering::Relaxed)
}

/// This CPU's task.
pub fn current() -> &'static mut Task {
    task_mut(current_tid())
}

/// Why a task could not be created.
#[derive(Debug)]
pub enum CreateError {
    NoMemory,
    Load(#[allow(dead_code)] LoadError),
    BadLayout,
    TooMany,
}

impl From<NoMemory> for CreateError {
    fn from(_: NoMemory) -> Self {
        CreateError::NoMemory
    }
}

/// What a new task runs.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub cpu: u32,
    /// Index among the workload tasks (`task_plan`'s cpu), for role 0.
    pub slot: u32,
    pub slots: u32,
    pub role: u64,
    pub arg: u64,
    pub parent: usize,
    pub top_level: bool,
}

/// Creates a task and makes it runnable on `spec.cpu`; returns its id.
pub fn create(spec: Spec, shared: &Shared) -> Result<usize, CreateError> {
    let tid = {
        let mut s = SCHED.lock();
        if s.count >= MAX_TASKS {
            return Err(CreateError::TooMany);
        }
        s.count += 1;
        s.count - 1
    };
    let cfg = &shared.config;
    let root = arch::paging::new_user_root(shared.kernel_root)?;
    let mut space = AddressSpace::new(root);
    let entry = loader::load(&mut space, shared.module, shared.module_pa).map_err(CreateError::Load)?;

    let workload = spec.role == 0;
    let plan = task_plan(cfg, spec.slots, spec.slot);
    let (first_page, pages) = if workload {
        (plan.first_page, plan.pages)
    } else {
        (0, 0)
    };
    let (pattern, pattern_arg) = cfg.pattern.encode();
    let args = TaskArgs {
        workload: cfg.kind as u32,
        cpu: spec.cpu,
        pattern,
        pattern_arg,
        accesses: plan.accesses,
        rate: crate::abi::workload::share(cfg.rate, spec.slots, spec.slot).1,
        duration_ms: cfg.duration_ms,
        writes: match cfg.writes {
            u64::MAX => u64::MAX,
            w => crate::abi::workload::share(w, spec.slots, spec.slot).1,
        },
        tsc_khz: u64::from(shared.tsc_khz),
        write: u32::from(cfg.write),
        first_page,
        pages,
        seed: cfg.seed,
        work_base: USER_WORK_BASE,
        order_seed: plan.order_seed,
        populate: u32::from(cfg.populate),
        shared: u32::from(cfg.shared),
        role: spec.role,
        arg: spec.arg,
        test: cfg.test.unwrap_or(u64::MAX),
        tid: tid as u64,
    };
    let args_pa = frame::alloc_zeroed().ok_or(NoMemory)?;
    // SAFETY: a fresh identity-mapped frame we own; TaskArgs fits in a page.
    unsafe { core::ptr::write(args_pa as *mut TaskArgs, args) };
    arch::paging::map_4k(root, USER_ARGS_ADDR, args_pa, USER_RO)?;

    let store_end = USER_STORE_BASE + STORE_PAGES * PAGE_SIZE;
    let regions = [
        Vma::new(USER_ARGS_ADDR, USER_ARGS_ADDR + PAGE_SIZE, USER_RO, VmaKind::Args),
        Vma::new(
            USER_STACK_TOP - USER_STACK_SIZE,
            USER_STACK_TOP,
            USER_RW,
            VmaKind::AnonZero,
        ),
        Vma::new(
            USER_STORE_BASE,
            store_end,
            USER_RO,
            VmaKind::Store { first_page: 0 },
        ),
        Vma::new(
            USER_ANON_BASE,
            USER_ANON_BASE + USER_ANON_SIZE,
            USER_RW,
            VmaKind::AnonZero,
        ),
    ];
    for vma in regions {
        space.add(vma).map_err(|_| CreateError::BadLayout)?;
    }
    if pages > 0 {
        let start = USER_WORK_BASE + first_page * PAGE_SIZE;
        let kind = if cfg.shared {
            VmaKind::Shared { first_page }
        } else {
            VmaKind::AnonZero
        };
        space
            .add(Vma::new(start, start + pages * PAGE_SIZE, USER_RW, kind))
            .map_err(|_| CreateError::BadLayout)?;
        if cfg.populate {
            populate(root, start, pages, cfg.shared.then_some(first_page))?;
        }
    }
    let task = Box::new(Task {
        tid,
        cpu: spec.cpu,
        space,
        args,
        ctx: TrapFrame::new_user(entry, USER_STACK_TOP, USER_ARGS_ADDR),
        handlers: [0; 32],
        restorers: [0; 32],
        faults: 0,
        retry: RetryTracker::default(),
        fstats: FaultStats::default(),
        frames: RunAlloc::default(),
        leaf: arch::paging::LeafCache::default(),
        fast: (0, 0, USER_RW),
        checksum_ok: None,
    });
    TASKS[tid].store(Box::into_raw(task), Ordering::Release);
    let mut s = SCHED.lock();
    s.t[tid] = Sched {
        state: State::Runnable,
        cpu: spec.cpu,
        parent: spec.parent,
        top_level: spec.top_level,
        needs_report: workload,
        ..FREE
    };
    Ok(tid)
}

/// Maps all `pages` pages from `start` now (`populate=1`), so the user loop takes
/// no guest fault. Runs at CPL0, where every instruction is emulated: the tables
/// are walked once per 2 MiB block, frames come in contiguous runs and are not
/// touched (never-used frames read as zero). `shared` is the global index of the
/// first page if the region is backed by the shared table.
fn populate(root: u64, start: u64, pages: u64, shared: Option<u64>) -> Result<(), NoMemory> {
    let end = start + pages * PAGE_SIZE;
    let mut run = RunAlloc::default();
    let mut va = start;
    while va < end {
        let block_end = end.min((va | (LARGE_PAGE_SIZE - 1)) + 1);
        let n = (block_end - va) / PAGE_SIZE;
        match shared {
            None => {
                // Runs may span blocks: ask for everything still unmapped.
                let mut left = (end - va) / PAGE_SIZE;
                arch::paging::map_block_runs(root, va, n, USER_RW, |max| {
                    let (pa, count) = run.take_run(max, left).ok_or(NoMemory)?;
                    left -= count;
                    Ok((pa, count))
                })?;
            }
            Some(first_page) => {
                // One lock per block; only the block's missing pages get frames,
                // and a run never outlives the block (other tasks fill the next ones).
                let index = first_page + (va - start) / PAGE_SIZE;
                let mut table = shared_frames::lock();
                arch::paging::map_block(root, va, n, USER_RW, |i| {
                    table.get_or_alloc(index + i, &mut run, n - i)
                })?;
                run.release();
            }
        }
        va = block_end;
    }
    Ok(())
}

/// Sets the number of top-level tasks the VM waits for (boot CPU, before the
/// other CPUs start: a fast CPU must not see itself as the last one).
pub fn expect_top_level(n: u32) {
    SCHED.lock().live_top = n;
}

/// Kills the current task (SIGSEGV, a failure) with a reason.
#[cold]
pub fn kill(reason: core::fmt::Arguments<'_>) -> ! {
    let cpu = current().cpu;
    kprintln!("guest-kernel: cpu {cpu} task killed: {reason}");
    exit_task(status::KILLED | sig::SIGSEGV as i64)
}

/// Ends the current task with exit `code` (SYS_EXIT).
pub fn exit(code: u64) -> ! {
    exit_task(code as i64)
}

/// Ends the current task with `status`: wakes its parent, kills the uffds it
/// handled, and ends the VM when the last top-level task is gone.
pub fn exit_task(st: i64) -> ! {
    let cpu = this_cpu();
    let tid = CURRENT[cpu].load(Ordering::Relaxed);
    let task = task_mut(tid);
    let (top, last, failed) = {
        let mut s = SCHED.lock();
        let needs_report = s.t[tid].needs_report;
        let t = &mut s.t[tid];
        t.state = State::Dead;
        t.exit = st;
        let top = t.top_level;
        let ok = st == 0 && (!needs_report || task.checksum_ok == Some(true));
        if top {
            s.live_top -= 1;
            s.failed |= !ok;
        }
        (top, s.live_top == 0, s.failed)
    };
    wait::wake_all(wait::child_key(tid));
    crate::uffd::task_died(tid);
    if top {
        if st & status::KILLED != 0 {
            kprintln!(
                "guest-kernel: cpu {} task {tid} ended by signal {}",
                task.cpu,
                st & 0xff
            );
        } else {
            kprintln!(
                "guest-kernel: cpu {} task exited with code {st} ({} faults)",
                task.cpu,
                task.faults
            );
        }
    }
    if top && last {
        let stats = stats::guest_stats();
        crate::pv::send_store(
            crate::abi::pv::store::STATS,
            [&stats as *const _ as u64, 0, 0, 0, 0, 0],
        );
        kprintln!(
            "guest-kernel: all tasks done: {}",
            if failed { "FAILURE" } else { "success" }
        );
        arch::exit_vm(if failed {
            ExitCode::Failure
        } else {
            ExitCode::Success
        })
    }
    sched::switch_away(cpu, tid)
}
