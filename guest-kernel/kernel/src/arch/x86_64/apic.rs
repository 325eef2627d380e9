//! The local APIC timer: a periodic tick on every CPU, for preemption and for
//! polling the page store's completions. x2APIC (MSRs) when CPUID says so,
//! else xAPIC MMIO at `LAPIC_START` (mapped uncached by the kernel tables).
//! The tick is kept cheap (every CPL0 instruction is emulated here).

use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::abi::layout::LAPIC_START;

/// Vector of the timer interrupt.
pub const TIMER_VECTOR: u64 = 32;
/// Vector of spurious APIC interrupts (low nibble all ones, for old APICs).
pub const SPURIOUS_VECTOR: u64 = 47;
/// Tick period: KVM's APIC timer counts at 1 GHz (divide by 1).
pub const TICK_NS: u32 = 10_000_000;
/// Milliseconds per tick.
pub const TICK_MS: u64 = (TICK_NS / 1_000_000) as u64;

static X2APIC: AtomicBool = AtomicBool::new(false);

const IA32_APIC_BASE: u32 = 0x1B;
const APIC_ENABLE: u64 = 1 << 11;
const APIC_EXTD: u64 = 1 << 10;
// Register offsets (xAPIC MMIO offset; x2APIC MSR = 0x800 + offset / 16).
const REG_EOI: u32 = 0xB0;
const REG_SVR: u32 = 0xF0;
const REG_LVT_TIMER: u32 = 0x320;
const REG_TIMER_INIT: u32 = 0x380;
const REG_TIMER_DIV: u32 = 0x3E0;
const LVT_PERIODIC: u32 = 1 << 17;

fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads an architectural MSR that exists on every x86_64 with an APIC.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

fn wrmsr(msr: u32, value: u64) {
    // SAFETY: only APIC MSRs are written, with valid values.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nomem, nostack, preserves_flags))
    };
}

fn write(reg: u32, value: u32) {
    if X2APIC.load(Ordering::Relaxed) {
        wrmsr(0x800 + reg / 16, u64::from(value));
    } else {
        // SAFETY: LAPIC_START is mapped uncached (build_kernel_tables) and the
        // register offset is one of the constants above.
        unsafe { core::ptr::write_volatile((LAPIC_START + u64::from(reg)) as *mut u32, value) };
    }
}

/// Whether CPUID advertises x2APIC (leaf 1, ECX bit 21).
fn has_x2apic() -> bool {
    let ecx: u32;
    // SAFETY: cpuid has no side effects; rbx is saved because LLVM reserves it.
    unsafe {
        asm!("mov {tmp}, rbx", "cpuid", "mov rbx, {tmp}", tmp = out(reg) _, inout("eax") 1u32 => _,
             inout("ecx") 0u32 => ecx, out("edx") _, options(nomem, nostack, preserves_flags))
    };
    ecx & (1 << 21) != 0
}

/// Starts this CPU's periodic tick (interrupts stay masked until user mode or
/// the idle loop enables them).
pub fn init_cpu() {
    let base = rdmsr(IA32_APIC_BASE);
    if has_x2apic() {
        X2APIC.store(true, Ordering::Relaxed);
        wrmsr(IA32_APIC_BASE, base | APIC_ENABLE | APIC_EXTD);
    } else {
        wrmsr(IA32_APIC_BASE, base | APIC_ENABLE);
    }
    write(REG_SVR, 0x100 | SPURIOUS_VECTOR as u32);
    write(REG_TIMER_DIV, 0xB); // divide by 1
    write(REG_LVT_TIMER, LVT_PERIODIC | TIMER_VECTOR as u32);
    write(REG_TIMER_INIT, TICK_NS);
}

/// Signals the end of the current interrupt.
pub fn eoi() {
    write(REG_EOI, 0);
}

/// Whether the xAPIC MMIO page must be mapped (no x2APIC).
pub fn needs_mmio() -> bool {
    !has_x2apic()
}
