//! How other threads talk to a running VM's controller: requests posted
//! with an eventfd kick ([`EventSender`]), answered on a channel; the
//! cloneable [`VmHandle`] and the owning [`RunningVm`].

use super::outcome::RunOutcome;
use super::state::RunState;
use crate::migration::{Endpoint, MigrateOptions, MigrationError, RecoverRequest, Security, SourceSummary};
use crate::snapshot::{AfterSnapshot, SnapshotError, SnapshotInfo};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vmm_core::vcpu::manager::PauseReport;
use vmm_core::vcpu::{VcpuFn, VcpuStatsSnapshot};
use vmm_core::VmEvent;
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
    /// A second migration, or a pause-sensitive request during pre-copy.
    #[error("a migration is already running")]
    MigrationRunning,
    /// `migration` on a VM that neither sent nor received one.
    #[error("this VM has not migrated: `vmm ctl SOCK migration` reports a migration started with `vmm ctl SOCK migrate` or received by `vmm receive`")]
    NoMigration,
    /// Resume (or snapshot, migrate) a destination whose source is lost.
    #[error("this VM's migration source is lost and holds pages it never sent: resume the migration (`vmm ctl DEST recover --from ADDR`, then `vmm ctl SRC migrate --to ADDR --resume`), or resume the VM on the source")]
    SourceLost,
    /// A request on a VM whose external page-fault handler is gone.
    #[error("the VM is paused because its page-fault handler is gone: attach a new one with `vmm ctl SOCKET attach-handler PATH` (or start one at its socket path) before the grace ends, or stop the VM")]
    HandlerLost,
    /// `attach-handler` on a VM whose memory no external handler serves.
    #[error("this VM's memory is not served by an external page-fault handler (vmm restore --mem-backend uffd:SOCKET): there is no handler to attach")]
    NotExternal,
    /// `attach-handler` while a handler serves.
    #[error(
        "the page-fault handler {0} is attached and serving; attach-handler replaces a handler that is gone"
    )]
    HandlerAttached(String),
    /// The new handler cannot be attached.
    #[error(transparent)]
    Attach(#[from] crate::uffd_handler::UffdHandlerError),
    /// A request on a VM paused by a failing page source.
    #[error("the VM is paused because a page source failed; repair the source and resume it, or stop it")]
    MemoryFault,
    /// Any other request that the VM's state forbids.
    #[error("the VM is {from:?}: it cannot go to {to:?}")]
    InvalidTransition {
        /// Where the VM stands.
        from: RunState,
        /// Where the request would take it.
        to: RunState,
    },
    /// The memory lives with an external page-fault handler.
    #[error("guest memory is served by an external page-fault handler (--mem-backend uffd:SOCKET); pages it has not served yet are not in this process: snapshot or migrate VMs whose memory this VMM holds")]
    ExternalMemory,
    /// `working-set-end` on a run that records none.
    #[error("this run records no working set (vmm restore --lazy --record-working-set, or vmm run --record-working-set FILE)")]
    NotRecording,
    /// The working-set file could not be written.
    #[error("the working set could not be written: {0}")]
    WorkingSet(String),
    /// `--resume` without an interrupted post-copy.
    #[error("there is no interrupted post-copy to resume here (it completed, never started, or the VM was resumed here)")]
    NothingToResume,
    /// `--resume` with pre-copy rounds.
    #[error("--resume continues an interrupted post-copy; it takes no pre-copy rounds")]
    ResumeWithPrecopy,
    /// The mechanism refused or failed.
    #[error(transparent)]
    Vm(#[from] vmm_core::VmError),
    /// Lazily served memory could not be fetched in full.
    #[error("guest memory cannot be fetched in full: {0}")]
    Materialize(#[from] vmm_core::memory::MaterializeError),
    /// Writing the snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The migration failed.
    #[error(transparent)]
    Migration(#[from] MigrationError),
    /// A live snapshot is being written.
    #[error(
        "a live snapshot is being written; wait for its answer before taking another snapshot or migrating"
    )]
    LiveRunning,
    /// Live snapshots cannot write-protect an external handler's memory.
    #[error("a live snapshot cannot write-protect memory an external page-fault handler serves (--mem-backend uffd:SOCKET: a range belongs to one userfaultfd, and pages it has not served are not in this process)")]
    LiveExternal,
    /// Lazily served memory could not become plain anonymous memory for a
    /// live snapshot.
    #[error(
        "a live snapshot first fetches lazily served memory in full and hands it back to the kernel: {0}"
    )]
    LiveLazy(#[source] Box<vmm_core::memory::MemoryManagerError>),
    /// This host cannot take live snapshots.
    #[error(transparent)]
    LiveUnsupported(#[from] crate::snapshot::live::LiveUnsupported),
    /// Write protection could not be set up.
    #[error(transparent)]
    Live(vmm_core::memory::LiveError),
    /// uffd-WP dirty tracking on a KVM that may let guest writes through.
    #[error("--dirty-tracking uffd-wp is refused: {0}; migrate with --dirty-tracking kvm")]
    WpDirtyUnsupported(#[source] crate::snapshot::live::LiveUnsupported),
}

impl From<vmm_core::vcpu::VcpuError> for ControlError {
    fn from(e: vmm_core::vcpu::VcpuError) -> ControlError {
        match e {
            vmm_core::vcpu::VcpuError::NoSuchVcpu(cpu) => ControlError::NoSuchVcpu(cpu),
            e => ControlError::Vm(e.into()),
        }
    }
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
    /// Where the run stands.
    pub state: RunState,
    /// The last page-source failure, or the external handler's death, which
    /// paused the VM.
    pub memory_fault: Option<String>,
    /// The external page-fault handler, if one serves (or served) memory.
    pub handler: Option<super::HandlerStatus>,
    /// Whether a live snapshot is being written.
    pub live_snapshot: bool,
}

/// A request to the controller.
pub(crate) enum ControlRequest {
    Pause(Sender<Result<PauseReport, ControlError>>),
    Resume(Sender<Result<(), ControlError>>),
    Kick(Option<u32>),
    Stats(Sender<LiveStats>),
    RunOnVcpu(u32, VcpuFn, Sender<Result<(), ControlError>>),
    Snapshot(PathBuf, AfterSnapshot, Sender<Result<SnapshotInfo, ControlError>>),
    /// A live snapshot (`controller/live.rs`); answered once written.
    LiveSnapshot(
        PathBuf,
        super::live::LiveOptions,
        Sender<Result<super::live::LiveInfo, ControlError>>,
    ),
    /// The live snapshot's writer ended.
    LiveSnapshotDone(Box<Result<crate::snapshot::Manifest, SnapshotError>>),
    Migrate(
        Endpoint,
        MigrateOptions,
        Sender<Result<SourceSummary, ControlError>>,
    ),
    /// Pre-copy is over: pause and capture the state for post-copy.
    Switchover(Sender<Result<crate::migration::Paused, ControlError>>),
    /// `vmm ctl SOCK migration`: where the migration stands.
    Migration(Sender<Result<serde_json::Value, ControlError>>),
    /// Destination: the incoming session's report.
    SetMigrationReport(super::MigrationReportFn),
    /// The outgoing migration ended (the summary, or why it failed).
    MigrationEnded(Result<SourceSummary, Box<crate::migration::Stopped>>),
    /// Destination: wait for the lost source to resume the migration.
    Recover(
        Endpoint,
        Option<Security>,
        Sender<Result<Endpoint, MigrationError>>,
    ),
    /// Destination: where `Recover` requests go, and the flag set while the
    /// source is lost (a stop for fetching memory in full).
    SetRecoverHook(Sender<RecoverRequest>, Arc<AtomicBool>),
    /// Destination: the source is lost (pause and stay paused) or back.
    SourceLost(bool, Sender<Result<(), ControlError>>),
    /// A new external page-fault handler at this socket.
    AttachHandler(PathBuf, Sender<Result<super::AttachInfo, ControlError>>),
    /// End the working-set recording window and write the file.
    WorkingSetEnd(Sender<Result<crate::snapshot::working_set::RecordSummary, ControlError>>),
    Stop,
    /// A shutdown signal arrived (SIGINT, SIGTERM, SIGHUP).
    Signal(i32),
}

/// Events reaching the controller.
pub(crate) enum Event {
    /// From the mechanism (devices, vCPUs, memory).
    Vm(VmEvent),
    /// From a [`VmHandle`].
    Control(ControlRequest),
}

/// Posts events to the controller: a channel plus an eventfd its loop watches.
#[derive(Clone)]
pub(crate) struct EventSender {
    tx: Arc<Mutex<Sender<Event>>>,
    pub(crate) fd: Arc<EventFd>,
}

impl EventSender {
    pub(crate) fn new(tx: Sender<Event>, fd: Arc<EventFd>) -> EventSender {
        EventSender {
            tx: Arc::new(Mutex::new(tx)),
            fd,
        }
    }

    /// `false` if the controller is gone.
    pub(crate) fn send(&self, ev: Event) -> bool {
        let sent = self.tx.lock().map(|tx| tx.send(ev).is_ok()).unwrap_or(false);
        let _ = self.fd.write(1);
        sent
    }
}

/// A cloneable handle on a running VM's controller, for other threads (the
/// control socket): the requests of [`RunningVm`] without `wait`.
#[derive(Clone)]
pub struct VmHandle {
    pub(crate) events: EventSender,
    /// The VM's sandbox mode, for the threads that serve it (control socket).
    pub(crate) seccomp: sandbox::SeccompMode,
}

impl std::fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHandle").finish_non_exhaustive()
    }
}

impl VmHandle {
    fn ask<T>(&self, make: impl FnOnce(Sender<T>) -> ControlRequest) -> Result<T, ControlError> {
        let (tx, rx) = mpsc::channel();
        if !self.events.send(Event::Control(make(tx))) {
            return Err(ControlError::Ended);
        }
        rx.recv().map_err(|_| ControlError::Ended)
    }

    /// How the VM's threads are sandboxed (the control socket's threads
    /// are sandboxed the same way).
    pub fn seccomp(&self) -> sandbox::SeccompMode {
        self.seccomp
    }

    /// Pauses every vCPU (see `vmm_core::vcpu::manager` for vCPUs blocked in faults).
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
        if self.events.send(Event::Control(ControlRequest::Kick(cpu))) {
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
    pub fn snapshot(&self, dir: &Path, after: AfterSnapshot) -> Result<SnapshotInfo, ControlError> {
        self.ask(|tx| ControlRequest::Snapshot(dir.to_owned(), after, tx))?
    }

    /// A live snapshot to `dir` (`docs/live-snapshot.md`): the VM pauses
    /// only to capture its state and write-protect its memory, and runs on
    /// while memory is saved; returns once the snapshot is in place.
    pub fn snapshot_live(
        &self,
        dir: &Path,
        options: &super::live::LiveOptions,
    ) -> Result<super::live::LiveInfo, ControlError> {
        self.ask(|tx| ControlRequest::LiveSnapshot(dir.to_owned(), options.clone(), tx))?
    }

    /// Live migration to `to` (`docs/migration.md`): optional pre-copy
    /// rounds while the VM runs, then it pauses, sends the state, serves and
    /// pushes the pages; returns when every page is sent. The run then ends
    /// with `GuestEnd::Migrated`; on failure the VM stays paused here (or,
    /// during pre-copy, runs on) and can be resumed.
    pub fn migrate(&self, to: &Endpoint, options: &MigrateOptions) -> Result<SourceSummary, ControlError> {
        self.ask(|tx| ControlRequest::Migrate(to.clone(), options.clone(), tx))?
    }

    /// On the destination of a post-copy migration whose source was lost:
    /// listens at `from` for the source to resume it (`migrate` with
    /// `resume`); returns the address once listening. The paused VM
    /// resumes when the source is back (`docs/migration.md`).
    pub fn recover(&self, from: &Endpoint) -> Result<Endpoint, ControlError> {
        self.recover_with(from, None)
    }

    /// [`recover`](Self::recover), the source authenticating as `security`
    /// says (`None`: as on the destination's first listener).
    pub fn recover_with(
        &self,
        from: &Endpoint,
        security: Option<Security>,
    ) -> Result<Endpoint, ControlError> {
        Ok(self.ask(|tx| ControlRequest::Recover(from.clone(), security, tx))??)
    }

    /// Destination: where `recover` requests go; `lost` is set while the
    /// source is lost.
    /// Where the migration (outgoing or incoming) stands, live, and after it
    /// ended (`vmm ctl SOCK migration`).
    pub fn migration(&self) -> Result<serde_json::Value, ControlError> {
        self.ask(ControlRequest::Migration)?
    }

    /// Destination: the incoming session's report, for [`migration`](Self::migration).
    pub(crate) fn set_migration_report(&self, f: super::MigrationReportFn) {
        self.events
            .send(Event::Control(ControlRequest::SetMigrationReport(f)));
    }

    pub(crate) fn set_recover_hook(&self, hook: Sender<RecoverRequest>, lost: Arc<AtomicBool>) {
        self.events
            .send(Event::Control(ControlRequest::SetRecoverHook(hook, lost)));
    }

    /// Destination: the source is lost (the VM pauses and refuses to run
    /// until it is back) or back.
    pub(crate) fn source_lost(&self, lost: bool) -> Result<(), ControlError> {
        self.ask(|tx| ControlRequest::SourceLost(lost, tx))?
    }

    /// Gives a VM whose external page-fault handler is gone a new one,
    /// listening at `socket` (same userfaultfd, same mappings); every
    /// blocked fault faults again and reaches it, and the VM goes back to
    /// how it was (`docs/external-handler.md`).
    pub fn attach_handler(&self, socket: &Path) -> Result<super::AttachInfo, ControlError> {
        self.ask(|tx| ControlRequest::AttachHandler(socket.to_owned(), tx))?
    }

    /// Ends the working-set recording window (`--record-working-set`) and
    /// writes the file; the run goes on.
    pub fn working_set_end(&self) -> Result<crate::snapshot::working_set::RecordSummary, ControlError> {
        self.ask(ControlRequest::WorkingSetEnd)?
    }

    /// Ends the run (the guest is stopped where it is).
    pub fn stop(&self) {
        self.events.send(Event::Control(ControlRequest::Stop));
    }
}

/// A VM whose vCPUs and controller run.
pub struct RunningVm {
    pub(crate) handle: VmHandle,
    pub(crate) thread: JoinHandle<RunOutcome>,
    /// How long starting the vCPU threads took (each sandboxed before its
    /// first `KVM_RUN`), ms: a part of a migration destination's downtime.
    pub(crate) vcpus_ms: f64,
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

/// The controller thread panicked (a bug): the run's results are lost.
#[derive(Debug, thiserror::Error)]
#[error(
    "the VM controller thread panicked; the run's results are lost (a bug: please report it with the log)"
)]
pub struct ControllerPanicked;

impl RunningVm {
    /// A cloneable handle for other threads.
    pub fn handle(&self) -> VmHandle {
        self.handle.clone()
    }

    /// How long starting the vCPU threads took, ms.
    pub fn vcpus_ms(&self) -> f64 {
        self.vcpus_ms
    }

    /// Whether the run has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the end of the run.
    pub fn wait(self) -> Result<RunOutcome, ControllerPanicked> {
        self.thread.join().map_err(|_| ControllerPanicked)
    }
}
