//! vCPU register state for the long-mode entry of `abi::boot`, and CPUID.

use abi::layout::{
    BOOT_CODE_SELECTOR, BOOT_DATA_SELECTOR, BOOT_GDT_ENTRIES, BOOT_GDT_START, BOOT_INFO_START,
    BOOT_PML4_START,
};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, CpuId};

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
#[allow(clippy::cast_possible_truncation)] // 23, checked by the assertion below
const BOOT_GDT_LIMIT: u16 = (BOOT_GDT_ENTRIES * 8 - 1) as u16;
const _: () = assert!(BOOT_GDT_ENTRIES * 8 - 1 <= u16::MAX as u64);

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        ..Default::default()
    }
}

/// Special registers for the long-mode entry, applied over what KVM reports.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.cs = segment(BOOT_CODE_SELECTOR, true);
    let data = segment(BOOT_DATA_SELECTOR, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = BOOT_GDT_LIMIT;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr3 = BOOT_PML4_START;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_NE | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// General registers at entry: RIP = entry, RDI = boot info, RSI = vCPU index.
pub fn entry_regs(entry: u64, cpu: u32) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rdi: BOOT_INFO_START,
        rsi: u64::from(cpu),
        rflags: 0x2,
        ..Default::default()
    }
}

/// FPU state at reset (x87 control word, MXCSR defaults).
pub fn initial_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Adapts KVM's supported CPUID for one vCPU: its APIC ID in leaf 1 and leaf 0xB.
pub fn patch_cpuid(cpuid: &mut CpuId, cpu: u32, cpu_count: u32) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (cpu << 24) | (cpu_count.min(255) << 16);
                // Hypervisor present bit (leaf 1, ECX bit 31).
                e.ecx |= 1 << 31;
            }
            0xb => e.edx = cpu,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_state_is_consistent() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.cs.db, 0, "a 64-bit code segment must have D=0");
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.cr4 & CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, BOOT_PML4_START);
        let r = entry_regs(0x10_0000, 3);
        assert_eq!((r.rip, r.rdi, r.rsi), (0x10_0000, BOOT_INFO_START, 3));
    }
}
