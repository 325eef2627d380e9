//! Generic memory management: frames, kernel heap, the fault glue from the trap
//! to the core (`fault.rs`), the fault core (regions and `handle_mm_fault`,
//! `core.rs`), the slow page store. Architecture details (page-table format,
//! error codes) stay in arch; this code sees physical frames through the
//! kernel's identity map.

pub mod core;
pub mod fault;
pub mod frame;
pub mod heap;
pub mod shared;
pub mod store;

pub use self::core::{NoMemory, Perms};

/// Read-write user memory.
pub const USER_RW: Perms = Perms {
    write: true,
    exec: false,
    user: true,
};
/// Read-only user memory.
pub const USER_RO: Perms = Perms {
    write: false,
    exec: false,
    user: true,
};

/// Regions, as the rest of the kernel names them.
pub mod vma {
    pub use super::core::{AddressSpace, Vma, VmaError, VmaKind};
}
