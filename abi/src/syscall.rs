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
}

impl TaskArgs {
    /// The task's plan.
    pub fn plan(&self) -> crate::workload::TaskPlan {
        crate::workload::TaskPlan {
            first_page: self.first_page,
            pages: self.pages,
            order_seed: self.order_seed,
        }
    }

    /// The task's page order pattern (anything but `Rand` reads as `Seq`).
    pub fn pattern(&self) -> crate::workload::Pattern {
        use crate::workload::Pattern;
        if self.pattern == Pattern::Rand as u32 {
            Pattern::Rand
        } else {
            Pattern::Seq
        }
    }
}

const _: () = assert!(core::mem::size_of::<TaskArgs>() == 64);

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
