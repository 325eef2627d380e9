//! The KVM VM: opening `/dev/kvm` with the capabilities the VMM relies on,
//! creating the VM with its in-kernel irqchip and PIT, and the VM-wide KVM
//! state (PIC, IOAPIC, PIT, kvmclock) as a persistable component.

use abi::layout::KVM_TSS_START;
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use persist::Persist;
use serde::{Deserialize, Serialize};

/// Errors opening KVM or creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// /dev/kvm is missing.
    #[error("cannot open /dev/kvm: it does not exist; this machine has no KVM (load the kvm module, or run on a host with virtualization)")]
    NoKvm,
    /// /dev/kvm is not accessible.
    #[error("cannot open /dev/kvm: permission denied; run as root or add your user to the `kvm` group")]
    Permission,
    /// /dev/kvm failed otherwise.
    #[error("cannot open /dev/kvm: {0}")]
    Open(#[source] kvm_ioctls::Error),
    /// KVM API version mismatch.
    #[error("KVM API version {0} is not supported (need 12); the host kernel is too old or unusual")]
    ApiVersion(i32),
    /// A needed capability is missing.
    #[error("KVM lacks the {0} capability; a Linux host of 4.14 or newer is needed")]
    MissingCap(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Ioctl {
        /// The operation.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Maps a KVM error to [`KvmError::Ioctl`].
pub fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { what, source }
}

/// Opens /dev/kvm and checks the API and the capabilities the VMM relies on.
pub fn open_kvm() -> Result<Kvm, KvmError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => KvmError::NoKvm,
        libc::EACCES | libc::EPERM => KvmError::Permission,
        _ => KvmError::Open(e),
    })?;
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(KvmError::ApiVersion(v));
    }
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

/// Creates a VM with the in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, KvmError> {
    let vm_fd = kvm.create_vm().map_err(kvm_err("VM creation"))?;
    let tss = usize::try_from(KVM_TSS_START).map_err(|_| KvmError::MissingCap("a 64-bit host"))?;
    vm_fd.set_tss_address(tss).map_err(kvm_err("TSS address setup"))?;
    vm_fd.create_irq_chip().map_err(kvm_err("irqchip creation"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd.create_pit2(pit).map_err(kvm_err("PIT creation"))?;
    Ok(vm_fd)
}

/// The VM-wide KVM state: PIC master, PIC slave, IOAPIC, PIT, kvmclock.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvmVmState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchip: Vec<kvm_irqchip>,
    /// PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: Option<kvm_clock_data>,
}

/// The VM file descriptor seen as a component (its irqchip, PIT and clock).
#[derive(Debug, Clone, Copy)]
pub struct KvmVmComponent<'a>(pub &'a VmFd);

impl<'a> Persist for KvmVmComponent<'a> {
    type State = KvmVmState;
    type ConstructorArgs = &'a VmFd;
    type Error = KvmError;

    fn save(&self) -> Result<KvmVmState, KvmError> {
        let mut irqchip = Vec::new();
        for id in [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC] {
            let mut chip = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.0.get_irqchip(&mut chip).map_err(kvm_err("irqchip read"))?;
            irqchip.push(chip);
        }
        let pit = self.0.get_pit2().map_err(kvm_err("PIT read"))?;
        Ok(KvmVmState {
            irqchip,
            pit,
            clock: self.0.get_clock().ok(),
        })
    }

    /// Writes the state into the VM (its irqchip and PIT already exist).
    fn restore(vm: &'a VmFd, state: &KvmVmState) -> Result<Self, KvmError> {
        for chip in &state.irqchip {
            vm.set_irqchip(chip).map_err(kvm_err("irqchip write"))?;
        }
        vm.set_pit2(&state.pit).map_err(kvm_err("PIT write"))?;
        if let Some(clock) = &state.clock {
            // Only the clock value: flags from the saving host may not apply here.
            let c = kvm_clock_data {
                clock: clock.clock,
                ..Default::default()
            };
            if let Err(e) = vm.set_clock(&c) {
                tracing::debug!("kvmclock not restored: {e}");
            }
        }
        Ok(KvmVmComponent(vm))
    }
}
