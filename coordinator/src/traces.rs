//! Synthetic routing traces: routed tokens per expert and MoE layer, Zipf-skewed and drifting over time, for
//! benchmarking and testing the placement solver without a running model.
//!
//! In each layer the experts are ranked by a random permutation (a different one per layer); the expert at rank `k`
//! receives a share proportional to `1 / (k + 1)^skew` of the window's tokens. Each window a few experts swap
//! popularity with a near neighbour in the ranking, so loads drift gradually, the way routing statistics move while
//! traffic changes. Everything follows from the seed.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{CoordinatorError, PlacementProblem, Solver, WorkerSlots};

/// Shape and drift of a trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceConfig {
    /// Routed experts per layer.
    pub experts: usize,
    /// MoE layers.
    pub layers: usize,
    /// Zipf exponent: 0 is uniform, larger is more skewed.
    pub skew: f64,
    /// Routed tokens per layer in one window.
    pub tokens_per_window: f64,
    /// Popularity swaps per layer per window.
    pub swaps_per_window: usize,
    /// A swap exchanges the experts at ranks `k` and `k + d`, `d` drawn from `1..=max_rank_step`.
    pub max_rank_step: usize,
    /// Seed of everything random.
    pub seed: u64,
}

impl TraceConfig {
    /// Llama 4 Maverick's shape (128 experts, 24 MoE layers) with one million routed tokens per layer per window and
    /// four swaps of up to four ranks per layer per window.
    pub fn maverick(skew: f64, seed: u64) -> Self {
        Self {
            experts: 128,
            layers: 24,
            skew,
            tokens_per_window: 1_000_000.0,
            swaps_per_window: 4,
            max_rank_step: 4,
            seed,
        }
    }
}

/// Normalised Zipf weights: the share of tokens of ranks `0..experts`.
pub fn zipf_weights(experts: usize, skew: f64) -> Vec<f64> {
    let raw: Vec<f64> = (0..experts).map(|k| ((k + 1) as f64).powf(-skew)).collect();
    let total: f64 = raw.iter().sum();
    raw.into_iter().map(|w| w / total).collect()
}

/// A drifting trace; [`ZipfTrace::loads`] is the current window, [`ZipfTrace::advance`] moves to the next.
#[derive(Debug, Clone)]
pub struct ZipfTrace {
    config: TraceConfig,
    weights: Vec<f64>,
    /// Per layer: the expert at each popularity rank.
    ranking: Vec<Vec<u32>>,
    rng: ChaCha8Rng,
    window: u64,
}

impl ZipfTrace {
    /// Window 0 of the trace described by `config`.
    pub fn new(config: TraceConfig) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let ranking = (0..config.layers)
            .map(|_| {
                let mut experts: Vec<u32> = (0..config.experts as u32).collect();
                experts.shuffle(&mut rng);
                experts
            })
            .collect();
        Self { weights: zipf_weights(config.experts, config.skew), config, ranking, rng, window: 0 }
    }

    /// The configuration.
    pub fn config(&self) -> &TraceConfig {
        &self.config
    }

    /// Index of the current window (0 at the start).
    pub fn window(&self) -> u64 {
        self.window
    }

    /// Routed tokens per expert, per layer, in the current window.
    pub fn loads(&self) -> Vec<Vec<f64>> {
        self.ranking
            .iter()
            .map(|ranking| {
                let mut loads = vec![0.0; self.config.experts];
                for (rank, &expert) in ranking.iter().enumerate() {
                    loads[expert as usize] = self.weights[rank] * self.config.tokens_per_window;
                }
                loads
            })
            .collect()
    }

    /// Moves to the next window: in each layer, `swaps_per_window` experts swap popularity with a near neighbour.
    pub fn advance(&mut self) {
        let experts = self.config.experts;
        if experts >= 2 {
            let step = self.config.max_rank_step.clamp(1, experts - 1);
            for ranking in &mut self.ranking {
                for _ in 0..self.config.swaps_per_window {
                    let d = self.rng.random_range(1..=step);
                    let rank = self.rng.random_range(0..experts - d);
                    ranking.swap(rank, rank + d);
                }
            }
        }
        self.window += 1;
    }
}

/// One rebalance of a replayed trace: the incremental placement next to one computed from scratch, both for the same
/// window's loads and both measured against the placement in use before the rebalance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rebalance {
    /// The trace window whose loads were placed.
    pub window: u64,
    /// Max/mean load per worker of the incremental placement, averaged over layers.
    pub incremental_imbalance: f64,
    /// Replicas the incremental placement adds to workers that did not hold them (all layers).
    pub incremental_added: usize,
    /// Max/mean load per worker of the from-scratch placement, averaged over layers.
    pub scratch_imbalance: f64,
    /// Replicas the from-scratch placement adds to workers that did not hold them (all layers).
    pub scratch_added: usize,
}

/// A trace replayed through the solver: the first placement and every rebalance after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Replay {
    /// Max/mean load per worker of the first (from-scratch) placement, averaged over layers.
    pub initial_imbalance: f64,
    /// The largest max/mean load of one layer in the first placement.
    pub initial_worst_layer: f64,
    /// Lower bound on max/mean load for the first window, averaged over layers (what no placement can beat with
    /// the solver's replica counts).
    pub initial_bound: f64,
    /// One per measured window (after the warm-up).
    pub rebalances: Vec<Rebalance>,
}

/// Places window 0 of `trace` from scratch on `workers` (MoE layers `moe_layers`, one per trace layer), rebalances
/// incrementally through `warmup` windows, then for each of `windows` further windows rebalances incrementally from
/// the previous placement and, for comparison, places from scratch.
///
/// The warm-up matters for the comparison: right after a from-scratch start, the previous placement is itself what
/// the (deterministic) solver computes from scratch for nearly the same loads, so a from-scratch placement lands
/// unrealistically close to it. After a few incremental rebalances the cluster is in the state it is in while
/// serving.
pub fn replay(
    solver: &Solver,
    trace: &mut ZipfTrace,
    moe_layers: &[u32],
    workers: &[WorkerSlots],
    redundant_slots: usize,
    warmup: usize,
    windows: usize,
) -> Result<Replay, CoordinatorError> {
    if moe_layers.len() != trace.config().layers {
        return Err(CoordinatorError::Placement {
            reason: format!("{} MoE layers for a trace of {} layers", moe_layers.len(), trace.config().layers),
        });
    }
    let problem = |trace: &ZipfTrace| PlacementProblem {
        experts: trace.config().experts as u32,
        loads: moe_layers.iter().copied().zip(trace.loads()).collect(),
        workers: workers.to_vec(),
        redundant_slots,
    };
    let first = solver.solve_from_scratch(&problem(trace), 1)?;
    let mean_bound = first.layers.values().map(|l| l.lower_bound / l.mean_load.max(f64::MIN_POSITIVE)).sum::<f64>()
        / first.layers.len().max(1) as f64;
    let mut report = Replay {
        initial_imbalance: first.mean_imbalance(),
        initial_worst_layer: first.layers.values().map(|l| l.imbalance()).fold(0.0, f64::max),
        initial_bound: mean_bound,
        rebalances: Vec::with_capacity(windows),
    };
    let mut current = first.placement;
    for _ in 0..warmup {
        trace.advance();
        current = solver.solve(&problem(trace), &current)?.placement;
    }
    for _ in 0..windows {
        trace.advance();
        let problem = problem(trace);
        let incremental = solver.solve(&problem, &current)?;
        let scratch = solver.solve_from_scratch(&problem, incremental.placement.epoch)?;
        report.rebalances.push(Rebalance {
            window: trace.window(),
            incremental_imbalance: incremental.mean_imbalance(),
            incremental_added: incremental.placement.added_replicas(&current),
            scratch_imbalance: scratch.mean_imbalance(),
            scratch_added: scratch.placement.added_replicas(&current),
        });
        current = incremental.placement;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(seed: u64) -> TraceConfig {
        TraceConfig { experts: 16, layers: 3, ..TraceConfig::maverick(1.0, seed) }
    }

    #[test]
    fn zipf_weights_sum_to_one_and_fall_with_rank() {
        let w = zipf_weights(128, 1.0);
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(w.windows(2).all(|p| p[0] > p[1]));
        assert!((w[0] / w[1] - 2.0).abs() < 1e-12);
        assert!(zipf_weights(4, 0.0).iter().all(|&x| (x - 0.25).abs() < 1e-12));
    }

    #[test]
    fn layers_rank_experts_differently_and_seeds_repeat() {
        let trace = ZipfTrace::new(config(7));
        let loads = trace.loads();
        assert_eq!(loads.len(), 3);
        assert!(loads.iter().all(|l| (l.iter().sum::<f64>() - 1e6).abs() < 1e-3));
        assert_ne!(loads[0], loads[1]);
        assert_eq!(ZipfTrace::new(config(7)).loads(), loads);
        assert_ne!(ZipfTrace::new(config(8)).loads(), loads);
    }

    #[test]
    fn drift_swaps_a_few_experts_per_window() {
        let mut trace = ZipfTrace::new(config(3));
        let before = trace.loads();
        trace.advance();
        assert_eq!(trace.window(), 1);
        let after = trace.loads();
        for (b, a) in before.iter().zip(&after) {
            let changed = b.iter().zip(a).filter(|(x, y)| x != y).count();
            assert!(changed <= 2 * trace.config().swaps_per_window, "{changed} experts changed");
            let mut sorted_b = b.clone();
            let mut sorted_a = a.clone();
            sorted_b.sort_by(f64::total_cmp);
            sorted_a.sort_by(f64::total_cmp);
            assert_eq!(sorted_a, sorted_b, "drift permutes popularity, the distribution stays");
        }
        assert_ne!(before, after);
    }
}
