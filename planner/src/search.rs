//! The plan search: evaluate cluster shapes (attention workers, expert workers, redundant slots, micro-batches)
//! against a request (a rate or a concurrency, SLOs, a context length) and pick the one with the fewest devices that
//! meets it, the fastest time per output token breaking ties.
//!
//! Load at a shape (per attention worker, every quantity a steady-state mean):
//! - `--concurrency C`: `b = C / attention_workers` sequences decode each step; each also brings
//!   `input_len / output_len` prompt tokens per output token, prefilled in the same steps.
//! - `--rate R`: Little's law with the step time `T`: `b = (R / attention_workers) output_len T` sequences decode and
//!   `p = (R / attention_workers) input_len T` prompt tokens are prefilled per step; `T = step(b, p)` is solved by
//!   fixed-point iteration, which diverges exactly when the rate exceeds what the shape sustains.
//! - neither: the shape's capacity, the largest decode batch that the KV cache, `--max-batch` and the TPOT SLO
//!   allow.
//!
//! `TTFT = T (ceil(input_len / chunk) + 1) / (1 - rho)`: the prompt's chunks at `chunk = max_batch_tokens - b`
//! tokens per step, then the first decode step, inflated by the share `rho = p / chunk` of the prefill budget that
//! other prompts use (a queueing approximation). `TPOT = T`.

use std::cell::RefCell;
use std::collections::HashMap;

use serde::Serialize;
use switchyard_coordinator::traces::zipf_weights;
use switchyard_coordinator::{PlacementProblem, Solver};
use switchyard_model::memory::{KvBytes, Precision, WeightBytes};

use crate::hardware::HardwareProfile;
use crate::model::ModelSpec;
use crate::step::{Shape, StepLoad, StepModel, StepTime};
use crate::PlanError;

/// What the cluster must carry.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Requests per second arriving (open loop).
    Rate(f64),
    /// Requests in flight at all times (closed loop).
    Concurrency(u64),
    /// No load given: the smallest cluster that holds the model and the context, at its capacity.
    Capacity,
}

/// Parts of the shape the caller fixed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Pins {
    /// Attention workers.
    pub attention_workers: Option<u32>,
    /// Expert workers.
    pub expert_workers: Option<u32>,
    /// Redundant expert slots per MoE layer.
    pub redundant_slots: Option<u32>,
    /// Micro-batches per attention worker (1 or 2).
    pub micro_batches: Option<u32>,
}

/// A planning request: the workload, the SLOs and the knobs of the runtime.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanRequest {
    /// Prompt tokens per request.
    pub input_len: u64,
    /// Generated tokens per request.
    pub output_len: u64,
    /// The longest sequence the cluster must hold (default: input + output).
    pub context: Option<u64>,
    /// The load.
    pub target: Target,
    /// Time to first token, seconds.
    pub slo_ttft_s: Option<f64>,
    /// Time per output token, seconds.
    pub slo_tpot_s: Option<f64>,
    /// KV element type (default: the profile's).
    pub kv_precision: Option<Precision>,
    /// Dispatch encoding (default: fp8 on GPUs, f32 on `cpu` as `switchyard up` does).
    pub dispatch: Option<Precision>,
    /// Combine encoding (default: bf16 on GPUs, f32 on `cpu`).
    pub combine: Option<Precision>,
    /// Zipf exponent of expert popularity; 0 is uniform routing.
    pub expert_skew: f64,
    /// Share of each device's memory the runtime may use.
    pub memory_utilization: f64,
    /// Tokens one step computes at most (default: 8192 on GPUs, 512 on `cpu`, the attention worker's default).
    pub max_batch_tokens: Option<u64>,
    /// Sequences one attention worker decodes at once at most (default: 256 on GPUs, 64 on `cpu`).
    pub max_batch: Option<u64>,
    /// Fixed parts of the shape.
    pub pins: Pins,
    /// The search considers clusters of at most this many devices.
    pub max_devices: u32,
}

impl Default for PlanRequest {
    fn default() -> Self {
        PlanRequest {
            input_len: 1024,
            output_len: 256,
            context: None,
            target: Target::Capacity,
            slo_ttft_s: None,
            slo_tpot_s: None,
            kv_precision: None,
            dispatch: None,
            combine: None,
            expert_skew: 1.0,
            memory_utilization: 0.9,
            max_batch_tokens: None,
            max_batch: None,
            pins: Pins::default(),
            max_devices: 1024,
        }
    }
}

impl PlanRequest {
    /// Checks every field is in range; the error names the flag.
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.input_len == 0 {
            return Err(PlanError::invalid("--input-len", "must be at least 1 token"));
        }
        if self.output_len == 0 {
            return Err(PlanError::invalid("--output-len", "must be at least 1 token"));
        }
        if let Some(context) = self.context {
            if context == 0 {
                return Err(PlanError::invalid("--context", "must be at least 1 token"));
            }
        }
        match self.target {
            Target::Rate(r) if !(r.is_finite() && r > 0.0) => {
                return Err(PlanError::invalid("--rate", format!("must be a positive number of requests/s, got {r}")))
            }
            Target::Concurrency(0) => return Err(PlanError::invalid("--concurrency", "must be at least 1")),
            _ => {}
        }
        for (flag, slo) in [("--slo-ttft", self.slo_ttft_s), ("--slo-tpot", self.slo_tpot_s)] {
            if let Some(s) = slo {
                if !(s.is_finite() && s > 0.0) {
                    return Err(PlanError::invalid(
                        flag,
                        format!("must be a positive number of milliseconds, got {}", s * 1e3),
                    ));
                }
            }
        }
        if !(self.expert_skew.is_finite() && self.expert_skew >= 0.0) {
            return Err(PlanError::invalid("--expert-skew", format!("must be 0 or more, got {}", self.expert_skew)));
        }
        if !(self.memory_utilization > 0.0 && self.memory_utilization <= 1.0) {
            return Err(PlanError::invalid(
                "--memory-utilization",
                format!("must be in (0, 1], got {}", self.memory_utilization),
            ));
        }
        if let Some(mb) = self.pins.micro_batches {
            if !(1..=2).contains(&mb) {
                return Err(PlanError::invalid("--micro-batches", format!("must be 1 or 2, got {mb}")));
            }
        }
        for (flag, pin) in
            [("--attention-workers", self.pins.attention_workers), ("--expert-workers", self.pins.expert_workers)]
        {
            if pin == Some(0) {
                return Err(PlanError::invalid(flag, "must be at least 1"));
            }
        }
        if self.max_batch_tokens == Some(0) || self.max_batch == Some(0) {
            return Err(PlanError::invalid("--max-batch-tokens/--max-batch", "must be at least 1"));
        }
        if self.max_devices == 0 {
            return Err(PlanError::invalid("--max-devices", "must be at least 1"));
        }
        Ok(())
    }
}

/// One line of a worker's memory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryItem {
    /// What it is.
    pub component: String,
    /// Bytes.
    pub bytes: u64,
}

/// The memory of one worker of a role.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerMemory {
    /// `attention_worker` or `expert_worker`.
    pub role: String,
    /// What the runtime may use on the device (`memory_utilization` x its memory).
    pub usable_bytes: u64,
    /// By component: weights, KV, activations, workspace.
    pub items: Vec<MemoryItem>,
}

impl WorkerMemory {
    /// The sum of the items.
    pub fn total(&self) -> u64 {
        self.items.iter().map(|i| i.bytes).sum()
    }
}

/// Why a shape, or every shape with some number of expert workers, does not meet the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Shortfall {
    /// Weights, activations, the KV cache or one sequence of the requested context do not fit the devices' memory.
    DoesNotFit,
    /// It fits, but does not carry the load (a rate or a concurrency) within the SLOs.
    MissesTarget,
}

/// A shape evaluated against the request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evaluation {
    /// The shape.
    pub shape: Shape,
    /// Devices (GPUs, or processes on a shared host).
    pub devices: u32,
    /// Whether it meets the request; otherwise `reason` says why not.
    pub feasible: bool,
    /// The constraint it fails.
    pub reason: Option<String>,
    /// What kind of constraint that is.
    pub shortfall: Option<Shortfall>,
    /// Sequences decoding per attention worker per step.
    pub decode_batch: f64,
    /// Prompt tokens prefilled per attention worker per step.
    pub prefill_tokens_per_step: f64,
    /// The step and where its time goes.
    pub step: StepTime,
    /// Time per output token, seconds.
    pub tpot_s: f64,
    /// Time to first token, seconds.
    pub ttft_s: f64,
    /// Output tokens per second of the whole cluster.
    pub output_tokens_per_s: f64,
    /// Completed requests per second.
    pub requests_per_s: f64,
    /// What bounds the shape: the largest part of the step, or the KV capacity.
    pub bottleneck: String,
    /// KV cache bytes each attention worker has.
    pub kv_budget_bytes: u64,
    /// Sequences of `input_len + output_len` tokens one attention worker holds.
    pub kv_sequences_per_attention_worker: u64,
    /// The longest sequence one attention worker holds.
    pub max_context_per_attention_worker: u64,
    /// Attention workers whose KV one sequence of the requested context spans (1: no context parallelism).
    pub context_parallel: u32,
    /// Memory of one attention worker and one expert worker.
    pub memory: Vec<WorkerMemory>,
}

impl Evaluation {
    /// Device-hours per million output tokens (GPU-hours on GPUs, process-hours on a shared host): the devices over
    /// the output tokens they produce in an hour. `None` when the shape produces none.
    pub fn device_hours_per_million_output_tokens(&self) -> Option<f64> {
        (self.output_tokens_per_s > 0.0).then(|| self.devices as f64 * 1e6 / (3600.0 * self.output_tokens_per_s))
    }
}

/// What the step model predicts for a shape under a load.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Prediction {
    /// Devices of the shape, attention and expert workers.
    pub devices: u32,
    /// Output tokens per second of the whole cluster.
    pub output_tokens_per_s: f64,
    /// Device-hours per million output tokens ([`Evaluation::device_hours_per_million_output_tokens`]).
    pub device_hours_per_million_output_tokens: f64,
    /// Time per output token, seconds.
    pub tpot_s: f64,
    /// Time to first token, seconds.
    pub ttft_s: f64,
}

impl Prediction {
    /// The prediction of `e`, when it predicted any output.
    fn of(e: &Evaluation) -> Option<Self> {
        Some(Prediction {
            devices: e.devices,
            device_hours_per_million_output_tokens: e.device_hours_per_million_output_tokens()?,
            output_tokens_per_s: e.output_tokens_per_s,
            tpot_s: e.tpot_s,
            ttft_s: e.ttft_s,
        })
    }
}

/// Why no shape with some number of expert workers meets the request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Unmet {
    /// The kind of constraint.
    pub shortfall: Shortfall,
    /// The constraint in words, with the numbers.
    pub reason: String,
}

/// The best the search found for one number of expert workers: what `switchyard plan` lists by expert workers and
/// what `--plot` draws.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExpertWorkerOption {
    /// Expert workers (GPUs, or processes on a shared host).
    pub expert_workers: u32,
    /// Whether this count holds the chosen plan.
    pub chosen: bool,
    /// `None` when some shape with this many expert workers meets the request; else why none does.
    pub unmet: Option<Unmet>,
    /// The best shape meeting the request (the search's own order: fewest devices, then TPOT or throughput); when
    /// none does, the closest miss evaluated, if any.
    pub shape: Option<Shape>,
    /// That shape under the request's load (for a miss: where it failed, if a step was predicted).
    pub predicted: Option<Prediction>,
    /// The same shape at its capacity: the largest decode batch its KV cache, `--max-batch` and the TPOT SLO allow
    /// (`predicted` again without a load). With a rate or a concurrency, every shape meeting the load outputs the
    /// load; this is what the shape could give.
    pub capacity: Option<Prediction>,
}

impl ExpertWorkerOption {
    /// `expert_workers` with the evaluation of its best shape (or of its closest miss) and of that shape at its
    /// capacity, and why it does not meet the request if it does not.
    fn new(
        expert_workers: u32,
        evaluation: Option<&Evaluation>,
        capacity: Option<&Evaluation>,
        unmet: Option<Unmet>,
    ) -> Self {
        ExpertWorkerOption {
            expert_workers,
            chosen: false,
            unmet,
            shape: evaluation.map(|e| e.shape),
            predicted: evaluation.and_then(Prediction::of),
            capacity: capacity.filter(|e| e.feasible).and_then(Prediction::of),
        }
    }

    /// The kind of constraint no shape with this many expert workers meets (`None`: one meets the request).
    pub fn shortfall(&self) -> Option<Shortfall> {
        self.unmet.as_ref().map(|u| u.shortfall)
    }
}

/// Why no count of attention workers makes a shape meet the request, and the closest evaluation if one was made.
struct Miss {
    reason: String,
    shortfall: Shortfall,
    /// Boxed: a miss travels in `Err` through the attention-worker search.
    evaluation: Option<Box<Evaluation>>,
}

impl Miss {
    fn of(e: Evaluation) -> Self {
        Miss {
            reason: e.reason.clone().unwrap_or_default(),
            shortfall: e.shortfall.unwrap_or(Shortfall::MissesTarget),
            evaluation: Some(Box::new(e)),
        }
    }

    /// A shape that cannot exist: its expert replicas do not fit the expert workers.
    fn unfit(reason: String) -> Self {
        Miss { reason, shortfall: Shortfall::DoesNotFit, evaluation: None }
    }

    fn bare(reason: String) -> Self {
        Miss { reason, shortfall: Shortfall::MissesTarget, evaluation: None }
    }
}

/// The planner for one model, one hardware profile and one request.
pub struct Planner<'a> {
    model: &'a ModelSpec,
    hardware: &'a HardwareProfile,
    request: PlanRequest,
    steps: StepModel<'a>,
    weights: WeightBytes,
    kv: KvBytes,
    dispatch: Precision,
    combine: Precision,
    max_batch_tokens: u64,
    max_batch: u64,
    imbalance_cache: RefCell<HashMap<(u32, u32, u32), f64>>,
}

const GIB: f64 = (1u64 << 30) as f64;

impl<'a> Planner<'a> {
    /// A planner; fails when the request is out of range.
    pub fn new(model: &'a ModelSpec, hardware: &'a HardwareProfile, request: PlanRequest) -> Result<Self, PlanError> {
        request.validate()?;
        let kv_precision = request.kv_precision.unwrap_or(hardware.kv_precision);
        let gpu = !hardware.shared_host;
        let dispatch = request.dispatch.unwrap_or(if gpu { Precision::Fp8 } else { Precision::F32 });
        let combine = request.combine.unwrap_or(if gpu { Precision::Bf16 } else { Precision::F32 });
        if combine == Precision::Fp8 {
            return Err(PlanError::invalid("--combine", "the combine direction is f32 or bf16 (no FP8 outputs)"));
        }
        let max_batch_tokens = request.max_batch_tokens.unwrap_or(if gpu { 8192 } else { 512 });
        let max_batch = request.max_batch.unwrap_or(if gpu { 256 } else { 64 }).min(max_batch_tokens);
        Ok(Planner {
            model,
            hardware,
            steps: StepModel::new(model, hardware, kv_precision),
            weights: model.runtime_weights(hardware.dense_precision),
            kv: KvBytes::of(&model.config, kv_precision),
            dispatch,
            combine,
            max_batch_tokens,
            max_batch,
            imbalance_cache: RefCell::new(HashMap::new()),
            request,
        })
    }

    /// The request as given.
    pub fn request(&self) -> &PlanRequest {
        &self.request
    }

    /// The model planned for.
    pub fn model(&self) -> &'a ModelSpec {
        self.model
    }

    /// The hardware planned on.
    pub fn hardware(&self) -> &'a HardwareProfile {
        self.hardware
    }

    /// The step-time model every evaluation uses.
    pub fn step_model(&self) -> &StepModel<'a> {
        &self.steps
    }

    /// The encodings of expert inputs and outputs on the wire: `(dispatch, combine)`.
    pub fn wire(&self) -> (Precision, Precision) {
        (self.dispatch, self.combine)
    }

    /// The KV footprint in use.
    pub fn kv(&self) -> &KvBytes {
        &self.kv
    }

    /// The weights as the runtime holds them on this hardware.
    pub fn weights(&self) -> &WeightBytes {
        &self.weights
    }

    /// `--max-batch-tokens` in effect.
    pub fn max_batch_tokens(&self) -> u64 {
        self.max_batch_tokens
    }

    /// `--max-batch` in effect.
    pub fn max_batch(&self) -> u64 {
        self.max_batch
    }

    /// Decode tokens/s of `shape` with `batch` sequences per attention worker and no prompt in the steps (what
    /// `switchyard bench e2e` measures: every request already has its first token).
    pub fn decode_tokens_per_s(&self, shape: Shape, batch: f64) -> f64 {
        shape.attention_workers as f64 * batch / self.decode_step(shape, batch).total_s
    }

    /// The step of `shape` with `batch` decoding sequences per attention worker and no prompt tokens.
    pub fn decode_step(&self, shape: Shape, batch: f64) -> StepTime {
        self.steps.step(&shape, &self.load(batch, 0.0))
    }

    fn context(&self) -> u64 {
        self.request.context.unwrap_or(self.request.input_len + self.request.output_len)
    }

    fn usable(&self) -> u64 {
        (self.hardware.memory_bytes as f64 * self.request.memory_utilization) as u64
    }

    fn activation_precision(&self) -> u64 {
        if self.hardware.dense_precision == Precision::F32 {
            4
        } else {
            2
        }
    }

    /// Activation and buffer bytes of one attention worker at `max_batch_tokens`.
    fn attention_activations(&self) -> u64 {
        let c = &self.model.config;
        let per_token =
            (4 * c.hidden_size + c.q_dim() + 2 * c.kv_dim() + 2 * c.intermediate_size_mlp.max(c.intermediate_size))
                as u64
                * self.activation_precision()
                + 2 * c.hidden_size as u64 * (self.dispatch.bytes() + self.combine.bytes());
        self.max_batch_tokens * per_token + self.max_batch * c.vocab_size as u64 * 4
    }

    /// Activation bytes of one expert worker receiving `tokens` tokens in one layer.
    fn expert_activations(&self, tokens: u64) -> u64 {
        let c = &self.model.config;
        tokens * ((2 * c.hidden_size) as u64 * 4 + 2 * c.intermediate_size as u64 * self.activation_precision())
    }

    /// Bytes of one expert replica slot over every MoE layer.
    fn slot_bytes(&self) -> u64 {
        self.weights.routed_expert_per_layer * self.model.config.num_moe_layers() as u64
    }

    /// The most replica slots per MoE layer an expert worker's memory holds, with `tokens` tokens of activations.
    fn max_slots(&self, tokens: u64) -> u64 {
        let free = self.usable().saturating_sub(self.hardware.workspace_bytes + self.expert_activations(tokens));
        (free / self.slot_bytes().max(1)).min(self.model.config.num_local_experts as u64)
    }

    /// Max over mean tokens per expert worker when `redundant` replicas go to the hottest experts of a Zipf load,
    /// placed by the coordinator's own solver.
    fn imbalance(&self, workers: u32, slots: u32, redundant: u32) -> f64 {
        if self.request.expert_skew == 0.0
            && redundant == 0
            && self.model.config.num_local_experts % workers as usize == 0
        {
            return 1.0;
        }
        let key = (workers, slots, redundant);
        if let Some(&v) = self.imbalance_cache.borrow().get(&key) {
            return v;
        }
        let experts = self.model.config.num_local_experts;
        let problem = PlacementProblem {
            experts: experts as u32,
            loads: [(0u32, zipf_weights(experts, self.request.expert_skew))].into_iter().collect(),
            workers: PlacementProblem::uniform_workers(workers as usize, slots as usize, 1),
            redundant_slots: redundant as usize,
        };
        let value = Solver::default()
            .solve_from_scratch(&problem, 1)
            .map(|s| s.mean_imbalance())
            // Cannot happen for shapes the search builds (slots always cover the replicas); be pessimistic if it does.
            .unwrap_or(workers as f64);
        self.imbalance_cache.borrow_mut().insert(key, value);
        value
    }

    /// The shape of `attention_workers`, `expert_workers`, `redundant` and `micro_batches`, or why it cannot exist.
    pub fn shape(
        &self,
        attention_workers: u32,
        expert_workers: u32,
        redundant: u32,
        micro_batches: u32,
    ) -> Result<Shape, String> {
        let experts = self.model.config.num_local_experts as u64;
        let replicas = experts + redundant as u64;
        let slots = replicas.div_ceil(expert_workers.max(1) as u64);
        if redundant as u64 > experts * (expert_workers as u64 - 1) {
            return Err(format!(
                "{redundant} redundant slots need more than {expert_workers} expert workers (a worker holds one \
                 replica of an expert at most)"
            ));
        }
        if !self.hardware.shared_host {
            let tokens = self.ew_tokens(attention_workers, expert_workers);
            let fits = self.max_slots(tokens);
            if slots > fits {
                return Err(format!(
                    "{replicas} expert replicas per layer over {expert_workers} expert workers need {slots} slots each \
                     ({:.1} GiB); one holds {fits}",
                    (slots * self.slot_bytes()) as f64 / GIB
                ));
            }
        }
        Ok(Shape {
            attention_workers,
            expert_workers,
            slots_per_expert_worker: slots as u32,
            redundant_slots: redundant,
            micro_batches,
            dispatch: self.dispatch,
            combine: self.combine,
            imbalance: self.imbalance(expert_workers, slots as u32, redundant),
        })
    }

    /// Tokens the busiest expert worker may receive in one layer at `max_batch_tokens` per attention worker.
    fn ew_tokens(&self, attention_workers: u32, expert_workers: u32) -> u64 {
        (attention_workers as u64 * self.max_batch_tokens).div_ceil(expert_workers.max(1) as u64).max(1)
    }

    /// Memory of one attention worker and one expert worker of `shape`, and the KV budget of an attention worker.
    fn memory(&self, shape: &Shape) -> (Vec<WorkerMemory>, i128) {
        let w = &self.weights;
        let usable = self.usable();
        let activations = self.attention_activations();
        let workspace = self.hardware.workspace_bytes;
        let ew_tokens = self.ew_tokens(shape.attention_workers, shape.expert_workers);
        let experts_held = shape.slots_per_expert_worker as u64 * self.slot_bytes();
        let ew_activations = self.expert_activations(ew_tokens);
        let (aw_usable, kv_budget) = if self.hardware.shared_host {
            // One pool: the expert workers' weights come out of it first, the attention workers share the rest.
            let ews = shape.expert_workers as u64 * (experts_held + ew_activations);
            let per_aw = (usable as i128 - ews as i128) / shape.attention_workers.max(1) as i128;
            (per_aw.max(0) as u64, per_aw - (w.non_expert() + activations + workspace) as i128)
        } else {
            (usable, usable as i128 - (w.non_expert() + activations + workspace) as i128)
        };
        let item = |component: &str, bytes: u64| MemoryItem { component: component.to_string(), bytes };
        let mut aw_items: Vec<MemoryItem> = w
            .components()
            .iter()
            .filter(|(name, bytes)| *name != "routed_experts" && *bytes > 0)
            .map(|(name, bytes)| item(&format!("weights: {name}"), *bytes))
            .collect();
        aw_items.push(item("KV cache", kv_budget.max(0) as u64));
        aw_items.push(item("activations", activations));
        aw_items.push(item("workspace", workspace));
        let ew_items = vec![
            item(
                &format!(
                    "weights: routed experts ({} slots x {} MoE layers)",
                    shape.slots_per_expert_worker,
                    self.model.config.num_moe_layers()
                ),
                experts_held,
            ),
            item("activations", ew_activations),
            item("workspace", workspace),
        ];
        (
            vec![
                WorkerMemory { role: "attention_worker".into(), usable_bytes: aw_usable, items: aw_items },
                WorkerMemory { role: "expert_worker".into(), usable_bytes: usable, items: ew_items },
            ],
            kv_budget,
        )
    }

    fn load(&self, decode: f64, prefill: f64) -> StepLoad {
        let (input, output) = (self.request.input_len as f64, self.request.output_len as f64);
        StepLoad {
            decode_sequences: decode,
            prefill_tokens: prefill,
            decode_context: input + output / 2.0,
            prefill_context: input / 2.0,
        }
    }

    /// TTFT for a step of `t` seconds with `b` sequences decoding and `p` prompt tokens per step.
    fn ttft(&self, t: f64, b: f64, p: f64) -> f64 {
        let chunk = (self.max_batch_tokens as f64 - b).max(1.0);
        let rho = (p / chunk).min(0.99);
        t * ((self.request.input_len as f64 / chunk).ceil() + 1.0) / (1.0 - rho)
    }

    /// Evaluates `shape` against the request's target.
    pub fn evaluate(&self, shape: Shape) -> Evaluation {
        self.evaluate_for(shape, self.request.target)
    }

    /// Evaluates `shape` against `target`.
    pub fn evaluate_for(&self, shape: Shape, target: Target) -> Evaluation {
        let (memory, kv_budget) = self.memory(&shape);
        let (input, output) = (self.request.input_len as f64, self.request.output_len as f64);
        let aws = shape.attention_workers as f64;
        let kv_budget_bytes = kv_budget.max(0) as u64;
        let sequence_bytes = self.kv.sequence(self.request.input_len + self.request.output_len).max(1);
        let kv_sequences = kv_budget_bytes / sequence_bytes;
        let context = self.context();
        let context_bytes = self.kv.sequence(context);
        let context_parallel =
            if kv_budget_bytes == 0 { u32::MAX } else { context_bytes.div_ceil(kv_budget_bytes).max(1) as u32 };
        let mut e = Evaluation {
            shape,
            devices: shape.attention_workers + shape.expert_workers,
            feasible: true,
            reason: None,
            shortfall: None,
            decode_batch: 0.0,
            prefill_tokens_per_step: 0.0,
            step: StepTime::default(),
            tpot_s: 0.0,
            ttft_s: 0.0,
            output_tokens_per_s: 0.0,
            requests_per_s: 0.0,
            bottleneck: String::new(),
            kv_budget_bytes,
            kv_sequences_per_attention_worker: kv_sequences,
            max_context_per_attention_worker: self.kv.max_tokens_in(kv_budget_bytes),
            context_parallel,
            memory,
        };
        let fail_as = |shortfall: Shortfall, mut e: Evaluation, reason: String| {
            e.feasible = false;
            e.reason = Some(reason);
            e.shortfall = Some(shortfall);
            e
        };
        let does_not_fit = |e, reason| fail_as(Shortfall::DoesNotFit, e, reason);
        let fail = |e, reason| fail_as(Shortfall::MissesTarget, e, reason);
        if kv_budget <= 0 {
            let aw = &e.memory[0];
            return does_not_fit(
                e.clone(),
                format!(
                    "an attention worker's weights, activations and workspace need {:.1} GiB of its {:.1} GiB usable",
                    aw.total() as f64 / GIB,
                    aw.usable_bytes as f64 / GIB
                ),
            );
        }
        if context_parallel > shape.attention_workers {
            let reason = format!(
                "one {context}-token sequence needs {:.1} GiB of KV: {context_parallel} attention workers' KV budgets \
                 ({:.1} GiB each), only {} in the shape",
                context_bytes as f64 / GIB,
                kv_budget_bytes as f64 / GIB,
                shape.attention_workers
            );
            return does_not_fit(e, reason);
        }
        // The most sequences an attention worker decodes: its slots and KV for sequences of input + output tokens
        // (a sequence of the full `context` is the feasibility check above; it may span a context-parallel group).
        let kv_limit = kv_sequences as f64;
        let batch_limit = (self.max_batch as f64).min(kv_limit);
        if batch_limit <= 0.0 {
            return does_not_fit(e, "the KV cache holds no whole sequence".into());
        }
        let step_at = |b: f64, p: f64| self.steps.step(&shape, &self.load(b, p));
        let (b, p, step) = match target {
            Target::Concurrency(c) => {
                let b = c as f64 / aws;
                if b > batch_limit + 1e-9 {
                    let why = if b > self.max_batch as f64 {
                        format!("--max-batch {}", self.max_batch)
                    } else {
                        format!(
                            "KV for {kv_sequences} sequences of {} tokens",
                            self.request.input_len + self.request.output_len
                        )
                    };
                    return fail(
                        e,
                        format!(
                            "{c} concurrent requests over {} attention workers is {b:.1} each; one holds {why}",
                            shape.attention_workers
                        ),
                    );
                }
                let p = b * input / output;
                (b, p, step_at(b, p))
            }
            Target::Rate(rate) => {
                let per_aw = rate / aws;
                let mut t = step_at(1.0, 0.0).total_s;
                let mut converged = false;
                for _ in 0..200 {
                    let b = per_aw * output * t;
                    if b > batch_limit * 2.0 + 1.0 {
                        break;
                    }
                    let next = step_at(b, per_aw * input * t).total_s;
                    if (next - t).abs() <= 1e-9 * next.max(1e-9) {
                        t = next;
                        converged = true;
                        break;
                    }
                    t = next;
                }
                let b = per_aw * output * t;
                if !converged || b > batch_limit + 1e-9 {
                    return fail(
                        e,
                        format!(
                        "{rate} requests/s is more than {} attention workers sustain (decode batch {:.0} needed, at \
                         most {:.0})",
                        shape.attention_workers,
                        b,
                        batch_limit
                    ),
                    );
                }
                let p = per_aw * input * t;
                (b, p, step_at(b, p))
            }
            Target::Capacity => {
                // The largest batch within the limits whose TPOT meets the SLO (step time grows with the batch).
                let tpot_ok =
                    |b: f64| self.request.slo_tpot_s.is_none_or(|s| step_at(b, b * input / output).total_s <= s);
                let mut b = batch_limit.floor().max(1.0);
                if !tpot_ok(b) {
                    let (mut lo, mut hi) = (0.0, b);
                    for _ in 0..60 {
                        let mid = 0.5 * (lo + hi);
                        if tpot_ok(mid) {
                            lo = mid
                        } else {
                            hi = mid
                        }
                    }
                    b = lo;
                }
                if b < 1e-6 {
                    b = 1.0;
                }
                let p = b * input / output;
                (b, p, step_at(b, p))
            }
        };
        e.decode_batch = b;
        e.prefill_tokens_per_step = p;
        e.step = step;
        e.tpot_s = step.total_s;
        e.ttft_s = self.ttft(step.total_s, b, p);
        e.output_tokens_per_s = aws * b / step.total_s;
        e.requests_per_s = e.output_tokens_per_s / output;
        let (part, seconds) = step.bottleneck();
        e.bottleneck =
            if b >= batch_limit - 1e-9 && matches!(target, Target::Capacity) && batch_limit < self.max_batch as f64 {
                format!("KV cache capacity ({kv_sequences} sequences per attention worker); then {part}")
            } else {
                format!("{part} ({:.0}% of the step)", 100.0 * seconds / step.total_s)
            };
        if let Some(slo) = self.request.slo_tpot_s {
            if e.tpot_s > slo {
                return fail(e.clone(), format!("TPOT {:.1} ms > SLO {:.1} ms", e.tpot_s * 1e3, slo * 1e3));
            }
        }
        if let Some(slo) = self.request.slo_ttft_s {
            if e.ttft_s > slo {
                return fail(e.clone(), format!("TTFT {:.1} ms > SLO {:.1} ms", e.ttft_s * 1e3, slo * 1e3));
            }
        }
        e
    }

    /// The highest request rate `shape` sustains within the SLOs (0 when none).
    pub fn max_rate(&self, shape: Shape) -> f64 {
        let capacity = self.evaluate_for(shape, Target::Capacity);
        if !capacity.feasible {
            return 0.0;
        }
        let (mut lo, mut hi) = (0.0, capacity.requests_per_s.max(1e-9) * 4.0);
        for _ in 0..50 {
            let mid = 0.5 * (lo + hi);
            if self.evaluate_for(shape, Target::Rate(mid)).feasible {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// The shape with the fewest attention workers that meets the request for `expert_workers`, `redundant` and
    /// `micro_batches` (feasibility only improves with more attention workers: each carries less of a fixed load).
    fn fewest_attention_workers(
        &self,
        expert_workers: u32,
        redundant: u32,
        micro_batches: u32,
    ) -> Result<Evaluation, Miss> {
        let limit = self.request.max_devices.saturating_sub(expert_workers);
        let try_aw = |aw: u32| -> Result<Evaluation, Miss> {
            // More attention workers send more tokens per layer, so the expert workers' activations grow and fewer
            // replicas fit: a shape can stop fitting on the way up.
            let shape = self.shape(aw, expert_workers, redundant, micro_batches).map_err(|reason| {
                Miss::unfit(if aw > 1 { format!("with {aw} attention workers, {reason}") } else { reason })
            })?;
            Ok(self.evaluate(shape))
        };
        let feasible = |e: Evaluation| if e.feasible { Ok(e) } else { Err(Miss::of(e)) };
        if let Some(aw) = self.request.pins.attention_workers {
            return feasible(try_aw(aw)?);
        }
        if limit == 0 {
            return Err(Miss::bare(format!(
                "--max-devices {} leaves no device for an attention worker",
                self.request.max_devices
            )));
        }
        let first = try_aw(1)?;
        if first.feasible {
            return Ok(first);
        }
        if matches!(self.request.target, Target::Capacity) {
            // Without a load only a context-parallel group can need more than one attention worker.
            let cp = first.context_parallel;
            if cp <= 1 {
                return Err(Miss::of(first));
            }
            if cp > limit {
                let reason = format!(
                    "{} (--max-devices {} leaves room for {limit} attention workers)",
                    first.reason.clone().unwrap_or_default(),
                    self.request.max_devices
                );
                return Err(Miss { reason, ..Miss::of(first) });
            }
            return feasible(try_aw(cp)?);
        }
        // Doubling, then bisection between the last failing and the first feasible count.
        let mut bad = 1u32;
        let mut last_miss = first;
        let mut good: Option<(u32, Evaluation)> = None;
        let mut aw = 2u32;
        while aw <= limit {
            let e = try_aw(aw)?;
            if e.feasible {
                good = Some((aw, e));
                break;
            }
            last_miss = e;
            bad = aw;
            aw = if aw == limit { limit + 1 } else { (aw * 2).min(limit) };
        }
        let Some((mut good_aw, mut good_e)) = good else { return Err(Miss::of(last_miss)) };
        while good_aw - bad > 1 {
            let mid = bad + (good_aw - bad) / 2;
            let e = try_aw(mid)?;
            if e.feasible {
                good_aw = mid;
                good_e = e;
            } else {
                bad = mid;
            }
        }
        Ok(good_e)
    }

    /// The search's order of shapes meeting the request: fewest devices, then the lowest TPOT (with a load) or the
    /// highest throughput (without).
    fn order(&self, a: &Evaluation, b: &Evaluation) -> std::cmp::Ordering {
        a.devices.cmp(&b.devices).then_with(|| match self.request.target {
            Target::Capacity => b.output_tokens_per_s.total_cmp(&a.output_tokens_per_s),
            _ => a.tpot_s.total_cmp(&b.tpot_s),
        })
    }

    /// The expert-worker counts the search considers: from the fewest that hold every expert once (`min_ew`) the
    /// next three counts, then 8, 16, 24, 32, 48, 64, ... up to twice the experts; and, to show where memory runs
    /// out, the counts of the same ladder (and 1, 2, 4 and `min_ew - 1`) below `min_ew`, which cannot hold them.
    fn expert_worker_candidates(&self, min_ew: u32) -> Vec<u32> {
        if let Some(n) = self.request.pins.expert_workers {
            return vec![n];
        }
        let experts = self.model.config.num_local_experts as u32;
        let mut v: Vec<u32> = (min_ew..min_ew + 4).collect();
        v.extend([1, 2, 4, min_ew.saturating_sub(1)]);
        let mut n = 8;
        while n <= 2 * experts {
            v.push(n);
            n += if n < 32 { 8 } else { 16 };
        }
        v.retain(|&n| n >= 1 && n < self.request.max_devices);
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Searches the shapes and returns the chosen one with the best alternatives and the best shape of every
    /// expert-worker count considered.
    pub fn search(&self) -> Result<SearchResult, PlanError> {
        let pins = self.request.pins;
        let experts = self.model.config.num_local_experts as u32;
        let max_devices = self.request.max_devices;
        // Fewest expert workers that hold every expert once.
        let min_ew = (1..=max_devices)
            .find(|&n| {
                self.hardware.shared_host || (experts as u64).div_ceil(n as u64) <= self.max_slots(self.ew_tokens(1, n))
            })
            .ok_or_else(|| PlanError::Infeasible {
                reason: format!(
                    "the routed experts need {:.1} GiB; {max_devices} devices of {:.1} GiB usable do not hold them",
                    (experts as u64 * self.slot_bytes()) as f64 / GIB,
                    self.usable() as f64 / GIB
                ),
            })?;
        let mb_candidates: Vec<u32> = match pins.micro_batches {
            Some(m) => vec![m],
            None if self.hardware.shared_host => vec![1],
            None => vec![1, 2],
        };
        let mut best: Vec<Evaluation> = Vec::new();
        let mut by_expert_workers = Vec::new();
        let mut last_failure: Option<String> = None;
        for ew in self.expert_worker_candidates(min_ew) {
            let redundant: Vec<u32> = match pins.redundant_slots {
                Some(r) => vec![r],
                None => {
                    let mut r = vec![0u32];
                    for k in [1u32, 2, 4] {
                        r.push(k * ew);
                    }
                    r.retain(|&x| x == 0 || x <= experts * (ew - 1));
                    r
                }
            };
            let (mut met, mut misses) = (Vec::new(), Vec::new());
            for &r in &redundant {
                for &mb in &mb_candidates {
                    match self.fewest_attention_workers(ew, r, mb) {
                        Ok(e) => met.push(e),
                        Err(miss) => {
                            last_failure = Some(miss.reason.clone());
                            misses.push(miss);
                        }
                    }
                }
            }
            by_expert_workers.push(match met.iter().min_by(|a, b| self.order(a, b)) {
                Some(e) => ExpertWorkerOption::new(ew, Some(e), Some(&self.capacity_of(e)), None),
                None => self.closest_miss(ew, misses),
            });
            best.extend(met);
        }
        if best.is_empty() {
            return Err(PlanError::Infeasible {
                reason: last_failure.unwrap_or_else(|| "no shape was within the search limits".into()),
            });
        }
        best.sort_by(|a, b| self.order(a, b));
        let chosen = best.remove(0);
        for option in &mut by_expert_workers {
            option.chosen = option.unmet.is_none() && option.expert_workers == chosen.shape.expert_workers;
        }
        let max_rate = self.max_rate(chosen.shape);
        best.truncate(4);
        Ok(SearchResult { chosen, max_rate_requests_per_s: max_rate, alternatives: best, by_expert_workers })
    }

    /// `e`'s shape evaluated at its capacity (`e` itself when the request gives no load).
    fn capacity_of(&self, e: &Evaluation) -> Evaluation {
        match self.request.target {
            Target::Capacity => e.clone(),
            _ => self.evaluate_for(e.shape, Target::Capacity),
        }
    }

    /// What to show for an expert-worker count none of whose shapes meets the request: a miss of the load or SLOs
    /// over one of memory (it says more about the count), one with a predicted step over one without, then the
    /// search's own order (fewest devices, then TPOT or throughput), the first tried among equals.
    fn closest_miss(&self, expert_workers: u32, misses: Vec<Miss>) -> ExpertWorkerOption {
        fn predicted(m: &Miss) -> Option<&Evaluation> {
            m.evaluation.as_deref().filter(|e| e.output_tokens_per_s > 0.0)
        }
        let rank = |m: &Miss| (m.shortfall == Shortfall::MissesTarget, predicted(m).is_some());
        let closest = misses.into_iter().min_by(|a, b| {
            rank(b).cmp(&rank(a)).then_with(|| match (predicted(a), predicted(b)) {
                (Some(x), Some(y)) => self.order(x, y),
                _ => std::cmp::Ordering::Equal,
            })
        });
        match closest {
            Some(m) => {
                let capacity = m.evaluation.as_deref().map(|e| self.capacity_of(e));
                let unmet = Unmet { shortfall: m.shortfall, reason: m.reason };
                ExpertWorkerOption::new(expert_workers, m.evaluation.as_deref(), capacity.as_ref(), Some(unmet))
            }
            None => {
                let unmet = Unmet { shortfall: Shortfall::DoesNotFit, reason: "no shape to evaluate".into() };
                ExpertWorkerOption::new(expert_workers, None, None, Some(unmet))
            }
        }
    }
}

/// What the search found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchResult {
    /// The chosen shape, evaluated.
    pub chosen: Evaluation,
    /// The highest request rate the chosen shape sustains within the SLOs.
    pub max_rate_requests_per_s: f64,
    /// The next best shapes that also meet the request.
    pub alternatives: Vec<Evaluation>,
    /// The best shape of every expert-worker count the search considered, ascending, including the counts none of
    /// whose shapes meets the request: the series `switchyard plan --plot` draws.
    pub by_expert_workers: Vec<ExpertWorkerOption>,
}
