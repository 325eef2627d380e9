//! Guest RAM: anonymous `MAP_NORESERVE` mappings (vm-memory), so untouched guest
//! memory costs the host nothing, registered with KVM as memory slots (slot
//! `i` is the `i`-th region of [`ram_ranges`]).

use abi::layout::ram_ranges;
use devices::GuestRam;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap failed.
    #[error("cannot map {size} bytes of guest memory: {reason}; use a smaller --mem")]
    Map {
        /// Requested size.
        size: u64,
        /// Why.
        reason: String,
    },
    /// KVM refused a memory slot.
    #[error("KVM refused memory slot {slot} ({gpa:#x}, {size} bytes): {source}")]
    Slot {
        /// Slot number.
        slot: u32,
        /// Guest-physical base.
        gpa: u64,
        /// Size.
        size: u64,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Maps `mem_size` bytes of guest RAM laid out by [`ram_ranges`].
pub fn create_guest_memory(mem_size: u64) -> Result<GuestRam, MemoryError> {
    let map_err = |reason: String| MemoryError::Map {
        size: mem_size,
        reason,
    };
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_size)
        .into_iter()
        .filter(|&(_, len)| len > 0)
        .map(|(start, len)| {
            Ok((
                GuestAddress(start),
                usize::try_from(len).map_err(|e| map_err(e.to_string()))?,
            ))
        })
        .collect::<Result<_, MemoryError>>()?;
    GuestRam::from_ranges(&ranges).map_err(|e| map_err(e.to_string()))
}

/// Registers every region of `mem` with KVM (slot `i` is the `i`-th region).
pub fn register_memslots(vm: &VmFd, mem: &GuestRam) -> Result<(), MemoryError> {
    set_memslots(vm, mem, 0)
}

pub(super) fn set_memslots(vm: &VmFd, mem: &GuestRam, flags: u32) -> Result<(), MemoryError> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let gpa = region.start_addr().raw_value();
        let size = region.len();
        let region_desc = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: region.as_ptr() as u64,
            flags,
        };
        // SAFETY: the host range belongs to `mem`'s mapping, which the caller keeps
        // alive (the VM holds a clone) for as long as the VM can run.
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(|source| MemoryError::Slot {
            slot,
            gpa,
            size,
            source,
        })?;
    }
    Ok(())
}
