//! `switchyard simulate`: a discrete-event simulation of a cluster far larger than one machine (thousands of GPUs),
//! with skewed and drifting expert load, GPU failures and rebalancing by the coordinator's real solver, run once per
//! placement policy on the same workload and printed side by side. Step costs come from the capacity planner's step
//! model for `--model` on `--gpu` (`switchyard_planner::PlannerCosts`, the default) or from a fixed roofline of the
//! H100 anchors in docs/performance.md (`--costs anchor`, `switchyard_simulator::AnchorCosts`); the model is in
//! docs/simulator.md.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use switchyard_planner::{HardwareProfile, ModelSpec, PlanRequest, Planner, PlannerCosts};
use switchyard_simulator::{
    plot, simulate_policies, AnchorCosts, Failure, Latency, Lengths, Policy, Reason, Report, SimConfig, StepCosts,
};

use crate::report_format::{emit, ReportFormat};

/// Where step costs come from.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CostModel {
    /// The capacity planner's step model (`switchyard plan`) for --model on --gpu.
    Planner,
    /// A roofline of the H100 anchors for Llama 4 Maverick (fixed; ignores --model and --gpu).
    Anchor,
}

/// Flags of `simulate`.
#[derive(clap::Args)]
pub struct Args {
    /// Attention workers (one GPU each).
    #[arg(long, default_value_t = 16)]
    attention_workers: usize,
    /// Expert-worker GPUs.
    #[arg(long, default_value_t = 32)]
    expert_gpus: usize,
    /// Expert GPUs per node (the solver spreads replicas over nodes; `--fail-at T:node:I` fails one).
    #[arg(long, default_value_t = 8)]
    gpus_per_node: usize,
    /// Expert replicas one GPU holds per MoE layer. Default: enough for the experts and the redundant slots.
    #[arg(long)]
    experts_per_gpu: Option<usize>,
    /// Replicas beyond one per expert, per MoE layer. Default: every free slot when --experts-per-gpu is given,
    /// else 32.
    #[arg(long)]
    redundant_slots: Option<usize>,
    /// Step costs: the capacity planner's step model for --model on --gpu, or the fixed H100 Maverick anchors.
    #[arg(long, value_enum, default_value = "planner")]
    costs: CostModel,
    /// The model whose step costs the planner computes (a `switchyard plan --model` name or directory; default
    /// maverick-fp8). Its experts and MoE layers are the simulation's.
    #[arg(long)]
    model: Option<String>,
    /// The hardware profile whose step costs the planner computes (`switchyard plan --gpu`; default h100-80g).
    #[arg(long)]
    gpu: Option<String>,
    /// Routed experts per MoE layer. Default: the model's (128 with --costs anchor).
    #[arg(long)]
    experts: Option<u32>,
    /// MoE layers. Default: the model's (24 with --costs anchor).
    #[arg(long)]
    moe_layers: Option<usize>,
    /// Token budget of one attention worker's step.
    #[arg(long, default_value_t = 2048)]
    max_batch_tokens: u32,
    /// Sequences one attention worker runs at once.
    #[arg(long, default_value_t = 256)]
    max_seqs: u32,
    /// KV positions of one attention worker (a request reserves prompt + output at admission).
    #[arg(long, default_value_t = 200_000)]
    kv_tokens: u64,
    /// Waiting requests per attention worker beyond which new ones are refused.
    #[arg(long, default_value_t = 1024)]
    max_waiting: usize,
    /// 1, or 2 for ping-pong micro-batches.
    #[arg(long, default_value_t = 1)]
    micro_batches: u32,
    /// Request arrivals per simulated second (Poisson).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Prompt length: N or MIN-MAX (uniform).
    #[arg(long, default_value = "1024")]
    input_len: Lengths,
    /// Output length: N or MIN-MAX (uniform).
    #[arg(long, default_value = "256")]
    output_len: Lengths,
    /// Simulated seconds.
    #[arg(long, default_value_t = 120.0)]
    duration_s: f64,
    /// Zipf exponent of expert popularity (0: uniform).
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Popularity swaps per layer per drift window.
    #[arg(long, default_value_t = 4)]
    drift: usize,
    /// Seconds per drift window.
    #[arg(long, default_value_t = 10.0)]
    drift_interval_s: f64,
    /// A failure: SECONDS (a random expert GPU), SECONDS:gpu:I, SECONDS:node:I or SECONDS:attention:I. Repeatable.
    #[arg(long = "fail-at", value_name = "SPEC")]
    fail_at: Vec<Failure>,
    /// Seconds from a GPU's death to the coordinator acting (about two membership lease periods).
    #[arg(long, default_value_t = 4.0)]
    detect_s: f64,
    /// Seconds the coordinator takes to solve a placement.
    #[arg(long, default_value_t = 0.05)]
    solve_s: f64,
    /// GB/s at which one GPU loads the expert weights it is given.
    #[arg(long, default_value_t = 25.0)]
    load_gbps: f64,
    /// Fraction by which a GPU loading weights computes slower.
    #[arg(long, default_value_t = 0.1)]
    load_slowdown: f64,
    /// Seconds a step waits for experts nobody holds before its requests fail.
    #[arg(long, default_value_t = 30.0)]
    recovery_timeout_s: f64,
    /// Seconds between the coordinator's looks at measured load (solver policy).
    #[arg(long, default_value_t = 30.0)]
    rebalance_interval_s: f64,
    /// Rebalance above this max/mean GPU load (mean over layers).
    #[arg(long, default_value_t = 1.25)]
    rebalance_threshold: f64,
    /// Seconds between recomputations of the expert side from the tokens in flight.
    #[arg(long, default_value_t = 0.02)]
    expert_tick_s: f64,
    /// Seconds per point of the time series. Default: the duration over 150.
    #[arg(long)]
    sample_s: Option<f64>,
    /// Placement policies, comma-separated: static, solver-once, solver; `both` is static,solver and `all` all three.
    #[arg(long, value_delimiter = ',', default_value = "both")]
    policy: Vec<String>,
    /// Seed of every random draw.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output format: the policies side by side, or the configuration, the cost model and every report (time
    /// series included) as JSON.
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    format: ReportFormat,
    /// Also draw throughput, imbalance and the expert/GPU load heatmaps over time into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// The MoE layer whose per-expert load the expert heatmap shows.
    #[arg(long, default_value_t = 0)]
    plot_layer: usize,
}

fn policies(names: &[String]) -> Result<Vec<Policy>> {
    let mut policies = Vec::new();
    for name in names {
        let expanded = match name.trim() {
            "both" => vec![Policy::Static, Policy::Solver],
            "all" => vec![Policy::Static, Policy::SolverOnce, Policy::Solver],
            other => vec![other.parse().context("--policy")?],
        };
        for policy in expanded {
            if !policies.contains(&policy) {
                policies.push(policy);
            }
        }
    }
    if policies.is_empty() {
        bail!("--policy names no policy");
    }
    Ok(policies)
}

/// The routing shape the simulation uses: `(experts, moe_layers)`, the model's with the planner's costs.
fn routing_shape(args: &Args, model: Option<&ModelSpec>) -> Result<(u32, usize)> {
    let Some(model) = model else {
        return Ok((args.experts.unwrap_or(128), args.moe_layers.unwrap_or(24)));
    };
    let (experts, layers) = (model.config.num_local_experts as u32, model.config.num_moe_layers());
    for (flag, given, of_model) in
        [("--experts", args.experts.map(|e| e as usize), experts as usize), ("--moe-layers", args.moe_layers, layers)]
    {
        if let Some(given) = given.filter(|&g| g != of_model) {
            bail!(
                "{flag} {given} contradicts --model {} ({of_model}); leave it out, or use --costs anchor for a \
                 routing shape of your own",
                model.name
            );
        }
    }
    Ok((experts, layers))
}

fn config(args: &Args, (expert_count, moe_layers): (u32, usize)) -> Result<SimConfig> {
    let experts = expert_count as usize;
    let gpus = args.expert_gpus.max(1);
    let most_redundant = experts * gpus.saturating_sub(1);
    let (slots, redundant) = match (args.experts_per_gpu, args.redundant_slots) {
        (Some(slots), Some(redundant)) => (slots, redundant),
        (Some(slots), None) => (slots, (gpus * slots).saturating_sub(experts).min(most_redundant)),
        (None, Some(redundant)) => ((experts + redundant).div_ceil(gpus), redundant),
        (None, None) => {
            let redundant = 32.min(most_redundant);
            ((experts + redundant).div_ceil(gpus), redundant)
        }
    };
    let config = SimConfig {
        attention_workers: args.attention_workers,
        expert_gpus: args.expert_gpus,
        gpus_per_node: args.gpus_per_node,
        slots_per_gpu: slots,
        redundant_slots: redundant,
        experts: expert_count,
        moe_layers,
        max_batch_tokens: args.max_batch_tokens,
        max_seqs: args.max_seqs,
        kv_tokens: args.kv_tokens,
        max_waiting: args.max_waiting,
        micro_batches: args.micro_batches,
        rate: args.rate,
        input_len: args.input_len,
        output_len: args.output_len,
        duration_s: args.duration_s,
        zipf: args.zipf,
        drift_swaps: args.drift,
        drift_interval_s: args.drift_interval_s,
        failures: args.fail_at.clone(),
        detect_s: args.detect_s,
        solve_s: args.solve_s,
        load_gbps: args.load_gbps,
        load_slowdown: args.load_slowdown,
        recovery_timeout_s: args.recovery_timeout_s,
        rebalance_interval_s: args.rebalance_interval_s,
        rebalance_threshold: args.rebalance_threshold,
        expert_tick_s: args.expert_tick_s,
        sample_interval_s: args.sample_s.unwrap_or(args.duration_s / 150.0),
        plot_layer: args.plot_layer,
        seed: args.seed,
    };
    // Messages name the setting; the flags are the same words with dashes.
    config.validate().context("invalid simulation settings")?;
    Ok(config)
}

/// Runs `simulate`.
pub fn run(args: Args) -> Result<()> {
    let policies = policies(&args.policy)?;
    if let Some(path) = &args.plot {
        // Before simulating: a typo in the path should not cost a run.
        plot::check_svg_path(path).context("--plot")?;
    }
    match args.costs {
        CostModel::Anchor => {
            if args.model.is_some() || args.gpu.is_some() {
                bail!("--model and --gpu choose the planner's step costs; --costs anchor is Maverick on H100, fixed");
            }
            let config = config(&args, routing_shape(&args, None)?)?;
            let costs = AnchorCosts::h100_maverick();
            let described = "H100 anchor roofline for Llama 4 Maverick (--costs anchor)".to_string();
            run_with(&args, &config, &policies, &costs, &costs, &described)
        }
        CostModel::Planner => {
            let name = args.model.as_deref().unwrap_or("maverick-fp8");
            let model = ModelSpec::resolve(name).with_context(|| format!("--model {name}"))?;
            let gpu = args.gpu.as_deref().unwrap_or("h100-80g");
            let hardware = HardwareProfile::named(gpu).with_context(|| format!("--gpu {gpu}"))?;
            let config = config(&args, routing_shape(&args, Some(&model))?)?;
            let planner = Planner::new(&model, &hardware, PlanRequest::default())?;
            let devices = u32::try_from(config.attention_workers + config.expert_gpus).unwrap_or(u32::MAX);
            let costs = PlannerCosts::new(&planner, devices).context("--costs planner")?;
            let summary = costs.summary();
            let described = format!(
                "the planner's step model for {} on {} (KV {}, dispatch {}, combine {}; link {:.0} GB/s + {:.0} us)",
                summary.model,
                summary.hardware,
                summary.kv_dtype,
                summary.dispatch,
                summary.combine,
                summary.link.bytes_per_s / 1e9,
                summary.link.latency_s * 1e6
            );
            run_with(&args, &config, &policies, &costs, summary, &described)
        }
    }
}

/// Simulates every policy with `costs` and prints the reports; `described` names the costs for people, `summary`
/// for the JSON.
fn run_with<C: StepCosts>(
    args: &Args,
    config: &SimConfig,
    policies: &[Policy],
    costs: &C,
    summary: &impl Serialize,
    described: &str,
) -> Result<()> {
    let started = Instant::now();
    let reports = simulate_policies(config, policies, costs).context("simulation failed")?;
    let wall_s = started.elapsed().as_secs_f64();
    let mut out = match args.format {
        ReportFormat::Table => table(config, &reports, wall_s, described),
        ReportFormat::Json => {
            let json = serde_json::json!({
                "config": config,
                "costs": summary,
                "wall_s": wall_s,
                "runs": reports,
            });
            serde_json::to_string_pretty(&json)? + "\n"
        }
    };
    if let Some(path) = &args.plot {
        plot::write_svg(path, &reports, config.plot_layer).context("--plot")?;
        if args.format == ReportFormat::Table {
            out += &format!("plot: {}\n", path.display());
        }
    }
    emit(&out)
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |v| if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.1}") })
}

fn pair(latency: &Latency) -> String {
    format!("{} / {}", ms(latency.p50_ms), ms(latency.p99_ms))
}

/// One row of the side-by-side table: a policy's report to its cell.
type Cell = fn(&Report) -> String;

/// The policies side by side, for people. (`write!` into a String cannot fail.)
fn table(config: &SimConfig, reports: &[Report], wall_s: f64, costs: &str) -> String {
    let mut out = String::new();
    let o = &mut out;
    let _ = writeln!(
        o,
        "simulated {} s: {} attention workers + {} expert GPUs ({} expert slots per GPU, {} redundant replicas per layer), {} \
         experts x {} MoE layers",
        config.duration_s,
        config.attention_workers,
        config.expert_gpus,
        config.slots_per_gpu,
        config.redundant_slots,
        config.experts,
        config.moe_layers
    );
    let _ = writeln!(
        o,
        "workload: {} req/s, input {}, output {}; zipf {}, {} popularity swaps per layer every {} s; seed {}",
        config.rate,
        config.input_len,
        config.output_len,
        config.zipf,
        config.drift_swaps,
        config.drift_interval_s,
        config.seed
    );
    let _ = writeln!(o, "step costs: {costs}");
    let rows: Vec<(&str, Cell)> = vec![
        ("output tokens/s", |r| format!("{:.0}", r.output_tokens_per_s)),
        ("prompt + output tokens/s", |r| format!("{:.0}", r.total_tokens_per_s)),
        ("requests arrived", |r| r.requests.arrived.to_string()),
        ("  completed", |r| r.requests.completed.to_string()),
        ("  failed / rejected", |r| format!("{} / {}", r.requests.failed, r.requests.rejected)),
        ("  in flight at the end", |r| r.requests.in_flight.to_string()),
        ("TTFT p50 / p99 ms", |r| pair(&r.ttft)),
        ("TPOT p50 / p99 ms", |r| pair(&r.tpot)),
        ("step ms (attention + experts)", |r| {
            format!("{:.1} ({:.1} + {:.1})", r.mean_step_ms, r.mean_attention_ms, r.mean_expert_ms)
        }),
        ("GPU load max/mean: mean / worst", |r| format!("{:.2} / {:.2}", r.imbalance.mean, r.imbalance.max)),
        ("seconds stalled", |r| format!("{:.1}", r.stalled_s)),
        ("rebalances / recoveries", |r| {
            let count = |reason| r.placements.iter().filter(|p| p.reason == reason).count();
            format!("{} / {}", count(Reason::Rebalance), count(Reason::Recovery))
        }),
        ("expert weights moved GB", |r| format!("{:.1}", r.moved_gb())),
    ];
    let width = 20;
    let _ = write!(o, "{:<34}", "");
    for report in reports {
        let _ = write!(o, "{:>width$}", report.policy.name());
    }
    let _ = writeln!(o);
    for (name, cell) in &rows {
        let _ = write!(o, "{name:<34}");
        for report in reports {
            let _ = write!(o, "{:>width$}", cell(report));
        }
        let _ = writeln!(o);
    }
    for report in reports {
        for failure in &report.failures {
            let recovered = match failure.recovered_s {
                Some(at) => format!("covered again at {at:.1} s"),
                None if failure.lost_experts == 0 => "nothing lost".into(),
                None => "never covered again".into(),
            };
            let _ = writeln!(
                o,
                "{}: {:.1} s {}: {} (layer, expert) pairs without a replica, {recovered}, {} requests failed",
                report.policy, failure.at_s, failure.what, failure.lost_experts, failure.failed_requests
            );
        }
        for note in &report.notes {
            let _ = writeln!(o, "{}: {note}", report.policy);
        }
    }
    let _ = writeln!(o, "simulated in {wall_s:.2} s of wall time");
    out
}
