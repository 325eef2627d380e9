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

/// One stacked bar: a label, its parts (name, value), and the min-max of
/// its total over the repeats.
struct Stack {
    label: String,
    parts: Vec<(&'static str, f64)>,
    min: f64,
    max: f64,
}

const PART_COLORS: [RGBColor; 7] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(127, 127, 127),
];

/// Horizontal stacked bars with min-max error bars and vertical reference
/// lines `(label, x)`; rows only for the data given (no empty rows).
fn stacked(path: &Path, title: &str, unit: &str, rows: &[Stack], refs: &[(String, f64)]) -> Result<()> {
    let err = draw_err(path);
    let n = rows.len().max(1);
    let height = 110 + 48 * u32::try_from(n).unwrap_or(100).min(100);
    let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let top = rows
        .iter()
        .map(|r| r.max.max(r.parts.iter().map(|p| p.1).sum()))
        .chain(refs.iter().map(|r| r.1))
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(260)
        .build_cartesian_2d(0.0..top, (0..n).into_segmented())
        .map_err(&err)?;
    chart
        .configure_mesh()
        .x_desc(unit)
        .y_labels(n)
        .y_label_formatter(&|y| match y {
            SegmentValue::CenterOf(i) => rows.get(*i).map(|r| r.label.clone()).unwrap_or_default(),
            _ => String::new(),
        })
        .disable_y_mesh()
        .draw()
        .map_err(&err)?;
    let mut names: Vec<&'static str> = Vec::new();
    for r in rows {
        for (name, _) in &r.parts {
            if !names.contains(name) {
                names.push(name);
            }
        }
    }
    for (k, name) in names.iter().enumerate() {
        let color = PART_COLORS[k % PART_COLORS.len()];
        let bars: Vec<_> = rows
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let before: f64 = r.parts.iter().take_while(|p| p.0 != *name).map(|p| p.1).sum();
                let v = r.parts.iter().find(|p| p.0 == *name)?.1;
                Some(Rectangle::new(
                    [
                        (before, SegmentValue::Exact(i)),
                        (before + v, SegmentValue::Exact(i + 1)),
                    ],
                    color.mix(0.8).filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(&err)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    // Min-max of the total, drawn across the middle of each bar.
    chart
        .draw_series(rows.iter().enumerate().flat_map(|(i, r)| {
            let y = SegmentValue::CenterOf(i);
            [PathElement::new(
                vec![(r.min, y.clone()), (r.max, y)],
                BLACK.stroke_width(2),
            )]
        }))
        .map_err(&err)?;
    for (label, x) in refs {
        let x = *x;
        chart
            .draw_series([PathElement::new(
                vec![(x, SegmentValue::Exact(0)), (x, SegmentValue::Exact(n))],
                RED.stroke_width(2),
            )])
            .map_err(&err)?
            .label(label.clone())
            .legend(move |(lx, ly)| PathElement::new(vec![(lx, ly), (lx + 12, ly)], RED.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(&err)?;
    root.present().map_err(&err)
}

/// Writes the charts of `vmm bench migrate` into `dir` (SVG and PNG):
/// `migration_downtime.svg` (downtime parts by size and mode, median run,
/// min-max of the total, the 5 ms target) and
/// `migration_request_latency.svg` (exact p50 and p99 while the push runs,
/// the 1 ms target).
pub fn write_migrate(b: &crate::bench::MigrateBench, dir: &Path) -> Result<Vec<PathBuf>> {
    use crate::bench::migrate::median_min_max;
    std::fs::create_dir_all(dir).map_err(|source| PlotError::Dir {
        path: dir.display().to_string(),
        source,
    })?;
    let mut files = Vec::new();
    let mut rows = Vec::new();
    for &m in &b.mem_mib {
        for (w, rounds, mode) in [
            ("touch", 0, "post-copy"),
            ("touch", 3, "3 pre-copy rounds"),
            ("dirty", 0, "post-copy, guest rewriting"),
        ] {
            let rs = b.runs_of(m, w, rounds);
            if rs.is_empty() {
                continue;
            }
            let totals: Vec<f64> = rs.iter().map(|r| r.downtime_ms).collect();
            let (med, min, max) = median_min_max(&totals);
            // The parts of the run whose downtime is the median.
            let Some(r) = rs.iter().min_by(|a, b| {
                (a.downtime_ms - med)
                    .abs()
                    .total_cmp(&(b.downtime_ms - med).abs())
            }) else {
                continue;
            };
            let d = &r.downtime;
            rows.push(Stack {
                label: format!("{} GiB, {mode}", m as f64 / 1024.0),
                parts: vec![
                    ("pause vCPUs", d.pause_ms),
                    ("capture state", d.capture_ms),
                    ("page list", d.page_list_ms),
                    ("send state", d.send_state_ms),
                    ("destination: check", r.destination.check_ms),
                    ("destination: apply", r.destination.apply_ms),
                    (
                        "destination: start + trip",
                        (d.destination_ms - r.destination.check_ms - r.destination.apply_ms).max(0.0),
                    ),
                ],
                min,
                max,
            });
        }
    }
    let p = dir.join("migration_downtime.svg");
    stacked(
        &p,
        "Migration downtime by part (median run; black: min-max over the repeats)",
        "milliseconds",
        &rows,
        &[("target: 5 ms".to_string(), 5.0)],
    )?;
    files.push(p);
    let mut lat = Vec::new();
    for &m in &b.mem_mib {
        let rs = b.runs_of(m, "dirty", 0);
        if rs.is_empty() {
            continue;
        }
        for (name, get) in [
            (
                "p50",
                (|r: &crate::bench::MigrateRun| r.requests.p50_us) as fn(&crate::bench::MigrateRun) -> f64,
            ),
            ("p99", |r: &crate::bench::MigrateRun| r.requests.p99_us),
        ] {
            let v: Vec<f64> = rs.iter().map(|r| get(r)).collect();
            let (med, min, max) = median_min_max(&v);
            lat.push(Stack {
                label: format!(
                    "{} GiB, {name} ({} requests)",
                    m as f64 / 1024.0,
                    rs.iter().map(|r| r.requests.count).min().unwrap_or(0)
                ),
                parts: vec![(
                    if name == "p50" {
                        "median"
                    } else {
                        "99th percentile"
                    },
                    med,
                )],
                min,
                max,
            });
        }
    }
    if !lat.is_empty() {
        let p = dir.join("migration_request_latency.svg");
        stacked(
            &p,
            "Page-request latency while the push runs (exact, median run; black: min-max)",
            "microseconds",
            &lat,
            &[("target: 1 ms".to_string(), 1000.0)],
        )?;
        files.push(p);
    }
    Ok(files)
}
