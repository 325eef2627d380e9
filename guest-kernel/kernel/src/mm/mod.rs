//! Generic memory management: frames, kernel heap, address-space regions and the
//! page-fault policy. Architecture details (page-table format, error codes) stay
//! in arch; this code sees physical frames through the kernel's identity map.

pub mod fault;
pub mod frame;
pub mod heap;
pub mod shared;
pub mod vma;

/// No page frame left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoMemory;

/// Access rights of a mapping, in neutral form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms {
    pub write: bool,
    pub exec: bool,
    pub user: bool,
}
