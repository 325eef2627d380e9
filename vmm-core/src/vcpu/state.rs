//! The KVM state of one vCPU as a persistable component: registers, FPU and
//! XSAVE, LAPIC, MP state, pending events and MSRs. Saving runs on the vCPU's
//! own thread (`VcpuRequest::SaveState`), after [`complete_pending_io`].

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use persist::Persist;
use serde::{Deserialize, Serialize};

/// Errors saving or restoring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM ioctl failed.
    #[error("KVM {what} failed while {doing} vCPU state: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// `saving` or `restoring`.
        doing: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The MSR list could not be built.
    #[error("cannot build a list of {0} MSRs for KVM (a bug: batches are at most {MSR_BATCH})")]
    MsrList(usize),
    /// The vCPU ran guest code instead of only completing its pending I/O.
    #[error("a vCPU left KVM_RUN with {0} while completing its pending I/O; retry the snapshot")]
    UnexpectedExit(String),
}

fn save_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm {
        what,
        doing: "saving",
        source,
    }
}

fn restore_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm {
        what,
        doing: "restoring",
        source,
    }
}

/// `kvm_fpu` (kvm-bindings has no serde for it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct FpuState {
    /// x87 registers.
    pub fpr: Vec<[u8; 16]>,
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM registers.
    pub xmm: Vec<[u8; 16]>,
    /// MXCSR.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }
}

impl FpuState {
    /// The KVM structure.
    pub fn to_kvm(&self) -> kvm_fpu {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        for (d, s) in f.fpr.iter_mut().zip(&self.fpr) {
            *d = *s;
        }
        for (d, s) in f.xmm.iter_mut().zip(&self.xmm) {
            *d = *s;
        }
        f
    }
}

/// One vCPU's KVM state.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Special registers.
    pub sregs: kvm_sregs,
    /// Legacy FPU/SSE state.
    pub fpu: FpuState,
    /// XSAVE area, when KVM offers it (overrides `fpu` on restore).
    pub xsave: Option<kvm_xsave>,
    /// XCRs, when KVM offers them.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debugregs: Option<kvm_debugregs>,
    /// Local APIC.
    pub lapic: kvm_lapic_state,
    /// MP state.
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// MSRs KVM could read, `(index, value)`, from KVM's supported list.
    pub msrs: Vec<(u32, u64)>,
}

/// A vCPU file descriptor seen as a component: [`Persist::save`] reads its
/// state, [`Persist::restore`] writes a saved state into it (CPUID set first).
#[derive(Debug, Clone, Copy)]
pub struct VcpuComponent<'a> {
    /// The vCPU.
    pub fd: &'a VcpuFd,
    /// The MSRs to save ([`msr_index_list`]).
    pub msr_indices: &'a [u32],
}

impl<'a> Persist for VcpuComponent<'a> {
    type State = CpuState;
    type ConstructorArgs = VcpuComponent<'a>;
    type Error = VcpuStateError;

    fn save(&self) -> Result<CpuState, VcpuStateError> {
        let fd = self.fd;
        let fpu = fd.get_fpu().map_err(save_err("FPU read"))?;
        Ok(CpuState {
            regs: fd.get_regs().map_err(save_err("register read"))?,
            sregs: fd.get_sregs().map_err(save_err("sregs read"))?,
            fpu: FpuState::from(&fpu),
            xsave: fd.get_xsave().ok(),
            xcrs: fd.get_xcrs().ok(),
            debugregs: fd.get_debug_regs().ok(),
            lapic: fd.get_lapic().map_err(save_err("LAPIC read"))?,
            mp_state: fd.get_mp_state().map_err(save_err("MP state read"))?,
            events: fd.get_vcpu_events().map_err(save_err("vCPU events read"))?,
            msrs: read_msrs(fd, self.msr_indices)?,
        })
    }

    fn restore(args: VcpuComponent<'a>, state: &CpuState) -> Result<Self, VcpuStateError> {
        restore_vcpu(args.fd, state)?;
        Ok(args)
    }
}

/// KVM completes a pending port or MMIO read only at the next `KVM_RUN`, so
/// before a save the vCPU enters once with `immediate_exit` set: that
/// finishes the instruction and returns at once without running guest code.
pub fn complete_pending_io(fd: &mut VcpuFd) -> Result<(), VcpuStateError> {
    fd.set_kvm_immediate_exit(1);
    let r = match fd.run() {
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
        Err(e) => Err(save_err("completion of pending I/O (KVM_RUN)")(e)),
        // Nothing should run with immediate_exit set; do not lose the exit silently.
        Ok(exit) => Err(VcpuStateError::UnexpectedExit(format!("{exit:?}"))),
    };
    fd.set_kvm_immediate_exit(0);
    r
}

/// Reads every MSR of `indices` that KVM lets us read: a batch read stops at
/// the first MSR it cannot read, which is then skipped.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, VcpuStateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        // At most KVM_MAX_MSR_ENTRIES per call: KVM lists more MSRs than that.
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::MsrList(entries.len()))?;
        let n = fd.get_msrs(&mut msrs).map_err(save_err("MSR read"))?;
        out.extend(msrs.as_slice().iter().take(n).map(|e| (e.index, e.data)));
        // A short count stops at an MSR KVM cannot read: skip it.
        rest = &rest[(if n < batch.len() { n + 1 } else { n }).min(rest.len())..];
    }
    Ok(out)
}

/// MSRs per KVM_GET_MSRS / KVM_SET_MSRS call: KVM refuses 256 or more
/// (MAX_IO_MSRS, E2BIG), below kvm-bindings' own limit.
const MSR_BATCH: usize = kvm_bindings::KVM_MAX_MSR_ENTRIES - 1;

/// The MSRs KVM can save, from its index list.
pub fn msr_index_list(kvm: &kvm_ioctls::Kvm) -> Result<Vec<u32>, VcpuStateError> {
    let list = kvm.get_msr_index_list().map_err(save_err("MSR index list"))?;
    Ok(list.as_slice().to_vec())
}

/// Writes a saved state into a vCPU (CPUID already set). Order as in Firecracker: sregs
/// (EFER, APIC base) before the LAPIC and MSRs, events last.
fn restore_vcpu(fd: &VcpuFd, s: &CpuState) -> Result<(), VcpuStateError> {
    fd.set_mp_state(s.mp_state)
        .map_err(restore_err("MP state write"))?;
    fd.set_regs(&s.regs).map_err(restore_err("register write"))?;
    fd.set_sregs(&s.sregs).map_err(restore_err("sregs write"))?;
    fd.set_fpu(&s.fpu.to_kvm()).map_err(restore_err("FPU write"))?;
    if let Some(x) = &s.xsave {
        // SAFETY: the area is a full kvm_xsave read from KVM by `save_vcpu`
        // (zero-padded by serde if shorter); KVM checks the header it contains.
        unsafe { fd.set_xsave(x) }.map_err(restore_err("XSAVE write"))?;
    }
    if let Some(x) = &s.xcrs {
        fd.set_xcrs(x).map_err(restore_err("XCR write"))?;
    }
    if let Some(d) = &s.debugregs {
        fd.set_debug_regs(d)
            .map_err(restore_err("debug register write"))?;
    }
    fd.set_lapic(&s.lapic).map_err(restore_err("LAPIC write"))?;
    let entries: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let mut rest = entries.as_slice();
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let msrs = Msrs::from_entries(batch).map_err(|_| VcpuStateError::MsrList(batch.len()))?;
        let n = fd.set_msrs(&msrs).map_err(restore_err("MSR write"))?;
        if n < batch.len() {
            // Read from the saving KVM's own list: one this KVM refuses is host specific.
            tracing::debug!("MSR {:#x} not restored", batch[n].index);
        }
        rest = &rest[(if n < batch.len() { n + 1 } else { n }).min(rest.len())..];
    }
    fd.set_vcpu_events(&s.events)
        .map_err(restore_err("vCPU events write"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state with more MSRs than one KVM call carries saves and restores
    /// in batches (a 256+ MSR state once failed to restore).
    #[test]
    fn states_with_more_msrs_than_one_call_carries_round_trip() {
        let kvm = crate::kvm::open_kvm().unwrap();
        let vm = crate::kvm::create_vm(&kvm).unwrap();
        let fd = vm.create_vcpu(0).unwrap();
        let mut indices = msr_index_list(&kvm).unwrap();
        // Whatever this KVM lists, go past one call.
        while indices.len() <= MSR_BATCH + 10 {
            indices.extend_from_within(..indices.len().min(64));
        }
        let c = VcpuComponent {
            fd: &fd,
            msr_indices: &indices,
        };
        let state = c.save().unwrap();
        assert!(state.msrs.len() > MSR_BATCH, "{} MSRs saved", state.msrs.len());
        VcpuComponent::restore(c, &state).unwrap();
    }

    #[test]
    fn fpu_round_trips() {
        let mut f = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        f.xmm[3][5] = 9;
        f.fpr[7][0] = 1;
        let s = FpuState::from(&f);
        let back = s.to_kvm();
        assert_eq!(
            (back.fcw, back.mxcsr, back.xmm[3][5], back.fpr[7][0]),
            (0x37f, 0x1f80, 9, 1)
        );
    }
}
