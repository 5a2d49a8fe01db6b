//! `switchyard plan --plot`: the predicted throughput and cost of the best shape for every number of expert workers
//! the search considered, with the chosen plan singled out and the counts that miss the load or SLOs or do not fit
//! marked. The points are the search's own results ([`SearchResult::by_expert_workers`], which the table lists too),
//! never recomputed; the drawing is the simulator's chart set-up ([`switchyard_simulator::plot`]).
//!
//! [`SearchResult::by_expert_workers`]: crate::SearchResult::by_expert_workers

use std::path::Path;

use switchyard_simulator::plot::{write_charts, Color, Mark, Series, XyChart};

use crate::search::{ExpertWorkerOption, Shortfall, Target};
use crate::{Plan, PlanError};

/// What a device is called in the plan's words: GPUs, or processes of one host.
fn device_word(plan: &Plan) -> &'static str {
    if plan.hardware.shared_host {
        "process"
    } else {
        "GPU"
    }
}

/// The two panels `--plot` draws: output tokens/s, then device-hours per million output tokens, each against the
/// number of expert workers.
pub fn charts(plan: &Plan) -> Vec<XyChart> {
    let options = &plan.result.by_expert_workers;
    let device = device_word(plan);
    let (lowest, highest) = options
        .iter()
        .map(|o| o.expert_workers as f64)
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), n| (lo.min(n), hi.max(n)));
    let x_range = if lowest.is_finite() { lowest / 1.3..highest.max(lowest * 2.0) * 1.3 } else { 0.5..2.0 };
    let target = match plan.request.target {
        Target::Rate(r) => format!("{r} requests/s"),
        Target::Concurrency(c) => format!("{c} concurrent requests"),
        Target::Capacity => "capacity".into(),
    };
    let chosen = &plan.result.chosen;
    let chosen_label = format!(
        "chosen: {} attention + {} expert {device}s, {:.0} tok/s, {:.4} {device}-h/Mtok",
        chosen.shape.attention_workers,
        chosen.shape.expert_workers,
        chosen.output_tokens_per_s,
        chosen.device_hours_per_million_output_tokens().unwrap_or(f64::NAN)
    );
    type Value = fn(&ExpertWorkerOption) -> Option<f64>;
    // (expert workers, value) of the options `keep` selects: those with a value, or at 0 those without one.
    let points = |value: Value, keep: &dyn Fn(&ExpertWorkerOption) -> bool, at_zero: bool| -> Vec<(f64, f64)> {
        options
            .iter()
            .filter(|o| keep(o))
            .filter_map(|o| match value(o) {
                Some(v) if !at_zero => Some((o.expert_workers as f64, v)),
                None if at_zero => Some((o.expert_workers as f64, 0.0)),
                _ => None,
            })
            .collect()
    };
    let series = |label: &str, color, mark, points| Series { label: label.into(), color, mark, points };
    let missed = |o: &ExpertWorkerOption| o.shortfall() == Some(Shortfall::MissesTarget);
    let unfit = |o: &ExpertWorkerOption| o.shortfall() == Some(Shortfall::DoesNotFit);
    let with_load = !matches!(plan.request.target, Target::Capacity);
    let panel = |title: String, y_desc: String, value: Value, at_capacity: Value| {
        let mut all = vec![series(
            "meets the request (best shape per count)",
            Color::Blue,
            Mark::LineDots,
            points(value, &|o| o.shortfall().is_none(), false),
        )];
        if with_load {
            // With a load every shape that meets it outputs the load; what the shapes could give differs.
            all.push(series(
                "the same shape at its capacity (KV, --max-batch, TPOT SLO)",
                Color::Green,
                Mark::LineDots,
                points(at_capacity, &|o| o.shortfall().is_none(), false),
            ));
        }
        all.extend([
            series(
                "misses the load or SLOs (predicted at the most attention workers tried)",
                Color::Orange,
                Mark::Dots,
                points(value, &missed, false),
            ),
            series(
                "misses the load or SLOs (no prediction; drawn at 0)",
                Color::Orange,
                Mark::Crosses,
                points(value, &missed, true),
            ),
            series("does not fit in memory (drawn at 0)", Color::Red, Mark::Crosses, points(value, &unfit, true)),
            series(&chosen_label, Color::Black, Mark::Rings, points(value, &|o| o.chosen, false)),
        ]);
        XyChart {
            title,
            x_desc: format!("expert {device}s (log scale)"),
            y_desc,
            x_range: x_range.clone(),
            log_x: true,
            vertical_lines: Vec::new(),
            series: all,
        }
    };
    vec![
        panel(
            format!(
                "{} on {}, {target}: predicted output tokens/s of the best shape per count of expert {device}s",
                plan.model.name, plan.hardware.name
            ),
            "output tokens/s (whole cluster)".into(),
            |o| o.predicted.map(|p| p.output_tokens_per_s),
            |o| o.capacity.map(|p| p.output_tokens_per_s),
        ),
        panel(
            format!(
                "cost: {device}-hours per million output tokens, every {device} of the shape counted (the profiles \
                 carry no price, so no $)"
            ),
            format!("{device}-hours per million output tokens"),
            |o| o.predicted.map(|p| p.device_hours_per_million_output_tokens),
            |o| o.capacity.map(|p| p.device_hours_per_million_output_tokens),
        ),
    ]
}

/// Pixels per panel: room for the six legend entries above the data.
const PANEL_HEIGHT: u32 = 420;

/// Draws [`charts`] of `plan` into the SVG file `path`; the error names the file and what went wrong.
pub fn write_svg(path: &Path, plan: &Plan) -> Result<(), PlanError> {
    Ok(write_charts(path, &charts(plan), PANEL_HEIGHT)?)
}
