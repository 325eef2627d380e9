//! `vmm bench fault --vcpus 1,2,4`: stage-2 fault throughput by vCPU count,
//! demand_paging_test style (each vCPU touches its share of populated pages,
//! every first touch a stage-2 userfault served by the retry core), next to
//! its ceiling measured in the same run: two 1-vCPU VMs faulting at once,
//! each with its vCPU and handler pinned to a CPU of its own. Every round
//! runs each case once, in turn, so load from elsewhere falls on all of them;
//! medians and min-max over the rounds are printed.

use super::fault::guest_touch_run;
use super::BenchError;
use crate::config::{HandlerConfig, HandlerPinning, MemBackend, MemoryConfig};
use sandbox::SeccompMode;
use serde::Serialize;

/// One handler layout to measure (`--layouts`): `default`, or
/// `THREADS:PINNING[:SPIN_US[:batch]]` such as `1:none` (the single unpinned
/// handler of before) or `2:vcpu:20`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayoutSpec {
    /// As given.
    pub name: String,
    /// The options it stands for.
    #[serde(skip)]
    pub handlers: HandlerConfig,
}

impl std::str::FromStr for LayoutSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<LayoutSpec, String> {
        let bad = || {
            format!(
                "invalid layout `{s}`: use `default` or THREADS:PINNING[:SPIN_US], e.g. 1:none or 2:vcpu:20"
            )
        };
        if s == "default" {
            return Ok(LayoutSpec {
                name: s.into(),
                handlers: HandlerConfig::default(),
            });
        }
        let mut it = s.split(':');
        let threads = match it.next() {
            Some("auto") => None,
            Some(n) => Some(n.parse::<u32>().map_err(|_| bad())?),
            None => return Err(bad()),
        };
        let pinning: HandlerPinning = it.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let spin_us = it.next().map_or(Ok(0), str::parse).map_err(|_| bad())?;
        let batch = match it.next() {
            None => false,
            Some("batch") => true,
            Some(_) => return Err(bad()),
        };
        if it.next().is_some() {
            return Err(bad());
        }
        let handlers = HandlerConfig {
            threads,
            pinning,
            spin_us,
            cpus: None,
            batch,
        };
        handlers.validate().map_err(|e| e.to_string())?;
        Ok(LayoutSpec {
            name: s.into(),
            handlers,
        })
    }
}

/// Options of the scaling benchmark.
#[derive(Debug, Clone)]
pub struct ScalingOptions {
    /// vCPU counts.
    pub vcpus: Vec<u32>,
    /// Pages per VM run (shared out among its vCPUs).
    pub pages: u64,
    /// Rounds.
    pub repeats: u32,
    /// Layouts measured for every vCPU count above 1 (1 vCPU always runs the default).
    pub layouts: Vec<LayoutSpec>,
}

/// Median and spread of a rate.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Rate {
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Rate {
    fn of(mut v: Vec<f64>) -> Rate {
        let f = super::Figure::of(std::mem::take(&mut v));
        Rate {
            median: f.median_us,
            min: f.min_us,
            max: f.max_us,
        }
    }
}

/// One measured case.
#[derive(Debug, Clone, Serialize)]
pub struct ScalingRow {
    /// vCPUs of the VM (2 for the ceiling: two VMs of one).
    pub vcpus: u32,
    /// The layout asked for (`ceiling` for two 1-vCPU VMs).
    pub layout: String,
    /// Where the threads ran (of the last round).
    pub placement: String,
    /// Pages per second over the whole VM (all pages / the slowest vCPU's time).
    pub pages_per_sec: Rate,
    /// Pages per second of each vCPU (median over the rounds).
    pub per_vcpu: Vec<f64>,
    /// Slowest vCPU's rate over the mean (median over the rounds; 1 = fair).
    pub fairness: f64,
    /// Of the PAGEFAULT events, the share read by a handler thread pinned to
    /// the faulting vCPU's CPU (when both are pinned).
    pub local_events: Option<f64>,
    /// PAGEFAULT events per handler wake-up.
    pub events_per_wakeup: f64,
}

/// Results.
#[derive(Debug, Clone, Serialize)]
pub struct ScalingBench {
    /// Pages per VM run.
    pub pages: u64,
    /// Rounds.
    pub repeats: u32,
    /// CPUs this process may use.
    pub cpus: Vec<usize>,
    /// Two 1-vCPU VMs at once (each on its own CPU), when there are two CPUs.
    pub ceiling: Option<ScalingRow>,
    /// Every case, by vCPU count then layout.
    pub rows: Vec<ScalingRow>,
}

#[derive(Default)]
struct Samples {
    vcpus: u32,
    layout: String,
    placement: String,
    rate: Vec<f64>,
    per_vcpu: Vec<Vec<f64>>,
    fairness: Vec<f64>,
    local: Vec<f64>,
    per_wakeup: Vec<f64>,
}

impl Samples {
    fn row(self) -> ScalingRow {
        let n = self.per_vcpu.first().map_or(0, Vec::len);
        let per_vcpu = (0..n)
            .map(|i| Rate::of(self.per_vcpu.iter().filter_map(|r| r.get(i).copied()).collect()).median)
            .collect();
        ScalingRow {
            vcpus: self.vcpus,
            layout: self.layout,
            placement: self.placement,
            pages_per_sec: Rate::of(self.rate),
            per_vcpu,
            fairness: Rate::of(self.fairness).median,
            local_events: (!self.local.is_empty()).then(|| Rate::of(self.local).median),
            events_per_wakeup: Rate::of(self.per_wakeup).median,
        }
    }
}

/// What one VM run measured: (pages, seconds of the slowest vCPU, per-vCPU rates, local share, events per wake-up, placement).
struct Run {
    pages: u64,
    slowest: f64,
    per_vcpu: Vec<f64>,
    local: Option<(u64, u64)>,
    events: u64,
    wakeups: u64,
    placement: String,
}

fn memory(handlers: HandlerConfig) -> MemoryConfig {
    MemoryConfig {
        backend: MemBackend::Zero,
        fault_around: Some(0),
        handlers,
        ..MemoryConfig::default()
    }
}

fn run(vcpus: u32, pages: u64, handlers: HandlerConfig) -> Result<Run, BenchError> {
    let allowed = ::memory::affinity::allowed_cpus().unwrap_or_default();
    let batch = vmm_core::placement::layout(&handlers, vcpus, &allowed, None).batch;
    let (o, khz) = guest_touch_run(vcpus, pages, true, memory(handlers), SeccompMode::Kill)?;
    let secs = |cycles: u64| cycles as f64 / f64::from(khz) / 1e3;
    let per_vcpu: Vec<f64> = o
        .reports
        .iter()
        .map(|r| r.pages as f64 / secs(r.cycles))
        .collect();
    let slowest = o.reports.iter().map(|r| secs(r.cycles)).fold(0.0, f64::max);
    let threads = o
        .memory
        .as_ref()
        .map(|m| m.handler_threads.clone())
        .unwrap_or_default();
    // tid -> the CPU its vCPU is pinned to.
    let vcpu_cpu: std::collections::HashMap<u32, usize> = o
        .vcpu_stats
        .iter()
        .filter_map(|s| Some((s.tid?, s.host_cpu?)))
        .collect();
    let pinned = !vcpu_cpu.is_empty() && vcpu_cpu.len() == o.vcpu_stats.len();
    let mut local = (0u64, 0u64);
    for t in &threads {
        for (tid, n) in &t.by_thread {
            if let Some(c) = vcpu_cpu.get(tid) {
                local.1 += n;
                if t.cpu == Some(*c) {
                    local.0 += n;
                }
            }
        }
    }
    let list = |v: Vec<String>| v.join(",");
    let placement = format!(
        "{} handler thread{} on CPUs {}; vCPUs on CPUs {}{}",
        threads.len(),
        if threads.len() == 1 { "" } else { "s" },
        list(
            threads
                .iter()
                .map(|t| t.cpu.map_or("?".into(), |c| c.to_string()))
                .collect()
        ),
        list(
            o.vcpu_stats
                .iter()
                .map(|s| s.host_cpu.map_or("-".into(), |c| c.to_string()))
                .collect()
        ),
        if batch { ", SCHED_BATCH" } else { "" },
    );
    Ok(Run {
        pages,
        slowest,
        per_vcpu,
        local: pinned.then_some(local),
        events: threads.iter().map(|t| t.events).sum(),
        wakeups: threads.iter().map(|t| t.wakeups).sum(),
        placement,
    })
}

fn record(s: &mut Samples, runs: &[Run]) {
    let pages: u64 = runs.iter().map(|r| r.pages).sum();
    let slowest = runs.iter().map(|r| r.slowest).fold(0.0, f64::max);
    s.rate.push(pages as f64 / slowest);
    let per: Vec<f64> = runs.iter().flat_map(|r| r.per_vcpu.iter().copied()).collect();
    let mean = per.iter().sum::<f64>() / per.len().max(1) as f64;
    let min = per.iter().copied().fold(f64::INFINITY, f64::min);
    s.fairness.push(if mean > 0.0 { min / mean } else { f64::NAN });
    s.per_vcpu.push(per);
    let (l, t) = runs
        .iter()
        .filter_map(|r| r.local)
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    if t > 0 {
        s.local.push(l as f64 / t as f64);
    }
    let (e, w) = runs.iter().fold((0, 0), |a, r| (a.0 + r.events, a.1 + r.wakeups));
    s.per_wakeup.push(e as f64 / w.max(1) as f64);
    s.placement = runs
        .iter()
        .map(|r| r.placement.as_str())
        .collect::<Vec<_>>()
        .join(" | ");
}

/// Two 1-vCPU VMs with `pages / 2` each at once, on CPUs `a` and `b`.
fn ceiling_round(pages: u64, a: usize, b: usize) -> Result<Vec<Run>, BenchError> {
    let pin = |cpu: usize| HandlerConfig {
        cpus: Some(vec![cpu]),
        ..HandlerConfig::default()
    };
    let half = pages / 2;
    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| run(1, half, pin(a)));
        let tb = s.spawn(|| run(1, half, pin(b)));
        (ta.join(), tb.join())
    });
    let ra = ra.map_err(|_| BenchError::BadRun {
        end: "the ceiling's first VM panicked".into(),
        console: String::new(),
    })??;
    let rb = rb.map_err(|_| BenchError::BadRun {
        end: "the ceiling's second VM panicked".into(),
        console: String::new(),
    })??;
    Ok(vec![ra, rb])
}

/// Runs the scaling benchmark; `progress` is told what runs.
pub fn scaling_bench(
    opts: &ScalingOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<ScalingBench, BenchError> {
    let cpus = ::memory::affinity::allowed_cpus().unwrap_or_default();
    let mut cases: Vec<(u32, LayoutSpec)> = Vec::new();
    for &v in &opts.vcpus {
        if v == 1 {
            cases.push((
                1,
                "default".parse().map_err(|e: String| BenchError::BadRun {
                    end: e,
                    console: String::new(),
                })?,
            ));
        } else {
            cases.extend(opts.layouts.iter().map(|l| (v, l.clone())));
        }
    }
    let mut samples: Vec<Samples> = cases
        .iter()
        .map(|(v, l)| Samples {
            vcpus: *v,
            layout: l.name.clone(),
            ..Samples::default()
        })
        .collect();
    let mut ceiling = (cpus.len() >= 2).then(|| Samples {
        vcpus: 2,
        layout: "ceiling: two 1-vCPU VMs at once".into(),
        ..Samples::default()
    });
    for round in 0..opts.repeats.max(1) {
        if let Some(c) = ceiling.as_mut() {
            progress(&format!("round {}: ceiling, two 1-vCPU VMs at once", round + 1));
            let runs = ceiling_round(opts.pages, cpus[0], cpus[1])?;
            record(c, &runs);
        }
        for ((v, l), s) in cases.iter().zip(samples.iter_mut()) {
            progress(&format!("round {}: {v} vCPUs, layout {}", round + 1, l.name));
            let r = run(*v, opts.pages, l.handlers.clone())?;
            record(s, &[r]);
        }
    }
    Ok(ScalingBench {
        pages: opts.pages,
        repeats: opts.repeats.max(1),
        cpus,
        ceiling: ceiling.map(Samples::row),
        rows: samples.into_iter().map(Samples::row).collect(),
    })
}

impl std::fmt::Display for ScalingBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "stage-2 fault throughput by vCPU count (demand_paging_test style): {} pages per VM, random, median of {} rounds (min-max), CPUs {:?}",
            self.pages, self.repeats, self.cpus
        )?;
        let one = self
            .rows
            .iter()
            .find(|r| r.vcpus == 1)
            .map(|r| r.pages_per_sec.median);
        let ceil = self.ceiling.as_ref().map(|r| r.pages_per_sec.median);
        let row = |f: &mut std::fmt::Formatter<'_>, r: &ScalingRow| {
            let per: Vec<String> = r.per_vcpu.iter().map(|p| format!("{p:.0}")).collect();
            let mut vs = String::new();
            if let (Some(o), true) = (one, r.vcpus > 1) {
                vs.push_str(&format!(" {:.2}x 1 vCPU", r.pages_per_sec.median / o));
            }
            if let (Some(c), false) = (ceil, r.layout.starts_with("ceiling")) {
                vs.push_str(&format!(" {:.2}x ceiling", r.pages_per_sec.median / c));
            }
            writeln!(
                f,
                "  {} vCPU {:<34} {:>7.0} pages/s ({:.0}-{:.0}){vs}; per vCPU {}; fairness {:.2}; {}{:.2} events/wake-up",
                r.vcpus,
                r.layout,
                r.pages_per_sec.median,
                r.pages_per_sec.min,
                r.pages_per_sec.max,
                per.join(" "),
                r.fairness,
                r.local_events
                    .map_or(String::new(), |l| format!("{:.0}% events read on the vCPU's CPU; ", l * 100.0)),
                r.events_per_wakeup,
            )?;
            writeln!(f, "      layout: {}", r.placement)
        };
        if let Some(c) = &self.ceiling {
            row(f, c)?;
        }
        for r in &self.rows {
            row(f, r)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_parse() {
        let l: LayoutSpec = "2:vcpu:20".parse().expect("layout");
        assert_eq!(
            (l.handlers.threads, l.handlers.pinning, l.handlers.spin_us),
            (Some(2), HandlerPinning::Vcpu, 20)
        );
        let l: LayoutSpec = "1:none".parse().expect("layout");
        assert_eq!(
            (l.handlers.threads, l.handlers.pinning),
            (Some(1), HandlerPinning::None)
        );
        assert!("2".parse::<LayoutSpec>().is_err());
        assert!("0:cpu".parse::<LayoutSpec>().is_err());
        assert!("2:vcpu:1:2".parse::<LayoutSpec>().is_err());
    }
}
