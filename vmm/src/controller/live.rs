//! Live snapshots on the controller (`docs/live-snapshot.md`): pause, capture
//! the state, write-protect guest RAM, resume, and let the `live-snapshot`
//! thread write memory while the guest runs; its end comes back as
//! `ControlRequest::LiveSnapshotDone`.

use super::{ControlError, ControlRequest, Controller, Event, GuestEnd, RunState};
use crate::snapshot::live::{check_kvm, write_live, BUFFER_PAGES};
use crate::snapshot::{self, AfterSnapshot, Manifest, SnapshotError};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;
use vmm_core::memory::live::ProtectTimes;
use vmm_core::memory::{ReleaseReport, WpMode, WpSession};

/// How to take a live snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveOptions {
    /// What to do once it is written (`Restore`: the VM runs on if it ran).
    pub then: AfterSnapshot,
    /// How guest RAM is write-protected.
    pub mode: WpMode,
    /// Consistency check (tests): also write a stop-the-world snapshot here
    /// inside the pause, from the same instant.
    pub reference: Option<PathBuf>,
    /// Pages of the fault buffer (default [`BUFFER_PAGES`]); tests use a tiny
    /// one to hold a vCPU in a WP fault.
    pub buffer_pages: Option<usize>,
    /// Tests and stress: the saver sleeps this long after each 1 MiB window,
    /// so requests can arrive while it runs.
    pub pace: Option<std::time::Duration>,
}

/// What a live snapshot did.
#[derive(Debug, Clone, Serialize)]
pub struct LiveInfo {
    /// The directory.
    pub dir: PathBuf,
    /// The snapshot's identity.
    pub id: String,
    /// Bytes of guest memory saved.
    pub memory_bytes: u64,
    /// Memory extents.
    pub extents: usize,
    /// From the request to the snapshot in place, ms.
    pub took_ms: f64,
    /// vCPUs paused (pause, state capture, write protection, resume), ms.
    pub downtime_ms: f64,
    /// Of the downtime: pausing the vCPUs, ms.
    pub pause_ms: f64,
    /// Of the downtime: capturing the state, ms.
    pub capture_ms: f64,
    /// Of the downtime: write-protecting memory.
    pub protect: ProtectTimes,
    /// Of the downtime: write-protecting memory in all (`protect`'s scan and
    /// protect; its registration and handler thread come before the pause), ms.
    pub start_live_ms: f64,
    /// Of the downtime: resuming the vCPUs and devices, ms.
    pub resume_ms: f64,
    /// Lazily served memory fetched in full and handed back to the kernel
    /// before the pause (not downtime), if it was lazily served.
    pub released: Option<ReleaseReport>,
    /// How memory was protected.
    pub mode: WpMode,
    /// Fault and saver counters.
    pub wp: ::memory::wp::WpStats,
    /// The reference snapshot written inside the pause, if asked for.
    pub reference: Option<PathBuf>,
}

/// A live snapshot being written.
#[derive(Debug)]
pub(super) struct LiveRun {
    reply: Sender<Result<LiveInfo, ControlError>>,
    options: LiveOptions,
    dir: PathBuf,
    start: Instant,
    downtime_ms: f64,
    pause_ms: f64,
    capture_ms: f64,
    start_live_ms: f64,
    resume_ms: f64,
    released: Option<ReleaseReport>,
    session: Arc<WpSession>,
    abort: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Controller {
    /// Starts a live snapshot to `dir`; the reply comes when it is written.
    pub(super) fn live_snapshot(
        &mut self,
        dir: &Path,
        options: LiveOptions,
        reply: Sender<Result<LiveInfo, ControlError>>,
    ) -> Result<(), ControlError> {
        if self.live.is_some() {
            return Err(ControlError::LiveRunning);
        }
        if let Some(e) = self.run.busy() {
            return Err(e);
        }
        if self.vm.memory().is_external() {
            return Err(ControlError::LiveExternal);
        }
        self.vm.memory().check_live().map_err(ControlError::Live)?;
        check_kvm()?;
        let start = Instant::now();
        // Lazily served memory: fetched in full while the guest runs and
        // handed back to the kernel (docs/live-snapshot.md), so it can be
        // write-protected on a userfaultfd of its own. A working-set
        // recording ends here: later touches fault no more.
        if self.vm.memory().lazy().is_some() {
            if let Some(Err(e)) = self.recording.as_ref().map(|r| r.finish()) {
                tracing::warn!("the working-set recording ended by the live snapshot failed: {e}");
            }
        }
        let released = match self.vm.memory_mut().release_lazy(&self.source_lost) {
            Ok(r) => r,
            Err(e) => {
                use vmm_core::memory::MemoryManagerError as M;
                if matches!(e, M::Stranded(_) | M::Unregister(_)) && !self.run.paused() {
                    // Its handler is gone: the guest must not run on.
                    if let Err(p) = self.pause() {
                        tracing::warn!("cannot pause after a failed release of lazy memory: {p}");
                    }
                }
                return Err(ControlError::LiveLazy(Box::new(e)));
            }
        };
        // Registering RAM and starting the handler protect nothing yet: done
        // while the guest runs.
        let events = self.events.clone();
        let sink: vmm_core::event::EventSink = Arc::new(move |ev| {
            events.send(Event::Vm(ev));
        });
        let session = self
            .vm
            .memory_mut()
            .prepare_live(options.mode, options.buffer_pages.unwrap_or(BUFFER_PAGES), sink)
            .map_err(ControlError::Live)?;
        let start_pause = Instant::now();
        let was_running = self.run == RunState::Running;
        if was_running {
            if let Err(e) = self.pause() {
                self.vm.memory_mut().end_live();
                return Err(e);
            }
        }
        let paused = Instant::now();
        let back = |c: &mut Controller, e: ControlError| {
            c.vm.memory_mut().end_live();
            if was_running && c.run.paused() {
                let _ = c.resume();
            }
            Err(e)
        };
        let state = match self.capture() {
            Ok(s) => s,
            Err(e) => return back(self, e),
        };
        let captured = Instant::now();
        if let Some(r) = &options.reference {
            if let Err(e) =
                snapshot::write_snapshot(r, &state, self.vm.memory().ram(), self.snapshot_key.as_ref())
            {
                return back(self, e.into());
            }
        }
        let before_protect = Instant::now();
        if let Err(e) = session.protect() {
            return back(self, ControlError::Live(e));
        }
        let protected = Instant::now();
        let resume = match options.then {
            AfterSnapshot::Resume => true,
            AfterSnapshot::Restore => was_running,
            AfterSnapshot::Pause | AfterSnapshot::Stop => false,
        };
        if resume && self.run.paused() {
            if let Err(e) = self.resume() {
                return back(self, e);
            }
        }
        let resumed = Instant::now();
        // The reference copy is a test aid: it is not downtime.
        let downtime = start_pause.elapsed() - (before_protect - captured);
        let abort = Arc::new(AtomicBool::new(false));
        let thread = {
            let (session, abort, events) = (session.clone(), abort.clone(), self.events.clone());
            let (dir, key, pace) = (dir.to_owned(), self.snapshot_key.clone(), options.pace);
            // A thread started by a sandboxed one takes its parent's mode.
            let mode = sandbox::current().map_or(sandbox::SeccompMode::Off, |(_, m)| m);
            sandbox::spawn(
                std::thread::Builder::new().name("live-snapshot".into()),
                sandbox::ThreadClass::LiveSaver,
                mode,
                move || {
                    let r = write_live(&dir, &state, &session, key.as_ref(), &abort, pace);
                    events.send(Event::Control(ControlRequest::LiveSnapshotDone(Box::new(r))));
                },
            )
            .map_err(|e| ControlError::Live(vmm_core::memory::LiveError::Spawn(e)))
        };
        let thread = match thread {
            Ok(t) => t,
            Err(e) => return back(self, e),
        };
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        self.live = Some(LiveRun {
            reply,
            options,
            dir: dir.to_owned(),
            start,
            downtime_ms: downtime.as_secs_f64() * 1e3,
            pause_ms: ms(start_pause, paused),
            start_live_ms: ms(before_protect, protected),
            resume_ms: ms(protected, resumed),
            released,
            capture_ms: ms(paused, captured),
            session,
            abort,
            thread: Some(thread),
        });
        Ok(())
    }

    /// The live snapshot's writer finished: end the protection, answer, and
    /// go on as asked. A failure pauses the VM with the error.
    pub(super) fn live_done(&mut self, r: Result<Manifest, SnapshotError>) {
        let Some(mut run) = self.live.take() else {
            return;
        };
        if let Some(t) = run.thread.take() {
            let _ = t.join();
        }
        let wp = run.session.stats();
        let protect = run.session.times();
        self.vm.memory_mut().end_live();
        match r {
            Ok(m) => {
                let info = LiveInfo {
                    dir: run.dir.clone(),
                    id: m.id.clone(),
                    memory_bytes: m.memory.extents.iter().map(|e| e.len).sum(),
                    extents: m.memory.extents.len(),
                    took_ms: run.start.elapsed().as_secs_f64() * 1e3,
                    downtime_ms: run.downtime_ms,
                    pause_ms: run.pause_ms,
                    capture_ms: run.capture_ms,
                    start_live_ms: run.start_live_ms,
                    resume_ms: run.resume_ms,
                    released: run.released,
                    protect,
                    mode: run.options.mode,
                    wp,
                    reference: run.options.reference.clone(),
                };
                let _ = run.reply.send(Ok(info));
                if run.options.then == AfterSnapshot::Stop {
                    self.end(GuestEnd::Stopped);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                tracing::error!("{msg}");
                if matches!(self.run, RunState::Running) {
                    if let Err(e) = self.pause().map_err(|e| e.to_string()) {
                        tracing::warn!("cannot pause after a failed live snapshot: {e}");
                    }
                }
                let _ = run.reply.send(Err(ControlError::Snapshot(e)));
            }
        }
    }

    /// The run ends while a live snapshot is written: abandon it (the
    /// writer stops between windows, the protection goes).
    pub(super) fn abandon_live(&mut self) {
        let Some(mut run) = self.live.take() else {
            return;
        };
        run.abort.store(true, Ordering::Release);
        if let Some(t) = run.thread.take() {
            let _ = t.join();
        }
        self.vm.memory_mut().end_live();
        let _ = run
            .reply
            .send(Err(ControlError::Snapshot(SnapshotError::LiveAborted(
                "the VM stopped".into(),
            ))));
    }
}
