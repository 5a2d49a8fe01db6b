//! What a step costs: the only thing the simulator asks about the hardware and the model.
//!
//! [`StepCosts`] is the seam for a first-principles model or a calibrated one: the capacity planner's step model
//! implements it (`switchyard_planner::PlannerCosts`, the default of `switchyard simulate`; this crate does not
//! depend on the planner). [`AnchorCosts::h100_maverick`] is a roofline built from the H100 anchors in
//! `docs/performance.md` (shared docs) and Llama 4 Maverick's shapes (`--costs anchor`), good enough to rank
//! placements and show where time goes.

use serde::Serialize;

/// The work one attention worker does in one step (or one micro-batch of it), over all of its layers.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AttentionBatch {
    /// Sequences decoding one token each.
    pub decode_sequences: f64,
    /// Prompt tokens prefilled in the same step (chunked prefill).
    pub prefill_tokens: f64,
    /// Cached positions the decoding sequences attend to, summed over them (each reads its whole context).
    pub decode_context: f64,
    /// Query-key pairs of the prompt chunks (a chunk of `c` tokens after `p` cached ones: `c * (p + c / 2)`).
    pub prefill_pairs: f64,
}

impl AttentionBatch {
    /// New tokens: one per decoding sequence plus the prompt tokens.
    pub fn tokens(&self) -> f64 {
        self.decode_sequences + self.prefill_tokens
    }

    /// The same work split into `parts` equal micro-batches.
    pub fn split(&self, parts: f64) -> Self {
        Self {
            decode_sequences: self.decode_sequences / parts,
            prefill_tokens: self.prefill_tokens / parts,
            decode_context: self.decode_context / parts,
            prefill_pairs: self.prefill_pairs / parts,
        }
    }
}

/// Costs of the pieces of a step, in microseconds. Implementations must be cheap: the expert cost is asked for every
/// GPU and MoE layer at every expert tick.
pub trait StepCosts: Sync {
    /// The attention side of one step of one attention worker over all layers: attention, dense layers, router,
    /// shared expert, sampling. The simulator spreads it evenly over the MoE layers.
    fn attention_us(&self, batch: &AttentionBatch) -> f64;

    /// One MoE layer on one expert GPU: `tokens` routed tokens over `active_experts` local experts that received
    /// any (both may be fractional: they are expectations). 0 when `tokens` is 0.
    fn expert_us(&self, tokens: f64, active_experts: f64) -> f64;

    /// Moving `bytes` over one GPU's link (one side of a dispatch or combine), latency included.
    fn transfer_us(&self, bytes: f64) -> f64;

    /// Bytes one token's activation takes on the wire (a dispatch sends it, a combine returns as many).
    fn token_bytes(&self) -> f64;

    /// Bytes of one expert of one MoE layer: what a GPU loads to hold one more replica.
    fn expert_bytes(&self) -> f64;
}

/// A roofline: each piece takes the longer of its bytes over a bandwidth and its FLOPs over a rate, plus a fixed
/// overhead. Rates are effective ones measured on the hardware, not datasheet peaks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AnchorCosts {
    /// Weights the attention side reads every step (all layers but the routed experts), bytes.
    pub attention_weight_bytes: f64,
    /// FLOPs per new token through those weights.
    pub attention_flops_per_token: f64,
    /// Bandwidth at which the attention side streams its weights, bytes/s.
    pub attention_weight_bps: f64,
    /// Dense matmul rate, FLOP/s.
    pub dense_flops_per_s: f64,
    /// KV bytes one cached position takes over all layers.
    pub kv_bytes_per_position: f64,
    /// Bandwidth at which decode attention reads the KV cache, bytes/s.
    pub kv_read_bps: f64,
    /// FLOPs of one query-key pair over all layers (scores and weighted values).
    pub attention_flops_per_pair: f64,
    /// Prefill attention rate, FLOP/s.
    pub attention_flops_per_s: f64,
    /// Fixed cost of a step: scheduling, sampling, launches.
    pub step_overhead_us: f64,
    /// Weights of one routed expert in one layer, bytes.
    pub expert_weight_bytes: f64,
    /// FLOPs of one token through one expert.
    pub expert_flops_per_token: f64,
    /// Bandwidth at which a GPU streams expert weights in a grouped computation, bytes/s.
    pub expert_weight_bps: f64,
    /// Grouped expert matmul rate, FLOP/s.
    pub expert_flops_per_s: f64,
    /// Fixed cost of one layer's grouped computation on one GPU.
    pub expert_overhead_us: f64,
    /// Activation bytes per token on the wire.
    pub token_bytes: f64,
    /// One GPU's network bandwidth, bytes/s.
    pub link_bps: f64,
    /// One dispatch's or combine's latency.
    pub link_latency_us: f64,
}

impl AnchorCosts {
    /// Llama 4 Maverick on H100 80GB: bf16 attention side, FP8 routed experts, 400 Gb/s per GPU.
    ///
    /// Shapes: hidden 5120; 48 layers, 40 query / 8 KV heads of 128; dense MLP (24 layers) 16384, routed and shared
    /// expert 8192 (24 MoE layers), vocabulary 202048. Anchors (performance.md, H100, cuBLASLt): dense bf16 MLP
    /// weights stream at ~2.3 TB/s at one token and run at ~800 TFLOP/s at 2048; decode attention reads KV at
    /// 1.2-3.1 TB/s (2.0 used); prefill attention ~630 TFLOP/s; 16 local FP8 experts stream at ~2.5 TB/s grouped,
    /// one expert alone at ~1.6 TB/s (the 25 us overhead covers the difference), and compute runs at 0.86-1.19
    /// PFLOP/s (1.0 used); DeepEP internode moves 43-58 GB/s per GPU (50 used, 20 us latency).
    pub fn h100_maverick() -> Self {
        let hidden = 5120.0;
        let attention_params = 48.0 * hidden * (5120.0 + 1024.0 + 1024.0 + 5120.0)
            + 24.0 * 3.0 * hidden * 16384.0
            + 24.0 * (3.0 * hidden * 8192.0 + hidden * 128.0)
            + 202048.0 * hidden;
        let expert_params = 3.0 * hidden * 8192.0;
        Self {
            attention_weight_bytes: 2.0 * attention_params,
            attention_flops_per_token: 2.0 * attention_params,
            attention_weight_bps: 2.3e12,
            dense_flops_per_s: 0.8e15,
            kv_bytes_per_position: 48.0 * 8.0 * 128.0 * 2.0 * 2.0,
            kv_read_bps: 2.0e12,
            attention_flops_per_pair: 48.0 * 4.0 * 40.0 * 128.0,
            attention_flops_per_s: 0.63e15,
            step_overhead_us: 100.0,
            expert_weight_bytes: expert_params,
            expert_flops_per_token: 2.0 * expert_params,
            expert_weight_bps: 2.5e12,
            expert_flops_per_s: 1.0e15,
            expert_overhead_us: 25.0,
            token_bytes: 2.0 * hidden,
            link_bps: 50e9,
            link_latency_us: 20.0,
        }
    }
}

impl StepCosts for AnchorCosts {
    fn attention_us(&self, batch: &AttentionBatch) -> f64 {
        let dense = (self.attention_weight_bytes / self.attention_weight_bps)
            .max(batch.tokens() * self.attention_flops_per_token / self.dense_flops_per_s);
        let decode = batch.decode_context * self.kv_bytes_per_position / self.kv_read_bps;
        let prefill = batch.prefill_pairs * self.attention_flops_per_pair / self.attention_flops_per_s;
        self.step_overhead_us + (dense + decode + prefill) * 1e6
    }

    #[inline]
    fn expert_us(&self, tokens: f64, active_experts: f64) -> f64 {
        if tokens <= 0.0 {
            return 0.0;
        }
        let stream = active_experts * self.expert_weight_bytes / self.expert_weight_bps;
        let compute = tokens * self.expert_flops_per_token / self.expert_flops_per_s;
        self.expert_overhead_us + stream.max(compute) * 1e6
    }

    fn transfer_us(&self, bytes: f64) -> f64 {
        self.link_latency_us + bytes / self.link_bps * 1e6
    }

    fn token_bytes(&self) -> f64 {
        self.token_bytes
    }

    fn expert_bytes(&self) -> f64 {
        self.expert_weight_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h100_roofline_matches_its_anchors() {
        let costs = AnchorCosts::h100_maverick();
        // One Maverick expert at 16..128 tokens: 45 + 34 us measured (gate_up + down).
        let one = costs.expert_us(64.0, 1.0);
        assert!((70.0..90.0).contains(&one), "{one}");
        // 16 experts, 128 tokens: 534 us for gate_up alone, so ~800 us for the whole expert.
        let grouped = costs.expert_us(128.0, 16.0);
        assert!((750.0..900.0).contains(&grouped), "{grouped}");
        // Weight-bound decode: the attention side streams ~26 GB per step.
        let decode = costs.attention_us(&AttentionBatch { decode_sequences: 1.0, ..Default::default() });
        assert!((10_000.0..13_000.0).contains(&decode), "{decode}");
        assert_eq!(costs.expert_us(0.0, 0.0), 0.0);
    }
}
