//! `switchyard placement`: the expert placement, offline (`solve`: the coordinator's solver on a loads file) and live
//! (`show`: what a coordinator serves).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use switchyard_coordinator::{Placement, PlacementProblem, Solution, Solver, SolverOptions, WorkerPlacement};
use switchyard_proto::v1::coordinator_client::CoordinatorClient;
use switchyard_proto::v1::GetPlacementRequest;

use crate::serving;

/// Flags of `placement`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    which: Which,
}

#[derive(clap::Subcommand)]
enum Which {
    /// Place experts offline from routed-token counts, with the coordinator's solver.
    Solve(SolveArgs),
    /// Print the placement a coordinator serves.
    Show(ShowArgs),
}

#[derive(clap::Args)]
struct SolveArgs {
    /// Routed tokens per expert per layer: `{"loads": [[tokens per expert] per layer]}`.
    #[arg(long)]
    loads: PathBuf,
    /// Expert workers (`ew-0` ... `ew-{N-1}`).
    #[arg(long)]
    workers: usize,
    /// Replicas beyond one per expert, per layer, given to the hottest experts.
    #[arg(long, default_value_t = 0)]
    redundant_slots: usize,
    /// Nodes the workers run on: worker `i` is on node `i % K`; an expert's replicas are spread across nodes.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Expert slots per worker per layer. Default: `ceil((experts + redundant) / workers)`.
    #[arg(long)]
    slots_per_worker: Option<usize>,
    /// The placement in use (a previous `--output-json`): replicas stay where they are when they can.
    #[arg(long)]
    current: Option<PathBuf>,
    /// Where to write the placement: `{"layers": [{"workers": [[expert ids in that worker's slots], ...]}, ...]}`.
    #[arg(long)]
    output_json: PathBuf,
    /// Solutions within this fraction above the best possible maximum load count as equal (fewest moves wins).
    #[arg(long, default_value_t = SolverOptions::default().balance_tolerance)]
    balance_tolerance: f64,
}

#[derive(clap::Args)]
struct ShowArgs {
    /// Coordinator endpoint, e.g. `http://127.0.0.1:7000`.
    #[arg(long, env = "SWITCHYARD_COORDINATOR")]
    coordinator: String,
    /// Seconds to wait for the coordinator to answer.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
}

/// Runs `placement`.
pub fn run(args: Args) -> Result<()> {
    match args.which {
        Which::Solve(args) => solve(args),
        Which::Show(args) => show(args),
    }
}

#[derive(Deserialize)]
struct LoadsFile {
    loads: Vec<Vec<f64>>,
}

/// One layer of the output file. Only `workers` is read back (`--current`); the rest is for people and tools.
#[derive(Serialize, Deserialize)]
struct LayerOut {
    /// Expert ids per worker.
    workers: Vec<Vec<u32>>,
    /// Routed tokens per worker, each expert's tokens split evenly over its replicas.
    #[serde(default, skip_deserializing)]
    worker_tokens: Vec<f64>,
    /// Replicas per expert.
    #[serde(default, skip_deserializing)]
    replicas: Vec<u32>,
    #[serde(default, skip_deserializing)]
    max_tokens: f64,
    #[serde(default, skip_deserializing)]
    mean_tokens: f64,
}

#[derive(Serialize, Deserialize)]
struct PlacementOut {
    layers: Vec<LayerOut>,
}

fn read_loads(path: &Path) -> Result<Vec<Vec<f64>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading loads file {}", path.display()))?;
    let file: LoadsFile = serde_json::from_str(&text).with_context(|| {
        format!("loads file {}: expected {{\"loads\": [[tokens per expert] per layer]}}", path.display())
    })?;
    let Some(experts) = file.loads.first().map(Vec::len) else {
        bail!("loads file {}: no layers", path.display());
    };
    if let Some((layer, row)) = file.loads.iter().enumerate().find(|(_, row)| row.len() != experts) {
        bail!("loads file {}: layer {layer} has {} experts, layer 0 has {experts}", path.display(), row.len());
    }
    Ok(file.loads)
}

/// Reads a previous `--output-json` as the placement in use (worker `i` is `ew-i`, layer `l` is layer `l`).
fn read_current(path: &Path) -> Result<Placement> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading current placement {}", path.display()))?;
    let file: PlacementOut = serde_json::from_str(&text).with_context(|| {
        format!("current placement {}: expected {{\"layers\": [{{\"workers\": [[expert ids]]}}]}}", path.display())
    })?;
    let workers = file.layers.iter().map(|l| l.workers.len()).max().unwrap_or(0);
    let workers = (0..workers)
        .map(|w| WorkerPlacement {
            worker_id: format!("ew-{w}"),
            endpoint: String::new(),
            experts: file
                .layers
                .iter()
                .enumerate()
                .map(|(layer, l)| (layer as u32, l.workers.get(w).cloned().unwrap_or_default()))
                .collect(),
        })
        .collect();
    Ok(Placement { epoch: 0, workers })
}

fn solve(args: SolveArgs) -> Result<()> {
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    if !(args.balance_tolerance.is_finite() && args.balance_tolerance >= 0.0) {
        bail!("--balance-tolerance must be a fraction >= 0, got {}", args.balance_tolerance);
    }
    let loads = read_loads(&args.loads)?;
    let experts = u32::try_from(loads[0].len()).context("too many experts")?;
    let slots = args
        .slots_per_worker
        .unwrap_or_else(|| PlacementProblem::equal_slots(experts, args.redundant_slots, args.workers));
    let problem = PlacementProblem {
        experts,
        loads: loads.into_iter().enumerate().map(|(l, row)| (l as u32, row)).collect(),
        workers: PlacementProblem::uniform_workers(args.workers, slots, args.nodes),
        redundant_slots: args.redundant_slots,
    };
    let solver = Solver::new(SolverOptions { balance_tolerance: args.balance_tolerance, ..SolverOptions::default() });
    let current = args.current.as_deref().map(read_current).transpose()?;
    let solution = match &current {
        Some(current) => solver.solve(&problem, current),
        None => solver.solve_from_scratch(&problem, 1),
    }
    .with_context(|| format!("placing {experts} experts on {} workers x {slots} slots", args.workers))?;

    let out = PlacementOut {
        layers: solution
            .layers
            .iter()
            .map(|(layer, stats)| LayerOut {
                workers: solution.placement.workers.iter().map(|w| w.experts[layer].clone()).collect(),
                worker_tokens: stats.worker_loads.clone(),
                replicas: stats.replicas.clone(),
                max_tokens: stats.max_load,
                mean_tokens: stats.mean_load,
            })
            .collect(),
    };
    let json = serde_json::to_string_pretty(&out)?;
    std::fs::write(&args.output_json, json).with_context(|| format!("writing {}", args.output_json.display()))?;
    print!("{}", summary(&problem, &solution, slots, args.nodes, current.as_ref()));
    Ok(())
}

fn summary(
    problem: &PlacementProblem,
    solution: &Solution,
    slots: usize,
    nodes: usize,
    current: Option<&Placement>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} layers: {} experts + {} redundant replicas on {} workers x {slots} slots, {nodes} node(s)",
        problem.loads.len(),
        problem.experts,
        problem.redundant_slots,
        problem.workers.len()
    );
    let _ = writeln!(
        out,
        "{:>5} {:>14} {:>14} {:>9} {:>12} {:>7}",
        "layer", "max tokens", "mean tokens", "max/mean", "bound/mean", "moved"
    );
    for (layer, stats) in &solution.layers {
        let bound = if stats.mean_load > 0.0 { stats.lower_bound / stats.mean_load } else { 1.0 };
        let moved = if current.is_some() { stats.added_replicas.to_string() } else { "-".into() };
        let _ = writeln!(
            out,
            "{layer:>5} {:>14.1} {:>14.1} {:>9.4} {:>12.4} {moved:>7}",
            stats.max_load,
            stats.mean_load,
            stats.imbalance(),
            bound
        );
    }
    let _ = write!(out, "mean max/mean over layers: {:.4}", solution.mean_imbalance());
    if current.is_some() {
        let _ = write!(out, "; replicas moved: {}", solution.added_replicas());
    }
    out.push('\n');
    out
}

fn show(args: ShowArgs) -> Result<()> {
    let wait = Duration::try_from_secs_f64(args.timeout).context("--timeout must be a number of seconds")?;
    let endpoint = args.coordinator.clone();
    let served = serving::runtime(1)?.block_on(async move {
        tokio::time::timeout(wait, async {
            let mut client = CoordinatorClient::connect(endpoint.clone())
                .await
                .with_context(|| format!("connecting to the coordinator at {endpoint}"))?;
            let reply = client
                .get_placement(GetPlacementRequest {})
                .await
                .with_context(|| format!("asking the coordinator at {endpoint} for the placement"))?;
            anyhow::Ok(reply.into_inner())
        })
        .await
        .with_context(|| {
            format!("the coordinator at {} did not answer within {:.1} s", args.coordinator, args.timeout)
        })?
    })?;
    print!("{}", table(&Placement::from_proto(&served)));
    Ok(())
}

/// One row per worker and group of layers holding the same experts; expert runs shown as ranges.
fn table(placement: &Placement) -> String {
    let layers: std::collections::BTreeSet<u32> =
        placement.workers.iter().flat_map(|w| w.experts.keys().copied()).collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "epoch {}: {} expert workers, {} MoE layers",
        placement.epoch,
        placement.workers.len(),
        layers.len()
    );
    let id_width = placement.workers.iter().map(|w| w.worker_id.len()).max().unwrap_or(0).max(6);
    let endpoint_width = placement.workers.iter().map(|w| w.endpoint.len()).max().unwrap_or(0).max(8);
    let _ = writeln!(out, "{:<id_width$}  {:<endpoint_width$}  {:<20}  experts", "worker", "endpoint", "layers");
    for worker in &placement.workers {
        let mut groups: BTreeMap<&[u32], Vec<u32>> = BTreeMap::new();
        for (&layer, experts) in &worker.experts {
            groups.entry(experts.as_slice()).or_default().push(layer);
        }
        let mut groups: Vec<(&[u32], Vec<u32>)> = groups.into_iter().collect();
        groups.sort_by_key(|(_, layers)| layers.first().copied());
        if groups.is_empty() {
            let _ =
                writeln!(out, "{:<id_width$}  {:<endpoint_width$}  {:<20}  -", worker.worker_id, worker.endpoint, "-");
        }
        for (i, (experts, layers)) in groups.iter().enumerate() {
            let (id, endpoint) = if i == 0 { (worker.worker_id.as_str(), worker.endpoint.as_str()) } else { ("", "") };
            let _ = writeln!(
                out,
                "{id:<id_width$}  {endpoint:<endpoint_width$}  {:<20}  {} ({})",
                ranges(layers),
                ranges(experts),
                experts.len()
            );
        }
    }
    out
}

/// `0-3,7,9-10` for `[0, 1, 2, 3, 7, 9, 10]` (sorted first); `-` when empty.
fn ranges(values: &[u32]) -> String {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
        i += 1;
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_compress_runs() {
        assert_eq!(ranges(&[9, 0, 1, 2, 3, 7, 10]), "0-3,7,9-10");
        assert_eq!(ranges(&[5]), "5");
        assert_eq!(ranges(&[]), "-");
    }

    #[test]
    fn the_table_groups_layers_with_the_same_experts() {
        let placement = Placement::contiguous(&[1, 3, 5], 8, 2, 7).expect("placement");
        let text = table(&placement);
        assert!(text.starts_with("epoch 7: 2 expert workers, 3 MoE layers"), "{text}");
        assert!(text.contains("1,3,5"), "{text}");
        assert!(text.contains("0-3 (4)") && text.contains("4-7 (4)"), "{text}");
    }
}
