//! The guest's system-call ABI (guest kernel <-> its user programs).
//!
//! Entry: the user task executes `int3` (vector 3, a DPL-3 interrupt gate). This
//! project's KVM (PVM) takes over `syscall`, and `int N` gates other than #BP
//! raise #UD there, while #BP is delivered on every x86 machine; see
//! `docs/boot-protocol.md`. RAX = number, RDI/RSI/RDX = arguments, RAX = result
//! (negative = error). Every other register is preserved.

/// `exit(code)`: ends the task. Does not return.
pub const SYS_EXIT: u64 = 0;
/// `write(ptr, len)`: writes bytes to the console. Returns `len`.
pub const SYS_WRITE: u64 = 1;
/// `report(ptr)`: hands a [`UserReport`] to the kernel, which adds its own
/// figures (faults) and forwards it to the VMM. Returns 0.
pub const SYS_REPORT: u64 = 2;

/// `yield()`: lets the other tasks of this vCPU run. Returns 0. Also the
/// empty system call of the fault benchmark.
pub const SYS_YIELD: u64 = 3;
/// `sleep(ms)`: sleeps (interruptibly) for about `ms` milliseconds (timer ticks).
pub const SYS_SLEEP: u64 = 4;
/// `spawn(role, arg, cpu)`: a new task running this program with `TaskArgs::role`
/// and `arg`, on vCPU `cpu` (`u64::MAX` = this one). Returns its id.
pub const SYS_SPAWN: u64 = 5;
/// `wait(tid)`: waits for a task this one spawned; returns its [`status`].
pub const SYS_WAIT: u64 = 6;
/// `kill(tid, sig)`: sends a signal. Returns 0.
pub const SYS_KILL: u64 = 7;
/// `sigaction(sig, handler, restorer)`: `handler` 0 = default, 1 = ignore, else
/// `extern "C" fn(sig)`, which returns into `restorer` (calls SYS_SIGRETURN).
pub const SYS_SIGACTION: u64 = 8;
/// `sigmask(new)`: sets the blocked mask (bit `sig`); returns the old one.
pub const SYS_SIGMASK: u64 = 9;
/// `sigreturn()`: from the restorer, with RSP where the handler returned.
pub const SYS_SIGRETURN: u64 = 10;
/// `getpid()`: the task id.
pub const SYS_GETPID: u64 = 11;
/// `uffd_register(start, len)`: registers a range of the task's own anonymous
/// memory with a new in-guest userfaultfd; returns its id.
pub const SYS_UFFD_REGISTER: u64 = 12;
/// `uffd_read(id, msg_ptr)`: waits for a fault message ([`UffdMsg`]). Returns 0.
pub const SYS_UFFD_READ: u64 = 13;
/// `uffd_copy(id, addr, src)`: resolves page `addr` with the page at `src`
/// (`src` 0 = a zero page) and wakes the waiters. Returns 0.
pub const SYS_UFFD_COPY: u64 = 14;
/// `stats(ptr)`: copies the kernel's [`GuestStats`](crate::pv::store::GuestStats).
pub const SYS_STATS: u64 = 15;
/// `sum(ptr, len)`: the wrapping sum of the u64 words of a user buffer, read by
/// the kernel (a kernel-mode access to user memory, like copy_from_user).
pub const SYS_SUM: u64 = 16;
/// `store_ctl(op, arg)`: page-store test control ([`store_ctl`]), so tests
/// wait for states instead of racing the store's delay.
pub const SYS_STORE_CTL: u64 = 17;
/// `checkpoint()`: tells the VMM the task is at its checkpoint (PV
/// `CHECKPOINT`). Returns 0 when the VM is a restored copy (go on), 1 when
/// it should wait and ask again.
pub const SYS_CHECKPOINT: u64 = 18;

/// Operations of `SYS_STORE_CTL`.
pub mod store_ctl {
    /// Hold the reads of store page `arg` (`abi::pv::store::HOLD`). Returns 0.
    pub const HOLD: u64 = 0;
    /// Release store page `arg`: its held reads complete now. Returns 0.
    pub const RELEASE: u64 = 1;
    /// Whether task `arg` sleeps in a page-fault wait on the store: 1 or 0.
    pub const WAITING: u64 = 2;
}

/// Signal numbers (Linux's).
pub mod sig {
    /// Bus error: the page cannot be provided (userfaultfd handler died).
    pub const SIGBUS: u64 = 7;
    /// Kill (cannot be caught, blocked or ignored).
    pub const SIGKILL: u64 = 9;
    /// User signal 1.
    pub const SIGUSR1: u64 = 10;
    /// Segmentation fault.
    pub const SIGSEGV: u64 = 11;
    /// User signal 2.
    pub const SIGUSR2: u64 = 12;
    /// Terminate.
    pub const SIGTERM: u64 = 15;
    /// Continue a stopped task.
    pub const SIGCONT: u64 = 18;
    /// Stop (cannot be caught, blocked or ignored).
    pub const SIGSTOP: u64 = 19;
    /// Highest signal number.
    pub const MAX: u64 = 31;
}

/// `wait` results: the exit code, or `KILLED | sig` for a task a signal ended.
pub mod status {
    /// Added to the signal number of a task a signal ended.
    pub const KILLED: i64 = 0x100;
}

/// A userfault message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct UffdMsg {
    /// Page-aligned faulting address (in the registering task's space).
    pub addr: u64,
    /// Id of the faulting task.
    pub tid: u64,
}

/// Error: interrupted.
pub const EINTR: i64 = -4;
/// Error: no such task.
pub const ESRCH: i64 = -3;
/// Error: out of resources.
pub const EAGAIN: i64 = -11;

/// Error: bad argument (pointer outside user space, unknown number, ...).
pub const EINVAL: i64 = -22;
/// Error: bad user address.
pub const EFAULT: i64 = -14;

/// What the kernel gives a user task, in a read-only page at
/// [`USER_ARGS_ADDR`](crate::layout::USER_ARGS_ADDR); RDI points to it at entry,
/// RSP is [`USER_STACK_TOP`](crate::layout::USER_STACK_TOP).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct TaskArgs {
    /// [`crate::workload::WorkloadKind`] as `u32`.
    pub workload: u32,
    /// vCPU the task runs on.
    pub cpu: u32,
    /// [`crate::workload::Pattern`] as `u32`.
    pub pattern: u32,
    /// 1 if the workload writes.
    pub write: u32,
    /// Global index of the task's first page ([`crate::workload::TaskPlan`]).
    pub first_page: u64,
    /// Number of pages the task touches.
    pub pages: u64,
    /// Seed of the values written.
    pub seed: u64,
    /// Virtual address of global page 0 ([`USER_WORK_BASE`](crate::layout::USER_WORK_BASE)).
    pub work_base: u64,
    /// Seed of the task's page order ([`crate::workload::TaskPlan::order_seed`]).
    pub order_seed: u64,
    /// 1 if the kernel mapped the work region before entry (`populate=1`).
    pub populate: u32,
    /// 1 if the work region is backed by frames shared with the other tasks (`shared=1`).
    pub shared: u32,
    /// What the task runs: 0 = the workload; else the `role` given to
    /// [`SYS_SPAWN`] (or [`ROLE_TEST`] for the test runner).
    pub role: u64,
    /// Argument of the role.
    pub arg: u64,
    /// Test selected by `test=` ([`crate::workload::TESTS`] index, `u64::MAX` = all).
    pub test: u64,
    /// Task id.
    pub tid: u64,
    /// Argument of the pattern ([`crate::workload::Pattern::encode`]).
    pub pattern_arg: u64,
    /// Accesses of a sampling pattern.
    pub accesses: u64,
    /// `dirty`: pages per second this task rewrites (0 = as fast as it can).
    pub rate: u64,
    /// `dirty`: how long it rewrites, in milliseconds.
    pub duration_ms: u64,
    /// The TSC frequency in kHz (from the boot information; 0 if unknown).
    pub tsc_khz: u64,
    /// `faas`: how many of the invocation's distinct pages this task
    /// overwrites (`u64::MAX` = all; [`crate::workload::WorkloadConfig::writes`]).
    pub writes: u64,
}

/// `TaskArgs::role` of the in-guest test runner (`test=`).
pub const ROLE_TEST: u64 = 1;
/// `TaskArgs::role` of the fault benchmark (`test=bench-fault`).
pub const ROLE_BENCH: u64 = 2;
/// Roles from here on are chosen by the spawning user program.
pub const ROLE_USER: u64 = 16;

impl TaskArgs {
    /// The task's plan.
    pub fn plan(&self) -> crate::workload::TaskPlan {
        crate::workload::TaskPlan {
            first_page: self.first_page,
            pages: self.pages,
            order_seed: self.order_seed,
            accesses: self.accesses,
        }
    }

    /// The checksum the task must report (`None` if the arguments are invalid).
    pub fn expected_checksum(&self) -> Option<u64> {
        let kind = crate::workload::WorkloadKind::from_raw(self.workload)?;
        let pattern = self.pattern()?;
        Some(crate::workload::task_checksum(
            kind,
            &self.plan(),
            pattern,
            self.write != 0,
            self.seed,
        ))
    }

    /// The task's page order pattern (`None` if the encoding is invalid).
    pub fn pattern(&self) -> Option<crate::workload::Pattern> {
        crate::workload::Pattern::decode(self.pattern, self.pattern_arg)
    }
}

const _: () = assert!(core::mem::size_of::<TaskArgs>() == 144);

/// What a user task reports with [`SYS_REPORT`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct UserReport {
    /// Checksum computed from memory.
    pub checksum: u64,
    /// Pages touched.
    pub pages: u64,
    /// TSC cycles the workload took.
    pub cycles: u64,
}

const _: () = assert!(core::mem::size_of::<UserReport>() == 24);
