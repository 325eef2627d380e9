//! Decodes a trap and hands it to the generic code: system calls, page faults,
//! the timer, other exceptions.
//!
//! Step 1 of the page-fault walk, after the stubs in `entry.rs` saved the
//! registers: a #PF from user mode becomes neutral fault flags
//! (`paging::fault_flags`) and goes to `mm/fault.rs` (then `mm/core.rs`, the
//! wait in `task/wait.rs`, and the retry back here); a #PF in kernel mode
//! panics. Returning from here resumes the saved frame (iretq), unless the
//! scheduler (`task/sched.rs`) switched to another task.

use super::entry::TrapFrame;
use super::{apic, cpu, paging, syscall};

const PAGE_FAULT: u64 = 14;

fn exception_name(vector: u64) -> &'static str {
    const NAMES: [&str; 21] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "#MF(old)", "#TS", "#NP", "#SS",
        "#GP", "#PF", "reserved", "#MF", "#AC", "#MC", "#XM", "#VE",
    ];
    NAMES.get(vector as usize).copied().unwrap_or("exception")
}

/// Called by `trap_common` with the saved state; returning resumes it (iretq),
/// unless the generic code switched to another task (it then never returns).
/// The hot path, a user page fault, is tested first and kept small: every
/// instruction here is emulated.
pub extern "C" fn trap_handler(frame: &mut TrapFrame) {
    if frame.vector == PAGE_FAULT && frame.is_user_mode() {
        crate::mm::fault::page_fault(frame, cpu::cr2(), paging::fault_flags(frame.error_code));
        return;
    }
    other_trap(frame);
}

#[inline(never)]
fn other_trap(frame: &mut TrapFrame) {
    if syscall::is_syscall(frame) {
        crate::syscalls::dispatch(frame);
        crate::task::sched::return_to_user(frame);
        return;
    }
    if frame.vector == apic::TIMER_VECTOR {
        apic::eoi();
        crate::task::sched::tick(frame);
        return;
    }
    if frame.vector == apic::SPURIOUS_VECTOR {
        return;
    }
    if frame.vector == PAGE_FAULT {
        let addr = cpu::cr2();
        panic!(
            "kernel page fault at {addr:#x}, rip {:#x}, error code {:#x}",
            frame.rip, frame.error_code
        );
    }
    let name = exception_name(frame.vector);
    if frame.is_user_mode() {
        crate::task::kill(format_args!(
            "exception {name} (vector {}), error code {:#x}, rip {:#x}",
            frame.vector, frame.error_code, frame.rip
        ));
    }
    panic!(
        "exception {name} (vector {}) in kernel, error code {:#x}, rip {:#x}, rsp {:#x}",
        frame.vector, frame.error_code, frame.rip, frame.rsp
    );
}
