//! All vCPUs of a VM: their threads, which ones the guest has started, and
//! requests to all of them with the project's fault design in mind.
//!
//! A vCPU blocked in a stage-2 fault may be unable to leave `KVM_RUN` until
//! the page is served (on this project's KVM, any guest kernel-mode access;
//! see `docs/retry-core.md`). So a request to all vCPUs completes when each
//! has either acknowledged it or is known to be blocked in a userfault: such
//! a vCPU cannot run guest code, and it honours the request on its way out of
//! the fault. The caller gives the list of blocked faults (the memory
//! manager's); nothing here waits for a page.

use super::state::{CpuState, VcpuStateError};
use super::{
    ParkedThread, StopSink, VcpuError, VcpuFn, VcpuHandle, VcpuRequest, VcpuState, VcpuStatsSnapshot,
};
use ::memory::BlockedFault;
use kvm_ioctls::VcpuFd;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_device::device_manager::IoManager;

/// How long a pause or resume may take for vCPUs that are neither acknowledging
/// nor blocked in a fault (a guard, far above the measured latency).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long vCPUs get to acknowledge before those blocked in a userfault are
/// taken as blocked rather than waited for.
pub const BLOCKED_GRACE: Duration = Duration::from_millis(100);
/// How often unacknowledged vCPUs are kicked again while waiting.
const REKICK: Duration = Duration::from_millis(2);

/// How a vCPU stands after a pause.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
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

/// Where an outstanding request to a vCPU stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ack {
    Waiting(u64),
    Done(VcpuState),
    Blocked(u64),
    Gone,
}

/// Lists the stage-2 faults held by the userfault handler now.
pub type BlockedFn<'a> = &'a dyn Fn() -> Vec<BlockedFault>;

/// The vCPU threads of a VM.
#[derive(Debug)]
pub struct Vcpus {
    handles: Vec<VcpuHandle>,
    /// vCPUs the guest has started (the others wait for `START_CPUS`).
    started: Vec<bool>,
}

impl Vcpus {
    /// Starts one thread per vCPU: those in `started` run, the others wait
    /// paused. vCPU `i` is pinned to `pins[i]` if given (next to a fault
    /// handler thread, see `crate::placement`). Each thread is sandboxed in
    /// `seccomp` mode before it runs the guest. A vCPU with a thread in
    /// `parked` (started before, see [`ParkedThread`]) runs on it.
    pub fn spawn(
        fds: Vec<VcpuFd>,
        bus: &Arc<IoManager>,
        started: Vec<bool>,
        on_stop: StopSink,
        pins: &[Option<usize>],
        seccomp: sandbox::SeccompMode,
        mut parked: Vec<ParkedThread>,
    ) -> Result<Vcpus, VcpuError> {
        let mut handles = Vec::with_capacity(fds.len());
        for (i, fd) in (0u32..).zip(fds) {
            let initial = if started.get(i as usize).copied().unwrap_or(false) {
                VcpuState::Running
            } else {
                VcpuState::Paused
            };
            let pin = pins.get(i as usize).copied().flatten();
            let thread = parked
                .iter()
                .position(|p| p.cpu() == i)
                .map(|k| parked.swap_remove(k));
            handles.push(VcpuHandle::spawn(
                i,
                fd,
                bus.clone(),
                initial,
                on_stop.clone(),
                pin,
                seccomp,
                thread,
            )?);
        }
        let mut started = started;
        started.resize(handles.len(), false);
        Ok(Vcpus { handles, started })
    }

    /// Which vCPUs the guest has started.
    pub fn started(&self) -> &[bool] {
        &self.started
    }

    /// Number of vCPUs.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there is no vCPU (never, for a built VM).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Marks the secondary vCPUs started (the guest's `START_CPUS`) and, with
    /// `run_now`, lets them run; otherwise they run at the next resume.
    /// Returns `false` if they were started already.
    pub fn start_secondaries(&mut self, run_now: bool) -> bool {
        if self.started.iter().skip(1).any(|&s| s) {
            return false;
        }
        for i in 1..self.handles.len() {
            self.started[i] = true;
            if run_now {
                if let Err(e) = self.handles[i].send(VcpuRequest::Resume) {
                    tracing::warn!("cannot start vCPU {i}: {e}");
                }
            }
        }
        true
    }

    /// Kicks one vCPU, or all, out of the guest without a request.
    pub fn kick(&self, cpu: Option<u32>) {
        for h in self.handles.iter().filter(|h| cpu.is_none_or(|c| c == h.cpu())) {
            h.kick();
        }
    }

    /// Per-vCPU counters with each vCPU's thread id.
    pub fn stats(&self) -> Vec<(VcpuStatsSnapshot, Option<u32>)> {
        self.handles.iter().map(|h| (h.stats(), h.tid())).collect()
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

    /// Sends `make()` to the started vCPUs and waits until each has
    /// acknowledged or is blocked in a fault. With `spare`, a vCPU blocked in
    /// a fault is never kicked: it gets the request without a signal (see
    /// [`Vcpus::pause_sparing_blocked`]).
    fn request_started(
        &mut self,
        name: &'static str,
        make: impl Fn() -> VcpuRequest,
        blocked: BlockedFn<'_>,
        spare: bool,
    ) -> Result<Vec<Ack>, VcpuError> {
        let spared: Vec<bool> = if spare {
            let b = blocked();
            (0..self.handles.len())
                .map(|i| self.blocked_page(&b, i).is_some())
                .collect()
        } else {
            vec![false; self.handles.len()]
        };
        let mut acks: Vec<Ack> = Vec::with_capacity(self.handles.len());
        for (i, h) in self.handles.iter_mut().enumerate() {
            acks.push(if !self.started[i] {
                Ack::Done(VcpuState::Paused)
            } else if spared[i] {
                h.send_quiet(make()).map_or(Ack::Gone, Ack::Blocked)
            } else {
                h.send(make()).map_or(Ack::Gone, Ack::Waiting)
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
                let blocked = blocked();
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
                    return Err(VcpuError::NoAck {
                        cpu: self.handles[i].cpu(),
                        request: name,
                        waited: start.elapsed(),
                    });
                }
            }
            // With `spare`, only vCPUs not blocked in a fault are kicked.
            let kickable = |a: &Ack| matches!(a, Ack::Waiting(_)) || (!spare && pending(a));
            for (h, a) in self.handles.iter().zip(&acks) {
                if kickable(a) {
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

    /// Pauses every started vCPU; a vCPU blocked in a stage-2 fault is
    /// reported as such instead of waited for (see the module documentation).
    pub fn pause(&mut self, blocked: BlockedFn<'_>) -> Result<PauseReport, VcpuError> {
        self.pause_with(blocked, false)
    }

    /// Pauses every started vCPU without ever signalling one that is
    /// blocked in a userfault: for a VM whose faults nobody serves (its
    /// external handler died). A signal pending on a thread blocked in a
    /// host kernel-mode userfault makes the host spin at 100% CPU until the
    /// page comes (PLATFORM.md); unsignalled, it sleeps. Such a vCPU gets the
    /// request on its channel and is reported `BlockedInFault`; it honours
    /// the request after its page is served. A vCPU that faults between the
    /// check and its kick can still spin (a race this cannot close).
    pub fn pause_sparing_blocked(&mut self, blocked: BlockedFn<'_>) -> Result<PauseReport, VcpuError> {
        self.pause_with(blocked, true)
    }

    fn pause_with(&mut self, blocked: BlockedFn<'_>, spare: bool) -> Result<PauseReport, VcpuError> {
        let start = Instant::now();
        let acks = self.request_started("pause", || VcpuRequest::Pause, blocked, spare)?;
        let held = blocked();
        let vcpus = acks
            .iter()
            .enumerate()
            .map(|(i, a)| match a {
                _ if !self.started[i] => VcpuPause::NotStarted,
                Ack::Done(VcpuState::Exited) | Ack::Gone => VcpuPause::Exited,
                Ack::Blocked(_) | Ack::Waiting(_) => VcpuPause::BlockedInFault {
                    guest_addr: self.blocked_page(&held, i).unwrap_or(u64::MAX),
                },
                Ack::Done(_) => VcpuPause::Paused,
            })
            .collect();
        Ok(PauseReport {
            vcpus,
            took: start.elapsed(),
        })
    }

    /// Resumes every started vCPU.
    pub fn resume(&mut self, blocked: BlockedFn<'_>) -> Result<(), VcpuError> {
        self.request_started("resume", || VcpuRequest::Resume, blocked, false)
            .map(|_| ())
    }

    /// Runs `f` on vCPU `cpu`'s thread between two guest entries and waits.
    pub fn run_on(&mut self, cpu: u32, f: VcpuFn) -> Result<(), VcpuError> {
        let h = self
            .handles
            .get_mut(cpu as usize)
            .ok_or(VcpuError::NoSuchVcpu(cpu))?;
        h.request(VcpuRequest::Run(f), ACK_TIMEOUT)?;
        Ok(())
    }

    /// Saves every vCPU's state, each on its own thread (the vCPUs must be
    /// paused, or blocked in a fault that the handler can serve).
    /// All requests go out first: the threads save at once rather than one
    /// after the other, each a wake-up that may wait for a CPU, inside a
    /// snapshot's or a switchover's pause.
    pub fn save_states(&mut self, msrs: &Arc<Vec<u32>>) -> Result<Vec<CpuState>, VcpuError> {
        let mut sent = Vec::with_capacity(self.handles.len());
        for h in &mut self.handles {
            let (tx, rx) = std::sync::mpsc::channel();
            sent.push((h.send(VcpuRequest::SaveState(msrs.clone(), tx))?, rx));
        }
        let mut out = Vec::with_capacity(sent.len());
        for (h, (id, rx)) in self.handles.iter_mut().zip(sent) {
            let cpu = h.cpu();
            h.wait_ack(id, "save state", ACK_TIMEOUT)?;
            let state = rx
                .recv()
                .map_err(|_| VcpuError::Gone(cpu))?
                .map_err(|source: VcpuStateError| VcpuError::State { cpu, source })?;
            out.push(state);
        }
        Ok(out)
    }

    /// Stops and joins every vCPU, waiting at most `patience` for each; the
    /// ones that did not stop are returned (left behind rather than hanging).
    pub fn stop(&mut self, patience: Duration) -> Vec<(u32, VcpuError)> {
        let mut stuck = Vec::new();
        for h in self.handles.iter_mut() {
            if let Err(e) = h.stop(patience) {
                stuck.push((h.cpu(), e));
            }
        }
        stuck
    }

    /// Tries again to stop the vCPUs in `stuck` (after their pages were
    /// released); returns those still stuck.
    pub fn stop_again(&mut self, stuck: Vec<(u32, VcpuError)>, patience: Duration) -> Vec<(u32, VcpuError)> {
        stuck
            .into_iter()
            .filter_map(
                |(cpu, e)| match self.handles.iter_mut().find(|h| h.cpu() == cpu) {
                    Some(h) => h.stop(patience).err().map(|again| (cpu, again)),
                    None => Some((cpu, e)),
                },
            )
            .collect()
    }
}
