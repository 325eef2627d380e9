//! `vmm bench all`: every benchmark, plus stage-2 fault throughput by vCPU
//! count (demand_paging_test style) and the retry core's latency histogram.

use super::fault::guest_touch_run;
use super::{
    boot, fault, guest_fault, migrate, restore, BenchError, BootBench, BootBenchOptions, FaultBench,
    FaultBenchOptions, GuestFaultBench, MigrateBench, RestoreBench,
};
use crate::config::{MemBackend, MemoryConfig};
use sandbox::SeccompMode;
use serde::Serialize;

/// Stage-2 fault throughput by vCPU count (demand_paging_test style).
#[derive(Debug, Clone, Serialize)]
pub struct Scaling {
    /// vCPUs.
    pub vcpus: u32,
    /// Pages per second over all vCPUs.
    pub pages_per_sec: f64,
    /// Pages per second of each vCPU.
    pub per_vcpu: Vec<f64>,
}

/// Touches `pages` populated pages through the retry core with 1, 2 and 4 vCPUs.
pub fn scaling(pages: u64, progress: &mut dyn FnMut(&str)) -> Result<Vec<Scaling>, BenchError> {
    let mut out = Vec::new();
    for vcpus in [1u32, 2, 4] {
        progress(&format!("stage-2 fault throughput with {vcpus} vCPUs"));
        let memory = MemoryConfig {
            backend: MemBackend::Zero,
            fault_around: Some(0),
        };
        let (o, khz) = guest_touch_run(vcpus, pages, true, memory, SeccompMode::Kill)?;
        let secs = |cycles: u64| cycles as f64 / f64::from(khz) / 1e3;
        let per_vcpu: Vec<f64> = o
            .reports
            .iter()
            .map(|r| r.pages as f64 / secs(r.cycles))
            .collect();
        let slowest = o.reports.iter().map(|r| secs(r.cycles)).fold(0.0, f64::max);
        out.push(Scaling {
            vcpus,
            pages_per_sec: pages as f64 / slowest,
            per_vcpu,
        });
    }
    Ok(out)
}

/// Everything `vmm bench all` measured.
#[derive(Debug, Clone, Serialize)]
pub struct AllBench {
    /// `vmm bench boot`.
    pub boot: BootBench,
    /// `vmm bench fault`.
    pub fault: FaultBench,
    /// `vmm bench guest-fault`.
    pub guest_fault: GuestFaultBench,
    /// `vmm bench restore`.
    pub restore: RestoreBench,
    /// `vmm bench migrate` (one migration).
    pub migrate: MigrateBench,
    /// Throughput by vCPU count.
    pub scaling: Vec<Scaling>,
    /// Stage-2 fault latency histogram of one run (power-of-two microsecond buckets).
    pub latency_us_log2: Vec<u64>,
}

/// Runs `vmm bench all`.
pub fn all(fault_opts: FaultBenchOptions, progress: &mut dyn FnMut(&str)) -> Result<AllBench, BenchError> {
    let boot = boot(
        BootBenchOptions {
            repeats: fault_opts.repeats.max(5),
        },
        progress,
    )?;
    let fault = fault(fault_opts, progress)?;
    let guest_fault = guest_fault(fault_opts.repeats, progress)?;
    let restore = restore(fault_opts.repeats.max(5), progress)?;
    let migrate = migrate(1, progress)?;
    let scaling = scaling(fault_opts.pages, progress)?;
    progress("stage-2 fault latency histogram");
    let memory = MemoryConfig {
        backend: MemBackend::Zero,
        fault_around: Some(0),
    };
    let (o, _) = guest_touch_run(1, fault_opts.pages, true, memory, SeccompMode::Kill)?;
    let latency_us_log2 = o
        .memory
        .map(|m| m.total.latency_us_log2.to_vec())
        .unwrap_or_default();
    Ok(AllBench {
        boot,
        fault,
        guest_fault,
        restore,
        migrate,
        scaling,
        latency_us_log2,
    })
}

impl std::fmt::Display for AllBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}{}{}{}{}",
            self.boot, self.fault, self.guest_fault, self.restore, self.migrate
        )?;
        writeln!(
            f,
            "stage-2 fault throughput by vCPU count (demand_paging_test style):"
        )?;
        for s in &self.scaling {
            let per: Vec<String> = s.per_vcpu.iter().map(|p| format!("{p:.0}")).collect();
            writeln!(
                f,
                "  {} vCPUs: {:.0} pages/s overall; per vCPU: {}",
                s.vcpus,
                s.pages_per_sec,
                per.join(", ")
            )?;
        }
        Ok(())
    }
}
