//! The vCPU as a state machine (`Running` / `Paused` / `Exited`) on its own
//! thread, controlled over a channel, woken out of `KVM_RUN` by a kick.
//!
//! Kick: set `kvm_run.immediate_exit`, fence, `pthread_kill` with a real-time
//! signal whose handler does nothing. A vCPU inside `KVM_RUN` leaves it with
//! EINTR; one about to enter returns at once because of `immediate_exit`. The
//! requester re-kicks until the vCPU acknowledges, because a single signal can be
//! absorbed while the thread is in user space. A vCPU blocked in the host kernel
//! on a guest page may only leave once that page is served (see
//! `docs/retry-core.md`): requesters never assume a bounded ack time without
//! the page source making progress ([`manager`] reports such a vCPU as
//! blocked instead of waiting for it).
//!
//! - [`exit`]: what each KVM exit does (a free function, unit tested);
//! - [`state`]: the vCPU's KVM state as a persistable component;
//! - [`manager`]: all vCPUs of a VM: start, pause with blocked-fault
//!   reporting, resume, state capture, stop.

pub mod exit;
pub mod manager;
pub mod state;

use exit::{handle_exit, Exit, ExitAction, StopReason};
use kvm_ioctls::{VcpuExit, VcpuFd};
use persist::Persist;
use sandbox::{SeccompMode, ThreadClass};
use state::{complete_pending_io, CpuState, VcpuComponent, VcpuStateError};
use std::sync::atomic::{fence, AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_device::device_manager::IoManager;

/// Errors of vCPU control.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The thread could not be started (or sandboxed).
    #[error("cannot start the thread of vCPU {cpu}: {source}")]
    Spawn {
        /// vCPU index.
        cpu: u32,
        /// Why.
        #[source]
        source: sandbox::SpawnError,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    /// The vCPU did not acknowledge in time.
    #[error("vCPU {cpu} did not acknowledge `{request}` within {waited:?}; it may be blocked on a guest page that no source serves")]
    NoAck {
        /// vCPU index.
        cpu: u32,
        /// The request.
        request: &'static str,
        /// How long we waited.
        waited: Duration,
    },
    /// The vCPU thread has ended.
    #[error("vCPU {0} has already exited")]
    Gone(u32),
    /// No such vCPU.
    #[error("there is no vCPU {0}")]
    NoSuchVcpu(u32),
    /// The thread started ahead for the vCPU has ended before its work came.
    #[error("the thread started ahead for vCPU {0} has ended; build the VM again")]
    ParkedGone(u32),
    /// Its state could not be saved.
    #[error("vCPU {cpu}: {source}")]
    State {
        /// vCPU index.
        cpu: u32,
        /// Why.
        #[source]
        source: VcpuStateError,
    },
}

/// The state of a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    /// Running guest code (or about to).
    Running,
    /// Not running; waits for a request.
    Paused,
    /// Done; the thread ends.
    Exited,
}

/// A closure run on the vCPU thread with its `VcpuFd` (tests, experiments).
pub type VcpuFn = Box<dyn FnOnce(&mut VcpuFd) + Send>;

/// Where a vCPU sends its saved state.
pub type StateReply = std::sync::mpsc::Sender<Result<CpuState, VcpuStateError>>;

/// A request to a vCPU.
pub enum VcpuRequest {
    /// Stop running the guest, wait for `Resume`.
    Pause,
    /// Run the guest again.
    Resume,
    /// End the thread.
    Stop,
    /// Save the vCPU's state (on its own thread, where pending I/O can be
    /// completed first) and send it; the MSRs to save are given.
    SaveState(Arc<Vec<u32>>, StateReply),
    /// Run a closure on the vCPU thread, between two guest entries.
    Run(VcpuFn),
}

impl VcpuRequest {
    fn name(&self) -> &'static str {
        match self {
            VcpuRequest::Pause => "pause",
            VcpuRequest::Resume => "resume",
            VcpuRequest::Stop => "stop",
            VcpuRequest::SaveState(..) => "save state",
            VcpuRequest::Run(_) => "run",
        }
    }
}

impl std::fmt::Debug for VcpuRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a vCPU tells the VM on its own (not an acknowledgement).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuStopped {
    /// vCPU index.
    pub cpu: u32,
    /// Why it stopped.
    pub reason: StopReason,
    /// Guest RIP at the stop, when the registers could be read.
    pub rip: Option<u64>,
}

/// Per-vCPU counters.
#[derive(Debug, Default)]
pub struct VcpuStats {
    /// KVM_RUN returns.
    pub exits: AtomicU64,
    /// Port I/O exits.
    pub io_exits: AtomicU64,
    /// Kicks that took the vCPU out of the guest (EINTR / immediate exit).
    pub interruptions: AtomicU64,
    /// Kernel thread id of the vCPU thread (0 until it starts): userfault
    /// events name the faulting thread, so this maps a blocked fault to its vCPU.
    pub tid: AtomicI32,
}

/// A snapshot of [`VcpuStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct VcpuStatsSnapshot {
    /// vCPU index.
    pub cpu: u32,
    /// KVM_RUN returns.
    pub exits: u64,
    /// Port I/O exits.
    pub io_exits: u64,
    /// Interruptions by kicks.
    pub interruptions: u64,
    /// Stage-2 faults (userfaults) of this vCPU's thread served by the retry core.
    pub stage2_faults: u64,
    /// Retries of those faults.
    pub stage2_retries: u64,
    /// Time this vCPU spent blocked in them, in microseconds.
    pub stage2_blocked_us: u64,
    /// CPU time the vCPU's thread has used, in microseconds (host and guest;
    /// a vCPU blocked in a fault uses none, one spinning in the host shows).
    pub cpu_time_us: u64,
    /// The vCPU thread's kernel thread id, once it runs.
    pub tid: Option<u32>,
    /// The host CPU the vCPU thread is pinned to, if any (`crate::placement`).
    pub host_cpu: Option<usize>,
}

/// CPU time thread `tid` of this process has used (`/proc/self/task/TID/schedstat`).
fn thread_cpu_time_us(tid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(ns / 1000)
}

/// The kick target: `kvm_run.immediate_exit` and the thread, while both live.
struct KickTarget {
    immediate_exit: *mut u8,
    thread: libc::pthread_t,
}

/// Kicks a vCPU out of `KVM_RUN`.
#[derive(Default)]
pub struct Kick {
    // `None` before the thread starts and after it has dropped its `VcpuFd`.
    target: Mutex<Option<KickTarget>>,
}

// SAFETY: the raw pointer is only dereferenced under the mutex, while the vCPU
// thread guarantees the `kvm_run` mapping it points into is alive (it clears the
// target under the same mutex before dropping its `VcpuFd`).
unsafe impl Send for Kick {}
// SAFETY: as above; all access goes through the mutex.
unsafe impl Sync for Kick {}

impl std::fmt::Debug for Kick {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kick").finish_non_exhaustive()
    }
}

/// The real-time signal used for kicks.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the do-nothing kick handler (without SA_RESTART, so KVM_RUN returns EINTR).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler);
    });
    result.map_err(VcpuError::Signal)
}

impl Kick {
    fn immediate_exit(target: &KickTarget) -> &AtomicU8 {
        // SAFETY: `immediate_exit` points into the vCPU's mapped `kvm_run`, valid
        // while the target is set (see `Kick`); a u8 is always aligned; KVM and
        // this module only access the byte atomically (kvm-ioctls never touches it).
        unsafe { AtomicU8::from_ptr(target.immediate_exit) }
    }

    /// Kicks the vCPU; `false` if its thread is not running.
    pub fn kick(&self) -> bool {
        let Ok(guard) = self.target.lock() else {
            return false;
        };
        let Some(target) = guard.as_ref() else {
            return false;
        };
        Self::immediate_exit(target).store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        // SAFETY: `thread` is a live thread: the target is cleared before it ends.
        unsafe { libc::pthread_kill(target.thread, kick_signal()) };
        true
    }

    fn clear_immediate_exit(&self) {
        if let Ok(guard) = self.target.lock() {
            if let Some(t) = guard.as_ref() {
                Self::immediate_exit(t).store(0, Ordering::SeqCst);
            }
        }
    }

    fn set_target(&self, target: Option<KickTarget>) {
        if let Ok(mut guard) = self.target.lock() {
            *guard = target;
        }
    }
}

/// Where a vCPU reports that it stopped on its own.
pub type StopSink = Arc<dyn Fn(VcpuStopped) + Send + Sync>;

/// The VM's side of a vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    cpu: u32,
    tx: Sender<(u64, VcpuRequest)>,
    acks: Receiver<(u64, VcpuState)>,
    next_id: u64,
    kick: Arc<Kick>,
    stats: Arc<VcpuStats>,
    thread: Option<JoinHandle<()>>,
}

/// How often an unacknowledged request is kicked again.
const REKICK: Duration = Duration::from_millis(2);

/// The work a parked vCPU thread is given: the vCPU's run loop.
type ParkedWork = Box<dyn FnOnce() + Send>;

/// A vCPU thread started and sandboxed ahead of its vCPU, waiting for its
/// work: a migration destination starts these while it is built, so that
/// no thread start and no filter install (0.3-1 ms per vCPU idle, several
/// under load) lands in the switchover's downtime. Dropped unused, it ends.
pub struct ParkedThread {
    cpu: u32,
    work: mpsc::SyncSender<ParkedWork>,
    thread: JoinHandle<()>,
}

impl std::fmt::Debug for ParkedThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParkedThread")
            .field("cpu", &self.cpu)
            .finish_non_exhaustive()
    }
}

impl ParkedThread {
    /// Starts the thread of vCPU `cpu` (class `vcpu`, sandboxed in
    /// `seccomp` mode before this returns), parked until
    /// [`VcpuHandle::spawn`] hands it the vCPU.
    pub fn spawn(cpu: u32, seccomp: SeccompMode) -> Result<ParkedThread, VcpuError> {
        install_kick_handler()?;
        let (work, rx) = mpsc::sync_channel::<ParkedWork>(1);
        let thread = sandbox::spawn(
            std::thread::Builder::new().name(format!("vcpu{cpu}")),
            ThreadClass::Vcpu,
            seccomp,
            move || {
                if let Ok(f) = rx.recv() {
                    f();
                }
            },
        )
        .map_err(|source| VcpuError::Spawn { cpu, source })?;
        Ok(ParkedThread { cpu, work, thread })
    }

    /// The vCPU index it was started for.
    pub fn cpu(&self) -> u32 {
        self.cpu
    }
}

impl VcpuHandle {
    /// Starts the thread of `fd` in `initial` state (`Running` or `Paused`),
    /// pinned to CPU `pin` if given, or hands it to `parked`, a thread started
    /// for it before. The thread is sandboxed (class `vcpu`, `seccomp` mode)
    /// before this returns, so before its first `KVM_RUN`.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        cpu: u32,
        fd: VcpuFd,
        bus: Arc<IoManager>,
        initial: VcpuState,
        on_stop: StopSink,
        pin: Option<usize>,
        seccomp: SeccompMode,
        parked: Option<ParkedThread>,
    ) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        let (tx, rx) = mpsc::channel();
        let (ack_tx, acks) = mpsc::channel();
        let kick = Arc::new(Kick::default());
        let stats = Arc::new(VcpuStats::default());
        let mut vcpu = VcpuThread {
            cpu,
            fd,
            bus,
            rx,
            acks: ack_tx,
            kick: kick.clone(),
            stats: stats.clone(),
            on_stop,
            pin,
        };
        let thread = match parked {
            Some(p) => {
                p.work
                    .send(Box::new(move || vcpu.run(initial)))
                    .map_err(|_| VcpuError::ParkedGone(cpu))?;
                p.thread
            }
            None => sandbox::spawn(
                std::thread::Builder::new().name(format!("vcpu{cpu}")),
                ThreadClass::Vcpu,
                seccomp,
                move || vcpu.run(initial),
            )
            .map_err(|source| VcpuError::Spawn { cpu, source })?,
        };
        Ok(VcpuHandle {
            cpu,
            tx,
            acks,
            next_id: 0,
            kick,
            stats,
            thread: Some(thread),
        })
    }

    /// The vCPU index.
    pub fn cpu(&self) -> u32 {
        self.cpu
    }

    /// Kernel thread id of the vCPU thread, once it runs.
    pub fn tid(&self) -> Option<u32> {
        u32::try_from(self.stats.tid.load(Ordering::Acquire))
            .ok()
            .filter(|&t| t != 0)
    }

    /// Counters.
    pub fn stats(&self) -> VcpuStatsSnapshot {
        VcpuStatsSnapshot {
            cpu: self.cpu,
            exits: self.stats.exits.load(Ordering::Relaxed),
            io_exits: self.stats.io_exits.load(Ordering::Relaxed),
            interruptions: self.stats.interruptions.load(Ordering::Relaxed),
            cpu_time_us: self.tid().and_then(thread_cpu_time_us).unwrap_or(0),
            tid: self.tid(),
            ..Default::default()
        }
    }

    /// Kicks the vCPU out of the guest without a request (it re-enters).
    pub fn kick(&self) -> bool {
        self.kick.kick()
    }

    /// Sends a request and kicks, without waiting.
    pub fn send(&mut self, req: VcpuRequest) -> Result<u64, VcpuError> {
        let id = self.send_quiet(req)?;
        self.kick.kick();
        Ok(id)
    }

    /// Sends a request without a kick: the vCPU sees it at its next exit
    /// (for a vCPU blocked in a fault that must not be signalled).
    pub fn send_quiet(&mut self, req: VcpuRequest) -> Result<u64, VcpuError> {
        self.next_id += 1;
        let id = self.next_id;
        self.tx.send((id, req)).map_err(|_| VcpuError::Gone(self.cpu))?;
        Ok(id)
    }

    /// Waits up to `wait` for the acknowledgement of request `id`; `None` if it
    /// has not come (the caller decides whether to kick again).
    pub fn poll_ack(&mut self, id: u64, wait: Duration) -> Result<Option<VcpuState>, VcpuError> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.acks.recv_timeout(left) {
                Ok((ack_id, state)) if ack_id == id => return Ok(Some(state)),
                Ok(_) => {} // a late ack of an earlier request
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => return Err(VcpuError::Gone(self.cpu)),
            }
        }
    }

    /// Waits for the acknowledgement of request `id`, re-kicking meanwhile.
    pub fn wait_ack(
        &mut self,
        id: u64,
        request: &'static str,
        timeout: Duration,
    ) -> Result<VcpuState, VcpuError> {
        let start = Instant::now();
        loop {
            match self.acks.recv_timeout(REKICK) {
                Ok((ack_id, state)) if ack_id == id => return Ok(state),
                Ok(_) => {} // a late ack of an earlier request
                Err(RecvTimeoutError::Timeout) => {
                    if start.elapsed() >= timeout {
                        return Err(VcpuError::NoAck {
                            cpu: self.cpu,
                            request,
                            waited: start.elapsed(),
                        });
                    }
                    self.kick.kick();
                }
                Err(RecvTimeoutError::Disconnected) => return Err(VcpuError::Gone(self.cpu)),
            }
        }
    }

    /// Sends a request and waits for its acknowledgement.
    pub fn request(&mut self, req: VcpuRequest, timeout: Duration) -> Result<VcpuState, VcpuError> {
        let name = req.name();
        let id = self.send(req)?;
        self.wait_ack(id, name, timeout)
    }

    /// Stops the thread and joins it. A vCPU that already ended is fine.
    pub fn stop(&mut self, timeout: Duration) -> Result<(), VcpuError> {
        match self.request(VcpuRequest::Stop, timeout) {
            Ok(_) | Err(VcpuError::Gone(_)) => {}
            Err(e) => return Err(e),
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        Ok(())
    }
}

struct VcpuThread {
    cpu: u32,
    fd: VcpuFd,
    bus: Arc<IoManager>,
    rx: Receiver<(u64, VcpuRequest)>,
    acks: Sender<(u64, VcpuState)>,
    kick: Arc<Kick>,
    stats: Arc<VcpuStats>,
    on_stop: StopSink,
    /// The CPU to pin this thread to (shared with the fault handler).
    pin: Option<usize>,
}

impl VcpuThread {
    fn run(&mut self, initial: VcpuState) {
        let immediate_exit = &mut self.fd.get_kvm_run().immediate_exit as *mut u8;
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        self.stats.tid.store(tid, Ordering::Release);
        if let Some(c) = self.pin {
            // Only slower if it fails: the scheduler places the thread.
            if let Err(e) = ::memory::pin_current_thread(c) {
                tracing::warn!(cpu = self.cpu, "vCPU thread stays unpinned: {e}");
            }
        }
        self.kick.set_target(Some(KickTarget {
            immediate_exit,
            thread,
        }));

        let mut state = initial;
        while state != VcpuState::Exited {
            state = match state {
                VcpuState::Paused => match self.rx.recv() {
                    Ok((id, req)) => self.handle_request(id, req, state),
                    Err(_) => VcpuState::Exited,
                },
                VcpuState::Running => match self.rx.try_recv() {
                    Ok((id, req)) => self.handle_request(id, req, state),
                    Err(TryRecvError::Disconnected) => VcpuState::Exited,
                    Err(TryRecvError::Empty) => self.run_guest(),
                },
                VcpuState::Exited => VcpuState::Exited,
            };
        }
        // The kvm_run mapping goes away with the VcpuFd: no kick may touch it after.
        self.kick.set_target(None);
    }

    fn handle_request(&mut self, id: u64, req: VcpuRequest, state: VcpuState) -> VcpuState {
        let next = match req {
            VcpuRequest::Pause => VcpuState::Paused,
            VcpuRequest::Resume => VcpuState::Running,
            VcpuRequest::Stop => VcpuState::Exited,
            VcpuRequest::SaveState(msrs, reply) => {
                let saved = complete_pending_io(&mut self.fd).and_then(|()| {
                    VcpuComponent {
                        fd: &self.fd,
                        msr_indices: &msrs,
                    }
                    .save()
                });
                let _ = reply.send(saved);
                state
            }
            VcpuRequest::Run(f) => {
                f(&mut self.fd);
                state
            }
        };
        let _ = self.acks.send((id, next));
        next
    }

    /// One guest entry; returns the next state.
    fn run_guest(&mut self) -> VcpuState {
        self.stats.exits.fetch_add(1, Ordering::Relaxed);
        let action = match self.fd.run() {
            Ok(VcpuExit::InternalError) => None,
            Ok(exit) => Some(handle_exit(convert(exit, &self.stats), &self.bus)),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Some(handle_exit(Exit::Interrupted, &self.bus))
            }
            Err(e) => Some(handle_exit(
                Exit::Other(format!("KVM_RUN failed: {e}")),
                &self.bus,
            )),
        };
        let action = action.unwrap_or_else(|| {
            let run = self.fd.get_kvm_run();
            // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is
            // the active member of the exit union.
            let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
            handle_exit(Exit::InternalError { suberror }, &self.bus)
        });
        match action {
            ExitAction::Continue => VcpuState::Running,
            ExitAction::Interrupted => {
                self.stats.interruptions.fetch_add(1, Ordering::Relaxed);
                self.kick.clear_immediate_exit();
                VcpuState::Running
            }
            ExitAction::Stop(reason) => {
                let rip = self.fd.get_regs().ok().map(|r| r.rip);
                (self.on_stop)(VcpuStopped {
                    cpu: self.cpu,
                    reason,
                    rip,
                });
                // Stay around for requests (state dumps, the final Stop).
                VcpuState::Paused
            }
        }
    }
}

fn convert<'a>(exit: VcpuExit<'a>, stats: &VcpuStats) -> Exit<'a> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            stats.io_exits.fetch_add(1, Ordering::Relaxed);
            Exit::IoIn { port, data }
        }
        VcpuExit::IoOut(port, data) => {
            stats.io_exits.fetch_add(1, Ordering::Relaxed);
            Exit::IoOut { port, data }
        }
        VcpuExit::MmioRead(addr, data) => Exit::MmioRead { addr, data },
        VcpuExit::MmioWrite(addr, _) => Exit::MmioWrite { addr },
        VcpuExit::Intr => Exit::Interrupted,
        VcpuExit::Hlt => Exit::Hlt,
        VcpuExit::Shutdown => Exit::Shutdown,
        VcpuExit::FailEntry(reason, _) => Exit::FailEntry { reason },
        VcpuExit::SystemEvent(kind, _) => Exit::SystemEvent { kind },
        VcpuExit::InternalError => Exit::InternalError { suberror: 0 },
        other => Exit::Other(format!("{other:?}")),
    }
}
