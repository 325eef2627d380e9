//! Assembly entry points: `_start`, the exception/interrupt stubs and the
//! return to user mode. Also the per-CPU boot stacks, which double as the CPUs'
//! kernel (RSP0) stacks: once a CPU enters user mode nothing on it is live.

use core::arch::{asm, global_asm};

use crate::abi::boot::MAX_VCPUS;

/// Size of each CPU's boot/kernel stack.
pub const KERNEL_STACK_SIZE: usize = 64 * 1024;

#[repr(C, align(4096))]
struct Stacks([[u8; KERNEL_STACK_SIZE]; MAX_VCPUS as usize]);

/// One stack per vCPU, in .bss (zero at entry, no file space).
#[no_mangle]
static mut BOOT_STACKS: Stacks = Stacks([[0; KERNEL_STACK_SIZE]; MAX_VCPUS as usize]);

// Entry state (abi::boot): long mode, IF=0, RDI=&BootInfo, RSI=vCPU index, RSP=0.
// Pick this CPU's stack from RSI and call kmain(boot_info, cpu).
global_asm!(
    ".section .text._start, \"ax\"",
    ".global _start",
    "_start:",
    "cli",
    "cld",
    "cmp rsi, {max}",
    "jae 2f",
    "lea rax, [rsi + 1]",
    "shl rax, {shift}",
    "lea rsp, [rip + BOOT_STACKS]",
    "add rsp, rax",
    "xor ebp, ebp",
    "call {kmain}",
    "2:",
    "cli",
    "hlt",
    "jmp 2b",
    max = const MAX_VCPUS,
    shift = const KERNEL_STACK_SIZE.trailing_zeros(),
    kmain = sym crate::kmain,
);

/// Top (exclusive) of `cpu`'s kernel stack.
pub fn kernel_stack_top(cpu: u32) -> u64 {
    // Only the address is taken; nothing is read or written here.
    let base = core::ptr::addr_of!(BOOT_STACKS) as u64;
    base + (u64::from(cpu) + 1) * KERNEL_STACK_SIZE as u64
}

/// The CPU whose kernel stack we are running on, or `None` on another stack
/// (an IST stack, or before `_start` picked one).
pub fn current_cpu() -> Option<u32> {
    let rsp: u64;
    // SAFETY: reads RSP only.
    unsafe { asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags)) };
    let base = core::ptr::addr_of!(BOOT_STACKS) as u64;
    let index = rsp.checked_sub(base)? / KERNEL_STACK_SIZE as u64;
    (index < u64::from(MAX_VCPUS)).then_some(index as u32)
}

/// The registers an exception entry saves, lowest address first. Only the
/// caller-saved registers are saved: the handler is a normal `extern "C"`
/// function that preserves the others, and every instruction here is emulated.
#[derive(Debug)]
#[repr(C)]
pub struct TrapFrame {
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl TrapFrame {
    /// Whether the trap came from user mode (CPL3).
    pub fn is_user_mode(&self) -> bool {
        self.cs & 3 == 3
    }
}

/// Number of stubs (the exception vectors).
pub const STUB_COUNT: usize = 32;
/// Every stub is aligned to this many bytes, so stub `v` is at `trap_stubs + v * STUB_ALIGN`.
pub const STUB_ALIGN: u64 = 16;

extern "C" {
    /// The first stub; see [`STUB_ALIGN`].
    fn trap_stubs();
}

/// Address of the entry stub of `vector`.
pub fn stub_address(vector: usize) -> u64 {
    trap_stubs as *const () as u64 + vector as u64 * STUB_ALIGN
}

// One stub per exception vector: push a zero error code where the CPU pushes
// none, push the vector, then save the scratch registers and call the handler.
// The CPU aligns RSP to 16 before pushing its 5 words; 5 + 2 + 9 = 16 words keeps
// RSP 16-byte aligned at the call.
global_asm!(
    ".section .text.trap, \"ax\"",
    ".macro TRAP_STUB vec",
    ".balign 16",
    ".if (\\vec == 8) || (\\vec == 10) || (\\vec == 11) || (\\vec == 12) || (\\vec == 13) || (\\vec == 14) || (\\vec == 17) || (\\vec == 21) || (\\vec == 29) || (\\vec == 30)",
    ".else",
    "push 0",
    ".endif",
    "push \\vec",
    "jmp trap_common",
    ".endm",
    ".balign 16",
    ".global trap_stubs",
    "trap_stubs:",
    ".irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "TRAP_STUB \\vec",
    ".endr",
    "trap_common:",
    "push rax",
    "push rcx",
    "push rdx",
    "push rsi",
    "push rdi",
    "push r8",
    "push r9",
    "push r10",
    "push r11",
    "cld",
    "mov rdi, rsp",
    "call {handler}",
    "pop r11",
    "pop r10",
    "pop r9",
    "pop r8",
    "pop rdi",
    "pop rsi",
    "pop rdx",
    "pop rcx",
    "pop rax",
    "add rsp, 16",
    "iretq",
    handler = sym super::trap::trap_handler,
);

/// Enters user mode at `rip` with `rsp` and RDI = `arg`, interrupts off, all
/// other registers zero. Never returns: the CPU comes back through a trap.
pub fn enter_user(rip: u64, rsp: u64, arg: u64) -> ! {
    // RFLAGS: only the reserved bit 1; IF stays clear in this version.
    const RFLAGS: u64 = 0x2;
    // SAFETY: builds an iretq frame for CPL3 with the GDT's user selectors; the
    // current address space maps `rip` user-executable (the loader checked it).
    unsafe {
        asm!(
            "push {ss}",
            "push {rsp}",
            "push {rflags}",
            "push {cs}",
            "push {rip}",
            "xor eax, eax",
            "xor ebx, ebx",
            "xor ecx, ecx",
            "xor edx, edx",
            "xor esi, esi",
            "xor ebp, ebp",
            "xor r8d, r8d",
            "xor r9d, r9d",
            "xor r10d, r10d",
            "xor r11d, r11d",
            "xor r12d, r12d",
            "xor r13d, r13d",
            "xor r14d, r14d",
            "xor r15d, r15d",
            "iretq",
            ss = in(reg) u64::from(super::gdt::USER_DATA_SELECTOR),
            rsp = in(reg) rsp,
            rflags = const RFLAGS,
            cs = in(reg) u64::from(super::gdt::USER_CODE_SELECTOR),
            rip = in(reg) rip,
            in("rdi") arg,
            options(noreturn),
        )
    }
}
