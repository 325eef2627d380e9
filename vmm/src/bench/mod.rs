//! `vmm bench`: benchmarks, each next to its baseline measured in the same run.
//!
//! `fault`: the cost of a stage-2 fault served by the retry core. A guest user
//! task touches N pages that its kernel mapped up front (`populate=1`), so each
//! first access is only a stage-2 fault taken from guest user mode; the guest
//! times its loop with the TSC. Baselines: the raw userfaultfd round trip of a
//! host thread served by a minimal handler (unpinned, same CPU, cross CPU), and
//! the same guest loop over plain anonymous memory (no userfault at all).
//! Fault-around is measured on sequential restore from a memory file.

use crate::config::{MemBackend, MemoryConfig, VmConfig};
use crate::vm::{verify_reports, GuestEnd, VmOptions};
use crate::KernelSource;
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
        source: std::io::Error,
    },
    /// The minimal-VM baseline failed.
    #[error("{0}")]
    MinimalVm(#[from] crate::arch::x86_64::minimal::MinimalVmError),
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
    fn of(mut samples: Vec<f64>) -> Figure {
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
}

fn pattern_name(rand: bool) -> &'static str {
    if rand {
        "rand"
    } else {
        "seq"
    }
}

/// One guest run; microseconds per touched page as timed by the guest.
fn guest_touch(pages: u64, rand: bool, memory: MemoryConfig) -> Result<f64, BenchError> {
    let (outcome, khz) = guest_touch_run(1, pages, rand, memory)?;
    let cycles: u64 = outcome.reports.iter().map(|r| r.cycles).sum();
    Ok(cycles as f64 / f64::from(khz) * 1e3 / pages as f64)
}

/// One guest run of `pages` populated pages over `vcpus`; the outcome and the TSC kHz.
fn guest_touch_run(
    vcpus: u32,
    pages: u64,
    rand: bool,
    memory: MemoryConfig,
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
    verify_reports(&cfg, &outcome).map_err(bad)?;
    let khz = outcome.tsc_khz.filter(|&k| k > 0).ok_or(BenchError::NoTsc)?;
    Ok((outcome, khz))
}

fn repeat(n: u32, mut f: impl FnMut() -> Result<f64, BenchError>) -> Result<Figure, BenchError> {
    let samples = (0..n.max(1)).map(|_| f()).collect::<Result<Vec<_>, _>>()?;
    Ok(Figure::of(samples))
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
    let minimal_vm_rand = repeat(n, || {
        Ok(crate::arch::x86_64::minimal::stage2_touch(pages)?.as_secs_f64() * 1e6)
    })?;
    progress("guest random touches over anonymous memory");
    let anon_rand = repeat(n, || guest_touch(pages, true, MemoryConfig::default()))?;
    progress("guest random touches through the retry core");
    let zero_rand = repeat(n, || guest_touch(pages, true, lazy(MemBackend::Zero, 0)))?;
    progress("guest sequential touches through the retry core");
    let zero_seq = repeat(n, || guest_touch(pages, false, lazy(MemBackend::Zero, 0)))?;

    let image = TempImage::new((pages * abi::layout::PAGE_SIZE * 2 + (128 << 20)).next_multiple_of(2 << 20))?;
    let file = || MemBackend::File {
        path: image.0.clone(),
        offset: 0,
    };
    progress("sequential restore from a file, one page per fault");
    let file_seq_no_fault_around = repeat(n, || guest_touch(pages, false, lazy(file(), 0)))?;
    let mut file_seq_fault_around = Vec::new();
    for window in [16, 64] {
        progress(&format!("sequential restore from a file, fault-around {window}"));
        file_seq_fault_around.push((
            window,
            repeat(n, || guest_touch(pages, false, lazy(file(), window)))?,
        ));
    }
    let best = file_seq_fault_around
        .iter()
        .map(|(_, f)| f.median_us)
        .fold(f64::INFINITY, f64::min);
    Ok(FaultBench {
        pages,
        repeats: n,
        ratio_rand: zero_rand.median_us / raw_uffd.median_us,
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
    })
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

/// Options of `vmm bench boot`.
#[derive(Debug, Clone, Copy)]
pub struct BootBenchOptions {
    /// Boots per case.
    pub repeats: u32,
}

/// Results of `vmm bench boot`, in milliseconds (the `median_us` field of each
/// figure holds milliseconds here).
#[derive(Debug, Clone, Serialize)]
pub struct BootBench {
    /// Boots per case.
    pub repeats: u32,
    /// Baseline: open /dev/kvm, create a VM with irqchip and one vCPU.
    pub kvm_setup_ms: Figure,
    /// VM creation to the guest's first console byte (1 vCPU, 256 MiB, `hello`).
    pub first_output_ms: Figure,
    /// VM creation to the guest's exit.
    pub total_ms: Figure,
    /// Whole run of `hello` by vCPU count.
    pub total_by_vcpus: Vec<(u32, Figure)>,
}

/// The baseline of a boot: the KVM objects alone.
fn kvm_setup_ms() -> Result<f64, BenchError> {
    let kvm_err = |what| move |source| crate::VmError::Kvm { what, source };
    let start = std::time::Instant::now();
    let kvm = crate::vm::open_kvm()?;
    let vm = kvm.create_vm().map_err(kvm_err("VM creation"))?;
    vm.create_irq_chip().map_err(kvm_err("irqchip creation"))?;
    let _vcpu = vm.create_vcpu(0).map_err(kvm_err("vCPU creation"))?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

fn hello(vcpus: u32) -> Result<crate::RunOutcome, BenchError> {
    let cfg = VmConfig {
        kernel: KernelSource::Bundled,
        vcpus,
        mem_size: 256 << 20,
        cmdline: "workload=hello".into(),
        memory: MemoryConfig::default(),
    };
    let options = VmOptions {
        serial: SerialOutput::Capture(Arc::new(Mutex::new(Vec::new()))),
        timeout: Some(Duration::from_secs(60)),
        ..VmOptions::default()
    };
    let outcome = crate::run_vm(&cfg, options)?;
    if outcome.end != GuestEnd::Exited(0) {
        return Err(BenchError::BadRun {
            end: outcome.end.to_string(),
            console: String::new(),
        });
    }
    Ok(outcome)
}

/// Runs `vmm bench boot`.
pub fn boot(opts: BootBenchOptions, progress: &mut dyn FnMut(&str)) -> Result<BootBench, BenchError> {
    let n = opts.repeats.max(1);
    progress("KVM setup baseline");
    let kvm_setup_ms = repeat(n, kvm_setup_ms)?;
    progress("boots of the bundled guest");
    let mut first = Vec::new();
    let mut total = Vec::new();
    for _ in 0..n {
        let o = hello(1)?;
        first.push(o.first_output.unwrap_or_default().as_secs_f64() * 1e3);
        total.push(o.elapsed.as_secs_f64() * 1e3);
    }
    let mut total_by_vcpus = Vec::new();
    for vcpus in [1, 2, 4, 8] {
        progress(&format!("boots with {vcpus} vCPUs"));
        total_by_vcpus.push((
            vcpus,
            repeat(n, || Ok(hello(vcpus)?.elapsed.as_secs_f64() * 1e3))?,
        ));
    }
    Ok(BootBench {
        repeats: n,
        kvm_setup_ms,
        first_output_ms: Figure::of(first),
        total_ms: Figure::of(total),
        total_by_vcpus,
    })
}

impl std::fmt::Display for BootBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let row = |f: &mut std::fmt::Formatter<'_>, name: &str, x: &Figure| {
            writeln!(
                f,
                "  {name:<52} {:>8.2} ms ({:.2}-{:.2})",
                x.median_us, x.min_us, x.max_us
            )
        };
        writeln!(f, "boot benchmark: median of {} boots (min-max)", self.repeats)?;
        row(f, "baseline: /dev/kvm, VM, irqchip, one vCPU", &self.kvm_setup_ms)?;
        row(
            f,
            "VM creation to the guest's first console line",
            &self.first_output_ms,
        )?;
        row(
            f,
            "VM creation to the guest's exit (hello, 1 vCPU)",
            &self.total_ms,
        )?;
        for (v, x) in &self.total_by_vcpus {
            row(f, &format!("hello on {v} vCPUs, whole run"), x)?;
        }
        Ok(())
    }
}

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
        let (o, khz) = guest_touch_run(vcpus, pages, true, memory)?;
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
    let (o, _) = guest_touch_run(1, fault_opts.pages, true, memory)?;
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

/// Restore times of one memory size, in milliseconds (`median_us` holds ms).
#[derive(Debug, Clone, Serialize)]
pub struct RestoreFigure {
    /// Guest memory in MiB.
    pub mem_mib: u64,
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

/// A scratch folder removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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

/// A captured guest console.
type Console = Arc<Mutex<Vec<u8>>>;

/// Starts `cfg` (a `touch` workload) with the console captured and waits until
/// the guest's user loop has begun (`touch: cpu 0 start`).
fn start_touch(cfg: &VmConfig, timeout: Duration) -> Result<(crate::RunningVm, Console), BenchError> {
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
    while !text().contains("touch: cpu 0 start") {
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

/// Runs `vmm bench restore`: time from `Vm::restore` to running vCPUs for a
/// 64 MiB, 1 GiB and 4 GiB guest, lazily and eagerly.
pub fn restore(repeats: u32, progress: &mut dyn FnMut(&str)) -> Result<RestoreBench, BenchError> {
    let n = repeats.max(1);
    let mut sizes = Vec::new();
    for mem_mib in [64u64, 1024, 4096] {
        progress(&format!("snapshot of a {mem_mib} MiB guest"));
        let dir =
            TempDir(std::env::temp_dir().join(format!("vmm-bench-snap-{}-{mem_mib}", std::process::id())));
        let snapshot_bytes = snapshot_mid_run(mem_mib << 20, &dir.0)?;
        let time = |lazy: bool| -> Result<f64, BenchError> {
            let how = crate::vm::RestoreOptions {
                lazy,
                ..Default::default()
            };
            let options = VmOptions {
                serial: SerialOutput::Capture(Arc::new(Mutex::new(Vec::new()))),
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
        let (mut lazy, mut eager) = (Vec::new(), Vec::new());
        // Interleaved, so both see the same host conditions.
        for _ in 0..n {
            lazy.push(time(true)?);
            eager.push(time(false)?);
        }
        sizes.push(RestoreFigure {
            mem_mib,
            snapshot_bytes,
            lazy_ms: Figure::of(lazy),
            eager_ms: Figure::of(eager),
        });
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
                "  {:>5} MiB guest ({:>6.1} MiB in the snapshot): lazy {:>6.2} ms ({:.2}-{:.2}), eager {:>6.2} ms ({:.2}-{:.2})",
                s.mem_mib,
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

/// One run of `vmm bench migrate`.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateRun {
    /// Pre-copy rounds asked for (0: pure post-copy).
    pub precopy_rounds: u32,
    /// Pages sent while the VM ran, all rounds.
    pub precopy_pages: u64,
    /// Start of the migration to the switchover.
    pub precopy_ms: f64,
    /// Data pages sent after the switchover.
    pub data_pages: u64,
    /// Source pause to the destination running (source's clock, one trip included).
    pub downtime_ms: f64,
    /// Source pause to the last page acknowledged.
    pub total_ms: f64,
    /// Pages the destination requested / pages pushed in the background.
    pub pages_requested: u64,
    /// See `pages_requested`.
    pub pages_pushed: u64,
    /// Page-request latency (request to arrival, while the push runs), bucket upper bounds.
    pub request_p50_us: u64,
    /// See `request_p50_us`.
    pub request_p99_us: u64,
    /// vCPU time blocked in stage-2 faults on the destination.
    pub vcpu_blocked_ms: f64,
}

/// `vmm bench migrate`: post-copy migration of a running 1 GiB guest over a
/// loopback Unix socket.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateBench {
    /// Guest RAM.
    pub mem_mib: u64,
    /// Each run.
    pub runs: Vec<MigrateRun>,
}

/// Pre-copy rounds of the `vmm bench migrate` runs: pure post-copy, then
/// three pre-copy rounds first.
const MIGRATE_ROUNDS: [u32; 2] = [0, 3];

/// Runs `vmm bench migrate`: a 1 GiB guest touching pages is migrated
/// mid-run over loopback, `repeats` times without and with pre-copy
/// (interleaved); the workload must finish on the destination with the right
/// checksums.
pub fn migrate(repeats: u32, progress: &mut dyn FnMut(&str)) -> Result<MigrateBench, BenchError> {
    use crate::migration::{Endpoint, Listener, ReceiveOptions};
    let mem_mib = 1024;
    let cfg = VmConfig {
        kernel: KernelSource::Bundled,
        vcpus: 2,
        mem_size: mem_mib << 20,
        cmdline: "workload=touch pages=120000 pattern=rand".into(),
        memory: MemoryConfig::default(),
    };
    let mut runs = Vec::new();
    for (i, precopy_rounds) in (0..repeats.max(1)).flat_map(|i| MIGRATE_ROUNDS.map(|r| (i, r))) {
        progress(&format!(
            "migration {} of a {mem_mib} MiB guest, {precopy_rounds} pre-copy rounds",
            i + 1
        ));
        let bad = |end: String| BenchError::BadRun {
            end,
            console: String::new(),
        };
        let sock = std::env::temp_dir().join(format!("vmm-bench-mig-{}.sock", std::process::id()));
        let listener = Listener::bind(&Endpoint::Unix(sock.clone())).map_err(|e| bad(e.to_string()))?;
        let dest = std::thread::spawn(move || {
            let opts = ReceiveOptions {
                vm: VmOptions {
                    serial: SerialOutput::Capture(Arc::new(Mutex::new(Vec::new()))),
                    timeout: Some(Duration::from_secs(300)),
                    ..VmOptions::default()
                },
                lost_wait: Duration::from_secs(1),
                progress: Default::default(),
            };
            crate::migration::receive(&listener, opts, |_| {})
        });
        let (vm, _console) = start_touch(&cfg, Duration::from_secs(300))?;
        // Let the guest fill a good part of its memory first.
        std::thread::sleep(Duration::from_millis(4000));
        let summary = vm
            .migrate(
                &Endpoint::Unix(sock),
                &crate::migration::MigrateOptions {
                    precopy_rounds,
                    ..Default::default()
                },
            )
            .map_err(|e| bad(e.to_string()))?;
        let _ = vm.wait()?;
        let out = dest
            .join()
            .map_err(|_| bad("the destination thread panicked".into()))?
            .map_err(|e| bad(e.to_string()))?;
        if out.run.end != GuestEnd::Exited(0) || !matches!(verify_reports(&out.config, &out.run), Ok(Some(_)))
        {
            return Err(bad(format!("destination: {} ({:?})", out.run.end, out.lost)));
        }
        let s = &out.stats;
        runs.push(MigrateRun {
            precopy_rounds,
            precopy_pages: summary.precopy_pages,
            precopy_ms: summary.precopy_ms,
            data_pages: summary.data_pages,
            downtime_ms: summary.downtime_ms,
            total_ms: summary.total_ms,
            pages_requested: summary.pages_requested,
            pages_pushed: summary.pages_pushed,
            request_p50_us: s.latency_p50_us,
            request_p99_us: s.latency_p99_us,
            vcpu_blocked_ms: s.vcpu_blocked_us as f64 / 1e3,
        });
    }
    Ok(MigrateBench { mem_mib, runs })
}

impl std::fmt::Display for MigrateBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "migrate benchmark: live migration of a running {} MiB guest over a loopback Unix socket",
            self.mem_mib
        )?;
        for r in &self.runs {
            if r.precopy_rounds == 0 {
                write!(f, "  post-copy only:                              ")?;
            } else {
                write!(
                    f,
                    "  {} pre-copy rounds: {:>7} pages in {:>6.1} ms, then",
                    r.precopy_rounds, r.precopy_pages, r.precopy_ms
                )?;
            }
            writeln!(
                f,
                " {:>7} post-copy pages: downtime {:>6.1} ms, total {:>7.1} ms, {} requested / {} pushed, request latency p50 <{} us p99 <{} us, vCPUs blocked {:.1} ms",
                r.data_pages,
                r.downtime_ms,
                r.total_ms,
                r.pages_requested,
                r.pages_pushed,
                r.request_p50_us,
                r.request_p99_us,
                r.vcpu_blocked_ms
            )?;
        }
        Ok(())
    }
}
