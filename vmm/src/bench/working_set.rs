//! `vmm bench working-set`: a FaaS-like cold start. The guest (`workload=faas`)
//! builds 64k pages of state in a 1 GiB guest and is snapshotted at its
//! checkpoint; each restore then runs one invocation touching W distinct
//! state pages (rand or zipf). Measured from the start of `Vm::restore` to
//! the invocation's report, interleaved per repeat: eager restore, lazy on
//! demand (fault-around 16, the default, and 0), lazy with the recorded
//! working set prefetched before the vCPUs resume and while they run, and
//! the warm baseline: the lazy restore's fixed cost (restore to running
//! vCPUs, nothing fetched) plus the invocation on a VM whose pages are all
//! present (the eager run's time from running vCPUs to the report). The
//! working set is recorded by a lazy restore with fault-around 0 (the exact
//! pages the invocation touched, see below).

use super::{BenchError, Figure, TempDir};
use crate::config::{KernelSource, MemoryConfig, VmConfig};
use crate::controller::{verify_reports, RunOutcome};
use crate::vm::{RestoreOptions, VmOptions};
use devices::serial::SerialOutput;
use serde::Serialize;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// State pages of the scenario.
pub const STATE_PAGES: u64 = 65536;
/// Guest RAM.
pub const MEM: u64 = 1 << 30;

/// One way to restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Memory copied in, checked.
    Eager,
    /// Lazy, pages on demand, fault-around 16.
    OnDemand,
    /// Lazy, pages on demand, fault-around 0.
    OnDemandNoAround,
    /// Lazy, the working set filled before the vCPUs resume.
    WorkingSetBefore,
    /// Lazy, the working set filled while the vCPUs run.
    WorkingSetWhile,
}

impl Mode {
    const ALL: [Mode; 5] = [
        Mode::Eager,
        Mode::OnDemand,
        Mode::OnDemandNoAround,
        Mode::WorkingSetBefore,
        Mode::WorkingSetWhile,
    ];

    fn name(self) -> &'static str {
        match self {
            Mode::Eager => "eager",
            Mode::OnDemand => "on demand (fault-around 16)",
            Mode::OnDemandNoAround => "on demand (fault-around 0)",
            Mode::WorkingSetBefore => "working set, before resume",
            Mode::WorkingSetWhile => "working set, while running",
        }
    }

    fn options(self) -> RestoreOptions {
        RestoreOptions {
            lazy: self != Mode::Eager,
            fault_around: (self == Mode::OnDemandNoAround).then_some(0),
            prefetch_working_set: match self {
                Mode::WorkingSetBefore => Some(true),
                Mode::WorkingSetWhile => Some(false),
                _ => None,
            },
            ..RestoreOptions::default()
        }
    }
}

/// The figures of one mode in one cell, milliseconds (`median_us` holds ms).
#[derive(Debug, Clone, Serialize)]
pub struct ModeFigure {
    /// The mode.
    pub mode: Mode,
    /// Restore start to the invocation's report.
    pub total_ms: Figure,
    /// Restore start to running vCPUs.
    pub ready_ms: Figure,
    /// Stage-2 faults served (median).
    pub faults: u64,
    /// Pages the working-set prefetch filled (median).
    pub prefetched: u64,
}

/// One cell: a pattern and a working-set size.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// `rand` or `zipf:990`.
    pub pattern: String,
    /// W in percent of the state pages.
    pub w_percent: u64,
    /// W in pages (distinct pages the invocation touches).
    pub w_pages: u64,
    /// Pages in the recorded working set, and of those fault-around neighbours.
    pub recorded: (u64, u64),
    /// Each mode.
    pub modes: Vec<ModeFigure>,
    /// The warm baseline.
    pub warm_ms: Figure,
    /// On demand (fault-around 16) / working set before resume, medians.
    pub speedup_before: f64,
    /// On demand (fault-around 16) / working set while running, medians.
    pub speedup_while: f64,
    /// Working set before resume / warm, medians.
    pub vs_warm_before: f64,
    /// Working set while running / warm, medians.
    pub vs_warm_while: f64,
}

/// Results of `vmm bench working-set`.
#[derive(Debug, Clone, Serialize)]
pub struct WorkingSetBench {
    /// Repeats per mode.
    pub repeats: u32,
    /// State pages.
    pub state_pages: u64,
    /// The cells.
    pub cells: Vec<Cell>,
}

fn cmdline(pattern: &str, w: u64) -> String {
    format!("workload=faas pages={STATE_PAGES} pattern={pattern} invoke={w} seed=11 populate=1")
}

fn quiet(timeout: Duration) -> VmOptions {
    VmOptions {
        serial: SerialOutput::Capture(Arc::new(Mutex::new(Vec::new()))),
        timeout: Some(timeout),
        ..VmOptions::default()
    }
}

fn check(cfg: &VmConfig, out: &RunOutcome) -> Result<(), BenchError> {
    let bad = |end: String| BenchError::BadRun {
        end,
        console: String::new(),
    };
    if out.exit_code() != 0 {
        return Err(bad(out.end.to_string()));
    }
    verify_reports(cfg, out).map_err(|e| bad(e.to_string()))?;
    Ok(())
}

/// One restore of `dir`: (total ms, ready ms, faults, prefetched pages).
fn restore_once(
    dir: &Path,
    cfg: &VmConfig,
    how: &RestoreOptions,
) -> Result<(f64, f64, u64, u64), BenchError> {
    let t = Instant::now();
    let vm = crate::Vm::restore(dir, how, quiet(Duration::from_secs(300)))?.start()?;
    let ready = t.elapsed().as_secs_f64() * 1e3;
    let out = vm.wait()?;
    check(cfg, &out)?;
    let total = out.last_report.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    let (faults, pre) = out.memory.as_ref().map_or((0, 0), |m| {
        (m.total.faults, m.working_set_prefetch.map_or(0, |p| p.pages))
    });
    Ok((total, ready, faults, pre))
}

fn median_u64(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Runs `vmm bench working-set` over `percents` of the state pages and the
/// `patterns`.
pub fn working_set_with(
    repeats: u32,
    percents: &[u64],
    patterns: &[&str],
    progress: &mut dyn FnMut(&str),
) -> Result<WorkingSetBench, BenchError> {
    let n = repeats.max(1);
    let mut cells = Vec::new();
    for pattern in patterns {
        for &pct in percents {
            let w = STATE_PAGES * pct / 100;
            let dir = TempDir(std::env::temp_dir().join(format!(
                "vmm-bench-ws-{}-{}-{pct}",
                std::process::id(),
                pattern.replace(':', "")
            )));
            let cfg = VmConfig {
                kernel: KernelSource::Bundled,
                vcpus: 1,
                mem_size: MEM,
                cmdline: cmdline(pattern, w),
                memory: MemoryConfig::default(),
            };
            progress(&format!(
                "{pattern} W={pct}%: building the state and snapshotting at the checkpoint"
            ));
            let mut options = quiet(Duration::from_secs(600));
            options.snapshot_at_checkpoint = Some(dir.0.clone());
            let out = crate::Vm::new(&cfg, options)?.run()?;
            if !matches!(out.checkpoint, Some(Ok(_))) {
                return Err(BenchError::BadRun {
                    end: format!(
                        "no snapshot at the checkpoint ({}): {:?}",
                        out.end, out.checkpoint
                    ),
                    console: String::new(),
                });
            }
            progress(&format!("{pattern} W={pct}%: recording the working set"));
            // Recorded without fault-around: a neighbour filled by
            // fault-around and touched later never faults, so a recording
            // with it holds every neighbour, touched or not (measured: 10x
            // W at W = 5%), and the prefetch would copy them all.
            let rec = RestoreOptions {
                lazy: true,
                record_working_set: true,
                fault_around: Some(0),
                ..RestoreOptions::default()
            };
            let vm = crate::Vm::restore(&dir.0, &rec, quiet(Duration::from_secs(300)))?.start()?;
            let out = vm.wait()?;
            check(&cfg, &out)?;
            let recorded = match &out.working_set {
                Some(Ok(s)) => (s.pages, s.around),
                other => {
                    return Err(BenchError::BadRun {
                        end: format!("the working set was not recorded: {other:?}"),
                        console: String::new(),
                    })
                }
            };
            progress(&format!(
                "{pattern} W={pct}%: {n} interleaved rounds of {} restores",
                Mode::ALL.len()
            ));
            let mut samples: Vec<Vec<(f64, f64, u64, u64)>> = vec![Vec::new(); Mode::ALL.len()];
            let mut warm = Vec::new();
            for _ in 0..n {
                for (i, m) in Mode::ALL.iter().enumerate() {
                    samples[i].push(restore_once(&dir.0, &cfg, &m.options())?);
                }
                let eager = samples[0].last().copied().unwrap_or_default();
                let lazy = samples[1].last().copied().unwrap_or_default();
                // The lazy restore's fixed cost + the invocation on present memory.
                warm.push(lazy.1 + (eager.0 - eager.1));
            }
            let modes: Vec<ModeFigure> = Mode::ALL
                .iter()
                .zip(samples)
                .map(|(&mode, s)| ModeFigure {
                    mode,
                    total_ms: Figure::of(s.iter().map(|x| x.0).collect()),
                    ready_ms: Figure::of(s.iter().map(|x| x.1).collect()),
                    faults: median_u64(s.iter().map(|x| x.2).collect()),
                    prefetched: median_u64(s.iter().map(|x| x.3).collect()),
                })
                .collect();
            let warm_ms = Figure::of(warm);
            let med = |m: Mode| {
                modes
                    .iter()
                    .find(|f| f.mode == m)
                    .map_or(f64::NAN, |f| f.total_ms.median_us)
            };
            let w_pages = abi::workload::faas_invocation(
                &abi::workload::task_plan(
                    &abi::workload::parse_cmdline(&cfg.cmdline).unwrap_or_default(),
                    1,
                    0,
                ),
                abi::workload::Pattern::parse(pattern).unwrap_or(abi::workload::Pattern::Rand),
            )
            .len() as u64;
            cells.push(Cell {
                pattern: (*pattern).to_owned(),
                w_percent: pct,
                w_pages,
                recorded,
                speedup_before: med(Mode::OnDemand) / med(Mode::WorkingSetBefore),
                speedup_while: med(Mode::OnDemand) / med(Mode::WorkingSetWhile),
                vs_warm_before: med(Mode::WorkingSetBefore) / warm_ms.median_us,
                vs_warm_while: med(Mode::WorkingSetWhile) / warm_ms.median_us,
                modes,
                warm_ms,
            });
        }
    }
    Ok(WorkingSetBench {
        repeats: n,
        state_pages: STATE_PAGES,
        cells,
    })
}

/// `vmm bench working-set`: W = 5, 25, 50% of 64k state pages, rand and zipf:990.
pub fn working_set(repeats: u32, progress: &mut dyn FnMut(&str)) -> Result<WorkingSetBench, BenchError> {
    working_set_with(repeats, &[5, 25, 50], &["rand", "zipf:990"], progress)
}

impl std::fmt::Display for WorkingSetBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "working-set benchmark: 1 GiB guest, {} state pages, restore start to the invocation's end, median of {} interleaved (min-max), ms",
            self.state_pages, self.repeats
        )?;
        for c in &self.cells {
            writeln!(
                f,
                "  {} W={}% ({} pages; recorded {} pages, {} of them fault-around neighbours):",
                c.pattern, c.w_percent, c.w_pages, c.recorded.0, c.recorded.1
            )?;
            for m in &c.modes {
                writeln!(
                    f,
                    "    {:<28} {:>8.1} ({:.1}-{:.1})  ready {:>6.1}  faults {:>6}  prefetched {:>6}",
                    m.mode.name(),
                    m.total_ms.median_us,
                    m.total_ms.min_us,
                    m.total_ms.max_us,
                    m.ready_ms.median_us,
                    m.faults,
                    m.prefetched
                )?;
            }
            writeln!(
                f,
                "    {:<28} {:>8.1} ({:.1}-{:.1})",
                "warm baseline", c.warm_ms.median_us, c.warm_ms.min_us, c.warm_ms.max_us
            )?;
            writeln!(
                f,
                "    working set vs on demand: {:.2}x before resume, {:.2}x while running; vs warm: {:.2}x / {:.2}x",
                c.speedup_before, c.speedup_while, c.vs_warm_before, c.vs_warm_while
            )?;
        }
        Ok(())
    }
}
