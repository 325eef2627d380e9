//! What the mechanism tells its owner, and how: devices, vCPUs and the
//! memory manager post [`VmEvent`]s to one [`EventSink`] (the controller's
//! channel). Posting never blocks, so it is safe on a vCPU thread inside a
//! port write and on the userfault handler thread.

use crate::vcpu::VcpuStopped;
use devices::DeviceEvent;
use std::sync::Arc;

/// Something the owner of a VM must act on.
#[derive(Debug, Clone)]
pub enum VmEvent {
    /// A device event (guest exit, start of the secondary vCPUs, a report...).
    Device(DeviceEvent),
    /// A vCPU stopped on its own (triple fault, emulator error...).
    VcpuStopped(VcpuStopped),
    /// The memory manager could not serve guest memory.
    Memory(MemoryEvent),
}

/// A failure of lazily served or externally served guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryEvent {
    /// A page source failed for a page (the page was not zero-filled; the
    /// faulting vCPU stays blocked until the source is repaired).
    SourceFailed(String),
    /// A userfault handler thread stopped: pages can no longer be served.
    HandlerStopped(String),
    /// The external page-fault handler attached as `link` is gone (its
    /// connection closed, its process or its connection's holder ended):
    /// nobody serves the userfaultfd until another one is attached.
    ExternalHandlerLost {
        /// Which attachment (the owner numbers them; a late event of a
        /// replaced one is ignored).
        link: u64,
        /// What was seen, in words.
        reason: String,
    },
}

/// Where the mechanism posts its events. Must not block.
pub type EventSink = Arc<dyn Fn(VmEvent) + Send + Sync>;
