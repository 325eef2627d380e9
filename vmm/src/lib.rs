//! A minimal KVM VMM whose microVMs boot the bundled guest kernel.
//!
//! Layers, from the outside in: [`config`] (typed configuration, the one door for
//! the CLI, files and tests), [`vm`] (KVM VM, devices, controller), [`vcpu`]
//! (the vCPU state machine and kick), [`exit`] (what each KVM exit does),
//! [`loader`] and [`memory`] (guest image and RAM), [`arch`] (x86_64 entry state).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::cast_possible_truncation))]

pub mod arch;
pub mod bench;
pub mod config;
pub mod control;
pub mod controller;
pub mod exit;
pub mod guest;
pub mod lazy;
pub mod loader;
pub mod memory;
pub mod migration;
pub mod plot;
pub mod signals;
pub mod snapshot;
pub mod snapshot_source;
pub mod stress;
pub mod uffd_backend;
pub mod vcpu;
pub mod vm;

pub use config::{ConfigError, KernelSource, MemBackend, MemoryConfig, VmConfig};
pub use controller::{ControlError, PauseReport, RunningVm, VcpuPause, VmHandle};
pub use vm::{GuestEnd, RunOutcome, Vm, VmError, VmOptions};

/// Builds and runs a VM with `config` until it ends.
pub fn run_vm(config: &VmConfig, options: VmOptions) -> Result<RunOutcome, VmError> {
    Vm::new(config, options)?.run()
}
