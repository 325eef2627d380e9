//! The device manager: the port-I/O bus and the devices on it (serial
//! console, debug exit, paravirtual channel, slow page store), built fresh or
//! from a saved state. Each device persists itself; this manager composes
//! their states into [`DevicesState`] and pauses the devices that work on
//! their own (the page store's worker writes guest memory) while a VM's
//! state and memory are captured.

use crate::event::{EventSink, VmEvent};
use abi::ports::{DEBUG_EXIT_PORT, PAGE_STORE_PORT, PV_CHANNEL_PORT, SERIAL_PORT, SERIAL_PORT_LEN};
use devices::debug_exit::{DebugExit, DebugExitArgs, DebugExitState};
use devices::page_store::{
    GuestStatsCell, PageStore, PageStoreArgs, PageStoreError, PageStoreHandle, PageStoreState,
    DEFAULT_PAUSE_TIMEOUT,
};
use devices::pv_channel::{PvChannel, PvChannelArgs, PvChannelState};
use devices::serial::{SerialConsole, SerialConsoleArgs, SerialConsoleState, SerialError, SerialOutput};
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
    /// The page store failed (start, pause, save or restore).
    #[error("page store: {0}")]
    PageStore(#[from] PageStoreError),
    /// The serial console's saved state cannot be restored.
    #[error("serial console: {0}")]
    Serial(#[from] SerialError),
    /// A device's lock is poisoned (a thread panicked while holding it).
    #[error("the {0} is unusable: a thread panicked while using it")]
    Poisoned(&'static str),
}

/// The devices' states, each saved by its device.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesState {
    /// The serial console.
    pub serial: SerialConsoleState,
    /// The debug-exit port.
    pub debug_exit: DebugExitState,
    /// The paravirtual channel.
    pub pv_channel: PvChannelState,
    /// The slow page store: its completion area, reads in flight (with their
    /// remaining delays), held pages and reads, the guest's last statistics.
    pub page_store: PageStoreState,
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
    /// How device threads (the page store's worker) are sandboxed.
    pub seccomp: sandbox::SeccompMode,
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
    debug_exit: Arc<Mutex<DebugExit>>,
    pv_channel: Arc<Mutex<PvChannel>>,
    page_store: Arc<Mutex<PageStore>>,
    /// Pauses the page store's worker without taking the device's lock.
    store_handle: PageStoreHandle,
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

/// A device whose save and restore cannot fail.
fn never(e: std::convert::Infallible) -> DeviceError {
    match e {}
}

fn locked<'a, T>(m: &'a Mutex<T>, what: &'static str) -> Result<std::sync::MutexGuard<'a, T>, DeviceError> {
    m.lock().map_err(|_| DeviceError::Poisoned(what))
}

impl DeviceManager {
    /// Builds the devices, fresh or from `state`, and their bus.
    fn build(args: DeviceArgs, state: Option<&DevicesState>) -> Result<DeviceManager, DeviceError> {
        let sink: DeviceEventSink = {
            let events = args.sink.clone();
            Arc::new(move |ev| events(VmEvent::Device(ev)))
        };
        let irq = EventFd::new(EFD_NONBLOCK).map_err(|source| DeviceError::EventFd {
            what: "the serial console",
            source,
        })?;
        args.vm_fd
            .register_irqfd(&irq, SERIAL_IRQ)
            .map_err(DeviceError::Irqfd)?;
        let serial_args = SerialConsoleArgs {
            irq,
            out: args.serial.clone(),
            first_output: args.first_output.clone(),
        };
        let debug_args = DebugExitArgs { sink: sink.clone() };
        let pv_args = PvChannelArgs {
            mem: args.ram.clone(),
            sink: sink.clone(),
        };
        // The guest kernel's slow page store (answers asynchronously) and stats.
        let guest_stats = GuestStatsCell::default();
        let store_args = PageStoreArgs {
            mem: args.ram.clone(),
            sink,
            stats: guest_stats.clone(),
            start_paused: false,
            seccomp: args.seccomp,
        };
        let (serial, debug_exit, pv_channel, page_store) = match state {
            None => (
                SerialConsole::with_first_output(serial_args.irq, serial_args.out, serial_args.first_output),
                DebugExit::new(debug_args.sink),
                PvChannel::new(pv_args.mem, pv_args.sink),
                PageStore::new(
                    store_args.mem,
                    store_args.sink,
                    store_args.stats,
                    store_args.seccomp,
                )?,
            ),
            Some(s) => (
                SerialConsole::restore(serial_args, &s.serial)?,
                DebugExit::restore(debug_args, &s.debug_exit).map_err(never)?,
                PvChannel::restore(pv_args, &s.pv_channel).map_err(never)?,
                PageStore::restore(store_args, &s.page_store)?,
            ),
        };
        let store_handle = page_store.handle();
        let serial = Arc::new(Mutex::new(serial));
        let debug_exit = Arc::new(Mutex::new(debug_exit));
        let pv_channel = Arc::new(Mutex::new(pv_channel));
        let page_store = Arc::new(Mutex::new(page_store));
        let mut bus = IoManager::new();
        bus.register_pio(
            range("the serial console", SERIAL_PORT, SERIAL_PORT_LEN)?,
            serial.clone(),
        )
        .map_err(bus_err("the serial console"))?;
        bus.register_pio(
            range("the debug-exit port", DEBUG_EXIT_PORT, 4)?,
            debug_exit.clone(),
        )
        .map_err(bus_err("the debug-exit port"))?;
        bus.register_pio(range("the PV channel", PV_CHANNEL_PORT, 4)?, pv_channel.clone())
            .map_err(bus_err("the PV channel"))?;
        bus.register_pio(range("the page store", PAGE_STORE_PORT, 4)?, page_store.clone())
            .map_err(bus_err("the page store"))?;
        Ok(DeviceManager {
            bus: Arc::new(bus),
            serial,
            debug_exit,
            pv_channel,
            page_store,
            store_handle,
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
    /// touching guest memory until [`resume`](Self::resume); waits for a
    /// write in progress (bounded: a clear error names it if it is stuck).
    pub fn pause(&self) -> Result<(), DeviceError> {
        Ok(self.store_handle.pause(DEFAULT_PAUSE_TIMEOUT)?)
    }

    /// Lets paused devices go on (one resume per successful pause).
    pub fn resume(&self) {
        self.store_handle.resume();
    }
}

impl Persist for DeviceManager {
    type State = DevicesState;
    type ConstructorArgs = DeviceArgs;
    type Error = DeviceError;

    /// The devices must be paused ([`DeviceManager::pause`]) and stay so
    /// until guest memory is saved too.
    fn save(&self) -> Result<DevicesState, DeviceError> {
        Ok(DevicesState {
            serial: locked(&self.serial, "serial console")?.save()?,
            debug_exit: locked(&self.debug_exit, "debug-exit port")?
                .save()
                .map_err(never)?,
            pv_channel: locked(&self.pv_channel, "PV channel")?.save().map_err(never)?,
            page_store: locked(&self.page_store, "page store")?.save()?,
        })
    }

    fn restore(args: DeviceArgs, state: &DevicesState) -> Result<DeviceManager, DeviceError> {
        Self::build(args, Some(state))
    }
}
