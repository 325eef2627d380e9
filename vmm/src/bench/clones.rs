//! `vmm bench clones`: the memory of N = 1, 2, 4, 8 clones of one 1 GiB
//! snapshot (`vmm restore --lazy --clone`) whose guest reads 256 MiB and
//! writes 16 MiB of it, next to the ideal measured in the same run. The
//! guest is the `faas` workload: it builds 256 MiB of state, the snapshot is
//! taken at its checkpoint, and every clone's invocation reads all of it in
//! order and overwrites the first 16 MiB (`writes=`), whatever the clocks
//! did across the snapshot.
//!
//! The clones run in this process at once, so this process's PSS counts a
//! shared page once however many clones map it. Measured, per N: the peak of
//! this process's anonymous PSS over the run (the clones' private copies
//! and the VMMs' own memory) plus the shared file's resident size, against
//! the ideal: the shared file once, plus each clone's private pages (from
//! its page map at its end), plus N times the overhead of one clone (its
//! anonymous PSS beyond its private guest pages, measured at N = 1). Also
//! `/proc/meminfo`'s Shmem and MemAvailable deltas (system-wide: other
//! load on the machine shows there).

use super::{BenchError, TempDir};
use crate::vm::{RestoreOptions, Vm, VmOptions};
use crate::{GuestEnd, VmConfig};
use devices::serial::SerialOutput;
use serde::Serialize;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Pages of state the guest builds before the snapshot (256 MiB), all of
/// which every clone reads.
const PAGES: u64 = 65536;
/// Pages every clone overwrites (16 MiB): the first it reads.
const WRITES: u64 = 4096;

/// One N.
#[derive(Debug, Clone, Serialize)]
pub struct CloneFigure {
    /// Clones at once.
    pub clones: u32,
    /// Measured: peak anonymous PSS of the process over the run (MiB) plus
    /// the shared file's resident size.
    pub actual_mib: f64,
    /// The ideal (MiB): the shared file once, every clone's private pages,
    /// N times one clone's overhead.
    pub ideal_mib: f64,
    /// `actual / ideal`.
    pub ratio: f64,
    /// `actual` against one clone's.
    pub vs_one_clone: f64,
    /// Per clone: shared, private pages at its end.
    pub per_clone: Vec<(u64, u64)>,
    /// Peak `/proc/meminfo` Shmem delta (MiB).
    pub shmem_delta_mib: f64,
    /// Peak drop of MemAvailable (MiB).
    pub mem_available_drop_mib: f64,
    /// Wall time of the N clones (ms).
    pub wall_ms: f64,
}

/// The result.
#[derive(Debug, Clone, Serialize)]
pub struct ClonesBench {
    /// Guest RAM of the snapshot (bytes).
    pub mem_size: u64,
    /// The shared file's resident size (MiB).
    pub shared_file_mib: f64,
    /// One clone's overhead (MiB): anonymous PSS beyond its guest pages.
    pub overhead_mib: f64,
    /// By N.
    pub figures: Vec<CloneFigure>,
}

fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn pss_anon() -> u64 {
    std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss_Anon:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

const MIB: f64 = 1048576.0;

fn quiet() -> (VmOptions, Arc<Mutex<Vec<u8>>>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let o = VmOptions {
        serial: SerialOutput::Capture(buf.clone()),
        timeout: Some(Duration::from_secs(600)),
        ..VmOptions::default()
    };
    (o, buf)
}

fn text(b: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&b.lock().unwrap_or_else(std::sync::PoisonError::into_inner)).into_owned()
}

/// Runs `vmm bench clones`.
pub fn clones(progress: &mut dyn FnMut(&str)) -> Result<ClonesBench, BenchError> {
    let tmp = std::env::temp_dir().join(format!("vmm-bench-clones-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|source| BenchError::File {
        path: tmp.display().to_string(),
        source,
    })?;
    let tmp = TempDir(tmp);
    let snap = tmp.0.join("snap");
    let clone_dir = std::path::PathBuf::from(format!("/dev/shm/vmm-bench-clones-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&clone_dir);
    let mem_size = 1u64 << 30;
    let cfg = VmConfig {
        kernel: crate::KernelSource::Bundled,
        vcpus: 1,
        mem_size,
        cmdline: format!("workload=faas pages={PAGES} pattern=seq invoke={PAGES} writes={WRITES}"),
        memory: Default::default(),
    };
    progress("the 1 GiB snapshot: the guest writes 256 MiB, then is snapshotted at its checkpoint");
    let (mut options, console) = quiet();
    options.snapshot_at_checkpoint = Some(snap.clone());
    let out = Vm::new(&cfg, options)?.run()?;
    if !matches!(out.checkpoint, Some(Ok(_))) {
        return Err(BenchError::BadRun {
            end: format!(
                "no snapshot at the checkpoint ({}): {:?}",
                out.end, out.checkpoint
            ),
            console: text(&console),
        });
    }
    let how = RestoreOptions {
        lazy: true,
        clone_dir: Some(clone_dir.clone()),
        ..Default::default()
    };
    let mut figures: Vec<CloneFigure> = Vec::new();
    let mut overhead = 0f64;
    let mut shared_file = 0f64;
    for n in [1u32, 2, 4, 8] {
        progress(&format!("{n} clone(s) at once"));
        let (shmem0, avail0, pss0) = (meminfo("Shmem:"), meminfo("MemAvailable:"), pss_anon());
        let stop = Arc::new(AtomicBool::new(false));
        let peaks = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
        let sampler = {
            let (stop, peaks) = (stop.clone(), peaks.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peaks[0].fetch_max(meminfo("Shmem:").saturating_sub(shmem0), Ordering::Relaxed);
                    peaks[1].fetch_max(avail0.saturating_sub(meminfo("MemAvailable:")), Ordering::Relaxed);
                    peaks[2].fetch_max(pss_anon().saturating_sub(pss0), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        let t0 = Instant::now();
        let mut running = Vec::new();
        for _ in 0..n {
            let (options, console) = quiet();
            let vm = Vm::restore(&snap, &how, options)?;
            let rcfg = vm.config().clone();
            running.push((vm.start()?, rcfg, console));
        }
        // The shared file is resident while a clone holds it.
        let file_bytes = std::fs::read_dir(&clone_dir)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .and_then(|e| e.metadata().ok())
            .map_or(0, |m| m.blocks() * 512);
        let mut per_clone = Vec::new();
        let mut private_bytes = 0u64;
        for (vm, rcfg, console) in running {
            let out = vm.wait()?;
            if out.end != GuestEnd::Exited(0) || crate::controller::verify_reports(&rcfg, &out).is_err() {
                return Err(BenchError::BadRun {
                    end: format!("{:?}", out.end),
                    console: text(&console),
                });
            }
            let s = out.memory.and_then(|m| m.sharing).unwrap_or_default();
            private_bytes += s.private_pages * 4096;
            per_clone.push((s.shared_pages, s.private_pages));
        }
        let wall_ms = t0.elapsed().as_secs_f64() * 1e3;
        stop.store(true, Ordering::Relaxed);
        let _ = sampler.join();
        let pss = peaks[2].load(Ordering::Relaxed) as f64;
        let file = file_bytes as f64;
        if n == 1 {
            overhead = (pss - private_bytes as f64).max(0.0);
            shared_file = file;
        }
        let actual = pss + file;
        let ideal = file + private_bytes as f64 + f64::from(n) * overhead;
        let one = figures.first().map_or(actual, |f| f.actual_mib * MIB);
        figures.push(CloneFigure {
            clones: n,
            actual_mib: actual / MIB,
            ideal_mib: ideal / MIB,
            ratio: actual / ideal,
            vs_one_clone: actual / one,
            per_clone,
            shmem_delta_mib: peaks[0].load(Ordering::Relaxed) as f64 / MIB,
            mem_available_drop_mib: peaks[1].load(Ordering::Relaxed) as f64 / MIB,
            wall_ms,
        });
    }
    let _ = std::fs::remove_dir_all(&clone_dir);
    Ok(ClonesBench {
        mem_size,
        shared_file_mib: shared_file / MIB,
        overhead_mib: overhead / MIB,
        figures,
    })
}

impl std::fmt::Display for ClonesBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "clones of one {} MiB snapshot (each guest reads 256 MiB, writes 16 MiB); shared file {:.1} MiB, one clone's overhead {:.1} MiB",
            self.mem_size >> 20,
            self.shared_file_mib,
            self.overhead_mib
        )?;
        writeln!(
            f,
            "  {:>2}  {:>10}  {:>10}  {:>6}  {:>8}  {:>10}  {:>12}  {:>8}",
            "N", "actual MiB", "ideal MiB", "ratio", "vs N=1", "Shmem +MiB", "MemAvail -MiB", "wall ms"
        )?;
        for x in &self.figures {
            writeln!(
                f,
                "  {:>2}  {:>10.1}  {:>10.1}  {:>6.3}  {:>8.2}  {:>10.1}  {:>12.1}  {:>8.0}",
                x.clones,
                x.actual_mib,
                x.ideal_mib,
                x.ratio,
                x.vs_one_clone,
                x.shmem_delta_mib,
                x.mem_available_drop_mib,
                x.wall_ms
            )?;
        }
        if let Some(x) = self.figures.last() {
            let (s, p) = x.per_clone.first().copied().unwrap_or_default();
            writeln!(
                f,
                "  per clone at its end: {s} shared pages, {p} private pages (clone 0 of {}); target {} clones <= 1.1x ideal: {}",
                x.clones,
                x.clones,
                if x.ratio <= 1.1 { "met" } else { "NOT met" }
            )?;
        }
        Ok(())
    }
}
