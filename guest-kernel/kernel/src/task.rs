//! User tasks. This version runs exactly one task per CPU, to completion, with
//! interrupts off; the task lives in a per-CPU "current" slot so a scheduler can
//! later keep several per CPU and switch between them.

use alloc::boxed::Box;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, Ordering};

use crate::abi::boot::MAX_VCPUS;
use crate::abi::exit::ExitCode;
use crate::abi::layout::{PAGE_SIZE, USER_ARGS_ADDR, USER_STACK_SIZE, USER_STACK_TOP, USER_WORK_BASE};
use crate::abi::syscall::TaskArgs;
use crate::abi::workload::{share, Pattern};
use crate::arch;
use crate::loader::{self, LoadError};
use crate::mm::fault::{self, FaultFlags, FaultMapper, FaultOutcome};
use crate::mm::vma::{AddressSpace, Vma, VmaKind};
use crate::mm::{frame, NoMemory, Perms};
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

    let (first_page, pages) = match cfg.kind {
        crate::abi::workload::WorkloadKind::Touch => share(cfg.pages, shared.cpu_count, cpu),
        _ => (0, 0),
    };
    let args = TaskArgs {
        workload: cfg.kind as u32,
        cpu,
        pattern: cfg.pattern as u32,
        write: u32::from(cfg.write),
        first_page,
        pages,
        seed: cfg.seed,
        work_base: USER_WORK_BASE,
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
        let vma = Vma { start, end: start + pages * PAGE_SIZE, perms: USER_RW, kind: VmaKind::AnonZero };
        space.add(vma).map_err(|_| CreateError::BadLayout)?;
    }
    Ok(Box::new(Task { cpu, space, args, entry, faults: 0, checksum_ok: None }))
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

/// The pattern of a task's arguments.
pub fn pattern(args: &TaskArgs) -> Pattern {
    if args.pattern == Pattern::Rand as u32 { Pattern::Rand } else { Pattern::Seq }
}
