//! Per-CPU GDT and TSS. The TSS gives RSP0 (the CPU's kernel stack, used on every
//! trap from user mode) and IST stacks for #DF, NMI and #MC, which must work
//! even when the kernel stack is unusable.

use core::cell::UnsafeCell;

use crate::abi::boot::MAX_VCPUS;

/// Kernel code: same selector as the VMM's boot GDT, so CS need not be reloaded.
pub const KERNEL_CODE_SELECTOR: u16 = 0x08;
/// Kernel data.
pub const KERNEL_DATA_SELECTOR: u16 = 0x10;
/// User data (RPL 3).
pub const USER_DATA_SELECTOR: u16 = 0x18 | 3;
/// User code, 64-bit (RPL 3).
pub const USER_CODE_SELECTOR: u16 = 0x20 | 3;
/// The TSS (a 16-byte descriptor).
const TSS_SELECTOR: u16 = 0x28;

/// IST indices (1-based, as in the IDT gate).
pub const IST_DOUBLE_FAULT: u8 = 1;
pub const IST_NMI: u8 = 2;
pub const IST_MACHINE_CHECK: u8 = 3;
const IST_COUNT: usize = 3;
const IST_STACK_SIZE: usize = 8 * 1024;

// Accessed bits pre-set so the CPU never writes the descriptors.
const GDT_NULL: u64 = 0;
const GDT_KERNEL_CODE: u64 = 0x00AF_9B00_0000_FFFF;
const GDT_KERNEL_DATA: u64 = 0x00CF_9300_0000_FFFF;
const GDT_USER_DATA: u64 = 0x00CF_F300_0000_FFFF;
const GDT_USER_CODE: u64 = 0x00AF_FB00_0000_FFFF;

/// The 64-bit TSS (104 bytes, no I/O bitmap).
#[repr(C, packed(4))]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

#[repr(C, align(16))]
struct CpuTables {
    gdt: [u64; 7],
    tss: Tss,
}

#[repr(C, align(16))]
struct IstStacks([[u8; IST_STACK_SIZE]; IST_COUNT]);

struct PerCpu(UnsafeCell<[CpuTables; MAX_VCPUS as usize]>);
// SAFETY: each CPU only touches its own slot (indexed by its cpu number), once,
// in `init`; afterwards the CPU (hardware) is the only user.
unsafe impl Sync for PerCpu {}

const EMPTY_TABLES: CpuTables = CpuTables {
    gdt: [0; 7],
    tss: Tss {
        reserved0: 0,
        rsp: [0; 3],
        reserved1: 0,
        ist: [0; 7],
        reserved2: 0,
        reserved3: 0,
        iomap_base: 0,
    },
};
static TABLES: PerCpu = PerCpu(UnsafeCell::new([EMPTY_TABLES; MAX_VCPUS as usize]));

struct PerCpuIst(UnsafeCell<[IstStacks; MAX_VCPUS as usize]>);
// SAFETY: only the hardware uses these stacks; Rust code never references them.
unsafe impl Sync for PerCpuIst {}
static IST_STACKS: PerCpuIst = PerCpuIst(UnsafeCell::new(
    [const { IstStacks([[0; IST_STACK_SIZE]; IST_COUNT]) }; MAX_VCPUS as usize],
));

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// Builds and loads `cpu`'s GDT and TSS; traps from user mode use `rsp0`.
pub fn init(cpu: u32, rsp0: u64) {
    let index = cpu as usize;
    assert!(index < MAX_VCPUS as usize, "cpu index out of range");
    // SAFETY: slot `index` belongs to this CPU and is initialised only here, once.
    let tables = unsafe { &mut (*TABLES.0.get())[index] };
    let ist_base = IST_STACKS.0.get() as u64 + (index * IST_COUNT * IST_STACK_SIZE) as u64;

    tables.tss.rsp[0] = rsp0;
    for i in 0..IST_COUNT {
        // Stacks grow down: IST entry i+1 is the top of stack i.
        tables.tss.ist[i] = ist_base + ((i + 1) * IST_STACK_SIZE) as u64;
    }
    tables.tss.iomap_base = core::mem::size_of::<Tss>() as u16;

    let tss_base = core::ptr::addr_of!(tables.tss) as u64;
    let tss_limit = (core::mem::size_of::<Tss>() - 1) as u64;
    // Available 64-bit TSS (type 9), present.
    let tss_low = (tss_limit & 0xFFFF)
        | ((tss_base & 0xFF_FFFF) << 16)
        | (0x89 << 40)
        | (((tss_limit >> 16) & 0xF) << 48)
        | (((tss_base >> 24) & 0xFF) << 56);
    tables.gdt = [
        GDT_NULL,
        GDT_KERNEL_CODE,
        GDT_KERNEL_DATA,
        GDT_USER_DATA,
        GDT_USER_CODE,
        tss_low,
        tss_base >> 32,
    ];

    let ptr = DescriptorPointer {
        limit: (core::mem::size_of::<[u64; 7]>() - 1) as u16,
        base: tables.gdt.as_ptr() as u64,
    };
    // SAFETY: the GDT is static and keeps the boot GDT's code/data selectors, so the
    // loaded CS/SS/DS stay valid; ltr marks our (per-CPU) TSS busy.
    unsafe {
        core::arch::asm!(
            "lgdt [{ptr}]",
            "mov ds, {data:x}",
            "mov es, {data:x}",
            "mov ss, {data:x}",
            "ltr {tss:x}",
            ptr = in(reg) &ptr,
            data = in(reg) u32::from(KERNEL_DATA_SELECTOR),
            tss = in(reg) u32::from(TSS_SELECTOR),
            options(nostack, preserves_flags),
        );
    }
    let _ = KERNEL_CODE_SELECTOR;
}
