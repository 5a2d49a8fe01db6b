//! `switchyard placement`: the expert placement, offline (`solve`: the coordinator's solver on a loads file) and live
//! (`show`: what a coordinator serves or the cluster store holds; `rebalance`: ask the leading coordinator to
//! re-place now).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use switchyard_coordinator::store::{self, ClusterStore, CoordinatorStatus, RebalanceRequest};
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
    /// Print the placement a coordinator serves, or the cluster store's placement and coordinator status.
    Show(ShowArgs),
    /// Ask the leading coordinator to re-place the experts now, and wait for the new placement epoch.
    Rebalance(RebalanceArgs),
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
    /// Coordinator endpoint, e.g. `http://127.0.0.1:7000`: print the placement it serves.
    #[arg(long, env = "SWITCHYARD_COORDINATOR", required_unless_present = "store", conflicts_with = "store")]
    coordinator: Option<String>,
    /// The cluster store (`etcd://HOST:PORT[,...]`, or `http://HOST:PORT` of a coordinator hosting it): print its
    /// placement and the leading coordinator's status.
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// The cluster's name in the store.
    #[arg(long, default_value = "default", requires = "store")]
    cluster: String,
    /// Seconds to wait for the coordinator or the store to answer.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
}

#[derive(clap::Args)]
struct RebalanceArgs {
    /// The cluster store (`etcd://HOST:PORT[,...]`, or `http://HOST:PORT` of a coordinator hosting it).
    #[arg(long, value_name = "URL")]
    store: String,
    /// The cluster's name in the store.
    #[arg(long, default_value = "default")]
    cluster: String,
    /// Loads to place for instead of the measured ones, as for `placement solve`: `{"loads": [[tokens per expert]
    /// per MoE layer]}`, row `i` being the `i`-th MoE layer. Default: the loads the attention workers report.
    #[arg(long)]
    loads: Option<PathBuf>,
    /// How long to wait for the new placement epoch, in milliseconds (0: only write the request).
    #[arg(long, default_value_t = 30_000)]
    wait_ms: u64,
}

/// Runs `placement`.
pub fn run(args: Args) -> Result<()> {
    match args.which {
        Which::Solve(args) => solve(args),
        Which::Show(args) => show(args),
        Which::Rebalance(args) => rebalance(args),
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
    let Some(endpoint) = args.coordinator.clone() else {
        let url = args.store.clone().unwrap_or_default();
        return serving::runtime(1)?.block_on(show_store(&url, &args.cluster, wait));
    };
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
            format!(
                "the coordinator at {} did not answer within {:.1} s",
                args.coordinator.unwrap_or_default(),
                args.timeout
            )
        })?
    })?;
    print!("{}", table(&Placement::from_proto(&served)));
    Ok(())
}

/// Opens cluster `cluster` of the store at `url`, waiting up to `wait` for the store to answer.
async fn open_cluster(url: &str, cluster: &str, wait: Duration) -> Result<ClusterStore> {
    let store =
        store::connect_within(url, wait).await.with_context(|| format!("connecting to the cluster store {url}"))?;
    ClusterStore::new(store, cluster).with_context(|| format!("opening cluster {cluster}"))
}

async fn show_store(url: &str, cluster: &str, wait: Duration) -> Result<()> {
    let state = open_cluster(url, cluster, wait).await?;
    let placement = state.placement().await.context("reading the placement")?;
    let status = state.coordinator_status().await.context("reading the coordinator status")?;
    match placement {
        Some(stored) => print!("{}", table(&stored.placement)),
        None => println!("cluster {cluster}: no placement yet"),
    }
    println!("{}", status_line(status.as_ref()));
    Ok(())
}

/// `coordinator: leader c-0, serving, epoch 3` (and the problem, if any).
fn status_line(status: Option<&CoordinatorStatus>) -> String {
    match status {
        None => "coordinator: no status yet (no coordinator has led this cluster)".to_string(),
        Some(status) => {
            let mut line = format!("coordinator: leader {}, {}, epoch {}", status.leader, status.state, status.epoch);
            if let Some(problem) = &status.problem {
                line.push_str(&format!(" ({problem})"));
            }
            line
        }
    }
}

fn rebalance(args: RebalanceArgs) -> Result<()> {
    // A bad loads file fails before anything is written.
    let rows = args.loads.as_deref().map(read_loads).transpose()?;
    serving::runtime(1)?.block_on(async move {
        let wait = Duration::from_millis(args.wait_ms);
        let state = open_cluster(&args.store, &args.cluster, wait.max(Duration::from_secs(10))).await?;
        let Some(current) = state.placement().await.context("reading the placement")? else {
            let status = state.coordinator_status().await.context("reading the coordinator status")?;
            bail!(
                "cluster {} has no placement yet, so there is nothing to rebalance; {}",
                args.cluster,
                status_line(status.as_ref())
            );
        };
        let before = current.placement.epoch;
        let loads = rows.map(|rows| layer_loads(&current.placement, rows, args.loads.as_deref())).transpose()?;
        let reason = match &args.loads {
            Some(path) => format!("switchyard placement rebalance --loads {}", path.display()),
            None => "switchyard placement rebalance".to_string(),
        };
        state.request_rebalance(&RebalanceRequest { loads, reason }).await.context("writing the rebalance request")?;
        if wait.is_zero() {
            println!("rebalance requested at epoch {before}");
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let request_pending = state.rebalance_request().await.context("reading the rebalance request")?.is_some();
            let now = state.placement().await.context("reading the placement")?.map_or(0, |p| p.placement.epoch);
            if now > before {
                println!("placement epoch {now} (was {before})");
                return Ok(());
            }
            if !request_pending {
                // The coordinator deletes a request it handled after publishing: gone without a new epoch is a
                // refusal.
                let status = state.coordinator_status().await.context("reading the coordinator status")?;
                bail!("the coordinator took the request but published no new epoch; {}", status_line(status.as_ref()));
            }
            if tokio::time::Instant::now() >= deadline {
                let status = state.coordinator_status().await.context("reading the coordinator status")?;
                bail!(
                    "no new placement epoch within {:.1} s (still epoch {before}); the request stays in the store \
                     for the next leading coordinator; {}",
                    wait.as_secs_f64(),
                    status_line(status.as_ref())
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// The loads file's rows keyed by MoE layer: row `i` is the `i`-th MoE layer of `placement`.
fn layer_loads(placement: &Placement, rows: Vec<Vec<f64>>, path: Option<&Path>) -> Result<BTreeMap<u32, Vec<f64>>> {
    let file = path.map(|p| p.display().to_string()).unwrap_or_default();
    let layers: std::collections::BTreeSet<u32> =
        placement.workers.iter().flat_map(|w| w.experts.keys().copied()).collect();
    let experts = placement.workers.iter().flat_map(|w| w.experts.values().flatten()).max().map_or(0, |&e| e + 1);
    if rows.len() != layers.len() {
        bail!("loads file {file}: {} layers, but the model has {} MoE layers", rows.len(), layers.len());
    }
    if rows[0].len() != experts as usize {
        bail!("loads file {file}: {} experts per layer, but the model has {experts}", rows[0].len());
    }
    if let Some(load) = rows.iter().flatten().find(|l| !l.is_finite() || **l < 0.0) {
        bail!("loads file {file}: load {load} is not a finite number >= 0");
    }
    Ok(layers.into_iter().zip(rows).collect())
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
