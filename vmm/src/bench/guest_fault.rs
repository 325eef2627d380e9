//! `vmm bench guest-fault`: the guest kernel's demand-zero fault against its
//! empty system-call round trip, both timed by the guest in the same run.

use super::{BenchError, Figure};
use crate::config::{KernelSource, MemoryConfig, VmConfig};
use crate::controller::GuestEnd;
use crate::vm::VmOptions;
use devices::serial::SerialOutput;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Parses the guest's `guest-bench: empty syscall S cycles, demand-zero fault F
/// cycles ...` line into `(S, F)`.
pub fn parse_guest_bench(line: &str) -> Option<(u64, u64)> {
    let num_after = |key: &str| -> Option<u64> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.split_whitespace().next()?.parse().ok()
    };
    Some((num_after("empty syscall ")?, num_after("demand-zero fault ")?))
}

/// Results of `vmm bench guest-fault`, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct GuestFaultBench {
    /// Runs.
    pub repeats: u32,
    /// Baseline: an empty system call round trip (user -> guest kernel -> user).
    pub syscall: Figure,
    /// A guest demand-zero page fault (the guest kernel maps a frame).
    pub demand_zero_fault: Figure,
    /// `demand_zero_fault / syscall` at the medians.
    pub ratio: f64,
}

/// Runs `vmm bench guest-fault`: the guest's own fault path against its
/// system-call round trip, both measured in the same guest run (medians of
/// interleaved pairs), repeated.
pub fn guest_fault(repeats: u32, progress: &mut dyn FnMut(&str)) -> Result<GuestFaultBench, BenchError> {
    let n = repeats.max(1);
    let (mut sys, mut fault) = (Vec::new(), Vec::new());
    for i in 0..n {
        progress(&format!("guest fault benchmark run {}", i + 1));
        let cfg = VmConfig {
            kernel: KernelSource::Bundled,
            vcpus: 1,
            mem_size: 128 << 20,
            cmdline: "test=bench-fault".into(),
            memory: MemoryConfig::default(),
        };
        let console = Arc::new(Mutex::new(Vec::new()));
        let options = VmOptions {
            serial: SerialOutput::Capture(console.clone()),
            timeout: Some(Duration::from_secs(300)),
            ..VmOptions::default()
        };
        let outcome = crate::run_vm(&cfg, options)?;
        let text = console
            .lock()
            .map(|c| String::from_utf8_lossy(&c).into_owned())
            .unwrap_or_default();
        let parsed = text
            .lines()
            .find(|l| l.starts_with("guest-bench:"))
            .and_then(parse_guest_bench);
        let (Some((s, f)), GuestEnd::Exited(0)) = (parsed, &outcome.end) else {
            return Err(BenchError::BadRun {
                end: outcome.end.to_string(),
                console: text,
            });
        };
        let khz = f64::from(outcome.tsc_khz.filter(|&k| k > 0).ok_or(BenchError::NoTsc)?);
        sys.push(s as f64 / khz * 1e3);
        fault.push(f as f64 / khz * 1e3);
    }
    let (syscall, demand_zero_fault) = (Figure::of(sys), Figure::of(fault));
    Ok(GuestFaultBench {
        repeats: n,
        ratio: demand_zero_fault.median_us / syscall.median_us,
        syscall,
        demand_zero_fault,
    })
}

impl std::fmt::Display for GuestFaultBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "guest fault benchmark: 1 vCPU, median of {} runs (min-max)",
            self.repeats
        )?;
        for (name, x) in [
            ("empty system call round trip (baseline)", &self.syscall),
            ("guest demand-zero fault", &self.demand_zero_fault),
        ] {
            writeln!(
                f,
                "  {name:<52} {:>8.1} us ({:.1}-{:.1})",
                x.median_us, x.min_us, x.max_us
            )?;
        }
        writeln!(f, "  ratio fault / system call: {:.2}x", self.ratio)
    }
}
