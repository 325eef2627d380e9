//! The bundled guest: kernel and user program, built from `guest-kernel/` by the
//! build script and embedded in the binary.

/// The bundled guest kernel ELF.
pub static KERNEL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest-kernel.elf"));
/// The bundled user program ELF (boot module).
pub static USER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest-user.elf"));
