//! `switchyard bench gpu`: the FP8 expert GEMM on a CUDA GPU for Maverick's shapes (gate_up K=5120 N=16384, down
//! K=8192 N=5120) at 16, 128, 2048 and 8192 tokens, for one expert and for 16 local experts under Zipf routing.
//!
//! Each figure stands next to its peers measured in the same run (performance.md's method): cuBLASLt's FP8 GEMM
//! alone on the same problem, and a device-to-device copy (the bandwidth ceiling of weight streaming); and next to
//! the H100 anchors of performance.md (cuBLASLt through PyTorch). The measurement is
//! `switchyard_kernels::device::bench_expert_gemm` (CUDA events after warm-up, medians, weights rotated over more
//! than L2 holds); this command prints the table and writes the JSON. Built without the `cuda` feature it says so.

use std::path::PathBuf;

use anyhow::{Context, Result};
use switchyard_kernels::device::gpu_bench::{
    GemmBenchConfig, GemmBenchReport, GemmBenchRow, DOWN, GATE_UP, MAVERICK_ATTENTION,
};
use switchyard_kernels::device::plan::CUBLASLT_TUNED_MAX_TOKENS;
use switchyard_kernels::device::{bench_expert_gemm, Device};

/// The issue's targets: our path against cuBLASLt at >= 2048 tokens, and weight streaming at <= 128 tokens.
const TARGET_OF_CUBLASLT: f64 = 0.95;
const TARGET_STREAMING_TB_PER_S: f64 = 2.4;

/// Flags of `bench gpu`.
#[derive(clap::Args)]
pub struct Args {
    /// The GPU.
    #[arg(long, default_value = "cuda:0")]
    device: Device,
    /// Token counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "16,128,2048,8192")]
    tokens: Vec<usize>,
    /// Local experts of the grouped runs.
    #[arg(long, default_value_t = 16)]
    experts: usize,
    /// Zipf exponent of the routing skew.
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Timed repetitions per case (the median is reported).
    #[arg(long, default_value_t = 20)]
    iterations: usize,
    /// Untimed repetitions first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Calls queued back to back per timed sample (their mean is the sample): hides the host's launch latency, as a
    /// serving step does; 1 times single calls, launch latency included.
    #[arg(long, default_value_t = 10)]
    calls_per_sample: usize,
    /// Context lengths of the decode-attention cases (one query, Maverick's heads, a bf16 KV cache); "none" for none.
    #[arg(long, value_delimiter = ',', default_value = "8192,65536,262144,1048576", value_parser = parse_context)]
    attention_contexts: Vec<Option<usize>>,
    /// Also write the results as JSON.
    #[arg(long)]
    output_json: Option<PathBuf>,
}

/// A context length of `--attention-contexts`, or `None` for "none".
fn parse_context(value: &str) -> Result<Option<usize>, String> {
    match value.trim() {
        "none" => Ok(None),
        other => match other.parse::<usize>() {
            Ok(keys) if keys > 0 => Ok(Some(keys)),
            _ => Err(format!("{other:?} is neither a positive number of keys nor \"none\"")),
        },
    }
}

/// Runs `bench gpu`.
pub fn run(args: Args) -> Result<()> {
    let Device::Cuda(ordinal) = args.device else {
        anyhow::bail!("bench gpu needs a CUDA device (cuda:N), got {}", args.device);
    };
    let config = GemmBenchConfig {
        shapes: vec![GATE_UP, DOWN],
        tokens: args.tokens,
        experts: args.experts,
        zipf: args.zipf,
        iterations: args.iterations,
        warmup: args.warmup,
        calls_per_sample: args.calls_per_sample,
        attention_contexts: args.attention_contexts.into_iter().flatten().collect(),
        ..GemmBenchConfig::default()
    };
    let report = bench_expert_gemm(ordinal, &config).with_context(|| format!("bench gpu on {}", args.device))?;
    print_table(&report);
    if let Some(path) = args.output_json {
        std::fs::write(&path, serde_json::to_string_pretty(&to_json(&report, &config))?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn print_table(report: &GemmBenchReport) {
    println!("device: {}", report.device);
    println!("device-to-device copy (read + write, the streaming ceiling): {:.2} TB/s", report.copy_tb_per_s);
    println!(
        "tensor cores through mma.sync m16n8k32 E4M3 (registers only; the streaming kernels' MMA): {:.0} TFLOP/s",
        report.mma_e4m3_tflops
    );
    println!(
        "ours: experts of up to {} tokens in the streaming kernel, larger ones in cuBLASLt (up to {} tokens with the \
         algorithm tuned for their token bucket, below; the cuBLASLt column: the heuristic's choice); raw sums (the \
         row-wise scales are applied by the SwiGLU and combine kernels that read them); each time the mean of {} calls \
         queued back to back",
        report.small_m_max_tokens, CUBLASLT_TUNED_MAX_TOKENS, report.calls_per_sample
    );
    println!(
        "lone: the lone-expert kernel (one expert over every SM, stream-K) on each one-expert case it takes; the \
         plan runs it for experts of up to {} tokens (0: never)",
        report.lone_expert_max_tokens
    );
    println!(
        "{:<8} {:<11} {:>6} {:>7} {:>8} {:>10} {:>12} {:>8} {:>10} {:>9} {:>10} {:>9} {:>8} {:>10} {:>7}",
        "shape",
        "case",
        "tokens",
        "experts",
        "max/exp",
        "ours us",
        "cuBLASLt us",
        "of cuBL",
        "weight TB/s",
        "of copy",
        "anchor us",
        "TFLOP/s",
        "lone us",
        "lone TB/s",
        "target"
    );
    for row in &report.rows {
        println!(
            "{:<8} {:<11} {:>6} {:>7} {:>8} {:>10.1} {:>12.1} {:>8.2} {:>10.2} {:>9.2} {:>10} {:>9.1} {:>8} {:>10} {:>7}",
            row.shape,
            row.case,
            row.tokens,
            row.experts,
            row.max_tokens_per_expert,
            row.ours_us,
            row.cublaslt_us,
            row.cublaslt_us / row.ours_us,
            row.weight_tb_per_s,
            row.weight_tb_per_s / report.copy_tb_per_s,
            row.anchor_us.map(|a| format!("{a:.0}")).unwrap_or_else(|| "-".into()),
            row.tflops,
            row.lone_us.map(|us| format!("{us:.1}")).unwrap_or_else(|| "-".into()),
            lone_tb_per_s(row).map(|rate| format!("{rate:.2}")).unwrap_or_else(|| "-".into()),
            match target_met(row) {
                Some(true) => "met",
                Some(false) => "BELOW",
                None => "-",
            },
        );
    }
    println!(
        "targets (issue 6): ours >= {TARGET_OF_CUBLASLT} of cuBLASLt (\"of cuBL\") at >= 2048 tokens; weight streaming \
         >= {TARGET_STREAMING_TB_PER_S} TB/s at <= 128 tokens (the anchor: 1.83 TB/s for one expert)"
    );
    let judged: Vec<&GemmBenchRow> = report.rows.iter().filter(|row| target_met(row).is_some()).collect();
    let below: Vec<String> = judged
        .iter()
        .filter(|row| target_met(row) == Some(false))
        .map(|row| {
            let lone = match lone_tb_per_s(row) {
                Some(rate) if rate >= TARGET_STREAMING_TB_PER_S => " (the lone-expert kernel meets it)",
                _ => "",
            };
            format!("{} {} at {} tokens{lone}", row.shape, row.case, row.tokens)
        })
        .collect();
    println!("rows meeting their target: {} of {}", judged.len() - below.len(), judged.len());
    if !below.is_empty() {
        println!("below: {}", below.join("; "));
    }
    print_tuning(report);
    if report.attention.is_empty() {
        return;
    }
    println!();
    println!(
        "decode attention: one query, {} query / {} KV heads, head dim {}, bf16 KV in blocks of {}; \"split\": as the \
         model runs it (keys split over several blocks per KV head, merged), \"one block\": one block per KV head",
        MAVERICK_ATTENTION.q_heads,
        MAVERICK_ATTENTION.kv_heads,
        MAVERICK_ATTENTION.head_dim,
        MAVERICK_ATTENTION.block_size
    );
    println!(
        "{:>9} {:>10} {:>7} {:>13} {:>8} {:>8} {:>10} {:>9}",
        "context", "split us", "splits", "one block us", "KV TB/s", "of copy", "anchor us", "of anchor"
    );
    for row in &report.attention {
        println!(
            "{:>9} {:>10.1} {:>7} {:>13.1} {:>8.2} {:>8.2} {:>10} {:>9}",
            row.context,
            row.split_us,
            row.splits,
            row.one_block_us,
            row.kv_tb_per_s,
            row.kv_tb_per_s / report.copy_tb_per_s,
            row.anchor_us.map(|a| format!("{a:.0}")).unwrap_or_else(|| "-".into()),
            row.anchor_us.map(|a| format!("{:.2}", a / row.split_us)).unwrap_or_else(|| "-".into()),
        );
    }
}

/// What the expert path's cuBLASLt tuning chose in this run (ours runs the tuned algorithm; the cuBLASLt column the
/// heuristic's first choice).
fn print_tuning(report: &GemmBenchReport) {
    if report.tuning.is_empty() {
        return;
    }
    println!();
    println!(
        "cuBLASLt tuning of ours (each shape and token bucket timed once, on first use, over the candidates that pass \
         cuBLASLt's check and our kernels where they take the bucket, or read from the tuning cache an earlier run \
         wrote; counts round up to the bucket):"
    );
    println!(
        "{:>6} {:>6} {:>6} {:>5} {:>10} {:>12} {:>9} {:>7} {:>8} {:>9} {:>6}  tuned (heuristic)",
        "n",
        "k",
        "tokens",
        "align",
        "candidates",
        "heuristic us",
        "tuned us",
        "speedup",
        "lone us",
        "wgmma us",
        "cached"
    );
    let us = |value: Option<f64>| value.map(|us| format!("{us:.1}")).unwrap_or_else(|| "-".into());
    for row in &report.tuning {
        let speedup = match (row.heuristic_us, row.tuned_us) {
            (Some(heuristic), Some(tuned)) => format!("{:.2}", heuristic / tuned),
            _ => "-".into(),
        };
        println!(
            "{:>6} {:>6} {:>6} {:>5} {:>10} {:>12} {:>9} {:>7} {:>8} {:>9} {:>6}  {} ({})",
            row.n,
            row.k,
            row.tokens,
            row.alignment,
            row.candidates,
            us(row.heuristic_us),
            us(row.tuned_us),
            speedup,
            us(row.lone_us),
            us(row.warpgroup_us),
            if row.cached { "yes" } else { "no" },
            row.tuned,
            row.heuristic
        );
        for (config, us) in &row.runners_up {
            println!("{us:>70.1}  then: {config}");
        }
    }
}

/// Whether a row meets the issue's target for its token count; `None` where no target applies (129..2047 tokens).
fn target_met(row: &GemmBenchRow) -> Option<bool> {
    if row.tokens >= 2048 {
        Some(row.cublaslt_us / row.ours_us >= TARGET_OF_CUBLASLT)
    } else if row.tokens <= 128 {
        Some(row.weight_tb_per_s >= TARGET_STREAMING_TB_PER_S)
    } else {
        None
    }
}

/// The lone-expert kernel's weight streaming: the same bytes as ours in its time.
fn lone_tb_per_s(row: &GemmBenchRow) -> Option<f64> {
    row.lone_us.map(|us| row.weight_tb_per_s * row.ours_us / us)
}

fn to_json(report: &GemmBenchReport, config: &GemmBenchConfig) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = report
        .rows
        .iter()
        .map(|row| {
            serde_json::json!({
                "shape": row.shape, "case": row.case, "tokens": row.tokens, "experts": row.experts,
                "max_tokens_per_expert": row.max_tokens_per_expert,
                "ours_us": row.ours_us, "cublaslt_us": row.cublaslt_us,
                "ratio_to_cublaslt": row.cublaslt_us / row.ours_us,
                "weight_tb_per_s": row.weight_tb_per_s,
                "ratio_to_copy": row.weight_tb_per_s / report.copy_tb_per_s,
                "tflops": row.tflops, "anchor_us": row.anchor_us,
                "lone_us": row.lone_us, "lone_weight_tb_per_s": lone_tb_per_s(row),
                "target_met": target_met(row),
            })
        })
        .collect();
    serde_json::json!({
        "benchmark": "gpu",
        "device": report.device,
        "copy_tb_per_s": report.copy_tb_per_s,
        "mma_e4m3_tflops": report.mma_e4m3_tflops,
        "small_m_max_tokens": report.small_m_max_tokens,
        "lone_expert_max_tokens": report.lone_expert_max_tokens,
        "experts": config.experts,
        "zipf": config.zipf,
        "iterations": config.iterations,
        "warmup": config.warmup,
        "calls_per_sample": report.calls_per_sample,
        "targets": {"ratio_to_cublaslt_from_2048_tokens": TARGET_OF_CUBLASLT,
                    "weight_tb_per_s_up_to_128_tokens": TARGET_STREAMING_TB_PER_S},
        "rows": rows,
        "attention": report.attention.iter().map(|row| serde_json::json!({
            "context": row.context, "split_us": row.split_us, "splits": row.splits,
            "one_block_us": row.one_block_us, "kv_tb_per_s": row.kv_tb_per_s,
            "ratio_to_copy": row.kv_tb_per_s / report.copy_tb_per_s, "anchor_us": row.anchor_us,
            "ratio_to_anchor": row.anchor_us.map(|a| a / row.split_us),
        })).collect::<Vec<_>>(),
        "cublaslt_tuning": report.tuning.iter().map(|row| serde_json::json!({
            "n": row.n, "k": row.k, "tokens": row.tokens, "alignment": row.alignment,
            "candidates": row.candidates, "heuristic_us": row.heuristic_us, "tuned_us": row.tuned_us,
            "lone_us": row.lone_us, "warpgroup_us": row.warpgroup_us,
            "heuristic": row.heuristic, "tuned": row.tuned, "cached": row.cached,
            "runners_up": row.runners_up.iter().map(|(config, us)| serde_json::json!({"config": config, "us": us}))
                .collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(tokens: usize, ours_us: f64, cublaslt_us: f64, weight_tb_per_s: f64) -> GemmBenchRow {
        GemmBenchRow {
            shape: "down",
            case: "one expert",
            tokens,
            experts: 1,
            max_tokens_per_expert: tokens,
            ours_us,
            cublaslt_us,
            lone_us: None,
            weight_tb_per_s,
            tflops: 1.0,
            anchor_us: None,
        }
    }

    #[test]
    fn attention_contexts_parse() {
        assert_eq!(parse_context("65536"), Ok(Some(65536)));
        assert_eq!(parse_context(" none "), Ok(None));
        assert!(parse_context("0").is_err() && parse_context("8k").expect_err("8k").contains("\"8k\""));
    }

    #[test]
    fn targets_follow_the_issue() {
        // <= 128 tokens: weight streaming against 2.4 TB/s.
        assert_eq!(target_met(&row(16, 19.0, 19.0, 2.20)), Some(false));
        assert_eq!(target_met(&row(128, 17.0, 20.8, 2.47)), Some(true));
        // >= 2048 tokens: ours against cuBLASLt, at least 0.95.
        assert_eq!(target_met(&row(2048, 100.0, 96.0, 0.3)), Some(true));
        assert_eq!(target_met(&row(8192, 100.0, 94.0, 0.3)), Some(false));
        assert_eq!(target_met(&row(512, 1.0, 1.0, 1.0)), None);
        // The lone kernel's rate is ours scaled by the time ratio.
        let lone = GemmBenchRow { lone_us: Some(17.0), ..row(16, 19.0, 19.0, 2.2) };
        assert!((lone_tb_per_s(&lone).expect("lone") - 2.2 * 19.0 / 17.0).abs() < 1e-12);
    }
}
