//! What a snapshot's `state.json` and a migration's state message carry:
//! the mechanism's [`VmState`] and the controller's own state. Defined here,
//! below the snapshot, migration and controller modules, so each can use it
//! without depending on the others.

use abi::pv::WorkloadReport;
use serde::{Deserialize, Serialize};
use vmm_core::VmState;

/// Everything of a VM but its memory contents.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedVm {
    /// The mechanism: configuration, memory layout, KVM, vCPUs, devices.
    pub vm: VmState,
    /// The controller.
    pub controller: ControllerState,
}

/// The controller's state: what the guest reported before the save.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ControllerState {
    /// Workload reports received, by arrival.
    pub reports: Vec<WorkloadReport>,
}
