//! Dirty tracking with async userfaultfd write protection
//! (`UFFD_FEATURE_WP_ASYNC`, Linux 6.7) and `PAGEMAP_SCAN`: an alternative
//! to KVM's dirty log for pre-copy (`--dirty-tracking uffd-wp`).
//!
//! Guest RAM is registered in WP mode with a userfaultfd of its own opened
//! with `WP_ASYNC | WP_UNPOPULATED` and write-protected whole. A write to a
//! protected page (by a vCPU through KVM, or by any VMM thread: the VMM's own
//! writes count with no bitmap of their own) is resolved by the kernel
//! itself, with no event and no handler: the page is unprotected and counts
//! as written. [`WpDirtyTracker::take`] is one `PAGEMAP_SCAN` with
//! `PM_SCAN_WP_MATCHING`: it reports the written pages and protects them
//! again, atomically per page.
//!
//! Coexistence: a range belongs to one userfaultfd, and WP_ASYNC is a
//! property of the whole descriptor. So this tracker needs RAM in plain
//! anonymous memory: a lazily served VM's RAM is registered with the retry
//! core's MISSING uffd (whose WP faults must stay synchronous for live
//! snapshots), and [`WpDirtyTracker::start`] refuses it (use the KVM log
//! there). A live snapshot cannot run during a pre-copy (the controller
//! refuses it), so the two never share RAM.

use super::dirty::DirtyError;
use ::memory::wp::{self, category, PagemapScan, ScanQuery};
use ::memory::{Features, Uffd};
use abi::layout::PAGE_SIZE;
use devices::GuestRam;
use std::sync::Arc;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

/// Errors of uffd-WP dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum WpDirtyError {
    /// The uffd could not be set up (kernel too old, or RAM already
    /// registered with another userfaultfd).
    #[error("cannot track dirty pages with async userfaultfd write protection: {0}; it needs Linux >= 6.7 and guest memory in plain anonymous memory (not lazily served): use --dirty-tracking kvm")]
    Uffd(#[from] ::memory::UffdError),
    /// PAGEMAP_SCAN failed.
    #[error("PAGEMAP_SCAN of guest memory failed: {0}; use --dirty-tracking kvm")]
    Scan(#[source] std::io::Error),
    /// No userfaultfd for it was made before the sandbox.
    #[error(
        "cannot track dirty pages with async userfaultfd write protection: {0}; use --dirty-tracking kvm"
    )]
    Unavailable(String),
}

/// Dirty tracking with async uffd-WP (see the module documentation).
/// Tracking stops on drop.
#[derive(Debug)]
pub struct WpDirtyTracker {
    uffd: Arc<Uffd>,
    scan: PagemapScan,
    /// `(host, len, gpa)` per region.
    regions: Vec<(u64, u64, u64)>,
}

impl WpDirtyTracker {
    /// Protects all of `mem`; nothing counts as written before this call.
    /// Makes its own userfaultfd: not on a sandboxed thread (see
    /// [`start_with`](Self::start_with)).
    pub fn start(mem: &GuestRam) -> Result<WpDirtyTracker, WpDirtyError> {
        let uffd = Uffd::new(
            wp::PAGEFAULT_FLAG_WP | wp::WP_ASYNC | wp::WP_UNPOPULATED,
            Features::NONE,
        )?;
        Self::start_with(Arc::new(uffd), mem)
    }

    /// As [`start`](Self::start) with `uffd`, negotiated with `WP_ASYNC |
    /// WP_UNPOPULATED` and registered with nothing (the memory manager's
    /// [`WpUse::AsyncDirty`](super::WpUse) one, made before the sandbox).
    pub fn start_with(uffd: Arc<Uffd>, mem: &GuestRam) -> Result<WpDirtyTracker, WpDirtyError> {
        let regions: Vec<(u64, u64, u64)> = mem
            .iter()
            .map(|r| (r.as_ptr() as u64, r.len(), r.start_addr().raw_value()))
            .collect();
        for &(host, len, _) in &regions {
            uffd.register(host, len, wp::REGISTER_WP)?;
            wp::write_protect(&uffd, host, len, true, false)?;
        }
        let scan = PagemapScan::open().map_err(WpDirtyError::Scan)?;
        Ok(WpDirtyTracker { uffd, scan, regions })
    }

    /// The guest-physical addresses of the pages written since the last
    /// call (or [`start`](Self::start)), ascending; they are protected again.
    pub fn take(&self) -> Result<Vec<u64>, WpDirtyError> {
        let mut pages = Vec::new();
        let mut found = Vec::new();
        let q = ScanQuery {
            flags: wp::PM_SCAN_WP_MATCHING | wp::PM_SCAN_CHECK_WPASYNC,
            required: category::WRITTEN,
            report: category::WRITTEN,
            ..Default::default()
        };
        for &(host, len, gpa) in &self.regions {
            found.clear();
            self.scan
                .scan(host, host + len, q, &mut found)
                .map_err(WpDirtyError::Scan)?;
            for r in &found {
                let mut a = r.start;
                while a < r.end {
                    pages.push(gpa + (a - host));
                    a += PAGE_SIZE;
                }
            }
        }
        Ok(pages)
    }
}

impl Drop for WpDirtyTracker {
    fn drop(&mut self) {
        for &(host, len, _) in &self.regions {
            let _ = self.uffd.unregister(host, len);
        }
    }
}

/// The dirty tracker of a pre-copy: KVM's log or async uffd-WP.
#[derive(Debug)]
pub enum AnyDirtyTracker {
    /// KVM's dirty log plus vm-memory's bitmaps.
    Kvm(super::DirtyTracker),
    /// Async uffd write protection.
    UffdWp(WpDirtyTracker),
}

impl AnyDirtyTracker {
    /// Pages written since the last call, ascending.
    pub fn take(&self) -> Result<Vec<u64>, DirtyError> {
        match self {
            AnyDirtyTracker::Kvm(t) => t.take(),
            AnyDirtyTracker::UffdWp(t) => t.take().map_err(DirtyError::UffdWp),
        }
    }

    /// Stops tracking (also on drop).
    pub fn stop(&mut self) -> Result<(), DirtyError> {
        match self {
            AnyDirtyTracker::Kvm(t) => t.stop(),
            AnyDirtyTracker::UffdWp(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::memory::ram::create_guest_memory;
    use vm_memory::{Bytes, GuestAddress};

    /// The VMM's own writes are counted (guest writes through KVM are
    /// covered by the pre-copy migration test with `uffd-wp`).
    #[test]
    fn uffd_wp_tracker_sees_each_write_once() {
        let mem = create_guest_memory(64 << 20).unwrap();
        mem.write_obj(1u64, GuestAddress(0x5000)).unwrap();
        let t = WpDirtyTracker::start(&mem).unwrap();
        assert!(t.take().unwrap().is_empty(), "writes before start do not count");
        mem.write_obj(2u64, GuestAddress(0x7ff8)).unwrap();
        mem.write_slice(&[3u8; 8], GuestAddress(0x20_0ffc)).unwrap();
        assert_eq!(t.take().unwrap(), vec![0x7000, 0x20_0000, 0x20_1000]);
        assert!(t.take().unwrap().is_empty(), "protected again");
        mem.write_obj(4u64, GuestAddress(0x7000)).unwrap();
        assert_eq!(t.take().unwrap(), vec![0x7000]);
    }
}
