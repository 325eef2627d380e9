//! `vmm bench fault`: the cost of a stage-2 fault served by the retry core. A
//! guest user task touches N pages that its kernel mapped up front
//! (`populate=1`), so each first access is only a stage-2 fault taken from
//! guest user mode; the guest times its loop with the TSC. Baselines: the raw
//! userfaultfd round trip of a host thread served by a minimal handler
//! (unpinned, same CPU, cross CPU), the minimal VM, and the same guest loop
//! over plain anonymous memory (no userfault at all). Fault-around is
//! measured on sequential restore from a memory file. The VMs run
//! sandboxed (`--seccomp kill`, `docs/seccomp.md`); the random-touch case
//! also runs without filters, interleaved, for the sandbox's cost.

use super::{minimal, repeat, BenchError, Figure};
use crate::config::{KernelSource, MemBackend, MemoryConfig, VmConfig};
use crate::controller::{verify_reports, GuestEnd};
use crate::vm::VmOptions;
use devices::serial::SerialOutput;
use sandbox::SeccompMode;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Options of `vmm bench fault`.
#[derive(Debug, Clone, Copy)]
pub struct FaultBenchOptions {
    /// Pages each guest run touches.
    pub pages: u64,
    /// Runs of each case (median and spread are reported).
    pub repeats: u32,
}

impl Default for FaultBenchOptions {
    fn default() -> Self {
        FaultBenchOptions {
            pages: 20000,
            repeats: 3,
        }
    }
}

/// Results of `vmm bench fault`.
#[derive(Debug, Clone, Serialize)]
pub struct FaultBench {
    /// Pages per guest run.
    pub pages: u64,
    /// Runs per case.
    pub repeats: u32,
    /// Raw userfaultfd round trip, threads placed by the scheduler.
    pub raw_uffd: Figure,
    /// Raw round trip with toucher and handler on the same CPU.
    pub raw_uffd_same_cpu: Option<Figure>,
    /// Raw round trip with toucher and handler on different CPUs.
    pub raw_uffd_cross_cpu: Option<Figure>,
    /// A minimal VM (no kernel, no VMM: a user-mode loop entered directly,
    /// the raw round trip's handler on the vCPU's CPU) touching its pages
    /// through the same kind of stage-2 userfault.
    pub minimal_vm_rand: Figure,
    /// `zero_rand / minimal_vm_rand`: what this VMM adds to a stage-2 userfault.
    pub ratio_to_minimal_vm: f64,
    /// Guest random touches over anonymous memory (stage-2 fault without userfault).
    pub anon_rand: Figure,
    /// Guest random touches, every page a userfault served by the retry core.
    pub zero_rand: Figure,
    /// The same without seccomp filters (runs interleaved with `zero_rand`).
    pub zero_rand_seccomp_off: Figure,
    /// `zero_rand / zero_rand_seccomp_off`: what the sandbox costs a fault.
    pub seccomp_ratio: f64,
    /// Guest sequential touches, every page a userfault.
    pub zero_seq: Figure,
    /// `zero_rand / raw_uffd`: the VMM's cost per fault against the raw round trip.
    pub ratio_rand: f64,
    /// `zero_seq / raw_uffd`.
    pub ratio_seq: f64,
    /// Sequential restore from a memory file, one page per fault.
    pub file_seq_no_fault_around: Figure,
    /// Sequential restore from a memory file with fault-around, by window.
    pub file_seq_fault_around: Vec<(u32, Figure)>,
    /// `file_seq_no_fault_around / best fault-around figure`.
    pub fault_around_speedup: f64,
    /// Sequential restore from a snapshot's memory, every page read checked
    /// against its hash (a lazy restore's source), one page per fault.
    pub snapshot_seq_no_fault_around: Figure,
    /// The same with fault-around 16.
    pub snapshot_seq_fault_around_16: Figure,
}

fn pattern_name(rand: bool) -> &'static str {
    if rand {
        "rand"
    } else {
        "seq"
    }
}

/// One guest run; microseconds per touched page as timed by the guest.
fn guest_touch(
    pages: u64,
    rand: bool,
    memory: MemoryConfig,
    seccomp: SeccompMode,
) -> Result<f64, BenchError> {
    guest_touch_from(pages, rand, memory, None, seccomp)
}

/// [`guest_touch`] with memory served from `source`.
fn guest_touch_from(
    pages: u64,
    rand: bool,
    memory: MemoryConfig,
    source: Option<Arc<dyn ::memory::PageSource>>,
    seccomp: SeccompMode,
) -> Result<f64, BenchError> {
    let (outcome, khz) = guest_touch_run_from(1, pages, rand, memory, source, seccomp)?;
    let cycles: u64 = outcome.reports.iter().map(|r| r.cycles).sum();
    Ok(cycles as f64 / f64::from(khz) * 1e3 / pages as f64)
}

/// One guest run of `pages` populated pages over `vcpus`, sandboxed in
/// `seccomp` mode; the outcome and the TSC kHz.
pub(super) fn guest_touch_run(
    vcpus: u32,
    pages: u64,
    rand: bool,
    memory: MemoryConfig,
    seccomp: SeccompMode,
) -> Result<(crate::RunOutcome, u32), BenchError> {
    guest_touch_run_from(vcpus, pages, rand, memory, None, seccomp)
}

/// [`guest_touch_run`] with memory served from `source`.
fn guest_touch_run_from(
    vcpus: u32,
    pages: u64,
    rand: bool,
    memory: MemoryConfig,
    source: Option<Arc<dyn ::memory::PageSource>>,
    seccomp: SeccompMode,
) -> Result<(crate::RunOutcome, u32), BenchError> {
    let mem_size = (pages * abi::layout::PAGE_SIZE * 2 + (128 << 20)).next_multiple_of(2 << 20);
    let cfg = VmConfig {
        kernel: KernelSource::Bundled,
        vcpus,
        mem_size,
        cmdline: format!(
            "workload=touch pages={pages} pattern={} populate=1 write=1",
            pattern_name(rand)
        ),
        memory,
    };
    let console = Arc::new(Mutex::new(Vec::new()));
    let options = VmOptions {
        serial: SerialOutput::Capture(console.clone()),
        timeout: Some(Duration::from_secs(600)),
        seccomp,
        page_source: source.map(crate::CustomSource),
        ..VmOptions::default()
    };
    let outcome = crate::run_vm(&cfg, options)?;
    let bad = |end: String| BenchError::BadRun {
        end,
        console: console
            .lock()
            .map(|c| String::from_utf8_lossy(&c).into_owned())
            .unwrap_or_default(),
    };
    if outcome.end != GuestEnd::Exited(0) {
        return Err(bad(outcome.end.to_string()));
    }
    verify_reports(&cfg, &outcome).map_err(|e| bad(e.to_string()))?;
    let khz = outcome.tsc_khz.filter(|&k| k > 0).ok_or(BenchError::NoTsc)?;
    Ok((outcome, khz))
}

fn raw(n: u32, pages: u64, placement: Option<bool>) -> Result<Figure, BenchError> {
    let pages = usize::try_from(pages).unwrap_or(usize::MAX);
    repeat(n, || {
        let d = match placement {
            None => ::memory::bench::raw_uffd_round_trip(pages)?,
            Some(same) => ::memory::bench::raw_uffd_round_trip_pinned(pages, same)?,
        };
        Ok(d.as_secs_f64() * 1e6)
    })
}

/// A sparse file of zeros, removed on drop.
struct TempImage(PathBuf);

impl TempImage {
    fn new(len: u64) -> Result<TempImage, BenchError> {
        let path = std::env::temp_dir().join(format!("vmm-bench-{}.img", std::process::id()));
        let err = |source| BenchError::File {
            path: path.display().to_string(),
            source,
        };
        std::fs::File::create(&path)
            .map_err(err)?
            .set_len(len)
            .map_err(err)?;
        Ok(TempImage(path))
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs `vmm bench fault`; `progress` is told what runs.
pub fn fault(opts: FaultBenchOptions, progress: &mut dyn FnMut(&str)) -> Result<FaultBench, BenchError> {
    let (n, pages) = (opts.repeats, opts.pages);
    let lazy = |backend, fa| MemoryConfig {
        backend,
        fault_around: Some(fa),
    };
    progress("raw userfaultfd round trip");
    let raw_uffd = raw(n, pages, None)?;
    let raw_uffd_same_cpu = raw(n, pages, Some(true)).ok();
    let raw_uffd_cross_cpu = raw(n, pages, Some(false)).ok();
    progress("a minimal VM's stage-2 userfaults");
    let minimal_vm_rand = repeat(n, || Ok(minimal::stage2_touch(pages)?.as_secs_f64() * 1e6))?;
    let on = SeccompMode::Kill;
    progress("guest random touches over anonymous memory");
    let anon_rand = repeat(n, || guest_touch(pages, true, MemoryConfig::default(), on))?;
    progress("guest random touches through the retry core, seccomp kill and off interleaved");
    // ABBA order, so that a drift of the host's load weighs on both alike.
    let (mut sandboxed, mut unsandboxed) = (Vec::new(), Vec::new());
    for i in 0..n.max(1) {
        let mut pair = [on, SeccompMode::Off];
        if i % 2 == 1 {
            pair.reverse();
        }
        for mode in pair {
            let us = guest_touch(pages, true, lazy(MemBackend::Zero, 0), mode)?;
            if mode == on {
                sandboxed.push(us);
            } else {
                unsandboxed.push(us);
            }
        }
    }
    let (zero_rand, zero_rand_seccomp_off) = (Figure::of(sandboxed), Figure::of(unsandboxed));
    progress("guest sequential touches through the retry core");
    let zero_seq = repeat(n, || guest_touch(pages, false, lazy(MemBackend::Zero, 0), on))?;

    let image = TempImage::new((pages * abi::layout::PAGE_SIZE * 2 + (128 << 20)).next_multiple_of(2 << 20))?;
    let file = || MemBackend::File {
        path: image.0.clone(),
        offset: 0,
    };
    progress("sequential restore from a file, one page per fault");
    let file_seq_no_fault_around = repeat(n, || guest_touch(pages, false, lazy(file(), 0), on))?;
    let mut file_seq_fault_around = Vec::new();
    for window in [16, 64] {
        progress(&format!("sequential restore from a file, fault-around {window}"));
        file_seq_fault_around.push((
            window,
            repeat(n, || guest_touch(pages, false, lazy(file(), window), on))?,
        ));
    }
    // The same image as a snapshot's memory, every page checked against its
    // hash on each read (what a lazy restore does).
    let image_len = std::fs::metadata(&image.0).map(|m| m.len()).unwrap_or(0);
    let checked = |window: u32| -> Result<f64, BenchError> {
        let src = hashed_source(&image.0, image_len)?;
        guest_touch_from(pages, false, lazy(file(), window), Some(src), on)
    };
    progress("sequential restore from a snapshot (pages hashed), one page per fault");
    let snapshot_seq_no_fault_around = repeat(n, || checked(0))?;
    progress("sequential restore from a snapshot (pages hashed), fault-around 16");
    let snapshot_seq_fault_around_16 = repeat(n, || checked(16))?;
    let best = file_seq_fault_around
        .iter()
        .map(|(_, f)| f.median_us)
        .fold(f64::INFINITY, f64::min);
    Ok(FaultBench {
        pages,
        repeats: n,
        ratio_rand: zero_rand.median_us / raw_uffd.median_us,
        seccomp_ratio: zero_rand.median_us / zero_rand_seccomp_off.median_us,
        zero_rand_seccomp_off,
        ratio_to_minimal_vm: zero_rand.median_us / minimal_vm_rand.median_us,
        minimal_vm_rand,
        ratio_seq: zero_seq.median_us / raw_uffd.median_us,
        fault_around_speedup: file_seq_no_fault_around.median_us / best,
        raw_uffd,
        raw_uffd_same_cpu,
        raw_uffd_cross_cpu,
        anon_rand,
        zero_rand,
        zero_seq,
        file_seq_no_fault_around,
        file_seq_fault_around,
        snapshot_seq_no_fault_around,
        snapshot_seq_fault_around_16,
    })
}

/// A snapshot page source over `path` whose every page (all zero here) has
/// its hash, so each fetch reads and hashes its pages.
fn hashed_source(path: &std::path::Path, len: u64) -> Result<Arc<dyn ::memory::PageSource>, BenchError> {
    use crate::snapshot::{Extent, Hasher, LayoutKind, MemoryLayout, PageHashes};
    let h = Hasher::new(None);
    let zero = h.hash(&[0u8; crate::snapshot::memory::HASH_BLOCK_LEN]);
    let block = crate::snapshot::EXTENT_MAX;
    let extents: Vec<Extent> = (0..len / block)
        .map(|i| Extent {
            gpa: i * block,
            len: block,
        })
        .collect();
    let blocks = extents.len() * usize::try_from(block / crate::snapshot::memory::HASH_BLOCK).unwrap_or(0);
    let hashes = zero.repeat(blocks);
    let layout = MemoryLayout::new(LayoutKind::Packed, len);
    let pages = Arc::new(PageHashes::new(&extents, hashes, h, layout));
    let src = crate::snapshot::source::SnapshotSource::with_pages(path.to_owned(), pages).map_err(|e| {
        BenchError::File {
            path: path.display().to_string(),
            source: std::io::Error::other(e),
        }
    })?;
    Ok(Arc::new(src))
}

impl std::fmt::Display for FaultBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let row = |f: &mut std::fmt::Formatter<'_>, name: &str, x: &Figure| {
            writeln!(
                f,
                "  {name:<52} {:>8.1} us/fault ({:.1}-{:.1})  {:>9.0} faults/s",
                x.median_us,
                x.min_us,
                x.max_us,
                x.per_second()
            )
        };
        writeln!(
            f,
            "fault benchmark: 1 vCPU, {} pages per run, median of {} runs (min-max)",
            self.pages, self.repeats
        )?;
        row(
            f,
            "raw uffd round trip (host thread, minimal handler)",
            &self.raw_uffd,
        )?;
        if let Some(x) = &self.raw_uffd_same_cpu {
            row(f, "raw uffd round trip, same CPU", x)?;
        }
        if let Some(x) = &self.raw_uffd_cross_cpu {
            row(f, "raw uffd round trip, cross CPU", x)?;
        }
        row(
            f,
            "minimal VM (no VMM), stage-2 userfault, minimal handler",
            &self.minimal_vm_rand,
        )?;
        row(
            f,
            "guest rand touch, anonymous memory (no userfault)",
            &self.anon_rand,
        )?;
        row(
            f,
            "guest rand touch, stage-2 userfault via retry core",
            &self.zero_rand,
        )?;
        row(
            f,
            "guest rand touch, the same without seccomp filters",
            &self.zero_rand_seccomp_off,
        )?;
        writeln!(
            f,
            "  seccomp filters (kill) cost a stage-2 fault {:.3}x (interleaved runs)",
            self.seccomp_ratio
        )?;
        row(
            f,
            "guest seq touch, stage-2 userfault via retry core",
            &self.zero_seq,
        )?;
        writeln!(
            f,
            "  ratio to the raw round trip: rand {:.2}x, seq {:.2}x (the minimal VM's: {:.2}x); to the minimal VM: rand {:.2}x",
            self.ratio_rand,
            self.ratio_seq,
            self.minimal_vm_rand.median_us / self.raw_uffd.median_us,
            self.ratio_to_minimal_vm
        )?;
        row(
            f,
            "seq restore from file, one page per fault",
            &self.file_seq_no_fault_around,
        )?;
        for (w, x) in &self.file_seq_fault_around {
            row(f, &format!("seq restore from file, fault-around {w}"), x)?;
        }
        writeln!(
            f,
            "  fault-around speedup on sequential restore: {:.1}x",
            self.fault_around_speedup
        )?;
        row(
            f,
            "seq restore from a snapshot (pages hashed), one page",
            &self.snapshot_seq_no_fault_around,
        )?;
        row(
            f,
            "seq restore from a snapshot (pages hashed), around 16",
            &self.snapshot_seq_fault_around_16,
        )?;
        let around16 = self
            .file_seq_fault_around
            .iter()
            .find(|(w, _)| *w == 16)
            .map_or(f64::NAN, |(_, x)| x.median_us);
        writeln!(
            f,
            "  page hashing on restore: {:.2}x one page per fault, {:.2}x with fault-around 16 (against the file)",
            self.snapshot_seq_no_fault_around.median_us / self.file_seq_no_fault_around.median_us,
            self.snapshot_seq_fault_around_16.median_us / around16
        )?;
        // demand_paging_test style (tools/testing/selftests/kvm).
        writeln!(
            f,
            "  demand_paging_test style: vCPU 0: {:.0} pages/s (rand), {:.0} pages/s (seq); overall {:.0} pages/s",
            self.zero_rand.per_second(),
            self.zero_seq.per_second(),
            self.zero_rand.per_second()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_take_median_and_spread() {
        let f = Figure::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((f.median_us, f.min_us, f.max_us), (2.0, 1.0, 3.0));
        assert_eq!(Figure::of(vec![1.0, 3.0]).median_us, 2.0);
        assert!((Figure::of(vec![4.0]).per_second() - 250_000.0).abs() < 1e-6);
    }
}
