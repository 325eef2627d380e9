//! What a vCPU does with each KVM exit, as a free function of the exit and the
//! I/O bus, so it is unit tested without KVM.

use std::fmt;
use vm_device::bus::PioAddress;
use vm_device::device_manager::{IoManager, PioManager};

/// A KVM exit, reduced to what the VMM acts on.
#[derive(Debug)]
pub enum Exit<'a> {
    /// `in` from a port; `data` is filled in for the guest.
    IoIn {
        /// Port.
        port: u16,
        /// Bytes the guest reads.
        data: &'a mut [u8],
    },
    /// `out` to a port.
    IoOut {
        /// Port.
        port: u16,
        /// Bytes the guest wrote.
        data: &'a [u8],
    },
    /// MMIO read of an address no device claims (there are no MMIO devices yet).
    MmioRead {
        /// Guest-physical address.
        addr: u64,
        /// Bytes the guest reads.
        data: &'a mut [u8],
    },
    /// MMIO write to an address no device claims.
    MmioWrite {
        /// Guest-physical address.
        addr: u64,
    },
    /// KVM_RUN returned EINTR or `immediate_exit` was set: a kick.
    Interrupted,
    /// HLT reached user space (only without an in-kernel LAPIC).
    Hlt,
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    Shutdown,
    /// KVM_EXIT_INTERNAL_ERROR with its suberror (1 = the emulator refused an instruction).
    InternalError {
        /// `kvm_run.internal.suberror`.
        suberror: u32,
    },
    /// KVM_EXIT_FAIL_ENTRY: the vCPU state was rejected.
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// KVM_EXIT_SYSTEM_EVENT (reset, shutdown, crash).
    SystemEvent {
        /// Event type.
        kind: u32,
    },
    /// Anything else, named.
    Other(String),
}

/// Why a vCPU stopped running the guest on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// Triple fault.
    TripleFault,
    /// The instruction emulator gave up.
    InternalError {
        /// Suberror.
        suberror: u32,
    },
    /// VM entry failed.
    FailEntry {
        /// Hardware reason.
        reason: u64,
    },
    /// A system event from the guest.
    SystemEvent {
        /// Event type.
        kind: u32,
    },
    /// The guest halted with nothing that can wake it.
    Halted,
    /// An exit the VMM does not handle.
    Unexpected(String),
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::TripleFault => write!(f, "triple fault (KVM_EXIT_SHUTDOWN)"),
            StopReason::InternalError { suberror: 1 } => {
                write!(
                    f,
                    "KVM internal error, suberror 1: the instruction emulator refused an instruction"
                )
            }
            StopReason::InternalError { suberror } => write!(f, "KVM internal error, suberror {suberror}"),
            StopReason::FailEntry { reason } => write!(f, "VM entry failed (hardware reason {reason:#x})"),
            StopReason::SystemEvent { kind } => write!(f, "system event {kind}"),
            StopReason::Halted => write!(f, "halted with no way to wake up"),
            StopReason::Unexpected(s) => write!(f, "unexpected exit {s}"),
        }
    }
}

/// What the vCPU loop does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitAction {
    /// Re-enter the guest.
    Continue,
    /// A kick: look at pending requests, then re-enter.
    Interrupted,
    /// Stop this vCPU and report why.
    Stop(StopReason),
}

/// Handles one exit. Port I/O goes to `bus`; an access to a port no device claims
/// reads as all ones and writes are dropped, as on real hardware.
pub fn handle_exit(exit: Exit<'_>, bus: &IoManager) -> ExitAction {
    match exit {
        Exit::IoIn { port, data } => {
            if bus.pio_read(PioAddress(port), data).is_err() {
                data.fill(0xff);
            }
            ExitAction::Continue
        }
        Exit::IoOut { port, data } => {
            if bus.pio_write(PioAddress(port), data).is_err() {
                tracing::debug!("write to unclaimed port {port:#x}: {data:x?}");
            }
            ExitAction::Continue
        }
        Exit::MmioRead { addr, data } => {
            tracing::debug!("read of unclaimed MMIO address {addr:#x}");
            data.fill(0xff);
            ExitAction::Continue
        }
        Exit::MmioWrite { addr } => {
            tracing::debug!("write to unclaimed MMIO address {addr:#x}");
            ExitAction::Continue
        }
        Exit::Interrupted => ExitAction::Interrupted,
        Exit::Hlt => ExitAction::Stop(StopReason::Halted),
        Exit::Shutdown => ExitAction::Stop(StopReason::TripleFault),
        Exit::InternalError { suberror } => ExitAction::Stop(StopReason::InternalError { suberror }),
        Exit::FailEntry { reason } => ExitAction::Stop(StopReason::FailEntry { reason }),
        Exit::SystemEvent { kind } => ExitAction::Stop(StopReason::SystemEvent { kind }),
        Exit::Other(name) => ExitAction::Stop(StopReason::Unexpected(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vm_device::bus::{PioAddressOffset, PioRange};
    use vm_device::MutDevicePio;

    #[derive(Default)]
    struct Latch(Vec<(u16, Vec<u8>)>);

    impl MutDevicePio for Latch {
        fn pio_read(&mut self, _b: PioAddress, off: PioAddressOffset, data: &mut [u8]) {
            data.fill(off as u8 + 0x40);
        }
        fn pio_write(&mut self, _b: PioAddress, off: PioAddressOffset, data: &[u8]) {
            self.0.push((off, data.to_vec()));
        }
    }

    fn bus() -> (IoManager, Arc<Mutex<Latch>>) {
        let dev = Arc::new(Mutex::new(Latch::default()));
        let mut bus = IoManager::new();
        bus.register_pio(PioRange::new(PioAddress(0x3f8), 8).unwrap(), dev.clone())
            .unwrap();
        (bus, dev)
    }

    #[test]
    fn port_io_reaches_the_device() {
        let (bus, dev) = bus();
        assert_eq!(
            handle_exit(
                Exit::IoOut {
                    port: 0x3fa,
                    data: &[7]
                },
                &bus
            ),
            ExitAction::Continue
        );
        assert_eq!(dev.lock().unwrap().0, [(2, vec![7])]);
        let mut b = [0u8; 1];
        assert_eq!(
            handle_exit(
                Exit::IoIn {
                    port: 0x3fd,
                    data: &mut b
                },
                &bus
            ),
            ExitAction::Continue
        );
        assert_eq!(b, [0x45]);
    }

    #[test]
    fn unclaimed_ports_read_all_ones() {
        let (bus, _) = bus();
        let mut b = [0u8; 2];
        assert_eq!(
            handle_exit(
                Exit::IoIn {
                    port: 0x60,
                    data: &mut b
                },
                &bus
            ),
            ExitAction::Continue
        );
        assert_eq!(b, [0xff, 0xff]);
        assert_eq!(
            handle_exit(
                Exit::IoOut {
                    port: 0x80,
                    data: &[1]
                },
                &bus
            ),
            ExitAction::Continue
        );
    }

    #[test]
    fn fatal_exits_stop_the_vcpu_with_a_reason() {
        let (bus, _) = bus();
        assert_eq!(
            handle_exit(Exit::Shutdown, &bus),
            ExitAction::Stop(StopReason::TripleFault)
        );
        let a = handle_exit(Exit::InternalError { suberror: 1 }, &bus);
        let ExitAction::Stop(r) = a else { panic!("{a:?}") };
        assert!(r.to_string().contains("emulator refused"));
        assert_eq!(handle_exit(Exit::Interrupted, &bus), ExitAction::Interrupted);
    }
}
