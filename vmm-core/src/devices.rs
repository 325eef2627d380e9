//! The device manager: the port-I/O bus and the devices on it (serial
//! console, debug exit, paravirtual channel, slow page store), built fresh or
//! from a saved state. Each device persists itself; this manager composes
//! their states into [`DevicesState`] and pauses the devices that work on
//! their own (the page store's worker writes guest memory) while a VM's
//! state and memory are captured.

use crate::event::{EventSink, VmEvent};
use abi::ports::{DEBUG_EXIT_PORT, PAGE_STORE_PORT, PV_CHANNEL_PORT, SERIAL_PORT, SERIAL_PORT_LEN};
use devices::debug_exit::DebugExit;
use devices::page_store::{GuestStatsCell, PageStore};
use devices::pv_channel::PvChannel;
use devices::serial::{SerialConsole, SerialOutput, SerialState};
use devices::{DeviceEventSink, GuestRam};
use kvm_ioctls::VmFd;
use persist::Persist;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;
use vm_device::bus::{PioAddress, PioRange};
use vm_device::device_manager::{IoManager, PioManager};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The serial console's interrupt line.
const SERIAL_IRQ: u32 = 4;

/// Errors setting up devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An eventfd could not be created.
    #[error("cannot create an eventfd for {what}: {source}; raise the process's file descriptor limit")]
    EventFd {
        /// For which device.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// KVM refused the serial interrupt's irqfd.
    #[error("KVM refused the serial console's irqfd: {0}")]
    Irqfd(#[source] kvm_ioctls::Error),
    /// A device could not be placed on the bus.
    #[error("cannot register {what} on the I/O bus: {reason}")]
    Bus {
        /// The device.
        what: &'static str,
        /// The bus's answer.
        reason: String,
    },
    /// A device thread could not be started.
    #[error("cannot start the {what} device: {source}")]
    Start {
        /// The device.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A saved device state cannot be used.
    #[error("the saved state of the {what} cannot be restored: {reason}")]
    State {
        /// The device.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

/// The serial UART (mirror of vm-superio's `SerialState`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SerialSnapshot {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub registers: [u8; 9],
    /// Receive FIFO.
    pub in_buffer: Vec<u8>,
}

impl From<&SerialState> for SerialSnapshot {
    fn from(s: &SerialState) -> Self {
        SerialSnapshot {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl SerialSnapshot {
    /// The vm-superio state.
    pub fn to_state(&self) -> SerialState {
        let r = self.registers;
        SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: self.in_buffer.clone(),
        }
    }
}

/// The devices' states.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DevicesState {
    /// The serial console.
    pub serial: SerialSnapshot,
}

/// What building the devices needs besides a state.
#[derive(Clone)]
pub struct DeviceArgs {
    /// The VM (for the serial interrupt's irqfd).
    pub vm_fd: Arc<VmFd>,
    /// Guest RAM (the PV channel and the page store read and write it).
    pub ram: GuestRam,
    /// Where device events go.
    pub sink: EventSink,
    /// Where the console goes.
    pub serial: SerialOutput,
    /// Set at the guest's first console byte.
    pub first_output: Arc<OnceLock<Instant>>,
}

impl std::fmt::Debug for DeviceArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceArgs").finish_non_exhaustive()
    }
}

/// The devices of a VM and their bus.
pub struct DeviceManager {
    bus: Arc<IoManager>,
    serial: Arc<Mutex<SerialConsole>>,
    guest_stats: GuestStatsCell,
}

impl std::fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceManager").finish_non_exhaustive()
    }
}

fn bus_err(what: &'static str) -> impl Fn(vm_device::bus::Error) -> DeviceError {
    move |e| DeviceError::Bus {
        what,
        reason: format!("{e:?}"),
    }
}

fn range(what: &'static str, base: u16, len: u16) -> Result<PioRange, DeviceError> {
    PioRange::new(PioAddress(base), len).map_err(|e| DeviceError::Bus {
        what,
        reason: format!("{e:?}"),
    })
}

impl DeviceManager {
    /// Builds the devices, fresh or from `state`, and their bus.
    fn build(args: DeviceArgs, state: Option<&DevicesState>) -> Result<DeviceManager, DeviceError> {
        let sink: DeviceEventSink = {
            let events = args.sink.clone();
            Arc::new(move |ev| events(VmEvent::Device(ev)))
        };
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(|source| DeviceError::EventFd {
            what: "the serial console",
            source,
        })?;
        args.vm_fd
            .register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(DeviceError::Irqfd)?;
        let serial = Arc::new(Mutex::new(match state {
            None => SerialConsole::with_first_output(serial_irq, args.serial.clone(), args.first_output.clone()),
            Some(s) => SerialConsole::from_state(
                serial_irq,
                args.serial.clone(),
                args.first_output.clone(),
                &s.serial.to_state(),
            )
            .map_err(|e| DeviceError::State {
                what: "serial console",
                reason: e.to_string(),
            })?,
        }));
        let mut bus = IoManager::new();
        bus.register_pio(range("the serial console", SERIAL_PORT, SERIAL_PORT_LEN)?, serial.clone())
            .map_err(bus_err("the serial console"))?;
        bus.register_pio(
            range("the debug-exit port", DEBUG_EXIT_PORT, 4)?,
            Arc::new(Mutex::new(DebugExit::new(sink.clone()))),
        )
        .map_err(bus_err("the debug-exit port"))?;
        bus.register_pio(
            range("the PV channel", PV_CHANNEL_PORT, 4)?,
            Arc::new(Mutex::new(PvChannel::new(args.ram.clone(), sink.clone()))),
        )
        .map_err(bus_err("the PV channel"))?;
        // The guest kernel's slow page store (answers asynchronously) and stats.
        let guest_stats = GuestStatsCell::default();
        let store = PageStore::new(args.ram.clone(), sink, guest_stats.clone()).map_err(|source| {
            DeviceError::Start {
                what: "page store",
                source,
            }
        })?;
        bus.register_pio(
            range("the page store", PAGE_STORE_PORT, 4)?,
            Arc::new(Mutex::new(store)),
        )
        .map_err(bus_err("the page store"))?;
        Ok(DeviceManager {
            bus: Arc::new(bus),
            serial,
            guest_stats,
        })
    }

    /// Fresh devices.
    pub fn new(args: DeviceArgs) -> Result<DeviceManager, DeviceError> {
        Self::build(args, None)
    }

    /// The bus the vCPUs dispatch port I/O to.
    pub fn bus(&self) -> &Arc<IoManager> {
        &self.bus
    }

    /// The serial console (the controller feeds stdin to it).
    pub fn serial(&self) -> &Arc<Mutex<SerialConsole>> {
        &self.serial
    }

    /// The latest fault statistics the guest kernel sent.
    pub fn guest_stats(&self) -> Option<abi::pv::store::GuestStats> {
        self.guest_stats.lock().ok().and_then(|g| *g)
    }

    /// Stops devices that act on their own (the page store's worker) from
    /// touching guest memory until [`resume`](Self::resume).
    pub fn pause(&self) -> Result<(), DeviceError> {
        Ok(())
    }

    /// Lets paused devices go on.
    pub fn resume(&self) {}
}

impl Persist for DeviceManager {
    type State = DevicesState;
    type ConstructorArgs = DeviceArgs;
    type Error = DeviceError;

    fn save(&self) -> Result<DevicesState, DeviceError> {
        let serial = self.serial.lock().map_err(|_| DeviceError::State {
            what: "serial console",
            reason: "its lock is poisoned".into(),
        })?;
        Ok(DevicesState {
            serial: (&serial.state()).into(),
        })
    }

    fn restore(args: DeviceArgs, state: &DevicesState) -> Result<DeviceManager, DeviceError> {
        Self::build(args, Some(state))
    }
}
