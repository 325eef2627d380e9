//! User tasks. This version runs exactly one task per CPU, to completion, with
//! interrupts off; the task lives in a per-CPU "current" slot so a scheduler can
//! later keep several per CPU and switch between them.

use alloc::boxed::Box;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, Ordering};

use crate::abi::boot::MAX_VCPUS;
use crate::abi::exit::ExitCode;
use crate::abi::layout::{
    LARGE_PAGE_SIZE, PAGE_SIZE, USER_ARGS_ADDR, USER_STACK_SIZE, USER_STACK_TOP, USER_WORK_BASE,
};
use crate::abi::syscall::TaskArgs;
use crate::abi::workload::task_plan;
use crate::arch;
use crate::loader::{self, LoadError};
use crate::mm::fault::{self, FaultFlags, FaultMapper, FaultOutcome};
use crate::mm::vma::{AddressSpace, Vma, VmaKind};
use crate::mm::frame::{self, RunAlloc};
use crate::mm::{shared as shared_frames, NoMemory, Perms};
use crate::Shared;

/// A user task.
#[derive(Debug)]
pub struct Task {
    pub cpu: u32,
    pub space: AddressSpace,
    pub args: TaskArgs,
    pub entry: u64,
    /// Page faults handled for the task (including ones the kernel took on its
    /// behalf while reading system-call arguments).
    pub faults: u64,
    /// Checksum verdict of its SYS_REPORT, if it reported.
    pub checksum_ok: Option<bool>,
}

/// Each CPU's running task (null before it has one).
static CURRENT: [AtomicPtr<Task>; MAX_VCPUS as usize] = [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_VCPUS as usize];
/// Tasks not finished yet (set by the boot CPU before starting the others).
pub static RUNNING: AtomicU32 = AtomicU32::new(0);
/// Whether any task failed.
static FAILED: AtomicBool = AtomicBool::new(false);

/// Maps fresh zero frames for the fault handler.
struct FrameMapper;

impl FaultMapper for FrameMapper {
    fn map_zero_page(&mut self, root: u64, va: u64, perms: Perms) -> Result<(), NoMemory> {
        let pa = frame::alloc_zeroed().ok_or(NoMemory)?;
        arch::paging::map_4k(root, va, pa, perms)
    }

    fn map_shared_page(&mut self, root: u64, va: u64, index: u64, perms: Perms) -> Result<(), NoMemory> {
        let pa = shared_frames::frame(index)?;
        arch::paging::map_4k(root, va, pa, perms)
    }
}

/// Why a task could not be created.
#[derive(Debug)]
pub enum CreateError {
    NoMemory,
    Load(#[allow(dead_code)] LoadError),
    BadLayout,
}

impl From<NoMemory> for CreateError {
    fn from(_: NoMemory) -> Self {
        CreateError::NoMemory
    }
}

const USER_RW: Perms = Perms { write: true, exec: false, user: true };
const USER_RO: Perms = Perms { write: false, exec: false, user: true };

/// Builds `cpu`'s task: the program, its argument page, stack and work regions.
pub fn create(cpu: u32, shared: &Shared) -> Result<Box<Task>, CreateError> {
    let cfg = &shared.config;
    let root = arch::paging::new_user_root(shared.kernel_root)?;
    let mut space = AddressSpace::new(root);
    let entry = loader::load(&mut space, shared.module, shared.module_pa).map_err(CreateError::Load)?;

    let plan = task_plan(cfg, shared.cpu_count, cpu);
    let (first_page, pages) = (plan.first_page, plan.pages);
    let args = TaskArgs {
        workload: cfg.kind as u32,
        cpu,
        pattern: cfg.pattern as u32,
        write: u32::from(cfg.write),
        first_page,
        pages,
        seed: cfg.seed,
        work_base: USER_WORK_BASE,
        order_seed: plan.order_seed,
        populate: u32::from(cfg.populate),
        shared: u32::from(cfg.shared),
    };
    let args_pa = frame::alloc_zeroed().ok_or(NoMemory)?;
    // SAFETY: a fresh identity-mapped frame we own; TaskArgs fits in a page.
    unsafe { core::ptr::write(args_pa as *mut TaskArgs, args) };
    arch::paging::map_4k(root, USER_ARGS_ADDR, args_pa, USER_RO)?;

    let regions = [
        Vma { start: USER_ARGS_ADDR, end: USER_ARGS_ADDR + PAGE_SIZE, perms: USER_RO, kind: VmaKind::Args },
        Vma { start: USER_STACK_TOP - USER_STACK_SIZE, end: USER_STACK_TOP, perms: USER_RW, kind: VmaKind::AnonZero },
    ];
    for vma in regions {
        space.add(vma).map_err(|_| CreateError::BadLayout)?;
    }
    if pages > 0 {
        let start = USER_WORK_BASE + first_page * PAGE_SIZE;
        let kind = if cfg.shared { VmaKind::Shared { first_page } } else { VmaKind::AnonZero };
        let vma = Vma { start, end: start + pages * PAGE_SIZE, perms: USER_RW, kind };
        space.add(vma).map_err(|_| CreateError::BadLayout)?;
        if cfg.populate {
            populate(root, start, pages, cfg.shared.then_some(first_page))?;
        }
    }
    Ok(Box::new(Task { cpu, space, args, entry, faults: 0, checksum_ok: None }))
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
                arch::paging::map_block(root, va, n, USER_RW, |i| table.get_or_alloc(index + i, &mut run, n - i))?;
                run.release();
            }
        }
        va = block_end;
    }
    Ok(())
}

/// Makes `task` this CPU's current task and enters it. Never returns.
pub fn run(task: Box<Task>) -> ! {
    let cpu = task.cpu as usize;
    let (root, entry) = (task.space.root, task.entry);
    CURRENT[cpu].store(Box::into_raw(task), Ordering::Relaxed);
    // SAFETY: the root comes from new_user_root, which shares the kernel map.
    unsafe { arch::paging::switch_to(root) };
    arch::entry::enter_user(entry, USER_STACK_TOP, USER_ARGS_ADDR)
}

/// This CPU's task. Traps do not nest (interrupts are off; a kernel fault
/// panics), so only one reference exists at a time.
pub fn current() -> &'static mut Task {
    let cpu = arch::entry::current_cpu().expect("trap on an unknown stack");
    let ptr = CURRENT[cpu as usize].load(Ordering::Relaxed);
    assert!(!ptr.is_null(), "trap from user mode with no current task");
    // SAFETY: set by `run` from a leaked Box, used only by this CPU, and traps do
    // not nest, so this is the only live reference.
    unsafe { &mut *ptr }
}

/// A user page fault; returns only if the access can be retried.
pub fn page_fault(addr: u64, flags: FaultFlags, rip: u64) {
    let task = current();
    match fault::handle(&task.space, addr, flags, &mut FrameMapper) {
        FaultOutcome::Mapped => task.faults += 1,
        FaultOutcome::SigSegv => kill(format_args!("segfault at {addr:#x} rip {rip:#x}")),
        FaultOutcome::Oom => out_of_memory(task.cpu, addr),
    }
}

/// Makes `[addr, addr + len)` of the current task readable by the kernel
/// (faulting in demand-zero pages), for system-call arguments. `false` if the
/// range is not valid user memory.
pub fn prepare_user_range(addr: u64, len: u64, write: bool) -> bool {
    use crate::abi::layout::{USER_SPACE_END, USER_SPACE_START};
    let Some(end) = addr.checked_add(len) else { return false };
    if addr < USER_SPACE_START || end > USER_SPACE_END {
        return false;
    }
    let task = current();
    let mut page = addr & !(PAGE_SIZE - 1);
    while page < end {
        if !arch::paging::is_user_mapped(task.space.root, page, write) {
            let flags = FaultFlags { present: false, write, user: true, instruction: false };
            match fault::handle(&task.space, page, flags, &mut FrameMapper) {
                FaultOutcome::Mapped => task.faults += 1,
                FaultOutcome::SigSegv => return false,
                FaultOutcome::Oom => out_of_memory(task.cpu, page),
            }
        }
        page += PAGE_SIZE;
    }
    true
}

#[cold]
fn out_of_memory(cpu: u32, addr: u64) -> ! {
    kprintln!("guest-kernel: cpu {cpu} out of page frames (fault at {addr:#x})");
    arch::exit_vm(ExitCode::OutOfMemory)
}

/// Kills the current task (a failure) with a reason.
#[cold]
pub fn kill(reason: core::fmt::Arguments<'_>) -> ! {
    let cpu = current().cpu;
    kprintln!("guest-kernel: cpu {cpu} task killed: {reason}");
    finish(false)
}

/// Ends the current task with exit `code`.
pub fn exit(code: u64) -> ! {
    let task = current();
    let ok = code == 0 && task.checksum_ok == Some(true);
    kprintln!("guest-kernel: cpu {} task exited with code {code} ({} faults)", task.cpu, task.faults);
    finish(ok)
}

/// This CPU is done. The last CPU to finish ends the VM with the verdict; the
/// others halt for good.
fn finish(success: bool) -> ! {
    if !success {
        FAILED.store(true, Ordering::SeqCst);
    }
    if RUNNING.fetch_sub(1, Ordering::AcqRel) == 1 {
        let failed = FAILED.load(Ordering::SeqCst);
        kprintln!("guest-kernel: all tasks done: {}", if failed { "FAILURE" } else { "success" });
        arch::exit_vm(if failed { ExitCode::Failure } else { ExitCode::Success })
    }
    arch::cpu::halt_forever()
}
