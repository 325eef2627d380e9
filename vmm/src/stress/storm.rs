//! The storm thread: executes a run's schedule against the running VM
//! (kicks, pause/resume, holds, a snapshot, a migration with an optional
//! cut and its resumption) until the VM ends.

use super::chaos::ChaosSource;
use super::plan::StormEvent;
use super::rig::{cutting_proxy, resume_migration, MigrationRig};
use crate::migration::Endpoint;
use crate::RunningVm;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Executes a schedule until the VM ends; returns (kicks, pauses, holds) done.
pub(super) fn storm(
    vm: &RunningVm,
    source: &ChaosSource,
    schedule: &[(u32, StormEvent)],
    snapshot_dir: &std::path::Path,
    snapshot: &Mutex<Option<Result<bool, String>>>,
    rig: &MigrationRig,
) -> (u64, u64, u64) {
    let start = Instant::now();
    let (mut kicks, mut pauses, mut holds) = (0, 0, 0);
    for &(at, ev) in schedule {
        let due = Duration::from_millis(u64::from(at));
        while start.elapsed() < due {
            if vm.is_finished() {
                return (kicks, pauses, holds);
            }
            std::thread::sleep(Duration::from_millis(1).min(due.saturating_sub(start.elapsed())));
        }
        match ev {
            StormEvent::Kicks(n) => {
                for _ in 0..n {
                    if vm.kick(None).is_err() {
                        return (kicks, pauses, holds);
                    }
                    kicks += 1;
                }
            }
            StormEvent::PauseResume(ms) => {
                if vm.pause().is_err() {
                    return (kicks, pauses, holds);
                }
                std::thread::sleep(Duration::from_millis(u64::from(ms)));
                if vm.resume().is_err() {
                    return (kicks, pauses, holds);
                }
                pauses += 1;
            }
            StormEvent::Hold(ms) => {
                source.hold();
                std::thread::sleep(Duration::from_millis(u64::from(ms)));
                source.release();
                holds += 1;
            }
            StormEvent::Snapshot { live } => {
                let r = if live {
                    let options = crate::controller::live::LiveOptions::default();
                    vm.snapshot_live(snapshot_dir, &options).map(|_| ())
                } else {
                    vm.snapshot(snapshot_dir, crate::snapshot::AfterSnapshot::Restore)
                        .map(|_| ())
                };
                let ended = crate::ControlError::Ended.to_string();
                if r.as_ref().is_err_and(|e| e.to_string().contains(&ended)) {
                    // The guest exited just before the request: the run ends
                    // (its vCPUs may take a while to stop on a loaded host)
                    // and there is nothing to snapshot.
                    return (kicks, pauses, holds);
                }
                if r.is_err() {
                    let t = Instant::now();
                    while !vm.is_finished() && t.elapsed() < Duration::from_secs(10) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                if vm.is_finished() {
                    return (kicks, pauses, holds);
                }
                if let Ok(mut slot) = snapshot.lock() {
                    *slot = Some(r.map(|()| live).map_err(|e| e.to_string()));
                }
            }
            StormEvent::Migrate {
                precopy_rounds,
                cut_after_kib,
            } => {
                let options = crate::migration::MigrateOptions {
                    precopy_rounds,
                    ..Default::default()
                };
                let to = match (cut_after_kib, &rig.front, &rig.to) {
                    (1.., Endpoint::Unix(front), Endpoint::Unix(back)) => {
                        let limit = usize::try_from(cut_after_kib).unwrap_or(0) << 10;
                        match cutting_proxy(front, back, limit) {
                            Ok(()) => &rig.front,
                            Err(_) => &rig.to,
                        }
                    }
                    _ => &rig.to,
                };
                let mut r = vm.migrate(to, &options).map(|_| ());
                // A cut before the destination ran the VM is no error: the
                // VM goes on here (a `None` result).
                let mut expected_failure = false;
                if r.is_err() && to == &rig.front {
                    // Cut: if the destination runs the VM, resume the migration.
                    let handle = rig.handle.lock().ok().and_then(|mut h| h.take());
                    match handle.and_then(|h| h.recv_timeout(Duration::from_secs(10)).ok()) {
                        Some(h) => {
                            r = resume_migration(&h, vm, &rig.again);
                            rig.recovered.store(r.is_ok(), Ordering::Relaxed);
                        }
                        None => expected_failure = true,
                    }
                }
                let ok = r.is_ok();
                if !ok {
                    let t = Instant::now();
                    while !vm.is_finished() && t.elapsed() < Duration::from_secs(2) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    if vm.is_finished() {
                        // The guest exited before the migration began.
                        return (kicks, pauses, holds);
                    }
                    // A failed migration leaves the source paused with its
                    // whole VM: it goes on here.
                    let _ = vm.resume();
                }
                if let Ok(mut slot) = rig.result.lock() {
                    *slot = (!expected_failure).then(|| r.map_err(|e| e.to_string()));
                }
                if ok {
                    return (kicks, pauses, holds);
                }
            }
        }
    }
    (kicks, pauses, holds)
}
