//! `switchyard plan`: size a cluster for a model, a GPU type and a workload (see `switchyard_planner` and
//! docs/planner.md).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use switchyard_model::memory::Precision;
use switchyard_planner::search::Pins;
use switchyard_planner::vllm::{self, VllmSettings};
use switchyard_planner::{HardwareProfile, ModelSpec, PlanRequest, Planner, Target};

use crate::report_format::{emit, ReportFormat};

/// Flags of `plan`.
#[derive(clap::Args)]
pub struct Args {
    /// maverick-fp8, maverick-bf16, scout-bf16, small, tiny, or a model directory (config.json + safetensors).
    #[arg(long, default_value = "maverick-fp8")]
    model: String,
    /// Hardware profile: h100-80g, h200-141g, b200-180g, or cpu (this machine; every worker a local process).
    #[arg(long, default_value = "h100-80g")]
    gpu: String,
    /// The longest sequence (tokens) the cluster must hold; default: input + output length.
    #[arg(long, value_name = "TOKENS")]
    context: Option<u64>,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 1024)]
    input_len: u64,
    /// Generated tokens per request.
    #[arg(long, default_value_t = 256)]
    output_len: u64,
    /// Requests per second to sustain (open loop).
    #[arg(long, conflicts_with = "concurrency")]
    rate: Option<f64>,
    /// Requests in flight to sustain (closed loop).
    #[arg(long)]
    concurrency: Option<u64>,
    /// Time-to-first-token SLO, milliseconds.
    #[arg(long, value_name = "MS")]
    slo_ttft: Option<f64>,
    /// Time-per-output-token SLO, milliseconds.
    #[arg(long, value_name = "MS")]
    slo_tpot: Option<f64>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: ReportFormat,
    /// Replace the profile's rates with `switchyard bench kernels|transport --output-json` results (repeatable).
    #[arg(long, value_name = "FILE")]
    calibrate: Vec<PathBuf>,
    /// Write the plan as a values file for the Helm chart (docs/helm-values.md).
    #[arg(long, value_name = "FILE")]
    emit_values: Option<PathBuf>,
    /// Draw the predicted output tokens/s and GPU-hours per million output tokens of the best shape for every count
    /// of expert workers the search considered (the chosen plan, and the counts that miss the SLOs or do not fit,
    /// marked) into this SVG file.
    #[arg(long, value_name = "FILE.svg", conflicts_with = "check_against")]
    plot: Option<PathBuf>,
    /// Instead of planning, predict the decode tokens/s of every row of a `switchyard bench e2e --output-json`
    /// file (its cluster shape, pure decode) and compare with the measured.
    #[arg(long, value_name = "FILE")]
    check_against: Option<PathBuf>,
    /// Also show the context a vLLM-style tensor-parallel deployment on this many GPUs fits (the memory model's
    /// reference check).
    #[arg(long, value_name = "GPUS")]
    vllm_tp: Option<u32>,
    /// KV cache element type: f32, bf16 or fp8 (default: bf16 on GPUs, f32 on cpu).
    #[arg(long)]
    kv_dtype: Option<String>,
    /// Dispatch encoding: f32, bf16 or fp8 (default: fp8 on GPUs, f32 on cpu).
    #[arg(long)]
    wire: Option<String>,
    /// Combine encoding: f32 or bf16 (default: bf16 on GPUs, f32 on cpu).
    #[arg(long)]
    combine: Option<String>,
    /// Zipf exponent of expert popularity (0: uniform routing).
    #[arg(long, default_value_t = 1.0)]
    expert_skew: f64,
    /// Share of each device's memory the runtime may use.
    #[arg(long, default_value_t = 0.9)]
    memory_utilization: f64,
    /// Tokens one attention-worker step computes at most (default: 8192 on GPUs, 512 on cpu).
    #[arg(long)]
    max_batch_tokens: Option<u64>,
    /// Sequences one attention worker decodes at once at most (default: 256 on GPUs, 64 on cpu).
    #[arg(long)]
    max_batch: Option<u64>,
    /// Fix the number of attention workers.
    #[arg(long)]
    attention_workers: Option<u32>,
    /// Fix the number of expert workers.
    #[arg(long)]
    expert_workers: Option<u32>,
    /// Fix the redundant expert slots per MoE layer.
    #[arg(long)]
    redundant_slots: Option<u32>,
    /// Fix the micro-batches per attention worker (1 or 2).
    #[arg(long)]
    micro_batches: Option<u32>,
    /// Consider clusters of at most this many devices.
    #[arg(long, default_value_t = 1024)]
    max_devices: u32,
}

fn precision(flag: &str, value: &Option<String>) -> Result<Option<Precision>> {
    value.as_deref().map(|v| v.parse::<Precision>().with_context(|| format!("{flag} {v:?}"))).transpose()
}

fn slo(flag: &str, ms: Option<f64>) -> Result<Option<f64>> {
    match ms {
        Some(v) if !(v.is_finite() && v > 0.0) => bail!("{flag} must be a positive number of milliseconds, got {v}"),
        other => Ok(other.map(|v| v / 1e3)),
    }
}

/// Runs `plan`.
pub fn run(args: Args) -> Result<()> {
    let model = ModelSpec::resolve(&args.model).with_context(|| format!("--model {}", args.model))?;
    let mut hardware = HardwareProfile::named(&args.gpu).with_context(|| format!("--gpu {}", args.gpu))?;
    for path in &args.calibrate {
        switchyard_planner::calibrate::apply_file(&mut hardware, path).context("--calibrate")?;
    }
    let target = match (args.rate, args.concurrency) {
        (Some(rate), _) => Target::Rate(rate),
        (None, Some(c)) => Target::Concurrency(c),
        (None, None) => Target::Capacity,
    };
    let request = PlanRequest {
        input_len: args.input_len,
        output_len: args.output_len,
        context: args.context,
        target,
        slo_ttft_s: slo("--slo-ttft", args.slo_ttft)?,
        slo_tpot_s: slo("--slo-tpot", args.slo_tpot)?,
        kv_precision: precision("--kv-dtype", &args.kv_dtype)?,
        dispatch: precision("--wire", &args.wire)?,
        combine: precision("--combine", &args.combine)?,
        expert_skew: args.expert_skew,
        memory_utilization: args.memory_utilization,
        max_batch_tokens: args.max_batch_tokens,
        max_batch: args.max_batch,
        pins: Pins {
            attention_workers: args.attention_workers,
            expert_workers: args.expert_workers,
            redundant_slots: args.redundant_slots,
            micro_batches: args.micro_batches,
        },
        max_devices: args.max_devices,
    };

    if let Some(path) = &args.plot {
        // Before planning: a typo in the path should not cost a search.
        switchyard_simulator::plot::check_svg_path(path).context("--plot")?;
    }
    if let Some(path) = &args.check_against {
        return check(&model, &hardware, request, path, args.format);
    }

    let plan = switchyard_planner::plan(&model, &hardware, request)?;
    let reference = args.vllm_tp.map(|tp| {
        let settings = VllmSettings { tensor_parallel: tp, ..VllmSettings::default() };
        vllm::max_context(&model, &hardware, &settings)
    });
    let mut out = match args.format {
        ReportFormat::Table => {
            let mut table = plan.to_table();
            if let (Some(tp), Some(r)) = (args.vllm_tp, &reference) {
                table.push_str(&format!("\nvLLM-style TP{tp} reference (docs/planner.md): {}\n", r.describe()));
            }
            table
        }
        ReportFormat::Json => {
            let mut json = serde_json::to_value(&plan).context("serialising the plan")?;
            if let (Some(reference), Some(obj)) = (reference, json.as_object_mut()) {
                obj.insert("vllm_reference".into(), serde_json::to_value(reference).context("serialising")?);
            }
            serde_json::to_string_pretty(&json).context("serialising the plan")? + "\n"
        }
    };
    if let Some(path) = &args.emit_values {
        std::fs::write(path, switchyard_planner::values::render(&plan))
            .with_context(|| format!("writing the Helm values to {}", path.display()))?;
        if args.format == ReportFormat::Table {
            out.push_str(&format!("\nHelm values written to {}\n", path.display()));
        }
    }
    if let Some(path) = &args.plot {
        switchyard_planner::plot::write_svg(path, &plan).context("--plot")?;
        if args.format == ReportFormat::Table {
            out.push_str(&format!("\nplot written to {}\n", path.display()));
        }
    }
    emit(&out)
}

fn check(
    model: &ModelSpec,
    hardware: &HardwareProfile,
    request: PlanRequest,
    path: &PathBuf,
    format: ReportFormat,
) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let planner = Planner::new(model, hardware, request)?;
    let rows = switchyard_planner::check_against(&planner, &json)
        .map_err(|reason| anyhow::anyhow!("--check-against {}: {reason}", path.display()))?;
    let mut out = String::new();
    match format {
        ReportFormat::Json => out = serde_json::to_string_pretty(&rows).context("serialising")? + "\n",
        ReportFormat::Table => {
            out += &format!(
                "{:>6} {:>15} {:>17} {:>16} {:>8}   predicted step ms: AW GEMMs, attention, experts, dispatch/combine, \
                 overhead\n",
                "batch", "expert workers", "predicted tok/s", "measured tok/s", "error"
            );
            for r in &rows {
                let s = &r.step;
                out += &format!(
                    "{:>6} {:>15} {:>17.1} {:>16.1} {:>7.1}%   {:.1}: {:.1}, {:.1}, {:.1}, {:.1}, {:.1}",
                    r.batch,
                    r.expert_workers,
                    r.predicted_tokens_per_s,
                    r.measured_tokens_per_s,
                    r.error * 100.0,
                    s.total_s * 1e3,
                    s.dense_gemm_s * 1e3,
                    s.attention_s * 1e3,
                    s.experts_s * 1e3,
                    s.communication_s * 1e3,
                    s.overhead_s * 1e3
                );
                out.push('\n');
            }
        }
    }
    emit(&out)
}
