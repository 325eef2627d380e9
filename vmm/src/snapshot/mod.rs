//! Snapshots: the on-disk format (`docs/snapshot.md`), saving the state of a
//! paused VM, and loading and checking a snapshot before a restore.
//!
//! A snapshot is a directory with three files:
//! - `manifest.json`: magic, format version, and for each other file its
//!   length and CRC32; written last (by rename), so a snapshot without it is
//!   incomplete;
//! - `state.json`: configuration, per-vCPU KVM state, irqchip and PIT, devices,
//!   controller state (started vCPUs, workload reports already received);
//! - `memory.bin`: guest RAM as a sparse file indexed by guest-physical address;
//!   only pages that exist and are not all zero are written, in extents of at
//!   most [`EXTENT_MAX`] bytes, each with its own CRC32 in the manifest, so a
//!   lazy restore can check an extent when it is first used.

use crate::config::{KernelSource, MemoryConfig, VmConfig};
use abi::layout::{ram_ranges, PAGE_SIZE};
use abi::pv::WorkloadReport;
use devices::serial::SerialState;
use devices::GuestRam;
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryRegion};

/// The format version this VMM writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's magic string.
pub const MAGIC: &str = "vmm-snapshot";
/// Manifest file name.
pub const MANIFEST: &str = "manifest.json";
/// State file name.
pub const STATE: &str = "state.json";
/// Memory file name.
pub const MEMORY: &str = "memory.bin";
/// Largest memory extent; extents never cross a multiple of it.
pub const EXTENT_MAX: u64 = 1 << 20;
/// The page size as a `usize`.
const PAGE: usize = 4096;
/// Largest state file accepted (a guard against reading a huge wrong file).
const STATE_MAX: u64 = 64 << 20;

/// Errors saving or loading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file of the snapshot is missing.
    #[error("snapshot {dir}: {file} is missing; this is not a (complete) snapshot directory: take the snapshot again")]
    Missing {
        /// The directory.
        dir: PathBuf,
        /// The file.
        file: &'static str,
    },
    /// An IO error.
    #[error("snapshot {path}: {what} failed: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was done.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A file does not have the length the manifest gives.
    #[error("snapshot {path} is truncated or was changed: {found} bytes, the manifest says {expected}; take the snapshot again")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes found.
        found: u64,
        /// Bytes expected.
        expected: u64,
    },
    /// A checksum does not match.
    #[error("snapshot {path}: checksum mismatch{at} (CRC32 {found:#010x}, the manifest says {expected:#010x}); the file is corrupted, take the snapshot again")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Where in it (empty for the whole file).
        at: String,
        /// CRC found.
        found: u32,
        /// CRC expected.
        expected: u32,
    },
    /// The manifest or state does not parse.
    #[error("snapshot {path} is not valid: {reason}; it is corrupted or not a snapshot of this VMM")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Another format version.
    #[error("snapshot {path} has format version {found}; this vmm reads version {FORMAT_VERSION} only: restore it with the vmm that wrote it")]
    WrongVersion {
        /// The manifest.
        path: PathBuf,
        /// Version found.
        found: u32,
    },
    /// The files do not belong together or do not fit the VM they describe.
    #[error(
        "snapshot {dir} is inconsistent: {reason}; its files do not belong together, take the snapshot again"
    )]
    Mismatch {
        /// The directory.
        dir: PathBuf,
        /// What does not fit.
        reason: String,
    },
    /// A KVM ioctl failed while saving or restoring.
    #[error("KVM {what} failed while {doing} a snapshot: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// `saving` or `restoring`.
        doing: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// The VM cannot be snapshotted now.
    #[error("cannot take a snapshot: {0}")]
    Control(String),
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        path: path.to_owned(),
        what,
        source,
    }
}

fn save_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm {
        what,
        doing: "saving",
        source,
    }
}

fn restore_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm {
        what,
        doing: "restoring",
        source,
    }
}

/// `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`MAGIC`].
    pub magic: String,
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// The vmm version that wrote it (informative).
    pub writer: String,
    /// `state.json`.
    pub state: FileEntry,
    /// `memory.bin`.
    pub memory: MemoryEntry,
}

/// A file and its checksum.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// File name inside the snapshot directory.
    pub name: String,
    /// Length in bytes.
    pub len: u64,
    /// CRC32 (IEEE) of the whole file.
    pub crc32: u32,
}

/// The memory file: its logical length and the extents that hold data.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemoryEntry {
    /// File name inside the snapshot directory.
    pub name: String,
    /// Logical length (end of the highest RAM range); the rest is holes.
    pub len: u64,
    /// Guest RAM size the file belongs to.
    pub mem_size: u64,
    /// Data extents, sorted, page aligned, within one [`EXTENT_MAX`] block each.
    pub extents: Vec<Extent>,
}

/// A run of saved pages: file offset = guest-physical address.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Extent {
    /// Guest-physical address (and file offset).
    pub gpa: u64,
    /// Bytes.
    pub len: u64,
    /// CRC32 of the bytes.
    pub crc32: u32,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.gpa + self.len
    }
}

/// The configuration part of `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
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

/// `kvm_fpu` (kvm-bindings has no serde for it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
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
    fn to_kvm(&self) -> kvm_fpu {
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

/// The serial UART (mirror of vm-superio's `SerialState`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SerialSnapshot {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub registers: [u8; 9],
    /// Receive FIFO.
    pub in_buffer: Vec<u8>,
}

impl From<&SerialState> for SerialSnapshot {
    fn from(s: &SerialState) -> Self {
        SerialSnapshot {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl SerialSnapshot {
    /// The vm-superio state.
    pub fn to_state(&self) -> SerialState {
        let r = self.registers;
        SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: self.in_buffer.clone(),
        }
    }
}

/// A workload report already received (mirror of `abi::pv::WorkloadReport`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReportState {
    /// vCPU.
    pub cpu: u32,
    /// Workload kind.
    pub workload: u32,
    /// First page.
    pub first_page: u64,
    /// Pages.
    pub pages: u64,
    /// Checksum.
    pub checksum: u64,
    /// Guest faults.
    pub faults: u64,
    /// TSC cycles.
    pub cycles: u64,
}

impl From<&WorkloadReport> for ReportState {
    fn from(r: &WorkloadReport) -> Self {
        ReportState {
            cpu: r.cpu,
            workload: r.workload,
            first_page: r.first_page,
            pages: r.pages,
            checksum: r.checksum,
            faults: r.faults,
            cycles: r.cycles,
        }
    }
}

impl From<&ReportState> for WorkloadReport {
    fn from(r: &ReportState) -> Self {
        WorkloadReport {
            cpu: r.cpu,
            workload: r.workload,
            first_page: r.first_page,
            pages: r.pages,
            checksum: r.checksum,
            faults: r.faults,
            cycles: r.cycles,
        }
    }
}

/// `state.json`: everything but memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// The configuration.
    pub config: ConfigState,
    /// Per-vCPU state, by index.
    pub vcpus: Vec<CpuState>,
    /// PIC master, PIC slave, IOAPIC.
    pub irqchip: Vec<kvm_irqchip>,
    /// PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: Option<kvm_clock_data>,
    /// Serial console.
    pub serial: SerialSnapshot,
    /// vCPUs the guest had started (the others wait for `START_CPUS`).
    pub started: Vec<bool>,
    /// Workload reports received before the snapshot.
    pub reports: Vec<ReportState>,
}

/// What a snapshot wrote.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    /// The directory.
    pub dir: PathBuf,
    /// Bytes of guest memory saved (the rest is holes).
    pub memory_bytes: u64,
    /// Memory extents.
    pub extents: usize,
    /// Time the VM was paused for the snapshot, in milliseconds.
    pub took_ms: f64,
}

/// What to do once the snapshot is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterSnapshot {
    /// Resume if the VM was running, stay paused if it was paused.
    #[default]
    Restore,
    /// Resume.
    Resume,
    /// Stay paused.
    Pause,
    /// End the run ([`crate::GuestEnd::Stopped`]).
    Stop,
}

// ---------------------------------------------------------------- saving

/// What the controller needs from the VM to save it.
pub(crate) struct SaveCtx {
    pub(crate) vm_fd: std::sync::Arc<VmFd>,
    pub(crate) mem: GuestRam,
    pub(crate) serial: std::sync::Arc<std::sync::Mutex<devices::serial::SerialConsole>>,
    pub(crate) config: VmConfig,
    /// For lazily backed memory: fetches the pages not fetched yet.
    pub(crate) materializer: Option<crate::lazy::Materializer>,
    /// Memory is served by an external page-fault handler: pages it has not
    /// served yet are not in this process, so a snapshot would lose them.
    pub(crate) external_memory: bool,
}

/// Reads the state of one (paused) vCPU on its own thread. KVM completes a
/// pending port or MMIO read only at the next `KVM_RUN`, so an entry with
/// `immediate_exit` set comes first: it finishes the instruction and returns
/// at once without running guest code.
pub fn save_vcpu(fd: &mut VcpuFd, msr_indices: &[u32]) -> Result<CpuState, SnapshotError> {
    fd.set_kvm_immediate_exit(1);
    let r = match fd.run() {
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
        Err(e) => Err(save_err("completion of pending I/O (KVM_RUN)")(e)),
        // Nothing should run with immediate_exit set; do not lose the exit silently.
        Ok(exit) => Err(SnapshotError::Control(format!(
            "a vCPU left KVM_RUN with {exit:?} while completing its pending I/O; retry the snapshot"
        ))),
    };
    fd.set_kvm_immediate_exit(0);
    r?;
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
        msrs: read_msrs(fd, msr_indices)?,
    })
}

/// Reads every MSR of `indices` that KVM lets us read: a batch read stops at
/// the first MSR it cannot read, which is then skipped.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, SnapshotError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| SnapshotError::Control(format!("MSR list: {e:?}")))?;
        let n = fd.get_msrs(&mut msrs).map_err(save_err("MSR read"))?;
        out.extend(msrs.as_slice().iter().take(n).map(|e| (e.index, e.data)));
        rest = rest.get(n + 1..).unwrap_or_default();
    }
    Ok(out)
}

/// The MSRs KVM can save, from its index list.
pub fn msr_index_list() -> Result<Vec<u32>, SnapshotError> {
    let kvm = kvm_ioctls::Kvm::new().map_err(save_err("open /dev/kvm"))?;
    let list = kvm.get_msr_index_list().map_err(save_err("MSR index list"))?;
    Ok(list.as_slice().to_vec())
}

/// Reads the VM-wide state: irqchip (PIC master, slave, IOAPIC), PIT, clock.
pub fn save_vm(
    vm: &VmFd,
) -> Result<(Vec<kvm_irqchip>, kvm_pit_state2, Option<kvm_clock_data>), SnapshotError> {
    let mut chips = Vec::new();
    for id in [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC] {
        let mut chip = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).map_err(save_err("irqchip read"))?;
        chips.push(chip);
    }
    let pit = vm.get_pit2().map_err(save_err("PIT read"))?;
    Ok((chips, pit, vm.get_clock().ok()))
}

/// Restores the VM-wide state (after the irqchip and PIT were created).
pub fn restore_vm(vm: &VmFd, state: &VmState) -> Result<(), SnapshotError> {
    for chip in &state.irqchip {
        vm.set_irqchip(chip).map_err(restore_err("irqchip write"))?;
    }
    vm.set_pit2(&state.pit).map_err(restore_err("PIT write"))?;
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
    Ok(())
}

/// Restores one vCPU (CPUID already set). Order as in Firecracker: sregs
/// (EFER, APIC base) before the LAPIC and MSRs, events last.
pub fn restore_vcpu(fd: &VcpuFd, s: &CpuState) -> Result<(), SnapshotError> {
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
        let msrs =
            Msrs::from_entries(rest).map_err(|e| SnapshotError::Control(format!("MSR list: {e:?}")))?;
        let n = fd.set_msrs(&msrs).map_err(restore_err("MSR write"))?;
        if let Some(bad) = rest.get(n) {
            // Read from this KVM's own list: one it refuses now is host specific.
            tracing::debug!("MSR {:#x} not restored", bad.index);
        }
        rest = rest.get(n + 1..).unwrap_or_default();
    }
    fd.set_vcpu_events(&s.events)
        .map_err(restore_err("vCPU events write"))?;
    Ok(())
}

/// The configuration part of a VM's state.
pub fn config_state(c: &VmConfig) -> ConfigState {
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

/// Which pages of `len` bytes at host address `host` exist (present or
/// swapped), from `/proc/self/pagemap`; `None` if pagemap cannot be read.
fn existing_pages(pagemap: &File, host: u64, len: u64) -> Result<Vec<bool>, std::io::Error> {
    let pages = usize::try_from(len / PAGE_SIZE).map_err(std::io::Error::other)?;
    let mut out = Vec::with_capacity(pages);
    let mut buf = vec![0u8; 8 * 8192];
    let first = host / PAGE_SIZE;
    let mut done = 0usize;
    while done < pages {
        let n = (pages - done).min(8192);
        let bytes = &mut buf[..n * 8];
        pagemap.read_exact_at(bytes, (first + done as u64) * 8)?;
        for e in bytes.chunks_exact(8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(e);
            let v = u64::from_le_bytes(w);
            out.push(v & (3 << 62) != 0);
        }
        done += n;
    }
    Ok(out)
}

/// One past the last byte of guest RAM (the memory file's length).
pub fn ram_end(mem_size: u64) -> u64 {
    ram_ranges(mem_size)
        .iter()
        .filter(|&&(_, l)| l > 0)
        .map(|&(s, l)| s + l)
        .max()
        .unwrap_or(0)
}

/// The guest-physical extents of `mem` that hold data, each with its CRC32:
/// pages that exist in the host mapping and are not all zero (everything
/// else reads as zero). Pages not yet fetched by a lazy source do not exist:
/// call `LazyMemory`'s materializer first. The vCPUs must be paused.
pub fn data_extents(mem: &GuestRam) -> Result<Vec<Extent>, SnapshotError> {
    let pagemap_path = Path::new("/proc/self/pagemap");
    let pagemap = File::open(pagemap_path).map_err(io_err(pagemap_path, "opening"))?;
    let mut extents: Vec<Extent> = Vec::new();
    for r in mem.iter() {
        let host = r.as_ptr() as u64;
        let gpa0 = r.start_addr().raw_value();
        let size = r.len();
        let exists = existing_pages(&pagemap, host, size).map_err(io_err(pagemap_path, "reading"))?;
        // SAFETY: `host..host + size` is the region's live mapping (kept by `mem`);
        // the vCPUs are paused, so nothing writes it while we read; only pages that
        // exist are read, so no read faults into a userfault handler.
        let bytes =
            unsafe { std::slice::from_raw_parts(host as *const u8, usize::try_from(size).unwrap_or(0)) };
        let first = extents.len();
        for (i, _) in exists.iter().enumerate().filter(|(_, e)| **e) {
            let off = i * PAGE;
            let page = &bytes[off..off + PAGE];
            if page.iter().all(|&b| b == 0) {
                continue;
            }
            let gpa = gpa0 + off as u64;
            match extents.last_mut() {
                Some(e) if e.end() == gpa && !gpa.is_multiple_of(EXTENT_MAX) => e.len += PAGE_SIZE,
                _ => extents.push(Extent {
                    gpa,
                    len: PAGE_SIZE,
                    crc32: 0,
                }),
            }
        }
        for e in &mut extents[first..] {
            let off = usize::try_from(e.gpa - gpa0).unwrap_or(0);
            e.crc32 = crc32fast::hash(&bytes[off..off + usize::try_from(e.len).unwrap_or(0)]);
        }
    }
    Ok(extents)
}

/// The guest-physical addresses of the pages of `mem` that exist in this
/// process (touched at least once), ascending. Reads only the page map, never
/// guest memory, so it is safe while the VM runs.
pub fn existing_guest_pages(mem: &GuestRam) -> Result<Vec<u64>, SnapshotError> {
    let pagemap_path = Path::new("/proc/self/pagemap");
    let pagemap = File::open(pagemap_path).map_err(io_err(pagemap_path, "opening"))?;
    let mut out = Vec::new();
    for r in mem.iter() {
        let gpa0 = r.start_addr().raw_value();
        let exists =
            existing_pages(&pagemap, r.as_ptr() as u64, r.len()).map_err(io_err(pagemap_path, "reading"))?;
        out.extend(
            exists
                .iter()
                .enumerate()
                .filter(|(_, e)| **e)
                .map(|(i, _)| gpa0 + i as u64 * PAGE_SIZE),
        );
    }
    Ok(out)
}

/// Writes guest memory as a sparse file; returns the manifest entry.
/// Only [`data_extents`] are written; the rest are holes.
pub fn write_memory(path: &Path, mem: &GuestRam, mem_size: u64) -> Result<MemoryEntry, SnapshotError> {
    let file = File::create(path).map_err(io_err(path, "creating the memory file"))?;
    let len = ram_end(mem_size);
    file.set_len(len)
        .map_err(io_err(path, "sizing the memory file"))?;
    let extents = data_extents(mem)?;
    let mut buf = vec![0u8; usize::try_from(EXTENT_MAX).unwrap_or(1 << 20)];
    for e in &extents {
        let data = &mut buf[..usize::try_from(e.len).unwrap_or(0)];
        mem.read_slice(data, vm_memory::GuestAddress(e.gpa))
            .map_err(|err| SnapshotError::Control(format!("reading guest memory at {:#x}: {err}", e.gpa)))?;
        file.write_all_at(data, e.gpa)
            .map_err(io_err(path, "writing the memory file"))?;
    }
    file.sync_all().map_err(io_err(path, "syncing the memory file"))?;
    Ok(MemoryEntry {
        name: MEMORY.into(),
        len,
        mem_size,
        extents,
    })
}

/// Writes a snapshot directory from a state and the guest memory. The
/// manifest goes last (by rename): a directory without it is incomplete.
pub fn write_snapshot(dir: &Path, state: &VmState, mem: &GuestRam) -> Result<Manifest, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir, "creating the snapshot directory"))?;
    let manifest_path = dir.join(MANIFEST);
    match std::fs::remove_file(&manifest_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&manifest_path, "removing the old manifest")(e)),
    }
    let state_json = serde_json::to_vec(state).map_err(|e| SnapshotError::Malformed {
        path: dir.join(STATE),
        reason: e.to_string(),
    })?;
    let state_path = dir.join(STATE);
    std::fs::write(&state_path, &state_json).map_err(io_err(&state_path, "writing"))?;
    let memory = write_memory(&dir.join(MEMORY), mem, state.config.mem_size)?;
    let manifest = Manifest {
        magic: MAGIC.into(),
        version: FORMAT_VERSION,
        writer: format!("vmm {}", env!("CARGO_PKG_VERSION")),
        state: FileEntry {
            name: STATE.into(),
            len: state_json.len() as u64,
            crc32: crc32fast::hash(&state_json),
        },
        memory,
    };
    write_manifest(dir, &manifest)?;
    Ok(manifest)
}

/// Writes `manifest.json` atomically (a temporary file renamed into place).
pub fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), SnapshotError> {
    let manifest_path = dir.join(MANIFEST);
    let tmp = dir.join("manifest.json.tmp");
    let text = serde_json::to_vec_pretty(manifest).map_err(|e| SnapshotError::Malformed {
        path: tmp.clone(),
        reason: e.to_string(),
    })?;
    let mut f = File::create(&tmp).map_err(io_err(&tmp, "creating"))?;
    f.write_all(&text).map_err(io_err(&tmp, "writing"))?;
    f.sync_all().map_err(io_err(&tmp, "syncing"))?;
    std::fs::rename(&tmp, &manifest_path).map_err(io_err(&manifest_path, "renaming the manifest into place"))
}

/// Reads `manifest.json` without any check beyond parsing (tools, tests).
pub fn read_manifest(dir: &Path) -> Result<Manifest, SnapshotError> {
    let path = dir.join(MANIFEST);
    let text = read_limited(&path, STATE_MAX, dir, MANIFEST)?;
    serde_json::from_slice(&text).map_err(|e| SnapshotError::Malformed {
        path,
        reason: e.to_string(),
    })
}

// ---------------------------------------------------------------- loading

/// A snapshot whose manifest and state were read and checked.
#[derive(Debug)]
pub struct Snapshot {
    /// The directory.
    pub dir: PathBuf,
    /// The manifest.
    pub manifest: Manifest,
    /// The state.
    pub state: VmState,
}

fn read_limited(path: &Path, limit: u64, dir: &Path, file: &'static str) -> Result<Vec<u8>, SnapshotError> {
    let f = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => SnapshotError::Missing {
            dir: dir.to_owned(),
            file,
        },
        _ => io_err(path, "opening")(e),
    })?;
    let mut buf = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(io_err(path, "reading"))?;
    if buf.len() as u64 > limit {
        return Err(SnapshotError::Malformed {
            path: path.to_owned(),
            reason: format!("larger than {limit} bytes"),
        });
    }
    Ok(buf)
}

impl Snapshot {
    /// Reads `dir`, checks the manifest (magic, version), the state file
    /// (length, CRC32, parse) and that the memory file and the state fit
    /// together. The memory's extents are checked by [`Snapshot::verify_memory`]
    /// or, for a lazy restore, on first use.
    pub fn open(dir: &Path) -> Result<Snapshot, SnapshotError> {
        if !dir.is_dir() {
            return Err(SnapshotError::Missing {
                dir: dir.to_owned(),
                file: "the snapshot directory",
            });
        }
        let mpath = dir.join(MANIFEST);
        let text = read_limited(&mpath, STATE_MAX, dir, MANIFEST)?;
        // The magic and version first, so that another version is named as such.
        let head: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| SnapshotError::Malformed {
                path: mpath.clone(),
                reason: e.to_string(),
            })?;
        if head.get("magic").and_then(|m| m.as_str()) != Some(MAGIC) {
            return Err(SnapshotError::Malformed {
                path: mpath,
                reason: format!("no `magic: \"{MAGIC}\"`"),
            });
        }
        let version = head.get("version").and_then(serde_json::Value::as_u64);
        if version != Some(u64::from(FORMAT_VERSION)) {
            return Err(SnapshotError::WrongVersion {
                path: mpath,
                found: version.and_then(|v| u32::try_from(v).ok()).unwrap_or(u32::MAX),
            });
        }
        let manifest: Manifest = serde_json::from_value(head).map_err(|e| SnapshotError::Malformed {
            path: mpath.clone(),
            reason: e.to_string(),
        })?;
        if manifest.state.name != STATE || manifest.memory.name != MEMORY {
            return Err(SnapshotError::Malformed {
                path: mpath,
                reason: "unexpected file names".into(),
            });
        }

        let spath = dir.join(STATE);
        let state_bytes = read_limited(&spath, STATE_MAX, dir, STATE)?;
        if state_bytes.len() as u64 != manifest.state.len {
            return Err(SnapshotError::Truncated {
                path: spath,
                found: state_bytes.len() as u64,
                expected: manifest.state.len,
            });
        }
        let crc = crc32fast::hash(&state_bytes);
        if crc != manifest.state.crc32 {
            return Err(SnapshotError::Checksum {
                path: spath,
                at: String::new(),
                found: crc,
                expected: manifest.state.crc32,
            });
        }
        let state: VmState = serde_json::from_slice(&state_bytes).map_err(|e| SnapshotError::Malformed {
            path: spath,
            reason: e.to_string(),
        })?;
        let snap = Snapshot {
            dir: dir.to_owned(),
            manifest,
            state,
        };
        snap.check_consistency()?;
        Ok(snap)
    }

    fn mismatch(&self, reason: String) -> SnapshotError {
        SnapshotError::Mismatch {
            dir: self.dir.clone(),
            reason,
        }
    }

    /// Checks the state and the extents against each other (not the files).
    fn check_state(&self) -> Result<(), SnapshotError> {
        let s = &self.state;
        let m = &self.manifest.memory;
        let n = s.config.vcpus as usize;
        if s.vcpus.len() != n || s.started.len() != n {
            return Err(self.mismatch(format!(
                "{n} vCPUs configured, {} vCPU states, {} start flags",
                s.vcpus.len(),
                s.started.len()
            )));
        }
        if s.irqchip.len() != 3 {
            return Err(self.mismatch(format!("{} irqchip states instead of 3", s.irqchip.len())));
        }
        if m.mem_size != s.config.mem_size {
            return Err(self.mismatch(format!(
                "the memory file is for {} bytes of RAM, the state for {}",
                m.mem_size, s.config.mem_size
            )));
        }
        self.config(MemoryConfig::default())
            .map_err(|e| self.mismatch(format!("the saved configuration is invalid: {e}")))?;
        let ranges = ram_ranges(s.config.mem_size);
        let end = ram_end(s.config.mem_size);
        if m.len != end {
            return Err(self.mismatch(format!(
                "memory file length {} does not match {} bytes of RAM (expected {end})",
                m.len, s.config.mem_size
            )));
        }
        let mut prev_end = 0;
        for e in &m.extents {
            let in_ram = ranges
                .iter()
                .any(|&(a, l)| e.gpa >= a && e.gpa.checked_add(e.len).is_some_and(|end| end <= a + l));
            // `in_ram` first: it proves gpa + len does not overflow.
            let ok = in_ram
                && e.len > 0
                && e.gpa % PAGE_SIZE == 0
                && e.len % PAGE_SIZE == 0
                && e.len <= EXTENT_MAX
                && e.gpa / EXTENT_MAX == (e.gpa + e.len - 1) / EXTENT_MAX
                && e.gpa >= prev_end;
            if !ok {
                return Err(self.mismatch(format!(
                    "memory extent {:#x}+{:#x} is out of order, unaligned or outside RAM",
                    e.gpa, e.len
                )));
            }
            prev_end = e.end();
        }
        Ok(())
    }

    /// A snapshot received over a migration stream: `state.json`'s content
    /// and the data extents, checked as [`Snapshot::open`] checks a
    /// directory (but there is no memory file).
    pub fn from_parts(state_json: &[u8], extents: Vec<Extent>) -> Result<Snapshot, SnapshotError> {
        let path = PathBuf::from("<migration stream>");
        let state: VmState = serde_json::from_slice(state_json).map_err(|e| SnapshotError::Malformed {
            path: path.join(STATE),
            reason: e.to_string(),
        })?;
        let mem_size = state.config.mem_size;
        let snap = Snapshot {
            dir: path,
            manifest: Manifest {
                magic: MAGIC.into(),
                version: FORMAT_VERSION,
                writer: String::new(),
                state: FileEntry {
                    name: STATE.into(),
                    len: state_json.len() as u64,
                    crc32: crc32fast::hash(state_json),
                },
                memory: MemoryEntry {
                    name: MEMORY.into(),
                    len: ram_end(mem_size),
                    mem_size,
                    extents,
                },
            },
            state,
        };
        snap.check_state()?;
        Ok(snap)
    }

    fn check_consistency(&self) -> Result<(), SnapshotError> {
        self.check_state()?;
        let m = &self.manifest.memory;
        let mpath = self.memory_path();
        let found = std::fs::metadata(&mpath)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => SnapshotError::Missing {
                    dir: self.dir.clone(),
                    file: MEMORY,
                },
                _ => io_err(&mpath, "inspecting")(e),
            })?
            .len();
        if found != m.len {
            return Err(SnapshotError::Truncated {
                path: mpath,
                found,
                expected: m.len,
            });
        }
        Ok(())
    }

    /// The memory file.
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(MEMORY)
    }

    /// The VM configuration, with guest RAM backed as `memory` says.
    pub fn config(&self, memory: MemoryConfig) -> Result<VmConfig, crate::ConfigError> {
        let c = &self.state.config;
        let cfg = VmConfig {
            kernel: c.kernel.clone().map_or(KernelSource::Bundled, KernelSource::File),
            vcpus: c.vcpus,
            mem_size: c.mem_size,
            cmdline: c.cmdline.clone(),
            memory,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every extent's CRC32 (reads all saved memory).
    pub fn verify_memory(&self) -> Result<(), SnapshotError> {
        let path = self.memory_path();
        let f = File::open(&path).map_err(io_err(&path, "opening"))?;
        let mut buf = vec![0u8; 1 << 20];
        for e in &self.manifest.memory.extents {
            let b = &mut buf[..usize::try_from(e.len).unwrap_or(0)];
            f.read_exact_at(b, e.gpa).map_err(io_err(&path, "reading"))?;
            check_extent(&path, e, b)?;
        }
        Ok(())
    }

    /// Copies the saved memory into `mem` (eager restore), checking each extent.
    pub fn fill_memory(&self, mem: &GuestRam) -> Result<(), SnapshotError> {
        let path = self.memory_path();
        let f = File::open(&path).map_err(io_err(&path, "opening"))?;
        for e in &self.manifest.memory.extents {
            let r = mem
                .iter()
                .find(|r| {
                    let a = r.start_addr().raw_value();
                    e.gpa >= a && e.end() <= a + r.len()
                })
                .ok_or_else(|| self.mismatch(format!("extent {:#x} is outside guest RAM", e.gpa)))?;
            let off = e.gpa - r.start_addr().raw_value();
            // SAFETY: the extent lies inside this region's live mapping (checked
            // above); no vCPU runs yet and no userfaultfd is registered, so the
            // write cannot race with or block on anything.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    (r.as_ptr() as u64 + off) as *mut u8,
                    usize::try_from(e.len).unwrap_or(0),
                )
            };
            f.read_exact_at(dst, e.gpa).map_err(io_err(&path, "reading"))?;
            check_extent(&path, e, dst)?;
        }
        Ok(())
    }
}

fn check_extent(path: &Path, e: &Extent, data: &[u8]) -> Result<(), SnapshotError> {
    let crc = crc32fast::hash(data);
    if crc != e.crc32 {
        return Err(SnapshotError::Checksum {
            path: path.to_owned(),
            at: format!(" in extent {:#x}+{:#x}", e.gpa, e.len),
            found: crc,
            expected: e.crc32,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn open_rejects_missing_dir_and_manifest() {
        let e = Snapshot::open(Path::new("/nonexistent/snap")).unwrap_err();
        assert!(matches!(e, SnapshotError::Missing { .. }), "{e}");
        let dir = std::env::temp_dir().join(format!("vmm-snap-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = Snapshot::open(&dir).unwrap_err();
        assert!(e.to_string().contains("manifest.json is missing"), "{e}");
        std::fs::write(dir.join(MANIFEST), b"{\"magic\":\"vmm-snapshot\",\"version\":99}").unwrap();
        let e = Snapshot::open(&dir).unwrap_err();
        assert!(matches!(e, SnapshotError::WrongVersion { found: 99, .. }), "{e}");
        std::fs::write(dir.join(MANIFEST), b"\x00garbage").unwrap();
        assert!(matches!(
            Snapshot::open(&dir),
            Err(SnapshotError::Malformed { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
