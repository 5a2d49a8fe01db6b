//! The event loop. See the crate docs for the model; this file is its bookkeeping.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Poisson, StandardNormal};
use switchyard_coordinator::traces::{TraceConfig, ZipfTrace};
use switchyard_coordinator::{Placement, PlacementProblem, Solver, WorkerSlots};
use tracing::{debug, info};

use crate::config::{FailureTarget, Policy, SimConfig};
use crate::costs::{AttentionBatch, StepCosts};
use crate::error::SimError;
use crate::report::{FailureRecord, Heat, Imbalance, PlacementChange, Point, Reason, Report, Requests};
use crate::routing::{added_per_gpu, gpu_id, repair_round_robin, round_robin, Routing};
use crate::stats::Tally;
use crate::workers::{AttentionWorker, Phase, Request};

/// Below this many expected tokens an expert's count is drawn from a Poisson law, above from a normal one.
const POISSON_BELOW: f64 = 30.0;

#[derive(Debug, Clone, Copy)]
enum Event {
    /// An attention worker's step ends.
    StepDone(usize),
    /// Expert popularity drifts (the trace's next window).
    Drift,
    /// `config.failures[i]` happens.
    Failure(usize),
    /// The coordinator notices the GPUs of failure `i` are gone.
    Detected(usize),
    /// The pending placement with this id is loaded everywhere and published.
    PlacementReady(u64),
    /// The coordinator looks at measured load.
    RebalanceCheck,
    /// The stall with this id has lasted the recovery timeout.
    StallTimeout(u64),
    /// The time-series point ends.
    Point,
    /// The run ends.
    End,
}

struct Scheduled {
    time: f64,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    /// Reversed: the heap pops the earliest event, ties in scheduling order.
    fn cmp(&self, other: &Self) -> Ordering {
        other.time.total_cmp(&self.time).then(other.seq.cmp(&self.seq))
    }
}

/// A placement being loaded; routers switch to it when it is ready.
struct Pending {
    id: u64,
    placement: Placement,
    change: PlacementChange,
}

struct Stall {
    id: u64,
    since: f64,
    /// Failure records this stall belongs to (their requests failed at the timeout are counted there).
    failures: Vec<usize>,
}

/// Accumulators of the current time-series point.
struct PointAccumulator {
    start: f64,
    imbalance_sum: f64,
    ticks: u64,
    stalled: f64,
    /// Sampled routed tokens per (layer, expert) over the point's ticks.
    counts: Vec<f64>,
}

pub(crate) struct Sim<'a, C: StepCosts> {
    config: &'a SimConfig,
    costs: &'a C,
    policy: Policy,
    layers: usize,
    experts: usize,
    now: f64,
    queue: BinaryHeap<Scheduled>,
    seq: u64,

    arrival_rng: ChaCha8Rng,
    pick_rng: ChaCha8Rng,
    route_rng: ChaCha8Rng,
    fail_rng: ChaCha8Rng,
    next_arrival: f64,
    next_request: u64,
    trace: ZipfTrace,
    /// `layer * experts + e`: probability that a token of the layer is routed to expert `e`.
    probs: Vec<f64>,

    workers: Vec<AttentionWorker>,
    live_workers: Vec<usize>,
    alive: Vec<bool>,
    placement: Placement,
    routing: Routing,
    pending: Option<Pending>,
    next_pending: u64,
    /// Per GPU: factor on its expert time (above 1 while it loads weights).
    slowdown: Vec<f64>,
    solver: Solver,
    solver_runs: u64,
    /// Loads the coordinator balances by: the sampled counts of the last rebalance window.
    measured: Vec<f64>,
    window: Vec<f64>,
    stall: Option<Stall>,
    next_stall: u64,

    tick_at: f64,
    dirty: bool,
    /// Per layer, per micro-batch: the slowest GPU's expert time, us.
    expert_layer_us: Vec<f64>,
    /// Per layer, per micro-batch: the bytes the busiest GPU receives.
    recv_layer_bytes: Vec<f64>,
    share: Vec<f64>,
    gpu_tokens: Vec<f64>,
    gpu_active: Vec<f64>,
    scratch: Vec<f64>,

    tally: Tally,
    steps: u64,
    step_us: f64,
    attention_us: f64,
    expert_us: f64,
    ticks: u64,
    imbalance_sum: f64,
    imbalance_max: f64,
    stalled_s: f64,
    point: PointAccumulator,
    series: Vec<Point>,
    heat: Heat,
    placements: Vec<PlacementChange>,
    failures: Vec<FailureRecord>,
    notes: Vec<String>,
}

/// Independent random streams per purpose, so that policies see the same arrivals, lengths, routing draws and
/// failure targets.
fn stream(seed: u64, purpose: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(purpose);
    rng
}

fn normalised(loads: Vec<Vec<f64>>) -> Vec<f64> {
    loads
        .into_iter()
        .flat_map(|layer| {
            let total: f64 = layer.iter().sum();
            layer.into_iter().map(move |l| if total > 0.0 { l / total } else { 0.0 })
        })
        .collect()
}

impl<'a, C: StepCosts> Sim<'a, C> {
    pub fn new(config: &'a SimConfig, policy: Policy, costs: &'a C) -> Result<Self, SimError> {
        config.validate()?;
        let layers = config.moe_layers;
        let experts = config.experts as usize;
        let gpus = config.expert_gpus;
        let trace = ZipfTrace::new(TraceConfig {
            experts,
            layers,
            skew: config.zipf,
            tokens_per_window: 1.0,
            swaps_per_window: config.drift_swaps,
            max_rank_step: 4,
            seed: config.seed,
        });
        let probs = normalised(trace.loads());
        let alive = vec![true; gpus];
        let mut sim = Self {
            config,
            costs,
            policy,
            layers,
            experts,
            now: 0.0,
            queue: BinaryHeap::new(),
            seq: 0,
            arrival_rng: stream(config.seed, 1),
            pick_rng: stream(config.seed, 2),
            route_rng: stream(config.seed, 3),
            fail_rng: stream(config.seed, 4),
            next_arrival: 0.0,
            next_request: 0,
            trace,
            measured: probs.clone(),
            probs,
            workers: (0..config.attention_workers).map(|_| AttentionWorker::new()).collect(),
            live_workers: (0..config.attention_workers).collect(),
            routing: Routing::new(&Placement { epoch: 0, workers: Vec::new() }, &alive, layers, experts),
            alive,
            placement: Placement { epoch: 0, workers: Vec::new() },
            pending: None,
            next_pending: 0,
            slowdown: vec![1.0; gpus],
            solver: Solver::default(),
            solver_runs: 0,
            window: vec![0.0; layers * experts],
            stall: None,
            next_stall: 0,
            tick_at: f64::NEG_INFINITY,
            dirty: true,
            expert_layer_us: vec![0.0; layers],
            recv_layer_bytes: vec![0.0; layers],
            share: vec![0.0; experts],
            gpu_tokens: vec![0.0; gpus],
            gpu_active: vec![0.0; gpus],
            scratch: Vec::new(),
            tally: Tally::default(),
            steps: 0,
            step_us: 0.0,
            attention_us: 0.0,
            expert_us: 0.0,
            ticks: 0,
            imbalance_sum: 0.0,
            imbalance_max: 0.0,
            stalled_s: 0.0,
            point: PointAccumulator {
                start: 0.0,
                imbalance_sum: 0.0,
                ticks: 0,
                stalled: 0.0,
                counts: vec![0.0; layers * experts],
            },
            series: Vec::new(),
            heat: Heat::default(),
            placements: Vec::new(),
            failures: Vec::new(),
            notes: Vec::new(),
        };
        sim.initial_placement()?;
        Ok(sim)
    }

    fn schedule(&mut self, time: f64, event: Event) {
        self.seq += 1;
        self.queue.push(Scheduled { time, seq: self.seq, event });
    }

    fn initial_placement(&mut self) -> Result<(), SimError> {
        let config = self.config;
        let (placement, after) = if self.policy.uses_solver() {
            let solution = self.solve(None)?;
            let after = solution.mean_imbalance();
            (solution.placement, after)
        } else {
            let placement = round_robin(
                self.layers,
                config.experts,
                config.expert_gpus,
                config.slots_per_gpu,
                config.redundant_slots,
            )?;
            let routing = Routing::new(&placement, &self.alive, self.layers, self.experts);
            let after = routing.imbalance(&self.measured, &self.alive, &mut self.scratch);
            (placement, after)
        };
        self.routing = Routing::new(&placement, &self.alive, self.layers, self.experts);
        self.placements.push(PlacementChange {
            decided_s: 0.0,
            ready_s: 0.0,
            reason: Reason::Initial,
            epoch: placement.epoch,
            added_replicas: 0,
            moved_gb: 0.0,
            imbalance_before: None,
            imbalance_after: after,
        });
        self.placement = placement;
        Ok(())
    }

    /// The coordinator's solver over the live GPUs, from `current` (or from scratch), balancing `measured`.
    fn solve(&mut self, current: Option<&Placement>) -> Result<switchyard_coordinator::Solution, SimError> {
        let config = self.config;
        let workers: Vec<WorkerSlots> = (0..config.expert_gpus)
            .filter(|&g| self.alive[g])
            .map(|g| WorkerSlots {
                worker_id: gpu_id(g),
                endpoint: String::new(),
                node: Some(format!("node-{}", g / config.gpus_per_node)),
                slots: config.slots_per_gpu,
            })
            .collect();
        let live = workers.len();
        // Fewer GPUs hold fewer replicas: redundant ones go first.
        let redundant = config
            .redundant_slots
            .min((live * config.slots_per_gpu).saturating_sub(self.experts))
            .min(self.experts * live.saturating_sub(1));
        let loads = (0..self.layers)
            .map(|l| (l as u32, self.measured[l * self.experts..(l + 1) * self.experts].to_vec()))
            .collect();
        let problem = PlacementProblem { experts: config.experts, loads, workers, redundant_slots: redundant };
        self.solver_runs += 1;
        let solution = match current {
            Some(current) => self.solver.solve(&problem, current)?,
            None => self.solver.solve_from_scratch(&problem, 1)?,
        };
        Ok(solution)
    }

    pub fn run(mut self) -> Result<Report, SimError> {
        let config = self.config;
        self.next_arrival = self.draw_interarrival();
        self.schedule(config.duration_s, Event::End);
        self.schedule(config.drift_interval_s, Event::Drift);
        self.schedule(config.sample_interval_s, Event::Point);
        if self.policy == Policy::Solver {
            self.schedule(config.rebalance_interval_s, Event::RebalanceCheck);
        }
        for (i, failure) in config.failures.iter().enumerate() {
            self.schedule(failure.at_s, Event::Failure(i));
        }
        loop {
            let next_event = self.queue.peek().map_or(f64::INFINITY, |s| s.time);
            if self.next_arrival < config.duration_s && self.next_arrival <= next_event {
                self.now = self.next_arrival;
                self.arrive();
                self.next_arrival += self.draw_interarrival();
                continue;
            }
            let Some(Scheduled { time, event, .. }) = self.queue.pop() else { break };
            self.now = time;
            match event {
                Event::End => break,
                Event::StepDone(w) => self.step_done(w),
                Event::Drift => {
                    self.trace.advance();
                    self.probs = normalised(self.trace.loads());
                    self.dirty = true;
                    self.schedule(self.now + config.drift_interval_s, Event::Drift);
                }
                Event::Failure(i) => self.fail(i),
                Event::Detected(i) => self.detected(i),
                Event::PlacementReady(id) => self.placement_ready(id),
                Event::RebalanceCheck => {
                    self.rebalance_check()?;
                    self.schedule(self.now + config.rebalance_interval_s, Event::RebalanceCheck);
                }
                Event::StallTimeout(id) => self.stall_timeout(id),
                Event::Point => {
                    self.close_point();
                    self.schedule(self.now + config.sample_interval_s, Event::Point);
                }
            }
        }
        self.now = config.duration_s;
        if let Some(stall) = &self.stall {
            self.stalled_s += self.now - stall.since;
        }
        Ok(self.report())
    }

    fn draw_interarrival(&mut self) -> f64 {
        let u: f64 = self.arrival_rng.random();
        -(1.0 - u).ln() / self.config.rate
    }

    fn draw_length(&mut self, lengths: crate::config::Lengths) -> u32 {
        self.arrival_rng.random_range(lengths.min..=lengths.max)
    }

    fn arrive(&mut self) {
        let config = self.config;
        let request = Request {
            id: self.next_request,
            arrival: self.now,
            input: self.draw_length(config.input_len),
            output: self.draw_length(config.output_len),
        };
        self.next_request += 1;
        self.tally.arrived += 1;
        // Power of two choices: as good as least-loaded in practice, O(1) per request, and the draws per arrival are
        // fixed so every policy sees the same random stream.
        let (a, b): (u64, u64) = (self.pick_rng.random(), self.pick_rng.random());
        if self.live_workers.is_empty() {
            self.tally.rejected += 1;
            return;
        }
        let live = self.live_workers.len() as u64;
        let a = self.live_workers[(a % live) as usize];
        let b = self.live_workers[(b % live) as usize];
        let worker = if self.workers[b].outstanding() < self.workers[a].outstanding() { b } else { a };
        if !self.workers[worker].enqueue(request, config) {
            self.tally.rejected += 1;
            return;
        }
        if self.workers[worker].phase == Phase::Idle && self.stall.is_none() {
            self.start_step(worker);
        }
    }

    fn start_step(&mut self, w: usize) {
        let Some(batch) = self.workers[w].plan(self.config) else {
            self.workers[w].phase = Phase::Idle;
            return;
        };
        if self.dirty || self.now - self.tick_at >= self.config.expert_tick_s {
            self.refresh_expert_side();
        }
        let (total, attention, expert) = self.step_cost(&batch);
        self.steps += 1;
        self.step_us += total;
        self.attention_us += attention;
        self.expert_us += expert;
        self.workers[w].phase = Phase::Stepping;
        self.schedule(self.now + total * 1e-6, Event::StepDone(w));
    }

    /// (step, attention side, expert side) in us for one worker's batch, given the expert side's current state.
    fn step_cost(&self, batch: &AttentionBatch) -> (f64, f64, f64) {
        let m = f64::from(self.config.micro_batches);
        let micro = batch.split(m);
        let attention = self.costs.attention_us(&micro);
        let per_layer = attention / self.layers as f64;
        let send = micro.tokens() * self.costs.token_bytes();
        let mut total = 0.0;
        let mut expert = 0.0;
        for (&compute, &recv) in self.expert_layer_us.iter().zip(&self.recv_layer_bytes) {
            let x = compute + 2.0 * self.costs.transfer_us(send.max(recv));
            expert += x;
            // Two stages (attention side, expert side) over m micro-batches.
            total += if m == 1.0 { per_layer + x } else { m * per_layer.max(x) + per_layer.min(x) };
        }
        (total, attention * m, expert * m)
    }

    /// Draws how the tokens now in flight route in every layer and recomputes what each layer's slowest GPU takes.
    fn refresh_expert_side(&mut self) {
        self.tick_at = self.now;
        self.dirty = false;
        let tokens: f64 = self.workers.iter().map(|w| w.batch_tokens).sum();
        let inv_m = 1.0 / f64::from(self.config.micro_batches);
        let live = self.alive.iter().filter(|&&a| a).count().max(1) as f64;
        let token_bytes = self.costs.token_bytes();
        let mut imbalance = 0.0;
        for layer in 0..self.layers {
            let base = layer * self.experts;
            for e in 0..self.experts {
                let mean = tokens * self.probs[base + e];
                let count = if mean <= 0.0 {
                    0.0
                } else if mean < POISSON_BELOW {
                    Poisson::new(mean).map_or(mean, |p| p.sample(&mut self.route_rng))
                } else {
                    let z: f64 = StandardNormal.sample(&mut self.route_rng);
                    (mean + mean.sqrt() * z).round().max(0.0)
                };
                self.window[base + e] += count;
                self.point.counts[base + e] += count;
                self.share[e] = count * self.routing.inv_replicas[base + e] * inv_m;
            }
            self.gpu_tokens.iter_mut().for_each(|t| *t = 0.0);
            self.gpu_active.iter_mut().for_each(|t| *t = 0.0);
            for (&g, &e) in self.routing.gpus[layer].iter().zip(&self.routing.owners[layer]) {
                let x = self.share[e as usize];
                self.gpu_tokens[g as usize] += x;
                self.gpu_active[g as usize] += x.min(1.0);
            }
            let (mut slowest, mut most, mut sum) = (0.0f64, 0.0f64, 0.0);
            for ((&t, &a), &slow) in self.gpu_tokens.iter().zip(&self.gpu_active).zip(&self.slowdown) {
                if t > 0.0 {
                    slowest = slowest.max(self.costs.expert_us(t, a) * slow);
                    most = most.max(t);
                    sum += t;
                }
            }
            self.expert_layer_us[layer] = slowest;
            self.recv_layer_bytes[layer] = most * token_bytes;
            imbalance += if sum > 0.0 { most / (sum / live) } else { 1.0 };
        }
        let imbalance = imbalance / self.layers as f64;
        if tokens > 0.0 {
            self.ticks += 1;
            self.imbalance_sum += imbalance;
            self.imbalance_max = self.imbalance_max.max(imbalance);
            self.point.ticks += 1;
            self.point.imbalance_sum += imbalance;
        }
    }

    fn step_done(&mut self, w: usize) {
        if !self.workers[w].alive {
            return;
        }
        if self.stall.is_some() {
            // The step reached a layer whose experts nobody holds: it waits for the coordinator.
            self.workers[w].phase = Phase::Held;
            return;
        }
        self.workers[w].finish(self.now, &mut self.tally);
        self.start_step(w);
    }

    fn fail(&mut self, i: usize) {
        let config = self.config;
        let failure = config.failures[i];
        let gpus: Vec<usize> = match failure.target {
            FailureTarget::AttentionWorker(w) => {
                let before = self.tally.failed;
                if self.workers[w].alive {
                    self.workers[w].die(&mut self.tally);
                    self.live_workers.retain(|&x| x != w);
                }
                self.dirty = true;
                self.record_failure(format!("attention worker {w}"), 0, self.tally.failed - before);
                return;
            }
            FailureTarget::AnyExpertGpu => {
                let live: Vec<usize> = (0..config.expert_gpus).filter(|&g| self.alive[g]).collect();
                let pick: u64 = self.fail_rng.random();
                live.get((pick % live.len().max(1) as u64) as usize).copied().into_iter().collect()
            }
            FailureTarget::ExpertGpu(g) => vec![g].into_iter().filter(|&g| self.alive[g]).collect(),
            FailureTarget::Node(n) => {
                (0..config.expert_gpus).filter(|&g| g / config.gpus_per_node == n && self.alive[g]).collect()
            }
        };
        for &g in &gpus {
            self.alive[g] = false;
        }
        self.routing = Routing::new(&self.placement, &self.alive, self.layers, self.experts);
        self.dirty = true;
        let what = match failure.target {
            FailureTarget::Node(n) => format!("node {n} ({} expert GPUs)", gpus.len()),
            _ => format!("expert GPU {}", gpus.iter().map(|g| g.to_string()).collect::<Vec<_>>().join(",")),
        };
        let record = self.record_failure(what, self.routing.missing, 0);
        info!(policy = %self.policy, at_s = self.now, lost = self.routing.missing, "expert GPUs failed");
        if self.routing.missing > 0 {
            match &mut self.stall {
                Some(stall) => stall.failures.push(record),
                None => {
                    self.next_stall += 1;
                    self.stall = Some(Stall { id: self.next_stall, since: self.now, failures: vec![record] });
                    self.schedule(self.now + config.recovery_timeout_s, Event::StallTimeout(self.next_stall));
                }
            }
        }
        if !gpus.is_empty() {
            self.schedule(self.now + config.detect_s, Event::Detected(i));
        }
    }

    fn record_failure(&mut self, what: String, lost_experts: usize, failed_requests: u64) -> usize {
        self.failures.push(FailureRecord { at_s: self.now, what, lost_experts, recovered_s: None, failed_requests });
        self.failures.len() - 1
    }

    /// The coordinator re-places what the lost GPUs held, starting from the placement being loaded if there is one.
    fn detected(&mut self, i: usize) {
        let base = self.pending.as_ref().map_or_else(|| self.placement.clone(), |p| p.placement.clone());
        let before = self.routing.imbalance(&self.measured, &self.alive, &mut self.scratch);
        let placed = if self.policy.uses_solver() {
            self.solve(Some(&base)).map(|s| {
                let after = s.mean_imbalance();
                (s.placement, after)
            })
        } else {
            let config = self.config;
            repair_round_robin(&base, &self.alive, self.layers, config.experts, config.slots_per_gpu).map(|p| {
                let after = Routing::new(&p, &self.alive, self.layers, self.experts).imbalance(
                    &self.measured,
                    &self.alive,
                    &mut self.scratch,
                );
                (p, after)
            })
        };
        match placed {
            Ok((placement, after)) => self.begin_apply(placement, &base, Reason::Recovery, before, after),
            Err(error) => {
                let note = format!("{:.1} s: failure {i} cannot be recovered: {error}", self.now);
                info!(policy = %self.policy, "{note}");
                self.notes.push(note);
            }
        }
    }

    /// Starts loading `placement`'s new replicas; routers switch once the slowest GPU has its weights.
    fn begin_apply(&mut self, placement: Placement, base: &Placement, reason: Reason, before: f64, after: f64) {
        let config = self.config;
        let added = added_per_gpu(&placement, base);
        let most = added.values().copied().max().unwrap_or(0) as f64;
        let total: usize = added.values().sum();
        let load_s = most * self.costs.expert_bytes() / (config.load_gbps * 1e9);
        let solve_s = if self.policy.uses_solver() { config.solve_s } else { 0.0 };
        let ready = self.now + solve_s + load_s;
        for &g in added.keys() {
            self.slowdown[g] = 1.0 + config.load_slowdown;
        }
        self.dirty = true;
        self.next_pending += 1;
        let change = PlacementChange {
            decided_s: self.now,
            ready_s: ready,
            reason,
            epoch: placement.epoch,
            added_replicas: total,
            moved_gb: total as f64 * self.costs.expert_bytes() / 1e9,
            imbalance_before: Some(before),
            imbalance_after: after,
        };
        debug!(policy = %self.policy, epoch = placement.epoch, added = total, ready_s = ready, "placement loading");
        self.pending = Some(Pending { id: self.next_pending, placement, change });
        self.schedule(ready, Event::PlacementReady(self.next_pending));
    }

    fn placement_ready(&mut self, id: u64) {
        if self.pending.as_ref().is_none_or(|p| p.id != id) {
            return;
        }
        let Some(Pending { placement, change, .. }) = self.pending.take() else { return };
        self.routing = Routing::new(&placement, &self.alive, self.layers, self.experts);
        self.placement = placement;
        self.slowdown.iter_mut().for_each(|s| *s = 1.0);
        self.dirty = true;
        self.placements.push(change);
        if self.routing.missing == 0 {
            for record in &mut self.failures {
                if record.lost_experts > 0 && record.recovered_s.is_none() {
                    record.recovered_s = Some(self.now);
                }
            }
            if let Some(stall) = self.stall.take() {
                self.stalled_s += self.now - stall.since;
                self.point.stalled += self.now - stall.since.max(self.point.start);
                for w in 0..self.workers.len() {
                    let (alive, phase, has_work) =
                        (self.workers[w].alive, self.workers[w].phase, self.workers[w].has_work());
                    match phase {
                        Phase::Held if alive => {
                            self.workers[w].finish(self.now, &mut self.tally);
                            self.start_step(w);
                        }
                        Phase::Idle if alive && has_work => self.start_step(w),
                        _ => {}
                    }
                }
            }
        }
    }

    fn stall_timeout(&mut self, id: u64) {
        let Some(stall) = self.stall.as_ref().filter(|s| s.id == id) else { return };
        let record = stall.failures.first().copied();
        let mut failed = 0;
        for worker in self.workers.iter_mut().filter(|w| w.alive) {
            failed += worker.fail_running(&mut self.tally);
        }
        if let Some(record) = record {
            self.failures[record].failed_requests += failed;
        }
        self.dirty = true;
        info!(policy = %self.policy, at_s = self.now, failed, "held steps timed out");
    }

    fn rebalance_check(&mut self) -> Result<(), SimError> {
        if self.window.iter().sum::<f64>() > 0.0 {
            self.measured.copy_from_slice(&self.window);
        }
        self.window.iter_mut().for_each(|w| *w = 0.0);
        if self.pending.is_some() || self.stall.is_some() {
            return Ok(());
        }
        let before = self.routing.imbalance(&self.measured, &self.alive, &mut self.scratch);
        if before <= self.config.rebalance_threshold {
            return Ok(());
        }
        let base = self.placement.clone();
        let solution = self.solve(Some(&base))?;
        let after = solution.mean_imbalance();
        self.begin_apply(solution.placement, &base, Reason::Rebalance, before, after);
        Ok(())
    }

    fn close_point(&mut self) {
        let interval = self.now - self.point.start;
        let mut stalled = self.point.stalled;
        if let Some(stall) = &self.stall {
            stalled += self.now - stall.since.max(self.point.start);
        }
        let live_workers = self.workers.iter().filter(|w| w.alive);
        let (running, waiting) = live_workers.fold((0, 0), |(r, q), w| (r + w.running(), q + w.waiting()));
        self.series.push(Point {
            t_s: self.now,
            output_tokens_per_s: self.tally.point_output_tokens as f64 / interval.max(f64::MIN_POSITIVE),
            imbalance: (self.point.ticks > 0).then(|| self.point.imbalance_sum / self.point.ticks as f64),
            ttft_p99_ms: self.tally.point_ttft.quantile(0.99),
            stalled_s: stalled,
            running,
            waiting,
            epoch: self.placement.epoch,
        });
        self.heat_column();
        self.tally.point_output_tokens = 0;
        self.tally.point_ttft.clear();
        self.point.start = self.now;
        self.point.imbalance_sum = 0.0;
        self.point.ticks = 0;
        self.point.stalled = 0.0;
        self.point.counts.iter_mut().for_each(|c| *c = 0.0);
    }

    /// The heatmaps' column of this point, from the routed tokens of its ticks and the placement in use.
    fn heat_column(&mut self) {
        let gpus = self.config.expert_gpus;
        let live = self.alive.iter().filter(|&&a| a).count().max(1) as f64;
        let mut hottest = vec![0.0f64; gpus];
        let mut per_gpu = vec![0.0f64; gpus];
        for layer in 0..self.layers {
            let base = layer * self.experts;
            per_gpu.iter_mut().for_each(|t| *t = 0.0);
            for (&g, &e) in self.routing.gpus[layer].iter().zip(&self.routing.owners[layer]) {
                per_gpu[g as usize] +=
                    self.point.counts[base + e as usize] * self.routing.inv_replicas[base + e as usize];
            }
            let mean = per_gpu.iter().sum::<f64>() / live;
            if mean > 0.0 {
                hottest.iter_mut().zip(&per_gpu).for_each(|(h, &t)| *h = h.max(t / mean));
            }
        }
        let routed = self.point.ticks > 0;
        let column = hottest
            .iter()
            .zip(&self.alive)
            .map(|(&h, &alive)| match (alive, routed) {
                (false, _) => f32::NAN,
                (true, false) => -1.0,
                (true, true) => h as f32,
            })
            .collect();
        self.heat.gpu_load.push(column);
        let base = self.config.plot_layer * self.experts;
        let layer = &self.point.counts[base..base + self.experts];
        let total: f64 = layer.iter().sum();
        let column = if total > 0.0 {
            layer.iter().map(|&c| (c * self.experts as f64 / total) as f32).collect()
        } else {
            vec![-1.0; self.experts]
        };
        self.heat.expert_load.push(column);
    }

    fn report(self) -> Report {
        let tally = &self.tally;
        // Counted where the requests are, not by difference, so that `arrived = completed + failed + rejected +
        // in_flight` checks the bookkeeping.
        let in_flight: usize = self.workers.iter().filter(|w| w.alive).map(AttentionWorker::outstanding).sum();
        let duration = self.config.duration_s;
        let per_step = |us: f64| if self.steps > 0 { us / self.steps as f64 / 1e3 } else { 0.0 };
        Report {
            policy: self.policy,
            simulated_s: duration,
            requests: Requests {
                arrived: tally.arrived,
                completed: tally.completed,
                failed: tally.failed,
                rejected: tally.rejected,
                in_flight: in_flight as u64,
            },
            output_tokens: tally.output_tokens,
            prefill_tokens: tally.prefill_tokens,
            output_tokens_per_s: tally.output_tokens as f64 / duration,
            total_tokens_per_s: (tally.output_tokens + tally.prefill_tokens) as f64 / duration,
            ttft: tally.ttft.summary(),
            tpot: tally.tpot.summary(),
            e2e: tally.e2e.summary(),
            steps: self.steps,
            mean_step_ms: per_step(self.step_us),
            mean_attention_ms: per_step(self.attention_us),
            mean_expert_ms: per_step(self.expert_us),
            imbalance: Imbalance {
                mean: if self.ticks > 0 { self.imbalance_sum / self.ticks as f64 } else { 1.0 },
                max: self.imbalance_max.max(1.0),
            },
            stalled_s: self.stalled_s,
            solver_runs: self.solver_runs,
            placements: self.placements,
            failures: self.failures,
            notes: self.notes,
            series: self.series,
            heat: self.heat,
        }
    }
}
