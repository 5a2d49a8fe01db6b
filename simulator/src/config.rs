//! What to simulate: the cluster's shape, the workload, the faults and the control loop's settings.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::error::{config_error, SimError};

/// Request lengths drawn uniformly from `min..=max` (equal ends: a fixed length).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Lengths {
    /// Shortest.
    pub min: u32,
    /// Longest.
    pub max: u32,
}

impl Lengths {
    /// Always `n` tokens.
    pub fn fixed(n: u32) -> Self {
        Self { min: n, max: n }
    }
}

impl FromStr for Lengths {
    type Err = SimError;

    /// `N` or `MIN-MAX`.
    fn from_str(s: &str) -> Result<Self, SimError> {
        let parse = |part: &str| {
            part.trim().parse::<u32>().map_err(|e| config_error("lengths", format!("{s:?} is not N or MIN-MAX: {e}")))
        };
        let lengths = match s.split_once('-') {
            Some((lo, hi)) => Self { min: parse(lo)?, max: parse(hi)? },
            None => Self::fixed(parse(s)?),
        };
        if lengths.min == 0 || lengths.min > lengths.max {
            return Err(config_error("lengths", format!("{s:?}: need 1 <= MIN <= MAX")));
        }
        Ok(lengths)
    }
}

impl fmt::Display for Lengths {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}-{}", self.min, self.max)
        }
    }
}

/// What fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "index")]
pub enum FailureTarget {
    /// One expert GPU, drawn from the live ones with the run's seed.
    AnyExpertGpu,
    /// Expert GPU `i` (0-based).
    ExpertGpu(usize),
    /// Every expert GPU of node `i` (GPU `g` is on node `g / gpus_per_node`).
    Node(usize),
    /// Attention worker `i`: the requests it holds fail.
    AttentionWorker(usize),
}

/// A failure at a simulated time. Failed machines do not come back.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Failure {
    /// Simulated seconds from the start.
    pub at_s: f64,
    /// What fails.
    pub target: FailureTarget,
}

impl FromStr for Failure {
    type Err = SimError;

    /// `SECONDS` (a random expert GPU), `SECONDS:gpu:I`, `SECONDS:node:I` or `SECONDS:attention:I`.
    fn from_str(s: &str) -> Result<Self, SimError> {
        let bad = |why: &str| {
            config_error(
                "failures",
                format!("{s:?} {why} (SECONDS, SECONDS:gpu:I, SECONDS:node:I or SECONDS:attention:I)"),
            )
        };
        let mut parts = s.split(':');
        let at_s: f64 = parts.next().unwrap_or_default().trim().parse().map_err(|_| bad("has no time in seconds"))?;
        if !at_s.is_finite() || at_s < 0.0 {
            return Err(bad("has a time that is negative or not finite"));
        }
        let target = match (parts.next(), parts.next(), parts.next()) {
            (None, _, _) => FailureTarget::AnyExpertGpu,
            (Some(kind), Some(index), None) => {
                let index: usize = index.trim().parse().map_err(|_| bad("has an index that is not a number"))?;
                match kind.trim() {
                    "gpu" | "expert" => FailureTarget::ExpertGpu(index),
                    "node" => FailureTarget::Node(index),
                    "attention" => FailureTarget::AttentionWorker(index),
                    _ => return Err(bad("names an unknown kind of machine")),
                }
            }
            _ => return Err(bad("is malformed")),
        };
        Ok(Self { at_s, target })
    }
}

/// How experts are placed on the expert GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Replicas dealt round-robin over the GPUs, redundant ones round-robin over the experts, blind to load; never
    /// rebalanced. A lost GPU's experts that no other GPU holds are dealt round-robin onto survivors.
    Static,
    /// The coordinator's solver places once from the load at start, then only re-places after failures.
    SolverOnce,
    /// The coordinator's solver places from the load at start, rebalances from measured load whenever the
    /// predicted imbalance passes the threshold (checked every rebalance interval) and re-places after failures.
    Solver,
}

impl Policy {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Static => "static",
            Policy::SolverOnce => "solver-once",
            Policy::Solver => "solver",
        }
    }

    /// Whether the coordinator's solver places experts.
    pub fn uses_solver(self) -> bool {
        !matches!(self, Policy::Static)
    }
}

impl FromStr for Policy {
    type Err = SimError;

    fn from_str(s: &str) -> Result<Self, SimError> {
        match s.trim() {
            "static" => Ok(Policy::Static),
            "solver-once" => Ok(Policy::SolverOnce),
            "solver" => Ok(Policy::Solver),
            other => Err(config_error("policy", format!("{other:?} is not static, solver-once or solver"))),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything a run depends on besides the step costs and the policy. Times are simulated seconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimConfig {
    /// Attention workers (one GPU each): attention, dense layers, router, shared expert and the KV cache.
    pub attention_workers: usize,
    /// Expert-worker GPUs.
    pub expert_gpus: usize,
    /// Expert GPUs per node (host); the solver spreads replicas over nodes, and a node can fail as one.
    pub gpus_per_node: usize,
    /// Expert replicas one expert GPU holds in each MoE layer.
    pub slots_per_gpu: usize,
    /// Replicas beyond one per expert in each MoE layer.
    pub redundant_slots: usize,
    /// Routed experts per MoE layer.
    pub experts: u32,
    /// MoE layers.
    pub moe_layers: usize,
    /// Token budget of one attention worker's step (decode tokens first, then chunks of prompts).
    pub max_batch_tokens: u32,
    /// Sequences one attention worker runs at once.
    pub max_seqs: u32,
    /// KV cache of one attention worker, in token positions; a request reserves its prompt plus output at admission.
    pub kv_tokens: u64,
    /// Requests waiting at one attention worker beyond which new ones are refused.
    pub max_waiting: usize,
    /// 1, or 2 for ping-pong (one micro-batch's attention overlaps the other's expert layers).
    pub micro_batches: u32,
    /// Request arrivals per second (Poisson).
    pub rate: f64,
    /// Prompt lengths.
    pub input_len: Lengths,
    /// Output lengths (tokens generated, the first one included).
    pub output_len: Lengths,
    /// Simulated time; arrivals stop then and requests still running count as in flight.
    pub duration_s: f64,
    /// Zipf exponent of expert popularity (0: uniform).
    pub zipf: f64,
    /// Popularity swaps per layer per drift window (see `switchyard_coordinator::traces`).
    pub drift_swaps: usize,
    /// Length of a drift window.
    pub drift_interval_s: f64,
    /// Failures, in any order.
    pub failures: Vec<Failure>,
    /// From a GPU's death to the coordinator acting on it (its lease lapsing: about two lease periods).
    pub detect_s: f64,
    /// Time the coordinator takes to compute a placement (the solver's wall time is not simulated time).
    pub solve_s: f64,
    /// Bandwidth at which one GPU loads expert weights it is given, GB/s.
    pub load_gbps: f64,
    /// Expert computation on a GPU that is loading weights is slower by this fraction.
    pub load_slowdown: f64,
    /// A step whose experts no live GPU holds waits this long for a new placement, then its requests fail.
    pub recovery_timeout_s: f64,
    /// How often the coordinator looks at measured load (the `solver` policy).
    pub rebalance_interval_s: f64,
    /// Rebalance when the most loaded GPU would carry more than this many times the mean (averaged over layers).
    pub rebalance_threshold: f64,
    /// How often the expert side's per-layer times are recomputed from the tokens in flight.
    pub expert_tick_s: f64,
    /// Length of one point of the time series.
    pub sample_interval_s: f64,
    /// The MoE layer whose per-expert load the expert heatmap shows.
    pub plot_layer: usize,
    /// Seed of every random draw: arrivals, lengths, routing noise, drift and random failure targets.
    pub seed: u64,
}

impl Default for SimConfig {
    /// A small cluster serving Llama 4 Maverick's routing shape (128 experts, 24 MoE layers) under moderate load;
    /// the control settings are the coordinator's and attention workers' defaults.
    fn default() -> Self {
        Self {
            attention_workers: 16,
            expert_gpus: 32,
            gpus_per_node: 8,
            slots_per_gpu: 5,
            redundant_slots: 32,
            experts: 128,
            moe_layers: 24,
            max_batch_tokens: 2048,
            max_seqs: 256,
            kv_tokens: 200_000,
            max_waiting: 1024,
            micro_batches: 1,
            rate: 200.0,
            input_len: Lengths::fixed(1024),
            output_len: Lengths::fixed(256),
            duration_s: 120.0,
            zipf: 1.0,
            drift_swaps: 4,
            drift_interval_s: 10.0,
            failures: Vec::new(),
            detect_s: 4.0,
            solve_s: 0.05,
            load_gbps: 25.0,
            load_slowdown: 0.1,
            recovery_timeout_s: 30.0,
            rebalance_interval_s: 30.0,
            rebalance_threshold: 1.25,
            expert_tick_s: 0.02,
            sample_interval_s: 1.0,
            plot_layer: 0,
            seed: 42,
        }
    }
}

impl SimConfig {
    /// Checks every setting, naming the first unusable one.
    pub fn validate(&self) -> Result<(), SimError> {
        let at_least_one = [
            ("attention_workers", self.attention_workers),
            ("expert_gpus", self.expert_gpus),
            ("gpus_per_node", self.gpus_per_node),
            ("slots_per_gpu", self.slots_per_gpu),
            ("moe_layers", self.moe_layers),
            ("max_waiting", self.max_waiting),
        ];
        for (field, value) in at_least_one {
            if value == 0 {
                return Err(config_error(field, "must be at least 1"));
            }
        }
        if self.experts == 0 {
            return Err(config_error("experts", "must be at least 1"));
        }
        if self.max_batch_tokens == 0 || self.max_seqs == 0 {
            return Err(config_error("max_batch_tokens", "the step budget and max_seqs must be at least 1"));
        }
        if self.max_seqs > self.max_batch_tokens {
            return Err(config_error(
                "max_seqs",
                format!(
                    "{} sequences cannot all decode within a step budget of {} tokens",
                    self.max_seqs, self.max_batch_tokens
                ),
            ));
        }
        if !(1..=2).contains(&self.micro_batches) {
            return Err(config_error("micro_batches", format!("{} is not 1 or 2", self.micro_batches)));
        }
        let experts = self.experts as usize;
        let slots = self.expert_gpus * self.slots_per_gpu;
        if slots < experts + self.redundant_slots {
            return Err(config_error(
                "slots_per_gpu",
                format!(
                    "{} GPUs x {} slots = {slots} slots per layer, but {experts} experts + {} redundant replicas \
                     need {}",
                    self.expert_gpus,
                    self.slots_per_gpu,
                    self.redundant_slots,
                    experts + self.redundant_slots
                ),
            ));
        }
        if self.redundant_slots > experts * (self.expert_gpus - 1) {
            return Err(config_error(
                "redundant_slots",
                format!(
                    "{} redundant replicas: at most {} fit {experts} experts on {} GPUs (one replica per GPU)",
                    self.redundant_slots,
                    experts * (self.expert_gpus - 1),
                    self.expert_gpus
                ),
            ));
        }
        if self.plot_layer >= self.moe_layers {
            return Err(config_error(
                "plot_layer",
                format!("{} is beyond the {} MoE layers", self.plot_layer, self.moe_layers),
            ));
        }
        let most = u64::from(self.input_len.max) + u64::from(self.output_len.max);
        if most > self.kv_tokens {
            return Err(config_error(
                "kv_tokens",
                format!(
                    "a request of {most} tokens (longest prompt + output) cannot fit {} KV positions",
                    self.kv_tokens
                ),
            ));
        }
        for (field, lengths) in [("input_len", self.input_len), ("output_len", self.output_len)] {
            if lengths.min == 0 || lengths.min > lengths.max {
                return Err(config_error(field, format!("{lengths}: need 1 <= min <= max")));
            }
        }
        let positive = [
            ("rate", self.rate),
            ("duration_s", self.duration_s),
            ("drift_interval_s", self.drift_interval_s),
            ("load_gbps", self.load_gbps),
            ("rebalance_interval_s", self.rebalance_interval_s),
            ("expert_tick_s", self.expert_tick_s),
            ("sample_interval_s", self.sample_interval_s),
        ];
        for (field, value) in positive {
            if !(value.is_finite() && value > 0.0) {
                return Err(config_error(field, format!("{value} must be a positive number")));
            }
        }
        let not_negative = [
            ("zipf", self.zipf),
            ("detect_s", self.detect_s),
            ("solve_s", self.solve_s),
            ("load_slowdown", self.load_slowdown),
            ("recovery_timeout_s", self.recovery_timeout_s),
        ];
        for (field, value) in not_negative {
            if !(value.is_finite() && value >= 0.0) {
                return Err(config_error(field, format!("{value} must be a number >= 0")));
            }
        }
        if !(self.rebalance_threshold.is_finite() && self.rebalance_threshold >= 1.0) {
            return Err(config_error(
                "rebalance_threshold",
                format!("{} must be a max/mean load ratio >= 1", self.rebalance_threshold),
            ));
        }
        let nodes = self.expert_gpus.div_ceil(self.gpus_per_node);
        for failure in &self.failures {
            if failure.at_s > self.duration_s {
                return Err(config_error(
                    "failures",
                    format!("a failure at {} s is after the end ({} s)", failure.at_s, self.duration_s),
                ));
            }
            let (what, index, count) = match failure.target {
                FailureTarget::AnyExpertGpu => continue,
                FailureTarget::ExpertGpu(i) => ("expert GPU", i, self.expert_gpus),
                FailureTarget::Node(i) => ("node", i, nodes),
                FailureTarget::AttentionWorker(i) => ("attention worker", i, self.attention_workers),
            };
            if index >= count {
                return Err(config_error(
                    "failures",
                    format!("{what} {index} at {} s does not exist: there are {count}", failure.at_s),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_failures_parse() {
        assert_eq!("256".parse::<Lengths>().expect("parses"), Lengths::fixed(256));
        assert_eq!("16-64".parse::<Lengths>().expect("parses"), Lengths { min: 16, max: 64 });
        assert!("64-16".parse::<Lengths>().is_err());
        assert!("0".parse::<Lengths>().is_err());
        let any: Failure = "12.5".parse().expect("parses");
        assert_eq!(any, Failure { at_s: 12.5, target: FailureTarget::AnyExpertGpu });
        let node: Failure = "3:node:1".parse().expect("parses");
        assert_eq!(node.target, FailureTarget::Node(1));
        let err = "3:rack:1".parse::<Failure>().expect_err("refused").to_string();
        assert!(err.contains("unknown kind"), "{err}");
        assert!("-1".parse::<Failure>().is_err());
    }

    #[test]
    fn impossible_clusters_are_refused_with_numbers() {
        let config = SimConfig { expert_gpus: 4, slots_per_gpu: 8, redundant_slots: 8, ..SimConfig::default() };
        let err = config.validate().expect_err("too few slots").to_string();
        assert!(err.contains("32 slots per layer") && err.contains("need 136"), "{err}");
        let config = SimConfig { failures: vec!["5:gpu:32".parse().expect("parses")], ..SimConfig::default() };
        let err = config.validate().expect_err("no such gpu").to_string();
        assert!(err.contains("expert GPU 32"), "{err}");
        SimConfig::default().validate().expect("the default is valid");
    }
}
