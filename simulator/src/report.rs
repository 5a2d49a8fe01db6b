//! What a run reports: totals, latency percentiles, placement changes, failures and a time series.

use serde::Serialize;

use crate::config::Policy;
use crate::stats::Latency;

/// Where every request that arrived ended up: `arrived = completed + failed + rejected + in_flight`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Requests {
    /// Arrived during the run.
    pub arrived: u64,
    /// Generated their whole output.
    pub completed: u64,
    /// Lost with an attention worker, or held past the recovery timeout.
    pub failed: u64,
    /// Refused at arrival: the chosen attention worker's waiting queue was full (or none was alive).
    pub rejected: u64,
    /// Still waiting or running when the run ended.
    pub in_flight: u64,
}

/// Why a placement changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The placement at the start.
    Initial,
    /// Measured load passed the rebalance threshold.
    Rebalance,
    /// GPUs were lost.
    Recovery,
}

/// One placement the coordinator applied.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlacementChange {
    /// When it was decided.
    pub decided_s: f64,
    /// When routers switched to it: after the solve and the slowest GPU's weight loads.
    pub ready_s: f64,
    /// Why.
    pub reason: Reason,
    /// Its epoch.
    pub epoch: u64,
    /// Replicas loaded onto GPUs that did not hold them, over all layers.
    pub added_replicas: usize,
    /// Expert weights those replicas moved, GB.
    pub moved_gb: f64,
    /// Predicted max/mean GPU load of the placement it replaced under the loads it was solved for (mean over
    /// layers); `None` for the first placement.
    pub imbalance_before: Option<f64>,
    /// Predicted max/mean GPU load of this placement under the same loads.
    pub imbalance_after: f64,
}

/// One failure and its consequences.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailureRecord {
    /// When.
    pub at_s: f64,
    /// What failed, in words.
    pub what: String,
    /// (Layer, expert) pairs that no live GPU held afterwards: steps wait for re-placement while any is left.
    pub lost_experts: usize,
    /// When a placement covering every expert again was in use (`None`: never, or nothing was lost).
    pub recovered_s: Option<f64>,
    /// Requests failed by it: those on a lost attention worker, or held past the recovery timeout.
    pub failed_requests: u64,
}

/// One point of the time series, covering the interval that ends at `t_s`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    /// End of the interval.
    pub t_s: f64,
    /// Output tokens generated in the interval, per second.
    pub output_tokens_per_s: f64,
    /// Max/mean routed tokens per live expert GPU, mean over layers and expert ticks (`None`: no steps ran).
    pub imbalance: Option<f64>,
    /// 99th percentile of the first-token times recorded in the interval.
    pub ttft_p99_ms: Option<f64>,
    /// Seconds of the interval during which steps waited for a placement.
    pub stalled_s: f64,
    /// Requests admitted and unfinished at the end, over all attention workers.
    pub running: usize,
    /// Requests waiting for admission at the end.
    pub waiting: usize,
    /// The placement epoch in use at the end.
    pub epoch: u64,
}

/// The heatmaps' data, one column per time-series point (not in the JSON: it is large). A value of -1 means no
/// token was routed in that interval.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Heat {
    /// Per point, per expert GPU: its routed tokens over the mean of live GPUs in its most loaded layer, the layer it
    /// slows down most (NaN: dead).
    pub gpu_load: Vec<Vec<f32>>,
    /// Per point, per expert of the plotted layer: its share of the layer's tokens times the expert count (1 is an
    /// even share).
    pub expert_load: Vec<Vec<f32>>,
}

/// Max/mean routed tokens per live expert GPU, as the steps saw it (sampled routing, not the solver's prediction).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Imbalance {
    /// Mean over expert ticks of the mean over layers.
    pub mean: f64,
    /// The worst tick.
    pub max: f64,
}

/// Everything one run of one policy reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The placement policy.
    pub policy: Policy,
    /// Simulated seconds.
    pub simulated_s: f64,
    /// Requests by outcome.
    pub requests: Requests,
    /// Tokens generated (first tokens included).
    pub output_tokens: u64,
    /// Prompt tokens processed.
    pub prefill_tokens: u64,
    /// Output tokens per simulated second.
    pub output_tokens_per_s: f64,
    /// Prompt and output tokens per simulated second.
    pub total_tokens_per_s: f64,
    /// Time to first token of requests that got one.
    pub ttft: Latency,
    /// Time per output token after the first, of completed requests.
    pub tpot: Latency,
    /// Arrival to last token, of completed requests.
    pub e2e: Latency,
    /// Attention-worker steps run.
    pub steps: u64,
    /// Mean duration of a step, ms.
    pub mean_step_ms: f64,
    /// Of which the attention side (all layers), ms: with one micro-batch, step = attention + expert side.
    pub mean_attention_ms: f64,
    /// Expert side of a step summed over MoE layers (dispatch, the slowest GPU's expert computation, combine), ms.
    pub mean_expert_ms: f64,
    /// Expert-load imbalance as the steps saw it.
    pub imbalance: Imbalance,
    /// Simulated seconds during which steps waited for a placement.
    pub stalled_s: f64,
    /// Times the coordinator's solver ran.
    pub solver_runs: u64,
    /// Every placement applied, the first included.
    pub placements: Vec<PlacementChange>,
    /// Every failure.
    pub failures: Vec<FailureRecord>,
    /// Things the run could not do (e.g. no placement fits the live GPUs).
    pub notes: Vec<String>,
    /// The time series.
    pub series: Vec<Point>,
    /// The heatmaps' data.
    #[serde(skip)]
    pub heat: Heat,
}

impl Report {
    /// Weights moved by every placement change after the first, GB.
    pub fn moved_gb(&self) -> f64 {
        self.placements.iter().filter(|p| p.reason != Reason::Initial).map(|p| p.moved_gb).fold(0.0, |a, b| a + b)
    }

    /// Output tokens per second over the points whose interval lies within `[from_s, to_s]`.
    pub fn throughput_between(&self, from_s: f64, to_s: f64) -> Option<f64> {
        let (sum, count) = self
            .series
            .windows(2)
            .filter(|w| w[0].t_s >= from_s && w[1].t_s <= to_s)
            .fold((0.0, 0usize), |(s, c), w| (s + w[1].output_tokens_per_s, c + 1));
        (count > 0).then(|| sum / count as f64)
    }
}
