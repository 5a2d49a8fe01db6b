//! One SVG with what a planner looks at: output tokens/s and expert-load imbalance over time for every policy, the
//! per-expert load of one layer over time (the workload: skew and drift), and each policy's per-GPU load over time.

use std::path::Path;

use plotters::prelude::*;

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
const COLORS: [RGBColor; 4] = [RGBColor(214, 39, 40), RGBColor(31, 119, 180), RGBColor(44, 160, 44), BLACK];

/// Draws the reports (one run per policy of the same workload) into `path`.
pub fn write_svg(path: &Path, reports: &[Report], plot_layer: usize) -> Result<(), SimError> {
    let fail = |reason: String| SimError::Plot { path: path.to_path_buf(), reason };
    let Some(first) = reports.first() else {
        return Err(fail("no runs to draw".into()));
    };
    let height = 2 * LINE_HEIGHT + HEAT_HEIGHT * (1 + reports.len() as u32);
    let root = SVGBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
    let (lines, heats) = root.split_vertically(2 * LINE_HEIGHT);
    let (throughput, imbalance) = lines.split_vertically(LINE_HEIGHT);
    let end = first.simulated_s;
    let failures: Vec<f64> = first.failures.iter().map(|f| f.at_s).collect();

    line_chart(&throughput, "output tokens/s", end, &failures, reports, |p| Some(p.output_tokens_per_s))
        .map_err(|e| fail(e.to_string()))?;
    line_chart(&imbalance, "max/mean GPU load (mean over layers)", end, &failures, reports, |p| p.imbalance)
        .map_err(|e| fail(e.to_string()))?;

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
    )
    .map_err(|e| fail(e.to_string()))?;
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
        )
        .map_err(|e| fail(e.to_string()))?;
    }
    root.present().map_err(|e| fail(e.to_string()))?;
    Ok(())
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
type DrawResult = Result<(), Box<dyn std::error::Error + 'static>>;

fn line_chart(
    area: &Area<'_>,
    title: &str,
    end: f64,
    failures: &[f64],
    reports: &[Report],
    value: impl Fn(&crate::report::Point) -> Option<f64>,
) -> DrawResult {
    let top = reports.iter().flat_map(|r| r.series.iter().filter_map(&value)).fold(0.0f64, f64::max).max(1e-9) * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..end, 0.0..top)?;
    chart
        .configure_mesh()
        .x_desc("simulated s")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| {
            if top >= 1e4 {
                format!("{:.0}k", y / 1e3)
            } else {
                format!("{y:.2}")
            }
        })
        .light_line_style(WHITE)
        .draw()?;
    for &at in failures {
        chart.draw_series(LineSeries::new([(at, 0.0), (at, top)], BLACK.mix(0.4)))?;
    }
    for (i, report) in reports.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<(f64, f64)> = report.series.iter().filter_map(|p| Some((p.t_s, value(p)?))).collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(report.policy.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
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
