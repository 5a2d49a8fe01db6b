//! One SVG with what a planner looks at: output tokens/s and expert-load imbalance over time for every policy, the
//! per-expert load of one layer over time (the workload: skew and drift), and each policy's per-GPU load over time.
//!
//! The drawing set-up (SVG only, one width, panels stacked, captions, axes, legends, the palette, writing the file)
//! is public as [`XyChart`] and [`write_charts`], so that other tools draw their charts the same way:
//! `switchyard plan --plot` draws its throughput and cost against expert GPUs with them.

use std::path::Path;

use plotters::prelude::*;
// The palette below is `Color`; plotters' colour trait is needed for its methods only.
use plotters::style::Color as _;

use crate::error::SimError;
use crate::report::Report;

const WIDTH: u32 = 1200;
const LINE_HEIGHT: u32 = 240;
const HEAT_HEIGHT: u32 = 300;
/// Heatmaps merge rows (GPUs, by their maximum) and columns (points, by their mean) beyond these counts to keep
/// the SVG small.
const MAX_ROWS: usize = 128;
const MAX_COLUMNS: usize = 150;
/// Colour levels of the heatmaps.
const LEVELS: usize = 48;
/// Heatmap cells of dead GPUs (black) and of intervals without routed tokens (white).
const DEAD: i32 = -1;
const IDLE: i32 = -2;
const COLORS: [Color; 4] = [Color::Red, Color::Blue, Color::Green, Color::Black];

/// A colour of the charts' palette.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Color {
    /// Red.
    Red,
    /// Blue.
    Blue,
    /// Green.
    Green,
    /// Black.
    Black,
    /// Orange.
    Orange,
    /// Grey.
    Grey,
}

impl Color {
    fn rgb(self) -> RGBColor {
        match self {
            Color::Red => RGBColor(214, 39, 40),
            Color::Blue => RGBColor(31, 119, 180),
            Color::Green => RGBColor(44, 160, 44),
            Color::Black => BLACK,
            Color::Orange => RGBColor(255, 127, 14),
            Color::Grey => RGBColor(127, 127, 127),
        }
    }
}

/// How a series' points are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// A line through the points, in their order.
    Line,
    /// A line through the points with a dot on each.
    LineDots,
    /// A dot on each point.
    Dots,
    /// A cross on each point.
    Crosses,
    /// A large ring around each point: to single points out.
    Rings,
}

/// One series of an [`XyChart`].
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Its legend entry; empty for none.
    pub label: String,
    /// Its colour.
    pub color: Color,
    /// How its points are drawn.
    pub mark: Mark,
    /// `(x, y)` points.
    pub points: Vec<(f64, f64)>,
}

/// One panel: series of `(x, y)` points over a linear y axis from 0 and a linear or logarithmic x axis.
#[derive(Debug, Clone, PartialEq)]
pub struct XyChart {
    /// The caption.
    pub title: String,
    /// The x axis' description (with its unit).
    pub x_desc: String,
    /// The y axis' description (with its unit).
    pub y_desc: String,
    /// The x range shown.
    pub x_range: std::ops::Range<f64>,
    /// Whether the x axis is logarithmic (`x_range` then starts above 0).
    pub log_x: bool,
    /// Thin vertical lines at these x (events: failures).
    pub vertical_lines: Vec<f64>,
    /// The series, drawn in order.
    pub series: Vec<Series>,
}

/// Draws `charts` stacked into one SVG file at `path`, each `panel_height` pixels high (at least 200: the legend
/// takes the top of each panel, above the data).
pub fn write_charts(path: &Path, charts: &[XyChart], panel_height: u32) -> Result<(), SimError> {
    let panel_height = panel_height.max(200);
    let fail = |reason: String| SimError::Plot { path: path.to_path_buf(), reason };
    if charts.is_empty() {
        return Err(fail("no charts to draw".into()));
    }
    let svg = render(panel_height * charts.len() as u32, |root| {
        for (area, chart) in root.split_evenly((charts.len(), 1)).iter().zip(charts) {
            xy_chart(area, chart)?;
        }
        Ok(())
    })
    .map_err(fail)?;
    save(path, &svg)
}

/// Renders a drawing of `height` pixels (and the common width) to an SVG document.
fn render(height: u32, draw: impl FnOnce(&Area<'_>) -> DrawResult) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        draw(&root).map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// Checks, before any work, that `path` can take a plot: it names an `.svg` file in a directory that exists. The
/// error names the path and what is wrong.
pub fn check_svg_path(path: &Path) -> Result<(), SimError> {
    let fail = |reason: &str| SimError::Plot { path: path.to_path_buf(), reason: reason.into() };
    if path.extension().and_then(|e| e.to_str()) != Some("svg") {
        return Err(fail("only SVG is written; name the file .svg"));
    }
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) if !dir.is_dir() => Err(fail("its directory does not exist")),
        _ => Ok(()),
    }
}

/// Writes a rendered SVG document to `path` (see [`check_svg_path`]); the error names the path.
fn save(path: &Path, svg: &str) -> Result<(), SimError> {
    check_svg_path(path)?;
    std::fs::write(path, svg)
        .map_err(|e| SimError::Plot { path: path.to_path_buf(), reason: format!("cannot write the file: {e}") })
}

/// Draws the reports (one run per policy of the same workload) into `path`.
pub fn write_svg(path: &Path, reports: &[Report], plot_layer: usize) -> Result<(), SimError> {
    let fail = |reason: String| SimError::Plot { path: path.to_path_buf(), reason };
    let Some(first) = reports.first() else {
        return Err(fail("no runs to draw".into()));
    };
    let end = first.simulated_s;
    let failures: Vec<f64> = first.failures.iter().map(|f| f.at_s).collect();
    let over_time = |title: &str, value: fn(&crate::report::Point) -> Option<f64>| XyChart {
        title: title.into(),
        x_desc: "simulated s".into(),
        y_desc: String::new(),
        x_range: 0.0..end,
        log_x: false,
        vertical_lines: failures.clone(),
        series: reports
            .iter()
            .enumerate()
            .map(|(i, report)| Series {
                label: report.policy.name().into(),
                color: COLORS[i % COLORS.len()],
                mark: Mark::Line,
                points: report.series.iter().filter_map(|p| Some((p.t_s, value(p)?))).collect(),
            })
            .collect(),
    };
    let throughput = over_time("output tokens/s", |p| Some(p.output_tokens_per_s));
    let imbalance = over_time("max/mean GPU load (mean over layers)", |p| p.imbalance);
    let height = 2 * LINE_HEIGHT + HEAT_HEIGHT * (1 + reports.len() as u32);
    let svg = render(height, |root| {
        let (lines, heats) = root.split_vertically(2 * LINE_HEIGHT);
        let (top, bottom) = lines.split_vertically(LINE_HEIGHT);
        xy_chart(&top, &throughput)?;
        xy_chart(&bottom, &imbalance)?;
        let panels = heats.split_evenly((1 + reports.len(), 1));
        let expert_scale = Scale::of(std::iter::once(&first.heat.expert_load));
        heatmap(
            &panels[0],
            &format!(
                "expert load of MoE layer {plot_layer}: share x experts (1 = even), log colour {:.2} to {:.1}; the \
                 workload, same for every policy",
                expert_scale.low, expert_scale.high
            ),
            "expert",
            end,
            &first.heat.expert_load,
            expert_scale,
            false,
        )?;
        // One scale for every policy's GPU panel, so that colours compare across them.
        let gpu_scale = Scale::of(reports.iter().map(|r| &r.heat.gpu_load));
        for (panel, report) in panels[1..].iter().zip(reports) {
            heatmap(
                panel,
                &format!(
                    "{}: routed tokens per expert GPU / mean, in its hottest layer; log colour {:.2} to {:.1}; black: \
                     dead, white: no tokens",
                    report.policy, gpu_scale.low, gpu_scale.high
                ),
                "expert GPU",
                end,
                &report.heat.gpu_load,
                gpu_scale,
                true,
            )?;
        }
        Ok(())
    })
    .map_err(fail)?;
    save(path, &svg)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
type DrawResult = Result<(), Box<dyn std::error::Error + 'static>>;

/// Axis labels with as many decimals as the range needs; thousands as `k` from 10,000.
fn axis_label(value: f64, top: f64) -> String {
    if top >= 1e4 {
        format!("{:.0}k", value / 1e3)
    } else if top >= 100.0 {
        format!("{value:.0}")
    } else if top >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

fn xy_chart(area: &Area<'_>, chart: &XyChart) -> DrawResult {
    let highest = chart.series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(0.0f64, f64::max).max(1e-9);
    // Headroom for the legend (upper right, ~20 px per entry) so that it does not hide the data: the plotting area
    // is the panel less the caption, the margins and the x labels (~76 px).
    let entries = chart.series.iter().filter(|s| !s.label.is_empty() && !s.points.is_empty()).count();
    let plot_height = (area.dim_in_pixel().1 as f64 - 76.0).max(40.0);
    let legend = if entries == 0 { 0.0 } else { (20.0 * entries as f64 + 14.0) / plot_height };
    let top = highest * 1.05 / (1.0 - legend.min(0.6));
    let mut builder = ChartBuilder::on(area);
    builder.caption(&chart.title, ("sans-serif", 16)).margin(10).x_label_area_size(30).y_label_area_size(70);
    if chart.log_x {
        draw_xy(builder.build_cartesian_2d(chart.x_range.clone().log_scale(), 0.0..top)?, chart, top)
    } else {
        draw_xy(builder.build_cartesian_2d(chart.x_range.clone(), 0.0..top)?, chart, top)
    }
}

/// Axes, then the series and their legend, on a chart whose x coordinate is linear or logarithmic.
fn draw_xy<'a, X>(
    mut c: ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, plotters::coord::types::RangedCoordf64>>,
    chart: &XyChart,
    top: f64,
) -> DrawResult
where
    X: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
{
    c.configure_mesh()
        .x_desc(chart.x_desc.as_str())
        .y_desc(chart.y_desc.as_str())
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| axis_label(*y, top))
        .light_line_style(WHITE)
        .draw()?;
    for &at in &chart.vertical_lines {
        c.draw_series(LineSeries::new([(at, 0.0), (at, top)], BLACK.mix(0.4)))?;
    }
    let mut legend = false;
    // An empty series would only add a legend entry for nothing drawn.
    for series in chart.series.iter().filter(|s| !s.points.is_empty()) {
        let color = series.color.rgb();
        let points = series.points.iter().copied();
        let drawn = match series.mark {
            Mark::Line => c.draw_series(LineSeries::new(points, color.stroke_width(2)))?,
            Mark::LineDots => {
                c.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?;
                c.draw_series(points.map(|p| Circle::new(p, 4, color.filled())))?
            }
            Mark::Dots => c.draw_series(points.map(|p| Circle::new(p, 4, color.filled())))?,
            Mark::Crosses => c.draw_series(points.map(|p| Cross::new(p, 6, color.stroke_width(2))))?,
            Mark::Rings => c.draw_series(points.map(|p| Circle::new(p, 10, color.stroke_width(2))))?,
        };
        if series.label.is_empty() {
            continue;
        }
        legend = true;
        let mark = series.mark;
        drawn.label(series.label.as_str()).legend(move |(x, y)| -> DynElement<'static, SVGBackend<'a>, (i32, i32)> {
            match mark {
                Mark::Line | Mark::LineDots => {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)).into_dyn()
                }
                Mark::Dots => Circle::new((x + 10, y), 4, color.filled()).into_dyn(),
                Mark::Crosses => Cross::new((x + 10, y), 6, color.stroke_width(2)).into_dyn(),
                Mark::Rings => Circle::new((x + 10, y), 6, color.stroke_width(2)).into_dyn(),
            }
        });
    }
    if legend {
        c.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    Ok(())
}

/// The value range a heatmap's colours span (log scale).
#[derive(Clone, Copy)]
struct Scale {
    low: f32,
    high: f32,
}

impl Scale {
    /// From the smallest to the largest finite positive value (at least a factor of 2 wide).
    fn of<'a>(maps: impl Iterator<Item = &'a Vec<Vec<f32>>>) -> Self {
        let (low, high) = maps
            .flat_map(|m| m.iter().flatten().copied())
            .filter(|v| v.is_finite() && *v > 0.0)
            .fold((f32::INFINITY, 0.0f32), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let low = if low.is_finite() { low.max(1e-3) } else { 0.1 };
        Self { low, high: high.max(low * 2.0) }
    }

    /// 0..=LEVELS.
    fn level(self, v: f32) -> i32 {
        let h = (v.max(self.low).ln() - self.low.ln()) / (self.high.ln() - self.low.ln());
        (h.clamp(0.0, 1.0) * LEVELS as f32).round() as i32
    }
}

/// Columns are time points, rows the entries of each column; merged rows show their maximum (`merge_max`) or mean.
#[allow(clippy::too_many_arguments)]
fn heatmap(
    area: &Area<'_>,
    title: &str,
    rows_name: &str,
    end: f64,
    columns: &[Vec<f32>],
    scale: Scale,
    merge_max: bool,
) -> DrawResult {
    let rows = columns.first().map_or(0, Vec::len);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 15))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..end, 0.0..rows.max(1) as f64)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("simulated s")
        .y_desc(rows_name)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    if rows == 0 {
        return Ok(());
    }
    let row_group = rows.div_ceil(MAX_ROWS);
    let column_group = columns.len().div_ceil(MAX_COLUMNS);
    let width = end / columns.len() as f64;
    // Colour level per (row group, column group). Runs of one level along a row become one rectangle.
    let level = |group: &[Vec<f32>], span: std::ops::Range<usize>| -> i32 {
        let values = group.iter().flat_map(|column| column[span.clone()].iter().copied());
        let live: Vec<f32> = values.clone().filter(|v| v.is_finite() && *v >= 0.0).collect();
        if live.is_empty() {
            // Dead everywhere (black) or alive without routed tokens (white).
            return if values.clone().any(|v| v.is_nan()) { DEAD } else { IDLE };
        }
        let v = if merge_max {
            live.iter().copied().fold(0.0f32, f32::max)
        } else {
            live.iter().sum::<f32>() / live.len() as f32
        };
        scale.level(v)
    };
    let groups: Vec<&[Vec<f32>]> = columns.chunks(column_group).collect();
    let mut cells = Vec::new();
    for r in (0..rows).step_by(row_group) {
        let span = r..(r + row_group).min(rows);
        let levels: Vec<i32> = groups.iter().map(|group| level(group, span.clone())).collect();
        let mut start = 0;
        while start < levels.len() {
            let run = levels[start..].iter().take_while(|&&l| l == levels[start]).count();
            let color = match levels[start] {
                DEAD => BLACK,
                IDLE => WHITE,
                level => ViridisRGB::get_color(level as f32 / LEVELS as f32),
            };
            let x0 = (start * column_group) as f64 * width;
            let x1 = (((start + run) * column_group).min(columns.len())) as f64 * width;
            cells.push(Rectangle::new([(x0, r as f64), (x1, span.end as f64)], color.filled()));
            start += run;
        }
    }
    chart.draw_series(cells)?;
    Ok(())
}
