//! x86_64: entry, descriptor tables, paging, port I/O, the system-call entry.

pub mod apic;
pub mod cpu;
pub mod entry;
pub mod gdt;
pub mod idt;
pub mod paging;
pub mod serial;
pub mod syscall;
pub mod trap;

use crate::abi::exit::ExitCode;
use crate::abi::ports::DEBUG_EXIT_PORT;

/// Ends the VM with `code` (debug-exit port), then halts this CPU for good.
pub fn exit_vm(code: ExitCode) -> ! {
    cpu::outl(DEBUG_EXIT_PORT, code as u32);
    cpu::halt_forever()
}

/// Per-CPU setup every CPU does for itself: GDT/TSS (with its kernel stack as
/// RSP0), the shared IDT, EFER/CR4 bits the kernel relies on.
pub fn init_cpu(cpu: u32) {
    cpu::setup_control_registers();
    gdt::init(cpu, entry::kernel_stack_top(cpu));
    idt::load();
    apic::init_cpu();
}

/// Waits for an interrupt with interrupts enabled, then masks them again: the
/// idle loop (the tick arrives on this kernel stack).
pub fn idle_wait() {
    // SAFETY: sti; hlt sleeps until the next interrupt (sti's shadow covers the
    // hlt, so none is lost in between); cli restores the kernel's IF=0.
    unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}

/// Deliberately triple-faults: an empty IDT turns the first exception into a
/// shutdown. Used by the `triple-fault` workload to test the VMM's crash report.
pub fn triple_fault() -> ! {
    idt::load_empty();
    // SAFETY: ud2 raises #UD; with no IDT the CPU shuts down, which is the point.
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}
