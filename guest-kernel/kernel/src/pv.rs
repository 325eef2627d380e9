//! The paravirtual channel to the VMM (abi::pv): a synchronous request whose
//! guest-physical address is written to a port.

use crate::abi::pv::{PvMessage, PvRequest};
use crate::arch::cpu;
use crate::abi::ports::PV_CHANNEL_PORT;

/// Sends a message and returns the status the VMM wrote (`abi::pv::status`).
pub fn send(msg: &PvMessage) -> u32 {
    let req = PvRequest::encode(msg);
    // The request lives on this CPU's boot stack or in kernel .bss: identity
    // mapped, below 16 MiB, so its virtual address is its physical address and
    // fits in 32 bits.
    let addr = &req as *const PvRequest as u64;
    cpu::outl(PV_CHANNEL_PORT, addr as u32);
    // The VMM completed the request before the `out` retired; read what it wrote.
    // SAFETY: `req` is a live, aligned local.
    unsafe { core::ptr::read_volatile(&req.status) }
}
