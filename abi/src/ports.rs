//! I/O ports of the VMM's devices. The guest kernel is the only guest code that
//! uses them (`in`/`out` from CPL3 raise #GP).

/// COM1, a 16550 UART: the guest console.
pub const SERIAL_PORT: u16 = 0x3F8;
/// Number of registers of the UART.
pub const SERIAL_PORT_LEN: u16 = 8;
/// Debug-exit port: a 32-bit `out` of an [`crate::exit::ExitCode`] ends the VM.
pub const DEBUG_EXIT_PORT: u16 = 0xF4;
/// Paravirtual channel doorbell: a 32-bit `out` of the guest-physical address of a
/// [`crate::pv::PvRequest`] (below 4 GiB) hands it to the VMM, which has completed
/// it (written `status`) when the `out` instruction retires.
pub const PV_CHANNEL_PORT: u16 = 0x510;
/// Page-store device (see [`crate::pv::store`]): a 32-bit `out` of the
/// guest-physical address of a [`crate::pv::PvRequest`] of a `store` kind. The
/// device acknowledges at once and answers reads later, asynchronously.
pub const PAGE_STORE_PORT: u16 = 0x518;
