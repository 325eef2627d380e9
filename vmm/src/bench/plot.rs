//! Charts of `vmm bench all --plot DIR` (SVG, plotters).

use crate::bench::AllBench;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// Errors writing charts.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The output folder cannot be created.
    #[error("cannot create the chart folder {path}: {source}")]
    Dir {
        /// The folder.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Drawing failed.
    #[error("cannot draw {chart}: {reason}")]
    Draw {
        /// The chart file.
        chart: String,
        /// Why.
        reason: String,
    },
}

type Result<T> = std::result::Result<T, PlotError>;

fn draw_err<E: std::fmt::Display>(chart: &Path) -> impl Fn(E) -> PlotError + '_ {
    move |e| PlotError::Draw {
        chart: chart.display().to_string(),
        reason: e.to_string(),
    }
}

/// A horizontal-label bar chart of `(label, value)`.
fn bars(path: &Path, title: &str, unit: &str, data: &[(String, f64)]) -> Result<()> {
    let err = draw_err(path);
    let height = 60 + 40 * u32::try_from(data.len()).unwrap_or(u32::MAX / 80).min(1000);
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let max = data.iter().map(|d| d.1).fold(0.0, f64::max).max(1e-9) * 1.15;
    let n = data.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(330)
        .build_cartesian_2d(0.0..max, (0..n).into_segmented())
        .map_err(&err)?;
    chart
        .configure_mesh()
        .x_desc(unit)
        .y_labels(n)
        .y_label_formatter(&|y| match y {
            SegmentValue::CenterOf(i) => data.get(*i).map(|d| d.0.clone()).unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(&err)?;
    chart
        .draw_series(data.iter().enumerate().map(|(i, (_, v))| {
            Rectangle::new(
                [(0.0, SegmentValue::Exact(i)), (*v, SegmentValue::Exact(i + 1))],
                BLUE.mix(0.6).filled(),
            )
        }))
        .map_err(&err)?;
    root.present().map_err(&err)
}

/// Writes every chart of `b` into `dir`; returns the files written.
pub fn write_all(b: &AllBench, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|source| PlotError::Dir {
        path: dir.display().to_string(),
        source,
    })?;
    let mut files = Vec::new();

    let f = &b.fault;
    let mut costs = vec![
        ("raw uffd round trip".to_string(), f.raw_uffd.median_us),
        ("guest rand, anonymous memory".to_string(), f.anon_rand.median_us),
        ("guest rand, stage-2 userfault".to_string(), f.zero_rand.median_us),
        ("guest seq, stage-2 userfault".to_string(), f.zero_seq.median_us),
        (
            "seq restore from file, 1 page/fault".to_string(),
            f.file_seq_no_fault_around.median_us,
        ),
    ];
    if let Some(x) = &f.raw_uffd_same_cpu {
        costs.insert(1, ("raw uffd, same CPU".to_string(), x.median_us));
    }
    for (w, x) in &f.file_seq_fault_around {
        costs.push((format!("seq restore from file, fault-around {w}"), x.median_us));
    }
    let p = dir.join("fault_cost.svg");
    bars(&p, "Cost per fault (median)", "microseconds per fault", &costs)?;
    files.push(p);

    let hist: Vec<(String, f64)> = b
        .latency_us_log2
        .iter()
        .enumerate()
        .rev()
        .skip_while(|(_, n)| **n == 0)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .map(|(i, n)| (format!("{}-{} us", (1u64 << i) >> 1, 1u64 << i), *n as f64))
        .collect();
    let p = dir.join("fault_latency_histogram.svg");
    bars(
        &p,
        "Stage-2 fault latency in the retry core (one run)",
        "faults",
        &hist,
    )?;
    files.push(p);

    let scaling: Vec<(String, f64)> = b
        .scaling
        .iter()
        .map(|s| (format!("{} vCPUs", s.vcpus), s.pages_per_sec))
        .collect();
    let p = dir.join("throughput_vs_vcpus.svg");
    bars(
        &p,
        "Stage-2 fault throughput by vCPU count",
        "pages per second (all vCPUs)",
        &scaling,
    )?;
    files.push(p);

    let boots: Vec<(String, f64)> = b
        .boot
        .total_by_vcpus
        .iter()
        .map(|(v, x)| (format!("hello, {v} vCPUs"), x.median_us))
        .collect();
    let p = dir.join("boot_time.svg");
    bars(&p, "Whole run of the hello guest", "milliseconds", &boots)?;
    files.push(p);
    let restore: Vec<(String, f64)> = b
        .restore
        .sizes
        .iter()
        .flat_map(|r| {
            [
                (format!("{} MiB, lazy", r.mem_mib), r.lazy_ms.median_us),
                (format!("{} MiB, eager", r.mem_mib), r.eager_ms.median_us),
            ]
        })
        .collect();
    let p = dir.join("restore_time_vs_memory.svg");
    bars(&p, "Snapshot restore to running vCPUs", "milliseconds", &restore)?;
    files.push(p);
    Ok(files)
}
