//! Dirty tracking for pre-copy migration: KVM's dirty log of the guest's own
//! writes plus vm-memory's per-region bitmaps of the VMM's writes.

use super::ram::set_memslots;
use abi::layout::PAGE_SIZE;
use devices::GuestRam;
use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use kvm_ioctls::VmFd;
use std::sync::Arc;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

/// Errors of dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// Logging could not be switched on or off.
    #[error("cannot switch KVM dirty logging: {0}")]
    Slots(#[from] super::ram::MemoryError),
    /// KVM's dirty log could not be read.
    #[error("cannot read KVM's dirty log of memory slot {slot}: {source}; this KVM may not support dirty logging: migrate without --precopy-rounds")]
    Log {
        /// Slot number.
        slot: u32,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A region is larger than this host's address space.
    #[error("guest memory region of {0} bytes is too large for this host")]
    TooLarge(u64),
    /// uffd-WP dirty tracking failed.
    #[error(transparent)]
    UffdWp(#[from] super::dirty_wp::WpDirtyError),
}

/// Which guest pages were written since the last look, for pre-copy
/// migration: KVM's dirty log (writes by the guest, including the ones KVM's
/// emulator makes for it) plus each region's vm-memory bitmap (writes by the
/// VMM itself: devices, a restore). Logging stops on drop.
#[derive(Debug)]
pub struct DirtyTracker {
    vm: Arc<VmFd>,
    mem: GuestRam,
    on: bool,
}

impl DirtyTracker {
    /// Turns dirty logging on for every memory slot; nothing counts as
    /// written before this call.
    pub fn start(vm: Arc<VmFd>, mem: GuestRam) -> Result<DirtyTracker, DirtyError> {
        for r in mem.iter() {
            // The mapping's own bitmap (the region's `bitmap()` is a slice view).
            (**r).bitmap().reset();
        }
        set_memslots(&vm, &mem, KVM_MEM_LOG_DIRTY_PAGES)?;
        Ok(DirtyTracker { vm, mem, on: true })
    }

    /// The guest-physical addresses of the pages written since the last call
    /// (or [`start`](Self::start)), ascending; the log restarts empty.
    pub fn take(&self) -> Result<Vec<u64>, DirtyError> {
        let mut pages = Vec::new();
        for (slot, r) in (0u32..).zip(self.mem.iter()) {
            let gpa = r.start_addr().raw_value();
            let size = r.len();
            let len = usize::try_from(size).map_err(|_| DirtyError::TooLarge(size))?;
            let kvm = self
                .vm
                .get_dirty_log(slot, len)
                .map_err(|source| DirtyError::Log { slot, source })?;
            // Read and cleared after KVM's log: a VMM write racing with this
            // call is seen now or next time, never lost.
            let vmm = (**r).bitmap().get_and_reset();
            for (w, (k, v)) in kvm
                .iter()
                .zip(vmm.iter().chain(std::iter::repeat(&0)))
                .enumerate()
            {
                let mut bits = k | v;
                while bits != 0 {
                    let b = u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    let off = (w as u64 * 64 + b) * PAGE_SIZE;
                    if off < size {
                        pages.push(gpa + off);
                    }
                }
            }
        }
        Ok(pages)
    }

    /// Turns dirty logging off (also on drop).
    pub fn stop(&mut self) -> Result<(), DirtyError> {
        if std::mem::take(&mut self.on) {
            set_memslots(&self.vm, &self.mem, 0)?;
        }
        Ok(())
    }
}

impl Drop for DirtyTracker {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!("cannot turn dirty logging off: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::memory::ram::{create_guest_memory, register_memslots};
    use vm_memory::Bytes;
    use vm_memory::GuestAddress;

    /// The VMM's own writes reach the dirty set through vm-memory's bitmap
    /// (guest writes through KVM's log are covered by the pre-copy
    /// migration test, which checks the guest's checksums).
    #[test]
    fn tracker_sees_vmm_writes_once_and_stops_logging() {
        let kvm = crate::kvm::open_kvm().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        let mem = create_guest_memory(64 << 20).unwrap();
        register_memslots(&vm, &mem).unwrap();
        mem.write_obj(1u64, GuestAddress(0x5000)).unwrap();
        let mut t = DirtyTracker::start(vm.clone(), mem.clone()).unwrap();
        assert!(t.take().unwrap().is_empty(), "writes before start do not count");
        mem.write_obj(2u64, GuestAddress(0x7ff8)).unwrap();
        mem.write_slice(&[3u8; 8], GuestAddress(0x20_0ffc)).unwrap();
        assert_eq!(t.take().unwrap(), vec![0x7000, 0x20_0000, 0x20_1000]);
        assert!(t.take().unwrap().is_empty(), "the log restarts empty");
        t.stop().unwrap();
        // Logging is off: KVM has no log for the slot any more.
        assert!(vm.get_dirty_log(0, 64 << 20).is_err());
    }
}
