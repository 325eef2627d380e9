//! The VM as a mechanism: KVM objects, the memory manager, the device
//! manager and the vCPUs, built in phases and then driven by one owner (the
//! orchestration layer's controller) through synchronous calls.
//!
//! Building ([`Vm::build`]) goes: KVM VM (irqchip, PIT) -> guest RAM and its
//! memory slots -> what [`Boot`] says goes into memory (a kernel, or nothing
//! for a saved VM) -> how [`MemoryPlan`] says RAM is backed (an eager fill
//! before, or userfaultfd after, every VMM write) -> vCPUs (CPUID) -> either
//! fresh devices and boot registers, or the saved state ([`Vm::apply_state`],
//! which an incoming migration calls later, once its state has arrived).

use crate::arch::x86_64::{cpu, paging};
use crate::config::{ConfigError, KernelSource, VmConfig};
use crate::devices::{DeviceArgs, DeviceError, DeviceManager};
use crate::event::{EventSink, VmEvent};
use crate::kvm::{self, kvm_err, KvmError, KvmVmComponent};
use crate::loader::{self, LoaderError};
use crate::memory::{self, LazyPlan, MemoryManager, MemoryManagerError, MemoryStats};
use crate::state::{ConfigState, StateMismatch, VmState};
use crate::vcpu::manager::{PauseReport, Vcpus};
use crate::vcpu::state::{msr_index_list, VcpuComponent, VcpuStateError};
use crate::vcpu::{ParkedThread, StopSink, VcpuError, VcpuFn, VcpuStatsSnapshot};
use devices::serial::SerialOutput;
use devices::GuestRam;
use kvm_bindings::{kvm_mp_state, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{VcpuFd, VmFd};
use persist::Persist;
use sandbox::SeccompMode;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Largest kernel image file read (a guard against reading a huge wrong file).
pub const MAX_KERNEL_FILE: u64 = 256 << 20;

/// Errors building or driving a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// KVM.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// The kernel file cannot be read.
    #[error("cannot read kernel file {path}: {source}")]
    KernelFile {
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryManagerError),
    /// Filling guest memory before the VM runs (an eager restore).
    #[error("cannot fill guest memory: {0}")]
    Fill(#[source] FillError),
    /// Loading the guest.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// Boot tables.
    #[error(transparent)]
    Paging(#[from] paging::PagingError),
    /// Devices.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// vCPU control.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A vCPU's saved state.
    #[error("vCPU {cpu}: {source}")]
    VcpuState {
        /// vCPU index.
        cpu: u32,
        /// Why.
        #[source]
        source: VcpuStateError,
    },
    /// A saved state that does not fit this VM.
    #[error("the saved VM state does not fit: {0}")]
    State(#[from] StateMismatch),
    /// The MSR list could not be read.
    #[error("cannot list the MSRs to save: {0}")]
    Msrs(#[source] VcpuStateError),
    /// A call that needs the VM in another phase.
    #[error("{0}")]
    Phase(&'static str),
}

/// What goes into the VM before it runs.
#[derive(Debug, Clone, Copy)]
pub enum Boot<'a> {
    /// Boot the configured kernel (and the bundled user program as module).
    Kernel,
    /// Continue a saved VM: its state is applied while building.
    Restore(&'a VmState),
    /// Build everything but the state, which comes later through
    /// [`Vm::apply_state`] (a migration destination built before its
    /// source pauses).
    Incoming,
}

/// Why an eager fill of guest memory failed.
pub type FillError = Box<dyn std::error::Error + Send + Sync>;

/// Fills guest RAM once before the VM runs.
pub type FillFn<'a> = &'a mut dyn FnMut(&GuestRam) -> Result<(), FillError>;

/// How guest RAM is backed (and filled).
pub enum MemoryPlan<'a> {
    /// As the configuration's `memory.backend` says: anonymous memory, zero
    /// pages or a memory file served lazily.
    Configured,
    /// Anonymous memory filled once, before anything runs (an eager restore).
    Fill(FillFn<'a>),
    /// Served lazily through the retry core from this plan (a lazy restore,
    /// a migration destination, a test source).
    Lazy(LazyPlan),
    /// Registered with a userfaultfd for a handler in another process
    /// (see [`MemoryManager::external`]).
    External,
}

impl std::fmt::Debug for MemoryPlan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemoryPlan::Configured => "Configured",
            MemoryPlan::Fill(_) => "Fill",
            MemoryPlan::Lazy(_) => "Lazy",
            MemoryPlan::External => "External",
        })
    }
}

/// What the mechanism needs from its owner.
#[derive(Clone)]
pub struct BuildOptions {
    /// Where the console goes.
    pub serial: SerialOutput,
    /// Where devices, vCPUs and the memory manager post events.
    pub sink: EventSink,
    /// A restored VM's RAM is a private mapping of this shared snapshot
    /// memory (a clone, see [`MemoryManager::clone_of`]).
    pub shared_ram: Option<memory::SharedRam>,
    /// How the VM's threads (vCPUs, fault handler, prefetch, page store)
    /// are sandboxed; each installs its filter before it does anything.
    pub seccomp: SeccompMode,
}

impl std::fmt::Debug for BuildOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildOptions")
            .field("serial", &self.serial)
            .field("seccomp", &self.seccomp)
            .finish_non_exhaustive()
    }
}

/// The vCPUs: file descriptors until the VM starts, threads after.
#[derive(Debug)]
enum VcpuSet {
    Built(Vec<VcpuFd>),
    Running(Vcpus),
    Gone,
}

/// A VM. See the module documentation.
pub struct Vm {
    config: VmConfig,
    vcpus: VcpuSet,
    started: Vec<bool>,
    devices: Option<DeviceManager>,
    // After the vCPUs and devices: its handler must outlive every guest access.
    memory: MemoryManager,
    vm_fd: Arc<VmFd>,
    sink: EventSink,
    serial: SerialOutput,
    first_output: Arc<OnceLock<Instant>>,
    created: Instant,
    tsc_khz: Option<u32>,
    /// The CPU each vCPU is pinned to, next to its fault-handler thread (lazy memory only).
    vcpu_cpus: Vec<Option<usize>>,
    /// The MSRs a state capture saves, listed while building (on /dev/kvm,
    /// which the controller's sandbox does not open).
    msrs: Arc<Vec<u32>>,
    seccomp: SeccompMode,
    /// vCPU threads started ahead (an incoming VM's): [`Vm::start`] hands
    /// them their vCPUs instead of starting threads in the downtime.
    parked: Vec<ParkedThread>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Builds a VM; see the module documentation for the phases.
    pub fn build(
        config: &VmConfig,
        boot: Boot<'_>,
        memory: MemoryPlan<'_>,
        options: BuildOptions,
    ) -> Result<Vm, VmError> {
        let created = Instant::now();
        config.validate()?;
        if let Boot::Restore(state) = boot {
            check_state(config, state)?;
        }
        let kernel_image = match (&config.kernel, boot) {
            (KernelSource::Bundled, Boot::Kernel) => Some(std::borrow::Cow::Borrowed(crate::guest::KERNEL)),
            (KernelSource::File(p), Boot::Kernel) => Some(std::borrow::Cow::Owned(
                crate::files::read_regular(p, MAX_KERNEL_FILE).map_err(|source| VmError::KernelFile {
                    path: p.display().to_string(),
                    source,
                })?,
            )),
            // A saved guest's kernel is in its memory already.
            _ => None,
        };

        let kvm = kvm::open_kvm()?;
        let msrs = Arc::new(msr_index_list(&kvm).map_err(VmError::Msrs)?);
        let vm_fd = Arc::new(kvm::create_vm(&kvm)?);
        // vCPUs first: the boot information carries their TSC frequency.
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("CPUID query"))?;
        let mut fds = Vec::new();
        let mut tsc_khz = None;
        for i in 0..config.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(i))
                .map_err(kvm_err("vCPU creation"))?;
            let mut cpuid = supported.clone();
            cpu::patch_cpuid(&mut cpuid, i, config.vcpus);
            fd.set_cpuid2(&cpuid).map_err(kvm_err("CPUID setup"))?;
            if tsc_khz.is_none() {
                tsc_khz = fd.get_tsc_khz().ok();
            }
            fds.push(fd);
        }

        // A saved VM's memory manager restores its own layout (and checks it).
        let mut mm = match boot {
            Boot::Restore(state) if options.shared_ram.is_some() => {
                let shared = options
                    .shared_ram
                    .as_ref()
                    .ok_or(VmError::Phase("no shared memory"))?;
                MemoryManager::clone_of(vm_fd.clone(), &state.memory, shared)?
            }
            Boot::Restore(state) => MemoryManager::restore(
                (vm_fd.clone(), config.memory.backing, config.memory.fault_mode),
                &state.memory,
            )?,
            Boot::Kernel | Boot::Incoming => MemoryManager::with_backing(
                vm_fd.clone(),
                config.mem_size,
                config.memory.backing,
                config.memory.fault_mode,
            )?,
        };
        let mut entry = 0;
        if let Some(image) = &kernel_image {
            let ram = mm.ram();
            paging::write_boot_tables(ram)?;
            let (e, _kernel_end) = loader::load_kernel(ram, config.mem_size, image)?;
            entry = e;
            let module = loader::load_module(ram, crate::guest::USER)?;
            let mut info = loader::boot_info(config.mem_size, config.vcpus, &config.cmdline, module)?;
            info.tsc_khz = tsc_khz.unwrap_or(0);
            loader::write_boot_info(ram, &info)?;
        }

        // A stage-2 userfault blocks the vCPU thread until a handler thread
        // fills the page: on one CPU the two hand over directly, across CPUs
        // each fault pays two remote wake-ups (docs/retry-core.md). By
        // default one handler thread per CPU used, each next to the vCPUs
        // pinned to its CPU (a lone vCPU and its handler on the CPU we run
        // on); `crate::placement` has the choices.
        let allowed = ::memory::affinity::allowed_cpus().unwrap_or_default();
        let layout = crate::placement::layout(
            &config.memory.handlers,
            config.vcpus,
            &allowed,
            ::memory::colocation_cpu(),
        );
        // Only now, with every page the VMM writes present, may RAM be handed
        // to userfaultfd: a VMM write to a missing page would block this thread.
        match memory {
            MemoryPlan::Configured => {
                let fault_around = config.memory.effective_fault_around();
                if let Some(mut plan) =
                    memory::plan_for_backend(&config.memory.backend, fault_around, config.mem_size)?
                {
                    plan.handler_cpus.clone_from(&layout.handler_cpus);
                    plan.spin_us = layout.spin_us;
                    plan.batch = layout.batch;
                    mm.serve_lazily(plan, options.sink.clone(), options.seccomp)?;
                }
            }
            MemoryPlan::Fill(fill) => fill(mm.ram()).map_err(VmError::Fill)?,
            MemoryPlan::Lazy(mut plan) => {
                if plan.handler_cpus.is_empty() {
                    plan.handler_cpus.clone_from(&layout.handler_cpus);
                    plan.spin_us = layout.spin_us;
                    plan.batch = layout.batch;
                }
                mm.serve_lazily(plan, options.sink.clone(), options.seccomp)?;
            }
            MemoryPlan::External => {
                mm.serve_externally()?;
            }
        }
        // vCPUs are pinned only next to handler threads of their own.
        let lazy = mm.lazy().is_some();
        let vcpu_cpus: Vec<Option<usize>> = layout.vcpu_cpus.iter().map(|c| c.filter(|_| lazy)).collect();

        let mut vm = Vm {
            config: config.clone(),
            vcpus: VcpuSet::Built(fds),
            started: Vec::new(),
            devices: None,
            memory: mm,
            vm_fd,
            sink: options.sink,
            serial: options.serial,
            first_output: Arc::new(OnceLock::new()),
            created,
            tsc_khz,
            vcpu_cpus,
            msrs,
            seccomp: options.seccomp,
            parked: Vec::new(),
        };
        if let Boot::Incoming = boot {
            // The threads (and their filters) now, not after the source paused.
            for i in 0..config.vcpus {
                vm.parked.push(ParkedThread::spawn(i, vm.seccomp)?);
            }
        }
        match boot {
            Boot::Kernel => vm.boot_registers(entry)?,
            Boot::Restore(state) => vm.apply_state(state)?,
            Boot::Incoming => {}
        }
        Ok(vm)
    }

    fn device_args(&self) -> DeviceArgs {
        DeviceArgs {
            vm_fd: self.vm_fd.clone(),
            ram: self.memory.ram().clone(),
            sink: self.sink.clone(),
            serial: self.serial.clone(),
            first_output: self.first_output.clone(),
            seccomp: self.seccomp,
        }
    }

    /// Fresh devices and the entry state: every vCPU in long mode at the
    /// kernel's entry; only the bootstrap vCPU runs at first (see `abi::boot`).
    fn boot_registers(&mut self, entry: u64) -> Result<(), VmError> {
        self.devices = Some(DeviceManager::new(self.device_args())?);
        let VcpuSet::Built(fds) = &self.vcpus else {
            return Err(VmError::Phase("the vCPUs already run"));
        };
        for (i, fd) in (0u32..).zip(fds) {
            let sregs = fd.get_sregs().map_err(kvm_err("sregs read"))?;
            fd.set_sregs(&cpu::long_mode_sregs(sregs))
                .map_err(kvm_err("sregs setup"))?;
            fd.set_regs(&cpu::entry_regs(entry, i))
                .map_err(kvm_err("register setup"))?;
            fd.set_fpu(&cpu::initial_fpu()).map_err(kvm_err("FPU setup"))?;
            // With the in-kernel LAPIC, secondary vCPUs would wait for INIT/SIPI;
            // they are started directly in long mode instead (see abi::boot).
            fd.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(kvm_err("MP state setup"))?;
        }
        self.started = (0..fds.len()).map(|i| i == 0).collect();
        Ok(())
    }

    /// Applies a saved state to a VM built with [`Boot::Incoming`] (or, while
    /// building, [`Boot::Restore`]): the VM-wide KVM state, the devices, and
    /// every vCPU. Memory contents are the memory plan's business.
    pub fn apply_state(&mut self, state: &VmState) -> Result<(), VmError> {
        check_state(&self.config, state)?;
        if self.devices.is_some() {
            return Err(VmError::Phase("the VM already has its state"));
        }
        let VcpuSet::Built(fds) = &self.vcpus else {
            return Err(VmError::Phase("the vCPUs already run"));
        };
        KvmVmComponent::restore(&self.vm_fd, &state.kvm)?;
        for ((i, fd), s) in (0u32..).zip(fds).zip(&state.vcpus) {
            VcpuComponent::restore(VcpuComponent { fd, msr_indices: &[] }, s)
                .map_err(|source| VmError::VcpuState { cpu: i, source })?;
        }
        self.devices = Some(DeviceManager::restore(self.device_args(), &state.devices)?);
        self.started.clone_from(&state.started);
        Ok(())
    }

    /// Starts the vCPU threads: the ones the guest had started run.
    pub fn start(&mut self) -> Result<(), VmError> {
        let Some(devices) = &self.devices else {
            return Err(VmError::Phase(
                "the VM has no state yet (an incoming VM starts once its state is applied)",
            ));
        };
        let fds = match std::mem::replace(&mut self.vcpus, VcpuSet::Gone) {
            VcpuSet::Built(fds) => fds,
            other => {
                self.vcpus = other;
                return Err(VmError::Phase("the VM was started already"));
            }
        };
        let on_stop: StopSink = {
            let sink = self.sink.clone();
            Arc::new(move |s| sink(VmEvent::VcpuStopped(s)))
        };
        let vcpus = Vcpus::spawn(
            fds,
            devices.bus(),
            self.started.clone(),
            on_stop,
            &self.vcpu_cpus,
            self.seccomp,
            std::mem::take(&mut self.parked),
        )?;
        self.vcpus = VcpuSet::Running(vcpus);
        Ok(())
    }

    fn running(&mut self) -> Result<&mut Vcpus, VmError> {
        match &mut self.vcpus {
            VcpuSet::Running(v) => Ok(v),
            _ => Err(VmError::Phase("the VM's vCPUs are not running")),
        }
    }

    /// Pauses every started vCPU (vCPUs blocked in a stage-2 fault are
    /// reported, not waited for; see `vcpu::manager`).
    pub fn pause(&mut self) -> Result<PauseReport, VmError> {
        let memory = &self.memory;
        let VcpuSet::Running(v) = &mut self.vcpus else {
            return Err(VmError::Phase("the VM's vCPUs are not running"));
        };
        Ok(v.pause(&|| memory.blocked())?)
    }

    /// Pauses every started vCPU without signalling those blocked in a
    /// userfault (faults nobody serves: see `Vcpus::pause_sparing_blocked`).
    pub fn pause_sparing_blocked(&mut self) -> Result<PauseReport, VmError> {
        let memory = &self.memory;
        let VcpuSet::Running(v) = &mut self.vcpus else {
            return Err(VmError::Phase("the VM's vCPUs are not running"));
        };
        Ok(v.pause_sparing_blocked(&|| memory.blocked())?)
    }

    /// The thread id of each vCPU (once its thread runs).
    pub fn vcpu_tids(&self) -> Vec<Option<u32>> {
        match &self.vcpus {
            VcpuSet::Running(v) => v.stats().into_iter().map(|(_, tid)| tid).collect(),
            _ => Vec::new(),
        }
    }

    /// Resumes every started vCPU.
    pub fn resume(&mut self) -> Result<(), VmError> {
        let memory = &self.memory;
        let VcpuSet::Running(v) = &mut self.vcpus else {
            return Err(VmError::Phase("the VM's vCPUs are not running"));
        };
        Ok(v.resume(&|| memory.blocked())?)
    }

    /// Kicks one vCPU, or all, out of the guest (they re-enter).
    pub fn kick(&self, cpu: Option<u32>) {
        if let VcpuSet::Running(v) = &self.vcpus {
            v.kick(cpu);
        }
    }

    /// Runs `f` on vCPU `cpu`'s thread between two guest entries.
    pub fn run_on_vcpu(&mut self, cpu: u32, f: VcpuFn) -> Result<(), VmError> {
        Ok(self.running()?.run_on(cpu, f)?)
    }

    /// The guest's `START_CPUS`: marks the secondary vCPUs started and, with
    /// `run_now`, runs them (else at the next resume). `false` if the guest
    /// had started them already.
    pub fn start_secondaries(&mut self, run_now: bool) -> Result<bool, VmError> {
        let v = self.running()?;
        let first = v.start_secondaries(run_now);
        self.started = self.running()?.started().to_vec();
        Ok(first)
    }

    /// Stops the devices that act on their own (the page store's worker)
    /// from touching guest memory; for a consistent capture of state and
    /// memory, with the vCPUs paused.
    pub fn pause_devices(&self) -> Result<(), VmError> {
        match &self.devices {
            Some(d) => Ok(d.pause()?),
            None => Ok(()),
        }
    }

    /// Lets paused devices go on.
    pub fn resume_devices(&self) {
        if let Some(d) = &self.devices {
            d.resume();
        }
    }

    /// Captures the VM's state (not memory contents). The vCPUs must be
    /// paused and the devices paused ([`pause_devices`](Self::pause_devices)).
    pub fn save_state(&mut self) -> Result<VmState, VmError> {
        let msrs = self.msrs.clone();
        let vcpus = self.running()?.save_states(&msrs)?;
        let devices = self
            .devices
            .as_ref()
            .ok_or(VmError::Phase("the VM has no devices"))?
            .save()?;
        Ok(VmState {
            config: ConfigState::from(&self.config),
            memory: self.memory.save()?,
            kvm: KvmVmComponent(&self.vm_fd).save()?,
            vcpus,
            started: self.started.clone(),
            devices,
        })
    }

    /// Stops and joins every vCPU at the end of a run. A vCPU blocked on a
    /// page that cannot be served ignores kicks (a kernel-mode access spins,
    /// docs/platform.md): with `void` (the run's results no longer matter) guest
    /// RAM is unregistered from userfaultfd to let such a vCPU see the stop.
    pub fn stop(&mut self, patience: Duration, void: bool) {
        let memory = &self.memory;
        let VcpuSet::Running(v) = &mut self.vcpus else {
            return;
        };
        let mut stuck = v.stop(patience);
        if !stuck.is_empty() && (void || memory.lazy().is_some()) {
            // The run is over and its results are void: unregistering wakes the
            // stuck vCPUs (their page reads as zero), so they can see the stop.
            memory.release_blocked();
            stuck = v.stop_again(stuck, Duration::from_secs(2));
        }
        for (_, e) in stuck {
            // Left behind rather than hanging the VMM.
            tracing::warn!("{e}");
        }
    }

    /// Per-vCPU counters, with each vCPU's stage-2 faults, retries and time
    /// blocked (the userfault handler's accounting of its thread).
    pub fn vcpu_stats(&self) -> Vec<VcpuStatsSnapshot> {
        let VcpuSet::Running(v) = &self.vcpus else {
            return Vec::new();
        };
        let per_thread = self.memory.per_thread();
        v.stats()
            .into_iter()
            .map(|(mut s, tid)| {
                s.host_cpu = self.vcpu_cpus.get(s.cpu as usize).copied().flatten();
                if let Some(t) = tid.and_then(|t| per_thread.get(&t)) {
                    s.stage2_faults = t.faults;
                    s.stage2_retries = t.retries;
                    s.stage2_blocked_us = t.blocked_ns / 1000;
                }
                s
            })
            .collect()
    }

    /// Statistics of lazily served memory.
    pub fn memory_stats(&self) -> Option<MemoryStats> {
        self.memory.stats()
    }

    /// The memory manager.
    pub fn memory(&self) -> &MemoryManager {
        &self.memory
    }

    /// The memory manager, to stop its handler at the end of a run.
    pub fn memory_mut(&mut self) -> &mut MemoryManager {
        &mut self.memory
    }

    /// The devices (once the VM has its state).
    pub fn devices(&self) -> Option<&DeviceManager> {
        self.devices.as_ref()
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm_fd
    }

    /// Which vCPUs the guest has started.
    pub fn started(&self) -> &[bool] {
        &self.started
    }

    /// When building began.
    pub fn created(&self) -> Instant {
        self.created
    }

    /// Counts from building instead (a restore measured from reading its files).
    pub fn set_created(&mut self, at: Instant) {
        self.created = at;
    }

    /// When the guest printed its first console byte.
    pub fn first_output(&self) -> Option<Instant> {
        self.first_output.get().copied()
    }

    /// The guest's TSC frequency in kHz.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.tsc_khz
    }

    /// How the VM's threads are sandboxed.
    pub fn seccomp(&self) -> SeccompMode {
        self.seccomp
    }
}

/// Checks a saved state against the configuration it is restored with.
fn check_state(config: &VmConfig, state: &VmState) -> Result<(), VmError> {
    state.check()?;
    let saved = &state.config;
    if (saved.vcpus, saved.mem_size) != (config.vcpus, config.mem_size) {
        return Err(StateMismatch(format!(
            "the state is of a VM with {} vCPUs and {} bytes of RAM, this one has {} and {}",
            saved.vcpus, saved.mem_size, config.vcpus, config.mem_size
        ))
        .into());
    }
    Ok(())
}
