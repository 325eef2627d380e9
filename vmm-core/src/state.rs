//! The state of a whole VM, composed from the states its components save
//! through [`persist::Persist`]: the configuration, the memory manager's
//! layout, the VM-wide KVM state, each vCPU, which vCPUs the guest started,
//! and the devices. Guest memory contents are not part of it: the snapshot
//! and migration layers save and send them (so state can be captured in a
//! short pause and memory later).

use crate::config::{ConfigError, KernelSource, MemoryConfig, VmConfig};
use crate::devices::DevicesState;
use crate::kvm::KvmVmState;
use crate::memory::MemoryState;
use crate::vcpu::state::CpuState;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The configuration part of a VM's state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConfigState {
    /// Kernel file, `None` for the bundled kernel (not loaded again on restore).
    pub kernel: Option<PathBuf>,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM bytes.
    pub mem_size: u64,
    /// Kernel command line.
    pub cmdline: String,
}

impl From<&VmConfig> for ConfigState {
    fn from(c: &VmConfig) -> ConfigState {
        ConfigState {
            kernel: match &c.kernel {
                KernelSource::Bundled => None,
                KernelSource::File(p) => Some(p.clone()),
            },
            vcpus: c.vcpus,
            mem_size: c.mem_size,
            cmdline: c.cmdline.clone(),
        }
    }
}

impl ConfigState {
    /// The VM configuration, with guest RAM backed as `memory` says.
    pub fn config(&self, memory: MemoryConfig) -> Result<VmConfig, ConfigError> {
        let cfg = VmConfig {
            kernel: self
                .kernel
                .clone()
                .map_or(KernelSource::Bundled, KernelSource::File),
            vcpus: self.vcpus,
            mem_size: self.mem_size,
            cmdline: self.cmdline.clone(),
            memory,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Everything of a VM but its memory contents.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// The configuration.
    pub config: ConfigState,
    /// The memory manager (layout).
    pub memory: MemoryState,
    /// PIC, IOAPIC, PIT, kvmclock.
    pub kvm: KvmVmState,
    /// Per-vCPU state, by index.
    pub vcpus: Vec<CpuState>,
    /// vCPUs the guest had started (the others wait for `START_CPUS`).
    pub started: Vec<bool>,
    /// The devices.
    pub devices: DevicesState,
}

/// A state whose parts do not fit together.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct StateMismatch(pub String);

impl VmState {
    /// Checks that the parts fit together (counts, sizes, the configuration);
    /// the components check their own contents when restored.
    pub fn check(&self) -> Result<(), StateMismatch> {
        let n = self.config.vcpus as usize;
        if self.vcpus.len() != n || self.started.len() != n {
            return Err(StateMismatch(format!(
                "{n} vCPUs configured, {} vCPU states, {} start flags",
                self.vcpus.len(),
                self.started.len()
            )));
        }
        if self.kvm.irqchip.len() != 3 {
            return Err(StateMismatch(format!(
                "{} irqchip states instead of 3",
                self.kvm.irqchip.len()
            )));
        }
        if self.memory.mem_size != self.config.mem_size {
            return Err(StateMismatch(format!(
                "the memory layout is for {} bytes of RAM, the configuration for {}",
                self.memory.mem_size, self.config.mem_size
            )));
        }
        self.config
            .config(MemoryConfig::default())
            .map_err(|e| StateMismatch(format!("the saved configuration is invalid: {e}")))?;
        Ok(())
    }
}
