//! Thin wrappers over privileged instructions. Only instructions KVM's emulator
//! executes at CPL0 (see docs/guest-kernel.md).

use core::arch::asm;

/// 32-bit `out`.
pub fn outl(port: u16, value: u32) {
    // SAFETY: port I/O to the VMM's devices; it does not touch guest memory except
    // what the device protocol defines (the PV channel reads a request we own),
    // hence no `nomem`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags)) };
}

/// 8-bit `out`.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O to the UART; no memory effects.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) };
}

/// 8-bit `in`.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port I/O to the UART; no memory effects.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags)) };
    value
}

/// The time-stamp counter.
#[allow(dead_code)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc has no side effects.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// CR2: the faulting address of the last #PF.
pub fn cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Loads CR3 (switches address space, flushes non-global TLB entries).
///
/// # Safety
/// `root` must be a valid PML4 that maps the running kernel code, stack and data.
pub unsafe fn write_cr3(root: u64) {
    // SAFETY: the caller guarantees the new tables map everything in use.
    unsafe { asm!("mov cr3, {}", in(reg) root, options(nostack, preserves_flags)) };
}

/// Turns SMAP/SMEP off: the kernel reads user memory for system calls, and
/// stac/clac are refused by the emulator. Keeps the rest of CR4.
pub fn setup_control_registers() {
    const CR4_SMEP: u64 = 1 << 20;
    const CR4_SMAP: u64 = 1 << 21;
    let mut cr4: u64;
    // SAFETY: reading CR4 has no side effects.
    unsafe { asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack, preserves_flags)) };
    if cr4 & (CR4_SMEP | CR4_SMAP) != 0 {
        cr4 &= !(CR4_SMEP | CR4_SMAP);
        // SAFETY: clearing SMEP/SMAP only relaxes checks.
        unsafe { asm!("mov cr4, {}", in(reg) cr4, options(nomem, nostack, preserves_flags)) };
    }
}

/// Stops this CPU for good: with IF=0, `hlt` blocks the vCPU in KVM without
/// using host CPU time.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: cli; hlt only stops this CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Zeroes one 4 KiB frame with `rep stosq` (much cheaper than `rep stosb` under
/// emulation). Only for recycled frames: fresh RAM is already zero.
///
/// # Safety
/// `addr` must be a page-aligned, identity-mapped frame nobody else uses.
pub unsafe fn zero_page(addr: u64) {
    // SAFETY: the caller owns the frame.
    unsafe {
        asm!("rep stosq", inout("rdi") addr => _, inout("rcx") 512u64 => _, in("rax") 0u64,
             options(nostack, preserves_flags));
    }
}
