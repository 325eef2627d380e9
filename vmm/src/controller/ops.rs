//! The controller's long operations: capturing the VM's state (for a
//! snapshot or a migration), writing a snapshot, and the source side of a
//! migration (start, switchover, end).

use super::{vm_err, ControlError, ControlRequest, Controller, Event, GuestEnd, RunState};
use crate::migration::outgoing::spawn_resume;
use crate::migration::{
    spawn_precopy, Endpoint, MigrateOptions, MigrationError, Paused, PrecopyCtx, SourceStatus, SourceSummary,
    Stopped,
};
use crate::snapshot::{self, AfterSnapshot, SnapshotInfo};
use crate::state::SavedVm;
use persist::Persist;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::Instant;
use vmm_core::memory::pages::Pagemap;

impl RunState {
    /// Why a VM in this state cannot be snapshotted or start a migration
    /// (`None`: it can, running or paused).
    pub(super) fn busy(self) -> Option<ControlError> {
        match self {
            RunState::Running | RunState::Paused => None,
            RunState::Ended => Some(ControlError::Ended),
            RunState::Postcopy => Some(ControlError::Migrating),
            RunState::Precopy | RunState::PrecopyPaused => Some(ControlError::MigrationRunning),
            RunState::SourceLost => Some(ControlError::SourceLost),
            RunState::MemoryFault => Some(ControlError::MemoryFault),
            RunState::HandlerLost => Some(ControlError::HandlerLost),
        }
    }
}

impl Controller {
    /// Pauses the VM (if running), saves a snapshot, then goes on as `after` says.
    pub(super) fn snapshot(
        &mut self,
        dir: &Path,
        after: AfterSnapshot,
    ) -> Result<SnapshotInfo, ControlError> {
        if self.live.is_some() {
            return Err(ControlError::LiveRunning);
        }
        if let Some(e) = self.run.busy() {
            return Err(e);
        }
        if self.vm.memory().is_external() {
            return Err(ControlError::ExternalMemory);
        }
        let start = Instant::now();
        let was_running = self.run == RunState::Running;
        if was_running {
            self.pause()?;
        }
        let result = self.save_to(dir, start);
        let resume = match after {
            AfterSnapshot::Resume => true,
            AfterSnapshot::Restore => was_running,
            AfterSnapshot::Pause => false,
            // A failed snapshot leaves the VM as it was.
            AfterSnapshot::Stop => result.is_err() && was_running,
        };
        if after == AfterSnapshot::Stop && result.is_ok() {
            self.end(GuestEnd::Stopped);
        } else if resume && self.run.paused() {
            self.resume()?;
        }
        result
    }

    /// Saves the paused VM to `dir`.
    fn save_to(&mut self, dir: &Path, start: Instant) -> Result<SnapshotInfo, ControlError> {
        let state = self.capture()?;
        let manifest =
            snapshot::write_snapshot(dir, &state, self.vm.memory().ram(), self.snapshot_key.as_ref())?;
        Ok(SnapshotInfo {
            dir: dir.to_owned(),
            id: manifest.id,
            memory_bytes: manifest.memory.extents.iter().map(|e| e.len).sum(),
            extents: manifest.memory.extents.len(),
            took_ms: start.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// The state of the paused VM (for a snapshot or a migration). Lazily
    /// served memory is fetched in full first, and the devices are paused
    /// (until the VM resumes), so that state and memory agree.
    pub(super) fn capture(&mut self) -> Result<SavedVm, ControlError> {
        // What the vCPUs posted before they paused (a workload report,
        // START_CPUS) is part of the state: handle it first. Control requests
        // wait until the capture is over.
        while let Ok(ev) = self.events_rx.try_recv() {
            match ev {
                Event::Control(req) => self.deferred.push(req),
                Event::Vm(ev) => self.on_vm_event(ev),
            }
        }
        if !self.deferred.is_empty() {
            let _ = self.events_fd.write(1);
        }
        if let Some(m) = self.vm.memory().materializer() {
            m.run(&self.source_lost, &AtomicU64::new(0))?;
            // Stopped early: a page its lost migration source holds is missing.
            if self.source_lost.load(Ordering::Acquire) {
                return Err(ControlError::SourceLost);
            }
        }
        self.pause_devices()?;
        let vm = self.vm.save_state().map_err(vm_err)?;
        let controller = match self.guest.save() {
            Ok(s) => s,
            Err(never) => match never {},
        };
        Ok(SavedVm { vm, controller })
    }

    /// Starts an outgoing migration on a thread: it connects and
    /// authenticates (the VM runs meanwhile), runs the pre-copy rounds if
    /// any, then asks for the switchover (pause and capture) and goes on
    /// with post-copy; or resumes an interrupted post-copy. The result goes
    /// to `reply` when the migration ends.
    pub(super) fn migrate(
        &mut self,
        to: &Endpoint,
        options: &MigrateOptions,
        reply: &Sender<Result<SourceSummary, ControlError>>,
    ) -> Result<(), ControlError> {
        if options.resume && options.precopy_rounds > 0 {
            return Err(ControlError::ResumeWithPrecopy);
        }
        if self.live.is_some() {
            return Err(ControlError::LiveRunning);
        }
        if let Some(e) = self.run.busy() {
            return Err(e);
        }
        if self.vm.memory().is_external() {
            return Err(ControlError::ExternalMemory);
        }
        // Before anything starts: plain TCP needs the opt-in.
        options.security.check(to)?;
        let events = self.events.clone();
        let status = Arc::new(SourceStatus::default());
        let on_end = {
            let status = status.clone();
            move |r: Result<SourceSummary, Box<Stopped>>| {
                match &r {
                    Ok(s) => status.ended(Ok(s), false),
                    Err(stopped) => status.ended(Err(stopped.error.to_string()), stopped.resumable.is_some()),
                }
                events.send(Event::Control(ControlRequest::MigrationEnded(r)));
            }
        };
        if options.resume {
            let Some(from) = self.resumable.clone().filter(|_| self.run == RunState::Paused) else {
                return Err(ControlError::NothingToResume);
            };
            spawn_resume(
                to.clone(),
                from,
                self.vm.memory().ram().clone(),
                self.vm.config().mem_size,
                options.clone(),
                status.clone(),
                on_end,
            )?;
            self.migration_status = Some(status);
            self.set(RunState::Postcopy)?;
            self.migration_reply = Some(reply.clone());
            return Ok(());
        }
        let events = self.events.clone();
        let setup = serde_json::to_vec(&vmm_core::state::ConfigState::from(self.vm.config()))
            .map_err(|e| ControlError::Migration(MigrationError::Encode(e)))?;
        let pagemap = Pagemap::open().map_err(|source| MigrationError::Io {
            what: "opening /proc/self/pagemap",
            source,
        })?;
        let wp_rounds =
            options.dirty_tracking == crate::migration::DirtyTracking::UffdWp && options.precopy_rounds > 0;
        // A guest write that bypassed the protection would be missing from
        // every round (and from the post-copy set): the live snapshot's
        // probe decides (run once, cached).
        if wp_rounds {
            crate::snapshot::live::check_kvm().map_err(ControlError::WpDirtyUnsupported)?;
        }
        // The uffd-WP tracker is set up here: the pre-copy thread's sandbox
        // may not register memory with a userfaultfd or open the page map.
        let wp_tracker =
            (wp_rounds && self.vm.memory().is_anonymous()).then(|| self.vm.memory().wp_dirty_tracker());
        let ctx = PrecopyCtx {
            setup,
            status: status.clone(),
            pagemap,
            wp_tracker,
            vm_fd: self.vm.vm_fd().clone(),
            mem: self.vm.memory().ram().clone(),
            mem_size: self.vm.config().mem_size,
            materializer: self.vm.memory().materializer(),
            stop: self.source_lost.clone(),
            switchover: Box::new(move || {
                let (tx, rx) = mpsc::channel();
                if !events.send(Event::Control(ControlRequest::Switchover(tx))) {
                    return Err(MigrationError::Switchover(Box::new(ControlError::Ended)));
                }
                rx.recv()
                    .map_err(|_| MigrationError::Switchover(Box::new(ControlError::Ended)))?
                    .map_err(|e| MigrationError::Switchover(Box::new(e)))
            }),
        };
        let to_state = if self.run == RunState::Running {
            RunState::Precopy
        } else {
            RunState::PrecopyPaused
        };
        spawn_precopy(to.clone(), options.clone(), ctx, on_end)?;
        self.migration_status = Some(status);
        self.set(to_state)?;
        self.resumable = None;
        self.migration_reply = Some(reply.clone());
        Ok(())
    }

    /// Pauses the VM at the end of pre-copy and captures its state; from
    /// here on it must stay paused (the destination may run it).
    pub(super) fn switchover(&mut self) -> Result<Paused, ControlError> {
        if !matches!(self.run, RunState::Precopy | RunState::PrecopyPaused) {
            return Err(self.run.busy().unwrap_or(ControlError::InvalidTransition {
                from: self.run,
                to: RunState::Postcopy,
            }));
        }
        let paused_at = Instant::now();
        let paused_unix_us = crate::migration::unix_us();
        let was_running = self.run == RunState::Precopy;
        if was_running {
            self.pause()?;
        }
        let pause_ms = paused_at.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        match self.capture() {
            Ok(state) => {
                self.set(RunState::Postcopy)?;
                Ok(Paused {
                    state,
                    paused_at,
                    paused_unix_us,
                    pause_ms,
                    capture_ms: t.elapsed().as_secs_f64() * 1e3,
                })
            }
            Err(e) => {
                if was_running {
                    let _ = self.resume();
                }
                Err(e)
            }
        }
    }

    /// The outgoing migration ended: the run ends (migrated), or the VM
    /// stays here as it was (paused after the switchover, running or paused
    /// during pre-copy), resumable if the destination may have run it.
    pub(super) fn migration_ended(&mut self, r: Result<SourceSummary, Box<Stopped>>) {
        let reply = self.migration_reply.take();
        match r {
            Ok(s) => {
                self.resumable = None;
                self.end(GuestEnd::Migrated(format!(
                    "{} post-copy pages ({} pushed, {} requested) after {} pre-copy pages, downtime {:.1} ms, total {:.1} ms",
                    s.data_pages, s.pages_pushed, s.pages_requested, s.precopy_pages, s.downtime_ms, s.total_ms
                )));
                if let Some(reply) = reply {
                    let _ = reply.send(Ok(s));
                }
            }
            Err(stopped) => {
                let Stopped { error, resumable } = *stopped;
                let back = match self.run {
                    RunState::Precopy => RunState::Running,
                    RunState::PrecopyPaused | RunState::Postcopy => RunState::Paused,
                    other => other,
                };
                if self.set(back).is_ok() {
                    if back == RunState::Paused {
                        tracing::error!("migration failed, the VM stays paused here: {error}");
                        if resumable.is_some() {
                            self.resumable = resumable;
                        }
                    } else {
                        tracing::error!("migration failed during pre-copy, the VM runs on here: {error}");
                    }
                }
                if let Some(reply) = reply {
                    let _ = reply.send(Err(ControlError::Migration(error)));
                }
            }
        }
    }
}

impl super::Controller {
    /// `vmm ctl SOCK migration`: the migration's report (source or
    /// destination), with this VM's blocktime per vCPU and its stage-2 fault
    /// latency split between vCPU threads and the others.
    pub(super) fn migration_json(&self) -> Result<serde_json::Value, super::ControlError> {
        let mut v = if let Some(s) = &self.migration_status {
            serde_json::to_value(s.report()).unwrap_or_default()
        } else if let Some(f) = &self.migration_report {
            f()
        } else {
            return Err(super::ControlError::NoMigration);
        };
        let vcpus = self.vm.vcpu_stats();
        let per_thread = self.vm.memory().per_thread();
        let (all_faults, all_ns) = per_thread
            .values()
            .fold((0u64, 0u64), |(f, n), t| (f + t.faults, n + t.blocked_ns));
        let vcpu_faults: u64 = vcpus.iter().map(|c| c.stage2_faults).sum();
        let vcpu_us: u64 = vcpus.iter().map(|c| c.stage2_blocked_us).sum();
        let mean = |us: f64, n: u64| if n == 0 { 0.0 } else { us / n as f64 };
        let other_faults = all_faults.saturating_sub(vcpu_faults);
        let other_us = (all_ns / 1000).saturating_sub(vcpu_us);
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "blocktime".into(),
                serde_json::json!({
                    "per_vcpu_us": vcpus.iter().map(|c| c.stage2_blocked_us).collect::<Vec<_>>(),
                    "total_us": vcpu_us,
                }),
            );
            o.insert(
                "fault_latency".into(),
                serde_json::json!({
                    "vcpu": {"faults": vcpu_faults, "mean_us": mean(vcpu_us as f64, vcpu_faults)},
                    "non_vcpu": {"faults": other_faults, "mean_us": mean(other_us as f64, other_faults)},
                }),
            );
        }
        Ok(v)
    }
}
