//! Capacity planning for Switchyard (`switchyard plan`): how many attention workers and expert-worker GPUs a model
//! needs for a workload, how to split their memory, and how fast the result will be.
//!
//! - [`model`]: the models (Maverick FP8/BF16, Scout BF16, the `small`/`tiny` test presets, or a checkpoint
//!   directory); memory accounting itself is `switchyard_model::memory`, shared with the rest of the runtime.
//! - [`hardware`]: H100/H200/B200 profiles and this machine's CPU, each with its sources; [`calibrate`] replaces
//!   their rates with what `switchyard bench` measured.
//! - [`step`]: the step-time model from FLOPs and bytes over rates; [`search`] the shapes, loads and SLOs.
//! - [`vllm`]: the tensor-parallel reference the memory model is checked against.
//! - [`values`]: the plan as Helm values; [`plot`]: throughput and cost against expert workers as an SVG.
//! - [`sim_costs`]: the step model as the cluster simulator's step costs (`switchyard simulate --costs planner`).
//!
//! The crate computes; it prints nothing. `docs/planner.md` has the equations and the measurements.

pub mod calibrate;
pub mod error;
pub mod hardware;
pub mod model;
pub mod plot;
pub mod search;
pub mod sim_costs;
pub mod step;
pub mod values;
pub mod vllm;

use std::fmt::Write as _;

use serde::Serialize;
use switchyard_model::memory::{Precision, WeightBytes};

pub use error::PlanError;
pub use hardware::HardwareProfile;
pub use model::ModelSpec;
pub use search::{
    Evaluation, ExpertWorkerOption, PlanRequest, Planner, Prediction, SearchResult, Shortfall, Target, Unmet,
};
pub use sim_costs::PlannerCosts;
pub use step::{Shape, StepLoad, StepModel, StepTime};

const GIB: f64 = (1u64 << 30) as f64;

/// The model as the plan reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSummary {
    /// Preset name or directory.
    pub name: String,
    /// Weight bytes as stored, by component.
    pub stored_weights: WeightBytes,
    /// Total stored weight bytes.
    pub stored_total_bytes: u64,
    /// One routed expert of one layer as stored: the unit the coordinator sizes slots in.
    pub stored_routed_expert_bytes_per_layer: u64,
    /// MoE layers.
    pub moe_layers: usize,
    /// Routed experts per MoE layer.
    pub experts: usize,
    /// Whether the routed experts are FP8.
    pub fp8_experts: bool,
    /// KV element type of the plan.
    pub kv_dtype: Precision,
    /// KV bytes of one token in one layer.
    pub kv_bytes_per_token_per_layer: u64,
    /// KV bytes of one sequence of the requested context.
    pub kv_bytes_at_context: u64,
    /// The requested context (tokens).
    pub context: u64,
}

/// The hardware as the plan reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HardwareSummary {
    /// Profile name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Memory per device.
    pub memory_bytes: u64,
    /// Whether every worker shares one host.
    pub shared_host: bool,
    /// Where the figures come from (calibrations included).
    pub sources: Vec<String>,
}

/// A complete plan: what was asked, for what, and what the search found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// The model.
    pub model: ModelSummary,
    /// The hardware.
    pub hardware: HardwareSummary,
    /// The request.
    pub request: PlanRequest,
    /// `--max-batch-tokens` in effect.
    pub max_batch_tokens: u64,
    /// `--max-batch` in effect.
    pub max_batch: u64,
    /// The result.
    pub result: SearchResult,
}

/// Plans `request` for `model` on `hardware`.
pub fn plan(model: &ModelSpec, hardware: &HardwareProfile, request: PlanRequest) -> Result<Plan, PlanError> {
    let planner = Planner::new(model, hardware, request)?;
    let result = planner.search()?;
    let kv = *planner.kv();
    let context = planner.request().context.unwrap_or(planner.request().input_len + planner.request().output_len);
    Ok(Plan {
        model: ModelSummary {
            name: model.name.clone(),
            stored_weights: model.stored_weights,
            stored_total_bytes: model.stored_weights.total(),
            stored_routed_expert_bytes_per_layer: model.stored_weights.routed_expert_per_layer,
            moe_layers: model.config.num_moe_layers(),
            experts: model.config.num_local_experts,
            fp8_experts: model.stored_precision.routed_experts == Precision::Fp8,
            kv_dtype: kv.dtype,
            kv_bytes_per_token_per_layer: kv.per_token_per_layer,
            kv_bytes_at_context: kv.sequence(context),
            context,
        },
        hardware: HardwareSummary {
            name: hardware.name.clone(),
            description: hardware.description.clone(),
            memory_bytes: hardware.memory_bytes,
            shared_host: hardware.shared_host,
            sources: hardware.sources.clone(),
        },
        max_batch_tokens: planner.max_batch_tokens(),
        max_batch: planner.max_batch(),
        request: planner.request().clone(),
        result,
    })
}

/// Bytes for people: GiB, or MiB below one GiB (small models, short sequences).
fn gib(bytes: u64) -> String {
    let gib = bytes as f64 / GIB;
    if gib >= 1.0 || bytes == 0 {
        format!("{gib:.2} GiB")
    } else {
        format!("{:.2} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

impl Plan {
    /// The plan as a table for people.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let o = &mut out;
        let m = &self.model;
        let e = &self.result.chosen;
        let s = &e.shape;
        let unit = if self.hardware.shared_host { "processes" } else { "GPUs" };
        // `write!` into a String cannot fail.
        let _ = writeln!(
            o,
            "model {}: {:.1} GB ({}) of weights as stored; routed experts {:.1} GB = {} MoE layers x {} experts x \
             {:.1} MB",
            m.name,
            m.stored_total_bytes as f64 / 1e9,
            gib(m.stored_total_bytes),
            m.stored_weights.routed_experts as f64 / 1e9,
            m.moe_layers,
            m.experts,
            m.stored_routed_expert_bytes_per_layer as f64 / 1e6
        );
        let _ = writeln!(
            o,
            "KV {}: {} bytes per token per layer; {} per sequence at a {}-token context",
            m.kv_dtype,
            m.kv_bytes_per_token_per_layer,
            gib(m.kv_bytes_at_context),
            m.context
        );
        let _ = writeln!(
            o,
            "hardware {}: {} ({} each)",
            self.hardware.name,
            self.hardware.description,
            gib(self.hardware.memory_bytes)
        );
        let r = &self.request;
        let target = match r.target {
            Target::Rate(x) => format!("{x} requests/s"),
            Target::Concurrency(c) => format!("{c} concurrent requests"),
            Target::Capacity => "capacity (no load given)".to_string(),
        };
        let slo = |v: Option<f64>| v.map_or("-".to_string(), |s| format!("{:.0} ms", s * 1e3));
        let _ = writeln!(
            o,
            "request: {target}, {} in / {} out tokens, SLO TTFT {} TPOT {}, expert skew {}",
            r.input_len,
            r.output_len,
            slo(r.slo_ttft_s),
            slo(r.slo_tpot_s),
            r.expert_skew
        );
        let _ = writeln!(o);
        let _ = writeln!(o, "plan: {} {unit}", e.devices);
        let _ = writeln!(o, "  attention workers        {}", s.attention_workers);
        let _ = writeln!(
            o,
            "  expert workers           {} ({} slots each: {} experts + {} redundant per layer, imbalance {:.3})",
            s.expert_workers, s.slots_per_expert_worker, m.experts, s.redundant_slots, s.imbalance
        );
        let _ = writeln!(o, "  micro-batches            {}", s.micro_batches);
        let _ = writeln!(o, "  dispatch / combine       {} / {}", s.dispatch, s.combine);
        let _ = writeln!(
            o,
            "  KV per attention worker  {} ({} sequences of {} tokens; longest sequence {} tokens)",
            gib(e.kv_budget_bytes),
            e.kv_sequences_per_attention_worker,
            r.input_len + r.output_len,
            e.max_context_per_attention_worker
        );
        let _ = writeln!(o, "  context-parallel group   {}", e.context_parallel);
        let _ = writeln!(o);
        let _ = writeln!(o, "predicted:");
        let _ = writeln!(
            o,
            "  decode batch per AW      {:.1} (+{:.0} prompt tokens per step)",
            e.decode_batch, e.prefill_tokens_per_step
        );
        let _ = writeln!(
            o,
            "  output tokens/s          {:.1} ({:.2} requests/s; at most {:.2} requests/s within the SLOs)",
            e.output_tokens_per_s, e.requests_per_s, self.result.max_rate_requests_per_s
        );
        let _ = writeln!(o, "  TPOT                     {:.2} ms", e.tpot_s * 1e3);
        let _ = writeln!(o, "  TTFT                     {:.1} ms", e.ttft_s * 1e3);
        let st = &e.step;
        let _ = writeln!(
            o,
            "  step parts (ms)          AW GEMMs {:.2}, attention {:.2}, experts {:.2}, dispatch/combine {:.2}, \
             overhead {:.2}",
            st.dense_gemm_s * 1e3,
            st.attention_s * 1e3,
            st.experts_s * 1e3,
            st.communication_s * 1e3,
            st.overhead_s * 1e3
        );
        let _ = writeln!(o, "  bottleneck               {}", e.bottleneck);
        let _ = writeln!(o);
        for worker in &e.memory {
            let _ =
                writeln!(o, "memory of one {} ({} usable):", worker.role.replace('_', " "), gib(worker.usable_bytes));
            for item in &worker.items {
                let _ = writeln!(o, "  {:<52} {:>12}", item.component, gib(item.bytes));
            }
            let _ = writeln!(o, "  {:<52} {:>12}", "total", gib(worker.total()));
        }
        if !self.result.alternatives.is_empty() {
            let _ = writeln!(o);
            let _ = writeln!(o, "alternatives ({unit} AW+EW, redundant, micro-batches: output tokens/s, TPOT):");
            for a in &self.result.alternatives {
                let _ = writeln!(
                    o,
                    "  {:>4} = {}+{}, {}, {}: {:.1} tok/s, {:.2} ms",
                    a.devices,
                    a.shape.attention_workers,
                    a.shape.expert_workers,
                    a.shape.redundant_slots,
                    a.shape.micro_batches,
                    a.output_tokens_per_s,
                    a.tpot_s * 1e3
                );
            }
        }
        self.write_by_expert_workers(o);
        let _ = writeln!(o);
        let _ = writeln!(o, "sources:");
        for source in &self.hardware.sources {
            let _ = writeln!(o, "  - {source}");
        }
        out
    }
}

impl Plan {
    /// The table of [`SearchResult::by_expert_workers`]: the numbers `--plot` draws.
    fn write_by_expert_workers(&self, o: &mut String) {
        let device = if self.hardware.shared_host { "process" } else { "GPU" };
        let cost = format!("{device}-h/Mtok");
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "by expert {device}s (the best shape of each count the search considered, what --plot draws; capacity: the \
             same shape at the largest batch its KV, --max-batch and the TPOT SLO allow):"
        );
        let _ = writeln!(
            o,
            "  {:>6} {:>5} {:>5} {:>9} {:>3} {:>13} {:>13} {:>8} {:>14} {:>13}",
            "expert", "attn", "total", "redundant", "mb", "output tok/s", cost, "TPOT ms", "capacity tok/s", cost
        );
        let number = |v: Option<f64>, decimals: usize| v.map_or("-".to_string(), |v| format!("{v:.decimals$}"));
        for option in &self.result.by_expert_workers {
            let shape = option.shape.filter(|_| option.predicted.is_some());
            let count = |v: Option<u32>| v.map_or("-".to_string(), |v| v.to_string());
            let (predicted, capacity) = (option.predicted.as_ref(), option.capacity.as_ref());
            let mut line = format!(
                "  {:>6} {:>5} {:>5} {:>9} {:>3} {:>13} {:>13} {:>8} {:>14} {:>13}",
                option.expert_workers,
                count(shape.map(|s| s.attention_workers)),
                count(predicted.map(|p| p.devices)),
                count(shape.map(|s| s.redundant_slots)),
                count(shape.map(|s| s.micro_batches)),
                number(predicted.map(|p| p.output_tokens_per_s), 1),
                number(predicted.map(|p| p.device_hours_per_million_output_tokens), 4),
                number(predicted.map(|p| p.tpot_s * 1e3), 2),
                number(capacity.map(|p| p.output_tokens_per_s), 1),
                number(capacity.map(|p| p.device_hours_per_million_output_tokens), 4),
            );
            match (option.chosen, &option.unmet) {
                (true, _) => line += "  chosen",
                (_, Some(Unmet { shortfall: Shortfall::DoesNotFit, reason })) => {
                    line += &format!("  does not fit: {reason}")
                }
                (_, Some(Unmet { shortfall: Shortfall::MissesTarget, reason })) => {
                    line += &format!("  misses: {reason}")
                }
                (false, None) => {}
            }
            let _ = writeln!(o, "{line}");
        }
    }
}

/// One row of a comparison with `switchyard bench e2e`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckRow {
    /// Concurrent requests (decode batch).
    pub batch: u64,
    /// Expert workers of the measured cluster.
    pub expert_workers: u32,
    /// Decode tokens/s the model predicts.
    pub predicted_tokens_per_s: f64,
    /// Decode tokens/s `bench e2e` measured for the cluster.
    pub measured_tokens_per_s: f64,
    /// `predicted / measured - 1`.
    pub error: f64,
    /// The predicted step and where its time goes.
    pub step: StepTime,
}

/// Predicts every row of a `switchyard bench e2e` JSON (one attention worker, `expert_workers` expert workers, one
/// micro-batch, pure decode at the prompt + generated context) and compares with its measured cluster tokens/s.
pub fn check_against(planner: &Planner<'_>, e2e: &serde_json::Value) -> Result<Vec<CheckRow>, String> {
    if e2e.get("benchmark").and_then(serde_json::Value::as_str) != Some("e2e") {
        return Err("expected the JSON of `switchyard bench e2e --output-json` (\"benchmark\": \"e2e\")".into());
    }
    let expert_workers = e2e
        .get("expert_workers")
        .and_then(serde_json::Value::as_u64)
        .filter(|&n| n > 0)
        .ok_or("no positive \"expert_workers\"")? as u32;
    let rows = e2e.get("rows").and_then(serde_json::Value::as_array).ok_or("no \"rows\" list")?;
    let shape = planner.shape(1, expert_workers, 0, 1)?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let batch = row
            .get("batch")
            .and_then(serde_json::Value::as_u64)
            .filter(|&b| b > 0)
            .ok_or("a row has no positive \"batch\"")?;
        let measured = row
            .get("cluster_tokens_per_s")
            .and_then(serde_json::Value::as_f64)
            .filter(|v| v.is_finite() && *v > 0.0)
            .ok_or("a row has no positive \"cluster_tokens_per_s\"")?;
        let step = planner.decode_step(shape, batch as f64);
        let predicted = batch as f64 / step.total_s;
        out.push(CheckRow {
            batch,
            expert_workers,
            predicted_tokens_per_s: predicted,
            measured_tokens_per_s: measured,
            error: predicted / measured - 1.0,
            step,
        });
    }
    Ok(out)
}
