//! The controller of a running VM, on its own thread: an event-manager loop that
//! acts on device events (guest exit, start of the secondary vCPUs, reports), on
//! vCPUs that stop on their own, on shutdown signals, and on control requests
//! (pause, resume, kick, stats, run on a vCPU, stop) from a [`RunningVm`].
//!
//! Pausing follows the fault design of this project: a vCPU blocked in a guest
//! page fault at stage 2 may be unable to leave `KVM_RUN` until the page is
//! served (on this project's KVM, any guest kernel-mode access; see
//! `docs/vcpu.md`). So a pause completes when every vCPU has either
//! acknowledged it or is known to be blocked in a userfault: such a vCPU cannot
//! run guest code, and it honours the pause on its way out of the fault.

use crate::lazy::BlockedFault;
use crate::migration::{
    Endpoint, Failure, MigrateOptions, MigrationError, RecoverRequest, Resumable, SourceSummary,
};
use crate::signals::ShutdownSignals;
use crate::snapshot::{self, AfterSnapshot, SaveCtx, SnapshotError, SnapshotInfo};
use crate::vcpu::{VcpuError, VcpuFn, VcpuHandle, VcpuRequest, VcpuState, VcpuStatsSnapshot, VcpuStopped};
use crate::vm::{GuestEnd, MemoryFaultPolicy, RunOutcome, Vm, VmError};
use devices::serial::SerialConsole;
use devices::DeviceEvent;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// Errors of control requests.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The VM has already ended.
    #[error("the VM has already ended")]
    Ended,
    /// No such vCPU.
    #[error("there is no vCPU {0}")]
    NoSuchVcpu(u32),
    /// Pause while paused.
    #[error("the VM is already paused")]
    AlreadyPaused,
    /// Resume while running.
    #[error("the VM is not paused")]
    NotPaused,
    /// Resume while the VM migrates.
    #[error("the VM is migrating; it can be resumed here only if the migration fails")]
    Migrating,
    /// Resume (or snapshot, migrate) a destination whose source is lost.
    #[error("this VM's migration source is lost and holds pages it never sent: resume the migration (`vmm ctl DEST recover --from ADDR`, then `vmm ctl SRC migrate --to ADDR --resume`), or resume the VM on the source")]
    SourceLost,
    /// A vCPU neither acknowledged nor is blocked in a fault.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
}

/// How a vCPU stands after a pause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuPause {
    /// Acknowledged: out of the guest, waiting.
    Paused,
    /// Not started by the guest yet (waits for `START_CPUS`).
    NotStarted,
    /// Blocked in a stage-2 fault on this guest-physical page; it cannot run
    /// guest code and will pause as soon as the page is served.
    BlockedInFault {
        /// Guest-physical address of the page.
        guest_addr: u64,
    },
    /// The vCPU has stopped for good.
    Exited,
}

/// The result of a pause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PauseReport {
    /// State of each vCPU, by index.
    pub vcpus: Vec<VcpuPause>,
    /// How long the pause took.
    pub took: Duration,
}

/// Statistics of a running VM.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LiveStats {
    /// Per-vCPU counters.
    pub vcpus: Vec<VcpuStatsSnapshot>,
    /// Faults currently blocked in the userfault handler.
    pub blocked_faults: usize,
    /// Whether the VM is paused.
    pub paused: bool,
    /// The last page-source failure, which paused the VM.
    pub memory_fault: Option<String>,
}

/// A request to the controller.
pub(crate) enum ControlRequest {
    Pause(Sender<Result<PauseReport, ControlError>>),
    Resume(Sender<Result<(), ControlError>>),
    Kick(Option<u32>),
    Stats(Sender<LiveStats>),
    RunOnVcpu(u32, VcpuFn, Sender<Result<(), ControlError>>),
    Snapshot(
        PathBuf,
        AfterSnapshot,
        Sender<Result<SnapshotInfo, SnapshotError>>,
    ),
    Migrate(
        Endpoint,
        MigrateOptions,
        Sender<Result<SourceSummary, MigrationError>>,
    ),
    /// Pre-copy is over: pause and capture the state for post-copy.
    Switchover(Sender<Result<(snapshot::VmState, Instant), String>>),
    /// The outgoing migration ended (the summary, or why it failed).
    MigrationEnded(Result<SourceSummary, Failure>),
    /// Destination: wait for the lost source to resume the migration.
    Recover(Endpoint, Sender<Result<Endpoint, MigrationError>>),
    /// Destination: where `Recover` requests go (set by `migration::receive`).
    SetRecoverHook(Sender<RecoverRequest>, Arc<AtomicBool>),
    Stop,
}

/// Events reaching the controller.
pub(crate) enum VmEvent {
    Device(DeviceEvent),
    VcpuStopped(VcpuStopped),
    Control(ControlRequest),
}

/// Posts events to the controller: a channel plus an eventfd its loop watches.
#[derive(Clone)]
pub(crate) struct EventSender {
    tx: Arc<Mutex<Sender<VmEvent>>>,
    fd: Arc<EventFd>,
}

impl EventSender {
    pub(crate) fn new(tx: Sender<VmEvent>, fd: Arc<EventFd>) -> EventSender {
        EventSender {
            tx: Arc::new(Mutex::new(tx)),
            fd,
        }
    }

    /// `false` if the controller is gone.
    pub(crate) fn send(&self, ev: VmEvent) -> bool {
        let sent = self.tx.lock().map(|tx| tx.send(ev).is_ok()).unwrap_or(false);
        let _ = self.fd.write(1);
        sent
    }
}

/// How long a pause or resume may take for vCPUs that are neither acknowledging
/// nor blocked in a fault (a guard, far above the measured latency).
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long vCPUs get to acknowledge before those blocked in a userfault are
/// taken as blocked rather than waited for.
const BLOCKED_GRACE: Duration = Duration::from_millis(100);
/// How often unacknowledged vCPUs are kicked again while waiting.
const REKICK: Duration = Duration::from_millis(2);

/// A VM whose vCPUs and controller run.
pub struct RunningVm {
    handle: VmHandle,
    thread: JoinHandle<Result<RunOutcome, VmError>>,
}

/// A cloneable handle on a running VM's controller, for other threads (the
/// control socket): the requests of [`RunningVm`] without `wait`.
#[derive(Clone)]
pub struct VmHandle {
    events: EventSender,
}

impl std::fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHandle").finish_non_exhaustive()
    }
}

impl VmHandle {
    fn ask<T>(&self, make: impl FnOnce(Sender<T>) -> ControlRequest) -> Result<T, ControlError> {
        let (tx, rx) = mpsc::channel();
        if !self.events.send(VmEvent::Control(make(tx))) {
            return Err(ControlError::Ended);
        }
        rx.recv().map_err(|_| ControlError::Ended)
    }

    /// Pauses every vCPU (see the module documentation for vCPUs blocked in faults).
    pub fn pause(&self) -> Result<PauseReport, ControlError> {
        self.ask(ControlRequest::Pause)?
    }

    /// Resumes the vCPUs the guest has started.
    pub fn resume(&self) -> Result<(), ControlError> {
        self.ask(ControlRequest::Resume)?
    }

    /// Counters of the running VM.
    pub fn stats(&self) -> Result<LiveStats, ControlError> {
        self.ask(ControlRequest::Stats)
    }

    /// Kicks one vCPU, or all, out of the guest without a request (they re-enter).
    pub fn kick(&self, cpu: Option<u32>) -> Result<(), ControlError> {
        if self.events.send(VmEvent::Control(ControlRequest::Kick(cpu))) {
            Ok(())
        } else {
            Err(ControlError::Ended)
        }
    }

    /// Runs `f` on vCPU `cpu`'s thread between two guest entries and waits for
    /// it. A vCPU blocked in a fault runs it once its page is served.
    pub fn run_on_vcpu(&self, cpu: u32, f: VcpuFn) -> Result<(), ControlError> {
        self.ask(|tx| ControlRequest::RunOnVcpu(cpu, f, tx))?
    }

    /// Pauses the VM (if running), saves a snapshot to `dir` (see
    /// `docs/snapshot.md`), then resumes, stays paused or ends the run as
    /// `after` says. Lazily backed memory is fetched in full first, so the
    /// snapshot does not depend on the page source.
    pub fn snapshot(&self, dir: &Path, after: AfterSnapshot) -> Result<SnapshotInfo, SnapshotError> {
        self.ask(|tx| ControlRequest::Snapshot(dir.to_owned(), after, tx))
            .map_err(|e| SnapshotError::Control(e.to_string()))?
    }

    /// Post-copy migration to `to` (`docs/migration.md`): pauses, sends the
    /// state, serves and pushes the pages; returns when every page is sent.
    /// The run then ends with [`GuestEnd::Migrated`]; on failure the VM stays
    /// paused here and can be resumed.
    /// `push_delay` holds the background push back (pure demand paging
    /// first: an experiment knob; zero normally).
    /// With pre-copy rounds the VM runs until the switchover.
    pub fn migrate(&self, to: &Endpoint, options: &MigrateOptions) -> Result<SourceSummary, MigrationError> {
        self.ask(|tx| ControlRequest::Migrate(to.clone(), options.clone(), tx))
            .map_err(|e| MigrationError::Control(e.to_string()))?
    }

    /// On the destination of a post-copy migration whose source was lost:
    /// listens at `from` for the source to resume it (`migrate` with
    /// `resume`); returns the address once listening. The paused VM
    /// resumes when the source is back (`docs/migration.md`).
    pub fn recover(&self, from: &Endpoint) -> Result<Endpoint, MigrationError> {
        self.ask(|tx| ControlRequest::Recover(from.clone(), tx))
            .map_err(|e| MigrationError::Control(e.to_string()))?
    }

    /// `lost` is set while the source is lost: the VM must not run, and its
    /// memory cannot be fetched in full.
    pub(crate) fn set_recover_hook(&self, hook: Sender<RecoverRequest>, lost: Arc<AtomicBool>) {
        self.events
            .send(VmEvent::Control(ControlRequest::SetRecoverHook(hook, lost)));
    }

    /// Ends the run (the guest is stopped where it is).
    pub fn stop(&self) {
        self.events.send(VmEvent::Control(ControlRequest::Stop));
    }
}

impl std::fmt::Debug for RunningVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningVm").finish_non_exhaustive()
    }
}

impl std::ops::Deref for RunningVm {
    type Target = VmHandle;

    /// The requests ([`VmHandle`]) are available on the `RunningVm` itself.
    fn deref(&self) -> &VmHandle {
        &self.handle
    }
}

impl RunningVm {
    /// A cloneable handle for other threads.
    pub fn handle(&self) -> VmHandle {
        self.handle.clone()
    }

    /// Whether the run has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the end of the run.
    pub fn wait(self) -> Result<RunOutcome, VmError> {
        self.thread
            .join()
            .unwrap_or_else(|_| Err(VmError::Device("the VM controller thread panicked".into())))
    }
}

/// Starts the vCPUs and the controller thread.
pub(crate) fn start(mut vm: Vm) -> Result<RunningVm, VmError> {
    let events = vm.events.clone();
    let on_stop = {
        let events = events.clone();
        Arc::new(move |s| {
            events.send(VmEvent::VcpuStopped(s));
        })
    };
    let mut handles = Vec::new();
    // Only the bootstrap vCPU runs at first (see abi::boot); a restored VM
    // runs the vCPUs the guest had started.
    let (started, reports) = match vm.restored.take() {
        Some(r) => r,
        None => {
            let mut s = vec![false; vm.vcpu_fds.len()];
            if let Some(first) = s.first_mut() {
                *first = true;
            }
            (s, Vec::new())
        }
    };
    for (i, fd) in (0u32..).zip(vm.vcpu_fds.drain(..)) {
        let initial = if started.get(i as usize).copied().unwrap_or(false) {
            VcpuState::Running
        } else {
            VcpuState::Paused
        };
        handles.push(VcpuHandle::spawn(
            i,
            fd,
            vm.bus.clone(),
            initial,
            on_stop.clone(),
            if i == 0 { vm.fault_cpu } else { None },
        )?);
    }
    let thread = std::thread::Builder::new()
        .name("vmm-controller".into())
        .spawn(move || run_loop(vm, handles, started, reports))
        .map_err(|e| VmError::Device(format!("cannot start the controller thread: {e}")))?;
    Ok(RunningVm {
        handle: VmHandle { events },
        thread,
    })
}

fn run_loop(
    mut vm: Vm,
    handles: Vec<VcpuHandle>,
    started: Vec<bool>,
    reports: Vec<abi::pv::WorkloadReport>,
) -> Result<RunOutcome, VmError> {
    let poisoned = || VmError::Device("controller poisoned".into());
    let controller = Arc::new(Mutex::new(Controller {
        events_fd: vm.events.fd.clone(),
        events_rx: vm.take_events_rx(),
        handles,
        started,
        paused: false,
        memory_fault: None,
        end: None,
        reports,
        bad_requests: Vec::new(),
        blocked: vm.blocked_faults_fn(),
        deferred: Vec::new(),
        save: vm.save_ctx(),
        events: vm.events.clone(),
        migration: Phase::Idle,
        resumable: None,
        recover_hook: None,
        source_lost: Arc::new(AtomicBool::new(false)),
    }));
    let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| VmError::Device(format!("event manager: {e:?}")))?;
    em.add_subscriber(controller.clone());
    if vm.options.stdin {
        em.add_subscriber(Arc::new(Mutex::new(StdinInput {
            serial: vm.serial.clone(),
        })));
    }
    if vm.options.shutdown_signals {
        let signals = ShutdownSignals::new().map_err(|e| VmError::Device(e.to_string()))?;
        em.add_subscriber(Arc::new(Mutex::new(SignalInput {
            signals,
            controller: controller.clone(),
        })));
    }

    let deadline = vm.options.timeout.map(|t| Instant::now() + t);
    let mut failures_seen = 0;
    let end = loop {
        if let Some(end) = controller.lock().map_err(|_| poisoned())?.end.clone() {
            break end;
        }
        let (failures, handler_died) = vm.memory_failures();
        if handler_died {
            break GuestEnd::MemoryFault(
                "the userfault handler stopped; guest pages can no longer be served".into(),
            );
        }
        if failures.len() > failures_seen {
            failures_seen = failures.len();
            let msg = failures.last().cloned().unwrap_or_default();
            let mut c = controller.lock().map_err(|_| poisoned())?;
            // Stop the guest where it is: its page is never zero-filled.
            if !c.paused {
                if let Err(e) = c.pause() {
                    tracing::warn!("cannot pause after a memory fault: {e}");
                }
            }
            c.memory_fault = Some(msg.clone());
            if vm.options.on_memory_fault == MemoryFaultPolicy::End {
                break GuestEnd::MemoryFault(msg);
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break GuestEnd::TimedOut(vm.options.timeout.unwrap_or_default());
        }
        em.run_with_timeout(100)
            .map_err(|e| VmError::Device(format!("event loop: {e:?}")))?;
    };

    let mut c = controller.lock().map_err(|_| poisoned())?;
    let vcpu_stats: Vec<_> = c.handles.iter().map(|h| (h.stats(), h.tid())).collect();
    vm.stop_vcpus(&mut c.handles, &end);
    let mut reports = std::mem::take(&mut c.reports);
    reports.sort_by_key(|r| r.cpu);
    Ok(vm.outcome(end, reports, vcpu_stats, std::mem::take(&mut c.bad_requests)))
}

/// Faults blocked in the userfault handler, as `(thread id, guest address)`.
pub(crate) type BlockedFn = Box<dyn Fn() -> Vec<BlockedFault> + Send>;

/// The state of the running VM that events and requests act on.
struct Controller {
    events_fd: Arc<EventFd>,
    events_rx: Receiver<VmEvent>,
    handles: Vec<VcpuHandle>,
    /// vCPUs the guest has started (the others wait for `START_CPUS`).
    started: Vec<bool>,
    paused: bool,
    /// The last page-source failure (the VM was paused for it).
    memory_fault: Option<String>,
    end: Option<GuestEnd>,
    reports: Vec<abi::pv::WorkloadReport>,
    bad_requests: Vec<String>,
    blocked: BlockedFn,
    /// Control requests that arrived while the state was being captured.
    deferred: Vec<ControlRequest>,
    save: SaveCtx,
    events: EventSender,
    /// Where an outgoing migration stands.
    migration: Phase,
    /// A post-copy that failed and can be resumed (`migrate --resume`).
    resumable: Option<Resumable>,
    /// Destination: where `recover` requests go.
    recover_hook: Option<Sender<RecoverRequest>>,
    /// Destination: set while the migration source is lost.
    source_lost: Arc<AtomicBool>,
}

/// Where an outgoing migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    /// The VM runs while pages are copied.
    Precopy,
    /// The destination may run the VM: it must stay paused here.
    Postcopy,
}

/// Where an outstanding request to a vCPU stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ack {
    Waiting(u64),
    Done(VcpuState),
    Blocked(u64),
    Gone,
}

impl Controller {
    fn handle(&mut self, ev: VmEvent) {
        match ev {
            VmEvent::Device(DeviceEvent::GuestExit(code)) => {
                self.end.get_or_insert(GuestEnd::Exited(code));
            }
            VmEvent::Device(DeviceEvent::StartCpus) if !self.started.iter().skip(1).any(|&s| s) => {
                for i in 1..self.handles.len() {
                    self.started[i] = true;
                    // While the VM is paused they start with the next resume.
                    if !self.paused {
                        if let Err(e) = self.handles[i].send(VcpuRequest::Resume) {
                            tracing::warn!("cannot start vCPU {i}: {e}");
                        }
                    }
                }
            }
            VmEvent::Device(DeviceEvent::StartCpus) => {
                self.bad_requests
                    .push("the guest asked to start its vCPUs twice".into());
            }
            VmEvent::Device(DeviceEvent::Report(r)) => self.reports.push(r),
            VmEvent::Device(DeviceEvent::BadRequest(msg)) => {
                tracing::warn!("{msg}");
                self.bad_requests.push(msg);
            }
            VmEvent::VcpuStopped(s) => {
                self.end.get_or_insert(GuestEnd::Crashed(s));
            }
            VmEvent::Control(req) => self.control(req),
        }
    }

    fn control(&mut self, req: ControlRequest) {
        match req {
            ControlRequest::Pause(reply) => {
                let _ = reply.send(self.pause());
            }
            ControlRequest::Resume(reply) => {
                let _ = reply.send(self.resume());
            }
            ControlRequest::Kick(cpu) => {
                for h in self.handles.iter().filter(|h| cpu.is_none_or(|c| c == h.cpu())) {
                    h.kick();
                }
            }
            ControlRequest::Stats(reply) => {
                let _ = reply.send(LiveStats {
                    vcpus: self.handles.iter().map(VcpuHandle::stats).collect(),
                    blocked_faults: (self.blocked)().len(),
                    paused: self.paused,
                    memory_fault: self.memory_fault.clone(),
                });
            }
            ControlRequest::RunOnVcpu(cpu, f, reply) => {
                let _ = reply.send(self.run_on_vcpu(cpu, f));
            }
            ControlRequest::Snapshot(dir, after, reply) => {
                let _ = reply.send(self.snapshot(&dir, after));
            }
            ControlRequest::Migrate(to, options, reply) => {
                if let Err(e) = self.migrate(&to, &options, reply.clone()) {
                    let _ = reply.send(Err(e));
                }
            }
            ControlRequest::Switchover(reply) => {
                let _ = reply.send(self.switchover());
            }
            ControlRequest::MigrationEnded(r) => {
                self.migration = Phase::Idle;
                match r {
                    Ok(s) => {
                        self.resumable = None;
                        self.end.get_or_insert(GuestEnd::Migrated(format!(
                            "{} post-copy pages ({} pushed, {} requested) after {} pre-copy pages, downtime {:.1} ms, total {:.1} ms",
                            s.data_pages, s.pages_pushed, s.pages_requested, s.precopy_pages, s.downtime_ms, s.total_ms
                        )));
                    }
                    // The whole VM is still here: it can be resumed here, or
                    // (post-copy) the migration resumed with the destination.
                    Err(f) => {
                        if self.paused {
                            tracing::error!("migration failed, the VM stays paused here: {}", f.message);
                            if f.resumable.is_some() {
                                self.resumable = f.resumable;
                            }
                        } else {
                            tracing::error!(
                                "migration failed during pre-copy, the VM runs on here: {}",
                                f.message
                            );
                        }
                    }
                }
            }
            ControlRequest::Recover(from, reply) => match &self.recover_hook {
                Some(hook) => {
                    if let Err(mpsc::SendError(r)) = hook.send(RecoverRequest { from, reply }) {
                        let _ = r.reply.send(Err(MigrationError::Control(
                            "the migration has already ended here".into(),
                        )));
                    }
                }
                None => {
                    let _ = reply.send(Err(MigrationError::Control(
                        "this VM is not the destination of a migration: `recover` is for a `vmm receive` whose source was lost"
                            .into(),
                    )));
                }
            },
            ControlRequest::SetRecoverHook(hook, lost) => {
                self.recover_hook = Some(hook);
                self.source_lost = lost;
            }
            ControlRequest::Stop => {
                self.end.get_or_insert(GuestEnd::Stopped);
            }
        }
    }

    /// Pauses, sends the state and extents, and leaves the pages to a thread
    /// (with pre-copy, the thread copies pages first and asks for the
    /// switchover; with `resume`, it goes on with an interrupted post-copy).
    fn migrate(
        &mut self,
        to: &Endpoint,
        options: &MigrateOptions,
        reply: Sender<Result<SourceSummary, MigrationError>>,
    ) -> Result<(), MigrationError> {
        let refuse = |m: String| MigrationError::Control(m);
        if self.end.is_some() {
            return Err(refuse(ControlError::Ended.to_string()));
        }
        if self.migration != Phase::Idle {
            return Err(refuse("a migration is already running".into()));
        }
        if self.source_lost.load(Ordering::Acquire) {
            return Err(refuse(ControlError::SourceLost.to_string()));
        }
        if options.resume && options.precopy_rounds > 0 {
            return Err(refuse(
                "--resume continues an interrupted post-copy; it takes no pre-copy rounds".into(),
            ));
        }
        if self.save.external_memory {
            return Err(refuse(
                "guest memory is served by an external page-fault handler; migrate VMs whose memory this VMM holds"
                    .into(),
            ));
        }
        let events = self.events.clone();
        let on_end = move |r| {
            events.send(VmEvent::Control(ControlRequest::MigrationEnded(r)));
        };
        if options.resume {
            let Some(from) = self.resumable.clone().filter(|_| self.paused) else {
                return Err(refuse(
                    "there is no interrupted post-copy to resume here (it completed, never started, or the VM was resumed here)"
                        .into(),
                ));
            };
            let out = crate::migration::Outgoing::resume(
                to,
                &from,
                self.save.mem.clone(),
                self.save.config.mem_size,
                options.push_delay,
            )?;
            out.spawn(on_end, reply)?;
            self.migration = Phase::Postcopy;
            return Ok(());
        }
        if options.precopy_rounds > 0 {
            let events = self.events.clone();
            let ctx = crate::migration::PrecopyCtx {
                vm_fd: self.save.vm_fd.clone(),
                mem: self.save.mem.clone(),
                mem_size: self.save.config.mem_size,
                materializer: self.save.materializer.clone(),
                stop: self.source_lost.clone(),
                switchover: Box::new(move || {
                    let (tx, rx) = mpsc::channel();
                    if !events.send(VmEvent::Control(ControlRequest::Switchover(tx))) {
                        return Err("the VM ended during pre-copy".into());
                    }
                    rx.recv()
                        .map_err(|_| "the VM ended during pre-copy".to_string())?
                }),
            };
            crate::migration::spawn_precopy(to.clone(), options.clone(), ctx, on_end, reply)?;
            self.resumable = None;
            self.migration = Phase::Precopy;
            return Ok(());
        }
        let paused_at = Instant::now();
        let was_paused = self.paused;
        if !was_paused {
            self.pause().map_err(|e| refuse(e.to_string()))?;
        }
        let out = self
            .capture_state()
            .map_err(MigrationError::from)
            .and_then(|state| Ok((state, snapshot::data_extents(&self.save.mem)?)))
            .and_then(|(state, extents)| {
                crate::migration::Outgoing::connect(
                    to,
                    &state,
                    extents,
                    self.save.mem.clone(),
                    paused_at,
                    options.push_delay,
                )
            });
        match out {
            Ok(out) => {
                out.spawn(on_end, reply)?;
                self.resumable = None;
                self.migration = Phase::Postcopy;
                Ok(())
            }
            Err(e) => {
                if !was_paused && self.paused {
                    let _ = self.resume();
                }
                Err(e)
            }
        }
    }

    /// Pauses the VM at the end of pre-copy and captures its state; from
    /// here on it must stay paused (the destination may run it).
    fn switchover(&mut self) -> Result<(snapshot::VmState, Instant), String> {
        if self.end.is_some() {
            return Err(ControlError::Ended.to_string());
        }
        let paused_at = Instant::now();
        let was_paused = self.paused;
        if !was_paused {
            self.pause().map_err(|e| e.to_string())?;
        }
        match self.capture_state() {
            Ok(state) => {
                self.migration = Phase::Postcopy;
                Ok((state, paused_at))
            }
            Err(e) => {
                if !was_paused && self.paused {
                    let _ = self.resume();
                }
                Err(e.to_string())
            }
        }
    }

    fn snapshot(&mut self, dir: &Path, after: AfterSnapshot) -> Result<SnapshotInfo, SnapshotError> {
        let control = |e: ControlError| SnapshotError::Control(e.to_string());
        if self.end.is_some() {
            return Err(control(ControlError::Ended));
        }
        if self.save.external_memory {
            return Err(SnapshotError::Control(
                "guest memory is served by an external page-fault handler (--mem-backend uffd:SOCKET); \
                 pages it has not served yet are not in this process: take snapshots of VMs whose memory \
                 this VMM holds"
                    .into(),
            ));
        }
        let start = Instant::now();
        let was_paused = self.paused;
        if !was_paused {
            self.pause().map_err(control)?;
        }
        let result = self.save_to(dir, start);
        let resume = match after {
            AfterSnapshot::Resume => true,
            AfterSnapshot::Restore => !was_paused,
            AfterSnapshot::Pause => false,
            // A failed snapshot leaves the VM as it was.
            AfterSnapshot::Stop => result.is_err() && !was_paused,
        };
        if after == AfterSnapshot::Stop && result.is_ok() {
            self.end.get_or_insert(GuestEnd::Stopped);
        } else if resume && self.paused {
            self.resume().map_err(control)?;
        }
        result
    }

    /// Saves the paused VM.
    fn save_to(&mut self, dir: &Path, start: Instant) -> Result<SnapshotInfo, SnapshotError> {
        let state = self.capture_state()?;
        let manifest = snapshot::write_snapshot(dir, &state, &self.save.mem)?;
        Ok(SnapshotInfo {
            dir: dir.to_owned(),
            memory_bytes: manifest.memory.extents.iter().map(|e| e.len).sum(),
            extents: manifest.memory.extents.len(),
            took_ms: start.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// The state of the paused VM (for a snapshot or a migration); lazily
    /// backed memory is fetched in full first.
    fn capture_state(&mut self) -> Result<snapshot::VmState, SnapshotError> {
        // What the vCPUs posted before they paused (a workload report,
        // START_CPUS) is part of the state: handle it first. Control requests
        // wait until the capture is over.
        while let Ok(ev) = self.events_rx.try_recv() {
            match ev {
                VmEvent::Control(req) => self.deferred.push(req),
                ev => self.handle(ev),
            }
        }
        if !self.deferred.is_empty() {
            let _ = self.events_fd.write(1);
        }
        if let Some(m) = &self.save.materializer {
            m.run(&self.source_lost, &AtomicU64::new(0)).map_err(|e| {
                SnapshotError::Control(format!("guest memory cannot be fetched in full: {e}"))
            })?;
            // Stopped early: a page its lost migration source holds is missing.
            if self.source_lost.load(Ordering::Acquire) {
                return Err(SnapshotError::Control(ControlError::SourceLost.to_string()));
            }
        }
        let msrs = Arc::new(snapshot::msr_index_list()?);
        let mut vcpus = Vec::new();
        for h in &mut self.handles {
            let (tx, rx) = mpsc::channel();
            let msrs = msrs.clone();
            let f: VcpuFn = Box::new(move |fd| {
                let _ = tx.send(snapshot::save_vcpu(fd, &msrs));
            });
            h.request(VcpuRequest::Run(f), ACK_TIMEOUT)
                .map_err(|e| SnapshotError::Control(e.to_string()))?;
            vcpus.push(rx.recv().map_err(|_| {
                SnapshotError::Control(format!("vCPU {} did not return its state", h.cpu()))
            })??);
        }
        let (irqchip, pit, clock) = snapshot::save_vm(&self.save.vm_fd)?;
        let serial = self
            .save
            .serial
            .lock()
            .map_err(|_| SnapshotError::Control("the serial console is poisoned".into()))?
            .state();
        let state = snapshot::VmState {
            config: snapshot::config_state(&self.save.config),
            vcpus,
            irqchip,
            pit,
            clock,
            serial: (&serial).into(),
            started: self.started.clone(),
            reports: self.reports.iter().map(Into::into).collect(),
        };
        Ok(state)
    }

    /// The guest page a vCPU is blocked on, if the userfault handler holds a
    /// fault of its thread.
    fn blocked_page(&self, blocked: &[BlockedFault], i: usize) -> Option<u64> {
        let tid = self.handles[i].tid()?;
        blocked
            .iter()
            .find(|b| b.tid == Some(tid))
            .map(|b| b.guest_offset)
    }

    /// Sends `make()` to the vCPUs in `targets` and waits until each has
    /// acknowledged or is blocked in a fault (which then reports the page).
    fn request_all(
        &mut self,
        targets: &[bool],
        name: &'static str,
        make: impl Fn() -> VcpuRequest,
    ) -> Result<Vec<Ack>, ControlError> {
        let mut acks: Vec<Ack> = Vec::with_capacity(self.handles.len());
        for (i, h) in self.handles.iter_mut().enumerate() {
            acks.push(if targets[i] {
                h.send(make()).map_or(Ack::Gone, Ack::Waiting)
            } else {
                Ack::Done(VcpuState::Paused)
            });
        }
        let start = Instant::now();
        loop {
            for (i, ack) in acks.iter_mut().enumerate() {
                if let Ack::Waiting(id) | Ack::Blocked(id) = *ack {
                    match self.handles[i].poll_ack(id, Duration::ZERO) {
                        Ok(Some(state)) => *ack = Ack::Done(state),
                        Ok(None) => {}
                        Err(_) => *ack = Ack::Gone,
                    }
                }
            }
            let pending = |a: &Ack| matches!(a, Ack::Waiting(_) | Ack::Blocked(_));
            if !acks.iter().any(pending) {
                return Ok(acks);
            }
            // A vCPU in an interruptible fault wait acknowledges within the grace
            // period; one that has not and is blocked in a userfault cannot leave
            // KVM_RUN before its page comes, and honours the request then.
            if start.elapsed() >= BLOCKED_GRACE {
                let blocked = (self.blocked)();
                for (i, ack) in acks.iter_mut().enumerate() {
                    if let Ack::Waiting(id) = *ack {
                        if self.blocked_page(&blocked, i).is_some() {
                            *ack = Ack::Blocked(id);
                        }
                    }
                }
                if !acks.iter().any(|a| matches!(a, Ack::Waiting(_))) {
                    return Ok(acks);
                }
            }
            if let Some(i) = acks.iter().position(|a| matches!(a, Ack::Waiting(_))) {
                if start.elapsed() >= ACK_TIMEOUT {
                    let cpu = self.handles[i].cpu();
                    return Err(VcpuError::NoAck {
                        cpu,
                        request: name,
                        waited: start.elapsed(),
                    }
                    .into());
                }
            }
            for (h, a) in self.handles.iter().zip(&acks) {
                if pending(a) {
                    h.kick();
                }
            }
            if let Some((i, Ack::Waiting(id) | Ack::Blocked(id))) = acks
                .iter()
                .enumerate()
                .find(|(_, a)| pending(a))
                .map(|(i, a)| (i, *a))
            {
                if let Ok(Some(state)) = self.handles[i].poll_ack(id, REKICK) {
                    acks[i] = Ack::Done(state);
                }
            }
        }
    }

    fn pause(&mut self) -> Result<PauseReport, ControlError> {
        if self.end.is_some() {
            return Err(ControlError::Ended);
        }
        if self.paused {
            return Err(ControlError::AlreadyPaused);
        }
        let start = Instant::now();
        let targets = self.started.clone();
        let acks = self.request_all(&targets, "pause", || VcpuRequest::Pause)?;
        self.paused = true;
        let blocked = (self.blocked)();
        let vcpus = acks
            .iter()
            .enumerate()
            .map(|(i, a)| match a {
                _ if !self.started[i] => VcpuPause::NotStarted,
                Ack::Done(VcpuState::Exited) | Ack::Gone => VcpuPause::Exited,
                Ack::Blocked(_) | Ack::Waiting(_) => VcpuPause::BlockedInFault {
                    guest_addr: self.blocked_page(&blocked, i).unwrap_or(u64::MAX),
                },
                Ack::Done(_) => VcpuPause::Paused,
            })
            .collect();
        Ok(PauseReport {
            vcpus,
            took: start.elapsed(),
        })
    }

    fn resume(&mut self) -> Result<(), ControlError> {
        if self.end.is_some() {
            return Err(ControlError::Ended);
        }
        if !self.paused {
            return Err(ControlError::NotPaused);
        }
        if self.migration == Phase::Postcopy {
            return Err(ControlError::Migrating);
        }
        if self.source_lost.load(Ordering::Acquire) {
            return Err(ControlError::SourceLost);
        }
        let targets = self.started.clone();
        self.request_all(&targets, "resume", || VcpuRequest::Resume)?;
        self.paused = false;
        // The VM goes on here: its memory changes, an interrupted post-copy
        // can no longer be resumed.
        self.resumable = None;
        // The caller chose to go on (a repaired source serves the parked fault;
        // a new failure pauses the VM again).
        self.memory_fault = None;
        Ok(())
    }

    fn run_on_vcpu(&mut self, cpu: u32, f: VcpuFn) -> Result<(), ControlError> {
        let h = self
            .handles
            .get_mut(cpu as usize)
            .ok_or(ControlError::NoSuchVcpu(cpu))?;
        h.request(VcpuRequest::Run(f), ACK_TIMEOUT)?;
        Ok(())
    }
}

impl MutEventSubscriber for Controller {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        for req in std::mem::take(&mut self.deferred) {
            self.control(req);
        }
        let _ = self.events_fd.read();
        while let Ok(ev) = self.events_rx.try_recv() {
            self.handle(ev);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&*self.events_fd, EventSet::IN)) {
            tracing::error!("cannot watch VM events: {e:?}");
        }
    }
}

/// Ends the run on SIGINT, SIGTERM or SIGHUP.
struct SignalInput {
    signals: ShutdownSignals,
    controller: Arc<Mutex<Controller>>,
}

impl MutEventSubscriber for SignalInput {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        if let Some(sig) = self.signals.read() {
            if let Ok(mut c) = self.controller.lock() {
                c.end.get_or_insert(GuestEnd::Signal(sig));
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.signals, EventSet::IN)) {
            tracing::error!("cannot watch shutdown signals: {e:?}");
        }
    }
}

/// Feeds the host's stdin to the serial console.
struct StdinInput {
    serial: Arc<Mutex<SerialConsole>>,
}

impl MutEventSubscriber for StdinInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let n = std::io::stdin().lock().read(&mut buf).unwrap_or(0);
        if n == 0 || events.event_set().contains(EventSet::HANG_UP) {
            // EOF: stop watching, or epoll would report it forever.
            let _ = ops.remove(Events::empty_raw(std::io::stdin().as_raw_fd()));
            return;
        }
        if let Ok(mut s) = self.serial.lock() {
            s.enqueue_input(&buf[..n]);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new_raw(std::io::stdin().as_raw_fd(), EventSet::IN));
    }
}
