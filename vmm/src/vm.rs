//! A microVM: KVM VM, guest memory, devices, vCPU threads, and the controller
//! that runs them until the guest exits.

use crate::arch::x86_64::{cpu, paging};
use crate::config::{KernelSource, MemoryConfig, VmConfig};
use crate::controller::{self, BlockedFn, EventSender, RunningVm, VmEvent};
use crate::lazy::{LazyError, LazyMemory, MemoryStats};
use crate::loader::{self, LoaderError};
use crate::memory::{self, MemoryError};
use crate::snapshot::Snapshot;
use crate::snapshot_source::SnapshotSource;
use crate::vcpu::{VcpuError, VcpuHandle, VcpuStatsSnapshot, VcpuStopped};
use abi::exit::ExitCode;
use abi::ports::{DEBUG_EXIT_PORT, PV_CHANNEL_PORT, SERIAL_PORT, SERIAL_PORT_LEN};
use abi::pv::WorkloadReport;
use abi::workload::{self, WorkloadKind};
use devices::debug_exit::DebugExit;
use devices::pv_channel::PvChannel;
use devices::serial::{SerialConsole, SerialOutput};
use devices::DeviceEventSink;
use devices::GuestRam;
use kvm_bindings::{
    kvm_mp_state, kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use vm_device::bus::{PioAddress, PioRange};
use vm_device::device_manager::{IoManager, PioManager};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Errors setting up or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm is missing.
    #[error("cannot open /dev/kvm: it does not exist; this machine has no KVM (load the kvm module, or run on a host with virtualization)")]
    NoKvm,
    /// /dev/kvm is not accessible.
    #[error("cannot open /dev/kvm: permission denied; run as root or add your user to the `kvm` group")]
    KvmPermission,
    /// /dev/kvm failed otherwise.
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(kvm_ioctls::Error),
    /// KVM API version mismatch.
    #[error("KVM API version {0} is not supported (need 12); the host kernel is too old or unusual")]
    KvmApiVersion(i32),
    /// A needed capability is missing.
    #[error("KVM lacks the {0} capability; a Linux host of 4.14 or newer is needed")]
    MissingCap(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// The kernel file cannot be read.
    #[error("cannot read kernel file {path}: {source}")]
    KernelFile {
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading the guest.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// Boot tables.
    #[error(transparent)]
    Paging(#[from] paging::PagingError),
    /// vCPU control.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Lazily backed guest memory.
    #[error(transparent)]
    Lazy(#[from] LazyError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Devices / event loop.
    #[error("device setup failed: {0}")]
    Device(String),
    /// The external page-fault handler cannot be reached.
    #[error(transparent)]
    UffdBackend(#[from] crate::uffd_backend::UffdBackendError),
    /// A snapshot cannot be restored.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

/// How a VM run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEnd {
    /// The guest wrote this code to the debug-exit port.
    Exited(u32),
    /// A vCPU stopped on an exit the guest cannot recover from.
    Crashed(VcpuStopped),
    /// `VmOptions::timeout` passed first.
    TimedOut(Duration),
    /// A guest page could not be served by the memory backend (the page was not
    /// zero-filled; the VM was stopped). The message names the page and the cause.
    MemoryFault(String),
    /// A control request stopped the run.
    Stopped,
    /// The VM migrated to another VMM (`vmm ctl PATH migrate`); the summary.
    Migrated(String),
    /// A shutdown signal (SIGINT, SIGTERM, SIGHUP) ended the run.
    Signal(i32),
}

impl std::fmt::Display for GuestEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestEnd::Exited(code) => write!(f, "exited with code {code}"),
            GuestEnd::Crashed(s) => write!(f, "crashed on vCPU {}: {}", s.cpu, s.reason),
            GuestEnd::TimedOut(t) => write!(f, "timed out after {t:?}"),
            GuestEnd::MemoryFault(m) => write!(f, "memory fault: {m}"),
            GuestEnd::Stopped => write!(f, "stopped on request"),
            GuestEnd::Migrated(s) => write!(f, "migrated: {s}"),
            GuestEnd::Signal(sig) => write!(f, "ended by signal {sig}"),
        }
    }
}

/// Process exit code when a vCPU crashed (triple fault, emulator error...).
pub const EXIT_CRASHED: i32 = 10;
/// Process exit code when the run timed out.
pub const EXIT_TIMED_OUT: i32 = 11;
/// Process exit code when the host-side check of a workload result failed.
pub const EXIT_BAD_RESULT: i32 = 12;
/// Process exit code when guest memory could not be served (memory backend failure).
pub const EXIT_MEMORY_FAULT: i32 = 13;
/// Process exit code when a control request stopped the run.
pub const EXIT_STOPPED: i32 = 14;
/// Process exit code for VMM errors (configuration, KVM, loading).
pub const EXIT_VMM_ERROR: i32 = 64;

/// The result of a run.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// How it ended.
    pub end: GuestEnd,
    /// Workload reports received from the guest, by vCPU.
    pub reports: Vec<WorkloadReport>,
    /// Time from the start of VM creation to the guest's first console byte.
    pub first_output: Option<Duration>,
    /// Time from the start of VM creation to the end of the run.
    pub elapsed: Duration,
    /// Per-vCPU counters.
    pub vcpu_stats: Vec<VcpuStatsSnapshot>,
    /// Requests the guest sent that the VMM rejected.
    pub bad_requests: Vec<String>,
    /// Retry-core statistics, when guest RAM is lazily backed.
    pub memory: Option<MemoryStats>,
    /// The guest's TSC frequency in kHz (converts reported cycles to time).
    pub tsc_khz: Option<u32>,
    /// Guest kernel fault statistics (page-store device, `abi::pv::store::STATS`).
    pub guest_stats: Option<abi::pv::store::GuestStats>,
}

impl RunOutcome {
    /// The combined checksum of all reports.
    pub fn checksum(&self) -> u64 {
        self.reports
            .iter()
            .fold(0, |t, r| workload::combine(t, r.checksum))
    }

    /// The exit code the `vmm` process uses.
    pub fn exit_code(&self) -> i32 {
        match &self.end {
            GuestEnd::Exited(code) => i32::try_from(*code).unwrap_or(ExitCode::Failure as i32),
            GuestEnd::Crashed(_) => EXIT_CRASHED,
            GuestEnd::TimedOut(_) => EXIT_TIMED_OUT,
            GuestEnd::MemoryFault(_) => EXIT_MEMORY_FAULT,
            GuestEnd::Stopped => EXIT_STOPPED,
            GuestEnd::Migrated(_) => 0,
            GuestEnd::Signal(sig) => 128 + sig,
        }
    }

    /// The run's statistics as JSON (`vmm run --stats`).
    pub fn stats_json(&self) -> serde_json::Value {
        serde_json::json!({
            "end": self.end.to_string(),
            "exit_code": self.exit_code(),
            "elapsed_ms": self.elapsed.as_secs_f64() * 1e3,
            "first_output_ms": self.first_output.map(|d| d.as_secs_f64() * 1e3),
            "checksum": format!("{:#018x}", self.checksum()),
            "vcpus": self.vcpu_stats,
            "memory": self.memory,
            // Guest kernel's own (stage-1) fault figures, next to the host's.
            "guest": self.guest_stats.map(|g| serde_json::json!({
                "faults": g.faults, "retries": g.retries, "max_retries": g.max_retries,
                "retry_hist": g.retry_hist, "signal_interruptions": g.signal_interruptions,
                "userfaults": g.userfaults, "store_reads": g.store_reads,
                "ticks": g.ticks, "switches": g.switches,
            })),
        })
    }
}

/// Run-time options that are not part of the VM's configuration.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Where the console goes.
    pub serial: SerialOutput,
    /// Feed the host's stdin to the console.
    pub stdin: bool,
    /// Give up after this long (a guard against hangs, not a performance goal).
    pub timeout: Option<Duration>,
    /// End the run cleanly on SIGINT/SIGTERM/SIGHUP (read with a signalfd; the
    /// caller must have blocked them with `signals::block_shutdown_signals`).
    pub shutdown_signals: bool,
    /// What to do when a page source fails: the VM is paused either way (the
    /// page is never zero-filled); `End` then ends the run with the error.
    pub on_memory_fault: MemoryFaultPolicy,
    /// Serve lazily backed memory from this source instead of the backend's
    /// own (tests hold, delay or fail pages with `memory::TestSource`).
    pub page_source: Option<CustomSource>,
}

/// See [`VmOptions::on_memory_fault`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryFaultPolicy {
    /// Pause, then end the run with [`GuestEnd::MemoryFault`] (the CLI).
    #[default]
    End,
    /// Pause and stay paused: the caller may repair the source (which then
    /// notifies, so the parked fault is retried) and resume.
    Pause,
}

/// A page source given at run time (see [`VmOptions::page_source`]).
#[derive(Clone)]
pub struct CustomSource(pub Arc<dyn ::memory::PageSource>);

impl std::fmt::Debug for CustomSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CustomSource({})", self.0.name())
    }
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            serial: SerialOutput::Stdout,
            stdin: false,
            timeout: None,
            shutdown_signals: false,
            page_source: None,
            on_memory_fault: MemoryFaultPolicy::End,
        }
    }
}

/// How [`Vm::restore`] brings guest memory back.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Serve memory lazily from the snapshot's memory file through the retry
    /// core (each extent checked on first use) instead of copying it in.
    pub lazy: bool,
    /// With `lazy`: a background thread fetches the remaining pages.
    pub prefetch: bool,
    /// With `lazy`: fault-around window (`None` = default).
    pub fault_around: Option<u32>,
    /// Hand guest memory to an external page-fault handler listening on this
    /// Unix socket (Firecracker's UFFD handshake, `uffd_backend`) instead.
    pub uffd_socket: Option<std::path::PathBuf>,
}

/// A built, not yet running VM.
pub struct Vm {
    config: VmConfig,
    pub(crate) options: VmOptions,
    // Declared before `_mem` so it drops first: its handler fills pages of that mapping.
    lazy: Option<LazyMemory>,
    // The userfaultfd handed to an external handler: open while memory lives.
    _external_uffd: Option<::memory::Uffd>,
    // Kept alive while the vCPUs run: the memslots point into this mapping.
    _mem: GuestRam,
    vm_fd: Arc<VmFd>,
    pub(crate) vcpu_fds: Vec<VcpuFd>,
    /// A restored VM's started vCPUs and reports received before its snapshot.
    pub(crate) restored: Option<(Vec<bool>, Vec<WorkloadReport>)>,
    pub(crate) bus: Arc<IoManager>,
    pub(crate) serial: Arc<Mutex<SerialConsole>>,
    events_rx: Receiver<VmEvent>,
    pub(crate) events: EventSender,
    first_output: Arc<OnceLock<Instant>>,
    created: Instant,
    tsc_khz: Option<u32>,
    /// The CPU vCPU 0 and the fault handler share (a lone vCPU with lazy memory).
    pub(crate) fault_cpu: Option<usize>,
    // Filled by the page-store device when the guest sends its statistics.
    guest_stats: devices::page_store::GuestStatsCell,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Opens /dev/kvm and checks the API and the capabilities the VMM relies on.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => VmError::NoKvm,
        libc::EACCES | libc::EPERM => VmError::KvmPermission,
        _ => VmError::KvmOpen(e),
    })?;
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(VmError::KvmApiVersion(v));
    }
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

impl Vm {
    /// Creates the VM: KVM objects, memory, devices, the loaded guest, vCPUs.
    pub fn new(config: &VmConfig, options: VmOptions) -> Result<Vm, VmError> {
        Self::build(config, options, None)
    }

    /// Builds the VM saved in snapshot directory `dir` (see `docs/snapshot.md`):
    /// same configuration and memory layout, KVM and device state restored
    /// before any vCPU runs, no kernel loaded. Every file is checked first; an
    /// eager restore also checks every memory extent while copying it in.
    pub fn restore(dir: &std::path::Path, how: &RestoreOptions, options: VmOptions) -> Result<Vm, VmError> {
        let created = Instant::now();
        let snap = Snapshot::open(dir)?;
        let memory = if how.lazy && how.uffd_socket.is_none() {
            MemoryConfig {
                backend: crate::config::MemBackend::File {
                    path: snap.memory_path(),
                    offset: 0,
                },
                fault_around: how.fault_around,
            }
        } else {
            MemoryConfig::default()
        };
        let config = snap.config(memory)?;
        let mut vm = Self::build(&config, options, Some((&snap, how)))?;
        vm.created = created;
        Ok(vm)
    }

    /// Builds a VM received by a post-copy migration: `snap` is the received
    /// state and extents (no memory file); guest RAM is served by `source`
    /// through the retry core, one page at a time.
    pub fn from_migration(
        snap: &Snapshot,
        source: Arc<dyn ::memory::PageSource>,
        mut options: VmOptions,
    ) -> Result<Vm, VmError> {
        let memory = MemoryConfig {
            backend: crate::config::MemBackend::Zero,
            fault_around: Some(0),
        };
        let config = snap.config(memory)?;
        options.page_source = Some(CustomSource(source));
        let how = RestoreOptions {
            lazy: true,
            ..Default::default()
        };
        Self::build(&config, options, Some((snap, &how)))
    }

    /// Fetches pages through the retry cores (lazily backed memory only).
    pub fn materializer(&self) -> Option<crate::lazy::Materializer> {
        self.lazy.as_ref().map(LazyMemory::materializer)
    }

    fn build(
        config: &VmConfig,
        options: VmOptions,
        restoring: Option<(&Snapshot, &RestoreOptions)>,
    ) -> Result<Vm, VmError> {
        let restore = restoring.map(|(s, _)| s);
        let prefetch = restoring.is_some_and(|(_, h)| h.prefetch);
        let uffd_socket = restoring.and_then(|(_, h)| h.uffd_socket.as_deref());
        let created = Instant::now();
        config.validate()?;
        let memory = &config.memory;
        let kernel_image = match (&config.kernel, restore) {
            // A restored guest's kernel is in its memory already.
            (_, Some(_)) => std::borrow::Cow::Borrowed(&[][..]),
            (KernelSource::Bundled, None) => std::borrow::Cow::Borrowed(crate::guest::KERNEL),
            (KernelSource::File(p), None) => {
                std::borrow::Cow::Owned(std::fs::read(p).map_err(|source| VmError::KernelFile {
                    path: p.display().to_string(),
                    source,
                })?)
            }
        };

        let kvm = open_kvm()?;
        let vm_fd = kvm.create_vm().map_err(kvm_err("VM creation"))?;
        vm_fd
            .set_tss_address(0xfffb_d000)
            .map_err(kvm_err("TSS address setup"))?;
        vm_fd.create_irq_chip().map_err(kvm_err("irqchip creation"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("PIT creation"))?;

        let mem = memory::create_guest_memory(config.mem_size)?;
        memory::register_memslots(&vm_fd, &mem)?;
        let mut entry = 0;
        let mut snapshot_source = None;
        match restore {
            None => {
                paging::write_boot_tables(&mem)?;
                let (e, _kernel_end) = loader::load_kernel(&mem, config.mem_size, &kernel_image)?;
                entry = e;
                let module = loader::load_module(&mem, crate::guest::USER)?;
                let info = loader::boot_info(config.mem_size, config.vcpus, &config.cmdline, module)?;
                loader::write_boot_info(&mem, &info)?;
            }
            // The external handler serves every page (see below).
            Some(_) if uffd_socket.is_some() => {}
            // A custom source (a migration's) serves every page.
            Some(_) if options.page_source.is_some() && memory.backend.is_lazy() => {}
            Some(snap) if memory.backend.is_lazy() => {
                let src = SnapshotSource::open(snap).map_err(LazyError::Source)?;
                snapshot_source = Some(Arc::new(src));
            }
            Some(snap) => snap.fill_memory(&mem)?,
        }
        // Only now, with every page the VMM writes present, may RAM be handed to
        // userfaultfd: a VMM write to a missing page would block this thread.
        let custom = options.page_source.as_ref().map(|s| s.0.clone());
        // A stage-2 userfault blocks the vCPU thread until the handler fills the
        // page: on one CPU the two hand over directly, across CPUs each fault
        // pays two remote wake-ups (docs/retry-core.md, "Thread placement").
        // With several vCPUs the handler stays unpinned: on a vCPU's CPU it
        // would wait behind that running vCPU while another one's fault waits.
        let fault_cpu = if config.vcpus == 1 {
            ::memory::colocation_cpu()
        } else {
            None
        };
        let mut lazy = LazyMemory::start(
            &mem,
            &memory.backend,
            memory.effective_fault_around(),
            custom.or_else(|| {
                snapshot_source
                    .clone()
                    .map(|s| s as Arc<dyn ::memory::PageSource>)
            }),
            fault_cpu,
        )?;
        let fault_cpu = fault_cpu.filter(|_| lazy.is_some());
        if let (Some(l), Some(snap), true) = (lazy.as_mut(), restore, options.page_source.is_some()) {
            l.set_data_ranges(
                snap.manifest
                    .memory
                    .extents
                    .iter()
                    .map(|e| (e.gpa, e.len))
                    .collect(),
            );
        }
        if let (Some(l), Some(src)) = (lazy.as_mut(), &snapshot_source) {
            l.set_data_ranges(src.data_ranges());
            if prefetch {
                l.start_prefetch()?;
            }
        }
        let external_uffd = match uffd_socket {
            Some(path) => Some(crate::uffd_backend::hand_over(&mem, path)?),
            None => None,
        };
        if let Some(snap) = restore {
            crate::snapshot::restore_vm(&vm_fd, &snap.state)?;
        }

        // Devices.
        let (events_tx, events_rx) = mpsc::channel();
        let events_fd = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Device(e.to_string()))?);
        let events = EventSender::new(events_tx, events_fd);
        let sink: DeviceEventSink = {
            let events = events.clone();
            Arc::new(move |ev| {
                events.send(VmEvent::Device(ev));
            })
        };
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Device(e.to_string()))?;
        vm_fd
            .register_irqfd(&serial_irq, 4)
            .map_err(kvm_err("serial irqfd registration"))?;
        let first_output = Arc::new(OnceLock::new());
        let serial = Arc::new(Mutex::new(match restore {
            None => {
                SerialConsole::with_first_output(serial_irq, options.serial.clone(), first_output.clone())
            }
            Some(snap) => SerialConsole::from_state(
                serial_irq,
                options.serial.clone(),
                first_output.clone(),
                &snap.state.serial.to_state(),
            )
            .map_err(|e| VmError::Device(format!("serial state from the snapshot: {e}")))?,
        }));
        let mut bus = IoManager::new();
        let range =
            |base, len| PioRange::new(PioAddress(base), len).map_err(|e| VmError::Device(format!("{e:?}")));
        bus.register_pio(range(SERIAL_PORT, SERIAL_PORT_LEN)?, serial.clone())
            .map_err(|e| VmError::Device(format!("serial: {e:?}")))?;
        bus.register_pio(
            range(DEBUG_EXIT_PORT, 4)?,
            Arc::new(Mutex::new(DebugExit::new(sink.clone()))),
        )
        .map_err(|e| VmError::Device(format!("debug-exit: {e:?}")))?;
        bus.register_pio(
            range(PV_CHANNEL_PORT, 4)?,
            Arc::new(Mutex::new(PvChannel::new(mem.clone(), sink.clone()))),
        )
        .map_err(|e| VmError::Device(format!("pv channel: {e:?}")))?;
        // The guest kernel's slow page store (answers asynchronously) and stats.
        let guest_stats = devices::page_store::GuestStatsCell::default();
        let store = devices::page_store::PageStore::new(mem.clone(), sink, guest_stats.clone())
            .map_err(|e| VmError::Device(format!("page store: {e}")))?;
        bus.register_pio(
            range(abi::ports::PAGE_STORE_PORT, 4)?,
            Arc::new(Mutex::new(store)),
        )
        .map_err(|e| VmError::Device(format!("page store: {e:?}")))?;

        // vCPUs.
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("CPUID query"))?;
        let mut vcpu_fds = Vec::new();
        let mut tsc_khz = None;
        for i in 0..config.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(i))
                .map_err(kvm_err("vCPU creation"))?;
            let mut cpuid = supported.clone();
            cpu::patch_cpuid(&mut cpuid, i, config.vcpus);
            fd.set_cpuid2(&cpuid).map_err(kvm_err("CPUID setup"))?;
            if let Some(snap) = restore {
                let state = snap
                    .state
                    .vcpus
                    .get(i as usize)
                    .ok_or_else(|| VmError::Device(format!("the snapshot has no state for vCPU {i}")))?;
                crate::snapshot::restore_vcpu(&fd, state)?;
                if tsc_khz.is_none() {
                    tsc_khz = fd.get_tsc_khz().ok();
                }
                vcpu_fds.push(fd);
                continue;
            }
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
            if tsc_khz.is_none() {
                tsc_khz = fd.get_tsc_khz().ok();
            }
            vcpu_fds.push(fd);
        }

        Ok(Vm {
            config: config.clone(),
            options,
            lazy,
            _external_uffd: external_uffd,
            _mem: mem,
            vm_fd: Arc::new(vm_fd),
            vcpu_fds,
            restored: restore.map(|s| {
                let reports = s.state.reports.iter().map(WorkloadReport::from).collect();
                (s.state.started.clone(), reports)
            }),
            bus: Arc::new(bus),
            serial,
            events_rx,
            events,
            first_output,
            created,
            tsc_khz,
            fault_cpu,
            guest_stats,
        })
    }

    /// Starts the vCPUs and the controller; the VM can then be paused, resumed,
    /// kicked and stopped through the returned handle.
    pub fn start(self) -> Result<RunningVm, VmError> {
        controller::start(self)
    }

    /// Runs the VM until the guest exits, a vCPU crashes, a shutdown signal
    /// arrives or the timeout passes.
    pub fn run(self) -> Result<RunOutcome, VmError> {
        self.start()?.wait()
    }

    pub(crate) fn take_events_rx(&mut self) -> Receiver<VmEvent> {
        std::mem::replace(&mut self.events_rx, mpsc::channel().1)
    }

    /// Lists the faults blocked in the userfault handler (none without lazy memory).
    pub(crate) fn blocked_faults_fn(&self) -> BlockedFn {
        match &self.lazy {
            Some(lazy) => lazy.blocked_fn(),
            None => Box::new(Vec::new),
        }
    }

    /// Stops and joins every vCPU at the end of a run.
    pub(crate) fn stop_vcpus(&self, handles: &mut [VcpuHandle], end: &GuestEnd) {
        // A vCPU blocked on a page that cannot be served ignores kicks (a
        // kernel-mode access spins, PLATFORM.md): do not wait long for it.
        let patience = if matches!(end, GuestEnd::MemoryFault(_)) {
            Duration::from_millis(300)
        } else {
            Duration::from_secs(2)
        };
        let mut stuck = Vec::new();
        for h in handles.iter_mut() {
            if let Err(e) = h.stop(patience) {
                stuck.push((h.cpu(), e));
            }
        }
        if let (false, Some(lazy)) = (stuck.is_empty(), &self.lazy) {
            // The run is over and its results are void: unregistering wakes the
            // stuck vCPUs (their page reads as zero), so they can see the stop.
            lazy.release_blocked();
            stuck.retain_mut(|(cpu, e)| {
                match handles
                    .iter_mut()
                    .find(|h| h.cpu() == *cpu)
                    .map(|h| h.stop(Duration::from_secs(2)))
                {
                    Some(Err(again)) => {
                        *e = again;
                        true
                    }
                    _ => false,
                }
            });
        }
        for (_, e) in stuck {
            // Left behind rather than hanging the VMM.
            tracing::warn!("{e}");
        }
    }

    /// The outcome of a finished run (stops the fault handler).
    pub(crate) fn outcome(
        &mut self,
        end: GuestEnd,
        reports: Vec<WorkloadReport>,
        vcpu_stats: Vec<(VcpuStatsSnapshot, Option<u32>)>,
        bad_requests: Vec<String>,
    ) -> RunOutcome {
        let per_thread = self.lazy.as_ref().map(LazyMemory::per_thread).unwrap_or_default();
        let vcpu_stats = vcpu_stats
            .into_iter()
            .map(|(mut s, tid)| {
                if let Some(t) = tid.and_then(|t| per_thread.get(&t)) {
                    s.stage2_faults = t.faults;
                    s.stage2_retries = t.retries;
                    s.stage2_blocked_us = t.blocked_ns / 1000;
                }
                s
            })
            .collect();
        let memory = self.lazy.as_mut().map(|l| {
            l.stop();
            l.stats()
        });
        RunOutcome {
            end,
            reports,
            first_output: self.first_output.get().map(|t| t.duration_since(self.created)),
            elapsed: self.created.elapsed(),
            vcpu_stats,
            bad_requests,
            memory,
            tsc_khz: self.tsc_khz,
            guest_stats: self.guest_stats.lock().ok().and_then(|g| *g),
        }
    }

    /// The end of the run if the memory backend failed: never let the guest go
    /// on past a page that could not be provided.
    /// Every fault failure so far (the list only grows), and whether the
    /// handler itself is gone, which no repair can fix.
    pub(crate) fn memory_failures(&self) -> (Vec<String>, bool) {
        match &self.lazy {
            Some(lazy) => (
                lazy.failures().iter().map(ToString::to_string).collect(),
                lazy.handler_died(),
            ),
            None => (Vec::new(), false),
        }
    }

    /// What the controller needs to save a snapshot.
    pub(crate) fn save_ctx(&self) -> crate::snapshot::SaveCtx {
        crate::snapshot::SaveCtx {
            vm_fd: self.vm_fd.clone(),
            mem: self._mem.clone(),
            serial: self.serial.clone(),
            config: self.config.clone(),
            materializer: self.lazy.as_ref().map(LazyMemory::materializer),
            external_memory: self._external_uffd.is_some(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }
}

/// The host's check of the workload results against the command line, for the
/// bundled kernel: `Ok(None)` when there is nothing to check.
pub fn verify_reports(config: &VmConfig, outcome: &RunOutcome) -> Result<Option<u64>, String> {
    if config.kernel != KernelSource::Bundled {
        return Ok(None);
    }
    let wl = workload::parse_cmdline(&config.cmdline).map_err(|e| e.to_string())?;
    if wl.kind != WorkloadKind::Touch {
        return Ok(None);
    }
    let mut total = 0;
    for cpu in 0..config.vcpus {
        let plan = workload::task_plan(&wl, config.vcpus, cpu);
        let (first, pages) = (plan.first_page, plan.pages);
        let expected = plan.checksum(wl.pattern, wl.write, wl.seed);
        let r = outcome
            .reports
            .iter()
            .find(|r| r.cpu == cpu)
            .ok_or_else(|| format!("vCPU {cpu} sent no workload report"))?;
        if (r.first_page, r.pages) != (first, pages) {
            return Err(format!(
                "vCPU {cpu} touched pages {}..{} instead of {first}..{}",
                r.first_page,
                r.first_page + r.pages,
                first + pages
            ));
        }
        if r.checksum != expected {
            return Err(format!(
                "vCPU {cpu} checksum {:#018x}, expected {expected:#018x}",
                r.checksum
            ));
        }
        total = workload::combine(total, expected);
    }
    Ok(Some(total))
}
