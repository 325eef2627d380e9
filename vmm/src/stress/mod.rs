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

//!
//! - [`plan`]: the seeded plan of each run (workload, storm schedule);
//! - [`chaos`]: the page source that answers "retry", delays and holds;
//! - [`storm`]: the thread that injects the schedule into a running VM;
//! - [`rig`]: the in-process migration destination and the cutting proxy.

pub mod chaos;
pub mod plan;
pub mod rig;
pub mod storm;

pub use chaos::ChaosSource;
pub use plan::{plan, RunPlan, StormEvent};
pub use rig::cutting_proxy;

use crate::config::{KernelSource, MemBackend, MemoryConfig, VmConfig};
use crate::controller::{verify_reports, GuestEnd};
use crate::migration::Endpoint;
use crate::vm::{CustomSource, VmOptions};
use devices::serial::SerialOutput;
use rig::{console_of, Destination, MigrationRig};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
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
    Migration(#[from] crate::migration::MigrationError),
    /// The page source could not be created.
    #[error("cannot create the stress page source: {0}; raise the file descriptor limit")]
    Source(#[source] std::io::Error),
    /// The VM's controller panicked.
    #[error(transparent)]
    Panicked(#[from] crate::controller::ControllerPanicked),
    /// The storm thread still held the VM after it ended (a bug).
    #[error("the storm thread kept the VM after its end")]
    StormKeptVm,
}

/// Options of `vmm stress`.
#[derive(Debug, Clone, Copy)]
pub struct StressOptions {
    /// How long to keep starting runs.
    pub seconds: f64,
    /// Runs to make at least, however long they take (a test's fixed
    /// amount of work on a slow or loaded host).
    pub min_runs: u32,
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
            min_runs: 0,
            seed: 1,
            vcpus: 2,
            mem_size: 512 << 20,
            stall_after: Duration::from_secs(30),
        }
    }
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
    /// Of those, runs of the guest's suite (page-store reads in flight).
    pub suite_snapshot_restores: u64,
    /// Of those, live snapshots (taken while the guest ran on).
    pub live_snapshot_restores: u64,
    /// Snapshots whose first restore recorded the working set and that were
    /// restored again with it prefetched (before or while the vCPUs run),
    /// to completion with the same checksums.
    pub working_set_restores: u64,
    /// Post-copy migrations mid-run, the destination run to completion.
    pub migrations: u64,
    /// Of those, runs of the guest's suite.
    pub suite_migrations: u64,
    /// Of those, migrations whose connections were cut and that were resumed.
    pub migration_recoveries: u64,
    /// Source answers "retry" injected.
    pub injected_retries: u64,
    /// Wrong checksums, bad exits: anything lost, stale or zero.
    pub integrity_errors: Vec<String>,
    /// Runs that made no progress, with their state.
    pub stalls: Vec<String>,
    /// The session was cut short by this shutdown signal.
    pub interrupted_by: Option<i32>,
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

/// Runs a stress session; `progress` receives a line per run.
pub fn run(opts: StressOptions, progress: &mut dyn FnMut(&str)) -> Result<StressReport, StressError> {
    let start = Instant::now();
    let mut report = StressReport {
        seed: opts.seed,
        ..StressReport::default()
    };
    let mut index = 0;
    // A shutdown signal ends the running VMs (their controllers listen) and
    // the session after the current run, with its report.
    let _on_signal = crate::signals::on_shutdown(|_| {});
    while start.elapsed().as_secs_f64() < opts.seconds || index < u64::from(opts.min_runs) {
        if let Some(sig) = crate::signals::received() {
            report.interrupted_by = Some(sig);
            break;
        }
        let plan = plan(opts.seed, index, opts.vcpus);
        run_one(&opts, index, &plan, &mut report)?;
        progress(&format!(
            "run {index}: {} on {} {} ({} events, {} handler threads, pinning {}) -> {} faults so far, {} errors",
            plan.cmdline,
            plan.backing.0,
            plan.backing.1,
            plan.schedule.len(),
            plan.handler_threads,
            plan.handler_pinning,
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
            handlers: crate::config::HandlerConfig {
                threads: Some(plan.handler_threads),
                pinning: plan.handler_pinning.parse().unwrap_or_default(),
                ..crate::config::HandlerConfig::default()
            },
            backing: plan.backing.0.parse().unwrap_or_default(),
            fault_mode: plan.backing.1.parse().unwrap_or_default(),
        },
    };
    let source = Arc::new(ChaosSource::new(opts.seed ^ index).map_err(StressError::Source)?);
    let console = Arc::new(Mutex::new(Vec::new()));
    let options = VmOptions {
        serial: SerialOutput::Capture(console.clone()),
        page_source: Some(CustomSource(source.clone())),
        shutdown_signals: true,
        ..VmOptions::default()
    };
    let vm = Arc::new(crate::Vm::new(&cfg, options)?.start()?);

    // Unique in the process: two sessions at once (tests do that) must not
    // share run 0's snapshot directory or sockets.
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let run_id = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let snapshot_dir = std::env::temp_dir().join(format!("vmm-stress-{}-{run_id}", std::process::id()));
    let snapshot = Arc::new(Mutex::new(None));
    let sock = |what: &str| {
        Endpoint::Unix(
            std::env::temp_dir().join(format!("vmm-stress-{}-{run_id}-{what}.sock", std::process::id())),
        )
    };
    let migrate_to = sock("dst");
    let (destination, handle) = if plan
        .schedule
        .iter()
        .any(|&(_, e)| matches!(e, StormEvent::Migrate { .. }))
    {
        let (d, h) = Destination::listen(&migrate_to, &cfg.memory)?;
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
        std::thread::spawn(move || storm::storm(&vm, &source, &schedule, &dir, &slot, &rig))
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
    let (kicks, pauses, holds) = match storm.join() {
        Ok(done) => done,
        Err(panic) => {
            // A stress tool must not swallow its own failures.
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            report.integrity_errors.push(format!(
                "run {index} ({}): the storm thread panicked: {why}",
                plan.cmdline
            ));
            (0, 0, 0)
        }
    };
    let vm = Arc::try_unwrap(vm).map_err(|_| StressError::StormKeptVm)?;
    let outcome = vm.wait()?;
    if let GuestEnd::Signal(sig) = outcome.end {
        // Not an error of the run: the session is being shut down.
        report.interrupted_by = Some(sig);
        if let Some(d) = destination {
            let _ = d.finish(&migrate_to, false);
        }
        let _ = std::fs::remove_dir_all(&snapshot_dir);
        return Ok(());
    }
    report.runs += 1;
    report.kicks += kicks;
    report.pauses += pauses;
    report.holds += holds;
    report.injected_retries += source.injected_retries();
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
    let suite = plan.cmdline.starts_with("test=");
    if let Some(Some(dest)) = moved {
        report.migrations += 1;
        report.suite_migrations += u64::from(suite);
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
        Some(Ok(live)) => {
            report.live_snapshot_restores += u64::from(live);
            // Every other snapshot: record its working set, then restore it
            // again with the working set prefetched (before resume or while
            // running, in turn).
            let ws = index.is_multiple_of(2);
            let first = RestoreHow {
                record: ws,
                prefetch: None,
            };
            match restore_to_completion(&cfg, &snapshot_dir, first) {
                Err(e) => report.integrity_errors.push(format!(
                    "run {index} ({}), restored from its snapshot: {e}",
                    plan.cmdline
                )),
                Ok(()) if ws => {
                    let again = RestoreHow {
                        record: false,
                        prefetch: Some(index.is_multiple_of(4)),
                    };
                    if let Err(e) = restore_to_completion(&cfg, &snapshot_dir, again) {
                        report.integrity_errors.push(format!(
                            "run {index} ({}), restored with its working set: {e}",
                            plan.cmdline
                        ));
                    }
                    report.working_set_restores += 1;
                }
                Ok(()) => {}
            }
            report.snapshot_restores += 1;
            report.suite_snapshot_restores += u64::from(suite);
        }
        Some(Err(e)) => report
            .integrity_errors
            .push(format!("run {index} ({}): snapshot failed: {e}", plan.cmdline)),
        None => {}
    }
    let _ = std::fs::remove_dir_all(&snapshot_dir);
    Ok(())
}

/// What a stress restore does with the working set.
#[derive(Debug, Clone, Copy)]
struct RestoreHow {
    /// Record it.
    record: bool,
    /// Prefetch it, before the vCPUs resume (`true`) or while they run.
    prefetch: Option<bool>,
}

/// Restores a snapshot lazily and runs it to the end; the guest must finish
/// with the checksums of `cfg`.
fn restore_to_completion(cfg: &VmConfig, dir: &std::path::Path, ws: RestoreHow) -> Result<(), String> {
    let console = Arc::new(Mutex::new(Vec::new()));
    let options = VmOptions {
        serial: SerialOutput::Capture(console.clone()),
        timeout: Some(Duration::from_secs(120)),
        backing: cfg.memory.backing,
        fault_mode: cfg.memory.fault_mode,
        ..VmOptions::default()
    };
    let how = crate::vm::RestoreOptions {
        lazy: true,
        record_working_set: ws.record,
        prefetch_working_set: ws.prefetch,
        handlers: cfg.memory.handlers.clone(),
        ..Default::default()
    };
    let outcome = crate::Vm::restore(dir, &how, options)
        .and_then(crate::Vm::run)
        .map_err(|e| e.to_string())?;
    if let Some(Err(e)) = &outcome.working_set {
        return Err(format!("the working set was not written: {e}"));
    }
    if outcome.end != GuestEnd::Exited(0) {
        let text = console
            .lock()
            .map(|c| String::from_utf8_lossy(&c).into_owned())
            .unwrap_or_default();
        return Err(format!("{}\n{text}", outcome.end));
    }
    verify_reports(cfg, &outcome)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

impl std::fmt::Display for StressReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "stress: seed {}, {} runs", self.seed, self.runs)?;
        if let Some(sig) = self.interrupted_by {
            writeln!(f, "  interrupted by signal {sig}")?;
        }
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
            "  storms: {} kicks, {} pause/resume cycles, {} holds, {} snapshots restored ({} live, {} of the suite, {} again with their working set), {} migrations ({} of the suite, {} resumed after a cut); {} vCPU interruptions",
            self.kicks,
            self.pauses,
            self.holds,
            self.snapshot_restores,
            self.live_snapshot_restores,
            self.suite_snapshot_restores,
            self.working_set_restores,
            self.migrations,
            self.suite_migrations,
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
