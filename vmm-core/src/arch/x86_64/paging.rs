//! The boot GDT and identity page tables the VMM writes so the guest kernel starts
//! directly in long mode (see `abi::boot`).

use abi::layout::{
    BOOT_GDT_START, BOOT_PDPT_START, BOOT_PD_COUNT, BOOT_PD_START, BOOT_PML4_START, LARGE_PAGE_SIZE,
    PAGE_SIZE,
};
use devices::GuestRam;
use vm_memory::{Bytes, GuestAddress};

/// Errors writing boot structures.
#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    /// Guest memory write failed (memory smaller than the low boot area).
    #[error("cannot write the boot {what} at {addr:#x}: {source}")]
    Write {
        /// Which structure.
        what: &'static str,
        /// Where.
        addr: u64,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
}

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const LARGE: u64 = 1 << 7;

/// Boot GDT entries: null, 64-bit code (DPL 0), data.
pub const BOOT_GDT: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

fn write_u64s(mem: &GuestRam, base: u64, values: &[u64], what: &'static str) -> Result<(), PagingError> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(base))
        .map_err(|source| PagingError::Write {
            what,
            addr: base,
            source,
        })
}

/// Writes the boot GDT and the identity map of the first 4 GiB (2 MiB pages).
pub fn write_boot_tables(mem: &GuestRam) -> Result<(), PagingError> {
    write_u64s(mem, BOOT_GDT_START, &BOOT_GDT, "GDT")?;
    write_u64s(
        mem,
        BOOT_PML4_START,
        &[BOOT_PDPT_START | PRESENT | WRITABLE],
        "PML4",
    )?;
    let pdpt: Vec<u64> = (0..BOOT_PD_COUNT)
        .map(|i| (BOOT_PD_START + i * PAGE_SIZE) | PRESENT | WRITABLE)
        .collect();
    write_u64s(mem, BOOT_PDPT_START, &pdpt, "PDPT")?;
    let pds: Vec<u64> = (0..BOOT_PD_COUNT * 512)
        .map(|i| (i * LARGE_PAGE_SIZE) | PRESENT | WRITABLE | LARGE)
        .collect();
    write_u64s(mem, BOOT_PD_START, &pds, "page directories")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_identity_map_4g() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(BOOT_PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, BOOT_PDPT_START);
        // Walk 0xC000_1234 + 3 GiB-ish: PDPT index 3, PD index 0.
        let va: u64 = 0xC020_1234;
        let pdpte: u64 = mem
            .read_obj(GuestAddress(BOOT_PDPT_START + ((va >> 30) & 511) * 8))
            .unwrap();
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 511) * 8))
            .unwrap();
        assert_ne!(pde & LARGE, 0);
        assert_eq!((pde & !0x1f_ffff & !(1 << 63)) + (va & 0x1f_ffff), va);
    }

    #[test]
    fn too_small_memory_is_an_error() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(write_boot_tables(&mem).is_err());
    }
}
