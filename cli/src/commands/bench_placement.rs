//! `switchyard bench placement`: the placement solver on synthetic Zipf routing traces (128 experts x 24 layers by
//! default) for every combination of skew, expert workers and redundant slots.
//!
//! For each combination it reports max/mean load per worker of a from-scratch placement (averaged over layers, and
//! the worst layer), then lets popularity drift window by window and rebalances incrementally from the previous
//! placement, reporting the expert weights each rebalance moves next to what a from-scratch placement of the same
//! window would move relative to the same previous placement. Measuring starts after a warm-up of incremental
//! rebalances: right after a from-scratch start the previous placement is itself the (deterministic) from-scratch
//! answer for nearly the same loads, which no running cluster is in. Nothing here is timed, so the figures do not
//! depend on the machine.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use switchyard_coordinator::traces::{replay, Replay, TraceConfig, ZipfTrace};
use switchyard_coordinator::{PlacementProblem, Solver};

/// FP8 bytes of one Llama 4 Maverick routed expert: gate, up and down projections of 5120 x 8192.
const MAVERICK_EXPERT_BYTES: u64 = 3 * 5120 * 8192;

/// Flags of `bench placement`.
#[derive(clap::Args)]
pub struct Args {
    /// Zipf skews of the routing traces.
    #[arg(long, value_delimiter = ',', default_value = "0.5,1.0,1.5")]
    skews: Vec<f64>,
    /// Expert worker counts.
    #[arg(long, value_delimiter = ',', default_value = "8,16,32,64")]
    workers: Vec<usize>,
    /// Redundant slots per layer.
    #[arg(long, value_delimiter = ',', default_value = "0,16,32,64")]
    redundant_slots: Vec<usize>,
    /// Routed experts per layer.
    #[arg(long, default_value_t = 128)]
    experts: usize,
    /// MoE layers.
    #[arg(long, default_value_t = 24)]
    layers: usize,
    /// Nodes the workers run on (worker `i` on node `i % K`).
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Incremental rebalances before measuring.
    #[arg(long, default_value_t = 8)]
    warmup_windows: usize,
    /// Measured rebalances.
    #[arg(long, default_value_t = 8)]
    windows: usize,
    /// Popularity swaps per layer per window.
    #[arg(long, default_value_t = 4)]
    swaps_per_window: usize,
    /// Seed of the traces.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Bytes of one expert's weights (default: a Maverick expert in FP8).
    #[arg(long, default_value_t = MAVERICK_EXPERT_BYTES)]
    bytes_per_expert: u64,
    /// Also write the results as JSON.
    #[arg(long)]
    output_json: Option<PathBuf>,
}

struct Row {
    skew: f64,
    workers: usize,
    redundant: usize,
    slots: usize,
    replay: Replay,
}

impl Row {
    fn mean_incremental_imbalance(&self) -> f64 {
        mean(self.replay.rebalances.iter().map(|r| r.incremental_imbalance))
    }
    fn mean_incremental_added(&self) -> f64 {
        mean(self.replay.rebalances.iter().map(|r| r.incremental_added as f64))
    }
    fn mean_scratch_added(&self) -> f64 {
        mean(self.replay.rebalances.iter().map(|r| r.scratch_added as f64))
    }
    /// The largest incremental/from-scratch ratio of one rebalance.
    fn worst_ratio(&self) -> f64 {
        self.replay.rebalances.iter().map(|r| ratio(r.incremental_added, r.scratch_added)).fold(0.0, f64::max)
    }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, count) = values.fold((0.0, 0usize), |(s, c), v| (s + v, c + 1));
    if count == 0 {
        0.0
    } else {
        sum / count as f64
    }
}

fn ratio(incremental: usize, scratch: usize) -> f64 {
    match (incremental, scratch) {
        (0, _) => 0.0,
        (_, 0) => f64::INFINITY,
        (i, s) => i as f64 / s as f64,
    }
}

/// Runs `bench placement`.
pub fn run(args: Args) -> Result<()> {
    if args.experts == 0 || args.layers == 0 || args.nodes == 0 {
        bail!("--experts, --layers and --nodes must be at least 1");
    }
    if let Some(skew) = args.skews.iter().find(|s| !s.is_finite() || **s < 0.0) {
        bail!("--skews must be finite and not negative, got {skew}");
    }
    let experts = u32::try_from(args.experts).context("--experts is too large")?;
    let moe_layers: Vec<u32> = (0..args.layers as u32).map(|i| 2 * i + 1).collect();
    let solver = Solver::default();
    let gb = args.bytes_per_expert as f64 / 1e9;
    let started = Instant::now();
    println!(
        "{} experts x {} layers, {} node(s), {} warm-up + {} measured rebalances, {} swaps/layer/window, seed {}; \
         expert = {:.1} MB",
        args.experts,
        args.layers,
        args.nodes,
        args.warmup_windows,
        args.windows,
        args.swaps_per_window,
        args.seed,
        args.bytes_per_expert as f64 / 1e6
    );
    println!(
        "{:>5} {:>7} {:>9} {:>5} | {:>8} {:>8} {:>8} | {:>8} | {:>10} {:>10} {:>7} {:>7}",
        "zipf",
        "workers",
        "redundant",
        "slots",
        "max/mean",
        "worst",
        "bound",
        "rebal",
        "moved GB",
        "scratch GB",
        "ratio",
        "worst"
    );
    let mut rows = Vec::new();
    for &skew in &args.skews {
        for &workers in &args.workers {
            for &redundant in &args.redundant_slots {
                if workers == 0 || redundant > args.experts * (workers - 1) {
                    println!("{skew:>5.1} {workers:>7} {redundant:>9}   skipped: more replicas than workers can hold");
                    continue;
                }
                let slots = PlacementProblem::equal_slots(experts, redundant, workers);
                let worker_slots = PlacementProblem::uniform_workers(workers, slots, args.nodes);
                let mut trace = ZipfTrace::new(TraceConfig {
                    experts: args.experts,
                    layers: args.layers,
                    swaps_per_window: args.swaps_per_window,
                    ..TraceConfig::maverick(skew, args.seed)
                });
                let replay = replay(
                    &solver,
                    &mut trace,
                    &moe_layers,
                    &worker_slots,
                    redundant,
                    args.warmup_windows,
                    args.windows,
                )
                .with_context(|| format!("zipf {skew} on {workers} workers with {redundant} redundant slots"))?;
                let row = Row { skew, workers, redundant, slots, replay };
                println!(
                    "{:>5.1} {:>7} {:>9} {:>5} | {:>8.4} {:>8.4} {:>8.4} | {:>8.4} | {:>10.2} {:>10.2} {:>7.3} {:>7.3}",
                    skew,
                    workers,
                    redundant,
                    slots,
                    row.replay.initial_imbalance,
                    row.replay.initial_worst_layer,
                    row.replay.initial_bound,
                    row.mean_incremental_imbalance(),
                    row.mean_incremental_added() * gb,
                    row.mean_scratch_added() * gb,
                    row.mean_incremental_added() / row.mean_scratch_added().max(f64::MIN_POSITIVE),
                    row.worst_ratio()
                );
                rows.push(row);
            }
        }
    }
    println!(
        "max/mean: from-scratch placement, mean over layers (worst: worst layer; bound: lower bound); rebal: mean \
         max/mean after incremental rebalances; moved/scratch GB: mean per rebalance, all layers; ratio: mean moved / \
         mean scratch, worst: largest of one rebalance"
    );

    let mut missed = Vec::new();
    match rows.iter().find(|r| r.skew == 1.0 && r.workers == 32 && r.redundant == 32) {
        Some(row) => {
            let worst = row.replay.initial_imbalance.max(row.mean_incremental_imbalance());
            let met = worst <= 1.02;
            println!(
                "target: max/mean <= 1.02 at zipf 1.0, 32 workers, 32 redundant slots: {:.4} from scratch, {:.4} \
                 rebalanced: {}",
                row.replay.initial_imbalance,
                row.mean_incremental_imbalance(),
                if met { "met" } else { "MISSED" }
            );
            if !met {
                missed.push(format!("max/mean {worst:.4} > 1.02 at zipf 1.0 / 32 workers / 32 redundant"));
            }
        }
        None => println!("target: max/mean <= 1.02 at zipf 1.0, 32 workers, 32 redundant slots: not in this run"),
    }
    let worst = rows.iter().max_by(|a, b| a.worst_ratio().total_cmp(&b.worst_ratio()));
    if let Some(row) = worst {
        let met = row.worst_ratio() <= 0.1;
        println!(
            "target: each rebalance moves <= 0.1 of a from-scratch placement: worst {:.3} (zipf {}, {} workers, {} \
             redundant): {}",
            row.worst_ratio(),
            row.skew,
            row.workers,
            row.redundant,
            if met { "met" } else { "MISSED" }
        );
        if !met {
            missed.push(format!("a rebalance moved {:.3} of a from-scratch placement", row.worst_ratio()));
        }
    }
    println!("solved in {:.2} s", started.elapsed().as_secs_f64());

    if let Some(path) = &args.output_json {
        let json = serde_json::json!({
            "benchmark": "placement",
            "experts": args.experts,
            "layers": args.layers,
            "nodes": args.nodes,
            "warmup_windows": args.warmup_windows,
            "windows": args.windows,
            "swaps_per_window": args.swaps_per_window,
            "seed": args.seed,
            "bytes_per_expert": args.bytes_per_expert,
            "rows": rows.iter().map(|row| serde_json::json!({
                "zipf": row.skew,
                "workers": row.workers,
                "redundant_slots": row.redundant,
                "slots_per_worker": row.slots,
                "max_over_mean": row.replay.initial_imbalance,
                "worst_layer_max_over_mean": row.replay.initial_worst_layer,
                "lower_bound_over_mean": row.replay.initial_bound,
                "rebalanced_max_over_mean": row.mean_incremental_imbalance(),
                "rebalances": row.replay.rebalances.iter().map(|r| serde_json::json!({
                    "window": r.window,
                    "incremental_max_over_mean": r.incremental_imbalance,
                    "incremental_moved_replicas": r.incremental_added,
                    "incremental_moved_bytes": r.incremental_added as u64 * args.bytes_per_expert,
                    "scratch_max_over_mean": r.scratch_imbalance,
                    "scratch_moved_replicas": r.scratch_added,
                    "scratch_moved_bytes": r.scratch_added as u64 * args.bytes_per_expert,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "targets_missed": missed,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !missed.is_empty() {
        bail!("placement targets missed: {}", missed.join("; "));
    }
    Ok(())
}
