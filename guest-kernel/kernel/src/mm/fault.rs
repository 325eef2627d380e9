//! The generic page-fault policy. The architecture turns its fault information
//! into [`FaultFlags`] and supplies a [`FaultMapper`]; this code decides.
//!
//! The outcome is an enum so that further outcomes (e.g. a Linux-style "retry"
//! when the page is not available yet) can be added without changing callers'
//! structure: callers must match exhaustively.

use super::vma::{AddressSpace, VmaKind};
use super::{NoMemory, Perms};
use crate::abi::layout::PAGE_SIZE;

/// What the hardware reported, in neutral form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultFlags {
    /// The page was present: a protection violation, not a missing page.
    pub present: bool,
    /// The access was a write.
    pub write: bool,
    /// The access came from user mode.
    pub user: bool,
    /// The access was an instruction fetch.
    pub instruction: bool,
}

/// How a fault was resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOutcome {
    /// A page is now mapped; re-execute the access.
    Mapped,
    /// Invalid access: the task gets killed (there are no signals yet).
    SigSegv,
    /// No frame left to map.
    Oom,
}

/// What the fault handler needs from the architecture and frame allocator.
pub trait FaultMapper {
    /// Maps a zero-filled frame at page `va` of the space with page-table `root`.
    fn map_zero_page(&mut self, root: u64, va: u64, perms: Perms) -> Result<(), NoMemory>;
    /// Maps the shared frame of global page `index` (allocated zero-filled on
    /// first use by any task) at page `va`.
    fn map_shared_page(&mut self, root: u64, va: u64, index: u64, perms: Perms) -> Result<(), NoMemory>;
}

/// Handles a fault at `addr` in `space`.
pub fn handle(space: &AddressSpace, addr: u64, flags: FaultFlags, mapper: &mut impl FaultMapper) -> FaultOutcome {
    let Some(vma) = space.find(addr) else {
        return FaultOutcome::SigSegv;
    };
    let perms = vma.perms;
    let allowed = (!flags.write || perms.write) && (!flags.instruction || perms.exec) && (!flags.user || perms.user);
    // A present page faults only on a protection violation (no copy-on-write yet).
    if flags.present || !allowed {
        return FaultOutcome::SigSegv;
    }
    let page = addr & !(PAGE_SIZE - 1);
    let mapped = match vma.kind {
        VmaKind::AnonZero => mapper.map_zero_page(space.root, page, perms),
        VmaKind::Shared { first_page } => {
            mapper.map_shared_page(space.root, page, first_page + (page - vma.start) / PAGE_SIZE, perms)
        }
        // Mapped eagerly: a missing page there is not ours to fill.
        VmaKind::Image | VmaKind::Args => return FaultOutcome::SigSegv,
    };
    match mapped {
        Ok(()) => FaultOutcome::Mapped,
        Err(NoMemory) => FaultOutcome::Oom,
    }
}
