//! Line and bar charts and heat maps written as SVG and PNG (plotters; text in the bundled DejaVu Sans).

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

/// A plotting failure.
#[derive(Debug, thiserror::Error)]
#[error("plotting {path}: {reason}")]
pub struct PlotError {
    /// The file being written.
    pub path: PathBuf,
    /// What went wrong.
    pub reason: String,
}

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        // The font is compiled in, so registration cannot fail at run time.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            include_bytes!("../../assets/fonts/DejaVuSans.ttf"),
        );
    });
}

/// One line of a line chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// `(x, y)` points in order.
    pub points: Vec<(f64, f64)>,
}

const SIZE: (u32, u32) = (900, 540);

fn color(i: usize) -> RGBColor {
    const PALETTE: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    PALETTE[i % PALETTE.len()]
}

fn range(values: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = (hi - lo).max(1e-9);
    (lo - pad * span, hi + pad * span)
}

fn draw_lines<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (x0, x1) = range(
        series.iter().flat_map(|s| s.points.iter().map(|p| p.0)),
        0.02,
    );
    let (y0, y1) = range(
        series.iter().flat_map(|s| s.points.iter().map(|p| p.1)),
        0.08,
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, s) in series.iter().enumerate() {
        let c = color(i);
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), c.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(2)));
        chart
            .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, c.filled())))
            .map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

fn draw_bars<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    y_label: &str,
    bars: &[(String, f64)],
) -> Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let top = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1e-9) * 1.15;
    let n = bars.len().max(1);
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(70)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..n as f64, 0f64..top)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.26 {
                names.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
            Rectangle::new(
                [(i as f64 + 0.15, 0.0), (i as f64 + 0.85, *v)],
                color(i).filled(),
            )
        }))
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
            Text::new(
                format!("{v:.3}"),
                (i as f64 + 0.3, *v + top * 0.02),
                ("sans-serif", 14),
            )
        }))
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// Colour of a value in [0, 1]: white through light blue to dark blue.
fn heat(v: f64) -> RGBColor {
    let v = v.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * v).round() as u8;
    RGBColor(lerp(247.0, 8.0), lerp(251.0, 48.0), lerp(255.0, 107.0))
}

fn draw_heat_map<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    cells: &[Vec<Option<f64>>],
) -> Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let rows = cells.len().max(1);
    let cols = cells.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..cols as f64, rows as f64..0f64)
        .map_err(|e| e.to_string())?;
    let centre = |x: &f64| {
        let i = x.floor();
        if (x - i - 0.5).abs() < 0.26 {
            format!("{}", i as usize)
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(cols * 2 + 1)
        .y_labels(rows * 2 + 1)
        .x_label_formatter(&centre)
        .y_label_formatter(&centre)
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| e.to_string())?;
    // Colours span the data's own range, so that a few points of forgetting show.
    let (lo, hi) = range(cells.iter().flatten().flatten().copied(), 0.0);
    let shade = move |v: f64| heat(0.15 + 0.85 * (v - lo) / (hi - lo).max(1e-9));
    let filled = cells.iter().enumerate().flat_map(|(i, row)| {
        row.iter()
            .enumerate()
            .filter_map(move |(j, v)| v.map(|v| (i, j, v)))
    });
    chart
        .draw_series(filled.clone().map(|(i, j, v)| {
            Rectangle::new(
                [(j as f64, i as f64), (j as f64 + 1.0, i as f64 + 1.0)],
                shade(v).filled(),
            )
        }))
        .map_err(|e| e.to_string())?;
    let font = (rows.max(cols) as f64).recip() * 140.0;
    chart
        .draw_series(filled.map(|(i, j, v)| {
            let ink = if (v - lo) / (hi - lo).max(1e-9) > 0.5 {
                WHITE
            } else {
                BLACK
            };
            Text::new(
                format!("{:.0}", 100.0 * v),
                (j as f64 + 0.3, i as f64 + 0.35),
                ("sans-serif", font.clamp(10.0, 22.0))
                    .into_font()
                    .color(&ink),
            )
        }))
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

fn both(
    stem: &Path,
    draw_svg: impl Fn(DrawingArea<SVGBackend, Shift>) -> Result<(), String>,
    draw_png: impl Fn(DrawingArea<BitMapBackend, Shift>) -> Result<(), String>,
) -> Result<Vec<PathBuf>, PlotError> {
    register_font();
    let svg = stem.with_extension("svg");
    let png = stem.with_extension("png");
    draw_svg(SVGBackend::new(&svg, SIZE).into_drawing_area()).map_err(|reason| PlotError {
        path: svg.clone(),
        reason,
    })?;
    draw_png(BitMapBackend::new(&png, SIZE).into_drawing_area()).map_err(|reason| PlotError {
        path: png.clone(),
        reason,
    })?;
    Ok(vec![svg, png])
}

/// Writes a line chart to `stem.svg` and `stem.png`; returns the two paths.
pub fn line_chart(
    stem: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<Vec<PathBuf>, PlotError> {
    both(
        stem,
        |root| draw_lines(root, title, x_label, y_label, series),
        |root| draw_lines(root, title, x_label, y_label, series),
    )
}

/// Writes a bar chart to `stem.svg` and `stem.png`; returns the two paths.
pub fn bar_chart(
    stem: &Path,
    title: &str,
    y_label: &str,
    bars: &[(String, f64)],
) -> Result<Vec<PathBuf>, PlotError> {
    both(
        stem,
        |root| draw_bars(root, title, y_label, bars),
        |root| draw_bars(root, title, y_label, bars),
    )
}

/// Writes a heat map of `cells` (row `i`, column `j`; values in [0, 1], drawn as percent;
/// `None` cells stay blank) to `stem.svg` and `stem.png`; returns the two paths.
pub fn heat_map(
    stem: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    cells: &[Vec<Option<f64>>],
) -> Result<Vec<PathBuf>, PlotError> {
    both(
        stem,
        |root| draw_heat_map(root, title, x_label, y_label, cells),
        |root| draw_heat_map(root, title, x_label, y_label, cells),
    )
}
