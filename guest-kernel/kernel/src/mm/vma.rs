//! A task's address space: its page-table root and its list of regions.

use alloc::vec::Vec;

use super::Perms;

/// What backs a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmaKind {
    /// Demand-zero anonymous memory (stack, work area): frames on first touch.
    AnonZero,
    /// The `shared=1` work area: global page `first_page + (va - start) / 4K` is
    /// backed by the frame in the table shared by all tasks (`mm::shared`).
    Shared { first_page: u64 },
    /// A segment of the user program, mapped eagerly by the loader.
    Image,
    /// The task's argument page, mapped eagerly.
    Args,
}

/// One region `[start, end)`, page aligned.
#[derive(Debug, Clone, Copy)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub perms: Perms,
    pub kind: VmaKind,
}

/// Why a region cannot be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmaError {
    /// Empty or unaligned range.
    BadRange,
    /// Overlaps an existing region.
    Overlap,
}

/// A user address space.
#[derive(Debug)]
pub struct AddressSpace {
    /// Architecture page-table root (physical address).
    pub root: u64,
    vmas: Vec<Vma>,
}

impl AddressSpace {
    /// An empty space with page-table root `root`.
    pub fn new(root: u64) -> Self {
        AddressSpace { root, vmas: Vec::new() }
    }

    /// Adds a region.
    pub fn add(&mut self, vma: Vma) -> Result<(), VmaError> {
        let page = crate::abi::layout::PAGE_SIZE;
        if vma.start >= vma.end || vma.start % page != 0 || vma.end % page != 0 {
            return Err(VmaError::BadRange);
        }
        if self.vmas.iter().any(|v| v.start < vma.end && vma.start < v.end) {
            return Err(VmaError::Overlap);
        }
        self.vmas.push(vma);
        Ok(())
    }

    /// The region containing `addr`. Newest first: the regions added last (the
    /// work area) take most faults.
    pub fn find(&self, addr: u64) -> Option<&Vma> {
        self.vmas.iter().rev().find(|v| v.start <= addr && addr < v.end)
    }
}
