//! `vmm bench`: benchmarks, each next to its baseline measured in the same
//! run, one file per benchmark: [`fault`], [`boot`], [`guest_fault`],
//! [`restore`], [`migrate`], [`clones`], and [`all`] (everything, plus throughput by vCPU
//! count); [`minimal`] is the minimal-VM baseline of the fault benchmark and
//! [`plot`] draws the charts.

pub mod all;
pub mod boot;
pub mod clones;
pub mod fault;
pub mod guest_fault;
pub mod migrate;
pub use vmm_core::arch::x86_64::minimal_vm as minimal;
pub mod plot;
pub mod restore;
pub mod scaling;
pub mod snapshot;
pub mod working_set;

pub use all::{all, scaling, AllBench, Scaling};
pub use boot::{boot, BootBench, BootBenchOptions};
pub use clones::{clones, CloneFigure, ClonesBench};
pub use fault::{fault, FaultBench, FaultBenchOptions};
pub use guest_fault::{guest_fault, parse_guest_bench, GuestFaultBench};
pub use migrate::{migrate, migrate_push_orders, migrate_with, MigrateBench, MigrateRun};
pub use restore::{restore, restore_with, RestoreBench, RestoreFigure, RESTORE_MEM_MIB};
pub use snapshot::{snapshot, snapshot_with, SnapshotBench, SnapshotFigure};
pub use working_set::{working_set, working_set_with, WorkingSetBench};

use crate::config::VmConfig;
use crate::vm::VmOptions;
use devices::serial::SerialOutput;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A VM could not run.
    #[error("benchmark VM failed: {0}")]
    Vm(#[from] crate::VmError),
    /// A VM ran but did not finish its workload correctly.
    #[error("benchmark VM ended badly ({end}); its console said:\n{console}")]
    BadRun {
        /// How it ended.
        end: String,
        /// What the guest printed.
        console: String,
    },
    /// The raw userfaultfd baseline failed.
    #[error("raw userfaultfd baseline failed: {0}")]
    Raw(#[from] ::memory::bench::BenchError),
    /// The memory file for the restore case.
    #[error(
        "cannot create the benchmark's memory file {path}: {source}; check free space in the temp directory"
    )]
    File {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The minimal-VM baseline failed.
    #[error("{0}")]
    MinimalVm(#[from] minimal::MinimalVmError),
    /// KVM itself (the boot baseline).
    #[error("benchmark baseline: {0}")]
    Kvm(#[from] vmm_core::kvm::KvmError),
    /// A control request failed.
    #[error("benchmark VM refused a request: {0}")]
    Control(#[from] crate::controller::ControlError),
    /// The VM's controller panicked.
    #[error(transparent)]
    Panicked(#[from] crate::controller::ControllerPanicked),
    /// No TSC frequency to convert guest cycles.
    #[error("KVM does not report the guest TSC frequency; cannot time the guest loop")]
    NoTsc,
}

/// Median and spread of repeated measurements, in microseconds per fault.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Figure {
    /// Median.
    pub median_us: f64,
    /// Smallest.
    pub min_us: f64,
    /// Largest.
    pub max_us: f64,
}

impl Figure {
    pub(crate) fn of(mut samples: Vec<f64>) -> Figure {
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let median = if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            samples[n / 2]
        } else {
            (samples[n / 2 - 1] + samples[n / 2]) / 2.0
        };
        Figure {
            median_us: median,
            min_us: samples.first().copied().unwrap_or(f64::NAN),
            max_us: samples.last().copied().unwrap_or(f64::NAN),
        }
    }

    /// Faults per second at the median.
    pub fn per_second(&self) -> f64 {
        1e6 / self.median_us
    }
}

/// Runs `f` `n` times: the median and spread of its results.
pub(crate) fn repeat(n: u32, mut f: impl FnMut() -> Result<f64, BenchError>) -> Result<Figure, BenchError> {
    let samples = (0..n.max(1)).map(|_| f()).collect::<Result<Vec<_>, _>>()?;
    Ok(Figure::of(samples))
}

/// A scratch folder removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A captured guest console.
pub(crate) type Console = Arc<Mutex<Vec<u8>>>;

/// Starts `cfg` (a `touch` workload) with the console captured and waits until
/// the guest's user loop has begun (`touch: cpu 0 start`).
pub(crate) fn start_touch(
    cfg: &VmConfig,
    timeout: Duration,
) -> Result<(crate::RunningVm, Console), BenchError> {
    start_until(cfg, timeout, "touch: cpu 0 start")
}

/// Starts `cfg` and waits until its console shows `marker`.
pub(crate) fn start_until(
    cfg: &VmConfig,
    timeout: Duration,
    marker: &str,
) -> Result<(crate::RunningVm, Console), BenchError> {
    let console = Arc::new(Mutex::new(Vec::new()));
    let options = VmOptions {
        serial: SerialOutput::Capture(console.clone()),
        timeout: Some(timeout),
        ..VmOptions::default()
    };
    let vm = crate::Vm::new(cfg, options)?.start()?;
    let text = || {
        console
            .lock()
            .map(|c| String::from_utf8_lossy(&c).into_owned())
            .unwrap_or_default()
    };
    let start = std::time::Instant::now();
    while !text().contains(marker) {
        if vm.is_finished() || start.elapsed() > Duration::from_secs(60) {
            vm.stop();
            let end = vm
                .wait()
                .map(|o| o.end.to_string())
                .unwrap_or_else(|e| e.to_string());
            return Err(BenchError::BadRun {
                end: format!("the guest did not start its workload ({end})"),
                console: text(),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok((vm, console))
}
