//! Supervision of an external page-fault handler (`docs/external-handler.md`).
//!
//! When the attached handler is gone (its link's watcher posts
//! `MemoryEvent::ExternalHandlerLost`), nobody serves the userfaultfd: the
//! controller
//! 1. wakes every registered range, so that faults the dead handler had
//!    read fault again, and *parks* the events (reads and records them,
//!    never serves them): it then knows each waiting page and its vCPU;
//! 2. pauses the VM without signalling a vCPU blocked in a fault (a pending
//!    signal makes a kernel-mode userfault spin; PLATFORM.md): such vCPUs
//!    are reported `BlockedInFault`, nobody kicks them in a loop;
//! 3. goes to [`RunState::HandlerLost`] with a message naming the handler
//!    and the pages waiting (logged, and in `stats` as `memory_fault`);
//!
//! A handler that lives and holds its connection but no longer reads the
//! userfaultfd is taken as gone too, once faults have waited unread with
//! nothing changing (the `fdinfo` counts and the handler's CPU time,
//! sampled every second, none of its threads runnable) for the stall time
//! (`--handler-stall`, default [`DEFAULT_STALL`]; zero: never).
//! The steps are then the same; dropping its connection tells it (a
//! Firecracker handler then panics).
//!
//! 4. waits, in the event loop (no periodic wake-up but a look at the
//!    socket path every [`LOOK_EVERY`] and the grace's deadline), for a new
//!    handler: `attach-handler PATH`, or a new socket at the handler's path;
//!    if none comes within the grace, the run ends with
//!    `GuestEnd::MemoryFault` (exit code 13).
//!
//! Attaching connects the new handler (same userfaultfd, same mappings),
//! then wakes every range: each blocked fault faults again and reaches the
//! new handler. Events the dead handler read are not replayed otherwise.
//! The VM then goes back to how it was (running, or paused).

use super::{ControlError, Controller, GuestEnd, RunState};
use crate::uffd_handler::link::activity;
use crate::uffd_handler::{HandlerLink, Launcher, LostHook};
use sandbox::SeccompMode;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmm_core::memory::{ExternalMemory, WaitingFaults};

/// How often the handler's socket path is looked at while no handler serves.
pub const LOOK_EVERY: Duration = Duration::from_millis(250);
/// Default grace for a new handler after one died.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// Default time faults may wait unread, nothing changing, before the
/// handler is taken as gone.
pub const DEFAULT_STALL: Duration = Duration::from_secs(30);
/// How often the waiting faults are sampled for a stall.
const STALL_SAMPLE: Duration = Duration::from_secs(1);
/// How long the faults woken after a death get to fault again before the
/// pause (they are parked as they come; a late one is parked later).
const SETTLE: Duration = Duration::from_millis(100);

/// The external handler of a VM whose memory it serves.
pub(crate) struct ExternalHandler {
    /// Where the current (or the dead) handler listens.
    socket: PathBuf,
    /// The connection holder program (`vmm __uffd-peer`).
    program: PathBuf,
    /// The handshake message (the same for every handler).
    message: Vec<u8>,
    /// How long to wait for a new handler.
    grace: Duration,
    /// How long faults may wait unread, nothing changing (zero: no limit).
    stall: Duration,
    /// The last sample (waiting faults, the handler's CPU ticks), since
    /// when it is the same, and when to sample next.
    sampled: Option<((WaitingFaults, u64), Instant, Instant)>,
    link: Option<HandlerLink>,
    /// The next attachment's number.
    next_id: u64,
    on_lost: LostHook,
    lost: Option<Lost>,
    /// Forks the holders of handlers attached while the VM runs (when the
    /// VMM is sandboxed: its threads start no program).
    launcher: Option<Launcher>,
    /// How the holders and watchers are sandboxed.
    seccomp: SeccompMode,
}

impl std::fmt::Debug for ExternalHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalHandler")
            .field("socket", &self.socket)
            .field("link", &self.link)
            .field("lost", &self.lost.as_ref().map(|l| &l.message))
            .finish_non_exhaustive()
    }
}

/// A socket file's identity (a new handler's socket is a new file).
type FileId = (u64, u64, i64, i64);

fn socket_id(path: &Path) -> Option<FileId> {
    let m = std::fs::symlink_metadata(path).ok()?;
    m.file_type()
        .is_socket()
        .then(|| (m.dev(), m.ino(), m.ctime(), m.ctime_nsec()))
}

/// Why and since when no handler serves.
struct Lost {
    /// The whole message (what happened, what waits, what to do).
    message: String,
    /// What happened: the handler and how it went.
    what: String,
    deadline: Option<Instant>,
    /// The state before the loss (the VM goes back to it on attach).
    before: RunState,
    /// The dead handler's socket file, and the last one tried: not tried again.
    tried: Vec<FileId>,
    next_look: Instant,
}

/// A handler's state, for `stats`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HandlerStatus {
    /// Its socket.
    pub socket: PathBuf,
    /// The attached handler (`path (pid N, name)`), if one serves.
    pub attached: Option<String>,
    /// Why none serves (the VM is paused), if so.
    pub lost: Option<String>,
    /// Milliseconds left for a new handler.
    pub grace_left_ms: Option<u64>,
    /// Faults waiting on the userfaultfd.
    pub waiting: WaitingFaults,
    /// The faults known to wait (parked while no handler serves): vCPU and
    /// guest page.
    pub pages: Vec<WaitingPage>,
}

/// A fault waiting for its page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct WaitingPage {
    /// The vCPU whose thread faulted (`None`: another thread of the VMM).
    pub cpu: Option<u32>,
    /// The guest-physical page.
    pub guest_addr: u64,
    /// Whether the access was a write.
    pub write: bool,
}

/// What `attach-handler` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttachInfo {
    /// The new handler (`path (pid N, name)`).
    pub handler: String,
    /// Faults that were waiting and now reach it.
    pub woken: usize,
    /// Whether the VM runs again (it was running when the handler died).
    pub resumed: bool,
}

impl ExternalHandler {
    /// The supervision of `link`, the handler attached at restore.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        link: HandlerLink,
        program: PathBuf,
        message: Vec<u8>,
        grace: Duration,
        stall: Duration,
        on_lost: LostHook,
        launcher: Option<Launcher>,
        seccomp: SeccompMode,
    ) -> ExternalHandler {
        ExternalHandler {
            socket: link.socket().to_owned(),
            program,
            message,
            grace,
            stall,
            sampled: None,
            next_id: link.id() + 1,
            link: Some(link),
            on_lost,
            lost: None,
            launcher,
            seccomp,
        }
    }
}

/// Waits up to `d` for an event on the userfaultfd (parked by the caller).
fn wait_for_event(ext: &ExternalMemory, d: Duration) {
    let mut pfd = libc::pollfd {
        fd: ext.uffd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(d.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}

impl Controller {
    fn external_memory(&self) -> Option<&ExternalMemory> {
        self.vm.memory().external()
    }

    /// Reads the events queued while no handler serves (see the module docs).
    fn park_faults(&self) {
        if let Some(ext) = self.external_memory() {
            if let Err(e) = ext.park() {
                tracing::warn!("cannot read the userfaultfd while no handler serves: {e}");
            }
        }
    }

    /// The faults known to wait, each with its vCPU.
    fn waiting_pages(&self) -> Vec<WaitingPage> {
        let Some(ext) = self.external_memory() else {
            return Vec::new();
        };
        let tids = self.vm.vcpu_tids();
        ext.parked()
            .iter()
            .map(|p| WaitingPage {
                cpu: p
                    .tid
                    .and_then(|t| tids.iter().position(|&v| v == Some(t)))
                    .and_then(|i| u32::try_from(i).ok()),
                guest_addr: p.gpa,
                write: p.write,
            })
            .collect()
    }

    fn describe_waiting(&self) -> String {
        let waiting = self
            .external_memory()
            .and_then(|e| e.waiting().ok())
            .unwrap_or_default();
        let pages = self.waiting_pages();
        let list: Vec<String> = pages
            .iter()
            .map(|p| {
                let who = p.cpu.map_or("a VMM thread".to_string(), |c| format!("vCPU {c}"));
                format!("{who} on guest page {:#x}", p.guest_addr)
            })
            .collect();
        match (waiting.total(), list.is_empty()) {
            (0, true) => "no fault waits for a page yet".into(),
            (n, true) => format!("{n} faults wait for pages"),
            (n, false) => format!("{n} faults wait for pages: {}", list.join(", ")),
        }
    }

    /// The handler of link `link` is gone: pause and wait for another.
    pub(super) fn handler_lost(&mut self, link: u64, reason: &str) {
        if self.end.is_some() {
            return;
        }
        let Some(h) = &mut self.external else {
            return;
        };
        if h.link.as_ref().map(HandlerLink::id) != Some(link) {
            return; // a replaced attachment's late news
        }
        let who = h
            .link
            .take()
            .map_or_else(|| h.socket.display().to_string(), |l| l.describe());
        let grace = h.grace;
        let socket = h.socket.clone();
        // Faults the dead handler had read are never served: wake them, so
        // that they fault again, and park their events.
        if let Some(ext) = self.external_memory() {
            if let Err(e) = ext.wake_all() {
                tracing::warn!("cannot wake the faults of the dead handler: {e}");
            }
            let until = Instant::now() + SETTLE;
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                wait_for_event(ext, left.min(Duration::from_millis(20)));
                if ext.park().is_err() {
                    break;
                }
            }
        }
        let before = self.run;
        if !self.run.paused() {
            if let Err(e) = self.vm.pause_sparing_blocked() {
                tracing::warn!("cannot pause after the page-fault handler's death: {e}");
            }
        }
        if super::state::valid_transition(self.run, RunState::HandlerLost).is_ok() {
            self.run = RunState::HandlerLost;
        }
        self.park_faults();
        let what = format!("the page-fault handler {who} is gone: {reason}");
        let message = format!(
            "{what}. The VM is paused; {}. Start a handler at {} or run \
             `vmm ctl SOCKET attach-handler PATH` within {grace:?}, or the run ends with exit code 13",
            self.describe_waiting(),
            socket.display()
        );
        tracing::error!("{message}");
        self.memory_fault = Some(message.clone());
        let now = Instant::now();
        let tried = socket_id(&socket).into_iter().collect();
        if let Some(h) = &mut self.external {
            h.lost = Some(Lost {
                message,
                what,
                deadline: now.checked_add(grace),
                before,
                tried,
                next_look: now + LOOK_EVERY,
            });
        }
    }

    /// Attaches a new handler at `path` to a VM whose handler is gone.
    pub(super) fn attach_handler(&mut self, path: &Path) -> Result<AttachInfo, ControlError> {
        if self.run == RunState::Ended || self.end.is_some() {
            return Err(ControlError::Ended);
        }
        let (Some(h), Some(ext)) = (&mut self.external, self.vm.memory().external()) else {
            return Err(ControlError::NotExternal);
        };
        if let Some(l) = &h.link {
            return Err(ControlError::HandlerAttached(l.describe()));
        }
        // A new attachment number: a late loss report of the old one is ignored.
        let id = h.next_id;
        h.next_id += 1;
        let link = HandlerLink::connect(
            id,
            path,
            &h.program,
            &h.message,
            ext.uffd(),
            h.on_lost.clone(),
            h.launcher.as_ref(),
            h.seccomp,
        )?;
        // The handler has the userfaultfd: every blocked fault faults again
        // and reaches it (the events parked here and those the dead handler
        // read are not replayed otherwise).
        let woken = ext.parked().len();
        ext.wake_all()
            .map_err(|e| ControlError::Vm(vmm_core::VmError::Memory(e.into())))?;
        let handler = link.describe();
        let before = match &mut self.external {
            Some(h) => {
                h.socket = path.to_owned();
                h.link = Some(link);
                h.lost.take().map_or(RunState::Paused, |l| l.before)
            }
            None => RunState::Paused,
        };
        self.memory_fault = None;
        if self.run == RunState::HandlerLost {
            self.set(RunState::Paused)?;
        }
        let resumed = before == RunState::Running && self.run == RunState::Paused;
        if resumed {
            self.resume()?;
        }
        tracing::warn!("page-fault handler {handler} attached; {woken} parked faults woken");
        Ok(AttachInfo {
            handler,
            woken,
            resumed,
        })
    }

    /// While a handler serves: whether faults wait unread with nothing
    /// changing for longer than the stall time (it no longer reads).
    fn stall_tick(&mut self, now: Instant) {
        let Some(h) = &mut self.external else {
            return;
        };
        let (Some(link), false) = (&h.link, h.stall.is_zero()) else {
            h.sampled = None;
            return;
        };
        if h.sampled.is_some_and(|(_, _, next)| now < next) {
            return;
        }
        let id = link.id();
        let Some(w) = self.vm.memory().external().and_then(|e| e.waiting().ok()) else {
            return;
        };
        // A handler that uses CPU, or waits for one, is working, if slowly.
        let (ticks, runnable) = activity(link.pid()).unwrap_or((0, false));
        let next = now + STALL_SAMPLE.min(h.stall);
        let since = match h.sampled {
            Some((last, since, _)) if last == (w, ticks) && w.unread > 0 && !runnable => since,
            _ => now,
        };
        h.sampled = Some(((w, ticks), since, next));
        if now.duration_since(since) >= h.stall {
            let stall = h.stall;
            h.sampled = None;
            self.handler_lost(
                id,
                &format!(
                    "it left {} page faults unread for {stall:?} (its process and connection live, but it no longer reads the userfaultfd)",
                    w.unread
                ),
            );
        }
    }

    /// While no handler serves: the grace's end, and a new socket at the
    /// handler's path; while one serves: a stall. Called by the event loop
    /// after every wake-up.
    pub(super) fn handler_tick(&mut self) {
        let now = Instant::now();
        self.stall_tick(now);
        let Some(lost) = self.external.as_ref().and_then(|h| h.lost.as_ref()) else {
            return;
        };
        if lost.deadline.is_some_and(|d| now >= d) {
            let grace = self.external.as_ref().map(|h| h.grace).unwrap_or_default();
            let msg = format!(
                "{}; no page-fault handler was attached within {grace:?}; {} (none of them was given a zero page)",
                lost.what,
                self.describe_waiting()
            );
            self.end(GuestEnd::MemoryFault(msg));
            return;
        }
        if now < lost.next_look {
            return;
        }
        self.park_faults();
        let Some(h) = &mut self.external else {
            return;
        };
        let socket = h.socket.clone();
        let Some(l) = &mut h.lost else {
            return;
        };
        l.next_look = now + LOOK_EVERY;
        let Some(id) = socket_id(&socket) else {
            return;
        };
        if l.tried.contains(&id) {
            return;
        }
        l.tried.push(id);
        match self.attach_handler(&socket) {
            Ok(info) => tracing::warn!(
                "a new page-fault handler appeared at {}: attached {}",
                socket.display(),
                info.handler
            ),
            Err(e) => tracing::warn!(
                "a socket appeared at {} but cannot be attached: {e}",
                socket.display()
            ),
        }
    }

    /// When the event loop must call [`Controller::handler_tick`].
    pub(super) fn handler_wakeup(&self) -> Option<Instant> {
        let h = self.external.as_ref()?;
        let Some(lost) = &h.lost else {
            // A serving handler: the next stall sample (the first one at once).
            return match (&h.link, h.stall.is_zero()) {
                (Some(_), false) => Some(h.sampled.map_or_else(Instant::now, |(_, _, next)| next)),
                _ => None,
            };
        };
        Some(lost.deadline.map_or(lost.next_look, |d| d.min(lost.next_look)))
    }

    /// The handler's state, for `stats`.
    pub(super) fn handler_status(&self) -> Option<HandlerStatus> {
        let h = self.external.as_ref()?;
        if h.lost.is_some() {
            self.park_faults();
        }
        let now = Instant::now();
        Some(HandlerStatus {
            socket: h.socket.clone(),
            attached: h.link.as_ref().map(HandlerLink::describe),
            lost: h.lost.as_ref().map(|l| l.message.clone()),
            grace_left_ms: h
                .lost
                .as_ref()
                .and_then(|l| l.deadline)
                .map(|d| u64::try_from(d.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX)),
            waiting: self
                .external_memory()
                .and_then(|e| e.waiting().ok())
                .unwrap_or_default(),
            pages: self.waiting_pages(),
        })
    }

    /// At the end of the run: a VM whose handler is gone has vCPUs blocked
    /// on pages nobody serves; unregistering lets them see the stop (the
    /// run is over: nothing runs on those pages but the way out).
    pub(super) fn release_if_handler_lost(&mut self) {
        if self.external.as_ref().is_some_and(|h| h.lost.is_some()) {
            self.vm.memory().release_blocked();
        }
    }

    /// After the vCPUs stopped: the handler learns that the VM is gone.
    pub(super) fn detach_handler(&mut self) {
        if let Some(h) = &mut self.external {
            h.link = None;
        }
    }
}
