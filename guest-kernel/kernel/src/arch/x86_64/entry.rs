//! Assembly entry points: `_start`, the exception/interrupt stubs and the
//! return to user mode. Also the per-CPU boot stacks, which double as the CPUs'
//! kernel (RSP0) stacks: once a CPU enters user mode nothing on it is live.
//!
//! Every trap, a page fault included, starts here: a stub saves the registers
//! as a [`TrapFrame`] and calls `trap.rs` (next in the page-fault walk:
//! `mm/fault.rs`). [`enter_frame`] is the way out when the scheduler switches
//! to another task.

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

/// The registers a trap entry saves, lowest address first: all general
/// registers, since a trap may switch to another task (whose saved frame is
/// then popped instead).
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
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

/// Number of stubs: the exception vectors, the timer and the APIC spurious vector.
pub const STUB_COUNT: usize = 48;
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

// One stub per vector: push a zero error code where the CPU pushes none, push
// the vector, then save the general registers and call the handler. The CPU
// aligns RSP to 16 before pushing its 5 words; 5 + 2 + 15 = 22 words keeps RSP
// 16-byte aligned at the call.
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
    ".irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47",
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
    "push rbx",
    "push rbp",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "cld",
    "mov rdi, rsp",
    "call {handler}",
    ".global trap_return",
    "trap_return:",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbp",
    "pop rbx",
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

/// Resumes the saved state `frame` (a task's user context): pops it as the
/// trap exit path does and `iretq`s. The current kernel stack is abandoned
/// (the next trap starts again at the top, TSS.RSP0). Never returns.
///
/// # Safety
/// `frame` must be a user-mode frame (CS/SS user selectors) whose RIP is mapped
/// in the current address space, and must stay valid until the `iretq`.
pub unsafe fn enter_frame(frame: *const TrapFrame) -> ! {
    // SAFETY: per the caller; after the iretq nothing of the kernel stack is live.
    unsafe { asm!("mov rsp, {}", "jmp trap_return", in(reg) frame, options(noreturn)) }
}

impl TrapFrame {
    /// The initial user state of a task: RIP = `rip`, RSP = `rsp`, RDI = `arg`,
    /// interrupts on (user mode is preemptible), other registers zero.
    pub fn new_user(rip: u64, rsp: u64, arg: u64) -> TrapFrame {
        TrapFrame {
            rip,
            rsp,
            rdi: arg,
            cs: u64::from(super::gdt::USER_CODE_SELECTOR),
            ss: u64::from(super::gdt::USER_DATA_SELECTOR),
            rflags: user_rflags(),
            ..TrapFrame::default()
        }
    }

    /// Makes the frame safe to `iretq` to after user code chose its values
    /// (sigreturn): user selectors, IF on, only arithmetic flags from the user.
    pub fn sanitize_user(&mut self) {
        // CF PF AF ZF SF DF OF: what user code may set.
        const USER_FLAGS: u64 = 0xCD5;
        self.cs = u64::from(super::gdt::USER_CODE_SELECTOR);
        self.ss = u64::from(super::gdt::USER_DATA_SELECTOR);
        self.rflags = (self.rflags & USER_FLAGS) | user_rflags();
    }
}

/// RFLAGS of user mode: the reserved bit 1, and IF if user mode is preemptible.
static USER_RFLAGS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0x2);

fn user_rflags() -> u64 {
    USER_RFLAGS.load(core::sync::atomic::Ordering::Relaxed)
}

/// Whether user mode runs with interrupts on (boot CPU, before any task).
///
/// Off unless several tasks share a vCPU: with IF=1, KVM handles a stage-2
/// fault on a missing host page as an *async page fault* (an artificial halt
/// while a kworker faults the page in), so the VMM's userfaults would no
/// longer be taken, and blocked, on the vCPU thread. With IF=0 in user mode the
/// tick is only taken in the idle loop, which is all one task per vCPU needs.
pub fn set_user_preemptible(on: bool) {
    USER_RFLAGS.store(
        if on { 0x202 } else { 0x2 },
        core::sync::atomic::Ordering::Relaxed,
    );
}
