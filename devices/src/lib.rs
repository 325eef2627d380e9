//! Devices of the microVM: a 16550 serial console, a debug-exit port, the
//! paravirtual channel between the guest kernel and the VMM, and the slow page
//! store.
//!
//! Devices are port-I/O devices on a `vm_device::device_manager::IoManager`. They
//! never block a vCPU: what the VMM must act on (the guest asked to exit, to start
//! its other vCPUs, reported a result) leaves them as a [`DeviceEvent`] through a
//! [`DeviceEventSink`].
//!
//! Every device persists itself through [`persist::Persist`], stateless ones as
//! an empty state (a field added later then has its place in snapshots). The
//! page store, the one device that acts on its own (a worker thread writes guest
//! memory), must be paused through its [`page_store::PageStoreHandle`] before
//! it is saved, and stay paused until guest memory is saved.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::cast_possible_truncation))]

pub mod debug_exit;
pub mod page_store;
pub mod pv_channel;
pub mod serial;

use abi::pv::WorkloadReport;
use std::sync::Arc;

/// Guest RAM as the VMM maps it. Writes through vm-memory (devices, the
/// loader, a restore) set bits in a per-region dirty bitmap, which pre-copy
/// migration adds to KVM's dirty log of the guest's own writes.
pub type GuestRam = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// Something a device tells the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The guest wrote this exit code to the debug-exit port.
    GuestExit(u32),
    /// The guest kernel asks for its secondary vCPUs to be started.
    StartCpus,
    /// A user task reported a workload result.
    Report(WorkloadReport),
    /// The guest sent a request the VMM rejected (logged, the VM goes on).
    BadRequest(String),
    /// The guest reached its checkpoint and waits to be restored (the
    /// `faas` workload; sent once per VM).
    Checkpoint,
}

/// Where devices send their events (the VMM's controller).
pub type DeviceEventSink = Arc<dyn Fn(DeviceEvent) + Send + Sync>;
