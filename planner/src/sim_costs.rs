//! The planner's step model as the simulator's step costs: `switchyard simulate --costs planner` runs the cluster
//! simulation on the same first-principles model `switchyard plan` predicts with (docs/simulator.md, "Step costs").
//!
//! The simulator asks for the attention side of a step and, per MoE layer and expert GPU, the expert side; it adds
//! dispatch, the slowest GPU's experts and combine per MoE layer itself. So the attention side here is the planner's
//! attention-worker work with nothing overlapped ([`StepModel::attention_worker_step`]), and the expert side is
//! [`StepModel::expert_layer_s`], the same per-GPU cost the planner's search charges the busiest expert worker.

use serde::Serialize;
use switchyard_model::memory::Precision;
use switchyard_simulator::{AttentionBatch, StepCosts};

use crate::hardware::Link;
use crate::search::Planner;
use crate::step::{StepLoad, StepModel};
use crate::PlanError;

/// What the costs were built from, for reports (`switchyard simulate --format json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CostSummary {
    /// `planner`: the capacity planner's step model.
    pub source: &'static str,
    /// The model (preset name or directory).
    pub model: String,
    /// The hardware profile.
    pub hardware: String,
    /// KV element type.
    pub kv_dtype: Precision,
    /// Encoding of dispatched activations.
    pub dispatch: Precision,
    /// Encoding of combined expert outputs.
    pub combine: Precision,
    /// The link every GPU sends and receives over (NVLink within one node, the network beyond).
    pub link: Link,
    /// Bytes per token per direction on the wire (the mean of dispatch and combine).
    pub token_bytes: f64,
    /// Bytes of one routed expert of one MoE layer as the runtime holds it.
    pub expert_bytes: f64,
}

/// [`StepCosts`] from the planner's [`StepModel`] for one model, hardware profile and cluster size.
#[derive(Debug, Clone)]
pub struct PlannerCosts<'a> {
    model: StepModel<'a>,
    summary: CostSummary,
}

impl<'a> PlannerCosts<'a> {
    /// The costs of `planner`'s model on its hardware, with its KV and wire encodings, for a cluster of `devices`
    /// GPUs (attention and expert workers together: which link they use). Fails for a shared host (`cpu`: the
    /// simulator models separate GPUs) and for models routing each token to more than one expert (the simulator
    /// routes top-1).
    pub fn new(planner: &Planner<'a>, devices: u32) -> Result<Self, PlanError> {
        let (model, hardware) = (planner.model(), planner.hardware());
        if hardware.shared_host {
            return Err(PlanError::Simulation {
                what: format!("on {}", hardware.name),
                reason: "it models every worker as a process of one host; the simulator models separate GPUs \
                         (use a GPU profile)"
                    .into(),
            });
        }
        let top_k = model.config.num_experts_per_tok;
        if top_k != 1 {
            return Err(PlanError::Simulation {
                what: format!("model {}", model.name),
                reason: format!("it routes each token to {top_k} experts; the simulator routes top-1 (Llama 4)"),
            });
        }
        let (dispatch, combine) = planner.wire();
        let hidden = model.config.hidden_size as f64;
        // The planner charges a dispatch and a combine together as `2 latency + (dispatch + combine bytes) / bw`;
        // the simulator charges each as `latency + token_bytes x tokens / bw`. The mean of the two directions makes
        // the two agree. An FP8 dispatch carries a 4-byte scale per token.
        let scale = if dispatch == Precision::Fp8 { 4.0 } else { 0.0 };
        let token_bytes = (hidden * dispatch.bytes() as f64 + scale + hidden * combine.bytes() as f64) / 2.0;
        let weights = model.runtime_weights(hardware.dense_precision);
        let step_model = planner.step_model().clone();
        let summary = CostSummary {
            source: "planner",
            model: model.name.clone(),
            hardware: hardware.name.clone(),
            kv_dtype: step_model.kv().dtype,
            dispatch,
            combine,
            link: hardware.link_for(devices),
            token_bytes,
            expert_bytes: weights.routed_expert_per_layer as f64,
        };
        Ok(PlannerCosts { model: step_model, summary })
    }

    /// What the costs were built from.
    pub fn summary(&self) -> &CostSummary {
        &self.summary
    }
}

impl StepCosts for PlannerCosts<'_> {
    fn attention_us(&self, batch: &AttentionBatch) -> f64 {
        // The simulator sums contexts and query-key pairs; the planner takes mean contexts.
        let load = StepLoad {
            decode_sequences: batch.decode_sequences,
            prefill_tokens: batch.prefill_tokens,
            decode_context: if batch.decode_sequences > 0.0 {
                batch.decode_context / batch.decode_sequences
            } else {
                0.0
            },
            prefill_context: if batch.prefill_tokens > 0.0 { batch.prefill_pairs / batch.prefill_tokens } else { 0.0 },
        };
        self.model.attention_worker_step(&load).total_s * 1e6
    }

    #[inline]
    fn expert_us(&self, tokens: f64, active_experts: f64) -> f64 {
        self.model.expert_layer_s(tokens, active_experts) * 1e6
    }

    fn transfer_us(&self, bytes: f64) -> f64 {
        self.summary.link.time(bytes) * 1e6
    }

    fn token_bytes(&self) -> f64 {
        self.summary.token_bytes
    }

    fn expert_bytes(&self) -> f64 {
        self.summary.expert_bytes
    }
}
