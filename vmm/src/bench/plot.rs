//! Charts of `vmm bench all --plot DIR` and `vmm bench migrate --plot DIR`
//! (plotters): each chart as SVG and as PNG (drawn with the bundled DejaVu
//! Sans, `vmm/resources/fonts/`, so that no system font is needed).

use crate::bench::AllBench;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// The font of every chart (DejaVu Sans, its license next to it).
static FONT: &[u8] = include_bytes!("../../resources/fonts/DejaVuSans.ttf");

/// Registers the bundled font for the bitmap backend (once).
fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok =
        *DONE.get_or_init(|| plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(PlotError::Draw {
            chart: "the bundled font".into(),
            reason: "DejaVu Sans cannot be loaded".into(),
        })
    }
}

/// Draws a chart of `size` into `path` (SVG) and next to it as PNG, with
/// `svg` and `png` (the same drawing on each backend); returns both files.
fn render(
    path: &Path,
    size: (u32, u32),
    svg: impl FnOnce(DrawingArea<SVGBackend<'_>, Shift>) -> Result<()>,
    png: impl FnOnce(DrawingArea<BitMapBackend<'_>, Shift>) -> Result<()>,
) -> Result<Vec<PathBuf>> {
    register_font()?;
    svg(SVGBackend::new(path, size).into_drawing_area())?;
    let png_path = path.with_extension("png");
    let mut buf = vec![0u8; (size.0 as usize) * (size.1 as usize) * 3];
    png(BitMapBackend::with_buffer(&mut buf, size).into_drawing_area())?;
    let err = |e: String| PlotError::Draw {
        chart: png_path.display().to_string(),
        reason: e,
    };
    let file = std::fs::File::create(&png_path).map_err(|e| err(e.to_string()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), size.0, size.1);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(|e| err(e.to_string()))?;
    w.write_image_data(&buf).map_err(|e| err(e.to_string()))?;
    w.finish().map_err(|e| err(e.to_string()))?;
    Ok(vec![path.to_owned(), png_path])
}

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

/// A horizontal-label bar chart of `(label, value)`, SVG and PNG; returns the files.
fn bars(path: &Path, title: &str, unit: &str, data: &[(String, f64)]) -> Result<Vec<PathBuf>> {
    let height = 60 + 40 * u32::try_from(data.len()).unwrap_or(u32::MAX / 80).min(1000);
    render(
        path,
        (900, height),
        |root| bars_on(&root, path, title, unit, data),
        |root| bars_on(&root, path, title, unit, data),
    )
}

fn bars_on<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    path: &Path,
    title: &str,
    unit: &str,
    data: &[(String, f64)],
) -> Result<()> {
    let err = draw_err(path);
    root.fill(&WHITE).map_err(&err)?;
    let max = data.iter().map(|d| d.1).fold(0.0, f64::max).max(1e-9) * 1.15;
    let n = data.len();
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(330)
        .build_cartesian_2d(0.0..max, (0..n.saturating_sub(1)).into_segmented())
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
    files.extend(bars(
        &p,
        "Cost per fault (median)",
        "microseconds per fault",
        &costs,
    )?);

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
    files.extend(bars(
        &p,
        "Stage-2 fault latency in the retry core (one run)",
        "faults",
        &hist,
    )?);

    let scaling: Vec<(String, f64)> = b
        .scaling
        .iter()
        .map(|s| (format!("{} vCPUs", s.vcpus), s.pages_per_sec))
        .collect();
    let p = dir.join("throughput_vs_vcpus.svg");
    files.extend(bars(
        &p,
        "Stage-2 fault throughput by vCPU count",
        "pages per second (all vCPUs)",
        &scaling,
    )?);

    let boots: Vec<(String, f64)> = b
        .boot
        .total_by_vcpus
        .iter()
        .map(|(v, x)| (format!("hello, {v} vCPUs"), x.median_us))
        .collect();
    let p = dir.join("boot_time.svg");
    files.extend(bars(&p, "Whole run of the hello guest", "milliseconds", &boots)?);
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
    files.extend(bars(
        &p,
        "Snapshot restore to running vCPUs",
        "milliseconds",
        &restore,
    )?);
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

const PART_COLORS: [RGBColor; 8] = [
    RGBColor(23, 190, 207),
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(127, 127, 127),
];

/// Horizontal stacked bars with min-max error bars and vertical reference
/// lines `(label, x)`; rows only for the data given (no empty rows); SVG
/// and PNG.
fn stacked(
    path: &Path,
    title: &str,
    unit: &str,
    rows: &[Stack],
    refs: &[(String, f64)],
) -> Result<Vec<PathBuf>> {
    let n = u32::try_from(rows.len().max(1)).unwrap_or(100).min(100);
    render(
        path,
        (1100, 150 + 48 * n),
        |root| stacked_on(&root, path, title, unit, rows, refs),
        |root| stacked_on(&root, path, title, unit, rows, refs),
    )
}

fn stacked_on<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    path: &Path,
    title: &str,
    unit: &str,
    rows: &[Stack],
    refs: &[(String, f64)],
) -> Result<()> {
    let err = draw_err(path);
    let n = rows.len().max(1);
    root.fill(&WHITE).map_err(&err)?;
    let top = rows
        .iter()
        .map(|r| r.max.max(r.parts.iter().map(|p| p.1).sum()))
        .chain(refs.iter().map(|r| r.1))
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.15;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(260)
        .build_cartesian_2d(0.0..top, (0..n.saturating_sub(1)).into_segmented())
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
                    ("hand-off", d.handoff_ms),
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
    files.extend(stacked(
        &p,
        "Migration downtime by part (median run; black: min-max over the repeats)",
        "milliseconds",
        &rows,
        &[("target: 5 ms".to_string(), 5.0)],
    )?);
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
        files.extend(stacked(
            &p,
            "Page-request latency while the push runs (exact, median run; black: min-max)",
            "microseconds",
            &lat,
            &[("target: 1 ms".to_string(), 1000.0)],
        )?);
    }
    Ok(files)
}
