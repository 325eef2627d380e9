//! The IDT, shared by every CPU: one interrupt gate per exception vector, all
//! DPL 0 except the system-call gate (see syscall.rs).

use core::cell::UnsafeCell;

use super::entry::{stub_address, STUB_COUNT};
use super::gdt::{IST_DOUBLE_FAULT, IST_MACHINE_CHECK, IST_NMI, KERNEL_CODE_SELECTOR};
use super::syscall;

#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    const EMPTY: Gate = Gate {
        offset_low: 0,
        selector: 0,
        ist: 0,
        type_attr: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    };

    /// A present 64-bit interrupt gate (IF cleared on entry).
    fn interrupt(handler: u64, dpl: u8, ist: u8) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector: KERNEL_CODE_SELECTOR,
            ist,
            type_attr: 0x8E | (dpl << 5),
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

struct Idt(UnsafeCell<[Gate; STUB_COUNT]>);
// SAFETY: written once by the boot CPU in `init`, before other CPUs start (they
// are started by a later PV request); read-only afterwards.
unsafe impl Sync for Idt {}
static IDT: Idt = Idt(UnsafeCell::new([Gate::EMPTY; STUB_COUNT]));

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// Fills the IDT. Boot CPU only, before the other CPUs start.
pub fn init() {
    // SAFETY: see `Idt`: no other CPU runs yet and nothing has loaded the IDT.
    let idt = unsafe { &mut *IDT.0.get() };
    for (vector, gate) in idt.iter_mut().enumerate() {
        let ist = match vector {
            2 => IST_NMI,
            8 => IST_DOUBLE_FAULT,
            18 => IST_MACHINE_CHECK,
            _ => 0,
        };
        let dpl = if vector == syscall::ENTRY_VECTOR {
            syscall::ENTRY_GATE_DPL
        } else {
            0
        };
        *gate = Gate::interrupt(stub_address(vector), dpl, ist);
    }
}

/// Loads the shared IDT on this CPU.
pub fn load() {
    let ptr = DescriptorPointer {
        limit: (core::mem::size_of::<[Gate; STUB_COUNT]>() - 1) as u16,
        base: IDT.0.get() as u64,
    };
    // SAFETY: the IDT is static and filled by `init` before any CPU loads it.
    unsafe { core::arch::asm!("lidt [{}]", in(reg) &ptr, options(nostack, preserves_flags)) };
}

/// Loads an empty IDT: any exception then triple-faults.
pub fn load_empty() {
    let ptr = DescriptorPointer { limit: 0, base: 0 };
    // SAFETY: deliberately makes every exception fatal (triple fault).
    unsafe { core::arch::asm!("lidt [{}]", in(reg) &ptr, options(nostack, preserves_flags)) };
}
