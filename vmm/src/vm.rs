//! Building a VM the ways the orchestration needs (boot a kernel, restore a
//! snapshot, receive a migration) on the mechanism's phased builder, and
//! starting its controller. `Vm::new(&config, options)?.start()?` gives a
//! [`RunningVm`].

use crate::controller::{
    self, ControllerOptions, Event, EventSender, MemoryFaultPolicy, RunOutcome, RunningVm, StartError,
};
use crate::snapshot::shared::{SharedError, SharedMemory};
use crate::snapshot::source::SnapshotSource;
use crate::snapshot::working_set::{Recording, WorkingSet, WorkingSetError, WsContents, WORKING_SET};
use crate::snapshot::{Hasher, Snapshot, SnapshotError, SnapshotKey};
use crate::state::{ControllerState, SavedVm};
use crate::uffd_handler::{self, HandlerLink, Launcher, LostHook, UffdHandlerError};
use devices::serial::SerialOutput;
use sandbox::SeccompMode;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm_core::config::{
    ConfigError, FaultMode, HandlerConfig, MemBackend, MemBacking, MemoryConfig, VmConfig,
};
use vmm_core::memory::{self, LazyPlan, Materializer, MemoryManagerError, PagePrefetch};
use vmm_core::{Boot, BuildOptions, EventSink, MemoryEvent, MemoryPlan, VmEvent};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Errors building or starting a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The mechanism failed (KVM, memory, devices, vCPUs, loading).
    #[error(transparent)]
    Core(#[from] vmm_core::VmError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Guest memory's backing.
    #[error(transparent)]
    Memory(#[from] MemoryManagerError),
    /// A snapshot cannot be restored.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The external page-fault handler cannot be reached.
    #[error(transparent)]
    ExternalHandler(#[from] UffdHandlerError),
    /// The controller could not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// An external page-fault handler on huge pages.
    #[error("an external page-fault handler (--mem-backend uffd:SOCKET) serves 4 KiB pages, which a hugetlb mapping refuses: use --mem-backing anon or memfd")]
    HugeExternal,
    /// A clone's shared snapshot memory.
    #[error(transparent)]
    Shared(#[from] SharedError),
    /// The page source of a lazy restore cannot be opened.
    #[error("cannot open the snapshot's memory file: {0}")]
    Source(#[from] ::memory::SourceError),
    /// A working set cannot be read or recorded.
    #[error(transparent)]
    WorkingSet(#[from] WorkingSetError),
    /// A working set needs a lazy restore.
    #[error("a working set is recorded or prefetched by a lazy restore only: add --lazy")]
    WorkingSetNeedsLazy,
    /// `--record-working-set` on memory that is not served lazily.
    #[error("--record-working-set needs lazily served memory: use --mem-backend zero or file:PATH")]
    RecordWithoutLazyMemory,
    /// A custom page source for memory that is not served lazily.
    #[error("a custom page source needs lazily served memory: set memory.backend to zero or file:PATH")]
    SourceWithoutLazyMemory,
    /// The event channel's eventfd.
    #[error("cannot create the VM's event eventfd: {0}; raise the process's file descriptor limit")]
    EventFd(#[source] std::io::Error),
    /// The controller thread panicked.
    #[error(transparent)]
    Panicked(#[from] controller::ControllerPanicked),
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
    /// End the run cleanly on SIGINT/SIGTERM/SIGHUP (the process's signal
    /// watcher, `signals::start_watcher`, must run).
    pub shutdown_signals: bool,
    /// What to do when a page source fails: the VM is paused either way (the
    /// page is never zero-filled); `End` then ends the run with the error.
    pub on_memory_fault: MemoryFaultPolicy,
    /// Serve lazily backed memory from this source instead of the backend's
    /// own (tests hold, delay or fail pages with `memory::TestSource`).
    pub page_source: Option<CustomSource>,
    /// How the VM's threads are sandboxed (`docs/seccomp.md`); the default
    /// is `kill`, or what `VMM_SECCOMP` says.
    pub seccomp: SeccompMode,
    /// The snapshot key: snapshots this VM writes are authenticated with it,
    /// and a restore checks its snapshot with it (`--snapshot-key FILE`).
    pub snapshot_key: Option<SnapshotKey>,
    /// What memory guest RAM of a restored or received VM lives in
    /// (`--mem-backing`; a boot takes its configuration's).
    pub backing: MemBacking,
    /// How its lazily served pages are resolved (`--fault-mode`).
    pub fault_mode: FaultMode,
    /// A plain run over lazily backed memory: record its working set into
    /// this file (bound to no snapshot; `vmm run --record-working-set FILE`).
    pub record_working_set: Option<PathBuf>,
    /// When the guest reaches its checkpoint (the `faas` workload's
    /// `CHECKPOINT` request): snapshot to this directory and end the run.
    pub snapshot_at_checkpoint: Option<PathBuf>,
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
            seccomp: SeccompMode::process_default(),
            snapshot_key: None,
            backing: MemBacking::Anon,
            fault_mode: FaultMode::Missing,
            record_working_set: None,
            snapshot_at_checkpoint: None,
        }
    }
}

/// How [`Vm::restore`] brings guest memory back.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Serve memory lazily from the snapshot's memory file through the retry
    /// core (each extent checked on first use) instead of copying it in.
    pub lazy: bool,
    /// With `lazy`: a background thread fetches the remaining pages (after
    /// the working set, with `prefetch_working_set`).
    pub prefetch: bool,
    /// With `lazy`: fill the pages of `DIR/working-set` first, before the
    /// vCPUs resume (`Some(true)`) or while they run (`Some(false)`); the
    /// file must belong to this snapshot (`docs/working-set.md`).
    pub prefetch_working_set: Option<bool>,
    /// With `lazy`: record the pages the guest touches (every page a fault
    /// makes present, neighbours marked) into `DIR/working-set`, until
    /// `working-set-end` or the end of the run.
    pub record_working_set: bool,
    /// With `lazy`: fault-around window (`None` = default).
    pub fault_around: Option<u32>,
    /// With `lazy`: the fault-handler threads and where they run (the
    /// default: one per CPU used, `vmm_core::placement`).
    pub handlers: HandlerConfig,
    /// With `lazy`: start a clone: guest RAM is a private mapping of the
    /// snapshot's memory loaded once into a shared file in this directory
    /// (`crate::snapshot::shared`), served in MINOR mode.
    pub clone_dir: Option<PathBuf>,
    /// Hand guest memory to an external page-fault handler listening on this
    /// Unix socket (Firecracker's UFFD handshake, `uffd_handler`) instead.
    pub uffd_socket: Option<PathBuf>,
    /// With `uffd_socket`: the connection holder's program, run as
    /// `PROGRAM __uffd-peer SOCKET` (`None`: this executable, which must be
    /// the `vmm` binary or call `uffd_handler::peer::main` for that
    /// subcommand).
    pub peer_program: Option<PathBuf>,
    /// With `uffd_socket`: how long a VM whose handler died waits, paused,
    /// for a new one before the run ends with a memory fault (exit code 13);
    /// `None`: [`crate::controller::DEFAULT_GRACE`].
    pub handler_grace: Option<Duration>,
    /// With `uffd_socket`: how long faults may wait unread, nothing
    /// changing, before a handler that lives but no longer reads the
    /// userfaultfd is taken as gone (zero: never); `None`:
    /// [`crate::controller::external::DEFAULT_STALL`].
    pub handler_stall: Option<Duration>,
}

/// A built, not yet running VM.
pub struct Vm {
    core: vmm_core::Vm,
    options: VmOptions,
    events: EventSender,
    rx: Receiver<Event>,
    restored: ControllerState,
    external: Option<controller::ExternalHandler>,
    recording: Option<Arc<Recording>>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", self.core.config())
            .finish_non_exhaustive()
    }
}

/// The controller's channel: its two ends, and the mechanism's sink into it.
struct Channel {
    events: EventSender,
    rx: Receiver<Event>,
    sink: EventSink,
}

fn channel() -> Result<Channel, VmError> {
    let (tx, rx) = mpsc::channel();
    let fd = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)?);
    let events = EventSender::new(tx, fd);
    let sink: EventSink = {
        let events = events.clone();
        Arc::new(move |ev| {
            events.send(Event::Vm(ev));
        })
    };
    Ok(Channel { events, rx, sink })
}

/// The working set a lazy restore prefetches (`DIR/working-set`, which must
/// belong to this snapshot) and the recording it makes, as `how` asks.
fn working_set_plan(
    snap: &Snapshot,
    key: Option<&SnapshotKey>,
    how: &RestoreOptions,
    mem_size: u64,
) -> Result<(Option<PagePrefetch>, Option<Arc<Recording>>), VmError> {
    let working_set = match how.prefetch_working_set {
        None => None,
        Some(before_resume) => {
            let path = snap.dir.join(WORKING_SET);
            let h = Hasher::new(key);
            let (ws, file) = WorkingSet::open(&path, &h, Some(&snap.manifest.digest), mem_size)?;
            let pages = ws.pages.iter().map(|p| p.gpa).collect();
            let contents = WsContents::new(ws, file, &path, &h)
                .map(|c| Arc::new(c) as Arc<dyn vmm_core::memory::PrefetchContents>);
            Some(PagePrefetch {
                pages,
                before_resume,
                contents,
            })
        }
    };
    let recording = if how.record_working_set {
        Some(Arc::new(Recording::for_snapshot(snap, key)?))
    } else {
        None
    };
    Ok((working_set, recording))
}

impl Vm {
    fn assemble(
        config: &VmConfig,
        boot: Boot<'_>,
        plan: MemoryPlan<'_>,
        options: VmOptions,
        restored: ControllerState,
        channel: Channel,
    ) -> Result<Vm, VmError> {
        Self::assemble_with(config, boot, plan, options, restored, channel, None)
    }

    fn assemble_with(
        config: &VmConfig,
        boot: Boot<'_>,
        plan: MemoryPlan<'_>,
        options: VmOptions,
        restored: ControllerState,
        channel: Channel,
        shared_ram: Option<memory::SharedRam>,
    ) -> Result<Vm, VmError> {
        let Channel { events, rx, sink } = channel;
        let core = vmm_core::Vm::build(
            config,
            boot,
            plan,
            BuildOptions {
                serial: options.serial.clone(),
                sink,
                shared_ram,
                seccomp: options.seccomp,
            },
        )?;
        Ok(Vm {
            core,
            options,
            events,
            rx,
            restored,
            external: None,
            recording: None,
        })
    }

    /// Builds a VM that boots `config`'s kernel, its memory backed as the
    /// configuration says (or served from `options.page_source`).
    pub fn new(config: &VmConfig, options: VmOptions) -> Result<Vm, VmError> {
        config.validate()?;
        let ch = channel()?;
        let recording = options
            .record_working_set
            .as_deref()
            .map(|p| Arc::new(Recording::to_file(p, config.mem_size)));
        let plan = match (&options.page_source, &recording) {
            (None, None) => MemoryPlan::Configured,
            (custom, _) => {
                let fault_around = config.memory.effective_fault_around();
                let mut plan =
                    memory::plan_for_backend(&config.memory.backend, fault_around, config.mem_size)?.ok_or(
                        if custom.is_some() {
                            VmError::SourceWithoutLazyMemory
                        } else {
                            VmError::RecordWithoutLazyMemory
                        },
                    )?;
                if let Some(custom) = custom {
                    plan.source = custom.0.clone();
                }
                plan.observer = recording.as_ref().map(|r| r.observer());
                MemoryPlan::Lazy(plan)
            }
        };
        let mut vm = Self::assemble(
            config,
            Boot::Kernel,
            plan,
            options,
            ControllerState::default(),
            ch,
        )?;
        vm.recording = recording;
        Ok(vm)
    }

    /// Builds the VM saved in snapshot directory `dir` (see `docs/snapshot.md`):
    /// same configuration and memory layout, KVM and device state restored
    /// before any vCPU runs, no kernel loaded. Every file is checked first; an
    /// eager restore also checks every memory extent while copying it in.
    pub fn restore(dir: &Path, how: &RestoreOptions, options: VmOptions) -> Result<Vm, VmError> {
        let created = Instant::now();
        let snap = Snapshot::open(dir, options.snapshot_key.as_ref())?;
        let ch = channel()?;
        let restored = snap.state.controller.clone();
        // Eager and external restores copy, so they never serve MINOR faults.
        let backed = MemoryConfig {
            backing: options.backing,
            ..MemoryConfig::default()
        };
        if (how.record_working_set || how.prefetch_working_set.is_some()) && !how.lazy {
            return Err(VmError::WorkingSetNeedsLazy);
        }
        let mut recording = None;
        let mut vm = if let Some(socket) = &how.uffd_socket {
            // Firecracker's handshake and handlers know 4 KiB pages only.
            if matches!(options.backing, MemBacking::Hugetlb(_)) {
                return Err(VmError::HugeExternal);
            }
            let config = snap.config(backed.clone())?;
            let layout = snap.layout();
            if layout.kind == crate::snapshot::LayoutKind::Gpa && layout.regions.len() > 1 {
                tracing::warn!(
                    "snapshot {}: its memory file is indexed by guest-physical address ({} bytes for {} of RAM); Firecracker's handlers refuse it (they want the regions packed): take the snapshot again with this vmm",
                    dir.display(),
                    layout.file_len(),
                    snap.state.vm.config.mem_size
                );
            }
            let events = ch.events.clone();
            let on_lost: LostHook = Arc::new(move |link, reason| {
                events.send(Event::Vm(VmEvent::Memory(MemoryEvent::ExternalHandlerLost {
                    link,
                    reason,
                })));
            });
            let mut vm = Self::assemble(
                &config,
                Boot::Restore(&snap.state.vm),
                MemoryPlan::External,
                options,
                restored,
                ch,
            )?;
            let ext = vm.core.memory().external().ok_or(vmm_core::VmError::Phase(
                "guest memory was not handed to userfaultfd",
            ))?;
            let message = uffd_handler::mappings(ext, &layout)
                .and_then(|m| uffd_handler::message(&m))
                .map_err(UffdHandlerError::from)?;
            let program = how
                .peer_program
                .clone()
                .unwrap_or_else(uffd_handler::default_peer_program);
            let seccomp = vm.options.seccomp;
            let link = HandlerLink::connect(
                1,
                socket,
                &program,
                &message,
                ext.uffd(),
                on_lost.clone(),
                None,
                seccomp,
            )?;
            // Later handlers are attached from the sandboxed controller,
            // which starts no program: the launcher forks their holders.
            let launcher = match seccomp {
                SeccompMode::Off => None,
                _ => Some(
                    Launcher::start(&program, seccomp).map_err(|source| UffdHandlerError::Holder {
                        program: program.clone(),
                        source,
                    })?,
                ),
            };
            vm.external = Some(controller::ExternalHandler::new(
                link,
                program,
                message,
                how.handler_grace.unwrap_or(controller::DEFAULT_GRACE),
                how.handler_stall.unwrap_or(controller::external::DEFAULT_STALL),
                on_lost,
                launcher,
                seccomp,
            ));
            vm
        } else if let (true, Some(clone_dir)) = (how.lazy, &how.clone_dir) {
            let shared = Arc::new(SharedMemory::open_or_load(&snap, clone_dir)?);
            let memory = MemoryConfig {
                backend: MemBackend::Zero,
                fault_around: how.fault_around,
                handlers: how.handlers.clone(),
                backing: MemBacking::Memfd,
                fault_mode: FaultMode::Minor,
            };
            let config = snap.config(memory)?;
            let key = options.snapshot_key.as_ref();
            let (working_set, rec) = working_set_plan(&snap, key, how, config.mem_size)?;
            recording = rec;
            let src = ::memory::SharedFileSource::new(
                shared.file().clone(),
                format!("clone:{}", shared.path().display()),
            )
            .map_err(MemoryManagerError::Notifier)?;
            let plan = LazyPlan {
                data_ranges: crate::snapshot::source::SnapshotSource::open(&snap)?.data_ranges(),
                source: Arc::new(src),
                fault_around: config.memory.effective_fault_around(),
                handler_cpus: Vec::new(),
                spin_us: 0,
                batch: false,
                prefetch: false,
                working_set,
                observer: recording.as_ref().map(|r| r.observer()),
            };
            let shared_ram = memory::SharedRam {
                file: shared.file().clone(),
                owner: shared,
            };
            Self::assemble_with(
                &config,
                Boot::Restore(&snap.state.vm),
                MemoryPlan::Lazy(plan),
                options,
                restored,
                ch,
                Some(shared_ram),
            )?
        } else if how.lazy {
            let memory = MemoryConfig {
                backend: MemBackend::File {
                    path: snap.memory_path(),
                    offset: 0,
                },
                fault_around: how.fault_around,
                handlers: how.handlers.clone(),
                backing: options.backing,
                fault_mode: options.fault_mode,
            };
            let config = snap.config(memory)?;
            let src = SnapshotSource::open(&snap)?;
            let key = options.snapshot_key.as_ref();
            let (working_set, rec) = working_set_plan(&snap, key, how, config.mem_size)?;
            recording = rec;
            let plan = LazyPlan {
                data_ranges: src.data_ranges(),
                source: Arc::new(src),
                fault_around: config.memory.effective_fault_around(),
                handler_cpus: Vec::new(),
                spin_us: 0,
                batch: false,
                prefetch: how.prefetch,
                working_set,
                observer: recording.as_ref().map(|r| r.observer()),
            };
            Self::assemble(
                &config,
                Boot::Restore(&snap.state.vm),
                MemoryPlan::Lazy(plan),
                options,
                restored,
                ch,
            )?
        } else {
            let config = snap.config(backed)?;
            // The snapshot's own error (a bad extent) is the one to report.
            let mut failed = None;
            let mut fill = |ram: &devices::GuestRam| {
                snap.fill_memory(ram).map_err(|e| {
                    let msg = e.to_string();
                    failed = Some(e);
                    msg.into()
                })
            };
            let built = Self::assemble(
                &config,
                Boot::Restore(&snap.state.vm),
                MemoryPlan::Fill(&mut fill),
                options,
                restored,
                ch,
            );
            match (built, failed) {
                (Err(_), Some(e)) => return Err(e.into()),
                (built, _) => built?,
            }
        };
        vm.core.set_created(created);
        vm.recording = recording;
        Ok(vm)
    }

    /// Builds the VM of an incoming migration before its state arrives
    /// (KVM objects, memory registered, devices' places): `config` is the
    /// source's configuration; guest RAM is served through the retry core by
    /// `source` (one page at a time), by the fault-handler threads of `handlers`.
    /// [`apply_incoming`](Self::apply_incoming) then gives it its state.
    pub fn incoming(
        config: &vmm_core::state::ConfigState,
        source: Arc<dyn ::memory::PageSource>,
        handlers: HandlerConfig,
        mut options: VmOptions,
    ) -> Result<Vm, VmError> {
        let memory = MemoryConfig {
            backend: MemBackend::Zero,
            fault_around: Some(0),
            handlers,
            backing: options.backing,
            fault_mode: options.fault_mode,
        };
        let config = config.config(memory)?;
        let ch = channel()?;
        // A page its source has not sent is never zero-filled: the VM pauses
        // and waits (the source may come back).
        options.on_memory_fault = MemoryFaultPolicy::Pause;
        let plan = LazyPlan {
            source,
            fault_around: 0,
            // Known at the switchover.
            data_ranges: Vec::new(),
            handler_cpus: Vec::new(),
            spin_us: 0,
            batch: false,
            prefetch: false,
            working_set: None,
            observer: None,
        };
        let vm = Self::assemble(
            &config,
            Boot::Incoming,
            MemoryPlan::Lazy(plan),
            options,
            ControllerState::default(),
            ch,
        )?;
        // Here, while the source still runs, not at `start` inside the
        // downtime.
        crate::controller::prepare(&vm.core, vm.options.seccomp, true);
        Ok(vm)
    }

    /// Gives a VM built by [`incoming`](Self::incoming) the received state;
    /// `data_ranges` are the ranges that hold data.
    pub fn apply_incoming(&mut self, saved: &SavedVm, data_ranges: Vec<(u64, u64)>) -> Result<(), VmError> {
        self.core.apply_state(&saved.vm)?;
        if let Some(m) = self.core.memory().materializer() {
            m.set_ranges(data_ranges);
        }
        self.restored = saved.controller.clone();
        Ok(())
    }

    /// Fetches pages through the retry cores (lazily backed memory only).
    pub fn materializer(&self) -> Option<Materializer> {
        self.core.memory().materializer()
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        self.core.config()
    }

    /// Starts the vCPUs and the controller; the VM can then be paused, resumed,
    /// kicked and stopped through the returned handle.
    pub fn start(self) -> Result<RunningVm, VmError> {
        let options = ControllerOptions {
            stdin: self.options.stdin,
            timeout: self.options.timeout,
            shutdown_signals: self.options.shutdown_signals,
            on_memory_fault: self.options.on_memory_fault,
            snapshot_key: self.options.snapshot_key.clone(),
            restored: self.restored,
            recording: self.recording,
            snapshot_at_checkpoint: self.options.snapshot_at_checkpoint.clone(),
            seccomp: self.options.seccomp,
        };
        Ok(controller::start(
            self.core,
            self.events,
            self.rx,
            options,
            self.external,
        )?)
    }

    /// Runs the VM until the guest exits, a vCPU crashes, a shutdown signal
    /// arrives or the timeout passes.
    pub fn run(self) -> Result<RunOutcome, VmError> {
        Ok(self.start()?.wait()?)
    }
}

/// Builds and runs a VM with `config` until it ends.
pub fn run_vm(config: &VmConfig, options: VmOptions) -> Result<RunOutcome, VmError> {
    Vm::new(config, options)?.run()
}
