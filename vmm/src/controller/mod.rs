//! The controller of a running VM, on its own thread: an event-manager loop
//! that owns the mechanism's [`vmm_core::Vm`] and acts on its events (guest
//! exit, start of the secondary vCPUs, reports, vCPUs that stop on their
//! own, memory failures), on shutdown signals, and on control requests from
//! a [`RunningVm`] / [`VmHandle`] (pause, resume, kick, stats, run on a vCPU,
//! snapshot, migrate, stop). Its lifecycle is one checked [`RunState`].
//!
//! - [`handle`]: the requests and the handles other threads hold;
//! - [`state`]: the run state and its transitions;
//! - [`ops`]: snapshot, migration and state capture;
//! - [`outcome`]: how a run ends, its exit code and statistics;
//! - [`external`]: an external page-fault handler's death, the pause, the
//!   grace and the re-attach.

pub mod external;
mod handle;
pub mod live;
mod ops;
pub mod outcome;
mod reports;
pub mod state;

pub(crate) use external::ExternalHandler;
pub use external::{AttachInfo, HandlerStatus, WaitingPage, DEFAULT_GRACE};
pub use handle::{ControlError, ControllerPanicked, LiveStats, RunningVm, VmHandle};
pub(crate) use handle::{ControlRequest, Event, EventSender};
pub use outcome::{verify_reports, GuestEnd, RunOutcome, VerifyError};
pub use state::RunState;

use crate::migration::{MigrationError, RecoverRequest, Resumable, SourceSummary};
use crate::state::ControllerState;
use devices::serial::SerialConsole;
use devices::DeviceEvent;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use persist::Persist;
use reports::GuestReports;
use sandbox::{SeccompMode, ThreadClass};
use state::valid_transition;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use vmm_core::{MemoryEvent, VmEvent};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// What to do when a page source fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryFaultPolicy {
    /// Pause, then end the run with [`GuestEnd::MemoryFault`] (the CLI).
    #[default]
    End,
    /// Pause and stay paused: the caller may repair the source (which then
    /// notifies, so the parked fault is retried) and resume.
    Pause,
}

/// How the controller runs a VM.
#[derive(Debug, Clone, Default)]
pub struct ControllerOptions {
    /// Feed the host's stdin to the console.
    pub stdin: bool,
    /// Give up after this long (a guard against hangs, not a performance goal).
    pub timeout: Option<Duration>,
    /// End the run cleanly on SIGINT/SIGTERM/SIGHUP (the process's signal
    /// watcher, `signals::start_watcher`, tells the controller).
    pub shutdown_signals: bool,
    /// What to do when a page source fails: the VM is paused either way.
    pub on_memory_fault: MemoryFaultPolicy,
    /// The controller's restored state (reports received before a snapshot).
    pub restored: ControllerState,
    /// How the controller thread (and the threads it starts: an outgoing
    /// migration's) and the control socket's threads are sandboxed.
    pub seccomp: SeccompMode,
    /// Authenticates the snapshots this VM writes.
    pub snapshot_key: Option<crate::snapshot::SnapshotKey>,
    /// A working-set recording: ended by `working-set-end` or the run's end.
    pub recording: Option<Arc<crate::snapshot::working_set::Recording>>,
    /// Snapshot to this directory when the guest reaches its checkpoint,
    /// then end the run.
    pub snapshot_at_checkpoint: Option<std::path::PathBuf>,
}

/// Errors starting the controller.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The vCPUs could not start.
    #[error(transparent)]
    Vm(#[from] vmm_core::VmError),
    /// The event loop could not be set up.
    #[error("cannot set up the VM's event loop: {0}; raise the process's file descriptor limit")]
    EventLoop(String),
    /// The controller thread could not be started (or sandboxed).
    #[error("cannot start the controller thread: {0}")]
    Thread(#[source] sandbox::SpawnError),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The controller's state stays usable: a panicking request leaves it as it was.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a live snapshot or uffd-WP dirty tracking needs and a sandboxed
/// controller may not do: makes the userfaultfds and runs the KVM probe (a
/// VM of its own, ~40 ms of emulated guest code on PVM) once per process.
/// Idempotent. [`start`] calls it before the vCPUs run (`background`
/// false: the probe's VM runs before the guest's, so that the run starts
/// as it did: signals, timeouts); a migration destination calls it while
/// it is built with `background` true: the probe then runs beside the
/// migration instead of inside its downtime (it was 45 of a 49 ms
/// downtime of `vmm receive`), and the controller's seccomp filter is
/// compiled then too.
pub(crate) fn prepare(vm: &vmm_core::Vm, seccomp: sandbox::SeccompMode, background: bool) {
    use crate::snapshot::live;
    vm.memory().prepare_wp();
    if background {
        // Compiled now, not when the controller starts in the downtime.
        if let Err(e) = sandbox::precompile(ThreadClass::Controller, seccomp) {
            tracing::debug!("{e}");
        }
    }
    if seccomp == sandbox::SeccompMode::Off || sandbox::current().is_some() || live::probe_started() {
        return;
    }
    if background {
        live::check_kvm_in_background();
    } else if let Err(e) = live::check_kvm() {
        tracing::debug!("{e}");
    }
}

/// Starts the vCPUs and the controller thread. `events` is the sender the
/// mechanism was built with, `rx` its receiving end.
pub(crate) fn start(
    mut vm: vmm_core::Vm,
    events: EventSender,
    rx: Receiver<Event>,
    options: ControllerOptions,
    external: Option<ExternalHandler>,
) -> Result<RunningVm, StartError> {
    prepare(&vm, options.seccomp, false);
    let t0 = Instant::now();
    vm.start()?;
    let vcpus_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| StartError::EventLoop(format!("{e:?}")))?;
    // A shutdown signal ends the run (the process's watcher calls this).
    let on_signal = options.shutdown_signals.then(|| {
        let events = events.clone();
        crate::signals::on_shutdown(move |sig| {
            events.send(Event::Control(ControlRequest::Signal(sig)));
        })
    });
    let serial = vm.devices().map(|d| d.serial().clone());
    let run = if vm.started().iter().any(|&s| s) {
        RunState::Running
    } else {
        RunState::Paused
    };
    let controller = Arc::new(Mutex::new(Controller {
        vm,
        run,
        end: None,
        memory_fault: None,
        guest: match GuestReports::restore((), &options.restored) {
            Ok(g) => g,
            Err(never) => match never {},
        },
        events_fd: events.fd.clone(),
        events_rx: rx,
        events: events.clone(),
        deferred: Vec::new(),
        policy: options.on_memory_fault,
        resumable: None,
        migration_reply: None,
        migration_status: None,
        migration_report: None,
        recover_hook: None,
        source_lost: Arc::new(AtomicBool::new(false)),
        before_loss: None,
        devices_paused: false,
        snapshot_key: options.snapshot_key.clone(),
        external,
        live: None,
        recording: options.recording.clone(),
        snapshot_at_checkpoint: options.snapshot_at_checkpoint.clone(),
        checkpoint: None,
        last_report: None,
    }));
    em.add_subscriber(controller.clone());
    if let (true, Some(serial)) = (options.stdin, serial) {
        em.add_subscriber(Arc::new(Mutex::new(StdinInput { serial })));
    }
    let deadline = options.timeout.and_then(|t| Instant::now().checked_add(t));
    let timeout = options.timeout.unwrap_or_default();
    let thread = sandbox::spawn(
        std::thread::Builder::new().name("vmm-controller".into()),
        ThreadClass::Controller,
        options.seccomp,
        move || {
            let outcome = run_loop(&controller, &mut em, deadline, timeout);
            drop(on_signal);
            outcome
        },
    )
    .map_err(StartError::Thread)?;
    Ok(RunningVm {
        handle: VmHandle {
            events,
            seccomp: options.seccomp,
        },
        thread,
        vcpus_ms,
    })
}

fn run_loop(
    controller: &Arc<Mutex<Controller>>,
    em: &mut EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    deadline: Option<Instant>,
    timeout: Duration,
) -> RunOutcome {
    let end = loop {
        let wakeup = {
            let mut c = lock(controller);
            c.handler_tick();
            if let Some(end) = c.end.clone() {
                break end;
            }
            c.handler_wakeup()
        };
        // Everything that can end the run is an event; only the deadline is
        // a timeout (and, while no page-fault handler serves, the grace and
        // a look at its socket path: `external`).
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            break GuestEnd::TimedOut(timeout);
        }
        let wait_ms = match [deadline, wakeup].into_iter().flatten().min() {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(now);
                i32::try_from(left.as_millis().saturating_add(1)).unwrap_or(i32::MAX)
            }
        };
        if let Err(e) = em.run_with_timeout(wait_ms) {
            tracing::error!("the VM's event loop failed: {e:?}");
            break GuestEnd::Stopped;
        }
    };
    lock(controller).finish(end)
}

/// Destination: the incoming session's report (JSON), called by the controller.
pub type MigrationReportFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// The state of the running VM that events and requests act on.
struct Controller {
    vm: vmm_core::Vm,
    run: RunState,
    end: Option<GuestEnd>,
    /// The last page-source failure (the VM was paused for it).
    memory_fault: Option<String>,
    /// What the guest reported (persists with the VM).
    guest: GuestReports,
    events_fd: Arc<EventFd>,
    events_rx: Receiver<Event>,
    events: EventSender,
    /// Control requests that arrived while the state was being captured.
    deferred: Vec<ControlRequest>,
    policy: MemoryFaultPolicy,
    /// A post-copy that failed and can be resumed (`migrate --resume`).
    resumable: Option<Resumable>,
    /// Who waits for the outgoing migration's result.
    migration_reply: Option<Sender<Result<SourceSummary, ControlError>>>,
    /// Source: the outgoing migration's live status (kept after it ended).
    migration_status: Option<Arc<crate::migration::SourceStatus>>,
    /// Destination: the incoming session's report.
    migration_report: Option<MigrationReportFn>,
    /// Destination: where `recover` requests go.
    recover_hook: Option<Sender<RecoverRequest>>,
    /// Destination: set while the migration source is lost.
    source_lost: Arc<AtomicBool>,
    /// Destination: the state before the source was lost.
    before_loss: Option<RunState>,
    /// Whether this controller paused the devices (for a capture).
    devices_paused: bool,
    /// Authenticates the snapshots written.
    snapshot_key: Option<crate::snapshot::SnapshotKey>,
    /// The external page-fault handler, for memory it serves.
    external: Option<ExternalHandler>,
    /// A live snapshot being written.
    live: Option<live::LiveRun>,
    /// The working-set recording, if any.
    recording: Option<Arc<crate::snapshot::working_set::Recording>>,
    /// Where to snapshot at the guest's checkpoint.
    snapshot_at_checkpoint: Option<std::path::PathBuf>,
    /// The snapshot taken at the checkpoint (or why it failed).
    checkpoint: Option<Result<crate::snapshot::SnapshotInfo, String>>,
    /// When the last workload report arrived.
    last_report: Option<Instant>,
}

impl Controller {
    /// Moves to `to` if the lifecycle allows it.
    fn set(&mut self, to: RunState) -> Result<(), ControlError> {
        valid_transition(self.run, to)?;
        self.run = to;
        Ok(())
    }

    fn end(&mut self, end: GuestEnd) {
        self.end.get_or_insert(end);
    }

    fn on_vm_event(&mut self, ev: VmEvent) {
        match ev {
            VmEvent::Device(DeviceEvent::GuestExit(code)) => self.end(GuestEnd::Exited(code)),
            VmEvent::Device(DeviceEvent::StartCpus) => {
                let run_now = !self.run.paused();
                match self.vm.start_secondaries(run_now) {
                    Ok(true) => {}
                    Ok(false) => self
                        .guest
                        .bad_request("the guest asked to start its vCPUs twice".into()),
                    Err(e) => tracing::warn!("cannot start the secondary vCPUs: {e}"),
                }
            }
            VmEvent::Device(DeviceEvent::Report(r)) => {
                self.last_report = Some(Instant::now());
                self.guest.report(r)
            }
            VmEvent::Device(DeviceEvent::Checkpoint) => self.at_checkpoint(),
            VmEvent::Device(DeviceEvent::BadRequest(msg)) => self.guest.bad_request(msg),
            VmEvent::VcpuStopped(s) => self.end(GuestEnd::Crashed(s)),
            VmEvent::Memory(MemoryEvent::SourceFailed(msg)) => self.memory_failed(msg),
            VmEvent::Memory(MemoryEvent::HandlerStopped(why)) => self.end(GuestEnd::MemoryFault(format!(
                "the userfault handler stopped ({why}); guest pages can no longer be served"
            ))),
            VmEvent::Memory(MemoryEvent::ExternalHandlerLost { link, reason }) => {
                self.handler_lost(link, &reason)
            }
        }
    }

    /// A page source failed: stop the guest where it is (its page is never
    /// zero-filled), then end or wait for a repair.
    fn memory_failed(&mut self, msg: String) {
        if matches!(self.run, RunState::Running | RunState::Precopy) {
            if let Err(e) = self.vm.pause() {
                tracing::warn!("cannot pause after a memory fault: {e}");
            }
        }
        if valid_transition(self.run, RunState::MemoryFault).is_ok() {
            self.run = RunState::MemoryFault;
        }
        self.memory_fault = Some(msg.clone());
        if self.policy == MemoryFaultPolicy::End {
            self.end(GuestEnd::MemoryFault(msg));
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
            ControlRequest::Kick(cpu) => self.vm.kick(cpu),
            ControlRequest::Stats(reply) => {
                let handler = self.handler_status();
                let _ = reply.send(LiveStats {
                    vcpus: self.vm.vcpu_stats(),
                    blocked_faults: self.vm.memory().blocked().len(),
                    paused: self.run.paused(),
                    state: self.run,
                    memory_fault: self.memory_fault.clone(),
                    handler,
                    live_snapshot: self.live.is_some(),
                });
            }
            ControlRequest::RunOnVcpu(cpu, f, reply) => {
                let _ = reply.send(self.vm.run_on_vcpu(cpu, f).map_err(vm_err));
            }
            ControlRequest::Snapshot(dir, after, reply) => {
                let _ = reply.send(self.snapshot(&dir, after));
            }
            ControlRequest::LiveSnapshot(dir, options, reply) => {
                if let Err(e) = self.live_snapshot(&dir, options, reply.clone()) {
                    let _ = reply.send(Err(e));
                }
            }
            ControlRequest::LiveSnapshotDone(r) => self.live_done(*r),
            ControlRequest::Migrate(to, options, reply) => {
                if let Err(e) = self.migrate(&to, &options, &reply) {
                    let _ = reply.send(Err(e));
                }
            }
            ControlRequest::Switchover(reply) => {
                let _ = reply.send(self.switchover());
            }
            ControlRequest::Migration(reply) => {
                let _ = reply.send(self.migration_json());
            }
            ControlRequest::SetMigrationReport(f) => self.migration_report = Some(f),
            ControlRequest::MigrationEnded(r) => self.migration_ended(r),
            ControlRequest::Recover(from, security, reply) => match &self.recover_hook {
                Some(hook) => {
                    if let Err(mpsc::SendError(r)) = hook.send(RecoverRequest {
                        from,
                        security,
                        reply,
                    }) {
                        let _ = r.reply.send(Err(MigrationError::Ended));
                    }
                }
                None => {
                    let _ = reply.send(Err(MigrationError::NotDestination));
                }
            },
            ControlRequest::SetRecoverHook(hook, lost) => {
                self.recover_hook = Some(hook);
                self.source_lost = lost;
            }
            ControlRequest::SourceLost(lost, reply) => {
                let _ = reply.send(self.source_lost(lost));
            }
            ControlRequest::AttachHandler(path, reply) => {
                let _ = reply.send(self.attach_handler(&path));
            }
            ControlRequest::WorkingSetEnd(reply) => {
                let _ = reply.send(match &self.recording {
                    Some(r) => r.finish().map_err(ControlError::WorkingSet),
                    None => Err(ControlError::NotRecording),
                });
            }
            ControlRequest::Stop => self.end(GuestEnd::Stopped),
            ControlRequest::Signal(sig) => self.end(GuestEnd::Signal(sig)),
        }
    }

    fn pause(&mut self) -> Result<vmm_core::vcpu::manager::PauseReport, ControlError> {
        let to = match self.run {
            RunState::Precopy => RunState::PrecopyPaused,
            // Paused already; only a new handler takes it out of this state.
            RunState::HandlerLost => return Err(ControlError::AlreadyPaused),
            _ => RunState::Paused,
        };
        valid_transition(self.run, to)?;
        let report = self.vm.pause().map_err(vm_err)?;
        self.run = to;
        Ok(report)
    }

    fn resume(&mut self) -> Result<(), ControlError> {
        let to = match self.run {
            RunState::PrecopyPaused => RunState::Precopy,
            // Nobody would serve its faults: only `attach-handler` resumes it.
            RunState::HandlerLost => return Err(ControlError::HandlerLost),
            _ => RunState::Running,
        };
        valid_transition(self.run, to)?;
        self.resume_devices();
        self.vm.resume().map_err(vm_err)?;
        self.run = to;
        // The VM goes on here: its memory changes, an interrupted post-copy
        // can no longer be resumed.
        self.resumable = None;
        // The caller chose to go on (a repaired source serves the parked fault;
        // a new failure pauses the VM again).
        self.memory_fault = None;
        Ok(())
    }

    /// Destination: the migration source is lost (pause and stay paused) or
    /// back (the VM goes back to how it was).
    fn source_lost(&mut self, lost: bool) -> Result<(), ControlError> {
        if lost {
            if self.run == RunState::SourceLost {
                return Ok(());
            }
            valid_transition(self.run, RunState::SourceLost)?;
            if !self.run.paused() {
                self.vm.pause().map_err(vm_err)?;
            }
            self.before_loss = Some(self.run);
            self.run = RunState::SourceLost;
            return Ok(());
        }
        if self.run != RunState::SourceLost {
            return Ok(());
        }
        self.set(RunState::Paused)?;
        match self.before_loss.take() {
            Some(RunState::Running) => self.resume(),
            _ => Ok(()),
        }
    }

    fn pause_devices(&mut self) -> Result<(), ControlError> {
        if !self.devices_paused {
            self.vm.pause_devices().map_err(vm_err)?;
            self.devices_paused = true;
        }
        Ok(())
    }

    fn resume_devices(&mut self) {
        if std::mem::take(&mut self.devices_paused) {
            self.vm.resume_devices();
        }
    }

    /// The guest reached its checkpoint (the `faas` workload's state is
    /// built): with `snapshot_at_checkpoint`, snapshot and end the run
    /// (once; the guest asks again until a restored copy answers it).
    fn at_checkpoint(&mut self) {
        let Some(dir) = self.snapshot_at_checkpoint.take() else {
            return;
        };
        let r = self.snapshot(&dir, crate::snapshot::AfterSnapshot::Stop);
        if let Err(e) = &r {
            tracing::error!("the snapshot at the guest's checkpoint failed: {e}");
            self.end(GuestEnd::Stopped);
        }
        self.checkpoint = Some(r.map_err(|e| e.to_string()));
    }

    /// Ends the run: stops the vCPUs and the fault handler, and gathers the outcome.
    fn finish(&mut self, end: GuestEnd) -> RunOutcome {
        // A vCPU blocked on a page that cannot be served ignores kicks: do
        // not wait long for it.
        let patience = if matches!(end, GuestEnd::MemoryFault(_)) {
            Duration::from_millis(300)
        } else {
            Duration::from_secs(2)
        };
        self.release_if_handler_lost();
        self.abandon_live();
        self.vm.stop(patience, true);
        self.detach_handler();
        let vcpu_stats = self.vm.vcpu_stats();
        self.vm.memory_mut().stop();
        let (reports, bad_requests) = self.guest.take();
        let created = self.vm.created();
        // The pages faulted until the end are in the recording.
        let working_set = self.recording.as_ref().map(|r| r.finish());
        RunOutcome {
            end,
            reports,
            first_output: self.vm.first_output().map(|t| t.duration_since(created)),
            elapsed: created.elapsed(),
            vcpu_stats,
            bad_requests,
            memory: self.vm.memory_stats(),
            tsc_khz: self.vm.tsc_khz(),
            guest_stats: self.vm.devices().and_then(|d| d.guest_stats()),
            working_set,
            checkpoint: self.checkpoint.take(),
            last_report: self.last_report.map(|t| t.saturating_duration_since(created)),
        }
    }
}

fn vm_err(e: vmm_core::VmError) -> ControlError {
    match e {
        vmm_core::VmError::Vcpu(v) => v.into(),
        e => ControlError::Vm(e),
    }
}

impl MutEventSubscriber for Controller {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        for req in std::mem::take(&mut self.deferred) {
            self.control(req);
        }
        let _ = self.events_fd.read();
        while let Ok(ev) = self.events_rx.try_recv() {
            match ev {
                Event::Vm(ev) => self.on_vm_event(ev),
                Event::Control(req) => self.control(req),
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&*self.events_fd, EventSet::IN)) {
            tracing::error!("cannot watch VM events: {e:?}");
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
        lock(&self.serial).enqueue_input(&buf[..n]);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new_raw(std::io::stdin().as_raw_fd(), EventSet::IN));
    }
}
