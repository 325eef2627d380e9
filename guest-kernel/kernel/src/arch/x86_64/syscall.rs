//! The system-call entry: the one place that knows it is `int3`.
//!
//! This project's KVM (PVM) takes over `syscall`, and `int N` gates other than
//! #BP raise #UD there; #BP through a DPL-3 gate is delivered everywhere. #BP is a
//! trap, so the saved RIP is already past the `int3`: returning resumes the task.
//! Never execute `int3` in kernel code: the CPL0 emulator refuses it.

use super::entry::TrapFrame;

/// Vector of the system-call gate (#BP).
pub const ENTRY_VECTOR: usize = 3;
/// DPL of that gate: callable from user mode.
pub const ENTRY_GATE_DPL: u8 = 3;

/// A system call's number and arguments, in neutral form.
#[derive(Debug, Clone, Copy)]
pub struct SyscallArgs {
    pub nr: u64,
    pub args: [u64; 3],
}

/// Whether a trap is a system call.
pub fn is_syscall(frame: &TrapFrame) -> bool {
    frame.vector == ENTRY_VECTOR as u64 && frame.is_user_mode()
}

/// The call in `frame` (RAX = number, RDI/RSI/RDX = arguments).
pub fn args(frame: &TrapFrame) -> SyscallArgs {
    SyscallArgs {
        nr: frame.rax,
        args: [frame.rdi, frame.rsi, frame.rdx],
    }
}

/// Sets the result the task sees in RAX.
pub fn set_result(frame: &mut TrapFrame, value: i64) {
    frame.rax = value as u64;
}

/// Makes the task execute the system call again when it next runs (restart
/// after a wait): the saved RIP goes back over the one-byte `int3`; RAX and the
/// argument registers still hold the call.
pub fn restart(frame: &mut TrapFrame) {
    frame.rip -= 1;
}
