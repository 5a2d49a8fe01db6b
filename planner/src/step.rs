//! The step-time model: how long one engine step of an attention worker takes for a given cluster shape and load,
//! from the FLOPs and bytes of every component over the profile's rates.
//!
//! Per layer, with `m` tokens in the (micro-)batch:
//! - a weight matrix set of `params` parameters held in `bytes` costs `max(bytes / stream_bw, 2 m params /
//!   gemm_rate(m))`: streaming the weights bounds small batches, compute bounds large ones (a roofline whose compute
//!   roof may be a measured curve);
//! - decode attention reads every kept KV byte of every sequence: `launch + max(kv_bytes / kv_bw, flops /
//!   attention_rate)`; chunked layers keep at most one chunk; prefill attention is `4 q_dim ctx` FLOPs per token;
//! - an MoE layer sends each routed token to an expert worker (`hidden x wire bytes`, plus a scale for FP8) and
//!   gets `hidden x combine bytes` back: `2 latency + max(bytes of one attention worker, bytes of the busiest
//!   expert worker) / link_bw`;
//! - the busiest expert worker gets `tokens x imbalance / expert_workers` tokens over its slots; `touched = slots (1 -
//!   exp(-load / slots))` experts are used, each costing the weight-stream-or-compute maximum at `load / touched`
//!   tokens.
//!
//! Composition: on separate devices, one micro-batch costs `attention + router + max(shared expert, dispatch +
//! experts + combine)` per MoE layer (the shared expert overlaps the dispatch); two micro-batches ping-pong, so each
//! MoE layer costs `2 max(A_half, X_half)` where A is the attention worker's work and X the dispatch, expert and
//! combine time of one half (each half re-streams the weights, which is why ping-pong only pays when the expert
//! side or the link is comparable to the attention side). On a shared host (`cpu`), every worker's work competes for
//! the same cores, so all of it adds up. Every step adds a fixed overhead plus a per-sequence one.

use serde::Serialize;
use switchyard_model::memory::{KvBytes, Precision, WeightBytes};

use crate::hardware::HardwareProfile;
use crate::model::ModelSpec;

/// The cluster shape the model is evaluated for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Shape {
    /// Attention workers (one GPU each, or one process on a shared host).
    pub attention_workers: u32,
    /// Expert workers (one GPU each, or one process on a shared host).
    pub expert_workers: u32,
    /// Expert replicas each expert worker holds per MoE layer.
    pub slots_per_expert_worker: u32,
    /// Replicas beyond one per expert, per MoE layer.
    pub redundant_slots: u32,
    /// Micro-batches in flight per attention worker (2 = ping-pong).
    pub micro_batches: u32,
    /// Encoding of expert inputs on the wire.
    pub dispatch: Precision,
    /// Encoding of expert outputs on the wire.
    pub combine: Precision,
    /// Max over mean tokens per expert worker, from the placement of a skewed load.
    pub imbalance: f64,
}

/// What one attention worker computes in one step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepLoad {
    /// Sequences decoding one token each.
    pub decode_sequences: f64,
    /// Prompt tokens prefilled in the same step (chunked prefill).
    pub prefill_tokens: f64,
    /// Mean context (tokens) of the decoding sequences.
    pub decode_context: f64,
    /// Mean context a prefilled token attends to.
    pub prefill_context: f64,
}

/// Where a step's time goes; the parts of the attention worker and of the MoE path, before overlap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StepTime {
    /// The step, after overlap: the time per output token of a decoding sequence.
    pub total_s: f64,
    /// Attention worker GEMMs (projections, dense MLPs, shared experts, routers, lm_head).
    pub dense_gemm_s: f64,
    /// Attention itself (KV reads and attention FLOPs).
    pub attention_s: f64,
    /// Routed experts on the busiest expert worker (on a shared host: on all of them).
    pub experts_s: f64,
    /// Dispatch and combine.
    pub communication_s: f64,
    /// Fixed and per-sequence overhead.
    pub overhead_s: f64,
}

impl StepTime {
    /// The largest part and its name: what bounds the step.
    pub fn bottleneck(&self) -> (&'static str, f64) {
        [
            ("attention-worker GEMMs (weight streaming or FLOPs)", self.dense_gemm_s),
            ("attention (KV reads)", self.attention_s),
            ("routed experts on the expert workers", self.experts_s),
            ("dispatch/combine links", self.communication_s),
            ("per-step overhead", self.overhead_s),
        ]
        .into_iter()
        .fold(("none", 0.0), |best, part| if part.1 > best.1 { part } else { best })
    }
}

/// Bytes and parameters of one set of weight matrices applied together.
#[derive(Debug, Clone, Copy)]
struct Matrices {
    bytes: f64,
    params: f64,
}

/// The step-time model of one model on one hardware profile.
#[derive(Debug, Clone)]
pub struct StepModel<'a> {
    model: &'a ModelSpec,
    hardware: &'a HardwareProfile,
    kv: KvBytes,
    attention: Matrices,
    dense_mlp: Matrices,
    shared_expert: Matrices,
    router: Matrices,
    lm_head: Matrices,
    expert: Matrices,
    /// Layers that cost the same on the attention worker (MoE or dense, chunked or global attention): one
    /// representative layer of each kind and how many there are.
    layer_kinds: Vec<(usize, f64)>,
}

fn per(total: u64, count: usize) -> f64 {
    if count == 0 {
        0.0
    } else {
        total as f64 / count as f64
    }
}

impl<'a> StepModel<'a> {
    /// The model of `model` on `hardware` with the KV cache in `kv_precision`.
    pub fn new(model: &'a ModelSpec, hardware: &'a HardwareProfile, kv_precision: Precision) -> Self {
        let c = &model.config;
        let w: WeightBytes = model.runtime_weights(hardware.dense_precision);
        let (h, q, kvd) = (c.hidden_size as f64, c.q_dim() as f64, c.kv_dim() as f64);
        let layers = c.num_hidden_layers;
        let moe = c.num_moe_layers();
        let lm_bytes = if c.tie_word_embeddings { w.embeddings } else { w.lm_head };
        let mut layer_kinds: Vec<(usize, f64)> = Vec::new();
        let kind = |layer: usize| (c.is_moe_layer(layer), c.is_chunked_attention(layer));
        for layer in 0..layers {
            match layer_kinds.iter_mut().find(|(first, _)| kind(*first) == kind(layer)) {
                Some((_, count)) => *count += 1.0,
                None => layer_kinds.push((layer, 1.0)),
            }
        }
        StepModel {
            model,
            hardware,
            kv: KvBytes::of(c, kv_precision),
            attention: Matrices { bytes: per(w.attention + w.norms, layers), params: 2.0 * h * q + 2.0 * h * kvd },
            dense_mlp: Matrices {
                bytes: per(w.dense_mlp, layers - moe),
                params: 3.0 * h * c.intermediate_size_mlp as f64,
            },
            shared_expert: Matrices { bytes: per(w.shared_experts, moe), params: 3.0 * h * c.intermediate_size as f64 },
            router: Matrices { bytes: per(w.routers, moe), params: h * c.num_local_experts as f64 },
            lm_head: Matrices { bytes: lm_bytes as f64, params: h * c.vocab_size as f64 },
            expert: Matrices { bytes: w.routed_expert_per_layer as f64, params: model.expert_params() as f64 },
            layer_kinds,
        }
    }

    /// The KV footprint used.
    pub fn kv(&self) -> &KvBytes {
        &self.kv
    }

    /// One GEMM over `tokens` rows: weight streaming or FLOPs, whichever is slower.
    #[inline]
    fn gemm(&self, matrices: Matrices, tokens: f64, fp8: bool) -> f64 {
        if tokens <= 0.0 || matrices.params <= 0.0 {
            return 0.0;
        }
        let hw = self.hardware;
        let (stream, rate) = if fp8 {
            (hw.grouped_stream_bytes_per_s, hw.fp8_rate(tokens))
        } else {
            (hw.weight_stream_bytes_per_s, hw.dense_rate(tokens))
        };
        (matrices.bytes / stream).max(2.0 * tokens * matrices.params / rate)
    }

    /// Tokens layer `layer` attends to for a query at context `context`.
    fn kept(&self, layer: usize, context: f64) -> f64 {
        match self.model.config.attention_chunk_size {
            Some(chunk) if self.model.config.is_chunked_attention(layer) => context.min(chunk as f64),
            _ => context,
        }
    }

    /// Attention of one layer for one micro-batch.
    fn attention_core(&self, layer: usize, load: &StepLoad) -> f64 {
        let hw = self.hardware;
        let q_dim = self.model.config.q_dim() as f64;
        let kept = self.kept(layer, load.decode_context);
        let kv_bytes = load.decode_sequences * kept * self.kv.per_token_per_layer as f64;
        let decode_flops = load.decode_sequences * 4.0 * q_dim * kept;
        let prefill_flops = load.prefill_tokens * 4.0 * q_dim * self.kept(layer, load.prefill_context);
        let decode = if load.decode_sequences > 0.0 {
            (kv_bytes / hw.kv_read_bytes_per_s).max(decode_flops / hw.attention_flops)
        } else {
            0.0
        };
        hw.attention_launch_s + decode + prefill_flops / hw.attention_flops
    }

    /// Seconds one expert GPU spends on one MoE layer: `tokens` routed tokens over `active` local experts that
    /// received any (both may be fractional: expectations). Each active expert streams its weights or computes its
    /// share of the tokens, whichever is slower, on the FP8 curve and the grouped streaming rate. This is the cost
    /// the simulator asks for every expert GPU (`PlannerCosts`), and the one the search uses for the busiest expert
    /// worker.
    #[inline] // The simulator calls it for every expert GPU and MoE layer at every expert tick.
    pub fn expert_layer_s(&self, tokens: f64, active: f64) -> f64 {
        if tokens <= 0.0 {
            return 0.0;
        }
        // An active expert has at least one token, so there are no more of them than tokens (nor than one when the
        // tokens are a fraction); a caller reporting none while tokens arrive gets one expert's worth.
        let active = if active > 0.0 { active.min(tokens.max(1.0)) } else { tokens.min(1.0) };
        active * self.gemm(self.expert, tokens / active, true)
    }

    /// Seconds the busiest expert worker spends on one MoE layer when `tokens` routed tokens reach the expert side
    /// (all attention workers together); on a shared host, all expert workers together.
    fn experts(&self, shape: &Shape, tokens: f64) -> f64 {
        if tokens <= 0.0 {
            return 0.0;
        }
        let workers = shape.expert_workers.max(1) as f64;
        let slots = shape.slots_per_expert_worker.max(1) as f64;
        // `load` tokens spread over `slots` replicas: the expected number of replicas used (at least one when a
        // token arrives), each with its share of the tokens.
        let experts_of = |load: f64, slots: f64| {
            let touched = (slots * (1.0 - (-load / slots).exp())).max(load.min(1.0));
            self.expert_layer_s(load, touched)
        };
        if self.hardware.shared_host {
            // The workers' work adds up on the shared cores: every replica of every worker, all the tokens.
            experts_of(tokens, slots * workers)
        } else {
            experts_of(tokens * shape.imbalance / workers, slots)
        }
    }

    /// Dispatch and combine of one MoE layer for one micro-batch of `tokens` tokens per attention worker.
    fn communication(&self, shape: &Shape, tokens: f64) -> f64 {
        if tokens <= 0.0 {
            return 0.0;
        }
        let hidden = self.model.config.hidden_size as f64;
        let routed = tokens * self.model.config.num_experts_per_tok as f64;
        let scale = if shape.dispatch == Precision::Fp8 { 4.0 } else { 0.0 };
        let dispatch_per_token = hidden * shape.dispatch.bytes() as f64 + scale;
        let combine_per_token = hidden * shape.combine.bytes() as f64;
        let devices = shape.attention_workers + shape.expert_workers;
        let link = self.hardware.link_for(devices);
        let per_token = dispatch_per_token + combine_per_token;
        if self.hardware.shared_host {
            // Every attention worker's traffic goes through the same host.
            return 2.0 * link.latency_s + shape.attention_workers as f64 * routed * per_token / link.bytes_per_s;
        }
        let aw_bytes = routed * per_token;
        let ew_bytes =
            routed * shape.attention_workers as f64 * shape.imbalance / shape.expert_workers.max(1) as f64 * per_token;
        2.0 * link.latency_s + aw_bytes.max(ew_bytes) / link.bytes_per_s
    }

    /// The attention worker's own work on one layer for a (micro-)batch of `m` tokens: `(front, overlappable,
    /// attention)`, where `front` (projections, attention, then the router or the dense MLP) precedes the MoE path,
    /// `overlappable` (the shared expert) runs while the routed tokens are away, and `attention` is the part of
    /// `front` that is attention itself.
    fn attention_worker_layer(&self, layer: usize, m: f64, load: &StepLoad) -> (f64, f64, f64) {
        let projections = self.gemm(self.attention, m, false);
        let attention = self.attention_core(layer, load);
        if self.model.config.is_moe_layer(layer) {
            (
                projections + attention + self.gemm(self.router, m, false),
                self.gemm(self.shared_expert, m, false),
                attention,
            )
        } else {
            (projections + attention + self.gemm(self.dense_mlp, m, false), 0.0, attention)
        }
    }

    /// The lm_head over the sampled tokens and the per-step overheads of one attention worker.
    fn sampling_and_overhead(&self, decode_sequences: f64) -> (f64, f64) {
        let lm_head = self.gemm(self.lm_head, decode_sequences, false);
        let overhead = self.hardware.step_overhead_s + self.hardware.per_sequence_overhead_s * decode_sequences;
        (lm_head, overhead)
    }

    /// The attention worker's side of one step under `load` on its own device, every layer, no routed experts and no
    /// overlap: `dense_gemm_s` (projections, dense MLPs, routers, shared experts, lm_head), `attention_s` and
    /// `overhead_s`, with `total_s` their sum. This is what the simulator's `StepCosts::attention_us` asks for; the
    /// simulator adds the expert side per MoE layer itself.
    pub fn attention_worker_step(&self, load: &StepLoad) -> StepTime {
        let m = load.decode_sequences + load.prefill_tokens;
        let mut t = StepTime::default();
        // One layer of each kind times their count: the simulator asks this at every step of every attention
        // worker, millions of times in a large run.
        for &(layer, count) in &self.layer_kinds {
            let (front, overlappable, attention) = self.attention_worker_layer(layer, m, load);
            t.attention_s += count * attention;
            t.dense_gemm_s += count * (front - attention + overlappable);
        }
        let (lm_head, overhead) = self.sampling_and_overhead(load.decode_sequences);
        t.dense_gemm_s += lm_head;
        t.overhead_s = overhead;
        t.total_s = t.dense_gemm_s + t.attention_s + t.overhead_s;
        t
    }

    /// The time of one step of every attention worker under `load`.
    pub fn step(&self, shape: &Shape, load: &StepLoad) -> StepTime {
        let config = &self.model.config;
        let mb = shape.micro_batches.max(1) as f64;
        let half = StepLoad {
            decode_sequences: load.decode_sequences / mb,
            prefill_tokens: load.prefill_tokens / mb,
            ..*load
        };
        let m = half.decode_sequences + half.prefill_tokens;
        let routed_all = m * config.num_experts_per_tok as f64 * shape.attention_workers as f64;
        let shared_host = self.hardware.shared_host;
        let mut t = StepTime::default();
        let mut total = 0.0;
        for layer in 0..config.num_hidden_layers {
            let (front, overlappable, attention) = self.attention_worker_layer(layer, m, &half);
            let (moe_path, experts, comm) = if config.is_moe_layer(layer) {
                let experts = self.experts(shape, routed_all);
                let comm = self.communication(shape, m);
                (experts + comm, experts, comm)
            } else {
                (0.0, 0.0, 0.0)
            };
            // Parts as one micro-batch sees them, summed over the micro-batches of the step.
            t.attention_s += mb * attention;
            t.dense_gemm_s += mb * (front - attention + overlappable);
            t.experts_s += mb * experts;
            t.communication_s += mb * comm;
            let aw = front + overlappable;
            total += if shared_host {
                mb * (shape.attention_workers as f64 * aw + moe_path)
            } else if mb > 1.0 {
                mb * aw.max(moe_path)
            } else {
                front + overlappable.max(moe_path)
            };
        }
        let (lm_head, overhead) = self.sampling_and_overhead(load.decode_sequences);
        let lm_head = lm_head * if shared_host { shape.attention_workers as f64 } else { 1.0 };
        t.dense_gemm_s += lm_head;
        t.overhead_s = overhead;
        t.total_s = total + lm_head + t.overhead_s;
        t
    }
}
