//! Guest RAM served by a page-fault handler outside this process: the
//! regions are registered with a userfaultfd that the owner hands over (for
//! example with Firecracker's UFFD handshake, in the orchestration layer).
//! From then on the external handler alone resolves faults.

use ::memory::{RegisterMode, Uffd, UffdError};
use devices::GuestRam;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

/// One region of guest RAM as an external handler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionMapping {
    /// Host virtual address of the region in this process.
    pub host_addr: u64,
    /// Bytes.
    pub size: u64,
    /// Guest-physical address of the region's start.
    pub gpa: u64,
}

/// Guest RAM registered with a userfaultfd for an external handler.
#[derive(Debug)]
pub struct ExternalMemory {
    uffd: Uffd,
    mappings: Vec<RegionMapping>,
}

impl ExternalMemory {
    /// Registers every region of `mem` (MISSING mode) with a new userfaultfd.
    pub fn register(mem: &GuestRam) -> Result<ExternalMemory, UffdError> {
        let uffd = Uffd::for_guest_memory()?;
        let mappings: Vec<RegionMapping> = mem
            .iter()
            .map(|r| RegionMapping {
                host_addr: r.as_ptr() as u64,
                size: r.len(),
                gpa: r.start_addr().raw_value(),
            })
            .collect();
        for m in &mappings {
            uffd.register(m.host_addr, m.size, RegisterMode::MISSING)?;
        }
        Ok(ExternalMemory { uffd, mappings })
    }

    /// The userfaultfd to hand to the handler (it stays open here too, for as
    /// long as guest memory lives).
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    /// The regions, in guest-physical order.
    pub fn mappings(&self) -> &[RegionMapping] {
        &self.mappings
    }
}
