//! The paravirtual channel to the VMM (abi::pv): a synchronous request whose
//! guest-physical address is written to a port. The page store and the
//! statistics use the same request format on their own port.

use crate::abi::ports::{PAGE_STORE_PORT, PV_CHANNEL_PORT};
use crate::abi::pv::{PvMessage, PvRequest};
use crate::arch::cpu;

/// Sends a message and returns the status the VMM wrote (`abi::pv::status`).
pub fn send(msg: &PvMessage) -> u32 {
    send_raw(PV_CHANNEL_PORT, PvRequest::encode(msg))
}

/// Sends a page-store request (`abi::pv::store`); returns the status.
pub fn send_store(kind: u32, args: [u64; 6]) -> u32 {
    send_raw(
        PAGE_STORE_PORT,
        PvRequest {
            kind,
            status: 0,
            args,
        },
    )
}

fn send_raw(port: u16, req: PvRequest) -> u32 {
    // The request lives on this CPU's kernel stack (kernel .bss): identity
    // mapped, below 16 MiB, so its virtual address is its physical address and
    // fits in 32 bits.
    let addr = &req as *const PvRequest as u64;
    cpu::outl(port, addr as u32);
    // The VMM completed the request before the `out` retired; read what it wrote.
    // SAFETY: `req` is a live, aligned local.
    unsafe { core::ptr::read_volatile(&req.status) }
}
