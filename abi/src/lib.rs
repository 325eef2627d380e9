//! The host-guest ABI, in one place for both sides.
//!
//! The VMM (`std`, feature `host`) and the bundled guest kernel (`no_std`,
//! target `x86_64-unknown-none`) both depend on this crate, so a port number, a
//! structure layout or an exit code can only change for both at once.
//!
//! - [`layout`]: every guest-physical address the VMM and guest agree on, and the
//!   guest-virtual layout of user tasks.
//! - [`boot`]: the boot protocol ([`boot::BootInfo`] and the entry state).
//! - [`ports`]: the I/O ports of the VMM's devices.
//! - [`pv`]: the paravirtual channel (requests the guest kernel sends the VMM).
//! - [`exit`]: the exit codes the guest writes to the debug-exit port.
//! - [`workload`]: the built-in workloads: command-line parsing, the page order
//!   and the reference checksum both sides compute.
//! - [`syscall`]: the guest's system-call numbers and the user task entry
//!   arguments, shared by the guest kernel and its user programs.
#![cfg_attr(not(any(feature = "host", test)), no_std)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::cast_possible_truncation))]

pub mod boot;
pub mod exit;
pub mod layout;
pub mod ports;
pub mod pv;
pub mod syscall;
pub mod workload;

/// Implements `vm_memory::ByteValued` for plain-data ABI structures on the host.
macro_rules! byte_valued {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "host")]
            // SAFETY: the type is `repr(C)`, made only of integers and arrays of
            // integers, has no padding (checked by a `size_of` assertion next to its
            // definition) and every bit pattern is a valid value.
            unsafe impl vm_memory::ByteValued for $t {}
        )*
    };
}
pub(crate) use byte_valued;
