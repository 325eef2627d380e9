//! `vmm stress`: a reproducible fault stress run. VMs run the bundled guest's
//! `touch` workload one after another over lazily backed memory, with seeded
//! parameters, while a storm thread injects seeded events: kick bursts,
//! pause/resume cycles and holds of every page (the source answers "retry,
//! held" until the hold ends); the page source itself answers "retry" and
//! delays at seeded pages. Every run's checksums are verified (a lost, stale or
//! zero page shows), and a watchdog reports a run that makes no progress, with
//! its state, instead of hanging.
//!
//! The same seed gives the same runs and the same schedule of injected events
//! (their timing relative to the guest's progress still varies).

use crate::config::{MemBackend, MemoryConfig, VmConfig};
use crate::migration::{Endpoint, Listener, ReceiveOptions, ReceiveOutcome};
use crate::vm::{verify_reports, CustomSource, GuestEnd, VmOptions};
use crate::{KernelSource, RunningVm, VmHandle};
use abi::workload::mix64;
use devices::serial::SerialOutput;
use memory::{FetchOutcome, Notifier, PageSource, RetryReason, ZeroSource};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Errors that stop a stress run from starting or continuing.
#[derive(Debug, thiserror::Error)]
pub enum StressError {
    /// A VM could not be built.
    #[error("cannot build a stress VM: {0}")]
    Vm(#[from] crate::VmError),
    /// A migration destination could not listen.
    #[error("cannot listen for a migration storm: {0}")]
    Migration(String),
    /// The page source could not be created.
    #[error("cannot create the stress page source: {0}; raise the file descriptor limit")]
    Source(std::io::Error),
}

/// Options of `vmm stress`.
#[derive(Debug, Clone, Copy)]
pub struct StressOptions {
    /// How long to keep starting runs.
    pub seconds: f64,
    /// Seed of everything random.
    pub seed: u64,
    /// vCPUs per VM.
    pub vcpus: u32,
    /// Guest memory per VM in bytes.
    pub mem_size: u64,
    /// A run making no progress this long is a stall.
    pub stall_after: Duration,
}

impl Default for StressOptions {
    fn default() -> Self {
        StressOptions {
            seconds: 10.0,
            seed: 1,
            vcpus: 2,
            mem_size: 512 << 20,
            stall_after: Duration::from_secs(30),
        }
    }
}

/// An injected event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum StormEvent {
    /// Kick every vCPU this many times.
    Kicks(u32),
    /// Pause, stay paused this many milliseconds, resume.
    PauseResume(u32),
    /// Hold every page for this many milliseconds.
    Hold(u32),
    /// Snapshot the running VM (it goes on); after the run the snapshot is
    /// restored lazily and must finish with the same checksums.
    Snapshot,
    /// Migrate the running VM (loopback Unix socket; pre-copy rounds with
    /// dirty logging first, 0 to 3, then post-copy) to a destination VM in
    /// this process, which must finish with the checksums.
    Migrate {
        /// Pre-copy rounds (0: post-copy only).
        precopy_rounds: u32,
        /// Cut both connections once this many KiB went to the destination
        /// (0: never); if the destination runs the VM by then, the
        /// migration is resumed (`recover`, then `migrate --resume`).
        cut_after_kib: u32,
    },
}

/// One VM run of a stress session.
#[derive(Debug, Clone, Serialize)]
pub struct RunPlan {
    /// The guest command line.
    pub cmdline: String,
    /// Fault-around window.
    pub fault_around: u32,
    /// Injected events, at milliseconds after the start.
    pub schedule: Vec<(u32, StormEvent)>,
}

/// Totals of a stress session.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StressReport {
    /// The seed.
    pub seed: u64,
    /// VM runs completed.
    pub runs: u64,
    /// Stage-2 faults (userfaults) served by the retry core.
    pub stage2_faults: u64,
    /// Guest (stage-1) page faults handled by the guest kernel.
    pub guest_faults: u64,
    /// Retries of guest faults (slow page store, in-guest userfaultfd).
    pub guest_retries: u64,
    /// Guest fault waits interrupted by signals.
    pub guest_signal_interruptions: u64,
    /// In-guest userfaults.
    pub guest_userfaults: u64,
    /// Runs of the guest's own test suite.
    pub suite_runs: u64,
    /// Retries of stage-2 faults.
    pub retries: u64,
    /// Most retries of one stage-2 fault.
    pub max_retries_per_fault: u64,
    /// Times a kick or request took a vCPU out of `KVM_RUN`.
    pub interruptions: u64,
    /// Injected events by kind.
    pub kicks: u64,
    /// Pause/resume cycles.
    pub pauses: u64,
    /// Holds of all pages.
    pub holds: u64,
    /// Snapshots taken mid-run and restored lazily to completion.
    pub snapshot_restores: u64,
    /// Post-copy migrations mid-run, the destination run to completion.
    pub migrations: u64,
    /// Of those, migrations whose connections were cut and that were resumed.
    pub migration_recoveries: u64,
    /// Source answers "retry" injected.
    pub injected_retries: u64,
    /// Wrong checksums, bad exits: anything lost, stale or zero.
    pub integrity_errors: Vec<String>,
    /// Runs that made no progress, with their state.
    pub stalls: Vec<String>,
    /// The plan of the first runs (for reproduction).
    pub plans: Vec<RunPlan>,
}

impl StressReport {
    /// No integrity error and no stall.
    pub fn ok(&self) -> bool {
        self.integrity_errors.is_empty() && self.stalls.is_empty()
    }

    /// Faults across both stages.
    pub fn total_faults(&self) -> u64 {
        self.stage2_faults + self.guest_faults
    }
}

/// A deterministic random stream (SplitMix64).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The plan of run `index` of a session with `seed`.
pub fn plan(seed: u64, index: u64, vcpus: u32) -> RunPlan {
    let mut rng = Rng(mix64(seed ^ index.wrapping_mul(0x5851_f42d_4c95_7f2d)));
    // One run in four is the guest's own test suite: stage-1 faults retried on a
    // slow page store, in-guest userfaultfd handlers, signals (handled, fatal,
    // stop/continue) during fault waits, all over lazily backed memory.
    let suite = rng.below(4) == 0;
    let store_delay_us = 500 + rng.below(20_000);
    let pages = 500 + rng.below(5500);
    let pattern = if rng.below(2) == 0 { "seq" } else { "rand" };
    let write = rng.below(4) != 0;
    let shared = vcpus > 1 && rng.below(3) == 0;
    let populate = rng.below(2) == 0;
    let fault_around = [0, 0, 16][usize::try_from(rng.below(3)).unwrap_or(0)];
    let cmdline = if suite {
        format!("test=all store_delay_us={store_delay_us}")
    } else {
        format!(
            "workload=touch pages={pages} pattern={pattern} write={} shared={} populate={} seed={}",
            u8::from(write),
            u8::from(shared),
            u8::from(populate),
            rng.below(1 << 20)
        )
    };
    let mut schedule: Vec<(u32, StormEvent)> = (0..4 + rng.below(12))
        .map(|_| {
            let at = u32::try_from(rng.below(1500)).unwrap_or(0);
            let ev = match rng.below(3) {
                0 => StormEvent::Kicks(1 + u32::try_from(rng.below(500)).unwrap_or(0)),
                1 => StormEvent::PauseResume(u32::try_from(rng.below(20)).unwrap_or(0)),
                _ => StormEvent::Hold(u32::try_from(rng.below(50)).unwrap_or(0)),
            };
            (at, ev)
        })
        .collect();
    // The page store's in-flight reads are not part of a snapshot (see
    // docs/snapshot.md), so only touch runs are snapshotted.
    if !suite && rng.below(3) == 0 {
        schedule.push((u32::try_from(rng.below(1000)).unwrap_or(0), StormEvent::Snapshot));
    }
    if !suite && rng.below(4) == 0 {
        let precopy_rounds = u32::try_from(rng.below(4)).unwrap_or(0);
        let cut_after_kib = if rng.below(3) == 0 {
            u32::try_from(64 + rng.below(4096)).unwrap_or(0)
        } else {
            0
        };
        schedule.push((
            u32::try_from(rng.below(1500)).unwrap_or(0),
            StormEvent::Migrate {
                precopy_rounds,
                cut_after_kib,
            },
        ));
    }
    schedule.sort_by_key(|&(at, _)| at);
    RunPlan {
        cmdline,
        fault_around,
        schedule,
    }
}

/// A zero source that answers "retry" (then serves) and delays at seeded pages,
/// and can hold every page.
#[derive(Debug)]
pub struct ChaosSource {
    inner: ZeroSource,
    seed: u64,
    attempts: Mutex<HashMap<u64, u32>>,
    held: AtomicBool,
    fetches: AtomicU64,
    injected_retries: AtomicU64,
}

impl ChaosSource {
    /// A source seeded with `seed`.
    pub fn new(seed: u64) -> std::io::Result<ChaosSource> {
        Ok(ChaosSource {
            inner: ZeroSource::new()?,
            seed,
            attempts: Mutex::new(HashMap::new()),
            held: AtomicBool::new(false),
            fetches: AtomicU64::new(0),
            injected_retries: AtomicU64::new(0),
        })
    }

    /// Holds every page until [`ChaosSource::release`].
    pub fn hold(&self) {
        self.held.store(true, Ordering::SeqCst);
    }

    /// Ends a hold; parked faults are retried.
    pub fn release(&self) {
        self.held.store(false, Ordering::SeqCst);
        self.inner.notifier().notify();
    }

    /// Fetch calls so far (progress for the watchdog).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }
}

impl PageSource for ChaosSource {
    fn name(&self) -> &str {
        "chaos"
    }

    fn fetch(&self, offset: u64, buf: &mut [u8]) -> FetchOutcome {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        if self.held.load(Ordering::SeqCst) {
            return FetchOutcome::Retry(RetryReason::Held);
        }
        let attempt = {
            let mut a = self
                .attempts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = a.entry(offset).or_insert(0);
            *n += 1;
            *n
        };
        let h = mix64(self.seed ^ offset);
        // About 1 page in 16 answers "not ready" 1 to 3 times before it serves.
        if h.is_multiple_of(16) && u64::from(attempt) <= 1 + (h >> 8) % 3 {
            self.injected_retries.fetch_add(1, Ordering::Relaxed);
            // Available soon: the waiter comes back at once.
            self.inner.notifier().notify();
            return FetchOutcome::Retry(RetryReason::NotReady);
        }
        // About 1 page in 64 is slow (up to 300 us).
        if (h >> 16).is_multiple_of(64) {
            std::thread::sleep(Duration::from_micros((h >> 24) % 300));
        }
        self.inner.fetch(offset, buf)
    }

    fn bulk_cheap(&self) -> bool {
        true
    }

    fn notifier(&self) -> &Notifier {
        self.inner.notifier()
    }
}

/// Runs a stress session; `progress` receives a line per run.
pub fn run(opts: StressOptions, progress: &mut dyn FnMut(&str)) -> Result<StressReport, StressError> {
    let start = Instant::now();
    let mut report = StressReport {
        seed: opts.seed,
        ..StressReport::default()
    };
    let mut index = 0;
    while start.elapsed().as_secs_f64() < opts.seconds {
        let plan = plan(opts.seed, index, opts.vcpus);
        run_one(&opts, index, &plan, &mut report)?;
        progress(&format!(
            "run {index}: {} ({} events) -> {} faults so far, {} errors",
            plan.cmdline,
            plan.schedule.len(),
            report.total_faults(),
            report.integrity_errors.len() + report.stalls.len()
        ));
        if report.plans.len() < 16 {
            report.plans.push(plan);
        }
        index += 1;
        if !report.stalls.is_empty() {
            break;
        }
    }
    Ok(report)
}

fn run_one(
    opts: &StressOptions,
    index: u64,
    plan: &RunPlan,
    report: &mut StressReport,
) -> Result<(), StressError> {
    let cfg = VmConfig {
        kernel: KernelSource::Bundled,
        vcpus: opts.vcpus,
        mem_size: opts.mem_size,
        cmdline: plan.cmdline.clone(),
        memory: MemoryConfig {
            backend: MemBackend::Zero,
            fault_around: Some(plan.fault_around),
        },
    };
    let source = Arc::new(ChaosSource::new(opts.seed ^ index).map_err(StressError::Source)?);
    let console = Arc::new(Mutex::new(Vec::new()));
    let options = VmOptions {
        serial: SerialOutput::Capture(console.clone()),
        page_source: Some(CustomSource(source.clone())),
        ..VmOptions::default()
    };
    let vm = Arc::new(crate::Vm::new(&cfg, options)?.start()?);

    let snapshot_dir = std::env::temp_dir().join(format!("vmm-stress-{}-{index}", std::process::id()));
    let snapshot = Arc::new(Mutex::new(None));
    let sock = |what: &str| {
        Endpoint::Unix(
            std::env::temp_dir().join(format!("vmm-stress-{}-{index}-{what}.sock", std::process::id())),
        )
    };
    let migrate_to = sock("dst");
    let (destination, handle) = if plan
        .schedule
        .iter()
        .any(|&(_, e)| matches!(e, StormEvent::Migrate { .. }))
    {
        let (d, h) = Destination::listen(&migrate_to)?;
        (Some(d), Some(h))
    } else {
        (None, None)
    };
    let rig = Arc::new(MigrationRig {
        to: migrate_to.clone(),
        front: sock("front"),
        again: sock("again"),
        handle: Mutex::new(handle),
        result: Mutex::new(None),
        recovered: AtomicBool::new(false),
    });
    let storm = {
        let (vm, source, schedule) = (vm.clone(), source.clone(), plan.schedule.clone());
        let (dir, slot) = (snapshot_dir.clone(), snapshot.clone());
        let rig = rig.clone();
        std::thread::spawn(move || storm(&vm, &source, &schedule, &dir, &slot, &rig))
    };
    // Watchdog: progress is source fetches plus vCPU exits.
    let mut last = (u64::MAX, Instant::now());
    let mut stall = None;
    while !vm.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
        let Ok(stats) = vm.stats() else { break };
        let now = source.fetches() + stats.vcpus.iter().map(|v| v.exits).sum::<u64>();
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= opts.stall_after && !stats.paused {
            stall = Some(format!(
                "run {index} ({}): no progress for {:?}; vCPUs {:?}; {} faults blocked in the handler",
                plan.cmdline, opts.stall_after, stats.vcpus, stats.blocked_faults
            ));
            vm.stop();
            break;
        }
    }
    let (kicks, pauses, holds) = storm.join().unwrap_or_default();
    let vm = Arc::try_unwrap(vm).map_err(|_| crate::VmError::Device("storm thread kept the VM".into()))?;
    let outcome = vm.wait()?;
    report.runs += 1;
    report.kicks += kicks;
    report.pauses += pauses;
    report.holds += holds;
    report.injected_retries += source.injected_retries.load(Ordering::Relaxed);
    report.interruptions += outcome.vcpu_stats.iter().map(|v| v.interruptions).sum::<u64>();
    match &outcome.guest_stats {
        Some(g) => {
            report.guest_faults += g.faults;
            report.guest_retries += g.retries;
            report.guest_signal_interruptions += g.signal_interruptions;
            report.guest_userfaults += g.userfaults;
            report.max_retries_per_fault = report.max_retries_per_fault.max(g.max_retries);
        }
        None => report.guest_faults += outcome.reports.iter().map(|r| r.faults).sum::<u64>(),
    }
    if plan.cmdline.starts_with("test=") {
        report.suite_runs += 1;
    }
    if let Some(m) = &outcome.memory {
        report.stage2_faults += m.total.faults;
        report.retries += m.total.retries_total;
        report.max_retries_per_fault = report.max_retries_per_fault.max(m.total.retries_max);
    }
    let migration = rig.result.lock().map(|mut slot| slot.take()).unwrap_or(None);
    for e in [&rig.front, &rig.again] {
        if let Endpoint::Unix(p) = e {
            let _ = std::fs::remove_file(p);
        }
    }
    // The destination's run, when the VM moved there (the listener is released
    // otherwise).
    let dest_console = destination
        .as_ref()
        .map(|d| d.console.clone())
        .unwrap_or_default();
    let moved = destination.map(|d| d.finish(&migrate_to, matches!(migration, Some(Ok(())))));
    if let Some(s) = stall {
        report.stalls.push(s);
        return Ok(());
    }
    let text = || {
        console
            .lock()
            .map(|c| String::from_utf8_lossy(&c).into_owned())
            .unwrap_or_default()
    };
    if let Some(Err(e)) = &migration {
        report
            .integrity_errors
            .push(format!("run {index} ({}): migration failed: {e}", plan.cmdline));
    }
    if let Some(Some(dest)) = moved {
        report.migrations += 1;
        if rig.recovered.load(Ordering::Relaxed) {
            report.migration_recoveries += 1;
        }
        match dest {
            Ok(out) if out.run.end == GuestEnd::Exited(0) => {
                if let Err(e) = verify_reports(&out.config, &out.run) {
                    report
                        .integrity_errors
                        .push(format!("run {index} ({}), after migration: {e}", plan.cmdline));
                }
            }
            Ok(out) => report.integrity_errors.push(format!(
                "run {index} ({}), after migration: {} (lost: {:?}); destination {:?}; memory {:?}; console:\n{}",
                plan.cmdline,
                out.run.end,
                out.lost,
                out.stats,
                out.run.memory.as_ref().map(|m| &m.total),
                console_of(&dest_console)
            )),
            Err(e) => report
                .integrity_errors
                .push(format!("run {index} ({}), destination: {e}", plan.cmdline)),
        }
    } else if outcome.end != GuestEnd::Exited(0) {
        report.integrity_errors.push(format!(
            "run {index} ({}): {}\n{}",
            plan.cmdline,
            outcome.end,
            text()
        ));
    } else if let Err(e) = verify_reports(&cfg, &outcome) {
        report
            .integrity_errors
            .push(format!("run {index} ({}): {e}", plan.cmdline));
    }
    let taken = snapshot.lock().map(|mut slot| slot.take()).unwrap_or(None);
    match taken {
        Some(Ok(())) => {
            if let Err(e) = restore_to_completion(&cfg, &snapshot_dir) {
                report.integrity_errors.push(format!(
                    "run {index} ({}), restored from its snapshot: {e}",
                    plan.cmdline
                ));
            }
            report.snapshot_restores += 1;
        }
        Some(Err(e)) => report
            .integrity_errors
            .push(format!("run {index} ({}): snapshot failed: {e}", plan.cmdline)),
        None => {}
    }
    let _ = std::fs::remove_dir_all(&snapshot_dir);
    Ok(())
}

/// Restores a snapshot lazily and runs it to the end; the guest must finish
/// with the checksums of `cfg`.
fn restore_to_completion(cfg: &VmConfig, dir: &std::path::Path) -> Result<(), String> {
    let console = Arc::new(Mutex::new(Vec::new()));
    let options = VmOptions {
        serial: SerialOutput::Capture(console.clone()),
        timeout: Some(Duration::from_secs(120)),
        ..VmOptions::default()
    };
    let how = crate::vm::RestoreOptions {
        lazy: true,
        ..Default::default()
    };
    let outcome = crate::Vm::restore(dir, &how, options)
        .and_then(crate::Vm::run)
        .map_err(|e| e.to_string())?;
    if outcome.end != GuestEnd::Exited(0) {
        let text = console
            .lock()
            .map(|c| String::from_utf8_lossy(&c).into_owned())
            .unwrap_or_default();
        return Err(format!("{}\n{text}", outcome.end));
    }
    verify_reports(cfg, &outcome).map(|_| ())
}

/// Executes a schedule until the VM ends; returns (kicks, pauses, holds) done.
fn storm(
    vm: &RunningVm,
    source: &ChaosSource,
    schedule: &[(u32, StormEvent)],
    snapshot_dir: &std::path::Path,
    snapshot: &Mutex<Option<Result<(), String>>>,
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
            std::thread::sleep(Duration::from_millis(1).min(due - start.elapsed()));
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
            StormEvent::Snapshot => {
                let r = vm.snapshot(snapshot_dir, crate::snapshot::AfterSnapshot::Restore);
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
                    *slot = Some(r.map(|_| ()).map_err(|e| e.to_string()));
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

impl std::fmt::Display for StressReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "stress: seed {}, {} runs", self.seed, self.runs)?;
        writeln!(
            f,
            "  faults: {} stage-2 (userfaults) + {} guest = {}",
            self.stage2_faults,
            self.guest_faults,
            self.total_faults()
        )?;
        writeln!(
            f,
            "  retries: {} stage-2 ({} injected by the source), {} guest; max {} for one fault",
            self.retries, self.injected_retries, self.guest_retries, self.max_retries_per_fault
        )?;
        writeln!(
            f,
            "  guest: {} suite runs, {} fault waits interrupted by signals, {} in-guest userfaults",
            self.suite_runs, self.guest_signal_interruptions, self.guest_userfaults
        )?;
        writeln!(
            f,
            "  storms: {} kicks, {} pause/resume cycles, {} holds, {} snapshots restored, {} migrations ({} resumed after a cut); {} vCPU interruptions",
            self.kicks,
            self.pauses,
            self.holds,
            self.snapshot_restores,
            self.migrations,
            self.migration_recoveries,
            self.interruptions
        )?;
        writeln!(
            f,
            "  integrity errors: {}, stalls: {}",
            self.integrity_errors.len(),
            self.stalls.len()
        )?;
        for e in self.integrity_errors.iter().chain(&self.stalls) {
            writeln!(f, "  ERROR {e}")?;
        }
        Ok(())
    }
}

/// The destination of a migration storm: a VM received in this process.
struct Destination {
    thread: std::thread::JoinHandle<Result<ReceiveOutcome, crate::migration::MigrationError>>,
    console: Arc<Mutex<Vec<u8>>>,
}

fn console_of(c: &Mutex<Vec<u8>>) -> String {
    c.lock()
        .map(|c| String::from_utf8_lossy(&c).into_owned())
        .unwrap_or_default()
}

/// What a migration storm needs: where the destination listens, where a
/// cutting proxy and a recovery listen, the destination VM's handle once it
/// runs, and the outcome.
struct MigrationRig {
    to: Endpoint,
    front: Endpoint,
    again: Endpoint,
    handle: Mutex<Option<std::sync::mpsc::Receiver<VmHandle>>>,
    result: Mutex<Option<Result<(), String>>>,
    recovered: AtomicBool,
}

/// After a cut: asks the destination to wait for the source at `again`
/// (retrying until it has seen the loss) and resumes the migration there.
/// A destination that got every page before the cut (only the source's
/// `Complete` was lost) runs on: the source's VM is stopped then.
fn resume_migration(
    dest: &VmHandle,
    src: &RunningVm,
    again: &Endpoint,
) -> Result<(), crate::migration::MigrationError> {
    use crate::migration::MigrationError;
    let start = Instant::now();
    let at = loop {
        match dest.recover(again) {
            Ok(at) => break at,
            Err(MigrationError::NotInterrupted) if start.elapsed() >= Duration::from_secs(1) => {
                src.stop();
                return Ok(());
            }
            // The destination may not have seen the loss yet.
            Err(_) if start.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    };
    let options = crate::migration::MigrateOptions {
        resume: true,
        ..Default::default()
    };
    src.migrate(&at, &options).map(|_| ())
}

/// Forwards the connections made to `front` (a migration's main
/// connection, then its answer channel) to `back`, and cuts all of them
/// once `limit` bytes went to `back` on the first: a network failure in the
/// middle of a migration, for tests and storms.
pub fn cutting_proxy(front: &Path, back: &Path, limit: usize) -> std::io::Result<()> {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    let _ = std::fs::remove_file(front);
    let l = UnixListener::bind(front)?;
    let back = back.to_owned();
    std::thread::spawn(move || {
        let open: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let cut = |open: &Mutex<Vec<UnixStream>>| {
            for s in open
                .lock()
                .map(|v| v.iter().filter_map(|s| s.try_clone().ok()).collect())
                .unwrap_or_else(|_| Vec::new())
            {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        };
        let mut threads = Vec::new();
        for first in [true, false] {
            let Ok((a, _)) = l.accept() else { break };
            let Ok(b) = UnixStream::connect(&back) else { break };
            let clones = (a.try_clone(), b.try_clone(), a.try_clone(), b.try_clone());
            let (Ok(a2), Ok(b2), Ok(a3), Ok(b3)) = clones else {
                break;
            };
            if let Ok(mut v) = open.lock() {
                v.extend([a3, b3]);
            }
            let (mut from_back, mut to_front) = (b2, a2);
            threads.push(std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_back, &mut to_front);
            }));
            let (mut a, mut b, open) = (a, b, open.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                let mut sent = 0;
                while !first || sent < limit {
                    match a.read(&mut buf) {
                        Ok(n) if n > 0 && b.write_all(&buf[..n]).is_ok() => sent += n,
                        _ => break,
                    }
                }
                if first {
                    cut(&open);
                }
            }));
        }
        for t in threads {
            let _ = t.join();
        }
    });
    Ok(())
}

impl Destination {
    /// Listens on `at` and receives at most one VM on a thread; the VM's
    /// handle comes on the channel once it runs.
    fn listen(at: &Endpoint) -> Result<(Destination, std::sync::mpsc::Receiver<VmHandle>), StressError> {
        let listener = Listener::bind(at).map_err(|e| StressError::Migration(e.to_string()))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let console = Arc::new(Mutex::new(Vec::new()));
        let serial = SerialOutput::Capture(console.clone());
        let thread = std::thread::spawn(move || {
            let opts = ReceiveOptions {
                vm: VmOptions {
                    serial,
                    timeout: Some(Duration::from_secs(120)),
                    ..VmOptions::default()
                },
                // Time for the storm to resume a cut migration.
                lost_wait: Duration::from_secs(10),
                progress: Default::default(),
            };
            crate::migration::receive(&listener, opts, |h| {
                let _ = tx.send(h.clone());
            })
        });
        Ok((Destination { thread, console }, rx))
    }

    /// The destination's outcome if the VM moved; otherwise releases the
    /// waiting listener (a connection that sends nothing) and returns `None`.
    fn finish(self, at: &Endpoint, moved: bool) -> Option<Result<ReceiveOutcome, String>> {
        if !moved {
            if let Endpoint::Unix(path) = at {
                drop(std::os::unix::net::UnixStream::connect(path));
            }
        }
        let r = self
            .thread
            .join()
            .map_err(|_| "the destination thread panicked".to_string());
        if let Endpoint::Unix(path) = at {
            let _ = std::fs::remove_file(path);
        }
        moved.then(|| r.and_then(|o| o.map_err(|e| e.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_reproducible_and_vary() {
        assert_eq!(format!("{:?}", plan(7, 3, 2)), format!("{:?}", plan(7, 3, 2)));
        assert_ne!(format!("{:?}", plan(7, 3, 2)), format!("{:?}", plan(8, 3, 2)));
        assert_ne!(format!("{:?}", plan(7, 3, 2)), format!("{:?}", plan(7, 4, 2)));
        let p = plan(1, 0, 1);
        assert!(!p.cmdline.contains("shared=1"), "one vCPU never shares");
        assert!(p.schedule.windows(2).all(|w| w[0].0 <= w[1].0));
        abi::workload::parse_cmdline(&p.cmdline).unwrap();
    }
}
