//! Guest memory layout: every guest-physical constant, in address order, plus the
//! guest-virtual layout of user tasks. Nothing else in the project hard-codes an
//! address; see `docs/memory-layout.md`.

/// Size of a base page (4 KiB).
pub const PAGE_SIZE: u64 = 0x1000;
/// [`PAGE_SIZE`] as a `usize`, for buffers.
#[allow(clippy::cast_possible_truncation)] // 4096 fits every usize
pub const PAGE_LEN: usize = PAGE_SIZE as usize;
/// Size of a large page mapped by a page-directory entry (2 MiB).
pub const LARGE_PAGE_SIZE: u64 = 0x20_0000;

// ---- Guest-physical: low memory (0 .. 1 MiB), written by the VMM at boot ----

/// Boot GDT built by the VMM (null, code64, data). The guest kernel loads its own.
pub const BOOT_GDT_START: u64 = 0x500;
/// Number of entries in the boot GDT.
pub const BOOT_GDT_ENTRIES: u64 = 3;
/// Selector of the 64-bit code segment in the boot GDT.
pub const BOOT_CODE_SELECTOR: u16 = 0x8;
/// Selector of the data segment in the boot GDT.
pub const BOOT_DATA_SELECTOR: u16 = 0x10;
/// Boot information page ([`crate::boot::BootInfo`]); RDI points here at entry.
pub const BOOT_INFO_START: u64 = 0x7000;
/// Boot PML4 (one page). The boot tables identity-map [`BOOT_IDENTITY_MAP_SIZE`].
pub const BOOT_PML4_START: u64 = 0x9000;
/// Boot PDPT (one page).
pub const BOOT_PDPT_START: u64 = 0xA000;
/// Boot page directories: [`BOOT_PD_COUNT`] consecutive pages, 2 MiB entries.
pub const BOOT_PD_START: u64 = 0xB000;
/// Number of boot page directories (each maps 1 GiB).
pub const BOOT_PD_COUNT: u64 = 4;
/// Bytes identity-mapped by the boot page tables (0 .. 4 GiB).
pub const BOOT_IDENTITY_MAP_SIZE: u64 = BOOT_PD_COUNT << 30;
/// End of the area the VMM writes at boot; the guest never allocates below it.
pub const LOW_RESERVED_END: u64 = 0x10_0000;

// ---- Guest-physical: images ----

/// Lowest address a kernel ELF segment may be loaded at (1 MiB).
pub const KERNEL_START: u64 = 0x10_0000;
/// Start of the boot-module area (the bundled user program ELF); kernel segments
/// must end below it.
pub const MODULE_START: u64 = 0x100_0000;
/// Largest boot module (16 MiB).
pub const MODULE_MAX_SIZE: u64 = 0x100_0000;
/// First address of guest RAM the guest kernel may hand out as page frames
/// (above the module area).
pub const FREE_RAM_START: u64 = MODULE_START + MODULE_MAX_SIZE;

// ---- Guest-physical: the 32-bit MMIO hole and high RAM ----

/// Start of the MMIO hole below 4 GiB; RAM past this point continues at
/// [`HIGH_RAM_START`].
pub const MMIO_GAP_START: u64 = 0xC000_0000;
/// IOAPIC registers (in-kernel irqchip).
pub const IOAPIC_START: u64 = 0xFEC0_0000;
/// Local APIC registers (in-kernel irqchip).
pub const LAPIC_START: u64 = 0xFEE0_0000;
/// The three pages KVM needs for the task-state segment of real-mode
/// emulation on Intel (`KVM_SET_TSS_ADDR`), inside the hole, below the BIOS.
pub const KVM_TSS_START: u64 = 0xFFFB_D000;
/// End of the MMIO hole; RAM above 3 GiB is placed from here.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

// ---- Memory sizes ----

/// Smallest guest memory the VMM accepts (64 MiB).
pub const MIN_MEM_SIZE: u64 = 64 << 20;
/// Largest guest memory the VMM accepts (64 GiB).
pub const MAX_MEM_SIZE: u64 = 64 << 30;

/// The guest RAM ranges `(start, len)` for a memory size: below the MMIO hole, then
/// the rest from 4 GiB. The second range has length 0 for guests of 3 GiB or less.
pub const fn ram_ranges(mem_size: u64) -> [(u64, u64); 2] {
    if mem_size <= MMIO_GAP_START {
        [(0, mem_size), (HIGH_RAM_START, 0)]
    } else {
        [(0, MMIO_GAP_START), (HIGH_RAM_START, mem_size - MMIO_GAP_START)]
    }
}

// ---- Guest-virtual: user tasks ----
// The guest kernel identity-maps RAM below 512 GiB (PML4 slot 0, supervisor only);
// user tasks live above it.

/// Lowest user virtual address.
pub const USER_SPACE_START: u64 = 0x0000_0080_0000_0000;
/// Where the bundled user program is linked (its linker script uses this value).
pub const USER_IMAGE_BASE: u64 = USER_SPACE_START;
/// Read-only page holding the task's [`crate::syscall::TaskArgs`]; RDI at user entry.
pub const USER_ARGS_ADDR: u64 = 0x0000_00F0_0000_0000;
/// Base of the demand-zero region that the `touch` workload faults in. Page `i`
/// of the workload is at `USER_WORK_BASE + i * PAGE_SIZE`.
pub const USER_WORK_BASE: u64 = 0x0000_0100_0000_0000;
/// Largest `touch` region (64 GiB of virtual space, far more than any guest RAM).
pub const USER_WORK_MAX_SIZE: u64 = 64 << 30;
/// The slow page store, mapped read-only in every task: store page `i` at
/// `USER_STORE_BASE + i * PAGE_SIZE` (see [`crate::pv::store`]).
pub const USER_STORE_BASE: u64 = 0x0000_0200_0000_0000;
/// A demand-zero scratch region of every task (tests, benchmark, userfaultfd).
pub const USER_ANON_BASE: u64 = 0x0000_0300_0000_0000;
/// Size of the scratch region (64 MiB).
pub const USER_ANON_SIZE: u64 = 64 << 20;
/// Top of the user stack (exclusive).
pub const USER_STACK_TOP: u64 = 0x0000_7000_0000_0000;
/// Size of the demand-zero user stack.
pub const USER_STACK_SIZE: u64 = 1 << 20;
/// End of user space (exclusive).
pub const USER_SPACE_END: u64 = 0x0000_8000_0000_0000;

const _: () = assert!(USER_WORK_BASE + USER_WORK_MAX_SIZE <= USER_STORE_BASE);
const _: () = assert!(USER_STORE_BASE + (1 << 30) <= USER_ANON_BASE);
const _: () = assert!(USER_ANON_BASE + USER_ANON_SIZE <= USER_STACK_TOP - USER_STACK_SIZE);
const _: () =
    assert!(MODULE_START.is_multiple_of(LARGE_PAGE_SIZE) && FREE_RAM_START.is_multiple_of(LARGE_PAGE_SIZE));
const _: () = assert!(MIN_MEM_SIZE > FREE_RAM_START);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_ranges_split_at_the_mmio_hole() {
        assert_eq!(ram_ranges(64 << 20), [(0, 64 << 20), (HIGH_RAM_START, 0)]);
        assert_eq!(
            ram_ranges(MMIO_GAP_START),
            [(0, MMIO_GAP_START), (HIGH_RAM_START, 0)]
        );
        assert_eq!(
            ram_ranges(4 << 30),
            [(0, MMIO_GAP_START), (HIGH_RAM_START, 1 << 30)]
        );
    }

    #[test]
    fn layout_is_in_address_order() {
        let order = [
            BOOT_GDT_START,
            BOOT_INFO_START,
            BOOT_PML4_START,
            BOOT_PDPT_START,
            BOOT_PD_START,
            BOOT_PD_START + BOOT_PD_COUNT * PAGE_SIZE,
            LOW_RESERVED_END,
            KERNEL_START,
            MODULE_START,
            FREE_RAM_START,
            MMIO_GAP_START,
            IOAPIC_START,
            LAPIC_START,
            HIGH_RAM_START,
        ];
        assert!(order.windows(2).all(|w| w[0] <= w[1]), "{order:x?}");
    }
}
