//! Boot protocol.
//!
//! The VMM loads the kernel ELF's `PT_LOAD` segments at their physical addresses
//! (between [`KERNEL_START`](crate::layout::KERNEL_START) and
//! [`MODULE_START`](crate::layout::MODULE_START)), the user program ELF as a boot
//! module at [`MODULE_START`](crate::layout::MODULE_START), writes a [`BootInfo`]
//! at [`BOOT_INFO_START`](crate::layout::BOOT_INFO_START), and starts every vCPU
//! at the ELF entry point in this state:
//!
//! - 64-bit long mode, paging on: CR3 = `BOOT_PML4_START`, identity map of
//!   0 .. 4 GiB with 2 MiB supervisor read/write pages; CR0.PE/PG, CR4.PAE, EFER.LME/LMA;
//! - CS = [`BOOT_CODE_SELECTOR`](crate::layout::BOOT_CODE_SELECTOR), other
//!   segments = [`BOOT_DATA_SELECTOR`](crate::layout::BOOT_DATA_SELECTOR);
//!   interrupts disabled, no IDT;
//! - RDI = address of the [`BootInfo`], RSI = vCPU index (0 = bootstrap CPU),
//!   RSP = 0: the kernel sets up its own stack.
//!
//! Only vCPU 0 runs at first. The others start (at the same entry) when vCPU 0
//! sends [`PvRequest::start_cpus`](crate::pv::PvRequest::start_cpus), once the
//! kernel's shared state is ready; they never spin in guest kernel code waiting.

/// `BootInfo::magic`: "VMMBOOT1" little-endian.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"VMMBOOT1");
/// `BootInfo::version` of this definition.
pub const BOOT_INFO_VERSION: u32 = 2;
/// Capacity of `BootInfo::mem_regions`.
pub const MAX_MEM_REGIONS: usize = 32;
/// Capacity of `BootInfo::cmdline` in bytes.
pub const CMDLINE_MAX: usize = 1024;
/// Largest vCPU count of a VM.
pub const MAX_VCPUS: u32 = 8;

/// Kind of a memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum MemKind {
    /// Free RAM: the guest may hand it out as page frames. The VMM guarantees it
    /// reads as zero at boot (host memory is lazily zero-filled), so the guest does
    /// not need to zero a frame it takes from here for the first time.
    Usable = 1,
    /// RAM in use at boot (boot tables, kernel image, boot module).
    Reserved = 2,
}

/// A range of guest-physical memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct MemRegion {
    /// First guest-physical address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// A [`MemKind`] as `u32`.
    pub kind: u32,
    /// Zero.
    pub reserved: u32,
}

/// A blob the VMM loaded into guest memory for the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Module {
    /// Guest-physical address (page aligned); 0 if absent.
    pub start: u64,
    /// Length in bytes; 0 if absent.
    pub len: u64,
}

/// Boot information, at [`BOOT_INFO_START`](crate::layout::BOOT_INFO_START).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`BOOT_INFO_VERSION`].
    pub version: u32,
    /// Number of vCPUs (1 ..= [`MAX_VCPUS`]).
    pub cpu_count: u32,
    /// Valid entries in `mem_regions`.
    pub mem_region_count: u32,
    /// Valid bytes in `cmdline` (UTF-8, no terminator).
    pub cmdline_len: u32,
    /// The guest's TSC frequency in kHz as KVM runs it (0 if unknown).
    pub tsc_khz: u32,
    /// Zero.
    pub reserved: u32,
    /// The user program ELF (the bundled `user` crate unless replaced).
    pub user_image: Module,
    /// The guest-physical memory map, sorted, non-overlapping.
    pub mem_regions: [MemRegion; MAX_MEM_REGIONS],
    /// The kernel command line.
    pub cmdline: [u8; CMDLINE_MAX],
}

const _: () = assert!(core::mem::size_of::<MemRegion>() == 24);
const _: () = assert!(core::mem::size_of::<Module>() == 16);
const _: () =
    assert!(core::mem::size_of::<BootInfo>() == 8 + 4 * 6 + 16 + 24 * MAX_MEM_REGIONS + CMDLINE_MAX);
const _: () = assert!(core::mem::size_of::<BootInfo>() as u64 <= crate::layout::PAGE_SIZE);

crate::byte_valued!(MemRegion, Module, BootInfo);

impl Default for BootInfo {
    fn default() -> Self {
        BootInfo {
            magic: BOOT_INFO_MAGIC,
            version: BOOT_INFO_VERSION,
            cpu_count: 0,
            mem_region_count: 0,
            cmdline_len: 0,
            tsc_khz: 0,
            reserved: 0,
            user_image: Module::default(),
            mem_regions: [MemRegion::default(); MAX_MEM_REGIONS],
            cmdline: [0; CMDLINE_MAX],
        }
    }
}

/// Why a [`BootInfo`] is not valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootInfoError {
    /// Wrong magic or version: not written by a compatible VMM.
    BadMagic,
    /// `cpu_count` is 0 or above [`MAX_VCPUS`].
    BadCpuCount,
    /// `mem_region_count` or `cmdline_len` is above capacity.
    BadLength,
    /// The command line is not UTF-8.
    CmdlineNotUtf8,
}

impl BootInfo {
    /// Checks the header and lengths, as the guest does first thing.
    pub fn validate(&self) -> Result<(), BootInfoError> {
        if self.magic != BOOT_INFO_MAGIC || self.version != BOOT_INFO_VERSION {
            return Err(BootInfoError::BadMagic);
        }
        if self.cpu_count == 0 || self.cpu_count > MAX_VCPUS {
            return Err(BootInfoError::BadCpuCount);
        }
        if self.mem_region_count as usize > MAX_MEM_REGIONS || self.cmdline_len as usize > CMDLINE_MAX {
            return Err(BootInfoError::BadLength);
        }
        self.cmdline().map(|_| ())
    }

    /// The valid memory regions.
    pub fn regions(&self) -> &[MemRegion] {
        let n = (self.mem_region_count as usize).min(MAX_MEM_REGIONS);
        &self.mem_regions[..n]
    }

    /// Appends a region; `false` if the table is full.
    pub fn push_region(&mut self, start: u64, len: u64, kind: MemKind) -> bool {
        let n = self.mem_region_count as usize;
        if n >= MAX_MEM_REGIONS {
            return false;
        }
        self.mem_regions[n] = MemRegion {
            start,
            len,
            kind: kind as u32,
            reserved: 0,
        };
        self.mem_region_count += 1;
        true
    }

    /// Sets the command line; `false` if it is longer than [`CMDLINE_MAX`].
    pub fn set_cmdline(&mut self, cmdline: &str) -> bool {
        let bytes = cmdline.as_bytes();
        let Ok(len) = u32::try_from(bytes.len()) else {
            return false;
        };
        if bytes.len() > CMDLINE_MAX {
            return false;
        }
        self.cmdline = [0; CMDLINE_MAX];
        self.cmdline[..bytes.len()].copy_from_slice(bytes);
        self.cmdline_len = len;
        true
    }

    /// The command line.
    pub fn cmdline(&self) -> Result<&str, BootInfoError> {
        let n = (self.cmdline_len as usize).min(CMDLINE_MAX);
        core::str::from_utf8(&self.cmdline[..n]).map_err(|_| BootInfoError::CmdlineNotUtf8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_info_round_trip_and_validation() {
        let mut b = BootInfo {
            cpu_count: 2,
            ..Default::default()
        };
        assert!(b.set_cmdline("workload=hello"));
        assert!(b.push_region(0x100_0000, 0x100_0000, MemKind::Usable));
        assert_eq!(b.validate(), Ok(()));
        assert_eq!(b.cmdline(), Ok("workload=hello"));
        assert_eq!(b.regions().len(), 1);
        assert_eq!(b.regions()[0].kind, MemKind::Usable as u32);

        b.cpu_count = MAX_VCPUS + 1;
        assert_eq!(b.validate(), Err(BootInfoError::BadCpuCount));
        b.cpu_count = 1;
        b.magic = 0;
        assert_eq!(b.validate(), Err(BootInfoError::BadMagic));
    }

    #[test]
    fn cmdline_and_region_capacity_are_enforced() {
        let mut b = BootInfo {
            cpu_count: 1,
            ..Default::default()
        };
        assert!(!b.set_cmdline(&"x".repeat(CMDLINE_MAX + 1)));
        for i in 0..MAX_MEM_REGIONS as u64 {
            assert!(b.push_region(i << 30, 1 << 20, MemKind::Usable));
        }
        assert!(!b.push_region(1 << 40, 1, MemKind::Usable));
        b.cmdline[0] = 0xff;
        b.cmdline_len = 1;
        assert_eq!(b.validate(), Err(BootInfoError::CmdlineNotUtf8));
    }
}
