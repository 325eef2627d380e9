//! The mechanism of the VMM, below the orchestration (`vmm`): it knows no
//! file format, socket or command line.
//!
//! - [`config`]: the typed configuration, the one door for every caller;
//! - [`kvm`]: `/dev/kvm`, the VM and its VM-wide state;
//! - [`memory`]: the memory manager (guest RAM and its backing: anonymous,
//!   lazily served through the retry core, or an external handler);
//! - [`devices`]: the device manager;
//! - [`vcpu`]: the vCPU state machine, exits, kicks, state, all vCPUs;
//! - [`loader`], [`arch`], [`guest`]: the guest image and its entry state;
//! - [`state`]: a VM's state, composed from its components' (`persist`);
//! - [`event`]: what the mechanism tells its owner;
//! - [`vm`]: the VM, built in phases ([`vm::Boot`], [`vm::MemoryPlan`]).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::cast_possible_truncation))]

pub mod arch;
pub mod config;
pub mod devices;
pub mod event;
/// Reading files a user names (kernel images, configs, snapshot parts) safely.
pub use ::memory::files;
pub mod guest;
pub mod kvm;
pub mod loader;
pub mod memory;
pub mod placement;
pub mod state;
pub mod vcpu;
pub mod vm;

pub use config::{
    ConfigError, FaultMode, HugePageSize, KernelSource, MemBackend, MemBacking, MemoryConfig, VmConfig,
};
pub use event::{EventSink, MemoryEvent, VmEvent};
pub use state::VmState;
pub use vm::{Boot, BuildOptions, MemoryPlan, Vm, VmError};
