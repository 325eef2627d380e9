//! `vmm bench restore`: snapshot restore to running vCPUs for 64 MiB, 1 GiB
//! and 4 GiB guests, lazily and eagerly (interleaved).

use super::{start_touch, BenchError, Figure, TempDir};
use crate::config::{KernelSource, MemBacking, MemoryConfig, VmConfig};
use crate::vm::VmOptions;
use devices::serial::SerialOutput;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Restore times of one memory size, in milliseconds (`median_us` holds ms).
#[derive(Debug, Clone, Serialize)]
pub struct RestoreFigure {
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// What the restored RAM lives in (`--mem-backing`).
    pub backing: String,
    /// Bytes of guest memory in the snapshot (pages that exist).
    pub snapshot_bytes: u64,
    /// `Vm::restore` plus vCPU start, lazily.
    pub lazy_ms: Figure,
    /// The same, copying memory in.
    pub eager_ms: Figure,
}

/// Results of `vmm bench restore`.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreBench {
    /// Restores per case.
    pub repeats: u32,
    /// By memory size.
    pub sizes: Vec<RestoreFigure>,
    /// Lazy restore of the largest size against the smallest (medians).
    pub lazy_ratio_largest_to_smallest: f64,
    /// The same at the best (minimum) times, less sensitive to host noise.
    pub lazy_ratio_largest_to_smallest_min: f64,
}

/// Snapshots a 2-vCPU `touch` workload of `mem_size` mid-run into `dir`.
fn snapshot_mid_run(mem_size: u64, dir: &std::path::Path) -> Result<u64, BenchError> {
    let cfg = VmConfig {
        kernel: KernelSource::Bundled,
        vcpus: 2,
        mem_size,
        cmdline: "workload=touch pages=4000 pattern=rand".into(),
        memory: MemoryConfig::default(),
    };
    let (vm, console) = start_touch(&cfg, Duration::from_secs(120))?;
    let text = || {
        console
            .lock()
            .map(|c| String::from_utf8_lossy(&c).into_owned())
            .unwrap_or_default()
    };
    let info = vm
        .snapshot(dir, crate::snapshot::AfterSnapshot::Stop)
        .map_err(|e| BenchError::BadRun {
            end: e.to_string(),
            console: text(),
        })?;
    let _ = vm.wait()?;
    Ok(info.memory_bytes)
}

/// Guest sizes of `vmm bench restore`, MiB.
pub const RESTORE_MEM_MIB: [u64; 3] = [64, 1024, 4096];

/// Runs `vmm bench restore`: time from `Vm::restore` to running vCPUs for a
/// 64 MiB, 1 GiB and 4 GiB guest, lazily and eagerly.
pub fn restore(repeats: u32, progress: &mut dyn FnMut(&str)) -> Result<RestoreBench, BenchError> {
    restore_with(repeats, &RESTORE_MEM_MIB, &[MemBacking::Anon], progress)
}

/// [`restore`] for guests of `mems` MiB, restored onto each of `backings`
/// (the snapshot is taken on anonymous memory, 4 KiB pages; on huge pages
/// the restore reads it in whole huge pages). Lazy, eager and the
/// backings are interleaved.
pub fn restore_with(
    repeats: u32,
    mems: &[u64],
    backings: &[MemBacking],
    progress: &mut dyn FnMut(&str),
) -> Result<RestoreBench, BenchError> {
    let n = repeats.max(1);
    let mut sizes = Vec::new();
    for &mem_mib in mems {
        progress(&format!("snapshot of a {mem_mib} MiB guest"));
        let dir =
            TempDir(std::env::temp_dir().join(format!("vmm-bench-snap-{}-{mem_mib}", std::process::id())));
        let snapshot_bytes = snapshot_mid_run(mem_mib << 20, &dir.0)?;
        let time = |lazy: bool, backing: MemBacking| -> Result<f64, BenchError> {
            let how = crate::vm::RestoreOptions {
                lazy,
                ..Default::default()
            };
            let options = VmOptions {
                serial: SerialOutput::Capture(Arc::new(Mutex::new(Vec::new()))),
                backing,
                ..VmOptions::default()
            };
            let t = std::time::Instant::now();
            let vm = crate::Vm::restore(&dir.0, &how, options)?.start()?;
            let took = t.elapsed().as_secs_f64() * 1e3;
            vm.stop();
            let _ = vm.wait()?;
            Ok(took)
        };
        progress(&format!("restores of the {mem_mib} MiB guest"));
        let mut times: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); backings.len()];
        // Interleaved, so all see the same host conditions.
        for _ in 0..n {
            for (i, &b) in backings.iter().enumerate() {
                let lazy = time(true, b)?;
                let eager = time(false, b)?;
                if let Some(t) = times.get_mut(i) {
                    t.0.push(lazy);
                    t.1.push(eager);
                }
            }
        }
        for (&b, (lazy, eager)) in backings.iter().zip(times) {
            sizes.push(RestoreFigure {
                mem_mib,
                backing: b.to_string(),
                snapshot_bytes,
                lazy_ms: Figure::of(lazy),
                eager_ms: Figure::of(eager),
            });
        }
    }
    let (ratio, ratio_min) = match (sizes.first(), sizes.last()) {
        (Some(a), Some(b)) => (
            b.lazy_ms.median_us / a.lazy_ms.median_us,
            b.lazy_ms.min_us / a.lazy_ms.min_us,
        ),
        _ => (f64::NAN, f64::NAN),
    };
    Ok(RestoreBench {
        repeats: n,
        sizes,
        lazy_ratio_largest_to_smallest: ratio,
        lazy_ratio_largest_to_smallest_min: ratio_min,
    })
}

impl std::fmt::Display for RestoreBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "restore benchmark: restore to running vCPUs, median of {} (min-max)",
            self.repeats
        )?;
        for s in &self.sizes {
            writeln!(
                f,
                "  {:>5} MiB guest on {:<10} ({:>6.1} MiB in the snapshot): lazy {:>6.2} ms ({:.2}-{:.2}), eager {:>6.2} ms ({:.2}-{:.2})",
                s.mem_mib,
                s.backing,
                s.snapshot_bytes as f64 / f64::from(1u32 << 20),
                s.lazy_ms.median_us,
                s.lazy_ms.min_us,
                s.lazy_ms.max_us,
                s.eager_ms.median_us,
                s.eager_ms.min_us,
                s.eager_ms.max_us
            )?;
        }
        writeln!(
            f,
            "  lazy restore, largest / smallest guest: {:.2}x at the medians, {:.2}x at the best times",
            self.lazy_ratio_largest_to_smallest, self.lazy_ratio_largest_to_smallest_min
        )
    }
}
