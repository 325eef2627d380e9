//! The orchestration of the VMM, above the mechanism (`vmm_core`): the
//! snapshot format, live migration, the controller of a running VM, the
//! control socket, the external page-fault handler handshake, benchmarks and
//! stress. The `vmm` binary is the command line over it.
//!
//! - [`vm`]: building a VM (boot, restore, receive) and starting it;
//! - [`controller`]: the running VM's event loop and lifecycle;
//! - [`snapshot`]: the on-disk format and its page source;
//! - [`migration`]: transport, wire format, source and destination;
//! - [`receive`]: a migration destination, end to end;
//! - [`control`]: the control socket; [`uffd_handler`]: Firecracker's handshake;
//! - [`peercred`]: who is at the other end of a Unix socket (`SO_PEERCRED`);
//! - [`state`]: what snapshots and migrations carry;
//! - [`bench`], [`stress`]: measurements and seeded stress.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::cast_possible_truncation))]

pub mod bench;
pub mod config_file;
pub mod control;
pub mod controller;
pub mod migration;
pub mod peercred;
pub mod receive;
pub mod signals;
pub mod snapshot;
pub mod state;
pub mod stress;
pub mod uffd_handler;
pub mod vm;

pub use controller::{ControlError, GuestEnd, MemoryFaultPolicy, RunOutcome, RunningVm, VmHandle};
pub use vm::{run_vm, CustomSource, RestoreOptions, Vm, VmError, VmOptions};
pub use vmm_core::config::{self as config, ConfigError, KernelSource, MemBackend, MemoryConfig, VmConfig};
pub use vmm_core::vcpu::manager::{PauseReport, VcpuPause};

/// Exit codes of the `vmm` process.
pub use controller::outcome::{
    guest_exit_code, EXIT_BAD_RESULT, EXIT_CRASHED, EXIT_GUEST_BASE, EXIT_MEMORY_FAULT, EXIT_STOPPED,
    EXIT_TIMED_OUT, EXIT_VMM_ERROR,
};
/// The sandbox's modes, and the exit code of a VMM it stopped.
pub use sandbox::{SeccompMode, EXIT_SECCOMP};
/// The bundled guest (kernel and user program ELFs).
pub use vmm_core::guest;
