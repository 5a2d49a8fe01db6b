//! The placement solver: maps the experts of every MoE layer onto expert workers' slots, replicates the hottest
//! experts into redundant slots, and moves as few expert weights as it can relative to the current placement.
//!
//! Each MoE layer is solved on its own (layers share nothing but the workers' slot counts), in parallel. Within a
//! layer:
//! 1. Replica counts: every expert gets one replica; the `R` redundant replicas go one at a time to the expert with
//!    the highest load per replica (an expert's routed tokens split evenly over its replicas), at most one replica per
//!    worker. Exact ties keep the count the current placement already has, so equal loads never shuffle replicas.
//! 2. Survivors: replicas of the current placement stay where they are, except surplus ones (an expert whose count
//!    dropped loses the replica on its most crowded node, then on its most loaded worker) and those beyond a worker's
//!    slots.
//! 3. Missing replicas go largest load first onto the least loaded worker with a free slot that does not hold the
//!    expert yet, preferring the node holding fewest replicas of that expert (LPT, node-aware).
//! 4. Local search: while the most loaded worker is above `(1 + balance_tolerance)` times a lower bound on the best
//!    possible maximum, move one of its replicas to a free slot elsewhere or swap it with a lighter replica. A step
//!    that brings it within that target is chosen for the fewest weights it moves; failing one, the step that lowers
//!    the pair's maximum most once each newly moved replica is charged `move_penalty` of a mean worker load. Moving a
//!    replica back to a worker that held it costs nothing, and moving one off it refunds its cost.
//!
//! Moved bytes are counted as replicas added to a worker that did not hold them (see
//! [`Placement::added_replicas`]); removing a replica frees memory and moves nothing.
//!
//! Hard constraints: every expert has at least one replica, no worker holds more replicas than its slots, no worker
//! holds two replicas of one expert. Spreading an expert's replicas across nodes is preferred over balance when
//! replicas are placed, and a search step never makes the spread of an expert worse than `ceil(replicas / nodes)` per
//! node; when slots force two replicas onto one node the solver still succeeds.
//!
//! Solving is CPU-bound (milliseconds for Maverick's 24 layers of 128 experts, on rayon's pool): async callers run it
//! under `tokio::task::spawn_blocking`.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

use rayon::prelude::*;

use crate::{CoordinatorError, Placement, WorkerPlacement};

/// An expert worker as the solver sees it: how many expert replicas it can hold per MoE layer, and where it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSlots {
    /// The worker's id (e.g. `ew-0`); matches [`WorkerPlacement::worker_id`] of the current placement.
    pub worker_id: String,
    /// Its gRPC endpoint, copied into the placement.
    pub endpoint: String,
    /// The node (host) it runs on; workers without one count as one shared node.
    pub node: Option<String>,
    /// Expert replicas it can hold in each MoE layer.
    pub slots: usize,
}

impl WorkerSlots {
    /// A worker whose slots per MoE layer follow from its memory budget: `memory_bytes / (bytes_per_expert *
    /// moe_layers)`, since every layer gets the same number of slots.
    pub fn from_memory(
        worker_id: impl Into<String>,
        node: Option<String>,
        memory_bytes: u64,
        bytes_per_expert: u64,
        moe_layers: usize,
    ) -> Result<Self, CoordinatorError> {
        let worker_id = worker_id.into();
        let per_slot = bytes_per_expert.checked_mul(moe_layers as u64).filter(|&b| b > 0).ok_or_else(|| {
            CoordinatorError::Placement {
                reason: format!(
                    "worker {worker_id}: {bytes_per_expert} bytes per expert x {moe_layers} MoE layers is not a \
                     usable slot size"
                ),
            }
        })?;
        Ok(Self { worker_id, endpoint: String::new(), node, slots: (memory_bytes / per_slot) as usize })
    }
}

/// What to place: the experts' loads per MoE layer, the workers, and how many redundant replicas each layer gets.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementProblem {
    /// Routed experts per MoE layer.
    pub experts: u32,
    /// Per MoE layer (decoder layer index): routed tokens per expert (a moving average), `experts` values.
    pub loads: BTreeMap<u32, Vec<f64>>,
    /// The expert workers, in the order the placement lists them.
    pub workers: Vec<WorkerSlots>,
    /// Replicas beyond one per expert, in each layer.
    pub redundant_slots: usize,
}

impl PlacementProblem {
    /// `workers` workers `ew-0`, `ew-1`, ... with `slots` slots each; worker `i` runs on node `node-{i % nodes}` when
    /// `nodes` is above 1.
    pub fn uniform_workers(workers: usize, slots: usize, nodes: usize) -> Vec<WorkerSlots> {
        (0..workers)
            .map(|i| WorkerSlots {
                worker_id: format!("ew-{i}"),
                endpoint: String::new(),
                node: (nodes > 1).then(|| format!("node-{}", i % nodes)),
                slots,
            })
            .collect()
    }

    /// The equal slot count that fits `experts + redundant_slots` replicas on `workers` workers:
    /// `ceil((experts + redundant) / workers)`.
    pub fn equal_slots(experts: u32, redundant_slots: usize, workers: usize) -> usize {
        (experts as usize + redundant_slots).div_ceil(workers.max(1))
    }
}

/// Tuning of the solver.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SolverOptions {
    /// The local search stops once the most loaded worker is within this fraction above the lower bound on the best
    /// possible maximum; solutions that close count as equal, and the one moving fewest weights wins.
    pub balance_tolerance: f64,
    /// What one newly moved replica costs in the local search, as a fraction of the mean worker load: a step must
    /// lower the maximum by more than this per replica it moves.
    pub move_penalty: f64,
    /// At most this many local search steps per layer.
    pub max_search_steps: usize,
}

impl Default for SolverOptions {
    fn default() -> Self {
        Self { balance_tolerance: 0.01, move_penalty: 0.002, max_search_steps: 10_000 }
    }
}

/// How one layer came out.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerStats {
    /// Load per worker, in [`PlacementProblem::workers`] order, each expert's tokens split evenly over its replicas.
    pub worker_loads: Vec<f64>,
    /// The most loaded worker's load.
    pub max_load: f64,
    /// Total load over the number of workers.
    pub mean_load: f64,
    /// No placement with these replica counts can have a lower maximum: the larger of the mean over workers with
    /// slots and the largest load per replica.
    pub lower_bound: f64,
    /// Replicas per expert.
    pub replicas: Vec<u32>,
    /// Replicas placed on a worker that did not hold them in the current placement (weights to move).
    pub added_replicas: usize,
}

impl LayerStats {
    /// Max over mean load per worker (1 when there is no load).
    pub fn imbalance(&self) -> f64 {
        if self.mean_load > 0.0 {
            self.max_load / self.mean_load
        } else {
            1.0
        }
    }
}

/// A solved placement and how each layer came out.
#[derive(Debug, Clone, PartialEq)]
pub struct Solution {
    /// The new placement.
    pub placement: Placement,
    /// Per MoE layer.
    pub layers: BTreeMap<u32, LayerStats>,
}

impl Solution {
    /// Replicas added to workers that did not hold them, over all layers.
    pub fn added_replicas(&self) -> usize {
        self.layers.values().map(|l| l.added_replicas).sum()
    }

    /// Max/mean load per worker, averaged over layers.
    pub fn mean_imbalance(&self) -> f64 {
        if self.layers.is_empty() {
            return 1.0;
        }
        self.layers.values().map(LayerStats::imbalance).sum::<f64>() / self.layers.len() as f64
    }
}

/// Computes placements; see the module docs for the algorithm.
#[derive(Debug, Clone, Default)]
pub struct Solver {
    options: SolverOptions,
}

impl Solver {
    /// A solver with these options.
    pub fn new(options: SolverOptions) -> Self {
        Self { options }
    }

    /// The options in use.
    pub fn options(&self) -> &SolverOptions {
        &self.options
    }

    /// A new placement (epoch `current.epoch + 1`) for `problem`, keeping the replicas of `current` where it can.
    /// Workers of `current` absent from `problem` are gone: their replicas are placed again on the others.
    pub fn solve(&self, problem: &PlacementProblem, current: &Placement) -> Result<Solution, CoordinatorError> {
        self.solve_inner(problem, Some(current), current.epoch.saturating_add(1))
    }

    /// A placement for `problem` at `epoch` that ignores where experts are now: the baseline incremental solving is
    /// measured against.
    pub fn solve_from_scratch(&self, problem: &PlacementProblem, epoch: u64) -> Result<Solution, CoordinatorError> {
        self.solve_inner(problem, None, epoch)
    }

    fn solve_inner(
        &self,
        problem: &PlacementProblem,
        current: Option<&Placement>,
        epoch: u64,
    ) -> Result<Solution, CoordinatorError> {
        let shape = validate(problem)?;
        let index: HashMap<&str, usize> =
            problem.workers.iter().enumerate().map(|(w, worker)| (worker.worker_id.as_str(), w)).collect();
        let solved: Vec<(u32, Vec<Vec<u32>>, LayerStats)> = problem
            .loads
            .par_iter()
            .map(|(&layer, loads)| {
                let mut held_now = vec![Vec::new(); problem.workers.len()];
                for worker in current.map(|c| c.workers.as_slice()).unwrap_or_default() {
                    if let (Some(&w), Some(experts)) =
                        (index.get(worker.worker_id.as_str()), worker.experts.get(&layer))
                    {
                        held_now[w].extend(experts.iter().copied());
                    }
                }
                let (held, stats) = solve_layer(layer, loads, &held_now, &shape, problem, &self.options)?;
                Ok((layer, held, stats))
            })
            .collect::<Result<_, CoordinatorError>>()?;
        let mut workers: Vec<WorkerPlacement> = problem
            .workers
            .iter()
            .map(|w| WorkerPlacement {
                worker_id: w.worker_id.clone(),
                endpoint: w.endpoint.clone(),
                experts: BTreeMap::new(),
            })
            .collect();
        let mut layers = BTreeMap::new();
        for (layer, held, stats) in solved {
            for (worker, mut experts) in workers.iter_mut().zip(held) {
                experts.sort_unstable();
                worker.experts.insert(layer, experts);
            }
            layers.insert(layer, stats);
        }
        Ok(Solution { placement: Placement { epoch, workers }, layers })
    }
}

/// What every layer shares, checked once.
struct Shape {
    experts: usize,
    /// Node index of each worker.
    node_of: Vec<usize>,
    nodes: usize,
    /// Workers with at least one slot: the most replicas one expert can have.
    usable_workers: usize,
}

fn placement_error(reason: String) -> CoordinatorError {
    CoordinatorError::Placement { reason }
}

fn validate(problem: &PlacementProblem) -> Result<Shape, CoordinatorError> {
    let experts = problem.experts as usize;
    if experts == 0 {
        return Err(placement_error("a model with 0 experts per layer has nothing to place".into()));
    }
    if problem.workers.is_empty() {
        return Err(placement_error("at least one expert worker is needed".into()));
    }
    let mut seen = BTreeSet::new();
    for worker in &problem.workers {
        if !seen.insert(worker.worker_id.as_str()) {
            return Err(placement_error(format!("worker id {} appears twice", worker.worker_id)));
        }
    }
    for (&layer, loads) in &problem.loads {
        if loads.len() != experts {
            return Err(placement_error(format!(
                "layer {layer} has loads for {} experts, the model has {experts}",
                loads.len()
            )));
        }
        if let Some((expert, load)) = loads.iter().enumerate().find(|(_, l)| !l.is_finite() || **l < 0.0) {
            return Err(placement_error(format!(
                "layer {layer} expert {expert} has load {load}: loads must be finite and not negative"
            )));
        }
    }
    let slots: usize = problem.workers.iter().map(|w| w.slots).sum();
    if slots < experts {
        return Err(placement_error(format!(
            "holding every expert once needs {experts} slots per layer, workers have {slots}: {} missing",
            experts - slots
        )));
    }
    let replicas = experts + problem.redundant_slots;
    if slots < replicas {
        return Err(placement_error(format!(
            "{experts} experts + {} redundant replicas need {replicas} slots per layer, workers have {slots}: {} \
             missing",
            problem.redundant_slots,
            replicas - slots
        )));
    }
    let usable_workers = problem.workers.iter().filter(|w| w.slots > 0).count();
    let most_redundant = experts * (usable_workers - 1);
    if problem.redundant_slots > most_redundant {
        return Err(placement_error(format!(
            "{} redundant replicas are more than {experts} experts on {usable_workers} workers can hold (one \
             replica per worker: at most {most_redundant} redundant)",
            problem.redundant_slots
        )));
    }
    let mut node_names: BTreeMap<Option<&str>, usize> = BTreeMap::new();
    for worker in &problem.workers {
        let next = node_names.len();
        node_names.entry(worker.node.as_deref()).or_insert(next);
    }
    let node_of = problem.workers.iter().map(|w| node_names[&w.node.as_deref()]).collect();
    Ok(Shape { experts, node_of, nodes: node_names.len(), usable_workers })
}

/// A candidate for the heap of replica counts: an expert and its load per replica now.
struct Claim {
    per_replica: f64,
    /// Whether the current placement already has this many replicas of the expert (keeps ties stable).
    kept: bool,
    expert: usize,
}

impl PartialEq for Claim {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Claim {}
impl PartialOrd for Claim {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Claim {
    fn cmp(&self, other: &Self) -> Ordering {
        self.per_replica
            .total_cmp(&other.per_replica)
            .then(self.kept.cmp(&other.kept))
            .then(other.expert.cmp(&self.expert))
    }
}

/// Replicas per expert: one each, then the redundant ones one at a time to the highest load per replica.
fn replica_counts(loads: &[f64], current: &[u32], redundant: usize, most: u32) -> Vec<u32> {
    let mut replicas = vec![1u32; loads.len()];
    let claim = |expert: usize, replicas: u32| Claim {
        per_replica: loads[expert] / f64::from(replicas),
        kept: current[expert] > replicas,
        expert,
    };
    let mut heap: BinaryHeap<Claim> = (0..loads.len()).filter(|_| most > 1).map(|e| claim(e, 1)).collect();
    for _ in 0..redundant {
        // Validation guarantees room: redundant <= experts * (usable workers - 1).
        let Some(Claim { expert, .. }) = heap.pop() else { break };
        replicas[expert] += 1;
        if replicas[expert] < most {
            heap.push(claim(expert, replicas[expert]));
        }
    }
    replicas
}

/// One layer's working state.
struct LayerState<'a> {
    experts: usize,
    share: Vec<f64>,
    replicas: Vec<u32>,
    held: Vec<Vec<u32>>,
    /// `holds[w * experts + e]`.
    holds: Vec<bool>,
    /// Whether the current placement has expert `e` on worker `w`: placing it there again moves nothing.
    was_held: Vec<bool>,
    node_of: &'a [usize],
    nodes: usize,
    /// `on_node[e * nodes + n]`: replicas of expert `e` on node `n`.
    on_node: Vec<u32>,
    capacity: Vec<usize>,
    load: Vec<f64>,
}

impl LayerState<'_> {
    fn holds(&self, worker: usize, expert: usize) -> bool {
        self.holds[worker * self.experts + expert]
    }

    /// 1 when putting `expert` on `worker` moves its weights there, 0 when the worker held it already.
    fn cost(&self, worker: usize, expert: usize) -> i64 {
        i64::from(!self.was_held[worker * self.experts + expert])
    }

    fn on_node(&self, expert: usize, worker: usize) -> u32 {
        self.on_node[expert * self.nodes + self.node_of[worker]]
    }

    fn free(&self, worker: usize) -> bool {
        self.held[worker].len() < self.capacity[worker]
    }

    fn add(&mut self, worker: usize, expert: usize) {
        self.held[worker].push(expert as u32);
        self.holds[worker * self.experts + expert] = true;
        self.on_node[expert * self.nodes + self.node_of[worker]] += 1;
        self.load[worker] += self.share[expert];
    }

    fn remove(&mut self, worker: usize, expert: usize) {
        self.held[worker].retain(|&e| e as usize != expert);
        self.holds[worker * self.experts + expert] = false;
        self.on_node[expert * self.nodes + self.node_of[worker]] -= 1;
        self.load[worker] -= self.share[expert];
    }

    /// Moving a replica of `expert` from worker `from` to worker `to` keeps its replicas spread: it stays on one node,
    /// lands on a node with fewer replicas than it leaves, or stays within `ceil(replicas / nodes)` per node.
    fn spread_ok(&self, expert: usize, from: usize, to: usize) -> bool {
        if self.node_of[from] == self.node_of[to] {
            return true;
        }
        let after = self.on_node(expert, to) + 1;
        after <= self.on_node(expert, from) || after <= self.replicas[expert].div_ceil(self.nodes as u32)
    }

    fn added_replicas(&self) -> usize {
        self.held
            .iter()
            .enumerate()
            .map(|(w, held)| held.iter().filter(|&&e| !self.was_held[w * self.experts + e as usize]).count())
            .sum()
    }
}

fn solve_layer(
    layer: u32,
    loads: &[f64],
    held_now: &[Vec<u32>],
    shape: &Shape,
    problem: &PlacementProblem,
    options: &SolverOptions,
) -> Result<(Vec<Vec<u32>>, LayerStats), CoordinatorError> {
    let experts = shape.experts;
    let workers = problem.workers.len();
    let mut was_held = vec![false; workers * experts];
    let mut current_replicas = vec![0u32; experts];
    for (w, held) in held_now.iter().enumerate() {
        for &e in held {
            let e = e as usize;
            // Experts beyond the model and duplicates in the current placement are not replicas to keep.
            if e < experts && !was_held[w * experts + e] {
                was_held[w * experts + e] = true;
                current_replicas[e] += 1;
            }
        }
    }
    let replicas = replica_counts(loads, &current_replicas, problem.redundant_slots, shape.usable_workers as u32);
    let share: Vec<f64> = loads.iter().zip(&replicas).map(|(&l, &r)| l / f64::from(r)).collect();
    let mut state = LayerState {
        experts,
        share,
        replicas,
        held: vec![Vec::new(); workers],
        holds: vec![false; workers * experts],
        was_held,
        node_of: &shape.node_of,
        nodes: shape.nodes,
        on_node: vec![0; experts * shape.nodes],
        capacity: problem.workers.iter().map(|w| w.slots).collect(),
        load: vec![0.0; workers],
    };

    keep_survivors(&mut state, held_now);
    place_missing(&mut state, layer)?;
    let total: f64 = loads.iter().sum();
    let mean_load = total / workers as f64;
    let largest_share = state.share.iter().copied().fold(0.0, f64::max);
    let lower_bound = (total / shape.usable_workers as f64).max(largest_share);
    local_search(&mut state, lower_bound, mean_load, options);

    // Loads re-summed from scratch so that the reported figures carry no drift from incremental updates.
    let worker_loads: Vec<f64> =
        state.held.iter().map(|held| held.iter().map(|&e| state.share[e as usize]).sum()).collect();
    let max_load = worker_loads.iter().copied().fold(0.0, f64::max);
    let stats = LayerStats {
        max_load,
        mean_load,
        lower_bound,
        added_replicas: state.added_replicas(),
        replicas: state.replicas.clone(),
        worker_loads,
    };
    Ok((state.held, stats))
}

/// Keeps the current placement's replicas within the new replica counts and the workers' slots.
fn keep_survivors(state: &mut LayerState<'_>, held_now: &[Vec<u32>]) {
    let experts = state.experts;
    for (w, held) in held_now.iter().enumerate() {
        for &e in held {
            let e = e as usize;
            if e < experts && !state.holds(w, e) {
                state.add(w, e);
            }
        }
    }
    // A worker whose slots shrank drops the replicas of experts with the largest surplus first.
    for w in 0..state.held.len() {
        while state.held[w].len() > state.capacity[w] {
            let surplus = |state: &LayerState<'_>, e: usize| {
                let placed = (0..state.held.len()).filter(|&v| state.holds(v, e)).count() as i64;
                placed - i64::from(state.replicas[e])
            };
            let Some(&drop) = state.held[w].iter().max_by(|&&a, &&b| {
                surplus(state, a as usize)
                    .cmp(&surplus(state, b as usize))
                    .then(state.share[a as usize].total_cmp(&state.share[b as usize]).reverse())
                    .then(b.cmp(&a))
            }) else {
                break;
            };
            state.remove(w, drop as usize);
        }
    }
    // An expert with fewer replicas than now loses the one on its most crowded node, then its most loaded worker.
    for e in 0..experts {
        let mut placed = (0..state.held.len()).filter(|&w| state.holds(w, e)).count();
        while placed > state.replicas[e] as usize {
            let Some(w) = (0..state.held.len()).filter(|&w| state.holds(w, e)).max_by(|&a, &b| {
                state
                    .on_node(e, a)
                    .cmp(&state.on_node(e, b))
                    .then(state.load[a].total_cmp(&state.load[b]))
                    .then(b.cmp(&a))
            }) else {
                break;
            };
            state.remove(w, e);
            placed -= 1;
        }
    }
}

/// Places every replica the survivors lack, largest load per replica first, each on the worker with a free slot
/// that does not hold the expert, on the node with fewest of its replicas, least loaded.
fn place_missing(state: &mut LayerState<'_>, layer: u32) -> Result<(), CoordinatorError> {
    let workers = state.held.len();
    let mut missing: Vec<(usize, u32)> = (0..state.experts)
        .filter_map(|e| {
            let placed = (0..workers).filter(|&w| state.holds(w, e)).count() as u32;
            (placed < state.replicas[e]).then(|| (e, state.replicas[e] - placed))
        })
        .collect();
    missing.sort_by(|a, b| state.share[b.0].total_cmp(&state.share[a.0]).then(a.0.cmp(&b.0)));
    for (expert, count) in missing {
        for _ in 0..count {
            let best = (0..workers).filter(|&w| state.free(w) && !state.holds(w, expert)).min_by(|&a, &b| {
                state
                    .on_node(expert, a)
                    .cmp(&state.on_node(expert, b))
                    .then(state.load[a].total_cmp(&state.load[b]))
                    .then(state.cost(a, expert).cmp(&state.cost(b, expert)))
                    .then(a.cmp(&b))
            });
            match best {
                Some(w) => state.add(w, expert),
                None => make_room(state, layer, expert)?,
            }
        }
    }
    Ok(())
}

/// Every worker with a free slot already holds `expert`: move some other replica from a full worker `v` that lacks
/// `expert` into one of those free slots, then put `expert` on `v`.
fn make_room(state: &mut LayerState<'_>, layer: u32, expert: usize) -> Result<(), CoordinatorError> {
    let workers = state.held.len();
    let mut full: Vec<usize> = (0..workers).filter(|&v| !state.holds(v, expert) && state.capacity[v] > 0).collect();
    full.sort_by(|&a, &b| state.load[a].total_cmp(&state.load[b]).then(a.cmp(&b)));
    let exchange = full.into_iter().find_map(|v| {
        state.held[v].iter().find_map(|&other| {
            let other = other as usize;
            (0..workers).find(|&w| state.free(w) && !state.holds(w, other)).map(|w| (v, other, w))
        })
    });
    if let Some((v, other, w)) = exchange {
        state.remove(v, other);
        state.add(w, other);
        state.add(v, expert);
        return Ok(());
    }
    Err(placement_error(format!(
        "layer {layer}: no worker can take replica {} of expert {expert} without holding it twice",
        (0..workers).filter(|&w| state.holds(w, expert)).count() + 1
    )))
}

/// One local search step.
#[derive(Clone, Copy)]
enum Step {
    /// Move a replica of `expert` from the most loaded worker to worker `to`.
    Move { expert: usize, to: usize },
    /// Swap a replica of `expert` on the most loaded worker with one of `other` on worker `with`.
    Swap { expert: usize, with: usize, other: usize },
}

fn local_search(state: &mut LayerState<'_>, lower_bound: f64, mean_load: f64, options: &SolverOptions) {
    let target = lower_bound * (1.0 + options.balance_tolerance.max(0.0));
    let penalty = options.move_penalty.max(0.0) * mean_load;
    let workers = state.held.len();
    for _ in 0..options.max_search_steps {
        // Loads kept by adding and subtracting differ from a fresh sum in the last bits; treating near-equal loads as
        // tied (lowest index first) makes a re-solve of the same loads pick the same worker and stop where it stopped.
        let top = state.load.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let Some(heaviest) = (0..workers).find(|&w| state.load[w] >= top - top.abs() * 1e-9) else {
            return;
        };
        let peak = state.load[heaviest];
        if peak <= target {
            return;
        }
        // A step that brings the heaviest worker within the target is picked for the fewest replicas it moves;
        // otherwise the step that lowers the pair's maximum most once moves are charged.
        let mut fixing: Option<(i64, f64, Step)> = None;
        let mut improving: Option<(f64, Step)> = None;
        let mut consider = |after: f64, cost: i64, step: Step| {
            if after <= target && fixing.is_none_or(|(c, a, _)| (cost, after) < (c, a)) {
                fixing = Some((cost, after, step));
            }
            let score = after + penalty * cost as f64;
            if improving.is_none_or(|(s, _)| score < s) {
                improving = Some((score, step));
            }
        };
        for &expert in &state.held[heaviest] {
            let expert = expert as usize;
            let moved = state.share[expert];
            for to in (0..workers).filter(|&to| to != heaviest) {
                if state.holds(to, expert) || !state.spread_ok(expert, heaviest, to) {
                    continue;
                }
                let leave = state.cost(to, expert) - state.cost(heaviest, expert);
                if state.free(to) {
                    let after = (peak - moved).max(state.load[to] + moved);
                    consider(after, leave, Step::Move { expert, to });
                }
                for &other in &state.held[to] {
                    let other = other as usize;
                    let delta = moved - state.share[other];
                    if delta <= 0.0 || state.holds(heaviest, other) || !state.spread_ok(other, to, heaviest) {
                        continue;
                    }
                    let after = (peak - delta).max(state.load[to] + delta);
                    let cost = leave + state.cost(heaviest, other) - state.cost(to, other);
                    consider(after, cost, Step::Swap { expert, with: to, other });
                }
            }
        }
        // Relative slack so that rounding in the incremental loads never counts as progress.
        let chosen = match (fixing, improving) {
            (Some((_, _, step)), _) => Some(step),
            (None, Some((score, step))) if score < peak - peak * 1e-9 => Some(step),
            _ => None,
        };
        match chosen {
            Some(Step::Move { expert, to }) => {
                state.remove(heaviest, expert);
                state.add(to, expert);
            }
            Some(Step::Swap { expert, with, other }) => {
                state.remove(heaviest, expert);
                state.remove(with, other);
                state.add(with, expert);
                state.add(heaviest, other);
            }
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(loads: Vec<Vec<f64>>, workers: usize, redundant: usize, nodes: usize) -> PlacementProblem {
        let experts = loads[0].len() as u32;
        PlacementProblem {
            experts,
            loads: loads.into_iter().enumerate().map(|(l, v)| (l as u32, v)).collect(),
            workers: PlacementProblem::uniform_workers(
                workers,
                PlacementProblem::equal_slots(experts, redundant, workers),
                nodes,
            ),
            redundant_slots: redundant,
        }
    }

    #[test]
    fn redundant_replicas_follow_load_per_replica() {
        let counts = replica_counts(&[8.0, 4.0, 1.0, 1.0], &[0; 4], 3, 4);
        // 8 -> 4 (expert 0), then 4 vs 4: expert 0 at 4 per replica ties expert 1 at 4; lower id first.
        assert_eq!(counts, vec![3, 2, 1, 1]);
        // Never more replicas than workers.
        assert_eq!(replica_counts(&[100.0, 1.0], &[0; 2], 2, 2), vec![2, 2]);
    }

    #[test]
    fn ties_keep_the_current_replica_counts() {
        let loads = [2.0, 2.0, 2.0, 2.0];
        assert_eq!(replica_counts(&loads, &[1, 1, 2, 1], 1, 4), vec![1, 1, 2, 1]);
        assert_eq!(replica_counts(&loads, &[1, 2, 1, 1], 1, 4), vec![1, 2, 1, 1]);
    }

    #[test]
    fn a_hot_expert_is_split_across_workers() {
        let solution = Solver::default()
            .solve_from_scratch(&problem(vec![vec![12.0, 1.0, 1.0, 1.0, 1.0]], 3, 4, 1), 1)
            .expect("solves");
        let stats = &solution.layers[&0];
        // Expert 0 on every worker (at most one replica per worker); the last redundant replicas go to experts 1
        // and 2. Best split of the rest: {3, 1}, {4, 2}, {1, 2} at 1.5 each, plus 4 of expert 0.
        assert_eq!(stats.replicas, vec![3, 2, 2, 1, 1]);
        assert!((stats.max_load - 5.5).abs() < 1e-9, "{stats:?}");
    }

    #[test]
    fn lost_workers_replicas_are_placed_again() {
        let p = problem(vec![vec![1.0; 8]], 4, 0, 1);
        let solution = Solver::default().solve_from_scratch(&p, 1).expect("solves");
        let mut smaller = p.clone();
        smaller.workers.pop();
        smaller.workers.iter_mut().for_each(|w| w.slots = 3);
        let again = Solver::default().solve(&smaller, &solution.placement).expect("solves");
        again.placement.check_covers(&[0], 8).expect("solves");
        assert_eq!(again.placement.epoch, 2);
        // Only the two experts of the lost worker move.
        assert_eq!(again.added_replicas(), 2);
    }

    #[test]
    fn worker_slots_from_memory() {
        let worker = WorkerSlots::from_memory("ew-0", None, 10 * 24 * 100, 100, 24).expect("solves");
        assert_eq!(worker.slots, 10);
        assert!(WorkerSlots::from_memory("ew-0", None, 1, 0, 24).is_err());
    }

    #[test]
    fn bad_loads_are_refused() {
        let err =
            Solver::default().solve_from_scratch(&problem(vec![vec![1.0, f64::NAN]], 2, 0, 1), 1).expect_err("refused");
        assert!(err.to_string().contains("layer 0 expert 1 has load NaN"), "{err}");
        let mut p = problem(vec![vec![1.0, 1.0]], 2, 0, 1);
        p.loads.insert(5, vec![1.0]);
        let err = Solver::default().solve_from_scratch(&p, 1).expect_err("refused");
        assert!(err.to_string().contains("layer 5 has loads for 1 experts"), "{err}");
    }
}
